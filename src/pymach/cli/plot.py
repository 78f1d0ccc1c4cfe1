"""Pictures of pymach at work: `pymach bench ... --plot FILE.png` and the trace timeline
(`pymach trace --plot`, `pymach demo --plot`).

matplotlib is an optional extra (`pip install 'pymach[plot]'`); `check_output` says
so with `PlotUnavailable` (an ImportError), and checks the picture's folder exists,
before anything long runs. Drawing
uses matplotlib's object API with the Agg canvas only (no pyplot, no display, no
global state), so it works on a machine without a screen and in threads.

Benchmarks. A result is a flat (or nested) dictionary of figures (bench/). `PANELS`
says which of its figures are pymach's and which are the baselines measured beside them
in the same run, in which unit, and which targets apply; a panel is drawn when the
result holds its first figure, and shows only what the result holds (a bar derived from
a figure and a ratio says so in its label). Bars are horizontal, pymach's in colour and
the baselines in grey, each labelled with its value; the value axis is logarithmic
where the bars span more than `LOG_SPAN`. A target is a dashed line: an absolute one at
its value, a ratio target at the ratio times (or, for a speed-up, over) its baseline. A
result none of whose figures `PANELS` knows is drawn as its `ratio_*` figures against
1. The title names the benchmark, its mode and this machine.

Trace. `plot_trace` draws a `Timeline` (cli/trace.py): one row per task, its lifetime as
a grey band, each fault as a bar of its duration coloured by what resolved it, each
kernel-manager message as a marker (down: to the manager, up: its answer), the time a
manager took to answer a `pager_data_request` as a purple bar, and IPC as small ticks;
below, per task, the milliseconds spent in faults (by kind) and serving requests.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from pymach.cli.trace import Timeline

EXTRA = "pip install 'pymach[plot]'"
LOG_SPAN = 30.0  # bars whose largest / smallest value exceeds this get a log axis
PYMACH_COLOUR, BASELINE_COLOUR, TARGET_COLOUR = "tab:blue", "tab:gray", "tab:red"
KIND_COLOURS = {"pager": "tab:orange", "copy-on-write": "tab:green",
                "zero-fill": "tab:blue", "resident": "tab:cyan", "failed": "tab:red"}


class PlotUnavailable(ImportError):
    """matplotlib is not installed: the message names the extra that brings it."""


def require_matplotlib() -> None:
    """Raise PlotUnavailable (naming `pymach[plot]`) unless matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401  (optional: the `plot` extra)
    except ImportError as e:
        raise PlotUnavailable(f"--plot needs matplotlib, which is not installed ({e}): "
                              f"{EXTRA}") from None


def check_output(path: str) -> None:
    """Before a long run: PlotUnavailable without matplotlib, FileNotFoundError if the
    folder `path` is to go in does not exist."""
    require_matplotlib()
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {path}: no folder {folder}")


def _figure(width: float, height: float) -> Figure:
    """A new matplotlib Figure on an Agg canvas (PlotUnavailable without matplotlib)."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def machine() -> str:
    """This machine in a few words: host, processors, system, Python."""
    return (f"{platform.node() or 'this machine'}: {os.cpu_count()} CPUs, "
            f"{platform.machine()}, {platform.system()} {platform.release().split('-')[0]}, "
            f"Python {platform.python_version()}")


# -- benchmarks ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Bar:
    """One bar: the figure at `key` (a dotted path into the result), or that figure
    divided by the ratio at `per` (a baseline the result holds only as a ratio)."""

    label: str
    key: str
    baseline: bool = False
    per: str = ""


@dataclass(frozen=True)
class Target:
    """A target line: the value at `key`, times the figure at `times` (a ratio target),
    or the figure at `over` divided by it (a speed-up target). `label` may hold {t}."""

    label: str
    key: str
    times: str = ""
    over: str = ""


@dataclass(frozen=True)
class Panel:
    """One chart: pymach's figures beside their baselines, in one unit."""

    title: str
    unit: str
    better: str  # "lower" or "higher"
    bars: tuple[Bar, ...]
    targets: tuple[Target, ...] = ()


