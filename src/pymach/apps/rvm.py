"""Recoverable virtual memory (paper 8.3): a data manager that keeps a write-ahead log, and
a client library with the API of RVM (Satyanarayanan et al., 1993).

A recoverable segment is a data file and a log file (`rvm_log`). Its data manager,
`RvmManager`, is a task: it backs the segment's memory object, so a client maps the
segment with `rvm_map` and works on it as memory, while the kernel manages the physical
memory (Camelot's reasons, 8.3). The client library brackets changes in transactions:
`begin_transaction(RESTORE | NO_RESTORE)`, `set_range(address, size)` before changing a
range, `end_transaction(FLUSH | NO_FLUSH)` or `abort_transaction()`, and `flush()`,
`truncate()`. At commit the library appends one record with the ranges' new values to
the log itself (as RVM's library does: no message per transaction). A FLUSH commit syncs
the log before it returns; NO_FLUSH commits wait in the task's buffer and reach the log
at the next flush, FLUSH commit, truncation, or when the buffer fills.

The calls: `start_manager(data_path, log_path, size)` (or `spawn_manager`, a standby
that opens the segment when `manager_port` asks), `rvm_map(server)` returning a
`Segment` (`begin_transaction`, `flush`, `truncate`, `read`, `write`, `unmap`,
`statistics`), whose `Transaction`s have `set_range`, `end_transaction` and
`abort_transaction`; `rvm_statistics(server)`, `rvm_shutdown(server)`. In native mode
`Segment.read`/`write` and the commit go straight to the task's memory (a memoryview);
in embedded mode through `memory()`.

Invariants:
- Camelot's write-ahead rule: when the kernel writes a page back (pager_data_write, at
  pageout, after a flush or clean request, or when the last mapping goes), the manager
  writes the page's committed image home only after the log records it holds are on
  disk. Changes in the page that no logged record covers (an open transaction, NO_FLUSH
  commits still in the client's buffer) never reach the data file: the manager keeps
  that page as the kernel returned it (a shadow, in memory) and gives it back on the
  next fault, for the session that made it only.
- One session per segment at a time: the client holds the log's lock (flock) while it
  maps the segment, and the manager refuses a second mapping while the first client's
  session port lives. A new session starts with recovery: the log is applied to the
  data file (a torn tail is dropped) and a new epoch begins.
- Every session uses a new memory object, so no page a dead client changed is ever seen
  by the next one.
- Recovery on restart is the same truncation: records are whole or dropped, in order.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from types import TracebackType
from typing import Any

from pymach import mach
from pymach.apps.rvm_log import LOG_START, LogWriter, SegmentStore, Storage, open_storage
from pymach.errors import MachError
from pymach.include.mach_defs import TASK_NOTIFY_PORT
from pymach.include.message import MAKE_SEND, RCV_TIMEOUT, Message, Port, Str
from pymach.include.mig import INT, INT_ARRAY, PORT, STR, Subsystem
from pymach.include.vm_param import VM_PROT_NONE
from pymach.mach_vm import Memory, memory, vm_page_size
from pymach.pagers.data_manager import DataManager

RESTORE = "restore"  # begin_transaction: keep old values so the transaction can abort
NO_RESTORE = "no_restore"  # ... it will never abort: no old values are kept
FLUSH = "flush"  # end_transaction: durable when it returns
NO_FLUSH = "no_flush"  # ... committed in order, durable at the next flush (lazy)

Opener = Callable[..., Storage]  # (path, create=False) -> Storage

rvm_defs = Subsystem("rvm", 6600)
rvm_defs.routine("rvm_map", "server", [("session", PORT)],
                 [("memory_object", PORT), ("size", INT), ("log_path", STR),
                  ("session_id", INT), ("salt", INT), ("seq", INT), ("tail", INT)],
                 "Start a session on the segment (recovering its log first): its memory "
                 "object and size, and where and how to append to its log. `session` is a "
                 "port the client holds for as long as it maps the segment.")
rvm_defs.routine("rvm_truncate", "server", [("session_id", INT)],
                 [("salt", INT), ("seq", INT), ("tail", INT)],
                 "Apply the log to the data file and start a new log epoch (the caller, the "
                 "session's appender, has written and synced its records).")
rvm_defs.routine("rvm_statistics", "server", [], [("counters", INT_ARRAY)],
                 "The manager's counters, in the order of RvmStatistics' fields.")
rvm_defs.routine("rvm_shutdown", "server", [], [],
                 "Stop serving once this call is answered (the files stay consistent).")
_rvm_map = rvm_defs.stub("rvm_map")
_rvm_truncate = rvm_defs.stub("rvm_truncate")
_rvm_statistics = rvm_defs.stub("rvm_statistics")
rvm_shutdown = rvm_defs.stub("rvm_shutdown")

# Logs opened by client sessions of this process, by session id: in one process (the
# embedded kernel) a task's death closes no files, so the manager revokes a dead
# session's log itself, as the OS does for a native task's process.
_client_logs: dict[int, Storage] = {}


@dataclass
class RvmStatistics:
    """What a segment's manager has done since it started."""

    records_applied: int = 0  # log records read into the committed image
    pages_written: int = 0  # committed pages written to the data file
    wal_forces: int = 0  # log syncs the write-ahead rule forced before a data write
    truncations: int = 0  # logs with records applied to the data file and voided
    torn_records_dropped: int = 0  # records found not whole (torn) at a truncation
    pages_provided: int = 0  # pages given to kernels (pager_data_provided)
    pages_written_back: int = 0  # pages kernels wrote back (pager_data_write)
    pages_shadowed: int = 0  # written-back pages holding changes no logged record covers
    sessions: int = 0  # rvm_map calls granted
    recovered_records: int = 0  # records the manager's startup recovery applied


