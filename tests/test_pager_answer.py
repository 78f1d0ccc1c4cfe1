"""A data manager's answer goes with its next receive (pagers/data_manager.py, `_answer`).

The default pager_data_request answers last; its one-way answer (pager_data_provided or
pager_data_unavailable) is held and sent with the serving thread's next receive, in
one kernel call (msg_send_receive): in native mode one round trip to machd per request
instead of two. Checked on the embedded kernel with the kernel calls spied on: the
answer and the receive go together, the data arrive, order is kept with messages kept
for later, a refused answer is logged and serving goes on, and an overriding handler
or data out of line go at once, as before.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest

import pymach as m
from machutil import wait_until
from pymach import Message
from pymach.include.mach_defs import pager_defs
from pymach.pagers import data_manager
from pymach.pagers.data_manager import DataManager

PS = 4096
PROVIDED = pager_defs.by_name["pager_data_provided"].id
UNAVAILABLE = pager_defs.by_name["pager_data_unavailable"].id


@pytest.fixture
def k() -> Iterator[m.Kernel]:
    with m.boot() as kernel:
        yield kernel


class Calls:
    """Spies on the data manager's kernel calls (msg_send and msg_send_receive)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent: list[int] = []  # ids sent alone
        self.folded: list[int] = []  # ids sent with a receive
        send, send_receive = m.mach.msg_send, m.mach.msg_send_receive

        def spy_send(msg: Message, *a: Any) -> None:
            self.sent.append(msg.id)
            send(msg, *a)

        def spy_send_receive(msg: Message, *a: Any) -> Message:
            self.folded.append(msg.id)
            return send_receive(msg, *a)

        monkeypatch.setattr(data_manager.mach, "msg_send", spy_send)
        monkeypatch.setattr(data_manager.mach, "msg_send_receive", spy_send_receive)


class Ones(DataManager):
    threads = max_threads = 1

    def read(self, memory_object: int, offset: int, length: int, access: int) -> bytes | None:
        return None if offset >= 2 * PS else b"\1" * length


class Overriding(Ones):
    def pager_data_request(self, memory_object: int, request: int, offset: int,
                           length: int, access: int) -> None:
        super().pager_data_request(memory_object, request, offset, length, access)


def _serve(dm: DataManager) -> int:
    """A memory object of `dm`, served by a new thread of this task, mapped here."""
    mo = dm.create_memory_object()
    m.thread_create(m.task_self(), dm.serve)
    return int(m.vm_allocate_with_pager(m.task_self(), 0, 4 * PS, True, mo, 0))


