"""The problems of external memory management, and the kernel's defences (paper 6).

Section 6.1 lists what a data manager can do wrong: not return data, not free flushed
data, flood the cache, change data, back its own data. Section 6.2 answers with the
tools of communication failure: a timeout after which the request is aborted (with an
error, or zero-filled memory from the default pager), notification and abortion when
the manager's port dies, and the default pager as a trusted place where data written
back to an errant manager goes after a while. A task that cannot trust its data copies
it to safe memory from a separate thread; multiple threads in a manager let one serve
another's fault, and a manager with no thread left to serve its own fault gets an error
rather than a deadlock.

Every test runs in both scheduler modes and under a real-time watchdog: a kernel that
hangs fails the test (and is shut down) instead of hanging the suite.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import pymach as m
from machutil import (
    assert_kernel_ok,
    blocked_waiter,
    noting,
    recv,
    sleep_ms,
    start_thread,
    wait_until,
    waiter_got_in_during,
)
from pagerutil import (
    PS,
    Pager,
    finished,
    quiet,
    run_in_task,
    spawn_manager,
    values,
    watchdog,
)
from pymach.include.mach_defs import memory_object_defs
from pymach.kern.thread import current_thread
from pymach.vm import memory_object
from pymach.vm.vm_page import manager_key

MODES = pytest.mark.parametrize("det", [False, True], ids=["free", "det"])


def read(a: int, n: int = PS) -> bytes:
    return m.memory()[a:a + n]


def write(a: int, data: bytes) -> None:
    m.memory()[a:a + len(data)] = data


@pytest.fixture
def guarded(kernel: m.Kernel) -> Iterator[m.Kernel]:
    """The default kernel, under a watchdog."""
    with watchdog(kernel, 15, "test"):
        yield kernel


# -- a manager that does not return data -------------------------------------------------------


@MODES
def test_host_timeout_turns_a_silent_manager_into_a_memory_error(det: bool) -> None:
    with m.boot(deterministic=det, seed=6, pager_timeout_ms=100, trace=True) as k, \
            watchdog(k, 15, "silent manager"):
        p = Pager().start()
        p.mode = "ignore"
        a = p.map()
        t0 = k.sched.now()
        with pytest.raises(m.KernError) as e:
            read(a, 4)
        waited = k.sched.now() - t0
        assert e.value.code == "KERN_MEMORY_ERROR"
        assert "100" in str(e.value)
        assert 100 <= waited < 2000
        assert any("pager timeout" in line and "memory error" in line for line in k.trace_log)
        assert_kernel_ok()
        # the failed page is not kept: when the manager answers again, so does the memory
        p.mode = "provide"
        assert read(a, 4) == bytes(p.data[:4])
        assert [e[1] for e in p.entries("pager_data_request")] == [0, 0]


@MODES
def test_host_timeout_can_zero_fill_instead(det: bool) -> None:
    with m.boot(deterministic=det, seed=6, pager_timeout_ms=50,
                pager_timeout_action="zero_fill", trace=True) as k, watchdog(k, 15, "zero fill"):
        p = Pager().start()
        p.mode = "ignore"
        a = p.map()
        t0 = k.sched.now()
        assert read(a, 2 * PS) == bytes(2 * PS)
        assert k.sched.now() - t0 >= 50
        assert any("pager timeout" in line and "zero-filled" in line for line in k.trace_log)
        # a late answer for a page the kernel already zero-filled is ignored
        m.pager_data_provided(p.request, PS, b"L" * PS, PS, m.VM_PROT_NONE)
        assert read(a + PS, 4) == bytes(4)
        # the zero-filled memory is ordinary memory
        write(a + 8, b"on zeros")
        assert read(a, 16) == bytes(8) + b"on zeros"
        assert_kernel_ok()


@MODES
def test_zero_filled_memory_keeps_what_the_task_writes_under_pressure(det: bool) -> None:
    """6.2.1: after the timeout the task gets "(zero-filled) memory backed by the default
    pager": what it writes there must survive paging like any other memory."""
    frames = 64
    with m.boot(deterministic=det, seed=6, memory_size=frames * PS, pager_timeout_ms=50,
                pager_timeout_action="zero_fill") as k, watchdog(k, 15, "zero fill + paging"):
        me = m.task_self()
        p = Pager(size=2 * PS).start()
        p.mode = "ignore"
        a = p.map()
        write(a, b"written on zeros")
        write(a + PS, b"page one too")
        other = m.vm_allocate(me, 0, 3 * frames * PS, True)
        for i in range(3 * frames):  # push everything else out of memory
            write(other + i * PS, b"x")
        assert k.vm_stat()["pageouts"] >= frames
        assert read(a, 16) == b"written on zeros"
        assert read(a + PS, 12) == b"page one too"
        assert p.count("pager_data_write") == 0  # never over the manager's data


