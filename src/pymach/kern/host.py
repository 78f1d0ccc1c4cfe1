"""The embedded kernel: one host's tasks, threads, ports and scheduler in this process.

`boot()` starts a kernel and adopts the calling Python thread as the first thread of the
`bootstrap` task, so Mach calls work straight away; `Kernel.spawn`/`run` start a Python
callable as the first thread of a new task. Every Mach call passes through `trap`, the
kernel boundary: a scheduling point (deterministic mode), the place where suspension and
termination take effect, and the holder of the kernel lock.

Fields are guarded by the kernel lock (`sched.lock`) unless marked otherwise.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

from pymach.errors import MachError, ThreadTerminated
from pymach.include.message import MSG_SIZE_MAX, Code, check_timeout
from pymach.ipc.ipc_right import entry_deallocate, port_destroy
from pymach.ipc.kmsg import KMsg, ool_queued_limit
from pymach.ipc.port import Port
from pymach.ipc.space import PORT_NAMES_MAX, check_port_names_max
from pymach.kern.sched_prim import deadline_after, make_scheduler, thread_block
from pymach.kern.task import Task, TaskHost, check_spawn
from pymach.kern.thread import Thread, current_thread, set_current_thread

HARDWARE_PAGE = 4096


MIN_FRAMES = 16

# The default pager is a task above the kernel (pagers/default_pager.py), so the kernel
# does not import it: whoever boots a kernel gives it one, as `Kernel(default_pager=...)`
# or for every kernel with `install_default_pager`, which `pymach/__init__` calls with
# the stock pager. A start function creates the pager's task and thread (kernel lock
# held), sets `kernel.vm.default_pager_port`, and returns its backing store (closed at
# shutdown): start(kernel, swap_dir, max_pages or None).
DefaultPagerStart = Callable[["Kernel", str | None, int | None], Any]
_default_pager_start: DefaultPagerStart | None = None


def install_default_pager(start: DefaultPagerStart) -> None:
    """Make `start` the default pager of every kernel not given one (see above)."""
    global _default_pager_start
    _default_pager_start = start


TASKS_MAX_PER_USER = 1024  # live tasks of one uid (Kernel keyword)
THREADS_MAX_PER_TASK = 1024  # threads of one task (Kernel keyword)


def _positive(name: str, value: object) -> int:
    """A positive int configuration value, or KERN_INVALID_ARGUMENT naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise MachError("KERN_INVALID_ARGUMENT", f"{name} must be a positive int, not "
                        f"{value!r}")
    return value


def _check_config(page_size: int, memory_size: int, msg_size_max: int,
                  swap_size: int | None) -> None:
    for name, v in (("page_size", page_size), ("memory_size", memory_size),
                    ("msg_size_max", msg_size_max), ("swap_size", swap_size)):
        if v is None and name == "swap_size":
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise MachError("KERN_INVALID_ARGUMENT", f"{name} must be a positive int")
    if page_size % HARDWARE_PAGE:
        raise MachError("KERN_INVALID_ARGUMENT", f"page_size must be a multiple of "
                        f"{HARDWARE_PAGE}, not {page_size}")
    if memory_size % page_size or memory_size // page_size < MIN_FRAMES:
        raise MachError("KERN_INVALID_ARGUMENT", f"memory_size must be a multiple of "
                        f"page_size holding at least {MIN_FRAMES} pages")


