"""Notifications: messages the kernel sends to a task's notify port (Mach 2.5 notify.h).

Each carries one Int item, the affected name in the notified task's space:
- NOTIFY_PORT_DELETED: a port the task held send rights to was destroyed; the name is gone.
- NOTIFY_RECEIVE_RIGHTS: the task (the owner) was given the port's receive rights.
- NOTIFY_OWNERSHIP_RIGHTS: the task (the receiver) was given the port's ownership rights.
- NOTIFY_OVERFLOW (pymach): notifications were lost; its Int item is how many.

Notifications are kernel messages and never block the kernel, so they cannot wait for
room: the notify port's backlog bounds them instead. When the queue is full, the
notification is dropped and ONE NOTIFY_OVERFLOW notice is queued past the backlog; while
that notice is queued, every further notification is dropped too and only counted in
it, and the notice moves behind what is queued by then (so a server that looks around
when it receives the notice has already received every message sent before the last
loss it counts). Once the task has received the notice, notifications queue again; a task that gets
one should re-check the rights it cares about (port_status) rather than trust that it
heard of every event. So a notify port never holds more than backlog + 1 of the
kernel's messages. Notifications are silently dropped if the task has no live notify
port.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pymach.include.message import Int
from pymach.ipc.ipc_mqueue import mqueue_enqueue
from pymach.ipc.kmsg import KMsg, next_kmsg_seqno

if TYPE_CHECKING:
    from pymach.ipc.port import Port
    from pymach.kern.task import Task

NOTIFY_FIRST = 0o100
NOTIFY_PORT_DELETED = NOTIFY_FIRST + 0o3
NOTIFY_MSG_ACCEPTED = NOTIFY_FIRST + 0o4
NOTIFY_OWNERSHIP_RIGHTS = NOTIFY_FIRST + 0o11
NOTIFY_RECEIVE_RIGHTS = NOTIFY_FIRST + 0o12
NOTIFY_OVERFLOW = NOTIFY_FIRST + 0o14  # pymach; below Mach 2.5's NOTIFY_LAST (FIRST + 0o15)

NOTIFY_NAMES = {
    NOTIFY_PORT_DELETED: "NOTIFY_PORT_DELETED",
    NOTIFY_OWNERSHIP_RIGHTS: "NOTIFY_OWNERSHIP_RIGHTS",
    NOTIFY_RECEIVE_RIGHTS: "NOTIFY_RECEIVE_RIGHTS",
    NOTIFY_OVERFLOW: "NOTIFY_OVERFLOW",
}


def notify_task(task: Task, msg_id: int, name: int) -> None:
    """Queue notification `msg_id` about `name` on the task's notify port, if it has one,
    or count it as lost in the port's NOTIFY_OVERFLOW notice (see module docstring).
    Never blocks; never puts more than backlog + 1 kernel messages on the port."""
    port = task.notify_port
    if port is None or port.dead or not task.active:
        return
    what = f"{task.name} {NOTIFY_NAMES.get(msg_id, msg_id)} name={name}"
    notice = _pending_notice(port)
    if notice is None and not port.queue_full():
        mqueue_enqueue(port, KMsg(port, None, msg_id, [Int(name)]))
        task.kernel.trace_event(f"notify {what}")
        return
    if notice is None:
        notice = KMsg(port, None, NOTIFY_OVERFLOW, [Int(0)], notify_overflow=True)
    else:  # it now stands for a later loss too: it goes after what is queued by now,
        port.queue.remove(notice)  # so a server that looks when it gets the notice has
        notice.seqno = next_kmsg_seqno()  # seen every message sent before that loss
    mqueue_enqueue(port, notice)
    lost = notice.items[0]
    assert isinstance(lost, Int)
    notice.items[0] = Int(lost.value + 1)
    task.kernel.trace_event(f"notify dropped {what} (notify port full)")


def _pending_notice(port: Port) -> KMsg | None:
    """The NOTIFY_OVERFLOW notice queued on `port` and not yet received, if any."""
    return next((k for k in reversed(port.queue) if k.notify_overflow), None)
