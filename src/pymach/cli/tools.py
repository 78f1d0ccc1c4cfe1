"""`pymach ps | vmmap TASK | vm_stat | lsmp TASK`: watch a running machd.

Each tool becomes a short-lived task of machd (attach), asks the kernel for a report
through the host port (`host_report`, answered under the kernel lock, so the snapshot
is consistent), leaves (detach), and prints the report in the style of the macOS tool
of the same name, or as JSON with `--json`. The reporting task itself is not listed.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pymach.errors import MachError
from pymach.kern.report import PortRow, TaskRow, ThreadRow, format_lsmp, format_ps
from pymach.vm.vm_report import VmmapRow, format_vm_stat, format_vmmap

TOOLS = ("ps", "vmmap", "vm_stat", "lsmp")
_REPORTER = "pymach-report"  # the name of the tools' own short-lived task


def fetch(socket_path: str | None, what: str, task: str = "") -> Any:
    """The report `what` of the machd at `socket_path`, as plain data (JSON)."""
    from pymach import mach
    from pymach.libmach.task import attach, detach

    attach(socket_path, name=_REPORTER)
    try:
        text: str = mach.host_report(mach.host_self(), what, task)
    finally:
        detach()
    data = json.loads(text)
    if what == "ps":
        data = [row for row in data if row["name"] != _REPORTER]
    return data


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
    """The text table of a fetched report."""
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
    task = getattr(args, "task", "")
    try:
        data = fetch(args.socket, args.command, task)
    except MachError as e:
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
            p.add_argument("task", help="task name or id (as `pymach ps` shows)")
        p.add_argument("--socket", default=None, help=socket_help)
        p.add_argument("--json", action="store_true", help="print the report as JSON")
        p.set_defaults(func=run_tool)
