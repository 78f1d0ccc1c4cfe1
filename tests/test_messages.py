"""Messages: typed items, port dispositions, the header, ordering, backlog, sizes, msg_rpc."""

from __future__ import annotations

import threading

import pytest

import pymach as m
from machutil import (
    assert_kernel_ok,
    bootstrap_port,
    has_name,
    notifications,
    parent_port,
    recv,
    start_thread,
    thread_state,
    wait_until,
)
from pymach import (
    COPY_SEND,
    MAKE_SEND,
    MOVE_ALL,
    MOVE_OWNERSHIP,
    MOVE_RECEIVE,
    MOVE_SEND,
    OOL,
    Bytes,
    Float,
    Int,
    IntArray,
    Message,
    Port,
    PortArray,
    Str,
)
from pymach.include.message import MSG_DESCRIPTOR_SIZE, MSG_HEADER_SIZE, Code
from pymach.ipc.ipc_notify import NOTIFY_OVERFLOW

CONTRACT = True  # these run as native tasks of machd too (conftest.py)


def new_port() -> int:
    return m.port_allocate(m.task_self())  # type: ignore[no-any-return]


def status(name: int) -> tuple[bool, int, int, bool, bool]:
    return m.port_status(m.task_self(), name)  # type: ignore[no-any-return]


def send(dest: int, *items: object, msg_id: int = 1, reply: int = m.PORT_NULL,
         timeout: float = 0) -> None:
    m.msg_send(Message(remote_port=dest, local_port=reply, id=msg_id, items=list(items)),
               m.SEND_TIMEOUT, timeout)


def rights(kernel: m.Kernel, name: int, task: str = "bootstrap") -> str:
    return next((r.rights for r in kernel.lsmp(task) if r.name == name), "")


# -- items -------------------------------------------------------------------------------


@pytest.mark.parametrize("item, value", [
    (Int(0), 0),
    (Int(-(2**63)), -(2**63)),
    (Int(2**63 - 1), 2**63 - 1),
    (Float(2.5), 2.5),
    (Float(-1e300), -1e300),
    (Bytes(b""), b""),
    (Bytes(b"\x00\xff" * 100), b"\x00\xff" * 100),
    (Bytes(bytearray(b"abc")), b"abc"),
    (Bytes(memoryview(b"xyz")), b"xyz"),
    (Str(""), ""),
    (Str("Mach \u2192 \U0001f600"), "Mach \u2192 \U0001f600"),
    (IntArray((1, -2, 2**62)), (1, -2, 2**62)),
    (IntArray([4, 5]), (4, 5)),
    (IntArray(()), ()),
])
def test_plain_item_round_trip(kernel: m.Kernel, item: object, value: object) -> None:
    p = new_port()
    send(p, item, Int(99), msg_id=1234)
    msg = recv(p)
    assert msg.id == 1234
    assert msg.values() == [value, 99]
    assert type(msg.items[0]) is type(item)
    assert type(msg.values()[0]) is type(value)


def test_all_items_in_one_message(kernel: m.Kernel) -> None:
    p, q = new_port(), new_port()

    def entry(x: int) -> int:
        return x + 1

    code = Code(entry, (1,), {})
    items = [Int(1), Float(2.0), Bytes(b"3"), Str("4"), IntArray((5,)), Port(q, COPY_SEND),
             PortArray((q, q), COPY_SEND), code]
    send(p, *items)
    msg = recv(p)
    assert [type(i) for i in msg.items] == [type(i) for i in items]
    assert msg.values()[:7] == [1, 2.0, b"3", "4", (5,), q, (q, q)]
    got = msg.items[7]
    assert isinstance(got, Code) and got.fn(*got.args) == 2
    assert not msg.simple
    assert Message(items=[Int(1), Str("x")]).simple


