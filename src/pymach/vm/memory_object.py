"""The kernel side of the memory-object protocol (paper 3.4, Tables 3-5 and 3-6).

Kernel to data manager (Table 3-5): pager_init, pager_data_request, pager_data_write,
pager_data_unlock and, to the default pager, pager_create. They are asynchronous, as in
the paper: the kernel queues a message on the memory object port and never waits for
an acknowledgement (a faulting thread waits for its page, not for the message).

Data manager to kernel (Table 3-6): `PagerServer` executes the calls a manager makes on
the *pager request port* the kernel made for the object: pager_data_provided,
pager_data_unavailable, pager_data_lock, pager_flush_request, pager_clean_request,
pager_cache, and pager_data_error (pymach, after Mach 3). Offsets in messages are
offsets in the memory object; `paging_offset` maps them to the object. Provided data
nobody asked for is taken only while memory and the manager's `manager_page_limit`
allow; to keep within the limit the kernel evicts the manager's other pages, never the
ones waiting faults asked for (6.1: a manager that floods the cache). Provided data are
read where they lie (`copy_view`: the message's bytes, or, natively, a mapping of the
one object whose memory holds an out-of-line region) and written a run of adjacent
pages at a time (`phys_write_run`), the new pages made in one step.

The kernel holds send rights to the memory object port and all rights to the request
and name ports; when it lets go of an object it destroys the latter two, and the
manager is notified of their death (NOTIFY_PORT_DELETED). The name port only names
the object (vm_regions): requests sent to it are refused (footnote 3).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from pymach.errors import MachError, code_name
from pymach.include.mach_defs import memory_object_defs
from pymach.include.message import Disposition, Int
from pymach.include.vm_param import (
    PLACED_MAX,
    VM_PROT_ALL,
    VM_PROT_NONE,
    VM_PROT_READ,
    VM_PROT_WRITE,
    check_int,
    check_prot,
)
from pymach.ipc.ipc_mqueue import mqueue_enqueue
from pymach.ipc.ipc_right import port_destroy
from pymach.ipc.kmsg import KOOL, KMsg, KPort
from pymach.ipc.port import Port
from pymach.kern.thread import current_thread
from pymach.vm.vm_fault import Retry, _wait
from pymach.vm.vm_kern import copy_view
from pymach.vm.vm_map_copy import CopyEntry, VmMapCopy, vm_map_copy_discard
from pymach.vm.vm_object import (
    VmObject,
    holding_offset,
    runs_between,
    vm_object_allocate,
    vm_object_deallocate,
    vm_object_terminate,
    vm_object_terminate_finish,
)
from pymach.vm.vm_pageout import (
    is_substitute,
    vm_pageout_free_clean,
    vm_pageout_hold,
    vm_pageout_hold_in_place,
    vm_pageout_page,
    vm_pageout_plain,
    vm_pageout_possible,
    vm_pageout_reclaim,
    vm_pageout_released_in_place,
)

if TYPE_CHECKING:
    from pymach.kern.host import Kernel
    from pymach.kern.thread import Thread
    from pymach.vm.vm_init import VmSystem
    from pymach.vm.vm_map import FaultPolicy
    from pymach.vm.vm_page import VmPage

WRITE_RUN_PAGES = 256  # the most pages a flush writes back in one pager_data_write
EVICT_BATCH = WRITE_RUN_PAGES  # pages a manager over its limit loses per hold of the
# kernel lock (_enforce_manager_limit breaks the lock between batches: a 3 GiB machd's
# slack is 24,576 pages, well over 100 ms of eviction in one hold before)
MANAGER_SLACK = 1 / 16  # of manager_page_limit: how far below it an over-limit manager
# is brought (so the walk for its oldest pages is amortized over that many pages)


class ObjectName:
    """The kobject behind a pager name port: it names an object and grants nothing."""

    def __init__(self, obj: VmObject) -> None:
        self.object = obj


# -- sending to the manager (Table 3-5) ---------------------------------------------------

def _kernel_port(vm: VmSystem, label: str, kobject: object) -> Port:
    port = Port(vm.kernel, label)
    port.kobject = kobject
    port.receiver = port.owner = vm.kernel.kernel_task
    return port


def _send(obj: VmObject, dest: Port | None, routine: str, items: list[Any]) -> None:
    """Queue one kernel-to-manager message (never refused for backlog)."""
    vm = obj.vm
    if dest is None or dest.dead:
        return
    r = memory_object_defs.by_name[routine]
    mqueue_enqueue(dest, KMsg(dest, None, r.id, items, sender="kernel"))
    vm.resident.stats.pager_messages += 1
    if vm.kernel.tracing:
        manager = dest.receiver.name if dest.receiver is not None else "(in transit)"
        args = " ".join(f"{v:#x}" for v in (i.value for i in items if isinstance(i, Int)))
        vm.kernel.trace_event(f"kernel -> {manager}: {routine} obj{obj.serial} {args}")


def _trace_call(obj: VmObject, routine: str, *args: object) -> None:
    """Trace a manager's call on the request port (Table 3-6)."""
    kernel = obj.vm.kernel
    if kernel.tracing:
        who = current_thread().task.name
        kernel.trace_event(f"{who} -> kernel: {routine} obj{obj.serial} "
                           + " ".join(f"{a:#x}" if isinstance(a, int) else repr(a)
                                      for a in args))


def _send_right(port: Port | None) -> KPort:
    return KPort(port, Disposition.MOVE_SEND)


def pager_ports_create(obj: VmObject) -> None:
    """Make the kernel's request and name ports for an object's pager."""
    vm = obj.vm
    obj.pager_request = _kernel_port(vm, f"pager_request:obj{obj.serial}", obj)
    obj.pager_name = _kernel_port(vm, f"pager_name:obj{obj.serial}", ObjectName(obj))


def pager_create(obj: VmObject) -> bool:
    """Give an internal object a memory object port served by the default pager."""
    vm = obj.vm
    dp = vm.default_pager_port
    if dp is None or dp.dead:
        return False
    port = Port(vm.kernel, f"memory_object:obj{obj.serial}")
    port.receive_in_transit = port.ownership_in_transit = True  # moves to the default pager
    obj.pager = port
    vm.pager_object_set(port, 0, obj)
    pager_ports_create(obj)
    obj.pager_ready = True
    _send(obj, dp, "pager_create", [KPort(port, Disposition.MOVE_ALL),
                                    _send_right(obj.pager_request), _send_right(obj.pager_name)])
    return True


def pager_init(obj: VmObject) -> None:
    """Tell the manager of an external object about this kernel's ports for it."""
    pager_ports_create(obj)
    obj.pager_ready = True
    _send(obj, obj.pager, "pager_init", [_send_right(obj.pager_request),
                                         _send_right(obj.pager_name)])


