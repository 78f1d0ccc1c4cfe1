"""Copy-on-reference task migration (paper 8.2): the migration manager's public face.

`task_migrate(task, host)` moves a migratable native task (`spawn(main, *args,
migratable=True)`) to a new task on this host or on another host of the cluster, and
ends the old one. The mechanism (what moves, the one state message, each host's
migration server, what is trusted) is net/migration.py.

Order of a move: check the task can move and where to (nothing is changed yet);
task_suspend, and wait until every thread has stopped in the kernel (`await_frozen`);
capture (regions as copy-on-write copies, rights moved to the migrator); build the new
task here, or send the state to the other host; task_terminate the old one. A move
refused before the state left the migrator, or refused by the other host (the rights
come back), leaves the old task running as it was. A move whose answer never comes (the
other host went down on the way) ends the old task: its rights were on their way and
are lost.
"""

from __future__ import annotations

import contextlib
import socket

from pymach.errors import MachError
from pymach.include.vm_param import VM_INHERIT_NONE, VM_INHERIT_SHARE
from pymach.mach import (
    _migrated_main,
    msg_send,
    port_allocate,
    port_deallocate,
    task_create,
    task_get_entry,
    task_info,
    task_resume,
    task_self,
    task_suspend,
    task_terminate,
    thread_create,
    vm_inherit,
    vm_resident,
)
from pymach.mach_vm import VmRegion, vm_page_size
from pymach.net.migration import (
    Bounced,
    RegionState,
    TaskState,
    await_frozen,
    check_move,
    drop_regions,
    give_back,
    host_is_local,
    migrate_to_host,
    post_notices,
    receive_state,
    state_message,
    task_build,
    task_capture,
)

_THIS_HOST = ("", "localhost")


def check_host(host: object) -> bool:
    """Whether `host` is this host (True: None, "", "localhost", this machine's name, or
    this host's name in its cluster) or another host of the cluster that is up now
    (False). KERN_INVALID_ARGUMENT for a host that is not text; KERN_INVALID_HOST for
    another host when this host is in no cluster or that host is not up."""
    if host is None:
        return True
    if not isinstance(host, str):
        raise MachError("KERN_INVALID_ARGUMENT", f"a host is a name, not {host!r:.40}")
    if host in _THIS_HOST or host == socket.gethostname():
        return True
    return host_is_local(host)


def task_migrate(task: int, host: str | None = None, prepage: bool = False) -> int:
    """Move the migratable task `task` (a send right to its task port) to `host` (None:
    this host; see `check_host`) and end it; returns the caller's send right to the new
    task's port. Other tasks' rights to its ports keep working (the ports moved); a
    spawn handle follows it. Errors: KERN_INVALID_ARGUMENT for a task that is not
    migratable or has a region that cannot move, KERN_INVALID_TASK for a task that has
    ended, KERN_INVALID_HOST for a host that is not up in this host's cluster,
    KERN_PROTECTION_FAILURE if that host does not serve the task's user: the task then
    runs on, untouched. MIG_SERVER_DIED if that host went down during the move: the
    task has ended then (see module docstring).

    With `prepage` (another host only) the manager predicts the pages the task will
    touch first, those resident in it now (`vm_resident`, before the freeze), and the
    new host brings them in before the task starts: its first touches are then local,
    and the move takes longer by the time they take to cross."""
    local = check_host(host)
    entry = _entry_of(task)
    predicted: list[tuple[int, int]] = []
    if not local:
        assert host is not None
        check_move(task_info(task)[0], entry, host)
        predicted = _working_set(task) if prepage else []
    task_suspend(task)
    try:
        await_frozen(task)
        state = task_capture(task, entry, keep_shared=local)
    except BaseException:
        task_resume(task)
        raise
    state.prepage = predicted
    if local:
        return _move_here(task, state)
    assert host is not None
    return _move_to(task, state, host)


def _working_set(task: int) -> list[tuple[int, int]]:
    """The runs (address, size) of the task's pages resident now: the prediction."""
    ps = vm_page_size()
    return [(a, n * ps) for a, n in vm_resident(task)]


def _move_here(task: int, state: TaskState) -> int:
    """Build the new task on this host, a child of the old one, and end the old one."""
    shared = state.shared
    try:
        state = _through_one_message(state)
        new = _child_sharing(task, shared, state.regions)
        task_build(state, new, lambda: _start(new, state.entry))
    except BaseException:
        give_back(task, state.rights)
        post_notices(task, state.notices)
        task_resume(task)
        raise
    task_terminate(task)
    return new


def _child_sharing(task: int, shared: list[VmRegion], copied: list[RegionState]) -> int:
    """A child of the old task that shares its shared regions (inheriting them, VM_INHERIT
    _SHARE, with every other region set not to be inherited meanwhile: those come from
    their copies), each with its own inheritance after."""
    if not shared:
        return task_create(task, False)
    attributes = [(c.address, c.size, c.inheritance) for c in copied] + [
        (r.address, r.size, r.inheritance) for r in shared]
    for c in copied:
        vm_inherit(task, c.address, c.size, VM_INHERIT_NONE)
    for r in shared:
        vm_inherit(task, r.address, r.size, VM_INHERIT_SHARE)
    try:
        new = task_create(task, True)
    finally:
        for address, size, inheritance in attributes:
            with contextlib.suppress(MachError):
                vm_inherit(task, address, size, inheritance)
    for r in shared:
        vm_inherit(new, r.address, r.size, r.inheritance)
    return new


def _start(new: int, entry: str) -> None:
    thread_create(new, _migrated_main, entry)


def _move_to(task: int, state: TaskState, host: str) -> int:
    """Send the state to `host` and end the old task (see `task_migrate`)."""
    try:
        new = migrate_to_host(state, host)
    except Bounced as e:  # refused over there: what came back goes back to the task
        drop_regions(e.state.regions)
        lost = give_back(task, e.state.rights)
        if not lost:
            post_notices(task, e.state.notices)
            task_resume(task)
            raise e.error from None
        with contextlib.suppress(MachError):
            task_terminate(task)
        raise MachError(e.error.code, f"{e.error.detail}; its receive rights came back as "
                        f"new ports, which its names {lost} cannot stand for: the task "
                        f"has ended") from None
    except MachError as e:
        if e.code.startswith("SEND_"):  # it never left: the rights are still ours
            drop_regions(state.regions)
            give_back(task, state.rights)
            post_notices(task, state.notices)
            task_resume(task)
            raise
        with contextlib.suppress(MachError):
            task_terminate(task)
        raise
    except BaseException:
        with contextlib.suppress(MachError):
            task_terminate(task)
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


def _through_one_message(state: TaskState) -> TaskState:
    """Send the state to a port of ours and receive it: on one host, the transport of
    the message another host's migration server receives."""
    me = task_self()
    port = port_allocate(me)
    try:
        msg_send(state_message(state, port))
        received = receive_state(port)
        received.shared = state.shared
        return received
    finally:
        port_deallocate(me, port)


__all__ = ["check_host", "task_migrate"]
