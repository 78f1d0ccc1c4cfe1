"""The external memory management interface (paper 3.4, Tables 3-4, 3-5 and 3-6).

A memory object is a port. vm_allocate_with_pager maps it (Table 3-4); the first mapping
by a kernel makes the kernel call pager_init on it before the call returns, handing the
manager a pager request port and a pager name port. The kernel then asks for data
(pager_data_request), writes changes back (pager_data_write) and asks for more access
(pager_data_unlock), never waiting for an answer (Table 3-5); the manager supplies data
and controls the cache through the request port (Table 3-6). Only whole pages count; the
name port identifies the object in vm_regions and grants nothing (footnote 3). Without
pager_cache the kernel lets go of an object after its last unmap, writing dirty pages
back first, and the manager learns it from the death of the request and name ports;
with pager_cache a later mapping is served from memory with no messages (section 9).

Most tests here play the data manager themselves (pagerutil.Pager): either by hand,
message by message, with the faulting access made by another thread, or with a
serving thread in the test's own task. Both scheduler modes run every test.
"""

from __future__ import annotations

import re
from collections import deque

import pytest

import pymach as m
from machutil import (
    assert_kernel_ok,
    notifications,
    recv,
    start_thread,
    wait_notification,
    wait_until,
)
from pagerutil import (
    PS,
    Pager,
    finished,
    pager_messages,
    pattern,
    quiet,
    read,
    run_in_task,
    spawn_manager,
    write,
)
from pymach import Int, Message, Port
from pymach.include.mach_defs import memory_object_defs
from pymach.vm.memory_object import WRITE_RUN_PAGES

R, W = m.VM_PROT_READ, m.VM_PROT_WRITE
CONTRACT = True  # these run as native tasks of machd too (conftest.py)



# -- Table 3-4: vm_allocate_with_pager ----------------------------------------------------


@pytest.mark.embedded_only("reads the embedded kernel's trace log")
def test_pager_init_is_queued_before_vm_allocate_with_pager_returns(kernel: m.Kernel) -> None:
    me = m.task_self()
    p = Pager()
    before = pager_messages(kernel)
    a = p.map()
    # the call has returned: pager_init is already waiting on the memory object port
    assert m.port_status(me, p.mo)[1] == 1
    assert pager_messages(kernel) == before + 1
    request, name = p.expect("pager_init")
    assert len({p.mo, request, name}) == 3
    # the manager gets send rights only; the kernel keeps the receive rights (3.4.1)
    for port in (request, name):
        _, _, _, receiver, owner = m.port_status(me, port)
        assert (receiver, owner) == (False, False)
    # nothing else was sent: no data is asked for before a fault
    assert m.port_status(me, p.mo)[1] == 0
    assert a % PS == 0
    assert any(re.search(r"kernel -> bootstrap: pager_init obj\d+", line)
               for line in kernel.trace_log)


@pytest.mark.embedded_only("a thread of another task shares a Python dict with the test")
def test_pager_init_once_per_kernel_for_many_mappings_and_tasks(kernel: m.Kernel) -> None:
    me = m.task_self()
    p = Pager(size=2 * PS).start()
    a1 = p.map()
    a2 = p.map()
    child = m.task_create(me, False)
    c = p.map(task=child)
    assert a1 != a2
    p.wait_for("pager_init")
    write(a1, b"through mapping one")
    assert read(a2, 19) == b"through mapping one"
    box = finished(run_in_task(child, read, c, 19))
    assert box["result"] == b"through mapping one"
    box = finished(run_in_task(child, write, c + PS + 10, b"from the child"))
    assert "error" not in box
    assert read(a1 + PS + 10, 14) == b"from the child"
    assert read(a2 + PS + 10, 14) == b"from the child"
    p.map()  # a fourth mapping, after the object is in use
    quiet(30)
    assert p.count("pager_init") == 1
    assert len(set(p.requests)) == 1
    # one cache for every mapping: each page was asked for once
    assert sorted(e[1] for e in p.entries("pager_data_request")) == [0, PS]
    m.task_terminate(child)
    assert_kernel_ok()


def test_map_at_an_address_or_anywhere_with_an_offset(kernel: m.Kernel) -> None:
    me = m.task_self()
    p = Pager(size=8 * PS).start()
    a = p.map(size=2 * PS, offset=3 * PS)
    assert read(a, 2 * PS) == bytes(p.data[3 * PS:5 * PS])
    assert [e[1] for e in p.entries("pager_data_request")] == [3 * PS, 4 * PS]
    free = m.vm_allocate(me, 0, 4 * PS, True)
    m.vm_deallocate(me, free, 4 * PS)
    b = p.map(size=PS, offset=6 * PS, address=free + PS, anywhere=False)
    assert b == free + PS
    assert read(b) == bytes(p.data[6 * PS:7 * PS])
    regions = {r.address: r for r in m.vm_regions(me)}
    assert (regions[a].size, regions[a].offset) == (2 * PS, 3 * PS)
    assert (regions[b].size, regions[b].offset) == (PS, 6 * PS)
    assert regions[a].object_name == regions[b].object_name == p.names[0]
    with pytest.raises(m.KernError) as e:
        p.map(size=PS, address=b, anywhere=False)
    assert e.value.code == "KERN_NO_SPACE"
    with pytest.raises(m.MachError) as e:  # an unaligned address takes its page: b's
        p.map(size=PS, address=b + 1, anywhere=False)
    assert e.value.code == "KERN_NO_SPACE"
    # a size that is not a multiple of the page size is rounded up
    c = p.map(size=100, offset=0)
    assert [r.size for r in m.vm_regions(me) if r.address == c] == [PS]
    assert read(c + 96, 4) == bytes(p.data[96:100])


