"""SoftPmap: simulated page frames and a software MMU, for the embedded kernel.

Physical memory is one anonymous mmap of `nframes * page_size` bytes. A `SoftPmap` is a page
table of chunks of 1024 pages: each chunk a dict from virtual page number to a packed
entry ``frame << 3 | prot``, plus an optional chunk-wide protection mask, so protecting
or removing a large range costs per chunk, not per page (what copy-on-write of a big
region needs). Task
threads reach memory only through `mmu_read` / `mmu_write`, which play the hardware:
they translate one page, check the protection, copy bytes, and set the frame's
reference (and modify) bit, all under the backend lock, or report a fault and touch
nothing. Because translation and copy happen under that lock, a frame the VM takes away
(pmap_page_protect NONE, then reuse) is never read through a stale translation.

Invariants (`lock`): `pv[frame]` holds every (pmap, vpn) pair whose entry names `frame`,
and possibly stale pairs left by chunk-wide removal (checked and dropped when walked);
an entry's effective protection is its own ANDed with its chunk's mask.
"""

from __future__ import annotations

import contextlib
import mmap
import threading
from collections.abc import Callable
from typing import Any

from pymach.errors import MachError
from pymach.include.vm_param import VM_PROT_NONE, VM_PROT_READ, VM_PROT_WRITE

_PROT_MASK = 0x7


