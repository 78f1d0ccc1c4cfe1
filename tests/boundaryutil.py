"""Helpers of test_boundary.py: attacking machd's boundary from outside and inside.

- what machd holds: `fd_count`, `thread_count`, `rss_bytes` (from /proc), `task_names`
  (`pymach ps --json`), and `settled` to wait for counts to come back;
- raw connections: `Raw` sends hand-made frames (with any descriptors) and reads what
  machd answers until it closes the connection;
- other users: `temp_user` makes (and removes) a system user, `run_as` runs a function
  in a forked child with that user's ids (a fork, not an exec: the interpreter lives
  under /root, which other users cannot enter), `reachable_dir` makes a directory that
  user can reach;
- `fuzz_main` (run as `python boundaryutil.py fuzz SOCKET SEED COUNT`): a client that
  sends machd random and mutated frames, on fresh connections and on attached tasks'
  thread connections (each attached task in a forked child of its own, so machd may
  end it), and prints what it did as JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import random
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pymach.include import traps, wire
from pymach.include.channel import Channel, Disconnected, Frame
from pymach.include.mach_defs import port_defs, task_defs, thread_defs, vm_defs
from pymach.include.message import (
    OOL,
    RCV_TIMEOUT,
    SEND_TIMEOUT,
    Bytes,
    Code,
    Disposition,
    Float,
    Int,
    IntArray,
    Message,
    Port,
    PortArray,
    Str,
)
from pymach.pmap.uffd import Uffd

HERE = Path(__file__).resolve().parent


# -- what machd holds ------------------------------------------------------------------
def plus_one(x: int) -> int:
    """What the churn tests' process tasks run: it lives here, not in a test module, so
    each of their hundreds of processes imports this light module and not pytest."""
    return x + 1


def fd_count(pid: int) -> int:
    """Open descriptors of process `pid`."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def thread_count(pid: int) -> int:
    """Threads of process `pid`."""
    return len(os.listdir(f"/proc/{pid}/task"))


def rss_bytes(pid: int) -> int:
    """Resident set size of process `pid`."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def task_names(sock: str | Path) -> list[str]:
    """The names of machd's tasks, from `pymach ps --json` (a task of its own)."""
    out = subprocess.run([sys.executable, "-m", "pymach.cli.main", "ps", "--json", "--socket",
                          str(sock)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return sorted(row["name"] for row in json.loads(out.stdout))


def settled(probe: Callable[[], Any], ok: Callable[[Any], bool], timeout: float = 10.0,
            interval: float = 0.1) -> Any:
    """Poll `probe()` until `ok` holds for its value or `timeout` passes; the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if ok(value) or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def ping(sock: str | Path) -> bool:
    """True if machd answers a HELLO_PING with REPLY_OK."""
    with Raw(sock) as r:
        r.send(traps.HELLO_PING, [])
        frame = r.reply(5.0)
    return frame is not None and frame.values[0] == traps.REPLY_OK


# -- raw connections -------------------------------------------------------------------
class Raw:
    """One hand-driven connection to machd."""

    def __init__(self, sock: str | Path, timeout: float = 5.0) -> None:
        self.chan = Channel.connect(str(sock), timeout=timeout)

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.chan.close()

    def send(self, op: int, values: list[Any], fds: list[int] | tuple[int, ...] = ()) -> None:
        """A well-formed frame, in one write where it fits (Channel.send writes the body
        separately, even an empty one: machd may have answered a ping and closed the
        connection by then, and the client sees a broken pipe; see test_boundary)."""
        body = wire.encode(values)
        data = wire.pack_header(op, len(body), len(fds)) + body
        self.send_bytes(data, fds)

    def send_bytes(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Any bytes (at least one if there are descriptors), the descriptors riding
        with the first write."""
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] \
            if fds else []
        sent = self.chan.sock.sendmsg([data], anc) if anc else 0
        if sent < len(data):
            self.chan.sock.sendall(data[sent:])

    def reply(self, timeout: float) -> Frame | None:
        """The next frame machd sends (its descriptors closed), None if it closes the
        connection first; TimeoutError if neither happens in time."""
        self.chan.sock.settimeout(timeout)
        try:
            frame = self.chan.recv()
        except Disconnected:
            return None
        finally:
            with contextlib.suppress(OSError):
                self.chan.sock.settimeout(None)
        frame.close_fds()
        return frame

    def closed_within(self, timeout: float) -> bytes:
        """Everything machd still sends until it closes the connection (TimeoutError if
        it keeps it open longer than `timeout`)."""
        s = self.chan.sock
        s.settimeout(timeout)
        deadline = time.monotonic() + timeout
        data = b""
        while True:
            s.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk

    def is_open(self) -> bool:
        """True if machd has neither closed the connection nor sent anything on it."""
        ready, _, _ = select.select([self.chan.sock], [], [], 0)
        return not ready


def error_of(frame: Frame | None) -> str | None:
    """The Mach error code of a REPLY_ERROR frame (None for anything else)."""
    if frame is None or frame.op != traps.REPLY or not frame.values:
        return None
    if frame.values[0] != traps.REPLY_ERROR:
        return None
    return str(frame.values[2])


# -- other users -----------------------------------------------------------------------
@contextlib.contextmanager
def temp_user() -> Iterator[pwd.struct_passwd]:
    """A new system user with no home (skipped if users cannot be made), removed after."""
    if os.getuid() != 0 or shutil.which("useradd") is None:
        import pytest

        pytest.skip("needs root and useradd")
    name = f"pymachtest{secrets.token_hex(3)}"
    made = subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                           "/usr/sbin/nologin", name], capture_output=True, text=True)
    if made.returncode != 0:
        import pytest

        pytest.skip(f"useradd failed: {made.stderr.strip()}")
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], capture_output=True)


