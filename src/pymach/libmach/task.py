"""Inside a native task's process: attaching to machd, traps, mappings, threads.

`attach()` makes the calling process a task of the running machd and the calling
Python thread its first Mach thread; from then on the whole pymach API works in this
process as in the embedded kernel (the traps go over the thread's connection, in the
typed wire of include/wire.py and include/traps.py). The process:

- checks that the daemon at the socket runs as the expected user (SO_PEERCRED) before
  it sends anything;
- reserves its address-space window (PROT_NONE) and makes its userfaultfd, which it
  hands to machd and closes: machd alone holds it and serves every page fault of the
  process, so if machd dies no fault can wait forever;
- applies the address-space changes each trap reply carries, before returning from
  the trap, in the order machd issued them (threads of the task wait for batches
  other threads took first): it maps memory objects' memfds at their regions (read-only
  descriptors where the region may never be written), unmaps, and changes protections,
  then tells machd (MAPPED), which arms the new ranges. A reply carries at most
  traps.MAP_FDS_MAX descriptors: more changes come in the replies to the MAPPED traps,
  one batch after another, all before the trap returns. Only the process can change
  its own mappings (../shared/DESIGN.md);
- keeps a control connection, on which machd asks it to start threads (thread_create)
  or to die (task_terminate, a memory error); if machd itself dies, that connection
  closes and the process exits with a message instead of hanging.

A callable sent to a thread of this task (thread_create, spawn) is unpickled here only
if machd says it came from this process's own user; nothing received changes sys.path.

`NativeProcess` state is changed under its `lock`; each `NativeThread` and its
connection belong to one Python thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import os
import select
import sys
import threading
import time
import uuid
from typing import Any

import cloudpickle

from pymach.errors import MachError, ThreadTerminated
from pymach.include import traps, wire
from pymach.include.channel import Channel, Disconnected, Frame, close_fds, default_socket_path
from pymach.include.doorbell import bell_clear
from pymach.include.message import (
    RCV_TIMEOUT,
    SEND_TIMEOUT,
    Bytes,
    Code,
    Message,
    validate_message,
)
from pymach.include.vm_param import VM_PROT_READ, VM_PROT_WRITE
from pymach.ipc.mach_msg import check_options, check_rcv_size
from pymach.kern.thread import running_thread, set_current_thread
from pymach.libmach.direct import LocalReceive, PollSet, Receivers, Senders, is_marker
from pymach.libmach.ranges import Ranges
from pymach.mach import ENTRY_BLOB, _migrated_main
from pymach.pmap.native_map import WINDOW_BASE, WINDOW_SIZE
from pymach.pmap.uffd import Uffd

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
PROT_NONE, PROT_READ, PROT_WRITE = 0, 1, 2
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x01, 0x02, 0x10, 0x20
MAP_NORESERVE, MAP_FIXED_NOREPLACE = 0x4000, 0x100000
MAP_FAILED = ctypes.c_void_p(-1).value
EXIT_MACHD_DIED, EXIT_KILLED = 3, 70
VERDICT_WAIT_S = 5.0  # how long a thread whose connection closed waits for machd's DIE


def _mmap(addr: int, length: int, prot: int, flags: int, fd: int = -1, offset: int = 0) -> int:
    got = _libc.mmap(addr, length, prot, flags, fd, offset)
    if got in (None, MAP_FAILED):
        e = ctypes.get_errno()
        raise MachError("KERN_NO_SPACE", f"mmap at {addr:#x}: {os.strerror(e)}")
    return int(got)


class NativeProcess:
    """This process as a native task (see module docstring)."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.lock = threading.Lock()
        self.applied = threading.Condition(self.lock)  # notified when a batch is applied
        # or a thread ends
        self.batches_applied = 0  # (lock) machd numbers its instruction batches 1, 2, ...
        self.threads_running = 0  # (lock) threads made by thread_create, still running
        self.ranges = Ranges()  # (lock) what is mapped now, with its protection
        self.task_serial = 0
        self.task_name = ""
        self.page_size = 4096
        self.detaching = False
        self.control: Channel | None = None
        self.control_closed = threading.Event()  # set when the control connection ends
        self.task_port = 0  # this task's name for its own task port
        self.local_code: dict[str, Code] = {}  # thread_create on our own task: shared
        self.receivers = Receivers()  # our ports that have direct channels (direct.py)
        self.senders = Senders()  # our direct channels to other tasks' ports
        _mmap(WINDOW_BASE, WINDOW_SIZE, PROT_NONE,
              MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE)

    def connect(self) -> Channel:
        """A new connection to machd, refused unless the daemon runs as the expected
        user (SO_PEERCRED): ours, root, or $PYMACH_MACHD_UID."""
        try:
            chan = Channel.connect(self.socket_path, timeout=10)
        except OSError as e:
            raise MachError("KERN_FAILURE", f"no machd at {self.socket_path} "
                            f"({e.strerror or e}): start one with `pymach machd`") from None
        check_daemon(chan, self.socket_path)
        return chan

    def hello(self, chan: Channel, op: int, values: list[Any], fds: list[int]) -> list[Any]:
        """Send a connection's hello; returns machd's welcome (WELCOME_FIELDS)."""
        chan.send(op, values, fds)
        value = _reply(self, chan, chan.recv())
        if not isinstance(value, list) or len(value) != len(traps.WELCOME_FIELDS):
            raise MachError("MIG_TYPE_ERROR", "machd sent a malformed welcome")
        return value

    # -- address-space changes --------------------------------------------------------
    def apply(self, chan: Channel, batch: int, maps: list[Any],
              fds: list[int]) -> Frame | None:
        """Apply the batch of machd's instructions in a trap reply (see module
        docstring), in machd's batch order, and have machd arm what was mapped: the
        reply to that MAPPED trap (it may carry the next batch: machd sends at most
        MAP_FDS_MAX descriptors a reply), or None."""
        follow: Frame | None = None
        try:
            if batch:
                with self.applied:
                    self.applied.wait_for(lambda: self.batches_applied == batch - 1)
                    mapped = self._apply_batch(maps, fds)
                if mapped:  # machd arms the new ranges before anyone may touch them
                    chan.send(traps.MAPPED, [batch])
                    follow = chan.recv()
                with self.applied:
                    self.batches_applied = batch
                    self.applied.notify_all()
        finally:
            close_fds(fds)
        return follow

    def wait_applied(self, upto: int) -> None:
        """Return once every batch up to `upto` is applied (another thread may be
        applying one)."""
        if self.batches_applied < upto:  # (the count only grows: no lock needed)
            with self.applied:
                self.applied.wait_for(lambda: self.batches_applied >= upto)

    def _apply_batch(self, maps: list[Any], fds: list[int]) -> bool:
        """Apply one batch (lock held); True if it mapped anything."""
        mapped = False
        for ins in maps:
            if not (isinstance(ins, list) and ins and ins[0] in traps.MAP_LAYOUT
                    and len(ins) == traps.MAP_LAYOUT[ins[0]]
                    and all(isinstance(v, int) for v in ins)):
                raise MachError("MIG_TYPE_ERROR", f"machd sent a bad map instruction {ins!r}")
            mapped |= self._apply_one(ins, fds)
        return mapped

    def _apply_one(self, ins: list[int], fds: list[int]) -> bool:
        kind, start, length = ins[0], ins[1], ins[2]
        if kind == traps.MAP_FD:
            fd_index, offset, prot, shared = ins[3:]
            if shared:
                _mmap(start, length, PROT_READ | PROT_WRITE,
                      MAP_SHARED | MAP_FIXED | MAP_NORESERVE, fds[fd_index], offset)
            else:  # a region that may never be written: a read-only descriptor
                _mmap(start, length, PROT_READ, MAP_PRIVATE | MAP_FIXED | MAP_NORESERVE,
                      fds[fd_index], offset)
            # (NORESERVE: a hugetlb memfd's pages are machd's to provide, not reserved)
            self.ranges.remove(start, start + length)
            if shared and prot & VM_PROT_READ:  # mapped read-write just now: no mprotect
                self.ranges.set(start, start + length, prot)  # (a GiB's costs ~50 us)
            else:
                self._protect(start, length, prot, bool(shared))
            return True
        if kind == traps.MAP_UNMAP:
            _mmap(start, length, PROT_NONE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED)
            self.ranges.remove(start, start + length)
        else:
            self._protect(start, length, ins[3], None)
        return False

    def _protect(self, start: int, length: int, prot: int, shared: bool | None) -> None:
        """Record a range's protection; without read access nothing may touch it (write
        access is enforced by machd, which write-protects pages through the uffd).
        `shared` None: the range keeps the kind of mapping it has."""
        if not prot & VM_PROT_READ:
            _libc.mprotect(ctypes.c_void_p(start), ctypes.c_size_t(length), PROT_NONE)
        elif shared is not False and self.ranges.protections(start, start + length) != [prot]:
            _libc.mprotect(ctypes.c_void_p(start), ctypes.c_size_t(length),
                           PROT_READ | PROT_WRITE)  # fails (harmlessly) on read-only maps
        self.ranges.set(start, start + length, prot)

    def check_access(self, address: int, size: int, access: int) -> None:
        """Refuse, as the embedded kernel does, an access memory() is about to make:
        KERN_INVALID_ADDRESS if part of the range is unmapped, KERN_PROTECTION_FAILURE
        if its protection lacks `access` (a VM_PROT_* mask)."""
        with self.lock:
            prots = self.ranges.protections(address, address + size) if size else []
        if prots is None:
            raise MachError("KERN_INVALID_ADDRESS", f"{address:#x}+{size:#x} is not mapped "
                            f"in this task")
        if any(access & ~p for p in prots):
            raise MachError("KERN_PROTECTION_FAILURE", f"{address:#x}+{size:#x} does not "
                            f"allow {'write' if access & VM_PROT_WRITE else 'read'} access")

    # -- the control connection ---------------------------------------------------------
    def start_control(self, token: bytes) -> None:
        """Open the control connection (with the token of our welcome) and serve it in a
        daemon thread."""
        chan = self.connect()
        chan.send(traps.HELLO_CONTROL, [token], _stdio())
        _reply(self, chan, chan.recv())
        self.control = chan
        threading.Thread(target=self._control, args=(chan,), daemon=True,
                         name="pymach.control").start()

    def check_machd(self) -> None:
        """After a lost connection: if machd ended the whole task, let the control thread
        act on its verdict (machd sends DIE before it closes the task's threads, but
        that thread may read it later than this one sees its connection close); if machd
        itself is gone, exit with a clear message (as the control thread does) rather
        than end just this thread."""
        if self.detaching:
            return
        self.await_verdict()
        try:
            chan = Channel.connect(self.socket_path, timeout=5)
            chan.sock.settimeout(5)  # a dying machd may still accept, but never answers
            chan.send(traps.HELLO_PING)
            chan.recv()
            chan.close()
        except (OSError, Disconnected, MachError):
            _die(f"pymach: machd went away; task {self.task_name!r} exits", EXIT_MACHD_DIED)

    def await_verdict(self, seconds: float = VERDICT_WAIT_S) -> None:
        """If a frame (a DIE) waits on the control connection, give the control thread
        `seconds` to act on it (it exits the process)."""
        chan = self.control
        deadline = time.monotonic() + seconds
        while chan is not None and time.monotonic() < deadline:
            try:
                pending = select.select([chan.sock], [], [], 0)[0]
            except (OSError, ValueError):
                return
            if not pending or self.control_closed.wait(0.05):
                return

    def _control(self, chan: Channel) -> None:
        while True:
            try:
                frame = chan.recv()
            except (Disconnected, MachError):
                self.control_closed.set()
                if self.detaching:
                    return
                self.check_machd()
                return  # machd lives: it is ending this task, and says so elsewhere
            frame.close_fds()
            if frame.op == traps.START_THREAD and frame.values and isinstance(
                    frame.values[0], bytes):
                threading.Thread(target=run_thread, args=(self, frame.values[0]),
                                 daemon=True, name="mach-thread").start()
            elif frame.op == traps.DIE:  # machd has written why to our stderr
                if self.detaching:  # the process goes on: it is leaving the task (a
                    self.control_closed.set()  # machd that shuts down before it has
                    return  # taken the DETACH ends the task, never the process)
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                os._exit(EXIT_KILLED if frame.values and frame.values[0] else 0)


