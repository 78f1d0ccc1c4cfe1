"""Baselines for the native speed targets, measured by Linux and plain Python alone.

Each native figure of `pymach bench ... --mode native` is printed beside one of these,
measured in the same run on the same machine (issue 10; the targets are in
../shared/DESIGN.md, Targets):

- `naive_uffd_fault_us` and `naive_uffd_stream_gbps`: a naive Python userfaultfd handler
  in a separate process serving a memfd mapped in this process (the floor for a pager
  fault and a pager stream, which cross machd and a pager task);
- `c_three_fault_us` and `c_three_stream_gbps`: the same served in C by two processes,
  one reading the userfaultfd and one writing the data (uffd_three.c, built here with
  the system's C compiler when there is one): pymach's topology of three processes
  (the faulting task, machd, the pager) with no Python in it;
- `memfd_first_touch_us`: the kernel's own first touch of a memfd page (for a zero-fill
  fault);
- `mprotect_ms`: write-protecting a resident region (for a first out-of-line send);
- `munmap_punch_ms`: unmapping and punching out a resident memfd (for freeing a region);
- `numpy_fill_anon_ms`: NumPy filling fresh anonymous memory (for filling task memory);
- `channel_floor_us`: the floor of a null `msg_rpc` over direct channels: two processes
  exchanging channel frames (include/direct.py's codec) with the system calls a
  receiving task makes (a poll of the channel, a doorbell and an alert, a peek of the
  whole frame, a read of its length) and nothing of the runtime's checks, locks, page
  counters or layers.

Pages are 4 KiB. The userfaultfd calls are pymach's own (`pymach.pmap.uffd`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib.resources
import mmap
import os
import select
import shlex
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import traceback
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from pymach.include import direct
from pymach.include.message import Message
from pymach.pmap.uffd import MODE_MINOR, MODE_MISSING, Uffd, UffdError, punch_hole

PAGE = 4096
ONES = 0x0101010101010101  # eight bytes of 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mprotect.restype = ctypes.c_int


def _resolve(uffd: Uffd, fd: int, base: int, start: int, data: bytes, copy: bool) -> bool:
    """Fill [start, start+len(data)) of the memfd with `data` and map it in the faulting
    process; returns whether UFFDIO_COPY is (now) the way to do it."""
    n = len(data)
    if not copy:
        os.pwrite(fd, data, start)
        try:
            done = uffd.cont(base + start, n)
        except UffdError as e:  # CONTINUE refused for a missing fault: copy instead
            if e.errno not in (errno.EINVAL, errno.ENOENT, errno.EFAULT):
                raise
            punch_hole(fd, start, n)
            copy = True
    if copy:
        src = ctypes.create_string_buffer(data, n)
        done = uffd.copy(base + start, ctypes.addressof(src), n)
    if not done:  # mapped already (EEXIST): just wake the faulting thread
        uffd.wake(base + start, n)
    return copy


def _serve_faults(uffd: Uffd, fd: int, base: int, size: int, run: int,
                  ctl: socket.socket) -> None:
    """The handler process: for each fault, the `run`-byte aligned block around it."""
    ones = b"\1" * run
    copy = False
    poll = select.poll()
    poll.register(uffd.fd, select.POLLIN)
    poll.register(ctl.fileno(), select.POLLIN)
    ctl.send(b"r")
    while True:
        ready = {f for f, _ in poll.poll()}
        for fault in uffd.read_events():
            start = (fault.address - base) // run * run
            data = ones if start + run <= size else ones[:size - start]
            copy = _resolve(uffd, fd, base, start, data, copy)
        if ctl.fileno() in ready:  # the benchmark closed its end: stop
            return


@contextlib.contextmanager
def _uffd_memfd(size: int) -> Iterator[tuple[int, Uffd, npt.NDArray[np.uint8]]]:
    """A memfd of `size` bytes rounded up to whole pages, mapped MAP_SHARED here and
    registered with a new userfaultfd for missing and minor faults: (the memfd, the
    userfaultfd, a NumPy view of the whole mapping). The caller hands the userfaultfd
    to a handler and closes its own copy."""
    whole = -(-size // PAGE) * PAGE
    fd = os.memfd_create("uffd-baseline", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, whole)
        m = mmap.mmap(fd, whole, mmap.MAP_SHARED)
        view = np.frombuffer(m, dtype=np.uint8)
        uffd = Uffd.create()
        try:
            uffd.register(view.ctypes.data, whole, MODE_MISSING | MODE_MINOR)
            yield fd, uffd, view
        finally:
            uffd.close()
            del view
            with contextlib.suppress(BufferError):  # a caller's view may still be alive
                m.close()
    finally:
        os.close(fd)


@contextlib.contextmanager
def naive_handler(size: int, cluster_pages: int = 1) -> Iterator[npt.NDArray[np.uint8]]:
    """A memfd of `size` bytes (rounded up to whole pages), mapped MAP_SHARED here and
    registered with a userfaultfd for missing and minor faults; yields a NumPy view of
    its first `size` bytes. Only a handler process forked for the block holds the
    userfaultfd. For each fault it reads the event, `pwrite`s the aligned block of
    `cluster_pages` pages around the fault with 1s into the memfd (which creates the
    pages), and maps the block with one UFFDIO_CONTINUE: Linux 6.18 accepts CONTINUE
    for a missing fault on shmem once the page is in the memfd. Were it refused, the
    handler would punch the block out again and fill it with UFFDIO_COPY instead.
    pymach's pager faults are such missing faults, resolved the same way by machd
    (pwritev, then UFFDIO_CONTINUE). If the handler dies, the userfaultfd closes and
    the faults fill with zeros."""
    with _uffd_memfd(size) as (fd, uffd, view):
        here, there = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # the handler process
            code = 1
            try:
                here.close()
                _serve_faults(uffd, fd, view.ctypes.data, len(view), cluster_pages * PAGE,
                              there)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        uffd.close()  # only the handler holds the userfaultfd now
        there.close()
        try:
            here.recv(1)  # the handler is polling
            yield view[:size]
        finally:
            here.close()
            os.waitpid(pid, 0)


class CBaselineUnavailable(Exception):
    """The C baseline cannot be built here (no C compiler, or it failed): the reason."""


def c_three_program(directory: str) -> str:
    """Compile uffd_three.c (this package's C baseline of pymach's three-process pager
    fault) with the system's C compiler ($CC, else cc) into `directory`; returns the
    program's path. CBaselineUnavailable if there is no compiler or it fails."""
    cc = shlex.split(os.environ.get("CC", "")) or [shutil.which("cc") or ""]
    if not cc[0]:
        raise CBaselineUnavailable("no C compiler (cc, or $CC)")
    out = os.path.join(directory, "uffd_three")
    with importlib.resources.as_file(
            importlib.resources.files("pymach.bench") / "uffd_three.c") as source:
        try:
            done = subprocess.run([*cc, "-O2", "-o", out, str(source)],
                                  capture_output=True, text=True, check=False)
        except OSError as e:  # $CC names no program
            raise CBaselineUnavailable(f"{cc[0]}: {e.strerror}") from None
    if done.returncode != 0:
        raise CBaselineUnavailable(f"{cc[0]} failed: {done.stderr.strip()[-500:]}")
    return out


