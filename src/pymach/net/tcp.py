"""TCP between hosts: a `NetTransport` (net/transport.py) over mutual TLS.

One host's attachment to a cluster of machines. The netmsgserver runs over it exactly as
over the in-process network; this module only carries bytes between authenticated
hosts, in order, and says when a host comes and goes.

- **One event loop.** An asyncio loop in a thread of its own carries every connection.
  `send` (from the server's thread) queues the packet on the peer's link and wakes the
  loop; the loop hands what arrives to the sink, which only queues it (net/station.py).
- **Who is a host.** Every connection is TLS 1.3 with certificates both ways, checked
  against the cluster's CA (net/cluster.py). A peer's host name is the name its
  certificate carries, never a claim it sends; a peer that presents our own name, or a
  certificate the CA did not sign, is refused and logged.
- **One link per pair of hosts.** After TLS the dialer sends HELLO [version, its
  incarnation]; the acceptor answers WELCOME [its incarnation] or BUSY [why]. A link
  carries packets only once welcomed, and there is at most one per peer, so what one host
  sends another arrives whole, once, in order. The acceptor decides: BUSY if it already
  has a link to that peer of the same incarnation, or if it is dialing that peer itself
  and its name sorts first (crossing dials: both sides agree which one wins); a HELLO
  of a new incarnation replaces the old link (the peer restarted: host_down, then
  host_up). A dialer that is refused tries again after a backoff.
- **Frames.** The wire header of include/wire.py (magic, version, op, length, no
  descriptors) with this protocol's ops: HELLO, WELCOME and BUSY bodies are typed wire
  values, checked; a PACKET body is a packet of net/packets.py (the server decodes it);
  PING is empty. A bad header, an unknown op, an oversized or descriptor-bearing frame,
  or a frame out of turn closes that link only, logged; the other links go on.
- **Liveness.** Each link sends PING every `peer_timeout / 4` seconds; a peer heard from
  for none of `peer_timeout` seconds is down (its link closes: host_down). A link that
  breaks is down at once. Dialers reconnect with a backoff up to `reconnect_max`.
- **Bounds** (TcpLimits): `max_pending` connections in their handshake at once, each
  given `handshake_timeout` seconds; `max_peers` links; frames of at most `max_packet`
  bytes; at most `max_queued` bytes waiting to be written to one peer (a peer that does
  not read that much is dropped); reading from peers stops while the sink's backlog is
  above `max_backlog` bytes (TCP's flow control then holds the senders back).

State: `_ready` (welcomed links by peer), each link's output queue and `_closed` are
guarded by `_lock` (a leaf lock: no sink or loop call is made under it); everything else
belongs to the loop's thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import random
import secrets
import socket
import ssl
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from pymach.errors import MachError
from pymach.include import wire
from pymach.include.wire import WireError
from pymach.net.cluster import Credentials, cert_host, check_host_name, tls_contexts
from pymach.net.transport import NetTransport, PacketSink

log = logging.getLogger("pymach.net")

LINK_VERSION = 1
OP_HELLO, OP_WELCOME, OP_BUSY, OP_PACKET, OP_PING = range(300, 305)
_OPS = frozenset({OP_HELLO, OP_WELCOME, OP_BUSY, OP_PACKET, OP_PING})
CONTROL_MAX = 1024  # bytes of a HELLO, WELCOME or BUSY body
INCARNATION_SIZE = 16
_JOIN_MAX = 64 << 10  # bodies up to this size are written with their header in one piece
Address = tuple[str, int]


class LinkRefused(Exception):
    """A connection is not (or no longer) a link: the message says why."""


@dataclass(frozen=True)
class TcpLimits:
    """What peers can make a host hold, and how fast it gives up on them (module doc)."""

    peer_timeout: float = 5.0  # seconds of silence after which a peer is down
    handshake_timeout: float = 5.0  # seconds from connect to welcome
    reconnect_max: float = 2.0  # the longest wait between a dialer's attempts
    max_pending: int = 16  # connections in their handshake at once
    max_peers: int = 64  # links at once
    max_packet: int = wire.MAX_BODY  # bytes of one packet
    max_queued: int = 2 * wire.MAX_BODY  # bytes waiting to be written to one peer
    max_backlog: int = wire.MAX_BODY  # bytes handed to the host and not yet taken


@dataclass(frozen=True)
class TcpConfig:
    """One host's place in a cluster: its name and TLS contexts (net/cluster.py), where it
    listens (None: nowhere; port 0: any free port), the hosts it dials, its limits."""

    host: str
    server_tls: ssl.SSLContext
    client_tls: ssl.SSLContext
    listen: Address | None = None
    peers: tuple[Address, ...] = ()
    limits: TcpLimits = TcpLimits()


def tcp_config(directory: str, host: str, listen: Address | None = None,
               peers: tuple[Address, ...] = (), limits: TcpLimits | None = None) -> TcpConfig:
    """The configuration of host `host` with the cluster credentials in `directory`
    (KERN_INVALID_ARGUMENT if they are missing or not usable: see cluster.tls_contexts)."""
    server, client = tls_contexts(Credentials(directory, check_host_name(host)))
    return TcpConfig(host, server, client, listen, tuple(peers), limits or TcpLimits())


@dataclass(eq=False)
class Link:
    """A welcomed connection to one peer."""

    peer: str
    writer: asyncio.StreamWriter
    incarnation: bytes
    last_heard: float
    outq: deque[bytes] = field(default_factory=deque)  # (_lock) packets not yet written
    unsent: int = 0  # (_lock) their bytes
    flushing: bool = False  # (_lock) a flush is scheduled on the loop
    closed: bool = False


class TcpTransport(NetTransport):
    """A host's attachment to a cluster over TCP with mutual TLS (see module docstring)."""

    def __init__(self, config: TcpConfig) -> None:
        self.config = config  # immutable
        self.limits = config.limits  # immutable
        self._host = check_host_name(config.host)
        self.incarnation = secrets.token_bytes(INCARNATION_SIZE)  # immutable
        self._lock = threading.Lock()
        self._ready: dict[str, Link] = {}
        self._closed = False
        self._sink: PacketSink | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._dialing: set[str] = set()  # peers we sent a HELLO and await an answer from
        self._known: dict[Address, str] = {}  # the host at each address we dialed
        self._pending = 0  # incoming connections not yet links
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listener: socket.socket | None = None
        self.address: Address | None = None  # where it listens, once started
        self.refused = 0  # connections refused (handshake, certificate, hello, limits)
        self.dropped = 0  # links closed for a protocol violation or silence

    @property
    def host(self) -> str:
        """This host's name (its certificate's)."""
        return self._host

    # -- NetTransport -----------------------------------------------------------------------
    def start(self, sink: PacketSink) -> None:
        """Start the loop, listen and begin dialing; OSError if the address cannot be
        bound, KERN_FAILURE if started twice."""
        if self._sink is not None:
            raise MachError("KERN_FAILURE", "the transport is started already")
        self._sink = sink
        self._loop = asyncio.new_event_loop()
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True,
                                        name=f"net.tcp.{self._host}")
        self._thread.start()
        ready.result()

    def send(self, dest: str, data: bytes) -> bool:
        """Queue `data` for `dest`'s link; False if there is none, it is too large, or
        the peer has `max_queued` bytes unread already (then its link is dropped)."""
        with self._lock:
            link = self._ready.get(dest)
            if self._closed or link is None or link.closed:
                return False
            if len(data) > self.limits.max_packet:
                log.warning("tcp %s: a packet of %d bytes for %r exceeds %d", self._host,
                            len(data), dest, self.limits.max_packet)
                return False
            full = link.unsent + len(data) > self.limits.max_queued
            wake = not (full or link.flushing)
            if not full:
                link.outq.append(data)
                link.unsent += len(data)
                link.flushing = True
        if full:
            self._call(self._drop, link, f"{self.limits.max_queued} bytes for it are unread")
            return False
        if wake:
            self._call(self._flush, link)
        return True

    def disconnect(self, host: str, why: str) -> None:
        """Drop the link to `host` (logged with `why`); it may dial again."""
        self._call(self._disconnect, host, why)

    def close(self) -> None:
        """Close every link (peers see this host go down) and stop the loop; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError, concurrent.futures.TimeoutError):
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(5)
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(loop.stop)
        if thread is not threading.current_thread():
            thread.join(5)

    def peers(self) -> list[str]:
        """The hosts this one has a link to now."""
        with self._lock:
            return sorted(self._ready)

    # -- the loop ---------------------------------------------------------------------------
    def _call(self, fn: Any, *args: Any) -> None:
        """Run `fn(*args)` on the loop (nothing if it has stopped)."""
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(fn, *args)

    def _run(self, ready: concurrent.futures.Future[None]) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(_log_loop_error)
        try:
            loop.run_until_complete(self._open())
        except BaseException as e:  # handed to start()'s caller
            ready.set_exception(e)
            loop.close()
            return
        ready.set_result(None)
        try:
            loop.run_forever()
        finally:
            for task in asyncio.all_tasks(loop):
                task.cancel()
            with contextlib.suppress(BaseException):
                loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    async def _open(self) -> None:
        if self.config.listen is not None:
            host, port = self.config.listen
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self._listener = socket.create_server((host, port), family=family,
                                                  backlog=self.limits.max_pending)
            self._listener.setblocking(False)
            self.address = self._listener.getsockname()[:2]
            self._spawn(self._accept_loop(self._listener))
        for addr in dict.fromkeys(self.config.peers):
            self._spawn(self._dial(addr))
        self._spawn(self._heartbeat())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _shutdown(self) -> None:
        if self._listener is not None:
            self._listener.close()
        for task in list(self._tasks):
            task.cancel()
        with self._lock:
            links = list(self._ready.values())
        for link in links:
            self._drop(link, "this host is leaving")

    # -- connections ------------------------------------------------------------------------
    async def _accept_loop(self, listener: socket.socket) -> None:
        """Take connections; refuse at once those beyond max_pending handshakes."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, addr = await loop.sock_accept(listener)
            except OSError as e:
                if listener.fileno() < 0:  # closed: this host is leaving
                    return
                log.warning("tcp %s: cannot accept a connection: %s", self._host, e)
                await asyncio.sleep(0.1)  # (out of descriptors, say: try again soon)
                continue
            where = address_text(addr[:2])
            if self._pending >= self.limits.max_pending:
                self._refuse(where, f"{self._pending} connections are in their handshake")
                sock.close()
                continue
            self._pending += 1
            self._spawn(self._accepted(sock, where))

    async def _accepted(self, sock: socket.socket, where: str) -> None:
        """A connection from somewhere: TLS, a certificate of the cluster, a HELLO, all
        within the handshake timeout; then it is a link until it ends."""
        link = reader = None
        try:
            reader, link = await asyncio.wait_for(self._greet(sock),
                                                  self.limits.handshake_timeout)
        except asyncio.IncompleteReadError as e:  # a dialer that found a link already
            if e.partial:
                self._refuse(where, _why(e))
            else:
                log.info("tcp %s: %s closed before its hello", self._host, where)
            sock.close()
        except (TimeoutError, LinkRefused, WireError, OSError, EOFError) as e:
            self._refuse(where, _why(e))
            sock.close()
        finally:
            self._pending -= 1
        if link is not None and reader is not None:
            await self._serve(link, reader)

    async def _greet(self, sock: socket.socket) -> tuple[asyncio.StreamReader, Link | None]:
        """The acceptor's side of the handshake: (the reader, the link or None if BUSY
        was sent)."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        protocol = asyncio.StreamReaderProtocol(reader)
        transport, _ = await loop.connect_accepted_socket(
            lambda: protocol, sock, ssl=self.config.server_tls,
            ssl_handshake_timeout=self.limits.handshake_timeout)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        try:
            return reader, await self._hello(reader, writer)
        except BaseException:
            transport.abort()
            raise

    async def _hello(self, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> Link | None:
        """Read the dialer's HELLO and answer it: the link, or None (BUSY sent)."""
        peer = self._peer_of(writer)
        op, body = await read_frame(reader, CONTROL_MAX)
        if op != OP_HELLO:
            raise WireError(f"{peer!r} began with op {op}, not HELLO")
        values = wire.decode(body)
        wire.check(values, (int, bytes), "HELLO")
        if values[0] != LINK_VERSION or len(values[1]) != INCARNATION_SIZE:
            raise LinkRefused(f"{peer!r} speaks link version {values[0]}, not {LINK_VERSION}")
        busy = self._busy(peer, values[1])
        if busy:
            log.debug("tcp %s: told %r busy: %s", self._host, peer, busy)
            write_frame(writer, OP_BUSY, wire.encode([busy]))
            writer.close()
            return None
        write_frame(writer, OP_WELCOME, wire.encode([self.incarnation]))
        return self._welcome(peer, writer, values[1])

    def _busy(self, peer: str, incarnation: bytes) -> str:
        """Why the acceptor refuses a HELLO from `peer` ("" if it accepts); see module
        docstring. A HELLO of a new incarnation ends the old link first."""
        old = self._ready.get(peer)
        if old is not None and old.incarnation == incarnation:
            return "there is a link already"
        if peer in self._dialing and self._host < peer:
            return "crossing dials: the dial of the host whose name sorts first wins"
        if old is None and len(self._ready) >= self.limits.max_peers:
            return f"{self.limits.max_peers} hosts are linked already"
        if old is not None:
            self._drop(old, "it restarted")
        return ""

    async def _dial(self, addr: Address) -> None:
        """Keep a link to the host at `addr`: dial, serve, and dial again after a backoff."""
        backoff = 0.05
        while not self._closed:
            known = self._known.get(addr)
            if known is not None and known in self._ready:
                await asyncio.sleep(self.limits.peer_timeout / 4)
                continue
            try:
                link, reader = await asyncio.wait_for(self._connect(addr),
                                                      self.limits.handshake_timeout)
            except (TimeoutError, LinkRefused, WireError, OSError, EOFError) as e:
                log.log(logging.INFO if isinstance(e, ConnectionRefusedError) else
                        logging.WARNING, "tcp %s: cannot link to %s: %s", self._host,
                        address_text(addr), _why(e))
            else:
                if link is not None:
                    backoff = 0.05
                    await self._serve(link, reader)
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(2 * backoff, self.limits.reconnect_max)

    async def _connect(self, addr: Address) -> tuple[Link | None, asyncio.StreamReader]:
        """The dialer's side of the handshake: (the link or None if refused, its reader)."""
        reader, writer = await asyncio.open_connection(*addr, ssl=self.config.client_tls)
        try:
            peer = self._peer_of(writer)
            self._known[addr] = peer
            if peer in self._ready or peer in self._dialing:
                writer.close()
                return None, reader
            self._dialing.add(peer)
            try:
                write_frame(writer, OP_HELLO, wire.encode([LINK_VERSION, self.incarnation]))
                op, body = await read_frame(reader, CONTROL_MAX)
            finally:
                self._dialing.discard(peer)
            return self._answered(peer, writer, op, body), reader
        except BaseException:
            writer.transport.abort()
            raise

    def _answered(self, peer: str, writer: asyncio.StreamWriter, op: int,
                  body: bytes) -> Link | None:
        """The acceptor's answer to our HELLO: the link, or None if it is busy."""
        values = wire.decode(body)
        if op == OP_BUSY:
            wire.check(values, (str,), "BUSY")
            log.debug("tcp %s: %r is busy: %s", self._host, peer, values[0])
            writer.close()
            return None
        if op != OP_WELCOME:
            raise WireError(f"{peer!r} answered HELLO with op {op}")
        wire.check(values, (bytes,), "WELCOME")
        if peer in self._ready:  # it welcomed us while we took its own dial
            writer.close()
            return None
        return self._welcome(peer, writer, values[0])

    def _peer_of(self, writer: asyncio.StreamWriter) -> str:
        """The host name in the peer's (verified) certificate."""
        try:
            peer = cert_host(writer.get_extra_info("peercert"))
        except MachError as e:
            raise LinkRefused(e.detail) from None
        if peer == self._host:
            raise LinkRefused(f"the peer presents this host's own name {peer!r}")
        return peer

    def _welcome(self, peer: str, writer: asyncio.StreamWriter, incarnation: bytes) -> Link:
        """Make the connection `peer`'s link and tell the sink the host is up."""
        link = Link(peer, writer, incarnation, asyncio.get_running_loop().time())
        with self._lock:
            self._ready[peer] = link
        log.info("tcp %s: linked to %r (%s)", self._host, peer, _where(writer))
        assert self._sink is not None
        self._sink.host_up(peer)
        return link

    def _refuse(self, where: str, why: str) -> None:
        self.refused += 1
        log.warning("tcp %s: refused a connection from %s: %s", self._host, where, why)

    # -- links ------------------------------------------------------------------------------
    async def _serve(self, link: Link, reader: asyncio.StreamReader) -> None:
        """Hand the link's packets to the sink until it ends; then the peer is down."""
        why = "the connection ended"
        try:
            while not link.closed:
                op, body = await read_frame(reader, self.limits.max_packet)
                link.last_heard = asyncio.get_running_loop().time()
                if op == OP_PACKET:
                    assert self._sink is not None
                    self._sink.packet(link.peer, body)
                    await self._throttle(link)
                elif op != OP_PING:
                    raise WireError(f"op {op} on a link")
        except WireError as e:
            why = f"it broke the protocol: {e.detail}"
            self.dropped += 1
        except (OSError, EOFError) as e:
            why = f"the connection ended: {_why(e)}"
        finally:
            self._drop(link, why)

    async def _throttle(self, link: Link) -> None:
        """Stop reading from `link` while the host has too much to take (module doc)."""
        assert self._sink is not None
        loop = asyncio.get_running_loop()
        while self._sink.backlog() > self.limits.max_backlog and not link.closed:
            link.last_heard = loop.time()  # our slowness, not the peer's silence
            await asyncio.sleep(0.002)

    def _flush(self, link: Link) -> None:
        """Write what `send` queued for the link (on the loop)."""
        with self._lock:
            packets = list(link.outq)
            link.outq.clear()
            link.unsent, link.flushing = 0, False
        if link.closed:
            return
        for data in packets:
            write_frame(link.writer, OP_PACKET, data)
        if link.writer.transport.get_write_buffer_size() > self.limits.max_queued:
            self._drop(link, f"{self.limits.max_queued} bytes for it are unwritten")

    async def _heartbeat(self) -> None:
        """PING every link; drop those not heard from within peer_timeout."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.limits.peer_timeout / 4)
            with self._lock:
                links = list(self._ready.values())
            for link in links:
                if loop.time() - link.last_heard > self.limits.peer_timeout:
                    self.dropped += 1
                    self._drop(link, f"it was silent for {self.limits.peer_timeout} s")
                elif not link.writer.is_closing():
                    write_frame(link.writer, OP_PING, b"")

    def _disconnect(self, host: str, why: str) -> None:
        with self._lock:
            link = self._ready.get(host)
        if link is not None:
            self.dropped += 1
            self._drop(link, why)

    def _drop(self, link: Link, why: str) -> None:
        """Close a link (on the loop); if it was the peer's, the peer is down."""
        with self._lock:
            if link.closed:
                return
            link.closed = True
            current = self._ready.get(link.peer) is link
            if current:
                del self._ready[link.peer]
            link.outq.clear()
            closing = self._closed
        link.writer.transport.abort()
        if current:
            log.log(logging.INFO if closing else logging.WARNING,
                    "tcp %s: host %r is down: %s", self._host, link.peer, why)
            if not closing and self._sink is not None:
                self._sink.host_down(link.peer)


