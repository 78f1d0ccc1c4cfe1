"""Seeing the VM work: vm_regions rows, and `vmmap` / `vm_stat` style reports.

`regions` describes a map's regions for the vm_regions call (what a task may learn:
protections, inheritance, sharing, and the object's *name* port, never its memory
object or request port, footnote 3). `vmmap` adds what the kernel knows (object,
manager, shadow depth, resident pages) for the report of the same name. Both run with
the kernel lock held.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from pymach.include.vm_param import INHERIT_NAMES, prot_text

if TYPE_CHECKING:
    from pymach.ipc.port import Port
    from pymach.vm.vm_init import VmSystem
    from pymach.vm.vm_map import VmMap, VmMapEntry
    from pymach.vm.vm_object import VmObject


@dataclass(frozen=True)
class RegionRow:
    """One region as vm_regions reports it."""

    address: int
    size: int
    protection: int
    max_protection: int
    inheritance: int
    shared: bool
    offset: int
    name_port: Port | None


def _object_of(entry: VmMapEntry) -> tuple[VmObject | None, int]:
    """The object a task-map entry shows first (through its sharing map) and the offset."""
    if entry.share_map is None:
        return entry.object, entry.offset
    inner = entry.share_map.lookup_entry(entry.offset)
    if inner is None:
        return None, 0
    return inner.object, inner.offset + (entry.offset - inner.start)


def _named(obj: VmObject | None) -> VmObject | None:
    """The object at the bottom of a chain that has a pager name, if any."""
    while obj is not None:
        if obj.pager_name is not None and not obj.internal:
            return obj
        obj = obj.shadow
    return None


def regions(vmap: VmMap, start: int, end: int) -> list[RegionRow]:
    """Rows for the entries of a task map overlapping [start, end)."""
    rows = []
    for e in vmap.entries_in(start, end):
        obj, off = _object_of(e)
        named = _named(obj)
        rows.append(RegionRow(e.start, e.size, e.protection, e.max_protection, e.inheritance,
                              e.share_map is not None, off,
                              named.pager_name if named is not None else None))
    return rows


@dataclass(frozen=True)
class VmmapRow:
    """One region in a `vmmap` report."""

    start: int
    end: int
    protection: str  # current/maximum, e.g. "rw-/rwx"
    inheritance: str
    shared: bool
    object: str  # e.g. "obj12 anonymous" or "obj7 external (manager: fs)"
    offset: int
    shadow_depth: int
    resident: int  # pages of the region resident somewhere in its object chain
    copy_on_write: bool
    own_resident: int = 0  # of those, pages in the region's own (top) object: pages it
    # made or touched since it was copied (a migrated task's pages arrive as touched)

    def as_dict(self) -> dict[str, Any]:
        """The row as plain data (for --json)."""
        return asdict(self)


def _describe(obj: VmObject | None) -> str:
    if obj is None:
        return "-"
    text = f"obj{obj.serial} {obj.label}"
    bottom = obj
    while bottom.shadow is not None:
        bottom = bottom.shadow
    if not bottom.internal and bottom.pager is not None:
        pager = bottom.pager
        manager = f"on host {pager.remote_host}" if pager.remote_host else \
            pager.receiver.name if pager.receiver else "?"
        text += f" (manager: {manager})" if bottom is obj else f" over obj{bottom.serial} " \
                                                               f"(manager: {manager})"
    return text


def _resident(obj: VmObject | None, offset: int, size: int, page_size: int) -> int:
    count = 0
    for off in range(offset, offset + size, page_size):
        o: VmObject | None = obj
        at = off
        while o is not None:
            if o.resident_at(at):
                count += 1
                break
            at += o.shadow_offset
            o = o.shadow
    return count


def _own_resident(obj: VmObject | None, offset: int, size: int) -> int:
    return 0 if obj is None else sum(1 for at in obj.resident_offsets()
                                     if offset <= at < offset + size)


def resident_runs(vmap: VmMap, start: int, end: int, most: int) -> list[tuple[int, int]]:
    """Runs (address, pages), in address order, of the pages of [start, end) resident in
    their region's own (top) object, the pages the machine made there included (at most
    `most` runs: what follows is left out). The task's working set as its map knows it:
    what a migration manager predicts the task will touch again (vm_resident)."""
    ps, runs = vmap.vm.page_size, list[tuple[int, int]]()
    for e in vmap.entries_in(start, end):
        obj, off = _object_of(e)
        if obj is None or e.share_map is not None:
            continue
        lo, hi = max(start, e.start), min(end, e.end)
        base = off + lo - e.start  # the object offset of lo
        offsets = {at for at in obj.resident_offsets() if base <= at < base + hi - lo}
        if obj.lazy_frames is not None:
            offsets.update(vmap.vm.phys.lazy_collect(obj, base, base + hi - lo))
        for at in sorted(offsets):
            va = lo + at - base
            if runs and runs[-1][0] + runs[-1][1] * ps == va:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            elif len(runs) >= most:
                return runs
            else:
                runs.append((va, 1))
    return runs


def vmmap(vmap: VmMap) -> list[VmmapRow]:
    """The regions of a task map with their objects (see module docstring)."""
    rows = []
    ps = vmap.vm.page_size
    for e in vmap.entries:
        obj, off = _object_of(e)
        inner_cow = e.needs_copy
        if e.share_map is not None:
            inner = e.share_map.lookup_entry(e.offset)
            inner_cow = inner is not None and inner.needs_copy
        rows.append(VmmapRow(e.start, e.end,
                             f"{prot_text(e.protection)}/{prot_text(e.max_protection)}",
                             INHERIT_NAMES[e.inheritance], e.share_map is not None,
                             _describe(obj), off, obj.shadow_depth() if obj else 0,
                             _resident(obj, off, e.size, ps), inner_cow,
                             _own_resident(obj, off, e.size)))
    return rows


def format_vmmap(task_name: str, rows: list[VmmapRow]) -> str:
    """A `vmmap`-style table of one task's regions."""
    lines = [f"address space of task {task_name!r}",
             f"{'START':>14} {'END':>14} {'PRT/MAX':<8} {'INH':<5} {'SHR':<3} {'COW':<3} "
             f"{'RES':>5} {'DEPTH':>5}  OBJECT+OFFSET"]
    for r in rows:
        lines.append(f"{r.start:>#14x} {r.end:>#14x} {r.protection:<8} {r.inheritance:<5} "
                     f"{'y' if r.shared else '-':<3} {'y' if r.copy_on_write else '-':<3} "
                     f"{r.resident:>5} {r.shadow_depth:>5}  {r.object}+{r.offset:#x}")
    return "\n".join(lines)


def vm_stat(vm: VmSystem) -> dict[str, int]:
    """Page counts and counters of a kernel's VM, like macOS `vm_stat`."""
    res = vm.resident
    out = {"page_size": vm.page_size, "pages_free": res.free_count(),
           "pages_active": res.active_count(), "pages_inactive": len(res.inactive),
           "pages_wired": res.wired_count()}
    out.update(res.stats.as_dict())
    out.update(objects=vm.objects_alive, collapses=vm.stats_collapses,
               pageouts_in_flight=vm.pageouts_in_flight, cached_objects=len(vm.cached))
    return out


def format_vm_stat(stats: dict[str, int]) -> str:
    """A `vm_stat`-style listing."""
    return "\n".join(f"{k.replace('_', ' ') + ':':<24} {v:>12}" for k, v in stats.items())
