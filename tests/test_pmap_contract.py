"""The pmap contract (src/pymach/pmap/pmap.py), run against every backend.

The machine-independent VM keeps the truth in address maps and memory objects; a pmap is
only the hardware's cache of translations (paper 5.5, "hardware validation"). These tests
drive each backend's `PhysicalMemory` and `Pmap` directly: entering, extracting,
protecting and removing translations, the pv lists behind `pmap_page_protect` (one frame
mapped by two pmaps), reference and modify bits (set by the backend's MMU, where it has
one: `mmu_read` / `mmu_write`), and the kernel's own frame accesses. The last tests boot a
kernel on each backend and check that the pmap really is a cache: throwing away every
translation of a task in the middle of its program does not change what it reads.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import pymach as m
from machutil import assert_kernel_ok, sleep_ms
from pymach.include.vm_param import VM_MAX_ADDRESS
from pymach.pmap import BACKENDS, EMBEDDED_BACKENDS, make_physical_memory

PS = 4096
NFRAMES = 32
NONE, R, W, X = m.VM_PROT_NONE, m.VM_PROT_READ, m.VM_PROT_WRITE, m.VM_PROT_EXECUTE
RW, RWX = R | W, R | W | X
CHUNK = 4096  # pages: more than any backend's page-table chunk, so ranges cover whole ones


@pytest.fixture(params=BACKENDS)
def phys(request: pytest.FixtureRequest) -> Any:
    return make_physical_memory(request.param, PS, NFRAMES)


def has_mmu(pmap: Any) -> bool:
    return hasattr(pmap, "mmu_read") and hasattr(pmap, "mmu_write")


def need_mmu(pmap: Any) -> None:
    if not has_mmu(pmap):
        pytest.skip("this backend has no software MMU (mmu_read / mmu_write)")


def fill(phys: Any, frame: int, byte: int) -> bytes:
    data = bytes([byte]) * PS
    phys.phys_write(frame, data)
    return data


# -- the physical memory -------------------------------------------------------------------


def test_make_physical_memory(phys: Any) -> None:
    assert phys.page_size == PS and phys.nframes == NFRAMES
    assert phys.lock is not None
    for frame in (0, NFRAMES // 2, NFRAMES - 1):
        assert phys.phys_read(frame) == bytes(PS)  # frames start out zero


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(m.MachError) as e:
        make_physical_memory("no-such-mmu", PS, NFRAMES)
    assert e.value.code == "KERN_INVALID_ARGUMENT"


@pytest.mark.parametrize("page_size", [8192, 12288, 16384])
def test_other_page_sizes(page_size: int) -> None:
    for backend in BACKENDS:
        phys = make_physical_memory(backend, page_size, 4)
        assert phys.page_size == page_size
        phys.phys_write(1, b"\x01" * page_size)
        phys.phys_write(2, b"\x02" * page_size)
        assert phys.phys_read(1) == b"\x01" * page_size
        assert phys.phys_read(2) == b"\x02" * page_size
        pmap = phys.pmap_create()
        pmap.pmap_enter(3 * page_size, 2, RW)
        assert pmap.pmap_extract(3 * page_size) == 2
        assert pmap.pmap_extract(3 * page_size + page_size - 1) == 2
        assert pmap.pmap_extract(4 * page_size) is None
        assert pmap.pmap_extract(3 * page_size - 1) is None
        if has_mmu(pmap):
            assert pmap.mmu_read(3 * page_size + 5, 3) == b"\x02" * 3
            assert pmap.mmu_write(4 * page_size - 2, b"zz")
            assert phys.phys_read(2, page_size - 2, 2) == b"zz"
            assert phys.phys_read(1) == b"\x01" * page_size


def test_phys_read_write_zero_copy(phys: Any) -> None:
    a = fill(phys, 3, 0xAA)
    fill(phys, 4, 0xBB)
    assert phys.phys_read(3) == a
    assert phys.phys_read(3, 10, 5) == b"\xaa" * 5
    assert phys.phys_read(3, PS - 4) == b"\xaa" * 4  # offset to the end of the frame
    phys.phys_write(3, b"hello", 100)
    assert phys.phys_read(3, 98, 9) == b"\xaa\xaahello\xaa\xaa"
    assert phys.phys_read(4) == b"\xbb" * PS  # neighbours untouched
    assert phys.phys_read(2) == bytes(PS)
    phys.pmap_copy_page(3, 5)
    assert phys.phys_read(5) == phys.phys_read(3)
    phys.phys_write(3, b"X")
    assert phys.phys_read(5)[:1] == b"\xaa"  # a copy, not an alias
    phys.pmap_zero_page(3)
    assert phys.phys_read(3) == bytes(PS)
    assert phys.phys_read(4) == b"\xbb" * PS and phys.phys_read(5)[:5] == b"\xaa" * 5


def test_first_and_last_frame(phys: Any) -> None:
    first, last = fill(phys, 0, 1), fill(phys, NFRAMES - 1, 2)
    phys.pmap_copy_page(NFRAMES - 1, 0)
    assert phys.phys_read(0) == last
    phys.pmap_copy_page(1, NFRAMES - 1)
    assert phys.phys_read(NFRAMES - 1) == bytes(PS)
    assert first != last


# -- one pmap -----------------------------------------------------------------------------


def test_new_pmap_is_empty(phys: Any) -> None:
    pmap = phys.pmap_create()
    assert pmap.pmap_resident_count() == 0
    for va in (0, PS, 0x10000, VM_MAX_ADDRESS - PS):
        assert pmap.pmap_extract(va) is None
    if has_mmu(pmap):
        assert pmap.mmu_read(0x10000, 1) is None
        assert pmap.mmu_write(0x10000, b"x") is False


def test_enter_and_extract(phys: Any) -> None:
    pmap = phys.pmap_create()
    pmap.pmap_enter(0x10000, 7, RW)
    pmap.pmap_enter(0x12000, 9, R)
    assert pmap.pmap_extract(0x10000) == 7
    assert pmap.pmap_extract(0x10FFF) == 7  # any address in the page
    assert pmap.pmap_extract(0x11000) is None
    assert pmap.pmap_extract(0x12000) == 9
    assert pmap.pmap_resident_count() == 2
    # entering again replaces the old mapping of that page
    pmap.pmap_enter(0x10000, 8, R)
    assert pmap.pmap_extract(0x10000) == 8
    assert pmap.pmap_resident_count() == 2
    # VM_PROT_NONE maps nothing
    pmap.pmap_enter(0x20000, 3, NONE)
    assert pmap.pmap_extract(0x20000) is None
    assert pmap.pmap_resident_count() == 2
    pmap.pmap_enter(0x10000, 8, NONE)  # and replaces an existing mapping with nothing
    assert pmap.pmap_extract(0x10000) is None
    assert pmap.pmap_resident_count() == 1


def test_high_addresses(phys: Any) -> None:
    pmap = phys.pmap_create()
    top = VM_MAX_ADDRESS - PS
    pmap.pmap_enter(top, 1, RW)
    pmap.pmap_enter(0x10000, 2, RW)
    assert pmap.pmap_extract(top) == 1 and pmap.pmap_resident_count() == 2
    pmap.pmap_remove(top, VM_MAX_ADDRESS)
    assert pmap.pmap_extract(top) is None and pmap.pmap_extract(0x10000) == 2


def test_remove_range(phys: Any) -> None:
    pmap = phys.pmap_create()
    for i in range(8):
        pmap.pmap_enter(0x40000 + i * PS, i, RW)
    pmap.pmap_remove(0x40000 + 2 * PS, 0x40000 + 5 * PS)  # [2, 5)
    assert [pmap.pmap_extract(0x40000 + i * PS) for i in range(8)] == [
        0, 1, None, None, None, 5, 6, 7]
    assert pmap.pmap_resident_count() == 5
    pmap.pmap_remove(0x40000 + 7 * PS, 0x40000 + 7 * PS)  # empty range: nothing
    assert pmap.pmap_extract(0x40000 + 7 * PS) == 7
    pmap.pmap_remove(0, 0x40000)  # nothing mapped there: fine
    assert pmap.pmap_resident_count() == 5
    pmap.pmap_remove(0, VM_MAX_ADDRESS)
    assert pmap.pmap_resident_count() == 0
    assert all(pmap.pmap_extract(0x40000 + i * PS) is None for i in range(8))


class _CountedChunks(dict):  # type: ignore[type-arg]
    """A page table's chunk table that counts the walks over it."""

    walks = 0

    def __iter__(self) -> Any:
        _CountedChunks.walks += 1
        return super().__iter__()


