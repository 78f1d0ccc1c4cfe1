"""TCP between hosts: a `NetTransport` (net/transport.py) over mutual TLS.

One host's attachment to a cluster of machines. The netmsgserver runs over it exactly as
over the in-process network; this module only carries bytes between authenticated
hosts, in order, and says when a host comes and goes.

- **One event loop.** An asyncio loop in a thread of its own carries every connection.
  `send` queues the packet on the peer's session and writes it at once when called on
  the loop's thread (where the host's server runs, net/station.py), else wakes the loop
  to write it. The loop takes each frame as it arrives (on the connection's reader
  callback, no task switch) and hands the packet to the sink; only the loop's thread
  calls the sink (`own_thread`: the host's server acts on a packet there before the
  loop reads on; `call_soon` gives the loop the server's other work). A connection is
  a `TlsStream` (net/tlsstream.py): the `ssl` module's socket driven by the loop,
  about a fifth of the CPU of asyncio's TLS layer per small message.
- **Who is a host.** Every connection is TLS 1.3 with certificates both ways, checked
  against the cluster's CA (net/cluster.py). A peer's host name is the name its
  certificate carries, never a claim it sends; a peer that presents our own name, or a
  certificate the CA did not sign, is refused and logged.
- **Sessions outlive connections.** What two hosts share is a *session*: one numbered
  stream of packets each way (sequence numbers from 1), with a retransmit buffer of the
  packets the peer has not acknowledged. A session is carried by at most one TCP
  connection at a time; when that connection breaks (a reset, a silent link) the session
  stays, `send` keeps queueing, and the dialer dials again with a backoff. The session
  ends (the sink's host_down: the peer's ports die) only when the peer says BYE (it is
  leaving), breaks the protocol, is told to `disconnect`, holds more than `max_queued`
  unacknowledged bytes, restarts, or is not heard from for `peer_timeout` seconds.
- **The handshake.** After TLS the dialer sends HELLO [version, its incarnation (start
  id), the session's id (empty: none), packets received in it, its peer_timeout in ms];
  the acceptor answers WELCOME [its incarnation, the session's id, packets received,
  its peer_timeout in ms] or BUSY [why]. The same id both ways resumes the session: each
  side resends exactly the packets after what the other received, so every packet
  arrives once, in order, across any number of reconnects. Another id is a new session:
  a host that had one with that peer ends it first (host_down, then host_up: the peer
  restarted, a new incarnation, or it ended the session itself). The acceptor says BUSY
  to a second connection of a peer it is linked to (unless the peer lost the one it had
  dialed: the new one replaces it), and when it is dialing that peer too and its name
  sorts first (crossing dials: both sides agree which one wins). A dialer that is refused
  tries again after a backoff.
- **Frames.** The wire header of include/wire.py (magic, version, op, length, no
  descriptors) with this protocol's ops. HELLO, WELCOME and BUSY bodies are typed wire
  values, checked. A DATA body is [seq u64, ack u64] and a packet of net/packets.py (the
  server decodes it): `seq` must be exactly one more than the last packet received,
  `ack` (packets the sender has received from us) may only grow and never beyond what
  was sent. ACK is [ack u64] (also the heartbeat); BYE is empty. A bad header, an unknown
  op, an oversized or descriptor-bearing frame, a frame out of turn, a sequence number
  out of place, or an acknowledgement or resume point that is a lie ends that session
  (logged; the peer only hurts itself); the other sessions go on.
- **Liveness.** Each side sends ACK at least every min(its, the peer's peer_timeout) / 8
  seconds (HEARTBEATS). A connection silent for peer_timeout / 2 is closed (the dialer
  dials again, every peer_timeout / 8 at most); a session whose peer was heard from on
  no connection for peer_timeout (less NOTICE_S, or a twentieth of it: the time left
  for the news to reach the host's tasks) is over: the peer is down. So a peer that
  stops dead (SIGKILL) is down within peer_timeout of its death, and a link cut for
  less than about 0.7 x peer_timeout (the bound less a heartbeat and a reconnect) loses
  nothing. Acknowledgements ride on DATA frames, or go alone after ACK_DELAY seconds,
  or at once every `max_queued / 8` bytes or ACK_COUNT packets.
- **Bounds** (TcpLimits): `max_pending` connections in their handshake at once, each
  given `handshake_timeout` seconds; `max_peers` sessions; frames of at most
  `max_packet` bytes; at most `max_queued` bytes sent to one peer and not acknowledged
  (written or not: the retransmit buffer; a peer that does not take that much is
  dropped); reading from peers stops while the sink's backlog is above `max_backlog`
  bytes (TCP's flow control then holds the senders back); a connection buffers at most
  about a frame or tlsstream.READ_HIGH bytes it has read and not handed on.

State: `_sessions`, each session's outbound queues and counters, its `conn` and
`_closed` are guarded by `_lock` (a leaf lock: no sink or loop call is made under it);
everything else belongs to the loop's thread.
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
import struct
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pymach.errors import MachError
from pymach.include import wire
from pymach.include.wire import WireError
from pymach.net.cluster import Credentials, cert_host, check_host_name, tls_contexts
from pymach.net.tlsstream import TlsStream
from pymach.net.transport import NetTransport, PacketSink

log = logging.getLogger("pymach.net")

LINK_VERSION = 2
OP_HELLO, OP_WELCOME, OP_BUSY, OP_DATA, OP_ACK, OP_BYE = range(300, 306)
_OPS = frozenset({OP_HELLO, OP_WELCOME, OP_BUSY, OP_DATA, OP_ACK, OP_BYE})
CONTROL_MAX = 1024  # bytes of a HELLO, WELCOME or BUSY body
INCARNATION_SIZE = SESSION_SIZE = 16
DATA_HEAD = struct.Struct("!QQ")  # a DATA frame's seq and ack, before its packet
ACK_BODY = struct.Struct("!Q")
_HEAD_SIZE = {OP_DATA: DATA_HEAD.size, OP_ACK: ACK_BODY.size}  # (other ops: none)
_BODY_MAX = {OP_ACK: ACK_BODY.size, OP_BYE: 0}  # (DATA: max_packet more; others CONTROL_MAX)
ACK_DELAY = 0.05  # seconds an acknowledgement may wait for a DATA frame to ride on
ACK_COUNT = 256  # packets received after which an acknowledgement goes at once
HEARTBEATS = 8  # heartbeats (ACK frames) per peer_timeout, at least
NOTICE_S = 0.1  # of peer_timeout, left for the news of a host down to reach tasks
TIMEOUT_MS_MAX = 86_400_000  # the largest peer_timeout a peer may announce
THROTTLE_S = 0.002  # seconds between looks at a host's backlog while reading waits
_JOIN_MAX = 64 << 10  # bodies up to this size are written with their header in one piece
Address = tuple[str, int]


class LinkRefused(Exception):
    """A connection is not (or no longer) a link: the message says why."""


@dataclass(frozen=True)
class TcpLimits:
    """What peers can make a host hold, and how fast it gives up on them (module doc)."""

    peer_timeout: float = 5.0  # seconds unheard after which a peer is down
    handshake_timeout: float = 5.0  # seconds from connect to welcome
    reconnect_max: float = 2.0  # the longest wait between a dialer's attempts
    max_pending: int = 16  # connections in their handshake at once
    max_peers: int = 64  # sessions at once
    max_packet: int = wire.MAX_BODY  # bytes of one packet
    max_queued: int = 2 * wire.MAX_BODY  # bytes sent to one peer and not acknowledged
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
class Conn:
    """One TCP connection, carrying one session's frames until it closes."""

    writer: TlsStream
    dialed: bool  # we dialed it (else the peer did)
    closed: bool = False
    taking: bool = False  # its frames are being taken (_frames)


