"""Scheduling primitives: the kernel lock, wait queues, block and wakeup (Mach sched_prim).

One kernel lock serializes all kernel data; every shared kernel field in pymach is guarded
by it unless its comment says otherwise. A thread that must wait calls `thread_block`
with the lock held; the lock is released while it waits and held again on return.

Two backends keep this contract, one per file, selected only in `make_scheduler`:
- `sched_free.FreeScheduler`: real threads run in parallel (as the GIL allows); waits
  use condition variables and wall-clock time.
- `sched_det.DeterministicScheduler`: one task thread runs at a time; the running thread
  hands over at kernel entries to a thread drawn from a seeded generator, and timeouts
  elapse in virtual time, so one program and one seed give one interleaving.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Protocol

from pymach.errors import MachError, ThreadTerminated

if TYPE_CHECKING:
    from pymach.kern.thread import Thread


class WouldBlock(Exception):
    """A kernel call made with `thread.no_wait` set reached a wait. Raised where the
    call would have blocked, which is always a point where the blocked call would start
    again from the top once woken (vm_fault's Retry), so the caller may run the whole
    call again in a context that can block and get the same result."""


class WaitQueue:
    """An event that threads wait on; guarded by the kernel lock."""

    __slots__ = ("cond", "name")

    def __init__(self, lock: threading.Lock, name: str) -> None:
        self.name = name
        self.cond = threading.Condition(lock)  # used by the free backend only

    def __repr__(self) -> str:
        return f"<WaitQueue {self.name}>"


class Scheduler(Protocol):
    """What the rest of the kernel may ask of a scheduler backend."""

    lock: threading.Lock
    deterministic: bool

    def now(self) -> float:
        """Current time in milliseconds (virtual time in deterministic mode)."""
        ...

    def thread_setrun(self, thread: Thread) -> None:
        """Make a new thread runnable; called with the kernel lock held, before it starts."""
        ...

    def thread_begin(self, thread: Thread) -> None:
        """Called first thing in the new thread's Python thread; returns when it may run."""
        ...

    def thread_end(self, thread: Thread) -> None:
        """Called last thing in a thread; lets another thread run. Lock not held."""
        ...

    def kernel_entry(self, thread: Thread) -> None:
        """A switch point at each kernel entry. Lock not held."""
        ...

    def wait(self, thread: Thread, waitq: WaitQueue, deadline: float | None) -> str:
        """Backend wait: lock held; returns 'woken', 'timeout' or 'deadlock'."""
        ...

    def thread_wakeup(self, waitq: WaitQueue) -> None:
        """Wake every thread waiting on `waitq`. Lock held."""
        ...

    def thread_interrupt(self, thread: Thread) -> None:
        """Wake `thread` if it waits, whatever it waits on (termination). Lock held."""
        ...

    def shutdown(self) -> None:
        """Stop scheduling: every wait returns at once from now on."""
        ...


def thread_block(sched: Scheduler, thread: Thread, waitq: WaitQueue,
                 deadline: float | None = None) -> bool:
    """Wait on `waitq` (kernel lock held). True if woken, False if `deadline` (ms) passed.

    Raises ThreadTerminated if the thread was terminated meanwhile, and KERN_ABORTED when
    the deterministic scheduler finds every thread blocked with no timeout pending;
    WouldBlock at once if the thread may not block now (`thread.no_wait`).
    """
    if thread.no_wait:
        raise WouldBlock(waitq.name)
    thread.wait_queue = waitq
    previous, thread.state = thread.state, "waiting" if thread.state == "running" else thread.state
    try:
        reason = sched.wait(thread, waitq, deadline)
    finally:
        thread.wait_queue = None
        thread.state = previous
    if thread.terminating:
        raise ThreadTerminated()
    if reason == "deadlock":
        raise MachError("KERN_ABORTED", "deadlock: every thread is blocked and no timeout is set")
    return reason == "woken"


def deadline_after(sched: Scheduler, timeout_ms: float | None) -> float | None:
    """The absolute deadline for a relative timeout in milliseconds (None: forever)."""
    return None if timeout_ms is None else sched.now() + timeout_ms


def make_scheduler(deterministic: bool, seed: int) -> Scheduler:
    """The one place where the scheduler backend is chosen."""
    if deterministic:
        from pymach.kern.sched_det import DeterministicScheduler

        return DeterministicScheduler(seed)
    from pymach.kern.sched_free import FreeScheduler

    return FreeScheduler()
