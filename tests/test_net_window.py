"""A proxy's window (net/window.py): how many of its messages may be on their way.

Without it a host that is slow to take packets (busy, or relaying for a port that
moved) could be handed more messages for one port than the port may take from the
network, and the surplus was refused after the senders' msg_send had returned: lost.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import pytest

import pymach as m
from pymach.net import window as w
from pymach.net.netname import netname_wait
from pymach.net.packets import AckPacket
from test_net_rights import (  # noqa: F401  (cluster: a fixture)
    WAIT_MS,
    _box,
    cluster,
    hosts,
    in_order,
    sender,
    wait_until,
)


# -- the bookkeeping ------------------------------------------------------------------------
def test_a_proxy_asks_every_quarter_window_and_is_full_at_the_window() -> None:
    windows = w.ProxyWindows()
    asks = [windows.sent(7) for _ in range(w.WINDOW)]
    tokens = {a for a, _ in asks if a is not None}
    assert [n for _, n in asks if n] == [w.ASK_EVERY] * (w.WINDOW // w.ASK_EVERY)
    assert len(tokens) == 1 and windows.full(7) and not windows.full(8)
    token = tokens.pop()
    assert windows.proxy_of(token) == 7
    windows.acked(7, w.ASK_EVERY)
    assert not windows.full(7)
    windows.restart(7)  # its route was flushed: a new window, the old token is stale
    assert windows.proxy_of(token) == 0 and not windows.full(7)
    assert windows.sent(7) == (None, 0)


def test_a_relay_passes_asks_on_and_answers_only_the_host_it_asked() -> None:
    relays = w.RelayAcks()
    mine = relays.pass_on("B", b"t" * 16, 16, "A")
    assert mine is not None and mine != b"t" * 16
    assert relays.answered("C", mine) is None  # C was not asked
    assert relays.answered("A", mine) == ("B", b"t" * 16, 16)
    assert relays.answered("A", mine) is None  # once
    lost = relays.pass_on("B", b"u" * 16, 5, "A")
    relays.pass_on("A", b"v" * 16, 3, "C")
    assert relays.host_gone("A") == [("B", b"u" * 16, 5)]  # answered for the lost packet
    assert lost is not None and relays.answered("A", lost) is None
    assert len(relays) == 0  # (A's own ask through us went with A)


def test_a_relay_with_too_many_open_asks_answers_new_ones_itself() -> None:
    """A host that asks (or is asked) and never answers uses up only its own share
    (a review's finding: one host could fill the whole table, and every host's asks
    through the relay were answered at once after that)."""
    relays, share = w.RelayAcks(), w.MAX_RELAY_ACKS_PER_HOST
    mine = [relays.pass_on("B", n.to_bytes(16, "big"), 1, "A") for n in range(share)]
    assert None not in mine
    assert relays.pass_on("B", b"x" * 16, 1, "C") is None  # from B: B's share is used
    assert relays.pass_on("C", b"x" * 16, 1, "A") is None  # to A: A's share is used
    assert relays.pass_on("C", b"x" * 16, 1, "D") is not None  # others go on
    assert relays.answered("A", mine[0] or b"") == ("B", (0).to_bytes(16, "big"), 1)
    assert relays.pass_on("B", b"y" * 16, 1, "D") is not None  # (room again)
    for n, host in enumerate("EFGHIJ"):
        for k in range(share):
            relays.pass_on(host, (n * share + k).to_bytes(16, "big"), 1, host.lower())
    assert len(relays) == w.MAX_RELAY_ACKS
    assert relays.pass_on("K", b"z" * 16, 1, "k") is None  # the whole table


# -- across hosts -----------------------------------------------------------------------
N = 1200  # more than a port may take from the network (NET_QUEUE_MAX) plus its backlog


def _hold_then_take(ready: threading.Event, go: threading.Event, count: int) -> list[Any]:
    """Check in "p" (backlog 16), take nothing until `go`, then `count` messages."""
    port = _box("p")
    m.port_set_backlog(m.task_self(), port, 16)
    ready.set()
    assert go.wait(WAIT_MS / 1000)
    log = []
    for _ in range(count):
        log.append(tuple(m.msg_receive(port, m.RCV_TIMEOUT, WAIT_MS).values()))
    return log


@pytest.mark.parametrize("via", ["network", "tcp"])
def test_a_host_slow_to_take_packets_loses_no_message(
        via: str, request: pytest.FixtureRequest) -> None:
    """A's server stops taking packets while B's sender sends N messages to A's port:
    B's proxy stops at its window (its sender then waits on the proxy's backlog), and
    when A goes on, and only then the receiver, every message arrives, in order (before
    the window B sent them all, A refused those past NET_QUEUE_MAX, and the receive
    timed out)."""
    with hosts(via, request, "A", "B") as hs:
        a, b = hs["A"], hs["B"]
        ready, go, resume = threading.Event(), threading.Event(), threading.Event()
        receiver = a.start(_hold_then_take, ready, go, N, name="receiver")
        assert ready.wait(WAIT_MS / 1000)
        wait_until(lambda: "p" in b.server.names, "B to know p")
        taking = a.server.packet_in

        def slow(host: str, data: bytes) -> None:
            resume.wait(WAIT_MS / 1000)
            taking(host, data)

        a.server.packet_in = slow  # type: ignore[method-assign]
        try:
            sending = b.start(sender, "p", 0, N, name="sender")
            wait_until(lambda: b.server.forwarded >= w.WINDOW, "B to fill its window")
            time.sleep(0.3)  # (without the window, B would send on: N within this)
            on_the_way = b.server.forwarded
        finally:
            resume.set()
        wait_until(lambda: a.server.bytes_in >= b.server.bytes_out, "A to take B's packets")
        go.set()  # (only now: a receiver taking meanwhile would make room at the port)
        assert sending.wait(WAIT_MS) == N
        log = receiver.wait(WAIT_MS)
        assert len(log) == N and in_order(log, 1, N)
        assert on_the_way <= w.WINDOW + 1  # (one more may have been counted meanwhile)
        wait_until(lambda: not b.server.windowed, "B's proxy to be let go")


def _send_rights_then_plain(rights: int, plain: int) -> str:
    port = netname_wait("p", WAIT_MS)
    for i in range(rights):  # each lands a new name in A's server: its space fills
        mine = m.port_allocate(m.task_self())
        m.msg_send(m.Message(remote_port=port, id=1,
                             items=[m.Int(i), m.Port(mine, m.Disposition.MAKE_SEND)]))
    for i in range(plain):
        m.msg_send(m.Message(remote_port=port, id=2, items=[m.Int(i)]), m.SEND_TIMEOUT, 5000)
    return "done"


def _take_until(stop: threading.Event) -> int:
    port = _box("p")
    n = 0
    while not stop.is_set():
        with contextlib.suppress(m.MachError):
            m.msg_receive(port, m.RCV_TIMEOUT, 100)
            n += 1
    return n


def test_a_packet_the_host_fails_to_deliver_is_still_acknowledged() -> None:
    """A's server cannot land the rights B's messages carry (its name space is full):
    those messages fail there, but B's proxy gets its window back, and B's plain
    messages after them still go (a review's finding: the ACK was sent only after a
    delivery that did not raise, and B's proxy stayed held for good)."""
    with m.Network() as net:
        a, b = net.host("A", port_names_max=128), net.host("B")
        stop = threading.Event()
        receiver = a.start(_take_until, stop, name="receiver")
        wait_until(lambda: "p" in b.server.names, "B to know p")
        try:
            assert b.start(_send_rights_then_plain, 300, 200, name="sender").wait(
                4 * WAIT_MS) == "done"
        finally:
            stop.set()
        assert receiver.wait(WAIT_MS) >= 200
        wait_until(lambda: not b.server.windowed, "B's proxy to be let go")


def test_messages_queued_behind_a_forwarding_thread_keep_to_the_window() -> None:
    """B's first message needs a forwarding thread (as one whose out-of-line memory a
    data manager must page in does) and takes a while; the messages behind it wait on
    the proxy and then go only as far as the window (a review's finding: they all went
    at once, and A, not taking packets meanwhile, refused those past NET_QUEUE_MAX)."""
    with m.Network() as net:
        a, b = net.host("A"), net.host("B")
        ready, go, resume = threading.Event(), threading.Event(), threading.Event()
        receiver = a.start(_hold_then_take, ready, go, N, name="receiver")
        assert ready.wait(WAIT_MS / 1000)
        wait_until(lambda: "p" in b.server.names, "B to know p")
        taking, threaded = a.server.packet_in, b.server._forward_threaded
        first = [True]

        def slow_take(host: str, data: bytes) -> None:
            resume.wait(WAIT_MS / 1000)
            taking(host, data)

        def needs_thread(msg: m.Message) -> bool:
            needs, first[0] = first[0], False
            return needs

        def slow_thread(msg: m.Message, target: Any) -> None:
            time.sleep(0.5)  # (its data manager is slow)
            threaded(msg, target)

        a.server.packet_in = slow_take  # type: ignore[method-assign]
        b.server._needs_thread = needs_thread  # type: ignore[method-assign]
        b.server._forward_threaded = slow_thread  # type: ignore[method-assign]
        try:
            sending = b.start(sender, "p", 0, N, name="sender")
            wait_until(lambda: b.server.forwarded >= w.WINDOW, "B to fill its window")
            time.sleep(0.3)
            on_the_way = b.server.forwarded
        finally:
            resume.set()
        wait_until(lambda: a.server.bytes_in >= b.server.bytes_out, "A to take B's packets")
        go.set()
        assert sending.wait(WAIT_MS) == N
        log = receiver.wait(WAIT_MS)
        assert len(log) == N and in_order(log, 1, N)
        assert on_the_way <= w.WINDOW + 1


def test_an_ack_from_another_host_opens_no_window() -> None:
    """B's proxy for A's port is held at its window while A takes nothing; an ACK for
    that window's token from C (which B never asked: even knowing the token) is
    ignored, and B's proxy stays held until A's own ACKs come."""
    with m.Network() as net:
        a, b, c = net.host("A"), net.host("B"), net.host("C")
        ready, go, resume = threading.Event(), threading.Event(), threading.Event()
        receiver = a.start(_hold_then_take, ready, go, 200, name="receiver")
        assert ready.wait(WAIT_MS / 1000)
        wait_until(lambda: "p" in b.server.names, "B to know p")
        taking = a.server.packet_in

        def slow_take(host: str, data: bytes) -> None:
            resume.wait(WAIT_MS / 1000)
            taking(host, data)

        a.server.packet_in = slow_take  # type: ignore[method-assign]
        try:
            sending = b.start(sender, "p", 0, 200, name="sender")
            wait_until(lambda: b.server.windowed, "B's proxy held at its window")
            with b.server.lock:
                (proxy,) = b.server.windowed
                token = b.server.windows._by_proxy[proxy].token
            for _ in range(8):  # (as many as would open it many times over)
                c.server._send("B", AckPacket(token, w.WINDOW))
            time.sleep(0.2)
            assert b.server.windowed == {proxy} and b.server.forwarded == w.WINDOW
        finally:
            resume.set()
        go.set()
        assert sending.wait(WAIT_MS) == 200
        assert len(receiver.wait(WAIT_MS)) == 200
