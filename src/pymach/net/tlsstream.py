"""One TLS connection on an asyncio loop, read and written through the `ssl` module's own
socket (net/tcp.py's links).

asyncio's TLS layer (its SSL protocol over a memory BIO, then a stream reader and a
writer) costs several times the CPU of the system calls it wraps: about 60 us a
message each way on the development machine against about 13 us for a blocking
`ssl.SSLSocket`. A link between hosts carries small packets one at a time (a remote
procedure call is one packet each way), so `TlsStream` does what a link needs directly:
a non-blocking `SSLSocket`, read by a reader callback of the loop into a buffer, and
written at once (what the socket cannot take yet waits for the loop to see it
writable). It offers the part of `asyncio.StreamReader` / `StreamWriter` that net/tcp.py
uses: `readexactly`, `write`, `close`, `abort`, `is_closing`, `wait_closed`,
`get_extra_info`; and, for a reader that takes frames as they come without a task
switch, `on_data` (called on the loop when bytes arrive or the stream ends), `buffered`,
`peek`, `take`, `need`, `pause_reading` and `resume_reading`.

Invariants (all on the loop's thread: the `SSLSocket` is never used from two threads):
- Bytes are handed out in the order they arrived, each once; after the peer's end of
  stream or an error, `readexactly` raises `asyncio.IncompleteReadError` (an EOFError)
  or that error once the buffer runs short.
- What is buffered is bounded: reading pauses while the buffer holds at least
  max(READ_HIGH, the size a reader waits for), and resumes when a reader takes it
  down (the peer is then held back by TCP's flow control).
- A reader that waits for DIRECT_MIN bytes or more beyond what is buffered gets them
  read straight into one buffer of exactly the size it waits for (`recv_into`: OpenSSL
  decrypts into it; nothing more is read until it is full, and it is taken before
  anything read after it); `take_view` hands the rest of such a buffer on without a
  copy. While a reader waits for more, the socket is read until it has no more (not
  one TLS record per turn of the loop).
- Written bytes go out in the order written. A write the socket refused in part
  (SSLWantWriteError) is retried with the same bytes before any later ones (OpenSSL's
  rule for a non-blocking SSL_write).
- `abort` closes at once (pending writes are dropped); `close` closes once what was
  written has gone out. Either way the reader sees the end, and `wait_closed` returns.
- `on_data` is only called from the loop's own callbacks (bytes arrived, or the end,
  which is told on a later turn of the loop), never from inside `write` or `abort`: a
  reader acting on a frame may write or abort without being called again inside.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any

READ_HIGH = 1 << 20  # bytes buffered after which reading pauses (unless a reader needs more)
RECV_SIZE = 256 << 10  # bytes asked of the socket at a time
_JOIN_MAX = 64 << 10  # bytes of small writes joined while the socket cannot take them
DIRECT_MIN = 256 << 10  # bytes a reader waits for beyond the buffer, from which they are
# read straight into a buffer of their own


class TlsStream:
    """A TLS connection whose handshake is done, carried by the running loop (see module
    docstring). Make one with `dial` or `accept`."""

    def __init__(self, sock: ssl.SSLSocket, loop: asyncio.AbstractEventLoop) -> None:
        self.sock = sock
        self.loop = loop
        self.fd = sock.fileno()
        self._buf = bytearray()
        self._scratch = bytearray(RECV_SIZE)  # what one read lands in before `_buf`
        self._direct: bytearray | None = None  # the front of the stream, read straight in
        self._got = self._taken = 0  # bytes of `_direct` filled, and taken by the reader
        self._want = 0  # bytes the waiting reader needs (0: none waits)
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._error: BaseException | None = None
        self._paused = False  # the reader callback is off
        self._held = False  # by pause_reading
        self._pending: bytes | memoryview | None = None  # a write to retry as it was
        self._out: deque[bytearray | memoryview] = deque()  # what was written after it:
        # small writes joined, large ones as they were given (not copied)
        self._writing = False  # a writer callback is registered
        self._closing = False
        self._closed: asyncio.Future[None] = loop.create_future()
        self.on_data: Callable[[], None] | None = None  # called (on the loop) when bytes
        # arrive or the stream ends, for a reader that takes them as they come (`take`)
        loop.add_reader(self.fd, self._readable)

    # -- making one -------------------------------------------------------------------
    @classmethod
    async def dial(cls, addr: tuple[str, int], context: ssl.SSLContext) -> TlsStream:
        """Connect to `addr` (any address it resolves to, in turn) and do the client's
        handshake. OSError (ssl.SSLError among them) if neither works."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(addr[0], addr[1], type=socket.SOCK_STREAM)
        error: OSError = OSError(f"{addr[0]} resolves to no address")
        for family, kind, proto, _, where in infos:
            sock = socket.socket(family, kind, proto)
            try:
                sock.setblocking(False)
                await loop.sock_connect(sock, where)
            except OSError as e:
                sock.close()
                error = e
                continue
            except BaseException:
                sock.close()
                raise
            return await cls.handshake(sock, context, server_side=False)
        raise error

    @classmethod
    async def handshake(cls, sock: socket.socket, context: ssl.SSLContext,
                        server_side: bool) -> TlsStream:
        """Do the TLS handshake on the connected socket `sock` (which it takes over: it is
        closed if the handshake fails or is cancelled)."""
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls = context.wrap_socket(sock, server_side=server_side,
                                  do_handshake_on_connect=False)
        try:
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await _ready(loop, tls.fileno(), write=False)
                except ssl.SSLWantWriteError:
                    await _ready(loop, tls.fileno(), write=True)
        except BaseException:
            tls.close()
            raise
        return cls(tls, loop)

    # -- reading ----------------------------------------------------------------------
    async def readexactly(self, n: int) -> bytes:
        """The next `n` bytes; asyncio.IncompleteReadError at the end of the stream, the
        connection's OSError if it broke."""
        while self.buffered < n:
            self.need(n)
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
                self._want = 0
        return self.take(n)

    @property
    def buffered(self) -> int:
        """Bytes received and not yet taken."""
        return len(self._buf) + (self._got - self._taken if self._direct is not None else 0)

    def peek(self, n: int) -> bytes:
        """The first `n` buffered bytes, left in the buffer."""
        d = self._direct
        if d is None:
            return bytes(self._buf[:n])
        front = bytes(d[self._taken:min(self._got, self._taken + n)])
        return front + bytes(self._buf[:n - len(front)])

    def take(self, n: int) -> bytes:
        """Take the first `n` buffered bytes (there must be that many)."""
        data = self.take_view(n)
        return data if isinstance(data, bytes) else bytes(data)

    def take_view(self, n: int) -> bytes | memoryview:
        """`take`, but `n` bytes that end a buffer read straight in (DIRECT_MIN or more)
        come as a read-only view of it, not copied."""
        d = self._direct
        if d is None:
            data: bytes | memoryview = self._take_buffered(n)
        elif self._taken + n <= self._got:
            view = memoryview(d)[self._taken:self._taken + n].toreadonly()
            self._taken += n
            if self._taken == len(d):
                self._direct = None
            data = view if n >= DIRECT_MIN and self._direct is None else bytes(view)
        else:  # (across its end: only once it is full)
            front = bytes(d[self._taken:])
            self._direct = None
            data = front + self._take_buffered(n - len(front))
        self._want = 0
        if self._paused and len(self._buf) < READ_HIGH:
            self._resume()
        return data

    def _take_buffered(self, n: int) -> bytes:
        with memoryview(self._buf) as view:
            data = bytes(view[:n])
        del self._buf[:n]
        return data

    def need(self, n: int) -> None:
        """A reader waits for `n` buffered bytes (via `on_data`): raise the stream's error,
        or asyncio.IncompleteReadError, if they will never come; else read on until they
        are here, however many that is."""
        have = self.buffered
        if have >= n:
            return
        if self._error is not None:
            raise self._error
        if self._eof:
            raise asyncio.IncompleteReadError(self.peek(have), n)
        self._want = n
        if self._direct is None and n - have >= DIRECT_MIN:
            self._direct = bytearray(n)  # (what is buffered is its start)
            self._direct[:have] = self._buf
            self._got, self._taken = have, 0
            self._buf.clear()
        self._resume()

    def pause_reading(self) -> None:
        """Read nothing more until `resume_reading` (the reader is held back)."""
        self._held = True
        self._pause()

    def resume_reading(self) -> None:
        """Read again after `pause_reading`."""
        self._held = False
        self._resume()

    def _readable(self) -> None:
        """(Reader callback) take what the socket has, and what OpenSSL decrypted: one
        record at a time unless a reader waits for more (then until the socket is dry,
        or what the reader waits for is here)."""
        if self._closed.done():
            return
        try:
            while self._read_some():
                pass
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            pass
        except OSError as e:  # (ssl.SSLError is one)
            self._error = e
        if self._eof or self._error is not None:
            self._stop_reading()
        if self._pending is not None:
            self._flush()  # (a write that waited for the peer)
        self._wake()

    def _read_some(self) -> bool:
        """One read from the socket; whether to read again at once."""
        d = self._direct
        if d is not None and self._got < len(d):
            with memoryview(d) as view:
                got = self.sock.recv_into(view[self._got:], len(d) - self._got)
            if not got:
                self._eof = True
                return False
            self._got += got  # (full: the reader takes it before more is read, but what
            return self._got < len(d) or self.sock.pending() > 0  # OpenSSL holds, now)
        with memoryview(self._scratch) as view:  # (no fresh RECV_SIZE buffer per read)
            got = self.sock.recv_into(view, RECV_SIZE)
            if not got:
                self._eof = True
                return False
            self._buf += view[:got]
        if len(self._buf) >= max(READ_HIGH, self._want):
            self._pause()
            return False
        # (more in the socket: the loop calls again; OpenSSL reads no further than the
        # record it decrypts)
        return self.buffered < self._want or self.sock.pending() > 0

    def _pause(self) -> None:
        if not self._paused:
            self._paused = True
            self.loop.remove_reader(self.fd)

    def _resume(self) -> None:
        if self._paused and not self._held and not self._closing and self._error is None \
                and not self._eof:
            self._paused = False
            self.loop.add_reader(self.fd, self._readable)
            self.loop.call_soon(self._readable)  # (OpenSSL may hold decrypted bytes)

    def _stop_reading(self) -> None:
        if not self._paused:
            self._paused = True
            self.loop.remove_reader(self.fd)

    def _wake(self) -> None:
        if self.on_data is not None:
            self.on_data()
        waiter = self._waiter
        if waiter is not None and not waiter.done() and (
                self.buffered >= self._want or self._eof or self._error is not None):
            waiter.set_result(None)

    # -- writing ----------------------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send `data` after what was written before (at once if the socket takes it; the
        caller does not change `data` after: it is not copied)."""
        if self._closing or self._error is not None:
            return
        if self._pending is not None or self._out:
            self._queue(data)
            return
        self._send(memoryview(data) if isinstance(data, bytearray) else data)

    def _queue(self, data: bytes | bytearray | memoryview) -> None:
        """Keep `data` to write after what waits: a small piece joins the last small one
        (one TLS record for both), a large one is kept as it is (no copy)."""
        last = self._out[-1] if self._out else None
        if len(data) > _JOIN_MAX:
            self._out.append(memoryview(data))
        elif isinstance(last, bytearray) and len(last) + len(data) <= _JOIN_MAX:
            last += data
        else:
            self._out.append(bytearray(data))

    def _send(self, data: bytes | memoryview) -> None:
        """SSL_write `data` whole, or keep it to retry as it is."""
        try:
            sent = self.sock.send(data)
        except (ssl.SSLWantWriteError, BlockingIOError):
            self._pending = data
            self._want_writable()
            return
        except ssl.SSLWantReadError:  # (it waits for the peer: the reader retries it)
            self._pending = data
            return
        except OSError as e:
            self._broken(e)
            return
        self._pending = None
        if sent < len(data):  # (partial writes are off; in case they are not)
            self._out.appendleft(memoryview(data)[sent:])
            self._want_writable()

    def _flush(self) -> None:
        """Retry the refused write, then write what followed it."""
        if self._pending is not None:
            self._send(self._pending)
        while self._pending is None and self._out and self._error is None:
            self._send(memoryview(self._out.popleft()))
        if self._pending is None and not self._out:
            self._stop_writing()
            if self._closing:
                self._finish()

    def _want_writable(self) -> None:
        if not self._writing and self._error is None:
            self._writing = True
            self.loop.add_writer(self.fd, self._flush)

    def _stop_writing(self) -> None:
        if self._writing:
            self._writing = False
            self.loop.remove_writer(self.fd)

    def _broken(self, e: OSError) -> None:
        """A write failed: the connection is over; the reader sees `e`."""
        self._error = e
        self._pending = None
        self._out.clear()
        self._finish()

    # -- the StreamWriter part net/tcp.py uses -------------------------------------------
    def is_closing(self) -> bool:
        """True once closing began (or the connection broke)."""
        return self._closing or self._error is not None

    def close(self) -> None:
        """Close once what was written has gone out."""
        if self._closing:
            return
        self._closing = True
        if self._pending is None and not self._out:
            self._finish()

    def abort(self) -> None:
        """Close at once; what was not written yet is lost."""
        self._closing = True
        self._pending = None
        self._out.clear()
        self._finish()

    async def wait_closed(self) -> None:
        """Return once the socket is closed."""
        await asyncio.shield(self._closed)

    def get_extra_info(self, name: str) -> Any:
        """'peercert' (the verified certificate, as a dict) or 'peername'; else None."""
        with contextlib.suppress(OSError, ValueError):
            if name == "peercert":
                return self.sock.getpeercert()
            if name == "peername":
                return self.sock.getpeername()
        return None

    def _finish(self) -> None:
        """Close the socket (once); a reader waiting sees the end."""
        if self._closed.done():
            return
        self._stop_reading()
        self._stop_writing()
        self.sock.close()
        if self._error is None:
            self._eof = True
        self._closed.set_result(None)
        self.loop.call_soon(self._wake)  # (not from inside whatever wrote or aborted)


async def _ready(loop: asyncio.AbstractEventLoop, fd: int, write: bool) -> None:
    """Wait until `fd` is readable (or writable)."""
    ready: asyncio.Future[None] = loop.create_future()

    def done() -> None:
        if not ready.done():
            ready.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, done)
    try:
        await ready
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)
