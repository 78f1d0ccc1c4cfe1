"""The free scheduler: task threads are ordinary Python threads running side by side.

Waits are condition variables on the kernel lock, timeouts are wall-clock milliseconds.
Invariant: a waiting thread's `wait_queue` names the queue whose condition it sleeps on,
so `thread_interrupt` can wake it.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from pymach.kern.sched_prim import WaitQueue

if TYPE_CHECKING:
    from pymach.kern.thread import Thread


class FreeScheduler:
    """Scheduler backend with no ordering of its own (see sched_prim)."""

    deterministic = False

    def __init__(self) -> None:
        self.lock = threading.Lock()
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
        if deadline is None:
            waitq.cond.wait()
            return "woken"
        remaining = (deadline - self.now()) / 1000.0
        if remaining <= 0:
            return "timeout"
        waitq.cond.wait(remaining)
        return "woken" if self.now() < deadline else "timeout"

    def thread_wakeup(self, waitq: WaitQueue) -> None:
        waitq.cond.notify_all()

    def thread_interrupt(self, thread: Thread) -> None:
        if thread.wait_queue is not None:
            thread.wait_queue.cond.notify_all()

    def shutdown(self) -> None:
        self._shutdown = True
