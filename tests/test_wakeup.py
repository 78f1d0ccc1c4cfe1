"""A message wakes one receiver (ipc_mqueue.py's enqueue, the schedulers'
thread_wakeup_one), and a receiver that leaves without it passes the wake-up on
(mach_msg.py's _receive).

Woken all at once, a server's threads waiting on its group each ran its receive again
for a message only one of them can take: an RPC to a server with 100 waiting threads
cost 10-40x one with a single thread (a review measured 287-1,263 against 29 us).
Checked on the free scheduler (the deterministic one wakes every waiter, in the
schedule's order, as before).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import pymach as m
from machutil import start_thread, wait_until
from pymach import Bytes, Message
from pymach.kern.thread import current_thread


@pytest.fixture
def k() -> Iterator[m.Kernel]:
    with m.boot() as kernel:
        yield kernel


def _rcv_waitq(port: int) -> Any:
    return current_thread().task.space.lookup(port).port.rcv_waitq


def test_a_message_wakes_one_of_the_waiting_receivers(
        k: m.Kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    me = m.task_self()
    p = m.port_allocate(me)
    m.port_enable(me, p)
    group = current_thread().task.space.group_waitq
    woken: list[str] = []
    wait = k.sched.wait

    def counting_wait(thread: Any, waitq: Any, deadline: Any) -> str:
        reason = wait(thread, waitq, deadline)
        if waitq is group:
            woken.append(reason)
        return reason

    monkeypatch.setattr(k.sched, "wait", counting_wait)
    boxes = [start_thread(m.msg_receive, 0, m.RCV_TIMEOUT, 20_000)[1] for _ in range(8)]
    wait_until(lambda: group.sleepers == 8)
    m.msg_send(Message(remote_port=p, id=7))
    wait_until(lambda: sum("result" in b for b in boxes) == 1)
    wait_until(lambda: group.sleepers == 7)
    assert woken == ["woken"]  # the other seven slept on
    for _ in range(7):
        m.msg_send(Message(remote_port=p, id=8))
    wait_until(lambda: all(b.get("done") for b in boxes))
    assert sorted(b["result"].id for b in boxes) == [7] + [8] * 7


def test_a_receiver_that_cannot_take_the_message_passes_the_wake_up_on(
        k: m.Kernel) -> None:
    """The first receiver to wait (the one the message wakes) asks for at most 64
    bytes; the message is larger, stays queued, and the second receiver gets it."""
    p = m.port_allocate(m.task_self())
    waitq = _rcv_waitq(p)
    _, small = start_thread(m.msg_receive, p, m.RCV_TIMEOUT, 20_000, 64)
    wait_until(lambda: waitq.sleepers == 1)
    _, large = start_thread(m.msg_receive, p, m.RCV_TIMEOUT, 20_000)
    wait_until(lambda: waitq.sleepers == 2)
    m.msg_send(Message(remote_port=p, id=9, items=[Bytes(b"x" * 200)]))
    wait_until(lambda: small.get("done") and large.get("done"), 5_000)
    assert small["error"] == "RCV_TOO_LARGE" and large["result"].id == 9



@pytest.mark.parametrize("group", [False, True], ids=["port", "group"])
def test_a_suspended_receiver_leaves_the_message_to_a_running_one(
        k: m.Kernel, group: bool) -> None:
    """The receiver that waited first is suspended: the message goes to the running
    receiver (woken alone, the suspended one took it and held it until resumed, while
    the running one slept on); a suspended receiver alone still takes it and stops at
    the trap's exit (test_tasks_threads)."""
    me = m.task_self()
    p = m.port_allocate(me)
    if group:
        m.port_enable(me, p)
    waitq = current_thread().task.space.group_waitq if group else _rcv_waitq(p)
    name = 0 if group else p
    held_port, held = start_thread(m.msg_receive, name, m.RCV_TIMEOUT, 20_000)
    wait_until(lambda: waitq.sleepers == 1)
    _, running = start_thread(m.msg_receive, name, m.RCV_TIMEOUT, 20_000)
    wait_until(lambda: waitq.sleepers == 2)
    m.thread_suspend(held_port)
    m.msg_send(Message(remote_port=p, id=11))
    wait_until(lambda: running.get("done"), 5_000)
    assert running["result"].id == 11 and not held.get("done")
    m.msg_send(Message(remote_port=p, id=12))
    m.thread_resume(held_port)
    wait_until(lambda: held.get("done"), 5_000)
    assert held["result"].id == 12



