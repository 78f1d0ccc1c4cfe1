"""Receive and ownership rights cross hosts (issue 11 item 3; net/netmsgserver.py).

- A receive right moved to another host takes its queued messages and its backlog with
  it; senders on every host (the old one, the new one, a third) keep their names and
  reach the new receiver; it moves back, and on to a third host.
- Per-sender order holds across moves with messages in flight (a stress test: three
  senders, the right hopping A -> B -> C -> A -> B while they send).
- Ownership alone crosses: the receiver and the owner on different hosts follow the
  rules of one host (a receive right given up goes to the owner with
  NOTIFY_RECEIVE_RIGHTS, ownership given up to the receiver with
  NOTIFY_OWNERSHIP_RIGHTS), with the messages in between.
- Death after a move reaches holders on every host (NOTIFY_PORT_DELETED), whether the
  port is destroyed or its new host crashes.
- A peer that lies (a right under an id in use, ownership or DISOWN without the token,
  a RECEIVE for an owner that is not there, a FLUSHED that answers nothing, a "move" of
  a port it does not hold) is refused and logged; the real port goes on.
- The same over TCP between embedded hosts, and between two machd hosts.

Hosts run the free scheduler: the deterministic one's virtual clock jumps ahead while
a host waits only for the network, so every timeout would expire at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import pymach as m
from nativeutil import uffd_or_skip
from pymach.machd.machd import start_daemon, stop_daemon
from pymach.net import packets as pk
from pymach.net.cluster import cluster_init
from pymach.net.netname import netname_check_in, netname_wait
from pymach.net.station import Host
from test_net_tcp import LOOPBACK, exec_task, free_port, machd_hosts, tcp_hosts
from test_net_transport import Hub, HubTransport, Recorder

WAIT_MS = 10_000
VIAS = ["network", "hub", "tcp"]
Log = list[tuple[int, int]]


# -- hosts ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> str:
    if shutil.which("openssl") is None:
        pytest.skip("making cluster certificates needs the openssl command")
    d = str(tmp_path_factory.mktemp("cluster"))
    cluster_init(d, ["A", "B", "C"])
    return d


@contextlib.contextmanager
def hosts(via: str, request: pytest.FixtureRequest, *names: str,
          **config: Any) -> Iterator[dict[str, Host]]:
    """Embedded hosts joined by the in-process network, a Hub, or TCP."""
    if via == "network":
        with m.Network() as net:
            yield {n: net.host(n, **config) for n in names}
    elif via == "hub":
        hub, made = Hub(), {}
        try:
            for n in names:
                made[n] = Host(HubTransport(hub, n), config)
            yield made
        finally:
            for h in made.values():
                h.kernel.shutdown()
            hub.stop()
    else:
        with tcp_hosts(request.getfixturevalue("cluster"), *names) as made:
            wait_until(lambda: all(len(h.server.peers) == len(names) - 1
                                   for h in made.values()), "every host linked")
            yield made


def wait_until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_MS / 1000
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


# -- task helpers ---------------------------------------------------------------------
def _bootstrap() -> int:
    port: int = m.task_get_special_port(m.task_self(), m.TASK_BOOTSTRAP_PORT)
    return port


def _box(name: str) -> int:
    """A new port of ours checked in as `name`."""
    port: int = m.port_allocate(m.task_self())
    netname_check_in(_bootstrap(), name, port)
    return port


def _status(port: int) -> tuple[int, int, bool, bool]:
    """(queued, backlog, receiver, owner) of one of our ports."""
    _, queued, backlog, receiver, owner = m.port_status(m.task_self(), port)
    return queued, backlog, receiver, owner


def _notice(msg_id: int) -> int:
    """The name in the next notification `msg_id` on our notify port."""
    while True:
        note = m.msg_receive(m.task_notify(), m.RCV_TIMEOUT, WAIT_MS)
        if note.id == msg_id:
            value = note.items[0].value
            assert isinstance(value, int)
            return value


def _take(port: int, count: int, log: Log) -> None:
    """Receive `count` messages [Int sender, Int seq] on `port` into `log`."""
    for _ in range(count):
        msg = m.msg_receive(port, m.RCV_TIMEOUT, WAIT_MS)
        sender, seq = msg.values()
        log.append((sender, seq))


def _give(port: int, box: str, kind: m.Disposition) -> None:
    """Send our right `kind` to `port` to the task that checked in `box`."""
    dest = netname_wait(box, WAIT_MS)
    m.msg_send(m.Message(remote_port=dest, id=77, items=[m.Port(port, kind)]))


def _await_right(box: str) -> tuple[int, m.Disposition]:
    """Check in `box` and wait for a right on it: (our name, its disposition)."""
    msg = m.msg_receive(_box(box), m.RCV_TIMEOUT, WAIT_MS)
    item = msg.items[0]
    assert isinstance(item, m.Port)
    return item.name, item.disposition


def sender(name: str, sid: int, count: int, start: threading.Event | None = None) -> int:
    """Send `count` messages [Int sid, Int seq] to the port checked in as `name`."""
    port = netname_wait(name, WAIT_MS)
    if start is not None:
        assert start.wait(WAIT_MS / 1000)
    for seq in range(count):
        m.msg_send(m.Message(remote_port=port, id=1, items=[m.Int(sid), m.Int(seq)]))
    return count


def in_order(log: Log, senders: int, count: int) -> bool:
    """Every sender's messages arrived once each, in the order sent."""
    return all([s for x, s in log if x == sid] == list(range(count)) for sid in range(senders))


