"""A host on a network: a booted kernel, its netmsgserver task, and its transport.

`Host(transport, config)` boots an embedded kernel named after `transport.host`, creates
the netmsgserver task (net/netmsgserver.py) with its service port (every task's
bootstrap port on the host) and its wire port, and starts the transport with a
`WirePortSink`. The sink is the host's network interface: each transport event becomes
a kernel message queued on the wire port, like an interrupt, whatever thread the
transport calls from. The same Host runs over any `NetTransport` (net/transport.py):
the in-process network (net/network.py) or another.

Invariants: the wire port has no send right outside the kernel, so everything on it
comes from the sink; the sink never blocks on the server (it queues under the kernel's
scheduler lock and returns) and drops events once the wire port is dead.
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
from pymach.net.netmsgserver import HOST_DOWN_ID, HOST_UP_ID, PACKET_ID, NetMsgServer
from pymach.net.packets import check_host
from pymach.net.transport import NetTransport, PacketSink


class WirePortSink(PacketSink):
    """Transport events as kernel messages on a netmsgserver's wire port."""

    def __init__(self, kernel: Kernel, wire: Port) -> None:
        self.kernel = kernel
        self.wire = wire

    def packet(self, source: str, data: bytes) -> None:
        """Queue [Str source, Bytes data] as PACKET_ID."""
        self._post(PACKET_ID, [Str(source), Bytes(bytes(data))])

    def host_up(self, host: str) -> None:
        """Queue [Str host] as HOST_UP_ID."""
        self._post(HOST_UP_ID, [Str(host)])

    def host_down(self, host: str) -> None:
        """Queue [Str host] as HOST_DOWN_ID."""
        self._post(HOST_DOWN_ID, [Str(host)])

    def _post(self, msg_id: int, items: list[KItem]) -> None:
        with self.kernel.sched.lock:
            if not self.wire.dead:
                mqueue_enqueue(self.wire, KMsg(self.wire, None, msg_id, items,
                                               sender="network"))


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
        self.server = NetMsgServer(transport)
        self.wire: Port = self._start_server()
        transport.start(WirePortSink(self.kernel, self.wire))

    def _start_server(self) -> Port:
        """Create the netmsgserver task with its service and wire ports (kernel side)."""
        k = self.kernel
        with k.sched.lock:
            task = k.task_create_locked(None, False, "netmsgserver")
            task.unthrottled = True  # deliveries keep each host's order (netmsgserver.py)
            service = mach_port.port_allocate(task.space, f"netmsgserver:{self.name}")
            wire = mach_port.port_allocate(task.space, f"wire:{self.name}")
            boot_task = next(t for t in k.tasks.values() if t.name == "bootstrap")
            boot_task.set_bootstrap(task.space.names[service].port)  # children inherit it
            thread = k.thread_create_locked(task, Code(self.server.run, (service, wire)),
                                            "netmsgserver.1", start=False)
            thread.daemon = True
            thread.start()
            return task.space.names[wire].port

    def start(self, fn: Callable[..., Any], *args: Any, name: str = "",
              **kwargs: Any) -> ExternalHandle:
        """Run `fn` as a new task on this host; `.wait(seconds)` for its result."""
        return self.kernel.start_task(fn, *args, name=name, **kwargs)

    def shutdown(self) -> None:
        """Leave the network (peers see the host go down), then stop the kernel."""
        self.transport.close()
        self.kernel.shutdown()
