"""How many messages a proxy may have on their way to its port: a window per proxy.

A port's backlog holds senders on other hosts through CHOKE (net/netmsgserver.py), but a
CHOKE comes back only after the port's host has taken a packet from the wire, and the
messages sent meanwhile are already on their way: a host busy with other work, or one
that relays packets for a port that moved, could find thousands queued behind the CHOKE,
more than the port may take from the network (NET_QUEUE_MAX), and those would be lost.
So a proxy may have at most WINDOW messages on their way (sent, and not yet taken by the
host the proxy sends to); past that its server holds the proxy, and its senders wait on
the proxy's backlog as they would at the port.

Taking is acknowledged in batches: every ASK_EVERY-th message a proxy sends asks for an
ACK [token, count] (`count`: the messages sent since the last ask, this one included),
which the receiving host returns once it has taken that packet; per-link order means
every earlier one was taken too. A host that relays a packet for a port that moved
passes the ask on under a token of its own and returns the ACK when it gets one
(`RelayAcks`), so the window spans the whole path. A proxy whose route changes (a flush
finished: everything it sent is at the port) starts a new window under a new token; an
ACK for an old token is ignored. The token is random (an ACK is believed only from the
host the proxy sends to, and only for its own tokens).

Invariants: 0 <= unacked; a proxy is `full` iff unacked >= WINDOW; tokens are unique
and each names one proxy's current window. State is the netmsgserver's, under its
`lock` (forwarding threads count the messages they send).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from pymach.net.packets import new_net_id

WINDOW = 64  # messages a proxy may have on their way (the most a port gets beyond CHOKE)
ASK_EVERY = WINDOW // 4  # one ACK for this many messages: a quarter of the window
MAX_RELAY_ACKS = 4096  # asks passed on and not yet answered (then the relay answers)
MAX_RELAY_ACKS_PER_HOST = 1024  # of those, from one host or to one host


@dataclass
class _Window:
    token: bytes  # names this window in ASK and ACK
    unacked: int = 0  # sent, not yet acknowledged
    unasked: int = 0  # sent since the last ask


class ProxyWindows:
    """The windows of one server's proxies (see module docstring)."""

    def __init__(self) -> None:
        self._by_proxy: dict[int, _Window] = {}
        self._by_token: dict[bytes, int] = {}

    def sent(self, proxy: int) -> tuple[bytes | None, int]:
        """Count a message `proxy` sends: (token, count) to ask an ACK for in its packet,
        or (None, 0)."""
        window = self._by_proxy.get(proxy)
        if window is None:
            window = self._by_proxy[proxy] = _Window(new_net_id())
            self._by_token[window.token] = proxy
        window.unacked += 1
        window.unasked += 1
        if window.unasked < ASK_EVERY:
            return None, 0
        count, window.unasked = window.unasked, 0
        return window.token, count

    def full(self, proxy: int, waiting: int = 0) -> bool:
        """True if `proxy` has WINDOW messages on their way, counting `waiting` more
        about to go: hold it."""
        window = self._by_proxy.get(proxy)
        return (window.unacked if window is not None else 0) + waiting >= WINDOW

    def proxy_of(self, token: bytes) -> int:
        """The proxy whose current window `token` names (0: an old or unknown token)."""
        return self._by_token.get(token, 0)

    def acked(self, proxy: int, count: int) -> None:
        """An ACK for `count` messages of `proxy`'s current window arrived."""
        window = self._by_proxy[proxy]
        window.unacked = max(0, window.unacked - count)

    def restart(self, proxy: int) -> None:
        """Everything `proxy` sent has arrived (its route was flushed), or it is gone: its
        next message opens a new window."""
        window = self._by_proxy.pop(proxy, None)
        if window is not None:
            del self._by_token[window.token]


class RelayAcks:
    """ACKs a relaying host owes: its token for a relayed ask -> (the host that asked,
    its token, the count, the host the packet went on to). Bounded: at most
    MAX_RELAY_ACKS_PER_HOST asks open from one host or to one host, and MAX_RELAY_ACKS
    in all; past a bound the relay answers a new ask itself at once (`pass_on` returns
    None), so a host that asks and never answers uses up only its own share (the window
    is then off for its own traffic through this relay). The netmsgserver loop's own
    state."""

    def __init__(self) -> None:
        self._open: dict[bytes, tuple[str, bytes, int, str]] = {}
        self._per_host: Counter[tuple[str, str]] = Counter()  # ("from"|"to", host) -> open

    def __len__(self) -> int:
        return len(self._open)

    def pass_on(self, source: str, token: bytes, count: int, dest: str) -> bytes | None:
        """The token to ask `dest` with for `source`'s ask `token` (None: answer it now)."""
        per_host = self._per_host
        if len(self._open) >= MAX_RELAY_ACKS or per_host["from", source] >= \
                MAX_RELAY_ACKS_PER_HOST or per_host["to", dest] >= MAX_RELAY_ACKS_PER_HOST:
            return None
        mine = new_net_id()
        self._open[mine] = (source, token, count, dest)
        per_host["from", source] += 1
        per_host["to", dest] += 1
        return mine

    def cancel(self, mine: bytes) -> None:
        """The packet that asked `mine` could not be passed on: no ACK will come."""
        if mine in self._open:
            self._close(mine)

    def answered(self, source: str, token: bytes) -> tuple[str, bytes, int] | None:
        """`source` answered our ask `token`: (the host to answer, its token, the count),
        or None if we asked no such thing of `source`."""
        entry = self._open.get(token)
        if entry is None or entry[3] != source:
            return None
        self._close(token)
        return entry[:3]

    def host_gone(self, host: str) -> list[tuple[str, bytes, int]]:
        """`host` is down: asks it made are forgotten; asks passed on to it will not be
        answered, so (host, token, count) to answer for each now (the packets are lost
        with the host; the proxies that sent them find out from their own route)."""
        owed = [(s, t, c) for s, t, c, d in self._open.values() if d == host and s != host]
        for mine in [k for k, (s, _, _, d) in self._open.items() if host in (s, d)]:
            self._close(mine)
        return owed

    def _close(self, mine: bytes) -> None:
        source, _, _, dest = self._open.pop(mine)
        for key in (("from", source), ("to", dest)):
            self._per_host[key] -= 1
            if not self._per_host[key]:
                del self._per_host[key]
