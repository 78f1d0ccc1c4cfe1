"""Native mode: tasks are processes under machd, and their memory is real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import pymach as m
from nativeutil import running_machd
from pymach import Int, Message
from pymach.libmach.task import attach, detach

PS = 4096


def test_messages_and_ports(native: str) -> None:
    me = m.task_self()
    p = m.port_allocate(me)
    m.msg_send(Message(remote_port=p, id=7, items=[Int(41), m.Str("x")]))
    msg = m.msg_receive(p, m.RCV_TIMEOUT, 2000)
    assert (msg.id, msg.values()) == (7, [41, "x"])
    assert m.port_status(me, p) == (False, 0, 5, True, True)
    m.port_deallocate(me, p)


def test_memory_is_real_and_numpy_works_on_it(native: str) -> None:
    me = m.task_self()
    before = m.vm_statistics(me).zero_fill_count  # (the host's count: other tests' too)
    a = m.vm_allocate(me, 0, 16 * PS, True)
    mem = m.memory()
    buf = mem.buffer(a, 16 * PS)
    arr = np.frombuffer(buf, dtype=np.int64)
    arr[:] = np.arange(arr.size)
    assert int(arr.sum()) == arr.size * (arr.size - 1) // 2
    assert m.vm_read(me, a + 8, 8) == (1).to_bytes(8, "little")
    whole = m.vm_read(me, a, 16 * PS)  # the kernel reads every page: each is counted
    assert whole == arr.tobytes()
    assert m.vm_statistics(me).zero_fill_count - before >= 16


def _child_reads_and_writes(a: int) -> tuple[bytes, bytes]:
    mem = m.memory()
    seen = mem[a:a + 5]
    mem[a:a + 5] = b"CHILD"
    return seen, mem[a:a + 5]


def test_copy_on_write_between_processes(native: str) -> None:
    me = m.task_self()
    a = m.vm_allocate(me, 0, PS, True)
    mem = m.memory()
    mem[a:a + 5] = b"hello"
    child = m.spawn(_child_reads_and_writes, a, inherit=True)
    assert child.result(20_000) == (b"hello", b"CHILD")
    assert mem[a:a + 5] == b"hello"  # the parent's memory never changed
    mem[a:a + 5] = b"again"  # and stays writable (the copy's push is done)
    assert mem[a:a + 5] == b"again"


def _child_writes_shared(a: int) -> None:
    m.memory()[a:a + 6] = b"SHARED"


def test_shared_memory_between_processes(native: str) -> None:
    me = m.task_self()
    a = m.vm_allocate(me, 0, PS, True)
    m.vm_inherit(me, a, PS, m.VM_INHERIT_SHARE)
    m.spawn(_child_writes_shared, a, inherit=True).result(20_000)
    assert m.memory()[a:a + 6] == b"SHARED"


class Squares(m.DataManager):
    """Page n of the object holds the int64 n*n, repeated; changes are recorded."""

    def read(self, memory_object: int, offset: int, length: int, access: int) -> bytes:
        return b"".join(((offset // PS + i) ** 2).to_bytes(8, "little") * (PS // 8)
                        for i in range(length // PS))

    def write(self, memory_object: int, offset: int, data: bytes) -> None:
        self.written.append((offset, data[:8]))

    def pager_terminate(self, memory_object: int, request: int) -> None:
        self.stop()


def _pager_task() -> list[tuple[int, bytes]]:
    """A native pager task: hands its memory object to whoever asks, serves it."""
    dm = Squares()
    dm.written = []  # type: ignore[attr-defined]
    mo = dm.create_memory_object()
    ask = m.msg_receive(m.task_notify(), m.RCV_TIMEOUT, 20_000)
    m.msg_send(Message(remote_port=ask.items[0].value,  # type: ignore[arg-type]
                       items=[m.Port(mo, m.MAKE_SEND)]))
    dm.serve()
    return dm.written  # type: ignore[attr-defined, no-any-return]


def test_numpy_array_backed_by_a_python_pager_in_another_process(native: str) -> None:
    me = m.task_self()
    pager = m.spawn(_pager_task, name="squares")
    box = m.port_allocate(me)
    notify = m.task_get_special_port(pager.port, m.TASK_NOTIFY_PORT)
    m.msg_send(Message(remote_port=notify, items=[m.Port(box, m.MAKE_SEND)]))
    mo = m.msg_receive(box, m.RCV_TIMEOUT, 20_000).items[0].value
    n = 64
    a = m.vm_allocate_with_pager(me, 0, n * PS, True, mo, 0)
    arr = np.frombuffer(m.memory().buffer(a, n * PS), dtype=np.int64).reshape(n, PS // 8)
    assert [int(arr[i, 0]) for i in range(n)] == [i * i for i in range(n)]
    assert int(arr[7].sum()) == 49 * (PS // 8)
    arr[3, 0] = -1  # a write: the page goes back to the pager when we let go
    m.vm_deallocate(me, a, n * PS)
    assert pager.result(20_000) == [(3 * PS, (-1).to_bytes(8, "little", signed=True))]


def _tool(native: str, *argv: str) -> Any:
    out = subprocess.run([sys.executable, "-m", "pymach.cli.main", *argv, "--socket", native,
                          "--json"], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def test_ps_vmmap_lsmp_vm_stat_watch_a_running_machd(native: str) -> None:
    me = m.task_self()
    a = m.vm_allocate(me, 0, 8 * PS, True)
    m.memory()[a:a + 3 * PS] = b"x" * (3 * PS)  # three pages resident
    p = m.port_allocate(me)
    m.msg_send(Message(remote_port=p, id=1))
    rows = {r["name"]: r for r in _tool(native, "ps")}
    row = rows[m.task_info(me)[0]]
    assert row["resident_pages"] >= 3 and row["threads"][0]["state"] == "running"
    assert "pymach-report" not in rows and "default_pager" in rows
    regions = _tool(native, "vmmap", str(row["id"]))
    ours = [r for r in regions if r["start"] == a]
    assert ours and ours[0]["end"] == a + 8 * PS and ours[0]["resident"] == 3
    ports = {r["name"]: r for r in _tool(native, "lsmp", str(row["id"]))}
    assert ports[p]["queued"] == 1 and "recv" in ports[p]["rights"]
    stats = _tool(native, "vm_stat")
    assert stats["page_size"] == PS and stats["zero_fill_count"] >= 3
    text = subprocess.run([sys.executable, "-m", "pymach.cli.main", "ps", "--socket", native],
                          capture_output=True, text=True, timeout=60, check=True).stdout
    assert "default_pager" in text and "RES" in text
    bad = subprocess.run([sys.executable, "-m", "pymach.cli.main", "lsmp", "no-such-task",
                          "--socket", native], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "KERN_INVALID_TASK" in bad.stderr


@pytest.fixture(scope="module")
def small_machd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A machd with 64 frames of physical memory (256 KiB): everything pages."""
    yield from running_machd(tmp_path_factory, "--memory", "256K")


