"""Kernel-side port operations of the network message server (net/netmsgserver.py).

The netmsgserver is part of its host's kernel side (as a Mach 2.5 netmsgserver was
trusted by its kernel): when a receive or ownership right crosses hosts it needs a few
operations the user-level calls do not offer. Each runs in one kernel entry of the
calling server thread (`kernel.trap`), on the server's own names, under the same rules
as everything else (ipc/ipc_right.py):

- `owner_of(name)`: who owns the port: the server, another live task, or nobody;
- `give_up(name, "receive" | "ownership")`: the server gives up that right but keeps
  its send right; the right passes on exactly as when a task deallocates it
  (receive rights to the owner with NOTIFY_RECEIVE_RIGHTS, ownership to the receiver
  with NOTIFY_OWNERSHIP_RIGHTS, or the port dies);
- `destroy(name)`: the port dies now whoever else holds rights to it (a proxy whose
  remote port died, even if a task owns it);
- `requeue_front(name, msgs)`: queue messages on a port the server receives on *ahead*
  of what is queued there, atomically with respect to every sender (the splice that
  keeps per-sender order when a receive right comes back to its owner's host);
- `send_with_null(msg, placeholder)`: send a message whose null rights (PORT_NULL: a
  right that was refused or whose port died on the way) are stood for by the port
  `placeholder`, destroyed in the same kernel entry, so the receiver gets PORT_NULL as
  for a right that died in transit (a task cannot send a null right itself);
- `mark_remote(name, host)`: tell the kernel's reports (ps, lsmp, vmmap) that the
  server's port `name` is a proxy for a port of `host` ("": it is not, or no longer);
- `queued(name)`: how many messages wait on a port; `fill(name)`: that and its backlog;
- `read(address, size)`: bytes of the server's own address space, read in the kernel
  (no page is entered in the server's pmap, so a large region costs no fault per page),
  READ_CHUNK bytes per kernel entry.

Invariant: nothing here blocks (the server's task is unthrottled) and nothing reaches
another task's names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

from pymach.errors import MachError
from pymach.include.message import Message, validate_message
from pymach.ipc.ipc_right import ownership_lost, port_destroy, receive_right_lost
from pymach.ipc.mach_msg import msg_send_locked
from pymach.ipc.space import IpcEntry
from pymach.kern.thread import Thread, current_thread
from pymach.vm.vm_kern import map_read_into

Owner = Literal["server", "task", "none"]
READ_CHUNK = 1 << 20  # bytes read per kernel entry (the kernel lock is held meanwhile)


@contextlib.contextmanager
def _kernel() -> Iterator[Thread]:
    """One kernel entry of the calling server thread (kernel lock held inside)."""
    thread = current_thread()
    with thread.kernel.trap(thread):
        yield thread


def _entry(thread: Thread, name: int) -> IpcEntry | None:
    return thread.task.space.names.get(name)


def owner_of(name: int) -> Owner:
    """Who owns the port the server names `name`: "server", "task" (another live task)
    or "none" (no owner, ownership in transit, or no such name)."""
    with _kernel() as thread:
        entry = _entry(thread, name)
        owner = entry.port.owner if entry is not None else None
        if owner is None or not owner.active:
            return "none"
        return "server" if owner is thread.task else "task"


def give_up(name: int, right: Literal["receive", "ownership"]) -> None:
    """The server gives up its receive right (or its ownership) of `name`, keeping a send
    right: it passes on as a task's would (receive rights to the owner with
    NOTIFY_RECEIVE_RIGHTS, ownership to the receiver with NOTIFY_OWNERSHIP_RIGHTS), or
    the port dies. Nothing if the server does not hold that right."""
    with _kernel() as thread:
        entry = _entry(thread, name)
        if entry is None or not (entry.receive if right == "receive" else entry.owner):
            return
        entry.send = True
        if right == "receive":
            entry.receive = False
            receive_right_lost(entry.port)
        else:
            entry.owner = False
            ownership_lost(entry.port)


def destroy(name: int) -> None:
    """Destroy the port the server names `name` (every holder gets NOTIFY_PORT_DELETED)."""
    with _kernel() as thread:
        entry = _entry(thread, name)
        if entry is not None:
            port_destroy(entry.port)


def requeue_front(name: int, msgs: list[Message]) -> int:
    """Send `msgs` (addressed to `name`, a port the server receives on) so that they are
    queued ahead of the messages queued there now, in one kernel entry; returns how many
    were queued (a message whose rights died meanwhile is left out)."""
    sent = 0
    with _kernel() as thread:
        entry = _entry(thread, name)
        if entry is None or not entry.receive:
            return 0
        port = entry.port
        before = len(port.queue)
        for msg in msgs:
            try:
                msg_send_locked(thread, validate_message(msg), None)
                sent += 1
            except MachError:
                continue
        port.queue.rotate(-before)  # what was queued before goes behind them
    return sent


def send_with_null(msg: Message, placeholder: int) -> None:
    """Send `msg` (from the server) and destroy the port `placeholder` it carries send
    rights to in the same kernel entry, so they arrive as PORT_NULL. The placeholder
    is destroyed even if the send fails (the error is raised)."""
    with _kernel() as thread:
        try:
            msg_send_locked(thread, validate_message(msg), None)
        finally:
            entry = thread.task.space.remove(placeholder)
            port_destroy(entry.port)


def mark_remote(name: int, host: str) -> None:
    """Record on the port the server names `name` where the port it stands for lives
    (Port.remote_host; "" for a port of this host)."""
    with _kernel() as thread:
        entry = _entry(thread, name)
        if entry is not None:
            entry.port.remote_host = host


def queued(name: int) -> int:
    """Messages queued on the port the server names `name` (0 if it names none)."""
    with _kernel() as thread:
        entry = _entry(thread, name)
        return len(entry.port.queue) if entry is not None else 0


def fill(name: int) -> tuple[int, int]:
    """(messages queued, backlog) of the port the server names `name` ((0, 1) if it names
    none)."""
    with _kernel() as thread:
        entry = _entry(thread, name)
        return (len(entry.port.queue), entry.port.backlog) if entry is not None else (0, 1)


def read(address: int, size: int) -> bytes:
    """The `size` bytes at `address` of the server's space (MachError as a task's read
    would raise: KERN_INVALID_ADDRESS, KERN_MEMORY_ERROR)."""
    data = bytearray(max(0, size))
    read_into(address, memoryview(data))
    return bytes(data)


def read_into(address: int, into: memoryview) -> None:
    """`read`, copied straight into `into` (len(into) bytes; the same errors)."""
    for at in range(0, len(into), READ_CHUNK):
        with _kernel() as thread:
            vmap = thread.task.map
            if vmap is None:
                raise MachError("KERN_INVALID_TASK", "the server has no address space")
            map_read_into(thread, vmap, address + at, into[at:at + READ_CHUNK])
