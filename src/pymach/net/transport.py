"""The network transport: the one seam between a netmsgserver and the wire (DESIGN, Layout).

A netmsgserver asks its transport for one thing, "deliver these bytes to that host", and
learns from it three things: a packet arrived (and from which host), a host became
reachable, a host is gone. Everything else (what the bytes mean, ports, names) is the
server's business (net/packets.py, net/netmsgserver.py). Implementations: the in-process
simulated network (net/network.py) and TCP with mutual TLS (net/tcp.py).

A `NetTransport` is one host's attachment to a network. Its contract:

- `host` is the local host's name, fixed for the transport's life; hosts are named by
  non-empty strings unique on the network.
- `start(sink)` is called once; from then on every event goes to `sink`, from any
  thread (a transport's own threads, or the thread of another host's `send` in the
  in-process network), so a sink only queues work and returns (net/station.py), unless
  the transport has `own_thread` (below).
- `send(dest, data)` is best effort, non-blocking in the sense that it never waits for
  the receiver to process the packet. Packets from one host to another arrive whole, at
  most once, and in the order they were sent (per pair of hosts; one sending thread's
  order is the order), across any reconnection the transport makes underneath (TCP: a
  reset connection is dialed again and the packets the peer missed are sent again,
  net/tcp.py). It returns False when the transport knows the packet cannot be
  delivered (no such host, the host is down, the transport is closed); True means the
  packet was accepted, which a lossy network may still lose.
- The sink gets `host_up(peer)` for every peer present at `start` and for each that
  joins later, before any packet from that peer; it gets `host_down(peer)` when `peer`
  is unreachable for good: it left, it restarted (a new incarnation), it broke the
  protocol, or it was not heard from within the transport's bound (TCP:
  `peer_timeout`). A transient drop that the transport repairs within the bound is not
  reported. Over TCP nothing is lost between `host_up` and `host_down` (the in-process
  network's fault injection may lose packets any time); after `host_down`, packets to
  that peer that had not arrived are lost; a peer that comes back gets `host_up` again.
- `packet(source, data)`: `source` is the sending host as the transport knows it (the
  address it connected from, its authenticated name), never a claim read from `data`.
- `close()` leaves the network (peers get `host_down(host)`); it is idempotent, and
  `send` returns False afterwards.
- `disconnect(peer, why)`: the host found that `peer` sent something no correct host
  sends; a transport with connections ends everything it shares with that peer (the
  sink gets `host_down`; the peer may come back, as new), one without (the in-process
  network) may ignore it.
- A sink's `backlog()` is how many bytes of packets it was handed and its host has not
  yet taken; a transport that reads from peers stops reading while that is high, so a
  peer cannot make the host hold more than a bounded amount.
- `own_thread`: True for a transport that calls its sink only from one thread of its
  own, which holds no lock of its host and does nothing the host waits for. Its sink
  may then act on each event before returning, on that thread, instead of only
  queueing it (the transport's reading simply waits meanwhile); and the host may give
  that thread other work with `call_soon(fn, *args)`: run `fn(*args)` there soon, in
  the order asked, callable from any thread without ever blocking (even with a kernel
  lock held); False if the transport has stopped. net/station.py has the host's
  server run on that thread, so a packet reaches its port without waking another
  thread of the host.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from pymach.errors import MachError


class PacketSink(ABC):
    """What a transport tells its host. Methods return promptly (they queue work, or,
    for a transport with `own_thread`, may do it on that thread)."""

    @abstractmethod
    def packet(self, source: str, data: bytes | memoryview) -> None:
        """Bytes `data` arrived from host `source` (named by the transport; a large packet
        may come as a read-only view, valid for as long as it is referenced)."""

    @abstractmethod
    def host_up(self, host: str) -> None:
        """Host `host` can now be reached (also for each host present at start)."""

    @abstractmethod
    def host_down(self, host: str) -> None:
        """Host `host` can no longer be reached; packets in flight to it may be lost."""

    def backlog(self) -> int:
        """Bytes of packets handed over and not yet taken by the host (0: not counted)."""
        return 0


class NetTransport(ABC):
    """One host's attachment to a network (see module docstring for the contract)."""

    own_thread = False  # the sink is called only from one thread of the transport's own

    @property
    @abstractmethod
    def host(self) -> str:
        """The local host's name on this network."""

    @abstractmethod
    def start(self, sink: PacketSink) -> None:
        """Join the network and send every event to `sink` from now on (called once)."""

    @abstractmethod
    def send(self, dest: str, data: bytes | bytearray) -> bool:
        """Carry `data` to host `dest` in order (the caller does not change it after);
        False if it surely cannot be delivered."""

    @abstractmethod
    def close(self) -> None:
        """Leave the network (peers get host_down); idempotent."""

    def call_soon(self, fn: Callable[..., None], *args: Any) -> bool:
        """(A transport with `own_thread`) run `fn(*args)` on its thread soon; False if
        it has stopped. This default, for a transport without a thread: KERN_FAILURE."""
        raise MachError("KERN_FAILURE", f"{type(self).__name__} has no thread of its own")

    def disconnect(self, host: str, why: str) -> None:
        """Drop the connection to `host`, which misbehaved (`why`); this default, for a
        transport without connections, does nothing."""
        return