def _pattern(tag: int, pages: int) -> np.ndarray:
    return (np.arange(pages * PS // 8, dtype=np.int64) * 7919 + tag).reshape(pages, PS // 8)


def test_pageout_at_the_memory_limit_keeps_every_byte(small_machd: str) -> None:
    attach(small_machd, name="pressure")
    try:
        me, pages = m.task_self(), 512  # 8 times physical memory
        a = m.vm_allocate(me, 0, pages * PS, True)
        arr = np.frombuffer(m.memory().buffer(a, pages * PS), dtype=np.int64)
        arr = arr.reshape(pages, PS // 8)
        arr[:] = _pattern(3, pages)
        child = m.spawn(_sum_pages, a, pages, inherit=True)  # a COW copy under pressure
        arr[::2] += 1  # our writes stay ours
        assert child.result(60_000) == int(_pattern(3, pages).sum())
        want = _pattern(3, pages)
        want[::2] += 1
        assert np.array_equal(arr, want)
        stats = m.vm_statistics(me)
        assert stats.pageouts >= pages and stats.pageins >= pages
        assert stats.free_count + stats.active_count + stats.inactive_count + \
            stats.wire_count == 64
    finally:
        detach()


def _sum_pages(a: int, pages: int) -> int:
    return int(np.frombuffer(m.memory().buffer(a, pages * PS), dtype=np.int64).sum())


# -- a pager acting on the real mappings of every task that maps its object ------------
FLUSH, CLEAN, LOCK, STATS = range(4)


class Versioned(m.DataManager):
    """Each data request gets the next version number as the bytes of its pages."""

    def __init__(self) -> None:
        super().__init__()
        self.version = self.unlocks = 0
        self.written: list[tuple[int, bytes]] = []

    def read(self, memory_object: int, offset: int, length: int, access: int) -> bytes:
        self.version += 1
        return bytes([self.version]) * length

    def write(self, memory_object: int, offset: int, data: bytes) -> None:
        self.written.append((offset, data[:1]))

    def pager_data_unlock(self, memory_object: int, request: int, offset: int, length: int,
                          access: int) -> None:
        self.unlocks += 1
        super().pager_data_unlock(memory_object, request, offset, length, access)


def _controlled_pager() -> None:
    """Serve a Versioned object; obey FLUSH/CLEAN/LOCK/STATS on a control port."""
    me = m.task_self()
    dm = Versioned()
    mo, control = dm.create_memory_object(), m.port_allocate(me)
    ask = m.msg_receive(m.task_notify(), m.RCV_TIMEOUT, 20_000)
    m.msg_send(Message(remote_port=ask.items[0].value,  # type: ignore[arg-type]
                       items=[m.Port(mo, m.MAKE_SEND), m.Port(control, m.MAKE_SEND)]))

    def obey() -> None:
        while True:
            msg = m.msg_receive(control)
            out = _obey(dm, dm.requests(mo)[0], *msg.values())
            m.msg_send(Message(remote_port=msg.remote_port, items=[Int(v or 0) for v in out]))

    m.thread_create(me, obey)
    dm.serve()


def _obey(dm: Versioned, request: int, cmd: int, off: int) -> list[int]:
    if cmd == FLUSH:
        return [m.pager_flush_request(request, off, PS)]
    if cmd == CLEAN:
        return [m.pager_clean_request(request, off, PS)]
    if cmd == LOCK:
        m.pager_data_lock(request, off, PS, m.VM_PROT_WRITE)
        return [0]
    return [dm.version, dm.unlocks, len(dm.written)]


def _command(control: int, cmd: int, off: int = 0) -> list[Any]:
    reply = m.port_allocate(m.task_self())
    m.msg_send(Message(remote_port=control, local_port=reply, items=[Int(cmd), Int(off)]))
    return m.msg_receive(reply, m.RCV_TIMEOUT, 20_000).values()


def _reads_page_twice(pages: int) -> tuple[bytes, bytes]:
    ask = m.msg_receive(m.task_notify(), m.RCV_TIMEOUT, 20_000)
    a = m.vm_allocate_with_pager(m.task_self(), 0, pages * PS, True, ask.items[1].value, 0)
    first = m.memory()[a:a + 1]
    m.msg_send(Message(remote_port=ask.items[0].value, id=1))  # type: ignore[arg-type]
    m.msg_receive(m.task_notify(), m.RCV_TIMEOUT, 20_000)  # "read again"
    return first, m.memory()[a:a + 1]  # type: ignore[return-value]


def test_flush_clean_and_lock_act_on_every_task_mapping_the_object(native: str) -> None:
    me = m.task_self()
    pager = m.spawn(_controlled_pager, name="versioned")
    box = m.port_allocate(me)
    m.msg_send(Message(remote_port=m.task_get_special_port(pager.port, m.TASK_NOTIFY_PORT),
                       items=[m.Port(box, m.MAKE_SEND)]))
    mo, control = (i.value for i in m.msg_receive(box, m.RCV_TIMEOUT, 20_000).items)
    a = m.vm_allocate_with_pager(me, 0, 4 * PS, True, mo, 0)  # type: ignore[arg-type]
    mem = m.memory()
    v1 = mem[a]
    reader = m.spawn(_reads_page_twice, 4, name="reader")
    child_notify = m.task_get_special_port(reader.port, m.TASK_NOTIFY_PORT)
    m.msg_send(Message(remote_port=child_notify, items=[m.Port(box, m.MAKE_SEND),
                                                        m.Port(mo, m.COPY_SEND)]))
    m.msg_receive(box, m.RCV_TIMEOUT, 20_000)  # the reader has page 0 mapped
    mem[a:a + 1] = b"W"  # dirty
    assert _command(control, FLUSH, 0) == [1]  # our change went back to the pager
    assert mem[a] != v1 and mem[a] != ord("W")  # we fault again: a new version
    m.msg_send(Message(remote_port=child_notify, id=2))
    first, again = reader.result(20_000)
    assert first == bytes([v1]) and again == bytes([mem[a]])  # its mapping was flushed too
    _ = mem[a + PS]
    _command(control, LOCK, PS)
    mem[a + PS:a + PS + 1] = b"L"  # the lock makes this write ask the pager
    _, unlocks, written = _command(control, STATS)
    assert unlocks == 1 and written == 1
    mem[a + 2 * PS:a + 2 * PS + 1] = b"C"
    version = _command(control, STATS)[0]
    assert _command(control, CLEAN, 2 * PS) == [1]  # written back, and kept:
    assert mem[a + 2 * PS:a + 2 * PS + 1] == b"C" and _command(control, STATS)[0] == version
    m.vm_deallocate(me, a, 4 * PS)
    m.task_terminate(pager.port)


def _receive_regions(box: int) -> list[bytes]:
    """Receive one message on a new port (its send right went to `box`): the first
    bytes of each of its out-of-line regions, read from this task's memory."""
    me = m.task_self()
    p = m.port_allocate(me)
    m.msg_send(Message(remote_port=box, items=[m.Port(p, m.MAKE_SEND)]))
    got = m.msg_receive(p, m.RCV_TIMEOUT, 20_000)
    return [m.memory().read(i.address, 16) for i in got.items  # type: ignore[union-attr]
            if isinstance(i, m.OOL)]


def test_a_message_with_more_regions_than_a_reply_carries_descriptors(native: str) -> None:
    """Each region a native task receives is a mapping of a memfd machd hands over; a
    reply carries at most 16 descriptors, so 400 regions come in 34 batches (a review's
    finding: more than 16 ended the receiving thread)."""
    me = m.task_self()
    box = m.port_allocate(me)
    h = m.spawn(_receive_regions, m.Port(box, m.MAKE_SEND), name="regions")
    p = m.msg_receive(box, m.RCV_TIMEOUT, 20_000).items[0].name  # type: ignore[union-attr]
    blobs = [i.to_bytes(2, "little") * 8 + b"." * 4080 for i in range(400)]
    regions = []
    for blob in blobs[200:]:  # half of them regions of this task's memory
        a = m.vm_allocate(me, 0, 4096, True)
        m.memory().write(a, blob)
        regions.append(m.OOL(a, 4096))
    m.msg_send(Message(remote_port=p, id=7,
                       items=[*(m.OOL(data=b) for b in blobs[:200]), *regions]))
    assert h.result(30_000) == [b[:16] for b in blobs]  # type: ignore[attr-defined]


def _park_on(port: int) -> None:
    m.msg_receive(port)  # (terminated while parked)


def _allocate_in_then_terminate(task: int, thread: int) -> int:
    """Give `task` a new region (a map change its process has not applied yet), then
    terminate its `thread`, parked in a receive; the region's address."""
    a: int = m.vm_allocate(task, 0, 4096, True)
    m.thread_terminate(thread)
    return a


def test_a_terminated_threads_reply_leaves_map_changes_to_the_live_threads(
        native: str) -> None:
    """The reply that ends a terminated thread carries no map batch (a review's finding:
    the ending thread took the batch and never applied it, and every other thread of
    the task then waited for it for ever)."""
    me = m.task_self()
    t1 = m.thread_create(me, _park_on, m.port_allocate(me))
    time.sleep(0.5)  # (parked in machd, or not yet: either way it is terminated)
    h = m.spawn(_allocate_in_then_terminate, m.Port(me, m.COPY_SEND),
                m.Port(t1, m.COPY_SEND), name="changer")
    a = h.result(30_000)
    done: list[str] = []

    def receive_with_timeout() -> None:
        try:
            m.msg_receive(m.port_allocate(me), m.RCV_TIMEOUT, 500)
        except m.MachError as e:
            done.append(e.code)

    m.thread_create(me, receive_with_timeout)
    deadline = time.monotonic() + 30
    while not done and time.monotonic() < deadline:
        time.sleep(0.05)
    assert done == ["RCV_TIMED_OUT"]  # (before: it waited for the batch for ever)
    m.memory().write(a, b"mapped")  # the change reached this process
    assert m.memory().read(a, 6) == b"mapped"


def _sleep_without_traps(box: int) -> None:
    m.msg_send(Message(remote_port=box))  # (attached: its map changes are recorded)
    time.sleep(60)


def _machd_fds(socket_path: str) -> int:
    from pymach.include.channel import Channel

    chan = Channel.connect(socket_path)
    try:
        pid = chan.peer().pid
    finally:
        chan.close()
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_map_changes_a_dead_task_never_took_hold_no_descriptors(native: str) -> None:
    """Regions made in a task that makes no trap wait as map changes, each with a
    descriptor machd holds until a reply carries it; when the task dies first, machd
    closes them (a review's finding: they leaked, 40 a task, without bound)."""
    before = _machd_fds(native)
    box = m.port_allocate(m.task_self())
    h = m.spawn(_sleep_without_traps, m.Port(box, m.MAKE_SEND), name="idle")
    m.msg_receive(box, m.RCV_TIMEOUT, 20_000)
    for _ in range(40):
        m.vm_allocate(h.port, 0, 4096, True)
    m.task_terminate(h.port)
    deadline = time.monotonic() + 30
    while _machd_fds(native) > before + 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _machd_fds(native) <= before + 8  # (before: 40 more)
