"""`pymach bench {ipc,vm,pager,all} --mode native`: native tasks under a real machd.

Each figure is measured together with its baseline in the same run, on this machine:
- ipc: a null msg_rpc between two native tasks (processes) vs a 1-byte round trip over
  a socketpair between two processes;
- vm: a 1 GiB out-of-line message sent and received by another task vs pickling the
  same bytes over a multiprocessing.Pipe to another process; the first send vs
  mprotect of a resident GiB; the send with deallocate and the receiver's vm_deallocate
  vs munmap + PUNCH_HOLE of a resident GiB memfd;
- pager: a one-page fault served by a trivial Python pager (clustering off) vs a naive
  Python userfaultfd handler in a separate process (and beside the same work done in C
  by pymach's three processes, if a C compiler is here; a zero-fill fault served by
  machd alone, and a first touch of anonymous shared memory); a zero-fill fault vs the
  kernel's first touch of a memfd page; a streaming read of a 1 GiB pager-backed region
  (64-page clusters, with machd's read-ahead and without) vs the naive handler's stream
  with the same clusters (and with 1024-page ones, as large as the read-ahead's) and
  reading a page-cached file through mmap; a NumPy fill of 64 MiB of fresh task memory vs
  the same fill of fresh anonymous memory; and (no target) the write-back of 16 MiB of
  dirty pages to the trivial pager when the region is deallocated, beside msync of as
  many dirty pages of a file mapping; and (no target) 96 MiB of anonymous memory
  written and read back in a machd of 64 MiB (through the default pager) beside
  pwrite and pread of as many pages of a file, a page per call, and the same 96 MiB of
  a trivial pager's object written (its pages asked of the pager, then evicted back to
  it in place) beside the same pwrite.
Each target is a ratio to its baseline: the JSON carries both figures, the ratio
("ratio_X_vs_Y") and the target ("target_ratio_X_vs_Y_at_most" or "_at_least"). The
baselines are in `pymach.bench.baselines`. The benchmark starts its own machd (a
temporary socket) and makes this process a task.
"""

from __future__ import annotations

import contextlib
import mmap
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

import pymach
from pymach import OOL, Message
from pymach.bench import baselines
from pymach.bench.ipc import _rpc_server, bench_socketpair, time_rpcs
from pymach.pagers.data_manager import DataManager
from pymach.pmap import hugetlb

PAGE = 4096
MIB = 1 << 20
GIB = 1 << 30
WRITEBACK = 16 * MIB  # dirty bytes written back at unmap (bench_writeback)
PRESSURE, PRESSURE_MEMORY = 96 * MIB, 64 * MIB  # bench_pressure: region, machd --memory
PROBE_S = 5.0  # bench_kernel_call_latency: seconds of calls alone
STOP = 2


@contextlib.contextmanager
def native_task(*machd_options: str) -> Iterator[None]:
    """A private machd, with this process attached as a task, for the block."""
    from pymach.libmach.task import attach, detach
    from pymach.machd.machd import start_daemon, stop_daemon

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "machd.sock")
        daemon = start_daemon(path, *machd_options)
        try:
            attach(path, name="bench")
            try:
                yield
            finally:
                detach()
        finally:
            stop_daemon(daemon)


def _serve(server: Callable[[], Any]) -> tuple[Any, int]:
    """Spawn a native server task; returns (its handle, a send right to its port)."""
    me = pymach.task_self()
    svc = pymach.port_allocate(me)
    h = pymach.spawn(server, name="bench-server")
    notify = pymach.task_get_special_port(h.port, pymach.TASK_NOTIFY_PORT)
    pymach.msg_send(Message(remote_port=notify, items=[pymach.Port(svc, pymach.MOVE_RECEIVE)]))
    return h, svc


# -- ipc -------------------------------------------------------------------------------
def bench_rpc(n: int, rounds: int) -> float:
    """Median microseconds per null msg_rpc between two native tasks."""
    h, svc = _serve(_rpc_server)
    samples = time_rpcs(svc, n, rounds, warmup=50)  # the warm-up waits for the server
    h.result(10_000)
    return statistics.median(samples) / n * 1e6


# -- vm: a 1 GiB out-of-line message ---------------------------------------------------
RELEASE = 3


