"""Direct channels between native tasks: machd grants them and tears them down.

A message between two native tasks otherwise crosses machd twice. machd, still the only
authority over rights, may give a sending task a *direct channel* to a port P (the
packets and page of include/direct.py; the tasks' side is libmach/direct.py):

- **Grant** (`open`, the CHANNEL_OPEN trap). The thread's task holds a right to send to
  P; P is a task's port, not enabled (not in a default group), and its receiver is
  another live native task. machd queues on P an internal marker (CHANNEL_MARKER)
  behind everything queued so far and returns the sender its end and the page. One
  channel per (sender task, P), shared by the task's threads; at most
  `PORT_CHANNELS_MAX` per port, `TASK_CHANNELS_MAX` into one receiving task and from
  one sending task, and `USER_CHANNELS_MAX` from the tasks of one uid.
- **Descriptors.** machd holds, per channel, its end of the socket (the receiver's
  end) and, until the receiver accepts it, the page's memfd; per port with channels,
  its doorbell (a pipe's two ends: include/doorbell.py). It grants no channel that
  would take the descriptors it holds for channels past `fds_max` (half its descriptor
  limit), so channels never starve machd of descriptors: past that, senders go through
  machd.
- **Reply ports** (`bind`, CHANNEL_BIND; `replies`, CHANNEL_REPLIES). A message on a
  channel names no port: its reply port is none or one of at most REPLIES_MAX ports
  the sender bound to the channel, each a port it holds a right to send to (Mach 2.5
  rights have no reference counts, so a message that carries only such a reply right
  changes nothing in machd but P's queue). The receiver asks machd for its names of
  them when it reads a message naming one new to it, and gets its send right then, as
  the message would have given it: binding alone puts nothing in its space.
- **Accept** (`accept`, CHANNEL_ACCEPT). The receiver's runtime, having received the
  marker, takes its end, the page, and P's doorbell (include/doorbell.py: machd rings it at every
  message queued on P in machd), and reads the channel from then on: per-sender order
  holds, since the sender's later messages go on the channel.
- **Closing** (CHANNEL_CLOSE). A sending task that closes a channel itself gets no new
  one to that port (nor any once it closed CLOSED_MAX): filling a channel and closing
  it queues at most a backlog's worth of messages once, not again and again.
- **Teardown** (`_teardown`). When P's receive right is about to leave its task or P to
  die (PortObserver.receiver_leaving), P is enabled, the receiver or the sender loses
  its name for a bound reply port, the sender's task loses its name for P (its right
  given up or taken, or the task's death), a bound reply port dies, or either side asks
  (CHANNEL_CLOSE: a receiver that read garbage, a sender whose write failed), machd
  shuts the channel down (the sender's next write fails with EPIPE, and it falls back
  to machd; the receiver's reads end), takes what is left on it with ONE read of the
  receiver's end (`take_all`), decodes it (bounded, data only, garbage skipped:
  include/direct.py) and puts it in P's queue where the marker stands, or at the head
  if the marker was received. The one read is what makes this exact while a thread of
  the receiving task may be reading the same channel: the kernel does a stream read
  under the socket's read lock, so that thread takes a whole frame before machd's read
  or nothing after it (include/direct.py). Hence, for each sender: the messages its
  receiver took are a prefix of what it sent, machd requeues exactly the rest, in
  order, before anything the sender sends next (its next write fails, and machd holds
  the kernel lock until the requeue is done); none is lost or delivered twice, also
  when the port goes to a new holder. A queue that then dies destroys them as any
  queued message. (The one read holds every honest frame; a stream read stops early
  only at a message carrying descriptors or an urgent mark, which only a hostile
  sender writes: what is left past it is read and dropped, `discard_rest`, so the old
  receiver never reads it after the teardown. machd makes the sender's send buffer
  big enough that a frame is queued whole.)
- **Held messages** (`hold`, CHANNEL_HOLD; `claim`, CHANNEL_CLAIM). A message the
  channel cannot carry is copied in by machd as a send would (rights, memory, code,
  checks and the sender's out-of-line allowance) but not queued: machd holds it under a
  token (at most HELD_MAX per channel) and the sender writes the token on the channel.
  The receiver claims it there, with the receive's checks (RCV_TOO_LARGE and the like
  leave it held: it is claimed first next time) and copyout. A held message has the
  sequence number its token's frame gets (the page's SENT + 1: the sender holds its
  channel's lock from the hold to the token's write), so at a teardown each takes its
  token's place (`_drain`): before what machd read back if the receiver took the token
  (its claim failed, or had not come yet), in place if machd read the token back, after
  everything if the token was never written. A sending thread that ends before its
  hold's token is claimed may never have written it (terminated while it waited for
  room on a full channel, say): its channel is then torn down (`thread_ended`), so
  the held message goes into the queue in its place, not left with machd.
- **Backlog.** machd writes on each channel's page how many messages wait in P's queue
  (markers aside) and P's backlog; the sender adds its own messages not yet received.
  port_status counts the messages on channels too.

Everything here runs with the kernel lock held (the traps take it); machd reads at most
DRAIN_BYTES and decodes at most DRAIN_MAX frames of bounded typed wire at a teardown
(and skips at most direct.RESYNC_MAX runs of garbage), and never unpickles. The page's
memfd is sealed to its size before any descriptor of it leaves machd.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import mmap
import os
import resource
import socket
import struct
import termios
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pymach.errors import MachError
from pymach.include import direct
from pymach.include.doorbell import Doorbell
from pymach.include.message import PORT_BACKLOG_MAX, Int, Message, validate_message
from pymach.ipc.ipc_mqueue import mqueue_enqueue, mqueue_requeue
from pymach.ipc.ipc_right import kmsg_destroy
from pymach.ipc.kmsg import KMsg, copyout, kmsg_uncharge
from pymach.ipc.mach_msg import check_deliverable, check_rcv_size, msg_copyin_held

if TYPE_CHECKING:
    from pymach.ipc.port import Port
    from pymach.ipc.space import IpcSpace
    from pymach.kern.task import Task
    from pymach.kern.thread import Thread

log = logging.getLogger("pymach.machd")

PORT_CHANNELS_MAX = 16  # channels into one port
TASK_CHANNELS_MAX = 64  # channels into the ports of one task, and from one task
USER_CHANNELS_MAX = 256  # channels from the tasks of one uid, and at most an eighth of
# fds_max (a channel holds two or three descriptors: no user takes them all)
HELD_MAX = 16  # messages machd holds for one channel (a port's backlog at most)
# Packets read back at a teardown, at most: a sender that keeps to the backlog has at
# most the port's backlog (<= PORT_BACKLOG_MAX) of messages and HELD_MAX tokens on its
# channel; data packets beyond the backlog are dropped (logged), never queued.
DATA_MAX = PORT_BACKLOG_MAX
DRAIN_MAX = DATA_MAX + HELD_MAX
DRAIN_BYTES = DRAIN_MAX * direct.FRAME_MAX  # read back at a teardown, at most
DISCARD_READS = 1024  # reads of what is left past that (dropped), at most (each read
# stops at a message carrying descriptors; the sender's buffer holds fewer than this)
CLOSED_MAX = 64  # ports a sending task may close channels to before it gets no more
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL  # the page's size
# is fixed before a descriptor leaves machd: a task that could shrink it would make
# machd's (or its peer's) next touch of the page a SIGBUS


@dataclass(frozen=True)
class Held:
    """A message machd holds for a channel under a token (`hold`)."""

    seq: int  # the sequence number of its token's frame
    kmsg: KMsg
    holder: Thread  # the thread that must write its token (`thread_ended`)


@dataclass(eq=False)
class DirectChannel:
    """machd's record of one channel (kernel lock)."""

    cid: int
    port: Port  # P
    replies: list[Port]  # the bound reply ports, by index
    sender: Task
    receiver: Task
    end: socket.socket  # machd's dup of the receiver's end
    page: mmap.mmap
    view: memoryview  # the page as u64 counters (include/direct.py)
    page_fd: int  # the page's memfd, until the receiver takes it (-1 then)
    marker: KMsg | None  # the marker while it is queued
    accepted: bool = False
    held: dict[int, Held] = field(default_factory=dict)  # token -> the held message
    backlog_seen: int = 0  # the largest backlog its page has shown: an honest sender
    # never has more messages on it (a receiver lowering the backlog drops none)


