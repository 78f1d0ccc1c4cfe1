"""A shared blackboard (paper 8.4, Agora): pymach.apps.blackboard and its server.

The board lives in a memory object of its server's host. Agents on that host map it and
write their records into it themselves (a reservation and a commit through the server);
agents elsewhere post and read through messages. Checked:

- concurrent agents in different tasks on one host, on two hosts of a `Network`, and on
  two machds joined over TCP (net/tcp.py), several posting and reading at once: every
  posted hypothesis is read back exactly once by every reader, whole (a checksum in
  each payload, over the poster, the count and the bytes), in one order that is the
  same for all readers, with each agent's own posts in the order it made them;
- the message path on one host (what agents on another machd of a TCP cluster use), and
  both paths on one board;
- an agent that dies between its reservation and its commit leaves a VOID record that
  readers skip, and a record that does not check is never committed;
- a board larger than memory (its pages go back to the server and come again), and a
  remote read of more than one reply;
- the errors a Python user expects: TypeError and ValueError for bad arguments,
  ValueError on a closed board, MachError for what Mach says (a full board, no server).

CONTRACT: each test that takes `kernel` runs embedded (both schedulers) and as a native
task of machd. Multi-host tests use the embedded `Network` (the free scheduler), and two
machds of a cluster on 127.0.0.1.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import os
import pickle
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import astuple
from pathlib import Path
from typing import Any

import pytest

import pymach as m
from machutil import wait_until
from nativeutil import (
    native_kernel,
    running_machd,
    start_machd,
    stop_machd,
    uffd_or_skip,
)
from pymach.apps import blackboard_server as bs
from pymach.apps.blackboard import (
    Blackboard,
    Hypothesis,
    bb_commit,
    bb_reserve,
    server_stats,
    start_server,
)
from pymach.net.cluster import cluster_init
from test_net_tcp import free_port

CONTRACT = True
ROOT = Path(__file__).resolve().parents[1]
WAIT_MS = 30_000
WAIT_S = WAIT_MS / 1000


@pytest.fixture
def server(kernel: Any) -> Iterator[int]:
    """A blackboard server task; the test's task (and its children) find it by name."""
    handle, port = start_server()
    yield port
    with contextlib.suppress(m.MachError):
        m.task_terminate(handle.port)


# -- the agents ---------------------------------------------------------------------------------

def payload(agent: str, j: int, text: bool, pad: int = 0) -> bytes | str:
    """Hypothesis j of `agent`: its name, j, some bytes of a length that varies (plus
    `pad`), and a checksum over all of that (a torn record would not match)."""
    body = f"{agent}|{j}|".encode() + bytes((j * 31 + i + len(agent)) % 251
                                            for i in range((j * 97) % 700 + pad))
    digest = hashlib.sha256(body).hexdigest()[:16].encode()
    if text:
        return (digest + b"|" + body.hex().encode()).decode()
    return digest + b"|" + body


def check(h: Hypothesis) -> tuple[str, int]:
    """(agent, j) of a hypothesis whose payload matches its checksum, else AssertionError."""
    raw = h.payload.encode() if isinstance(h.payload, str) else h.payload
    digest, _, body = raw.partition(b"|")
    if isinstance(h.payload, str):
        body = bytes.fromhex(body.decode())
    assert hashlib.sha256(body).hexdigest()[:16].encode() == digest, f"torn: {h}"
    agent, j, _ = body.split(b"|", 2)
    assert agent.decode() == h.poster and h.kind == "hypothesis"
    assert h.confidence == pytest.approx(int(j) % 10 / 10)
    return agent.decode(), int(j)


def run_agent(board: str, agent: str, n: int, expect: int, path: str = "auto",
              text: bool = False, pad: int = 0) -> dict[str, Any]:
    """Post n hypotheses, reading as it goes, then wait until `expect` have been read
    (at least). What it posted and everything it read, in order."""
    b = Blackboard.open(board, agent=agent, path=path)
    posted, seen, since = [], [], 0
    for j in range(n):
        posted.append(b.post("hypothesis", payload(agent, j, text, pad), j % 10 / 10))
        records = b.read(since)
        seen += records
        since = records[-1].seq + 1 if records else since
    while len(seen) < expect:
        records = b.wait(since, WAIT_MS)
        assert records, f"{agent}: nothing new after {since} in {WAIT_MS} ms"
        seen += records
        since = records[-1].seq + 1
    local = b.local
    b.close()
    return {"agent": agent, "local": local, "posted": posted,
            "seen": [astuple(h) for h in seen]}