def test_int_item_beyond_64_bits_is_refused(kernel: m.Kernel) -> None:
    p = new_port()
    for bad in (Int(2**63), Int(-(2**63) - 1), IntArray((2**64,))):
        with pytest.raises(m.SendError) as e:
            send(p, bad)
        assert e.value.code == "SEND_INVALID_TYPE"
    assert status(p)[1] == 0


def test_ool_is_refused_without_vm_and_leaves_rights(kernel: m.Kernel) -> None:
    p, q = new_port(), new_port()
    with pytest.raises(m.SendError) as e:
        send(p, Port(q, MOVE_RECEIVE), OOL(0x1000, 4096))
    assert e.value.code == "SEND_INVALID_MEMORY"
    assert status(q)[3:] == (True, True)  # the receive right did not move
    assert status(p)[1] == 0
    assert_kernel_ok()


def test_sent_items_are_copied_not_shared(kernel: m.Kernel) -> None:
    p = new_port()
    data = bytearray(b"before")
    arr = [1, 2, 3]
    send(p, Bytes(data), IntArray(arr))
    data[:] = b"after!"
    arr.append(4)
    assert recv(p).values() == [b"before", (1, 2, 3)]


# -- message size ----------------------------------------------------------------------


def test_message_size_formula() -> None:
    msg = Message(items=[Int(1), Str("abc"), Bytes(b"12345"), IntArray((1, 2)),
                         PortArray((1, 2, 3))])
    data = 8 + 4 + 8 + 16 + 12  # Str carries a NUL; data is rounded up to 4 bytes
    assert msg.size == MSG_HEADER_SIZE + 5 * MSG_DESCRIPTOR_SIZE + data
    assert Message().size == MSG_HEADER_SIZE


@pytest.mark.parametrize("deterministic", [False, True], ids=["free", "det"])
def test_inline_size_limit(deterministic: bool) -> None:
    limit = 256
    with m.boot(deterministic=deterministic, msg_size_max=limit) as k:
        assert k.msg_size_max == limit
        p, q = new_port(), new_port()
        room = limit - MSG_HEADER_SIZE - MSG_DESCRIPTOR_SIZE
        send(p, Bytes(b"x" * room))
        assert recv(p).values() == [b"x" * room]
        with pytest.raises(m.SendError) as e:
            send(p, Bytes(b"x" * (room + 1)), timeout=0)
        assert e.value.code == "SEND_MSG_TOO_LARGE"
        # a refused message moves no rights
        with pytest.raises(m.SendError):
            send(p, Port(q, MOVE_ALL), Bytes(b"x" * room))
        assert status(q)[3:] == (True, True)
        assert status(p)[1] == 0
        assert_kernel_ok()


def test_default_size_limit(kernel: m.Kernel) -> None:
    assert kernel.msg_size_max == m.MSG_SIZE_MAX == 8192
    p = new_port()
    with pytest.raises(m.SendError) as e:
        send(p, Bytes(bytes(8192)))
    assert e.value.code == "SEND_MSG_TOO_LARGE"
    send(p, Bytes(bytes(8192 - MSG_HEADER_SIZE - MSG_DESCRIPTOR_SIZE)))
    assert len(recv(p).values()[0]) == 8160


# -- dispositions ------------------------------------------------------------------------


def test_copy_send_keeps_sender_right(kernel: m.Kernel) -> None:
    p = new_port()
    b = bootstrap_port()

    def child() -> tuple[object, ...]:
        send(parent_port(), Port(parent_port(), COPY_SEND), timeout=1000)
        return (has_name(parent_port()),)

    assert kernel.run(child, timeout=5000) == (True,)
    msg = recv(b)
    item = msg.items[0]
    assert isinstance(item, Port) and item.disposition == MOVE_SEND
    assert item.name == b  # our own port comes back under our own name
    assert status(p)[3:] == (True, True)


