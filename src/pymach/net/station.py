"""A host on a network: a booted kernel, its netmsgserver task, and its transport.

`start_netmsgserver(kernel, transport)` gives a booted kernel its netmsgserver task
(net/netmsgserver.py) with its service port (the bootstrap port every task created
afterwards inherits) and its wire port, and starts the transport with a sink, the host's
network interface. Two ways, one server:

- A `WirePortSink` (any transport): each transport event becomes a kernel message
  queued on the wire port, like an interrupt, whatever thread the transport calls from;
  the server's own thread (`NetMsgServer.run`) receives it with the rest.
- A `ServerPump` (a transport with a thread of its own, `own_thread` in
  net/transport.py: TCP; under the free scheduler): that thread *is* the server's
  thread. It handles each transport event as it comes, and it serves the server's
  messages too: the server's receive parks with a continuation (kern/sched_prim.py),
  so a task's message to a proxy is taken on the sending thread and handed to the
  transport's thread (`call_soon`), which encodes it and writes it to the peer. A
  packet reaches its port with no thread of the host woken but the transport's, and a
  message reaches its peer with one wake-up (of that thread) where the wire port took
  two (the wire port is then unused).
`Host(transport, config)` boots an embedded kernel named after `transport.host` and
does that; machd does it on its own kernel (machd/machd.py). The same server runs over
any `NetTransport` (net/transport.py): the in-process network (net/network.py), TCP
(net/tcp.py) or another.

Invariants: the wire port has no send right outside the kernel, so everything on it
comes from the sink; a WirePortSink never blocks on the server (it queues under the
kernel's scheduler lock and returns) and drops events once the wire port is dead. Its
backlog is the bytes of packets it queued that the server has not taken yet; a
ServerPump's is 0 (the transport reads on only once the server has taken the packet).
Either way the server sees one host's events in the order the transport gave them, and
one thread serves at a time (a pump's Handoff only schedules work on its thread).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from pymach.errors import MachError, ThreadTerminated
from pymach.include.message import MSG_OPTION_NONE, PORT_NULL, Bytes, Code, Message, Str
from pymach.include.mig import REPLY_SIZE_ANY
from pymach.include.wire import WireError
from pymach.ipc import mach_port
from pymach.ipc.ipc_mqueue import mqueue_enqueue
from pymach.ipc.kmsg import KItem, KMsg
from pymach.ipc.mach_msg import msg_receive_trap
from pymach.ipc.port import Port
from pymach.kern.host import ExternalHandle, Kernel
from pymach.kern.sched_prim import NOT_YET, Parked, thread_cancel, thread_continue
from pymach.kern.task import Task
from pymach.kern.thread import Thread, running_thread, set_current_thread
from pymach.net.migration import MigrationServer, NewTask
from pymach.net.netmsgserver import (
    CHOKE_POLL_MS,
    HOST_DOWN_ID,
    HOST_UP_ID,
    PACKET_ID,
    NetMsgServer,
)
from pymach.net.packets import check_host
from pymach.net.transport import NetTransport, PacketSink

log = logging.getLogger("pymach.net")
PUMP_BATCH = 64  # messages the server takes before its transport's thread does its own work


class WirePortSink(PacketSink):
    """Transport events as kernel messages on a netmsgserver's wire port."""

    def __init__(self, kernel: Kernel, wire: Port, server: NetMsgServer) -> None:
        self.kernel = kernel
        self.wire = wire
        self.server = server  # counts the packet bytes it takes (bytes_in)
        self.posted = 0  # packet bytes ever queued on the wire port (kernel lock)

    def packet(self, source: str, data: bytes | memoryview) -> None:
        """Queue [Str source, Bytes data] as PACKET_ID."""
        self._post(PACKET_ID, [Str(source), Bytes(bytes(data))], len(data))

    def backlog(self) -> int:
        """Packet bytes queued on the wire port that the server has not taken yet (read
        without the lock: an estimate, enough for flow control)."""
        return max(0, self.posted - self.server.bytes_in)

    def host_up(self, host: str) -> None:
        """Queue [Str host] as HOST_UP_ID."""
        self._post(HOST_UP_ID, [Str(host)])

    def host_down(self, host: str) -> None:
        """Queue [Str host] as HOST_DOWN_ID."""
        self._post(HOST_DOWN_ID, [Str(host)])

    def _post(self, msg_id: int, items: list[KItem], size: int = 0) -> None:
        with self.kernel.sched.lock:
            if not self.wire.dead:
                mqueue_enqueue(self.wire, KMsg(self.wire, None, msg_id, items,
                                               sender="network"))
                self.posted += size