def check_daemon(chan: Channel, path: str) -> None:
    """MachError (the channel closed) unless the peer at `path` runs as our user, root,
    or the uid in $PYMACH_MACHD_UID: a socket another user bound is never trusted."""
    expected = {os.getuid(), 0}
    if os.environ.get("PYMACH_MACHD_UID", "").isdigit():
        expected = {int(os.environ["PYMACH_MACHD_UID"])}
    uid = chan.peer().uid
    if uid not in expected:
        chan.close()
        raise MachError("KERN_FAILURE", f"the daemon at {path} runs as uid {uid}, not as "
                        f"{' or '.join(map(str, sorted(expected)))}: refusing to trust it "
                        f"(set PYMACH_MACHD_UID to accept it)")


class _KernelInfo:
    """What task code asks of `thread.kernel` in a native process."""

    def __init__(self, process: NativeProcess) -> None:
        self.page_size = process.page_size


_STALE_REPLY = ("RCV_INVALID_PORT", "SEND_INVALID_PORT", "SEND_INVALID_RIGHT")


class NativeThread:
    """A Mach thread of this process: its traps go over its own connection to machd
    (the wire trap transport; kern/thread.py's Thread is the in-process one)."""

    native = True

    def __init__(self, process: NativeProcess, chan: Channel, welcome: list[Any]) -> None:
        fields = dict(zip(traps.WELCOME_FIELDS, welcome, strict=True))
        self.process = process
        self.conn = chan
        self.name = str(fields["thread"])
        self.reply_name = int(fields["thread_reply"])  # known without a round trip
        self.task = process
        self.kernel = _KernelInfo(process)
        self.senders = process.senders  # the task's direct channels (libmach/direct.py)
        self.alert_fd = -1  # rung by machd when this thread is suspended or terminated
        self._alert_poll: select.poll | None = None
        self._pollers: dict[int, PollSet] = {}  # receives on ports with channels

    def trap(self, op: int, *args: Any) -> Any:
        """Run a trap in machd as this thread; returns its result or raises its error."""
        try:
            self.conn.send(op, args)
        except Disconnected:
            self.process.check_machd()
            raise ThreadTerminated() from None  # machd ended this thread
        return self._await_reply()

    def _await_reply(self) -> Any:
        """The reply to the trap just sent: its value, or its error raised."""
        try:
            frame = self.conn.recv()
        except Disconnected:
            self.process.check_machd()
            raise ThreadTerminated() from None
        return _reply(self.process, self.conn, frame)

    # -- the trap transport ---------------------------------------------------------------
    def _message_trap(self, op: int, msg: Any, *rest: Any) -> Any:
        """A trap that carries a message. A malformed one (the kernel's own check, run
        here since it could not travel) still enters the kernel, where a pending
        termination or suspension takes effect as in the embedded one, and then fails
        with the embedded kernel's error for it."""
        try:
            self.conn.send(op, (_portable(self.process, msg), *rest))
        except Disconnected:
            self.process.check_machd()
            raise ThreadTerminated() from None
        except MachError as e:
            with contextlib.suppress(MachError):
                self.trap(op, None, *rest)
            raise e from None
        return self._await_reply()

    def trap_fds(self, op: int, *args: Any) -> tuple[Any, list[int]]:
        """A trap whose value owns descriptors (traps.py): (value, those fds)."""
        try:
            self.conn.send(op, args)
            frame = self.conn.recv()
        except Disconnected:
            self.process.check_machd()
            raise ThreadTerminated() from None
        return _reply_fds(self.process, self.conn, frame)

    # -- direct channels (libmach/direct.py) ---------------------------------------------
    def _alert(self) -> int:
        """This thread's alert, a doorbell (include/doorbell.py) asked of machd once."""
        if self.alert_fd < 0:
            fds = self.trap_fds(traps.THREAD_ALERT)[1]
            self.alert_fd = fds[0]
            self._alert_poll = select.poll()
            self._alert_poll.register(self.alert_fd, select.POLLIN)
        return self.alert_fd

    def _alerted(self) -> None:
        """Enter the kernel if machd rang the alert (a suspension or termination)."""
        if self._alert_poll is not None and self._alert_poll.poll(0):
            self._boundary()

    def _boundary(self) -> None:
        bell_clear(self.alert_fd)
        self.trap(traps.BOUNDARY)

    def _direct_send(self, msg: Message, timeout: float | None) -> bool:
        """Send a checked message on a direct channel if there is one for it and it may:
        True."""
        if msg.remote_port not in self.senders.channels:
            return False
        try:
            alert = self._alert()
        except MachError as e:  # machd has no descriptor for it now: machd takes back
            if e.code != "KERN_RESOURCE_SHORTAGE":  # what is on the channel, and this
                raise  # message goes after it, through machd
            self.senders.give_up(msg.remote_port, self.trap)
            return False
        return self.senders.send(msg, timeout, alert, self._alerted, self.trap,
                                 self._portable)

    def _portable(self, msg: Message) -> Any:
        return _portable(self.process, msg)

    def _send_through_machd(self, msg: Any, option: Any, timeout: Any) -> None:
        """msg_send as a trap (and, once a port was sent to often, ask for a channel)."""
        self._message_trap(traps.MSG_SEND, msg, option, timeout)
        if isinstance(msg, Message):
            self.senders.note_sent(msg, self.trap_fds)

    def _receive(self, port: Any, option: Any, timeout: Any, rcv_size: Any) -> Message:
        """A receive: on the port's direct channels if it has any here, else through
        machd; machd's channel markers are accepted, never returned."""
        while True:
            if type(port) is int and self.process.receivers.has(port):
                got, timeout = self._receive_local(
                    port, check_options(option, RCV_TIMEOUT, timeout, "receive"),
                    check_rcv_size(rcv_size))
                if got is not None:
                    return got
            msg: Message = _callable_code(self.trap(traps.MSG_RECEIVE, port, option,
                                                    timeout, rcv_size))
            if not is_marker(msg):
                return msg
            self.process.receivers.accept(msg.local_port, msg, self.trap_fds)

    def _receive_local(self, port: int, timeout: float | None,
                       rcv_size: int) -> tuple[Message | None, float | None]:
        """A checked receive on a port with channels here: (the message, None), or
        (None, the time left) once the port's channels are gone (machd's turn)."""
        local = LocalReceive(self.process.receivers, port, timeout, rcv_size, self._alert(),
                             self.trap, self.trap_fds, self._pollers)
        got = local.run(self._boundary)
        if got is not None:
            return _callable_code(got), None
        return None, local.remaining()

    def _after_trap(self, got: Any, port: int, option: Any, timeout: Any,
                    rcv_size: Any) -> Message:
        """A combined trap's received message, or, for a marker, the next one."""
        if not is_marker(got):
            return _callable_code(got)  # type: ignore[no-any-return]
        self.process.receivers.accept(got.local_port, got, self.trap_fds)
        return self._receive(port, option, timeout, rcv_size)

    def _split(self, msg: Any, port: Any) -> bool:
        """True if a send-then-receive must be two steps (a channel on either side)."""
        return isinstance(msg, Message) and (
            msg.remote_port in self.senders.channels or
            (type(port) is int and self.process.receivers.has(port)))

    def _check_both(self, option: Any, rcv_size: Any, send_timeout: Any,
                    receive_timeout: Any, msg: Any, port: Any
                    ) -> tuple[float | None, float | None, int]:
        """The checks a combined trap makes before it sends anything: (the send's and
        the receive's timeouts, rcv_size)."""
        sent = check_options(option, SEND_TIMEOUT, send_timeout, "send")
        received = check_options(option, RCV_TIMEOUT, receive_timeout, "receive")
        size = check_rcv_size(rcv_size)
        validate_message(msg)
        if isinstance(port, bool) or not isinstance(port, int):
            raise MachError("RCV_INVALID_PORT", f"port name must be an int, not {port!r}")
        return sent, received, size

    def _send_then_receive(self, msg: Message, port: int, option: Any, rcv_size: Any,
                           send_timeout: Any, receive_timeout: Any) -> Message:
        """A combined trap as a send and a receive (a channel on either side), each
        checked once."""
        sent, received, size = self._check_both(option, rcv_size, send_timeout,
                                                receive_timeout, msg, port)
        if not self._direct_send(msg, sent):
            self._send_through_machd(msg, option, send_timeout)
        if self.process.receivers.has(port):
            got, received = self._receive_local(port, received, size)
            if got is not None:
                return got
        return self._receive(port, option, received, size)

    # -- the message traps ------------------------------------------------------------------
    def msg_send(self, msg: Any, option: Any, timeout: Any) -> None:
        """msg_send: on a direct channel, or in machd."""
        if isinstance(msg, Message) and msg.remote_port in self.senders.channels:
            t = check_options(option, SEND_TIMEOUT, timeout, "send")
            if self._direct_send(validate_message(msg), t):
                return
        self._send_through_machd(msg, option, timeout)

    def msg_receive(self, port: Any, option: Any, timeout: Any, rcv_size: Any) -> Message:
        """msg_receive: from direct channels and machd, or in machd."""
        if isinstance(port, Message):
            port = port.local_port
        return self._receive(_name(port), option, timeout, rcv_size)

    def msg_rpc(self, msg: Any, option: Any, rcv_size: Any, send_timeout: Any,
                receive_timeout: Any) -> Message:
        """msg_rpc in machd (or as a send and a receive, where there are channels). A
        failure that names our cached reply port (it was destroyed) makes the next
        thread_reply() ask machd again."""
        try:
            local = _name(getattr(msg, "local_port", 0))
            if self._split(msg, local):
                if local == 0:
                    self._check_both(option, rcv_size, send_timeout, receive_timeout, msg,
                                     local)
                    raise MachError("RCV_INVALID_PORT", "msg_rpc needs a reply port in "
                                    "local_port")
                return self._send_then_receive(msg, local, option, rcv_size, send_timeout,
                                               receive_timeout)
            got = self._message_trap(traps.MSG_RPC, msg, option, rcv_size, send_timeout,
                                     receive_timeout)
            self.senders.note_sent(msg, self.trap_fds)
            return self._after_trap(got, local, option, receive_timeout, rcv_size)
        except MachError as e:
            if e.code in _STALE_REPLY and getattr(msg, "local_port", 0) == self.reply_name:
                self.reply_name = 0
            raise

    def msg_send_receive(self, msg: Any, port: Any, option: Any, rcv_size: Any,
                         send_timeout: Any, receive_timeout: Any) -> Message:
        """msg_send_receive: one trap for a server's reply and next receive (or a send
        and a receive, where there are channels)."""
        port = _name(port)
        if self._split(msg, port):
            return self._send_then_receive(msg, port, option, rcv_size, send_timeout,
                                           receive_timeout)
        got = self._message_trap(traps.MSG_SEND_RECEIVE, msg, port, option, rcv_size,
                                 send_timeout, receive_timeout)
        self.senders.note_sent(msg, self.trap_fds)
        return self._after_trap(got, port, option, receive_timeout, rcv_size)

    @property
    def transport(self) -> NativeThread:
        """How this thread enters its kernel: over the wire (this object)."""
        return self

    def identity(self, op: int) -> int:
        """An identity trap (traps.TASK_SELF ...); thread_reply needs no round trip."""
        if op == traps.THREAD_REPLY and self.reply_name:
            return self.reply_name
        name = int(self.trap(op))
        if op == traps.THREAD_REPLY:
            self.reply_name = name
        return name

    def share_stdio(self) -> None:
        """Give machd this process's current stdout and stderr and where its program
        runs: the processes of tasks it creates next write there and start there (as
        a forked child would)."""
        main = getattr(sys.modules["__main__"], "__file__", "") or ""
        path = [p for p in sys.path if isinstance(p, str)][:256]
        self.conn.send(traps.STDIO, [os.getcwd(), path, main], _stdio())
        _reply(self.process, self.conn, self.conn.recv())

    def close_channels(self) -> None:
        """Close this thread's alert (it ends)."""
        if self.alert_fd >= 0:
            close_fds([self.alert_fd])
            self.alert_fd, self._alert_poll = -1, None
        self._pollers.clear()

    def exit(self, result: Any) -> None:
        """Tell machd this thread is done."""
        self.close_channels()
        with contextlib.suppress(Disconnected, OSError):
            self.conn.send(traps.EXIT, [_wire_value(result)])
        self.conn.close()