def pager_data_request(obj: VmObject, offset: int, length: int, access: int) -> None:
    """Ask the manager for data of [offset, offset+length) of the object (noted, for
    an external object, until it is answered: window_asked)."""
    if not obj.internal:
        asked = obj.window_asked
        asked.pop(offset, None)
        asked[offset] = [offset + length, 0, obj.pages_gone]
        if len(asked) > WINDOW_ASKED_MAX:  # (faults waiting on it ask for themselves)
            del asked[next(iter(asked))]
            obj.vm.kernel.sched.thread_wakeup(obj.page_waitq)
    _send(obj, obj.pager, "pager_data_request",
          [_send_right(obj.pager_request), Int(offset + obj.paging_offset), Int(length),
           Int(access)])


def pager_data_write(obj: VmObject, offset: int, copy: VmMapCopy) -> None:
    """Write data back to the manager (the copy is the holding object's page)."""
    if obj.pager is None or obj.pager.dead:
        vm_map_copy_discard(copy)
        return
    _send(obj, obj.pager, "pager_data_write",
          [Int(offset + obj.paging_offset), KOOL(copy), Int(copy.size)])


def pager_data_unlock(obj: VmObject, offset: int, length: int, access: int) -> None:
    """Ask the manager for more access to cached data than its lock allows."""
    _send(obj, obj.pager, "pager_data_unlock",
          [_send_right(obj.pager_request), Int(offset + obj.paging_offset), Int(length),
           Int(access)])


def pager_terminate(obj: VmObject) -> None:
    """Let go of an object's pager: destroy the request and name ports."""
    vm = obj.vm
    align = obj.paging_offset % vm.page_size
    if obj.pager is not None and vm.pager_objects.get((obj.pager, align)) is obj:
        vm.pager_object_drop(obj.pager, align)
    for port in (obj.pager_request, obj.pager_name):
        if port is not None and not port.dead:
            port_destroy(port)
    obj.pager = obj.pager_request = obj.pager_name = None


def pager_rebind(old: VmObject, new: VmObject) -> None:
    """Move a pager from one object to another (shadow-chain collapse)."""
    vm = old.vm
    new.pager, new.pager_request, new.pager_name = old.pager, old.pager_request, old.pager_name
    new.pager_ready = old.pager_ready
    if new.pager_request is not None:
        new.pager_request.kobject = new
    if new.pager_name is not None:
        new.pager_name.kobject = ObjectName(new)
    if new.pager is not None:
        vm.pager_object_set(new.pager, new.paging_offset % vm.page_size, new)
    old.pager = old.pager_request = old.pager_name = None


def vm_object_enter(vm: VmSystem, port: object, offset: int, size: int
                    ) -> tuple[VmObject, int]:
    """The kernel's object for [offset, offset+size) of a memory object, with a new
    reference, and the object offset of `offset`.

    The first use by this kernel makes the object and sends pager_init before returning
    (5.1). Mappings whose offsets differ in page alignment get separate objects: the
    kernel guarantees consistency only among mappings with similar alignment (3.4.1).
    """
    if not isinstance(port, Port) or port.dead:
        raise MachError("KERN_INVALID_ARGUMENT", "memory_object is not a live port")
    if port.is_kernel_port:
        raise MachError("KERN_INVALID_ARGUMENT", f"{port.label} is a kernel port, not a "
                        f"memory object")
    align = offset % vm.page_size
    obj = vm.pager_objects.get((port, align))
    if obj is None or not obj.alive:
        obj = VmObject(vm, 0, internal=False, label="external")
        vm.objects_alive += 1
        obj.pager, obj.paging_offset = port, align
        vm.pager_object_set(port, align, obj)
        if not any(getattr(h, "__self__", None) is vm for h in port.death_hooks):
            port.death_hooks.append(vm.pager_port_died)
            port.receiver_hooks.append(vm.pager_receiver_changed)
        pager_init(obj)
    elif obj in vm.cached:
        object_cache_remove(obj, terminate=False)
        obj.ref_count = 1
    else:
        obj.ref_count += 1
    obj.size = max(obj.size, offset - align + size)
    return obj, offset - align


# -- faults that need the manager --------------------------------------------------------

def request_unlock(thread: Thread, page: VmPage, access: int, policy: FaultPolicy) -> None:
    """A fault needs access the manager's lock prevents: ask (once) and wait (Retry).
    If the manager does not unlock within the policy's timeout: KERN_MEMORY_ERROR."""
    obj = page.object
    assert obj is not None
    if obj.pager is None or obj.pager.dead:
        raise MachError("KERN_MEMORY_ERROR", f"the data manager of object {obj.serial} is "
                        f"gone and the page is locked")
    check_not_self_backed(thread, obj)
    wanted = access & page.page_lock
    if wanted & ~page.unlock_request:
        page.unlock_request |= wanted
        pager_data_unlock(obj, page.offset, obj.vm.page_size, wanted)
    if not _wait(thread, obj.vm, obj.page_waitq, obj, policy.timeout_ms, raise_retry=False):
        page.unlock_request &= ~wanted  # ask again next time
        raise MachError("KERN_MEMORY_ERROR", f"the data manager of object {obj.serial} did "
                        f"not unlock within {policy.timeout_ms} ms")
    raise Retry


def check_not_self_backed(thread: Thread, obj: VmObject) -> None:
    """Refuse a wait that only the waiting task could end (paper 6.1: a data manager
    backing its own data). Other threads of the manager may serve it; if every other
    thread already waits on the manager's own objects, all of them fail."""
    task = thread.task
    if obj.pager is None or obj.pager.receiver is not task:
        return
    others = [t for t in task.threads if t is not thread and not t.done]
    if any(t.vm_waiting is None or not _backed_by(t.vm_waiting, task) for t in others):
        return
    reason = (f"deadlock: task {task.name!r} faulted on memory object {obj.serial} that it "
              f"manages itself, and no other thread of it is free to serve the request")
    for t in others:
        t.vm_wait_error = reason
        thread.kernel.sched.thread_interrupt(t)
    raise MachError("KERN_MEMORY_ERROR", reason)


def _backed_by(obj: object, task: object) -> bool:
    return (isinstance(obj, VmObject) and obj.pager is not None
            and obj.pager.receiver is task)


def page_settled(obj: VmObject, page: VmPage, wake: bool = True) -> None:
    """A waiting page is settled (data, zeros or error): wake its waiters (unless
    `wake` is False: the caller settles a run and wakes them once, with
    thread_wakeup(obj.page_waitq)). The page is fresh until pageout has passed over it
    once, so the fault gets to use it."""
    vm = obj.vm
    page.busy = page.absent = False
    page.fresh = True
    if page.wire_count:
        vm.resident.vm_page_unwire(page)
    if wake:
        vm.kernel.sched.thread_wakeup(obj.page_waitq)


