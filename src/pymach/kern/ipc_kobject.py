"""The kernel as a server: requests sent to task, thread and host ports (3.2).

A message to a kernel port is executed inline by the sending thread, with the kernel lock
held, as Mach does; its semantics and errors are those of a message to a server. The MIG
definitions (include/mach_defs.py) decode it, with the kernel's item codec (kern/mig.py);
`KernelServer` holds one method per routine, taking the target kernel object and the
decoded arguments. The reply is queued on the request's reply port like any message. A
request that fails has its rights destroyed.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from pymach.errors import MachError
from pymach.include.mach_defs import (
    PORT_TYPE_OWN,
    PORT_TYPE_RECEIVE,
    PORT_TYPE_SEND,
    SPECIAL_PORTS,
    TASK_BOOTSTRAP_PORT,
    TASK_ENTRY_MAX,
    TASK_KERNEL_PORT,
    TASK_NOTIFY_PORT,
    THREAD_KERNEL_PORT,
    THREAD_REPLY_PORT,
    host_defs,
    pager_defs,
    port_defs,
    task_defs,
    thread_defs,
    vm_defs,
)
from pymach.include.message import Code, Int, Str
from pymach.include.mig import REPLY_ID_OFFSET, Subsystem
from pymach.include.version import __version__
from pymach.ipc import mach_port
from pymach.ipc.ipc_mqueue import mqueue_enqueue
from pymach.ipc.ipc_right import kmsg_destroy
from pymach.ipc.kmsg import KOOL, KMsg, KPort
from pymach.ipc.port import Port
from pymach.kern.mig import KERNEL_CODEC
from pymach.kern.report import report_json
from pymach.kern.task import Task
from pymach.kern.thread import Thread, current_thread
from pymach.vm.memory_object import PagerServer
from pymach.vm.vm_map_copy import vm_map_copy_discard
from pymach.vm.vm_object import VmObject
from pymach.vm.vm_user import VmServer

if TYPE_CHECKING:
    from pymach.kern.host import Kernel

log = logging.getLogger("pymach.kernel")


def served_subsystems(kernel: Kernel) -> list[tuple[Subsystem, type, object]]:
    """The subsystems the kernel serves: (definitions, kind of kernel object, server).
    The host port's kernel object is the kernel itself."""
    return [(task_defs, Task, kernel.server), (port_defs, Task, kernel.server),
            (thread_defs, Thread, kernel.server), (host_defs, type(kernel), kernel.server),
            (vm_defs, Task, VmServer(kernel)), (pager_defs, VmObject, PagerServer(kernel))]


def _dispatch(kernel: Kernel, kmsg: KMsg) -> list[Any] | None:
    """Decode and execute one request; the reply items (None: no reply)."""
    obj = kmsg.dest.kobject
    for sub, kind, impl in kernel.served:
        if kmsg.id not in sub.routines:
            continue
        if not isinstance(obj, kind):
            return [Int(MachError("KERN_INVALID_ARGUMENT").value),
                    Str(f"{sub.routines[kmsg.id].name} needs a {sub.name} port, not "
                        f"{kmsg.dest.label}")]
        return sub.demux(impl, kmsg.id, obj, kmsg.items, KERNEL_CODEC)
    return [Int(MachError("MIG_BAD_ID").value), Str(f"no kernel routine has id {kmsg.id}")]


def _routine_name(kernel: Kernel, msg_id: int) -> str:
    for sub, _, _ in kernel.served:
        if msg_id in sub.routines:
            return sub.routines[msg_id].name
    return f"routine {msg_id}"


KERNEL_REPLIES_QUEUED_MAX = 64  # a kernel reply to a port holding this many is dropped:
# a task that never receives its replies cannot make the kernel hold them without bound


def kobject_server(kernel: Kernel, kmsg: KMsg) -> None:
    """Execute a request sent to a kernel port and queue the reply (kernel lock held).

    A failed request has all its rights and memory destroyed; a successful one has any
    out-of-line memory the routine did not take released.
    """
    items = _dispatch(kernel, kmsg)
    if items is None or items[0].value != 0:
        kmsg_destroy(kmsg)
    else:
        _discard_regions(kmsg)
    if items is None:
        return
    reply = kmsg.reply
    if reply is None and items[0].value != 0:  # sent without waiting (mach.oneway_stub)
        log.warning("%s to %s failed with no reply port to carry the error: %s",
                    _routine_name(kernel, kmsg.id), kmsg.dest.label,
                    items[1].value if len(items) > 1 else items[0].value)
    if reply is None or reply.dead or len(reply.queue) >= KERNEL_REPLIES_QUEUED_MAX:
        # nobody to tell, or nobody reads what it was told: release what it carries
        kmsg_destroy(KMsg(kernel.host_port, None, kmsg.id + REPLY_ID_OFFSET, items))
        if reply is not None and not reply.dead:
            kernel.trace_event(f"kernel reply {kmsg.id + REPLY_ID_OFFSET} dropped: "
                               f"{len(reply.queue)} messages wait on its port")
    else:
        mqueue_enqueue(reply, KMsg(reply, None, kmsg.id + REPLY_ID_OFFSET, items))