def _ool_sink() -> None:
    """Receive OOL regions and acknowledge each; on RELEASE, deallocate the regions held
    and then acknowledge (so that work is timed apart from the transfer)."""
    me = pymach.task_self()
    svc = pymach.msg_receive(pymach.task_notify()).items[0].value
    held: list[OOL] = []
    while True:
        msg = pymach.msg_receive(svc)  # type: ignore[arg-type]
        if msg.id == STOP:
            return
        if msg.id == RELEASE:
            for item in held:
                pymach.vm_deallocate(me, item.address, item.size)
            held.clear()
        held.extend(i for i in msg.items if isinstance(i, OOL) and i.size)
        pymach.msg_send(Message(remote_port=msg.remote_port, id=msg.id + 100))


def bench_ool(size: int, rounds: int) -> dict[str, float]:
    """Milliseconds to send `size` bytes OOL to another task, through its receive and
    acknowledgement, with every page resident in the sender (the costly case): the
    first send of a region (the sender's pages must be write-protected; the median of
    `rounds` fresh regions), later sends of the same unchanged region (the copy object
    is reused), and sends with deallocate (the object moves: nothing to protect, nothing
    to copy). The receiver's vm_deallocate of each moved region (every page resident)
    is timed apart, as "receiver_deallocate"."""
    me = pymach.task_self()
    h, svc = _serve(_ool_sink)
    reply = pymach.port_allocate(me)
    pymach.msg_rpc(Message(remote_port=svc, local_port=reply, id=1))  # the server is up
    firsts = []
    for _ in range(rounds):
        a = _resident_region(size)
        firsts.append(_send_ool(svc, reply, OOL(a, size)))
        _release(svc, reply)
        pymach.vm_deallocate(me, a, size)
    a = _resident_region(size)
    _send_ool(svc, reply, OOL(a, size))
    _release(svc, reply)
    repeats = []
    for _ in range(rounds):
        repeats.append(_send_ool(svc, reply, OOL(a, size)))
        _release(svc, reply)
    pymach.vm_deallocate(me, a, size)
    moved, freed = _moved_sends(svc, reply, size, rounds)
    pymach.msg_send(Message(remote_port=svc, id=STOP))
    h.result(30_000)
    return {"first": statistics.median(firsts) * 1e3,
            "again": statistics.median(repeats) * 1e3,
            "moved": statistics.median(moved) * 1e3,
            "receiver_deallocate": statistics.median(freed) * 1e3}


def _moved_sends(svc: int, reply: int, size: int, rounds: int) -> tuple[list[float],
                                                                         list[float]]:
    """Seconds for each of `rounds` sends of a fresh region with deallocate, and for
    the receiver's vm_deallocate of it."""
    moved, freed = [], []
    for _ in range(rounds):
        b = _resident_region(size)
        moved.append(_send_ool(svc, reply, OOL(b, size, deallocate=True)))
        freed.append(_release(svc, reply))
    return moved, freed


def _release(svc: int, reply: int) -> float:
    """Seconds for the sink to vm_deallocate the regions it holds (resident pages)."""
    t0 = time.perf_counter()
    pymach.msg_rpc(Message(remote_port=svc, local_port=reply, id=RELEASE))
    return time.perf_counter() - t0


def _resident_region(size: int) -> int:
    a: int = pymach.vm_allocate(pymach.task_self(), 0, size, True)
    np.frombuffer(pymach.memory().buffer(a, size), dtype=np.uint8)[::PAGE] = 7
    return a


def _send_ool(svc: int, reply: int, item: OOL) -> float:
    """Seconds for one msg_rpc carrying `item` to the sink. A null msg_rpc, not timed,
    goes first: a server that has slept through a region's fill wakes about 0.5 ms
    slower on this VM (measured: a null msg_rpc right after a 1 GiB fill takes 0.8 ms
    against 0.25 ms), a cost of waking it, not of moving memory."""
    pymach.msg_rpc(Message(remote_port=svc, local_port=reply, id=1))
    t0 = time.perf_counter()
    pymach.msg_rpc(Message(remote_port=svc, local_port=reply, id=1, items=[item]))
    return time.perf_counter() - t0


def _pipe_sink(conn: Connection) -> None:
    while (data := conn.recv()) is not None:
        conn.send(len(data))


