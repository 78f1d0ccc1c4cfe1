"""spawn carries port rights given as arguments (issue 13, item 12), in both modes.

An argument that is a `Port(name, disposition)` item travels to the child as that right,
with that disposition (MAKE_SEND, COPY_SEND, MOVE_SEND, MOVE_RECEIVE, ...), and the
child's function gets the name the right has in the child's space. Other arguments are
passed as they are.
"""

from __future__ import annotations

import pytest

import pymach as m
from pymach import Int, Message, Port

CONTRACT = True


def _server(svc: int, label: str) -> str:
    msg = m.msg_receive(svc)
    m.msg_send(Message(remote_port=msg.remote_port, id=msg.id + 100,
                       items=[Int(msg.items[0].value * 2)]))
    return label


def _client(svc: int) -> int:
    reply = m.msg_rpc(Message(remote_port=svc, local_port=m.thread_reply(), id=1,
                              items=[Int(21)]))
    return int(reply.items[0].value)


def test_rights_given_as_arguments_reach_the_child(kernel: m.Kernel) -> None:
    me = m.task_self()
    svc = m.port_allocate(me)
    client = m.spawn(_client, Port(svc, m.MAKE_SEND), name="client")
    server = m.spawn(_server, Port(svc, m.MOVE_RECEIVE), "done", name="server")
    assert client.result(30_000) == 42
    assert server.result(30_000) == "done"
    with pytest.raises(m.MachError):  # the receive right moved: it is not ours any more
        m.msg_receive(svc, m.RCV_TIMEOUT, 0)


def test_a_right_the_caller_lacks_is_refused_before_the_child_runs(
        kernel: m.Kernel) -> None:
    me = m.task_self()
    svc = m.port_allocate(me)
    m.port_deallocate(me, svc)
    before = len(m.task_threads(me))
    with pytest.raises(m.MachError):
        m.spawn(_client, Port(svc, m.MAKE_SEND), name="orphaned")
    assert "orphaned" not in {r.name for r in kernel.ps()}  # the child made was ended
    assert len(m.task_threads(me)) == before
