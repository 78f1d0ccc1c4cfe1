"""`pymach top`: a live view of a running machd's tasks, threads, resident pages and
fault rates, like macOS `top`.

`top` attaches to machd once, as the task `pymach-top` (which it leaves out of its
view), and then samples machd's reports every `--delay` seconds: `ps` (tasks, their
threads and resident pages) and `vm_stat` (page counts and counters), the reports the
native tools print (cli/tools.py). Each view covers the interval since the sample
before it; the first is taken one delay after a first, silent sample, so even a single
view (`--once`) has real rates. Rates are per second, from the difference of
successive `vm_stat` counters over the time between the samples (machd counts faults
for the whole machine, not per task); a task's resident pages are shown with their
change over the interval.

On a terminal the screen is redrawn in place, as `top` does; into a pipe or a file each
view follows the one before, separated by a blank line. `-n COUNT` stops after COUNT
views (`--once`: one); `--json` prints each view as one line of JSON. Ctrl-C ends it
quietly (status 0). If machd goes away, top says so and ends with status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, TextIO

from pymach.cli.options import DefaultsFormatter, positive_float, positive_int
from pymach.cli.tools import live_tasks, vm_counters
from pymach.errors import MachError
from pymach.kern.report import fit
from pymach.libmach.task import attach, detach

NAME = "pymach-top"  # top's own task
RATES = {"faults": "faults", "zero_fill_count": "zero_fill", "cow_faults": "cow_faults",
         "pageins": "pageins", "pageouts": "pageouts", "reactivations": "reactivations",
         "pager_messages": "pager_messages"}  # vm_stat counter: its rate's name
CLEAR = "\x1b[H\x1b[2J"  # cursor home, erase the screen


@dataclass(frozen=True)
class Sample:
    """One look at machd: when (monotonic and wall clock seconds), tasks, VM counters."""

    at: float
    wall: float
    tasks: list[dict[str, Any]]
    vm: dict[str, int]


def take_sample() -> Sample:
    """A sample of the machd this process is attached to."""
    return Sample(time.monotonic(), time.time(), live_tasks(), vm_counters())


def view(before: Sample, now: Sample) -> dict[str, Any]:
    """What top shows for the interval from `before` to `now`, as plain data."""
    seconds = max(now.at - before.at, 1e-9)
    rates = {f"{name}_per_s": round((now.vm.get(k, 0) - before.vm.get(k, 0)) / seconds, 1)
             for k, name in RATES.items()}
    earlier = {row["id"]: row["resident_pages"] for row in before.tasks}
    tasks = [_task_view(row, earlier.get(row["id"], 0)) for row in now.tasks]
    tasks.sort(key=lambda t: (-t["resident_pages"], t["id"]))
    states = Counter(state for t in tasks for state in t["thread_states"])
    return {"time": datetime.datetime.fromtimestamp(now.wall).isoformat(timespec="seconds"),
            "interval_s": round(seconds, 3), "tasks": tasks,
            "totals": {"tasks": len(tasks), "threads": sum(t["threads"] for t in tasks),
                       "thread_states": dict(sorted(states.items())),
                       "resident_pages": sum(t["resident_pages"] for t in tasks)},
            "memory": {k: now.vm.get(k, 0) for k in ("page_size", "pages_free", "pages_active",
                                                     "pages_inactive", "pages_wired")},
            "rates": rates}


def _task_view(row: dict[str, Any], resident_before: int) -> dict[str, Any]:
    threads = row["threads"]
    return {"id": row["id"], "name": row["name"], "parent": row["parent"],
            "threads": len(threads),
            "thread_states": dict(Counter(t["state"] for t in threads)),
            "resident_pages": row["resident_pages"],
            "resident_change": row["resident_pages"] - resident_before,
            "port_names": row["port_names"], "suspend_count": row["suspend_count"]}


def render(v: dict[str, Any], socket: str, delay: float) -> str:
    """A view as `top`'s screen: a header of totals and rates, then a row per task."""
    totals, mem, r = v["totals"], v["memory"], v["rates"]
    states = ", ".join(f"{n} {s}" for s, n in totals["thread_states"].items()) or "none"
    kib = mem["page_size"] // 1024
    lines = [f"pymach top: machd at {socket}, {v['time']}, every {delay:g} s",
             f"Tasks: {totals['tasks']}, threads: {totals['threads']} ({states}). "
             f"Resident: {totals['resident_pages']:,} pages of {kib} KiB; free "
             f"{mem['pages_free']:,}, active {mem['pages_active']:,}, inactive "
             f"{mem['pages_inactive']:,}, wired {mem['pages_wired']:,}",
             f"Per second: {r['faults_per_s']:,.1f} faults ({r['zero_fill_per_s']:,.1f} "
             f"zero-fill, {r['cow_faults_per_s']:,.1f} copy-on-write), "
             f"{r['pageins_per_s']:,.1f} pageins, {r['pageouts_per_s']:,.1f} pageouts, "
             f"{r['pager_messages_per_s']:,.1f} pager messages",
             "",
             f"{'ID':>5} {'TASK':<20} {'PARENT':<14} {'#TH':>4} {'RUN':>4} {'WAIT':>4} "
             f"{'RES':>9} {'+RES':>8} {'PORTS':>6} {'SUSP':>4}"]
    for t in v["tasks"]:
        s = t["thread_states"]
        lines.append(f"{t['id']:>5} {fit(t['name'], 20):<20} {fit(t['parent'], 14):<14} "
                     f"{t['threads']:>4} {s.get('running', 0):>4} {s.get('waiting', 0):>4} "
                     f"{t['resident_pages']:>9,} {t['resident_change']:>+8,} "
                     f"{t['port_names']:>6} {t['suspend_count']:>4}")
    return "\n".join(lines)


