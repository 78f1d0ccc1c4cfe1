"""Huge pages for native mode: VM objects in hugetlb memfds when the page size allows.

The paper makes the page size a boot parameter, any multiple of the hardware page. When
machd's page size is a multiple of the machine's huge page (2 MiB on x86-64), each VM
object's memfd is a hugetlb memfd, so a task maps a page with one page-table entry and a
GiB is 512 pages for the VM system, userfaultfd and the MMU alike (write-protecting a
resident GiB is one entry per 2 MiB). What that needs and what this module keeps:

- huge pages come from the kernel's pool, `vm.nr_hugepages` (sysctl, root), which must
  hold machd's memory: `check_pool` refuses to boot with a message saying what to set,
  rather than failing at a task's first touch. (Transparent huge pages of shmem are not
  used: Linux splits them when userfaultfd write-protects them.)
- hugetlbfs has no write(): data goes in through a temporary shared mapping of the huge
  pages it spans, after `allocate` (fallocate) has given them pages, so that an empty
  pool is an error here instead of a SIGBUS in machd.
"""

from __future__ import annotations

import mmap
import os

from pymach.errors import MachError
from pymach.pmap.uffd import UffdError, allocate, punch_hole

MFD_HUGETLB = 0x0004
MAP_NORESERVE = 0x4000


def _meminfo(field: str) -> int:
    """A number from /proc/meminfo (its first column), 0 if absent or unreadable."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def huge_page_size() -> int:
    """The machine's default huge page size in bytes (0 if it has none)."""
    return _meminfo("Hugepagesize") * 1024


def uses_huge_pages(page_size: int) -> bool:
    """True if machd keeps pages of `page_size` bytes in hugetlb memfds."""
    hp = huge_page_size()
    return hp > 0 and page_size % hp == 0


def free_huge_pages() -> int:
    """Huge pages free in the pool now."""
    return _meminfo("HugePages_Free")


def check_pool(page_size: int, nframes: int) -> None:
    """KERN_RESOURCE_SHORTAGE, saying what to set, unless the huge page pool can hold
    `nframes` pages of `page_size` bytes."""
    hp = huge_page_size()
    need = nframes * page_size // hp
    free = free_huge_pages()
    if free < need:
        raise MachError("KERN_RESOURCE_SHORTAGE", (
            f"a page size of {page_size >> 20} MiB keeps memory in huge pages, and "
            f"{nframes * page_size >> 20} MiB of memory needs {need} huge pages of "
            f"{hp >> 10} KiB, but {free} are free: as root, `sysctl vm.nr_hugepages="
            f"{need + _in_use()}` (or less --memory, or --page-size 4096)"))


def _in_use() -> int:
    """Huge pages the pool has given out already."""
    return _meminfo("HugePages_Total") - _meminfo("HugePages_Free")


def memfd(name: str, flags: int = os.MFD_CLOEXEC) -> int:
    """A new hugetlb memfd (with memfd_create `flags`: by default close-on-exec)."""
    return os.memfd_create(name, flags | MFD_HUGETLB)


def write(fd: int, offset: int, chunks: list[bytes | memoryview], huge: int) -> None:
    """Write `chunks` one after another at `offset` of a hugetlb memfd whose pages are
    `huge` bytes: give the pages spanned memory (KERN_RESOURCE_SHORTAGE if the pool is
    empty), then copy through a temporary mapping."""
    start = offset - offset % huge
    end = offset + sum(len(c) for c in chunks)
    length = -(-(end - start) // huge) * huge
    allocate_run(fd, start, length)
    with mmap.mmap(fd, length, flags=mmap.MAP_SHARED | MAP_NORESERVE, offset=start) as m:
        pos = offset - start
        for chunk in chunks:
            m[pos:pos + len(chunk)] = chunk
            pos += len(chunk)


def zero(fd: int, offset: int, length: int) -> None:
    """Make [offset, offset+length) of a hugetlb memfd fresh zeroed pages."""
    punch_hole(fd, offset, length)
    allocate_run(fd, offset, length)


def allocate_run(fd: int, offset: int, length: int) -> None:
    """`allocate`, an empty pool being KERN_RESOURCE_SHORTAGE."""
    try:
        allocate(fd, offset, length)
    except UffdError as e:
        raise MachError("KERN_RESOURCE_SHORTAGE", f"no huge page for machd's memory: "
                        f"{e.strerror} (raise vm.nr_hugepages)") from None
