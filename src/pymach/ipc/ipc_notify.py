"""Notifications: messages the kernel sends to a task's notify port (Mach 2.5 notify.h).

Each carries one Int item, the affected name in the notified task's space:
- NOTIFY_PORT_DELETED: a port the task held send rights to was destroyed; the name is gone.
- NOTIFY_RECEIVE_RIGHTS: the task (the owner) was given the port's receive rights.
- NOTIFY_OWNERSHIP_RIGHTS: the task (the receiver) was given the port's ownership rights.
Notifications are kernel messages: never refused for backlog, silently dropped if the
task has no live notify port.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pymach.include.message import Int
from pymach.ipc.ipc_mqueue import mqueue_enqueue
from pymach.ipc.kmsg import KMsg

if TYPE_CHECKING:
    from pymach.kern.task import Task

NOTIFY_FIRST = 0o100
NOTIFY_PORT_DELETED = NOTIFY_FIRST + 0o3
NOTIFY_MSG_ACCEPTED = NOTIFY_FIRST + 0o4
NOTIFY_OWNERSHIP_RIGHTS = NOTIFY_FIRST + 0o11
NOTIFY_RECEIVE_RIGHTS = NOTIFY_FIRST + 0o12

NOTIFY_NAMES = {
    NOTIFY_PORT_DELETED: "NOTIFY_PORT_DELETED",
    NOTIFY_OWNERSHIP_RIGHTS: "NOTIFY_OWNERSHIP_RIGHTS",
    NOTIFY_RECEIVE_RIGHTS: "NOTIFY_RECEIVE_RIGHTS",
}


def notify_task(task: Task, msg_id: int, name: int) -> None:
    """Queue notification `msg_id` about `name` on the task's notify port, if it has one."""
    port = task.notify_port
    if port is None or port.dead or not task.active:
        return
    mqueue_enqueue(port, KMsg(port, None, msg_id, [Int(name)]))
    task.kernel.trace_event(f"notify {task.name} {NOTIFY_NAMES.get(msg_id, msg_id)} name={name}")
