"""Message semantics between two tasks across the changes a fast path must survive.

Every test here has messages flow between *different* tasks for a while ("warm"
traffic: enough plain messages that any per-pair fast path a backend keeps, such as a
direct channel between two native tasks, is in use), and then changes something under
that traffic: a message that needs the kernel (rights, another reply port), the receive
right moving, the port or the receiving task dying, the backlog, a receive that is too
small or times out, the receiving thread being terminated, the sender dropping its
right. The paper's semantics must hold throughout: per-sender order (3.1), messages
follow a moved receive right, port death reaches senders (NOTIFY_PORT_DELETED), the
backlog bounds the queue, port_status counts it.

CONTRACT: each test runs embedded (both schedulers) and with native tasks of machd.
"""

from __future__ import annotations

from typing import Any

import pytest

import pymach as m
from machutil import (
    bootstrap_port,
    parent_port,
    recv,
    sleep_ms,
    start_thread,
    wait_notification,
    wait_until,
)
from pymach import Int, Message, Port, Str

CONTRACT = True  # embedded (both schedulers) and as native tasks of machd (conftest.py)

WARM = 12  # plain messages exchanged first: any fast path between the two is in use
GO, DONE = 900, 901


def new_port() -> int:
    return m.port_allocate(m.task_self())  # type: ignore[no-any-return]


def send(dest: int, *items: object, msg_id: int = 1, reply: int = m.PORT_NULL,
         timeout: float = 3000) -> None:
    m.msg_send(Message(remote_port=dest, local_port=reply, id=msg_id, items=list(items)),
               m.SEND_TIMEOUT, timeout)


def queued(name: int) -> int:
    return m.port_status(m.task_self(), name)[1]  # type: ignore[no-any-return]


def received_port(box: int) -> int:
    """The name of the right carried by the next message on `box`."""
    return recv(box).items[0].name  # type: ignore[union-attr]


def from_parent() -> tuple[int, int]:
    """In a child: give the parent a send right to a new port of ours and take the
    right it sends back on it; returns (our port, the right's name)."""
    me = new_port()
    send(parent_port(), Port(me, m.MAKE_SEND))
    return me, received_port(me)


def warm(dest: int, count: int = WARM) -> None:
    """Plain messages to `dest`, ids 0..count-1 (each with its index)."""
    for i in range(count):
        send(dest, Int(i), msg_id=i)


def expect_ids(port: int, ids: list[int]) -> None:
    got = [recv(port).id for _ in ids]
    assert got == ids


def sender_child() -> Any:
    """A child that gets a send right to the parent's port and a port of its own to be
    told what to do; it sends each batch it is told to, and reports DONE after each."""

    def child() -> None:
        me, dest = from_parent()
        while True:
            order = recv(me, 10_000)
            if order.id == DONE:
                return
            first, count = order.values()
            for i in range(first, first + count):
                send(dest, Int(i), msg_id=i)
            send(parent_port(), msg_id=DONE)

    return child


def start_sender(kernel: m.Kernel, b: int, dest: int) -> tuple[Any, int]:
    """Spawn a sender child; give it a send right to `dest`; returns (handle, its port)."""
    h = kernel.spawn(sender_child())
    ctl = received_port(b)
    send(ctl, Port(dest, m.MAKE_SEND))
    return h, ctl


def with_sender(kernel: m.Kernel) -> tuple[int, int, Any, int]:
    """Our bootstrap port b, a port p of ours (backlog PORT_BACKLOG_MAX) and a sender
    child for p: (b, p, its handle, its control port)."""
    b = bootstrap_port()
    p = new_port()
    m.port_set_backlog(m.task_self(), p, m.PORT_BACKLOG_MAX)
    h, ctl = start_sender(kernel, b, p)
    return b, p, h, ctl


def finish(ctl: int, h: Any) -> None:
    """Tell a sender child to return, and wait for it."""
    send(ctl, msg_id=DONE)
    h.result(10_000)


def send_outcome(dest: int) -> str:
    """Send a plain message to `dest`: "sent", or the SendError's code."""
    try:
        send(dest, Int(0))
    except m.SendError as e:
        return e.code
    return "sent"


def spawn_with_right(kernel: m.Kernel, b: int, child: Any) -> tuple[int, Any]:
    """A new port of ours (backlog PORT_BACKLOG_MAX) and a child running `child`, which
    gets a send right to it through from_parent(); returns (the port, the handle)."""
    p = new_port()
    m.port_set_backlog(m.task_self(), p, m.PORT_BACKLOG_MAX)
    h = kernel.spawn(child)
    send(received_port(b), Port(p, m.MAKE_SEND))
    return p, h


