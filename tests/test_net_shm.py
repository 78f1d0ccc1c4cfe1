"""Shared memory across machd hosts: the paper's 4.2 server serving kernels on other hosts.

The shared memory server (pagers/shm.py) runs as a native task of machd host A and checks
its service in with netname; native tasks on hosts B and C (each its own machd, the
hosts joined over TCP with mutual TLS) look it up, map its region, and view it as a
NumPy array. The kernel's pager messages cross between the hosts through their
netmsgservers as ordinary messages, and the memory-object and request ports as send
rights.

- The sequential-consistency checker (bench/net_shm.py) accepts what a sequential
  machine does and refuses the classic forbidden outcomes (store buffering, message
  passing, a read going backwards, a stale read of one's own write, a value never
  written): it can fail.
- One NumPy array on two hosts: what host B writes, host A reads; what A writes, B
  reads (on loopback addresses, and in two network namespaces joined by a veth pair).
- A concurrent read/write workload of one client on each of three hosts, every page
  shared by all of them, is sequentially consistent (checked exactly against its
  histories): on machd hosts, with one-way answers and with the server waiting for each
  answer's reply, and on hosts of the in-process pymach.Network. The same checker finds
  the violations of a server that skips invalidating readers, on both.
- A host that dies (killed, or frozen) holding a page writable: the others go on. Once
  the host is declared down (the peer timeout), a reader on another host gets the page
  as the server last had it (the dead host's writes since it took the page are lost),
  and a new write by a third host is seen by all.
- `python -m pymach.bench.net_shm --json` prints messages per fault (remote and local)
  for both kinds of answers, each run checked first.
"""

from __future__ import annotations

import json
import multiprocessing
import random
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import threading
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest

import pymach as m
from nativeutil import uffd_or_skip
from pymach.bench.net_shm import (
    SERVICE,
    NotSequential,
    Op,
    SlotLayout,
    check_sequential,
    figures,
    machd_cluster,
    map_slots,
    run_clients,
    run_ops,
    start_server,
    value_of,
)
from pymach.pagers.shm import PageState, Region, SharedMemoryServer, shm_get_region
from test_net_tcp import exec_task, veth_namespaces

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None,
                                   reason="making cluster certificates needs the openssl command")
WAIT_S = 60.0
LAYOUT = SlotLayout(clients=3, slots=8, pages=4, page_size=4096)  # every page: 3 clients


# -- the checker ---------------------------------------------------------------------------------
def w(slot: int, client: int, n: int) -> Op:
    return ("w", slot, value_of(client, n))


def r(slot: int, value: int) -> Op:
    return ("r", slot, value)


def test_the_checker_accepts_a_sequential_history() -> None:
    p0 = [w(0, 0, 1), r(1, 0), r(1, value_of(1, 1)), w(0, 0, 2), r(0, value_of(0, 2))]
    p1 = [w(1, 1, 1), r(0, value_of(0, 1)), r(0, value_of(0, 2))]
    check_sequential([p0, p1])


@pytest.mark.parametrize("seed", range(20))
def test_the_checker_accepts_every_run_of_a_sequential_machine(seed: int) -> None:
    """Interleave three processes' operations at random on one memory: always accepted."""
    rng = random.Random(seed)
    memory: dict[int, int] = {}
    histories: list[list[Op]] = [[], [], []]
    counts = [0, 0, 0]
    for _ in range(300):
        p = rng.randrange(3)
        if rng.random() < 0.5:
            counts[p] += 1
            slot = 3 * rng.randrange(4) + p  # each slot has one writer
            memory[slot] = value_of(p, counts[p])
            histories[p].append(("w", slot, memory[slot]))
        else:
            slot = rng.randrange(12)
            histories[p].append(("r", slot, memory.get(slot, 0)))
    check_sequential(histories)