class ServerPump(PacketSink):
    """The netmsgserver served by its transport's own thread (see module docstring).

    That thread runs as `events`, a thread of the server's task, for everything the
    server does; the server's receive is made for `receiver`, another thread of the task
    with no Python thread of its own, which parks instead of blocking: a task's message
    to a proxy completes the receive on the sender's thread, and the message goes to the
    transport's thread (`deliver`, this class being that receive's Handoff,
    kern/sched_prim.py). A pump takes the messages queued now, at most PUMP_BATCH before
    the transport's own work has a turn, and parks again.

    The server acts as if one thread took its messages and events in turn (the order
    its flushes rely on, net/netmsgserver.py): a message the parked receive took
    (`taken`) is served before any event the transport's thread acts on after it, and
    while the thread acts on an event its receive is not parked (`_quiet`), so nothing
    is taken meanwhile: a proxy held for a flush keeps what it has not forwarded."""

    def __init__(self, kernel: Kernel, server: NetMsgServer, transport: NetTransport,
                 threads: tuple[Thread, Thread], ports: tuple[int, int]) -> None:
        self.kernel = kernel
        self.server = server
        self.transport = transport
        self.events, self.receiver = threads
        self.ports = ports  # (service, wire) for the server's `open`
        self.opened = False  # (transport thread) the server has its ports
        self.stopped = False  # (transport thread) the server's thread was terminated
        self.ticking = False  # a ticker thread runs (`_tick_while_choking`)
        self.taken: deque[Message | MachError] = deque()  # what the parked receive took
        # (appended by `deliver`, kernel lock held; served by the transport thread)

    # -- transport events -------------------------------------------------------------
    def packet(self, source: str, data: bytes | memoryview) -> None:
        """The server acts on the packet now."""
        self._event(self.server.packet_in, source, data)

    def host_up(self, host: str) -> None:
        """The server hears `host` is up now."""
        self._event(self.server.host_up, host)

    def host_down(self, host: str) -> None:
        """The server hears `host` is down now."""
        self._event(self.server.host_down, host)

    def begin(self) -> None:
        """(Transport thread) become the server's thread, open its ports, and pump."""
        if self.opened or self.stopped:
            return
        if running_thread() is not None:
            raise MachError("KERN_FAILURE", "a transport thread that is a Mach thread already")
        set_current_thread(self.events)
        self.kernel.sched.thread_begin(self.events)
        self.opened = True
        try:
            self.server.open(*self.ports)
        except ThreadTerminated:
            self.stopped = True
            return
        self._pump()

    def _event(self, handler: Callable[..., None], *args: Any) -> None:
        self.begin()
        if not self._quiet():
            return
        try:
            self.server.serve_event(handler, *args)
        except ThreadTerminated:  # the kernel is shutting down: the event is moot
            self.stopped = True
            return
        self._pump()

    def _quiet(self) -> bool:
        """Unpark the server's receive (nothing is taken for it until `_pump` parks it
        again) and serve what it took already; False if the server cannot go on."""
        with self.kernel.sched.lock:
            thread_cancel(self.receiver)
        return self._serve_taken()

    # -- the server's messages ------------------------------------------------------------
    def _pump(self) -> None:
        """Serve the messages queued for the server, then park its receive (and while a
        port of this host is full, have it looked at again soon: `_tick`)."""
        for _ in range(PUMP_BATCH):
            try:
                msg: Message | MachError | ThreadTerminated = msg_receive_trap(
                    self.receiver, PORT_NULL, MSG_OPTION_NONE, None, REPLY_SIZE_ANY, self)
            except Parked:
                self._tick_while_choking()
                return
            except (MachError, ThreadTerminated) as e:
                msg = e
            if not self._serve(msg):
                return
        self.transport.call_soon(self._resume)  # the transport's own work has a turn

    def _serve(self, outcome: Message | MachError | ThreadTerminated) -> bool:
        """Act on a receive's outcome; False once the server cannot go on."""
        if isinstance(outcome, ThreadTerminated):
            self.stopped = True
            return False
        if isinstance(outcome, MachError):  # (as `run` would: the server stops)
            log.error("netmsgserver %s: cannot receive: %s", self.server.host, outcome)
            self.stopped = True
            return False
        try:
            self.server.serve(outcome)
        except ThreadTerminated:
            self.stopped = True
            return False
        return True

    def _tick_while_choking(self) -> None:
        """While the server holds other hosts off a full port (`choking`), a ticker
        thread has the transport's thread look again every CHOKE_POLL_MS (as the
        server's own loop does with a receive timeout); one ticker at a time."""
        if self.server.choking and not self.ticking:
            self.ticking = True
            threading.Thread(target=self._ticker, daemon=True,
                             name=f"netmsgserver.choke.{self.server.host}").start()

    def _ticker(self) -> None:
        while not self.stopped and self.server.choking:  # (read racily: a hint)
            time.sleep(CHOKE_POLL_MS / 1000)
            if not self.transport.call_soon(self._event, self.server.check_choking):
                break
        self.ticking = False
        if self.server.choking and not self.stopped:  # set again after our last look
            self.transport.call_soon(self._tick_while_choking)

    def deliver(self, outcome: Any) -> None:
        """(Handoff; kernel lock held, any thread) the parked receive completed."""
        self.taken.append(outcome)
        self.transport.call_soon(self._resume)

    def wake(self) -> None:
        """(Handoff; kernel lock held, any thread) the receive needs its thread."""
        self.transport.call_soon(self._continued)

    def _resume(self) -> None:
        """Serve what was taken, then what is queued, and park again."""
        if not self.stopped and self._quiet():
            self._pump()

    def _serve_taken(self) -> bool:
        """Serve what the parked receive took; False if the server cannot go on."""
        while self.taken and not self.stopped:
            self._serve(self.taken.popleft())
        return not self.stopped

    def _continued(self) -> None:
        """The parked receive was handed back (its thread terminated or suspended): run
        the rest of it here, as its thread would on waking."""
        if self.stopped or not self._serve_taken():
            return
        try:
            outcome = thread_continue(self.receiver)
        except Parked:
            return
        except (MachError, ThreadTerminated) as e:
            outcome = e
        if outcome is not NOT_YET and self._serve(outcome):
            self._pump()