def order(ctl: int, b: int, first: int, count: int) -> None:
    """Tell a sender child to send ids first..first+count-1; wait until it has."""
    send(ctl, Int(first), Int(count), msg_id=GO)
    assert recv(b).id == DONE


# -- order across plain messages and messages that need the kernel ---------------------------


def test_order_holds_when_plain_and_right_carrying_messages_alternate(kernel: m.Kernel) -> None:
    p = bootstrap_port()
    m.port_set_backlog(m.task_self(), p, m.PORT_BACKLOG_MAX)

    def child() -> None:
        dest = parent_port()
        warm(dest)
        other = new_port()
        for i in range(WARM, WARM + 30):
            if i % 5 == 0:  # a right: the kernel must carry it
                send(dest, Port(new_port(), m.MAKE_SEND), msg_id=i)
            elif i % 7 == 0:  # a reply port other than any used before
                send(dest, Str("r"), msg_id=i, reply=other)
            else:
                send(dest, Int(i), msg_id=i)

    h = kernel.spawn(child)
    expect_ids(p, list(range(WARM + 30)))
    h.result(10_000)


def test_order_per_sender_with_two_sender_tasks_and_the_default_group(
        kernel: m.Kernel) -> None:
    b = bootstrap_port()
    p1, p2 = new_port(), new_port()
    for p in (p1, p2):
        m.port_enable(m.task_self(), p)
    (h1, c1), (h2, c2) = start_sender(kernel, b, p1), start_sender(kernel, b, p2)
    seen: dict[int, list[int]] = {p1: [], p2: []}
    for start in range(0, 40, 4):
        send(c1, Int(start), Int(4), msg_id=GO)
        send(c2, Int(start), Int(4), msg_id=GO)
        for _ in range(8):
            msg = recv()  # the default group: both ports
            seen[msg.local_port].append(msg.id)
        assert [recv(b).id, recv(b).id] == [DONE, DONE]
    assert seen == {p1: list(range(40)), p2: list(range(40))}
    for ctl, h in ((c1, h1), (c2, h2)):
        finish(ctl, h)


# -- the receive right moves, the port dies, the receiver dies --------------------------------


def test_queued_messages_follow_a_moved_receive_right(kernel: m.Kernel) -> None:
    b, p, h, ctl = with_sender(kernel)
    order(ctl, b, 0, WARM)
    expect_ids(p, list(range(WARM)))
    order(ctl, b, WARM, 10)  # queued, not received here

    def new_receiver() -> list[int]:
        _, mine = from_parent()
        return [recv(mine).id for _ in range(15)]

    r = kernel.spawn(new_receiver)
    send(received_port(b), Port(p, m.MOVE_RECEIVE))
    order(ctl, b, WARM + 10, 5)  # sent to the port's new receiver
    assert r.result(10_000) == list(range(WARM, WARM + 15))
    finish(ctl, h)


def test_a_sender_is_told_when_the_port_it_sends_to_dies(kernel: m.Kernel) -> None:
    b = bootstrap_port()

    def child() -> str:
        _, dest = from_parent()
        warm(dest)
        send(parent_port(), msg_id=DONE)
        wait_notification(m.NOTIFY_PORT_DELETED, dest, 10_000)
        return send_outcome(dest)

    p, h = spawn_with_right(kernel, b, child)
    assert recv(b).id == DONE
    expect_ids(p, list(range(WARM)))
    m.port_deallocate(m.task_self(), p)  # the receive right: the port dies
    assert h.result(10_000) == "SEND_INVALID_PORT"


def test_a_dead_receiver_task_fails_later_sends(kernel: m.Kernel) -> None:
    b = bootstrap_port()

    def receiver() -> None:
        mine = new_port()
        m.port_set_backlog(m.task_self(), mine, m.PORT_BACKLOG_MAX)
        send(parent_port(), Port(mine, m.MAKE_SEND))
        expect_ids(mine, list(range(WARM)))
        send(parent_port(), msg_id=DONE)
        recv(new_port(), 60_000)  # until terminated

    h = kernel.spawn(receiver)
    dest = received_port(b)
    warm(dest)
    assert recv(b).id == DONE
    m.task_terminate(h.port)
    wait_notification(m.NOTIFY_PORT_DELETED, dest)
    with pytest.raises(m.SendError) as e:
        send(dest, Int(0))
    assert e.value.code == "SEND_INVALID_PORT"


