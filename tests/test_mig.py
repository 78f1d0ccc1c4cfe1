"""Our MIG: a user-defined subsystem served by a user task, and the kernel's own interfaces."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import pymach as m
from machutil import assert_kernel_ok, notifications, recv, sleep_ms
from pymach import Int, Message, Port, Str, Subsystem, serve_message
from pymach.include.mach_defs import port_defs, task_defs
from pymach.include.mig import BOOL, BYTES, FLOAT, INT, INT_ARRAY, PORT, PORT_ARRAY, STR

CONTRACT = True  # these run as native tasks of machd too (conftest.py)

SHUTDOWN = 7999


def declare(with_extra: bool = False) -> Subsystem:
    sub = Subsystem("calc", 7000)
    sub.routine("add", "server", [("a", INT), ("b", INT)], [("sum", INT)], "a + b")
    sub.routine("div", "server", [("a", FLOAT), ("b", FLOAT)], [("q", FLOAT)])
    sub.routine("echo", "server", [("s", STR), ("data", BYTES), ("xs", INT_ARRAY),
                                   ("flag", BOOL)],
                [("s", STR), ("data", BYTES), ("xs", INT_ARRAY), ("flag", BOOL)])
    sub.routine("keep", "server", [("p", PORT)], [("count", INT)])
    sub.routine("give", "server", [("ps", PORT_ARRAY)], [("back", PORT_ARRAY)])
    sub.routine("note", "server", [("v", INT)], simple=True)
    sub.routine("fail", "server", [("code", STR)])
    sub.routine("nothing", "server")
    if with_extra:
        sub.routine("extra", "server", [("v", INT)], [("w", INT)])
    return sub


calc = declare()
client_calc = declare(with_extra=True)  # a client built against a newer interface

add = calc.stub("add")
div = calc.stub("div")
echo = calc.stub("echo")
keep = calc.stub("keep")
give = calc.stub("give")
note = calc.stub("note")
fail = calc.stub("fail")
nothing = calc.stub("nothing")
extra = client_calc.stub("extra")


class Calc:
    """The server's implementation; runs in the server task."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.kept: list[int] = []

    def add(self, server: int, a: int, b: int) -> int:
        self.calls.append(("add", (a, b)))
        return a + b

    def div(self, server: int, a: float, b: float) -> float:
        self.calls.append(("div", (a, b)))
        if b == 0:
            raise m.MachError("KERN_INVALID_ARGUMENT", "division by zero")
        return a / b

    def echo(self, server: int, s: str, data: bytes, xs: tuple[int, ...],
             flag: bool) -> tuple[Any, ...]:
        self.calls.append(("echo", (s, data, xs, flag)))
        return s[::-1], data[::-1], tuple(reversed(xs)), not flag

    def keep(self, server: int, p: int) -> int:
        self.calls.append(("keep", (p,)))
        self.kept.append(p)
        m.msg_send(Message(remote_port=p, id=1, items=[Str("kept")]), m.SEND_TIMEOUT, 1000)
        return len(self.kept)

    def give(self, server: int, ps: tuple[int, ...]) -> tuple[int, ...]:
        self.calls.append(("give", ps))
        return ps

    def note(self, server: int, v: int) -> None:
        self.calls.append(("note", (v,)))

    def fail(self, server: int, code: str) -> None:
        self.calls.append(("fail", (code,)))
        raise m.MachError(code, "as requested")

    def nothing(self, server: int) -> None:
        self.calls.append(("nothing", ()))


def serve(impl: Calc) -> int:
    """A server task's main: publish a port via the bootstrap port, then serve on it."""
    service = m.port_allocate(m.task_self())
    boot = m.task_get_special_port(m.task_self(), m.TASK_BOOTSTRAP_PORT)
    m.msg_send(Message(remote_port=boot, items=[Port(service, m.MAKE_SEND)]),
               m.SEND_TIMEOUT, 1000)
    served = 0
    while True:
        msg = m.msg_receive(service, m.RCV_TIMEOUT, 20_000)
        if msg.id == SHUTDOWN:
            return served
        reply = serve_message(calc, impl, msg)
        if reply is not None:
            m.msg_send(reply, m.SEND_TIMEOUT, 1000)
        served += 1


