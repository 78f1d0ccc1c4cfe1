"""Extents (vm_page.py, "Extents"): the pages a data manager provides beyond those a
fault waits for are held as runs of frames with no page structures until something
looks at one of them. Each test checks both what the kernel keeps (the extents, the
page counts) and that the paper's semantics are those of plain pages: the data read,
writes going back to the manager, locks, flushes, pageout and freeing.

The tests run embedded, with the kernel's structures in view (the kernel lock held
while looking); the native stream through machd is in test_pager_window.py.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

import pymach as m
from machutil import wait_until
from pagerutil import PS, Recording, spawn_manager
from pymach.kern.host import Kernel
from pymach.vm.memory_object import PagerServer, _outside_extents
from pymach.vm.vm_object import VmObject


@contextmanager
def mapped(k: Kernel, pages: int) -> Iterator[tuple[Recording, int]]:
    """A Recording manager's object of `pages` pages mapped in this task: (manager,
    address). The region is deallocated after the block and the manager's end
    awaited."""
    dm = Recording()
    h, (mo,) = spawn_manager(k, dm, name="recording")
    a: int = m.vm_allocate_with_pager(m.task_self(), 0, pages * PS, True, mo, 0)
    try:
        yield dm, a
    finally:
        m.vm_deallocate(m.task_self(), a, pages * PS)  # (nothing, if the block did)
        h.result(5000)


def external(k: Kernel) -> VmObject:
    """The one live external object (kernel lock held)."""
    objs = [o for o in k.vm.pager_objects.values() if not o.internal and o.alive]
    assert len(objs) == 1
    return objs[0]


def extents_of(k: Kernel) -> dict[int, int]:
    """first page -> pages of each extent of the external object."""
    with k.sched.lock:
        obj = external(k)
        return {s // PS: len(frames) for s, frames in obj.extents.items()}


def counts_add_up(k: Kernel) -> None:
    """vm_statistics: free + active + inactive + wired is every frame."""
    st = m.vm_statistics(m.task_self())
    assert st.free_count + st.active_count + st.inactive_count + st.wire_count == \
        k.memory_size // PS


@pytest.fixture
def k() -> Iterator[Kernel]:
    with m.boot(pager_cluster_pages=16, memory_size=4 << 20) as kernel:
        yield kernel


def test_read_ahead_pages_are_an_extent_read_without_page_structures(k: Kernel) -> None:
    before = m.vm_statistics(m.task_self())
    with mapped(k, 64) as (dm, a):
        mem = m.memory()
        assert mem[a] == 0
        assert extents_of(k) == {1: 15}  # page 0 waited: a page; 1-15 came along
        with k.sched.lock:
            assert len(external(k)._memq) == 1 and k.vm.resident.extent_pages == 15
        counts_add_up(k)
        now = m.vm_statistics(m.task_self())  # (an extent's pages count as active)
        assert now.wire_count == before.wire_count
        assert now.active_count - before.active_count >= 16
        assert [mem[a + i * PS] for i in range(16)] == list(range(16))
        assert dm.asked == [(0, 16 * PS)]  # fault-around mapped the extent: no other request
        assert extents_of(k) == {1: 15}  # ... and made no page of it
        assert m.vm_resident(m.task_self(), a, 64 * PS) == [(a, 16)]  # (reports
        assert extents_of(k) == {1: 15}  # count an extent's pages without making them)


def test_a_write_makes_its_extent_pages_and_goes_back_to_the_manager(k: Kernel) -> None:
    with mapped(k, 32) as (dm, a):
        mem = m.memory()
        assert mem[a] == 0
        mem[a + 5 * PS] = 0xAB  # a page of the extent: its extent becomes pages
        assert extents_of(k) == {}
        with k.sched.lock:
            obj = external(k)
            assert len(obj._memq) == 16
            assert k.vm.resident.vm_page_is_dirty(obj._memq[5 * PS])
            assert k.vm.resident.extent_pages == 0
        counts_add_up(k)
        assert mem[a + 5 * PS] == 0xAB and mem[a + 6 * PS] == 6
        m.vm_deallocate(m.task_self(), a, 32 * PS)
        wait_until(lambda: dm.written)
    assert [off // PS for off, _ in dm.written] == [5]  # the clean pages were not written
    assert dm.written[0][1][:2] == b"\xab\x05"


def test_deallocating_frees_the_extents_and_their_count(k: Kernel) -> None:
    free = m.vm_statistics(m.task_self()).free_count
    with mapped(k, 64) as (_, a):
        mem = m.memory()
        assert [mem[a + i * PS] for i in range(0, 64, 16)] == [0, 16, 32, 48]
        assert extents_of(k) == {1: 15, 17: 15, 33: 15, 49: 15}
        m.vm_deallocate(m.task_self(), a, 64 * PS)
        with k.sched.lock:
            res = k.vm.resident
            assert res.extent_pages == 0 and not res.extent_objects
            assert not res.manager_pages  # (counted against the manager as they came)
    wait_until(lambda: m.vm_statistics(m.task_self()).free_count >= free)
    counts_add_up(k)


def test_a_lock_and_a_flush_see_the_extents_pages(k: Kernel) -> None:
    """pager_data_lock and pager_flush_request walk the object's pages: its extents
    become pages first, so the lock holds for their pages and the flush drops them (the
    calls are made as the kernel's pager server runs them, kernel lock held)."""
    server = PagerServer(k)
    with mapped(k, 32) as (dm, a):
        mem = m.memory()
        assert mem[a] == 0 and extents_of(k) == {1: 15}
        with k.sched.lock:
            server.pager_data_lock(external(k), 0, 8 * PS, m.VM_PROT_WRITE)
            obj = external(k)
            assert not obj.extents
            assert [obj._memq[i * PS].page_lock for i in (0, 3, 7, 8)] == \
                [m.VM_PROT_WRITE] * 3 + [m.VM_PROT_NONE]
        counts_add_up(k)
        assert mem[a + 17 * PS] == 17 and extents_of(k) == {18: 14}
        with k.sched.lock:
            server.pager_flush_request(external(k), 16 * PS, 16 * PS)
            assert not external(k).extents and 20 * PS not in external(k)._memq
        counts_add_up(k)
        assert mem[a + 20 * PS] == 20  # asked for again
        assert dm.asked[-1][0] == 20 * PS


def test_pageout_short_of_frames_takes_extents_pages_too() -> None:
    """Reading an object twice the size of memory, in order: the extents of the pages
    read first become pages that pageout evicts (clean: nothing to write), and every
    page reads right."""
    with m.boot(pager_cluster_pages=16, memory_size=1 << 20) as k, \
            mapped(k, 512) as (dm, a):
        mem = m.memory()
        assert [mem[a + i * PS] for i in range(512)] == [i % 256 for i in range(512)]
        counts_add_up(k)
        assert sum(n for _, n in dm.asked) >= 512 * PS
        assert not dm.written
        with k.sched.lock:
            res = k.vm.resident
            assert res.stats.pageins >= 512 and res.extent_pages <= k.memory_size // PS


def test_the_extents_met_by_a_range_are_found_among_many(k: Kernel) -> None:
    """A provide looks only at the extents its range meets (found by bisection: a
    streamed object has thousands), and the offsets between them are its new pages."""
    with mapped(k, 400) as (_, a):
        mem = m.memory()
        for page in range(0, 400, 16):  # a fault a cluster: 25 extents of 15 pages
            assert mem[a + page * PS] == page % 256
        with k.sched.lock:
            obj, res = external(k), k.vm.resident
            assert len(obj.extents) == 25
            assert res.extents_in(obj, 20 * PS, 50 * PS) == [
                (17 * PS, 32 * PS), (33 * PS, 48 * PS), (49 * PS, 64 * PS)]
            assert res.extents_in(obj, 16 * PS, 17 * PS) == []  # (a page, not an extent)
            assert res.extents_in(obj, 399 * PS, 500 * PS) == [(385 * PS, 400 * PS)]
            outside = _outside_extents(obj, range(10 * PS, 40 * PS, PS))
            assert [off // PS for off in outside] == [16, 32]


# -- every frame accounted for, under a random workload ------------------------------------
def _owners(k: Kernel) -> tuple[dict[int, str], list[str]]:
    """What holds each frame (free, the machine's zero fill, an extent, a page), and
    the frames claimed twice and offsets both in a table and in an extent."""
    res, ps = k.vm.resident, k.vm.page_size
    owner: dict[int, str] = {}
    errors: list[str] = []

    def claim(frame: int, what: str) -> None:
        if frame in owner:
            errors.append(f"frame {frame}: {owner[frame]} and {what}")
        owner[frame] = what

    for frame in res.free:
        claim(frame, "free")
    for obj in res.lazy:
        for frame in obj.lazy_frames or ():
            claim(frame, f"zero fill of obj{obj.serial}")
    for obj in res.extent_objects:
        assert obj.extents and sorted(obj.extents) == obj.extent_starts, obj
        for start, frames in obj.extents.items():
            for i, frame in enumerate(frames):
                claim(frame, f"extent obj{obj.serial}+{start + i * ps:#x}")
                if start + i * ps in obj._memq:
                    errors.append(f"obj{obj.serial}+{start + i * ps:#x}: page and extent")
    for page in res.pages:
        if page is not None and page.object is not None:
            assert page.object._memq.get(page.offset) is page, page
            claim(page.frame, f"page {page}")
    return owner, errors


def resident_invariants(k: Kernel) -> list[str]:
    """The resident table's invariants (vm_page.py), kernel lock held: every frame held
    by exactly one of free, zero fill, extent, page; the counts of tabled and extent
    pages, and of each data manager's pages, match what is there."""
    res = k.vm.resident
    owner, errors = _owners(k)
    if len(owner) != res.phys.nframes:
        errors.append(f"{res.phys.nframes - len(owner)} frames held by nothing")
    extent = sum(o.extent_pages() for o in res.extent_objects)
    pages = sum(1 for p in res.pages if p is not None and p.object is not None)
    if (extent, pages + extent) != (res.extent_pages, res.tabled):
        errors.append(f"extent/tabled {res.extent_pages}/{res.tabled}, counted "
                      f"{extent}/{pages + extent}")
    want: dict[object, int] = {}
    for obj in {p.object for p in res.pages if p and p.object} | set(res.extent_objects):
        if obj.counted_as is not None:
            want[obj.counted_as] = want.get(obj.counted_as, 0) + len(obj._memq) + \
                obj.extent_pages()
    if {key: n for key, n in want.items() if n} != res.manager_pages:
        errors.append(f"manager pages {res.manager_pages}, counted {want}")
    return errors


def _step(k: Kernel, rnd: random.Random, a: int, expect: dict[int, int]) -> str:
    """One random operation on the mapped object (96 pages), checked as it goes."""
    mem, server, pages = m.memory(), PagerServer(k), len(expect)
    op, i = rnd.choice(["read", "run", "write", "flush", "clean", "lock", "unlock",
                        "vm_read"]), rnd.randrange(pages)
    n = min(rnd.randint(1, 24), pages - i)
    if op == "read":
        assert mem[a + i * PS] == expect[i]
    elif op == "run":  # (a reader going on in order: read-ahead)
        assert [mem[a + j * PS] for j in range(i, i + n)] == [expect[j] for j in
                                                              range(i, i + n)]
    elif op == "write":
        expect[i] = rnd.randrange(256)
        mem[a + i * PS] = expect[i]
    elif op == "vm_read":
        data = m.vm_read(m.task_self(), a + i * PS, n * PS)
        assert [data[j * PS] for j in range(n)] == [expect[i + j] for j in range(n)]
    else:
        with k.sched.lock:
            obj = external(k)
            if op in ("flush", "clean"):
                call = server.pager_flush_request if op == "flush" else \
                    server.pager_clean_request
                call(obj, i * PS, n * PS)
            else:
                server.pager_data_lock(obj, i * PS, n * PS, m.VM_PROT_WRITE
                                       if op == "lock" else m.VM_PROT_NONE)
    return f"{op} {i} {n}"


@pytest.mark.parametrize("seed", range(8))
def test_a_random_workload_keeps_every_frame_accounted_for(seed: int) -> None:
    """Reads, runs in order, writes, flushes, cleans, locks and kernel reads of a pager's
    object in a memory smaller than it (extents made, freed and paged out), the
    resident table's invariants checked after every step, then the data and the
    frames once the region is gone."""
    rnd = random.Random(seed)
    with m.boot(pager_cluster_pages=8, read_ahead_pages=32, memory_size=112 * PS) as k, \
            mapped(k, 96) as (_, a):
        expect = {i: i % 256 for i in range(96)}
        done: list[str] = []
        for _ in range(150):
            done.append(_step(k, rnd, a, expect))
            with k.sched.lock:
                assert not resident_invariants(k), done[-5:]
        assert [m.memory()[a + i * PS] for i in range(96)] == [expect[i] for i in range(96)]
        m.vm_deallocate(m.task_self(), a, 96 * PS)
        with k.sched.lock:
            assert not resident_invariants(k) and k.vm.resident.extent_pages == 0
