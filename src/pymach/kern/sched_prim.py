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

Continuations (Mach 3.0's thread_block with a continuation, and its message hand-off:
Draves, Bershad, Rashid, Dean 1991). A call whose trap transport can wait without a
thread sleeping in the kernel (machd's, whose kernel thread waits on the process's
connection anyway) passes a `Handoff`; where it would block it *parks* instead
(`thread_park`): it records what completes it (`Continuation`) on the wait queue and
raises `Parked`, and the transport goes back to its own loop. Whoever then wakes that
queue (`thread_wakeup`, with the kernel lock held: a sender, a port's death) offers the
event to the continuation on its own thread: if the call can now complete without
blocking, it completes there and its outcome goes straight to the caller
(`Handoff.deliver`), with no thread woken. Anything else (the thread is terminated or
suspended, so its trap's exit must wait or unwind) hands the call back to its own
thread (`Handoff.wake`), which runs the rest of it (`thread_continue`) as a blocking
thread would have after its wake-up; a timeout is the transport's to notice (the
continuation's `deadline`), and it runs `thread_continue` too. Invariants (kernel
lock): a thread has at most one continuation; it is on its wait queue's `parked` list
exactly while it may be completed by a waker; exactly one party completes it (the
waker that took it off the list, or the thread itself); a wake-up of its queue from
within its own attempt does not offer it again. Only the free scheduler parks:
under the deterministic one every wait stays a thread_block, so a seed still gives one
interleaving.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from pymach.errors import MachError, ThreadTerminated
from pymach.kern.lock import KernelLock

if TYPE_CHECKING:
    from pymach.kern.thread import Thread


class WouldBlock(Exception):
    """A kernel call made with `thread.no_wait` set reached a wait. Raised where the
    call would have blocked, which is always a point where the blocked call would start
    again from the top once woken (vm_fault's Retry), so the caller may run the whole
    call again in a context that can block and get the same result. It names the wait:
    the queue, its deadline (ms, None: none) and what the thread waited for
    (`Thread.vm_waiting` at the wait), so that a caller still holding the kernel lock
    may park the call on that queue (machd's fault continuations) instead."""

    def __init__(self, waitq: WaitQueue, deadline: float | None = None,
                 waiting: object | None = None) -> None:
        super().__init__(waitq.name)
        self.waitq, self.deadline, self.waiting = waitq, deadline, waiting


class Parked(Exception):
    """The call parked its thread with a continuation (`thread_park`) instead of
    blocking: raised out of the trap to its transport, whose `Handoff` will be told how
    the call ends. The trap's exit checks are the completion's to make."""


class WaitQueue:
    """An event that threads wait on; guarded by the kernel lock."""

    __slots__ = ("cond", "name", "parked", "sleepers", "sleeping")

    def __init__(self, lock: KernelLock, name: str) -> None:
        self.name = name
        self.cond = threading.Condition(lock)  # type: ignore[arg-type]  # (any lock with
        # acquire and release will do); used by the free backend only
        self.sleepers = 0  # threads in cond.wait (free backend): a wake-up of none is free
        self.sleeping: dict[Thread, None] = {}  # those threads (free backend)
        self.parked: list[Continuation] = []  # calls parked here, oldest first

    def __repr__(self) -> str:
        return f"<WaitQueue {self.name}>"


NOT_YET: Any = object()  # what a continuation's attempt returns when it must go on waiting


class Handoff(Protocol):
    """How a trap transport finishes a parked call (see module docstring). Both are
    called with the kernel lock held, on whatever thread completes the call, and must
    not block."""

    def deliver(self, outcome: Any) -> None:
        """The call completed: `outcome` is its value, or the MachError it raised."""
        ...

    def wake(self) -> None:
        """The call needs its own thread now: have it run `thread_continue`."""
        ...


class Continuation:
    """A parked call: the queue it waits on, its deadline (ms, None: none), how a
    waker tries to complete it (`attempt`: its value, NOT_YET, or a MachError raised)
    and how its own thread runs the rest of it (`rest`, the blocking version).
    `handed_back`: taken off the queue for its thread to continue (kernel lock).
    `attempting`: a waker runs its attempt now (kernel lock): a wake-up of its queue
    from within that attempt does not offer it again."""

    __slots__ = ("attempt", "attempting", "deadline", "handed_back", "handoff", "rest",
                 "thread", "waitq")

    def __init__(self, thread: Thread, waitq: WaitQueue, deadline: float | None,
                 attempt: Callable[[], Any], rest: Callable[[], Any],
                 handoff: Handoff) -> None:
        self.thread, self.waitq, self.deadline = thread, waitq, deadline
        self.attempt, self.rest, self.handoff = attempt, rest, handoff
        self.handed_back = self.attempting = False


class Scheduler(Protocol):
    """What the rest of the kernel may ask of a scheduler backend."""

    lock: KernelLock
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

    def thread_wakeup_one(self, waitq: WaitQueue) -> None:
        """Wake at least one thread waiting on `waitq` (Mach's thread_wakeup_one: an
        event one waiter can consume, a message; a woken waiter that leaves without
        consuming it passes the wake-up on). Calls parked on it are all offered the
        event. Lock held."""
        ...

    def thread_interrupt(self, thread: Thread) -> None:
        """Wake `thread` if it waits, whatever it waits on (termination). Lock held."""
        ...

    def lock_break(self) -> bool:
        """Let a thread waiting for the kernel lock in, and take the lock back after it
        (kern/lock.py); call only where every kernel structure is consistent. False if
        there was nobody to let in (the deterministic scheduler never breaks: its
        threads take turns only at kernel entries and waits). Lock held."""
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
        raise WouldBlock(waitq, deadline, thread.vm_waiting)
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


def thread_park(thread: Thread, waitq: WaitQueue, deadline: float | None,
                attempt: Callable[[], Any], rest: Callable[[], Any],
                handoff: Handoff) -> NoReturn:
    """Park `thread` on `waitq` with a continuation (kernel lock held) and raise Parked
    (see module docstring). `attempt` and `rest` run with the kernel lock held."""
    cont = Continuation(thread, waitq, deadline, attempt, rest, handoff)
    thread.continuation = cont
    waitq.parked.append(cont)
    thread.wait_queue, thread.state = waitq, "waiting"
    raise Parked()


def _unpark(cont: Continuation) -> None:
    """Take a continuation off its queue (it is being completed or handed back)."""
    cont.waitq.parked.remove(cont)
    thread = cont.thread
    if thread.wait_queue is cont.waitq:
        thread.wait_queue = None
    if thread.state == "waiting":
        thread.state = "running"


def _hand_back(cont: Continuation) -> None:
    """Give a parked call back to its own thread (it must block, unwind or wait)."""
    _unpark(cont)
    cont.handed_back = True
    cont.handoff.wake()


def _offer(cont: Continuation) -> None:
    """A waker offers the event to one parked call: complete it here if it can
    complete without blocking (its trap's exit checks included), else hand it back."""
    thread = cont.thread
    if thread.terminating or thread.suspend_count or thread.task.suspend_count:
        _hand_back(cont)
        return
    cont.attempting = True
    try:
        outcome = cont.attempt()
    except MachError as e:
        outcome = e
    finally:
        cont.attempting = False
    if outcome is NOT_YET:
        return
    _unpark(cont)
    thread.continuation = None
    cont.handoff.deliver(outcome)


def continuations_wakeup(waitq: WaitQueue) -> None:
    """For the backends' thread_wakeup (lock held): offer the event to every call
    parked on `waitq`, oldest first."""
    for cont in list(waitq.parked):
        if cont.thread.continuation is cont and not (cont.handed_back or cont.attempting):
            _offer(cont)


def continuation_interrupt(thread: Thread) -> None:
    """For the backends' thread_interrupt (lock held): a parked call of `thread` goes
    back to its thread, which unwinds (termination) or sees why it was woken."""
    cont = thread.continuation
    if cont is not None and not cont.handed_back:
        _hand_back(cont)


def thread_cancel(thread: Thread) -> None:
    """Drop `thread`'s parked call, if any (kernel lock held): its caller is gone (its
    transport's connection closed), so nobody may complete it."""
    cont = thread.continuation
    if cont is not None:
        if not cont.handed_back:
            _unpark(cont)
        thread.continuation = None


def thread_continue(thread: Thread) -> Any:
    """Run, on `thread`'s own kernel thread and with the kernel lock NOT held, the rest
    of its parked call if it was handed back or its deadline has passed (as the thread
    would have run it on waking from thread_block), with its trap's exit checks; returns
    its value, raises its error, ThreadTerminated, or Parked (it parked again).
    Returns NOT_YET if there is nothing to do (no call, or one still parked in time)."""
    kernel = thread.kernel
    with kernel.sched.lock:
        cont = thread.continuation
        if cont is None:
            return NOT_YET
        if not cont.handed_back:
            if cont.deadline is None or kernel.sched.now() < cont.deadline:
                return NOT_YET
            _unpark(cont)
        thread.continuation = None
        try:
            if thread.terminating:  # as thread_block does on its return
                raise ThreadTerminated()
            value = cont.rest()
        except MachError:
            kernel.ast_check(thread)
            raise
        kernel.ast_check(thread)
        return value


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
