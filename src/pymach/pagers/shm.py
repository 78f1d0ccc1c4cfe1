"""Consistent network shared memory, paper section 4.2: read-many / write-one pages.

Clients on any hosts ask the server for a region by name (`shm_get_region`) and get
its memory object X, which they map with vm_allocate_with_pager; each kernel then
calls pager_init on X, and the server records that kernel's request port. A kernel on
another host reaches X through its netmsgserver like any port, and the server reaches
that kernel's request port the same way: the protocol is ordinary messages. The server
keeps the master copy of every page and, per page, which kernels may read it and which
one (at most) may write it:

- a read fault (pager_data_request for read) gets the data with a *write lock*
  (pager_data_provided with lock VM_PROT_WRITE), after taking the page back from a
  writer if there is one; the pages after it in the kernel's cluster that no other
  kernel caches come in the same message (read-ahead, never at another kernel's cost);
- a write to a page a kernel has read-only makes that kernel call pager_data_unlock;
  the server first invalidates every other use of the page with pager_flush_request,
  then grants write access with pager_data_lock and no lock (the paper's third frame);
- a write fault on a page not cached does both at once (data with no lock).

Taking a page back from a *writer* is pager_flush_request with its reply, which says
how many pages the kernel wrote back; the server waits for those pager_data_write
messages before answering anyone, so no write is ever lost. Invalidating a *reader's*
copy is pager_flush_request without a reply: a reader has nothing to write back, and
the server's later messages to that kernel (the only way new data reaches it) are
executed after the flush, in order, so the kernel can never see new data beside the old
copy (sequential consistency holds without the acknowledgement). An unlock request
from a kernel whose copy was invalidated meanwhile is stale and ignored: its fault
finds the page gone and asks again with pager_data_request.

The answers, pager_data_provided and pager_data_lock, go without waiting for the
kernel's reply, as Mach 3.0's simpleroutines: one message each, correct by the same
in-order argument. (`SharedMemoryServer(answers_oneway=False)` makes them calls that
wait for the kernel's reply, two messages each: the paper's RPC-style interface.) So the
messages of one fault are the kernel's request, the flushes of other kernels' copies
(one message each for readers, three for a writer: the flush, its reply, the
written-back page) and the answer. The server counts them per kernel (`stats`;
`shm_statistics` and `shm_total_statistics` for clients; bench/net_shm.py).

A page granted to a kernel stays with it at least `hold_ms` (HOLD_MS) before the server
takes it away for another kernel (the "window" of IVY and Mirage): without it, kernels
that contend for one page can take it from each other forever, each losing it between
the answer and its thread's retry, and none makes progress. The server waits out the
rest of the window in Mach time before a flush.

A call to a kernel (a writer's flush, or an answer with `answers_oneway=False`) never
stalls the server on a dead host: while it waits for the reply, it looks every
CALL_POLL_MS whether the kernel's request port died.

A kernel that dies (its host fails or leaves the cluster) holding a page: its request
port dies here when this host declares that host down (within the peer timeout), and
the server drops it from every page, also while it waits for that kernel's reply. The
page then holds what the server last received: the dead kernel's writes since it took
the page are lost, and the other kernels go on.

Sequential consistency is between kernels: tasks on one host share that host's memory
under the machine's own memory model (x86: TSO), as any two processes sharing memory do.

The server is single-threaded: it handles requests in the order they arrive. `log`
records every protocol message.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from pymach import mach
from pymach.errors import MachError
from pymach.include.mach_defs import TASK_BOOTSTRAP_PORT, memory_object_defs, pager_defs
from pymach.include.message import OOL, RCV_TIMEOUT, Int, Message
from pymach.include.mig import INT, INT_ARRAY, PORT, REPLY_ID_OFFSET, STR, TASK_CODEC, Subsystem
from pymach.include.netname_defs import netname_defs
from pymach.include.vm_param import VM_PROT_NONE, VM_PROT_WRITE
from pymach.mach_vm import take_ool, vm_page_size
from pymach.pagers.data_manager import DataManager

shm_defs = Subsystem("shm", 6200)
shm_defs.routine("shm_get_region", "server", [("name", STR), ("size", INT)],
                 [("memory_object", PORT), ("size", INT)],
                 "The memory object of the named shared region, made with `size` bytes on "
                 "first use; returns it and the region's size.")
shm_defs.routine("shm_statistics", "server", [("name", STR), ("object_name", PORT)],
                 [("counts", INT_ARRAY)],
                 "The protocol counts of the kernel whose name port for region `name`'s "
                 "object is `object_name` (vm_regions gives it to a task that maps the "
                 "region): [faults it sent, messages those faults caused, messages "
                 "received from it, messages sent to it].")
shm_defs.routine("shm_total_statistics", "server", [("name", STR)], [("counts", INT_ARRAY)],
                 "The same counts summed over every kernel that used region `name` (with "
                 "the write-backs no fault asked for), and the number of those kernels.")
shm_get_region = shm_defs.stub("shm_get_region")
shm_statistics = shm_defs.stub("shm_statistics")
shm_total_statistics = shm_defs.stub("shm_total_statistics")
_netname_check_in = netname_defs.stub("netname_check_in")  # any name server will do

_DATA_WRITE = memory_object_defs.by_name["pager_data_write"].id
CALL_POLL_MS = 500  # while awaiting a kernel's reply, look this often whether it died
HOLD_MS = 2.0  # a kernel keeps a page it was just given at least this long


@dataclass
class PageState:
    """Who caches one page: kernels (by request port) that may read, and the writer."""

    readers: set[int] = field(default_factory=set)
    writer: int = 0
    granted_at: float = 0.0  # time.monotonic() of the last grant (read or write)


@dataclass
class Region:
    """One shared region: its memory object, master copy and page states."""

    name: str
    size: int
    memory_object: int
    data: dict[int, bytes] = field(default_factory=dict)  # page offset -> contents
    pages: dict[int, PageState] = field(default_factory=dict)


@dataclass
class KernelStats:
    """Protocol counts of one kernel: the faults it sent (a data request or an unlock),
    the messages those faults caused (with any kernel), and the messages exchanged with
    it (whatever fault they served)."""

    region: str = ""
    faults: int = 0
    caused: int = 0
    received: int = 0
    sent: int = 0

    def counts(self) -> list[int]:
        """[faults, caused, received, sent]."""
        return [self.faults, self.caused, self.received, self.sent]


class SharedMemoryServer(DataManager):
    """The section 4.2 server (see module docstring)."""

    threads = max_threads = 1  # requests are handled strictly in arrival order
    services = (shm_defs,)
    writes_in_place = False  # (it awaits a kernel's write-backs as pager_data_write
    # messages, _take_back; it asks for no window anyway)

    def __init__(self, answers_oneway: bool = True, hold_ms: float = HOLD_MS) -> None:
        super().__init__()
        self.answers_oneway = answers_oneway  # provided and lock without waiting for replies
        self.hold_ms = hold_ms  # a page granted stays at least this long (module docstring)
        self._nap = 0  # a port nobody sends to: waits in Mach time
        self.regions: dict[str, Region] = {}
        self.by_object: dict[int, Region] = {}
        self.kernel_labels: dict[int, str] = {}  # request port -> "kernel N", for the log
        self.stats: dict[int, KernelStats] = {}  # request port -> its counts
        self.unattributed = KernelStats()  # write-backs no fault asked for (pageout, exit)
        self._fault = 0  # the request port of the fault being served (0: none)
        self.log: list[str] = []

    def _say(self, text: str) -> None:
        self.log.append(text)

    def _k(self, request: int) -> str:
        return self.kernel_labels.get(request, f"request port {request}")

    def _count(self, request: int, sent: bool = False) -> None:
        """Count one protocol message exchanged with kernel `request` (0: unknown)."""
        stats = self.stats.get(request, self.unattributed) if request else self.unattributed
        if sent:
            stats.sent += 1
        else:
            stats.received += 1
        if self._fault:
            self.stats[self._fault].caused += 1

    def _call(self, routine: str, request: int, *args: Any, oneway: bool = False
              ) -> list[Any] | None:
        """Call routine `routine` (Table 3-6) on the kernel of `request` and wait for its
        reply (two messages): the reply's out values, or None if the kernel let go of
        the object or its request port died (its host is gone), found by looking every
        CALL_POLL_MS while waiting, so a dead host never stalls the server. With
        `oneway`, send the request without a reply port (one message) and return []."""
        r = pager_defs.by_name[routine]
        reply_port = 0 if oneway else mach.thread_reply()
        items = [TASK_CODEC.to_item(t, v) for (_, t), v in zip(r.ins, args, strict=True)]
        try:
            mach.msg_send(Message(remote_port=request, local_port=reply_port, id=r.id,
                                  items=items))
        except MachError:
            return None
        self._count(request, sent=True)
        if oneway:
            return []
        while True:
            try:
                reply = mach.msg_receive(reply_port, RCV_TIMEOUT, CALL_POLL_MS)
            except MachError as e:
                if e.code != "RCV_TIMED_OUT":
                    raise
                if mach.names_gone([request]):
                    return None
                continue
            if reply.id == r.id + REPLY_ID_OFFSET:
                self._count(request)
                values = reply.values()
                return values[1:] if values and values[0] == 0 else None

    def _begin_fault(self, request: int) -> None:
        self._fault = request
        self.stats[request].faults += 1
        self._count(request)  # the request itself

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

    def shm_statistics(self, server: int, name: str, object_name: int) -> list[int]:
        for request, name_port in self.uses.get(self._region(name).memory_object, {}).items():
            if name_port == object_name:
                return self.stats[request].counts()
        raise MachError("KERN_INVALID_ARGUMENT", f"port {object_name} names no kernel's use "
                        f"of region {name!r}")

    def shm_total_statistics(self, server: int, name: str) -> list[int]:
        self._region(name)
        every = [s.counts() for s in self.stats.values() if s.region == name]
        total = [sum(column) for column in zip(*every, strict=True)] if every else [0] * 4
        total[2] += self.unattributed.received
        total[3] += self.unattributed.sent
        return [*total, len(every)]

    def _region(self, name: str) -> Region:
        region = self.regions.get(name)
        if region is None:
            raise MachError("KERN_INVALID_ARGUMENT", f"no region is named {name!r}")
        return region

    # -- the protocol -----------------------------------------------------------------
    def pager_init(self, memory_object: int, request: int, name: int) -> None:
        super().pager_init(memory_object, request, name)
        self.kernel_labels.setdefault(request, f"kernel {len(self.kernel_labels) + 1}")
        region = self.by_object.get(memory_object)
        self.stats.setdefault(request, KernelStats(region.name if region else ""))
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
        self._begin_fault(request)
        try:
            self._request_page(region, request, offset, length, access)
        finally:
            self._fault = 0

    def _request_page(self, region: Region, request: int, off: int, length: int,
                      access: int) -> None:
        """Serve the faulting page at `off`; with it, for a read, the following pages of
        the cluster (`length` bytes in all) that no other kernel caches."""
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
        pages = [off] if lock == VM_PROT_NONE else \
            [off, *self._read_ahead(region, request, off + vm_page_size(), off + length)]
        data = b"".join(region.data.get(p, bytes(vm_page_size())) for p in pages)
        if self._call("pager_data_provided", request, off, data, len(data), lock,
                      oneway=self.answers_oneway) is None:
            self._say(f"  pager_data_provided to {self._k(request)} failed: it let go")
        state.granted_at = time.monotonic()
        self._say(f"  pager_data_provided to {self._k(request)} page {off:#x}"
                  f"{f' (+{len(pages) - 1} read ahead)' if len(pages) > 1 else ''} with "
                  f"{'a write lock' if lock else 'no lock'}")

    def _read_ahead(self, region: Region, request: int, start: int, end: int) -> list[int]:
        """The pages from `start` on, up to `end` and the region's end, that no other
        kernel caches, until the first that one does; recorded as read by `request`."""
        out = []
        for off in range(start, min(end, region.size), vm_page_size()):
            state = region.pages.setdefault(off, PageState())
            if state.writer or state.readers - {request}:
                break
            state.readers.add(request)
            out.append(off)
        return out

    def pager_data_unlock(self, memory_object: int, request: int, offset: int, length: int,
                          access: int) -> None:
        region = self._known(memory_object, request)
        if region is None:
            return
        self._begin_fault(request)
        try:
            self._say(f"pager_data_unlock from {self._k(request)} for page {offset:#x}")
            for off in range(offset, offset + length, vm_page_size()):
                self._unlock_page(region, request, off)
        finally:
            self._fault = 0

    def _unlock_page(self, region: Region, request: int, off: int) -> None:
        state = region.pages.setdefault(off, PageState())
        if request not in state.readers and state.writer != request:
            self._say(f"  stale: {self._k(request)} no longer has page {off:#x} (it will "
                      f"ask for it again)")
            return
        self._invalidate_others(region, off, request)
        state.readers, state.writer = set(), request
        if self._call("pager_data_lock", request, off, vm_page_size(), VM_PROT_NONE,
                      oneway=self.answers_oneway) is None:
            self._say(f"  pager_data_lock to {self._k(request)} failed: it let go")
        state.granted_at = time.monotonic()
        self._say(f"  pager_data_lock to {self._k(request)} page {off:#x}: no lock "
                  f"(write granted)")

    def pager_data_write(self, memory_object: int, offset: int, data: bytes) -> None:
        """A write-back no flush asked for (pageout, or a kernel letting go)."""
        region = self.by_object.get(memory_object)
        if region is not None:
            self._count(0)
            self._store(region, offset, data)

    def _store(self, region: Region, offset: int, data: bytes) -> None:
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
        if state.writer and state.writer != keep:
            self._take_back(region, off, state.writer)
            state.writer = 0
        for request in sorted(state.readers - {keep}):
            self._invalidate(region, off, request)
        state.readers &= {keep}

    def _hold(self, state: PageState) -> None:
        """Wait (in Mach time) until the page's last grant is hold_ms old: a kernel given
        a page gets to use it before it is taken away, or contending kernels could take
        it from each other forever and none make progress."""
        left = state.granted_at + self.hold_ms / 1000 - time.monotonic()
        if left <= 0:
            return
        if not self._nap:
            self._nap = mach.port_allocate(mach.task_self())
        with contextlib.suppress(MachError):
            mach.msg_receive(self._nap, RCV_TIMEOUT, left * 1000)

    def _invalidate(self, region: Region, off: int, request: int) -> None:
        """Drop a reader's copy of a page: one message, no reply (module docstring)."""
        self._hold(region.pages[off])
        if self._call("pager_flush_request", request, off, vm_page_size(),
                      oneway=True) is None:  # its request port died: it let go
            self._say(f"  pager_flush_request to {self._k(request)} failed: that kernel "
                      f"let go of the object")
            self.pager_terminate(region.memory_object, request)
            return
        self._say(f"  pager_flush_request to {self._k(request)} page {off:#x} (a reader)")

    def _take_back(self, region: Region, off: int, request: int) -> None:
        """Invalidate the writer's copy of a page and wait for its changes, if any. A
        kernel that let go of the object meanwhile sent its changes before its request
        port died, so they are already queued on the object: take them in."""
        self._hold(region.pages[off])
        written = self._flush_and_wait(request, off)
        if written is None:
            self._say(f"  pager_flush_request to {self._k(request)} failed: that kernel "
                      f"let go of the object, or its host is gone")
            self.pager_terminate(region.memory_object, request)
            written = 0
        else:
            self._say(f"  pager_flush_request to {self._k(request)} page {off:#x}"
                      f"{f' ({written} page written back)' if written else ''}")
        for _ in range(written):
            msg = self.await_message(region.memory_object, _is_data_write)
            self._apply_write(region, msg, request)
        self._drain_writes(region)

    def _flush_and_wait(self, request: int, off: int) -> int | None:
        """pager_flush_request to a kernel, awaiting its reply: the pages it wrote back,
        or None if it let go of the object or its request port died."""
        out = self._call("pager_flush_request", request, off, vm_page_size())
        return out[0] if out and isinstance(out[0], int) else None

    def _drain_writes(self, region: Region) -> None:
        """Take in every pager_data_write already queued on the object (the queue is in
        the order the kernels sent them, so these precede anything we answer next)."""
        while True:
            try:
                msg = self.await_message(region.memory_object, _is_data_write, 0)
            except MachError:
                return
            self._apply_write(region, msg, 0)

    def _apply_write(self, region: Region, msg: Message, request: int) -> None:
        offset, data, count = msg.items
        assert isinstance(offset, Int) and isinstance(data, OOL) and isinstance(count, Int)
        self._count(request)
        self._store(region, offset.value, take_ool(data)[:count.value])


def _is_data_write(msg: Message) -> bool:
    return msg.id == _DATA_WRITE
