"""The kernel side of a native task's address space: map changes the process applies.

A native task's regions are MAP_SHARED mappings of VM objects' memfds in its own
process, and only the process can change its mappings. So when the kernel links an
entry into a native task's map (vm_allocate, a received out-of-line region, a child's
inherited regions), or unlinks one, `NativeMapBinding` records an instruction:

- ("map", start, length, fd, offset, prot): map `length` bytes of the memfd at `start`,
  with the entry's current protection;
- ("unmap", start, length): give the range back to the task's reservation;
- ("protect", start, length, prot): the range's current protection changed (the
  process mprotects what must fault in hardware and refuses the rest in `memory()`).

The next reply to any trap of the task carries the pending instructions as a numbered
batch, and the task applies them before it returns from the trap (like an AST in Mach);
every reply also names the last batch issued, so a thread never returns before the
changes another thread's reply carried are in place, and batches apply in order. So what a task does
to its own address space takes effect at once, and what others do to it takes effect at
its next kernel entry. The binding also records, per memfd, which task ranges map it,
so that write-protecting an object for a copy is one call per region.

Fields are guarded by the kernel lock.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pymach.pmap.uffd_pmap import ObjectStore, UffdPhysicalMemory, UffdPmap
    from pymach.vm.vm_map import VmMap, VmMapEntry
    from pymach.vm.vm_object import VmObject

WINDOW_BASE = 0x2000_0000_0000  # where native tasks reserve their address space
WINDOW_SIZE = 0x0100_0000_0000  # 1 TiB


@dataclass
class NativeMapBinding:
    """Pending mapping instructions for one native task (see module docstring)."""

    pmap: UffdPmap
    phys: UffdPhysicalMemory
    pending: list[tuple[Any, ...]] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)  # dups owned until the reply is sent
    regions: dict[int, tuple[ObjectStore, int, int]] = field(default_factory=dict)
    # start -> (store, object offset, length) of every mapped range
    batches: int = 0  # instruction batches handed out so far (numbered from 1)

    def mapped(self, vmap: VmMap, entry: VmMapEntry) -> None:
        """An entry was linked: map each object it shows at its place."""
        for start, length, obj, offset in _pieces(entry):
            store = self.phys.store_for(obj, offset + length)
            fd = os.dup(store.fd)
            self.fds.append(fd)
            self.pending.append(("map", start, length, fd, offset, entry.protection))
            self.regions[start] = (store, offset, length)
            store.mappings.add((self.pmap, start, offset, length))

    def unmapped(self, start: int, end: int) -> None:
        """An entry was unlinked: give the range back."""
        self.pending.append(("unmap", start, end - start))
        for s in [s for s, (_, _, n) in self.regions.items() if s < end and s + n > start]:
            store, offset, length = self.regions.pop(s)
            store.mappings.discard((self.pmap, s, offset, length))

    def protected(self, start: int, end: int, prot: int) -> None:
        """The current protection of a range changed (vm_protect)."""
        self.pending.append(("protect", start, end - start, prot))

    def take(self) -> tuple[dict[str, Any], list[int]]:
        """Reply fields carrying the pending instructions (fd numbers replaced by indexes
        into the returned fds) as the next numbered batch, and the number of the last
        batch issued, which the process applies before the trap returns."""
        out, fds = [], []
        for ins in self.pending:
            if ins[0] == "map":
                fds.append(ins[3])
                ins = (*ins[:3], len(fds) - 1, *ins[4:])
            out.append(ins)
        self.pending, self.fds = [], []
        batch = 0
        if out:
            self.batches += 1
            batch = self.batches
        fields: dict[str, Any] = {"batch": (batch, self.batches)}
        if out:
            fields["maps"] = out
        return fields, fds

    def everything(self, vmap: VmMap) -> None:
        """Queue the whole current map (a new process for the task)."""
        for entry in vmap.entries:
            self.mapped(vmap, entry)


def _pieces(entry: VmMapEntry) -> list[tuple[int, int, VmObject, int]]:
    """(start, length, object, object offset) of what an entry shows, through a
    sharing map if it has one."""
    if entry.share_map is None:
        assert entry.object is not None
        return [(entry.start, entry.size, entry.object, entry.offset)]
    out = []
    lo, hi = entry.offset, entry.offset + entry.size
    for inner in entry.share_map.entries_in(lo, hi):
        a, b = max(lo, inner.start), min(hi, inner.end)
        assert inner.object is not None
        out.append((entry.start + a - lo, b - a, inner.object, inner.offset + a - inner.start))
    return out
