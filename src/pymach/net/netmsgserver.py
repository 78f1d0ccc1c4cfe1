"""The network message server: ports that span hosts (paper 3.2, 4.2).

Mach makes a remote port look local: each host runs a *netmsgserver* task that holds a
local *proxy* port for every remote port its tasks know, forwards what is sent to a
proxy over the network, and delivers what arrives to the real port. This is that
server, one task per host, one thread:

- a message arriving on a proxy is encoded (port rights become network references
  (host, id), out-of-line memory becomes bytes) and sent as a packet to the host of
  the real port; a packet arriving on the *wire port* is decoded (references become the
  real local port or a proxy) and sent on locally. The server's task is unthrottled:
  a full local queue does not hold it back, so the messages of one host are queued in
  the order that host sent them (data managers rely on this: a kernel's
  pager_data_write always precedes its later replies), and a slow receiver never
  stalls the network;
- the server also is the network's name service (netname_check_in / netname_look_up on
  its service port, which is every task's bootstrap port on the host), with one
  registry shared by the network;
- when a port that other hosts know dies, those hosts destroy their proxies, so their
  tasks get NOTIFY_PORT_DELETED as for a local port. A request that can no longer be
  delivered (its port died while it travelled, or it waited on a proxy being destroyed)
  is answered with a MIG_SERVER_DIED reply when it has a reply port, so a remote
  procedure call fails instead of waiting forever.

Send rights cross hosts. A receive or ownership right sent to a remote port is not
carried across in this version: the server gives it up at once, which hands it back to
its owner under the usual rules (NOTIFY_RECEIVE_RIGHTS).

State belongs to the server's thread; the export tables are also used by the threads
that forward messages with remote-backed memory, under `lock`.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import threading
from typing import TYPE_CHECKING, Any

from pymach import mach
from pymach.errors import MachError, ThreadTerminated
from pymach.include.message import (
    OOL,
    RCV_TIMEOUT,
    SEND_TIMEOUT,
    Disposition,
    Int,
    Message,
    Port,
    PortArray,
    Str,
)
from pymach.ipc.ipc_notify import NOTIFY_PORT_DELETED
from pymach.kern.mig import REPLY_ID_OFFSET, serve_message
from pymach.mach_vm import take_ool
from pymach.net.netname import netname_defs

if TYPE_CHECKING:
    from pymach.net.network import Network

PACKET_ID = 1200  # a packet from the network, on the wire port
log = logging.getLogger("pymach.net")
Ref = tuple[str, int]  # (host, network id) of a port
_RIGHTS_KEPT_HERE = (Disposition.MOVE_RECEIVE, Disposition.MOVE_OWNERSHIP, Disposition.MOVE_ALL)


class NetMsgServer:
    """One host's network message server (see module docstring)."""

    def __init__(self, network: Network, host: str) -> None:
        self.network = network
        self.host = host
        self.next_id = 1
        self.exported: dict[int, int] = {}  # our name for a local port -> network id
        self.by_id: dict[int, int] = {}  # network id -> our name for the local port
        self.proxies: dict[Ref, int] = {}  # remote port -> our proxy's name
        self.proxy_ref: dict[int, Ref] = {}  # proxy name -> remote port
        self.service = self.wire = self.notify = 0
        self.lock = threading.Lock()  # guards the export tables against forwarding threads
        self.forwarded = self.delivered = 0

    # -- the loop ---------------------------------------------------------------------
    def run(self, service: int, wire: int) -> None:
        """Serve forever: proxies, packets, name service and notifications."""
        self.service, self.wire, self.notify = service, wire, mach.task_notify()
        me = mach.task_self()
        for port in (service, wire, self.notify):
            mach.port_enable(me, port)
        while True:
            msg = mach.msg_receive()
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
            self.packet_in(pickle.loads(msg.items[0].value))  # type: ignore[arg-type]
        elif msg.local_port == self.notify:
            if msg.id == NOTIFY_PORT_DELETED and isinstance(msg.items[0], Int):
                self._port_died(msg.items[0].value)
        elif msg.local_port == self.service:
            reply = serve_message(netname_defs, self, msg)
            if reply is not None:
                self._send_local(reply)
        elif msg.local_port in self.proxy_ref:
            self.forward(msg, self.proxy_ref[msg.local_port])

    # -- outbound ---------------------------------------------------------------------
    def forward(self, msg: Message, target: Ref) -> None:
        """Send a message that arrived on a proxy to the host of the real port. One whose
        out-of-line memory needs a data manager's pages is encoded by a thread of its own
        (reading it could wait for a request that only this loop can forward), and may
        then arrive after messages sent later; every other message keeps its order."""
        if any(isinstance(i, OOL) and i.size and not self._readable_now(i) for i in msg.items):
            mach.thread_create(mach.task_self(), self._forward_now, msg, target)
            return
        self._forward_now(msg, target)

    def _readable_now(self, item: OOL) -> bool:
        from pymach.kern.thread import current_thread
        from pymach.vm.vm_kern import range_readable_now

        thread = current_thread()
        with thread.kernel.trap(thread):  # the server is part of this host's kernel side
            vmap = thread.task.map
            return vmap is not None and range_readable_now(vmap, item.address, item.size)

    def _forward_now(self, msg: Message, target: Ref) -> None:
        packet = {"kind": "msg", "from": self.host, "dest": target[1], "id": msg.id,
                  "reply": self.ref_of(msg.remote_port) if msg.remote_port else None,
                  "items": [self._encode(item) for item in msg.items]}
        self.forwarded += 1
        self.network.send(target[0], packet)

    def ref_of(self, name: int) -> Ref:
        """The network reference for a port we hold a send right to (exporting it)."""
        with self.lock:  # forwarding threads export too (no Mach call is made under it)
            if name in self.proxy_ref:
                return self.proxy_ref[name]
            if name not in self.exported:
                self.exported[name] = self.next_id
                self.by_id[self.next_id] = name
                self.next_id += 1
            return (self.host, self.exported[name])

    def _encode(self, item: Any) -> Any:
        if isinstance(item, Port):
            return ("port", self._right(item.name, item.disposition))
        if isinstance(item, PortArray):
            return ("ports", [self._right(n, item.disposition) for n in item.names])
        if isinstance(item, OOL):
            return ("ool", take_ool(item))
        return ("item", item)

    def _right(self, name: int, kind: Disposition) -> Ref | None:
        if not name:
            return None
        if kind in _RIGHTS_KEPT_HERE:  # not carried across: give it back (see docstring)
            mach.port_deallocate(mach.task_self(), name)
            return None
        return self.ref_of(name)

    # -- inbound ------------------------------------------------------------------------
    def packet_in(self, packet: dict[str, Any]) -> None:
        """A packet from another host: a message to deliver, or a port's death."""
        if packet["kind"] == "dead":
            self._forget_proxy((packet["host"], packet["id"]))
            return
        dest = self.by_id.get(packet["dest"])
        if dest is None:  # the port died meanwhile: tell the sender's host, fail the call
            self.network.send(packet["from"], {"kind": "dead", "host": self.host,
                                               "id": packet["dest"]})
            if packet["reply"] is not None:
                host, reply_id = packet["reply"]
                self.network.send(host, {"kind": "msg", "from": self.host, "dest": reply_id,
                                         "id": packet["id"] + REPLY_ID_OFFSET, "reply": None,
                                         "items": [("item", i) for i in _server_died()]})
            return
        reply, reply_disp = self._local(packet["reply"])
        msg = Message(remote_port=dest, local_port=reply, id=packet["id"],
                      items=[self._decode(i) for i in packet["items"]],
                      local_disposition=reply_disp if reply else None)
        self._send_local(msg)

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

    def _decode(self, enc: tuple[str, Any]) -> Any:
        kind, value = enc
        if kind == "port":
            name, disp = self._local(value)
            return Port(name, disp) if name else Port(0, Disposition.COPY_SEND)
        if kind == "ports":
            rights = [self._local(r) for r in value]
            return PortArray(tuple(n for n, _ in rights), Disposition.COPY_SEND)
        if kind == "ool":
            return OOL(data=value)
        return value

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

    # -- port death ---------------------------------------------------------------------
    def _port_died(self, name: int) -> None:
        net_id = self.exported.pop(name, None)
        if net_id is not None:
            del self.by_id[net_id]
            self.network.unregister((self.host, net_id))
            self.network.broadcast(self.host, {"kind": "dead", "host": self.host,
                                               "id": net_id})
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

    # -- the network's name service -----------------------------------------------------
    def netname_check_in(self, _server: int, name: str, port: int) -> None:
        if not name or not port:
            raise MachError("KERN_INVALID_ARGUMENT", "netname_check_in needs a name and a port")
        self.network.register(name, self.ref_of(port))

    def netname_look_up(self, _server: int, name: str) -> int:
        ref = self.network.look_up(name)
        if ref is None:
            raise MachError("KERN_INVALID_NAME", f"no port is checked in as {name!r}")
        local, _ = self._local(ref)
        if not local:
            raise MachError("KERN_INVALID_NAME", f"the port checked in as {name!r} died")
        return local

    def netname_check_out(self, _server: int, name: str) -> None:
        if not self.network.check_out(name):
            raise MachError("KERN_INVALID_NAME", f"no port is checked in as {name!r}")


def _server_died() -> list[Any]:
    """The items of a MIG error reply: the port died before the request reached it."""
    return [Int(MachError("MIG_SERVER_DIED").value),
            Str("the destination port died before the request reached it")]
