"""Copy-on-reference task migration on one host (paper 8.2, issue 11 item 6).

The kernel calls it is built from run in every setting (CONTRACT): port_names,
vm_read_memory, vm_map_copyout, task_set_entry / task_get_entry, task_for_id. The
migration itself moves native tasks (processes under the session's machd): a task with a
NumPy array in vm_allocate'd memory and a receive right with queued messages moves; its
memory, port names and rights are the same after; a client's msg_rpc made before the
move is answered by the new process; pages reach the new task as it touches them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest

import pymach as m
from nativeutil import uffd_or_skip
from pymach import mach
from pymach.include.mach_defs import TASK_ENTRY_MAX
from pymach.pmap.native_map import WINDOW_BASE

CONTRACT = True  # the kernel-call tests: embedded (both schedulers) and native

PAGE = 4096


def code_of(call: Any, *args: Any) -> str:
    with pytest.raises(m.MachError) as e:
        call(*args)
    return e.value.code


def task_id(name: str) -> int:
    """The id `ps` shows for the live task named `name`."""
    rows = json.loads(mach.host_report(m.host_self(), "ps", ""))
    return int(next(r["id"] for r in rows if r["name"] == name))


# -- the kernel calls --------------------------------------------------------------------

def test_port_names_lists_every_name_with_its_rights(kernel: m.Kernel) -> None:
    me = m.task_self()
    child = m.task_create(me)
    names, types = m.port_names(child)
    assert list(names) == sorted(names) and len(names) == len(types)
    port = m.port_allocate(me)
    m.port_insert_right(child, 90, m.Port(port, m.MAKE_SEND))
    m.port_insert_right(child, 91, m.Port(m.port_allocate(me), m.MOVE_ALL))
    got = dict(zip(*m.port_names(child), strict=True))
    assert got[90] == m.PORT_TYPE_SEND
    assert got[91] == m.PORT_TYPE_SEND | m.PORT_TYPE_RECEIVE | m.PORT_TYPE_OWN
    m.task_terminate(child)
    assert code_of(m.port_names, child) in ("SEND_INVALID_PORT", "KERN_INVALID_TASK")


def test_a_region_is_read_as_memory_and_mapped_at_an_address(kernel: m.Kernel) -> None:
    me = m.task_self()
    a = m.vm_allocate(me, 0, 3 * PAGE, True)
    m.vm_write(me, a, b"abc" * 2000)
    mem = m.vm_read_memory(me, a, 3 * PAGE)
    assert isinstance(mem, m.OOL) and mem.address != a and mem.size == 3 * PAGE
    assert m.vm_read(me, mem.address, 6000) == b"abc" * 2000  # a copy, in our space
    child = m.task_create(me)
    at = m.vm_allocate(child, 0, PAGE, True) + 16 * PAGE
    m.vm_map_copyout(child, at, m.OOL(mem.address, mem.size, deallocate=True),
                     m.VM_PROT_READ, m.VM_PROT_READ | m.VM_PROT_WRITE, m.VM_INHERIT_NONE)
    assert code_of(m.vm_read, me, mem.address, PAGE) == "KERN_INVALID_ADDRESS"  # it moved
    placed = m.vm_regions(child, at, 3 * PAGE)  # (the copy's pieces may be entries each)
    assert sum(r.size for r in placed) == 3 * PAGE and placed[0].address == at
    assert {(r.protection, r.max_protection, r.inheritance) for r in placed} == {
        (m.VM_PROT_READ, m.VM_PROT_READ | m.VM_PROT_WRITE, m.VM_INHERIT_NONE)}
    assert m.vm_read(child, at, 6000) == b"abc" * 2000
    m.vm_write(me, a, b"x" * PAGE)  # the source changes; the copy does not
    assert m.vm_read(child, at, 3) == b"abc"
    m.task_terminate(child)


def test_vm_map_copyout_refuses_what_it_cannot_map(kernel: m.Kernel) -> None:
    me = m.task_self()
    child = m.task_create(me)
    taken = m.vm_allocate(child, 0, 2 * PAGE, True)

    def copyout(at: int, prot: int = m.VM_PROT_DEFAULT, maxp: int = m.VM_PROT_ALL) -> str:
        return code_of(m.vm_map_copyout, child, at, m.OOL(data=b"z" * PAGE), prot, maxp,
                       m.VM_INHERIT_COPY)

    assert copyout(taken + PAGE) == "KERN_NO_SPACE"  # the range is in use
    assert copyout(taken + 2 * PAGE + 1) == "KERN_INVALID_ARGUMENT"  # not page aligned
    assert copyout(taken + 8 * PAGE, m.VM_PROT_ALL, m.VM_PROT_READ) == "KERN_INVALID_ARGUMENT"
    assert code_of(m.vm_map_copyout, child, taken + 8 * PAGE, m.OOL(data=b"z"), 0, 7,
                   99) == "KERN_INVALID_ARGUMENT"  # no such inheritance
    m.task_terminate(child)


def test_vm_resident_gives_the_runs_of_pages_a_task_has(kernel: m.Kernel) -> None:
    me = m.task_self()
    a = m.vm_allocate(me, 0, 10 * PAGE, True)
    assert m.vm_resident(me, a, 10 * PAGE) == []  # nothing touched yet
    m.memory()[a:a + 1] = b"x"
    m.memory()[a + 2 * PAGE:a + 4 * PAGE] = b"y" * (2 * PAGE)
    m.memory()[a + 9 * PAGE:a + 9 * PAGE + 1] = b"z"
    assert m.vm_resident(me, a, 10 * PAGE) == [(a, 1), (a + 2 * PAGE, 2), (a + 9 * PAGE, 1)]
    assert m.vm_resident(me, a + 3 * PAGE, 5 * PAGE) == [(a + 3 * PAGE, 1)]  # the range only
    assert (a, 1) in m.vm_resident(me)  # the whole space by default
    assert code_of(m.vm_resident, me, 1 << 62, PAGE << 40) == "KERN_INVALID_ADDRESS"
    m.vm_deallocate(me, a, 10 * PAGE)
    assert m.vm_resident(me, a, 10 * PAGE) == []


def test_a_threads_special_ports_are_its_port_and_its_reply_port(kernel: m.Kernel) -> None:
    me_thread = m.thread_self()
    assert m.thread_get_special_port(me_thread, m.THREAD_KERNEL_PORT) == me_thread
    assert m.thread_get_special_port(me_thread, m.THREAD_REPLY_PORT) == m.thread_reply()
    assert code_of(m.thread_get_special_port, me_thread, 9) == "KERN_INVALID_ARGUMENT"
    child = m.task_create(m.task_self())
    assert code_of(m.thread_get_special_port, child, m.THREAD_KERNEL_PORT) in (
        "KERN_INVALID_ARGUMENT", "MIG_BAD_ID", "KERN_INVALID_NAME", "SEND_INVALID_PORT")
    m.task_terminate(child)


def test_the_entry_point_is_kept_by_the_kernel(kernel: m.Kernel) -> None:
    me = m.task_self()
    child = m.task_create(me)
    assert m.task_get_entry(child) == ""
    m.task_set_entry(child, '{"module": "x"}')
    assert m.task_get_entry(child) == '{"module": "x"}'
    too_long = "x" * (TASK_ENTRY_MAX + 1)
    assert code_of(m.task_set_entry, child, too_long) == "KERN_INVALID_ARGUMENT"
    m.task_terminate(child)


def test_task_for_id_gives_the_task_port_of_a_task_of_ours(kernel: m.Kernel) -> None:
    me = m.task_self()
    child = m.task_create(me)
    m.task_set_name(child, "findme-migrate")
    assert m.task_for_id(m.host_self(), task_id("findme-migrate")) == child  # our name
    assert code_of(m.task_for_id, m.host_self(), 10**9) == "KERN_INVALID_TASK"
    m.task_terminate(child)


# -- migration (native tasks) ------------------------------------------------------------

STATE_ADDRESS = WINDOW_BASE + (1 << 36)  # where the server keeps its state
ARRAY_PAGES = 256  # a 1 MiB NumPy array, one int64 marker per page
SERVE, NOTE, NOTES, TOUCH, HOLD, WHO, STOP = range(1, 8)


def server(svc: int, gate: int) -> str:
    """A migratable server: a NumPy array and a log of notes in pymach memory at a
    fixed address, a service port `svc`; HOLD blocks on `gate` (nobody sends there)
    so that requests queue while it is moved."""
    me, size = m.task_self(), ARRAY_PAGES * PAGE
    if not m.vm_regions(me, STATE_ADDRESS, PAGE):  # its state is not made yet (a task
        # moved before it made it starts again without it, as on its first run)
        m.vm_allocate(me, STATE_ADDRESS, size + PAGE, False)
        arr = np.frombuffer(m.memory().buffer(STATE_ADDRESS, size), dtype=np.int64)
        arr[::PAGE // 8] = np.arange(ARRAY_PAGES) * 3
    arr = np.frombuffer(m.memory().buffer(STATE_ADDRESS, size), dtype=np.int64)
    log = np.frombuffer(m.memory().buffer(STATE_ADDRESS + size, PAGE), dtype=np.int64)
    while True:
        req = m.msg_receive(svc)
        out: list[Any] = []
        if req.id == NOTE:
            log[0] += 1
            log[log[0]] = req.items[0].value
        elif req.id == NOTES:
            out = [m.IntArray(log[1:log[0] + 1].tolist())]
        elif req.id == TOUCH:
            out = [m.IntArray(arr[::PAGE // 8][:req.items[0].value].tolist())]
        elif req.id == WHO:
            out = [m.Int(os.getpid()), m.Int(int(m.migrated()))]
        elif req.id == HOLD:
            m.msg_receive(gate)
        elif req.id == STOP:
            return f"stopped, migrated={m.migrated()}"
        if out and req.remote_port:
            m.msg_send(m.Message(remote_port=req.remote_port, items=out))


def client(svc: int) -> list[int]:
    """A non-migratable client: one msg_rpc to the server, its reply."""
    reply = m.msg_rpc(m.Message(remote_port=svc, local_port=m.thread_reply(), id=WHO))
    return [reply.items[0].value, reply.items[1].value]


def rpc(svc: int, msg_id: int, *items: Any) -> list[Any]:
    reply = m.msg_rpc(m.Message(remote_port=svc, local_port=m.thread_reply(), id=msg_id,
                                items=list(items)), m.RCV_TIMEOUT,
                       receive_timeout=30_000)
    return [i.value for i in reply.items]


def wait_for(done: Any, timeout_s: float = 30.0) -> None:
    """Poll until done() (a wait, not a timed assertion: it fails only if never)."""
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.02)


def own_resident(task_name: str, address: int) -> int:
    """Pages of the task's region at `address` in its own object (touched by it)."""
    rows = json.loads(mach.host_report(m.host_self(), "vmmap", str(task_id(task_name))))
    return int(next(r["own_resident"] for r in rows if r["start"] == address))


