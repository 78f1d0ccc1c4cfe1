"""machd's boundary under attack (issue 9, point 10): what another user, a forged frame,
a stolen token, a task writing memory it may only read, a fuzzer, a resource hog or a
dying machd can and cannot do.

What the boundary promises (machd/machd.py, README "Native mode"): machd never decodes
pickle; its socket lives in a directory only its user can enter; every connection's uid
and pid come from SO_PEERCRED and only machd's own uid is served unless --allow-user;
a client refuses a daemon of another user; a connection becomes a task or a thread only
with a token machd handed out to that very process; a task holds no descriptor that
gives more access than its map allows, and never the userfaultfd; every descriptor
received is closed or owned; hellos are bounded in time and number, connections and
processes per user are bounded, fault_in is bounded; a task never hangs when machd dies.

Each test starts its own machd where it needs options or counts machd's descriptors,
threads and memory; the others share this module's machd.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import pickle
import pwd
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import pymach as m
import pymach.libmach.task as libtask
from boundaryutil import (
    HERE,
    Raw,
    error_of,
    fd_count,
    plus_one,
    reachable_dir,
    rss_bytes,
    run_as,
    settled,
    task_names,
    temp_user,
    thread_count,
)
from nativeutil import start_machd, stop_machd, uffd_or_skip
from pymach.bench.net_shm import machd_cluster
from pymach.errors import MachError
from pymach.include import traps, wire
from pymach.include.channel import Channel, Disconnected
from pymach.include.message import Code
from pymach.kern.thread import current_thread
from pymach.libmach.task import attach, attached, detach
from pymach.net.netname import netname_check_in, netname_wait
from pymach.pmap.uffd import Uffd

PS = 4096


@dataclass
class Daemon:
    """A machd of this module: its socket and its process."""

    sock: Path
    proc: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None


@contextlib.contextmanager
def machd(sock: Path, *options: str) -> Iterator[Daemon]:
    """A machd of its own at `sock` for one test, stopped after."""
    uffd_or_skip()
    proc = start_machd(sock, "--memory", "256M", *options)
    try:
        yield Daemon(sock, proc)
    finally:
        stop_machd(proc)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """The module's machd (a short hello timeout, so forged hellos end quickly)."""
    with machd(tmp_path_factory.mktemp("boundary") / "machd.sock", "--hello-timeout",
               "1") as d:
        yield d


@contextlib.contextmanager
def task_of(d: Daemon, name: str) -> Iterator[None]:
    """The test process as a native task of `d` for the block."""
    attach(str(d.sock), name=name)
    try:
        yield
    finally:
        detach()