class Kernel:
    """One embedded Mach host (see module docstring)."""

    def __init__(self, *, page_size: int = HARDWARE_PAGE, memory_size: int = 64 << 20,
                 seed: int = 0, deterministic: bool = False, msg_size_max: int = MSG_SIZE_MAX,
                 trace: bool | Callable[[str], None] = False, name: str = "host",
                 swap_dir: str | None = None, swap_size: int | None = None,
                 pmap: str = "soft", pager_timeout_ms: float | None = None,
                 pager_timeout_action: str = "error", pageout_deadline_ms: float = 1000.0,
                 manager_page_limit: int | None = None, pager_cluster_pages: int = 1,
                 read_ahead_pages: int | None = None,
                 port_names_max: int = PORT_NAMES_MAX,
                 ool_queued_max: int | None = None,
                 tasks_max_per_user: int = TASKS_MAX_PER_USER,
                 threads_max_per_task: int = THREADS_MAX_PER_TASK,
                 default_pager: DefaultPagerStart | None = None) -> None:
        _check_config(page_size, memory_size, msg_size_max, swap_size)
        self.default_pager = default_pager  # immutable; None: the installed one
        self.swap_dir = swap_dir  # immutable: where the default pager keeps its file
        self.swap_size = swap_size  # immutable: backing store limit in bytes (None: grows)
        self.swap_store: Any = None  # the default pager's BackingStore, once started
        self.name = name  # immutable
        self.page_size = page_size  # immutable
        self.memory_size = memory_size  # immutable
        self.msg_size_max = msg_size_max  # immutable
        # immutable: resource limits per task (ipc/space.py, ipc/kmsg.py)
        self.port_names_max = check_port_names_max(port_names_max)
        self.ool_queued_max = ool_queued_limit(ool_queued_max, memory_size, swap_size)
        self.tasks_max_per_user = _positive("tasks_max_per_user", tasks_max_per_user)
        self.threads_max_per_task = _positive("threads_max_per_task", threads_max_per_task)
        self.seed = seed  # immutable
        self.sched = make_scheduler(deterministic, seed)  # immutable
        self._serials: dict[str, Iterator[int]] = {}
        self.trace_log: list[str] = []
        self._t0 = self.sched.now()  # immutable: trace times are ms since boot
        self._trace = trace
        self.tasks: dict[int, Task] = {}
        self.running = True
        self.kernel_task = Task(self, None, "kernel", kernel_task=True)
        self.host_port = Port(self, "host")
        self.host_port.kobject = self
        self.host_port.receiver = self.host_port.owner = self.kernel_task
        from pymach.kern.ipc_kobject import KernelServer, served_subsystems
        from pymach.vm.vm_init import VmSystem

        self.server = KernelServer(self)
        self.vm = VmSystem(self, pmap)  # immutable
        self.vm.configure(pager_timeout_ms, pager_timeout_action, pageout_deadline_ms,
                          manager_page_limit, pager_cluster_pages, read_ahead_pages)
        self.served = served_subsystems(self)  # immutable

    # -- bookkeeping -------------------------------------------------------------------
    def new_serial(self, kind: str) -> int:
        """The next serial number for objects of `kind`, starting at 1 (per kernel)."""
        return next(self._serials.setdefault(kind, itertools.count(1)))

    @property
    def tracing(self) -> bool:
        """True if trace_event records anything (check before building costly text)."""
        return bool(self._trace)

    def trace_event(self, text: str) -> None:
        """Record one kernel event if tracing is on (kernel lock held)."""
        if self._trace:
            line = f"{self.sched.now() - self._t0:10.3f} {text}"  # ms since boot
            self.trace_log.append(line)
            if callable(self._trace):
                self._trace(line)

    def trap(self, thread: Thread) -> _Trap:
        """The kernel boundary for one Mach call by `thread` (a context manager)."""
        return _Trap(self, thread)

    def ast_check(self, thread: Thread) -> None:
        """At a kernel boundary: unwind if terminated, wait while suspended (lock held)."""
        while True:
            if thread.terminating:
                raise ThreadTerminated()
            if not (thread.suspend_count or thread.task.suspend_count):
                return
            thread.state = "suspended"
            try:
                thread_block(self.sched, thread, thread.suspend_waitq)
            finally:
                thread.state = "running"

    def kobject_server(self, kmsg: KMsg) -> None:
        """Serve a request sent to a kernel port (kernel lock held)."""
        from pymach.kern.ipc_kobject import kobject_server

        kobject_server(self, kmsg)

    # -- tasks and threads -----------------------------------------------------------
    def task_create_locked(self, parent: Task | None, inherit: bool, name: str = "",
                           host: TaskHost | None = None, uid: int | None = None) -> Task:
        """Create a task with no threads (kernel lock held), its threads run by `host`
        (default: its parent's; a child of a machd task is a process too), of user `uid`
        (default: its parent's). KERN_RESOURCE_SHORTAGE if that user has
        tasks_max_per_user tasks already."""
        owner = uid if uid is not None else (parent.uid if parent is not None else os.getuid())
        n = sum(1 for t in self.tasks.values() if t.uid == owner)
        if n >= self.tasks_max_per_user and parent is not None:
            raise MachError("KERN_RESOURCE_SHORTAGE", f"uid {owner} has {n} tasks, the "
                            f"limit (tasks_max_per_user)")
        task = Task(self, parent, name, inherit, host=host, uid=owner)
        self.tasks[task.serial] = task
        self.trace_event(f"task created {task.name} parent={parent.name if parent else '-'}")
        return task

    def thread_create_locked(self, task: Task, code: Code | None, name: str = "",
                             start: bool = True) -> Thread:
        """Create a thread in `task` running `code`, and start it unless `start` is False
        (kernel lock held). Its task's host runs it (a machd task: in its process).
        KERN_RESOURCE_SHORTAGE if the task has threads_max_per_task threads already."""
        if len(task.threads) >= self.threads_max_per_task:
            raise MachError("KERN_RESOURCE_SHORTAGE", f"task {task.name!r} has "
                            f"{len(task.threads)} threads, the limit (threads_max_per_task)")
        thread = Thread(task, code, name or f"{task.name}.{len(task.threads) + 1}")
        task.threads.append(thread)
        self.trace_event(f"thread created {thread.name}")
        if not start:
            return thread
        task.host.start_thread(thread)
        return thread

    def thread_terminate_locked(self, thread: Thread) -> None:
        """Mark `thread` terminated; it unwinds at its next kernel boundary. It leaves its
        task at once (as in Task.terminate), so task_threads and task_info agree."""
        thread.terminating = True
        if thread in thread.task.threads:
            thread.task.threads.remove(thread)
        if not thread.port.dead:
            port_destroy(thread.port)
        self.sched.thread_interrupt(thread)
        self.sched.thread_wakeup(thread.suspend_waitq)
        thread.task.host.thread_alert(thread)

    def thread_exited(self, thread: Thread) -> None:
        """Called by a thread's Python thread as it ends (lock not held)."""
        with self.sched.lock:
            thread.state = "halted"
            if thread in thread.task.threads:
                thread.task.threads.remove(thread)
            if not thread.port.dead:
                port_destroy(thread.port)
            self._release_reply_port(thread)
            self.trace_event(f"thread exited {thread.name}")
            if thread.ends_task:
                thread.task.terminate()
            self.sched.thread_wakeup(thread.done_waitq)
        self.sched.thread_end(thread)

    def _release_reply_port(self, thread: Thread) -> None:
        """A thread's MIG reply port dies with it (lock held)."""
        space = thread.task.space
        entry = space.names.get(thread.reply_name)
        if entry is not None and entry.receive and space.active:
            entry_deallocate(space, thread.reply_name)
        thread.reply_name = 0

    def spawn(self, fn: Callable[..., Any], *args: Any, name: str = "",
              inherit: bool = False, **kwargs: Any) -> TaskHandle:
        """Start `fn(*args, **kwargs)` as the first thread of a new task, child of the
        caller's task. The task ends when that thread returns (like a process's main).
        KERN_INVALID_ARGUMENT for a `fn` that is not callable or a bad `name`."""
        caller = current_thread()
        check_spawn(fn, name, inherit)
        with self.trap(caller):
            task = self.task_create_locked(caller.task, bool(inherit), name)
            thread = self.thread_create_locked(task, Code(fn, args, kwargs), start=False)
            thread.ends_task = True
            thread.start()
            task_name = caller.task.space.insert(task.port, send=True)  # type: ignore[arg-type]
        return TaskHandle(self, task, thread, task_name)

    def run(self, fn: Callable[..., Any], *args: Any, name: str = "",
            timeout: float | None = None, **kwargs: Any) -> Any:
        """Run `fn` as a new task's first thread and return its result (or raise its
        error); KERN_OPERATION_TIMED_OUT after `timeout` ms."""
        return self.spawn(fn, *args, name=name, **kwargs).result(timeout)

    # -- boot and shutdown -----------------------------------------------------------
    def start_vm(self) -> None:
        """Start the default pager task and the pageout daemon (6.2.2, 5.4)."""
        from pymach.vm.vm_pageout import start_pageout_daemon

        start = self.default_pager or _default_pager_start
        if start is None:
            raise MachError("KERN_FAILURE", "no default pager: pass Kernel(default_pager="
                            "...) or install one (import pymach does)")
        pages = None if self.swap_size is None else self.swap_size // self.page_size
        with self.sched.lock:
            self.swap_store = start(self, self.swap_dir, pages)
            start_pageout_daemon(self.vm)

    def adopt_boot_thread(self) -> Thread:
        """Make the calling Python thread the first thread of the `bootstrap` task."""
        with self.sched.lock:
            task = self.task_create_locked(None, False, "bootstrap")
            thread = self.thread_create_locked(task, None, "bootstrap.main", start=False)
            thread.state = "running"
            self.sched.thread_setrun(thread)
        set_current_thread(thread)
        self.sched.thread_begin(thread)
        return thread

    def boot_headless(self) -> Task:
        """Boot without adopting a thread: a `bootstrap` task with no threads, and the
        VM daemons. Drive the kernel from outside with `start_task` (multi-host runs)."""
        with self.sched.lock:
            task = self.task_create_locked(None, False, "bootstrap")
        self.start_vm()
        return task

    def start_task(self, fn: Callable[..., Any], *args: Any, name: str = "",
                   parent: Task | None = None, **kwargs: Any) -> ExternalHandle:
        """From any Python thread: run `fn` as the first thread of a new task (a child of
        `parent`, by default the bootstrap task, whose bootstrap port it inherits)."""
        with self.sched.lock:
            if parent is None:
                parent = next(t for t in self.tasks.values() if t.name == "bootstrap")
            task = self.task_create_locked(parent, False, name)
            thread = self.thread_create_locked(task, Code(fn, args, kwargs), start=False)
            thread.ends_task = True
            thread.start()
        return ExternalHandle(task, thread)

    def shutdown(self, boot_thread: Thread | None = None, join_timeout: float = 2.0) -> None:
        """Terminate every task, release all waiting threads, and join them briefly."""
        with self.sched.lock:
            self.running = False
            threads = [t for task in self.tasks.values() for t in task.threads]
            threads += self.kernel_task.threads  # the pageout daemon
            for task in list(self.tasks.values()):
                task.terminate()
            for t in self.kernel_task.threads:
                t.terminating = True
            self.sched.shutdown()
            for t in threads:
                self.sched.thread_interrupt(t)
                t.suspend_waitq.cond.notify_all()
                if t.wait_queue is not None:
                    t.wait_queue.cond.notify_all()
        for t in threads:
            if t is not boot_thread and t.py_thread is not None:
                t.py_thread.join(join_timeout)
        if self.swap_store is not None:
            self.swap_store.close()

    # -- reports -----------------------------------------------------------------------
    def ps(self) -> list[Any]:
        """Rows describing every task and its threads (see kern/report.py)."""
        from pymach.kern.report import ps

        return ps(self)

    def lsmp(self, task: Task | int | str) -> list[Any]:
        """Rows describing one task's port name space (see kern/report.py)."""
        from pymach.kern.report import lsmp

        return lsmp(self, task)

    def vmmap(self, task: Task | int | str) -> list[Any]:
        """Rows describing one task's regions and their objects (see vm/vm_report.py)."""
        from pymach.kern.report import find_task
        from pymach.vm.vm_report import vmmap

        with self.sched.lock:
            t = find_task(self, task)
            return [] if t.map is None else vmmap(t.map)

    def vm_stat(self) -> dict[str, int]:
        """Page counts and VM counters of this kernel (see vm/vm_report.py)."""
        from pymach.vm.vm_report import vm_stat

        with self.sched.lock:
            return vm_stat(self.vm)


