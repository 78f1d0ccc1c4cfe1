"""The netmsgserver's one seam to the network, and the typed packets it sends over it.

- The server runs over any `NetTransport`: the in-process `Network` and, here, `Hub`, a
  second trivial transport (one delivery thread, so packets arrive asynchronously),
  carry the same remote procedure calls, rights, out-of-line memory and names.
- Every packet is one of the typed layouts of net/packets.py. Garbage (random bytes,
  truncated or mutated packets, fields of the wrong type or range) is refused and
  logged, and the server keeps serving.
- No pickle is left in src/pymach/net.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import queue
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pymach as m
from pymach.include import wire
from pymach.include.message import Code
from pymach.include.wire import WireError
from pymach.net import packets as pk
from pymach.net.netname import netname_wait
from pymach.net.station import Host
from pymach.net.transport import NetTransport, PacketSink

NET = Path(__file__).resolve().parents[1] / "src" / "pymach" / "net"
WAIT_S = 10.0


# -- a second transport: the netmsgserver does not depend on the concrete network -----------
class Hub:
    """A trivial network: every event goes through one FIFO served by one thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sinks: dict[str, PacketSink] = {}
        self.sent: list[tuple[str, str, bytes]] = []  # (source, dest, data) accepted
        self.events: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (event := self.events.get()) is not None:
            event()

    def join(self, host: str, sink: PacketSink) -> None:
        with self.lock:
            others = dict(self.sinks)
            self.sinks[host] = sink
        for peer, other in others.items():
            self.events.put(lambda p=peer: sink.host_up(p))
            self.events.put(lambda o=other: o.host_up(host))

    def leave(self, host: str) -> None:
        with self.lock:
            self.sinks.pop(host, None)
            others = list(self.sinks.values())
        for other in others:
            self.events.put(lambda o=other: o.host_down(host))

    def carry(self, source: str, dest: str, data: bytes) -> bool:
        with self.lock:
            sink = self.sinks.get(dest)
            if sink is None:
                return False
            self.sent.append((source, dest, data))
        self.events.put(lambda: sink.packet(source, data))
        return True

    def stop(self) -> None:
        self.events.put(None)
        self.thread.join(5)


class HubTransport(NetTransport):
    """One host's attachment to a Hub."""

    def __init__(self, hub: Hub, host: str) -> None:
        self.hub, self._host = hub, host

    @property
    def host(self) -> str:
        return self._host

    def start(self, sink: PacketSink) -> None:
        self.hub.join(self._host, sink)

    def send(self, dest: str, data: bytes) -> bool:
        return self.hub.carry(self._host, dest, data)

    def close(self) -> None:
        self.hub.leave(self._host)


