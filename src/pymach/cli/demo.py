"""`pymach demo`: a small multi-task program on the embedded kernel, narrated.

A name server, a server that checks in a service port, and a client that looks it up
and calls it by msg_rpc (through a MIG-defined interface), then the server's death:
the client is notified and its next call fails cleanly. Between the steps the demo
prints the kernel's `ps` and one task's `lsmp`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pymach
from pymach import (
    MOVE_ALL,
    NOTIFY_PORT_DELETED,
    RCV_TIMEOUT,
    TASK_BOOTSTRAP_PORT,
    TASK_NOTIFY_PORT,
    MachError,
    Message,
    Port,
)
from pymach.include.mig import INT, Subsystem, serve_message
from pymach.kern.report import format_lsmp, format_ps
from pymach.net.netname import (
    NETNAME_SHUTDOWN,
    netname_check_in,
    netname_look_up,
    run_name_server,
)

calc_defs = Subsystem("calc", 7000)
calc_defs.routine("calc_add", "server", [("a", INT), ("b", INT)], [("sum", INT)],
                  doc="Add two integers.")
calc_defs.routine("calc_div", "server", [("a", INT), ("b", INT)], [("quotient", INT)],
                  doc="Integer division; KERN_INVALID_ARGUMENT for a zero divisor.")
calc_add = calc_defs.stub("calc_add")
calc_div = calc_defs.stub("calc_div")
CALC_STOP = 7099


class Calculator:
    """The calc server's routines."""

    def calc_add(self, _port: int, a: int, b: int) -> int:
        return a + b

    def calc_div(self, _port: int, a: int, b: int) -> int:
        if b == 0:
            raise MachError("KERN_INVALID_ARGUMENT", "division by zero")
        return a // b


def calc_server(say: Callable[[str], None]) -> int:
    """Check in a service port with the name server, then serve until told to stop."""
    me = pymach.task_self()
    svc = pymach.port_allocate(me)
    ns = pymach.task_get_special_port(me, TASK_BOOTSTRAP_PORT)
    netname_check_in(ns, "calc", svc)
    say(f"[server] checked in port {svc} as 'calc' with the name server")
    served = 0
    while True:
        msg = pymach.msg_receive(svc)
        if msg.id == CALC_STOP:
            return served
        reply = serve_message(calc_defs, Calculator(), msg)
        if reply is not None:
            pymach.msg_send(reply)
        served += 1


def _narrate(kernel: pymach.Kernel, say: Callable[[str], None]) -> None:
    me = pymach.task_self()
    ns = pymach.port_allocate(me)
    pymach.task_set_special_port(me, TASK_BOOTSTRAP_PORT, ns)
    nameserver = kernel.spawn(_name_server_main, name="netname")
    child_notify = pymach.task_get_special_port(nameserver.port, TASK_NOTIFY_PORT)
    pymach.msg_send(Message(remote_port=child_notify, id=1, items=[Port(ns, MOVE_ALL)]))
    say(f"[boot] name server task started; gave it port {ns}'s receive rights, kept a send "
        "right as everyone's bootstrap port")
    server = kernel.spawn(calc_server, say, name="calc-server")
    client = kernel.spawn(_client_main, say, kernel, name="client")
    client.result(timeout=30_000)
    say(f"[boot] calc server served {server.result(timeout=30_000)} requests and exited")
    pymach.msg_send(Message(remote_port=ns, id=NETNAME_SHUTDOWN))
    nameserver.result(timeout=30_000)
    say("[boot] name server stopped")


def _name_server_main() -> int:
    handoff = pymach.msg_receive(pymach.task_notify())
    ns = handoff.items[0].name  # type: ignore[union-attr]
    return len(run_name_server(ns).names)


def _client_main(say: Callable[[str], None], kernel: pymach.Kernel) -> None:
    me = pymach.task_self()
    ns = pymach.task_get_special_port(me, TASK_BOOTSTRAP_PORT)
    calc = _look_up_when_ready(ns, "calc")
    say(f"[client] looked up 'calc': my name for it is {calc}")
    say(f"[client] calc_add(2, 40) = {calc_add(calc, 2, 40)}")
    try:
        calc_div(calc, 1, 0)
    except MachError as e:
        say(f"[client] calc_div(1, 0) failed as it should: {e}")
    say("\n" + format_ps(kernel.ps()) + "\n")
    say(format_lsmp("client", kernel.lsmp("client")) + "\n")
    pymach.msg_send(Message(remote_port=calc, id=CALC_STOP))
    note = pymach.msg_receive(pymach.task_notify(), RCV_TIMEOUT, 30_000)
    assert note.id == NOTIFY_PORT_DELETED
    say(f"[client] notification NOTIFY_PORT_DELETED for name {note.items[0].value!r}: "
        "the calc server's port died with its task")
    try:
        calc_add(calc, 1, 1)
    except MachError as e:
        say(f"[client] calling the dead server fails cleanly: {e.code}")


def _look_up_when_ready(ns: int, name: str, tries: int = 200) -> int:
    nap = pymach.port_allocate(pymach.task_self())  # receiving on it with a timeout = sleep
    for _ in range(tries):
        try:
            port: int = netname_look_up(ns, name)
            return port
        except MachError as e:
            if e.code != "KERN_INVALID_NAME":
                raise
        with contextlib.suppress(MachError):
            pymach.msg_receive(nap, RCV_TIMEOUT, 5)
    raise MachError("KERN_INVALID_NAME", f"{name!r} never checked in")


def run_demo(deterministic: bool = False, seed: int = 0, trace: bool = False,
             out: Callable[[str], Any] = print) -> None:
    """Boot an embedded kernel and run the narrated demo, printing with `out`."""
    with pymach.boot(deterministic=deterministic, seed=seed, trace=trace) as kernel:
        host = pymach.host_self()
        out(f"{pymach.host_kernel_version(host)}")
        page, mem, *_ = pymach.host_info(host)
        out(f"page size {page}, memory {mem >> 20} MiB, deterministic={deterministic}\n")
        _narrate(kernel, out)
        if trace:
            out("\nkernel trace:\n" + "\n".join(kernel.trace_log))