# -- a receive right with its queue -----------------------------------------------------
def _queue_then_move(ready: threading.Event, queued: int) -> tuple[int, int]:
    """Hold a port checked in as "p" (backlog 16) until `queued` messages wait on it,
    then move it (MOVE_ALL) to "box"; (queued when moved, our name for it)."""
    port = _box("p")
    m.port_set_backlog(m.task_self(), port, 16)
    ready.set()
    while _status(port)[0] < queued:
        with contextlib.suppress(m.MachError):
            m.msg_receive(m.port_allocate(m.task_self()), m.RCV_TIMEOUT, 5)
    _give(port, "box", m.MOVE_ALL)
    return queued, port


def _receive_moved(total: int, log: Log) -> tuple[Any, ...]:
    port, kind = _await_right("box")
    before = _status(port)
    _take(port, total, log)
    return kind, before[1:]


@pytest.mark.parametrize("via", VIAS)
def test_a_receive_right_moves_with_its_queue_and_every_host_reaches_it(
        via: str, request: pytest.FixtureRequest) -> None:
    with hosts(via, request, "A", "B", "C") as hs:
        a, b, c = hs["A"], hs["B"], hs["C"]
        ready, log = threading.Event(), []
        receiver = b.start(_receive_moved, 12 + 3, log, name="receiver")
        holder = a.start(_queue_then_move, ready, 12, name="holder")
        assert ready.wait(WAIT_MS / 1000)
        for sid, host in enumerate((a, b, c)):  # 4 each before the move
            assert host.start(sender, "p", sid, 4).wait(WAIT_MS) == 4
        assert holder.wait(WAIT_MS)[0] == 12
        wait_until(lambda: [a.server.where(n) for n in a.server.alias] == ["B"],
                   "A's old port to be a proxy for B's")  # (before the receiver ends)
        for sid, host in enumerate((a, b, c), 3):  # and one each after, same names
            assert host.start(sender, "p", sid, 1).wait(WAIT_MS) == 1
        kind, status = receiver.wait(WAIT_MS)
        assert kind == m.MOVE_ALL and status == (16, True, True)  # the backlog moved
        assert sorted(log[:12]) == [(s, q) for s in range(3) for q in range(4)]  # queue
        assert in_order(log[:12], 3, 4)  # each sender's, in its order
        assert sorted(log[12:]) == [(3, 0), (4, 0), (5, 0)]
        assert a.server.moves_out == 1 and b.server.moves_in == 1
        assert all(h.server.refused_rights == 0 for h in hs.values())


# -- per-sender order with messages in flight -------------------------------------------
def _first_holder(name: str, take: int, next_box: str, log: Log) -> int:
    port = _box(name)
    m.port_set_backlog(m.task_self(), port, 16)
    _take(port, take, log)
    _give(port, next_box, m.MOVE_ALL)
    return port


