"""`pymach demo migrate`: copy-on-reference task migration (paper 8.2), narrated.

Native mode only (Linux: userfaultfd): the demo starts a private machd, attaches itself
as a task, and spawns a migratable counter server (`spawn(counter, ..., migratable=True)`)
that keeps its count in pymach memory at a fixed address. A client calls it three
times, the demo moves it (`task_migrate`: its memory copy-on-write at the same address,
its receive right under the same name), and the client calls it three times more
through the same port: another process answers (another pid, `migrated()` true), and
the count goes on from where it was, since the page holding it moved with the task.
On one host for now (README, "Copy-on-reference task migration").
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

import pymach
from pymach import MOVE_ALL, Int, Message, Port
from pymach.pmap.native_map import WINDOW_BASE

STATE = WINDOW_BASE + (1 << 36)  # where the counter keeps its count (pymach memory)
PAGE = 4096
STOP = 99


def counter(svc: int) -> None:
    """A migratable counter: each request is answered [pid, count, migrated]."""
    me = pymach.task_self()
    if not pymach.vm_regions(me, STATE, PAGE):  # first run: make the state
        pymach.vm_allocate(me, STATE, PAGE, False)
    count = np.frombuffer(pymach.memory().buffer(STATE, 8), dtype=np.int64)
    while True:
        req = pymach.msg_receive(svc)
        if req.id == STOP:
            return
        count[0] += 1
        pymach.msg_send(Message(remote_port=req.remote_port, items=[
            Int(os.getpid()), Int(int(count[0])), Int(int(pymach.migrated()))]))


def _call(svc: int, say: Callable[[str], Any]) -> int:
    reply = pymach.msg_rpc(Message(remote_port=svc, local_port=pymach.thread_reply()),
                           pymach.RCV_TIMEOUT, receive_timeout=30_000)
    pid, count, moved = (int(v) for v in reply.values())
    say(f"[client] count {count}, answered by pid {pid}"
        f"{' (migrated)' if moved else ''}")
    return pid


def run_migrate_demo(deterministic: bool = False, seed: int = 0, trace: bool = False,
                     out: Callable[[str], Any] = print) -> None:
    """Run the narrated migration demo on a private machd (native mode only)."""
    from pymach.bench.native import native_task

    out("-- copy-on-reference task migration (paper 8.2), on a private machd --")
    with native_task("--memory", "256M"):
        me = pymach.task_self()
        svc = pymach.port_allocate(me)
        handle = pymach.spawn(counter, Port(svc, MOVE_ALL), name="counter",
                              migratable=True)
        before = {_call(svc, out) for _ in range(3)}
        out(f"[demo] moving task 'counter' (task_migrate): its memory at {STATE:#x} goes "
            "copy-on-write, its port under the same name")
        pymach.task_migrate(handle.port)
        after = {_call(svc, out) for _ in range(3)}
        out(f"[demo] one port throughout; pids {sorted(before)} before, {sorted(after)} "
            "after; the count went on")
        pymach.msg_send(Message(remote_port=svc, id=STOP))
