"""Table 3-3: the virtual memory operations on a task, and out-of-line memory in messages.

Paper 3.3: a task's address space is an ordered collection of valid regions, aligned on
the system page size (a boot parameter, any multiple of the hardware page); regions are
zero-filled on demand; each has a current and a maximum protection and an inheritance
(share, copy or none) that decides what a child created by task_create gets; copying,
whether by vm_copy, by inheritance or in a message, is copy-on-write. Paper 5.1: a
vm_write into a region shared through inheritance happens in the sharing map, so every
sharer sees it. Each call is an RPC on a task port, so whoever holds a task's port can
operate on its memory. Bad arguments fail with a clear code and change nothing.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import pymach as m
from machutil import assert_kernel_ok, notifications, recv, sleep_ms, start_thread, wait_until
from pymach import OOL, Message, Port

CONTRACT = True  # these run as native tasks of machd too (conftest.py)

HW_PAGE = 4096
VM_MIN = 0x10000  # the first 64 KiB stay unmapped
VM_MAX = 1 << 47
R, W, X = m.VM_PROT_READ, m.VM_PROT_WRITE, m.VM_PROT_EXECUTE
RW = m.VM_PROT_DEFAULT
SHARE, COPY, NONE = m.VM_INHERIT_SHARE, m.VM_INHERIT_COPY, m.VM_INHERIT_NONE


def ps() -> int:
    return m.vm_page_size()


def alloc(pages: int, task: int | None = None) -> int:
    return m.vm_allocate(m.task_self() if task is None else task, 0,  # type: ignore[no-any-return]
                         pages * ps(), True)


def pattern(tag: int, i: int, size: int | None = None) -> bytes:
    """A page's worth of bytes that differ by tag and page number."""
    n = ps() if size is None else size
    return (bytes([tag % 256, i % 256, (i >> 8) % 256, 0xA5]) * (n // 4 + 1))[:n]


def fill(address: int, pages: int, tag: int) -> None:
    mem = m.memory()
    for i in range(pages):
        mem[address + i * ps():address + (i + 1) * ps()] = pattern(tag, i)


def check_fill(address: int, pages: int, tag: int, task: int | None = None) -> None:
    for i in range(pages):
        at = address + i * ps()
        got = m.memory().read(at, ps()) if task is None else m.vm_read(task, at, ps())
        assert got == pattern(tag, i), f"page {i} at {at:#x}"


def covered(task: int, address: int, size: int) -> list[tuple[int, int, int, int, int]]:
    """vm_regions of [address, address+size), merged where neighbours have the same
    attributes (the kernel may split a region into several entries)."""
    rows: list[tuple[int, int, int, int, int]] = []
    for r in m.vm_regions(task, address, size):
        if rows and rows[-1][0] + rows[-1][1] == r.address and rows[-1][2:] == (
                r.protection, r.max_protection, r.inheritance):
            rows[-1] = (rows[-1][0], rows[-1][1] + r.size, *rows[-1][2:])
        else:
            rows.append((r.address, r.size, r.protection, r.max_protection, r.inheritance))
    return rows


def vm_round_trip() -> None:
    """A normal round of VM calls still works."""
    me = m.task_self()
    mem = m.memory()
    a = alloc(2)
    assert mem[a:a + 4] == bytes(4)
    mem[a:a + 5] = b"round"
    m.vm_write(me, a + ps(), b"trip" + bytes(ps() - 4))
    assert m.vm_read(me, a, 5) == b"round"
    assert mem[a + ps():a + ps() + 4] == b"trip"
    b = alloc(2)
    m.vm_copy(me, a, 2 * ps(), b)
    assert mem[b:b + 5] == b"round"
    m.vm_deallocate(me, a, 2 * ps())
    m.vm_deallocate(me, b, 2 * ps())
    with pytest.raises(m.KernError) as e:
        mem[a]
    assert e.value.code == "KERN_INVALID_ADDRESS"


def assert_all_ok() -> None:
    assert_kernel_ok()
    vm_round_trip()


def raises(code: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> m.MachError:
    with pytest.raises(m.MachError) as e:
        fn(*args, **kwargs)
    assert e.value.code == code, e.value
    return e.value


# -- vm_allocate ----------------------------------------------------------------------------


def test_vm_allocate_anywhere_is_page_aligned_and_zero_filled(kernel: m.Kernel) -> None:
    me = m.task_self()
    mem = m.memory()
    a = m.vm_allocate(me, 0, 3 * ps(), True)
    b = m.vm_allocate(me, 0, 1, True)  # rounded up to a page
    c = m.vm_allocate(me, 0, ps() + 1, True)  # and to two
    for x in (a, b, c):
        assert x % ps() == 0 and x >= VM_MIN
    spans = sorted([(a, 3 * ps()), (b, ps()), (c, 2 * ps())])
    for (s1, n1), (s2, _) in itertools.pairwise(spans):
        assert s1 + n1 <= s2  # regions never overlap
    assert mem[a:a + 3 * ps()] == bytes(3 * ps())
    assert mem[b:b + ps()] == bytes(ps())
    assert mem[c + 2 * ps() - 1] == 0
    assert covered(me, b, ps()) == [(b, ps(), RW, m.VM_PROT_ALL, COPY)]
    assert covered(me, c, 2 * ps())[0][1] == 2 * ps()
    raises("KERN_INVALID_ADDRESS", mem.read, VM_MIN - 1, 1)


def test_vm_allocate_fixed(kernel: m.Kernel) -> None:
    me = m.task_self()
    mem = m.memory()
    a = alloc(8)
    m.vm_deallocate(me, a, 8 * ps())
    assert m.vm_allocate(me, a + 2 * ps(), 3 * ps(), False) == a + 2 * ps()
    assert covered(me, a, 8 * ps()) == [(a + 2 * ps(), 3 * ps(), RW, m.VM_PROT_ALL, COPY)]
    raises("KERN_NO_SPACE", m.vm_allocate, me, a + 2 * ps(), ps(), False)
    raises("KERN_NO_SPACE", m.vm_allocate, me, a + ps(), 2 * ps(), False)  # overlaps the start
    raises("KERN_NO_SPACE", m.vm_allocate, me, a + 4 * ps(), 2 * ps(), False)  # and the end
    assert m.vm_allocate(me, a + ps(), ps(), False) == a + ps()  # right next to it: fine
    assert m.vm_allocate(me, a + 5 * ps(), ps(), False) == a + 5 * ps()
    assert mem[a + ps():a + 6 * ps()] == bytes(5 * ps())
    top = getattr(kernel, "vm_max", VM_MAX) - ps()  # machd's tasks live in a window
    assert m.vm_allocate(me, top, ps(), False) == top  # the last page of the address space
    mem[top + ps() - 1] = 7
    assert m.vm_read(me, top + ps() - 1, 1) == b"\x07"
    m.vm_deallocate(me, top, ps())


def test_vm_allocate_anywhere_skips_occupied_space(kernel: m.Kernel) -> None:
    me = m.task_self()
    a = alloc(4)
    m.vm_deallocate(me, a + ps(), ps())  # a one-page hole
    b = m.vm_allocate(me, 0, 2 * ps(), True)  # does not fit in the hole
    assert b != a + ps() and (b >= a + 4 * ps() or b + 2 * ps() <= a)
    c = m.vm_allocate(me, 0, ps(), True)  # fits
    assert c == a + ps()


def test_deallocated_memory_comes_back_zero_filled(kernel: m.Kernel) -> None:
    me = m.task_self()
    mem = m.memory()
    a = alloc(2)
    fill(a, 2, 1)
    m.vm_deallocate(me, a, 2 * ps())
    assert m.vm_allocate(me, a, 2 * ps(), False) == a
    assert mem[a:a + 2 * ps()] == bytes(2 * ps())


# -- vm_deallocate --------------------------------------------------------------------------


def test_vm_deallocate(kernel: m.Kernel) -> None:
    me = m.task_self()
    mem = m.memory()
    a = alloc(6)
    fill(a, 6, 2)
    m.vm_deallocate(me, a + 2 * ps(), 2 * ps())  # the middle: the region splits
    assert covered(me, a, 6 * ps()) == [(a, 2 * ps(), RW, m.VM_PROT_ALL, COPY),
                                         (a + 4 * ps(), 2 * ps(), RW, m.VM_PROT_ALL, COPY)]
    for va in (a + 2 * ps(), a + 4 * ps() - 1):
        raises("KERN_INVALID_ADDRESS", mem.read, va, 1)
    check_fill(a, 2, 2)
    assert mem[a + 4 * ps():a + 5 * ps()] == pattern(2, 4)
    # rounded out to pages: a byte range takes whole pages
    m.vm_deallocate(me, a + ps() + 10, 1)
    raises("KERN_INVALID_ADDRESS", mem.read, a + ps(), 1)
    assert mem[a] == pattern(2, 0)[0]
    # holes and unallocated ranges are fine; size 0 does nothing
    m.vm_deallocate(me, a, 6 * ps())
    m.vm_deallocate(me, a, 6 * ps())
    m.vm_deallocate(me, VM_MIN, 0)
    assert m.vm_regions(me, a, 6 * ps()) == []
    raises("KERN_INVALID_ADDRESS", mem.read, a, 1)


# -- vm_protect --------------------------------------------------------------------------


def test_vm_protect_current(kernel: m.Kernel) -> None:
    me = m.task_self()
    mem = m.memory()
    a = alloc(3)
    fill(a, 3, 3)
    m.vm_protect(me, a + ps(), ps(), False, R)
    assert covered(me, a, 3 * ps()) == [(a, ps(), RW, m.VM_PROT_ALL, COPY),
                                         (a + ps(), ps(), R, m.VM_PROT_ALL, COPY),
                                         (a + 2 * ps(), ps(), RW, m.VM_PROT_ALL, COPY)]
    assert mem[a + ps()] == pattern(3, 1)[0]  # readable
    raises("KERN_PROTECTION_FAILURE", mem.write, a + ps() + 5, b"x")
    raises("KERN_PROTECTION_FAILURE", m.vm_write, me, a + ps(), bytes(ps()))
    assert m.vm_read(me, a + ps(), 4) == pattern(3, 1, 4)
    mem[a:a + 2] = b"ok"  # the neighbours keep their access
    mem[a + 2 * ps():a + 2 * ps() + 2] = b"ok"
    m.vm_protect(me, a + ps(), ps(), False, m.VM_PROT_NONE)
    raises("KERN_PROTECTION_FAILURE", mem.read, a + ps(), 1)
    raises("KERN_PROTECTION_FAILURE", m.vm_read, me, a + ps(), 1)
    m.vm_protect(me, a + ps(), ps(), False, RW)  # below the maximum: may go up again
    mem[a + ps():a + ps() + 2] = b"up"
    assert mem[a + ps() + 2:a + ps() + 4] == pattern(3, 1)[2:4]  # the data survived


def test_vm_protect_write_protects_pages_already_mapped(kernel: m.Kernel) -> None:
    """The MMU must forget write access at once, not only for pages touched later."""
    me = m.task_self()
    mem = m.memory()
    a = alloc(4)
    fill(a, 4, 4)  # every page mapped writable now
    m.vm_protect(me, a, 4 * ps(), False, R)
    for i in range(4):
        raises("KERN_PROTECTION_FAILURE", mem.write, a + i * ps(), b"!")
    check_fill(a, 4, 4)


def test_vm_protect_maximum(kernel: m.Kernel) -> None:
    me = m.task_self()
    mem = m.memory()
    a = alloc(2)
    mem[a] = 1
    m.vm_protect(me, a, 2 * ps(), True, R)  # lowering the maximum lowers the current too
    assert covered(me, a, 2 * ps()) == [(a, 2 * ps(), R, R, COPY)]
    raises("KERN_PROTECTION_FAILURE", mem.write, a, b"x")
    raises("KERN_PROTECTION_FAILURE", m.vm_protect, me, a, ps(), False, RW)  # above max
    assert covered(me, a, 2 * ps()) == [(a, 2 * ps(), R, R, COPY)]  # nothing changed
    m.vm_protect(me, a, ps(), False, m.VM_PROT_NONE)  # below the maximum is fine
    m.vm_protect(me, a, ps(), False, R)
    assert mem[a] == 1
    m.vm_protect(me, a + ps(), ps(), True, m.VM_PROT_NONE)  # lowering further is fine
    assert covered(me, a, 2 * ps())[1][2:4] == (m.VM_PROT_NONE, m.VM_PROT_NONE)
    raises("KERN_PROTECTION_FAILURE", mem.read, a + ps(), 1)
    # a maximum that does not cover the current protection cuts it to what both allow
    b = alloc(1)
    m.vm_protect(me, b, ps(), True, R | X)
    assert covered(me, b, ps()) == [(b, ps(), R, R | X, COPY)]
    m.vm_protect(me, b, ps(), False, X)
    assert covered(me, b, ps()) == [(b, ps(), X, R | X, COPY)]


def test_vm_protect_cannot_raise_the_maximum(kernel: m.Kernel) -> None:
    """The maximum protection only ever goes down: raising it is KERN_PROTECTION_FAILURE
    (Mach's vm_protect), or the maximum would protect nothing."""
    me = m.task_self()
    mem = m.memory()
    a = alloc(1)
    m.vm_protect(me, a, ps(), True, R)
    raises("KERN_PROTECTION_FAILURE", m.vm_protect, me, a, ps(), True, RW)
    raises("KERN_PROTECTION_FAILURE", m.vm_protect, me, a, ps(), True, m.VM_PROT_ALL)
    assert covered(me, a, ps()) == [(a, ps(), R, R, COPY)]
    raises("KERN_PROTECTION_FAILURE", m.vm_protect, me, a, ps(), False, RW)
    raises("KERN_PROTECTION_FAILURE", mem.write, a, b"x")


def test_protection_is_per_task(kernel: m.Kernel) -> None:
    """Protection lives in the task's own map: a child sharing a region may write it
    while the parent may not (paper 5.1: per-task attributes in the top-level map)."""
    me = m.task_self()
    mem = m.memory()
    a = alloc(1)
    m.vm_inherit(me, a, ps(), SHARE)
    child = m.task_create(me, True)
    m.vm_protect(me, a, ps(), False, R)
    m.vm_write(child, a, b"child" + bytes(ps() - 5))
    assert mem[a:a + 5] == b"child"
    raises("KERN_PROTECTION_FAILURE", mem.write, a, b"x")
    assert covered(child, a, ps()) == [(a, ps(), RW, m.VM_PROT_ALL, SHARE)]
    m.task_terminate(child)


# -- vm_inherit and task_create ------------------------------------------------------------


@pytest.fixture
def three_regions() -> dict[str, Any]:
    """A shared, a copied and a not-inherited region of 2 pages, each with data."""
    me = m.task_self()
    r = {"share": alloc(2), "copy": alloc(2), "none": alloc(2)}
    m.vm_inherit(me, r["share"], 2 * ps(), SHARE)
    m.vm_inherit(me, r["copy"], 2 * ps(), COPY)
    m.vm_inherit(me, r["none"], 2 * ps(), NONE)
    tags = {"copy": 10, "none": 11, "share": 12}
    for name, a in r.items():
        fill(a, 2, tags[name])
    return {**r, "tags": tags}


def test_inheritance_seen_through_the_child_task_port(kernel: m.Kernel,
                                                      three_regions: dict[str, Any]) -> None:
    me = m.task_self()
    mem = m.memory()
    sh, cp, no, tags = (three_regions[k] for k in ("share", "copy", "none", "tags"))
    child = m.task_create(me, True)
    rows = {r.address: r for r in m.vm_regions(child)}
    assert no not in rows and not m.vm_regions(child, no, 2 * ps())
    assert rows[sh].inheritance == SHARE and rows[sh].shared
    assert rows[cp].inheritance == COPY and not rows[cp].shared
    check_fill(sh, 2, tags["share"], child)
    check_fill(cp, 2, tags["copy"], child)
    raises("KERN_INVALID_ADDRESS", m.vm_read, child, no, 1)
    # share: each sees the other's writes; copy: neither does
    mem[sh:sh + 6] = b"parent"
    mem[cp:cp + 6] = b"parent"
    assert m.vm_read(child, sh, 6) == b"parent"
    assert m.vm_read(child, cp, 6) == pattern(tags["copy"], 0, 6)
    m.vm_write(child, sh + ps(), b"child!" + bytes(ps() - 6))
    m.vm_write(child, cp + ps(), b"child!" + bytes(ps() - 6))
    assert mem[sh + ps():sh + ps() + 6] == b"child!"
    assert mem[cp + ps():cp + ps() + 6] == pattern(tags["copy"], 1, 6)
    # the none region's addresses are free in the child
    assert m.vm_allocate(child, no, 2 * ps(), False) == no
    assert m.vm_read(child, no, 4) == bytes(4)
    check_fill(no, 2, tags["none"])  # and the parent's stays as it was
    m.task_terminate(child)
    # the parent keeps everything after the child is gone
    assert mem[sh + ps():sh + ps() + 6] == b"child!"
    assert mem[cp:cp + 6] == b"parent"


def test_inheritance_seen_by_a_thread_of_the_child(kernel: m.Kernel,
                                                   three_regions: dict[str, Any]) -> None:
    mem = m.memory()
    sh, cp, no, tags = (three_regions[k] for k in ("share", "copy", "none", "tags"))

    def child(sh: int, cp: int, no: int) -> tuple[bytes, bytes, str]:
        mine = m.memory()
        seen = (mine[sh:sh + 4], mine[cp:cp + 4])
        try:
            mine[no]
            missing = "present"
        except m.MachError as e:
            missing = e.code
        mine[sh + 8:sh + 13] = b"child"
        mine[cp + 8:cp + 13] = b"child"
        return (*seen, missing)

    h = kernel.spawn(child, sh, cp, no, name="heir", inherit=True)
    assert h.result(5000) == (pattern(tags["share"], 0, 4), pattern(tags["copy"], 0, 4),
                              "KERN_INVALID_ADDRESS")
    assert mem[sh + 8:sh + 13] == b"child"
    assert mem[cp + 8:cp + 13] == pattern(tags["copy"], 0)[8:13]
    check_fill(no, 2, tags["none"])


def test_no_inheritance_gives_an_empty_address_space(kernel: m.Kernel,
                                                     three_regions: dict[str, Any]) -> None:
    child = m.task_create(m.task_self(), False)
    assert m.vm_regions(child) == []
    raises("KERN_INVALID_ADDRESS", m.vm_read, child, three_regions["share"], 1)
    h = kernel.spawn(lambda: len(m.vm_regions(m.task_self())), name="orphan")
    assert h.result(5000) == 0
    m.task_terminate(child)


def test_inheritance_is_per_page_range(kernel: m.Kernel) -> None:
    me = m.task_self()
    mem = m.memory()
    a = alloc(3)
    fill(a, 3, 5)
    m.vm_inherit(me, a + ps(), ps(), SHARE)
    m.vm_inherit(me, a + 2 * ps(), ps() // 2, NONE)  # rounded out to the page
    assert [r[4] for r in covered(me, a, 3 * ps())] == [COPY, SHARE, NONE]
    child = m.task_create(me, True)
    assert [(r[0], r[4]) for r in covered(child, a, 3 * ps())] == [(a, COPY),
                                                                   (a + ps(), SHARE)]
    mem[a:a + 1] = b"P"
    mem[a + ps():a + ps() + 1] = b"P"
    assert m.vm_read(child, a, 1) == pattern(5, 0, 1)
    assert m.vm_read(child, a + ps(), 1) == b"P"
    m.task_terminate(child)


def test_sharing_reaches_grandchildren(kernel: m.Kernel) -> None:
    me = m.task_self()
    mem = m.memory()
    a = alloc(1)
    m.vm_inherit(me, a, ps(), SHARE)
    child = m.task_create(me, True)
    grandchild = m.task_create(child, True)  # task_create on the child's port
    m.vm_write(grandchild, a, b"from below" + bytes(ps() - 10))
    assert mem[a:a + 10] == b"from below"
    assert m.vm_read(child, a, 10) == b"from below"
    m.task_terminate(child)
    mem[a:a + 4] = b"TOP!"
    assert m.vm_read(grandchild, a, 4) == b"TOP!"
    m.task_terminate(grandchild)


def test_copy_of_a_shared_region(kernel: m.Kernel) -> None:
    """A region shared with one child and then inherited by copy into another."""
    me = m.task_self()
    mem = m.memory()
    a = alloc(1)
    fill(a, 1, 6)
    m.vm_inherit(me, a, ps(), SHARE)
    sharer = m.task_create(me, True)
    m.vm_inherit(me, a, ps(), COPY)
    copier = m.task_create(me, True)
    mem[a:a + 4] = b"new1"
    assert m.vm_read(sharer, a, 4) == b"new1"
    assert m.vm_read(copier, a, 4) == pattern(6, 0, 4)
    m.vm_write(sharer, a, b"new2" + bytes(ps() - 4))
    assert mem[a:a + 4] == b"new2"
    assert m.vm_read(copier, a, 4) == pattern(6, 0, 4)
    m.vm_write(copier, a, b"new3" + bytes(ps() - 4))
    assert mem[a:a + 4] == b"new2" and m.vm_read(sharer, a, 4) == b"new2"
    m.task_terminate(sharer)
    m.task_terminate(copier)


def test_deallocating_in_the_parent_leaves_the_child_its_memory(kernel: m.Kernel) -> None:
    me = m.task_self()
    sh, cp = alloc(2), alloc(2)
    m.vm_inherit(me, sh, 2 * ps(), SHARE)
    fill(sh, 2, 7)
    fill(cp, 2, 8)
    child = m.task_create(me, True)
    m.vm_deallocate(me, sh, 2 * ps())
    m.vm_deallocate(me, cp, 2 * ps())
    check_fill(sh, 2, 7, child)
    check_fill(cp, 2, 8, child)
    m.task_terminate(child)


# -- vm_read and vm_write --------------------------------------------------------------------


def test_vm_read(kernel: m.Kernel) -> None:
    me = m.task_self()
    mem = m.memory()
    a = alloc(3)
    fill(a, 3, 9)
    assert m.vm_read(me, a, 3 * ps()) == b"".join(pattern(9, i) for i in range(3))
    assert m.vm_read(me, a + ps() - 3, 6) == pattern(9, 0)[-3:] + pattern(9, 1)[:3]
    assert m.vm_read(me, a, 0) == b""
    data = m.vm_read(me, a, ps())
    mem[a:a + 4] = b"LATE"  # the data read is a copy: later writes do not change it
    assert data == pattern(9, 0)
    assert m.vm_read(me, a, 4) == b"LATE"
    b = alloc(1)
    assert m.vm_read(me, b, ps()) == bytes(ps())  # untouched memory reads as zeros
    # vm_read leaves no memory behind in the caller
    objects = kernel.vm_stat()["objects"]
    for _ in range(5):
        m.vm_read(me, a, 2 * ps())
    assert kernel.vm_stat()["objects"] == objects


def test_vm_write_replaces_pages(kernel: m.Kernel) -> None:
    me = m.task_self()
    mem = m.memory()
    a = alloc(4)
    fill(a, 4, 1)
    m.vm_write(me, a + ps(), pattern(2, 1) + pattern(2, 2))
    assert mem[a:a + ps()] == pattern(1, 0)
    assert mem[a + ps():a + 3 * ps()] == pattern(2, 1) + pattern(2, 2)
    assert mem[a + 3 * ps():a + 4 * ps()] == pattern(1, 3)
    # data shorter than a page replaces its bytes and keeps the rest of the page
    m.vm_write(me, a, b"short")
    assert mem[a:a + 5] == b"short" and mem[a + 5:a + ps()] == pattern(1, 0)[5:]
    m.vm_write(me, a + 3 * ps(), b"")  # nothing to write
    assert mem[a + 3 * ps():a + 4 * ps()] == pattern(1, 3)
    # the caller's own memory as the data (an OOL region), copied, not aliased
    src = alloc(1)
    mem[src:src + 4] = b"SRC!"
    m.vm_write(me, a + 3 * ps(), OOL(src, ps()))
    mem[src:src + 4] = b"CHG!"
    assert mem[a + 3 * ps():a + 3 * ps() + 4] == b"SRC!"
    mem[a + 3 * ps():a + 3 * ps() + 4] = b"DST!"
    assert mem[src:src + 4] == b"CHG!"
    # bytearray and memoryview are data too
    m.vm_write(me, a, bytearray(b"ba"))
    m.vm_write(me, a + ps(), memoryview(b"mv"))
    assert mem[a:a + 3] == b"bao"  # over b"short"
    assert mem[a + ps():a + ps() + 3] == b"mv" + pattern(2, 1)[2:3]


def test_vm_write_into_a_shared_region_is_seen_by_every_sharer(kernel: m.Kernel) -> None:
    me = m.task_self()
    mem = m.memory()
    a = alloc(2)
    fill(a, 2, 3)
    m.vm_inherit(me, a, 2 * ps(), SHARE)
    c1 = m.task_create(me, True)
    c2 = m.task_create(me, True)
    m.vm_write(me, a, pattern(4, 0))  # the parent writes: both children see it
    assert m.vm_read(c1, a, ps()) == pattern(4, 0) == m.vm_read(c2, a, ps())
    m.vm_write(c1, a + ps(), pattern(5, 1))  # a child writes: the others see it
    assert mem[a + ps():a + 2 * ps()] == pattern(5, 1) == m.vm_read(c2, a + ps(), ps())
    m.vm_copy(c2, a + ps(), ps(), a)  # vm_copy into the shared region, too
    assert mem[a:a + ps()] == pattern(5, 1) == m.vm_read(c1, a, ps())
    # and ordinary stores keep going to the same memory afterwards
    mem[a + 10:a + 12] = b"!!"
    assert m.vm_read(c1, a + 10, 2) == b"!!" == m.vm_read(c2, a + 10, 2)
    m.task_terminate(c1)
    m.task_terminate(c2)


def test_vm_write_in_a_copied_region_stays_private(kernel: m.Kernel) -> None:
    me = m.task_self()
    mem = m.memory()
    a = alloc(1)
    fill(a, 1, 6)
    child = m.task_create(me, True)
    m.vm_write(child, a, pattern(7, 0))
    assert mem[a:a + ps()] == pattern(6, 0)
    m.vm_write(me, a, pattern(8, 0))
    assert m.vm_read(child, a, ps()) == pattern(7, 0)
    m.task_terminate(child)


# -- vm_copy -------------------------------------------------------------------------------


def test_vm_copy_is_copy_on_write(kernel: m.Kernel) -> None:
    me = m.task_self()
    mem = m.memory()
    src, dst = alloc(4), alloc(4)
    fill(src, 4, 1)
    m.vm_protect(me, dst + 3 * ps(), ps(), False, R | W | X)
    m.vm_copy(me, src, 4 * ps(), dst)
    check_fill(dst, 4, 1)
    mem[src:src + 4] = b"SRC!"  # writes on either side stay on that side
    mem[dst + ps():dst + ps() + 4] = b"DST!"
    assert mem[dst:dst + 4] == pattern(1, 0, 4)
    assert mem[src + ps():src + ps() + 4] == pattern(1, 1, 4)
    assert mem[dst + ps():dst + ps() + 4] == b"DST!"
    # the destination keeps its own attributes
    assert covered(me, dst + 3 * ps(), ps())[0][2] == R | W | X
    m.vm_copy(me, src, 0, dst)  # nothing to copy


def test_vm_copy_overlapping_ranges(kernel: m.Kernel) -> None:
    me = m.task_self()
    mem = m.memory()
    a = alloc(4)
    fill(a, 4, 2)
    m.vm_copy(me, a, 2 * ps(), a + ps())  # the source as it was before the copy
    assert [mem[a + i * ps():a + (i + 1) * ps()] for i in range(4)] == [
        pattern(2, 0), pattern(2, 0), pattern(2, 1), pattern(2, 3)]
    m.vm_copy(me, a + 2 * ps(), 2 * ps(), a)
    assert [mem[a + i * ps():a + (i + 1) * ps()] for i in range(4)] == [
        pattern(2, 1), pattern(2, 3), pattern(2, 1), pattern(2, 3)]


def test_vm_copy_of_memory_never_touched_is_zero(kernel: m.Kernel) -> None:
    me = m.task_self()
    mem = m.memory()
    src, dst = alloc(2), alloc(2)
    fill(dst, 2, 3)
    m.vm_copy(me, src, 2 * ps(), dst)
    assert mem[dst:dst + 2 * ps()] == bytes(2 * ps())
    mem[src:src + 1] = b"s"
    assert mem[dst] == 0


# -- vm_regions -----------------------------------------------------------------------------


def test_vm_regions(kernel: m.Kernel) -> None:
    me = m.task_self()
    before = m.vm_regions(me)
    a = alloc(4)
    rows = m.vm_regions(me, a, 4 * ps())
    assert rows == [m.VmRegion(a, 4 * ps(), RW, m.VM_PROT_ALL, COPY, False, 0, m.PORT_NULL)]
    m.vm_protect(me, a + ps(), ps(), False, R)
    m.vm_protect(me, a + 2 * ps(), ps(), True, R | X)
    m.vm_inherit(me, a + 3 * ps(), ps(), SHARE)
    rows = m.vm_regions(me, a, 4 * ps())
    assert [(r.address, r.size, r.protection, r.max_protection, r.inheritance)
            for r in rows] == [(a, ps(), RW, m.VM_PROT_ALL, COPY),
                               (a + ps(), ps(), R, m.VM_PROT_ALL, COPY),
                               (a + 2 * ps(), ps(), R, R | X, COPY),
                               (a + 3 * ps(), ps(), RW, m.VM_PROT_ALL, SHARE)]
    assert [r.offset for r in rows] == [0, ps(), 2 * ps(), 3 * ps()]  # one object
    assert all(r.object_name == m.PORT_NULL for r in rows)  # no data manager behind it
    # only the regions overlapping the range asked about
    assert [r.address for r in m.vm_regions(me, a + ps() + 5, 10)] == [a + ps()]
    assert [r.address for r in m.vm_regions(me, a + ps(), ps() + 1)] == [a + ps(), a + 2 * ps()]
    assert m.vm_regions(me, a, 0) == []
    whole = m.vm_regions(me)
    assert len(whole) == len(before) + 4
    assert whole == sorted(whole, key=lambda r: r.address)
    for r1, r2 in itertools.pairwise(whole):
        assert r1.address + r1.size <= r2.address
    m.vm_deallocate(me, a, 4 * ps())
    assert m.vm_regions(me) == before


def test_vm_regions_of_a_child_show_sharing(kernel: m.Kernel) -> None:
    me = m.task_self()
    a = alloc(2)
    m.vm_inherit(me, a, ps(), SHARE)
    child = m.task_create(me, True)
    rows = m.vm_regions(child, a, 2 * ps())
    assert [(r.address, r.size, r.inheritance, r.shared) for r in rows] == [
        (a, ps(), SHARE, True), (a + ps(), ps(), COPY, False)]
    assert [r.shared for r in m.vm_regions(me, a, ps())] == [True]
    m.task_terminate(child)


# -- vm_statistics -------------------------------------------------------------------------


@pytest.mark.embedded_only("counts the lazy copy-on-write faults of vm_copy; native vm_copy "
                           "copies eagerly")
def test_vm_statistics_counters(kernel: m.Kernel) -> None:
    me = m.task_self()
    mem = m.memory()
    s0 = m.vm_statistics(me)
    assert isinstance(s0, m.VmStatistics)
    assert s0.page_size == ps() == kernel.page_size
    nframes = kernel.memory_size // kernel.page_size
    assert s0.free_count + s0.active_count + s0.inactive_count + s0.wire_count == nframes
    assert s0.hits <= s0.lookups
    a = alloc(2)
    s1 = m.vm_statistics(me)
    assert s1.zero_fill_count == s0.zero_fill_count  # allocation alone touches nothing
    assert mem[a] == 0  # first touch: a fault that zero-fills one page
    s2 = m.vm_statistics(me)
    assert s2.zero_fill_count == s1.zero_fill_count + 1
    assert s2.faults >= s1.faults + 1
    assert s2.free_count == s1.free_count - 1
    mem[a + 1:a + 3] = b"hi"  # the same page again: no new zero fill
    assert mem[a + 2] == ord("i")
    s3 = m.vm_statistics(me)
    assert s3.zero_fill_count == s2.zero_fill_count
    mem[a + ps()] = 1  # the second page
    s4 = m.vm_statistics(me)
    assert s4.zero_fill_count == s3.zero_fill_count + 1
    # copy-on-write: a write to a copied page copies it once
    b = alloc(2)
    m.vm_copy(me, a, 2 * ps(), b)
    s5 = m.vm_statistics(me)
    assert s5.cow_faults == s4.cow_faults
    mem[b:b + 1] = b"c"
    s6 = m.vm_statistics(me)
    assert s6.cow_faults == s5.cow_faults + 1 and s6.faults > s5.faults
    mem[b + 1:b + 2] = b"d"  # that page is private now
    assert m.vm_statistics(me).cow_faults == s6.cow_faults
    # through inheritance, too
    child = m.task_create(me, True)
    s7 = m.vm_statistics(me)
    mem[a + ps():a + ps() + 1] = b"p"
    assert m.vm_statistics(me).cow_faults == s7.cow_faults + 1
    # the counters are the host's: the child's port gives the same page size and counts
    sc = m.vm_statistics(child)
    assert sc.page_size == ps() and sc.cow_faults == s7.cow_faults + 1
    m.task_terminate(child)
    for f in ("faults", "zero_fill_count", "cow_faults", "pageins", "pageouts", "lookups"):
        assert getattr(m.vm_statistics(me), f) >= getattr(s0, f)


# -- another task's memory through its task port ---------------------------------------------


@pytest.mark.embedded_only("the child task shares a Python dict with the test")
def test_operating_on_another_task(kernel: m.Kernel) -> None:
    box = {"go": False}

    def child_main(box: dict[str, Any]) -> bytes:
        wait_until(lambda: box["go"])
        addr = box["addr"]
        mine = m.memory()
        got = mine[addr:addr + 12]
        mine[addr + 100:addr + 105] = b"reply"
        return got  # type: ignore[no-any-return]

    h = kernel.spawn(child_main, box, name="target")
    child = h.port
    addr = m.vm_allocate(child, 0, 2 * ps(), True)
    assert m.vm_read(child, addr, 4) == bytes(4)
    m.vm_write(child, addr, b"from parent!" + bytes(ps() - 12))
    assert covered(child, addr, 2 * ps()) == [(addr, 2 * ps(), RW, m.VM_PROT_ALL, COPY)]
    box.update(addr=addr, go=True)
    assert h.result(5000) == b"from parent!"
    # the task is gone and its port with it


def test_vm_calls_on_a_child_task(kernel: m.Kernel) -> None:
    me = m.task_self()
    child = m.task_create(me, False)
    a = m.vm_allocate(child, 0, 3 * ps(), True)
    m.vm_allocate(child, a + 5 * ps(), ps(), False)
    m.vm_write(child, a, pattern(1, 0) + pattern(1, 1))
    m.vm_copy(child, a, ps(), a + 2 * ps())
    assert m.vm_read(child, a + 2 * ps(), ps()) == pattern(1, 0)
    m.vm_protect(child, a + ps(), ps(), False, R)
    raises("KERN_PROTECTION_FAILURE", m.vm_write, child, a + ps(), bytes(ps()))
    m.vm_inherit(child, a, ps(), SHARE)
    grandchild = m.task_create(child, True)
    m.vm_write(grandchild, a, b"gc" + bytes(ps() - 2))
    assert m.vm_read(child, a, 2) == b"gc"
    m.vm_deallocate(child, a + 2 * ps(), ps())
    assert covered(child, 0, VM_MAX) == [(a, ps(), RW, m.VM_PROT_ALL, SHARE),
                                         (a + ps(), ps(), R, m.VM_PROT_ALL, COPY),
                                         (a + 5 * ps(), ps(), RW, m.VM_PROT_ALL, COPY)]
    assert m.vm_regions(grandchild, a, ps())[0].shared
    m.task_terminate(grandchild)
    m.task_terminate(child)


# -- bad arguments -------------------------------------------------------------------------


@pytest.fixture
def ctx() -> dict[str, int]:
    """Regions to aim bad calls at: `a` (4 pages, rw, with data), `ro` (read-only),
    `none` (no access), `maxr` (maximum read), and `hole` (2 free pages after `a`)."""
    me = m.task_self()
    c = {"me": me, "ps": ps()}
    for name in ("ro", "none", "maxr"):
        c[name] = alloc(1)
    m.vm_protect(me, c["ro"], ps(), False, R)
    m.vm_protect(me, c["none"], ps(), False, m.VM_PROT_NONE)
    m.vm_protect(me, c["maxr"], ps(), True, R)
    c["a"] = alloc(4)
    fill(c["a"], 4, 42)
    c["hole"] = m.vm_allocate(me, c["a"] + 4 * ps(), 2 * ps(), False)
    m.vm_deallocate(me, c["hole"], 2 * ps())
    return c


C = dict[str, int]
BAD_TYPES = ["4096", 4096.0, None, True, b"x", [4096]]

BAD_CALLS: list[tuple[str, Callable[[C], Any], str]] = [
    # vm_allocate
    *[(f"allocate-size-{v!r}", lambda c, v=v: m.vm_allocate(c["me"], 0, v, True),
       "KERN_INVALID_ARGUMENT") for v in BAD_TYPES],
    *[(f"allocate-address-{v!r}", lambda c, v=v: m.vm_allocate(c["me"], v, c["ps"], False),
       "KERN_INVALID_ARGUMENT") for v in BAD_TYPES],
    *[(f"allocate-anywhere-{v!r}", lambda c, v=v: m.vm_allocate(c["me"], 0, c["ps"], v),
       "KERN_INVALID_ARGUMENT") for v in ("yes", None, 1.0, b"")],
    *[(f"allocate-task-{v!r}", lambda c, v=v: m.vm_allocate(v, 0, c["ps"], True),
       "KERN_INVALID_ARGUMENT") for v in BAD_TYPES],
    ("allocate-size-negative", lambda c: m.vm_allocate(c["me"], 0, -c["ps"], True),
     "KERN_INVALID_ARGUMENT"),
    ("allocate-address-negative", lambda c: m.vm_allocate(c["me"], -c["ps"], c["ps"], False),
     "KERN_INVALID_ARGUMENT"),
    # a fixed address takes the page it is in (GNU Mach): the last page of `a` here
    ("allocate-unaligned-in-use", lambda c: m.vm_allocate(c["me"], c["hole"] - 1, c["ps"],
                                                          False), "KERN_NO_SPACE"),
    ("allocate-occupied", lambda c: m.vm_allocate(c["me"], c["a"], c["ps"], False),
     "KERN_NO_SPACE"),
    ("allocate-overlapping", lambda c: m.vm_allocate(c["me"], c["a"] + 3 * c["ps"],
                                                     2 * c["ps"], False), "KERN_NO_SPACE"),
    ("allocate-covering", lambda c: m.vm_allocate(c["me"], c["ro"],
                                                  c["hole"] + 2 * c["ps"] - c["ro"], False),
     "KERN_NO_SPACE"),
    ("allocate-below-min", lambda c: m.vm_allocate(c["me"], 0, c["ps"], False),
     "KERN_INVALID_ADDRESS"),
    ("allocate-at-end", lambda c: m.vm_allocate(c["me"], VM_MAX, c["ps"], False),
     "KERN_INVALID_ADDRESS"),
    ("allocate-across-end", lambda c: m.vm_allocate(c["me"], VM_MAX - 1024 * c["ps"],
                                                    2048 * c["ps"], False),
     "KERN_INVALID_ADDRESS"),
    ("allocate-whole-space", lambda c: m.vm_allocate(c["me"], 0, VM_MAX, True),
     "KERN_NO_SPACE"),
    ("allocate-huge", lambda c: m.vm_allocate(c["me"], 0, 1 << 62, True), "KERN_NO_SPACE"),
    ("allocate-2**63", lambda c: m.vm_allocate(c["me"], 0, 1 << 63, True),
     "KERN_INVALID_ARGUMENT"),
    ("allocate-2**64", lambda c: m.vm_allocate(c["me"], 0, 1 << 64, True),
     "KERN_INVALID_ARGUMENT"),
    # vm_deallocate
    *[(f"deallocate-address-{v!r}", lambda c, v=v: m.vm_deallocate(c["me"], v, c["ps"]),
       "KERN_INVALID_ARGUMENT") for v in BAD_TYPES],
    *[(f"deallocate-size-{v!r}", lambda c, v=v: m.vm_deallocate(c["me"], c["a"], v),
       "KERN_INVALID_ARGUMENT") for v in BAD_TYPES],
    ("deallocate-task-str", lambda c: m.vm_deallocate("me", c["a"], c["ps"]),
     "KERN_INVALID_ARGUMENT"),
    ("deallocate-negative-address", lambda c: m.vm_deallocate(c["me"], -c["ps"], c["ps"]),
     "KERN_INVALID_ARGUMENT"),
    ("deallocate-negative-size", lambda c: m.vm_deallocate(c["me"], c["a"], -1),
     "KERN_INVALID_ARGUMENT"),
    ("deallocate-beyond", lambda c: m.vm_deallocate(c["me"], VM_MAX, c["ps"]),
     "KERN_INVALID_ADDRESS"),
    ("deallocate-across-end", lambda c: m.vm_deallocate(c["me"], c["a"], VM_MAX),
     "KERN_INVALID_ADDRESS"),
    ("deallocate-overflow", lambda c: m.vm_deallocate(c["me"], c["a"], (1 << 63) - 1),
     "KERN_INVALID_ADDRESS"),
    # vm_inherit
    *[(f"inherit-{v!r}", lambda c, v=v: m.vm_inherit(c["me"], c["a"], c["ps"], v),
       "KERN_INVALID_ARGUMENT") for v in (3, -1, 99, 1 << 40, "share", None, 1.0, True)],
    *[(f"inherit-address-{v!r}", lambda c, v=v: m.vm_inherit(c["me"], v, c["ps"], SHARE),
       "KERN_INVALID_ARGUMENT") for v in BAD_TYPES],
    ("inherit-negative-size", lambda c: m.vm_inherit(c["me"], c["a"], -1, SHARE),
     "KERN_INVALID_ARGUMENT"),
    ("inherit-hole", lambda c: m.vm_inherit(c["me"], c["hole"], c["ps"], SHARE),
     "KERN_INVALID_ADDRESS"),
    ("inherit-partly-allocated", lambda c: m.vm_inherit(c["me"], c["a"] + 3 * c["ps"],
                                                        2 * c["ps"], SHARE),
     "KERN_INVALID_ADDRESS"),
    ("inherit-beyond", lambda c: m.vm_inherit(c["me"], VM_MAX, c["ps"], SHARE),
     "KERN_INVALID_ADDRESS"),
    ("inherit-below-min", lambda c: m.vm_inherit(c["me"], 0, c["ps"], SHARE),
     "KERN_INVALID_ADDRESS"),
    # vm_protect
    *[(f"protect-{v!r}", lambda c, v=v: m.vm_protect(c["me"], c["a"], c["ps"], False, v),
       "KERN_INVALID_ARGUMENT") for v in (8, 0x10, 0xFF, -1, 1 << 40, "rw", None, 3.0, True)],
    *[(f"protect-set-max-{v!r}", lambda c, v=v: m.vm_protect(c["me"], c["a"], c["ps"], v, R),
       "KERN_INVALID_ARGUMENT") for v in ("yes", None, 0.0)],
    *[(f"protect-size-{v!r}", lambda c, v=v: m.vm_protect(c["me"], c["a"], v, False, R),
       "KERN_INVALID_ARGUMENT") for v in BAD_TYPES],
    ("protect-negative-address", lambda c: m.vm_protect(c["me"], -1, c["ps"], False, R),
     "KERN_INVALID_ARGUMENT"),
    ("protect-hole", lambda c: m.vm_protect(c["me"], c["hole"], c["ps"], False, R),
     "KERN_INVALID_ADDRESS"),
    ("protect-partly-allocated", lambda c: m.vm_protect(c["me"], c["a"] + 3 * c["ps"],
                                                        2 * c["ps"], False, R),
     "KERN_INVALID_ADDRESS"),
    ("protect-beyond", lambda c: m.vm_protect(c["me"], c["a"], VM_MAX, False, R),
     "KERN_INVALID_ADDRESS"),
    ("protect-above-maximum", lambda c: m.vm_protect(c["me"], c["maxr"], c["ps"], False, RW),
     "KERN_PROTECTION_FAILURE"),
    ("protect-range-above-maximum", lambda c: m.vm_protect(c["me"], c["ro"],
                                                           c["maxr"] + c["ps"] - c["ro"],
                                                           False, RW),
     "KERN_PROTECTION_FAILURE"),
    # vm_read
    *[(f"read-address-{v!r}", lambda c, v=v: m.vm_read(c["me"], v, 4),
       "KERN_INVALID_ARGUMENT") for v in BAD_TYPES],
    *[(f"read-size-{v!r}", lambda c, v=v: m.vm_read(c["me"], c["a"], v),
       "KERN_INVALID_ARGUMENT") for v in BAD_TYPES],
    ("read-negative-address", lambda c: m.vm_read(c["me"], -c["ps"], 4),
     "KERN_INVALID_ARGUMENT"),
    ("read-negative-size", lambda c: m.vm_read(c["me"], c["a"], -4), "KERN_INVALID_ARGUMENT"),
    ("read-hole", lambda c: m.vm_read(c["me"], c["hole"], 4), "KERN_INVALID_ADDRESS"),
    ("read-partly-allocated", lambda c: m.vm_read(c["me"], c["a"] + 4 * c["ps"] - 2, 4),
     "KERN_INVALID_ADDRESS"),
    ("read-below-min", lambda c: m.vm_read(c["me"], 0, 4), "KERN_INVALID_ADDRESS"),
    ("read-beyond", lambda c: m.vm_read(c["me"], VM_MAX - 2, 4), "KERN_INVALID_ADDRESS"),
    ("read-huge", lambda c: m.vm_read(c["me"], c["a"], 1 << 62), "KERN_INVALID_ADDRESS"),
    ("read-2**63", lambda c: m.vm_read(c["me"], c["a"], 1 << 63), "KERN_INVALID_ARGUMENT"),
    ("read-no-access", lambda c: m.vm_read(c["me"], c["none"], 4), "KERN_PROTECTION_FAILURE"),
    ("read-range-with-no-access", lambda c: m.vm_read(c["me"], c["ro"],
                                                      c["none"] + c["ps"] - c["ro"]),
     "KERN_PROTECTION_FAILURE"),
    # vm_write
    *[(f"write-address-{v!r}", lambda c, v=v: m.vm_write(c["me"], v, b"x"),
       "KERN_INVALID_ARGUMENT") for v in BAD_TYPES],
    *[(f"write-data-{v!r}", lambda c, v=v: m.vm_write(c["me"], c["a"], v),
       "KERN_INVALID_ARGUMENT") for v in ("text", 5, None, [1, 2], 1.5, True)],
    ("write-negative", lambda c: m.vm_write(c["me"], -c["ps"], b"x"), "KERN_INVALID_ARGUMENT"),
    ("write-unaligned", lambda c: m.vm_write(c["me"], c["a"] + 1, b"x"),
     "KERN_INVALID_ARGUMENT"),
    ("write-half-page", lambda c: m.vm_write(c["me"], c["a"] + HW_PAGE // 2, b"x"),
     "KERN_INVALID_ARGUMENT"),
    ("write-hole", lambda c: m.vm_write(c["me"], c["hole"], b"x"), "KERN_INVALID_ADDRESS"),
    ("write-partly-allocated", lambda c: m.vm_write(c["me"], c["a"] + 3 * c["ps"],
                                                    bytes(2 * c["ps"])),
     "KERN_INVALID_ADDRESS"),
    ("write-short-into-hole", lambda c: m.vm_write(c["me"], c["a"] + 3 * c["ps"],
                                                   bytes(c["ps"] + 1)),
     "KERN_INVALID_ADDRESS"),
    ("write-beyond", lambda c: m.vm_write(c["me"], VM_MAX - c["ps"], bytes(2 * c["ps"])),
     "KERN_INVALID_ADDRESS"),
    ("write-read-only", lambda c: m.vm_write(c["me"], c["ro"], b"x"),
     "KERN_PROTECTION_FAILURE"),
    ("write-range-with-read-only", lambda c: m.vm_write(c["me"], c["ro"],
                                                        bytes(c["maxr"] + c["ps"] - c["ro"])),
     "KERN_PROTECTION_FAILURE"),
    ("write-ool-from-hole", lambda c: m.vm_write(c["me"], c["a"], OOL(c["hole"], c["ps"])),
     "SEND_INVALID_MEMORY"),
    ("write-ool-from-unreadable", lambda c: m.vm_write(c["me"], c["a"],
                                                       OOL(c["none"], c["ps"])),
     "SEND_INVALID_MEMORY"),
    # vm_copy
    *[(f"copy-{arg}-{v!r}", lambda c, v=v, arg=arg: m.vm_copy(
        c["me"], *[v if n == arg else c["a"] if n == "src" else c["ps"] if n == "count"
                   else c["a"] + 2 * c["ps"] for n in ("src", "count", "dst")]),
       "KERN_INVALID_ARGUMENT") for arg in ("src", "count", "dst") for v in BAD_TYPES],
    ("copy-unaligned-src", lambda c: m.vm_copy(c["me"], c["a"] + 1, c["ps"], c["a"] + c["ps"]),
     "KERN_INVALID_ARGUMENT"),
    ("copy-unaligned-count", lambda c: m.vm_copy(c["me"], c["a"], c["ps"] - 1, c["a"] + c["ps"]),
     "KERN_INVALID_ARGUMENT"),
    ("copy-unaligned-dst", lambda c: m.vm_copy(c["me"], c["a"], c["ps"], c["a"] + 7),
     "KERN_INVALID_ARGUMENT"),
    ("copy-half-page-count", lambda c: m.vm_copy(c["me"], c["a"], HW_PAGE // 2, c["a"]),
     "KERN_INVALID_ARGUMENT"),
    ("copy-negative-src", lambda c: m.vm_copy(c["me"], -c["ps"], c["ps"], c["a"]),
     "KERN_INVALID_ARGUMENT"),
    ("copy-negative-count", lambda c: m.vm_copy(c["me"], c["a"], -c["ps"], c["a"]),
     "KERN_INVALID_ARGUMENT"),
    ("copy-src-hole", lambda c: m.vm_copy(c["me"], c["hole"], c["ps"], c["a"]),
     "KERN_INVALID_ADDRESS"),
    ("copy-dst-hole", lambda c: m.vm_copy(c["me"], c["a"], c["ps"], c["hole"]),
     "KERN_INVALID_ADDRESS"),
    ("copy-dst-partly-allocated", lambda c: m.vm_copy(c["me"], c["a"], 2 * c["ps"],
                                                      c["a"] + 3 * c["ps"]),
     "KERN_INVALID_ADDRESS"),
    ("copy-src-partly-allocated", lambda c: m.vm_copy(c["me"], c["a"] + 3 * c["ps"],
                                                      2 * c["ps"], c["a"]),
     "KERN_INVALID_ADDRESS"),
    ("copy-count-beyond", lambda c: m.vm_copy(c["me"], c["a"], VM_MAX, c["a"]),
     "KERN_INVALID_ADDRESS"),
    ("copy-dst-read-only", lambda c: m.vm_copy(c["me"], c["a"], c["ps"], c["ro"]),
     "KERN_PROTECTION_FAILURE"),
    ("copy-src-no-access", lambda c: m.vm_copy(c["me"], c["none"], c["ps"], c["a"]),
     "KERN_PROTECTION_FAILURE"),
    # vm_regions
    *[(f"regions-{arg}-{v!r}", lambda c, v=v, arg=arg: m.vm_regions(
        c["me"], *[v if n == arg else c["a"] if n == "address" else c["ps"]
                   for n in ("address", "size")]), "KERN_INVALID_ARGUMENT")
      for arg in ("address", "size") for v in BAD_TYPES],
    ("regions-negative-address", lambda c: m.vm_regions(c["me"], -1, 10),
     "KERN_INVALID_ARGUMENT"),
    ("regions-negative-size", lambda c: m.vm_regions(c["me"], c["a"], -10),
     "KERN_INVALID_ARGUMENT"),
    ("regions-beyond", lambda c: m.vm_regions(c["me"], VM_MAX, 10), "KERN_INVALID_ADDRESS"),
    ("regions-across-end", lambda c: m.vm_regions(c["me"], c["a"], VM_MAX),
     "KERN_INVALID_ADDRESS"),
    # vm_statistics
    *[(f"statistics-task-{v!r}", lambda c, v=v: m.vm_statistics(v), "KERN_INVALID_ARGUMENT")
      for v in BAD_TYPES],
]


def snapshot(c: C) -> tuple[list[tuple[int, int, int, int, int]], bytes, bytes]:
    """The caller's regions (as attributes over address ranges) and data."""
    return (covered(c["me"], 0, VM_MAX), m.memory().read(c["a"], 4 * c["ps"]),
            m.memory().read(c["ro"], c["ps"]))


@pytest.mark.parametrize("call, code", [(f, code) for _, f, code in BAD_CALLS],
                         ids=[name for name, _, _ in BAD_CALLS])
def test_bad_arguments_change_nothing(kernel: m.Kernel, ctx: C, call: Callable[[C], Any],
                                      code: str) -> None:
    before = snapshot(ctx)
    objects = kernel.vm_stat()["objects"]
    err = raises(code, call, ctx)
    assert err.detail  # a clear error says what was wrong
    assert snapshot(ctx) == before
    assert kernel.vm_stat()["objects"] == objects
    assert m.thread_info(m.thread_self())[1] == "running"
    assert_all_ok()


# -- ports that are not (live) task ports -------------------------------------------------------


VM_CALLS: list[tuple[str, Callable[[int, C], Any]]] = [
    ("vm_allocate", lambda t, c: m.vm_allocate(t, 0, c["ps"], True)),
    ("vm_allocate_fixed", lambda t, c: m.vm_allocate(t, c["hole"], c["ps"], False)),
    ("vm_deallocate", lambda t, c: m.vm_deallocate(t, c["a"], c["ps"])),
    ("vm_inherit", lambda t, c: m.vm_inherit(t, c["a"], c["ps"], SHARE)),
    ("vm_protect", lambda t, c: m.vm_protect(t, c["a"], c["ps"], False, R)),
    ("vm_read", lambda t, c: m.vm_read(t, c["a"], 4)),
    ("vm_write", lambda t, c: m.vm_write(t, c["a"], b"x" * c["ps"])),
    ("vm_write_ool", lambda t, c: m.vm_write(t, c["a"], OOL(c["a"] + c["ps"], c["ps"]))),
    ("vm_copy", lambda t, c: m.vm_copy(t, c["a"], c["ps"], c["a"] + c["ps"])),
    ("vm_regions", lambda t, c: m.vm_regions(t)),
    ("vm_statistics", lambda t, c: m.vm_statistics(t)),
]


@pytest.mark.parametrize("call", [f for _, f in VM_CALLS], ids=[n for n, _ in VM_CALLS])
def test_vm_call_on_a_dead_task_port(kernel: m.Kernel, ctx: C,
                                     call: Callable[[int, C], Any]) -> None:
    me = m.task_self()
    child = m.task_create(me, True)
    m.task_terminate(child)
    before = snapshot(ctx)
    raises("SEND_INVALID_PORT", call, child, ctx)
    # a task whose last thread returned is just as dead
    h = kernel.spawn(lambda: None, name="brief")
    h.result(5000)
    wait_until(lambda: all(r.name != "brief" for r in kernel.ps()))
    raises("SEND_INVALID_PORT", call, h.port, ctx)
    assert (m.NOTIFY_PORT_DELETED, child) in notifications()
    assert snapshot(ctx) == before
    assert_all_ok()


@pytest.mark.parametrize("call", [f for _, f in VM_CALLS], ids=[n for n, _ in VM_CALLS])
def test_vm_call_on_a_kernel_port_that_is_not_a_task(kernel: m.Kernel, ctx: C,
                                                     call: Callable[[int, C], Any]) -> None:
    before = snapshot(ctx)
    for port in (m.thread_self(), m.host_self()):
        err = raises("KERN_INVALID_ARGUMENT", call, port, ctx)
        assert "port" in err.detail
    assert snapshot(ctx) == before
    assert m.thread_info(m.thread_self())[2] == 0
    assert_all_ok()


@pytest.mark.parametrize("call", [f for _, f in VM_CALLS], ids=[n for n, _ in VM_CALLS])
def test_vm_call_on_a_plain_port_goes_to_its_receiver(kernel: m.Kernel, ctx: C,
                                                      call: Callable[[int, C], Any]) -> None:
    """A plain port is a server's port, not a task: the request is an ordinary message to
    whoever holds its receive rights. Nothing happens to anyone's memory; the caller gets
    whatever the receiver replies (here an error)."""
    from pymach.include.mach_defs import vm_defs
    from pymach.include.mig import error_reply

    me = m.task_self()
    p = m.port_allocate(me)
    before = snapshot(ctx)
    _, box = start_thread(call, p, ctx)
    req = recv(p)
    assert req.id in vm_defs.routines and req.remote_port
    for ool in [i for i in req.items if isinstance(i, OOL)]:  # data arrived as memory
        assert ool.size == ps()
        assert m.memory().read(ool.address, 4) in (b"xxxx", pattern(42, 1, 4))
        m.vm_deallocate(me, ool.address, ool.size)
    m.msg_send(Message(remote_port=req.remote_port, id=req.id + 100,
                       items=error_reply("KERN_INVALID_TASK", "not a task")))
    wait_until(lambda: box.get("done"))
    assert box.get("error") == "KERN_INVALID_TASK"
    assert snapshot(ctx) == before
    m.port_deallocate(me, p)
    assert_all_ok()


# -- the task's own view of memory: bad accesses ----------------------------------------------


@pytest.mark.embedded_only("reaches into the kernel's task objects")
def test_memory_faults_and_bad_arguments(kernel: m.Kernel, ctx: C) -> None:
    mem = m.memory()
    a = ctx["a"]
    raises("KERN_INVALID_ADDRESS", mem.read, ctx["hole"], 1)
    raises("KERN_INVALID_ADDRESS", mem.write, ctx["hole"], b"x")
    raises("KERN_INVALID_ADDRESS", mem.read, a + 4 * ps() - 1, 2)  # runs off the end
    raises("KERN_INVALID_ADDRESS", mem.read, 0, 1)
    raises("KERN_INVALID_ADDRESS", mem.read, VM_MAX - 1, 1)
    raises("KERN_PROTECTION_FAILURE", mem.write, ctx["ro"], b"x")
    raises("KERN_PROTECTION_FAILURE", mem.read, ctx["none"], 1)
    for bad in (lambda: mem["x"], lambda: mem[1.5], lambda: mem[-1], lambda: mem[None],
                lambda: mem.read(a, -1), lambda: mem.read(-a, 1), lambda: mem.read(a, "1"),
                lambda: mem.write(a, "text"), lambda: mem.write(a, 5),
                lambda: mem.write(a, None), lambda: mem[a:a + 4:2],
                lambda: mem[a:], lambda: mem[:a], lambda: mem[a + 4:a],
                lambda: mem.__setitem__(a, 256), lambda: mem.__setitem__(a, -1),
                lambda: mem.__setitem__(a, b"x"), lambda: mem.__setitem__(a, True),
                lambda: mem.__setitem__(slice(a, a + 4), b"toolong"),
                lambda: mem.region(a, -1), lambda: mem.region("a", 1)):
        raises("KERN_INVALID_ARGUMENT", bad)
    region = mem.region(a + ps(), 8)
    assert len(region) == 8 and region.read() == pattern(42, 1, 8)
    assert region[0] == pattern(42, 1)[0] and region[2:4] == pattern(42, 1)[2:4]
    region[0:2] = b"rg"
    region.write(b"!", 7)
    assert mem[a + ps():a + ps() + 8] == b"rg" + pattern(42, 1)[2:7] + b"!"
    raises("KERN_INVALID_ADDRESS", lambda: region[8])
    raises("KERN_INVALID_ADDRESS", region.write, b"xy", 7)
    # another task's address space is reached through its port, not its AddressSpace
    from pymach.mach_vm import AddressSpace

    task = next(t for t in kernel.tasks.values() if t.name == "default_pager")
    raises("KERN_INVALID_TASK", AddressSpace(task).read, VM_MIN, 1)
    assert_all_ok()


# -- page sizes (a boot parameter: any multiple of the hardware page) --------------------------


@pytest.mark.parametrize("page_size", [8192, 12288, 16384])
@pytest.mark.parametrize("det", [False, True], ids=["free", "det"])
def test_page_size_is_a_boot_parameter(page_size: int, det: bool) -> None:
    with m.boot(page_size=page_size, memory_size=128 * page_size, deterministic=det,
                seed=3) as k:
        me = m.task_self()
        mem = m.memory()
        assert m.vm_page_size() == page_size == m.host_info(m.host_self())[0]
        assert m.vm_statistics(me).page_size == page_size
        a = m.vm_allocate(me, 0, 1, True)
        assert a % page_size == 0
        assert m.vm_regions(me) == [m.VmRegion(a, page_size, RW, m.VM_PROT_ALL, COPY, False, 0,
                                               m.PORT_NULL)]
        assert mem[a:a + page_size] == bytes(page_size)
        b = m.vm_allocate(me, 0, page_size + HW_PAGE, True)
        assert b % page_size == 0 and m.vm_regions(me, b, 1)[0].size == 2 * page_size
        # alignment is on the system page, not the hardware page: a fixed address takes
        # the system page it is in (as GNU Mach's trunc_page)
        assert m.vm_allocate(me, b + 2 * page_size + HW_PAGE, HW_PAGE, False) == \
            b + 2 * page_size
        m.vm_deallocate(me, b + 2 * page_size, page_size)
        raises("KERN_INVALID_ARGUMENT", m.vm_write, me, b + HW_PAGE, b"x")
        raises("KERN_INVALID_ARGUMENT", m.vm_copy, me, b, HW_PAGE, a)
        raises("KERN_INVALID_ARGUMENT", m.vm_copy, me, b + HW_PAGE, page_size, a)
        fixed = b + 4 * page_size
        assert m.vm_allocate(me, fixed, HW_PAGE, False) == fixed
        assert m.vm_regions(me, fixed, 1)[0].size == page_size
        # protection and deallocation round out to whole system pages
        mem[b + page_size - 2:b + page_size + 2] = b"span"  # across the page boundary
        assert m.vm_read(me, b + page_size - 2, 4) == b"span"
        m.vm_protect(me, b, HW_PAGE, False, R)
        raises("KERN_PROTECTION_FAILURE", mem.write, b + page_size - 1, b"x")
        mem[b + page_size:b + page_size + 1] = b"w"
        m.vm_deallocate(me, fixed + HW_PAGE, 1)
        assert m.vm_regions(me, fixed, page_size) == []
        # whole-page vm_write and vm_copy
        m.vm_write(me, a, pattern(1, 0, page_size))
        m.vm_copy(me, a, page_size, b + page_size)
        assert mem[b + page_size:b + 2 * page_size] == pattern(1, 0, page_size)
        # inheritance and OOL work in system pages too
        m.vm_inherit(me, a, 1, SHARE)
        child = m.task_create(me, True)
        m.vm_write(child, a, b"child" + bytes(page_size - 5))
        assert mem[a:a + 5] == b"child"
        p = m.port_allocate(me)
        m.msg_send(Message(remote_port=p, items=[OOL(a + 3, page_size)]))
        got = recv(p).items[0]
        assert isinstance(got, OOL) and got.size == page_size
        assert mem[got.address:got.address + 4] == b"ld\0\0"
        assert (got.address - 3) % page_size == 0
        # paging in system pages: more data than memory
        n = 160
        big = m.vm_allocate(me, 0, n * page_size, True)
        for i in range(n):
            mem[big + i * page_size:big + i * page_size + 8] = i.to_bytes(8, "little")
        for i in range(n):
            assert mem[big + i * page_size:big + i * page_size + 8] == i.to_bytes(8, "little")
        assert k.vm_stat()["pageouts"] > 0
        m.task_terminate(child)
        assert_all_ok()


def test_boot_rejects_page_sizes_that_are_not_hardware_multiples() -> None:
    for bad in (1000, 4096 + 512, 0, -4096):
        with pytest.raises(m.MachError) as e, m.boot(page_size=bad):
            pass
        assert e.value.code == "KERN_INVALID_ARGUMENT"


# -- out-of-line memory in messages --------------------------------------------------------


@pytest.fixture
def port() -> Iterator[int]:
    p = m.port_allocate(m.task_self())
    yield p
    with contextlib.suppress(m.MachError):
        m.port_deallocate(m.task_self(), p)


def send_ool(p: int, *items: Any) -> None:
    m.msg_send(Message(remote_port=p, items=list(items)), m.SEND_TIMEOUT, 1000)


def recv_ool(p: int) -> list[OOL]:
    items = recv(p).items
    assert all(isinstance(i, OOL) for i in items)
    return items  # type: ignore[return-value]


def test_ool_is_a_copy(kernel: m.Kernel, port: int) -> None:
    mem = m.memory()
    a = alloc(3)
    fill(a, 3, 1)
    send_ool(port, OOL(a, 3 * ps()))
    mem[a:a + 6] = b"sender"  # after the send, before the receive
    (got,) = recv_ool(port)
    assert got.size == 3 * ps() and got.address != a
    assert mem[got.address:got.address + 3 * ps()] == b"".join(pattern(1, i) for i in range(3))
    mem[a + ps():a + ps() + 6] = b"sender"  # after the receive
    assert mem[got.address + ps():got.address + ps() + 6] == pattern(1, 1, 6)
    mem[got.address + 2 * ps():got.address + 2 * ps() + 8] = b"receiver"
    assert mem[a + 2 * ps():a + 2 * ps() + 8] == pattern(1, 2, 8)
    assert mem[a:a + 6] == b"sender"
    assert covered(m.task_self(), got.address, 3 * ps())[0][:3] == (got.address, 3 * ps(), RW)


def test_ool_between_tasks(kernel: m.Kernel, port: int) -> None:
    """A child sends its memory to us; each side's later writes stay on its side."""
    me = m.task_self()
    mem = m.memory()
    m.task_set_special_port(me, m.TASK_BOOTSTRAP_PORT, port)

    def child() -> bytes:
        boot = m.task_get_special_port(m.task_self(), m.TASK_BOOTSTRAP_PORT)
        mine = m.memory()
        a = m.vm_allocate(m.task_self(), 0, 2 * ps(), True)
        mine[a:a + 5] = b"child"
        back = m.port_allocate(m.task_self())
        m.msg_send(Message(remote_port=boot, local_port=back,
                           items=[OOL(a, 2 * ps()), OOL(data=b"by value")]))
        mine[a:a + 5] = b"later"
        recv(back)  # the parent has written into its copy
        return mine[a:a + 5]  # type: ignore[no-any-return]

    h = kernel.spawn(child, name="ool-child")
    msg = recv(port)
    got, val = msg.items
    assert isinstance(got, OOL) and isinstance(val, OOL)
    assert got.size == 2 * ps() and val.size == 8
    assert mem[val.address:val.address + val.size] == b"by value"
    sleep_ms(5)  # the child may write "later" now, or may have already: we have a copy
    assert mem[got.address:got.address + 5] == b"child"
    mem[got.address + 100:got.address + 106] = b"parent"
    m.msg_send(Message(remote_port=msg.remote_port, id=1))
    assert h.result(5000) == b"later"  # the child never saw our write
    assert mem[got.address:got.address + 5] == b"child"  # and we never saw its write
    assert mem[got.address + 100:got.address + 106] == b"parent"


def test_ool_sent_before_the_sender_writes(kernel: m.Kernel, port: int) -> None:
    """The copy is taken at send time: a child's later writes never reach the receiver."""
    me = m.task_self()
    mem = m.memory()
    m.task_set_special_port(me, m.TASK_BOOTSTRAP_PORT, port)

    def child() -> None:
        boot = m.task_get_special_port(m.task_self(), m.TASK_BOOTSTRAP_PORT)
        mine = m.memory()
        a = m.vm_allocate(m.task_self(), 0, ps(), True)
        mine[a:a + 5] = b"first"
        m.msg_send(Message(remote_port=boot, items=[OOL(a, ps())]))
        mine[a:a + 5] = b"later"
        m.msg_send(Message(remote_port=boot, items=[OOL(a, ps())]))

    h = kernel.spawn(child, name="ool-writer")
    h.result(5000)
    first, second = recv_ool(port)[0], recv_ool(port)[0]
    assert mem[first.address:first.address + 5] == b"first"
    assert mem[second.address:second.address + 5] == b"later"


def test_ool_deallocate_moves_the_memory(kernel: m.Kernel, port: int) -> None:
    me = m.task_self()
    mem = m.memory()
    a = alloc(3)
    fill(a, 3, 2)
    send_ool(port, OOL(a, 2 * ps(), deallocate=True))
    raises("KERN_INVALID_ADDRESS", mem.read, a, 1)  # the sender lost the range at once
    raises("KERN_INVALID_ADDRESS", mem.read, a + 2 * ps() - 1, 1)
    assert mem[a + 2 * ps():a + 3 * ps()] == pattern(2, 2)  # but not the rest
    assert [r.address for r in m.vm_regions(me, a, 3 * ps())] == [a + 2 * ps()]
    (got,) = recv_ool(port)
    assert got.size == 2 * ps()
    check_fill(got.address, 2, 2)
    # the moved memory is ordinary memory of the receiver
    mem[got.address:got.address + 4] = b"mine"
    m.vm_deallocate(me, got.address, 2 * ps())
    # an unaligned range takes its whole pages with it
    b = alloc(2)
    fill(b, 2, 3)
    send_ool(port, OOL(b + 10, ps(), deallocate=True))
    raises("KERN_INVALID_ADDRESS", mem.read, b, 1)
    raises("KERN_INVALID_ADDRESS", mem.read, b + 2 * ps() - 1, 1)
    (got,) = recv_ool(port)
    assert got.size == ps()
    assert mem[got.address:got.address + ps()] == (pattern(3, 0) + pattern(3, 1))[10:10 + ps()]


def test_ool_deallocate_of_copy_on_write_memory(kernel: m.Kernel, port: int) -> None:
    """Moving memory that is also someone else's copy leaves their copy alone."""
    me = m.task_self()
    mem = m.memory()
    a = alloc(2)
    fill(a, 2, 4)
    child = m.task_create(me, True)  # the child has a copy
    b = alloc(2)
    m.vm_copy(me, a, 2 * ps(), b)  # and so has b
    send_ool(port, OOL(a, 2 * ps(), deallocate=True))
    (got,) = recv_ool(port)
    mem[got.address:got.address + 4] = b"recv"
    check_fill(a, 2, 4, child)
    check_fill(b, 2, 4)
    m.vm_write(child, a, pattern(5, 0))
    assert mem[got.address + 4:got.address + ps()] == pattern(4, 0)[4:]
    m.task_terminate(child)


def test_ool_unaligned_addresses_and_sizes(kernel: m.Kernel, port: int) -> None:
    mem = m.memory()
    a = alloc(4)
    fill(a, 4, 6)
    whole = b"".join(pattern(6, i) for i in range(4))
    cases = [(5, 10), (ps() - 1, 2), (ps() + 7, 2 * ps()), (1, 4 * ps() - 2), (0, 1),
             (3 * ps(), ps())]
    send_ool(port, *[OOL(a + off, n) for off, n in cases])
    got = recv_ool(port)
    for (off, n), g in zip(cases, got, strict=True):
        assert g.size == n
        assert mem[g.address:g.address + n] == whole[off:off + n]
        assert (g.address - off) % ps() == 0  # the data keeps its place in the page
    # a received region can be sent on again, and deallocated by its received size
    send_ool(port, OOL(got[0].address, got[0].size, deallocate=True))
    raises("KERN_INVALID_ADDRESS", mem.read, got[0].address, 1)
    (again,) = recv_ool(port)
    assert mem[again.address:again.address + 10] == whole[5:15]


def test_ool_size_zero_and_by_value(kernel: m.Kernel, port: int) -> None:
    mem = m.memory()
    a = alloc(1)
    objects = kernel.vm_stat()["objects"]
    send_ool(port, OOL(a, 0), OOL(0x7000_0000, 0), OOL(data=b""))  # nothing, even unmapped
    assert recv_ool(port) == [OOL(0, 0), OOL(0, 0), OOL(0, 0)]
    payload = bytes(range(256)) * 40  # more than two pages
    send_ool(port, OOL(data=payload), OOL(data=b"tiny"), OOL(data=bytearray(b"ba")))
    big, tiny, ba = recv_ool(port)
    assert mem[big.address:big.address + big.size] == payload and big.size == len(payload)
    assert mem[tiny.address:tiny.address + 4] == b"tiny" and tiny.size == 4
    assert mem[ba.address:ba.address + 2] == b"ba"
    mem[big.address:big.address + 3] = b"own"  # it is ordinary memory of the receiver
    assert mem[big.address + 3:big.address + 6] == payload[3:6]
    for g in (big, tiny, ba):
        m.vm_deallocate(m.task_self(), g.address, g.size)
    assert kernel.vm_stat()["objects"] == objects


def test_large_ool(kernel: m.Kernel, port: int) -> None:
    """16 MiB of vm_allocate'd memory travels by copy-on-write, not byte by byte."""
    me = m.task_self()
    mem = m.memory()
    size = 16 << 20
    a = m.vm_allocate(me, 0, size, True)
    marks = [0, ps() * 7 + 3, size // 2, size - 8]
    for i, at in enumerate(marks):
        mem[a + at:a + at + 8] = b"MARK%04d" % i
    s0 = kernel.vm_stat()
    send_ool(port, OOL(a, size))
    (got,) = recv_ool(port)
    assert got.size == size
    s1 = kernel.vm_stat()
    assert s1["pages_free"] >= s0["pages_free"] - 8  # no copy of 4096 pages was made
    for i, at in enumerate(marks):
        assert mem[got.address + at:got.address + at + 8] == b"MARK%04d" % i
    assert mem[got.address + ps():got.address + ps() + 16] == bytes(16)
    mem[got.address:got.address + 8] = b"RECEIVER"
    assert mem[a:a + 8] == b"MARK0000"
    mem[a + size - 8:a + size] = b"SENDER!!"
    assert mem[got.address + size - 8:got.address + size] == b"MARK0003"
    assert [r[:2] for r in covered(me, got.address, size)] == [(got.address, size)]
    # and it can be moved on as a whole
    send_ool(port, OOL(got.address, size, deallocate=True))
    (moved,) = recv_ool(port)
    assert mem[moved.address:moved.address + 8] == b"RECEIVER"
    m.vm_deallocate(me, moved.address, size)
    m.vm_deallocate(me, a, size)


@pytest.mark.parametrize("dealloc", [False, True], ids=["copy", "move"])
def test_ool_bad_regions_fail_and_change_nothing(kernel: m.Kernel, ctx: C, port: int,
                                                 dealloc: bool) -> None:
    me = m.task_self()
    q = m.port_allocate(me)
    bads = [OOL(ctx["hole"], 1), OOL(ctx["hole"], ps()), OOL(ctx["a"] + 4 * ps() - 1, 2),
            OOL(ctx["none"], 1), OOL(ctx["ro"], ctx["none"] + 1 - ctx["ro"]), OOL(0, 1),
            OOL(VM_MAX - 1, 1), OOL(ctx["a"], VM_MAX)]
    before = snapshot(ctx)
    status = m.port_status(me, port)
    for bad in bads:
        bad.deallocate = dealloc
        for items in ([bad], [OOL(ctx["a"], ps(), deallocate=dealloc), bad],
                      [Port(q, m.MOVE_RECEIVE), bad]):
            raises("SEND_INVALID_MEMORY", m.msg_send, Message(remote_port=port, items=items),
                   m.SEND_TIMEOUT, 0)
            assert snapshot(ctx) == before
            assert m.port_status(me, port) == status
            assert m.port_status(me, q)[3:] == (True, True)  # the receive right stayed
    # overlapping regions of which one is moved
    raises("SEND_INVALID_MEMORY", m.msg_send, Message(remote_port=port, items=[
        OOL(ctx["a"], 2 * ps(), deallocate=True), OOL(ctx["a"] + ps(), 2 * ps())]),
        m.SEND_TIMEOUT, 0)
    assert snapshot(ctx) == before
    # bad item types
    for bad in (OOL("a", 1), OOL(ctx["a"], -1), OOL(-1, 1), OOL(ctx["a"], 1.5),
                OOL(ctx["a"], 1, deallocate=1), OOL(data="text")):  # type: ignore[arg-type]
        with pytest.raises(m.SendError):
            m.msg_send(Message(remote_port=port, items=[bad]), m.SEND_TIMEOUT, 0)
    assert snapshot(ctx) == before and m.port_status(me, port) == status
    assert_all_ok()


def test_ool_in_a_destroyed_message_is_released(kernel: m.Kernel) -> None:
    me = m.task_self()
    mem = m.memory()
    base = kernel.vm_stat()
    q = m.port_allocate(me)
    a, b = alloc(4), alloc(4)
    fill(a, 4, 7)
    fill(b, 4, 8)
    send_ool(q, OOL(a, 4 * ps(), deallocate=True), OOL(b, 4 * ps()), OOL(data=b"x" * 9000))
    send_ool(q, OOL(b + ps(), 10))
    m.vm_deallocate(me, b, 4 * ps())  # the queued messages now hold the only references
    assert kernel.vm_stat()["objects"] >= 1
    m.port_deallocate(me, q)  # port death destroys the queued messages
    s = kernel.vm_stat()
    assert s["objects"] == base["objects"]
    assert s["pages_free"] == base["pages_free"]
    raises("KERN_INVALID_ADDRESS", mem.read, a, 1)


def test_ool_released_when_the_receiving_task_dies(kernel: m.Kernel) -> None:
    me = m.task_self()
    base = kernel.vm_stat()

    def receiver() -> None:
        p = m.port_allocate(m.task_self())
        m.msg_send(Message(remote_port=m.task_get_special_port(
            m.task_self(), m.TASK_BOOTSTRAP_PORT), items=[Port(p, m.MAKE_SEND)]))
        sleep_ms(10**6)

    back = m.port_allocate(me)
    m.task_set_special_port(me, m.TASK_BOOTSTRAP_PORT, back)
    h = kernel.spawn(receiver, name="sink")
    dest = recv(back).items[0].name  # type: ignore[union-attr]
    a = alloc(4)
    fill(a, 4, 9)
    send_ool(dest, OOL(a, 4 * ps()), OOL(data=b"queued"))
    m.vm_deallocate(me, a, 4 * ps())
    m.task_terminate(h.port)
    wait_until(lambda: kernel.vm_stat()["objects"] == base["objects"])
    m.port_deallocate(me, back)
    assert_all_ok()


def test_vm_allocate_anywhere_finds_the_lowest_hole_from_the_first_free_hint() -> None:
    """The search for room starts at the map's first_free (Mach's hint: below it, no
    hole), which a deallocation moves down and an allocation moves past the entries it
    joins, so vm_allocate(anywhere) still returns the lowest hole that fits without
    walking the map from its bottom (with 10,000 entries, a walk of all of them)."""
    from pymach.kern.thread import current_thread

    with m.boot():
        me, p = m.task_self(), m.vm_page_size()
        vmap = current_thread().task.map
        pages = [m.vm_allocate(me, 0, p, True) for _ in range(50)]
        assert pages == [pages[0] + i * p for i in range(50)]
        assert vmap.first_free == pages[-1] + p
        m.vm_deallocate(me, pages[30], p)
        m.vm_deallocate(me, pages[10], p)
        assert vmap.first_free == pages[10]
        assert m.vm_allocate(me, 0, 2 * p, True) == pages[-1] + p  # (no 2-page hole)
        assert m.vm_allocate(me, 0, p, True) == pages[10]
        assert vmap.first_free == pages[30]
        assert m.vm_allocate(me, 0, p, True) == pages[30]
        assert vmap.first_free == pages[-1] + 3 * p