def start_server(name: str) -> tuple[Any, int, int]:
    me = m.task_self()
    svc, gate = m.port_allocate(me), m.port_allocate(me)
    h = m.spawn(server, m.Port(svc, m.MOVE_ALL), m.Port(gate, m.MOVE_ALL), name=name,
                migratable=True)
    return h, svc, gate


def hold_with_queue(h: Any, svc: int) -> Any:
    """Make the server stop serving `svc` (HOLD), then queue three notes and an rpc
    (made by a spawned client, whose handle is returned) on it."""
    served = json.loads(m.task_get_entry(h.port))["args"][0]  # its name for svc
    m.msg_send(m.Message(remote_port=svc, id=HOLD))  # it stops serving svc
    wait_for(lambda: m.port_status(h.port, served)[1] == 0)  # once it has taken HOLD
    # (else a server slow to come back to its receive could still have HOLD queued when
    # frozen: HOLD would move with svc, and the new task would block on gate instead)
    for k in (11, 22, 33):
        m.msg_send(m.Message(remote_port=svc, id=NOTE, items=[m.Int(k)]))
    asker = m.spawn(client, m.Port(svc, m.COPY_SEND), name="asker")  # its rpc queues too
    wait_for(lambda: m.port_status(h.port, served)[1] == 4)  # 3 notes and the rpc
    return asker


