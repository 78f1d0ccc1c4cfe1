"""Virtual copies: task_create inheritance, out-of-line messages, vm_copy and vm_write.

Copying memory never copies data here; it makes copy-on-write references (3.3):

- an internal object is copied *symmetrically*: both the source and the copy refer to
  the same object with `needs_copy`, its resident pages lose write access in every
  pmap, and the first writer on either side gets a shadow object (vm_map_lookup);
- an external object can change under its copies (its manager may flush and provide
  other data), so it gets a *copy object* that shadows it; vm_fault pushes a page's old
  contents into the copy object just before the page is first written.

A `VmMapCopy` is memory in transit (Mach's vm_map_copy_t): a list of (object, offset,
size) pieces holding one reference each, made by `vm_map_copyin` from a map or
`vm_map_copy_from_bytes` from Python data, and consumed by `vm_map_copyout` (into a
receiver's map), `vm_map_copy_overwrite` (vm_write, vm_copy) or `vm_map_copy_discard`.
The cost of a copy is proportional to the map entries and resident pages involved,
never to the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pymach.errors import MachError
from pymach.include.vm_param import (
    VM_INHERIT_COPY,
    VM_INHERIT_NONE,
    VM_INHERIT_SHARE,
    VM_PROT_ALL,
    VM_PROT_DEFAULT,
    VM_PROT_READ,
    VM_PROT_WRITE,
    round_page,
    trunc_page,
)
from pymach.kern.thread import current_thread
from pymach.vm.vm_fault import Retry, vm_fault_page
from pymach.vm.vm_kern import object_read_page
from pymach.vm.vm_map import (
    VmMap,
    VmMapEntry,
    entry_release,
    vm_map_create,
    vm_map_delete,
    vm_map_insert,
    vm_map_lookup,
    vm_map_pmap_protect,
    vm_map_pmap_remove,
)
from pymach.vm.vm_object import (
    VmObject,
    vm_object_allocate,
    vm_object_collapse,
    vm_object_deallocate,
    vm_object_pmap_protect_copy,
    vm_object_reference,
    vm_object_shadow,
)

if TYPE_CHECKING:
    from pymach.vm.vm_init import VmSystem


@dataclass
class CopyEntry:
    """One piece of memory in transit; holds a reference to `object`."""

    object: VmObject
    offset: int
    size: int
    needs_copy: bool


@dataclass
class VmMapCopy:
    """Memory in transit: page-aligned pieces, and where the bytes start and end."""

    vm: VmSystem
    entries: list[CopyEntry] = field(default_factory=list)
    offset: int = 0  # where the data starts in the first page
    size: int = 0  # bytes of data
    consumed: bool = False

    @property
    def total(self) -> int:
        """Page-aligned length of all pieces."""
        return sum(e.size for e in self.entries)


# -- copying objects ---------------------------------------------------------------------

def vm_object_copy(obj: VmObject, offset: int, size: int) -> tuple[VmObject, int, bool]:
    """A copy-on-write copy of [offset, offset+size) of `obj`.

    Returns (object, offset, src_needs_copy): the object the copy refers to (with a new
    reference), and whether the source entry must now be marked needs_copy.
    """
    vm_object_collapse(obj)
    if obj.internal and not obj.vm.phys.maps_objects:
        vm_object_reference(obj)
        vm_object_pmap_protect_copy(obj, offset, offset + size)
        return obj, offset, True
    return _copy_object(obj), offset, False


def _copy_object(obj: VmObject) -> VmObject:
    """The copy object of an external object, made or reused (copy objects with push)."""
    old = obj.copy
    if old is not None and old.alive and not old.memq and not old.existence:
        vm_object_reference(old)  # nothing changed since it was made: it still fits
        return old
    new = vm_object_allocate(obj.vm, obj.size, label="copy")
    vm_object_reference(obj)
    new.shadow, new.shadow_offset = obj, 0
    if old is not None and old.alive:
        old_shadow = old.shadow  # the older copy now sees obj through the newer one
        vm_object_reference(new)
        old.shadow = new
        vm_object_deallocate(old_shadow)
    obj.copy = new
    if not obj.vm.phys.object_write_protect(obj):  # else one step per task region
        vm_object_pmap_protect_copy(obj, 0, obj.size)
    return new


def _copy_entry_piece(holder: VmMap, entry: VmMapEntry) -> CopyEntry:
    """A CopyEntry for all of an object entry (already clipped to the copied range)."""
    obj = entry.object
    assert obj is not None
    if entry.needs_copy:  # already a copy-on-write copy: share the object read-only
        vm_object_reference(obj)
        return CopyEntry(obj, entry.offset, entry.size, True)
    vm_object_collapse(obj)
    if obj.internal and obj.ref_count == 1 and not obj.vm.phys.maps_objects:
        # Only this entry maps the object, so only its range can hold writable
        # mappings of its pages: protect that range (Mach's pmap_protect), not each page.
        vm_object_reference(obj)
        entry.needs_copy = True
        vm_map_pmap_protect(holder, entry.start, entry.end, VM_PROT_ALL & ~VM_PROT_WRITE)
        return CopyEntry(obj, entry.offset, entry.size, True)
    obj, off, src_needs_copy = vm_object_copy(obj, entry.offset, entry.size)
    if src_needs_copy:
        entry.needs_copy = True
    return CopyEntry(obj, off, entry.size, True)


def _copy_range(vmap: VmMap, start: int, end: int) -> list[CopyEntry]:
    """Copy-on-write pieces for [start, end) of a map (which must be fully mapped)."""
    pieces: list[CopyEntry] = []
    for e in vmap.clip_range(start, end):
        if e.share_map is None:
            pieces.append(_copy_entry_piece(vmap, e))
        else:
            pieces.extend(_copy_range(e.share_map, e.offset, e.offset + e.size))
    return pieces


# -- task_create inheritance ---------------------------------------------------------------

def vm_map_fork(vm: VmSystem, parent: VmMap, child: VmMap | None = None) -> VmMap:
    """A child's task map (new, or the empty `child`) filled from `parent` by each
    region's inheritance (3.3)."""
    if child is None:
        child = vm_map_create(vm, vm.phys.pmap_create())
    for e in list(parent.entries):
        if e.inheritance == VM_INHERIT_NONE:
            continue
        if e.inheritance == VM_INHERIT_SHARE:
            smap = _share(vm, parent, e)
            smap.ref_count += 1
            vm_map_insert(child, e.start, e.end, None, e.offset, protection=e.protection,
                          max_protection=e.max_protection, inheritance=e.inheritance,
                          share_map=smap)
        else:
            at = e.start
            for piece in _copy_range(parent, e.start, e.end):
                insert_copy(child, at, piece, protection=e.protection,
                            max_protection=e.max_protection, inheritance=e.inheritance)
                at += piece.size
    return child


