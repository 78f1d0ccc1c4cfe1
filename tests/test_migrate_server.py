"""A host's migration server and what it trusts, on hosts of the in-process network.

The moves themselves need native tasks (tests/test_migrate_net.py, three machd hosts);
here host B's migration server makes tasks with a stand-in for machd's `migrated_task`
that records what it is asked and refuses, so the path between the hosts is seen:

- the user a task arrives as is the one host A's kernel gave the sending task (the
  message trailer), with the entry point's cwd and module path; a number a task puts in
  its message is not taken for a user (the message is refused as malformed);
- a check refused by the host (`check_move`) is that host's error, before anything moved;
- a state refused after it crossed comes back: the rights are the migrator's again and
  go back to the old task under their names;
- a host with no migration server refuses with KERN_INVALID_HOST, as does a host that
  is not up or this host itself (named to its own netmsgserver).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

import pymach as m
from pymach.errors import code_name
from pymach.include.message import Int, IntArray, Message, Str
from pymach.mach import entry_env, migration_entry
from pymach.net.migration import (
    MSG_ID_TASK_STATE,
    Bounced,
    check_move,
    give_back,
    host_is_local,
    migrate_to_host,
    task_capture,
)
from pymach.net.station import start_migration_server

WAIT_S = 30.0


def entry_point() -> None:
    """What the moved task would run (never runs here)."""


class Recorder:
    """A stand-in for machd's migrated_task: records each request, refuses as told."""

    def __init__(self, refuse_check: bool, refuse_build: bool) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.refuse_check, self.refuse_build = refuse_check, refuse_build

    def __call__(self, uid: int, name: str, cwd: str, path: list[str],
                 only_check: bool) -> None:
        self.calls.append((uid, name, cwd, tuple(path), only_check))
        if (self.refuse_check if only_check else self.refuse_build):
            raise m.MachError("KERN_PROTECTION_FAILURE", f"uid {uid} is not served here")


@pytest.fixture
def hosts() -> Iterator[tuple[Any, Any, Recorder]]:
    """Hosts A, B (its migration server records and refuses the build) and C (none)."""
    with m.Network() as net:
        a, b, _c = net.host("A"), net.host("B"), net.host("C")
        recorder = Recorder(refuse_check=False, refuse_build=True)
        start_migration_server(b.kernel, b.server, recorder)  # type: ignore[arg-type]
        yield a, b, recorder


def _wait_up(*names: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            if all(not host_is_local(n) for n in names):
                return
        except m.MachError:
            pass
        assert time.monotonic() < deadline, "the hosts never came up"
        time.sleep(0.01)


def _frozen_child() -> tuple[int, int, str]:
    """A suspended child task with a region and a send right (name 40) to a port of
    ours; returns (child, that port, its entry point)."""
    me = m.task_self()
    child = m.task_create(me)
    m.task_set_name(child, "moving")
    m.vm_allocate(child, 0, 8192, True)
    port = m.port_allocate(me)
    m.port_insert_right(child, 40, m.Port(port, m.MAKE_SEND))
    entry = migration_entry(entry_point, [], {})
    m.task_suspend(child)
    return child, port, entry


def _code(call: Any, *args: Any) -> tuple[str, str]:
    with pytest.raises(m.MachError) as e:
        call(*args)
    return e.value.code, e.value.detail


def _on_a(a: Any, fn: Any) -> Any:
    return a.start(fn).wait(WAIT_S * 1000)


def test_the_user_is_the_kernels_word_and_a_refused_state_comes_back(
        hosts: tuple[Any, Any, Recorder]) -> None:
    a, _b, recorder = hosts

    def body() -> Any:
        _wait_up("B", "C")
        child, port, entry = _frozen_child()
        check_move("moving", entry, "B")  # B would take it: nothing moved yet
        state = task_capture(child, entry)
        assert [r.name for r in state.rights] == [40]
        with pytest.raises(Bounced) as e:
            migrate_to_host(state, "B")  # B refuses the build: the right comes back
        assert e.value.error.code == "KERN_PROTECTION_FAILURE"
        assert "refused the task" in e.value.error.detail
        assert [r.name for r in e.value.state.rights] == [40]
        assert give_back(child, e.value.state.rights) == []  # under its name again
        names = dict(zip(*m.port_names(child), strict=True))
        assert names[40] == m.PORT_TYPE_SEND
        assert m.port_extract_right(child, 40, m.COPY_SEND) == port  # the same port
        return entry

    entry = _on_a(a, body)
    uid = os.getuid()
    cwd = os.getcwd()
    assert [c[:3] + c[4:] for c in recorder.calls] == [(uid, "moving", cwd, True),
                                                       (uid, "moving", cwd, False)]
    assert recorder.calls[0][3] == tuple(entry_env(entry)[1])  # the module path


def test_a_number_in_the_message_is_not_a_user(hosts: tuple[Any, Any, Recorder]) -> None:
    a, _b, recorder = hosts

    def body() -> Any:
        _wait_up("B")
        boot = m.task_get_special_port(m.task_self(), m.TASK_BOOTSTRAP_PORT)
        forged = Message(remote_port=boot, local_port=m.thread_reply(), id=MSG_ID_TASK_STATE,
                         items=[Str("B"), Int(4242), Str('{"name": "x", "entry": "{}"}'),
                                IntArray(()), IntArray(())])
        reply = m.msg_rpc(forged, m.RCV_TIMEOUT, receive_timeout=int(WAIT_S * 1000))
        return reply.values()

    code, detail = _on_a(a, body)[:2]
    assert code_name(code) == "KERN_INVALID_ARGUMENT" and "not a task state" in detail
    assert recorder.calls == []  # nothing was made, for uid 4242 or anyone


def test_hosts_that_take_no_task_refuse_before_anything_moves(
        hosts: tuple[Any, Any, Recorder]) -> None:
    a, _b, recorder = hosts
    recorder.refuse_check = True

    def body() -> list[tuple[str, str]]:
        _wait_up("B", "C")
        _child, _port, entry = _frozen_child()
        return [_code(check_move, "moving", entry, h) for h in ("B", "C", "D", "A")]

    b, c, d, here = _on_a(a, body)
    assert b[0] == "KERN_PROTECTION_FAILURE" and "is not served here" in b[1]
    assert c[0] == "KERN_INVALID_HOST" and "takes no migrated tasks" in c[1]
    assert d[0] == "KERN_INVALID_HOST" and "not up" in d[1]
    assert here[0] == "KERN_INVALID_HOST" and "is this host" in here[1]
