"""Native mode with 2 MiB pages: VM objects in hugetlb memfds (pmap/hugetlb.py).

The module raises vm.nr_hugepages to what its machds need (root; skipped otherwise, a
failure under CI) and puts the old value back afterwards. Each test checks bytes, not
just that calls return: zero fill, copy-on-write between processes, a Python pager,
pageout to the default pager at the memory limit, and the pool's pages coming back.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import pymach as m
from machutil import wait_until
from nativeutil import running_machd, uffd_or_skip
from pymach import Message
from pymach.libmach.task import attach, detach
from pymach.pmap.hugetlb import free_huge_pages, huge_page_size

HP = 2 << 20
NR = Path("/proc/sys/vm/nr_hugepages")
POOL = 224  # huge pages: 64 for the first machd (128M), 128 for the read-ahead one
# (256M; the small pageout one, 16, runs when it has gone), and room


@pytest.fixture(scope="module")
def pool() -> Iterator[None]:
    """The huge page pool holds POOL more pages than are in use, for the module."""
    uffd_or_skip()
    if huge_page_size() != HP or os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("2 MiB huge pages need root and a 2 MiB Hugepagesize in CI")
        pytest.skip("2 MiB huge pages need root (to set vm.nr_hugepages)")
    before = int(NR.read_text())
    NR.write_text(str(before - free_huge_pages() + POOL))
    if free_huge_pages() < POOL:
        NR.write_text(str(before))
        pytest.skip(f"the kernel gave fewer than {POOL} huge pages")
    yield
    NR.write_text(str(before))


@pytest.fixture(scope="module")
def huge_machd(pool: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from running_machd(tmp_path_factory, "--page-size", "2M", "--memory", "128M",
                             "--pager-cluster", "2")


@pytest.fixture
def task(huge_machd: str) -> Iterator[None]:
    attach(huge_machd, name="huge")
    try:
        yield
    finally:
        detach()


def _sum_and_write(a: int, size: int) -> int:
    v = np.frombuffer(m.memory().buffer(a, size), dtype=np.uint8)
    total = int(v.sum(dtype=np.uint64))
    v[:] = 9  # the child's own copy
    return total


def test_zero_fill_copy_on_write_and_the_pool_comes_back(task: None) -> None:
    me, size = m.task_self(), 8 * HP
    assert m.vm_statistics(me).page_size == HP
    free0 = free_huge_pages()
    a = m.vm_allocate(me, 0, size, True)
    v = np.frombuffer(m.memory().buffer(a, size), dtype=np.uint8)
    assert int(v.sum(dtype=np.uint64)) == 0  # zero fill
    v[:] = 1
    assert free_huge_pages() <= free0 - 8  # the region is in huge pages
    assert m.spawn(_sum_and_write, a, size, inherit=True).result(30_000) == size
    assert int(v.sum(dtype=np.uint64)) == size  # the child's writes stayed its own
    v[HP:2 * HP] = 2
    assert int(v.sum(dtype=np.uint64)) == size + HP
    del v
    m.vm_deallocate(me, a, size)
    # every page back in the pool (the child's own pages once machd has ended it: its
    # result comes before its end, so a busy machine may still hold them a moment)
    wait_until(lambda: free_huge_pages() >= free0, 10_000)


def _receive_sum() -> int:
    port = m.msg_receive(m.task_notify()).items[0].value
    item = m.msg_receive(port, m.RCV_TIMEOUT, 20_000).items[0]  # type: ignore[arg-type]
    v = np.frombuffer(m.memory().buffer(item.address, item.size), dtype=np.uint8)
    return int(v.sum(dtype=np.uint64))


def test_out_of_line_memory_in_huge_pages(task: None) -> None:
    me, size = m.task_self(), 4 * HP
    a = m.vm_allocate(me, 0, size, True)
    v = np.frombuffer(m.memory().buffer(a, size), dtype=np.uint8)
    v[:] = 3
    h = m.spawn(_receive_sum, name="ool-sink")
    port = m.port_allocate(me)
    notify = m.task_get_special_port(h.port, m.TASK_NOTIFY_PORT)
    m.msg_send(Message(remote_port=notify, items=[m.Port(port, m.MOVE_RECEIVE)]))
    m.msg_send(Message(remote_port=port, items=[m.OOL(a, size)]))
    v[:] = 4  # after the send: the receiver keeps what was sent
    assert h.result(30_000) == 3 * size
    del v
    m.vm_deallocate(me, a, size)


class Pages(m.DataManager):
    """Huge page n of the object holds the byte n + 1."""

    def read(self, memory_object: int, offset: int, length: int, access: int) -> bytes:
        return b"".join(bytes([offset // HP + i + 1]) * HP for i in range(length // HP))

    def pager_terminate(self, memory_object: int, request: int) -> None:
        self.stop()


def _pager(kind: type[Pages] = Pages) -> list[tuple[int, int]]:
    """Serve a new object of a `kind` manager to whoever asks; what it noted (Noting)."""
    dm = kind()
    mo = dm.create_memory_object()
    ask = m.msg_receive(m.task_notify(), m.RCV_TIMEOUT, 20_000)
    m.msg_send(Message(remote_port=ask.items[0].value,  # type: ignore[arg-type]
                       items=[m.Port(mo, m.MAKE_SEND)]))
    dm.serve()
    return getattr(dm, "asked", [])


def test_a_python_pager_serves_huge_pages(task: None) -> None:
    me, n = m.task_self(), 6
    h = m.spawn(_pager, name="pages")
    box = m.port_allocate(me)
    m.msg_send(Message(remote_port=m.task_get_special_port(h.port, m.TASK_NOTIFY_PORT),
                       items=[m.Port(box, m.MAKE_SEND)]))
    mo = m.msg_receive(box, m.RCV_TIMEOUT, 20_000).items[0].value
    a = m.vm_allocate_with_pager(me, 0, n * HP, True, mo, 0)
    v = np.frombuffer(m.memory().buffer(a, n * HP), dtype=np.uint8).reshape(n, HP)
    assert [int(v[i].min()) for i in range(n)] == [int(v[i].max()) for i in range(n)] \
        == list(range(1, n + 1))
    del v
    m.vm_deallocate(me, a, n * HP)
    h.result(20_000)


class Noting(Pages):
    """Pages, noting each request's (first page, pages)."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[tuple[int, int]] = []

    def read(self, memory_object: int, offset: int, length: int, access: int) -> bytes:
        self.asked.append((offset // HP, length // HP))
        return super().read(memory_object, offset, length, access)


def _requests_of_a_reader_in_order(n: int) -> list[tuple[int, int]]:
    """The requests (first page, pages) a Noting pager gets while this task reads one
    byte of each of `n` pages of its object in order (each checked)."""
    me = m.task_self()
    h = m.spawn(_pager, Noting, name="noting")
    box = m.port_allocate(me)
    m.msg_send(Message(remote_port=m.task_get_special_port(h.port, m.TASK_NOTIFY_PORT),
                       items=[m.Port(box, m.MAKE_SEND)]))
    mo = m.msg_receive(box, m.RCV_TIMEOUT, 20_000).items[0].value
    a = m.vm_allocate_with_pager(me, 0, n * HP, True, mo, 0)
    v = np.frombuffer(m.memory().buffer(a, n * HP), dtype=np.uint8)
    assert [int(v[i * HP]) for i in range(n)] == [(i + 1) % 256 for i in range(n)]
    del v
    m.vm_deallocate(me, a, n * HP)
    asked: list[tuple[int, int]] = h.result(30_000)
    return asked


def test_machds_default_read_ahead_grows_huge_page_requests_to_16_mib(task: None) -> None:
    """machd's default read-ahead is 16 MiB of pages: with 2 MiB pages and a 2-page
    cluster, the requests of a reader in order grow 2, 4, 8 and stay at 8."""
    assert _requests_of_a_reader_in_order(24) == [(0, 2), (2, 4), (6, 8), (14, 8), (22, 2)]


def test_read_ahead_of_huge_pages_stops_at_what_an_answer_in_place_covers(
        pool: None, tmp_path_factory: pytest.TempPathFactory) -> None:
    """With 2 MiB pages, read-ahead to 64 pages would ask for 128 MiB, more than one
    answer in place may cover (PLACED_MAX, 64 MiB): the kernel refused the answer and
    the fault waited out the pager timeout. Requests stop at 32 pages."""
    gen = running_machd(tmp_path_factory, "--page-size", "2M", "--memory", "256M",
                        "--pager-cluster", "16", "--read-ahead", "64",
                        "--pager-timeout", "20000")
    sock = next(gen)
    attach(sock, name="huge-read-ahead")
    try:
        asked = _requests_of_a_reader_in_order(96)
        assert max(pages for _, pages in asked) == 32 and asked[:2] == [(0, 16), (16, 32)]
    finally:
        detach()
        next(gen, None)


def test_pageout_of_huge_pages_keeps_every_byte(pool: None,
                                                 tmp_path_factory: pytest.TempPathFactory
                                                 ) -> None:
    gen = running_machd(tmp_path_factory, "--page-size", "2M", "--memory", "32M")
    sock = next(gen)
    attach(sock, name="huge-pressure")
    try:
        me, pages = m.task_self(), 48  # three times physical memory
        a = m.vm_allocate(me, 0, pages * HP, True)
        v = np.frombuffer(m.memory().buffer(a, pages * HP), dtype=np.uint64)
        v = v.reshape(pages, HP // 8)
        for i in range(pages):
            v[i] = i * 1000 + 7
        assert all(int(v[i, -1]) == i * 1000 + 7 for i in range(pages))
        assert m.vm_statistics(me).pageouts >= pages - 16
        del v
        m.vm_deallocate(me, a, pages * HP)
    finally:
        detach()
        next(gen, None)


def test_a_pool_too_small_is_a_clear_error(pool: None, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pymach.cli.main", "machd", "--socket",
                           str(tmp_path / "s"), "--page-size", "2M", "--memory", "64G"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "vm.nr_hugepages" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "s").exists()


def test_the_huge_page_benchmark_measures_what_it_prints(pool: None) -> None:
    from pymach.bench.native import run_huge

    out = run_huge(size=8 * HP, rounds=1, fill_size=8 * HP)
    assert "huge_pages_skipped" not in out, out
    for key in ("huge_ool_first_send_ms", "huge_receiver_vm_deallocate_ms",
                "huge_stream_gb_per_s", "huge_stream_read_ahead_gb_per_s",
                "huge_numpy_fill_native_ms"):
        assert 0 < out[key] < float("inf"), (key, out)
