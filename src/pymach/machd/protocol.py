"""The wire between machd and its tasks: framed pickles over a Unix socket, with fds.

Each native thread has its own connection to machd. A frame is an 8-byte header
(payload length, number of file descriptors) and a pickled payload; descriptors ride in
the same sendmsg as SCM_RIGHTS (memfds of memory objects, a task's userfaultfd).
Requests are dicts with an "op"; replies are {"ok": value} or {"err": (code, detail)},
with "batch" (this reply's batch number, or 0, and the last batch issued) and
optionally "maps" (address-space changes the task must apply) and their fds.

`Connection` is used by one thread at a time on each side (a trap is a request and its
reply); `send` and `recv` are therefore not locked.
"""

from __future__ import annotations

import array
import contextlib
import os
import pickle
import socket
import struct
from typing import Any

HEADER = struct.Struct("!II")
MAX_FDS = 64
DEFAULT_SOCKET = "/tmp/pymach-machd.sock"


class Disconnected(ConnectionError):
    """The other side closed the connection (machd or the task went away)."""


class Connection:
    """One framed, fd-carrying stream (see module docstring)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    def connect(cls, path: str) -> Connection:
        """A new connection to the machd listening at `path`."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        return cls(s)

    def fileno(self) -> int:
        """The socket's descriptor (for select)."""
        return self.sock.fileno()

    def close(self) -> None:
        """Close the connection."""
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, obj: Any, fds: list[int] | None = None) -> None:
        """Send one frame, with `fds` (descriptors stay open on this side)."""
        payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        fds = fds or []
        header = HEADER.pack(len(payload), len(fds))
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            self.sock.sendmsg([header], anc)  # the header carries the descriptors
            self.sock.sendall(payload)
        except (BrokenPipeError, ConnectionResetError) as e:
            raise Disconnected(str(e)) from None

    def recv(self) -> tuple[Any, list[int]]:
        """Receive one frame: (object, fds received with it)."""
        header, fds = self._recv_header()
        size, nfds = HEADER.unpack(header)
        payload = self._recv_exact(size)
        if len(fds) != nfds:
            raise Disconnected(f"expected {nfds} descriptors, got {len(fds)}")
        return pickle.loads(payload), fds

    def _recv_header(self) -> tuple[bytes, list[int]]:
        fds = array.array("i")
        try:
            data, anc, _flags, _ = self.sock.recvmsg(HEADER.size,
                                                      socket.CMSG_LEN(MAX_FDS * fds.itemsize))
        except (ConnectionResetError, OSError) as e:
            raise Disconnected(str(e)) from None
        for level, kind, blob in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(blob[:len(blob) - len(blob) % fds.itemsize])
        if not data:
            raise Disconnected("connection closed")
        if len(data) < HEADER.size:
            data += self._recv_exact(HEADER.size - len(data))
        return data, list(fds)

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except (ConnectionResetError, OSError) as e:
                raise Disconnected(str(e)) from None
            if not chunk:
                raise Disconnected("connection closed")
            buf += chunk
        return bytes(buf)


def close_fds(fds: list[int]) -> None:
    """Close received descriptors nobody took."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