def _p(title: str, unit: str, better: str, bars: Sequence[tuple[Any, ...]],
       targets: Sequence[tuple[str, ...]] = ()) -> Panel:
    return Panel(title, unit, better, tuple(Bar(*b) for b in bars),
                 tuple(Target(*t) for t in targets))


B = True  # a baseline bar
PANELS: tuple[Panel, ...] = (
    # bench/ipc.py (embedded)
    _p("null msg_rpc round trip (embedded)", "us", "lower",
       [("msg_rpc between two embedded tasks", "msg_rpc_us"),
        ("thread handoff through SimpleQueues", "thread_queue_us", B),
        ("1-byte socketpair round trip", "socketpair_us", B),
        ("the kernel's wake-up alone (condition variables)", "condition_handoff_us", B)],
       [("target: <= {t}x the thread handoff", "target_ratio_at_most", "thread_queue_us")]),
    # bench/vm.py (embedded)
    _p("zero-fill faults", "pages/s", "higher",
       [("zero-fill faults", "zero_fill_faults_per_s"),
        ("a new bytearray page", "baseline_bytearray_pages_per_s", B)]),
    _p("copy-on-write faults", "pages/s", "higher",
       [("copy-on-write faults", "cow_faults_per_s"),
        ("copying a page in Python", "baseline_page_copies_per_s", B)]),
    _p("send + receive", "ms", "lower",
       [("64 MiB out of line", "ool_64MiB_ms"), ("16 MiB out of line", "ool_16MiB_ms"),
        ("1 MiB out of line", "ool_1MiB_ms"), ("64 MiB inline", "inline_ms", B)]),
    _p("paging, memory a quarter of the working set", "MB/s", "higher",
       [("written and read back through pageout", "pageout_MB_per_s"),
        ("file pwrite/pread", "baseline_file_MB_per_s", B)]),
    # bench/cache.py (section 9)
    _p("I/O operations per pass (section 9)", "operations", "lower",
       [("mapped, pass 1", "mapped_pass1.io_operations"),
        ("mapped, pass 2", "mapped_pass2.io_operations"),
        ("read calls, pass 1", "read_calls_pass1.io_operations", B),
        ("read calls, pass 2", "read_calls_pass2.io_operations", B)]),
    _p("time per pass (section 9)", "ms", "lower",
       [("mapped, pass 1", "mapped_pass1.ms"), ("mapped, pass 2", "mapped_pass2.ms"),
        ("read calls, pass 1", "read_calls_pass1.ms", B),
        ("read calls, pass 2", "read_calls_pass2.ms", B)]),
    # bench/unixio.py (8.1); its read-size panels are made from the result (_unixio_reads)
    _p("I/O operations, all passes", "operations", "lower",
       [("mapped files", "io_operations_mapped_total"),
        ("read calls", "io_operations_read_calls_total", B)],
       [("target: >= {t}x fewer than read calls",
         "target_ratio_io_read_calls_vs_mapped_at_least", "", "io_operations_read_calls_total")]),
    _p("messages, all passes", "messages", "lower",
       [("mapped files: server + pager", "messages_mapped_total"),
        ("read calls", "messages_read_calls_total", B)]),
    # bench/rvm.py (8.3)
    _p("transactions, synced at commit", "transactions/s", "higher",
       [("RVM end_transaction(FLUSH)", "rvm_flush_tps"),
        ("sqlite3 WAL, synchronous=FULL", "sqlite_wal_full_tps", B)],
       [("target: >= {t}x sqlite3", "target_ratio_flush_vs_sqlite_full_at_least",
         "sqlite_wal_full_tps")]),
    _p("transactions, not synced at commit", "transactions/s", "higher",
       [("RVM end_transaction(NO_FLUSH)", "rvm_no_flush_tps"),
        ("sqlite3 WAL, synchronous=OFF", "sqlite_wal_off_tps", B)],
       [("target: >= {t}x sqlite3", "target_ratio_no_flush_vs_sqlite_off_at_least",
         "sqlite_wal_off_tps"), ("target: >= {t} per second", "target_no_flush_tps_at_least")]),
    # bench/native.py: ipc, vm, pager, huge
    _p("null msg_rpc round trip (native)", "us", "lower",
       [("msg_rpc between two native tasks", "native_msg_rpc_us"),
        ("1-byte socketpair round trip", "socketpair_us", B),
        ("the channels' system calls and codec alone", "channel_floor_us", B)],
       [("target: <= {t}x socketpair", "target_ratio_at_most", "socketpair_us")]),
    _p("1 GiB out of line to another task", "ms", "lower",
       [("first send", "ool_first_send_ms"), ("the same region again", "ool_repeat_send_ms"),
        ("send with deallocate", "ool_deallocate_send_ms"),
        ("pickle over a multiprocessing Pipe", "pickle_pipe_ms", B),
        ("mprotect of a resident GiB", "mprotect_ms", B)],
       [("target: <= {t} ms", "target_ms_at_most"),
        ("target: >= {t}x faster than pickle", "target_speedup_at_least", "", "pickle_pipe_ms"),
        ("target: first send <= {t}x mprotect",
         "target_ratio_ool_first_send_vs_mprotect_at_most", "mprotect_ms")]),
    _p("freeing 1 GiB", "ms", "lower",
       [("the receiver's vm_deallocate", "receiver_vm_deallocate_ms"),
        ("munmap + PUNCH_HOLE of a memfd", "munmap_punch_ms", B)],
       [("target: <= {t}x munmap + punch",
         "target_ratio_receiver_vm_deallocate_vs_munmap_punch_at_most", "munmap_punch_ms")]),
    _p("one-page fault", "us", "lower",
       [("served by a trivial Python pager", "pager_fault_us"),
        ("zero-fill fault in machd", "zero_fill_fault_us"),
        ("naive Python userfaultfd handler", "naive_uffd_fault_us", B),
        ("C, pymach's three processes", "c_three_fault_us", B),
        ("memfd first touch (Linux)", "memfd_first_touch_us", B),
        ("anonymous first touch (Linux)", "anonymous_fault_us", B)],
       [("target: pager fault <= {t} us", "target_pager_fault_us_at_most"),
        ("target: pager fault <= {t}x the naive handler",
         "target_ratio_pager_fault_vs_naive_uffd_at_most", "naive_uffd_fault_us"),
        ("target: zero-fill <= {t}x memfd first touch",
         "target_ratio_zero_fill_fault_vs_memfd_first_touch_at_most", "memfd_first_touch_us")]),
    _p("streaming read of a pager-backed region", "GB/s", "higher",
       [("from a trivial Python pager", "stream_gb_per_s"),
        ("the same without read-ahead", "stream_no_read_ahead_gb_per_s"),
        ("naive userfaultfd handler", "naive_uffd_stream_gb_per_s", B),
        ("naive handler, 1024-page clusters", "naive_uffd_stream_1024_gb_per_s", B),
        ("C, pymach's three processes", "c_three_stream_gb_per_s", B),
        ("mmap of a page-cached file", "mmap_page_cache_gb_per_s", B)],
       [("target: >= {t} GB/s", "target_stream_gb_per_s_at_least"),
        ("target: >= {t}x the naive handler",
         "target_ratio_stream_vs_naive_uffd_stream_at_least", "naive_uffd_stream_gb_per_s")]),
    _p("NumPy fill of fresh memory", "ms", "lower",
       [("task memory", "numpy_fill_native_ms"), ("anonymous memory", "numpy_fill_anon_ms", B)],
       [("target: <= {t}x anonymous memory", "target_ratio_numpy_fill_native_vs_anon_at_most",
         "numpy_fill_anon_ms")]),
    _p("1 GiB out of line, 2 MiB pages", "ms", "lower",
       [("first send", "huge_ool_first_send_ms"),
        ("send with deallocate", "huge_ool_deallocate_send_ms"),
        ("the receiver's vm_deallocate", "huge_receiver_vm_deallocate_ms"),
        ("munmap + punch, 4 KiB pages (scale only)", "munmap_punch_4k_ms", B)],
       [("target: first send <= {t} ms", "huge_target_ool_first_send_ms_at_most")]),
    _p("streaming read, 2 MiB pages", "GB/s", "higher",
       [("from a trivial Python pager", "huge_stream_gb_per_s"),
        ("the same, machd --read-ahead 64", "huge_stream_read_ahead_gb_per_s"),
        ("naive userfaultfd handler, 4 KiB (from the ratio)", "huge_stream_gb_per_s", B,
         "huge_ratio_stream_vs_naive_uffd_stream")],
       [("target: >= {t} GB/s", "huge_target_stream_gb_per_s_at_least")]),
    _p("NumPy fill, 2 MiB pages", "ms", "lower",
       [("task memory", "huge_numpy_fill_native_ms"),
        ("anonymous memory, 4 KiB (from the ratio)", "huge_numpy_fill_native_ms", B,
         "huge_ratio_numpy_fill_native_vs_anon")]),
    # bench/net.py (two machd hosts over TCP)
    _p("null msg_rpc to a port on another host", "us", "lower",
       [("native task to native task", "null_msg_rpc_other_host_us"),
        ("embedded kernels over the same transport", "embedded_msg_rpc_other_host_us", B),
        ("Python TCP round trip", "tcp_round_trip_us", B),
        ("Python TLS round trip", "tls_round_trip_us", B)],
       [("target: <= {t}x the TCP round trip", "target_ratio_msg_rpc_vs_tcp_at_most",
         "tcp_round_trip_us")]),
)


