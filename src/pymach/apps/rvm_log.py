"""The write-ahead log and the data file of a recoverable segment (paper 8.3; RVM).

A recoverable segment lives in two files. The *data file* holds the segment's bytes as of
the last truncation, plus pages the data manager has written home since. The *log file*
holds, after two header slots, the records of committed transactions since the last
truncation: each record carries the new values of the ranges its transaction set (RVM's
no-undo/redo log), so recovery only ever applies records, in order.

Record format (little-endian): magic u32, crc32 u32 (of everything after it), length u32
(the whole record), nranges u32, salt u64, seq u64, then per range offset u64, size u32
and the bytes. A header slot: magic, version, epoch, salt, data size, crc32. Each epoch
has a random salt (as SQLite's WAL has): the log is never cut shorter, so new records
overwrite old ones in place (the cheaper sync), and bytes left from older epochs, even a
record inside a record's data, can never pass for a record of the current one.

Invariants:
- The log is the longest prefix of records that are whole (length, CRC32), carry the
  current epoch's salt and are numbered 1, 2, 3, ...; scanning stops at the first that is
  not, so a torn or half-written tail is dropped and a record is never applied in part.
- Write-ahead rule (Camelot's): the data file is written only with the *committed image*
  of a page (the data file's page with every logged record applied), and only after the
  log records that image contains are on disk (`SegmentStore.write_back`, `apply_log`).
  So the data file never holds a byte the log on disk does not also hold, and it never
  holds an uncommitted byte.
- Truncation (`apply_log`) syncs the data file (every page written home since the last
  truncation, not only its own) before it writes the header of the next epoch, which
  makes every older record void; a crash at any point leaves either the old log
  (applied again: applying a redo record twice is harmless) or the new empty one. A
  header slot is written only over the older of the two, so a torn header write leaves
  the current one.

`Storage` is what the log and the data file are written through: `OsStorage` is a real
file (fdatasync where durability needs it); the tests put a fault-injecting storage here.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from pymach.errors import MachError

LOG_MAGIC = b"PYMRVMLG"
LOG_VERSION = 1
SLOT_SIZE = 512  # two header slots; the newest valid one is current
LOG_START = 2 * SLOT_SIZE  # where records begin
RECORD_MAGIC = 0x52564D72  # "rVMR"
MAX_RECORD = 1 << 30  # a bound for scanning (a segment larger than this is refused)
READ_CHUNK = 4 << 20

_SLOT = struct.Struct("<8sIQQQ")  # magic, version, epoch, salt, data size (then crc32)
_CRC = struct.Struct("<I")
_REC_HEAD = struct.Struct("<IIIIQQ")  # magic, crc, length, nranges, salt, seq
_RANGE = struct.Struct("<QI")  # offset, size
_BODY_HEAD = struct.Struct("<IIQQ")  # length, nranges, salt, seq (what the crc covers first)
GROW = 1 << 20  # the log is allocated ahead of its tail by this much


class Storage(Protocol):
    """A file the log or the data file is kept in: positioned reads and writes, `sync`
    (after it returns, what was written is on disk), `truncate`, and an advisory
    exclusive lock (held by one open storage at a time; released by `close` or when the
    holding process dies)."""

    def pread(self, offset: int, size: int) -> bytes:
        """Up to `size` bytes at `offset` (fewer at the end of the file)."""
        ...

    def pwrite(self, offset: int, data: bytes) -> None:
        """Write all of `data` at `offset`."""
        ...

    def sync(self) -> None:
        """Make every write and truncate so far durable."""
        ...

    def truncate(self, size: int) -> None:
        """Set the file's length."""
        ...

    def allocate(self, size: int) -> None:
        """Make the file at least `size` bytes long (reading as zeros), allocated now, so
        writes within it need not grow the file."""
        ...

    def size(self) -> int:
        """The file's length."""
        ...

    def try_lock(self) -> bool:
        """Take the exclusive lock if no other open storage of the file holds it."""
        ...

    def unlock(self) -> None:
        """Give the lock up."""
        ...

    def close(self) -> None:
        """Close (and so unlock)."""
        ...

    def revoke(self) -> None:
        """Cut this open file off for good (its owner died without closing it): the lock
        is released, and later calls fail or change nothing."""
        ...


