"""machd: the per-host daemon of native mode. One kernel core; tasks are processes.

machd runs the same kernel as the embedded mode (ipc/, kern/, vm/) with the uffd pmap.
Every thread of a native task process has its own connection; on machd's side it is
served by a kernel `Thread` of that task whose Python thread runs `serve_remote`: it
executes the process thread's traps (msg_send, msg_receive, msg_rpc, the identity
calls) as that Mach thread, and resolves the page faults the process thread takes
(read from the task's userfaultfd by the fault poller, `faults.py`). So every Mach
call of a native task is the embedded kernel's code running on the task's behalf, with
the same rights checks and errors; the reply carries the address-space changes the
process must apply (native_map.py).

A process attaches (`pymach exec`, or `pymach.libmach.task.attach`) and becomes a new
task; thread_create on a native task starts a thread in its process over the process's
control connection, or, for a task with no process yet (task_create), a new process
(`taskproc.py`). A task ends when its process ends; a process that machd must end
(task_terminate, a memory error) is killed. See the README, "Native mode".

Registries below are guarded by `self.lock` (a leaf lock); kernel state by the kernel
lock, as everywhere.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from pymach.errors import MachError
from pymach.include.message import Code
from pymach.kern.host import Kernel
from pymach.kern.task import Task
from pymach.kern.thread import Thread, running_thread
from pymach.machd.protocol import DEFAULT_SOCKET, Connection, Disconnected, close_fds
from pymach.pmap.uffd import Uffd, probe

log = logging.getLogger("pymach.machd")


class MachdError(Exception):
    """machd cannot start; the message says why and what to do."""


@dataclass
class Process:
    """machd's record of one native task's process."""

    task: Task
    pid: int
    control: Connection | None = None
    uffd: Uffd | None = None  # (Machd.lock once attached)
    sys_path: list[str] = field(default_factory=list)
    cwd: str = ""
    main: str = ""  # the script run as __main__, for callables pickled by reference
    popen: subprocess.Popen[bytes] | None = None
    alive: bool = True
    detaching: bool = False  # it asked to stop being a task: do not kill it
    exited: bool = False  # it is gone already: nothing to kill (its pid may be reused)
    stdio: list[int] = field(default_factory=list)  # (Machd.lock) its stdout, stderr
    why: str = ""  # the diagnostic it is ended with, if machd ends it


class Machd:
    """The daemon (see module docstring)."""

    def __init__(self, socket_path: str = DEFAULT_SOCKET, memory_size: int = 1 << 30,
                 page_size: int = 4096, swap_dir: str | None = None,
                 swap_size: int | None = None, pager_timeout_ms: float | None = None,
                 pager_timeout_action: str = "error", pager_cluster_pages: int = 16) -> None:
        reason = probe()
        if reason:
            raise MachdError(f"machd needs userfaultfd: {reason}")
        self.socket_path = socket_path  # immutable
        self.kernel = Kernel(name="machd", pmap="uffd", memory_size=memory_size,
                             page_size=page_size, swap_dir=swap_dir, swap_size=swap_size,
                             pager_timeout_ms=pager_timeout_ms,
                             pager_timeout_action=pager_timeout_action,
                             pager_cluster_pages=pager_cluster_pages)  # immutable
        self.lock = threading.Lock()
        self.pending: dict[str, Thread] = {}  # token -> a thread awaiting its process
        self.processes: dict[int, Process] = {}  # task serial -> its process
        self.listener: socket.socket | None = None
        self.running = False
        from pymach.machd.faults import FaultPoller

        self.poller = FaultPoller(self)

    # -- lifetime -----------------------------------------------------------------------
    def start(self) -> None:
        """Boot the kernel and listen (returns; serving runs in threads)."""
        self.listener = _listen(self.socket_path)
        self.kernel.boot_headless()
        self.kernel.native_host = self
        self.running = True
        self.poller.start()
        threading.Thread(target=self._accept_loop, name="machd.accept", daemon=True).start()
        log.info("machd listening on %s (memory %d MiB, page size %d)", self.socket_path,
                 self.kernel.memory_size >> 20, self.kernel.page_size)

    def stop(self) -> None:
        """End every native task, shut the kernel down, remove the socket."""
        if not self.running:
            return
        self.running = False
        if self.listener is not None:
            self.listener.close()
        with self.lock:
            procs = list(self.processes.values())
        for p in procs:
            self.kill(p, "machd is shutting down")
        self.poller.stop()
        self.kernel.shutdown()
        with contextlib.suppress(OSError):
            os.unlink(self.socket_path)
        log.info("machd stopped")

    def _accept_loop(self) -> None:
        assert self.listener is not None
        while self.running:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._greet, args=(Connection(sock),), daemon=True,
                             name="machd.greet").start()

    # -- new connections ----------------------------------------------------------------
    def _greet(self, conn: Connection) -> None:
        """Read a connection's first frame and hand it to what it asks for."""
        try:
            hello, fds = conn.recv()
            op = hello.get("op")
            if op == "attach":
                self._attach(conn, hello, fds)
            elif op == "thread":
                self._bind_thread(conn, hello, fds)
            elif op == "control":
                self._bind_control(conn, hello, fds)
            elif op == "ping":  # a task checking that machd still lives
                conn.send({"ok": True})
                conn.close()
            else:
                conn.send({"err": ("KERN_INVALID_ARGUMENT", f"unknown hello {op!r}")})
                conn.close()
        except Disconnected:
            conn.close()
        except MachError as e:
            with contextlib.suppress(Disconnected):
                conn.send({"err": (e.code, e.detail)})
            conn.close()

    def _attach(self, conn: Connection, hello: dict[str, Any], fds: list[int]) -> None:
        """A process becomes a new task (a child of the bootstrap task)."""
        k = self.kernel
        with k.sched.lock:
            boot = next(t for t in k.tasks.values() if t.name == "bootstrap")
            task = k.task_create_locked(boot, False, hello.get("name") or "", native=True)
            thread = k.thread_create_locked(task, None, f"{task.name}.main", start=False)
        self._new_process(task, hello, fds)
        self._run_thread(thread, conn, hello)

    def _bind_thread(self, conn: Connection, hello: dict[str, Any], fds: list[int]) -> None:
        """A process thread connects for a thread made by thread_create."""
        with self.lock:
            thread = self.pending.pop(hello.get("token", ""), None)
        if thread is None:
            close_fds(fds)
            raise MachError("KERN_INVALID_ARGUMENT", "no thread waits for that token")
        if hello.get("first"):  # a new process for a task made by task_create
            self._new_process(thread.task, hello, fds)
        self._run_thread(thread, conn, hello)

    def _bind_control(self, conn: Connection, hello: dict[str, Any], fds: list[int]) -> None:
        """A process opens its control connection, handing over its stdout and stderr
        (the processes of the tasks it creates write there, as a forked child would)."""
        with self.lock:
            proc = self.processes.get(hello.get("task", -1))
        if proc is None or proc.pid != hello.get("pid"):
            close_fds(fds)
            raise MachError("KERN_INVALID_TASK", "no such native task process")
        self.set_stdio(proc.task, fds)
        proc.control = conn
        conn.send({"ok": True})
        threading.Thread(target=self._watch_control, args=(proc,), daemon=True,
                         name=f"machd.control.{proc.task.name}").start()

    def _new_process(self, task: Task, hello: dict[str, Any], fds: list[int]) -> None:
        """Record a task's process and take its userfaultfd."""
        if len(fds) != 1:
            close_fds(fds)
            raise MachError("KERN_INVALID_ARGUMENT", "a process attaches with its userfaultfd")
        uffd = Uffd(fds[0])
        proc = Process(task, int(hello.get("pid", 0)), uffd=uffd,
                       sys_path=list(hello.get("sys_path", [])), cwd=hello.get("cwd", ""),
                       main=hello.get("main", ""))
        with self.kernel.sched.lock:
            task.process = proc
            assert task.map is not None
            pmap: Any = task.map.pmap
            pmap.uffd = uffd
            task.map.native.everything(task.map)  # the process maps what the task has
        with self.lock:
            self.processes[task.serial] = proc
        self.poller.add(proc)

    def _run_thread(self, thread: Thread, conn: Connection, hello: dict[str, Any]) -> None:
        """Start the kernel thread that serves this process thread, and answer hello."""
        from pymach.machd.remote import serve_remote

        code = thread.code
        thread.remote = conn
        thread.native_tid = int(hello.get("tid", 0))
        thread.code = Code(serve_remote, (self, thread, conn, code))
        with self.kernel.sched.lock:
            thread.start()

    # -- threads of native tasks -----------------------------------------------------------
    def remote_thread(self, thread: Thread) -> None:
        """thread_create on a native task (kernel lock held): start it in the process."""
        token = uuid.uuid4().hex
        thread.state = "running"  # runnable now, as in the embedded kernel; its process
        with self.lock:  # thread connects in a moment
            self.pending[token] = thread
        proc: Process | None = thread.task.process
        if proc is not None and proc.alive and proc.control is not None:
            try:
                proc.control.send({"op": "start_thread", "token": token})
                return
            except Disconnected:
                proc.alive = False
        self._spawn(thread.task, token)

    def _spawn(self, task: Task, token: str) -> None:
        """Start a process for a task that has none (task_create, then thread_create)."""
        parent = task.parent.process if task.parent is not None else None
        env = dict(os.environ)
        if parent is not None and parent.sys_path:
            env["PYTHONPATH"] = os.pathsep.join(p for p in parent.sys_path if p)
        argv = [sys.executable, "-m", "pymach.libmach.taskproc", self.socket_path, token]
        if parent is not None and parent.main:
            argv.append(parent.main)
        with self.lock:  # the parent's stdout and stderr (as a forked child would have)
            stdio = [os.dup(fd) for fd in parent.stdio] if parent is not None else []
        try:
            out, err = stdio if len(stdio) == 2 else (None, None)
            popen = subprocess.Popen(argv, env=env, cwd=(parent.cwd if parent else None) or None,
                                     stdout=out, stderr=err)
        finally:
            close_fds(stdio)
        task.process = Process(task, popen.pid, popen=popen)  # replaced when it attaches

    # -- ending processes -----------------------------------------------------------------
    def _watch_control(self, proc: Process) -> None:
        """The control connection closes when the process ends: end the task then. A
        process may also detach: the task ends and the process goes on."""
        assert proc.control is not None
        while True:
            try:
                request, fds = proc.control.recv()
            except Disconnected:
                break
            close_fds(fds)
            if request.get("op") == "detach":
                proc.detaching = True
                self.process_gone(proc, "its process detached")
                proc.control.close()
                return
        proc.exited = True
        self.process_gone(proc, "its process exited")

    def process_gone(self, proc: Process, why: str) -> None:
        """A task's process is gone: terminate the task (its ports, its memory)."""
        with self.kernel.sched.lock:
            if proc.task.active:
                log.info("task %s ends: %s", proc.task.name, why)
                proc.task.terminate()  # calls task_terminated
        self.task_terminated(proc.task)
        with self.lock:  # this may run twice (a kill, then the connection closing)
            uffd, proc.uffd = proc.uffd, None
            stdio, proc.stdio = proc.stdio, []
        if uffd is not None:
            uffd.close()
        close_fds(stdio)

    def task_terminated(self, task: Task) -> None:
        """A native task was terminated (kernel lock held): end its process, whose
        connections then close. Nothing here takes the kernel lock. The process is told
        why (it prints that and exits); if it has not exited after a grace period it is
        killed."""
        proc = task.process
        if proc is None or not proc.alive:
            return
        proc.alive = False
        self.poller.remove(proc)
        told = False
        pidfd = _pidfd(proc.pid) if proc.pid and not proc.detaching and not proc.exited else -1
        if pidfd >= 0 and proc.control is not None:
            me = running_thread()
            why = proc.why or ("" if me is not None and me.task is task else "task_terminate")
            if why:
                self._tell(proc, f"pymach: task {task.name!r} ended by machd: {why}\n")
            with contextlib.suppress(Disconnected, OSError):
                proc.control.send({"op": "die", "why": why})  # "": it ended itself
                told = True
        threading.Thread(target=_end_process, args=(pidfd, proc.popen, 2.0 if told else 0.0),
                         daemon=True, name=f"machd.end.{task.name}").start()
        with self.lock:
            self.processes.pop(task.serial, None)

    def set_stdio(self, task: Task, fds: list[int]) -> None:
        """Take a task's stdout and stderr (received fds): its children's go there."""
        proc = task.process
        if proc is None or len(fds) != 2:
            close_fds(fds)
            return
        with self.lock:
            old, proc.stdio = proc.stdio, fds
        close_fds(old)

    def _tell(self, proc: Process, text: str) -> None:
        """Write a diagnostic to a task's stderr ourselves: its process may be unable
        to (a thread stuck in a fault while holding the GIL)."""
        with self.lock:
            if len(proc.stdio) == 2:
                with contextlib.suppress(OSError):
                    os.write(proc.stdio[1], text.encode())

    def kill(self, proc: Process, why: str) -> None:
        """End a task and its process with a diagnostic (a memory error, shutdown)."""
        proc.why = why
        self.process_gone(proc, why)