@pytest.fixture
def server(kernel: m.Kernel) -> Iterator[tuple[int, Calc]]:
    """A calc server task; yields our send right to its service port and its state."""
    b = m.port_allocate(m.task_self())
    m.task_set_special_port(m.task_self(), m.TASK_BOOTSTRAP_PORT, b)
    impl = Calc()
    h = kernel.spawn(serve, impl, name="calc-server")
    item = recv(b).items[0]
    assert isinstance(item, Port)
    yield item.name, impl
    if not h.done:
        m.msg_send(Message(remote_port=item.name, id=SHUTDOWN), m.SEND_TIMEOUT, 1000)
        h.result(5000)


# -- a user subsystem -------------------------------------------------------------------


def test_routines_get_consecutive_ids_and_stub_docs() -> None:
    assert [r.id for r in calc.routines.values()] == list(range(7000, 7008))
    assert calc.by_name["add"].id == 7000
    assert add.__name__ == "add"
    assert "add(server, a, b) -> sum" in (add.__doc__ or "")
    assert "MIG routine 7000" in (add.__doc__ or "")


@pytest.mark.embedded_only("the server task records calls in an object the test reads")
def test_rpc_to_user_server(server: tuple[int, Calc]) -> None:
    svc, impl = server
    assert add(svc, 2, 40) == 42
    assert add(server=svc, a=-5, b=5) == 0
    assert div(svc, 1, 4) == 0.25
    assert echo(svc, "abc", b"\x01\x02", [1, 2, 3], True) == ("cba", b"\x02\x01", (3, 2, 1),
                                                             False)
    assert nothing(svc) is None
    assert impl.calls[:2] == [("add", (2, 40)), ("add", (-5, 5))]
    assert impl.calls[-1] == ("nothing", ())


@pytest.mark.embedded_only("the server task records calls in an object the test reads")
def test_port_arguments_travel_as_send_rights(kernel: m.Kernel,
                                              server: tuple[int, Calc]) -> None:
    svc, impl = server
    mine = m.port_allocate(m.task_self())
    assert keep(svc, mine) == 1
    assert recv(mine).values() == ["kept"]  # the server used its send right
    # the server's name for our port is its own
    row = next(r for r in kernel.lsmp("calc-server") if r.name == impl.kept[0])
    assert row.rights == "send" and row.receiver == "bootstrap"
    # arrays of rights go and come back under our names
    a, b = m.port_allocate(m.task_self()), m.port_allocate(m.task_self())
    assert give(svc, (a, b, a)) == (a, b, a)
    assert m.port_status(m.task_self(), a)[3:] == (True, True)


@pytest.mark.embedded_only("the server task records calls in an object the test reads")
def test_simpleroutine_sends_without_waiting(server: tuple[int, Calc]) -> None:
    svc, impl = server
    assert note(svc, 7) is None
    assert add(svc, 1, 1) == 2  # served in order, so note was served first
    assert ("note", (7,)) in impl.calls
    assert impl.calls.index(("note", (7,))) < impl.calls.index(("add", (1, 1)))


@pytest.mark.parametrize("code, family", [
    ("KERN_INVALID_ARGUMENT", m.KernError),
    ("KERN_FAILURE", m.KernError),
    ("KERN_NO_SPACE", m.KernError),
    ("SEND_INVALID_PORT", m.SendError),
    ("MIG_BAD_ARGUMENTS", m.MigError),
])
def test_server_errors_propagate(server: tuple[int, Calc], code: str,
                                 family: type[m.MachError]) -> None:
    svc, _ = server
    with pytest.raises(family) as e:
        fail(svc, code)
    assert e.value.code == code
    assert e.value.detail == "as requested"
    assert add(svc, 1, 2) == 3  # the server goes on serving


def test_server_error_from_implementation(server: tuple[int, Calc]) -> None:
    svc, _ = server
    with pytest.raises(m.KernError) as e:
        div(svc, 1.0, 0)
    assert e.value.code == "KERN_INVALID_ARGUMENT"
    assert "division by zero" in str(e.value)