def pager_died(vm: VmSystem, port: Port) -> None:
    """A memory object port died (its manager is gone): fail what waits on it (6.2.1).
    The objects stay mapped; their resident pages stay readable, and a fault that needs
    the manager fails with KERN_MEMORY_ERROR."""
    for obj in [o for o in vm.in_place_waiting if o.pager is port]:  # terminating (even
        in_place_expired(obj)  # one a new mapping replaced): no release will come
    for obj in list(vm.port_objects.get(port, {}).values()):
        if obj in vm.cached:  # nobody maps it, and nobody can refill it
            object_cache_remove(obj, terminate=True)
            continue
        reason = f"the data manager of object {obj.serial} died"
        for page in list(obj._memq.values()):  # (absent pages: never in an extent)
            if page.absent:
                page.error = reason
                page_settled(obj, page)
        vm.kernel.sched.thread_wakeup(obj.page_waitq)
        vm.kernel.trace_event(f"pager died obj{obj.serial}")


# -- cleaning and caching -----------------------------------------------------------------

DROP, KEEP, DEACTIVATE = 0, 1, 2  # what becomes of a write-back run's pages once
# released, when they went back in place ("write-backs in place" below)


def _write_back(page: VmPage, flush: bool, privileged: bool) -> bool:
    """Send a dirty page's data to its manager: a copy of it for a clean (the page
    stays), or the page itself for a flush. A clean with no free frame for the copy
    sends the page itself (it leaves memory, and the next access asks for it again)
    rather than leaving the change unwritten."""
    if vm_pageout_page(page, keep=not flush, privileged=privileged):
        return True
    if flush or page.object is None or page.busy:
        return False
    page.object.vm.phys.pmap_page_protect(page.frame, VM_PROT_NONE)
    return vm_pageout_page(page, keep=False, privileged=privileged)


def object_clean(obj: VmObject, start: int, end: int, flush: bool,
                 privileged: bool = True, terminating: bool = False) -> int:
    """Write dirty pages of [start, end) back to the manager; with `flush` also drop
    the cached pages (pager_flush_request, termination). Returns the pages written.
    `terminating` (with `flush`): the object is being terminated, so nothing maps its
    pages (no mapping to take away, no modify bit that can change) and the caller frees
    every page left at once: only the dirty pages are looked at one by one. A flush of
    an external object sends its adjacent dirty pages a run per message (_WriteRun)."""
    vm = obj.vm
    in_place = not obj.internal and _takes_in_place(obj)
    run = _WriteRun(obj, privileged, in_place, DROP if flush else KEEP) \
        if in_place or (flush and not obj.internal) else None
    written = 0
    memq = obj._memq if terminating else obj.memq  # (an extent's pages are clean: the
    for off in sorted(o for o in memq if start <= o < end):  # caller frees them)
        page = memq[off]
        if page.busy:
            if flush and obj.in_place:  # (a run in place stays only until released)
                _drop_when_released(obj, off)
            continue
        if terminating and not (page.dirty or page.precious
                                or vm.phys.pmap_is_modified(page.frame)):
            continue  # clean: freed with the rest by the caller
        if not terminating:  # (a page taken from every task whose data go back in
            vm.phys.pmap_page_protect(  # place is put back in the window first)
                page.frame, VM_PROT_NONE if flush else ~VM_PROT_WRITE & 7)
        if flush and obj.copy is not None:
            push_to_copy_object(obj, page)
        dirty = (vm.resident.vm_page_is_dirty(page) or page.precious) \
            and not is_substitute(page)  # never the manager's: a flush drops it
        if dirty and run is not None:
            written += run.add(page)
        elif dirty:
            written += _write_back(page, flush, privileged)
            # written, or kept because it cannot go back now: never lost
        elif flush:  # (freeing takes it from every task, write-protected or not)
            vm.resident.vm_page_free(page)
    if run is not None:
        written += run.send()
        if terminating and obj.in_place:  # the rest need not wait for the releases
            _free_outside_in_place(obj)
    if flush and not obj.internal:  # pageouts on their way, this flush's included, are
        for off in [o for o in obj.pending if start <= o < end]:  # the manager's now: a
            obj.pending[off].refill = False  # later fault asks it (pager_data_error
            # for that data still gives it back to the kernel)
            if obj.pending[off].substitute:  # so is the offset of a substitute page
                _drop_store(obj, off)
    if flush:  # faults waiting on these pages (say, for an unlock) must look again
        vm.kernel.sched.thread_wakeup(obj.page_waitq)
    return written


class _WriteRun:
    """Dirty pages of an object leaving memory (a flush or an eviction of an external
    object, the pageout daemon's victims of any object), sent to its manager a run of
    adjacent pages (up to WRITE_RUN_PAGES) per pager_data_write (_pageout_run), not a
    message per page. A run its manager cannot take now goes page by page
    (_write_back), as before. With `in_place` (the caller only write-protected the
    pages) a run goes in place if it can (_write_in_place), and `after` says what
    becomes of its pages once released (DROP, KEEP or DEACTIVATE)."""

    def __init__(self, obj: VmObject, privileged: bool, in_place: bool = False,
                 after: int = DROP) -> None:
        self.obj, self.privileged, self.in_place, self.after = obj, privileged, in_place, after
        self.pages: list[VmPage] = []

    def add(self, page: VmPage) -> int:
        """Add the next dirty page (offsets ascending); returns the pages written now
        (the run so far, if `page` does not continue it)."""
        pages, ps = self.pages, self.obj.vm.page_size
        written = 0
        if pages and (page.offset != pages[-1].offset + ps or len(pages) >= WRITE_RUN_PAGES):
            written = self.send()
        self.pages.append(page)  # (a new list if the run was sent)
        return written

    def send(self) -> int:
        """Write the run back; returns the pages written."""
        pages, self.pages = self.pages, []
        if not pages:
            return 0
        if self.in_place:
            if _write_in_place(pages, self.after):
                return len(pages)
            if self.after == KEEP:  # as a clean does without windows: a copy of each
                return sum(_write_back(page, False, self.privileged) for page in pages)
            if self.obj.alive:  # they leave memory the old way
                _take_from_tasks(pages)
        if len(pages) > 1 and _pageout_run(pages):
            return len(pages)
        return sum(_write_back(page, True, self.privileged) for page in pages)


