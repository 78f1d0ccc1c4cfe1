"""PendingCalls: the calls in flight to other hosts that a host's death must fail (the
table, and the netmsgserver using it on the in-process network)."""

from __future__ import annotations

import threading

import pymach as m
from pymach.errors import code_name
from pymach.include.mig import REPLY_ID_OFFSET
from pymach.net.netname import netname_check_in, netname_wait
from pymach.net.pending import PendingCalls

WAIT_S = 10.0


def test_a_reply_closes_its_call_and_a_death_returns_the_rest_in_order() -> None:
    p = PendingCalls()
    p.sent("B", 7, 500)
    p.sent("B", 8, 501)
    p.sent("C", 9, 502)
    p.delivered(7, 500 + REPLY_ID_OFFSET)  # B answered the first call
    p.delivered(8, 501)  # not a reply (the request id itself): the call stays open
    assert len(p) == 2
    assert p.host_down("B") == [(8, 501)]
    assert p.host_down("B") == []  # told once
    assert p.host_down("C") == [(9, 502)] and len(p) == 0


def test_a_dead_reply_port_forgets_its_calls() -> None:
    p = PendingCalls()
    p.sent("B", 7, 500)
    p.sent("B", 7, 600)
    p.sent("B", 8, 500)
    p.port_died(7)
    assert p.host_down("B") == [(8, 500)]
    assert p.by_reply == {} and p.by_host == {} and p.host_of == {}


def test_the_table_is_bounded_per_host_forgetting_the_oldest() -> None:
    p = PendingCalls(max_per_host=3)
    for i in range(5):
        p.sent("B", 100 + i, 1)
    p.sent("C", 1, 1)
    assert p.forgotten == 2 and len(p) == 4
    assert p.host_down("B") == [(102, 1), (103, 1), (104, 1)]
    assert set(p.by_reply) == {1}


def test_the_same_call_sent_again_is_remembered_once() -> None:
    p = PendingCalls()
    p.sent("B", 7, 500)
    p.sent("C", 7, 500)  # (the port moved: the latest destination counts)
    assert p.host_down("B") == [] and p.host_down("C") == [(7, 500)]


# -- in the netmsgserver: a host's death fails the calls it never answered ---------------
def _silent(ready: threading.Event) -> None:
    """Check in 'silent'; take one request and never answer it."""
    me = m.task_self()
    port = m.port_allocate(me)
    netname_check_in(m.task_get_special_port(me, m.TASK_BOOTSTRAP_PORT), "silent", port)
    m.msg_receive(port)
    ready.set()
    threading.Event().wait(WAIT_S)


def _call(name: str) -> tuple[int, str]:
    """msg_rpc `name` on the network: the reply's id and its first value's code name."""
    port = netname_wait(name, WAIT_S * 1000)
    reply = m.msg_rpc(m.Message(remote_port=port, local_port=m.thread_reply(), id=7),
                      m.RCV_TIMEOUT, receive_timeout=WAIT_S * 1000)
    return reply.id, code_name(reply.items[0].value)


def test_a_call_in_flight_fails_when_its_host_dies() -> None:
    ready = threading.Event()
    with m.Network() as net:
        a, b = net.host("A"), net.host("B")
        b.start(_silent, ready, name="silent")
        caller = a.start(_call, "silent", name="caller")
        assert ready.wait(WAIT_S)
        net.crash("B")
        assert caller.wait(WAIT_S * 1000) == (7 + REPLY_ID_OFFSET, "MIG_SERVER_DIED")
        assert len(a.server.open_calls) == 0
