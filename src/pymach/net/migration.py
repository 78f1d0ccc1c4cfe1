"""Copy-on-reference task migration (paper 8.2): the mechanism, and each host's
migration server.

The migration manager (apps/migrate.py: `task_migrate`) moves a migratable native task
(`spawn(main, *args, migratable=True)`) into a new task and ends the old one. What moves:

- its address space, region by region (address, size, protection, maximum protection,
  inheritance): each region is captured with `vm_read_memory` (a copy-on-write copy in
  the migrator's space: no page is copied) and placed at the same address in the new
  task with `vm_map_copyout`; a page reaches the new task when the new task first
  touches it (copy-on-reference: the cost of a move is the map, not the bytes);
- its port rights, under the same names (`port_names`, `port_extract_right`,
  `port_insert_right`): receive and ownership rights move with the messages queued on
  them (they are the same ports), so tasks holding send rights keep talking to it;
  whether each receive right was enabled (port_enable) moves too. Its special ports do
  not: the new task has its own task port, notify port and thread ports (and makes its
  own reply ports), but the notifications queued on the old notify port are queued on
  the new one (their names are the same in the new task), up to its backlog;
- its entry point (`task_get_entry`): module:qualname, typed arguments, and where its
  program runs (the spawner's cwd and module path). Python threads, stacks and heap do
  not move: the new task's first thread runs the entry point's function again from the
  top, with `migrated()` true. A migratable program keeps the state it needs in pymach
  memory (vm_allocate'd regions) and port names.

The old task is frozen with task_suspend, which stops its threads at their next kernel
call, and the manager waits until every thread has stopped there, or is blocked in one
(`await_frozen`), before it captures anything: the state is the task's between two of
its calls, never half-way through a change. A migratable program finishes each change
before its next pymach call; a thread that computes for FREEZE_TIMEOUT_S without a call
keeps its task from being frozen (KERN_FAILURE, and the task runs on).

The state moves as ONE message (`state_message` / `_decode_state`): regions out of
line (moved, deallocate), rights as port items, the rest as data. On one host the
migrator sends it to a port of its own and builds the new task itself (a child of the
old one: same process directory and output, same bootstrap port).

**Across hosts** each machd host of a cluster runs a `MigrationServer` (a task of its
kernel side, like the netmsgserver; started by net/station.py). To move a task to host
B the migrator asks its netmsgserver whether B is up (`netname_host`), freezes and
captures the task as on one host, and sends the state message to the netmsgserver's
service port naming B (`migrate_to_host`). The netmsgserver sends it on to B's
migration server with the user of the sending task *as this host's kernel reports it*
(the message trailer), never a claim in the message; its regions cross
copy-on-reference (net/cor.py: B's kernel pages them from A as the new task touches
them), its rights as any rights cross hosts (receive rights with their queued
messages). B's server makes a task of that user (refused unless B's machd serves that
user: `--allow-uid`), places the regions, inserts the rights, and starts the entry point
in a new process with the cwd and module path the task was spawned with (the program
must be at the same paths on B), whose output goes where B's machd writes. It answers
with a send right to the new task's port; a refusal carries the rights back and the old
task runs on. If B goes down after the state left A, the migrator gets MIG_SERVER_DIED
and ends the old task: rights on their way were lost with B, and a task cannot run on
without its ports.

Trust: the hosts of a cluster authenticate each other (mutual TLS); B believes A's word
on which of A's users sent a task, as it believes A's packets (hosts that share users,
as NFS hosts do), and only for users B's machd serves. The migration server's port has
one sender, B's netmsgserver, which sends there only what another host's netmsgserver
addressed to the reserved id MIGRATE_NET_ID (it does that only for a local migrator's
request); the port is never checked in, so no task can name it. The server also refuses
anything not sent by a task of machd's own user.

A region shared with other tasks (a sharing map: VM_INHERIT_SHARE) is not captured: on
one host the new task shares it (apps/migrate.py makes it a child of the old task that
inherits just those regions); to another host it is refused with a clear error, as is a
region that can never be read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from pymach.errors import MachError, ThreadTerminated, code_name
from pymach.include.mach_defs import (
    PORT_TYPE_OWN,
    PORT_TYPE_RECEIVE,
    PORT_TYPE_SEND,
    TASK_BOOTSTRAP_PORT,
    TASK_KERNEL_PORT,
    TASK_NOTIFY_PORT,
    THREAD_REPLY_PORT,
)
from pymach.include.message import (
    COPY_SEND,
    MOVE_ALL,
    MOVE_OWNERSHIP,
    MOVE_RECEIVE,
    MOVE_SEND,
    OOL,
    RCV_TIMEOUT,
    SEND_TIMEOUT,
    Code,
    Disposition,
    Int,
    IntArray,
    Item,
    Message,
    Port,
    PortArray,
    Str,
)
from pymach.include.mig import REPLY_ID_OFFSET, REPLY_SIZE_ANY
from pymach.include.netname_defs import netname_defs
from pymach.include.vm_param import VM_PROT_READ
from pymach.kern.thread import current_thread
from pymach.mach import (
    ENTRY_BLOB,
    MSG_ID_MIGRATED,
    entry_env,
    msg_receive,
    msg_rpc,
    msg_send,
    parse_entry,
    port_deallocate,
    port_enable,
    port_extract_right,
    port_insert_right,
    port_names,
    port_status,
    task_get_special_port,
    task_info,
    task_self,
    task_set_entry,
    task_set_name,
    task_terminate,
    task_threads,
    thread_get_special_port,
    thread_info,
    thread_reply,
    vm_deallocate,
    vm_map_copyout,
    vm_protect,
    vm_read_memory,
    vm_regions,
)
from pymach.mach_vm import VmRegion
from pymach.net import portops

if TYPE_CHECKING:
    from pymach.kern.task import Task

MSG_ID_TASK_STATE = 7201  # the one message that carries a task's state
MIGRATE_REPLY_ID = MSG_ID_TASK_STATE + REPLY_ID_OFFSET  # the answer of a host's server
MSG_ID_TASK_CHECK = 7202  # [Str meta]: would the host take this task now? (no rights)
MIGRATE_TIMEOUT_MS = 120_000  # how long a migrator waits for another host's answer
log = logging.getLogger("pymach.net")
netname_host = netname_defs.stub("netname_host")
NewTask = Callable[[int, str, str, list[str], bool], "Task | None"]  # (uid, name, cwd,
# module path, only_check) -> a task whose threads run in a process of its own, or None
# if only_check (kernel lock held; MachError if the host would not make it)


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
    notify: int = 0  # the task's name for its notify port (found by _capture_rights)
    notices: list[tuple[int, int]] = field(default_factory=list)  # notifications queued
    # on it (id, name): the new task's notify port gets them
    shared: list[VmRegion] = field(default_factory=list)  # regions shared with other
    # tasks, not captured: a move within the host shares them (never in the message)
    prepage: list[tuple[int, int]] = field(default_factory=list)  # runs (address, size)
    # predicted to be touched first: the new host brings them in before the task starts


class Bounced(Exception):
    """A move refused after the state left the migrator: `error` says why, `state` is
    what came back (the rights, to give back to the old task; regions to drop)."""

    def __init__(self, error: MachError, state: TaskState) -> None:
        super().__init__(str(error))
        self.error = error
        self.state = state


# -- capture: the old task's side -------------------------------------------------------

FREEZE_TIMEOUT_S = 5.0  # how long a suspended task's threads may take to stop in the kernel


def await_frozen(task: int, timeout_s: float | None = None) -> None:
    """Wait until every thread of the suspended `task` is stopped in the kernel (at a
    kernel call, or blocked in one): from then on it changes nothing until resumed, and
    what it wrote before its last kernel call is all there. KERN_FAILURE if a thread is
    still running its own code after `timeout_s` (a computation that makes no kernel
    call cannot be frozen at such a point; default FREEZE_TIMEOUT_S)."""
    timeout_s = FREEZE_TIMEOUT_S if timeout_s is None else timeout_s
    deadline = time.monotonic() + timeout_s
    while True:
        busy = [name for name, state, _ in map(thread_info, task_threads(task))
                if state in ("running", "new")]
        if not busy:
            return
        if time.monotonic() > deadline:
            raise MachError("KERN_FAILURE", f"thread {busy[0]!r} ran its own code for "
                            f"{timeout_s:g} s after task_suspend without a kernel call: the "
                            f"task cannot be frozen between two of its calls (make a pymach "
                            f"call now and then in long computations)")
        time.sleep(0.001)


def task_capture(task: int, entry: str, keep_shared: bool = False) -> TaskState:
    """The state of the suspended `task`: its regions as copy-on-write copies in the
    caller's space, its rights (all but its own special ports) moved to the caller. A
    region shared with other tasks (a sharing map) is refused, or with `keep_shared`
    (a move within this host) only listed in `shared`: the new task will share it too.
    On failure the task is left as it was."""
    state = TaskState(task_info(task)[0], entry)
    regions = vm_regions(task)
    _release(r.object_name for r in regions)
    made_readable = _check_regions(task, regions, keep_shared)
    state.shared = [r for r in regions if r.shared]
    try:
        for r in (r for r in regions if not r.shared):
            mem = vm_read_memory(task, r.address, r.size)
            state.regions.append(RegionState(r.address, r.size, r.protection,
                                             r.max_protection, r.inheritance, mem.address))
        state.rights = _capture_rights(task, state)
        state.notices = take_notices(task, state.notify)
    except BaseException:
        drop_regions(state.regions)
        for r in made_readable:
            vm_protect(task, r.address, r.size, False, r.protection)
        raise
    return state


def _check_regions(task: int, regions: list[VmRegion], keep_shared: bool) -> list[VmRegion]:
    """Refuse regions that cannot move; make readable those that may be read (the
    copy keeps the region's protection) and return them."""
    for r in regions:
        if r.shared and not keep_shared:
            raise MachError("KERN_INVALID_ARGUMENT", f"the region at {r.address:#x} is "
                            f"shared with other tasks (VM_INHERIT_SHARE): it can move "
                            f"within this host only (sharing across hosts is a data "
                            f"manager's work: pagers/shm.py)")
        if not r.max_protection & VM_PROT_READ:
            raise MachError("KERN_INVALID_ARGUMENT", f"the region at {r.address:#x} can "
                            f"never be read (maximum protection {r.max_protection}): it "
                            f"cannot be copied")
    unreadable = [r for r in regions if not r.protection & VM_PROT_READ and not r.shared]
    for r in unreadable:
        vm_protect(task, r.address, r.size, False, r.protection | VM_PROT_READ)
    return unreadable


def _capture_rights(task: int, state: TaskState) -> list[RightState]:
    """Move every right of `task` to the caller, except its rights to its own special
    ports, its threads' ports and their reply ports (they stay, and die with it). A
    copied send right tells which port a name stands for before anything is taken; a
    send right is only copied (the task's dies with it), and a task keeps a send right
    where a receive right leaves, so its names stay in use and a right given back finds
    its name. On failure the rights taken are given back."""
    me = task_self()
    before = set(port_names(me)[0])
    threads = task_threads(task)
    notify = task_get_special_port(task, TASK_NOTIFY_PORT)
    special = {task_get_special_port(task, w) for w in (
        TASK_KERNEL_PORT, TASK_BOOTSTRAP_PORT)} | set(threads) | {notify} | {
        thread_get_special_port(t, THREAD_REPLY_PORT) for t in threads}
    probed: set[int] = set()
    rights: list[RightState] = []
    try:
        for name, kind in zip(*port_names(task), strict=True):
            held: int = port_extract_right(task, name, COPY_SEND)  # our name for its port
            probed.add(held)
            if held == notify:
                state.notify = name
            if held in special:
                continue
            disposition = _disposition(kind)
            enabled = bool(kind & PORT_TYPE_RECEIVE) and bool(port_status(task, name)[0])
            if disposition != MOVE_SEND:
                port_extract_right(task, name, disposition)  # (merges into `held`)
            rights.append(RightState(name, held, disposition, enabled, held in before))
    except BaseException:
        give_back(task, rights)
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
    prepage = tuple(v for run in state.prepage for v in run)
    notices = tuple(v for notice in state.notices for v in notice)
    items: list[Item] = [Str(meta), IntArray(regions), IntArray(rights), IntArray(prepage),
                         IntArray(notices)]
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
        _release_message(msg.items, before)
        raise MachError("KERN_INVALID_ARGUMENT", "not a task state message")
    return state


_FIXED = 5  # the state message's leading items: meta, regions, rights, pre-paging runs,
# notifications


def _ints(item: Item) -> tuple[int, ...]:
    return item.value if isinstance(item, IntArray) else ()


def _decode_state(msg: Message, before: set[int]) -> TaskState | None:
    """The state a message carries, or None if it is not a well-formed state message."""
    items = msg.items
    if msg.id != MSG_ID_TASK_STATE or len(items) < _FIXED or not isinstance(items[0], Str) \
            or not all(isinstance(i, IntArray) for i in items[1:_FIXED]):
        return None
    regions, rights, prepage, notices = (_ints(i) for i in items[1:_FIXED])
    nr, nk = len(regions) // 5, len(rights) // 3
    ool = [i for i in items[_FIXED:_FIXED + nr] if isinstance(i, OOL)]
    held = [i for i in items[_FIXED + nr:] if isinstance(i, Port)]
    try:
        meta = json.loads(items[0].value)
        name, entry = str(meta["name"]), str(meta["entry"])
        parse_entry(entry)
    except (ValueError, TypeError, KeyError, MachError):
        return None
    if len(ool) != nr or len(held) != nk or len(items) != _FIXED + nr + nk \
            or len(prepage) % 2 or len(notices) % 2:
        return None
    state = TaskState(name, entry)
    state.notices = list(zip(notices[::2], notices[1::2], strict=True))
    state.prepage = list(zip(prepage[::2], prepage[1::2], strict=True))
    state.regions = [RegionState(regions[5 * i], regions[5 * i + 1], regions[5 * i + 2],
                                 regions[5 * i + 3], regions[5 * i + 4], ool[i].address)
                     for i in range(nr)]
    state.rights = [RightState(rights[3 * i], held[i].name, rights[3 * i + 1],
                               bool(rights[3 * i + 2]), held[i].name in before)
                    for i in range(nk)]
    return state


# -- build: the new task's side -------------------------------------------------------------

def task_build(state: TaskState, new: int, start: Callable[[], None]) -> int:
    """Make the empty task `new` (a send right to its port) from `state`: regions at
    their addresses, rights under their names, its entry point; then `start()` its
    first thread, and tell a spawner's outcome port where the task is now. Returns
    `new`. On failure `new` is terminated, having given back the rights it got (they
    stay in `state`); the regions are gone."""
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
        post_notices(new, state.notices)
        task_set_entry(new, state.entry)
        start()
    except BaseException:
        state.rights = _take_back(new, inserted) + state.rights[len(inserted):]
        with contextlib.suppress(MachError):
            task_terminate(new)
        raise
    state.rights = []
    _tell_outcome_port(state.entry, new)
    return new


def post_notices(task: int, notices: list[tuple[int, int]]) -> int:
    """Queue `notices` (id, name) on the task's notify port, as the kernel queued them
    on the old task's (the names are the same in the new task); returns how many fit
    (the port's backlog bounds them, as it bounds the kernel's own)."""
    if not notices:
        return 0
    before = set(port_names(task_self())[0])
    notify: int = task_get_special_port(task, TASK_NOTIFY_PORT)
    posted = 0
    try:
        for msg_id, name in notices:
            with contextlib.suppress(MachError):
                msg_send(Message(remote_port=notify, id=msg_id, items=[Int(name)]),
                         SEND_TIMEOUT, 0)
                posted += 1
    finally:
        if notify not in before:
            port_deallocate(task_self(), notify)
    return posted


def take_notices(task: int, name: int) -> list[tuple[int, int]]:
    """The notifications queued on the suspended task's notify port (`name`, its name
    for it), taken off it: the receive right comes to the caller for the moment and goes
    back under the same name, enabled as it was."""
    if not name:
        return []
    enabled = bool(port_status(task, name)[0])
    held: int = port_extract_right(task, name, MOVE_RECEIVE)
    notices: list[tuple[int, int]] = []
    try:
        while True:
            try:
                msg = msg_receive(held, RCV_TIMEOUT, 0)
            except MachError as e:
                if e.code == "RCV_TIMED_OUT":
                    break
                raise
            values = msg.values()
            if len(values) == 1 and isinstance(values[0], int):
                notices.append((msg.id, values[0]))
    finally:
        port_insert_right(task, name, Port(held, MOVE_RECEIVE))
        if enabled:
            port_enable(task, name)
    return notices


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


# -- across hosts: the migrator's side ----------------------------------------------------------

def host_is_local(host: str) -> bool:
    """Whether `host` is this host (True) or another host of the cluster that is up now
    (False), as this host's netmsgserver knows it; KERN_INVALID_HOST if this host is in
    no cluster, or `host` is not up in it."""
    boot = task_get_special_port(task_self(), TASK_BOOTSTRAP_PORT)
    try:
        return bool(netname_host(boot, host)) if boot else _no_cluster(host)
    except MachError as e:
        if e.code in ("KERN_INVALID_HOST", "KERN_INVALID_ARGUMENT"):
            raise
        return _no_cluster(host)


def _no_cluster(host: str) -> bool:
    raise MachError("KERN_INVALID_HOST", f"cannot move a task to host {host!r}: this "
                    f"host is in no cluster (start machd with --listen and --peer, "
                    f"README: Network over TCP)")


def check_move(name: str, entry: str, host: str) -> None:
    """Ask `host`'s migration server whether it would take a task named `name` with
    `entry` now (its user, its limits), before anything is frozen or moved; the
    MachError it would refuse with otherwise."""
    boot = task_get_special_port(task_self(), TASK_BOOTSTRAP_PORT)
    meta = Str(json.dumps({"name": name, "entry": entry}))
    answer = msg_rpc(Message(remote_port=boot, local_port=thread_reply(), id=MSG_ID_TASK_CHECK,
                             items=[Str(host), meta]), RCV_TIMEOUT, REPLY_SIZE_ANY,
                     receive_timeout=MIGRATE_TIMEOUT_MS)
    values = answer.values()
    code = values[0] if values and isinstance(values[0], int) else None
    if answer.id == MSG_ID_TASK_CHECK + REPLY_ID_OFFSET and code == 0:
        return
    detail = values[1] if len(values) > 1 and isinstance(values[1], str) else "no answer"
    raise MachError(code_name(code) if isinstance(code, int) and code else "KERN_FAILURE",
                    f"host {host!r} refused the task: {detail}")


def migrate_to_host(state: TaskState, host: str) -> int:
    """Send the captured `state` to `host`'s migration server through this host's
    netmsgserver; returns a send right to the new task's port. `Bounced` (with what
    came back) if the move was refused; another MachError (MIG_SERVER_DIED,
    RCV_TIMED_OUT) if the answer never came: the rights are lost then."""
    boot = task_get_special_port(task_self(), TASK_BOOTSTRAP_PORT)
    msg = state_message(state, boot)
    before = set(port_names(task_self())[0])
    answer = msg_rpc(replace(msg, local_port=thread_reply(), items=[Str(host), *msg.items]),
                     RCV_TIMEOUT, REPLY_SIZE_ANY, receive_timeout=MIGRATE_TIMEOUT_MS)
    return _answer(answer, before, host)


def _answer(msg: Message, before: set[int], host: str) -> int:
    """The new task's port from a migration server's answer, or what a refusal means."""
    items = msg.items
    code = items[0].value if items and isinstance(items[0], Int) else None
    if msg.id == MIGRATE_REPLY_ID and code == 0 and len(items) == 2 \
            and isinstance(items[1], Port) and items[1].name:
        return items[1].name
    detail = items[1].value if len(items) > 1 and isinstance(items[1], Str) else ""
    state = _decode_state(replace(msg, id=MSG_ID_TASK_STATE, items=items[2:]), before)
    name = code_name(code) if isinstance(code, int) and code else "KERN_FAILURE"
    if state is None:
        _release_message(items, before)
        raise MachError(name, f"moving the task to host {host!r} failed: "
                        f"{detail or 'a malformed answer'}")
    raise Bounced(MachError(name, f"host {host!r} refused the task: {detail}"), state)


def bounce_items(items: Iterable[Item]) -> list[Item]:
    """Items of a received message, made to move back what it brought: rights as they
    came (a send right moves), memory deallocated from the sender (this holder)."""
    back: list[Item] = []
    for i in items:
        if isinstance(i, OOL) and i.data is None:
            i = OOL(i.address, i.size, deallocate=True)
        elif isinstance(i, Port | PortArray) and i.disposition not in _MOVES:
            i = replace(i, disposition=MOVE_SEND)
        back.append(i)
    return back


def refusal(reply: int, items: Iterable[Item], code: str, detail: str) -> Message:
    """The answer to a state message that is not taken: the error, and what it brought."""
    return Message(remote_port=reply, id=MIGRATE_REPLY_ID,
                   items=[Int(MachError(code).value), Str(detail), *bounce_items(items)])


_MOVES = (MOVE_SEND, MOVE_RECEIVE, MOVE_OWNERSHIP, MOVE_ALL)


# -- across hosts: the new host's migration server -------------------------------------------

class MigrationServer:
    """One host's migration server (see module docstring): one thread, one message at a
    time. Its only sender is its host's netmsgserver."""

    def __init__(self, new_task: NewTask) -> None:
        self.new_task = new_task  # immutable: makes a task of a user (kernel lock held)
        self.moved_in = self.refused = 0  # counters (the server's thread)

    def run(self, port: int) -> None:
        """Serve state messages on `port` until the thread ends."""
        while True:
            before = set(port_names(task_self())[0])
            msg = msg_receive(port, rcv_size=REPLY_SIZE_ANY)
            try:
                self.serve(msg, before)
            except ThreadTerminated:
                raise
            except Exception:  # one bad move must not stop the next
                log.exception("migration server: could not handle message %d", msg.id)

    def serve(self, msg: Message, before: set[int]) -> None:
        """Build the task a state message [Int uid, <state>] carries, and answer (or
        answer a check)."""
        if msg.id == MSG_ID_TASK_CHECK:
            self.check(msg)
            _release([msg.remote_port] if msg.remote_port not in before else [])
            return
        uid = msg.items[0].value if msg.items and isinstance(msg.items[0], Int) else None
        reply = msg.remote_port  # a send right the task has to the same port merged into
        state = _decode_state(replace(msg, items=msg.items[1:]), before | {reply})  # it
        try:
            self._serve(msg, uid, state, before)
        finally:
            if reply and reply not in before:
                _release([reply])

    def check(self, msg: Message) -> None:
        """Answer a MSG_ID_TASK_CHECK [Int uid, Str meta]: would this host take it?"""
        values = msg.values()
        try:
            uid, meta = values
            name, entry = json.loads(meta)["name"], json.loads(meta)["entry"]
            if msg.sender_uid != os.getuid() or not isinstance(uid, int) \
                    or not isinstance(name, str) or not isinstance(entry, str):
                raise ValueError("not a check")
            cwd, path = entry_env(entry)
            _kernel_check(self.new_task, uid, name, cwd, path)
            items: list[Item] = [Int(0)]
        except MachError as e:
            items = [Int(MachError(e.code).value), Str(e.detail)]
        except (ValueError, TypeError, KeyError):
            items = [Int(MachError("KERN_INVALID_ARGUMENT").value), Str("a malformed check")]
        self._send(Message(remote_port=msg.remote_port, id=msg.id + REPLY_ID_OFFSET,
                           items=items))

    def _serve(self, msg: Message, uid: int | None, state: TaskState | None,
               before: set[int]) -> None:
        if state is None or uid is None or msg.sender_uid != os.getuid():
            self.refused += 1
            _release_message(msg.items, before)
            log.warning("migration server: refused a malformed state message")
            self._send(refusal(msg.remote_port, [], "KERN_INVALID_ARGUMENT",
                               "not a task state message"))
            return
        try:
            new = self._build(uid, state)
        except MachError as e:
            self.refused += 1
            log.warning("migration server: refused task %r of uid %d: %s", state.name, uid, e)
            drop_regions(state.regions)
            self._send(refusal(msg.remote_port, _rights_items(state), e.code, e.detail))
            return
        self.moved_in += 1
        log.info("migration server: task %r of uid %d moved in", state.name, uid)
        self._send(Message(remote_port=msg.remote_port, id=MIGRATE_REPLY_ID,
                           items=[Int(0), Port(new, MOVE_SEND)]))

    def _build(self, uid: int, state: TaskState) -> int:
        prefetch(state)
        cwd, path = entry_env(state.entry)
        new = _create_task(self.new_task, uid, state.name, cwd, path)
        return task_build(state, new, lambda: _start_entry(new, state.entry, uid))

    def _send(self, answer: Message) -> None:
        if not answer.remote_port:
            _release_message(answer.items, set())
            return
        try:
            msg_send(answer)
        except MachError as e:  # the migrator is gone: what it would have got goes
            log.warning("migration server: the migrator is gone (%s)", e.code)
            _release_message(answer.items, set())


def prefetch(state: TaskState) -> int:
    """Pre-paging: read the predicted runs of the regions the holder has (each page read
    comes from the old host now, into the object the new task's region will be a copy
    of, so its first touch finds it here); returns the bytes read. A run outside the
    regions, or a page that cannot be read, is skipped: it is a prediction."""
    done = 0
    for address, size in state.prepage:
        for r in state.regions:
            lo, hi = max(address, r.address), min(address + size, r.address + r.size)
            if lo < hi:
                with contextlib.suppress(MachError):
                    portops.read(r.memory + lo - r.address, hi - lo)
                    done += hi - lo
    return done


def _rights_items(state: TaskState) -> list[Item]:
    """The state message's items with no regions: the rights going back."""
    return state_message(replace(state, regions=[]), 0).items


def _create_task(new_task: NewTask, uid: int, name: str, cwd: str, path: list[str]) -> int:
    """(Kernel side) a new task of `uid` with the server's bootstrap port; returns the
    server's send right to its task port."""
    thread = current_thread()
    with thread.kernel.trap(thread):
        task = new_task(uid, name, cwd, path, False)
        assert task is not None and task.port is not None  # (a new task's port)
        task.set_bootstrap(thread.task.bootstrap_port)
        return thread.task.space.insert(task.port, send=True)


def _kernel_check(new_task: NewTask, uid: int, name: str, cwd: str, path: list[str]) -> None:
    """(Kernel side) the MachError `new_task` would raise for this task now, if any."""
    thread = current_thread()
    with thread.kernel.trap(thread):
        new_task(uid, name, cwd, path, True)


def _start_entry(task_name: int, entry: str, uid: int) -> None:
    """(Kernel side) the first thread of the task the server names `task_name`: it runs
    the entry point (mach.ENTRY_BLOB: a name and data, never a pickle), as `uid`."""
    thread = current_thread()
    with thread.kernel.trap(thread):
        task = thread.task.space.lookup(task_name).port.kobject
        if task is None or not getattr(task, "active", False):
            raise MachError("KERN_INVALID_TASK", "the new task ended before it started")
        code = Code(None, blob=ENTRY_BLOB + entry.encode(), origin_uid=uid)
        thread.kernel.thread_create_locked(task, code)  # type: ignore[arg-type]


# -- undoing --------------------------------------------------------------------------------

def give_back(task: int, rights: list[RightState]) -> list[int]:
    """Return rights the caller holds to the task under their names (a failed move:
    the task runs on as it was); returns the names that could not be given back (a
    receive right that crossed hosts and came back is a new port: its name in the task
    stands for the old one), whose rights are released."""
    lost = []
    for r in rights:
        try:
            _insert_right(task, r)
        except MachError:
            lost.append(r.name)
            if not r.kept:
                _release([r.held])
    return lost


def _take_back(task: int, rights: list[RightState]) -> list[RightState]:
    """Take rights given to `task` back to the caller (a failed build)."""
    before = set(port_names(task_self())[0])
    back = []
    for r in rights:
        with contextlib.suppress(MachError):
            held: int = port_extract_right(task, r.name, r.disposition)
            back.append(RightState(r.name, held, r.disposition, r.enabled, held in before))
    return back


def drop_regions(regions: list[RegionState]) -> None:
    me = task_self()
    for r in regions:
        with contextlib.suppress(MachError):
            vm_deallocate(me, r.memory, r.size)


def _release_message(items: Iterable[Item], before: set[int]) -> None:
    """Give up what a message brought that will not be used: its memory, and the rights
    it gave under names that were not ours before."""
    drop_regions([RegionState(0, i.size, 0, 0, 0, i.address) for i in items
                   if isinstance(i, OOL) and i.data is None])
    names = [n for i in items if isinstance(i, Port | PortArray)
             for n in ((i.name,) if isinstance(i, Port) else i.names)]
    _release(n for n in names if n not in before)


def _release(names: Iterable[int]) -> None:
    me = task_self()
    for name in names:
        if name:
            with contextlib.suppress(MachError):
                port_deallocate(me, name)


__all__ = [
    "MSG_ID_TASK_CHECK",
    "MSG_ID_TASK_STATE",
    "Bounced",
    "MigrationServer",
    "RegionState",
    "RightState",
    "TaskState",
    "await_frozen",
    "check_move",
    "drop_regions",
    "give_back",
    "host_is_local",
    "migrate_to_host",
    "post_notices",
    "receive_state",
    "refusal",
    "state_message",
    "take_notices",
    "task_build",
    "task_capture",
]