@pytest.mark.slow
def test_a_task_moves_with_its_memory_ports_and_queued_messages(native: str) -> None:
    h, svc, _ = start_server("mover")
    old_pid, moved = rpc(svc, WHO)
    assert moved == 0
    asker = hold_with_queue(h, svc)
    names = m.port_names(h.port)

    old = h.port
    new = m.task_migrate(old)

    assert code_of(m.task_info, old) in ("SEND_INVALID_PORT", "KERN_INVALID_TASK",
                                         "KERN_INVALID_NAME")
    assert m.task_info(new)[0] == "mover"
    assert h.port == new  # the handle follows the task
    new_pid, moved = asker.result(30_000)  # the rpc made before the move: answered after
    assert moved == 1 and new_pid != old_pid
    assert rpc(svc, NOTES) == [(11, 22, 33)]  # queued before the move, received after
    after = dict(zip(*m.port_names(new), strict=True))
    before = dict(zip(*names, strict=True))
    assert {n: t for n, t in before.items() if n in after} == {
        n: after[n] for n in before if n in after}
    stayed = set(before) - set(after)  # every name but its thread's reply port moved
    assert len(stayed) <= 1 and all(before[n] & m.PORT_TYPE_RECEIVE for n in stayed)
    assert own_resident("mover", STATE_ADDRESS) <= 2  # nothing copied yet but the log
    assert rpc(svc, TOUCH, m.Int(10)) == [tuple(3 * i for i in range(10))]
    grown = own_resident("mover", STATE_ADDRESS)
    assert 10 <= grown <= 12  # the pages it touched came, no more
    assert rpc(svc, TOUCH, m.Int(ARRAY_PAGES))[0] == tuple(3 * i for i in range(ARRAY_PAGES))
    assert own_resident("mover", STATE_ADDRESS) >= ARRAY_PAGES
    m.msg_send(m.Message(remote_port=svc, id=STOP))
    assert h.result(30_000) == "stopped, migrated=True"  # the handle followed the task


