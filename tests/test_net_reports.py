"""Seeing the network: `ps`, `lsmp` and `vmmap` say which ports live on other hosts.

A port of another host is, on this host, a proxy the netmsgserver made for it; the
kernel's reports show it as such: `lsmp` gives "host NAME" as its receiver (and
`remote_host` in --json), `ps` counts a task's remote names (REM), and `vmmap` names
the host of a memory object's manager. Here on the in-process network; the same
report code runs in machd (tests/test_net_tcp.py starts real hosts).
"""

from __future__ import annotations

import threading

import pymach as m
from pymach.cli.demo_net import run_net_demo
from pymach.kern.report import format_lsmp, format_ps
from pymach.net.netname import netname_check_in, netname_wait

WAIT_MS = 10_000


def _serve(name: str, done: threading.Event) -> None:
    """Check a port in as `name` and wait (holding its receive right) until `done`."""
    me = m.task_self()
    port = m.port_allocate(me)
    netname_check_in(m.task_get_special_port(me, m.TASK_BOOTSTRAP_PORT), name, port)
    done.wait(WAIT_MS / 1000)


def _hold(name: str, looked_up: threading.Event, done: threading.Event) -> int:
    """Look up `name` on the network and hold the send right until `done`."""
    port: int = netname_wait(name, WAIT_MS)
    looked_up.set()
    done.wait(WAIT_MS / 1000)
    return port


def test_lsmp_and_ps_show_where_a_remote_port_lives() -> None:
    looked_up, done = threading.Event(), threading.Event()
    with m.Network() as net:
        a, b = net.host("A"), net.host("B")
        server = a.start(_serve, "svc", done, name="server")
        holder = b.start(_hold, "svc", looked_up, done, name="holder")
        assert looked_up.wait(WAIT_MS / 1000)
        rows = b.kernel.lsmp("holder")
        remote = [r for r in rows if r.remote_host]
        assert [(r.remote_host, r.receiver) for r in remote] == [("A", "host A")]
        assert "host A" in format_lsmp("holder", rows)
        (row,) = [r for r in b.kernel.ps() if r.name == "holder"]
        assert row.remote_names == 1
        assert " REM " in format_ps([row]).splitlines()[0]
        # on A the port is local: its receiver is the server task, nothing is remote
        rows_a = a.kernel.lsmp("server")
        assert all(r.remote_host == "" for r in rows_a)
        assert any(r.receiver == "server" and "recv" in r.rights for r in rows_a)
        done.set()
        assert holder.wait(WAIT_MS) == remote[0].name
        server.wait(WAIT_MS)


def test_demo_net_shows_an_rpc_a_moving_right_and_a_dying_host() -> None:
    """`pymach demo net`: every scene does what it narrates."""
    lines: list[str] = []
    run_net_demo(out=lines.append)
    text = "\n".join(lines)
    assert "calc_add(20, 22) on host A = 42" in text
    assert any("host A" in line and "send" in line for line in lines)  # lsmp on B
    assert "the four calls were answered on A, A, B, B" in text
    assert "the call failed: MIG_SERVER_DIED" in text
    assert "ended with MIG_SERVER_DIED" in text
