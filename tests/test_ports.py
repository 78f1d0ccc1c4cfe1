"""Ports and rights: every Table 3-2 call, the transfer rules, notifications, port death."""

from __future__ import annotations

import pytest

import pymach as m
from machutil import (
    assert_kernel_ok,
    has_name,
    notifications,
    recv,
    start_thread,
    thread_state,
    wait_notification,
    wait_until,
)
from pymach import (
    MOVE_ALL,
    MOVE_OWNERSHIP,
    MOVE_RECEIVE,
    NOTIFY_OWNERSHIP_RIGHTS,
    NOTIFY_PORT_DELETED,
    NOTIFY_RECEIVE_RIGHTS,
    Int,
    Message,
    Port,
    PortArray,
)

CONTRACT = True  # these run as native tasks of machd too (conftest.py)

BOOT = m.TASK_BOOTSTRAP_PORT


def status(name: int) -> tuple[bool, int, int, bool, bool]:
    return m.port_status(m.task_self(), name)  # type: ignore[no-any-return]


def make_bootstrap_port() -> int:
    """A port of ours that every task we spawn from now on inherits as its bootstrap port."""
    p = m.port_allocate(m.task_self())
    m.task_set_special_port(m.task_self(), BOOT, p)
    return p


def child_bootstrap() -> int:
    return m.task_get_special_port(m.task_self(), BOOT)  # type: ignore[no-any-return]


def child_inbox() -> int:
    """In a child: allocate a port and give the parent a send right to it (via bootstrap)."""
    p = m.port_allocate(m.task_self())
    send(child_bootstrap(), Port(p, m.MAKE_SEND), timeout=1000)
    return p  # type: ignore[no-any-return]


def link_to_child(b: int) -> int:
    """In the parent: the send right a child gave with child_inbox()."""
    item = recv(b).items[0]
    assert isinstance(item, Port) and item.disposition == m.MOVE_SEND
    return item.name


def send(dest: int, *items: object, msg_id: int = 1, timeout: float = 0) -> None:
    m.msg_send(Message(remote_port=dest, id=msg_id, items=list(items)), m.SEND_TIMEOUT, timeout)


def rights(kernel: m.Kernel, name: int, task: str = "bootstrap") -> str:
    for row in kernel.lsmp(task):
        if row.name == name:
            return row.rights
    return ""


# -- port_allocate -----------------------------------------------------------------------


def test_port_allocate_gives_all_rights(kernel: m.Kernel) -> None:
    p = m.port_allocate(m.task_self())
    assert isinstance(p, int) and p > 0
    assert status(p) == (False, 0, m.PORT_BACKLOG_DEFAULT, True, True)
    assert rights(kernel, p) == "recv+own+send"
    # receive rights imply the right to send: the port can be used at once
    send(p, Int(5))
    assert recv(p).values() == [5]


def test_port_names_are_distinct_and_never_reused(kernel: m.Kernel) -> None:
    task = m.task_self()
    names = [m.port_allocate(task) for _ in range(5)]
    assert len(set(names)) == 5
    for n in names:
        m.port_deallocate(task, n)
    again = [m.port_allocate(task) for _ in range(5)]
    assert not set(again) & set(names)
    assert min(again) > max(names)
    # the same holds for a send right we give up and get back
    me = m.task_self()
    m.port_deallocate(task, me)
    assert m.task_self() not in (me, *names, *again)


def test_port_allocate_in_another_task(kernel: m.Kernel) -> None:
    child = m.task_create(m.task_self())
    before = m.task_info(child)[3]
    p = m.port_allocate(child)
    assert m.task_info(child)[3] == before + 1
    # the name is the child's: it holds all rights, we hold nothing by that name (or
    # something else entirely)
    assert m.port_status(child, p) == (False, 0, m.PORT_BACKLOG_DEFAULT, True, True)
    row = next(r for r in kernel.lsmp(child_task_name(kernel, child)) if r.name == p)
    assert row.rights == "recv+own+send"
    m.task_terminate(child)