def lookup(result: dict[str, Any], key: str) -> float | None:
    """The number at a dotted path of `result`, or None if it holds none there."""
    value: Any = result
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _unixio_reads(result: dict[str, Any]) -> list[Panel]:
    """bench/unixio.py's `read_resident` figures: a panel per read size."""
    reads = result.get("read_resident")
    if not isinstance(reads, dict):
        return []
    where = " (native mode)" if result.get("target_mode") == "native" else ""
    panels = []
    for chunk in sorted((k for k in reads if re.fullmatch(r"chunk_\d+", k)),
                        key=lambda k: int(k[6:])):
        p = f"read_resident.{chunk}."
        panels.append(_p(f"read of resident pages, {_bytes(int(chunk[6:]))} a call",
                         "MB/s", "higher",
                         [("unixio.read", p + "unixio_read"), ("os.read", p + "os_read", B),
                          ("unixio.readinto", p + "unixio_readinto"),
                          ("os.readv into a buffer", p + "os_readv", B)],
                         [(f"target{where}: read >= {{t}}x os.read",
                           "target_ratio_read_vs_os_read_at_least", p + "os_read")]))
    return panels


def _bytes(n: int) -> str:
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} bytes"


def _ratio_panel(result: dict[str, Any]) -> list[Panel]:
    """For a result PANELS does not know: its `ratio_*` figures, against 1."""
    bars = [(k.removeprefix("ratio_").replace("_", " "), k) for k in result
            if k.startswith("ratio_") and lookup(result, k) is not None]
    if not bars:
        return []
    return [_p("ratios of pymach's figures to their baselines (1: alike)", "ratio", "",
               [*bars, ("alike", "_one", B)])]


