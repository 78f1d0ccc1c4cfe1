"""A shared blackboard (paper section 8.4, Agora), as a library for agents.

"Both communication and memory sharing are used to implement a shared blackboard
structure in which hypotheses are placed and evaluated by multiple cooperating agents.
The blackboard physically resides on a multiprocessor host. All accesses to the
blackboard are through a procedural interface that determines if shared memory or
communication must be used." `Blackboard` is that interface; its server is
`pymach.apps.blackboard_server.BlackboardServer` (`start_server`), which also documents
the board's layout in memory.

    board = Blackboard.open("speech")          # finds the server by name
    seq = board.post("phoneme", b"ae", 0.8)    # -> its sequence number
    for h in board.wait(since=0, timeout_ms=1000):
        print(h.seq, h.kind, h.payload, h.confidence, h.poster)
    board.close()

**How the path is chosen.** `open` sends the server its host port (a send right to
`host_self()`). A port from the server's own kernel arrives under the server's own name
for it; one from another host arrives as a netmsgserver proxy, a different port. So the
server knows, from Mach's port identity alone, whether the agent shares its memory:

- *an agent on the board's host* maps the board's memory object. `read` copies records
  straight out of the mapping: no message. `post` asks the server for a reservation
  (one RPC: the sequence number and the offset), writes the record into the shared log
  itself (the body, then the head), and sends a commit (one message, no reply).
- *an agent on another host* gets no memory object: `post` sends the hypothesis to the
  server (one RPC), `read` and `wait` ask for the records (one RPC each, the records
  as the log's own bytes, checked here as a local reader checks them).

Both paths go through the name service and ordinary messages only, so an agent on
another machd of a TCP cluster (net/tcp.py) takes the message path unchanged.

**Guarantees.** Sequence numbers are the board's one order. `read(since)` returns every
committed record with `seq >= since` in that order, each exactly once and whole: a
record is committed (the board's committed count passes it) only when it and every
record before it are written and checked by the server, and a reader checks each
record's CRC-32 besides. Every reader, local or remote, sees the same sequence. A post
that never completed (its agent died between reservation and commit) becomes a VOID
record, which readers skip: sequence numbers may have gaps. Not a security boundary: an
agent on the board's host maps the board read-write.

A `Blackboard` belongs to the task that opened it (another task opens its own).
"""

from __future__ import annotations

import contextlib
import math
import operator
import weakref
from typing import Any, NoReturn

from pymach import mach
from pymach.apps.blackboard_server import (
    BB_READ,
    F_TEXT,
    HEAD,
    PATH_AUTO,
    PATH_MEMORY,
    PATH_MESSAGES,
    READ_REPLY_MAX,
    SERVICE,
    SIZE_DEFAULT,
    SIZE_MAX,
    SIZE_MIN,
    STAT_NAMES,
    Hypothesis,
    Layout,
    bb_defs,
    check_fields,
    committed_of,
    encode_record,
    parse_records,
    read_span,
    record_length,
    start_server,
)
from pymach.errors import MachError, code_name
from pymach.include.mach_defs import TASK_BOOTSTRAP_PORT
from pymach.include.message import OOL, RCV_TIMEOUT, Int, Message
from pymach.include.mig import REPLY_ID_OFFSET, REPLY_SIZE_ANY, TASK_CODEC, decode_items
from pymach.include.vm_param import VM_INHERIT_NONE
from pymach.kern.thread import current_thread
from pymach.mach_vm import memory, take_ool
from pymach.net.netname import netname_wait

__all__ = ["SERVICE", "Blackboard", "Hypothesis", "server_stats", "start_server"]

bb_open = bb_defs.stub("bb_open")
bb_reserve = bb_defs.stub("bb_reserve")
bb_commit = bb_defs.stub("bb_commit")  # a simpleroutine: sent, no reply
bb_post = bb_defs.stub("bb_post")
bb_close = bb_defs.stub("bb_close")
bb_stats = bb_defs.stub("bb_stats")