def test_the_default_answer_goes_with_the_next_receive(
        k: m.Kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = Calls(monkeypatch)
    a = _serve(Ones())
    assert m.memory()[a:a + 2] == b"\1\1"  # pager_data_provided
    assert m.memory()[a + 3 * PS:a + 3 * PS + 2] == b"\0\0"  # pager_data_unavailable
    assert calls.folded == [PROVIDED, UNAVAILABLE] and calls.sent == []


def test_an_overriding_handler_answers_at_once(
        k: m.Kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = Calls(monkeypatch)
    a = _serve(Overriding())
    assert m.memory()[a:a + 2] == b"\1\1"
    assert calls.sent == [PROVIDED] and calls.folded == []


def test_data_out_of_line_go_at_once(k: m.Kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = Calls(monkeypatch)
    data_manager._answers.folding = True  # as in the default handler
    try:
        with pytest.raises(m.MachError):  # no such request port: refused at once
            data_manager._data_provided(12345, 0, m.OOL(0, 0), 0, m.VM_PROT_NONE)
    finally:
        data_manager._answers.folding = False
    assert calls.sent == [PROVIDED] and getattr(data_manager._answers, "held", None) is None


def test_a_held_answer_goes_before_a_message_kept_for_later(
        k: m.Kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = Calls(monkeypatch)
    me = m.task_self()
    dm = Ones()
    mo = dm.create_memory_object()
    sink = m.port_allocate(me)
    kept = Message(remote_port=mo, local_port=mo, id=7)
    dm._deferred.append(kept)
    data_manager._answers.held = Message(remote_port=sink, id=8)
    assert dm._next_message() is kept
    assert calls.sent == [8] and calls.folded == []
    assert m.msg_receive(sink, m.RCV_TIMEOUT, 0).id == 8


def test_a_refused_answer_is_logged_and_the_receive_made_alone(
        k: m.Kernel, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    calls = Calls(monkeypatch)
    me = m.task_self()
    dm = Ones()
    mo = dm.create_memory_object()
    gone = m.port_allocate(me)
    m.port_deallocate(me, gone)  # the kernel let go of the object: its port died
    m.msg_send(Message(remote_port=mo, id=9))
    data_manager._answers.held = Message(remote_port=gone, id=PROVIDED)
    with caplog.at_level(logging.WARNING, logger="pymach.pagers"):
        assert dm._next_message().id == 9
    assert calls.folded == [PROVIDED]
    assert "was refused" in caplog.text and data_manager._answers.held is None


def test_many_requests_in_a_row_are_each_answered(k: m.Kernel) -> None:
    a = _serve(Ones())
    view = m.memory()
    assert [view[a + i * PS] for i in range(4)] == [1, 1, 0, 0]
    m.vm_deallocate(m.task_self(), a, 4 * PS)
    b = _serve(Ones())
    wait_until(lambda: view[b + PS] == 1)


def test_the_answer_message_is_built_alike_from_positions_and_names() -> None:
    build = m.mach.oneway_message(pager_defs, "pager_data_provided")
    by_position = build(5, PS, b"\1" * 8, 8, m.VM_PROT_NONE)
    by_name = build(5, offset=PS, data=b"\1" * 8, data_count=8, lock_value=m.VM_PROT_NONE)
    assert by_position == by_name and by_position.id == PROVIDED and not by_position.local_port
    with pytest.raises(TypeError, match="missing a required argument"):
        build(5, PS, b"", 0)
    with pytest.raises(TypeError, match="too many"):
        build(5, PS, b"", 0, 0, 0)
    with pytest.raises(m.MachError, match="must be port"):
        build("5", PS, b"", 0, 0)


@pytest.mark.parametrize("data", [True, False], ids=["provided", "unavailable"])
def test_an_answer_wakes_its_faults_once_its_pages_are_settled(
        k: m.Kernel, monkeypatch: pytest.MonkeyPatch, data: bool) -> None:
    """The faults that wait for a request are woken when the answer's pages are settled,
    never before (woken before, each ran its fault again only to park again: in native
    mode a third of machd's vm_fault calls per one-page pager fault)."""
    from pymach.vm import memory_object

    seen: list[bool] = []  # at each wake-up of an object's pages during an answer: any
    answering = []  # page of the object still absent?
    wakeup = k.sched.thread_wakeup

    def spy_wakeup(waitq: Any, *a: Any) -> Any:
        for obj in list(k.vm.pager_objects.values()):
            if answering and waitq is obj.page_waitq:
                seen.append(any(p.absent for p in obj.memq.values()))
        return wakeup(waitq, *a)

    def spying(name: str) -> None:
        real = getattr(memory_object.PagerServer, name)

        def spy(self: Any, *args: Any) -> Any:
            answering.append(name)
            try:
                return real(self, *args)
            finally:
                answering.pop()
        monkeypatch.setattr(memory_object.PagerServer, name, spy)

    monkeypatch.setattr(k.sched, "thread_wakeup", spy_wakeup)
    spying("pager_data_provided")
    spying("pager_data_unavailable")
    a = _serve(Ones())
    offset = 0 if data else 3 * PS
    assert m.memory()[a + offset] == (1 if data else 0)
    assert seen and not any(seen)