class Recorder(PacketSink):
    """A sink that only remembers what it was told (a fake host's side)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def packet(self, source: str, data: bytes) -> None:
        self.events.append(("packet", source))

    def host_up(self, host: str) -> None:
        self.events.append(("up", host))

    def host_down(self, host: str) -> None:
        self.events.append(("down", host))


@contextlib.contextmanager
def hub_hosts(*names: str) -> Iterator[tuple[Hub, dict[str, Host]]]:
    """Hosts joined by a Hub; shut down afterwards."""
    hub, hosts = Hub(), {}
    try:
        for name in names:
            hosts[name] = Host(HubTransport(hub, name))
        yield hub, hosts
    finally:
        for h in hosts.values():
            h.kernel.shutdown()
        hub.stop()


def wait_until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


# -- tasks ------------------------------------------------------------------------------
def echo_server(name: str, count: int) -> int:
    """Check a port in as `name`; answer `count` requests: each item transformed, and
    a message on every port that came in a Port item."""
    me = m.task_self()
    port = m.port_allocate(me)
    ns = m.task_get_special_port(me, m.TASK_BOOTSTRAP_PORT)
    from pymach.net.netname import netname_check_in

    netname_check_in(ns, name, port)
    for _ in range(count):
        msg = m.msg_receive(port)
        m.msg_send(m.Message(remote_port=msg.remote_port, id=msg.id + 100,
                             items=[_echo(i) for i in msg.items]))
    return count


def _echo(item: Any) -> Any:
    if isinstance(item, m.Int):
        return m.Int(2 * item.value)
    if isinstance(item, m.Float):
        return m.Float(2 * item.value)
    if isinstance(item, m.Str):
        return m.Str(item.value.upper())
    if isinstance(item, m.Bytes | m.OOL):
        from pymach.mach_vm import take_ool

        data = item.value if isinstance(item, m.Bytes) else take_ool(item)
        return m.OOL(data=data[::-1]) if isinstance(item, m.OOL) else m.Bytes(data[::-1])
    if isinstance(item, m.IntArray):
        return m.IntArray(tuple(reversed(item.values)))
    assert isinstance(item, m.Port)
    m.msg_send(m.Message(remote_port=item.name, id=7, items=[m.Str("via a sent right")]))
    return m.Int(item.name != 0)


def client(name: str) -> list[Any]:
    """Call `name` across the network with one item of each kind; the reply's values."""
    from pymach.mach_vm import take_ool

    me = m.task_self()
    service = netname_wait(name, WAIT_S * 1000)
    mine = m.port_allocate(me)
    reply = m.msg_rpc(m.Message(remote_port=service, local_port=m.thread_reply(), id=500,
                                items=[m.Int(21), m.Float(1.25), m.Str("abc"), m.Bytes(b"xyz"),
                                       m.IntArray((1, 2, 3)), m.OOL(data=b"page" * 1024),
                                       m.Port(mine, m.MAKE_SEND)]))
    via = m.msg_receive(mine, m.RCV_TIMEOUT, WAIT_S * 1000)
    values = [take_ool(i) if isinstance(i, m.OOL) else i.value for i in reply.items]
    return [reply.id, *values, via.id, via.items[0].value]


EXPECTED = [600, 42, 2.5, "ABC", b"zyx", (3, 2, 1), b"egap" * 1024, 1, 7, "via a sent right"]


# -- the server over either transport ---------------------------------------------------
def test_rpc_rights_and_memory_cross_the_in_process_network() -> None:
    with m.Network() as net:
        a, b = net.host("A"), net.host("B")
        a.start(echo_server, "echo", 1, name="server")
        assert b.start(client, "echo", name="client").wait(WAIT_S * 1000) == EXPECTED
        assert net.packets > 0 and net.dropped == 0
        assert isinstance(net.transport("X"), NetTransport)


def test_rpc_rights_and_memory_cross_a_second_transport() -> None:
    with hub_hosts("A", "B") as (hub, hosts):
        hosts["A"].start(echo_server, "echo", 1, name="server")
        assert hosts["B"].start(client, "echo", name="client").wait(WAIT_S * 1000) == EXPECTED
        assert hub.sent, "the hub carried the packets"
        kinds = {type(pk.decode_packet(data)) for _, _, data in hub.sent}
        assert {pk.MsgPacket, pk.NamePacket} <= kinds  # every packet is a typed layout


def test_names_reach_a_host_that_joins_later() -> None:
    hub = Hub()
    a = Host(HubTransport(hub, "A"))
    try:
        a.start(echo_server, "late", 1, name="server")
        wait_until(lambda: "late" in a.server.own_names, "the check-in on A")
        b = Host(HubTransport(hub, "B"))
        try:
            assert b.start(client, "late", name="client").wait(WAIT_S * 1000) == EXPECTED
        finally:
            b.kernel.shutdown()
    finally:
        a.kernel.shutdown()
        hub.stop()