def _pageout_run(pages: list[VmPage]) -> bool:
    """vm_pageout_page(keep=False) of a run of pages at adjacent offsets of one object,
    none a substitute, in one pager_data_write: the pages move into one holding object,
    which stands for each of their offsets in the object's `pending` until the manager
    lets go of it (all of it: vm_object.py's _holding_released). An internal object gets
    the default pager first, as for one page. False (nothing done) if the object's
    manager cannot take data now."""
    obj = pages[0].object
    assert obj is not None
    if obj.internal and obj.pager is None and not pager_create(obj):
        return False
    if not vm_pageout_possible(obj):
        return False
    vm, ps, first = obj.vm, obj.vm.page_size, pages[0].offset
    size = len(pages) * ps
    holding = vm_object_allocate(vm, size, label="pageout")
    vm.resident.vm_pages_rename(pages, holding, [i * ps for i in range(len(pages))])
    for page in pages:
        vm.resident.vm_page_wire(page)
        page.dirty = False
    vm_pageout_hold(vm, holding, obj, first)
    pager_data_write(obj, first, VmMapCopy(vm, [CopyEntry(holding, 0, size, False)], 0, size))
    vm.resident.stats.pageouts += len(pages)
    return True


# -- write-backs in place (native mode) ---------------------------------------------------
# For a manager that has the object's window and asked for write-backs there
# (writes_in_place), a run of dirty pages going back (a flush, a clean, a pageout, the
# object's termination) stays where it is, in the object's memory:
# pager_data_write_in_place names the range, the manager reads it from its window and
# releases it (pager_data_write_released), and only then are those pages freed (a
# flush, a termination) or made clean pages (a clean; a pageout's go to the inactive
# queue: until the next scan frees them, a fault finds them there rather than asking
# the manager, which may not have stored them yet, just as a holding object serves
# such faults), and, after the last run of a terminating object, the termination
# finished (vm_object_terminate_finish). Until then the pages are busy and wired (a
# fault on one waits, as on any page in transit); tasks keep them at most read-only
# (none, for a flush: its pages are taken from every task and their data put back in
# the window, object_pages_home, before the manager is told; a flush or a lock that
# meets a page already held takes effect at the release, as on a busy page in Mach);
# a terminating object keeps its memory and request port.
# Nothing is copied in machd, and no holding object is made. By the pageout deadline
# (vm_pageout.py, shared by all of an object's runs) a manager that has released none
# of them is errant: its runs are taken back and go the way of any write-back (a
# holding object in pager_data_write, then the default pager; a clean's pages stay
# dirty), and a late release learns it (`in_time` False).

def _takes_in_place(obj: VmObject) -> bool:
    """True if the dirty pages of external object `obj` may go back in place."""
    return (obj.writes_in_place and obj.windowed and obj.vm.phys.object_windows
            and obj.pager_request is not None and vm_pageout_possible(obj))


def _write_in_place(pages: list[VmPage], after: int = DROP) -> bool:
    """pager_data_write_in_place of a run of adjacent dirty pages of one object (see
    above): they stay, busy and wired, until released (and then as `after` says, if
    the object is alive). False if the manager cannot take data now, or if the
    machine cannot put a page's data in the window (nothing done)."""
    obj = pages[0].object
    assert obj is not None
    vm = obj.vm
    if not vm_pageout_possible(obj) or \
            not vm.phys.object_pages_home([page.frame for page in pages]):
        return False  # (the data of a page taken from every task must be in the window)
    first, end = pages[0].offset, pages[-1].offset + vm.page_size
    for page in pages:
        vm.resident.vm_page_wire(page)
        page.busy, page.dirty = True, False
    obj.in_place[first] = (end, after)
    obj.in_place_pages += len(pages)
    vm_pageout_hold_in_place(vm, obj)
    vm.resident.stats.pageouts += len(pages)
    _send(obj, obj.pager, "pager_data_write_in_place",
          [_send_right(obj.pager_request), Int(obj.serial), Int(first + obj.paging_offset),
           Int(end - first)])
    return True


def _free_in_place(obj: VmObject, start: int, end: int) -> list[VmPage]:
    """Forget run [start, end) written back in place; its pages, neither busy nor
    wired (the caller wakes the faults waiting on them)."""
    del obj.in_place[start]
    vm, memq = obj.vm, obj._memq  # (pages held in place: never in an extent)
    pages = [memq[o] for o in range(start, end, vm.page_size) if o in memq]
    obj.in_place_pages -= len(pages)
    for page in pages:
        page.busy = False
        vm.resident.vm_page_unwire(page)
    vm_pageout_released_in_place(vm, obj)
    return pages


def _settle_released(obj: VmObject, run: tuple[int, int], pages: list[VmPage],
                     after: int) -> None:
    """The pages of run [start, end) released in place: freed, or (a live object's
    clean or pageout) kept as clean pages, with any lock set meanwhile now applied."""
    vm = obj.vm
    if after == DROP or not obj.alive:
        vm.resident.vm_pages_free(obj, pages, [run])
        return
    for page in pages:
        if page.page_lock:
            vm.phys.pmap_page_protect(page.frame, VM_PROT_ALL & ~page.page_lock)
        if after == DEACTIVATE:
            vm.resident.vm_page_deactivate(page)


def _held_run(obj: VmObject, off: int) -> int | None:
    """The start of the run in place of `obj` that holds offset `off`, if any."""
    for start, (end, _) in obj.in_place.items():
        if start <= off < end:
            return start
    return None


def _drop_when_released(obj: VmObject, off: int) -> None:
    """A flush met a page of a run in place: the run's pages go once released,
    whatever the run was sent for (a clean's, a pageout's). Until then tasks keep
    them read-only: taking one from every task would punch its data out of the window
    while the manager may be reading it there."""
    start = _held_run(obj, off)
    if start is not None:
        obj.in_place[start] = (obj.in_place[start][0], DROP)


def _take_from_tasks(pages: list[VmPage]) -> None:
    """Take write-protected pages from every task (pmap_page_protect to NONE), as a
    page leaving memory the old way must be."""
    phys = pages[0].object.vm.phys  # type: ignore[union-attr]
    for page in pages:
        phys.pmap_page_protect(page.frame, VM_PROT_NONE)


def in_place_expired(obj: VmObject) -> None:
    """The deadline passed with runs of `obj` still in place: each goes back as any
    write-back does (its pages into a holding object sent in pager_data_write; kept if
    the manager is gone), a clean's pages stay dirty, and a terminating object's
    termination finishes."""
    vm = obj.vm
    for start, (end, after) in sorted(obj.in_place.items()):
        pages = _free_in_place(obj, start, end)
        vm.kernel.trace_event(f"write-back in place expired: obj{obj.serial} "
                              f"{start:#x}+{end - start:#x}")
        if after == KEEP and obj.alive:
            for page in pages:
                page.dirty = True
            _settle_released(obj, (start, end), pages, KEEP)  # (its lock, if one came)
            continue
        if obj.alive:
            _take_from_tasks(pages)
        if len(pages) > 1 and _pageout_run(pages):
            continue
        for page in pages:
            _write_back(page, True, True)
    vm.kernel.sched.thread_wakeup(obj.page_waitq)
    if not obj.alive:
        vm_object_terminate_finish(obj)


