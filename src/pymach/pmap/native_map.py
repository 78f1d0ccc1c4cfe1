"""The kernel side of a native task's address space: map changes the process applies.

A native task's regions are MAP_SHARED mappings of VM objects' memfds in its own
process, and only the process can change its mappings. So when the kernel links an
entry into a native task's map (vm_allocate, a received out-of-line region, a child's
inherited regions), or unlinks one, `NativeMapBinding` records an instruction:

- [MAP_FD, start, length, fd, offset, prot, shared]: map `length` bytes of the memfd at
  `start`, with the entry's current protection. A range whose maximum protection allows
  writing is mapped MAP_SHARED from a read-write descriptor; any other range from a
  read-only descriptor, MAP_PRIVATE (Linux refuses to register a shared mapping without
  write permission with a userfaultfd), so no mprotect can make the object writable
  there: a task's write to such a page stays in a private copy of its own;
- [MAP_UNMAP, start, length]: give the range back to the task's reservation;
- [MAP_PROTECT, start, length, prot]: the range's current protection changed (the
  process mprotects what must fault in hardware and refuses the rest in `memory()`).

The process holds no userfaultfd: once it has mapped a batch it says so (the MAPPED
trap), and machd arms the batch's new ranges with the task's userfaultfd (`arm`): for
missing pages (holes of the memfd), pages in the memfd but not yet mapped in the task,
and writes to write-protected pages. While the VM lets the machine zero-fill an object
(vm_page.py), its range is armed without missing pages (`rearm`), so the kernel fills
a hole at first touch itself.

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

import contextlib
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pymach.include.traps import MAP_FD, MAP_FDS_MAX, MAP_PROTECT, MAP_UNMAP
from pymach.include.vm_param import VM_PROT_WRITE
from pymach.pmap.uffd import MODE_MINOR, MODE_MISSING, MODE_WP, UffdError, reopen

if TYPE_CHECKING:
    from pymach.pmap.uffd_pmap import ObjectStore, UffdPhysicalMemory, UffdPmap
    from pymach.vm.vm_map import VmMap, VmMapEntry
    from pymach.vm.vm_object import VmObject

ARMED = MODE_MISSING | MODE_WP | MODE_MINOR  # what a range is armed for
ARMED_LAZY = MODE_WP | MODE_MINOR  # the same while the kernel zero-fills holes itself

WINDOW_BASE = 0x2000_0000_0000  # where native tasks reserve their address space
WINDOW_SIZE = 0x0100_0000_0000  # 1 TiB


@dataclass
class NativeMapBinding:
    """Pending mapping instructions for one native task (see module docstring)."""

    pmap: UffdPmap
    phys: UffdPhysicalMemory
    pending: list[list[Any]] = field(default_factory=list)
    regions: dict[int, tuple[ObjectStore, int, int]] = field(default_factory=dict)
    # start -> (store, object offset, length) of every mapped range
    batches: int = 0  # instruction batches handed out so far (numbered from 1)
    unarmed: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    # batch -> the ranges it maps, to arm once the process says it mapped them
    uffd: Any = None  # the task's userfaultfd (machd's alone), once its process attached
    readonly: set[int] = field(default_factory=set)  # starts of ranges mapped read-only

    def mapped(self, vmap: VmMap, entry: VmMapEntry) -> None:
        """An entry was linked: map each object it shows at its place, from a read-only
        descriptor where the entry's maximum protection forbids writing. Until a process
        attaches (`uffd` set) nothing is recorded: `everything` queues the whole map then."""
        if self.uffd is None:
            return
        shared = bool(entry.max_protection & VM_PROT_WRITE)
        for start, length, obj, offset in _pieces(entry):
            store = self.phys.store_for(obj, offset + length)
            fd = reopen(store.fd, writable=shared)
            self.pending.append([MAP_FD, start, length, fd, offset, entry.protection,
                                 int(shared)])
            self.regions[start] = (store, offset, length)
            (self.readonly.discard if shared else self.readonly.add)(start)
            store.mappings.add((self.pmap, start, offset, length))

    def unmapped(self, start: int, end: int) -> None:
        """An entry was unlinked: give the range back."""
        if self.uffd is None:
            return
        self.pending.append([MAP_UNMAP, start, end - start])
        for s in [s for s, (_, _, n) in self.regions.items() if s < end and s + n > start]:
            store, offset, length = self.regions.pop(s)
            self.readonly.discard(s)
            store.mappings.discard((self.pmap, s, offset, length))

    def protected(self, vmap: VmMap, entry: VmMapEntry, start: int, end: int) -> None:
        """The protection of part of an entry changed (vm_protect). A maximum that no
        longer allows writing remaps the entry from a read-only descriptor."""
        if self.uffd is None:
            return
        if not entry.max_protection & VM_PROT_WRITE and any(
                s not in self.readonly for s, _, _, _ in _pieces(entry)):
            self.mapped(vmap, entry)
        self.pending.append([MAP_PROTECT, start, end - start, entry.protection])

    def take(self) -> tuple[list[Any], list[int]]:
        """The pending instructions as the next numbered batch: ([batch, last batch
        issued, instructions], fds), each MAP_FD naming its fd by index into fds. The
        process applies the batch (and every earlier one) before its trap returns. At
        most MAP_FDS_MAX MAP_FD instructions go in one batch: the rest stay pending, in
        order, for the reply to the MAPPED trap that this batch makes the process send
        (a batch that maps something always does)."""
        out: list[list[Any]] = []
        fds: list[int] = []
        arm: list[tuple[int, int]] = []
        taken = 0
        for ins in self.pending:
            if ins[0] == MAP_FD:
                if len(fds) == MAP_FDS_MAX:
                    break
                fds.append(ins[3])
                ins = [*ins[:3], len(fds) - 1, *ins[4:]]
                arm.append((ins[1], ins[2]))
            out.append(ins)
            taken += 1
        del self.pending[:taken]
        batch = 0
        if out:
            self.batches += 1
            batch = self.batches
            if arm:
                self.unarmed[batch] = arm
        return [batch, self.batches, out], fds

    def discard(self) -> None:
        """The map is gone: close the descriptors of the instructions never sent (each
        MAP_FD owns its dup until a reply carries it)."""
        fds = [ins[3] for ins in self.pending if ins[0] == MAP_FD]
        self.pending = []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def arm(self, batch: int) -> None:
        """The process has mapped `batch`: register its new ranges with the task's
        userfaultfd, so that machd serves their faults. A range the process did not map
        as told (or that a later instruction of the batch unmapped) stays unarmed: only
        that task is affected (it reads its own reservation or mapping unserved)."""
        for start, length in self.unarmed.pop(batch, ()):
            if self.uffd is not None:
                with contextlib.suppress(UffdError):
                    self.uffd.register(start, length, ARMED)

    def armed_shared(self, start: int) -> bool:
        """True if the range at `start` is mapped writable and shared, and armed."""
        return (self.uffd is not None and start in self.regions
                and start not in self.readonly
                and not any(s == start for b in self.unarmed.values() for s, _ in b))

    def rearm(self, start: int, length: int, lazy: bool) -> None:
        """Arm an armed range again: `lazy`, without missing pages (registering fewer
        modes changes nothing, so the range is disarmed first, which wakes its waiting
        faulters: they fault again into the kernel's own fill; the range has no page
        the VM knows of, so no write protection is lost), else with all of them."""
        if self.uffd is None:
            return
        with contextlib.suppress(UffdError):  # the process unmapped it meanwhile
            if lazy:
                self.uffd.unregister(start, length)
            self.uffd.register(start, length, ARMED_LAZY if lazy else ARMED)

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