def test_boot_rejects_bad_timeout_policies() -> None:
    for bad in ({"pager_timeout_action": "retry"}, {"pager_timeout_ms": -1},
                {"pageout_deadline_ms": -5}, {"manager_page_limit": 0}):
        with pytest.raises(m.MachError) as e, m.boot(**bad):
            pass
        assert e.value.code == "KERN_INVALID_ARGUMENT"


def test_per_mapping_timeout_overrides_the_host(guarded: m.Kernel) -> None:
    me = m.task_self()
    p = Pager(size=8 * PS).start()
    p.mode = "ignore"
    a = p.map(size=4 * PS)
    b = p.map(size=4 * PS, offset=4 * PS)
    m.vm_pager_timeout(me, a, PS, 50, True)  # page 0 of a: zeros after 50 ms
    m.vm_pager_timeout(me, a + PS, PS, 50, False)  # page 1 of a: an error
    assert read(a, 4) == bytes(4)
    with pytest.raises(m.KernError) as e:
        read(a + PS, 4)
    assert e.value.code == "KERN_MEMORY_ERROR"
    # b keeps the host's policy (wait until the request is filled)
    _, box = start_thread(read, b, 4)
    sleep_ms(300)
    assert not box.get("done")
    p.provide(4 * PS)
    assert finished(box)["result"] == bytes(p.data[4 * PS:4 * PS + 4])
    # bad arguments
    for args, code in (((me, a, PS, -1.0, True), "KERN_INVALID_ARGUMENT"),
                       ((me, 0x7000_0000, PS, 10.0, True), "KERN_INVALID_ADDRESS")):
        with pytest.raises(m.MachError) as e:
            m.vm_pager_timeout(*args)
        assert e.value.code == code


# -- a manager that dies ---------------------------------------------------------------------------


class HalfSilent(m.DataManager):
    """Provides page 0; never answers for any other page."""

    threads = 1

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[int] = []

    def pager_data_request(self, memory_object: int, request: int, offset: int,
                           length: int, access: int) -> None:
        self.asked.append(offset)
        if offset == 0:
            m.pager_data_provided(request, 0, b"A" * PS, PS, m.VM_PROT_NONE)


def test_a_dying_manager_fails_the_waiting_thread(guarded: m.Kernel) -> None:
    me = m.task_self()
    dm = HalfSilent()
    handle, (obj,) = spawn_manager(guarded, dm, name="mortal")
    a = m.vm_allocate_with_pager(me, 0, 4 * PS, True, obj, 0)
    assert read(a, 2) == b"AA"
    child = m.task_create(me, False)
    c = m.vm_allocate_with_pager(child, 0, 4 * PS, True, obj, 0)
    _, box = start_thread(read, a + PS, 2)
    other = run_in_task(child, read, c + 2 * PS, 2)
    wait_until(lambda: set(dm.asked) >= {PS, 2 * PS})
    quiet(20)
    assert not box.get("done") and not other.get("done")
    m.task_terminate(handle.port)  # the manager dies with requests outstanding
    assert finished(box)["error"] == "KERN_MEMORY_ERROR"
    assert finished(other)["error"] == "KERN_MEMORY_ERROR"
    # resident data stays usable; data that would need the manager fails at once
    assert read(a, 2) == b"AA"
    write(a, b"ok")
    assert read(a, 2) == b"ok"
    with pytest.raises(m.KernError) as e:
        read(a + 3 * PS, 2)
    assert e.value.code == "KERN_MEMORY_ERROR"
    assert any("pager died" in line for line in guarded.trace_log)
    # the mapping can still be removed, and the kernel works on
    m.vm_deallocate(me, a, 4 * PS)
    m.task_terminate(child)
    assert_kernel_ok()


