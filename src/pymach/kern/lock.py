"""The kernel lock, with a lock break (Mach's kern/lock: a simple lock).

One lock serializes all kernel data (sched_prim). Most holds are short: one trap, one
fault. A holder doing long work that nobody needs to see halfway (the pageout daemon
evicting thousands of pages, one object's pages at a time) calls `lock_break` at
points where every structure is consistent: if another thread waits for the lock, it
gets it, and the holder takes it again after that thread is done. So no one thread's
long work stalls every other task's trap and fault behind it.

Python's lock is not fair: a holder that let go and took the lock straight back would
almost always win it before a waiter had woken. So a break lets go and then waits,
yielding the interpreter, until a waiter has taken the lock (or `BREAK_PATIENCE_S` has
passed: the waiter gave up, on a timeout).

A holder may also hold work back until it lets go of the lock (`defer`): work that
touches only what nobody else can reach any more (the memfd of a terminated object,
punched out: 150 ms for a GiB on this machine) runs on the holder's own thread right
after its next `release`, before its call returns, with every other thread free to
take the lock meanwhile.

Invariants: `waiting` counts the threads blocked in `acquire`; `taken` counts the
acquisitions that had to wait. Both are guarded by `_count` (a leaf lock taken only on
the contended path, never while blocking). `_held_back.work` is the calling thread's
own list of deferred work (thread-local; None when it has none).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("pymach.kernel")

BREAK_PATIENCE_S = 0.005  # the longest a break waits for a waiter to take the lock


class KernelLock:
    """A mutual-exclusion lock that counts its waiters (usable as a Condition's lock)."""

    __slots__ = ("_count", "_held_back", "_lock", "locked", "taken", "waiting")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = threading.Lock()
        self.waiting = 0  # (_count) threads blocked in acquire
        self.taken = 0  # (_count) acquisitions that waited
        self._held_back = threading.local()  # .work: this thread's deferred work
        self.locked = self._lock.locked

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Take the lock, as threading.Lock.acquire does (True if taken)."""
        if self._lock.acquire(False):
            return True
        if not blocking:
            return False
        with self._count:
            self.waiting += 1
        got = False
        try:
            got = self._lock.acquire(True, timeout)
        finally:
            with self._count:
                self.waiting -= 1
                self.taken += got
        return got

    def release(self) -> None:
        """Let go of the lock, then run the work this thread deferred (`defer`)."""
        self._lock.release()
        work = getattr(self._held_back, "work", None)
        if work:
            self._run(work)

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def defer(self, fn: Callable[[], None]) -> None:
        """Called with the lock held: run `fn` on this thread as soon as it lets go of
        the lock. `fn` must need no kernel data (what it touches nobody else reaches)."""
        work = getattr(self._held_back, "work", None)
        if work is None:
            work = self._held_back.work = []
        work.append(fn)

    def _run(self, work: list[Callable[[], None]]) -> None:
        self._held_back.work = None
        for fn in work:
            try:
                fn()
            except Exception:  # a bug: the others still run, and the holder goes on
                log.exception("work deferred past the kernel lock failed")

    def lock_break(self) -> bool:
        """Called with the lock held: if a thread waits for it, let it in, and return
        holding the lock again (True). False at once if nobody waits."""
        if not self.waiting:
            return False
        taken = self.taken
        self.release()  # (work deferred by this thread runs now, unlocked)
        deadline = time.monotonic() + BREAK_PATIENCE_S
        try:
            while self.taken == taken and self.waiting and time.monotonic() < deadline:
                time.sleep(0)  # (the interpreter to the waiter, which counts itself in)
        finally:
            self.acquire()
        return True
