"""Machine-dependent physical maps. `make_physical_memory` is the one place a backend is chosen.

Backends, one per file: `soft_pmap` (simulated frames and a software MMU; embedded mode)
and `uffd_pmap` (real memory in memfds, faults served through userfaultfd; native mode).
"""

from __future__ import annotations

from pymach.pmap.pmap import PhysicalMemory, Pmap

BACKENDS = ("soft", "uffd")
EMBEDDED_BACKENDS = ("soft",)  # task threads in this process need a software MMU


def make_physical_memory(backend: str, page_size: int, nframes: int) -> PhysicalMemory:
    """The physical memory of one kernel, for the named backend."""
    if backend == "soft":
        from pymach.pmap.soft_pmap import SoftPhysicalMemory

        return SoftPhysicalMemory(page_size, nframes)
    if backend == "uffd":
        from pymach.pmap.uffd_pmap import UffdPhysicalMemory

        return UffdPhysicalMemory(page_size, nframes)
    from pymach.errors import MachError

    raise MachError("KERN_INVALID_ARGUMENT", f"unknown pmap backend {backend!r}; "
                    f"have {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "EMBEDDED_BACKENDS", "PhysicalMemory", "Pmap", "make_physical_memory"]