def test_a_small_range_looks_only_at_its_own_chunks(phys: Any) -> None:
    """Protecting or removing a page looks up the chunks of its range, not every chunk
    of the task's table (a vm_protect of a page in a task with 10,000 chunks took 7x one
    with a single chunk); a range wider than the table still walks the table."""
    pmap = phys.pmap_create()
    span = PS << 10  # one chunk
    for n in range(64):
        pmap.pmap_enter(0x100000 + n * span, n % 16, RW)
    pmap.chunks = _CountedChunks(pmap.chunks)
    _CountedChunks.walks = 0
    pmap.pmap_protect(0x100000 + 5 * span, 0x100000 + 5 * span + PS, R)
    pmap.pmap_remove(0x100000 + 7 * span, 0x100000 + 7 * span + PS)
    assert _CountedChunks.walks == 0
    assert pmap.pmap_extract(0x100000 + 5 * span) == 5
    assert pmap.pmap_extract(0x100000 + 7 * span) is None
    assert pmap.pmap_resident_count() == 63
    pmap.pmap_remove(0, VM_MAX_ADDRESS)  # (the whole space: a walk of the table)
    assert pmap.pmap_resident_count() == 0


def test_remove_a_large_range(phys: Any) -> None:
    """Whole page-table chunks at once and ragged ends, with mappings on both sides."""
    pmap = phys.pmap_create()
    base = 0x100000
    vas = [base + i * PS for i in (0, 1, 500, 1023, 1024, 1025, 2047, 2048, 3000, 4100)]
    for n, va in enumerate(vas):
        pmap.pmap_enter(va, n, RW)
    pmap.pmap_remove(base + PS, base + 3000 * PS)  # keeps the first and the last two
    assert [pmap.pmap_extract(va) for va in vas] == [0] + [None] * 7 + [8, 9]
    assert pmap.pmap_resident_count() == 3
    # a page entered again after a chunk-wide removal is a fresh mapping
    pmap.pmap_enter(base + 1024 * PS, 5, R)
    assert pmap.pmap_extract(base + 1024 * PS) == 5
    assert pmap.pmap_resident_count() == 4


def test_protect_only_reduces(phys: Any) -> None:
    pmap = phys.pmap_create()
    pmap.pmap_enter(0x10000, 1, RW)
    pmap.pmap_enter(0x11000, 2, R)
    pmap.pmap_enter(0x12000, 3, RW)
    pmap.pmap_protect(0x10000, 0x12000, RWX)  # never grants more than was given
    assert pmap.pmap_extract(0x10000) == 1 and pmap.pmap_extract(0x11000) == 2
    if has_mmu(pmap):
        assert pmap.mmu_write(0x10000, b"a")
        assert not pmap.mmu_write(0x11000, b"a")  # still read-only
    pmap.pmap_protect(0x10000, 0x12000, R)
    assert pmap.pmap_extract(0x10000) == 1  # still mapped, read-only now
    assert pmap.pmap_resident_count() == 3
    if has_mmu(pmap):
        assert not pmap.mmu_write(0x10000, b"b")
        assert pmap.mmu_read(0x10000, 1) == b"a"
        assert pmap.mmu_write(0x12000, b"c")  # outside the range: untouched
    pmap.pmap_protect(0x10000, 0x11000, NONE)  # NONE removes
    assert pmap.pmap_extract(0x10000) is None
    assert pmap.pmap_resident_count() == 2
    # re-entering gives the new protection exactly
    pmap.pmap_enter(0x10000, 1, RW)
    if has_mmu(pmap):
        assert pmap.mmu_write(0x10000, b"d")
        assert phys.phys_read(1, 0, 1) == b"d"


def test_protect_a_large_range(phys: Any) -> None:
    """pmap_protect over whole page-table chunks, then single entries inside them."""
    pmap = phys.pmap_create()
    base = 0x400000
    vas = [base + i * PS for i in range(0, 3 * 1024, 97)]
    for n, va in enumerate(vas):
        pmap.pmap_enter(va, n % NFRAMES, RW)
    count = pmap.pmap_resident_count()
    assert count == len(vas)
    pmap.pmap_protect(base, base + CHUNK * PS, R)
    assert pmap.pmap_resident_count() == count
    assert [pmap.pmap_extract(va) for va in vas] == [n % NFRAMES for n in range(len(vas))]
    if has_mmu(pmap):
        assert all(pmap.mmu_write(va, b"x") is False for va in vas)
        assert all(pmap.mmu_read(va, 1) is not None for va in vas)
    # one page given write access again; the others stay read-only
    pmap.pmap_enter(vas[3], 3, RW)
    if has_mmu(pmap):
        assert pmap.mmu_write(vas[3], b"y")
        assert pmap.mmu_write(vas[4], b"y") is False
    pmap.pmap_protect(base, base + CHUNK * PS, RWX)  # still never more
    if has_mmu(pmap):
        assert pmap.mmu_write(vas[4], b"y") is False
        assert pmap.mmu_write(vas[3], b"z")
    pmap.pmap_protect(base, base + CHUNK * PS, NONE)
    assert pmap.pmap_resident_count() == 0
    assert all(pmap.pmap_extract(va) is None for va in vas)


