"""Direct channels between native tasks: the packets on a channel and its shared page.

machd may give a native sending task a *direct channel* to a port whose receive right
another native task holds (machd/channels.py grants it and tears it down; the runtime of
both tasks, libmach/direct.py, uses it). A channel is one AF_UNIX SOCK_SEQPACKET
socketpair and one shared page:

- sender -> receiver: one packet per message, `encode_packet`: the typed wire
  (include/wire.py) of one Message whose items are data only (Int, Float, Bytes, Str,
  IntArray) and whose `local_port` is 0 (no reply port) or i + 1 for the channel's i-th
  bound reply port (machd binds at most `REPLIES_MAX`, each at the sender's request,
  giving the receiver a send right; the receiver asks machd for their names in its
  space); `remote_port` is 0. A message the channel cannot carry (rights, memory, code,
  another reply disposition, more reply ports) is *held* by machd (CHANNEL_HOLD: copied
  in as a send would, under a token), and its packet, `encode_held`, says only that:
  remote_port 1, the token as id, no items. The receiver claims it from machd
  (CHANNEL_CLAIM), so it keeps its place among the sender's messages. Whoever reads a
  packet decodes it with `decode_packet`, which refuses anything else (a WireError): a
  channel is another task's input and never carries rights, memory or code itself, and
  its sender's identity is machd's word (the grant), never the packet's.
- receiver (or machd) -> sender: one-byte wake-ups for a sender waiting for room.
- the page (a memfd machd seals to its size before a descriptor of it leaves machd):
  u64 counters, each party writing only its own, from its own count (a peer maps the
  page too and may write anything in its words, so every reader bounds what it reads):
  `SENT` (the sender: packets written), `RECEIVED` (the receiver: packets taken),
  `QUEUED` and `BACKLOG` (machd: the messages queued for the port in machd, and the
  port's backlog), `WAITING` (the sender: it waits for room; whoever makes room writes
  a wake-up). A sender has room while
  QUEUED + SENT - RECEIVED < BACKLOG.

`CHANNEL_MARKER` is the id of machd's internal message (sender uid None: the kernel's)
that tells the receiver, in the port's queue order, that a channel exists; its one Int
item is the channel's id.
"""

from __future__ import annotations

from pymach.include import wire
from pymach.include.message import (
    MSG_SIZE_MAX,
    Bytes,
    Float,
    Int,
    IntArray,
    Message,
    Str,
)

CHANNEL_MARKER = -0x4D41_4348_4348  # "MACHCH": an id no pymach interface uses
PACKET_MAX = MSG_SIZE_MAX + 4096  # a packet's bytes at most (the wire's own overhead)
PAGE_SIZE = 4096
SENT, RECEIVED, QUEUED, BACKLOG, WAITING = 0, 1, 2, 3, 4
WAKE = b"w"
REPLIES_MAX = 8  # reply ports bound to one channel
DATA_ITEMS = frozenset((Int, Float, Bytes, Str, IntArray))


def channel_eligible(msg: Message) -> bool:
    """True if `msg` may travel on a channel: data items only, within the default
    inline limit, and a reply port (if any) with its default disposition."""
    if msg.local_disposition is not None:
        return False
    return all(type(i) in DATA_ITEMS for i in msg.items) and msg.size <= MSG_SIZE_MAX


def encode_packet(msg: Message, reply_index: int) -> bytes:
    """One channel packet for an eligible message; `reply_index` is 0 (no reply port) or
    1 + the index of its bound reply port (see module docstring)."""
    return wire.encode([Message(0, reply_index, msg.id, msg.items)])


def encode_held(token: int) -> bytes:
    """The packet for a message machd holds under `token` (see module docstring)."""
    return wire.encode([Message(1, 0, token, [])])


def decode_packet(data: bytes | bytearray | memoryview) -> tuple[Message, int]:
    """The message of one packet and its reply index (0: none; -1: a held message's
    packet, whose id is its token); WireError if the packet is not exactly one
    data-only message within the inline limit, or a held message's packet."""
    if len(data) > PACKET_MAX:
        raise wire.WireError(f"a channel packet of {len(data)} bytes")
    values = wire.decode(data)
    if len(values) != 1 or not isinstance(values[0], Message):
        raise wire.WireError("a channel packet holds one message")
    msg: Message = values[0]
    if msg.remote_port == 1 and msg.local_port == 0 and not msg.items and \
            msg.local_disposition is None:
        return msg, -1
    if msg.remote_port != 0 or not 0 <= msg.local_port <= REPLIES_MAX or \
            msg.local_disposition is not None:
        raise wire.WireError("a channel packet names no port")
    if not all(type(i) in DATA_ITEMS for i in msg.items) or msg.size > MSG_SIZE_MAX:
        raise wire.WireError("a channel packet carries data items only, inline size")
    return msg, msg.local_port