def test_each_send_disposition_arrives_as_move_send(kernel: m.Kernel) -> None:
    b = bootstrap_port()

    def child() -> list[tuple[int, str]]:
        inbox = new_port()
        send(parent_port(), Port(inbox, MAKE_SEND), timeout=1000)
        msg = recv(inbox)
        return [(int(i.disposition), rights_of(i.name)) for i in msg.items  # type: ignore
                ]

    def rights_of(name: int) -> str:
        st = m.port_status(m.task_self(), name)
        return "recv" if st[3] else ("own" if st[4] else "send")

    h = kernel.spawn(child)
    inbox = recv(b).items[0].name  # type: ignore[union-attr]
    a, c, d = new_port(), new_port(), new_port()
    send(inbox, Port(a, COPY_SEND), Port(c, MAKE_SEND), Port(d, MOVE_SEND))
    assert h.result(5000) == [(int(MOVE_SEND), "send")] * 3
    assert rights(kernel, a) == rights(kernel, c) == "recv+own+send"
    assert rights(kernel, d) == "recv+own"  # the send right itself moved


def test_move_send_removes_a_send_only_name(kernel: m.Kernel) -> None:
    b = bootstrap_port()
    p = new_port()

    def child() -> tuple[bool, int]:
        bp = parent_port()
        send(bp, Port(bp, MOVE_SEND), timeout=1000)
        return has_name(bp), bp

    still, name = kernel.run(child, timeout=5000)
    assert still is False
    item = recv(b).items[0]
    assert isinstance(item, Port) and item.name == b and item.disposition == MOVE_SEND
    assert status(p)[3:] == (True, True)
    _ = name


def test_make_send_needs_receive_rights(kernel: m.Kernel) -> None:
    b = bootstrap_port()

    def child() -> str:
        bp = parent_port()
        try:
            send(bp, Port(bp, MAKE_SEND), timeout=1000)
        except m.SendError as e:
            return e.code
        return "sent"

    assert kernel.run(child, timeout=5000) == "SEND_INVALID_RIGHT"
    assert status(b)[1] == 0


@pytest.mark.parametrize("disp, sender_after, receiver_after", [
    (MOVE_RECEIVE, (False, True), (True, False)),
    (MOVE_OWNERSHIP, (True, False), (False, True)),
    (MOVE_ALL, (False, False), (True, True)),
])
def test_moving_receive_and_ownership(kernel: m.Kernel, disp: m.Disposition,
                                      sender_after: tuple[bool, bool],
                                      receiver_after: tuple[bool, bool]) -> None:
    b = bootstrap_port()
    q = new_port()

    def child() -> tuple[object, ...]:
        inbox = new_port()
        send(parent_port(), Port(inbox, MAKE_SEND), timeout=1000)
        item = recv(inbox).items[0]
        assert isinstance(item, Port)
        st = m.port_status(m.task_self(), item.name)
        send(parent_port(), Int(1), timeout=1000)
        recv(inbox)  # stay alive until the parent has looked
        return item.disposition, st[3:]

    h = kernel.spawn(child)
    inbox = recv(b).items[0].name  # type: ignore[union-attr]
    send(inbox, Port(q, disp))
    assert recv(b).values() == [1]
    # the sender always keeps a send right
    assert status(q)[3:] == sender_after
    assert rights(kernel, q).endswith("send")
    task_rows = kernel.lsmp(h.task)
    row = next(r for r in kernel.lsmp("bootstrap") if r.name == q)
    assert (row.receiver == h.task.name) == receiver_after[0]
    assert (row.owner == h.task.name) == receiver_after[1]
    assert any(r.port == row.port for r in task_rows)
    send(inbox, Int(0))
    got_disp, got = h.result(5000)
    assert got_disp == disp
    assert got == receiver_after


def test_receive_right_cannot_be_sent_to_its_own_port(kernel: m.Kernel) -> None:
    p = new_port()
    for disp in (MOVE_RECEIVE, MOVE_ALL):
        with pytest.raises(m.SendError) as e:
            send(p, Port(p, disp))
        assert e.value.code == "SEND_INVALID_RIGHT"
    assert status(p) == (False, 0, 5, True, True)


