"""Freeing memory a run at a time: vm_deallocate, object termination and collapse.

Freeing a region frees its object's pages in one step (`VmResident.vm_pages_free`), and
the backend drops them a run of the object's offsets at a time (`frames_discard`): the
native backend punches each run out of the object's memfd with one call. Busy pages
(data in transit) are the only holes vm_object_page_remove leaves in a run. Nothing of
the paper's semantics changes: pages of objects that something else still refers to
(a copy, a sharer, memory in transit) stay; live hardware mappings of freed frames go,
and stale pv pairs left by a large pmap_remove cost nothing.

The first tests drive the VM of an unbooted kernel on each backend directly (no task
runs, so nothing else holds the kernel lock); the last run as tasks, embedded and native
(CONTRACT).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

import pymach as m
from machutil import recv
from pymach import OOL, Message
from pymach.kern.host import Kernel
from pymach.pmap import BACKENDS
from pymach.vm.vm_map import vm_map_create, vm_map_delete, vm_map_insert
from pymach.vm.vm_object import (
    VmObject,
    vm_object_allocate,
    vm_object_collapse,
    vm_object_deallocate,
    vm_object_page_remove,
    vm_object_reference,
    vm_object_shadow,
)

CONTRACT = True  # the task-level tests run as native tasks of machd too (conftest.py)

PS = 4096
FRAMES = 64
R, RW = m.VM_PROT_READ, m.VM_PROT_DEFAULT


@pytest.fixture(params=BACKENDS)
def vmk(request: pytest.FixtureRequest) -> Iterator[Kernel]:
    """An unbooted kernel on each backend: its VM, driven directly by the test, which
    holds the kernel lock throughout."""
    k = Kernel(pmap=request.param, memory_size=FRAMES * PS)
    with k.sched.lock:
        yield k


@pytest.fixture
def punches(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int]]]:
    """The (offset, length) of every PUNCH_HOLE the native backend makes."""
    from pymach.pmap import uffd

    calls: list[tuple[int, int]] = []
    real = uffd.punch_hole

    def record(fd: int, offset: int, length: int) -> None:
        calls.append((offset, length))
        real(fd, offset, length)

    monkeypatch.setattr(uffd, "punch_hole", record)
    yield calls


def page_bytes(obj: VmObject, off: int) -> bytes:
    return bytes([obj.serial % 251 + 1, off // PS % 251 + 1]) * (PS // 2)


def resident(k: Kernel, pages: int, size: int | None = None) -> VmObject:
    """A new internal object with its first `pages` pages resident, each filled."""
    vm = k.vm
    obj = vm_object_allocate(vm, size or pages * PS)
    if is_native(k):
        vm.phys.store_for(obj)  # as a task's mapping of it would: it has a memfd
    for i in range(pages):
        page = vm.resident.vm_page_grab(privileged=True)
        assert page is not None
        vm.resident.vm_page_insert(page, obj, i * PS)
        vm.phys.phys_write(page.frame, page_bytes(obj, i * PS))
        vm.resident.vm_page_activate(page)
    return obj


def frames_add_up(k: Kernel) -> None:
    res = k.vm.resident
    assert res.free_count() + len(res.active) + len(res.inactive) + res.wired_count() == FRAMES
    assert res.tabled == sum(len(o.memq) for o in objects_of(res))
    assert len(set(res.free)) == res.free_count()  # no frame freed twice
    for obj in objects_of(res):  # (has_busy_pages reads the count)
        assert obj.busy_pages == sum(p.busy for p in obj.memq.values()), obj


def objects_of(res: Any) -> set[VmObject]:
    return {p.object for p in res.pages if p is not None and p.object is not None}


def is_native(k: Kernel) -> bool:
    return bool(k.vm.phys.maps_objects)


# -- vm_object_page_remove: a range, a run at a time -------------------------------------------


def test_page_remove_frees_the_range_in_one_step(vmk: Kernel, punches: list[Any],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    obj = resident(vmk, 8)
    free0 = vmk.vm.resident.free_count()
    calls: list[int] = []
    real = vmk.vm.phys.frames_discard

    def count(o: Any, runs: list[tuple[int, int]], frames: list[int]) -> None:
        calls.append(len(frames))
        real(o, runs, frames)

    monkeypatch.setattr(vmk.vm.phys, "frames_discard", count)
    vm_object_page_remove(obj, 2 * PS, 6 * PS)
    assert calls == [4]  # one call for the four pages
    assert sorted(obj.memq) == [0, PS, 6 * PS, 7 * PS]
    assert vmk.vm.resident.free_count() == free0 + 4
    if is_native(vmk):
        assert punches == [(2 * PS, 4 * PS)]  # one punch for the run
    for off in obj.memq:
        assert vmk.vm.phys.phys_read(obj.memq[off].frame) == page_bytes(obj, off)
    frames_add_up(vmk)


def test_page_remove_keeps_busy_pages_and_punches_around_them(vmk: Kernel,
                                                               punches: list[Any]) -> None:
    obj = resident(vmk, 10)
    for off in (3 * PS, 4 * PS, 8 * PS):
        page = obj.memq[off]
        page.busy = True  # data in transit (a pagein, a copy): it must stay
        vmk.vm.resident.vm_page_wire(page)
    vm_object_page_remove(obj, PS, 9 * PS)
    assert sorted(obj.memq) == [0, 3 * PS, 4 * PS, 8 * PS, 9 * PS]
    if is_native(vmk):
        assert punches == [(PS, 2 * PS), (5 * PS, 3 * PS)]
    for off in obj.memq:
        assert vmk.vm.phys.phys_read(obj.memq[off].frame) == page_bytes(obj, off)
    frames_add_up(vmk)


def test_an_object_counts_its_busy_pages_as_they_come_and_go(vmk: Kernel) -> None:
    """has_busy_pages reads a count (vm_object_collapse asks it of both objects each
    time: with 10,000 pages resident, a one-page out-of-line send from a copy-on-write
    region walked them, 590 against 74 us), kept as pages turn busy, are freed while
    busy, move to another object and come back off the free queue."""
    res = vmk.vm.resident
    obj, other = resident(vmk, 6), resident(vmk, 1, 8 * PS)
    assert not obj.has_busy_pages()
    for off in (PS, 2 * PS, 3 * PS):
        obj.memq[off].busy = True
    obj.memq[PS].busy = True  # (again: counted once)
    assert obj.busy_pages == 3 and obj.has_busy_pages()
    res.vm_page_free(obj.memq[PS])  # freed while busy
    res.vm_pages_free(obj, [obj.memq[2 * PS]], [(2 * PS, 3 * PS)])
    assert obj.busy_pages == 1
    res.vm_page_rename(obj.memq[3 * PS], other, 5 * PS)  # moves with its count
    assert (obj.busy_pages, other.busy_pages) == (0, 1) and not obj.has_busy_pages()
    other.memq[5 * PS].busy = False
    assert other.busy_pages == 0
    frames_add_up(vmk)
    again = resident(vmk, 4)  # frames off the free queue, reset: none is busy
    assert again.busy_pages == 0
    single = resident(vmk, 1)  # its only page freed while busy: no page left to show it
    single.memq[0].busy = True
    res.vm_page_free(single.memq[0])
    assert single.busy_pages == 0 and not single.has_busy_pages()
    frames_add_up(vmk)


def test_page_remove_of_an_empty_range_does_nothing(vmk: Kernel, punches: list[Any]) -> None:
    obj = resident(vmk, 4, size=16 * PS)
    vm_object_page_remove(obj, 8 * PS, 16 * PS)
    assert len(obj.memq) == 4 and punches == []
    frames_add_up(vmk)


def test_freed_frames_lose_their_mappings_live_or_stale(vmk: Kernel) -> None:
    """Live mappings of freed frames go; pv pairs left by a large pmap_remove are
    skipped; mappings of pages that stay are untouched."""
    vm = vmk.vm
    obj = resident(vm.kernel, 8)
    a, b = vm.phys.pmap_create(), vm.phys.pmap_create()
    base = 5116 * PS  # a's mappings cross a page-table chunk boundary (1024 pages)
    for off, page in obj.memq.items():
        a.pmap_enter(base + off, page.frame, R)
    a.pmap_remove(0, 1 << 40)  # whole chunks at once: every pv pair stale
    b.pmap_enter(0, obj.memq[2 * PS].frame, RW)  # live
    b.pmap_enter(PS, obj.memq[7 * PS].frame, R)  # live, and its page stays
    freed = [obj.memq[off].frame for off in range(0, 7 * PS, PS)]
    vm_object_page_remove(obj, 0, 7 * PS)
    assert b.pmap_extract(0) is None
    assert b.pmap_extract(PS) == obj.memq[7 * PS].frame
    assert all(a.pmap_extract(base + i * PS) is None for i in range(8))
    assert not any(f in vm.phys.pv for f in freed)  # type: ignore[attr-defined]
    vm.phys.pmap_page_protect(obj.memq[7 * PS].frame, m.VM_PROT_NONE)  # pv still right
    assert b.pmap_extract(PS) is None
    frames_add_up(vmk)


def test_freed_frames_are_reused_cleanly(vmk: Kernel) -> None:
    """Frames freed in a run come back as ordinary frames: bound to a new object,
    written and read; the old object's other pages keep their data."""
    vm = vmk.vm
    old = resident(vmk, 6)
    vm_object_page_remove(old, 0, 4 * PS)
    new = resident(vmk, FRAMES - 2)  # takes every free frame, the freed ones included
    assert vm.resident.free_count() == 0
    for off, page in new.memq.items():
        assert vm.phys.phys_read(page.frame) == page_bytes(new, off)
    for off, page in old.memq.items():
        assert vm.phys.phys_read(page.frame) == page_bytes(old, off)
    frames_add_up(vmk)