def test_a_task_moves_three_times_and_keeps_serving(native: str) -> None:
    h, svc, _ = start_server("twice")
    first = m.task_migrate(h.port)  # (it may not have made its state yet: it makes it)
    m.msg_send(m.Message(remote_port=svc, id=NOTE, items=[m.Int(5)]))
    second = m.task_migrate(first)
    m.msg_send(m.Message(remote_port=svc, id=NOTE, items=[m.Int(6)]))
    third = m.task_migrate(second)
    assert rpc(svc, NOTES) == [(5, 6)]
    assert rpc(svc, WHO)[1] == 1
    m.task_terminate(third)
    assert h.result(30_000) is None  # it ended without returning


def idle() -> None:
    m.msg_receive(m.port_allocate(m.task_self()))


def test_migration_errors_are_clear_and_leave_the_task_running(native: str) -> None:
    plain = m.spawn(idle, name="plain")
    with pytest.raises(m.MachError, match="not migratable") as e:
        m.task_migrate(plain.port)
    assert e.value.code == "KERN_INVALID_ARGUMENT"
    m.task_terminate(plain.port)
    h, svc, _ = start_server("stays")
    with pytest.raises(m.MachError, match="in no cluster") as e:
        m.task_migrate(h.port, "elsewhere.example")
    assert e.value.code == "KERN_INVALID_HOST"
    assert code_of(m.task_migrate, h.port, 7) == "KERN_INVALID_ARGUMENT"
    assert rpc(svc, WHO)[1] == 0  # untouched: the same task serves
    m.task_terminate(h.port)
    assert code_of(m.task_migrate, h.port) == "KERN_INVALID_TASK"  # it has ended


def test_spawn_refuses_what_cannot_migrate(native: str) -> None:
    with pytest.raises(m.MachError, match="importable by module:qualname"):
        m.spawn(lambda: None, migratable=True)
    with pytest.raises(m.MachError, match="typed data"):
        m.spawn(client, object(), migratable=True)
    assert not m.migrated()


def pymach_cli(*args: str) -> Any:
    return subprocess.run([sys.executable, "-m", "pymach", *args], capture_output=True,
                          text=True, timeout=120)


def test_pymach_migrate_moves_a_task_by_name(native: str) -> None:
    h, svc, _ = start_server("cli-mover")
    m.msg_send(m.Message(remote_port=svc, id=NOTE, items=[m.Int(9)]))
    assert rpc(svc, NOTES) == [(9,)]  # noted before the freeze (a change in progress is
    old_id = task_id("cli-mover")  # not carried: module docstring of net/migration.py)
    r = pymach_cli("migrate", "cli-mover", "--socket", native)
    assert r.returncode == 0, r.stderr
    assert f"(id {old_id}) moved: it is task {task_id('cli-mover')} now" in r.stdout
    assert rpc(svc, WHO)[1] == 1 and rpc(svc, NOTES) == [(9,)]
    r = pymach_cli("migrate", "cli-mover", "elsewhere.example", "--socket", native)
    assert r.returncode == 1 and "in no cluster" in r.stderr
    r = pymach_cli("migrate", "no-such-task", "--socket", native)
    assert r.returncode == 1 and "no live task" in r.stderr
    m.task_terminate(h.port)


