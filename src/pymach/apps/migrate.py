"""Copy-on-reference task migration (paper 8.2), on one host for now.

`task_migrate(task, host)` moves a migratable native task (`spawn(main, *args,
migratable=True)`) into a new task and ends the old one. What moves:

- its address space, region by region (address, size, protection, maximum protection,
  inheritance): each region is captured with `vm_read_memory` (a copy-on-write copy in
  the migrator's space: no page is copied) and placed at the same address in the new
  task with `vm_map_copyout`; a page reaches the new task when the new task first
  touches it (copy-on-reference: the cost of a move is the map, not the bytes);
- its port rights, under the same names (`port_names`, `port_extract_right`,
  `port_insert_right`): receive and ownership rights move with the messages queued on
  them (they are the same ports), so tasks holding send rights keep talking to it;
  whether each receive right was enabled (port_enable) moves too. Its own special ports
  do not: the new task has its own task port, notify port (notifications queued on the
  old one are lost) and thread ports, and inherits the same bootstrap port;
- its entry point (`task_get_entry`): module:qualname and typed arguments. Python
  threads, stacks and heap do not move: the new task's first thread runs the entry
  point's function again from the top, with `migrated()` true. A migratable program
  keeps the state it needs in pymach memory (vm_allocate'd regions) and port names.

The old task is frozen with task_suspend, which stops its threads at their next kernel
call: a change a thread makes to its memory after its last kernel call is not carried,
so a migratable program finishes each change before its next pymach call.

The state moves as ONE message (`state_message` / `receive_state`): regions out of
line (moved, deallocate), rights as port items, the rest as data. On one host that
message goes to a port of the migrator itself; across hosts it will go to the new host's
migration server (issue 11: receive rights and copy-on-reference memory across hosts),
and only that transport changes. Until then, another host is refused.

Not carried (refused with a clear error): regions shared with other tasks (a sharing
map: VM_INHERIT_SHARE) and regions that can never be read.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field

from pymach.errors import MachError
from pymach.include.mach_defs import (
    PORT_TYPE_OWN,
    PORT_TYPE_RECEIVE,
    PORT_TYPE_SEND,
    TASK_BOOTSTRAP_PORT,
    TASK_KERNEL_PORT,
    TASK_NOTIFY_PORT,
)
from pymach.include.message import (
    COPY_SEND,
    MOVE_ALL,
    MOVE_OWNERSHIP,
    MOVE_RECEIVE,
    MOVE_SEND,
    OOL,
    Disposition,
    IntArray,
    Item,
    Message,
    Port,
    Str,
)
from pymach.include.vm_param import VM_PROT_READ
from pymach.mach import (
    MSG_ID_MIGRATED,
    _migrated_main,
    msg_receive,
    msg_send,
    parse_entry,
    port_allocate,
    port_deallocate,
    port_enable,
    port_extract_right,
    port_insert_right,
    port_names,
    port_status,
    task_create,
    task_get_entry,
    task_get_special_port,
    task_info,
    task_resume,
    task_self,
    task_set_entry,
    task_set_name,
    task_suspend,
    task_terminate,
    task_threads,
    thread_create,
    vm_deallocate,
    vm_map_copyout,
    vm_protect,
    vm_read_memory,
    vm_regions,
)
from pymach.mach_vm import VmRegion

MSG_ID_TASK_STATE = 7201  # the one message that carries a task's state


@dataclass(frozen=True)
class RegionState:
    """One region: where it goes, its attributes, and the copy in the holder's space."""

    address: int
    size: int
    protection: int
    max_protection: int
    inheritance: int
    memory: int  # the copy's address in the holder's address space


@dataclass(frozen=True)
class RightState:
    """One name of the task: the right the holder has for it (under `held`), moved with
    `disposition`; `kept` if the holder had that right before (it keeps it)."""

    name: int
    held: int
    disposition: int  # MOVE_SEND, MOVE_RECEIVE, MOVE_OWNERSHIP or MOVE_ALL
    enabled: bool  # a receive right in the task's default group (port_enable)
    kept: bool = False


@dataclass
class TaskState:
    """A frozen task's state, held by the migrator (see module docstring)."""

    name: str
    entry: str
    regions: list[RegionState] = field(default_factory=list)
    rights: list[RightState] = field(default_factory=list)