def test_protect_every_entry_of_a_chunk_leaves_later_entries_alone(phys: Any) -> None:
    """A range holding every entry of a page-table chunk, though not the whole chunk
    (a GiB of 2 MiB pages is half a chunk), is lowered at once; an entry entered into
    that chunk afterwards, outside the range, keeps its own protection, and the lowered
    ones keep theirs when it comes."""
    pmap = phys.pmap_create()
    base = 0x400000 + 37 * PS  # mid-chunk
    vas = [base + i * PS for i in range(8)]
    for n, va in enumerate(vas):
        pmap.pmap_enter(va, n, RW if n else W)  # the first is write-only
    pmap.pmap_protect(vas[0], vas[-1] + PS, R)
    assert pmap.pmap_extract(vas[0]) is None  # write-only lowered to read: nothing left
    assert [pmap.pmap_extract(va) for va in vas[1:]] == list(range(1, 8))
    assert [pmap.pmap_access(va) for va in vas[1:]] == [R] * 7
    later = base + 100 * PS  # the same chunk, outside the range
    pmap.pmap_enter(later, 9, RW)
    assert pmap.pmap_access(later) == RW
    assert [pmap.pmap_access(va) for va in vas[1:]] == [R] * 7
    if has_mmu(pmap):
        assert pmap.mmu_write(later, b"w")
        assert not any(pmap.mmu_write(va, b"w") for va in vas[1:])
    pmap.pmap_protect(vas[1], vas[4], NONE)  # a part of them now: entry by entry
    assert [pmap.pmap_extract(va) for va in vas[1:]] == [None] * 3 + list(range(4, 8))
    pmap.pmap_protect(vas[4], vas[-1] + PS, NONE)  # the rest, beside `later`
    assert pmap.pmap_extract(later) == 9 and pmap.pmap_access(later) == RW
    assert pmap.pmap_resident_count() == 1


class _RecordingUffd:
    """Stands for a task's userfaultfd: records write-protect calls; refuses a range
    wider than one page when `refuse_ranges` (as Linux does when part of a range is not
    registered)."""

    def __init__(self, refuse_ranges: bool = False) -> None:
        self.calls: list[tuple[int, int]] = []
        self.refuse_ranges = refuse_ranges

    def writeprotect(self, start: int, length: int, protect: bool, wake: bool = True) -> None:
        from pymach.pmap.uffd import UffdError

        if self.refuse_ranges and length > PS:
            raise UffdError(2, "not registered")
        self.calls.append((start, length))


@pytest.mark.parametrize("refuse", [False, True])
def test_native_protect_takes_the_range_in_one_call(refuse: bool) -> None:
    """The native pmap write-protects a pmap_protect's range with one userfaultfd call
    (ragged chunk ends included), not one per page; if Linux refuses the range, each
    entry lowered is protected alone, so no mapping stays writable."""
    phys = make_physical_memory("uffd", PS, NFRAMES)
    pmap = phys.pmap_create()
    base = 0x400000 + 5 * PS  # not on a chunk boundary: every entry is a ragged one
    vas = [base + i * PS for i in range(20)]
    for n, va in enumerate(vas):
        pmap.pmap_enter(va, n % NFRAMES, RW)  # (no userfaultfd yet: nothing to wake)
    pmap.uffd = fake = _RecordingUffd(refuse)
    pmap.pmap_protect(vas[2], vas[12], R)
    if refuse:
        assert sorted(fake.calls) == [(va, PS) for va in vas[2:12]]
    else:
        assert fake.calls == [(vas[2], 10 * PS)]
    assert [pmap.pmap_extract(va) for va in vas] == [n % NFRAMES for n in range(20)]
    # A range holding every entry of its chunk goes chunk-wide in the table; if Linux
    # refuses the range, each of those entries is still protected alone.
    fake.calls.clear()
    pmap.pmap_protect(base - PS, vas[-1] + 2 * PS, R)
    if refuse:
        assert sorted(fake.calls) == [(va, PS) for va in vas]
    else:
        assert fake.calls == [(base - PS, 22 * PS)]


def test_protect_to_nothing_removes_write_only_mappings(phys: Any) -> None:
    """A write-only mapping reduced to read-only has no access left: it is gone."""
    pmap = phys.pmap_create()
    base = 0x800000
    pmap.pmap_enter(base, 1, W)
    pmap.pmap_enter(base + PS, 2, RW)
    pmap.pmap_enter(base + 5000 * PS, 3, W)  # far away, in a range covering whole chunks
    pmap.pmap_enter(base + 5001 * PS, 4, RW)
    pmap.pmap_protect(base, base + 2 * PS, R)  # a small range
    pmap.pmap_protect(base + CHUNK * PS, base + 2 * CHUNK * PS, R)  # a large one
    assert pmap.pmap_extract(base) is None
    assert pmap.pmap_extract(base + 5000 * PS) is None
    assert pmap.pmap_extract(base + PS) == 2 and pmap.pmap_extract(base + 5001 * PS) == 4
    assert pmap.pmap_resident_count() == 2
    if has_mmu(pmap):
        assert pmap.mmu_write(base, b"w") is False
        assert pmap.mmu_write(base + 5000 * PS, b"w") is False
        assert pmap.mmu_read(base + 5001 * PS, 1) == b"\0"


def test_destroy(phys: Any) -> None:
    pmap = phys.pmap_create()
    other = phys.pmap_create()
    for i in range(5):
        pmap.pmap_enter(0x10000 + i * PS, i, RW)
    other.pmap_enter(0x10000, 0, RW)
    pmap.pmap_destroy()  # (the pmap is not used again)
    # another pmap of the same frame is unaffected
    assert other.pmap_extract(0x10000) == 0
    # and pmap_page_protect of the frames the destroyed pmap had still works
    for i in range(5):
        phys.pmap_page_protect(i, NONE)
    assert other.pmap_extract(0x10000) is None


# -- pv lists: one frame, several pmaps ----------------------------------------------------


def test_page_protect_across_pmaps(phys: Any) -> None:
    a, b = phys.pmap_create(), phys.pmap_create()
    shared, private = 5, 6
    a.pmap_enter(0x10000, shared, RW)
    b.pmap_enter(0x70000, shared, RW)  # another address in another space
    b.pmap_enter(0x71000, shared, R)  # and twice in the same space
    a.pmap_enter(0x11000, private, RW)
    phys.pmap_page_protect(shared, R)  # copy-on-write: nobody may write the frame
    assert a.pmap_extract(0x10000) == shared and b.pmap_extract(0x70000) == shared
    if has_mmu(a):
        assert a.mmu_write(0x10000, b"x") is False
        assert b.mmu_write(0x70000, b"x") is False
        assert a.mmu_write(0x11000, b"p")  # other frames keep their access
        assert b.mmu_read(0x71000, 1) == b"\0"
    phys.pmap_page_protect(shared, RW)  # never grants more
    if has_mmu(a):
        assert a.mmu_write(0x10000, b"x") is False
    phys.pmap_page_protect(shared, NONE)  # every mapping of the frame goes
    assert a.pmap_extract(0x10000) is None
    assert b.pmap_extract(0x70000) is None and b.pmap_extract(0x71000) is None
    assert a.pmap_extract(0x11000) == private
    assert (a.pmap_resident_count(), b.pmap_resident_count()) == (1, 0)


def test_page_protect_follows_remaps(phys: Any) -> None:
    """The pv list tracks pmap_enter, pmap_remove and replacement exactly."""
    a, b = phys.pmap_create(), phys.pmap_create()
    a.pmap_enter(0x10000, 1, RW)
    b.pmap_enter(0x10000, 1, RW)
    a.pmap_enter(0x10000, 2, RW)  # a's page now maps another frame
    b.pmap_remove(0x10000, 0x11000)
    b.pmap_enter(0x20000, 1, RW)
    phys.pmap_page_protect(1, NONE)
    assert a.pmap_extract(0x10000) == 2  # not a mapping of frame 1 any more
    assert b.pmap_extract(0x20000) is None
    phys.pmap_page_protect(2, NONE)
    assert a.pmap_extract(0x10000) is None
    # a frame nobody maps: nothing to do
    phys.pmap_page_protect(NFRAMES - 1, NONE)
    phys.pmap_page_protect(NFRAMES - 1, R)


