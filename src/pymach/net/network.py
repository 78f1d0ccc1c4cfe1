"""Several embedded hosts in one process, joined by a simulated network.

`Network` boots kernels ("hosts"), each with its own scheduler, physical memory, default
pager and a netmsgserver task (net/netmsgserver.py). Packets between the servers go
through `send`, which hands them to the destination host as a kernel message on its
server's wire port (like a network interface interrupt), after optional fault
injection. Tasks find their host's netmsgserver through their bootstrap port and use
netname to find ports on any host.

    with pymach.Network() as net:
        a, b = net.host("A"), net.host("B")
        server = a.start(serve_it)            # tasks on host A ...
        print(b.start(use_it).wait(10))       # ... and host B

Hosts run in real time side by side: a multi-host run is not deterministic even if the
hosts' schedulers are. Shared state here is guarded by `lock` (a leaf lock, never held
across a Mach call).
"""

from __future__ import annotations

import pickle
import random
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

from pymach.errors import MachError
from pymach.include.message import Bytes
from pymach.ipc.ipc_mqueue import mqueue_enqueue
from pymach.ipc.kmsg import KMsg
from pymach.ipc.port import Port
from pymach.kern.host import ExternalHandle, Kernel
from pymach.net.netmsgserver import PACKET_ID, NetMsgServer, Ref


class Host:
    """One booted kernel of a network, with its netmsgserver."""

    def __init__(self, network: Network, name: str, config: dict[str, Any]) -> None:
        self.name = name
        self.kernel = Kernel(name=name, **config)
        self.kernel.boot_headless()
        self.server = NetMsgServer(network, name)
        self.wire: Port = self._start_server()

    def _start_server(self) -> Port:
        """Create the netmsgserver task with its service and wire ports (kernel side)."""
        from pymach.include.message import Code
        from pymach.ipc import mach_port

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

    def deliver(self, packet: bytes) -> None:
        """Hand a packet to this host's netmsgserver (from any thread)."""
        with self.kernel.sched.lock:
            if not self.wire.dead:
                mqueue_enqueue(self.wire, KMsg(self.wire, None, PACKET_ID, [Bytes(packet)],
                                               sender="network"))


class Network:
    """Hosts joined by an in-process network (see module docstring)."""

    def __init__(self, drop: float = 0.0, seed: int = 0) -> None:
        self.lock = threading.Lock()  # guards hosts, names, counters
        self.hosts: dict[str, Host] = {}
        self.names: dict[str, Ref] = {}  # the netname registry of the whole network
        self.packets = 0
        self.dropped = 0
        self.drop = drop  # fault injection: probability that a packet is lost
        self._rng = random.Random(seed)

    def host(self, name: str, **config: Any) -> Host:
        """Boot a new host (keyword configuration as for pymach.boot)."""
        with self.lock:
            if name in self.hosts:
                raise MachError("KERN_NAME_EXISTS", f"there is already a host {name!r}")
        h = Host(self, name, config)
        with self.lock:
            self.hosts[name] = h
        return h

    def send(self, host: str, packet: dict[str, Any]) -> None:
        """Carry one packet to a host (possibly losing it, see `drop`)."""
        data = pickle.dumps(packet)
        with self.lock:
            dest = self.hosts.get(host)
            self.packets += 1
            lost = self.drop > 0 and self._rng.random() < self.drop
            self.dropped += lost
        if dest is not None and not lost:
            dest.deliver(data)

    def broadcast(self, sender: str, packet: dict[str, Any]) -> None:
        """Send a packet to every host but `sender`."""
        with self.lock:
            others = [h for h in self.hosts if h != sender]
        for h in others:
            self.send(h, packet)

    # -- the shared netname registry ----------------------------------------------------
    def register(self, name: str, ref: Ref) -> None:
        """netname_check_in: `name` now stands for the port `ref`."""
        with self.lock:
            self.names[name] = ref

    def look_up(self, name: str) -> Ref | None:
        """The port registered as `name`, if any."""
        with self.lock:
            return self.names.get(name)

    def check_out(self, name: str) -> bool:
        """Remove a registration; False if there was none."""
        with self.lock:
            return self.names.pop(name, None) is not None

    def unregister(self, ref: Ref) -> None:
        """A registered port died: drop its names."""
        with self.lock:
            for n in [n for n, r in self.names.items() if r == ref]:
                del self.names[n]

    # -- lifetime -----------------------------------------------------------------------
    def close(self) -> None:
        """Shut every host down."""
        with self.lock:
            hosts = list(self.hosts.values())
            self.hosts.clear()
        for h in hosts:
            h.kernel.shutdown()

    def __enter__(self) -> Network:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