def bench_pickle_pipe(size: int) -> float:
    """Seconds to pickle `size` bytes over a multiprocessing.Pipe to another process
    (which unpickles them and acknowledges)."""
    data = np.full(size, 7, dtype=np.uint8).tobytes()
    ctx = multiprocessing.get_context("fork")
    here, there = ctx.Pipe()
    child = ctx.Process(target=_pipe_sink, args=(there,))
    child.start()
    t0 = time.perf_counter()
    here.send(data)
    assert here.recv() == size
    dt = time.perf_counter() - t0
    here.send(None)
    child.join()
    return dt


# -- pager: one-page faults and streaming ----------------------------------------------
class Trivial(DataManager):
    """A trivial Python pager: every page it is asked for holds the byte 1. Like the
    naive handler it is compared with (bench/baselines.py), it makes its data once and
    hands out the same bytes for every request of a length (making 8 MiB of bytes
    anew is a pass over memory of its own: 1.4 ms of the 4 ms a 2 MiB-page cluster
    cost it on the 2-core development machine)."""

    threads = max_threads = 1

    def __init__(self) -> None:
        super().__init__()
        self._ones: dict[int, bytes] = {}  # length -> that many bytes of 1 (its thread)

    def read(self, memory_object: int, offset: int, length: int, access: int) -> bytes:
        data = self._ones.get(length)
        if data is None:
            data = self._ones[length] = b"\1" * length
        return data

    def pager_terminate(self, memory_object: int, request: int) -> None:
        self.stop()


def _trivial_pager() -> None:
    dm = Trivial()
    mo = dm.create_memory_object()
    ask = pymach.msg_receive(pymach.task_notify())
    pymach.msg_send(Message(remote_port=ask.items[0].value,  # type: ignore[arg-type]
                            items=[pymach.Port(mo, pymach.MAKE_SEND)]))
    dm.serve()


def _pager_region(size: int) -> tuple[Any, int]:
    """A region of `size` bytes backed by a new Trivial pager task."""
    me = pymach.task_self()
    h = pymach.spawn(_trivial_pager, name="trivial-pager")
    box = pymach.port_allocate(me)
    pymach.msg_send(Message(remote_port=pymach.task_get_special_port(
        h.port, pymach.TASK_NOTIFY_PORT), items=[pymach.Port(box, pymach.MAKE_SEND)]))
    mo = pymach.msg_receive(box, pymach.RCV_TIMEOUT, 20_000).items[0].value
    return h, pymach.vm_allocate_with_pager(me, 0, size, True, mo, 0)