def bench_panels(result: dict[str, Any]) -> list[Panel]:
    """The panels `result` has figures for (see module docstring)."""
    panels = [p for p in (*PANELS, *_unixio_reads(result))
              if lookup(result, p.bars[0].key) is not None]
    return panels or _ratio_panel(result)


def bar_value(result: dict[str, Any], bar: Bar) -> float | None:
    """A bar's value: its figure, or the figure over the ratio at `per`."""
    if bar.key == "_one":
        return 1.0
    value = lookup(result, bar.key)
    if value is None or not bar.per:
        return value
    ratio = lookup(result, bar.per)
    return value / ratio if ratio else None


def target_value(result: dict[str, Any], t: Target) -> float | None:
    """Where a target's line goes, or None if the result lacks what it needs."""
    value = lookup(result, t.key)
    base = lookup(result, t.times or t.over) if (t.times or t.over) else 1.0
    if value is None or base is None or (t.over and not value):
        return None
    return base / value if t.over else base * value


def plot_bench(result: dict[str, Any], path: str, what: str = "", mode: str = "") -> int:
    """Draw `result` (see module docstring) into the PNG `path`; returns the number of
    panels drawn (0: the result holds no figures, and the picture says why). What the
    result says it skipped (`*_skipped`) is named under the title.
    PlotUnavailable without matplotlib; OSError if `path` cannot be written."""
    panels = bench_panels(result)
    cols = 2 if len(panels) > 1 else 1
    rows = max(1, math.ceil(len(panels) / cols))
    fig = _figure(8.0 * cols, 1.5 + 2.9 * rows)
    name = what or str(result.get("benchmark", "benchmark"))
    skipped = "; ".join(str(v) for k, v in result.items() if k.endswith("skipped"))
    fig.suptitle(f"pymach bench {name} ({mode or result.get('mode', 'embedded')})\n"
                 f"{machine()}, {datetime.date.today().isoformat()}\n"
                 f"blue: pymach; grey: its baselines, measured in the same run; red lines: "
                 f"targets" + (f"\nnot measured: {skipped}" if skipped else ""), fontsize=10)
    if not panels:
        fig.text(0.5, 0.4, "nothing measured", ha="center", va="center")
    for i, panel in enumerate(panels):
        _draw_panel(fig.add_subplot(rows, cols, i + 1), panel, result)
    fig.savefig(path, format="png")
    return len(panels)


