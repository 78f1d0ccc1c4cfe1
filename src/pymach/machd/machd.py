"""machd: the per-host daemon of native mode. One kernel core; tasks are processes.

machd runs the same kernel as the embedded mode (ipc/, kern/, vm/) with the uffd pmap.
Every thread of a native task process has its own connection; on machd's side it is
served by a kernel `Thread` of that task whose Python thread runs `serve_remote`
(remote.py): it executes the process thread's traps as that Mach thread, and resolves
the page faults the process thread takes (read from the task's userfaultfd by the fault
poller, `faults.py`). The reply carries the address-space changes the process must
apply (pmap/native_map.py).

The boundary (README, "Security model"): machd's socket lives in a directory only its
user can enter; each connection's uid and pid come from SO_PEERCRED, and by default
only machd's own user is served (`allow_uids` adds others). A connection must send a
valid hello (include/traps.py) within `hello_timeout` before anything is created, and
it becomes a task (HELLO_ATTACH, with the process's userfaultfd), a thread (HELLO_THREAD,
with a single-use token machd handed out) or a process's control connection
(HELLO_CONTROL, with the token its first thread's welcome carried); tokens are checked
against the connecting pid, so no frame can name another task, process or connection.
Every frame is the typed wire (include/wire.py): nothing is unpickled here. Connections
pending a hello, connections and processes per user are bounded (`Limits`).

A task ends when its process ends; a process that machd must end (task_terminate, a
memory error) is told why and then killed. A process machd starts (task_create, then
thread_create) runs as the task's user. See the README, "Native mode".

With a `network` (net/tcp.py), machd joins a cluster: its kernel gets a netmsgserver
over TCP with mutual TLS (net/station.py), whose service port is the bootstrap port of
every native task, so tasks on different hosts find each other through netname and
talk through proxies. See the README, "Network over TCP".

Registries below are guarded by `self.lock` (a leaf lock); kernel state by the kernel
lock, as everywhere.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import pwd
import secrets
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pymach.errors import MachError
from pymach.include import traps, wire
from pymach.include.channel import (
    Channel,
    Disconnected,
    Frame,
    PeerCred,
    close_fds,
    default_socket_path,
)
from pymach.include.message import Code
from pymach.kern.host import Kernel
from pymach.kern.task import Task
from pymach.kern.thread import Thread, running_thread
from pymach.machd.channels import ChannelTable
from pymach.machd.faults import FaultPoller
from pymach.machd.remote import (
    RemoteState,
    TaskEnv,
    check_frame,
    refuse_thread,
    serve_remote,
    task_env,
)
from pymach.net.netmsgserver import NetMsgServer
from pymach.net.station import start_migration_server, start_netmsgserver
from pymach.net.tcp import TcpConfig, TcpTransport, address_text
from pymach.pmap.uffd import Uffd, probe

log = logging.getLogger("pymach.machd")

# The cyclic collector's thresholds in machd (gc.set_threshold): machd keeps a few
# objects per resident page, so with Python's default (700 allocations) the collector
# ran every few hundred pages of a stream and took about 15% of machd's time
# (1 GiB read from a Python pager, 4 KiB pages: 0.21 -> 0.25 GB/s with these).
GC_THRESHOLD = (100_000, 10, 10)
HELLOS = (traps.HELLO_ATTACH, traps.HELLO_THREAD, traps.HELLO_CONTROL, traps.HELLO_PING)


class MachdError(Exception):
    """machd cannot start; the message says why and what to do."""


@dataclass(frozen=True)
class Limits:
    """What one user's connections may make machd hold (machd options; README)."""

    hello_timeout: float = 5.0  # seconds a new connection has to send a valid hello
    max_pending: int = 64  # connections waiting for their hello, all users together
    max_connections_per_user: int = 1024  # thread and control connections of one user
    max_processes_per_user: int = 256  # task processes of one user at once


