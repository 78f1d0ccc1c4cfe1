"""Doorbells: descriptors machd rings to wake a task's threads, that no task can jam.

machd rings a doorbell under its kernel lock (a message queued on a port with direct
channels, machd/channels.py; a thread's alert when it is suspended or terminated,
machd/remote.py), so ringing must never block, whatever the task does with its own
descriptor for it. An eventfd cannot promise that: a duplicated descriptor shares its
open file description, flags included, so a task could clear O_NONBLOCK on its copy and
fill the counter, and machd's next ring would sleep holding the kernel lock (found by a
review: every trap then hung).

So a doorbell is a pipe. machd keeps its two ends (non-blocking; it only writes the
write end, and keeps the read end only to hand out). A task gets `handout()`: a *new*
open file description of the pipe, opened read-write through /proc (its flags are the
task's own; it reads it to clear the bell and may write it to wake its own threads). A
ring that finds the pipe full (nobody reads it) or closed is dropped: the bell is rung
already. Invariants: machd's descriptions are never handed out; `ring` never blocks
and never raises; ring and close are serialized by the bell's own (leaf) lock, so no
ring ever writes to a descriptor number reused after the close.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading

_DRAIN = 4096  # bytes read at a time to clear a bell


class Doorbell:
    """machd's side of one doorbell (see module docstring); owner: whoever made it."""

    __slots__ = ("lock", "read_fd", "write_fd")

    def __init__(self) -> None:
        self.lock = threading.Lock()  # a leaf: ring and close (a ring after the close
        # would write to whatever reused the number)
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)  # machd's own
        # (lock; -1 once closed)

    def ring(self) -> None:
        """Wake whoever waits on the bell; never blocks (a full pipe is rung already);
        nothing once the bell is closed."""
        with self.lock, contextlib.suppress(OSError):
            if self.write_fd >= 0:
                os.write(self.write_fd, b"\1")

    def handout(self) -> int:
        """A new descriptor of the bell for a task (its own open file description,
        read-write, non-blocking): OSError if none can be made (or the bell is closed)."""
        with self.lock:
            if self.read_fd < 0:
                raise OSError(errno.EBADF, "the doorbell is closed")
            return os.open(f"/proc/self/fd/{self.read_fd}",
                           os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)

    def close(self) -> None:
        """Close machd's two ends, once (descriptors handed out stay valid, and silent)."""
        with self.lock:
            fds, self.read_fd, self.write_fd = (self.read_fd, self.write_fd), -1, -1
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)


def bell_clear(fd: int) -> None:
    """A task's side: take every ring waiting on its descriptor of a bell (never blocks
    if the descriptor is non-blocking, as handed out)."""
    with contextlib.suppress(OSError):
        while len(os.read(fd, _DRAIN)) == _DRAIN:
            pass


def bell_ring(fd: int) -> None:
    """A task's side: ring its own descriptor of a bell, to wake its own threads waiting
    on it (dropped if the pipe is full: it is rung already)."""
    with contextlib.suppress(OSError):
        os.write(fd, b"\1")
