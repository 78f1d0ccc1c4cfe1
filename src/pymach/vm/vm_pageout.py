"""The pageout daemon: keeps free frames above target (paper 5.4, 6.2.2, 6.2.3).

A kernel thread that sleeps until free frames fall below `free_min`, then scans:

- it ages the active queue, moving its least recently used pages to the inactive queue
  (clearing their reference bits);
- it walks the inactive queue: a page referenced meanwhile is reactivated (so is, once,
  a *fresh* page, just settled for a fault that may not have used it yet); a clean page
  is freed; a dirty page is written to its pager with `vm_pageout_page`. The victims
  of a pass are taken together (as many as free frames are short, and at least the
  host's `pager_cluster_pages`), so adjacent dirty pages of an object go to its pager
  in one pager_data_write (memory_object.py's `evict_in_runs`), not a message a page.
  Between batches of victims (PAGEOUT_BATCH pages, or a cluster), the scan lets any
  thread waiting for the kernel lock in (`lock_break`), so paging out thousands of
  pages does not stall every other task's traps and faults behind it. While a quarter
  of memory is held by write-backs to external managers (`laundry_pages`), it sends
  them no more dirty pages (clean pages and the default pager's still go): pages held
  for managers do not fill memory (a tiny machd paging a manager's own object
  thrashed so, every frame but two in flight, each fault evicting the page just
  brought in).
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

from pymach.include.message import Code
from pymach.include.vm_param import VM_PROT_NONE, VM_PROT_READ
from pymach.kern.sched_prim import thread_block
from pymach.kern.thread import current_thread
from pymach.vm.vm_map_copy import CopyEntry, VmMapCopy
from pymach.vm.vm_object import vm_object_allocate

if TYPE_CHECKING:
    from pymach.kern.thread import Thread
    from pymach.vm.vm_init import VmSystem
    from pymach.vm.vm_object import VmObject
    from pymach.vm.vm_page import VmPage

GIVE_UP_AFTER = 3  # scans in a row that find nothing pageable, with nothing in flight
PAGEOUT_BATCH = 64  # victims taken together, at most (unless a cluster is more)


def vm_pageout_daemon(vm: VmSystem) -> None:
    """The daemon's thread body: sleep, scan, repeat (runs until the kernel shuts down)."""
    thread = current_thread()
    sched = vm.kernel.sched
    idle_scans = 0
    while True:
        with vm.kernel.trap(thread):
            while not vm.pageout_needed() and not _expired(vm):
                idle_scans = 0
                thread_block(sched, thread, vm.pageout_waitq, _next_deadline(vm))
            vm_pageout_expired_holdings(vm)
            if not vm.pageout_needed():
                continue
            progress, pageable = vm_pageout_scan(vm)
            idle_scans = 0 if progress or pageable else idle_scans + 1
            _after_scan(vm, thread, progress, idle_scans)


def _next_deadline(vm: VmSystem) -> float | None:
    """The earliest deadline of a held write-back (None: none is held); the heap's
    stale entries on top are dropped on the way."""
    heap, holdings = vm.holding_deadlines, vm.holdings
    while heap and holdings.get(heap[0][2]) != heap[0][0]:
        heapq.heappop(heap)
    return heap[0][0] if heap else None


def _set_deadline(vm: VmSystem, holding: VmObject, deadline: float) -> None:
    """`holding` must be released by `deadline` (its older entry, if any, goes stale)."""
    vm.holdings[holding] = deadline
    heap = vm.holding_deadlines
    heapq.heappush(heap, (deadline, holding.serial, holding))
    if len(heap) > 2 * len(vm.holdings) + 64:  # mostly stale (released): rebuild
        vm.holding_deadlines = [(d, h.serial, h) for h, d in vm.holdings.items()]
        heapq.heapify(vm.holding_deadlines)


def _expired(vm: VmSystem) -> bool:
    deadline = _next_deadline(vm)
    return deadline is not None and deadline <= vm.kernel.sched.now()