def test_rights_are_checked_as_a_whole(kernel: m.Kernel) -> None:
    """A right can move once per message; a refused message changes nothing."""
    p, q = new_port(), new_port()
    with pytest.raises(m.SendError) as e:
        send(p, Port(q, MOVE_RECEIVE), Port(q, MAKE_SEND))
    assert e.value.code == "SEND_INVALID_RIGHT"
    with pytest.raises(m.SendError):
        send(p, PortArray((q, q), MOVE_ALL))
    assert status(q) == (False, 0, 5, True, True)
    # the other order is fine: make a send right first, then move the receive right
    send(p, Port(q, MAKE_SEND), Port(q, MOVE_RECEIVE))
    msg = recv(p)
    assert [i.name for i in msg.items] == [q, q]  # type: ignore[union-attr]
    assert status(q)[3:] == (True, True)


def test_port_array_moves_every_right(kernel: m.Kernel) -> None:
    p = new_port()
    qs = [new_port() for _ in range(3)]
    send(p, PortArray(qs, MOVE_RECEIVE))
    assert all(status(q)[3:] == (False, True) for q in qs)
    item = recv(p).items[0]
    assert isinstance(item, PortArray) and item.disposition == MOVE_RECEIVE
    assert item.names == tuple(qs)
    assert all(status(q)[3:] == (True, True) for q in qs)


def test_right_to_dead_port_arrives_as_port_null(kernel: m.Kernel) -> None:
    task = m.task_self()
    p, q = new_port(), new_port()
    send(p, Port(q, COPY_SEND), PortArray((q,), COPY_SEND))
    m.port_deallocate(task, q)
    msg = recv(p)
    assert msg.values() == [m.PORT_NULL, (m.PORT_NULL,)]
    assert not has_name(q)


# -- header -----------------------------------------------------------------------------


def test_header_swap_and_reply(kernel: m.Kernel) -> None:
    b = bootstrap_port()

    def server() -> tuple[int, int]:
        inbox = new_port()
        send(parent_port(), Port(inbox, MAKE_SEND), timeout=1000)
        req = recv(inbox)
        reply = Message(remote_port=req.remote_port, id=req.id + 100,
                        items=[Int(req.values()[0] * 2)])
        m.msg_send(reply, m.SEND_TIMEOUT, 1000)
        return req.local_port, inbox

    h = kernel.spawn(server)
    inbox = recv(b).items[0].name  # type: ignore[union-attr]
    r = new_port()
    send(inbox, Int(21), msg_id=7, reply=r)
    ans = recv(r)
    assert (ans.id, ans.values(), ans.local_port, ans.remote_port) == (107, [42], r, 0)
    arrived_on, server_inbox = h.result(5000)
    assert arrived_on == server_inbox


def test_header_in_same_task(kernel: m.Kernel) -> None:
    p, r = new_port(), new_port()
    send(p, msg_id=5, reply=r)
    msg = recv(p)
    assert (msg.local_port, msg.remote_port, msg.id, msg.items) == (p, r, 5, [])
    send(p)
    assert recv(p).remote_port == m.PORT_NULL