def check_host(host: object) -> None:
    """None, "", "localhost" or this host's name: this host. Another host needs the
    network part (KERN_INVALID_HOST); not text: KERN_INVALID_ARGUMENT."""
    if host is None:
        return
    if not isinstance(host, str):
        raise MachError("KERN_INVALID_ARGUMENT", f"a host is a name, not {host!r:.40}")
    if host not in ("", "localhost", socket.gethostname()):
        raise MachError("KERN_INVALID_HOST", f"migrating a task to host {host!r} needs the "
                        f"network part (receive rights and copy-on-reference memory across "
                        f"hosts, issue 11): only this host ({socket.gethostname()!r}) for now")


def task_migrate(task: int, host: str | None = None) -> int:
    """Move the migratable task `task` (a send right to its task port) to `host` (None:
    this host; see `check_host`) and end it; returns the caller's send right to the new
    task's port. Other tasks' rights to its ports keep working (the ports moved); a
    spawn handle follows it. Errors: KERN_INVALID_ARGUMENT for a task that is not
    migratable or has a region that cannot move, KERN_INVALID_TASK for a task that has
    ended, KERN_INVALID_HOST for another host; the task then runs on, untouched."""
    check_host(host)
    entry = _entry_of(task)
    task_suspend(task)
    try:
        state = task_capture(task, entry)
    except BaseException:
        task_resume(task)
        raise
    try:
        state = _through_one_message(state)
        new = task_build(state, task)
    except BaseException:
        _give_back(task, state.rights)
        task_resume(task)
        raise
    task_terminate(task)
    return new


def _entry_of(task: int) -> str:
    """The task's entry point; KERN_INVALID_TASK if it has ended, KERN_INVALID_ARGUMENT
    if it has none."""
    try:
        entry: str = task_get_entry(task)
    except MachError as e:
        if e.code in ("SEND_INVALID_PORT", "KERN_INVALID_TASK", "KERN_INVALID_NAME"):
            raise MachError("KERN_INVALID_TASK", f"task port {task} names no live task: "
                            f"it has ended ({e.code})") from None
        raise
    if not entry:
        raise MachError("KERN_INVALID_ARGUMENT", f"task {task_info(task)[0]!r} is not "
                        f"migratable: start it with spawn(fn, ..., migratable=True)")
    return entry


# -- capture: the old task's side -------------------------------------------------------

def task_capture(task: int, entry: str) -> TaskState:
    """The state of the suspended `task`: its regions as copy-on-write copies in the
    caller's space, its rights (all but its own special ports) moved to the caller. On
    failure the task is left as it was."""
    state = TaskState(task_info(task)[0], entry)
    regions = vm_regions(task)
    _release(r.object_name for r in regions)
    made_readable = _check_regions(task, regions)
    try:
        for r in regions:
            mem = vm_read_memory(task, r.address, r.size)
            state.regions.append(RegionState(r.address, r.size, r.protection,
                                             r.max_protection, r.inheritance, mem.address))
        state.rights = _capture_rights(task)
    except BaseException:
        _drop_regions(state.regions)
        for r in made_readable:
            vm_protect(task, r.address, r.size, False, r.protection)
        raise
    return state


def _check_regions(task: int, regions: list[VmRegion]) -> list[VmRegion]:
    """Refuse regions that cannot move; make readable those that may be read (the
    copy keeps the region's protection) and return them."""
    for r in regions:
        if r.shared:
            raise MachError("KERN_INVALID_ARGUMENT", f"the region at {r.address:#x} is "
                            f"shared with other tasks (VM_INHERIT_SHARE): task migration "
                            f"does not carry shared regions yet")
        if not r.max_protection & VM_PROT_READ:
            raise MachError("KERN_INVALID_ARGUMENT", f"the region at {r.address:#x} can "
                            f"never be read (maximum protection {r.max_protection}): it "
                            f"cannot be copied")
    unreadable = [r for r in regions if not r.protection & VM_PROT_READ]
    for r in unreadable:
        vm_protect(task, r.address, r.size, False, r.protection | VM_PROT_READ)
    return unreadable


