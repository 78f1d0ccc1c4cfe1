"""Pager windows: a data manager writes the data the kernel asked for into the object's
memory itself (native: the object's memfd) and says so with
pager_data_provided_in_place; machd copies nothing (memory_object.py, "windows").

The native tests run against a machd of their own with 64-page clusters, so that the
default DataManager's answers are large enough to go through the window; the last test
drives the kernel's side of the protocol in the embedded kernel, with a stand-in for the
machine's window.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import pymach as m
from machutil import start_thread, wait_until
from nativeutil import as_native_task, running_machd
from pagerutil import Pager
from pymach import Message
from pymach.pagers.data_manager import provide
from pymach.vm.memory_object import object_window

PS = 4096
PAGES = 256  # a 1 MiB object: four 64-page clusters


@pytest.fixture(scope="module")
def window_machd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from running_machd(tmp_path_factory, "--memory", "256M", "--pager-cluster", "64")


@pytest.fixture
def task(window_machd: str, request: pytest.FixtureRequest) -> Iterator[str]:
    yield from as_native_task(window_machd, request)


def page_data(page: int, version: int = 0) -> bytes:
    """Page `page` of the test objects: its number and a version, repeated."""
    return (page * 1000 + version).to_bytes(8, "little") * (PS // 8)


class Numbered(m.DataManager):
    """Page n holds n (page_data); `window_min` as the test sets it."""

    def read(self, memory_object: int, offset: int, length: int, access: int) -> bytes:
        return b"".join(page_data(offset // PS + i) for i in range(length // PS))

    def pager_terminate(self, memory_object: int, request: int) -> None:
        self.stop()


def _serve(manager: m.DataManager) -> Any:
    """Hand a new object of `manager` to whoever asks (task notify port), serve it, and
    return what the manager's class says it saw."""
    mo = manager.create_memory_object()
    ask = m.msg_receive(m.task_notify(), m.RCV_TIMEOUT, 20_000)
    m.msg_send(Message(remote_port=ask.items[0].value,  # type: ignore[arg-type]
                       items=[m.Port(mo, m.MAKE_SEND)]))
    manager.serve()
    return manager.window_bytes, getattr(manager, "asked", None)


def _numbered(window_min: int) -> Any:
    manager = Numbered()
    manager.window_min = window_min  # type: ignore[misc]
    return _serve(manager)


def _map_from(pager: Any, pages: int) -> int:
    """Map `pages` pages of the object the spawned pager task hands out."""
    me = m.task_self()
    box = m.port_allocate(me)
    notify = m.task_get_special_port(pager.port, m.TASK_NOTIFY_PORT)
    m.msg_send(Message(remote_port=notify, items=[m.Port(box, m.MAKE_SEND)]))
    mo = m.msg_receive(box, m.RCV_TIMEOUT, 20_000).items[0].value
    address: int = m.vm_allocate_with_pager(me, 0, pages * PS, True, mo, 0)
    return address