@dataclass
class _Session:
    id: int
    port: int  # a send right to the client's session port
    memory_object: int


class RvmManager(DataManager):
    """The data manager of one recoverable segment (see module docstring). Make it with
    the files' paths (and `size` to create a new segment), call `open()` and then
    `serve()` in its task; `start_manager` does all of that in a new task."""

    threads = max_threads = 1  # one thread: the store is used in kernel order
    services = (rvm_defs,)

    def __init__(self, data_path: str, log_path: str, size: int | None = None,
                 opener: Opener | None = None) -> None:
        super().__init__()
        self.data_path, self.log_path, self.new_size = data_path, log_path, size
        self.opener: Opener = opener or open_storage
        self.store: SegmentStore | None = None
        self.session: _Session | None = None
        self.shadows: dict[int, bytes] = {}  # page offset -> page (current session's)
        self.stats = RvmStatistics()

    # -- starting ---------------------------------------------------------------------
    def open(self) -> SegmentStore:
        """Open (or create) the files and recover: if no client of an earlier manager
        still holds the log, apply it to the data file now; else at the next rvm_map."""
        data = self.opener(self.data_path, create=self.new_size is not None)
        try:
            log = self.opener(self.log_path, create=True)
        except BaseException:
            data.close()
            raise
        try:
            store = SegmentStore(data, log, vm_page_size(), self.new_size)
        except BaseException:
            log.close()
            data.close()
            raise
        self.store = store
        if store.log.try_lock():
            try:
                store.apply_log()
            finally:
                store.log.unlock()
            self.stats.recovered_records = store.counters.records_applied
        return store

    def _store(self) -> SegmentStore:
        if self.store is None:
            raise MachError("KERN_FAILURE", "the RVM manager was not opened")
        return self.store

    # -- the service --------------------------------------------------------------------
    def rvm_map(self, server: int, session: int) -> tuple[int, int, str, int, int, int, int]:
        """Start a session (see rvm_defs)."""
        store = self._store()
        if self.session is not None:
            if not mach.names_gone([self.session.port]):
                raise MachError("KERN_NO_ACCESS", "the segment is mapped by another task "
                                "(a segment has one client at a time)")
            self._end_session()
        if not store.log.try_lock():
            raise MachError("KERN_NO_ACCESS", "another process holds the segment's log "
                            "(a client of an earlier manager that still runs)")
        try:
            salt, seq, tail = store.apply_log()
        finally:
            store.log.unlock()
        mo = self.create_memory_object()
        self.session = _Session(secrets.randbits(62), session, mo)
        self.stats.sessions += 1
        return mo, store.size, self.log_path, self.session.id, salt, seq, tail

    def _end_session(self) -> None:
        """The session's client is gone: revoke its log if it was in this process, drop
        its shadows, and let its memory object go once no kernel uses it."""
        session, self.session = self.session, None
        assert session is not None
        leaked = _client_logs.pop(session.id, None)
        if leaked is not None:
            leaked.revoke()
        self.shadows.clear()
        self._retire(session.memory_object)

    def _retire(self, memory_object: int) -> None:
        if not self.requests(memory_object):
            self.uses.pop(memory_object, None)
            with contextlib.suppress(MachError):
                mach.port_deallocate(mach.task_self(), memory_object)

    def rvm_truncate(self, server: int, session_id: int) -> tuple[int, int, int]:
        """Apply the log (see rvm_defs); only the current session may ask."""
        if self.session is None or session_id != self.session.id:
            raise MachError("KERN_NO_ACCESS", "rvm_truncate: not the segment's session")
        return self._store().apply_log()

    def rvm_statistics(self, server: int) -> list[int]:
        """The counters (see RvmStatistics)."""
        c = self._store().counters
        s = self.stats
        s.records_applied, s.pages_written, s.wal_forces = (
            c.records_applied, c.pages_written, c.wal_forces)
        s.truncations, s.torn_records_dropped = c.truncations, c.torn_records_dropped
        return [getattr(s, f.name) for f in fields(s)]

    def rvm_shutdown(self, server: int) -> None:
        """Stop serving (the reply goes first: the stop message queues behind it)."""
        self.stop()

    # -- the pager side -------------------------------------------------------------------
    def _current(self, memory_object: int) -> bool:
        return self.session is not None and self.session.memory_object == memory_object

    def pager_data_request(self, memory_object: int, request: int, offset: int,
                           length: int, access: int) -> None:
        """Provide the session's shadow of each page, else its committed image."""
        store = self._store()
        if memory_object not in self.uses:
            return
        if offset % store.page_size or offset + length > store.size:
            with contextlib.suppress(MachError):
                mach.pager_data_error(request, offset, length,
                                      MachError("KERN_INVALID_ADDRESS").value)
            return
        store.catch_up()
        shadows = self.shadows if self._current(memory_object) else {}
        data = b"".join(shadows.get(at) or store.page(at)
                        for at in range(offset, offset + length, store.page_size))
        self.stats.pages_provided += len(data) // store.page_size
        with contextlib.suppress(MachError):  # that kernel may have let go meanwhile
            mach.pager_data_provided(request, offset, data, len(data), VM_PROT_NONE)

    def pager_data_write(self, memory_object: int, offset: int, data: bytes) -> None:
        """Camelot's rule, page by page: the committed image goes home after its log
        records (SegmentStore.write_back); what no record covers stays a shadow."""
        store = self._store()
        ps = store.page_size
        if memory_object not in self.uses or offset % ps or offset + len(data) > store.size:
            return
        current = self._current(memory_object)
        for at in range(offset, offset + len(data) - ps + 1, ps):
            page = data[at - offset:at - offset + ps]
            self.stats.pages_written_back += 1
            if store.write_back(at, page) or not current:
                self.shadows.pop(at, None)
            else:
                self.shadows[at] = page
                self.stats.pages_shadowed += 1

    def pager_terminate(self, memory_object: int, request: int) -> None:
        """A kernel let go of an object: the session's changes it held are gone with it."""
        if self._current(memory_object):
            self.shadows.clear()
        elif memory_object in self.uses:
            self._retire(memory_object)

    def close(self) -> None:
        """Close the files (after serve() returned)."""
        if self.store is not None:
            self.store.close()


