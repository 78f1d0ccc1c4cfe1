"""The typed wire (include/wire.py, include/channel.py, include/traps.py): round trips,
and bad input refused with WireError and nothing else (no machd needed)."""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import socket
import struct
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pymach.include import traps, wire
from pymach.include.channel import Channel, Disconnected
from pymach.include.message import (
    MOVE_RECEIVE,
    OOL,
    Bytes,
    Code,
    Float,
    Int,
    IntArray,
    Message,
    Port,
    PortArray,
    Str,
)

SRC = Path(__file__).resolve().parents[1] / "src" / "pymach"

ALL_ITEMS = [Int(-5), Float(2.5), Bytes(b"\x00xy"), Str("h\u00e9llo"), IntArray((1, -2, 3)),
             Port(7, MOVE_RECEIVE), PortArray((1, 2), MOVE_RECEIVE),
             OOL(0x1000, 8192, deallocate=True), OOL(data=b"abc"),
             Code(None, blob=b"\x80blob", origin_uid=1000, refused=False),
             Code(None, origin_uid=1001, refused=True)]  # another user's: inert, no blob


def test_every_value_and_item_round_trips() -> None:
    msg = Message(3, 4, -9, list(ALL_ITEMS), sender_uid=42)
    values = [None, True, False, 0, -(2**63), 2**63 - 1, 1.5, b"", "x", [1, [2, "y"]], msg]
    back = wire.decode(wire.encode(values))
    assert back[:-1] == [None, True, False, 0, -(2**63), 2**63 - 1, 1.5, b"", "x",
                         [1, [2, "y"]]]
    got = back[-1]
    assert isinstance(got, Message)
    assert (got.remote_port, got.local_port, got.id, got.sender_uid) == (3, 4, -9, 42)
    assert got.items == ALL_ITEMS


def test_byte_strings_are_bounded_by_the_body_not_the_element_count() -> None:
    big = bytes(range(256)) * ((wire.MAX_COUNT + 4096) // 256)  # a pager's 8 MiB page run
    msg = Message(3, 0, 1, [OOL(data=big), Bytes(big)])
    got = wire.decode(wire.encode([big, msg]))
    assert got[0] == big and got[1].items == [OOL(data=big), Bytes(big)]
    n = wire.MAX_COUNT + 1  # a list is still bounded by its element count
    with pytest.raises(wire.WireError, match="count"):
        wire.decode(bytes([wire.T_LIST]) + struct.pack("<I", n) + bytes([wire.T_NONE]) * n)


def test_a_body_that_ends_with_a_blob_decodes_it_as_a_view() -> None:
    blob = os.urandom(5000)
    body = wire.encode_with_blob([1, b"id", "x", [2, b"in a list"]], memoryview(blob))
    assert body == wire.encode([1, b"id", "x", [2, b"in a list"], blob])
    values, view = wire.decode_with_blob(body)
    assert values == [1, b"id", "x", [2, b"in a list"]] and view == blob
    assert view.readonly and view.obj is body  # (not copied)
    assert wire.decode_with_blob(wire.encode([b""])) == ([], b"")
    for bad in (wire.encode([1, b"blob", 2]), wire.encode([1]), body[:-1], b""):
        with pytest.raises(wire.WireError):
            wire.decode_with_blob(bad)


def test_large_byte_strings_are_parts_of_their_own_not_copied() -> None:
    big = os.urandom(wire.SPILL_MIN)  # a pager's data: sent from where it is
    msg = Message(3, 0, 1, [Int(7), OOL(data=big), Bytes(b"small")])
    values = [1, msg, "tail", big]
    parts = wire.encode_parts(values)
    assert b"".join(parts) == wire.encode(values)
    assert sum(p is big for p in parts) == 2 and len(parts) == 4  # head, big, mid, big
    assert wire.encode_parts([b"x" * (wire.SPILL_MIN - 1)]) == \
        [wire.encode([b"x" * (wire.SPILL_MIN - 1)])]  # a smaller one is copied in
    assert wire.encode_parts([]) == []
    many = [os.urandom(wire.SPILL_MIN) for _ in range(wire.SPILL_PARTS_MAX)]  # each a part
    parts = wire.encode_parts(many)  # at first, then copied in: a gathering write takes
    assert b"".join(parts) == wire.encode(many) and len(parts) <= wire.SPILL_PARTS_MAX + 1


def test_a_frame_of_many_large_strings_goes_whole() -> None:
    """More large byte strings than a gathering write takes buffers (IOV_MAX, 1024): the
    frame still goes (a review's finding: sendmsg failed with EMSGSIZE, which the
    channel reported as a lost peer)."""
    a, b = socket.socketpair()
    with a, b:
        values = [b"x" * wire.SPILL_MIN] * 600
        got: list[object] = []
        reader = threading.Thread(target=lambda: got.append(Channel(b).recv()))
        reader.start()
        Channel(a).send(traps.REPLY, values)
        reader.join(20)
        assert got[0].values == values  # type: ignore[attr-defined]


def test_a_frame_of_parts_arrives_whole_however_the_socket_splits_it() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # many partial writes
        big = os.urandom(3 * wire.SPILL_MIN + 5)
        values = [1, big, Message(3, 0, 1, [OOL(data=big)]), "end"]
        got: list[object] = []
        reader = threading.Thread(target=lambda: got.append(Channel(b).recv()))
        reader.start()
        Channel(a).send(traps.REPLY, values)
        reader.join(10)
        frame = got[0]
        assert frame.values[:2] == [1, big] and frame.values[3] == "end"  # type: ignore
        rest = Channel(a).send_nowait(traps.REPLY, values)  # nobody reads: part goes
        assert rest is not None and 0 < len(rest) < len(b"".join(wire.encode_parts(
            values))) + wire.HEADER_SIZE


def test_values_that_cannot_travel_are_refused_at_the_sender() -> None:
    for bad in (object(), {1: 2}, 2**64, Code(lambda: 0), [[[[[1]]]]]):
        with pytest.raises(wire.WireError):
            wire.encode([bad])


@pytest.mark.parametrize("body", [
    b"\x03\x00",  # a truncated int
    b"\x05\xff\xff\xff\xff",  # a bytes length past the end
    b"\x07\x00\x00\x10\x00",  # a list count past the end
    b"\x06\x02\x00\x00\x00\xff\xfe",  # invalid UTF-8
    b"\x42",  # an unknown tag
    b"\x07\x01\x00\x00\x00" * 6 + b"\x00",  # lists nested too deep
])
def test_malformed_bodies_are_refused(body: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.decode(body)


def test_a_message_with_a_bad_disposition_or_item_is_refused() -> None:
    good = wire.encode([Message(1, 0, 0, [Port(5)])])
    port_at = good.index(bytes([wire.I_PORT]))
    bad_disp = bytearray(good)
    bad_disp[port_at + 9] = 99
    with pytest.raises(wire.WireError, match="disposition"):
        wire.decode(bytes(bad_disp))
    bad_item = bytearray(good)
    bad_item[port_at] = 0x7F
    with pytest.raises(wire.WireError, match="item type"):
        wire.decode(bytes(bad_item))


def test_a_pickle_is_not_a_frame() -> None:
    class Boom:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, ("touch /tmp/pymach-never-run",))

    payload = pickle.dumps(Boom())
    with pytest.raises(wire.WireError, match="magic"):
        wire.unpack_header(payload[:wire.HEADER_SIZE].ljust(wire.HEADER_SIZE, b"\0"))
    with pytest.raises(wire.WireError):
        wire.decode(payload)
    assert not os.path.exists("/tmp/pymach-never-run")


def test_headers_are_checked() -> None:
    assert wire.unpack_header(wire.pack_header(7, 10, 1)) == (7, 10, 1)
    with pytest.raises(wire.WireError, match="version"):
        wire.unpack_header(struct.pack("<4sHHII", b"PYMW", 2, 1, 0, 0))
    with pytest.raises(wire.WireError, match="exceeds"):
        wire.unpack_header(wire.pack_header(1, wire.MAX_BODY + 1, 0))
    with pytest.raises(wire.WireError, match="descriptors"):
        wire.unpack_header(wire.pack_header(1, 0, wire.MAX_FDS + 1))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_decode_or_raise_wire_error(data: bytes) -> None:
    try:
        values = wire.decode(data)
    except wire.WireError:
        return
    assert wire.decode(wire.encode(values)) == values  # what decodes re-encodes


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 255))
def test_bit_flips_of_a_message_decode_or_raise_wire_error(pos: int, byte: int) -> None:
    body = bytearray(wire.encode([Message(1, 2, 3, list(ALL_ITEMS)), [1, "a"]]))
    body[pos % len(body)] = byte
    with contextlib.suppress(wire.WireError):
        wire.decode(bytes(body))


