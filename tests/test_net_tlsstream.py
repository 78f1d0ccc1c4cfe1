"""net/tlsstream.py: a TLS connection on an asyncio loop through the ssl module's socket.

Two streams over loopback with the cluster's certificates, in one event loop: bytes
arrive whole and in order however they are cut (a write larger than the socket buffers
included), reading stops at a bound while nobody takes the bytes, and the end of a
stream (closed or aborted by the peer) reaches a reader that waits. A reader waiting for
a large piece gets it read straight into a buffer of its own and taken without a copy,
with what came before and after it intact.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable

import pytest

from pymach.net.cluster import Credentials, cluster_init, tls_contexts
from pymach.net.tlsstream import DIRECT_MIN, READ_HIGH, TlsStream

Body = Callable[[TlsStream, TlsStream], Awaitable[None]]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A cluster directory with hosts A and B."""
    d = str(tmp_path_factory.mktemp("cluster"))
    cluster_init(d, ["A", "B"])
    return d


def linked(cluster: str, body: Body) -> None:
    """Run `body(dialer, acceptor)` on two linked streams (A dials B), within 60 s."""
    server_tls, _ = tls_contexts(Credentials(cluster, "B"))
    _, client_tls = tls_contexts(Credentials(cluster, "A"))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with socket.create_server(("127.0.0.1", 0)) as listener:
            listener.setblocking(False)

            async def accept() -> TlsStream:
                sock, _ = await loop.sock_accept(listener)
                return await TlsStream.handshake(sock, server_tls, server_side=True)

            dialer, acceptor = await asyncio.gather(
                TlsStream.dial(listener.getsockname()[:2], client_tls), accept())
        try:
            await body(dialer, acceptor)
        finally:
            dialer.abort()
            acceptor.abort()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_bytes_arrive_whole_and_in_order_and_the_peer_is_named(cluster: str) -> None:
    pieces = [os.urandom(n) for n in (1, 7, 100, 16 << 10, 3 << 20, 5, 70 << 10, 3, 9,
                                      2 << 20, 64 << 10, 1)]  # (waiting: joined, or not)

    async def body(a: TlsStream, b: TlsStream) -> None:
        for piece in pieces:
            a.write(piece)
        for piece in pieces:
            assert await b.readexactly(len(piece)) == piece
        b.write(b"back")
        assert await a.readexactly(4) == b"back"
        assert "B" in str(a.get_extra_info("peercert"))

    linked(cluster, body)


def test_a_large_piece_is_read_straight_in_and_taken_without_a_copy(cluster: str) -> None:
    big = os.urandom(4 * READ_HIGH + 3)

    async def body(a: TlsStream, b: TlsStream) -> None:
        a.write(b"head")
        a.write(big)
        a.write(b"tail")
        assert await b.readexactly(4) == b"head"
        b.need(len(big))  # (more than DIRECT_MIN beyond what is buffered)
        while b.buffered < len(big):
            await asyncio.sleep(0.01)
        assert b.peek(8) == big[:8]
        view = b.take_view(len(big))
        assert isinstance(view, memoryview) and view.readonly and view == big
        assert await b.readexactly(4) == b"tail"
        a.write(big + b"more")  # taken across the end of the buffer read straight in
        b.need(len(big))
        assert await b.readexactly(len(big) + 4) == big + b"more"
        a.write(b"x" * (DIRECT_MIN - 1))  # a small piece: copied out as bytes
        b.need(DIRECT_MIN - 1)
        while b.buffered < DIRECT_MIN - 1:
            await asyncio.sleep(0.01)
        assert b.take_view(DIRECT_MIN - 1) == b"x" * (DIRECT_MIN - 1)

    linked(cluster, body)


def test_reading_stops_at_its_bound_while_nobody_takes_the_bytes(cluster: str) -> None:
    data = os.urandom(4 * READ_HIGH)

    async def body(a: TlsStream, b: TlsStream) -> None:
        a.write(data)
        await asyncio.sleep(0.5)  # (the reader reads what it may meanwhile)
        assert READ_HIGH <= b.buffered < 2 * READ_HIGH
        assert await b.readexactly(len(data)) == data  # a reader that needs more gets it

    linked(cluster, body)


@pytest.mark.parametrize("how", ["close", "abort"])
def test_the_end_reaches_a_waiting_reader(cluster: str, how: str) -> None:
    async def body(a: TlsStream, b: TlsStream) -> None:
        a.write(b"last")
        waiting = asyncio.get_running_loop().create_task(b.readexactly(10))
        await asyncio.sleep(0.1)
        a.close() if how == "close" else a.abort()
        with pytest.raises((EOFError, OSError)):
            await waiting
        await a.wait_closed()
        assert a.is_closing()

    linked(cluster, body)
