"""`pymach demo net`: ports that span hosts (paper 3.2), narrated, on an in-process network.

Three hosts, A, B and C, each a kernel with its netmsgserver, joined by the in-process
`Network` (the same netmsgserver code runs over TCP between machd hosts: README,
"Network over TCP"). The demo shows:

1. a remote procedure call: the calc server on A checks its port in with the network's
   name service; a client on B looks it up and calls it, and `lsmp` on B shows the
   port living on host A;
2. a receive right moving: a counter server on A answers two calls from a client on
   C, then sends its receive right to a task on B and ends; the client goes on calling
   the same name, and B answers (the port moved, with the messages queued on it);
3. a host dying: a client on C calls a server on B that never answers; B crashes; the
   client's call fails with MIG_SERVER_DIED and it is told its send right died
   (NOTIFY_PORT_DELETED), instead of waiting forever.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pymach
from pymach import (
    MOVE_ALL,
    NOTIFY_PORT_DELETED,
    RCV_TIMEOUT,
    TASK_BOOTSTRAP_PORT,
    MachError,
    Message,
    Port,
    Str,
)
from pymach.cli.demo import CALC_STOP, calc_add, calc_server
from pymach.kern.report import format_lsmp
from pymach.net.netname import netname_check_in, netname_wait
from pymach.net.network import Network

WAIT_MS = 20_000
Say = Callable[[str], Any]


def _caller(say: Say, called: threading.Event, shown: threading.Event) -> int:
    """On B: look up 'calc' on the network, call it, then stop it once the narrator has
    shown this task's ports."""
    port: int = netname_wait("calc", WAIT_MS)
    say(f"[client on B] looked up 'calc': port {port} here, a proxy for A's port")
    total = calc_add(port, 20, 22)
    say(f"[client on B] calc_add(20, 22) on host A = {total}")
    called.set()
    shown.wait(WAIT_MS / 1000)
    pymach.msg_send(Message(remote_port=port, id=CALC_STOP))
    return port


def _silent_server(ready: threading.Event) -> None:
    """On B: check in 'slow', receive one request and never answer it."""
    me = pymach.task_self()
    svc = pymach.port_allocate(me)
    netname_check_in(pymach.task_get_special_port(me, TASK_BOOTSTRAP_PORT), "slow", svc)
    pymach.msg_receive(svc)
    ready.set()
    threading.Event().wait()  # until its host dies


def _waiting_caller(say: Say) -> str:
    """On C: call 'slow' on B; the call fails when B dies, and the right is dead."""
    port = netname_wait("slow", WAIT_MS)
    say(f"[client on C] calling 'slow' on host B (port {port} here) ...")
    try:
        calc_add(port, 1, 2)
        return "answered"
    except MachError as e:
        say(f"[client on C] the call failed: {e.code} ({e.detail})")
        note = pymach.msg_receive(pymach.task_notify(), RCV_TIMEOUT, WAIT_MS)
        if note.id == NOTIFY_PORT_DELETED:
            say(f"[client on C] NOTIFY_PORT_DELETED for port {note.values()[0]}")
        return e.code


def _rpc_scene(a: Any, b: Any, say: Say) -> None:
    say("-- 1. a remote procedure call: the calc server on A, a client on B --")
    server = a.start(calc_server, lambda line: say(line.replace("[server]",
                                                                "[server on A]")), name="calc")
    called, shown = threading.Event(), threading.Event()
    client = b.start(_caller, say, called, shown, name="client")
    if not called.wait(WAIT_MS / 1000):
        raise TimeoutError("the client on B did not complete its call")
    say("lsmp of the client's task on B (its port for 'calc' lives on host A):")
    say(format_lsmp("client", b.kernel.lsmp("client")))
    shown.set()
    port = client.wait(WAIT_MS)
    say(f"[server on A] served {server.wait(WAIT_MS)} call; the client named it {port}")


COUNT_ID = 300  # a call of the counter: its reply (id + 100) names the host answering


def _answer(svc: int, host: str, calls: int, say: Say) -> None:
    for _ in range(calls):
        msg = pymach.msg_receive(svc)
        pymach.msg_send(Message(remote_port=msg.remote_port, id=COUNT_ID + 100,
                                items=[Str(host)]))
        say(f"[counter on {host}] answered a call")


def _counter_on_a(say: Say) -> None:
    """On A: answer two calls, then send the receive right to 'home' on B and end."""
    me = pymach.task_self()
    svc = pymach.port_allocate(me)
    netname_check_in(pymach.task_get_special_port(me, TASK_BOOTSTRAP_PORT), "counter", svc)
    _answer(svc, "A", 2, say)
    home = netname_wait("home", WAIT_MS)
    pymach.msg_send(Message(remote_port=home, items=[Port(svc, MOVE_ALL)]))
    say("[counter on A] sent its receive right to host B; ending")


def _home_on_b(say: Say) -> None:
    """On B: receive the counter's receive right, then answer two calls on it."""
    me = pymach.task_self()
    home = pymach.port_allocate(me)
    netname_check_in(pymach.task_get_special_port(me, TASK_BOOTSTRAP_PORT), "home", home)
    right = pymach.msg_receive(home, RCV_TIMEOUT, WAIT_MS).items[0]
    if not isinstance(right, Port):
        raise MachError("KERN_FAILURE", f"home expected a receive right, not {right!r}")
    say(f"[home on B] got the receive right (port {right.name} here)")
    _answer(right.name, "B", 2, say)


def _counting_client(say: Say) -> list[str]:
    """On C: call 'counter' four times through the same name."""
    port = netname_wait("counter", WAIT_MS)
    hosts = []
    for i in range(4):
        reply = pymach.msg_rpc(Message(remote_port=port, local_port=pymach.thread_reply(),
                                       id=COUNT_ID), RCV_TIMEOUT, receive_timeout=WAIT_MS)
        hosts.append(reply.values()[0])
        say(f"[client on C] call {i + 1} through port {port}: answered on host {hosts[-1]}")
    return hosts


def _move_scene(a: Any, b: Any, c: Any, say: Say) -> None:
    say("\n-- 2. a receive right moving: the counter's port goes from A to B --")
    b.start(_home_on_b, say, name="home")
    a.start(_counter_on_a, say, name="counter")
    hosts = c.start(_counting_client, say, name="client").wait(WAIT_MS)
    say(f"[client on C] the four calls were answered on {', '.join(hosts)}: one name "
        "throughout")


def _death_scene(net: Network, b: Any, c: Any, say: Say) -> None:
    say("\n-- 3. a host dying: a client on C waits on a call to a server on B --")
    ready = threading.Event()
    b.start(_silent_server, ready, name="slow")
    caller = c.start(_waiting_caller, say, name="waiter")
    if not ready.wait(WAIT_MS / 1000):
        raise TimeoutError("the server on B did not get the request")
    say("[network] host B crashes")
    net.crash("B")
    say(f"[client on C] ended with {caller.wait(WAIT_MS)}")


def run_net_demo(deterministic: bool = False, seed: int = 0, trace: bool = False,
                 out: Callable[[str], Any] = print) -> None:
    """Run the narrated network demo (the network's hosts use the free scheduler)."""
    lock = threading.Lock()

    def say(line: str) -> None:
        with lock:
            out(line)

    with Network() as net:
        a, b, c = net.host("A", trace=trace), net.host("B"), net.host("C")
        _rpc_scene(a, b, say)
        _move_scene(a, b, c, say)
        _death_scene(net, b, c, say)
