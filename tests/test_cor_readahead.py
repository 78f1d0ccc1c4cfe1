"""Read-ahead of memory by reference (net/cor.py) and fault-around (vm/vm_fault.py).

- The sending host's pager (CorPager, driven here directly, its reads of the kept
  region stubbed): a reader that faults in order gets windows that grow GROWTH times
  from WINDOW_MIN up to WINDOW_MAX, streamed GROWTH windows (at most STREAM_AHEAD
  bytes) ahead of it; a reader that
  overtakes data on its way (asks for a page already sent) stays sequential and gets
  only that page again; random faults get exactly the pages they ask for.
- The receiving kernel: a read fault maps the resident pages after it, through a
  copy-on-write copy's shadow chain (where a copy of a manager's object finds its
  pages), so an in-order reader takes far fewer faults than pages; a later write to
  such a page still copies it (the original keeps its data). Runs embedded and native
  (CONTRACT).
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import pairwise

import pytest

import pymach as m
from machutil import recv
from pymach import OOL, Message
from pymach.net import cor

CONTRACT = True  # the task-level tests run as native tasks of machd too (conftest.py)

PAGE = 4096


@pytest.fixture
def pager(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[cor.CorPager, list[tuple[int, int]]]]:
    """A CorPager with one 64 MiB object (port 1) for host "B", and the (offset, length)
    of every provide it makes; its reads of the region return zeros."""
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(cor.portops, "read_into", lambda address, into: None)
    p = cor.CorPager("A", lambda *_: None, lambda req, off, size, fill: sent.append((off, size)))
    size = 64 << 20
    p.objects[1] = cor.CorObject("B", 0, size, size, PAGE)
    yield p, sent


def _fault(p: cor.CorPager, offset: int, pages: int = 1) -> None:
    p.pager_data_request(1, 7, offset, pages * PAGE, 1)


def test_an_in_order_reader_gets_growing_windows_streamed_ahead(
        pager: tuple[cor.CorPager, list[tuple[int, int]]]) -> None:
    p, sent = pager
    faults, at = 0, 0
    while at < 64 << 20:
        _fault(p, at)
        faults += 1
        at = p.objects[1].next
    assert faults <= 8  # WINDOW_MIN, then GROWTH times larger each fault, to WINDOW_MAX
    assert sum(n for _, n in sent) == 64 << 20  # every byte once
    assert [o for o, _ in sent] == sorted(o for o, _ in sent)
    assert sent[:3] == [(0, PAGE), (PAGE, PAGE), (2 * PAGE, cor.WINDOW_MIN)]
    sizes = [n for _, n in sent[2:-1]]  # (the last: what is left)
    assert sizes == sorted(sizes) and max(sizes) == cor.WINDOW_MAX
    assert all(b in (a, min(cor.GROWTH * a, cor.WINDOW_MAX)) for a, b in pairwise(sizes))
    assert sizes.count(cor.WINDOW_MIN) == cor.GROWTH  # a stream GROWTH windows long


def test_a_reader_that_overtakes_the_data_stays_sequential(
        pager: tuple[cor.CorPager, list[tuple[int, int]]]) -> None:
    p, sent = pager
    at = 0
    while p.objects[1].window < cor.WINDOW_MAX:
        _fault(p, at)
        at = p.objects[1].next
    ahead = p.objects[1].next
    assert ahead >= cor.WINDOW_MAX + at - p.objects[1].window
    sent.clear()
    _fault(p, ahead - cor.WINDOW_MAX // 2, 16)  # a page already on its way
    assert sent[0] == (ahead - cor.WINDOW_MAX // 2, PAGE)  # that page again, no more
    assert p.objects[1].streak > 2 and p.objects[1].window == cor.WINDOW_MAX
    assert all(n == cor.WINDOW_MAX or o + n == 64 << 20 for o, n in sent[1:])  # the stream
    assert len(sent) > 1  # goes on (to the object's end, here)
    assert p.objects[1].next - (ahead - cor.WINDOW_MAX // 2) <= cor.STREAM_AHEAD + cor.WINDOW_MAX


def test_random_faults_move_only_their_pages(
        pager: tuple[cor.CorPager, list[tuple[int, int]]]) -> None:
    p, sent = pager
    pages = [5, 900, 17, 4000, 4001, 12000, 77, 16383]  # one pair of neighbours
    for page in pages:
        _fault(p, page * PAGE)
    assert sent == [(page * PAGE, PAGE) for page in pages]
    assert p.provided == len(pages) * PAGE


# -- fault-around through a copy's shadow chain (as tasks) ---------------------------------
def _pattern(i: int) -> bytes:
    return i.to_bytes(8, "little") * (PAGE // 8)


def _copy_of(pages: int) -> tuple[int, int]:
    """A filled region and a copy-on-write copy of it (sent to ourselves)."""
    me = m.task_self()
    a: int = m.vm_allocate(me, 0, pages * PAGE, True)
    m.memory()[a:a + pages * PAGE] = b"".join(_pattern(i) for i in range(pages))
    port = m.port_allocate(me)
    m.msg_send(Message(remote_port=port, items=[OOL(a, pages * PAGE)]))
    (got,) = recv(port).items
    assert isinstance(got, OOL)
    return a, got.address


def test_an_in_order_reader_of_a_copy_takes_few_faults(kernel: m.Kernel) -> None:
    pages = 256
    a, b = _copy_of(pages)
    mem = m.memory()
    before = m.vm_statistics(m.task_self()).faults
    assert all(mem.read(b + i * PAGE, 8) == _pattern(i)[:8] for i in range(pages))
    assert m.vm_statistics(m.task_self()).faults - before <= pages // 16 + 2
    for addr in (a, b):
        m.vm_deallocate(m.task_self(), addr, pages * PAGE)


def test_a_page_mapped_around_a_fault_is_still_copied_on_write(kernel: m.Kernel) -> None:
    pages = 64
    a, b = _copy_of(pages)
    mem = m.memory()
    assert mem.read(b, 8) == _pattern(0)[:8]  # maps the pages after it, read only
    mem.write(b + PAGE + 8, b"written!")
    assert mem.read(b + PAGE, 16) == _pattern(1)[:8] + b"written!"
    assert mem.read(a + PAGE, 16) == _pattern(1)[:16]  # the original is untouched
    assert mem.read(b + 2 * PAGE, PAGE) == _pattern(2)
    mem.write(a + 3 * PAGE, b"original")  # and the copy does not see the original change
    assert mem.read(b + 3 * PAGE, 8) == _pattern(3)[:8]
    for addr in (a, b):
        m.vm_deallocate(m.task_self(), addr, pages * PAGE)
