"""`pymach trace [LOG] [--plot FILE.png] [--json]`: where time goes in a kernel trace.

An embedded kernel booted with `trace=True` keeps `kernel.trace_log`, one line per event,
`<ms since boot> <event>` (kern/host.py `trace_event`). This module reads those lines
back (from a file, from stdin, or as `pymach demo --plot` collects them) into a
`Timeline`:

- faults, `fault TASK VA read|write KIND MSms` (vm/vm_fault.py): when, how long, and what
  resolved them (pager, copy-on-write, zero-fill, resident, failed);
- kernel-manager messages, `kernel -> MANAGER: ROUTINE objN ARGS` and
  `MANAGER -> kernel: ROUTINE objN ARGS` (vm/memory_object.py); a `pager_data_request`
  and the manager's first answer for the same object and offset make a *service span*,
  the time the manager took;
- task lifetimes (`task created`, `task terminated`) and IPC (`send THREAD ...`,
  `recv THREAD ...`, a thread standing for its task).

Any other line is skipped (so `pymach demo --trace` output, narration and all, can be
read). Times are kept as written; a line earlier than the one before it starts a new
boot, and its times continue from the end of the previous one (`pymach demo all` runs
two kernels). When no time passes at all (deterministic mode: virtual time), each event's
time is its place in the trace. The text summary and `--json` give per-task totals; the
drawing is cli/plot.py's `plot_trace`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from pymach.cli.plot import PlotUnavailable, check_output, plot_trace

LINE = re.compile(r"^\s*(\d+\.\d+) (.+?)\s*$")
_FAULT = re.compile(r"fault (.+) (0x[0-9a-f]+) (read|write) (\S+) ([\d.]+)ms")
_TO_MANAGER = re.compile(r"kernel -> (.+): (\w+) obj(\d+) ?(.*)")
_FROM_MANAGER = re.compile(r"(.+) -> kernel: (\w+) obj(\d+) ?(.*)")
_TASK = re.compile(r"task (created|terminated) (.+?)(?: parent=.*)?")
_THREAD = re.compile(r"thread (?:created|exited) (.+)")
_IPC = re.compile(r"(send|recv) (.+?) id=")
FAULT_KINDS = ("pager", "copy-on-write", "zero-fill", "resident", "failed")


@dataclass(frozen=True)
class Fault:
    """One page fault of a task: it started at `start` and took `ms`."""

    task: str
    start: float
    ms: float
    address: int
    access: str
    kind: str


@dataclass(frozen=True)
class ManagerMessage:
    """One kernel-manager message: to the manager (`to_manager`) or its call back."""

    manager: str
    at: float
    routine: str
    obj: int
    args: tuple[str, ...]
    to_manager: bool


@dataclass(frozen=True)
class Span:
    """A manager serving a kernel request: from the request to its first answer."""

    manager: str
    start: float
    end: float
    routine: str  # the answer (pager_data_provided, pager_data_unavailable, ...)


@dataclass
class Timeline:
    """What a trace says happened, by task (see module docstring)."""

    faults: list[Fault] = field(default_factory=list)
    messages: list[ManagerMessage] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    ipc: list[tuple[float, str, str]] = field(default_factory=list)  # (at, task, send|recv)
    lifetimes: dict[str, list[float]] = field(default_factory=dict)  # task: [start, end]
    tasks: list[str] = field(default_factory=list)  # in order of first appearance
    events: int = 0  # trace lines read
    virtual_time: bool = False  # no time passed: times are places in the trace

    @property
    def end(self) -> float:
        """The time of the last event."""
        return max((e for span in self.lifetimes.values() for e in span), default=0.0)

    def kinds(self) -> list[str]:
        """The kinds of fault in the trace, in FAULT_KINDS order (unknown ones last)."""
        seen = {f.kind for f in self.faults}
        return [k for k in FAULT_KINDS if k in seen] + sorted(seen - set(FAULT_KINDS))

    def summary(self) -> list[dict[str, Any]]:
        """Per task, in order of first appearance: faults by kind and their total time,
        kernel-manager messages (as manager), time serving requests, IPC sends and
        receives."""
        return [self._task_summary(task) for task in self.tasks]

    def _task_summary(self, task: str) -> dict[str, Any]:
        faults = [f for f in self.faults if f.task == task]
        kinds = Counter(f.kind for f in faults)
        ipc = Counter(what for _, t, what in self.ipc if t == task)
        return {"task": task, "faults": len(faults),
                **{k.replace("-", "_"): kinds.get(k, 0) for k in FAULT_KINDS},
                "fault_ms": round(sum(f.ms for f in faults), 3),
                "manager_messages": sum(1 for m in self.messages if m.manager == task),
                "serving_ms": round(sum(s.end - s.start for s in self.spans
                                        if s.manager == task), 3),
                "sends": ipc["send"], "receives": ipc["recv"]}


def trace_lines(text: Iterable[str]) -> list[tuple[float, str]]:
    """The trace lines among `text` (lines of any output), as (ms, event), with the
    times of later boots moved on past earlier ones (see module docstring)."""
    out: list[tuple[float, str]] = []
    offset = last = 0.0
    for raw in text:
        for line in raw.splitlines():
            m = LINE.match(line)
            if m is None:
                continue
            t = float(m[1])
            if t < last:  # a new boot
                offset += last
            last = t
            out.append((t + offset, m[2]))
    if out and out[0][0] == out[-1][0]:  # no time passed (virtual time)
        out = [(float(i), event) for i, (_, event) in enumerate(out)]
    return out


def parse_trace(text: Iterable[str]) -> Timeline:
    """A `Timeline` of the trace lines among `text` (see module docstring)."""
    lines = trace_lines(text)
    tl = Timeline(events=len(lines))
    tl.virtual_time = len(lines) > 1 and all(t == float(i) for i, (t, _) in enumerate(lines))
    threads: dict[str, str] = {}
    pending: dict[tuple[str, int, str], float] = {}
    for at, event in lines:
        task = _read_event(tl, at, event, threads, pending)
        if task:
            _seen(tl, task, at)
    return tl


def _read_event(tl: Timeline, at: float, event: str, threads: dict[str, str],
                pending: dict[tuple[str, int, str], float]) -> str:
    """Record one event in `tl`; returns the task it belongs to ("" if none)."""
    if m := _FAULT.fullmatch(event):
        ms = float(m[5])
        tl.faults.append(Fault(m[1], max(at - ms, 0.0), ms, int(m[2], 16), m[3], m[4]))
        return m[1]
    if m := _TO_MANAGER.fullmatch(event):
        return _manager_message(tl, at, m, True, pending)
    if m := _FROM_MANAGER.fullmatch(event):
        return _manager_message(tl, at, m, False, pending)
    if m := _TASK.fullmatch(event):
        _seen(tl, m[2], at)
        if m[1] == "terminated":
            tl.lifetimes[m[2]][1] = at
        return ""
    if m := _THREAD.fullmatch(event):
        threads.setdefault(m[1], _task_of(m[1], tl.tasks))
        return threads[m[1]]
    if m := _IPC.match(event):
        task = threads.get(m[2]) or _task_of(m[2], tl.tasks)
        tl.ipc.append((at, task, m[1]))
        return task
    return ""


def _manager_message(tl: Timeline, at: float, m: re.Match[str], to_manager: bool,
                     pending: dict[tuple[str, int, str], float]) -> str:
    manager, routine, obj, args = m[1], m[2], int(m[3]), tuple(m[4].split())
    tl.messages.append(ManagerMessage(manager, at, routine, obj, args, to_manager))
    offset = args[0] if args else ""
    if to_manager and routine == "pager_data_request":
        pending[(manager, obj, offset)] = at
    elif not to_manager and routine.startswith("pager_data_"):
        start = pending.pop((manager, obj, offset), None)
        if start is not None:
            tl.spans.append(Span(manager, start, at, routine))
    return manager


def _task_of(thread: str, tasks: list[str]) -> str:
    """The task a thread name belongs to: the longest known task name it extends by
    `.something` (threads are named TASK.N), else the name before its last dot."""
    owners = [t for t in tasks if thread.startswith(t + ".")]
    return max(owners, key=len) if owners else thread.rpartition(".")[0] or thread


def _seen(tl: Timeline, task: str, at: float) -> None:
    if task not in tl.lifetimes:
        tl.tasks.append(task)
        tl.lifetimes[task] = [at, at]
    span = tl.lifetimes[task]
    span[1] = max(span[1], at)


def format_summary(tl: Timeline) -> str:
    """`Timeline.summary` as a table, with a line about the whole trace."""
    when = ("in virtual time (deterministic mode: no time passes; times below count "
            "trace events)" if tl.virtual_time else f"over {tl.end:.3f} ms")
    lines = [f"{tl.events} trace events, {len(tl.tasks)} tasks, {len(tl.faults)} faults, "
             f"{len(tl.messages)} kernel-manager messages {when}",
             f"{'TASK':<16} {'FAULTS':>6} {'PAGER':>5} {'COW':>5} {'ZERO':>5} {'RES':>5} "
             f"{'FAULT MS':>9} {'MGR MSGS':>8} {'SERVING MS':>10} {'SENDS':>6} {'RECVS':>6}"]
    for r in tl.summary():
        name = r["task"] if len(r["task"]) <= 16 else r["task"][:15] + "~"
        lines.append(f"{name:<16} {r['faults']:>6} {r['pager']:>5} {r['copy_on_write']:>5} "
                     f"{r['zero_fill']:>5} {r['resident']:>5} {r['fault_ms']:>9.3f} "
                     f"{r['manager_messages']:>8} {r['serving_ms']:>10.3f} {r['sends']:>6} "
                     f"{r['receives']:>6}")
    return "\n".join(lines)


def as_json(tl: Timeline) -> dict[str, Any]:
    """The timeline as plain data: the summary and every fault, message and span."""
    return {"events": tl.events, "virtual_time": tl.virtual_time, "end": tl.end,
            "tasks": tl.summary(), "lifetimes": tl.lifetimes,
            "faults": [asdict(f) for f in tl.faults],
            "messages": [asdict(m) for m in tl.messages],
            "spans": [asdict(s) for s in tl.spans]}


# -- `pymach demo --plot`: the demo's trace, collected as the kernel writes it -------------------

def demo_plot_start(plot: str | None, show: bool, opts: dict[str, Any]) -> list[str] | None:
    """For `pymach demo --plot`: None without a plot; else check the picture can be
    drawn (`check_output`: PlotUnavailable, FileNotFoundError), and make the demo's
    keyword options (`trace`, `out`) record the kernel's trace into the list returned,
    line by line as the kernel writes it. The demo prints its trace only if `show`
    (--trace)."""
    if not plot:
        return None
    check_output(plot)
    lines: list[str] = []
    opts["trace"] = lines.append  # boot(trace=callable): every line, as it is written
    if not show:
        opts["out"] = without_trace_blocks(print)
    return lines


def demo_plot_end(lines: list[str] | None, plot: str | None) -> int:
    """For `pymach demo --plot`: draw the collected trace into `plot`; the status."""
    if lines is None or not plot:
        return 0
    try:
        plot_trace(parse_trace(lines), plot)
    except OSError as e:
        print(f"pymach demo: cannot write {plot}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"pymach demo: timeline of {len(lines)} trace events written to {plot}",
          file=sys.stderr)
    return 0


def without_trace_blocks(out: Callable[[str], Any]) -> Callable[[str], Any]:
    """`out`, less the texts a demo prints that are a heading and trace lines only (the
    trace a demo prints at its end when tracing is on)."""
    def filtered(text: str) -> Any:
        heading, _, rest = text.strip("\n").partition("\n")
        body = rest.splitlines()
        if heading.endswith(":") and body and all(LINE.match(line) for line in body):
            return None
        return out(text)

    return filtered


# -- the command -------------------------------------------------------------------------------

def read_log(path: str | None, stdin: TextIO) -> list[str]:
    """The lines of the trace file `path` ("-" or None: stdin). OSError for a file that
    cannot be read; ValueError if stdin is a terminal (nothing is piped in)."""
    if path in (None, "-"):
        if stdin.isatty():
            raise ValueError("give a trace file, or pipe a trace in (e.g. "
                             "`pymach demo fs --trace | pymach trace`)")
        return stdin.read().splitlines()
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read().splitlines()


def run_trace(args: argparse.Namespace) -> int:
    """The `pymach trace` command."""
    try:
        if args.plot:
            check_output(args.plot)
        tl = parse_trace(read_log(args.log, sys.stdin))
    except (OSError, ValueError, PlotUnavailable) as e:
        print(f"pymach trace: {e}", file=sys.stderr)
        return 2
    if not tl.events:
        print(f"pymach trace: no kernel trace lines in {args.log or 'stdin'} (lines like "
              f"'    12.345 fault client 0x10000 read pager 0.410ms'; boot the kernel with "
              f"trace=True and write kernel.trace_log, or run `pymach demo --trace`)",
              file=sys.stderr)
        return 1
    print(json.dumps(as_json(tl), indent=2) if args.json else format_summary(tl))
    if args.plot:
        plot_trace(tl, args.plot)
        print(f"pymach trace: timeline written to {args.plot}", file=sys.stderr)
    return 0


def add_trace_parser(sub: Any) -> None:
    """Register `pymach trace` on the subcommand parser."""
    p = sub.add_parser("trace", help="where time goes in an embedded kernel's trace: faults "
                       "and kernel-manager messages by task (a table, or a timeline "
                       "with --plot)")
    p.add_argument("log", nargs="?", default=None, metavar="LOG",
                   help="a file of trace lines (kernel.trace_log, or `pymach demo --trace` "
                   "output); '-' or none: standard input")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="also draw the timeline into FILE.png (needs matplotlib: "
                   "pip install 'pymach[plot]')")
    p.add_argument("--json", action="store_true",
                   help="print the summary and every fault, message and span as JSON")
    p.set_defaults(func=run_trace)