def _proxy_dies(name: str, ready: threading.Event, gone: threading.Event) -> str:
    """Hold a proxy for `name`; after `gone`, wait until sending on it fails."""
    port = netname_wait(name, WAIT_S * 1000)
    ready.set()
    assert gone.wait(WAIT_S)
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            m.msg_send(m.Message(remote_port=port, items=[m.Int(1)]), m.SEND_TIMEOUT, 0)
        except m.MachError as e:
            return e.code
        time.sleep(0.005)
    return "still alive"


@pytest.mark.parametrize("via", ["hub", "network"])
def test_host_down_kills_its_proxies_and_names(via: str) -> None:
    ready, gone = threading.Event(), threading.Event()
    with contextlib.ExitStack() as stack:
        if via == "hub":
            hub, hosts = stack.enter_context(hub_hosts("A", "B"))
            a, b = hosts["A"], hosts["B"]
            down: Callable[[], None] = lambda: hub.leave("A")  # noqa: E731
        else:
            net = stack.enter_context(m.Network())
            a, b = net.host("A"), net.host("B")
            down = lambda: net.crash("A")  # noqa: E731
        a.start(echo_server, "gone", 1, name="server")
        handle = b.start(_proxy_dies, "gone", ready, gone, name="client")
        assert ready.wait(WAIT_S)
        down()
        gone.set()
        assert handle.wait(WAIT_S * 1000) == "SEND_INVALID_PORT"
        wait_until(lambda: "gone" not in b.server.names, "B to drop A's names")


def test_a_code_item_does_not_cross_hosts() -> None:
    def call() -> int:
        service = netname_wait("echo", WAIT_S * 1000)
        reply = m.msg_rpc(m.Message(remote_port=service, local_port=m.thread_reply(),
                                    items=[Code(print, ("hi",))]))
        value = reply.items[0].value
        assert isinstance(value, int)
        return value

    with m.Network() as net:
        a, b = net.host("A"), net.host("B")
        a.start(echo_server, "echo", 1, name="server")
        assert b.start(call, name="client").wait(WAIT_S * 1000) == m.MachError(
            "SEND_INVALID_TYPE").value


# -- packets ------------------------------------------------------------------------------
REF = ("A", b"\x01" * pk.NET_ID_SIZE)
VALID: list[pk.Packet] = [
    pk.MsgPacket(b"\x02" * 16, 5, REF, (m.Int(-1), m.Float(0.5), m.Bytes(b""), m.Str("é"),
                                       m.IntArray((1, 2**63 - 1)), pk.PortRef(REF),
                                       pk.PortRef(None), pk.PortRefs((REF, None)),
                                       pk.OolData(b"d" * 100))),
    pk.MsgPacket(b"\x03" * 16, 0, None, ()),
    pk.MsgPacket(b"\x03" * 16, 0, None, (), b"\x0a" * 16, 16),
    pk.AckPacket(b"\x0b" * 16, 16),
    pk.DeadPacket(b"\x04" * 16),
    pk.NamePacket("svc", REF),
    pk.UnnamePacket("svc"),
    pk.ChokePacket(b"\x06" * 16, 16),
    pk.ReadyPacket(b"\x07" * 16),
    pk.PageInPacket(b"\x08" * 16, 4096, 8192, 1),
    pk.PagePacket(b"\x09" * 16, 4096, b"page" * 1024),
    pk.PagePacket(b"\x09" * 16, 0, b""),
]


@pytest.mark.parametrize("packet", VALID, ids=lambda p: type(p).__name__)
def test_packets_round_trip(packet: pk.Packet) -> None:
    assert pk.decode_packet(pk.encode_packet(packet)) == packet


