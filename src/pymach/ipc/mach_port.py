"""Table 3-2: the port operations, as the kernel performs them on a task's name space.

Each function takes the target task's `IpcSpace` (the task whose port the request was
sent to) and runs with the kernel lock held; the RPC plumbing lives in kern/.
Errors: KERN_INVALID_NAME for a name the task does not hold, KERN_NOT_RECEIVER when the
call needs receive rights, KERN_INVALID_ARGUMENT for bad values, KERN_NO_SPACE when the
task's name space is full (port_names_max).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pymach.errors import MachError
from pymach.include.message import PORT_BACKLOG_MAX, Disposition
from pymach.ipc.ipc_right import entry_deallocate
from pymach.ipc.kmsg import KPort, right_in, right_out
from pymach.ipc.port import Port

if TYPE_CHECKING:
    from pymach.ipc.space import IpcEntry, IpcSpace


@dataclass(frozen=True)
class PortStatus:
    """port_status results. num_msgs and backlog are meaningful only to the receiver."""

    unrestricted: bool  # enabled: in the task's default group for msg_receive
    num_msgs: int
    backlog: int
    receiver: bool  # the task holds receive rights
    owner: bool  # the task holds ownership rights


def port_allocate(space: IpcSpace, label: str = "") -> int:
    """Allocate a new port; the task gets send, receive and ownership rights. Returns its name.

    KERN_NO_SPACE if the task's space already holds `port_names_max` names (its name
    space is full, as in Mach 3; KERN_RESOURCE_SHORTAGE would mean the kernel ran out).
    """
    space.check_room(1, "KERN_NO_SPACE")
    port = Port(space.task.kernel, label)
    port.receiver = port.owner = space.task
    return space.insert(port, send=True, receive=True, owner=True)


def port_deallocate(space: IpcSpace, name: int) -> None:
    """Remove the task's rights named `name` (receive/ownership pass on or the port dies)."""
    space.lookup(name)
    entry_deallocate(space, name)


def _receiver_entry(space: IpcSpace, name: int) -> IpcEntry:
    entry = space.lookup(name)
    if not entry.receive:
        raise MachError("KERN_NOT_RECEIVER", f"task {space.task.name!r} is not the receiver "
                        f"of port {name}")
    return entry


def port_enable(space: IpcSpace, name: int) -> None:
    """Add the port to the task's default group of ports for msg_receive."""
    port = _receiver_entry(space, name).port
    port.enabled = True
    if port.observer is not None:
        port.observer.changed(port)
    if port.queue:
        space.mark_ready(port)
    port.sched.thread_wakeup(space.group_waitq)


def port_disable(space: IpcSpace, name: int) -> None:
    """Remove the port from the task's default group."""
    port = _receiver_entry(space, name).port
    port.enabled = False
    if port.observer is not None:
        port.observer.changed(port)


def port_messages(space: IpcSpace) -> tuple[int, ...]:
    """Names of the task's enabled ports on which messages are queued, in name order."""
    names = (space.name_of(p) for p in space.ready_ports())
    return tuple(sorted(n for n in names if n is not None))


def port_status(space: IpcSpace, name: int) -> PortStatus:
    """Status of the port named `name` in this task."""
    entry = space.lookup(name)
    port = entry.port
    return PortStatus(port.enabled and entry.receive, port.message_count(), port.backlog,
                      entry.receive, entry.owner)


def port_set_backlog(space: IpcSpace, name: int, backlog: int) -> None:
    """Limit the number of messages that may wait on the port (1..PORT_BACKLOG_MAX)."""
    port = _receiver_entry(space, name).port
    if isinstance(backlog, bool) or not isinstance(backlog, int) or not (
        1 <= backlog <= PORT_BACKLOG_MAX
    ):
        raise MachError("KERN_INVALID_ARGUMENT",
                        f"backlog must be an int in 1..{PORT_BACKLOG_MAX}, not {backlog!r}")
    port.backlog = backlog
    if port.observer is not None:
        port.observer.changed(port)
    port.sched.thread_wakeup(port.send_waitq)


def port_extract_right(space: IpcSpace, name: int, disposition: int) -> KPort:
    """Take the right `disposition` gives out of the task's name `name` (what sending it
    in a message would take: MOVE_RECEIVE leaves the task a send right, as a send does);
    the caller gets it. KERN_INVALID_ARGUMENT for a bad disposition, KERN_INVALID_NAME
    or KERN_INVALID_RIGHT if the task cannot give it."""
    if isinstance(disposition, bool) or disposition not in set(Disposition):
        raise MachError("KERN_INVALID_ARGUMENT", f"port_extract_right: no disposition "
                        f"{disposition!r:.40}")
    space.lookup(name)
    return right_out(space, name, Disposition(disposition))


def port_insert_right(space: IpcSpace, name: int, right: KPort) -> None:
    """Give the task `right` (in transit from the caller) under `name`: a name it never
    used, or its name for that port (then the rights add up). KERN_NAME_EXISTS,
    KERN_INVALID_NAME (a used name), KERN_INVALID_RIGHT (the port died), KERN_NO_SPACE
    (port_names_max)."""
    if right.port is not None and right.port.holders.get(space) is None:
        space.check_room(1, "KERN_NO_SPACE")
    right_in(space, right, name)
