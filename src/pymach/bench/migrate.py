"""`pymach bench migrate`: copy-on-reference task migration, flat in the task's size.

A migratable native task with 1 MiB and with 1 GiB resident (every page written) is
moved with `task_migrate` on one host. Figures, each the median of the rounds:
- freeze-to-resume: from the call (task_suspend is its first step) until the new
  task's first thread has started its function again and told us (a message); this
  includes starting the new task's process, the same for both sizes;
- the call itself: capture (a copy-on-write copy of each region, the rights), the one
  state message, and the build (regions mapped at their addresses, rights inserted);
- reading one byte of every page, in the task before the move (resident) and in the
  new task after it (each page comes on that first reference): where the cost went;
- the baseline: copying the GiB (a NumPy copy of a resident 1 GiB array in this
  process), which a migration that moved the bytes would at least pay.
The same figures with the task moved to another host (`..._other_host`): two machd hosts
of a temporary cluster on loopback addresses (TLS), the task moving from A to B; there
each page comes from A over the network on first reference, so after the move the task
reads every page at 1 MiB and one page in a hundred at 1 GiB (`read_..._1GiB` is then
per 1%). And the 1 MiB move once more with pre-paging (`..._prepaged`: the pages resident
in the task cross before it starts again, so its reads after the move are local).
The target: freeze-to-resume at 1 GiB within 2x of that at 1 MiB (only the map and the
rights move; pages follow on reference: Zayas 1987). The benchmark starts its own
machd hosts (temporary sockets) and makes this process a task of each in turn.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np

import pymach
from pymach import Int, Message, Port
from pymach.bench.native import native_task
from pymach.bench.net_shm import machd_cluster
from pymach.libmach.task import attach, detach
from pymach.net.migration import host_is_local
from pymach.pmap.native_map import WINDOW_BASE

PAGE = 4096
MIB = 1 << 20
GIB = 1 << 30
SIZES = {"1MiB": MIB, "1GiB": GIB}
BENCH_ADDRESS = WINDOW_BASE + (1 << 37)  # where the moved task keeps its memory


def resident_task(size: int, report: int, cmd: int) -> None:
    """A migratable task: first run, `size` bytes of its own memory written (all
    resident); on each start it tells `report`, then serves `cmd`: each request [Int
    stride] is answered once it has read one byte of every stride-th page."""
    me = pymach.task_self()
    if not pymach.vm_regions(me, BENCH_ADDRESS, PAGE):
        pymach.vm_allocate(me, BENCH_ADDRESS, size, False)
        np.frombuffer(pymach.memory().buffer(BENCH_ADDRESS, size), dtype=np.uint8)[::PAGE] = 1
    pymach.msg_send(Message(remote_port=report, items=[Int(int(pymach.migrated()))]))
    pages = np.frombuffer(pymach.memory().buffer(BENCH_ADDRESS, size), dtype=np.uint8)[::PAGE]
    while True:
        req = pymach.msg_receive(cmd)
        stride = req.items[0].value
        pymach.msg_send(Message(remote_port=req.remote_port,
                                items=[Int(int(pages[::stride].sum()))]))


def _touch_all(cmd: int, stride: int = 1) -> float:
    """Seconds for the task to read every stride-th page of its memory (one request)."""
    t0 = time.perf_counter()
    pymach.msg_rpc(Message(remote_port=cmd, local_port=pymach.thread_reply(),
                           items=[Int(stride)]))
    return time.perf_counter() - t0


def migrate_once(size: int, host: str | None = None, stride: int = 1,
                 prepage: bool = False) -> tuple[float, float, float, float]:
    """Seconds (freeze-to-resume, the task_migrate call, reading every stride-th page
    before the move, the same after it: the pages come then) for one move of a task
    with `size` bytes resident to `host` (None: this host)."""
    me = pymach.task_self()
    report, cmd = pymach.port_allocate(me), pymach.port_allocate(me)
    h = pymach.spawn(resident_task, size, Port(report, pymach.MAKE_SEND),
                     Port(cmd, pymach.MOVE_ALL), name="bench-move", migratable=True)
    pymach.msg_receive(report)  # resident and serving
    before = _touch_all(cmd, stride)
    t0 = time.perf_counter()
    new = pymach.task_migrate(h.port, host, prepage)
    t1 = time.perf_counter()
    arrived = pymach.msg_receive(report)
    t2 = time.perf_counter()
    assert arrived.items[0].value == 1
    after = _touch_all(cmd, stride)
    pymach.task_terminate(new)  # (cmd dies with it)
    pymach.port_deallocate(me, report)
    return t2 - t0, t1 - t0, before, after


def bench_copy_gib() -> float:
    """Seconds to copy a resident GiB (NumPy, this process): the baseline."""
    src = np.ones(GIB, dtype=np.uint8)
    dst = np.empty_like(src)
    t0 = time.perf_counter()
    np.copyto(dst, src)
    return time.perf_counter() - t0


def _figures(rounds: int, host: str | None, suffix: str) -> dict[str, Any]:
    """Each size's medians (ms) for moves to `host`, named with `suffix`."""
    out: dict[str, Any] = {}
    for label, size in SIZES.items():
        stride = 100 if host and size > MIB else 1  # across hosts: 1% of the GiB
        runs = [migrate_once(size, host, stride) for _ in range(rounds)]
        read = "read_every_page" if stride == 1 else "read_1pct_of_pages"
        out[f"freeze_to_resume_{label}{suffix}_ms"] = statistics.median(
            r[0] for r in runs) * 1e3
        out[f"migrate_call_{label}{suffix}_ms"] = statistics.median(r[1] for r in runs) * 1e3
        out[f"{read}_before_move_{label}{suffix}_ms"] = statistics.median(
            r[2] for r in runs) * 1e3
        out[f"{read}_after_move_{label}{suffix}_ms"] = statistics.median(
            r[3] for r in runs) * 1e3
    out[f"ratio_freeze_to_resume_1GiB_vs_1MiB{suffix}"] = (
        out[f"freeze_to_resume_1GiB{suffix}_ms"] / out[f"freeze_to_resume_1MiB{suffix}_ms"])
    return out


