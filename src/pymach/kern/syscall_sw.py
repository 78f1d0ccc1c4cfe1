"""The in-process trap transport: how a thread of this process enters its kernel.

A Mach thread reaches its kernel through a trap transport with four entries:
`msg_send`, `msg_receive`, `msg_rpc` (Table 3-1) and `identity(op)` (task_self,
thread_self, task_notify, host_self, thread_reply; the numbers of include/traps.py).
A thread of this process (embedded mode, and machd's own tasks) calls the kernel's trap
functions directly (`LocalTraps`); a thread of a native task's process sends them to
machd over the typed wire (libmach/task.py, `NativeThread`), where machd's trap table
(machd/remote.py) runs these same functions. The user library (mach.py) talks only to
this interface, so the core has no native branches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from pymach.include import traps
from pymach.include.message import PORT_NULL, Message
from pymach.ipc import mach_port
from pymach.ipc.mach_msg import (
    msg_receive_trap,
    msg_rpc_trap,
    msg_send_receive_trap,
    msg_send_trap,
)

if TYPE_CHECKING:
    from pymach.ipc.port import Port
    from pymach.kern.thread import Thread


class TrapTransport(Protocol):
    """How a thread reaches its kernel (see module docstring)."""

    def msg_send(self, msg: Any, option: Any, timeout: Any) -> None: ...

    def msg_receive(self, port: Any, option: Any, timeout: Any,
                    rcv_size: Any) -> Message: ...

    def msg_rpc(self, msg: Any, option: Any, rcv_size: Any, send_timeout: Any,
                receive_timeout: Any) -> Message: ...

    def msg_send_receive(self, msg: Any, port: Any, option: Any, rcv_size: Any,
                         send_timeout: Any, receive_timeout: Any) -> Message: ...

    def identity(self, op: int) -> int: ...


def _own_name(thread: Thread, port: Port | None) -> int:
    """The calling task's name for a send right to `port`, inserting one if needed."""
    if port is None or port.dead:
        return PORT_NULL
    return thread.task.space.insert(port, send=True)


def reply_port_locked(thread: Thread) -> int:
    """The thread's reply port for RPCs, allocated on first use (kernel lock held)."""
    entry = thread.task.space.names.get(thread.reply_name)
    if entry is None or not entry.receive:
        thread.reply_name = mach_port.port_allocate(thread.task.space, f"reply:{thread.name}")
    return thread.reply_name


def _task_self(t: Thread) -> int:
    return _own_name(t, t.task.port)


def _thread_self(t: Thread) -> int:
    return _own_name(t, t.port)


def _task_notify(t: Thread) -> int:
    return _own_name(t, t.task.notify_port)


def _host_self(t: Thread) -> int:
    return _own_name(t, t.kernel.host_port)


IDENTITY: dict[int, Callable[[Thread], int]] = {
    traps.TASK_SELF: _task_self, traps.THREAD_SELF: _thread_self,
    traps.TASK_NOTIFY: _task_notify, traps.HOST_SELF: _host_self,
    traps.THREAD_REPLY: reply_port_locked,
}


class LocalTraps:
    """The trap transport of a thread of this process: direct calls."""

    def __init__(self, thread: Thread) -> None:
        self.thread = thread  # immutable

    def msg_send(self, msg: Any, option: Any, timeout: Any) -> None:
        """msg_send as this thread."""
        msg_send_trap(self.thread, msg, option, timeout)

    def msg_receive(self, port: Any, option: Any, timeout: Any, rcv_size: Any) -> Message:
        """msg_receive as this thread."""
        return msg_receive_trap(self.thread, port, option, timeout, rcv_size)

    def msg_rpc(self, msg: Any, option: Any, rcv_size: Any, send_timeout: Any,
                receive_timeout: Any) -> Message:
        """msg_rpc as this thread."""
        return msg_rpc_trap(self.thread, msg, option, rcv_size, send_timeout,
                            receive_timeout)

    def msg_send_receive(self, msg: Any, port: Any, option: Any, rcv_size: Any,
                         send_timeout: Any, receive_timeout: Any) -> Message:
        """msg_send_receive as this thread."""
        return msg_send_receive_trap(self.thread, msg, port, option, rcv_size,
                                     send_timeout, receive_timeout)

    def identity(self, op: int) -> int:
        """An identity trap, under the kernel lock."""
        with self.thread.kernel.trap(self.thread):
            return IDENTITY[op](self.thread)