def _draw_panel(ax: Axes, panel: Panel, result: dict[str, Any]) -> None:
    bars = [(b, v) for b in panel.bars if (v := bar_value(result, b)) is not None]
    labels = [b.label for b, _ in bars]
    values = [v for _, v in bars]
    colours = [BASELINE_COLOUR if b.baseline else PYMACH_COLOUR for b, _ in bars]
    ys = list(range(len(bars)))[::-1]  # the first bar on top
    ax.barh(ys, values, color=colours, height=0.6)
    ax.set_yticks(ys, labels, fontsize=8)
    targets = [(t, v) for t in panel.targets if (v := target_value(result, t)) is not None]
    for n, (t, v) in enumerate(targets):
        ax.axvline(v, color=TARGET_COLOUR, linestyle=("--", ":", "-.")[n % 3], linewidth=1.2,
                   label=t.label.format(t=_num(lookup(result, t.key) or 0)))
    everything = [v for v in values + [v for _, v in targets] if v > 0]
    if everything and min(everything) * LOG_SPAN < max(everything):
        ax.set_xscale("log")
    for y, v in zip(ys, values, strict=True):
        ax.annotate(_num(v), (v, y), xytext=(3, 0), textcoords="offset points",
                    va="center", fontsize=8)
    ax.margins(x=0.25)
    better = f" ({panel.better} is better)" if panel.better else ""
    ax.set_title(panel.title + better, fontsize=10)
    ax.set_xlabel(panel.unit, fontsize=9)
    if targets:
        ax.legend(fontsize=7, loc="best")


def _num(v: float) -> str:
    """A figure for a label: three significant digits, thousands separated."""
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.3g}"


# -- the trace timeline --------------------------------------------------------------------------

def plot_trace(tl: Timeline, path: str, title: str = "") -> None:
    """Draw the timeline `tl` (see module docstring) into the PNG `path`.
    PlotUnavailable without matplotlib; OSError if `path` cannot be written."""
    tasks = tl.tasks or ["(no tasks)"]
    fig = _figure(13.0, 3.0 + 0.45 * len(tasks) + 0.3 * len(tasks))
    grid = fig.add_gridspec(2, 1, height_ratios=[max(len(tasks), 2), max(len(tasks), 2) * 0.6])
    top, bottom = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
    row = {t: len(tasks) - 1 - i for i, t in enumerate(tasks)}
    width = max(tl.end, 1e-3) / 600  # the narrowest bar drawn: 1/600 of the trace
    _draw_lifetimes(top, tl, row)
    _draw_faults(top, tl, row, width)
    _draw_manager(top, tl, row, width)
    if tl.ipc:
        top.scatter([at for at, _, _ in tl.ipc], [row[t] for _, t, _ in tl.ipc], marker="|",
                    s=30, color="black", alpha=0.25, linewidths=0.8, label="IPC send/receive")
    top.set_yticks(list(row.values()), list(row), fontsize=8)
    top.set_ylim(-0.7, len(tasks) - 0.3)
    top.set_xlabel("trace order (deterministic mode: virtual time stands still)"
                   if tl.virtual_time else "ms since boot", fontsize=9)
    top.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    top.set_title(title or f"kernel trace: {len(tl.faults)} faults, {len(tl.messages)} "
                  f"kernel-manager messages, {len(tl.tasks)} tasks", fontsize=11)
    _draw_totals(bottom, tl)
    fig.savefig(path, format="png")


