"""Packets between netmsgservers: fixed layouts of typed wire values.

Each packet is the body of the typed wire format (include/wire.py), a flat sequence of
values whose first value is the packet's kind. Nothing here, or anywhere in a network
server, unpickles: `decode_packet` accepts only the layouts below, checks every field's
type and range, and builds only these dataclasses and the plain message items
Int / Float / Bytes / Str / IntArray. Anything else is a `WireError` naming the field.

A network port is named by a *reference* `[host: str, id: bytes]`: the host that holds
its receive right and an unguessable id (NET_ID_SIZE random bytes) that host gave it.
A null port is `None`. The sending host is never a field: the transport names it.

    MSG     [1, dest: id, msg_id: int, reply: ref | None, items: [item, ...],
             ask: id | None, count: int]
            a message for the sender-known port `dest` of the receiving host; with an
            `ask`, the receiver returns ACK [ask, count] once it has taken it (a
            proxy's window, net/window.py; count 0 without one)
    DEAD    [2, port: id]            the sender's port `port` died
    NAME    [3, name: str, port: ref]  netname: `name` now stands for `port`
    UNNAME  [4, name: str]           netname: `name` is checked out
    MOVED   [5, port: id]            the receive right of `port` left the sender: what
                                     is sent there is forwarded; flush through it
    FLUSH   [6, port: id, origin: host, nonce: id]  every message `origin` sent to
                                     `port` on this path is ahead of this packet
    FLUSHED [7, port: id, nonce: id]  the sender holds `port`'s receive right and the
                                     FLUSH `nonce` reached it: send to it directly
    DISOWN  [8, port: id, token: id]  the holder of `port`'s ownership (proven by
                                     `token`) gave it up
    OWNER   [9, port: id, token: id, host]  `port`'s ownership is now on `host`
    RECEIVE [10, right]              the receive right `right` (a right item's fields,
                                     without its type) comes back to its owner's host
    PAGEIN  [11, object: id, offset, length, access]  pager_data_request, compact: a
                                     kernel of the sender faulted on the memory object
                                     `object` of the receiving host (net/cor.py)
    PAGE    [12, request: id, offset, data: bytes]  pager_data_provided, compact: data
                                     for the sender's pager request port `request`
    CHOKE   [13, port: id, backlog]  the sender's port `port` is full: hold its proxies
    READY   [14, port: id]           ... until this: it has room again
    ACK     [15, ask: id, count]     the sender took the MSG that asked `ask`, and the
                                     `count` - 1 sent before it on that window

(The rights protocol that uses MOVED ... RECEIVE is in net/netmsgserver.py.)

An item is a list whose first value is its type:

    [1, int]  Int      [2, float] Float    [3, bytes] Bytes     [4, str] Str
    [5, [int, ...]]    IntArray
    [6, ref | None]    a send right (Port)
    [7, [ref | None, ...]]  send rights (PortArray)
    [8, bytes]         out-of-line memory, carried by value
    [9, kind, host, old: id, new: id, owner: host | None, token: id | None, backlog]
                       a moved right (RightItem): kind 4 receive, 5 ownership, 6 both;
                       (host, old) is the port's reference where it was, `new` the id
                       it gets where it lands; owner/token say where its ownership is
    [10, [[kind, host, old, new, owner, token, backlog], ...]]  moved rights (RightItems)
    [11, host, id, size]  out-of-line memory by reference (CorItem): `size` bytes served
                       as a memory object by the port (host, id) (net/cor.py)

Invariants: hosts are 1..MAX_HOST bytes of text, netnames 1..MAX_NETNAME, ids exactly
NET_ID_SIZE bytes, integers 64-bit (the wire's own range), a packet at most
wire.MAX_BODY bytes. `decode_packet(encode_packet(p)) == p` for every valid packet `p`.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from pymach.include import wire
from pymach.include.message import Bytes, Float, Int, IntArray, Str
from pymach.include.wire import WireError

NET_ID_SIZE = 16
MAX_HOST = 255
MAX_NETNAME = 1024
K_MSG, K_DEAD, K_NAME, K_UNNAME = 1, 2, 3, 4
K_MOVED, K_FLUSH, K_FLUSHED, K_DISOWN, K_OWNER, K_RECEIVE, K_PAGEIN, K_PAGE = range(5, 13)
K_CHOKE, K_READY, K_ACK = 13, 14, 15
MAX_ASK = 1 << 16  # messages one ACK may count
I_INT, I_FLOAT, I_BYTES, I_STR, I_INTS, I_PORT, I_PORTS, I_OOL = range(1, 9)
I_RIGHT, I_RIGHTS, I_COR = 9, 10, 11
MAX_COR = 1 << 40  # bytes of one region by reference
RIGHT_KINDS = (4, 5, 6)  # Disposition.MOVE_RECEIVE, MOVE_OWNERSHIP, MOVE_ALL
MAX_BACKLOG = 1 << 16  # a moved port's backlog (message.PORT_BACKLOG_MAX bounds it again)
_NONE = type(None)

Ref = tuple[str, bytes]  # (host, network id) of a port


@dataclass(frozen=True)
class PortRef:
    """A send right to a network port (`None`: the null port)."""

    ref: Ref | None


@dataclass(frozen=True)
class PortRefs:
    """Send rights to network ports, in order."""

    refs: tuple[Ref | None, ...]


@dataclass(frozen=True)
class OolData:
    """Out-of-line memory carried by value."""

    data: bytes


@dataclass(frozen=True)
class RightItem:
    """A receive and/or ownership right that moves to the receiving host (`kind`: 4
    receive, 5 ownership, 6 both). `ref` is the port's reference on the path the right
    took (a hint: nothing is trusted from it), `new_id` the id the port has where it
    lands. For a receive right, `owner`/`token` name the host holding the port's
    ownership apart from it (None: ownership goes with it or is gone); for ownership,
    `token` is the secret that proves it to the port's receiving host."""

    kind: int
    ref: Ref
    new_id: bytes
    owner: str | None = None
    token: bytes | None = None
    backlog: int = 0


