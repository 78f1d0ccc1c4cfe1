"""Copy-on-reference out-of-line memory across hosts (paper 7, 8.2): the sending side.

"It is possible to implement copy-on-reference ... in a network environment" (7): when a
message carries a large out-of-line region to another host, the sending host's
netmsgserver does not copy it into the packet. It keeps the region (its copy-on-write
copy in the server's own address space, which the message gave it) and serves it as a
*memory object*: a port of the server's, sent in the packet's CorItem as an ordinary
send right. The receiving netmsgserver maps that object with vm_allocate_with_pager
(its memory object port is just its proxy for the sender's port) and delivers the
mapping as ordinary out-of-line memory. The receiving kernel's pager_init,
pager_data_request, pager_data_write and pager_data_unlock messages go to the proxy,
so they cross like any other message; this `CorPager`, part of the sending server's
loop, answers them with pager_data_provided / pager_data_lock on its proxy for the
kernel's request port. The two messages of a fault, pager_data_request and
pager_data_provided, travel in compact packets (PAGEIN, PAGE: net/packets.py) that
name only the object or the request port, an offset and the data (the request port of
a PAGEIN is the one the object's pager_init named), so a fault costs about 100 bytes
besides its page. Only pages the receiver touches cross, plus read-ahead once the
reader has twice gone on where the last data ended: from then on each of its faults
makes the window GROWTH times larger (from WINDOW_MIN up to WINDOW_MAX), and windows are
streamed without waiting for faults until GROWTH windows, at most STREAM_AHEAD bytes,
lie ahead of the reader (pre-paging, 8.2), so a sequential reader pays O(log size)
round trips and finds most of its data there. A reader that overtakes data on its way
(faults on a page of its run already sent) stays sequential: that page alone is sent
again (the kernel may have let it go) and the stream goes on. A random reader gets
just the pages it asks for. Each window is read from the kept region straight into the
packet that carries it (`Provide`'s fill: the data is copied once on this side).
The receiving kernel maps the pages that came after a fault's page at the next fault
(vm_fault.py's fault-around), so it takes one fault per run, not per page.

- Threshold: regions of at least COR_MIN bytes (256 KiB) go by reference when they can
  be read without a data manager (resident, zero-fill or the kernel's own, as
  `range_readable_now` says: a region that itself came by reference cannot be served
  from inside the server's loop, so it goes by value, by a forwarding thread); smaller
  ones go by value (OolData), where one packet is cheaper than a fault's round trip.
- Release: the object (the kept region and its port) goes when every kernel that mapped
  it has let it go (the kernel destroys its request port: the receiving host announces
  that port dead, and the proxy here dies), when the host it was sent to goes down,
  and, if it was never mapped, when that host goes down. The receiving side frees its
  proxy when the sending host announces the object's port dead (net/netmsgserver.py).
- Failure: if the sending host goes down, the receiving host's proxy (the memory object
  port) dies, and every fault on a page not yet received fails with KERN_MEMORY_ERROR
  (vm/memory_object.py: a manager that died), at once, not after a timeout.
- Bounds: at most COR_HOST_MAX bytes of regions are kept for any one host (beyond it a
  region goes by value); only the host the object was sent to is served (its id is
  unguessable and given to that host only; a request from another host is refused);
  written-back data is dropped (the receiver's changes are its own: its mapping is a
  copy-on-write copy of the object, which no kernel writes).

State belongs to the server's loop, except `keep`, which a forwarding thread may call:
the tables are guarded by `lock` (no Mach call is made under it).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from pymach import mach
from pymach.include.mach_defs import memory_object_defs, pager_defs
from pymach.include.message import OOL, Int, Item, Message
from pymach.include.mig import serve_message
from pymach.include.vm_param import VM_PROT_NONE, round_page
from pymach.net import portops

log = logging.getLogger("pymach.net")
COR_MIN = 256 << 10  # bytes: smaller regions go by value
COR_HOST_MAX = 1 << 30  # bytes of regions kept for one host at most
WINDOW_MIN = 256 << 10  # bytes of the first read-ahead
WINDOW_MAX = 8 << 20  # bytes of read-ahead at most
GROWTH = 4  # each fault of a sequential reader makes the window this much larger
STREAM_AHEAD = 32 << 20  # bytes streamed ahead of a sequential reader at most
_LOCK = pager_defs.by_name["pager_data_lock"].id
Send = Callable[[int, int, list[Item]], None]  # (our proxy, msg id, items): forward it
Fill = Callable[[memoryview], None]  # copies the data into the buffer it is given
Provide = Callable[[int, int, int, Fill], None]  # (request port proxy, offset, size, fill):
# send `size` bytes of data, which `fill` copies into the packet being built


@dataclass
class CorObject:
    """A region kept for `host`: `size` bytes at `address` in the server's space."""

    host: str
    address: int
    size: int
    charge: int  # page-rounded size (the object's), counted against the host
    page_size: int
    requests: set[int] = field(default_factory=set)  # proxies of kernels' request ports
    next: int = -1  # the offset right after the last data provided
    window: int = 0  # bytes of the last reply
    streak: int = 0  # faults in a row that went on where the last data ended, plus 1
    start: int = 0  # the offset where that run of faults began
    provided: int = 0  # bytes provided so far


