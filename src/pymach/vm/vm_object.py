"""Virtual memory objects: the kernel's structure for one memory object (paper 5.2).

A `VmObject` caches the data of a memory object in resident pages (`memq`) and records
how to get the rest. Some of an external object's resident pages may be held as
*extents* (`extents`): runs of frames that hold data a manager provided and that nobody
has looked at one by one yet, with no page structure each (vm_page.py, "Extents").
Reading `memq` makes them pages first, so code that walks an object's pages sees them
all; the fault, provide and free paths look at `_memq` and the extents themselves.

- an external object has a data manager: `pager` is the memory object port (a send
  right), `pager_request` and `pager_name` the ports the kernel made for it (3.4.1);
- an internal object is made by the kernel for zero-fill memory, for shadows, and for
  data in transit; it gets a pager (the default pager, via pager_create) only when one
  of its pages must be paged out. `existence` lists the offsets the pager holds, so a
  fault asks the pager only for pages it really has;
- a *shadow* object holds the changed pages of a copy-on-write copy and finds the rest
  in `shadow` at `offset + shadow_offset` (a shadow chain);
- a *copy object* (`copy`) receives the old contents of pages of an object that can
  change under its copies (an external object), pushed just before they change.

`ref_count` counts address-map entries, shadow links, messages in transit and faults in
progress. At zero the object is terminated (or kept in the cache if its manager allows,
see section 9). Collapse (`vm_object_collapse`) merges a shadow chain link that nothing
else uses into its child, so chains do not grow without bound.

Pages are freed an object range at a time, never page by page (`vm_pages_free`):
termination and collapse free all of an object's remaining pages as one run of its
offsets, vm_object_page_remove its range's pages as the runs between busy pages (whose
data are in transit and stay).

All fields are guarded by the kernel lock.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import TYPE_CHECKING

from pymach.include.vm_param import VM_PROT_WRITE
from pymach.kern.sched_prim import WaitQueue

if TYPE_CHECKING:
    from pymach.ipc.port import Port
    from pymach.vm.vm_init import VmSystem
    from pymach.vm.vm_page import VmPage


class VmObject:
    """The kernel's structure for one memory object (see module docstring)."""

    def __init__(self, vm: VmSystem, size: int, internal: bool = True, label: str = "") -> None:
        self.vm = vm  # immutable
        self.serial = vm.kernel.new_serial("vm_object")  # immutable
        self.size = size
        self.internal = internal  # made by the kernel (zero fill, shadow, data in transit)
        self.label = label or ("anonymous" if internal else "external")
        self.ref_count = 1
        self._memq: dict[int, VmPage] = {}  # offset -> resident page (this object's part
        # of the virtual-to-physical table, vm_page.py); never an offset of an extent
        self.extents: dict[int, list[int]] = {}  # start offset -> the frames of a run of
        # resident pages with no page structures yet (vm_page.py, "Extents")
        self.extent_starts: list[int] = []  # the extents' starts, in order (bisect)
        self.busy_pages = 0  # of memq's pages, how many are busy (VmPage.busy keeps it)
        self.shadow: VmObject | None = None  # a counted reference
        self.shadow_offset = 0
        self.copy: VmObject | None = None  # newest copy object; not a counted reference
        self.pager: Port | None = None  # memory object port (the kernel's send right)
        self.pager_request: Port | None = None  # kernel port the manager calls
        self.pager_name: Port | None = None  # identifies the object in vm_regions
        self.paging_offset = 0  # where this object's offset 0 lies in the memory object
        self.pager_ready = False  # pager_init (or pager_create) has been sent
        self.existence: set[int] = set()  # internal: offsets the pager holds
        self.data_source: bytes | None = None  # internal: initial data held by the kernel
        self.pending: dict[int, VmObject] = {}  # offset -> holding object of a pageout,
        # or the store of a written substitute page (external objects, owns a reference)
        self.substitute = False  # a store: holds, at offset 0, a substitute page its
        # external object got after a manager's timeout, backed by the default pager
        self.holding_for: tuple[VmObject, int] | None = None  # holding: whose page it is
        self.refill = True  # holding: a fault may take the data back (until a flush
        # hands it to the manager; pager_data_error still returns it to the kernel)
        self.released_at: float | None = None  # when its manager last let go of data
        # written back from it (a manager that does is busy, not errant: vm_pageout.py)
        self.pageout_failed: tuple[int, float] | None = None  # (swap epoch, time) of the
        # last pager_data_error for a pageout (vm_pageout._failed_recently)
        self.can_persist = False  # pager_cache: keep after the last reference
        self.windowed = False  # its manager was given a window (memory_object.py)
        self.writes_in_place = False  # ... and takes its write-backs there
        self.in_place: dict[int, tuple[int, int]] = {}  # external: start -> (end, what
        # becomes of its pages once released) of each run written back in place
        # (pager_data_write_in_place) and not yet released; its pages stay (busy,
        # wired) until then, and so does a terminating object (memory_object.py)
        self.in_place_pages = 0  # the pages of those runs
        self.counted_as: object | None = None  # the data manager its resident pages
        # count for (vm_page.py: VmResident.manager_pages)
        self.pages_gone = 0  # external: pages that have left it (freed or moved)
        self.window_asked: dict[int, list[int]] = {}  # external: the offset of each
        # pager_data_request not yet answered -> [its end, 1 once a page of its range
        # may have left it since (its window data punched), pages_gone then]
        self.read_ahead = (-1, 0)  # (the offset where the last request to its manager
        # ended, how many pages it asked for): a fault there is a reader going on in
        # order, whose next request may grow (vm_fault._cluster)
        self.lazy_frames: list[int] | None = None  # frames held for the pages the machine
        # zero-fills on its own (vm_page.py, "Zero fill by the machine"); None: the VM
        # knows every resident page of the object
        self.lazy_filling = False  # the machine fills holes of it now (until lazy_freeze)
        self.alive = True
        self.page_waitq = WaitQueue(vm.kernel.sched.lock, f"vm_object{self.serial}.pages")

    def __repr__(self) -> str:
        return f"<VmObject {self.serial} {self.label} size={self.size:#x} refs={self.ref_count}>"

    def pages_left(self, pages: list[VmPage]) -> None:
        """`pages` left this external object (freed or moved: their window data, if it
        has a window, punched): counted, and, once it has a window, each outstanding
        request whose range held one is marked, so that its answer in place is not
        taken (memory_object.py). Kernel lock held."""
        self.pages_gone += len(pages)
        if not self.windowed or not self.window_asked:
            return
        low = min(page.offset for page in pages)
        high = max(page.offset for page in pages)
        for start, asked in self.window_asked.items():
            end = asked[0]
            if not asked[1] and start <= high and low < end:
                asked[1] = int(any(start <= page.offset < end for page in pages))

    def asked_over(self, offset: int) -> bool:
        """True if an outstanding request of this external object covers `offset`,
        where the machine has object windows: its answer may write the window there,
        so no other request may ask for it (that late write would land on the page the
        other answer made, maybe changed since). Kernel lock held."""
        return bool(self.window_asked) and self.vm.phys.object_windows and any(
            start <= offset < asked[0] for start, asked in self.window_asked.items())

    def answered(self, start: int, end: int) -> list[tuple[int, list[int]]]:
        """Forget the outstanding requests whose offset lies in [start, end) (they are
        answered, or given up): (offset, record) of each, in offset order. Kernel lock
        held."""
        gone = sorted((s, asked) for s, asked in self.window_asked.items()
                      if start <= s < end)
        for s, _ in gone:
            del self.window_asked[s]
        return gone

    @property
    def memq(self) -> dict[int, VmPage]:
        """Every resident page of the object by offset: its extents are made pages first
        (VmResident.extents_make), so a walk over the object sees each page."""
        if self.extents:
            self.vm.resident.extents_make(self)
        return self._memq

    def resident_offsets(self) -> Iterable[int]:
        """The offsets of its resident pages, those of its extents included, without
        making the extents pages (for reports)."""
        if not self.extents:
            return self._memq.keys()
        ps = self.vm.page_size
        return itertools.chain(self._memq, *(range(s, s + len(frames) * ps, ps)
                                             for s, frames in self.extents.items()))

    def resident_at(self, offset: int) -> bool:
        """True if a resident page (in an extent or not) holds `offset`."""
        return offset in self._memq or (
            bool(self.extents) and self.vm.resident.extent_of(self, offset) is not None)

    def extent_pages(self) -> int:
        """How many resident pages its extents hold."""
        return sum(map(len, self.extents.values())) if self.extents else 0

    def runs_left(self, runs: list[tuple[int, int]], count: int) -> None:
        """`pages_left` for `count` pages that filled the offset ranges `runs` (an
        extent's, freed with no page structures)."""
        self.pages_gone += count
        if not self.windowed or not self.window_asked:
            return
        for start, asked in self.window_asked.items():
            if not asked[1] and any(lo < asked[0] and start < hi for lo, hi in runs):
                asked[1] = 1

    def has_busy_pages(self) -> bool:
        """True while any resident page is in transit."""
        return self.busy_pages > 0

    def shadow_depth(self) -> int:
        """The number of objects below this one in its shadow chain."""
        depth, o = 0, self.shadow
        while o is not None:
            depth, o = depth + 1, o.shadow
        return depth


