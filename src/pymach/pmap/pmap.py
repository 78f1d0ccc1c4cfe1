"""The pmap contract: the one machine-dependent interface of the VM system (paper 5.5).

The machine-independent VM (vm/) keeps the truth in address maps and memory objects; a
*pmap* is the hardware's cache of virtual-to-physical translations for one address
space. Mach's rule holds for every backend: a pmap may forget any mapping at any time,
and what tasks see does not change, because the next access faults and vm_fault enters
the mapping again. A pmap never grants more access than it was given.

A backend may keep a frame's data wherever it likes: the VM tells it where each frame
belongs (`frame_bind`, `frame_unbind`, `frame_move`), so the native backend can keep a
VM object's pages in that object's memfd, which tasks map.

Freeing is done a run at a time: the VM frees the pages of an object's range (or of all
of it) with one `frames_discard`, naming the runs of the object's offsets they fill, so
a backend's cost per run can be one step (the native backend punches a run out of the
memfd with one call) and its cost per page a few dictionary operations.

Two objects make up a backend (one file each, chosen only in `pmap/__init__.py`):

- a `PhysicalMemory`: the machine's page frames, numbered 0..nframes-1, with reference
  and modify bits per frame and the physical-to-virtual (pv) lists behind
  `pmap_page_protect`;
- a `Pmap` per task: `pmap_enter`, `pmap_remove`, `pmap_protect`, `pmap_extract`.

All methods lock internally (the backend's `lock`, a leaf lock: nothing else is taken
while it is held), so the VM may call them with the kernel lock held and the "hardware"
(task threads touching memory) may use them without it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol


class Pmap(Protocol):
    """One address space's translations (see module docstring)."""

    def pmap_enter(self, va: int, frame: int, prot: int) -> None:
        """Map page `va` to `frame` with `prot`, replacing any mapping of `va`."""
        ...

    def pmap_enter_run(self, va: int, frames: list[int], prot: int) -> None:
        """pmap_enter of pages va, va + page_size, ... to `frames` in order, all with
        `prot` (a backend may install the run in one step)."""
        ...

    def pmap_enter_around(self, va: int, frames: list[int], prot: int) -> None:
        """pmap_enter of each page va + i * page_size that has no mapping now to
        `frames[i]`, all with `prot`; a page mapped already keeps its mapping (what
        fault-around does: a backend looks at the run and installs each stretch of
        unmapped pages in one step)."""
        ...

    def pmap_remove(self, start: int, end: int) -> None:
        """Remove every mapping of a page in [start, end)."""
        ...

    def pmap_protect(self, start: int, end: int, prot: int) -> None:
        """Reduce mappings in [start, end) to at most `prot` (VM_PROT_NONE removes them)."""
        ...

    def pmap_extract(self, va: int) -> int | None:
        """The frame page `va` is mapped to, or None."""
        ...

    def pmap_access(self, va: int) -> int:
        """The access the MMU allows at page `va` now (VM_PROT_NONE if unmapped)."""
        ...

    def pmap_resident_count(self) -> int:
        """How many pages this pmap maps."""
        ...

    def pmap_destroy(self) -> None:
        """Remove every mapping; the pmap is not used again."""
        ...

    # Map changes. A backend whose address spaces belong to other processes (which alone
    # can change their own mappings) is told of each; the soft backend ignores them.
    def pmap_map_entry(self, vmap: Any, entry: Any) -> None:
        """The map linked `entry` (new memory at its range, not a clip)."""
        ...

    def pmap_unmap_range(self, start: int, end: int) -> None:
        """The map unlinked the entry at [start, end)."""
        ...

    def pmap_entry_protected(self, vmap: Any, entry: Any, start: int, end: int) -> None:
        """vm_protect changed the protection of [start, end) of `entry`."""
        ...


