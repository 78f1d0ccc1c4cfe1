"""`pymach bench unixio`: the UNIX file library of section 8.1 against read calls.

Two figures, each with its baseline from the same run (issue 12):

1. **Re-reading files, `passes` passes** (section 9). A set of files is read whole, in
   4 KiB reads, once per pass, each pass by a new client task: through `unixio`
   (open maps the file, read copies from the mapping, close unmaps it; the kernel keeps
   the pages cached between passes), and through a server that answers every read with
   a message and a disk read (`bench.cache.ReadServer`). Per pass: the client's
   messages to its server, the kernel's messages to the data manager (pager messages),
   and the disk reads (I/O operations). Target: >= 10x fewer I/O operations mapped.
2. **`read` of resident pages**: a page-cached file read through `unixio.read` (and
   `readinto`) after its pages are resident, against `os.read` (and `os.readv` into a
   buffer) of the same file, for several read sizes. Target, native mode: >= 0.5x the
   bytes per second of `os.read`. In embedded mode every access goes through the
   software MMU, so the figure is reported but the target is native mode's.

`run(mode="native")` starts its own machd and makes this process a task of it.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import pymach
from pymach import MAKE_SEND, Message, Port
from pymach.apps import unixio
from pymach.apps.unixio_server import start_server
from pymach.bench.cache import ReadServer, rs_read, rs_size

CHUNK = 4096
MIB = 1 << 20


# -- the read-per-call server in a task of its own (both modes) ----------------------------------

def _read_server_main(root: str) -> None:
    server = ReadServer(root)
    me = pymach.task_self()
    port = pymach.port_allocate(me)
    pymach.port_enable(me, port)
    inbox = pymach.msg_receive(pymach.task_notify(), pymach.RCV_TIMEOUT, 30_000)
    pymach.msg_send(Message(remote_port=inbox.items[0].value,  # type: ignore[arg-type]
                            items=[Port(port, MAKE_SEND)]))
    server.serve()


def _start_read_server(root: str) -> tuple[Any, int]:
    me = pymach.task_self()
    inbox = pymach.port_allocate(me)
    handle = pymach.spawn(_read_server_main, root, name="read-server")
    notify = pymach.task_get_special_port(handle.port, pymach.TASK_NOTIFY_PORT)
    pymach.msg_send(Message(remote_port=notify, items=[Port(inbox, MAKE_SEND)]))
    port: int = pymach.msg_receive(inbox, pymach.RCV_TIMEOUT, 30_000).items[0].value  # type: ignore[assignment]
    pymach.port_deallocate(me, inbox)
    return handle, port


# -- one pass of each way, in a client task --------------------------------------------------------

def _mapped_pass(names: list[str], chunk: int) -> tuple[int, int]:
    """Read every file through unixio, `chunk` bytes a call; (checksum, calls)."""
    crc = calls = 0
    for name in names:
        fd = unixio.open(name)
        while data := unixio.read(fd, chunk):
            crc = zlib.crc32(data, crc)
            calls += 1
        unixio.close(fd)
    return crc, calls


def _read_calls_pass(names: list[str], chunk: int) -> tuple[int, int]:
    """Read every file with one message (and one disk read) per `chunk`; (checksum,
    disk reads)."""
    server = pymach.task_get_special_port(pymach.task_self(), pymach.TASK_BOOTSTRAP_PORT)
    crc = reads = 0
    for name in names:
        size = rs_size(server, name)
        for off in range(0, size, chunk):
            crc = zlib.crc32(rs_read(server, name, off, chunk), crc)
            reads += 1
    return crc, reads


def _in_child(server: int, fn: Callable[..., tuple[int, int]], *args: Any) -> tuple[
        tuple[int, int], float]:
    """Run fn in a new task whose bootstrap port is `server`; (its result, ms)."""
    me = pymach.task_self()
    pymach.task_set_special_port(me, pymach.TASK_BOOTSTRAP_PORT, server)
    t0 = time.perf_counter()
    result = pymach.spawn(fn, *args, name="client").result(600_000)
    return result, round((time.perf_counter() - t0) * 1e3, 2)


def reread(root: str, names: list[str], passes: int) -> dict[str, Any]:
    """Figure 1 (see module docstring): both ways, `passes` passes each. I/O
    operations are counted by the servers (the read-call server reads the disk once per
    call), with the bytes they read from disk."""
    sizes = {name: os.path.getsize(os.path.join(root, name)) for name in names}
    _, uio = start_server(root)
    _, rs = _start_read_server(root)
    mapped: dict[str, Any] = {}
    for n in range(1, passes + 1):
        before = unixio.server_stats(uio)
        (crc, _), ms = _in_child(uio, _mapped_pass, names, CHUNK)
        after = unixio.server_stats(uio)
        mapped[str(n)] = {"ms": ms, "checksum": crc,
                          # (less one: our own uio_stats request for `after`)
                          "server_messages": after["requests"] - before["requests"] - 1,
                          "pager_messages": after["pager_messages"] - before["pager_messages"],
                          "io_operations": after["disk_reads"] - before["disk_reads"],
                          "io_bytes": after["disk_bytes_read"] - before["disk_bytes_read"]}
    calls: dict[str, Any] = {}
    for n in range(1, passes + 1):
        (crc, reads), ms = _in_child(rs, _read_calls_pass, names, CHUNK)
        calls[str(n)] = {"ms": ms, "checksum": crc, "server_messages": reads + len(names),
                         "pager_messages": 0, "io_operations": reads,
                         "io_bytes": sum(sizes.values())}
    if len({p.pop("checksum") for p in (*mapped.values(), *calls.values())}) != 1:
        raise AssertionError("the two ways read different data")
    return {"mapped": mapped, "read_calls": calls}


# -- figure 2: read of resident pages -----------------------------------------------------------

def _rate(size: int, seconds: list[float]) -> float:
    """MB/s from the best of several timings (the machine's noise only slows a run)."""
    return round(size / min(seconds) / 1e6, 1)


def _time_reads(read: Callable[[int], int], seek: Callable[[], object], size: int,
                chunk: int, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        seek()
        t0 = time.perf_counter()
        got = 0
        while (n := read(chunk)) > 0:
            got += n
        times.append(time.perf_counter() - t0)
        if got != size:
            raise AssertionError(f"read {got} of {size} bytes")
    return _rate(size, times)


def _ways(fd: int, ofd: int, chunk: int) -> dict[str, tuple[Callable[[int], int],
                                                             Callable[[], object]]]:
    """The four ways of reading `chunk` bytes a call, each with its rewind."""
    buf = bytearray(chunk)

    def rewind() -> object:
        return unixio.lseek(fd, 0, os.SEEK_SET)

    def os_rewind() -> object:
        return os.lseek(ofd, 0, os.SEEK_SET)

    return {"unixio_read": (lambda n: len(unixio.read(fd, n)), rewind),
            "os_read": (lambda n: len(os.read(ofd, n)), os_rewind),
            "unixio_readinto": (lambda n: unixio.readinto(fd, buf), rewind),
            "os_readv": (lambda n: os.readv(ofd, [buf]), os_rewind)}


def read_resident(root: str, server: int, size: int, chunks: tuple[int, ...],
                  rounds: int) -> dict[str, Any]:
    """Figure 2 (see module docstring): MB/s per read size, both ways."""
    path = os.path.join(root, "resident")
    with open(path, "wb") as f:
        f.write(os.urandom(size))
    unixio.attach(server)
    fd, ofd = unixio.open("resident"), os.open(path, os.O_RDONLY)
    try:
        unixio.read(fd, size)  # every page resident (and the file in Linux's page cache)
        os.read(ofd, size)
        out: dict[str, Any] = {"file_size": size}
        for chunk in chunks:
            row: dict[str, float] = {
                way: _time_reads(read, rewind, size, chunk, rounds)
                for way, (read, rewind) in _ways(fd, ofd, chunk).items()}
            row["ratio_read_vs_os_read"] = round(row["unixio_read"] / row["os_read"], 2)
            row["ratio_readinto_vs_os_readv"] = round(
                row["unixio_readinto"] / row["os_readv"], 2)
            out[f"chunk_{chunk}"] = row
        return out
    finally:
        unixio.close(fd)
        os.close(ofd)


# -- the whole benchmark ---------------------------------------------------------------------------

@contextlib.contextmanager
def _kernel(mode: str) -> Iterator[None]:
    if mode == "native":
        from pymach.bench.native import native_task  # (NumPy: only native mode needs it)

        with native_task():
            yield
    else:
        with pymach.boot(memory_size=256 * MIB):
            yield


def run(mode: str = "embedded", files: int = 16, file_size: int = 64 * 1024,
        passes: int = 10, read_size: int | None = None,
        chunks: tuple[int, ...] = (4096, 65536, MIB), rounds: int = 3) -> dict[str, Any]:
    """Both figures on one kernel (see module docstring)."""
    if read_size is None:
        read_size = 64 * MIB if mode == "native" else 4 * MIB
    with tempfile.TemporaryDirectory(prefix="pymach-unixio-") as root, _kernel(mode):
        names = [f"f{i:03d}" for i in range(files)]
        for i, name in enumerate(names):
            with open(os.path.join(root, name), "wb") as f:
                f.write(bytes((i + j) % 251 for j in range(file_size)))
        ways = reread(root, names, passes)
        _, server = start_server(root, name="unixio-resident")
        resident = read_resident(root, server, read_size,
                                 tuple(c for c in chunks if c <= read_size), rounds)
    return _summary(mode, files, file_size, passes, ways, resident)


def _summary(mode: str, files: int, file_size: int, passes: int, ways: dict[str, Any],
             resident: dict[str, Any]) -> dict[str, Any]:
    totals = {way: {k: sum(p[k] for p in ways[way].values())
                    for k in ("server_messages", "pager_messages", "io_operations",
                              "io_bytes")}
              for way in ways}
    io_mapped = totals["mapped"]["io_operations"]
    io_calls = totals["read_calls"]["io_operations"]
    first = next(k for k in resident if k.startswith("chunk_"))
    return {
        "benchmark": "unixio", "mode": mode, "files": files, "file_size": file_size,
        "passes": passes, "mapped_passes": ways["mapped"],
        "read_call_passes": ways["read_calls"],
        "io_operations_mapped_total": io_mapped, "io_operations_read_calls_total": io_calls,
        "io_bytes_mapped_total": totals["mapped"]["io_bytes"],
        "io_bytes_read_calls_total": totals["read_calls"]["io_bytes"],
        "messages_mapped_total": totals["mapped"]["server_messages"]
        + totals["mapped"]["pager_messages"],
        "messages_read_calls_total": totals["read_calls"]["server_messages"],
        "ratio_io_read_calls_vs_mapped": round(io_calls / max(io_mapped, 1), 2),
        "target_ratio_io_read_calls_vs_mapped_at_least": 10,
        "read_resident": resident,
        "ratio_read_vs_os_read": resident[first]["ratio_read_vs_os_read"],
        "ratio_read_vs_os_read_median_of_sizes": statistics.median(
            r["ratio_read_vs_os_read"] for k, r in resident.items() if k.startswith("chunk_")),
        "target_ratio_read_vs_os_read_at_least": 0.5,
        "target_mode": "native",
    }