def _reply(process: NativeProcess, chan: Channel, frame: Frame) -> Any:
    """Act on one REPLY frame: apply its batch (and the batches of the MAPPED replies
    that follow it, one after another), then return its value or raise; each reply of
    the chain is finished (its batches waited for, its error raised) innermost first,
    as nested traps would be."""
    chain: list[list[Any]] = []
    follow: Frame | None = frame
    while follow is not None:
        values = _checked_reply(follow)
        chain.append(values)
        try:
            follow = process.apply(chan, values[4], values[6], follow.fds)
        except Disconnected:  # (machd ended this thread, or machd is gone)
            process.check_machd()
            raise ThreadTerminated() from None
    for status, _value, code, detail, _batch, upto, _maps in reversed(chain):
        process.wait_applied(upto)
        if status == traps.REPLY_TERMINATED:
            process.await_verdict()  # the whole task may be ending: machd says so (DIE)
            raise ThreadTerminated()
        if status != traps.REPLY_OK:
            raise MachError(code, detail)
    return chain[0][1]


def _checked_reply(frame: Frame) -> list[Any]:
    """A REPLY frame's values, checked (its descriptors closed if it is not one)."""
    if frame.op != traps.REPLY:
        frame.close_fds()
        raise MachError("MIG_TYPE_ERROR", f"machd sent frame {frame.op}, not a reply")
    try:
        wire.check(frame.values, traps.SIGNATURES[traps.REPLY], "reply")
    except MachError:
        frame.close_fds()
        raise
    return frame.values


