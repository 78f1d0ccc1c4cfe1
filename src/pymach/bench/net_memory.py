"""Memory across hosts (issue 11, item 5): out-of-line memory sent copy-on-reference.

Two embedded kernels in this process, A and B, each with its netmsgserver over TCP with
mutual TLS on the loopback link (net/tcp.py), `memory_size` 256 MiB each. A task of A
fills `size_mib` MiB (a pattern: each page starts with its own offset) and sends it out
of line to a task of B; B's netmsgserver maps it as a memory object served by A's
(net/cor.py) and B's task gets it as ordinary out-of-line memory, then touches pages
(reads each touched page's first 8 bytes and checks the pattern).

- `cor_all_pages_mib_s`: every page touched, in order: `size_mib` / the seconds from
  A's msg_send to B's last touch (once B reads on where the last data ended, A's
  read-ahead grows and streams windows ahead of it, so the pages come in a few large
  replies). Beside it the baselines of the same run: `tcp_stream_mib_s`, a plain Python
  TCP stream between two processes on the same link (bench/net.py's `bench_stream`),
  and `tls_stream_mib_s` the same over TLS 1.3 (what the hosts' link costs by itself),
  and the ratios to both. Target: >= 0.5x the TCP stream. `link` names the link and the
  TLS cipher suite the hosts negotiated; `cpus_allowed` the CPUs this process may run
  on (1 when pinned, `taskset -c 0`). `cor_all_pages_cpu_seconds` is the CPU time (user
  and system) this process spent meanwhile (both kernels, both netmsgservers, TLS both
  ways, and B's touches share it and one interpreter lock): less swayed by a busy
  machine than the seconds.
- `cor_sparse_*`: 1% of the pages touched, at random (seeded, so no two are likely to
  be neighbours and no read-ahead starts): `bytes_moved` is every packet byte both
  netmsgservers handed to the transport from the send to the last touch (the message,
  pager_init, each pager_data_request and its pager_data_provided, counted by the
  servers' `bytes_out`; TLS records and TCP/IP headers not included), `touched_bytes`
  the touched pages' bytes, `data_bytes_moved` the page data A's pager provided. The
  ratios: bytes moved / touched bytes (target <= 1.05 "with headers": the per-fault
  request and reply headers are `header_bytes_per_fault`, reported apart) and data
  moved / touched bytes (1.0: no page that was not touched crossed).

- `machd_cor_all_pages_mib_s`: the same dense run between two machd hosts (each its own
  process, as bench/net.py's hosts): a native task of A (this process, attached) sends,
  a native task of B (a child process) touches every page; seconds from A's msg_send to
  B's last touch (one clock: both on this machine). The native task touches with plain
  loads through `memory().buffer()` (the pages fault through userfaultfd to machd, as
  any native program's would), not with `memory().read()`, which makes a round trip to
  machd per call (so that a pager's failure is a MachError) and would time that trap
  instead. Beside it `machd_local_cow_touch_mib_s`: the same touches of a copy-on-write
  copy on one machd host, no network (the native fault path's own cost), and the
  ratios to the TCP and TLS streams. Needs userfaultfd; None without.

Call: `measure()` (or `python -m pymach.bench.net_memory [--json] [--mib N]`) returns
the rows as a dict (it needs the openssl command for the cluster's certificates). This
module uses bench/net.py's `bench_stream` for the baselines, so bench/net.py must not
import it back: `pymach bench net` merges `measure(tcp_mib_s=..., tls_mib_s=...)`
(given bench/net.py's own stream figures) from above both.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import random
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from typing import Any

import pymach as m
from pymach.bench.net import bench_stream
from pymach.net.cluster import cluster_init
from pymach.net.netname import netname_check_in, netname_wait
from pymach.net.station import Host
from pymach.net.tcp import TcpTransport, tcp_config

LOOPBACK = "127.0.0.1"
PAGE = 4096
WAIT_MS = 120_000
SPARSE = 0.01  # the fraction of pages touched in the sparse run


def measure(size_mib: int = 64, rounds: int = 3, seed: int = 1987,
            tcp_mib_s: float | None = None, tls_mib_s: float | None = None) -> dict[str, Any]:
    """Every figure of the module docstring, from one run (medians of `rounds`). The
    stream baselines are measured here unless given (bench/net.py measures the same)."""
    with tempfile.TemporaryDirectory() as tmp:
        cluster_init(tmp, ["A", "B"])
        dense = [_transfer(tmp, size_mib, None, seed) for _ in range(rounds)]
        sparse = _transfer(tmp, size_mib, SPARSE, seed)
        native = _native_dense(tmp, size_mib, rounds)
        tcp = tcp_mib_s if tcp_mib_s is not None else bench_stream(size_mib, rounds, None)
        tls = tls_mib_s if tls_mib_s is not None else bench_stream(size_mib, rounds, tmp)
    median = sorted(dense, key=lambda d: d["seconds"])[len(dense) // 2]
    seconds = median["seconds"]
    mib_s = size_mib / seconds
    faults = max(1, sparse["faults"])
    return {
        "benchmark": "net_memory",
        "link": f"loopback ({LOOPBACK}): two embedded kernels in one process, TCP + "
                f"{median['cipher'] or 'TLS'}; the streams: two processes",
        "cpus_allowed": len(os.sched_getaffinity(0)),
        "size_mib": size_mib,
        "cor_all_pages_mib_s": round(mib_s, 1),
        "cor_all_pages_seconds": round(seconds, 3),
        "cor_all_pages_cpu_seconds": round(median["cpu"], 3),
        "cor_all_pages_faults": median["faults"],
        "tcp_stream_mib_s": round(tcp, 1),
        "tls_stream_mib_s": round(tls, 1),
        "ratio_cor_vs_tcp_stream": round(mib_s / tcp, 3),
        "target_ratio_cor_vs_tcp_stream_at_least": 0.5,
        "ratio_cor_vs_tls_stream": round(mib_s / tls, 3),
        "machd_cor_all_pages_mib_s": None if native is None else round(native[0], 1),
        "machd_ratio_cor_vs_tcp_stream": None if native is None else round(native[0] / tcp, 3),
        "machd_ratio_cor_vs_tls_stream": None if native is None else round(native[0] / tls, 3),
        "machd_local_cow_touch_mib_s": None if native is None else round(native[1], 1),
        "cor_sparse_pages_touched": sparse["touched"] // PAGE,
        "cor_sparse_touched_bytes": sparse["touched"],
        "cor_sparse_bytes_moved": sparse["moved"],
        "cor_sparse_data_bytes_moved": sparse["provided"],
        "cor_sparse_faults": sparse["faults"],
        "header_bytes_per_fault": round((sparse["moved"] - sparse["provided"]) / faults),
        "ratio_bytes_moved_vs_touched": round(sparse["moved"] / sparse["touched"], 3),
        "ratio_data_moved_vs_touched": round(sparse["provided"] / sparse["touched"], 3),
        "target_ratio_bytes_moved_at_most": 1.05,
        "all_data_correct": all(d["ok"] for d in dense) and sparse["ok"],
    }


@contextmanager
def tcp_pair(cluster: str) -> Iterator[tuple[Host, Host]]:
    """Hosts A and B over TCP on loopback (B dials A), each with 256 MiB of memory."""
    ports = [_free_port(), _free_port()]
    made: list[Host] = []
    try:
        for n, name in enumerate("AB"):
            config = tcp_config(cluster, name, (LOOPBACK, ports[n]),
                                tuple((LOOPBACK, p) for p in ports[:n]))
            made.append(Host(TcpTransport(config), {"memory_size": 256 << 20}))
        _wait(lambda: all(len(h.server.peers) == 1 for h in made), "the hosts to link")
        yield made[0], made[1]
    finally:
        for h in made:
            h.shutdown()


def _transfer(cluster: str, size_mib: int, fraction: float | None,
              seed: int) -> dict[str, Any]:
    """One run: A sends `size_mib` MiB to B, which touches every page (fraction None)
    or that fraction of them at random."""
    size = size_mib << 20
    pages = size // PAGE
    touch = list(range(pages)) if fraction is None else \
        sorted(random.Random(seed).sample(range(pages), max(1, int(pages * fraction))))
    with tcp_pair(cluster) as (a, b):
        filled, go = threading.Event(), threading.Event()
        receiver = b.start(_receive_and_touch, touch, name="receiver")
        sender = a.start(_fill_and_send, size, filled, go, name="sender")
        if not filled.wait(WAIT_MS / 1000):
            raise TimeoutError("the sender did not fill its memory")
        before = a.server.bytes_out + b.server.bytes_out
        faults, provided = a.server.cor.faults, a.server.cor.provided
        cpu = os.times()
        go.set()
        t0 = sender.wait(WAIT_MS)
        t1, ok = receiver.wait(WAIT_MS)
        cpu_end = os.times()
        moved = a.server.bytes_out + b.server.bytes_out - before
        faults, provided = a.server.cor.faults - faults, a.server.cor.provided - provided
        _wait(lambda: not a.server.cor.objects, "A to release the object")
        cipher = a.transport.link_cipher("B") if isinstance(a.transport, TcpTransport) \
            else None
    return {"seconds": t1 - t0, "ok": ok, "touched": len(touch) * PAGE, "moved": moved,
            "provided": provided, "faults": faults, "cipher": cipher,
            "cpu": max(0.0, (cpu_end.user - cpu.user) + (cpu_end.system - cpu.system))}


def _fill_and_send(size: int, filled: threading.Event, go: threading.Event) -> float:
    """Fill `size` bytes (each page starts with its offset), say so, and when told send
    them to "box"; the time of the send."""
    me = m.task_self()
    address = m.vm_allocate(me, 0, size, True)
    mem = m.memory()
    for off in range(0, size, PAGE):
        mem.write(address + off, off.to_bytes(8, "little") * (PAGE // 8))
    box = netname_wait("box", WAIT_MS)
    filled.set()
    if not go.wait(WAIT_MS / 1000):
        raise TimeoutError("never told to send")
    t0 = time.perf_counter()
    m.msg_send(m.Message(remote_port=box, items=[m.OOL(address, size, deallocate=True)]))
    return t0


def _receive_and_touch(touch: list[int]) -> tuple[float, bool]:
    """Receive the region on "box"; read the first 8 bytes of each page in `touch`;
    (the time of the last touch, whether every page held its pattern)."""
    me = m.task_self()
    box = m.port_allocate(me)
    netname_check_in(m.task_get_special_port(me, m.TASK_BOOTSTRAP_PORT), "box", box)
    item = m.msg_receive(box, m.RCV_TIMEOUT, WAIT_MS).items[0]
    assert isinstance(item, m.OOL)
    mem = m.memory()
    ok = True
    for page in touch:
        ok &= mem.read(item.address + page * PAGE, 8) == (page * PAGE).to_bytes(8, "little")
    t1 = time.perf_counter()
    m.vm_deallocate(me, item.address, item.size)
    return t1, ok


def _native_dense(cluster: str, size_mib: int,
                  rounds: int) -> tuple[float, float] | None:
    """MiB/s of the dense run between two machd hosts and of the same touches of a local
    copy-on-write copy on one (medians of `rounds`); None if native mode is not
    available here."""
    from pymach.libmach.task import attach, detach
    from pymach.machd.machd import start_daemon, stop_daemon
    from pymach.pmap.uffd import probe

    if probe():  # the reason native mode cannot run here
        return None
    socks = [os.path.join(cluster, f"machd-{h}", "machd.sock") for h in "ab"]
    a, b = f"{LOOPBACK}:{_free_port()}", f"{LOOPBACK}:{_free_port()}"
    common = ("--memory", "512M", "--cluster", cluster)
    samples = []
    with contextlib.ExitStack() as stack:
        for sock, options in ((socks[0], ("--host-name", "A", "--listen", a)),
                              (socks[1], ("--host-name", "B", "--listen", b, "--peer", a))):
            stack.callback(stop_daemon, start_daemon(sock, *common, *options))
        attach(socks[0], name="bench-net-memory-sender")
        stack.callback(detach)
        for n in range(rounds):
            samples.append(_native_round(socks[1], size_mib << 20, f"box{n}"))
        local = [_native_local(size_mib << 20) for _ in range(rounds)]
    return (size_mib / sorted(samples)[len(samples) // 2],
            size_mib / sorted(local)[len(local) // 2])


def _native_local(size: int) -> float:
    """Seconds for this native task to touch every page of a copy-on-write copy of
    `size` bytes it sent itself (the same touches, without the network)."""
    me = m.task_self()
    address = m.vm_allocate(me, 0, size, True)
    mem = m.memory()
    for off in range(0, size, PAGE):
        mem.write(address + off, off.to_bytes(8, "little"))
    port = m.port_allocate(me)
    t0 = time.time()
    m.msg_send(m.Message(remote_port=port, items=[m.OOL(address, size, deallocate=True)]))
    item = m.msg_receive(port).items[0]
    assert isinstance(item, m.OOL)
    view = mem.buffer(item.address, item.size)  # plain loads, as the dense run's
    for off in range(0, size, PAGE):
        view[off:off + 8].tobytes()
    seconds = time.time() - t0
    view.release()
    m.vm_deallocate(me, item.address, item.size)
    m.port_deallocate(me, port)
    return seconds


def _native_round(receiver_socket: str, size: int, box: str) -> float:
    """One dense round from this (attached) task to a native task of the other host."""
    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe()
    child = ctx.Process(target=_native_receiver, args=(receiver_socket, box, size, there),
                        daemon=True)
    child.start()
    try:
        me = m.task_self()
        address = m.vm_allocate(me, 0, size, True)
        mem = m.memory()
        for off in range(0, size, PAGE):
            mem.write(address + off, off.to_bytes(8, "little"))
        dest = netname_wait(box, WAIT_MS)
        t0 = time.time()
        m.msg_send(m.Message(remote_port=dest, items=[m.OOL(address, size, deallocate=True)]))
        if not here.poll(WAIT_MS / 1000):
            raise TimeoutError("the receiver on the other host did not answer")
        t1, ok = here.recv()
    finally:
        child.join(20)
    if not ok:
        raise RuntimeError("the data that arrived by reference is wrong")
    return float(t1 - t0)


def _native_receiver(socket_path: str, box: str, size: int, conn: Connection) -> None:
    """A native task of the other host: receive on `box`, touch every page, send back
    (the time of the last touch, whether every page held its offset)."""
    from pymach.libmach.task import attach, detach

    attach(socket_path, name="bench-net-memory-receiver")
    try:
        me = m.task_self()
        port = m.port_allocate(me)
        netname_check_in(m.task_get_special_port(me, m.TASK_BOOTSTRAP_PORT), box, port)
        item = m.msg_receive(port, m.RCV_TIMEOUT, WAIT_MS).items[0]
        assert isinstance(item, m.OOL)
        view = m.memory().buffer(item.address, item.size)  # plain loads: see docstring
        ok = all(view[off:off + 8] == off.to_bytes(8, "little") for off in range(0, size, PAGE))
        conn.send((time.time(), ok))
    finally:
        detach()


def _wait(cond: Any, what: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.005)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def main(argv: list[str]) -> int:
    """`python -m pymach.bench.net_memory [--json] [--mib N] [--rounds N]`."""
    parser = argparse.ArgumentParser(prog="python -m pymach.bench.net_memory")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--mib", type=int, default=64, help="MiB sent (default 64)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    args = parser.parse_args(argv)
    rows = measure(args.mib, args.rounds)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for key, value in rows.items():
            print(f"{key:42} {value}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main(sys.argv[1:]))