def _free_outside_in_place(obj: VmObject) -> None:
    """Free the pages of terminating `obj` that no run in place holds (now, not when
    the last run is released)."""
    vm, ps = obj.vm, obj.vm.page_size
    held = sorted(o for start, (end, _) in obj.in_place.items()
                  for o in range(start, end, ps))
    kept = set(held)
    pages = [page for off, page in obj.memq.items() if off not in kept]
    end = max(obj.size, max(obj.memq) + ps) if obj.memq else obj.size
    vm.resident.vm_pages_free(obj, pages, runs_between(0, end, held, ps))


def _drop_store(obj: VmObject, off: int) -> None:
    """Discard the store of a substitute page (vm_pageout_substitute) of `obj`."""
    vm_object_deallocate(obj.pending.pop(off))


def push_to_copy_object(obj: VmObject, page: VmPage) -> None:
    """A copy object must keep the contents it had: give it the page before it goes
    (flush, eviction), unless it has its own version already."""
    copy = obj.copy
    assert copy is not None
    vm = obj.vm
    off = page.offset
    if off in copy.memq or off in copy.existence or off in copy.pending:
        return
    pushed = vm.resident.vm_page_grab(privileged=True)
    if pushed is None:
        return
    vm.resident.vm_page_insert(pushed, copy, off)
    vm.phys.pmap_copy_page(page.frame, pushed.frame)
    pushed.dirty = True
    vm.resident.vm_page_activate(pushed)


def object_cache_enter(vm: VmSystem, obj: VmObject) -> None:
    """Keep an object with no references because its manager allows caching (sec. 9);
    the oldest cached objects go once there are more than `cache_limit`."""
    vm.cached[obj] = None
    vm.kernel.trace_event(f"cache obj{obj.serial} kept after its last unmap")
    while len(vm.cached) > vm.cache_limit:
        object_cache_remove(next(iter(vm.cached)), terminate=True)


def object_cache_remove(obj: VmObject, terminate: bool) -> None:
    """Take an object out of the cache: to be mapped again, or to be terminated."""
    obj.vm.cached.pop(obj, None)
    if terminate:
        vm_object_terminate(obj)


# -- Table 3-6: the manager's calls on the request port ---------------------------------