def check_runs(results: list[dict[str, Any]], before: int = 0) -> list[int]:
    """Every agent read every post exactly once, whole, in one order (the first `before`
    records were there already); each agent's posts kept its order. The sequence."""
    posted = sorted(s for r in results for s in r["posted"])
    assert len(posted) == len(set(posted)), "two posts got one sequence number"
    order = None
    for r in results:
        records = [Hypothesis(*row) for row in r["seen"]][before:]
        seqs = [h.seq for h in records]
        assert seqs == sorted(set(seqs)), f"{r['agent']} read out of order or twice"
        assert seqs == posted, f"{r['agent']} did not read every post once"
        if order is None:
            order = r["seen"]
        assert r["seen"] == order, "two readers saw different boards"
        by_agent: dict[str, list[int]] = {}
        for h in records:
            agent, j = check(h)
            by_agent.setdefault(agent, []).append(j)
        for agent, js in by_agent.items():
            assert js == list(range(len(js))), f"{agent}'s posts out of its order"
    for r in results:
        assert r["posted"] == sorted(r["posted"])
    return posted


# -- one host ------------------------------------------------------------------------------------

def test_agents_in_different_tasks_share_the_board(server: int) -> None:
    agents, n = 3, 30
    handles = [m.spawn(run_agent, "speech", f"agent{i}", n, agents * n, "auto", i == 1,
                       name=f"agent{i}") for i in range(agents)]
    results = [h.result(120_000) for h in handles]
    assert all(r["local"] for r in results)  # the server's host: shared memory
    seqs = check_runs(results)
    assert seqs == list(range(agents * n))  # no gap: nobody died
    stats = server_stats(server)
    assert stats["reservations"] == agents * n and stats["remote_posts"] == 0
    assert stats["commits"] == agents * n and stats["voided"] == 0
    mine = Blackboard.open("speech")  # a late reader sees the same board
    assert [astuple(h) for h in mine.read()] == results[0]["seen"]
    mine.close()


def test_the_message_path_and_shared_memory_on_one_board(server: int) -> None:
    n = 20
    paths = ["messages", "memory", "messages"]
    handles = [m.spawn(run_agent, "mixed", f"agent{i}", n, len(paths) * n, path,
                       name=f"agent{i}") for i, path in enumerate(paths)]
    results = [h.result(120_000) for h in handles]
    assert [r["local"] for r in results] == [False, True, False]
    check_runs(results)
    stats = server_stats(server)
    assert stats["remote_posts"] == 2 * n and stats["reservations"] == n
    assert stats["remote_reads"] > 0


def test_a_local_agent_maps_the_board_and_a_remote_one_does_not(server: int) -> None:
    here = Blackboard.open("maps")
    there = Blackboard.open("maps", path="messages")
    assert here.local and not there.local
    assert "shared memory" in repr(here) and "messages" in repr(there)
    regions = m.vm_regions(m.task_self())
    assert any(r.size >= bs.SIZE_DEFAULT for r in regions)  # here's mapping
    s1 = here.post("word", "hello", 0.25)
    s2 = there.post("word", b"world", 1)
    assert there.wait(s2, WAIT_MS)[-1].seq == s2
    for b in (here, there):
        assert [(h.seq, h.payload, h.confidence) for h in b.read()] == [
            (s1, "hello", 0.25), (s2, b"world", 1.0)]
        assert b.committed == 2
        assert b.read(since=2) == [] and b.read(since=99) == []
        assert [h.seq for h in b.read(limit=1)] == [s1]
    assert here._map is not None and there._map is None
    address = here._map.address
    assert any(r.address == address for r in m.vm_regions(m.task_self()))
    here.close()
    assert not any(r.address == address for r in m.vm_regions(m.task_self()))
    there.close()


