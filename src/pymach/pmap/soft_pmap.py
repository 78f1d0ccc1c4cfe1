"""SoftPmap: simulated page frames and a software MMU, for the embedded kernel.

Physical memory is one anonymous mmap of `nframes * page_size` bytes. A `SoftPmap` is a page
table: a dict from virtual page number to a packed entry ``frame << 3 | prot``. Task
threads reach memory only through `mmu_read` / `mmu_write`, which play the hardware:
they translate one page, check the protection, copy bytes, and set the frame's
reference (and modify) bit, all under the backend lock, or report a fault and touch
nothing. Because translation and copy happen under that lock, a frame the VM takes away
(pmap_page_protect NONE, then reuse) is never read through a stale translation.

Invariants (`lock`): `pv[frame]` holds exactly the (pmap, vpn) pairs whose entry names
`frame`; an entry's prot is never VM_PROT_NONE (such entries are removed).
"""

from __future__ import annotations

import mmap
import threading

from pymach.vm.vm_param import VM_PROT_NONE, VM_PROT_READ, VM_PROT_WRITE

_PROT_MASK = 0x7


class SoftPhysicalMemory:
    """Frames, their reference/modify bits and pv lists (see module docstring)."""

    def __init__(self, page_size: int, nframes: int) -> None:
        self.page_size = page_size  # immutable
        self.nframes = nframes  # immutable
        self.lock = threading.Lock()  # the memory bus: a leaf lock over everything below
        self.mem = mmap.mmap(-1, page_size * nframes)  # zero pages, allocated lazily by the OS
        self.mv = memoryview(self.mem)
        self.referenced = bytearray(nframes)
        self.modified = bytearray(nframes)
        self.pv: dict[int, set[tuple[SoftPmap, int]]] = {}
        self._zero = bytes(page_size)

    def pmap_create(self) -> SoftPmap:
        """A new, empty page table."""
        return SoftPmap(self)

    def pmap_page_protect(self, frame: int, prot: int) -> None:
        """Reduce every mapping of `frame` to at most `prot`; NONE removes them all."""
        with self.lock:
            for pmap, vpn in list(self.pv.get(frame, ())):
                pmap.reduce_locked(vpn, prot)

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

    def phys_write(self, frame: int, data: bytes, offset: int = 0) -> None:
        """Store bytes into a frame (kernel access)."""
        base = frame * self.page_size + offset
        self.mv[base:base + len(data)] = data


class SoftPmap:
    """A page table of one address space (see module docstring)."""

    def __init__(self, phys: SoftPhysicalMemory) -> None:
        self.phys = phys  # immutable
        self.shift = phys.page_size.bit_length() - 1 if _pow2(phys.page_size) else 0
        self.entries: dict[int, int] = {}  # vpn -> frame << 3 | prot; guarded by phys.lock

    def _vpn(self, va: int) -> int:
        return va >> self.shift if self.shift else va // self.phys.page_size

    # -- the pmap contract ---------------------------------------------------------------
    def pmap_enter(self, va: int, frame: int, prot: int) -> None:
        """Map page `va` to `frame` with `prot`, replacing any mapping of `va`."""
        vpn = self._vpn(va)
        with self.phys.lock:
            self._drop_locked(vpn)
            if prot != VM_PROT_NONE:
                self.entries[vpn] = frame << 3 | prot
                self.phys.pv.setdefault(frame, set()).add((self, vpn))

    def pmap_remove(self, start: int, end: int) -> None:
        """Remove every mapping of a page in [start, end)."""
        self.pmap_protect(start, end, VM_PROT_NONE)

    def pmap_protect(self, start: int, end: int, prot: int) -> None:
        """Reduce mappings in [start, end) to at most `prot`."""
        lo, hi = self._vpn(start), self._vpn(end + self.phys.page_size - 1)
        with self.phys.lock:
            if hi - lo <= len(self.entries):
                vpns = [v for v in range(lo, hi) if v in self.entries]
            else:
                vpns = [v for v in self.entries if lo <= v < hi]
            for vpn in vpns:
                self.reduce_locked(vpn, prot)

    def pmap_extract(self, va: int) -> int | None:
        """The frame page `va` is mapped to, or None."""
        e = self.entries.get(self._vpn(va))
        return None if e is None else e >> 3

    def pmap_resident_count(self) -> int:
        """How many pages this pmap maps."""
        return len(self.entries)

    def pmap_destroy(self) -> None:
        """Remove every mapping."""
        with self.phys.lock:
            for vpn in list(self.entries):
                self._drop_locked(vpn)

    # -- with phys.lock held -------------------------------------------------------------
    def reduce_locked(self, vpn: int, prot: int) -> None:
        """Lower one entry's protection to at most `prot`, removing it at NONE."""
        e = self.entries.get(vpn)
        if e is None:
            return
        new = e & _PROT_MASK & prot
        if new == VM_PROT_NONE:
            self._drop_locked(vpn)
        else:
            self.entries[vpn] = (e & ~_PROT_MASK) | new

    def _drop_locked(self, vpn: int) -> None:
        e = self.entries.pop(vpn, None)
        if e is not None:
            holders = self.phys.pv.get(e >> 3)
            if holders is not None:
                holders.discard((self, vpn))
                if not holders:
                    del self.phys.pv[e >> 3]

    # -- the hardware: task threads' loads and stores ----------------------------------
    def mmu_read(self, va: int, size: int) -> bytes | None:
        """Load `size` bytes at `va` (within one page), or None: a read fault."""
        phys = self.phys
        with phys.lock:
            e = self.entries.get(self._vpn(va))
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
            e = self.entries.get(self._vpn(va))
            if e is None or not e & VM_PROT_WRITE:
                return False
            frame = e >> 3
            phys.referenced[frame] = phys.modified[frame] = 1
            base = frame * phys.page_size + va % phys.page_size
            phys.mv[base:base + len(data)] = data
            return True


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