# -- a manager that does not free flushed data (6.2.2) --------------------------------------------
class _NoWalk(dict[Any, Any]):
    """The kernel's held write-backs, which the pageout daemon must never walk (their
    deadlines are a heap; with 10,000 held a write-back cost 2.6x one with none held)."""

    def _walked(self, *_: Any) -> Any:
        raise AssertionError("the pageout daemon walked the held write-backs")

    __iter__ = keys = values = items = _walked  # type: ignore[assignment]




@MODES
def test_a_busy_manager_is_not_an_errant_one(det: bool) -> None:
    """A manager that lets go of written-back data steadily, but more slowly than it is
    sent (ten pageouts queued at once, each released 60 ms after the last, against a
    200 ms deadline), is busy, not errant: what it has not reached by the deadline
    stays its own, and nothing goes to the default pager."""
    with m.boot(deterministic=det, seed=7, pageout_deadline_ms=200, trace=True) as k, \
            watchdog(k, 20, "a busy manager"):
        k.vm.holdings = _NoWalk()
        me = m.task_self()
        p = Pager(size=20 * PS).start()
        a = p.map()
        for i in range(0, 20, 2):  # ten dirty pages, none adjacent: ten messages
            write(a + i * PS, b"page %03d" % i)
        p.stop()
        p.hold_writes = True
        assert m.pager_flush_request(p.request, 0, 20 * PS) == 10
        for _ in range(10):
            p.expect("pager_data_write")
            sleep_ms(60)
            m.vm_deallocate(me, p.held[-1].address, p.held[-1].size)
        wait_until(lambda: k.vm_stat()["pageouts_in_flight"] == 0)
        assert not any("pageout deadline" in line for line in k.trace_log)
        assert sorted((off, raw[:8]) for off, raw in p.writes) == [
            (i * PS, b"page %03d" % i) for i in range(0, 20, 2)]


