"""The two data managers of paper section 4, and the cache of section 9.

4.1, a minimal filesystem (pagers/fs.py): fs_read_file returns the whole file as new
copy-on-write memory, so other clients keep seeing the original while one changes its
copy; fs_write_file stores data back (here: into a real directory). The server maps
each file's memory object into its own space and sends the region through IPC; it
allows caching, so a file read again costs no pager messages at all (section 9).

4.2, consistent network shared memory (pagers/shm.py), across hosts joined by
pymach.Network: the server on host A hands out memory object X; clients on B, C and D
map it, and every kernel calls pager_init once. Pages are read-many / write-one: reads
come with a write lock, a write makes the server flush every other copy before it
grants access. So memory stays sequentially consistent: no write is lost even when
every client writes its own slot of one page (false sharing), each client sees every
slot only move forward, and the store-buffering and message-passing litmus tests never
show a forbidden outcome. Multi-host runs use the free scheduler.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import pymach as m
from machutil import assert_kernel_ok, start_thread
from pagerutil import (
    PS,
    finished,
    pager_messages,
    pattern,
    read,
    run_in_task,
    spawn_service,
    write,
)
from pymach.net.netname import netname_wait
from pymach.pagers.fs import FileServer, fs_read_file, fs_write_file
from pymach.pagers.shm import SharedMemoryServer, shm_get_region

ROOT = Path(__file__).resolve().parents[1]
FILE_SIZE = 5 * PS + 100  # not a whole number of pages



# -- 4.1: the minimal filesystem ---------------------------------------------------------------


@pytest.fixture
def fs(kernel: m.Kernel, tmp_path: Path) -> Iterator[tuple[m.Kernel, Path, FileServer, int]]:
    """A file server on a directory holding file "f"; the test task's bootstrap port is
    the server's port, so the tasks it creates inherit it."""
    (tmp_path / "f").write_bytes(pattern(3, FILE_SIZE))
    server = FileServer(str(tmp_path))
    handle, port = spawn_service(kernel, server, name="fs")
    m.task_set_special_port(m.task_self(), m.TASK_BOOTSTRAP_PORT, port)
    yield kernel, tmp_path, server, port
    with contextlib.suppress(m.MachError):  # (it may have died)
        m.task_terminate(handle.port)


def _server_port() -> int:
    port: int = m.task_get_special_port(m.task_self(), m.TASK_BOOTSTRAP_PORT)
    return port


def _read_whole(name: str) -> bytes:
    """A client: read a file, look at all of it, throw the copy away."""
    address, size = fs_read_file(_server_port(), name)
    data = read(address, size)
    m.vm_deallocate(m.task_self(), address, size)
    return data


def test_fs_read_file_returns_copy_on_write_memory(fs: tuple[Any, ...]) -> None:
    kernel, root, _, port = fs
    me = m.task_self()
    original = pattern(3, FILE_SIZE)
    address, size = fs_read_file(port, "f")
    assert size == FILE_SIZE
    assert read(address, size) == original
    (row,) = [r for r in kernel.vmmap("bootstrap") if r.start == address]
    assert row.end - row.start == 6 * PS
    assert re.search(r"over obj\d+ \(manager: fs\)", row.object), row.object
    # the server's own mapping of the file went with the message (deallocated on send)
    assert not [r for r in kernel.vmmap("fs") if "manager" in r.object]
    # the client changes its copy; meanwhile another client reads the file
    changed = bytearray(original)
    for i in range(0, size, 97):
        changed[i] = (changed[i] + 1) % 256
    write(address, bytes(changed[:3 * PS]))
    child = m.task_create(me, False)
    box = finished(run_in_task(child, _read_whole, "f"))
    write(address + 3 * PS, bytes(changed[3 * PS:]))
    assert box["result"] == original
    assert read(address, size) == bytes(changed)
    assert (root / "f").read_bytes() == original  # nothing was stored
    assert _read_whole("f") == original
    # the part of the last page past the end of the file reads as zeros
    assert read(address + size, 6 * PS - size) == bytes(6 * PS - size)
    m.vm_deallocate(me, address, size)
    m.task_terminate(child)