class SoftPhysicalMemory:
    """Frames, their reference/modify bits and pv lists (see module docstring)."""

    maps_objects = False  # the pmap contract's capabilities (pmap.py)
    dirty_by_fault = False
    task_window: tuple[int, int] | None = None
    huge = 0  # (simulated frames are never huge pages)
    object_windows = False

    def object_write_protect(self, obj: Any) -> bool:
        """No shortcut here: the VM protects the object's pages one by one."""
        return False

    def __init__(self, page_size: int, nframes: int, simulated: bool = True) -> None:
        self.page_size = page_size  # immutable
        self.nframes = nframes  # immutable
        self.lock = threading.Lock()  # the memory bus: a leaf lock over everything below
        size = page_size * nframes if simulated else page_size
        self.mem = mmap.mmap(-1, size)  # zero pages, allocated lazily by the OS
        self.mv = memoryview(self.mem)
        self.referenced = bytearray(nframes)
        self.modified = bytearray(nframes)
        self.pv: dict[int, set[tuple[PageTable, int]]] = {}
        self._zero = bytes(page_size)

    def pmap_create(self) -> SoftPmap:
        """A new, empty page table."""
        return SoftPmap(self)

    def pmap_page_protect(self, frame: int, prot: int) -> None:
        """Reduce every mapping of `frame` to at most `prot`; NONE removes them all."""
        with self.lock:
            if prot == VM_PROT_NONE:
                self._unmap_locked([frame])
                return
            holders = self.pv.get(frame)
            for pmap, vpn in list(holders or ()):
                if pmap.maps_locked(vpn, frame):
                    pmap.reduce_locked(vpn, prot)
                else:  # left behind by a chunk-wide removal
                    holders.discard((pmap, vpn))  # type: ignore[union-attr]
            if holders is not None and not holders:
                self.pv.pop(frame, None)

    def pmap_page_discard(self, frame: int) -> None:
        """Remove every mapping of `frame` (its data stay: nothing here costs to keep)."""
        with self.lock:
            self._unmap_locked([frame])
            self._forget_locked([frame])

    def frames_discard(self, obj: object | None, runs: list[tuple[int, int]],
                       frames: list[int]) -> None:
        """Remove every mapping of each frame, in one pass (simulated frames are
        anonymous: there is nothing to unbind, and the runs do not matter)."""
        with self.lock:
            self._unmap_locked(frames)
            self._forget_locked(frames)

    def _forget_locked(self, frames: list[int]) -> None:
        """Frames being freed: clear their reference and modify bits (a free frame has
        neither, so taking one needs no pmap work)."""
        referenced, modified = self.referenced, self.modified
        for frame in frames:
            referenced[frame] = modified[frame] = 0

    def _unmap_locked(self, frames: list[int]) -> None:
        """Remove every mapping of each frame and its pv list, in one pass over the
        lists: a pair left behind by chunk-wide removal (the usual case for memory
        being freed: its range was removed first) costs one dictionary probe."""
        pop = self.pv.pop
        for frame in frames:
            holders = pop(frame, None)
            if holders:
                for pmap, vpn in holders:
                    chunk = pmap.chunks.get(vpn >> CHUNK_SHIFT)  # maps_locked, inline:
                    if chunk is not None and chunk.get(vpn, 0) >> 3 == frame:  # per page
                        pmap.reduce_locked(vpn, VM_PROT_NONE)

    def discard_batch(self) -> contextlib.AbstractContextManager[None]:
        """Nothing to batch here: discards are done at once."""
        return contextlib.nullcontext()

    def pmap_is_referenced(self, frame: int) -> bool:
        """The frame's reference bit."""
        return bool(self.referenced[frame])

    def pmap_clear_reference(self, frame: int) -> None:
        """Clear the frame's reference bit."""
        self.referenced[frame] = 0

    def pmap_is_modified(self, frame: int) -> bool:
        """The frame's modify bit."""
        return bool(self.modified[frame])

    def pmap_clear_modify(self, frame: int) -> None:
        """Clear the frame's modify bit."""
        self.modified[frame] = 0

    def pmap_zero_page(self, frame: int) -> None:
        """Fill the frame with zeros."""
        base = frame * self.page_size
        self.mv[base:base + self.page_size] = self._zero

    def pmap_copy_page(self, src: int, dst: int) -> None:
        """Copy frame `src` onto frame `dst`."""
        ps = self.page_size
        self.mv[dst * ps:(dst + 1) * ps] = self.mv[src * ps:(src + 1) * ps]

    def phys_read(self, frame: int, offset: int = 0, size: int | None = None) -> bytes:
        """Bytes of a frame (kernel access: no reference bits change)."""
        n = self.page_size - offset if size is None else size
        base = frame * self.page_size + offset
        return bytes(self.mv[base:base + n])

    def phys_read_into(self, frames: list[int], into: memoryview, skip: int = 0) -> None:
        """Copy the bytes of `frames` from `skip` on into `into` (see pmap.py; a run of
        adjacent frames is one slice)."""
        ps, mv, at = self.page_size, self.mv, 0
        for lo, hi in frame_runs(frames):
            n = min((hi - lo) * ps - skip, len(into) - at)
            if n <= 0:
                break
            into[at:at + n] = mv[lo * ps + skip:lo * ps + skip + n]
            at, skip = at + n, 0

    def phys_write(self, frame: int, data: bytes | memoryview, offset: int = 0) -> None:
        """Store bytes into a frame (kernel access)."""
        base = frame * self.page_size + offset
        self.mv[base:base + len(data)] = data

    def phys_write_pages(self, writes: list[tuple[int, bytes | memoryview]]) -> None:
        """phys_write of each (frame, data) pair, in order."""
        for frame, data in writes:
            self.phys_write(frame, data)

    def phys_write_run(self, frames: list[int], data: bytes | memoryview) -> None:
        """Store `data` into `frames`, a page each, in order (a run of adjacent frames
        is one slice)."""
        ps, mv, at = self.page_size, self.mv, 0
        with memoryview(data) as view:
            for lo, hi in frame_runs(frames):
                n = (hi - lo) * ps
                mv[lo * ps:hi * ps] = view[at:at + n]
                at += n

    def object_view(self, obj: object, start: int, end: int
                    ) -> contextlib.AbstractContextManager[memoryview | None]:
        """Simulated frames lie anywhere in memory: no view of an object (None)."""
        return contextlib.nullcontext(None)

    def object_window(self, obj: object) -> int | None:
        """Simulated frames lie in no file: no window."""
        return None

    def phys_placed_run(self, frames: list[int]) -> None:
        """Never asked (no window is ever given): an error if it is."""
        raise MachError("KERN_FAILURE", "simulated frames have no object windows")

    def object_pages_home(self, frames: list[int]) -> bool:
        """Simulated frames lie in no window: False."""
        return False

    # -- where frames live: simulated frames are anonymous, nothing to do --------------
    def frame_bind(self, frame: int, obj: object, offset: int) -> None:
        """A frame now caches `obj` at `offset`."""

    def frames_bind(self, frames: list[int], obj: object, offsets: list[int]) -> None:
        """Frames now cache pages of `obj`."""

    def frame_unbind(self, frame: int) -> None:
        """A frame caches nothing any more."""

    def frame_move(self, frame: int, obj: object, offset: int) -> None:
        """A frame's page moves to another object and offset, data and all."""

    def frames_move(self, frames: list[int], obj: object, offsets: list[int]) -> None:
        """Frames' pages move to another object, data and all."""

    def object_gone(self, obj: object) -> Callable[[], None] | None:
        """An object was terminated: nothing kept for it here."""
        return None

    def lazy_zero_fill(self, obj: object, on: bool) -> bool:
        """Simulated frames are filled by the VM: no zero fill by the machine."""
        return not on

    def lazy_collect(self, obj: object, start: int, end: int) -> list[int]:
        """Nothing was filled behind the VM's back."""
        return []

    def lazy_adopt(self, obj: object, pages: list[tuple[int, int]]) -> None:
        """Nothing to adopt (lazy_collect reports no page)."""


