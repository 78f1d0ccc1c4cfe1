"""Message queues: enqueueing with wakeups, dequeueing, and the default group (3.2).

A port's queue is FIFO, so messages from one sender to one port arrive in order. A task's
*default group* is the set of its enabled ports; a group receive takes the oldest head
message among them (lowest kernel sequence number), which keeps it fair and, under the
deterministic scheduler, reproducible; it looks only at the space's `ready` ports (those
that may hold messages: space.py), so its cost does not grow with the task's other
ports (a data manager serving thousands of objects). All functions run with the kernel
lock held.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pymach.ipc.kmsg import KMsg
    from pymach.ipc.port import Port
    from pymach.ipc.space import IpcSpace


def mqueue_enqueue(port: Port, kmsg: KMsg) -> None:
    """Append `kmsg` to a live port's queue and wake a receiver for it, on the port and
    on its group (no backlog check). One message, one receiver: a server's other
    threads sleep on (a receiver that leaves without it passes the wake-up on:
    mach_msg's _receive)."""
    port.queue.append(kmsg)
    if port.observer is not None:
        port.observer.enqueued(port, kmsg)
    port.sched.thread_wakeup_one(port.rcv_waitq)
    receiver = port.receiver
    if port.enabled and receiver is not None:
        space = receiver.space
        if len(port.queue) == 1 or port not in space.ready:  # (a new head)
            space.mark_ready(port)
        port.sched.thread_wakeup_one(space.group_waitq)


def mqueue_dequeue(port: Port) -> KMsg:
    """Remove the head message and wake one waiting sender's worth of room."""
    kmsg = port.queue.popleft()
    if port.observer is not None:
        port.observer.dequeued(port, kmsg)
    receiver = port.receiver
    if port.queue and port.enabled and receiver is not None:
        receiver.space.mark_head(port)
    port.sched.thread_wakeup(port.send_waitq)
    return kmsg


def mqueue_requeue(port: Port, kmsgs: list[KMsg], at: KMsg | None) -> None:
    """Put `kmsgs` back into the port's queue, in order: in place of `at` if it is
    queued (it leaves the queue), else at the head (messages that were the port's before
    everything queued now); they take the sequence number of the place they take, and
    the port's receivers are woken."""
    queue = port.queue
    index = next((i for i, k in enumerate(queue) if k is at), None) if at is not None else None
    if index is not None:
        del queue[index]
    else:
        index = 0
    seqno = at.seqno if at is not None else (queue[0].seqno if queue else None)
    for offset, kmsg in enumerate(kmsgs):
        if seqno is not None:
            kmsg.seqno = seqno
        queue.insert(index + offset, kmsg)
    if kmsgs:
        mqueue_wake_all(port)
        receiver = port.receiver
        if port.enabled and receiver is not None:
            receiver.space.mark_ready(port)
            port.sched.thread_wakeup(receiver.space.group_waitq)


def mqueue_group_select(space: IpcSpace) -> Port | None:
    """The enabled port of `space` whose head message is oldest, or None if all are empty."""
    return space.group_select()


def mqueue_wake_all(port: Port) -> None:
    """Wake everything waiting on the port (it died or changed hands)."""
    port.sched.thread_wakeup(port.send_waitq)
    port.sched.thread_wakeup(port.rcv_waitq)