def _capture_rights(task: int) -> list[RightState]:
    """Move every right of `task` to the caller, except its rights to its own special
    ports and its threads' ports (they stay, and die with it). A copied send right tells
    which port a name stands for before anything is taken. On failure the rights taken
    are given back."""
    me = task_self()
    before = set(port_names(me)[0])
    special = {task_get_special_port(task, w) for w in (
        TASK_KERNEL_PORT, TASK_NOTIFY_PORT, TASK_BOOTSTRAP_PORT)} | set(task_threads(task))
    probed: set[int] = set()
    rights: list[RightState] = []
    try:
        for name, kind in zip(*port_names(task), strict=True):
            held: int = port_extract_right(task, name, COPY_SEND)  # our name for its port
            probed.add(held)
            if held in special:
                continue
            disposition = _disposition(kind)
            enabled = bool(kind & PORT_TYPE_RECEIVE) and bool(port_status(task, name)[0])
            port_extract_right(task, name, disposition)  # (merges into `held`)
            rights.append(RightState(name, held, disposition, enabled, held in before))
    except BaseException:
        _give_back(task, rights)
        rights = []
        raise
    finally:
        _release((special | probed) - before - {r.held for r in rights})
    return rights


def _disposition(kind: int) -> int:
    """How the right of a name with `kind` (port_names bits) moves."""
    if kind & PORT_TYPE_RECEIVE and kind & PORT_TYPE_OWN:
        return MOVE_ALL
    if kind & PORT_TYPE_RECEIVE:
        return MOVE_RECEIVE
    if kind & PORT_TYPE_OWN:
        return MOVE_OWNERSHIP
    if kind & PORT_TYPE_SEND:
        return MOVE_SEND
    raise MachError("KERN_FAILURE", f"a name with no rights (type {kind})")


# -- the one message ----------------------------------------------------------------------

def state_message(state: TaskState, dest: int) -> Message:
    """The task's state as one message to `dest`: its regions move out of line, its
    rights as port items (a right the holder keeps goes as COPY_SEND)."""
    meta = json.dumps({"name": state.name, "entry": state.entry})
    regions = tuple(v for r in state.regions for v in (
        r.address, r.size, r.protection, r.max_protection, r.inheritance))
    rights = tuple(v for r in state.rights for v in (r.name, r.disposition, int(r.enabled)))
    items: list[Item] = [Str(meta), IntArray(regions), IntArray(rights)]
    items += [OOL(r.memory, r.size, deallocate=True) for r in state.regions]
    items += [Port(r.held, _sent_as(r)) for r in state.rights]
    return Message(remote_port=dest, id=MSG_ID_TASK_STATE, items=items)


def _sent_as(r: RightState) -> Disposition:
    """How the holder gives the right on: a send right it keeps is copied."""
    return COPY_SEND if r.kept and r.disposition == MOVE_SEND else Disposition(r.disposition)


def receive_state(port: int) -> TaskState:
    """Receive a task's state sent by `state_message` on `port` (typed decoding:
    KERN_INVALID_ARGUMENT, having released what came, for anything else)."""
    before = set(port_names(task_self())[0])
    msg = msg_receive(port)
    state = _decode_state(msg, before)
    if state is None:
        _drop_regions([RegionState(0, i.size, 0, 0, 0, i.address) for i in msg.items
                       if isinstance(i, OOL)])
        _release(i.name for i in msg.items if isinstance(i, Port) and i.name not in before)
        raise MachError("KERN_INVALID_ARGUMENT", "not a task state message")
    return state


def _decode_state(msg: Message, before: set[int]) -> TaskState | None:
    """The state a message carries, or None if it is not a well-formed state message."""
    items = msg.items
    if msg.id != MSG_ID_TASK_STATE or len(items) < 3 or not isinstance(items[0], Str) or \
            not isinstance(items[1], IntArray) or not isinstance(items[2], IntArray):
        return None
    regions, rights = items[1].value, items[2].value
    nr, nk = len(regions) // 5, len(rights) // 3
    ool = [i for i in items[3:3 + nr] if isinstance(i, OOL)]
    held = [i for i in items[3 + nr:] if isinstance(i, Port)]
    try:
        meta = json.loads(items[0].value)
        name, entry = str(meta["name"]), str(meta["entry"])
        parse_entry(entry)
    except (ValueError, TypeError, KeyError, MachError):
        return None
    if len(ool) != nr or len(held) != nk or len(items) != 3 + nr + nk:
        return None
    state = TaskState(name, entry)
    state.regions = [RegionState(regions[5 * i], regions[5 * i + 1], regions[5 * i + 2],
                                 regions[5 * i + 3], regions[5 * i + 4], ool[i].address)
                     for i in range(nr)]
    state.rights = [RightState(rights[3 * i], held[i].name, rights[3 * i + 1],
                               bool(rights[3 * i + 2]), held[i].name in before)
                    for i in range(nk)]
    return state