@dataclass(eq=False)
class Session:
    """What this host shares with one peer across connections (module docstring).

    Outbound, packet number `acked + 1` is `unacked[0]`; `unwritten` follows `unacked`;
    `sent == acked + len(unacked) + len(unwritten)`; `retained` is their bytes."""

    peer: str
    incarnation: bytes  # the peer's start id
    token: bytes  # the session's id
    heartbeat: float  # seconds between our ACKs
    last_heard: float  # (loop time) the last frame from the peer on any connection
    conn: Conn | None = None  # (_lock) the connection carrying it now
    unacked: deque[bytes | bytearray] = field(default_factory=deque)  # (_lock) written,
    # unacknowledged
    unwritten: deque[bytes | bytearray] = field(default_factory=deque)  # (_lock) queued
    retained: int = 0  # (_lock)
    acked: int = 0  # (_lock)
    sent: int = 0  # (_lock)
    flushing: bool = False  # (_lock) a flush is scheduled on the loop
    ended: bool = False  # (_lock)
    received: int = 0  # packets received and handed to the sink
    told: int = 0  # the last `received` sent to the peer
    owed_bytes: int = 0  # bytes received since then
    ack_timer: asyncio.TimerHandle | None = None
    watchdog: asyncio.TimerHandle | None = None
    resumed: int = 0  # connections after the first
    resent: int = 0  # packets written again after a reconnect
    throttled: bool = False  # reading waits for the host to take what it has (_throttle)