@dataclass(frozen=True)
class RightItems:
    """Moved rights of one kind, in order (a PortArray of receive or ownership rights)."""

    rights: tuple[RightItem, ...]


@dataclass(frozen=True)
class CorItem:
    """Out-of-line memory by reference: `size` (1..MAX_COR) bytes, the data of the memory
    object whose port is `ref` (copy-on-reference, net/cor.py)."""

    ref: Ref
    size: int


NetItem = (Int | Float | Bytes | Str | IntArray | PortRef | PortRefs | OolData | RightItem
           | RightItems | CorItem)


@dataclass(frozen=True)
class MsgPacket:
    """A message for port `dest` of the receiving host, with reply port `reply`."""

    dest: bytes
    msg_id: int
    reply: Ref | None
    items: tuple[NetItem, ...]
    ask: bytes | None = None  # return ACK [ask, count] once taken (net/window.py)
    count: int = 0  # messages that ACK counts (0 without an ask)


@dataclass(frozen=True)
class DeadPacket:
    """The sending host's port `port` died."""

    port: bytes


@dataclass(frozen=True)
class NamePacket:
    """netname: `name` now stands for the port `ref`."""

    name: str
    ref: Ref


@dataclass(frozen=True)
class UnnamePacket:
    """netname: `name` was checked out."""

    name: str


@dataclass(frozen=True)
class MovedPacket:
    """The receive right of the sender's port `port` moved away (see module docstring)."""

    port: bytes


@dataclass(frozen=True)
class FlushPacket:
    """Every message host `origin` sent to `port` along this path precedes this one."""

    port: bytes
    origin: str
    nonce: bytes


@dataclass(frozen=True)
class FlushedPacket:
    """The sender receives on `port`; the FLUSH with `nonce` reached it."""

    port: bytes
    nonce: bytes


@dataclass(frozen=True)
class DisownPacket:
    """The holder of `port`'s ownership (it knows `token`) gave it up."""

    port: bytes
    token: bytes


@dataclass(frozen=True)
class OwnerPacket:
    """The ownership of `port` (proven by `token`) is now on host `host`."""

    port: bytes
    token: bytes
    host: str


@dataclass(frozen=True)
class PageInPacket:
    """A kernel of the sender asks the memory object `port` for [offset, offset+length)."""

    port: bytes
    offset: int
    length: int
    access: int


@dataclass(frozen=True)
class PagePacket:
    """Data at `offset` of a memory object, for the sender's pager request port `port`
    (decoded, `data` is a read-only view of the packet's bytes: not copied)."""

    port: bytes
    offset: int
    data: bytes | memoryview


@dataclass(frozen=True)
class ReceivePacket:
    """The receive right `right` comes back to the host of its owner."""

    right: RightItem


@dataclass(frozen=True)
class ChokePacket:
    """The sending host's port `port` is full (`backlog` messages): hold what is sent to
    it until READY (a port's backlog across hosts)."""

    port: bytes
    backlog: int


@dataclass(frozen=True)
class ReadyPacket:
    """The sending host's port `port` has room again (or is no longer there)."""

    port: bytes


