"""Recoverable virtual memory (paper 8.3; pymach.apps.rvm): the RVM API, Camelot's
write-ahead rule, recovery, and crash tests.

The API tests run embedded (both schedulers) and as native tasks (CONTRACT). Then two
kinds of crash test, each checked the same way after every recovery (tests/rvmutil.py,
`check_recovered`): every FLUSH commit that returned is there, no aborted or unended
change is, each NO_FLUSH commit is wholly there or wholly absent (and the survivors are
a prefix of each session's commits, as a sequential log must give).

- A crash at every I/O point: the manager and the clients run on an embedded kernel (the
  deterministic scheduler, so every run does the same I/O in the same order) over a
  fault-injecting disk (rvmutil.SimDisk) under the log and the data file. For each write,
  allocation and sync, one run crashes the whole machine there; the disk is then taken as
  a power failure leaves it (nothing unsynced, everything, or any subset with torn
  writes), and as a process crash leaves it followed by a power failure in the middle of
  recovery. Memory is small, so the kernel pages the segment out throughout (the
  write-ahead rule at work), and the first client dies without unmapping.
- SIGKILL: a native machd, the manager and the client are processes, and the test kills
  the client, the manager or both with SIGKILL at random moments (half the manager kills
  aimed at the moment it begins a write or sync) over 200 cycles of random transactions,
  restarting and checking after each: first with the segment paged out all the time,
  then resident with the manager killed while its client goes on committing. This is
  what really stops a manager mid-write (between its write and its sync, or between two
  page writes of a truncation); unlike the fault-injecting disk it cannot lose the page
  cache, which is why both tests exist. A manager dies under a running client only when
  the client's pages are all resident (PAGED_OUT_CLIENT below).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pymach as m
from machutil import recv, wait_until
from nativeutil import start_machd, stop_machd, uffd_or_skip
from pymach.apps import rvm
from pymach.apps.rvm_log import (
    LOG_START,
    OsStorage,
    decode_record,
    encode_record,
    read_header,
    scan,
)
from pymach.bench import rvm as rvm_bench
from pymach.cli.demo_rvm import run_rvm_demo
from pymach.libmach.task import attach, detach
from rvmutil import (
    PS,
    Crash,
    SimDisk,
    Verdict,
    check_recovered,
    give_port,
    journal_client,
    leave_unended,
    new_segment,
    read_journal,
    recover_files,
    run_transactions,
    take_port,
)

CONTRACT = True  # the API tests run as native tasks of machd too (conftest.py)
PAGES = 16


@pytest.fixture
def segment(kernel: Any, tmp_path: Path) -> Iterator[tuple[Any, int, Path]]:
    """A manager task serving a new segment of PAGES pages in tmp_path."""
    handle, server = rvm.start_manager(str(tmp_path / "data"), str(tmp_path / "log"),
                                       PAGES * PS)
    yield handle, server, tmp_path
    with contextlib.suppress(m.MachError):
        m.task_terminate(handle.port)


def _stop(handle: Any, server: int) -> rvm.RvmStatistics:
    rvm.rvm_shutdown(server)
    stats: rvm.RvmStatistics = handle.result(30_000)
    return stats


def _records(log_path: Path) -> list[list[tuple[int, bytes]]]:
    """The records in a log file (as recovery would read them)."""
    log = OsStorage(str(log_path))
    try:
        header = read_header(log)
        assert header is not None
        return [r for _, r in scan(log, LOG_START, header.salt, 1, header.data_size)]
    finally:
        log.close()


# -- the API ------------------------------------------------------------------------------
def test_committed_transactions_outlive_the_session_and_the_manager(
        segment: tuple[Any, int, Path]) -> None:
    handle, server, root = segment
    seg = rvm.rvm_map(server)
    a = seg.address
    assert seg.size == PAGES * PS and seg.read(a, PS) == bytes(PS)
    t = seg.begin_transaction(rvm.RESTORE)
    t.set_range(a + 100, 5)
    seg.write(a + 100, b"hello")
    t.end_transaction(rvm.FLUSH)
    t = seg.begin_transaction(rvm.NO_RESTORE)
    t.set_range(a + PS - 3, 6)  # across a page boundary
    m.memory()[a + PS - 3:a + PS + 3] = b"across"  # plain stores work as well
    t.end_transaction(rvm.NO_FLUSH)
    with seg.begin_transaction() as t:  # RESTORE; ends with FLUSH
        t.set_range(a + 5 * PS, 3)
        seg.write(a + 5 * PS, b"ctx")
    seg.unmap()
    seg = rvm.rvm_map(server)  # a new session: the same data
    assert seg.read(seg.address + 100, 5) == b"hello"
    assert seg.read(seg.address + PS - 3, 6) == b"across"
    seg.unmap()
    assert _stop(handle, server).sessions == 2
    handle, server = rvm.start_manager(str(root / "data"), str(root / "log"))  # recovery
    with rvm.rvm_map(server) as seg:
        assert seg.read(seg.address + 100, 5) == b"hello"
        assert seg.read(seg.address + 5 * PS, 3) == b"ctx"
    data = (root / "data").read_bytes()  # the new manager applied the log on its start
    assert data[100:105] == b"hello" and data[PS - 3:PS + 3] == b"across"
    assert _records(root / "log") == []
    _stop(handle, server)


def test_abort_restores_old_values(segment: tuple[Any, int, Path]) -> None:
    _, server, _ = segment
    with rvm.rvm_map(server) as seg:
        a = seg.address
        with seg.begin_transaction() as t:
            t.set_range(a, 8)
            seg.write(a, b"original")
        t = seg.begin_transaction(rvm.RESTORE)
        t.set_range(a, 8)
        t.set_range(a + 4, 8)  # overlapping ranges are restored in reverse order
        seg.write(a, b"changed!chan")  # 12 bytes: both ranges
        t.abort_transaction()
        assert seg.read(a, 12) == b"original" + bytes(4)
        t = seg.begin_transaction(rvm.NO_RESTORE)
        t.set_range(a, 8)
        seg.write(a, b"no-undo!")
        with pytest.raises(m.MachError) as e:
            t.abort_transaction()  # RVM: a no_restore transaction cannot abort
        assert e.value.code == "KERN_FAILURE"
        t.end_transaction(rvm.FLUSH)
        assert seg.read(a, 8) == b"no-undo!"
        with pytest.raises(ValueError), seg.begin_transaction() as t:  # raising aborts
            t.set_range(a, 8)
            seg.write(a, b"thrown!!")
            raise ValueError
        assert seg.read(a, 8) == b"no-undo!"


def test_bad_calls_fail_clearly(segment: tuple[Any, int, Path]) -> None:
    _, server, root = segment
    seg = rvm.rvm_map(server)
    a = seg.address
    t = seg.begin_transaction()
    for address, size in ((a - 1, 4), (a + seg.size - 2, 4), (a, 0), (a, -5), ("x", 4)):
        with pytest.raises(m.MachError) as e:
            t.set_range(address, size)  # type: ignore[arg-type]
        assert e.value.code == "KERN_INVALID_ADDRESS", (address, size)
    for call in (lambda: seg.begin_transaction("maybe"), lambda: t.end_transaction("soon")):
        with pytest.raises(m.MachError) as e:
            call()
        assert e.value.code == "KERN_INVALID_ARGUMENT"
    with pytest.raises(m.MachError) as e:
        rvm.rvm_map(server)  # a second session while the first lives
    assert e.value.code == "KERN_NO_ACCESS"
    with pytest.raises(m.MachError) as e:
        seg.unmap()  # a transaction has not ended
    assert e.value.code == "KERN_FAILURE"
    t.end_transaction(rvm.NO_FLUSH)
    with pytest.raises(m.MachError) as e:
        t.end_transaction()
    assert e.value.code == "KERN_FAILURE"
    seg.unmap()
    with pytest.raises(m.MachError) as e:
        seg.begin_transaction()
    assert e.value.code == "KERN_INVALID_ARGUMENT"
    with pytest.raises(m.MachError) as e:
        rvm.start_manager(str(root / "missing"), str(root / "missing.log"))
    assert e.value.code == "KERN_FAILURE" and "missing" in e.value.detail
    with pytest.raises(m.MachError) as e:
        rvm.start_manager(str(root / "odd"), str(root / "odd.log"), PS + 1)
    assert e.value.code == "KERN_INVALID_ARGUMENT"


def test_flush_puts_the_record_on_disk_and_truncate_applies_it(
        segment: tuple[Any, int, Path]) -> None:
    _, server, root = segment
    with rvm.rvm_map(server) as seg:
        t = seg.begin_transaction(rvm.NO_RESTORE)
        t.set_range(seg.address + 3 * PS + 10, 4)
        seg.write(seg.address + 3 * PS + 10, b"lazy")
        t.end_transaction(rvm.NO_FLUSH)
        assert _records(root / "log") == []  # still in the task's buffer
        t = seg.begin_transaction(rvm.NO_RESTORE)
        t.set_range(seg.address + 10, 7)
        seg.write(seg.address + 10, b"durable")
        t.end_transaction(rvm.FLUSH)
        assert _records(root / "log") == [[(3 * PS + 10, b"lazy")], [(10, b"durable")]]
        assert (root / "data").read_bytes()[10:17] == bytes(7)  # not written home yet
        seg.truncate()
        assert _records(root / "log") == []
        data = (root / "data").read_bytes()
        assert data[10:17] == b"durable" and data[3 * PS + 10:3 * PS + 14] == b"lazy"
        assert seg.statistics().truncations == 1


def _traced(trace: str, role: str, path: str, create: bool = False) -> OsStorage:
    return TracedStorage(path, create, trace, role)


class TracedStorage(OsStorage):
    """An OsStorage that appends a line to a trace file when it opens and before and
    after each write and sync: "pid role file op [offset] begin|end"."""

    def __init__(self, path: str, create: bool, trace: str, role: str) -> None:
        super().__init__(path, create)
        self.trace = os.open(trace, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                             0o600)
        self.what = f"{os.getpid()} {role} {os.path.basename(path)}"
        self._note("open")

    def _note(self, op: str) -> None:
        os.write(self.trace, f"{self.what} {op}\n".encode())

    def pwrite(self, offset: int, data: bytes) -> None:
        self._note(f"write {offset} begin")
        super().pwrite(offset, data)
        self._note(f"write {offset} end")

    def sync(self) -> None:
        self._note("sync begin")
        super().sync()
        self._note("sync end")

    def close(self) -> None:
        super().close()
        with contextlib.suppress(OSError):
            os.close(self.trace)


def test_a_page_goes_home_only_after_its_log_records(kernel: Any, tmp_path: Path) -> None:
    """Camelot's rule: records on disk, then the page, and only its committed image."""
    trace = str(tmp_path / "trace")
    handle, server = rvm.start_manager(str(tmp_path / "data"), str(tmp_path / "log"),
                                       PAGES * PS, opener=functools.partial(
                                           _traced, trace, "manager"))
    seg = rvm.rvm_map(server, buffer_limit=1,  # NO_FLUSH records go out unsynced at once
                      opener=functools.partial(_traced, trace, "client"))
    a = seg.address + 2 * PS
    t = seg.begin_transaction(rvm.NO_RESTORE)
    t.set_range(a, 9)
    seg.write(a, b"committed")
    t.end_transaction(rvm.NO_FLUSH)
    t = seg.begin_transaction(rvm.NO_RESTORE)
    t.set_range(a + 100, 11)
    seg.write(a + 100, b"uncommitted")  # and never ended
    os.truncate(trace, 0)
    m.vm_deallocate(m.task_self(), seg.address, seg.size)  # the kernel writes page 2 back
    wait_until(lambda: seg.statistics().pages_written >= 1, 30_000)
    stats = seg.statistics()
    lines = [line.split(" ", 1)[1] for line in Path(trace).read_text().splitlines()]
    home = f"manager data write {2 * PS} begin"
    assert home in lines, lines
    assert lines.index("manager log sync end") < lines.index(home)
    assert stats.wal_forces >= 1 and stats.pages_shadowed >= 1
    page = (tmp_path / "data").read_bytes()[2 * PS:3 * PS]
    assert page[:9] == b"committed" and page[100:111] == bytes(11)
    seg.log.close()
    _stop(handle, server)