class OsStorage:
    """A real file, opened read-write; `sync` is fdatasync; the lock is flock, which
    belongs to this open file (so it also separates tasks of one process)."""

    def __init__(self, path: str, create: bool = False) -> None:
        path = os.path.abspath(path)
        existed = os.path.exists(path)
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        self.path = path
        self.fd = os.open(path, flags, 0o600)
        if not existed:  # the new name must survive a crash too
            dir_fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def pread(self, offset: int, size: int) -> bytes:
        """Up to `size` bytes at `offset`."""
        return os.pread(self.fd, size, offset)

    def pwrite(self, offset: int, data: bytes) -> None:
        """Write all of `data` at `offset` (a short write is continued)."""
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def sync(self) -> None:
        """fdatasync: the data and the length are on disk."""
        os.fdatasync(self.fd)

    def truncate(self, size: int) -> None:
        """ftruncate."""
        os.ftruncate(self.fd, size)

    def size(self) -> int:
        """fstat's length."""
        return os.fstat(self.fd).st_size

    def allocate(self, size: int) -> None:
        """posix_fallocate (or just the length, where the file system cannot)."""
        if size <= self.size():
            return
        try:
            os.posix_fallocate(self.fd, 0, size)
        except OSError:
            os.ftruncate(self.fd, size)

    def try_lock(self) -> bool:
        """flock(LOCK_EX | LOCK_NB)."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def unlock(self) -> None:
        """flock(LOCK_UN)."""
        fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Close the file (idempotent)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def revoke(self) -> None:
        """Put /dev/null in the file's place under the same descriptor, so a thread of
        the dead owner still running writes nowhere; the file's lock goes with it."""
        if self.fd < 0:
            return
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            os.dup2(null, self.fd)
        finally:
            os.close(null)


def open_storage(path: str, create: bool = False) -> Storage:
    """The default opener: an `OsStorage` (FileNotFoundError if `path` is missing and
    `create` is false)."""
    return OsStorage(path, create)


# -- the format ---------------------------------------------------------------------------
def encode_record(salt: int, seq: int, ranges: list[tuple[int, bytes]]) -> bytes:
    """One committed transaction: the new values `ranges` ((segment offset, bytes), in
    set_range order), numbered `seq` in the log epoch with `salt`."""
    parts = []
    length = _REC_HEAD.size
    for offset, data in ranges:
        parts.append(_RANGE.pack(offset, len(data)))
        parts.append(data)
        length += _RANGE.size + len(data)
    body = _BODY_HEAD.pack(length, len(ranges), salt, seq) + b"".join(parts)
    return _CRC.pack(RECORD_MAGIC) + _CRC.pack(zlib.crc32(body)) + body


def decode_record(buf: bytes, pos: int, salt: int, seq: int, data_size: int
                  ) -> tuple[int, list[tuple[int, bytes]]] | None:
    """The record at `buf[pos:]` if it is whole, valid, of the epoch with `salt` and
    numbered `seq` with every range inside the segment: (its end in `buf`, its ranges);
    else None."""
    if len(buf) - pos < _REC_HEAD.size:
        return None
    magic, crc, length, nranges, rec_salt, rec_seq = _REC_HEAD.unpack_from(buf, pos)
    end = pos + length
    if (magic != RECORD_MAGIC or not _REC_HEAD.size <= length <= MAX_RECORD
            or end > len(buf) or rec_salt != salt or rec_seq != seq
            or zlib.crc32(memoryview(buf)[pos + 8:end]) != crc):
        return None
    ranges = []
    at = pos + _REC_HEAD.size
    for _ in range(nranges):
        if at + _RANGE.size > end:
            return None
        offset, size = _RANGE.unpack_from(buf, at)
        at += _RANGE.size
        if at + size > end or offset + size > data_size:
            return None
        ranges.append((offset, buf[at:at + size]))
        at += size
    return (end, ranges) if at == end else None


@dataclass(frozen=True)
class LogHeader:
    """The current header slot: the epoch, its salt, and the data file's size."""

    epoch: int
    salt: int
    data_size: int


def _encode_slot(h: LogHeader) -> bytes:
    fields = _SLOT.pack(LOG_MAGIC, LOG_VERSION, h.epoch, h.salt, h.data_size)
    return fields + _CRC.pack(zlib.crc32(fields))


def read_header(log: Storage) -> LogHeader | None:
    """The newest valid header slot, or None if neither is valid."""
    best: LogHeader | None = None
    for slot in range(2):
        raw = log.pread(slot * SLOT_SIZE, _SLOT.size + _CRC.size)
        if len(raw) < _SLOT.size + _CRC.size:
            continue
        fields, (crc,) = raw[:_SLOT.size], _CRC.unpack_from(raw, _SLOT.size)
        magic, version, epoch, salt, data_size = _SLOT.unpack(fields)
        if (magic == LOG_MAGIC and version == LOG_VERSION and zlib.crc32(fields) == crc
                and (best is None or epoch > best.epoch)):
            best = LogHeader(epoch, salt, data_size)
    return best