@dataclass(frozen=True)
class AckPacket:
    """The sending host took the MSG that asked `ask`: `count` messages of that window
    are no longer on their way."""

    ask: bytes
    count: int


Packet = (MsgPacket | DeadPacket | NamePacket | UnnamePacket | MovedPacket | FlushPacket
          | FlushedPacket | DisownPacket | OwnerPacket | ReceivePacket | PageInPacket
          | PagePacket | ChokePacket | ReadyPacket | AckPacket)


def new_net_id() -> bytes:
    """A fresh, unguessable network port id."""
    return secrets.token_bytes(NET_ID_SIZE)


MIGRATE_NET_ID = b"\0" * (NET_ID_SIZE - 7) + b"migrate"  # reserved: a host's migration
# server (net/migration.py); no host exports a port under it (new_net_id is random)


# -- encoding -----------------------------------------------------------------------------
def encode_packet(packet: Packet) -> bytes:
    """The bytes of `packet`; WireError if a value cannot travel or a netname is out of
    range (hosts and ids are checked where they are made: station.py, new_net_id). A
    PAGE's data is copied once (it is most of the bytes that cross)."""
    if isinstance(packet, PagePacket) and isinstance(packet.data, bytes | memoryview):
        return b"".join((page_head(packet.port, packet.offset, len(packet.data)), packet.data))
    return wire.encode(_packet_values(packet))


def page_head(port: bytes, offset: int, size: int) -> bytes:
    """The bytes of PagePacket(port, offset, data) before its `size` bytes of data (a
    sender may build the packet around data it reads in place: no copy)."""
    return wire.blob_head([K_PAGE, port, offset], size)


def _packet_values(packet: Packet) -> list[Any]:
    if isinstance(packet, MsgPacket):
        return [K_MSG, packet.dest, packet.msg_id, _ref_values(packet.reply),
                [_item_values(i) for i in packet.items], packet.ask, packet.count]
    if isinstance(packet, DeadPacket):
        return [K_DEAD, packet.port]
    if isinstance(packet, NamePacket):
        return [K_NAME, _netname(packet.name), _ref_values(packet.ref)]
    if isinstance(packet, UnnamePacket):
        return [K_UNNAME, _netname(packet.name)]
    if isinstance(packet, MovedPacket):
        return [K_MOVED, packet.port]
    if isinstance(packet, FlushPacket):
        return [K_FLUSH, packet.port, packet.origin, packet.nonce]
    if isinstance(packet, FlushedPacket):
        return [K_FLUSHED, packet.port, packet.nonce]
    if isinstance(packet, DisownPacket):
        return [K_DISOWN, packet.port, packet.token]
    if isinstance(packet, OwnerPacket):
        return [K_OWNER, packet.port, packet.token, packet.host]
    if isinstance(packet, PageInPacket):
        return [K_PAGEIN, packet.port, packet.offset, packet.length, packet.access]
    if isinstance(packet, PagePacket):
        return [K_PAGE, packet.port, packet.offset, packet.data]
    if isinstance(packet, ChokePacket):
        return [K_CHOKE, packet.port, packet.backlog]
    if isinstance(packet, ReadyPacket):
        return [K_READY, packet.port]
    if isinstance(packet, AckPacket):
        return [K_ACK, packet.ask, packet.count]
    return [K_RECEIVE, *_right_values(packet.right)]


def _right_values(r: RightItem) -> list[Any]:
    return [r.kind, r.ref[0], r.ref[1], r.new_id, r.owner, r.token, r.backlog]


def _ref_values(ref: Ref | None) -> list[Any] | None:
    return None if ref is None else [ref[0], ref[1]]


def _item_values(item: NetItem) -> list[Any]:
    if isinstance(item, PortRef):
        return [I_PORT, _ref_values(item.ref)]
    if isinstance(item, PortRefs):
        return [I_PORTS, [_ref_values(r) for r in item.refs]]
    if isinstance(item, OolData):
        return [I_OOL, item.data]
    if isinstance(item, RightItem):
        return [I_RIGHT, *_right_values(item)]
    if isinstance(item, RightItems):
        return [I_RIGHTS, [_right_values(r) for r in item.rights]]
    if isinstance(item, CorItem):
        return [I_COR, item.ref[0], item.ref[1], item.size]
    if isinstance(item, IntArray):
        return [I_INTS, [int(v) for v in item.values]]
    if isinstance(item, Int):
        return [I_INT, int(item.value)]  # an Int may hold a bool locally
    if isinstance(item, Float):
        return [I_FLOAT, float(item.value)]
    if isinstance(item, Bytes):
        return [I_BYTES, bytes(item.value)]
    if isinstance(item, Str):
        return [I_STR, item.value]
    raise WireError(f"a {type(item).__name__} item cannot cross hosts")