def _range(obj: VmObject, offset: object, length: object) -> range:
    """Object offsets of the whole pages in a manager's [offset, offset+length)."""
    ps = obj.vm.page_size
    off = check_int(offset, "offset") - obj.paging_offset
    n = check_int(length, "length")
    first = -(-off // ps) * ps  # partial pages are discarded
    return range(max(first, 0), min(off + n, obj.size) // ps * ps, ps)


class PagerServer:
    """Executes Table 3-6 calls (kernel lock held); the target is the VmObject."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel

    def pager_data_provided(self, obj: VmObject, offset: int, data: VmMapCopy,
                            data_count: int, lock_value: int) -> None:
        _trace_call(obj, "pager_data_provided", offset, data_count, lock_value)
        lock = check_prot(lock_value, "lock_value")
        count = check_int(data_count, "data_count")
        start = check_int(offset, "offset")
        _check_live(obj)
        with copy_view(current_thread(), data) as raw:  # no copy: see copy_view
            raw = raw[:count]
            with _answering(obj, start, len(raw)):
                settled = _provide(obj, start, len(raw), lock, raw)
        if settled and not obj.internal:  # never evict what the faults wait for
            _enforce_manager_limit(obj, keep=settled)

    def pager_data_provided_in_place(self, obj: VmObject, window: int, offset: int,
                                     data_count: int, lock_value: int) -> None:
        """pager_data_provided of data the manager wrote into the object's window
        (`object_window`, whose key is `window`) itself: the kernel takes the pages as
        pager_data_provided would, copying nothing (a page it left unwritten is zeros),
        and punches out what it wrote where the kernel takes no page. Without that
        window, the faults waiting on the range fail (pager_data_error) rather than
        wait, and the call fails."""
        _trace_call(obj, "pager_data_provided_in_place", offset, data_count, lock_value)
        lock = check_prot(lock_value, "lock_value")
        start = check_int(offset, "offset")
        count = check_int(data_count, "data_count")
        _check_live(obj)
        if count > PLACED_MAX:
            raise MachError("KERN_INVALID_ARGUMENT", f"{count:#x} bytes placed at once "
                            f"(at most {PLACED_MAX:#x}, as much as a message carries)")
        if not obj.windowed or check_int(window, "window") != obj.serial:
            self.pager_data_error(obj, start, count,
                                  MachError("KERN_INVALID_ARGUMENT").value)
            raise MachError("KERN_INVALID_ARGUMENT", f"data placed in window {window}, "
                            f"which is not object {obj.serial}'s")
        if (start - obj.paging_offset) not in obj.window_asked:  # not an answer
            _ask_again(obj, start, count)
            _drop_unplaced(obj, start, count)
            return
        settled: set[VmPage] = set()
        with _answering(obj, start, count) as answered:
            try:
                for i, (lo, hi, stale) in enumerate(answered):
                    if stale:  # its window data may be punched: ask again
                        _ask_again(obj, lo, hi - lo)
                        continue
                    try:
                        settled |= _provide(obj, lo, hi - lo, lock, None)
                    except BaseException:  # the requests after it are asked again
                        for lo2, hi2, _ in answered[i + 1:]:
                            _ask_again(obj, lo2, hi2 - lo2)
                        raise
            finally:
                _drop_unplaced(obj, start, count)
        if settled and not obj.internal:  # never evict what the faults wait for
            _enforce_manager_limit(obj, keep=settled)

    def pager_data_write_released(self, obj: VmObject, window: int, offset: int,
                                  data_count: int) -> bool:
        """The manager has read a run written back in place (pager_data_write_in_place):
        its pages are freed, and the object's termination finished if it was the last.
        False if the kernel no longer holds that run (taken back at the deadline: the
        manager gets the data again in pager_data_write). KERN_INVALID_ARGUMENT for a
        window that is not the object's."""
        _trace_call(obj, "pager_data_write_released", offset, data_count)
        start = check_int(offset, "offset") - obj.paging_offset
        count = check_int(data_count, "data_count")
        if check_int(window, "window") != obj.serial:
            raise MachError("KERN_INVALID_ARGUMENT", f"window {window} is not object "
                            f"{obj.serial}'s")
        held = obj.in_place.get(start)
        if held is None or held[0] != start + count:
            return False
        run = (start, start + count)
        _settle_released(obj, run, _free_in_place(obj, *run), held[1])
        obj.vm.kernel.sched.thread_wakeup(obj.page_waitq)
        if not obj.in_place and not obj.alive:
            vm_object_terminate_finish(obj)
        return True

    def pager_data_unavailable(self, obj: VmObject, offset: int, size: int) -> None:
        _trace_call(obj, "pager_data_unavailable", offset, size)
        _check_live(obj)
        vm = obj.vm
        with _answering(obj, check_int(offset, "offset"), check_int(size, "size")):
            for off in _range(obj, offset, size):
                page = obj._memq.get(off)  # (absent pages: never in an extent)
                if page is None or not page.absent:
                    continue
                if obj.internal:  # the pager has nothing: look below (footnote 6) or
                    obj.existence.discard(off)  # zero-fill
                    vm.resident.vm_page_free(page)
                    vm.kernel.sched.thread_wakeup(obj.page_waitq)
                else:
                    vm.phys.pmap_zero_page(page.frame)
                    vm.resident.stats.zero_fill_count += 1
                    page_settled(obj, page)

    def pager_data_error(self, obj: VmObject, offset: int, size: int,
                         error_value: int) -> None:
        _trace_call(obj, "pager_data_error", offset, size)
        _check_live(obj)
        code = code_name(check_int(error_value, "error_value", -(2**63)))
        reason = f"the data manager reported {code}"
        with _answering(obj, check_int(offset, "offset"), check_int(size, "size")):
            for off in _range(obj, offset, size):
                page = obj._memq.get(off)  # (absent pages: never in an extent)
                if page is not None and page.absent:
                    page.error = reason
                    page_settled(obj, page)
                elif off in obj.pending and not obj.pending[off].substitute:
                    _take_back(obj, off)  # (a substitute page was never the manager's)

    def pager_data_lock(self, obj: VmObject, offset: int, length: int,
                        lock_value: int) -> None:
        _trace_call(obj, "pager_data_lock", offset, length, lock_value)
        lock = check_prot(lock_value, "lock_value")
        _check_live(obj)
        memq = obj.memq  # (its extents made pages: the lock holds for them too)
        for off in _range(obj, offset, length):
            page = memq.get(off)
            if page is not None and not page.absent:
                _set_lock(obj, page, lock)
        obj.vm.kernel.sched.thread_wakeup(obj.page_waitq)

    def pager_flush_request(self, obj: VmObject, offset: int, length: int) -> int:
        _trace_call(obj, "pager_flush_request", offset, length)
        _check_live(obj)
        r = _range(obj, offset, length)
        return object_clean(obj, r.start, r.stop, flush=True,
                            privileged=current_thread().vm_privileged)

    def pager_clean_request(self, obj: VmObject, offset: int, length: int) -> int:
        _trace_call(obj, "pager_clean_request", offset, length)
        _check_live(obj)
        r = _range(obj, offset, length)
        return object_clean(obj, r.start, r.stop, flush=False,
                            privileged=current_thread().vm_privileged)

    def pager_cache(self, obj: VmObject, should_cache: bool) -> None:
        _trace_call(obj, "pager_cache", int(bool(should_cache)))
        _check_live(obj)
        obj.can_persist = bool(should_cache)
        if not should_cache and obj in obj.vm.cached:
            object_cache_remove(obj, terminate=True)


WINDOW_ASKED_MAX = 4096  # outstanding requests of one object noted at most (each has a
# page waiting for it, so this bounds only a manager that never answers; the oldest go)


def _check_live(obj: VmObject) -> None:
    if not obj.alive:
        raise MachError("KERN_INVALID_ARGUMENT", f"object {obj.serial} has been terminated")


def _provide(obj: VmObject, offset: int, count: int, lock: int,
             raw: memoryview | None) -> set[VmPage]:
    """Put the whole pages of data provided for [offset, offset+count) of the memory
    object into `obj`: the pages faults wait for, and pages nobody asked for while the
    manager's room and free memory allow (never over a page the kernel has or is paging
    out). The new pages of an external object provided unlocked become extents, a run
    at a time (vm_page.py, "Extents"); the others are made in one step
    (vm_page_grab_run). Each run of adjacent pages is written with one backend call
    (phys_write_run of `raw`, the data), or, `raw` None, taken as the manager wrote it
    in place (phys_placed_run). Returns the waited-for pages it settled (woken once)."""
    vm = obj.vm
    new, absent = _new_and_absent(obj, offset, count)
    del new[max(min(_manager_room(obj), vm.read_ahead_room()), 0):]  # (an absent page's
    # count may pass it: _in_offset_order)
    waited = [page for _, page in absent]
    if new and lock == VM_PROT_NONE and not obj.internal:
        made, extents = [], _grab_extents(obj, new)
        fills = waited
        runs = _merged_runs([(p.offset, [p.frame]) for p in waited] + extents, vm.page_size)
    else:
        made, extents = vm.resident.vm_page_grab_run(obj, new, privileged=False) \
            if new else [], []
        fills = _in_offset_order(made, absent)
        runs = [(fills[lo].offset, [p.frame for p in fills[lo:hi]])
                for lo, hi in _page_runs(fills, vm.page_size)]
    try:
        _fill_runs(obj, runs, raw, offset - obj.paging_offset)
    except (MachError, OSError, ValueError) as e:  # (no memory; a memfd made smaller)
        _unfill(obj, made, extents, waited, str(e))
        raise
    vm.resident.stats.pageins += sum(len(frames) for _, frames in extents)
    _settle(obj, fills, lock)
    return set(waited)


def _new_and_absent(obj: VmObject, offset: int, count: int
                    ) -> tuple[list[int], list[tuple[int, VmPage]]]:
    """The offsets of [offset, offset+count) of the memory object where `obj` may take
    new pages (no page, no extent, no pageout, no other request's answer to come), and
    its absent pages there, each with how many new offsets come before it."""
    memq, pending = obj._memq, obj.pending
    new: list[int] = []  # offsets to fill anew, in order
    absent: list[tuple[int, VmPage]] = []
    asked = obj.window_asked  # (pages another outstanding answer is to make)
    clear = not pending and not asked  # (then every hole is new)
    for off in _outside_extents(obj, _range(obj, offset, count)):
        page = memq.get(off)
        if page is None:
            if clear or (off not in pending and not (asked and obj.asked_over(off))):
                new.append(off)
        elif page.absent:
            absent.append((len(new), page))
    return new, absent


def _outside_extents(obj: VmObject, offsets: range) -> Iterable[int]:
    """The offsets of `offsets` (a range of object offsets, a page apart) that none of
    `obj`'s extents holds: the range itself if it has none."""
    if not obj.extents:
        return offsets
    ps, end = obj.vm.page_size, offsets.stop
    spans = obj.vm.resident.extents_in(obj, offsets.start, end)
    if not spans:
        return offsets
    out: list[int] = []
    at = offsets.start
    for lo, hi in [*spans, (end, end)]:
        out.extend(range(at, max(at, min(lo, end)), ps))
        at = max(at, hi)
    return out


def _grab_extents(obj: VmObject, offsets: list[int]) -> list[tuple[int, list[int]]]:
    """An extent of `obj` for each run of adjacent `offsets` (in order), as far as
    frames allow: (start, frames) of each."""
    res, ps = obj.vm.resident, obj.vm.page_size
    out: list[tuple[int, list[int]]] = []
    for start, n in _offset_runs(offsets, ps):
        frames = res.extent_grab(obj, start, n, privileged=False)
        if frames:
            out.append((start, frames))
        if len(frames) < n:
            break
    return out


def _offset_runs(offsets: list[int], ps: int) -> list[tuple[int, int]]:
    """(start, pages) of each run of adjacent offsets of the sorted `offsets`."""
    if offsets and offsets[-1] - offsets[0] == (len(offsets) - 1) * ps:
        return [(offsets[0], len(offsets))]  # (one run: the usual case, without a loop)
    runs: list[tuple[int, int]] = []
    for off in offsets:
        if runs and runs[-1][0] + runs[-1][1] * ps == off:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((off, 1))
    return runs


def _merged_runs(runs: list[tuple[int, list[int]]], ps: int) -> list[tuple[int, list[int]]]:
    """`runs` of (start offset, frames) in offset order, adjacent ones made one."""
    out: list[tuple[int, list[int]]] = []
    for start, frames in sorted(runs, key=lambda run: run[0]):
        if out and out[-1][0] + len(out[-1][1]) * ps == start:
            out[-1] = (out[-1][0], out[-1][1] + frames)
        else:
            out.append((start, list(frames)))
    return out


def _fill_runs(obj: VmObject, runs: list[tuple[int, list[int]]], raw: memoryview | None,
               base: int) -> None:
    """Write each run (start offset, frames) of provided data with one backend call:
    its slice of `raw` (which begins at object offset `base`), or, `raw` None, what
    the manager wrote in place."""
    phys, ps = obj.vm.phys, obj.vm.page_size
    for start, frames in runs:
        if raw is None:
            phys.phys_placed_run(frames)
        else:
            first = start - base
            phys.phys_write_run(frames, raw[first:first + len(frames) * ps])


def _unfill(obj: VmObject, made: list[VmPage], extents: list[tuple[int, list[int]]],
            absent: list[VmPage], reason: str) -> None:
    """The provided data could not be stored: the new pages and extents go, and the
    faults that wait on the absent ones fail (as after pager_data_error) instead of
    waiting on."""
    res = obj.vm.resident
    for page in made:
        res.vm_page_free(page)
    for start, frames in extents:
        res.extents_free(obj, start, start + len(frames) * obj.vm.page_size)
    for page in absent:
        page.error = f"the data could not be stored: {reason}"
        page_settled(obj, page)


def _drop_unplaced(obj: VmObject, offset: int, count: int) -> None:
    """Punch out of the object's window what its manager wrote in [offset,
    offset+count) where the object has no page, none is being paged out and no
    outstanding request may write (no room for it, say): the window holds data only
    where the kernel has a page or awaits an answer."""
    ps, memq, pending = obj.vm.page_size, obj._memq, obj.pending
    runs: list[tuple[int, int]] = []
    for off in _outside_extents(obj, _range(obj, offset, count)):
        if off in memq or off in pending or obj.asked_over(off):  # (another request's)
            continue
        if runs and runs[-1][1] == off:
            runs[-1] = (runs[-1][0], off + ps)
        else:
            runs.append((off, off + ps))
    if runs:
        obj.vm.phys.frames_discard(obj, runs, [])


def _answered(obj: VmObject, offset: int, count: int) -> list[tuple[int, int, bool]]:
    """An answer for [offset, offset+count) of the memory object came: the requests it
    answers (those that begin in it) are forgotten, and faults that waited for them
    (vm_fault: asked_over) try again. Returns, in memory-object offsets, the part of
    each such request the answer covers, and whether the request is stale (a page of
    its range left the object since it was made)."""
    if not obj.window_asked:
        return []
    base = obj.paging_offset
    start, end = offset - base, offset - base + count
    gone = obj.answered(start, end)
    return [(lo + base, min(asked[0], end) + base, bool(asked[1])) for lo, asked in gone]


@contextlib.contextmanager
def _answering(obj: VmObject, offset: int,
               count: int) -> Iterator[list[tuple[int, int, bool]]]:
    """`_answered` for the body of an answer: the faults that waited for the requests it
    answers are woken once, when the body has settled the answer's pages (woken before,
    each would run its fault again only to find the page still absent and park again:
    a third of machd's vm_fault calls per one-page pager fault)."""
    answered = _answered(obj, offset, count)
    try:
        yield answered
    finally:
        if answered:
            obj.vm.kernel.sched.thread_wakeup(obj.page_waitq)


def _ask_again(obj: VmObject, offset: int, count: int) -> None:
    """An answer in place that the kernel cannot take (it answers no request it knows
    of, or a page of its range left the object after the request, so the window may
    have lost its data there): ask the manager again for each page of the range that
    faults wait for (a request each, so that each has its own record: an answer that
    covers only part of a run would leave the rest asked by nobody)."""
    ps = obj.vm.page_size
    for off in _range(obj, offset, count):
        page = obj._memq.get(off)  # (absent pages: never in an extent)
        if page is not None and page.absent:
            pager_data_request(obj, off, ps, VM_PROT_READ)


def object_window(obj: VmObject) -> int | None:
    """A descriptor of the window through which the manager of external object `obj`
    may write the data it provides (pager_data_provided_in_place): the memory that
    holds the object's pages at their offsets (the caller owns the descriptor). None
    where the machine keeps no such memory (simulated frames; an object no task maps)
    and for the kernel's own objects. Kernel lock held."""
    _check_live(obj)
    if obj.internal:
        return None
    fd = obj.vm.phys.object_window(obj)
    if fd is not None and not obj.windowed:  # requests made before: stale if a page
        for asked in obj.window_asked.values():  # has left the object since
            asked[1] |= asked[2] != obj.pages_gone
        obj.windowed = True
    return fd


def _in_offset_order(made: list[VmPage], absent: list[tuple[int, VmPage]]) -> list[VmPage]:
    """The pages to fill, in offset order: the new pages `made` (the first of the new
    offsets, if frames ran short) with each absent page put back after the new pages
    that come before it (`absent`: in order, with their count of new offsets before)."""
    if not absent:
        return made
    out: list[VmPage] = []
    taken = 0
    for before, page in absent:
        upto = min(before, len(made))
        out.extend(made[taken:upto])
        taken = max(taken, upto)
        out.append(page)
    out.extend(made[taken:])
    return out


def _page_runs(pages: list[VmPage], ps: int) -> list[tuple[int, int]]:
    """Index ranges [lo, hi) of `pages` (in offset order) whose offsets are adjacent."""
    if pages and pages[-1].offset - pages[0].offset == (len(pages) - 1) * ps:
        return [(0, len(pages))]  # (one run: the usual answer, known without a loop)
    runs, lo = [], 0
    for i in range(1, len(pages) + 1):
        if i == len(pages) or pages[i].offset != pages[i - 1].offset + ps:
            runs.append((lo, i))
            lo = i
    return runs


def _settle(obj: VmObject, fills: list[VmPage], lock: int) -> None:
    """Pages just filled with provided data get the manager's lock; those faults wait
    for are settled, and their waiters woken once for the run."""
    vm = obj.vm
    vm.resident.stats.pageins += len(fills)
    settled = False
    for page in fills:
        page.page_lock, page.unlock_request = lock, VM_PROT_NONE
        if page.absent:
            page_settled(obj, page, wake=False)
            settled = True
    if settled:  # one wake-up for the run: its waiters all wait on the object
        vm.kernel.sched.thread_wakeup(obj.page_waitq)


def _manager_objects(obj: VmObject) -> set[VmObject]:
    """The objects whose pages count against the manager of `obj` (paper 6.1)."""
    vm = obj.vm
    manager = obj.pager.receiver if obj.pager is not None else None
    return {o for o in vm.pager_objects.values()
            if o.pager is not None and (o.pager is obj.pager or
                                        (manager is not None and o.pager.receiver is manager))}


def _manager_room(obj: VmObject) -> int:
    """How many more pages the manager of `obj` may have resident (internal objects:
    as many as there are frames)."""
    vm = obj.vm
    if obj.internal:
        return len(vm.resident.pages)
    return vm.manager_page_limit - vm.resident.manager_resident(obj)


def _enforce_manager_limit(obj: VmObject, keep: set[VmPage]) -> None:
    """Keep one manager's objects within `manager_page_limit` resident pages, evicting
    its least recently used pages (paper 6.1: a manager that floods the cache). Pages
    in `keep` (just provided for waiting faults) stay; fresh ones go last. A manager
    over its limit is brought MANAGER_SLACK of it below, so that the walk over the
    resident queues that finds its oldest pages runs once per that many pages (a
    manager streaming more than its limit), not at every provide."""
    vm = obj.vm
    if vm.resident.manager_resident(obj) <= vm.manager_page_limit:
        return  # (counted as pages come and go: no walk over the objects)
    mine = _manager_objects(obj)
    count = sum(len(o.memq) - o.in_place_pages for o in mine)  # (held in place: on
    # their way back, not victims)
    if count <= vm.manager_page_limit:
        return
    low = vm.manager_page_limit - max(1, int(vm.manager_page_limit * MANAGER_SLACK))
    victims = _manager_lru(vm, mine, keep)
    while count > low and victims:
        n = min(count - low, EVICT_BATCH)
        chunk, victims = victims[:n], victims[n:]
        with vm.phys.discard_batch():  # the freed pages' holes punched a run at a time
            count -= evict_in_runs(vm, [p for p in chunk if p.queue in ("active", "inactive")
                                        and p.object in mine])
        if count > low and victims:  # (between batches every structure is settled;
            vm.kernel.sched.lock_break()  # the pages still listed are checked again)


def evict_in_runs(vm: VmSystem, pages: list[VmPage]) -> int:
    """vm_pageout_reclaim of each page, except that the dirty plain pages (of internal
    and external objects alike) go back to their manager a run of adjacent pages per
    message (_WriteRun); one that cannot go now is activated, as vm_pageout_reclaim
    does. Returns how many pages left memory (freed, or on their way to a manager)."""
    gone, run, dirty = 0, None, []
    for page in sorted(pages, key=lambda p: (p.object.serial, p.offset)):  # type: ignore[union-attr]
        obj = page.object
        assert obj is not None
        if not vm_pageout_plain(page):
            gone += vm_pageout_reclaim(vm, page)
        elif vm_pageout_free_clean(vm, page):
            gone += 1
        else:
            if run is None or run.obj is not obj:
                gone += run.send() if run is not None else 0
                run = _WriteRun(obj, True, not obj.internal and _takes_in_place(obj),
                                DEACTIVATE)
            vm.phys.pmap_page_protect(  # (in place: its data must stay where it is)
                page.frame, ~VM_PROT_WRITE & 7 if run.in_place else VM_PROT_NONE)
            gone += run.add(page)
            dirty.append((page, obj))
    gone += run.send() if run is not None else 0
    for page, obj in dirty:
        if page.object is obj and not page.busy:  # still there (not in place): it
            vm.resident.vm_page_activate(page)  # could not go back now
    return gone


def _manager_lru(vm: VmSystem, mine: set[VmObject], keep: set[VmPage]) -> list[VmPage]:
    """The resident pages of a manager's objects but `keep`, least recently used first
    (inactive, then active), the fresh ones (provided, never used) after the rest."""
    res = vm.resident
    pages = [p for q in (res.inactive, res.active) for p in q
             if p.object in mine and p not in keep]
    return [p for p in pages if not p.fresh] + [p for p in pages if p.fresh]


def _set_lock(obj: VmObject, page: VmPage, lock: int) -> None:
    """Apply pager_data_lock to one cached page and wake faults it now allows."""
    vm = obj.vm
    page.page_lock = lock
    page.unlock_request &= lock
    if lock and not (page.busy and obj.in_place and _held_run(obj, page.offset) is not None):
        vm.phys.pmap_page_protect(page.frame, VM_PROT_ALL & ~lock)  # (on a page held
        # in place, at its release: _settle_released; until then it is read-only, and
        # its data stay in the window, where the manager may be reading them)


def _take_back(obj: VmObject, off: int) -> None:
    """The manager could not store a page it was sent: keep the data in the object."""
    vm = obj.vm
    holding = obj.pending.pop(off)
    obj.existence.discard(off)
    obj.pageout_failed = (vm.swap_epoch, vm.kernel.sched.now())
    kept = obj.memq.get(off)
    if kept is not None:  # a clean_request kept the page: it is dirty again
        kept.dirty = True
        return
    src = holding.memq.get(holding_offset(holding, off))
    if src is not None:
        page = vm.resident.vm_page_grab(privileged=True)
        if page is None:  # move the frame itself back
            vm.phys.pmap_page_protect(src.frame, VM_PROT_NONE)
            vm.resident.vm_page_rename(src, obj, off)
            vm.resident.vm_page_unwire(src)
            src.dirty = True
            return
        vm.resident.vm_page_insert(page, obj, off)
        vm.phys.pmap_copy_page(src.frame, page.frame)
        page.dirty = True
        vm.resident.vm_page_activate(page)


__all__ = [
    "PLACED_MAX",
    "VM_PROT_WRITE",
    "ObjectName",
    "PagerServer",
    "object_clean",
    "object_window",
    "pager_create",
    "pager_data_request",
    "pager_data_write",
    "pager_init",
    "pager_terminate",
]
