"""Calls in flight to other hosts, so a host's death fails them instead of leaving their
callers waiting forever.

A netmsgserver forwards a request (a message with a reply port) to the host of its
destination and, later, delivers the reply that host sends to the reply port. If that
host dies between the two, no reply will ever come: the caller's `msg_rpc` would wait
forever. `PendingCalls` remembers each forwarded request's (reply port, request id) by
the host it went to, forgets it when a message for that reply port with the reply's
id (request id + REPLY_ID_OFFSET, as MIG makes it) comes back, and on the host's death
hands back every call still open there, for the server to answer each with a
MIG_SERVER_DIED reply (what a caller gets for a request that could not be delivered).

Bounds: at most MAX_PER_HOST open calls are remembered per host; past it the oldest is
forgotten (its caller then waits as it would have without this table) and counted in
`forgotten`. A reply port that dies is forgotten with all its calls (`port_died`).

State belongs to the netmsgserver's thread (no lock).
"""

from __future__ import annotations

from collections import OrderedDict

from pymach.include.mig import REPLY_ID_OFFSET

MAX_PER_HOST = 16384  # open calls remembered for one destination host

Call = tuple[int, int]  # (our name for the reply port, request message id)


class PendingCalls:
    """Requests forwarded to other hosts and not yet answered (see module docstring)."""

    def __init__(self, max_per_host: int = MAX_PER_HOST) -> None:
        self.max_per_host = max_per_host
        self.by_host: dict[str, OrderedDict[Call, None]] = {}
        self.host_of: dict[Call, str] = {}
        self.by_reply: dict[int, set[int]] = {}  # reply port -> its open request ids
        self.forgotten = 0  # calls dropped from the table by the bound

    def sent(self, host: str, reply: int, request_id: int) -> None:
        """A request with reply port `reply` went to `host`."""
        call = (reply, request_id)
        self._forget(call)
        calls = self.by_host.setdefault(host, OrderedDict())
        if len(calls) >= self.max_per_host:
            self._forget(next(iter(calls)))
            self.forgotten += 1
            calls = self.by_host.setdefault(host, OrderedDict())
        calls[call] = None
        self.host_of[call] = host
        self.by_reply.setdefault(reply, set()).add(request_id)

    def delivered(self, reply: int, msg_id: int) -> None:
        """A message with id `msg_id` is being delivered to local port `reply`: if it is
        the reply to an open call, the call is closed."""
        self._forget((reply, msg_id - REPLY_ID_OFFSET))

    def host_down(self, host: str) -> list[Call]:
        """`host` died: the calls still open there, oldest first (now forgotten)."""
        calls = list(self.by_host.get(host, {}))
        for call in calls:
            self._forget(call)
        return calls

    def port_died(self, reply: int) -> None:
        """Local port `reply` died: nobody waits on its calls any more."""
        for request_id in list(self.by_reply.get(reply, ())):
            self._forget((reply, request_id))

    def __len__(self) -> int:
        return len(self.host_of)

    def _forget(self, call: Call) -> None:
        host = self.host_of.pop(call, None)
        if host is None:
            return
        calls = self.by_host[host]
        del calls[call]
        if not calls:
            del self.by_host[host]
        ids = self.by_reply[call[0]]
        ids.discard(call[1])
        if not ids:
            del self.by_reply[call[0]]