def _other_host(rounds: int) -> dict[str, Any]:
    """The figures for moves from host A to host B of a two-host loopback cluster."""
    if shutil.which("openssl") is None:
        return {"other_host": "skipped: making cluster certificates needs openssl"}
    with tempfile.TemporaryDirectory() as tmp, machd_cluster(
            tmp, ["A", "B"], options=[("--memory", "3G")] * 2) as cluster:
        attach(cluster.socks[0], name="bench")
        try:
            _wait_up("B")
            out = {"other_host_link": "loopback TCP with TLS",
                   **_figures(rounds, "B", "_other_host")}
            runs = [migrate_once(MIB, "B", 1, prepage=True) for _ in range(rounds)]
            out["freeze_to_resume_1MiB_other_host_prepaged_ms"] = statistics.median(
                r[0] for r in runs) * 1e3
            out["read_every_page_after_move_1MiB_other_host_prepaged_ms"] = statistics.median(
                r[3] for r in runs) * 1e3
            return out
        finally:
            detach()


def _wait_up(host: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if not host_is_local(host):
                return
        except pymach.MachError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def run(rounds: int = 3) -> dict[str, Any]:
    """The figures (ms) and the ratio of 1 GiB to 1 MiB freeze-to-resume, on one host
    and to another host."""
    out: dict[str, Any] = {}
    with native_task("--memory", "3G"):
        out.update(_figures(rounds, None, ""))
    out.update(_other_host(rounds))
    out["baseline_copy_1GiB_ms"] = statistics.median(bench_copy_gib()
                                                     for _ in range(rounds)) * 1e3
    out["target_ratio_freeze_to_resume_1GiB_vs_1MiB_at_most"] = 2.0
    return out


def main(argv: list[str]) -> int:
    """`python -m pymach.bench.migrate [ROUNDS]`: print the figures as JSON."""
    print(json.dumps(run(int(argv[0]) if argv else 3), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