def vm_object_allocate(vm: VmSystem, size: int, label: str = "") -> VmObject:
    """A new internal object of `size` bytes, zero-filled on demand, with one reference."""
    obj = VmObject(vm, size, internal=True, label=label)
    vm.objects_alive += 1
    return obj


def vm_object_reference(obj: VmObject | None) -> None:
    """Take one more reference to `obj`. Another holder will look at its pages, so the
    machine stops zero-filling it first (its pages become resident as they are looked
    up)."""
    if obj is not None:
        if obj.lazy_filling:
            obj.vm.resident.lazy_freeze(obj)
        obj.ref_count += 1


def vm_object_deallocate(obj: VmObject | None) -> None:
    """Drop one reference; at zero terminate the object (or cache it) and drop its shadow."""
    while obj is not None:
        obj.ref_count -= 1
        if obj.ref_count > 0:
            return
        if obj.can_persist and obj.pager is not None and not obj.pager.dead:
            obj.vm.cache_enter(obj)
            return
        shadow = obj.shadow
        obj.shadow = None
        if shadow is not None and shadow.copy is obj:  # a copy object going away
            shadow.copy = None
        vm_object_terminate(obj)
        obj = shadow


def vm_object_terminate(obj: VmObject) -> None:
    """Free every page of an object nobody references and let go of its pager. An
    external object whose changed data went back in place (its manager reads them from
    its window) is finished only once the manager has released them, or the pageout
    deadline has passed (memory_object.py, "write-backs in place")."""
    if not obj.alive:
        return
    obj.alive = False
    if not obj.internal:
        obj.vm.clean_external_object(obj)  # dirty data goes back to its manager first
        if obj.in_place:  # the manager reads them from its window: the rest waits
            return  # (vm_object_terminate_finish, when the last run is released)
    vm_object_terminate_finish(obj)


