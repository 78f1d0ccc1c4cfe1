"""The blackboard server of paper section 8.4 (Agora): hypotheses in a mapped memory object.

"The blackboard physically resides on a multiprocessor host. All accesses to the
blackboard are through a procedural interface that determines if shared memory or
communication must be used." `BlackboardServer` keeps named boards on its host; the
library `pymach.apps.blackboard` is the procedural interface.

- **One memory object per board**, served by this server (a `DataManager`: pages the
  kernel writes back are kept here and provided again). The server maps every board
  into its own space; agents on its host map it too, so all of them share the kernel's
  pages (in native mode, one memfd).
- **The board's layout** (little-endian): a header page (magic, nonce, *committed*, the
  index's and the log's offsets and sizes), an *index* (the log offset of record n), and
  an append-only *log* of records, each 8-byte aligned and never moved or reused:
  `seq q | crc I | length I` (the 16-byte *head*) then the *body*
  `confidence d | kind length H | poster length H | payload length I | flags B | 7x`,
  the kind and poster (UTF-8) and the payload. `crc` is CRC-32 of `seq, length` and the
  body. A VOID record stands for a post that never completed; readers skip it.
- **Sequence numbers come from the server.** A local agent asks for a *reservation*
  (`bb_reserve`: the next sequence number and where its record goes, written into the
  index before the reply), writes the body and then the head into the shared log
  itself, and sends `bb_commit` (no reply). A remote agent sends the whole hypothesis
  (`bb_post`); the server reserves, writes and commits it at once.
- **The committed count** (header word H_COMMITTED) is written by this server only, in
  its service thread: it is advanced past record n once n and every record before it
  are committed, after the server checked n (sequence number, reserved length, CRC,
  field bounds; a record that fails is made VOID). So readers read records
  [since, committed) straight from memory, and every reader, local or remote, sees the
  same records in the same order, each whole.
- **Clients.** `bb_open` gives each client a random id, which names it in its later
  calls, and takes a send right to its *token* port. When the token dies (its task
  ended, or its host left the network) the client's reservations still open become
  VOID, so the readers behind them go on. (A right in a message can die on its way: a
  commit sent just before its task ended would arrive without its sender's token. An
  id cannot, and the death's notice comes after every message the client sent.)
- **Waiting.** `bb_read` with `block` set is answered only once the board has a
  committed record at or after `since`. The server keeps no clock: a waiter is parked
  per reply port (a later request on the same port replaces it) and a client waits
  with its own receive timeout, asking again as it goes (a client whose token died is
  forgotten, with its parked waits).

Invariants: board and client state change in the service thread only (the pager
threads store and provide written-back pages, under `_pages_lock`, and forward
token deaths to the service thread as messages); no lock is held across a Mach call.
Every value from a request is bounded before use: a request comes from any task, on
any host.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import struct
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pymach import mach
from pymach.errors import MachError
from pymach.include.mach_defs import TASK_BOOTSTRAP_PORT, TASK_NOTIFY_PORT
from pymach.include.message import (
    COPY_SEND,
    MAKE_SEND,
    OOL,
    RCV_TIMEOUT,
    SEND_TIMEOUT,
    Int,
    Message,
    Port,
)
from pymach.include.mig import (
    DATA,
    FLOAT,
    INT,
    INT_ARRAY,
    PORT,
    PORT_ARRAY,
    PORT_MAKE,
    STR,
    Subsystem,
    decode_items,
    encode_outs,
    error_reply,
    serve_message,
)
from pymach.include.netname_defs import netname_defs
from pymach.include.vm_param import round_page
from pymach.ipc.ipc_notify import NOTIFY_OVERFLOW, NOTIFY_PORT_DELETED
from pymach.mach_vm import memory, take_ool, vm_page_size
from pymach.net.netname import NameServer
from pymach.pagers.data_manager import DataManager

SERVICE = "blackboard"  # the name a server checks in under, by default
MAGIC = int.from_bytes(b"PYMBB001", "little")
H_MAGIC, H_NONCE, H_COMMITTED, H_INDEX, H_INDEX_MAX, H_LOG, H_CAPACITY = range(0, 56, 8)
HEAD = struct.Struct("<qII")  # seq, crc, length
BODY = struct.Struct("<dHHIB7x")  # confidence, kind, poster and payload lengths, flags
HEAD_CRC = struct.Struct("<qI")  # what the CRC covers before the body: seq, length
F_TEXT, F_VOID = 1, 2
RECORD_MIN = 48  # head, body and at least one byte of kind, aligned
KIND_MAX = POSTER_MAX = 64  # bytes of UTF-8
PAYLOAD_MAX = 32 << 10
RECORD_MAX = HEAD.size + BODY.size + KIND_MAX + POSTER_MAX + PAYLOAD_MAX + 8
SIZE_DEFAULT, SIZE_MIN, SIZE_MAX = 1 << 20, 64 << 10, 256 << 20  # a board's log, bytes
BOARDS_MAX, CLIENTS_MAX = 64, 4096
PENDING_MAX = 256  # reservations one client may hold open at once
WAITERS_MAX = 16  # parked waits of one client
READ_REPLY_MAX = 256 << 10  # log bytes in one bb_read reply
NAME_MAX = 64
PATH_AUTO, PATH_MEMORY, PATH_MESSAGES = 0, 1, 2

REAP_CLIENT = 6990  # to the service port, from our own threads: this token died

bb_defs = Subsystem("blackboard", 6900)
bb_defs.routine("bb_open", "server", [("name", STR), ("size", INT), ("host", PORT),
                                      ("token", PORT_MAKE), ("path", INT)],
                [("client", INT), ("board", INT), ("local", INT), ("object", PORT_ARRAY),
                 ("layout", INT_ARRAY)],
                "Open the named board (made with a log of `size` bytes if new) for a new "
                "client: its id (a random number that names it in later calls), whose end "
                "`token`'s death tells. `host` is the client's host port: the "
                "same as ours means it may map the board (path 0: choose, 1: memory, 2: "
                "messages). local=1 comes with the memory object and the layout: object "
                "size, index offset, index entries, log offset, log capacity.")
bb_defs.routine("bb_reserve", "server", [("client", INT), ("board", INT), ("length", INT)],
                [("seq", INT), ("offset", INT)],
                "A local client's next record: its sequence number and log offset.")
bb_defs.routine("bb_commit", "server", [("client", INT), ("board", INT), ("seq", INT)],
                simple=True, doc="The reserved record `seq` is written (no reply).")
bb_defs.routine("bb_post", "server", [("client", INT), ("board", INT), ("kind", STR),
                                      ("payload", DATA), ("text", INT),
                                      ("confidence", FLOAT), ("poster", STR)],
                [("seq", INT)], "Post a hypothesis through the server (a remote client).")
bb_defs.routine("bb_read", "server", [("client", INT), ("board", INT), ("since", INT),
                                      ("limit", INT), ("max_bytes", INT), ("block", INT),
                                      ("serial", INT)],
                [("serial", INT), ("committed", INT), ("count", INT), ("records", DATA)],
                "Committed records from `since` (at most `limit` and about `max_bytes`, "
                "at least one if any), as log bytes; with `block`, answered only once there "
                "is one. `serial` comes back as it was sent.")
bb_defs.routine("bb_close", "server", [("client", INT)], doc="The client is done.")
bb_defs.routine("bb_stats", "server", outs=[("stats", INT_ARRAY)],
                doc="Counters, named by STAT_NAMES.")
BB_READ = bb_defs.by_name["bb_read"]
STAT_NAMES = ("boards", "clients", "reservations", "remote_posts", "voided", "commits",
              "remote_reads", "parked_waits")


# -- records --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Hypothesis:
    """One record of a board: its sequence number (the board's order), kind, payload
    (bytes, or str if posted as text), confidence in [0, 1], and poster."""

    seq: int
    kind: str
    payload: bytes | str
    confidence: float
    poster: str


def record_length(kind: bytes, poster: bytes, payload: bytes) -> int:
    """The log bytes a record of these fields takes (8-byte aligned)."""
    return -(-(HEAD.size + BODY.size + len(kind) + len(poster) + len(payload)) // 8) * 8


def encode_record(seq: int, kind: bytes, poster: bytes, payload: bytes, flags: int,
                  confidence: float, length: int) -> bytes:
    """A whole record of `length` bytes (head first), zero-padded."""
    body = bytearray(BODY.pack(confidence, len(kind), len(poster), len(payload), flags))
    body += kind + poster + payload
    body += bytes(length - HEAD.size - len(body))
    crc = zlib.crc32(body, zlib.crc32(HEAD_CRC.pack(seq, length)))
    return HEAD.pack(seq, crc, length) + bytes(body)


def void_record(seq: int, length: int) -> bytes:
    """The record that stands for reservation `seq` whose post never completed."""
    return encode_record(seq, b"", b"", b"", F_VOID, 0.0, length)


def check_fields(kind: bytes, poster: bytes, payload: bytes, confidence: float) -> None:
    """KERN_INVALID_ARGUMENT unless the fields fit a record (from any client)."""
    if not 1 <= len(kind) <= KIND_MAX or len(poster) > POSTER_MAX:
        raise MachError("KERN_INVALID_ARGUMENT", f"a kind is 1 to {KIND_MAX} bytes and a "
                        f"poster at most {POSTER_MAX}")
    if len(payload) > PAYLOAD_MAX:
        raise MachError("KERN_INVALID_ARGUMENT", f"a payload is at most {PAYLOAD_MAX} bytes")
    if not (math.isfinite(confidence) and 0.0 <= confidence <= 1.0):
        raise MachError("KERN_INVALID_ARGUMENT", "a confidence is a number in [0, 1]")


def parse_record(data: bytes | memoryview, at: int, seq: int) -> tuple[Hypothesis | None, int]:
    """The record for `seq` at `at` in `data` (None if VOID) and its length. Every field
    is checked against `data`'s bounds and the record's CRC; KERN_FAILURE if any fails
    (a record not yet whole, or damaged)."""
    if at + HEAD.size + BODY.size > len(data):
        raise _damaged(seq, "cut short")
    got, crc, length = HEAD.unpack_from(data, at)
    if got != seq or not RECORD_MIN <= length <= RECORD_MAX or length % 8 or (
            at + length > len(data)):
        raise _damaged(seq, "bad head")
    body = bytes(data[at + HEAD.size:at + length])
    if zlib.crc32(body, zlib.crc32(HEAD_CRC.pack(seq, length))) != crc:
        raise _damaged(seq, "bad checksum")
    confidence, nk, np, nd, flags = BODY.unpack_from(body)
    if flags & F_VOID:
        return None, length
    if BODY.size + nk + np + nd > len(body) or flags & ~F_TEXT:
        raise _damaged(seq, "bad lengths")
    fields = body[BODY.size:BODY.size + nk + np + nd]
    try:
        kind, poster = fields[:nk].decode(), fields[nk:nk + np].decode()
        payload: bytes | str = fields[nk + np:]
        if flags & F_TEXT:
            payload = fields[nk + np:].decode()
    except UnicodeDecodeError:
        raise _damaged(seq, "bad text") from None
    return Hypothesis(seq, kind, payload, confidence, poster), length


def parse_records(data: bytes | memoryview, first: int,
                  count: int) -> list[Hypothesis]:
    """`count` consecutive records from sequence number `first`, VOID ones left out."""
    out: list[Hypothesis] = []
    at = 0
    for seq in range(first, first + count):
        record, length = parse_record(data, at, seq)
        at += length
        if record is not None:
            out.append(record)
    return out


def _damaged(seq: int, why: str) -> MachError:
    return MachError("KERN_FAILURE", f"blackboard record {seq} is not whole ({why})")


# -- reading a board's memory ------------------------------------------------------------------

class BoardMemory(Protocol):
    """Bytes of a mapped board, by offset in the board object."""

    def read(self, off: int, n: int) -> bytes:
        """`n` bytes at `off`."""
        ...


@dataclass(frozen=True)
class Layout:
    """Where a board's parts are in its object (all offsets from the object's start)."""

    size: int
    index: int
    index_max: int
    log: int
    capacity: int

    @classmethod
    def for_capacity(cls, capacity: int, page: int) -> Layout:
        """The layout of a board whose log holds `capacity` bytes."""
        index_max = capacity // RECORD_MIN
        log = page + round_page(index_max * 8, page)
        return cls(log + round_page(capacity, page), page, index_max, log, capacity)

    def values(self) -> list[int]:
        """As bb_open sends it."""
        return [self.size, self.index, self.index_max, self.log, self.capacity]


def committed_of(mem: BoardMemory) -> int:
    """The board's committed count (records [0, n) are whole and in order)."""
    value: int = struct.unpack("<q", mem.read(H_COMMITTED, 8))[0]
    return value