def _reply_fds(process: NativeProcess, chan: Channel, frame: Frame) -> tuple[Any, list[int]]:
    """`_reply` for a trap whose value owns the REPLY's last n fds (its value is a list
    ending in n): (value, those fds, which the caller then owns)."""
    own: list[int] = []
    values = frame.values
    if frame.op == traps.REPLY and len(values) == 7 and values[0] == traps.REPLY_OK:
        value = values[1]
        if isinstance(value, list) and value and type(value[-1]) is int and \
                0 < value[-1] <= len(frame.fds):
            n = value[-1]
            own, frame.fds = frame.fds[-n:], frame.fds[:-n]
    try:
        return _reply(process, chan, frame), own
    except BaseException:
        close_fds(own)
        raise


def _portable(process: NativeProcess, msg: Any) -> Any:
    """A message whose items can travel to machd: byte items become bytes, and for Code
    items, for a thread of our own task the callable stays here (threads of a task
    share its objects) and only a key travels; for another task it is pickled by value."""
    if not isinstance(msg, Message):
        return msg
    validate_message(msg)  # the kernel's own check (0.4 us): its errors, raised here
    if not any(isinstance(i, Code) for i in msg.items):
        return msg
    own = msg.remote_port == process.task_port

    def travel(code: Code) -> Code:
        if code.blob is not None:
            return code
        if own:
            key = uuid.uuid4().hex
            process.local_code[key] = code
            return Code(None, blob=b"local:" + key.encode())
        return Code(None, blob=cloudpickle.dumps((code.fn, code.args, code.kwargs)))

    def portable(item: Any) -> Any:
        if isinstance(item, Code):
            return travel(item)
        if isinstance(item, Bytes) and isinstance(item.value, bytearray | memoryview):
            return Bytes(bytes(item.value))
        return item

    items = [portable(i) for i in msg.items]
    return Message(msg.remote_port, msg.local_port, msg.id, items, msg.local_disposition)