FORBIDDEN: dict[str, list[list[Op]]] = {
    # each writes its slot, then reads the other's as never written
    "store buffering": [[w(0, 0, 1), r(1, 0)], [w(1, 1, 1), r(0, 0)]],
    # the flag is seen set, the data written before it is not
    "message passing": [[w(0, 0, 1), w(1, 0, 2)], [r(1, value_of(0, 2)), r(0, 0)]],
    # a reader sees a slot's newer value, then its older one
    "a read going backwards": [[w(0, 0, 1), w(0, 0, 2)],
                               [r(0, value_of(0, 2)), r(0, value_of(0, 1))]],
    # a process does not see its own last write
    "a stale read of one's own write": [[w(0, 0, 1), w(0, 0, 2), r(0, value_of(0, 1))]],
    # a value nobody wrote
    "a value never written": [[w(0, 0, 1)], [r(0, value_of(0, 7))]],
    # a value written to another slot
    "a value of another slot": [[w(0, 0, 1)], [r(3, value_of(0, 1))]],
}


@pytest.mark.parametrize("name", list(FORBIDDEN))
def test_the_checker_refuses_a_history_no_sequential_order_explains(name: str) -> None:
    with pytest.raises(NotSequential):
        check_sequential(FORBIDDEN[name])


def test_the_checker_needs_one_writer_per_slot_and_unique_values() -> None:
    with pytest.raises(ValueError, match="two writers"):
        check_sequential([[w(0, 0, 1)], [("w", 0, value_of(1, 1))]])
    with pytest.raises(ValueError, match="written twice"):
        check_sequential([[w(0, 0, 1), w(1, 0, 1)]])


# -- hosts in one process ----------------------------------------------------------------------
class SlotView:
    """The int64 slots of a mapped region, read and written through memory() (the
    embedded kernel's memory has no buffer for NumPy)."""

    def __init__(self, address: int) -> None:
        self.address = address

    def __getitem__(self, i: int) -> int:
        value: int = struct.unpack("<q", m.memory().read(self.address + 8 * i, 8))[0]
        return value

    def __setitem__(self, i: int, value: int) -> None:
        m.memory().write(self.address + 8 * i, struct.pack("<q", int(value)))


class SkipsInvalidation(SharedMemoryServer):
    """A broken server: it never invalidates readers' copies (writers it still takes
    back, and it grants every unlock, so nothing waits for it forever)."""

    def _invalidate(self, region: Region, off: int, request: int) -> None:
        pass

    def _unlock_page(self, region: Region, request: int, off: int) -> None:
        region.pages.setdefault(off, PageState()).readers.add(request)  # never "stale"
        super()._unlock_page(region, request, off)


def _embedded_client(layout: SlotLayout, client: int, start: threading.Barrier) -> list[Op]:
    from pymach.net.netname import netname_wait

    x, size = shm_get_region(netname_wait(SERVICE, WAIT_S * 1000), "slots", layout.size)
    address = m.vm_allocate_with_pager(m.task_self(), 0, size, True, x, 0)
    start.wait(WAIT_S)
    return run_ops(SlotView(address), layout, client, 200, 50, seed=3)


@pytest.mark.parametrize("broken", [False, True], ids=["server", "broken server"])
def test_the_workload_on_in_process_hosts(broken: bool) -> None:
    """The same workload and checker on four hosts of pymach.Network (the server on A,
    a client on each of B, C, D): the in-process transport, no machd. The server's run
    is sequentially consistent; the broken server's is not, and the checker says so."""
    server = SkipsInvalidation() if broken else SharedMemoryServer()
    with m.Network() as net:
        net.host("A").start(server.serve_as, SERVICE, name="shm-server")
        start = threading.Barrier(3)
        handles = [net.host(h).start(_embedded_client, LAYOUT, i, start, name=f"client-{h}")
                   for i, h in enumerate("BCD")]
        histories = [h.wait(WAIT_S * 1000) for h in handles]
    assert sum(s.faults for s in server.stats.values()) > 0
    if broken:
        with pytest.raises(NotSequential):
            check_sequential(histories)
    else:
        check_sequential(histories)
        assert sum("pager_flush_request" in line for line in server.log) > 0


# -- machd hosts ---------------------------------------------------------------------------------
SERVER = """
from pymach.pagers.shm import SharedMemoryServer

SharedMemoryServer().serve_as("shm")
"""