def _discard_regions(kmsg: KMsg) -> None:
    for item in kmsg.items:
        if isinstance(item, KOOL):
            vm_map_copy_discard(item.copy)


def _check_active(task: Task) -> Task:
    if not task.active:
        raise MachError("KERN_INVALID_TASK", f"task {task.name!r} has terminated")
    return task


def _check_int(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MachError("KERN_INVALID_ARGUMENT", f"{what} must be an int")
    return value


class KernelServer:
    """One method per kernel routine; each runs with the kernel lock held."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel

    # -- task interface --------------------------------------------------------------
    def task_create(self, parent: Task, inherit: bool) -> Port | None:
        child = self.kernel.task_create_locked(_check_active(parent), inherit)
        return child.port

    def task_terminate(self, task: Task) -> None:
        _check_active(task).terminate()

    def task_suspend(self, task: Task) -> None:
        _check_active(task).suspend_count += 1
        for t in task.threads:
            task.host.thread_alert(t)

    def task_resume(self, task: Task) -> None:
        if _check_active(task).suspend_count == 0:
            raise MachError("KERN_FAILURE", f"task {task.name!r} is not suspended")
        task.suspend_count -= 1
        for t in task.threads:
            self.kernel.sched.thread_wakeup(t.suspend_waitq)

    def task_threads(self, task: Task) -> list[Port]:
        return [t.port for t in _check_active(task).threads if not t.port.dead]

    def thread_create(self, task: Task, code: Code) -> Port:
        _check_active(task)
        if code.refused or code.origin_uid not in (-1, task.uid):
            raise MachError("KERN_PROTECTION_FAILURE", f"a callable from uid "
                            f"{code.origin_uid} cannot run in task {task.name!r} of uid "
                            f"{task.uid}: code runs only in its own user's tasks")
        thread = self.kernel.thread_create_locked(task, code)
        return thread.port

    def task_get_special_port(self, task: Task, which: int) -> Port | None:
        _check_active(task)
        ports = {TASK_KERNEL_PORT: task.port, TASK_NOTIFY_PORT: task.notify_port,
                 TASK_BOOTSTRAP_PORT: task.bootstrap_port}
        if _check_int(which, "which_port") not in ports:
            raise MachError("KERN_INVALID_ARGUMENT", f"no special port {which}; use one of "
                            f"{sorted(SPECIAL_PORTS)}")
        return ports[which]

    def task_set_special_port(self, task: Task, which: int, port: Port | None) -> None:
        _check_active(task)
        if which == TASK_NOTIFY_PORT:
            task.notify_port = port
        elif which == TASK_BOOTSTRAP_PORT:
            task.set_bootstrap(port)
        else:
            raise MachError("KERN_INVALID_ARGUMENT", f"special port {which} cannot be set")

    def task_info(self, task: Task) -> tuple[str, int, int, int]:
        _check_active(task)
        return task.name, task.suspend_count, len(task.threads), len(task.space.names)

    def task_set_name(self, task: Task, name: str) -> None:
        if not name or len(name) > 64:
            raise MachError("KERN_INVALID_ARGUMENT", "a task name has 1 to 64 characters")
        _check_active(task).name = name

    def task_set_entry(self, task: Task, entry: str) -> None:
        if len(entry) > TASK_ENTRY_MAX:
            raise MachError("KERN_INVALID_ARGUMENT", f"an entry point has at most "
                            f"{TASK_ENTRY_MAX} characters, not {len(entry)}")
        caller = current_thread().task
        if caller.uid != _check_active(task).uid:
            raise MachError("KERN_PROTECTION_FAILURE", f"only a task of uid {task.uid} may "
                            f"set the entry point of task {task.name!r}")
        task.entry = entry

    def task_get_entry(self, task: Task) -> str:
        return _check_active(task).entry

    # -- port interface (Table 3-2) ----------------------------------------------------
    def port_allocate(self, task: Task) -> int:
        return mach_port.port_allocate(_check_active(task).space)

    def port_deallocate(self, task: Task, name: int) -> None:
        mach_port.port_deallocate(_check_active(task).space, name)

    def port_enable(self, task: Task, name: int) -> None:
        mach_port.port_enable(_check_active(task).space, name)

    def port_disable(self, task: Task, name: int) -> None:
        mach_port.port_disable(_check_active(task).space, name)

    def port_messages(self, task: Task) -> tuple[int, ...]:
        return mach_port.port_messages(_check_active(task).space)

    def port_status(self, task: Task, name: int) -> tuple[bool, int, int, bool, bool]:
        s = mach_port.port_status(_check_active(task).space, name)
        return s.unrestricted, s.num_msgs, s.backlog, s.receiver, s.owner

    def port_set_backlog(self, task: Task, name: int, backlog: int) -> None:
        mach_port.port_set_backlog(_check_active(task).space, name, backlog)

    def port_extract_right(self, task: Task, name: int, disposition: int) -> KPort:
        return mach_port.port_extract_right(_check_active(task).space, name, disposition)

    def port_insert_right(self, task: Task, name: int, right: KPort) -> None:
        mach_port.port_insert_right(_check_active(task).space, name, right)

    def port_names(self, task: Task) -> tuple[tuple[int, ...], tuple[int, ...]]:
        entries = sorted(_check_active(task).space.names.items())
        types = tuple(PORT_TYPE_SEND * e.send + PORT_TYPE_RECEIVE * e.receive
                      + PORT_TYPE_OWN * e.owner for _, e in entries)
        return tuple(name for name, _ in entries), types

    # -- thread interface --------------------------------------------------------------
    def thread_terminate(self, thread: Thread) -> None:
        self.kernel.thread_terminate_locked(_check_thread(thread))

    def thread_suspend(self, thread: Thread) -> None:
        _check_thread(thread).suspend_count += 1
        thread.task.host.thread_alert(thread)

    def thread_resume(self, thread: Thread) -> None:
        if _check_thread(thread).suspend_count == 0:
            raise MachError("KERN_FAILURE", f"thread {thread.name!r} is not suspended")
        thread.suspend_count -= 1
        self.kernel.sched.thread_wakeup(thread.suspend_waitq)

    def thread_info(self, thread: Thread) -> tuple[str, str, int]:
        return thread.name, thread.state, thread.suspend_count

    def thread_get_special_port(self, thread: Thread, which: int) -> Port | None:
        _check_thread(thread)
        if _check_int(which, "which_port") == THREAD_KERNEL_PORT:
            return thread.port
        if which != THREAD_REPLY_PORT:
            raise MachError("KERN_INVALID_ARGUMENT", f"no thread special port {which}; use "
                            f"THREAD_KERNEL_PORT ({THREAD_KERNEL_PORT}) or THREAD_REPLY_PORT "
                            f"({THREAD_REPLY_PORT})")
        entry = thread.task.space.names.get(thread.reply_name) if thread.reply_name else None
        return entry.port if entry is not None and entry.receive else None

    # -- host interface ----------------------------------------------------------------
    def host_info(self, kernel: Kernel) -> tuple[int, int, int, int, bool]:
        threads = sum(len(t.threads) for t in kernel.tasks.values())
        return (kernel.page_size, kernel.memory_size, len(kernel.tasks), threads,
                kernel.sched.deterministic)

    def host_report(self, kernel: Kernel, what: str, task: str) -> str:
        return report_json(kernel, what, task)

    def task_for_id(self, kernel: Kernel, task_id: int) -> Port | None:
        task = kernel.tasks.get(_check_int(task_id, "task_id"))
        if task is None or not task.active or task.map is None:
            raise MachError("KERN_INVALID_TASK", f"no live task has id {task_id}")
        caller = current_thread().task
        if caller.uid != task.uid:
            raise MachError("KERN_PROTECTION_FAILURE", f"task {task_id} is uid {task.uid}'s, "
                            f"not the caller's (uid {caller.uid})")
        return task.port

    def host_kernel_version(self, kernel: Kernel) -> str:
        return f"pymach {__version__} (embedded kernel, {kernel.sched.__class__.__name__})"


def _check_thread(thread: Thread) -> Thread:
    if thread.done or thread.terminating:
        raise MachError("KERN_INVALID_ARGUMENT", f"thread {thread.name!r} has terminated")
    return thread


__all__ = ["KernelServer", "current_thread", "kobject_server"]