def _name(port: Any) -> Any:
    """A port name as the runtime looks it up: an int subclass (an IntEnum of a
    program's well-known ports, say) as the plain int, so that a port with direct
    channels is received on from them; anything else unchanged (the checks name it)."""
    if isinstance(port, int) and type(port) is not int and not isinstance(port, bool):
        return int(port)
    return port


def _callable_code(msg: Any) -> Any:
    """A received message whose Code items are callable here. Only a blob machd says
    came from this process's own user is unpickled; another user's arrives refused
    (machd dropped its blob), and one that cannot be loaded stays a blob (`fn` None)."""
    if not isinstance(msg, Message):
        return msg
    for n, item in enumerate(msg.items):
        if isinstance(item, Code) and item.fn is None and item.blob is not None \
                and not item.refused and item.origin_uid == os.getuid():
            with contextlib.suppress(Exception):
                fn, args, kwargs = cloudpickle.loads(item.blob)
                msg.items[n] = Code(fn, tuple(args), dict(kwargs), origin_uid=item.origin_uid)
    return msg


def _load_code(process: NativeProcess, blob: bytes, uid: int) -> tuple[Any, tuple[Any, ...],
                                                                        dict[str, Any]]:
    """A new thread's callable: our own task's (by key), or a blob of our own user."""
    if blob.startswith(b"local:"):
        code = process.local_code.pop(blob[6:].decode())
        assert code.fn is not None
        return code.fn, code.args, code.kwargs
    if uid != os.getuid():
        raise MachError("KERN_PROTECTION_FAILURE", f"refusing code from uid {uid}")
    if blob.startswith(ENTRY_BLOB):  # a migrated task's first thread (net/migration.py)
        return _migrated_main, (blob[len(ENTRY_BLOB):].decode(),), {}
    fn, args, kwargs = cloudpickle.loads(blob)
    return fn, tuple(args), dict(kwargs)


