"""`pymach bench cache`: section 9, mapped files cached by the kernel versus read calls.

A set of files is read twice, whole, by a client task, in two ways on the same kernel:

- *mapped*: through the section 4.1 file server (fs_read_file maps each file; touching
  its pages makes pager_data_request calls; the server allows caching);
- *read calls*: through a server that answers each 4 KiB read with a message and reads
  the disk for each, like a UNIX read() without a buffer cache of its own.

For each pass it reports the time, the client's messages to the server, the kernel's
messages to the data manager (pager messages), and the server's disk reads (I/O
operations). The paper's claim is that the kernel's cache makes repeated reads need
far fewer I/O operations; here the second mapped pass needs none.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import pymach
from pymach import Message, Port
from pymach.kern.mig import BYTES, INT, STR, Subsystem
from pymach.pagers.data_manager import DataManager
from pymach.pagers.fs import FileServer, fs_read_file

CHUNK = 4096

rs_defs = Subsystem("rs", 6100)
rs_defs.routine("rs_read", "server", [("name", STR), ("offset", INT), ("length", INT)],
                [("data", BYTES)], "Read bytes of a file (one disk read per call).")
rs_defs.routine("rs_size", "server", [("name", STR)], [("size", INT)], "A file's size.")
rs_read = rs_defs.stub("rs_read")
rs_size = rs_defs.stub("rs_size")


class ReadServer(DataManager):
    """A file server without mapping: every read is a message and a disk read."""

    services = (rs_defs,)
    threads = 1

    def __init__(self, root: str) -> None:
        super().__init__()
        self.root = root
        self.disk_reads = 0

    def rs_read(self, server: int, name: str, offset: int, length: int) -> bytes:
        self.disk_reads += 1
        with open(os.path.join(self.root, name), "rb") as f:
            f.seek(offset)
            return f.read(length)

    def rs_size(self, server: int, name: str) -> int:
        return os.path.getsize(os.path.join(self.root, name))


def _serve(dm: DataManager) -> None:
    me = pymach.task_self()
    back = pymach.msg_receive(pymach.task_notify(), pymach.RCV_TIMEOUT, 30_000)
    svc = pymach.port_allocate(me)
    pymach.port_enable(me, svc)
    pymach.msg_send(Message(remote_port=back.items[0].value,  # type: ignore[arg-type]
                            items=[Port(svc, pymach.MAKE_SEND)]))
    dm.serve()


def _start(kernel: pymach.Kernel, dm: DataManager, name: str) -> int:
    me = pymach.task_self()
    inbox = pymach.port_allocate(me)
    h = kernel.spawn(_serve, dm, name=name)
    notify = pymach.task_get_special_port(h.port, pymach.TASK_NOTIFY_PORT)
    pymach.msg_send(Message(remote_port=notify, items=[Port(inbox, pymach.MAKE_SEND)]))
    port: int = pymach.msg_receive(inbox, pymach.RCV_TIMEOUT, 30_000).items[0].value  # type: ignore[assignment]
    return port


def _server_port() -> int:
    """The server this client was started for: its bootstrap port (see _measure)."""
    port: int = pymach.task_get_special_port(pymach.task_self(), pymach.TASK_BOOTSTRAP_PORT)
    return port


def _mapped_pass(names: list[str]) -> tuple[int, int]:
    """Read every file through mapping; (bytes checksum, client messages)."""
    server = _server_port()
    me = pymach.task_self()
    mem = pymach.memory()
    total = 0
    for name in names:
        address, size = fs_read_file(server, name)
        for off in range(0, size, CHUNK):
            total += sum(mem[address + off:address + off + CHUNK])
        pymach.vm_deallocate(me, address, size)
    return total, len(names)


def _read_pass(names: list[str]) -> tuple[int, int]:
    """Read every file with one message per 4 KiB; (bytes checksum, client messages)."""
    server = _server_port()
    total = calls = 0
    for name in names:
        size = rs_size(server, name)
        calls += 1
        for off in range(0, size, CHUNK):
            total += sum(rs_read(server, name, off, CHUNK))
            calls += 1
    return total, calls


def _measure(kernel: pymach.Kernel, fn: Any, server: int, names: list[str],
             dm: Any) -> dict[str, Any]:
    pymach.task_set_special_port(pymach.task_self(), pymach.TASK_BOOTSTRAP_PORT, server)
    pager0, disk0 = kernel.vm_stat()["pager_messages"], dm.disk_reads
    t0 = time.perf_counter()
    checksum, calls = kernel.run(fn, names, name="client")  # inherits `server`
    return {"ms": round((time.perf_counter() - t0) * 1e3, 2), "client_messages": calls,
            "pager_messages": kernel.vm_stat()["pager_messages"] - pager0,
            "io_operations": dm.disk_reads - disk0, "checksum": checksum}


def run(files: int = 16, file_size: int = 64 * 1024) -> dict[str, Any]:
    """Both ways, two passes each, on one kernel; see the module docstring."""
    with tempfile.TemporaryDirectory(prefix="pymach-cache-") as root:
        names = [f"f{i:03d}" for i in range(files)]
        for i, name in enumerate(names):
            with open(os.path.join(root, name), "wb") as f:
                f.write(bytes((i + j) % 251 for j in range(file_size)))
        with pymach.boot() as kernel:
            fs, rs = FileServer(root), ReadServer(root)
            fs_port, rs_port = _start(kernel, fs, "fs"), _start(kernel, rs, "rs")
            mapped = [_measure(kernel, _mapped_pass, fs_port, names, fs) for _ in range(2)]
            reads = [_measure(kernel, _read_pass, rs_port, names, rs) for _ in range(2)]
    assert len({r["checksum"] for r in mapped + reads}) == 1, "the ways disagree on data"
    io_mapped = sum(r["io_operations"] for r in mapped)
    io_reads = sum(r["io_operations"] for r in reads)
    return {
        "benchmark": "cache", "files": files, "file_size": file_size,
        "mapped_pass1": _strip(mapped[0]), "mapped_pass2": _strip(mapped[1]),
        "read_calls_pass1": _strip(reads[0]), "read_calls_pass2": _strip(reads[1]),
        "io_operations_mapped_total": io_mapped, "io_operations_read_calls_total": io_reads,
        "ratio_io_read_calls_vs_mapped": round(io_reads / max(io_mapped, 1), 2),
        "ratio_time_pass2_read_calls_vs_mapped": round(
            reads[1]["ms"] / max(mapped[1]["ms"], 1e-3), 2),
    }


def _strip(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if k != "checksum"}