def show(v: dict[str, Any], args: argparse.Namespace, out: TextIO, first: bool) -> None:
    """Print one view: JSON (one line), the screen redrawn (a terminal), or appended."""
    if args.json:
        out.write(json.dumps(v) + "\n")
    elif out.isatty():
        out.write(CLEAR + render(v, args.socket or "the default socket", args.delay) + "\n")
    else:
        out.write(("" if first else "\n") + render(v, args.socket or "the default socket",
                                                   args.delay) + "\n")
    out.flush()


def run_top(args: argparse.Namespace) -> int:
    """The `pymach top` command."""
    count = 1 if args.once else args.n
    try:
        attach(args.socket, name=NAME)
    except (MachError, OSError) as e:
        print(f"pymach top: {e}", file=sys.stderr)
        return 1
    try:
        before, shown = take_sample(), 0
        while count is None or shown < count:
            time.sleep(args.delay)
            now = take_sample()
            show(view(before, now), args, sys.stdout, shown == 0)
            before, shown = now, shown + 1
    except KeyboardInterrupt:
        return 0
    except (MachError, OSError) as e:
        print(f"pymach top: machd stopped answering: {e}", file=sys.stderr)
        return 1
    finally:
        _leave()
    return 0


def _leave() -> None:
    with contextlib.suppress(MachError, OSError):  # machd is gone: nothing to leave
        detach()


def add_top_parser(sub: Any, socket_help: str) -> None:
    """Register `pymach top` on the subcommand parser."""
    p = sub.add_parser("top", help="a live view of the running machd's tasks, threads, "
                       "resident pages and fault rates", formatter_class=DefaultsFormatter)
    p.add_argument("--socket", default=None, metavar="PATH", help=socket_help)
    p.add_argument("-s", "--delay", type=positive_float, default=2.0, metavar="SECONDS",
                   help="seconds between views (each view's rates cover that interval)")
    p.add_argument("-n", type=positive_int, default=None, metavar="COUNT",
                   help="stop after COUNT views (default: until Ctrl-C)")
    p.add_argument("--once", action="store_true", help="one view, then stop (-n 1)")
    p.add_argument("--json", action="store_true", help="print each view as one line of JSON")
    p.set_defaults(func=run_top)