def _touch_each_page(a: int, size: int) -> float:
    """Seconds to read one byte of every page, in order."""
    view = np.frombuffer(pymach.memory().buffer(a, size), dtype=np.uint8)
    t0 = time.perf_counter()
    total = int(view[::PAGE].sum())
    dt = time.perf_counter() - t0
    assert total in (size // PAGE, 0)
    return dt


def bench_pager_fault(pages: int) -> float:
    """Microseconds per one-page fault served by the Trivial pager (run with machd's
    --pager-cluster 1)."""
    h, a = _pager_region(pages * PAGE)
    dt = _touch_each_page(a, pages * PAGE)
    pymach.vm_deallocate(pymach.task_self(), a, pages * PAGE)
    h.result(30_000)
    return dt / pages * 1e6


def bench_writeback(size: int) -> float:
    """Microseconds per page to write `size` bytes of dirty pages back to the Trivial
    pager: every page is touched (faulted in) and written, then the region is
    deallocated; timed from the vm_deallocate until the pager has taken every write and
    its pager_terminate (it handles its messages in order)."""
    h, a = _pager_region(size)
    view = np.frombuffer(pymach.memory().buffer(a, size), dtype=np.uint8)
    view[::PAGE] = 7
    del view
    t0 = time.perf_counter()
    pymach.vm_deallocate(pymach.task_self(), a, size)
    h.result(120_000)
    return (time.perf_counter() - t0) / (size // PAGE) * 1e6


def bench_pressure(size: int) -> tuple[float, float]:
    """Microseconds per page to write one word of every page of a fresh `size`-byte
    region, more than machd's memory (the pageout daemon sends the pages to the default
    pager), then to read every page back (each fault brings its page, and a cluster
    after it, back from the default pager); checks every word. (write, read)."""
    me = pymach.task_self()
    n = size // PAGE
    a = pymach.vm_allocate(me, 0, size, True)
    view = np.frombuffer(pymach.memory().buffer(a, size), dtype=np.uint64)
    t0 = time.perf_counter()
    view[::PAGE // 8] = np.arange(n, dtype=np.uint64)
    t1 = time.perf_counter()
    ok = bool((view[::PAGE // 8] == np.arange(n, dtype=np.uint64)).all())
    t2 = time.perf_counter()
    del view
    pymach.vm_deallocate(me, a, size)
    if not ok:
        raise AssertionError("a page read back from the default pager lost its data")
    return (t1 - t0) / n * 1e6, (t2 - t1) / n * 1e6


def bench_pager_pressure(size: int) -> float:
    """Microseconds per page to write one word of every page of a `size`-byte region of
    a Trivial pager's object, more than machd's memory: each page is asked of the pager
    (a cluster at a time) and, dirty, evicted back to it by the pageout daemon (through
    its window: write-backs in place)."""
    h, a = _pager_region(size)
    n = size // PAGE
    view = np.frombuffer(pymach.memory().buffer(a, size), dtype=np.uint64)
    t0 = time.perf_counter()
    view[::PAGE // 8] = np.arange(n, dtype=np.uint64)
    dt = time.perf_counter() - t0
    del view
    pymach.vm_deallocate(pymach.task_self(), a, size)
    h.result(120_000)
    return dt / n * 1e6


def _kernel_call_prober() -> list[int]:
    """Until a message comes to this task's notify port, once a millisecond (a sleep,
    not a kernel call): three null kernel calls, timed together (a port allocated and
    deallocated, and a look for that message: traps into machd's kernel, each under
    its kernel lock; a wait in the kernel would hide a stall, so none waits). Returns
    the median, 99th percentile and longest in microseconds, and the count."""
    me, took = pymach.task_self(), []
    while True:
        t0 = time.perf_counter()
        pymach.port_deallocate(me, pymach.port_allocate(me))
        try:
            pymach.msg_receive(pymach.task_notify(), pymach.RCV_TIMEOUT, 0)
            stop = True
        except TimeoutError:
            stop = False
        took.append(time.perf_counter() - t0)
        if stop:
            break
        time.sleep(0.001)
    took.sort()
    return [round(took[len(took) // 2] * 1e6), round(took[len(took) * 99 // 100] * 1e6),
            round(took[-1] * 1e6), len(took)]


def _probe_while(work: Callable[[], object]) -> list[int]:
    """_kernel_call_prober's figures, from another task, for the time `work()` takes."""
    h = pymach.spawn(_kernel_call_prober, name="kernel-call-prober")
    notify = pymach.task_get_special_port(h.port, pymach.TASK_NOTIFY_PORT)
    time.sleep(0.2)  # (its process up and calling)
    work()
    pymach.msg_send(Message(remote_port=notify, id=STOP))
    figures: list[int] = h.result(60_000)
    return figures


def bench_kernel_call_latency(size: int, seconds: float) -> dict[str, list[int]]:
    """The latency of another task's null kernel calls (`_kernel_call_prober`), for
    `seconds` alone, and while this task writes then reads back `size` bytes, more than
    machd's memory (bench_pressure: the pageout daemon evicts thousands of pages). The
    kernel lock is let go between pageout batches (kern/lock.py), so the longest call
    stays near one batch's work, not a whole scan's."""
    return {"alone": _probe_while(lambda: time.sleep(seconds)),
            "paging": _probe_while(lambda: bench_pressure(size))}


def bench_zero_fill_fault(pages: int) -> float:
    """Microseconds per zero-fill fault of a native task (machd, no pager)."""
    me = pymach.task_self()
    a = pymach.vm_allocate(me, 0, pages * PAGE, True)
    dt = _touch_each_page(a, pages * PAGE)
    pymach.vm_deallocate(me, a, pages * PAGE)
    return dt / pages * 1e6


def bench_numpy_fill(size: int) -> float:
    """Milliseconds for NumPy to fill (`arr[:] = 1`, uint8) a fresh `size`-byte region
    vm_allocate'd in this native task (the fill first touches every page: zero-fill
    faults served by machd)."""
    me = pymach.task_self()
    a = pymach.vm_allocate(me, 0, size, True)
    arr = np.frombuffer(pymach.memory().buffer(a, size), dtype=np.uint8)
    t0 = time.perf_counter()
    arr[:] = 1
    dt = time.perf_counter() - t0
    del arr
    pymach.vm_deallocate(me, a, size)
    return dt * 1e3


def bench_anonymous_fault(pages: int) -> float:
    """Microseconds per first touch of a page of anonymous shared memory (mmap of -1,
    which Python maps MAP_SHARED; Linux alone)."""
    m = mmap.mmap(-1, pages * PAGE)
    view = np.frombuffer(m, dtype=np.uint8)
    t0 = time.perf_counter()
    int(view[::PAGE].sum())
    dt = time.perf_counter() - t0
    del view
    m.close()
    return dt / pages * 1e6


def bench_stream(size: int) -> float:
    """GB/s reading every byte of a `size`-byte region backed by the Trivial pager."""
    h, a = _pager_region(size)
    view = np.frombuffer(pymach.memory().buffer(a, size), dtype=np.uint64)
    t0 = time.perf_counter()
    total = int(view.sum(dtype=np.uint64))
    dt = time.perf_counter() - t0
    assert total == (size // 8) * 0x0101010101010101 % (1 << 64)
    del view
    pymach.vm_deallocate(pymach.task_self(), a, size)
    h.result(60_000)
    return size / dt / 1e9


def bench_mmap_file(size: int) -> float:
    """GB/s reading every byte of a page-cached file through mmap."""
    with tempfile.TemporaryFile() as f:
        chunk = b"\1" * min(size, 64 * MIB)
        for _ in range(size // len(chunk)):
            f.write(chunk)
        f.flush()
        with mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as mm:
            view = np.frombuffer(mm, dtype=np.uint64)
            int(view.sum(dtype=np.uint64))  # into the page cache and this mapping
            del view
        with mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as mm:
            view = np.frombuffer(mm, dtype=np.uint64)
            t0 = time.perf_counter()
            int(view.sum(dtype=np.uint64))
            dt = time.perf_counter() - t0
            del view
    return size / dt / 1e9


# -- the runs ---------------------------------------------------------------------------
def run_ipc(n: int = 5000, rounds: int = 5) -> dict[str, Any]:
    """Native msg_rpc vs socketpair (target: at most 1.5x)."""
    with native_task():
        rpc = bench_rpc(n, rounds)
    sp = bench_socketpair(n, rounds)
    floor = baselines.channel_floor_us(n, rounds)
    return {"native_msg_rpc_us": round(rpc, 2), "socketpair_us": round(sp, 2),
            "ratio_msg_rpc_vs_socketpair": round(rpc / sp, 2), "target_ratio_at_most": 1.5,
            "channel_floor_us": round(floor, 2),  # the channels' system calls and codec
            "ratio_channel_floor_vs_socketpair": round(floor / sp, 2)}


def run_vm(size: int = GIB, rounds: int = 3) -> dict[str, Any]:
    """1 GiB OOL send+receive vs pickle over a Pipe (target: >= 1000x faster, <= 1 ms);
    the first send vs mprotect of the same size (target <= 1.2x); the send with
    deallocate and the receiver's vm_deallocate vs munmap + PUNCH_HOLE (target <= 2x)."""
    with native_task("--memory", f"{3 * size // MIB}M"):
        ool = bench_ool(size, rounds)
    pipe = bench_pickle_pipe(size) * 1e3
    mprot = statistics.median(baselines.mprotect_ms(size) for _ in range(rounds))
    unmap = statistics.median(baselines.munmap_punch_ms(size) for _ in range(rounds))
    return {"ool_bytes": size, "ool_first_send_ms": round(ool["first"], 3),
            "ool_repeat_send_ms": round(ool["again"], 3),
            "ool_deallocate_send_ms": round(ool["moved"], 3),
            "receiver_vm_deallocate_ms": round(ool["receiver_deallocate"], 3),
            "pickle_pipe_ms": round(pipe, 1),
            "speedup_first_send": round(pipe / ool["first"], 1),
            "speedup_deallocate_send": round(pipe / ool["moved"], 1),
            "target_speedup_at_least": 1000, "target_ms_at_most": 1.0,
            "mprotect_ms": round(mprot, 3),
            "ratio_ool_first_send_vs_mprotect": _ratio(ool["first"], mprot),
            "target_ratio_ool_first_send_vs_mprotect_at_most": 1.2,
            "munmap_punch_ms": round(unmap, 3),
            "ratio_receiver_vm_deallocate_vs_munmap_punch":
                _ratio(ool["receiver_deallocate"], unmap),
            "target_ratio_receiver_vm_deallocate_vs_munmap_punch_at_most": 2.0,
            "ratio_ool_deallocate_send_vs_munmap_punch": _ratio(ool["moved"], unmap),
            "target_ratio_ool_deallocate_send_vs_munmap_punch_at_most": 2.0}


def _ratio(figure: float, baseline: float) -> float:
    """figure / baseline, rounded to 3 significant digits."""
    return float(f"{figure / baseline:.3g}")


def run_pager(fault_pages: int = 4000, stream_size: int = GIB,
              fill_size: int = 64 * MIB, writeback_size: int = WRITEBACK,
              pressure: tuple[int, int] = (PRESSURE, PRESSURE_MEMORY),
              probe_s: float = PROBE_S) -> dict[str, Any]:
    """One-page pager faults (target <= 25 us, and <= 1x a naive Python userfaultfd
    handler), zero-fill faults (<= 3x the kernel's memfd first touch), a 1 GiB stream
    (target >= 2 GB/s, and >= 1x the naive handler's stream), a NumPy fill of fresh
    task memory (<= 3x the same fill of fresh anonymous memory), the write-back of
    `writeback_size` dirty bytes at unmap beside msync, and paging under memory pressure
    (`pressure`: bytes written and read back, machd's memory) beside a page at a time
    of pwrite and pread, and another task's kernel calls alone and during that paging
    (for `probe_s` seconds each; no targets)."""
    with native_task("--pager-cluster", "1", "--read-ahead", "1"):
        fault = statistics.median(bench_pager_fault(fault_pages) for _ in range(3))
        zero = statistics.median(bench_zero_fill_fault(fault_pages) for _ in range(3))
        fill = statistics.median(bench_numpy_fill(fill_size) for _ in range(3))
    anon = statistics.median(bench_anonymous_fault(fault_pages) for _ in range(3))
    naive = statistics.median(baselines.naive_uffd_fault_us(fault_pages) for _ in range(3))
    touch = statistics.median(baselines.memfd_first_touch_us(fault_pages) for _ in range(3))
    fill_anon = statistics.median(baselines.numpy_fill_anon_ms(fill_size) for _ in range(3))
    streams = run_streams(stream_size)
    c_three = run_c_three(fault_pages, stream_size)
    with native_task("--memory", f"{2 * stream_size // MIB}M", "--pager-cluster", "64"):
        writeback = statistics.median(bench_writeback(writeback_size) for _ in range(3))
    msync = statistics.median(baselines.msync_us_per_page(writeback_size) for _ in range(3))
    with native_task("--memory", f"{pressure[1] // MIB}M", "--pager-cluster", "16"):
        out, back = bench_pressure(pressure[0])
        pager_out = bench_pager_pressure(pressure[0])
    with native_task("--memory", f"{pressure[1] // MIB}M", "--pager-cluster", "16"):
        calls = bench_kernel_call_latency(pressure[0], probe_s)
    swap_out, swap_back = baselines.swap_file_us_per_page(pressure[0])
    return {"pager_fault_us": round(fault, 1), "zero_fill_fault_us": round(zero, 2),
            "anonymous_fault_us": round(anon, 2), "target_pager_fault_us_at_most": 25,
            "naive_uffd_fault_us": round(naive, 1),
            "ratio_pager_fault_vs_naive_uffd": _ratio(fault, naive),
            "target_ratio_pager_fault_vs_naive_uffd_at_most": 1.0,
            **c_three, **_c_three_ratios(c_three, fault, naive, streams["stream_gb_per_s"]),
            "memfd_first_touch_us": round(touch, 2),
            "ratio_zero_fill_fault_vs_memfd_first_touch": _ratio(zero, touch),
            "target_ratio_zero_fill_fault_vs_memfd_first_touch_at_most": 3.0,
            **streams,
            "numpy_fill_bytes": fill_size, "numpy_fill_native_ms": round(fill, 2),
            "numpy_fill_anon_ms": round(fill_anon, 2),
            "ratio_numpy_fill_native_vs_anon": _ratio(fill, fill_anon),
            "target_ratio_numpy_fill_native_vs_anon_at_most": 3.0,
            "writeback_bytes": writeback_size, "writeback_us_per_page": round(writeback, 1),
            "msync_us_per_page": round(msync, 2),
            "ratio_writeback_vs_msync": _ratio(writeback, msync),
            "pressure_bytes": pressure[0], "pressure_machd_memory": pressure[1],
            "pressure_write_us_per_page": round(out, 1),
            "pressure_read_back_us_per_page": round(back, 1),
            "swap_file_pwrite_us_per_page": round(swap_out, 2),
            "swap_file_pread_us_per_page": round(swap_back, 2),
            "ratio_pressure_write_vs_pwrite": _ratio(out, swap_out),
            "ratio_pressure_read_back_vs_pread": _ratio(back, swap_back),
            "pager_pressure_write_us_per_page": round(pager_out, 1),
            "ratio_pager_pressure_write_vs_pwrite": _ratio(pager_out, swap_out),
            "kernel_call_alone_us_median_p99_max_count": calls["alone"],
            "kernel_call_paging_us_median_p99_max_count": calls["paging"]}


def run_c_three(fault_pages: int, stream_size: int) -> dict[str, Any]:
    """The C baseline of the pager fault's three processes (baselines.c_three_*),
    built for this run: its one-page fault and its stream of 64-page clusters; or why
    it could not be built ("c_three_skipped")."""
    with tempfile.TemporaryDirectory() as d:
        try:
            program = baselines.c_three_program(d)
        except baselines.CBaselineUnavailable as e:
            return {"c_three_skipped": str(e)}
        fault = statistics.median(baselines.c_three_fault_us(program, fault_pages)
                                  for _ in range(3))
        stream = baselines.c_three_stream_gbps(program, stream_size, 64)
    return {"c_three_fault_us": round(fault, 1), "c_three_stream_gb_per_s": round(stream, 3)}


def _c_three_ratios(c_three: dict[str, Any], fault: float, naive: float,
                    stream: float) -> dict[str, Any]:
    """The pager fault and the naive handler's fault beside the C three-process fault,
    and the stream beside its stream."""
    if "c_three_fault_us" not in c_three:
        return {}
    c = c_three["c_three_fault_us"]
    return {"ratio_pager_fault_vs_c_three_fault": _ratio(fault, c),
            "ratio_naive_uffd_fault_vs_c_three_fault": _ratio(naive, c),
            "ratio_stream_vs_c_three_stream": _ratio(stream,
                                                     c_three["c_three_stream_gb_per_s"])}


def run_streams(size: int) -> dict[str, Any]:
    """A `size`-byte stream from the Trivial pager with 64-page clusters: with machd's
    default read-ahead (requests doubling up to 1024 pages) and without it, beside the
    naive handler's stream with 64-page and with 1024-page clusters, and mmap of a
    page-cached file."""
    with native_task("--memory", f"{2 * size // MIB}M", "--pager-cluster", "64"):
        stream = bench_stream(size)
    with native_task("--memory", f"{2 * size // MIB}M", "--pager-cluster", "64",
                     "--read-ahead", "64"):
        fixed = bench_stream(size)
    naive = baselines.naive_uffd_stream_gbps(size, 64)
    naive_large = baselines.naive_uffd_stream_gbps(size, 1024)
    cached = bench_mmap_file(size)
    return {"stream_bytes": size, "stream_cluster_pages": 64, "stream_read_ahead_pages": 1024,
            "stream_gb_per_s": round(stream, 3), "mmap_page_cache_gb_per_s": round(cached, 2),
            "ratio_stream_vs_mmap": round(stream / cached, 3),
            "target_stream_gb_per_s_at_least": 2.0,
            "naive_uffd_stream_gb_per_s": round(naive, 3),
            "ratio_stream_vs_naive_uffd_stream": _ratio(stream, naive),
            "target_ratio_stream_vs_naive_uffd_stream_at_least": 1.0,
            "naive_uffd_stream_1024_gb_per_s": round(naive_large, 3),
            "ratio_stream_vs_naive_uffd_stream_1024": _ratio(stream, naive_large),
            "stream_no_read_ahead_gb_per_s": round(fixed, 3),
            "ratio_stream_no_read_ahead_vs_naive_uffd_stream": _ratio(fixed, naive)}


HUGE = 2 * MIB
HUGE_READ_AHEAD = 64  # bench huge's second stream: --read-ahead 64 (2 MiB pages)


def run_huge(size: int = GIB, rounds: int = 3, fill_size: int = 64 * MIB) -> dict[str, Any]:
    """The vm and stream figures again with 2 MiB pages (machd --page-size 2M: hugetlb
    memfds), each beside its baseline from this run: a 1 GiB OOL first send (target
    <= 1 ms) and the receiver's deallocate, a 1 GiB stream
    from the Trivial pager in 4-page (8 MiB) clusters (>= 2 GB/s, and >= 1x the naive
    handler's 4 KiB stream; machd's default read-ahead, 16 MiB of pages, lets requests
    grow to 8 pages), the same with requests growing to HUGE_READ_AHEAD pages
    (--read-ahead; the kernel asks at most 64 MiB at once), and the NumPy fill (<= 3x
    anonymous memory, 4 KiB pages). The receiver's deallocate is shown beside munmap +
    PUNCH_HOLE of a 4 KiB memfd, for scale only (huge pages make both cheaper). Needs
    vm.nr_hugepages to hold 3 GiB; otherwise says so and measures nothing."""
    memory = 3 * size
    if not hugetlb.uses_huge_pages(HUGE) or hugetlb.free_huge_pages() < memory // HUGE:
        return {"huge_pages_skipped": f"needs {memory // HUGE} free 2 MiB huge pages "
                f"(sysctl vm.nr_hugepages); {hugetlb.free_huge_pages()} are free"}
    opts = ("--page-size", "2M", "--memory", f"{memory // MIB}M")
    with native_task(*opts):
        ool = bench_ool(size, rounds)
        fill = statistics.median(bench_numpy_fill(fill_size) for _ in range(3))
    with native_task(*opts, "--pager-cluster", "4"):
        stream = bench_stream(size)
    with native_task(*opts, "--pager-cluster", "4", "--read-ahead", str(HUGE_READ_AHEAD)):
        stream_ahead = bench_stream(size)
    punch = baselines.munmap_punch_ms(size)
    naive_stream = baselines.naive_uffd_stream_gbps(size, 64)
    fill_anon = statistics.median(baselines.numpy_fill_anon_ms(fill_size) for _ in range(3))
    return {"huge_page_bytes": HUGE, "huge_ool_first_send_ms": round(ool["first"], 3),
            "huge_ool_deallocate_send_ms": round(ool["moved"], 3),
            "huge_target_ool_first_send_ms_at_most": 1.0,
            "huge_receiver_vm_deallocate_ms": round(ool["receiver_deallocate"], 2),
            "munmap_punch_4k_ms": round(punch, 1),  # the 4 KiB baseline, for scale
            "huge_stream_gb_per_s": round(stream, 3),
            "huge_target_stream_gb_per_s_at_least": 2.0,
            "huge_ratio_stream_vs_naive_uffd_stream": _ratio(stream, naive_stream),
            "huge_stream_read_ahead_pages": HUGE_READ_AHEAD,
            "huge_stream_read_ahead_gb_per_s": round(stream_ahead, 3),
            "huge_numpy_fill_native_ms": round(fill, 2),
            "huge_ratio_numpy_fill_native_vs_anon": _ratio(fill, fill_anon)}


def run(what: str, n: int = 5000, rounds: int = 5) -> dict[str, Any]:
    """One native benchmark group, or all of them."""
    out: dict[str, Any] = {"benchmark": what, "mode": "native"}
    if what in ("ipc", "all"):
        out.update(run_ipc(n, rounds))
    if what in ("vm", "all"):
        out.update(run_vm(rounds=min(rounds, 3)))
    if what in ("pager", "all"):
        out.update(run_pager())
    if what in ("huge", "all"):
        out.update(run_huge(rounds=min(rounds, 3)))
    return out
