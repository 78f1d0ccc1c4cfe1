"""The kernel's own access to memory: reading data in transit and tasks' memory.

The kernel reads pages through `vm_fault_page`, exactly as a task's fault would find
them (shadow chains, pagers, data in transit), so it sees what the task would see. A
read may wait (for a pagein or a free frame); the caller's thread then sleeps with the
kernel lock released and the read starts that page again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from pymach.include.vm_param import VM_PROT_READ, VM_PROT_WRITE, trunc_page
from pymach.vm.vm_fault import Retry, _pager_has, resident_page, vm_fault_page
from pymach.vm.vm_map import vm_map_lookup

if TYPE_CHECKING:
    from pymach.kern.thread import Thread
    from pymach.vm.vm_map import VmMap
    from pymach.vm.vm_map_copy import VmMapCopy
    from pymach.vm.vm_object import VmObject


def object_read_page(thread: Thread, obj: VmObject, offset: int) -> bytes:
    """The page of `obj` at `offset` (page aligned), as a task reading it would see it.
    The caller holds a reference to `obj` (memory in transit does)."""
    while True:
        try:
            page, _ = vm_fault_page(thread, obj, offset, VM_PROT_READ, VM_PROT_READ)
        except Retry:
            continue
        return obj.vm.phys.phys_read(page.frame)


def _kernel_bytes(copy: VmMapCopy) -> bytes | None:
    """All the data of memory in transit made from Python bytes and not changed since
    (vm_map_copy_from_bytes), as the kernel holds them; else None."""
    if len(copy.entries) == 1:
        obj = copy.entries[0].object
        if (obj.data_source is not None and not obj.memq and not obj.existence
                and obj.shadow is None and copy.entries[0].offset == 0):
            return obj.data_source
    return None


def copy_bytes(thread: Thread, copy: VmMapCopy) -> bytes:
    """The bytes of memory in transit (without consuming it)."""
    held = _kernel_bytes(copy)
    if held is not None:
        return held[copy.offset:copy.offset + copy.size]
    ps = copy.vm.page_size
    out = bytearray()
    for piece in copy.entries:
        for off in range(piece.offset, piece.offset + piece.size, ps):
            out += object_read_page(thread, piece.object, off)
    return bytes(out[copy.offset:copy.offset + copy.size])


@contextlib.contextmanager
def copy_view(thread: Thread, copy: VmMapCopy) -> Iterator[memoryview]:
    """The bytes of memory in transit (without consuming it) as one read-only buffer,
    valid for the block (kernel lock held): with no copy, the bytes the kernel holds,
    or the machine's view of the one object whose memory holds all the data
    (`object_view`: the native backend maps its memfd); else a copy (copy_bytes)."""
    held = _kernel_bytes(copy)
    if held is not None:
        yield memoryview(held)[copy.offset:copy.offset + copy.size]
        return
    plain = _plain_source(copy)
    if plain is not None:
        obj, start, end = plain
        with copy.vm.phys.object_view(obj, start, end) as view:
            if view is not None:
                yield view[copy.offset:copy.offset + copy.size]
                return
    yield memoryview(copy_bytes(thread, copy))


def _plain_source(copy: VmMapCopy) -> tuple[VmObject, int, int] | None:
    """(object, start, end) if memory in transit is one piece whose every page is, as
    it is, a page of that one object's range or a page never made there (a zero page:
    nothing lies below the object, no pager, no data kept by the kernel); the object is
    found down the shadow chain through objects with no page of their own (a copy
    object nothing was pushed to). None otherwise."""
    if len(copy.entries) != 1:
        return None
    piece = copy.entries[0]
    obj, off = piece.object, piece.offset
    while True:
        if (obj.pager is not None or obj.pending or obj.existence
                or obj.data_source is not None or obj.holding_for is not None):
            return None
        if obj.shadow is None:
            return obj, off, off + piece.size
        if obj.memq or obj.lazy_frames is not None:
            return None
        obj, off = obj.shadow, off + obj.shadow_offset


def map_read(thread: Thread, vmap: VmMap, address: int, size: int) -> bytes:
    """Bytes [address, address+size) of a map, read as the task would read them."""
    data = bytearray(size)
    map_read_into(thread, vmap, address, memoryview(data))
    return bytes(data)


def map_read_into(thread: Thread, vmap: VmMap, address: int, into: memoryview) -> None:
    """Copy bytes [address, address+len(into)) of a map into `into`, read as the task
    would read them. After each page a fault finds, the pages after it in the same
    entry that are resident at once (`resident_page`) are copied with it, in one
    backend call (phys_read_into: nothing is allocated between)."""
    ps = vmap.vm.page_size
    phys = vmap.vm.phys
    va, end, at = trunc_page(address, ps), address + len(into), 0
    while va < end:
        look = vm_map_lookup(vmap, va, VM_PROT_READ)
        try:  # after a wait the map may have changed: look it up again
            page, _ = vm_fault_page(thread, look.object, look.offset, VM_PROT_READ,
                                    VM_PROT_READ)
        except Retry:
            continue
        frames, first = [page.frame], va
        base, stop = va - look.offset, min(end, look.entry.end)
        va += ps
        while look.holder is vmap and va < stop:
            more = resident_page(look.object, va - base)
            if more is None:
                break
            frames.append(more.frame)
            va += ps
        skip = max(0, address - first)
        n = min(va, end) - first - skip
        phys.phys_read_into(frames, into[at:at + n], skip)
        at += n


def map_write(thread: Thread, vmap: VmMap, address: int, data: bytes) -> None:
    """Store `data` at `address` of a map, as the task writing it would."""
    ps = vmap.vm.page_size
    pos = 0
    while pos < len(data):
        va = address + pos
        n = min(len(data) - pos, ps - va % ps)
        look = vm_map_lookup(vmap, trunc_page(va, ps), VM_PROT_WRITE)
        try:
            page, _ = vm_fault_page(thread, look.object, look.offset, VM_PROT_WRITE,
                                    look.prot, look.single_use, look.policy)
        except Retry:
            continue
        vmap.vm.phys.phys_write(page.frame, data[pos:pos + n], va % ps)
        page.dirty = True
        pos += n


def range_readable_now(vmap: VmMap, address: int, size: int) -> bool:
    """True if every page of [address, address+size) can be read without waiting for a
    data manager: resident, held by the kernel, or zero-filled (kernel lock held). A
    hole is not readable; a sharing map's range counts as readable.

    Works by map entry: an entry whose shadow chain has no busy page and no page any
    data manager holds is readable with no look at its pages (a task's anonymous GiB:
    one check, not 262,144); only the others are looked at page by page."""
    ps = vmap.vm.page_size
    start, end = trunc_page(address, ps), address + size
    at = start
    for entry in vmap.entries_in(start, end):
        if entry.start > at:
            return False  # a hole
        lo, hi = max(entry.start, start), min(entry.end, end)
        at = entry.end
        if entry.object is None:
            continue  # a sharing map: be safe below
        off = entry.offset + (lo - entry.start)
        if not _chain_needs_nothing(entry.object, off, off + (hi - lo)) and not all(
                _available(entry.object, o) for o in range(off, off + (hi - lo), ps)):
            return False
    return at >= end


def _chain_needs_nothing(obj: VmObject | None, lo: int, hi: int) -> bool:
    """True if no page of [lo, hi) of `obj`, nor below it in its shadow chain, is busy
    or held by a data manager: every page there is resident or zero-fill, readable now.
    (False only means "look page by page".)"""
    while obj is not None:
        if obj.busy_pages or _manager_may_hold(obj, lo, hi):
            return False
        lo, hi = lo + obj.shadow_offset, hi + obj.shadow_offset
        obj = obj.shadow
    return True


def _manager_may_hold(obj: VmObject, lo: int, hi: int) -> bool:
    """True if a data manager may have to be asked for a page of [lo, hi) of `obj`: an
    external object's manager may hold any page; the default pager only those it was
    given (`existence`)."""
    if obj.pager is None:
        return False
    return not obj.internal or any(lo <= o < hi for o in obj.existence)


def _available(obj: VmObject | None, off: int) -> bool:
    while obj is not None:
        if obj.resident_at(off):  # (an extent's page is never busy)
            page = obj._memq.get(off)
            return page is None or not page.busy
        if off in obj.pending or (obj.data_source is not None and off not in obj.existence):
            return True
        if _pager_has(obj, off):
            return False
        off += obj.shadow_offset
        obj = obj.shadow
    return True
