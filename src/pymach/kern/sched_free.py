"""The free scheduler: task threads are ordinary Python threads running side by side.

Waits are condition variables on the kernel lock, timeouts are wall-clock milliseconds.
Invariants: a waiting thread's `wait_queue` names the queue whose condition it sleeps
on, so `thread_interrupt` can wake it; `WaitQueue.sleepers` counts the threads in its
condition's wait (so a wake-up of a queue nobody sleeps on costs nothing). A wake-up
also offers the event to the calls parked on the queue with a continuation
(sched_prim), on the waker's thread.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from pymach.kern.lock import KernelLock
from pymach.kern.sched_prim import WaitQueue, continuation_interrupt, continuations_wakeup

if TYPE_CHECKING:
    from pymach.kern.thread import Thread


class FreeScheduler:
    """Scheduler backend with no ordering of its own (see sched_prim)."""

    deterministic = False

    def __init__(self) -> None:
        self.lock = KernelLock()
        self._shutdown = False  # guarded by lock

    def now(self) -> float:
        return time.monotonic() * 1000.0

    def thread_setrun(self, thread: Thread) -> None:
        pass

    def thread_begin(self, thread: Thread) -> None:
        pass

    def thread_end(self, thread: Thread) -> None:
        pass

    def kernel_entry(self, thread: Thread) -> None:
        pass

    def wait(self, thread: Thread, waitq: WaitQueue, deadline: float | None) -> str:
        if self._shutdown or thread.terminating:
            return "woken"
        remaining = None if deadline is None else (deadline - self.now()) / 1000.0
        if remaining is not None and remaining <= 0:
            return "timeout"
        waitq.sleepers += 1
        waitq.sleeping[thread] = None
        try:
            waitq.cond.wait(remaining)
        finally:
            waitq.sleepers -= 1
            del waitq.sleeping[thread]
        return "woken" if deadline is None or self.now() < deadline else "timeout"

    def thread_wakeup(self, waitq: WaitQueue) -> None:
        if waitq.sleepers:
            waitq.cond.notify_all()
        if waitq.parked:
            continuations_wakeup(waitq)

    def thread_wakeup_one(self, waitq: WaitQueue) -> None:
        if waitq.sleepers == 1:
            waitq.cond.notify(1)
        elif waitq.sleepers:  # the condition wakes its oldest sleeper, which may be
            if any(t.suspend_count or t.task.suspend_count for t in waitq.sleeping):
                waitq.cond.notify_all()  # suspended: it would take the event and stop
            else:  # with it while the others sleep on
                waitq.cond.notify(1)
        if waitq.parked:
            continuations_wakeup(waitq)

    def thread_interrupt(self, thread: Thread) -> None:
        if thread.wait_queue is not None:
            thread.wait_queue.cond.notify_all()
        if thread.continuation is not None:
            continuation_interrupt(thread)

    def lock_break(self) -> bool:
        return self.lock.lock_break()

    def shutdown(self) -> None:
        self._shutdown = True