def _dies_in_a_transaction(seed: int) -> None:
    server, ready = take_port(), take_port()
    seg = rvm.rvm_map(server, buffer_limit=1 << 20)
    with seg.begin_transaction() as t:
        t.set_range(seg.address, 6)
        seg.write(seg.address, b"flush!")
    t = seg.begin_transaction(rvm.NO_RESTORE)
    t.set_range(seg.address + PS, 8)
    seg.write(seg.address + PS, b"buffered")
    t.end_transaction(rvm.NO_FLUSH)  # only in this task's buffer
    leave_unended(seg, seed, 7, lambda e: None)
    m.msg_send(m.Message(remote_port=ready))
    m.msg_receive(m.port_allocate(m.task_self()))  # wait to be killed


def test_a_dead_clients_unfinished_work_is_gone(kernel: Any,
                                                segment: tuple[Any, int, Path]) -> None:
    _, server, _ = segment
    ready = m.port_allocate(m.task_self())
    client = kernel.spawn(_dies_in_a_transaction, 3, name="doomed")
    give_port(client, server)
    give_port(client, ready)
    recv(ready, 30_000)  # it has made its changes
    m.task_terminate(client.port)
    with rvm.rvm_map(server, wait_ms=10_000) as seg:
        image = seg.read(seg.address, seg.size)
    assert image[:6] == b"flush!"
    assert image[6:] == bytes(seg.size - 6)  # nothing buffered, nothing unended