def test_wait_times_out_with_nothing_and_wakes_for_a_post(server: int) -> None:
    b = Blackboard.open("quiet")
    assert b.wait(0, timeout_ms=30) == []
    assert b.wait(0, timeout_ms=0) == []

    def poster() -> int:
        c = Blackboard.open("quiet", path="messages")
        seq = c.post("late", b"x")
        c.close()
        return seq

    h = m.spawn(poster, name="poster")
    got = b.wait(0, timeout_ms=WAIT_MS)
    assert [(r.kind, r.payload) for r in got] == [("late", b"x")]
    assert h.result(WAIT_MS) == 0
    b.close()


def _hold_a_reservation(board: str) -> None:
    """Reserve a record and never write it (the task is then terminated)."""
    b = Blackboard.open(board, path="memory")
    bb_reserve(b._server, b._id, b._board, 64)
    me = m.task_self()
    m.msg_receive(m.port_allocate(me))  # for ever


def test_an_agent_that_dies_before_its_commit_leaves_a_void(server: int) -> None:
    b = Blackboard.open("dying")
    first = b.post("before", b"1")
    h = m.spawn(_hold_a_reservation, "dying", name="dies")
    wait_until(lambda: server_stats(server)["reservations"] == 2, WAIT_MS)
    after = b.post("after", b"3")  # behind the reservation: not yet visible
    assert (first, after) == (0, 2)
    assert [r.seq for r in b.read()] == [0]
    assert b.wait(1, timeout_ms=50) == []
    m.task_terminate(h.port)
    got = b.wait(1, timeout_ms=WAIT_MS)  # the reservation became VOID: readers go on
    assert [(r.seq, r.kind) for r in got] == [(2, "after")]
    assert [r.seq for r in b.read()] == [0, 2]
    assert b.committed == 3 and server_stats(server)["voided"] == 1
    b.close()


def test_a_record_that_does_not_check_is_never_committed(server: int) -> None:
    b = Blackboard.open("torn")
    length = bs.record_length(b"k", b"me", b"x" * 10)
    seq, offset = bb_reserve(b._server, b._id, b._board, length)
    record = bytearray(bs.encode_record(seq, b"k", b"me", b"x" * 10, 0, 0.5, length))
    record[-9] ^= 0xFF  # one byte of the payload changed after the checksum
    assert b._map is not None
    b._map.write(b._layout.log + offset, bytes(record))
    bb_commit(b._server, b._id, b._board, seq)
    good = b.post("k", b"fine")
    assert [(r.seq, r.payload) for r in b.wait(0, WAIT_MS)] == [(good, b"fine")]
    assert server_stats(server)["voided"] == 1
    b.close()


def test_a_record_damaged_after_its_commit_is_reported_not_returned(server: int) -> None:
    b = Blackboard.open("damaged")
    remote = Blackboard.open("damaged", path="messages")
    seq = b.post("k", b"precious")
    assert remote.wait(seq, WAIT_MS)
    assert b._map is not None
    offset = struct.unpack("<q", b._map.read(b._layout.index + 8 * seq, 8))[0]
    at = b._layout.log + offset + bs.HEAD.size + bs.BODY.size + 2  # in the payload
    b._map.write(at, b"X")  # an agent scribbles on the shared board
    for reader in (b, remote):
        with pytest.raises(m.MachError, match="not whole") as e:
            reader.read()
        assert e.value.code == "KERN_FAILURE"
    b.close()
    remote.close()


def test_a_reader_of_a_dead_server_is_told(kernel: Any) -> None:
    handle, port = start_server()
    b = Blackboard.open("gone", port, path="messages")
    b.post("k", b"x")
    m.task_terminate(handle.port)
    with pytest.raises(m.MachError):
        b.wait(1, timeout_ms=None)  # (never answered: the server is gone)
    with pytest.raises(m.MachError):
        b.post("k", b"y")


def test_a_remote_reader_reads_a_large_board_in_several_replies(server: int) -> None:
    b = Blackboard.open("large", size=2 << 20)
    big = bytes(range(256)) * 100  # 25.6 KB: 12 records per 256 KiB reply at most
    seqs = [b.post("chunk", big[i:] + big[:i], 0.5) for i in range(30)]
    remote = Blackboard.open("large", path="messages")
    assert remote.wait(seqs[-1], WAIT_MS)
    got = remote.read()
    assert [r.seq for r in got] == seqs
    assert all(r.payload == big[i:] + big[:i] for i, r in enumerate(got))
    assert [r.seq for r in remote.read(since=5, limit=3)] == seqs[5:8]
    remote.close()
    b.close()