def vm_pageout_expired_holdings(vm: VmSystem) -> None:
    """Data written back to a manager that has not released it in time goes to the
    default pager instead of pinning memory (6.2.2: errant data managers). A manager
    that let go of other data written back from the same object within the deadline is
    busy, not errant (its messages wait in its queue behind that data): its deadline
    moves on by one period instead. Expired ones are taken in (deadline, serial) order."""
    now, period = vm.kernel.sched.now(), vm.pageout_deadline_ms
    while (deadline := _next_deadline(vm)) is not None and deadline <= now:
        holding = heapq.heappop(vm.holding_deadlines)[2]
        owner = holding if holding.in_place else \
            holding.holding_for[0] if holding.holding_for is not None else None
        if owner is not None and owner.released_at is not None \
                and now - owner.released_at < period:
            _set_deadline(vm, holding, now + period)
            continue
        del vm.holdings[holding]
        if holding.in_place:  # an object's write-backs in place, not a holding object
            vm.in_place_expired(holding)
            continue
        for page in list(holding.memq.values()):
            if page.busy:
                continue
            vm.resident.vm_page_unwire(page)
            vm.phys.pmap_page_protect(page.frame, VM_PROT_NONE)
            vm_pageout_page(page, keep=False)
            vm.kernel.trace_event(f"pageout deadline: obj{holding.serial} to the default pager")


def _after_scan(vm: VmSystem, thread: Thread, progress: bool, idle_scans: int) -> None:
    """Give up, or pause while pageouts are in flight. Frame waiters are woken by each
    frame freed (VmSystem._frame_freed), not here: waking them for nothing would make
    them wake the daemon in turn, and time would never reach a deadline (6.2.2)."""
    sched = vm.kernel.sched
    if progress:
        return
    if vm.pageouts_in_flight == 0 and idle_scans >= GIVE_UP_AFTER and vm.pageout_needed():
        # (still short: a lock break may have let a task free memory meanwhile)
        vm.shortage = ("out of memory: every page is in use and none can be paged out "
                       "(the backing store is full or unavailable)")
        sched.thread_wakeup(vm.free_waitq)
        thread_block(sched, thread, vm.pageout_waitq)  # until memory is freed
    else:  # until a pageout completes, or a while (memory may be referenced less)
        pause, deadline = sched.now() + 5, _next_deadline(vm)
        thread_block(sched, thread, vm.pageout_waitq,
                     pause if deadline is None else min(pause, deadline))


def vm_pageout_scan(vm: VmSystem) -> tuple[bool, bool]:
    """One pass over the queues (kernel lock held). Returns (progress: it freed or sent a
    page, pageable: it saw pages in use that a later pass could take)."""
    res = vm.resident
    if res.free_count() < vm.free_target:
        res.lazy_end_all()  # frames held for the machine's zero fill come back first
        res.extents_make_all()  # and every resident page is seen one by one
    _balance(vm)
    progress = pageable = False
    victims: list[VmPage] = []
    for page in list(res.inactive):
        if len(victims) >= _batch(vm):
            progress |= _reclaim(vm, victims)
            victims = []
            if res.free_count() >= vm.free_target:
                break
            vm.kernel.sched.lock_break()  # (between batches, nothing is in flux; the
            # pages still listed are checked again below)
        if page.queue != "inactive":
            continue
        referenced = vm.phys.pmap_is_referenced(page.frame)
        if referenced or page.fresh:  # fresh: a fault waits to use it (maybe for a
            page.fresh = False  # frame of its own): a second chance, as if referenced
            res.vm_page_activate(page)
            res.stats.reactivations += referenced
            pageable = True
            continue
        victims.append(page)
    progress |= _reclaim(vm, victims)
    return progress, pageable


def _batch(vm: VmSystem) -> int:
    """How many victims a scan takes together: as many as free frames are short, at
    least a cluster (adjacent dirty pages go to their pager in one message), at most
    PAGEOUT_BATCH or a cluster (the kernel lock is let go between batches)."""
    short = vm.free_target - vm.resident.free_count()
    return max(vm.pager_cluster_pages, min(short, PAGEOUT_BATCH))


def laundry_pages(vm: VmSystem) -> int:
    """Frames held by write-backs to external managers that are in flight (neither
    released nor past their deadline): while they are a quarter of memory, the daemon
    sends no more dirty pages to external managers (_reclaim). The default pager's
    are not counted (it is the kernel's own, and lets go of each at once), and its
    pages still go; nor is data past its deadline, which went to the default pager
    (6.2.2), so an errant manager holds back nothing."""
    return sum(h.in_place_pages if h.in_place else len(h._memq) for h in vm.holdings)


