"""Provided data reach the object's pages a run at a time, without copies through machd.

pager_data_provided takes its data as memory in transit: bytes in the message, or an
out-of-line region of the manager. The kernel reads them through `copy_view` (vm_kern):
bytes it holds as they are, and a region whose pages all lie in one object's memory
through the machine's view of that memory (`object_view`: the native backend maps the
object's memfd, so the data go into the provided pages with one copy per run,
`phys_write_run`); anything else page by page, as before. The paper's rules do not
change: only whole pages count, the lock value applies, pages nobody asked for are
taken within the manager's room, a region still changing in the manager is sent as it
was at the send, and a bad region is refused.

The first tests drive the VM of an unbooted kernel on each backend directly; the others
run as tasks, embedded and native (CONTRACT).
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

import pymach as m
from machutil import recv, start_thread
from pagerutil import PS, Pager, finished, pattern, quiet, read, write
from pymach import OOL, Message
from pymach.kern.host import Kernel
from pymach.mach_vm import NativeAddressSpace
from pymach.pagers.data_manager import OOL_MIN
from pymach.pmap import BACKENDS
from pymach.vm.vm_kern import copy_view
from pymach.vm.vm_map_copy import VmMapCopy, vm_map_copy_from_bytes
from pymach.vm.vm_object import VmObject, vm_object_allocate, vm_object_shadow

CONTRACT = True  # the task-level tests run as native tasks of machd too (conftest.py)

FRAMES = 64
R, W = m.VM_PROT_READ, m.VM_PROT_WRITE
NO_THREAD: Any = SimpleNamespace(vm_privileged=True)  # reading resident pages: no wait


@pytest.fixture(params=BACKENDS)
def vmk(request: pytest.FixtureRequest) -> Iterator[Kernel]:
    """An unbooted kernel on each backend, its kernel lock held by the test."""
    k = Kernel(pmap=request.param, memory_size=FRAMES * PS)
    with k.sched.lock:
        yield k


def filled(k: Kernel, pages: int, tag: int = 3) -> VmObject:
    """An internal object whose `pages` pages are resident and hold pattern(tag)."""
    vm = k.vm
    obj = vm_object_allocate(vm, pages * PS)
    if vm.phys.maps_objects:
        vm.phys.store_for(obj)  # as a task's mapping of it would: it has a memfd
    data = pattern(tag, pages * PS)
    for i in range(pages):
        page = vm.resident.vm_page_grab(privileged=True)
        assert page is not None
        vm.resident.vm_page_insert(page, obj, i * PS)
        vm.phys.phys_write(page.frame, data[i * PS:(i + 1) * PS])
        vm.resident.vm_page_activate(page)
    return obj


def in_transit(k: Kernel, obj: VmObject, offset: int, size: int) -> VmMapCopy:
    """Memory in transit of [offset, offset+size) of `obj` (whole pages), as a
    copy-on-write copy through a shadow would give it."""
    from pymach.vm.vm_map_copy import CopyEntry
    from pymach.vm.vm_object import vm_object_reference

    vm_object_reference(obj)
    top = vm_object_shadow(obj, 0, obj.size)
    start = offset - offset % PS
    end = -(-(offset + size) // PS) * PS
    return VmMapCopy(k.vm, [CopyEntry(top, start, end - start, False)], offset % PS, size)


def viewed(k: Kernel, copy: VmMapCopy) -> tuple[bytes, list[int]]:
    """copy_view's bytes, and how many times it read a page on its own meanwhile."""
    reads: list[int] = []
    real = k.vm.phys.phys_read

    def count(frame: int, offset: int = 0, size: int | None = None) -> bytes:
        reads.append(frame)
        return real(frame, offset, size)

    k.vm.phys.phys_read = count  # type: ignore[method-assign]
    try:
        with copy_view(NO_THREAD, copy) as view:
            return bytes(view), reads
    finally:
        del k.vm.phys.phys_read


# -- the kernel's side, on each backend ---------------------------------------------------


def test_copy_view_of_bytes_is_the_bytes(vmk: Kernel) -> None:
    data = pattern(5, 3 * PS + 100)
    copy = vm_map_copy_from_bytes(vmk.vm, data)
    got, reads = viewed(vmk, copy)
    assert got == data and reads == []


def test_copy_view_of_one_objects_pages_reads_no_page_natively(vmk: Kernel) -> None:
    obj = filled(vmk, 8)
    copy = in_transit(vmk, obj, PS + 10, 5 * PS)  # through a shadow with no page
    got, reads = viewed(vmk, copy)
    assert got == pattern(3, 8 * PS)[PS + 10:6 * PS + 10]
    if vmk.vm.phys.maps_objects:
        assert reads == []  # the memfd was mapped: no page read one at a time
    else:
        assert len(reads) == 6  # simulated frames: page by page, as before