ID = b"\x05" * 16
WRONG_TYPES: list[list[Any]] = [
    [],
    ["1"],
    [True, ID],
    [99, ID],
    [pk.K_DEAD, b"short"],
    [pk.K_DEAD, ID, 1],
    [pk.K_DEAD, "not bytes"],
    [pk.K_NAME, "", ["A", ID]],
    [pk.K_NAME, "n", ["", ID]],
    [pk.K_NAME, "n", ["A" * 256, ID]],
    [pk.K_NAME, "n", ["A", ID, 3]],
    [pk.K_NAME, "n", None],
    [pk.K_NAME, "n" * 1025, ["A", ID]],
    [pk.K_UNNAME, 5],
    [pk.K_MSG, ID, True, None, [], None, 0],
    [pk.K_MSG, ID, 1.0, None, [], None, 0],
    [pk.K_MSG, ID, 1, "A", [], None, 0],
    [pk.K_MSG, ID, 1, None, [7], None, 0],
    [pk.K_MSG, ID, 1, None, [[]], None, 0],
    [pk.K_MSG, ID, 1, None, [[42, 1]], None, 0],
    [pk.K_MSG, ID, 1, None, [[pk.I_INT, 1.5]], None, 0],
    [pk.K_MSG, ID, 1, None, [[pk.I_INT, True]], None, 0],
    [pk.K_MSG, ID, 1, None, [[pk.I_STR, b"x"]], None, 0],
    [pk.K_MSG, ID, 1, None, [[pk.I_INTS, [1, "2"]]], None, 0],
    [pk.K_MSG, ID, 1, None, [[pk.I_PORT, ["A", b"x" * 15]]], None, 0],
    [pk.K_MSG, ID, 1, None, [[pk.I_PORTS, [["A"]]]], None, 0],
    [pk.K_MSG, ID, 1, None, [[pk.I_OOL, "text"]], None, 0],
    [pk.K_MSG, ID, 1, None, [[pk.I_INT, 1, 2]], None, 0],
    [pk.K_MSG, m.Message(items=[m.Int(1)])],
    [pk.K_MSG, ID, 1, None, []],  # no ask and count
    [pk.K_MSG, ID, 1, None, [], None, 1],  # a count without an ask
    [pk.K_MSG, ID, 1, None, [], ID, 0],  # an ask of nothing
    [pk.K_MSG, ID, 1, None, [], ID, pk.MAX_ASK + 1],
    [pk.K_MSG, ID, 1, None, [], b"short", 1],
    [pk.K_MSG, ID, 1, None, [], "ask", 1],
    [pk.K_ACK, ID, 0],
    [pk.K_ACK, ID, -3],
    [pk.K_ACK, ID, pk.MAX_ASK + 1],
    [pk.K_ACK, b"short", 1],
    [pk.K_ACK, ID],
    [pk.K_ACK, ID, 1, 2],
    [pk.K_MSG, ID, 1, None, [m.Message()], None, 0],
    [pk.K_CHOKE, ID, 0],  # a backlog of nothing
    [pk.K_CHOKE, ID, -1],
    [pk.K_CHOKE, ID, pk.MAX_BACKLOG + 1],
    [pk.K_CHOKE, ID, "16"],
    [pk.K_CHOKE, b"short", 4],
    [pk.K_CHOKE, ID],
    [pk.K_READY, ID, 1],
    [pk.K_READY, b"x" * 17],
    [pk.K_PAGE, ID, 0, "data"],  # a PAGE ends with its data, bytes
    [pk.K_PAGE, ID, 0, b"data", 1],
    [pk.K_PAGE, ID, 0],
    [pk.K_PAGE, ID, True, b"data"],
    [pk.K_PAGE, ID, -1, b"data"],
    [pk.K_PAGE, ID, pk.MAX_COR, b"data"],
    [pk.K_PAGE, b"short", 0, b"data"],
    [pk.K_PAGE, None, 0, b"data"],
]


@pytest.mark.parametrize("values", WRONG_TYPES, ids=range(len(WRONG_TYPES)))
def test_packets_of_the_wrong_shape_are_refused(values: list[Any]) -> None:
    with pytest.raises(WireError):
        pk.decode_packet(wire.encode(values))