def child_task_name(kernel: m.Kernel, task_port_name: int) -> str:
    return m.task_info(task_port_name)[0]  # type: ignore[no-any-return]


# -- port_deallocate -------------------------------------------------------------------


def test_deallocate_receiver_and_owner_destroys_port_and_notifies_senders(
        kernel: m.Kernel) -> None:
    b = make_bootstrap_port()

    def child() -> list[tuple[int, int]]:
        bp = child_bootstrap()
        send(bp, Int(bp), timeout=1000)  # tell the parent our name for the port
        return [*wait_notification(NOTIFY_PORT_DELETED, bp), (-1, int(has_name(bp)))]

    h = kernel.spawn(child, name="holder")
    msg = recv(b)
    child_name = msg.values()[0]
    m.port_deallocate(m.task_self(), b)
    assert not has_name(b)
    seen = h.result(5000)
    assert seen[-2:] == [(NOTIFY_PORT_DELETED, child_name), (-1, 0)]
    assert_kernel_ok()


def test_deallocate_send_right_only_leaves_port_alive(kernel: m.Kernel) -> None:
    b = make_bootstrap_port()

    def child() -> bool:
        bp = child_bootstrap()
        m.port_deallocate(m.task_self(), bp)
        return has_name(bp)

    assert kernel.run(child, timeout=5000) is False
    assert status(b) == (False, 0, m.PORT_BACKLOG_DEFAULT, True, True)
    send(b, Int(1))
    assert recv(b).values() == [1]
    assert (NOTIFY_PORT_DELETED, b) not in notifications()


def test_deallocate_receive_only_passes_receive_rights_to_owner(kernel: m.Kernel) -> None:
    b = make_bootstrap_port()
    q = m.port_allocate(m.task_self())
    send(q, Int(11))  # this message must survive the change of receiver

    def child() -> tuple[object, ...]:
        msg = recv(child_inbox())
        name = msg.items[0].name  # type: ignore[union-attr]
        st = m.port_status(m.task_self(), name)
        m.port_deallocate(m.task_self(), name)
        return st, has_name(name)

    h = kernel.spawn(child)
    send(link_to_child(b), Port(q, MOVE_RECEIVE))
    st, still = h.result(5000)
    assert st == (False, 1, m.PORT_BACKLOG_DEFAULT, True, False)
    assert still is False
    assert (NOTIFY_RECEIVE_RIGHTS, q) in wait_notification(NOTIFY_RECEIVE_RIGHTS, q)
    assert status(q) == (False, 1, m.PORT_BACKLOG_DEFAULT, True, True)
    assert recv(q).values() == [11]


def test_deallocate_ownership_only_passes_ownership_to_receiver(kernel: m.Kernel) -> None:
    b = make_bootstrap_port()
    q = m.port_allocate(m.task_self())

    def child() -> tuple[object, ...]:
        msg = recv(child_inbox())
        name = msg.items[0].name  # type: ignore[union-attr]
        before = m.port_status(m.task_self(), name)
        m.port_deallocate(m.task_self(), name)
        return before, has_name(name)

    h = kernel.spawn(child)
    send(link_to_child(b), Port(q, MOVE_OWNERSHIP))
    before, still = h.result(5000)
    assert before[3:] == (False, True)
    assert still is False
    wait_notification(NOTIFY_OWNERSHIP_RIGHTS, q)
    assert status(q)[3:] == (True, True)
    assert rights(kernel, q) == "recv+own+send"