@contextlib.contextmanager
def c_three_handler(program: str, size: int,
                    cluster_pages: int = 1) -> Iterator[npt.NDArray[np.uint8]]:
    """As `naive_handler`, but served by `program` (c_three_program) in C and over two
    processes, as pymach's pager fault crosses machd and a pager task: one reads the
    userfaultfd and asks the other over a socketpair, which `pwrite`s the block into
    the memfd and answers; the first then maps it with UFFDIO_CONTINUE."""
    with _uffd_memfd(size) as (fd, uffd, view):
        here, there = socket.socketpair()
        args = (uffd.fd, fd, view.ctypes.data, len(view), cluster_pages * PAGE,
                there.fileno())
        proc = subprocess.Popen([program, *map(str, args)],
                                pass_fds=(uffd.fd, fd, there.fileno()))
        uffd.close()  # only the C handler holds the userfaultfd now
        there.close()
        try:
            if here.recv(1) != b"r":
                raise RuntimeError(f"the C handler did not start (status {proc.wait()})")
            yield view[:size]
        finally:
            here.close()
            proc.wait(30)


def naive_uffd_fault_us(pages: int) -> float:
    """Microseconds per one-page fault served by `naive_handler` (one page per fault):
    reading one byte of each of `pages` pages, in order, each page touched once."""
    return _fault_us(naive_handler(pages * PAGE, 1), pages)


def c_three_fault_us(program: str, pages: int) -> float:
    """As naive_uffd_fault_us, served by `c_three_handler`."""
    return _fault_us(c_three_handler(program, pages * PAGE, 1), pages)