ARRAY = """
import sys, time
import numpy as np
import pymach
from pymach.net.netname import netname_wait
from pymach.pagers.shm import shm_get_region

n = 4 * 4096 // 8                                   # four pages of int64
x, size = shm_get_region(netname_wait("shm", 30_000), "array", n * 8)
a = pymach.vm_allocate_with_pager(pymach.task_self(), 0, size, True, x, 0)
arr = np.frombuffer(pymach.memory().buffer(a, size), dtype=np.int64)
deadline = time.monotonic() + 30

def wait_for(cond):
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)

if sys.argv[1] == "first":                          # write, then wait for the answer
    arr[:] = np.arange(n) * 3
    print("wrote", flush=True)
    wait_for(lambda: arr[0] == -1)
    print("saw", int(arr[0]), bool((arr[1:] == np.arange(1, n) * 3).all()))
else:                                               # wait for the data, then answer
    wait_for(lambda: arr[n - 1] == 3 * (n - 1))
    same = bool((arr == np.arange(n) * 3).all())
    arr[0] = -1
    print("read", same)
"""


def array_on_two_hosts(sock_a: str, sock_b: str, tmp: Path) -> None:
    """The server on A; a task on B writes the array, a task on A reads it and answers."""
    (tmp / "server.py").write_text(textwrap.dedent(SERVER))
    (tmp / "array.py").write_text(textwrap.dedent(ARRAY))
    server = exec_task(sock_a, tmp / "server.py")
    first = exec_task(sock_b, tmp / "array.py", "first")
    second = exec_task(sock_a, tmp / "array.py", "second")
    try:
        out, err = second.communicate(timeout=WAIT_S)
        assert second.returncode == 0, err
        assert out == "read True\n"
        out, err = first.communicate(timeout=WAIT_S)
        assert first.returncode == 0, err
        assert out == "wrote\nsaw -1 True\n"
    finally:
        for p in (server, first, second):
            if p.poll() is None:
                p.kill()
            p.communicate()


@needs_openssl
@pytest.mark.slow
def test_a_numpy_array_mapped_on_two_hosts(tmp_path: Path) -> None:
    uffd_or_skip()
    with machd_cluster(str(tmp_path), ["A", "B"]) as cluster:
        array_on_two_hosts(cluster.socks[0], cluster.socks[1], tmp_path)


@needs_openssl
@pytest.mark.slow
def test_a_numpy_array_mapped_on_two_hosts_in_network_namespaces(tmp_path: Path) -> None:
    uffd_or_skip()
    with veth_namespaces() as (ns_a, ns_b, addr_a, addr_b):
        prefixes = (["ip", "netns", "exec", ns_a], ["ip", "netns", "exec", ns_b])
        with machd_cluster(str(tmp_path), ["A", "B"], addresses=(f"{addr_a}:7391",
                                                                 f"{addr_b}:7391"),
                           prefixes=prefixes) as cluster:
            array_on_two_hosts(cluster.socks[0], cluster.socks[1], tmp_path)



@needs_openssl
@pytest.mark.slow
@pytest.mark.parametrize("answers_oneway", [False, True], ids=["replies", "one-way"])
def test_a_concurrent_workload_on_three_hosts_is_sequentially_consistent(
        tmp_path: Path, answers_oneway: bool) -> None:
    uffd_or_skip()
    with machd_cluster(str(tmp_path), ["A", "B", "C"]) as cluster:
        server = start_server(cluster.socks[0], answers_oneway)
        try:
            run = run_clients(cluster.socks, LAYOUT, 300, 50, seed=7)
        finally:
            server.terminate()
    check_sequential(run.histories)
    assert [len(h) for h in run.histories] == [300, 300, 300]
    out = figures(run)
    # there was sharing: pages moved between the kernels, through the network
    assert out["remote_faults"] > 0 and out["local_faults"] > 0
    assert out["remote_messages_per_fault"] > 0 and out["local_messages_per_fault"] > 0
    assert run.totals[4] == 3  # three kernels used the region
    # every write of another client that a client saw was really written (by it, there)
    written = {v for h in run.histories for kind, _, v in h if kind == "w"}
    assert all(v in written or v == 0 for h in run.histories for kind, _, v in h)


def serve_broken(socket_path: str) -> None:
    from pymach.libmach.task import attach

    attach(socket_path, name="broken-shm")
    SkipsInvalidation().serve_as(SERVICE)


