"""The name service of Mach's network message server (netname), local part.

A user-level server, written with our MIG like any other (the interface is in
include/netname_defs.py; its client stubs are here): tasks register a send right
under a name (`netname_check_in`) and look names up (`netname_look_up`). Tasks find the
name server through their bootstrap port, which children inherit. When a registered
port dies the entry disappears (the server gets NOTIFY_PORT_DELETED for its name).

`run_name_server(ns_name)` serves requests on port `ns_name` until it receives
`NETNAME_SHUTDOWN` or the port dies.
"""

from __future__ import annotations

import contextlib

from pymach.errors import MachError
from pymach.include.mach_defs import TASK_BOOTSTRAP_PORT
from pymach.include.message import RCV_TIMEOUT
from pymach.include.mig import serve_message
from pymach.include.netname_defs import netname_defs
from pymach.ipc.ipc_notify import NOTIFY_OVERFLOW, NOTIFY_PORT_DELETED
from pymach.mach import (
    msg_receive,
    msg_send,
    names_gone,
    port_allocate,
    port_deallocate,
    port_enable,
    task_get_special_port,
    task_notify,
    task_self,
)

NETNAME_SHUTDOWN = 1099

netname_check_in = netname_defs.stub("netname_check_in")
netname_look_up = netname_defs.stub("netname_look_up")
netname_check_out = netname_defs.stub("netname_check_out")


class NameServer:
    """The server's state: name -> the server's name for a send right."""

    def __init__(self) -> None:
        self.names: dict[str, int] = {}

    def netname_check_in(self, _server: int, name: str, port: int) -> None:
        if not name:
            raise MachError("KERN_INVALID_ARGUMENT", "netname_check_in needs a non-empty name")
        if not port:
            raise MachError("KERN_INVALID_ARGUMENT", f"no live port given for {name!r}")
        self.names[name] = port

    def netname_look_up(self, _server: int, name: str) -> int:
        port = self.names.get(name)
        if port is None:
            raise MachError("KERN_INVALID_NAME", f"no port is checked in as {name!r}")
        return port

    def netname_check_out(self, _server: int, name: str) -> None:
        port = self.names.pop(name, None)
        if port is None:
            raise MachError("KERN_INVALID_NAME", f"no port is checked in as {name!r}")
        if port not in self.names.values():
            port_deallocate(task_self(), port)

    def forget(self, dead_name: int) -> None:
        """A registered port died: drop every name registered for it."""
        for name in [n for n, p in self.names.items() if p == dead_name]:
            del self.names[name]


def netname_wait(name: str, timeout_ms: float = 10_000) -> int:
    """Look `name` up on the caller's bootstrap port (the name server), retrying every
    5 ms of Mach time until it is checked in; KERN_INVALID_NAME after `timeout_ms`."""
    me = task_self()
    boot = task_get_special_port(me, TASK_BOOTSTRAP_PORT)
    nap = port_allocate(me)
    try:
        for _ in range(max(1, int(timeout_ms // 5))):
            with contextlib.suppress(MachError):
                port: int = netname_look_up(boot, name)
                return port
            with contextlib.suppress(MachError):
                msg_receive(nap, RCV_TIMEOUT, 5)
    finally:
        port_deallocate(me, nap)
    raise MachError("KERN_INVALID_NAME", f"{name!r} was not checked in within {timeout_ms} ms")


def run_name_server(ns_name: int) -> NameServer:
    """Serve netname requests on port `ns_name` (and notifications) until shut down."""
    state = NameServer()
    port_enable(task_self(), ns_name)
    port_enable(task_self(), task_notify())
    while True:
        msg = msg_receive()
        if msg.id == NETNAME_SHUTDOWN:
            return state
        if msg.id == NOTIFY_PORT_DELETED:
            state.forget(int(msg.items[0].value))  # type: ignore[arg-type]
            continue
        if msg.id == NOTIFY_OVERFLOW:  # deaths went unheard: find them by looking
            for name in names_gone(set(state.names.values())):
                state.forget(name)
            continue
        reply = serve_message(netname_defs, state, msg)
        if reply is not None:
            with contextlib.suppress(MachError):  # a client that died gets no reply
                msg_send(reply)
