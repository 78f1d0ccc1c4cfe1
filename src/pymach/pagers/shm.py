"""Consistent network shared memory, paper section 4.2: read-many / write-one pages.

Clients on any hosts ask the server for a region by name (`shm_get_region`) and get
its memory object X, which they map with vm_allocate_with_pager; each kernel then
calls pager_init on X, and the server records that kernel's request port. The server
keeps the master copy of every page and, per page, which kernels may read it and which
one (at most) may write it:

- a read fault (pager_data_request for read) gets the data with a *write lock*
  (pager_data_provided with lock VM_PROT_WRITE), after taking the page back from a
  writer if there is one;
- a write to a page a kernel has read-only makes that kernel call pager_data_unlock;
  the server first invalidates every other use of the page with pager_flush_request,
  then grants write access with pager_data_lock and no lock (the paper's third frame);
- a write fault on a page not cached does both at once (data with no lock).

Taking a page back from a writer is pager_flush_request, whose reply says how many
pages the kernel wrote back; the server waits for those pager_data_write messages
before answering anyone, so no write is ever lost. The server is single-threaded: it
handles requests in the order they arrive. `log` records every protocol message.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pymach import mach
from pymach.errors import MachError
from pymach.include.mach_defs import TASK_BOOTSTRAP_PORT, memory_object_defs
from pymach.include.message import OOL, Int, Message
from pymach.include.mig import INT, PORT, STR, Subsystem
from pymach.include.netname_defs import netname_defs
from pymach.include.vm_param import VM_PROT_NONE, VM_PROT_WRITE
from pymach.mach_vm import take_ool, vm_page_size
from pymach.pagers.data_manager import DataManager

shm_defs = Subsystem("shm", 6200)
shm_defs.routine("shm_get_region", "server", [("name", STR), ("size", INT)],
                 [("memory_object", PORT), ("size", INT)],
                 "The memory object of the named shared region, made with `size` bytes on "
                 "first use; returns it and the region's size.")
shm_get_region = shm_defs.stub("shm_get_region")
_netname_check_in = netname_defs.stub("netname_check_in")  # any name server will do

_DATA_WRITE = memory_object_defs.by_name["pager_data_write"].id


@dataclass
class PageState:
    """Who caches one page: kernels (by request port) that may read, and the writer."""

    readers: set[int] = field(default_factory=set)
    writer: int = 0


@dataclass
class Region:
    """One shared region: its memory object, master copy and page states."""

    name: str
    size: int
    memory_object: int
    data: dict[int, bytes] = field(default_factory=dict)  # page offset -> contents
    pages: dict[int, PageState] = field(default_factory=dict)


class SharedMemoryServer(DataManager):
    """The section 4.2 server (see module docstring)."""

    threads = max_threads = 1  # requests are handled strictly in arrival order
    services = (shm_defs,)

    def __init__(self) -> None:
        super().__init__()
        self.regions: dict[str, Region] = {}
        self.by_object: dict[int, Region] = {}
        self.kernel_labels: dict[int, str] = {}  # request port -> "kernel N", for the log
        self.log: list[str] = []

    def _say(self, text: str) -> None:
        self.log.append(text)

    def _k(self, request: int) -> str:
        return self.kernel_labels.get(request, f"request port {request}")

    def serve_as(self, name: str = "shm") -> None:
        """Check a new service port in with the name server (bootstrap port) under
        `name`, and serve until stopped."""
        me = mach.task_self()
        svc = mach.port_allocate(me)
        mach.port_enable(me, svc)
        _netname_check_in(mach.task_get_special_port(me, TASK_BOOTSTRAP_PORT), name, svc)
        self.serve()

    # -- the service ------------------------------------------------------------------
    def shm_get_region(self, server: int, name: str, size: int) -> tuple[int, int]:
        region = self.regions.get(name)
        if region is None:
            if size <= 0:
                raise MachError("KERN_INVALID_ARGUMENT", "a new region needs a size > 0")
            ps = vm_page_size()
            region = Region(name, -(-size // ps) * ps, self.create_memory_object())
            self.regions[name] = region
            self.by_object[region.memory_object] = region
        return region.memory_object, region.size

    # -- the protocol -----------------------------------------------------------------
    def pager_init(self, memory_object: int, request: int, name: int) -> None:
        super().pager_init(memory_object, request, name)
        self.kernel_labels.setdefault(request, f"kernel {len(self.kernel_labels) + 1}")
        self._say(f"pager_init from {self._k(request)}")

    def _known(self, memory_object: int, request: int) -> Region | None:
        """The region, if `request` is a kernel's request port for it (from pager_init):
        the server only ever calls ports the kernels gave it, so no client can make it
        wait on a port of the client's own."""
        region = self.by_object.get(memory_object)
        if region is None or request not in self.uses.get(memory_object, {}):
            self._say(f"ignored a request for object {memory_object} naming a port no "
                      f"kernel gave us")
            return None
        return region

    def pager_data_request(self, memory_object: int, request: int, offset: int,
                           length: int, access: int) -> None:
        region = self._known(memory_object, request)
        if region is None:
            return
        ps = vm_page_size()
        for off in range(offset, offset + length, ps):
            self._request_page(region, request, off, access)

    def _request_page(self, region: Region, request: int, off: int, access: int) -> None:
        want_write = bool(access & VM_PROT_WRITE)
        self._say(f"pager_data_request from {self._k(request)} for page {off:#x} "
                  f"({'write' if want_write else 'read'})")
        state = region.pages.setdefault(off, PageState())
        if want_write:
            self._invalidate_others(region, off, request)
            state.readers, state.writer = set(), request
            lock = VM_PROT_NONE
        else:
            if state.writer and state.writer != request:
                self._take_back(region, off, state.writer)
                state.writer = 0
            state.readers.add(request)
            lock = VM_PROT_NONE if state.writer == request else VM_PROT_WRITE
        data = region.data.get(off, bytes(vm_page_size()))
        mach.pager_data_provided(request, off, data, len(data), lock)
        self._say(f"  pager_data_provided to {self._k(request)} page {off:#x} with "
                  f"{'a write lock' if lock else 'no lock'}")

    def pager_data_unlock(self, memory_object: int, request: int, offset: int, length: int,
                          access: int) -> None:
        region = self._known(memory_object, request)
        if region is None:
            return
        self._say(f"pager_data_unlock from {self._k(request)} for page {offset:#x}")
        for off in range(offset, offset + length, vm_page_size()):
            state = region.pages.setdefault(off, PageState())
            self._invalidate_others(region, off, request)
            state.readers, state.writer = set(), request
            mach.pager_data_lock(request, off, vm_page_size(), VM_PROT_NONE)
            self._say(f"  pager_data_lock to {self._k(request)} page {off:#x}: no lock "
                      f"(write granted)")

    def pager_data_write(self, memory_object: int, offset: int, data: bytes) -> None:
        region = self.by_object.get(memory_object)
        if region is None:
            return
        ps = vm_page_size()
        for i in range(0, len(data), ps):
            region.data[offset + i] = data[i:i + ps]
        self._say(f"pager_data_write of page {offset:#x}")

    def pager_terminate(self, memory_object: int, request: int) -> None:
        region = self.by_object.get(memory_object)
        if region is None:
            return
        for state in region.pages.values():
            state.readers.discard(request)
            if state.writer == request:
                state.writer = 0

    # -- invalidation ------------------------------------------------------------------
    def _invalidate_others(self, region: Region, off: int, keep: int) -> None:
        state = region.pages.setdefault(off, PageState())
        for request in sorted(state.readers | ({state.writer} - {0})):
            if request != keep:
                self._take_back(region, off, request)
        state.readers &= {keep}

    def _take_back(self, region: Region, off: int, request: int) -> None:
        """Invalidate one kernel's copy of a page and wait for its changes, if any. A
        kernel that let go of the object meanwhile sent its changes before its request
        port died, so they are already queued on the object: take them in."""
        try:
            written = mach.pager_flush_request(request, off, vm_page_size())
        except MachError as e:
            self._say(f"  pager_flush_request to {self._k(request)} failed ({e.code}): "
                      f"that kernel let go of the object")
            self.pager_terminate(region.memory_object, request)
            written = 0
        else:
            self._say(f"  pager_flush_request to {self._k(request)} page {off:#x}"
                      f"{f' ({written} page written back)' if written else ''}")
        for _ in range(written):
            msg = self.await_message(region.memory_object, _is_data_write)
            self._apply_write(region, msg)
        self._drain_writes(region)

    def _drain_writes(self, region: Region) -> None:
        """Take in every pager_data_write already queued on the object (the queue is in
        the order the kernels sent them, so these precede anything we answer next)."""
        while True:
            try:
                msg = self.await_message(region.memory_object, _is_data_write, 0)
            except MachError:
                return
            self._apply_write(region, msg)

    def _apply_write(self, region: Region, msg: Message) -> None:
        offset, data, count = msg.items
        assert isinstance(offset, Int) and isinstance(data, OOL) and isinstance(count, Int)
        self.pager_data_write(region.memory_object, offset.value,
                              take_ool(data)[:count.value])


def _is_data_write(msg: Message) -> bool:
    return msg.id == _DATA_WRITE
