"""Direct channels between native tasks: the frames on a channel and its shared page.

machd may give a native sending task a *direct channel* to a port whose receive right
another native task holds (machd/channels.py grants it and tears it down; the runtime of
both tasks, libmach/direct.py, uses it). A channel is one AF_UNIX SOCK_STREAM
socketpair and one shared page:

- sender -> receiver: one *frame* per message, `encode_packet`: a header (HEAD: the
  magic FRAME_MAGIC, the body's length, at most PACKET_MAX, the sender's sequence number
  of the frame, 1, 2, ..., then the packet's own header: the message id, its reply
  index and its item count) and the items of one message, as the typed wire
  (include/wire.py) carries a message's items, data only (Int, Float, Bytes, Str,
  IntArray). The reply index is 0 (no reply port) or i + 1 for the channel's i-th bound
  reply port (machd binds at most `REPLIES_MAX`, each at the sender's request, giving
  the receiver a send right; the receiver asks machd for their names in its space). A
  message the channel cannot carry (rights, memory, code, another reply disposition,
  more reply ports) is *held* by machd (CHANNEL_HOLD: copied in as a send would, under
  a token), and its frame, `encode_held`, says only that: reply index HELD, the token
  as id, no items. The receiver claims it from machd (CHANNEL_CLAIM), so it keeps its
  place among the sender's messages. Whoever reads a frame checks it whole with
  `parse_frame`, which refuses anything else (a WireError): a channel is another
  task's input and never carries rights, memory or code itself, and its sender's
  identity is machd's word (the grant), never the frame's. (The header is one struct,
  so a message is packed and unpacked in one call each: the codec was an eighth of a
  null `msg_rpc`'s time with the general wire's message value.)
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
    Item,
    Message,
    Str,
    message_size,
)

CHANNEL_MARKER = -0x4D41_4348_4348  # "MACHCH": an id no pymach interface uses
PACKET_MAX = MSG_SIZE_MAX + 4096  # a frame's body at most (the wire's own overhead)
FRAME = struct.Struct("<4sIQ")  # a frame's header: magic, body length, sequence number
PACKET = struct.Struct("<qiI")  # a packet's header: message id, reply index, item count
HEAD = struct.Struct("<4sIQqiI")  # the two, as one frame's first bytes
FRAME_MAGIC = b"PYMC"
HELD = -1  # the reply index of a held message's frame
_U64 = 0xFFFF_FFFF_FFFF_FFFF
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


def encode_packet(msg: Message, reply_index: int, seq: int) -> bytearray:
    """The frame, numbered `seq`, of an eligible message; `reply_index` is 0 (no reply
    port) or 1 + the index of its bound reply port (see module docstring)."""
    out = bytearray(HEAD.size)
    wire.put_items(out, msg.items)
    HEAD.pack_into(out, 0, FRAME_MAGIC, len(out) - FRAME.size, seq & _U64, msg.id,
                   reply_index, len(msg.items))
    return out


def encode_held(token: int, seq: int) -> bytes:
    """The frame, numbered `seq`, of a message machd holds under `token`."""
    return HEAD.pack(FRAME_MAGIC, PACKET.size, seq & _U64, token, HELD, 0)


def frame_length(head: bytes | bytearray | memoryview) -> int:
    """A frame's whole length from its header, the first FRAME.size bytes of `head`;
    WireError if they are not one (too few, another magic, a body shorter than a
    packet's header or past PACKET_MAX)."""
    if len(head) < FRAME.size:
        raise wire.WireError(f"half a frame header ({len(head)} bytes)")
    magic, length, _ = FRAME.unpack_from(head)
    if magic != FRAME_MAGIC or not PACKET.size <= length <= PACKET_MAX:
        raise wire.WireError(f"not a channel frame (magic {bytes(magic)!r}, {length} bytes)")
    return FRAME.size + int(length)


def parse_frame(view: memoryview, n: int) -> tuple[int, int, int, list[Item]]:
    """The first frame among the `n` bytes at the start of `view`, checked whole:
    (its length, the message id, the reply index, the items). The reply index is 0 (no
    reply port), 1..REPLIES_MAX, or HELD (a held message's frame: the id is its token,
    no items). WireError for anything else: half a frame, a bad header, items that are
    not data only, trailing bytes, a message past the inline limit."""
    if n < HEAD.size:
        length = frame_length(view[:n])  # (a WireError, or a header with half a packet)
        raise wire.WireError(f"half a frame ({n} of {length} bytes)")
    magic, length, _, msg_id, index, count = HEAD.unpack_from(view)
    if magic != FRAME_MAGIC or not PACKET.size <= length <= PACKET_MAX:
        raise wire.WireError(f"not a channel frame (magic {bytes(magic)!r}, {length} bytes)")
    length += FRAME.size
    if n < length:
        raise wire.WireError(f"half a frame ({n} of {length} bytes)")
    if not HELD <= index <= REPLIES_MAX or (index == HELD and count):
        raise wire.WireError(f"a channel packet names no port (reply index {index})")
    if not count:
        if length != HEAD.size:
            raise wire.WireError("trailing bytes after a channel packet")
        return length, msg_id, index, []
    if count > length - HEAD.size:
        raise wire.WireError(f"{count} items in a packet of {length} bytes")
    items, pos = wire.get_items(view.toreadonly(), HEAD.size, length, count)
    if pos != length:
        raise wire.WireError("trailing bytes after a channel packet")
    if not all(type(i) in DATA_ITEMS for i in items) or message_size(items) > MSG_SIZE_MAX:
        raise wire.WireError("a channel packet carries data items only, inline size")
    return length, msg_id, index, items


def decode_frame(data: bytes | bytearray | memoryview) -> tuple[int, Message, int]:
    """(sequence number, message, reply index) of exactly one whole frame (see
    `parse_frame`; the message's local_port is its reply index, its id a held
    message's token where that is HELD); WireError otherwise."""
    with memoryview(data) as view:
        length, msg_id, index, items = parse_frame(view, len(data))
        if length != len(data):
            raise wire.WireError(f"not one whole channel frame ({len(data)} bytes)")
        return int(FRAME.unpack_from(view)[2]), Message(0, max(index, 0), msg_id, items), \
            index


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