def _pidfd(pid: int) -> int:
    """A pidfd for `pid`, or -1 if it is gone (taken before signalling: no pid reuse)."""
    try:
        return os.pidfd_open(pid)
    except OSError:
        return -1


def _end_process(pidfd: int, popen: subprocess.Popen[bytes] | None, grace: float) -> None:
    """Wait up to `grace` seconds for a process told to die, then SIGKILL it; reap it if
    machd started it."""
    if pidfd >= 0:
        try:
            ready, _, _ = select.select([pidfd], [], [], grace)
            if not ready:
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        finally:
            os.close(pidfd)
    if popen is not None:
        popen.wait()


def _listen(path: str) -> socket.socket:
    """Bind the daemon's socket, refusing if a live machd already listens there."""
    if os.path.exists(path):
        probe_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe_sock.connect(path)
        except OSError:
            os.unlink(path)  # a stale socket of a machd that died
        else:
            probe_sock.close()
            raise MachdError(f"a machd is already running at {path}")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(path)
        s.listen(64)
    except OSError as e:
        s.close()
        raise MachdError(f"cannot listen at {path}: {e.strerror} (choose another path "
                         f"with --socket)") from None
    return s


def run_machd(machd: Machd) -> int:
    """Serve in the foreground until SIGTERM or SIGINT; returns the exit status."""
    done = threading.Event()

    def stop(signum: int, frame: Any) -> None:
        done.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    machd.start()
    while not done.wait(0.5):
        pass
    machd.stop()
    return 0


def start_daemon(path: str, *options: str, timeout: float = 20.0) -> subprocess.Popen[bytes]:
    """Start `pymach machd --socket path *options` as a child process that ends with the
    caller; returns once it accepts connections (MachdError if it exits or does not
    start in time)."""
    import time

    proc = subprocess.Popen([sys.executable, "-m", "pymach.cli.main", "machd", "--socket",
                             path, "--log-level", "warning", *options],
                            preexec_fn=_die_with_parent)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise MachdError(f"machd exited with status {proc.returncode}")
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise MachdError(f"machd did not start within {timeout} s")


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the starting process dies (PR_SET_PDEATHSIG),
    so a test run or benchmark killed midway leaves no daemon behind."""
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)


def stop_daemon(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM a machd started by `start_daemon`; SIGKILL it if it does not exit."""
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
