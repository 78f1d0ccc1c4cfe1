"""Native mode when things go wrong: dying tasks, dead or silent pagers, a pager faulting
on its own object, and machd itself dying or shutting down. Each case must end cleanly
(a clear diagnostic, an exit status) and never hang; machd goes on serving."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

import pymach as m
from nativeutil import start_machd, stop_machd, uffd_or_skip
from pymach import Int, Message
from pymach.errors import MachError

PS = 4096


# -- handshakes between the test task and a spawned child ------------------------------
def _ask(child: m.mach.Spawned, *items: object) -> Message:
    """Send the child a reply port (and items) on its notify port; return its answer."""
    me = m.task_self()
    box = m.port_allocate(me)
    notify = m.task_get_special_port(child.port, m.TASK_NOTIFY_PORT)
    m.msg_send(Message(remote_port=notify, items=[m.Port(box, m.MAKE_SEND), *items]))
    return m.msg_receive(box, m.RCV_TIMEOUT, 20_000)


def _answer(*items: object) -> Message:
    """In the child: wait for `_ask`, answer it with `items`; returns the request."""
    ask = m.msg_receive(m.task_notify(), m.RCV_TIMEOUT, 20_000)
    m.msg_send(Message(remote_port=ask.items[0].value, items=list(items)))  # type: ignore
    return ask


def _aborted(child: m.mach.Spawned) -> None:
    assert child.result(20_000) is None  # it ended without returning
    assert child.done


# -- a task that dies -------------------------------------------------------------------
def _dies_holding_memory_and_a_port(pages: int) -> None:
    me = m.task_self()
    a = m.vm_allocate(me, 0, pages * PS, True)
    m.memory()[a:a + pages * PS] = b"z" * (pages * PS)
    _answer(m.Port(m.port_allocate(me), m.MAKE_SEND))
    m.msg_receive(m.task_notify(), m.RCV_TIMEOUT, 20_000)  # "now die"
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_task_loses_its_ports_and_its_memory(native: str) -> None:
    me = m.task_self()
    before = m.vm_statistics(me).free_count
    child = m.spawn(_dies_holding_memory_and_a_port, 32)
    port = _ask(child).items[0].value
    assert m.vm_statistics(me).free_count <= before - 32
    _ask_no_wait(child)
    _aborted(child)
    with pytest.raises(MachError) as e:
        m.msg_send(Message(remote_port=port, id=1))  # type: ignore[arg-type]
    assert e.value.code == "SEND_INVALID_PORT"  # a dead name, as in the embedded kernel
    assert m.vm_statistics(me).free_count == before  # every page came back
    assert m.vm_read(me, m.vm_allocate(me, 0, PS, True), 4) == bytes(4)  # machd goes on


def _ask_no_wait(child: m.mach.Spawned) -> None:
    notify = m.task_get_special_port(child.port, m.TASK_NOTIFY_PORT)
    m.msg_send(Message(remote_port=notify, id=1))


# -- pagers that die or never answer --------------------------------------------------
class Pages(m.DataManager):
    """Page n holds the byte n, repeated."""

    threads = max_threads = 1

    def read(self, memory_object: int, offset: int, length: int, access: int) -> bytes:
        return b"".join(bytes([(offset // PS + i) % 256]) * PS for i in range(length // PS))


def _pager(silent: bool) -> None:
    """Hand out a memory object with this process's pid; serve it, or never answer."""
    dm = Pages()
    mo = dm.create_memory_object()
    _answer(m.Port(mo, m.MAKE_SEND), Int(os.getpid()))
    if silent:
        m.msg_receive(m.port_allocate(m.task_self()))  # holds the object, answers nothing
    dm.serve()


def _map_from(pager: m.mach.Spawned, pages: int) -> tuple[int, int]:
    reply = _ask(pager)
    mo, pid = reply.items[0].value, reply.items[1].value
    a = m.vm_allocate_with_pager(m.task_self(), 0, pages * PS, True, mo, 0)
    return a, pid  # type: ignore[return-value]


def _touch(a: int, page: int) -> bytes:
    """Read through memory(): a fault it cannot take is a MachError, as embedded."""
    return m.memory()[a + page * PS:a + page * PS + 4]  # type: ignore[return-value]


def _load(a: int, page: int) -> bytes:
    """A plain load (NumPy): a fault machd cannot serve is a memory exception."""
    import numpy as np

    view = np.frombuffer(m.memory().buffer(a + page * PS, 4), dtype=np.uint8)
    return bytes(view)


def _memory_error(child: m.mach.Spawned, *words: str) -> None:
    with pytest.raises(MachError) as e:
        child.result(20_000)
    assert e.value.code == "KERN_MEMORY_ERROR" and all(w in str(e.value) for w in words)


def _waits_forever() -> None:
    _answer()
    m.msg_receive(m.port_allocate(m.task_self()))


def test_a_task_ended_by_another_is_told_by_whom(capfd: pytest.CaptureFixture[str],
                                                 native: str) -> None:
    child = m.spawn(_waits_forever, name="sleeper")
    _ask(child)  # it is up (and about to block)
    m.task_terminate(child.port)
    _aborted(child)
    me = m.task_info(m.task_self())[0]
    deadline = time.monotonic() + 10  # machd writes it as the process ends
    err = ""
    while f"task_terminate by task {me!r}" not in err and time.monotonic() < deadline:
        err += capfd.readouterr().err
        time.sleep(0.05)
    assert f"pymach: task 'sleeper' ended by machd: task_terminate by task {me!r}" in err