GUARDED = WINDOW_BASE + (1 << 37)


def guarded(report: int) -> None:
    """A migratable task with a page it can write and a guard page it cannot touch;
    it reports (migrated, the first bytes) on each start."""
    me = m.task_self()
    if not m.vm_regions(me, GUARDED, PAGE):
        m.vm_allocate(me, GUARDED, 2 * PAGE, False)
        m.memory()[GUARDED:GUARDED + 4] = b"keep"
        m.vm_protect(me, GUARDED + PAGE, PAGE, False, m.VM_PROT_NONE)
    m.msg_send(m.Message(remote_port=report, items=[
        m.Int(int(m.migrated())), m.Bytes(bytes(m.memory()[GUARDED:GUARDED + 4]))]))
    m.msg_receive(m.port_allocate(me))


def test_a_region_it_cannot_read_moves_with_its_protection(native: str) -> None:
    me = m.task_self()
    report = m.port_allocate(me)
    h = m.spawn(guarded, m.Port(report, m.MAKE_SEND), name="guarded", migratable=True)
    assert m.msg_receive(report, m.RCV_TIMEOUT, 30_000).values() == [0, b"keep"]
    new = m.task_migrate(h.port)
    assert m.msg_receive(report, m.RCV_TIMEOUT, 30_000).values() == [1, b"keep"]
    guard = m.vm_regions(new, GUARDED + PAGE, PAGE)
    assert [(r.address, r.protection) for r in guard] == [(GUARDED + PAGE, m.VM_PROT_NONE)]
    m.task_terminate(new)


