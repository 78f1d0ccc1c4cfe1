"""Write-backs in place: as an external object is terminated, its dirty pages stay in the
object's memory for a manager that has the object's window and asked for them so
(`DataManager.writes_in_place`); the kernel names each run in
pager_data_write_in_place, the manager reads it from its window and releases it
(pager_data_write_released), and only then does the kernel free those pages and finish
the termination (memory_object.py, "write-backs in place").

The native tests run against a machd of their own; the last ones drive the kernel's
side of the protocol in the embedded kernel, with a stand-in for the machine's window.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import pymach as m
from machutil import wait_until
from nativeutil import as_native_task, running_machd
from pagerutil import Pager
from pymach import Message
from pymach.include.message import OOL
from pymach.pagers.data_manager import WindowData
from pymach.vm.memory_object import object_window

PS = 4096
PAGES = 96
CHANGED = {i: i + 7000 for i in [*range(0, 40), *range(60, PAGES)]}  # two runs


@pytest.fixture(scope="module")
def window_machd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from running_machd(tmp_path_factory, "--memory", "256M", "--pager-cluster", "16")


@pytest.fixture
def task(window_machd: str, request: pytest.FixtureRequest) -> Iterator[str]:
    yield from as_native_task(window_machd, request)


class Recorder(m.DataManager):
    """Page n reads as n; stores the first word of each page written back, and records
    how the write-backs came. `mode` says what its pager_data_write_in_place does:
    "take" (the base class's), "slow" (the same 0.3 s later), "fail once" (as "take",
    but its first store raises), "ignore" (never reads nor releases), "late" (releases
    only after the pageout deadline, itself, and keeps what it is told), "probe"
    (first makes two bad releases, then as "take")."""

    threads = max_threads = 1  # (one handler at a time, in the kernel's order)

    def __init__(self, mode: str, in_place: bool) -> None:
        super().__init__()
        self.mode = mode
        self.writes_in_place = in_place  # type: ignore[misc]
        self.seen: list[tuple[int, int]] = []  # pager_data_write_in_place (offset, count)
        self.kinds: list[str] = []  # "window" or "out of line", per queued write-back
        self.stored: dict[int, int] = {}  # page -> first word written back
        self.outcomes: list[Any] = []
        self.asked = 0  # pages read() was asked for

    def read(self, memory_object: int, offset: int, length: int, access: int) -> bytes:
        self.asked += length // PS
        return b"".join(self.stored.get(page, page).to_bytes(8, "little") * (PS // 8)
                        for page in range(offset // PS, (offset + length) // PS))

    def pager_data_write_in_place(self, memory_object: int, request: int, window: int,
                                  offset: int, data_count: int) -> None:
        self.seen.append((offset, data_count))
        if self.mode == "ignore":
            return
        if self.mode == "slow":
            time.sleep(0.3)
        if self.mode == "late":
            if len(self.seen) == 1:  # (the later ones come after it)
                time.sleep(2.0)  # past the kernel's pageout deadline (1 s)
            try:
                self.outcomes.append(m.pager_data_write_released(request, window, offset,
                                                                 data_count))
            except m.MachError as e:  # (the object is gone, and its request port)
                self.outcomes.append(e.code)
            return
        if self.mode == "probe":
            self.outcomes.append(m.pager_data_write_released(  # not a run it sent
                request, window, offset + PS, data_count - PS))
            try:
                m.pager_data_write_released(request, window + 1, offset, data_count)
            except m.MachError as e:
                self.outcomes.append(e.code)
        super().pager_data_write_in_place(memory_object, request, window, offset,
                                          data_count)

    def queue_write(self, mo: int, offset: int, data: OOL | WindowData,
                    data_count: int) -> None:
        self.kinds.append("out of line" if isinstance(data, OOL) else "window")
        super().queue_write(mo, offset, data, data_count)

    def write(self, memory_object: int, offset: int, data: bytes) -> None:
        if self.mode == "fail once":
            self.mode = "take"
            raise OSError("disk full (once)")
        for i in range(0, len(data), PS):
            self.stored[(offset + i) // PS] = int.from_bytes(data[i:i + 8], "little")

    def pager_terminate(self, memory_object: int, request: int) -> None:
        self.stop()


def _hand_out(manager: m.DataManager, *ports: int) -> Any:
    """In a manager task: a new memory object of `manager`, handed (with send rights to
    `ports`) to whoever asks on the task notify port, then served; the manager."""
    mo = manager.create_memory_object()
    ask = m.msg_receive(m.task_notify(), m.RCV_TIMEOUT, 20_000)
    m.msg_send(Message(remote_port=ask.items[0].value,  # type: ignore[arg-type]
                       items=[m.Port(port, m.MAKE_SEND) for port in (mo, *ports)]))
    manager.serve()
    return manager


def _recorder(mode: str, in_place: bool) -> Any:
    manager = _hand_out(Recorder(mode, in_place))
    return manager.seen, manager.kinds, manager.stored, manager.outcomes


def _ask(pager: Any) -> Message:
    """Ask a spawned manager task for what it hands out (its task notify port): the
    message it answers with (its memory object port first)."""
    box = m.port_allocate(m.task_self())
    notify = m.task_get_special_port(pager.port, m.TASK_NOTIFY_PORT)
    m.msg_send(Message(remote_port=notify, items=[m.Port(box, m.MAKE_SEND)]))
    return m.msg_receive(box, m.RCV_TIMEOUT, 20_000)


def _write_back(mode: str, in_place: bool = True) -> tuple[Any, ...]:
    """Map PAGES pages of a new Recorder's object, read them all (so the manager has its
    window), change the first word of the pages of CHANGED (two runs), and deallocate:
    what the manager recorded, once it has seen the object's termination."""
    pager = m.spawn(_recorder, mode, in_place, name=f"recorder-{mode}")
    me = m.task_self()
    mo = _ask(pager).items[0].value
    a = m.vm_allocate_with_pager(me, 0, PAGES * PS, True, mo, 0)
    view = np.frombuffer(m.memory().buffer(a, PAGES * PS), dtype=np.int64)
    pages = view.reshape(PAGES, PS // 8)
    assert [int(pages[i, 0]) for i in range(PAGES)] == list(range(PAGES))
    for i, value in CHANGED.items():
        pages[i, 0] = value
    del view, pages
    m.vm_deallocate(me, a, PAGES * PS)
    result: tuple[Any, ...] = pager.result(30_000)
    return result




def test_changed_pages_go_back_through_the_window_at_termination(task: str) -> None:
    seen, kinds, stored, _ = _write_back("take")
    assert stored == CHANGED  # every changed page, and only those, with their data
    assert sorted(seen) == [(0, 40 * PS), (60 * PS, 36 * PS)]
    assert kinds == ["window"] * 2  # none went out of line


def test_a_manager_that_does_not_ask_gets_them_out_of_line(task: str) -> None:
    seen, kinds, stored, _ = _write_back("take", in_place=False)
    assert stored == CHANGED and seen == [] and set(kinds) == {"out of line"}


def test_bad_releases_are_refused_and_change_nothing(task: str) -> None:
    seen, kinds, stored, outcomes = _write_back("probe")
    assert len(seen) == 2 and sorted(outcomes, key=str) == \
        [False, False, "KERN_INVALID_ARGUMENT", "KERN_INVALID_ARGUMENT"]
    # (a range the kernel did not send; another window), and each run taken after them
    assert stored == CHANGED and kinds == ["window"] * len(seen)


def test_unreleased_write_backs_come_again_out_of_line_after_the_deadline(task: str) -> None:
    t0 = time.monotonic()
    seen, kinds, stored, _ = _write_back("ignore")
    assert seen and stored == CHANGED and set(kinds) == {"out of line"}
    assert time.monotonic() - t0 >= 0.9  # (the termination waited for the deadline)


def test_a_run_whose_store_fails_is_not_released_and_comes_again(task: str) -> None:
    seen, kinds, stored, _ = _write_back("fail once")  # (the first store raises)
    assert stored == CHANGED and len(seen) == 2  # the failed run came again at the
    assert kinds.count("out of line") == 1  # deadline, out of line, and the queue went on


def test_a_release_after_the_deadline_is_told_so(task: str) -> None:
    seen, kinds, stored, outcomes = _write_back("late")
    assert len(outcomes) == len(seen) == 2  # each told it was too late:
    assert set(outcomes) <= {False, "SEND_INVALID_PORT"}  # (or the object is gone)
    assert stored == CHANGED and set(kinds) == {"out of line"}


def test_a_run_past_the_window_the_manager_was_given_goes_back_in_place(task: str) -> None:
    """The object grew (a larger mapping) after its manager got its window: the run
    past the window's first size is still read there, with no wait for the deadline."""
    pager = m.spawn(_recorder, "take", True, name="recorder-grown")
    me = m.task_self()
    mo = _ask(pager).items[0].value
    a = m.vm_allocate_with_pager(me, 0, 4 * PS, True, mo, 0)
    assert m.memory().read(a, 8) == bytes(8)  # the manager takes its window: 4 pages
    b = m.vm_allocate_with_pager(me, 0, 8 * PS, True, mo, 0)  # the object grows
    m.memory().write(b + 6 * PS, (666).to_bytes(8, "little"))
    t0 = time.monotonic()
    m.vm_deallocate(me, a, 4 * PS)
    m.vm_deallocate(me, b, 8 * PS)
    seen, kinds, stored, _ = pager.result(30_000)
    assert stored == {6: 666} and kinds == ["window"] and seen == [(6 * PS, PS)]
    assert time.monotonic() - t0 < 0.9  # (not the pageout deadline's 1 s)


@pytest.fixture(scope="module")
def small_machd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from running_machd(tmp_path_factory, "--memory", "32M", "--pager-cluster", "16")


def test_pageouts_under_memory_pressure_go_back_in_place(
        small_machd: str, request: pytest.FixtureRequest) -> None:
    """A region of a manager's object half again as large as machd's memory, every page
    changed: the pages the pageout daemon evicts go back in place, and nothing is lost."""
    pages = 48 * 256  # 48 MiB in a machd of 32 MiB
    for _ in as_native_task(small_machd, request):
        pager = m.spawn(_recorder, "take", True, name="recorder-pressure")
        me = m.task_self()
        mo = _ask(pager).items[0].value
        a = m.vm_allocate_with_pager(me, 0, pages * PS, True, mo, 0)
        view = np.frombuffer(m.memory().buffer(a, pages * PS), dtype=np.int64)
        view[::PS // 8] = np.arange(pages) + 10**6
        del view
        m.vm_deallocate(me, a, pages * PS)
        seen, kinds, stored, _ = pager.result(120_000)
        assert stored == {i: i + 10**6 for i in range(pages)}
        assert set(kinds) == {"window"} and len(seen) > 1


class SlowStore(m.DataManager):
    """Page n reads as its stored word (n if none); write() takes 5 ms a call, so that a
    run it has released may not be stored yet when a fault asks for it again (default
    threads: another one answers)."""

    def __init__(self) -> None:
        super().__init__()
        self.stored: dict[int, int] = {}

    def read(self, memory_object: int, offset: int, length: int, access: int) -> bytes:
        return b"".join(self.stored.get(p, p).to_bytes(8, "little") * (PS // 8)
                        for p in range(offset // PS, (offset + length) // PS))

    def write(self, memory_object: int, offset: int, data: bytes) -> None:
        time.sleep(0.005)
        for i in range(0, len(data), PS):
            self.stored[(offset + i) // PS] = int.from_bytes(data[i:i + 8], "little")

    def pager_terminate(self, memory_object: int, request: int) -> None:
        self.stop()


def _slow_store() -> Any:
    return len(_hand_out(SlowStore()).stored)


def test_evicted_pages_read_back_at_once_have_their_data(
        small_machd: str, request: pytest.FixtureRequest) -> None:
    """Pages evicted in place and read back at once are found in memory (clean) until
    the pageout daemon frees them, not asked of a manager that may not have stored
    them yet."""
    pages = 6000  # over the manager page limit of a machd of 32 MiB
    for _ in as_native_task(small_machd, request):
        pager = m.spawn(_slow_store, name="slow-store")
        me = m.task_self()
        mo = _ask(pager).items[0].value
        a = m.vm_allocate_with_pager(me, 0, pages * PS, True, mo, 0)
        view = np.frombuffer(m.memory().buffer(a, pages * PS), dtype=np.int64)
        words = view[::PS // 8]
        words[:] = np.arange(pages) + 10**6  # every page changed, evictions under way
        got = np.array(words)  # read back at once
        del view, words
        m.vm_deallocate(me, a, pages * PS)
        assert pager.result(120_000) == pages
        assert (got == np.arange(pages) + 10**6).all()


# -- the kernel's side, in the embedded kernel with a stand-in window ------------------------
def _windowed_object(kernel: Any, pages: int) -> tuple[Pager, int, int, Any]:
    """A hand-driven Pager's object of `pages` pages, mapped, every page read (provided)
    and changed, as if its manager had asked for its window with writes in place:
    (pager, address, request port, the kernel's object)."""
    kernel.vm.phys.object_windows = True  # (the embedded machine's windows stand in)
    kernel.vm.phys.object_window = lambda obj: os.open(os.devnull, os.O_RDONLY)
    kernel.vm.phys.object_pages_home = lambda frames: True
    pager = Pager(size=pages * PS)
    pager.start()
    a = pager.map()
    request = pager.request
    (obj,) = [o for o in kernel.vm.pager_objects.values() if not o.internal]
    with kernel.sched.lock:
        fd = object_window(obj)
        assert fd is not None
        os.close(fd)
        obj.writes_in_place = True
    for i in range(pages):
        m.memory().write(a + i * PS, b"%d" % (i + 50))
    pager.stop()
    return pager, a, request, obj


def test_the_object_waits_for_the_release_and_then_is_gone(kernel: Any) -> None:
    pager, a, request, obj = _windowed_object(kernel, 4)
    alive = kernel.vm.objects_alive
    m.vm_deallocate(m.task_self(), a, 4 * PS)
    _, key, offset, count = pager.expect("pager_data_write_in_place")
    assert (key, offset, count) == (obj.serial, 0, 4 * PS)
    with kernel.sched.lock:  # waiting: its pages wired, its request port alive
        assert len(obj.memq) == 4 and all(p.wire_count for p in obj.memq.values())
        assert obj.pager_request is not None and not obj.alive
        assert kernel.vm.objects_alive == alive and kernel.vm.pageouts_in_flight == 1
        data = b"".join(kernel.vm.phys.phys_read(obj.memq[o].frame, 0, 2)
                        for o in range(0, 4 * PS, PS))
    assert data == b"50515253"  # what the window holds for the manager
    assert m.pager_data_write_released(request, key, PS, PS) is False
    assert m.pager_data_write_released(request, key, 0, 4 * PS) is True
    with kernel.sched.lock:
        assert obj.memq == {} and obj.pager_request is None
        assert kernel.vm.objects_alive == alive - 1 and kernel.vm.pageouts_in_flight == 0
    with pytest.raises(m.MachError):  # the request port is gone with the object
        m.pager_data_write_released(request, key, 0, 4 * PS)


def test_at_the_deadline_the_data_go_out_of_line_and_the_object_is_gone(kernel: Any) -> None:
    kernel.vm.pageout_deadline_ms = 100.0
    pager, a, request, obj = _windowed_object(kernel, 3)
    m.vm_deallocate(m.task_self(), a, 3 * PS)
    _, key, offset, count = pager.expect("pager_data_write_in_place")
    offset, _, count = pager.expect("pager_data_write")  # (after the deadline)
    assert (offset, count) == (0, 3 * PS)
    assert [pager.data[i * PS:i * PS + 2] for i in range(3)] == [b"50", b"51", b"52"]
    wait_until(lambda: obj.pager_request is None)  # the termination finished
    with pytest.raises(m.MachError) as e:  # too late: the request port went with it
        m.pager_data_write_released(request, key, 0, 3 * PS)
    assert e.value.code.startswith("SEND_INVALID")


def test_a_manager_that_dies_finishes_an_object_a_new_mapping_replaced(kernel: Any) -> None:
    kernel.vm.pageout_deadline_ms = 60_000.0  # (the death, not the deadline, must do it)
    pager, a, _, obj = _windowed_object(kernel, 2)
    m.vm_deallocate(m.task_self(), a, 2 * PS)
    pager.expect("pager_data_write_in_place")
    pager.map()  # the same memory object again: a new kernel object replaces it
    assert obj.pager_request is not None and not obj.alive
    m.port_deallocate(m.task_self(), pager.mo)  # the manager dies
    wait_until(lambda: obj.pager_request is None)
    with kernel.sched.lock:
        assert kernel.vm.pageouts_in_flight == 0 and not kernel.vm.in_place_waiting


def test_a_manager_that_dies_leaves_no_object_waiting(kernel: Any) -> None:
    kernel.vm.pageout_deadline_ms = 60_000.0  # (the death, not the deadline, must do it)
    pager, a, _, obj = _windowed_object(kernel, 2)
    alive = kernel.vm.objects_alive
    m.vm_deallocate(m.task_self(), a, 2 * PS)
    pager.expect("pager_data_write_in_place")
    m.port_deallocate(m.task_self(), pager.mo)  # the memory object port dies
    wait_until(lambda: obj.pager_request is None)
    with kernel.sched.lock:
        assert obj.memq == {} and kernel.vm.objects_alive == alive - 1
        assert kernel.vm.pageouts_in_flight == 0



class Driven(Recorder):
    """A Recorder with a driver thread that, asked on its `go` port ([reply port,
    operation]), makes a call on the request port and answers with its result:
    "lock" takes page 1 from every task (pager_data_lock of all access: machd keeps its
    data aside, out of the object's memory, until a task touches it again), "flush"
    and "clean" are pager_flush_request and pager_clean_request of the first 4 pages,
    "lock2", "flush2" and "clean2" the same of page 2 only, and "asked" answers how
    many pages read() was asked for."""

    def pager_init(self, memory_object: int, request: int, name: int) -> None:
        super().pager_init(memory_object, request, name)
        self.request = request

    def drive(self, go: int) -> None:
        while True:
            msg = m.msg_receive(go)
            reply, op = msg.items[0].value, msg.items[1].value  # type: ignore[union-attr]
            out, page = 0, (1 if op == "lock" else 2)  # ("...2": page 2 only)
            if op in ("lock", "lock2"):
                m.pager_data_lock(self.request, page * PS, PS, m.VM_PROT_ALL)
            elif op == "asked":
                out = self.asked
            else:
                call = m.pager_flush_request if op.startswith("flush") \
                    else m.pager_clean_request
                start, size = (2 * PS, PS) if op.endswith("2") else (0, 4 * PS)
                out = call(self.request, start, size)
            m.msg_send(Message(remote_port=reply, items=[m.Int(out)]))  # type: ignore[arg-type]


def _driven(mode: str) -> Any:
    manager = Driven(mode, True)
    go = m.port_allocate(m.task_self())
    m.thread_create(m.task_self(), manager.drive, go)
    _hand_out(manager, go)
    return manager.kinds, manager.stored, manager.seen


class Client:
    """This task's side of a Driven manager: 4 pages of its object mapped, and `ask`."""

    def __init__(self, mode: str) -> None:
        self.pager = m.spawn(_driven, mode, name=f"driven-{mode}")
        me = m.task_self()
        got = _ask(self.pager)
        mo, self.go = got.items[0].value, got.items[1].value
        self.reply = m.port_allocate(me)
        self.a = m.vm_allocate_with_pager(me, 0, 4 * PS, True, mo, 0)
        assert [self.word(i) for i in range(4)] == [0, 1, 2, 3]  # (the window is taken)

    def word(self, page: int) -> int:
        return int.from_bytes(m.memory().read(self.a + page * PS, 8), "little")

    def set(self, page: int, value: int) -> None:
        m.memory().write(self.a + page * PS, value.to_bytes(8, "little"))

    def ask(self, op: str) -> int:
        m.msg_send(Message(remote_port=self.go, items=[m.Port(self.reply, m.MAKE_SEND),
                                                        m.Str(op)]))
        out: int = m.msg_receive(self.reply, m.RCV_TIMEOUT, 20_000).items[0].value  # type: ignore[union-attr,assignment]
        return out

    def end(self) -> Any:
        m.vm_deallocate(m.task_self(), self.a, 4 * PS)
        return self.pager.result(30_000)


def test_a_page_taken_from_every_task_goes_back_with_its_data(task: str) -> None:
    """A dirty page whose data machd keeps aside (taken from every task) is put back
    into the object's memory before the manager is told to read it there."""
    client = Client("take")
    client.set(1, 4321)
    client.ask("lock")  # page 1 is now kept aside by machd
    kinds, stored, _ = client.end()
    assert stored == {1: 4321} and kinds == ["window"]


def test_a_flush_goes_back_in_place_and_a_write_meanwhile_waits_for_it(task: str) -> None:
    client = Client("slow")  # (it reads a run 0.3 s after it is told of it)
    client.set(1, 111)
    assert client.ask("flush") == 1
    t0 = time.monotonic()
    client.set(1, 222)  # waits until the manager has the run (then reads it back)
    assert time.monotonic() - t0 >= 0.2
    assert client.word(1) == 222 and client.ask("asked") > 4  # (flushed: asked again)
    kinds, stored, seen = client.end()
    assert seen == [(PS, PS), (PS, PS)] and kinds == ["window", "window"]
    assert stored == {1: 222}


def test_a_lock_on_a_page_held_in_place_waits_for_the_release(task: str) -> None:
    """pager_data_lock of all access on a page of a run in place must not take its data
    out of the window (where the manager is about to read it)."""
    client = Client("slow")
    client.set(2, 555)
    assert client.ask("flush2") == 1
    client.ask("lock2")  # while the run is in place (the manager reads it 0.3 s later)
    kinds, stored, _ = client.end()
    assert stored == {2: 555} and kinds == ["window"]


def test_a_flush_of_a_page_a_clean_holds_in_place_drops_it_once_released(
        task: str) -> None:
    client = Client("slow")
    client.set(2, 333)
    assert client.ask("clean2") == 1
    client.ask("flush2")  # while the clean's run is in place: its pages go at release
    asked = client.ask("asked")
    time.sleep(0.6)  # (the manager has stored and released the run)
    assert client.word(2) == 333 and client.ask("asked") > asked  # asked again: dropped
    client.end()


def test_a_clean_keeps_the_pages_it_writes_back_in_place(task: str) -> None:
    client = Client("take")
    client.set(2, 333)
    assert client.ask("clean") == 1
    assert client.word(2) == 333 and client.ask("asked") == 4  # (kept: not asked again)
    client.set(2, 444)
    kinds, stored, seen = client.end()
    assert seen == [(2 * PS, PS), (2 * PS, PS)] and kinds == ["window", "window"]
    assert stored == {2: 444}
