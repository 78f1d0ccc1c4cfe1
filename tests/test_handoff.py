"""Message hand-off with continuations (kern/sched_prim.py, ipc/mach_msg.py).

A receive given a Handoff parks where it would block; whoever then wakes its queue
completes it on its own thread (or hands it back to its thread when that thread must
block or unwind). The first tests drive the core directly on the embedded kernel (free
scheduler) with a recording Handoff, so each outcome and the thread it was delivered
on can be checked exactly; the last ones run the real transport, machd's.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import pymach as m
from pymach import Bytes, Int, Message
from pymach.include import traps, wire
from pymach.include.channel import Channel
from pymach.ipc.mach_msg import msg_receive_locked
from pymach.kern.sched_prim import NOT_YET, Parked, thread_cancel, thread_continue
from pymach.kern.thread import Thread, current_thread


class Recorder:
    """A Handoff that records what it is told, and on which Python thread."""

    def __init__(self) -> None:
        self.outcomes: list[Any] = []
        self.on: list[threading.Thread] = []
        self.wakes = 0

    def deliver(self, outcome: Any) -> None:
        self.outcomes.append(outcome)
        self.on.append(threading.current_thread())

    def wake(self) -> None:
        self.wakes += 1


@pytest.fixture
def k() -> Iterator[m.Kernel]:
    with m.boot() as kernel:
        yield kernel


def idle_thread(kernel: m.Kernel) -> Thread:
    """A second thread of the caller's task that never runs: the tests park it."""
    with kernel.sched.lock:
        t = kernel.thread_create_locked(current_thread().task, None, "parked", start=False)
    t.state = "running"  # as it is inside a trap
    return t


def park(kernel: m.Kernel, t: Thread, name: int, rec: Recorder, timeout: float | None = None,
         rcv_size: int = m.MSG_SIZE_MAX) -> None:
    with kernel.sched.lock, pytest.raises(Parked):
        msg_receive_locked(t, name, timeout, rcv_size, rec)


def queued(p: int) -> int:
    return int(m.port_status(m.task_self(), p)[1])


def send(p: int, msg_id: int = 1, *items: Any) -> None:
    m.msg_send(Message(remote_port=p, id=msg_id, items=list(items)), m.SEND_TIMEOUT, 0)


def test_a_send_completes_a_parked_receive_on_the_senders_thread(k: m.Kernel) -> None:
    p = m.port_allocate(m.task_self())
    t, rec = idle_thread(k), Recorder()
    park(k, t, p, rec)
    assert (t.state, t.wait_queue is not None, rec.outcomes) == ("waiting", True, [])
    send(p, 7, Int(3))
    [msg] = rec.outcomes
    assert isinstance(msg, Message) and (msg.id, msg.local_port, msg.values()) == (7, p, [3])
    assert rec.on == [threading.current_thread()] and rec.wakes == 0
    assert (t.continuation, t.wait_queue, t.state, queued(p)) == (None, None, "running", 0)


def test_a_parked_receive_takes_one_message_and_the_rest_stay_queued(k: m.Kernel) -> None:
    p = m.port_allocate(m.task_self())
    t1, t2, rec1, rec2 = idle_thread(k), idle_thread(k), Recorder(), Recorder()
    park(k, t1, p, rec1)
    park(k, t2, p, rec2)
    for n in (1, 2, 3):
        send(p, n)
    assert [x.id for x in rec1.outcomes] == [1]  # oldest parked first
    assert [x.id for x in rec2.outcomes] == [2]
    assert queued(p) == 1 and m.msg_receive(p, m.RCV_TIMEOUT, 0).id == 3


def test_backlog_holds_while_the_receiver_is_parked(k: m.Kernel) -> None:
    me = m.task_self()
    p = m.port_allocate(me)
    m.port_set_backlog(me, p, 1)
    t, rec = idle_thread(k), Recorder()
    park(k, t, p, rec)
    send(p, 1)  # taken by the parked receive at once
    send(p, 2)  # queued
    with pytest.raises(m.SendError) as e:
        send(p, 3)
    assert e.value.code == "SEND_TIMED_OUT"
    assert [x.id for x in rec.outcomes] == [1] and queued(p) == 1