def _fault_us(handler: contextlib.AbstractContextManager[npt.NDArray[np.uint8]],
              pages: int) -> float:
    """Microseconds per fault reading one byte of each page of `handler`'s region (of
    `pages` pages, one per fault), in order; checks the bytes read."""
    with handler as view:
        t0 = time.perf_counter()
        total = int(view[::PAGE].sum())
        dt = time.perf_counter() - t0
    if total != pages:
        raise RuntimeError(f"the handler's pages read {total}, not {pages}")
    return dt / pages * 1e6


def naive_uffd_stream_gbps(size: int, cluster_pages: int = 64) -> float:
    """GB/s reading every byte (a NumPy sum) of a `size`-byte region served by
    `naive_handler` with `cluster_pages` pages per fault."""
    return _stream_gbps(naive_handler(size, cluster_pages), size)


def c_three_stream_gbps(program: str, size: int, cluster_pages: int = 64) -> float:
    """As naive_uffd_stream_gbps, served by `c_three_handler`."""
    return _stream_gbps(c_three_handler(program, size, cluster_pages), size)


def _stream_gbps(handler: contextlib.AbstractContextManager[npt.NDArray[np.uint8]],
                 size: int) -> float:
    """GB/s summing every byte of `handler`'s `size`-byte region; checks the sum."""
    with handler as view:
        words = view.view(np.uint64)
        t0 = time.perf_counter()
        total = int(words.sum(dtype=np.uint64))
        dt = time.perf_counter() - t0
        del words
    if total != (size // 8) * ONES % (1 << 64):
        raise RuntimeError("the handler's stream read wrong bytes")
    return size / dt / 1e9


@contextlib.contextmanager
def _memfd_map(size: int) -> Iterator[tuple[int, mmap.mmap]]:
    """A fresh memfd of `size` bytes mapped MAP_SHARED: (fd, mapping)."""
    fd = os.memfd_create("baseline", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        m = mmap.mmap(fd, size, mmap.MAP_SHARED)
        yield fd, m
        with contextlib.suppress(BufferError):  # else it is unmapped when last used
            m.close()
    finally:
        os.close(fd)


def memfd_first_touch_us(pages: int) -> float:
    """Microseconds per first touch of a page of a fresh memfd mapped MAP_SHARED (Linux
    allocates a zeroed page): reading one byte of each of `pages` pages, in order."""
    with _memfd_map(pages * PAGE) as (_, m):
        view = np.frombuffer(m, dtype=np.uint8)
        t0 = time.perf_counter()
        int(view[::PAGE].sum())
        dt = time.perf_counter() - t0
        del view
    return dt / pages * 1e6


def mprotect_ms(size: int) -> float:
    """Milliseconds for mprotect(PROT_READ) of a `size`-byte MAP_SHARED memfd mapping
    whose 4 KiB pages are all resident and mapped writable (each written once)."""
    with _memfd_map(size) as (_, m):
        view = np.frombuffer(m, dtype=np.uint8)
        view[::PAGE] = 1
        t0 = time.perf_counter()
        rc = _libc.mprotect(view.ctypes.data, size, mmap.PROT_READ)
        dt = time.perf_counter() - t0
        del view
    if rc != 0:
        raise OSError(ctypes.get_errno(), "mprotect")
    return dt * 1e3


def munmap_punch_ms(size: int) -> float:
    """Milliseconds to munmap a `size`-byte MAP_SHARED memfd mapping whose 4 KiB pages
    are all resident and mapped (each written once), then fallocate(PUNCH_HOLE) the
    whole memfd (which frees the pages)."""
    with _memfd_map(size) as (fd, m):
        view = np.frombuffer(m, dtype=np.uint8)
        view[::PAGE] = 1
        del view
        t0 = time.perf_counter()
        m.close()
        punch_hole(fd, 0, size)
        return (time.perf_counter() - t0) * 1e3


def msync_us_per_page(size: int) -> float:
    """Microseconds per page for msync (mmap.flush) of a `size`-byte MAP_SHARED mapping
    of a new file in the temporary directory whose 4 KiB pages are all dirty (each
    written once): the kernel's own write-back of a mapped file to its disk (if the
    temporary directory is a tmpfs, only the call's cost)."""
    with tempfile.TemporaryFile() as f:
        f.truncate(size)
        with mmap.mmap(f.fileno(), size) as m:
            view = np.frombuffer(m, dtype=np.uint8)
            view[::PAGE] = 7
            del view
            t0 = time.perf_counter()
            m.flush()
            dt = time.perf_counter() - t0
    return dt / (size // PAGE) * 1e6


def swap_file_us_per_page(size: int) -> tuple[float, float]:
    """Microseconds per page to write `size` bytes to a new file in the temporary
    directory a 4 KiB page per `pwrite`, then to read them back a page per `pread`, from
    Python: the I/O a default pager written in Python does for each page it stores and
    returns, with none of the paging around it. (write, read)."""
    page = bytes(range(256)) * (PAGE // 256)
    n = size // PAGE
    with tempfile.TemporaryFile() as f:
        fd = f.fileno()
        t0 = time.perf_counter()
        for i in range(n):
            os.pwrite(fd, page, i * PAGE)
        t1 = time.perf_counter()
        for i in range(n):
            os.pread(fd, PAGE, i * PAGE)
        t2 = time.perf_counter()
    return (t1 - t0) / n * 1e6, (t2 - t1) / n * 1e6


def numpy_fill_anon_ms(size: int) -> float:
    """Milliseconds for NumPy to fill (`arr[:] = 1`) a fresh `size`-byte private
    anonymous mapping of uint8 (every page first touched by the fill)."""
    m = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    arr = np.frombuffer(m, dtype=np.uint8)
    t0 = time.perf_counter()
    arr[:] = 1
    dt = time.perf_counter() - t0
    del arr
    m.close()
    return dt * 1e3


_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT
_SEND = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL


class _ChannelSide:
    """One process's end of `channel_floor_us`: it takes a frame as a receiving task
    takes one and answers with a frame as a sending task writes one."""

    def __init__(self, rx: socket.socket, tx: socket.socket) -> None:
        self.rx, self.tx, self.seq = rx, tx, 0
        self.buf = bytearray(direct.FRAME_MAX)
        self.view = memoryview(self.buf)
        self.fds = [os.eventfd(0)]  # a doorbell and an alert, never rung
        try:
            self.fds.append(os.eventfd(0))
        except OSError:
            self.close()
            raise
        self.poller = select.poll()
        for fd in (rx.fileno(), *self.fds):
            self.poller.register(fd, select.POLLIN)

    def send(self, msg_id: int) -> None:
        self.seq += 1
        try:
            self.tx.send(direct.encode_packet(Message(id=msg_id), 1, self.seq), _SEND)
        except (BrokenPipeError, ConnectionResetError) as e:  # (it ended first)
            raise EOFError("the other side of the channel floor ended") from e

    def take(self) -> Message:
        self.poller.poll()
        n = self.rx.recv_into(self.buf, direct.FRAME_MAX, _PEEK)
        if not n:
            raise EOFError("the other side of the channel floor ended")
        length, msg_id, _, items = direct.parse_frame(self.view, n)
        self.rx.recv_into(self.buf, length, socket.MSG_DONTWAIT)
        return Message(1, 2, msg_id, items)

    def close(self) -> None:
        self.view.release()
        for fd in self.fds:
            os.close(fd)


def channel_floor_us(n: int, rounds: int) -> float:
    """Median microseconds per round trip of the direct channels' floor (see the module
    docstring): `rounds` rounds of `n`, after a few to warm up. Each process closes the
    other's ends, so either one ending ends the other's wait (EOFError in the client,
    never a hang)."""
    a1, b1 = socket.socketpair()
    a2, b2 = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the server: answer every frame until the client's end closes
        status = 1
        try:
            a1.close()
            a2.close()
            side = _ChannelSide(b1, b2)
            while True:
                side.send(side.take().id + 100)
        except EOFError:
            status = 0
        finally:
            os._exit(status)
    b1.close()
    b2.close()
    try:
        return _time_channel_side(_ChannelSide(a2, a1), n, rounds)
    finally:
        a1.close()
        a2.close()
        os.waitpid(pid, 0)


def _time_channel_side(side: _ChannelSide, n: int, rounds: int) -> float:
    """The client's rounds of channel_floor_us (its side closed at the end)."""
    samples = []
    try:
        for _ in range(10):
            side.send(1)
            side.take()
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(n):
                side.send(1)
                side.take()
            samples.append(time.perf_counter() - t0)
    finally:
        side.close()
    return statistics.median(samples) / n * 1e6