def test_unaligned_offsets_are_allowed(kernel: m.Kernel) -> None:
    off = 100  # "not required to align on system page boundaries" (3.4.1)
    p = Pager(size=4 * PS).start()
    a = p.map(size=2 * PS, offset=off)
    assert read(a, 2 * PS) == bytes(p.data[off:off + 2 * PS])
    # the kernel asks for the memory object's own (unaligned) offsets
    assert [e[1:3] for e in p.entries("pager_data_request")] == [(off, PS), (off + PS, PS)]
    # a mapping with the same page alignment shares the cache: consistency is guaranteed
    b = p.map(size=PS, offset=off + PS)
    write(b, b"same alignment")
    assert read(a + PS, 14) == b"same alignment"
    assert p.count("pager_data_request") == 2
    # writes go back at the unaligned offsets too
    assert m.pager_flush_request(p.requests[0], off + PS, PS) == 1
    p.wait_for("pager_data_write")
    assert p.writes[0][0] == off + PS
    assert p.writes[0][1][:14] == b"same alignment"
    assert bytes(p.data[off + PS:off + PS + 14]) == b"same alignment"


def test_bad_arguments_fail_clearly_and_change_nothing(kernel: m.Kernel) -> None:
    me = m.task_self()
    p = Pager()
    regions = m.vm_regions(me)
    before = pager_messages(kernel)

    def code(*args: object) -> str:
        with pytest.raises(m.MachError) as e:
            m.vm_allocate_with_pager(*args)
        assert str(e.value)  # a detail says what was wrong
        return e.value.code

    assert code(me, 0, PS, True, 12345, 0) == "SEND_INVALID_RIGHT"  # not a port
    gone = m.port_allocate(me)
    m.port_deallocate(me, gone)  # a port that died
    assert code(me, 0, PS, True, gone, 0) == "SEND_INVALID_RIGHT"
    assert code(me, 0, PS, True, me, 0) == "KERN_INVALID_ARGUMENT"  # a kernel port
    assert code(me, 0, PS, True, m.host_self(), 0) == "KERN_INVALID_ARGUMENT"
    assert code(me, 0, PS, True, m.thread_self(), 0) == "KERN_INVALID_ARGUMENT"
    assert code(me, 0, 0, True, p.mo, 0) == "KERN_INVALID_ARGUMENT"  # size 0
    assert code(me, 0, -PS, True, p.mo, 0) == "KERN_INVALID_ARGUMENT"
    assert code(me, 0, PS, True, p.mo, -PS) == "KERN_INVALID_ARGUMENT"  # negative offset
    assert code(me, 0, PS, True, p.mo, -1) == "KERN_INVALID_ARGUMENT"
    assert code(me, 0, PS, True, p.mo, 1.5) == "KERN_INVALID_ARGUMENT"
    # an unaligned fixed address takes its page (GNU Mach's vm_map): page 0 is outside
    assert code(me, 123, PS, False, p.mo, 0) == "KERN_INVALID_ADDRESS"
    assert m.vm_regions(me) == regions
    assert pager_messages(kernel) == before
    assert m.port_status(me, p.mo)[1] == 0
    assert_kernel_ok()
    # and the object can still be mapped and used
    p.start()
    a = p.map()
    assert read(a, 8) == bytes(p.data[:8])


@pytest.mark.embedded_only("native vm_write writes into the pages instead of replacing the "
                           "mapping (README)")
def test_vm_write_replaces_one_mapping_only(kernel: m.Kernel) -> None:
    """5.1: mappings made by vm_allocate_with_pager involve no sharing map, so vm_write
    on one mapping replaces that mapping and is not reflected in the others; sharing
    through inheritance does reflect it."""
    me = m.task_self()
    p = Pager().start()
    a, b = p.map(), p.map()
    child = m.task_create(me, False)
    c = p.map(task=child)
    original = bytes(p.data[:PS])
    assert read(a) == read(b) == original
    m.vm_write(me, a, b"W" * PS)
    assert read(a) == b"W" * PS
    assert read(b) == original
    assert m.vm_read(child, c, PS) == original
    regions = {r.address: r for r in m.vm_regions(me)}
    assert regions[a].object_name != p.names[0]  # page 0 of a is not the object any more
    assert regions[a + PS].object_name == regions[b].object_name == p.names[0]
    # the object did not change: nothing goes back to the manager for it
    assert m.pager_clean_request(p.request, 0, 4 * PS) == 0
    # a write through memory is a change of the object, seen by every mapping
    write(b, b"through b")
    assert m.vm_read(child, c, 9) == b"through b"
    assert read(a, 9) == b"W" * 9
    # shared by inheritance: a sharing map, so vm_write is seen by the sharer ...
    m.vm_inherit(me, b, 4 * PS, m.VM_INHERIT_SHARE)
    sharer = m.task_create(me, True)
    m.vm_write(me, b + 3 * PS, b"V" * PS)
    assert m.vm_read(sharer, b + 3 * PS, 4) == b"VVVV"
    # ... but not by the other task's own mapping of the object
    assert m.vm_read(child, c + 3 * PS, 4) == bytes(p.data[3 * PS:3 * PS + 4])
    write(b + 2 * PS, b"SHARED")
    assert m.vm_read(sharer, b + 2 * PS, 6) == b"SHARED"
    assert m.vm_read(child, c + 2 * PS, 6) == b"SHARED"
    # a copy by inheritance keeps the contents it had when the task was created
    m.vm_inherit(me, b, 4 * PS, m.VM_INHERIT_COPY)
    copier = m.task_create(me, True)
    write(b + 2 * PS, b"LATER!")
    assert m.vm_read(copier, b + 2 * PS, 6) == b"SHARED"
    for t in (child, sharer, copier):
        m.task_terminate(t)