@contextlib.contextmanager
def reachable_dir(owner: int | None = None) -> Iterator[Path]:
    """A fresh directory under /tmp that every user can reach (mode 0711; or owned by
    `owner`, mode 0755), removed after."""
    path = Path(tempfile.mkdtemp(prefix="pymach-boundary-", dir="/tmp"))
    try:
        if owner is not None:
            os.chown(path, owner, -1)
            path.chmod(0o755)
        else:
            path.chmod(0o711)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_as(user: pwd.struct_passwd, fn: Callable[..., Any], *args: Any,
           prepare: Callable[[], Any] | None = None, ready: Callable[[], None] | None = None,
           timeout: float = 30.0) -> Any:
    """fn(*args) in a forked child running as `user` (no supplementary groups); its
    JSON-able result, or {"raised": repr} of what it raised. The child may import nothing
    new (modules under /root are out of its reach): import first.

    `prepare`, if given, runs in the child while it is still root, and its result is
    passed to fn first (a userfaultfd must be made by the process that uses it). With
    `ready`, fn gets a function to call once it is set up, and `ready()` then runs in
    the parent while the child goes on."""
    r, w = os.pipe()
    sr, sw = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        status = 0
        try:
            os.close(r)
            os.close(sr)
            prepared = [prepare()] if prepare is not None else []
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)

            def signal_ready() -> None:
                os.write(sw, b"r")

            call_args = (*prepared, *([signal_ready] if ready is not None else []), *args)
            try:
                out: Any = fn(*call_args)
            except BaseException as e:
                out = {"raised": repr(e)}
            os.write(w, json.dumps(out).encode())
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(w)
    os.close(sw)
    try:
        if ready is not None:
            got, _, _ = select.select([sr], [], [], timeout)
            assert got and os.read(sr, 1) == b"r", f"the child as {user.pw_name} never got ready"
            ready()
        data = b""
        deadline = time.monotonic() + timeout
        while True:
            got, _, _ = select.select([r], [], [], max(deadline - time.monotonic(), 0))
            if not got:
                raise TimeoutError(f"the child as {user.pw_name} did not finish")
            chunk = os.read(r, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
        os.close(sr)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert data, "the child died without a result"
    return json.loads(data)


# -- the fuzzer ------------------------------------------------------------------------
INTERESTING = [0, 1, -1, 2, 7, 4095, 4096, 4097, 2**31 - 1, 2**31, 2**32, 2**35, 2**40,
               2**62, 2**63 - 1, -(2**63), 0x2000_0000_0000, 0x2000_0000_1000]
# Routines a fuzzed task may call on itself: none that ends, suspends or creates tasks
# or threads (a task made by task_create lives on, as in Mach, and is not a leak).
SAFE_ROUTINES = [task_defs.by_name[n] for n in ("task_info", "task_get_special_port",
                                                 "task_set_name", "task_threads")] + \
    [port_defs.by_name[n] for n in ("port_allocate", "port_deallocate", "port_status",
                                    "port_enable", "port_disable", "port_messages",
                                    "port_set_backlog")] + \
    [thread_defs.by_name["thread_info"]] + \
    [vm_defs.by_name[n] for n in ("vm_allocate", "vm_deallocate", "vm_inherit",
                                  "vm_protect", "vm_statistics", "vm_regions")]


def _open_wrong_fd(rng: random.Random) -> int:
    """A descriptor of a kind machd must not take for a userfaultfd."""
    kind = rng.randrange(7)
    if kind == 0:
        r, w = os.pipe()
        os.close(w)
        return r
    if kind == 1:
        return os.open("/dev/null", os.O_RDWR)
    if kind == 2:
        return os.memfd_create("fuzz")
    if kind == 3:
        return os.eventfd(0)
    if kind == 4:
        a, b = socket.socketpair()
        b.close()
        return a.detach()
    if kind == 5:
        return os.open("/", os.O_PATH)
    ep = select.epoll()
    try:
        return os.dup(ep.fileno())
    finally:
        ep.close()


def _fuzz_fds(rng: random.Random) -> list[int]:
    """Descriptors to send with a frame: none, wrong kinds, a real userfaultfd, or more
    than a frame may carry."""
    pick = rng.random()
    if pick < 0.35:
        return []
    if pick < 0.75:
        return [_open_wrong_fd(rng) for _ in range(rng.choice([1, 1, 2, 3]))]
    if pick < 0.9:
        return [Uffd.create().fd]
    return [os.open("/dev/null", os.O_RDONLY) for _ in range(rng.choice([17, 20, 40]))]


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([*INTERESTING, rng.randrange(-(2**63), 2**63)])
    if kind == 3:
        return rng.choice([0.0, -1.5, float("nan"), float("inf"), 1e308])
    if kind == 4:
        return rng.randbytes(rng.choice([0, 1, 16, 100]))
    if kind == 5:
        return rng.choice(["", "x", "\u00e9" * 10, "a" * 5000])
    if kind == 6:
        return _random_message(rng)
    return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]