# -- decoding -----------------------------------------------------------------------------
def decode_packet(data: bytes | bytearray | memoryview) -> Packet:
    """The packet in `data`, or WireError saying what is wrong with it. A PAGE's data
    is a read-only view of `data` (not copied: it is most of the bytes that cross)."""
    if len(data) > wire.MAX_BODY:
        raise WireError(f"packet of {len(data)} bytes exceeds {wire.MAX_BODY}")
    if data[:len(_PAGE_KIND)] == _PAGE_KIND:
        values, blob = wire.decode_with_blob(data)
        values.append(blob)
    else:
        values = wire.decode(data)
    if not values or type(values[0]) is not int:
        raise WireError("a packet starts with its kind (an int)")
    kind = values[0]
    if kind == K_MSG:
        return _msg(values)
    if kind == K_NAME:
        wire.check(values, (int, str, list), "NAME packet")
        return NamePacket(_netname(values[1]), _ref(values[2], "NAME port"))
    if kind == K_UNNAME:
        wire.check(values, (int, str), "UNNAME packet")
        return UnnamePacket(_netname(values[1]))
    if kind == K_RECEIVE:
        return ReceivePacket(_right(values[1:], "RECEIVE right"))
    if kind in _ID_PACKETS:
        return _id_packet(kind, values)
    raise WireError(f"unknown packet kind {kind}")


_PAGE_KIND = wire.encode([K_PAGE])  # how a PAGE packet begins

# Packets of ids and hosts only: (their name, the types after the kind, which are ids)
_ID_PACKETS: dict[int, tuple[str, tuple[type, ...], tuple[int, ...]]] = {
    K_DEAD: ("DEAD", (bytes,), (1,)),
    K_MOVED: ("MOVED", (bytes,), (1,)),
    K_FLUSH: ("FLUSH", (bytes, str, bytes), (1, 3)),
    K_FLUSHED: ("FLUSHED", (bytes, bytes), (1, 2)),
    K_DISOWN: ("DISOWN", (bytes, bytes), (1, 2)),
    K_OWNER: ("OWNER", (bytes, bytes, str), (1, 2)),
    K_PAGEIN: ("PAGEIN", (bytes, int, int, int), (1,)),
    K_PAGE: ("PAGE", (bytes, int, memoryview), (1,)),
    K_CHOKE: ("CHOKE", (bytes, int), (1,)),
    K_READY: ("READY", (bytes,), (1,)),
    K_ACK: ("ACK", (bytes, int), (1,)),
}


def _id_packet(kind: int, values: list[Any]) -> Packet:
    what, types, ids = _ID_PACKETS[kind]
    wire.check(values, (int, *types), f"{what} packet")
    for n in ids:
        _net_id(values[n], f"{what} value {n}")
    if kind == K_DEAD:
        return DeadPacket(values[1])
    if kind == K_MOVED:
        return MovedPacket(values[1])
    if kind == K_FLUSH:
        return FlushPacket(values[1], check_host(values[2], "FLUSH origin"), values[3])
    if kind == K_FLUSHED:
        return FlushedPacket(values[1], values[2])
    if kind == K_DISOWN:
        return DisownPacket(values[1], values[2])
    if kind == K_OWNER:
        return OwnerPacket(values[1], values[2], check_host(values[3], "OWNER host"))
    if kind == K_READY:
        return ReadyPacket(values[1])
    if kind == K_ACK:
        return AckPacket(values[1], _ask_count(values[2], "ACK"))
    if kind == K_CHOKE:
        if not 0 < values[2] <= MAX_BACKLOG:
            raise WireError(f"CHOKE backlog {values[2]} is not in 1..{MAX_BACKLOG}")
        return ChokePacket(values[1], values[2])
    if not 0 <= values[2] < MAX_COR:
        raise WireError(f"{what} offset {values[2]} is not in 0..{MAX_COR}")
    if kind == K_PAGEIN:
        if not 0 < values[3] <= MAX_COR:
            raise WireError(f"PAGEIN length {values[3]} is not in 1..{MAX_COR}")
        return PageInPacket(values[1], values[2], values[3], values[4])
    return PagePacket(values[1], values[2], values[3])


