"""The network over TCP with mutual TLS (net/tcp.py, net/cluster.py), and machd hosts in a
cluster.

- Transports alone: hosts link (also when they dial each other at once, or one comes
  back as a new incarnation), carry packets whole and in order, and see a host that
  leaves or falls silent go down.
- Who may join: a peer whose certificate another CA signed, one with no certificate,
  one that presents the listener's own name, and plain TCP garbage are refused and
  logged; handshakes beyond the limit are refused at once; the linked hosts go on.
- A host of the cluster that sends garbage (a bad header, an oversized frame, an
  unknown op, descriptors, a frame out of turn, a packet that is not a layout) has its
  link closed, logged; the other hosts go on.
- The same netmsgserver code as over the in-process network (test_net_transport.py)
  carries RPCs, rights, out-of-line memory and names between embedded kernels over TCP.
- machd: two hosts on loopback addresses, and two in network namespaces joined by a veth
  pair: a native task on A looks up a name a task on B checked in, calls it with
  msg_rpc, and gets NOTIFY_PORT_DELETED when B's port dies.
- The command line: `pymach cluster init`, machd's cluster options.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import pymach as m
from nativeutil import uffd_or_skip
from pymach.include import wire
from pymach.machd.machd import start_daemon, stop_daemon
from pymach.net import netmsgserver
from pymach.net import packets as pk
from pymach.net.cluster import Credentials, cluster_init, tls_contexts
from pymach.net.station import Host
from pymach.net.tcp import (
    DATA_HEAD,
    LINK_VERSION,
    OP_ACK,
    OP_DATA,
    OP_HELLO,
    OP_WELCOME,
    TcpLimits,
    TcpTransport,
    tcp_config,
)
from pymach.net.transport import PacketSink
from test_net_transport import EXPECTED, client, echo_server

WAIT_S = 10.0
LOOPBACK = "127.0.0.1"

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None,
                                reason="making cluster certificates needs the openssl command")


# -- fixtures and helpers -----------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A cluster directory with hosts A, B, C and D."""
    d = str(tmp_path_factory.mktemp("cluster"))
    cluster_init(d, ["A", "B", "C", "D"])
    return d


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Another cluster (another CA) with hosts named B and C."""
    d = str(tmp_path_factory.mktemp("stranger"))
    cluster_init(d, ["B", "C"])
    return d


class Recorder(PacketSink):
    """A sink that remembers every event, in order."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[str, str, bytes]] = []

    def packet(self, source: str, data: bytes) -> None:
        with self.lock:
            self.events.append(("packet", source, data))

    def host_up(self, host: str) -> None:
        with self.lock:
            self.events.append(("up", host, b""))

    def host_down(self, host: str) -> None:
        with self.lock:
            self.events.append(("down", host, b""))

    def seen(self, kind: str, host: str) -> int:
        with self.lock:
            return sum(1 for k, h, _ in self.events if (k, h) == (kind, host))

    def packets(self, source: str) -> list[bytes]:
        with self.lock:
            return [d for k, h, d in self.events if (k, h) == ("packet", source)]


def wait_until(cond: Callable[[], bool], what: str, seconds: float = WAIT_S) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


_PORTS = random.Random()  # (its own generator: tests that seed `random` do not repeat it)


def _ephemeral() -> range:
    """The kernel's range of ports for outgoing connections (Linux's default if unknown)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        return range(low, high + 1)
    except (OSError, ValueError):
        return range(32768, 61000)


def free_port() -> int:
    """A loopback port free now, picked outside the kernel's ephemeral range: between
    the pick and the bind of the test's listener, no connection the kernel makes
    meanwhile (another test's, a host dialing) can take it as its own source port (a
    port the kernel picked could be, and was once: EADDRINUSE in CI)."""
    ephemeral = _ephemeral()
    for _ in range(200):
        port = _PORTS.randrange(10_000, 65_000)
        if port in ephemeral:
            continue
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind((LOOPBACK, port))
            return port
    with socket.socket() as s:  # (a machine whose ephemeral range covers them all)
        s.bind((LOOPBACK, 0))
        chosen: int = s.getsockname()[1]
        return chosen


@contextlib.contextmanager
def transports(directory: str, *specs: tuple[str, bool, list[str]],
               limits: TcpLimits | None = None) -> Iterator[dict[str, tuple[TcpTransport,
                                                                             Recorder]]]:
    """Started transports: (name, listens, names it dials) each, on loopback ports."""
    ports = {name: free_port() for name, _, _ in specs}
    out: dict[str, tuple[TcpTransport, Recorder]] = {}
    try:
        for name, listens, dials in specs:
            config = tcp_config(directory, name, (LOOPBACK, ports[name]) if listens else None,
                                tuple((LOOPBACK, ports[p]) for p in dials), limits)
            t, r = TcpTransport(config), Recorder()
            t.start(r)
            out[name] = (t, r)
        yield out
    finally:
        for t, _ in out.values():
            t.close()


def linked(ts: dict[str, tuple[TcpTransport, Recorder]], a: str, b: str) -> None:
    wait_until(lambda: b in ts[a][0].peers() and a in ts[b][0].peers(), f"{a} and {b} linked")


def tls_client(directory: str | None, host: str, port: int,
               verify: bool = True) -> ssl.SSLSocket:
    """A blocking TLS connection to a listener, with `host`'s certificate from
    `directory` (None: no certificate), checking the listener's unless not `verify`."""
    if directory is not None and verify:
        _, ctx = tls_contexts(Credentials(directory, host))
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        if directory is not None:
            creds = Credentials(directory, host)
            ctx.load_cert_chain(creds.cert, creds.key)
    sock = ctx.wrap_socket(socket.create_connection((LOOPBACK, port), timeout=WAIT_S))
    return sock


