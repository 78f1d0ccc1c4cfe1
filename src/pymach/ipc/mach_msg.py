"""Table 3-1: msg_send, msg_receive and msg_rpc, the kernel side of the message traps.

Send: look up the destination, wait for room if its queue is full (block, time out, or
fail at once with timeout 0), then copy the message in and queue it, or, for a kernel
port, execute it inline. An unthrottled task (a host's network message server, whose
network has flow control of its own) is never held back by a backlog, so what arrives
from one host is queued in the order it was sent. Waiting happens *before* copyin, so a
send that times out leaves the sender's rights untouched. Receive: from one port the task
receives on, or from its default group; a message larger than `rcv_size` stays queued
(RCV_TOO_LARGE).

Limits (ipc/kmsg.py, ipc/space.py): a send whose out-of-line memory would take the
sender's queued total past `ool_queued_max` fails at once with SEND_NO_BUFFER, before
copyin, so the sender keeps its rights and memory (a request to a kernel port is executed
at once and never charged). A message whose rights would take the receiver's space past
`port_names_max` names stays queued (RCV_IPC_SPACE), as a too large one does: the
receiver can free names and receive it; no right is lost.

Hand-off (Mach 3.0's message hand-off with continuations, kern/sched_prim.py): a
receive given a `Handoff` by its trap transport parks where it would block. A sender
that then queues a message for it completes the receive on its own thread (dequeue,
copyout into the receiver's space, the transport's delivery of the result), exactly as
the woken receiver would have, so no thread is woken for it; the same holds for the
errors a waking receiver would raise (RCV_TOO_LARGE and friends leave the message
queued; a port that died or moved away fails the receive with RCV_INVALID_PORT). A
receive that times out, or whose thread is terminated or suspended meanwhile, is
finished by its own thread, as before. The embedded kernel's threads never park: they
must wake anyway to run the code after the receive.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pymach.errors import MachError
from pymach.include.message import (
    ALL_OPTIONS,
    PORT_NULL,
    RCV_TIMEOUT,
    SEND_TIMEOUT,
    Message,
    validate_message,
)
from pymach.ipc.ipc_mqueue import mqueue_dequeue, mqueue_enqueue, mqueue_group_select
from pymach.ipc.kmsg import (
    copyin,
    copyout,
    copyout_fits,
    copyout_names_needed,
    kmsg_charge,
    kmsg_uncharge,
    ool_charge,
    ool_check_room,
)
from pymach.kern.sched_prim import (
    NOT_YET,
    Handoff,
    Parked,
    WaitQueue,
    deadline_after,
    thread_block,
    thread_park,
)

if TYPE_CHECKING:
    from pymach.ipc.kmsg import KMsg
    from pymach.ipc.port import Port
    from pymach.ipc.space import IpcSpace
    from pymach.kern.thread import Thread


def check_options(option: object, flag: int, timeout: object, what: str) -> float | None:
    """Validate an option word and its timeout (ms); return the timeout to apply."""
    if isinstance(option, bool) or not isinstance(option, int) or option & ~ALL_OPTIONS:
        raise MachError("KERN_INVALID_ARGUMENT", f"bad {what} option {option!r}")
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0:
        raise MachError("KERN_INVALID_ARGUMENT", f"{what} timeout must be >= 0 ms, not "
                        f"{timeout!r}")
    if not option & flag:
        raise MachError("KERN_INVALID_ARGUMENT", f"a {what} timeout needs the "
                        f"{'SEND_TIMEOUT' if flag == SEND_TIMEOUT else 'RCV_TIMEOUT'} option")
    return float(timeout)


def check_rcv_size(rcv_size: object) -> int:
    """Validate a receive buffer size."""
    if isinstance(rcv_size, bool) or not isinstance(rcv_size, int) or rcv_size <= 0:
        raise MachError("KERN_INVALID_ARGUMENT", f"rcv_size must be a positive int, "
                        f"not {rcv_size!r}")
    return rcv_size


def check_inline_size(thread: Thread, msg: Message) -> None:
    """SEND_MSG_TOO_LARGE if `msg` is over the kernel's inline limit."""
    if msg.size > thread.kernel.msg_size_max:
        raise MachError("SEND_MSG_TOO_LARGE", f"{msg.size} bytes inline; the limit is "
                        f"{thread.kernel.msg_size_max} (send large data out of line)")


def msg_copyin_held(thread: Thread, msg: Message) -> KMsg:
    """Copy `msg` in as a message to a task's port that someone other than its queue
    will hold until it is received (kernel lock held): the inline limit, the
    out-of-line allowance and the rights are checked and taken as msg_send does, but no
    backlog and no queue (the holder answers for both: machd/channels.py)."""
    check_inline_size(thread, msg)
    space = thread.task.space
    charge = ool_charge(msg, thread.kernel.page_size) if msg.items else 0
    if charge:
        ool_check_room(space, msg, charge)
    kmsg = copyin(space, msg, thread.task.name)
    kmsg_charge(space, kmsg, charge)
    return kmsg