def test_a_dead_pager_ends_the_faulting_task_with_a_memory_error(
        capfd: pytest.CaptureFixture[str], native: str) -> None:
    me = m.task_self()
    pager = m.spawn(_pager, False, name="doomed-pager")
    a, pid = _map_from(pager, 64)  # more than one cluster (machd asks 16 pages)
    assert _touch(a, 0) == b"\0" * 4 and _touch(a, 1) == b"\1" * 4
    m.vm_inherit(me, a, 64 * PS, m.VM_INHERIT_SHARE)
    os.kill(pid, signal.SIGKILL)
    _aborted(pager)
    _memory_error(m.spawn(_touch, a, 40, inherit=True), "is gone")  # not resident
    _aborted(m.spawn(_load, a, 41, inherit=True, name="client"))
    err = capfd.readouterr().err
    assert "'client' ended by machd: memory exception: KERN_MEMORY_ERROR" in err
    assert _touch(a, 1) == b"\1" * 4  # resident data stays readable
    m.vm_deallocate(me, a, 64 * PS)


def _maps_and_reads(pages: int, zero_fill: bool, read: Any = _touch) -> bytes:
    mo = _answer().items[1].value
    a = m.vm_allocate_with_pager(m.task_self(), 0, pages * PS, True, mo, 0)  # type: ignore
    m.vm_pager_timeout(m.task_self(), a, pages * PS, 300, zero_fill)
    return read(a, 2)  # type: ignore[no-any-return]


@pytest.mark.parametrize("zero_fill", [True, False])
def test_a_silent_pager_gives_the_configured_outcome(
        capfd: pytest.CaptureFixture[str], native: str, zero_fill: bool) -> None:
    pager = m.spawn(_pager, True, name="silent-pager")
    mo = _ask(pager).items[0].value
    for read in (_touch, _load):
        client = m.spawn(_maps_and_reads, 4, zero_fill, read, name="waiter")
        _ask(client, m.Port(mo, m.COPY_SEND))  # type: ignore[arg-type]
        t = time.monotonic()
        if zero_fill:
            assert client.result(20_000) == bytes(4)
        elif read is _touch:
            _memory_error(client, "did not answer within 300")
        else:
            _aborted(client)
            assert "'waiter' ended by machd: memory exception: KERN_MEMORY_ERROR" in \
                capfd.readouterr().err
        assert time.monotonic() - t < 10
    m.task_terminate(pager.port)


def _faults_on_its_own_object(read: Any) -> None:
    dm = Pages()
    mo = dm.create_memory_object()
    a = m.vm_allocate_with_pager(m.task_self(), 0, PS, True, mo, 0)
    read(a, 0)  # nobody but this very thread could answer


def test_a_pager_faulting_on_its_own_object_is_detected(
        capfd: pytest.CaptureFixture[str], native: str) -> None:
    _memory_error(m.spawn(_faults_on_its_own_object, _touch), "that it manages itself")
    _aborted(m.spawn(_faults_on_its_own_object, _load, name="self-backed"))
    err = capfd.readouterr().err
    assert "KERN_MEMORY_ERROR" in err and "that it manages itself" in err


# -- machd itself -----------------------------------------------------------------------
_WAITER = textwrap.dedent("""
    import sys, time
    import pymach as m
    if sys.argv[1] == "trap":
        p = m.port_allocate(m.task_self())
        print("ready", flush=True)
        m.msg_receive(p)
    else:
        print("ready", flush=True)
        while True:
            time.sleep(0.05)
""")


def _waiting_task(socket: Path, script: Path, where: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-m", "pymach.cli.main", "exec", "--socket",
                             str(socket), str(script), where], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


@pytest.fixture
def own_machd(tmp_path: Path) -> tuple[Path, Path]:
    uffd_or_skip()
    script = tmp_path / "waiter.py"
    script.write_text(_WAITER)
    return tmp_path / "machd.sock", script


def test_when_machd_dies_every_task_exits_with_a_message(own_machd: tuple[Path, Path]) -> None:
    sock, script = own_machd
    daemon = start_machd(sock)
    tasks = [_waiting_task(sock, script, "trap"), _waiting_task(sock, script, "python")]
    daemon.kill()
    daemon.wait(20)
    for t in tasks:
        _, err = t.communicate(timeout=20)
        assert t.returncode == 3 and "machd went away" in err


def test_sigterm_shuts_machd_down_and_ends_its_tasks(own_machd: tuple[Path, Path]) -> None:
    sock, script = own_machd
    daemon = start_machd(sock)
    task = _waiting_task(sock, script, "trap")
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(20) == 0
    _, err = task.communicate(timeout=20)
    assert task.returncode == 70 and "machd is shutting down" in err
    assert not sock.exists()


def test_machd_refuses_a_socket_in_use_with_a_clear_message(
        own_machd: tuple[Path, Path]) -> None:
    sock, script = own_machd
    daemon = start_machd(sock)
    try:
        second = subprocess.run([sys.executable, "-m", "pymach.cli.main", "machd", "--socket",
                                 str(sock)], capture_output=True, text=True, timeout=60)
        assert second.returncode == 1 and "already running" in second.stderr
        missing = subprocess.run([sys.executable, "-m", "pymach.cli.main", "exec", "--socket",
                                  str(sock) + ".none", str(script)], capture_output=True,
                                 text=True, timeout=60)
        assert missing.returncode == 1 and "start one with `pymach machd`" in missing.stderr
    finally:
        stop_machd(daemon)


def test_machd_without_userfaultfd_says_which_fix_applies(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from pymach.cli.main import main
    from pymach.machd import machd

    monkeypatch.setattr(machd, "probe", lambda: "userfaultfd is not allowed for this user: "
                        "run machd as root, or set vm.unprivileged_userfaultfd=1 (sysctl)")
    assert main(["machd", "--socket", "/tmp/pymach-never.sock"]) == 1
    err = capsys.readouterr().err
    assert "machd needs userfaultfd" in err and "vm.unprivileged_userfaultfd=1" in err
