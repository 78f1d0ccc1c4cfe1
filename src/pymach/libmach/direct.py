"""A native task's side of direct channels: sending and receiving without machd.

machd grants and tears down channels (machd/channels.py; packets and page:
include/direct.py). In a task process:

- **Sending.** A task whose threads have sent `OPEN_AFTER` messages a channel could
  carry (data items only, a reply port if any with its default disposition) to one port
  through machd asks for a channel to it (CHANNEL_OPEN); a refusal is remembered for a
  while (`RETRY_AFTER`, doubling). With a channel, such a message is one packet written
  by the thread itself, once the port has room (QUEUED + SENT - RECEIVED < BACKLOG on
  the page; else it waits for a wake-up, or fails SEND_TIMED_OUT after its timeout). Any
  other message to that port (a right, memory, code, a reply disposition of its own, a
  ninth reply port) is held by machd (CHANNEL_HOLD: copied in as a send would) and only
  its token goes on the channel, so it keeps its place among the task's messages. Each
  frame carries its sequence number, the channel's count of frames written + 1. A write
  that fails for any reason but a timeout (EPIPE: machd tore the channel down; ENOBUFS;
  a frame written in part) has machd tear the channel down if it has not (CHANNEL_CLOSE:
  what is on it goes into the port's queue first) and drops it; the message then goes
  through machd, after them, and gets the error Mach would give. A channel belongs to
  the task, and its threads share it, so the task's messages to the port stay in the
  order they were sent. A reply port new to the channel is bound first (CHANNEL_BIND; at
  most REPLIES_MAX).
- **Receiving.** A receive's result that is machd's marker (CHANNEL_MARKER from the
  kernel) is never returned: the runtime accepts the channel (CHANNEL_ACCEPT) and
  receives again. A receive on a port that has channels waits on them, on the port's
  doorbell (machd rings it when it queues a message for the port; the runtime then takes
  it with a receive trap of timeout 0) and on the thread's alert (rung when the thread
  is suspended or terminated: it then enters the kernel, BOUNDARY, where that takes
  effect) -- never parked in machd. Packets are decoded with the bounded typed wire
  (data items only); the sender's uid and the reply port are machd's word from the
  grant. A packet that does not decode has machd tear its channel down (what follows it
  goes into the queue, checked by machd); a channel that ends (EOF) is forgotten. A
  frame is taken whole or not at all (`take_frame`: peeked whole and checked, then read
  by its exact length; a read that comes back empty lost the race to machd's teardown,
  which took it: include/direct.py), so what this task took of a sender's frames is
  always a prefix, and machd requeues exactly the rest. A held message's token is
  claimed from machd (CHANNEL_CLAIM: the receive's checks and copyout; an error leaves
  it for the next receive, first). RCV_TIMEOUT is the wait's timeout; a message larger
  than `rcv_size` stays on its channel and raises RCV_TOO_LARGE.
- **Doorbells.** A port's doorbell descriptor belongs to a `Bell`, closed only once
  nothing refers to it (the port's state, or a thread that read the state before the
  runtime dropped or replaced it): a thread never polls or reads a descriptor number
  this process has since reused for something else. A bell replaced by a new one (machd
  made one when the port had channels again) is rung first, so threads waiting on it
  look again.

State: `Receivers` and `Senders` (one each per process) under their locks; a channel's
writes and counters under its endpoint's lock.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import mmap
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pymach.errors import MachError
from pymach.include import direct, traps, wire
from pymach.include.channel import close_fds
from pymach.include.doorbell import bell_clear, bell_ring
from pymach.include.message import MSG_SIZE_MAX, RCV_TIMEOUT, Int, Item, Message, message_size

log = logging.getLogger("pymach")

OPEN_AFTER = 2  # eligible sends through machd to one port before asking for a channel
RETRY_AFTER = 64  # eligible sends after a refusal before asking again (doubles)
_POLLIN = select.POLLIN | select.POLLHUP | select.POLLERR
_PEEK = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)
_NOWAIT = int(socket.MSG_DONTWAIT)
_SEND = int(socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
_WORD = (1 << 64) - 1  # a page word: written from this process's own count, never read
# back and changed (the peer maps the page too, and may write anything in its words)

Trap = Callable[..., Any]  # NativeThread.trap
TrapFds = Callable[..., tuple[Any, list[int]]]  # NativeThread.trap_fds


def is_marker(msg: Any) -> bool:
    """True for machd's channel marker (the kernel's message, never the user's)."""
    return isinstance(msg, Message) and msg.id == direct.CHANNEL_MARKER and \
        msg.sender_uid is None and len(msg.items) == 1 and isinstance(msg.items[0], Int)


