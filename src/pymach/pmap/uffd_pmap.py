"""UffdPmap: the pmap of native tasks, over real memory (Linux memfd + userfaultfd).

Native tasks are processes, so the "hardware" is the real MMU. The backend keeps each
VM object's pages in a memfd of its own (`ObjectStore`), which the tasks that map the
object map MAP_SHARED at the region's address: a resident page of (object, offset) is
that memfd's page at `offset`, and every task mapping the object sees the same memory.
machd holds every task's userfaultfd and makes the mappings real:

- `pmap_enter` lets a task reach a page: UFFDIO_CONTINUE maps the memfd's page into
  the task (write-protected unless the mapping may write), or clearing write
  protection upgrades a read mapping; either wakes the faulting thread;
- lowering protection to read-only is UFFDIO_WRITEPROTECT on the task's range;
- taking a page from every task while keeping it (pmap_page_protect to NONE) stashes
  its data in machd and punches it out of the memfd; the next access faults and
  `pmap_enter` puts the data back;
- freeing a frame punches its page out of the memfd (frames freed together: one
  punch per run of the object's offsets, `frames_discard`);
- data written into frames go into their memfds a run of adjacent pages per call
  (`phys_write_run`), and the kernel reads an object's pages in place through a
  read-only mapping of its memfd in machd (`object_view`, only where the memfd holds
  every page of the range: none stashed, no hole).

What this backend cannot do, the native VM layer avoids: it never removes a task's
mapping of a range asynchronously (a task changes its own mappings, at its kernel
entries), and it has no reference bits (pageout is FIFO with a fault-based second
chance). The modify bit is exact: pages are installed write-protected until written.

The page-table bookkeeping (chunks, masks, pv lists) is `PageTable`'s, as in SoftPmap. All state is
guarded by the backend `lock` (a leaf lock).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import mmap
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pymach.errors import MachError
from pymach.include.vm_param import VM_PROT_NONE, VM_PROT_READ, VM_PROT_WRITE
from pymach.pmap import hugetlb
from pymach.pmap import uffd as linux
from pymach.pmap.native_map import WINDOW_BASE, WINDOW_SIZE, NativeMapBinding
from pymach.pmap.soft_pmap import PageTable, SoftPhysicalMemory, frame_runs
from pymach.pmap.uffd import UffdError

if TYPE_CHECKING:
    from pymach.pmap.uffd import Uffd


log = logging.getLogger("pymach.pmap")
RUN_MAX_PAGES = 512  # pages per pwritev (below the kernel's IOV_MAX of 1024)
MOVE_CHUNK = 8 << 20  # bytes frames_move reads into one buffer at most


def _data_runs(fd: int, start: int, end: int, page: int = 0) -> list[tuple[int, int]]:
    """The runs [lo, hi) of [start, end) of a file that hold data (not holes). With
    `page` (the file's page size, `start` aligned to it): data found within the last
    page of the range runs to `end` without asking SEEK_HOLE, which would walk the
    file's data to its end (a one-page query of a full memfd would cost the file)."""
    runs, at = [], start
    while at < end:
        try:
            lo = os.lseek(fd, at, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after `at`
                break
            raise
        if lo >= end:
            break
        if page and end - (lo - lo % page) <= page:
            runs.append((lo, end))
            break
        hi = min(os.lseek(fd, lo, os.SEEK_HOLE), end)
        runs.append((lo, hi))
        at = hi
    return runs



def _punch_runs(fd: int, runs: list[tuple[int, int]]) -> None:
    """Punch ranges [start, end) of a memfd, one call per run of adjacent ones."""
    runs.sort()
    start, end = runs[0]
    for lo, hi in runs:
        if lo > end:  # a gap: punch the run so far
            linux.punch_hole(fd, start, end - start)
            start = lo
        end = max(end, hi)
    linux.punch_hole(fd, start, end - start)


def _punch_and_close(fd: int, runs: list[tuple[int, int]]) -> None:
    """A dead object's memfd: its pages punched out of every task still mapping it (the
    memory goes back to the system now, not when the last task unmaps it), then
    machd's descriptor closed."""
    try:
        _punch_runs(fd, runs)
    finally:
        os.close(fd)


def _memfd(name: str, huge: bool) -> int:
    """A new memfd (hugetlb if `huge`) only machd's user may reopen (a task handed a
    read-only descriptor cannot reopen it read-write through /proc/self/fd unless it runs
    as that user), sealed against shrinking: machd only grows one, and a task or data
    manager holding a read-write descriptor cannot cut pages from under machd's
    mappings of it (nor add seals of its own)."""
    flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
    fd = hugetlb.memfd(name, flags) if huge else os.memfd_create(name, flags)
    os.fchmod(fd, 0o600)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    return fd


def _grow(store: ObjectStore, size: int) -> None:
    """Make the store's memfd at least `size` bytes. Only ever larger: it is sealed
    against shrinking, and a holder of a read-write descriptor (a data manager's window,
    a writable mapping's) may have made the file larger than machd's record of it."""
    if size > store.size:
        if os.fstat(store.fd).st_size < size:
            try:
                os.ftruncate(store.fd, size)
            except PermissionError:  # (grown past `size` meanwhile: a shrink, refused)
                if os.fstat(store.fd).st_size < size:
                    raise
        store.size = size


@dataclass(eq=False)
class ObjectStore:
    """One VM object's memory: a memfd (machd's descriptor) of at least `size` bytes."""

    serial: int
    fd: int
    size: int = 0
    mappings: set[tuple[UffdPmap, int, int, int]] = field(default_factory=set)
    # (pmap, va, object offset, length) of every task region that maps this memfd
    lazy: list[tuple[UffdPmap, int, int, int]] | None = None  # the regions armed for
    # the kernel's own zero fill (lazy_zero_fill)
    filled: list[tuple[UffdPmap, int, int, int]] = field(default_factory=list)  # the
    # regions it was on in when it stopped (lazy_adopt maps pages there), until the VM
    # stops it again (it is done with the fill)


class UffdPhysicalMemory(SoftPhysicalMemory):
    """Frames whose data live in VM objects' memfds (see module docstring)."""

    maps_objects = True  # a region maps its object's memfd for the region's life
    object_windows = True  # a data manager may write its object's memfd (object_window)
    dirty_by_fault = True  # userfaultfd gives no modify bit: writes must fault
    task_window: tuple[int, int] | None = (WINDOW_BASE, WINDOW_BASE + WINDOW_SIZE)  # what
    # each process reserves

    def __init__(self, page_size: int, nframes: int) -> None:
        super().__init__(page_size, nframes, simulated=False)
        self.huge = hugetlb.huge_page_size() if hugetlb.uses_huge_pages(page_size) else 0
        # immutable: the huge page size when memfds are hugetlb (hugetlb.py), else 0
        if self.huge:
            hugetlb.check_pool(page_size, nframes)
        self.stash: dict[int, bytes] = {}  # frames taken from every task, data kept here
        self.stores: dict[int, ObjectStore] = {}  # VM object serial -> its memfd
        # A frame that caches no object keeps its data in one anonymous memfd, at its
        # frame number (the pmap contract lets a frame hold data before it is tabled).
        self.free_store = ObjectStore(-1, _memfd("pymach-frames", bool(self.huge)))
        os.ftruncate(self.free_store.fd, nframes * page_size)
        self.homes: list[tuple[ObjectStore, int]] = [
            (self.free_store, f * page_size) for f in range(nframes)]
        # An object no task maps (a pageout's holding object, the lower objects of a
        # shadow chain, data in transit) gets no memfd: its frames keep their data in
        # the free store until a task maps the object, so machd holds a descriptor per
        # mapped object only, however many pages are in flight to a pager.
        self.unstored: dict[int, dict[int, int]] = {}  # serial -> {offset: frame}
        self.unstored_at: dict[int, tuple[int, int]] = {}  # frame -> (serial, offset)
        self.lazy_stores: set[ObjectStore] = set()  # (lock) stores with `lazy` set
        self.deferred: dict[int, list[tuple[int, int]]] | None = None
        # (lock) object serial -> runs [start, end) whose punch a discard_batch holds
        # back; None outside a batch

    # -- object stores --------------------------------------------------------------------
    def store_for(self, obj: Any, size: int = 0) -> ObjectStore:
        """The memfd of VM object `obj` (a task maps it), made on first use, grown to
        `size` bytes; the object's resident pages move into it from the free store."""
        with self.lock:
            store = self._store_locked(obj.serial, max(size, obj.size))
            self._adopt_locked(store)
            return store

    def _adopt_locked(self, store: ObjectStore) -> None:
        """Move the pages of a newly stored object from the free store into its memfd:
        read with a `preadv` per run of adjacent frames, written a run of adjacent
        offsets per call, their old places punched a run per call (a pageout's holding
        object, say, when its manager maps it: a run of 256 pages, not 256 of each)."""
        ps, free = self.page_size, self.free_store
        pages = sorted(self.unstored.pop(store.serial, {}).items())
        if not pages:
            return
        for _, frame in pages:
            del self.unstored_at[frame]
        _grow(store, pages[-1][0] + ps)
        frames = [frame for _, frame in pages if frame not in self.stash]  # (a stashed
        data = bytearray(len(frames) * ps)  # one stays so: its next access puts it back)
        self._read_into_locked(frames, memoryview(data))
        for offset, frame in pages:
            self.homes[frame] = (store, offset)
        self._write_run_locked(frames, memoryview(data))
        for start, end in frame_runs(sorted(frames)):
            linux.punch_hole(free.fd, start * ps, (end - start) * ps)

    def _store_locked(self, serial: int, size: int) -> ObjectStore:
        store = self.stores.get(serial)
        if store is None:
            fd = _memfd(f"pymach-obj{serial}", bool(self.huge))
            store = self.stores[serial] = ObjectStore(serial, fd)
        _grow(store, size)
        return store

    def object_gone(self, obj: Any) -> Callable[[], None] | None:
        """Close machd's descriptor of a dead object's memfd (tasks may keep theirs).
        Inside a discard_batch, the punches held back for it are not done here: they
        and the close are returned, to be done once the kernel lock is let go (nothing
        can reach a dead object's memfd, and a GiB takes Linux 150 ms to punch)."""
        with self.lock:
            store = self.stores.pop(obj.serial, None)
            runs = self.deferred.pop(obj.serial, []) \
                if self.deferred is not None and store is not None else []
            self._flush_locked()
            if store is not None:
                self.lazy_stores.discard(store)
            for frame in self.unstored.pop(obj.serial, {}).values():
                self.unstored_at.pop(frame, None)
        if store is None:
            return None
        if not runs:
            os.close(store.fd)
            return None
        return functools.partial(_punch_and_close, store.fd, runs)

    # -- zero fill by the kernel (pmap contract) -------------------------------------------
    def lazy_zero_fill(self, obj: Any, on: bool) -> bool:
        """Arm the object's regions without missing pages (`on`), so the kernel fills a
        memfd hole at first touch; or arm them fully again. Not for hugetlb memfds
        (their pages come from a pool the VM accounts for) nor for a region mapped
        read-only or not yet armed."""
        with self.lock:
            store = self.stores.get(obj.serial)
            if store is None:
                return not on
            if on:
                if self.huge or store.lazy is not None or not store.mappings or not all(
                        p.binding.armed_shared(va) for p, va, _, _ in store.mappings):
                    return False
                store.lazy = list(store.mappings)
                self.lazy_stores.add(store)
                regions = store.lazy
            else:
                regions, store.filled, store.lazy = store.lazy or [], store.lazy or [], None
                self.lazy_stores.discard(store)
        for pmap, va, _off, length in regions:
            pmap.binding.rearm(va, length, lazy=on)
        return True

    def lazy_at(self, pmap: UffdPmap, va: int) -> bool:
        """True if `va` of the task lies in a region armed for the kernel's zero fill
        (a missing fault there was read before the region was armed so: stale)."""
        with self.lock:
            return any(p is pmap and start <= va < start + n
                       for store in self.lazy_stores for p, start, _, n in store.lazy or ())

    def lazy_collect(self, obj: Any, start: int, end: int) -> list[int]:
        """The offsets in [start, end) of the object's pages its memfd holds
        (SEEK_DATA/SEEK_HOLE)."""
        with self.lock:
            store = self.stores.get(obj.serial)
            if store is None:
                return []
            ps, out = self.page_size, list[int]()
            for lo, hi in _data_runs(store.fd, start, min(end, obj.size, store.size), ps):
                out.extend(range(lo - lo % ps, hi, ps))
            return out

    def lazy_adopt(self, obj: Any, pages: list[tuple[int, int]]) -> None:
        """Record the kernel's mappings of the adopted pages in the regions that were
        armed for its zero fill, writable (as they were mapped), and mark them
        modified."""
        with self.lock:
            store = self.stores.get(obj.serial)
            regions = [] if store is None else [r for r in store.filled
                                                if r in store.mappings]
            for _off, frame in pages:
                self.referenced[frame] = self.modified[frame] = 1
        rw = VM_PROT_READ | VM_PROT_WRITE
        for pmap, va, roff, length in regions:
            for off, frame in pages:
                if roff <= off < roff + length:
                    PageTable.pmap_enter(pmap, va + off - roff, frame, rw)

    # -- where frames live ------------------------------------------------------------------
    def frame_bind(self, frame: int, obj: Any, offset: int) -> None:
        """The frame caches `obj` at `offset`: its data go to the object's memfd if a
        task maps the object, else stay at the frame's place in the free store."""
        self.frames_bind([frame], obj, [offset])

    def frames_bind(self, frames: list[int], obj: Any, offsets: list[int]) -> None:
        """frame_bind of each frame to its offset, under one hold of the lock."""
        if not frames:
            return
        with self.lock:
            self._flush_locked()  # a held-back punch must not hit the pages' new data
            if obj.serial not in self.stores:
                unstored = self.unstored.setdefault(obj.serial, {})
                for frame, offset in zip(frames, offsets, strict=True):
                    unstored[offset] = frame
                    self.unstored_at[frame] = (obj.serial, offset)
                return
            store = self._store_locked(obj.serial, max(offsets) + self.page_size)
            homes = self.homes
            for frame, offset in zip(frames, offsets, strict=True):
                homes[frame] = (store, offset)

    def frame_unbind(self, frame: int) -> None:
        with self.lock:
            store, offset = self.homes[frame]
            self._unbind_locked([frame])
            self._punch_locked(store, offset, self.page_size)

    def _unbind_locked(self, frames: list[int]) -> None:
        """The frames cache nothing any more: each goes back to its place in the free
        store, and stashed data of theirs is dropped."""
        homes, free, ps = self.homes, self.free_store, self.page_size
        for frame in frames:
            homes[frame] = (free, frame * ps)
        if self.unstored_at:
            for frame in frames:
                at = self.unstored_at.pop(frame, None)
                if at is not None:
                    self.unstored[at[0]].pop(at[1], None)
        if self.stash:
            for frame in frames:
                self.stash.pop(frame, None)

    # -- punching pages out, one at a time or a run at a time ---------------------------------
    def frames_discard(self, obj: Any, runs: list[tuple[int, int]],
                       frames: list[int]) -> None:
        """Drop every mapping of the frames and unbind them; punch each run out of the
        object's memfd with one call (at the end of the discard_batch, inside one)."""
        with self.lock:
            self._unmap_locked(frames)
            self._forget_locked(frames)
            self._unbind_locked(frames)
            store = None if obj is None else self.stores.get(obj.serial)
            if store is not None:
                for start, end in runs:
                    self._punch_locked(store, start, end - start)

    @contextlib.contextmanager
    def discard_batch(self) -> Iterator[None]:
        """Hold back the punches of pmap_page_discard, frame_unbind and frames_discard
        to the end of the block, then punch each run of adjacent pages with one call
        (see the contract)."""
        with self.lock:
            outer = self.deferred is None
            if outer:
                self.deferred = {}
        try:
            yield
        finally:
            if outer:
                with self.lock:
                    self._flush_locked()
                    self.deferred = None

    def _punch_locked(self, store: ObjectStore, offset: int, length: int) -> None:
        """Punch [offset, offset+length) of a live object's memfd (what of it the memfd
        holds) out of every task, now or at the end of the discard_batch."""
        length = min(length, store.size - offset)
        if self.stores.get(store.serial) is not store or length <= 0:  # tasks map only
            return  # live memfds, and nothing lies past a memfd's end
        if self.deferred is not None:
            self.deferred.setdefault(store.serial, []).append((offset, offset + length))
        else:
            linux.punch_hole(store.fd, offset, length)

    def _flush_locked(self) -> None:
        """Do the held-back punches, one call per run of adjacent pages of a memfd."""
        if not self.deferred:
            return
        batches = list(self.deferred.items())
        self.deferred.clear()
        for serial, runs in batches:
            store = self.stores.get(serial)  # serials are never reused
            if store is not None:
                _punch_runs(store.fd, runs)

    def frame_move(self, frame: int, obj: object, offset: int) -> None:
        self.frames_move([frame], obj, [offset])  # (what it cannot write, it stashes)

    def frames_move(self, frames: list[int], obj: object, offsets: list[int]) -> None:
        """frame_move of each frame, MOVE_CHUNK bytes at a time: read with a `preadv` per
        run of adjacent pages of a memfd, the old places punched a run per call, written
        a run per `pwritev` (the data cross Python once, as one buffer). A chunk the
        new places cannot take (no memory for them) is stashed instead, as a page taken
        from every task is: its data stay in machd until a fault puts them back."""
        step = max(1, MOVE_CHUNK // self.page_size)
        for at in range(0, len(frames), step):
            chunk = frames[at:at + step]
            data = bytearray(len(chunk) * self.page_size)
            self.phys_read_into(chunk, memoryview(data))
            with self.discard_batch(), self.lock:
                old = [self.homes[frame] for frame in chunk]
                self._unbind_locked(chunk)
                for store, offset in old:  # (merged into runs at the batch's end)
                    self._punch_locked(store, offset, self.page_size)
            self.frames_bind(chunk, obj, offsets[at:at + step])
            try:
                self.phys_write_run(chunk, memoryview(data))
            except (OSError, MachError) as e:  # (ENOSPC, ENOMEM; a hugetlb pool that is
                # empty: the old places are gone already)
                log.warning("frames_move: %d pages kept in machd, not written to object "
                            "%s: %s", len(chunk), getattr(obj, "serial", obj), e)
                self._stash_run(chunk, data)

    def _stash_run(self, frames: list[int], data: bytearray) -> None:
        """Keep the data of `frames` (a page each, in order) in the stash."""
        ps = self.page_size
        with self.lock:
            for i, frame in enumerate(frames):
                self.stash[frame] = bytes(data[i * ps:(i + 1) * ps])

    # -- data ------------------------------------------------------------------------------
    def phys_read(self, frame: int, offset: int = 0, size: int | None = None) -> bytes:
        n = self.page_size - offset if size is None else size
        with self.lock:
            if frame in self.stash:
                return self.stash[frame][offset:offset + n]
            store, base = self._home(frame)
            data = os.pread(store.fd, n, base + offset)
        return data.ljust(n, b"\0")

    def phys_read_into(self, frames: list[int], into: memoryview, skip: int = 0) -> None:
        """Copy the bytes of `frames` from `skip` on into `into` (see pmap.py): each run of
        frames that are adjacent pages of one memfd takes one preadv (not one per page)."""
        with self.lock:
            self._read_into_locked(frames, into, skip)

    def _read_into_locked(self, frames: list[int], into: memoryview, skip: int = 0) -> None:
        """phys_read_into with the lock held."""
        ps, at = self.page_size, 0
        runs: list[tuple[ObjectStore | None, int, int]] = []  # (memfd, offset, pages), or
        for frame in frames:  # (None, frame, 1) for a stashed frame
            store, base = (None, frame) if frame in self.stash else self.homes[frame]
            last = runs[-1] if runs else None
            if store is not None and last is not None and last[0] is store \
                    and last[1] + last[2] * ps == base:
                runs[-1] = (store, last[1], last[2] + 1)
            else:
                runs.append((store, base, 1))
        for store, base, pages in runs:
            n = min(pages * ps - skip, len(into) - at)
            if n <= 0:
                break
            got = 0 if store is None else os.preadv(store.fd, [into[at:at + n]], base + skip)
            if store is None:
                into[at:at + n] = self.stash[base][skip:skip + n].ljust(n, b"\0")
            elif got < n:  # (past the memfd's end: zeros)
                into[at + got:at + n] = bytes(n - got)
            at, skip = at + n, 0

    def phys_write(self, frame: int, data: bytes | memoryview, offset: int = 0) -> None:
        with self.lock:
            if frame in self.stash:
                page = bytearray(self.stash[frame])
                page[offset:offset + len(data)] = data
                self.stash[frame] = bytes(page)
                return
            store, base = self._home(frame)
            self._store_write(store, base + offset, [data])

    def phys_write_pages(self, writes: list[tuple[int, bytes | memoryview]]) -> None:
        """phys_write of each pair; whole pages adjacent in one memfd go in one pwritev
        (a system call per run, not per page)."""
        ps, stashed = self.page_size, []
        runs: list[tuple[ObjectStore, int, list[bytes | memoryview]]] = []  # (store, start, chunks)
        with self.lock:
            for frame, data in writes:
                if frame in self.stash:
                    stashed.append((frame, data))
                    continue
                store, base = self.homes[frame]
                if runs and runs[-1][0] is store and len(runs[-1][2]) < RUN_MAX_PAGES \
                        and runs[-1][1] + len(runs[-1][2]) * ps == base \
                        and len(runs[-1][2][-1]) == ps:
                    runs[-1][2].append(data)
                else:
                    runs.append((store, base, [data]))
            for store, base, chunks in runs:
                self._store_write(store, base, chunks)
        for frame, data in stashed:
            self.phys_write(frame, data)

    def phys_write_run(self, frames: list[int], data: bytes | memoryview) -> None:
        """Store `data` into `frames`, a page each: each run of frames that are adjacent
        pages of one memfd takes one write of its slice of `data` (pages of the run are
        not copied one by one)."""
        ps = self.page_size
        with self.lock, memoryview(data) as view:
            stashed = self._write_run_locked(frames, view)
            pages = [(frames[i], bytes(view[i * ps:(i + 1) * ps])) for i in stashed]
        for frame, page in pages:
            self.phys_write(frame, page)

    def _write_run_locked(self, frames: list[int], view: memoryview) -> list[int]:
        """phys_write_run with the lock held, but for stashed frames: their indexes in
        `frames` are returned (not written)."""
        ps, stashed = self.page_size, []
        homes, stash = self.homes, self.stash
        store, base, lo, n = self.free_store, -1, 0, 0  # the run so far: frames[lo:lo+n]
        for i, frame in enumerate(frames):
            if stash and frame in stash:
                stashed.append(i)
                continue
            home, at = homes[frame]
            if home is store and at == base + n * ps and i == lo + n:
                n += 1
                continue
            if n:
                self._store_write(store, base, [view[lo * ps:(lo + n) * ps]])
            store, base, lo, n = home, at, i, 1
        if n:
            self._store_write(store, base, [view[lo * ps:(lo + n) * ps]])
        return stashed

    @contextlib.contextmanager
    def object_view(self, obj: Any, start: int, end: int) -> Iterator[memoryview | None]:
        """A read-only mapping, in machd, of [start, end) of the object's memfd (see the
        contract); None unless the memfd holds every page of the range (no page of it
        stashed, no hole: reading a hole through a mapping would make a page, and a
        hugetlb one could fail)."""
        m = None
        with self.lock:
            store = self.stores.get(obj.serial)
            if store is not None and self._holds_locked(store, start, end):
                m = mmap.mmap(store.fd, end - start, prot=mmap.PROT_READ, offset=start)
        if m is None:
            yield None
            return
        try:
            yield memoryview(m)
        finally:
            with contextlib.suppress(BufferError):  # (a view still held: unmapped when
                m.close()  # it goes)

    def _holds_locked(self, store: ObjectStore, start: int, end: int) -> bool:
        """True if the memfd holds the data of every page of [start, end) (a non-empty
        range): none of them stashed, no hole."""
        if not start < end <= store.size:
            return False
        for frame in self.stash:
            home, at = self.homes[frame]
            if home is store and start <= at < end:
                return False
        return _data_runs(store.fd, start, end) == [(start, end)]

    # -- data an object's manager writes in place (pager windows: the contract) -----------
    def object_window(self, obj: Any) -> int | None:
        """A new read-write descriptor of the object's memfd, with its own open file
        description (linux.reopen); None if no task maps the object (it has no memfd)."""
        with self.lock:
            store = self.stores.get(obj.serial)
            return None if store is None else linux.reopen(store.fd, writable=True)

    def phys_placed_run(self, frames: list[int]) -> None:
        """Give the run's pages of its memfd memory where the manager left holes (one
        fallocate, which keeps the pages it wrote). The frames must be adjacent pages
        of one object's memfd (the VM's runs), none stashed: KERN_FAILURE, a VM bug,
        where the first and last frames or the stash show otherwise."""
        ps, n = self.page_size, len(frames)
        with self.lock:
            store, base = self.homes[frames[0]]
            if store is self.free_store or self.homes[frames[-1]] != (
                    store, base + (n - 1) * ps) or (
                    self.stash and any(f in self.stash for f in frames)):
                raise MachError("KERN_FAILURE", "placed pages are not one run of a memfd")
            if self.huge:
                hugetlb.allocate_run(store.fd, base, n * ps)
                return
            try:
                linux.allocate(store.fd, base, n * ps)
            except UffdError as e:
                raise MachError("KERN_RESOURCE_SHORTAGE", f"no memory for a page the "
                                f"data manager left unwritten: {e.strerror}") from None

    def object_pages_home(self, frames: list[int]) -> bool:
        """See PhysicalMemory.object_pages_home: stashed frames go back into their
        memfd; False if one cannot now, or if a frame's home is the free store (its
        object has no memfd)."""
        with self.lock:
            try:
                for frame in frames:
                    if frame in self.stash:
                        self._restore(frame)
            except (OSError, MachError):  # (no memory for it: it stays in the stash)
                return False
            return not any(frame in self.stash or self.homes[frame][0] is self.free_store
                           for frame in frames)

    def _home(self, frame: int) -> tuple[ObjectStore, int]:
        return self.homes[frame]

    def _store_write(self, store: ObjectStore, offset: int,
                     chunks: list[bytes | memoryview]) -> None:
        """Write `chunks` one after another at `offset` of a memfd (lock held): one
        pwritev, or through a mapping for a hugetlb memfd (which has no write())."""
        if self.huge:
            hugetlb.write(store.fd, offset, chunks, self.huge)
        else:
            os.pwritev(store.fd, chunks, offset)

    def pmap_zero_page(self, frame: int) -> None:
        with self.lock:
            if self.huge and frame not in self.stash:  # fresh pages are zeros: no copy
                store, base = self._home(frame)
                hugetlb.zero(store.fd, base, self.page_size)
                return
        self.phys_write(frame, self._zero)

    def pmap_copy_page(self, src: int, dst: int) -> None:
        self.phys_write(dst, self.phys_read(src))

    # -- all mappings of a frame ------------------------------------------------------------
    def pmap_create(self) -> UffdPmap:  # type: ignore[override]
        return UffdPmap(self)

    def pmap_page_protect(self, frame: int, prot: int) -> None:
        """Lower every mapping of `frame`; at NONE the data moves to the stash and the page
        leaves every task (the next access faults; inside a discard_batch, the punch
        that takes it out waits for the batch's end, merged with its neighbours': until
        then a task may still read the same data, and a write faults)."""
        super().pmap_page_protect(frame, prot)
        if prot != VM_PROT_NONE:
            return
        with self.lock:
            if frame in self.stash:
                return
            store, base = self.homes[frame]
            self.stash[frame] = os.pread(store.fd, self.page_size, base).ljust(
                self.page_size, b"\0")
            if self.deferred is not None and self.stores.get(store.serial) is store:
                self._punch_locked(store, base, self.page_size)  # (a run at the end)
            else:
                linux.punch_hole(store.fd, base, self.page_size)

    def pmap_page_discard(self, frame: int) -> None:
        """Remove every mapping of `frame` by punching its page out, without stashing the
        data (the frame is being freed)."""
        with self.lock:
            self._unmap_locked([frame])
            self._forget_locked([frame])
            self.stash.pop(frame, None)
            store, offset = self.homes[frame]
            self._punch_locked(store, offset, self.page_size)

    def pmap_clear_modify(self, frame: int) -> None:
        """Clear the modify bit and write-protect every mapping, so the next write shows."""
        super().pmap_page_protect(frame, ~VM_PROT_WRITE & 7)
        self.modified[frame] = 0

    def object_write_protect(self, obj: Any) -> bool:
        """Write-protect every task mapping of `obj` with one call per region (a copy of
        the object was made). False if the backend has nothing to say (soft does)."""
        with self.lock:
            store = self.stores.get(obj.serial)
            regions = list(store.mappings) if store is not None else []
        for pmap, va, _off, length in regions:
            pmap.pmap_protect(va, va + length, ~VM_PROT_WRITE & 7)
        return True

    def _restore(self, frame: int) -> None:
        """Put a stashed page back into its memfd (lock held); kept in the stash if
        the memfd cannot take it now."""
        data = self.stash.get(frame)
        if data is not None:
            store, base = self._home(frame)
            self._store_write(store, base, [data])
            del self.stash[frame]


class UffdPmap(PageTable):
    """One native task's page table; acts on the task through its userfaultfd."""

    def __init__(self, phys: UffdPhysicalMemory) -> None:
        super().__init__(phys)
        self.uphys = phys  # immutable
        self.uffd: Uffd | None = None  # set when the task's process attaches
        self.binding = NativeMapBinding(self, phys)  # immutable: the process's map changes

    def pmap_destroy(self) -> None:
        """Remove every mapping; the map changes the process never got are dropped
        (their descriptors closed)."""
        super().pmap_destroy()
        self.binding.discard()

    def pmap_map_entry(self, vmap: Any, entry: Any) -> None:
        """The task's process must map the entry's objects (native_map.py)."""
        self.binding.mapped(vmap, entry)

    def pmap_unmap_range(self, start: int, end: int) -> None:
        """The task's process must give the range back."""
        self.binding.unmapped(start, end)

    def pmap_entry_protected(self, vmap: Any, entry: Any, start: int, end: int) -> None:
        """The task's process must change the range's protection (or remap it)."""
        self.binding.protected(vmap, entry, start, end)

    def pmap_enter(self, va: int, frame: int, prot: int) -> None:
        """Let the task reach `frame` at `va` with `prot`, waking a thread faulting there."""
        self._account(va, frame, prot)
        if self.uffd is not None and prot != VM_PROT_NONE:
            self._install(va, prot)

    def pmap_enter_run(self, va: int, frames: list[int], prot: int) -> None:
        """Enter a run of pages with one UFFDIO_CONTINUE (page by page if some page of
        the run is mapped in the task already)."""
        ps = self.phys.page_size
        self._account_run(self._vpn(va), frames, prot)
        if self.uffd is None or prot == VM_PROT_NONE or not frames:
            return
        if not self.uffd.cont(va, len(frames) * ps, wp=not prot & VM_PROT_WRITE):
            for i in range(len(frames)):
                self._install(va + i * ps, prot)

    def pmap_enter_around(self, va: int, frames: list[int], prot: int) -> None:
        """Enter the pages of the run that have no mapping now: one UFFDIO_CONTINUE for
        each stretch of them (see the contract)."""
        ps, vpn = self.phys.page_size, self._vpn(va)
        with self.uphys.lock:
            runs = self.unmapped_runs_locked(vpn, len(frames))
            for lo, hi in runs:
                self._account_run_locked(vpn + lo, frames[lo:hi], prot)
        if self.uffd is None or prot == VM_PROT_NONE:
            return
        for lo, hi in runs:
            if not self.uffd.cont(va + lo * ps, (hi - lo) * ps, wp=not prot & VM_PROT_WRITE):
                for i in range(lo, hi):
                    self._install(va + i * ps, prot)

    def _account(self, va: int, frame: int, prot: int) -> None:
        """The page-table side of pmap_enter; the frame's data back in its memfd."""
        self._account_run(self._vpn(va), [frame], prot)

    def _account_run(self, vpn: int, frames: list[int], prot: int) -> None:
        """_account of pages vpn, vpn + 1, ... to `frames`, under one hold of the lock."""
        with self.uphys.lock:
            self._account_run_locked(vpn, frames, prot)

    def _account_run_locked(self, vpn: int, frames: list[int], prot: int) -> None:
        """_account_run with the backend lock held."""
        phys, written = self.uphys, bool(prot & VM_PROT_WRITE)
        self.enter_run_locked(vpn, frames, prot)
        stash, referenced, modified = phys.stash, phys.referenced, phys.modified
        for frame in frames:
            if stash and frame in stash:
                phys._restore(frame)
            referenced[frame] = 1
            if written:
                modified[frame] = 1

    def _install(self, va: int, prot: int) -> None:
        """Make the task's page at `va` match `prot` (not NONE), waking its faulter."""
        assert self.uffd is not None
        ps = self.phys.page_size
        write = bool(prot & VM_PROT_WRITE)
        if not self.uffd.cont(va, ps, wp=not write):  # it was mapped already
            self.uffd.writeprotect(va, ps, protect=not write)
            if not write:
                self.uffd.wake(va, ps)

    def protect_hw_locked(self, start: int, end: int, prot: int, vpns: list[int]) -> None:
        """Write access to [start, end) goes by one UFFDIO_WRITEPROTECT (Linux skips the
        holes between the task's mappings); only if Linux refuses the range (part of it
        is not registered with the userfaultfd) is each entry lowered one by one done
        alone. Even at NONE: pmap_page_protect snapshots a page before punching it, and
        a write between the two would be lost unless writes fault from here on."""
        if self.uffd is None or prot & VM_PROT_WRITE:
            return
        try:
            self.uffd.writeprotect(start, end - start, protect=True, wake=False)
        except UffdError:
            ps = self.phys.page_size
            for vpn in vpns:
                with contextlib.suppress(UffdError):  # not (yet, or any more) mapped
                    self.uffd.writeprotect(vpn * ps, ps, protect=True, wake=False)