def test_a_too_large_message_fails_the_parked_receive_and_stays_queued(
        k: m.Kernel) -> None:
    p = m.port_allocate(m.task_self())
    t, rec = idle_thread(k), Recorder()
    park(k, t, p, rec, rcv_size=64)
    send(p, 5, Bytes(b"x" * 200))
    [err] = rec.outcomes
    assert isinstance(err, m.MachError) and err.code == "RCV_TOO_LARGE"
    assert t.continuation is None and queued(p) == 1
    assert m.msg_receive(p, m.RCV_TIMEOUT, 0).id == 5


def test_port_death_fails_the_parked_receive(k: m.Kernel) -> None:
    p = m.port_allocate(m.task_self())
    t, rec = idle_thread(k), Recorder()
    park(k, t, p, rec)
    m.port_deallocate(m.task_self(), p)
    [err] = rec.outcomes
    assert isinstance(err, m.MachError) and err.code == "RCV_INVALID_PORT"
    assert t.continuation is None


def test_receive_rights_sent_away_fail_the_parked_receive(k: m.Kernel) -> None:
    me = m.task_self()
    p, box = m.port_allocate(me), m.port_allocate(me)
    t, rec = idle_thread(k), Recorder()
    park(k, t, p, rec)
    send(box, 1, m.Port(p, m.MOVE_RECEIVE))
    [err] = rec.outcomes
    assert isinstance(err, m.MachError) and err.code == "RCV_INVALID_PORT"


def test_a_parked_group_receive_is_completed_when_a_port_is_enabled(k: m.Kernel) -> None:
    me = m.task_self()
    p = m.port_allocate(me)
    send(p, 9)
    t, rec = idle_thread(k), Recorder()
    park(k, t, m.PORT_NULL, rec)  # nothing enabled yet
    assert rec.outcomes == []
    m.port_enable(me, p)
    [msg] = rec.outcomes
    assert (msg.id, msg.local_port) == (9, p) and queued(p) == 0


def test_termination_hands_the_parked_receive_back_to_its_thread(k: m.Kernel) -> None:
    p = m.port_allocate(m.task_self())
    t, rec = idle_thread(k), Recorder()
    park(k, t, p, rec)
    with k.sched.lock:
        k.thread_terminate_locked(t)
    assert (rec.wakes, rec.outcomes) == (1, [])
    send(p, 1)  # nobody takes it: the thread is unwinding
    assert queued(p) == 1 and rec.outcomes == []
    with pytest.raises(m.ThreadTerminated):
        thread_continue(t)
    assert t.continuation is None and queued(p) == 1


def test_a_suspended_thread_takes_its_message_on_its_own_thread(k: m.Kernel) -> None:
    p = m.port_allocate(m.task_self())
    t, rec = idle_thread(k), Recorder()
    park(k, t, p, rec)
    t.suspend_count = 1
    send(p, 4)
    assert (rec.wakes, rec.outcomes, queued(p)) == (1, [], 1)  # handed back, not taken
    t.suspend_count = 0  # (resumed before it ran: its exit does not wait)
    msg = thread_continue(t)
    assert isinstance(msg, Message) and msg.id == 4 and queued(p) == 0


def test_a_parked_receive_times_out_only_on_its_own_thread(k: m.Kernel) -> None:
    p = m.port_allocate(m.task_self())
    t, rec = idle_thread(k), Recorder()
    with k.sched.lock, pytest.raises(m.RcvError):  # no wait at all: no park
        msg_receive_locked(t, p, 0, m.MSG_SIZE_MAX, rec)
    park(k, t, p, rec, timeout=60_000)
    assert thread_continue(t) is NOT_YET  # its deadline is far: it stays parked
    assert t.continuation is not None
    with k.sched.lock:
        thread_cancel(t)
    park(k, t, p, rec, timeout=1)
    deadline = t.continuation.deadline  # type: ignore[union-attr]
    while k.sched.now() < deadline:
        pass
    with pytest.raises(m.RcvError) as e:
        thread_continue(t)
    assert e.value.code == "RCV_TIMED_OUT" and rec.outcomes == [] and rec.wakes == 0


def test_a_cancelled_park_takes_nothing(k: m.Kernel) -> None:
    p = m.port_allocate(m.task_self())
    t, rec = idle_thread(k), Recorder()
    park(k, t, p, rec)
    with k.sched.lock:
        thread_cancel(t)
    send(p, 1)
    assert rec.outcomes == [] and queued(p) == 1 and thread_continue(t) is NOT_YET