def exec_script(d: Daemon, script: Path, *args: str, **popen: Any) -> subprocess.Popen[bytes]:
    """`pymach exec --socket S script args` as a subprocess (binary pipes)."""
    return subprocess.Popen([sys.executable, "-m", "pymach.cli.main", "exec", "--socket",
                             str(d.sock), str(script), *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def read_line(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> str:
    """One line of a subprocess's stdout (AssertionError if none comes in time)."""
    assert proc.stdout is not None
    line = b""
    deadline = time.monotonic() + timeout
    while not line.endswith(b"\n"):
        ready, _, _ = select.select([proc.stdout], [], [], max(deadline - time.monotonic(), 0))
        assert ready, f"no line from the subprocess in {timeout} s (got {line!r})"
        byte = os.read(proc.stdout.fileno(), 1)
        assert byte, f"the subprocess ended (status {proc.poll()}) after {line!r}"
        line += byte
    return line.decode().rstrip("\n")


def tell(proc: subprocess.Popen[bytes], text: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(text.encode() + b"\n")
    proc.stdin.flush()


def finish(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> tuple[int, str, str]:
    """Wait for a subprocess; (status, stdout, stderr); killed if it overstays."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the subprocess did not end in {timeout} s: "
                             f"{err.decode()}") from None
    return proc.returncode, out.decode(), err.decode()


def steady(d: Daemon) -> tuple[int, int]:
    """machd's descriptor and thread counts once they stop moving."""
    last = (-1, -1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = (fd_count(d.pid), thread_count(d.pid))
        if now == last:
            return now
        last = now
        time.sleep(0.3)
    return last


# -- 1. other users ----------------------------------------------------------------------
def _connect(path: str) -> dict[str, Any]:
    """As another user: connect, then wait (2 s) for what machd says."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError as e:
        return {"connected": False, "errno": e.errno}
    s.settimeout(2)
    try:
        data = s.recv(100)
    except TimeoutError:
        return {"connected": True, "open": True}
    except OSError as e:
        return {"connected": True, "errno": e.errno}
    finally:
        s.close()
    return {"connected": True, "open": False, "data": data.hex()}


def _ping(path: str) -> dict[str, Any]:
    with Raw(path) as r:
        r.send(traps.HELLO_PING, [])
        frame = r.reply(5)
    return {"op": frame.op if frame else None, "status": frame.values[0] if frame else None}


def _attach_and_message_self(uffd_fd: int, path: str) -> dict[str, Any]:
    """As another user (its userfaultfd made while root): attach with the library and
    send itself a message; the message says which uid machd recorded for the task."""
    libtask.Uffd.create = classmethod(lambda cls, features=0: Uffd(uffd_fd))  # type: ignore
    attach(path, name="other-user")
    try:
        me = m.task_self()
        p = m.port_allocate(me)
        m.msg_send(m.Message(remote_port=p, id=5))
        msg = m.msg_receive(p, m.RCV_TIMEOUT, 5000)
    finally:
        detach()
    return {"uid": os.getuid(), "sender_uid": msg.sender_uid}


def _new_uffd() -> int:
    return Uffd.create().fd


@pytest.fixture(scope="module")
def other_user() -> Iterator[pwd.struct_passwd]:
    """A system user made for this module (removed after)."""
    with temp_user() as user:
        yield user


def test_another_user_cannot_reach_machd_by_default(other_user: pwd.struct_passwd) -> None:
    with reachable_dir() as base, machd(base / "private" / "machd.sock") as d:
        assert (base / "private").stat().st_mode & 0o777 == 0o700
        assert d.sock.stat().st_mode & 0o777 == 0o600
        got = run_as(other_user, _connect, str(d.sock))
        assert got == {"connected": False, "errno": errno.EACCES}
        # Even with the directory and socket opened up by hand, SO_PEERCRED refuses the
        # uid: the connection is closed at once, with nothing said and nothing made.
        before = task_names(d.sock)
        (base / "private").chmod(0o711)
        d.sock.chmod(0o666)
        got = run_as(other_user, _connect, str(d.sock))
        assert got == {"connected": True, "open": False, "data": ""}
        assert task_names(d.sock) == before and d.alive()


def test_an_allowed_user_is_served_as_the_uid_the_kernel_reports(
        other_user: pwd.struct_passwd) -> None:
    with reachable_dir() as base, machd(base / "shared" / "machd.sock", "--allow-user",
                                        other_user.pw_name) as d:
        assert (base / "shared").stat().st_mode & 0o777 == 0o711
        assert run_as(other_user, _ping, str(d.sock)) == {"op": traps.REPLY,
                                                          "status": traps.REPLY_OK}
        got = run_as(other_user, _attach_and_message_self, str(d.sock), prepare=_new_uffd)
        assert got == {"uid": other_user.pw_uid, "sender_uid": other_user.pw_uid}
        assert "other-user" not in task_names(d.sock)  # it detached: the task is gone


def _channel_attacker(uffd_fd: int, signal_ready: Any, path: str) -> dict[str, Any]:
    """As another user: attach, find the victim's port by name, send it plain messages
    until a direct channel is in use, then garbage on the channel, then one more plain
    message and one carrying this user's code."""
    libtask.Uffd.create = classmethod(lambda cls, features=0: Uffd(uffd_fd))  # type: ignore
    attach(path, name="channel-attacker")
    try:
        signal_ready()
        dest = netname_wait("victim-box", 10_000)
        for i in range(3):
            m.msg_send(m.Message(remote_port=dest, id=i), m.SEND_TIMEOUT, 5000)
        ch = current_thread().process.senders.channels.get(dest)
        if ch is not None:
            ch.sock.send(b"\xff garbage, not a packet")
        m.msg_send(m.Message(remote_port=dest, id=99, items=[m.Str("after")]),
                   m.SEND_TIMEOUT, 5000)
        code = Code(None, blob=b"pickled by the attacker")
        m.msg_send(m.Message(remote_port=dest, id=100, items=[code]), m.SEND_TIMEOUT, 5000)
        alert = current_thread()._alert()  # its thread's alert, made blocking and full:
        os.set_blocking(alert, False)  # machd rings it when it ends this task (detach)
        with contextlib.suppress(BlockingIOError):
            while True:
                os.write(alert, b"\1" * 4096)
        os.set_blocking(alert, True)
        return {"channel": ch is not None}
    finally:
        detach()


def test_garbage_from_another_users_channel_harms_only_that_channel(
        other_user: pwd.struct_passwd) -> None:
    """A task of another user sends to a root task's port over a direct channel, then
    writes garbage on it: the receiver drops that channel and goes on; every message
    the attacker sent properly still arrives, in order, with the uid machd knows (never
    the channel's word), its code inert; machd and the receiver keep working, also
    after the attacker made its thread's alert blocking and full."""
    seen: list[tuple[int, Any, Any]] = []
    with reachable_dir() as base, machd_cluster(  # (a one-host cluster: its netname
            str(base), ["A"], options=[["--allow-user", other_user.pw_name]]) as c:
        sock = c.socks[0]  # service is how two users' tasks meet)

        def victim() -> None:
            attach(sock, name="victim")
            try:
                box = m.port_allocate(m.task_self())
                netname_check_in(m.task_get_special_port(m.task_self(),
                                                         m.TASK_BOOTSTRAP_PORT),
                                 "victim-box", box)
                for _ in range(5):
                    msg = m.msg_receive(box, m.RCV_TIMEOUT, 15_000)
                    item = msg.items[0] if msg.items else None
                    seen.append((msg.id, msg.sender_uid,
                                 item.refused if isinstance(item, Code) else
                                 (item.value if item is not None else None)))
                m.msg_send(m.Message(remote_port=box, id=7), m.SEND_TIMEOUT, 1000)
                assert m.msg_receive(box, m.RCV_TIMEOUT, 1000).id == 7
            finally:
                detach()

        got = run_as(other_user, _channel_attacker, sock, prepare=_new_uffd,
                     ready=victim)
        assert got == {"channel": True}
        assert c.daemons[0].poll() is None  # machd lives
        assert "channel-attacker" not in task_names(Path(sock))  # and answers, after
        # ringing the attacker's jammed alert as it ended that task
    uid = other_user.pw_uid
    assert seen == [(0, uid, None), (1, uid, None), (2, uid, None), (99, uid, "after"),
                    (100, uid, True)]


def test_a_process_machd_starts_for_another_users_task_runs_as_that_user(
        other_user: pwd.struct_passwd, monkeypatch: pytest.MonkeyPatch) -> None:
    """machd starts a task's process with `_as_user` and `_child_env` (machd._spawn):
    the process runs as the task's uid, and another user gets none of machd's own
    environment beyond a neutral base, only the module path its own task reported.
    (The Python of this machine lives under /root, which that user cannot enter, so
    the process checked here is `id`, started the way _spawn starts taskproc.)"""
    from pymach.machd.machd import _as_user, _child_env
    from pymach.machd.remote import TaskEnv

    monkeypatch.setenv("PYMACH_SECRET_OF_MACHD", "only-for-root")
    uid = other_user.pw_uid
    env = _child_env(uid, TaskEnv("/tmp", ["/srv/its-own-lib", ""], ""))
    assert env["PYTHONPATH"] == "/srv/its-own-lib" and "PYMACH_SECRET_OF_MACHD" not in env
    assert env.get("HOME") == other_user.pw_dir
    out = subprocess.run(["sh", "-c", "id -u; id -g; id -G"], capture_output=True, text=True,
                         env=env, cwd="/", check=True, **_as_user(uid))
    assert out.stdout.split() == [str(uid), str(other_user.pw_gid), str(other_user.pw_gid)]
    assert _as_user(os.getuid()) == {}  # machd's own user: started as machd is
    own = _child_env(os.getuid(), TaskEnv("/tmp", [], ""))
    assert own["PYMACH_SECRET_OF_MACHD"] == "only-for-root"


def _fake_daemon(signal_ready: Any, path: str) -> dict[str, Any]:
    """As another user: listen at `path`, take one connection, count what it sends."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    os.chmod(path, 0o666)
    srv.listen(1)
    srv.settimeout(20)
    signal_ready()
    try:
        conn, _ = srv.accept()
    except TimeoutError:
        return {"accepted": False}
    conn.settimeout(10)
    received = b""
    with contextlib.suppress(OSError):
        while chunk := conn.recv(4096):
            received += chunk
    return {"accepted": True, "received": len(received)}


def test_a_client_refuses_a_daemon_of_another_user(
        other_user: pwd.struct_passwd, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYMACH_MACHD_UID", raising=False)
    refused: list[BaseException] = []

    def client() -> None:
        try:
            attach(str(base / "machd.sock"), name="victim")
        except BaseException as e:
            refused.append(e)
        else:
            detach()

    with reachable_dir(owner=other_user.pw_uid) as base:
        got = run_as(other_user, _fake_daemon, str(base / "machd.sock"), ready=client)
    assert got == {"accepted": True, "received": 0}  # it connected, and said nothing
    assert len(refused) == 1 and isinstance(refused[0], MachError), refused
    assert f"runs as uid {other_user.pw_uid}" in str(refused[0])
    assert attached() is None


# -- 2. pickle ------------------------------------------------------------------------------
class _Boom:
    """Unpickling this runs a shell command (creates the marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


_PICKLER = textwrap.dedent("""
    # A task that sends a pickle payload as a frame on its own thread connection.
    import sys
    import pymach as m
    from pymach.kern.thread import current_thread

    m.task_self()  # the connection works
    sock = current_thread().conn.sock
    sock.sendall(bytes.fromhex(sys.argv[1]))
    sock.settimeout(10)
    got = b""
    try:
        while chunk := sock.recv(4096):
            got += chunk
    except ConnectionResetError:
        pass
    print("closed", len(got), flush=True)
""")


def test_a_pickle_payload_creates_nothing(daemon: Daemon, tmp_path: Path) -> None:
    sanity = tmp_path / "unpickled"
    pickle.loads(pickle.dumps(_Boom(sanity)))  # the payload works
    assert sanity.exists()
    marker = tmp_path / "pwned"
    payloads = [pickle.dumps(_Boom(marker), protocol=p) for p in (0, 2, 5)]
    before = task_names(daemon.sock)
    frames: list[tuple[bytes, str]] = []
    for p in payloads:
        frames += [(p, "raw"),
                   (wire.pack_header(traps.HELLO_ATTACH, len(p), 0) + p, "attach header"),
                   (wire.pack_header(traps.HELLO_PING, len(p), 0) + p, "ping header"),
                   (wire.pack_header(traps.MSG_SEND, len(p), 0) + p, "trap header")]
    for data, what in frames:
        with Raw(daemon.sock) as r:
            r.send_bytes(data)
            reply = r.reply(5)
            assert reply is None or error_of(reply) == "MIG_TYPE_ERROR", (what, reply)
            assert r.closed_within(5) == b"", what  # and the connection is closed
    # A typed frame whose bytes value is the payload: an opaque token, never decoded.
    with Raw(daemon.sock) as r:
        r.send(traps.HELLO_THREAD, [payloads[-1], threading.get_native_id()])
        assert error_of(r.reply(5)) == "KERN_INVALID_ARGUMENT"
        assert r.closed_within(5) == b""
    # On an attached task's own thread connection: the connection ends, nothing else.
    script = tmp_path / "pickler.py"
    script.write_text(_PICKLER)
    status, out, err = finish(exec_script(daemon, script, payloads[-1].hex()), 30)
    assert (status, out) == (0, "closed 0\n"), err
    names = settled(lambda: task_names(daemon.sock), lambda n: n == before, 5)
    assert not marker.exists()
    assert daemon.alive() and names == before
    with task_of(daemon, "after-pickle"):  # machd still serves a task
        assert m.vm_read(m.task_self(), m.vm_allocate(m.task_self(), 0, PS, True), 4) == \
            bytes(4)


# -- 3. identity ------------------------------------------------------------------------------
def test_guessed_tokens_gain_nothing(daemon: Daemon) -> None:
    before = task_names(daemon.sock)
    tid = threading.get_native_id()
    for token in (os.urandom(16), b"", bytes(16), os.urandom(4096)):
        with Raw(daemon.sock) as r:
            r.send(traps.HELLO_THREAD, [token, tid])
            assert error_of(r.reply(5)) == "KERN_INVALID_ARGUMENT"
            assert r.closed_within(5) == b""
        with Raw(daemon.sock) as r:
            r.send(traps.HELLO_CONTROL, [token])
            assert error_of(r.reply(5)) == "KERN_INVALID_TASK"
            assert r.closed_within(5) == b""
    assert task_names(daemon.sock) == before


def test_a_claimed_thread_must_be_a_thread_of_the_connecting_process(daemon: Daemon) -> None:
    before = fd_count(daemon.pid)
    for tid in (1, daemon.pid, -5, 2**62):
        uffd = Uffd.create()
        with Raw(daemon.sock) as r:
            try:
                r.send(traps.HELLO_ATTACH, ["liar", tid], [uffd.fd])
            finally:
                uffd.close()
            reply = r.reply(5)
            if reply is not None and reply.values[0] == traps.REPLY_OK:  # end it cleanly
                with Raw(daemon.sock) as c:
                    c.send(traps.HELLO_CONTROL, [reply.values[1][8]])
                    c.reply(5)
            assert error_of(reply) == "KERN_INVALID_ARGUMENT", (tid, reply)
    assert "liar" not in task_names(daemon.sock)
    assert settled(lambda: fd_count(daemon.pid), lambda n: n <= before) <= before


_VICTIM = textwrap.dedent("""
    # A task whose library hands its tokens to the test (stdout) before using them,
    # once the test says "go" (stdin).
    import sys, threading
    import pymach as m
    import pymach.libmach.task as T

    def leak(kind, token):
        print(kind, token.hex(), flush=True)
        assert sys.stdin.readline().strip() == "go"

    start_control = T.NativeProcess.start_control
    def leaky_start_control(self, token):
        leak("control", token)
        start_control(self, token)
    T.NativeProcess.start_control = leaky_start_control

    run_thread = T.run_thread
    def leaky_run_thread(process, token, first=False):
        leak("thread", token)
        run_thread(process, token, first)
    T.run_thread = leaky_run_thread

    T.attach(sys.argv[1], name="victim")
    ran = threading.Event()
    m.thread_create(m.task_self(), ran.set)
    print("ran" if ran.wait(20) else "never ran", flush=True)
    T.detach()
""")


def test_stolen_tokens_are_refused_from_another_process(daemon: Daemon,
                                                        tmp_path: Path) -> None:
    script = tmp_path / "victim.py"
    script.write_text(_VICTIM)
    victim = subprocess.Popen([sys.executable, str(script), str(daemon.sock)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        kind, token = read_line(victim).split()
        assert kind == "control"
        with Raw(daemon.sock) as r:  # the victim's control token, from our process
            r.send(traps.HELLO_CONTROL, [bytes.fromhex(token)])
            assert error_of(r.reply(5)) == "KERN_INVALID_TASK"
            assert r.closed_within(5) == b""
        tell(victim, "go")  # the victim itself may still use it
        kind, token = read_line(victim).split()
        assert kind == "thread"
        with Raw(daemon.sock) as r:  # its new thread's token, from our process
            r.send(traps.HELLO_THREAD, [bytes.fromhex(token), threading.get_native_id()])
            assert error_of(r.reply(5)) == "KERN_INVALID_ARGUMENT"
            assert r.closed_within(5) == b""
        tell(victim, "go")
        assert read_line(victim) == "ran"  # the token still worked for its owner
        status, _, err = finish(victim)
        assert status == 0, err
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.communicate()


def test_machd_records_the_pid_the_kernel_reports(daemon: Daemon, tmp_path: Path) -> None:
    script = tmp_path / "waiter.py"
    script.write_text(_WAITER)
    task = exec_script(daemon, script)
    try:
        assert read_line(task) == "ready"
        out = subprocess.run([sys.executable, "-m", "pymach.cli.main", "ps", "--json",
                              "--socket", str(daemon.sock)], capture_output=True, text=True,
                             timeout=60, check=True)
        rows = [r for r in json.loads(out.stdout) if r["name"] == "waiter.py"]
        assert len(rows) == 1, rows
        if "pid" not in rows[0]:
            pytest.skip("`pymach ps` reports no pids (the pid check of tokens is tested "
                        "by test_stolen_tokens_are_refused_from_another_process)")
        assert rows[0]["pid"] == task.pid
    finally:
        tell(task, "bye")
        finish(task)


_NO_CONTROL = textwrap.dedent("""
    # Attach by hand, take the welcome, and leave without opening the control connection.
    import sys, threading
    from pymach.include import traps
    from pymach.include.channel import Channel
    from pymach.pmap.uffd import Uffd

    chan = Channel.connect(sys.argv[1])
    uffd = Uffd.create()
    chan.send(traps.HELLO_ATTACH, ["no-control", threading.get_native_id()], [uffd.fd])
    uffd.close()
    frame = chan.recv()
    frame.close_fds()
    print(frame.values[0], flush=True)
""")


def test_a_process_that_attaches_and_leaves_without_its_control_connection_leaves_nothing(
        tmp_path: Path) -> None:
    script = tmp_path / "no_control.py"
    script.write_text(_NO_CONTROL)
    with machd(tmp_path / "machd.sock") as d:
        task_names(d.sock)
        fds, _ = steady(d)
        for _ in range(3):
            done = subprocess.run([sys.executable, str(script), str(d.sock)],
                                  capture_output=True, text=True, timeout=60)
            assert done.stdout.strip() == str(traps.REPLY_OK), done.stderr
        # Its process is gone: its task, and the userfaultfd machd took, must go too.
        names = settled(lambda: task_names(d.sock), lambda n: "no-control" not in n, 5)
        assert "no-control" not in names, names
        assert settled(lambda: fd_count(d.pid), lambda n: n <= fds, 5) <= fds


def test_wrong_descriptors_are_refused_and_closed(daemon: Daemon) -> None:
    task_names(daemon.sock)
    fds, _ = steady(daemon)
    tid = threading.get_native_id()
    r_end, w_end = os.pipe()
    kinds = [r_end, os.open("/dev/null", os.O_RDONLY), os.memfd_create("x"), os.eventfd(0)]
    try:
        for fd in kinds:  # not a userfaultfd
            with Raw(daemon.sock) as r:
                r.send(traps.HELLO_ATTACH, ["wrong-fd", tid], [fd])
                assert error_of(r.reply(5)) == "MIG_TYPE_ERROR"
        for hello, values in ((traps.HELLO_PING, []), (traps.HELLO_ATTACH, ["wrong-fd", tid]),
                              (traps.HELLO_CONTROL, [os.urandom(16)])):
            for n in (2, 16):  # too many, but within a frame's limit
                with Raw(daemon.sock) as r:
                    r.send(hello, values, [kinds[1]] * n)
                    r.closed_within(5)
        with Raw(daemon.sock) as r:  # more than a frame may carry (truncated)
            r.send_bytes(wire.pack_header(traps.HELLO_PING, 0, 40), [kinds[1]] * 40)
            assert error_of(r.reply(5)) == "MIG_TYPE_ERROR"
        with Raw(daemon.sock) as r:  # descriptors riding on the body, not the header
            body = wire.encode(["wrong-fd", tid])
            r.send_bytes(wire.pack_header(traps.HELLO_ATTACH, len(body), 0))
            r.send_bytes(body, [kinds[2]])
            assert error_of(r.reply(5)) == "MIG_TYPE_ERROR"
    finally:
        for fd in [*kinds, w_end]:
            os.close(fd)
    assert "wrong-fd" not in task_names(daemon.sock)
    assert settled(lambda: fd_count(daemon.pid), lambda n: n <= fds) <= fds


# -- 4. memory protection -------------------------------------------------------------------
def _mapping(address: int) -> str:
    """This process's /proc/self/maps line for `address` ("" if none)."""
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= address < hi:
                return line.strip()
    return ""


def _note(report: str, **what: Any) -> None:
    with open(report, "a") as f:
        f.write(json.dumps(what) + "\n")


def _attack_read_only(a: int, report: str) -> None:
    """A child task sharing [a, a+PS): make its view read-only for good, then try to
    write it anyway (machd may end the task for it)."""
    me = m.task_self()
    m.vm_protect(me, a, PS, True, m.VM_PROT_READ)
    try:
        m.vm_protect(me, a, PS, False, m.VM_PROT_READ | m.VM_PROT_WRITE)
        raised = ""
    except MachError as e:
        raised = e.code
    _note(report, step="protected", raise_back=raised, mapping=_mapping(a))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    ok = libc.mprotect(ctypes.c_void_p(a), ctypes.c_size_t(PS), 3) == 0  # READ | WRITE
    _note(report, step="mprotect", ok=ok, mapping=_mapping(a))
    fd = os.open("/proc/self/mem", os.O_RDWR)
    try:
        wrote = os.pwrite(fd, b"PROC-MEM", a)
        _note(report, step="proc-mem", wrote=wrote, seen=ctypes.string_at(a, 8).hex())
    except OSError as e:
        _note(report, step="proc-mem", errno=e.errno)
    finally:
        os.close(fd)
    _note(report, step="store")
    ctypes.memmove(a, b"STORED!!", 8)  # a store the protection forbids
    _note(report, step="stored", seen=ctypes.string_at(a, 8).hex())


def _read(a: int, n: int) -> bytes:
    return bytes(m.memory()[a:a + n])


def test_a_read_only_region_stays_unwritten_whatever_the_task_does(
        daemon: Daemon, tmp_path: Path) -> None:
    report = tmp_path / "report.jsonl"
    with task_of(daemon, "owner"):
        me = m.task_self()
        a = m.vm_allocate(me, 0, PS, True)
        m.memory()[a:a + 8] = b"original"
        m.vm_inherit(me, a, PS, m.VM_INHERIT_SHARE)
        attacker = m.spawn(_attack_read_only, a, str(report), inherit=True, name="attacker")
        with contextlib.suppress(MachError):
            attacker.result(30_000)  # None if machd ended it for the store
        steps = {s["step"]: s for s in map(json.loads, report.read_text().splitlines())}
        assert "store" in steps, steps  # every attack was tried
        assert steps["protected"]["raise_back"] == "KERN_PROTECTION_FAILURE"
        assert " r--" in steps["protected"]["mapping"], steps  # read-only in hardware
        if steps["mprotect"]["ok"]:  # only a private mapping may become writable
            assert steps["mprotect"]["mapping"].split()[1].endswith("p"), steps
        # The shared object never changed: as this task, the kernel and a third task see it.
        assert _read(a, 8) == b"original" and m.vm_read(me, a, 8) == b"original"
        assert m.spawn(_read, a, 8, inherit=True).result(30_000) == b"original"
        m.vm_deallocate(me, a, PS)


def _reopen_read_only(a: int, uid: int) -> list[Any]:
    """A child task that keeps the descriptors its library is handed (a task's own code
    can), makes [a, a+PS) read-only for good, and has a process of user `uid` reopen the
    read-only descriptor it got for writing."""
    from pymach.include.traps import MAP_FD

    kept: list[tuple[list[int], int]] = []
    apply_one = libtask.NativeProcess._apply_one

    def keep(self: Any, ins: list[int], fds: list[int]) -> bool:
        if ins[0] == MAP_FD:
            kept.append((list(ins), os.dup(fds[ins[3]])))
        return apply_one(self, ins, fds)

    libtask.NativeProcess._apply_one = keep  # type: ignore[method-assign]
    m.vm_protect(m.task_self(), a, PS, True, m.VM_PROT_READ)
    out: list[Any] = []
    for ins, fd in kept:
        import fcntl

        mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
                again = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
                os.write(w, b"wrote %d" % os.pwrite(again, b"REOPENED", ins[4]))
            except BaseException as e:
                os.write(w, repr(e).encode())
            os._exit(0)
        os.close(w)
        os.waitpid(pid, 0)
        out.append([mode == os.O_RDONLY, os.read(r, 200).decode()])
        os.close(r)
    return out


def test_a_read_only_descriptor_cannot_be_reopened_for_writing(
        daemon: Daemon, other_user: pwd.struct_passwd) -> None:
    with task_of(daemon, "owner"):
        me = m.task_self()
        a = m.vm_allocate(me, 0, PS, True)
        m.memory()[a:a + 8] = b"original"
        m.vm_inherit(me, a, PS, m.VM_INHERIT_SHARE)
        got = m.spawn(_reopen_read_only, a, other_user.pw_uid, inherit=True).result(30_000)
        try:
            assert got and all(read_only for read_only, _ in got), got
            assert _read(a, 8) == b"original", (
                f"a read-only descriptor of a task was reopened read-write by uid "
                f"{other_user.pw_uid} and the shared object written: {got}")
        finally:
            m.vm_deallocate(me, a, PS)


def _memory_descriptors() -> set[tuple[str, int]]:
    """This process's userfaultfd and memfd descriptors, as (what, inode)."""
    held = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # (closed meanwhile)
            what = os.readlink(f"/proc/self/fd/{fd}")
            if "userfaultfd" in what or "memfd:" in what:
                held.add((what, os.stat(f"/proc/self/fd/{fd}").st_ino))
    return held


def test_a_task_holds_no_userfaultfd_and_no_memory_descriptor(daemon: Daemon) -> None:
    """The task's process keeps no userfaultfd and no memfd of machd's once its memory
    is mapped (what earlier tests in this process left open, an embedded kernel's own
    memfds say, is not the task's)."""
    before = _memory_descriptors()
    with task_of(daemon, "holder"):
        me = m.task_self()
        a = m.vm_allocate(me, 0, 8 * PS, True)
        m.memory()[a:a + 8 * PS] = b"x" * (8 * PS)
        m.vm_protect(me, a, 4 * PS, True, m.VM_PROT_READ)  # a read-only descriptor's turn
        assert _read(a, 4) == b"xxxx"
        m.spawn(_read, a, 4, inherit=True).result(30_000)
        assert not _memory_descriptors() - before
        m.vm_deallocate(me, a, 8 * PS)


# -- 5. fuzz ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_fuzzed_frames_leave_machd_serving_and_holding_nothing(tmp_path: Path) -> None:
    with machd(tmp_path / "machd.sock", "--hello-timeout", "1") as d:
        before_tasks = task_names(d.sock)  # (also a first task, for what machd keeps)
        fds, threads = steady(d)
        fuzzers = [subprocess.Popen([sys.executable, str(HERE / "boundaryutil.py"), "fuzz",
                                     str(d.sock), str(seed), "5000"], stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True)
                   for seed in (1987, 2024)]
        stats = []
        try:
            for f in fuzzers:
                out, _ = f.communicate(timeout=110)
                assert f.returncode == 0
                stats.append(json.loads(out))
        finally:
            for f in fuzzers:
                if f.poll() is None:
                    f.kill()
                    f.communicate()
        assert sum(s["frames"] for s in stats) >= 10_000
        assert sum(s.get("trap-replied", 0) for s in stats) > 1000, stats  # traps ran
        assert d.alive()
        names = settled(lambda: task_names(d.sock), lambda n: n == before_tasks, 10)
        assert names == before_tasks  # and machd serves another task (ps is one)
        after = settled(lambda: (fd_count(d.pid), thread_count(d.pid)),
                        lambda n: n[0] <= fds + 2 and n[1] <= threads + 2, 15)
        assert after[0] <= fds + 2 and after[1] <= threads + 2, (fds, threads, after, stats)


# -- a client's view of a live machd ------------------------------------------------------
def test_a_ping_is_answered_however_fast_machd_closes(daemon: Daemon) -> None:
    """libmach decides whether machd still lives (check_machd, after a lost connection)
    with a HELLO_PING sent by Channel.send. machd answers a ping and closes the
    connection at once; the client must still get the answer, or a task of a live machd
    exits with "machd went away"."""
    lost = []
    for n in range(5000):
        chan = Channel.connect(str(daemon.sock), timeout=5)
        try:
            chan.send(traps.HELLO_PING)
            chan.recv()
        except Disconnected as e:
            lost.append((n, str(e)))
        finally:
            chan.close()
    assert not lost, f"{len(lost)} of 5000 pings of a live machd looked like a dead one: " \
        f"{lost[:3]}"


# -- 6. bounds ---------------------------------------------------------------------------------
def test_a_silent_or_trickling_connection_is_closed_at_the_hello_timeout(
        tmp_path: Path) -> None:
    with machd(tmp_path / "machd.sock", "--hello-timeout", "0.5") as d:
        with Raw(d.sock) as r:
            t = time.monotonic()
            assert r.closed_within(5) == b""
            assert 0.3 < time.monotonic() - t < 3
        with Raw(d.sock) as r:  # half a header, then nothing
            r.send_bytes(wire.pack_header(traps.HELLO_PING, 0, 0)[:8])
            t = time.monotonic()
            assert r.closed_within(5) == b""
            assert time.monotonic() - t < 3
        with Raw(d.sock) as r:  # a hello sent a byte at a time, each within the timeout
            r.send_bytes(wire.pack_header(traps.HELLO_PING, 64, 0))
            t = time.monotonic()
            with contextlib.suppress(OSError):
                while time.monotonic() - t < 4 and r.is_open():
                    r.send_bytes(b"\0")
                    time.sleep(0.2)
            held = time.monotonic() - t
            assert held < 3, f"a trickled hello kept its connection open {held:.1f} s with a " \
                "0.5 s hello timeout"


def test_a_huge_hello_is_refused_before_machd_buffers_it(tmp_path: Path) -> None:
    with machd(tmp_path / "machd.sock") as d:
        rss = rss_bytes(d.pid)
        with Raw(d.sock) as r:
            r.send_bytes(wire.pack_header(traps.HELLO_ATTACH, wire.MAX_BODY, 0))
            sent = 0
            with contextlib.suppress(OSError):
                for _ in range(48):
                    r.chan.sock.sendall(b"\x07" * (1 << 20))
                    sent += 1 << 20
            time.sleep(0.3)
            grown = rss_bytes(d.pid) - rss
        assert grown < 16 << 20, f"machd holds {grown >> 20} MiB for one unfinished hello " \
            f"({sent >> 20} MiB sent)"


def test_connections_past_max_pending_are_refused(tmp_path: Path) -> None:
    with machd(tmp_path / "machd.sock", "--max-pending", "4", "--hello-timeout", "20") as d:
        silent = [Raw(d.sock) for _ in range(4)]
        try:
            time.sleep(0.3)
            t = time.monotonic()
            with Raw(d.sock) as fifth:
                assert fifth.closed_within(5) == b""
            assert time.monotonic() - t < 2  # at once, not at the hello timeout
            assert all(r.is_open() for r in silent)
        finally:
            for r in silent:
                r.close()
        assert settled(lambda: _try_ping(d), bool, 5)


def _try_ping(d: Daemon) -> bool:
    try:
        return _ping(str(d.sock)) == {"op": traps.REPLY, "status": traps.REPLY_OK}
    except OSError:
        return False


def test_connections_past_the_per_user_limit_are_refused(tmp_path: Path) -> None:
    with machd(tmp_path / "machd.sock", "--max-connections-per-user", "3",
               "--hello-timeout", "20") as d:
        held = [Raw(d.sock) for _ in range(3)]
        try:
            time.sleep(0.3)
            with Raw(d.sock) as fourth:
                assert fourth.closed_within(5) == b""
            assert all(r.is_open() for r in held)
        finally:
            for r in held:
                r.close()
        assert settled(lambda: _try_ping(d), bool, 5)


_WAITER = textwrap.dedent("""
    import sys
    print("ready", flush=True)
    sys.stdin.readline()
""")


def test_processes_past_the_per_user_limit_are_refused(tmp_path: Path) -> None:
    script = tmp_path / "waiter.py"
    script.write_text(_WAITER)
    with machd(tmp_path / "machd.sock", "--max-processes-per-user", "2") as d:
        waiters = [exec_script(d, script) for _ in range(2)]
        try:
            for w in waiters:
                assert read_line(w) == "ready"
            status, _, err = finish(exec_script(d, script), 30)
            assert status == 1 and "KERN_RESOURCE_SHORTAGE" in err, err
            tell(waiters[0], "bye")
            assert finish(waiters[0])[0] == 0
            # One process fewer: a new one is served (once machd has seen the exit).
            deadline = time.monotonic() + 10
            while True:
                third = exec_script(d, script)
                line = ""
                with contextlib.suppress(AssertionError):
                    line = read_line(third, 10)
                if line == "ready" or time.monotonic() > deadline:
                    break
                finish(third)
            assert line == "ready"
            waiters.append(third)
        finally:
            for w in waiters:
                if w.poll() is None:
                    w.kill()
                w.communicate()


def test_a_huge_fault_in_is_refused_at_once(daemon: Daemon) -> None:
    with task_of(daemon, "fault-in"):
        me = m.task_self()
        a = m.vm_allocate(me, 0, 16 * PS, True)
        thread = current_thread()
        for address, size, access in ((a, 2**35, 1), (a, traps.FAULT_IN_MAX + 1, 2),
                                      (a, -1, 1), (-PS, PS, 1), (a, PS, 4)):
            t = time.monotonic()
            with pytest.raises(MachError) as e:
                thread.trap(traps.FAULT_IN, address, size, access)  # type: ignore[attr-defined]
            assert e.value.code == "KERN_INVALID_ARGUMENT", (address, size, access)
            assert time.monotonic() - t < 0.5
        assert thread.trap(traps.FAULT_IN, a, PS, 1) is None  # type: ignore[attr-defined]
        m.vm_deallocate(me, a, 16 * PS)


# -- 7. churn ------------------------------------------------------------------------------------
def _flat(d: Daemon, fds: int, rss: int) -> None:
    """machd holds at most a few more fds than at `fds` and little more memory (fewer
    fds is no leak: the baseline may count fds of tasks still closing)."""
    now = settled(lambda: fd_count(d.pid), lambda n: n - fds <= 8, 10)
    assert now - fds <= 8, (fds, now)
    assert rss_bytes(d.pid) - rss < 64 << 20, (rss >> 20, rss_bytes(d.pid) >> 20)


def test_task_churn_leaves_machd_flat(tmp_path: Path) -> None:
    with machd(tmp_path / "machd.sock") as d, task_of(d, "churn"):
        me = m.task_self()
        for _ in range(50):
            m.task_terminate(m.task_create(me))
        fds, rss = fd_count(d.pid), rss_bytes(d.pid)
        for _ in range(2000):
            child = m.task_create(me)
            m.task_terminate(child)  # (the name goes with the task)
        _flat(d, fds, rss)
        assert task_names(d.sock).count("churn") == 1


@pytest.mark.slow
@pytest.mark.timeout(400)  # 500 processes, each a Python start-up: 1-2 minutes
def test_process_churn_leaves_machd_flat(tmp_path: Path) -> None:
    with machd(tmp_path / "machd.sock") as d, task_of(d, "spawner"):
        for i in range(5):
            assert m.spawn(plus_one, i).result(30_000) == i + 1
        fds, rss = fd_count(d.pid), rss_bytes(d.pid)
        for i in range(0, 500, 2):  # 500 process tasks in a row (issue 9), two at a
            pair = [m.spawn(plus_one, j) for j in (i, i + 1)]  # time: one per core
            assert [h.result(30_000) for h in pair] == [i + 1, i + 2]
        _flat(d, fds, rss)
        assert task_names(d.sock).count("spawner") == 1 and len(task_names(d.sock)) == 3


# -- 8. machd dies ---------------------------------------------------------------------------------
_BLOCKED = textwrap.dedent("""
    # A task whose main thread is blocked in a plain load (NumPy, holding the GIL) from a
    # region whose pager never answers.
    import time
    import numpy as np
    import pymach as m

    class Never(m.DataManager):
        def read(self, memory_object, offset, length, access):
            raise AssertionError("never asked")

    def pager():
        mo = Never().create_memory_object()
        ask = m.msg_receive(m.task_notify())
        m.msg_send(m.Message(remote_port=ask.items[0].value, items=[m.Port(mo, m.MAKE_SEND)]))
        m.msg_receive(m.port_allocate(m.task_self()))  # holds the object, answers nothing

    me = m.task_self()
    child = m.spawn(pager, name="silent-pager")
    box = m.port_allocate(me)
    notify = m.task_get_special_port(child.port, m.TASK_NOTIFY_PORT)
    m.msg_send(m.Message(remote_port=notify, items=[m.Port(box, m.MAKE_SEND)]))
    mo = m.msg_receive(box, m.RCV_TIMEOUT, 20_000).items[0].value
    a = m.vm_allocate_with_pager(me, 0, 4096, True, mo, 0)
    view = np.frombuffer(m.memory().buffer(a, 4096), dtype=np.uint8)
    print("ready", flush=True)
    print("loaded", int(view[0]), flush=True)
    while True:
        time.sleep(1)
""")


def _task_processes(sock: Path) -> list[int]:
    """Pids of processes whose command line names `sock` (machd's task processes)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if str(sock).encode() in cmd and b"pymach.libmach.taskproc" in cmd:
                out.append(int(pid))
    return out


def test_a_task_blocked_in_a_fault_exits_when_machd_dies(tmp_path: Path) -> None:
    script = tmp_path / "blocked.py"
    script.write_text(_BLOCKED)
    uffd_or_skip()
    sock = tmp_path / "machd.sock"
    proc = start_machd(sock, "--memory", "256M")
    task: subprocess.Popen[bytes] | None = None
    try:
        task = exec_script(Daemon(sock, proc), script)
        assert read_line(task) == "ready"
        threads = Path(f"/proc/{task.pid}/task")

        def in_fault() -> bool:
            for tid in os.listdir(threads):
                with contextlib.suppress(OSError):
                    if (threads / tid / "wchan").read_text() == "handle_userfault":
                        return True
            return False

        assert settled(in_fault, bool, 10), "the task never blocked in its fault"
        assert _task_processes(sock)  # the silent pager's process
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        t = time.monotonic()
        with contextlib.suppress(subprocess.TimeoutExpired):
            task.wait(10)
        took = time.monotonic() - t
        status, _, err = finish(task, 10)
        assert status == 3 and "machd went away" in err, (status, err)
        assert took < 2.0, f"the task took {took:.1f} s to notice"
        assert settled(lambda: _task_processes(sock), lambda p: not p, 5) == []
    finally:
        if task is not None and task.poll() is None:
            task.kill()
            task.communicate()
        if proc.poll() is None:
            stop_machd(proc)
        for pid in _task_processes(sock):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