@dataclass
class Process:
    """machd's record of one native task's process."""

    task: Task
    pid: int  # from SO_PEERCRED (or the child machd started)
    uid: int  # from SO_PEERCRED (or the task's user, for a child machd started)
    control: Channel | None = None
    uffd: Uffd | None = None  # (Machd.lock once attached); machd's alone
    env: TaskEnv = field(default_factory=TaskEnv)
    control_token: bytes = b""  # what its control connection must present
    pidfd: int = -1  # (Machd.lock) the process itself: watched for its exit, signalled
    popen: subprocess.Popen[bytes] | None = None
    alive: bool = True
    detaching: bool = False  # it asked to stop being a task: do not kill it
    exited: bool = False  # it is gone already: nothing to kill (its pid may be reused)
    stdio: list[int] = field(default_factory=list)  # (Machd.lock) its stdout, stderr
    why: str = ""  # the diagnostic it is ended with, if machd ends it


READ_AHEAD_BYTES = 16 << 20  # machd's default read-ahead: requests grow to 16 MiB
# (1024 4 KiB pages, the cap; 8 pages of 2 MiB). Measured with 2 MiB pages and 4-page
# clusters: a pager that keeps its buffer and one that makes a new one per request both
# stream faster with 16 MiB requests than with 8 MiB; past glibc's 32 MiB mmap threshold
# the second one's buffers are new memory every time, and it slows down.