def test_reply_port_dispositions(kernel: m.Kernel) -> None:
    b = bootstrap_port()
    p = new_port()

    def child() -> tuple[object, ...]:
        bp = parent_port()
        mine = new_port()
        # default for a send right: COPY_SEND, we keep it
        m.msg_send(Message(remote_port=bp, local_port=bp, id=1), m.SEND_TIMEOUT, 1000)
        kept = has_name(bp)
        # default for a port we receive on: MAKE_SEND; the parent answers on it
        m.msg_send(Message(remote_port=bp, local_port=mine, id=2), m.SEND_TIMEOUT, 1000)
        answer = recv(mine).values()
        mine_kept = m.port_status(m.task_self(), mine)[3:] == (True, True)
        # MOVE_SEND gives our send right away
        m.msg_send(Message(remote_port=bp, local_port=bp, id=3, local_disposition=MOVE_SEND),
                   m.SEND_TIMEOUT, 1000)
        return kept, answer, mine_kept, has_name(bp)

    h = kernel.spawn(child)
    m1, m2 = recv(b), recv(b)
    assert (m1.id, m1.remote_port) == (1, b)
    assert m2.id == 2 and m2.remote_port not in (0, b, p)
    assert rights(kernel, m2.remote_port) == "send"
    send(m2.remote_port, Str("answer"))
    assert h.result(5000) == (True, ["answer"], True, False)
    m3 = recv(b)
    assert (m3.id, m3.remote_port) == (3, b)
    # a reply port the sender cannot give a send right for is refused
    with pytest.raises(m.SendError) as e:
        m.msg_send(Message(remote_port=p, local_port=12345))
    assert e.value.code == "SEND_INVALID_PORT"
    with pytest.raises(m.SendError) as e:
        m.msg_send(Message(remote_port=p, local_port=p, local_disposition=MOVE_RECEIVE))
    assert e.value.code == "SEND_INVALID_TYPE"


# -- ordering -----------------------------------------------------------------------------


def test_fifo_from_one_sender(kernel: m.Kernel) -> None:
    p = new_port()
    m.port_set_backlog(m.task_self(), p, m.PORT_BACKLOG_MAX)
    for i in range(16):
        send(p, Int(i), msg_id=i)
    assert [recv(p).id for _ in range(16)] == list(range(16))


def test_order_per_sender_with_many_senders(kernel: m.Kernel) -> None:
    p = new_port()
    n_senders, n_msgs = 3, 20

    def sender(k: int) -> None:
        for i in range(n_msgs):
            m.msg_send(Message(remote_port=p, id=k, items=[Int(i)]), m.SEND_TIMEOUT, 5000)

    for k in range(n_senders):
        start_thread(sender, k)
    seen: dict[int, list[int]] = {k: [] for k in range(n_senders)}
    for _ in range(n_senders * n_msgs):
        msg = recv(p)
        seen[msg.id].append(msg.values()[0])
    assert seen == {k: list(range(n_msgs)) for k in range(n_senders)}


# -- backlog ------------------------------------------------------------------------------


def test_full_queue_fails_at_once_with_zero_timeout(kernel: m.Kernel) -> None:
    p = new_port()
    for i in range(m.PORT_BACKLOG_DEFAULT):
        send(p, Int(i))
    t0 = kernel.sched.now()
    with pytest.raises(m.SendError) as e:
        send(p, Int(99), timeout=0)
    assert e.value.code == "SEND_TIMED_OUT"
    assert kernel.sched.now() - t0 < 500
    assert status(p)[1] == m.PORT_BACKLOG_DEFAULT


def test_full_queue_times_out_after_timeout(kernel: m.Kernel) -> None:
    p, q = new_port(), new_port()
    m.port_set_backlog(m.task_self(), p, 1)
    send(p, Int(0))
    t0 = kernel.sched.now()
    with pytest.raises(m.SendError) as e:
        send(p, Port(q, MOVE_ALL), timeout=40)
    assert e.value.code == "SEND_TIMED_OUT"
    assert kernel.sched.now() - t0 >= 39
    # the timed-out send left the sender's rights as they were
    assert status(q) == (False, 0, 5, True, True)
    assert status(p)[1] == 1


def test_full_queue_blocks_until_room(kernel: m.Kernel) -> None:
    p = new_port()
    m.port_set_backlog(m.task_self(), p, 2)
    send(p, Int(0))
    send(p, Int(1))

    def blocked_sender() -> None:
        m.msg_send(Message(remote_port=p, items=[Int(2)]))  # no timeout: waits

    tname, box = start_thread(blocked_sender)
    wait_until(lambda: thread_state(tname) == "waiting")
    assert "done" not in box and status(p)[1] == 2
    assert recv(p).values() == [0]
    wait_until(lambda: "done" in box)
    assert "error" not in box
    assert [recv(p).values(), recv(p).values()] == [[1], [2]]