def test_receive_right_given_up_by_owner_holding_receive_elsewhere(kernel: m.Kernel) -> None:
    """The owner (without receive) gives up ownership: it passes to the receiver."""
    q = m.port_allocate(m.task_self())
    b = make_bootstrap_port()

    def child() -> tuple[object, ...]:
        inbox = child_inbox()
        name = recv(inbox).items[0].name  # type: ignore[union-attr]
        send(child_bootstrap(), Int(1), timeout=1000)
        note = recv(m.task_notify())
        return note.id, note.values(), name, m.port_status(m.task_self(), name)

    h = kernel.spawn(child)
    send(link_to_child(b), Port(q, MOVE_RECEIVE))
    assert recv(b).values() == [1]  # the child has the receive right
    m.port_deallocate(m.task_self(), q)  # we are owner only: ownership goes to the child
    note_id, values, name, st = h.result(5000)
    assert note_id == NOTIFY_OWNERSHIP_RIGHTS and values == [name]
    assert st[3:] == (True, True)


# -- port_enable, port_disable, port_messages ------------------------------------------


def test_enable_disable_and_default_group(kernel: m.Kernel) -> None:
    task = m.task_self()
    a, b, c = (m.port_allocate(task) for _ in range(3))
    m.port_enable(task, a)
    m.port_enable(task, b)
    assert status(a)[0] and status(b)[0] and not status(c)[0]
    send(c, Int(3))
    with pytest.raises(m.RcvError) as e:
        recv(m.PORT_NULL, 0)
    assert e.value.code == "RCV_TIMED_OUT"  # c is not in the group
    send(b, Int(2))
    send(a, Int(1))
    first = recv(m.PORT_NULL)
    second = recv(m.PORT_NULL)
    assert (first.local_port, first.values()) == (b, [2])  # oldest message first
    assert (second.local_port, second.values()) == (a, [1])
    m.port_disable(task, b)
    assert not status(b)[0]
    send(b, Int(4))
    with pytest.raises(m.RcvError):
        recv(m.PORT_NULL, 0)
    assert recv(b).values() == [4]
    assert recv(c).values() == [3]


def test_group_receive_wakes_when_port_is_enabled(kernel: m.Kernel) -> None:
    task = m.task_self()
    p = m.port_allocate(task)
    send(p, Int(9))

    def group_receiver() -> list[object]:
        return recv(m.PORT_NULL).values()

    tname, box = start_thread(group_receiver)
    wait_until(lambda: thread_state(tname) == "waiting")
    assert "done" not in box
    m.port_enable(task, p)
    wait_until(lambda: "done" in box)
    assert box["result"] == [9]


def test_port_messages_lists_enabled_ports_with_messages(kernel: m.Kernel) -> None:
    task = m.task_self()
    a, b, c, d = (m.port_allocate(task) for _ in range(4))
    assert m.port_messages(task) == ()
    for p in (a, b, d):
        m.port_enable(task, p)
    send(d, Int(1))
    send(a, Int(1))
    send(c, Int(1))  # not enabled
    assert m.port_messages(task) == (a, d)
    recv(a)
    assert m.port_messages(task) == (d,)
    m.port_disable(task, d)
    assert m.port_messages(task) == ()


def test_the_default_group_among_many_ports_as_rights_leave_and_return(
        kernel: m.Kernel) -> None:
    """A group receive takes the oldest head message among the enabled ports with
    messages, however many ports the task has, and a port that was disabled or whose
    receive right left is no longer the group's (its messages stay where they are)."""
    task = m.task_self()
    ports = [m.port_allocate(task) for _ in range(300)]
    for p in ports:
        m.port_enable(task, p)
    for i in (250, 7, 120):
        send(ports[i], Int(i))
    assert [recv(m.PORT_NULL).values() for _ in range(3)] == [[250], [7], [120]]
    send(ports[3], Int(3))
    m.port_disable(task, ports[3])
    with pytest.raises(m.RcvError):
        recv(m.PORT_NULL, 0)
    m.port_enable(task, ports[3])
    assert recv(m.PORT_NULL).local_port == ports[3]
    send(ports[9], Int(9))  # queued, then its receive right travels to ports[10]
    send(ports[10], Port(ports[9], m.MOVE_RECEIVE))
    carrier = recv(m.PORT_NULL)
    assert carrier.local_port == ports[10]
    back = carrier.items[0].name  # type: ignore[union-attr]
    with pytest.raises(m.RcvError):
        recv(m.PORT_NULL, 0)  # the right came back disabled: not in the group
    assert m.port_messages(task) == ()
    m.port_enable(task, back)
    assert m.port_messages(task) == (back,)
    assert recv(m.PORT_NULL).values() == [9]


