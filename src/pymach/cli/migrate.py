"""`pymach migrate TASK [HOST]`: move a migratable task of the running machd (paper 8.2).

The command becomes a short-lived task of machd (attach), as `pymach ps` does, finds the
task by id or name (`pick_task`: a name two tasks share is refused), gets a send right to
its task port (`task_for_id`: a task of the same user only) and calls `task_migrate`
(apps/migrate.py). HOST is this host if omitted (or "localhost", this machine's name,
this host's cluster name), else another host of machd's cluster that is up. It prints
the new task's id on this host, or the host it went to.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pymach import mach
from pymach.apps.migrate import check_host, task_migrate
from pymach.cli.tools import AmbiguousTask, live_tasks, pick_task
from pymach.errors import MachError
from pymach.libmach.task import attach, detach

_MIGRATOR = "pymach-migrate"  # the name of the command's own short-lived task


def migrate(socket_path: str | None, which: str, host: str | None = None,
            prepage: bool = False) -> dict[str, Any]:
    """Move the task `which` (id or name) of the machd at `socket_path` to `host` (with
    pre-paging if `prepage`); returns {"old": its ps row, "new": the new task's ps row,
    or its name and host}."""
    attach(socket_path, name=_MIGRATOR)
    try:
        local = check_host(host)
        row = pick_task(live_tasks(), which)
        task = mach.task_for_id(mach.host_self(), row["id"])
        new = task_migrate(task, host, prepage)
        serial = next((r for r in live_tasks() if r["name"] == row["name"]
                       and r["id"] != row["id"]), {"id": "?", "name": row["name"]}) \
            if local else {"id": None, "name": row["name"], "host": host}
        mach.port_deallocate(mach.task_self(), new)
    finally:
        detach()
    return {"old": row, "new": serial}


def run_migrate(args: argparse.Namespace) -> int:
    """The `pymach migrate` command."""
    try:
        moved = migrate(args.socket, args.task, args.host, args.prepage)
    except (MachError, AmbiguousTask) as e:
        print(f"pymach migrate: {e}", file=sys.stderr)
        return 1
    old, new = moved["old"], moved["new"]
    if new.get("host"):
        print(f"task {old['name']!r} (id {old['id']}) moved to host {new['host']!r}")
    else:
        print(f"task {old['name']!r} (id {old['id']}) moved: it is task {new['id']} now")
    return 0


def add_migrate_parser(sub: Any, socket_help: str) -> None:
    """Register `pymach migrate` on the `pymach` subcommand parser."""
    p = sub.add_parser("migrate", help="move a migratable task of the running machd "
                       "(spawn(..., migratable=True)) into a new task; its ports move too")
    p.add_argument("task", help="the task's id or name, as `pymach ps` shows them")
    p.add_argument("host", nargs="?", default=None, help="where to: another host of "
                   "machd's cluster (default: this host)")
    p.add_argument("--prepage", action="store_true", help="to another host: bring the "
                   "pages resident in the task now over before it starts again")
    p.add_argument("--socket", default=None, metavar="PATH", help=socket_help)
    p.set_defaults(func=run_migrate)