# -- addresses ------------------------------------------------------------------------------
def parse_address(text: str) -> Address:
    """'ADDR:PORT' (an IPv6 ADDR in brackets; an empty ADDR: every address) -> (ADDR,
    PORT); KERN_INVALID_ARGUMENT if it is not one."""
    host, sep, port = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or "[" in host:
        raise MachError("KERN_INVALID_ARGUMENT", f"{text!r} is not ADDR:PORT (e.g. "
                        f"10.0.0.1:7391, [::1]:7391, :7391)")
    return host, int(port)


def address_text(addr: Address | None) -> str:
    """(ADDR, PORT) as 'ADDR:PORT' ('[ADDR]:PORT' for IPv6); None as 'nowhere'."""
    if addr is None:
        return "nowhere"
    host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
    return f"{host}:{addr[1]}"


# -- frames ---------------------------------------------------------------------------------
async def read_frame(reader: asyncio.StreamReader, max_packet: int) -> tuple[int, bytes]:
    """The next frame's (op, body); WireError for a bad header, an unknown op, descriptors
    or a body larger than its op allows, EOFError at the end of the stream."""
    op, length, nfds = wire.unpack_header(await reader.readexactly(wire.HEADER_SIZE))
    if op not in _OPS:
        raise WireError(f"unknown op {op}")
    if nfds:
        raise WireError("descriptors cannot cross hosts")
    limit = max_packet if op == OP_PACKET else CONTROL_MAX
    if length > limit:
        raise WireError(f"a {length}-byte body exceeds {limit} for op {op}")
    return op, (await reader.readexactly(length) if length else b"")


def write_frame(writer: asyncio.StreamWriter, op: int, body: bytes) -> None:
    """Queue one frame on `writer` (on its loop)."""
    header = wire.pack_header(op, len(body), 0)
    if len(body) <= _JOIN_MAX:
        writer.write(header + body)
    else:  # no copy of a large body
        writer.write(header)
        writer.write(body)


def _where(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return address_text(peer[:2]) if isinstance(peer, tuple) else "an unknown address"


def _why(e: BaseException) -> str:
    if isinstance(e, MachError):
        return e.detail
    if isinstance(e, TimeoutError):
        return "the handshake timed out"
    if isinstance(e, asyncio.IncompleteReadError):
        return "the peer closed the connection"
    return str(e) or type(e).__name__


def _log_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """asyncio's unhandled errors, in our log and not on stderr."""
    e = context.get("exception")
    log.warning("tcp: %s%s", context.get("message", "error"), f": {e!r}" if e else "")