@needs_openssl
@pytest.mark.slow
def test_the_checker_finds_a_server_that_skips_invalidation(tmp_path: Path) -> None:
    uffd_or_skip()
    with machd_cluster(str(tmp_path), ["A", "B", "C"]) as cluster:
        server = multiprocessing.get_context("spawn").Process(
            target=serve_broken, args=(cluster.socks[0],), daemon=True)
        server.start()
        try:
            run = run_clients(cluster.socks, LAYOUT, 300, 50, seed=7)
        finally:
            server.terminate()
    with pytest.raises(NotSequential, match="cycle"):
        check_sequential(run.histories)


# -- a host that dies ----------------------------------------------------------------------------
def _task(socket_path: str, layout: SlotLayout, steps: Sequence[tuple[str, int, int]],
          conn: Connection) -> None:
    """A native task: map the slots, then for each step from `conn`, do it and answer
    with the value read (or 0): ("w", index, value) or ("r", index, 0)."""
    from pymach.libmach.task import attach
    from pymach.net.netname import netname_wait

    attach(socket_path, name="shm-task")
    view, _ = map_slots(netname_wait(SERVICE, int(WAIT_S * 1000)), layout)
    conn.send("mapped")
    while True:
        kind, index, value = conn.recv()
        if kind == "w":
            view[index] = value
            conn.send(0)
        else:
            conn.send(int(view[index]))


class Task:
    """A `_task` in its own process, driven step by step."""

    def __init__(self, socket_path: str, layout: SlotLayout) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, there = ctx.Pipe()
        self.proc = ctx.Process(target=_task, args=(socket_path, layout, (), there),
                                daemon=True)
        self.proc.start()
        assert self.ask() == "mapped"

    def ask(self, *step: Any) -> Any:
        if step:
            self.conn.send(step)
        assert self.conn.poll(WAIT_S), "the task did not answer in time"
        return self.conn.recv()

    def end(self) -> None:
        self.proc.kill()
        self.proc.join(10)


@needs_openssl
@pytest.mark.slow
@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_a_host_that_dies_holding_a_page_writable(tmp_path: Path, how: str) -> None:
    """Host B's machd is killed, or frozen (SIGSTOP: its links stay open and silent),
    while B holds the page writable and changed; C then reads the page. The server's
    flush to B goes unanswered until A declares B down (within the peer timeout, 3 s
    here: about 3 s in both cases) and B's request port dies there; then the server
    drops B and answers C."""
    uffd_or_skip()
    layout = SlotLayout(clients=1, slots=1, pages=1, page_size=4096)
    with machd_cluster(str(tmp_path), ["A", "B", "C"], peer_timeout=3.0) as cluster:
        server = start_server(cluster.socks[0])
        tasks: list[Task] = []
        try:
            tasks = [Task(s, layout) for s in cluster.socks]
            a, b, c = tasks
            assert a.ask("w", 0, 5) == 0  # the page goes back to the server ...
            assert b.ask("r", 0, 0) == 5  # ... when B reads it
            assert b.ask("w", 0, 111) == 0  # B holds it writable, changed
            host_b = cluster.daemons[1]
            if how == "killed":
                host_b.kill()
            else:
                host_b.send_signal(signal.SIGSTOP)
            # C reads: B's copy is gone, and so is its change (it never reached A)
            assert c.ask("r", 0, 0) == 5
            assert c.ask("w", 0, 222) == 0
            assert a.ask("r", 0, 0) == 222  # and the others go on
        finally:
            cluster.daemons[1].kill()
            for t in tasks:
                t.end()
            server.terminate()


@needs_openssl
@pytest.mark.slow
def test_bench_net_shm_prints_messages_per_fault() -> None:
    uffd_or_skip()
    r = subprocess.run([sys.executable, "-m", "pymach.bench.net_shm", "--json", "--hosts",
                        "2", "--ops", "100"], capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["benchmark"] == "net_shm" and out["target_messages_per_fault_at_most"] == 4.1
    for mode in ("answers_one_way", "answers_with_replies"):
        run = out[mode]
        assert run["sequentially_consistent"] is True and run["operations"] == 200
        assert run["faults"] > 0 and run["messages"] >= 2 * run["faults"]
        assert run["messages_per_fault"] == pytest.approx(  # (three roundings apart)
            run["remote_messages_per_fault"] + run["local_messages_per_fault"]
            + run["unattributed_messages_per_fault"], abs=0.021)