def insert_copy(vmap: VmMap, at: int, piece: CopyEntry, protection: int = VM_PROT_DEFAULT,
                max_protection: int = VM_PROT_ALL, inheritance: int = VM_INHERIT_COPY) -> None:
    """Map one piece of a copy at `at`. Where a region maps one object for good
    (`maps_objects`) it gets its private shadow now; elsewhere at the first write."""
    obj, offset, needs_copy = piece.object, piece.offset, piece.needs_copy
    if needs_copy and vmap.vm.phys.maps_objects:
        obj, offset, needs_copy = vm_object_shadow(obj, offset, piece.size), 0, False
    vm_map_insert(vmap, at, at + piece.size, obj, offset, protection=protection,
                  max_protection=max_protection, inheritance=inheritance,
                  needs_copy=needs_copy)


def _share(vm: VmSystem, tmap: VmMap, entry: VmMapEntry) -> VmMap:
    """The sharing map behind a task-map entry, made now if the entry has none (5.1)."""
    if entry.share_map is not None:
        return entry.share_map
    smap = vm_map_create(vm, None)
    vm_map_insert(smap, 0, entry.size, entry.object, entry.offset, protection=VM_PROT_ALL,
                  needs_copy=entry.needs_copy)  # the entry's object reference moves here
    entry.object, entry.offset, entry.needs_copy = None, 0, False
    tmap.share_entry(entry, smap)
    return smap


# -- memory in transit ---------------------------------------------------------------------