# -- Table 3-5 / 3-6 ----------------------------------------------------------------------


def test_data_request_on_first_touch_with_the_access_wanted(kernel: m.Kernel) -> None:
    p = Pager().start()
    a = p.map()
    p.wait_for("pager_init")
    quiet(10)
    assert p.count("pager_data_request") == 0  # nothing before a fault
    assert read(a, 16) == bytes(p.data[:16])
    (_, off, length, access), = p.entries("pager_data_request")
    assert (off, length, access) == (0, PS, R)
    write(a + PS, b"w")  # a write fault on a page not cached
    _, off, length, access = p.entries("pager_data_request")[1]
    assert (off, length) == (PS, PS)
    assert access & W
    write(a, b"after a read")  # provided with no lock: no more messages
    assert read(a, 12) == b"after a read"
    assert p.count("pager_data_request") == 2
    assert p.count("pager_data_unlock") == 0


def test_only_whole_pages_of_provided_data_count(kernel: m.Kernel) -> None:
    p = Pager(size=4 * PS)
    a = p.map()
    request = p.init()
    _, box0 = start_thread(read, a)
    assert p.expect("pager_data_request")[1:] == [0, PS, R]
    other = pattern(9, 2 * PS)
    # [PS/2, 5PS/2): the partial first page and the partial last page are discarded
    m.pager_data_provided(request, PS // 2, other, len(other), m.VM_PROT_NONE)
    quiet(30)
    assert not box0.get("done")  # page 0 still has no data
    # page 0 and half a page more: the half page is discarded (page 1 is cached anyway)
    m.pager_data_provided(request, 0, bytes(p.data[:PS + PS // 2]), PS + PS // 2,
                          m.VM_PROT_NONE)
    assert finished(box0)["result"] == bytes(p.data[:PS])
    # page 1 came from the unaligned call, uninvited: no request for it
    _, box1 = start_thread(read, a + PS)
    assert finished(box1)["result"] == other[PS // 2:PS // 2 + PS]
    assert m.port_status(m.task_self(), p.mo)[1] == 0
    # page 2 (half of it was in the first call) must be asked for
    _, box2 = start_thread(read, a + 2 * PS)
    assert p.expect("pager_data_request")[1:] == [2 * PS, PS, R]
    p.provide(2 * PS)
    assert finished(box2)["result"] == bytes(p.data[2 * PS:3 * PS])


def test_data_beyond_the_request_is_accepted(kernel: m.Kernel) -> None:
    p = Pager(size=6 * PS).start()
    p.extra_pages = 3
    a = p.map()
    assert read(a) == bytes(p.data[:PS])
    assert read(a, 4 * PS) == bytes(p.data[:4 * PS])
    assert p.count("pager_data_request") == 1
    assert read(a + 4 * PS) == bytes(p.data[4 * PS:5 * PS])
    assert p.count("pager_data_request") == 2


def test_lock_value_of_provided_data(kernel: m.Kernel) -> None:
    p = Pager().start()
    p.lock_value = W
    p.unlock = "ignore"
    a = p.map()
    assert read(a) == bytes(p.data[:PS])  # reading is allowed
    _, box = start_thread(write, a + 5, b"locked")
    (_, off, length, access), = p.wait_for("pager_data_unlock")
    assert (off, length) == (0, PS)
    assert access & W and not access & R
    quiet(30)
    assert not box.get("done")  # the write waits for the manager
    assert p.count("pager_data_unlock") == 1  # asked once
    m.pager_data_lock(p.request, 0, PS, m.VM_PROT_NONE)
    assert "error" not in finished(box)
    assert read(a + 5, 6) == b"locked"
    assert p.count("pager_data_request") == 1
    assert p.count("pager_data_unlock") == 1


def test_data_lock_restricts_cached_pages(kernel: m.Kernel) -> None:
    p = Pager().start()
    p.unlock = "ignore"
    a = p.map()
    write(a, b"first")
    m.pager_data_lock(p.request, 0, PS, W)  # read-only now
    assert read(a, 5) == b"first"
    _, box = start_thread(write, a, b"second")
    p.wait_for("pager_data_unlock")
    quiet(20)
    assert not box.get("done")
    m.pager_data_lock(p.request, 0, PS, m.VM_PROT_NONE)
    finished(box)
    assert read(a, 6) == b"second"
    m.pager_data_lock(p.request, 0, PS, R | W)  # no access at all
    _, box = start_thread(read, a, 6)
    unlocks = p.wait_for("pager_data_unlock", 2)
    assert unlocks[1][3] & R
    quiet(20)
    assert not box.get("done")
    m.pager_data_lock(p.request, 0, PS, W)
    assert finished(box)["result"] == b"second"
    # locks apply to cached pages only: page 1 is not cached and comes with no lock
    write(a + PS, b"page one")
    assert p.count("pager_data_unlock") == 2
    assert p.count("pager_data_request") == 2


def test_clean_writes_back_and_keeps_the_page(kernel: m.Kernel) -> None:
    p = Pager().start()
    a = p.map()
    write(a, b"dirty zero")
    assert m.pager_clean_request(p.request, 0, PS) == 1
    (_, off, count, data), = p.wait_for("pager_data_write")
    assert (off, count) == (0, PS)
    assert data[:10] == b"dirty zero" and data[10:] == bytes(pattern(1, PS)[10:])
    assert read(a, 10) == b"dirty zero"  # still cached: no new request
    assert p.count("pager_data_request") == 1
    assert m.pager_clean_request(p.request, 0, PS) == 0  # nothing changed since
    write(a, b"dirty again")  # the clean write-protected it: a change is noticed
    assert m.pager_clean_request(p.request, 0, 4 * PS) == 1
    p.wait_for("pager_data_write", 2)
    assert p.writes[1][1][:11] == b"dirty again"
    assert p.count("pager_data_request") == 1


@pytest.mark.embedded_only("takes every free frame from the embedded kernel's VM")
def test_clean_with_no_frame_for_the_copy_still_writes_back(kernel: m.Kernel) -> None:
    """A clean copies each changed page for the manager and keeps the page; with no
    frame for the copy it sends the page itself (it leaves memory: the next access asks
    the manager again) rather than leave the change unwritten."""
    p = Pager().start()
    a = p.map()
    write(a, b"dirty zero")
    res = kernel.vm.resident
    grab = res.vm_page_grab
    res.vm_page_grab = lambda privileged: None  # type: ignore[method-assign]
    try:
        assert m.pager_clean_request(p.request, 0, PS) == 1
    finally:
        res.vm_page_grab = grab  # type: ignore[method-assign]
    (_, off, count, data), = p.wait_for("pager_data_write")
    assert (off, count, data[:10]) == (0, PS, b"dirty zero")
    assert read(a, 10) == b"dirty zero"  # asked of the manager again, which has it
    assert p.count("pager_data_request") == 2


def test_flush_writes_back_and_drops_the_page(kernel: m.Kernel) -> None:
    p = Pager().start()
    a = p.map()
    write(a + PS, b"dirty one")
    assert read(a, 4) == bytes(p.data[:4])  # page 0: clean
    assert m.pager_flush_request(p.request, 0, 2 * PS) == 1
    (_, off, count, data), = p.wait_for("pager_data_write")
    assert (off, count) == (PS, PS)
    assert data[:9] == b"dirty one"
    # both pages are gone from the cache: the next access asks again
    assert read(a + PS, 9) == b"dirty one"  # the manager now has the written data
    assert read(a, 4) == bytes(p.data[:4])
    assert sorted(e[1] for e in p.entries("pager_data_request")) == [0, 0, PS, PS]
    assert p.count("pager_data_write") == 1


def test_flush_reply_comes_after_the_writes_are_queued(kernel: m.Kernel) -> None:
    me = m.task_self()
    p = Pager()
    a = p.map()
    request = p.init()
    for i in range(3):
        _, box = start_thread(write, a + i * PS, bytes([65 + i]) * 8)
        assert p.expect("pager_data_request")[1] == i * PS
        p.provide(i * PS)
        finished(box)
    assert m.pager_flush_request(request, 0, 4 * PS) == 3
    assert m.port_status(me, p.mo)[1] == 1  # already queued when the call returned
    offset, data, count = p.expect("pager_data_write")  # adjacent pages: one run
    assert (offset, data.size, count) == (0, 3 * PS, 3 * PS)
    for i in range(3):
        assert p.data[i * PS:i * PS + 8] == bytes([65 + i]) * 8


def test_a_flush_writes_adjacent_dirty_pages_back_as_runs(kernel: m.Kernel) -> None:
    """One pager_data_write per run of adjacent dirty pages, not one per page (the
    paper's pager_data_write takes a range); clean pages and holes split runs."""
    p = Pager(size=8 * PS).start()
    a = p.map()
    assert read(a, 8 * PS) == bytes(p.data)
    for i in (0, 1, 2, 4, 6, 7):
        write(a + i * PS + 100, bytes([70 + i]) * 50)
    assert m.pager_flush_request(p.request, 0, 8 * PS) == 6
    p.wait_for("pager_data_write", 3)
    quiet(20)
    assert sorted((off, len(raw)) for off, raw in p.writes) == [
        (0, 3 * PS), (4 * PS, PS), (6 * PS, 2 * PS)]
    for i in (0, 1, 2, 4, 6, 7):
        assert p.data[i * PS + 100:i * PS + 150] == bytes([70 + i]) * 50
    assert read(a, 8 * PS) == bytes(p.data)  # asked again: the written data


def test_a_long_run_is_split_and_every_page_arrives(kernel: m.Kernel) -> None:
    """A run longer than WRITE_RUN_PAGES goes in several messages; no page is left out
    where one ends and the next begins."""
    n = WRITE_RUN_PAGES + 44
    p = Pager(size=n * PS).start()
    a = p.map()
    for i in range(n):
        write(a + i * PS, i.to_bytes(4, "little") * 4)
    assert m.pager_flush_request(p.request, 0, n * PS) == n
    p.wait_for("pager_data_write", 2)
    assert sorted((off, len(raw)) for off, raw in p.writes) == [
        (0, WRITE_RUN_PAGES * PS), (WRITE_RUN_PAGES * PS, 44 * PS)]
    for i in range(n):
        assert p.data[i * PS:i * PS + 16] == i.to_bytes(4, "little") * 4, i


def test_data_error_for_one_page_of_a_run_keeps_that_page(kernel: m.Kernel) -> None:
    """pager_data_error for one page of a written-back run: that page's data stays with
    the kernel; the rest of the run is the manager's."""
    p = Pager().start()
    p.hold_writes = True
    p.store_writes = False  # the manager keeps nothing it is sent
    a = p.map()
    for i in range(3):
        write(a + i * PS, bytes([80 + i]) * 8)
    assert m.pager_flush_request(p.request, 0, 3 * PS) == 3
    (_, off, count, _), = p.wait_for("pager_data_write")
    assert (off, count) == (0, 3 * PS)
    m.pager_data_error(p.request, PS, PS, m.MachError("KERN_FAILURE").value)
    assert read(a + PS, 8) == bytes([81]) * 8  # from the kernel: the manager never had it
    for region in p.held:
        m.vm_deallocate(m.task_self(), region.address, region.size)
    wait_until(lambda: kernel.vm_stat()["pageouts_in_flight"] == 0)
    assert read(a + PS, 8) == bytes([81]) * 8
    assert read(a, 8) == bytes(p.data[:8])  # the manager dropped page 0: its own data


def test_data_unavailable_means_zero_fill(kernel: m.Kernel) -> None:
    p = Pager().start()
    p.mode = "unavailable"
    a = p.map()
    zero_fills = kernel.vm_stat()["zero_fill_count"]
    assert read(a, 2 * PS) == bytes(2 * PS)
    assert kernel.vm_stat()["zero_fill_count"] >= zero_fills + 2
    write(a, b"now data")
    assert read(a, 8) == b"now data"
    assert m.pager_flush_request(p.request, 0, PS) == 1
    p.wait_for("pager_data_write")
    assert p.writes[0][1][:8] == b"now data"


def test_data_error_fails_the_waiting_access(kernel: m.Kernel) -> None:
    p = Pager().start()
    p.mode = "error"
    a = p.map()
    _, box = start_thread(read, a, 4)
    assert finished(box)["error"] == "KERN_MEMORY_ERROR"
    with pytest.raises(m.KernError) as e:
        write(a + PS, b"x")
    assert e.value.code == "KERN_MEMORY_ERROR"
    assert_kernel_ok()
    # the failed page is not kept: a later access asks again
    p.mode = "provide"
    assert read(a, 4) == bytes(p.data[:4])
    assert [e[1] for e in p.entries("pager_data_request")] == [0, PS, 0]


def test_bad_manager_calls_fail_and_change_nothing(kernel: m.Kernel) -> None:
    p = Pager()
    a = p.map()
    request = p.init()
    bad = [(m.pager_data_provided, (request, -PS, b"x" * PS, PS, 0)),
           (m.pager_data_provided, (request, 0, b"x" * PS, PS, 8)),  # not a protection
           (m.pager_data_lock, (request, 0, PS, 0x63)),
           (m.pager_data_unavailable, (request, 0, -5)),
           (m.pager_flush_request, (request, 0, -PS)),
           (m.pager_clean_request, (request, -1, PS)),
           (m.pager_data_lock, (request, -PS, PS, 0))]
    for call, args in bad:
        with pytest.raises(m.MachError) as e:
            call(*args)
        assert e.value.code == "KERN_INVALID_ARGUMENT", (call.__name__, e.value)
    assert m.port_status(m.task_self(), p.mo)[1] == 0
    # nothing was cached by those calls: the first touch asks the manager
    p.start()
    assert read(a, 4) == bytes(p.data[:4])
    assert p.count("pager_data_request") == 1


@pytest.mark.parametrize("how", ["flush", "clean"])
def test_data_error_for_written_back_data_keeps_it_in_the_kernel(kernel: m.Kernel,
                                                                  how: str) -> None:
    """pager_data_error on data the manager was sent and cannot store: "data it could
    not store stays with the kernel" (mach_defs: pager_data_error)."""
    p = Pager().start()
    p.hold_writes = True
    p.store_writes = False  # the manager really has nowhere to put it
    a = p.map()
    write(a, b"precious")
    call = m.pager_flush_request if how == "flush" else m.pager_clean_request
    assert call(p.request, 0, PS) == 1
    p.wait_for("pager_data_write")
    assert kernel.vm_stat()["pageouts_in_flight"] == 1
    m.pager_data_error(p.request, 0, PS, m.MachError("KERN_FAILURE").value)
    assert read(a, 8) == b"precious"  # from the kernel: the manager never had it
    for region in p.held:
        m.vm_deallocate(m.task_self(), region.address, region.size)
    wait_until(lambda: kernel.vm_stat()["pageouts_in_flight"] == 0)
    assert read(a, 8) == b"precious"


# -- caching and termination ----------------------------------------------------------------


def test_without_pager_cache_the_kernel_lets_go_after_the_last_unmap(kernel: m.Kernel) -> None:
    me = m.task_self()
    p = Pager().start()
    a = p.map()
    b = p.map()
    assert read(a, 4) == bytes(p.data[:4])
    request, name = p.requests[0], p.names[0]
    objects = kernel.vm_stat()["objects"]
    m.vm_deallocate(me, a, 4 * PS)
    quiet(20)
    assert (m.NOTIFY_PORT_DELETED, request) not in notifications()  # b still maps it
    m.vm_deallocate(me, b, 4 * PS)
    seen = wait_notification(m.NOTIFY_PORT_DELETED, request)
    if (m.NOTIFY_PORT_DELETED, name) not in seen:
        wait_notification(m.NOTIFY_PORT_DELETED, name)
    assert kernel.vm_stat()["objects"] == objects - 1
    assert kernel.vm_stat()["cached_objects"] == 0
    # mapping it again starts afresh: pager_init with new ports, and new data requests
    c = p.map()
    assert read(c, 4) == bytes(p.data[:4])
    assert p.count("pager_init") == 2
    assert p.requests[1] != request
    assert p.count("pager_data_request") == 2


def test_pager_cache_keeps_the_object_after_the_last_unmap(kernel: m.Kernel) -> None:
    me = m.task_self()
    p = Pager().start()
    a = p.map()
    m.pager_cache(p.request, True)
    write(a + PS, b"changed while mapped")
    assert read(a, 4 * PS)[:4] == bytes(p.data[:4])
    m.vm_deallocate(me, a, 4 * PS)
    quiet(30)
    assert notifications() == []
    assert kernel.vm_stat()["cached_objects"] == 1
    before = pager_messages(kernel)
    b = p.map()
    data = read(b, 4 * PS)
    assert pager_messages(kernel) == before  # section 9: no messages at all
    assert data[PS:PS + 20] == b"changed while mapped"
    assert p.count("pager_init") == 1
    assert p.count("pager_data_write") == 0  # the change stayed in the kernel's cache
    # withdrawing the permission while mapped changes nothing yet ...
    m.pager_cache(p.request, False)
    quiet(20)
    assert notifications() == []
    # ... but the last unmap now releases the object, writing the change back first
    m.vm_deallocate(me, b, 4 * PS)
    wait_notification(m.NOTIFY_PORT_DELETED, p.requests[0])
    (_, off, _, data), = p.wait_for("pager_data_write")
    assert off == PS and data[:20] == b"changed while mapped"
    assert kernel.vm_stat()["cached_objects"] == 0


def test_pager_cache_false_releases_a_cached_object(kernel: m.Kernel) -> None:
    me = m.task_self()
    p = Pager().start()
    a = p.map()
    m.pager_cache(p.request, True)
    write(a, b"kept")
    m.vm_deallocate(me, a, 4 * PS)
    quiet(20)
    assert kernel.vm_stat()["cached_objects"] == 1
    m.pager_cache(p.request, False)
    wait_notification(m.NOTIFY_PORT_DELETED, p.requests[0])
    assert kernel.vm_stat()["cached_objects"] == 0
    p.wait_for("pager_data_write")
    assert p.writes[0][1][:4] == b"kept"
    c = p.map()
    assert read(c, 4) == b"kept"  # from the manager, after a new pager_init
    assert p.count("pager_init") == 2


@pytest.mark.embedded_only("a thread of another task shares a Python dict with the test")
def test_the_name_port_grants_no_access(kernel: m.Kernel) -> None:
    me = m.task_self()
    p = Pager().start()
    a = p.map()
    assert read(a, 4) == bytes(p.data[:4])
    name = p.names[0]
    (region,) = [r for r in m.vm_regions(me) if r.address == a]
    assert region.object_name == name

    def try_name_port() -> dict[str, str]:
        task = m.task_self()
        (r,) = [r for r in m.vm_regions(task) if r.object_name]
        codes = {}
        calls = {"provided": lambda: m.pager_data_provided(r.object_name, 0, b"x" * PS, PS, 0),
                 "unavailable": lambda: m.pager_data_unavailable(r.object_name, 0, PS),
                 "lock": lambda: m.pager_data_lock(r.object_name, 0, PS, 0),
                 "flush": lambda: m.pager_flush_request(r.object_name, 0, PS),
                 "clean": lambda: m.pager_clean_request(r.object_name, 0, PS),
                 "cache": lambda: m.pager_cache(r.object_name, True),
                 "error": lambda: m.pager_data_error(r.object_name, 0, PS, 5),
                 "map": lambda: m.vm_allocate_with_pager(task, 0, PS, True, r.object_name, 0)}
        for what, call in calls.items():
            try:
                call()
                codes[what] = "succeeded"
            except m.MachError as e:
                codes[what] = e.code
        # a raw data request sent to the name port, as if it were the memory object
        reply = m.port_allocate(task)
        rid = memory_object_defs.by_name["pager_data_request"].id
        m.msg_send(Message(remote_port=r.object_name, local_port=reply, id=rid,
                           items=[Port(r.object_name, m.COPY_SEND), Int(0), Int(PS), Int(R)]),
                   m.SEND_TIMEOUT, 1000)
        answer = recv(reply, 1000)
        codes["raw request"] = str(answer.items[0].value)  # type: ignore[union-attr]
        return codes

    # a client in another task learns the name port from vm_regions ...
    child = m.task_create(me, False)
    p.map(task=child)
    box = finished(run_in_task(child, try_name_port))
    codes = box["result"]
    raw = int(codes.pop("raw request"))
    assert raw == m.MachError("MIG_BAD_ID").value
    assert set(codes.values()) == {"KERN_INVALID_ARGUMENT"}, codes
    # ... and so does the manager itself
    codes = try_name_port()
    codes.pop("raw request")
    assert set(codes.values()) == {"KERN_INVALID_ARGUMENT"}, codes
    # nothing happened to the object
    quiet(20)
    assert read(a, 4) == bytes(p.data[:4])
    assert p.count("pager_data_request") == 1
    assert p.count("pager_data_write") == 0
    m.task_terminate(child)
    assert_kernel_ok()


def test_dirty_pages_go_back_on_vm_deallocate(kernel: m.Kernel) -> None:
    me = m.task_self()
    p = Pager().start()
    a = p.map()
    write(a, b"zero")
    write(a + 2 * PS, b"two")
    assert read(a + 3 * PS, 5) == bytes(p.data[3 * PS:3 * PS + 5])  # clean
    m.vm_deallocate(me, a, 4 * PS)
    wait_notification(m.NOTIFY_PORT_DELETED, p.requests[0])
    p.wait_for("pager_data_write", 2)  # queued before the ports died; served since
    quiet(20)
    writes = sorted(p.writes)
    assert [off for off, _ in writes] == [0, 2 * PS]  # dirty pages only
    assert writes[0][1][:4] == b"zero" and writes[1][1][:3] == b"two"
    assert p.data[:4] == b"zero"


@pytest.mark.embedded_only("the task's work runs as a closure that captures the test's objects")
def test_dirty_pages_go_back_when_the_task_ends(kernel: m.Kernel) -> None:
    me = m.task_self()
    p = Pager().start()
    child = m.task_create(me, False)
    c = p.map(task=child)
    box = finished(run_in_task(child, write, c + PS, b"written by a task that ends"))
    assert "error" not in box
    m.task_terminate(child)
    wait_notification(m.NOTIFY_PORT_DELETED, p.requests[0])
    (_, off, _, data), = p.wait_for("pager_data_write")
    assert off == PS and data.startswith(b"written by a task that ends")


# -- the DataManager base class ---------------------------------------------------------------


class Store(m.DataManager):
    """A pager in a few lines: bytes per (object, offset), zero where none."""

    threads = 3

    def __init__(self) -> None:
        super().__init__()
        self.pages: dict[tuple[int, int], bytes] = {}
        self.terminated: list[int] = []

    def read(self, memory_object: int, offset: int, length: int, access: int) -> bytes | None:
        return self.pages.get((memory_object, offset))

    def write(self, memory_object: int, offset: int, data: bytes) -> None:
        self.pages[(memory_object, offset)] = data

    def pager_terminate(self, memory_object: int, request: int) -> None:
        self.terminated.append(memory_object)


@pytest.mark.embedded_only("the manager object, with its locks, is shared with the test")
def test_data_manager_in_a_few_lines(kernel: m.Kernel) -> None:
    me = m.task_self()
    store = Store()
    handle, (obj,) = spawn_manager(kernel, store, name="store")
    a = m.vm_allocate_with_pager(me, 0, 4 * PS, True, obj, 0)
    assert read(a, 4 * PS) == bytes(4 * PS)  # read() had nothing: zero fill
    write(a + PS, b"kept by the store")
    m.vm_deallocate(me, a, 4 * PS)
    wait_until(lambda: store.terminated)
    (mo,) = {key[0] for key in store.pages}  # the manager's name for the object
    assert sorted(store.pages) == [(mo, PS)]  # the one page written back
    assert store.pages[(mo, PS)][:17] == b"kept by the store"
    b = m.vm_allocate_with_pager(me, 0, 4 * PS, True, obj, 0)
    assert read(b + PS, 17) == b"kept by the store"
    m.task_terminate(handle.port)
    assert_kernel_ok()


def _map_manager(kernel: m.Kernel, dm: m.DataManager, name: str, pages: int
                 ) -> tuple[m.TaskHandle, int]:
    """Start `dm` in a new task and map `pages` pages of its object: (handle, address)."""
    handle, (obj,) = spawn_manager(kernel, dm, name=name)
    return handle, m.vm_allocate_with_pager(m.task_self(), 0, pages * PS, True, obj, 0)


class Rendezvous(m.DataManager):
    """read() of page 0 and of page 1 each wait until both are being served."""

    threads = 2

    def __init__(self) -> None:
        super().__init__()
        self.inside: set[int] = set()
        self.both = False

    def read(self, memory_object: int, offset: int, length: int, access: int) -> bytes | None:
        self.inside.add(offset)
        try:
            wait_until(lambda: len(self.inside) >= 2, 5000)
            self.both = True
        except AssertionError:
            pass  # handlers ran one at a time: give the data anyway, the test will fail
        return bytes([offset // PS + 1]) * length


@pytest.mark.embedded_only("the manager object, with its locks, is shared with the test")
def test_data_manager_handlers_run_concurrently(kernel: m.Kernel) -> None:
    dm = Rendezvous()
    handle, a = _map_manager(kernel, dm, "rendezvous", 2)
    _, box0 = start_thread(read, a, 4)
    _, box1 = start_thread(read, a + PS, 4)
    assert finished(box0, 10_000)["result"] == b"\x01" * 4
    assert finished(box1, 10_000)["result"] == b"\x02" * 4
    assert dm.both, "the two pager_data_request handlers never ran at the same time"
    m.task_terminate(handle.port)


# -- seeing it: vmmap and the trace ----------------------------------------------------------


@pytest.mark.embedded_only("reads the embedded kernel's trace log")
def test_vmmap_and_trace_show_objects_managers_and_messages(kernel: m.Kernel) -> None:
    me = m.task_self()
    store = Store()
    store.threads = 1
    handle, a = _map_manager(kernel, store, "librarian", 2)
    anon = m.vm_allocate(me, 0, PS, True)
    write(a, b"x")
    rows = {r.start: r for r in kernel.vmmap("bootstrap")}
    ext = rows[a]
    match = re.fullmatch(r"obj(\d+) external \(manager: librarian\)", ext.object)
    assert match, ext.object
    serial = match.group(1)
    assert (ext.end - ext.start, ext.resident) == (2 * PS, 1)
    assert "manager" not in rows[anon].object
    m.vm_deallocate(me, a, 2 * PS)
    wait_until(lambda: store.terminated)
    lines = kernel.trace_log
    want = [rf"kernel -> librarian: pager_init obj{serial}\b",
            rf"kernel -> librarian: pager_data_request obj{serial} 0x0 0x1000 0x[23]\b",
            rf"librarian -> kernel: pager_data_unavailable obj{serial} 0x0 0x1000\b",
            rf"kernel -> librarian: pager_data_write obj{serial} 0x0 0x1000\b"]
    found = []
    for pattern_ in want:
        hits = [i for i, line in enumerate(lines) if re.search(pattern_, line)]
        assert hits, f"no trace line matches {pattern_!r}"
        found.append(hits[0])
    assert found == sorted(found)  # in protocol order
    times = [float(lines[i].split()[0]) for i in found]
    assert times == sorted(times) and times[0] >= 0
    m.task_terminate(handle.port)


def test_termination_writes_back_only_the_dirty_pages(kernel: m.Kernel,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """After the last unmap (no pager_cache) the object terminates: its dirty pages go
    back to the manager, and its clean ones are freed with the rest in one step, not
    taken from memory one at a time (on the native backend that copied each page out of
    its memfd before punching it)."""
    me = m.task_self()
    p = Pager(size=8 * PS).start()
    a = p.map()
    assert read(a, 8 * PS) == bytes(p.data)  # every page resident and clean
    write(a + 2 * PS, b"two")
    write(a + 5 * PS, b"five")
    taken: list[int] = []
    phys = getattr(getattr(kernel, "vm", None), "phys", None)
    if phys is not None:  # embedded: count the pages taken from memory one by one
        real = phys.pmap_page_protect
        monkeypatch.setattr(phys, "pmap_page_protect",
                            lambda frame, prot: (taken.append(frame), real(frame, prot)))
    m.vm_deallocate(me, a, 8 * PS)
    wait_notification(m.NOTIFY_PORT_DELETED, p.requests[0])
    wait_until(lambda: len(p.writes) >= 2)
    quiet(20)  # (and no more)
    writes = sorted((off, bytes(data[:5])) for off, data in p.writes)
    assert writes == [(2 * PS, b"two" + bytes(p.data[2 * PS + 3:2 * PS + 5])),
                      (5 * PS, b"five" + bytes(p.data[5 * PS + 4:5 * PS + 5]))]
    assert len(taken) <= 2  # the dirty pages at most; never the six clean ones


def test_a_data_manager_keeps_nothing_for_a_pager_init_whose_request_port_died(
        kernel: m.Kernel) -> None:
    """A kernel that let go of the object before its pager_init arrived: the request
    port came as PORT_NULL, and no notification will ever name it, so a DataManager
    records nothing (it would otherwise keep the object under request 0 forever)."""
    from pymach.pagers.data_manager import DataManager, _Adapter

    dm = DataManager()
    me = m.task_self()
    mo, name = m.port_allocate(me), m.port_allocate(me)
    _Adapter(dm).pager_init(mo, 0, name)
    assert dm.uses == {} and not dm._by_request
    assert name not in m.port_names(me)[0]  # the name port it came with is given up
    live = m.port_allocate(me)
    _Adapter(dm).pager_init(mo, live, 0)
    assert dm.uses == {mo: {live: 0}}


class _TakenMeanwhile(deque):  # type: ignore[type-arg]
    """A queue that another thread emptied between a look at it and a pop: it looks
    non-empty, and has nothing."""

    def __bool__(self) -> bool:
        return True

    def __len__(self) -> int:
        return 1


def test_a_kept_message_another_thread_took_meanwhile_is_no_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A data manager's threads share the messages kept for later; the last one taken
    by another thread between a look and a pop raised IndexError and ended the thread
    (a multi-threaded manager under write-back lost its threads one by one, then died,
    and the faults on its objects failed). The thread receives the next message
    instead."""
    from pymach.pagers import data_manager

    dm = m.DataManager()
    dm._deferred = _TakenMeanwhile()
    monkeypatch.setattr(data_manager.mach, "msg_receive", lambda *args: "received")
    assert dm._next_message() == "received"