@dataclass(eq=False)
class PortChannels:
    """The channels into one port and its doorbell (kernel lock)."""

    bell: Doorbell  # rung at each message queued in machd (include/doorbell.py)
    channels: list[DirectChannel] = field(default_factory=list)
    markers: int = 0  # markers queued


class ChannelTable:
    """machd's channels (see module docstring); the PortObserver of every port that is
    the destination or the bound reply port of a channel."""

    def __init__(self) -> None:
        self.ports: dict[Port, PortChannels] = {}
        self.by_id: dict[int, DirectChannel] = {}
        self.by_reply: dict[Port, list[DirectChannel]] = {}
        self.by_sender: dict[Task, list[DirectChannel]] = {}
        self.per_task: dict[Task, int] = {}
        # (sender task -> ports it closed a channel to itself): it gets no new channel
        # to them, so it cannot queue a backlog's worth past the port's backlog over
        # and over by filling a channel and closing it; bounded by CLOSED_MAX a task
        self.closed: dict[Task, set[Port]] = {}
        self._ids = itertools.count(1)
        self._tokens = itertools.count(1)
        self.fds_max = resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2  # (module doc)

    # -- the traps ------------------------------------------------------------------------
    def open(self, thread: Thread, name: int, reply_name: int) -> tuple[list[int], list[int]]:
        """CHANNEL_OPEN (see module docstring), with `reply_name` bound first unless 0:
        ([channel id, 2], [sender's end, page fd]) or a MachError saying why not (the
        runtime sends through machd then)."""
        space = thread.task.space
        port = space.lookup(name, "SEND_INVALID_PORT").port
        receiver = port.receiver
        self._check_open(thread.task, port, receiver)
        assert receiver is not None
        reply = self._reply_port(thread.task, reply_name, receiver) if reply_name else None
        ch, sender_end, page_fd = self._make(thread.task, port, receiver)
        try:
            self._register(ch)
        except OSError:  # (no descriptor for the port's doorbell): nothing left behind
            _discard(ch, [sender_end, page_fd])
            raise
        if reply is not None:
            self._bind(ch, reply)
        mqueue_enqueue(port, ch.marker)  # type: ignore[arg-type]
        return [ch.cid, 2], [sender_end, page_fd]

    def _reply_port(self, task: Task, reply_name: int, receiver: Task) -> Port:
        """The port the sender names as a reply port, if it may be bound (it holds a
        right to send to it, and it lives)."""
        reply = task.space.lookup(reply_name, "SEND_INVALID_PORT").port
        if reply.dead:
            raise MachError("SEND_INVALID_PORT", "the reply port is dead")
        return reply

    def _bind(self, ch: DirectChannel, reply: Port) -> int:
        """Bind a reply port to the channel; its index. The receiver gets its send right
        only when it reads a message naming it (`replies`), as a message carrying it
        would give it: binding alone puts nothing in the receiver's space."""
        if reply in ch.replies:
            return ch.replies.index(reply)
        ch.replies.append(reply)
        self.by_reply.setdefault(reply, []).append(ch)
        reply.observer = self
        return len(ch.replies) - 1

    def bind(self, thread: Thread, name: int, cid: int, reply_name: int) -> int:
        """CHANNEL_BIND by the channel's sending task: the index of `reply_name`'s port
        on the channel (bound now if it is not); KERN_RESOURCE_SHORTAGE past
        REPLIES_MAX."""
        ch = self._own(thread, name, cid, sender=True)
        reply = self._reply_port(thread.task, reply_name, ch.receiver)
        if reply not in ch.replies and len(ch.replies) >= direct.REPLIES_MAX:
            raise MachError("KERN_RESOURCE_SHORTAGE", f"{direct.REPLIES_MAX} reply ports "
                            f"are bound to this channel already")
        return self._bind(ch, reply)

    def replies(self, thread: Thread, name: int, cid: int) -> list[int]:
        """CHANNEL_REPLIES by the receiving task, which read a message naming a bound
        reply port new to it: its names for the bound reply ports, by index, each given
        a send right now if it has none (0 for a dead port, or past its name limit: the
        message then arrives without its reply port)."""
        ch = self._own(thread, name, cid, sender=False)
        space = thread.task.space
        names = []
        for port in ch.replies:
            known = space.name_of(port)
            if known is None and not port.dead:
                with contextlib.suppress(MachError):
                    space.check_room(1, "RCV_IPC_SPACE")
                    known = space.insert(port, send=True)
            names.append(known or 0)
        return names

    def hold(self, thread: Thread, name: int, cid: int, msg: object) -> int:
        """CHANNEL_HOLD by the channel's sending task: copy `msg` (to the channel's
        port) in as msg_send would, hold it, and return its token; the send's errors
        (nothing taken then), SEND_NO_BUFFER past HELD_MAX."""
        ch = self._own(thread, name, cid, sender=True)
        checked = validate_message(msg)
        if checked.remote_port != name:
            raise MachError("SEND_INVALID_PORT", "a held message goes to its channel's port")
        if len(ch.held) >= HELD_MAX:
            raise MachError("SEND_NO_BUFFER", f"{HELD_MAX} messages are held for this "
                            f"channel already")
        token = next(self._tokens)
        seq = int(ch.view[direct.SENT]) + 1  # (its token's frame: module docstring)
        kmsg = msg_copyin_held(thread, checked)
        if self.by_id.get(cid) is ch:
            ch.held[token] = Held(seq, kmsg, thread)
        elif ch.port.dead:  # the copyin itself closed the channel (the message moved
            kmsg_destroy(kmsg)  # the sender's right to the port away, say): it goes
        else:  # where the channel's messages went, after them
            mqueue_enqueue(ch.port, kmsg)
        return token

    def claim(self, thread: Thread, name: int, cid: int, token: int,
              rcv_size: object) -> Message:
        """CHANNEL_CLAIM by the channel's receiving task, whose runtime read `token` on
        the channel: the held message, received (copied out) as a receive would; the
        receive's errors leave it held (it goes first at a teardown)."""
        ch = self._own(thread, name, cid, sender=False)
        if token not in ch.held:
            raise MachError("KERN_INVALID_ARGUMENT", f"no message held under {token}")
        kmsg = ch.held[token].kmsg
        space = thread.task.space
        check_deliverable(space, kmsg, check_rcv_size(rcv_size))
        del ch.held[token]
        kmsg_uncharge(kmsg)
        return copyout(space, kmsg)

    def thread_ended(self, thread: Thread) -> None:
        """A thread of a sending task ended (its connection closed): each channel on
        which it holds an unclaimed message whose token it may not have written is torn
        down, so the message goes into the port's queue in its place (module
        docstring). It may not have if it was terminated (it may have been waiting for
        room to write it), or if the page's SENT is short of the token's sequence
        number; a thread that ended on its own after writing its tokens costs its
        task's channels nothing."""
        for ch in list(self.by_sender.get(thread.task, ())):
            sent = int(ch.view[direct.SENT])
            if any(h.holder is thread and (thread.terminating or h.seq > sent)
                   for h in ch.held.values()):
                self._teardown(ch)

    def _own(self, thread: Thread, name: int, cid: int, sender: bool) -> DirectChannel:
        """The channel `cid` to the port `name` names in the thread's task, of which the
        task is the sender (or the receiver); KERN_INVALID_ARGUMENT otherwise."""
        ch = self.by_id.get(cid)
        entry = thread.task.space.names.get(name)
        ours = ch is not None and (ch.sender if sender else ch.receiver) is thread.task
        if ch is None or not ours or entry is None or entry.port is not ch.port:
            raise MachError("KERN_INVALID_ARGUMENT", f"no channel {cid} of this task to "
                            f"port {name}")
        return ch

    def _check_open(self, task: Task, port: Port, receiver: Task | None) -> None:
        """KERN_FAILURE unless a channel from `task` to `port` may be granted."""
        why = ""
        if port.dead or port.kobject is not None or receiver is None:
            why = "not a task's port"
        elif receiver is task or receiver.process is None or not receiver.active:
            why = "its receiver is not another native task"
        elif port.enabled:
            why = "it is in a default group"
        elif any(c.sender is task for c in self._channels(port)):
            why = "there is one already"
        elif port in self.closed.get(task, ()) or len(self.closed.get(task, ())) >= CLOSED_MAX:
            why = "this task closed one before"
        elif len(self._channels(port)) >= PORT_CHANNELS_MAX or \
                self.per_task.get(receiver, 0) >= TASK_CHANNELS_MAX or \
                len(self.by_sender.get(task, ())) >= TASK_CHANNELS_MAX or \
                self._user_channels(task.uid) >= min(USER_CHANNELS_MAX, self.fds_max // 8):
            why = "too many channels"
        elif self.fds_held() + 4 > self.fds_max:  # (an end, a page, a doorbell's two)
            why = "machd holds the most descriptors it may for channels"
        if why:
            raise MachError("KERN_FAILURE", f"no direct channel to this port: {why}")

    def _user_channels(self, uid: int) -> int:
        """The channels whose sending task runs as `uid`."""
        return sum(len(chs) for sender, chs in self.by_sender.items() if sender.uid == uid)

    def _make(self, sender: Task, port: Port,
              receiver: Task) -> tuple[DirectChannel, int, int]:
        """A new channel's record, the sender's end and a descriptor of the page (for
        the reply); an OSError (out of descriptors, say) leaves nothing behind."""
        sender_end, end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        _room_for_frames(sender_end)
        for s in (sender_end, end):  # an out-of-band byte a peer writes arrives inline:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)  # garbage (a frame)
        # or a wake-up, never a socket that polls readable while a read finds nothing
        fds: list[int] = []
        try:
            fds.append(os.memfd_create("pymach-channel",
                                       os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING))
            os.ftruncate(fds[0], direct.PAGE_SIZE)
            fcntl.fcntl(fds[0], fcntl.F_ADD_SEALS, SEALS)
            fds.append(os.dup(fds[0]))
            page = mmap.mmap(fds[0], direct.PAGE_SIZE)
        except OSError:
            for s in (sender_end, end):
                s.close()
            for fd in fds:
                os.close(fd)
            raise
        view = memoryview(page).cast("Q")
        view[direct.BACKLOG] = port.backlog
        cid = next(self._ids)
        marker = KMsg(port, None, direct.CHANNEL_MARKER, [Int(cid)])
        ch = DirectChannel(cid, port, [], sender, receiver, end, page, view, fds[0], marker)
        return ch, sender_end.detach(), fds[1]

    def _register(self, ch: DirectChannel) -> None:
        """Enter a new channel in the tables (its port's doorbell made if need be: an
        OSError then leaves the tables as they were)."""
        st = self.ports.get(ch.port)
        if st is None:
            st = self.ports[ch.port] = PortChannels(Doorbell())
        st.channels.append(ch)
        st.markers += 1
        self.by_id[ch.cid] = ch
        self.by_sender.setdefault(ch.sender, []).append(ch)
        self.per_task[ch.receiver] = self.per_task.get(ch.receiver, 0) + 1
        ch.port.observer = self
        self._publish(ch.port)

    def accept(self, thread: Thread, name: int, cid: int) -> tuple[list[int], list[int]]:
        """CHANNEL_ACCEPT: ([sender uid, 3], [receiver's end, page, bell]) for the channel
        whose marker the task received on its port `name`; KERN_INVALID_ARGUMENT if
        there is no such channel (any more)."""
        ch = self._own(thread, name, cid, sender=False)
        if not thread.task.space.names[name].receive or ch.accepted or ch.marker is not None:
            raise MachError("KERN_INVALID_ARGUMENT", f"no channel {cid} to accept on {name}")
        try:
            end = os.dup(ch.end.fileno())
        except OSError:
            self._teardown(ch)  # (nobody else would: its marker is taken, its sender's
            raise  # messages go into the queue; a review's finding)
        try:
            bell = self.ports[ch.port].bell.handout()
        except OSError:
            os.close(end)
            self._teardown(ch)
            raise
        ch.accepted = True
        page_fd, ch.page_fd = ch.page_fd, -1
        return [ch.sender.uid, 3], [end, page_fd, bell]

    def close(self, thread: Thread, name: int, cid: int) -> None:
        """CHANNEL_CLOSE by the channel's sending or receiving task (anyone else:
        KERN_INVALID_ARGUMENT): tear it down."""
        ch = self.by_id.get(cid)
        if ch is None or thread.task not in (ch.sender, ch.receiver):
            raise MachError("KERN_INVALID_ARGUMENT", f"no channel {cid} of this task")
        if thread.task is ch.sender:
            for gone in [t for t in self.closed if not t.active]:
                del self.closed[gone]  # (only live tasks' entries are kept)
            self.closed.setdefault(ch.sender, set()).add(ch.port)
        self._teardown(ch)

    # -- teardown --------------------------------------------------------------------------
    def _teardown(self, ch: DirectChannel) -> None:
        """Shut the channel, put what is left on it into its port's queue (module
        docstring), and forget it."""
        if self.by_id.pop(ch.cid, None) is None:
            return
        self._forget(ch)
        with contextlib.suppress(OSError):
            ch.end.shutdown(socket.SHUT_RDWR)
        kmsgs = self._drain(ch)
        if ch.port.dead:
            for kmsg in kmsgs:
                kmsg_destroy(kmsg)
        else:
            mqueue_requeue(ch.port, kmsgs, ch.marker)
        ch.end.close()
        ch.view.release()
        ch.page.close()
        if ch.page_fd >= 0:
            os.close(ch.page_fd)
        self._publish(ch.port)

    def _forget(self, ch: DirectChannel) -> None:
        """Take the channel out of every index; a port left with none loses its
        doorbell (rung first, so its receiver looks again) and its observer."""
        st = self.ports[ch.port]
        st.channels.remove(ch)
        if ch.marker is not None:
            st.markers -= 1
        self.by_sender[ch.sender].remove(ch)
        if not self.by_sender[ch.sender]:
            del self.by_sender[ch.sender]
        self.per_task[ch.receiver] -= 1
        if not self.per_task[ch.receiver]:
            del self.per_task[ch.receiver]
        for reply in ch.replies:
            self.by_reply[reply].remove(ch)
            if not self.by_reply[reply]:
                del self.by_reply[reply]
                self._unobserve(reply)
        st.bell.ring()
        if not st.channels:
            st.bell.close()
            del self.ports[ch.port]
            self._unobserve(ch.port)

    def _unobserve(self, port: Port) -> None:
        if port not in self.ports and port not in self.by_reply:
            port.observer = None

    def _drain(self, ch: DirectChannel) -> list[KMsg]:
        """The messages left on a shut channel and those machd holds for it, in their
        order (module docstring): decoded (garbage is skipped and logged), as kernel
        messages from its sender."""
        back = self._read_back(ch)
        first = back[0][0] if back else None
        held = sorted((h.seq, token) for token, h in ch.held.items())
        before = [ch.held.pop(t).kmsg for seq, t in held if first is None or seq < first]
        after = [ch.held.pop(t).kmsg for _, t in held if t in ch.held]
        return [*before, *(kmsg for _, kmsg in back), *after]

    def _read_back(self, ch: DirectChannel) -> list[tuple[int, KMsg]]:
        """The frames left on a shut channel, as (sequence number, kernel message), held
        ones taken from `ch.held`."""
        frames, skipped = direct.scan_frames(take_all(ch.end), DRAIN_MAX)
        skipped += discard_rest(ch.end)
        if skipped:
            log.warning("task %s: %d bytes of garbage on channel %d skipped",
                        ch.sender.name, skipped, ch.cid)
        out: list[tuple[int, KMsg]] = []
        data_packets = 0
        for seq, msg, index in frames:
            if index < 0 and msg.id in ch.held:
                out.append((seq, ch.held.pop(msg.id).kmsg))
                continue
            data_packets += 1
            if index < 0 or index > len(ch.replies) or \
                    data_packets > min(max(ch.backlog_seen, ch.port.backlog), DATA_MAX):
                log.warning("task %s: a frame on channel %d dropped (reply port %d, token "
                            "%d, or past the backlog)", ch.sender.name, ch.cid, index, msg.id)
                continue
            out.append((seq, self._kmsg(ch, msg, index)))
        return out

    @staticmethod
    def _kmsg(ch: DirectChannel, msg: Message, index: int) -> KMsg:
        """The kernel message of a data frame read back (a dead reply port: none)."""
        reply = ch.replies[index - 1] if index else None
        if reply is not None and reply.dead:
            reply = None
        return KMsg(ch.port, reply, msg.id, list(msg.items), sender=ch.sender.name,
                    sender_uid=ch.sender.uid, plain=True)

    def _channels(self, port: Port) -> list[DirectChannel]:
        st = self.ports.get(port)
        return st.channels if st is not None else []

    def fds_held(self) -> int:
        """The descriptors machd holds for channels: each channel's end, each page's
        memfd not yet accepted, each doorbell."""
        return sum(1 + (c.page_fd >= 0) for c in self.by_id.values()) + 2 * len(self.ports)

    def _publish(self, port: Port) -> None:
        """Write the port's queue length (markers aside) and backlog on its channels'
        pages, and wake the senders that wait for room."""
        st = self.ports.get(port)
        if st is None:
            return
        queued = max(0, len(port.queue) - st.markers)
        for ch in st.channels:
            view = ch.view
            view[direct.QUEUED] = queued
            view[direct.BACKLOG] = port.backlog
            ch.backlog_seen = max(ch.backlog_seen, port.backlog)
            if view[direct.WAITING]:
                with contextlib.suppress(OSError):
                    ch.end.send(direct.WAKE, socket.MSG_DONTWAIT)

    # -- PortObserver ------------------------------------------------------------------------
    def enqueued(self, port: Port, kmsg: KMsg) -> None:
        """Ring the port's doorbell; publish its queue length."""
        st = self.ports.get(port)
        if st is not None:
            st.bell.ring()
            self._publish(port)

    def dequeued(self, port: Port, kmsg: KMsg) -> None:
        """A marker received: its channel may be accepted; publish the queue length."""
        st = self.ports.get(port)
        if st is None:
            return
        if kmsg.id == direct.CHANNEL_MARKER and kmsg.sender_uid < 0:
            for ch in st.channels:
                if ch.marker is kmsg:
                    ch.marker = None
                    st.markers -= 1
        self._publish(port)

    def receiver_leaving(self, port: Port) -> None:
        """The port's channels, and those bound to it as reply port, are torn down."""
        for ch in [*self._channels(port), *self.by_reply.get(port, ())]:
            self._teardown(ch)

    def changed(self, port: Port) -> None:
        """Enabled: its channels are torn down; else publish (backlog)."""
        if port.enabled:
            for ch in list(self._channels(port)):
                self._teardown(ch)
        self._publish(port)

    def holder_removed(self, port: Port, space: IpcSpace) -> None:
        """A receiver or sender that loses its name for a channel's reply port loses the
        channel; so does a sender that loses its name for the channel's port (its right
        was given up, or taken: port_extract_right; or its task died)."""
        for ch in list(self.by_reply.get(port, ())):
            if space in (ch.receiver.space, ch.sender.space):
                self._teardown(ch)
        for ch in list(self._channels(port)):
            if ch.sender.space is space:
                self._teardown(ch)


    def extra_messages(self, port: Port) -> int:
        """Messages on the port's channels, minus its queued markers."""
        st = self.ports.get(port)
        if st is None:
            return 0
        limit = DATA_MAX  # a page's counters are the tasks' word: bounded
        on_channels = sum(min(max(c.view[direct.SENT] - c.view[direct.RECEIVED], 0), limit)
                          for c in st.channels)
        return on_channels - st.markers

    def internal_messages(self, port: Port) -> int:
        """The markers queued on the port (they take no room in its backlog)."""
        st = self.ports.get(port)
        return st.markers if st is not None else 0


def take_all(end: socket.socket) -> bytes:
    """Everything left on a shut channel (at most DRAIN_BYTES), in ONE read: the
    kernel reads a stream under its read lock, so a reader of the receiver's task takes
    a whole frame before it or nothing after it (module docstring). Nothing is written
    to a shut channel, so what FIONREAD counts is all there is (or less, if the receiver
    took a frame meanwhile)."""
    try:
        queued = struct.unpack("i", fcntl.ioctl(end.fileno(), termios.FIONREAD,
                                                b"\0\0\0\0"))[0]
        return end.recv(min(queued, DRAIN_BYTES), socket.MSG_DONTWAIT) if queued > 0 else b""
    except OSError:
        return b""


def _room_for_frames(sender_end: socket.socket) -> None:
    """Make the sender's send buffer hold whole frames: a send of one frame is queued
    whole only while the buffer's half holds it (a small net.core.wmem_default would
    let a frame go out in part). The sender may shrink it later: its own loss."""
    with contextlib.suppress(OSError):
        if sender_end.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < 4 * direct.FRAME_MAX:
            sender_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * direct.FRAME_MAX)


def discard_rest(end: socket.socket) -> int:
    """After `take_all`: read and drop whatever a shut channel still holds (a stream
    read stops at a message carrying descriptors or at an urgent mark, which no honest
    sender writes, and at DRAIN_BYTES), so the old receiver never reads it after the
    teardown; returns the bytes dropped (bounded: DISCARD_READS reads)."""
    dropped = 0
    for _ in range(DISCARD_READS):
        try:
            data = end.recv(DRAIN_BYTES, socket.MSG_DONTWAIT)
        except OSError:
            break
        if not data:
            break
        dropped += len(data)
    return dropped


def _discard(ch: DirectChannel, fds: list[int]) -> None:
    """Close what a channel never registered holds, and the descriptors `fds`."""
    ch.end.close()
    ch.view.release()
    ch.page.close()
    for fd in [ch.page_fd, *fds]:
        with contextlib.suppress(OSError):
            os.close(fd)