@pytest.mark.slow
def test_demo_migrate_moves_the_counter_and_its_count_goes_on() -> None:
    """`pymach demo migrate` (its own machd): another process answers after the move,
    through the same port, and the count kept in pymach memory goes on."""
    uffd_or_skip()
    r = subprocess.run([sys.executable, "-m", "pymach", "demo", "migrate"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    counts = re.findall(r"count (\d+), answered by pid (\d+)(?: on host (\w))?( \(migrated\))?",
                        r.stdout)
    across = shutil.which("openssl") is not None  # then it also moves to host B
    assert [int(c) for c, _, _, _ in counts] == list(range(1, 10 if across else 7))
    first = {p for _, p, _, m in counts[:3] if not m}
    here = {p for _, p, _, m in counts[3:6] if m}
    assert len(first) == 1 and len(here) == 1 and first != here
    if across:
        there = {(p, h) for _, p, h, m in counts[6:] if m}
        assert len(there) == 1 and next(iter(there))[1] == "B"
        assert next(iter(there))[0] not in first | here
        assert {h for _, _, h, _ in counts[:6]} == {"A"}


COUNTER = WINDOW_BASE + (1 << 38)
STEP = 100_000  # increments between two kernel calls


def counter_spinner(report: int) -> None:
    """A migratable task that computes: STEP increments of a counter in pymach memory
    with no kernel call, then one (thread_self), and so on; it reports the counter on
    each start."""
    me = m.task_self()
    if not m.vm_regions(me, COUNTER, PAGE):
        m.vm_allocate(me, COUNTER, PAGE, False)
    count = np.frombuffer(m.memory().buffer(COUNTER, 8), dtype=np.int64)
    m.msg_send(m.Message(remote_port=report, items=[m.Int(int(m.migrated())),
                                                    m.Int(int(count[0]))]))
    while True:
        for _ in range(STEP):
            count[0] += 1
        m.thread_self()


def busy(report: int) -> None:
    """A migratable task that never makes a kernel call after its report."""
    m.msg_send(m.Message(remote_port=report))
    while True:
        pass


def test_the_freeze_waits_for_every_thread_to_stop_between_two_calls(native: str) -> None:
    """The state captured is the task's at a kernel call: the counter moves as a whole
    number of steps, never half-way through one."""
    me = m.task_self()
    report = m.port_allocate(me)
    h = m.spawn(counter_spinner, m.Port(report, m.MAKE_SEND), name="spinner",
                migratable=True)
    assert m.msg_receive(report, m.RCV_TIMEOUT, 30_000).values() == [0, 0]
    wait_for(lambda: m.vm_resident(h.port, COUNTER, PAGE) != [])  # it is counting
    time.sleep(0.3)
    new = m.task_migrate(h.port)
    moved, count = m.msg_receive(report, m.RCV_TIMEOUT, 30_000).values()
    assert moved == 1 and count > 0 and count % STEP == 0
    m.task_terminate(new)


def test_a_task_that_makes_no_kernel_call_is_not_frozen_half_way(
        native: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from pymach.net import migration

    monkeypatch.setattr(migration, "FREEZE_TIMEOUT_S", 0.5)
    me = m.task_self()
    report = m.port_allocate(me)
    h = m.spawn(busy, m.Port(report, m.MAKE_SEND), name="busy", migratable=True)
    m.msg_receive(report, m.RCV_TIMEOUT, 30_000)
    with pytest.raises(m.MachError, match="without a kernel call") as e:
        m.task_migrate(h.port)
    assert e.value.code == "KERN_FAILURE"
    assert m.task_info(h.port)[:2] == ("busy", 0)  # it runs on, resumed
    m.task_terminate(h.port)



SHARED_AT = WINDOW_BASE + (1 << 39)


def sharer(report: int) -> None:
    """A migratable task with a region it shares with a child task (VM_INHERIT_SHARE):
    first start, it writes "before" there and reports the child's port; after a move,
    "after!"."""
    me = m.task_self()
    if not m.vm_regions(me, SHARED_AT, PAGE):
        m.vm_allocate(me, SHARED_AT, PAGE, False)
        m.vm_inherit(me, SHARED_AT, PAGE, m.VM_INHERIT_SHARE)
        child = m.task_create(me, True)
        m.memory()[SHARED_AT:SHARED_AT + 6] = b"before"
        m.msg_send(m.Message(remote_port=report, items=[m.Int(0), m.Port(child, m.MOVE_SEND)]))
    else:
        m.memory()[SHARED_AT:SHARED_AT + 6] = b"after!"
        m.msg_send(m.Message(remote_port=report, items=[m.Int(1)]))
    m.msg_receive(m.port_allocate(me))


def test_a_region_shared_with_another_task_stays_shared_after_a_move(native: str) -> None:
    me = m.task_self()
    report = m.port_allocate(me)
    h = m.spawn(sharer, m.Port(report, m.MAKE_SEND), name="sharer", migratable=True)
    first = m.msg_receive(report, m.RCV_TIMEOUT, 30_000)
    child = first.items[1].name
    assert m.vm_read(child, SHARED_AT, 6) == b"before"
    assert [r.shared for r in m.vm_regions(h.port, SHARED_AT, PAGE)] == [True]
    new = m.task_migrate(h.port)
    assert m.msg_receive(report, m.RCV_TIMEOUT, 30_000).values() == [1]
    assert m.vm_read(child, SHARED_AT, 6) == b"after!"  # the new task writes where the
    (region,) = m.vm_regions(new, SHARED_AT, PAGE)  # child reads: one region, shared
    assert region.shared and region.inheritance == m.VM_INHERIT_SHARE
    m.task_terminate(new)
    m.task_terminate(child)


def notified(report: int, watched: int) -> None:
    """A migratable task that, once moved, reports the first notification on its notify
    port (it was queued before the move) and its name for the watched port."""
    me = m.task_self()
    if not m.migrated():
        m.msg_send(m.Message(remote_port=report, items=[m.Int(0)]))
        m.msg_receive(m.port_allocate(me))  # it is moved while waiting here
    note = m.msg_receive(m.task_notify(), m.RCV_TIMEOUT, 10_000)
    m.msg_send(m.Message(remote_port=report, items=[
        m.Int(note.id), m.Int(note.items[0].value), m.Int(watched)]))
    m.msg_receive(m.port_allocate(me))


def test_notifications_queued_before_a_move_reach_the_new_task(native: str) -> None:
    me = m.task_self()
    report, watched = m.port_allocate(me), m.port_allocate(me)
    h = m.spawn(notified, m.Port(report, m.MAKE_SEND), m.Port(watched, m.MAKE_SEND),
                name="notified", migratable=True)
    assert m.msg_receive(report, m.RCV_TIMEOUT, 30_000).values() == [0]
    m.port_deallocate(me, watched)  # its send right dies: NOTIFY_PORT_DELETED is queued
    new = m.task_migrate(h.port)
    note_id, name, its_name = m.msg_receive(report, m.RCV_TIMEOUT, 30_000).values()
    assert note_id == m.NOTIFY_PORT_DELETED and name == its_name
    m.task_terminate(new)
