"""Resident page structures, the virtual-to-physical table and the pageout queues.

Paper 5.3 and 5.4. One `VmPage` per physical frame (made when the frame is first used);
it records the object and offset it caches, the access the data manager allows
(`page_lock` holds the access *prevented*), and software copies of the reference and
modify bits. `VmResident` is the per-kernel table of them:

- the fast (object, offset) -> page lookup of 5.3 ("virtual to physical table") is a
  hash table split by object: each object's `memq` maps its offsets to its pages, so
  the lookup is one probe and an object's pages leave the table in one step;
- three queues (5.4): `active` in least-recently-used order, `inactive` (pages being
  prepared for pageout) and `free` (frames caching nothing: a stack, whose last frames
  are taken first, so a run of frames comes off it in one slice, as a GiB's frames do
  when the machine's zero fill holds them: 260,000 pops under the kernel lock before).

Pages are freed a batch at a time where they can be (`vm_pages_free`: an object's range
or all of it), so freeing costs the backend one step per run of the object's offsets
(`frames_discard`) and the tables a few dictionary operations per page.

Zero fill by the machine. A machine whose hardware can zero-fill a page on first
touch without a fault reaching the VM (the native backend: a memfd hole) may do so for
fresh anonymous memory: at the first fault of an object that nothing else sees and that
has no page yet, `lazy_begin` takes from the free queue a frame for every page of the
object (so memory is accounted for as if all were resident) and the pmap lets the
hardware fill the object (`lazy_zero_fill`). When anything else looks at the object
(another reference: a copy, a share, a clip; vm_protect; a lookup that misses; part of
it freed) the fill stops (`lazy_freeze`: faults on holes reach the VM again), and each
page the machine made becomes a dirty resident page when a lookup asks for it
(`lazy_page`), so a copy of a GiB filled this way costs what a copy of resident memory
costs. Pageout short of frames makes them all resident at once and takes back the
frames no page needed (`lazy_end`). Freeing the whole object needs no look at all
(`lazy_drop`).

Extents. The pages a data manager provides beyond those faults wait for (a request's
read-ahead) need nothing of the VM one by one until something looks at one of them:
they are resident, clean, unlocked and unwired. `extent_grab` takes their frames off
the free queue as one run, an extent of the object (`VmObject.extents`: start offset
-> frames), with no page structure, table entry or queue entry each; fault-around maps
an extent's frames straight from it (`extent_frames`), and freeing frees it with one
backend call (`extents_free`). A lookup of one of its pages (a write fault, a read
through another map) makes that extent pages (`page_at`), anything that walks an
object's pages (`VmObject.memq`) makes all of the object's, and pageout short of
frames makes every extent pages (`extents_make_all`), so the paper's per-page
semantics hold wherever something looks.

Invariants (kernel lock): a page is tabled (`object` set) iff it is in its object's
memq, and `tabled` counts such pages and the pages of extents (`extent_pages` of
them); an offset is in an object's memq or in one of its extents, never both; a
tabled page is on exactly one of active/inactive unless it is busy or wired (then on
none); a free frame is on `free`, its page (if made) is untabled with queue "free";
an extent's frames are on no queue. The reserved pool: only
vm-privileged threads (the pageout daemon and the default pager, 6.2.3) may take the
last `reserved` free frames.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from pymach.include.vm_param import VM_PROT_NONE

if TYPE_CHECKING:
    from pymach.pmap.pmap import PhysicalMemory
    from pymach.vm.vm_object import VmObject


class VmPage:
    """One resident page (see module docstring). Fields guarded by the kernel lock."""

    __slots__ = ("_busy", "absent", "dirty", "error", "frame", "fresh", "object", "offset",
                 "page_lock", "precious", "queue", "substitute", "unlock_request",
                 "wire_count")

    def __init__(self, frame: int) -> None:
        self.frame = frame  # immutable: the physical frame this structure describes
        self.object: VmObject | None = None
        self.offset = 0
        self._busy = False  # data in transit (pagein, copy); others wait (`busy`)
        self.absent = False  # busy, and waiting for the data manager's data
        self.error = ""  # the data manager reported an error for this page
        self.dirty = False  # software modify bit (the pmap holds the hardware one)
        self.precious = False  # the pager must get it back even if clean
        self.substitute = False  # zeros given after a manager's timeout: never written back
        # to the manager (once written, the default pager backs it: vm_pageout.py)
        self.fresh = False  # settled for a waiting fault that may not have used it yet:
        # pageout passes over it once, as if referenced; eviction takes it last
        self.page_lock = VM_PROT_NONE  # access the data manager prevents (pager_data_lock)
        self.unlock_request = VM_PROT_NONE  # access already asked for by pager_data_unlock
        self.wire_count = 0
        self.queue = ""  # "active", "inactive", "free" or "" (on none)

    def reset(self) -> None:
        """Back to what a new structure holds, but for its frame (the page is untabled:
        its frame was just taken off the free queue)."""
        self.object = None
        self.queue = self.error = ""
        self._busy = self.absent = self.dirty = self.precious = self.substitute = \
            self.fresh = False
        self.page_lock = self.unlock_request = VM_PROT_NONE
        self.wire_count = 0

    @property
    def busy(self) -> bool:
        """Data in transit (pagein, copy): others wait. Counted in its object's
        `busy_pages` while it is tabled there."""
        return self._busy

    @busy.setter
    def busy(self, value: bool) -> None:
        if value != self._busy:
            obj = self.object
            if obj is not None and obj._memq.get(self.offset) is self:
                obj.busy_pages += 1 if value else -1
            self._busy = value

    def __repr__(self) -> str:
        where = f"obj{self.object.serial}+{self.offset:#x}" if self.object else "free"
        return f"<VmPage frame={self.frame} {where} {self.queue}>"


@dataclass
class VmStatistics:
    """Counters for vm_statistics (host-wide, like Mach's). Guarded by the kernel lock."""

    faults: int = 0
    zero_fill_count: int = 0
    cow_faults: int = 0
    pageins: int = 0
    pageouts: int = 0
    reactivations: int = 0
    lookups: int = 0
    hits: int = 0
    pager_messages: int = 0  # kernel-to-manager messages sent (pymach)

    def as_dict(self) -> dict[str, int]:
        """The counters as plain data."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


class VmResident:
    """The per-kernel page table, hash and queues (see module docstring)."""

    def __init__(self, phys: PhysicalMemory, reserved: int) -> None:
        self.phys = phys  # immutable
        self.page_size = phys.page_size  # immutable
        self.pages: list[VmPage | None] = [None] * phys.nframes
        self.free: list[int] = list(range(phys.nframes - 1, -1, -1))  # (a stack: the
        # frames taken next are at the end; a fresh kernel hands out 0, 1, 2, ...)
        self.active: dict[VmPage, None] = {}  # insertion order = LRU order
        self.inactive: dict[VmPage, None] = {}
        self.tabled = 0  # pages in some object's memq, or in an extent
        self.extent_pages = 0  # pages held in extents (tabled, on no queue)
        self.extent_objects: dict[VmObject, None] = {}  # objects that have extents
        self.manager_pages: dict[object, int] = {}  # resident pages of external objects
        # by the data manager they count for (`manager_key`; paper 6.1's limit), kept
        # as pages are tabled and untabled (`_count`); no zero entries
        self.reserved = reserved  # frames only vm-privileged threads may take (6.2.3)
        self.stats = VmStatistics()
        self.on_free: Callable[[], None] | None = None  # called when a frame is freed
        self.lazy: dict[VmObject, None] = {}  # objects the machine zero-fills

    # -- lookup and tabling -----------------------------------------------------------
    def vm_page_lookup(self, obj: VmObject, offset: int) -> VmPage | None:
        """The resident page of `obj` at `offset`, or None (counts lookups and hits)."""
        self.stats.lookups += 1
        page = obj._memq.get(offset)
        if page is None and obj.extents:
            page = self.page_at(obj, offset)
        if page is None and obj.lazy_frames is not None:
            page = self.lazy_page(obj, offset)  # the machine may have made it
        if page is not None:
            self.stats.hits += 1
        return page

    def vm_page_insert(self, page: VmPage, obj: VmObject, offset: int) -> None:
        """Table `page` as `obj`'s page at `offset` (no page may be there yet)."""
        self._table(page, obj, offset)
        self.phys.frame_bind(page.frame, obj, offset)

    def _table(self, page: VmPage, obj: VmObject, offset: int) -> None:
        if obj.extents:  # (no page over an extent's: it becomes pages first)
            self._extent_make_at(obj, offset)
        self._count(obj, 1)
        page.object, page.offset = obj, offset
        obj._memq[offset] = page
        obj.busy_pages += page._busy
        self.tabled += 1

    def _untable(self, page: VmPage) -> None:
        obj = page.object
        if obj is not None and obj._memq.get(page.offset) is page:
            self._count(obj, -1)
            del obj._memq[page.offset]
            obj.busy_pages -= page._busy
            self.tabled -= 1
        page.object = None

    # -- pages by data manager (paper 6.1) ----------------------------------------------
    def _count(self, obj: VmObject, delta: int) -> None:
        """`delta` pages are about to be tabled in (or, negative, untabled from) `obj`
        (delta 0: none): counted for its data manager, the object's pages moved first
        to the manager it has now if its pager port's receive right moved since they
        were counted (VmSystem.pager_receiver_changed does that for every object of a
        port when the right moves; an object whose pager is gone keeps its pages
        counted where they were until they leave)."""
        key, held = manager_key(obj), obj.counted_as
        if key is None:
            if held is None:
                return  # the kernel's own objects count for nobody
            key = held  # (its pager port gone: its pages leave where they counted)
        counts = self.manager_pages
        if key is not held:
            have = len(obj._memq) + obj.extent_pages()
            if held is not None:
                _add(counts, held, -have)
            _add(counts, key, have)
            obj.counted_as = key
        _add(counts, key, delta)

    def manager_resident(self, obj: VmObject) -> int:
        """The resident pages of the data manager of external object `obj`, all its
        objects together (see `_count`). O(1)."""
        self._count(obj, 0)
        return self.manager_pages.get(obj.counted_as, 0)

    def vm_page_rename(self, page: VmPage, obj: VmObject, offset: int) -> None:
        """Move a tabled page, data and all, to another object and offset."""
        if page.object is not None and not page.object.internal:
            page.object.pages_left([page])
        self._untable(page)
        self._table(page, obj, offset)
        self.phys.frame_move(page.frame, obj, offset)

    def vm_pages_rename(self, pages: list[VmPage], obj: VmObject, offsets: list[int]) -> None:
        """vm_page_rename of each tabled page to the offset at its place in `offsets`
        (pages of one object: a run leaving for a holding object), the data moved with
        one backend call (frames_move)."""
        if not pages:
            return
        source = pages[0].object
        assert all(page.object is source for page in pages)
        if source is not None and not source.internal:
            source.pages_left(pages)
        for page, offset in zip(pages, offsets, strict=True):
            self._untable(page)
            self._table(page, obj, offset)
        self.phys.frames_move([page.frame for page in pages], obj, offsets)

    # -- frames -----------------------------------------------------------------------
    def free_count(self) -> int:
        """Frames on the free queue."""
        return len(self.free)

    def vm_page_grab(self, privileged: bool) -> VmPage | None:
        """Take a free frame's page structure, or None if none may be taken now."""
        if not self.free or (len(self.free) <= self.reserved and not privileged):
            return None
        return self._fresh_page(self.free.pop())

    def vm_page_grab_run(self, obj: VmObject, offsets: list[int],
                         privileged: bool) -> list[VmPage]:
        """New pages of `obj` at `offsets` (where it has none), in order, tabled and
        active: what vm_page_grab, vm_page_insert and vm_page_activate of each would
        make, with one backend call for all (frames_bind). Only the first ones if fewer
        frames may be taken now."""
        frames = self._take_free(len(offsets), privileged)
        offsets = offsets[:len(frames)]
        self._count(obj, len(offsets))
        pages = self._table_active(obj, offsets, frames)
        self.tabled += len(pages)
        self.phys.frames_bind(frames, obj, offsets)
        return pages

    def _take_free(self, n: int, privileged: bool) -> list[int]:
        """Up to `n` frames off the free queue: as many as may be taken now (the last
        `reserved` only by vm-privileged threads)."""
        room = len(self.free) - (0 if privileged else self.reserved)
        return self._pop_frames(min(n, room))

    def _pop_frames(self, n: int) -> list[int]:
        """The `n` frames at the top of the free stack (none if n <= 0), taken off it
        in one slice, in the order single pops would have given them."""
        if n <= 0:
            return []
        free = self.free
        frames = free[-n:]
        del free[-n:]
        frames.reverse()
        return frames

    def _table_active(self, obj: VmObject, offsets: Iterable[int],
                      frames: list[int]) -> list[VmPage]:
        """The page structures of `frames` (just taken off the free queue, or an
        extent's), reset, each put in `obj`'s memq at its offset and at the end of the
        active queue (_fresh_page, inline: this loop is a stream's per-page cost). The
        caller counts them as tabled."""
        table, memq, active = self.pages, obj._memq, self.active
        pages = []
        for off, frame in zip(offsets, frames, strict=True):
            page = table[frame]
            if page is None:
                page = table[frame] = VmPage(frame)
            else:
                page.reset()
            page.object, page.offset, page.queue = obj, off, "active"
            memq[off] = page
            active[page] = None
            pages.append(page)
        return pages

    def _fresh_page(self, frame: int) -> VmPage:
        """The page structure of a frame just taken off the free queue, reset. The frame
        needs no pmap work: the pmap contract clears a frame's reference and modify
        bits when it is freed (frames_discard), and a frame never freed has none."""
        page = self.pages[frame]
        if page is None:  # a new structure is reset already
            page = self.pages[frame] = VmPage(frame)
        else:
            page.reset()
        return page

    def vm_page_free(self, page: VmPage) -> None:
        """Untable the page, drop every mapping of its frame, and put the frame on free."""
        obj, off = page.object, page.offset
        self.vm_pages_free(obj, [page], [] if obj is None else [(off, off + self.page_size)])

    def vm_pages_free(self, obj: VmObject | None, pages: list[VmPage],
                      runs: list[tuple[int, int]]) -> None:
        """vm_page_free of each of `pages`, all tabled in `obj` (None: all untabled), in
        one step: `runs` are ranges [start, end) of `obj`'s offsets whose resident
        pages are exactly these (no other resident page of `obj` lies in a run), which
        the backend may drop a run at a time (frames_discard)."""
        if not pages:
            return
        if obj is not None:
            if not obj.internal:
                obj.pages_left(pages)
            self._count(obj, -len(pages))
            obj.busy_pages -= sum(page._busy for page in pages)
            memq = obj._memq
            if len(pages) == len(memq):  # all of them: the object's table empties at once
                memq.clear()
            else:
                for page in pages:
                    del memq[page.offset]
            self.tabled -= len(pages)
        frames = self._dequeue(pages, freeing=True)
        self.phys.frames_discard(obj, runs, frames)
        self._release(frames)

    # -- zero fill by the machine (module docstring) ---------------------------------------
    def lazy_begin(self, obj: VmObject, keep_free: int) -> bool:
        """Let the machine zero-fill `obj` (internal, fresh, no page yet, seen by one
        mapping) on first touch: hold a free frame for each of its pages, leaving at
        least `keep_free` frames free. False (nothing changed) if memory is short or
        the machine cannot."""
        n = -(-obj.size // self.page_size)
        if obj.memq or obj.lazy_frames is not None or \
                len(self.free) - n < self.reserved + keep_free:
            return False
        if not self.phys.lazy_zero_fill(obj, True):
            return False
        obj.lazy_frames = self._pop_frames(n)
        obj.lazy_filling = True
        self.lazy[obj] = None
        return True

    def lazy_freeze(self, obj: VmObject) -> None:
        """Someone other than the machine's fill looks at `obj` now (another reference,
        vm_protect, a lookup): the machine fills no more holes (a fault on one reaches
        the VM again), and the pages it made become resident pages one at a time, as
        lookups ask for them (`lazy_page`), or all at once (`lazy_end`)."""
        if obj.lazy_filling:
            obj.lazy_filling = False
            self.phys.lazy_zero_fill(obj, False)

    def lazy_page(self, obj: VmObject, offset: int) -> VmPage | None:
        """A lookup of `obj` at `offset` missed: the page the machine made there, as a
        dirty resident page (it has data no pager holds), or None if it made none."""
        self.lazy_freeze(obj)
        frames = obj.lazy_frames
        made = self.phys.lazy_collect(obj, offset, offset + self.page_size)
        if frames is None or not made:
            return None
        if not frames:  # (cannot happen: a frame is held for every page)
            self.lazy_end(obj)
            return obj.memq.get(offset)
        return self._lazy_adopt(obj, [offset], frames)[0]

    def lazy_end(self, obj: VmObject) -> None:
        """The machine's zero fill of `obj` ends: each page it made becomes a dirty
        resident page, mapped where it is mapped; the held frames left over go back to
        the free queue."""
        frames = self._lazy_stop(obj)
        if frames is None:
            return
        memq = obj.memq
        made = [off for off in self.phys.lazy_collect(obj, 0, obj.size) if off not in memq]
        self._lazy_adopt(obj, made[:len(frames)], frames)
        self._release(frames)

    def _lazy_adopt(self, obj: VmObject, offsets: list[int],
                    frames: list[int]) -> list[VmPage]:
        """The pages the machine made at `offsets` of `obj`, tabled in frames taken from
        `frames` (the held ones), dirty, active, and mapped where the machine mapped
        them (lazy_adopt)."""
        pages = []
        for off in offsets:
            page = self._fresh_page(frames.pop())
            self.vm_page_insert(page, obj, off)
            page.dirty = True
            self.vm_page_activate(page)
            pages.append(page)
        self.phys.lazy_adopt(obj, [(p.offset, p.frame) for p in pages])
        self.stats.zero_fill_count += len(pages)
        return pages

    def lazy_drop(self, obj: VmObject) -> None:
        """All of `obj` goes (terminated, or its whole range freed): what the machine
        made is discarded unseen, and the held frames go back to the free queue."""
        frames = self._lazy_stop(obj)
        if frames is None:
            return
        self.phys.frames_discard(obj, [(0, obj.size)], [])
        self._release(frames)

    def _lazy_stop(self, obj: VmObject) -> list[int] | None:
        """Stop the machine's zero fill of `obj` for good; the frames it held (None: it
        was off)."""
        frames = obj.lazy_frames
        if frames is not None:
            self.lazy_freeze(obj)
            obj.lazy_frames = None
            del self.lazy[obj]
            self.phys.lazy_zero_fill(obj, False)  # (again: the backend forgets the fill)
        return frames

    def lazy_end_all(self) -> None:
        """End the machine's zero fill of every object (pageout is short of frames: the
        frames no page needed come back)."""
        for obj in list(self.lazy):
            self.lazy_end(obj)

    # -- extents (module docstring) -----------------------------------------------------
    def extent_grab(self, obj: VmObject, start: int, n: int, privileged: bool) -> list[int]:
        """Up to `n` free frames, bound to `obj`'s offsets from `start` on (where it has
        no page and no extent), as one extent: resident pages with no structures. Fewer
        (maybe none) if fewer frames may be taken now."""
        frames = self._take_free(n, privileged)
        if not frames:
            return []
        n, ps = len(frames), self.page_size
        self._count(obj, n)
        self.tabled += n
        self.extent_pages += n
        obj.extents[start] = frames
        bisect.insort(obj.extent_starts, start)
        self.extent_objects[obj] = None
        self.phys.frames_bind(frames, obj, list(range(start, start + n * ps, ps)))
        return frames

    def extent_of(self, obj: VmObject, offset: int) -> int | None:
        """The start of `obj`'s extent that holds `offset`, or None."""
        starts = obj.extent_starts
        i = bisect.bisect_right(starts, offset) - 1
        if i < 0:
            return None
        start = starts[i]
        return start if offset < start + len(obj.extents[start]) * self.page_size else None

    def extent_after(self, obj: VmObject, offset: int) -> int | None:
        """The start of `obj`'s first extent that begins after `offset`, or None."""
        starts = obj.extent_starts
        i = bisect.bisect_right(starts, offset)
        return starts[i] if i < len(starts) else None

    def extents_in(self, obj: VmObject, start: int, end: int) -> list[tuple[int, int]]:
        """The ranges [s, e) of `obj`'s extents that meet [start, end), in order (a look
        at those only: an object may have thousands)."""
        starts, ps = obj.extent_starts, self.page_size
        i = max(bisect.bisect_right(starts, start) - 1, 0)
        out = []
        while i < len(starts) and starts[i] < end:
            s = starts[i]
            e = s + len(obj.extents[s]) * ps
            if start < e:
                out.append((s, e))
            i += 1
        return out

    def extent_frames(self, obj: VmObject, offset: int, end: int) -> list[int]:
        """The frames of `obj`'s pages from `offset` up to `end` that one extent holds
        (empty if no extent holds `offset`)."""
        start = self.extent_of(obj, offset)
        if start is None:
            return []
        ps = self.page_size
        return obj.extents[start][(offset - start) // ps:(end - start) // ps]

    def page_at(self, obj: VmObject, offset: int) -> VmPage | None:
        """`obj`'s resident page at `offset`, made from its extent if one holds it."""
        page = obj._memq.get(offset)
        if page is None and obj.extents and self._extent_make_at(obj, offset):
            page = obj._memq.get(offset)
        return page

    def _extent_make_at(self, obj: VmObject, offset: int) -> bool:
        """Make the extent that holds `offset` pages, if one does (True)."""
        start = self.extent_of(obj, offset)
        if start is not None:
            self._extent_make(obj, start)
        return start is not None

    def _extent_make(self, obj: VmObject, start: int) -> None:
        """Give each page of `obj`'s extent at `start` a page structure: tabled (they
        were counted as they came), clean, active (after the pages already there)."""
        frames = obj.extents.pop(start)
        obj.extent_starts.remove(start)
        if not obj.extents:
            del self.extent_objects[obj]
        self.extent_pages -= len(frames)
        ps = self.page_size
        self._table_active(obj, range(start, start + len(frames) * ps, ps), frames)

    def extents_make(self, obj: VmObject) -> None:
        """Make every extent of `obj` pages (something walks its pages)."""
        for start in list(obj.extent_starts):
            self._extent_make(obj, start)

    def extents_make_all(self) -> None:
        """Make every extent pages (pageout needs to see each page)."""
        for obj in list(self.extent_objects):
            self.extents_make(obj)

    def extents_free(self, obj: VmObject, start: int, end: int) -> None:
        """Free `obj`'s extents that lie within [start, end) with one backend call each
        and no page structures; one that lies only partly within becomes pages, for
        the caller to free as pages."""
        for s, e in self.extents_in(obj, start, end):
            if not (start <= s and e <= end):
                self._extent_make(obj, s)
                continue
            n = len(obj.extents[s])
            self._count(obj, -n)  # (before they leave: _count may move them all)
            frames = obj.extents.pop(s)
            obj.extent_starts.remove(s)
            self.extent_pages -= n
            self.tabled -= n
            if not obj.internal:
                obj.runs_left([(s, e)], n)
            self.phys.frames_discard(obj, [(s, e)], frames)
            self._release(frames)
        if not obj.extents:
            self.extent_objects.pop(obj, None)

    def _release(self, frames: list[int]) -> None:
        if frames:
            self.free.extend(frames)
            if self.on_free is not None:
                self.on_free()

    # -- the pageout queues -----------------------------------------------------------
    def _dequeue(self, pages: Iterable[VmPage], freeing: bool = False) -> list[int]:
        """Take each page off the queue it is on. `freeing`: the pages are being freed,
        so each is also marked free and untabled (the caller empties its object's memq),
        in the same pass; their frames are returned."""
        active, inactive = self.active, self.inactive
        frames = []
        for page in pages:
            if page.queue == "active":
                del active[page]
            elif page.queue == "inactive":
                del inactive[page]
            page.queue = ""
            if freeing:
                page.object, page.queue, page.busy, page.absent = None, "free", False, False
                frames.append(page.frame)
        return frames

    def vm_page_activate(self, page: VmPage) -> None:
        """Put the page at the most-recently-used end of the active queue."""
        self._dequeue((page,))
        if page.wire_count == 0:
            self.active[page] = None
            page.queue = "active"

    def vm_page_deactivate(self, page: VmPage) -> None:
        """Move the page to the inactive queue, clearing its reference bit."""
        self._dequeue((page,))
        self.phys.pmap_clear_reference(page.frame)
        if page.wire_count == 0:
            self.inactive[page] = None
            page.queue = "inactive"

    def vm_page_wire(self, page: VmPage) -> None:
        """Keep the page out of pageout's reach until unwired."""
        self._dequeue((page,))
        page.wire_count += 1

    def vm_page_unwire(self, page: VmPage) -> None:
        """Undo one vm_page_wire; the last one puts the page back on the active queue."""
        page.wire_count -= 1
        if page.wire_count == 0:
            self.vm_page_activate(page)

    def wired_count(self) -> int:
        """Pages that are tabled but on no queue (wired or busy; not those of extents)."""
        return self.tabled - len(self.active) - len(self.inactive) - self.extent_pages

    def active_count(self) -> int:
        """Pages in use: those on the active queue and those of extents."""
        return len(self.active) + self.extent_pages

    def vm_page_is_dirty(self, page: VmPage) -> bool:
        """Fold the hardware modify bit into the page's dirty flag; return it."""
        if self.phys.pmap_is_modified(page.frame):
            page.dirty = True
            self.phys.pmap_clear_modify(page.frame)
        return page.dirty


def manager_key(obj: VmObject) -> object | None:
    """What the resident pages of `obj` count for against `manager_page_limit` (paper
    6.1): for an external object, the task that holds its pager port's receive right
    (every object of one manager counts together), or the port itself while no task
    holds it; None for the kernel's own objects."""
    pager = obj.pager
    if obj.internal or pager is None:
        return None
    return pager.receiver or pager


def _add(counts: dict[object, int], key: object, n: int) -> None:
    """counts[key] += n, with no zero entries left."""
    left = counts.get(key, 0) + n
    if left:
        counts[key] = left
    else:
        counts.pop(key, None)