def _random_item(rng: random.Random) -> Any:
    kind = rng.randrange(9)
    if kind == 0:
        return Int(rng.choice(INTERESTING))
    if kind == 1:
        return Float(rng.random())
    if kind == 2:
        return Bytes(rng.randbytes(rng.randrange(64)))
    if kind == 3:
        return Str("s" * rng.randrange(64))
    if kind == 4:
        return IntArray(tuple(rng.choice(INTERESTING) for _ in range(rng.randrange(5))))
    if kind == 5:
        return Port(rng.choice([1, 2, 3, 4, 5, 99, 2**40]), rng.choice(list(Disposition)))
    if kind == 6:
        return PortArray(tuple(rng.randrange(10) for _ in range(3)), Disposition.COPY_SEND)
    if kind == 7:
        return OOL(address=rng.choice(INTERESTING) % 2**64, size=rng.choice([0, 4096, 2**40]),
                   data=rng.choice([None, b"", b"ool"]))
    return Code(None, blob=rng.randbytes(32), origin_uid=rng.choice([0, 1, -1, 65534]))


def _random_message(rng: random.Random, task_port: int = 1, reply_port: int = 3) -> Message:
    if rng.random() < 0.6:
        r = rng.choice(SAFE_ROUTINES)
        items = []
        for _, t in r.ins:
            try:
                items.append(t.to_item(rng.choice(INTERESTING[:12])))
            except Exception:
                items.append(_random_item(rng))
        if rng.random() < 0.3:
            items = [_random_item(rng) for _ in range(rng.randrange(4))]
        return Message(remote_port=task_port, local_port=reply_port, id=r.id, items=items)
    return Message(remote_port=rng.choice([0, task_port, reply_port, 2, 77, -5]),
                   local_port=rng.choice([0, reply_port, 9]),
                   id=rng.choice([0, 1, 6000, 99999, -1]),
                   items=[_random_item(rng) for _ in range(rng.randrange(4))])


