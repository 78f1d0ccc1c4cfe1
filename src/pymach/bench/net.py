"""`pymach bench net`: a null msg_rpc to a port on another host vs a Python TCP round trip,
a dead host noticed, and the TCP stream bandwidth that memory across hosts is held to.

Measured in one run, over one link (loopback, 127.0.0.1: both hosts on this machine,
each its own machd process; the JSON names the link):

- `null_msg_rpc_other_host_us`: a native task of machd host A calls, with msg_rpc, a
  null server task of machd host B that it found through netname. Each call is a trap
  to machd A, a message to the proxy, A's netmsgserver, a TLS record to B, B's
  netmsgserver, the server's receive, and the same way back.
- `tcp_round_trip_us`, the baseline: a 1-byte round trip over a plain TCP connection
  (TCP_NODELAY) between two processes over the same link; `tls_round_trip_us`: the same
  over TLS 1.3 with the cluster's certificates (what the hosts' link costs by itself).
- `embedded_msg_rpc_other_host_us`: the same null msg_rpc between two embedded kernels in
  this process, each with its netmsgserver over TCP (the network path without native
  traps).

- `dead_host_noticed_s`, one figure per trial: machd host B (with a task whose port a
  task of host A holds) is killed with SIGKILL at a random moment between heartbeats,
  and the time until A's task gets NOTIFY_PORT_DELETED for that port (A reported B
  down) is measured; `dead_host_bound_s` is the hosts' configured --peer-timeout.
  Target: within the bound, every time (`dead_host_within_bound_every_time`).
- `tcp_stream_mib_s`: the bandwidth of a plain Python TCP stream between two processes
  over the same link (`stream_mib` MiB written in 1 MiB pieces until the reader has
  them all); `tls_stream_mib_s`: the same over TLS 1.3 with the cluster's certificates.
  These are the baselines of the memory-across-hosts figures (issue 11: 64 MiB out of
  line to another host, every page touched, >= 0.5x the stream), which
  bench/net_memory.py measures (it uses this module's `bench_stream`, so this module
  does not import it: `pymach bench net` adds its rows, prefixed `memory_`).

Targets (issue 11): null msg_rpc to another host at most 2x the TCP round trip
(`ratio_msg_rpc_vs_tcp`); a dead host noticed within the bound every time. Each figure
but the dead-host trials is the median of the rounds. The benchmark starts its own machd
hosts and makes a temporary cluster; it needs userfaultfd (native mode) and the openssl
command (certificates). Run it with `pymach bench net` or
`python -m pymach.bench.net [--json] [--trials N] [--peer-timeout S]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing
import os
import random
import signal
import socket
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

import pymach
from pymach import Message
from pymach.bench.ipc import STOP, median_us, time_round_trips, time_rpcs
from pymach.net.cluster import Credentials, cluster_init, tls_contexts
from pymach.net.netname import netname_check_in, netname_wait
from pymach.net.station import Host
from pymach.net.tcp import TcpTransport, tcp_config

LOOPBACK = "127.0.0.1"
NAME = "bench-net-null"
RPC_MAX = 500  # round trips per round at most (a cross-host call takes a millisecond)
DEAD_TRIALS = 5  # hosts killed
DEAD_BOUND_S = 2.0  # their --peer-timeout (machd's default is TcpLimits.peer_timeout)
STREAM_MIB = 64  # MiB per round of the stream baselines
CHUNK = 1 << 20


def run(n: int = 500, rounds: int = 5, trials: int = DEAD_TRIALS,
        peer_timeout: float = DEAD_BOUND_S) -> dict[str, Any]:
    """All figures (module docstring), the ratios and their targets."""
    n = min(n, RPC_MAX)
    with tempfile.TemporaryDirectory() as tmp:
        cluster = os.path.join(tmp, "cluster")
        cluster_init(cluster, ["A", "B"])
        native = bench_native_rpc(tmp, cluster, n, rounds)
        embedded = bench_embedded_rpc(cluster, n, rounds)
        tcp = bench_round_trip(n * 4, rounds, None)
        tls = bench_round_trip(n * 4, rounds, cluster)
        dead = bench_dead_host(tmp, cluster, trials, peer_timeout)
        streams = {f"{name}_stream_mib_s": round(bench_stream(STREAM_MIB, rounds, creds), 1)
                   for name, creds in (("tcp", None), ("tls", cluster))}
    return {**_rpc_rows(n, rounds, native, embedded, tcp, tls),
            "dead_host_bound_s": peer_timeout,
            "dead_host_noticed_s": [round(d, 3) for d in dead],
            "dead_host_noticed_max_s": round(max(dead), 3),
            "dead_host_within_bound_every_time": max(dead) <= peer_timeout,
            "stream_mib": STREAM_MIB, **streams}


def _rpc_rows(n: int, rounds: int, native: float, embedded: float, tcp: float,
              tls: float) -> dict[str, Any]:
    return {
        "benchmark": "net",
        "link": f"loopback ({LOOPBACK}): both hosts on this machine, each its own machd",
        "round_trips_per_round": n,
        "rounds": rounds,
        "null_msg_rpc_other_host_us": round(native, 1),
        "embedded_msg_rpc_other_host_us": round(embedded, 1),
        "tcp_round_trip_us": round(tcp, 1),
        "tls_round_trip_us": round(tls, 1),
        "ratio_msg_rpc_vs_tcp": round(native / tcp, 2),
        "target_ratio_msg_rpc_vs_tcp_at_most": 2.0,
        "ratio_msg_rpc_vs_tls": round(native / tls, 2),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


# -- pymach across hosts ------------------------------------------------------------------
def bench_native_rpc(tmp: str, cluster: str, n: int, rounds: int) -> float:
    """Median microseconds per null msg_rpc from a native task of machd host A to a
    native server task of machd host B."""
    from pymach.libmach.task import attach, detach
    from pymach.machd.machd import start_daemon, stop_daemon

    socks = [os.path.join(tmp, host, "machd.sock") for host in "ab"]
    a, b = f"{LOOPBACK}:{_free_port()}", f"{LOOPBACK}:{_free_port()}"
    common = ("--memory", "256M", "--cluster", cluster)
    with contextlib.ExitStack() as stack:
        for sock, options in ((socks[0], ("--host-name", "A", "--listen", a)),
                              (socks[1], ("--host-name", "B", "--listen", b, "--peer", a))):
            stack.callback(stop_daemon, start_daemon(sock, *common, *options))
        server = multiprocessing.get_context("spawn").Process(
            target=_null_server, args=(socks[1],), daemon=True)
        server.start()
        stack.callback(server.join, 20)
        attach(socks[0], name="bench-net-client")
        try:
            samples = time_rpcs(netname_wait(NAME, 20_000), n, rounds, warmup=20)
        finally:
            detach()
    return median_us(samples, n)


def _null_server(socket_path: str) -> None:
    """A native task of the host at `socket_path` that serves null requests."""
    from pymach.libmach.task import attach, detach

    attach(socket_path, name="bench-net-server")
    _serve_null()
    detach()


def _serve_null() -> None:
    """Check NAME in on this host's name service; answer null requests until STOP."""
    me = pymach.task_self()
    svc = pymach.port_allocate(me)
    netname_check_in(pymach.task_get_special_port(me, pymach.TASK_BOOTSTRAP_PORT), NAME, svc)
    msg = pymach.msg_receive(svc)
    while msg.id != STOP:
        msg = pymach.msg_send_receive(Message(remote_port=msg.remote_port, id=msg.id + 100),
                                      svc)