# -- termination, deallocation and collapse ----------------------------------------------------


def test_termination_frees_every_page_with_one_punch(vmk: Kernel, punches: list[Any]) -> None:
    obj = resident(vmk, 12, size=16 * PS)
    obj.memq[5 * PS].busy = True  # termination frees busy pages too
    vmk.vm.resident.vm_page_wire(obj.memq[5 * PS])
    free0 = vmk.vm.resident.free_count()
    vm_object_deallocate(obj)
    assert not obj.alive and not obj.memq
    assert vmk.vm.resident.free_count() == free0 + 12
    if is_native(vmk):
        assert punches == [(0, 16 * PS)]  # one punch: the object's whole memfd
    frames_add_up(vmk)


def test_deallocating_a_region_spares_pages_referenced_elsewhere(vmk: Kernel) -> None:
    """A region's object that something else refers to (a copy in transit, say) keeps
    its pages when the region goes; the last reference frees them all."""
    vm = vmk.vm
    vmap = vm_map_create(vm, vm.phys.pmap_create())
    obj = resident(vmk, 8)
    vm_map_insert(vmap, 0x100000, 0x100000 + 8 * PS, obj, 0)
    vm_object_reference(obj)  # held by something else
    vm_map_delete(vmap, 0x100000, 0x100000 + 8 * PS)
    assert obj.alive and len(obj.memq) == 8
    for off, page in obj.memq.items():
        assert vm.phys.phys_read(page.frame) == page_bytes(obj, off)
    vm_object_deallocate(obj)
    assert not obj.alive and vm.resident.free_count() == FRAMES
    frames_add_up(vmk)


