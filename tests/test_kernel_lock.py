"""The kernel lock and its lock break (kern/lock.py), and the pageout daemon's use of it.

A long holder (the pageout daemon's scan) lets waiting threads in between its batches,
so one task's paging does not stall every other task's kernel calls behind it; the
data stay what they were (the pressure tests in test_vm_pressure.py check every byte).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import pymach as m
from machutil import blocked_waiter, noting, waiter_got_in_during
from pymach.kern import lock as kern_lock
from pymach.kern.lock import KernelLock
from pymach.vm import vm_pageout

PS = 4096


def test_a_break_with_nobody_waiting_keeps_the_lock() -> None:
    lock = KernelLock()
    with lock:
        t0 = time.monotonic()
        assert lock.lock_break() is False
        assert time.monotonic() - t0 < kern_lock.BREAK_PATIENCE_S  # (no wait)
        assert lock.locked()
    assert not lock.locked() and lock.waiting == 0


def test_a_break_lets_a_waiter_in_and_takes_the_lock_back() -> None:
    lock, got = KernelLock(), []
    with lock:
        t = blocked_waiter(lock, got)
        assert lock.lock_break() is True
        got.append("holder")  # (after the break: the waiter ran first)
        assert lock.locked()
    t.join(5)
    assert got == ["waiter", "holder"] and lock.waiting == 0 and lock.taken == 1


def test_a_waiter_that_gives_up_is_no_longer_counted() -> None:
    lock, got = KernelLock(), []
    with lock:
        t = blocked_waiter(lock, got, timeout=0.05)
        t.join(5)
        assert lock.waiting == 0 and lock.taken == 0 and got == []
        assert lock.lock_break() is False


def test_it_serves_as_the_lock_of_a_condition() -> None:
    lock = KernelLock()
    cond = threading.Condition(lock)  # type: ignore[arg-type]
    ready: list[int] = []

    def notifier() -> None:
        with cond:
            ready.append(1)
            cond.notify()
    with cond:
        threading.Thread(target=notifier, daemon=True).start()
        assert cond.wait_for(lambda: ready, 5)
    assert not lock.locked()


@pytest.fixture
def k() -> Iterator[m.Kernel]:
    with m.boot(memory_size=1 << 20, pager_cluster_pages=1) as kernel:
        yield kernel


def test_the_pageout_scan_lets_a_waiting_thread_in_between_batches(
        k: m.Kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vm_pageout, "PAGEOUT_BATCH", 2)
    events: list[str] = []
    waiters: list[threading.Thread] = []
    reclaim, scan = vm_pageout._reclaim, vm_pageout.vm_pageout_scan

    def reclaiming(vm: Any, victims: list[Any]) -> bool:
        events.append("batch")  # (the kernel lock is held here)
        if not waiters and len(victims) == 2 and \
                vm.free_target - vm.resident.free_count() > 8:  # batches to come
            waiters.append(blocked_waiter(k.sched.lock, events))
        return reclaim(vm, victims)

    monkeypatch.setattr(vm_pageout, "_reclaim", reclaiming)
    monkeypatch.setattr(vm_pageout, "vm_pageout_scan", noting(events, "scan", scan))
    n = 3 * k.memory_size // PS  # three times memory: the daemon pages out
    a = m.vm_allocate(m.task_self(), 0, n * PS, True)
    mem = m.memory()
    for i in range(n):
        mem[a + i * PS] = i % 251
    assert waiter_got_in_during(events, "scan").count("batch") >= 1
    assert all(mem[a + i * PS] == i % 251 for i in range(n))  # every page intact
    m.vm_deallocate(m.task_self(), a, n * PS)


def test_the_deterministic_scheduler_never_breaks() -> None:
    with m.boot(deterministic=True, seed=1) as kernel, kernel.sched.lock:
        assert kernel.sched.lock_break() is False


def test_deferred_work_runs_on_the_holders_thread_once_it_lets_go() -> None:
    lock, ran = KernelLock(), []
    with lock:
        lock.defer(lambda: ran.append(("first", lock.locked())))
        lock.defer(lambda: 1 / 0)  # (a failure is logged; the rest still runs)
        lock.defer(lambda: ran.append(("second", lock.locked())))
        assert ran == []
    assert ran == [("first", False), ("second", False)]
    with lock:  # nothing left over for the next hold
        pass
    assert len(ran) == 2


def test_deferred_work_runs_when_a_wait_lets_go_of_the_lock() -> None:
    lock, ran = KernelLock(), []
    cond = threading.Condition(lock)  # type: ignore[arg-type]
    with cond:
        lock.defer(lambda: ran.append(lock.locked()))
        cond.wait(0.01)  # (the wait lets go of the lock: the work runs, unlocked)
        assert ran == [False]


def test_pageout_gives_up_only_while_memory_is_still_short() -> None:
    """A scan that made no progress, after others without, declares memory exhausted
    only if it still is: a lock break may have let a task free memory meanwhile (the
    waiting faults would otherwise fail with KERN_RESOURCE_SHORTAGE with frames free)."""
    from pymach.kern.thread import current_thread

    with m.boot(memory_size=1 << 20) as k, k.sched.lock:
        vm = k.vm
        assert not vm.pageout_needed()
        vm_pageout._after_scan(vm, current_thread(), False, vm_pageout.GIVE_UP_AFTER)
        assert vm.shortage == ""