def _holder(box: str, take: int, next_box: str | None, log: Log, total: int) -> tuple[Any, ...]:
    port, kind = _await_right(box)
    status = _status(port)
    if next_box is None:
        _take(port, total - len(log), log)
    else:
        _take(port, take, log)
        _give(port, next_box, m.MOVE_ALL)
    return kind, status[1:]


def hot_potato(hs: dict[str, Host], count: int) -> Log:
    """Senders on A, B and C send `count` messages each to "p" while its receive right
    hops A -> B -> C -> A (another task) -> B, each holder taking some messages."""
    a, b, c = hs["A"], hs["B"], hs["C"]
    log: Log = []
    total, hop = 3 * count, count // 3
    holders = [b.start(_holder, "b1", hop, "c1", log, total, name="b1"),
               c.start(_holder, "c1", hop, "a2", log, total, name="c1"),
               a.start(_holder, "a2", hop, "b2", log, total, name="a2"),
               b.start(_holder, "b2", 0, None, log, total, name="b2")]
    first = a.start(_first_holder, "p", hop // 2, "b1", log, name="a1")
    senders = [h.start(sender, "p", sid, count, name=f"sender{sid}")
               for sid, h in enumerate((a, b, c))]
    assert [s.wait(4 * WAIT_MS) for s in senders] == [count] * 3
    first.wait(WAIT_MS)
    for h in holders:
        assert h.wait(4 * WAIT_MS) == (m.MOVE_ALL, (16, True, True))
    return log


@pytest.mark.parametrize("via", VIAS)
def test_per_sender_order_holds_while_the_right_hops_between_hosts(
        via: str, request: pytest.FixtureRequest) -> None:
    with hosts(via, request, "A", "B", "C") as hs:
        log = hot_potato(hs, 150)
        assert len(log) == 450 and in_order(log, 3, 150)
        assert sum(h.server.moves_out for h in hs.values()) == 4
        assert sum(h.server.relayed for h in hs.values()) > 0  # messages were in flight
        wait_until(lambda: all(len(h.server.relay_acks) == 0 for h in hs.values()),
                   "every relayed ask answered")  # (net/window.py)
        assert all(h.server.refused_rights == 0 for h in hs.values())


@pytest.mark.slow
@pytest.mark.parametrize("via", ["network", "tcp"])
def test_per_sender_order_stress(via: str, request: pytest.FixtureRequest) -> None:
    for _ in range(3):
        with hosts(via, request, "A", "B", "C") as hs:
            log = hot_potato(hs, 600)
            assert len(log) == 1800 and in_order(log, 3, 600)


class SlowPager(m.DataManager):
    """Answers each request after 200 ms: page n holds the byte n."""

    threads = 1

    def read(self, memory_object: int, offset: int, length: int, access: int) -> bytes:
        time.sleep(0.2)
        return b"".join(bytes([(offset + i) // 4096]) * 4096 for i in range(0, length, 4096))


def _slow_then_plain(got: threading.Event) -> bool:
    """Send memory a slow data manager backs, then a plain message, to "box"."""
    me = m.task_self()
    dm = SlowPager()
    mo = dm.create_memory_object()
    m.thread_create(me, dm.serve)
    address = m.vm_allocate_with_pager(me, 0, 8 * 4096, True, mo, 0)
    box = netname_wait("box", WAIT_MS)
    m.msg_send(m.Message(remote_port=box, items=[m.OOL(address, 8 * 4096)]))
    m.msg_send(m.Message(remote_port=box, items=[m.Str("plain")]))
    return got.wait(WAIT_MS / 1000)


def _two_in_order(got: threading.Event) -> list[Any]:
    port = _box("box")
    out: list[Any] = []
    for _ in range(2):
        item = m.msg_receive(port, m.RCV_TIMEOUT, WAIT_MS).items[0]
        out.append(m.take_ool(item)[::4096] if isinstance(item, m.OOL) else item.value)
    got.set()
    return out


@pytest.mark.parametrize("via", ["network", "hub"])
def test_a_message_encoded_by_a_forwarding_thread_keeps_its_place(
        via: str, request: pytest.FixtureRequest) -> None:
    """Memory a data manager must page in is read by a thread of the netmsgserver; a
    plain message sent after it still arrives after it."""
    with hosts(via, request, "A", "B") as hs:
        got = threading.Event()
        receiver = hs["B"].start(_two_in_order, got, name="receiver")
        assert hs["A"].start(_slow_then_plain, got, name="sender").wait(WAIT_MS) is True
        assert receiver.wait(WAIT_MS) == [bytes(range(8)), "plain"]
        assert not hs["A"].server._in_flight


# -- ownership ------------------------------------------------------------------------
def _owner_and_receiver_apart(kind: m.Disposition, gone: threading.Event,
                              sent: threading.Event) -> tuple[Any, ...]:
    """Allocate "p", send right `kind` of it to "box", wait until the right comes back
    (notification), then read what is queued."""
    port = _box("p")
    _give(port, "box", kind)
    after_send = _status(port)[2:]
    if kind == m.MOVE_OWNERSHIP:
        assert gone.wait(WAIT_MS / 1000)
        m.port_deallocate(m.task_self(), port)  # the receive right goes to the owner
        return (after_send,)
    back = _notice(m.NOTIFY_RECEIVE_RIGHTS)
    msgs = [m.msg_receive(port, m.RCV_TIMEOUT, WAIT_MS).values()[0] for _ in range(2)]
    return after_send, back == port, _status(port)[2:], msgs


def _apart_other_side(kind: m.Disposition, gone: threading.Event,
                      sent: threading.Event) -> tuple[Any, ...]:
    port, got = _await_right("box")
    first = _status(port)[2:]
    assert sent.wait(WAIT_MS / 1000)
    if kind == m.MOVE_OWNERSHIP:
        gone.set()
        back = _notice(m.NOTIFY_RECEIVE_RIGHTS)
        msgs = [m.msg_receive(port, m.RCV_TIMEOUT, WAIT_MS).values()[0] for _ in range(2)]
        return got, first, back == port, _status(port)[2:], msgs
    while _status(port)[0] < 1:  # C's first message is here: give the right up
        time.sleep(0.005)
    m.port_deallocate(m.task_self(), port)
    return got, first


def _c_sends(sent: threading.Event, gone: threading.Event, kind: m.Disposition) -> int:
    port = netname_wait("p", WAIT_MS)
    m.msg_send(m.Message(remote_port=port, items=[m.Str("before")]))
    sent.set()
    if kind == m.MOVE_OWNERSHIP:
        assert gone.wait(WAIT_MS / 1000)
    m.msg_send(m.Message(remote_port=port, items=[m.Str("after")]))
    return 2


def apart(hs: dict[str, Host], kind: m.Disposition) -> tuple[Any, Any]:
    """A task of A sends right `kind` of its port "p" to a task of B while C sends to it;
    (A's outcome, B's outcome)."""
    gone, sent = threading.Event(), threading.Event()
    b = hs["B"].start(_apart_other_side, kind, gone, sent, name="b")
    a = hs["A"].start(_owner_and_receiver_apart, kind, gone, sent, name="a")
    assert hs["C"].start(_c_sends, sent, gone, kind).wait(WAIT_MS) == 2
    return a.wait(WAIT_MS), b.wait(WAIT_MS)


@pytest.mark.parametrize("via", VIAS)
def test_a_receive_right_given_up_goes_back_to_its_owner_on_another_host(
        via: str, request: pytest.FixtureRequest) -> None:
    with hosts(via, request, "A", "B", "C") as hs:
        owner, receiver = apart(hs, m.MOVE_RECEIVE)
        assert receiver == (m.MOVE_RECEIVE, (True, False))
        assert owner == ((False, True), True, (True, True), ["before", "after"])


@pytest.mark.parametrize("via", VIAS)
def test_ownership_alone_crosses_and_the_receive_right_follows_it(
        via: str, request: pytest.FixtureRequest) -> None:
    with hosts(via, request, "A", "B", "C") as hs:
        receiver, owner = apart(hs, m.MOVE_OWNERSHIP)
        assert receiver == ((True, False),)
        assert owner == (m.MOVE_OWNERSHIP, (False, True), True, (True, True),
                         ["before", "after"])


def _owner_gives_up() -> bool:
    go = _box("go")
    port, kind = _await_right("box")
    assert kind == m.MOVE_OWNERSHIP and _status(port)[2:] == (False, True)
    m.msg_receive(go, m.RCV_TIMEOUT, WAIT_MS)  # the receiver has looked at its rights
    m.port_deallocate(m.task_self(), port)
    return True


def _receiver_gets_ownership_back() -> tuple[Any, ...]:
    port = _box("p")
    _give(port, "box", m.MOVE_OWNERSHIP)
    after = _status(port)[2:]
    m.msg_send(m.Message(remote_port=netname_wait("go", WAIT_MS), id=78))
    back = _notice(m.NOTIFY_OWNERSHIP_RIGHTS)
    return after, back == port, _status(port)[2:]


@pytest.mark.parametrize("via", ["network", "tcp"])
def test_ownership_given_up_on_another_host_goes_back_to_the_receiver(
        via: str, request: pytest.FixtureRequest) -> None:
    with hosts(via, request, "A", "B") as hs:
        owner = hs["B"].start(_owner_gives_up, name="owner")
        receiver = hs["A"].start(_receiver_gets_ownership_back, name="receiver")
        assert owner.wait(WAIT_MS) is True
        assert receiver.wait(WAIT_MS) == ((True, False), True, (True, True))


def _ownership_hop(box: str, next_box: str | None) -> tuple[Any, ...]:
    """Take ownership arriving on `box`; pass it on to `next_box`, or keep it and wait
    for the receive right to follow (NOTIFY_RECEIVE_RIGHTS), then read a message."""
    port, kind = _await_right(box)
    if next_box is not None:
        _give(port, next_box, m.MOVE_OWNERSHIP)
        return (kind,)
    if not port:  # the port died while the right travelled: it arrives as PORT_NULL
        return (kind, "deleted")
    while True:
        note = m.msg_receive(m.task_notify(), m.RCV_TIMEOUT, WAIT_MS)
        if note.id == m.NOTIFY_PORT_DELETED and note.values() == [port]:
            return (kind, "deleted")
        if note.id == m.NOTIFY_RECEIVE_RIGHTS and note.values() == [port]:
            msg = m.msg_receive(port, m.RCV_TIMEOUT, WAIT_MS).values()
            return kind, True, _status(port)[2:], msg


def _owner_leaves_then_receiver_quits(moved_on: Callable[[], bool]) -> bool:
    port = _box("p")
    _give(port, "b1", m.MOVE_OWNERSHIP)
    deadline = time.monotonic() + WAIT_MS / 1000
    while not moved_on():
        assert time.monotonic() < deadline
        time.sleep(0.005)
    m.msg_send(m.Message(remote_port=port, items=[m.Str("queued")]))
    m.port_deallocate(m.task_self(), port)  # the receive right goes to the owner, on C
    return True


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("wait", [True, False], ids=["settled", "racing"])
def test_ownership_moved_on_to_a_third_host_gets_the_receive_right(
        wait: bool, via: str, request: pytest.FixtureRequest) -> None:
    with hosts(via, request, "A", "B", "C") as hs:
        a, b, c = hs["A"], hs["B"], hs["C"]
        last = c.start(_ownership_hop, "c1", None, name="c1")
        b.start(_ownership_hop, "b1", "c1", name="b1")

        def moved_on() -> bool:  # racing: A's server sent ownership (to B) already
            owners = [o[0] for o in a.server.remote_owner.values()]
            return "C" in owners if wait else bool(owners)

        assert a.start(_owner_leaves_then_receiver_quits, moved_on).wait(WAIT_MS) is True
        outcome = last.wait(WAIT_MS)
        if wait:
            assert outcome == (m.MOVE_OWNERSHIP, True, (True, True), ["queued"])
        else:  # as on one host: a receive right given up while ownership is on its way
            # between tasks destroys the port; otherwise it reaches the new owner
            assert outcome[1:] in ((True, (True, True), ["queued"]), ("deleted",))


# -- death after a move ---------------------------------------------------------------
def _holds_until_dead(ready: threading.Event) -> str:
    """Hold a send right to "p"; wait for its NOTIFY_PORT_DELETED; try to send."""
    port = netname_wait("p", WAIT_MS)
    ready.set()
    assert _notice(m.NOTIFY_PORT_DELETED) == port
    try:
        m.msg_send(m.Message(remote_port=port), m.SEND_TIMEOUT, 0)
    except m.MachError as e:
        return e.code
    return "still alive"


def _moves_on(box: str, next_box: str | None, die: threading.Event) -> str:
    port, _ = _await_right(box)
    if next_box is not None:
        _give(port, next_box, m.MOVE_ALL)
        return "passed on"
    assert die.wait(WAIT_MS / 1000)
    m.port_deallocate(m.task_self(), port)
    return "destroyed"


@pytest.mark.parametrize(("how", "via"), [("destroyed", v) for v in VIAS]
                         + [("its host crashes", "network")])
def test_death_after_moves_reaches_holders_on_every_host(
        how: str, via: str, request: pytest.FixtureRequest) -> None:
    with hosts(via, request, "A", "B", "C") as hs:
        a, b, c = hs["A"], hs["B"], hs["C"]
        die, readies = threading.Event(), [threading.Event() for _ in range(3)]
        last = c.start(_moves_on, "c1", None, die, name="c1")
        b.start(_moves_on, "b1", "c1", die, name="b1")
        ha = a.start(_queue_then_move_to, "b1", name="first")
        holders = [h.start(_holds_until_dead, r, name="holder")
                   for h, r in zip((a, b, c), readies, strict=True)]
        assert all(r.wait(WAIT_MS / 1000) for r in readies)
        ha.wait(WAIT_MS)
        wait_until(lambda: c.server.moves_in == 1, "the right to reach C")
        if how == "destroyed":
            die.set()
            assert last.wait(WAIT_MS) == "destroyed"
            codes = [h.wait(WAIT_MS) for h in holders]
        else:  # (hosts() made them on one in-process Network)
            c.transport.close()
            c.kernel.shutdown()
            codes = [h.wait(WAIT_MS) for h in holders[:2]] + ["SEND_INVALID_PORT"]
        assert codes == ["SEND_INVALID_PORT"] * 3
        wait_until(lambda: not a.server.forward and not b.server.forward,
                   "forwarding entries to go")


def _queue_then_move_to(box: str) -> int:
    port = _box("p")
    _give(port, box, m.MOVE_ALL)
    return port


# -- lies -----------------------------------------------------------------------------
def _serve_p(count: int) -> list[Any]:
    port = _box("p")
    return [m.msg_receive(port, m.RCV_TIMEOUT, WAIT_MS).values() for _ in range(count)]


def _mailbox(count: int) -> list[Any]:
    port = _box("box")
    return [m.msg_receive(port, m.RCV_TIMEOUT, WAIT_MS).items for _ in range(count)]


def _send_p(what: str) -> None:
    m.msg_send(m.Message(remote_port=netname_wait("p", WAIT_MS), items=[m.Str(what)]))


def test_a_lying_peer_is_refused_and_the_real_port_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pymach.net")
    with m.Network() as net:
        a, b = net.host("A"), net.host("B")
        evil = net.transport("evil")
        evil.start(Recorder())
        served = a.start(_serve_p, 2, name="p")
        box = b.start(_mailbox, 3, name="box")
        wait_until(lambda: {"p", "box"} <= set(b.server.names), "the names")
        b.start(_send_p, "one").wait(WAIT_MS)  # B now has a proxy for p
        p_ref, box_ref = b.server.names["p"], b.server.names["box"]

        def lie(packet: pk.Packet) -> None:
            assert evil.send("B", pk.encode_packet(packet))

        in_use = pk.RightItem(6, ("evil", os.urandom(16)), box_ref[1])
        lie(pk.MsgPacket(box_ref[1], 5, None, (in_use,)))  # an id in use at B
        stolen = pk.RightItem(6, p_ref, os.urandom(16))  # "moves" A's port to B
        lie(pk.MsgPacket(box_ref[1], 6, None, (stolen,)))
        lie(pk.FlushedPacket(p_ref[1], os.urandom(16)))  # answers no FLUSH
        lie(pk.ReceivePacket(pk.RightItem(4, p_ref, os.urandom(16), "A", os.urandom(16))))
        lie(pk.MsgPacket(box_ref[1], 7, None, (pk.RightItem(5, p_ref, p_ref[1], None,
                                                            os.urandom(16)),)))
        items = box.wait(WAIT_MS)
        assert items[0] == [m.Port(0, m.MOVE_SEND)]  # refused: arrives as PORT_NULL
        assert isinstance(items[1][0], m.Port) and items[1][0].name  # a new port of evil's
        # ownership B cannot check arrives; A, which can, refuses the OWNER it causes
        assert isinstance(items[2][0], m.Port) and items[2][0].disposition == m.MOVE_OWNERSHIP
        for packet in (pk.OwnerPacket(p_ref[1], os.urandom(16), "evil"),
                       pk.DisownPacket(p_ref[1], os.urandom(16))):  # A's port, no token
            assert evil.send("A", pk.encode_packet(packet))
        lie(pk.DisownPacket(os.urandom(16), os.urandom(16)))  # unknown: dropped
        wait_until(lambda: b.server.refused_rights == 2, "B's refusals")
        wait_until(lambda: a.server.refused_rights >= 3, "A's refusals")
        b.start(_send_p, "two").wait(WAIT_MS)  # B's proxy still reaches A's port
        assert served.wait(WAIT_MS) == [["one"], ["two"]]
        assert b.server.moves_in == 1 and not b.server.flushes
    text = [r.getMessage() for r in caplog.records]
    for what in ("OwnerPacket from 'evil'", "DisownPacket from 'evil'",
                 "OwnerPacket from 'B'", "in use here", "an owner that is not here"):
        assert any(what in t for t in text), what


# -- machd hosts ------------------------------------------------------------------------
HOLDER = """
import json, sys
import pymach as m
from pymach.net.netname import netname_check_in, netname_wait

me = m.task_self()
boot = m.task_get_special_port(me, m.TASK_BOOTSTRAP_PORT)
port = m.port_allocate(me)
netname_check_in(boot, "p", port)
mine = m.msg_receive(port, m.RCV_TIMEOUT, 20_000).values()
box = netname_wait("box", 20_000)
m.msg_send(m.Message(remote_port=box, items=[m.Port(port, m.MOVE_ALL)]))
m.msg_send(m.Message(remote_port=port, items=[m.Str("from A after the move")]))
print(json.dumps(mine), flush=True)
"""

RECEIVER = """
import json, sys
import pymach as m
from pymach.net.netname import netname_check_in, netname_wait

me = m.task_self()
boot = m.task_get_special_port(me, m.TASK_BOOTSTRAP_PORT)
box = m.port_allocate(me)
netname_check_in(boot, "box", box)
p = netname_wait("p", 20_000)
m.msg_send(m.Message(remote_port=p, items=[m.Str("from B before")]))
moved = m.msg_receive(box, m.RCV_TIMEOUT, 20_000).items[0]
m.msg_send(m.Message(remote_port=p, items=[m.Str("from B after the move")]))
got = [m.msg_receive(moved.name, m.RCV_TIMEOUT, 20_000).values()[0] for _ in range(2)]
status = list(m.port_status(me, moved.name))[3:]
print(json.dumps([int(moved.disposition), sorted(got), status]), flush=True)
"""


@pytest.mark.slow
def test_a_receive_right_moves_between_machd_hosts(cluster: str, tmp_path: Path) -> None:
    a, b = f"{LOOPBACK}:{free_port()}", f"{LOOPBACK}:{free_port()}"
    with machd_hosts(tmp_path, cluster, a, b) as (sock_a, sock_b):
        (tmp_path / "holder.py").write_text(textwrap.dedent(HOLDER))
        (tmp_path / "receiver.py").write_text(textwrap.dedent(RECEIVER))
        holder = exec_task(sock_a, tmp_path / "holder.py")
        receiver = exec_task(sock_b, tmp_path / "receiver.py")
        try:
            out, err = holder.communicate(timeout=60)
            assert holder.returncode == 0, err
            assert json.loads(out) == ["from B before"]
            out, err = receiver.communicate(timeout=60)
            assert receiver.returncode == 0, err
            assert json.loads(out) == [int(m.MOVE_ALL), ["from A after the move",
                                                         "from B after the move"],
                                       [True, True]]
        finally:
            for p in (holder, receiver):
                if p.poll() is None:
                    p.kill()
                    p.wait()


HOLDER3 = """
import time
import pymach as m
from pymach.net.netname import netname_check_in, netname_wait

me = m.task_self()
port = m.port_allocate(me)
m.port_set_backlog(me, port, 16)
netname_check_in(m.task_get_special_port(me, m.TASK_BOOTSTRAP_PORT), "p", port)
while m.port_status(me, port)[1] < 10:  # some of C's messages wait here
    time.sleep(0.01)
box = netname_wait("box", 20_000)
m.msg_send(m.Message(remote_port=box, items=[m.Port(port, m.MOVE_ALL)]))
m.msg_send(m.Message(remote_port=port, items=[m.Str("A after")]))
print("moved", flush=True)
"""

SENDER3 = """
import sys
import pymach as m
from pymach.net.netname import netname_wait

port = netname_wait("p", 20_000)
for n in range(int(sys.argv[1])):
    m.msg_send(m.Message(remote_port=port, items=[m.Int(n)]))
print("sent", flush=True)
"""

RECEIVER3 = """
import json, sys
import pymach as m
from pymach.net.netname import netname_check_in

count = int(sys.argv[1])
me = m.task_self()
box = m.port_allocate(me)
netname_check_in(m.task_get_special_port(me, m.TASK_BOOTSTRAP_PORT), "box", box)
moved = m.msg_receive(box, m.RCV_TIMEOUT, 20_000).items[0].name
got = [m.msg_receive(moved, m.RCV_TIMEOUT, 20_000).values()[0] for _ in range(count + 1)]
ints = [v for v in got if isinstance(v, int)]
print(json.dumps([ints == list(range(count)), [v for v in got if isinstance(v, str)]]),
      flush=True)
"""


@contextlib.contextmanager
def three_machd(tmp: Path, cluster: str) -> Iterator[list[str]]:
    """machd A, B and C on loopback, each dialing the ones before it."""
    uffd_or_skip()
    addrs = [f"{LOOPBACK}:{free_port()}" for _ in range(3)]
    socks = [str(tmp / h / "machd.sock") for h in "abc"]
    common = ["--memory", "256M", "--cluster", cluster, "--peer-timeout", "3"]
    daemons = []
    try:
        for n, name in enumerate("ABC"):
            peers = [arg for a in addrs[:n] for arg in ("--peer", a)]
            daemons.append(start_daemon(socks[n], *common, "--host-name", name, "--listen",
                                        addrs[n], *peers))
        yield socks
    finally:
        for d in daemons:
            stop_daemon(d)


@pytest.mark.slow
def test_a_receive_right_moves_between_three_machd_hosts_in_order(
        cluster: str, tmp_path: Path) -> None:
    """Native tasks: C sends 300 messages to A's port while A moves it to B, which gets
    them all, in order, with A's message sent after the move."""
    count = "300"
    with three_machd(tmp_path, cluster) as (sock_a, sock_b, sock_c):
        for name, text in (("holder", HOLDER3), ("sender", SENDER3), ("receiver", RECEIVER3)):
            (tmp_path / f"{name}.py").write_text(textwrap.dedent(text))
        receiver = exec_task(sock_b, tmp_path / "receiver.py", count)
        holder = exec_task(sock_a, tmp_path / "holder.py")
        sender = exec_task(sock_c, tmp_path / "sender.py", count)
        try:
            out, err = receiver.communicate(timeout=90)
            assert receiver.returncode == 0, err
            assert json.loads(out) == [True, ["A after"]]
            for p, said in ((holder, "moved\n"), (sender, "sent\n")):
                out, err = p.communicate(timeout=30)
                assert p.returncode == 0 and out == said, err
        finally:
            for p in (holder, sender, receiver):
                if p.poll() is None:
                    p.kill()
                    p.wait()
