"""`pymach ps | vmmap TASK | vm_stat | lsmp TASK`: watch a running machd.

Each tool becomes a short-lived task of machd (attach), asks the kernel for a report
through the host port (`host_report`, answered under the kernel lock, so each snapshot
is consistent), leaves (detach), and prints the report in the style of the macOS tool
of the same name, or as JSON with `--json`. The reporting task itself is not listed.

A task is named by its id or its name as `ps` shows them; a name two live tasks share
is refused with their ids, never resolved to one of them silently. Tables keep their
columns in line: a name longer than its column is cut, its last character `~` (the
JSON has it whole). `lsmp` labels a task's ports with the task's name now, where the
kernel's label still has the name the task was made with (`current_labels`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from pymach import mach
from pymach.errors import MachError
from pymach.kern.report import PortRow, TaskRow, ThreadRow, format_lsmp, format_ps
from pymach.libmach.task import attach, attached, detach
from pymach.vm.vm_report import VmmapRow, format_vm_stat, format_vmmap

TOOLS = ("ps", "vmmap", "vm_stat", "lsmp")
_REPORTER = "pymach-report"  # the name of the tools' own short-lived task

# How the kernel labels a task's own ports: with the name the task had when it was made,
# which is task<id> for one made by task_create (spawn names it afterwards).
_CREATION_LABEL = re.compile(r"(task|notify):task(\d+)")


class AmbiguousTask(LookupError):
    """More than one live task has the name a tool was given."""


def fetch(socket_path: str | None, what: str, task: str = "") -> tuple[Any, str]:
    """The report `what` of the machd at `socket_path`, as plain data (JSON), and the
    name of the task it is about ("" for ps and vm_stat). `task` is an id or a name
    (`pick_task`)."""
    attach(socket_path, name=_REPORTER)
    try:
        tasks = live_tasks()
        if what == "ps":
            return tasks, ""
        if what == "vm_stat":
            return vm_counters(), ""
        row = pick_task(tasks, task)
        data = _report(what, str(row["id"]))
    finally:
        detach()
    if what == "lsmp":
        data = current_labels(data, tasks)
    return data, row["name"]


def live_tasks() -> list[dict[str, Any]]:
    """The `ps` rows (plain data) of the machd this process is attached to, less this
    process's own task (the tool's)."""
    me = attached()
    return [row for row in _report("ps") if me is None or row["id"] != me.task_serial]


def vm_counters() -> dict[str, int]:
    """The `vm_stat` report of the machd this process is attached to."""
    stats: dict[str, int] = _report("vm_stat")
    return stats


def _report(what: str, task: str = "") -> Any:
    text: str = mach.host_report(mach.host_self(), what, task)
    return json.loads(text)


def pick_task(tasks: list[dict[str, Any]], which: str) -> dict[str, Any]:
    """The `ps` row of the task `which` names: by id if it is a number some task has,
    else by name. KERN_INVALID_TASK if none; AmbiguousTask (listing their ids) if
    several tasks have that name."""
    if which.isdigit():
        for row in tasks:
            if row["id"] == int(which):
                return row
    named = [row for row in tasks if row["name"] == which]
    if not named:
        raise MachError("KERN_INVALID_TASK", f"no live task {which!r} (`pymach ps` lists "
                        f"them)")
    if len(named) > 1:
        ids = ", ".join(str(row["id"]) for row in named)
        raise AmbiguousTask(f"{len(named)} tasks are named {which!r} (ids {ids}): give the "
                            f"id of the one you mean")
    return named[0]


def current_labels(ports: list[dict[str, Any]], tasks: list[dict[str, Any]]) -> list[Any]:
    """lsmp rows with a task's ports labelled by the task's name now (`task:sleeper`),
    where the kernel's label still carries the name it was created with (`task:task7`)."""
    names = {row["id"]: row["name"] for row in tasks}
    taken = set(names.values())

    def label(text: str) -> str:
        m = _CREATION_LABEL.fullmatch(text)
        if m is None or int(m[2]) not in names or f"task{m[2]}" in taken:
            return text
        return f"{m[1]}:{names[int(m[2])]}"

    return [{**row, "port": label(row["port"])} for row in ports]


def as_rows(what: str, data: Any) -> Any:
    """A fetched report as the row objects the embedded kernel's reports return."""
    if what == "ps":
        return [TaskRow(**{**r, "threads": tuple(ThreadRow(**t) for t in r["threads"])})
                for r in data]
    if what == "vmmap":
        return [VmmapRow(**r) for r in data]
    if what == "lsmp":
        return [PortRow(**r) for r in data]
    return data


def render(what: str, data: Any, task: str = "") -> str:
    """The text table of a fetched report (long names cut to their columns)."""
    rows = as_rows(what, data)
    if what == "ps":
        return format_ps(rows)
    if what == "vmmap":
        return format_vmmap(task, rows)
    if what == "lsmp":
        return format_lsmp(task, rows)
    return format_vm_stat(rows)


def run_tool(args: argparse.Namespace) -> int:
    """The `pymach ps|vmmap|vm_stat|lsmp` commands."""
    try:
        data, task = fetch(args.socket, args.command, getattr(args, "task", ""))
    except (MachError, AmbiguousTask) as e:
        print(f"pymach {args.command}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2) if args.json else render(args.command, data, task))
    return 0


def add_parsers(sub: Any, socket_help: str) -> None:
    """Register the four tools on the `pymach` subcommand parser."""
    helps = {"ps": "tasks, threads and resident pages of the running machd",
             "vmmap": "the regions of one task of the running machd",
             "vm_stat": "page counts and VM counters of the running machd",
             "lsmp": "the port name space of one task of the running machd"}
    for name in TOOLS:
        p = sub.add_parser(name, help=helps[name])
        if name in ("vmmap", "lsmp"):
            p.add_argument("task", help="the task's id or name, as `pymach ps` shows them "
                           "(a name two tasks share is refused)")
        p.add_argument("--socket", default=None, metavar="PATH", help=socket_help)
        p.add_argument("--json", action="store_true", help="print the report as JSON")
        p.set_defaults(func=run_tool)