CHUNK_SHIFT = 10  # a page table chunk covers 1024 pages


class PageTable:
    """The bookkeeping of one address space's mappings (shared by both backends)."""

    def __init__(self, phys: SoftPhysicalMemory) -> None:
        self.phys = phys  # immutable
        self.shift = phys.page_size.bit_length() - 1 if _pow2(phys.page_size) else 0
        # Guarded by phys.lock: chunk number -> {vpn: frame << 3 | prot}, and per-chunk
        # protection masks (a chunk-wide pmap_protect, applied lazily to its entries).
        self.chunks: dict[int, dict[int, int]] = {}
        self.masks: dict[int, int] = {}

    def _vpn(self, va: int) -> int:
        return va >> self.shift if self.shift else va // self.phys.page_size

    def _entry(self, vpn: int) -> int | None:
        """The effective entry for `vpn` (chunk mask applied), or None."""
        chunk = self.chunks.get(vpn >> CHUNK_SHIFT)
        if chunk is None:
            return None
        e = chunk.get(vpn)
        if e is None:
            return None
        mask = self.masks.get(vpn >> CHUNK_SHIFT)
        return e if mask is None else (e & ~_PROT_MASK) | (e & mask)

    # -- the pmap contract ---------------------------------------------------------------
    def pmap_enter(self, va: int, frame: int, prot: int) -> None:
        """Map page `va` to `frame` with `prot`, replacing any mapping of `va`."""
        with self.phys.lock:
            self.enter_locked(self._vpn(va), frame, prot)

    def enter_locked(self, vpn: int, frame: int, prot: int) -> None:
        """The table side of pmap_enter for page number `vpn` (phys.lock held)."""
        self._unmask_locked(vpn >> CHUNK_SHIFT)
        self._drop_locked(vpn)
        if prot != VM_PROT_NONE:
            self.chunks.setdefault(vpn >> CHUNK_SHIFT, {})[vpn] = frame << 3 | prot
            self.phys.pv.setdefault(frame, set()).add((self, vpn))

    def enter_run_locked(self, vpn: int, frames: list[int], prot: int) -> None:
        """enter_locked of pages vpn, vpn + 1, ... to `frames` (phys.lock held): each
        chunk's mask is applied once, and an entry is dropped first only where the page
        was mapped."""
        if prot == VM_PROT_NONE:
            for i, frame in enumerate(frames):
                self.enter_locked(vpn + i, frame, prot)
            return
        pv, c0, chunk = self.phys.pv, -1, {}
        for v, frame in enumerate(frames, vpn):
            if v >> CHUNK_SHIFT != c0:
                c0 = v >> CHUNK_SHIFT
                self._unmask_locked(c0)
                chunk = self.chunks.setdefault(c0, {})
            if v in chunk:
                self._drop_locked(v)
            chunk[v] = frame << 3 | prot
            holders = pv.get(frame)
            if holders is None:  # (no empty set made for a frame that has one)
                pv[frame] = {(self, v)}
            else:
                holders.add((self, v))

    def pmap_enter_run(self, va: int, frames: list[int], prot: int) -> None:
        """pmap_enter of pages va, va + page_size, ... to `frames` in order."""
        with self.phys.lock:
            self.enter_run_locked(self._vpn(va), frames, prot)

    def pmap_enter_around(self, va: int, frames: list[int], prot: int) -> None:
        """pmap_enter of each page of the run with no mapping now (see the contract)."""
        vpn = self._vpn(va)
        with self.phys.lock:
            for lo, hi in self.unmapped_runs_locked(vpn, len(frames)):
                self.enter_run_locked(vpn + lo, frames[lo:hi], prot)

    def unmapped_runs_locked(self, vpn: int, n: int) -> list[tuple[int, int]]:
        """Index ranges [lo, hi) of pages vpn .. vpn+n-1 that have no mapping with any
        access now (phys.lock held)."""
        runs: list[tuple[int, int]] = []
        lo, c0, chunk, mask = -1, -1, None, None
        for i in range(n + 1):
            v = vpn + i
            if v >> CHUNK_SHIFT != c0:  # each chunk and its mask looked up once
                c0 = v >> CHUNK_SHIFT
                chunk, mask = self.chunks.get(c0), self.masks.get(c0)
            e = (chunk.get(v) if chunk else None) if i < n else _PROT_MASK  # (past the
            # end: mapped)
            if e is not None and mask is not None and i < n:
                e &= mask | ~_PROT_MASK
            if e is None or not e & _PROT_MASK:
                if lo < 0:
                    lo = i
            elif lo >= 0:
                runs.append((lo, i))
                lo = -1
        return runs

    def pmap_remove(self, start: int, end: int) -> None:
        """Remove every mapping of a page in [start, end)."""
        self.pmap_protect(start, end, VM_PROT_NONE)

    def pmap_protect(self, start: int, end: int, prot: int) -> None:
        """Reduce mappings in [start, end) to at most `prot`: chunks whose entries all
        lie in the range at once (by mask, or dropped at NONE), the others entry by
        entry; then the hardware, told every entry lowered."""
        lo, hi = self._vpn(start), self._vpn(end + self.phys.page_size - 1)
        with self.phys.lock:
            lowered: list[int] = []
            for c in self._chunks_in(lo >> CHUNK_SHIFT, hi >> CHUNK_SHIFT):
                if self._covered(c, lo, hi):
                    lowered += self.chunks[c]
                    self._protect_chunk_locked(c, prot)
                    continue
                lowered += self._reduce_ragged_locked(c, lo, hi, prot)
            self.protect_hw_locked(start, end, prot, lowered)

    def _chunks_in(self, first: int, last: int) -> list[int]:
        """The chunks of [first, last] that hold entries: looked up one by one when the
        range spans fewer chunks than the table holds, else found by a walk of the
        table (a page's protect in a task with thousands of chunks walked them all)."""
        chunks = self.chunks
        if last - first < len(chunks):
            return [c for c in range(first, last + 1) if c in chunks]
        return [c for c in chunks if first <= c <= last]

    def _covered(self, c: int, lo: int, hi: int) -> bool:
        """True if every entry chunk `c` may hold, or does hold, lies in [lo, hi): then
        the chunk-wide mask does the protect (a GiB of 2 MiB pages fills half a chunk)."""
        if lo <= c << CHUNK_SHIFT and (c + 1) << CHUNK_SHIFT <= hi:
            return True
        chunk = self.chunks[c]
        return not chunk or (lo <= min(chunk) and max(chunk) < hi)

    def _reduce_ragged_locked(self, c: int, lo: int, hi: int, prot: int) -> list[int]:
        """Lower the entries of chunk `c` within [lo, hi) to at most `prot` in one pass
        (`_reduce_entry_locked` for each, without a call per entry: a GiB of 2 MiB pages
        is 512 entries of one chunk); returns their vpns."""
        self._unmask_locked(c)
        chunk = self.chunks.get(c, {})
        vpns = [v for v in chunk if lo <= v < hi]
        keep = ~_PROT_MASK | prot
        for vpn in vpns:
            e = chunk[vpn]
            if e & prot & _PROT_MASK:
                chunk[vpn] = e & keep
            else:
                self._drop_locked(vpn)
        return vpns

    def _protect_chunk_locked(self, c: int, prot: int) -> None:
        if prot == VM_PROT_NONE:  # pv pairs left behind are dropped lazily
            del self.chunks[c]
            self.masks.pop(c, None)
        else:
            self.masks[c] = self.masks.get(c, _PROT_MASK) & prot

    def _unmask_locked(self, c: int) -> None:
        """Apply a chunk's mask to its entries, so one entry may differ from it."""
        mask = self.masks.pop(c, None)
        if mask is None:
            return
        chunk = self.chunks.get(c, {})
        for vpn, e in list(chunk.items()):
            if e & mask & _PROT_MASK:
                chunk[vpn] = (e & ~_PROT_MASK) | (e & mask)
            else:
                self._drop_locked(vpn)

    def pmap_extract(self, va: int) -> int | None:
        """The frame page `va` is mapped to, or None."""
        with self.phys.lock:
            e = self._entry(self._vpn(va))
        return None if e is None or not e & _PROT_MASK else e >> 3

    def pmap_access(self, va: int) -> int:
        """The access the MMU allows at page `va` now (VM_PROT_NONE if unmapped)."""
        with self.phys.lock:
            e = self._entry(self._vpn(va))
        return 0 if e is None else e & _PROT_MASK

    def pmap_resident_count(self) -> int:
        """How many pages this pmap maps."""
        with self.phys.lock:
            return sum(1 for i, c in self.chunks.items()
                       for e in c.values() if e & self.masks.get(i, _PROT_MASK) & _PROT_MASK)

    def pmap_destroy(self) -> None:
        """Remove every mapping."""
        with self.phys.lock:
            self.chunks.clear()
            self.masks.clear()

    def pmap_map_entry(self, vmap: Any, entry: Any) -> None:
        """Nothing to do: the software MMU maps page by page at faults."""

    def pmap_unmap_range(self, start: int, end: int) -> None:
        """Nothing to do (the VM removed the range's mappings already)."""

    def pmap_entry_protected(self, vmap: Any, entry: Any, start: int, end: int) -> None:
        """Nothing to do (pmap_protect lowered the mappings already)."""

    # -- with phys.lock held -------------------------------------------------------------
    def maps_locked(self, vpn: int, frame: int) -> bool:
        """True if this pmap's entry for `vpn` still names `frame` (pv pairs may be stale)."""
        chunk = self.chunks.get(vpn >> CHUNK_SHIFT)
        e = None if chunk is None else chunk.get(vpn)
        return e is not None and e >> 3 == frame

    def reduce_locked(self, vpn: int, prot: int) -> None:
        """Lower one entry's protection to at most `prot`, removing it at NONE, and make
        the hardware follow (phys.lock held). An entry already at most `prot` is left
        alone: the hardware follows every entry already (a page write-protected for a
        pageout is not write-protected again when its modify bit is cleared)."""
        if not self._reduce_entry_locked(vpn, prot):
            return
        ps = self.phys.page_size
        self.protect_hw_locked(vpn * ps, (vpn + 1) * ps, prot, [vpn])

    def protect_hw_locked(self, start: int, end: int, prot: int, vpns: list[int]) -> None:
        """Make the hardware follow entries just lowered (phys.lock held): every mapping
        in [start, end) is now at most `prot`; `vpns` are the entries lowered (for a
        backend that must fall back to one operation per entry). A backend whose MMU
        takes a whole range in one operation does it here once. The soft MMU reads the
        table itself: nothing."""

    def _reduce_entry_locked(self, vpn: int, prot: int) -> bool:
        """The table side of reduce_locked: False if the entry was there and is
        unchanged (the hardware needs nothing), True otherwise."""
        c = vpn >> CHUNK_SHIFT
        self._unmask_locked(c)
        chunk = self.chunks.get(c)
        e = None if chunk is None else chunk.get(vpn)
        if e is None:
            return True  # (the hardware may hold what the table does not: lazy zero fill)
        new = e & _PROT_MASK & prot
        if new == e & _PROT_MASK:
            return False
        if new == VM_PROT_NONE:
            self._drop_locked(vpn)
        else:
            chunk[vpn] = (e & ~_PROT_MASK) | new  # type: ignore[index]
        return True

    def _drop_locked(self, vpn: int) -> None:
        chunk = self.chunks.get(vpn >> CHUNK_SHIFT)
        e = None if chunk is None else chunk.pop(vpn, None)
        if e is not None:
            holders = self.phys.pv.get(e >> 3)
            if holders is not None:
                holders.discard((self, vpn))
                if not holders:
                    del self.phys.pv[e >> 3]



