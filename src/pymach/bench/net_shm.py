"""Shared memory across machd hosts (paper 4.2): messages per fault, and the checker.

The consistent network shared memory server (pagers/shm.py) runs as a native task of
machd host A; one client task on each of two or three hosts (A, B, C: each its own
machd, joined over TCP with mutual TLS on the loopback link) maps the server's region
and views it as a NumPy array of int64 slots. Each client runs a mixed read/write
workload on it, all of them at once:

- slot layout (`SlotLayout`): every client owns `slots` slots, spread over `pages`
  pages, and the slots of all clients share those pages (false sharing: every page has
  a slot of every client), so pages move between the kernels all the time;
- each operation is, at random (seeded), a write of the client's next value
  (`(client + 1) << 32 | n`, n = 1, 2, ...) to one of its own slots or a read of any slot;
  the client records every operation with the value written or read, in its program
  order (its `history`); a pause of PAUSE_S after each lets the clients interleave.

What is measured: the server counts the protocol messages of each fault (a kernel's
pager_data_request or pager_data_unlock: a fault its kernel could not serve), those it
receives and those it sends, whichever kernel they are exchanged with. The figure is
messages per fault over the whole run, split into *remote* (exchanged with the kernel of
another host, so each crossed the network through the two hosts' netmsgservers) and
*local* (with the kernel of the server's own host); the target is at most 4.1 in all
(Forin et al. 1988: 5.0 with a central manager, 4.1 with a distributed one). Every
message counts once, whatever it carries: a request, the data, a lock, a flush and its
reply, a written-back page. The same workload runs twice, on fresh hosts: with the
server's one-way answers (its default, as Mach 3.0) and with answers that wait for the
kernel's reply (`SharedMemoryServer(answers_oneway=False)`).

What is checked (`check_sequential`): that the histories are sequentially consistent,
exactly. Every slot has one writer and every value is written once, so each read names
the write it saw; the histories are sequentially consistent if and only if program order,
plus "a write precedes the reads that saw it", plus "a read precedes the write that
overwrote what it saw" (the writer's program order orders each slot's writes) has no
cycle. The benchmark refuses to print figures for a run that is not.

Run it with `python -m pymach.bench.net_shm [--json] [--hosts 3] [--ops N] [--writes P]`
(`pymach bench net-shm` once registered in cli/main.py). It starts its own machd hosts
and a temporary cluster; it needs userfaultfd (native mode), NumPy and the openssl
command. The tests (tests/test_net_shm.py) use its pieces: `machd_cluster`,
`start_server`, `run_clients`, `check_sequential`.
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
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import numpy.typing as npt

import pymach
from pymach.net.cluster import cluster_init
from pymach.net.netname import netname_wait
from pymach.pagers.shm import (
    SharedMemoryServer,
    shm_get_region,
    shm_statistics,
    shm_total_statistics,
)

LOOPBACK = "127.0.0.1"
SERVICE = "bench-net-shm"
REGION = "slots"
TARGET = 4.1  # messages per fault (Forin et al. 1988, distributed manager)
WAIT_MS = 60_000
PAUSE_S = 0.0002  # between a client's operations
Op = tuple[str, int, int]  # ("w" or "r", slot index, value)


class NotSequential(Exception):
    """The histories have no sequential order (the message says why)."""


# -- the workload ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SlotLayout:
    """Where the slots live: client `c`'s slot `s` is int64 number `index(c, s)` of the
    region; slot s is on page s % pages, so each page holds slots of every client."""

    clients: int
    slots: int
    pages: int
    page_size: int

    def index(self, client: int, slot: int) -> int:
        """The int64 index of client `client`'s slot `slot`."""
        per_page = self.page_size // 8
        row = slot // self.pages
        return (slot % self.pages) * per_page + row * self.clients + client

    @property
    def size(self) -> int:
        """Bytes of the region."""
        return self.pages * self.page_size


def value_of(client: int, n: int) -> int:
    """The n-th value (n >= 1) client `client` writes: unique over all clients."""
    return (client + 1) << 32 | n


def map_slots(server: int, layout: SlotLayout) -> tuple[npt.NDArray[np.int64], int]:
    """Map the region from this task; (a NumPy int64 view of it, its address)."""
    x, size = shm_get_region(server, REGION, layout.size)
    me = pymach.task_self()
    address = pymach.vm_allocate_with_pager(me, 0, size, True, x, 0)
    return np.frombuffer(pymach.memory().buffer(address, size), dtype=np.int64), address


