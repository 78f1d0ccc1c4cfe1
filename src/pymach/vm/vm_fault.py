"""The page fault handler, hub of the VM system (paper 5.5).

`vm_fault` runs the four steps of the paper for one page of one task:

1. validity and protection: `vm_map_lookup` finds the object and offset and checks the
   access (a write to a copy-on-write region makes its shadow object there);
2. page lookup: `vm_fault_page` walks the shadow chain through the resident-page hash;
   a page that is not resident is asked of the object's data manager
   (pager_data_request), taken back from a pageout still in flight, made from data the
   kernel holds, or zero-filled at the bottom of the chain;
3. copy-on-write: a write to a page found below the first object copies it up into the
   first object; a write to a page of an object that has a copy object first pushes the
   old contents into the copy; a read gets no write access in either case;
4. hardware validation: `pmap_enter` of the page with the access now allowed.

Every wait (for a busy page, for data from a manager, for a free frame) releases the
kernel lock, so the fault then starts again from step 1: the map may have changed.
Steps 2 and 3 are machine-independent and also serve the kernel's own accesses
(`vm_fault_page` for vm_read, vm_write and data in transit).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pymach.errors import MachError
from pymach.include.vm_param import PLACED_MAX, VM_PROT_READ, VM_PROT_WRITE, trunc_page
from pymach.kern.sched_prim import WaitQueue, deadline_after, thread_block
from pymach.vm.vm_map import FaultPolicy, vm_map_lookup
from pymach.vm.vm_object import holding_offset, vm_object_deallocate

if TYPE_CHECKING:
    from pymach.kern.thread import Thread
    from pymach.vm.vm_init import VmSystem
    from pymach.vm.vm_map import MapLookup, VmMap
    from pymach.vm.vm_object import VmObject
    from pymach.vm.vm_page import VmPage


class Retry(Exception):
    """The fault waited (the kernel lock was released): start again from step 1."""


def vm_fault(thread: Thread, vmap: VmMap, va: int, access: int) -> None:
    """Resolve a fault by `thread` at `va` for `access` and validate the mapping.

    Raises KERN_INVALID_ADDRESS, KERN_PROTECTION_FAILURE, KERN_MEMORY_ERROR (the data
    manager failed) or KERN_RESOURCE_SHORTAGE (no memory and no backing store).
    """
    vm = vmap.vm
    vm.resident.stats.faults += 1
    page_va = trunc_page(va, vm.page_size)
    while True:
        look = vm_map_lookup(vmap, page_va, access)
        if _machine_zero_fill(vmap, look):
            return  # the hardware fills the page as the thread touches it again
        try:
            page, prot = vm_fault_page(thread, look.object, look.offset, access, look.prot,
                                       look.single_use, look.policy,
                                       map_first=vm.phys.maps_objects)
        except Retry:
            continue
        assert vmap.pmap is not None
        if vm.phys.dirty_by_fault and not access & VM_PROT_WRITE:
            prot &= ~VM_PROT_WRITE  # no modify bit: the first write must fault
        if not access & VM_PROT_WRITE:  # first: entering the page itself wakes the
            _fault_around(vmap, look, page_va, prot, vm.phys.maps_objects)  # thread,
            # which then finds the pages after it mapped rather than faulting on them
        vmap.pmap.pmap_enter(page_va, page.frame, prot)  # step 4: hardware validation
        if not page.busy:
            vm.resident.vm_page_activate(page)
        return


def _machine_zero_fill(vmap: VmMap, look: MapLookup) -> bool:
    """The first fault of fresh zero-fill memory that only this mapping sees, readable
    and writable: let the machine zero-fill the object's pages itself from now on
    (vm_page.py, "Zero fill by the machine"). True if it does."""
    obj, entry = look.object, look.entry
    if (not obj.internal or obj.memq or obj.lazy_frames is not None or obj.ref_count != 1
            or obj.shadow is not None or obj.copy is not None or obj.pager is not None
            or obj.data_source is not None or obj.pending or obj.existence
            or obj.holding_for is not None or look.holder is not vmap or entry.needs_copy
            or entry.protection != VM_PROT_READ | VM_PROT_WRITE):
        return False
    vm = vmap.vm
    return vm.resident.lazy_begin(obj, vm.free_target)


FAULT_AROUND_MIN = 16  # pages a read fault may map beyond the faulting one, at least
FAULT_AROUND_MAX = 256  # ... and at most, for a reader that goes on in order


def _fault_around(vmap: VmMap, look: MapLookup, page_va: int, prot: int,
                  copy_up: bool) -> None:
    """Map the resident pages that follow a read fault in the same entry, read only (a
    write still faults), as Linux maps page-cache pages around a fault: reading a region
    a pager filled in clusters takes one fault per cluster, not per page. The count
    doubles (up to FAULT_AROUND_MAX, or the host's read-ahead if larger: the pages
    one request brings are mapped by the fault that waited for them) while each fault
    comes right after the pages the last one mapped. A page may be in an object below
    the first (a copy-on-write copy of a manager's object): what a read fault there
    would map. With `copy_up` (the machine maps only a region's first object:
    `maps_objects`) such pages are copied up as the fault would, in one write, and only
    while frames are plentiful."""
    if look.holder is not vmap or vmap.pmap is None or not look.single_use:
        return  # through a sharing map: keep it simple, fault page by page
    vm, pmap = vmap.vm, vmap.pmap
    ps = vm.page_size
    count = max(vm.pager_cluster_pages, FAULT_AROUND_MIN)
    if page_va == vmap.around_end:
        count = max(count, min(2 * vmap.around, max(FAULT_AROUND_MAX, vm.read_ahead_pages)))
    pages, obj, memq = [], look.object, look.object._memq
    last = look.offset + min(count + 1, (look.entry.end - page_va) // ps) * ps
    if obj.extents and look.offset + ps not in memq:  # (what a request brought)
        frames = vm.resident.extent_frames(obj, look.offset + ps, last)
        if frames:
            vmap.around, vmap.around_end = count, page_va + (len(frames) + 1) * ps
            pmap.pmap_enter_around(page_va + ps, frames, prot & ~VM_PROT_WRITE)
            return
    for off in range(look.offset + ps, last, ps):
        page = memq.get(off)  # (the common case, in the first object, at once)
        if page is None or page.busy or page.absent or page.error or page.page_lock:
            page = resident_page(obj, off)
            if page is None:
                break
        pages.append(page)
    if copy_up:
        pages = _copy_up_run(look.object, look.offset + ps, pages)
    vmap.around, vmap.around_end = count, page_va + (len(pages) + 1) * ps
    pmap.pmap_enter_around(page_va + ps, [p.frame for p in pages], prot & ~VM_PROT_WRITE)


def _copy_up_run(first_object: VmObject, offset: int, pages: list[VmPage]) -> list[VmPage]:
    """_copy_up for fault-around of pages found for `first_object` from `offset` on:
    those below it get a frame of their own in it, as long as frames are free above the
    pageout target (never waits): made in one step (vm_page_grab_run), their data read
    a run at a time and written with one backend call. The pages, as far as it got."""
    vm = first_object.vm
    ps, room, end = vm.page_size, vm.resident.free_count() - vm.free_target, len(pages)
    picks: list[int] = []  # the indices of the pages to copy up
    for i, src in enumerate(pages):
        if src.object is not first_object:
            if len(picks) >= room:
                end = i
                break
            picks.append(i)
    made = vm.resident.vm_page_grab_run(first_object, [offset + i * ps for i in picks],
                                        privileged=False) if picks else []
    if len(made) < len(picks):
        end = picks[len(made)]
    out = pages[:end]
    if made:
        data = memoryview(bytearray(len(made) * ps))
        vm.phys.phys_read_into([pages[i].frame for i in picks[:len(made)]], data)
        vm.phys.phys_write_run([page.frame for page in made], data)
    for i, page in zip(picks[:len(made)], made, strict=True):
        page.dirty = True
        out[i] = page
    vm.resident.stats.cow_faults += len(made)
    return out


def resident_page(obj: VmObject, off: int) -> VmPage | None:
    """The page a read fault of `obj` at `off` would find at once, with no wait and no
    change to any object: resident, settled and unlocked, in `obj` or an object below
    it that nothing above it covers; None otherwise (the fault must take its course:
    vm_fault_page). A shortcut for runs of pages (fault-around, the kernel's reads)."""
    while True:
        page = obj.vm.resident.page_at(obj, off)
        if page is None and obj.lazy_frames is not None:
            return None  # (the machine may have made it: vm_page_lookup knows)
        if page is not None:
            if page.busy or page.absent or page.error or page.page_lock:
                return None
            return page
        if off in obj.pending or _pager_has(obj, off) or obj.shadow is None \
                or (obj.data_source is not None and off not in obj.existence):
            return None
        obj, off = obj.shadow, off + obj.shadow_offset


def vm_fault_page(thread: Thread, first_object: VmObject, first_offset: int, access: int,
                  prot: int, single_use: bool = True, policy: FaultPolicy | None = None,
                  map_first: bool = False) -> tuple[VmPage, int]:
    """Steps 2 and 3: a resident page holding the data of `first_object` at
    `first_offset`, ready for `access`, and the protection it may be mapped with.
    `policy` (the mapping's, else the host's) bounds waits for a data manager. With
    `map_first` (the machine maps only a region's first object: `maps_objects`) a page found
    below the first object is copied up even for a read. Raises Retry after any wait."""
    policy = policy or first_object.vm.fault_policy
    page, obj = _find_page(thread, first_object, first_offset, policy, access)
    needed = access if obj is first_object else VM_PROT_READ  # a copy-up only reads it
    if needed & page.page_lock:
        from pymach.vm.memory_object import request_unlock

        request_unlock(thread, page, needed, policy)  # waits for pager_data_lock: Retry
    if obj is not first_object:
        if access & VM_PROT_WRITE or map_first:
            page = _copy_up(thread, page, first_object, first_offset, single_use)
            obj = first_object
        else:
            prot &= ~VM_PROT_WRITE
    elif first_object.copy is not None:
        if access & VM_PROT_WRITE:
            _push_to_copy(thread, page, first_object, first_offset)
        elif not _copy_has(first_object.copy, first_offset):
            prot &= ~VM_PROT_WRITE
    return page, prot & ~page.page_lock


# -- step 2: page lookup --------------------------------------------------------------------

def _find_page(thread: Thread, first_object: VmObject, first_offset: int,
               policy: FaultPolicy, access: int = VM_PROT_READ) -> tuple[VmPage, VmObject]:
    """The page with the data, and the object of the shadow chain it is in."""
    vm = first_object.vm
    obj, off = first_object, first_offset
    while True:
        page = vm.resident.vm_page_lookup(obj, off)
        if page is not None:
            _check_ready(thread, page, policy)
            return page, obj
        page = _fill_from_kernel(thread, obj, off)
        if page is not None:
            return page, obj
        if _pager_has(obj, off):
            _request_from_pager(thread, obj, off, policy, access)  # Retry once it waited
        if obj.shadow is None:
            return _zero_fill(thread, first_object, first_offset), first_object
        obj, off = obj.shadow, off + obj.shadow_offset


def _check_ready(thread: Thread, page: VmPage, policy: FaultPolicy) -> None:
    """Wait for a busy page; fail on a page its data manager reported an error for (the
    page is dropped, so a later access asks the manager again). A page whose data
    another fault asked the manager for is waited for under the same rules as asking:
    the mapping's timeout, and the self-backing check."""
    from pymach.vm.memory_object import check_not_self_backed

    obj = page.object
    assert obj is not None
    if page.busy and page.absent:
        check_not_self_backed(thread, obj)
        if not _wait(thread, obj.vm, obj.page_waitq, obj, policy.timeout_ms,
                     raise_retry=False):
            _timed_out(obj, page.offset, policy)
        raise Retry
    if page.busy:
        _wait(thread, obj.vm, obj.page_waitq, obj)
    if page.error:
        reason = page.error
        obj.vm.resident.vm_page_free(page)
        raise MachError("KERN_MEMORY_ERROR", reason)


def _fill_from_kernel(thread: Thread, obj: VmObject, off: int) -> VmPage | None:
    """A page made from data the kernel still holds: a pageout in flight (its holding
    object, unless a flush handed it to the manager), or data given to the kernel as
    bytes. None if neither applies."""
    vm = obj.vm
    holding = obj.pending.get(off)
    if holding is not None and holding.refill:
        src, _ = vm_fault_page(thread, holding, holding_offset(holding, off), VM_PROT_READ,
                               VM_PROT_READ)
        vm.resident.vm_page_wire(src)  # not evicted while we may wait for a frame
        try:
            page = _alloc(thread, obj, off)
        finally:
            vm.resident.vm_page_unwire(src)
        vm.phys.pmap_copy_page(src.frame, page.frame)
        page.dirty = True  # the pager may not have stored it yet
        return page
    if obj.data_source is not None and off not in obj.existence and off < obj.size:
        page = _alloc(thread, obj, off)
        chunk = obj.data_source[off:off + vm.page_size]
        vm.phys.pmap_zero_page(page.frame)
        vm.phys.phys_write(page.frame, chunk)
        return page
    return None


def _pager_has(obj: VmObject, off: int) -> bool:
    """True if the object's data manager must be asked for this page."""
    if obj.pager is None:
        return False
    return off in obj.existence if obj.internal else 0 <= off < obj.size


def _request_from_pager(thread: Thread, obj: VmObject, off: int, policy: FaultPolicy,
                        access: int) -> None:
    """Make an absent page, ask the manager for it with the access the fault needs
    (pager_data_request), and wait for the data (Retry).

    If the manager does not answer within the policy's timeout, the page becomes
    zero-filled memory or an error (6.2.1). A manager faulting on its own object with no
    other thread to serve the request fails at once instead of deadlocking (6.1).
    """
    from pymach.vm.memory_object import check_not_self_backed, pager_data_request

    vm = obj.vm
    if obj.pager is None or obj.pager.dead:
        raise MachError("KERN_MEMORY_ERROR", f"the data manager of object {obj.serial} "
                        f"is gone")
    check_not_self_backed(thread, obj)
    if obj.asked_over(off) and obj.pager.receiver is not thread.task and _wait(
            thread, vm, obj.page_waitq, obj, policy.timeout_ms, raise_retry=False):
        raise Retry  # an outstanding request covers it: its answer comes first (after
        # the policy's timeout, ask anyway; the manager's own threads never wait on it:
        # the one serving it may be the one faulting)
    page = _alloc(thread, obj, off)
    page.busy = page.absent = True
    vm.resident.vm_page_wire(page)
    pager_data_request(obj, off, _cluster(obj, off), access or VM_PROT_READ)
    if not _wait(thread, vm, obj.page_waitq, obj, policy.timeout_ms, raise_retry=False):
        _timed_out(obj, off, policy)
    raise Retry


def _cluster(obj: VmObject, off: int) -> int:
    """How many bytes to ask a manager for at `off`: the page, and the pages after it
    that the object lacks (for an internal object, that its default pager holds: in
    `existence`), up to the request's window (`_read_ahead_window`), the frames
    read-ahead may take (VmSystem.read_ahead_room) and, where managers answer in place,
    what one answer in place may cover (PLACED_MAX). Only the faulting page waits for
    the data; the others are installed if they come and there is room (so a manager
    may answer just the first page)."""
    vm = obj.vm
    ps, memq, pending = vm.page_size, obj._memq, obj.pending
    limit = min(_read_ahead_window(obj, off), vm.read_ahead_room(),
                -(-(obj.size - off) // ps))
    extent = vm.resident.extent_after(obj, off) if obj.extents else None
    if extent is not None:  # (resident pages: never asked for again)
        limit = min(limit, (extent - off) // ps)
    existence = obj.existence if obj.internal else None
    if vm.phys.object_windows:  # an answer in place covers PLACED_MAX at most
        limit = min(limit, max(PLACED_MAX // ps, 1))
    if obj.window_asked and vm.phys.object_windows:  # no two outstanding requests
        limit = min(limit, _asked_after(obj, off) // ps)  # overlap (asked_over)
    n = 1
    while n < limit:
        nxt = off + n * ps
        if nxt in memq or nxt in pending or (existence is not None and nxt not in existence):
            break
        n += 1
    obj.read_ahead = (off + n * ps, n)
    return n * ps


def _read_ahead_window(obj: VmObject, off: int) -> int:
    """The most pages a request at `off` may ask for: the host's cluster, or, for a
    reader going on in order (the fault is where the object's last request ended, so
    the manager gave all of it and the reader used it), twice the last request, up to
    the host's `read_ahead_pages` (as Linux grows its read-ahead window)."""
    vm = obj.vm
    end, asked = obj.read_ahead
    if off != end:
        return vm.pager_cluster_pages
    return min(max(2 * asked, vm.pager_cluster_pages), vm.read_ahead_pages)


def _asked_after(obj: VmObject, off: int) -> int:
    """Bytes from `off` to the first outstanding request of the object after it."""
    starts = [start for start in obj.window_asked if start > off]
    return (min(starts) if starts else obj.size + obj.vm.page_size) - off


def _timed_out(obj: VmObject, off: int, policy: FaultPolicy) -> None:
    """The manager did not answer in time: zero-fill the page, or fail it."""
    from pymach.vm.memory_object import page_settled

    page = obj._memq.get(off)  # (an absent page: never in an extent)
    if page is None or not page.absent:
        return
    vm = obj.vm
    obj.window_asked.pop(off, None)  # given up: a late answer is nobody's
    if policy.zero_fill:  # a substitute: the manager never gets it (vm_pageout.py)
        vm.phys.pmap_zero_page(page.frame)
        vm.resident.stats.zero_fill_count += 1
        page.substitute = True
    else:
        page.error = (f"the data manager of object {obj.serial} did not answer within "
                      f"{policy.timeout_ms} ms")
    vm.kernel.trace_event(f"pager timeout obj{obj.serial} offset={off:#x} "
                          f"{'zero-filled' if policy.zero_fill else 'memory error'}")
    page_settled(obj, page)


def _zero_fill(thread: Thread, obj: VmObject, off: int) -> VmPage:
    """A new zero-filled page of `obj` at `off` (nothing in the chain has the data)."""
    page = _alloc(thread, obj, off)
    obj.vm.phys.pmap_zero_page(page.frame)
    obj.vm.resident.stats.zero_fill_count += 1
    return page


# -- step 3: copy-on-write ------------------------------------------------------------------

def _copy_up(thread: Thread, src: VmPage, first_object: VmObject, first_offset: int,
             single_use: bool) -> VmPage:
    """Copy a page found below the first object into it (a copy-on-write fault)."""
    vm = first_object.vm
    page = _alloc(thread, first_object, first_offset)
    vm.phys.pmap_copy_page(src.frame, page.frame)
    page.dirty = True
    vm.resident.stats.cow_faults += 1
    if not single_use:  # other tasks sharing this map must find the new page too
        vm.phys.pmap_page_protect(src.frame, 0)
    return page


def _copy_has(copy: VmObject, off: int) -> bool:
    """True if a copy object (which sees its original at the same offsets) already
    holds its own version of page `off`."""
    return off in copy.memq or off in copy.existence or off in copy.pending


def _push_to_copy(thread: Thread, page: VmPage, obj: VmObject, off: int) -> None:
    """Before `page` of `obj` changes, give its old contents to the copy object."""
    copy = obj.copy
    assert copy is not None
    if _copy_has(copy, off):
        return
    vm = obj.vm
    pushed = _alloc(thread, copy, off)
    vm.phys.pmap_copy_page(page.frame, pushed.frame)
    pushed.dirty = True
    vm.resident.vm_page_activate(pushed)
    vm.phys.pmap_page_protect(page.frame, 0)  # copies' readers must now find the push


# -- frames and waiting ---------------------------------------------------------------------

def _alloc(thread: Thread, obj: VmObject, off: int) -> VmPage:
    """A free frame tabled as `obj`'s page at `off`; waits for pageout (Retry) if none."""
    vm = obj.vm
    page = vm.resident.vm_page_grab(thread.vm_privileged)
    if page is None:
        vm.page_wait(thread)  # raises KERN_RESOURCE_SHORTAGE or Retry
        raise Retry
    vm.resident.vm_page_insert(page, obj, off)
    vm.resident.vm_page_activate(page)  # pageable from the start (kernel reads too)
    vm.after_grab()
    return page


def _wait(thread: Thread, vm: VmSystem, waitq: WaitQueue, obj: VmObject,
          timeout_ms: float | None = None, raise_retry: bool = True) -> bool:
    """Block on an object's page queue (releasing the kernel lock). Raises Retry (or, with
    raise_retry False, returns whether it was woken rather than timed out)."""
    obj.ref_count += 1  # the object must outlive our wait
    thread.vm_waiting = obj
    try:
        woken = thread_block(vm.kernel.sched, thread, waitq,
                             deadline_after(vm.kernel.sched, timeout_ms))
    finally:
        thread.vm_waiting = None
        vm_object_deallocate(obj)
    if thread.vm_wait_error:
        reason, thread.vm_wait_error = thread.vm_wait_error, ""
        raise MachError("KERN_MEMORY_ERROR", reason)
    if raise_retry:
        raise Retry
    return woken


def vm_fault_trap(thread: Thread, va: int, access: int) -> None:
    """The trap a task thread takes when the MMU refuses an access (a kernel entry)."""
    with thread.kernel.trap(thread):
        vm_fault_locked(thread, va, access)


def vm_fault_locked(thread: Thread, va: int, access: int) -> None:
    """vm_fault_trap's work inside a kernel entry the caller made (kernel lock held):
    for a caller that must still hold the lock when the fault stops at a wait."""
    task = thread.task
    if task.map is None:
        raise MachError("KERN_INVALID_TASK", f"task {task.name!r} has no address space")
    if not thread.kernel.tracing:
        vm_fault(thread, task.map, va, access)
        return
    _traced_fault(thread, task.map, va, access)


def _traced_fault(thread: Thread, vmap: VmMap, va: int, access: int) -> None:
    """vm_fault, then one trace line `fault TASK VA read|write KIND MSms` (kernel lock
    held): KIND is what the kernel counted meanwhile (pager: a data manager was asked or
    provided data; copy-on-write; zero-fill; resident: none of these), or failed."""
    kernel, stats = thread.kernel, vmap.vm.resident.stats
    t0 = kernel.sched.now()
    before = (stats.pager_messages + stats.pageins, stats.cow_faults, stats.zero_fill_count)
    kind = "failed"
    try:
        vm_fault(thread, vmap, va, access)
        after = (stats.pager_messages + stats.pageins, stats.cow_faults,
                 stats.zero_fill_count)
        changed = [k for k, b, a in zip(("pager", "copy-on-write", "zero-fill"), before, after,
                                        strict=True) if a != b]
        kind = changed[0] if changed else "resident"
    finally:
        kernel.trace_event(f"fault {thread.task.name} {trunc_page(va, vmap.vm.page_size):#x} "
                           f"{'write' if access & VM_PROT_WRITE else 'read'} {kind} "
                           f"{kernel.sched.now() - t0:.3f}ms")
