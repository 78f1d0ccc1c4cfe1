"""Zero fill by the machine (vm_page.py): fresh native memory the kernel fills itself.

The first fault of a fresh vm_allocate'd region of a native task makes machd hold a
frame for each of its pages and arm the region so that Linux fills each memfd hole at
first touch, with no fault reaching machd. Each test fills such a region, then makes
machd need to know its pages in one of the ways the VM does (a read by the kernel, a
copy, a move, vm_protect, part of it freed, a child inheriting it, pageout short of
frames) and checks that every byte written is still there, and that copy-on-write,
sharing and protection keep their meaning.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

import pymach as m
from nativeutil import native_kernel, running_machd
from pymach import OOL, Message, Port

PS = 4096


def _fill(a: int, pages: int, seed: int) -> np.ndarray:
    """Write a distinct byte pattern to every page of [a, a + pages*PS); return it."""
    pattern = (np.arange(pages * PS, dtype=np.uint32) * 2654435761 + seed).astype(np.uint8)
    view = np.frombuffer(m.memory().buffer(a, pages * PS), dtype=np.uint8)
    view[:] = pattern
    del view
    return pattern


def _read(a: int, pages: int) -> np.ndarray:
    return np.frombuffer(m.vm_read(m.task_self(), a, pages * PS), dtype=np.uint8)


def _faults() -> int:
    return m.vm_statistics(m.task_self()).faults


def test_fresh_memory_fills_without_a_fault_per_page(native: str) -> None:
    me, pages = m.task_self(), 512
    a = m.vm_allocate(me, 0, pages * PS, True)
    before = _faults()
    data = _fill(a, pages, 1)
    assert _faults() - before < pages // 8  # the kernel filled the pages itself
    assert np.array_equal(_read(a, pages), data)  # the kernel's read learns of them
    assert np.array_equal(_read(a, pages), data)
    m.vm_deallocate(me, a, pages * PS)


def test_frames_are_held_for_the_region_and_come_back(native: str) -> None:
    me, pages = m.task_self(), 256
    free0 = m.vm_statistics(me).free_count
    a = m.vm_allocate(me, 0, pages * PS, True)
    _fill(a, 1, 2)  # one page touched: frames for all of them are held
    assert m.vm_statistics(me).free_count <= free0 - pages + 8
    m.vm_deallocate(me, a, pages * PS)
    assert m.vm_statistics(me).free_count >= free0 - 8


def test_a_copy_of_filled_memory_is_copy_on_write(native: str) -> None:
    me, pages = m.task_self(), 64
    a = m.vm_allocate(me, 0, pages * PS, True)
    data = _fill(a, pages, 3)
    box = m.port_allocate(me)
    m.msg_send(Message(remote_port=box, items=[OOL(a, pages * PS)]))
    got = m.msg_receive(box).items[0]
    _fill(a, pages, 4)  # the sender changes its memory after the copy
    assert np.array_equal(_read(got.address, pages), data)
    view = np.frombuffer(m.memory().buffer(got.address, pages * PS), dtype=np.uint8)
    view[::PS] = 7  # and the receiver changes its copy
    del view
    assert not np.array_equal(_read(a, pages)[::PS], np.full(pages, 7, np.uint8))
    m.vm_deallocate(me, got.address, got.size)
    m.vm_deallocate(me, a, pages * PS)


def _checksum(box: int) -> int:
    got = m.msg_receive(box).items[0]
    return int(np.frombuffer(m.vm_read(m.task_self(), got.address, got.size),
                             dtype=np.uint8).astype(np.uint64).sum())


def _receive_and_sum() -> int:
    box = m.msg_receive(m.task_notify()).items[0].name
    return _checksum(box)


def test_moved_memory_arrives_whole_in_a_child(native: str) -> None:
    me, pages = m.task_self(), 128
    a = m.vm_allocate(me, 0, pages * PS, True)
    data = _fill(a, pages, 5)
    box = m.port_allocate(me)
    child = m.spawn(_receive_and_sum, name="sum")
    notify = m.task_get_special_port(child.port, m.TASK_NOTIFY_PORT)
    m.msg_send(Message(remote_port=notify, items=[Port(box, m.MOVE_RECEIVE)]))
    m.msg_send(Message(remote_port=box, items=[OOL(a, pages * PS, deallocate=True)]))
    assert child.result(30_000) == int(data.astype(np.uint64).sum())


def test_protection_changes_keep_the_data(native: str) -> None:
    me, pages = m.task_self(), 32
    a = m.vm_allocate(me, 0, pages * PS, True)
    data = _fill(a, pages, 6)
    m.vm_protect(me, a, pages * PS, False, m.VM_PROT_READ)
    assert m.vm_regions(me, a, pages * PS)[0].protection == m.VM_PROT_READ
    assert np.array_equal(_read(a, pages), data)
    m.vm_protect(me, a, pages * PS, False, m.VM_PROT_READ | m.VM_PROT_WRITE)
    data2 = _fill(a, pages, 7)
    assert np.array_equal(_read(a, pages), data2)
    m.vm_deallocate(me, a, pages * PS)


def test_freeing_part_of_the_region_keeps_the_rest(native: str) -> None:
    me, pages = m.task_self(), 64
    a = m.vm_allocate(me, 0, pages * PS, True)
    data = _fill(a, pages, 8)
    m.vm_deallocate(me, a + 16 * PS, 16 * PS)
    assert np.array_equal(_read(a, 16), data[:16 * PS])
    assert np.array_equal(_read(a + 32 * PS, 32), data[32 * PS:])
    b = m.vm_allocate(me, a + 16 * PS, 16 * PS, False)
    assert b == a + 16 * PS and _read(b, 16).sum() == 0  # new memory there: zeros
    m.vm_deallocate(me, a, pages * PS)


def _read_shared(a: int, pages: int) -> int:
    total = int(_read(a, pages).astype(np.uint64).sum())
    view = np.frombuffer(m.memory().buffer(a, PS), dtype=np.uint8)
    view[0] = 99  # seen by the parent only if the region is shared
    return total


@pytest.mark.parametrize("inheritance", ["share", "copy"])
def test_a_child_inherits_filled_memory(native: str, inheritance: str) -> None:
    me, pages = m.task_self(), 32
    a = m.vm_allocate(me, 0, pages * PS, True)
    data = _fill(a, pages, 9)
    m.vm_inherit(me, a, pages * PS,
                 m.VM_INHERIT_SHARE if inheritance == "share" else m.VM_INHERIT_COPY)
    child = m.spawn(_read_shared, a, pages, name="reader", inherit=True)
    assert child.result(30_000) == int(data.astype(np.uint64).sum())
    assert (_read(a, 1)[0] == 99) == (inheritance == "share")
    m.vm_deallocate(me, a, pages * PS)


@pytest.fixture(scope="module")
def small_machd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A machd with 32 MiB of memory, so that filling 48 MiB needs pageout."""
    yield from running_machd(tmp_path_factory, "--memory", "32M")


def _fill_three_and_check() -> bool:
    me, pages = m.task_self(), 4096  # 16 MiB each
    regions = []
    for seed in range(3):
        a = m.vm_allocate(me, 0, pages * PS, True)
        regions.append((a, _fill(a, pages, 10 + seed)))
    return all(np.array_equal(_read(a, pages), data) for a, data in regions)


def test_filled_memory_survives_pageout(small_machd: str) -> None:
    with native_kernel(small_machd) as k:
        assert k.run(_fill_three_and_check, name="filler", timeout=120_000)
