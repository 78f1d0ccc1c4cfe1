"""The deterministic scheduler: one task thread runs at a time, in a seeded order.

A single token says which thread may run. The holder gives it up only inside the kernel:
at each kernel entry (to a runnable thread drawn from a `random.Random(seed)` over the
runnable threads in creation order, possibly itself), when it blocks, and when it ends.
Timeouts use a virtual clock that advances only when no thread is runnable, to the
earliest deadline. So the interleaving depends only on the program and the seed. When
every thread is blocked with no deadline, the oldest non-daemon one is woken with
"deadlock"; daemon threads (the default pager, the pageout daemon) idling is not one.

Invariants (all fields guarded by `_mx`): `_running` is the one thread allowed to run;
a thread is in at most one of `_runnable` (keyed by serial) and `_blocked`. A thread
waits for the token on a condition of its own (`_tokens`), and a hand-off wakes only the
new holder (a shared condition woke every waiting thread at each hand-off: creating
1,500 threads took 90 s); a wake-up finds its queue's threads in `_sleepers`.
"""

from __future__ import annotations

import random
import threading
from typing import TYPE_CHECKING

from pymach.kern.lock import KernelLock
from pymach.kern.sched_prim import WaitQueue, continuation_interrupt, continuations_wakeup

if TYPE_CHECKING:
    from pymach.kern.thread import Thread


class DeterministicScheduler:
    """Scheduler backend that serializes task threads (see module docstring)."""

    deterministic = True

    def __init__(self, seed: int) -> None:
        self.lock = KernelLock()  # the kernel lock
        self._mx = threading.Lock()
        self._tokens: dict[Thread, threading.Condition] = {}  # a thread waiting for the
        # token -> its condition (of _mx)
        self._rng = random.Random(seed)
        self._running: Thread | None = None
        self._runnable: dict[int, Thread] = {}
        self._blocked: dict[Thread, tuple[WaitQueue, float | None]] = {}
        self._sleepers: dict[WaitQueue, dict[Thread, None]] = {}  # _blocked by queue, in
        # the order they blocked (a wake-up looks at its queue's threads only)
        self._reason: dict[Thread, str] = {}
        self._clock = 0.0
        self._shutdown = False

    def now(self) -> float:
        return self._clock

    def thread_setrun(self, thread: Thread) -> None:
        with self._mx:
            self._runnable[thread.serial] = thread
            if self._running is None:
                self._running = thread
                self._hand()

    def thread_begin(self, thread: Thread) -> None:
        with self._mx:
            self._await_token(thread)

    def thread_end(self, thread: Thread) -> None:
        with self._mx:
            self._runnable.pop(thread.serial, None)
            if thread in self._blocked:
                self._unblock(thread)
            if self._running is thread:
                self._dispatch()

    def kernel_entry(self, thread: Thread) -> None:
        with self._mx:
            if self._shutdown or thread.serial not in self._runnable:
                return
            self._running = self._pick()
            if self._running is not thread:
                self._hand()
                self._await_token(thread)

    def wait(self, thread: Thread, waitq: WaitQueue, deadline: float | None) -> str:
        with self._mx:
            if self._shutdown or thread.terminating:
                return "woken"
            self._runnable.pop(thread.serial, None)
            if thread in self._blocked:  # (blocked twice: the newer wait counts)
                self._unblock(thread)
            self._blocked[thread] = (waitq, deadline)
            self._sleepers.setdefault(waitq, {})[thread] = None
            self._reason[thread] = "woken"
        self.lock.release()
        try:
            with self._mx:
                if self._running is thread:
                    self._dispatch()
                self._await_token(thread)
                return self._reason.pop(thread, "woken")
        finally:
            self.lock.acquire()

    def thread_wakeup(self, waitq: WaitQueue) -> None:
        with self._mx:
            for t in list(self._sleepers.get(waitq, ())):
                self._make_runnable(t, "woken")
        if waitq.parked:  # (none here: only the free scheduler parks; kept for the
            continuations_wakeup(waitq)  # contract, outside _mx as it may wake more)

    def thread_wakeup_one(self, waitq: WaitQueue) -> None:
        """Every waiter, as thread_wakeup: which one runs first is the schedule's
        choice, and replay must not depend on the condition's order."""
        self.thread_wakeup(waitq)

    def thread_interrupt(self, thread: Thread) -> None:
        with self._mx:
            if thread in self._blocked:
                self._make_runnable(thread, "woken")
        if thread.continuation is not None:
            continuation_interrupt(thread)

    def lock_break(self) -> bool:
        return False  # (turns are taken at kernel entries and waits only)

    def shutdown(self) -> None:
        with self._mx:
            self._shutdown = True
            for cond in self._tokens.values():
                cond.notify()

    # -- internals, all with _mx held --------------------------------------------------

    def _await_token(self, thread: Thread) -> None:
        if self._running is thread or self._shutdown:
            return
        cond = self._tokens[thread] = threading.Condition(self._mx)
        try:
            while self._running is not thread and not self._shutdown:
                cond.wait()
        finally:
            del self._tokens[thread]

    def _hand(self) -> None:
        """Wake the thread that now holds the token, if it waits for it."""
        cond = self._tokens.get(self._running) if self._running is not None else None
        if cond is not None:
            cond.notify()

    def _unblock(self, thread: Thread) -> None:
        waitq, _ = self._blocked.pop(thread)
        sleepers = self._sleepers[waitq]
        del sleepers[thread]
        if not sleepers:
            del self._sleepers[waitq]

    def _make_runnable(self, thread: Thread, reason: str) -> None:
        self._unblock(thread)
        self._reason[thread] = reason
        self._runnable[thread.serial] = thread

    def _pick(self) -> Thread:
        serials = sorted(self._runnable)
        return self._runnable[serials[self._rng.randrange(len(serials))]]

    def _dispatch(self) -> None:
        """Give the token to the next thread: a runnable one, else a timed-out one."""
        if not self._runnable and self._blocked:
            self._expire_or_break_deadlock()
        self._running = self._pick() if self._runnable else None
        self._hand()

    def _expire_or_break_deadlock(self) -> None:
        timed = [(d, t.serial, t) for t, (_, d) in self._blocked.items() if d is not None]
        if timed:
            deadline, _, t = min(timed, key=lambda e: (e[0], e[1]))
            self._clock = max(self._clock, deadline)
            self._make_runnable(t, "timeout")
            return
        waiting = [t for t in self._blocked if not t.daemon]  # idle servers are no deadlock
        if waiting:
            self._make_runnable(min(waiting, key=lambda t: t.serial), "deadlock")
