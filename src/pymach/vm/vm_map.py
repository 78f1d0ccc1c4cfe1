"""Address maps: each task's directory of valid regions (paper 5.1).

A task's address space is one top-level `VmMap` of entries sorted by address. An entry
maps [start, end) either to a memory object (`object`, `offset`) or, once the region is
shared through inheritance, to a second-level *sharing map* (`share_map`, `offset`).
Per-task attributes (protection, maximum protection, inheritance) live in the top-level
entry; what the memory *is* lives in the sharing map, so a change there (a shadow made
by a write fault, a vm_write, a vm_copy) is seen by every task that shares it. A task
map entry points straight at an object while nothing is shared (the optimization of
5.1), and a mapping made by vm_allocate_with_pager never involves a sharing map.

`needs_copy` on an object entry means the memory is a copy-on-write copy of the object:
reads see the object, the first write makes a shadow object (vm_map_lookup).

Invariants (kernel lock): entries are sorted, page aligned, non-empty and disjoint; an
entry refers to exactly one of object / share_map and holds one reference to it;
protection <= max_protection; a sharing map records in `sharers` every task map that
has an entry pointing to it; only task maps have a pmap.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pymach.errors import MachError
from pymach.include.vm_param import (
    VM_INHERIT_DEFAULT,
    VM_MAX_ADDRESS,
    VM_MIN_ADDRESS,
    VM_PROT_ALL,
    VM_PROT_DEFAULT,
    VM_PROT_WRITE,
)
from pymach.vm.vm_object import (
    VmObject,
    vm_object_deallocate,
    vm_object_page_remove,
    vm_object_reference,
    vm_object_shadow,
)

if TYPE_CHECKING:
    from pymach.pmap.pmap import Pmap
    from pymach.vm.vm_init import VmSystem


class VmMapEntry:
    """One region of a map (see module docstring)."""

    __slots__ = ("end", "inheritance", "max_protection", "needs_copy", "object", "offset",
                 "policy", "protection", "share_map", "start")

    def __init__(self, start: int, end: int, obj: VmObject | None, offset: int,
                 protection: int = VM_PROT_DEFAULT, max_protection: int = VM_PROT_ALL,
                 inheritance: int = VM_INHERIT_DEFAULT, needs_copy: bool = False,
                 share_map: VmMap | None = None) -> None:
        self.start, self.end = start, end
        self.object, self.share_map, self.offset = obj, share_map, offset
        self.protection, self.max_protection = protection, max_protection
        self.inheritance = inheritance
        self.needs_copy = needs_copy
        self.policy: FaultPolicy | None = None  # pager timeout for this mapping (None: host's)

    @property
    def size(self) -> int:
        """The entry's length in bytes."""
        return self.end - self.start

    def clone(self, start: int, end: int) -> VmMapEntry:
        """A copy of this entry's attributes for [start, end) (no reference taken)."""
        e = VmMapEntry(start, end, self.object, self.offset + (start - self.start),
                       self.protection, self.max_protection, self.inheritance,
                       self.needs_copy, self.share_map)
        e.policy = self.policy
        return e

    def __repr__(self) -> str:
        what = f"share{self.share_map.serial}" if self.share_map else repr(self.object)
        return f"<Entry {self.start:#x}-{self.end:#x} {what}+{self.offset:#x}>"