class TcpTransport(NetTransport):
    """A host's attachment to a cluster over TCP with mutual TLS (see module docstring)."""

    own_thread = True  # the sink is called only from the loop's thread

    def __init__(self, config: TcpConfig) -> None:
        self.config = config  # immutable
        self.limits = config.limits  # immutable
        self._host = check_host_name(config.host)
        self.incarnation = secrets.token_bytes(INCARNATION_SIZE)  # immutable
        self._timeout_ms = max(1, min(TIMEOUT_MS_MAX, round(self.limits.peer_timeout * 1000)))
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self._closed = False
        self._sink: PacketSink | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._loop_ident = 0  # the loop thread's threading.get_ident(), once it runs
        self._dialing: set[str] = set()  # peers we sent a HELLO and await an answer from
        self._known: dict[Address, str] = {}  # the host at each address we dialed
        self._pending = 0  # incoming connections not yet links
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listener: socket.socket | None = None
        self.address: Address | None = None  # where it listens, once started
        self.refused = 0  # connections refused (handshake, certificate, hello, limits)
        self.dropped = 0  # sessions ended for a protocol violation or silence
        self.resumed = 0  # sessions resumed on a new connection
        self.resent = 0  # packets written again after a reconnect

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

    def send(self, dest: str, data: bytes | bytearray) -> bool:
        """Queue `data` as the next packet of `dest`'s session (written at once if it has a
        connection, after the reconnect if not); False if there is no session, the packet
        is too large, or `max_queued` bytes for the peer are unacknowledged already (then
        the session ends: the peer does not keep up)."""
        with self._lock:
            s = self._sessions.get(dest)
            if self._closed or s is None or s.ended:
                return False
            if len(data) > self.limits.max_packet:
                log.warning("tcp %s: a packet of %d bytes for %r exceeds %d", self._host,
                            len(data), dest, self.limits.max_packet)
                return False
            full = s.retained + len(data) > self.limits.max_queued
            wake = not full and s.conn is not None and not s.flushing
            if not full:
                s.unwritten.append(data)
                s.retained += len(data)
                s.sent += 1
                s.flushing = s.flushing or wake
        if full:
            self._call(self._end, s, f"{self.limits.max_queued} bytes for it are "
                       f"unacknowledged")
            return False
        if wake and threading.get_ident() == self._loop_ident:
            self._flush(s)  # (sent from the loop's own thread: written now)
        elif wake:
            self._call(self._flush, s)
        return True

    def call_soon(self, fn: Callable[..., None], *args: Any) -> bool:
        """Run `fn(*args)` on the loop's thread soon, after what it has to do already
        (from any thread; never blocks); False if the loop has stopped."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return False
        try:
            if threading.get_ident() == self._loop_ident:
                loop.call_soon(fn, *args)  # (no wake-up needed: the loop is running this)
            else:
                loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # closed meanwhile
            return False
        return True

    def disconnect(self, host: str, why: str) -> None:
        """End the session with `host` (logged with `why`): it is down here; it may dial
        again, as a new session."""
        self._call(self._disconnect, host, why)

    def close(self) -> None:
        """Say BYE on every connection (peers see this host go down at once) and stop the
        loop; idempotent."""
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
        """The hosts this one has a connection to now."""
        with self._lock:
            return sorted(p for p, s in self._sessions.items() if s.conn is not None)

    def sessions(self) -> list[str]:
        """The hosts this one has a session with (connected, or reconnecting)."""
        with self._lock:
            return sorted(self._sessions)

    def link_cipher(self, peer: str) -> str | None:
        """'TLS version, cipher suite' of the connection to `peer` now (None if there is
        none): what the link's bytes cost to protect."""
        with self._lock:
            s = self._sessions.get(peer)
            conn = s.conn if s is not None else None
        cipher = conn.writer.sock.cipher() if conn is not None else None
        return f"{cipher[1]}, {cipher[0]}" if cipher else None

    # -- the loop ---------------------------------------------------------------------------
    def _call(self, fn: Any, *args: Any) -> None:
        """Run `fn(*args)` on the loop (nothing if it has stopped)."""
        self.call_soon(fn, *args)

    def _run(self, ready: concurrent.futures.Future[None]) -> None:
        loop = self._loop
        assert loop is not None
        self._loop_ident = threading.get_ident()
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
        """BYE on every connection, flushed for at most a second; then every session
        ends (the sink hears nothing more: this host is leaving)."""
        if self._listener is not None:
            self._listener.close()
        for task in list(self._tasks):
            task.cancel()
        with self._lock:
            sessions = list(self._sessions.values())
        writers = [s.conn.writer for s in sessions if s.conn is not None]
        for w in writers:
            with contextlib.suppress(Exception):
                write_frame(w, OP_BYE, b"")
                w.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*(w.wait_closed() for w in writers),
                                                  return_exceptions=True), 1.0)
        for s in sessions:
            self._end(s, "this host is leaving")

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
        within the handshake timeout; then it carries its session until it ends."""
        linked = None
        try:
            linked = await asyncio.wait_for(self._greet(sock), self.limits.handshake_timeout)
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
        if linked is not None:
            await self._serve(*linked)

    async def _greet(self, sock: socket.socket
                     ) -> tuple[Session, Conn, TlsStream] | None:
        """The acceptor's side of the handshake: (the session, its new connection, the
        reader), or None if BUSY was sent."""
        stream = await TlsStream.handshake(sock, self.config.server_tls, server_side=True)
        try:
            linked = await self._hello(stream, stream)
        except BaseException:
            stream.abort()
            raise
        return None if linked is None else (*linked, stream)

    async def _hello(self, reader: TlsStream,
                     writer: TlsStream) -> tuple[Session, Conn] | None:
        """Read the dialer's HELLO and answer it: (the session, the connection now
        carrying it), or None (BUSY sent)."""
        peer = self._peer_of(writer)
        op, _, body = await read_frame(reader, CONTROL_MAX)
        if op != OP_HELLO:
            raise WireError(f"{peer!r} began with op {op}, not HELLO")
        incarnation, token, received, timeout = _check_hello(peer, wire.decode(body))
        old = self._sessions.get(peer)
        busy = self._busy(peer, old, incarnation, token)
        if busy:
            log.debug("tcp %s: told %r busy: %s", self._host, peer, busy)
            write_frame(writer, OP_BUSY, wire.encode([busy]))
            writer.close()
            return None
        conn = Conn(writer, dialed=False)
        if old is not None and token == old.token and incarnation == old.incarnation:
            if old.conn is not None:
                self._lose(old, old.conn, "it dialed again")
            write_frame(writer, OP_WELCOME, wire.encode([self.incarnation, old.token,
                                                         old.received, self._timeout_ms]))
            self._resume(old, conn, received)
            return old, conn
        if old is not None:
            self._end(old, _why_new(old, incarnation))
        s = self._begin(peer, incarnation, secrets.token_bytes(SESSION_SIZE), timeout)
        write_frame(writer, OP_WELCOME, wire.encode([self.incarnation, s.token, 0,
                                                     self._timeout_ms]))
        self._attach(s, conn)
        return s, conn

    def _busy(self, peer: str, old: Session | None, incarnation: bytes, token: bytes) -> str:
        """Why the acceptor refuses a HELLO from `peer` ("" if it accepts); see module
        docstring."""
        live = old.conn if old is not None else None
        if old is not None and live is not None and incarnation == old.incarnation and \
                not (token == old.token and not live.dialed):
            return "there is a link already"
        if peer in self._dialing and self._host < peer:
            return "crossing dials: the dial of the host whose name sorts first wins"
        if old is None and len(self._sessions) >= self.limits.max_peers:
            return f"{self.limits.max_peers} hosts are linked already"
        return ""

    async def _dial(self, addr: Address) -> None:
        """Keep a link to the host at `addr`: dial, serve, and dial again after a backoff
        (at most peer_timeout / 8 while a session waits to resume, so that it resumes
        within peer_timeout). A failure is logged as a warning when its reason changes."""
        backoff, last_why = 0.05, ""
        while not self._closed:
            s = self._sessions.get(self._known.get(addr, ""))
            if s is not None and s.conn is not None:
                await asyncio.sleep(min(s.heartbeat, 0.25))
                continue
            timeout = self.limits.handshake_timeout
            if s is not None:  # resuming: a slow attempt must not outlast the session
                timeout = min(timeout, max(self.limits.peer_timeout / 2, 0.2))
            try:
                linked = await asyncio.wait_for(self._connect(addr), timeout)
            except (TimeoutError, LinkRefused, WireError, OSError, EOFError) as e:
                why = _why(e)
                quiet = isinstance(e, ConnectionRefusedError) or s is not None or why == last_why
                log.log(logging.INFO if quiet else logging.WARNING, "tcp %s: cannot link to "
                        "%s: %s", self._host, address_text(addr), why)
                last_why = why
            else:
                if linked is not None:
                    backoff, last_why = 0.05, ""
                    await self._serve(*linked)
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            most = self.limits.reconnect_max
            if self._sessions.get(self._known.get(addr, "")) is not None:
                most = min(most, self.limits.peer_timeout / 8)
            backoff = min(2 * backoff, most)

    async def _connect(self, addr: Address
                       ) -> tuple[Session, Conn, TlsStream] | None:
        """The dialer's side of the handshake: (the session, its new connection, the
        reader), or None if there is a link already or the acceptor is busy."""
        reader = writer = await TlsStream.dial(addr, self.config.client_tls)
        try:
            peer = self._peer_of(writer)
            self._known[addr] = peer
            s = self._sessions.get(peer)
            if (s is not None and s.conn is not None) or peer in self._dialing:
                writer.close()
                return None
            self._dialing.add(peer)
            try:
                hello = [LINK_VERSION, self.incarnation, s.token if s else b"",
                         s.received if s else 0, self._timeout_ms]
                write_frame(writer, OP_HELLO, wire.encode(hello))
                op, _, body = await read_frame(reader, CONTROL_MAX)
            finally:
                self._dialing.discard(peer)
            linked = self._answered(peer, s, writer, op, body)
            return None if linked is None else (*linked, reader)
        except BaseException:
            writer.abort()
            raise

    def _answered(self, peer: str, asked: Session | None, writer: TlsStream,
                  op: int, body: bytes) -> tuple[Session, Conn] | None:
        """The acceptor's answer to our HELLO (which named session `asked`): the session
        and connection, or None if it is busy or a link came the other way meanwhile."""
        values = wire.decode(body)
        if op == OP_BUSY:
            wire.check(values, (str,), "BUSY")
            log.debug("tcp %s: %r is busy: %s", self._host, peer, values[0])
            writer.close()
            return None
        if op != OP_WELCOME:
            raise WireError(f"{peer!r} answered HELLO with op {op}")
        wire.check(values, (bytes, bytes, int, int), "WELCOME")
        incarnation, token, received, timeout = _check_ids(peer, *values)
        s = self._sessions.get(peer)
        if s is not None and s.conn is not None:  # it welcomed us while we took its dial
            writer.close()
            return None
        conn = Conn(writer, dialed=True)
        if asked is not None and token == asked.token:
            if s is not asked or incarnation != asked.incarnation:
                raise LinkRefused(f"the session with {peer!r} ended while it resumed")
            self._resume(s, conn, received)
            return s, conn
        if s is not None:
            self._end(s, _why_new(s, incarnation))
        if received != 0:
            raise WireError(f"{peer!r} claims {received} packets of a new session")
        s = self._begin(peer, incarnation, token, timeout)
        self._attach(s, conn)
        return s, conn

    def _peer_of(self, writer: TlsStream) -> str:
        """The host name in the peer's (verified) certificate."""
        try:
            peer = cert_host(writer.get_extra_info("peercert"))
        except MachError as e:
            raise LinkRefused(e.detail) from None
        if peer == self._host:
            raise LinkRefused(f"the peer presents this host's own name {peer!r}")
        return peer

    def _refuse(self, where: str, why: str) -> None:
        self.refused += 1
        log.warning("tcp %s: refused a connection from %s: %s", self._host, where, why)

    # -- sessions -----------------------------------------------------------------------------
    def _begin(self, peer: str, incarnation: bytes, token: bytes, timeout_ms: int) -> Session:
        """A new session with `peer`: the sink hears host_up (before any of its packets)."""
        loop = asyncio.get_running_loop()
        heartbeat = min(self.limits.peer_timeout, timeout_ms / 1000) / HEARTBEATS
        s = Session(peer, incarnation, token, heartbeat, loop.time())
        with self._lock:
            self._sessions[peer] = s
        assert self._sink is not None
        self._sink.host_up(peer)
        self._rearm(s)
        return s

    def _attach(self, s: Session, conn: Conn) -> None:
        """`conn` carries session `s` from now on; write what waits to be written."""
        with self._lock:
            s.conn = conn
            s.flushing = True
        s.last_heard = asyncio.get_running_loop().time()
        self._rearm(s)
        log.info("tcp %s: linked to %r (%s)", self._host, s.peer, _where(conn.writer))
        self._flush(s)

    def _resume(self, s: Session, conn: Conn, received: int) -> None:
        """Carry `s` on `conn`, the peer having received `received` of our packets: drop
        those, write the rest again. WireError (the session then ends) if `received` is
        a lie: fewer than it acknowledged, or more than we sent."""
        with self._lock:
            written = s.acked + len(s.unacked)
            lie = not s.acked <= received <= written
            if not lie:
                self._drop_acked(s, received)
                again = len(s.unacked)
                s.unwritten.extendleft(reversed(s.unacked))
                s.unacked.clear()
        if lie:
            self._end(s, f"it claims {received} packets received; {s.acked} were "
                         f"acknowledged and {written} sent")
            raise WireError(f"{s.peer!r} resumed from a packet it was not sent")
        s.resumed += 1
        s.resent += again
        self.resumed += 1
        self.resent += again
        log.info("tcp %s: the session with %r resumed: %d packets written again from %d; "
                 "%d received", self._host, s.peer, again, received + 1, s.received)
        self._attach(s, conn)

    def _drop_acked(self, s: Session, ack: int) -> None:
        """Forget packets up to `ack`, which the peer has (under _lock)."""
        while s.acked < ack:
            s.retained -= len(s.unacked.popleft())
            s.acked += 1

    def _lose(self, s: Session, conn: Conn, why: str) -> None:
        """`conn` is gone (a reset, silence): the session waits for the next one."""
        if conn.closed:
            return
        conn.closed = True
        conn.writer.abort()
        with self._lock:
            current = s.conn is conn
            if current:
                s.conn = None
        if current and not s.ended:
            self._rearm(s)
        if current and not s.ended and not self._closed:
            log.info("tcp %s: lost the connection to %r (%s); the session waits for another "
                     "until %g s after %r was last heard", self._host, s.peer, why,
                     self.limits.peer_timeout, s.peer)

    def _end(self, s: Session, why: str) -> None:
        """The session is over: its connection closes, what it held goes, and the sink
        hears host_down (unless this host is leaving)."""
        with self._lock:
            if s.ended:
                return
            s.ended = True
            if self._sessions.get(s.peer) is s:
                del self._sessions[s.peer]
            conn, s.conn = s.conn, None
            s.unacked.clear()
            s.unwritten.clear()
            s.retained = 0
            closing = self._closed
        for timer in (s.ack_timer, s.watchdog):
            if timer is not None:
                timer.cancel()
        if conn is not None and not conn.closed:
            conn.closed = True
            conn.writer.abort()
        log.log(logging.INFO if closing else logging.WARNING, "tcp %s: host %r is down: %s",
                self._host, s.peer, why)
        if not closing and self._sink is not None:
            self._sink.host_down(s.peer)

    def _watch(self, s: Session) -> None:
        """The session's watchdog (on the loop): close a connection silent for
        peer_timeout / 2; end a session unheard for peer_timeout; else look again at the
        next deadline."""
        s.watchdog = None
        if s.ended:
            return
        now, bound = asyncio.get_running_loop().time(), self.limits.peer_timeout
        conn = s.conn
        if conn is not None and now >= s.last_heard + bound / 2:
            self._lose(s, conn, f"it was silent for {bound / 2:g} s")
        elif conn is None and now >= s.last_heard + self._dead_after():
            self.dropped += 1
            self._end(s, f"it was not heard from for {self._dead_after():.3g} s (the bound: "
                         f"{bound:g} s)")
            return
        self._rearm(s)

    def _dead_after(self) -> float:
        """Seconds unheard after which a peer is down: peer_timeout, less what is left
        for the news to reach the host's tasks (NOTICE_S, or a twentieth of it)."""
        bound = self.limits.peer_timeout
        return bound - min(bound / 20, NOTICE_S)

    def _rearm(self, s: Session) -> None:
        """Set the watchdog for the session's next deadline (its connection's silence, or
        its own end), replacing the one set."""
        if s.watchdog is not None:
            s.watchdog.cancel()
        after = self.limits.peer_timeout / 2 if s.conn is not None else self._dead_after()
        s.watchdog = asyncio.get_running_loop().call_at(s.last_heard + after, self._watch, s)

    def _disconnect(self, host: str, why: str) -> None:
        with self._lock:
            s = self._sessions.get(host)
        if s is not None:
            self.dropped += 1
            self._end(s, why)

    # -- frames on a connection ---------------------------------------------------------------
    async def _serve(self, s: Session, conn: Conn, reader: TlsStream) -> None:
        """Hand the connection's packets to the sink until it ends; then the session waits
        for another (or ends, if the peer left or broke the protocol). Frames are taken
        as they arrive, on the reader's callback (`_frames`)."""
        ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        reader.on_data = lambda: self._frames(s, conn, reader, ended)
        try:
            self._frames(s, conn, reader, ended)  # (what came with the handshake)
            why = await ended
        finally:
            reader.on_data = None
        if why:
            self._lose(s, conn, why)

    def _frames(self, s: Session, conn: Conn, reader: TlsStream,
                ended: asyncio.Future[str]) -> None:
        """Act on every whole frame `reader` holds; when the connection is over, say why
        on `ended` ("" if nothing is left to do: it was closed here, or the session
        ended)."""
        if ended.done() or s.throttled or conn.taking:
            return  # (called again from inside: the loop below goes on)
        why = ""
        conn.taking = True
        try:
            while not conn.closed and not s.ended and not s.throttled:
                frame = take_frame(reader, self.limits.max_packet)
                if frame is None:
                    return
                self._frame(s, conn, reader, *frame)
        except WireError as e:
            if not conn.closed:
                self.dropped += 1
                self._end(s, f"it broke the protocol: {e.detail}")
        except (OSError, EOFError) as e:
            why = _why(e)
        finally:
            conn.taking = False
        if (why or conn.closed or s.ended) and not ended.done():
            ended.set_result(why)

    def _frame(self, s: Session, conn: Conn, reader: TlsStream, op: int, head: bytes,
               body: bytes | memoryview) -> None:
        """One frame from the peer (WireError if it has no business on a link)."""
        s.last_heard = asyncio.get_running_loop().time()
        if op == OP_DATA:
            self._data(s, head, body)
            self._throttle(s, conn, reader)
        elif op == OP_ACK:
            self._acked(s, ACK_BODY.unpack(head)[0])
        elif op == OP_BYE:
            self._end(s, "it left the cluster")
        else:
            raise WireError(f"op {op} on a link")

    def _data(self, s: Session, head: bytes, packet: bytes | memoryview) -> None:
        """A DATA frame: exactly the next packet, to the sink; its acknowledgement."""
        seq, ack = DATA_HEAD.unpack(head)
        if seq != s.received + 1:
            raise WireError(f"packet {seq} came where {s.received + 1} was due")
        self._acked(s, ack)
        s.received = seq
        assert self._sink is not None
        self._sink.packet(s.peer, packet)
        s.owed_bytes += len(packet)
        if s.owed_bytes >= self.limits.max_queued // 8 or s.received - s.told >= ACK_COUNT:
            self._send_ack(s)
        elif s.ack_timer is None:
            s.ack_timer = asyncio.get_running_loop().call_later(ACK_DELAY, self._ack_due, s)

    def _acked(self, s: Session, ack: int) -> None:
        """The peer has our packets up to `ack`; WireError if that is a lie."""
        with self._lock:
            written = s.acked + len(s.unacked)
            if not s.acked <= ack <= written:
                raise WireError(f"acknowledged packet {ack}: {s.acked} were acknowledged "
                                f"and {written} sent")
            self._drop_acked(s, ack)

    def _ack_due(self, s: Session) -> None:
        s.ack_timer = None
        if s.received > s.told:
            self._send_ack(s)

    def _send_ack(self, s: Session) -> None:
        conn = s.conn
        if conn is not None and not conn.writer.is_closing():
            write_frame(conn.writer, OP_ACK, ACK_BODY.pack(s.received))
            s.told, s.owed_bytes = s.received, 0

    def _throttle(self, s: Session, conn: Conn, reader: TlsStream) -> None:
        """Stop reading from `conn` while the host has too much to take (module doc);
        look again every THROTTLE_S, then take what waited."""
        assert self._sink is not None
        loop = asyncio.get_running_loop()
        if conn.closed or self._sink.backlog() <= self.limits.max_backlog:
            if s.throttled:
                s.throttled = False
                reader.resume_reading()
                if reader.on_data is not None:
                    reader.on_data()
            return
        s.last_heard = loop.time()  # our slowness, not the peer's silence
        if not s.throttled:
            s.throttled = True
            reader.pause_reading()
        loop.call_later(THROTTLE_S, self._throttle, s, conn, reader)

    def _flush(self, s: Session) -> None:
        """Write what `send` queued for the session, if it has a connection (on the loop);
        each DATA frame carries our acknowledgement."""
        with self._lock:
            s.flushing = False
            conn = s.conn
            if conn is None or s.ended:
                return
            packets = list(s.unwritten)
            s.unwritten.clear()
            first = s.acked + len(s.unacked) + 1
            s.unacked.extend(packets)
        if conn.writer.is_closing():
            return  # (the packets stay unacknowledged: the next connection writes them)
        for n, data in enumerate(packets):
            write_frame(conn.writer, OP_DATA, DATA_HEAD.pack(first + n, s.received), data)
        if packets:
            s.told, s.owed_bytes = s.received, 0

    async def _heartbeat(self) -> None:
        """ACK on every connection at least every heartbeat (the peers' liveness)."""
        while True:
            with self._lock:
                sessions = list(self._sessions.values())
            await asyncio.sleep(min([self.limits.peer_timeout / HEARTBEATS,
                                     *(s.heartbeat for s in sessions)]))
            for s in sessions:
                self._send_ack(s)


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
async def read_frame(reader: TlsStream, max_packet: int
                     ) -> tuple[int, bytes, bytes]:
    """The next frame's (op, head, body): a DATA frame's head is its seq and ack, an ACK's
    its acknowledgement (its body is empty), other frames have none. WireError for a bad
    header, an unknown op, descriptors, or a body larger (or of another size) than its op
    allows; EOFError at the end of the stream."""
    op, length, nfds = wire.unpack_header(await reader.readexactly(wire.HEADER_SIZE))
    head_size = _frame_head(op, length, nfds, max_packet)
    head = await reader.readexactly(head_size) if head_size else b""
    body_size = length - head_size
    return op, head, (await reader.readexactly(body_size) if body_size else b"")