def test_notifications_are_bounded_by_the_notify_backlog(kernel: m.Kernel) -> None:
    """Kernel notifications never block the kernel, so past the notify port's backlog
    they are dropped and counted in one NOTIFY_OVERFLOW notice (ipc_notify.py)."""
    task = m.task_self()
    notify = m.task_notify()
    m.port_set_backlog(task, notify, 1)
    holders = []
    b = bootstrap_port()

    def child() -> None:
        ports = [new_port() for _ in range(3)]
        for p in ports:
            send(parent_port(), Port(p, MAKE_SEND), timeout=1000)
        recv(ports[0])  # until the parent says go

    h = kernel.spawn(child)
    holders = [recv(b).items[0].name for _ in range(3)]  # type: ignore[union-attr]
    send(holders[0], Int(0))
    h.result(5000)
    wait_until(lambda: status(notify)[1] >= 2)  # 3 ports and the task port died
    got = notifications()
    assert [kind for kind, _ in got] == [m.NOTIFY_PORT_DELETED, NOTIFY_OVERFLOW]
    assert got[1][1] >= 3  # the notice counts the deaths it stands for
    # task messages still respect the backlog of 1
    send(notify, Int(0))
    with pytest.raises(m.SendError):
        send(notify, Int(1))


def test_send_timeout_needs_option(kernel: m.Kernel) -> None:
    p = new_port()
    with pytest.raises(m.KernError) as e:
        m.msg_send(Message(remote_port=p), m.MSG_OPTION_NONE, 10)
    assert e.value.code == "KERN_INVALID_ARGUMENT"
    with pytest.raises(m.KernError) as e:
        m.msg_receive(p, m.MSG_OPTION_NONE, 10)
    assert e.value.code == "KERN_INVALID_ARGUMENT"
    assert status(p)[1] == 0


# -- receive ------------------------------------------------------------------------------


def test_receive_timeout(kernel: m.Kernel) -> None:
    p = new_port()
    t0 = kernel.sched.now()
    with pytest.raises(m.RcvError) as e:
        m.msg_receive(p, m.RCV_TIMEOUT, 30)
    assert e.value.code == "RCV_TIMED_OUT"
    assert kernel.sched.now() - t0 >= 29
    with pytest.raises(m.RcvError) as e:
        m.msg_receive(p, m.RCV_TIMEOUT, 0)
    assert e.value.code == "RCV_TIMED_OUT"


def test_receive_blocks_until_message(kernel: m.Kernel) -> None:
    p = new_port()
    tname, box = start_thread(lambda: m.msg_receive(p).values())
    wait_until(lambda: thread_state(tname) == "waiting")
    send(p, Str("wake"))
    wait_until(lambda: "done" in box)
    assert box["result"] == ["wake"]


def test_rcv_size_too_small_leaves_message_queued(kernel: m.Kernel) -> None:
    p = new_port()
    msg = Message(remote_port=p, items=[Bytes(b"y" * 100)])
    size = msg.size
    m.msg_send(msg)
    with pytest.raises(m.RcvError) as e:
        m.msg_receive(p, m.RCV_TIMEOUT, 0, size - 1)
    assert e.value.code == "RCV_TOO_LARGE"
    assert status(p)[1] == 1
    assert m.msg_receive(p, m.RCV_TIMEOUT, 0, size).values() == [b"y" * 100]


def test_receive_with_message_argument_uses_its_local_port(kernel: m.Kernel) -> None:
    p = new_port()
    send(p, Int(3))
    assert m.msg_receive(Message(local_port=p), m.RCV_TIMEOUT, 1000).values() == [3]


def test_receive_from_default_group_reports_port(kernel: m.Kernel) -> None:
    task = m.task_self()
    a, b = new_port(), new_port()
    m.port_enable(task, a)
    m.port_enable(task, b)
    send(b, Int(2))
    send(a, Int(1))
    send(b, Int(3))
    got = [(msg.local_port, msg.values()[0]) for msg in (recv(), recv(), recv())]
    assert got == [(b, 2), (a, 1), (b, 3)]