def _valid_hello(rng: random.Random, tid: int) -> tuple[int, list[Any]]:
    op = rng.choice([traps.HELLO_ATTACH, traps.HELLO_THREAD, traps.HELLO_CONTROL,
                     traps.HELLO_PING, traps.TASK_SELF, traps.MSG_SEND, traps.EXIT,
                     traps.REPLY, rng.randrange(65536)])
    values: list[Any] = {
        traps.HELLO_ATTACH: ["fz-hello", tid],
        traps.HELLO_THREAD: [rng.randbytes(16), tid],
        traps.HELLO_CONTROL: [rng.randbytes(16)],
        traps.HELLO_PING: [],
        traps.MSG_SEND: [_random_message(rng), 0, None],
        traps.EXIT: [None],
        traps.REPLY: [0, None, "", "", 0, 0, []],
    }.get(op, [_random_value(rng) for _ in range(rng.randrange(3))])
    if rng.random() < 0.3:  # wrong types or counts
        values = [_random_value(rng) for _ in range(rng.randrange(4))]
    return op, values


def _valid_trap(rng: random.Random, welcome: list[Any]) -> tuple[int, list[Any]]:
    task_port, reply_port = int(welcome[6]), int(welcome[7])
    op = rng.choice([traps.TASK_SELF, traps.THREAD_SELF, traps.TASK_NOTIFY, traps.HOST_SELF,
                     traps.THREAD_REPLY, traps.MSG_SEND, traps.MSG_RECEIVE, traps.MSG_RPC,
                     traps.MSG_RPC, traps.MSG_RPC, traps.FAULT_IN, traps.STDIO,
                     traps.MAPPED, traps.PAGER_WINDOW])
    if rng.random() < 0.03:  # not a trap
        op = rng.choice([traps.HELLO_PING, traps.DETACH, traps.REPLY, rng.randrange(200)])
    msg = _random_message(rng, task_port, reply_port)
    values: list[Any]
    blocking = rng.random() < 0.05  # now and then a receive that waits for ever
    rcv = 0 if blocking else rng.choice([RCV_TIMEOUT, RCV_TIMEOUT | SEND_TIMEOUT])
    timeout = None if blocking else rng.choice([0, 1, 10])
    if op == traps.MSG_SEND:
        values = [msg, rng.choice([0, SEND_TIMEOUT, 2, 4]), timeout]
    elif op == traps.MSG_RECEIVE:
        values = [rng.choice([0, reply_port, task_port, 99]), rcv, timeout,
                  rng.choice([0, 1 << 40])]
    elif op == traps.MSG_RPC:
        values = [msg, rcv, 1 << 40, timeout, timeout]
    elif op == traps.FAULT_IN:
        values = [rng.choice(INTERESTING), rng.choice(INTERESTING), rng.choice([0, 1, 2, 3, 4,
                                                                                 -1])]
    elif op == traps.STDIO:
        big = rng.random() < 0.1  # past the bounds of a task's environment
        values = [rng.choice(["/", "/nonexistent"]) if not big else "x" * 5000,
                  ["/tmp", ""] if not big else ["y"] * 300, rng.choice(["", "/m.py"])]
    elif op == traps.MAPPED:
        values = [rng.choice([*INTERESTING, task_port, reply_port])]
    elif op == traps.PAGER_WINDOW:
        values = [rng.choice([*INTERESTING, task_port, reply_port]), rng.choice([0, 1])]
    else:
        values = []
    if rng.random() < 0.04:
        values = [_random_value(rng) for _ in range(rng.randrange(5))]
    return op, values


def _frame_bytes(op: int, values: list[Any], nfds: int) -> bytes:
    try:
        body = wire.encode(values)
    except Exception:  # an item built with a value of the wrong type
        body = b""
    return wire.pack_header(op, len(body), nfds) + body


