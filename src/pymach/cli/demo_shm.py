"""`pymach demo shm`: the three frames of paper section 4.2, on three hosts.

A shared memory server runs on host A; a client on host B and a client on host C ask
it for the same region X and map it (frame 1: each kernel calls pager_init), read the
same page (frame 2: each kernel asks for the data, which comes with a write lock), and
then client B writes (frame 3: B's kernel asks for an unlock, the server flushes C's
copy and grants B write access). Finally C reads again and sees B's write. Every
protocol message the server sees and sends is printed, frame by frame.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pymach
from pymach.net.netname import netname_wait
from pymach.net.network import Network
from pymach.pagers.shm import SharedMemoryServer, shm_get_region

WAIT_S = 30.0


def _client(steps: list[threading.Event], done: list[threading.Event], write: bool,
            out: dict[str, Any], leave: threading.Event) -> None:
    """Frame 1: map X; frame 2: read; frame 3: write (client B) or read again (C).
    The client keeps X mapped until `leave`."""
    me = pymach.task_self()
    mem = pymach.memory()
    for frame, (go, finished) in enumerate(zip(steps, done, strict=True), start=1):
        go.wait(WAIT_S)
        if frame == 1:
            x, size = shm_get_region(netname_wait("shm"), "X", 4096)
            out["address"] = pymach.vm_allocate_with_pager(me, 0, size, True, x, 0)
        elif frame == 2:
            out["read"] = mem[out["address"]:out["address"] + 5]
        elif write:
            mem[out["address"]:out["address"] + 5] = b"hello"
        else:
            out["read again"] = mem[out["address"]:out["address"] + 5]
        finished.set()
    leave.wait(WAIT_S)


def run_shm_demo(deterministic: bool = False, seed: int = 0, trace: bool = False,
                 out: Callable[[str], Any] = print) -> None:
    """Run the narrated section 4.2 demo (multi-host runs use the free scheduler)."""
    srv = SharedMemoryServer()
    steps = {h: [threading.Event() for _ in range(3)] for h in "BC"}
    done = {h: [threading.Event() for _ in range(3)] for h in "BC"}
    seen: dict[str, dict[str, Any]] = {"B": {}, "C": {}}
    leave = threading.Event()
    out("-- consistent network shared memory (paper 4.2): server on A, clients on B, C --")
    with Network() as net:
        a, b, c = net.host("A", trace=trace), net.host("B"), net.host("C")
        a.start(srv.serve_as, "shm", name="shm-server")
        clients = [b.start(_client, steps["B"], done["B"], True, seen["B"], leave,
                           name="client"),
                   c.start(_client, steps["C"], done["C"], False, seen["C"], leave,
                           name="client")]
        titles = ["frame 1: both clients map X (vm_allocate_with_pager)",
                  "frame 2: both read the same page",
                  "frame 3: client B writes that page; then C reads it again"]
        printed = 0
        for frame in range(3):
            out(f"\n{titles[frame]}")
            for h in ("B", "C"):  # one host at a time, so the frames are the paper's
                steps[h][frame].set()
                done[h][frame].wait(WAIT_S)
                _settle(srv)
            printed = _print_new(srv, out, printed)
        leave.set()
        for client in clients:
            client.wait(WAIT_S * 1000)
    out(f"\nclient B read {seen['B']['read']!r}, then wrote b'hello'; client C read "
        f"{seen['C']['read']!r} and then {seen['C']['read again']!r}")
    out(f"{net.packets} packets crossed the network")


def _settle(srv: SharedMemoryServer, quiet_s: float = 0.1) -> None:
    """Wait until the server's log stops growing (its protocol messages are async)."""
    seen, since = len(srv.log), time.monotonic()
    while time.monotonic() - since < quiet_s:
        time.sleep(0.01)
        if len(srv.log) != seen:
            seen, since = len(srv.log), time.monotonic()


def _print_new(srv: SharedMemoryServer, out: Callable[[str], Any], printed: int) -> int:
    """Print the server's log lines from `printed` on; return the new count."""
    for line in srv.log[printed:]:
        out("  " + line.replace("kernel 1", "host B's kernel").replace(
            "kernel 2", "host C's kernel"))
    return len(srv.log)
