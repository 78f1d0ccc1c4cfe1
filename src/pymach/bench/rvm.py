"""`pymach bench rvm [--mode embedded|native] --json`: recoverable virtual memory (paper 8.3)
against the standard library's sqlite3, in the same run on the same disk.

The workload is RVM's standard transaction (after TPC-A, as in the RVM paper): update one
128-byte row in each of three tables (account, teller, branch) and append a 64-byte
history record. RVM: a NO_RESTORE transaction on a mapped segment, four set_range calls,
the stores, end_transaction. sqlite3: the same three UPDATEs of 128-byte blobs and one
INSERT of a 64-byte blob in one BEGIN/COMMIT, in WAL mode.

- `end_transaction(FLUSH)` against sqlite3 with `synchronous=FULL` (both sync the log at
  every commit);
- `end_transaction(NO_FLUSH)` against sqlite3 with `synchronous=OFF` (neither syncs at
  commit; the RVM figure includes a final flush, and the log truncations the run needs).

Each figure is the median of `rounds` rounds in transactions per second; the JSON carries
both figures of a pair, their ratio and the target (issue 12: each ratio >= 1, and
NO_FLUSH >= 20,000 per second in native mode). The segment and the database live in one
temporary directory (override with `directory`). Embedded mode runs the manager as a task
of an embedded kernel in this process; native mode starts a private machd, makes this
process a task, and the manager is a process of its own.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pymach
from pymach.apps import rvm

ROWS = {"account": 1000, "teller": 100, "branch": 10}
ROW = 128  # bytes per row
HISTORY_ROWS = 8192
HISTORY = 64  # bytes per history record
PAGE = 4096
TABLE_BYTES = sum(ROWS.values()) * ROW
SEGMENT = -(-(TABLE_BYTES + HISTORY_ROWS * HISTORY) // PAGE) * PAGE


def _rows(i: int) -> list[tuple[int, int]]:
    """Transaction i's three rows: (table index, row)."""
    return [(t, (i * 7919 + t * 31) % n) for t, n in enumerate(ROWS.values())]


def _row_offset(table: int, row: int) -> int:
    return sum(list(ROWS.values())[:table]) * ROW + row * ROW


# -- RVM -------------------------------------------------------------------------------
def _rvm_round(seg: rvm.Segment, n: int, mode: str, start: int) -> float:
    """Seconds for n standard transactions ending with `mode` (and a final flush)."""
    base = seg.address
    values = [bytes([i % 251]) * ROW for i in range(256)]
    records = [bytes([i % 253]) * HISTORY for i in range(256)]
    t0 = time.perf_counter()
    for i in range(start, start + n):
        t = seg.begin_transaction(rvm.NO_RESTORE)
        for table, row in _rows(i):
            a = base + _row_offset(table, row)
            t.set_range(a, ROW)
            seg.write(a, values[i & 255])
        a = base + TABLE_BYTES + (i % HISTORY_ROWS) * HISTORY
        t.set_range(a, HISTORY)
        seg.write(a, records[i & 255])
        t.end_transaction(mode)
    seg.flush()
    return time.perf_counter() - t0


# -- sqlite3 ---------------------------------------------------------------------------
def _sqlite_db(path: str, synchronous: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    for table, n in ROWS.items():
        db.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, v BLOB)")
        db.executemany(f"INSERT INTO {table} VALUES (?, ?)",
                       ((i, bytes(ROW)) for i in range(n)))
    db.execute("CREATE TABLE history (id INTEGER PRIMARY KEY, v BLOB)")
    return db


def _sqlite_round(db: sqlite3.Connection, n: int, start: int) -> float:
    """Seconds for n standard transactions."""
    values = [bytes([i % 251]) * ROW for i in range(256)]
    records = [bytes([i % 253]) * HISTORY for i in range(256)]
    names = list(ROWS)
    t0 = time.perf_counter()
    for i in range(start, start + n):
        db.execute("BEGIN")
        for table, row in _rows(i):
            db.execute(f"UPDATE {names[table]} SET v = ? WHERE id = ?", (values[i & 255], row))
        db.execute("INSERT INTO history (v) VALUES (?)", (records[i & 255],))
        db.execute("COMMIT")
    return time.perf_counter() - t0