@contextlib.contextmanager
def raw_host(directory: str, transport: TcpTransport, name: str = "C"
             ) -> Iterator[ssl.SSLSocket]:
    """Host `name` of the cluster, driven by hand: linked to `transport` (it said HELLO
    and was welcomed), whatever it sends next."""
    assert transport.address is not None
    with tls_client(directory, name, transport.address[1]) as c:
        c.sendall(hello())
        wait_until(lambda: name in transport.peers(), f"{name} linked")
        yield c


def frame(op: int, body: bytes, nfds: int = 0) -> bytes:
    return wire.pack_header(op, len(body), nfds) + body


def hello() -> bytes:
    """A HELLO beginning a new session (no session id, nothing received)."""
    return frame(OP_HELLO, wire.encode([LINK_VERSION, os.urandom(16), b"", 0, 5000]))


def data(seq: int, packet: bytes, ack: int = 0) -> bytes:
    """A DATA frame: packet number `seq` of its session, acknowledging `ack` of ours."""
    return frame(OP_DATA, DATA_HEAD.pack(seq, ack) + packet)


def closed_by_peer(sock: ssl.SSLSocket | socket.socket) -> bool:
    """True once the other end closes (whatever it sent before is read and dropped)."""
    deadline = time.monotonic() + WAIT_S
    sock.settimeout(WAIT_S)
    with contextlib.suppress(OSError):
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
        return False
    return True


# -- transports alone -----------------------------------------------------------------------
def test_hosts_link_and_carry_packets_whole_and_in_order(cluster: str) -> None:
    with transports(cluster, ("A", True, []), ("B", False, ["A"])) as ts:
        linked(ts, "A", "B")
        (a, ra), (b, rb) = ts["A"], ts["B"]
        sent = [os.urandom(n % 300) + n.to_bytes(4, "big") for n in range(500)]
        sent.append(os.urandom(3 << 20))  # a large packet goes whole too
        assert all(b.send("A", d) for d in sent)
        assert a.send("B", b"back")
        wait_until(lambda: len(ra.packets("B")) == len(sent), "every packet")
        assert ra.packets("B") == sent
        wait_until(lambda: rb.packets("A") == [b"back"], "the answer")
        assert not a.send("nobody", b"x")  # no such host: known undeliverable
        b.close()
        wait_until(lambda: ra.seen("down", "B") == 1, "A to see B go")
        assert not b.send("A", b"x")  # closed
    assert ra.events[0] == ("up", "B", b"") and rb.events[0] == ("up", "A", b"")


def test_hosts_that_dial_each_other_at_once_make_one_link(cluster: str) -> None:
    for _ in range(3):
        with transports(cluster, ("A", True, ["B", "C"]), ("B", True, ["A", "C"]),
                        ("C", True, ["A", "B"])) as ts:
            for x, y in (("A", "B"), ("A", "C"), ("B", "C")):
                linked(ts, x, y)
            time.sleep(0.2)  # a second link, had one been made, would have replaced one
            for name, (t, r) in ts.items():
                assert t.send(min({"A", "B", "C"} - {name}), name.encode())
                assert not any(kind == "down" for kind, _, _ in r.events), r.events
            wait_until(lambda: ts["A"][1].packets("B") == [b"B"], "B's packet")