def take_frame(reader: TlsStream, max_packet: int
               ) -> tuple[int, bytes, bytes | memoryview] | None:
    """read_frame's frame if `reader` holds all of it now (None if not yet: the reader
    reads on until it does); the same errors. A large body may come as a read-only view
    of the buffer it was read into (tlsstream's `take_view`: not copied)."""
    reader.need(wire.HEADER_SIZE)
    if reader.buffered < wire.HEADER_SIZE:
        return None
    op, length, nfds = wire.unpack_header(reader.peek(wire.HEADER_SIZE))
    head_size = _frame_head(op, length, nfds, max_packet)
    reader.need(wire.HEADER_SIZE + length)
    if reader.buffered < wire.HEADER_SIZE + length:
        return None
    reader.take(wire.HEADER_SIZE)
    head = reader.take(head_size) if head_size else b""
    return op, head, (reader.take_view(length - head_size) if length > head_size else b"")


def _frame_head(op: int, length: int, nfds: int, max_packet: int) -> int:
    """The size of the head of a frame with this header; WireError if no frame of a link
    has it."""
    if op not in _OPS:
        raise WireError(f"unknown op {op}")
    if nfds:
        raise WireError("descriptors cannot cross hosts")
    head_size = _HEAD_SIZE.get(op, 0)
    limit = max_packet + DATA_HEAD.size if op == OP_DATA else _BODY_MAX.get(op, CONTROL_MAX)
    if length > limit or length < head_size:
        raise WireError(f"a {length}-byte body does not fit op {op} (at most {limit})")
    return head_size