def test_receive_on_send_right_is_refused(kernel: m.Kernel) -> None:
    b = bootstrap_port()

    def child() -> str:
        try:
            m.msg_receive(parent_port(), m.RCV_TIMEOUT, 0)
        except m.RcvError as e:
            return e.code
        return "received"

    send(b, Int(1))
    assert kernel.run(child, timeout=5000) == "RCV_INVALID_PORT"
    assert status(b)[1] == 1


# -- msg_rpc ------------------------------------------------------------------------------


def echo_server(inbox: int, count: int) -> None:
    for _ in range(count):
        req = m.msg_receive(inbox, m.RCV_TIMEOUT, 5000)
        m.msg_send(Message(remote_port=req.remote_port, id=req.id + 100,
                           items=list(req.items)), m.SEND_TIMEOUT, 5000)


def test_msg_rpc_round_trip(kernel: m.Kernel) -> None:
    inbox, reply = new_port(), new_port()
    start_thread(echo_server, inbox, 3)
    for i in range(3):
        ans = m.msg_rpc(Message(remote_port=inbox, local_port=reply, id=i,
                                items=[Str(f"n{i}")]), m.RCV_TIMEOUT, receive_timeout=5000)
        assert (ans.id, ans.values(), ans.local_port) == (i + 100, [f"n{i}"], reply)


def test_msg_rpc_receive_timeout_after_delivery(kernel: m.Kernel) -> None:
    inbox, reply = new_port(), new_port()
    with pytest.raises(m.RcvError) as e:
        m.msg_rpc(Message(remote_port=inbox, local_port=reply, id=9), m.RCV_TIMEOUT,
                  receive_timeout=20)
    assert e.value.code == "RCV_TIMED_OUT"
    assert status(inbox)[1] == 1  # the request was sent
    req = recv(inbox)
    assert (req.id, req.remote_port) == (9, reply)


def test_msg_rpc_send_timeout(kernel: m.Kernel) -> None:
    inbox, reply = new_port(), new_port()
    m.port_set_backlog(m.task_self(), inbox, 1)
    send(inbox)
    with pytest.raises(m.SendError) as e:
        m.msg_rpc(Message(remote_port=inbox, local_port=reply), m.SEND_TIMEOUT,
                  send_timeout=0)
    assert e.value.code == "SEND_TIMED_OUT"
    assert status(inbox)[1] == 1


def test_msg_rpc_rcv_size(kernel: m.Kernel) -> None:
    inbox, reply = new_port(), new_port()
    start_thread(echo_server, inbox, 1)
    msg = Message(remote_port=inbox, local_port=reply, items=[Bytes(b"z" * 64)])
    with pytest.raises(m.RcvError) as e:
        m.msg_rpc(msg, m.RCV_TIMEOUT, rcv_size=msg.size - 1, receive_timeout=5000)
    assert e.value.code == "RCV_TOO_LARGE"
    assert recv(reply, rcv_size=msg.size).values() == [b"z" * 64]


def test_msg_rpc_needs_reply_port(kernel: m.Kernel) -> None:
    p = new_port()
    with pytest.raises(m.RcvError) as e:
        m.msg_rpc(Message(remote_port=p))
    assert e.value.code == "RCV_INVALID_PORT"
    assert status(p)[1] == 0


def send_receive_server(inbox: int, count: int) -> None:
    """echo_server written the way a Mach server loop is: reply and receive in one call."""
    req = m.msg_receive(inbox, m.RCV_TIMEOUT, 5000)
    for i in range(count):
        reply = Message(remote_port=req.remote_port, id=req.id + 100, items=list(req.items))
        if i == count - 1:
            m.msg_send(reply, m.SEND_TIMEOUT, 5000)
        else:
            req = m.msg_send_receive(reply, inbox, m.RCV_TIMEOUT, receive_timeout=5000)