class PhysicalMemory(Protocol):
    """The machine's frames and per-frame state (see module docstring).

    Two capabilities tell the machine-independent VM how this machine's MMU works:

    - `maps_objects`: a task region maps one VM object's memory for the region's whole
      life (a memfd mapping), not frames one page at a time. The VM then copies with
      copy objects and push rather than by write-protecting the source's pages in
      place, gives a copied region its private shadow at once, copies a page up from
      below a region's first object even for a read, and writes vm_write/vm_copy data
      into existing memory eagerly;
    - `dirty_by_fault`: the MMU keeps no modify bit of its own, so a read fault enters
      the page without write access (the first write faults and marks it), and maps
      the resident pages that follow it read-only too (fault-around).
    """

    page_size: int
    nframes: int
    lock: threading.Lock
    maps_objects: bool
    dirty_by_fault: bool
    task_window: tuple[int, int] | None  # where task maps lie (None: the VM's default)
    huge: int  # the huge page size where the machine keeps pages in huge pages, else 0
    object_windows: bool  # object_window may give a descriptor (a data manager may
    # then write an object's pages in place: the VM keeps its requests from overlapping)

    def object_write_protect(self, obj: Any) -> bool:
        """Write-protect every task mapping of VM object `obj` in one step per region (a
        copy of it was made); False if the backend has no such shortcut."""
        ...

    def pmap_create(self) -> Pmap:
        """A new, empty pmap."""
        ...

    def pmap_page_protect(self, frame: int, prot: int) -> None:
        """Reduce every mapping of `frame`, in every pmap, to at most `prot` (NONE removes)."""
        ...

    def pmap_page_discard(self, frame: int) -> None:
        """Remove every mapping of `frame`, in every pmap, and clear its reference and
        modify bits; its data need not be kept (the frame is being freed). Cheaper than
        pmap_page_protect to NONE where keeping the data costs (the native backend)."""
        ...

    def frames_discard(self, obj: object | None, runs: list[tuple[int, int]],
                       frames: list[int]) -> None:
        """Frames being freed together (vm_page_free of each, in one step): remove every
        mapping of each, in every pmap, and unbind it; their data need not be kept. The
        frames cache pages of VM object `obj` (None: no object, `runs` empty), and
        `runs` are ranges [start, end) of `obj`'s offsets whose resident pages are
        exactly those (an offset in a run may hold no page; no other resident page of
        `obj` lies in a run). The same as pmap_page_discard then frame_unbind of each
        frame, but a backend may drop a whole run at once. Both clear the frames'
        reference and modify bits (a free frame has neither)."""
        ...

    def discard_batch(self) -> AbstractContextManager[None]:
        """A block inside which pmap_page_discard, frame_unbind, frames_discard and
        pmap_page_protect to NONE may defer their work to the block's end, done there a
        run of pages at a time (a page protected to NONE keeps its data in the pmap at
        once, and writes to it fault at once: only its removal from the tasks waits).
        The caller holds the kernel lock for the whole block, so no task is served a
        fault meanwhile."""
        ...

    def pmap_is_referenced(self, frame: int) -> bool:
        """True if the frame was accessed since its reference bit was last cleared."""
        ...

    def pmap_clear_reference(self, frame: int) -> None:
        """Clear the frame's reference bit."""
        ...

    def pmap_is_modified(self, frame: int) -> bool:
        """True if the frame was written since its modify bit was last cleared."""
        ...

    def pmap_clear_modify(self, frame: int) -> None:
        """Clear the frame's modify bit."""
        ...

    def pmap_zero_page(self, frame: int) -> None:
        """Fill the frame with zeros."""
        ...

    def pmap_copy_page(self, src: int, dst: int) -> None:
        """Copy frame `src` onto frame `dst`."""
        ...

    def phys_read(self, frame: int, offset: int = 0, size: int | None = None) -> bytes:
        """Bytes of a frame, for the kernel's own copies (no reference bits change)."""
        ...

    def phys_read_into(self, frames: list[int], into: memoryview, skip: int = 0) -> None:
        """Copy the bytes of `frames` (a page each, in order), from `skip` bytes into the
        first, into `into`, as many as it holds (the frames hold at least that many):
        phys_read of each, once, straight into the caller's buffer (a backend may read
        a run of adjacent frames at a time)."""
        ...

    def phys_write(self, frame: int, data: bytes | memoryview, offset: int = 0) -> None:
        """Store bytes into a frame, for the kernel's own copies."""
        ...

    def phys_write_pages(self, writes: list[tuple[int, bytes | memoryview]]) -> None:
        """phys_write(frame, data) for each pair, in order (a backend may combine the
        writes of adjacent pages)."""
        ...

    def phys_write_run(self, frames: list[int], data: bytes | memoryview) -> None:
        """Store one buffer into `frames`, a page each in order (`data` holds
        len(frames) pages): phys_write_pages of its pages, which a backend may store a
        run of adjacent pages at a time without copying the buffer page by page."""
        ...

    def object_view(self, obj: object, start: int, end: int
                    ) -> AbstractContextManager[memoryview | None]:
        """A read-only view of bytes [start, end) (page aligned) of VM object `obj` as
        the machine holds them, for the block only, without copying them; None if the
        machine keeps that memory in no one place (then the VM reads page by page). The
        VM asks only where every page of the range is resident in `obj` or was never
        made (nothing lies below `obj`: a hole reads as zeros), and holds the kernel lock
        for the block, so the data cannot change meanwhile."""
        ...

    # Data an object's manager writes in place (memory_object.py, pager windows): where
    # the machine keeps an object's pages in one file at their offsets, the manager may
    # write the data it provides there itself, and the VM only accounts for the pages.
    def object_window(self, obj: object) -> int | None:
        """A new descriptor (the caller's to close), read-write and with an open file
        description of its own, of the file that holds VM object `obj`'s pages at
        their offsets; None if the machine keeps the object's pages in no such file
        (simulated frames; an object no task maps)."""
        ...

    def phys_placed_run(self, frames: list[int]) -> None:
        """The frames, bound to adjacent pages of one object that has a window
        (object_window), hold what its manager wrote there: nothing is copied; a page
        of them it left unwritten reads as zeros from now on. KERN_RESOURCE_SHORTAGE if
        the machine has no memory for such a page."""
        ...

    def object_pages_home(self, frames: list[int]) -> bool:
        """The frames, bound to pages of one object that has a window (object_window):
        make the window hold their data at their offsets, putting back any kept
        elsewhere (a page taken from every task: pmap_page_protect to NONE), so that
        its manager reads them there (write-backs in place, memory_object.py). False
        if the machine cannot now (no memory for a page put back; no windows)."""
        ...

    def frame_bind(self, frame: int, obj: object, offset: int) -> None:
        """A frame now caches page `offset` of VM object `obj` (vm_page_insert)."""
        ...

    def frames_bind(self, frames: list[int], obj: object, offsets: list[int]) -> None:
        """frame_bind of each frame to the offset of `obj` at the same place in
        `offsets`, in one step."""
        ...

    def frame_unbind(self, frame: int) -> None:
        """A frame caches nothing any more (it is being freed); its data may go."""
        ...

    def frame_move(self, frame: int, obj: object, offset: int) -> None:
        """A frame's page moves to another object and offset, keeping its data
        (vm_page_rename: collapse, pageout's holding objects)."""
        ...

    def frames_move(self, frames: list[int], obj: object, offsets: list[int]) -> None:
        """frame_move of each frame to the offset of `obj` at the same place in
        `offsets`, in one step (a run of pages leaving for a holding object: the data
        are moved a run of adjacent pages per call, not a page at a time)."""
        ...

    def object_gone(self, obj: object) -> Callable[[], None] | None:
        """A VM object was terminated: release what the backend kept for it. What may
        wait until the kernel lock is let go (it touches nothing anybody else can
        reach: a dead object's pages, punched out) the backend may return, instead of
        doing it, for the caller to run then (KernelLock.defer); None if nothing."""
        ...

    # Zero fill by the machine (vm_page.py): where the hardware can zero-fill a page on
    # first touch by itself, the VM lets it for fresh anonymous memory and learns of the
    # pages afterwards.
    def lazy_zero_fill(self, obj: object, on: bool) -> bool:
        """`on`: from now on let the hardware zero-fill, on first touch and without a
        fault, the pages of VM object `obj` (it has no resident page, and the VM holds
        a frame for each of its pages) in every task mapping it now; False if it cannot
        (then nothing changed). Not `on`: stop; faults on its missing pages reach the VM
        again (True); the pages the hardware made stay, for lazy_collect and
        lazy_adopt. Stopping it again says the VM is done with them."""
        ...

    def lazy_collect(self, obj: object, start: int, end: int) -> list[int]:
        """After lazy_zero_fill(obj, False): the offsets, in order, of the pages of `obj`
        in [start, end) that exist (made by the hardware or known to the VM); the VM
        binds a frame to each it did not know (frame_bind keeps the data where it is),
        then calls lazy_adopt."""
        ...

    def lazy_adopt(self, obj: object, pages: list[tuple[int, int]]) -> None:
        """The (offset, frame) pairs lazy_collect reported are bound: record the
        mappings the hardware made of them (as writable where the tasks had the object
        mapped for the zero fill) and mark them modified."""
        ...