PATHS = {"auto": PATH_AUTO, "memory": PATH_MEMORY, "messages": PATH_MESSAGES}
LOCAL_CHUNK = 1 << 20  # log bytes one local read copies at a time
WAIT_SLICE_MS = 1000.0  # a wait asks the server again this often (and checks it lives)
RETRIES = 5  # reads of a committed record that does not check, before giving up


def server_stats(server: int) -> dict[str, int]:
    """A blackboard server's counters: boards, clients, reservations (local posts),
    remote_posts, voided, commits, remote_reads, parked_waits."""
    return dict(zip(STAT_NAMES, bb_stats(server), strict=True))


class _Mapping:
    """This task's mapping of a board: real memory (native mode) or the software MMU."""

    def __init__(self, address: int, layout: Layout) -> None:
        self.address, self.layout = address, layout
        self.view = memory().buffer(address, layout.size) if current_thread().native \
            else None

    def read(self, off: int, n: int) -> bytes:
        """`n` bytes at offset `off` of the board."""
        if self.view is not None:
            return self.view[off:off + n].tobytes()
        return memory().read(self.address + off, n)

    def write(self, off: int, data: bytes) -> None:
        """Store `data` at offset `off` of the board."""
        if self.view is not None:
            self.view[off:off + len(data)] = data
        else:
            memory().write(self.address + off, data)

    def release(self) -> None:
        """Let go of the view (before the memory is deallocated)."""
        if self.view is not None:
            self.view.release()
            self.view = None