def _wire_value(value: Any) -> Any:
    """A thread's result as it can travel: itself if the wire carries it, else its repr."""
    try:
        wire.encode([value])
    except MachError:
        return repr(value)
    return value


def _stdio() -> list[int]:
    """This process's stdout and stderr descriptors (for its children), if both open."""
    try:
        for fd in (1, 2):
            os.fstat(fd)
    except OSError:
        return []
    return [1, 2]


def _die(text: str, status: int) -> None:
    print(text, file=sys.stderr, flush=True)
    os._exit(status)


_process: NativeProcess | None = None


def attached() -> NativeProcess | None:
    """This process as a native task, or None if it is not one."""
    return _process


def attach(socket_path: str | None = None, name: str = "") -> NativeThread:
    """Make this process a new task of machd and this thread its first Mach thread."""
    if _process is not None:
        raise MachError("KERN_FAILURE", "this process is already a native task")
    if not faulthandler.is_enabled():  # a stray access (an address the task has not
        faulthandler.enable()  # mapped) is a SIGSEGV: show where, as machd cannot
    process = NativeProcess(socket_path or default_socket_path())
    try:
        chan = process.connect()
        uffd = Uffd.create()
        try:  # machd takes the userfaultfd; this process keeps no copy of it
            welcome = process.hello(chan, traps.HELLO_ATTACH,
                                    [name, threading.get_native_id()], [uffd.fd])
        finally:
            uffd.close()
    except BaseException:
        _libc.munmap(ctypes.c_void_p(WINDOW_BASE), ctypes.c_size_t(WINDOW_SIZE))
        raise
    return _become(process, chan, welcome)