def test_text_and_bytes_come_back_as_posted(server: int) -> None:
    b = Blackboard.open("types", agent="ägent ✓")
    r = Blackboard.open("types", path="messages")
    values: list[bytes | str] = ["", "naïve ✓", b"", b"\x00\xff" * 100, "x" * 1000,
                                 bytearray(b"ba"), memoryview(b"mv")]
    for v in values:
        b.post("τ", v, 0.0)
    b.post("τ", "z", 1)
    expected = [bytes(v) if not isinstance(v, str) else v for v in values] + ["z"]
    assert r.wait(len(values), WAIT_MS)
    for board in (b, r):
        got = board.read()
        assert [h.payload for h in got] == expected
        assert [type(h.payload) for h in got] == [type(v) for v in expected]
        assert {(h.kind, h.poster) for h in got} == {("τ", "ägent ✓")}
    b.close()
    r.close()


# -- errors ---------------------------------------------------------------------------------------

def test_bad_arguments_fail_as_python_says(server: int) -> None:
    b = Blackboard.open("errors")
    bad_calls: list[tuple[type[Exception], Any]] = [
        (TypeError, lambda: Blackboard.open(42)),
        (ValueError, lambda: Blackboard.open("")),
        (ValueError, lambda: Blackboard.open("x" * 65)),
        (ValueError, lambda: Blackboard.open("a\0b")),
        (ValueError, lambda: Blackboard.open("errors", path="carrier pigeon")),
        (TypeError, lambda: Blackboard.open("errors", server="blackboard")),
        (TypeError, lambda: Blackboard.open("errors", size=1.5)),
        (ValueError, lambda: Blackboard.open("errors", size=-1)),
        (TypeError, lambda: Blackboard.open("errors", agent=7)),
        (TypeError, lambda: b.post(3, b"x")),
        (ValueError, lambda: b.post("", b"x")),
        (ValueError, lambda: b.post("k" * 65, b"x")),
        (TypeError, lambda: b.post("k", 42)),
        (TypeError, lambda: b.post("k", ["not", "bytes"])),
        (ValueError, lambda: b.post("k", b"x" * (bs.PAYLOAD_MAX + 1))),
        (TypeError, lambda: b.post("k", b"x", "high")),
        (TypeError, lambda: b.post("k", b"x", True)),
        (ValueError, lambda: b.post("k", b"x", 1.5)),
        (ValueError, lambda: b.post("k", b"x", float("nan"))),
        (ValueError, lambda: b.post("k", b"x", -0.1)),
        (TypeError, lambda: b.read("0")),
        (ValueError, lambda: b.read(-1)),
        (ValueError, lambda: b.read(0, limit=0)),
        (TypeError, lambda: b.wait(0, timeout_ms="soon")),
        (ValueError, lambda: b.wait(0, timeout_ms=-5)),
        (TypeError, lambda: pickle.dumps(b)),
    ]
    for i, (kind, call) in enumerate(bad_calls):
        with pytest.raises(kind):
            call()
            pytest.fail(f"call {i} did not fail")
    for size in (10, bs.SIZE_MAX + 1):
        with pytest.raises(ValueError, match="size"):
            Blackboard.open("new", size=size)
    new_board = bs.bb_defs.stub("bb_open")  # the server checks what a client sends too
    with pytest.raises(m.MachError) as e:
        new_board(b._server, "new", 10, m.host_self(), m.port_allocate(m.task_self()), 0)
    assert e.value.code == "KERN_INVALID_ARGUMENT"
    assert b.post("k", b"still works") == 0
    b.close()
    b.close()  # a second close does nothing
    for call in (lambda: b.post("k", b"x"), lambda: b.read(), lambda: b.wait(0, 1),
                 lambda: b.committed):
        with pytest.raises(ValueError, match="closed"):
            call()


