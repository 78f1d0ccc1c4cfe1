"""`pymach bench vm`: the virtual memory system on the software MMU, against baselines.

Each figure comes with a plain-Python baseline measured in the same run:
- zero-fill faults per second (touch one byte of each new page) versus making and
  writing a fresh `bytearray` page in Python;
- copy-on-write faults per second (write one byte of each page of a task_create copy)
  versus copying a page with `bytes()`;
- sending a 64 MiB region out of line, send plus receive, versus sending the same bytes
  inline (vm_read them into a Bytes item; the receiver writes them into its memory); and
  the out-of-line time for 1, 16 and 64 MiB, which should stay flat;
- pageout throughput when physical memory is a quarter of the working set (every
  page written, then read back through the default pager) versus writing and reading
  the same bytes with os.pwrite/os.pread on a file.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import pymach
from pymach import OOL, Bytes, Message

MIB = 1 << 20
PAGE = 4096


def _best(fn: Callable[[], float], rounds: int) -> float:
    """The median of `rounds` timings (seconds) returned by fn."""
    return statistics.median(fn() for _ in range(rounds))


def bench_zero_fill(pages: int, rounds: int) -> tuple[float, float]:
    """(pymach zero-fill faults/s, bytearray pages/s)."""
    def kernel_run() -> float:
        me = pymach.task_self()
        mem = pymach.memory()
        a = pymach.vm_allocate(me, 0, pages * PAGE, True)
        t0 = time.perf_counter()
        for i in range(pages):
            mem[a + i * PAGE] = 1
        dt = time.perf_counter() - t0
        pymach.vm_deallocate(me, a, pages * PAGE)
        return dt

    return _rates(kernel_run, lambda: _python_pages(pages, None), pages, rounds)


def bench_cow(pages: int, rounds: int) -> tuple[float, float]:
    """(pymach copy-on-write faults/s, Python page copies/s)."""
    def kernel_run() -> float:
        me = pymach.task_self()
        mem = pymach.memory()
        a = pymach.vm_allocate(me, 0, pages * PAGE, True)
        for i in range(pages):
            mem[a + i * PAGE] = 1
        child = pymach.task_create(me, True)  # the child's copy makes ours copy-on-write
        t0 = time.perf_counter()
        for i in range(pages):
            mem[a + i * PAGE] = 2
        dt = time.perf_counter() - t0
        pymach.task_terminate(child)
        pymach.vm_deallocate(me, a, pages * PAGE)
        return dt

    src = bytes(PAGE)
    return _rates(kernel_run, lambda: _python_pages(pages, src), pages, rounds)


def _python_pages(pages: int, src: bytes | None) -> float:
    """Seconds to make `pages` pages in Python and write a byte of each: new zeroed
    bytearrays (src None) or copies of `src`."""
    t0 = time.perf_counter()
    keep = []
    for _ in range(pages):
        b = bytearray(PAGE) if src is None else bytearray(src)
        b[0] = 1
        keep.append(b)
    return time.perf_counter() - t0


def _rates(kernel_run: Callable[[], float], baseline: Callable[[], float], pages: int,
           rounds: int) -> tuple[float, float]:
    """(pages/s of kernel_run on a fresh embedded kernel, pages/s of the baseline)."""
    with pymach.boot(memory_size=max(64 * MIB, 4 * pages * PAGE)):
        k = _best(kernel_run, rounds)
    return pages / k, pages / _best(baseline, rounds)


def _ool_once(size: int) -> float:
    me = pymach.task_self()
    mem = pymach.memory()
    a = pymach.vm_allocate(me, 0, size, True)
    for off in range(0, size, PAGE):  # make every page resident: the costly case
        mem[a + off] = 7
    port = pymach.port_allocate(me)
    t0 = time.perf_counter()
    pymach.msg_send(Message(remote_port=port, items=[OOL(a, size)]))
    got = pymach.msg_receive(port).items[0]
    dt = time.perf_counter() - t0
    assert isinstance(got, OOL) and got.size == size
    pymach.vm_deallocate(me, got.address, size)
    pymach.vm_deallocate(me, a, size)
    pymach.port_deallocate(me, port)
    return dt


def _inline_once(size: int) -> float:
    me = pymach.task_self()
    mem = pymach.memory()
    a = pymach.vm_allocate(me, 0, size, True)
    b = pymach.vm_allocate(me, 0, size, True)
    for off in range(0, size, PAGE):
        mem[a + off] = 7
    port = pymach.port_allocate(me)
    t0 = time.perf_counter()
    data = mem.read(a, size)
    pymach.msg_send(Message(remote_port=port, items=[Bytes(data)]))
    got = pymach.msg_receive(port, rcv_size=size + 1024).items[0]
    mem.write(b, got.value)  # type: ignore[arg-type]
    dt = time.perf_counter() - t0
    for r in (a, b):
        pymach.vm_deallocate(me, r, size)
    pymach.port_deallocate(me, port)
    return dt


def bench_ool(sizes: list[int], rounds: int) -> dict[str, float]:
    """Seconds for OOL send+receive of each size, and inline for the largest."""
    big = max(sizes)
    out: dict[str, float] = {}
    with pymach.boot(memory_size=4 * big + 64 * MIB, msg_size_max=big + 4096):
        for size in sizes:
            out[f"ool_{size // MIB}MiB_ms"] = statistics.median(
                _ool_once(size) for _ in range(rounds)) * 1e3
        out["inline_ms"] = _best(lambda: _inline_once(big), max(1, rounds // 2)) * 1e3
    return out


def bench_pageout(working_set: int, rounds: int) -> tuple[float, float, dict[str, int]]:
    """(pymach MB/s written and read back through pageout, file pwrite/pread MB/s,
    vm_stat counters of the last run)."""
    stats: dict[str, int] = {}

    def kernel_run() -> float:
        with pymach.boot(memory_size=working_set // 4) as k:
            me = pymach.task_self()
            mem = pymach.memory()
            a = pymach.vm_allocate(me, 0, working_set, True)
            page = bytes(range(256)) * (PAGE // 256)
            t0 = time.perf_counter()
            for off in range(0, working_set, PAGE):
                mem.write(a + off, page)
            for off in range(0, working_set, PAGE):
                assert mem.read(a + off, PAGE) == page
            dt = time.perf_counter() - t0
            stats.update(k.vm_stat())
            return dt

    def baseline() -> float:
        page = bytes(range(256)) * (PAGE // 256)
        with tempfile.TemporaryFile() as f:
            fd = f.fileno()
            t0 = time.perf_counter()
            for off in range(0, working_set, PAGE):
                os.pwrite(fd, page, off)
            for off in range(0, working_set, PAGE):
                assert os.pread(fd, PAGE, off) == page
            return time.perf_counter() - t0

    mb = 2 * working_set / 1e6  # bytes written plus bytes read
    return mb / _best(kernel_run, rounds), mb / _best(baseline, rounds), stats


def run(pages: int = 4096, rounds: int = 3, working_set: int = 32 * MIB) -> dict[str, Any]:
    """Every figure of the module docstring, with ratios."""
    zf, zf_base = bench_zero_fill(pages, rounds)
    cow, cow_base = bench_cow(pages, rounds)
    ool = bench_ool([MIB, 16 * MIB, 64 * MIB], rounds)
    po, po_base, po_stats = bench_pageout(working_set, max(1, rounds - 1))
    return {
        "benchmark": "vm",
        "page_size": PAGE,
        "zero_fill_faults_per_s": round(zf),
        "baseline_bytearray_pages_per_s": round(zf_base),
        "ratio_zero_fill_vs_baseline": round(zf_base / zf, 2),
        "cow_faults_per_s": round(cow),
        "baseline_page_copies_per_s": round(cow_base),
        "ratio_cow_vs_baseline": round(cow_base / cow, 2),
        **{k: round(v, 3) for k, v in ool.items()},
        "ratio_inline_vs_ool_64MiB": round(ool["inline_ms"] / ool["ool_64MiB_ms"], 1),
        "pageout_working_set_MiB": working_set // MIB,
        "pageout_physical_MiB": working_set // 4 // MIB,
        "pageout_MB_per_s": round(po, 1),
        "baseline_file_MB_per_s": round(po_base, 1),
        "ratio_pageout_vs_file": round(po_base / po, 2),
        "pageouts": po_stats.get("pageouts", 0),
        "pageins": po_stats.get("pageins", 0),
    }