def _sqlite_rounds(directory: str, synchronous: str) -> tuple[sqlite3.Connection, int]:
    db = _sqlite_db(os.path.join(directory, f"sqlite-{synchronous}.db"), synchronous)
    _sqlite_round(db, 200, 0)
    return db, 200


# -- the run ---------------------------------------------------------------------------
@contextlib.contextmanager
def _mach_thread(mode: str) -> Iterator[None]:
    """The calling thread as a Mach thread: of an embedded kernel, or of a native task
    of a private machd."""
    if mode == "native":
        from pymach.bench.native import native_task  # (needs NumPy; native mode only)

        with native_task():
            yield
    else:
        with pymach.boot(memory_size=256 << 20):
            yield


def _interleaved(d: str, n_flush: int, n_no_flush: int, rounds: int) -> dict[str, Any]:
    """Rounds of the four measurements in turn (so a change in the disk's speed during
    the run touches each figure alike); transactions per second, medians."""
    handle, server = rvm.start_manager(os.path.join(d, "segment"),
                                       os.path.join(d, "segment.log"), SEGMENT,
                                       name="rvm-bench")
    full, full_n = _sqlite_rounds(d, "FULL")
    off, off_n = _sqlite_rounds(d, "OFF")
    times: dict[str, list[float]] = {k: [] for k in ("flush", "full", "lazy", "off")}
    try:
        seg = rvm.rvm_map(server)
        _rvm_round(seg, 200, rvm.NO_FLUSH, 0)  # every page in memory once
        for r in range(rounds):
            times["flush"].append(_rvm_round(seg, n_flush, rvm.FLUSH, r * n_flush))
            times["full"].append(_sqlite_round(full, n_flush, full_n + r * n_flush))
            times["lazy"].append(_rvm_round(seg, n_no_flush, rvm.NO_FLUSH, r * n_no_flush))
            times["off"].append(_sqlite_round(off, n_no_flush, off_n + r * n_no_flush))
        stats = seg.statistics()
        seg.unmap()
    finally:
        full.close()
        off.close()
        with contextlib.suppress(pymach.MachError):
            rvm.rvm_shutdown(server)
        handle.result(30_000)
    tps = {k: (n_flush if k in ("flush", "full") else n_no_flush) / statistics.median(v)
           for k, v in times.items()}
    return {"rvm_flush_tps": tps["flush"], "sqlite_wal_full_tps": tps["full"],
            "rvm_no_flush_tps": tps["lazy"], "sqlite_wal_off_tps": tps["off"],
            "rvm_log_truncations": stats.truncations,
            "rvm_wal_forces": stats.wal_forces}


def run(mode: str = "embedded", rounds: int = 3, n_flush: int = 300,
        n_no_flush: int = 20_000, directory: str | None = None) -> dict[str, Any]:
    """Every figure with its baseline, ratios and targets (see module docstring)."""
    with tempfile.TemporaryDirectory(dir=directory) as d, _mach_thread(mode):
        r: dict[str, Any] = {"mode": mode, **_interleaved(d, n_flush, n_no_flush, rounds)}
    r["ratio_flush_vs_sqlite_full"] = round(r["rvm_flush_tps"] / r["sqlite_wal_full_tps"], 2)
    r["target_ratio_flush_vs_sqlite_full_at_least"] = 1.0
    r["ratio_no_flush_vs_sqlite_off"] = round(r["rvm_no_flush_tps"] / r["sqlite_wal_off_tps"],
                                              2)
    r["target_ratio_no_flush_vs_sqlite_off_at_least"] = 1.0
    for key in ("rvm_flush_tps", "sqlite_wal_full_tps", "rvm_no_flush_tps",
                "sqlite_wal_off_tps"):
        r[key] = round(r[key])
    if mode == "native":
        r["target_no_flush_tps_at_least"] = 20_000
    return r