class VmMap:
    """A task map (with a pmap) or a sharing map (without). Guarded by the kernel lock."""

    def __init__(self, vm: VmSystem, pmap: Pmap | None, min_offset: int = VM_MIN_ADDRESS,
                 max_offset: int = VM_MAX_ADDRESS) -> None:
        self.vm = vm  # immutable
        self.serial = vm.kernel.new_serial("vm_map")  # immutable
        self.pmap = pmap  # immutable; None for a sharing map
        ps = vm.page_size  # the bounds are whole pages whatever the page size
        self.min_offset = -(-min_offset // ps) * ps  # immutable
        self.max_offset = max_offset - max_offset % ps  # immutable
        self.entries: list[VmMapEntry] = []
        self.starts: list[int] = []  # entries' start addresses, for bisect
        self.first_free = self.min_offset  # [min_offset, first_free) has no hole: where
        # find_space begins (Mach's first_free hint; kept by link and unlink)
        self.ref_count = 1
        self.sharers: set[VmMap] = set()  # sharing maps: task maps pointing here
        self.shared: dict[VmMap, dict[VmMapEntry, None]] = {}  # task maps: sharing map ->
        # this map's entries pointing there (kept by link, unlink and share_entry)
        self.around = 0  # pages the last read fault mapped around it (vm_fault.py)
        self.around_end = -1  # the address right after them

    @property
    def is_share_map(self) -> bool:
        """True for a second-level sharing map."""
        return self.pmap is None

    def size(self) -> int:
        """Total bytes mapped."""
        return sum(e.size for e in self.entries)

    # -- entries ----------------------------------------------------------------------
    def lookup_entry(self, addr: int) -> VmMapEntry | None:
        """The entry containing `addr`, or None."""
        i = bisect.bisect_right(self.starts, addr) - 1
        if i >= 0 and addr < self.entries[i].end:
            return self.entries[i]
        return None

    def _index(self, entry: VmMapEntry) -> int:
        return bisect.bisect_left(self.starts, entry.start)

    def link(self, entry: VmMapEntry, remap: bool = True) -> None:
        """Insert an entry (its range must be free) and tell the pmap (`remap` False: the
        range shows the same memory as before, a clip)."""
        i = bisect.bisect_left(self.starts, entry.start)
        self.entries.insert(i, entry)
        self.starts.insert(i, entry.start)
        if entry.start <= self.first_free:
            self._advance_first_free(i)
        if entry.share_map is not None and not self.is_share_map:
            self.share_entry(entry, entry.share_map)
        if self.pmap is not None and remap:
            self.pmap.pmap_map_entry(self, entry)

    def unlink(self, entry: VmMapEntry) -> None:
        """Remove an entry from the list (references are the caller's business)."""
        i = self._index(entry)
        del self.entries[i]
        del self.starts[i]
        self.first_free = min(self.first_free, entry.start)
        if self.pmap is not None:
            self.pmap.pmap_unmap_range(entry.start, entry.end)
        smap = entry.share_map
        if smap is not None and not self.is_share_map:
            pointing = self.shared[smap]
            del pointing[entry]
            if not pointing:  # (this map's last entry there)
                del self.shared[smap]
                smap.sharers.discard(self)

    def share_entry(self, entry: VmMapEntry, smap: VmMap) -> None:
        """`entry`, linked in this task map, now points to the sharing map `smap`."""
        entry.share_map = smap
        self.shared.setdefault(smap, {})[entry] = None
        smap.sharers.add(self)

    def _advance_first_free(self, i: int) -> None:
        """Move `first_free` past the entries from index `i` on that leave no hole."""
        entries, ff = self.entries, self.first_free
        while i < len(entries) and entries[i].start <= ff:
            ff = max(ff, entries[i].end)
            i += 1
        self.first_free = ff

    def clip(self, addr: int) -> None:
        """Split the entry containing `addr` so that an entry starts at `addr`."""
        entry = self.lookup_entry(addr)
        if entry is None or entry.start == addr:
            return
        tail = entry.clone(addr, entry.end)
        vm_object_reference(tail.object)
        if tail.share_map is not None:
            tail.share_map.ref_count += 1
        entry.end = addr
        self.link(tail, remap=False)

    def clip_range(self, start: int, end: int) -> list[VmMapEntry]:
        """Clip at both ends and return the entries inside [start, end), in order."""
        self.clip(start)
        self.clip(end)
        lo = bisect.bisect_left(self.starts, start)
        hi = bisect.bisect_left(self.starts, end)
        return self.entries[lo:hi]

    def entries_in(self, start: int, end: int) -> list[VmMapEntry]:
        """The entries overlapping [start, end), unclipped."""
        lo = max(bisect.bisect_right(self.starts, start) - 1, 0)
        return [e for e in self.entries[lo:bisect.bisect_left(self.starts, end)]
                if e.end > start]

    def check_mapped(self, start: int, end: int) -> list[VmMapEntry]:
        """The entries covering [start, end) with no hole, or KERN_INVALID_ADDRESS."""
        entries = self.entries_in(start, end)
        at = start
        for e in entries:
            if e.start > at:
                break
            at = e.end
        if at < end:
            raise MachError("KERN_INVALID_ADDRESS", f"{at:#x} is not allocated "
                            f"(in {start:#x}-{end:#x})")
        return entries

    def find_space(self, size: int, hint: int | None = None) -> int:
        """The lowest free address >= `hint` (or min_offset) for `size` bytes (the search
        begins at first_free: below it, nothing is free)."""
        at = max(self.min_offset if hint is None else hint, self.min_offset,
                 self.first_free)
        i = max(bisect.bisect_right(self.starts, at) - 1, 0)
        for e in self.entries[i:]:
            if e.end <= at:
                continue
            if e.start >= at + size:
                break
            at = e.end
        if at + size > self.max_offset:
            raise MachError("KERN_NO_SPACE", f"no room for {size:#x} bytes in the address space")
        return at

    def range_free(self, start: int, end: int) -> bool:
        """True if no entry overlaps [start, end) and it lies inside the map."""
        return (self.min_offset <= start and end <= self.max_offset
                and not self.entries_in(start, end))


# -- map operations ---------------------------------------------------------------------

def vm_map_create(vm: VmSystem, pmap: Pmap | None) -> VmMap:
    """A new empty task map (with `pmap`) or sharing map (pmap None)."""
    if pmap is None:
        return VmMap(vm, None, 0, VM_MAX_ADDRESS)
    return VmMap(vm, pmap)


def vm_map_insert(vmap: VmMap, start: int, end: int, obj: VmObject | None, offset: int,
                  *, protection: int = VM_PROT_DEFAULT, max_protection: int = VM_PROT_ALL,
                  inheritance: int = VM_INHERIT_DEFAULT, needs_copy: bool = False,
                  share_map: VmMap | None = None) -> VmMapEntry:
    """Map [start, end) (which must be free) to `obj` or `share_map`; takes over the
    caller's reference."""
    entry = VmMapEntry(start, end, obj, offset, protection, max_protection, inheritance,
                       needs_copy, share_map)
    vmap.link(entry)
    return entry


def _pmap_ranges(vmap: VmMap, start: int, end: int) -> list[tuple[Pmap, int, int]]:
    """The (pmap, start, end) ranges that show [start, end) of a map: its own pmap for
    a task map, every sharer's for a sharing map."""
    if vmap.pmap is not None:
        return [(vmap.pmap, start, end)]
    out = []
    for task_map in vmap.sharers:
        for e in task_map.shared.get(vmap, ()):
            lo, hi = max(start, e.offset), min(end, e.offset + e.size)
            if lo < hi and task_map.pmap is not None:
                out.append((task_map.pmap, e.start + lo - e.offset, e.start + hi - e.offset))
    return out


def vm_map_pmap_remove(vmap: VmMap, start: int, end: int) -> None:
    """Drop hardware mappings of [start, end) of a map, in every pmap that shows it."""
    for pmap, lo, hi in _pmap_ranges(vmap, start, end):
        pmap.pmap_remove(lo, hi)


def vm_map_pmap_protect(vmap: VmMap, start: int, end: int, prot: int) -> None:
    """Reduce hardware mappings of [start, end) of a map to `prot`, everywhere shown."""
    for pmap, lo, hi in _pmap_ranges(vmap, start, end):
        pmap.pmap_protect(lo, hi, prot)


def vm_map_delete(vmap: VmMap, start: int, end: int) -> None:
    """Remove [start, end) from the map (holes are fine) and release what it referred to."""
    if start >= end:
        return
    doomed = vmap.clip_range(start, end)
    for entry in doomed:
        vmap.unlink(entry)
    vm_map_pmap_remove(vmap, start, end)
    with vmap.vm.phys.discard_batch():  # (a dead object's pages are punched out after
        for entry in doomed:  # the kernel lock is let go: vm_object._gone)
            entry_release(entry)


def entry_release(entry: VmMapEntry) -> None:
    """Drop the reference an unlinked entry held (freeing pages only it could see)."""
    obj = entry.object
    if obj is not None:
        if obj.internal and obj.ref_count == 1 and obj.copy is None:  # nobody else sees it
            vm_object_page_remove(obj, entry.offset, entry.offset + entry.size)
        vm_object_deallocate(obj)
    elif entry.share_map is not None:
        vm_map_deallocate(entry.share_map)


def vm_map_deallocate(vmap: VmMap) -> None:
    """Drop a reference to a map; the last one empties it."""
    vmap.ref_count -= 1
    if vmap.ref_count == 0:
        vm_map_delete(vmap, 0, VM_MAX_ADDRESS)
        if vmap.pmap is not None:
            vmap.pmap.pmap_destroy()


def vm_map_protect(vmap: VmMap, start: int, end: int, prot: int, set_max: bool) -> None:
    """Set the current (or maximum) protection of an allocated range; neither may exceed
    the maximum (KERN_PROTECTION_FAILURE)."""
    for e in vmap.check_mapped(start, end):  # a maximum can be lowered, never raised
        if prot & ~e.max_protection:
            raise MachError("KERN_PROTECTION_FAILURE", f"protection {prot:#x} exceeds the "
                            f"maximum {e.max_protection:#x} at {e.start:#x}")
    for e in vmap.clip_range(start, end):
        if e.object is not None:  # holes fault again: new pages get this protection
            vmap.vm.resident.lazy_freeze(e.object)
        if set_max:
            e.max_protection = prot
            e.protection &= prot
        else:
            e.protection = prot
    if vmap.pmap is not None:
        for e in vmap.entries_in(start, end):
            vmap.pmap.pmap_protect(max(e.start, start), min(e.end, end), e.protection)
            vmap.pmap.pmap_entry_protected(vmap, e, max(e.start, start), min(e.end, end))


def vm_map_inherit(vmap: VmMap, start: int, end: int, inheritance: int) -> None:
    """Set the inheritance of an allocated range."""
    vmap.check_mapped(start, end)
    for e in vmap.clip_range(start, end):
        e.inheritance = inheritance


# -- lookup for faults --------------------------------------------------------------------

@dataclass(frozen=True)
class FaultPolicy:
    """What a fault does when a data manager does not answer (paper 6.2.1)."""

    timeout_ms: float | None = None  # None: wait until the request is filled
    zero_fill: bool = False  # after the timeout: zero-filled memory, else a memory error


@dataclass
class MapLookup:
    """What vm_map_lookup found for one page."""

    holder: VmMap  # the map whose entry refers to the object (task or sharing map)
    entry: VmMapEntry  # that entry
    object: VmObject
    offset: int  # page offset in `object`
    prot: int  # access the mapping may be given
    single_use: bool  # no other task can reach this entry (not in a shared sharing map)
    policy: FaultPolicy | None  # the mapping's pager timeout, if it has its own


def vm_map_lookup(vmap: VmMap, va: int, access: int) -> MapLookup:
    """Find the object and offset behind page `va` and check `access` (fault step 1).

    A write to a needs_copy entry makes its shadow object here; a read of one gets no
    write access. Raises KERN_INVALID_ADDRESS or KERN_PROTECTION_FAILURE.
    """
    entry = vmap.lookup_entry(va)
    if entry is None:
        raise MachError("KERN_INVALID_ADDRESS", f"no memory is allocated at {va:#x}")
    if access & ~entry.protection:
        raise MachError("KERN_PROTECTION_FAILURE", f"access {access:#x} at {va:#x} exceeds "
                        f"the region's protection {entry.protection:#x}")
    prot, holder, single_use, policy = entry.protection, vmap, True, entry.policy
    if entry.share_map is not None:
        smap = entry.share_map
        s_addr = entry.offset + (va - entry.start)
        inner = smap.lookup_entry(s_addr)
        if inner is None:
            raise MachError("KERN_INVALID_ADDRESS", f"{va:#x} is a hole in a sharing map")
        prot &= inner.protection
        holder, single_use, entry, va = smap, smap.ref_count == 1, inner, s_addr
    if entry.needs_copy:
        if access & VM_PROT_WRITE:
            _make_shadow(entry)
        else:
            prot &= ~VM_PROT_WRITE
    assert entry.object is not None
    return MapLookup(holder, entry, entry.object, entry.offset + (va - entry.start), prot,
                     single_use, policy)


def _make_shadow(entry: VmMapEntry) -> None:
    """Give a needs_copy entry its own shadow object (the first write of a COW copy)."""
    assert entry.object is not None
    entry.object = vm_object_shadow(entry.object, entry.offset, entry.size)
    entry.offset = 0
    entry.needs_copy = False