def test_copy_view_reads_page_by_page_what_one_object_does_not_hold(vmk: Kernel) -> None:
    obj = filled(vmk, 4)
    copy = in_transit(vmk, obj, 0, 4 * PS)
    top = copy.entries[0].object
    page = vmk.vm.resident.vm_page_grab(privileged=True)
    assert page is not None
    vmk.vm.resident.vm_page_insert(page, top, PS)  # the shadow has its own page 1
    vmk.vm.phys.phys_write(page.frame, b"\7" * PS)
    got, reads = viewed(vmk, copy)
    expected = bytearray(pattern(3, 4 * PS))
    expected[PS:2 * PS] = b"\7" * PS
    assert got == bytes(expected)
    assert len(reads) == 4


def test_copy_view_sees_no_hole_and_no_page_taken_away(vmk: Kernel) -> None:
    """A page taken from every task (its data kept aside) or never made (a hole) is
    read as the VM knows it: the data kept aside, zeros."""
    obj = filled(vmk, 4)
    vmk.vm.phys.pmap_page_protect(obj.memq[PS].frame, m.VM_PROT_NONE)  # kept aside
    got, reads = viewed(vmk, in_transit(vmk, obj, 0, 4 * PS))
    assert got == pattern(3, 4 * PS)
    assert len(reads) == 4  # page by page: the memfd does not hold page 1 now
    bigger = filled(vmk, 4, tag=4)
    bigger.size = 6 * PS  # pages 4 and 5 were never made
    if vmk.vm.phys.maps_objects:
        vmk.vm.phys.store_for(bigger)
    got, reads = viewed(vmk, in_transit(vmk, bigger, 0, 6 * PS))
    assert got == pattern(4, 4 * PS) + bytes(2 * PS)
    assert len(reads) == 6  # (the zero pages were made by the read)


def test_phys_write_run_fills_each_frame_with_its_page(vmk: Kernel) -> None:
    obj = filled(vmk, 6)
    frames = [obj.memq[off].frame for off in (0, PS, 2 * PS, 4 * PS, 5 * PS)]
    page = vmk.vm.resident.vm_page_grab(privileged=True)  # a frame of no object
    assert page is not None
    frames.insert(2, page.frame)
    vmk.vm.phys.pmap_page_protect(frames[-1], m.VM_PROT_NONE)  # one kept aside
    data = pattern(8, len(frames) * PS)
    vmk.vm.phys.phys_write_run(frames, data)
    for i, frame in enumerate(frames):
        assert vmk.vm.phys.phys_read(frame) == data[i * PS:(i + 1) * PS], i


# -- as tasks: a manager provides out of line ----------------------------------------------