def default_read_ahead(pages: int | None, cluster: int, page_size: int) -> int | None:
    """machd's read-ahead (Kernel's read_ahead_pages): `pages` if given, else as many
    pages as READ_AHEAD_BYTES holds (at most 1024), and never fewer than `cluster`
    (with 2 MiB pages: 8, or the cluster if larger); with a cluster of 1 (clustering off: a
    page a request) none. A bad `pages` is left for the kernel to refuse."""
    if pages is not None:
        return pages
    if isinstance(cluster, bool) or not isinstance(cluster, int) or page_size <= 0:
        return None  # (the kernel refuses the cluster, or the page size)
    if cluster == 1:
        return 1
    return max(cluster, min(1024, READ_AHEAD_BYTES // page_size))


class Machd:
    """The daemon (see module docstring)."""

    def __init__(self, socket_path: str | None = None, memory_size: int = 1 << 30,
                 page_size: int = 4096, swap_dir: str | None = None,
                 swap_size: int | None = None, pager_timeout_ms: float | None = None,
                 pager_timeout_action: str = "error", pager_cluster_pages: int = 16,
                 read_ahead_pages: int | None = None, limits: Limits | None = None,
                 allow_uids: Iterable[int] = (),
                 network: TcpConfig | None = None, **kernel_limits: Any) -> None:
        reason = probe()
        if reason:
            raise MachdError(f"machd needs userfaultfd: {reason}")
        self.socket_path = socket_path or default_socket_path()  # immutable
        self.limits = limits or Limits()  # immutable
        self.allow_uids = frozenset({os.getuid(), *allow_uids})  # immutable
        self.kernel = Kernel(name="machd", pmap="uffd", memory_size=memory_size,
                             page_size=page_size, swap_dir=swap_dir, swap_size=swap_size,
                             pager_timeout_ms=pager_timeout_ms,
                             pager_timeout_action=pager_timeout_action,
                             pager_cluster_pages=pager_cluster_pages,
                             read_ahead_pages=default_read_ahead(
                                 read_ahead_pages, pager_cluster_pages, page_size),
                             **kernel_limits)  # immutable
        self.lock = threading.Lock()
        self.pending: dict[bytes, Thread] = {}  # token -> a thread awaiting its process
        self.processes: dict[int, Process] = {}  # task serial -> its process
        self.arrived: dict[int, TaskEnv] = {}  # migrated task serial -> where its process
        # is to start (lock; taken when it starts, dropped when the task ends)
        self.controls: dict[bytes, Process] = {}  # control token -> its process
        self.connections: Counter[int] = Counter()  # uid -> open connections
        self.greeting = 0  # connections still owing their hello
        self.listener: socket.socket | None = None
        self.network = network  # immutable: the cluster this host joins (None: none)
        self.netmsgserver: NetMsgServer | None = None
        self.running = False
        self.poller = FaultPoller(self)
        self.channels = ChannelTable()  # (kernel lock) direct channels between tasks

    # -- lifetime -----------------------------------------------------------------------
    def start(self) -> None:
        """Boot the kernel and listen (returns; serving runs in threads)."""
        self.listener = listen(self.socket_path, others=len(self.allow_uids) > 1)
        self.kernel.boot_headless()
        if self.network is not None:
            self._join(self.network)
        self.running = True
        self.poller.start()
        threading.Thread(target=self._accept_loop, name="machd.accept", daemon=True).start()
        log.info("machd listening on %s (memory %d MiB, page size %d, users %s)",
                 self.socket_path, self.kernel.memory_size >> 20, self.kernel.page_size,
                 sorted(self.allow_uids))

    def _join(self, network: TcpConfig) -> None:
        """Start the netmsgserver over TCP (before any task exists, so every task gets its
        service port as bootstrap port); MachdError, having cleaned up, if it cannot
        listen."""
        try:
            self.netmsgserver, _ = start_netmsgserver(self.kernel, TcpTransport(network))
            start_migration_server(self.kernel, self.netmsgserver, self.migrated_task)
        except OSError as e:
            assert self.listener is not None
            self.listener.close()
            self.kernel.shutdown()
            with contextlib.suppress(OSError):
                os.unlink(self.socket_path)
            raise MachdError(f"cannot listen for hosts at {address_text(network.listen)}: "
                             f"{e.strerror or e} (choose another --listen)") from None
        log.info("machd is host %r of a cluster (listening at %s, peers %s)", network.host,
                 address_text(network.listen),
                 ", ".join(map(address_text, network.peers)) or "none")

    def stop(self) -> None:
        """End every native task, leave the cluster, shut the kernel down, remove the
        socket."""
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
        if self.netmsgserver is not None:
            self.netmsgserver.transport.close()
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
            chan = Channel(sock)
            cred = self._admit(chan)
            if cred is None:
                chan.close()
                continue
            threading.Thread(target=self._greet, args=(chan, cred), daemon=True,
                             name="machd.greet").start()

    def _admit(self, chan: Channel) -> PeerCred | None:
        """The peer's credentials if it may connect now (counted), else None (logged)."""
        cred = chan.peer()
        with self.lock:
            if cred.uid not in self.allow_uids:
                why = f"uid {cred.uid} is not served (see --allow-user)"
            elif self.greeting >= self.limits.max_pending:
                why = f"{self.greeting} connections already owe their hello"
            elif self.connections[cred.uid] >= self.limits.max_connections_per_user:
                why = f"uid {cred.uid} has {self.connections[cred.uid]} connections"
            else:
                self.greeting += 1
                self.connections[cred.uid] += 1
                return cred
        log.warning("refused a connection from pid %d: %s", cred.pid, why)
        return None

    def connection_closed(self, uid: int) -> None:
        """One of `uid`'s connections has ended."""
        with self.lock:
            self.connections[uid] -= 1
            if self.connections[uid] <= 0:
                del self.connections[uid]

    # -- new connections ----------------------------------------------------------------
    def _greet(self, chan: Channel, cred: PeerCred) -> None:
        """Read a connection's hello (bounded in time and checked) and act on it; a bad
        or late hello closes the connection, having created nothing."""
        served = False
        try:
            frame = chan.recv(deadline=time.monotonic() + self.limits.hello_timeout,
                              max_body=traps.HELLO_MAX_BODY)
            try:
                check_frame(frame, lambda op: op in HELLOS)
                served = self._hello(chan, cred, frame)
            finally:
                frame.close_fds()
        except MachError as e:
            log.warning("hello from pid %d refused: %s", cred.pid, e)
            with contextlib.suppress(Disconnected, OSError):
                chan.send(traps.REPLY, [traps.REPLY_ERROR, None, e.code, e.detail, 0, 0, []])
        except (Disconnected, TimeoutError, OSError) as e:
            log.info("connection from pid %d ended before its hello: %s", cred.pid, e)
        finally:
            with self.lock:
                self.greeting -= 1
            if not served:
                chan.close()
                self.connection_closed(cred.uid)

    def _hello(self, chan: Channel, cred: PeerCred, frame: Frame) -> bool:
        """Dispatch a checked hello; True if the connection now belongs to a task."""
        if frame.op == traps.HELLO_PING:
            chan.send(traps.REPLY, [traps.REPLY_OK, None, "", "", 0, 0, []])
            return False
        if frame.op == traps.HELLO_CONTROL:
            self._hello_control(chan, cred, frame)
        elif frame.op == traps.HELLO_ATTACH:
            self._hello_attach(chan, cred, frame)
        else:
            self._hello_thread(chan, cred, frame)
        return True

    def _hello_attach(self, chan: Channel, cred: PeerCred, frame: Frame) -> None:
        """A process becomes a new task (a child of the bootstrap task) of its user."""
        name, tid = frame.values
        uffd = _take_uffd(frame, cred, tid)
        try:
            self._check_processes(cred.uid)
            k = self.kernel
            with k.sched.lock:
                boot = next(t for t in k.tasks.values() if t.name == "bootstrap")
                task = k.task_create_locked(boot, False, name[:64], host=self, uid=cred.uid)
                thread = k.thread_create_locked(task, None, f"{task.name}.main",
                                                start=False)
        except BaseException:
            uffd.close()
            raise
        proc = Process(task, cred.pid, cred.uid, pidfd=chan.peer_pidfd())
        self._new_process(proc, uffd)
        self._run_thread(thread, chan, tid, proc.control_token)

    def _hello_thread(self, chan: Channel, cred: PeerCred, frame: Frame) -> None:
        """A process thread connects for a thread made by thread_create, with the token
        machd gave that thread; the first thread of a process machd started brings the
        process's userfaultfd."""
        token, tid = frame.values
        with self.lock:
            thread = self.pending.get(token)
            proc: Process | None = thread.task.process if thread is not None else None
            if thread is None or proc is None or proc.pid != cred.pid or (
                    thread.task.uid != cred.uid):
                thread = None
            else:
                del self.pending[token]
        if thread is None or proc is None:
            raise MachError("KERN_INVALID_ARGUMENT", "no thread waits for that token from "
                            "this process")
        control = b""
        if proc.uffd is None:  # the first thread of a process machd started
            self._new_process(proc, _take_uffd(frame, cred, tid))
            control = proc.control_token
        elif frame.fds:
            raise wire.WireError("a thread of a running process brings no descriptors")
        self._run_thread(thread, chan, tid, control)

    def _hello_control(self, chan: Channel, cred: PeerCred, frame: Frame) -> None:
        """A process opens its control connection (token from its welcome), handing over
        its stdout and stderr (its children write there, as a forked child would)."""
        with self.lock:
            proc = self.controls.get(frame.values[0])
            if proc is None or proc.pid != cred.pid or proc.control is not None:
                proc = None
            else:
                del self.controls[frame.values[0]]
                proc.control = chan
        if proc is None:
            raise MachError("KERN_INVALID_TASK", "no native task process awaits that "
                            "control token from this process")
        if len(frame.fds) not in (0, 2):
            raise wire.WireError("a control hello brings 0 or 2 descriptors")
        self.set_stdio(proc.task, frame.fds)
        frame.fds = []
        chan.send(traps.REPLY, [traps.REPLY_OK, None, "", "", 0, 0, []])
        with self.lock:  # threads created before the process could be told of them
            waiting = [t for t, th in self.pending.items() if th.task is proc.task]
        for token in waiting:
            with contextlib.suppress(Disconnected, OSError):
                chan.send(traps.START_THREAD, [token])
        threading.Thread(target=self._watch_control, args=(proc,), daemon=True,
                         name=f"machd.control.{proc.task.name}").start()

    def _check_processes(self, uid: int) -> None:
        """KERN_RESOURCE_SHORTAGE if `uid` already has its limit of processes."""
        with self.lock:
            n = sum(1 for p in self.processes.values() if p.uid == uid)
        if n >= self.limits.max_processes_per_user:
            raise MachError("KERN_RESOURCE_SHORTAGE", f"uid {uid} has {n} task processes, "
                            f"the limit (--max-processes-per-user)")

    def _new_process(self, proc: Process, uffd: Uffd) -> None:
        """Record a task's process, take its userfaultfd, queue its whole map."""
        task = proc.task
        proc.uffd = uffd
        proc.control_token = secrets.token_bytes(16)
        with self.kernel.sched.lock:
            task.process = proc
            assert task.map is not None
            pmap: Any = task.map.pmap  # a UffdPmap
            pmap.uffd = pmap.binding.uffd = uffd
            pmap.binding.everything(task.map)  # the process maps what the task has
        with self.lock:
            self.processes[task.serial] = proc
            self.controls[proc.control_token] = proc
        self.poller.add(proc)
        timer = threading.Timer(self.limits.hello_timeout, self._control_due, (proc,))
        timer.daemon = True
        timer.start()

    def _control_due(self, proc: Process) -> None:
        """A process must open its control connection within the hello timeout."""
        if proc.control is None and proc.alive:
            self.kill(proc, "it did not open its control connection in time")

    def process_exited(self, proc: Process) -> None:
        """The process is gone (its pidfd said so): end its task."""
        proc.exited = True
        self._signal_diagnostic(proc)
        self.process_gone(proc, "its process exited")

    def _signal_diagnostic(self, proc: Process) -> None:
        """If the process (one machd started: it can read its status) was ended by
        SIGSEGV or SIGBUS, say so on the task's stderr in pymach's words: the task
        touched an address it has no memory at (never mapped, or after vm_deallocate)."""
        with self.lock:
            pidfd = os.dup(proc.pidfd) if proc.pidfd >= 0 and proc.popen is not None else -1
        if pidfd < 0:
            return
        try:
            signum = _fatal_signal(pidfd)
        finally:
            os.close(pidfd)
        if signum in (signal.SIGSEGV, signal.SIGBUS):
            self._tell(proc, f"pymach: task {proc.task.name!r} ended: memory exception: "
                             f"{signal.Signals(signum).name}: an access to an address the "
                             f"task has no memory at (never mapped, or used after "
                             f"vm_deallocate)\n")

    def _run_thread(self, thread: Thread, chan: Channel, tid: int, control: bytes) -> None:
        """Start the kernel thread that serves this process thread (it sends the
        welcome)."""
        code = thread.code
        thread.host_data = RemoteState(tid)
        thread.code = Code(serve_remote, (self, thread, chan, code, control))
        thread.never_ran = lambda: refuse_thread(thread, chan)  # terminated before it ran
        with self.kernel.sched.lock:
            thread.start()

    # -- threads of native tasks -----------------------------------------------------------
    def start_thread(self, thread: Thread) -> None:
        """thread_create on a task of machd's (kernel lock held): start it in the task's
        process, or in a new process (running as the task's user) if it has none."""
        token = secrets.token_bytes(16)
        thread.state = "running"  # runnable now, as in the embedded kernel; its process
        with self.lock:  # thread connects in a moment
            self.pending[token] = thread
        proc: Process | None = thread.task.process
        if proc is not None and proc.alive and proc.control is not None:
            try:
                proc.control.send(traps.START_THREAD, [token])
                return
            except Disconnected:
                proc.alive = False
        if proc is None:
            self._spawn(thread.task, token)

    def _spawn(self, task: Task, token: bytes) -> None:
        """Start a process for a task that has none, as the task's user, where its
        creator's program runs (its cwd and sys.path as the creator reported them)."""
        parent = task.parent.process if task.parent is not None else None
        with self.lock:
            arrived = self.arrived.pop(task.serial, None)
        env_of = arrived or (parent.env if parent is not None else TaskEnv())
        argv = [sys.executable, "-m", "pymach.libmach.taskproc", self.socket_path,
                token.hex()]
        if env_of.main:
            argv.append(env_of.main)
        with self.lock:  # the parent's stdout and stderr (as a forked child would have)
            stdio = [os.dup(fd) for fd in parent.stdio] if parent is not None else []
        try:
            out, err = stdio if len(stdio) == 2 else (None, None)
            popen = subprocess.Popen(argv, env=_child_env(task.uid, env_of),
                                     cwd=env_of.cwd or None, stdout=out, stderr=err,
                                     **_as_user(task.uid))
        except OSError as e:
            log.warning("cannot start a process for task %s: %s", task.name, e)
            return
        finally:
            close_fds(stdio)
        task.process = Process(task, popen.pid, task.uid, popen=popen, env=env_of,
                               pidfd=_pidfd(popen.pid))  # our child: not reaped, no reuse
        # (it runs where its creator's program runs, and so do the tasks it creates)

    def migrated_task(self, uid: int, name: str, cwd: str, path: list[str],
                      only_check: bool = False) -> Task | None:
        """A task for a task migrated from another host (kernel lock held;
        net/migration.py): of user `uid`, a child of the bootstrap task, whose process
        starts in `cwd` (if it exists here) with module path `path`; None if
        `only_check`. KERN_PROTECTION_FAILURE for a user this machd does not serve,
        KERN_RESOURCE_SHORTAGE for one at its process limit."""
        if uid not in self.allow_uids:
            raise MachError("KERN_PROTECTION_FAILURE", f"uid {uid} is not served by this "
                            f"host's machd (see --allow-user)")
        self._check_processes(uid)
        if only_check:
            return None
        k = self.kernel
        boot = next(t for t in k.tasks.values() if t.name == "bootstrap")
        task = k.task_create_locked(boot, False, name[:64] or "migrated", host=self, uid=uid)
        with self.lock:
            self.arrived[task.serial] = task_env([cwd if os.path.isdir(cwd) else "", path, ""])
        return task

    # -- ending processes -----------------------------------------------------------------
    def _watch_control(self, proc: Process) -> None:
        """The control connection closes when the process ends: end the task then. A
        process may also detach: the task ends and the process goes on. Anything but a
        DETACH frame ends the connection (and so the task)."""
        assert proc.control is not None
        detach = False
        try:
            frame = proc.control.recv()
            frame.close_fds()
            check_frame(frame, lambda op: op == traps.DETACH)
            detach = True
        except (Disconnected, MachError) as e:
            if isinstance(e, MachError):
                log.warning("task %s control: %s", proc.task.name, e)
        if detach:
            proc.detaching = True
            self.process_gone(proc, "its process detached")
        else:
            proc.exited = True
            self._signal_diagnostic(proc)
            self.process_gone(proc, "its process exited")
        proc.control.close()
        self.connection_closed(proc.uid)

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
            pidfd, proc.pidfd = proc.pidfd, -1
            self.controls.pop(proc.control_token, None)
            for token in [t for t, th in self.pending.items() if th.task is proc.task]:
                del self.pending[token]
        if uffd is not None:
            uffd.close()
        close_fds([*stdio, *([pidfd] if pidfd >= 0 else [])])

    def task_terminated(self, task: Task) -> None:
        """A native task was terminated (kernel lock held): end its process, whose
        connections then close. Nothing here takes the kernel lock. The process is told
        why (it prints that and exits); if it has not exited after a grace period it is
        killed."""
        proc = task.process
        if proc is None or not proc.alive:
            with self.lock:
                self.arrived.pop(task.serial, None)
            return
        proc.alive = False
        self.poller.remove(proc)
        told = False
        with self.lock:  # the pidfd taken at attach: signals can only reach that process
            pidfd = os.dup(proc.pidfd) if proc.pidfd >= 0 and not (
                proc.detaching or proc.exited) else -1
            uffd = None
            if pidfd >= 0:  # its memory stays machd's until it is gone: a process left
                uffd, proc.uffd = proc.uffd, None  # without its userfaultfd would read
                # zeros and write where nobody sees it
        if pidfd >= 0 and proc.control is not None:
            why = proc.why or _ended_by(task)
            if why:
                self._tell(proc, f"pymach: task {task.name!r} ended by machd: {why}\n")
            with contextlib.suppress(Disconnected, OSError):
                proc.control.send(traps.DIE, [why])  # "": it ended itself
                told = True
        threading.Thread(target=_end_process,
                         args=(pidfd, proc.popen, 2.0 if told else 0.0, uffd),
                         daemon=True, name=f"machd.end.{task.name}").start()
        with self.lock:
            self.processes.pop(task.serial, None)

    def thread_alert(self, thread: Thread) -> None:
        """A thread of a native task was suspended or terminated (kernel lock held):
        ring its alert, in case it waits on a direct channel (machd/channels.py)."""
        state = thread.host_data
        if isinstance(state, RemoteState):
            state.ring_alert()

    def set_stdio(self, task: Task, fds: list[int], env: TaskEnv | None = None) -> None:
        """Take a task's stdout and stderr (received fds, now owned here) and where its
        program runs: its children's processes write there and start there."""
        proc = task.process
        if proc is None or len(fds) not in (0, 2):
            close_fds(fds)
            return
        with self.lock:
            old, proc.stdio = (proc.stdio, fds) if fds else ([], proc.stdio)
            if env is not None:
                proc.env = env
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


def _take_uffd(frame: Frame, cred: PeerCred, tid: int) -> Uffd:
    """The userfaultfd a hello brought (taken from the frame), checked to be one, from
    a thread of the connecting process."""
    if len(frame.fds) != 1:
        raise wire.WireError("a process attaches with exactly one descriptor, its "
                             "userfaultfd")
    fd = frame.fds[0]
    try:
        kind = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        kind = ""
    if kind != "anon_inode:[userfaultfd]":
        raise wire.WireError(f"the descriptor is {kind or 'unknown'}, not a userfaultfd")
    if not os.path.exists(f"/proc/{cred.pid}/task/{tid}"):
        raise MachError("KERN_INVALID_ARGUMENT", f"thread {tid} is not a thread of the "
                        f"connecting process {cred.pid}")
    frame.fds = []
    return Uffd(fd)


def _as_user(uid: int) -> dict[str, Any]:
    """Popen arguments that run a child as `uid` (nothing if that is machd's user)."""
    if uid == os.getuid():
        return {}
    try:
        gid = pwd.getpwuid(uid).pw_gid
    except KeyError:
        gid = uid
    return {"user": uid, "group": gid, "extra_groups": []}


def _child_env(uid: int, env: TaskEnv) -> dict[str, str]:
    """The environment of a process machd starts for a task: machd's own for its own
    user; for another user only a neutral base; with the creator's module path."""
    if uid == os.getuid():
        out = dict(os.environ)
    else:
        out = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL", "TZ") if k in os.environ}
        with contextlib.suppress(KeyError):
            out["HOME"] = pwd.getpwuid(uid).pw_dir
    if env.sys_path:
        out["PYTHONPATH"] = os.pathsep.join(p for p in env.sys_path if p)
    return out


def _pidfd(pid: int) -> int:
    """A pidfd for `pid`, or -1 if it is gone (taken before signalling: no pid reuse)."""
    try:
        return os.pidfd_open(pid)
    except OSError:
        return -1


END_WAIT_S = 5.0  # how long a SIGKILLed process may take to go (its userfaultfd waits)


def _fatal_signal(pidfd: int, wait_ms: int = 200) -> int:
    """The signal that ended the process of `pidfd` (a child of machd's), 0 if none
    did, or if it has not ended within `wait_ms` (it is not reaped: WNOWAIT)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    if not poller.poll(wait_ms):
        return 0
    try:
        info = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOWAIT | os.WNOHANG)
    except OSError:
        return 0
    if info is None or info.si_code not in (os.CLD_KILLED, os.CLD_DUMPED):
        return 0
    return info.si_status


def _end_process(pidfd: int, popen: subprocess.Popen[bytes] | None, grace: float,
                 uffd: Uffd | None = None) -> None:
    """Wait up to `grace` seconds for a process told to die, then SIGKILL it, and close
    its userfaultfd once it is gone; reap it if machd started it."""
    if pidfd >= 0:
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            if not poller.poll(int(grace * 1000)):
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                poller.poll(int(END_WAIT_S * 1000))
        finally:
            os.close(pidfd)
    if uffd is not None:
        uffd.close()
    if popen is not None:
        popen.wait()


def private_dir(path: str, others: bool) -> None:
    """Make sure `path` is a directory of ours that nobody else may change (mode 0700,
    or 0711 so that other users allowed to connect can reach the socket), whatever the
    umask; MachdError if it is someone else's, a symlink, or writable by others."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise MachdError(f"cannot make the socket directory {path}: {e.strerror}") from None
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise MachdError(f"{path} is not a directory owned by uid {os.getuid()}: refusing "
                         f"to put machd's socket there")
    if st.st_mode & 0o022:
        raise MachdError(f"{path} is writable by other users (mode {st.st_mode & 0o777:o}): "
                         f"choose a private directory for the socket")
    os.chmod(path, 0o711 if others else 0o700)


def listen(path: str, others: bool = False) -> socket.socket:
    """Bind the daemon's socket in a private directory (see `private_dir`), refusing if
    a live machd already listens there. The socket is 0600, or 0666 when other users
    are served (each connection is still checked with SO_PEERCRED)."""
    private_dir(os.path.dirname(os.path.abspath(path)), others)
    if os.path.lexists(path):
        probe_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe_sock.connect(path)
        except OSError:
            os.unlink(path)  # a stale socket of a machd that died
        else:
            raise MachdError(f"a machd is already running at {path}")
        finally:
            probe_sock.close()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(path)
        os.chmod(path, 0o666 if others else 0o600)
        s.listen(128)
    except OSError as e:
        s.close()
        raise MachdError(f"cannot listen at {path}: {e.strerror} (choose another path "
                         f"with --socket)") from None
    return s


def run_machd(machd: Machd) -> int:
    """Serve in the foreground until SIGTERM or SIGINT; returns the exit status. The
    handler only sets a flag: it runs on the main thread between bytecodes, and taking
    a lock there (threading.Event.set) could deadlock with the main thread's own wait."""
    stopping: list[int] = []

    def stop(signum: int, frame: Any) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    _tune_gc()
    machd.start()
    while not stopping:
        time.sleep(0.2)
    machd.stop()
    return 0


def _tune_gc() -> None:
    """Collect cycles less often (GC_THRESHOLD) and leave everything made at start-up
    (modules, the kernel's tables) out of every later collection (gc.freeze). Only the
    daemon's own process is tuned: a task's process keeps its program's settings."""
    gc.set_threshold(*GC_THRESHOLD)
    gc.freeze()


def _ended_by(task: Task) -> str:
    """Why a task is terminated when machd has no reason of its own: "" if it ended
    itself, else who called task_terminate (the thread running the call)."""
    me = running_thread()
    if me is None:
        return "task_terminate"
    return "" if me.task is task else f"task_terminate by task {me.task.name!r}"


def start_daemon(path: str, *options: str, timeout: float = 20.0,
                 prefix: Iterable[str] = ()) -> subprocess.Popen[bytes]:
    """Start `pymach machd --socket path *options` as a child process that ends with the
    caller (run by `prefix`, as `ip netns exec NS`, if given); returns once it accepts
    connections (MachdError if it exits or does not start in time)."""
    proc = subprocess.Popen([*prefix, sys.executable, "-m", "pymach.cli.main", "machd",
                             "--socket", path, "--log-level", "warning", *options],
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