def test_recovery_drops_a_torn_tail(segment: tuple[Any, int, Path]) -> None:
    handle, server, root = segment
    with rvm.rvm_map(server) as seg:
        for i in range(3):
            with seg.begin_transaction() as t:
                t.set_range(seg.address + i * 1000, 4)
                seg.write(seg.address + i * 1000, b"rec%d" % i)
    _stop(handle, server)  # the log keeps its three records
    log = OsStorage(str(root / "log"))
    header = read_header(log)
    assert header is not None
    end = [e for e, _ in scan(log, LOG_START, header.salt, 1, header.data_size)][-1]
    torn = encode_record(header.salt, 4, [(5000, b"never whole" * 50)])
    log.pwrite(end, torn[:len(torn) // 2])  # a crash cut the fourth record in half
    log.close()
    handle, server = rvm.start_manager(str(root / "data"), str(root / "log"))
    stats = rvm.rvm_statistics(server)
    assert stats.recovered_records == 3 and stats.torn_records_dropped == 1
    with rvm.rvm_map(server) as seg:
        image = seg.read(seg.address, seg.size)
    assert [image[i * 1000:i * 1000 + 4] for i in range(3)] == [b"rec0", b"rec1", b"rec2"]
    assert image[5000:5011] == bytes(11)
    _stop(handle, server)


def test_a_record_is_whole_of_this_epoch_and_in_order_or_nothing() -> None:
    rec = encode_record(77, 5, [(10, b"abc"), (4000, b"defg")])
    assert decode_record(rec, 0, 77, 5, 8192) == (len(rec), [(10, b"abc"), (4000, b"defg")])
    assert decode_record(rec, 0, 78, 5, 8192) is None  # another epoch's salt
    assert decode_record(rec, 0, 77, 6, 8192) is None  # out of order
    assert decode_record(rec, 0, 77, 5, 4000) is None  # a range outside the segment
    assert decode_record(rec[:-1], 0, 77, 5, 8192) is None  # torn
    for i in range(len(rec)):  # any flipped byte
        bad = bytearray(rec)
        bad[i] ^= 0x40
        assert decode_record(bytes(bad), 0, 77, 5, 8192) is None, i


def test_the_demo_crashes_and_recovers() -> None:
    lines: list[str] = []
    assert run_rvm_demo(out=lines.append), lines
    text = "\n".join(lines)
    assert "killed with SIGKILL" in text and "every durable one is there" in text
    assert "total 8000 (every transfer whole or absent)" in text


def test_the_benchmark_gives_each_figure_beside_its_baseline(tmp_path: Path) -> None:
    r = rvm_bench.run("embedded", rounds=1, n_flush=10, n_no_flush=300,
                      directory=str(tmp_path))
    for mine, theirs in (("rvm_flush_tps", "sqlite_wal_full_tps"),
                         ("rvm_no_flush_tps", "sqlite_wal_off_tps")):
        assert r[mine] > 0 and r[theirs] > 0
    assert abs(r["ratio_flush_vs_sqlite_full"] * r["sqlite_wal_full_tps"]
               - r["rvm_flush_tps"]) <= 0.01 * r["rvm_flush_tps"] + 1
    assert {"target_ratio_flush_vs_sqlite_full_at_least",
            "target_ratio_no_flush_vs_sqlite_off_at_least"} <= set(r)
    assert os.listdir(tmp_path) == []  # its files are gone


# -- a crash at every I/O point -------------------------------------------------------------
def _workload(seed: int, tids: range, events: list[tuple[Any, ...]], opener: Any,
              last: bool) -> None:
    """One client session: random transactions; the first session dies without
    unmapping (its NO_FLUSH records go to the log unsynced at once), in a transaction."""
    server = take_port()
    seg = rvm.rvm_map(server, opener=opener, buffer_limit=1024 if last else 1,
                      truncate_threshold=40 << 10)
    events.append(("S",))
    run_transactions(seg, seed, tids, events.append)
    if last:
        seg.unmap()
    else:
        leave_unended(seg, seed, tids[-1] + 1, events.append)


def _await(client: Any, disk: SimDisk) -> None:
    """Wait until the client task ends or the machine has crashed."""
    while True:
        try:
            client.result(20)
            return
        except Crash:
            return
        except m.MachError as e:
            if disk.crashed:
                return
            if e.code != "KERN_OPERATION_TIMED_OUT":
                raise


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Tasks the simulated crash stops are expected: the kernel need not log them."""
    logger = logging.getLogger("pymach")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _machine(files: dict[str, bytes], crash_at: int | None, seed: int, n: int
             ) -> tuple[SimDisk, list[tuple[Any, ...]]]:
    """Run the two sessions on an embedded kernel with 24 pages of memory (the segment
    has 16) over a SimDisk crashing at I/O point `crash_at`."""
    disk = SimDisk(files, crash_at)
    events: list[tuple[Any, ...]] = []
    with _quiet(), m.boot(deterministic=True, seed=seed, memory_size=24 * PS) as k:
        try:
            handle, server = rvm.start_manager("data", "log", opener=disk.open)
            for part, tids in enumerate((range(n // 2), range(n // 2 + 1, n))):
                client = k.spawn(_workload, seed, tids, events, disk.open, part == 1,
                                 name=f"client{part}")
                give_port(client, server)
                _await(client, disk)
                if disk.crashed:
                    break
            if not disk.crashed:
                _stop(handle, server)
        except (Crash, m.MachError):
            if not disk.crashed:
                raise
    return disk, events


def _sweep(seed: int, n: int) -> tuple[Verdict, dict[str, int]]:
    base = new_segment(PAGES)
    disk, events = _machine(base, None, seed, n)
    full = list(disk.trace)
    total = check_recovered(recover_files(base | {k: bytes(f.durable) for k, f in
                                                  disk.files.items()})[1],
                            base["data"], events, seed)
    rng = random.Random(seed)
    for k in range(1, len(full) + 1):
        disk, events = _machine(base, k, seed, n)
        assert disk.crashed and disk.trace == full[:k], f"run {k} did other I/O"
        pc = disk.process_crash(rng, crash_at=rng.randint(1, 14))
        with contextlib.suppress(Crash):  # a power failure during recovery
            recover_files(pc)
        states = [pc.after_crash("lost", rng)] + [
            disk.after_crash(p, rng) for p in ("lost", "kept", "random", "random")]
        for files in states:
            total.add(check_recovered(recover_files(files)[1], base["data"], events, seed))
    return total, {what: full.count(what) for what in sorted(set(full))}


def _report(title: str, v: Verdict) -> None:
    print(f"\n{title}: {v.committed} commits checked; survived {v.survived}; FLUSH "
          f"acknowledged {v.flush_acked} (all present), FLUSH cut off before returning "
          f"{v.flush_unacked}; NO_FLUSH {v.no_flush} (present {v.no_flush_survived}, "
          f"absent {v.no_flush - v.no_flush_survived}, none in part); aborted "
          f"{v.aborted} and unended {v.unended} (none visible)")


@pytest.mark.embedded_only("one machine over a simulated disk, crashed at each I/O")
@pytest.mark.parametrize("seed,n", [(5, 24)])
def test_a_crash_at_every_io_point(seed: int, n: int) -> None:
    total, points = _sweep(seed, n)
    print(f"\ncrash points: {sum(points.values())} ({points}); 6 disks after each")
    _report("after every recovery", total)
    assert total.flush_acked > 0 and total.no_flush_survived < total.no_flush
    assert total.aborted > 0 and total.unended > 0


@pytest.mark.slow
@pytest.mark.embedded_only("one machine over a simulated disk, crashed at each I/O")
@pytest.mark.parametrize("seed,n", [(6, 60), (7, 60)])
def test_a_crash_at_every_io_point_long(seed: int, n: int) -> None:
    test_a_crash_at_every_io_point(seed, n)


# -- SIGKILL --------------------------------------------------------------------------------
KILL_PAGES = 64
PAGED_OUT_CLIENT = """A client whose manager dies while the client needs a page from it takes a
memory exception (KERN_MEMORY_ERROR: its data manager died) and ends; this test checks what
the commits left on disk, so it kills a manager under a running client only when every page
of the client is resident. (Victims are killed at once: machd survives a process that dies
while it resolves one of its faults, and a task machd ends keeps its userfaultfd until its
process is gone.)"""
# (machd's memory, cycles, victims and their weights): first with the segment paged out
# all the time (machd has 384K), the manager killed only while the client is stopped
# (SIGSTOP) or dead; then with the segment resident (4M, every page read in first), the
# manager killed while the client runs on and commits, and the client killed later.
KILL_PHASES = [("384K", 110, {"client": 0.5, "client+manager": 0.2, "manager+client": 0.3}),
               ("4M", 90, {"client": 0.3, "manager, client later": 0.7})]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _kill(pid: int, sig: int = signal.SIGKILL) -> None:
    """Send `sig`; for SIGKILL, wait until the process is gone (it dies wherever it
    was, in a write or between two stores)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    if sig != signal.SIGKILL:
        return
    deadline = time.monotonic() + 20
    while _alive(pid):
        assert time.monotonic() < deadline, f"pid {pid} outlived SIGKILL"
        time.sleep(0.001)


def _trace_lines(trace: Path, pid: int) -> list[str]:
    return [line for line in trace.read_text().splitlines() if line.startswith(f"{pid} ")]


class _Cluster:
    """The manager (restarted after each of its deaths) and one client per cycle,
    processes of a native machd; the test process is a task of it too."""

    def __init__(self, root: Path) -> None:
        self.root, self.trace = root, root / "trace"
        self.opener = functools.partial(_traced, str(self.trace), "manager")
        self.handle: Any = None
        self.spare: Any = None
        self.server = self.pid = 0
        self.kills: dict[str, int] = {}
        self.stats: dict[int, rvm.RvmStatistics] = {}  # manager pid -> its last counters

    def count(self, what: str) -> None:
        self.kills[what] = self.kills.get(what, 0) + 1

    def standby(self, size: int | None = None) -> None:
        """Start a manager process that waits (its start overlaps the cycle)."""
        self.spare = rvm.spawn_manager(str(self.root / "data"), str(self.root / "log"),
                                       size, opener=self.opener, standby_ms=600_000)

    def start_manager(self) -> None:
        """The standby manager opens (recovers) the segment; another one stands by."""
        self.handle, self.server = self.spare, rvm.manager_port(self.spare)
        self.pid = int(self.trace.read_text().splitlines()[-1].split()[0])
        self.standby()

    def kill_manager(self, rng: random.Random) -> None:
        """SIGKILL the manager, half the time as soon as it begins a write or sync."""
        if rng.random() < 0.5:
            seen = len(_trace_lines(self.trace, self.pid))
            deadline = time.monotonic() + 0.05
            while time.monotonic() < deadline:
                lines = _trace_lines(self.trace, self.pid)
                if len(lines) > seen and lines[-1].endswith("begin"):
                    self.count("manager kills aimed at an I/O")
                    break
        _kill(self.pid)
        lines = _trace_lines(self.trace, self.pid)
        if lines and lines[-1].endswith("begin"):
            self.count(f"manager killed inside a {lines[-1].split()[3]} of its "
                       f"{lines[-1].split()[2]} file")
        self.handle = None


def _kill_some(c: _Cluster, victim: str, cpid: int, rng: random.Random) -> None:
    if victim == "client":
        _kill(cpid)
    elif victim == "client+manager":  # the client first
        _kill(cpid)
        c.kill_manager(rng)
    elif victim == "manager+client":  # at one moment: the client stopped meanwhile
        _kill(cpid, signal.SIGSTOP)
        c.kill_manager(rng)
        _kill(cpid)
    else:  # the client runs on without its manager (every page is resident)
        c.kill_manager(rng)
        time.sleep(rng.uniform(0, 0.05))
        _kill(cpid)


def _spawn_client(c: _Cluster, cycle: int, resident: bool) -> Any:
    """Start cycle `cycle`'s client process now; it waits for its manager's port (so
    its start overlaps the previous cycle's recovery and check)."""
    return m.spawn(journal_client, cycle, str(c.root / f"journal{cycle}"), resident,
                   name=f"client{cycle}")


def _one_cycle(c: _Cluster, cycle: int, client: Any, rng: random.Random, base: bytes,
               victims: dict[str, float], next_client: Any) -> tuple[Verdict, bytes]:
    """Run the cycle's client, kill, start the next client, recover, check."""
    if c.handle is None:
        c.start_manager()  # recovery
    journal = c.root / f"journal{cycle}"
    give_port(client, c.server)
    wait_until(lambda: journal.exists() and "S\n" in journal.read_text(), 30_000)
    cpid = read_journal(str(journal))[0][1]
    victim = rng.choices(list(victims), list(victims.values()))[0]
    c.count(victim)
    time.sleep(rng.uniform(0.002, 0.06))
    assert _alive(cpid), f"cycle {cycle}: the client died before it was killed"
    _kill_some(c, victim, cpid, rng)
    next_client()
    if c.handle is None:
        c.start_manager()
    with rvm.rvm_map(c.server, wait_ms=30_000) as seg:
        image = seg.read(seg.address, seg.size)
    c.stats[c.pid] = rvm.rvm_statistics(c.server)
    events = read_journal(str(journal))
    try:
        return check_recovered(image, base, events, cycle), image
    except AssertionError as e:
        raise AssertionError(f"cycle {cycle}, SIGKILL of {victim}: {e}") from None


def _phase(c: _Cluster, memory: str, cycles: int, victims: dict[str, float],
           first: int, base: bytes, rng: random.Random, total: Verdict) -> bytes:
    """`cycles` cycles under a machd with `memory`; returns the segment's last image."""
    sock = c.root / f"machd-{memory}.sock"
    daemon = start_machd(sock, "--memory", memory)
    try:
        attach(str(sock), name="sigkill-test")
        try:
            c.standby(len(base) if first == 0 else None)
            c.start_manager()
            resident = memory == "4M"
            end = first + cycles
            clients = [_spawn_client(c, n, resident) for n in range(first, min(first + 2, end))]
            for cycle in range(first, end):
                def spawn_next(n: int = cycle + 2) -> None:  # two ahead: they start slowly
                    if n < end:
                        clients.append(_spawn_client(c, n, resident))

                verdict, base = _one_cycle(c, cycle, clients.pop(0), rng, base, victims,
                                           spawn_next)
                total.add(verdict)
            _stop(c.handle, c.server)
            m.task_terminate(c.spare.port)
            c.handle = None
        finally:
            detach()
    finally:
        stop_machd(daemon)
    return base


@pytest.mark.slow
def test_sigkill_the_client_and_the_manager_at_random_points(tmp_path: Path) -> None:
    uffd_or_skip()
    rng, base, total = random.Random(1993), bytes(KILL_PAGES * PS), Verdict()
    c, first = _Cluster(tmp_path), 0
    for memory, cycles, victims in KILL_PHASES:
        base = _phase(c, memory, cycles, victims, first, base, rng, total)
        first += cycles
    managers = rvm.RvmStatistics(*(sum(getattr(s, f) for s in c.stats.values())
                                   for f in vars(rvm.RvmStatistics())))
    print(f"\n{first} cycles; SIGKILL of: {c.kills}")
    print(f"{len(c.stats)} managers did in all (as of their last check): {managers}")
    _report("after every recovery", total)
    assert any(k.startswith("manager killed inside") for k in c.kills)
    assert total.flush_acked > 0 and total.no_flush_survived < total.no_flush
    assert managers.pages_shadowed > 0 and managers.wal_forces > 0