def _map_page(fd: int) -> tuple[mmap.mmap, memoryview]:
    """Map a channel's page (the descriptor is closed)."""
    try:
        page = mmap.mmap(fd, direct.PAGE_SIZE)
    finally:
        os.close(fd)
    return page, memoryview(page).cast("Q")


@dataclass(eq=False)
class Endpoint:
    """One end of a channel in this process: its socket and page."""

    cid: int
    sock: socket.socket
    page: mmap.mmap
    view: memoryview
    fd: int  # the socket's descriptor (for poll)
    uid: int = -1  # (receiver) the sender's uid, machd's word
    pending: int = 0  # (receiver) a held message's token whose claim failed: next
    lock: threading.RLock = field(default_factory=threading.RLock)  # the sender's writes
    # and counts; the receiver's peek and take; closing (re-entrant: a failed write
    # closes the endpoint under it)
    closed: bool = False  # (lock) closed: its socket and page are gone
    bound: dict[int, int] = field(default_factory=dict)  # (sender) reply name -> index
    replies: list[int] = field(default_factory=list)  # (receiver) reply names, by index
    count: int = 0  # messages sent (sender) or taken (receiver): this side's page word
    buf: bytearray = field(default_factory=bytearray)  # (receiver) a frame, peeked

    def counted(self, word: int, delta: int) -> None:
        """Change this side's count by `delta` and publish it in its page word."""
        self.count += delta
        self.view[word] = self.count & _WORD

    def shut(self) -> None:
        """Shut the socket down both ways without the lock: a thread waiting for room
        under the lock wakes (its write fails: the channel is gone), so that `close`
        can take the lock (detach: a review's finding, it waited for ever)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Close the socket and unmap the page, once; under the lock, so that another
        thread's write or take in progress ends first (a frame taken is counted, never
        lost), and later ones see `closed` (a review's finding: a thread used the
        released page and the message was lost)."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            with contextlib.suppress(OSError):
                self.sock.close()
            with contextlib.suppress(Exception):
                self.view.release()
                self.page.close()


def _open_endpoint(cid: int, fds: list[int], uid: int = -1) -> Endpoint:
    """An endpoint of the socket and page machd sent (they and any other fd in `fds`
    are not inherited by programs this process runs; all are closed on failure)."""
    try:
        for fd in fds:
            os.set_inheritable(fd, False)
        page, view = _map_page(fds[1])
    except OSError:
        close_fds(fds)
        raise
    return Endpoint(cid, socket.socket(fileno=fds[0]), page, view, fds[0], uid)


# -- the sender's side -------------------------------------------------------------------------
class Senders:
    """This task's channels to other tasks' ports (see module docstring): shared by its
    threads, under `lock` (a channel's own writes under its endpoint's lock)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.channels: dict[int, Endpoint] = {}  # port name -> channel
        self.counts: dict[int, int] = {}  # port name -> eligible sends through machd
        self.refused: dict[int, int] = {}  # port name -> sends to wait before asking

    def note_sent(self, msg: Message, trap_fds: TrapFds) -> None:
        """An eligible message went to its port through machd: ask for a channel once
        OPEN_AFTER such sends were made (or the refusal's wait is over)."""
        name = msg.remote_port
        if name in self.channels or not direct.channel_eligible(msg):
            return
        with self.lock:
            n = self.counts.get(name, 0) + 1
            self.counts[name] = n
            if n < self.refused.get(name, OPEN_AFTER) or name in self.channels:
                return
            try:
                value, fds = trap_fds(traps.CHANNEL_OPEN, name, msg.local_port)
            except (MachError, OSError):
                self._refused(name)
                return
            try:
                ch = self.channels[name] = _open_endpoint(int(value[0]), fds)
            except OSError:  # machd granted it: it must tear it down
                with contextlib.suppress(MachError, OSError):
                    trap_fds(traps.CHANNEL_CLOSE, name, int(value[0]))
                self._refused(name)
                return
            if msg.local_port:
                ch.bound[msg.local_port] = 0

    def _refused(self, name: int) -> None:
        """No channel to port `name` now: ask again after twice as many sends (lock)."""
        wait = self.refused.get(name, RETRY_AFTER // 2) * 2
        self.counts[name], self.refused[name] = 0, wait

    def send(self, msg: Message, timeout: float | None, alert: int,
             alerted: Callable[[], None], trap: Trap, portable: Callable[[Message], Any]
             ) -> bool:
        """Send `msg` on its port's channel if it has one: True if sent (as a packet, or
        held by machd: module docstring). False: send it through machd (there is no
        channel, or it broke: it is forgotten)."""
        name = msg.remote_port
        ch = self.channels.get(name)
        if ch is None:
            return False
        if self._send_now(ch, msg, alerted, trap):
            return True
        if ch.closed:  # (its write failed: the message goes through machd, after what
            return False  # was on the channel)
        index = self._reply_index(ch, msg, trap) if direct.channel_eligible(msg) else None
        deadline = None if timeout is None else time.monotonic() + timeout / 1000
        alerted()
        while True:
            if not _wait_room(ch, timeout, alert, alerted):
                self._broken(name, ch, trap)
                return False
            with ch.lock:  # (room again under the lock: another thread may have taken it)
                if ch.closed:  # another thread's failed write tore it down: what was on
                    return False  # it is in the port's queue, so this one goes to machd
                if not _has_room(ch.view):
                    continue
                wait = _Wait(deadline, alert, alerted, trap)
                if index is not None:
                    frame = direct.encode_packet(msg, index, ch.count + 1)
                    return self._write(name, ch, frame, wait)
                return self._hold(name, ch, portable(msg), trap, wait)

    def _send_now(self, ch: Endpoint, msg: Message, alerted: Callable[[], None],
                  trap: Trap) -> bool:
        """The fast path of `send` (as Mach 3.0's mach_msg has one): an eligible message
        whose reply port (if any) is bound already, while the port has room and the
        socket takes the frame at once, is written here with none of the general path's
        steps for waiting, binding or holding. False: nothing was sent (the general path
        then waits, binds or holds; a write that failed for another reason than a full
        socket, or wrote part of the frame, tore the channel down here, as `_write`
        does)."""
        if msg.local_disposition is not None:
            return False
        index = ch.bound.get(msg.local_port, -1) + 1 if msg.local_port else 0
        if (msg.local_port and not index) or not direct.channel_eligible(msg):
            return False
        alerted()
        with ch.lock:
            if ch.closed or not _has_room(ch.view):
                return False
            frame = direct.encode_packet(msg, index, ch.count + 1)
            try:
                sent = ch.sock.send(frame, _SEND)
            except BlockingIOError:
                return False
            except OSError:  # (as `_write`: the channel is torn down)
                sent = -1
            if sent != len(frame):
                self._broken(msg.remote_port, ch, trap)
                return False
            ch.counted(direct.SENT, 1)
        return True

    def _hold(self, name: int, ch: Endpoint, msg: Any, trap: Trap, wait: _Wait) -> bool:
        """Have machd hold a message the channel cannot carry and write its token
        (ch.lock held); False if the channel is gone (send through machd)."""
        try:
            token = int(trap(traps.CHANNEL_HOLD, name, ch.cid, msg))
        except MachError as e:
            if e.code != "KERN_INVALID_ARGUMENT":
                raise
            self._forget(name, ch)
            return False
        wait.deadline = None  # (held now: its token must go, or it waits for a teardown)
        self._write(name, ch, direct.encode_held(token, ch.count + 1), wait)  # (if the
        return True  # channel was torn down, machd queued what it held in its place: sent)

    def _write(self, name: int, ch: Endpoint, frame: bytes | bytearray,
               wait: _Wait) -> bool:
        """Write one frame (ch.lock held), waiting for the socket's room as `wait` says
        (SEND_TIMED_OUT, nothing sent, past its deadline; an alert enters the kernel);
        False if the channel broke (machd tore it down: it is forgotten)."""
        try:
            _send_packet(ch.sock, frame, wait)
        except MachError:  # SEND_TIMED_OUT (a TimeoutError, so an OSError): nothing sent,
            raise  # and the channel stays: its frames keep their place before the next
        except OSError:
            self._broken(name, ch, wait.trap)
            return False
        ch.counted(direct.SENT, 1)
        return True

    def give_up(self, name: int, trap: Trap) -> None:
        """Stop using the channel to port `name` (if there is one): machd tears it down,
        so what is on it goes into the port's queue before what is sent next."""
        ch = self.channels.get(name)
        if ch is not None:
            self._broken(name, ch, trap)

    def _broken(self, name: int, ch: Endpoint, trap: Trap) -> None:
        """A write (or a wait for room) failed: have machd tear the channel down if it
        has not (what is on it goes into the port's queue, before the message the
        caller then sends through machd), and forget it."""
        with contextlib.suppress(MachError, OSError):
            trap(traps.CHANNEL_CLOSE, name, ch.cid)
        self._forget(name, ch)

    def _reply_index(self, ch: Endpoint, msg: Message, trap: Trap) -> int | None:
        """The packet's reply index for `msg` (binding its reply port if need be), or
        None if the channel cannot name it."""
        reply = msg.local_port
        if not reply:
            return 0
        index = ch.bound.get(reply)
        if index is None:
            try:
                index = int(trap(traps.CHANNEL_BIND, msg.remote_port, ch.cid, reply))
            except MachError:
                return None
            ch.bound[reply] = index
        return index + 1

    def _forget(self, name: int, ch: Endpoint) -> None:
        with self.lock:
            if self.channels.get(name) is ch:
                del self.channels[name]
            self.counts[name] = 0
        ch.close()

    def close_all(self) -> None:
        """The task is gone (detach): close its channels (machd tears them down)."""
        with self.lock:
            channels, self.channels = self.channels, {}
        for ch in channels.values():
            ch.shut()
            ch.close()


@dataclass
class _Wait:
    """How a sender waits for a full socket: until `deadline` (monotonic seconds; None:
    no limit), entering the kernel (`alerted`) when its thread's `alert` is rung."""

    deadline: float | None
    alert: int
    alerted: Callable[[], None]
    trap: Trap  # (to close a channel whose write failed)


def _send_packet(sock: socket.socket, frame: bytes | bytearray, wait: _Wait) -> None:
    """Send one frame without blocking in the kernel: while the socket is full, wait
    for room, the alert or the deadline (SEND_TIMED_OUT: nothing was sent). A frame
    written in part (the kernel queues a frame of at most FRAME_MAX whole: never, from
    this runtime) is an OSError: the channel is broken."""
    poller = None  # (made once the socket is full: most sends never wait)
    while True:
        try:
            if sock.send(frame, _SEND) != len(frame):
                raise OSError(errno.EIO, "a channel frame written in part")
            return
        except BlockingIOError:
            pass
        if poller is None:
            poller = select.poll()
            poller.register(sock, select.POLLOUT)
            poller.register(wait.alert, select.POLLIN)
        left = None if wait.deadline is None else wait.deadline - time.monotonic()
        if left is not None and left <= 0:
            raise MachError("SEND_TIMED_OUT", "the channel stayed full")
        poller.poll(None if left is None else max(1, math.ceil(left * 1000)))
        wait.alerted()


def _has_room(view: memoryview) -> bool:
    """True if the port may take another message (include/direct.py: the page)."""
    return bool(view[direct.QUEUED] + view[direct.SENT] - view[direct.RECEIVED] <
                view[direct.BACKLOG])


def _wait_room(ch: Endpoint, timeout: float | None, alert: int,
               alerted: Callable[[], None]) -> bool:
    """Wait until the port has room (SEND_TIMED_OUT past `timeout` ms), entering the
    kernel when alerted; False if the channel ended meanwhile (or another thread closed
    the endpoint: its page is released)."""
    try:
        return _wait_room_on(ch, ch.view, timeout, alert, alerted)
    except ValueError:  # (a released memoryview)
        return False


def _wait_room_on(ch: Endpoint, view: memoryview, timeout: float | None, alert: int,
                  alerted: Callable[[], None]) -> bool:
    """_wait_room on the endpoint's page `view` (ValueError once it is released)."""
    if _has_room(view):
        return True
    deadline = None if timeout is None else time.monotonic() + timeout / 1000
    poller = select.poll()
    poller.register(ch.sock, _POLLIN)
    poller.register(alert, select.POLLIN)
    try:
        while True:
            view[direct.WAITING] = 1
            if _has_room(view):
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise MachError("SEND_TIMED_OUT", f"port stayed full "
                                f"({view[direct.BACKLOG]} messages)")
            poller.poll(None if left is None else max(1, int(left * 1000)))
            alerted()
            if not _drain_wakes(ch.sock):
                return False
    finally:
        with contextlib.suppress(ValueError):
            view[direct.WAITING] = 0


def _drain_wakes(sock: socket.socket) -> bool:
    """Read the wake-ups waiting on a sender's end; False if the channel ended."""
    while True:
        try:
            data = sock.recv(16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            return False


# -- the receiver's side -----------------------------------------------------------------------
def take_frame(sock: socket.socket, buf: bytearray,
               rcv_size: int) -> tuple[int, int, list[Item]] | None:
    """Take the next frame off a channel whole (the caller holds its endpoint's lock;
    `buf`, the endpoint's, is sized on first use): (message id, reply index, items; the
    index HELD: a held message's token as id). None: the channel ended, or machd's
    teardown read took the frame between our peek and our read (include/direct.py).
    BlockingIOError if no frame waits; WireError for garbage, left on the channel;
    RCV_TOO_LARGE, the frame left on the channel, if its message exceeds `rcv_size`."""
    if not buf:
        buf.extend(bytes(direct.FRAME_MAX))
    n = sock.recv_into(buf, direct.FRAME_MAX, _PEEK)
    if n == 0:
        return None
    with memoryview(buf) as view:
        length, msg_id, index, items = direct.parse_frame(view, n)
    if rcv_size < MSG_SIZE_MAX and message_size(items) > rcv_size:
        raise MachError("RCV_TOO_LARGE", f"message of {message_size(items)} bytes exceeds "
                        f"rcv_size {rcv_size}; it stays queued")
    taken = sock.recv_into(buf, length, _NOWAIT)
    if taken == 0:
        return None  # (machd's read took it)
    if taken != length:
        raise wire.WireError(f"a frame read in part ({taken} of {length} bytes)")
    return msg_id, index, items


def _has_data(ep: Endpoint) -> bool:
    """True if a packet waits on the endpoint."""
    try:
        return bool(ep.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:
        return False


class Bell:
    """machd's doorbell for one of our ports (include/doorbell.py), closed once nothing
    refers to it (module docstring: a thread that still holds it never meets a reused
    number)."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def ring(self) -> None:
        """Wake whoever waits on it."""
        bell_ring(self.fd)

    def __del__(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


@dataclass(eq=False)
class PortReceiver:
    """A port of this task that has channels (Receivers.lock)."""

    bell: Bell
    channels: list[Endpoint] = field(default_factory=list)
    maybe_queued: bool = True  # machd may hold messages for it (the bell rang)
    generation: int = 0  # changes whenever `channels` does
    turn: int = 0  # round-robin start among channels


class Receivers:
    """This process's ports with channels (see module docstring)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ports: dict[int, PortReceiver] = {}

    def has(self, name: int) -> bool:
        """True if port `name` has channels here (read without the lock: a hint)."""
        return name in self.ports

    def accept(self, name: int, marker: Message, trap_fds: TrapFds) -> None:
        """Take the channel a marker announces (a channel gone meanwhile is ignored)."""
        item = marker.items[0]
        assert isinstance(item, Int)
        cid = item.value
        try:
            value, fds = trap_fds(traps.CHANNEL_ACCEPT, name, cid)
        except (MachError, OSError):
            return  # (gone meanwhile: its messages are in the port's queue)
        try:
            ep = _open_endpoint(int(cid), fds, int(value[0]))
        except OSError:  # accepted, but not usable here: machd puts what is on it back
            with contextlib.suppress(MachError, OSError):
                trap_fds(traps.CHANNEL_CLOSE, name, cid)
            return
        self.sweep()
        with self.lock:
            pr = self.ports.get(name)
            if pr is None:
                pr = self.ports[name] = PortReceiver(Bell(fds[2]))
            else:  # machd's bell for the port may be a new one: who waits on the old one
                pr.bell.ring()  # looks again (it is closed once nobody holds it)
                pr.bell = Bell(fds[2])
            pr.channels.append(ep)
            pr.generation += 1
            pr.maybe_queued = True

    def sweep(self) -> None:
        """Forget the channels machd tore down that nobody read since (a port whose
        receive right went away, say): shut both ways and empty."""
        with self.lock:
            ends = [(name, ep) for name, pr in self.ports.items() for ep in pr.channels]
        poller = select.poll()
        by_fd = {}
        for name, ep in ends:
            with contextlib.suppress(ValueError, OSError):
                poller.register(ep.sock, select.POLLHUP)
                by_fd[ep.sock.fileno()] = (name, ep)
        for fd, events in poller.poll(0):
            if events & select.POLLHUP and fd in by_fd and not _has_data(by_fd[fd][1]):
                self.drop(*by_fd[fd])

    def drop(self, name: int, ep: Endpoint) -> None:
        """Forget one channel; a port left with none forgets its bell."""
        with self.lock:
            pr = self.ports.get(name)
            if pr is not None and ep in pr.channels:
                pr.channels.remove(ep)
                pr.generation += 1
                if not pr.channels:
                    del self.ports[name]  # (its bell closes once nobody holds it)
        ep.close()

    def close_all(self) -> None:
        """The task is gone (detach): forget every channel."""
        with self.lock:
            ports, self.ports = self.ports, {}
        for pr in ports.values():
            for ep in pr.channels:
                ep.shut()
                ep.close()


POLL_SETS = 8  # poll objects a thread keeps, one per port it received on last


@dataclass(eq=False)
class PollSet:
    """A thread's poll object for one port's channels, its bell and the thread's alert,
    as they were at the port's `generation` (owned by that thread: Python's poll objects
    cannot be polled by two threads at once)."""

    receiver: PortReceiver
    generation: int
    bell: Bell  # (held: its number is not reused while it is registered)
    alert: int
    poller: select.poll
    channels: dict[int, Endpoint]  # descriptor -> the channel registered under it


class LocalReceive:
    """One receive on a port with channels, by one thread (see module docstring)."""

    def __init__(self, receivers: Receivers, name: int, timeout: float | None,
                 rcv_size: int, alert: int, trap: Trap, trap_fds: TrapFds,
                 pollers: dict[int, PollSet]) -> None:
        self.receivers, self.name, self.rcv_size = receivers, name, rcv_size
        self.alert, self.trap, self.trap_fds = alert, trap, trap_fds
        self.pollers = pollers  # the receiving thread's own (poll objects are not shared)
        self.deadline = None if timeout is None else time.monotonic() + timeout / 1000

    def run(self, boundary: Callable[[], None]) -> Message | None:
        """The message, or None once the port has no channels here (the caller then
        receives through machd with `remaining()`); RCV_TIMED_OUT, or a trap's error.
        An alert (a suspension or termination) takes effect first (`boundary`)."""
        while True:
            pr = self.receivers.ports.get(self.name)
            if pr is None:
                self.pollers.pop(self.name, None)  # (its bell is let go)
                return None
            if pr.maybe_queued:
                msg = self._from_machd(pr)
                if msg is not None:
                    return msg
                continue  # (a marker taken, or nothing there: look again)
            generation = pr.generation
            pending = any(ep.pending for ep in pr.channels)
            ps = self._poll_set(pr)
            events = ps.poller.poll(self._wait_ms(pending))
            ep = ps.channels.get(events[0][0]) if len(events) == 1 and not pending else None
            if ep is not None:  # (the common case: one channel has a frame, or ended)
                msg = self._take(ep)
                if msg is not None:
                    return msg
                continue
            ready = self._ready(pr, ps, events, pending)
            if self.alert in ready:
                boundary()
                continue
            msg = self._from_channels(pr, ready)
            if msg is not None:
                return msg
            left = self.remaining()
            if ready or pr.generation != generation or left is None or left > 0:
                continue  # (a channel ended, or the bell rang: look again)
            raise MachError("RCV_TIMED_OUT", f"no message on port {self.name}")

    def remaining(self) -> float | None:
        """The receive's timeout left, in ms (None: none)."""
        if self.deadline is None:
            return None
        return max(0.0, (self.deadline - time.monotonic()) * 1000)

    def _from_machd(self, pr: PortReceiver) -> Message | None:
        """A message machd holds for the port (a receive trap of timeout 0), None if it
        holds none (a marker is accepted here, and None returned)."""
        bell = pr.bell  # (held: see Bell)
        bell_clear(bell.fd)
        try:
            msg: Message = self.trap(traps.MSG_RECEIVE, self.name, RCV_TIMEOUT, 0,
                                     self.rcv_size)
        except MachError as e:
            if e.code != "RCV_TIMED_OUT":
                raise
            pr.maybe_queued = False
            return None
        if is_marker(msg):
            self.receivers.accept(self.name, msg, self.trap_fds)
            return None
        return msg

    def _from_channels(self, pr: PortReceiver, ready: set[int]) -> Message | None:
        """A message from one of the port's channels that `ready` names, round-robin;
        None if none has one."""
        channels = list(pr.channels)
        n = len(channels)
        for i in range(n):
            ep = channels[(pr.turn + i) % n]
            if ep.fd in ready:
                msg = self._take(ep)
                if msg is not None:
                    pr.turn = (pr.turn + i + 1) % n
                    return msg
        return None

    def _take(self, ep: Endpoint) -> Message | None:
        """The next message on one channel (None if it has none; a channel that ended
        or sent garbage is dropped): a held message's claim that failed comes first."""
        with ep.lock:
            if ep.closed:  # another thread dropped it (a stale list of channels)
                return None
            if ep.pending:
                return self._claim(ep, ep.pending)
            try:
                got = take_frame(ep.sock, ep.buf, self.rcv_size)
            except BlockingIOError:
                return None
            except wire.WireError as e:
                self._garbage(ep, e)
                got = None
            except OSError:
                got = None
            if got is not None:
                msg_id, index, items = got
                if index == direct.HELD:
                    return self._claim(ep, msg_id)  # (counted once claimed)
                self._taken(ep)
                return self._message(ep, msg_id, index, items)
        self.receivers.drop(self.name, ep)
        return None

    def _message(self, ep: Endpoint, msg_id: int, index: int,
                 items: list[Item]) -> Message | None:
        """The message a data frame taken off the channel carries, as received (its
        reply port named in our space); None for a reply index not bound (machd then
        tears the channel down)."""
        try:
            reply = self._reply_name(ep, index)
        except wire.WireError as e:
            self._garbage(ep, e)
            return None
        return Message(reply, self.name, msg_id, items, sender_uid=ep.uid)

    def _garbage(self, ep: Endpoint, e: wire.WireError) -> None:
        """A bad frame: machd tears the channel down (it skips the garbage, and queues
        what follows it)."""
        log.warning("pymach: a bad frame on channel %d (port %d): %s; channel dropped",
                    ep.cid, self.name, e.detail)
        with contextlib.suppress(MachError):
            self.trap(traps.CHANNEL_CLOSE, self.name, ep.cid)

    @staticmethod
    def _taken(ep: Endpoint) -> None:
        """Count a message taken (the page's RECEIVED), and wake a sender that waits
        for room."""
        ep.counted(direct.RECEIVED, 1)
        if ep.view[direct.WAITING]:
            with contextlib.suppress(OSError):
                ep.sock.send(direct.WAKE, _SEND)

    def _claim(self, ep: Endpoint, token: int) -> Message | None:
        """The held message `token` (ep.lock held); a receive error keeps it for the next
        receive; None if machd no longer holds it (the channel was torn down: it is in
        the port's queue)."""
        ep.pending = token  # (first: a thread ended in the trap leaves it to be claimed)
        try:
            msg: Message = self.trap(traps.CHANNEL_CLAIM, self.name, ep.cid, token,
                                     self.rcv_size)
        except MachError as e:
            if e.code != "KERN_INVALID_ARGUMENT":
                raise
            ep.pending = 0
            return None
        ep.pending = 0
        self._taken(ep)
        return msg

    def _reply_name(self, ep: Endpoint, index: int) -> int:
        """Our name for the channel's reply port `index` (1-based; 0: none), asked of
        machd when it is new to us; WireError if it is not bound."""
        if not index:
            return 0
        if index > len(ep.replies):
            try:
                names = self.trap(traps.CHANNEL_REPLIES, self.name, ep.cid)
            except MachError:
                names = []
            if isinstance(names, list) and all(type(n) is int for n in names):
                ep.replies = names
        if index > len(ep.replies):
            raise wire.WireError(f"reply port {index} is not bound to the channel")
        return ep.replies[index - 1]

    def _wait_ms(self, pending: bool) -> int | None:
        """How long a poll may wait: until the receive's timeout (None: no limit), not
        at all once it passed or with a held message to claim."""
        if pending:
            return 0
        return None if self.deadline is None else math.ceil(self.remaining() or 0)

    @staticmethod
    def _ready(pr: PortReceiver, ps: PollSet, events: list[tuple[int, int]],
               pending: bool) -> set[int]:
        """The descriptors a poll found ready among the port's channels, its bell and
        the thread's alert (with channels that have a held message to claim: ready at
        once); the bell marks the port as maybe having messages in machd."""
        ready = {ep.fd for ep in pr.channels if ep.pending} if pending else set()
        ready |= {fd for fd, _ in events}
        if ps.bell.fd in ready:  # (its number is no channel's: it is held open meanwhile)
            pr.maybe_queued = True
        return ready

    def _poll_set(self, pr: PortReceiver) -> PollSet:
        """This thread's poll object for the port as it is now: the one kept from its
        last receive there if the port's channels, bell and the thread's alert are the
        same (`generation`: read before the channels, so a set that raced a change is
        made again next time; a descriptor closed meanwhile polls as ready, and the
        receive looks again), else a new one, kept (at most POLL_SETS a thread)."""
        ps = self.pollers.get(self.name)
        if ps is not None and ps.receiver is pr and ps.generation == pr.generation and \
                ps.bell is pr.bell and ps.alert == self.alert:
            return ps
        generation, bell = pr.generation, pr.bell  # (held while registered: see Bell)
        poller = select.poll()
        channels = {ep.fd: ep for ep in list(pr.channels)}  # (a copy: drop may run)
        for fd in channels:
            poller.register(fd, _POLLIN)
        poller.register(bell.fd, select.POLLIN)
        poller.register(self.alert, select.POLLIN)
        for name, kept in list(self.pollers.items()):  # (ports whose channels went:
            if self.receivers.ports.get(name) is not kept.receiver:  # their bells go)
                del self.pollers[name]
        if len(self.pollers) >= POLL_SETS:
            self.pollers.clear()
        ps = self.pollers[self.name] = PollSet(pr, generation, bell, self.alert, poller,
                                               channels)
        return ps
