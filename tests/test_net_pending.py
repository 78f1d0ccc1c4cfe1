"""PendingCalls: the calls in flight to other hosts that a host's death must fail."""

from __future__ import annotations

from pymach.include.mig import REPLY_ID_OFFSET
from pymach.net.pending import PendingCalls


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