def test_fs_write_file_stores_the_bytes_on_disk(fs: tuple[Any, ...]) -> None:
    _, root, _, port = fs
    me = m.task_self()
    address, size = fs_read_file(port, "f")
    write(address + PS, b"changed by the client")
    fs_write_file(port, "f", address, size // 2)  # the paper's client: write back half
    expected = pattern(3, FILE_SIZE)[:size // 2]
    expected = expected[:PS] + b"changed by the client" + expected[PS + 21:]
    assert (root / "f").read_bytes() == expected
    fs_write_file(port, "new", b"bytes from a message", 20)  # a new file, from bytes
    assert (root / "new").read_bytes() == b"bytes from a message"
    assert _read_whole("new") == b"bytes from a message"
    assert _read_whole("f") == expected
    assert sorted(p.name for p in root.iterdir()) == ["f", "new"]  # no temporary files
    m.vm_deallocate(me, address, size)


def test_fs_an_old_copy_keeps_its_snapshot_after_a_rewrite(fs: tuple[Any, ...]) -> None:
    _, root, _, port = fs
    original = pattern(3, FILE_SIZE)
    address, size = fs_read_file(port, "f")
    assert read(address, 4) == original[:4]  # only page 0 has been read
    fs_write_file(port, "f", pattern(4, 2 * FILE_SIZE), 2 * FILE_SIZE)
    assert (root / "f").read_bytes() == pattern(4, 2 * FILE_SIZE)
    assert read(address, size) == original  # pages read after the rewrite: still old
    assert _read_whole("f") == pattern(4, 2 * FILE_SIZE)  # new readers get the new file
    m.vm_deallocate(m.task_self(), address, size)


def test_fs_bad_names_fail(fs: tuple[Any, ...]) -> None:
    _, root, _, port = fs
    (root.parent / "outside").write_bytes(b"not the server's")
    for name in ("..", ".", "", "../outside", "a/b", "/etc/passwd", str(root.parent),
                 "x/../../outside"):
        for call in (lambda n: fs_read_file(port, n), lambda n: fs_write_file(port, n, b"x", 1)):
            with pytest.raises(m.MachError) as e:
                call(name)
                pytest.fail(f"{name!r} was accepted")
            assert e.value.code == "KERN_INVALID_ARGUMENT", name
    with pytest.raises(m.MachError) as e:
        fs_read_file(port, "missing")
    assert e.value.code == "KERN_INVALID_NAME"
    (root / "empty").write_bytes(b"")
    assert fs_read_file(port, "empty")[1] == 0
    assert (root.parent / "outside").read_bytes() == b"not the server's"
    assert sorted(p.name for p in root.iterdir()) == ["empty", "f"]
    assert _read_whole("f") == pattern(3, FILE_SIZE)


@pytest.mark.parametrize("name", ["bad\0name", "dir", "n" * 300],
                         ids=["nul", "directory", "too-long"])
def test_fs_write_with_an_unusable_name_fails_and_the_server_lives(
        fs: tuple[Any, ...], name: str) -> None:
    _, root, _, port = fs
    (root / "dir").mkdir()
    _, box = start_thread(fs_write_file, port, name, b"data", 4)
    try:
        finished(box, 3000)
    except AssertionError:
        pytest.fail(f"fs_write_file({name[:12]!r}) got no reply: the server's thread died")
    assert box.get("error") in ("KERN_INVALID_ARGUMENT", "KERN_FAILURE", "KERN_INVALID_NAME")
    # the server still serves, with every thread
    for _ in range(3):
        _, box = start_thread(_read_whole, "f")
        assert finished(box, 3000)["result"] == pattern(3, FILE_SIZE)
    assert sorted(p.name for p in root.iterdir()) == ["dir", "f"]


def test_fs_second_read_needs_no_pager_messages(fs: tuple[Any, ...]) -> None:
    kernel, _, server, _ = fs
    before, disk = pager_messages(kernel), server.disk_reads
    assert _read_whole("f") == pattern(3, FILE_SIZE)
    first = pager_messages(kernel) - before
    assert first >= 6  # pager_init and a data request per page
    assert server.disk_reads - disk == 6
    before, disk = pager_messages(kernel), server.disk_reads
    child = m.task_create(m.task_self(), False)  # another client, too
    assert finished(run_in_task(child, _read_whole, "f"))["result"] == pattern(3, FILE_SIZE)
    assert _read_whole("f") == pattern(3, FILE_SIZE)
    assert pager_messages(kernel) - before == 0  # section 9: served from the cache
    assert server.disk_reads == disk
    assert kernel.vm_stat()["cached_objects"] >= 1
    m.task_terminate(child)
    assert_kernel_ok()


def _run_demo(part: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "pymach.cli.main", "demo", part],
                          capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)


def test_demo_fs_runs() -> None:
    r = _run_demo("fs")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "the original contents" in out
    assert "(matches)" in out
    assert "a later read sees the new file: yes" in out
    assert "same data, 0 kernel-to-manager messages" in out
    assert "CHANGED" not in out and "DIFFERS" not in out and "WRONG" not in out


# -- 4.2: consistent network shared memory ----------------------------------------------------

WAIT_S = 15.0


def map_region(name: str, size: int) -> int:
    """Ask the server for a region and map it (from a task on any host)."""
    x, size = shm_get_region(netname_wait("shm", WAIT_S * 1000), name, size)
    address: int = m.vm_allocate_with_pager(m.task_self(), 0, size, True, x, 0)
    return address


def get(a: int) -> int:
    value: int = struct.unpack("<q", read(a, 8))[0]
    return value


def put(a: int, value: int) -> None:
    write(a, struct.pack("<q", value))


def pause() -> None:
    """Give the other hosts' threads a chance to run (real time, free scheduler)."""
    time.sleep(0.0002)


@contextlib.contextmanager
def shm_network(clients: str = "BCD") -> Iterator[tuple[m.Network, SharedMemoryServer,
                                                         dict[str, Any]]]:
    """Hosts A (the server) and one per client name."""
    srv = SharedMemoryServer()
    with m.Network() as net:
        a = net.host("A")
        a.start(srv.serve_as, "shm", name="shm-server")
        hosts = {"A": a, **{h: net.host(h) for h in clients}}
        yield net, srv, hosts


def run_clients(hosts: dict[str, Any], fn: Callable[..., Any],
                args: dict[str, tuple[Any, ...]]) -> dict[str, Any]:
    """Start fn(*args[h]) as a task on each host h; wait for all; their results."""
    handles = {h: hosts[h].start(fn, *a, name=f"client-{h}") for h, a in args.items()}
    deadline = time.monotonic() + WAIT_S
    return {h: handle.wait(max(100.0, (deadline - time.monotonic()) * 1000))
            for h, handle in handles.items()}


def test_shm_false_sharing_loses_no_write_and_stays_coherent() -> None:
    n, slots = 150, "BCD"

    def client(slot: int, start: threading.Barrier) -> dict[int, list[int]]:
        a = map_region("counters", PS)
        start.wait(WAIT_S)
        seen: dict[int, list[int]] = {s: [] for s in range(len(slots))}
        for i in range(1, n + 1):
            pause()
            put(a + 8 * slot, i)
            for s in range(len(slots)):
                seen[s].append(get(a + 8 * s))
        return seen

    t0 = time.monotonic()
    with shm_network(slots) as (_, srv, hosts):
        start = threading.Barrier(len(slots))
        results = run_clients(hosts, client, {h: (i, start) for i, h in enumerate(slots)})
        final = hosts["A"].start(lambda: [get(map_region("counters", PS) + 8 * s)
                                          for s in range(len(slots))]).wait(WAIT_S * 1000)
        log = list(srv.log)
    assert final == [n] * len(slots)  # no lost update, seen by a fresh reader
    for h, seen in results.items():
        me = slots.index(h)
        assert seen[me] == list(range(1, n + 1)), f"{h} did not read its own writes"
        for s, values in seen.items():
            assert values == sorted(values), f"{h} saw slot {s} go backwards"
            assert all(0 <= v <= n for v in values)
    # there was real contention: write access moved between the kernels many times
    assert sum("pager_flush_request" in line for line in log) >= 10
    # each kernel called pager_init once for X (the fresh reader's host too)
    inits = [line for line in log if line.startswith("pager_init")]
    assert len(inits) == len(set(inits)) == len(slots) + 1
    assert time.monotonic() - t0 < 20


def test_shm_store_buffering_litmus() -> None:
    trials = 25

    def thread(me: int, sync: threading.Barrier) -> list[int]:
        a = map_region("sb", 2 * trials * PS)
        out = []
        for t in range(trials):
            mine, other = a + (2 * t + me) * PS, a + (2 * t + 1 - me) * PS
            sync.wait(WAIT_S)
            put(mine, 1)
            out.append(get(other))
        return out

    with shm_network("BC") as (_, _, hosts):
        sync = threading.Barrier(2)
        results = run_clients(hosts, thread, {"B": (0, sync), "C": (1, sync)})
    outcomes = list(zip(results["B"], results["C"], strict=True))
    assert all(r in (0, 1) for pair in outcomes for r in pair)
    assert (0, 0) not in outcomes, f"store buffering seen: {outcomes}"


def test_shm_message_passing_litmus() -> None:
    trials = 25

    def producer(sync: threading.Barrier) -> None:
        a = map_region("mp", 2 * trials * PS)
        for t in range(trials):
            data, flag = a + 2 * t * PS, a + (2 * t + 1) * PS
            sync.wait(WAIT_S)
            put(data + 8 * (t % 8), 1000 + t)
            put(flag, 1)

    def consumer(sync: threading.Barrier) -> list[tuple[int, int]]:
        a = map_region("mp", 2 * trials * PS)
        out = []
        for t in range(trials):
            data, flag = a + 2 * t * PS, a + (2 * t + 1) * PS
            sync.wait(WAIT_S)
            deadline = time.monotonic() + 5
            while get(flag) != 1:
                assert time.monotonic() < deadline, f"trial {t}: the flag never came"
                pause()
            out.append((t, get(data + 8 * (t % 8))))
        return out

    with shm_network("BC") as (_, _, hosts):
        sync = threading.Barrier(2)
        results = run_clients(hosts, lambda role: producer(sync) if role == "p"
                              else consumer(sync), {"B": ("p",), "C": ("c",)})
    seen = results["C"]
    assert len(seen) == trials
    assert [v for t, v in seen if v != 1000 + t] == [], "the flag was seen before the data"


def test_shm_pager_init_once_per_kernel() -> None:
    together = threading.Barrier(6)

    def client(i: int) -> bytes:
        a = map_region("once", 4 * PS)
        b = map_region("once", 4 * PS)  # a second mapping: no second pager_init
        write(a + 8 * i, b"client %d" % i)
        together.wait(WAIT_S)  # every task keeps X mapped until all have written
        return read(b, 6 * 8)

    with shm_network("BCD") as (_, srv, hosts):
        handles = [hosts[h].start(client, i, name="client") for i, h in enumerate("BCDBCD")]
        deadline = time.monotonic() + WAIT_S
        results = [h.wait(max(100.0, (deadline - time.monotonic()) * 1000)) for h in handles]
        log = list(srv.log)
    expected = b"".join(b"client %d" % i for i in range(6))
    assert results == [expected] * 6
    inits = [line for line in log if line.startswith("pager_init")]
    assert sorted(inits) == [f"pager_init from kernel {i}" for i in (1, 2, 3)]


def test_demo_shm_runs() -> None:
    r = _run_demo("shm")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.count("pager_init from") == 2
    assert "pager_data_unlock from host B's kernel" in out
    assert "pager_flush_request to host C's kernel" in out
    assert "then wrote b'hello'" in out and "and then b'hello'" in out