def _through_one_message(state: TaskState) -> TaskState:
    """Send the state to a port of ours and receive it: on one host, the transport of
    the message a migration server on another host would receive."""
    me = task_self()
    port = port_allocate(me)
    try:
        msg_send(state_message(state, port))
        return receive_state(port)
    finally:
        port_deallocate(me, port)


# -- build: the new task's side -------------------------------------------------------------

def task_build(state: TaskState, parent: int) -> int:
    """A new task (a child of `parent`, whose process's directory and output it gets)
    made from `state`: regions at their addresses, rights under their names; its first
    thread runs the entry point. Returns the caller's send right to its task port. On
    failure the new task is terminated, having given back the rights it got (they stay
    in `state`); the regions are gone."""
    new = task_create(parent, False)
    inserted: list[RightState] = []
    try:
        task_set_name(new, state.name)
        for r in state.regions:
            vm_map_copyout(new, r.address, OOL(r.memory, r.size, deallocate=True),
                           r.protection, r.max_protection, r.inheritance)
        state.regions = []
        for right in state.rights:
            _insert_right(new, right)
            inserted.append(right)
        task_set_entry(new, state.entry)
        thread_create(new, _migrated_main, state.entry)
    except BaseException:
        state.rights = _take_back(new, inserted) + state.rights[len(inserted):]
        with contextlib.suppress(MachError):
            task_terminate(new)
        raise
    state.rights = []
    _tell_outcome_port(state.entry, new)
    return new


def _insert_right(task: int, r: RightState) -> None:
    """Give `task` the right under its name (enabled if it was); a send right that a
    receive or ownership right leaves the caller goes unless the caller had it."""
    port_insert_right(task, r.name, Port(r.held, _sent_as(r)))
    if r.enabled:
        port_enable(task, r.name)
    if r.disposition != MOVE_SEND and not r.kept:
        port_deallocate(task_self(), r.held)


def _tell_outcome_port(entry: str, new: int) -> None:
    """A spawned task's parent waits on its outcome port: tell it where the task is now
    (MSG_ID_MIGRATED), so its handle follows the task."""
    box = parse_entry(entry)[4]
    if not box:
        return
    before = set(port_names(task_self())[0])
    with contextlib.suppress(MachError):  # it has no such right, or the parent is gone
        held: int = port_extract_right(new, box, COPY_SEND)
        try:
            msg_send(Message(remote_port=held, id=MSG_ID_MIGRATED,
                             items=[Port(new, COPY_SEND)]))
        finally:
            if held not in before:
                port_deallocate(task_self(), held)


# -- undoing --------------------------------------------------------------------------------

def _give_back(task: int, rights: list[RightState]) -> None:
    """Return rights the caller holds to the task under their names (a failed move:
    the task runs on as it was)."""
    for r in rights:
        with contextlib.suppress(MachError):
            _insert_right(task, r)


def _take_back(task: int, rights: list[RightState]) -> list[RightState]:
    """Take rights given to `task` back to the caller (a failed build)."""
    before = set(port_names(task_self())[0])
    back = []
    for r in rights:
        with contextlib.suppress(MachError):
            held: int = port_extract_right(task, r.name, r.disposition)
            back.append(RightState(r.name, held, r.disposition, r.enabled, held in before))
    return back


def _drop_regions(regions: list[RegionState]) -> None:
    me = task_self()
    for r in regions:
        with contextlib.suppress(MachError):
            vm_deallocate(me, r.memory, r.size)


def _release(names: Iterable[int]) -> None:
    me = task_self()
    for name in names:
        if name:
            with contextlib.suppress(MachError):
                port_deallocate(me, name)


__all__ = ["RegionState", "RightState", "TaskState", "check_host", "receive_state",
           "state_message", "task_build", "task_capture", "task_migrate"]