def vm_map_copy_check(vmap: VmMap, addr: int, size: int) -> None:
    """Raise unless [addr, addr+size) is allocated and readable (changes nothing)."""
    if size == 0:
        return
    ps = vmap.vm.page_size
    for e in vmap.check_mapped(trunc_page(addr, ps), round_page(addr + size, ps)):
        if not e.protection & VM_PROT_READ:
            raise MachError("KERN_PROTECTION_FAILURE", f"{e.start:#x}-{e.end:#x} is not "
                            f"readable")


def vm_map_copyin(vmap: VmMap, addr: int, size: int, src_destroy: bool) -> VmMapCopy:
    """Memory in transit from [addr, addr+size); with `src_destroy` the range leaves the
    map (moved without copying where nothing else refers to it)."""
    vm_map_copy_check(vmap, addr, size)
    ps = vmap.vm.page_size
    copy = VmMapCopy(vmap.vm, offset=addr % ps, size=size)
    if size == 0:
        return copy
    start, end = trunc_page(addr, ps), round_page(addr + size, ps)
    if src_destroy and _movable(vmap, start, end):
        copy.entries = _move_out(vmap, start, end)
    else:
        copy.entries = _copy_range(vmap, start, end)
        if src_destroy:
            vm_map_delete(vmap, start, end)
    return copy


def _movable(vmap: VmMap, start: int, end: int) -> bool:
    """True if every entry in range is private memory that can simply change hands."""
    for e in vmap.entries_in(start, end):
        obj = e.object
        if obj is None or not obj.internal or not (e.needs_copy or obj.ref_count == 1):
            return False
    return True


def _move_out(vmap: VmMap, start: int, end: int) -> list[CopyEntry]:
    """Unlink the entries of [start, end), keeping their object references for the copy."""
    pieces = []
    for e in vmap.clip_range(start, end):
        vmap.unlink(e)
        assert e.object is not None
        pieces.append(CopyEntry(e.object, e.offset, e.size, e.needs_copy))
    vm_map_pmap_remove(vmap, start, end)
    return pieces


def vm_map_copy_from_bytes(vm: VmSystem, data: bytes) -> VmMapCopy:
    """Memory in transit holding Python bytes (kept by the kernel until first touched)."""
    copy = VmMapCopy(vm, size=len(data))
    if data:
        size = round_page(len(data), vm.page_size)
        obj = vm_object_allocate(vm, size, label="data")
        obj.data_source = bytes(data)
        copy.entries = [CopyEntry(obj, 0, size, False)]
    return copy


def vm_map_copyout(vmap: VmMap, copy: VmMapCopy) -> int:
    """Map memory in transit anywhere in `vmap`; returns the address of its first byte.
    Raises KERN_NO_SPACE (leaving the copy unused) if it does not fit."""
    start = vmap.find_space(copy.total) if copy.entries else 0
    _consume(copy)
    if not copy.entries:
        return 0
    at = start
    for piece in copy.entries:
        insert_copy(vmap, at, piece, protection=VM_PROT_DEFAULT)
        at += piece.size
    return start + copy.offset


def vm_map_copyout_at(vmap: VmMap, address: int, copy: VmMapCopy, protection: int,
                      max_protection: int, inheritance: int) -> None:
    """Map memory in transit at `address` (page aligned, in a free range the caller
    checked) with these attributes, copy-on-write: the copy's objects are mapped, no page
    is copied. KERN_INVALID_ARGUMENT if the copy does not start on a page boundary."""
    if copy.offset:
        raise MachError("KERN_INVALID_ARGUMENT", f"memory in transit starts {copy.offset} "
                        f"bytes into a page: only whole pages can be mapped at an address")
    _consume(copy)
    at = address
    for piece in copy.entries:
        insert_copy(vmap, at, piece, protection=protection, max_protection=max_protection,
                    inheritance=inheritance)
        at += piece.size


def vm_map_copy_discard(copy: VmMapCopy) -> None:
    """Release memory in transit that will never be received."""
    if copy.consumed:
        return
    copy.consumed = True
    for piece in copy.entries:
        vm_object_deallocate(piece.object)


def _consume(copy: VmMapCopy) -> None:
    if copy.consumed:
        raise MachError("KERN_INVALID_ARGUMENT", "memory in transit was already used")
    copy.consumed = True