def _mutate(rng: random.Random, data: bytes) -> bytes:
    """A byte-level mutation of an encoded frame."""
    kind = rng.randrange(9)
    buf = bytearray(data)
    if kind == 0 or not buf:  # random bytes
        return rng.randbytes(rng.choice([1, 8, 15, 16, 17, 40, 300]))
    if kind == 1:  # bit flips anywhere
        for _ in range(rng.randrange(1, 9)):
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        return bytes(buf)
    if kind == 2:  # truncation
        return bytes(buf[:rng.randrange(len(buf))])
    if kind == 3:  # huge or wrong body length
        n = rng.choice([0xFFFF_FFFF, wire.MAX_BODY, wire.MAX_BODY + 1, len(buf) + 1000, 0])
        struct.pack_into("<I", buf, 8, n)
        return bytes(buf)
    if kind == 4:  # fd count field
        struct.pack_into("<I", buf, 12, rng.choice([0, 1, 2, 16, 17, 0xFFFF_FFFF]))
        return bytes(buf)
    if kind == 5:  # version, op
        struct.pack_into("<HH", buf, 4, rng.choice([0, 1, 2, 0xFFFF]), rng.randrange(65536))
        return bytes(buf)
    if kind == 6:  # trailing garbage
        return bytes(buf) + rng.randbytes(rng.randrange(1, 64))
    if kind == 7 and len(buf) > 17:  # flips in the body's tags and lengths
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(16, len(buf))
            buf[i] = rng.choice([0x00, 0x07, 0x08, 0x17, 0x18, 0xFF, 0x80])
        return bytes(buf)
    return bytes(buf)  # unchanged: a valid frame now and then