def _become(process: NativeProcess, chan: Channel, welcome: list[Any]) -> NativeThread:
    global _process
    fields = dict(zip(traps.WELCOME_FIELDS, welcome, strict=True))
    process.task_serial, process.task_name = fields["task"], fields["task_name"]
    process.page_size = fields["page_size"]
    _process = process
    process.start_control(fields["control_token"])
    thread = NativeThread(process, chan, welcome)
    set_current_thread(thread)  # type: ignore[arg-type]
    process.task_port = int(fields["task_self"])
    thread.share_stdio()  # its children start where it runs
    return thread


def detach() -> None:
    """Stop being a native task: machd terminates the task, the process goes on (used
    by tests, which attach a fresh task for each test)."""
    global _process
    process = _process
    if process is None:
        return
    process.detaching = True
    process.receivers.close_all()
    process.senders.close_all()
    me = running_thread()
    if isinstance(me, NativeThread):
        me.close_channels()
    if process.control is not None:
        with contextlib.suppress(Disconnected, MachError, OSError):
            process.control.send(traps.DETACH)
            process.control_closed.wait(DETACH_WAIT_S)  # machd closes it: the task is gone
    with process.applied:  # threads stuck in a fault woke when machd dropped the uffd
        process.applied.wait_for(lambda: process.threads_running == 0, DETACH_WAIT_S)
    _libc.munmap(ctypes.c_void_p(WINDOW_BASE), ctypes.c_size_t(WINDOW_SIZE))
    _process = None
    set_current_thread(None)