class _Trap:
    """Context manager for one kernel entry and exit (see Kernel.trap)."""

    __slots__ = ("kernel", "thread")

    def __init__(self, kernel: Kernel, thread: Thread) -> None:
        self.kernel = kernel
        self.thread = thread

    def __enter__(self) -> None:
        kernel = self.kernel
        if self.thread.kernel is not kernel:
            raise MachError("KERN_INVALID_TASK", "this thread belongs to another kernel")
        kernel.sched.kernel_entry(self.thread)
        kernel.sched.lock.acquire()
        try:
            kernel.ast_check(self.thread)
        except BaseException:
            kernel.sched.lock.release()
            raise

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if et is None or isinstance(ev, MachError):  # a failed call returns, too
                self.kernel.ast_check(self.thread)
        finally:
            self.kernel.sched.lock.release()


class TaskHandle:
    """A task started by `Kernel.spawn`: its objects, its name, and the caller's port
    name for it (`port`)."""

    def __init__(self, kernel: Kernel, task: Task, thread: Thread, port: int) -> None:
        self.kernel = kernel
        self.task = task
        self.thread = thread
        self.port = port  # the spawning task's send right to the new task's port

    @property
    def name(self) -> str:
        """The task's name (spawn's `name=`, else ``taskN``)."""
        return self.task.name

    def result(self, timeout: float | None = None) -> Any:
        """Wait (timeout in ms) for the first thread to end; return or raise its outcome.
        KERN_OPERATION_TIMED_OUT (a TimeoutError too) if the timeout passes first."""
        caller = current_thread()
        timeout = check_timeout(timeout, "result")
        with self.kernel.trap(caller):
            deadline = deadline_after(self.kernel.sched, timeout)
            while not self.thread.done:
                if not thread_block(self.kernel.sched, caller, self.thread.done_waitq, deadline):
                    raise MachError("KERN_OPERATION_TIMED_OUT",
                                    f"task {self.task.name!r} did not finish in {timeout} ms")
        if self.thread.exception is not None:
            raise self.thread.exception
        return self.thread.result

    @property
    def done(self) -> bool:
        """True once the task's first thread has ended."""
        return self.thread.done