def run_ops(view: npt.NDArray[np.int64], layout: SlotLayout, client: int, ops: int,
            write_percent: int, seed: int, pause_s: float = PAUSE_S) -> list[Op]:
    """The workload of one client on a mapped view (see module docstring): its history.
    Each operation is followed by a pause of `pause_s`, so the clients' operations
    interleave (without it one client could finish before another starts)."""
    rng = random.Random(seed * 1000 + client)
    mine = [layout.index(client, s) for s in range(layout.slots)]
    every = [layout.index(c, s) for c in range(layout.clients) for s in range(layout.slots)]
    history: list[Op] = []
    n = 0
    for _ in range(ops):
        if rng.randrange(100) < write_percent:
            n += 1
            i = rng.choice(mine)
            view[i] = value_of(client, n)
            history.append(("w", i, value_of(client, n)))
        else:
            i = rng.choice(every)
            history.append(("r", i, int(view[i])))
        if pause_s:
            time.sleep(pause_s)
    return history


# -- the checker ----------------------------------------------------------------------------
Node = tuple[int, int]  # (process, position in its history)


def check_sequential(histories: Sequence[Sequence[Op]]) -> None:
    """Raise NotSequential unless the histories (one per process, in program order) are
    sequentially consistent: some total order of all operations, keeping each process's
    order, in which every read returns the value of the latest write to its slot (0 if
    none). Exact for histories in which each slot has one writer and each written value
    is unique (see module docstring); ValueError for others."""
    by_slot, rank = _writes(histories)
    edges: dict[Node, list[Node]] = {}
    for p, history in enumerate(histories):
        for i, (kind, slot, value) in enumerate(history):
            if i + 1 < len(history):
                edges.setdefault((p, i), []).append((p, i + 1))  # program order
            if kind != "r":
                continue
            order = by_slot.get(slot, [])
            seen = rank.get((slot, value), -1) if value else -1  # -1: the initial 0
            if value and seen < 0:
                raise NotSequential(f"P{p}#{i} read {value:#x} from slot {slot}, a value "
                                    f"never written there")
            if seen >= 0:
                edges.setdefault(order[seen], []).append((p, i))  # the write it saw
            if seen + 1 < len(order):
                edges.setdefault((p, i), []).append(order[seen + 1])  # the one after
    cycle = _find_cycle(edges, [(p, i) for p, h in enumerate(histories) for i in range(len(h))])
    if cycle:
        shown = " -> ".join(f"P{p}#{i} {histories[p][i][0]} [{histories[p][i][1]}]="
                            f"{histories[p][i][2]:#x}" for p, i in cycle[:8])
        raise NotSequential(f"no sequential order: the operations {shown} ... form a cycle "
                            f"of {len(cycle)}")


def _writes(histories: Sequence[Sequence[Op]]
            ) -> tuple[dict[int, list[Node]], dict[tuple[int, int], int]]:
    """Each slot's writes in order (its writer's program order), and the rank of each
    (slot, value) written; ValueError if a slot has two writers or a value is 0 or
    written twice (the checker needs to know which write a read saw)."""
    by_slot: dict[int, list[Node]] = {}
    rank: dict[tuple[int, int], int] = {}
    values: set[int] = set()
    for p, history in enumerate(histories):
        for i, (kind, slot, value) in enumerate(history):
            if kind != "w":
                continue
            if value == 0 or value in values:
                raise ValueError(f"value {value:#x} is 0 or written twice: not checkable")
            order = by_slot.setdefault(slot, [])
            if order and order[0][0] != p:
                raise ValueError(f"slot {slot} has two writers: not checkable")
            values.add(value)
            rank[(slot, value)] = len(order)
            order.append((p, i))
    return by_slot, rank


def _find_cycle(edges: dict[Node, list[Node]], nodes: list[Node]) -> list[Node]:
    """A cycle of the graph (its nodes, in order), or [] if it has none."""
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(nodes, white)
    for root in nodes:
        if color[root] != white:
            continue
        path, stack = [root], [iter(edges.get(root, ()))]
        color[root] = grey
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                color[path.pop()] = black
                stack.pop()
            elif color[nxt] == grey:
                return path[path.index(nxt):]
            elif color[nxt] == white:
                color[nxt] = grey
                path.append(nxt)
                stack.append(iter(edges.get(nxt, ())))
    return []


# -- machd hosts ------------------------------------------------------------------------------
HOSTS = ("A", "B", "C")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Cluster:
    """Running machd hosts: their names, socket paths and daemon processes."""

    hosts: list[str]
    socks: list[str]
    daemons: list[Any]  # subprocess.Popen of each machd


