"""Direct channels between native tasks (issue 10, item 1): messages that skip machd.

A thread that sends a few data-only messages to another native task's port gets a
direct channel from machd (machd/channels.py, libmach/direct.py). These tests check that
channels are used, and that Mach's semantics hold across them: per-sender order (also
when messages that need machd are mixed in), backlog and port_status, the receive right
moving away with messages still on a channel, port death, RCV_TOO_LARGE and timeouts,
suspension and termination of a thread waiting on a channel, and a channel that carries
garbage. The packet decoder's bounds are tested apart.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pymach as m
from nativeutil import start_machd, stop_machd, uffd_or_skip
from pymach import MAKE_SEND, MOVE_RECEIVE, Int, Message, Port
from pymach.errors import MachError
from pymach.include import direct, traps, wire
from pymach.include.message import OOL, Bytes, Code, Float, IntArray, Str
from pymach.kern.thread import current_thread
from pymach.libmach.direct import LocalReceive, take_frame
from pymach.libmach.task import attach, detach
from pymach.machd import channels
from pymach.machd.channels import discard_rest, take_all

GO, DONE = 1, 2


def _channels() -> dict[int, object]:
    return current_thread().process.senders.channels  # type: ignore[attr-defined, no-any-return]


def _receivers() -> dict[int, object]:
    return current_thread().process.receivers.ports  # type: ignore[attr-defined, no-any-return]


def _echo(svc_box: int) -> list[int]:
    """A server: takes its port from `svc_box`'s first message, echoes id + 100 with the
    items until id DONE; returns the ids it saw."""
    me = m.task_self()
    svc = m.port_allocate(me)
    m.msg_send(Message(remote_port=svc_box, items=[Port(svc, MAKE_SEND)]))
    seen: list[int] = []
    while True:
        msg = m.msg_receive(svc, m.RCV_TIMEOUT, 20_000)
        seen.append(msg.id)
        if msg.id == DONE:
            return seen
        if msg.remote_port:
            m.msg_send(Message(remote_port=msg.remote_port, id=msg.id + 100, items=msg.items))


def _server() -> tuple[object, int]:
    me = m.task_self()
    box = m.port_allocate(me)
    h = m.spawn(_echo, Port(box, MAKE_SEND), name="echo")
    svc = m.msg_receive(box, m.RCV_TIMEOUT, 20_000).items[0].name  # type: ignore[union-attr]
    return h, svc


def test_rpcs_go_over_a_channel_in_order(native: str) -> None:
    h, svc = _server()
    reply = m.port_allocate(m.task_self())
    for i in range(10, 40):
        r = m.msg_rpc(Message(remote_port=svc, local_port=reply, id=i,
                              items=[Int(i), Str("x" * i), Bytes(b"b")]), m.RCV_TIMEOUT,
                      receive_timeout=20_000)
        assert (r.id, r.values()) == (i + 100, [i, "x" * i, b"b"])
        assert r.local_port == reply and r.sender_uid is not None
    assert svc in _channels()  # ours to the server's port
    assert reply in _receivers()  # the server's to our reply port
    m.msg_send(Message(remote_port=svc, id=DONE))
    assert h.result(20_000) == [*range(10, 40), DONE]  # type: ignore[attr-defined]


def test_a_thread_keeps_one_poll_set_a_port_and_lets_it_go(native: str) -> None:
    """The poll object a receiving thread keeps for a port's channels is the port's as
    it is now (made again once its channels changed), and let go, with the port's
    doorbell, once the port has no channels left."""
    reply = m.port_allocate(m.task_self())
    pollers = current_thread()._pollers  # type: ignore[attr-defined]
    kept = []
    for _ in range(2):
        h, svc = _server()
        for i in range(5):
            m.msg_rpc(Message(remote_port=svc, local_port=reply, id=10 + i), m.RCV_TIMEOUT,
                      receive_timeout=20_000)
        ps = pollers[reply]
        assert ps.receiver is _receivers()[reply] and ps.bell is ps.receiver.bell
        assert ps.generation == ps.receiver.generation
        kept.append(ps)
        m.msg_send(Message(remote_port=svc, id=DONE))
        h.result(20_000)  # type: ignore[attr-defined]
        deadline = time.monotonic() + 20
        while reply in _receivers() and time.monotonic() < deadline:
            with contextlib.suppress(MachError):  # (the channel's end is seen, and the
                m.msg_receive(reply, m.RCV_TIMEOUT, 200)  # receive goes to machd)
        assert reply not in _receivers() and reply not in pollers
    assert kept[0].receiver is not kept[1].receiver and kept[0].bell is not kept[1].bell


def _oob_sender(dest: int, box: int) -> int:
    """Send 0..2 (the third on a channel), then one out-of-band byte on the channel;
    after a message on a port given to `box`, send 99."""
    ctl = m.port_allocate(m.task_self())
    m.msg_send(Message(remote_port=box, items=[Port(ctl, MAKE_SEND)]))
    for i in range(3):
        m.msg_send(Message(remote_port=dest, id=i))
    ch = _channels()[dest]
    ch.sock.send(b"x", socket.MSG_OOB)  # type: ignore[attr-defined]
    m.msg_receive(ctl, m.RCV_TIMEOUT, 60_000)
    m.msg_send(Message(remote_port=dest, id=99))
    return 0


def test_an_out_of_band_byte_is_garbage_not_a_spin(native: str) -> None:
    """(A review's finding, from before the fast paths) A sender's MSG_OOB byte on its
    channel made the receiver's channel poll readable for ever while a read found
    nothing: a receive with a timeout spun at full CPU until the sender wrote again.
    The byte now arrives inline (SO_OOBINLINE on both ends): garbage, the channel is
    torn down, the receive times out on time, and what the sender sends next arrives."""
    a, b = socket.socketpair()
    try:
        a.send(b"x", socket.MSG_OOB)
    except OSError:
        pytest.skip("this kernel has no out-of-band data on Unix sockets (AF_UNIX_OOB)")
    finally:
        a.close()
        b.close()
    me = m.task_self()
    p, box = m.port_allocate(me), m.port_allocate(me)
    h = m.spawn(_oob_sender, Port(p, MAKE_SEND), Port(box, MAKE_SEND), name="oob")
    ctl = m.msg_receive(box, m.RCV_TIMEOUT, 20_000).items[0].name  # type: ignore[union-attr]
    assert [m.msg_receive(p, m.RCV_TIMEOUT, 20_000).id for _ in range(3)] == [0, 1, 2]
    time.sleep(0.3)  # (the byte is on the channel)
    t0, c0 = time.monotonic(), time.process_time()
    with pytest.raises(MachError) as e:
        m.msg_receive(p, m.RCV_TIMEOUT, 300)
    wall, cpu = time.monotonic() - t0, time.process_time() - c0
    assert e.value.code == "RCV_TIMED_OUT" and wall < 3 and cpu < 1, (wall, cpu)
    m.msg_send(Message(remote_port=ctl, id=DONE))
    assert m.msg_receive(p, m.RCV_TIMEOUT, 20_000).id == 99
    assert h.result(20_000) == 0  # type: ignore[attr-defined]


def test_a_port_named_by_an_int_subclass_is_received_on_from_its_channels(
        native: str) -> None:
    """(A review's finding, pre-existing) A program may name its ports with an IntEnum;
    a receive on such a name of a port with channels took the machd path and timed out
    while the message waited on the channel."""
    import enum

    h, svc = _server()
    reply = m.port_allocate(m.task_self())
    for i in range(3):  # (channels both ways)
        m.msg_rpc(Message(remote_port=svc, local_port=reply, id=10 + i), m.RCV_TIMEOUT,
                  receive_timeout=20_000)
    assert reply in _receivers()
    names = enum.IntEnum("Names", {"REPLY": reply})
    m.msg_send(Message(remote_port=svc, local_port=reply, id=20))
    assert m.msg_receive(names.REPLY, m.RCV_TIMEOUT, 5_000).id == 120
    got = m.msg_rpc(Message(remote_port=svc, local_port=names.REPLY, id=21), m.RCV_TIMEOUT,
                    receive_timeout=5_000)
    assert got.id == 121
    got = m.msg_send_receive(Message(remote_port=svc, local_port=reply, id=22), names.REPLY,
                             m.RCV_TIMEOUT, receive_timeout=5_000)
    assert got.id == 122
    m.msg_send(Message(remote_port=svc, id=DONE))
    h.result(20_000)  # type: ignore[attr-defined]


def _collect(box: int, n: int) -> list[list[object]]:
    """Receive n messages on a new port (sent to `box`) after a GO; return (id, values)."""
    me = m.task_self()
    p = m.port_allocate(me)
    m.msg_send(Message(remote_port=box, items=[Port(p, MAKE_SEND)]))
    m.msg_receive(p, m.RCV_TIMEOUT, 20_000)  # GO
    got: list[list[object]] = []
    for _ in range(n):
        msg = m.msg_receive(p, m.RCV_TIMEOUT, 20_000)
        kinds = [type(i).__name__ for i in msg.items]
        got.append([msg.id, kinds])
        if msg.id == GO:  # the next batch may come: say so
            m.msg_send(Message(remote_port=msg.remote_port, id=GO))
    return got


def test_messages_that_need_machd_keep_their_order(native: str) -> None:
    me = m.task_self()
    box = m.port_allocate(me)
    n = 24
    h = m.spawn(_collect, Port(box, MAKE_SEND), n, name="collect")
    dest = m.msg_receive(box, m.RCV_TIMEOUT, 20_000).items[0].name  # type: ignore[union-attr]
    ack = m.port_allocate(me)
    m.msg_send(Message(remote_port=dest, id=GO))
    expect = []
    for i in range(10, 10 + n):
        items: list[object] = [Int(i)]
        if i % 5 == 0:  # a right: through machd, after what is on the channel
            items.append(Port(m.port_allocate(me), MAKE_SEND))
        elif i % 7 == 0:
            items.append(OOL(data=b"z" * 100))
        m.msg_send(Message(remote_port=dest, id=i, items=items),  # type: ignore[arg-type]
                   m.SEND_TIMEOUT, 20_000)
        expect.append([i, [type(x).__name__ for x in items]])
    del ack
    got = h.result(30_000)  # type: ignore[attr-defined]
    assert [g[0] for g in got] == list(range(10, 10 + n))
    assert got == expect


def _collect_replies(box: int, n: int) -> list[tuple[int, bool]]:
    """Receive n messages on a new port; return (id, has a reply port) of each."""
    me = m.task_self()
    p = m.port_allocate(me)
    m.msg_send(Message(remote_port=box, items=[Port(p, MAKE_SEND)]))
    return [(msg.id, bool(msg.remote_port)) for msg in
            (m.msg_receive(p, m.RCV_TIMEOUT, 20_000) for _ in range(n))]


def _send_from_thread(dest: int, ids: list[int], done: int) -> None:
    reply = m.port_allocate(m.task_self())
    for i in ids:
        m.msg_send(Message(remote_port=dest, local_port=reply, id=i))
    m.msg_send(Message(remote_port=done, id=DONE))


def test_a_tasks_threads_share_its_channel_in_order(native: str) -> None:
    me = m.task_self()
    h, _box, (dest,) = _spawn_boxed(lambda b: _collect_replies(b, 30), "replies")
    mine = m.port_allocate(me)
    for i in range(10):  # a channel, bound to our reply port
        m.msg_send(Message(remote_port=dest, local_port=mine, id=i))
    done = m.port_allocate(me)
    m.thread_create(me, _send_from_thread, dest, list(range(10, 20)), done)
    assert m.msg_receive(done, m.RCV_TIMEOUT, 20_000).id == DONE  # another reply port
    for i in range(20, 30):  # no reply port
        m.msg_send(Message(remote_port=dest, id=i))
    assert len(_channels()[dest].bound) == 2  # type: ignore[attr-defined]  # both replies
    got = h.result(20_000)  # type: ignore[attr-defined]
    assert got == [(i, i < 20) for i in range(30)]


def _hold(box: int) -> tuple[list[int], int]:
    """Make a port, hand a send right out, wait for GO on a second port, then report the
    port's message count and receive everything (RCV_TIMEOUT 0 at the end)."""
    me = m.task_self()
    p, ctl = m.port_allocate(me), m.port_allocate(me)
    m.msg_send(Message(remote_port=box, items=[Port(p, MAKE_SEND), Port(ctl, MAKE_SEND)]))
    for _ in range(2):  # two messages, taken at once: the sender then asks for a channel
        m.msg_receive(p, m.RCV_TIMEOUT, 20_000)
    m.msg_send(Message(remote_port=box, id=GO))
    m.msg_receive(ctl, m.RCV_TIMEOUT, 20_000)
    count = m.port_status(me, p)[1]
    ids = []
    while True:
        try:
            ids.append(m.msg_receive(p, m.RCV_TIMEOUT, 0).id)
        except m.MachError as e:
            assert e.code == "RCV_TIMED_OUT"
            return ids, count


def _spawn_boxed(fn: object, name: str) -> tuple[object, int, list[int]]:
    """Spawn fn(box) and return (its handle, box, the names of its first message)."""
    box = m.port_allocate(m.task_self())
    h = m.spawn(fn, Port(box, MAKE_SEND), name=name)  # type: ignore[arg-type]
    return h, box, m.msg_receive(box, m.RCV_TIMEOUT, 20_000).values()


def test_backlog_and_port_status_count_the_channel(native: str) -> None:
    h, box, (p, ctl) = _spawn_boxed(_hold, "hold")
    for i in range(2):
        m.msg_send(Message(remote_port=p, id=i))
    assert m.msg_receive(box, m.RCV_TIMEOUT, 20_000).id == GO  # both taken
    sent = []
    for i in range(10, 30):
        try:
            m.msg_send(Message(remote_port=p, id=i), m.SEND_TIMEOUT, 0)
        except m.MachError as e:
            assert e.code == "SEND_TIMED_OUT"
            break
        sent.append(i)
    assert p in _channels()
    assert sent == list(range(10, 10 + m.PORT_BACKLOG_DEFAULT))  # the port's backlog
    m.msg_send(Message(remote_port=ctl, id=GO))
    ids, count = h.result(20_000)  # type: ignore[attr-defined]
    assert count == m.PORT_BACKLOG_DEFAULT
    assert ids == sent


def _send_one(dest: int, done: int) -> None:
    try:
        m.msg_send(Message(remote_port=dest, id=77))  # blocks: the port is full
        outcome = "sent"
    except m.MachError as e:
        outcome = e.code
    m.msg_send(Message(remote_port=done, id=DONE, items=[Str(outcome)]))


def test_a_sender_waiting_for_room_is_suspended_and_terminated(native: str) -> None:
    me = m.task_self()
    h, box, (p, ctl) = _spawn_boxed(_hold, "hold")
    for i in range(2):
        m.msg_send(Message(remote_port=p, id=i))
    assert m.msg_receive(box, m.RCV_TIMEOUT, 20_000).id == GO
    for i in range(10, 10 + m.PORT_BACKLOG_DEFAULT):  # the port is full
        m.msg_send(Message(remote_port=p, id=i), m.SEND_TIMEOUT, 20_000)
    assert p in _channels()
    done = m.port_allocate(me)
    t = m.thread_create(me, _send_one, p, done)
    m.thread_terminate(t)  # waiting for room, or before it began: it ends
    with pytest.raises(m.MachError):
        m.thread_info(t)
    t2 = m.thread_create(me, _send_one, p, done)
    m.thread_suspend(t2)
    m.msg_send(Message(remote_port=ctl, id=GO))  # the holder takes everything, and ends
    ids, _ = h.result(20_000)  # type: ignore[attr-defined]
    assert ids == list(range(10, 10 + m.PORT_BACKLOG_DEFAULT))  # nothing of t's or t2's
    while True:  # (the result comes before the holder's end: wait for its port's death)
        note = m.msg_receive(m.task_notify(), m.RCV_TIMEOUT, 20_000)
        if note.id == m.NOTIFY_PORT_DELETED and note.values() == [p]:
            break
    m.thread_resume(t2)  # its port died while it waited: the send fails, as in Mach
    assert m.msg_receive(done, m.RCV_TIMEOUT, 20_000).values() == ["SEND_INVALID_PORT"]


def _take_3_then(box: int) -> int:
    """Make a port and a control port, send `box` rights to both, take 3 messages on the
    port, wait for GO on the control port; the port's name."""
    me = m.task_self()
    p, ctl = m.port_allocate(me), m.port_allocate(me)
    m.msg_send(Message(remote_port=box, items=[Port(p, MAKE_SEND), Port(ctl, MAKE_SEND)]))
    for _ in range(3):
        m.msg_receive(p, m.RCV_TIMEOUT, 20_000)
    m.msg_receive(ctl, m.RCV_TIMEOUT, 20_000)  # GO
    return p  # type: ignore[no-any-return]


def _receive_then_move(box: int) -> int:
    """Take 3 messages on a port, then (after GO) move its receive right to `box`'s
    sender without receiving what else came."""
    p = _take_3_then(box)
    m.msg_send(Message(remote_port=box, id=DONE, items=[Port(p, MOVE_RECEIVE)]))
    return 0


def test_receive_right_moves_with_what_is_on_the_channel(native: str) -> None:
    h, box, p, ctl = _after_three(_receive_then_move, "mover")
    for i in range(10, 14):  # on the channel, not received by the mover
        m.msg_send(Message(remote_port=p, id=i, items=[Int(i)]), m.SEND_TIMEOUT, 20_000)
    assert p in _channels()
    m.msg_send(Message(remote_port=ctl, id=GO))
    moved = m.msg_receive(box, m.RCV_TIMEOUT, 20_000)
    assert moved.items[0].name == p  # type: ignore[union-attr]
    assert h.result(20_000) == 0  # type: ignore[attr-defined]
    ids = [m.msg_receive(p, m.RCV_TIMEOUT, 0).id for _ in range(4)]
    assert ids == [10, 11, 12, 13]
    m.msg_send(Message(remote_port=p, id=99))  # to our own port now: through machd
    assert m.msg_receive(p, m.RCV_TIMEOUT, 0).id == 99


def _after_three(fn: object, name: str) -> tuple[object, int, int, int]:
    """Spawn fn(box) (_take_3_then's kind) and send it its 3 messages (a channel
    follows): (its handle, box, its port, its control port)."""
    h, box, (p, ctl) = _spawn_boxed(fn, name)
    for i in range(3):
        m.msg_send(Message(remote_port=p, id=i))
    return h, box, p, ctl


def test_held_messages_keep_their_place_and_move_with_the_port(native: str) -> None:
    me = m.task_self()
    h, box, p, ctl = _after_three(_receive_then_move, "mover")
    q = m.port_allocate(me)
    mixed: list[list[object]] = [[Int(10)], [Port(q, MAKE_SEND)], [Int(12)],
                                 [OOL(data=b"hello")], [Int(14)]]
    for i, items in enumerate(mixed):  # rights and memory: held by machd, in their place
        m.msg_send(Message(remote_port=p, id=10 + i, items=items))  # type: ignore[arg-type]
    assert p in _channels()
    m.msg_send(Message(remote_port=ctl, id=GO))
    assert m.msg_receive(box, m.RCV_TIMEOUT, 20_000).id == DONE  # the receive right
    assert h.result(20_000) == 0  # type: ignore[attr-defined]
    got = [m.msg_receive(p, m.RCV_TIMEOUT, 0) for _ in mixed]
    assert [g.id for g in got] == [10, 11, 12, 13, 14]
    assert got[1].items[0].name == q  # type: ignore[union-attr]  # the right, ours again
    ool = got[3].items[0]
    assert isinstance(ool, OOL) and m.vm_read(me, ool.address, 5) == b"hello"


def _sender_of_three(fn: object, name: str) -> tuple[object, int, int]:
    """Spawn fn(port, box), a sender of 3 messages to a port of ours that gives `box` a
    control port, and take the 3: (its handle, the port, its control port)."""
    me = m.task_self()
    p, box = m.port_allocate(me), m.port_allocate(me)
    h = m.spawn(fn, Port(p, MAKE_SEND), Port(box, MAKE_SEND), name=name)  # type: ignore[arg-type]
    ctl = m.msg_receive(box, m.RCV_TIMEOUT, 20_000).items[0].name  # type: ignore[union-attr]
    assert [m.msg_receive(p, m.RCV_TIMEOUT, 20_000).id for _ in range(3)] == [0, 1, 2]
    return h, p, ctl


def _send_then_held(dest: int, box: int) -> int:
    """Send 3 messages (a channel follows), then one machd holds, then one more; end
    after DONE on a port given to `box` (the channel lives until then)."""
    ctl = m.port_allocate(m.task_self())
    m.msg_send(Message(remote_port=box, items=[Port(ctl, MAKE_SEND)]))
    for i in range(3):
        m.msg_send(Message(remote_port=dest, id=i))
    m.msg_send(Message(remote_port=dest, id=3, items=[Port(dest, m.COPY_SEND)]))
    m.msg_send(Message(remote_port=dest, id=4))
    return m.msg_receive(ctl, m.RCV_TIMEOUT, 20_000).id


def test_a_held_message_too_large_stays_first(native: str) -> None:
    h, p, ctl = _sender_of_three(_send_then_held, "holder")
    assert p in _receivers()
    with pytest.raises(m.MachError) as e:
        m.msg_receive(p, m.RCV_TIMEOUT, 20_000, rcv_size=8)
    assert e.value.code == "RCV_TOO_LARGE"
    held = m.msg_receive(p, m.RCV_TIMEOUT, 20_000)
    assert (held.id, held.items[0].name) == (3, p)  # type: ignore[union-attr]
    assert m.msg_receive(p, m.RCV_TIMEOUT, 20_000).id == 4
    m.msg_send(Message(remote_port=ctl, id=DONE))
    assert h.result(20_000) == DONE  # type: ignore[attr-defined]


def _receive_3_then_die(box: int) -> int:
    p = _take_3_then(box)
    m.port_deallocate(m.task_self(), p)  # with a held message still unclaimed
    return 0


def test_a_held_message_dies_with_its_port_and_releases_its_rights(native: str) -> None:
    me = m.task_self()
    h, _box, p, ctl = _after_three(_receive_3_then_die, "dier")
    q = m.port_allocate(me)
    m.msg_send(Message(remote_port=p, id=3, items=[Port(q, MOVE_RECEIVE)]))  # held
    assert p in _channels()
    m.msg_send(Message(remote_port=ctl, id=GO))
    assert h.result(20_000) == 0  # type: ignore[attr-defined]
    notes = {}
    for _ in range(2):
        note = m.msg_receive(m.task_notify(), m.RCV_TIMEOUT, 20_000)
        notes[note.id] = note.values()
    assert notes == {m.NOTIFY_PORT_DELETED: [p], m.NOTIFY_RECEIVE_RIGHTS: [q]}
    assert m.port_status(me, q)[3:] == (True, True)  # q's receive right came back to us


def _receive_then_die(box: int) -> int:
    me = m.task_self()
    p = m.port_allocate(me)
    m.msg_send(Message(remote_port=box, items=[Port(p, MAKE_SEND)]))
    for _ in range(4):
        m.msg_receive(p, m.RCV_TIMEOUT, 20_000)
    m.port_deallocate(me, p)  # receiver and owner: the port dies
    return 0


def test_port_death_reaches_a_sender_with_a_channel(native: str) -> None:
    me = m.task_self()
    box = m.port_allocate(me)
    h = m.spawn(_receive_then_die, Port(box, MAKE_SEND), name="dier")
    p = m.msg_receive(box, m.RCV_TIMEOUT, 20_000).items[0].name  # type: ignore[union-attr]
    for i in range(4):
        m.msg_send(Message(remote_port=p, id=i))
    assert h.result(20_000) == 0  # type: ignore[attr-defined]
    note = m.msg_receive(m.task_notify(), m.RCV_TIMEOUT, 20_000)
    assert note.id == m.NOTIFY_PORT_DELETED and note.values() == [p]
    with pytest.raises(m.MachError) as e:
        m.msg_send(Message(remote_port=p, id=5))
    assert e.value.code == "SEND_INVALID_PORT"


def _send_n(dest: int, ids: list[int], items: list[object]) -> int:
    for i in ids:
        m.msg_send(Message(remote_port=dest, id=i, items=items),  # type: ignore[arg-type]
                   m.SEND_TIMEOUT, 20_000)
    return len(ids)


def _port_with_channel(me: int, n: int = 3) -> tuple[int, object]:
    """A port of ours to which a spawned task sent `n` messages (taken here)."""
    p = m.port_allocate(me)
    h = m.spawn(_send_n, Port(p, MAKE_SEND), list(range(n)), [], name="sender")
    for i in range(n):
        assert m.msg_receive(p, m.RCV_TIMEOUT, 20_000).id == i
    h.result(20_000)  # type: ignore[attr-defined]
    return p, h


def test_rcv_too_large_and_timeout_on_a_channel(native: str) -> None:
    me = m.task_self()
    p = m.port_allocate(me)
    h = m.spawn(_send_n, Port(p, MAKE_SEND), [0, 1, 2, 3], [Bytes(b"x" * 1000)],
                name="sender")
    assert h.result(20_000) == 4  # type: ignore[attr-defined]
    assert [m.msg_receive(p, m.RCV_TIMEOUT, 20_000).id for _ in range(2)] == [0, 1]
    # (the sender ended: what it left on its channel went into the port's queue)
    with pytest.raises(m.MachError) as e:
        m.msg_receive(p, m.RCV_TIMEOUT, 20_000, rcv_size=100)
    assert e.value.code == "RCV_TOO_LARGE"
    assert [m.msg_receive(p, m.RCV_TIMEOUT, 20_000).id for _ in range(2)] == [2, 3]
    with pytest.raises(m.MachError) as e:
        m.msg_receive(p, m.RCV_TIMEOUT, 50)
    assert e.value.code == "RCV_TIMED_OUT"


def _sender_that_waits(dest: int, ctl_box: int) -> int:
    """Send 3 messages to `dest` (a channel follows), then send one more on each GO."""
    me = m.task_self()
    ctl = m.port_allocate(me)
    m.msg_send(Message(remote_port=ctl_box, items=[Port(ctl, MAKE_SEND)]))
    for i in range(3):
        m.msg_send(Message(remote_port=dest, id=i))
    n = 3
    while m.msg_receive(ctl, m.RCV_TIMEOUT, 20_000).id == GO:
        m.msg_send(Message(remote_port=dest, id=n, items=[Int(n)]))
        n += 1
    return n


def _waiter(p: int) -> int:
    return m.msg_receive(p, m.RCV_TIMEOUT, 20_000).id


def test_a_thread_waiting_on_a_channel_is_suspended_and_terminated(native: str) -> None:
    me = m.task_self()
    h, p, ctl = _sender_of_three(_sender_that_waits, "s")
    m.msg_send(Message(remote_port=ctl, id=GO))
    assert m.msg_receive(p, m.RCV_TIMEOUT, 20_000).id == 3  # on the channel
    assert p in _receivers()
    t = m.thread_create(me, _waiter, p)  # waits on the channel, in this process
    m.thread_terminate(t)
    with pytest.raises(m.MachError):  # it is gone (its port died)
        m.thread_info(t)
    t2 = m.thread_create(me, _waiter, p)
    m.thread_suspend(t2)
    m.msg_send(Message(remote_port=ctl, id=GO))  # a message for it, while suspended
    assert m.thread_info(t2)[2] == 1
    m.thread_resume(t2)
    m.msg_send(Message(remote_port=ctl, id=DONE))
    assert h.result(20_000) == 5  # type: ignore[attr-defined]
    # the suspended thread took message 4 once resumed (or it is still queued)
    _ = t2


def _garbage_then_data(dest: int) -> int:
    """Get a channel, write garbage on it, then send more messages."""
    for i in range(3):
        m.msg_send(Message(remote_port=dest, id=i))
    chan = current_thread().process.senders.channels[dest]  # type: ignore[attr-defined]
    chan.sock.send(b"not a packet")
    for i in range(3, 6):
        m.msg_send(Message(remote_port=dest, id=i))
    return 0


def test_garbage_on_a_channel_drops_it_and_nothing_else(native: str) -> None:
    me = m.task_self()
    p = m.port_allocate(me)
    h = m.spawn(_garbage_then_data, Port(p, MAKE_SEND), name="liar")
    ids = [m.msg_receive(p, m.RCV_TIMEOUT, 20_000).id for _ in range(6)]
    assert ids == [0, 1, 2, 3, 4, 5]
    assert h.result(20_000) == 0  # type: ignore[attr-defined]
    m.msg_send(Message(remote_port=p, id=7))  # the port works on
    assert m.msg_receive(p, m.RCV_TIMEOUT, 0).id == 7


def _sender_loses_its_right(dest: int, box: int) -> str:
    """Get a channel to `dest`, say our name for it, and after GO send once more."""
    me = m.task_self()
    ctl = m.port_allocate(me)
    for i in range(3):
        m.msg_send(Message(remote_port=dest, id=i))
    assert dest in current_thread().process.senders.channels  # type: ignore[attr-defined]
    m.msg_send(Message(remote_port=box, items=[Int(dest), Port(ctl, MAKE_SEND)]))
    m.msg_receive(ctl, m.RCV_TIMEOUT, 20_000)  # GO: our right is gone by now
    try:
        m.msg_send(Message(remote_port=dest, id=9))
    except m.MachError as e:
        return e.code
    return "sent"


def test_a_sender_whose_right_is_taken_loses_its_channel(native: str) -> None:
    me = m.task_self()
    p, box = m.port_allocate(me), m.port_allocate(me)
    h = m.spawn(_sender_loses_its_right, Port(p, MAKE_SEND), Port(box, MAKE_SEND),
                name="robbed")
    assert [m.msg_receive(p, m.RCV_TIMEOUT, 20_000).id for _ in range(3)] == [0, 1, 2]
    their_name, ctl = m.msg_receive(box, m.RCV_TIMEOUT, 20_000).values()
    taken = m.port_extract_right(h.port, their_name, m.MOVE_SEND)  # type: ignore[attr-defined]
    assert taken == p
    m.msg_send(Message(remote_port=ctl, id=GO))
    assert h.result(20_000) == "SEND_INVALID_PORT"  # type: ignore[attr-defined]
    with pytest.raises(m.MachError) as e:
        m.msg_receive(p, m.RCV_TIMEOUT, 0)  # nothing came on the old channel
    assert e.value.code == "RCV_TIMED_OUT"


def test_a_task_cannot_forge_a_marker(native: str) -> None:
    me = m.task_self()
    p = m.port_allocate(me)
    m.msg_send(Message(remote_port=p, id=direct.CHANNEL_MARKER, items=[Int(1)]))
    got = m.msg_receive(p, m.RCV_TIMEOUT, 0)  # a user's message: returned as it is
    assert (got.id, got.values()) == (direct.CHANNEL_MARKER, [1])


# -- the packet decoder (no machd) ------------------------------------------------------------
def test_packets_round_trip() -> None:
    msg = Message(id=5, items=[Int(1), Str("s"), Bytes(b"b"), Float(0.5), IntArray([2])])
    seq, got, index = direct.decode_frame(direct.encode_packet(msg, 3, 9))
    assert (seq, got.id, got.values(), index) == (9, 5, [1, "s", b"b", 0.5, (2,)], 3)
    seq, got, index = direct.decode_frame(direct.encode_held(77, 10))
    assert (seq, got.id, got.items, index) == (10, 77, [], direct.HELD)


def _raw_frame(items: list[Any], index: int = 0, count: int | None = None,
           tail: bytes = b"", body: int | None = None) -> bytes:
    """A frame as a sender could write it, items encoded as the wire does (any item)."""
    out = bytearray(direct.HEAD.size)
    wire.put_items(out, items)
    out += tail
    direct.HEAD.pack_into(out, 0, direct.FRAME_MAGIC,
                          len(out) - direct.FRAME.size if body is None else body, 1, 1,
                          index, len(items) if count is None else count)
    return bytes(out)


@pytest.mark.parametrize("bad", [
    _raw_frame([Port(3, MAKE_SEND)]),  # a right
    _raw_frame([OOL(data=b"x")]),  # memory
    _raw_frame([Code(None, blob=b"pickle")]),  # code
    _raw_frame([], index=direct.REPLIES_MAX + 1),  # past the bound ports
    _raw_frame([], index=-2),  # no reply index
    _raw_frame([Int(1)], index=direct.HELD),  # a held message's frame with items
    _raw_frame([Bytes(b"x" * 9000)]),  # past the inline limit
    _raw_frame([Int(1)], count=2),  # more items than it holds
    _raw_frame([Int(1)], count=0),  # fewer: trailing bytes
    _raw_frame([], tail=b"x"),  # trailing bytes
    _raw_frame([Int(1)], tail=b"\x99"),  # an unknown item after the counted ones
    _raw_frame([], body=3),  # a body shorter than a packet's header
    _raw_frame([Int(1)])[:-1],  # half a frame
    b"PYMX" + _raw_frame([])[4:],  # another magic
    b"\x08garbage",
    b"",
])
def test_bad_frames_are_refused(bad: bytes) -> None:
    with pytest.raises(wire.WireError):
        direct.decode_frame(bad)


def test_only_data_messages_may_use_a_channel() -> None:
    assert direct.channel_eligible(Message(1, 9, 1, [Int(1)]))
    assert direct.channel_eligible(Message(1, 0, 1, []))
    assert not direct.channel_eligible(Message(1, 9, 1, [], m.MAKE_SEND))
    assert not direct.channel_eligible(Message(1, 0, 1, [Port(3, MAKE_SEND)]))
    assert not direct.channel_eligible(Message(1, 0, 1, [OOL(data=b"x")]))
    assert not direct.channel_eligible(Message(1, 0, 1, [Bytes(b"x" * 9000)]))


# -- a hostile sender or receiver (a review's findings, each a test) -----------------------------


def _shrink_page(dest: int) -> str:
    """Open a channel by hand and try to shrink its page (machd maps it)."""
    (_, _), fds = current_thread().trap_fds(traps.CHANNEL_OPEN, dest, 0)
    try:
        os.ftruncate(fds[1], 0)
    except OSError as e:
        return e.strerror or "refused"
    finally:
        for fd in fds:
            os.close(fd)
    return "shrunk"


def test_a_task_cannot_shrink_a_channels_page(native: str) -> None:
    """The page is sealed to its size before its descriptor leaves machd: a task that
    could shrink it would make machd's next touch of it a SIGBUS (machd would die)."""
    me = m.task_self()
    p = m.port_allocate(me)
    h = m.spawn(_shrink_page, Port(p, MAKE_SEND), name="shrink")
    assert h.result(10_000) == os.strerror(errno.EPERM)
    m.msg_send(Message(remote_port=p, id=1), m.SEND_TIMEOUT, 1000)  # machd is fine
    assert m.msg_receive(p, m.RCV_TIMEOUT, 3000).id == 1


def _flood_and_close(dest: int) -> list[str]:
    """Fill a channel past the port's backlog (its sender's count ignored), close it,
    and try again."""
    t, out = current_thread(), []
    for _ in range(3):
        try:
            (cid, _), fds = t.trap_fds(traps.CHANNEL_OPEN, dest, 0)
        except m.MachError as e:
            out.append(e.code)
            continue
        s = socket.socket(fileno=fds[0])
        os.close(fds[1])
        n = 0
        with contextlib.suppress(BlockingIOError):
            while n < 200:
                s.send(direct.encode_packet(Message(id=7), 0, n + 1), socket.MSG_DONTWAIT)
                n += 1
        t.trap(traps.CHANNEL_CLOSE, dest, cid)
        s.close()
        out.append(f"wrote {n}")
    return out


def test_a_sender_cannot_queue_past_the_backlog_by_closing_its_channel(native: str) -> None:
    """What a closed channel holds goes back to the port's queue up to the backlog only,
    and a task that closed a channel to a port gets no new one to it."""
    me = m.task_self()
    p = m.port_allocate(me)
    h = m.spawn(_flood_and_close, Port(p, MAKE_SEND), name="flood")
    got = h.result(20_000)
    assert got[0] == "wrote 200" and got[1:] == ["KERN_FAILURE", "KERN_FAILURE"]
    assert m.port_status(me, p)[1] <= m.PORT_BACKLOG_DEFAULT


def _bind_many(dest: int, box: int) -> int:
    t, me = current_thread(), m.task_self()
    (cid, _), fds = t.trap_fds(traps.CHANNEL_OPEN, dest, 0)
    for fd in fds:
        os.close(fd)
    m.msg_send(Message(remote_port=box, id=1))
    time.sleep(0.5)  # (the parent counts its names)
    for _ in range(direct.REPLIES_MAX):
        t.trap(traps.CHANNEL_BIND, dest, cid, m.port_allocate(me))
    m.msg_send(Message(remote_port=box, id=2))
    time.sleep(2)  # (its ports live while the parent looks)
    return int(cid)


def test_binding_reply_ports_gives_the_receiver_nothing_until_it_reads_them(
        native: str) -> None:
    """A reply port bound to a channel reaches the receiver's name space only when it
    reads a message naming it, as a message carrying the right would: a sender cannot
    fill another task's names by binding."""
    me = m.task_self()
    p, box = m.port_allocate(me), m.port_allocate(me)
    h = m.spawn(_bind_many, Port(p, MAKE_SEND), Port(box, MAKE_SEND), name="binder")
    assert m.msg_receive(box, m.RCV_TIMEOUT, 10_000).id == 1
    before = m.port_names(me)[0]
    assert m.msg_receive(box, m.RCV_TIMEOUT, 10_000).id == 2
    assert m.port_names(me)[0] == before
    h.result(10_000)


def _poison_page(dest: int) -> int:
    for i in range(3):
        m.msg_send(Message(remote_port=dest, id=i))
    ch = current_thread().process.senders.channels[dest]
    ch.view[direct.RECEIVED] = 2**64 - 1  # the receiver's word, scribbled on
    ch.sock.send(direct.encode_packet(Message(id=42), 0, 4))
    ch.sock.send(direct.encode_packet(Message(id=43), 0, 5))
    return 0


def test_a_scribbled_page_word_loses_no_message(native: str) -> None:
    """Each side writes its page word from its own count, never reading it back: a peer
    that writes anything there breaks no receive and loses no message."""
    me = m.task_self()
    p = m.port_allocate(me)
    h = m.spawn(_poison_page, Port(p, MAKE_SEND), name="poison")
    got = [m.msg_receive(p, m.RCV_TIMEOUT, 5000).id for _ in range(5)]
    h.result(10_000)
    assert got == [0, 1, 2, 42, 43]


def _open_only(dest: int, box: int) -> None:
    current_thread().trap_fds(traps.CHANNEL_OPEN, dest, 0)  # a channel, never used
    m.msg_send(Message(remote_port=box, id=1))
    time.sleep(2)  # (its channel stays open while the parent looks)


def test_markers_take_no_room_in_the_backlog(native: str) -> None:
    """Channels opened and never used leave markers in the port's queue; they are the
    kernel's own and take no room: a send through machd to the empty port goes."""
    me = m.task_self()
    p, box = m.port_allocate(me), m.port_allocate(me)
    hs = [m.spawn(_open_only, Port(p, MAKE_SEND), Port(box, MAKE_SEND), name=f"o{i}")
          for i in range(m.PORT_BACKLOG_DEFAULT)]
    for _ in hs:
        m.msg_receive(box, m.RCV_TIMEOUT, 20_000)
    assert m.port_status(me, p)[1] == 0
    m.msg_send(Message(remote_port=p, id=9), m.SEND_TIMEOUT, 0)
    for h in hs:
        h.result(20_000)


def _fill_channel(dest: int) -> str:
    for i in range(3):
        m.msg_send(Message(remote_port=dest, id=i))
    assert dest in current_thread().process.senders.channels
    for i in range(3, 100):
        try:
            m.msg_send(Message(remote_port=dest, id=i, items=[Bytes(b"x" * 8150)]),
                       m.SEND_TIMEOUT, 200)
        except m.MachError as e:
            return e.code
    return "all sent"


def test_send_timeout_holds_when_the_channels_socket_is_full(native: str) -> None:
    """A backlog of large messages can fill a channel's socket before the page says the
    port is full: the sender then waits for the socket with its timeout (and its
    alert), never blocked in the kernel until the receiver reads."""
    me = m.task_self()
    p = m.port_allocate(me)
    m.port_set_backlog(me, p, m.PORT_BACKLOG_MAX)
    h = m.spawn(_fill_channel, Port(p, MAKE_SEND), name="filler")
    for i in range(3):
        assert m.msg_receive(p, m.RCV_TIMEOUT, 20_000).id == i
    assert h.result(20_000) == "SEND_TIMED_OUT"  # (not received meanwhile)
    ids = []
    with contextlib.suppress(m.MachError):
        while True:
            ids.append(m.msg_receive(p, m.RCV_TIMEOUT, 500).id)
    assert ids == list(range(3, 3 + len(ids))) and ids  # in order, none lost


# -- the known gaps a review left open (each a test) ------------------------------------------
def _frame(msg: Message, seq: int) -> bytes:
    return direct.encode_packet(msg, 0, seq)


def _empty_write_then_close(dest: int) -> int:
    """Open a channel by hand, write a frame, an empty write, two frames, and close it
    (machd then reads back what is on it)."""
    t = current_thread()
    (cid, _), fds = t.trap_fds(traps.CHANNEL_OPEN, dest, 0)
    s = socket.socket(fileno=fds[0])
    os.close(fds[1])
    s.send(_frame(Message(id=10), 1))
    s.send(b"")
    s.send(_frame(Message(id=11), 2))
    s.send(_frame(Message(id=12), 3))
    t.trap(traps.CHANNEL_CLOSE, dest, cid)
    s.close()
    return 0


def test_an_empty_write_loses_nothing_read_back_after_it(native: str) -> None:
    """(L6) An empty write on a channel is no end of it: machd reads back everything
    written after it too."""
    p = m.port_allocate(m.task_self())
    h = m.spawn(_empty_write_then_close, Port(p, MAKE_SEND), name="empty")
    assert h.result(20_000) == 0
    assert [m.msg_receive(p, m.RCV_TIMEOUT, 5000).id for _ in range(3)] == [10, 11, 12]


class _FailOnce:
    """A channel socket whose next send fails as `errno_` says (once)."""

    def __init__(self, sock: socket.socket, errno_: int) -> None:
        self.sock, self.errno = sock, errno_

    def send(self, data: bytes, flags: int = 0) -> int:
        if self.errno:
            e, self.errno = self.errno, 0
            raise OSError(e, os.strerror(e))
        return self.sock.send(data, flags)

    def __getattr__(self, name: str) -> object:
        return getattr(self.sock, name)


def _write_fails(dest: int, box: int, failure: int) -> bool:
    """Send 0..5 (a channel after 0 and 1), make the channel's next write fail with
    `failure`, send 6..9, say so on `box`; end after a message on a port given to
    `box` (the channel's sender lives until then); True if a channel was used."""
    ctl = m.port_allocate(m.task_self())
    m.msg_send(Message(remote_port=box, items=[Port(ctl, MAKE_SEND)]))
    for i in range(6):
        m.msg_send(Message(remote_port=dest, id=i))
    ch = current_thread().process.senders.channels.get(dest)  # type: ignore[attr-defined]
    if ch is not None:
        ch.sock = _FailOnce(ch.sock, failure)
    for i in range(6, 10):
        m.msg_send(Message(remote_port=dest, id=i))
    m.msg_send(Message(remote_port=box, id=GO))
    m.msg_receive(ctl, m.RCV_TIMEOUT, 20_000)
    return ch is not None


@pytest.mark.parametrize("failure", [errno.ENOBUFS, errno.EPIPE])
def test_a_failed_channel_write_keeps_the_senders_order(native: str, failure: int) -> None:
    """(L6) A channel write that fails for another reason than the channel's end
    (ENOBUFS; or an EPIPE while machd still has the channel) must not send the message
    through machd ahead of the frames still on the channel: they go into the queue
    first."""
    me = m.task_self()
    p, box = m.port_allocate(me), m.port_allocate(me)
    m.port_set_backlog(me, p, m.PORT_BACKLOG_MAX)
    h = m.spawn(_write_fails, Port(p, MAKE_SEND), Port(box, MAKE_SEND), failure,
                name="failing")
    ctl = m.msg_receive(box, m.RCV_TIMEOUT, 20_000).items[0].name  # type: ignore[union-attr]
    assert m.msg_receive(box, m.RCV_TIMEOUT, 20_000).id == GO  # all sent, sender alive
    assert [m.msg_receive(p, m.RCV_TIMEOUT, 5000).id for _ in range(10)] == list(range(10))
    m.msg_send(Message(remote_port=ctl, id=DONE))
    assert h.result(20_000) is True  # type: ignore[attr-defined]


def _send_three_then_close(dest: int, box: int) -> int:
    """Send 3 messages to `dest` (the third on a channel); after a message on a port
    given to `box`, close the channel (machd tears it down before we answer)."""
    ctl = m.port_allocate(m.task_self())
    m.msg_send(Message(remote_port=box, items=[Port(ctl, MAKE_SEND)]))
    for i in range(3):
        m.msg_send(Message(remote_port=dest, id=i))
    got = m.msg_receive(ctl, m.RCV_TIMEOUT, 20_000).id
    ch = current_thread().process.senders.channels[dest]  # type: ignore[attr-defined]
    current_thread().trap(traps.CHANNEL_CLOSE, dest, ch.cid)
    return got


def test_a_stale_doorbell_is_never_a_reused_descriptor(native: str) -> None:
    """(R4) A thread that still holds a port's channel state after the runtime dropped
    the channel (and the port's doorbell with it) must not read from whatever this
    process opened since under the doorbell's old number."""
    h, p, ctl = _sender_of_three(_send_three_then_close, "three")
    receivers = current_thread().process.receivers
    pr = receivers.ports[p]  # as a receiving thread would hold it
    m.msg_send(Message(remote_port=ctl, id=DONE))
    assert h.result(20_000) == DONE  # (its channel was torn down first)
    number = getattr(pr.bell, "fd", pr.bell)
    stale = LocalReceive(receivers, p, 0, m.MSG_SIZE_MAX, -1, current_thread().trap,
                         current_thread().trap_fds, {})
    r, w = os.pipe()
    os.write(w, b"12345678")
    receivers.sweep()  # the sender is gone: its channel ended, and the port's bell went
    assert p not in receivers.ports
    opened: list[int] = []
    try:
        while not opened or opened[-1] < number:  # the lowest free numbers, up to the bell's
            opened.append(os.dup(r))
        assert stale._from_machd(pr) is None  # (nothing queued in machd)
        os.set_blocking(r, False)
        assert os.read(r, 8) == b"12345678"  # nobody read our pipe under the old number
    finally:
        for fd in [*opened, r, w]:
            os.close(fd)


class _Interleaved:
    """A shut channel's receiving end as machd reads it back, with a thread of the
    receiving task taking a frame (as its runtime does) before and after each read."""

    def __init__(self, sock: socket.socket, take: Callable[[], None]) -> None:
        self.sock, self.take = sock, take

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv(self, size: int, flags: int = 0) -> bytes:
        self.take()
        data = self.sock.recv(size, flags)
        self.take()
        return data


def _frames_on_a_shut_channel(n: int) -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for i in range(n):
        a.send(_frame(Message(id=i, items=[Str("x" * i)]), i + 1))
    b.shutdown(socket.SHUT_RDWR)  # (machd shuts a channel before it reads it back)
    return a, b


def test_a_teardown_and_a_receivers_thread_split_a_channel_exactly() -> None:
    """(L5) machd takes what is left on a torn-down channel while a thread of the
    receiving task reads it too: the thread's frames are a prefix of the sender's, and
    machd's are exactly the rest, each once, in order."""
    a, b = _frames_on_a_shut_channel(8)
    mine: list[int] = []
    buf = bytearray()

    def take() -> None:
        with contextlib.suppress(BlockingIOError):
            got = take_frame(b, buf, m.MSG_SIZE_MAX)
            if got is not None:
                mine.append(got[0])

    take()
    frames, skipped = direct.scan_frames(take_all(_Interleaved(b, take)), 100)  # type: ignore[arg-type]
    theirs = [msg.id for _, msg, _ in frames]
    assert skipped == 0 and mine + theirs == list(range(8)) and mine == [0, 1]
    assert [seq for seq, _, _ in frames] == list(range(3, 9))
    a.close()
    b.close()


class _Raced:
    """A receiver's end whose take (the read after the peek) comes just after machd's
    teardown read."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.machd = sock, b""

    def recv_into(self, buf: bytearray, size: int, flags: int = 0) -> int:
        if not flags & socket.MSG_PEEK:
            self.machd = take_all(self.sock)
        return self.sock.recv_into(buf, size, flags)


def test_a_receiver_that_loses_the_race_to_a_teardown_takes_nothing() -> None:
    """(L5) A frame the receiver peeked but machd read back first is machd's alone."""
    a, b = _frames_on_a_shut_channel(3)
    raced = _Raced(b)
    assert take_frame(raced, bytearray(), m.MSG_SIZE_MAX) is None  # type: ignore[arg-type]
    assert [msg.id for _, msg, _ in direct.scan_frames(raced.machd, 10)[0]] == [0, 1, 2]
    a.close()
    b.close()


def test_garbage_is_skipped_and_what_follows_is_found() -> None:
    """What a sender wrote properly after garbage is still read back, in order; the
    garbage is skipped and counted."""
    junk = b"\xff garbage, not a frame " + direct.FRAME_MAGIC + b"\x00" * 3
    data = _frame(Message(id=1), 1) + junk + _frame(Message(id=2), 2) + b"" + \
        _frame(Message(id=3), 3)[:-1]
    frames, skipped = direct.scan_frames(data, 10)
    assert [msg.id for _, msg, _ in frames] == [1, 2]
    assert skipped == len(junk) + len(_frame(Message(id=3), 3)) - 1


def _read_until_gone(p: int, go: int, done: int, signal_after: int) -> None:
    """Receive on `p` until that fails (its receive right left this task); GO on `go`
    after `signal_after` messages; then our ids and the failure on `done`."""
    ids: list[int] = []
    code = ""
    while not code:
        try:
            ids.append(m.msg_receive(p, m.RCV_TIMEOUT, 30_000).id)
        except m.MachError as e:
            code = e.code
        if len(ids) == signal_after:
            m.msg_send(Message(remote_port=go, id=GO))
    m.msg_send(Message(remote_port=done, id=DONE, items=[IntArray(tuple(ids)), Str(code)]))


def _stream(dest: int, n: int) -> int:
    for i in range(n):
        m.msg_send(Message(remote_port=dest, id=i), m.SEND_TIMEOUT, 30_000)
    return n


def _take_over(box: int) -> list[int]:
    """Get a port's receive right on a port given to `box`, then how many messages are
    left for us; receive them, and look once more (nothing more must come)."""
    ctl = m.port_allocate(m.task_self())
    m.msg_send(Message(remote_port=box, items=[Port(ctl, MAKE_SEND)]))
    p = m.msg_receive(ctl, m.RCV_TIMEOUT, 30_000).items[0].name  # type: ignore[union-attr]
    rest = m.msg_receive(ctl, m.RCV_TIMEOUT, 60_000).id
    ids = [m.msg_receive(p, m.RCV_TIMEOUT, 30_000).id for _ in range(rest)]
    with contextlib.suppress(m.MachError):
        ids.append(m.msg_receive(p, m.RCV_TIMEOUT, 0).id)
    return ids


def test_a_receive_right_moved_while_a_thread_reads_the_channel(native: str) -> None:
    """(L5) A thread of ours reads a port fed by another task's channel while another
    thread moves the port's receive right to a third task: what our thread got and what
    the new holder gets are the sender's messages, each once, in order (a prefix and the
    rest), whenever the move falls."""
    me = m.task_self()
    p, box, go, done = (m.port_allocate(me) for _ in range(4))
    m.port_set_backlog(me, p, m.PORT_BACKLOG_MAX)
    n = 120
    heir = m.spawn(_take_over, Port(box, MAKE_SEND), name="heir")
    ctl = m.msg_receive(box, m.RCV_TIMEOUT, 20_000).items[0].name  # type: ignore[union-attr]
    m.thread_create(me, _read_until_gone, p, go, done, 20)
    sender = m.spawn(_stream, Port(p, MAKE_SEND), n, name="stream")
    assert m.msg_receive(go, m.RCV_TIMEOUT, 30_000).id == GO
    m.msg_send(Message(remote_port=ctl, items=[Port(p, MOVE_RECEIVE)]))
    ids, _code = m.msg_receive(done, m.RCV_TIMEOUT, 60_000).values()
    mine = list(ids)  # type: ignore[call-overload]
    m.msg_send(Message(remote_port=ctl, id=n - len(mine)))
    assert sender.result(60_000) == n  # type: ignore[attr-defined]
    assert mine + heir.result(60_000) == list(range(n))  # type: ignore[attr-defined]


def _channel_or_not(dest: int, box: int, index: int, n: int) -> bool:
    """Send `n` messages (ids index * 100 + k) to `dest`, then say on `box` (id `index`)
    whether a channel carried them, with a control port; end after a message on it."""
    ctl = m.port_allocate(m.task_self())
    for k in range(n):
        m.msg_send(Message(remote_port=dest, id=index * 100 + k), m.SEND_TIMEOUT, 20_000)
    has = dest in current_thread().process.senders.channels  # type: ignore[attr-defined]
    m.msg_send(Message(remote_port=box, id=index, items=[Int(int(has)),
                                                         Port(ctl, MAKE_SEND)]))
    m.msg_receive(ctl, m.RCV_TIMEOUT, 60_000)
    return has


@pytest.mark.slow
def test_a_ports_channel_limit_holds_and_the_next_sender_goes_through_machd(
        native: str) -> None:
    """At most PORT_CHANNELS_MAX channels into one port: the next sending task gets
    none, and its messages come through machd, in order, as everyone's."""
    me = m.task_self()
    p, box = m.port_allocate(me), m.port_allocate(me)
    m.port_set_backlog(me, p, m.PORT_BACKLOG_MAX)
    limit, handles, ctls, has = channels.PORT_CHANNELS_MAX, [], [], []
    for i in range(limit + 1):
        n = 3 if i < limit else 12  # (the third message of a sender with a channel: on it)
        handles.append(m.spawn(_channel_or_not, Port(p, MAKE_SEND), Port(box, MAKE_SEND),
                               i, n, name=f"sender{i}"))
        assert [m.msg_receive(p, m.RCV_TIMEOUT, 20_000).id for _ in range(n)] == \
            [i * 100 + k for k in range(n)]
        report = m.msg_receive(box, m.RCV_TIMEOUT, 20_000)
        assert report.id == i
        has.append(bool(report.values()[0]))
        ctls.append(report.items[1].name)  # type: ignore[union-attr]
    assert has == [True] * limit + [False]
    assert len(_receivers()[p].channels) == limit  # type: ignore[attr-defined]
    for ctl in ctls:
        m.msg_send(Message(remote_port=ctl, id=DONE))
    assert [h.result(20_000) for h in handles] == has  # type: ignore[attr-defined]


def _to_many_ports(box: int, last_n: int) -> list[int]:
    """Get send rights to ports on a port given to `box`; send 3 messages to each (ids
    j * 100 + k; `last_n` to the last), then say on `box` which went over a channel;
    end after a message on our port."""
    ctl = m.port_allocate(m.task_self())
    m.msg_send(Message(remote_port=box, items=[Port(ctl, MAKE_SEND)]))
    ports = [item.name for item in m.msg_receive(ctl, m.RCV_TIMEOUT, 20_000).items]  # type: ignore[union-attr]
    for j, dest in enumerate(ports):
        for k in range(last_n if j == len(ports) - 1 else 3):
            m.msg_send(Message(remote_port=dest, id=j * 100 + k), m.SEND_TIMEOUT, 20_000)
    chans = current_thread().process.senders.channels  # type: ignore[attr-defined]
    has = [int(dest in chans) for dest in ports]
    m.msg_send(Message(remote_port=box, items=[IntArray(tuple(has))]))
    m.msg_receive(ctl, m.RCV_TIMEOUT, 60_000)
    return has


@pytest.mark.slow
def test_a_tasks_channel_limit_holds_and_the_next_port_goes_through_machd(
        native: str) -> None:
    """At most TASK_CHANNELS_MAX channels into the ports of one task: a sender to one
    more of its ports gets none, and its messages come through machd, in order."""
    me = m.task_self()
    limit, box = channels.TASK_CHANNELS_MAX, m.port_allocate(me)
    ports = [m.port_allocate(me) for _ in range(limit + 1)]
    m.port_set_backlog(me, ports[-1], m.PORT_BACKLOG_MAX)
    h = m.spawn(_to_many_ports, Port(box, MAKE_SEND), 12, name="many")
    ctl = m.msg_receive(box, m.RCV_TIMEOUT, 20_000).items[0].name  # type: ignore[union-attr]
    m.msg_send(Message(remote_port=ctl, items=[Port(q, MAKE_SEND) for q in ports]))
    has = list(m.msg_receive(box, m.RCV_TIMEOUT, 60_000).values()[0])  # type: ignore[call-overload]
    assert has == [1] * limit + [0]
    for j, q in enumerate(ports):
        n = 12 if j == limit else 3
        assert [m.msg_receive(q, m.RCV_TIMEOUT, 20_000).id for _ in range(n)] == \
            [j * 100 + k for k in range(n)]
    assert sum(q in _receivers() for q in ports) == limit
    m.msg_send(Message(remote_port=ctl, id=DONE))
    assert h.result(20_000) == has  # type: ignore[attr-defined]


# -- doorbells no task can jam (a review's finding: machd hung in an eventfd write) ------
def _jam(fd: int) -> None:
    """What a hostile task does to a doorbell descriptor machd gave it: fill it, then
    make it blocking (with an eventfd dup, machd's own ring then slept under the kernel
    lock, and every trap of every task hung)."""
    os.set_blocking(fd, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(fd, b"\1" * 4096)
    os.set_blocking(fd, True)


def _jams_its_bell(box: int) -> str:
    me = m.task_self()
    p = m.port_allocate(me)
    m.msg_send(Message(remote_port=box, items=[Port(p, MAKE_SEND)]))
    for _ in range(4):  # two through machd, then the marker is accepted and two on the channel
        m.msg_receive(p, m.RCV_TIMEOUT, 20_000)
    _jam(_receivers()[p].bell.fd)  # type: ignore[attr-defined]
    m.msg_send(Message(remote_port=box, id=GO))
    time.sleep(60)  # keeps the port (and its jammed bell) until the test terminates it
    return "not terminated"


def _poke(p: int) -> str:
    m.msg_send(Message(remote_port=p, id=99))  # through machd: it rings the port's bell
    return "poked"


def test_a_receiver_cannot_jam_machd_with_its_doorbell(native: str) -> None:
    me = m.task_self()
    h, box, (p,) = _spawn_boxed(_jams_its_bell, "jammer")
    for i in range(4):
        m.msg_send(Message(remote_port=p, id=i, items=[Int(i)]), m.SEND_TIMEOUT, 20_000)
    assert p in _channels()
    assert m.msg_receive(box, m.RCV_TIMEOUT, 20_000).id == GO  # its bell is jammed
    poker = m.spawn(_poke, Port(p, m.COPY_SEND), name="poker")
    assert poker.result(20_000) == "poked"  # machd rang the bell, and went on
    m.port_allocate(me)  # and serves every task
    m.task_terminate(h.port)  # type: ignore[attr-defined]


def _jams_its_alert(box: int) -> str:
    _jam(current_thread()._alert())  # type: ignore[attr-defined]
    m.msg_send(Message(remote_port=box, id=GO))
    time.sleep(60)  # suspended (and then terminated) meanwhile
    return "not terminated"


def test_a_task_cannot_jam_machd_with_its_threads_alert(native: str) -> None:
    box = m.port_allocate(m.task_self())
    h = m.spawn(_jams_its_alert, Port(box, MAKE_SEND), name="jammer")
    assert m.msg_receive(box, m.RCV_TIMEOUT, 20_000).id == GO
    m.task_suspend(h.port)  # rings the jammed alert: machd must not wait on it
    m.task_resume(h.port)
    m.task_terminate(h.port)  # rings it again
    m.port_allocate(m.task_self())  # machd serves every task


def _lowers_backlog_then_moves(box: int) -> int:
    me = m.task_self()
    p, ctl = m.port_allocate(me), m.port_allocate(me)
    m.msg_send(Message(remote_port=box, items=[Port(p, MAKE_SEND), Port(ctl, MAKE_SEND)]))
    for _ in range(3):
        m.msg_receive(p, m.RCV_TIMEOUT, 20_000)
    m.msg_receive(ctl, m.RCV_TIMEOUT, 20_000)  # GO: four messages wait on the channel
    m.port_set_backlog(me, p, 1)
    m.msg_send(Message(remote_port=box, id=DONE, items=[Port(p, MOVE_RECEIVE)]))
    return 0


def test_lowering_the_backlog_drops_nothing_already_sent(native: str) -> None:
    """Mach never discards queued messages when a backlog is lowered: neither does the
    teardown that moves what is on a channel back into the queue (a review's finding:
    it dropped the sender's messages past the new backlog)."""
    h, box, (p, ctl) = _spawn_boxed(_lowers_backlog_then_moves, "mover")
    for i in range(3):
        m.msg_send(Message(remote_port=p, id=i))
    for i in range(10, 14):
        m.msg_send(Message(remote_port=p, id=i, items=[Int(i)]), m.SEND_TIMEOUT, 20_000)
    assert p in _channels()
    m.msg_send(Message(remote_port=ctl, id=GO))
    moved = m.msg_receive(box, m.RCV_TIMEOUT, 20_000)
    assert moved.items[0].name == p and h.result(20_000) == 0
    got = [m.msg_receive(p, m.RCV_TIMEOUT, 20_000).id for _ in range(4)]
    assert got == [10, 11, 12, 13]


@pytest.mark.parametrize("mode", ["descriptor", "urgent"])
def test_nothing_is_left_on_a_torn_down_channel_for_its_old_receiver(mode: str) -> None:
    """A stream read stops at a message carrying descriptors or at an urgent mark (only
    a hostile sender writes either): what the teardown's one read leaves is read and
    dropped, so the old receiver cannot read the sender's later frames after the port
    moved (a review's finding)."""
    def frames(n: int, base: int) -> list[bytes]:
        return [direct.encode_packet(Message(id=base + i, items=[Int(i)]), 0, base + i)
                for i in range(n)]

    sender, end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    with contextlib.closing(sender), contextlib.closing(end):
        for f in frames(3, 1):
            sender.send(f)
        if mode == "descriptor":
            sender.sendmsg([frames(1, 4)[0]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                r.to_bytes(4, "little"))])
        else:
            sender.send(b"x", socket.MSG_OOB)
        for f in frames(3, 5):
            sender.send(f)
        end.shutdown(socket.SHUT_RDWR)
        got, _ = direct.scan_frames(take_all(end), 64)
        assert [seq for seq, _, _ in got][:3] == [1, 2, 3]
        assert discard_rest(end) > 0
        assert end.recv(1 << 16, socket.MSG_DONTWAIT) == b""  # nothing for the old receiver
    os.close(r)
    os.close(w)


def test_a_sender_waiting_for_room_on_an_endpoint_another_thread_closed() -> None:
    """Two sender threads wait for room on one channel; the first to find it broken
    closes the endpoint; the other must see the channel gone (and send through machd),
    not fail on the released page (a review's finding: a ValueError escaped msg_send)."""
    import mmap
    import threading

    from pymach.libmach.direct import Endpoint, _wait_room

    s_end, r_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = os.memfd_create("page")
    os.ftruncate(fd, direct.PAGE_SIZE)
    page = mmap.mmap(fd, direct.PAGE_SIZE)
    view = memoryview(page).cast("Q")
    view[direct.BACKLOG], view[direct.SENT] = 1, 1  # full: no room
    ep = Endpoint(1, s_end, page, view, s_end.fileno())
    alert_r, alert_w = os.pipe()
    out: list[object] = []

    def waiter() -> None:
        try:
            out.append(_wait_room(ep, None, alert_r, lambda: None))
        except Exception as e:  # (the failure this test is about)
            out.append(e)

    t = threading.Thread(target=waiter)
    t.start()
    wait_until_waiting = time.monotonic() + 10
    while not view[direct.WAITING] and time.monotonic() < wait_until_waiting:
        time.sleep(0.01)
    ep.close()  # the other thread's _forget
    r_end.shutdown(socket.SHUT_RDWR)  # machd's teardown: the waiter's poll wakes
    t.join(20)
    assert out == [False]
    for f in (fd, alert_r, alert_w):
        os.close(f)
    r_end.close()


class _Stub:
    """A stand-in for a Task or Port in ChannelTable's grant check (hashable)."""

    def __init__(self, **kw: object) -> None:
        self.__dict__.update(kw)


def test_a_sending_task_and_a_user_have_channel_limits_too() -> None:
    """Besides the limits per port and per receiving task: at most TASK_CHANNELS_MAX
    channels from one sending task and USER_CHANNELS_MAX from one uid's tasks, so that
    no user takes every descriptor machd allows channels (a review's finding)."""
    table = channels.ChannelTable()
    table.fds_max = 1 << 20

    def task(uid: int) -> _Stub:
        return _Stub(uid=uid, process=object(), active=True)

    def port() -> _Stub:
        return _Stub(dead=False, kobject=None, enabled=False)

    receiver = task(0)

    def may_open(sender: _Stub) -> bool:
        try:
            table._check_open(sender, port(), receiver)  # type: ignore[arg-type]
        except m.MachError as e:
            assert "too many channels" in e.detail
            return False
        return True

    one = task(1000)
    table.by_sender[one] = [object()] * (channels.TASK_CHANNELS_MAX - 1)  # type: ignore[list-item]
    assert may_open(one)
    table.by_sender[one].append(object())  # type: ignore[arg-type]
    assert not may_open(one)  # its own limit
    per = channels.TASK_CHANNELS_MAX - 1
    for _ in range(-(-channels.USER_CHANNELS_MAX // per)):
        table.by_sender[task(2000)] = [object()] * per  # type: ignore[list-item]
    assert not may_open(task(2000))  # that user's limit, for a new task of that user
    assert may_open(task(3000))  # another user is not affected


def test_detach_does_not_wait_for_a_sender_waiting_for_room() -> None:
    """A thread waiting for room on a full channel holds the endpoint's lock; detach
    (Senders.close_all) must wake it rather than wait for it (a review's finding: with
    the endpoint closed under its lock, detach hung until the receiver read)."""
    import mmap
    import threading

    from pymach.libmach.direct import Endpoint, Senders, _send_packet, _Wait

    s_end, r_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    s_end.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            s_end.send(b"x" * 4096)  # the socket is full: a write must wait for room
    fd = os.memfd_create("page")
    os.ftruncate(fd, direct.PAGE_SIZE)
    page = mmap.mmap(fd, direct.PAGE_SIZE)
    ep = Endpoint(1, s_end, page, memoryview(page).cast("Q"), s_end.fileno())
    senders = Senders()
    senders.channels[5] = ep
    alert_r, alert_w = os.pipe()
    ended: list[object] = []

    def writer() -> None:
        with ep.lock:
            try:
                _send_packet(ep.sock, b"y" * 64, _Wait(None, alert_r, lambda: None,
                                                       lambda *a: None))
                ended.append("sent")
            except OSError as e:
                ended.append(type(e).__name__)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    time.sleep(0.2)  # (it waits for room now; if not yet, close_all shuts it out anyway)
    closer = threading.Thread(target=senders.close_all, daemon=True)
    closer.start()
    closer.join(20)
    t.join(20)
    assert not closer.is_alive() and not t.is_alive()
    assert ended and ended[0] != "sent" and ep.closed
    for f in (fd, alert_r, alert_w):
        os.close(f)
    r_end.close()


def _wait_held_for(lock: object, seconds: float, timeout: float = 60.0) -> None:
    """Wait until another thread has held `lock` for `seconds` without a break."""
    deadline, since = time.monotonic() + timeout, None
    while True:
        now = time.monotonic()
        assert now < deadline, "the lock was never held that long"
        if lock.acquire(blocking=False):  # type: ignore[attr-defined]
            lock.release()  # type: ignore[attr-defined]
            since = None
        elif since is None:
            since = now
        elif now - since >= seconds:
            return
        time.sleep(0.02)


def _send_held(dest: int, right: int) -> None:
    m.msg_send(Message(remote_port=dest, id=999, items=[Port(right, MAKE_SEND)]))


def _held_token_writer_terminated(dest: int, box: int) -> int:
    """Fill the channel's socket, then have a thread send a message machd must hold (it
    carries a right): its token waits for room on the socket. Terminate that thread,
    report to `box` (GO, the last id sent, a control port) and stay until DONE, so that
    this task's end does not tear the channel down."""
    me = m.task_self()
    ctl, right = m.port_allocate(me), m.port_allocate(me)
    for i in range(3):
        m.msg_send(Message(remote_port=dest, id=i))
    sock = _channels()[dest].sock  # type: ignore[attr-defined]
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, direct.FRAME_MAX)  # (its own
    last = 2  # loss: the socket fills long before the port's backlog)
    for i in range(3, 200):
        try:
            m.msg_send(Message(remote_port=dest, id=i, items=[Bytes(b"x" * 8150)]),
                       m.SEND_TIMEOUT, 200)
        except m.MachError as e:
            assert e.code == "SEND_TIMED_OUT"
            break
        last = i
    ep = _channels()[dest]
    t = m.thread_create(me, _send_held, dest, right)
    _wait_held_for(ep.lock, 1.0)  # (the channel's lock is held from the hold to the
    m.thread_terminate(t)  # token's write: held that long, the thread waits for room)
    m.msg_send(Message(remote_port=box, id=GO, items=[Int(last), Port(ctl, MAKE_SEND)]))
    assert m.msg_receive(ctl, m.RCV_TIMEOUT, 60_000).id == DONE
    return last


def test_a_held_message_whose_thread_is_terminated_before_its_token_is_queued(
        native: str) -> None:
    """A thread terminated while it waits for room to write a held message's token:
    machd tears the channel down as the thread ends, so the held message is queued
    after what was on the channel (before: it stayed with machd until the channel's
    teardown, here the sender task's end)."""
    me = m.task_self()
    p, box = m.port_allocate(me), m.port_allocate(me)
    m.port_set_backlog(me, p, m.PORT_BACKLOG_MAX)
    h = m.spawn(_held_token_writer_terminated, Port(p, MAKE_SEND), Port(box, MAKE_SEND),
                name="holder")
    for i in range(3):
        assert m.msg_receive(p, m.RCV_TIMEOUT, 20_000).id == i
    report = m.msg_receive(box, m.RCV_TIMEOUT, 60_000)
    last, ctl = report.values()
    assert report.id == GO and 3 < last < 2 + m.PORT_BACKLOG_MAX  # (the socket filled)
    ids = [m.msg_receive(p, m.RCV_TIMEOUT, 10_000).id for _ in range(3, last + 1)]
    assert ids == list(range(3, last + 1))
    held = m.msg_receive(p, m.RCV_TIMEOUT, 10_000)  # before the fix: RCV_TIMED_OUT
    assert held.id == 999 and isinstance(held.items[0], Port)
    m.msg_send(Message(remote_port=ctl, id=DONE))  # type: ignore[arg-type]
    assert h.result(20_000) == last  # type: ignore[attr-defined]


@contextlib.contextmanager
def _own_machd(factory: pytest.TempPathFactory, name: str) -> Iterator[int]:
    """A machd of the test's own (its limits are changed), this process attached to it
    as task `name`; yields machd's pid."""
    uffd_or_skip()
    path = factory.mktemp("machd") / "machd.sock"
    proc = start_machd(path)
    attach(str(path), name=name)
    try:
        yield proc.pid
    finally:
        detach()
        stop_machd(proc)


@contextlib.contextmanager
def _no_spare_descriptors(pid: int) -> Iterator[None]:
    """machd (`pid`) may open no descriptor more, for the block (RLIMIT_NOFILE lowered
    to what it holds; root may change another process's limits)."""
    limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    held = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    lowest_free = min(set(range(len(held) + 1)) - held)  # (a new one takes the lowest)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free, limits[1]))
    try:
        yield
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)


def _send_ten_then_wait(dest: int, box: int) -> bool:
    """Send ids 0..9 to `dest` (a channel follows the first ones), tell `box` (GO, a
    control port), and stay until DONE (this task's end would tear the channel down);
    True if a channel carried them."""
    me = m.task_self()
    ctl = m.port_allocate(me)
    for i in range(10):
        m.msg_send(Message(remote_port=dest, id=i))
    used = dest in _channels()
    m.msg_send(Message(remote_port=box, id=GO, items=[Port(ctl, MAKE_SEND)]))
    assert m.msg_receive(ctl, m.RCV_TIMEOUT, 60_000).id == DONE
    return used


def test_a_channel_machd_has_no_descriptor_to_hand_over_goes_back_to_the_queue(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """machd out of descriptors when the receiver accepts a channel (EMFILE on the dup
    of its end): machd tears the channel down, so what the sender wrote on it goes into
    the port's queue, in order, and the receiver gets every message through machd."""
    with _own_machd(tmp_path_factory, "emfile") as pid:
        me = m.task_self()
        p, box = m.port_allocate(me), m.port_allocate(me)
        m.port_set_backlog(me, p, m.PORT_BACKLOG_MAX)
        h = m.spawn(_send_ten_then_wait, Port(p, MAKE_SEND), Port(box, MAKE_SEND),
                    name="sender")
        ctl = m.msg_receive(box, m.RCV_TIMEOUT, 60_000).items[0].name  # type: ignore
        with _no_spare_descriptors(pid):  # the accept's dup fails
            ids = [m.msg_receive(p, m.RCV_TIMEOUT, 20_000).id for _ in range(10)]
            accepted = p in _receivers()
        assert ids == list(range(10)) and not accepted
        m.msg_send(Message(remote_port=ctl, id=DONE))
        assert h.result(20_000) is True  # type: ignore[attr-defined]
        m.msg_send(Message(remote_port=p, id=42))  # machd still serves this task
        assert m.msg_receive(p, m.RCV_TIMEOUT, 20_000).id == 42


def _send_then_more_from_a_new_thread(dest: int, box: int) -> bool:
    """Send ids 0..9 (a channel follows); make a thread that, at GO on a control port,
    sends ids 10..14 (its first use of the channel: it has no alert yet); tell `box`
    (GO, the control port), then report DONE with what the thread saw, and stay until
    DONE. True if the thread's sends all went."""
    me = m.task_self()
    ctl = m.port_allocate(me)
    for i in range(10):
        m.msg_send(Message(remote_port=dest, id=i))
    assert dest in _channels()
    out: list[str] = []

    ready = m.port_allocate(me)

    def more() -> None:
        try:
            m.msg_send(Message(remote_port=ready, id=GO))  # (through machd: its own task)
            assert m.msg_receive(ctl, m.RCV_TIMEOUT, 60_000).id == GO
            for i in range(10, 15):
                m.msg_send(Message(remote_port=dest, id=i))
            out.append("sent")
        except m.MachError as e:
            out.append(e.code)

    m.thread_create(me, more)
    m.msg_receive(ready, m.RCV_TIMEOUT, 60_000)  # it runs: connected to machd before
    m.msg_send(Message(remote_port=box, id=GO, items=[Port(ctl, MAKE_SEND)]))  # the test
    deadline = time.monotonic() + 60  # takes machd's spare descriptors away
    while not out and time.monotonic() < deadline:
        time.sleep(0.01)
    out.append("no outcome")  # (if it never reported)
    m.msg_send(Message(remote_port=box, id=DONE, items=[Str(out[0])]))
    assert m.msg_receive(ctl, m.RCV_TIMEOUT, 60_000).id == DONE
    return out[0] == "sent"


def test_a_sender_whose_alert_machd_cannot_make_sends_through_machd_in_order(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """machd out of descriptors when a new thread of a sending task first uses a channel
    (its alert, THREAD_ALERT, cannot be made): the send does not fail; machd takes back
    what is on the channel and the thread's messages follow it, through machd."""
    with _own_machd(tmp_path_factory, "emfile-alert") as pid:
        me = m.task_self()
        p, box = m.port_allocate(me), m.port_allocate(me)
        m.port_set_backlog(me, p, m.PORT_BACKLOG_MAX)
        h = m.spawn(_send_then_more_from_a_new_thread, Port(p, MAKE_SEND),
                    Port(box, MAKE_SEND), name="sender")
        ctl = m.msg_receive(box, m.RCV_TIMEOUT, 60_000).items[0].name  # type: ignore
        ids = [m.msg_receive(p, m.RCV_TIMEOUT, 20_000).id for _ in range(3)]
        assert p in _receivers()  # the channel is accepted (a receive took from it)
        with _no_spare_descriptors(pid):  # none for the new thread's alert
            m.msg_send(Message(remote_port=ctl, id=GO))  # type: ignore[arg-type]
            outcome = m.msg_receive(box, m.RCV_TIMEOUT, 20_000).values()
        assert outcome == ["sent"]  # (before: KERN_RESOURCE_SHORTAGE from msg_send)
        ids += [m.msg_receive(p, m.RCV_TIMEOUT, 20_000).id for _ in range(3, 15)]
        assert ids == list(range(15))
        m.msg_send(Message(remote_port=ctl, id=DONE))  # type: ignore[arg-type]
        assert h.result(20_000) is True  # type: ignore[attr-defined]


def _worker_holds_then_ends(dest: int) -> list[bool]:
    """Send ids 0..4 (a channel follows); a thread sends id 100 carrying a right (held
    by machd, its token written) and ends on its own; then send id 200. Whether the
    channel was there before the thread and after its end."""
    me = m.task_self()
    for i in range(5):
        m.msg_send(Message(remote_port=dest, id=i))
    before = dest in _channels()
    threads = len(m.task_threads(me))
    m.thread_create(me, _send_held, dest, m.port_allocate(me))
    deadline = time.monotonic() + 60
    while len(m.task_threads(me)) > threads and time.monotonic() < deadline:
        time.sleep(0.01)  # (it ran and ended: gone from the task)
    time.sleep(0.3)  # (machd closes its connection)
    m.msg_send(Message(remote_port=dest, id=200))
    return [before, dest in _channels()]


def test_a_thread_that_ends_after_writing_its_token_leaves_the_channel(native: str) -> None:
    """A thread that sends a message machd holds and ends on its own has written the
    token: its task keeps the channel (a review's finding: every such end tore it
    down), and every message arrives in order."""
    me = m.task_self()
    p = m.port_allocate(me)
    m.port_set_backlog(me, p, m.PORT_BACKLOG_MAX)
    h = m.spawn(_worker_holds_then_ends, Port(p, MAKE_SEND), name="worker-holder")
    assert h.result(60_000) == [True, True]  # type: ignore[attr-defined]
    ids = [m.msg_receive(p, m.RCV_TIMEOUT, 10_000).id for _ in range(7)]
    assert ids == [0, 1, 2, 3, 4, 999, 200]


_GOOD_FRAME = direct.encode_packet(Message(id=7, items=[Int(1), Bytes(b"ab"), Str("x"),
                                                        IntArray([1, 2]), Float(1.5)]), 1, 1)


def _parse_or_refuse(data: bytes) -> None:
    """What a receiver and machd's read-back do with bytes off a channel: a frame, or a
    WireError; never another exception."""
    with contextlib.suppress(wire.WireError):
        _seq, msg, index = direct.decode_frame(data)
        assert direct.HELD <= index <= direct.REPLIES_MAX and msg.size <= m.MSG_SIZE_MAX
    frames, skipped = direct.scan_frames(data, 32)
    assert skipped <= len(data) and len(frames) <= 32


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_GOOD_FRAME) - 1), st.integers(0, 255)),
                max_size=6), st.integers(0, len(_GOOD_FRAME)))
def test_a_mutated_frame_is_a_frame_or_garbage(flips: list[tuple[int, int]],
                                               cut: int) -> None:
    data = bytearray(_GOOD_FRAME)
    for at, byte in flips:
        data[at] = byte
    _parse_or_refuse(bytes(data[:cut]))
    _parse_or_refuse(bytes(data))


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(-2**63, 2**63 - 1), st.integers(-2**31, 2**31 - 1),
       st.integers(0, 2**32 - 1), st.binary(max_size=64))
def test_a_forged_header_is_a_frame_or_garbage(length: int, msg_id: int, index: int,
                                               count: int, body: bytes) -> None:
    head = direct.HEAD.pack(direct.FRAME_MAGIC, length, 1, msg_id, index, count)
    _parse_or_refuse(head + body)
    honest = direct.HEAD.pack(direct.FRAME_MAGIC, direct.PACKET.size + len(body), 1, msg_id,
                              index, count)
    _parse_or_refuse(honest + body)