def _send_frame(chan: Channel, rng: random.Random, data: bytes, fds: list[int]) -> None:
    """Send `data` with `fds` riding on the header, or (sometimes) on the body, where
    machd reads without taking descriptors."""
    sock = chan.sock
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] \
        if fds else []
    if not data:
        data = b"\0"
    cut = 1 if len(data) > 20 and rng.random() < 0.1 else len(data)
    if anc and cut < len(data):
        sock.sendall(data[:cut])
        sock.sendmsg([data[cut:]], anc)
    else:
        sock.sendmsg([data], anc)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _drain(sock: socket.socket, timeout: float) -> str:
    """Read until machd closes (or `timeout`); what it did: closed, replied, silent."""
    deadline = time.monotonic() + timeout
    got = False
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return "silent" if not got else "replied"
        ready, _, _ = select.select([sock], [], [], left)
        if not ready:
            continue
        try:
            data, anc, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
        except OSError:
            return "closed"
        for level, kind, blob in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                _close_all(list(struct.unpack(f"{len(blob) // 4}i", blob[:len(blob) // 4 * 4])))
        if not data:
            return "replied-closed" if got else "closed"
        got = True


def _hello_round(sock_path: str, rng: random.Random, stats: Counter[str]) -> None:
    """One mutated hello on a fresh connection."""
    tid = threading.get_native_id()
    op, values = _valid_hello(rng, tid)
    fds = _fuzz_fds(rng)
    data = _frame_bytes(op, values, len(fds))
    if rng.random() < 0.85:
        data = _mutate(rng, data)
    try:
        chan = Channel.connect(sock_path, timeout=5)
    except OSError:
        stats["connect-refused"] += 1
        _close_all(fds)
        return
    try:
        try:
            _send_frame(chan, rng, data, fds)
        except OSError:
            stats["send-failed"] += 1
        finally:
            _close_all(fds)
        if rng.random() < 0.9:  # else left open: machd waits for the rest, we leave
            with contextlib.suppress(OSError):
                chan.sock.shutdown(socket.SHUT_WR)
        keep: list[Frame] = []
        outcome = _drain_one(chan, 5.0 if _attaches(data) else 0.3, keep)
        if keep and keep[0].values[:1] == [traps.REPLY_OK] and isinstance(
                keep[0].values[1], list) and len(keep[0].values[1]) == 9:
            stats["hello-accepted"] += 1  # a hello that is still valid: end the task as
            _end_attached(sock_path, keep[0].values[1])  # a process does (control closes)
        elif outcome == "replied":
            outcome = _drain(chan.sock, 0.3)
        stats[f"hello-{outcome}"] += 1
    finally:
        chan.close()


def _attaches(data: bytes) -> bool:
    """True if `data` starts with a well-formed HELLO_ATTACH (machd may welcome it)."""
    try:
        op, length, _ = wire.unpack_header(data[:wire.HEADER_SIZE])
        wire.decode(data[wire.HEADER_SIZE:wire.HEADER_SIZE + length])
    except wire.WireError:
        return False
    return op == traps.HELLO_ATTACH and len(data) >= wire.HEADER_SIZE + length


def _end_attached(sock_path: str, welcome: list[Any]) -> None:
    """Open and close the control connection of a task this process became: machd
    then ends the task (the process is "gone")."""
    with contextlib.suppress(OSError, Disconnected, wire.WireError):
        control = Channel.connect(sock_path, timeout=5)
        control.send(traps.HELLO_CONTROL, [welcome[8]])
        control.sock.settimeout(5)
        control.recv().close_fds()
        control.close()


def _session(sock_path: str, seed: int, frames: int) -> dict[str, int]:
    """In a forked child: attach raw, open the control connection, then send mutated
    trap frames on the thread connection until machd closes it."""
    rng = random.Random(seed)
    stats: Counter[str] = Counter()
    tid = threading.get_native_id()
    thread = Channel.connect(sock_path, timeout=5)
    uffd = Uffd.create()
    thread.send(traps.HELLO_ATTACH, [f"fz{seed % 1000}", tid], [uffd.fd])
    uffd.close()
    welcome = thread.recv()
    welcome.close_fds()
    if welcome.values[0] != traps.REPLY_OK:
        stats["attach-refused"] += 1
        return dict(stats)
    control = Channel.connect(sock_path, timeout=5)
    control.send(traps.HELLO_CONTROL, [welcome.values[1][8]])
    control.recv().close_fds()
    sent = 0
    while sent < frames:
        op, values = _valid_trap(rng, welcome.values[1])
        fds = _fuzz_fds(rng) if rng.random() < 0.04 else []
        data = _frame_bytes(op, values, len(fds))
        if rng.random() < 0.06:
            data = _mutate(rng, data)
        sent += 1
        try:
            _send_frame(thread, rng, data, fds)
        except OSError:
            stats["trap-send-failed"] += 1
            break
        finally:
            _close_all(fds)
        outcome = _drain_one(thread, 0.15)
        stats[f"trap-{outcome}"] += 1
        if outcome != "replied":
            break
    stats["trap-frames"] += sent
    thread.close()
    control.close()
    return dict(stats)


def _drain_one(chan: Channel, timeout: float, keep: list[Frame] | None = None) -> str:
    """Wait for one reply on a connection: replied (the frame appended to `keep`, its
    descriptors closed), closed, or silent (a trap that blocks, or a frame machd waits
    to complete)."""
    ready, _, _ = select.select([chan.sock], [], [], timeout)
    if not ready:
        return "silent"
    try:
        chan.sock.settimeout(timeout)
        frame = chan.recv()
    except (Disconnected, TimeoutError, wire.WireError, OSError):
        return "closed"
    frame.close_fds()
    if keep is not None:
        keep.append(frame)
    return "replied"


def fuzz(sock_path: str, seed: int, count: int) -> dict[str, int]:
    """Send `count` frames: about half as hellos on fresh connections, half as traps of
    attached tasks (a forked child per task, at most one at a time)."""
    rng = random.Random(seed)
    stats: Counter[str] = Counter()
    sent = 0
    while sent < count:
        if rng.random() < 0.6:
            _hello_round(sock_path, rng, stats)
            stats["frames"] += 1
            sent += 1
            continue
        frames = min(rng.choice([20, 50, 100, 200]), count - sent)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(r)
                out = _session(sock_path, rng.randrange(2**32), frames)
                os.write(w, json.dumps(out).encode())
            except BaseException as e:
                with contextlib.suppress(BaseException):
                    os.write(w, json.dumps({f"session-error:{e!r}"[:200]: 1}).encode())
                code = 1
            finally:
                os._exit(code)
        os.close(w)
        data = b""
        got, _, _ = select.select([r], [], [], 30)
        if got:
            while chunk := os.read(r, 65536):
                data += chunk
        os.close(r)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        got_stats = json.loads(data) if data else {"session-killed": 1}
        # (no result: machd ended the task and its process, or the session broke)
        stats.update(got_stats)
        stats["sessions"] += 1
        done = max(int(got_stats.get("trap-frames", 0)), 1)
        stats["frames"] += done
        sent += done
    return dict(stats)


def fuzz_main(argv: list[str]) -> int:
    """`python boundaryutil.py fuzz SOCKET SEED COUNT`: print the fuzzer's counts."""
    sock_path, seed, count = argv[0], int(argv[1]), int(argv[2])
    print(json.dumps(fuzz(sock_path, seed, count)), flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["fuzz"]:
        sys.exit(fuzz_main(sys.argv[2:]))
    sys.exit(f"usage: {sys.argv[0]} fuzz SOCKET SEED COUNT")