def write_frame(writer: TlsStream, op: int, head: bytes, body: bytes | bytearray = b"") -> None:
    """Queue one frame of `head` then `body` on `writer` (on its loop)."""
    header = wire.pack_header(op, len(head) + len(body), 0) + head
    if len(body) <= _JOIN_MAX:
        writer.write(header + body)
    else:  # no copy of a large body
        writer.write(header)
        writer.write(body)


def _check_hello(peer: str, values: list[Any]) -> tuple[bytes, bytes, int, int]:
    """A HELLO's (incarnation, session, received, peer_timeout ms); LinkRefused for
    another version, WireError for anything else that is not a HELLO."""
    if values and type(values[0]) is int and values[0] != LINK_VERSION:
        raise LinkRefused(f"{peer!r} speaks link version {values[0]}, not {LINK_VERSION}")
    wire.check(values, (int, bytes, bytes, int, int), "HELLO")
    if values[2] == b"":  # no session yet
        _check_ids(peer, values[1], bytes(SESSION_SIZE), values[3], values[4])
        return values[1], b"", values[3], values[4]
    return _check_ids(peer, *values[1:])


def _check_ids(peer: str, incarnation: bytes, token: bytes, received: int,
               timeout_ms: int) -> tuple[bytes, bytes, int, int]:
    """The handshake's values, checked (WireError if one is out of range)."""
    if len(incarnation) != INCARNATION_SIZE or len(token) != SESSION_SIZE:
        raise WireError(f"{peer!r} sent an incarnation or session id of the wrong size")
    if not 0 <= received < 1 << 64 or not 0 < timeout_ms <= TIMEOUT_MS_MAX:
        raise WireError(f"{peer!r} sent a packet count or timeout out of range")
    return incarnation, token, received, timeout_ms


def _why_new(old: Session, incarnation: bytes) -> str:
    """Why a peer's new session ends the old one."""
    return "it restarted" if incarnation != old.incarnation else "it began a new session"


def _where(writer: TlsStream) -> str:
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
