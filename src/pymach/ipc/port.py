"""Ports: kernel-protected message queues with one receiver, one owner, many senders (3.2).

A `Port` is the kernel's object; tasks only ever see names for it in their own spaces.
All fields are guarded by the kernel lock.

Invariants of a live port:
- its receive right is held by exactly one task (`receiver`) or travels in exactly one
  queued message (`receiver is None`, `receive_in_transit`);
- likewise for ownership (`owner`, `ownership_in_transit`), except that a port whose
  ownership was destroyed while its receive right travelled has no owner until that
  right arrives, and then its receiver becomes its owner too;
- `holders` maps every space that has a name for the port to that name;
- `len(queue) <= backlog` for messages sent by tasks (the kernel's own messages, replies
  and notifications, are never refused).
A dead port has no holders, an empty queue and no receiver or owner.

Observers: a host may set `observer` (a `PortObserver`) on a port to learn, with the
kernel lock held, of what happens to it that something outside the kernel depends on
(machd's direct channels between native tasks, machd/channels.py): a message queued or
dequeued, the receive right about to leave its task or the port about to die (while
its queue is still there), the port enabled or its backlog changed, a space losing its
name for it. `message_count` is what port_status reports: the queue, plus what the
observer says is queued elsewhere (and minus the observer's own internal messages).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from pymach.include.message import PORT_BACKLOG_DEFAULT
from pymach.kern.sched_prim import WaitQueue

if TYPE_CHECKING:
    from pymach.ipc.kmsg import KMsg
    from pymach.ipc.space import IpcSpace
    from pymach.kern.host import Kernel
    from pymach.kern.sched_prim import Scheduler
    from pymach.kern.task import Task

class PortObserver(Protocol):
    """What a host that keeps state for a port is told (kernel lock held; see module
    docstring). Each call may change the port's queue only as documented."""

    def enqueued(self, port: Port, kmsg: KMsg) -> None:
        """`kmsg` was appended to the port's queue."""
        ...

    def dequeued(self, port: Port, kmsg: KMsg) -> None:
        """`kmsg` was taken from the head of the port's queue for receipt."""
        ...

    def receiver_leaving(self, port: Port) -> None:
        """The receive right is about to leave its task, or the port to die; the
        observer may put messages back into the queue, which goes with the port."""
        ...

    def changed(self, port: Port) -> None:
        """The port was enabled or disabled, or its backlog set."""
        ...

    def holder_removed(self, port: Port, space: IpcSpace) -> None:
        """`space` no longer names the port."""
        ...

    def extra_messages(self, port: Port) -> int:
        """Messages for the port held outside its queue, minus internal ones in it."""
        ...

    def internal_messages(self, port: Port) -> int:
        """Messages in the port's queue that are the host's own (they take no room)."""
        ...


class Port:
    """The kernel structure behind a port (see module docstring for invariants)."""

    def __init__(self, kernel: Kernel, label: str = "") -> None:
        self.kernel = kernel  # immutable
        self.sched: Scheduler = kernel.sched  # immutable
        self.serial = kernel.new_serial("port")
        self.label = label  # what the port stands for, for reports
        # The host where the real port lives, when this is a proxy that the host's
        # network message server made for a port of another host ("": a local port);
        # set by that server, kernel lock; for reports (ps, lsmp, vmmap).
        self.remote_host = ""
        self.receiver: Task | None = None
        self.owner: Task | None = None
        self.receive_in_transit = False
        self.ownership_in_transit = False
        self.kobject: object | None = None  # Task/Thread/Host this kernel port stands for
        self.queue: deque[KMsg] = deque()
        self.backlog = PORT_BACKLOG_DEFAULT
        self.enabled = False  # in the receiver's default group
        self.dead = False
        self.holders: dict[IpcSpace, int] = {}
        # Kernel structures that hold this port outside any name space (a VM object's
        # memory object port) are told of its death here, with the kernel lock held.
        self.death_hooks: list[Callable[[Port], None]] = []
        # ... and of each change of its receiver (the right arrived in a task, left one
        # for a message, or the port died): `port_receiver_changed`, kernel lock held.
        self.receiver_hooks: list[Callable[[Port], None]] = []
        self.observer: PortObserver | None = None  # see module docstring
        self.send_waitq = WaitQueue(self.sched.lock, f"port{self.serial}.send")
        self.rcv_waitq = WaitQueue(self.sched.lock, f"port{self.serial}.rcv")

    @property
    def is_kernel_port(self) -> bool:
        """True for ports that stand for kernel objects (tasks, threads, the host)."""
        return self.kobject is not None

    def message_count(self) -> int:
        """The messages waiting for the receiver (port_status; see module docstring)."""
        observer = self.observer
        extra = observer.extra_messages(self) if observer is not None else 0
        return max(0, len(self.queue) + extra)

    def queue_full(self) -> bool:
        """True when a task's message would have to wait for room (the host's own
        messages in the queue take none)."""
        observer = self.observer
        internal = observer.internal_messages(self) if observer is not None else 0
        return len(self.queue) - internal >= self.backlog

    def __repr__(self) -> str:
        state = "dead" if self.dead else f"q={len(self.queue)}"
        return f"<Port {self.serial} {self.label} {state}>"


def port_receiver_changed(port: Port) -> None:
    """The port's receiver (or `receive_in_transit`) just changed: tell its receiver
    hooks (kernel lock held)."""
    for hook in port.receiver_hooks:
        hook(port)
