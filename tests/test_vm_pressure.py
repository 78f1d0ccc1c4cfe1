"""Memory pressure: paging through the default pager (paper 5.4, 6.2.2, 6.2.3).

Physical memory here is a few dozen frames and the data several times that. The pageout
daemon moves least recently used pages out through the default pager (a data manager
like any other, storing pages in a swap file), faults bring them back, and no byte may
change on the way: not for one task, not for several tasks at once, not for
copy-on-write copies made by task_create, vm_copy or messages. A backing store with a
size limit eventually fills up: then the task that needs memory gets
KERN_RESOURCE_SHORTAGE instead of hanging, the data it wrote before stays intact, and
the kernel keeps serving everyone else. The swap file lives where `swap_dir` says but has
no name there (nothing is left behind even if the process is killed); it goes at shutdown.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pymach as m
from machutil import assert_kernel_ok, recv, sleep_ms, wait_until
from pymach import OOL, Message

PS = 4096
FRAMES = 32
MODES = pytest.mark.parametrize("det", [False, True], ids=["free", "det"])


def pattern(tag: int, i: int, size: int = PS) -> bytes:
    """A page of bytes unique to (tag, i), different at every 4-byte word of the page."""
    head = bytes([tag % 256, i % 256, (i >> 8) % 256])
    return b"".join(head + bytes([w % 256]) for w in range(size // 4))[:size]


def write_pages(a: int, n: int, tag: int, first: int = 0) -> None:
    mem = m.memory()
    for i in range(first, n):
        mem[a + i * PS:a + (i + 1) * PS] = pattern(tag, i)


def bad_pages(a: int, n: int, tag: int, order: list[int] | None = None) -> list[int]:
    mem = m.memory()
    return [i for i in (range(n) if order is None else order)
            if mem[a + i * PS:a + (i + 1) * PS] != pattern(tag, i)]


def frames_add_up(k: m.Kernel) -> None:
    s = k.vm_stat()
    assert s["pages_free"] + s["pages_active"] + s["pages_inactive"] + s["pages_wired"] == (
        k.memory_size // k.page_size)


def settle(k: m.Kernel) -> None:
    """Wait for pageouts in flight to reach the default pager."""
    wait_until(lambda: k.vm_stat()["pageouts_in_flight"] == 0, 10_000)


@pytest.fixture(params=[False, True], ids=["free", "det"])
def small(request: pytest.FixtureRequest) -> Iterator[m.Kernel]:
    """A kernel with 32 frames of physical memory and unlimited backing store."""
    with m.boot(memory_size=FRAMES * PS, deterministic=request.param, seed=1987) as k:
        yield k


# -- more data than memory --------------------------------------------------------------------


def test_paging_keeps_every_byte(small: m.Kernel) -> None:
    k = small
    me = m.task_self()
    n = 300  # almost ten times the physical memory
    a = m.vm_allocate(me, 0, n * PS, True)
    write_pages(a, n, 1)
    s = k.vm_stat()
    assert s["pageouts"] >= n - FRAMES
    assert bad_pages(a, n, 1) == []
    order = list(range(n))
    random.Random(7).shuffle(order)
    assert bad_pages(a, n, 1, order) == []  # in any order
    assert bad_pages(a, n, 1, order[::-1]) == []
    s = k.vm_stat()
    assert s["pageins"] >= n - FRAMES and s["zero_fill_count"] >= n
    frames_add_up(k)
    # rewriting some pages, then reading everything again
    write_pages(a, n, 2, first=n // 2)
    assert bad_pages(a, n // 2, 1) == []
    assert [i for i in range(n // 2, n)
            if m.memory().read(a + i * PS, PS) != pattern(2, i)] == []
    # vm_read sees the same data, through the same paging
    assert m.vm_read(me, a + 10 * PS, 3 * PS) == b"".join(pattern(1, i) for i in (10, 11, 12))
    # statistics from the call agree with the report
    st = m.vm_statistics(me)
    assert st.pageouts > 0 and st.pageins > 0
    assert st.free_count + st.active_count + st.inactive_count + st.wire_count == FRAMES
    settle(k)
    assert_kernel_ok()


@MODES
def test_pageout_and_read_back_go_in_runs(det: bool) -> None:
    """The pageout daemon sends an object's adjacent dirty pages to the default pager a
    run per pager_data_write, and a fault on paged-out memory asks it for a cluster of
    the pages it holds after the faulting one: far fewer messages than pages, and still
    every byte."""
    frames, n = 256, 1024
    with m.boot(memory_size=frames * PS, deterministic=det, seed=3, trace=True,
                pager_cluster_pages=16) as k:
        me = m.task_self()
        a = m.vm_allocate(me, 0, n * PS, True)
        write_pages(a, n, 7)
        settle(k)
        writes = sum("pager_data_write" in line for line in k.trace_log)
        out = k.vm_stat()["pageouts"]
        assert out >= n - frames
        assert writes * 4 <= out, f"{writes} pager_data_write for {out} pages"
        k.trace_log.clear()
        pageins = m.vm_statistics(me).pageins
        assert bad_pages(a, n, 7) == []
        requests = sum("pager_data_request" in line for line in k.trace_log)
        read = m.vm_statistics(me).pageins - pageins
        assert read >= n - frames
        assert requests * 4 <= read, f"{requests} pager_data_request for {read} pages"
        settle(k)
        frames_add_up(k)
        assert_kernel_ok()


def test_freeing_paged_out_memory(small: m.Kernel) -> None:
    k = small
    me = m.task_self()
    base = k.vm_stat()["objects"]
    for rnd in range(3):
        a = m.vm_allocate(me, 0, 100 * PS, True)
        write_pages(a, 100, rnd)
        assert bad_pages(a, 100, rnd, list(range(0, 100, 9))) == []
        m.vm_deallocate(me, a, 100 * PS)
    settle(k)
    wait_until(lambda: k.vm_stat()["objects"] == base)
    assert k.vm_stat()["pages_free"] >= FRAMES - 4
    # fresh memory at the same addresses is zero again, not the old data
    a = m.vm_allocate(me, 0, 100 * PS, True)
    assert m.memory().read(a + 50 * PS, PS) == bytes(PS)


def test_paging_across_several_tasks(small: m.Kernel) -> None:
    k = small

    def worker(tag: int, n: int) -> list[int]:
        a = m.vm_allocate(m.task_self(), 0, n * PS, True)
        write_pages(a, n, tag)
        bad = bad_pages(a, n, tag)
        write_pages(a, n, tag + 100, first=n - 10)  # a second round on some of it
        return bad + bad_pages(a, n - 10, tag) + [
            i for i in range(n - 10, n) if m.memory().read(a + i * PS, PS) != pattern(
                tag + 100, i)]

    hs = [k.spawn(worker, tag, 60 + 20 * tag, name=f"worker{tag}") for tag in range(1, 5)]
    me = m.task_self()
    mine = m.vm_allocate(me, 0, 50 * PS, True)
    write_pages(mine, 50, 9)
    assert [h.result(30_000) for h in hs] == [[], [], [], []]
    assert bad_pages(mine, 50, 9) == []
    assert k.vm_stat()["pageouts"] >= 4 * 60
    settle(k)
    frames_add_up(k)
    wait_until(lambda: k.vm_stat()["objects"] == 1)  # only ours is left


def test_copy_on_write_after_task_create_under_pressure(small: m.Kernel) -> None:
    k = small
    me = m.task_self()
    mem = m.memory()
    n = 120
    a = m.vm_allocate(me, 0, n * PS, True)
    s = m.vm_allocate(me, 0, 20 * PS, True)
    m.vm_inherit(me, s, 20 * PS, m.VM_INHERIT_SHARE)
    write_pages(a, n, 1)
    write_pages(s, 20, 2)
    child = m.task_create(me, True)
    # the parent changes the even pages, the child (through its port) the odd ones
    for i in range(0, n, 2):
        mem[a + i * PS:a + (i + 1) * PS] = pattern(3, i)
    for i in range(1, n, 2):
        m.vm_write(child, a + i * PS, pattern(4, i))
    m.vm_write(child, s + 5 * PS, pattern(5, 5))
    want_parent = [pattern(3, i) if i % 2 == 0 else pattern(1, i) for i in range(n)]
    want_child = [pattern(1, i) if i % 2 == 0 else pattern(4, i) for i in range(n)]
    assert [i for i in range(n) if mem[a + i * PS:a + (i + 1) * PS] != want_parent[i]] == []
    assert [i for i in range(n) if m.vm_read(child, a + i * PS, PS) != want_child[i]] == []
    assert mem[s + 5 * PS:s + 6 * PS] == pattern(5, 5)  # shared stays shared under paging
    assert k.vm_stat()["cow_faults"] >= n // 2

    def heir(a: int, n: int, s: int) -> list[int]:
        """A second child, created now: it sees the parent's current data."""
        mine = m.memory()
        bad = [i for i in range(n) if mine[a + i * PS:a + (i + 1) * PS] != want_parent[i]]
        mine[s + 6 * PS:s + 7 * PS] = pattern(6, 6)
        return bad

    assert k.spawn(heir, a, n, s, name="heir", inherit=True).result(30_000) == []
    assert mem[s + 6 * PS:s + 7 * PS] == pattern(6, 6)
    assert m.vm_read(child, s + 6 * PS, PS) == pattern(6, 6)
    m.task_terminate(child)
    assert [i for i in range(n) if mem[a + i * PS:a + (i + 1) * PS] != want_parent[i]] == []
    settle(k)
    frames_add_up(k)