def test_a_group_receive_takes_the_oldest_head_without_walking_the_ready_ports(
        k: m.Kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    """The group's ports with messages are ordered by their head message (a heap), so a
    group receive takes the oldest message of the group without looking at every ready
    port (emptying 10,000 ready ports cost 2.1 ms a receive), through receives on the
    ports themselves and a port disabled and enabled again."""
    import random

    from pymach.ipc.space import IpcSpace

    me = m.task_self()
    ports = [m.port_allocate(me) for _ in range(40)]
    for p in ports:
        m.port_enable(me, p)
    rng = random.Random(7)
    sent: list[tuple[int, int]] = []  # (port, id) in send order
    order = ports * 3  # (three a port: within the default backlog)
    rng.shuffle(order)
    for i, p in enumerate(order):
        m.msg_send(Message(remote_port=p, id=1000 + i))
        sent.append((p, 1000 + i))
    for p in ports[:5]:  # the first message of five ports taken from the port itself
        first = next(i for q, i in sent if q == p)
        assert m.msg_receive(p, m.RCV_TIMEOUT, 0).id == first
        sent.remove((p, first))
    m.port_disable(me, ports[5])
    monkeypatch.setattr(IpcSpace, "ready_ports",
                        lambda self: pytest.fail("a group receive walked the ready ports"))
    want = [i for p, i in sent if p != ports[5]]
    assert [m.msg_receive(0, m.RCV_TIMEOUT, 0).id for _ in want] == want
    with pytest.raises(m.MachError, match="RCV_TIMED_OUT"):
        m.msg_receive(0, m.RCV_TIMEOUT, 0)
    m.port_enable(me, ports[5])
    rest = [i for p, i in sent if p == ports[5]]
    assert [m.msg_receive(0, m.RCV_TIMEOUT, 0).id for _ in rest] == rest


@pytest.mark.parametrize("seed", range(4))
def test_a_group_receive_takes_the_oldest_head_through_random_steps(
        k: m.Kernel, seed: int) -> None:
    """Random sends, group and direct receives, disables, enables and deallocations:
    every group receive takes the message the oldest-head rule names (a model of the
    queues kept here), and the heap stays bounded (a port has one live entry)."""
    import random

    me, rng = m.task_self(), random.Random(seed)
    space = current_thread().task.space
    ports = [m.port_allocate(me) for _ in range(12)]
    for p in ports:
        m.port_enable(me, p)
    queues: dict[int, list[int]] = {p: [] for p in ports}  # the model: ids in order
    enabled, next_id, order = set(ports), 0, {}  # order: id -> when it was queued
    for _ in range(600):
        step, p = rng.random(), rng.choice(ports)
        if step < 0.45 and len(queues[p]) < 5:
            next_id += 1
            m.msg_send(Message(remote_port=p, id=next_id))
            queues[p].append(next_id)
            order[next_id] = len(order)
        elif step < 0.75:
            ready = [q for q in ports if queues[q] and q in enabled]
            want = min((queues[q][0] for q in ready), key=order.__getitem__, default=None)
            if want is None:
                with pytest.raises(m.MachError, match="RCV_TIMED_OUT"):
                    m.msg_receive(0, m.RCV_TIMEOUT, 0)
            else:
                got = m.msg_receive(0, m.RCV_TIMEOUT, 0)
                assert got.id == want
                queues[got.local_port].pop(0)
        elif step < 0.85 and queues[p]:
            assert m.msg_receive(p, m.RCV_TIMEOUT, 0).id == queues[p].pop(0)
        elif step < 0.92:
            (m.port_disable if p in enabled else m.port_enable)(me, p)
            enabled ^= {p}
        elif step < 0.95:
            m.port_deallocate(me, p)
            ports.remove(p)
            enabled.discard(p)
            del queues[p]
            ports.append(q := m.port_allocate(me))
            m.port_enable(me, q)
            enabled.add(q)
            queues[q] = []
        heap = space.ready_heap
        assert len(heap) <= 4 * max(len(space.ready), 1) + 65
        assert len({(s, port) for s, _, port in heap}) == len(heap)  # no entry twice
        # (in these steps: a requeue that lowers a head can leave a second one)


def test_the_group_forgets_ports_that_emptied_and_died(k: m.Kernel) -> None:
    """Ports emptied by receives on themselves, then deallocated, do not stay in the
    group's ready set once the heap is rebuilt (a review's finding: the rebuild kept
    only ports with messages in the heap, and the rest stayed in `ready` for good)."""
    me = m.task_self()
    space = current_thread().task.space
    q = m.port_allocate(me)
    m.port_enable(me, q)
    m.port_set_backlog(me, q, 16)
    for _ in range(4):
        ports = [m.port_allocate(me) for _ in range(200)]
        for p in ports:
            m.port_enable(me, p)
            m.msg_send(Message(remote_port=p, id=1))
            m.msg_receive(p, m.RCV_TIMEOUT, 0)  # emptied, still in the ready set
        grew = len(space.ready_heap)
        while len(space.ready_heap) >= grew:  # new heads of q until a rebuild
            grew = max(grew, len(space.ready_heap))
            for _ in range(2):
                m.msg_send(Message(remote_port=q, id=2))
            m.msg_receive(q, m.RCV_TIMEOUT, 0)
            m.msg_receive(q, m.RCV_TIMEOUT, 0)
        for p in ports:
            m.port_deallocate(me, p)
        m.msg_send(Message(remote_port=q, id=3))
        assert m.msg_receive(0, m.RCV_TIMEOUT, 0).id == 3
    assert len(space.ready) <= 1 and not any(p.dead for p in space.ready)