def test_a_region_deallocated_piece_by_piece(vmk: Kernel, punches: list[Any]) -> None:
    """While other pieces of a split region still refer to its object, a freed piece's
    pages stay (they are the object's); the last piece frees its range, then the rest
    of the object; the dead object's file is punched once the kernel lock is let go,
    in one call (kern/lock.py: KernelLock.defer)."""
    vm = vmk.vm
    vmap = vm_map_create(vm, vm.phys.pmap_create())
    obj = resident(vmk, 8)
    at = 0x100000
    vm_map_insert(vmap, at, at + 8 * PS, obj, 0)
    vm_map_delete(vmap, at + 2 * PS, at + 5 * PS)  # the middle: the entry splits
    vm_map_delete(vmap, at, at + 2 * PS)
    assert len(obj.memq) == 8 and punches == []
    for off, page in obj.memq.items():
        assert vm.phys.phys_read(page.frame) == page_bytes(obj, off)
    vm_map_delete(vmap, at, at + 8 * PS)
    assert not obj.alive and vm.resident.free_count() == FRAMES
    assert punches == []  # (held back while the kernel lock is held)
    vmk.sched.lock.release()
    vmk.sched.lock.acquire()
    if is_native(vmk):
        assert punches == [(0, 8 * PS)]
    frames_add_up(vmk)