def _reclaim(vm: VmSystem, victims: list[VmPage]) -> bool:
    """Reclaim a scan's victims (vm_pageout_reclaim), their dirty pages going to their
    pagers a run of adjacent pages per message (evict_in_runs), the pages taken out of
    the tasks a run per call. True if any left."""
    from pymach.vm.memory_object import evict_in_runs

    victims = [p for p in victims if p.queue == "inactive"]
    if laundry_pages(vm) >= vm.phys.nframes // 4:  # enough held for managers: no
        res = vm.resident  # more dirty pages to them (the default pager's still go)
        victims = [p for p in victims if p.object is None or p.object.internal
                   or not (p.precious or res.vm_page_is_dirty(p))]
    if not victims:
        return False
    with vm.phys.discard_batch():  # the holes punched a run at a time
        return evict_in_runs(vm, victims) > 0


def _balance(vm: VmSystem) -> None:
    """Age the active queue so the inactive queue holds about a third of the pages."""
    res = vm.resident
    want = (len(res.active) + len(res.inactive)) // 3 + (vm.free_target - res.free_count())
    while len(res.inactive) < want and res.active:
        res.vm_page_deactivate(next(iter(res.active)))


def vm_pageout_reclaim(vm: VmSystem, page: VmPage) -> bool:
    """Free a page (unmapping it everywhere), writing it to its pager first if dirty.
    False if it is dirty and cannot be paged out now (it stays, active)."""
    from pymach.vm.memory_object import push_to_copy_object

    res = vm.resident
    obj = page.object
    if vm_pageout_plain(page) and vm_pageout_free_clean(vm, page):
        return True
    vm.phys.pmap_page_protect(page.frame, VM_PROT_NONE)
    if obj is not None and obj.copy is not None:  # the copy must keep what it saw
        push_to_copy_object(obj, page)
    if is_substitute(page):  # never the manager's: zeros after its timeout (6.2.1)
        if res.vm_page_is_dirty(page):
            return vm_pageout_substitute(page)
        res.vm_page_free(page)  # unwritten zeros: a later fault asks the manager again
        return True
    if res.vm_page_is_dirty(page) or page.precious:
        if vm_pageout_page(page, keep=False):
            return True
        res.vm_page_activate(page)  # it cannot be paged out now
        return False
    res.vm_page_free(page)
    return True


def vm_pageout_plain(page: VmPage) -> bool:
    """True for a page whose pageout needs nothing but its own data: its object has no
    copy object to push it to, and it is neither precious nor a substitute."""
    obj = page.object
    return obj is not None and obj.copy is None and not page.precious \
        and not is_substitute(page)


def vm_pageout_free_clean(vm: VmSystem, page: VmPage) -> bool:
    """Stop writes to a plain page (write-protect it: its data stays) and free it if it
    is clean (the backend drops it). True if freed; False if it is dirty (it stays,
    mapped read-only at most)."""
    vm.phys.pmap_page_protect(page.frame, VM_PROT_READ)
    if vm.resident.vm_page_is_dirty(page):
        return False
    vm.resident.vm_page_free(page)
    return True


def vm_pageout_page(page: VmPage, keep: bool, privileged: bool = True) -> bool:
    """Send a page's data to its object's pager in pager_data_write.

    Without `keep` the page itself moves into a holding object (pageout, flush); with
    `keep` its data is copied into one and the page stays (clean), using a frame taken
    with `privileged` access to the reserved pool. False if the object has no pager
    that can take it (or, with `keep`, no frame for the copy).
    """
    from pymach.vm.memory_object import pager_create, pager_data_write

    obj = page.object
    assert obj is not None
    vm, off = obj.vm, page.offset
    if obj.internal and obj.pager is None and not pager_create(obj):
        return False
    if not vm_pageout_possible(obj) or is_substitute(page):
        return False
    holding = vm_object_allocate(vm, vm.page_size, label="pageout")
    if keep:
        copy_page = vm.resident.vm_page_grab(privileged)
        if copy_page is None:
            holding.alive = False
            vm.objects_alive -= 1
            return False
        vm.resident.vm_page_insert(copy_page, holding, 0)
        vm.phys.pmap_copy_page(page.frame, copy_page.frame)
        held = copy_page
    else:
        vm.resident.vm_page_rename(page, holding, 0)
        held = page
    vm.resident.vm_page_wire(held)
    page.dirty = held.dirty = False
    vm_pageout_hold(vm, holding, obj, off)
    copy = VmMapCopy(vm, [CopyEntry(holding, 0, vm.page_size, False)], 0, vm.page_size)
    pager_data_write(obj, off, copy)
    vm.resident.stats.pageouts += 1
    return True


def vm_pageout_possible(obj: VmObject) -> bool:
    """True if the object's manager can be sent data now (it has one, alive, and a
    pageout to it did not fail just now)."""
    return obj.pager is not None and not obj.pager.dead and not _failed_recently(obj)


