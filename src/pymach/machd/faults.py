"""The fault poller: reads every native task's userfaultfd and dispatches the faults.

One machd thread waits (epoll) on the userfaultfds of all task processes. Each fault
carries the faulting thread's id, which names the kernel thread that stands for that
process thread (remote.py); that kernel thread is idle then (a thread in a trap cannot
fault, and a faulting thread does nothing else; a trap parked with a continuation holds
no thread, so an event read for a thread in one is stale and is run as any other: it
maps a page the thread will find mapped, or is found stale by `memory_exception`'s
check of the thread's wait channel). The poller first runs the fault itself,
as that kernel thread, with waiting forbidden (`Thread.no_wait`): a fault that needs
nothing but memory (a zero fill, a resident page, a copy-on-write copy) is resolved with
no thread hand-off, as a hardware fault is served in the faulting context. A fault that
must wait (for a data manager, a busy page, a free frame) stops at that wait, which is
a point where the fault would start over anyway. If it waits on a VM object's page
queue (for a data manager's data), it parks there with a continuation (fault_park.py):
whoever wakes the queue runs it again on its own thread, so the kernel thread is not
woken at all. Any other wait goes to the kernel thread, which runs the fault again and
waits. A thread the process made without Mach (a library's worker
thread) has no kernel thread: its faults go to a helper kernel thread of the task, made
on first need, which several process threads share, so it serves their faults itself.
A missing-page fault read from a region the VM has since let the kernel zero-fill
itself (vm_page.py) is stale: its thread only needs waking (`_stale`).

Registries are guarded by `lock` (a leaf lock).
"""

from __future__ import annotations

import contextlib
import logging
import select
import threading
from typing import TYPE_CHECKING

from pymach.errors import MachError
from pymach.include.message import Code
from pymach.kern.thread import Thread
from pymach.machd.fault_park import fault_nowait
from pymach.machd.remote import RemoteState, memory_exception, serve_faults
from pymach.pmap.uffd import UffdError
from pymach.pmap.uffd_pmap import UffdPmap

if TYPE_CHECKING:
    from pymach.machd.machd import Machd, Process
    from pymach.pmap.uffd import Fault


log = logging.getLogger("pymach.machd")

BRIEF_WAIT_S = 0.05  # the longest the poller waits for a brief holder of `busy`


