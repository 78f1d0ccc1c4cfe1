"""One kernel's virtual memory system: physical memory, resident pages, and VM policy.

`VmSystem` ties the machine-independent VM to one kernel: its `PhysicalMemory` (from the
pmap backend), the resident page table, the default pager port, the pageout targets and
the objects known by memory object port. It also owns waiting for free frames: a
thread that finds none wakes the pageout daemon and sleeps on `free_waitq`; if pageout
can make no progress (no memory, no backing store) such threads fail with
KERN_RESOURCE_SHORTAGE instead of hanging.

Fields are guarded by the kernel lock unless marked immutable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pymach.errors import MachError
from pymach.kern.sched_prim import WaitQueue, thread_block
from pymach.pmap import make_physical_memory
from pymach.vm.memory_object import (
    in_place_expired,
    object_cache_enter,
    object_clean,
    pager_died,
)
from pymach.vm.vm_map import FaultPolicy
from pymach.vm.vm_page import VmResident

MIN_MANAGER_PAGES = 8

if TYPE_CHECKING:
    from pymach.ipc.port import Port
    from pymach.kern.host import Kernel
    from pymach.kern.thread import Thread
    from pymach.vm.vm_object import VmObject


def _pages_1024(what: str, pages: object) -> int:
    """`pages` if it is an int from 1 to 1024 (a count of pages one request may ask for),
    else KERN_INVALID_ARGUMENT naming `what`."""
    if isinstance(pages, bool) or not isinstance(pages, int) or not 1 <= pages <= 1024:
        raise MachError("KERN_INVALID_ARGUMENT", f"{what} must be an int from 1 to 1024")
    return pages


class VmSystem:
    """The VM state of one kernel (see module docstring)."""

    def __init__(self, kernel: Kernel, backend: str = "soft") -> None:
        self.kernel = kernel  # immutable
        self.page_size = kernel.page_size  # immutable
        nframes = kernel.memory_size // kernel.page_size
        self.phys = make_physical_memory(backend, kernel.page_size, nframes)  # immutable
        reserved = max(2, nframes // 64)
        self.resident = VmResident(self.phys, reserved)  # immutable
        self.free_min = max(reserved + 2, nframes // 32)  # wake pageout below this
        self.free_target = max(self.free_min + 2, nframes // 16)  # pageout frees up to this
        self.objects_alive = 0
        self.stats_collapses = 0
        self.pager_objects: dict[tuple[Port, int], VmObject] = {}  # (port, align) -> obj
        self.port_objects: dict[Port, dict[int, VmObject]] = {}  # the same by port:
        # port -> {align: obj} (pager_object_set / pager_object_drop keep both)
        self.cached: dict[VmObject, None] = {}  # unreferenced objects kept (pager_cache)
        self.default_pager_port: Port | None = None  # set when the default pager starts
        self.free_waitq = WaitQueue(kernel.sched.lock, "vm.free")
        self.pageout_waitq = WaitQueue(kernel.sched.lock, "vm.pageout")
        self.free_wanted = 0  # threads sleeping on free_waitq
        self.shortage = ""  # why memory cannot be found, once pageout gives up
        self.pageouts_in_flight = 0  # holding objects not yet released by their pager
        self.swap_epoch = 0  # bumped when backing store may have been freed
        self.fault_policy = FaultPolicy()  # the host's pager timeout (set by boot)
        self.pageout_deadline_ms = 1000.0  # a manager must release paged-out data by then
        self.holdings: dict[VmObject, float] = {}  # external pageouts in flight -> deadline
        self.in_place_waiting: dict[VmObject, None] = {}  # terminating objects waiting
        # for their write-backs in place to be released (memory_object.py)
        self.holding_deadlines: list[tuple[float, int, VmObject]] = []  # a heap of
        # (deadline, serial, holding); an entry that no longer matches `holdings` is stale
        self.manager_page_limit = max(MIN_MANAGER_PAGES, nframes // 2)  # pages per manager
        self.cache_limit = 64  # unreferenced objects kept for their managers (section 9)
        self.resident.on_free = self._frame_freed

    # -- free frames ------------------------------------------------------------------
    def _frame_freed(self) -> None:
        self.shortage = ""
        if self.free_wanted:
            self.kernel.sched.thread_wakeup(self.free_waitq)

    def after_grab(self) -> None:
        """Called after a frame is taken: wake the pageout daemon when memory runs low."""
        if self.resident.free_count() < self.free_min:
            self.kernel.sched.thread_wakeup(self.pageout_waitq)

    def read_ahead_room(self) -> int:
        """How many frames pages nobody asked for yet (a fault's cluster, a manager's
        extra data) may take now: those above `free_min`, where pageout wakes (so read-
        ahead goes on, as the daemon works, while memory is short of its target)."""
        return self.resident.free_count() - self.free_min

    def page_wait(self, thread: Thread) -> None:
        """Sleep until a frame may be free (kernel lock released meanwhile).

        Raises KERN_RESOURCE_SHORTAGE if pageout found nothing it could free.
        """
        if self.shortage:
            raise MachError("KERN_RESOURCE_SHORTAGE", self.shortage)
        self.kernel.sched.thread_wakeup(self.pageout_waitq)
        self.free_wanted += 1
        try:
            thread_block(self.kernel.sched, thread, self.free_waitq)
        finally:
            self.free_wanted -= 1
        if self.shortage:
            raise MachError("KERN_RESOURCE_SHORTAGE", self.shortage)

    def pageout_needed(self) -> bool:
        """True when free frames are below target and someone needs memory."""
        return self.resident.free_count() < self.free_target

    def configure(self, pager_timeout_ms: float | None, pager_timeout_action: str,
                  pageout_deadline_ms: float, manager_page_limit: int | None,
                  pager_cluster_pages: int = 1, read_ahead_pages: int | None = None) -> None:
        """Set the host's policies for data managers (boot parameters). `read_ahead_pages`
        None: as many as `pager_cluster_pages` (a request never grows)."""
        self.pager_cluster_pages = _pages_1024("pager_cluster_pages", pager_cluster_pages)
        self.read_ahead_pages = pager_cluster_pages if read_ahead_pages is None else \
            _pages_1024("read_ahead_pages", read_ahead_pages)
        if self.read_ahead_pages < pager_cluster_pages:
            raise MachError("KERN_INVALID_ARGUMENT", "read_ahead_pages must be at least "
                            "pager_cluster_pages")
        if pager_timeout_action not in ("error", "zero_fill"):
            raise MachError("KERN_INVALID_ARGUMENT", "pager_timeout_action must be 'error' or "
                            "'zero_fill'")
        for what, v in (("pager_timeout_ms", pager_timeout_ms),
                        ("pageout_deadline_ms", pageout_deadline_ms)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or v < 0):
                raise MachError("KERN_INVALID_ARGUMENT", f"{what} must be a number >= 0")
        self.fault_policy = FaultPolicy(pager_timeout_ms, pager_timeout_action == "zero_fill")
        self.pageout_deadline_ms = float(pageout_deadline_ms)
        if manager_page_limit is not None:
            if isinstance(manager_page_limit, bool) or not isinstance(manager_page_limit, int) \
                    or manager_page_limit < MIN_MANAGER_PAGES:
                raise MachError("KERN_INVALID_ARGUMENT", f"manager_page_limit must be an int "
                                f">= {MIN_MANAGER_PAGES}")
            self.manager_page_limit = manager_page_limit

    def pager_port_died(self, port: Port) -> None:
        """Death hook of memory object ports (kernel lock held)."""
        pager_died(self, port)

    def pager_receiver_changed(self, port: Port) -> None:
        """Receiver hook of memory object ports (kernel lock held): the resident pages
        of the port's objects count for its new receiver from now on (the data
        manager's page limit, paper 6.1; vm_page.py's manager_pages)."""
        for obj in list(self.port_objects.get(port, {}).values()):
            self.resident.manager_resident(obj)

    def pager_object_set(self, port: Port, align: int, obj: VmObject) -> None:
        """`obj` is this kernel's object for memory object `port` at page alignment
        `align` (kernel lock held)."""
        self.pager_objects[(port, align)] = obj
        self.port_objects.setdefault(port, {})[align] = obj

    def pager_object_drop(self, port: Port, align: int) -> None:
        """Forget this kernel's object for `port` at `align` (kernel lock held)."""
        del self.pager_objects[(port, align)]
        objs = self.port_objects[port]
        del objs[align]
        if not objs:
            del self.port_objects[port]

    # -- hooks for external objects (section 9 cache; cleaning before termination) ----
    def cache_enter(self, obj: VmObject) -> None:
        """Keep an unreferenced object whose manager allows caching (pager_cache)."""
        object_cache_enter(self, obj)

    def clean_external_object(self, obj: VmObject) -> None:
        """Write an external object's dirty pages back to its manager before it goes."""
        object_clean(obj, 0, obj.size, flush=True, terminating=True)

    def in_place_expired(self, obj: VmObject) -> None:
        """The pageout deadline passed with write-backs of terminating `obj` still in
        place (the pageout daemon; kernel lock held)."""
        in_place_expired(obj)
