"""Table 3-3 (and 3-4): the virtual memory operations, as the kernel serves them.

Each method is the kernel side of an RPC on a task port (include/mach_defs.py: vm_defs),
run with the kernel lock held on the task the request was sent to, so any holder of a
task's port can operate on its memory. Addresses and sizes are checked here and bad
ones fail with KERN_INVALID_ARGUMENT (not an int, not page aligned where it must be),
KERN_INVALID_ADDRESS (outside the address space or not allocated), KERN_NO_SPACE or
KERN_PROTECTION_FAILURE.

Edge cases follow GNU Mach's vm/vm_user.c (and XNU's, where they agree):
- a zero-size call touches nothing and succeeds at any address (vm_deallocate,
  vm_protect, vm_inherit, vm_read, vm_write, vm_copy, vm_regions, vm_pager_timeout);
  vm_allocate of size 0 returns address 0 and allocates nothing;
- a fixed-address vm_allocate or vm_allocate_with_pager takes the page the address is
  in (trunc_page) and a size rounded up to whole pages (round_page), as GNU Mach does;
- vm_write and vm_copy need page-aligned destinations (and vm_copy a page-aligned
  source and count), as GNU Mach's vm_map_copy_overwrite; vm_write's data may end
  mid-page (the rest of the last page is kept), as XNU allows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pymach.errors import MachError
from pymach.include.mach_defs import RESIDENT_RUNS_MAX
from pymach.include.vm_param import (
    VM_MAX_ADDRESS,
    check_inherit,
    check_int,
    check_prot,
    round_page,
    trunc_page,
)
from pymach.kern.thread import current_thread
from pymach.vm.memory_object import vm_object_enter
from pymach.vm.vm_kern import copy_bytes, map_read
from pymach.vm.vm_map import (
    FaultPolicy,
    vm_map_delete,
    vm_map_inherit,
    vm_map_insert,
    vm_map_protect,
)
from pymach.vm.vm_map_copy import (
    VmMapCopy,
    vm_map_copy_discard,
    vm_map_copy_from_bytes,
    vm_map_copy_overwrite,
    vm_map_copyin,
    vm_map_copyout_at,
)
from pymach.vm.vm_object import vm_object_allocate
from pymach.vm.vm_report import regions, resident_runs

if TYPE_CHECKING:
    from pymach.kern.host import Kernel
    from pymach.kern.task import Task
    from pymach.vm.vm_map import VmMap


def task_map(task: Task) -> VmMap:
    """The address map of a live task, or KERN_INVALID_TASK."""
    if not task.active or task.map is None:
        raise MachError("KERN_INVALID_TASK", f"task {task.name!r} has terminated")
    return task.map


def page_range(vmap: VmMap, address: object, size: object) -> tuple[int, int]:
    """[address, address+size) rounded out to pages and checked against the map; empty
    for size 0, at any address (as in Mach, a zero-size call touches nothing)."""
    addr = check_int(address, "address")
    n = check_int(size, "size")
    ps = vmap.vm.page_size
    start = trunc_page(addr, ps)
    if n == 0:
        return start, start
    if addr + n > VM_MAX_ADDRESS:
        raise MachError("KERN_INVALID_ADDRESS", f"{addr:#x}+{n:#x} is beyond the address space")
    return start, round_page(addr + n, ps)


def check_aligned(vmap: VmMap, value: object, what: str) -> int:
    """A page-aligned non-negative int, or KERN_INVALID_ARGUMENT."""
    v = check_int(value, what)
    if v % vmap.vm.page_size:
        raise MachError("KERN_INVALID_ARGUMENT", f"{what} {v:#x} is not a multiple of the "
                        f"page size ({vmap.vm.page_size})")
    return v


class VmServer:
    """The kernel's implementation of vm_defs (kernel lock held)."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel

    def vm_allocate(self, task: Task, address: int, size: int, anywhere: bool) -> int:
        vmap = task_map(task)
        n = check_int(size, "size")
        check_int(address, "address")
        if n == 0:  # as GNU Mach and XNU: nothing allocated, address 0
            return 0
        start = self._place(vmap, address, round_page(n, vmap.vm.page_size), anywhere)
        obj = vm_object_allocate(vmap.vm, round_page(n, vmap.vm.page_size))
        vm_map_insert(vmap, start, start + obj.size, obj, 0)
        return start

    def _place(self, vmap: VmMap, address: object, size: int, anywhere: bool) -> int:
        """Where a new region of `size` bytes goes: anywhere, or at the page `address`
        is in (trunc_page, as GNU Mach's vm_allocate and vm_map), which must be free."""
        addr = check_int(address, "address")
        if anywhere:
            return vmap.find_space(size)
        start = trunc_page(addr, vmap.vm.page_size)
        if start + size > vmap.max_offset or start < vmap.min_offset:
            raise MachError("KERN_INVALID_ADDRESS", f"{start:#x}+{size:#x} is outside the "
                            f"address space")
        if not vmap.range_free(start, start + size):
            raise MachError("KERN_NO_SPACE", f"{start:#x}-{start + size:#x} is already "
                            f"(partly) allocated")
        return start

    def vm_deallocate(self, task: Task, address: int, size: int) -> None:
        vmap = task_map(task)
        start, end = page_range(vmap, address, size)
        vm_map_delete(vmap, start, end)

    def vm_inherit(self, task: Task, address: int, size: int, inheritance: int) -> None:
        vmap = task_map(task)
        inh = check_inherit(inheritance)
        start, end = page_range(vmap, address, size)
        if start < end:
            vm_map_inherit(vmap, start, end, inh)

    def vm_protect(self, task: Task, address: int, size: int, set_max: bool,
                   new_protection: int) -> None:
        vmap = task_map(task)
        prot = check_prot(new_protection)
        start, end = page_range(vmap, address, size)
        if start < end:
            vm_map_protect(vmap, start, end, prot, bool(set_max))

    def vm_read(self, task: Task, address: int, size: int) -> VmMapCopy:
        vmap = task_map(task)
        addr, n = check_int(address, "address"), check_int(size, "size")
        page_range(vmap, addr, n)
        return vm_map_copy_from_bytes(vmap.vm, b"") if n == 0 else vm_map_copyin(
            vmap, addr, n, src_destroy=False)

    def vm_write(self, task: Task, address: int, data: VmMapCopy) -> None:
        vmap = task_map(task)
        check_int(address, "address")
        if data.size == 0:  # as GNU Mach: a null copy overwrites nothing, anywhere
            return
        start = check_aligned(vmap, address, "address")
        page_range(vmap, start, data.size)
        if data.size % vmap.vm.page_size or data.offset:
            data = self._whole_pages(vmap, start, data)  # a new copy: ours to release
            try:
                vm_map_copy_overwrite(vmap, start, data)
            finally:
                vm_map_copy_discard(data)  # no-op once consumed
            return
        vm_map_copy_overwrite(vmap, start, data)

    def _whole_pages(self, vmap: VmMap, start: int, data: VmMapCopy) -> VmMapCopy:
        """Data padded with what follows it in its last page, as bytes in transit."""
        thread = current_thread()
        raw = copy_bytes(thread, data)
        end = round_page(start + len(raw), vmap.vm.page_size)
        vmap.check_mapped(start, end)
        tail = map_read(thread, vmap, start + len(raw), end - start - len(raw))
        return vm_map_copy_from_bytes(vmap.vm, raw + tail)

    def vm_copy(self, task: Task, source_address: int, count: int, dest_address: int) -> None:
        vmap = task_map(task)
        for value, what in ((source_address, "source_address"), (count, "count"),
                            (dest_address, "dest_address")):
            check_int(value, what)
        if count == 0:  # as GNU Mach: a null copy, anywhere
            return
        src = check_aligned(vmap, source_address, "source_address")
        n = check_aligned(vmap, count, "count")
        dst = check_aligned(vmap, dest_address, "dest_address")
        page_range(vmap, src, n)
        page_range(vmap, dst, n)
        vmap.check_mapped(dst, dst + n)
        copy = vm_map_copyin(vmap, src, n, src_destroy=False)
        try:
            vm_map_copy_overwrite(vmap, dst, copy)
        finally:
            vm_map_copy_discard(copy)  # no-op once consumed

    def vm_regions(self, task: Task, address: int, size: int) -> tuple[Any, ...]:
        vmap = task_map(task)
        start, end = page_range(vmap, address, size)
        rows = regions(vmap, start, end)
        return (tuple(r.address for r in rows), tuple(r.size for r in rows),
                tuple(r.protection for r in rows), tuple(r.max_protection for r in rows),
                tuple(r.inheritance for r in rows), tuple(int(r.shared) for r in rows),
                tuple(r.offset for r in rows), tuple(r.name_port for r in rows))

    def vm_resident(self, task: Task, address: int, size: int) -> tuple[Any, ...]:
        vmap = task_map(task)
        start, end = page_range(vmap, address, size)
        runs = resident_runs(vmap, start, end, RESIDENT_RUNS_MAX)
        return tuple(a for a, _ in runs), tuple(n for _, n in runs)

    def vm_statistics(self, task: Task) -> tuple[int, ...]:
        vm = task_map(task).vm
        res = vm.resident
        s = res.stats
        return (vm.page_size, res.free_count(), res.active_count(), len(res.inactive),
                res.wired_count(), s.faults, s.zero_fill_count, s.cow_faults, s.pageins,
                s.pageouts, s.reactivations, s.lookups, s.hits)

    def vm_allocate_with_pager(self, task: Task, address: int, size: int, anywhere: bool,
                               memory_object: Any, offset: int) -> int:
        vmap = task_map(task)
        n = round_page(check_int(size, "size", 1), vmap.vm.page_size)
        off = check_int(offset, "offset")
        start = self._place(vmap, address, n, anywhere)
        obj, obj_offset = vm_object_enter(vmap.vm, memory_object, off, n)
        vm_map_insert(vmap, start, start + n, obj, obj_offset)
        return start

    def vm_map_copyout(self, task: Task, address: int, data: VmMapCopy, protection: int,
                       max_protection: int, inheritance: int) -> None:
        vmap = task_map(task)
        start = check_aligned(vmap, address, "address")
        prot, maxp = check_prot(protection), check_prot(max_protection, "max_protection")
        inh = check_inherit(inheritance)
        if prot & ~maxp:
            raise MachError("KERN_INVALID_ARGUMENT", f"protection {prot} exceeds "
                            f"max_protection {maxp}")
        if data.total:
            self._place(vmap, start, data.total, anywhere=False)
            vm_map_copyout_at(vmap, start, data, prot, maxp, inh)

    def vm_pager_timeout(self, task: Task, address: int, size: int, timeout_ms: float,
                         zero_fill: bool) -> None:
        vmap = task_map(task)
        if not timeout_ms >= 0:  # (nor NaN)
            raise MachError("KERN_INVALID_ARGUMENT", "timeout_ms must be >= 0")
        start, end = page_range(vmap, address, size)
        vmap.check_mapped(start, end)
        policy = FaultPolicy(float(timeout_ms), bool(zero_fill))
        for e in vmap.clip_range(start, end) if start < end else ():
            e.policy = policy
