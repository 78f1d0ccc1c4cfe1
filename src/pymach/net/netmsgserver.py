"""The network message server: ports that span hosts (paper 3.2, 4.2).

Mach makes a remote port look local: each host runs a *netmsgserver* task that holds a
local *proxy* port for every remote port its tasks know, forwards what is sent to a
proxy over the network, and delivers what arrives to the real port. This is that
server, one task per host, served by one thread at a time. It reaches other hosts only
through a `NetTransport` (net/transport.py: bytes to a host, in order per pair of hosts),
whose events the kernel queues on the server's *wire port*, for `run`'s thread; over a
transport with a thread of its own (TCP) that thread serves instead, both its events and
the server's messages (net/station.py); what travels is the typed packets of
net/packets.py, never pickles.

- a message arriving on a proxy is encoded (port rights become network references
  (host, unguessable id) or moved rights, see below; out-of-line memory becomes bytes,
  or, from COR_MIN bytes, a memory object this server serves: net/cor.py, whose
  docstring says when) and sent as a MSG packet to
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
- the server carries task migration's state messages (net/migration.py): a local
  migrator's request on the service port goes to the reserved id MIGRATE_NET_ID on the
  host it names, stamped with the sender's uid from this kernel's trailer, and what
  arrives for that id goes to this host's migration server (`migration`), whose port
  only this server can send to;
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
taken by the transport's flow control (the sink's backlog, net/transport.py); memory
kept for another host by net/cor.py's COR_HOST_MAX; forwarding entries by MAX_FORWARDS;
messages held for a receive right coming back by NET_QUEUE_MAX.

Every right crosses hosts (paper 3.2: "a port may have any number of senders but only
one receiver"; the port, not the host, is what senders name):

- **Where a port lives.** A network reference is (host, id): the host that holds the
  receive right *as the sender of the reference knew it*, and an id that host gave the
  port. Ids are per host: a receive right that lands on a host gets a new id there,
  chosen by the host that sends it (checked unused where it lands), and the host it
  left keeps a *forwarding entry* old id -> (new host, new id). So a reference never has
  to be right, only to lead to the port, and a peer cannot claim someone else's port by
  naming its id (what it moves is always a new port where it lands, see "Lies"). A
  server hands out only references that lead to the port *now*: its own ids (a port's
  forwarding id included: a port that just left is named by it, since a third host
  could otherwise reach the new host before the right does) and routes it learned
  from a reference or from the port's host itself (FLUSHED).
- **Moving a receive right** (MOVE_RECEIVE, MOVE_ALL, in a Port or PortArray item):
  the server that got the right from a local task takes every message queued on the
  port, turns the port into a proxy for (destination host, new id) (so local senders
  keep their names and now reach the new receiver), sends the carrying message (its
  item is a RightItem: old reference, new id, where ownership is, the port's backlog),
  then the queued messages as MSG packets for the new id, then MOVED [old id] to every
  host. Where it lands, the server makes a new port with that id, queues nothing ahead
  of what follows on the same link, and hands the receive right to the task the message
  is for. A host that only relays the carrying message (the destination's own port
  moved on) records a forwarding entry for the new id too, so the queued messages that
  follow go the same way. The old host forwards every later MSG for the old id (the
  packet is passed on unchanged, re-addressed) and answers its sender with MOVED.
- **Per-sender order across a move** (the argument). Links are FIFO per pair of hosts
  and each server handles its packets one at a time. (1) A sender on the old host: its
  messages queued before the move travel right behind the carrying message; later ones
  reach the proxy, which forwards them on the same link afterwards. (2) A sender on any
  other host H (the new host included) reaches the port through a proxy routed at the
  old reference. When H hears MOVED from that route (or, on the new host, as soon as the
  right lands), it *holds* the proxy (disables it: its messages wait in the proxy's own
  queue, under its backlog) and sends FLUSH [id, H, nonce] along the old route. Every
  message H sent that way precedes the FLUSH on the H->old link; the old host forwards
  both in that order on its link to the next host, and so on to where the port lives
  (forwarding preserves order hop by hop). When the FLUSH arrives there, every message
  H sent along the old path is queued on the port, so the home answers FLUSHED [id,
  nonce] and H retargets the proxy at the home and releases it: what it sends from now
  on is queued after. (A proxy whose message a forwarding thread is still encoding is
  held only at the next MOVED, so its FLUSH follows that message too; a proxy routed at
  an older reference goes through the older hosts, in order, until MOVED comes from
  the route it uses.) A proxy on the new host becomes a local relay (its senders keep
  their names; the server passes their messages on without the network). (3) When a
  receive right comes back to the host of its owner (below), the owner's proxy itself
  becomes the port: what arrives for it is kept until that host's own FLUSH comes back,
  then queued *in front of* what local senders queued meanwhile in one kernel entry
  (net/portops.py), and only then is the receive right handed to the owner.
  The order between different senders is, as on one host, the order of arrival.
- **Ownership** (MOVE_OWNERSHIP, and a receive right moved without it). Where the
  receive right is and where ownership is may differ: the receiving host's server then
  holds the port's ownership itself and remembers (owner host, token), a random secret;
  on the owner's host a task owns the local proxy, and the server knows the token. The
  rules of ipc/ipc_right.py then hold across hosts: an owner that gives ownership up
  (or dies) makes its server send DISOWN [id, token] to the port's host, which passes
  ownership to the receiver (NOTIFY_OWNERSHIP_RIGHTS); a receiver that gives its
  receive right up (or dies) makes the kernel hand it to the owner (the server), which
  sends it to the owner's host (RECEIVE packet, then its queued messages); there the
  owner's proxy becomes the port ((3) above) and the owner gets NOTIFY_RECEIVE_RIGHTS.
  Ownership moved on to another host is announced to the port's host with OWNER [id,
  token, new host]. Without an owner anywhere, giving up the receive right destroys the
  port, as on one host.
- **Death.** A port that dies on its host is announced with DEAD to every host (as
  before); a host with a forwarding entry to it drops the entry and announces its old
  id dead too, so holders on every path get NOTIFY_PORT_DELETED. A host that goes down
  takes with it the ports that live there, and the forwarding entries that lead there
  (announced dead the same way); an owner on it gives ownership back to the receiver.
  A port whose path to it runs through a host that dies before a holder switched to the
  new route dies for that holder (the right moved on, but the holder cannot know where).
- **Lies** (refused, logged, counted in `refused_rights`; they hurt only the liar's own
  messages): a right that lands under an id already in use here arrives as PORT_NULL;
  ownership without the right token, DISOWN or OWNER with a wrong token, a RECEIVE for
  an owner that is not here, a FLUSHED that answers no FLUSH of ours are ignored; MSG or
  FLUSH for an unknown id get DEAD back. Since a moved right becomes a new port where it
  lands, a host that "moves" a port it does not hold just gives away a new port of its
  own; proxies here for the real port flush along their own route and are told the
  truth by the real port's host.
- **What holds across hosts.** Per-sender order (above). The backlog of the moved port
  moves with it. A sender on another host sends to its local proxy, whose backlog and
  the sender's SEND_TIMEOUT mean what they mean locally; the proxy drains as fast as the
  network takes packets, except while it is held: for a flush, or because the real
  port is full. A server that queues a message from host H on a local port that is then
  full (queued >= backlog) sends CHOKE [id, backlog] to H (again for each message that
  still comes: H's proxy may have been routed elsewhere when the last one arrived),
  whose server sets its proxies for that port to that backlog and stops taking from
  them: H's senders then wait, or time out with SEND_TIMED_OUT, as at the port itself.
  The full port is looked at every CHOKE_POLL_MS while it is full (the loop receives
  with that timeout, or a ticker wakes the transport's thread, net/station.py);
  once it has room, READY [id] goes to every host told, and their proxies go on (as
  they do when the port dies, DEAD, or moves away, MOVED). Messages on their way when
  the CHOKE left are still queued (a server does not wait), up to NET_QUEUE_MAX (beyond
  it the message fails with SEND_TIMED_OUT, as a full port with a zero timeout). How
  many are on their way is bounded too: each proxy may have at most WINDOW of its
  messages sent and not yet taken by the host it sends to (net/window.py: every
  ASK_EVERY-th MSG asks for an ACK; a relaying host passes asks on and ACKs back), so
  a host slow to take packets, or relaying for a port that moved, is handed at most
  the port's backlog plus WINDOW per proxy sending to it (before the window a busy
  relay could be handed any number, and the surplus was lost after its senders'
  msg_send had returned). Messages a proxy queues behind a forwarding thread count in
  its window (past it they wait, `_window_blocked`), and a packet held for a port
  coming back here is answered when the port is here. On a lossy `Network(drop=p)` a
  lost ask or ACK holds its proxy until its route changes.
  Receive timeouts are local to the receiver, as always. Forwarding
  entries are kept for the MAX_FORWARDS most recent moves (an older entry is dropped:
  its port looks dead to a holder that had not yet switched).
- **API for migration** (issue 11 item 6): a receive right moves to host H when a task
  sends it (Port(name, MOVE_RECEIVE) or MOVE_ALL, or a PortArray of them) in a message
  to any port on H, typically the new task's own port there: what lands is the same
  port for every sender, with its queue and backlog; nothing else is needed.
  `where(name)` says on which host this server believes the port it names lives, and
  `moves_out` / `moves_in` / `relayed` count moves and forwarded messages.

Not supported: a message that moves a receive right *and* carries out-of-line memory a
data manager must page in first is encoded by the server's own loop (the forwarding
thread is only for messages without moved rights), so that memory must not be backed
by a data manager reached through this same server. The transport's contract is
assumed (in order, or the host is reported down): on a lossy `Network(drop=p)` a lost
FLUSH or FLUSHED holds its proxies until the route's host goes down. A message
waiting behind a forwarding thread on a proxy that becomes the port itself (its
receive right came back to its owner here) in that moment is refused.

A Code item (a callable) does not cross hosts: such a message is refused with
SEND_INVALID_TYPE.

State belongs to the one thread that serves (`run`'s, or the transport's: it handles one
message or one transport event at a time); the export tables and `alias` are also used by
the threads that forward messages with remote-backed memory, under `lock` (those threads
never move rights: a message that moves one is encoded by the loop).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from pymach import mach
from pymach.errors import MachError, ThreadTerminated
from pymach.include.mach_defs import memory_object_defs, pager_defs
from pymach.include.message import (
    OOL,
    PORT_BACKLOG_MAX,
    PORT_NULL,
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
from pymach.include.vm_param import VM_PROT_NONE
from pymach.include.wire import WireError
from pymach.ipc.ipc_notify import (
    NOTIFY_OVERFLOW,
    NOTIFY_OWNERSHIP_RIGHTS,
    NOTIFY_PORT_DELETED,
    NOTIFY_RECEIVE_RIGHTS,
)
from pymach.kern.thread import current_thread
from pymach.mach_vm import take_ool, vm_page_size
from pymach.net import portops
from pymach.net.cor import COR_MIN, CorPager, Fill
from pymach.net.migration import MSG_ID_TASK_CHECK, MSG_ID_TASK_STATE, refusal
from pymach.net.packets import (
    MAX_NETNAME,
    MIGRATE_NET_ID,
    AckPacket,
    ChokePacket,
    CorItem,
    DeadPacket,
    DisownPacket,
    FlushedPacket,
    FlushPacket,
    MovedPacket,
    MsgPacket,
    NamePacket,
    NetItem,
    OolData,
    OwnerPacket,
    Packet,
    PageInPacket,
    PagePacket,
    PortRef,
    PortRefs,
    ReadyPacket,
    ReceivePacket,
    Ref,
    RightItem,
    RightItems,
    UnnamePacket,
    decode_packet,
    encode_packet,
    new_net_id,
    page_head,
)
from pymach.net.pending import PendingCalls
from pymach.net.routes import Indexed
from pymach.net.transport import NetTransport
from pymach.net.window import ProxyWindows, RelayAcks

# Messages the kernel queues on the wire port for transport events (net/station.py)
PACKET_ID = 1200  # [Str source host, Bytes packet]
HOST_UP_ID = 1201  # [Str host]
HOST_DOWN_ID = 1202  # [Str host]
log = logging.getLogger("pymach.net")
_MOVES = (Disposition.MOVE_RECEIVE, Disposition.MOVE_OWNERSHIP, Disposition.MOVE_ALL)
_PLAIN_ITEMS = (Int, Float, Bytes, Str, IntArray)
MAX_NAMES = 16384  # entries in a replica of the netname registry
NET_QUEUE_MAX = 1024  # messages from the network queued on one local port
MAX_FORWARDS = 4096  # forwarding entries kept for ports that moved away
CHOKE_POLL_MS = 5  # how often a full port is looked at again while hosts are held off
_PAGER_INIT = memory_object_defs.by_name["pager_init"].id
_FORWARDED_ID = 1203  # [Int proxy]: a forwarding thread sent that proxy's message
_PAGER_DATA_REQUEST = memory_object_defs.by_name["pager_data_request"].id
_PAGER_DATA_PROVIDED = pager_defs.by_name["pager_data_provided"].id
_MIGRATION_IDS = (MSG_ID_TASK_STATE, MSG_ID_TASK_CHECK)  # to another host's migration server
After = list[tuple[str, Packet]]  # packets to send once the message being encoded is sent


@dataclass
class Flush:
    """A FLUSH in flight: the route it follows, the proxies it holds, or the port (our
    name) that is coming back to its owner here (`returning`)."""

    route: Ref
    names: list[int] = field(default_factory=list)
    returning: int = 0


class NetMsgServer:
    """One host's network message server (see module docstring)."""

    def __init__(self, transport: NetTransport) -> None:
        self.transport = transport
        self.host = transport.host
        self.exported: dict[int, bytes] = {}  # our name for a local port -> network id
        self.by_id: dict[bytes, int] = {}  # network id -> our name for the local port
        self.proxies: Indexed[Ref, int] = Indexed()  # remote port (route or alias) -> our
        # proxy (both indexed the other way too: net/routes.py)
        self.proxy_ref: Indexed[int, Ref] = Indexed()  # proxy name -> its route
        self.alias: dict[int, bytes] = {}  # a port that moved away -> its id here (lock)
        self.forward: Indexed[bytes, Ref] = Indexed()  # moved away: old id -> route
        # (oldest first; indexed by route too)
        self.flushes: dict[bytes, Flush] = {}  # nonce -> a FLUSH of ours in flight
        self.held: dict[int, bytes] = {}  # proxy held for a flush -> the flush's nonce
        self.pending: dict[bytes, list[MsgPacket]] = {}  # id coming back -> held packets
        self.held_asks: dict[bytes, list[tuple[str, bytes, int]]] = {}  # id coming back
        # -> the asks of its held packets: (host, ask, count), answered when it is here
        self.remote_owner: dict[bytes, tuple[str, bytes]] = {}  # id -> (owner host, token)
        self.owner_token: dict[int, bytes] = {}  # proxy a task here owns -> its token
        self.owner_moved: OrderedDict[bytes, str] = OrderedDict()  # token -> host it went to
        self.names: Indexed[str, Ref] = Indexed()  # this host's replica of the netname
        # registry (indexed by port too, as is the next)
        self.own_names: Indexed[str, Ref] = Indexed()  # names checked in here (told to
        # newcomers)
        self.peers: set[str] = set()  # hosts the transport reported up
        self.service = self.wire = self.notify = self.done = 0
        self._in_flight: dict[int, list[Message]] = {}  # proxy -> messages waiting for
        # the forwarding thread that encodes an earlier one (the loop's own state)
        self.lock = threading.Lock()  # guards the export tables against forwarding threads
        self.forwarded = self.delivered = self.bad_packets = 0
        self.relayed = self.moves_out = self.moves_in = self.refused_rights = 0
        self.bytes_in = 0  # packet bytes taken from the wire port (the sink's backlog)
        self.bytes_out = 0  # packet bytes handed to the transport
        self.cor = CorPager(self.host, self._cor_send, self._cor_provide)  # regions sent
        self.mapped: set[int] = set()  # our proxies that are memory objects we mapped
        self.open_calls = PendingCalls()  # requests sent to other hosts, unanswered (lock)
        self.migration = 0  # a send right to this host's migration server (0: none)
        self.choked: set[int] = set()  # our proxies held: their port's host said CHOKE
        self.choking: dict[int, tuple[bytes, set[str]]] = {}  # our full port -> (its id,
        # the hosts told CHOKE); polled until it has room (READY)
        self.windows = ProxyWindows()  # messages each proxy has on their way (lock)
        self.windowed: set[int] = set()  # our proxies held: their window is full
        self._window_blocked: set[int] = set()  # proxies whose `_in_flight` messages wait
        # for their window, not for a forwarding thread (the loop's own state)
        self.relay_acks = RelayAcks()  # asks of relayed packets we passed on

    # -- the loop ---------------------------------------------------------------------
    def run(self, service: int, wire: int) -> None:
        """Serve forever: proxies, packets, name service and notifications."""
        self.open(service, wire)
        while True:
            msg = self._next()
            if msg is not None:
                self.serve(msg)

    def open(self, service: int, wire: int) -> None:
        """Take up the service and wire ports; enable them, the task's notify port and
        the port forwarding threads report on (on a thread of the server's task)."""
        self.service, self.wire, self.notify = service, wire, mach.task_notify()
        me = mach.task_self()
        self.done = mach.port_allocate(me)  # forwarding threads say they are done here
        for port in (service, wire, self.notify, self.done):
            mach.port_enable(me, port)

    def serve(self, msg: Message) -> None:
        """Act on one message the server received (from its task's enabled ports)."""
        try:
            self._handle(msg)
        except ThreadTerminated:
            raise
        except Exception:  # one bad message must not take the host off the network
            log.exception("netmsgserver %s: could not handle message %d", self.host, msg.id)
            self._refuse(msg.remote_port, msg.id, "SEND_INVALID_TYPE",
                         "the network could not carry this message")

    def serve_event(self, handler: Callable[..., None], *args: Any) -> None:
        """Run a transport event's handler (`packet_in`, `host_up`, `host_down`) on the
        calling thread, the one that serves messages (`serve`); as for a message, what
        goes wrong is logged and the server goes on."""
        try:
            handler(*args)
        except ThreadTerminated:
            raise
        except Exception:  # one bad event must not take the host off the network
            log.exception("netmsgserver %s: could not handle a transport event", self.host)

    def _next(self) -> Message | None:
        """The next message (a packet may be 64 MiB); while ports here are full, look
        at them every CHOKE_POLL_MS (None then)."""
        if self.choking:
            self.check_choking()
        if not self.choking:
            return mach.msg_receive(rcv_size=REPLY_SIZE_ANY)
        try:
            return mach.msg_receive(PORT_NULL, RCV_TIMEOUT, CHOKE_POLL_MS, REPLY_SIZE_ANY)
        except MachError as e:
            if e.code != "RCV_TIMED_OUT":
                raise
            return None

    def _handle(self, msg: Message) -> None:
        if msg.local_port == self.wire:
            self._wire_event(msg)
        elif msg.local_port == self.notify:
            self._notification(msg)
        elif msg.local_port == self.done and msg.id == _FORWARDED_ID:
            self._forward_waiting(int(msg.values()[0]))
        elif msg.local_port == self.service and msg.id in _MIGRATION_IDS:
            self._migrate_out(msg)
        elif msg.local_port == self.service:
            reply = serve_message(netname_defs, self, msg)
            if reply is not None:
                self._send_local(reply)
        elif msg.local_port in self.mapped and msg.id == _PAGER_DATA_REQUEST \
                and msg.local_port not in self._in_flight:
            self._page_in_out(msg)
        elif msg.local_port in self.proxy_ref:
            self.forward_msg(msg, self.proxy_ref[msg.local_port])

    def _notification(self, msg: Message) -> None:
        name = msg.items[0].value if msg.items and isinstance(msg.items[0], Int) else 0
        if msg.id == NOTIFY_PORT_DELETED:
            self._port_died(name)
        elif msg.id == NOTIFY_RECEIVE_RIGHTS:
            self._receive_given_back(name)
        elif msg.id == NOTIFY_OWNERSHIP_RIGHTS:
            self._ownership_given_back(name)
        elif msg.id == NOTIFY_OVERFLOW:  # deaths went unheard: find them by looking
            with self.lock:
                known = [*self.exported, *self.proxy_ref]
            for gone in mach.names_gone(known):
                self._port_died(gone)
            self._recheck_rights()

    def _recheck_rights(self) -> None:
        """Notifications were lost: find by looking the rights the kernel handed us (a
        receive right given up by a receiver whose owner is elsewhere, ownership given
        up by a task owning one of our proxies)."""
        for net_id in list(self.remote_owner):
            name = self.by_id.get(net_id)
            with contextlib.suppress(MachError):
                if name is not None and _status(name)[3]:
                    self._receive_given_back(name)
        for name in list(self.owner_token):
            if name in self.proxy_ref and portops.owner_of(name) == "server":
                self._ownership_given_back(name)

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
    def forward_msg(self, msg: Message, target: Ref) -> None:
        """Send a message that arrived on a proxy to the host of the real port, in the
        order the proxy got them. One whose out-of-line memory needs a data manager's
        pages (and that moves no receive or ownership right) is encoded by a thread of
        its own (reading it could wait for a request that only this loop can forward);
        the messages that arrive on the same proxy meanwhile wait, and follow it once
        the thread has sent it (`_forward_waiting`). A message with an item that cannot
        cross (a Code item) is refused with SEND_INVALID_TYPE."""
        bad = [type(i).__name__ for i in msg.items
               if not isinstance(i, (*_PLAIN_ITEMS, Port, PortArray, OOL))]
        if bad:
            log.warning("netmsgserver %s: refused message %d: a %s item cannot cross hosts",
                        self.host, msg.id, bad[0])
            self._refuse(msg.remote_port, msg.id, "SEND_INVALID_TYPE",
                         f"a {bad[0]} item cannot cross hosts")
            return
        waiting = self._in_flight.get(msg.local_port)
        if waiting is not None:  # an earlier message of this proxy is being encoded
            waiting.append(msg)  # (or waits for the window)
            self._hold_if_window_full(msg.local_port)
        elif self._needs_thread(msg):
            self._in_flight[msg.local_port] = []
            mach.thread_create(mach.task_self(), self._forward_threaded, msg, target)
        else:
            self._forward_now(msg, target)
            self._hold_if_window_full(msg.local_port)

    def _window_full(self, proxy: int) -> bool:
        """True if WINDOW of `proxy`'s messages are on their way or waiting to go."""
        waiting = len(self._in_flight.get(proxy, ()))
        with self.lock:
            return self.windows.full(proxy, waiting)

    def _hold_if_window_full(self, proxy: int) -> None:
        """Hold `proxy` while WINDOW of its messages are on their way (net/window.py) or
        waiting behind a forwarding thread: its senders wait on its backlog until ACKs
        come back."""
        if self._window_full(proxy) and proxy not in self.windowed and proxy in self.proxy_ref:
            self.windowed.add(proxy)
            if proxy not in self.held and proxy not in self.choked:
                mach.port_disable(mach.task_self(), proxy)

    def _acked(self, source: str, packet: AckPacket) -> None:
        """An ACK: pass it back along a relay, or open the window of the proxy it names
        (believed only from the host that proxy sends to)."""
        owed = self.relay_acks.answered(source, packet.ask)
        if owed is not None:
            self._send(owed[0], AckPacket(owed[1], owed[2]))
            return
        with self.lock:
            proxy = self.windows.proxy_of(packet.ask)
            route = self.proxy_ref.get(proxy)
            if route is None or route[0] != source:
                return
            self.windows.acked(proxy, packet.count)
        if proxy in self._window_blocked:  # messages waited for this: on with them
            self._forward_waiting(proxy)
        if not self._window_full(proxy) and proxy in self.windowed:
            self.windowed.discard(proxy)
            if proxy not in self.held and proxy not in self.choked:
                mach.port_enable(mach.task_self(), proxy)

    def _window_restart(self, proxy: int) -> None:
        """Everything `proxy` sent has arrived, or it is no longer a proxy: a new window
        (the caller enables it, or it is gone)."""
        with self.lock:
            self.windows.restart(proxy)
        self.windowed.discard(proxy)
        self._window_blocked.discard(proxy)

    def _needs_thread(self, msg: Message) -> bool:
        return not _moves_rights(msg) and any(
            isinstance(i, OOL) and i.size and not self._readable_now(i) for i in msg.items)

    def _forward_threaded(self, msg: Message, target: Ref) -> None:
        """(A forwarding thread) send `msg`, then tell the loop (its `done` port) that the
        proxy's next messages may go."""
        try:
            self._forward_now(msg, target)
        finally:
            with contextlib.suppress(MachError):
                mach.msg_send(Message(remote_port=self.done, id=_FORWARDED_ID,
                                      items=[Int(msg.local_port)]))

    def _forward_waiting(self, proxy: int) -> None:
        """A forwarding thread sent its message: forward what waited behind it, in order
        (the next one that needs a thread of its own holds back the rest again)."""
        waiting = self._in_flight.pop(proxy, [])
        self._window_blocked.discard(proxy)
        for n, msg in enumerate(waiting):
            route = self.proxy_ref.get(proxy)
            if route is None:  # the proxy died meanwhile
                self._refuse(msg.remote_port, msg.id)
                self._abandon(msg)
            elif self._window_full(proxy):  # the rest wait for ACKs (_acked goes on)
                self._in_flight[proxy] = waiting[n:]
                self._window_blocked.add(proxy)
                break
            elif self._needs_thread(msg):
                self._in_flight[proxy] = waiting[n + 1:]
                mach.thread_create(mach.task_self(), self._forward_threaded, msg, route)
                return
            else:
                self._forward_now(msg, route)
        self._hold_if_window_full(proxy)

    def _readable_now(self, item: OOL) -> bool:
        from pymach.vm.vm_kern import range_readable_now  # loaded with a kernel, not pymach

        thread = current_thread()
        with thread.kernel.trap(thread):  # the server is part of this host's kernel side
            vmap = thread.task.map
            return vmap is not None and range_readable_now(vmap, item.address, item.size)

    def _forward_now(self, msg: Message, target: Ref) -> None:
        """Encode `msg` as a MSG packet for port `target` and send it, then what moving
        its rights produced (queued messages, MOVED); refuse it if the host is gone."""
        after: After = []
        packet = self._packet(target[0], target[1], msg, after)
        counted = target[0] != self.host
        with self.lock:  # (forwarding threads come here too)
            counted = counted and msg.local_port in self.proxy_ref
            ask, count = self.windows.sent(msg.local_port) if counted else (None, 0)
        if ask is not None:
            packet = replace(packet, ask=ask, count=count)
        self.forwarded += 1
        sent = self._send(target[0], packet)
        self._send_all(after)
        if not sent and counted:  # (no ACK will come: a new window)
            with self.lock:
                self.windows.restart(msg.local_port)
        if not sent:
            self._refuse(msg.remote_port, msg.id, "MIG_SERVER_DIED",
                         f"host {target[0]!r} cannot be reached")
        elif msg.remote_port and target[0] != self.host:
            with self.lock:  # (forwarding threads come here too)
                if msg.remote_port not in self.proxy_ref:  # its reply comes back here
                    self.open_calls.sent(target[0], msg.remote_port, msg.id)

    def _packet(self, host: str, dest: bytes, msg: Message, after: After) -> MsgPacket:
        """`msg` (received by this server) as a MSG packet for port `dest` on `host`."""
        reply = self.ref_of(msg.remote_port) if msg.remote_port else None
        return MsgPacket(dest, msg.id, reply, tuple(self._encode(i, host, after)
                                                    for i in msg.items))

    def _send_all(self, after: After) -> None:
        for host, packet in after:
            if host:
                self._send(host, packet)
            else:
                self._broadcast(packet, to_self=True)

    def ref_of(self, name: int) -> Ref:
        """The network reference for a port we hold a send right to (exporting it)."""
        with self.lock:  # forwarding threads export too (no Mach call is made under it)
            old_id = self.alias.get(name)
            if old_id is not None and old_id in self.forward:
                return (self.host, old_id)  # the new host may not have the port yet
            if name in self.proxy_ref:
                return self.proxy_ref[name]
            return (self.host, self._export_locked(name))

    def _export_locked(self, name: int) -> bytes:
        if name not in self.exported:
            net_id = new_net_id()
            self.exported[name], self.by_id[net_id] = net_id, name
        return self.exported[name]

    def _encode(self, item: Item, host: str, after: After) -> NetItem:
        if isinstance(item, Port):
            if item.disposition in _MOVES:
                right = self._move_out(item.name, item.disposition, host, after)
                return right if right is not None else PortRef(None)
            return PortRef(self._right(item.name))
        if isinstance(item, PortArray):
            if item.disposition in _MOVES:
                moved = (self._move_out(n, item.disposition, host, after) for n in item.names)
                return RightItems(tuple(r for r in moved if r is not None))
            return PortRefs(tuple(self._right(n) for n in item.names))
        if isinstance(item, OOL):
            return self._ool_out(item, host)
        if isinstance(item, _PLAIN_ITEMS):
            return item
        raise MachError("SEND_INVALID_TYPE", f"a {type(item).__name__} item cannot cross hosts")

    def _ool_out(self, item: OOL, host: str) -> NetItem:
        """A region for `host`: by reference if it is large and readable without a data
        manager (net/cor.py), else by value."""
        if item.data is None and item.size >= COR_MIN and host != self.host \
                and self._readable_now(item):
            mo = self.cor.keep(item, host, vm_page_size())
            if mo:
                return CorItem(self.ref_of(mo), item.size)
        return OolData(take_ool(item))

    def _cor_send(self, proxy: int, msg_id: int, items: list[Item]) -> None:
        """A reply of our memory objects' pager to a kernel's request port (our proxy)."""
        route = self.proxy_ref.get(proxy)
        if route is not None:
            self._forward_now(Message(local_port=proxy, id=msg_id, items=items), route)

    def _cor_provide(self, request: int, offset: int, size: int, fill: Fill) -> None:
        """Data of our memory objects for a kernel's request port (our proxy): a PAGE,
        built around its data (`fill` copies it in: the data is copied once)."""
        route = self.proxy_ref.get(request)
        if route is None:
            return
        head = page_head(route[1], offset, size)
        data = bytearray(len(head) + size)
        data[:len(head)] = head
        fill(memoryview(data)[len(head):])
        if route[0] == self.host:
            self._dispatch(self.host, decode_packet(data))
        else:
            self._send_data(route[0], data)

    def _page_in_out(self, msg: Message) -> None:
        """Our kernel's pager_data_request to a memory object of another host (our proxy
        `msg.local_port`): sent as a PAGEIN (its request port is known there)."""
        values = msg.values()
        if len(values) != 4 or not all(isinstance(v, int) for v in values[1:]):
            self.forward_msg(msg, self.proxy_ref[msg.local_port])
            return
        route = self.proxy_ref[msg.local_port]
        self._send(route[0], PageInPacket(route[1], values[1], values[2], values[3]))

    def _page_in(self, source: str, packet: PageInPacket) -> None:
        mo = self.by_id.get(packet.port, 0)
        self.cor.page_in(source, mo, packet.offset, packet.length, packet.access)

    def _page(self, packet: PagePacket) -> None:
        """Data for one of our kernel's pager request ports: pager_data_provided."""
        dest = self.by_id.get(packet.port)
        if dest is not None:  # (else the kernel let the object go meanwhile)
            self._send_local(Message(remote_port=dest, id=_PAGER_DATA_PROVIDED, items=[
                Int(packet.offset), OOL(data=bytes(packet.data)), Int(len(packet.data)),
                Int(VM_PROT_NONE)]))

    def _right(self, name: int) -> Ref | None:
        return self.ref_of(name) if name else None

    def _send(self, host: str, packet: Packet) -> bool:
        """Send `packet` to `host` (to ourselves without the network); False if the
        transport knows it cannot be delivered. WireError if it cannot be encoded."""
        data = encode_packet(packet)
        if host == self.host:
            self._dispatch(host, packet)
            return True
        return self._send_data(host, data)

    def _send_data(self, host: str, data: bytes | bytearray) -> bool:
        """Hand an encoded packet to the transport for `host` (never changed after)."""
        self.bytes_out += len(data)
        return self.transport.send(host, data)

    def _broadcast(self, packet: Packet, to_self: bool = False) -> None:
        """Send `packet` to every host the transport reported up (and to ourselves)."""
        data = encode_packet(packet)
        for peer in sorted(self.peers):
            self.bytes_out += len(data)
            self.transport.send(peer, data)
        if to_self:
            self._dispatch(self.host, packet)

    # -- rights leaving this host -------------------------------------------------------
    def _move_out(self, name: int, kind: Disposition, host: str,
                  after: After) -> RightItem | None:
        """The right `kind` to our port `name` (received from a local task) leaves for
        `host`: a receive right takes the port's queue with it and leaves a proxy."""
        if not name:
            return None
        if kind == Disposition.MOVE_OWNERSHIP:
            return self._ownership_out(name, host)
        backlog = _status(name)[2]
        with self.lock:
            old_id = self._export_locked(name)
        owner, token = (None, None) if kind == Disposition.MOVE_ALL else \
            self._owner_apart(name, old_id)
        new_id = new_net_id()
        queue = self._drain(name)
        self._release_choked(name)  # MOVED follows: they will flush to the new host
        self._become_proxy(name, old_id, (host, new_id))
        for msg in queue:  # behind the carrying message, on the same link
            inner: After = []
            after.append((host, self._packet(host, new_id, msg, inner)))
            after.extend(inner)
        after.append(("", MovedPacket(old_id)))
        self.moves_out += 1
        return RightItem(int(kind), (self.host, old_id), new_id, owner, token, backlog)

    def where(self, name: int) -> str | None:
        """The host this server believes the port it names `name` lives on (None: it
        names no port it exports or proxies)."""
        if name in self.proxy_ref:
            return self.proxy_ref[name][0]
        return self.host if name in self.exported else None

    def _owner_apart(self, name: int, old_id: bytes) -> tuple[str | None, bytes | None]:
        """Where the ownership of a port whose receive right leaves stays: an owner on
        another host stays there; a task here keeps it (the proxy stands for it)."""
        if old_id in self.remote_owner:
            return self.remote_owner.pop(old_id)
        if portops.owner_of(name) == "task":
            token = new_net_id()
            self.owner_token[name] = token
            return self.host, token
        return None, None

    def _ownership_out(self, name: int, host: str) -> RightItem | None:
        """Ownership of our port `name` leaves for `host`: of a local port, its receive
        right stays and we hold ownership for the owner there; of a remote port (our
        proxy), it moves on with the token that proves it."""
        if name in self.proxy_ref:
            token = self.owner_token.pop(name, None)
            route = self.proxy_ref[name]
            if token is None:  # no task here owned it: nothing to pass on
                log.warning("netmsgserver %s: ownership of %s cannot leave: it is not held "
                            "here", self.host, route[1].hex()[:8])
                return None
            self._owner_went(token, host)
            return RightItem(int(Disposition.MOVE_OWNERSHIP), route, route[1], None, token)
        with self.lock:
            net_id = self._export_locked(name)
        token = new_net_id()
        self.remote_owner[net_id] = (host, token)
        return RightItem(int(Disposition.MOVE_OWNERSHIP), (self.host, net_id), net_id, None,
                         token)

    def _owner_went(self, token: bytes, host: str) -> None:
        """Ownership proven by `token` left for `host`: a receive right that comes back
        here for it before its host hears of the move is sent on there."""
        self.owner_moved[token] = host
        while len(self.owner_moved) > MAX_FORWARDS:
            self.owner_moved.popitem(last=False)

    def _drain(self, name: int) -> list[Message]:
        """Take every message queued on a port whose receive right we hold."""
        msgs = []
        while True:
            try:
                msgs.append(mach.msg_receive(name, RCV_TIMEOUT, 0, REPLY_SIZE_ANY))
            except MachError:
                return msgs

    def _become_proxy(self, name: int, old_id: bytes, route: Ref) -> None:
        """Our port `name` (its receive right ours) now stands for `route`: what local
        senders send to it is forwarded; so is what other hosts send to `old_id`."""
        with self.lock:
            self.exported.pop(name, None)
            self.by_id.pop(old_id, None)
            self.alias[name] = old_id
        self._add_forward(old_id, route)
        self._window_restart(name)
        self.proxy_ref[name] = route
        self.proxies.setdefault(route, name)
        self.proxies[(self.host, old_id)] = name
        self._mark(name, route)
        mach.port_enable(mach.task_self(), name)

    def _add_forward(self, old_id: bytes, route: Ref) -> None:
        with self.lock:
            self.forward.discard(old_id)  # (to the end: the newest)
            self.forward[old_id] = route
            while len(self.forward) > MAX_FORWARDS:
                del self.forward[next(iter(self.forward))]

    def _drop_forwards(self, routes: Callable[[Indexed[bytes, Ref]], list[bytes]]) -> None:
        """The forwarding entries `routes` picks from the table die: their ids are dead
        too."""
        with self.lock:
            dead = routes(self.forward)
            for old in dead:
                del self.forward[old]
        for old in dead:
            self._broadcast(DeadPacket(old), to_self=True)

    # -- inbound ------------------------------------------------------------------------
    def packet_in(self, source: str, data: bytes | memoryview) -> None:
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
            self._msg_in(source, packet)
        elif isinstance(packet, DeadPacket):
            self._dead(source, packet.port)
        elif isinstance(packet, NamePacket | UnnamePacket):
            self._name_packet(source, packet)
        elif isinstance(packet, MovedPacket):
            self._hold_route((source, packet.port))
        elif isinstance(packet, FlushPacket):
            self._flush_arrived(source, packet)
        elif isinstance(packet, FlushedPacket):
            self._flush_done(packet.nonce, (source, packet.port))
        elif isinstance(packet, DisownPacket | OwnerPacket):
            self._owner_packet(source, packet)
        elif isinstance(packet, PageInPacket):
            self._page_in(source, packet)
        elif isinstance(packet, PagePacket):
            self._page(packet)
        elif isinstance(packet, ChokePacket):
            self._choke((source, packet.port), packet.backlog)
        elif isinstance(packet, ReadyPacket):
            self._ready((source, packet.port))
        elif isinstance(packet, AckPacket):
            self._acked(source, packet)
        else:
            self._receive_back(source, packet.right)

    def _msg_in(self, source: str, packet: MsgPacket) -> None:
        """Deliver a MSG, then answer its ask (after a CHOKE it caused, on the same link;
        also when delivering it failed: an ACK says it is no longer on its way, and an
        unanswered ask would hold its proxy for good); a relay passes the ask on."""
        taken = True
        try:
            taken = self._deliver(source, packet)
        finally:
            if taken and packet.ask is not None:
                self._send(source, AckPacket(packet.ask, packet.count))

    def _name_packet(self, source: str, packet: NamePacket | UnnamePacket) -> None:
        if isinstance(packet, UnnamePacket):
            self.names.discard(packet.name)
            self.own_names.discard(packet.name)
            return
        if packet.name not in self.names and len(self.names) >= MAX_NAMES:
            log.warning("netmsgserver %s: refused name %r from %r: the registry holds "
                        "%d names", self.host, packet.name[:64], source, MAX_NAMES)
            return
        self.names[packet.name] = packet.ref
        self.own_names.discard(packet.name)  # the later check-in elsewhere wins

    def _deliver(self, source: str, packet: MsgPacket) -> bool:
        """A message for one of our ports: deliver, hold (its port is coming back),
        forward (it moved away), or fail the call (it died). True if it was taken here
        (its ask is answered), False if it was relayed (the relay passes the ask on)."""
        if packet.dest == MIGRATE_NET_ID:
            self._migrate_in(source, packet)
            return True
        held = self.pending.get(packet.dest)
        if held is not None:
            return self._hold_packet(source, packet, held)
        dest = self.by_id.get(packet.dest)
        if dest is None:
            route = self.forward.get(packet.dest)
            if route is not None:
                self._relay(source, packet, route)
                return False
            self._send(source, DeadPacket(packet.dest))
            self._fail_remote(packet, "MIG_SERVER_DIED",
                              "the destination port died before the request reached it")
            return True
        if dest in self.cor.objects:  # a kernel's request to a memory object of ours
            self._cor_request(source, dest, packet)
            return True
        msg = self._message(dest, packet)
        with self.lock:
            self.open_calls.delivered(dest, packet.msg_id)  # a reply closes its call
        if portops.queued(dest) >= NET_QUEUE_MAX:  # the network may not fill a port
            log.warning("netmsgserver %s: refused message %d from %r: its port holds %d "
                        "messages", self.host, packet.msg_id, source, NET_QUEUE_MAX)
            self._abandon(msg)
            self._fail_remote(packet, "SEND_TIMED_OUT", f"the port stayed full "
                              f"({NET_QUEUE_MAX} messages from the network)")
            return True
        self._send_local(msg)
        self._check_full(dest, packet.dest, source)
        return True

    def _message(self, dest: int, packet: MsgPacket) -> Message:
        """The local message for a MSG packet (landing the rights it carries)."""
        reply, reply_disp = self._local(packet.reply)
        return Message(remote_port=dest, local_port=reply, id=packet.msg_id,
                       items=[self._decode(i) for i in packet.items],
                       local_disposition=reply_disp if reply else None)

    def _cor_request(self, source: str, dest: int, packet: MsgPacket) -> None:
        msg = self._message(dest, packet)
        self.cor.serve(source, replace(msg, remote_port=msg.local_port, local_port=dest))
        if packet.msg_id == _PAGER_INIT and len(msg.items) == 2:  # its name port: unused
            name = msg.items[1]
            if isinstance(name, Port) and name.name in self.proxy_ref:
                self._kill_proxy(name.name)

    def _hold_packet(self, source: str, packet: MsgPacket, held: list[MsgPacket]) -> bool:
        """Hold a MSG for a port coming back here (refused past NET_QUEUE_MAX); its ask is
        answered when the port is here (`_answer_held`): False if it waits for that."""
        if len(held) >= NET_QUEUE_MAX:
            log.warning("netmsgserver %s: refused message %d from %r: %d wait for a port "
                        "coming back", self.host, packet.msg_id, source, NET_QUEUE_MAX)
            self._fail_remote(packet, "SEND_TIMED_OUT", "the port stayed full")
            return True
        held.append(packet)
        if packet.ask is not None:
            self.held_asks.setdefault(packet.dest, []).append((source, packet.ask,
                                                               packet.count))
        return packet.ask is None

    def _answer_held(self, net_id: bytes) -> None:
        """The packets held for port `net_id` are queued (or dropped with it): answer
        their asks, which held their proxies' windows until now."""
        for source, ask, count in self.held_asks.pop(net_id, []):
            self._send(source, AckPacket(ask, count))

    def _relay(self, source: str, packet: MsgPacket, route: Ref) -> None:
        """Pass a MSG for a port that moved away on to where it went (unchanged but for
        its address), and tell the sender (MOVED). Receive rights it carries go the same
        way: so will the messages that follow them."""
        for item in packet.items:
            for right in _rights_in(item):
                if right.kind != Disposition.MOVE_OWNERSHIP:
                    self._add_forward(right.new_id, (route[0], right.new_id))
                elif right.token is not None:
                    self._owner_went(right.token, route[0])
        self.relayed += 1
        ask = None  # the sender's ask, passed on under our token (net/window.py)
        if packet.ask is not None:
            ask = self.relay_acks.pass_on(source, packet.ask, packet.count, route[0])
        if not self._send(route[0], MsgPacket(route[1], packet.msg_id, packet.reply,
                                              packet.items, ask, packet.count if ask else 0)):
            self._fail_remote(packet, "MIG_SERVER_DIED", f"host {route[0]!r} cannot be "
                              f"reached")
            if ask is not None:
                self.relay_acks.cancel(ask)
                ask = None
        if packet.ask is not None and ask is None:  # not passed on: answered here
            self._send(source, AckPacket(packet.ask, packet.count))
        self._send(source, MovedPacket(packet.dest))

    def _fail_remote(self, packet: MsgPacket, code: str, detail: str) -> None:
        """Answer a request from another host that will not be delivered with an error
        reply (as _refuse does for a local one); nothing if it has no reply port."""
        if packet.reply is not None:
            self._send(packet.reply[0], MsgPacket(
                packet.reply[1], packet.msg_id + REPLY_ID_OFFSET, None,
                (Int(MachError(code).value), Str(detail))))

    def _local(self, ref: Ref | None) -> tuple[int, Disposition]:
        """Our name for a referenced port and the disposition that gives a send right."""
        if ref is None:
            return 0, Disposition.COPY_SEND
        if ref[0] == self.host and ref[1] in self.by_id:
            return self.by_id[ref[1]], Disposition.COPY_SEND
        name = self.proxies.get(ref)
        if name is None:
            route = self.forward.get(ref[1]) if ref[0] == self.host else ref
            if route is None:
                return 0, Disposition.COPY_SEND
            name = self._proxy(route)
            self.proxies[ref] = name
        return name, Disposition.MAKE_SEND

    def _proxy(self, ref: Ref) -> int:
        name = self.proxies.get(ref)
        if name is None:
            me = mach.task_self()
            name = mach.port_allocate(me)
            mach.port_enable(me, name)
            self._window_restart(name)  # (a name used before starts a new window)
            self.proxies[ref], self.proxy_ref[name] = name, ref
            self._mark(name, ref)
        return name

    def _mark(self, name: int, route: Ref | None) -> None:
        """Tell the kernel's reports where the port our `name` stands for lives."""
        portops.mark_remote(name, "" if route is None or route[0] == self.host else route[0])

    def _decode(self, item: NetItem) -> Item:
        if isinstance(item, PortRef):
            name, disp = self._local(item.ref)
            return Port(name, disp) if name else Port(0, Disposition.COPY_SEND)
        if isinstance(item, PortRefs):
            rights = [self._local(r) for r in item.refs]
            return PortArray(tuple(n for n, _ in rights), Disposition.COPY_SEND)
        if isinstance(item, RightItem):
            name = self._land(item)
            return Port(name, Disposition(item.kind)) if name else \
                Port(0, Disposition.COPY_SEND)
        if isinstance(item, RightItems):
            names = tuple(self._land(r) for r in item.rights)
            kind = item.rights[0].kind if item.rights else Disposition.MOVE_RECEIVE
            return PortArray(tuple(n for n in names if n), Disposition(kind))
        if isinstance(item, OolData):
            return OOL(data=item.data)
        if isinstance(item, CorItem):
            return self._cor_in(item)
        return item

    def _cor_in(self, item: CorItem) -> OOL:
        """Memory by reference: map the object (its port our proxy) and pass it on as
        out-of-line memory; empty if the object is dead or cannot be mapped."""
        name, _ = self._local(item.ref)
        if not name:
            return OOL(data=b"")
        try:
            address: int = mach.vm_allocate_with_pager(mach.task_self(), 0, item.size, True,
                                                       name, 0)
        except MachError as e:
            log.warning("netmsgserver %s: cannot map memory from %r: %s", self.host,
                        item.ref[0], e.detail)
            return OOL(data=b"")
        self.mapped.add(name)
        return OOL(address, item.size, deallocate=True)

    def _send_local(self, msg: Message) -> None:
        """Deliver a message locally (never held back by a backlog: see docstring); a
        null right in it (refused, or its port died) arrives as PORT_NULL."""
        try:
            if _has_null(msg):
                placeholder = mach.port_allocate(mach.task_self())
                portops.send_with_null(_with_null(msg, placeholder), placeholder)
            else:
                mach.msg_send(msg)
        except MachError as e:
            # The port (or a port it carries) died just now: whoever waits for an answer
            # must get one; rights that landed for it are given up here.
            self._abandon(msg)
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

    # -- rights arriving here -----------------------------------------------------------
    def _land(self, right: RightItem) -> int:
        """A right that arrived for a task here; our name for the port (0: refused)."""
        if right.kind == Disposition.MOVE_OWNERSHIP:
            return self._land_ownership(right)
        if right.new_id in self.by_id or right.new_id in self.forward \
                or right.new_id in self.pending:
            self._lie(f"a receive right under id {right.new_id.hex()[:8]}, in use here")
            return 0
        me = mach.task_self()
        try:
            name: int = mach.port_allocate(me)
        except MachError as e:  # our name space is full
            log.warning("netmsgserver %s: a receive right cannot land: %s", self.host,
                        e.detail)
            return 0
        if right.backlog:
            mach.port_set_backlog(me, name, max(1, min(right.backlog, PORT_BACKLOG_MAX)))
        with self.lock:
            self.exported[name], self.by_id[right.new_id] = right.new_id, name
        if right.kind == Disposition.MOVE_RECEIVE and right.owner is not None \
                and right.token is not None:
            self.remote_owner[right.new_id] = (right.owner, right.token)
        self.moves_in += 1
        self._hold_route(right.ref)  # our proxies for where it was: flush their path
        return name

    def _land_ownership(self, right: RightItem) -> int:
        """Ownership arriving: of a port that lives here (it comes home), or of a remote
        port (a proxy here stands for it; the port's host is told)."""
        if right.ref[0] == self.host and right.ref[1] in self.by_id:
            owner = self.remote_owner.get(right.ref[1])
            if owner is None or owner[1] != right.token:
                self._lie("ownership of a port here without its token")
                return 0
            del self.remote_owner[right.ref[1]]
            return self.by_id[right.ref[1]]
        name, _ = self._local(right.ref)
        if not name or name in self.owner_token or name in self.exported \
                or right.token is None:
            self._lie("ownership of a port whose ownership is here already or dead")
            return 0
        self.owner_token[name] = right.token
        route = self.proxy_ref[name]
        self._send(route[0], OwnerPacket(route[1], right.token, self.host))
        return name

    def _lie(self, what: str) -> None:
        self.refused_rights += 1
        log.warning("netmsgserver %s: refused %s", self.host, what)

    def _abandon(self, msg: Message) -> None:
        """A message that landed rights here will not be delivered: give them up here
        as the kernel does for a destroyed message (to the owner, or the port dies)."""
        for item in msg.items:
            if isinstance(item, OOL) and item.data is None and item.size:
                mach.vm_deallocate(mach.task_self(), item.address, item.size)
            if not isinstance(item, Port | PortArray) or item.disposition not in _MOVES:
                continue
            for name in (item.name,) if isinstance(item, Port) else item.names:
                if not name:
                    continue
                if item.disposition == Disposition.MOVE_OWNERSHIP:
                    self._ownership_given_back(name)
                elif name in self.exported and self.exported[name] in self.remote_owner:
                    self._receive_given_back(name)
                else:
                    portops.destroy(name)

    def _receive_given_back(self, name: int) -> None:
        """We (the owner's stand-in) were given the receive right of our port `name`: it
        goes to the owner's host, or, with no owner elsewhere, the port dies."""
        net_id = self.exported.get(name)
        owner = self.remote_owner.get(net_id) if net_id is not None else None
        if owner is None:
            if name in self.exported and portops.owner_of(name) == "server":
                portops.destroy(name)
            return
        after: After = []
        right = self._move_out(name, Disposition.MOVE_RECEIVE, owner[0], after)
        if right is not None:
            self._send(owner[0], ReceivePacket(right))
        self._send_all(after)

    def _ownership_given_back(self, name: int) -> None:
        """The task here that owned the remote port our proxy `name` stands for gave
        ownership up (the kernel passed it to us, the proxy's receiver): tell its host."""
        token = self.owner_token.pop(name, None)
        route = self.proxy_ref.get(name)
        if token is not None and route is not None:
            self._send(route[0], DisownPacket(route[1], token))
        elif name in self.exported and self.exported[name] in self.remote_owner:
            self.remote_owner.pop(self.exported[name])  # ownership came home, unused
            portops.give_up(name, "ownership")

    def _owner_packet(self, source: str, packet: DisownPacket | OwnerPacket) -> None:
        """DISOWN or OWNER for one of our ports (passed on if it moved away)."""
        name = self.by_id.get(packet.port)
        if name is None:
            route = self.forward.get(packet.port)
            if route is not None:
                moved = DisownPacket(route[1], packet.token) if isinstance(
                    packet, DisownPacket) else OwnerPacket(route[1], packet.token, packet.host)
                self._send(route[0], moved)
            return
        owner = self.remote_owner.get(packet.port)
        if owner is None or owner[1] != packet.token:
            self._lie(f"{type(packet).__name__} from {source!r} without the owner's token")
            return
        if isinstance(packet, OwnerPacket):
            self.remote_owner[packet.port] = (packet.host, packet.token)
            return
        del self.remote_owner[packet.port]
        portops.give_up(name, "ownership")

    def _receive_back(self, source: str, right: RightItem) -> None:
        """The receive right of a port whose ownership a task here holds comes back:
        that task's proxy becomes the port, once its old path is flushed."""
        proxy = next((n for n, t in self.owner_token.items() if t == right.token), 0)
        went = self.owner_moved.get(right.token) if right.token is not None else None
        if not proxy and went is not None and right.new_id not in self.forward:
            self._add_forward(right.new_id, (went, right.new_id))  # its queue follows
            self._send(went, ReceivePacket(right))  # ownership moved on from here
            return
        if not proxy or right.new_id in self.by_id or right.new_id in self.forward:
            self._lie(f"a receive right from {source!r} for an owner that is not here")
            self._send(source, DeadPacket(right.new_id))
            return
        del self.owner_token[proxy]
        route = self._unproxy(proxy)
        with self.lock:
            self.exported[proxy], self.by_id[right.new_id] = right.new_id, proxy
        self.pending[right.new_id] = []
        if right.backlog:
            mach.port_set_backlog(mach.task_self(), proxy,
                                  max(1, min(right.backlog, PORT_BACKLOG_MAX)))
        self.moves_in += 1
        self._start_flush(route, [], returning=proxy)

    def _unproxy(self, name: int) -> Ref:
        """Our proxy `name` stops being one (held: its senders wait); its route."""
        for ref in self.proxies.keys_of(name):
            del self.proxies[ref]
        nonce = self.held.pop(name, None)
        if nonce is not None and nonce in self.flushes:
            self.flushes[nonce].names.remove(name)
        with self.lock:
            self.alias.pop(name, None)
        self._window_restart(name)
        mach.port_disable(mach.task_self(), name)
        self._mark(name, None)
        return self.proxy_ref.remove(name)

    # -- flushing a path (per-sender order across a move) -------------------------------
    def _hold_route(self, route: Ref) -> None:
        """The port at `route` moved on: hold our proxies routed there and flush it (not
        one whose forwarding thread is still at work: a FLUSH must follow what it sends;
        the next MOVED for it will do)."""
        names = [n for n in self.proxy_ref.keys_of(route)
                 if n not in self.held and n not in self._in_flight]
        if names:
            self._start_flush(route, names)

    def _start_flush(self, route: Ref, names: list[int], returning: int = 0) -> None:
        nonce = new_net_id()
        self.flushes[nonce] = Flush(route, names, returning)
        me = mach.task_self()
        for name in names:
            self.held[name] = nonce
            mach.port_disable(me, name)
        if not self._send(route[0], FlushPacket(route[1], self.host, nonce)):
            self._flush_done(nonce, route)  # nothing is on that path any more

    def _flush_arrived(self, source: str, packet: FlushPacket) -> None:
        if packet.port in self.by_id:  # the port lives here: the path is flushed
            if packet.origin == self.host:
                self._flush_done(packet.nonce, (self.host, packet.port))
            else:
                self._send(packet.origin, FlushedPacket(packet.port, packet.nonce))
        elif packet.port in self.forward:
            route = self.forward[packet.port]
            self._send(route[0], FlushPacket(route[1], packet.origin, packet.nonce))
        else:
            self._send(source, DeadPacket(packet.port))

    def _flush_done(self, nonce: bytes, home: Ref) -> None:
        """Our FLUSH `nonce` reached the port, which lives at `home`: release the
        proxies it held, routed there now, or hand a returning port to its owner."""
        flush = self.flushes.pop(nonce, None)
        if flush is None:
            log.info("netmsgserver %s: a FLUSHED from %r answers no flush", self.host,
                     home[0])
            return
        if flush.returning:
            self._return_done(flush.returning)
            return
        me = mach.task_self()
        for name in flush.names:
            if self.held.get(name) != nonce:
                continue
            del self.held[name]
            self.proxy_ref[name] = home
            self.proxies.setdefault(home, name)
            with self.lock:  # its route comes from the port's host: hand that out now
                self.alias.pop(name, None)
            self._mark(name, home)
            self.choked.discard(name)  # (a CHOKE was about its old route)
            self._window_restart(name)  # (all it sent is at the port now)
            mach.port_enable(me, name)

    def _return_done(self, name: int) -> None:
        """Every message for the returning port `name` is here: queue those that came
        by the network ahead of what local senders queued, then give the receive right
        to the owner (NOTIFY_RECEIVE_RIGHTS), or send it on to the owner's new host if
        ownership left meanwhile; with no owner left, the port dies."""
        net_id = self.exported.get(name)
        packets = self.pending.pop(net_id, []) if net_id is not None else []
        if net_id is None:
            return
        msgs = [self._message(name, p) for p in packets]
        portops.requeue_front(name, msgs)
        self._answer_held(net_id)
        if portops.owner_of(name) == "task":
            portops.give_up(name, "receive")
        elif net_id in self.remote_owner:  # the owner sent ownership on meanwhile
            self._receive_given_back(name)
        else:
            portops.destroy(name)

    # -- port and host death ------------------------------------------------------------
    def _port_died(self, name: int) -> None:
        with self.lock:
            net_id = self.exported.pop(name, None)
            if net_id is not None:
                del self.by_id[net_id]
        if net_id is not None:
            self.remote_owner.pop(net_id, None)
            self.pending.pop(net_id, None)
            self._answer_held(net_id)
            self._broadcast(DeadPacket(net_id), to_self=True)
        self.choking.pop(name, None)  # (DEAD ends their hold)
        if name in self.proxy_ref:
            self._forget(name)
        with self.lock:
            self.open_calls.port_died(name)

    def _dead(self, source: str, net_id: bytes) -> None:
        """Host `source` says its port `net_id` died: proxies routed there die, ports
        coming back along that path stop waiting, forwarding entries to it die too."""
        dead = (source, net_id)
        for name in self.proxy_ref.keys_of(dead):
            self._kill_proxy(name)
        for nonce in [k for k, f in self.flushes.items() if f.route == dead]:
            self._flush_done(nonce, dead)
        self._drop_forwards(lambda table: table.keys_of(dead))
        self._drop_names(lambda table: table.keys_of(dead))

    def _kill_proxy(self, name: int) -> None:
        """A proxy whose port died: requests still queued on it fail, and it dies."""
        self._forget(name)
        for msg in self._in_flight.pop(name, []):  # (its thread finds no route after)
            self._refuse(msg.remote_port, msg.id)
            self._abandon(msg)
        while True:  # requests still queued on the proxy will never be delivered
            try:
                msg = mach.msg_receive(name, RCV_TIMEOUT, 0, REPLY_SIZE_ANY)
            except MachError:
                break
            self._refuse(msg.remote_port, msg.id)
            self._abandon(msg)  # what it carried into our space goes too
        portops.destroy(name)  # the proxy dies here too, even if a task owns it
        mo = self.cor.request_gone(name)  # a kernel let go of a memory object of ours
        if mo:
            portops.destroy(mo)

    def _forget(self, name: int) -> None:
        self.choked.discard(name)
        self._window_restart(name)
        for ref in self.proxies.keys_of(name):
            del self.proxies[ref]
        self.proxy_ref.discard(name)
        self.mapped.discard(name)
        with self.lock:
            self.alias.pop(name, None)
        self.owner_token.pop(name, None)
        nonce = self.held.pop(name, None)
        if nonce is not None and nonce in self.flushes:
            self.flushes[nonce].names.remove(name)

    def _drop_names(self, names: Callable[[Indexed[str, Ref]], list[str]]) -> None:
        """Forget the registrations `names` picks from each table (their port died or is
        unreachable)."""
        for table in (self.names, self.own_names):
            for name in names(table):
                del table[name]

    def host_up(self, host: str) -> None:
        """The transport reached `host`: tell it the names checked in here."""
        if host == self.host:
            return
        self.peers.add(host)
        for name, ref in list(self.own_names.items()):
            self._send(host, NamePacket(name, ref))

    def host_down(self, host: str) -> None:
        """`host` is unreachable: its ports are dead to us (proxies, names and forwarding
        entries go; ports coming back along a path through it stop waiting), and
        ownership held there passes to the receivers here."""
        self.peers.discard(host)
        for _, told in self.choking.values():
            told.discard(host)
        for owed, ask, count in self.relay_acks.host_gone(host):
            self._send(owed, AckPacket(ask, count))
        for name in self.proxy_ref.keys_where(lambda route: route[0] == host):
            self._kill_proxy(name)
        for nonce in [k for k, f in self.flushes.items() if f.route[0] == host]:
            self._flush_done(nonce, self.flushes[nonce].route)
        self._drop_forwards(lambda table: table.keys_where(lambda route: route[0] == host))
        for net_id in [k for k, o in self.remote_owner.items() if o[0] == host]:
            del self.remote_owner[net_id]
            portops.give_up(self.by_id[net_id], "ownership")
        for mo in self.cor.host_gone(host):
            portops.destroy(mo)
        self._drop_names(lambda table: table.keys_where(lambda ref: ref[0] == host))
        self._fail_open_calls(host)

    def _fail_open_calls(self, host: str) -> None:
        """Requests that reached `host` and were never answered will never be: each
        caller gets MIG_SERVER_DIED (net/pending.py)."""
        with self.lock:
            calls = self.open_calls.host_down(host)
        for reply, request_id in calls:
            self._refuse(reply, request_id, "MIG_SERVER_DIED",
                         f"host {host!r} went down before it answered")

    # -- a port's backlog across hosts (CHOKE / READY) ---------------------------------------
    def _check_full(self, name: int, net_id: bytes, source: str) -> None:
        """A message from `source` was queued on our port `name` (id `net_id`): if the
        port is full, tell `source` to hold its proxies (CHOKE) until it has room. Told
        again for every message that still comes while it is full: its proxy may have
        been routed elsewhere when the last CHOKE arrived (a flush retargets it here)."""
        queued, backlog = portops.fill(name)
        if queued < backlog:
            return
        _, told = self.choking.setdefault(name, (net_id, set()))
        told.add(source)
        self._send(source, ChokePacket(net_id, max(1, min(backlog, PORT_BACKLOG_MAX))))

    def check_choking(self) -> None:
        """READY to the hosts held off from each of our ports that has room now."""
        for name in list(self.choking):
            queued, backlog = portops.fill(name)
            if queued < backlog:
                self._release_choked(name)

    def _release_choked(self, name: int) -> None:
        net_id, told = self.choking.pop(name, (b"", set()))
        for host in told:
            self._send(host, ReadyPacket(net_id))

    def _choke(self, route: Ref, backlog: int) -> None:
        """The port at `route` is full: our proxies for it take its backlog and are held
        (not received from), so local senders wait, or time out, as for the port."""
        me = mach.task_self()
        for name in self.proxy_ref.keys_of(route):
            mach.port_set_backlog(me, name, backlog)
            if name not in self.held and name not in self.windowed:
                mach.port_disable(me, name)
            self.choked.add(name)

    def _ready(self, route: Ref) -> None:
        """The port at `route` has room: release our proxies held for it (unless a
        flush holds them too)."""
        me = mach.task_self()
        for name in [n for n in self.choked if self.proxy_ref.get(n) == route]:
            self.choked.discard(name)
            if name not in self.held and name not in self.windowed:
                mach.port_enable(me, name)

    # -- task migration (net/migration.py) ------------------------------------------------
    def _migrate_out(self, msg: Message) -> None:
        """A local migrator's state message [Str host, <state>] (or check [Str host,
        Str meta]): on to that host's migration server as [Int uid, <state>], with the
        user of the task that sent it as this kernel reports it (the trailer). Refused,
        with what it brought, unless the host is another host that is up (a move within
        this host is the migrator's own) and the sender's user is known."""
        host = msg.items[0].value if msg.items and isinstance(msg.items[0], Str) else ""
        uid = msg.sender_uid
        if uid is None or host == self.host or host not in self.peers:
            why = ("the sender's user is unknown" if uid is None else
                   f"host {host!r} is this host" if host == self.host else
                   f"host {host!r} is not up in this cluster")
            answer = refusal(msg.remote_port, msg.items[1:], "KERN_INVALID_HOST", why)
            self._send_local(replace(answer, id=msg.id + REPLY_ID_OFFSET))
            return
        self._forward_now(replace(msg, items=[Int(uid), *msg.items[1:]]), (host, MIGRATE_NET_ID))

    def _migrate_in(self, source: str, packet: MsgPacket) -> None:
        """A state message from host `source`'s netmsgserver for our migration server."""
        msg = self._message(self.migration, packet)
        if not self.migration:
            answer = refusal(msg.local_port, msg.items[1:], "KERN_INVALID_HOST",
                             f"host {self.host!r} takes no migrated tasks")
            self._send_local(replace(answer, id=msg.id + REPLY_ID_OFFSET))
            return
        log.info("netmsgserver %s: a task moves in from %r", self.host, source)
        self._send_local(msg)

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

    def netname_host(self, _server: int, host: str) -> int:
        if host == self.host:
            return 1
        if host not in self.peers:
            raise MachError("KERN_INVALID_HOST", f"host {host!r} is not up in the cluster "
                            f"of {self.host!r} (hosts up: {sorted(self.peers) or 'none'})")
        return 0

    def netname_check_out(self, _server: int, name: str) -> None:
        if name not in self.names:
            raise MachError("KERN_INVALID_NAME", f"no port is checked in as {name!r}")
        self.names.discard(name)
        self.own_names.discard(name)
        self._broadcast(UnnamePacket(name))


def _status(name: int) -> tuple[bool, int, int, bool, bool]:
    """port_status of the server's name: (enabled, messages, backlog, receiver, owner)."""
    status: tuple[bool, int, int, bool, bool] = mach.port_status(mach.task_self(), name)
    return status


def _has_null(msg: Message) -> bool:
    return any((isinstance(i, Port) and not i.name)
               or (isinstance(i, PortArray) and not all(i.names)) for i in msg.items)


def _with_null(msg: Message, placeholder: int) -> Message:
    """`msg` with its null send rights made send rights to `placeholder`."""
    items: list[Item] = []
    for i in msg.items:
        if isinstance(i, Port) and not i.name:
            i = Port(placeholder, Disposition.COPY_SEND)
        elif isinstance(i, PortArray) and not all(i.names):
            i = PortArray(tuple(n or placeholder for n in i.names), i.disposition)
        items.append(i)
    return replace(msg, items=items)


def _moves_rights(msg: Message) -> bool:
    return any(isinstance(i, Port | PortArray) and i.disposition in _MOVES for i in msg.items)


def _rights_in(item: NetItem) -> tuple[RightItem, ...]:
    if isinstance(item, RightItem):
        return (item,)
    return item.rights if isinstance(item, RightItems) else ()