class Blackboard:
    """An open blackboard (see module docstring). Make one with `Blackboard.open`."""

    name: str
    agent: str
    local: bool

    def __init__(self, name: str, server: int, agent: str, path: int, size: int) -> None:
        """(Use Blackboard.open.)"""
        me = mach.task_self()
        self.name, self.agent, self._server = name, agent, server
        self._owner = weakref.ref(current_thread().task)
        self._token = mach.port_allocate(me)
        self._map: _Mapping | None = None
        self._wait_ports: dict[int, int] = {}  # thread port -> its wait reply port
        self._serial = 0
        try:
            self._id, board, local, objects, values = bb_open(
                server, name, size, mach.host_self(), self._token, path)
        except BaseException:
            mach.port_deallocate(me, self._token)
            raise
        self._board, self.local = board, bool(local)
        self._layout = Layout(*values)
        self.closed = False
        if objects:
            self._map_board(objects[0])

    def _map_board(self, mo: int) -> None:
        me = mach.task_self()
        size = self._layout.size
        address = mach.vm_allocate_with_pager(me, 0, size, True, mo, 0)
        mach.vm_inherit(me, address, size, VM_INHERIT_NONE)  # a child opens its own
        mach.port_deallocate(me, mo)
        self._map = _Mapping(address, self._layout)

    @classmethod
    def open(cls, name: str, server: int | None = None, *, size: int = SIZE_DEFAULT,
             agent: str | None = None, path: str = "auto", service: str = SERVICE,
             timeout_ms: float = 10_000) -> Blackboard:
        """Open the board `name` of a blackboard server, made with a log of `size` bytes
        if it is new (64 KiB to 256 MiB). `server` is a send right to the server; by
        default it is looked up as `service` with the name service of this task's
        bootstrap port, waiting up to `timeout_ms` for it to be checked in. `agent`
        names this agent in its posts (default: the task's name). `path` is "auto"
        (shared memory on the board's host, messages elsewhere), "memory" (an error on
        another host) or "messages"."""
        name, agent = _text("name", name, 64, 1), _text("agent", agent, 64, 0, True)
        size = _count("size", size)
        if not SIZE_MIN <= size <= SIZE_MAX:
            raise ValueError(f"size must be {SIZE_MIN} to {SIZE_MAX} bytes, not {size}")
        if path not in PATHS:
            raise ValueError(f"path must be 'auto', 'memory' or 'messages', not {path!r}")
        if server is None:
            server = _look_up(_text("service", service, 80, 1), timeout_ms)
        elif isinstance(server, bool) or not isinstance(server, int):
            raise TypeError(f"server must be a port name (an int), not "
                            f"{type(server).__name__}")
        if agent is None:
            agent = mach.task_info(mach.task_self())[0].encode()[:64].decode(errors="ignore")
        return cls(name, server, agent, PATHS[path], size)

    # -- posting -----------------------------------------------------------------------------
    def post(self, kind: str, payload: bytes | bytearray | memoryview | str,
             confidence: float = 1.0) -> int:
        """Place a hypothesis on the board; its sequence number. `payload` is bytes, or
        a str (read back as a str); at most 32 KiB. `confidence` is in [0, 1].
        MachError KERN_NO_SPACE when the board is full."""
        kind_b = _text("kind", kind, 64, 1).encode()
        text = isinstance(payload, str)
        if text:
            data = payload.encode()  # type: ignore[union-attr]
        elif isinstance(payload, bytes | bytearray | memoryview):
            data = bytes(payload)
        else:
            raise TypeError(f"a payload is bytes or str, not {type(payload).__name__}")
        confidence = _confidence(confidence)
        poster = self.agent.encode()
        try:
            check_fields(kind_b, poster, data, confidence)
        except MachError as e:
            raise ValueError(e.detail) from None
        self._check_open()
        if self._map is None:
            seq: int = bb_post(self._server, self._id, self._board, kind_b.decode(),
                               data, int(text), confidence, self.agent)
            return seq
        return self._post_here(kind_b, poster, data, F_TEXT if text else 0, confidence)

    def _post_here(self, kind: bytes, poster: bytes, data: bytes, flags: int,
                   confidence: float) -> int:
        """The local path: a reservation, the record written into the shared log (body
        first, head last), and a commit."""
        assert self._map is not None
        length = record_length(kind, poster, data)
        seq, offset = bb_reserve(self._server, self._id, self._board, length)
        record = encode_record(seq, kind, poster, data, flags, confidence, length)
        at = self._layout.log + offset
        self._map.write(at + HEAD.size, record[HEAD.size:])
        self._map.write(at, record[:HEAD.size])
        bb_commit(self._server, self._id, self._board, seq)
        return int(seq)

    # -- reading ---------------------------------------------------------------------------
    @property
    def committed(self) -> int:
        """The number of sequence numbers committed so far: `read(since=committed)`
        returns only what comes after now."""
        self._check_open()
        if self._map is not None:
            return committed_of(self._map)
        return self._remote_read(0, 0, 0, False)[1]

    def read(self, since: int = 0, limit: int | None = None) -> list[Hypothesis]:
        """Every committed hypothesis with `seq >= since` (at most `limit`), in sequence
        order, without waiting."""
        since, limit = _count("since", since), _limit(limit)
        self._check_open()
        out: list[Hypothesis] = []
        while len(out) < limit:
            records, after, committed = self._read_some(since, limit - len(out))
            out += records
            if after >= committed or after == since:
                break
            since = after
        return out

    def wait(self, since: int = 0, timeout_ms: float | None = None,
             limit: int | None = None) -> list[Hypothesis]:
        """The hypotheses with `seq >= since` (at most `limit`, at least one), waiting up
        to `timeout_ms` (None: for ever) until there is one; [] if none came in time."""
        since, limit = _count("since", since), _limit(limit)
        left = _timeout(timeout_ms)
        self._check_open()
        first = self._serial + 1
        while True:
            records, since, _ = self._read_some(since, limit)
            if records:
                return records
            if left is not None and left <= 0:
                return []
            step = WAIT_SLICE_MS if left is None else min(left, WAIT_SLICE_MS)
            self._await(since, step, first)
            if left is not None:
                left -= step

    def _read_some(self, since: int, limit: int) -> tuple[list[Hypothesis], int, int]:
        """Some records from `since` (VOID ones skipped), where the next read starts,
        and the committed count."""
        if self._map is None:
            _, committed, count, data = self._remote_read(since, limit, READ_REPLY_MAX,
                                                          False)
            return parse_records(data, since, count), since + count, committed
        return self._local_records(since, limit)

    def _local_records(self, since: int, limit: int) -> tuple[list[Hypothesis], int, int]:
        """Committed records straight from the mapping. If one does not check, the count
        and the records are read again a few times (on a machine that orders memory more
        weakly than x86, a reader could see the count before the records), then
        MachError: the record was damaged after its commit."""
        assert self._map is not None
        for attempt in range(RETRIES):
            committed = committed_of(self._map)
            if since >= committed:
                return [], since, committed
            try:
                data, count = read_span(self._map, self._layout, since, committed, limit,
                                        LOCAL_CHUNK)
                return parse_records(data, since, count), since + count, committed
            except MachError:
                if attempt == RETRIES - 1:
                    raise
                with contextlib.suppress(MachError):  # 1 ms of Mach time (an answer
                    # that comes meanwhile is a stale one: dropped)
                    _read_reply(mach.msg_receive(self._wait_port(), RCV_TIMEOUT, 1,
                                                 REPLY_SIZE_ANY))
        raise AssertionError("unreachable")

    def _remote_read(self, since: int, limit: int, max_bytes: int,
                     block: bool) -> tuple[int, int, int, bytes]:
        """bb_read (no wait): (serial, committed, count, log bytes)."""
        self._serial += 1
        return self._call_read(since, limit, max_bytes, block, self._serial, None)

    def _await(self, since: int, ms: float, first: int) -> None:
        """Wait up to `ms` for the server to say there is a record from `since` (a reply
        to an earlier ask of this wait counts too)."""
        self._serial += 1
        with contextlib.suppress(TimeoutError):
            self._call_read(since, 0, 0, True, self._serial, ms, first)

    def _call_read(self, since: int, limit: int, max_bytes: int, block: bool, serial: int,
                   ms: float | None, first: int = 0) -> tuple[int, int, int, bytes]:
        """One bb_read on this thread's wait port; with `ms`, TimeoutError if no reply
        of serial >= `first` came by then (older ones are stale and dropped). Without,
        it waits for the answer; either way MachError if the server is gone."""
        port = self._wait_port()
        request = Message(remote_port=self._server, local_port=port, id=BB_READ.id, items=[
            Int(v) for v in (self._id, self._board, since, limit, max_bytes, int(block),
                             serial)])
        mach.msg_send(request)
        left = ms
        while True:
            step = WAIT_SLICE_MS if left is None else min(left, WAIT_SLICE_MS)
            try:
                reply = mach.msg_receive(port, RCV_TIMEOUT, step, REPLY_SIZE_ANY)
            except MachError as e:
                if e.code != "RCV_TIMED_OUT":
                    raise
                self._check_server()
                if left is not None:
                    left -= step
                    if left <= 0:
                        raise TimeoutError(f"no answer from the blackboard server in "
                                           f"{ms} ms") from None
                continue
            outs = _read_reply(reply)
            if outs[0] >= (first or serial):
                return outs

    def _check_server(self) -> None:
        """MIG_SERVER_DIED if the server's port is gone (its task ended, or its host
        left the network)."""
        if mach.names_gone([self._server]):
            raise MachError("MIG_SERVER_DIED", f"the server of blackboard {self.name!r} "
                            f"is gone")

    def _wait_port(self) -> int:
        """This thread's own reply port for bb_read (a late answer lands there, never on
        the thread's reply port, where the next RPC would take it)."""
        thread = mach.thread_self()
        port = self._wait_ports.get(thread)
        if port is None:
            port = self._wait_ports[thread] = mach.port_allocate(mach.task_self())
        return port

    # -- the end -----------------------------------------------------------------------------
    def close(self) -> None:
        """Let go of the board (a post of this handle still under way becomes VOID). A
        second close does nothing."""
        if self.closed:
            return
        self._check_task()
        self.closed = True
        me = mach.task_self()
        with contextlib.suppress(MachError):  # (the server may be gone)
            bb_close(self._server, self._id)
        if self._map is not None:
            self._map.release()
            mach.vm_deallocate(me, self._map.address, self._layout.size)
            self._map = None
        for port in [self._token, *self._wait_ports.values()]:
            with contextlib.suppress(MachError):
                mach.port_deallocate(me, port)

    def __enter__(self) -> Blackboard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Blackboard belongs to the task that opened it: open it again "
                        "in the other task")

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("shared memory" if self.local else "messages")
        return f"<Blackboard {self.name!r} agent={self.agent!r} ({state})>"

    def _check_task(self) -> None:
        if self._owner() is not current_thread().task:
            raise MachError("KERN_INVALID_ARGUMENT", f"blackboard {self.name!r} was opened "
                            f"by another task: open it in this one")

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"blackboard {self.name!r} is closed")
        self._check_task()


