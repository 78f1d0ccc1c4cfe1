"""Clustered paging: a fault on an external object asks its manager for several pages
(pager_data_request's length), as many as the host's pager_cluster_pages allows, and,
with read-ahead (read_ahead_pages), twice as many each time a reader goes on in order."""

from __future__ import annotations

import pytest

import pymach as m
from pagerutil import PS, Recording, spawn_manager


def _sequential_read(cluster: int, pages: int, first: int = 0,
                     read_ahead: int | None = None) -> list[tuple[int, int]]:
    with m.boot(pager_cluster_pages=cluster, read_ahead_pages=read_ahead) as k:
        dm = Recording()
        h, (mo,) = spawn_manager(k, dm, name="recording")
        a = m.vm_allocate_with_pager(m.task_self(), 0, pages * PS, True, mo, 0)
        mem = m.memory()
        _ = mem[a + first * PS]  # a fault in the middle first
        assert [mem[a + i * PS] for i in range(pages)] == [i % 256 for i in range(pages)]
        m.vm_deallocate(m.task_self(), a, pages * PS)
        h.result(5000)
        return dm.asked


@pytest.mark.parametrize("cluster", [1, 4, 16])
def test_a_sequential_read_asks_once_per_cluster(cluster: int) -> None:
    asked = _sequential_read(cluster, 40)
    assert asked[0] == (0, min(cluster, 40) * PS)
    assert sum(n for _, n in asked) == 40 * PS  # every page asked for exactly once
    assert len(asked) == -(-40 // cluster)


def test_a_cluster_stops_at_resident_pages_and_the_object_end() -> None:
    asked = _sequential_read(16, 20, first=4)  # pages 4..19 first, then 0..3
    assert asked == [(4 * PS, 16 * PS), (0, 4 * PS)]


def test_pager_cluster_pages_is_checked() -> None:
    for bad in (0, 1025, 2.0, True):
        with pytest.raises(m.MachError) as e, m.boot(pager_cluster_pages=bad):
            pass
        assert e.value.code == "KERN_INVALID_ARGUMENT"


def test_read_ahead_doubles_each_request_of_a_reader_in_order() -> None:
    asked = _sequential_read(4, 64, read_ahead=32)
    assert asked == [(0, 4 * PS), (4 * PS, 8 * PS), (12 * PS, 16 * PS), (28 * PS, 32 * PS),
                     (60 * PS, 4 * PS)]  # (the last stops at the object's end)


def test_read_ahead_starts_again_from_the_cluster_after_a_jump() -> None:
    asked = _sequential_read(4, 32, first=20, read_ahead=16)
    assert asked[:3] == [(20 * PS, 4 * PS), (0, 4 * PS), (4 * PS, 8 * PS)]
    assert sum(n for _, n in asked) == 32 * PS  # every page asked for exactly once


def test_no_read_ahead_by_default() -> None:
    assert [n for _, n in _sequential_read(4, 16)] == [4 * PS] * 4


@pytest.mark.parametrize("bad", [0, 1025, 2.0, True, 3])
def test_read_ahead_pages_is_checked(bad: object) -> None:
    with pytest.raises(m.MachError) as e, m.boot(pager_cluster_pages=4, read_ahead_pages=bad):
        pass
    assert e.value.code == "KERN_INVALID_ARGUMENT"
    assert "read_ahead_pages" in str(e.value)