@MODES
def test_data_a_manager_keeps_goes_to_the_default_pager(det: bool) -> None:
    frames, n = 64, 100
    with m.boot(deterministic=det, seed=6, memory_size=frames * PS, pageout_deadline_ms=200,
                manager_page_limit=4 * frames,  # only memory pressure pages out here
                trace=True) as k, watchdog(k, 10, "a manager that never frees written data"):
        me = m.task_self()
        p = Pager(size=n * PS).start()
        p.hold_writes = True  # never vm_deallocates what pager_data_write brings
        a = p.map()
        for i in range(n):  # more pages than memory: dirty pages go to the manager
            write(a + i * PS, b"page %03d" % i)

        def settled() -> bool:  # the manager has taken every write; the deadlines passed
            s = k.vm_stat()
            return (m.port_status(me, p.mo)[1] == 0 and s["pages_wired"] == 0
                    and s["pageouts_in_flight"] == len(p.held))

        # after the deadline the kept data lives with the default pager, not in frames,
        # though the manager has still not released it
        try:
            wait_until(settled, 5000)
        except AssertionError:
            s = k.vm_stat()
            raise AssertionError(f"not settled: {m.port_status(me, p.mo)[1]} messages queued, "
                                 f"{s['pages_wired']} pages wired, {s['pageouts_in_flight']} "
                                 f"pageouts in flight, {len(p.held)} held") from None
        # (pageout sends adjacent dirty pages a run per message: count the pages)
        assert len(p.held) == p.count("pager_data_write")
        assert sum(region.size for region in p.held) // PS > n - frames
        assert any("pageout deadline" in line for line in k.trace_log)
        # the manager can still read everything it was sent
        for (off, _), region in zip(p.writes, p.held, strict=True):
            assert [read(region.address + i, 8) for i in range(0, region.size, PS)] == [
                b"page %03d" % ((off + i) // PS) for i in range(0, region.size, PS)]
        # and the client sees every byte it wrote
        assert [i for i in range(n) if read(a + i * PS, 8) != b"page %03d" % i] == []
        # once the manager lets go, nothing is in flight any more
        p.hold_writes = False  # from now on it releases what it gets at once ...
        released = 0

        def release() -> bool:  # ... and lets go of all it kept (reading paged some out)
            nonlocal released
            while released < len(p.held):
                m.vm_deallocate(me, p.held[released].address, p.held[released].size)
                released += 1
            return k.vm_stat()["pageouts_in_flight"] == 0

        try:
            wait_until(release)
        except AssertionError:
            raise AssertionError(f"{k.vm_stat()['pageouts_in_flight']} pageouts still in "
                                 f"flight after the manager released everything") from None
        s = k.vm_stat()
        assert s["pages_free"] + s["pages_active"] + s["pages_inactive"] + s["pages_wired"] \
            == frames


@MODES
def test_the_pageout_deadline_holds_without_memory_pressure(det: bool) -> None:
    """Pages written back because the manager went over its page limit (not because
    memory ran short) are subject to the same deadline: after it, the data the manager
    keeps lives with the default pager and no frame stays pinned."""
    with m.boot(deterministic=det, seed=6, manager_page_limit=8, pageout_deadline_ms=100,
                trace=True) as k, watchdog(k, 10, "deadline without pressure"):
        k.vm.holdings = _NoWalk()
        p = Pager(size=30 * PS).start()
        p.hold_writes = True
        a = p.map()
        for i in range(30):
            write(a + i * PS, b"page %03d" % i)
        wait_until(lambda: sum(len(raw) for _, raw in p.writes) >= 20 * PS)  # in runs
        sleep_ms(1000)  # ten deadlines
        s = k.vm_stat()
        assert any("pageout deadline" in line for line in k.trace_log)
        assert s["pages_wired"] == 0, f"{s['pages_wired']} frames still pinned by the manager"
        assert [i for i in range(30) if read(a + i * PS, 8) != b"page %03d" % i] == []


# -- a manager that floods the cache ----------------------------------------------------------


@MODES
def test_a_flooding_manager_is_held_to_its_page_limit(det: bool) -> None:
    limit = 16
    with m.boot(deterministic=det, seed=6, manager_page_limit=limit) as k, \
            watchdog(k, 10, "a manager that floods the cache"):
        p = Pager(size=300 * PS).start()
        p.extra_pages = 200  # every answer brings 200 pages nobody asked for
        a = p.map()
        assert read(a, 8) == bytes(p.data[:8])
        assert sum(r.resident for r in k.vmmap("bootstrap")) <= limit
        for i in range(0, 300, 37):
            assert read(a + i * PS, 8) == bytes(p.data[i * PS:i * PS + 8])
            assert sum(r.resident for r in k.vmmap("bootstrap")) <= limit
        assert p.count("pager_data_request") <= 2 * len(range(0, 300, 37)) + 1
        assert_kernel_ok()


@MODES
def test_a_manager_streaming_past_its_limit_is_trimmed_in_batches(
        det: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading 10x a manager's page limit: every byte right, never over the limit, and
    the walk for its oldest pages runs once per MANAGER_SLACK of the limit, not at every
    provide (it walks every resident page: once per provide, a manager streaming more
    than its limit took minutes a GiB)."""
    limit, n = 64, 640
    walks: list[int] = []
    real = memory_object._manager_lru
    monkeypatch.setattr(memory_object, "_manager_lru",
                        lambda *args: walks.append(1) or real(*args))
    with m.boot(deterministic=det, seed=6, manager_page_limit=limit) as k, \
            watchdog(k, 20, "a manager streaming past its limit"):
        p = Pager(size=n * PS).start()
        a = p.map()
        for i in range(n):
            assert read(a + i * PS, 8) == bytes(p.data[i * PS:i * PS + 8])
            assert sum(r.resident for r in k.vmmap("bootstrap")) <= limit
        slack = max(1, int(limit * memory_object.MANAGER_SLACK))
        assert 0 < len(walks) <= (n - limit) // slack + 2
        assert_kernel_ok()


def test_trimming_a_manager_lets_a_waiting_thread_in_between_batches(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A manager brought back under its page limit loses its pages EVICT_BATCH at a
    time; a thread waiting for the kernel lock gets it between batches of one trimming
    (before, the whole slack went in one hold), and every byte stays right."""
    limit, n = 64, 256
    monkeypatch.setattr(memory_object, "EVICT_BATCH", 1)  # (a break after each page)
    events: list[str] = []
    waiters: list[threading.Thread] = []
    evict, trim = memory_object.evict_in_runs, memory_object._enforce_manager_limit

    def evicting(vm: Any, pages: list[Any]) -> int:
        events.append("batch")  # (the kernel lock is held here)
        if not waiters and events.count("batch") == 1:
            waiters.append(blocked_waiter(vm.kernel.sched.lock, events))
        return evict(vm, pages)

    monkeypatch.setattr(memory_object, "evict_in_runs", evicting)
    monkeypatch.setattr(memory_object, "_enforce_manager_limit", noting(events, "trim", trim))
    with m.boot(manager_page_limit=limit) as k, watchdog(k, 20, "trimming in batches"):
        p = Pager(size=n * PS).start()
        a = p.map()
        for i in range(n):
            assert read(a + i * PS, 8) == bytes(p.data[i * PS:i * PS + 8])
        assert waiter_got_in_during(events, "trim").count("batch") >= 1  # (a break
        # waits BREAK_PATIENCE_S for the waiter: under load it may get a later one)
        assert sum(r.resident for r in k.vmmap("bootstrap")) <= limit


@MODES
def test_pages_evicted_past_a_managers_limit_go_back_in_runs(det: bool) -> None:
    """Dirty pages trimmed because their manager went over its page limit go back to it
    a run of adjacent pages per pager_data_write, not a message per page, and every
    byte comes back."""
    limit, n = 64, 256
    with m.boot(deterministic=det, seed=6, manager_page_limit=limit) as k, \
            watchdog(k, 20, "dirty pages past a manager's limit"):
        p = Pager(size=n * PS).start()
        a = p.map()
        for i in range(n):
            write(a + i * PS, b"page %03d" % i)
            assert sum(r.resident for r in k.vmmap("bootstrap") if r.start == a) <= limit
        wait_until(lambda: sum(len(raw) for _, raw in p.writes) >= (n - limit) * PS)
        assert p.count("pager_data_write") <= (n - limit) // 3
        assert [i for i in range(n) if read(a + i * PS, 8) != b"page %03d" % i] == []


def test_a_generous_manager_within_the_limit_saves_requests(guarded: m.Kernel) -> None:
    p = Pager(size=16 * PS).start()
    p.extra_pages = 7
    a = p.map()
    assert read(a, 8 * PS) == bytes(p.data[:8 * PS])
    assert p.count("pager_data_request") == 1


@MODES
def test_the_page_limit_counts_every_object_of_a_manager(det: bool) -> None:
    limit = 16
    with m.boot(deterministic=det, seed=6, manager_page_limit=limit) as k, \
            watchdog(k, 10, "a manager over its limit"):
        _limit_test(k, limit)


def _limit_test(k: m.Kernel, limit: int) -> None:
    p, q = Pager(size=2 * limit * PS).start(), Pager(size=2 * limit * PS).start()
    a, b = p.map(), q.map()
    for i in range(2 * limit):  # dirty pages: evicting them writes them back
        write(a + i * PS, bytes([i % 256]) * 8)
    for i in range(2 * limit):
        assert read(b + i * PS, 8) == bytes(q.data[i * PS:i * PS + 8])
    assert sum(r.resident for r in k.vmmap("bootstrap")) <= limit
    assert p.count("pager_data_write") >= limit
    assert [i for i in range(2 * limit) if read(a + i * PS, 8) != bytes([i % 256]) * 8] == []
    assert sum(r.resident for r in k.vmmap("bootstrap")) <= limit


class _Watched(dict):  # type: ignore[type-arg]
    """A dict that counts the walks over it made by the VM's receiver hook."""

    walks = 0

    def values(self) -> Any:
        _Watched.walks += sys._getframe(1).f_code.co_name == "pager_receiver_changed"
        return super().values()

    def items(self) -> Any:
        _Watched.walks += sys._getframe(1).f_code.co_name == "pager_receiver_changed"
        return super().items()


def _counts_match(k: m.Kernel) -> bool:
    """The kernel's resident pages by data manager equal a count of every external
    object's pages by the manager it has now (no object refreshed first)."""
    with k.sched.lock:
        want: dict[object, int] = {}
        for obj in dict.values(k.vm.pager_objects):
            key = manager_key(obj)
            if key is not None and obj.memq:
                want[key] = want.get(key, 0) + len(obj.memq)
        return dict(k.vm.resident.manager_pages) == want


@MODES
def test_the_page_limit_is_kept_without_walking_the_managers_objects(
        det: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A manager's resident pages are counted as they come and go, so a provide under
    its limit looks at none of its other objects (it walked all of them, and every
    object of the kernel: a file server with 1,000 objects paid 3x per fault), and the
    count always equals a count of the objects' pages, through faults, write-backs, a
    region's end, evictions past the limit, and the memory object's receive right
    moving to another task."""
    limit = 24
    walks: list[int] = []
    real = memory_object._manager_objects
    monkeypatch.setattr(memory_object, "_manager_objects",
                        lambda obj: walks.append(1) or real(obj))
    with m.boot(deterministic=det, seed=6, manager_page_limit=limit) as k, \
            watchdog(k, 20, "a manager's page count"):
        pagers = [Pager(size=8 * PS).start() for _ in range(3)]
        regions = [p.map() for p in pagers]
        for a in regions:
            for i in range(0, 8, 2):
                write(a + i * PS, b"x")
        assert walks == [] and _counts_match(k)
        m.vm_deallocate(m.task_self(), regions[0], 8 * PS)
        wait_until(lambda: pagers[0].count("pager_data_write") > 0)
        assert walks == [] and _counts_match(k)
        big = Pager(size=4 * limit * PS).start()
        b = big.map()
        for i in range(4 * limit):  # past the limit: now the walk finds the oldest pages
            assert read(b + i * PS, 8) == bytes(big.data[i * PS:i * PS + 8])
        assert walks and _counts_match(k)
        me = current_thread().task
        assert k.vm.resident.manager_pages[me] <= limit
        for p, a in zip(pagers[1:], regions[1:], strict=True):  # (resident again)
            assert read(a, 8) == bytes(p.data[:8])
        other = m.task_create(m.task_self(), False)  # two objects' ports move there
        notify = m.task_get_special_port(other, m.TASK_NOTIFY_PORT)
        k.vm.pager_objects = _Watched(k.vm.pager_objects)  # (the moves look only at
        for p in pagers[1:]:  # the port's own objects: no walk over all of them)
            m.msg_send(m.Message(remote_port=notify, items=[m.Port(p.mo, m.MOVE_RECEIVE)]))
            assert _Watched.walks == 0 and _counts_match(k)  # (the right in transit:
            _Watched.walks = 0  # counted for the port)
            finished(run_in_task(other, m.msg_receive, m.task_notify()))
            assert _Watched.walks == 0 and _counts_match(k)  # counted for the new
            _Watched.walks = 0  # manager at once, though no page of the object changed
        with k.sched.lock:
            theirs = [o for o in k.vm.pager_objects.values() if o.pager is not None
                      and o.pager.receiver not in (None, me)]
            assert len(theirs) == 2 and all(o.memq for o in theirs)
            assert k.vm.resident.manager_pages[theirs[0].pager.receiver] == \
                sum(len(o.memq) for o in theirs)


def test_a_dead_managers_cached_object_is_let_go(guarded: m.Kernel) -> None:
    """After pager_cache the kernel may keep an unmapped object; once its manager is
    gone nobody can map it again, and its dirty pages can go nowhere: the kernel must
    not keep them (3.4: memory of unreferenced objects is released for other data)."""
    k = guarded
    me = m.task_self()

    class Cacher(m.DataManager):
        threads = 1

        def pager_init(self, memory_object: int, request: int, name: int) -> None:
            super().pager_init(memory_object, request, name)
            m.pager_cache(request, True)

    handle, (obj,) = spawn_manager(k, Cacher(), name="cacher")
    a = m.vm_allocate_with_pager(me, 0, 20 * PS, True, obj, 0)
    for i in range(20):
        write(a + i * PS, b"dirty")
    m.vm_deallocate(me, a, 20 * PS)
    wait_until(lambda: k.vm_stat()["cached_objects"] == 1)
    objects = k.vm_stat()["objects"]
    m.task_terminate(handle.port)
    wait_until(lambda: k.vm_stat()["cached_objects"] == 0, 2000)
    assert k.vm_stat()["objects"] == objects - 1
    s = k.vm_stat()
    assert s["pages_active"] + s["pages_inactive"] < 20


# -- a manager that changes data ------------------------------------------------------------------


def _changing(p: Pager) -> list[int]:
    version = [0]

    def answer(request: int, offset: int, length: int, access: int) -> None:
        version[0] += 1
        m.pager_data_provided(request, offset, bytes([version[0]]) * length, length,
                              m.VM_PROT_NONE)

    p.mode = answer
    return version


def test_copy_to_safe_memory_keeps_data_a_manager_changes(guarded: m.Kernel) -> None:
    me = m.task_self()
    p = Pager().start()
    _changing(p)
    a = p.map()
    assert read(a, 2) == b"\x01\x01"
    safe = m.copy_to_safe_memory(a, 2 * PS)
    assert read(safe, PS) == b"\x01" * PS and read(safe + PS, PS) == b"\x02" * PS
    # the manager refreshes the data: the mapping changes under the task ...
    m.pager_flush_request(p.request, 0, 4 * PS)
    assert read(a, 2) == b"\x03\x03" and read(a + PS, 2) == b"\x04\x04"
    # ... the safe copy does not
    assert read(safe, PS) == b"\x01" * PS and read(safe + PS, PS) == b"\x02" * PS
    (row,) = [r for r in guarded.vmmap("bootstrap") if r.start == safe]
    assert "anonymous" in row.object and "manager" not in row.object
    m.vm_deallocate(me, safe, 2 * PS)


def test_a_virtual_copy_in_a_message_keeps_the_pages_it_has_seen(guarded: m.Kernel) -> None:
    """The 6.1 hazard: data received in a message from a region a manager backs is a
    virtual copy; pages the kernel had cached when the manager refreshes its data keep
    their contents in the copy, pages never read show what the manager supplies later.
    Only copy_to_safe_memory (above) protects all of it."""
    me = m.task_self()
    p = Pager().start()
    _changing(p)
    a = p.map()
    assert read(a, 2) == b"\x01\x01"  # page 0 is cached (version 1), page 1 is not
    inbox = m.port_allocate(me)
    m.msg_send(m.Message(remote_port=inbox, items=[m.OOL(a, 2 * PS)]), m.SEND_TIMEOUT, 1000)
    item = recv(inbox).items[0]
    assert isinstance(item, m.OOL)
    copy = item.address
    m.pager_flush_request(p.request, 0, 4 * PS)
    assert read(a, 2) == b"\x02\x02"  # the mapping shows the manager's new data
    assert read(copy, 2) == b"\x01\x01"  # the copy keeps what was cached when it was made
    assert read(copy + PS, 2) == b"\x03\x03"  # never cached: whatever the manager says now
    assert read(a + PS, 2) == b"\x03\x03"


@MODES
def test_copy_to_safe_memory_times_out_on_a_hung_manager(det: bool) -> None:
    with m.boot(deterministic=det, seed=6) as k, watchdog(k, 15, "hung manager"):
        me = m.task_self()
        p = Pager().start()
        p.mode = "ignore"
        a = p.map()
        threads = m.task_info(me)[2]
        t0 = k.sched.now()
        with pytest.raises(m.KernError) as e:
            m.copy_to_safe_memory(a, PS, timeout_ms=100)
        assert e.value.code == "KERN_MEMORY_ERROR"
        assert 100 <= k.sched.now() - t0 < 2000
        wait_until(lambda: m.task_info(me)[2] == threads)  # the copier is gone
        regions = len(m.vm_regions(me))
        assert_kernel_ok()
        assert len(m.vm_regions(me)) == regions
        # the manager wakes up: the data arrives and the mapping works
        p.provide(0)
        p.mode = "provide"
        assert read(a, 4) == bytes(p.data[:4])


# -- a manager that backs its own data ----------------------------------------------------------


@MODES
def test_a_single_threaded_manager_faulting_on_its_own_object_fails_at_once(det: bool) -> None:
    with m.boot(deterministic=det, seed=6, trace=True) as k, watchdog(k, 15, "self-backed"):
        me = m.task_self()
        p = Pager()  # no serving thread: this thread is the only one of the manager
        a = p.map()
        p.init()
        t0 = k.sched.now()
        with pytest.raises(m.KernError) as e:
            read(a, 4)
        assert e.value.code == "KERN_MEMORY_ERROR"
        assert "deadlock" in str(e.value)
        assert k.sched.now() - t0 < 1000  # no timeout was configured: detected, not waited
        assert_kernel_ok()
        # a request did go out before the check? either way the manager can answer later
        while m.port_status(me, p.mo)[1]:
            p.next_message()
        p.start()
        assert read(a, 4) == bytes(p.data[:4])


def test_all_threads_waiting_on_their_own_manager_fail(guarded: m.Kernel) -> None:
    p = Pager()
    a = p.map()
    p.init()
    _, box = start_thread(read, a, 4)  # served by nobody but this (free) main thread
    wait_until(lambda: m.port_status(m.task_self(), p.mo)[1] >= 1)
    quiet(10)
    assert not box.get("done")
    with pytest.raises(m.KernError) as e:  # now no thread of the manager is free
        read(a + PS, 4)
    assert e.value.code == "KERN_MEMORY_ERROR"
    assert finished(box)["error"] == "KERN_MEMORY_ERROR"
    assert_kernel_ok()


def test_a_multithreaded_manager_serves_its_own_faults(guarded: m.Kernel) -> None:
    p = Pager().start()  # another thread of this task serves the object
    a = p.map()
    assert read(a, 4 * PS) == bytes(p.data)
    write(a, b"mine")
    assert read(a, 4) == b"mine"


def _introspective_manager(errors: list[str]) -> None:
    """A one-thread manager (a plain receive loop) whose request handler reads page 1 of
    its own object, mapped into its own address space."""
    me = m.task_self()
    (inbox,) = values(m.msg_receive(m.task_notify(), m.RCV_TIMEOUT, 10_000))
    mo = m.port_allocate(me)
    m.msg_send(m.Message(remote_port=inbox, items=[m.Port(mo, m.MAKE_SEND)]))
    mine = 0
    while True:
        msg = m.msg_receive(mo)
        if msg.id == memory_object_defs.by_name["pager_init"].id and not mine:
            mine = m.vm_allocate_with_pager(me, 0, PS, True, mo, PS)
        elif msg.id == memory_object_defs.by_name["pager_data_request"].id:
            request, offset, length, _ = values(msg)
            try:
                data = read(mine, 4) * (length // 4)  # a fault on data it provides itself
            except m.MachError as e:
                errors.append(e.code)
                m.pager_data_error(request, offset, length, e.value)
            else:
                m.pager_data_provided(request, offset, data, length, m.VM_PROT_NONE)


@MODES
def test_a_manager_reading_its_own_object_in_a_handler_gets_an_error(det: bool) -> None:
    with m.boot(deterministic=det, seed=6) as k, watchdog(k, 15, "self-backed handler"):
        me = m.task_self()
        errors: list[str] = []
        inbox = m.port_allocate(me)
        handle = k.spawn(_introspective_manager, errors, name="narcissus")
        notify = m.task_get_special_port(handle.port, m.TASK_NOTIFY_PORT)
        m.msg_send(m.Message(remote_port=notify, items=[m.Port(inbox, m.MAKE_SEND)]))
        obj = recv(inbox, 5000).items[0].value
        a = m.vm_allocate_with_pager(me, 0, PS, True, obj, 0)  # type: ignore[arg-type]
        with pytest.raises(m.KernError) as e:
            read(a, 4)
        assert e.value.code == "KERN_MEMORY_ERROR"
        assert errors == ["KERN_MEMORY_ERROR"]
        m.task_terminate(handle.port)
        assert_kernel_ok()