class CorPager:
    """The memory objects a host serves for the regions it sent (see module docstring)."""

    def __init__(self, host: str, send: Send, provide: Provide) -> None:
        self.host = host
        self.send = send  # how a reply leaves: the server forwards it to the proxy's host
        self.provide_data = provide  # how data leaves (a PAGE packet: net/packets.py),
        # read straight from the kept region into the packet
        self.lock = threading.Lock()
        self.objects: dict[int, CorObject] = {}  # memory object port (our name) -> object
        self.held: dict[str, int] = {}  # host -> bytes kept for it
        self.by_request: dict[int, int] = {}  # request port proxy -> memory object port
        self.kept = self.released = 0  # objects made and let go, ever
        self.faults = self.provided = 0  # data requests served and bytes provided, ever

    def keep(self, item: OOL, host: str, page_size: int) -> int:
        """Keep the region of `item` (in our space, received) for `host`; the memory
        object port that serves it, or 0 if `host` has COR_HOST_MAX bytes kept already
        (then the caller sends it by value)."""
        charge = round_page(item.size, page_size)
        with self.lock:
            if self.held.get(host, 0) + charge > COR_HOST_MAX:
                return 0
            self.held[host] = self.held.get(host, 0) + charge
        port: int = mach.port_allocate(mach.task_self())
        with self.lock:
            self.objects[port] = CorObject(host, item.address, item.size, charge, page_size)
            self.kept += 1
        return port

    def serve(self, source: str, msg: Message) -> None:
        """A memory_object request (received form: `local_port` the object) that came
        from host `source`; a host the object was not sent to is refused."""
        obj = self.objects.get(msg.local_port)
        if obj is None or obj.host != source:
            log.warning("netmsgserver %s: refused a memory object request from %r", self.host,
                        source)
            return
        serve_message(memory_object_defs, self, msg)

    def page_in(self, source: str, mo: int, offset: int, length: int, access: int) -> None:
        """A compact pager_data_request (PAGEIN) from host `source`, for the kernel whose
        request port we learned from its pager_init."""
        obj = self.objects.get(mo)
        request = min(obj.requests, default=0) if obj is not None else 0
        if obj is None or obj.host != source or not request:
            log.warning("netmsgserver %s: refused a memory object request from %r", self.host,
                        source)
            return
        self.pager_data_request(mo, request, offset, length, access)

    # -- the memory_object routines (Table 3-5), for objects of ours ------------------------
    def pager_init(self, mo: int, request: int, name: int) -> None:
        """A kernel of the host we sent the object to maps it."""
        self.objects[mo].requests.add(request)
        self.by_request[request] = mo

    def pager_data_request(self, mo: int, request: int, offset: int, length: int,
                           access: int) -> None:
        """Provide the bytes asked for, and more once the reader has twice gone on where
        the last data ended (a random reader whose two pages happen to be neighbours gets
        no more than it asks). From then on the reader is sequential: each of its faults
        makes the window GROWTH times larger (from WINDOW_MIN up to WINDOW_MAX), and
        windows are streamed without waiting for faults until GROWTH windows (at most
        STREAM_AHEAD bytes) lie ahead of it. A sequential reader that overtakes data on
        its way (asks for a page of the run already sent) stays sequential: its page is
        sent again (the kernel may have let it go) and the stream goes on."""
        obj = self.objects[mo]
        if not 0 <= offset < obj.charge or length <= 0:
            return
        self.faults += 1
        if obj.streak > 2 and obj.start <= offset < obj.next:  # overtook the data
            self._send_pages(obj, request, offset, min(length, obj.page_size))
            obj.window = _grown(obj.window)
        else:
            if offset != obj.next:
                obj.streak, obj.start, obj.window = 0, offset, 0
            obj.streak += 1
            window = _grown(obj.window) if obj.streak > 2 else 0
            self._provide(obj, request, offset, max(length, window))
            obj.window = max(obj.window, window)
        if obj.streak > 2:  # a sequential reader: stream what it will read next
            ahead = min(obj.charge, offset + min(STREAM_AHEAD, GROWTH * obj.window))
            while obj.next < ahead:
                self._provide(obj, request, obj.next, obj.window)

    def _provide(self, obj: CorObject, request: int, offset: int, length: int) -> None:
        """Provide whole pages from `offset`, the data that follows what was sent."""
        count = self._send_pages(obj, request, offset, length)
        obj.next, obj.window = offset + count, max(obj.window, count)

    def _send_pages(self, obj: CorObject, request: int, offset: int, length: int) -> int:
        """Send `length` bytes (whole pages) from `offset`, or up to the object's end: the
        bytes past the region's end (in its last page) are zeros, never what else the
        sender had in that page. The count sent."""
        count = min(length, obj.charge - offset)
        readable = max(0, min(count, obj.size - offset))

        def fill(into: memoryview) -> None:  # (the rest of `into` stays zeros)
            portops.read_into(obj.address + offset, into[:readable])

        obj.provided += count  # (counted before it goes: a reader that has the data
        self.provided += count  # must find it counted)
        self.provide_data(request, offset, count, fill)
        return count

    def pager_data_write(self, mo: int, offset: int, data: OOL, data_count: int) -> None:
        """Nothing to store: the object's data is the region as it was sent."""
        if data.data is None and data.size:
            mach.vm_deallocate(mach.task_self(), data.address, data.size)

    def pager_data_unlock(self, mo: int, request: int, offset: int, length: int,
                          access: int) -> None:
        """Grant any access (the data is never locked)."""
        self.send(request, _LOCK, [Int(offset), Int(length), Int(VM_PROT_NONE)])

    def pager_create(self, pager: int, mo: int, request: int, name: int) -> None:
        """Not for us (the default pager's call)."""

    # -- letting go ---------------------------------------------------------------------
    def request_gone(self, request: int) -> int:
        """The kernel request port our proxy `request` stood for died: the object it was
        for goes once no kernel maps it. Its memory object port (to destroy), or 0."""
        mo = self.by_request.pop(request, 0)
        obj = self.objects.get(mo)
        if obj is None:
            return 0
        obj.requests.discard(request)
        return self.release(mo) if not obj.requests else 0

    def host_gone(self, host: str) -> list[int]:
        """`host` went down: every object kept for it goes; their ports (to destroy)."""
        return [self.release(mo) for mo, o in list(self.objects.items()) if o.host == host]

    def release(self, mo: int) -> int:
        """Let the object go: its region is deallocated; returns its port (to destroy)."""
        with self.lock:
            obj = self.objects.pop(mo, None)
            if obj is None:
                return 0
            self.held[obj.host] -= obj.charge
            self.released += 1
        for request in obj.requests:
            self.by_request.pop(request, None)
        mach.vm_deallocate(mach.task_self(), obj.address, obj.size)
        return mo

    def held_bytes(self) -> int:
        """Bytes of regions kept now, for every host."""
        with self.lock:
            return sum(self.held.values())


def _grown(window: int) -> int:
    """The read-ahead window after one more fault of a sequential reader."""
    return min(max(GROWTH * window, WINDOW_MIN), WINDOW_MAX)