# -- helpers ------------------------------------------------------------------------------------

def _read_reply(reply: Message) -> tuple[int, int, int, bytes]:
    """A bb_read reply's (serial, committed, count, records): checked as a stub would."""
    if reply.id != BB_READ.id + REPLY_ID_OFFSET or not reply.items or not isinstance(
            reply.items[0], Int):
        raise MachError("MIG_REPLY_MISMATCH", f"bb_read: reply id {reply.id}")
    if reply.items[0].value:
        detail = reply.items[1].value if len(reply.items) > 1 else ""
        raise MachError(code_name(reply.items[0].value), str(detail))
    serial, committed, count, data = decode_items(BB_READ, BB_READ.outs, reply.items[1:],
                                                  "MIG_TYPE_ERROR", TASK_CODEC)
    assert isinstance(data, OOL)
    return serial, committed, count, take_ool(data)


def _look_up(service: str, timeout_ms: float) -> int:
    me = mach.task_self()
    if not mach.task_get_special_port(me, TASK_BOOTSTRAP_PORT):
        raise MachError("KERN_INVALID_ARGUMENT", "no blackboard server: this task has no "
                        "name service (start one with start_server(), or pass server=)")
    return netname_wait(service, _timeout(timeout_ms) or 0)


def _text(what: str, value: Any, max_bytes: int, min_bytes: int,
          optional: bool = False) -> Any:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    n = len(value.encode("utf-8", "surrogatepass"))
    if not min_bytes <= n <= max_bytes or "\0" in value:
        raise ValueError(f"{what} must be {min_bytes} to {max_bytes} bytes of UTF-8 "
                         f"without NUL, not {value!r:.80}")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid UTF-8: {value!r:.80}") from None
    return value


def _count(what: str, value: Any) -> int:
    """A non-negative int (TypeError if not an int, ValueError if negative)."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an int, not bool")
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an int, not {type(value).__name__}") from None
    if n < 0:
        raise ValueError(f"{what} must be >= 0, not {n}")
    return n


def _limit(limit: Any) -> int:
    if limit is None:
        return 1 << 62
    n = _count("limit", limit)
    if n == 0:
        raise ValueError("limit must be >= 1")
    return n


def _timeout(timeout_ms: Any) -> float | None:
    if timeout_ms is None:
        return None
    if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int | float):
        raise TypeError(f"timeout_ms must be a number or None, not "
                        f"{type(timeout_ms).__name__}")
    if not timeout_ms >= 0:
        raise ValueError(f"timeout_ms must be >= 0, not {timeout_ms}")
    return float(timeout_ms)


def _confidence(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"confidence must be a number, not {type(value).__name__}")
    if not (math.isfinite(value) and 0 <= value <= 1):
        raise ValueError(f"confidence must be in [0, 1], not {value}")
    return float(value)