class FaultPoller:
    """See module docstring."""

    def __init__(self, machd: Machd) -> None:
        self.machd = machd
        self.lock = threading.Lock()
        self.epoll = select.epoll()
        self.by_fd: dict[int, Process] = {}  # userfaultfd -> its process
        self.exits: dict[int, Process] = {}  # pidfd -> its process (readable at exit)
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
        """Watch a process's userfaultfd, and its pidfd for its exit."""
        assert proc.uffd is not None
        with self.lock:
            self.by_fd[proc.uffd.fd] = proc
            if proc.pidfd >= 0:
                self.exits[proc.pidfd] = proc
        self.epoll.register(proc.uffd.fd, select.EPOLLIN)
        if proc.pidfd >= 0:
            self.epoll.register(proc.pidfd, select.EPOLLIN)

    def remove(self, proc: Process) -> None:
        """Stop watching a process (it is gone)."""
        with self.lock:
            if proc.uffd is None or self.by_fd.pop(proc.uffd.fd, None) is None:
                return
            self.exits.pop(proc.pidfd, None)
            helper = self.helpers.pop(proc.task.serial, None)
        for fd in (proc.uffd.fd, proc.pidfd):
            with contextlib.suppress(OSError, ValueError):
                self.epoll.unregister(fd)
        if helper is not None:
            helper.host_data.post(None)

    def register_thread(self, thread: Thread) -> None:
        """Faults of the process thread `thread.host_data.tid` go to `thread`."""
        with self.lock:
            self.by_tid[thread.host_data.tid] = thread

    def unregister_thread(self, thread: Thread) -> None:
        with self.lock:
            if self.by_tid.get(thread.host_data.tid) is thread:
                del self.by_tid[thread.host_data.tid]

    def _loop(self) -> None:
        while self.running:
            try:
                events = self.epoll.poll(1.0)
            except (OSError, ValueError):
                return
            for fd, _ in events:
                with self.lock:
                    proc, gone = self.by_fd.get(fd), self.exits.pop(fd, None)
                if gone is not None:  # ended without closing its control connection
                    with contextlib.suppress(OSError, ValueError):
                        self.epoll.unregister(fd)
                    threading.Thread(target=self.machd.process_exited, args=(gone,),
                                     daemon=True, name="machd.exited").start()
                elif proc is not None and proc.uffd is not None:
                    self._serve_events(proc)

    def _serve_events(self, proc: Process) -> None:
        """Dispatch the faults waiting on a process's userfaultfd. A failure affects that
        process only (it died while its fault was resolved: ESRCH), never the poller."""
        try:
            uffd = proc.uffd
            for fault in uffd.read_events() if uffd is not None else []:
                if proc.uffd is None:  # a fault of this batch ended the task
                    break
                self._dispatch(proc, fault)
        except (OSError, UffdError) as e:
            log.info("task %s: a fault not resolved: %s", proc.task.name, e)
        except Exception:  # a bug: log it, and keep serving every other task
            log.exception("task %s: resolving a fault failed", proc.task.name)

    def _dispatch(self, proc: Process, fault: Fault) -> None:
        if self._stale(proc, fault):
            return
        with self.lock:
            thread = self.by_tid.get(fault.tid)
        if thread is None or thread.task is not proc.task:
            self._helper(proc).host_data.post(fault)
        elif not self._resolve_now(thread, fault):
            thread.host_data.post(fault)

    def _stale(self, proc: Process, fault: Fault) -> bool:
        """A missing fault read before its region was armed for the kernel's own zero
        fill (uffd_pmap.lazy_zero_fill): arming woke the thread, which faults again
        into that fill; wake it again in case it had not been woken yet. True if so."""
        vmap, uffd = proc.task.map, proc.uffd
        if fault.wp or fault.minor or vmap is None or uffd is None \
                or not isinstance(vmap.pmap, UffdPmap) or not vmap.pmap.uphys.lazy_at(
                    vmap.pmap, fault.address):
            return False
        ps = vmap.vm.page_size
        with contextlib.suppress(UffdError):
            uffd.wake(fault.address - fault.address % ps, ps)
        return True

    def _resolve_now(self, thread: Thread, fault: Fault) -> bool:
        """Run the fault as `thread` without waiting, parking it if it waits for a page
        (fault_park.py); False if it must wait otherwise (or the thread is being
        terminated), so that the kernel thread runs it."""
        state: RemoteState = thread.host_data
        if not state.busy.acquire(blocking=False) and not (
                state.brief and state.busy.acquire(timeout=BRIEF_WAIT_S)):
            # Its kernel thread is acting as it (a trap, whose reply the process thread
            # waits for, so this event is stale; or a posted fault, whose resolution may
            # already have let the thread fault again): the kernel thread runs it next.
            # (A parked fault's run that just resolved the last fault is waited for.)
            return False
        try:
            return fault_nowait(thread, fault)
        except MachError as e:
            memory_exception(self.machd, thread, fault, e)  # the process is killed
            return True
        finally:
            state.busy.release()

    def _helper(self, proc: Process) -> Thread:
        """The task's kernel thread for faults of threads unknown to Mach."""
        with self.lock:
            helper = self.helpers.get(proc.task.serial)
            if helper is not None:
                return helper
            k = self.machd.kernel
            helper = Thread(proc.task, None, f"{proc.task.name}.faults")
            helper.host_data = RemoteState(0)
            helper.code = Code(serve_faults, (self.machd, helper))
            self.helpers[proc.task.serial] = helper
        with k.sched.lock:
            helper.start()
        return helper