def test_a_page_packet_s_data_is_not_copied_when_decoded() -> None:
    data = pk.encode_packet(pk.PagePacket(ID, 8192, b"\x07" * 3 * 4096))
    page = pk.decode_packet(memoryview(bytearray(data)))  # as a frame's view comes
    assert isinstance(page, pk.PagePacket) and isinstance(page.data, memoryview)
    assert page.data.readonly and page.data == b"\x07" * 3 * 4096
    assert page.port == ID and page.offset == 8192
    assert pk.decode_packet(data) == page


def test_truncated_packets_are_refused() -> None:
    for packet in VALID:
        data = pk.encode_packet(packet)
        for n in range(len(data)):
            with pytest.raises(WireError):
                pk.decode_packet(data[:n])


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_decode_to_a_packet_or_a_wire_error(data: bytes) -> None:
    with contextlib.suppress(WireError):
        assert isinstance(pk.decode_packet(data), pk.Packet)


def garbage() -> list[bytes]:
    """Random bytes, truncations, byte flips and wrong types, all meant for ports that
    do not exist (so a mutation that still decodes does no harm)."""
    rng = random.Random(1987)
    out = [rng.randbytes(rng.randrange(64)) for _ in range(100)]
    valid = pk.encode_packet(VALID[0])
    out += [valid[:n] for n in range(0, len(valid), 7)]
    for n in range(0, len(valid), 5):
        out.append(valid[:n] + bytes([valid[n] ^ 0xFF]) + valid[n + 1:])
    out += [wire.encode(v) for v in WRONG_TYPES]
    return out


def refused(data: bytes) -> bool:
    try:
        pk.decode_packet(data)
    except WireError:
        return True
    return False


@pytest.mark.parametrize("via", ["hub", "network"])
def test_garbage_is_refused_logged_and_the_server_keeps_serving(
        via: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pymach.net")
    junk = garbage()
    expected = sum(map(refused, junk))
    assert expected >= len(junk) - 40  # nearly all of it is refused outright
    with contextlib.ExitStack() as stack:
        if via == "hub":
            hub, hosts = stack.enter_context(hub_hosts("A", "B"))
            inject: Callable[[bytes], object] = lambda d: hub.carry("evil", "B", d)  # noqa: E731
        else:
            net = stack.enter_context(m.Network())
            hosts = {"A": net.host("A"), "B": net.host("B")}
            evil = net.transport("evil")
            evil.start(Recorder())
            inject = lambda d: evil.send("B", d)  # noqa: E731
        hosts["A"].start(echo_server, "echo", 1, name="server")
        for data in junk:
            inject(data)
        server = hosts["B"].server
        wait_until(lambda: server.bad_packets == expected, f"{expected} refusals")
        assert hosts["B"].start(client, "echo", name="client").wait(WAIT_S * 1000) == EXPECTED
    assert server.bad_packets == expected
    refusals = [r for r in caplog.records if "refused a packet from 'evil'" in r.getMessage()]
    assert len(refusals) == expected


def test_a_fake_host_is_told_who_is_up() -> None:
    with m.Network() as net:
        net.host("A")
        spy = Recorder()
        net.transport("spy").start(spy)
        assert ("up", "A") in spy.events
        assert not net.transport("nobody").send("A", b"")  # not on the network


# -- no pickle, one seam --------------------------------------------------------------------
def test_no_pickle_in_the_network_server() -> None:
    forbidden = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "marshal", "shelve"}
    for path in sorted(NET.glob("*.py")):
        text = path.read_text()
        assert not re.search(r"\b(c?pickle|cloudpickle|marshal|dill)\.\w+\(", text), path
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                names = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {(node.module or "").split(".")[0]}
            else:
                continue
            assert not names & forbidden, f"{path.name} imports {names & forbidden}"


def test_the_server_reaches_the_network_only_through_the_transport() -> None:
    for module in ("netmsgserver.py", "station.py", "packets.py", "transport.py"):
        tree = ast.parse((NET / module).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "pymach.net.network" not in imported, module