@contextlib.contextmanager
def machd_cluster(tmp: str, hosts: Sequence[str], peer_timeout: float = 3.0,
                  addresses: Sequence[str] = (), prefixes: Sequence[Sequence[str]] = (),
                  options: Sequence[Sequence[str]] = ()) -> Iterator[Cluster]:
    """machd hosts of a temporary cluster made in `tmp`, each listening at its address
    (default: a free loopback port) and dialing the hosts before it, each run by its
    prefix if given (as `ip netns exec NS`) with its extra machd options if given;
    stopped afterwards."""
    from pymach.machd.machd import start_daemon, stop_daemon

    cluster = os.path.join(tmp, "cluster")
    cluster_init(cluster, list(hosts))
    addresses = list(addresses) or [f"{LOOPBACK}:{_free_port()}" for _ in hosts]
    running = Cluster(list(hosts), [os.path.join(tmp, h, "machd.sock") for h in hosts], [])
    with contextlib.ExitStack() as stack:
        for i, host in enumerate(hosts):
            peers = [a for a in addresses[:i] for a in ("--peer", a)]
            daemon = start_daemon(
                running.socks[i], "--memory", "256M", "--cluster", cluster, "--host-name",
                host, "--listen", addresses[i], "--peer-timeout", str(peer_timeout), *peers,
                *(options[i] if options else ()), prefix=list(prefixes[i]) if prefixes else ())
            stack.callback(stop_daemon, daemon)
            running.daemons.append(daemon)
        yield running


def serve_shm(socket_path: str, answers_oneway: bool = True) -> None:
    """Run the shared memory server as a native task of the host at `socket_path`,
    checked in as SERVICE (until its process is ended)."""
    from pymach.libmach.task import attach

    attach(socket_path, name="shm-server")
    SharedMemoryServer(answers_oneway).serve_as(SERVICE)


def start_server(socket_path: str, answers_oneway: bool = True
                 ) -> multiprocessing.process.BaseProcess:
    """`serve_shm` in a new process (end it with .terminate())."""
    proc = multiprocessing.get_context("spawn").Process(
        target=serve_shm, args=(socket_path, answers_oneway), daemon=True)
    proc.start()
    return proc


def object_name_of(address: int) -> int:
    """This task's name port for the object mapped at `address` (vm_regions)."""
    regions = pymach.vm_regions(pymach.task_self(), address, 1)
    return regions[0].object_name if regions else 0


def client_task(socket_path: str, layout: SlotLayout, client: int, ops: int,
                write_percent: int, seed: int, conn: Connection) -> None:
    """A native task of the host at `socket_path`: map the region, say so on `conn`,
    wait for the start time it sends back, run the workload; send back the history
    and this kernel's counts (shm_statistics)."""
    from pymach.libmach.task import attach, detach

    attach(socket_path, name=f"shm-client-{client}")
    try:
        server = netname_wait(SERVICE, WAIT_MS)
        view, address = map_slots(server, layout)
        conn.send("mapped")
        start_at = conn.recv()
        while time.time() < start_at:
            time.sleep(0.0005)
        conn.send(run_ops(view, layout, client, ops, write_percent, seed))
        _expect(conn, "report")  # every client is done: no message is still on its way
        counts = shm_statistics(server, REGION, object_name_of(address))
        totals = shm_total_statistics(server, REGION)
        del view
        conn.send((list(counts), list(totals)))
    except BaseException as e:  # the harness must hear of it, not wait forever
        conn.send(repr(e))
        raise
    finally:
        detach()


@dataclass
class Run:
    """One run of the workload on machd hosts: the histories and the server's counts."""

    hosts: list[str]
    histories: list[list[Op]]
    counts: list[list[int]]  # per client's kernel: faults, caused, received, sent, 1
    totals: list[int]  # all kernels: faults, caused, received, sent, kernels


def run_clients(socks: Sequence[str], layout: SlotLayout, ops: int, write_percent: int,
                seed: int) -> Run:
    """One client task per host (client i on socks[i]), mapped in host order, started at
    once; their histories and counts (the server must be running)."""
    ctx = multiprocessing.get_context("spawn")
    procs, conns = [], []
    try:
        for i, sock in enumerate(socks):
            here, there = ctx.Pipe()
            p = ctx.Process(target=client_task, args=(sock, layout, i, ops, write_percent,
                                                       seed, there), daemon=True)
            p.start()
            procs.append(p)
            conns.append(here)
            _expect(here, "mapped")
        start_at = time.time() + 0.2
        for c in conns:
            c.send(start_at)
        histories = [_receive(c) for c in conns]
        for c in conns:
            c.send("report")
        results = [_receive(c) for c in conns]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    return Run([os.path.basename(os.path.dirname(s)) for s in socks], histories,
               [r[0] for r in results], results[-1][1])


def _expect(conn: Connection, what: str) -> None:
    got = _receive(conn)
    if got != what:
        raise RuntimeError(f"a client said {got!r}, not {what!r}")