def test_the_deterministic_scheduler_never_parks() -> None:
    with m.boot(deterministic=True, seed=3) as k:
        p = m.port_allocate(m.task_self())
        me, rec = current_thread(), Recorder()
        with k.sched.lock, pytest.raises(m.RcvError) as e:  # it blocks (in virtual
            msg_receive_locked(me, p, 5, m.MSG_SIZE_MAX, rec)  # time) and times out
        assert e.value.code == "RCV_TIMED_OUT"
        assert me.continuation is None and rec.outcomes == [] and rec.wakes == 0


# -- the channel's write that never blocks -----------------------------------------------
def test_send_nowait_sends_what_fits_and_leaves_the_rest() -> None:
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ca, cb = Channel(a), Channel(b)
    try:
        big = [Bytes(b"y" * (1 << 20))]
        rest = ca.send_nowait(traps.REPLY, [0, Message(1, 2, 3, big), "", "", 0, 0, []])
        assert rest  # the socket took part of it
        got: list[Any] = []
        reader = threading.Thread(target=lambda: got.append(cb.recv()))
        reader.start()
        ca.send_rest(rest)
        reader.join(10)
        assert got and got[0].values[1].items[0].value == b"y" * (1 << 20)
        while ca.send_nowait(traps.REPLY, [b"z" * 4096]) is not None:
            pass  # fill the socket: then nothing goes, descriptors included
        r, w = os.pipe()
        try:
            assert ca.send_nowait(traps.REPLY, [1], [r]) is None
        finally:
            os.close(r)
            os.close(w)
        with pytest.raises(wire.WireError):
            ca.send_nowait(traps.REPLY, [object()])
    finally:
        ca.close()
        cb.close()


# -- the real transport: machd ----------------------------------------------------------
def _echo_server(rounds: int) -> None:
    svc = m.msg_receive(m.task_notify()).items[0].name  # type: ignore[union-attr]
    msg = m.msg_receive(svc)
    for _ in range(rounds - 1):
        msg = m.msg_send_receive(Message(remote_port=msg.remote_port, id=msg.id,
                                         items=msg.items), svc)
    m.msg_send(Message(remote_port=msg.remote_port, id=msg.id, items=msg.items))


def _give_receive_right(h: Any, svc: int) -> None:
    notify = m.task_get_special_port(h.port, m.TASK_NOTIFY_PORT)
    m.msg_send(Message(remote_port=notify, items=[m.Port(svc, m.MOVE_RECEIVE)]))


def test_native_rpcs_through_parked_receives_keep_their_order(native: str) -> None:
    me = m.task_self()
    svc, reply = m.port_allocate(me), m.port_allocate(me)
    h = m.spawn(_echo_server, 200, name="echo")
    _give_receive_right(h, svc)
    for n in range(200):
        got = m.msg_rpc(Message(remote_port=svc, local_port=reply, id=n, items=[Int(n)]),
                        m.RCV_TIMEOUT, m.MSG_SIZE_MAX, None, 10_000)
        assert (got.id, got.values()) == (n, [n])
    h.result(10_000)


def _sink(count: int) -> list[int]:
    box = m.msg_receive(m.task_notify()).items[0].name  # type: ignore[union-attr]
    p = m.port_allocate(m.task_self())
    m.msg_send(Message(remote_port=box, items=[m.Port(p, m.MAKE_SEND)]))
    return [m.msg_receive(p, m.RCV_TIMEOUT, 10_000).id for _ in range(count)]


def test_native_one_way_messages_to_a_parked_receiver_arrive_in_order(native: str) -> None:
    me = m.task_self()
    box = m.port_allocate(me)
    h = m.spawn(_sink, 300, name="sink")
    notify = m.task_get_special_port(h.port, m.TASK_NOTIFY_PORT)
    m.msg_send(Message(remote_port=notify, items=[m.Port(box, m.MAKE_SEND)]))
    p = m.msg_receive(box, m.RCV_TIMEOUT, 10_000).items[0].name  # type: ignore[union-attr]
    for n in range(300):  # the default backlog makes the sender wait now and then
        m.msg_send(Message(remote_port=p, id=n), m.SEND_TIMEOUT, 10_000)
    assert h.result(10_000) == list(range(300))


def _ool_reader() -> int:
    svc = m.msg_receive(m.task_notify()).items[0].name  # type: ignore[union-attr]
    msg = m.msg_receive(svc, m.RCV_TIMEOUT, 10_000)  # parked until the region comes
    region = msg.items[0]
    assert isinstance(region, m.OOL)
    data = m.vm_read(m.task_self(), region.address, region.size)
    return sum(data)