@pytest.mark.parametrize("window_min", [1, 64 << 10, 0])
def test_a_data_manager_writes_asked_data_into_the_window(task: str, window_min: int) -> None:
    pager = m.spawn(_numbered, window_min, name="numbered")
    a = _map_from(pager, PAGES)
    view = np.frombuffer(m.memory().buffer(a, PAGES * PS), dtype=np.int64)
    firsts = view.reshape(PAGES, PS // 8)
    assert [int(firsts[i, 0]) for i in range(PAGES)] == [i * 1000 for i in range(PAGES)]
    assert all(int(firsts[i].min()) == int(firsts[i].max()) for i in range(PAGES))
    del view, firsts
    m.vm_deallocate(m.task_self(), a, PAGES * PS)
    placed, _ = pager.result(20_000)
    assert placed == (PAGES * PS if window_min else 0)  # every cluster went in place


class Scripted(m.DataManager):
    """Answers each request in place as its `script` says, from the window it asks for:
    "wrong key" (names another window), "write and more" (writes the asked pages and
    the page after them, and says so for all of them), "write nothing"."""

    threads = 1
    script: tuple[str, ...] = ()
    asked: list[tuple[int, int]]

    def pager_data_request(self, memory_object: int, request: int, offset: int,
                           length: int, access: int) -> None:
        self.asked.append((offset, length))
        step = self.script[min(len(self.asked), len(self.script)) - 1]
        window = self._window(request)
        assert window is not None
        key, count = window.key, length
        if step == "wrong key":
            key += 1
        elif step == "write and more":
            count += PS
            window.write(offset, b"".join(page_data(offset // PS + i, 1)
                                          for i in range(count // PS)))
        with contextlib.suppress(m.MachError):  # (the kernel's refusal comes back)
            m.pager_data_provided_in_place(request, key, offset, count, m.VM_PROT_NONE)

    def pager_terminate(self, memory_object: int, request: int) -> None:
        self.stop()


def _scripted(*script: str) -> Any:
    manager = Scripted()
    manager.script = script
    manager.asked = []
    return _serve(manager)


def test_data_placed_in_another_window_fail_the_faults(task: str) -> None:
    pager = m.spawn(_scripted, "wrong key", name="wrong-key")
    a = _map_from(pager, 1)
    with pytest.raises(m.MachError) as e:
        m.memory().read(a, 8)
    assert e.value.code == "KERN_MEMORY_ERROR"
    m.vm_deallocate(m.task_self(), a, PS)
    pager.result(20_000)


def test_what_a_manager_writes_beyond_the_asked_range_is_punched_out(task: str) -> None:
    pager = m.spawn(_scripted, "write and more", "write nothing", name="punch")
    a = _map_from(pager, 65)  # page 0's fault asks for a 64-page cluster
    mem = m.memory()
    assert [mem.read(a + i * PS, 8) for i in range(64)] == \
        [page_data(i, 1)[:8] for i in range(64)]
    # Page 64 was written but not asked for: punched out, so the answer in place that
    # writes nothing leaves zeros there, not the first answer's data.
    assert mem.read(a + 64 * PS, PS) == bytes(PS)
    m.vm_deallocate(m.task_self(), a, 65 * PS)
    _, requests = pager.result(20_000)
    assert requests == [(0, 64 * PS), (64 * PS, PS)]



class Late(m.DataManager):
    """Numbered, but the answer for offset 0 comes `late` seconds late (2 threads serve,
    so later requests are answered meanwhile); every request is noted."""

    late = 0.5
    asked: list[tuple[int, int]]

    def read(self, memory_object: int, offset: int, length: int, access: int) -> bytes:
        self.asked.append((offset // PS, length // PS))
        if offset == 0:
            time.sleep(self.late)
        return b"".join(page_data(offset // PS + i) for i in range(length // PS))

    def pager_terminate(self, memory_object: int, request: int) -> None:
        self.stop()


def _late() -> Any:
    manager = Late()
    manager.asked = []
    return _serve(manager)


def test_a_late_answer_never_lands_on_a_page_a_client_changed(task: str) -> None:
    """Page 10 lies in the cluster asked for page 0, whose answer comes late: a fault
    on page 10 waits for that answer instead of asking again (a second, overlapping
    request answered first would let the late one's window write land on page 10
    after the client changed it)."""
    pager = m.spawn(_late, name="late")
    a = _map_from(pager, 128)
    mem = m.memory()
    _, box = start_thread(lambda: mem.read(a, 8))  # asks for pages 0-63, answered late
    time.sleep(0.2)
    assert mem.read(a + 10 * PS, 8) == page_data(10)[:8]  # waits for that answer
    mem.write(a + 10 * PS, b"CLIENT!!")
    wait_until(lambda: "done" in box)
    time.sleep(0.3)  # (nothing else may come: there is no other request)
    assert mem.read(a + 10 * PS, 8) == b"CLIENT!!"
    m.vm_deallocate(m.task_self(), a, 128 * PS)
    _, asked = pager.result(20_000)
    assert asked == [(0, 64)]


class Noting(Numbered):
    """Numbered, noting the (page, pages) of every request."""

    asked: list[tuple[int, int]]

    def read(self, memory_object: int, offset: int, length: int, access: int) -> bytes:
        self.asked.append((offset // PS, length // PS))
        return super().read(memory_object, offset, length, access)


def _noting() -> Any:
    manager = Noting()
    manager.asked = []
    return _serve(manager)


def test_machds_read_ahead_doubles_the_requests_of_a_reader_in_order(task: str) -> None:
    """machd's default read-ahead (4 MiB of 4 KiB pages: 1024) from its 64-page
    cluster: a NumPy sum reading 2048 pages in order makes six requests, each from
    where the last ended, and gets every page's data."""
    pager = m.spawn(_noting, name="noting")
    a = _map_from(pager, 2048)
    view = np.frombuffer(m.memory().buffer(a, 2048 * PS), dtype=np.int64)
    assert int(view[::PS // 8].sum()) == sum(i * 1000 for i in range(2048))
    del view
    m.vm_deallocate(m.task_self(), a, 2048 * PS)
    _, asked = pager.result(20_000)
    assert asked == [(0, 64), (64, 128), (192, 256), (448, 512), (960, 1024), (1984, 64)]


class Shrinker(Numbered):
    """Tries to cut its object's memfd to nothing before each answer (machd seals it)."""

    threads = 1
    refused: list[str]

    def pager_data_request(self, memory_object: int, request: int, offset: int,
                           length: int, access: int) -> None:
        window = self._window(request)
        assert window is not None
        try:
            os.ftruncate(window.fd, 0)
            self.refused.append("truncated")
        except OSError as e:
            self.refused.append(os.strerror(e.errno))
        super().pager_data_request(memory_object, request, offset, length, access)


def _shrinker() -> Any:
    manager = Shrinker()
    manager.refused = []
    _serve(manager)
    return manager.refused


def test_a_manager_cannot_shrink_its_objects_memory(task: str) -> None:
    pager = m.spawn(_shrinker, name="shrinker")
    a = _map_from(pager, 128)
    mem = m.memory()
    assert [mem.read(a + i * PS, 8) for i in (0, 64, 127)] == \
        [page_data(i)[:8] for i in (0, 64, 127)]
    m.vm_deallocate(m.task_self(), a, 128 * PS)
    assert set(pager.result(20_000)) == {os.strerror(errno.EPERM)}


class Counted(Numbered):
    """Numbered, one thread, the first answer late; counts the requests."""

    threads = max_threads = 1
    asked: list[int]

    def read(self, memory_object: int, offset: int, length: int, access: int) -> bytes:
        self.asked.append(offset // PS)
        if len(self.asked) == 1:
            time.sleep(0.5)  # the other faults all come meanwhile
        return super().read(memory_object, offset, length, access)


def _counted() -> Any:
    manager = Counted()
    manager.asked = []
    _serve(manager)
    return manager.asked


def test_many_faults_at_once_each_ask_once(task: str) -> None:
    """160 faults, two in each 64-page cluster, all while the first answer waits: no
    page is asked for twice (a fault inside a cluster asked for waits for its answer;
    and no request is refused and asked again, however many are outstanding)."""
    n = 80
    pager = m.spawn(_counted, name="counted")
    a = _map_from(pager, n * 64)
    pages = [i * 64 for i in range(n)] + [i * 64 + 32 for i in range(n)]
    boxes = [start_thread(lambda p=p: m.memory().read(a + p * PS, 8))[1] for p in pages]
    wait_until(lambda: all("done" in b for b in boxes), 30_000)
    assert [b.get("result") for b in boxes] == [page_data(p)[:8] for p in pages]
    m.vm_deallocate(m.task_self(), a, n * 64 * PS)
    asked = pager.result(20_000)
    assert len(asked) == len(set(asked)) and set(asked) <= set(pages)


class Block(m.DataManager):
    """Answers every request with the rest of the 16-page block it lies in: data beyond
    the asked range, which the protocol accepts."""

    def read(self, memory_object: int, offset: int, length: int, access: int) -> bytes:
        return b"".join(page_data(i) for i in range(offset // PS, 16))

    def pager_terminate(self, memory_object: int, request: int) -> None:
        self.stop()


def _block() -> Any:
    return _serve(Block())


def test_data_beyond_the_asked_range_never_lands_on_a_page_in_the_window(task: str) -> None:
    pager = m.spawn(_block, name="block")
    a = _map_from(pager, 16)
    mem = m.memory()
    mem.write(a + 8 * PS, b"CLIENT!!")  # asks for pages 8-15, then changes page 8
    assert mem.read(a, 8) == page_data(0)[:8]  # asks for 0-7: the answer is 0-15
    assert mem.read(a + 8 * PS, 8) == b"CLIENT!!"
    m.vm_deallocate(m.task_self(), a, 16 * PS)
    placed, _ = pager.result(20_000)
    assert 0 < placed <= 16 * PS  # at most the asked pages went in place (0-7, 8-15;
    # an answer served before the other thread has served pager_init goes by message)


class LateBlock(Block):
    """Block, two threads, the answer for page 8 late."""

    threads = 2

    def read(self, memory_object: int, offset: int, length: int, access: int) -> bytes:
        if offset == 8 * PS:
            time.sleep(0.5)
        return super().read(memory_object, offset, length, access)


def _late_block() -> Any:
    return _serve(LateBlock())


def test_data_past_an_answer_in_place_never_answers_another_request(task: str) -> None:
    """Pages 8-15 are asked for first, and answered late; then pages 0-7 (the cluster
    stops at the outstanding request): the answer for 0-7 has data for 8-15 too, which
    must not make those pages (a task could change one before the late answer for 8-15
    is written in place)."""
    pager = m.spawn(_late_block, name="late-block")
    a = _map_from(pager, 16)
    mem = m.memory()
    _, box = start_thread(lambda: mem.read(a + 8 * PS, 8))  # asks for 8-15, late
    time.sleep(0.2)
    assert mem.read(a, 8) == page_data(0)[:8]  # asks for 0-7
    assert mem.read(a + 9 * PS, 8) == page_data(9)[:8]  # waits for the late answer
    mem.write(a + 9 * PS, b"CLIENT!!")
    wait_until(lambda: "done" in box)
    time.sleep(0.3)
    assert mem.read(a + 9 * PS, 8) == b"CLIENT!!"
    m.vm_deallocate(m.task_self(), a, 16 * PS)
    pager.result(20_000)


class AlignedByMessage(m.DataManager):
    """Has a window, but answers by message with the whole aligned 16-page block, at
    another offset than the request's (the paper allows it)."""

    threads = 1

    def pager_data_request(self, memory_object: int, request: int, offset: int,
                           length: int, access: int) -> None:
        assert self._window(request) is not None
        low = offset // (16 * PS) * 16 * PS
        provide(request, low, b"".join(page_data(low // PS + i) for i in range(16)))

    def pager_terminate(self, memory_object: int, request: int) -> None:
        self.stop()


def _aligned_by_message() -> Any:
    return _serve(AlignedByMessage())


def test_a_windowed_manager_may_answer_by_message_at_another_offset(task: str) -> None:
    pager = m.spawn(_aligned_by_message, name="aligned")
    a = _map_from(pager, 32)
    _, box = start_thread(lambda: m.memory().read(a + 10 * PS, 8))
    wait_until(lambda: "done" in box, 10_000)
    assert box.get("result") == page_data(10)[:8]
    assert m.memory().read(a + 12 * PS, 8) == page_data(12)[:8]
    m.vm_deallocate(m.task_self(), a, 32 * PS)
    pager.result(20_000)


class Introspective(m.DataManager):
    """Two threads; the one answering for offset 0 first reads page 5 of the object
    itself, through a mapping of its own (inside the range it is answering)."""

    threads = 2

    def read(self, memory_object: int, offset: int, length: int, access: int) -> bytes:
        if offset == 0:
            me = m.task_self()
            mine = m.vm_allocate_with_pager(me, 0, 128 * PS, True, memory_object, 0)
            assert m.memory().read(mine + 5 * PS, 8) == page_data(5)[:8]
            m.vm_deallocate(me, mine, 128 * PS)
        return b"".join(page_data(offset // PS + i) for i in range(length // PS))

    def pager_terminate(self, memory_object: int, request: int) -> None:
        self.stop()


def _introspective() -> Any:
    return _serve(Introspective())


def test_a_manager_reading_its_own_object_while_answering_does_not_wait_on_itself(
        task: str) -> None:
    pager = m.spawn(_introspective, name="introspective")
    a = _map_from(pager, 128)
    _, box = start_thread(lambda: m.memory().read(a, 8))
    wait_until(lambda: "done" in box, 10_000)
    assert box.get("result") == page_data(0)[:8]
    m.vm_deallocate(m.task_self(), a, 128 * PS)
    pager.result(20_000)


class Grower(Numbered):
    """Makes its object's memfd larger (1 GiB, sparse) before its first answer."""

    threads = 1
    grown = False

    def pager_data_request(self, memory_object: int, request: int, offset: int,
                           length: int, access: int) -> None:
        window = self._window(request)
        if window is not None and not self.grown:
            os.ftruncate(window.fd, 1 << 30)
            self.grown = True
        super().pager_data_request(memory_object, request, offset, length, access)


def _grower() -> Any:
    return _serve(Grower())


def test_a_memfd_grown_by_its_manager_still_grows_for_a_larger_mapping(task: str) -> None:
    pager = m.spawn(_grower, name="grower")
    me = m.task_self()
    box = m.port_allocate(me)
    notify = m.task_get_special_port(pager.port, m.TASK_NOTIFY_PORT)
    m.msg_send(Message(remote_port=notify, items=[m.Port(box, m.MAKE_SEND)]))
    mo = m.msg_receive(box, m.RCV_TIMEOUT, 20_000).items[0].value
    a = m.vm_allocate_with_pager(me, 0, 16 * PS, True, mo, 0)  # type: ignore[arg-type]
    assert m.memory().read(a, 8) == page_data(0)[:8]
    b = m.vm_allocate_with_pager(me, 0, 64 * PS, True, mo, 0)  # type: ignore[arg-type]
    assert m.memory().read(b + 40 * PS, 8) == page_data(40)[:8]
    m.vm_deallocate(me, a, 16 * PS)
    m.vm_deallocate(me, b, 64 * PS)
    pager.result(20_000)


def _bad_calls() -> Any:
    """In a manager task: PAGER_WINDOW on names that are no pager request port, and
    answers in place out of bounds; the codes each got."""
    manager = Numbered()
    mo = manager.create_memory_object()
    ask = m.msg_receive(m.task_notify(), m.RCV_TIMEOUT, 20_000)
    m.msg_send(Message(remote_port=ask.items[0].value,  # type: ignore[arg-type]
                       items=[m.Port(mo, m.MAKE_SEND)]))
    init = m.msg_receive(mo, m.RCV_TIMEOUT, 20_000)  # pager_init: the request port
    request = init.items[0].value
    codes = []
    for name in (mo, m.task_self(), 10**9, -1):  # own ports, names it does not hold
        try:
            m.memory().pager_window(name)
            codes.append("none")
        except m.MachError as e:
            codes.append(e.code)
    window = m.memory().pager_window(request)
    assert window is not None
    for key, offset, count in ((window.key, 0, 1 << 40), (window.key, -PS, PS)):
        try:
            m.pager_data_provided_in_place(request, key, offset, count, m.VM_PROT_NONE)
            codes.append("ok")
        except m.MachError as e:
            codes.append(e.code)
    window.close()
    return codes


def test_bad_window_calls_fail_clearly_and_machd_goes_on(task: str) -> None:
    pager = m.spawn(_bad_calls, name="bad-calls")
    me = m.task_self()
    box = m.port_allocate(me)
    notify = m.task_get_special_port(pager.port, m.TASK_NOTIFY_PORT)
    m.msg_send(Message(remote_port=notify, items=[m.Port(box, m.MAKE_SEND)]))
    mo = m.msg_receive(box, m.RCV_TIMEOUT, 20_000).items[0].value
    a = m.vm_allocate_with_pager(me, 0, 4 * PS, True, mo, 0)  # type: ignore[arg-type]
    codes = pager.result(20_000)
    assert codes[:4] == ["KERN_INVALID_ARGUMENT", "KERN_INVALID_ARGUMENT",
                         "KERN_INVALID_NAME", "KERN_INVALID_NAME"]
    assert codes[4:] == ["KERN_INVALID_ARGUMENT", "KERN_INVALID_ARGUMENT"]
    m.vm_deallocate(me, a, 4 * PS)
    b = m.vm_allocate(me, 0, PS, True)  # machd serves on
    m.memory().write(b, b"ok")
    assert m.memory().read(b, 2) == b"ok"


# -- the kernel's side, in the embedded kernel with a stand-in window ------------------------
def _stand_in_window(kernel: Any) -> list[int]:
    """Give the embedded machine windows: object_window hands out a descriptor of
    /dev/null, and the "manager's writes" are pages of 5s put into the frames when the
    kernel takes them (phys_placed_run). Returns the list of frames placed."""
    phys, placed = kernel.vm.phys, list[int]()

    def place(frames: list[int]) -> None:
        placed.extend(frames)
        for frame in frames:
            phys.phys_write(frame, b"\5" * PS)

    phys.object_window = lambda obj: os.open(os.devnull, os.O_RDONLY)
    phys.phys_placed_run = place
    return placed


def test_an_answer_in_place_whose_range_lost_a_page_is_asked_again(kernel: Any) -> None:
    placed = _stand_in_window(kernel)
    pager = Pager(size=2 * PS)
    a = pager.map()
    request = pager.init()
    (obj,) = [o for o in kernel.vm.pager_objects.values() if not o.internal]
    with kernel.sched.lock:
        fd = object_window(obj)  # (as the trap would: the manager asked for it)
        assert fd is not None
        os.close(fd)
    _, box = start_thread(lambda: m.memory().read(a, 8))
    assert pager.expect("pager_data_request")[1:3] == [0, PS]
    with kernel.sched.lock:  # a page of the asked range leaves the object meanwhile
        obj.pages_left([SimpleNamespace(offset=0)])
    m.pager_data_provided_in_place(request, obj.serial, 0, PS, m.VM_PROT_NONE)
    assert pager.expect("pager_data_request")[1:3] == [0, PS]  # asked again, not taken
    assert placed == [] and "done" not in box
    m.pager_data_provided_in_place(request, obj.serial, 0, PS, m.VM_PROT_NONE)
    wait_until(lambda: "done" in box)
    assert box.get("result") == b"\5" * 8 and len(placed) == 1


def test_an_answer_in_place_without_a_window_fails_the_faults(kernel: Any) -> None:
    pager = Pager(size=PS)
    a = pager.map()
    request = pager.init()
    (obj,) = [o for o in kernel.vm.pager_objects.values() if not o.internal]
    _, box = start_thread(lambda: m.memory().read(a, 8))
    pager.expect("pager_data_request")
    with pytest.raises(m.MachError) as e:  # the embedded machine has no windows
        m.pager_data_provided_in_place(request, obj.serial, 0, PS, m.VM_PROT_NONE)
    assert e.value.code == "KERN_INVALID_ARGUMENT"
    wait_until(lambda: "done" in box)
    assert box.get("error") == "KERN_MEMORY_ERROR"