def is_substitute(page: VmPage) -> bool:
    """True for data the manager never gave and must never get: zeros given after its
    timeout, and such a page once written and taken back from its store."""
    obj = page.object
    if page.substitute or obj is None:
        return page.substitute
    store = obj.pending.get(page.offset)
    return store is not None and store.substitute


def vm_pageout_substitute(page: VmPage) -> bool:
    """Page out a written substitute page of an external object to the default pager,
    as the zero-filled memory of 6.2.1 is backed by it. The page moves into a *store*:
    an internal object kept in the object's `pending` at its offset, so a fault takes
    the data back from there (vm_fault._fill_from_kernel) and a late answer from the
    manager is ignored. False if it cannot be paged out now (it stays, in the store,
    where the daemon finds it again like any internal page)."""
    obj = page.object
    assert obj is not None
    vm, off = obj.vm, page.offset
    store = obj.pending.get(off)
    if store is None:
        store = vm_object_allocate(vm, vm.page_size, label="substitute")
        store.substitute = True
        obj.pending[off] = store  # the store's reference
    old = store.memq.get(0)
    if old is not None and old.busy:  # being read back: keep the newer data here
        vm.resident.vm_page_activate(page)
        return False
    if old is not None:  # an older version of the data
        vm.resident.vm_page_free(old)
    vm.resident.vm_page_rename(page, store, 0)
    page.substitute, page.dirty = False, True
    if vm_pageout_page(page, keep=False):
        return True
    vm.resident.vm_page_activate(page)
    return False


def _failed_recently(obj: VmObject) -> bool:
    """True while a pager that could not store a page of `obj` should not be tried
    again: the default pager until it may have freed space, others for a deadline."""
    if obj.pageout_failed is None:
        return False
    epoch, when = obj.pageout_failed
    if obj.internal:
        return epoch == obj.vm.swap_epoch
    return obj.vm.kernel.sched.now() - when < obj.vm.pageout_deadline_ms


def vm_pageout_hold(vm: VmSystem, holding: VmObject, obj: VmObject, off: int) -> None:
    """Record a pageout in flight until the manager releases the holding object, whose
    pages are those of `obj` from `off` on."""
    holding.holding_for = (obj, off)
    for at in range(off, off + holding.size, vm.page_size):
        obj.pending[at] = holding
        if obj.internal:
            obj.existence.add(at)
    if not obj.internal:  # an external manager must let go of it in time
        deadline, earliest = vm.kernel.sched.now() + vm.pageout_deadline_ms, _next_deadline(vm)
        if earliest is None or deadline < earliest:
            vm.kernel.sched.thread_wakeup(vm.pageout_waitq)  # the daemon must wait for it
        _set_deadline(vm, holding, deadline)
    vm.pageouts_in_flight += 1


def vm_pageout_hold_in_place(vm: VmSystem, obj: VmObject) -> None:
    """Record a run of external object `obj` written back in place, in flight until
    its manager releases it; all of the object's runs share one deadline (in
    `holdings`, as a holding object's, keyed by the object itself)."""
    if obj not in vm.holdings:
        deadline, earliest = vm.kernel.sched.now() + vm.pageout_deadline_ms, _next_deadline(vm)
        if earliest is None or deadline < earliest:
            vm.kernel.sched.thread_wakeup(vm.pageout_waitq)  # the daemon must wait for it
        _set_deadline(vm, obj, deadline)
    vm.in_place_waiting[obj] = None
    vm.pageouts_in_flight += 1


def vm_pageout_released_in_place(vm: VmSystem, obj: VmObject) -> None:
    """A run of `obj` written back in place is released (or given up on)."""
    obj.released_at = vm.kernel.sched.now()
    if not obj.in_place:
        vm.holdings.pop(obj, None)  # (its heap entry goes stale)
        vm.in_place_waiting.pop(obj, None)
    vm.pageouts_in_flight -= 1
    vm.kernel.sched.thread_wakeup(vm.pageout_waitq)


def start_pageout_daemon(vm: VmSystem) -> None:
    """Create the daemon thread in the kernel task (kernel lock held)."""
    kernel = vm.kernel
    thread = kernel.thread_create_locked(kernel.kernel_task, Code(vm_pageout_daemon, (vm,)),
                                         "kernel.pageout", start=False)
    thread.vm_privileged = thread.daemon = True
    thread.start()