def test_native_out_of_line_memory_reaches_a_parked_receiver(native: str) -> None:
    me = m.task_self()
    svc = m.port_allocate(me)
    h = m.spawn(_ool_reader, name="ool-reader")
    _give_receive_right(h, svc)
    size = 8 * 4096
    a = m.vm_allocate(me, 0, size, True)
    m.vm_write(me, a, b"\x02" * size)
    m.msg_send(Message(remote_port=svc, items=[m.OOL(a, size)]))
    assert h.result(10_000) == 2 * size


def _two_thread_server() -> int:
    """Two threads receive on one port (both parked, mostly) and answer each request;
    each stops at a request with a negative id. Returns how many requests were served."""
    svc = m.msg_receive(m.task_notify()).items[0].name  # type: ignore[union-attr]
    served: list[int] = []
    stopped: list[int] = []

    def serve() -> None:
        while True:
            msg = m.msg_receive(svc, m.RCV_TIMEOUT, 10_000)
            if msg.id < 0:
                stopped.append(1)
                return
            served.append(msg.id)
            m.msg_send(Message(remote_port=msg.remote_port, id=msg.id,
                               items=[Int(msg.id * 2)]))

    m.thread_create(m.task_self(), serve)
    serve()
    idle = m.port_allocate(m.task_self())
    for _ in range(1000):  # the task ends with this thread: let the other one finish
        if len(stopped) == 2:
            break
        with contextlib.suppress(m.RcvError):
            m.msg_receive(idle, m.RCV_TIMEOUT, 5)
    return len(served)


def _client(first: int, count: int) -> list[int]:
    svc = m.msg_receive(m.task_notify()).items[0].name  # type: ignore[union-attr]
    reply = m.port_allocate(m.task_self())
    out = []
    for n in range(first, first + count):
        got = m.msg_rpc(Message(remote_port=svc, local_port=reply, id=n), m.RCV_TIMEOUT,
                        m.MSG_SIZE_MAX, None, 10_000)
        assert got.id == n
        out.append(got.values()[0])
    return out


def test_native_clients_and_server_threads_all_parked_at_once(native: str) -> None:
    me = m.task_self()
    svc = m.port_allocate(me)
    server = m.spawn(_two_thread_server, name="two-threads")
    _give_receive_right(server, svc)
    clients = [m.spawn(_client, 1000 * k, 100, name=f"client{k}") for k in (1, 2, 3)]
    for h in clients:  # each gets a send right to the service port
        notify = m.task_get_special_port(h.port, m.TASK_NOTIFY_PORT)
        m.msg_send(Message(remote_port=notify, items=[m.Port(svc, m.COPY_SEND)]))
    for k, h in zip((1, 2, 3), clients, strict=True):
        assert h.result(30_000) == [2 * n for n in range(1000 * k, 1000 * k + 100)]
    for _ in range(2):  # one stop for each server thread
        m.msg_send(Message(remote_port=svc, id=-1))
    assert server.result(30_000) == 300


def test_a_reply_the_socket_cannot_take_at_once_is_finished_by_its_own_thread(
        k: m.Kernel) -> None:
    from pymach.machd.remote import RemoteState, TrapHandoff, _flush

    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    conn, peer = Channel(a), Channel(b)
    state = RemoteState(0)
    try:
        handoff = TrapHandoff(idle_thread(k), conn, state)
        big = Message(1, 2, 3, [Bytes(b"q" * (1 << 20))])
        with k.sched.lock:  # as a completing sender does
            handoff.deliver(big)
            handoff.deliver(m.MachError("RCV_TOO_LARGE", "stays queued"))
        assert len(state.outgoing) == 2 and os.read(state.wake_r, 16)  # kicked
        got: list[Any] = []
        reader = threading.Thread(target=lambda: got.extend((peer.recv(), peer.recv())))
        reader.start()
        _flush(conn, state)  # the kernel thread writes the rest, in order
        reader.join(10)
        assert [f.values[0] for f in got] == [traps.REPLY_OK, traps.REPLY_ERROR]
        assert got[0].values[1].items[0].value == b"q" * (1 << 20)
        assert got[1].values[2] == "RCV_TOO_LARGE" and not state.outgoing
    finally:
        conn.close()
        peer.close()
        state.close()