def test_port_messages_of_another_task(kernel: m.Kernel) -> None:
    child = m.task_create(m.task_self())
    p = m.port_allocate(child)
    m.port_enable(child, p)
    assert m.port_messages(child) == ()
    assert m.port_status(child, p)[0] is True
    m.task_terminate(child)


# -- port_status, port_set_backlog -------------------------------------------------------


def test_port_status_counts_messages_and_reports_rights(kernel: m.Kernel) -> None:
    b = make_bootstrap_port()
    for i in range(3):
        send(b, Int(i))
    assert status(b) == (False, 3, 5, True, True)

    def child() -> object:
        return m.port_status(m.task_self(), child_bootstrap())

    assert kernel.run(child, timeout=5000) == (False, 3, 5, False, False)
    recv(b)
    assert status(b)[1] == 2


def test_set_backlog_limits_queue(kernel: m.Kernel) -> None:
    p = m.port_allocate(m.task_self())
    m.port_set_backlog(m.task_self(), p, 2)
    assert status(p)[2] == 2
    send(p, Int(1))
    send(p, Int(2))
    with pytest.raises(m.SendError) as e:
        send(p, Int(3))
    assert e.value.code == "SEND_TIMED_OUT"
    m.port_set_backlog(m.task_self(), p, m.PORT_BACKLOG_MAX)
    for i in range(3, 17):
        send(p, Int(i))
    with pytest.raises(m.SendError):
        send(p, Int(17))
    assert [recv(p).values()[0] for _ in range(16)] == list(range(1, 17))


def test_raising_backlog_wakes_blocked_sender(kernel: m.Kernel) -> None:
    p = m.port_allocate(m.task_self())
    m.port_set_backlog(m.task_self(), p, 1)
    send(p, Int(1))

    tname, box = start_thread(lambda: send(p, Int(2), timeout=5000))
    wait_until(lambda: thread_state(tname) == "waiting")
    m.port_set_backlog(m.task_self(), p, 2)
    wait_until(lambda: "done" in box)
    assert "error" not in box
    assert [recv(p).values(), recv(p).values()] == [[1], [2]]


# -- port death: waiters ---------------------------------------------------------------


def test_port_death_wakes_blocked_sender_in_another_task(kernel: m.Kernel) -> None:
    b = make_bootstrap_port()
    m.port_set_backlog(m.task_self(), b, 1)
    send(b, Int(0))

    def child() -> str:
        try:
            m.msg_send(Message(remote_port=child_bootstrap(), items=[Int(1)]))
        except m.SendError as e:
            return e.code
        return "sent"

    h = kernel.spawn(child)
    threads = m.task_threads(h.port)
    wait_until(lambda: thread_state(threads[0]) == "waiting")
    m.port_deallocate(m.task_self(), b)
    assert h.result(5000) == "SEND_INVALID_PORT"
    assert_kernel_ok()


def test_port_death_wakes_blocked_receiver(kernel: m.Kernel) -> None:
    p = m.port_allocate(m.task_self())
    tname, box = start_thread(lambda: m.msg_receive(p))
    wait_until(lambda: thread_state(tname) == "waiting")
    m.port_deallocate(m.task_self(), p)
    wait_until(lambda: "done" in box)
    assert box.get("error") == "RCV_INVALID_PORT"
    assert_kernel_ok()


