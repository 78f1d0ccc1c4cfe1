"""Seeing the kernel work: `ps` (tasks and threads) and `lsmp` (one task's port names).

Both take a consistent snapshot under the kernel lock and return plain rows; the
`format_*` functions print them in the style of the macOS tools of the same names.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from pymach.errors import MachError
from pymach.kern.task import Task
from pymach.vm.vm_report import vm_stat, vmmap

if TYPE_CHECKING:
    from pymach.kern.host import Kernel


@dataclass(frozen=True)
class ThreadRow:
    """One thread in a `ps` report."""

    name: str
    state: str
    suspend_count: int
    waiting_on: str = ""  # the wait queue of a waiting thread


@dataclass(frozen=True)
class TaskRow:
    """One task in a `ps` report."""

    id: int
    name: str
    parent: str
    suspend_count: int
    port_names: int
    threads: tuple[ThreadRow, ...]
    resident_pages: int = 0  # pages of its address space resident in memory
    remote_names: int = 0  # names for ports that live on other hosts (netmsgserver proxies)

    def as_dict(self) -> dict[str, Any]:
        """The row as plain data (for --json)."""
        return asdict(self)


@dataclass(frozen=True)
class PortRow:
    """One name in an `lsmp` report."""

    name: int
    rights: str
    port: str  # what the port stands for (label) or its serial
    queued: int
    backlog: int
    enabled: bool
    receiver: str
    owner: str
    remote_host: str = ""  # the host where the port lives, if not this one

    def as_dict(self) -> dict[str, Any]:
        """The row as plain data (for --json)."""
        return asdict(self)


def ps(kernel: Kernel) -> list[TaskRow]:
    """Every live task with its threads, in creation order."""
    with kernel.sched.lock:
        return [_ps_row(t) for t in sorted(kernel.tasks.values(), key=lambda t: t.serial)]


def _ps_row(t: Task) -> TaskRow:
    """One task's `ps` row (kernel lock held)."""
    threads = tuple(ThreadRow(th.name, th.state, th.suspend_count,
                              th.wait_queue.name if th.wait_queue else "") for th in t.threads)
    remote = sum(1 for e in t.space.names.values() if e.port.remote_host)
    return TaskRow(t.serial, t.name, t.parent.name if t.parent else "-", t.suspend_count,
                   len(t.space.names), threads, _resident(t), remote)


def find_task(kernel: Kernel, which: Task | int | str) -> Task:
    """A live task by Task object, serial or name (KERN_INVALID_TASK if none)."""
    if isinstance(which, Task):
        return which
    for t in kernel.tasks.values():
        if which in (t.serial, t.name):
            return t
    raise MachError("KERN_INVALID_TASK", f"no live task {which!r}")


def _resident(task: Task) -> int:
    return sum(r.resident for r in _vmmap_rows(task))


def _vmmap_rows(task: Task) -> list[Any]:
    return [] if task.map is None else vmmap(task.map)


def report_json(kernel: Kernel, what: str, which: str) -> str:
    """A report as JSON (kernel lock held): 'ps', 'lsmp' or 'vmmap' of a task, 'vm_stat'."""
    import json

    if what == "vm_stat":
        return json.dumps(vm_stat(kernel.vm))
    if what == "ps":
        return json.dumps([_ps_row(t).as_dict() for t in
                           sorted(kernel.tasks.values(), key=lambda t: t.serial)])
    task = find_task(kernel, int(which) if which.isdigit() else which)
    if what == "lsmp":
        return json.dumps([r.as_dict() for r in _lsmp_rows(task)])
    if what == "vmmap":
        return json.dumps([r.as_dict() for r in _vmmap_rows(task)])
    raise MachError("KERN_INVALID_ARGUMENT", f"no report {what!r}: ps, lsmp, vmmap or vm_stat")


def _holder(task: Task | None, in_transit: bool) -> str:
    if task is not None:
        return task.name
    return "(in transit)" if in_transit else "-"


def lsmp(kernel: Kernel, which: Task | int | str) -> list[PortRow]:
    """The port name space of one task (by Task, id or name), in name order."""
    with kernel.sched.lock:
        return _lsmp_rows(find_task(kernel, which))


def _lsmp_rows(task: Task) -> list[PortRow]:
    """One task's `lsmp` rows (kernel lock held)."""
    rows = []
    for name in sorted(task.space.names):
        e = task.space.names[name]
        p = e.port
        receiver = f"host {p.remote_host}" if p.remote_host else \
            _holder(p.receiver, p.receive_in_transit)
        rows.append(PortRow(name, e.rights_text(), p.label or f"port{p.serial}",
                            p.message_count(), p.backlog, p.enabled and e.receive, receiver,
                            _holder(p.owner, p.ownership_in_transit), p.remote_host))
    return rows


def _thread_text(t: ThreadRow) -> str:
    suspended = f"/s{t.suspend_count}" if t.suspend_count else ""
    waiting = f" on {t.waiting_on}" if t.waiting_on else ""
    return f"{t.name}({t.state}{waiting}{suspended})"


def fit(text: str, width: int) -> str:
    """`text` cut to `width` characters, the last one "~" if it was longer (so a long
    name keeps a table's columns in line)."""
    return text if len(text) <= width else text[:width - 1] + "~"


def format_ps(rows: list[TaskRow]) -> str:
    """A `ps`-style table of tasks and their threads (long names cut to their columns;
    REM counts the names a task holds for ports on other hosts)."""
    lines = [f"{'ID':>4} {'TASK':<16} {'PARENT':<12} {'SUSP':>4} {'NAMES':>5} {'REM':>4} "
             f"{'RES':>6}  THREADS"]
    for r in rows:
        threads = ", ".join(_thread_text(t) for t in r.threads) or "-"
        lines.append(f"{r.id:>4} {fit(r.name, 16):<16} {fit(r.parent, 12):<12} "
                     f"{r.suspend_count:>4} {r.port_names:>5} {r.remote_names:>4} "
                     f"{r.resident_pages:>6}  {threads}")
    return "\n".join(lines)


def format_lsmp(task_name: str, rows: list[PortRow]) -> str:
    """An `lsmp`-style table of one task's port names (long names cut to their
    columns; a port that lives on another host shows "host NAME" as its receiver)."""
    lines = [f"port name space of task {task_name!r}",
             f"{'NAME':>5}  {'RIGHTS':<14} {'PORT':<22} {'MSGS':>4} {'QLIM':>4} {'EN':>2}  "
             f"{'RECEIVER':<14} OWNER"]
    for r in rows:
        lines.append(f"{r.name:>5}  {r.rights:<14} {fit(r.port, 22):<22} {r.queued:>4} "
                     f"{r.backlog:>4} {'y' if r.enabled else '-':>2}  "
                     f"{fit(r.receiver, 14):<14} {r.owner}")
    return "\n".join(lines)