def _right(values: list[Any], what: str) -> RightItem:
    """A RightItem from its fields [kind, host, old, new, owner, token, backlog]."""
    wire.check(values, (int, str, bytes, bytes, (str, _NONE), (bytes, _NONE), int), what)
    kind, host, old, new, owner, token, backlog = values
    if kind not in RIGHT_KINDS:
        raise WireError(f"{what}: {kind} is not a kind of moved right")
    if not 0 <= backlog <= MAX_BACKLOG:
        raise WireError(f"{what}: backlog {backlog} is not in 0..{MAX_BACKLOG}")
    if owner is not None:
        check_host(owner, what)
    if owner is not None and token is None:
        raise WireError(f"{what}: an owner elsewhere needs its token")
    return RightItem(kind, (check_host(host, what), _net_id(old, what)), _net_id(new, what),
                     owner, None if token is None else _net_id(token, what), backlog)


def _msg(values: list[Any]) -> MsgPacket:
    wire.check(values, (int, bytes, int, (list, _NONE), list, (bytes, _NONE), int),
               "MSG packet")
    items = tuple(_item(v, n) for n, v in enumerate(values[4]))
    ask, count = values[5], values[6]
    if ask is None and count != 0:
        raise WireError(f"MSG count {count} without an ask")
    if ask is not None:
        _net_id(ask, "MSG ask")
        _ask_count(count, "MSG")
    return MsgPacket(_net_id(values[1], "MSG dest"), values[2],
                     _opt_ref(values[3], "MSG reply"), items, ask, count)


def _ask_count(count: int, what: str) -> int:
    if not 0 < count <= MAX_ASK:
        raise WireError(f"{what} count {count} is not in 1..{MAX_ASK}")
    return count


def _net_id(value: bytes, what: str) -> bytes:
    if len(value) != NET_ID_SIZE:
        raise WireError(f"{what}: a port id is {NET_ID_SIZE} bytes, not {len(value)}")
    return value


def check_host(value: str, what: str = "host") -> str:
    """`value` if it can name a host on the wire; WireError otherwise."""
    if not 0 < len(value) <= MAX_HOST:
        raise WireError(f"{what}: a host name is 1 to {MAX_HOST} characters")
    return value


def _netname(value: str) -> str:
    if not 0 < len(value) <= MAX_NETNAME:
        raise WireError(f"a netname is 1 to {MAX_NETNAME} characters, not {len(value)}")
    return value


def _ref(value: Any, what: str) -> Ref:
    if not isinstance(value, list):
        raise WireError(f"{what}: a port reference is a list, not {type(value).__name__}")
    wire.check(value, (str, bytes), what)
    return check_host(value[0], what), _net_id(value[1], what)


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise WireError(f"{what}: expected a list, not {type(value).__name__}")
    return value


def _opt_ref(value: Any, what: str) -> Ref | None:
    return None if value is None else _ref(value, what)


def _item(value: Any, n: int) -> NetItem:
    what = f"MSG item {n}"
    if not isinstance(value, list) or not value or type(value[0]) is not int:
        raise WireError(f"{what}: an item is a list that starts with its type")
    tag = value[0]
    if tag in _PLAIN:
        wire.check(value, (int, _PLAIN[tag]), what)
        return _plain(tag, value[1])
    if tag == I_INTS:
        wire.check(value, (int, list), what)
        wire.check(value[1], (int,) * len(value[1]), what)
        return IntArray(tuple(value[1]))
    if tag == I_PORT:
        wire.check(value, (int, (list, _NONE)), what)
        return PortRef(_opt_ref(value[1], what))
    if tag == I_PORTS:
        wire.check(value, (int, list), what)
        return PortRefs(tuple(_opt_ref(r, what) for r in value[1]))
    if tag == I_RIGHT:
        return _right(value[1:], what)
    if tag == I_RIGHTS:
        wire.check(value, (int, list), what)
        return RightItems(tuple(_right(_list(r, what), what) for r in value[1]))
    if tag == I_COR:
        wire.check(value, (int, str, bytes, int), what)
        if not 0 < value[3] <= MAX_COR:
            raise WireError(f"{what}: {value[3]} bytes by reference is not in 1..{MAX_COR}")
        return CorItem((check_host(value[1], what), _net_id(value[2], what)), value[3])
    raise WireError(f"{what}: unknown item type {tag}")


_PLAIN: dict[int, type] = {I_INT: int, I_FLOAT: float, I_BYTES: bytes, I_STR: str,
                           I_OOL: bytes}


def _plain(tag: int, value: Any) -> NetItem:
    """The item for a value whose type `_item` checked against `_PLAIN[tag]`."""
    if tag == I_INT:
        return Int(value)
    if tag == I_FLOAT:
        return Float(value)
    if tag == I_BYTES:
        return Bytes(value)
    if tag == I_STR:
        return Str(value)
    return OolData(value)
