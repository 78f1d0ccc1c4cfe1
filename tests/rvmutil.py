"""Helpers for the recoverable-memory tests (pymach.apps.rvm): a fault-injecting disk, a
random transaction workload with a journal of what the client was told, and the check a
database engineer would make after a crash.

`SimDisk` is the fault-injecting layer under the log and the data file: a `Storage` for
each file, with a durable image (what a sync made permanent) and the writes since. Every
write, allocation, truncation and sync is a numbered I/O point; with `crash_at=k` the k-th
raises `Crash` (the machine stops there: every later I/O raises too), a write being
interrupted in the middle. `after_crash(policy)` is what the disk may hold afterwards:
"lost" (nothing unsynced reached the disk: power failure), "kept" (all of it did, the
interrupted write torn: a process crash, the page cache survives), "random" (any subset
of the unsynced writes, each possibly torn at any byte: a disk that reorders).

The workload (`run_transactions`) is random transactions over the segment: RESTORE or
NO_RESTORE, set_range over 1-4 ranges (some crossing pages), the stores, then FLUSH,
NO_FLUSH or abort; now and then flush() or truncate(). Each transaction's ranges and
bytes follow from (seed, tid) alone (`tx_ranges`). The journal records, in order, what
the client did and was told: ("E", tid, mode) just before end_transaction, ("D", tid)
when it returned, ("A", tid) an abort done, ("B", tid) a begin, ("F",) a flush() and
("T",) a truncate() that returned.

`check_recovered(image, base, events, seed)` decides whether a recovered segment is
right. Committed transactions reach the log in commit order, so what survives must be
the first m of them, with m at least the number committed before the last FLUSH commit,
flush() or truncate() that returned (those are durable) and at most the number that
reached end_transaction. The image must equal `base` with exactly those m applied: so
every acknowledged FLUSH transaction is there, no aborted or unended change is, and each
NO_FLUSH transaction is wholly there or wholly absent.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pymach
from pymach.apps import rvm
from pymach.apps.rvm_log import SegmentStore

PS = 4096


class Crash(BaseException):
    """The simulated machine stopped at an I/O point (a BaseException: nothing in the
    code under test may swallow it)."""


@dataclass
class _File:
    durable: bytearray
    current: bytearray
    unsynced: list[tuple[str, int, bytes]] = field(default_factory=list)  # ("w"|"t", at, data)
    lock: object | None = None


class SimDisk:
    """Files in memory with crash points (see module docstring)."""

    def __init__(self, files: dict[str, bytes] | None = None,
                 crash_at: int | None = None) -> None:
        self.files = {n: _File(bytearray(d), bytearray(d)) for n, d in (files or {}).items()}
        self.crash_at = crash_at
        self.ops = 0
        self.crashed = False
        self.trace: list[str] = []  # what each I/O point was: "log.write", "data.sync", ...
        self.interrupted: tuple[str, int, bytes] | None = None  # (file, at, data)

    def open(self, path: str, create: bool = False) -> SimFile:
        """The opener RvmManager and rvm_map take."""
        name = os.path.basename(path)
        if name not in self.files:
            if not create:
                raise FileNotFoundError(path)
            self.files[name] = _File(bytearray(), bytearray())
        return SimFile(self, name)

    def point(self, what: str) -> bool:
        """Count an I/O point; True if the machine crashes at it."""
        if self.crashed:
            raise Crash(what)
        self.ops += 1
        self.trace.append(what)
        if self.ops == self.crash_at:
            self.crashed = True
            return True
        return False

    def after_crash(self, policy: str, rng: random.Random) -> dict[str, bytes]:
        """What each file may hold after the crash, under `policy`."""
        out = {}
        for name, f in self.files.items():
            disk = bytearray(f.durable)
            ops = list(f.unsynced)
            if self.interrupted is not None and self.interrupted[0] == name:
                ops.append(("w", self.interrupted[1], self.interrupted[2]))
            for i, (kind, at, data) in enumerate(ops):
                interrupted = self.interrupted is not None and i == len(ops) - 1 and (
                    self.interrupted[0] == name)
                if policy == "lost" or (policy == "random" and rng.random() < 0.5):
                    continue
                if kind == "w" and (interrupted or (policy == "random" and rng.random() < 0.3)):
                    data = data[:rng.randrange(len(data) + 1)]  # torn
                _apply(disk, kind, at, data)
            out[name] = bytes(disk)
        return out


    def process_crash(self, rng: random.Random, crash_at: int | None = None) -> SimDisk:
        """The disk after a crash of the processes only: the page cache survives, so
        reads see every write (the interrupted one torn), but what was not synced is
        still not durable: a later power failure (after_crash("lost")) loses it."""
        disk = SimDisk(crash_at=crash_at)
        for name, f in self.files.items():
            g = disk.files[name] = _File(bytearray(f.durable), bytearray(f.current),
                                         list(f.unsynced))
            if self.interrupted is not None and self.interrupted[0] == name:
                _, at, data = self.interrupted
                data = data[:rng.randrange(len(data) + 1)]
                _apply(g.current, "w", at, data)
                g.unsynced.append(("w", at, data))
        return disk


def _apply(disk: bytearray, kind: str, at: int, data: bytes) -> None:
    if kind == "t":
        if at < len(disk):
            del disk[at:]
        else:
            disk.extend(bytes(at - len(disk)))
        return
    if at > len(disk):
        disk.extend(bytes(at - len(disk)))
    disk[at:at + len(data)] = data


class SimFile:
    """One open file of a SimDisk (the Storage protocol of rvm_log)."""

    def __init__(self, disk: SimDisk, name: str) -> None:
        self.disk, self.name = disk, name
        self.revoked = False

    def _file(self) -> _File:
        if self.revoked:
            raise OSError(9, "revoked")
        return self.disk.files[self.name]

    def _kind(self) -> str:
        return "log" if self.name.endswith("log") else "data"

    def pread(self, offset: int, size: int) -> bytes:
        return bytes(self._file().current[offset:offset + size])

    def pwrite(self, offset: int, data: bytes) -> None:
        f = self._file()
        if self.disk.point(f"{self._kind()}.write"):
            self.disk.interrupted = (self.name, offset, bytes(data))
            raise Crash(f"{self.name}.write")
        _apply(f.current, "w", offset, data)
        f.unsynced.append(("w", offset, bytes(data)))

    def sync(self) -> None:
        f = self._file()
        if self.disk.point(f"{self._kind()}.sync"):
            raise Crash(f"{self.name}.sync")
        f.durable = bytearray(f.current)
        f.unsynced.clear()

    def truncate(self, size: int) -> None:
        f = self._file()
        if self.disk.point(f"{self._kind()}.truncate"):
            raise Crash(f"{self.name}.truncate")
        _apply(f.current, "t", size, b"")
        f.unsynced.append(("t", size, b""))

    def allocate(self, size: int) -> None:
        if size > len(self._file().current):
            self.truncate(size)

    def size(self) -> int:
        return len(self._file().current)

    def try_lock(self) -> bool:
        f = self._file()
        if f.lock is not None and f.lock is not self:
            return False
        f.lock = self
        return True

    def unlock(self) -> None:
        f = self._file()
        if f.lock is self:
            f.lock = None

    def close(self) -> None:
        if not self.revoked:
            self.unlock()
        self.revoked = True

    def revoke(self) -> None:
        self.close()


def new_segment(pages: int) -> dict[str, bytes]:
    """The files of a new segment of `pages` pages (made without crash points)."""
    disk = SimDisk()
    store = SegmentStore(disk.open("data", True), disk.open("log", True), PS, pages * PS)
    store.close()
    return {n: bytes(f.durable) for n, f in disk.files.items()}


def recover_files(files: dict[str, bytes] | SimDisk, crash_at: int | None = None
                  ) -> tuple[dict[str, bytes], bytes, SimDisk]:
    """Recovery as a manager's startup does it, on a copy of `files` (or on a disk): (the
    files after, the recovered segment, the disk). With `crash_at`, recovery itself may
    crash (Crash)."""
    disk = files if isinstance(files, SimDisk) else SimDisk(files, crash_at)
    store = SegmentStore(disk.open("data"), disk.open("log"), PS)
    store.apply_log()
    return {n: bytes(f.durable) for n, f in disk.files.items()}, bytes(
        disk.files["data"].durable), disk


# -- tasks ---------------------------------------------------------------------------------
def give_port(handle: Any, port: int) -> None:
    """Send a child task (from spawn) a send right to `port`; it calls `take_port`."""
    notify = pymach.task_get_special_port(handle.port, pymach.TASK_NOTIFY_PORT)
    pymach.msg_send(pymach.Message(remote_port=notify,
                                   items=[pymach.Port(port, pymach.COPY_SEND)]))


def take_port() -> int:
    """In a child task: the port its parent gave it (give_port)."""
    msg = pymach.msg_receive(pymach.task_notify(), pymach.RCV_TIMEOUT, 30_000)
    return msg.items[0].value  # type: ignore[return-value]


# -- the workload ---------------------------------------------------------------------------
def tx_ranges(seed: int, tid: int, size: int) -> list[tuple[int, bytes]]:
    """Transaction tid's ranges: (segment offset, new bytes), from (seed, tid) alone."""
    rng = random.Random(seed * 1_000_003 + tid)
    out = []
    for _ in range(rng.randint(1, 4)):
        n = rng.choice((8, 64, 128, 300, 700, PS + 100))
        at = rng.randrange(size - n)
        if rng.random() < 0.3:  # across a page boundary
            at = max(0, min(size - n, (at // PS + 1) * PS - n // 2))
        out.append((at, rng.randbytes(n)))
    return out


Journal = Callable[[tuple[Any, ...]], None]


def run_transactions(seg: rvm.Segment, seed: int, tids: Iterable[int],
                     note: Journal) -> None:
    """Random transactions on `seg`, each reported to `note` (see module docstring)."""
    for tid in tids:
        rng = random.Random(seed * 7_000_003 + tid)
        roll = rng.random()
        if roll < 0.04:
            seg.flush()
            note(("F",))
            continue
        if roll < 0.08:
            seg.truncate()
            note(("T",))
            continue
        restore = rng.random() < 0.6
        t = seg.begin_transaction(rvm.RESTORE if restore else rvm.NO_RESTORE)
        note(("B", tid))
        for at, data in tx_ranges(seed, tid, seg.size):
            t.set_range(seg.address + at, len(data))
            seg.write(seg.address + at, data)
        end = rng.random()
        if restore and end < 0.2:
            t.abort_transaction()
            note(("A", tid))
            continue
        mode = rvm.FLUSH if end < 0.6 else rvm.NO_FLUSH
        note(("E", tid, mode))
        t.end_transaction(mode)
        note(("D", tid))


def leave_unended(seg: rvm.Segment, seed: int, tid: int, note: Journal) -> None:
    """Begin transaction tid and make its changes, and never end it."""
    t = seg.begin_transaction(rvm.RESTORE)
    note(("B", tid))
    for at, data in tx_ranges(seed, tid, seg.size):
        t.set_range(seg.address + at, len(data))
        seg.write(seg.address + at, data)


def journal_client(seed: int, journal: str, resident: bool = False) -> None:
    """A client task that runs random transactions until it is killed, writing its
    journal to a file (each line is written before the next step, so a SIGKILL leaves
    every event that happened): ("P", pid) first, then ("S",) once mapped (and, with
    `resident`, once every page has been read in)."""
    server = take_port()
    fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def note(event: tuple[Any, ...]) -> None:
        os.write(fd, (" ".join(str(x) for x in event) + "\n").encode())

    note(("P", os.getpid()))
    seg = rvm.rvm_map(server, buffer_limit=4096,
                      truncate_threshold=256 << 10, wait_ms=20_000)
    if resident:  # every page in memory before the first transaction
        seg.read(seg.address, seg.size)
    note(("S",))
    run_transactions(seg, seed, itertools.count(), note)


def read_journal(path: str) -> list[tuple[Any, ...]]:
    """The events of a journal_client's file (a last line cut short is left out)."""
    events: list[tuple[Any, ...]] = []
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                break
            kind, *rest = line.split()
            events.append((kind, *[int(x) if x.isdigit() else x for x in rest]))
    return events


# -- the check --------------------------------------------------------------------------------
@dataclass
class Verdict:
    """What a recovered segment showed, for the counts the tests print."""

    committed: int = 0  # transactions that reached end_transaction
    survived: int = 0  # of them, how many the segment holds (a prefix)
    flush_acked: int = 0  # FLUSH commits that returned (all must survive)
    flush_unacked: int = 0  # FLUSH commits cut off before returning
    no_flush: int = 0  # NO_FLUSH commits
    no_flush_survived: int = 0
    aborted: int = 0  # aborted (must be absent)
    unended: int = 0  # begun, never ended (must be absent)

    def add(self, other: Verdict) -> None:
        for k in vars(self):
            setattr(self, k, getattr(self, k) + getattr(other, k))


def _sessions(events: list[tuple[Any, ...]]) -> list[list[tuple[Any, ...]]]:
    """The events split at each ("S",): one list per client session."""
    out: list[list[tuple[Any, ...]]] = [[]]
    for e in events:
        if e[0] == "S":
            if out[-1]:
                out.append([])
        else:
            out[-1].append(e)
    return out


def _bounds(events: list[tuple[Any, ...]]) -> tuple[list[tuple[int, str]], int]:
    """(one session's committed (tid, mode) in order, how many are surely durable)."""
    order: list[tuple[int, str]] = []
    durable = 0
    for e in events:
        if e[0] == "E":
            order.append((e[1], e[2]))
        elif e[0] == "D" and e[1] in {t for t, m in order if m == rvm.FLUSH}:
            durable = [t for t, _ in order].index(e[1]) + 1
        elif e[0] in ("F", "T"):
            durable = len(order)
    return order, durable


def _apply_tx(image: bytearray, seed: int, tid: int) -> bytearray:
    img = bytearray(image)
    for at, data in tx_ranges(seed, tid, len(img)):
        img[at:at + len(data)] = data
    return img


def _search(image: bytes, start: bytearray, sessions: list[tuple[list[tuple[int, str]], int]],
            seed: int) -> list[int] | None:
    """How many commits of each session survive, if `image` is `start` with a prefix of
    each session's commits applied, session after session (else None)."""
    if not sessions:
        return [] if start == image else None
    (order, durable), rest = sessions[0], sessions[1:]
    images = [start]
    for tid, _ in order:
        images.append(_apply_tx(images[-1], seed, tid))
    for m in range(len(order), durable - 1, -1):
        found = _search(image, images[m], rest, seed)
        if found is not None:
            return [m, *found]
    return None


def check_recovered(image: bytes, base: bytes, events: list[tuple[Any, ...]],
                    seed: int) -> Verdict:
    """The verdict on a recovered segment (AssertionError if it is wrong: see module).
    With several sessions (("S",) events) each session's survivors are a prefix of its
    commits: a dead client's buffered NO_FLUSH commits are lost, later sessions' not."""
    sessions = [_bounds(part) for part in _sessions(events)]
    found = _search(image, bytearray(base), sessions, seed)
    if found is None:
        bounds = ", ".join(f"{d}..{len(o)}" for o, d in sessions)
        last = bytearray(base)
        for order, _ in sessions:
            for tid, _ in order:
                last = _apply_tx(last, seed, tid)
        raise AssertionError(
            f"the recovered segment is not the start image with a prefix of each session's "
            f"commits applied (durable..committed per session: {bounds}); it differs from "
            f"all of them applied in {_diff(last, image)} bytes")
    aborted = {e[1] for e in events if e[0] == "A"}
    ended = {e[1] for e in events if e[0] == "E"}
    acked = {e[1] for e in events if e[0] == "D"}
    v = Verdict(aborted=len(aborted))
    v.unended = len({e[1] for e in events if e[0] == "B"} - ended - aborted)
    for (order, _), m in zip(sessions, found, strict=True):
        v.committed += len(order)
        v.survived += m
        for i, (tid, mode) in enumerate(order):
            if mode == rvm.FLUSH:
                v.flush_acked += tid in acked
                v.flush_unacked += tid not in acked
            else:
                v.no_flush += 1
                v.no_flush_survived += i < m
    return v


def _diff(a: bytes | bytearray, b: bytes | bytearray) -> int:
    return sum(x != y for x, y in zip(a, b, strict=True))
