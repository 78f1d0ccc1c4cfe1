"""Copy-on-reference task migration across machd hosts (paper 8.2, issue 11 item 6).

Three machd hosts on loopback addresses, joined over TCP with mutual TLS; host C serves
one process per user (a full host). The test body is a native task of host A. A
migratable server (tests/test_migrate.py's: a NumPy array and a log in pymach memory, a
service port with messages queued on it, an RPC waiting) moves to host B:

- its memory comes to B by reference (the pages it touches after the move, with their
  values), its receive right with the messages queued on it (an RPC made before the
  move is answered on B), its name for each right is the same, the spawn handle follows
  it to B (its outcome comes back from B), and a kernel call on its new task port from
  A reaches B's kernel; `ps` on B lists it, `ps` on A no longer does;
- a move to a host that is not up is refused (KERN_INVALID_HOST) before anything
  changes; a move B accepts but C refuses (C is full) brings the rights back and the
  task runs on at A, unmoved; `pymach migrate TASK B` moves it by name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import pymach as m
from nativeutil import uffd_or_skip
from pymach.bench.net_shm import Cluster, machd_cluster
from pymach.libmach.task import attach, detach
from pymach.mach import end_spawned_tasks
from pymach.net.migration import host_is_local
from test_migrate import (
    ARRAY_PAGES,
    NOTE,
    NOTES,
    SHARED_AT,
    STOP,
    TOUCH,
    WHO,
    hold_with_queue,
    notified,
    rpc,
    sharer,
    start_server,
    wait_for,
)
from test_net_tcp import exec_task
from test_readme import _program as readme_program

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    shutil.which("openssl") is None, reason="making cluster certificates needs openssl")]

FULL = """\
import time
print("up", flush=True)
time.sleep(120)
"""


def hosts_up(*hosts: str) -> bool:
    """Whether this host's netmsgserver has every host in `hosts` up."""
    try:
        return all(not host_is_local(h) for h in hosts)
    except m.MachError:
        return False


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Hosts A, B, C (C: one process per user, taken by a sleeping task); the test body
    is a task of A."""
    uffd_or_skip()
    options = [(), (), ("--max-processes-per-user", "1")]
    with machd_cluster(str(tmp_path), ["A", "B", "C"], options=options) as running:
        (tmp_path / "full.py").write_text(FULL)
        full = exec_task(running.socks[2], tmp_path / "full.py")
        assert full.stdout is not None and full.stdout.readline() == "up\n"
        attach(running.socks[0], name="migrator")
        try:
            wait_for(lambda: hosts_up("B", "C"))
            yield running
        finally:
            end_spawned_tasks()
            detach()
            full.kill()
            full.communicate()


def names_on(sock: str) -> list[str]:
    r = subprocess.run([sys.executable, "-m", "pymach", "ps", "--json", "--socket", sock],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [row["name"] for row in json.loads(r.stdout)]


def test_a_task_moves_to_another_host_with_its_memory_and_ports(cluster: Cluster) -> None:
    h, svc, _ = start_server("mover")
    old_pid, moved = rpc(svc, WHO)
    assert moved == 0
    asker = hold_with_queue(h, svc)
    names = dict(zip(*m.port_names(h.port), strict=True))

    new = m.task_migrate(h.port, "B")

    assert m.task_info(new)[0] == "mover"  # a kernel call that B's kernel answers
    assert h.port == new  # the handle follows the task
    new_pid, moved = asker.result(60_000)  # the rpc made before the move: answered on B
    assert moved == 1 and new_pid != old_pid
    assert rpc(svc, NOTES) == [(11, 22, 33)]  # queued before the move, received on B
    after = dict(zip(*m.port_names(new), strict=True))
    assert {n: t for n, t in names.items() if n in after} == {
        n: after[n] for n in names if n in after}
    stayed = set(names) - set(after)  # every name but its thread's reply port moved
    assert len(stayed) <= 1 and all(names[n] & m.PORT_TYPE_RECEIVE for n in stayed)
    assert rpc(svc, TOUCH, m.Int(10)) == [tuple(3 * i for i in range(10))]
    assert rpc(svc, TOUCH, m.Int(ARRAY_PAGES))[0] == tuple(3 * i for i in range(ARRAY_PAGES))
    assert "mover" in names_on(cluster.socks[1]) and "mover" not in names_on(cluster.socks[0])
    m.msg_send(m.Message(remote_port=svc, id=STOP))
    assert h.result(60_000) == "stopped, migrated=True"  # its outcome came back from B


def test_a_refused_move_leaves_the_task_running_where_it_was(cluster: Cluster) -> None:
    h, svc, _ = start_server("stayer")
    m.msg_send(m.Message(remote_port=svc, id=NOTE, items=[m.Int(7)]))
    assert rpc(svc, NOTES) == [(7,)]  # (noted before any move is tried)
    with pytest.raises(m.MachError, match="not up") as e:
        m.task_migrate(h.port, "D")
    assert e.value.code == "KERN_INVALID_HOST"
    with pytest.raises(m.MachError, match="refused the task") as e:
        m.task_migrate(h.port, "C")  # C has its one process already
    assert e.value.code == "KERN_RESOURCE_SHORTAGE"
    assert rpc(svc, WHO)[1] == 0  # not moved: the same task serves, with its rights
    assert rpc(svc, NOTES) == [(7,)]
    assert m.task_info(h.port)[0] == "stayer"
    r = subprocess.run([sys.executable, "-m", "pymach", "migrate", "stayer", "B", "--socket",
                        cluster.socks[0]], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "moved to host 'B'" in r.stdout
    assert rpc(svc, WHO)[1] == 1 and rpc(svc, NOTES) == [(7,)]
    m.task_terminate(h.port)  # (the handle followed it to B)


MOVER = """\
import sys
import pymach as m
from test_migrate import start_server, rpc, WHO
h, svc, _ = start_server("moved-by-script")
new = m.task_migrate(h.port, sys.argv[1])
print(rpc(svc, WHO)[1], m.task_info(new)[0], flush=True)
m.task_terminate(new)
"""


def test_a_script_moves_its_task_with_the_documented_call(cluster: Cluster,
                                                          tmp_path: Path) -> None:
    """As the README shows: a program run with `pymach exec` on A moves its task to B."""
    (tmp_path / "mover.py").write_text(textwrap.dedent(MOVER))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                                        os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "pymach", "exec", "--socket", cluster.socks[0],
                        str(tmp_path / "mover.py"), "B"], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "1 moved-by-script\n"


def test_the_readme_moves_a_task_to_another_host(cluster: Cluster, tmp_path: Path) -> None:
    """The README's walk-through ("Network over TCP", moving a task), as written."""
    for name in ("tally.py", "start.py", "count.py"):
        (tmp_path / name).write_text(readme_program(f"# {name}:"))

    def pymach_exec(sock: str, script: str) -> str:
        r = subprocess.run([sys.executable, "-m", "pymach", "exec", "--socket", sock,
                            str(tmp_path / script)], capture_output=True, text=True,
                           timeout=120, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        return r.stdout

    sock_a, sock_b = cluster.socks[:2]
    started = subprocess.run([sys.executable, "-m", "pymach", "exec", "--socket", sock_a,
                              str(tmp_path / "start.py")], cwd=tmp_path, timeout=120,
                             stdout=subprocess.DEVNULL)  # (the detached task keeps its
    assert started.returncode == 0  # output: a pipe would stay open while it runs)
    assert pymach_exec(sock_a, "count.py") == "[1, 0]\n"
    r = subprocess.run([sys.executable, "-m", "pymach", "migrate", "tally", "B", "--socket",
                        sock_a], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"task 'tally' \(id \d+\) moved to host 'B'\n", r.stdout)
    assert pymach_exec(sock_a, "count.py") == "[2, 1]\n"
    assert pymach_exec(sock_b, "count.py") == "[3, 1]\n"
    assert "tally" in names_on(sock_b) and "tally" not in names_on(sock_a)


@pytest.mark.parametrize("prepage", [False, True], ids=["on-reference", "prepaged"])
def test_prepaging_brings_the_working_set_before_the_task_starts(
        cluster: Cluster, prepage: bool) -> None:
    """With pre-paging, the pages resident in the task before the move are on B when
    task_migrate returns: touching them there brings nothing more in (B's pageins stay);
    without it, touching them does (the control)."""
    h, svc, _ = start_server("paged")
    assert rpc(svc, TOUCH, m.Int(ARRAY_PAGES))[0] == tuple(3 * i for i in range(ARRAY_PAGES))
    runs = m.vm_resident(h.port)
    assert sum(n for _, n in runs) >= ARRAY_PAGES  # its array is its working set
    new = m.task_migrate(h.port, "B", prepage=prepage)
    before = m.vm_statistics(new).pageins  # B's counter (a kernel call that B answers)
    assert rpc(svc, TOUCH, m.Int(ARRAY_PAGES))[0] == tuple(3 * i for i in range(ARRAY_PAGES))
    came = m.vm_statistics(new).pageins - before
    assert (came == 0) if prepage else (came > 0)
    m.task_terminate(new)


def test_a_shared_region_moves_within_a_host_only(cluster: Cluster) -> None:
    me = m.task_self()
    report = m.port_allocate(me)
    h = m.spawn(sharer, m.Port(report, m.MAKE_SEND), name="sharer", migratable=True)
    child = m.msg_receive(report, m.RCV_TIMEOUT, 60_000).items[1].name
    with pytest.raises(m.MachError, match="within this host only") as e:
        m.task_migrate(h.port, "B")
    assert e.value.code == "KERN_INVALID_ARGUMENT"
    assert m.task_info(h.port)[:2] == ("sharer", 0)  # untouched, running
    assert m.vm_read(child, SHARED_AT, 6) == b"before"
    m.task_terminate(h.port)
    m.task_terminate(child)


def test_notifications_queued_before_a_move_reach_the_new_task_on_b(cluster: Cluster) -> None:
    me = m.task_self()
    report, watched = m.port_allocate(me), m.port_allocate(me)
    h = m.spawn(notified, m.Port(report, m.MAKE_SEND), m.Port(watched, m.MAKE_SEND),
                name="notified", migratable=True)
    assert m.msg_receive(report, m.RCV_TIMEOUT, 60_000).values() == [0]
    m.port_deallocate(me, watched)  # NOTIFY_PORT_DELETED is queued on A
    new = m.task_migrate(h.port, "B")
    note_id, name, its_name = m.msg_receive(report, m.RCV_TIMEOUT, 60_000).values()
    assert note_id == m.NOTIFY_PORT_DELETED and name == its_name  # on B, the same name
    m.task_terminate(new)