def write_header(log: Storage, epoch: int, data_size: int) -> LogHeader:
    """Start log epoch `epoch` with a new random salt: write its header slot (the other
    slot keeps the previous epoch's until this one is whole) and sync."""
    header = LogHeader(epoch, secrets.randbits(63), data_size)
    log.pwrite((epoch % 2) * SLOT_SIZE, _encode_slot(header))
    log.sync()
    return header


def scan(log: Storage, start: int, salt: int, seq: int, data_size: int
         ) -> Iterator[tuple[int, list[tuple[int, bytes]]]]:
    """The valid records from `start`, numbered from `seq`: (end offset, ranges) each.
    Stops at the end of the log or at the first record that is not whole and valid.
    Reads a little first (the log usually ends soon), more while records go on."""
    pos, size, chunk = start, log.size(), 64 << 10
    while pos < size:
        want = max(chunk, _record_length(log.pread(pos, _REC_HEAD.size)))
        buf = log.pread(pos, min(want, size - pos))
        at = 0
        while (got := decode_record(buf, at, salt, seq, data_size)) is not None:
            at, ranges = got
            seq += 1
            yield pos + at, ranges
        if at == 0:
            return
        pos += at
        chunk = min(chunk * 4, READ_CHUNK)


def _record_length(buf: bytes) -> int:
    """The length a record at the start of `buf` claims (0 if it cannot be one)."""
    if len(buf) < _REC_HEAD.size:
        return 0
    magic, _, length, *_ = _REC_HEAD.unpack_from(buf, 0)
    return length if magic == RECORD_MAGIC and length <= MAX_RECORD else 0


# -- the client's side: appending ----------------------------------------------------------
class LogWriter:
    """Appends a session's records (RVM's library writes the log in the committing task).
    Records of NO_FLUSH transactions wait in a buffer until `buffer_limit` bytes or the
    next `force`; `force` writes the buffer and syncs the log (a FLUSH commit). The file
    is allocated ahead of the tail, so a sync need not record a new length."""

    def __init__(self, log: Storage, salt: int, seq: int, tail: int,
                 buffer_limit: int = 64 << 10) -> None:
        self.log, self.salt, self.seq, self.tail = log, salt, seq, tail
        self.buffer_limit = buffer_limit
        self.buffer = bytearray()
        self.allocated = log.size()

    def commit(self, ranges: list[tuple[int, bytes]], flush: bool) -> None:
        """Append one committed transaction; with `flush`, it (and all before it) is on
        disk when this returns."""
        self.buffer += encode_record(self.salt, self.seq, ranges)
        self.seq += 1
        if flush:
            self.force()
        elif len(self.buffer) >= self.buffer_limit:
            self.write()

    def write(self) -> None:
        """Write the buffered records to the log (not synced)."""
        if not self.buffer:
            return
        end = self.tail + len(self.buffer)
        if end > self.allocated:
            self.allocated = end + GROW
            self.log.allocate(self.allocated)
        self.log.pwrite(self.tail, bytes(self.buffer))
        self.tail = end
        self.buffer.clear()

    def force(self) -> None:
        """Write the buffered records and sync the log."""
        self.write()
        self.log.sync()

    def restart(self, salt: int, seq: int, tail: int) -> None:
        """Continue in a new epoch (after a truncation); the buffer must be empty."""
        if self.buffer:
            raise MachError("KERN_FAILURE", "a truncated log's buffer must be empty")
        self.salt, self.seq, self.tail = salt, seq, tail


# -- the data manager's side: the committed image and the write-ahead rule ------------------
@dataclass
class StoreCounters:
    """What the store did (the manager reports them by rvm_statistics)."""

    records_applied: int = 0  # records read from the log into the committed image
    pages_written: int = 0  # committed pages written to the data file
    wal_forces: int = 0  # log syncs the write-ahead rule forced before a data write
    truncations: int = 0  # logs with records applied to the data file and voided
    torn_records_dropped: int = 0  # records of the epoch found not whole at truncation