def test_page_protect_after_large_removal_and_reuse(phys: Any) -> None:
    """Frames that lost mappings through a range removal are then mapped elsewhere: a
    pmap_page_protect must reach exactly the new mappings."""
    a, b = phys.pmap_create(), phys.pmap_create()
    base = 0x1000000
    for i in range(8):
        a.pmap_enter(base + i * PS, i, RW)
    a.pmap_remove(base, base + CHUNK * PS)
    a.pmap_destroy()
    for i in range(8):
        b.pmap_enter(base + i * PS, i, RW)
    a2 = phys.pmap_create()
    a2.pmap_enter(base, 0, R)
    phys.pmap_page_protect(0, R)
    assert b.pmap_extract(base) == 0 and a2.pmap_extract(base) == 0
    if has_mmu(b):
        assert b.mmu_write(base, b"x") is False
        assert b.mmu_write(base + PS, b"x")
    phys.pmap_page_protect(0, NONE)
    assert b.pmap_extract(base) is None and a2.pmap_extract(base) is None
    assert b.pmap_resident_count() == 7


# -- the hardware: reference and modify bits -----------------------------------------------


def test_mmu_reads_and_writes_frames(phys: Any) -> None:
    pmap = phys.pmap_create()
    need_mmu(pmap)
    fill(phys, 4, 0x44)
    pmap.pmap_enter(0x30000, 4, RW)
    assert pmap.mmu_read(0x30000, 4) == b"\x44" * 4
    assert pmap.mmu_read(0x30000 + PS - 2, 2) == b"\x44\x44"
    assert pmap.mmu_write(0x30000 + 10, b"abc") is True
    assert phys.phys_read(4, 8, 7) == b"\x44\x44abc\x44\x44"
    pmap.pmap_enter(0x30000, 5, RW)  # remapped: the same address now shows frame 5
    assert pmap.mmu_read(0x30000 + 10, 3) == bytes(3)


def test_mmu_faults_touch_nothing(phys: Any) -> None:
    pmap = phys.pmap_create()
    need_mmu(pmap)
    data = fill(phys, 2, 0x22)
    pmap.pmap_enter(0x10000, 2, R)
    pmap.pmap_enter(0x11000, 3, W)
    phys.pmap_clear_reference(2)
    phys.pmap_clear_modify(2)
    assert pmap.mmu_write(0x10000, b"no") is False  # a write fault
    assert phys.phys_read(2) == data
    assert not phys.pmap_is_modified(2)
    assert pmap.mmu_read(0x11000, 1) is None  # write-only: a read fault
    assert pmap.mmu_read(0x12000, 1) is None  # unmapped: a fault
    assert not phys.pmap_is_referenced(3)


def test_reference_and_modify_bits(phys: Any) -> None:
    a, b = phys.pmap_create(), phys.pmap_create()
    need_mmu(a)
    frame = 6
    a.pmap_enter(0x10000, frame, RW)
    b.pmap_enter(0x50000, frame, RW)
    phys.pmap_clear_reference(frame)
    phys.pmap_clear_modify(frame)
    assert not phys.pmap_is_referenced(frame) and not phys.pmap_is_modified(frame)
    assert a.mmu_read(0x10000, 1) == b"\0"
    assert phys.pmap_is_referenced(frame) and not phys.pmap_is_modified(frame)
    phys.pmap_clear_reference(frame)
    assert b.mmu_write(0x50000, b"m")  # the bits are per frame, whichever pmap touched it
    assert phys.pmap_is_referenced(frame) and phys.pmap_is_modified(frame)
    phys.pmap_clear_modify(frame)
    assert phys.pmap_is_referenced(frame) and not phys.pmap_is_modified(frame)
    phys.pmap_clear_reference(frame)
    assert not phys.pmap_is_referenced(frame)
    # the bits survive losing the mappings (the VM reads them before reusing a frame)
    assert a.mmu_write(0x10000, b"n")
    phys.pmap_page_protect(frame, NONE)
    assert phys.pmap_is_modified(frame) and phys.pmap_is_referenced(frame)
    assert phys.phys_read(frame, 0, 1) == b"n"


def test_kernel_accesses_leave_bits_alone(phys: Any) -> None:
    frame = 7
    phys.pmap_clear_reference(frame)
    phys.pmap_clear_modify(frame)
    phys.phys_write(frame, b"kernel")
    assert phys.phys_read(frame, 0, 6) == b"kernel"
    assert not phys.pmap_is_referenced(frame)
    assert not phys.pmap_is_modified(frame)


def test_mmu_is_atomic_with_page_protect(phys: Any) -> None:
    """A thread hammers an address with mmu_write while the mapping is removed, the frame
    reused and the address mapped read-only elsewhere: no store may land in a frame
    through a translation that was already taken away."""
    pmap = phys.pmap_create()
    need_mmu(pmap)
    va = 0x10000
    stop = threading.Event()
    stores: list[int] = []

    def hammer() -> None:
        n = 0
        while not stop.is_set():
            if pmap.mmu_write(va, b"\x01"):
                n += 1
        stores.append(n)

    t = threading.Thread(target=hammer)
    t.start()
    try:
        for _ in range(100):
            pmap.pmap_enter(va, 1, RW)
            time.sleep(0)
            phys.pmap_page_protect(1, NONE)  # frame 1 is taken away...
            phys.pmap_zero_page(1)  # ...and reused
            pmap.pmap_enter(va, 2, R)
            time.sleep(0)
            assert phys.phys_read(1, 0, 1) == b"\0"
            assert phys.phys_read(2, 0, 1) == b"\0"
            pmap.pmap_remove(va, va + PS)
    finally:
        stop.set()
        t.join(5)
    assert len(stores) == 1


# -- the pmap is a cache: a booted kernel on each backend ----------------------------------
# An embedded kernel's tasks are threads of this process and touch memory through the
# software MMU, so only the embedded backends boot here; the native backend gets the same
# checks from the native contract suite, whose tasks are processes.


def test_embedded_boot_refuses_native_backends() -> None:
    for backend in set(BACKENDS) - set(EMBEDDED_BACKENDS):
        with pytest.raises(m.KernError) as e, m.boot(pmap=backend):
            pass
        assert e.value.code == "KERN_INVALID_ARGUMENT" and "machd" in e.value.detail


@pytest.fixture(params=[(b, d) for b in EMBEDDED_BACKENDS for d in (False, True)],
                ids=[f"{b}-{'det' if d else 'free'}" for b in EMBEDDED_BACKENDS
                     for d in (False, True)])
def small_kernel(request: pytest.FixtureRequest) -> Iterator[m.Kernel]:
    backend, det = request.param
    with m.boot(deterministic=det, seed=1987, pmap=backend, memory_size=64 * PS) as k:
        yield k