def _gone(vm: VmSystem, obj: VmObject) -> None:
    """The backend lets go of a dead object; what of that may wait (a dead object's
    memfd punched out) runs once this thread lets go of the kernel lock."""
    rest = vm.phys.object_gone(obj)
    if rest is not None:
        vm.kernel.sched.lock.defer(rest)


def vm_object_terminate_finish(obj: VmObject) -> None:
    """The rest of vm_object_terminate, once no write-back in place is outstanding:
    free the pages, let go of the pager (pager_terminate), forget the object."""
    from pymach.vm.memory_object import pager_terminate

    vm = obj.vm
    _free_all_pages(obj)
    stores = [h for h in obj.pending.values() if h.substitute]
    obj.pending.clear()  # holding objects in flight still reach their manager
    for store in stores:
        vm_object_deallocate(store)
    obj.vm.resident.lazy_drop(obj)
    if obj.holding_for is not None:
        _holding_released(obj)
    if obj.internal and obj.pager is not None:
        vm.swap_epoch += 1  # the default pager frees this object's blocks: room to retry
    pager_terminate(obj)
    _gone(vm, obj)
    vm.objects_alive -= 1
    vm.kernel.sched.thread_wakeup(obj.page_waitq)


def _holding_released(holding: VmObject) -> None:
    """The manager let go of paged-out data: the pageout of those pages is complete."""
    owner, first = holding.holding_for  # type: ignore[misc]
    holding.holding_for = None
    vm = holding.vm
    owner.released_at = vm.kernel.sched.now()
    for off in range(first, first + holding.size, vm.page_size):
        if owner.pending.get(off) is holding:
            del owner.pending[off]
    vm.holdings.pop(holding, None)
    vm.pageouts_in_flight -= 1
    vm.kernel.sched.thread_wakeup(vm.pageout_waitq)