def msg_send_locked(thread: Thread, msg: Message, timeout: float | None) -> None:
    """Send `msg` from `thread` (kernel lock held); see module docstring."""
    kernel = thread.kernel
    space = thread.task.space
    check_inline_size(thread, msg)
    deadline = deadline_after(kernel.sched, timeout)
    while True:
        port = space.lookup(msg.remote_port, "SEND_INVALID_PORT").port
        to_kernel = port.kobject is not None  # (is_kernel_port)
        if to_kernel or not port.queue_full() or thread.task.unthrottled:
            break
        if not thread_block(kernel.sched, thread, port.send_waitq, deadline):
            raise MachError("SEND_TIMED_OUT", f"port {msg.remote_port} stayed full "
                            f"({port.backlog} messages)")
    charge = 0 if to_kernel or not msg.items else ool_charge(msg, kernel.page_size)
    if charge:
        ool_check_room(space, msg, charge)
    kmsg = copyin(space, msg, thread.task.name)
    if kernel.tracing:
        kernel.trace_event(f"send {thread.name} id={msg.id} -> {port.label or port.serial}")
    if to_kernel:
        kernel.kobject_server(kmsg)
    else:
        kmsg_charge(space, kmsg, charge)
        mqueue_enqueue(port, kmsg)


def _receive_source(thread: Thread, name: int) -> tuple[Port | None, WaitQueue]:
    """The port to take a message from now (or None) and the queue to wait on."""
    space = thread.task.space
    if name == PORT_NULL:
        return mqueue_group_select(space), space.group_waitq
    entry = space.lookup(name, "RCV_INVALID_PORT")
    if not entry.receive:
        raise MachError("RCV_INVALID_PORT", f"task {thread.task.name!r} does not receive on "
                        f"port {name}")
    return entry.port, entry.port.rcv_waitq


def check_deliverable(space: IpcSpace, head: KMsg, rcv_size: int) -> None:
    """Raise the RCV_ error that keeps `head` queued, if the receiver cannot take it now:
    RCV_TOO_LARGE, RCV_NOT_ENOUGH_MEMORY (address space), RCV_IPC_SPACE (name space)."""
    if head.size > rcv_size:
        raise MachError("RCV_TOO_LARGE", f"message of {head.size} bytes exceeds "
                        f"rcv_size {rcv_size}; it stays queued")
    if not copyout_fits(space, head):
        raise MachError("RCV_NOT_ENOUGH_MEMORY", "the message's out-of-line memory "
                        "does not fit in the address space; it stays queued")
    space.check_room(copyout_names_needed(space, head), "RCV_IPC_SPACE",
                     "; the message and its rights stay queued")


def msg_receive_locked(thread: Thread, name: int, timeout: float | None,
                       rcv_size: int, handoff: Handoff | None = None) -> Message:
    """Receive one message on port `name` or the default group (kernel lock held);
    with a `handoff`, park instead of blocking (raises Parked; see module docstring)."""
    deadline = deadline_after(thread.kernel.sched, timeout)
    return _receive(thread, name, deadline, rcv_size, handoff)


def _receive(thread: Thread, name: int, deadline: float | None, rcv_size: int,
             handoff: Handoff | None) -> Message:
    """The receive loop (kernel lock held): take the message, or wait for one until
    `deadline` (ms), blocking, or parking if there is a `handoff` (the parked call's
    rest is this loop again, run by its own thread)."""
    sched = thread.kernel.sched
    try:
        while True:
            port, waitq = _receive_source(thread, name)
            if port is not None and port.queue:
                if not (thread.suspend_count or thread.task.suspend_count) \
                        or not _running_sleeper(waitq):
                    return _take(thread, port, rcv_size)
                sched.thread_wakeup_one(waitq)  # (suspended: it waits on)
            if handoff is not None and not sched.deterministic:
                if deadline is not None and sched.now() >= deadline:
                    break
                thread_park(thread, waitq, deadline,
                            lambda: _attempt(thread, name, rcv_size),
                            lambda: _receive(thread, name, deadline, rcv_size, handoff),
                            handoff)
            if not thread_block(sched, thread, waitq, deadline):
                break
    except Parked:
        raise
    except BaseException:  # (an error that keeps the message queued, termination, ...)
        _pass_on(thread, name)
        raise
    _pass_on(thread, name)
    raise MachError("RCV_TIMED_OUT", f"no message on port {name or 'default group'}")


