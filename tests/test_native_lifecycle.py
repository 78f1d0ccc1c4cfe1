"""The life of tasks a native program spawns (issue 13, items 1 and 2).

A spawned task ends when its function returns, whatever became of its parent: a parent
that exits first is not told (no traceback, no process left behind). Ctrl-C on
`pymach exec prog.py` ends the program and the tasks it spawned, except those spawned
with `detach=True`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nativeutil import running_machd


@pytest.fixture(scope="module")
def machd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from running_machd(tmp_path_factory)


def _env(socket: str) -> dict[str, str]:
    return {**os.environ, "PYMACH_SOCKET": socket}


def _tasks(socket: str) -> str:
    return subprocess.run([sys.executable, "-m", "pymach", "ps"], env=_env(socket),
                          capture_output=True, text=True, timeout=60).stdout


def _script(tmp_path: Path, name: str, source: str) -> Path:
    """A program file written from `source` (dedented)."""
    prog = tmp_path / name
    prog.write_text(textwrap.dedent(source))
    return prog


def _exec(machd: str, prog: Path) -> subprocess.CompletedProcess[str]:
    """`pymach exec prog` as a user runs it (returns once every output is closed)."""
    return subprocess.run([sys.executable, "-m", "pymach", "exec", str(prog)],
                          env=_env(machd), capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def _wait_for(predicate, seconds: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_a_child_whose_parent_exited_ends_when_its_function_returns(
        machd: str, tmp_path: Path) -> None:
    prog = _script(tmp_path, "parent.py", """
        import time, pymach
        def slow():
            time.sleep(1.0)
            return 7
        pymach.spawn(slow, name="orphan")
        print("parent exits")
    """)
    r = _exec(machd, prog)
    assert r.returncode == 0 and r.stdout.strip() == "parent exits"
    assert r.stderr == ""  # the child did not print a traceback for the missing parent
    assert _wait_for(lambda: "orphan" not in _tasks(machd), 10)


def test_ctrl_c_ends_the_program_and_its_tasks_but_detached_ones(
        machd: str, tmp_path: Path) -> None:
    prog = _script(tmp_path, "interrupted.py", """
        import time, pymach
        def sleeper():
            time.sleep(60)
        pymach.spawn(sleeper, name="attached-child")
        kept = pymach.spawn(sleeper, name="detached-child", detach=True)
        print("ready", flush=True)
        time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-m", "pymach", "exec", str(prog)],
                         env=_env(machd), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         stdin=subprocess.DEVNULL, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        assert _wait_for(lambda: "attached-child" in _tasks(machd), 10)
        p.send_signal(signal.SIGINT)
        assert p.wait(30) != 0
        assert _wait_for(lambda: "attached-child" not in _tasks(machd), 10)
        assert "detached-child" in _tasks(machd)
    finally:
        p.kill()
        p.wait()
    out = subprocess.run([sys.executable, "-m", "pymach", "ps", "--json"], env=_env(machd),
                         capture_output=True, text=True, timeout=60).stdout
    assert "detached-child" in out


def test_threads_terminated_before_they_run_end_quietly(machd: str, tmp_path: Path) -> None:
    """thread_create then thread_terminate at once: a thread that had not started is
    told so by machd and never runs its code; one that had started is unwound at its
    kernel boundary (it waits in msg_receive). Nothing is printed, the task ends with
    its program, and its thread count agrees with task_threads."""
    prog = _script(tmp_path, "terminated.py", """
        import pymach
        me = pymach.task_self()
        port = pymach.port_allocate(me)
        def waiter():
            pymach.msg_receive(port)
            print("a terminated thread ran on", flush=True)
        for _ in range(8):
            pymach.thread_terminate(pymach.thread_create(me, waiter))
        print(len(pymach.task_threads(me)), pymach.task_info(me)[2])
    """)
    r = _exec(machd, prog)
    assert (r.returncode, r.stdout.strip(), r.stderr) == (0, "1 1", "")


def _machd_children(socket: str) -> list[str]:
    """The states (R, S, Z, ...) of the processes whose parent is the machd at `socket`."""
    machd = [p for p in os.listdir("/proc") if p.isdigit() and _cmdline(p).count(socket)]
    states = []
    for p in os.listdir("/proc"):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] in machd:
            states.append(fields[0])
    return states


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def test_ended_task_processes_are_reaped(machd: str, tmp_path: Path) -> None:
    """machd reaps the processes of tasks that end (no zombies until the next spawn)."""
    prog = _script(tmp_path, "three.py", """
        import pymach
        def one():
            return 1
        print(sum(pymach.spawn(one).result(30_000) for _ in range(3)))
    """)
    r = _exec(machd, prog)
    assert r.stdout.strip() == "3", r.stderr
    assert _wait_for(lambda: "Z" not in _machd_children(machd), 10)


def test_a_stray_access_ends_a_spawned_task_with_pymachs_diagnostic(
        machd: str, tmp_path: Path) -> None:
    """A NumPy-style view used after vm_deallocate (the address has no memory: Linux
    raises SIGSEGV in the process) ends the task; machd, which started its process, says
    why on the task's stderr, and .result() gives None (the task ended without
    returning)."""
    prog = _script(tmp_path, "stray.py", """
        import pymach
        def bad():
            me = pymach.task_self()
            a = pymach.vm_allocate(me, 0, 4096, True)
            view = pymach.memory().buffer(a, 4096)
            view[0] = 1
            pymach.vm_deallocate(me, a, 4096)
            view[0] = 2
            return "not reached"
        print("result:", pymach.spawn(bad, name="stray").result(30_000))
    """)
    r = _exec(machd, prog)
    assert r.stdout.strip() == "result: None"
    assert "pymach: task 'stray' ended: memory exception: SIGSEGV" in r.stderr


_DIE_WHILE_DETACHING = """
import socket, sys, threading
from pymach.include import traps
from pymach.include.channel import Channel
from pymach.libmach.task import NativeProcess

here, there = socket.socketpair()
process = NativeProcess("/nonexistent")
process.detaching = sys.argv[1] == "detaching"
Channel(there).send(traps.DIE, ["machd is shutting down"])
process._control(Channel(here))  # exits the process with 70 unless detaching
print("went on", process.control_closed.is_set())
"""


@pytest.mark.parametrize("detaching", [True, False])
def test_a_process_leaving_its_task_is_not_ended_by_a_machd_shutting_down(
        detaching: bool) -> None:
    """A DIE from machd ends the process (status 70), unless the process is leaving
    the task (detach): a machd stopped after a detach that gave up waiting for it (5 s
    at most) would end a process that has gone on without it."""
    done = subprocess.run([sys.executable, "-c", _DIE_WHILE_DETACHING,
                           "detaching" if detaching else "attached"],
                          capture_output=True, text=True, timeout=60)
    if detaching:
        assert (done.returncode, done.stdout) == (0, "went on True\n"), done.stderr
    else:
        assert done.returncode == 70 and done.stdout == "", done.stderr