def _draw_lifetimes(ax: Axes, tl: Timeline, row: dict[str, int]) -> None:
    for i, (task, (start, end)) in enumerate(tl.lifetimes.items()):
        ax.broken_barh([(start, max(end - start, 0.0))], (row[task] - 0.4, 0.8),
                       color="0.92", label="task alive (first to last event)" if i == 0 else None)


def _draw_faults(ax: Axes, tl: Timeline, row: dict[str, int], width: float) -> None:
    for kind in tl.kinds():
        for task in tl.tasks:
            spans = [(f.start, max(f.ms, width)) for f in tl.faults
                     if f.task == task and f.kind == kind]
            if spans:
                ax.broken_barh(spans, (row[task] - 0.35, 0.35), color=_colour(kind),
                               label=f"fault: {kind}" if task == _first(tl, kind) else None)


def _colour(kind: str) -> str:
    return KIND_COLOURS.get(kind, "tab:gray")


def _first(tl: Timeline, kind: str) -> str:
    return next(f.task for f in tl.faults if f.kind == kind)


def _draw_manager(ax: Axes, tl: Timeline, row: dict[str, int], width: float) -> None:
    for i, task in enumerate(sorted({s.manager for s in tl.spans})):
        spans = [(s.start, max(s.end - s.start, width)) for s in tl.spans if s.manager == task]
        ax.broken_barh(spans, (row[task] + 0.02, 0.33), color="tab:purple", alpha=0.6,
                       label="manager answering pager_data_request" if i == 0 else None)
    for down in (True, False):
        msgs = [m for m in tl.messages if m.to_manager == down and m.manager in row]
        if msgs:
            ax.scatter([m.at for m in msgs], [row[m.manager] + 0.2 for m in msgs],
                       marker="v" if down else "^", s=22, zorder=3,
                       color="tab:brown" if down else "tab:olive",
                       label="kernel -> manager message" if down
                       else "manager -> kernel call")


def _draw_totals(ax: Axes, tl: Timeline) -> None:
    """Per task: time in faults (by kind) and answering the kernel; with virtual time,
    where no time passes, the numbers of faults and of manager messages instead."""
    rows = tl.summary()[::-1]
    ys = list(range(len(rows)))
    left = [0.0] * len(rows)
    counting = tl.virtual_time
    for kind in tl.kinds():
        part = [sum(1.0 if counting else f.ms for f in tl.faults
                    if f.task == r["task"] and f.kind == kind) for r in rows]
        if any(part):
            ax.barh(ys, part, left=left, height=0.6, color=_colour(kind),
                    label=f"faults: {kind}")
            left = [a + b for a, b in zip(left, part, strict=True)]
    serving = [float(r["manager_messages" if counting else "serving_ms"]) for r in rows]
    if any(serving):
        ax.barh(ys, serving, left=left, height=0.6, color="tab:purple", alpha=0.6,
                label="kernel-manager messages" if counting
                else "answering pager_data_request")
    ends = [a + b for a, b in zip(left, serving, strict=True)]
    for y, r, end in zip(ys, rows, ends, strict=True):
        ms = "" if counting else f", {r['fault_ms']:.3g} ms"
        ax.annotate(f"{r['faults']} faults{ms}; {r['manager_messages']} manager msgs",
                    (end, y), xytext=(3, 0), textcoords="offset points", va="center",
                    fontsize=7)
    ax.set_yticks(ys, [r["task"] for r in rows], fontsize=8)
    ax.set_xlim(0, max(ends, default=0.0) * 1.4 or 1.0)  # room for the notes
    ax.set_xlabel("faults and kernel-manager messages, per task (virtual time: counts)"
                  if counting else "ms in faults and in answering the kernel, per task",
                  fontsize=9)
    ax.set_title("what happened" if counting else "where time goes", fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
