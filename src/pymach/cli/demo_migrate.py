"""`pymach demo migrate`: copy-on-reference task migration (paper 8.2), narrated.

Native mode only (Linux: userfaultfd): the demo starts two machd hosts, A and B, joined
in a private cluster over loopback TCP with mutual TLS (one private machd if the
`openssl` command is missing), attaches itself as a task of A, and spawns a migratable
counter server (`spawn(counter, ..., migratable=True)`) that keeps its count in pymach
memory at a fixed address. A client calls it three times; the demo moves it within A
(`task_migrate`: its memory copy-on-write at the same address, its receive right under
the same name), the client calls three times more through the same port; then the demo
moves it to host B (`task_migrate(task, "B")`: its memory by reference from A, its
receive right across hosts) and the client calls three times more. Each time another
process answers (another pid, `migrated()` true), on the host it says, and the count
goes on from where it was, since the page holding it moved with the task.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

import pymach
from pymach import MOVE_ALL, Int, Message, Port
from pymach.net.migration import host_is_local
from pymach.pmap.native_map import WINDOW_BASE

STATE = WINDOW_BASE + (1 << 36)  # where the counter keeps its count (pymach memory)
PAGE = 4096
STOP = 99


def counter(svc: int, hosts: list[str]) -> None:
    """A migratable counter: each request is answered [pid, count, migrated, where]
    (`where`: the index in `hosts` of the host it runs on, -1 if none)."""
    me = pymach.task_self()
    if not pymach.vm_regions(me, STATE, PAGE):  # first run: make the state
        pymach.vm_allocate(me, STATE, PAGE, False)
    count = np.frombuffer(pymach.memory().buffer(STATE, 8), dtype=np.int64)
    where = next((i for i, h in enumerate(hosts) if _is_here(h)), -1)
    while True:
        req = pymach.msg_receive(svc)
        if req.id == STOP:
            return
        count[0] += 1
        pymach.msg_send(Message(remote_port=req.remote_port, items=[
            Int(os.getpid()), Int(int(count[0])), Int(int(pymach.migrated())), Int(where)]))


def _is_here(host: str) -> bool:
    with contextlib.suppress(pymach.MachError):
        return host_is_local(host)
    return False


def _call(svc: int, hosts: list[str], say: Callable[[str], Any]) -> int:
    reply = pymach.msg_rpc(Message(remote_port=svc, local_port=pymach.thread_reply()),
                           pymach.RCV_TIMEOUT, receive_timeout=30_000)
    pid, count, moved, where = (int(v) for v in reply.values())
    on = f" on host {hosts[where]}" if where >= 0 else ""
    say(f"[client] count {count}, answered by pid {pid}{on}"
        f"{' (migrated)' if moved else ''}")
    return pid


@contextlib.contextmanager
def _hosts(out: Callable[[str], Any]) -> Iterator[list[str]]:
    """This process as a task of host A of a two-host cluster (["A", "B"]), or of one
    private machd ([]) without openssl."""
    from pymach.bench.native import native_task
    from pymach.bench.net_shm import machd_cluster
    from pymach.libmach.task import attach, detach

    if shutil.which("openssl") is None:
        out("[demo] no openssl command: one host only (a cluster needs certificates)")
        with native_task("--memory", "256M"):
            yield []
        return
    with tempfile.TemporaryDirectory() as tmp, machd_cluster(tmp, ["A", "B"]) as cluster:
        attach(cluster.socks[0], name="demo")
        try:
            deadline = time.monotonic() + 30
            while not _up("B") and time.monotonic() < deadline:  # the hosts connect
                time.sleep(0.05)
            yield ["A", "B"]
        finally:
            detach()


def _up(host: str) -> bool:
    try:
        return not host_is_local(host)
    except pymach.MachError:
        return False


def run_migrate_demo(deterministic: bool = False, seed: int = 0, trace: bool = False,
                     out: Callable[[str], Any] = print) -> None:
    """Run the narrated migration demo on private machd hosts (native mode only)."""
    out("-- copy-on-reference task migration (paper 8.2), on private machd hosts --")
    with _hosts(out) as hosts:
        me = pymach.task_self()
        svc = pymach.port_allocate(me)
        handle = pymach.spawn(counter, Port(svc, MOVE_ALL), hosts, name="counter",
                              migratable=True)
        pids = [{_call(svc, hosts, out) for _ in range(3)}]
        out(f"[demo] moving task 'counter' (task_migrate): its memory at {STATE:#x} goes "
            "copy-on-write, its port under the same name")
        pymach.task_migrate(handle.port)
        pids.append({_call(svc, hosts, out) for _ in range(3)})
        if hosts:
            out("[demo] moving task 'counter' to host B (task_migrate(task, 'B')): its "
                "memory by reference from A, its receive right across hosts")
            pymach.task_migrate(handle.port, "B")
            pids.append({_call(svc, hosts, out) for _ in range(3)})
        out(f"[demo] one port throughout; pids {' then '.join(map(str, map(sorted, pids)))}; "
            "the count went on")
        pymach.msg_send(Message(remote_port=svc, id=STOP))
