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

Invariants: `waiting` counts the threads blocked in `acquire`; `taken` counts the
acquisitions that had to wait. Both are guarded by `_count` (a leaf lock taken only on
the contended path, never while blocking).
"""

from __future__ import annotations

import threading
import time

BREAK_PATIENCE_S = 0.005  # the longest a break waits for a waiter to take the lock


class KernelLock:
    """A mutual-exclusion lock that counts its waiters (usable as a Condition's lock)."""

    __slots__ = ("_count", "_lock", "locked", "release", "taken", "waiting")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = threading.Lock()
        self.waiting = 0  # (_count) threads blocked in acquire
        self.taken = 0  # (_count) acquisitions that waited
        self.release = self._lock.release
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

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def lock_break(self) -> bool:
        """Called with the lock held: if a thread waits for it, let it in, and return
        holding the lock again (True). False at once if nobody waits."""
        if not self.waiting:
            return False
        taken = self.taken
        self._lock.release()
        deadline = time.monotonic() + BREAK_PATIENCE_S
        try:
            while self.taken == taken and self.waiting and time.monotonic() < deadline:
                time.sleep(0)  # (the interpreter to the waiter, which counts itself in)
        finally:
            self.acquire()
        return True
