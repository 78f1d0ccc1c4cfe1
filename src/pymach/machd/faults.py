"""The fault poller: reads every native task's userfaultfd and dispatches the faults.

One machd thread waits (epoll) on the userfaultfds of all task processes. Each fault
carries the faulting thread's id; it goes to the kernel thread that stands for that
process thread (remote.py), which is idle then (a thread in a trap cannot fault). A
thread the process made without Mach (a library's worker thread) has no kernel thread:
its faults go to a helper kernel thread of the task, made on first need.

Registries are guarded by `lock` (a leaf lock).
"""

from __future__ import annotations

import contextlib
import select
import threading
from typing import TYPE_CHECKING

from pymach.include.message import Code
from pymach.kern.thread import Thread
from pymach.machd.remote import RemoteState, serve_faults

if TYPE_CHECKING:
    from pymach.machd.machd import Machd, Process
    from pymach.pmap.uffd import Fault


class FaultPoller:
    """See module docstring."""

    def __init__(self, machd: Machd) -> None:
        self.machd = machd
        self.lock = threading.Lock()
        self.epoll = select.epoll()
        self.by_fd: dict[int, Process] = {}
        self.by_tid: dict[int, Thread] = {}
        self.helpers: dict[int, Thread] = {}  # task serial -> helper kernel thread
        self.running = False

    def start(self) -> None:
        """Start polling in a daemon thread."""
        self.running = True
        threading.Thread(target=self._loop, name="machd.faults", daemon=True).start()

    def stop(self) -> None:
        self.running = False
        with contextlib.suppress(OSError):
            self.epoll.close()

    def add(self, proc: Process) -> None:
        """Watch a process's userfaultfd."""
        assert proc.uffd is not None
        with self.lock:
            self.by_fd[proc.uffd.fd] = proc
        self.epoll.register(proc.uffd.fd, select.EPOLLIN)

    def remove(self, proc: Process) -> None:
        """Stop watching a process (it is gone)."""
        with self.lock:
            if proc.uffd is None or self.by_fd.pop(proc.uffd.fd, None) is None:
                return
            helper = self.helpers.pop(proc.task.serial, None)
        with contextlib.suppress(OSError, ValueError):
            self.epoll.unregister(proc.uffd.fd)
        if helper is not None:
            helper.remote_state.post(None)

    def register_thread(self, thread: Thread) -> None:
        """Faults of the process thread `thread.native_tid` go to `thread`."""
        with self.lock:
            self.by_tid[thread.native_tid] = thread

    def unregister_thread(self, thread: Thread) -> None:
        with self.lock:
            if self.by_tid.get(thread.native_tid) is thread:
                del self.by_tid[thread.native_tid]

    def _loop(self) -> None:
        while self.running:
            try:
                events = self.epoll.poll(1.0)
            except (OSError, ValueError):
                return
            for fd, _ in events:
                with self.lock:
                    proc = self.by_fd.get(fd)
                if proc is not None and proc.uffd is not None:
                    for fault in proc.uffd.read_events():
                        self._dispatch(proc, fault)

    def _dispatch(self, proc: Process, fault: Fault) -> None:
        with self.lock:
            thread = self.by_tid.get(fault.tid)
        if thread is None or thread.task is not proc.task:
            thread = self._helper(proc)
        thread.remote_state.post(fault)

    def _helper(self, proc: Process) -> Thread:
        """The task's kernel thread for faults of threads unknown to Mach."""
        with self.lock:
            helper = self.helpers.get(proc.task.serial)
            if helper is not None:
                return helper
            k = self.machd.kernel
            helper = Thread(proc.task, None, f"{proc.task.name}.faults")
            helper.remote_state = RemoteState()
            helper.code = Code(serve_faults, (self.machd, helper))
            self.helpers[proc.task.serial] = helper
        with k.sched.lock:
            helper.start()
        return helper