def test_receive_right_leaving_wakes_blocked_receiver_of_old_holder(kernel: m.Kernel) -> None:
    """Receive rights pass to the owner: the old receiver's blocked receive fails."""
    b = make_bootstrap_port()
    q = m.port_allocate(m.task_self())

    def child() -> str:
        name = recv(child_inbox()).items[0].name  # type: ignore[union-attr]
        tname, box = start_thread(lambda: m.msg_receive(name))
        wait_until(lambda: thread_state(tname) == "waiting")
        m.port_deallocate(m.task_self(), name)
        wait_until(lambda: "done" in box)
        return box.get("error", "none")

    h = kernel.spawn(child)
    send(link_to_child(b), Port(q, MOVE_RECEIVE))
    assert h.result(5000) == "RCV_INVALID_PORT"
    wait_notification(NOTIFY_RECEIVE_RIGHTS, q)
    send(q, Int(3))
    assert recv(q).values() == [3]


def test_task_death_destroys_its_ports_and_notifies(kernel: m.Kernel) -> None:
    b = make_bootstrap_port()

    def child() -> None:
        recv(child_inbox())  # wait until the parent holds its send right, then end

    h = kernel.spawn(child)
    name = link_to_child(b)
    assert has_name(name)
    send(name, Int(0))
    h.result(5000)
    wait_notification(NOTIFY_PORT_DELETED, name)
    assert not has_name(name)
    with pytest.raises(m.SendError) as e:
        send(name, Int(1))
    assert e.value.code == "SEND_INVALID_PORT"


def test_task_death_passes_receive_rights_back_to_owner(kernel: m.Kernel) -> None:
    b = make_bootstrap_port()
    q = m.port_allocate(m.task_self())

    def child() -> None:
        recv(child_inbox())  # takes the receive right, then the task ends

    h = kernel.spawn(child)
    send(link_to_child(b), Port(q, MOVE_RECEIVE))
    h.result(5000)
    wait_notification(NOTIFY_RECEIVE_RIGHTS, q)
    assert status(q)[3:] == (True, True)


# -- port death: rights inside queued messages ---------------------------------------


def test_dead_port_releases_send_rights_in_queued_messages(kernel: m.Kernel) -> None:
    task = m.task_self()
    p, q = m.port_allocate(task), m.port_allocate(task)
    send(p, Port(q, m.MAKE_SEND), PortArray((q, q)))
    m.port_deallocate(task, p)
    # q is unaffected: only send rights travelled
    assert status(q) == (False, 0, 5, True, True)
    assert notifications() == []


def test_dead_port_returns_receive_right_in_queued_message_to_owner(kernel: m.Kernel) -> None:
    task = m.task_self()
    p, q = m.port_allocate(task), m.port_allocate(task)
    send(q, Int(77))
    send(p, Port(q, MOVE_RECEIVE))
    assert status(q)[3:] == (False, True)
    m.port_deallocate(task, p)
    assert notifications() == [(NOTIFY_RECEIVE_RIGHTS, q)]
    assert status(q)[3:] == (True, True)
    assert recv(q).values() == [77]


def test_dead_port_returns_ownership_in_queued_message_to_receiver(kernel: m.Kernel) -> None:
    task = m.task_self()
    p, q = m.port_allocate(task), m.port_allocate(task)
    send(p, Port(q, MOVE_OWNERSHIP))
    assert status(q)[3:] == (True, False)
    m.port_deallocate(task, p)
    assert notifications() == [(NOTIFY_OWNERSHIP_RIGHTS, q)]
    assert status(q)[3:] == (True, True)


def test_dead_port_cascades_to_ports_whose_rights_it_held(kernel: m.Kernel) -> None:
    """p holds all rights of q in a message, q all rights of r: destroying p kills all."""
    task = m.task_self()
    p, q, r = (m.port_allocate(task) for _ in range(3))
    send(r, Int(1))
    send(q, Port(r, MOVE_ALL))
    send(p, Port(q, MOVE_ALL))
    assert rights(kernel, q) == rights(kernel, r) == "send"
    m.port_deallocate(task, p)
    assert not has_name(q) and not has_name(r)
    assert sorted(notifications()) == sorted([(NOTIFY_PORT_DELETED, q),
                                              (NOTIFY_PORT_DELETED, r)])
    for name in (p, q, r):
        with pytest.raises(m.SendError):
            send(name, Int(0))
    assert_kernel_ok()