def drop_all_mappings(k: m.Kernel) -> int:
    """Forget every translation of every task; returns how many there were."""
    total = 0
    for task in list(k.tasks.values()):
        vmap = task.map
        if vmap is None:
            continue
        total += vmap.pmap.pmap_resident_count()
        vmap.pmap.pmap_remove(0, VM_MAX_ADDRESS)
        assert vmap.pmap.pmap_resident_count() == 0
    return total


def drop_all_by_frame(k: m.Kernel) -> None:
    """The same through the pv lists: no frame stays mapped anywhere."""
    for frame in range(k.vm.phys.nframes):
        k.vm.phys.pmap_page_protect(frame, NONE)


def write_only_protect_all(k: m.Kernel) -> None:
    """Take write access away everywhere (the VM gives it back at the next fault)."""
    for frame in range(k.vm.phys.nframes):
        k.vm.phys.pmap_page_protect(frame, R)


def pattern(tag: int, i: int, size: int = PS) -> bytes:
    return (bytes([tag, i % 256, (i >> 8) % 256, 0x5A]) * (size // 4 + 1))[:size]


def test_dropping_mappings_changes_nothing(small_kernel: m.Kernel) -> None:
    k = small_kernel
    me = m.task_self()
    mem = m.memory()
    n = 24
    a = m.vm_allocate(me, 0, n * PS, True)
    for i in range(n):
        mem[a + i * PS:a + (i + 1) * PS] = pattern(1, i)
    assert drop_all_mappings(k) >= 1
    for i in range(n):
        assert mem[a + i * PS:a + (i + 1) * PS] == pattern(1, i)
    # writes after the drop land where they should
    drop_all_by_frame(k)
    for i in range(0, n, 3):
        mem[a + i * PS:a + i * PS + 4] = b"NEW!"
    write_only_protect_all(k)
    for i in range(1, n, 3):
        mem[a + i * PS + 8:a + i * PS + 12] = b"new."
    drop_all_mappings(k)
    for i in range(n):
        want = bytearray(pattern(1, i))
        if i % 3 == 0:
            want[:4] = b"NEW!"
        if i % 3 == 1:
            want[8:12] = b"new."
        assert mem[a + i * PS:a + (i + 1) * PS] == bytes(want), i
    assert m.vm_read(me, a, n * PS)[:4] == b"NEW!"
    assert_kernel_ok()


def test_dropping_mappings_keeps_copy_on_write(small_kernel: m.Kernel) -> None:
    """Sharing and copy-on-write between a parent and a child survive the pmap forgetting
    everything at each step."""
    k = small_kernel
    me = m.task_self()
    mem = m.memory()
    shared = m.vm_allocate(me, 0, 4 * PS, True)
    copied = m.vm_allocate(me, 0, 4 * PS, True)
    m.vm_inherit(me, shared, 4 * PS, m.VM_INHERIT_SHARE)
    for i in range(4):
        mem[shared + i * PS:shared + i * PS + 4] = pattern(2, i, 4)
        mem[copied + i * PS:copied + i * PS + 4] = pattern(3, i, 4)
    drop_all_mappings(k)
    child = m.task_create(me, True)
    drop_all_by_frame(k)
    mem[copied:copied + 4] = b"PAR!"  # copy-on-write: the child keeps the old data
    m.vm_write(child, copied + PS, b"CHI!" + bytes(PS - 4))
    mem[shared + 2 * PS:shared + 2 * PS + 4] = b"SHR!"  # shared: the child sees it
    drop_all_mappings(k)
    assert m.vm_read(child, copied, 4) == pattern(3, 0, 4)
    assert mem[copied + PS:copied + PS + 4] == pattern(3, 1, 4)
    assert m.vm_read(child, copied + PS, 4) == b"CHI!"
    assert m.vm_read(child, shared + 2 * PS, 4) == b"SHR!"
    write_only_protect_all(k)
    m.vm_write(child, shared + 3 * PS, b"FROMCHILD" + bytes(PS - 9))
    drop_all_by_frame(k)
    assert mem[shared + 3 * PS:shared + 3 * PS + 9] == b"FROMCHILD"
    assert mem[copied:copied + 4] == b"PAR!"
    m.task_terminate(child)


def test_dropping_mappings_while_tasks_run(small_kernel: m.Kernel) -> None:
    """Two tasks write and check their memory in a loop while the pmaps keep forgetting
    (and losing write access) underneath them, with paging going on too."""
    k = small_kernel

    def worker(tag: int, pages: int, rounds: int) -> int:
        me = m.task_self()
        mem = m.memory()
        a = m.vm_allocate(me, 0, pages * PS, True)
        bad = 0
        for r in range(rounds):
            for i in range(pages):
                mem[a + i * PS:a + i * PS + 8] = bytes([tag, r, i]) + b"\0" * 5
            for i in range(pages):
                if mem[a + i * PS:a + i * PS + 8] != bytes([tag, r, i]) + b"\0" * 5:
                    bad += 1
        return bad

    hs = [k.spawn(worker, tag, 40 * tag, 6, name=f"w{tag}") for tag in (1, 2)]
    rounds = 0
    while not all(h.done for h in hs):
        if rounds % 2:
            drop_all_mappings(k)
        else:
            write_only_protect_all(k)
        rounds += 1
        sleep_ms(1)
    assert [h.result(10_000) for h in hs] == [0, 0]
    assert rounds >= 1
    assert k.vm_stat()["pageouts"] > 0  # 120 pages through 64 frames


def test_access_follows_enter_protect_and_remove(phys: Any) -> None:
    ps = phys.page_size
    pmap = phys.pmap_create()
    assert pmap.pmap_access(5 * ps) == 0
    pmap.pmap_enter(5 * ps, 1, RW)
    assert pmap.pmap_access(5 * ps + 7) == RW
    pmap.pmap_protect(0, 16 * ps, R)
    assert pmap.pmap_access(5 * ps) == R
    pmap.pmap_remove(5 * ps, 6 * ps)
    assert pmap.pmap_access(5 * ps) == 0


class _Object:
    """Stands for a VM object where the contract only needs its serial and size."""

    def __init__(self, serial: int) -> None:
        self.serial, self.size = serial, 16 * PS


def test_discard_drops_every_mapping_of_the_frame(phys: Any) -> None:
    a, b = phys.pmap_create(), phys.pmap_create()
    a.pmap_enter(0, 3, RW)
    b.pmap_enter(5 * PS, 3, R)
    a.pmap_enter(PS, 4, R)
    phys.pmap_page_discard(3)
    assert a.pmap_extract(0) is None and b.pmap_extract(5 * PS) is None
    assert a.pmap_extract(PS) == 4  # other frames keep theirs


def test_discard_batch_drops_mappings_and_keeps_data_bound_inside_it(phys: Any) -> None:
    obj = _Object(10**9)
    pmap = phys.pmap_create()
    for f in range(4):
        phys.frame_bind(f, obj, f * PS)
        phys.phys_write(f, bytes([f + 1]) * PS)
        pmap.pmap_enter(f * PS, f, R)
    with phys.discard_batch(), phys.discard_batch():  # batches nest
        for f in range(4):
            phys.pmap_page_discard(f)
            phys.frame_unbind(f)
        phys.frame_bind(7, obj, 2 * PS)  # a page freed in this batch comes back at once
        phys.phys_write(7, b"new data")
    assert [pmap.pmap_extract(f * PS) for f in range(4)] == [None] * 4
    assert phys.phys_read(7, 0, 8) == b"new data"
    phys.frame_unbind(7)
    phys.object_gone(obj)


def test_frames_discard_drops_mappings_and_unbinds(phys: Any) -> None:
    """frames_discard of frames caching runs of an object: every mapping of each goes,
    in every pmap, stale pv pairs from a large removal included; pages of the object
    outside the runs keep their data and mappings; the frames can be bound again."""
    obj = _Object(10**9 + 2)
    a, b = phys.pmap_create(), phys.pmap_create()
    for f in range(8):  # object pages 0-7 in frames 0-7
        phys.frame_bind(f, obj, f * PS)
        fill(phys, f, f + 1)
        a.pmap_enter(0x100000 + f * PS, f, R)
    a.pmap_remove(0, VM_MAX_ADDRESS)  # chunk-wide: pv pairs left behind
    b.pmap_enter(0, 2, RW)
    b.pmap_enter(PS, 3, R)
    b.pmap_enter(2 * PS, 6, R)  # page 6 stays
    phys.frames_discard(obj, [(PS, 4 * PS), (5 * PS, 6 * PS)], [1, 2, 3, 5])
    assert [b.pmap_extract(v * PS) for v in range(3)] == [None, None, 6]
    assert b.pmap_resident_count() == 1
    for f in (0, 4, 6, 7):
        assert phys.phys_read(f) == bytes([f + 1]) * PS
    phys.pmap_page_protect(6, NONE)  # the survivors' pv lists still work
    assert b.pmap_extract(2 * PS) is None
    other = _Object(10**9 + 3)
    for f in (1, 2, 3, 5):
        phys.frame_bind(f, other, f * PS)
        fill(phys, f, 0x40 + f)
        assert phys.phys_read(f) == bytes([0x40 + f]) * PS
    phys.frames_discard(other, [(PS, 4 * PS), (5 * PS, 6 * PS)], [1, 2, 3, 5])
    phys.frames_discard(obj, [(0, PS), (4 * PS, 5 * PS), (6 * PS, 8 * PS)], [0, 4, 6, 7])
    phys.object_gone(obj)
    phys.object_gone(other)


def test_a_discarded_frame_has_no_reference_or_modify_bit(phys: Any) -> None:
    """Both ways of freeing a frame clear its bits, so a frame taken off the free queue
    needs no pmap work (VmResident._fresh_page relies on it)."""
    pmap = phys.pmap_create()
    obj = _Object(10**9 + 5)
    for f in (11, 12):
        phys.frame_bind(f, obj, f * PS)
        pmap.pmap_enter(f * PS, f, RW)  # (a machine without a software MMU sets the
        if has_mmu(pmap):  # bits as it maps a frame: uffd_pmap)
            assert pmap.mmu_write(f * PS, b"w")
        assert phys.pmap_is_referenced(f) and phys.pmap_is_modified(f)
    phys.frames_discard(obj, [(11 * PS, 12 * PS)], [11])
    phys.pmap_page_discard(12)
    phys.frame_unbind(12)
    for f in (11, 12):
        assert not phys.pmap_is_referenced(f) and not phys.pmap_is_modified(f)
    phys.object_gone(obj)


def test_frames_discard_of_untabled_frames_and_in_a_batch(phys: Any) -> None:
    """Frames of no object (no runs) lose their mappings; inside a discard_batch a frame
    discarded and bound again at once keeps its new data."""
    pmap = phys.pmap_create()
    pmap.pmap_enter(0, 9, RW)
    phys.frames_discard(None, [], [9, 10])
    assert pmap.pmap_extract(0) is None
    obj = _Object(10**9 + 4)
    for f in range(4):
        phys.frame_bind(f, obj, f * PS)
        fill(phys, f, f + 1)
        pmap.pmap_enter(f * PS, f, R)
    with phys.discard_batch():
        phys.frames_discard(obj, [(0, 4 * PS)], [0, 1, 2, 3])
        phys.frame_bind(7, obj, 2 * PS)
        phys.phys_write(7, b"new data")
    assert [pmap.pmap_extract(f * PS) for f in range(4)] == [None] * 4
    assert phys.phys_read(7, 0, 8) == b"new data"
    phys.frames_discard(obj, [(2 * PS, 3 * PS)], [7])
    phys.object_gone(obj)


def test_enter_run_is_enter_page_by_page(phys: Any) -> None:
    pmap = phys.pmap_create()
    pmap.pmap_enter(9 * PS, 1, RW)
    pmap.pmap_enter_run(8 * PS, [5, 6, 7], R)  # replaces the mapping of page 9
    pmap.pmap_enter_run(20 * PS, [], R)  # an empty run maps nothing
    assert [pmap.pmap_extract(v * PS) for v in range(7, 12)] == [None, 5, 6, 7, None]
    assert [pmap.pmap_access(v * PS) for v in (8, 9, 10)] == [R, R, R]
    phys.pmap_page_protect(6, NONE)  # the pv lists know the run's pages
    assert pmap.pmap_extract(9 * PS) is None and pmap.pmap_extract(8 * PS) == 5


def test_phys_write_pages_writes_each_frame(phys: Any) -> None:
    obj = _Object(10**9 + 1)
    frames = [2, 3, 4, 9, 10]  # pages 0-2, then 5-6 of the object: two runs
    for f, page in zip(frames, [0, 1, 2, 5, 6], strict=True):
        phys.frame_bind(f, obj, page * PS)
    writes = [(f, bytes([f]) * PS) for f in frames]
    writes[-1] = (10, b"short")  # a partial last page
    phys.phys_write_pages([*writes, (11, bytes([11]) * PS)])  # 11: no object
    assert [phys.phys_read(f, 0, 8) for f in frames[:4]] == [bytes([f]) * 8 for f in frames[:4]]
    assert phys.phys_read(10, 0, 5) == b"short" and phys.phys_read(11, 0, 1) == b"\x0b"
    for f in frames:
        phys.frame_unbind(f)
    phys.object_gone(obj)


def test_phys_read_into_copies_each_frame_in_order(phys: Any) -> None:
    """phys_read_into(frames, into, skip) copies what phys_read of each frame, joined,
    holds from `skip` on, as much as `into` holds, whatever the frames: adjacent pages
    of one object (one run), a gap, frames out of order, a frame of no object, and a
    frame whose page was taken away (NONE: kept aside by a backend that maps objects)."""
    obj = _Object(10**9 + 3)
    for f, page in zip([2, 3, 4, 9], [0, 1, 2, 6], strict=True):
        phys.frame_bind(f, obj, page * PS)
    for f in (2, 3, 4, 9, 11, 5):
        fill(phys, f, f)
        phys.phys_write(f, f.to_bytes(2, "little") * 3, 100)  # (not one byte throughout)
    pmap = phys.pmap_create()
    pmap.pmap_enter(40 * PS, 5, RW)
    phys.pmap_page_protect(5, NONE)
    frames = [2, 3, 4, 9, 11, 3, 5, 2]
    whole = b"".join(phys.phys_read(f) for f in frames)
    for skip, size in ((0, len(whole)), (101, len(whole) - 101), (7, 3 * PS), (99, 5),
                       (0, PS - 1), (PS - 1, 2), (0, 0)):
        into = bytearray(b"\xee" * (size + 3))
        phys.phys_read_into(frames, memoryview(into)[:size], skip)
        assert into == whole[skip:skip + size] + b"\xee" * 3, (skip, size)
    for f in (2, 3, 4, 9):
        phys.frame_unbind(f)
    phys.object_gone(obj)


def test_lazy_zero_fill_of_an_object_no_task_maps(phys: Any) -> None:
    """Zero fill by the machine needs tasks mapping the object: every backend refuses
    it for one no task maps (nothing changes: the frames bound keep their data and the
    backend reports no page made behind the VM's back); stopping it is always allowed."""
    obj = _Object(10**9 + 4)
    assert phys.lazy_zero_fill(obj, True) is False
    assert phys.lazy_zero_fill(obj, False) is True
    phys.frame_bind(5, obj, 2 * PS)
    data = fill(phys, 5, 9)
    assert phys.lazy_collect(obj, 0, obj.size) == []
    phys.lazy_adopt(obj, [])
    assert phys.phys_read(5) == data
    phys.frames_discard(obj, [(2 * PS, 3 * PS)], [5])
    phys.object_gone(obj)


def test_freed_frames_have_no_reference_or_modify_bit(phys: Any) -> None:
    """frames_discard and pmap_page_discard clear the bits (a free frame has neither),
    so the VM can take a free frame without pmap work."""
    obj = _Object(10**9 + 5)
    p = phys.pmap_create()
    for f in (1, 2, 3):
        phys.frame_bind(f, obj, f * PS)
        fill(phys, f, f)
        p.pmap_enter(f * PS, f, RW)
    phys.modified[1] = phys.modified[2] = phys.referenced[3] = 1
    phys.frames_discard(obj, [(PS, 3 * PS)], [1, 2])
    phys.pmap_page_discard(3)
    phys.frame_unbind(3)
    for f in (1, 2, 3):
        assert not phys.pmap_is_modified(f) and not phys.pmap_is_referenced(f)
    phys.object_gone(obj)


def test_enter_around_maps_only_the_pages_not_mapped(phys: Any) -> None:
    pmap = phys.pmap_create()
    pmap.pmap_enter(9 * PS, 1, RW)  # mapped already: keeps its frame and its access
    pmap.pmap_enter(11 * PS, 2, R)
    pmap.pmap_protect(11 * PS, 12 * PS, NONE)  # no longer mapped: entered
    pmap.pmap_enter_around(8 * PS, [5, 6, 7, 8], R)
    pmap.pmap_enter_around(20 * PS, [], R)  # an empty run maps nothing
    assert [pmap.pmap_extract(v * PS) for v in range(7, 13)] == [None, 5, 1, 7, 8, None]
    assert [pmap.pmap_access(v * PS) for v in (8, 9, 10, 11)] == [R, RW, R, R]
    phys.pmap_page_protect(7, NONE)  # the pv lists know the entered pages
    assert pmap.pmap_extract(10 * PS) is None and pmap.pmap_extract(11 * PS) == 8


def test_object_window_holds_the_objects_pages_where_the_machine_has_one(phys: Any) -> None:
    """object_window: None for an object no task maps, on every backend; where the
    machine keeps a mapped object's pages in one file (the native backend: store_for),
    a read-write descriptor of it with an open file description of its own: what is
    written there at an offset is the page of the frame bound there once
    phys_placed_run takes it, and a page left unwritten reads as zeros."""
    obj = _Object(10**9 + 5)
    assert phys.object_window(obj) is None
    if not phys.maps_objects:
        return
    phys.store_for(obj)
    fd = phys.object_window(obj)
    assert fd is not None
    try:
        # O_APPEND changes only the window's own description: machd's writes below
        # still land at their offsets (this one lands at the file's end, not page 3)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
        os.pwrite(fd, b"\7" * PS, 3 * PS)
    finally:
        os.close(fd)
    fd = phys.object_window(obj)
    assert fd is not None
    try:
        os.pwrite(fd, b"\3" * PS, 2 * PS)
    finally:
        os.close(fd)
    phys.frames_bind([4, 5], obj, [2 * PS, 3 * PS])
    phys.phys_placed_run([4, 5])
    assert phys.phys_read(4) == b"\3" * PS
    assert phys.phys_read(5) == bytes(PS)  # left unwritten: zeros
    phys.phys_write(5, b"\5" * PS)  # machd's own writes land at their offsets
    assert phys.phys_read(5) == b"\5" * PS
    phys.frames_discard(obj, [(2 * PS, 4 * PS)], [4, 5])
    phys.object_gone(obj)


@pytest.mark.parametrize("stored", [False, True])
def test_frames_move_keeps_each_frames_data_at_its_new_place(
        phys: Any, stored: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """frames_move (a run of pages leaving for a holding object) is frame_move of each
    frame: every frame keeps its data at its new object and offset, whether either
    object's pages live in a file of their own (`stored`: a task maps them) or not, and
    where the machine keeps the source's pages in a file, their old places there are
    punched out. The frames, not adjacent, cross the chunks the backend reads at once."""
    from pymach.pmap import uffd_pmap

    monkeypatch.setattr(uffd_pmap, "MOVE_CHUNK", 2 * PS)  # (chunks of two pages)
    src, dst = _Object(10**9 + 6), _Object(10**9 + 7)
    if stored and phys.maps_objects:
        phys.store_for(src)
        phys.store_for(dst)
    frames = [9, 3, 4, 5, 12]
    for i, f in enumerate(frames):
        phys.frame_bind(f, src, (2 + i) * PS)
        fill(phys, f, 0x10 + i)
    phys.frames_move(frames[:1], dst, [0])
    phys.frames_move(frames[1:], dst, [i * PS for i in range(1, 5)])
    for i, f in enumerate(frames):
        assert phys.phys_read(f) == bytes([0x10 + i]) * PS
    if stored and phys.maps_objects:
        fd = phys.object_window(src)
        try:
            assert os.pread(fd, 5 * PS, 2 * PS) in (bytes(5 * PS), b"")  # punched out
        finally:
            os.close(fd)
        fd = phys.object_window(dst)
        try:
            assert os.pread(fd, 5 * PS, 0) == b"".join(bytes([0x10 + i]) * PS
                                                       for i in range(5))
        finally:
            os.close(fd)
    phys.frames_discard(dst, [(0, 5 * PS)], frames)
    phys.object_gone(src)
    phys.object_gone(dst)


def test_frames_move_keeps_the_data_when_the_new_places_cannot_take_them(
        phys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk frames_move cannot write to its new places (no memory there: the old
    places are punched already) keeps its data in the backend (the stash of pages taken
    from every task), so every frame still reads its data at its new place: nothing is
    lost; the same for one page (frame_move), and a stashed page that cannot be put
    back yet stays stashed. (Only the native backend can fail to write.)"""
    if not phys.maps_objects:
        pytest.skip("only a backend that keeps pages in files can fail to write them")
    from pymach.pmap import uffd_pmap

    monkeypatch.setattr(uffd_pmap, "MOVE_CHUNK", 2 * PS)  # (chunks of two pages)
    src, dst = _Object(10**9 + 8), _Object(10**9 + 9)
    phys.store_for(src)
    phys.store_for(dst)
    frames = [9, 3, 4]
    for i, f in enumerate(frames):
        phys.frame_bind(f, src, (2 + i) * PS)
        fill(phys, f, 0x20 + i)
    real, calls = phys._store_write, []

    def second_write_fails(*args: Any) -> None:  # the second chunk finds no memory
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(*args)

    def no_memory(*args: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(phys, "_store_write", second_write_fails)
    phys.frames_move(frames, dst, [0, PS, 2 * PS])
    phys.frame_bind(7, src, 9 * PS)
    fill(phys, 7, 0x23)
    monkeypatch.setattr(phys, "_store_write", no_memory)
    phys.frame_move(7, dst, 3 * PS)  # (one page: the same)
    for i, f in enumerate([*frames, 7]):
        assert phys.phys_read(f) == bytes([0x20 + i]) * PS
    assert 4 in phys.stash and 7 in phys.stash and 9 not in phys.stash
    with phys.lock, pytest.raises(OSError):  # putting it back while memory is short
        phys._restore(4)
    assert phys.phys_read(4) == b"\x22" * PS  # still kept
    monkeypatch.setattr(phys, "_store_write", real)
    with phys.lock:
        phys._restore(4)
    assert 4 not in phys.stash
    fd = phys.object_window(dst)
    try:
        assert os.pread(fd, PS, 2 * PS) == b"\x22" * PS  # back in its place
    finally:
        os.close(fd)
    phys.frames_discard(dst, [(0, 4 * PS)], [*frames, 7])
    assert not phys.stash
    phys.object_gone(src)
    phys.object_gone(dst)


def test_an_object_mapped_at_last_takes_its_pages_with_it(
        phys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pages bound to an object no task maps (a pageout's holding object, say) move into
    the object's own file when it first gets one (store_for: its manager maps it), each
    with its data at its offset: adjacent and scattered frames, a page taken from every
    task (stashed: it stays so), a page never written (zeros); their old places in the
    backend's free store are punched out, a run of adjacent frames per call."""
    if not phys.maps_objects:
        pytest.skip("only a backend that keeps objects' pages in files moves them")
    from pymach.pmap import uffd_pmap

    punches: list[tuple[int, int]] = []
    punch = uffd_pmap.linux.punch_hole
    monkeypatch.setattr(uffd_pmap.linux, "punch_hole",
                        lambda fd, at, n: punches.append((at, n)) or punch(fd, at, n))
    obj = _Object(10**9 + 10)
    frames = [20, 21, 22, 5, 30, 31]
    for i, f in enumerate(frames):
        phys.frame_bind(f, obj, i * PS)
        if f != 30:  # (30: never written)
            fill(phys, f, 0x40 + i)
    phys.pmap_page_protect(22, m.VM_PROT_NONE)  # taken from every task: stashed
    assert 22 in phys.stash
    punches.clear()
    phys.store_for(obj)
    assert sorted(punches) == [(5 * PS, PS), (20 * PS, 2 * PS), (30 * PS, 2 * PS)]
    want = [bytes([0x40 + i]) * PS if f != 30 else bytes(PS) for i, f in enumerate(frames)]
    assert [phys.phys_read(f) for f in frames] == want
    fd = phys.object_window(obj)
    try:
        got = [os.pread(fd, PS, i * PS).ljust(PS, b"\0") for i in range(len(frames))]
    finally:
        os.close(fd)
    assert got[:2] + got[3:] == want[:2] + want[3:] and got[2] == bytes(PS)  # (stashed)
    free = phys.free_store.fd
    assert all(os.pread(free, PS, f * PS).strip(b"\0") == b"" for f in frames)
    phys.frames_discard(obj, [(0, len(frames) * PS)], frames)
    phys.object_gone(obj)


def test_object_pages_home_puts_kept_data_back_into_the_window(phys: Any) -> None:
    """object_pages_home: False where the machine has no windows; where it has, a page
    taken from every task (its data kept aside: pmap_page_protect to NONE) is back in
    the object's window, at its offset, afterwards."""
    obj = _Object(10**9 + 7)
    if not phys.maps_objects:
        phys.frames_bind([4], obj, [0])
        assert phys.object_pages_home([4]) is False
        return
    phys.store_for(obj)
    phys.frames_bind([4, 5], obj, [0, PS])
    phys.phys_write(4, b"\4" * PS)
    phys.phys_write(5, b"\5" * PS)
    phys.pmap_page_protect(5, NONE)  # taken from every task
    fd = phys.object_window(obj)
    assert fd is not None
    try:
        assert os.pread(fd, PS, PS) == bytes(PS)  # (kept aside: a hole in the window)
        assert phys.object_pages_home([4, 5]) is True
        assert os.pread(fd, 2 * PS, 0) == b"\4" * PS + b"\5" * PS
        assert phys.phys_read(5) == b"\5" * PS
    finally:
        os.close(fd)
    phys.frames_discard(obj, [(0, 2 * PS)], [4, 5])
    phys.object_gone(obj)


def test_a_dead_objects_punches_may_wait_until_the_kernel_lock_is_let_go(
        phys: Any) -> None:
    """object_gone inside a discard_batch may return, instead of doing it, what is
    left of letting go of the object (its pages, discarded in the batch, punched out
    of its file): work that touches nothing anybody else reaches, which the caller runs
    once it lets go of the kernel lock (vm_object._gone). Until then the object's file
    may still hold the data; afterwards nothing of it is left. Another object's
    punches held in the same batch are done by the batch's end, as always."""
    obj, other = _Object(10**9 + 20), _Object(10**9 + 21)
    for f, o in ((0, obj), (1, obj), (2, other), (3, other)):
        phys.frame_bind(f, o, (f % 2) * PS)
        fill(phys, f, 0x50 + f)
    fd = None
    if phys.maps_objects:
        phys.store_for(obj)
        phys.store_for(other)
        fd = phys.stores[obj.serial].fd
    with phys.discard_batch():
        phys.frames_discard(obj, [(0, 2 * PS)], [0, 1])
        phys.frames_discard(other, [(0, PS)], [2])
        rest = phys.object_gone(obj)
    assert rest is None or callable(rest)
    if phys.maps_objects:
        assert rest is not None  # (the batch held the dead object's punch back)
        assert os.pread(fd, PS, 0) == bytes([0x50]) * PS  # not punched yet
        window = phys.object_window(other)
        try:  # the other object's page 0 was punched at the batch's end; page 1 stays
            assert os.pread(window, PS, 0).strip(b"\0") == b""
            assert os.pread(window, PS, PS) == bytes([0x53]) * PS
        finally:
            os.close(window)
    if rest is not None:
        rest()
    if fd is not None:
        with pytest.raises(OSError):
            os.fstat(fd)  # closed with its pages gone
    assert phys.phys_read(3) == bytes([0x53]) * PS
    phys.frames_discard(other, [(PS, 2 * PS)], [3])
    assert phys.object_gone(other) is None  # (outside a batch: all done at once)