def _manager_main(data_path: str, log_path: str, size: int | None,
                  opener: Opener | None, standby_ms: float) -> RvmStatistics | None:
    """A manager task's first thread: wait to be asked (manager_port), open the segment,
    answer with the service port, serve."""
    try:
        ask = mach.msg_receive(mach.task_notify(), RCV_TIMEOUT, standby_ms)
    except MachError:
        return None  # nobody needed it
    inbox = ask.items[0].value
    dm = RvmManager(data_path, log_path, size, opener)
    try:
        dm.open()
    except (MachError, OSError) as e:
        code = e.code if isinstance(e, MachError) else "KERN_FAILURE"
        mach.msg_send(Message(remote_port=inbox, items=[Str(code), Str(str(e))]))  # type: ignore[arg-type]
        raise
    me = mach.task_self()
    service = mach.port_allocate(me)
    mach.port_enable(me, service)
    mach.msg_send(Message(remote_port=inbox, items=[Port(service, MAKE_SEND)]))  # type: ignore[arg-type]
    try:
        dm.serve()
    finally:
        dm.close()
    return RvmStatistics(*dm.rvm_statistics(service))


def spawn_manager(data_path: str, log_path: str, size: int | None = None, *,
                  name: str = "rvm", opener: Opener | None = None,
                  standby_ms: float = 30_000) -> Any:
    """Start a segment's data manager in a new task (a process in native mode) that
    waits, for up to `standby_ms`, until `manager_port` has it open the segment: a
    standby manager, ready to take over from one that died. `size` bytes (a multiple of
    the page size) create a new segment, None opens an existing one."""
    return mach.spawn(_manager_main, data_path, log_path, size, opener, standby_ms,
                      name=name)