def region(data: bytes) -> int:
    """A new region of the calling task holding `data` (rounded up to whole pages)."""
    a: int = m.vm_allocate(m.task_self(), 0, -(-len(data) // PS) * PS, True)
    write(a, data)
    return a


@pytest.mark.parametrize("deallocate", [False, True])
def test_out_of_line_data_fill_the_waiting_page_and_the_pages_after_it(
        kernel: m.Kernel, deallocate: bool) -> None:
    n = 48
    p = Pager(size=n * PS)
    a = p.map()
    request = p.init()
    _, box = start_thread(read, a, n * PS)
    assert p.expect("pager_data_request")[1:] == [0, PS, R]
    buf = region(bytes(p.data))
    m.pager_data_provided(request, 0, OOL(buf, n * PS, deallocate), n * PS, m.VM_PROT_NONE)
    assert finished(box)["result"] == bytes(p.data)
    quiet(20)
    assert m.port_status(m.task_self(), p.mo)[1] == 0  # the other pages came uninvited
    if not deallocate:
        assert m.memory().read(buf, n * PS) == bytes(p.data)  # the manager's copy stays


def test_out_of_line_data_count_in_whole_pages_only(kernel: m.Kernel) -> None:
    p = Pager(size=4 * PS)
    a = p.map()
    request = p.init()
    _, box1 = start_thread(read, a + PS)
    assert p.expect("pager_data_request")[1:] == [PS, PS, R]
    other = pattern(9, 4 * PS)
    buf = region(other)
    # [PS/2, PS/2 + 3PS) of the object from 100 bytes into the region: pages 1 and 2
    m.pager_data_provided(request, PS // 2, OOL(buf + 100, 3 * PS), 3 * PS,
                          m.VM_PROT_NONE)
    assert finished(box1)["result"] == other[100 + PS // 2:100 + PS // 2 + PS]
    assert read(a + 2 * PS) == other[100 + 3 * PS // 2:100 + 5 * PS // 2]
    _, box0 = start_thread(read, a)  # page 0 was only partly provided: asked for
    assert p.expect("pager_data_request")[1:] == [0, PS, R]
    p.provide(0)
    assert finished(box0)["result"] == bytes(p.data[:PS])


def test_lock_value_of_out_of_line_data(kernel: m.Kernel) -> None:
    p = Pager(size=2 * PS)
    p.unlock = "ignore"
    a = p.map()
    request = p.init()
    _, box = start_thread(read, a)
    p.expect("pager_data_request")
    buf = region(bytes(p.data))
    m.pager_data_provided(request, 0, OOL(buf, 2 * PS, True), 2 * PS, W)
    assert finished(box)["result"] == bytes(p.data[:PS])
    _, box = start_thread(write, a + PS + 5, b"locked")  # the page nobody asked for too
    assert p.expect("pager_data_unlock")[1:3] == [PS, PS]
    quiet(30)
    assert not box.get("done")  # the write waits for the manager
    m.pager_data_lock(request, PS, PS, m.VM_PROT_NONE)
    assert "error" not in finished(box)
    assert read(a + PS + 5, 6) == b"locked"


def test_out_of_line_data_are_the_regions_bytes_at_the_send(kernel: m.Kernel) -> None:
    """A region sent before (its copy holds the old bytes) and changed since: the kernel
    gets the bytes it holds when provided, and the earlier message keeps the old."""
    me = m.task_self()
    p = Pager(size=2 * PS)
    a = p.map()
    request = p.init()
    old = pattern(11, 2 * PS)
    buf = region(old)
    box_port = m.port_allocate(me)
    m.msg_send(Message(remote_port=box_port, items=[OOL(buf, 2 * PS)]))
    write(buf, b"changed since")
    _, box = start_thread(read, a, 2 * PS)
    p.expect("pager_data_request")
    m.pager_data_provided(request, 0, OOL(buf, 2 * PS), 2 * PS, m.VM_PROT_NONE)
    assert finished(box)["result"] == b"changed since" + old[13:]
    earlier = recv(box_port).items[0]
    assert isinstance(earlier, OOL)
    assert m.memory().read(earlier.address, 2 * PS) == old


def test_bad_out_of_line_data_are_refused_and_change_nothing(kernel: m.Kernel) -> None:
    me = m.task_self()
    p = Pager(size=2 * PS)
    a = p.map()
    request = p.init()
    _, box = start_thread(read, a)
    p.expect("pager_data_request")
    gone = m.vm_allocate(me, 0, 2 * PS, True)
    m.vm_deallocate(me, gone, 2 * PS)
    with pytest.raises(m.MachError) as e:
        m.pager_data_provided(request, 0, OOL(gone, 2 * PS), 2 * PS, m.VM_PROT_NONE)
    assert e.value.code == "SEND_INVALID_MEMORY"
    quiet(30)
    assert not box.get("done")  # still waiting for its data
    p.provide(0)
    assert finished(box)["result"] == bytes(p.data[:PS])


class Big(m.DataManager):
    """Answers every request with BIG bytes (more than asked) of pattern(7) there, by
    message (no window: in place, what lies past the asked range is dropped)."""

    threads = max_threads = 1
    window_min = 0

    def read(self, memory_object: int, offset: int, length: int, access: int) -> bytes:
        return pattern(7, 3 * BIG)[offset:offset + BIG]


BIG = OOL_MIN + 3 * PS


def _big_manager(staging_pages: int) -> None:
    from pagerutil import _manager_main

    dm = Big()  # (made here: a DataManager holds locks, never pickled)
    dm.staging_pages = staging_pages  # type: ignore[misc]
    _manager_main(dm, 1)


@pytest.mark.parametrize("staging_pages", [0, 1024])
def test_a_data_manager_provides_large_runs_whole(kernel: m.Kernel,
                                                  staging_pages: int) -> None:
    """Out of line in a native task: from a fresh region each time (moved to the
    kernel), or from the thread's staging region, written again for the second run
    while the kernel keeps the first."""
    me = m.task_self()
    inbox = m.port_allocate(me)
    handle = kernel.spawn(_big_manager, staging_pages, name="big")
    notify = m.task_get_special_port(handle.port, m.TASK_NOTIFY_PORT)
    m.msg_send(Message(remote_port=notify, items=[m.Port(inbox, m.MAKE_SEND)]))
    obj = recv(inbox, 10_000).items[0].value
    a = m.vm_allocate_with_pager(me, 0, 2 * BIG, True, obj, 0)  # type: ignore[arg-type]
    assert read(a, BIG) == pattern(7, BIG)
    assert read(a + BIG, BIG) == pattern(7, 2 * BIG)[BIG:]  # a second run, after it
    assert read(a, BIG) == pattern(7, BIG)  # the first is as it was
    kept = [r for r in m.vm_regions(handle.port) if r.size >= OOL_MIN]
    staged = staging_pages and isinstance(m.memory(), NativeAddressSpace)
    assert len(kept) == (1 if staged else 0)  # moved to the kernel, or kept for reuse
    m.vm_deallocate(me, a, 2 * BIG)
    m.task_terminate(handle.port)


def test_a_refused_provide_keeps_no_region(kernel: m.Kernel) -> None:
    """provide() to a port that is not there: the error, and no region left behind."""
    from pymach.pagers.data_manager import provide

    me = m.task_self()
    gone = m.port_allocate(me)
    m.port_deallocate(me, gone)
    before = m.vm_regions(me)
    with pytest.raises(m.MachError) as e:
        provide(gone, 0, pattern(2, OOL_MIN), staging_pages=0)  # a fresh region
    assert e.value.code == "SEND_INVALID_PORT"
    assert m.vm_regions(me) == before
