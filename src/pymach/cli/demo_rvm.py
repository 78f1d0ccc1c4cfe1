"""`pymach demo rvm`: recoverable virtual memory (paper 8.3) through a real crash.

A bank keeps eight accounts and a transfer counter in a recoverable segment served by
`pymach.apps.rvm`. A second Python process boots its own embedded kernel, maps the
segment and runs transfers: each is one RESTORE transaction over the counter and two
balances; every tenth ends with FLUSH (and is then reported durable), the others with
NO_FLUSH, and a transfer that would overdraw is aborted. After it has reported enough
durable transfers the demo kills that process with SIGKILL, wherever it is. Then it
starts a new manager on the same files, which recovers (applies the log, drops a torn
tail), and checks what a bank would: the money is all there (every transfer is whole
or absent), and no transfer reported durable is missing.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import pymach
from pymach.apps import rvm

ACCOUNTS = 8
OPENING = 1000  # each account's opening balance
SEGMENT = 4 * 4096
COUNTER = 0  # segment offset of the transfer counter (u64); balances follow
DURABLE_WANTED = 30  # FLUSH commits the application reports before the crash


def _balance_at(i: int) -> int:
    return 4096 + i * 1024  # one account per kilobyte: a transfer touches two pages


def _read_u64(seg: rvm.Segment, offset: int) -> int:
    value: int = struct.unpack("<q", seg.read(seg.address + offset, 8))[0]
    return value


def _write_u64(seg: rvm.Segment, offset: int, value: int) -> None:
    seg.write(seg.address + offset, struct.pack("<q", value))


def _transfer(seg: rvm.Segment, n: int, rng: random.Random) -> str:
    """Transfer n: move money between two accounts; 'flush', 'no_flush' or 'abort'."""
    a, b = rng.sample(range(ACCOUNTS), 2)
    amount = rng.randint(1, 400)
    t = seg.begin_transaction(rvm.RESTORE)
    for offset in (COUNTER, _balance_at(a), _balance_at(b)):
        t.set_range(seg.address + offset, 8)
    _write_u64(seg, COUNTER, n)
    _write_u64(seg, _balance_at(a), _read_u64(seg, _balance_at(a)) - amount)
    _write_u64(seg, _balance_at(b), _read_u64(seg, _balance_at(b)) + amount)
    if _read_u64(seg, _balance_at(a)) < 0:
        t.abort_transaction()  # overdrawn: undo it in memory
        return "abort"
    mode = rvm.FLUSH if n % 10 == 0 else rvm.NO_FLUSH
    t.end_transaction(mode)
    return mode


def _bank(root: str) -> None:
    """The application (run in its own process by the demo): transfers until killed,
    printing each transfer that a FLUSH commit made durable."""
    with pymach.boot():
        _, server = rvm.start_manager(os.path.join(root, "bank"), os.path.join(root, "bank.log"))
        seg = rvm.rvm_map(server, truncate_threshold=64 << 10)
        rng = random.Random(os.getpid())
        n = _read_u64(seg, COUNTER)
        while True:
            n += 1
            outcome = _transfer(seg, n, rng)
            if outcome == "abort":
                n -= 1  # the next transfer takes its number
            elif outcome == rvm.FLUSH:
                print(f"durable {n}", flush=True)


def _open_bank(root: str, say: Callable[[str], None]) -> None:
    _, server = rvm.start_manager(os.path.join(root, "bank"), os.path.join(root, "bank.log"),
                                  SEGMENT)
    with rvm.rvm_map(server) as seg, seg.begin_transaction() as t:  # ends with FLUSH
        for i in range(ACCOUNTS):
            t.set_range(seg.address + _balance_at(i), 8)
            _write_u64(seg, _balance_at(i), OPENING)
    rvm.rvm_shutdown(server)
    say(f"[bank]     opened {ACCOUNTS} accounts of {OPENING} in a recoverable segment "
        f"(a data file and a write-ahead log)")


def _crash(root: str, say: Callable[[str], None]) -> int:
    """Run the application in a process of its own and SIGKILL it; the last transfer it
    reported durable."""
    code = f"from pymach.cli.demo_rvm import _bank; _bank({root!r})"
    app = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    durable = 0
    assert app.stdout is not None
    for line in app.stdout:
        durable = int(line.split()[1])
        if durable >= DURABLE_WANTED * 10:
            break
    time.sleep(random.uniform(0.0, 0.01))  # it goes on with NO_FLUSH transfers
    app.send_signal(signal.SIGKILL)
    app.wait()
    say(f"[crash]    the bank's process ran transfers on its own kernel (every tenth "
        f"with FLUSH, the rest NO_FLUSH); killed with SIGKILL after it reported transfer "
        f"{durable} durable")
    return durable


def _recover(root: str, durable: int, say: Callable[[str], None]) -> bool:
    handle, server = rvm.start_manager(os.path.join(root, "bank"),
                                       os.path.join(root, "bank.log"))
    stats = rvm.rvm_statistics(server)
    say(f"[recovery] a new manager applied {stats.recovered_records} log records to the "
        f"data file ({stats.torn_records_dropped} torn records dropped) and began a new log")
    with rvm.rvm_map(server) as seg:
        counter = _read_u64(seg, COUNTER)
        balances = [_read_u64(seg, _balance_at(i)) for i in range(ACCOUNTS)]
    rvm.rvm_shutdown(server)
    handle.result(30_000)
    whole = sum(balances) == ACCOUNTS * OPENING
    kept = counter >= durable
    say(f"[check]    balances {balances}: total {sum(balances)} "
        f"({'every transfer whole or absent' if whole else 'MONEY LOST OR MADE'})")
    say(f"[check]    the segment holds transfers up to {counter}: "
        f"{'every durable one is there' if kept else 'A DURABLE TRANSFER IS MISSING'}, "
        f"and {counter - durable} NO_FLUSH transfers after it survived")
    return whole and kept


def run_rvm_demo(deterministic: bool = False, seed: int = 0, trace: bool = False,
                 out: Callable[[str], Any] = print) -> bool:
    """Run the narrated demo in a temporary directory; True if the checks hold. The
    crashing process runs freely (its kill lands wherever it lands); the demo's own
    kernel takes `deterministic`, `seed` and `trace`."""
    out("-- recoverable virtual memory (paper 8.3): a crash and a recovery --")
    with tempfile.TemporaryDirectory(prefix="pymach-rvm-") as root:
        with pymach.boot(deterministic=deterministic, seed=seed, trace=trace):
            _open_bank(root, out)
        durable = _crash(root, out)
        with pymach.boot(deterministic=deterministic, seed=seed, trace=trace) as kernel:
            ok = _recover(root, durable, out)
            if trace:
                out("\nkernel-manager messages of the recovery:\n" + "\n".join(
                    line for line in kernel.trace_log if "pager_" in line))
    return ok