def test_signatures_check_count_and_types_and_bool_is_not_int() -> None:
    wire.check([b"t", 5], traps.SIGNATURES[traps.HELLO_THREAD], "hello")
    for bad in ([b"t"], [b"t", "5"], [b"t", True], ["t", 5]):
        with pytest.raises(wire.WireError):
            wire.check(bad, traps.SIGNATURES[traps.HELLO_THREAD], "hello")
    assert set(traps.SIGNATURES) == set(traps.NAMES)


def test_channel_closes_descriptors_of_refused_frames() -> None:
    a, b = socket.socketpair()
    sender, receiver = Channel(a), Channel(b)
    r, w = os.pipe()
    try:
        header = wire.pack_header(traps.HELLO_PING, 3, 1)  # a body that does not decode
        a.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", r))])
        a.sendall(b"\x42\x00\x00")
        before = set(os.listdir("/proc/self/fd"))
        with pytest.raises(wire.WireError):
            receiver.recv()
        assert set(os.listdir("/proc/self/fd")) <= before  # the received copy is closed
        sender.send(traps.HELLO_PING, [], [r, r])  # fd count agrees: accepted
        frame = receiver.recv()
        assert frame.op == traps.HELLO_PING and len(frame.fds) == 2
        frame.close_fds()
        a.sendmsg([wire.pack_header(traps.HELLO_PING, 0, 2)],
                  [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", r))])
        with pytest.raises(wire.WireError, match="announces 2"):
            receiver.recv()
        sender.close()
        with pytest.raises(Disconnected):
            receiver.recv()
    finally:
        for fd in (r, w):
            os.close(fd)
        receiver.close()


def test_machd_and_the_wire_never_unpickle() -> None:
    """No pickle or cloudpickle in machd or the wire; cloudpickle only in the task-side
    library and the user API (a task decoding its own user's code)."""
    for folder in ("machd", "include", "net"):
        for path in (SRC / folder).glob("*.py"):
            text = path.read_text()
            assert not re.search(r"\bimport (cloud)?pickle\b|pickle\.loads", text), path