class SegmentStore:
    """A segment's data file and log, as its data manager keeps them (see module
    docstring). Not thread-safe: one manager thread uses it."""

    def __init__(self, data: Storage, log: Storage, page_size: int,
                 size: int | None = None) -> None:
        self.data, self.log, self.page_size = data, log, page_size
        self.size = self._open_data(size)
        self.header = self._open_log()
        self.seq, self.read_end, self.synced_end = 1, LOG_START, LOG_START
        self.image: dict[int, bytearray] = {}  # page offset -> committed page (changed)
        self.lsn: dict[int, int] = {}  # page offset -> log end of its last record
        self.data_unsynced = False  # pages written home since the data file's last sync
        self.counters = StoreCounters()

    def _open_data(self, size: int | None) -> int:
        have = self.data.size()
        if size is not None and (size <= 0 or size % self.page_size or size > MAX_RECORD):
            raise MachError("KERN_INVALID_ARGUMENT", f"a segment's size must be a positive "
                            f"multiple of the page size ({self.page_size}), not {size}")
        if have == 0 and size is not None:
            self.data.truncate(size)
            self.data.sync()
            return size
        if have == 0 or have % self.page_size or (size is not None and size != have):
            raise MachError("KERN_INVALID_ARGUMENT", f"the data file holds {have} bytes, "
                            f"not a segment of {size or 'whole pages'}")
        return have

    def _open_log(self) -> LogHeader:
        header = read_header(self.log)
        if header is None:  # a new log (or one whose creation a crash cut short)
            return write_header(self.log, 1, self.size)
        if header.data_size != self.size:
            raise MachError("KERN_INVALID_ARGUMENT", f"the log is for a segment of "
                            f"{header.data_size} bytes, the data file holds {self.size}")
        return header

    def session(self) -> tuple[int, int, int]:
        """(salt, next seq, tail) where the next appender continues."""
        return self.header.salt, self.seq, self.read_end

    # -- reading the log -------------------------------------------------------------------
    def catch_up(self) -> int:
        """Apply the records appended since the last call to the committed image;
        returns how many. A record still being written is left for a later call."""
        n = 0
        for end, ranges in scan(self.log, self.read_end, self.header.salt, self.seq,
                                self.size):
            for offset, data in ranges:
                self._apply_range(offset, data, end)
            self.read_end = end
            self.seq += 1
            n += 1
        self.counters.records_applied += n
        return n

    def _apply_range(self, offset: int, data: bytes, lsn: int) -> None:
        ps, pos, n = self.page_size, 0, len(data)
        while pos < n:
            at = offset + pos
            page = at - at % ps
            k = min(n - pos, page + ps - at)
            image = self.image.get(page)
            if image is None:
                image = self.image[page] = bytearray(self._data_page(page))
            image[at - page:at - page + k] = data[pos:pos + k]
            self.lsn[page] = lsn
            pos += k

    def _data_page(self, page: int) -> bytes:
        return self.data.pread(page, self.page_size).ljust(self.page_size, b"\0")

    def page(self, offset: int) -> bytes:
        """The committed image of the page at `offset` (as far as the log has been read)."""
        image = self.image.get(offset)
        return bytes(image) if image is not None else self._data_page(offset)

    def _torn_tail(self) -> bool:
        """Whether a record of this epoch begins at the end of the valid ones (it is then
        not whole: a torn or unfinished write)."""
        raw = self.log.pread(self.read_end, _REC_HEAD.size)
        if len(raw) < _REC_HEAD.size:
            return False
        magic, _, _, _, salt, seq = _REC_HEAD.unpack(raw)
        return bool(magic == RECORD_MAGIC and salt == self.header.salt and seq == self.seq)

    # -- writing the data file ------------------------------------------------------------
    def _force_log_to(self, lsn: int) -> None:
        """The write-ahead rule: the log is on disk up to `lsn` before data is written."""
        if lsn > self.synced_end:
            self.log.sync()
            self.synced_end = self.read_end
            self.counters.wal_forces += 1

    def write_back(self, offset: int, data: bytes) -> bool:
        """A kernel wrote the page at `offset` back with `data`: write the page's committed
        image home, after the log records it holds are on disk. Returns whether `data`
        is exactly the committed image (else it holds changes no logged record covers)."""
        self.catch_up()
        image = self.image.pop(offset, None)
        if image is None:
            return self._data_page(offset) == data
        self._force_log_to(self.lsn.pop(offset))
        self.data.pwrite(offset, bytes(image))
        self.data_unsynced = True
        self.counters.pages_written += 1
        return image == data

    def apply_log(self) -> tuple[int, int, int]:
        """Truncation: apply the whole log to the data file, sync it, and begin a new, empty
        log epoch; returns (salt, seq, tail) for the next appender. The caller must be
        sure nobody appends meanwhile (it holds the log's lock, or it is the appender)."""
        self.catch_up()
        self.counters.torn_records_dropped += self._torn_tail()
        if self.image:
            self._force_log_to(self.read_end)
            for page in sorted(self.image):
                self.data.pwrite(page, bytes(self.image[page]))
                self.counters.pages_written += 1
            self.data_unsynced = True
        if self.data_unsynced:  # every page written home since the last epoch, too
            self.data.sync()
            self.data_unsynced = False
        self.counters.truncations += self.read_end > LOG_START
        self.header = write_header(self.log, self.header.epoch + 1, self.size)
        self.image.clear()
        self.lsn.clear()
        self.seq, self.read_end, self.synced_end = 1, LOG_START, LOG_START
        return self.session()

    def close(self) -> None:
        """Close both files."""
        with contextlib.suppress(OSError):
            self.log.close()
        self.data.close()
