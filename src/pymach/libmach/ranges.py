"""A native process's own view of its mapped ranges and their protections.

`Ranges` maps disjoint half-open address ranges to a protection. Setting a range
overwrites what it overlaps (splitting neighbours); removing leaves a hole. The process
consults it before `memory()` touches an address, so that a bad access is refused with
the Mach error the embedded kernel gives instead of a fault that machd must end the task
for. Callers hold the process lock.
"""

from __future__ import annotations

import bisect


class Ranges:
    """Disjoint [start, end) -> protection (see module docstring)."""

    def __init__(self) -> None:
        self.starts: list[int] = []  # sorted
        self.spans: list[tuple[int, int, int]] = []  # (start, end, prot), same order

    def remove(self, start: int, end: int) -> None:
        """Forget [start, end), keeping the parts of ranges outside it."""
        lo = max(bisect.bisect_right(self.starts, start) - 1, 0)
        hi = bisect.bisect_left(self.starts, end)
        pieces = []
        for s, e, p in self.spans[lo:hi]:
            if e <= start or s >= end:  # untouched
                pieces.append((s, e, p))
                continue
            if s < start:
                pieces.append((s, start, p))
            if e > end:
                pieces.append((end, e, p))
        self.spans[lo:hi] = pieces
        self.starts[lo:hi] = [s for s, _, _ in pieces]

    def set(self, start: int, end: int, prot: int) -> None:
        """[start, end) now has protection `prot`."""
        self.remove(start, end)
        i = bisect.bisect_left(self.starts, start)
        self.spans.insert(i, (start, end, prot))
        self.starts.insert(i, start)

    def protections(self, start: int, end: int) -> list[int] | None:
        """The protections covering [start, end), or None if part of it is unmapped."""
        out, at = [], start
        i = max(bisect.bisect_right(self.starts, start) - 1, 0)
        for s, e, p in self.spans[i:]:
            if at >= end:
                break
            if e <= at:
                continue
            if s > at:
                return None
            out.append(p)
            at = e
        return out if at >= end else None