class SoftPmap(PageTable):
    """A page table plus the software MMU that task threads load and store through."""

    # -- the hardware: task threads' loads and stores ----------------------------------
    def mmu_read(self, va: int, size: int) -> bytes | None:
        """Load `size` bytes at `va` (within one page), or None: a read fault."""
        phys = self.phys
        with phys.lock:
            e = self._entry(self._vpn(va))
            if e is None or not e & VM_PROT_READ:
                return None
            frame = e >> 3
            phys.referenced[frame] = 1
            base = frame * phys.page_size + va % phys.page_size
            return bytes(phys.mv[base:base + size])

    def mmu_write(self, va: int, data: bytes | memoryview) -> bool:
        """Store `data` at `va` (within one page); False: a write fault, nothing stored."""
        phys = self.phys
        with phys.lock:
            e = self._entry(self._vpn(va))
            if e is None or not e & VM_PROT_WRITE:
                return False
            frame = e >> 3
            phys.referenced[frame] = phys.modified[frame] = 1
            base = frame * phys.page_size + va % phys.page_size
            phys.mv[base:base + len(data)] = data
            return True


def frame_runs(frames: list[int]) -> list[tuple[int, int]]:
    """`frames` as runs [lo, hi) of adjacent frames, in order."""
    runs: list[tuple[int, int]] = []
    for frame in frames:
        if runs and runs[-1][1] == frame:
            runs[-1] = (runs[-1][0], frame + 1)
        else:
            runs.append((frame, frame + 1))
    return runs


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