def manager_port(handle: Any, timeout_ms: float = 30_000) -> int:
    """Have the manager `spawn_manager` started open (and recover) its segment; a send
    right to its service port. A manager that cannot open the files raises its error
    here (a missing file is KERN_FAILURE)."""
    me = mach.task_self()
    inbox = mach.port_allocate(me)
    try:
        notify = mach.task_get_special_port(handle.port, TASK_NOTIFY_PORT)
        mach.msg_send(Message(remote_port=notify, items=[Port(inbox, MAKE_SEND)]))
        reply = mach.msg_receive(inbox, RCV_TIMEOUT, timeout_ms)
    finally:
        mach.port_deallocate(me, inbox)
    first = reply.items[0] if reply.items else None
    if not isinstance(first, Port):
        detail = reply.items[1].value if len(reply.items) > 1 else "no answer"
        detail = detail if isinstance(detail, str) else repr(detail)
        raise MachError(first.value if isinstance(first, Str) else "KERN_FAILURE",
                        f"the RVM manager could not open the segment: {detail}")
    return first.name


def start_manager(data_path: str, log_path: str, size: int | None = None, *,
                  name: str = "rvm", opener: Opener | None = None,
                  timeout_ms: float = 30_000) -> tuple[Any, int]:
    """spawn_manager and manager_port: (the manager task's handle, a send right to its
    service port)."""
    handle = spawn_manager(data_path, log_path, size, name=name, opener=opener)
    return handle, manager_port(handle, timeout_ms)


def rvm_statistics(server: int) -> RvmStatistics:
    """A segment manager's counters."""
    return RvmStatistics(*_rvm_statistics(server))


# -- the client library --------------------------------------------------------------------
def _commit_flush(mode: str) -> bool:
    if mode not in (FLUSH, NO_FLUSH):
        raise MachError("KERN_INVALID_ARGUMENT", f"end_transaction's mode is FLUSH or "
                        f"NO_FLUSH, not {mode!r:.40}")
    return mode == FLUSH