DETACH_WAIT_S = 5.0  # how long detach waits for the task's other threads to end


def run_thread(process: NativeProcess, token: bytes, first: bool = False) -> None:
    """A thread made by thread_create: connect, run its code, report its result."""
    with process.applied:
        process.threads_running += 1
    try:
        _run_thread(process, token, first)
    finally:
        with process.applied:
            process.threads_running -= 1
            process.applied.notify_all()


def _run_thread(process: NativeProcess, token: bytes, first: bool) -> None:
    chan = process.connect()
    uffd = Uffd.create() if first else None
    try:
        welcome = process.hello(chan, traps.HELLO_THREAD, [token, threading.get_native_id()],
                                [uffd.fd] if uffd is not None else [])
    except (ThreadTerminated, Disconnected, MachError):  # terminated before it ran (machd
        chan.close()  # tells it so, or no longer knows its token), or detached
        return
    finally:
        if uffd is not None:
            uffd.close()
    thread = (_become(process, chan, welcome) if first
              else NativeThread(process, chan, welcome))
    set_current_thread(thread)  # type: ignore[arg-type]
    fields = dict(zip(traps.WELCOME_FIELDS, welcome, strict=True))
    result: Any = None
    try:
        fn, args, kwargs = _load_code(process, fields["code"], fields["code_uid"])
        result = fn(*args, **kwargs)
    except ThreadTerminated:
        pass
    except BaseException as e:  # reported, never lost (as for embedded threads)
        print(f"pymach: thread {thread.name} of task {process.task_name!r} raised {e!r}",
              file=sys.stderr, flush=True)
        result = e
    finally:
        thread.exit(result)
        set_current_thread(None)