def test_a_full_board_says_so(server: int) -> None:
    for path in ("memory", "messages"):
        b = Blackboard.open(f"small-{path}", size=bs.SIZE_MIN, path=path)
        posted = 0
        with pytest.raises(m.MachError) as e:
            for _ in range(100):
                b.post("k", bytes(4000))
                posted += 1
        assert e.value.code == "KERN_NO_SPACE" and "full" in str(e.value)
        assert 10 <= posted < 17
        assert len(b.read()) == posted  # what was posted is all there
        b.close()


def test_open_without_a_server_fails_clearly(kernel: Any) -> None:
    if m.task_get_special_port(m.task_self(), m.TASK_BOOTSTRAP_PORT):
        pytest.skip("this task has a name service")
    with pytest.raises(m.MachError, match="no blackboard server") as e:
        Blackboard.open("nobody")
    assert e.value.code == "KERN_INVALID_ARGUMENT"


def test_no_service_of_that_name_times_out(server: int) -> None:
    with pytest.raises(m.MachError) as e:
        Blackboard.open("x", service="no-such-service", timeout_ms=20)
    assert e.value.code == "KERN_INVALID_NAME"


@pytest.mark.embedded_only("shares one Python object between two tasks")
def test_a_board_belongs_to_its_task(server: int) -> None:
    b = Blackboard.open("owned")

    def other_task() -> str:
        try:
            b.post("k", b"not yours")
        except m.MachError as e:
            return e.code
        return "posted"

    assert m.spawn(other_task).result(WAIT_MS) == "KERN_INVALID_ARGUMENT"
    assert b.read() == []
    b.close()


# -- two hosts ------------------------------------------------------------------------------------

def _start_and_serve(n: int, agents: int) -> dict[str, Any]:
    """Host A's first task: the server, then an agent like the others."""
    start_server()
    return run_agent("agora", "A0", n, agents * n)


def test_agents_on_two_hosts() -> None:
    n, names = 25, ["A0", "A1", "B0", "B1", "B2"]
    with m.Network() as net:
        a, b = net.host("A"), net.host("B")
        first = a.start(_start_and_serve, n, len(names), name="A0")
        handles = [first] + [(a if h[0] == "A" else b).start(
            run_agent, "agora", h, n, len(names) * n, "auto", h == "B1", name=h)
            for h in names[1:]]
        results = [h.wait(120_000) for h in handles]
    assert [r["local"] for r in results] == [True, True, False, False, False]
    assert check_runs(results) == list(range(len(names) * n))


def test_a_remote_agent_cannot_map_the_board() -> None:
    def remote() -> str:
        try:
            Blackboard.open("agora", path="memory")
        except m.MachError as e:
            return f"{e.code}: {e.detail}"
        return "mapped"

    with m.Network() as net:
        a, b = net.host("A"), net.host("B")
        a.start(start_server)
        said = b.start(remote).wait(WAIT_MS)
    assert said.startswith("KERN_INVALID_ARGUMENT") and "another host" in said


def _remote_agent_that_stays() -> None:
    """Post through the server, then wait for ever (until the host goes)."""
    b = Blackboard.open("crash", path="messages")
    b.post("k", b"from B")
    b.wait(since=1000)


def _local_agent_outliving_b(parked: threading.Event,
                             gone: threading.Event) -> list[tuple[int, bytes | str]]:
    _, port = start_server()
    b = Blackboard.open("crash")
    assert [r.payload for r in b.wait(0, WAIT_MS)] == [b"from B"]
    wait_until(lambda: server_stats(port)["parked_waits"] == 1, WAIT_MS)  # B waits
    parked.set()
    assert gone.wait(WAIT_S)  # (the free scheduler: a plain wait is allowed)
    wait_until(lambda: server_stats(port)["clients"] == 1, WAIT_MS)  # only ours now
    assert server_stats(port)["parked_waits"] == 0
    b.post("k", b"from A")
    assert b.wait(1, WAIT_MS)
    return [(r.seq, r.payload) for r in b.read()]