class Transaction:
    """One transaction on a segment (RVM's tid). Call set_range before changing a range;
    end with end_transaction or abort_transaction. As a context manager it ends with
    FLUSH, or aborts if the block raises (a RESTORE transaction)."""

    def __init__(self, segment: Segment, mode: str) -> None:
        if mode not in (RESTORE, NO_RESTORE):
            raise MachError("KERN_INVALID_ARGUMENT", f"begin_transaction's mode is RESTORE "
                            f"or NO_RESTORE, not {mode!r:.40}")
        self.segment, self.restore = segment, mode == RESTORE
        self.ranges: list[tuple[int, int]] = []  # (segment offset, size)
        self.old: list[bytes] = []  # old values, RESTORE only
        self.active = True

    def _check_active(self) -> None:
        if not self.active:
            raise MachError("KERN_FAILURE", "the transaction has ended")

    def set_range(self, address: int, size: int) -> None:
        """Declare that [address, address+size) of the segment will change (its old
        value is kept for abort in RESTORE mode). KERN_INVALID_ADDRESS outside it."""
        self._check_active()
        offset = self.segment.offset(address, size)
        self.ranges.append((offset, size))
        if self.restore:
            self.old.append(self.segment.get(offset, size))

    def end_transaction(self, mode: str = FLUSH) -> None:
        """Commit: the ranges' current values are logged as one record; with FLUSH the
        record (and every earlier one) is on disk when this returns."""
        flush = _commit_flush(mode)
        self._check_active()
        self.active = False
        self.segment.commit(self, flush)

    def abort_transaction(self) -> None:
        """Undo a RESTORE transaction's changes in memory; KERN_FAILURE for NO_RESTORE."""
        self._check_active()
        if not self.restore:
            raise MachError("KERN_FAILURE", "a NO_RESTORE transaction cannot be aborted")
        self.active = False
        self.segment.active.discard(self)
        for (offset, _), old in zip(reversed(self.ranges), reversed(self.old), strict=True):
            self.segment.put(offset, old)

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self.active:
            return
        if kind is None:
            self.end_transaction(FLUSH)
        elif self.restore:
            self.abort_transaction()


class Segment:
    """A recoverable segment mapped by `rvm_map` at [address, address+size): the client's
    session. Used by one thread at a time (RVM provides no concurrency control)."""

    def __init__(self, server: int, reply: tuple[int, int, str, int, int, int, int],
                 session_port: int, log: Storage, buffer_limit: int,
                 truncate_threshold: int) -> None:
        mo, size, log_path, sid, salt, seq, tail = reply
        self.server, self.memory_object, self.size = server, mo, size
        self.log_path, self.session_id, self.session_port = log_path, sid, session_port
        self.log, self.writer = log, LogWriter(log, salt, seq, tail, buffer_limit)
        self.truncate_threshold = truncate_threshold
        self.address = mach.vm_allocate_with_pager(mach.task_self(), 0, size, True, mo, 0)
        self.mem: Memory = memory()
        self.view: memoryview | None = None  # the memory itself, in native mode
        with contextlib.suppress(MachError):
            self.view = self.mem.buffer(self.address, size)
        self.active: set[Transaction] = set()
        self.mapped = True

    # -- memory ---------------------------------------------------------------------------
    def offset(self, address: int, size: int) -> int:
        """The segment offset of [address, address+size), which must lie in the segment."""
        self._check_mapped()
        offset: int = address - self.address if isinstance(address, int) else -1
        if (isinstance(size, bool) or not isinstance(size, int) or size <= 0
                or offset < 0 or offset + size > self.size):
            raise MachError("KERN_INVALID_ADDRESS", f"[{address!r:.20}, +{size!r:.20}) is "
                            f"not inside the segment at {self.address:#x}")
        return int(offset)

    def get(self, offset: int, size: int) -> bytes:
        """The bytes at a segment offset."""
        if self.view is not None:
            return bytes(self.view[offset:offset + size])
        return self.mem.read(self.address + offset, size)

    def put(self, offset: int, data: bytes) -> None:
        """Store bytes at a segment offset."""
        if self.view is not None:
            self.view[offset:offset + len(data)] = data
        else:
            self.mem.write(self.address + offset, data)

    def read(self, address: int, size: int) -> bytes:
        """The segment's bytes at [address, address+size)."""
        return self.get(self.offset(address, size), size)

    def write(self, address: int, data: bytes) -> None:
        """Store `data` at `address` (inside a transaction's set_range, to be recoverable)."""
        self.put(self.offset(address, len(data)), data)

    # -- transactions ---------------------------------------------------------------------
    def _check_mapped(self) -> None:
        if not self.mapped:
            raise MachError("KERN_INVALID_ARGUMENT", "the segment is not mapped")

    def begin_transaction(self, mode: str = RESTORE) -> Transaction:
        """A new transaction (RESTORE: it may abort; NO_RESTORE: it will not)."""
        self._check_mapped()
        t = Transaction(self, mode)
        self.active.add(t)
        return t

    def commit(self, t: Transaction, flush: bool) -> None:
        """Log a transaction's new values (Transaction.end_transaction calls this)."""
        self.active.discard(t)
        if t.ranges:
            self.writer.commit([(off, self.get(off, n)) for off, n in t.ranges], flush)
        elif flush:
            self.writer.force()
        if self.writer.tail >= self.truncate_threshold:
            self.truncate()

    def flush(self) -> None:
        """Make every NO_FLUSH commit so far durable."""
        self._check_mapped()
        self.writer.force()

    def truncate(self) -> None:
        """Flush, then have the manager apply the log to the data file and empty it."""
        self.flush()
        self.writer.restart(*_rvm_truncate(self.server, self.session_id))

    def statistics(self) -> RvmStatistics:
        """The segment manager's counters."""
        return rvm_statistics(self.server)

    def unmap(self) -> None:
        """Flush and end the session; every transaction must have ended."""
        self._check_mapped()
        if self.active:
            raise MachError("KERN_FAILURE", f"{len(self.active)} transactions of the segment "
                            f"have not ended")
        self.flush()
        self.mapped = False
        me = mach.task_self()
        mach.vm_deallocate(me, self.address, self.size)
        _client_logs.pop(self.session_id, None)
        self.log.close()
        mach.port_deallocate(me, self.session_port)

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.mapped and not self.active:
            self.unmap()