def test_collapse_frees_what_the_shadow_hides_in_one_step(vmk: Kernel,
                                                          punches: list[Any]) -> None:
    """Collapsing a backing object into its shadow moves the pages the shadow lacks and
    frees the ones it hides, all of those with one discard."""
    vm = vmk.vm
    backing = resident(vmk, 6)
    shadow = vm_object_shadow(backing, 0, 6 * PS)  # takes over backing's reference
    for off in (PS, 4 * PS):  # the shadow's own copies hide these two
        page = vm.resident.vm_page_grab(privileged=True)
        assert page is not None
        vm.resident.vm_page_insert(page, shadow, off)
        vm.phys.phys_write(page.frame, b"shadow" * (PS // 6) + bytes(PS % 6))
        vm.resident.vm_page_activate(page)
    want = {off: page_bytes(backing, off) for off in (0, 2 * PS, 3 * PS, 5 * PS)}
    punches.clear()
    vm_object_collapse(shadow)
    assert shadow.shadow is None and not backing.alive
    assert sorted(shadow.memq) == [i * PS for i in range(6)]
    for off, data in want.items():
        assert vm.phys.phys_read(shadow.memq[off].frame) == data
    assert vm.phys.phys_read(shadow.memq[PS].frame)[:6] == b"shadow"
    assert vm.resident.free_count() == FRAMES - 6
    if is_native(vmk):  # each moved page leaves the backing memfd; then the rest at once
        assert punches[-1] == (0, 6 * PS)
    frames_add_up(vmk)


# -- as tasks: embedded and native ----------------------------------------------------------------


def ps() -> int:
    return m.vm_page_size()


def pattern(tag: int, i: int) -> bytes:
    return bytes([tag, i % 256, (i >> 8) % 256, 0x5A]) * (ps() // 4)


def filled(pages: int, tag: int) -> int:
    a: int = m.vm_allocate(m.task_self(), 0, pages * ps(), True)
    m.memory()[a:a + pages * ps()] = b"".join(pattern(tag, i) for i in range(pages))
    return a


def free_count() -> int:
    return m.vm_statistics(m.task_self()).free_count


def test_a_large_region_freed_gives_its_frames_back(kernel: m.Kernel) -> None:
    pages = 512
    before = free_count()
    a = filled(pages, 1)
    assert free_count() <= before - pages
    m.vm_deallocate(m.task_self(), a, pages * ps())
    assert free_count() >= before - 2  # (page tables of other tasks may come and go)
    b = m.vm_allocate(m.task_self(), 0, pages * ps(), True)
    assert m.vm_read(m.task_self(), b, pages * ps()) == bytes(pages * ps())
    m.vm_deallocate(m.task_self(), b, pages * ps())


def test_copies_keep_their_data_when_the_original_is_freed(kernel: m.Kernel) -> None:
    me = m.task_self()
    pages = 64
    a = filled(pages, 2)
    b = m.vm_allocate(me, 0, pages * ps(), True)
    m.vm_copy(me, a, pages * ps(), b)
    child = m.task_create(me, True)  # a copy by inheritance
    port = m.port_allocate(me)
    m.msg_send(Message(remote_port=port, items=[OOL(a, pages * ps())]))  # one in transit
    m.vm_deallocate(me, a, pages * ps())
    want = b"".join(pattern(2, i) for i in range(pages))
    assert m.vm_read(me, b, pages * ps()) == want
    assert m.vm_read(child, a, pages * ps()) == want
    (got,) = recv(port).items
    assert isinstance(got, OOL) and m.vm_read(me, got.address, got.size) == want
    m.task_terminate(child)
    for addr in (b, got.address):
        m.vm_deallocate(me, addr, pages * ps())


def test_moved_memory_freed_by_the_receiver(kernel: m.Kernel) -> None:
    """Memory sent with deallocate, then freed by its receiver (the benchmark's case)."""
    me = m.task_self()
    pages = 256
    port = m.port_allocate(me)
    before = free_count()
    a = filled(pages, 3)
    m.msg_send(Message(remote_port=port, items=[OOL(a, pages * ps(), deallocate=True)]))
    (got,) = recv(port).items
    assert isinstance(got, OOL)
    assert m.memory()[got.address + 5 * ps():got.address + 6 * ps()] == pattern(3, 5)
    m.vm_deallocate(me, got.address, got.size)
    assert free_count() >= before - 2
    with pytest.raises(m.KernError) as e:
        m.memory().read(got.address, 1)
    assert e.value.code == "KERN_INVALID_ADDRESS"


def test_a_shared_region_outlives_one_sharer(kernel: m.Kernel) -> None:
    me = m.task_self()
    pages = 32
    a = filled(pages, 4)
    m.vm_inherit(me, a, pages * ps(), m.VM_INHERIT_SHARE)
    child = m.task_create(me, True)
    m.vm_deallocate(me, a, pages * ps())
    assert m.vm_read(child, a, pages * ps()) == b"".join(pattern(4, i) for i in range(pages))
    m.task_terminate(child)


def test_an_object_no_task_maps_holds_no_descriptor_and_moves_in_when_mapped(
        vmk: Kernel) -> None:
    """Pages of objects no task maps (a pageout's holding objects, say) keep their data
    in the free store: thousands of them cost machd no descriptor. When a task maps such
    an object its pages move into its new memfd, data and all."""
    if not is_native(vmk):
        pytest.skip("the software MMU has no memfds")
    vm = vmk.vm
    fds0 = len(os.listdir("/proc/self/fd"))
    objs = []
    for _ in range(40):
        obj = vm_object_allocate(vm, PS)
        page = vm.resident.vm_page_grab(privileged=True)
        assert page is not None
        vm.resident.vm_page_insert(page, obj, 0)
        vm.phys.phys_write(page.frame, page_bytes(obj, 0))
        objs.append((obj, page))
    assert len(os.listdir("/proc/self/fd")) == fds0
    obj, page = objs[7]
    store = vm.phys.store_for(obj)
    assert os.pread(store.fd, PS, 0) == page_bytes(obj, 0)  # moved into the memfd
    assert vm.phys.phys_read(page.frame) == page_bytes(obj, 0)
    for _, p in objs:
        vm.resident.vm_page_free(p)
    frames_add_up(vmk)


def test_pageout_frees_only_clean_pages_while_enough_write_backs_are_in_flight(
        vmk: Kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a quarter of memory is held by write-backs on their way to external
    managers, the pageout daemon's reclaim sends them no more dirty pages: their dirty
    victims stay inactive for a later pass (held write-backs must not fill memory: a
    tiny machd thrashed so), while clean pages are freed and internal objects' dirty
    pages still go (to the default pager). With fewer held, all are taken."""
    from pymach.vm import vm_pageout

    vm = vmk.vm
    ext, internal = resident(vmk, 8), resident(vmk, 2)
    ext.internal = False  # (as a data manager's object, seen by pageout)
    pages = [ext.memq[i * PS] for i in range(8)] + list(internal.memq.values())
    for page in pages:
        page.dirty = page.object is internal or page.offset < 4 * PS
        vm.resident.vm_page_deactivate(page)
    held = [FRAMES // 4]  # frames held by write-backs to managers
    monkeypatch.setattr(vm_pageout, "laundry_pages", lambda vm: held[0])
    free, in_flight = vm.resident.free_count(), vm.pageouts_in_flight
    vm_pageout._reclaim(vm, pages)
    assert vm.resident.free_count() == free + 4 and vm.pageouts_in_flight == in_flight
    assert sorted(ext.memq) == [i * PS for i in range(4)]
    assert all(p.queue == "inactive" and p.dirty for p in pages[:4])
    assert not any(p.queue == "inactive" for p in pages[8:])  # (taken: this kernel has
    held[0] -= 1  # no default pager, so they could not go, and were activated, as a
    vm_pageout._reclaim(vm, pages[:4])  # page that cannot go is; so are these now)
    assert not any(p.queue == "inactive" for p in pages[:4])
    frames_add_up(vmk)


# -- range_readable_now: by map entry and shadow chain, pages only where needed ------------------
def _readable_page_by_page(vmap: Any, address: int, size: int) -> bool:
    """The definition, a page at a time (what range_readable_now did before)."""
    from pymach.vm.vm_kern import _available

    for va in range(address, address + size, PS):
        entry = vmap.lookup_entry(va)
        if entry is None:
            return False
        if entry.object is not None and not _available(
                entry.object, entry.offset + (va - entry.start)):
            return False
    return True


def test_range_readable_now_agrees_with_the_page_by_page_definition(vmk: Kernel) -> None:
    """A region is readable now when no page of it needs a data manager or is in
    transit. The check skips the pages of entries whose whole shadow chain has neither
    (one look per entry); every case where it must look closer gives the answer of the
    page-by-page definition."""
    from types import SimpleNamespace

    from pymach.vm.vm_kern import range_readable_now

    vm = vmk.vm
    vmap = vm_map_create(vm, vm.phys.pmap_create())
    at = 0x100000
    backing = resident(vmk, 4, 8 * PS)  # pages 0-3 resident, 4-7 zero fill
    top = vm_object_shadow(backing, 2 * PS, 6 * PS)  # sees backing's pages 2-7
    vm_map_insert(vmap, at, at + 6 * PS, top, 0)
    other = resident(vmk, 2, 4 * PS)
    vm_map_insert(vmap, at + 6 * PS, at + 10 * PS, other, 0)
    vm_map_insert(vmap, at + 11 * PS, at + 12 * PS, resident(vmk, 1), 0)  # after a hole
    ranges = [(at, 10 * PS), (at + PS, 3 * PS), (at + 4 * PS, 3 * PS), (at, 12 * PS),
              (at + 11 * PS, PS), (at + 9 * PS, 3 * PS)]

    def agree() -> list[bool]:
        got = [range_readable_now(vmap, a, n) for a, n in ranges]
        assert got == [_readable_page_by_page(vmap, a, n) for a, n in ranges]
        return got

    assert agree() == [True, True, True, False, True, False]  # anonymous: no manager
    backing.pager = SimpleNamespace(dead=False)  # type: ignore[assignment]
    backing.existence.add(6 * PS)  # paged out: top's offset 4 needs the default pager
    assert agree() == [False, True, False, False, True, False]
    backing.existence.clear()
    backing.existence.add(0)  # paged out, but top does not see it
    assert agree()[:3] == [True, True, True]
    busy = backing.memq[3 * PS]
    busy.busy = True  # in transit: top's offset 1
    assert agree()[:3] == [False, False, True]
    busy.busy = False
    other.pager = SimpleNamespace(dead=False)  # type: ignore[assignment]
    other.internal = False  # an external object's absent pages need its manager
    assert agree()[:3] == [False, True, True]  # (its resident pages need nothing)
    assert not range_readable_now(vmap, at + 6 * PS, 3 * PS)
    other.internal, other.pager = True, None
    backing.pager = None
    frames_add_up(vmk)
