"""Direct channels between native tasks: the frames on a channel and its shared page.

machd may give a native sending task a *direct channel* to a port whose receive right
another native task holds (machd/channels.py grants it and tears it down; the runtime of
both tasks, libmach/direct.py, uses it). A channel is one AF_UNIX SOCK_STREAM
socketpair and one shared page:

- sender -> receiver: one *frame* per message, `encode_packet`: a header (FRAME: the
  magic FRAME_MAGIC, the body's length, at most PACKET_MAX, and the sender's sequence
  number of the frame, 1, 2, ...) and the typed wire (include/wire.py) of one Message
  whose items are data only (Int, Float, Bytes, Str, IntArray) and whose `local_port` is
  0 (no reply port) or i + 1 for the channel's i-th bound reply port (machd binds at
  most `REPLIES_MAX`, each at the sender's request, giving the receiver a send right;
  the receiver asks machd for their names in its space); `remote_port` is 0. A message
  the channel cannot carry (rights, memory, code, another reply disposition, more reply
  ports) is *held* by machd (CHANNEL_HOLD: copied in as a send would, under a token),
  and its frame, `encode_held`, says only that: remote_port 1, the token as id, no
  items. The receiver claims it from machd (CHANNEL_CLAIM), so it keeps its place among
  the sender's messages. Whoever reads a frame decodes it with `decode_frame`, which
  refuses anything else (a WireError): a channel is another task's input and never
  carries rights, memory or code itself, and its sender's identity is machd's word
  (the grant), never the frame's.
- Why a stream: one frame is one send of at most FRAME_MAX bytes, which the kernel
  queues whole (one buffer) or not at all, so a reader never meets half an honest
  sender's frame; and machd, tearing a channel down, takes everything left on it with
  *one* read, which the kernel does under the socket's read lock: a thread of the
  receiver reading the channel at that moment takes a whole frame before machd's read
  (and keeps it: it was received before the teardown) or nothing after it. So what
  the receiver took is always a prefix of what the sender sent and what machd takes is
  the rest, each frame exactly once (a datagram socket would let the two readers
  interleave frame by frame). A reader takes one frame by peeking it whole, checking
  it, then reading exactly its length; a read that comes back short lost the race to
  machd's read (it comes back empty) and takes nothing. Garbage (a bad header, a body
  that does not decode, half a frame) is the sender's own fault: the receiver leaves
  it on the channel and has machd tear the channel down; machd skips it, looking for
  the next FRAME_MAGIC (`scan_frames`, bounded), so what the sender wrote properly
  after it still arrives.
- receiver (or machd) -> sender: one-byte wake-ups for a sender waiting for room.
- the page (a memfd machd seals to its size before a descriptor of it leaves machd):
  u64 counters, each party writing only its own, from its own count (a peer maps the
  page too and may write anything in its words, so every reader bounds what it reads):
  `SENT` (the sender: frames written, so the next frame's sequence number is SENT + 1:
  machd gives a message it holds that number, so it takes its token's place at a
  teardown even when the token was never written), `RECEIVED` (the receiver: messages
  taken), `QUEUED` and `BACKLOG` (machd: the messages queued for the port in machd, and
  the port's backlog), `WAITING` (the sender: it waits for room; whoever makes room
  writes a wake-up). A sender has room while QUEUED + SENT - RECEIVED < BACKLOG.

`CHANNEL_MARKER` is the id of machd's internal message (sender uid None: the kernel's)
that tells the receiver, in the port's queue order, that a channel exists; its one Int
item is the channel's id.
"""

from __future__ import annotations

import struct

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
PACKET_MAX = MSG_SIZE_MAX + 4096  # a frame's body at most (the wire's own overhead)
FRAME = struct.Struct("<4sIQ")  # a frame's header: magic, body length, sequence number
FRAME_MAGIC = b"PYMC"
FRAME_MAX = FRAME.size + PACKET_MAX  # a frame's bytes at most
RESYNC_MAX = 64  # garbage runs `scan_frames` skips at most (each costs a decode at most)
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


def encode_packet(msg: Message, reply_index: int, seq: int) -> bytes:
    """The frame, numbered `seq`, of an eligible message; `reply_index` is 0 (no reply
    port) or 1 + the index of its bound reply port (see module docstring)."""
    return _frame(wire.encode([Message(0, reply_index, msg.id, msg.items)]), seq)


def encode_held(token: int, seq: int) -> bytes:
    """The frame, numbered `seq`, of a message machd holds under `token`."""
    return _frame(wire.encode([Message(1, 0, token, [])]), seq)


def _frame(body: bytes, seq: int) -> bytes:
    return FRAME.pack(FRAME_MAGIC, len(body), seq & 0xFFFF_FFFF_FFFF_FFFF) + body


def frame_length(head: bytes | bytearray | memoryview) -> int:
    """A frame's whole length from its header, the first FRAME.size bytes of `head`;
    WireError if they are not one (too few, another magic, a body past PACKET_MAX)."""
    if len(head) < FRAME.size:
        raise wire.WireError(f"half a frame header ({len(head)} bytes)")
    magic, length, _ = FRAME.unpack_from(head)
    if magic != FRAME_MAGIC or length > PACKET_MAX:
        raise wire.WireError(f"not a channel frame (magic {bytes(magic)!r}, {length} bytes)")
    return FRAME.size + int(length)


def decode_frame(data: bytes | bytearray | memoryview) -> tuple[int, Message, int]:
    """(sequence number, message, reply index) of exactly one whole frame (see
    `decode_packet`); WireError otherwise."""
    if len(data) < FRAME.size or frame_length(data) != len(data):
        raise wire.WireError(f"not one whole channel frame ({len(data)} bytes)")
    with memoryview(data) as view:
        msg, index = decode_packet(view[FRAME.size:])
    return int(FRAME.unpack_from(data)[2]), msg, index


def scan_frames(data: bytes, limit: int) -> tuple[list[tuple[int, Message, int]], int]:
    """The frames (as `decode_frame` gives them, at most `limit`) in what machd read off
    a channel, in order, and how many bytes of garbage were skipped: past a bad frame the
    scan goes on at the next FRAME_MAGIC (at most RESYNC_MAX times; the rest is then
    garbage), so frames written properly after garbage are found."""
    frames: list[tuple[int, Message, int]] = []
    pos = skipped = bad = 0
    view = memoryview(data)
    while pos < len(data) and len(frames) < limit:
        try:
            end = pos + frame_length(view[pos:])
            frames.append(decode_frame(view[pos:end]))
            pos = end
            continue
        except wire.WireError:
            bad += 1
        nxt = data.find(FRAME_MAGIC, pos + 1) if bad <= RESYNC_MAX else -1
        nxt = len(data) if nxt < 0 else nxt
        skipped, pos = skipped + nxt - pos, nxt
    return frames, skipped


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