def _nap(ms: float) -> None:
    """Wait `ms` in Mach time (a receive that times out)."""
    me = mach.task_self()
    port = mach.port_allocate(me)
    try:
        with contextlib.suppress(MachError):
            mach.msg_receive(port, RCV_TIMEOUT, ms)
    finally:
        mach.port_deallocate(me, port)


def _map_call(server: int, session: int, wait_ms: float
              ) -> tuple[int, int, str, int, int, int, int]:
    """rvm_map, tried again for up to `wait_ms` while the segment is in use."""
    deadline = time.monotonic() + wait_ms / 1000
    while True:
        try:
            return _rvm_map(server, session)  # type: ignore[no-any-return]
        except MachError as e:
            if e.code != "KERN_NO_ACCESS" or time.monotonic() >= deadline:
                raise
        _nap(5)


def rvm_map(server: int, *, opener: Opener | None = None, buffer_limit: int = 64 << 10,
            truncate_threshold: int = 32 << 20, wait_ms: float = 0) -> Segment:
    """Map the whole segment a manager serves: a `Segment` (RVM's rvm_map). NO_FLUSH
    records are buffered up to `buffer_limit` bytes; the log is truncated when it grows
    past `truncate_threshold` bytes. KERN_NO_ACCESS if another task maps the segment
    (tried again for `wait_ms`)."""
    me = mach.task_self()
    session = mach.port_allocate(me)
    try:
        reply = _map_call(server, session, wait_ms)
        log = (opener or open_storage)(reply[2])
        if not log.try_lock():
            log.close()
            raise MachError("KERN_NO_ACCESS", "another task holds the segment's log")
        _client_logs[reply[3]] = log
        try:
            return Segment(server, reply, session, log, buffer_limit,
                           max(truncate_threshold, LOG_START + 1))
        except BaseException:
            _client_logs.pop(reply[3], None)
            log.close()
            raise
    except BaseException:
        with contextlib.suppress(MachError):
            mach.port_deallocate(me, session)
        raise