class ExternalHandle:
    """A task started by `Kernel.start_task`, waited for from outside the kernel."""

    def __init__(self, task: Task, thread: Thread) -> None:
        self.task = task
        self.thread = thread

    def wait(self, timeout: float | None = None) -> Any:
        """Wait (timeout in ms, as every pymach timeout) for the task's first thread;
        return or raise its outcome. KERN_OPERATION_TIMED_OUT (a TimeoutError too) if
        the timeout passes first."""
        assert self.thread.py_thread is not None
        timeout = check_timeout(timeout, "wait")
        self.thread.py_thread.join(None if timeout is None else timeout / 1000)
        if self.thread.py_thread.is_alive():
            raise MachError("KERN_OPERATION_TIMED_OUT", f"task {self.task.name!r} did not "
                            f"finish in {timeout:g} ms")
        if self.thread.exception is not None:
            raise self.thread.exception
        return self.thread.result


@contextmanager
def boot(**config: Any) -> Iterator[Kernel]:
    """Start an embedded kernel for the duration of a `with` block.

    Keywords: page_size (a multiple of 4096), memory_size (bytes of simulated physical
    memory), seed, deterministic, msg_size_max, trace (True to keep `kernel.trace_log`,
    or a callable per line), name, swap_dir (where the default pager's swap file goes;
    default: the system temporary directory), swap_size (bytes; default: unlimited).
    Data-manager policies (paper 6.2): pager_timeout_ms (how long a fault waits for a
    manager; default forever), pager_timeout_action ("error": KERN_MEMORY_ERROR, or
    "zero_fill"), pageout_deadline_ms (after which data written back to a manager that
    has not released it goes to the default pager), manager_page_limit (resident pages
    one manager's objects may hold), pager_cluster_pages (a fault asks the manager for
    up to this many pages at once, those not yet resident after the faulting one: of
    an external object, or of an internal one that the default pager holds; default 1),
    read_ahead_pages (read-ahead: while faults on an object come in order, each where
    the last request ended, each request asks for twice as many pages as the last, up
    to this many; default pager_cluster_pages, no growth; at most 1024).
    Limits per task: port_names_max (names in one task's port name space; default
    PORT_NAMES_MAX = 4096; port_allocate beyond it fails with KERN_NO_SPACE, a receive
    needing more names with RCV_IPC_SPACE), ool_queued_max (bytes of out-of-line memory a
    task's sent messages may hold in queues; default memory_size + swap_size, or four
    times memory_size with unlimited swap; beyond it msg_send fails with SEND_NO_BUFFER),
    threads_max_per_task (default 1024). Per user: tasks_max_per_user (live tasks of one
    uid, default 1024). Past either, task_create or thread_create fails with
    KERN_RESOURCE_SHORTAGE.
    default_pager: the function that starts the kernel's default pager (default: the
    installed one, pagers/default_pager.py).
    Inside the block the calling thread is the first thread of the `bootstrap` task.
    """
    from pymach.pmap import EMBEDDED_BACKENDS

    if config.get("pmap", "soft") not in EMBEDDED_BACKENDS:
        raise MachError("KERN_INVALID_ARGUMENT", f"pmap {config['pmap']!r} serves native "
                        f"tasks (processes) under machd, not threads of this process: "
                        f"use {', '.join(EMBEDDED_BACKENDS)} here, or `pymach machd`")
    kernel = Kernel(**config)
    try:
        previous = current_thread()
    except MachError:
        previous = None
    boot_thread = kernel.adopt_boot_thread()
    kernel.start_vm()
    try:
        yield kernel
    finally:
        kernel.shutdown(boot_thread)
        set_current_thread(previous)