def test_msg_send_receive_serves_in_order(kernel: m.Kernel) -> None:
    inbox, reply = new_port(), new_port()
    start_thread(send_receive_server, inbox, 4)
    for i in range(4):
        ans = m.msg_rpc(Message(remote_port=inbox, local_port=reply, id=i,
                                items=[Str(f"n{i}")]), m.RCV_TIMEOUT, receive_timeout=5000)
        assert (ans.id, ans.values()) == (i + 100, [f"n{i}"])


def test_msg_send_receive_sends_before_it_receives(kernel: m.Kernel) -> None:
    out, inbox = new_port(), new_port()
    send(inbox, msg_id=5)  # already queued: the receive returns it at once
    got = m.msg_send_receive(Message(remote_port=out, id=7), inbox, m.RCV_TIMEOUT,
                             receive_timeout=5000)
    assert got.id == 5 and recv(out).id == 7
    with pytest.raises(m.RcvError) as e:  # the send happened; the receive timed out
        m.msg_send_receive(Message(remote_port=out, id=8), inbox, m.RCV_TIMEOUT,
                           receive_timeout=20)
    assert e.value.code == "RCV_TIMED_OUT" and recv(out).id == 8


def test_msg_send_receive_checks_everything_before_sending(kernel: m.Kernel) -> None:
    out, inbox = new_port(), new_port()
    with pytest.raises(m.RcvError) as e:
        m.msg_send_receive(Message(remote_port=out, id=1), "inbox")  # type: ignore[arg-type]
    assert e.value.code == "RCV_INVALID_PORT" and status(out)[1] == 0
    m.port_set_backlog(m.task_self(), out, 1)
    send(out)
    with pytest.raises(m.SendError) as e2:  # a failed send: nothing received either
        m.msg_send_receive(Message(remote_port=out, id=2), inbox, m.SEND_TIMEOUT,
                           send_timeout=0)
    assert e2.value.code == "SEND_TIMED_OUT" and status(out)[1] == 1
    send(inbox, msg_id=3)
    assert recv(inbox).id == 3  # still queued: the failed call received nothing


def test_msg_rpc_to_kernel_port_raw(kernel: m.Kernel) -> None:
    """The generated stubs are plain msg_rpc: build a port_status request by hand."""
    from pymach.include.mach_defs import port_defs

    reply, p = new_port(), new_port()
    rid = port_defs.by_name["port_status"].id
    ans = m.msg_rpc(Message(remote_port=m.task_self(), local_port=reply, id=rid,
                            items=[Int(p)]), m.RCV_TIMEOUT, receive_timeout=5000)
    assert ans.id == rid + 100
    assert ans.values() == [0, 0, 0, 5, 1, 1]


def test_messages_from_python_thread_outside_kernel_fail() -> None:
    box: dict[str, str] = {}

    def outsider() -> None:
        try:
            m.msg_send(Message(remote_port=1))
        except m.MachError as e:
            box["code"] = e.code

    t = threading.Thread(target=outsider)
    t.start()
    t.join(5)
    assert box == {"code": "KERN_INVALID_TASK"}


def test_header_fields_must_be_ints() -> None:
    """validate_message: a header field that is a bool, a float or a string is refused
    with the field's name; an int subclass that is no bool (an IntEnum) is an int."""
    import enum

    from pymach.include.message import validate_message

    class Name(enum.IntEnum):
        SVC = 7

    for field in ("remote_port", "local_port", "id"):
        for bad in (True, 1.0, "1"):
            msg = Message(**{field: bad})  # type: ignore[arg-type]
            with pytest.raises(m.MachError) as e:
                validate_message(msg)
            assert e.value.code == "SEND_INVALID_TYPE" and field in e.value.detail
        validate_message(Message(**{field: Name.SVC}))
    with pytest.raises(m.MachError) as e:
        validate_message(Message(id=2**63))
    assert e.value.code == "SEND_INVALID_TYPE" and "64 bits" in e.value.detail
