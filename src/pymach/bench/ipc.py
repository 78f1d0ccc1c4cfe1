"""`pymach bench ipc`: null msg_rpc between two tasks versus plain Python baselines.

Three figures, measured in one run on this machine:
- a null msg_rpc round trip between two tasks of the embedded kernel (free scheduler);
- a thread-to-thread round trip through two `queue.SimpleQueue`s (the cost floor of any
  in-process handoff between Python threads);
- a 1-byte round trip over a `socket.socketpair` between two processes;
- the embedded kernel's own floor: two threads handing a turn back and forth through
  two condition variables of one lock, as the free scheduler's waits are
  (kern/sched_free.py), with no kernel work at all (`condition_handoff_us`).
Each is the median of several rounds of `n` round trips; ratios are pymach / baseline.
The target (`target_ratio_at_most`) is for msg_rpc against the thread handoff: at most
1.5x.
"""

from __future__ import annotations

import os
import queue
import socket
import statistics
import threading
import time
from typing import Any

import pymach
from pymach import Message

STOP = 2


def median_us(samples: list[float], n: int) -> float:
    """Microseconds per operation: the median round of `n` operations."""
    return statistics.median(samples) / n * 1e6


def bench_msg_rpc(n: int, rounds: int) -> float:
    """Median microseconds per null msg_rpc between two embedded tasks."""
    with pymach.boot() as kernel:
        me = pymach.task_self()
        svc = pymach.port_allocate(me)
        server = kernel.spawn(_rpc_server, name="bench-server")
        notify = pymach.task_get_special_port(server.port, pymach.TASK_NOTIFY_PORT)
        pymach.msg_send(Message(remote_port=notify, items=[pymach.Port(svc, pymach.MOVE_RECEIVE)]))
        samples = time_rpcs(svc, n, rounds, warmup=5)
        server.result(timeout=10_000)
    return median_us(samples, n)


def time_round_trips(sock: socket.socket, n: int, rounds: int) -> list[float]:
    """Seconds per round of `n` one-byte round trips over `sock` (its peer echoes)."""
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            sock.sendall(b"x")
            sock.recv(1)
        samples.append(time.perf_counter() - t0)
    return samples


def time_rpcs(svc: int, n: int, rounds: int, warmup: int) -> list[float]:
    """Seconds per round of `n` null msg_rpc calls to `svc` (after `warmup` calls);
    then tells the server to stop."""
    reply = pymach.port_allocate(pymach.task_self())
    req = Message(remote_port=svc, local_port=reply, id=1)
    for _ in range(warmup):
        pymach.msg_rpc(req)
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            pymach.msg_rpc(req)
        samples.append(time.perf_counter() - t0)
    pymach.msg_send(Message(remote_port=svc, id=STOP))
    return samples


def _rpc_server() -> None:
    """A null server, written as a Mach server loop is: each reply and the next receive
    in one call (msg_send_receive)."""
    svc = pymach.msg_receive(pymach.task_notify()).items[0].name  # type: ignore[union-attr]
    msg = pymach.msg_receive(svc)
    while msg.id != STOP:
        msg = pymach.msg_send_receive(Message(remote_port=msg.remote_port, id=msg.id + 100),
                                      svc)


def bench_thread_queue(n: int, rounds: int) -> float:
    """Median microseconds per round trip between two threads over SimpleQueues."""
    to_srv: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    to_cli: queue.SimpleQueue[int] = queue.SimpleQueue()

    def server() -> None:
        while (item := to_srv.get()) is not None:
            to_cli.put(item)

    t = threading.Thread(target=server, daemon=True)
    t.start()
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for i in range(n):
            to_srv.put(i)
            to_cli.get()
        samples.append(time.perf_counter() - t0)
    to_srv.put(None)
    t.join()
    return median_us(samples, n)


def bench_condition_handoff(n: int, rounds: int) -> float:
    """Median microseconds per round trip between two threads that wait on condition
    variables of one lock (the embedded kernel's wake-up, without its work)."""
    lock = threading.Lock()
    to_srv, to_cli = threading.Condition(lock), threading.Condition(lock)
    turn = [0]  # (lock) 1: the server's, 2: the client's, -1: stop

    def server() -> None:
        with lock:
            while True:
                while turn[0] == 0 or turn[0] == 2:
                    to_srv.wait()
                if turn[0] < 0:
                    return
                turn[0] = 2
                to_cli.notify_all()

    t = threading.Thread(target=server, daemon=True)
    t.start()
    samples = []
    with lock:
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(n):
                turn[0] = 1
                to_srv.notify_all()
                while turn[0] != 2:
                    to_cli.wait()
            samples.append(time.perf_counter() - t0)
        turn[0] = -1
        to_srv.notify_all()
    t.join()
    return median_us(samples, n)


def bench_socketpair(n: int, rounds: int) -> float:
    """Median microseconds per 1-byte round trip between two processes over a socketpair."""
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # child: echo until EOF
        a.close()
        while data := b.recv(1):
            b.sendall(data)
        os._exit(0)
    b.close()
    samples = time_round_trips(a, n, rounds)
    a.close()
    os.waitpid(pid, 0)
    return median_us(samples, n)


def run(n: int = 5000, rounds: int = 5) -> dict[str, Any]:
    """Run all three and return figures (microseconds per round trip), ratios and the
    target for the ratio to the thread handoff."""
    rpc = bench_msg_rpc(n, rounds)
    q = bench_thread_queue(n, rounds)
    sp = bench_socketpair(n, rounds)
    cond = bench_condition_handoff(n, rounds)
    return {
        "benchmark": "ipc",
        "round_trips_per_round": n,
        "rounds": rounds,
        "msg_rpc_us": round(rpc, 2),
        "thread_queue_us": round(q, 2),
        "socketpair_us": round(sp, 2),
        "ratio_msg_rpc_vs_thread_queue": round(rpc / q, 2),
        "target_ratio_at_most": 1.5,  # for ratio_msg_rpc_vs_thread_queue
        "ratio_msg_rpc_vs_socketpair": round(rpc / sp, 2),
        "condition_handoff_us": round(cond, 2),  # the embedded kernel's wake-up alone
        "ratio_condition_handoff_vs_thread_queue": round(cond / q, 2),
    }