def test_receive_right_in_destroyed_message_without_owner_kills_port(kernel: m.Kernel) -> None:
    """q's receive right travels in a message on p, and q's owner gives up ownership
    (nobody to pass it to: q has no owner until the right arrives). Then p dies: the
    receive right is destroyed with its message and q dies with it."""
    task = m.task_self()
    p, q = m.port_allocate(task), m.port_allocate(task)
    b = make_bootstrap_port()

    def child() -> list[tuple[int, int]]:
        name = recv(child_inbox()).items[0].name  # type: ignore[union-attr]
        send(child_bootstrap(), Int(name), timeout=1000)
        return wait_notification(NOTIFY_PORT_DELETED, name)

    h = kernel.spawn(child)
    send(link_to_child(b), Port(q, m.COPY_SEND))  # the child holds a send right to q
    child_q = recv(b).values()[0]
    send(p, Port(q, MOVE_RECEIVE))
    m.port_deallocate(task, q)  # owner only: no receiver to take ownership
    assert not has_name(q)
    assert any(r.name == p and r.queued == 1 for r in kernel.lsmp("bootstrap"))
    m.port_deallocate(task, p)
    assert h.result(5000)[-1] == (NOTIFY_PORT_DELETED, child_q)


def test_receive_right_arriving_without_owner_brings_ownership(kernel: m.Kernel) -> None:
    task = m.task_self()
    p, q = m.port_allocate(task), m.port_allocate(task)
    send(p, Port(q, MOVE_RECEIVE))
    m.port_deallocate(task, q)
    msg = recv(p)
    item = msg.items[0]
    assert isinstance(item, Port) and item.disposition == MOVE_RECEIVE
    assert status(item.name)[3:] == (True, True)
    assert rights(kernel, item.name) == "recv+own+send"


def test_receive_rights_in_queue_of_dying_task_port_pass_to_owner(kernel: m.Kernel) -> None:
    """A task dies with a queued message carrying receive rights whose owner is us."""
    b = make_bootstrap_port()
    q = m.port_allocate(m.task_self())

    def child() -> None:
        mine = child_inbox()
        # wait for the parent's message carrying q's receive right, but never take it
        wait_until(lambda: m.port_status(m.task_self(), mine)[1] == 1)

    h = kernel.spawn(child)
    child_port = link_to_child(b)
    send(child_port, Port(q, MOVE_RECEIVE))
    h.result(5000)
    seen = wait_notification(NOTIFY_RECEIVE_RIGHTS, q)
    assert (NOTIFY_PORT_DELETED, child_port) in seen + notifications(20)
    assert status(q)[3:] == (True, True)


def test_receive_right_sent_away_fails_blocked_receive_of_sender(kernel: m.Kernel) -> None:
    """One thread waits on p while another sends p's receive right away: the wait fails
    at once with RCV_INVALID_PORT (it must not wait for the timeout, or forever)."""
    task = m.task_self()
    p, q = m.port_allocate(task), m.port_allocate(task)
    tname, box = start_thread(lambda: m.msg_receive(p, m.RCV_TIMEOUT, 60_000))
    wait_until(lambda: thread_state(tname) == "waiting")
    send(q, Port(p, MOVE_RECEIVE))
    wait_until(lambda: "done" in box, timeout_ms=2000)
    assert box.get("error") == "RCV_INVALID_PORT"
    # the right arrives back with its queue intact
    send(p, Int(8))
    item = recv(q).items[0]
    assert isinstance(item, Port) and item.name == p
    assert recv(p).values() == [8]