def _receive(conn: Connection) -> Any:
    """The client's next message (RuntimeError if it failed or stays silent)."""
    if not conn.poll(WAIT_MS / 1000):
        raise RuntimeError("a client task did not answer in time")
    got = conn.recv()
    if isinstance(got, str) and got not in ("mapped", "report"):
        raise RuntimeError(f"a client task failed: {got}")
    return got


# -- the benchmark ------------------------------------------------------------------------------
def figures(run: Run) -> dict[str, Any]:
    """Messages per fault over a run: in all, exchanged with the server's own host's kernel
    (local) and with the other hosts' kernels (remote); and what the faults of the local
    kernel and of the remote kernels cost each, whichever kernels their messages went to."""
    faults, _, received, sent, _ = run.totals
    local, remote = run.counts[0], run.counts[1:]
    remote_faults = sum(c[0] for c in remote)

    def per(n: int, d: int) -> float:
        return round(n / d, 2) if d else 0.0

    return {
        "faults": faults,
        "messages": received + sent,
        "messages_per_fault": per(received + sent, faults),
        "remote_messages_per_fault": per(sum(c[2] + c[3] for c in remote), faults),
        "local_messages_per_fault": per(local[2] + local[3], faults),
        "unattributed_messages_per_fault": per(  # write-backs no fault asked for
            received + sent - sum(c[2] + c[3] for c in run.counts), faults),
        "remote_faults": remote_faults,
        "messages_per_remote_fault": per(sum(c[1] for c in remote), remote_faults),
        "local_faults": local[0],
        "messages_per_local_fault": per(local[1], local[0]),
    }


def measure(hosts: int, ops: int, write_percent: int, seed: int, answers_oneway: bool,
            layout_slots: int = 8, layout_pages: int = 4) -> dict[str, Any]:
    """Run the workload once on `hosts` fresh machd hosts; check it (NotSequential if the
    histories are not sequentially consistent) and return its figures."""
    names = list(HOSTS[:hosts])
    with tempfile.TemporaryDirectory() as tmp, machd_cluster(tmp, names) as cluster:
        server = start_server(cluster.socks[0], answers_oneway)
        try:
            layout = SlotLayout(hosts, layout_slots, layout_pages, _page_size())
            t0 = time.perf_counter()
            run = run_clients(cluster.socks, layout, ops, write_percent, seed)
            seconds = time.perf_counter() - t0
        finally:
            server.terminate()
            server.join(10)
    check_sequential(run.histories)
    return {**figures(run), "operations": hosts * ops, "seconds": round(seconds, 2),
            "sequentially_consistent": True}


def _page_size() -> int:
    return 4096  # machd's default (--page-size); the hosts here use it


def run(hosts: int = 3, ops: int = 1000, write_percent: int = 50, seed: int = 1
        ) -> dict[str, Any]:
    """The benchmark (see module docstring): the same workload with one-way answers (the
    server's default, as Mach 3.0) and with the server waiting for each answer's reply."""
    if not 2 <= hosts <= len(HOSTS):
        raise ValueError(f"hosts must be 2 to {len(HOSTS)}")
    oneway = measure(hosts, ops, write_percent, seed, answers_oneway=True)
    replies = measure(hosts, ops, write_percent, seed, answers_oneway=False)
    return {
        "benchmark": "net_shm",
        "link": f"loopback ({LOOPBACK}): {hosts} machd hosts on this machine, linked by "
                f"TCP with mutual TLS",
        "hosts": hosts,
        "workload": f"{ops} operations per client, {write_percent}% writes, one client per "
                    f"host, {8} int64 slots each on {4} shared pages (every page holds "
                    f"slots of every client), seed {seed}",
        "answers_one_way": oneway,
        "answers_with_replies": replies,
        "target_messages_per_fault_at_most": TARGET,
        "anchors": "Forin et al. 1988: 5.0 (central manager), 4.1 (distributed manager)",
    }


def main(argv: list[str]) -> int:
    """`python -m pymach.bench.net_shm [--json] [--hosts N] [--ops N] [--writes P]`."""
    parser = argparse.ArgumentParser(prog="python -m pymach.bench.net_shm",
                                     description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--hosts", type=int, default=3, help="machd hosts (2 or 3)")
    parser.add_argument("--ops", type=int, default=1000, help="operations per client")
    parser.add_argument("--writes", type=int, default=50, help="percent of writes")
    parser.add_argument("--seed", type=int, default=1, help="the workload's seed")
    args = parser.parse_args(argv)
    result = run(args.hosts, max(1, args.ops), min(100, max(0, args.writes)), args.seed)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            if isinstance(value, dict):
                print(key)
                for k, v in value.items():
                    print(f"  {k:<30} {v}")
            else:
                print(f"{key:<32} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