def test_a_host_that_comes_back_is_down_then_up(cluster: str) -> None:
    with transports(cluster, ("A", True, [])) as ts:
        a, ra = ts["A"]
        assert a.address is not None
        with tls_client(cluster, "B", a.address[1]) as old:  # B, whose link lingers ...
            old.sendall(hello())
            wait_until(lambda: ra.seen("up", "B") == 1, "the first B")
            again = TcpTransport(tcp_config(cluster, "B", None, (a.address,)))
            again.start(Recorder())  # ... when B, restarted, dials again
            try:
                wait_until(lambda: ra.seen("up", "B") == 2, "the new B")
                assert [k for k, h, _ in ra.events if h == "B"] == ["up", "down", "up"]
                assert closed_by_peer(old)
                wait_until(lambda: again.peers() == ["A"], "the new B to be welcomed")
                assert again.send("A", b"new")
                wait_until(lambda: ra.packets("B") == [b"new"], "the new B's packet")
            finally:
                again.close()


def test_a_silent_host_is_down_within_the_timeout(cluster: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pymach.net")
    limits = TcpLimits(peer_timeout=0.4)
    with transports(cluster, ("A", True, []), limits=limits) as ts:
        a, ra = ts["A"]
        with raw_host(cluster, a) as c:  # says hello, then nothing
            wait_until(lambda: ra.seen("up", "C") == 1, "C up")
            t0 = time.monotonic()
            wait_until(lambda: ra.seen("down", "C") == 1, "C down", 5.0)
            assert time.monotonic() - t0 < 5.0
            assert closed_by_peer(c)
    assert any("silent" in r.getMessage() for r in caplog.records)


# -- who may join ------------------------------------------------------------------------------
def test_a_certificate_of_another_cluster_is_refused(cluster: str, stranger: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pymach.net")
    with transports(cluster, ("A", True, []), ("D", False, ["A"])) as ts:
        linked(ts, "A", "D")
        a, ra = ts["A"]
        assert a.address is not None
        intruder = TcpTransport(tcp_config(stranger, "B", None, (a.address,)))
        ri = Recorder()
        intruder.start(ri)  # it does not trust A either: it gives up in the handshake
        try:
            wait_until(lambda: a.refused >= 2, "two attempts")
        finally:
            intruder.close()
        with contextlib.suppress(OSError), tls_client(stranger, "C", a.address[1],
                                                      verify=False) as c:
            c.sendall(hello())  # one that does not check A's certificate: A refuses it
            assert closed_by_peer(c)
        wait_until(lambda: a.refused >= 3, "A to refuse the stranger's certificate")
        assert ra.seen("up", "B") == ra.seen("up", "C") == 0 and ri.events == []
        assert ts["D"][0].send("A", b"still here")
        wait_until(lambda: ra.packets("D") == [b"still here"], "D goes on")
    logged = [r.getMessage() for r in caplog.records]
    assert any("tcp B: cannot link" in t and "CERTIFICATE_VERIFY_FAILED" in t for t in logged)
    assert any("tcp A: refused a connection" in t and "CERTIFICATE_VERIFY_FAILED" in t
               for t in logged), logged


@pytest.mark.parametrize("how", ["no certificate", "our own name", "plain garbage",
                                 "nothing at all"])
def test_peers_that_are_not_hosts_of_the_cluster_are_refused(
        cluster: str, how: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pymach.net")
    limits = TcpLimits(handshake_timeout=0.5)
    with transports(cluster, ("A", True, []), ("B", False, ["A"]), limits=limits) as ts:
        linked(ts, "A", "B")
        a, ra = ts["A"]
        assert a.address is not None
        port = a.address[1]
        if how == "plain garbage":
            with socket.create_connection((LOOPBACK, port)) as s:
                s.sendall(os.urandom(4096))
                assert closed_by_peer(s)
        elif how == "nothing at all":
            with socket.create_connection((LOOPBACK, port)) as s:
                assert closed_by_peer(s)  # after the handshake timeout
        else:
            directory, name = (None, "") if how == "no certificate" else (cluster, "A")
            with contextlib.suppress(OSError), tls_client(directory, name, port) as s:
                s.sendall(hello())
                assert closed_by_peer(s)
        wait_until(lambda: a.refused == 1, "the refusal")
        assert [h for k, h, _ in ra.events if k == "up"] == ["B"]
        assert ts["B"][0].send("A", b"ok")
        wait_until(lambda: ra.packets("B") == [b"ok"], "B goes on")
    assert any("refused a connection" in r.getMessage() for r in caplog.records)


def test_handshakes_beyond_the_limit_are_refused_at_once(cluster: str) -> None:
    limits = TcpLimits(max_pending=2, handshake_timeout=WAIT_S)
    with transports(cluster, ("A", True, []), limits=limits) as ts:
        a, _ = ts["A"]
        assert a.address is not None
        with contextlib.ExitStack() as stack:
            socks = [stack.enter_context(socket.create_connection((LOOPBACK, a.address[1])))
                     for _ in range(4)]
            wait_until(lambda: a.refused == 2, "two refusals")
            assert closed_by_peer(socks[2]) and closed_by_peer(socks[3])
            socks[0].settimeout(0.2)
            with pytest.raises(TimeoutError):  # the first two still have their handshake
                socks[0].recv(1)


class SlowHost(Recorder):
    """A sink whose host takes nothing while `full` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.full = True

    def backlog(self) -> int:
        return 1 << 40 if self.full else 0


def test_a_host_with_a_backlog_stops_reading_and_loses_nothing(cluster: str) -> None:
    ports = free_port(), free_port()
    a = TcpTransport(tcp_config(cluster, "A", (LOOPBACK, ports[0]),
                                limits=TcpLimits(peer_timeout=0.4)))
    b = TcpTransport(tcp_config(cluster, "B", None, ((LOOPBACK, ports[0]),)))
    ra, rb = SlowHost(), Recorder()
    try:
        a.start(ra)
        b.start(rb)
        wait_until(lambda: a.peers() == ["B"] and b.peers() == ["A"], "the link")
        sent = [n.to_bytes(4, "big") * 256 for n in range(200)]
        assert all(b.send("A", d) for d in sent)
        time.sleep(1.0)  # longer than the peer timeout: a slow host is not a silent peer
        assert ra.packets("B") == sent[:1]  # it read one packet, then stopped
        ra.full = False
        wait_until(lambda: len(ra.packets("B")) == len(sent), "the rest")
        assert ra.packets("B") == sent and ra.seen("down", "B") == 0
    finally:
        a.close()
        b.close()


# -- garbage from a host of the cluster -----------------------------------------------------------
GARBAGE: dict[str, bytes] = {
    "bad magic": b"XXXX" + data(1, b"abc")[4:],
    "bad version": wire.HEADER.pack(wire.MAGIC, 99, OP_DATA, 0, 0),
    "oversized": wire.HEADER.pack(wire.MAGIC, wire.VERSION, OP_DATA, 1 << 30, 0),
    "over the packet limit": wire.pack_header(OP_DATA, (1 << 20) + 17, 0) + b"x" * 100,
    "unknown op": frame(7, b""),
    "descriptors": frame(OP_DATA, DATA_HEAD.pack(1, 0), nfds=1),
    "a data frame without its numbers": frame(OP_DATA, b"1234"),
    "welcome out of turn": frame(OP_WELCOME, wire.encode([os.urandom(16)])),
    "hello out of turn": hello(),
    "a packet out of sequence": data(2, b"x"),
    "a packet replayed": data(1, b"x") + data(1, b"x"),
    "an acknowledgement of packets not sent": frame(OP_ACK, (5).to_bytes(8, "big")),
    "data acknowledging packets not sent": data(1, b"x", ack=1),
    "random bytes": os.urandom(64),
}


@pytest.mark.parametrize("garbage", list(GARBAGE), ids=list(GARBAGE))
def test_a_host_that_sends_garbage_is_disconnected_and_the_others_go_on(
        cluster: str, garbage: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pymach.net")
    limits = TcpLimits(max_packet=1 << 20)
    with transports(cluster, ("A", True, []), ("B", False, ["A"]), limits=limits) as ts:
        linked(ts, "A", "B")
        a, ra = ts["A"]
        with raw_host(cluster, a) as c:
            c.sendall(GARBAGE[garbage])
            assert closed_by_peer(c)
        wait_until(lambda: ra.seen("down", "C") == 1, "C down")
        assert ra.packets("C") == ([b"x"] if garbage == "a packet replayed" else [])  # once
        assert ts["B"][0].send("A", b"ok") and a.send("B", b"ok")
        wait_until(lambda: ra.packets("B") == [b"ok"] == ts["B"][1].packets("A"), "B goes on")
    assert a.dropped == 1
    assert any("broke the protocol" in r.getMessage() for r in caplog.records)


# -- the netmsgserver over TCP ------------------------------------------------------------------
@contextlib.contextmanager
def tcp_hosts(directory: str, *names: str) -> Iterator[dict[str, Host]]:
    """Embedded hosts, each with its netmsgserver over TCP; the first listens and the
    others dial it and each other."""
    ports = {n: free_port() for n in names}
    hosts: dict[str, Host] = {}
    try:
        for n in names:
            peers = tuple((LOOPBACK, ports[p]) for p in names if p < n)
            hosts[n] = Host(TcpTransport(tcp_config(directory, n, (LOOPBACK, ports[n]),
                                                    peers)))
        yield hosts
    finally:
        for h in hosts.values():
            h.shutdown()


def big_server(name: str) -> int:
    """Check in `name`; answer one request carrying out-of-line memory, reversed."""
    me = m.task_self()
    port = m.port_allocate(me)
    from pymach.net.netname import netname_check_in

    netname_check_in(m.task_get_special_port(me, m.TASK_BOOTSTRAP_PORT), name, port)
    msg = m.msg_receive(port)
    data = m.take_ool(msg.items[0])  # type: ignore[arg-type]
    m.msg_send(m.Message(remote_port=msg.remote_port, items=[m.OOL(data=data[::-1])]))
    return len(data)


def big_client(name: str, size: int) -> bool:
    from pymach.net.netname import netname_wait

    data = os.urandom(size)
    reply = m.msg_rpc(m.Message(remote_port=netname_wait(name, WAIT_S * 1000),
                                local_port=m.thread_reply(), items=[m.OOL(data=data)]))
    return m.take_ool(reply.items[0]) == data[::-1]  # type: ignore[arg-type]


def test_rpc_rights_and_memory_cross_tcp(cluster: str) -> None:
    with tcp_hosts(cluster, "A", "B", "C") as hosts:
        hosts["A"].start(echo_server, "echo", 1, name="server")
        assert hosts["B"].start(client, "echo", name="client").wait(WAIT_S * 1000) == EXPECTED
        hosts["C"].start(big_server, "big", name="server")
        assert hosts["A"].start(big_client, "big", 2 << 20,
                                name="client").wait(WAIT_S * 1000) is True
        assert all(h.server.bad_packets == 0 for h in hosts.values())


def test_a_bad_packet_disconnects_its_host_and_the_others_go_on(
        cluster: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pymach.net")
    with tcp_hosts(cluster, "A", "B") as hosts:
        a = hosts["A"]
        transport = a.transport
        assert isinstance(transport, TcpTransport)
        with raw_host(cluster, transport) as c:
            c.sendall(data(1, wire.encode([pk.K_DEAD, b"short id"])))
            assert closed_by_peer(c)
        wait_until(lambda: a.server.bad_packets == 1 and "C" not in transport.peers(),
                   "the refusal")
        a.start(echo_server, "echo", 1, name="server")
        assert hosts["B"].start(client, "echo", name="client").wait(WAIT_S * 1000) == EXPECTED
    assert any("refused a packet from 'C'" in r.getMessage() for r in caplog.records)


def _flood(name: str, count: int) -> Any:
    """Send `count` one-way messages to `name`, then a request; its reply's first value."""
    from pymach.net.netname import netname_wait

    port = netname_wait(name, WAIT_S * 1000)
    for n in range(count):
        m.msg_send(m.Message(remote_port=port, id=n))
    reply = m.msg_rpc(m.Message(remote_port=port, local_port=m.thread_reply(), id=99))
    return reply.items[0].value  # type: ignore[union-attr]


def _check_in(names: list[str], codes: list[str], done: threading.Event) -> None:
    """Check each name in, recording the error code of each (or "ok"); keep the port
    alive until `done`."""
    from pymach.net.netname import netname_check_in

    me = m.task_self()
    port = m.port_allocate(me)
    for name in names:
        try:
            netname_check_in(m.task_get_special_port(me, m.TASK_BOOTSTRAP_PORT), name, port)
            codes.append("ok")
        except m.MachError as e:
            codes.append(e.code)
    assert done.wait(WAIT_S)


def test_the_network_cannot_fill_a_port(cluster: str, monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pymach.net")
    # (below the port's backlog, PORT_BACKLOG_DEFAULT 5: a port full to its backlog
    # makes its host hold the senders' host back (CHOKE), and whether the flood's
    # messages were all on their way before that is a race)
    monkeypatch.setattr(netmsgserver, "NET_QUEUE_MAX", 3)
    done = threading.Event()
    with tcp_hosts(cluster, "A", "B") as hosts:
        sitter = hosts["A"].start(_check_in, ["full"], [], done, name="sitter")  # no receive
        code = hosts["B"].start(_flood, "full", 8, name="flood").wait(WAIT_S * 1000)
        assert code == m.MachError("SEND_TIMED_OUT").value
        done.set()
        sitter.wait(WAIT_S * 1000)
    refused = [r for r in caplog.records if "its port holds 3 messages" in r.getMessage()]
    assert len(refused) == 6  # 5 one-way messages and the request


def test_the_name_registry_is_bounded(cluster: str, monkeypatch: pytest.MonkeyPatch,
                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pymach.net")
    monkeypatch.setattr(netmsgserver, "MAX_NAMES", 3)
    done = threading.Event()

    def check_in(host: Host, names: list[str]) -> list[str]:
        codes: list[str] = []
        host.start(_check_in, names, codes, done, name="names")
        wait_until(lambda: len(codes) == len(names), f"check-ins of {names}")
        return codes

    with tcp_hosts(cluster, "A", "B") as hosts:
        a, b = hosts["A"], hosts["B"]
        try:
            assert check_in(a, ["x", "y"]) == ["ok", "ok"]
            wait_until(lambda: len(b.server.names) == 2, "B's replica")
            assert check_in(b, ["z", "w"]) == ["ok", "KERN_RESOURCE_SHORTAGE"]
            wait_until(lambda: len(a.server.names) == 3, "A's replica")
            assert check_in(a, ["x", "v"]) == ["ok", "KERN_RESOURCE_SHORTAGE"]
            assert check_in(b, ["y"]) == ["ok"]  # a name it has can change
        finally:
            done.set()
    assert not any("refused name" in r.getMessage() for r in caplog.records)


def test_names_beyond_the_bound_from_a_peer_are_refused(
        cluster: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pymach.net")
    monkeypatch.setattr(netmsgserver, "MAX_NAMES", 3)
    with tcp_hosts(cluster, "A") as hosts:
        a = hosts["A"]
        transport = a.transport
        assert isinstance(transport, TcpTransport)
        with raw_host(cluster, transport) as c:
            ref = ("C", os.urandom(pk.NET_ID_SIZE))
            for n in range(5):
                c.sendall(data(n + 1, pk.encode_packet(pk.NamePacket(f"n{n}", ref))))
            wait_until(lambda: sum("refused name" in r.getMessage()
                                   for r in caplog.records) == 2, "two refusals")
            assert sorted(a.server.names) == ["n0", "n1", "n2"]
        wait_until(lambda: not a.server.names, "C's names to go with it")


def _hold(name: str, ready: threading.Event, go: threading.Event) -> str:
    """Hold a proxy for `name`; after `go`, wait for its NOTIFY_PORT_DELETED."""
    from pymach.net.netname import netname_wait

    port = netname_wait(name, WAIT_S * 1000)
    ready.set()
    assert go.wait(WAIT_S)
    while True:
        note = m.msg_receive(m.task_notify(), m.RCV_TIMEOUT, WAIT_S * 1000)
        if note.id == m.NOTIFY_PORT_DELETED and note.items[0].value == port:  # type: ignore
            break
    try:
        m.msg_send(m.Message(remote_port=port), m.SEND_TIMEOUT, 0)
    except m.MachError as e:
        return e.code
    return "still alive"


@pytest.mark.parametrize("how", ["the port dies", "its host leaves"])
def test_port_death_on_one_host_reaches_holders_on_another(cluster: str, how: str) -> None:
    ready, go = threading.Event(), threading.Event()
    with tcp_hosts(cluster, "A", "B") as hosts:
        server = hosts["A"].start(echo_server, "gone", 1, name="server")
        holder = hosts["B"].start(_hold, "gone", ready, go, name="holder")
        assert ready.wait(WAIT_S)
        if how == "the port dies":
            with hosts["A"].kernel.sched.lock:
                server.task.terminate()
        else:
            hosts["A"].transport.close()
        go.set()
        assert holder.wait(WAIT_S * 1000) == "SEND_INVALID_PORT"
        wait_until(lambda: "gone" not in hosts["B"].server.names, "B to drop the name")


# -- machd hosts -----------------------------------------------------------------------------------
SERVER = """
import sys
import pymach as m
from pymach.net.netname import netname_check_in

me = m.task_self()
port = m.port_allocate(me)
netname_check_in(m.task_get_special_port(me, m.TASK_BOOTSTRAP_PORT), sys.argv[1], port)
msg = m.msg_receive(port)
data = m.take_ool(msg.items[1])
m.msg_send(m.Message(remote_port=msg.items[2].value, id=9, items=[m.Str("via a sent right")]))
m.msg_send(m.Message(remote_port=msg.remote_port, id=msg.id + 100,
                     items=[m.Int(2 * msg.items[0].value), m.OOL(data=data[::-1])]))
print("served", len(data), flush=True)
"""  # it then exits: its port dies

CLIENT = """
import json, os, sys
import pymach as m
from pymach.net.netname import netname_wait

me = m.task_self()
port = netname_wait(sys.argv[1], 20_000)
mine = m.port_allocate(me)
data = os.urandom(300_000)
reply = m.msg_rpc(m.Message(remote_port=port, local_port=m.thread_reply(), id=500,
                            items=[m.Int(21), m.OOL(data=data), m.Port(mine, m.MAKE_SEND)]))
via = m.msg_receive(mine, m.RCV_TIMEOUT, 20_000)
while True:
    note = m.msg_receive(m.task_notify(), m.RCV_TIMEOUT, 20_000)
    if note.id == m.NOTIFY_PORT_DELETED and note.items[0].value == port:
        break
try:
    m.msg_send(m.Message(remote_port=port), m.SEND_TIMEOUT, 0)
    after = "still alive"
except m.MachError as e:
    after = e.code
print(json.dumps([reply.id, reply.items[0].value, m.take_ool(reply.items[1]) == data[::-1],
                  via.items[0].value, after]))
"""


def exec_task(socket_path: str, script: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "pymach.cli.main", "exec", "--socket",
                             socket_path, str(script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def cross_host_rpc(sock_a: str, sock_b: str, tmp: Path) -> None:
    """A task on B checks a name in; a task on A calls it; B's port death reaches A."""
    (tmp / "server.py").write_text(textwrap.dedent(SERVER))
    (tmp / "client.py").write_text(textwrap.dedent(CLIENT))
    server = exec_task(sock_b, tmp / "server.py", "double")
    caller = exec_task(sock_a, tmp / "client.py", "double")
    try:
        out, err = caller.communicate(timeout=60)
        assert caller.returncode == 0, err
        assert json.loads(out) == [600, 42, True, "via a sent right", "SEND_INVALID_PORT"]
        out, err = server.communicate(timeout=20)
        assert server.returncode == 0 and out == "served 300000\n", err
    finally:
        for p in (server, caller):
            if p.poll() is None:
                p.kill()
                p.wait()


@contextlib.contextmanager
def machd_hosts(tmp: Path, cluster: str, a_listen: str, b_listen: str,
                prefixes: tuple[list[str], list[str]] = ([], [])) -> Iterator[tuple[str, str]]:
    """machd A listening at `a_listen`, machd B listening at `b_listen` and dialing A."""
    uffd_or_skip()
    socks = str(tmp / "a" / "machd.sock"), str(tmp / "b" / "machd.sock")
    common = ["--memory", "256M", "--cluster", cluster, "--peer-timeout", "3"]
    daemons = []
    try:
        daemons.append(start_daemon(socks[0], *common, "--host-name", "A", "--listen",
                                    a_listen, prefix=prefixes[0]))
        daemons.append(start_daemon(socks[1], *common, "--host-name", "B", "--listen",
                                    b_listen, "--peer", a_listen, prefix=prefixes[1]))
        yield socks
    finally:
        for d in daemons:
            stop_daemon(d)


@pytest.mark.slow
def test_two_machd_hosts_on_loopback(cluster: str, tmp_path: Path) -> None:
    a, b = f"{LOOPBACK}:{free_port()}", f"{LOOPBACK}:{free_port()}"
    with machd_hosts(tmp_path, cluster, a, b) as (sock_a, sock_b):
        cross_host_rpc(sock_a, sock_b, tmp_path)


@contextlib.contextmanager
def veth_namespaces() -> Iterator[tuple[str, str, str, str]]:
    """Two network namespaces joined by a veth pair: (ns A, ns B, address A, address B);
    deleted afterwards. Skipped where they cannot be made."""
    if shutil.which("ip") is None:
        pytest.skip("the ip command (iproute2) is missing: cannot make network namespaces")
    tag = f"{os.getpid() % 100000}"
    ns_a, ns_b, veth_a, veth_b = f"pmA{tag}", f"pmB{tag}", f"pmvA{tag}", f"pmvB{tag}"
    addr_a, addr_b = "10.201.0.1", "10.201.0.2"

    def ip(*args: str) -> None:
        r = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")

    made: list[str] = []
    try:
        try:
            for ns in (ns_a, ns_b):
                ip("netns", "add", ns)
                made.append(ns)
        except RuntimeError as e:
            if os.environ.get("CI"):
                raise
            pytest.skip(f"cannot make network namespaces here: {e}")
        ip("link", "add", veth_a, "type", "veth", "peer", "name", veth_b)
        for ns, veth, addr in ((ns_a, veth_a, addr_a), (ns_b, veth_b, addr_b)):
            ip("link", "set", veth, "netns", ns)
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", veth)
            ip("-n", ns, "link", "set", veth, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield ns_a, ns_b, addr_a, addr_b
    finally:
        for ns in made:  # deleting a namespace deletes its end of the veth pair, and so both
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


@pytest.mark.slow
def test_two_machd_hosts_in_network_namespaces(cluster: str, tmp_path: Path) -> None:
    with veth_namespaces() as (ns_a, ns_b, addr_a, addr_b):
        prefixes = (["ip", "netns", "exec", ns_a], ["ip", "netns", "exec", ns_b])
        with machd_hosts(tmp_path, cluster, f"{addr_a}:7391", f"{addr_b}:7391",
                         prefixes) as (sock_a, sock_b):
            cross_host_rpc(sock_a, sock_b, tmp_path)


# -- the command line ----------------------------------------------------------------------------
def pymach_cmd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pymach.cli.main", *args],
                          capture_output=True, text=True, timeout=60, check=False)


def test_cluster_init_makes_private_keys_and_keeps_what_exists(tmp_path: Path) -> None:
    d = tmp_path / "c"
    r = pymach_cmd("cluster", "init", str(d), "A", "B")
    assert r.returncode == 0, r.stderr
    names = {"ca.crt", "ca.key", "A.crt", "A.key", "B.crt", "B.key"}
    assert {p.name for p in d.iterdir()} == names
    assert d.stat().st_mode & 0o777 == 0o700
    for key in ("ca.key", "A.key", "B.key"):
        assert (d / key).stat().st_mode & 0o777 == 0o600
    before = (d / "A.key").read_bytes()
    r = pymach_cmd("cluster", "init", str(d), "A", "C")
    assert r.returncode == 0 and "kept A" in r.stdout
    assert (d / "A.key").read_bytes() == before and (d / "C.crt").exists()
    tls_contexts(Credentials(str(d), "C"))  # the same CA signed it
    r = pymach_cmd("cluster", "init", str(d), "../evil")
    assert r.returncode == 1 and "cannot name a host" in r.stderr


@pytest.mark.parametrize(("options", "message"), [
    (["--listen", "127.0.0.1:1"], "give its credentials with --cluster"),
    (["--peer", "127.0.0.1:1"], "give its credentials with --cluster"),
    (["--cluster", "DIR"], "--cluster needs --listen"),
    (["--cluster", "DIR", "--host-name", "Z", "--listen", "127.0.0.1:0"], "Z.crt is missing"),
    (["--cluster", "DIR", "--host-name", "B", "--listen", "x"], "is not ADDR:PORT"),
])
def test_machd_cluster_options_are_checked(cluster: str, tmp_path: Path,
                                           options: list[str], message: str) -> None:
    options = [cluster if o == "DIR" else o for o in options]
    r = pymach_cmd("machd", "--socket", str(tmp_path / "s" / "machd.sock"), *options)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "s" / "machd.sock").exists()


def test_machd_says_when_its_cluster_address_is_taken(cluster: str, tmp_path: Path) -> None:
    uffd_or_skip()
    with socket.create_server((LOOPBACK, 0)) as taken:
        port = taken.getsockname()[1]
        r = pymach_cmd("machd", "--socket", str(tmp_path / "s" / "machd.sock"), "--cluster",
                       cluster, "--host-name", "A", "--listen", f"{LOOPBACK}:{port}")
    assert r.returncode == 1, r.stderr
    assert f"cannot listen for hosts at {LOOPBACK}:{port}" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "s" / "machd.sock").exists()


def test_the_help_shows_the_cluster_options() -> None:
    r = pymach_cmd("machd", "--help")
    for option in ("--cluster DIR", "--host-name NAME", "--listen ADDR:PORT",
                   "--peer ADDR:PORT", "--peer-timeout S"):
        assert option in r.stdout
    assert "(default: 5.0)" in r.stdout


@pytest.mark.slow
def test_bench_net_prints_its_figures_and_ratio() -> None:
    uffd_or_skip()
    r = subprocess.run([sys.executable, "-m", "pymach.bench.net", "--json", "-n", "30",
                        "--rounds", "2", "--trials", "2", "--peer-timeout", "1.5"],
                       capture_output=True, text=True, timeout=180, check=False)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["benchmark"] == "net" and out["round_trips_per_round"] == 30
    figures = ("null_msg_rpc_other_host_us", "embedded_msg_rpc_other_host_us",
               "tcp_round_trip_us", "tls_round_trip_us")
    assert min(out[f] for f in figures) > 0 and "loopback" in out["link"]
    assert out["ratio_msg_rpc_vs_tcp"] == pytest.approx(
        out["null_msg_rpc_other_host_us"] / out["tcp_round_trip_us"], rel=0.05, abs=0.01)
    assert out["target_ratio_msg_rpc_vs_tcp_at_most"] == 2.0
    assert out["dead_host_bound_s"] == 1.5 and len(out["dead_host_noticed_s"]) == 2
    assert 0 < min(out["dead_host_noticed_s"]) <= out["dead_host_noticed_max_s"]
    assert out["dead_host_within_bound_every_time"] == (out["dead_host_noticed_max_s"] <= 1.5)
    assert out["stream_mib"] == 64 and min(out["tcp_stream_mib_s"], out["tls_stream_mib_s"]) > 0
    assert r.stderr.count("a dead host noticed after") == 2
