"""port_extract_right / port_insert_right: moving rights into and out of another task's
name space, under names the caller chooses (Mach 3.0's mach_port_extract_right and
mach_port_insert_right; what a migration manager or a debugger needs).
"""

from __future__ import annotations

import pytest

import pymach as m
from machutil import recv

CONTRACT = True  # embedded (both schedulers) and as a native task of machd (conftest.py)


def status(task: int, name: int) -> tuple[bool, bool]:
    """(receiver, owner) of `task`'s name."""
    s = m.port_status(task, name)
    return s[3], s[4]


def code_of(call: object, *args: object) -> str:
    with pytest.raises(m.MachError) as e:
        call(*args)  # type: ignore[operator]
    return e.value.code


def test_a_send_right_inserted_under_a_chosen_name_and_taken_back(kernel: m.Kernel) -> None:
    me = m.task_self()
    child = m.task_create(me)
    port = m.port_allocate(me)
    m.port_insert_right(child, 50, m.Port(port, m.MAKE_SEND))
    assert status(child, 50) == (False, False)
    assert m.port_allocate(child) == 51  # names go on after the chosen one
    assert m.port_extract_right(child, 50, m.MOVE_SEND) == port  # our name for it
    assert code_of(m.port_status, child, 50) == "KERN_INVALID_NAME"  # gone from the child
    m.msg_send(m.Message(remote_port=port, id=7))
    assert recv(port).id == 7
    m.task_terminate(child)


def test_receive_and_ownership_move_with_the_queued_messages(kernel: m.Kernel) -> None:
    me = m.task_self()
    child = m.task_create(me)
    port = m.port_allocate(me)
    m.msg_send(m.Message(remote_port=port, id=1, items=[m.Int(10)]))
    m.port_insert_right(child, 40, m.Port(port, m.MOVE_ALL))
    assert status(child, 40) == (True, True)
    assert status(me, port) == (False, False)  # we keep a send right only
    m.msg_send(m.Message(remote_port=port, id=2))
    back = m.port_extract_right(child, 40, m.MOVE_ALL)
    assert back == port and status(me, back) == (True, True)
    assert status(child, 40) == (False, False)  # a send right stays, as after a send
    assert [recv(port).id for _ in range(2)] == [1, 2]  # nothing lost, in order
    m.task_terminate(child)


def test_a_copied_send_right_leaves_the_task_its_own(kernel: m.Kernel) -> None:
    me = m.task_self()
    child = m.task_create(me)
    theirs = m.port_allocate(child)
    ours = m.port_extract_right(child, theirs, m.MAKE_SEND)
    assert status(child, theirs) == (True, True)
    m.msg_send(m.Message(remote_port=ours, id=3))
    assert m.port_status(child, theirs)[1] == 1  # queued on the child's port
    m.task_terminate(child)


def test_bad_requests_fail_clearly(kernel: m.Kernel) -> None:
    me = m.task_self()
    child = m.task_create(me)
    used = m.port_allocate(child)
    a, b = m.port_allocate(me), m.port_allocate(me)
    assert code_of(m.port_extract_right, child, 999, m.MOVE_SEND) == "KERN_INVALID_NAME"
    assert code_of(m.port_extract_right, child, used, 42) == "KERN_INVALID_ARGUMENT"
    m.port_insert_right(child, 70, m.Port(a, m.MAKE_SEND))
    assert code_of(m.port_extract_right, child, 70, m.MOVE_RECEIVE) == "KERN_INVALID_RIGHT"
    assert code_of(m.port_insert_right, child, 70, m.Port(b, m.MAKE_SEND)) == \
        "KERN_NAME_EXISTS"  # 70 names another port
    assert code_of(m.port_insert_right, child, 71, m.Port(a, m.MAKE_SEND)) == \
        "KERN_NAME_EXISTS"  # the child names this port 70 already
    assert code_of(m.port_insert_right, child, used, m.Port(b, m.MAKE_SEND)) == \
        "KERN_NAME_EXISTS"
    assert code_of(m.port_insert_right, child, 3, m.Port(b, m.MAKE_SEND)) in \
        ("KERN_INVALID_NAME", "KERN_NAME_EXISTS")  # a name used before is never reused
    assert code_of(m.port_insert_right, child, 0, m.Port(b, m.MAKE_SEND)) == \
        "KERN_INVALID_ARGUMENT"
    m.port_insert_right(child, 70, m.Port(a, m.MOVE_ALL))  # more rights: they add up
    assert status(child, 70) == (True, True)
    m.task_terminate(child)
