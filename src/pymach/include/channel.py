"""A channel: typed-wire frames (include/wire.py) over a stream socket, with descriptors.

One `Channel` wraps one connected socket. `send(op, values, fds)` writes one frame, the
descriptors riding with its header as SCM_RIGHTS; `recv()` reads one whole frame into a
`Frame` of typed values. Every descriptor a `recv` takes in is either returned in the
Frame (the caller then owns it and must close it) or closed before `recv` raises; a
frame whose ancillary data was truncated, whose fd count disagrees with its header, or
whose body does not decode is refused with a `WireError` and its descriptors closed.
A closed or reset peer is `Disconnected`. A channel is used by one thread at a time on
each side (a trap is a request and its reply), so it has no lock: in machd the reply
to a parked trap may be written by another thread (the one that completed it, with
`send_nowait`, which never blocks; what does not fit the socket now is left for the
channel's own thread to write, `send_rest`), but only ever by the one thread that
completed that trap, while the peer waits for that reply and sends nothing.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pymach.include import wire

_T = TypeVar("_T", bytes, int)
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
SO_PEERPIDFD = 77  # Linux 6.5 (asm-generic/socket.h)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)  # (the enum's & costs microseconds a frame)


class Disconnected(ConnectionError):
    """The other side closed the connection (machd or the task went away)."""


@dataclass(frozen=True)
class PeerCred:
    """Who is at the other end, as the kernel says (SO_PEERCRED), never as it claims."""

    pid: int
    uid: int
    gid: int


@dataclass
class Frame:
    """One received frame: its op, its values and the descriptors it brought."""

    op: int
    values: list[Any]
    fds: list[int] = field(default_factory=list)

    def close_fds(self) -> None:
        """Close the descriptors nobody took."""
        close_fds(self.fds)
        self.fds = []


def close_fds(fds: Sequence[int]) -> None:
    """Close received descriptors nobody took."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class Channel:
    """One framed, fd-carrying stream (see module docstring)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock  # owned
        self.deadline: float | None = None  # of the recv in progress

    @classmethod
    def connect(cls, path: str, timeout: float | None = None) -> Channel:
        """A new channel to the Unix socket at `path` (OSError if nobody listens)."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(timeout)
            s.connect(path)
        except OSError:
            s.close()
            raise
        s.settimeout(None)
        return cls(s)

    def fileno(self) -> int:
        """The socket's descriptor (for poll)."""
        return self.sock.fileno()

    def close(self) -> None:
        """Close the connection."""
        with contextlib.suppress(OSError):
            self.sock.close()

    def peer(self) -> PeerCred:
        """The peer's pid, uid and gid from the kernel (SO_PEERCRED)."""
        raw = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
        return PeerCred(*_CRED.unpack(raw))

    def peer_pidfd(self) -> int:
        """A pidfd of the peer process (SO_PEERPIDFD, so it names the process that
        connected even if it has exited since; pidfd_open where the kernel lacks it).
        The caller owns it; -1 if the peer is gone already."""
        try:
            return int(self.sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD))
        except OSError:
            pass
        try:
            return os.pidfd_open(self.peer().pid)
        except OSError:
            return -1

    def send(self, op: int, values: Sequence[Any] = (), fds: Sequence[int] = ()) -> None:
        """Send one frame with `fds` (they stay open on this side). WireError if a value
        cannot be encoded (nothing is sent then); Disconnected if the peer is gone."""
        parts, anc = _frame(op, values, fds)
        try:
            sent = self.sock.sendmsg(parts, anc)  # the header carries the fds
            for rest in _after(parts, sent):
                self.sock.sendall(rest)
        except OSError as e:
            raise _lost(e) from None

    def send_nowait(self, op: int, values: Sequence[Any] = (),
                    fds: Sequence[int] = ()) -> bytes | None:
        """Send what of one frame the socket takes now, never blocking. Returns b"" if
        it all went; the rest, to send next with `send_rest`, if part went (the
        descriptors ride with the first byte); None if nothing went (send the frame
        again with `send`). WireError (nothing sent) or Disconnected as `send`."""
        parts, anc = _frame(op, values, fds)
        try:
            sent = self.sock.sendmsg(parts, anc, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except OSError as e:
            raise _lost(e) from None
        return b"".join(_after(parts, sent))

    def send_rest(self, data: bytes) -> None:
        """Send the rest of a frame that `send_nowait` left (blocking)."""
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise _lost(e) from None

    def recv(self, deadline: float | None = None, max_body: int = wire.MAX_BODY) -> Frame:
        """Receive one frame (see module docstring for what is refused). With a
        `deadline` (time.monotonic()), TimeoutError once it passes, however slowly the
        frame trickles in; a body longer than `max_body` is refused before it is read."""
        self.deadline = deadline
        try:
            return self._recv_frame(max_body)
        finally:
            self.deadline = None
            if deadline is not None:
                self.sock.settimeout(None)

    def _recv_frame(self, max_body: int) -> Frame:
        header, fds = self._recv_header()
        try:
            op, length, nfds = wire.unpack_header(header)
            if length > max_body:
                raise wire.WireError(f"a body of {length} bytes exceeds {max_body} here")
            if len(fds) != nfds:
                raise wire.WireError(f"header announces {nfds} descriptors, {len(fds)} came")
            values = wire.decode(self._recv_exact(length))
        except BaseException:
            close_fds(fds)
            raise
        return Frame(op, values, fds)

    def _arm(self) -> None:
        """Before each read: time out at the deadline, if there is one."""
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the frame did not arrive in time")
            self.sock.settimeout(left)

    def _recv_header(self) -> tuple[bytes, list[int]]:
        fds = array.array("i")
        self._arm()
        try:
            data, anc, flags, _ = self.sock.recvmsg(
                wire.HEADER_SIZE, socket.CMSG_SPACE(wire.MAX_FDS * fds.itemsize))
        except TimeoutError:
            raise
        except OSError as e:
            raise Disconnected(str(e)) from None
        for level, kind, blob in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(blob[:len(blob) - len(blob) % fds.itemsize])
        try:
            if flags & _MSG_CTRUNC:
                raise wire.WireError("too many descriptors in one frame")
            if not data:
                raise Disconnected("connection closed")
            if len(data) < wire.HEADER_SIZE:
                data += self._recv_exact(wire.HEADER_SIZE - len(data))
        except BaseException:
            close_fds(list(fds))
            raise
        return data, list(fds)

    def _recv_exact(self, n: int) -> bytes | bytearray:
        """Exactly n bytes, received in place; the buffer grows (doubling) with what
        arrives, so a header's length is never trusted with an allocation. (A small
        body, the common case, usually comes whole in one read.)"""
        if n == 0:
            return b""
        if n <= _SMALL:
            data = self._recv_some(n)
            if len(data) == n:
                return data
            buf, got = bytearray(data), len(data)
        else:
            buf, got = bytearray(min(n, 1 << 20)), 0
        while got < n:
            if got >= len(buf):
                buf.extend(bytes(min(max(len(buf), 1), n - got)))
            with memoryview(buf) as view, view[got:] as rest:
                got += self._read(lambda: self.sock.recv_into(rest))
        return buf

    def _recv_some(self, n: int) -> bytes:
        """Up to n bytes (at least one), as one read gives them."""
        return self._read(lambda: self.sock.recv(n))

    def _read(self, call: Callable[[], _T]) -> _T:
        """One read from the socket (bytes, or a count), armed with the deadline; a
        closed or failed connection is Disconnected."""
        self._arm()
        try:
            got = call()
        except TimeoutError:
            raise
        except OSError as e:
            raise Disconnected(str(e)) from None
        if not got:
            raise Disconnected("connection closed")
        return got


_SMALL = 64 << 10  # bodies up to this size are read with one recv first


def _frame(op: int, values: Sequence[Any],
           fds: Sequence[int]) -> tuple[list[bytes], list[Any]]:
    """A frame's parts (its header, then its body: wire.encode_parts, so a large byte
    string is sent from where it is, not copied into the frame) and its ancillary data
    (WireError if it cannot be sent)."""
    body = wire.encode_parts(values)
    size = sum(map(len, body))
    if size > wire.MAX_BODY or len(fds) > wire.MAX_FDS:
        raise wire.WireError(f"frame too large ({size} bytes, {len(fds)} fds)")
    header = wire.pack_header(op, size, len(fds))
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    return [header, *body], anc


def _after(parts: list[bytes], sent: int) -> list[memoryview]:
    """What of `parts` is left to send once their first `sent` bytes went."""
    rest = []
    for part in parts:
        if sent >= len(part):
            sent -= len(part)
        else:
            rest.append(memoryview(part)[sent:])
            sent = 0
    return rest


def _lost(e: OSError) -> OSError:
    """A send's OSError as the caller sees it: a timeout stays one, anything else means
    the peer is gone."""
    return e if isinstance(e, TimeoutError) else Disconnected(str(e))


def default_socket_path() -> str:
    """Where machd listens unless told otherwise: $PYMACH_SOCKET if set; else
    $XDG_RUNTIME_DIR/pymach/machd.sock; else /run/pymach/machd.sock for root; else
    /tmp/pymach-UID/machd.sock. machd makes the directory private to its user."""
    if os.environ.get("PYMACH_SOCKET"):
        return os.environ["PYMACH_SOCKET"]
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "pymach", "machd.sock")
    if os.getuid() == 0:
        return "/run/pymach/machd.sock"
    return f"/tmp/pymach-{os.getuid()}/machd.sock"