def read_span(mem: BoardMemory, layout: Layout, since: int, committed: int, limit: int,
              max_bytes: int) -> tuple[bytes, int]:
    """The log bytes of committed records from `since`: at most `limit` records and
    about `max_bytes` (but at least one record), and how many records they hold.
    Records are contiguous in the log, so this is one read of the log (and the index)."""
    n = min(committed - since, limit, max(1, max_bytes // RECORD_MIN))
    if n <= 0:
        return b"", 0
    more = since + n < committed  # the next record's offset is where the last one ends
    offsets = struct.unpack(f"<{n + more}q", mem.read(layout.index + 8 * since,
                                                      8 * (n + more)))
    start = offsets[0]
    ends = list(offsets[1:])
    if not more:
        last = offsets[-1]
        ends.append(last + HEAD.unpack(mem.read(layout.log + last, HEAD.size))[2])
    count = max(1, sum(1 for end in ends if end - start <= max_bytes))
    end = ends[count - 1]
    if not 0 <= start < end <= layout.capacity or end - start > max(max_bytes, RECORD_MAX):
        raise _damaged(since, "bad index")
    return mem.read(layout.log + start, end - start), count


class _ServerMemory:
    """The server's own mapping of a board, through memory() (which lets other threads
    run while it waits on a fault: the pager threads serving it are ours)."""

    def __init__(self, address: int) -> None:
        self.address = address

    def read(self, off: int, n: int) -> bytes:
        """`n` bytes at offset `off` of the board."""
        return memory().read(self.address + off, n)

    def write(self, off: int, data: bytes) -> None:
        """Store `data` at offset `off` of the board."""
        memory().write(self.address + off, data)


# -- the server's state ---------------------------------------------------------------------

@dataclass
class Board:
    """One board: its object, our mapping of it, and its reservations."""

    slot: int
    name: str
    object: int  # the memory object (receive rights: ours)
    layout: Layout
    mem: _ServerMemory
    next_seq: int = 0
    next_off: int = 0
    committed: int = 0
    pending: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # seq ->
    # (client, offset, length) reserved and not yet committed
    done: set[int] = field(default_factory=set)  # committed, not yet under `committed`
    waiters: dict[int, tuple[int, int, list[int]]] = field(default_factory=dict)  # reply
    # port -> (client, msg id, [since, limit, max_bytes, serial])


@dataclass
class Client:
    """One open Blackboard handle: named by a random id in its calls (a right in a
    message may die on its way, an id does not), and ended by its token's death."""

    token: int
    board: int
    local: bool
    pending: int = 0
    waits: int = 0


class BlackboardServer(DataManager):
    """The section 8.4 blackboard server (see module docstring)."""

    window_min = 0  # it maps its own boards: a fault of its own threads may ask for a
    # page another request covers, so an answer in place could land late on a page a
    # task changed in between (README, "Windows"): its answers go by message

    def __init__(self) -> None:
        super().__init__()
        self.service = 0
        self.boards: list[Board] = []
        self.by_name: dict[str, Board] = {}
        self.by_object: dict[int, Board] = {}
        self.clients: dict[int, Client] = {}  # by client id
        self.by_token: dict[int, int] = {}  # token port -> client id
        self.counts = dict.fromkeys(STAT_NAMES, 0)
        self._pages: dict[tuple[int, int], bytes] = {}  # board pages written back to us
        self._pages_lock = threading.Lock()

    def service_port(self) -> int:
        """The port clients send to (allocated on first call, from the server's task)."""
        if not self.service:
            self.service = mach.port_allocate(mach.task_self())
        return self.service

    def serve(self, threads: int | None = None) -> None:
        """Start the service thread and serve (the pager side) until `stop()`."""
        mach.thread_create(mach.task_self(), self._service_loop, self.service_port())
        super().serve(threads)

    # -- the service thread --------------------------------------------------------------
    def _service_loop(self, port: int) -> None:
        while True:
            try:
                msg = mach.msg_receive(port)
            except MachError:  # our port is gone: the server is ending
                return
            if msg.id == REAP_CLIENT:
                self._reap(_int(msg))
            elif msg.id == BB_READ.id:
                self._read_request(msg)
            else:
                _answer(serve_message(bb_defs, self, msg))

    # -- the interface ---------------------------------------------------------------------
    def bb_open(self, server: int, name: str, size: int, host: int, token: int,
                path: int) -> tuple[int, int, int, list[int], list[int]]:
        """Open (or make) a board for a new client; the memory object if it is local."""
        if not 1 <= len(name.encode()) <= NAME_MAX:
            raise MachError("KERN_INVALID_ARGUMENT", f"a board's name is 1 to {NAME_MAX} bytes")
        if path not in (PATH_AUTO, PATH_MEMORY, PATH_MESSAGES):
            raise MachError("KERN_INVALID_ARGUMENT", f"bad path {path}")
        same_host = host == mach.host_self()
        if path == PATH_MEMORY and not same_host:
            raise MachError("KERN_INVALID_ARGUMENT", f"blackboard {name!r} is on another "
                            f"host: it cannot be mapped here (use the messages path)")
        if token in self.by_token or len(self.clients) >= CLIENTS_MAX:
            raise MachError("KERN_RESOURCE_SHORTAGE", "too many blackboard clients")
        board = self.by_name.get(name) or self._new_board(name, size)
        local = same_host and path != PATH_MESSAGES
        client = secrets.randbits(62) | 1
        self.clients[client] = Client(token, board.slot, local)
        self.by_token[token] = client
        self.counts["clients"] = len(self.clients)
        return (client, board.slot, int(local), [board.object] if local else [],
                board.layout.values())

    def _new_board(self, name: str, size: int) -> Board:
        if not SIZE_MIN <= size <= SIZE_MAX:
            raise MachError("KERN_INVALID_ARGUMENT", f"a board's size is {SIZE_MIN} to "
                            f"{SIZE_MAX} bytes, not {size}")
        if len(self.boards) >= BOARDS_MAX:
            raise MachError("KERN_RESOURCE_SHORTAGE", f"this server holds {BOARDS_MAX} boards")
        layout = Layout.for_capacity(size, vm_page_size())
        mo = self.create_memory_object()
        address = mach.vm_allocate_with_pager(mach.task_self(), 0, layout.size, True, mo, 0)
        mem = _ServerMemory(address)
        mem.write(0, struct.pack("<7q", MAGIC, secrets.randbits(62), 0, *layout.values()[1:]))
        board = Board(len(self.boards), name, mo, layout, mem)
        self.boards.append(board)
        self.by_name[name] = self.by_object[mo] = board
        self.counts["boards"] = len(self.boards)
        return board

    def bb_reserve(self, server: int, client_id: int, board: int,
                   length: int) -> tuple[int, int]:
        """The next sequence number and log offset, for a local client's record."""
        client, b = self._client(client_id, board)
        if not client.local:
            raise MachError("KERN_INVALID_ARGUMENT", "only a client on the board's host "
                            "writes the board itself: post through the server")
        if not RECORD_MIN <= length <= RECORD_MAX or length % 8:
            raise MachError("KERN_INVALID_ARGUMENT", f"a record is {RECORD_MIN} to "
                            f"{RECORD_MAX} bytes, a multiple of 8")
        if client.pending >= PENDING_MAX:
            raise MachError("KERN_RESOURCE_SHORTAGE", "too many posts under way")
        seq, offset = self._reserve(b, client_id, length)
        client.pending += 1
        self.counts["reservations"] += 1
        return seq, offset

    def _reserve(self, b: Board, client_id: int, length: int) -> tuple[int, int]:
        if b.next_seq >= b.layout.index_max or b.next_off + length > b.layout.capacity:
            raise MachError("KERN_NO_SPACE", f"blackboard {b.name!r} is full "
                            f"({b.next_seq} records, {b.next_off} bytes)")
        seq, offset = b.next_seq, b.next_off
        b.mem.write(b.layout.index + 8 * seq, struct.pack("<q", offset))
        b.next_seq, b.next_off = seq + 1, offset + length
        b.pending[seq] = (client_id, offset, length)
        return seq, offset

    def bb_commit(self, server: int, client_id: int, board: int, seq: int) -> None:
        """A local client wrote its reserved record: check it, then commit it."""
        client, b = self._client(client_id, board)
        held = b.pending.get(seq)
        if held is None or held[0] != client_id:
            raise MachError("KERN_INVALID_ARGUMENT", f"record {seq} is not reserved by "
                            f"this client")
        client.pending -= 1
        _, offset, length = held
        try:
            parse_record(b.mem.read(b.layout.log + offset, length), 0, seq)
        except MachError:  # a record that is not whole is never committed
            self._void(b, seq)
        self._commit(b, seq)

    def bb_post(self, server: int, client_id: int, board: int, kind: str, payload: OOL,
                text: int, confidence: float, poster: str) -> int:
        """A whole hypothesis through the server: reserved, written, committed."""
        _, b = self._client(client_id, board)
        data = _bounded_ool(payload, PAYLOAD_MAX)
        kind_b, poster_b = kind.encode(), poster.encode()
        check_fields(kind_b, poster_b, data, confidence)
        if text:
            _utf8(data)
        length = record_length(kind_b, poster_b, data)
        seq, offset = self._reserve(b, client_id, length)
        b.mem.write(b.layout.log + offset, encode_record(
            seq, kind_b, poster_b, data, F_TEXT if text else 0, confidence, length))
        self.counts["remote_posts"] += 1
        self._commit(b, seq)
        return seq

    def bb_close(self, server: int, client_id: int) -> None:
        """The client is done: its open reservations become VOID."""
        if client_id not in self.clients:
            raise MachError("KERN_INVALID_ARGUMENT", "not an open blackboard client")
        self._drop(client_id)

    def bb_stats(self, server: int) -> list[int]:
        """The counters (STAT_NAMES)."""
        self.counts["parked_waits"] = sum(len(b.waiters) for b in self.boards)
        return [self.counts[n] for n in STAT_NAMES]

    def _client(self, client_id: int, board: int) -> tuple[Client, Board]:
        client = self.clients.get(client_id)
        if client is None or client.board != board:
            raise MachError("KERN_INVALID_ARGUMENT", "not an open client of that board")
        return client, self.boards[board]

    # -- committing ----------------------------------------------------------------------
    def _void(self, b: Board, seq: int) -> None:
        _, offset, length = b.pending[seq]
        b.mem.write(b.layout.log + offset, void_record(seq, length))
        self.counts["voided"] += 1

    def _commit(self, b: Board, seq: int) -> None:
        """Record `seq` is whole: advance the committed count past every record that is,
        then answer the waits it satisfies."""
        del b.pending[seq]
        b.done.add(seq)
        self.counts["commits"] += 1
        before = b.committed
        while b.committed in b.done:
            b.done.remove(b.committed)
            b.committed += 1
        if b.committed != before:
            b.mem.write(H_COMMITTED, struct.pack("<q", b.committed))
            self._wake(b)

    # -- reading and waiting ---------------------------------------------------------------
    def _read_request(self, msg: Message) -> None:
        """bb_read: answer now, or park the request until a record comes (`block`)."""
        try:
            client_id, board, *args = decode_items(BB_READ, BB_READ.ins, msg.items,
                                                   "MIG_BAD_ARGUMENTS")
            client, b = self._client(client_id, board)
            since, limit, max_bytes, block, serial = _read_args(args)
            self.counts["remote_reads"] += not client.local
            if b.committed > since or not block or not msg.remote_port:
                _answer(self._read_reply(b, msg.remote_port, msg.id, [since, limit, max_bytes,
                                                                      serial]))
                return
            self._park(b, client, client_id, msg, [since, limit, max_bytes, serial])
        except MachError as e:
            if msg.remote_port:
                _answer(Message(remote_port=msg.remote_port, id=msg.id + 100,
                                items=error_reply(e.code, e.detail)))

    def _park(self, b: Board, client: Client, client_id: int, msg: Message,
              args: list[int]) -> None:
        if msg.remote_port not in b.waiters:
            if client.waits >= WAITERS_MAX:  # the oldest wait of this client is answered
                old = next(p for p, w in b.waiters.items() if w[0] == client_id)
                self._answer_waiter(b, old)
            client.waits += 1
        b.waiters[msg.remote_port] = (client_id, msg.id, args)

    def _wake(self, b: Board) -> None:
        for port in [p for p, w in b.waiters.items() if w[2][0] < b.committed]:
            self._answer_waiter(b, port)

    def _answer_waiter(self, b: Board, port: int) -> None:
        client_id, msg_id, args = b.waiters.pop(port)
        client = self.clients.get(client_id)
        if client is not None:
            client.waits -= 1
        _answer(self._read_reply(b, port, msg_id, args))

    def _read_reply(self, b: Board, port: int, msg_id: int, args: list[int]) -> Message:
        since, limit, max_bytes, serial = args
        data, count = read_span(b.mem, b.layout, since, b.committed, limit, max_bytes) \
            if max_bytes else (b"", 0)
        return Message(remote_port=port, id=msg_id + 100,
                       items=encode_outs(BB_READ, (serial, b.committed, count, data)))

    # -- clients that go -----------------------------------------------------------------
    def _drop(self, client_id: int) -> None:
        """Forget a client: its reservations become VOID, its waits are dropped."""
        client = self.clients.pop(client_id)
        del self.by_token[client.token]
        self.counts["clients"] = len(self.clients)
        b = self.boards[client.board]
        for seq in sorted(s for s, held in b.pending.items() if held[0] == client_id):
            self._void(b, seq)
            self._commit(b, seq)
        for port in [p for p, w in b.waiters.items() if w[0] == client_id]:
            del b.waiters[port]
        with contextlib.suppress(MachError):
            mach.port_deallocate(mach.task_self(), client.token)

    def _reap(self, token: int) -> None:
        """A token died. Everything its client sent before is already served: it was
        queued on the service port before the death, and this notice after it."""
        client_id = self.by_token.get(token)
        if client_id is not None and mach.names_gone([token]):
            self._drop(client_id)  # (a live client's token is never reaped)

    def _notification(self, msg: Message) -> None:
        """A client's token died: forwarded to the service thread."""
        super()._notification(msg)
        if msg.id == NOTIFY_PORT_DELETED and _int(msg) in self.by_token:
            self._forward(_int(msg))
        elif msg.id == NOTIFY_OVERFLOW:
            for token in mach.names_gone(list(self.by_token)):
                self._forward(token)

    def _forward(self, token: int) -> None:
        with contextlib.suppress(MachError):
            mach.msg_send(Message(remote_port=self.service, id=REAP_CLIENT,
                                  items=[Int(token)]))

    # -- the pager side: the boards' pages that the kernel wrote back ----------------------
    def write(self, memory_object: int, offset: int, data: bytes) -> None:
        """Keep written-back pages of a board."""
        ps = vm_page_size()
        with self._pages_lock:
            for at in range(0, len(data), ps):
                self._pages[(memory_object, offset + at)] = data[at:at + ps]

    def read(self, memory_object: int, offset: int, length: int, access: int) -> bytes | None:
        """A board's pages that came back to us (zeros for the others)."""
        ps = vm_page_size()
        with self._pages_lock:
            pages = [self._pages.get((memory_object, offset + at)) for at in range(0, length, ps)]
        if not any(pages):
            return None
        return b"".join(p if p is not None else bytes(ps) for p in pages)


def _read_args(args: list[int]) -> tuple[int, int, int, int, int]:
    since, limit, max_bytes, block, serial = args
    if since < 0 or limit < 0 or max_bytes < 0:
        raise MachError("KERN_INVALID_ARGUMENT", "since, limit and max_bytes are >= 0")
    return since, limit, min(max_bytes, READ_REPLY_MAX), block, serial


def _bounded_ool(item: OOL, limit: int) -> bytes:
    """The bytes of an out-of-line item of at most `limit` bytes (released either way)."""
    if item.size > limit:
        if item.size:
            with contextlib.suppress(MachError):
                mach.vm_deallocate(mach.task_self(), item.address, item.size)
        raise MachError("KERN_INVALID_ARGUMENT", f"a payload is at most {limit} bytes")
    return take_ool(item)


def _utf8(data: bytes) -> None:
    try:
        data.decode()
    except UnicodeDecodeError:
        raise MachError("KERN_INVALID_ARGUMENT", "a text payload must be UTF-8") from None


def _answer(reply: Message | None) -> None:
    """Send a reply without waiting (a client that went away gets none)."""
    if reply is not None:
        with contextlib.suppress(MachError):
            mach.msg_send(reply, SEND_TIMEOUT, 0)


def _int(msg: Message) -> int:
    item = msg.items[0] if msg.items else None
    return item.value if isinstance(item, Int) else 0


# -- starting a server in a task of its own ---------------------------------------------------

def _name_loop(port: int) -> None:
    """A name service for a host that has none (see start_server), on `port` only."""
    names = NameServer()
    while True:
        try:
            msg = mach.msg_receive(port)
        except MachError:
            return
        _answer(serve_message(netname_defs, names, msg))


def _server_main(service: str) -> None:
    server = BlackboardServer()
    me = mach.task_self()
    port = server.service_port()
    ns = mach.task_get_special_port(me, TASK_BOOTSTRAP_PORT)
    given = COPY_SEND
    if not ns:  # no name service on this host: serve one for the board's clients
        ns, given = mach.port_allocate(me), MAKE_SEND
        mach.thread_create(me, _name_loop, ns)
    _check_in(ns, service, port)
    inbox = _port(mach.msg_receive(mach.task_notify(), RCV_TIMEOUT, 30_000))
    mach.msg_send(Message(remote_port=inbox, items=[Port(port, MAKE_SEND), Port(ns, given)]))
    server.serve()


_check_in: Callable[..., Any] = netname_defs.stub("netname_check_in")


def start_server(service: str = SERVICE, name: str = "blackboard") -> tuple[Any, int]:
    """Start a BlackboardServer in a new task (a process in native mode), checked in as
    `service` with the name service of this task's bootstrap port: the netmsgserver of a
    host on a network, which every host sees. A kernel with no name service (a single
    embedded kernel, or machd outside a cluster) gets one in the server's task, and this
    task's bootstrap port is set to it, so the tasks it makes afterwards find the board
    by name too. Returns (the server task's handle, a send right to its port)."""
    if not isinstance(service, str) or not service:
        raise MachError("KERN_INVALID_ARGUMENT", "start_server needs a service name")
    me = mach.task_self()
    inbox = mach.port_allocate(me)
    handle = mach.spawn(_server_main, service, name=name)
    notify = mach.task_get_special_port(handle.port, TASK_NOTIFY_PORT)
    mach.msg_send(Message(remote_port=notify, items=[Port(inbox, MAKE_SEND)]))
    try:
        reply = mach.msg_receive(inbox, RCV_TIMEOUT, 30_000)
    except MachError:
        handle.result(1000)  # (its exception, if it failed)
        raise
    finally:
        mach.port_deallocate(me, inbox)
    port, ns = (item.name for item in reply.items if isinstance(item, Port))
    if not mach.task_get_special_port(me, TASK_BOOTSTRAP_PORT):
        mach.task_set_special_port(me, TASK_BOOTSTRAP_PORT, ns)
    return handle, port


def _port(msg: Message) -> int:
    item = msg.items[0] if msg.items else None
    if not isinstance(item, Port):
        raise MachError("MIG_TYPE_ERROR", "expected a message carrying a port right")
    return item.name