@pytest.mark.parametrize("call", [
    lambda svc: add(svc, "1", 2),
    lambda svc: add(svc, 1.5, 2),
    lambda svc: add(svc, True, 2),
    lambda svc: add(svc, 2**63, 0),
    lambda svc: add("svc", 1, 2),
    lambda svc: add(True, 1, 2),
    lambda svc: div(svc, "x", 1.0),
    lambda svc: div(svc, True, 1.0),
    lambda svc: echo(svc, b"not str", b"", [], True),
    lambda svc: echo(svc, "s", "not bytes", [], True),
    lambda svc: echo(svc, "s", b"", [1, "2"], True),
    lambda svc: echo(svc, "s", b"", [True], True),
    lambda svc: echo(svc, "s", b"", (2**64,), True),
    lambda svc: echo(svc, "s", b"", 5, True),
    lambda svc: echo(svc, "s", b"", [], "yes"),
    lambda svc: keep(svc, "port"),
    lambda svc: keep(svc, None),
    lambda svc: give(svc, ("a",)),
    lambda svc: give(svc, (True,)),
    lambda svc: give(svc, 5),
])
def test_wrong_types_fail_before_sending(kernel: m.Kernel, call: Any) -> None:
    # a port nobody serves: anything sent would stay queued on it
    svc = m.port_allocate(m.task_self())
    with pytest.raises(m.KernError) as e:
        call(svc)
    assert e.value.code == "KERN_INVALID_ARGUMENT"
    assert m.port_status(m.task_self(), svc)[1] == 0
    assert_kernel_ok()


def test_unknown_routine_gives_mig_bad_id(server: tuple[int, Calc]) -> None:
    svc, impl = server
    with pytest.raises(m.MigError) as e:
        extra(svc, 1)
    assert e.value.code == "MIG_BAD_ID"
    assert add(svc, 2, 2) == 4
    assert not any(name == "extra" for name, _ in impl.calls)


def test_malformed_request_gives_mig_bad_arguments(server: tuple[int, Calc]) -> None:
    svc, impl = server
    reply = m.thread_reply()
    add_id = calc.by_name["add"].id
    for items in ([Str("1"), Int(2)], [Int(1)], [Int(1), Int(2), Int(3)]):
        ans = m.msg_rpc(Message(remote_port=svc, local_port=reply, id=add_id, items=items),
                        m.RCV_TIMEOUT, receive_timeout=5000)
        assert ans.id == add_id + 100
        assert ans.values()[0] == m.MachError("MIG_BAD_ARGUMENTS").value
        assert isinstance(ans.items[1], Str)
    assert impl.calls == []


@pytest.mark.embedded_only("the server task records calls in an object the test reads")
def test_serve_message_without_reply_port(server: tuple[int, Calc]) -> None:
    svc, impl = server
    m.msg_send(Message(remote_port=svc, id=calc.by_name["add"].id, items=[Int(1), Int(2)]))
    assert add(svc, 3, 4) == 7
    assert impl.calls == [("add", (1, 2)), ("add", (3, 4))]
    assert serve_message(calc, impl, Message(local_port=1, id=7000,
                                             items=[Int(1), Int(1)])) is None


def test_bad_replies_are_detected(kernel: m.Kernel) -> None:
    """A server that answers with the wrong id or wrong types."""
    b = m.port_allocate(m.task_self())
    m.task_set_special_port(m.task_self(), m.TASK_BOOTSTRAP_PORT, b)

    def bad_server() -> None:
        svc = m.port_allocate(m.task_self())
        boot = m.task_get_special_port(m.task_self(), m.TASK_BOOTSTRAP_PORT)
        m.msg_send(Message(remote_port=boot, items=[Port(svc, m.MAKE_SEND)]))
        for items, delta in (([Int(0), Int(1)], 101), ([Int(0), Str("x")], 100),
                             ([], 100), ([Str("x")], 100), ([Int(0)], 100)):
            req = recv(svc, 10_000)
            m.msg_send(Message(remote_port=req.remote_port, id=req.id + delta, items=items))

    h = kernel.spawn(bad_server)
    svc = recv(b).items[0].name  # type: ignore[union-attr]
    for expected in ("MIG_REPLY_MISMATCH", "MIG_TYPE_ERROR", "MIG_TYPE_ERROR",
                     "MIG_TYPE_ERROR", "MIG_TYPE_ERROR"):
        with pytest.raises(m.MigError) as e:
            add(svc, 1, 2)
        assert e.value.code == expected
    h.result(5000)
    assert_kernel_ok()


