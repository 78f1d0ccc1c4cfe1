"""Pictures and progress (issue 13, item 19): `pymach bench --plot`, the trace timeline
(`pymach trace`, `pymach demo --plot`), `pymach top`, and the benchmarks' progress lines.

The commands run as a user runs them, in a subprocess; the pictures they write are
checked to be PNG files of a sensible size (the header's width and height), and the
data behind them is checked where it can be: the panels of real benchmark results, the
trace parsed from a real kernel's trace, and `top`'s view of a machd the tests start.
The drawing tests skip, with the reason, where matplotlib is not installed (it comes
with the `test` extra, so CI runs them).
"""

from __future__ import annotations

import ast
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import pymach as m
from nativeutil import uffd_or_skip
from pymach.cli import plot, progress, top, trace
from pymach.cli.trace import parse_trace, trace_lines

ROOT = Path(__file__).resolve().parents[1]
PYMACH = [sys.executable, "-m", "pymach.cli.main"]
PS = 4096

try:
    import matplotlib  # noqa: F401

    HAVE_MATPLOTLIB = True
except ImportError:
    HAVE_MATPLOTLIB = False
needs_matplotlib = pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib is not "
                                      "installed (pip install 'pymach[plot]')")


def run(*argv: str, stdin: str | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`pymach ARGV...` as a user runs it."""
    return subprocess.run([*PYMACH, *argv], input=stdin, capture_output=True, text=True,
                          timeout=120, env=env)


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG file, from its signature and IHDR chunk (AssertionError
    if it is not a PNG)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert data.endswith(b"IEND\xaeB`\x82"), f"{path} is cut short"
    return width, height


def sensible_png(path: Path, min_w: int = 500, min_h: int = 300) -> None:
    w, h = png_size(path)
    assert min_w <= w <= 4000 and min_h <= h <= 6000, (w, h)
    assert 10_000 < path.stat().st_size < 5_000_000, path.stat().st_size


# -- benchmarks --------------------------------------------------------------------------------

@needs_matplotlib
def test_bench_plot_writes_a_png_and_keeps_json_stdout_clean(tmp_path: Path) -> None:
    out = tmp_path / "ipc.png"
    r = run("bench", "ipc", "-n", "50", "--rounds", "1", "--json", "--progress",
            "--plot", str(out))
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)  # nothing but the JSON on stdout
    assert result["benchmark"] == "ipc"
    sensible_png(out)
    assert f"1 chart(s) written to {out}" in r.stderr
    stages = [line for line in r.stderr.splitlines() if line.startswith("pymach bench ipc [")]
    assert any("bench_msg_rpc: Median microseconds" in s for s in stages), r.stderr
    assert any("bench_socketpair" in s for s in stages) and stages[-1].endswith("] done")


def test_bench_shows_no_progress_into_a_pipe_unless_asked() -> None:
    r = run("bench", "ipc", "-n", "20", "--rounds", "1", "--json")
    assert r.returncode == 0, r.stderr
    assert "bench_msg_rpc" not in r.stderr and r.stderr == ""


def test_progress_wraps_the_stages_and_puts_them_back() -> None:
    from pymach.bench import ipc

    original = ipc.bench_thread_queue
    lines: list[str] = []

    class Sink:
        def write(self, text: str) -> None:
            lines.append(text)

        def flush(self) -> None:
            pass

        def isatty(self) -> bool:
            return False

    with progress.stages("t", True, Sink()):  # type: ignore[arg-type]
        assert ipc.bench_thread_queue is not original
        assert ipc.bench_thread_queue(10, 1) > 0
    assert ipc.bench_thread_queue is original
    assert any("bench_thread_queue: Median microseconds per round trip" in x for x in lines)
    assert not progress.wanted(False, Sink())  # type: ignore[arg-type]
    assert progress.wanted(True, Sink())  # type: ignore[arg-type]


def test_bench_plot_without_matplotlib_names_the_extra_before_running(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['matplotlib'] = None\n"  # import matplotlib fails
            "from pymach.cli.main import main; sys.exit(main(sys.argv[1:]))")
    out = tmp_path / "x.png"
    for argv in (["bench", "vm", "--plot", str(out)], ["trace", "--plot", str(out), "-"],
                 ["demo", "fs", "--plot", str(out)]):
        r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True,
                           text=True, timeout=60, input="")
        assert r.returncode == 2, (argv, r.stderr)
        assert "pip install 'pymach[plot]'" in r.stderr and "Traceback" not in r.stderr
        assert r.stdout == "" and not out.exists()  # nothing ran


@needs_matplotlib
def test_a_plot_into_a_missing_folder_is_refused_before_running(tmp_path: Path) -> None:
    out = tmp_path / "no-such-folder" / "x.png"
    for argv in (["bench", "vm", "--plot", str(out)], ["demo", "vm", "--plot", str(out)]):
        r = run(*argv)
        assert r.returncode == 2 and "no folder" in r.stderr, (argv, r.stderr)
        assert r.stdout == "" and "Traceback" not in r.stderr


def _literals() -> set[str]:
    """Every string constant in the benchmark modules' source (the result keys)."""
    found: set[str] = set()
    for path in (ROOT / "src" / "pymach" / "bench").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found.add(node.value)
    return found


def test_every_figure_a_panel_names_is_one_a_benchmark_writes() -> None:
    literals = _literals()
    for panel in plot.PANELS:
        keys = [b.key for b in panel.bars] + [b.per for b in panel.bars if b.per]
        keys += [k for t in panel.targets for k in (t.key, t.times, t.over) if k]
        for key in keys:
            root, *field = key.split(".")
            assert root in literals or root.startswith(("ool_", "mapped_pass",
                                                        "read_calls_pass")), key
            assert all(f in literals for f in field), key


def _panel_values(result: dict[str, Any]) -> list[tuple[str, list[float | None]]]:
    return [(p.title, [plot.bar_value(result, b) for b in p.bars])
            for p in plot.bench_panels(result)]


@pytest.mark.slow
def test_real_embedded_results_fill_their_panels() -> None:
    from pymach.bench import cache, ipc, unixio, vm

    results = [ipc.run(n=50, rounds=1), vm.run(pages=64, rounds=1, working_set=1 << 20),
               cache.run(files=2, file_size=8192),
               unixio.run(files=2, file_size=8192, passes=2, read_size=1 << 20,
                          chunks=(4096, 65536), rounds=1)]
    expected = {"ipc": 1, "vm": 4, "cache": 3, "unixio": 4}
    for r in results:
        panels = _panel_values(r)
        assert len(panels) == expected[r["benchmark"]], (r["benchmark"], panels)
        for title, values in panels:  # every bar of a drawn panel has its figure
            assert all(v is not None and v >= 0 for v in values), (title, values)


README_NATIVE = {  # run 2 of the README's native table, as `bench all --mode native` gives it
    "benchmark": "all", "mode": "native", "native_msg_rpc_us": 388, "socketpair_us": 62,
    "target_ratio_at_most": 1.5, "ool_first_send_ms": 9.7, "ool_repeat_send_ms": 7.0,
    "ool_deallocate_send_ms": 75, "receiver_vm_deallocate_ms": 1668, "pickle_pipe_ms": 5463,
    "target_speedup_at_least": 1000, "target_ms_at_most": 1.0, "mprotect_ms": 20,
    "target_ratio_ool_first_send_vs_mprotect_at_most": 1.2, "munmap_punch_ms": 150,
    "target_ratio_receiver_vm_deallocate_vs_munmap_punch_at_most": 2.0,
    "pager_fault_us": 613, "zero_fill_fault_us": 108, "anonymous_fault_us": 1.9,
    "target_pager_fault_us_at_most": 25, "naive_uffd_fault_us": 40,
    "memfd_first_touch_us": 2.5, "stream_gb_per_s": 0.125, "mmap_page_cache_gb_per_s": 16.9,
    "target_stream_gb_per_s_at_least": 2.0, "naive_uffd_stream_gb_per_s": 0.5,
    "numpy_fill_native_ms": 30, "numpy_fill_anon_ms": 12,
    "target_ratio_pager_fault_vs_naive_uffd_at_most": 1.0,
    "target_ratio_zero_fill_fault_vs_memfd_first_touch_at_most": 3.0,
    "target_ratio_stream_vs_naive_uffd_stream_at_least": 1.0,
    "target_ratio_numpy_fill_native_vs_anon_at_most": 3.0,
    "huge_pages_skipped": "needs 1536 free 2 MiB huge pages"}


def test_targets_sit_where_their_ratios_put_them() -> None:
    r = README_NATIVE
    lines = {p.title: [plot.target_value(r, t) for t in p.targets]
             for p in plot.bench_panels(r)}
    assert lines["null msg_rpc round trip (native)"] == [1.5 * 62]
    ool = lines["1 GiB out of line to another task"]
    assert ool == [1.0, pytest.approx(5463 / 1000), pytest.approx(1.2 * 20)]
    assert lines["one-page fault"] == [25, 40, 3 * 2.5]  # absolute; 1x naive; 3x memfd
    huge = {"huge_stream_gb_per_s": 1.1, "huge_stream_read_ahead_gb_per_s": 1.6,
            "huge_ratio_stream_vs_naive_uffd_stream": 2.2}
    (panel,) = plot.bench_panels(huge)
    assert [plot.bar_value(huge, b) for b in panel.bars] == [1.1, 1.6, pytest.approx(0.5)]


@needs_matplotlib
def test_bench_plots_native_unknown_and_skipped_results(tmp_path: Path) -> None:
    assert plot.plot_bench(README_NATIVE, str(tmp_path / "n.png"), "all", "native") == 6
    sensible_png(tmp_path / "n.png", 1200, 800)
    odd = {"benchmark": "new", "ratio_a_vs_b": 2.5, "figure": 3}
    assert plot.plot_bench(odd, str(tmp_path / "o.png")) == 1  # its ratios, against 1
    sensible_png(tmp_path / "o.png")
    skipped = {"benchmark": "huge", "huge_pages_skipped": "needs huge pages"}
    assert plot.plot_bench(skipped, str(tmp_path / "s.png")) == 0  # says so, still a PNG
    png_size(tmp_path / "s.png")
    with pytest.raises(OSError):
        plot.plot_bench(odd, str(tmp_path / "no" / "such" / "dir.png"))


@needs_matplotlib
def test_native_bench_plot(tmp_path: Path) -> None:
    uffd_or_skip()
    pytest.importorskip("numpy")
    out = tmp_path / "native.png"
    r = run("bench", "ipc", "--mode", "native", "-n", "50", "--rounds", "1", "--plot",
            str(out))
    assert r.returncode == 0, r.stderr
    assert "native_msg_rpc_us" in r.stdout
    sensible_png(out)


# -- the trace timeline --------------------------------------------------------------------------

def _touch(a: int, pages: int, value: int) -> None:
    """Write `value` into the first byte of each of `pages` pages from `a`."""
    mem = m.memory()
    for i in range(pages):
        mem[a + i * PS] = value


def _child() -> int:
    return 1


def test_a_real_trace_parses_into_faults_by_task() -> None:
    with m.boot(trace=True) as k:
        me = m.task_self()
        a = m.vm_allocate(me, 0, 4 * PS, True)
        _touch(a, 4, 1)  # zero-fill faults
        child = m.task_create(me, True)  # our pages become copy-on-write
        _touch(a, 2, 2)  # copy-on-write faults
        m.task_terminate(child)
        k.run(_child, name="kid")
        log = list(k.trace_log)
    tl = parse_trace(log)
    assert tl.events == len(log) and not tl.virtual_time
    mine = [f for f in tl.faults if f.task == "bootstrap"]
    kinds = [f.kind for f in mine]
    assert kinds.count("zero-fill") == 4 and kinds.count("copy-on-write") == 2, kinds
    assert {f.address for f in mine} == {a + i * PS for i in range(4)}
    assert all(f.access == "write" and f.ms >= 0 for f in mine)
    assert "kid" in tl.tasks and tl.lifetimes["kid"][0] <= tl.lifetimes["kid"][1]
    row = {r["task"]: r for r in tl.summary()}["bootstrap"]
    assert row["faults"] == 6 and row["zero_fill"] == 4 and row["copy_on_write"] == 2
    assert row["fault_ms"] == pytest.approx(sum(f.ms for f in mine), abs=1e-3)


def test_trace_lines_join_boots_and_number_virtual_time() -> None:
    text = ["narration is skipped", "     1.000 task created a parent=-",
            "     5.000 fault a 0x1000 read zero-fill 0.500ms",
            "     2.000 task created b parent=-"]  # a second boot: times go on from 5
    assert trace_lines(text) == [(1.0, "task created a parent=-"),
                                 (5.0, "fault a 0x1000 read zero-fill 0.500ms"),
                                 (7.0, "task created b parent=-")]
    still = ["     0.000 task created a parent=-", "     0.000 thread created a.1"]
    tl = parse_trace(still)
    assert tl.virtual_time and trace_lines(still)[1][0] == 1.0


def test_pager_requests_pair_with_their_answers() -> None:
    tl = parse_trace(["  10.000 kernel -> fs: pager_data_request obj3 0x2000 0x1000 0x1",
                      "  10.400 fs -> kernel: pager_data_provided obj3 0x2000 0x1000 0x0",
                      "  10.500 fault client 0x12000 read pager 0.600ms",
                      "  11.000 send client.1 id=7 -> fs-port",
                      "  11.000 recv fs.1 id=7 <- fs-port"])
    (span,) = tl.spans
    assert (span.manager, span.start, span.end) == ("fs", 10.0, 10.4)
    assert span.routine == "pager_data_provided"
    (fault,) = tl.faults
    assert fault.start == pytest.approx(9.9) and fault.kind == "pager"
    rows = {r["task"]: r for r in tl.summary()}
    assert rows["fs"]["manager_messages"] == 2 and rows["fs"]["serving_ms"] == 0.4
    assert rows["client"]["sends"] == 1 and rows["fs"]["receives"] == 1


@needs_matplotlib
def test_demo_plot_draws_the_demos_trace_and_prints_it_only_with_trace(tmp_path: Path) -> None:
    out = tmp_path / "fs.png"
    r = run("demo", "fs", "--plot", str(out))
    assert r.returncode == 0, r.stderr
    assert "[reader3]" in r.stdout and "kernel-manager messages:" not in r.stdout
    assert "trace events written to" in r.stderr
    sensible_png(out, 800, 400)
    r2 = run("demo", "fs", "--plot", str(out), "--trace")
    assert "kernel-manager messages:" in r2.stdout and "pager_data_request" in r2.stdout


@needs_matplotlib
def test_trace_command_reads_a_demos_trace(tmp_path: Path) -> None:
    demo = run("demo", "fs", "--trace")
    assert demo.returncode == 0, demo.stderr
    r = run("trace", "--json", stdin=demo.stdout)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    fs = {row["task"]: row for row in data["tasks"]}["fs"]
    assert fs["manager_messages"] > 0 and data["spans"]
    log = tmp_path / "fs.log"
    log.write_text(demo.stdout)
    out = tmp_path / "t.png"
    text = run("trace", str(log), "--plot", str(out))
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines()[1].split()[:3] == ["TASK", "FAULTS", "PAGER"]
    sensible_png(out, 800, 300)
    empty = run("trace", "-", stdin="no trace here\n")
    assert empty.returncode == 1 and "no kernel trace lines" in empty.stderr
    missing = run("trace", str(tmp_path / "missing.log"))
    assert missing.returncode == 2 and "No such file" in missing.stderr


@needs_matplotlib
def test_trace_plot_of_virtual_time(tmp_path: Path) -> None:
    opts: dict[str, Any] = {}
    assert trace.demo_plot_start(None, False, opts) is None and opts == {}  # no --plot
    lines = trace.demo_plot_start(str(tmp_path / "v.png"), False, opts)
    assert lines is not None and set(opts) == {"trace", "out"}
    with m.boot(deterministic=True, seed=2, trace=opts["trace"]):
        me = m.task_self()
        _touch(m.vm_allocate(me, 0, 3 * PS, True), 3, 1)
    tl = parse_trace(lines)
    assert tl.virtual_time and len(tl.faults) == 3
    plot.plot_trace(tl, str(tmp_path / "v.png"))
    sensible_png(tmp_path / "v.png")


# -- pymach top ----------------------------------------------------------------------------------

def _sample(at: float, faults: int, resident: int) -> top.Sample:
    row = {"id": 5, "name": "t", "parent": "-", "suspend_count": 0, "port_names": 3,
           "resident_pages": resident,
           "threads": [{"name": "t.1", "state": "running", "suspend_count": 0}]}
    vm = {"page_size": PS, "pages_free": 10, "pages_active": resident, "pages_inactive": 0,
          "pages_wired": 0, "faults": faults, "zero_fill_count": faults, "cow_faults": 0,
          "pageins": 0, "pageouts": 0, "reactivations": 0, "pager_messages": 0}
    return top.Sample(at, 1.7e9 + at, [row], vm)


def test_top_rates_come_from_successive_vm_stat_samples() -> None:
    v = top.view(_sample(10.0, 100, 4), _sample(12.0, 700, 10))
    assert v["rates"]["faults_per_s"] == 300.0 and v["rates"]["zero_fill_per_s"] == 300.0
    assert v["rates"]["pageouts_per_s"] == 0.0 and v["interval_s"] == 2.0
    (t,) = v["tasks"]
    assert t["resident_pages"] == 10 and t["resident_change"] == 6
    assert v["totals"] == {"tasks": 1, "threads": 1, "thread_states": {"running": 1},
                           "resident_pages": 10}
    screen = top.render(v, "/s", 2.0)
    assert "300.0 faults" in screen and screen.splitlines()[-1].split()[:2] == ["5", "t"]


def test_top_once_json_shows_this_task(native: str) -> None:
    me = m.task_self()
    a = m.vm_allocate(me, 0, 8 * PS, True)
    m.memory()[a:a + 5 * PS] = b"y" * (5 * PS)  # five pages resident
    name = m.task_info(me)[0]
    t0 = time.monotonic()
    r = run("top", "--once", "--json", "-s", "0.2", "--socket", native)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 >= 0.2  # the view covers one interval
    (line,) = r.stdout.splitlines()  # --once: one view, one line
    v = json.loads(line)
    rows = {t["name"]: t for t in v["tasks"]}
    assert top.NAME not in rows and "default_pager" in rows
    mine = rows[name]
    assert mine["threads"] >= 1 and mine["resident_pages"] >= 5
    assert set(v["rates"]) >= {"faults_per_s", "zero_fill_per_s", "pageins_per_s"}
    assert all(rate >= 0 for rate in v["rates"].values())
    assert v["memory"]["page_size"] == PS and v["totals"]["tasks"] == len(v["tasks"])


def test_top_text_views_follow_each_other_into_a_pipe(native: str) -> None:
    r = run("top", "-n", "2", "-s", "0.1", "--socket", native)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("pymach top: machd at") == 2 and "\x1b[" not in r.stdout
    assert r.stdout.count("\n\npymach top:") == 1
    bad = run("top", "--once", "--socket", os.path.join(native + ".none"))
    assert bad.returncode == 1 and "no machd at" in bad.stderr and "Traceback" not in bad.stderr