def _running_sleeper(waitq: WaitQueue) -> bool:
    """True if a receiver that is not suspended sleeps on `waitq`: a suspended receiver
    leaves a message to it (a server's pool goes on serving while one of its threads is
    held; alone, a suspended receiver takes it and stops at the trap's exit)."""
    return any(not (t.suspend_count or t.task.suspend_count) for t in waitq.sleeping)


def _pass_on(thread: Thread, name: int) -> None:
    """A receiver leaves without a message: if one is queued, another receiver is woken
    for it (the enqueue's one wake-up may have been this receiver's)."""
    try:
        port, waitq = _receive_source(thread, name)
    except MachError:  # (the right is gone: its waiters were all woken)
        return
    if port is not None and port.queue:
        thread.kernel.sched.thread_wakeup_one(waitq)


def _attempt(thread: Thread, name: int, rcv_size: int) -> Message:
    """A parked receive, offered a wake-up: its message if one is there now (NOT_YET if
    not), or the error the receive would raise on waking."""
    port, _ = _receive_source(thread, name)
    if port is None or not port.queue:
        return NOT_YET  # type: ignore[no-any-return]
    return _take(thread, port, rcv_size)


def _take(thread: Thread, port: Port, rcv_size: int) -> Message:
    """Dequeue the head message of `port` for `thread` and copy it out (or raise the
    RCV_ error that keeps it queued)."""
    space = thread.task.space
    check_deliverable(space, port.queue[0], rcv_size)
    kmsg = mqueue_dequeue(port)
    kmsg_uncharge(kmsg)
    if thread.kernel.tracing:
        thread.kernel.trace_event(f"recv {thread.name} id={kmsg.id} <- "
                                  f"{port.label or port.serial} from {kmsg.sender}")
    return copyout(space, kmsg)


def msg_send_trap(thread: Thread, msg: object, option: object, timeout: object) -> None:
    """msg_send(message, option, timeout)."""
    with thread.kernel.trap(thread):  # checks inside: a failing call is a boundary too
        t = check_options(option, SEND_TIMEOUT, timeout, "send")
        msg_send_locked(thread, validate_message(msg), t)


def msg_receive_trap(thread: Thread, name: object, option: object, timeout: object,
                     rcv_size: object, handoff: Handoff | None = None) -> Message:
    """msg_receive(message, option, timeout): `name` is the port, PORT_NULL the group.
    With a `handoff`, a receive that must wait parks (raises Parked)."""
    with thread.kernel.trap(thread):
        if isinstance(name, Message):
            name = name.local_port
        if isinstance(name, bool) or not isinstance(name, int):
            raise MachError("RCV_INVALID_PORT", f"port name must be an int, not {name!r}")
        t = check_options(option, RCV_TIMEOUT, timeout, "receive")
        size = check_rcv_size(rcv_size)
        return msg_receive_locked(thread, name, t, size, handoff)


def msg_send_receive_trap(thread: Thread, msg: object, port: object, option: object,
                          rcv_size: object, send_timeout: object,
                          receive_timeout: object, handoff: Handoff | None = None) -> Message:
    """A server's reply and its next receive in one kernel entry (Mach 3.0's mach_msg
    with both SEND and RCV): send `msg`, then receive from `port` (PORT_NULL: the
    task's default group). Every argument is checked before anything is sent; a SEND_*
    error means nothing was sent, an RCV_* error that the message was sent. With a
    `handoff`, a receive that must wait parks (raises Parked)."""
    with thread.kernel.trap(thread):
        st = check_options(option, SEND_TIMEOUT, send_timeout, "send")
        rt = check_options(option, RCV_TIMEOUT, receive_timeout, "receive")
        size = check_rcv_size(rcv_size)
        if isinstance(port, bool) or not isinstance(port, int):
            raise MachError("RCV_INVALID_PORT", f"port name must be an int, not {port!r}")
        msg_send_locked(thread, validate_message(msg), st)
        return msg_receive_locked(thread, port, rt, size, handoff)


def msg_rpc_trap(thread: Thread, msg: object, option: object, rcv_size: object,
                 send_timeout: object, receive_timeout: object,
                 handoff: Handoff | None = None) -> Message:
    """msg_rpc: send `msg`, then receive the reply on its local (reply) port. With a
    `handoff`, a receive that must wait parks (raises Parked)."""
    with thread.kernel.trap(thread):
        st = check_options(option, SEND_TIMEOUT, send_timeout, "send")
        rt = check_options(option, RCV_TIMEOUT, receive_timeout, "receive")
        size = check_rcv_size(rcv_size)
        checked = validate_message(msg)
        if checked.local_port == PORT_NULL:
            raise MachError("RCV_INVALID_PORT", "msg_rpc needs a reply port in local_port")
        msg_send_locked(thread, checked, st)
        return msg_receive_locked(thread, checked.local_port, rt, size, handoff)