def test_a_host_that_leaves_takes_only_its_clients() -> None:
    parked, gone = threading.Event(), threading.Event()
    with m.Network() as net:
        a, b = net.host("A"), net.host("B")
        ha = a.start(_local_agent_outliving_b, parked, gone, name="A")
        b.start(_remote_agent_that_stays, name="B")
        assert parked.wait(WAIT_S)
        net.crash("B")  # its agent's token (a proxy on A) dies: the server forgets it
        gone.set()
        assert ha.wait(WAIT_MS) == [(0, b"from B"), (1, b"from A")]


# -- two machds joined over TCP ----------------------------------------------------------------

B_SCRIPT = """import sys
sys.path.insert(0, {tests!r})
import pymach
from test_blackboard import run_agent
other = pymach.spawn(run_agent, "tcp", "B1", {n}, {total}, "auto", True)
mine = run_agent("tcp", "B0", {n}, {total})
print(repr([mine, other.result(120_000)]))
"""


def test_agents_on_two_machds_over_tcp(tmp_path: Path) -> None:
    """The message path unchanged over the network of net/tcp.py: host B's agents find
    the board through netname and post and read through proxies."""
    uffd_or_skip()
    cluster = tmp_path / "cluster"
    cluster_init(str(cluster), ["A", "B"])
    port = free_port()
    a_sock, b_sock = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    common = ["--cluster", str(cluster), "--memory", "128M"]
    a = start_machd(Path(a_sock), *common, "--host-name", "A", "--listen", f"127.0.0.1:{port}")
    b = start_machd(Path(b_sock), *common, "--host-name", "B", "--peer", f"127.0.0.1:{port}")
    n, total = 20, 80
    try:
        with native_kernel(a_sock):
            handle, _ = start_server()
            script = tmp_path / "on_b.py"
            script.write_text(B_SCRIPT.format(tests=str(ROOT / "tests"), n=n, total=total))
            env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYMACH_SOCKET": b_sock}
            on_b = subprocess.Popen([sys.executable, "-m", "pymach.cli.main", "exec",
                                     str(script)], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            here = [m.spawn(run_agent, "tcp", f"A{i}", n, total, "auto", i == 1)
                    for i in range(2)]
            results = [h.result(120_000) for h in here]
            out, err = on_b.communicate(timeout=120)
            assert on_b.returncode == 0, err
            results += ast.literal_eval(out.strip().splitlines()[-1])
            m.task_terminate(handle.port)
    finally:
        stop_machd(b)
        stop_machd(a)
    assert [r["local"] for r in results] == [True, True, False, False]
    assert check_runs(results) == list(range(total))


# -- memory pressure: the board's pages go back to the server and come again ----------------------

@pytest.mark.parametrize("deterministic", [False, True], ids=["free", "det"])
def test_a_board_larger_than_memory(deterministic: bool) -> None:
    with m.boot(memory_size=48 * 4096, deterministic=deterministic, seed=8) as k:
        handle, _ = start_server()
        b = Blackboard.open("big", size=1 << 20)
        results = m.spawn(run_agent, "big", "writer", 150, 150, "auto", False,
                          3000).result(120_000)
        check_runs([results])
        for _ in range(2):  # everything read back, twice, through pageouts
            check_runs([{"agent": "me", "posted": results["posted"],
                         "seen": [astuple(h) for h in b.read()]}])
        assert k.vm_stat()["pageouts"] > 20
        b.close()
        m.task_terminate(handle.port)


@pytest.fixture(scope="module")
def small_machd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A machd with 192 KiB of memory (48 pages), for the native pressure test."""
    yield from running_machd(tmp_path_factory, "--memory", "192K", "--pager-cluster", "4")


def test_a_board_larger_than_memory_native(small_machd: str) -> None:
    with native_kernel(small_machd):
        handle, _ = start_server()
        results = m.spawn(run_agent, "big", "writer", 150, 150, "auto", False,
                          3000).result(120_000)
        check_runs([results])
        b = Blackboard.open("big")
        check_runs([{"agent": "me", "posted": results["posted"],
                     "seen": [astuple(h) for h in b.read()]}])
        assert m.vm_statistics(m.task_self()).pageouts > 20
        b.close()
        m.task_terminate(handle.port)


@pytest.mark.slow
def test_many_agents_many_posts(server: int) -> None:
    agents, n = 6, 150
    handles = [m.spawn(run_agent, "crowd", f"agent{i}", n, agents * n,
                       "messages" if i % 3 == 2 else "auto", i % 2 == 1, name=f"agent{i}")
               for i in range(agents)]
    results = [h.result(300_000) for h in handles]
    assert check_runs(results) == list(range(agents * n))


# -- the README example, and the demo --------------------------------------------------------------

EXAMPLE = r"""import pymach
from pymach.apps.blackboard import Blackboard, start_server


def signal_agent():                                # host A, where the board will be
    start_server()                                 # checks in as "blackboard"
    with Blackboard.open("speech", agent="signal") as board:
        print(board)
        return board.post("segment", b"\x01\x02", confidence=0.9)


def phoneme_agent():                               # host A: shared memory
    with Blackboard.open("speech", agent="phonemes") as board:
        (segment,) = board.wait(since=0, timeout_ms=5_000)
        board.post("phoneme", "ae", confidence=0.7)
        return segment.payload


def word_agent():                                  # host B: messages
    with Blackboard.open("speech", agent="words") as board:
        print(board)
        heard = board.wait(since=1, timeout_ms=5_000)
        board.post("word", "cat", confidence=0.6)
        return [(h.seq, h.kind, h.payload, h.poster) for h in heard]


def display():                                     # any host
    with Blackboard.open("speech") as board:
        return [(h.seq, h.kind, h.payload, h.confidence, h.poster)
                for h in board.read()]


with pymach.Network() as net:
    a, b = net.host("A"), net.host("B")
    print(a.start(signal_agent).wait(10_000))
    print(a.start(phoneme_agent).wait(10_000))
    print(b.start(word_agent).wait(10_000))
    print(b.start(display).wait(10_000))
"""
EXAMPLE_OUTPUT = [
    "<Blackboard 'speech' agent='signal' (shared memory)>",
    "0",
    "b'\\x01\\x02'",
    "<Blackboard 'speech' agent='words' (messages)>",
    "[(1, 'phoneme', 'ae', 'phonemes')]",
    "[(0, 'segment', b'\\x01\\x02', 0.9, 'signal'), (1, 'phoneme', 'ae', 0.7, 'phonemes'), "
    "(2, 'word', 'cat', 0.6, 'words')]",
]


def _python(code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_readme_example_prints_what_the_readme_says() -> None:
    r = _python(EXAMPLE)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == EXAMPLE_OUTPUT


def test_demo_blackboard_runs() -> None:
    r = _python("from pymach.cli.demo_blackboard import run_blackboard_demo; "
                "run_blackboard_demo()")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "WRONG" not in out
    assert "[phonemes-1] path: shared memory" in out
    assert "[display] path: messages" in out
    assert "every reader saw the same" in out and "checksums: all whole" in out
    assert "0 remote posts" not in out


def test_record_layout_round_trips() -> None:
    for kind, poster, data, flags in ((b"k", b"", b"", 0), (b"x" * 64, b"p" * 64,
                                                             b"\0" * bs.PAYLOAD_MAX, 0),
                                      (b"t", b"me", "ü".encode(), bs.F_TEXT)):
        n = bs.record_length(kind, poster, data)
        rec = bs.encode_record(7, kind, poster, data, flags, 0.5, n)
        assert len(rec) == n and n % 8 == 0 and bs.RECORD_MIN <= n <= bs.RECORD_MAX
        h, length = bs.parse_record(rec, 0, 7)
        assert length == n and h is not None
        assert (h.kind.encode(), h.poster.encode()) == (kind, poster)
        with pytest.raises(m.MachError):
            bs.parse_record(rec, 0, 8)  # another sequence number
        for at in (0, 9, 14, 20, n - 1):  # any byte changed: refused
            bad = bytearray(rec)
            bad[at] ^= 1
            with pytest.raises(m.MachError):
                bs.parse_record(bytes(bad), 0, 7)
        with pytest.raises(m.MachError):
            bs.parse_record(rec[:-8], 0, 7)  # cut short
    void, n = bs.parse_record(bs.void_record(3, 64), 0, 3)
    assert void is None and n == 64
    assert struct.calcsize("<qII") == bs.HEAD.size == 16