def test_vm_copy_under_pressure(small: m.Kernel) -> None:
    me = m.task_self()
    mem = m.memory()
    n = 80
    src, dst = m.vm_allocate(me, 0, n * PS, True), m.vm_allocate(me, 0, n * PS, True)
    write_pages(src, n, 1)
    m.vm_copy(me, src, n * PS, dst)
    write_pages(src, n, 2, first=n // 2)
    write_pages(dst, n // 2, 3)
    assert [i for i in range(n) if mem[src + i * PS:src + (i + 1) * PS] != (
        pattern(1, i) if i < n // 2 else pattern(2, i))] == []
    assert [i for i in range(n) if mem[dst + i * PS:dst + (i + 1) * PS] != (
        pattern(3, i) if i < n // 2 else pattern(1, i))] == []


def test_ool_under_pressure(small: m.Kernel) -> None:
    me = m.task_self()
    mem = m.memory()
    p = m.port_allocate(me)
    n = 90
    a = m.vm_allocate(me, 0, n * PS, True)
    write_pages(a, n, 1)
    m.msg_send(Message(remote_port=p, items=[OOL(a, n * PS), OOL(a + 5, 3 * PS)]))
    write_pages(a, n, 2)  # the sender changes everything before the receive
    got, odd = recv(p).items
    assert isinstance(got, OOL) and isinstance(odd, OOL)
    assert bad_pages(got.address, n, 1) == []
    whole = pattern(1, 0) + pattern(1, 1) + pattern(1, 2) + pattern(1, 3)
    assert mem[odd.address:odd.address + 3 * PS] == whole[5:5 + 3 * PS]
    assert bad_pages(a, n, 2) == []
    # moving it on under pressure
    m.msg_send(Message(remote_port=p, items=[OOL(got.address, n * PS, deallocate=True)]))
    (moved,) = recv(p).items
    assert isinstance(moved, OOL)
    assert bad_pages(moved.address, n, 1) == []


def test_memory_through_the_kernel_under_pressure(small: m.Kernel) -> None:
    """vm_read and vm_write of another task's memory fault pages in and out, too."""
    me = m.task_self()
    child = m.task_create(me, False)
    n = 100
    a = m.vm_allocate(child, 0, n * PS, True)
    for i in range(n):
        m.vm_write(child, a + i * PS, pattern(7, i))
    assert [i for i in range(n) if m.vm_read(child, a + i * PS, PS) != pattern(7, i)] == []
    assert m.vm_read(child, a, n * PS)[::PS][:5] == bytes([7, 7, 7, 7, 7])
    m.task_terminate(child)


@pytest.mark.parametrize("page_size", [8192, 12288, 16384])
def test_paging_with_other_page_sizes(page_size: int) -> None:
    """The system page is any multiple of the hardware page (3.3), paging included.
    The region is placed at an address aligned on the system page by hand."""
    n = 100
    with m.boot(page_size=page_size, memory_size=FRAMES * page_size, seed=2) as k:
        me = m.task_self()
        mem = m.memory()
        a = m.vm_allocate(me, 64 * page_size, n * page_size, False)
        for i in range(n):
            mem[a + i * page_size:a + (i + 1) * page_size] = pattern(8, i, page_size)
        assert k.vm_stat()["pageouts"] > 0
        assert [i for i in range(n) if mem[a + i * page_size:a + (i + 1) * page_size]
                != pattern(8, i, page_size)] == []
        assert k.vm_stat()["pageins"] > 0
        assert [(r.address, r.size) for r in m.vm_regions(me)] == [(a, n * page_size)]


# -- deterministic mode ----------------------------------------------------------------------


def test_deterministic_paging_is_reproducible() -> None:
    def run(seed: int) -> tuple[Any, ...]:
        with m.boot(memory_size=FRAMES * PS, deterministic=True, seed=seed, trace=True) as k:
            def worker(tag: int) -> list[int]:
                a = m.vm_allocate(m.task_self(), 0, 70 * PS, True)
                write_pages(a, 70, tag)
                return bad_pages(a, 70, tag)

            hs = [k.spawn(worker, t, name=f"w{t}") for t in (1, 2, 3)]
            results = [h.result(30_000) for h in hs]
            return results, k.vm_stat(), list(k.trace_log), k.sched.now()

    first, again = run(11), run(11)
    assert first[0] == [[], [], []]
    assert first[1]["pageouts"] > 0
    assert first == again  # the same seed: the same paging, event for event


# -- a backing store that fills up -------------------------------------------------------------


def fill_until_full(n: int, chunk: int, tag: int, box: dict[str, Any]
                    ) -> tuple[int, str, list[int]]:
    """Task body: write n pages, in regions of `chunk` pages, until memory runs out.
    Then (once box["go"]) read back every page written, and return (pages written, the
    error code, pages whose data did not come back).

    Reading back needs frames, and every frame holds a dirty page that cannot be paged
    out, so regions are read newest first (their pages are the resident ones) and each is
    deallocated as soon as all its pages are checked, which frees frames for the pages
    of older regions to come back from the backing store (or, when another task holds
    the memory, once that task lets go of it).
    """
    me = m.task_self()
    mem = m.memory()
    regions: list[int] = []
    written, code = 0, ""
    try:
        for i in range(n):
            if i % chunk == 0:
                regions.append(m.vm_allocate(me, 0, chunk * PS, True))
            va = regions[-1] + (i % chunk) * PS
            mem[va:va + PS] = pattern(tag, i)
            written = i + 1
    except m.MachError as e:
        code = e.code
    box["written"] = written
    wait_until(lambda: box["go"], 60_000)
    checked: set[int] = set()
    lost: list[int] = []
    freed: set[int] = set()
    for _ in range(200):  # until every page is checked, waiting when stuck
        progress = len(checked)
        for r in reversed(range(len(regions))):
            if r in freed:
                continue
            mine = [i for i in range(r * chunk, min((r + 1) * chunk, written))]
            for i in reversed(mine):
                if i in checked:
                    continue
                va = regions[r] + (i % chunk) * PS
                try:
                    if mem[va:va + PS] != pattern(tag, i):
                        lost.append(i)
                    checked.add(i)
                except m.MachError as e:  # no frame for it yet: try again later
                    if e.code != "KERN_RESOURCE_SHORTAGE":  # e.g. KERN_MEMORY_ERROR
                        lost.append(i)
                        checked.add(i)
            if all(i in checked for i in mine):
                m.vm_deallocate(me, regions[r], chunk * PS)
                freed.add(r)
        if len(checked) == written:
            break
        if len(checked) == progress:
            sleep_ms(5)  # another task may be holding the memory: let it finish
    unread = [i for i in range(written) if i not in checked]
    return written, code, sorted(set(lost + unread))


@pytest.mark.parametrize("chunk", [10, 1], ids=["regions-of-10", "regions-of-1"])
@MODES
def test_full_backing_store_fails_cleanly(det: bool, chunk: int, tmp_path: Path) -> None:
    """32 frames and 40 pages of swap, and a task writing 300 pages: it must get
    KERN_RESOURCE_SHORTAGE (not hang, not lose what it wrote), and the kernel goes on."""
    swap_pages, n = 40, 300
    with m.boot(memory_size=FRAMES * PS, deterministic=det, seed=5, swap_size=swap_pages * PS,
                swap_dir=str(tmp_path)) as k:
        box: dict[str, Any] = {"go": False}
        h = k.spawn(fill_until_full, n, chunk, 1, box, name="writer")
        wait_until(lambda: "written" in box or h.done, 60_000)
        assert not h.done, h.result(0)
        # while the writer's memory is exhausted, the kernel still serves everyone
        assert_kernel_ok()

        def bystander() -> str:
            assert_kernel_ok()
            b = m.vm_allocate(m.task_self(), 0, PS, True)
            try:
                m.memory()[b:b + 2] = b"hi"  # may find no memory, but may not hang
            except m.MachError as e:
                return e.code
            return "ok"

        assert k.spawn(bystander, name="bystander").result(30_000) in (
            "ok", "KERN_RESOURCE_SHORTAGE")
        box["go"] = True
        written, code, lost = h.result(60_000)
        # the writer was told, and every page it wrote before that reads back intact
        assert (code, len(lost), lost[:8]) == ("KERN_RESOURCE_SHORTAGE", 0, [])
        assert FRAMES // 2 <= written < n
        # with the writer gone, memory and backing store are usable again
        settle(k)

        def after() -> list[int]:
            a = m.vm_allocate(m.task_self(), 0, 60 * PS, True)
            write_pages(a, 60, 3)
            return bad_pages(a, 60, 3)

        assert k.spawn(after, name="after").result(30_000) == []
        assert_kernel_ok()


@MODES
def test_full_backing_store_then_another_task(det: bool) -> None:
    """Two tasks fill memory and a small backing store together: each one either gets
    all its pages or KERN_RESOURCE_SHORTAGE, and nothing written is lost."""
    with m.boot(memory_size=FRAMES * PS, deterministic=det, seed=9, swap_size=24 * PS) as k:
        boxes = [{"go": True}, {"go": True}]
        hs = [k.spawn(fill_until_full, 150, 5, tag, boxes[tag - 1], name=f"writer{tag}")
              for tag in (1, 2)]
        results = [h.result(60_000) for h in hs]
        assert [lost for _, _, lost in results] == [[], []]
        assert any(code == "KERN_RESOURCE_SHORTAGE" for _, code, _ in results)
        for written, code, _ in results:
            assert code in ("", "KERN_RESOURCE_SHORTAGE")
            assert (written == 150) == (code == "")
        assert_kernel_ok()


# -- the swap file ----------------------------------------------------------------------------


def swap_files(directory: str | Path) -> list[str]:
    return sorted(f for f in os.listdir(directory) if f.startswith("pymach-swap-"))


def swap_dir_of(k: m.Kernel) -> str:
    """The directory the kernel's (nameless) swap file lives in."""
    link = os.readlink(f"/proc/self/fd/{k.swap_store.fd}")
    assert link.endswith(" (deleted)"), link
    return os.path.dirname(link)


def test_swap_file_lives_in_swap_dir_and_goes_at_shutdown(tmp_path: Path) -> None:
    with m.boot(memory_size=FRAMES * PS, swap_dir=str(tmp_path)) as k:
        assert swap_dir_of(k) == os.path.realpath(tmp_path)
        a = m.vm_allocate(m.task_self(), 0, 100 * PS, True)
        write_pages(a, 100, 4)
        settle(k)
        assert k.vm_stat()["pageouts"] > 0
        assert os.listdir(tmp_path) == []  # no name, even while in use
        size = os.fstat(k.swap_store.fd).st_size
        assert size >= (100 - FRAMES) * PS // 2  # the pages went to the file
        assert size % PS == 0
        assert bad_pages(a, 100, 4) == []
    assert os.listdir(tmp_path) == []


def test_swap_file_removed_even_if_the_program_fails(tmp_path: Path) -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom), m.boot(memory_size=FRAMES * PS, swap_dir=str(tmp_path)) as k:
        a = m.vm_allocate(m.task_self(), 0, 60 * PS, True)
        write_pages(a, 60, 5)
        assert swap_dir_of(k) == os.path.realpath(tmp_path)
        raise Boom
    assert os.listdir(tmp_path) == []


def test_default_swap_dir_is_the_temporary_directory() -> None:
    tmp = tempfile.gettempdir()
    before = set(swap_files(tmp))
    with m.boot(memory_size=FRAMES * PS) as k:
        assert swap_dir_of(k) == os.path.realpath(tmp)
        assert set(swap_files(tmp)) <= before  # it added no name


def test_two_kernels_have_separate_swap_files(tmp_path: Path) -> None:
    with m.boot(memory_size=FRAMES * PS, swap_dir=str(tmp_path)) as k1:
        a = m.vm_allocate(m.task_self(), 0, 64 * PS, True)
        write_pages(a, 64, 6)
        with m.boot(memory_size=FRAMES * PS, swap_dir=str(tmp_path)) as k2:
            assert swap_dir_of(k1) == swap_dir_of(k2) == os.path.realpath(tmp_path)
            files = [os.fstat(k.swap_store.fd) for k in (k1, k2)]
            assert files[0].st_ino != files[1].st_ino
            b = m.vm_allocate(m.task_self(), 0, 64 * PS, True)
            write_pages(b, 64, 7)
            assert bad_pages(b, 64, 7) == []
        assert bad_pages(a, 64, 6) == []
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("bad", [0, -PS, 1.5, "1M", True])
def test_bad_swap_size_is_refused(bad: Any) -> None:
    with pytest.raises(m.MachError) as e, m.boot(swap_size=bad):
        pass
    assert e.value.code == "KERN_INVALID_ARGUMENT"