def start_netmsgserver(kernel: Kernel, transport: NetTransport) -> tuple[NetMsgServer, Port]:
    """Give the booted `kernel` its netmsgserver, reached through `transport`: the server
    task's service port becomes the bootstrap task's bootstrap port (so every task made
    afterwards finds the network's name service there), then the transport starts, its
    events queued on the wire port. Returns (the server, its wire port)."""
    server = NetMsgServer(transport)
    with kernel.sched.lock:
        task = kernel.task_create_locked(None, False, "netmsgserver")
        task.unthrottled = True  # deliveries keep each host's order (netmsgserver.py)
        service = mach_port.port_allocate(task.space, f"netmsgserver:{transport.host}")
        wire_name = mach_port.port_allocate(task.space, f"wire:{transport.host}")
        boot_task = next(t for t in kernel.tasks.values() if t.name == "bootstrap")
        boot_task.set_bootstrap(task.space.names[service].port)  # children inherit it
        wire = task.space.names[wire_name].port
        sink: PacketSink = WirePortSink(kernel, wire, server)
        if transport.own_thread and not kernel.sched.deterministic:
            threads = (_adoptable(kernel, task, "netmsgserver.1"),
                       _adoptable(kernel, task, "netmsgserver.receive"))
            sink = ServerPump(kernel, server, transport, threads, (service, wire_name))
        else:
            thread = kernel.thread_create_locked(task, Code(server.run, (service, wire_name)),
                                                 "netmsgserver.1", start=False)
            thread.daemon = True
            thread.start()
    transport.start(sink)
    if isinstance(sink, ServerPump):
        transport.call_soon(sink.begin)
    return server, wire


def start_migration_server(kernel: Kernel, server: NetMsgServer,
                           new_task: NewTask) -> MigrationServer:
    """Give the booted `kernel`, whose netmsgserver is `server`, a migration server
    (net/migration.py) that makes arriving tasks with `new_task`: a task of the kernel
    side, a child of the bootstrap task; `server` holds the only send right to its port
    (the port is never checked in)."""
    migration = MigrationServer(new_task)
    with kernel.sched.lock:
        boot = next(t for t in kernel.tasks.values() if t.name == "bootstrap")
        task = kernel.task_create_locked(boot, False, "migration")
        port = mach_port.port_allocate(task.space, f"migration:{kernel.name}")
        net_task = next(t for t in kernel.tasks.values() if t.name == "netmsgserver")
        server.migration = net_task.space.insert(task.space.names[port].port, send=True)
        thread = kernel.thread_create_locked(task, Code(migration.run, (port,)),
                                             "migration.1", start=False)
        thread.daemon = True
        thread.start()
    return migration


def _adoptable(kernel: Kernel, task: Task, name: str) -> Thread:
    """A thread of `task` with no Python thread of its own, for one to adopt (kernel
    lock held)."""
    thread = kernel.thread_create_locked(task, None, name, start=False)
    thread.daemon = True
    thread.state = "running"
    kernel.sched.thread_setrun(thread)
    return thread


class Host:
    """One booted kernel on a network, with its netmsgserver (see module docstring)."""

    def __init__(self, transport: NetTransport, config: dict[str, Any] | None = None) -> None:
        try:
            self.name = check_host(transport.host)
        except WireError as e:
            raise MachError("KERN_INVALID_ARGUMENT", e.detail) from None
        self.transport = transport
        self.kernel = Kernel(name=self.name, **(config or {}))
        self.kernel.boot_headless()
        try:
            self.server, self.wire = start_netmsgserver(self.kernel, transport)
        except BaseException:  # the transport could not start (an address in use)
            self.kernel.shutdown()
            raise

    def start(self, fn: Callable[..., Any], *args: Any, name: str = "",
              **kwargs: Any) -> ExternalHandle:
        """Run `fn` as a new task on this host; `.wait(timeout_ms)` for its result."""
        return self.kernel.start_task(fn, *args, name=name, **kwargs)

    def shutdown(self) -> None:
        """Leave the network (peers see the host go down), then stop the kernel."""
        self.transport.close()
        self.kernel.shutdown()
