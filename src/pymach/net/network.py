"""Several embedded hosts in one process, joined by a simulated network.

`Network` is an in-process network and the hosts on it: `host(name)` boots a kernel
with its netmsgserver (net/station.py) attached through a `SimulatedTransport`, this
network's `NetTransport` (net/transport.py). A packet is handed to the destination
host's sink in the sending thread, as a kernel message on its server's wire port (like
a network interface interrupt), so the packets from one host to another arrive in the
order they were sent. Fault injection: `drop` is the probability that a packet is lost
(any packet, netname changes included), `crash(name)` takes a host off the network (its
peers are told it is down) and stops its kernel. Tasks find their host's netmsgserver
through their bootstrap port and use netname to find ports on any host.

    with pymach.Network() as net:
        a, b = net.host("A"), net.host("B")
        server = a.start(serve_it)            # tasks on host A ...
        print(b.start(use_it).wait(10_000))   # ... and host B

Hosts run in real time side by side: a multi-host run is not deterministic even if the
hosts' schedulers are. Shared state here is guarded by `lock` (a leaf lock, never held
while a sink or a kernel is called).
"""

from __future__ import annotations

import random
import threading
from types import TracebackType
from typing import Any

from pymach.errors import MachError
from pymach.net.station import Host
from pymach.net.transport import NetTransport, PacketSink

__all__ = ["Host", "Network", "SimulatedTransport"]


class SimulatedTransport(NetTransport):
    """One host's attachment to a `Network` (contract: net/transport.py)."""

    def __init__(self, network: Network, host: str) -> None:
        self._network = network
        self._host = host

    @property
    def host(self) -> str:
        """The local host's name."""
        return self._host

    def start(self, sink: PacketSink) -> None:
        """Join the network; KERN_NAME_EXISTS if a host of this name is on it."""
        self._network._join(self._host, sink)

    def send(self, dest: str, data: bytes | bytearray) -> bool:
        """Hand `data` to `dest` now (unless fault injection loses it)."""
        return self._network._carry(self._host, dest, bytes(data))

    def close(self) -> None:
        """Leave the network; every other host gets host_down."""
        self._network._leave(self._host)


class Network:
    """Hosts joined by an in-process network (see module docstring)."""

    def __init__(self, drop: float = 0.0, seed: int = 0) -> None:
        self.lock = threading.Lock()  # guards hosts, sinks, counters, the generator
        self.hosts: dict[str, Host] = {}
        self._sinks: dict[str, PacketSink] = {}  # the hosts attached to the medium
        self.packets = 0  # packets accepted for delivery
        self.dropped = 0  # of which fault injection lost
        self.drop = drop  # fault injection: probability that a packet is lost
        self._rng = random.Random(seed)

    def host(self, name: str, **config: Any) -> Host:
        """Boot a new host (keyword configuration as for pymach.boot)."""
        with self.lock:
            if name in self.hosts or name in self._sinks:
                raise MachError("KERN_NAME_EXISTS", f"there is already a host {name!r}")
        h = Host(self.transport(name), config)
        with self.lock:
            self.hosts[name] = h
        return h

    def transport(self, name: str) -> SimulatedTransport:
        """A transport for a host called `name` on this network (not yet started)."""
        return SimulatedTransport(self, name)

    def crash(self, name: str) -> None:
        """Fault injection: host `name` leaves the network at once and its kernel stops."""
        with self.lock:
            h = self.hosts.pop(name, None)
        if h is None:
            raise MachError("KERN_INVALID_NAME", f"there is no host {name!r}")
        h.shutdown()

    # -- the medium (called by SimulatedTransport) ----------------------------------------
    def _join(self, host: str, sink: PacketSink) -> None:
        with self.lock:
            if host in self._sinks:
                raise MachError("KERN_NAME_EXISTS", f"host {host!r} is already on the network")
            others = dict(self._sinks)
            self._sinks[host] = sink
        for peer in others:  # the newcomer first: it knows a peer before hearing from it
            sink.host_up(peer)
        for other in others.values():
            other.host_up(host)

    def _carry(self, source: str, dest: str, data: bytes) -> bool:
        with self.lock:
            sink = self._sinks.get(dest) if source in self._sinks else None
            if sink is None:
                return False
            self.packets += 1
            lost = self.drop > 0 and self._rng.random() < self.drop
            self.dropped += lost
        if not lost:
            sink.packet(source, data)
        return True

    def _leave(self, host: str) -> None:
        with self.lock:
            gone = self._sinks.pop(host, None)
            others = list(self._sinks.values())
        if gone is not None:
            for other in others:
                other.host_down(host)

    # -- lifetime -----------------------------------------------------------------------
    def close(self) -> None:
        """Shut every host down."""
        with self.lock:
            hosts = list(self.hosts.values())
            self.hosts.clear()
            self._sinks.clear()
        for h in hosts:
            h.kernel.shutdown()

    def __enter__(self) -> Network:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