def bench_embedded_rpc(cluster: str, n: int, rounds: int) -> float:
    """Median microseconds per null msg_rpc between tasks of two embedded kernels in this
    process, their netmsgservers linked over TCP with TLS."""
    pa, pb = _free_port(), _free_port()
    quiet = logging.getLogger("pymach.net")  # (a host leaving at the end is no news here)
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    a = Host(TcpTransport(tcp_config(cluster, "A", (LOOPBACK, pa))))
    try:
        b = Host(TcpTransport(tcp_config(cluster, "B", (LOOPBACK, pb), ((LOOPBACK, pa),))))
        try:
            b.start(_serve_null, name="server")
            samples = a.start(_embedded_client, n, rounds, name="client").wait(600_000)
        finally:
            b.shutdown()
    finally:
        a.shutdown()
        quiet.setLevel(level)
    return median_us(samples, n)


def _embedded_client(n: int, rounds: int) -> list[float]:
    return time_rpcs(netname_wait(NAME, 20_000), n, rounds, warmup=20)


# -- a dead host noticed ------------------------------------------------------------------
def bench_dead_host(tmp: str, cluster: str, trials: int, bound: float) -> list[float]:
    """Seconds from SIGKILL of machd host B until a task of machd host A hears that B's
    port died, for each of `trials` hosts B (the hosts' --peer-timeout is `bound`)."""
    from pymach.libmach.task import attach, detach
    from pymach.machd.machd import start_daemon, stop_daemon

    socks = [os.path.join(tmp, f"dead-{host}", "machd.sock") for host in "ab"]
    a, b = f"{LOOPBACK}:{_free_port()}", f"{LOOPBACK}:{_free_port()}"
    common = ("--memory", "256M", "--cluster", cluster, "--peer-timeout", f"{bound:g}")
    delays: list[float] = []
    with contextlib.ExitStack() as stack:
        stack.callback(stop_daemon, start_daemon(socks[0], *common, "--host-name", "A",
                                                 "--listen", a))
        attach(socks[0], name="bench-net-watcher")
        stack.callback(detach)
        for trial in range(trials):
            victim = start_daemon(socks[1], *common, "--host-name", "B", "--listen", b,
                                  "--peer", a)
            try:
                delays.append(_time_death(socks[1], victim, f"{NAME}-victim-{trial}", bound))
            finally:
                stop_daemon(victim)
            print(f"bench net: a dead host noticed after {delays[-1]:.3f} s (bound "
                  f"{bound:g} s)", file=sys.stderr, flush=True)
    return delays


