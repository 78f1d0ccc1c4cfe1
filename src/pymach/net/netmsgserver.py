"""The network message server: ports that span hosts (paper 3.2, 4.2).

Mach makes a remote port look local: each host runs a *netmsgserver* task that holds a
local *proxy* port for every remote port its tasks know, forwards what is sent to a
proxy over the network, and delivers what arrives to the real port. This is that
server, one task per host, one thread. It reaches other hosts only through a
`NetTransport` (net/transport.py: bytes to a host, in order per pair of hosts), whose
events the kernel queues on the server's *wire port* (net/station.py); what travels is
the typed packets of net/packets.py, never pickles.

- a message arriving on a proxy is encoded (port rights become network references
  (host, unguessable id), out-of-line memory becomes bytes) and sent as a MSG packet to
  the host of the real port; a packet from the wire port is decoded (references become
  the real local port or a proxy) and sent on locally. A packet that is not one of the
  layouts of net/packets.py is refused: logged, counted in `bad_packets`, dropped, and
  the transport is told to drop its sender (`disconnect`: over TCP that host's
  connection closes); the server goes on serving. The server's task is unthrottled: a
  full local queue does not hold it back, so the messages of one host are queued in the
  order that host sent them (data managers rely on this: a kernel's pager_data_write
  always precedes its later replies), and a slow receiver never stalls the network;
- the server is the network's name service (netname_check_in / look_up / check_out on
  its service port, which is every task's bootstrap port on the host). Every server
  keeps a replica of the network's registry: a change is sent to every reachable host
  (NAME / UNNAME packets), and a host that joins gets the names checked in on each
  host. The last change a replica hears wins; with a lossy network (fault injection)
  replicas may differ;
- when a port that other hosts know dies, its host sends DEAD to them and they destroy
  their proxies, so their tasks get NOTIFY_PORT_DELETED as for a local port; when the
  transport reports a host down, every proxy for that host's ports goes the same way.
  A request that can no longer be delivered (its port died while it travelled, it
  waited on a proxy being destroyed, its host is unreachable) is answered with a
  MIG_SERVER_DIED reply when it has a reply port, so a remote procedure call fails
  instead of waiting forever.

What other hosts can make the server hold is bounded: MAX_NAMES registry entries,
NET_QUEUE_MAX messages from the network queued on any one local port (more are
refused with SEND_TIMED_OUT, as a full port refuses a send with a zero timeout), proxies
by its task's port_names_max, out-of-line memory by its ool_queued_max; packets not yet
taken by the transport's flow control (the sink's backlog, net/transport.py).

Send rights cross hosts. A receive or ownership right sent to a remote port is not
carried across in this version: the server gives it up at once, which hands it back to
its owner under the usual rules (NOTIFY_RECEIVE_RIGHTS). A Code item (a callable) does
not cross hosts: such a message is refused with SEND_INVALID_TYPE.

State belongs to the server's thread; the export tables are also used by the threads
that forward messages with remote-backed memory, under `lock`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from pymach import mach
from pymach.errors import MachError, ThreadTerminated
from pymach.include.message import (
    OOL,
    RCV_TIMEOUT,
    SEND_TIMEOUT,
    Bytes,
    Disposition,
    Float,
    Int,
    IntArray,
    Item,
    Message,
    Port,
    PortArray,
    Str,
)
from pymach.include.mig import REPLY_ID_OFFSET, REPLY_SIZE_ANY, serve_message
from pymach.include.netname_defs import netname_defs
from pymach.include.wire import WireError
from pymach.ipc.ipc_notify import NOTIFY_OVERFLOW, NOTIFY_PORT_DELETED
from pymach.kern.thread import current_thread
from pymach.mach_vm import take_ool
from pymach.net.packets import (
    MAX_NETNAME,
    DeadPacket,
    MsgPacket,
    NamePacket,
    NetItem,
    OolData,
    Packet,
    PortRef,
    PortRefs,
    Ref,
    UnnamePacket,
    decode_packet,
    encode_packet,
    new_net_id,
)
from pymach.net.transport import NetTransport

# Messages the kernel queues on the wire port for transport events (net/station.py)
PACKET_ID = 1200  # [Str source host, Bytes packet]
HOST_UP_ID = 1201  # [Str host]
HOST_DOWN_ID = 1202  # [Str host]
log = logging.getLogger("pymach.net")
_RIGHTS_KEPT_HERE = (Disposition.MOVE_RECEIVE, Disposition.MOVE_OWNERSHIP, Disposition.MOVE_ALL)
_PLAIN_ITEMS = (Int, Float, Bytes, Str, IntArray)
MAX_NAMES = 16384  # entries in a replica of the netname registry
NET_QUEUE_MAX = 1024  # messages from the network queued on one local port


class NetMsgServer:
    """One host's network message server (see module docstring)."""

    def __init__(self, transport: NetTransport) -> None:
        self.transport = transport
        self.host = transport.host
        self.exported: dict[int, bytes] = {}  # our name for a local port -> network id
        self.by_id: dict[bytes, int] = {}  # network id -> our name for the local port
        self.proxies: dict[Ref, int] = {}  # remote port -> our proxy's name
        self.proxy_ref: dict[int, Ref] = {}  # proxy name -> remote port
        self.names: dict[str, Ref] = {}  # this host's replica of the netname registry
        self.own_names: dict[str, Ref] = {}  # names checked in here (told to newcomers)
        self.peers: set[str] = set()  # hosts the transport reported up
        self.service = self.wire = self.notify = 0
        self.lock = threading.Lock()  # guards the export tables against forwarding threads
        self.forwarded = self.delivered = self.bad_packets = 0
        self.bytes_in = 0  # packet bytes taken from the wire port (the sink's backlog)

    # -- the loop ---------------------------------------------------------------------
    def run(self, service: int, wire: int) -> None:
        """Serve forever: proxies, packets, name service and notifications."""
        self.service, self.wire, self.notify = service, wire, mach.task_notify()
        me = mach.task_self()
        for port in (service, wire, self.notify):
            mach.port_enable(me, port)
        while True:
            msg = mach.msg_receive(rcv_size=REPLY_SIZE_ANY)  # a packet may be 64 MiB
            try:
                self._handle(msg)
            except ThreadTerminated:
                raise
            except Exception:  # one bad message must not take the host off the network
                log.exception("netmsgserver %s: could not handle message %d", self.host,
                              msg.id)
                self._refuse(msg.remote_port, msg.id, "SEND_INVALID_TYPE",
                             "the network could not carry this message")

    def _handle(self, msg: Message) -> None:
        if msg.local_port == self.wire:
            self._wire_event(msg)
        elif msg.local_port == self.notify:
            if msg.id == NOTIFY_PORT_DELETED and isinstance(msg.items[0], Int):
                self._port_died(msg.items[0].value)
            elif msg.id == NOTIFY_OVERFLOW:  # deaths went unheard: find them by looking
                with self.lock:
                    known = [*self.exported, *self.proxy_ref]
                for name in mach.names_gone(known):
                    self._port_died(name)
        elif msg.local_port == self.service:
            reply = serve_message(netname_defs, self, msg)
            if reply is not None:
                self._send_local(reply)
        elif msg.local_port in self.proxy_ref:
            self.forward(msg, self.proxy_ref[msg.local_port])

    def _wire_event(self, msg: Message) -> None:
        """A transport event the kernel queued on the wire port (see PACKET_ID)."""
        values = msg.values()
        host = values[0] if values and isinstance(values[0], str) else None
        if host is not None and msg.id == PACKET_ID and len(values) == 2 \
                and isinstance(values[1], bytes):
            self.packet_in(host, values[1])
        elif host is not None and msg.id == HOST_UP_ID and len(values) == 1:
            self.host_up(host)
        elif host is not None and msg.id == HOST_DOWN_ID and len(values) == 1:
            self.host_down(host)
        else:
            log.warning("netmsgserver %s: malformed wire event %d", self.host, msg.id)

    # -- outbound ---------------------------------------------------------------------
    def forward(self, msg: Message, target: Ref) -> None:
        """Send a message that arrived on a proxy to the host of the real port. One whose
        out-of-line memory needs a data manager's pages is encoded by a thread of its own
        (reading it could wait for a request that only this loop can forward), and may
        then arrive after messages sent later; every other message keeps its order.
        A message with an item that cannot cross (a Code item) is refused with
        SEND_INVALID_TYPE."""
        bad = [type(i).__name__ for i in msg.items
               if not isinstance(i, (*_PLAIN_ITEMS, Port, PortArray, OOL))]
        if bad:
            log.warning("netmsgserver %s: refused message %d: a %s item cannot cross hosts",
                        self.host, msg.id, bad[0])
            self._refuse(msg.remote_port, msg.id, "SEND_INVALID_TYPE",
                         f"a {bad[0]} item cannot cross hosts")
            return
        if any(isinstance(i, OOL) and i.size and not self._readable_now(i) for i in msg.items):
            mach.thread_create(mach.task_self(), self._forward_now, msg, target)
            return
        self._forward_now(msg, target)

    def _readable_now(self, item: OOL) -> bool:
        from pymach.vm.vm_kern import range_readable_now  # loaded with a kernel, not pymach

        thread = current_thread()
        with thread.kernel.trap(thread):  # the server is part of this host's kernel side
            vmap = thread.task.map
            return vmap is not None and range_readable_now(vmap, item.address, item.size)

    def _forward_now(self, msg: Message, target: Ref) -> None:
        """Encode `msg` as a MSG packet for port `target`; refuse it if the host is gone."""
        reply = self.ref_of(msg.remote_port) if msg.remote_port else None
        packet = MsgPacket(target[1], msg.id, reply, tuple(self._encode(i) for i in msg.items))
        self.forwarded += 1
        if not self._send(target[0], packet):
            self._refuse(msg.remote_port, msg.id, "MIG_SERVER_DIED",
                         f"host {target[0]!r} cannot be reached")

    def ref_of(self, name: int) -> Ref:
        """The network reference for a port we hold a send right to (exporting it)."""
        with self.lock:  # forwarding threads export too (no Mach call is made under it)
            if name in self.proxy_ref:
                return self.proxy_ref[name]
            if name not in self.exported:
                net_id = new_net_id()
                self.exported[name], self.by_id[net_id] = net_id, name
            return (self.host, self.exported[name])

    def _encode(self, item: Item) -> NetItem:
        if isinstance(item, Port):
            return PortRef(self._right(item.name, item.disposition))
        if isinstance(item, PortArray):
            return PortRefs(tuple(self._right(n, item.disposition) for n in item.names))
        if isinstance(item, OOL):
            return OolData(take_ool(item))
        if isinstance(item, _PLAIN_ITEMS):
            return item
        raise MachError("SEND_INVALID_TYPE", f"a {type(item).__name__} item cannot cross hosts")

    def _right(self, name: int, kind: Disposition) -> Ref | None:
        if not name:
            return None
        if kind in _RIGHTS_KEPT_HERE:  # not carried across: give it back (see docstring)
            mach.port_deallocate(mach.task_self(), name)
            return None
        return self.ref_of(name)

    def _send(self, host: str, packet: Packet) -> bool:
        """Send `packet` to `host` (to ourselves without the network); False if the
        transport knows it cannot be delivered. WireError if it cannot be encoded."""
        data = encode_packet(packet)
        if host == self.host:
            self._dispatch(host, packet)
            return True
        return self.transport.send(host, data)

    def _broadcast(self, packet: Packet) -> None:
        """Send `packet` to every host the transport reported up."""
        data = encode_packet(packet)
        for peer in sorted(self.peers):
            self.transport.send(peer, data)

    # -- inbound ------------------------------------------------------------------------
    def packet_in(self, source: str, data: bytes) -> None:
        """Bytes from host `source`: act on the packet, or refuse and log a bad one."""
        self.bytes_in += len(data)
        try:
            self._dispatch(source, decode_packet(data))
        except WireError as e:
            self.bad_packets += 1
            log.warning("netmsgserver %s: refused a packet from %r: %s", self.host, source,
                        e.detail)
            self.transport.disconnect(source, f"it sent a bad packet ({e.detail})")

    def _dispatch(self, source: str, packet: Packet) -> None:
        if isinstance(packet, MsgPacket):
            self._deliver(source, packet)
        elif isinstance(packet, DeadPacket):
            dead = (source, packet.port)
            self._forget_proxy(dead)
            self._drop_names(lambda ref: ref == dead)
        elif isinstance(packet, NamePacket):
            if packet.name not in self.names and len(self.names) >= MAX_NAMES:
                log.warning("netmsgserver %s: refused name %r from %r: the registry holds "
                            "%d names", self.host, packet.name[:64], source, MAX_NAMES)
                return
            self.names[packet.name] = packet.ref
            self.own_names.pop(packet.name, None)  # the later check-in elsewhere wins
        else:
            self.names.pop(packet.name, None)
            self.own_names.pop(packet.name, None)

    def _deliver(self, source: str, packet: MsgPacket) -> None:
        """A message for one of our exported ports (failing the call if it died)."""
        dest = self.by_id.get(packet.dest)
        if dest is None:  # the port died meanwhile: tell the sender's host, fail the call
            self._send(source, DeadPacket(packet.dest))
            self._fail_remote(packet, "MIG_SERVER_DIED",
                              "the destination port died before the request reached it")
            return
        if self._queued(dest) >= NET_QUEUE_MAX:  # the network may not fill a port
            log.warning("netmsgserver %s: refused message %d from %r: its port holds %d "
                        "messages", self.host, packet.msg_id, source, NET_QUEUE_MAX)
            self._fail_remote(packet, "SEND_TIMED_OUT", f"the port stayed full "
                              f"({NET_QUEUE_MAX} messages from the network)")
            return
        reply, reply_disp = self._local(packet.reply)
        msg = Message(remote_port=dest, local_port=reply, id=packet.msg_id,
                      items=[self._decode(i) for i in packet.items],
                      local_disposition=reply_disp if reply else None)
        self._send_local(msg)

    def _fail_remote(self, packet: MsgPacket, code: str, detail: str) -> None:
        """Answer a request from another host that will not be delivered with an error
        reply (as _refuse does for a local one); nothing if it has no reply port."""
        if packet.reply is not None:
            self._send(packet.reply[0], MsgPacket(
                packet.reply[1], packet.msg_id + REPLY_ID_OFFSET, None,
                (Int(MachError(code).value), Str(detail))))

    def _queued(self, name: int) -> int:
        """Messages queued on the local port we name `name` (0 if we name none)."""
        thread = current_thread()
        with thread.kernel.trap(thread):  # the server is part of this host's kernel side
            entry = thread.task.space.names.get(name)
            port = entry.port if entry is not None else None
            return len(port.queue) if port is not None else 0

    def _local(self, ref: Ref | None) -> tuple[int, Disposition]:
        """Our name for a referenced port and the disposition that gives a send right."""
        if ref is None:
            return 0, Disposition.COPY_SEND
        if ref[0] == self.host:
            name = self.by_id.get(ref[1], 0)
            return name, Disposition.COPY_SEND
        return self._proxy(ref), Disposition.MAKE_SEND

    def _proxy(self, ref: Ref) -> int:
        name = self.proxies.get(ref)
        if name is None:
            me = mach.task_self()
            name = mach.port_allocate(me)
            mach.port_enable(me, name)
            self.proxies[ref], self.proxy_ref[name] = name, ref
        return name

    def _decode(self, item: NetItem) -> Item:
        if isinstance(item, PortRef):
            name, disp = self._local(item.ref)
            return Port(name, disp) if name else Port(0, Disposition.COPY_SEND)
        if isinstance(item, PortRefs):
            rights = [self._local(r) for r in item.refs]
            return PortArray(tuple(n for n, _ in rights), Disposition.COPY_SEND)
        if isinstance(item, OolData):
            return OOL(data=item.data)
        return item

    def _send_local(self, msg: Message) -> None:
        """Deliver a message locally (never held back by a backlog: see docstring)."""
        try:
            mach.msg_send(msg)
        except MachError as e:
            # The port (or a port it carries) died just now: whoever waits for an answer
            # must get one.
            self._refuse(msg.local_port, msg.id,
                         "MIG_SERVER_DIED" if e.code == "SEND_INVALID_PORT" else e.code, e.detail)
            return
        self.delivered += 1

    def _refuse(self, reply: int, request_id: int, code: str = "MIG_SERVER_DIED",
                detail: str = "") -> None:
        """Answer a request that cannot be delivered with an error reply on `reply` (a
        received message's `remote_port`, or the `local_port` of one we deliver)."""
        if not reply:
            return
        items: list[Any] = [Int(MachError(code).value),
                            Str(detail or "the destination port died before the request "
                                "reached it")]
        with contextlib.suppress(MachError):
            mach.msg_send(Message(remote_port=reply, id=request_id + REPLY_ID_OFFSET,
                                  items=items), SEND_TIMEOUT, 0)

    # -- port and host death ------------------------------------------------------------
    def _port_died(self, name: int) -> None:
        with self.lock:
            net_id = self.exported.pop(name, None)
            if net_id is not None:
                del self.by_id[net_id]
        if net_id is not None:
            dead = (self.host, net_id)
            self._drop_names(lambda ref: ref == dead)
            self._broadcast(DeadPacket(net_id))
        ref = self.proxy_ref.pop(name, None)
        if ref is not None:
            self.proxies.pop(ref, None)

    def _forget_proxy(self, ref: Ref) -> None:
        name = self.proxies.pop(ref, None)
        if name is None:
            return
        del self.proxy_ref[name]
        while True:  # requests still queued on the proxy will never be delivered
            try:
                msg = mach.msg_receive(name, RCV_TIMEOUT, 0)
            except MachError:
                break
            self._refuse(msg.remote_port, msg.id)
            for item in msg.items:  # what it carried into our space goes too
                if isinstance(item, OOL) and item.size:
                    mach.vm_deallocate(mach.task_self(), item.address, item.size)
        mach.port_deallocate(mach.task_self(), name)  # the proxy dies here too

    def _drop_names(self, match: Callable[[Ref], bool]) -> None:
        """Forget every registration whose port `match`es (it died or is unreachable)."""
        for table in (self.names, self.own_names):
            for name in [n for n, ref in table.items() if match(ref)]:
                del table[name]

    def host_up(self, host: str) -> None:
        """The transport reached `host`: tell it the names checked in here."""
        if host == self.host:
            return
        self.peers.add(host)
        for name, ref in list(self.own_names.items()):
            self._send(host, NamePacket(name, ref))

    def host_down(self, host: str) -> None:
        """`host` is unreachable: its ports are dead to us (proxies and names go)."""
        self.peers.discard(host)
        for ref in [r for r in self.proxies if r[0] == host]:
            self._forget_proxy(ref)
        self._drop_names(lambda ref: ref[0] == host)

    # -- the network's name service -----------------------------------------------------
    def netname_check_in(self, _server: int, name: str, port: int) -> None:
        if not name or not port or len(name) > MAX_NETNAME:
            raise MachError("KERN_INVALID_ARGUMENT",
                            f"netname_check_in needs a port and a name of 1 to "
                            f"{MAX_NETNAME} characters")
        if name not in self.names and len(self.names) >= MAX_NAMES:
            raise MachError("KERN_RESOURCE_SHORTAGE", f"the network's registry holds "
                            f"{MAX_NAMES} names")
        ref = self.ref_of(port)
        self.names[name] = self.own_names[name] = ref
        self._broadcast(NamePacket(name, ref))

    def netname_look_up(self, _server: int, name: str) -> int:
        ref = self.names.get(name)
        if ref is None:
            raise MachError("KERN_INVALID_NAME", f"no port is checked in as {name!r}")
        local, _ = self._local(ref)
        if not local:
            raise MachError("KERN_INVALID_NAME", f"the port checked in as {name!r} died")
        return local

    def netname_check_out(self, _server: int, name: str) -> None:
        if self.names.pop(name, None) is None:
            raise MachError("KERN_INVALID_NAME", f"no port is checked in as {name!r}")
        self.own_names.pop(name, None)
        self._broadcast(UnnamePacket(name))