def _slice(copy: VmMapCopy, lo: int, hi: int) -> list[CopyEntry]:
    """New pieces (with new references) for bytes [lo, hi) of a copy's page space."""
    out, at = [], 0
    for p in copy.entries:
        a, b = max(lo, at), min(hi, at + p.size)
        if a < b:
            vm_object_reference(p.object)
            out.append(CopyEntry(p.object, p.offset + (a - at), b - a, p.needs_copy))
        at += p.size
    return out


def vm_map_copy_overwrite(vmap: VmMap, dst: int, copy: VmMapCopy) -> None:
    """Replace the page-aligned range at `dst` with the copy (vm_write, vm_copy).

    The range must be allocated and writable. Where it is shared through a sharing map,
    the replacement happens in the sharing map, so every sharer sees it (5.1); elsewhere
    only this mapping changes.
    """
    end = dst + copy.total
    for e in vmap.check_mapped(dst, end):
        if not e.protection & VM_PROT_WRITE:
            raise MachError("KERN_PROTECTION_FAILURE", f"{e.start:#x}-{e.end:#x} is not "
                            f"writable")
    if vmap.vm.phys.maps_objects:
        _write_pages(vmap, dst, copy)
        return
    _consume(copy)
    for e in vmap.clip_range(dst, end):
        pieces = _slice(copy, e.start - dst, e.end - dst)
        if e.share_map is not None:
            _replace(e.share_map, e.offset, pieces, None)
        else:
            _replace(vmap, e.start, pieces, e)
    for piece in copy.entries:
        vm_object_deallocate(piece.object)


def _write_pages(vmap: VmMap, dst: int, copy: VmMapCopy) -> None:
    """vm_write/vm_copy where regions map objects (`maps_objects`): store the copy's
    data into the pages at `dst`, as the task writing them would (the task's mappings
    stay; the memory changes under them)."""
    thread = current_thread()
    ps = vmap.vm.page_size
    at = dst
    _consume(copy)
    for piece in copy.entries:
        for off in range(piece.offset, piece.offset + piece.size, ps):
            data = object_read_page(thread, piece.object, off)
            while True:
                look = vm_map_lookup(vmap, at, VM_PROT_WRITE)
                try:
                    page, _ = vm_fault_page(thread, look.object, look.offset, VM_PROT_WRITE,
                                            look.prot, look.single_use, look.policy)
                    break
                except Retry:
                    continue
            vmap.vm.phys.phys_write(page.frame, data)
            page.dirty = True
            at += ps
        vm_object_deallocate(piece.object)


def _replace(vmap: VmMap, start: int, pieces: list[CopyEntry],
             like: VmMapEntry | None) -> None:
    """Put `pieces` at `start` in `vmap`, in place of what was there."""
    end = start + sum(p.size for p in pieces)
    old = vmap.clip_range(start, end)
    attrs = [(e.start, e.end, e.protection, e.max_protection, e.inheritance) for e in old]
    for e in old:
        vmap.unlink(e)
    vm_map_pmap_remove(vmap, start, end)
    for e in old:
        entry_release(e)
    at = start
    for p in pieces:
        prot, maxp, inh = _attrs_at(attrs, at, like)
        vm_map_insert(vmap, at, at + p.size, p.object, p.offset, protection=prot,
                      max_protection=maxp, inheritance=inh, needs_copy=p.needs_copy)
        at += p.size


def _attrs_at(attrs: list[tuple[int, int, int, int, int]], at: int,
              like: VmMapEntry | None) -> tuple[int, int, int]:
    for s, e, prot, maxp, inh in attrs:
        if s <= at < e:
            return prot, maxp, inh
    if like is not None:
        return like.protection, like.max_protection, like.inheritance
    return VM_PROT_ALL, VM_PROT_ALL, VM_INHERIT_COPY


__all__ = ["VM_INHERIT_SHARE", "CopyEntry", "VmMapCopy", "vm_map_copy_check",
           "vm_map_copy_discard", "vm_map_copy_from_bytes", "vm_map_copy_overwrite",
           "vm_map_copyin", "vm_map_copyout", "vm_map_copyout_at", "vm_map_fork", "vm_object_copy"]