# -- backlog, receive options, a terminated receiving thread ----------------------------------


def test_a_backlog_set_under_traffic_bounds_the_queue(kernel: m.Kernel) -> None:
    b = bootstrap_port()

    def child() -> str:
        me, dest = from_parent()
        warm(dest)
        send(parent_port(), msg_id=DONE)
        assert recv(me, 10_000).id == GO
        send(dest, Int(0), msg_id=100)
        send(dest, Int(1), msg_id=101)
        try:
            send(dest, Int(2), msg_id=102, timeout=0)
        except m.SendError as e:
            return e.code
        return "sent"

    p = new_port()
    m.port_set_backlog(m.task_self(), p, m.PORT_BACKLOG_MAX)
    h = kernel.spawn(child)
    go = received_port(b)
    send(go, Port(p, m.MAKE_SEND))
    assert recv(b).id == DONE
    expect_ids(p, list(range(WARM)))
    m.port_set_backlog(m.task_self(), p, 2)
    send(go, msg_id=GO)
    assert h.result(10_000) == "SEND_TIMED_OUT"
    assert queued(p) == 2
    expect_ids(p, [100, 101])
    assert queued(p) == 0


def test_too_small_and_timed_out_receives_under_traffic(kernel: m.Kernel) -> None:
    b, p, h, ctl = with_sender(kernel)
    order(ctl, b, 0, WARM)
    expect_ids(p, list(range(WARM)))
    order(ctl, b, WARM, 1)
    assert queued(p) == 1
    with pytest.raises(m.RcvError) as e:
        m.msg_receive(p, m.RCV_TIMEOUT, 1000, 8)
    assert e.value.code == "RCV_TOO_LARGE"
    assert queued(p) == 1
    assert recv(p).id == WARM  # still there, whole
    with pytest.raises(m.RcvError) as e:
        m.msg_receive(p, m.RCV_TIMEOUT, 30)
    assert e.value.code == "RCV_TIMED_OUT"
    order(ctl, b, WARM + 1, 1)
    assert recv(p).id == WARM + 1
    finish(ctl, h)


def test_a_receiving_thread_terminated_while_it_waits(kernel: m.Kernel) -> None:
    b, p, h, ctl = with_sender(kernel)
    got: list[int] = []

    def receiving() -> None:
        while True:
            got.append(m.msg_receive(p).id)  # no timeout: waits

    t, box = start_thread(receiving)
    order(ctl, b, 0, WARM)
    wait_until(lambda: len(got) == WARM)
    sleep_ms(20)  # it waits for the next message (or is about to)
    m.thread_terminate(t)
    wait_until(lambda: "done" in box)
    order(ctl, b, WARM, 3)  # nothing of it was taken by the terminated thread
    expect_ids(p, [WARM, WARM + 1, WARM + 2])
    assert got == list(range(WARM))
    finish(ctl, h)


# -- reply ports, and a sender that lets its right go -----------------------------------------


def test_replies_go_to_the_reply_port_each_request_names(kernel: m.Kernel) -> None:
    b = bootstrap_port()

    def server() -> None:
        inbox = new_port()
        send(parent_port(), Port(inbox, m.MAKE_SEND))
        while True:
            req = recv(inbox, 10_000)
            if req.id == DONE:
                return
            send(req.remote_port, Int(req.id), msg_id=req.id + 1000)

    h = kernel.spawn(server)
    inbox = received_port(b)
    r1, r2 = new_port(), new_port()
    for i in range(3 * WARM):
        reply = r1 if (i // 5) % 2 == 0 else r2
        ans = m.msg_rpc(Message(remote_port=inbox, local_port=reply, id=i),
                        m.RCV_TIMEOUT, receive_timeout=3000)
        assert (ans.id, ans.local_port, ans.values()) == (i + 1000, reply, [i])
    assert queued(r1) == queued(r2) == 0
    send(inbox, msg_id=DONE)
    h.result(10_000)


def test_a_sender_that_deallocated_its_right_cannot_send(kernel: m.Kernel) -> None:
    b = bootstrap_port()

    def child() -> str:
        _, dest = from_parent()
        warm(dest)
        m.port_deallocate(m.task_self(), dest)
        return send_outcome(dest)

    p, h = spawn_with_right(kernel, b, child)
    assert h.result(10_000) == "SEND_INVALID_PORT"
    expect_ids(p, list(range(WARM)))
    assert queued(p) == 0
