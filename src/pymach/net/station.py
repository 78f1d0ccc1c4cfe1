"""A host on a network: a booted kernel, its netmsgserver task, and its transport.

`start_netmsgserver(kernel, transport)` gives a booted kernel its netmsgserver task
(net/netmsgserver.py) with its service port (the bootstrap port every task created
afterwards inherits) and its wire port, and starts the transport with a `WirePortSink`.
The sink is the host's network interface: each transport event becomes a kernel message
queued on the wire port, like an interrupt, whatever thread the transport calls from.
`Host(transport, config)` boots an embedded kernel named after `transport.host` and
does that; machd does it on its own kernel (machd/machd.py). The same server runs over
any `NetTransport` (net/transport.py): the in-process network (net/network.py), TCP
(net/tcp.py) or another.

Invariants: the wire port has no send right outside the kernel, so everything on it
comes from the sink; the sink never blocks on the server (it queues under the kernel's
scheduler lock and returns) and drops events once the wire port is dead. The sink's
backlog is the bytes of packets it queued that the server has not taken yet.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pymach.errors import MachError
from pymach.include.message import Bytes, Code, Str
from pymach.include.wire import WireError
from pymach.ipc import mach_port
from pymach.ipc.ipc_mqueue import mqueue_enqueue
from pymach.ipc.kmsg import KItem, KMsg
from pymach.ipc.port import Port
from pymach.kern.host import ExternalHandle, Kernel
from pymach.net.migration import MigrationServer, NewTask
from pymach.net.netmsgserver import HOST_DOWN_ID, HOST_UP_ID, PACKET_ID, NetMsgServer
from pymach.net.packets import check_host
from pymach.net.transport import NetTransport, PacketSink


class WirePortSink(PacketSink):
    """Transport events as kernel messages on a netmsgserver's wire port."""

    def __init__(self, kernel: Kernel, wire: Port, server: NetMsgServer) -> None:
        self.kernel = kernel
        self.wire = wire
        self.server = server  # counts the packet bytes it takes (bytes_in)
        self.posted = 0  # packet bytes ever queued on the wire port (kernel lock)

    def packet(self, source: str, data: bytes) -> None:
        """Queue [Str source, Bytes data] as PACKET_ID."""
        self._post(PACKET_ID, [Str(source), Bytes(bytes(data))], len(data))

    def backlog(self) -> int:
        """Packet bytes queued on the wire port that the server has not taken yet (read
        without the lock: an estimate, enough for flow control)."""
        return max(0, self.posted - self.server.bytes_in)

    def host_up(self, host: str) -> None:
        """Queue [Str host] as HOST_UP_ID."""
        self._post(HOST_UP_ID, [Str(host)])

    def host_down(self, host: str) -> None:
        """Queue [Str host] as HOST_DOWN_ID."""
        self._post(HOST_DOWN_ID, [Str(host)])

    def _post(self, msg_id: int, items: list[KItem], size: int = 0) -> None:
        with self.kernel.sched.lock:
            if not self.wire.dead:
                mqueue_enqueue(self.wire, KMsg(self.wire, None, msg_id, items,
                                               sender="network"))
                self.posted += size


def start_netmsgserver(kernel: Kernel, transport: NetTransport) -> tuple[NetMsgServer, Port]:
    """Give the booted `kernel` its netmsgserver, reached through `transport`: the server
    task's service port becomes the bootstrap task's bootstrap port (so every task made
    afterwards finds the network's name service there), then the transport starts, its
    events queued on the wire port. Returns (the server, its wire port)."""
    server = NetMsgServer(transport)
    with kernel.sched.lock:
        task = kernel.task_create_locked(None, False, "netmsgserver")
        task.unthrottled = True  # deliveries keep each host's order (netmsgserver.py)
        service = mach_port.port_allocate(task.space, f"netmsgserver:{transport.host}")
        wire_name = mach_port.port_allocate(task.space, f"wire:{transport.host}")
        boot_task = next(t for t in kernel.tasks.values() if t.name == "bootstrap")
        boot_task.set_bootstrap(task.space.names[service].port)  # children inherit it
        thread = kernel.thread_create_locked(task, Code(server.run, (service, wire_name)),
                                             "netmsgserver.1", start=False)
        thread.daemon = True
        thread.start()
        wire = task.space.names[wire_name].port
    transport.start(WirePortSink(kernel, wire, server))
    return server, wire


def start_migration_server(kernel: Kernel, server: NetMsgServer,
                           new_task: NewTask) -> MigrationServer:
    """Give the booted `kernel`, whose netmsgserver is `server`, a migration server
    (net/migration.py) that makes arriving tasks with `new_task`: a task of the kernel
    side, a child of the bootstrap task; `server` holds the only send right to its port
    (the port is never checked in)."""
    migration = MigrationServer(new_task)
    with kernel.sched.lock:
        boot = next(t for t in kernel.tasks.values() if t.name == "bootstrap")
        task = kernel.task_create_locked(boot, False, "migration")
        port = mach_port.port_allocate(task.space, f"migration:{kernel.name}")
        net_task = next(t for t in kernel.tasks.values() if t.name == "netmsgserver")
        server.migration = net_task.space.insert(task.space.names[port].port, send=True)
        thread = kernel.thread_create_locked(task, Code(migration.run, (port,)),
                                             "migration.1", start=False)
        thread.daemon = True
        thread.start()
    return migration


class Host:
    """One booted kernel on a network, with its netmsgserver (see module docstring)."""

    def __init__(self, transport: NetTransport, config: dict[str, Any] | None = None) -> None:
        try:
            self.name = check_host(transport.host)
        except WireError as e:
            raise MachError("KERN_INVALID_ARGUMENT", e.detail) from None
        self.transport = transport
        self.kernel = Kernel(name=self.name, **(config or {}))
        self.kernel.boot_headless()
        try:
            self.server, self.wire = start_netmsgserver(self.kernel, transport)
        except BaseException:  # the transport could not start (an address in use)
            self.kernel.shutdown()
            raise

    def start(self, fn: Callable[..., Any], *args: Any, name: str = "",
              **kwargs: Any) -> ExternalHandle:
        """Run `fn` as a new task on this host; `.wait(timeout_ms)` for its result."""
        return self.kernel.start_task(fn, *args, name=name, **kwargs)

    def shutdown(self) -> None:
        """Leave the network (peers see the host go down), then stop the kernel."""
        self.transport.close()
        self.kernel.shutdown()
