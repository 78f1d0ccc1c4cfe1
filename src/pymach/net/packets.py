"""Packets between netmsgservers: fixed layouts of typed wire values.

Each packet is the body of the typed wire format (include/wire.py), a flat sequence of
values whose first value is the packet's kind. Nothing here, or anywhere in a network
server, unpickles: `decode_packet` accepts only the layouts below, checks every field's
type and range, and builds only these dataclasses and the plain message items
Int / Float / Bytes / Str / IntArray. Anything else is a `WireError` naming the field.

A network port is named by a *reference* `[host: str, id: bytes]`: the host that holds
its receive right and an unguessable id (NET_ID_SIZE random bytes) that host gave it.
A null port is `None`. The sending host is never a field: the transport names it.

    MSG     [1, dest: id, msg_id: int, reply: ref | None, items: [item, ...]]
            a message for the sender-known port `dest` of the receiving host
    DEAD    [2, port: id]            the sender's port `port` died
    NAME    [3, name: str, port: ref]  netname: `name` now stands for `port`
    UNNAME  [4, name: str]           netname: `name` is checked out

An item is a list whose first value is its type:

    [1, int]  Int      [2, float] Float    [3, bytes] Bytes     [4, str] Str
    [5, [int, ...]]    IntArray
    [6, ref | None]    a send right (Port)
    [7, [ref | None, ...]]  send rights (PortArray)
    [8, bytes]         out-of-line memory, carried by value

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
I_INT, I_FLOAT, I_BYTES, I_STR, I_INTS, I_PORT, I_PORTS, I_OOL = range(1, 9)
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


NetItem = Int | Float | Bytes | Str | IntArray | PortRef | PortRefs | OolData


@dataclass(frozen=True)
class MsgPacket:
    """A message for port `dest` of the receiving host, with reply port `reply`."""

    dest: bytes
    msg_id: int
    reply: Ref | None
    items: tuple[NetItem, ...]


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


Packet = MsgPacket | DeadPacket | NamePacket | UnnamePacket


def new_net_id() -> bytes:
    """A fresh, unguessable network port id."""
    return secrets.token_bytes(NET_ID_SIZE)


# -- encoding -----------------------------------------------------------------------------
def encode_packet(packet: Packet) -> bytes:
    """The bytes of `packet`; WireError if a value cannot travel or a netname is out of
    range (hosts and ids are checked where they are made: station.py, new_net_id)."""
    if isinstance(packet, MsgPacket):
        values: list[Any] = [K_MSG, packet.dest, packet.msg_id, _ref_values(packet.reply),
                             [_item_values(i) for i in packet.items]]
    elif isinstance(packet, DeadPacket):
        values = [K_DEAD, packet.port]
    elif isinstance(packet, NamePacket):
        values = [K_NAME, _netname(packet.name), _ref_values(packet.ref)]
    else:
        values = [K_UNNAME, _netname(packet.name)]
    return wire.encode(values)


def _ref_values(ref: Ref | None) -> list[Any] | None:
    return None if ref is None else [ref[0], ref[1]]


def _item_values(item: NetItem) -> list[Any]:
    if isinstance(item, PortRef):
        return [I_PORT, _ref_values(item.ref)]
    if isinstance(item, PortRefs):
        return [I_PORTS, [_ref_values(r) for r in item.refs]]
    if isinstance(item, OolData):
        return [I_OOL, item.data]
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
def decode_packet(data: bytes) -> Packet:
    """The packet in `data`, or WireError saying what is wrong with it."""
    if len(data) > wire.MAX_BODY:
        raise WireError(f"packet of {len(data)} bytes exceeds {wire.MAX_BODY}")
    values = wire.decode(data)
    if not values or type(values[0]) is not int:
        raise WireError("a packet starts with its kind (an int)")
    kind = values[0]
    if kind == K_MSG:
        return _msg(values)
    if kind == K_DEAD:
        wire.check(values, (int, bytes), "DEAD packet")
        return DeadPacket(_net_id(values[1], "DEAD port"))
    if kind == K_NAME:
        wire.check(values, (int, str, list), "NAME packet")
        return NamePacket(_netname(values[1]), _ref(values[2], "NAME port"))
    if kind == K_UNNAME:
        wire.check(values, (int, str), "UNNAME packet")
        return UnnamePacket(_netname(values[1]))
    raise WireError(f"unknown packet kind {kind}")


def _msg(values: list[Any]) -> MsgPacket:
    wire.check(values, (int, bytes, int, (list, _NONE), list), "MSG packet")
    items = tuple(_item(v, n) for n, v in enumerate(values[4]))
    return MsgPacket(_net_id(values[1], "MSG dest"), values[2],
                     _opt_ref(values[3], "MSG reply"), items)


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