def test_server_death_fails_pending_client(kernel: m.Kernel) -> None:
    """The server task dies: a client's next RPC fails instead of hanging."""
    b = m.port_allocate(m.task_self())
    m.task_set_special_port(m.task_self(), m.TASK_BOOTSTRAP_PORT, b)
    h = kernel.spawn(serve, Calc(), name="calc-server")
    svc = recv(b).items[0].name  # type: ignore[union-attr]
    assert add(svc, 1, 1) == 2
    m.task_terminate(h.port)
    h.result(5000)
    with pytest.raises(m.SendError) as e:
        add(svc, 1, 1)
    assert e.value.code == "SEND_INVALID_PORT"
    assert (m.NOTIFY_PORT_DELETED, svc) in notifications()


# -- the kernel's interfaces --------------------------------------------------------------


@pytest.mark.parametrize("call", [
    lambda: m.task_info(m.thread_self()),
    lambda: m.port_allocate(m.thread_self()),
    lambda: m.task_threads(m.host_self()),
    lambda: m.thread_info(m.task_self()),
    lambda: m.thread_suspend(m.task_self()),
    lambda: m.host_info(m.task_self()),
    lambda: m.host_kernel_version(m.thread_self()),
])
def test_routine_sent_to_wrong_kind_of_kernel_port(kernel: m.Kernel, call: Any) -> None:
    with pytest.raises(m.KernError) as e:
        call()
    assert e.value.code == "KERN_INVALID_ARGUMENT"
    assert "port" in e.value.detail
    assert m.thread_info(m.thread_self())[2] == 0  # nothing was done
    assert_kernel_ok()


def test_unknown_id_to_kernel_port(kernel: m.Kernel) -> None:
    reply = m.thread_reply()
    ans = m.msg_rpc(Message(remote_port=m.task_self(), local_port=reply, id=123),
                    m.RCV_TIMEOUT, receive_timeout=1000)
    assert ans.id == 223
    assert ans.values()[0] == m.MachError("MIG_BAD_ID").value


def test_malformed_request_to_kernel_port(kernel: m.Kernel) -> None:
    reply = m.thread_reply()
    rid = port_defs.by_name["port_status"].id
    ans = m.msg_rpc(Message(remote_port=m.task_self(), local_port=reply, id=rid,
                            items=[Str("x")]), m.RCV_TIMEOUT, receive_timeout=1000)
    assert ans.values()[0] == m.MachError("MIG_BAD_ARGUMENTS").value
    assert_kernel_ok()


def test_failed_kernel_request_destroys_its_rights(kernel: m.Kernel) -> None:
    task = m.task_self()
    q, r = m.port_allocate(task), m.port_allocate(task)
    reply = m.thread_reply()
    # an unknown routine carrying q's receive right: the right is destroyed, so it goes
    # to q's owner (us) again; r's receive and ownership together: r dies, and since the
    # sender keeps a send right when it moves rights, we are told of r's death
    m.msg_rpc(Message(remote_port=task, local_port=reply, id=99,
                      items=[Port(q, m.MOVE_RECEIVE), Port(r, m.MOVE_ALL)]),
              m.RCV_TIMEOUT, receive_timeout=1000)
    got = notifications()
    assert (m.NOTIFY_RECEIVE_RIGHTS, q) in got
    assert (m.NOTIFY_PORT_DELETED, r) in got
    assert m.port_status(task, q)[3:] == (True, True)
    with pytest.raises(m.KernError):
        m.port_status(task, r)


def test_kernel_request_without_reply_port_is_executed(kernel: m.Kernel) -> None:
    child = m.task_create(m.task_self())
    m.msg_send(Message(remote_port=child, id=task_defs.by_name["task_suspend"].id))
    assert m.task_info(child)[1] == 1
    m.task_terminate(child)


def test_kernel_ports_are_never_full(kernel: m.Kernel) -> None:
    child = m.task_create(m.task_self())
    for _ in range(m.PORT_BACKLOG_MAX + 3):
        m.msg_send(Message(remote_port=child, id=task_defs.by_name["task_suspend"].id),
                   m.SEND_TIMEOUT, 0)
    assert m.task_info(child)[1] == m.PORT_BACKLOG_MAX + 3
    m.task_terminate(child)
    sleep_ms(1)