def _time_death(sock_b: str, victim: Any, name: str, bound: float) -> float:
    """Kill host B (`victim`, a machd process) while we hold a port of B's; the seconds
    until our task hears the port died."""
    server = multiprocessing.get_context("spawn").Process(
        target=_sitter, args=(sock_b, name), daemon=True)
    server.start()
    try:
        port = netname_wait(name, 20_000)
        time.sleep(random.uniform(0.1, 0.1 + bound / 4))  # anywhere between heartbeats
        killed = time.monotonic()
        victim.send_signal(signal.SIGKILL)
        while True:
            note = pymach.msg_receive(pymach.task_notify(), pymach.RCV_TIMEOUT,
                                      (bound + 30) * 1000)
            if note.id == pymach.NOTIFY_PORT_DELETED and note.items[0].value == port:
                return time.monotonic() - killed
    finally:
        server.kill()
        server.join(5)


def _sitter(socket_path: str, name: str) -> None:
    """A native task of the host at `socket_path` that checks a port in as `name` and
    waits (until its host is killed)."""
    from pymach.libmach.task import attach

    attach(socket_path, name="bench-net-victim")
    me = pymach.task_self()
    port = pymach.port_allocate(me)
    netname_check_in(pymach.task_get_special_port(me, pymach.TASK_BOOTSTRAP_PORT), name, port)
    with contextlib.suppress(Exception):
        pymach.msg_receive(port)


# -- the baselines ---------------------------------------------------------------------------
def bench_round_trip(n: int, rounds: int, cluster: str | None) -> float:
    """Median microseconds per 1-byte round trip over TCP between two processes on the
    loopback link; over TLS with the cluster's certificates if `cluster` is given."""
    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe()
    echo = ctx.Process(target=_echo, args=(there, cluster), daemon=True)
    echo.start()
    port = here.recv()
    with _connect(port, cluster) as s:
        samples = time_round_trips(s, n, rounds)
    echo.join(10)
    return median_us(samples, n)


@contextlib.contextmanager
def _connect(port: int, cluster: str | None) -> Iterator[socket.socket]:
    s = socket.create_connection((LOOPBACK, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if cluster is not None:
        _, client = tls_contexts(Credentials(cluster, "A"))
        s = client.wrap_socket(s)
    try:
        yield s
    finally:
        s.close()


def _accept_one(conn: Connection, cluster: str | None) -> socket.socket:
    """Listen on a free loopback port, say which on `conn`, and take one connection
    (over TLS as host B of `cluster` if given)."""
    with socket.create_server((LOOPBACK, 0)) as listener:
        conn.send(listener.getsockname()[1])
        s, _ = listener.accept()
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if cluster is not None:
        server, _ = tls_contexts(Credentials(cluster, "B"))
        s = server.wrap_socket(s, server_side=True)
    return s


def _echo(conn: Connection, cluster: str | None) -> None:
    """Echo one connection's bytes back, one at a time, until it closes."""
    s = _accept_one(conn, cluster)
    with s, contextlib.suppress(OSError, ssl.SSLError):
        while data := s.recv(1):
            s.sendall(data)


def bench_stream(mib: int, rounds: int, cluster: str | None) -> float:
    """MiB/s of a plain TCP stream (TLS with the cluster's certificates if `cluster` is
    given) between two processes on the loopback link: the median of `rounds` rounds of
    `mib` MiB written in 1 MiB pieces, each until the reader says it has every byte."""
    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe()
    reader = ctx.Process(target=_drain, args=(there, cluster, mib, rounds), daemon=True)
    reader.start()
    piece = os.urandom(CHUNK)
    samples = []
    with _connect(here.recv(), cluster) as s:
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(mib):
                s.sendall(piece)
            s.recv(1)
            samples.append(time.perf_counter() - t0)
    reader.join(10)
    return mib / statistics.median(samples)


def _drain(conn: Connection, cluster: str | None, mib: int, rounds: int) -> None:
    """Read `rounds` times `mib` MiB from one connection, answering a byte after each."""
    s = _accept_one(conn, cluster)
    buf = bytearray(CHUNK)
    with s, contextlib.suppress(OSError, ssl.SSLError):
        for _ in range(rounds):
            left = mib * CHUNK
            while left:
                got = s.recv_into(buf, min(left, CHUNK))
                if not got:
                    return
                left -= got
            s.sendall(b"k")


def main(argv: list[str]) -> int:
    """`python -m pymach.bench.net [--json] [-n N] [--rounds N]`."""
    parser = argparse.ArgumentParser(prog="python -m pymach.bench.net",
                                     description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("-n", type=int, default=RPC_MAX, help="round trips per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (medians are kept)")
    parser.add_argument("--trials", type=int, default=DEAD_TRIALS,
                        help="hosts killed for the dead-host figure")
    parser.add_argument("--peer-timeout", type=float, default=DEAD_BOUND_S,
                        help="the hosts' --peer-timeout in the dead-host trials (seconds)")
    args = parser.parse_args(argv)
    result = run(max(1, args.n), max(1, args.rounds), max(1, args.trials),
                 max(0.1, args.peer_timeout))
    print(json.dumps(result, indent=2) if args.json else
          "\n".join(f"{k:<32} {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