def holding_offset(holding: VmObject, off: int) -> int:
    """The offset, in an object of another's `pending` (a pageout in flight, or a
    substitute page's one-page store), of the page it keeps for offset `off` of that
    other object."""
    return 0 if holding.holding_for is None else off - holding.holding_for[1]


def vm_object_shadow(obj: VmObject, offset: int, size: int) -> VmObject:
    """A new object that shadows [offset, offset+size) of `obj` (taking over the caller's
    reference to `obj`)."""
    new = vm_object_allocate(obj.vm, size, label="shadow")
    new.shadow, new.shadow_offset = obj, offset
    return new


def vm_object_page_remove(obj: VmObject, start: int, end: int) -> None:
    """Discard the object's data in [start, end): resident pages (but busy ones: their
    data are in transit) and pager copies. The pages go in one step, each run of the
    range between busy pages at once (vm_pages_free), and each extent in the range with
    one backend call. All of an object the machine zero-fills goes with no look at its
    pages; part of one ends the machine's fill first."""
    vm = obj.vm
    if obj.lazy_frames is not None:
        if start <= 0 and end >= obj.size:
            vm.resident.lazy_drop(obj)
        else:
            vm.resident.lazy_freeze(obj)
    if obj.extents:  # (an extent's pages go a run at a time, with no look at each)
        vm.resident.extents_free(obj, start, end)
    pages, busy = [], []
    for offset, page in obj._memq.items():  # one pass over the pages (memory-bound)
        if not start <= offset < end:
            continue
        if page.busy:
            busy.append(offset)
        else:
            pages.append(page)
    busy.sort()
    runs = runs_between(start, end, busy, vm.page_size)
    vm.resident.vm_pages_free(obj, pages, runs)
    if obj.lazy_frames is not None:  # and the pages the machine made there, unseen
        vm.phys.frames_discard(obj, runs, [])
    obj.existence = {o for o in obj.existence if not start <= o < end}
    if obj.data_source is not None and start == 0 and end >= obj.size:
        obj.data_source = None


def runs_between(start: int, end: int, holes: list[int], page_size: int
                  ) -> list[tuple[int, int]]:
    """[start, end) less the pages at the sorted offsets `holes`, as runs."""
    runs, at = [], start
    for hole in holes:
        if at < hole:
            runs.append((at, hole))
        at = hole + page_size
    if at < end:
        runs.append((at, end))
    return runs


def _free_all_pages(obj: VmObject) -> None:
    """Free every resident page of `obj` (busy ones too) in one step: one run covers
    the object (termination, collapse); its extents each with one backend call."""
    if obj.extents:
        last = obj.extent_starts[-1]
        obj.vm.resident.extents_free(obj, 0, last + len(obj.extents[last]) * obj.vm.page_size)
    if obj.memq:
        end = max(obj.size, max(obj.memq) + obj.vm.page_size)
        obj.vm.resident.vm_pages_free(obj, list(obj.memq.values()), [(0, end)])


