"""Tasks: the unit of resource allocation, holding threads and a port name space (3.1).

A task is represented by its task port (a kernel port whose kobject is the Task); anyone
holding a send right to it can operate on the task. A new task's space holds a send right
to its own task port (`task_self()`), all rights to its notify port (where the kernel
sends it notifications), and a send right to its parent's bootstrap port, if any.

It also has an address space (`map`, section 5.1), made empty or inherited from the
parent's regions by task_create.

Fields are guarded by the kernel lock. Invariant: an inactive task has no threads left
running Mach code, an empty space, no address space and a dead task port.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Protocol

from pymach.errors import MachError
from pymach.include.message import is_utf8
from pymach.ipc.ipc_right import port_destroy, space_destroy
from pymach.ipc.mach_port import port_allocate
from pymach.ipc.port import Port
from pymach.ipc.space import IpcSpace
from pymach.kern.sched_prim import WaitQueue
from pymach.vm.vm_map import VmMap, vm_map_deallocate

if TYPE_CHECKING:
    from pymach.kern.host import Kernel
    from pymach.kern.thread import Thread


TASK_NAME_MAX = 64  # characters in a task's name (task_set_name, spawn)


def check_task_name(name: object, empty_ok: bool = True) -> str:
    """A task name as spawn and task_set_name take it: text of at most TASK_NAME_MAX
    characters with a UTF-8 form (empty only with `empty_ok`: a name made from the
    task's serial); KERN_INVALID_ARGUMENT otherwise."""
    if (not isinstance(name, str) or len(name) > TASK_NAME_MAX or not is_utf8(name)
            or not (name or empty_ok)):
        raise MachError("KERN_INVALID_ARGUMENT", f"a task name is text of "
                        f"{0 if empty_ok else 1} to {TASK_NAME_MAX} characters, not "
                        f"{name!r:.80}")
    return name


def check_spawn(fn: object, name: object, inherit: object) -> None:
    """What `spawn` checks before it creates anything: KERN_INVALID_ARGUMENT unless `fn`
    is callable, `name` a task name (check_task_name) and `inherit` a bool (or 0 or 1)."""
    if not callable(fn):
        raise MachError("KERN_INVALID_ARGUMENT", f"spawn needs a callable, not {fn!r:.40}")
    check_task_name(name)
    if not isinstance(inherit, int) or inherit not in (0, 1):
        raise MachError("KERN_INVALID_ARGUMENT", f"inherit must be a bool, not "
                        f"{inherit!r:.40}")


class TaskHost(Protocol):
    """Where a task's threads run: in this process (`LOCAL_TASKS`), or in a process of
    the task's own that a daemon serves (machd). A task has its creator's host."""

    def start_thread(self, thread: Thread) -> None:
        """Run a new thread of a task of this host (kernel lock held)."""
        ...

    def task_terminated(self, task: Task) -> None:
        """A task of this host was terminated (kernel lock held)."""
        ...

    def thread_alert(self, thread: Thread) -> None:
        """`thread` was suspended or terminated (kernel lock held): if it may be waiting
        where the kernel cannot wake it (machd: a receive on a direct channel, in its
        process), make it enter the kernel."""
        ...


class LocalTaskHost:
    """Threads of this process: each Mach thread is a Python thread here."""

    def start_thread(self, thread: Thread) -> None:
        """Start the thread's Python thread."""
        thread.start()

    def task_terminated(self, task: Task) -> None:
        """Nothing outside this process to end."""

    def thread_alert(self, thread: Thread) -> None:
        """Every wait of a thread here is in the kernel: nothing to do."""


LOCAL_TASKS = LocalTaskHost()


class Task:
    """A Mach task (see module docstring)."""

    def __init__(self, kernel: Kernel, parent: Task | None, name: str, inherit: bool = False,
                 kernel_task: bool = False, host: TaskHost | None = None,
                 uid: int | None = None) -> None:
        self.kernel = kernel  # immutable
        self.serial = kernel.new_serial("task")  # immutable
        self.name = name or f"task{self.serial}"  # immutable
        self.parent = parent  # immutable
        self.inherit = inherit  # immutable; used by the VM system at creation
        self.active = True
        self.suspend_count = 0
        self.threads: list[Thread] = []
        self.space = IpcSpace(self, kernel.sched.lock)
        self.exit_waitq = WaitQueue(kernel.sched.lock, f"task{self.serial}.exit")
        self.port: Port | None = None
        self.notify_port: Port | None = None
        self.bootstrap_port: Port | None = None
        self.self_name = self.notify_name = self.bootstrap_name = 0
        self.map: VmMap | None = None  # the address space (none for the kernel task)
        self.unthrottled = False  # set once: its sends ignore backlogs (netmsgserver)
        self.host: TaskHost = host or (parent.host if parent is not None else LOCAL_TASKS)
        # immutable: where its threads run
        self.uid: int = uid if uid is not None else (
            parent.uid if parent is not None else os.getuid())  # immutable: its user
        # (machd gives an attached task its SO_PEERCRED uid; a child has its parent's)
        self.process: Any = None  # owned by its host: machd's record of its process
        self.entry = ""  # its entry point for migration (task_set_entry); "": none
        if not kernel_task:
            self._make_ports(parent)
            self.map = self._make_map(parent, inherit)

    def _make_map(self, parent: Task | None, inherit: bool) -> VmMap:
        """An empty address space, or one inherited from the parent's regions (3.3),
        in the window the machine gives task maps (pmap contract)."""
        from pymach.vm.vm_map_copy import vm_map_fork

        vm = self.kernel.vm
        window = vm.phys.task_window
        vmap = VmMap(vm, vm.phys.pmap_create(), *window) if window else VmMap(
            vm, vm.phys.pmap_create())
        if inherit and parent is not None and parent.map is not None:
            vm_map_fork(vm, parent.map, vmap)
        return vmap

    def _make_ports(self, parent: Task | None) -> None:
        self.port = Port(self.kernel, f"task:{self.name}")
        self.port.kobject = self
        self.port.receiver = self.port.owner = self.kernel.kernel_task
        self.self_name = self.space.insert(self.port, send=True)
        self.notify_name = port_allocate(self.space, f"notify:{self.name}")
        self.notify_port = self.space.names[self.notify_name].port
        if parent is not None and parent.bootstrap_port is not None:
            self.set_bootstrap(parent.bootstrap_port)

    def set_bootstrap(self, port: Port | None) -> None:
        """Make `port` the task's bootstrap port and give the task a send right to it."""
        self.bootstrap_port = port
        alive = port is not None and not port.dead
        self.bootstrap_name = self.space.insert(port, send=True) if alive else 0  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"<Task {self.serial} {self.name}{'' if self.active else ' (dead)'}>"

    def terminate(self) -> None:
        """task_terminate: end every thread, give up every right, destroy the task port."""
        if not self.active:
            return
        self.active = False
        threads, self.threads = self.threads, []  # gone at once; each unwinds on its own
        for thread in threads:
            thread.terminating = True
            if thread.port is not None:
                port_destroy(thread.port)
            self.kernel.sched.thread_interrupt(thread)
            self.host.thread_alert(thread)
        space_destroy(self.space)
        if self.map is not None:
            vm_map_deallocate(self.map)
            self.map = None
        if self.port is not None:
            port_destroy(self.port)
        self.kernel.tasks.pop(self.serial, None)
        self.kernel.sched.thread_wakeup(self.exit_waitq)
        self.kernel.trace_event(f"task terminated {self.name}")
        self.host.task_terminated(self)  # a process of its own must end too

    def is_suspended(self) -> bool:
        """True while the task's suspend count is positive."""
        return self.suspend_count > 0
