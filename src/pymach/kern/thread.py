"""Threads: the unit of computation, a real Python thread running inside a task (3.1).

Each Mach thread is one Python `threading.Thread` that runs a callable. The thread's
port (a kernel port whose kobject is this Thread) is how anyone operates on it.

Suspension and termination take effect at kernel boundaries: when the thread next enters
the kernel (any Mach call) or returns from the call it is in, or at once if it is blocked
in the kernel. Python code between two Mach calls runs on: Python cannot stop a thread
from outside. A terminated thread unwinds by `ThreadTerminated`.

Fields are guarded by the kernel lock unless marked otherwise.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pymach.errors import MachError, ThreadTerminated
from pymach.include.message import Code
from pymach.ipc.port import Port
from pymach.kern.sched_prim import Continuation, WaitQueue
from pymach.kern.syscall_sw import LocalTraps

if TYPE_CHECKING:
    from pymach.kern.task import Task

log = logging.getLogger("pymach")
_tls = threading.local()  # .thread: the Mach thread this Python thread runs


class Thread:
    """A Mach thread (see module docstring)."""

    native = False  # a thread of this process (machd's task processes have NativeThread)

    def __init__(self, task: Task, code: Code | None, name: str) -> None:
        self.kernel = task.kernel  # immutable
        self.task = task  # immutable
        self.serial = self.kernel.new_serial("thread")  # immutable
        self.name = name  # immutable
        self.code = code  # immutable; None for a thread adopted at boot
        self.port = Port(self.kernel, f"thread:{name}")
        self.port.kobject = self
        self.port.receiver = self.port.owner = self.kernel.kernel_task
        self.suspend_count = 0
        self.terminating = False
        self.state = "new"  # new, running, waiting, suspended, halted
        self.wait_queue: WaitQueue | None = None
        self.continuation: Continuation | None = None  # its parked call (sched_prim)
        self.suspend_waitq = WaitQueue(self.kernel.sched.lock, f"thread{self.serial}.suspend")
        self.done_waitq = WaitQueue(self.kernel.sched.lock, f"thread{self.serial}.done")
        self.result: Any = None
        self.exception: BaseException | None = None
        self.ends_task = False  # set once before start: the task ends with this thread
        self.reply_name = 0  # the task's name for this thread's MIG reply port
        self.vm_privileged = False  # set once before start: may use the reserved pool
        self.daemon = False  # set once before start: a server that idles forever
        self.vm_waiting: object | None = None  # the VM object whose page it waits for
        self.host_data: Any = None  # owned by its task's host (machd: the process thread
        # it stands for, its fault queue; machd/remote.py)
        self.vm_wait_error = ""  # set to fail that wait (a deadlock was found)
        self.no_wait = False  # (kernel lock) set while someone else runs a fault for this
        # thread that must not block: a wait raises WouldBlock instead (sched_prim)
        self._transport: LocalTraps | None = None  # made on first use (`transport`)
        self.py_thread: threading.Thread | None = None  # set once, by start()
        self.never_ran: Callable[[], None] | None = None  # set once before start: called
        # in place of `code` when the thread is terminated before it runs (machd: the
        # process thread waiting for its welcome is told)

    def __repr__(self) -> str:
        return f"<Thread {self.serial} {self.name} {self.state}>"

    @property
    def transport(self) -> LocalTraps:
        """How this thread enters its kernel: by direct calls (kern/syscall_sw.py)."""
        traps = self._transport
        if traps is None:  # made once (a race makes two equal ones: harmless)
            traps = self._transport = LocalTraps(self)
        return traps

    def start(self) -> None:
        """Start the Python thread (kernel lock held); it runs once the scheduler allows."""
        self.kernel.sched.thread_setrun(self)
        self.state = "running"
        self.py_thread = threading.Thread(target=self._bootstrap, name=f"mach:{self.name}",
                                          daemon=True)
        self.py_thread.start()

    def _bootstrap(self) -> None:
        _tls.thread = self
        self.kernel.sched.thread_begin(self)
        try:
            if not self.terminating:
                assert self.code is not None and self.code.fn is not None
                self.result = self.code.fn(*self.code.args, **self.code.kwargs)
            elif self.never_ran is not None:
                self.never_ran()
        except ThreadTerminated:
            pass
        except BaseException as exc:  # recorded (a handle's .result() raises it), logged
            self.exception = exc  # at debug level only, as concurrent.futures keeps a
            # task's exception for whoever collects it
            log.debug("thread %s of task %s raised %r", self.name, self.task.name, exc)
        finally:
            self.kernel.thread_exited(self)

    @property
    def done(self) -> bool:
        """True once the thread has halted."""
        return self.state == "halted"


def current_thread() -> Thread:
    """The Mach thread the calling Python thread runs, or MachError KERN_INVALID_TASK."""
    thread: Thread | None = getattr(_tls, "thread", None)
    if thread is None:
        raise MachError("KERN_INVALID_TASK", "this Python thread is not a thread of a pymach "
                        "task: call inside `with pymach.boot():` or from task code, or "
                        "run the script as a native task with `pymach exec script.py`")
    return thread


def running_thread() -> Thread | None:
    """The Mach thread the calling Python thread runs, or None."""
    return getattr(_tls, "thread", None)


def set_current_thread(thread: Thread | None) -> None:
    """Bind (or unbind) the calling Python thread to a Mach thread."""
    _tls.thread = thread