def vm_object_pmap_protect_copy(obj: VmObject, start: int, end: int) -> None:
    """Write-protect, in every pmap, the object's resident pages in [start, end)."""
    phys = obj.vm.phys
    keep, memq = ~VM_PROT_WRITE & 0x7, obj.memq
    if end - start <= len(memq) * obj.vm.page_size:
        ps = obj.vm.page_size
        for off in range(start, end, ps):
            page = memq.get(off)
            if page is not None:
                phys.pmap_page_protect(page.frame, keep)
    else:
        for off, page in memq.items():
            if start <= off < end:
                phys.pmap_page_protect(page.frame, keep)


# -- collapse --------------------------------------------------------------------------

def vm_object_collapse(obj: VmObject) -> None:
    """Merge or bypass shadow links below `obj` that nothing else uses (5.2, Mach 2.5)."""
    while True:
        backing = obj.shadow
        if backing is None or not _collapsible(obj, backing):
            return
        obj.vm.resident.lazy_end(backing)  # every page of it known before pages move
        if backing.ref_count == 1 and (backing.pager is None or obj.pager is None):
            _collapse_into(obj, backing)
        elif _shadows_everything(obj, backing):
            _bypass(obj, backing)
        else:
            return


def _collapsible(obj: VmObject, backing: VmObject) -> bool:
    """Both internal and quiet, and neither a copy object (which must keep receiving
    pushes from its original) nor a holding object (a pageout in flight)."""
    if backing.shadow is not None and backing.shadow.copy is not None:
        return False
    if obj.holding_for is not None or backing.holding_for is not None:
        return False
    return (obj.internal and backing.internal and backing.alive and backing.copy is None
            and not backing.pending and not obj.pending and backing.data_source is None
            and not backing.has_busy_pages() and not obj.has_busy_pages()
            and not (backing.pager is not None and backing.pager.dead))


def _collapse_into(obj: VmObject, backing: VmObject) -> None:
    """Move `backing`'s pages (and pager, if any) into `obj`; `backing` disappears."""
    vm, delta, memq = obj.vm, obj.shadow_offset, obj.memq
    for boff, page in list(backing.memq.items()):
        off = boff - delta
        if 0 <= off < obj.size and off not in memq and off not in obj.existence:
            vm.resident.vm_page_rename(page, obj, off)
    _free_all_pages(backing)  # what obj hides or cannot hold
    if backing.pager is not None:
        from pymach.vm.memory_object import pager_rebind

        obj.existence = {b - delta for b in backing.existence if 0 <= b - delta < obj.size}
        obj.paging_offset = backing.paging_offset + delta
        pager_rebind(backing, obj)
    obj.shadow, obj.shadow_offset = backing.shadow, backing.shadow_offset + delta
    backing.shadow = None
    backing.alive = False
    _gone(vm, backing)
    vm.objects_alive -= 1
    vm.stats_collapses += 1


def _shadows_everything(obj: VmObject, backing: VmObject) -> bool:
    """True if `obj` has its own copy of every page `backing` could show it; offsets
    where `backing` has nothing look through it to its shadow either way."""
    delta, memq = obj.shadow_offset, obj.memq
    for boff in itertools.chain(backing.memq, backing.existence):  # (no copy, no order:
        off = boff - delta  # the first page obj lacks decides)
        if 0 <= off < obj.size and off not in memq and off not in obj.existence:
            return False
    return True


def _bypass(obj: VmObject, backing: VmObject) -> None:
    """Point `obj` past `backing`, which it hides entirely."""
    grand = backing.shadow
    vm_object_reference(grand)
    obj.shadow = grand
    obj.shadow_offset += backing.shadow_offset
    vm_object_deallocate(backing)
    obj.vm.stats_collapses += 1
