"""Per-task IPC name spaces: a task's names for the ports it holds rights to (3.2).

A port name means something only in the space that holds it; the same number in another
task names another port or nothing. Names are never reused within a space, so a stale
name fails with KERN_INVALID_NAME instead of reaching some other port.

Invariants (kernel lock): a space has at most one name per port; an entry holds at least
one right (send, receive or ownership); `entry.port.holders[space] == name` for every
entry; an entry with receive rights is the port's `receiver`'s entry. `ready` holds
every port of the task's default group whose queue holds messages (enabled, received
here, not empty), and maybe ports that no longer are: it is marked by whoever makes a
port ready (mqueue_enqueue, port_enable) and pruned when read (`ready_ports`), so a
group receive looks at the ports with messages, not at every name of the space.
`ready_heap` orders them by the sequence number of their head message (`mark_head`:
each head gets an entry when it becomes the head), so a group receive takes the oldest
in O(log n) (`group_select`; `heaped` keeps each port to one entry for its current
head, so an entry whose head has moved on is dropped when met, or refreshed if the
port has none (a requeue that lowers a head and a receive that raises it again may
leave a second entry for one head: dropped when met too); the heap is rebuilt from
`ready`, and `ready` pruned, when stale entries outnumber the live). A dead space's
tables are emptied (`clear_ready`).

Limits (kernel resources one task can make the kernel hold):
- names: a space holds at most `names_max` names (the kernel's `port_names_max`, None
  for the kernel's own servers). Only the calls a task makes to grow its space check it:
  port_allocate (KERN_NO_SPACE) and receiving rights (RCV_IPC_SPACE, message left
  queued). The kernel's own insertions (a task's special ports, rights handed back by
  the transfer rules, which reuse the name the task already has) never fail.
- out-of-line memory: `ool_queued` is the bytes of out-of-line memory in messages this
  task sent that still sit in queues (charged and released by ipc/kmsg.py).
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pymach.errors import MachError
from pymach.kern.sched_prim import WaitQueue

if TYPE_CHECKING:
    from pymach.ipc.port import Port
    from pymach.kern.lock import KernelLock
    from pymach.kern.task import Task

# Default port_names_max. Above the rights one message can carry (msg_size_max / 4 with
# the default msg_size_max), so a single message always fits a space that is not full.
PORT_NAMES_MAX = 4096


def check_port_names_max(value: object) -> int:
    """Validate the port_names_max boot parameter (an int >= 16); return it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 16:
        raise MachError("KERN_INVALID_ARGUMENT", f"port_names_max must be an int >= 16, "
                        f"not {value!r}")
    return value


_ENTRIES = itertools.count()  # tie-breaks of ready_heap entries (never equal)


@dataclass
class IpcEntry:
    """One name's rights: a send right, receive rights, ownership rights."""

    port: Port
    send: bool = False
    receive: bool = False
    owner: bool = False

    @property
    def can_send(self) -> bool:
        """Receive and ownership rights imply the right to send (Mach 2.5)."""
        return self.send or self.receive or self.owner

    def rights_text(self) -> str:
        """'send', 'recv', 'own' joined by '+', for reports."""
        parts = [n for n, h in (("recv", self.receive), ("own", self.owner), ("send", self.send))
                 if h]
        return "+".join(parts)


class IpcSpace:
    """A task's port name space. Guarded by the kernel lock."""

    def __init__(self, task: Task, lock: KernelLock) -> None:
        self.task = task
        self.names: dict[int, IpcEntry] = {}
        self._next_name = 1  # every name below it has been used (names are never reused)
        self.active = True
        self.group_waitq = WaitQueue(lock, f"task{task.serial}.group")
        self.names_max: int | None = task.kernel.port_names_max  # None: no limit
        self.ool_queued = 0  # bytes of out-of-line memory this task has queued
        self.ready: dict[Port, None] = {}  # default-group ports that may hold messages
        self.ready_heap: list[tuple[int, int, Port]] = []  # (head seqno, a unique
        # tie-break, port); a port's stale entries stay until met
        self.heaped: dict[Port, int] = {}  # port -> the seqno of its newest heap entry

    def check_room(self, new_names: int, code: str, note: str = "") -> None:
        """Raise `code` (its detail ending with `note`) unless `new_names` more names fit
        under `names_max`."""
        limit = self.names_max
        if limit is not None and len(self.names) + new_names > limit:
            raise MachError(code, f"task {self.task.name!r} holds {len(self.names)} port "
                            f"names; {new_names} more would pass the limit of {limit} "
                            f"(port_names_max){note}")

    def lookup(self, name: object, code: str = "KERN_INVALID_NAME") -> IpcEntry:
        """The entry for `name`; raise `code` if the task holds no right by that name."""
        if type(name) is int:  # the common case: one dict lookup
            found = self.names.get(name)
            if found is not None:
                return found
        if not isinstance(name, int) or isinstance(name, bool):
            raise MachError("KERN_INVALID_ARGUMENT", f"port name must be an int, not {name!r}")
        entry = self.names.get(name)
        if entry is None:
            raise MachError(code, f"task {self.task.name!r} holds no port named {name}")
        return entry

    def name_of(self, port: Port) -> int | None:
        """This space's name for `port`, or None."""
        return port.holders.get(self)

    def insert(self, port: Port, send: bool = False, receive: bool = False,
               owner: bool = False, name: int | None = None) -> int:
        """Add rights for `port`, reusing this space's name for it if it has one; a new
        name is the next unused one, or `name` if given (see `check_new_name`)."""
        known = port.holders.get(self)
        if name is not None and known not in (None, name):
            raise MachError("KERN_NAME_EXISTS", f"task {self.task.name!r} names this port "
                            f"{known} already, not {name}")
        if known is None:
            name = self.new_name(name)
            self.names[name] = IpcEntry(port)
            port.holders[self] = name
        else:
            name = known
        entry = self.names[name]
        entry.send |= send
        entry.receive |= receive
        entry.owner |= owner
        return name

    def check_new_name(self, name: object, port: Port) -> None:
        """Raise unless `name` may be given to `port` here: a positive int that names
        `port` already, or one this space has never used (KERN_NAME_EXISTS if it names
        another port; KERN_INVALID_NAME if it did once: names are never reused, so a
        name that is gone always means a dead port)."""
        if not isinstance(name, int) or isinstance(name, bool) or name <= 0:
            raise MachError("KERN_INVALID_ARGUMENT", f"a port name is an int > 0, not "
                            f"{name!r:.40}")
        entry = self.names.get(name)
        if entry is not None and entry.port is not port:
            raise MachError("KERN_NAME_EXISTS", f"task {self.task.name!r} uses name "
                            f"{name} for another port")
        if entry is None and name < self._next_name:
            raise MachError("KERN_INVALID_NAME", f"task {self.task.name!r} used name "
                            f"{name} before: names are never reused")

    def new_name(self, name: int | None = None) -> int:
        """The next unused name, or `name` (checked by check_new_name), after which
        names continue."""
        if name is None:
            name = self._next_name
        self._next_name = max(self._next_name, name + 1)
        return name

    def remove(self, name: int) -> IpcEntry:
        """Drop the name and all its rights from the space (no port-side effects)."""
        entry = self.names.pop(name)
        port = entry.port
        port.holders.pop(self, None)
        if port.observer is not None:
            port.observer.holder_removed(port, self)
        return entry

    def drop_if_empty(self, name: int) -> None:
        """Remove `name` once it holds no right."""
        entry = self.names.get(name)
        if entry is not None and not (entry.send or entry.receive or entry.owner):
            self.remove(name)

    def mark_ready(self, port: Port) -> None:
        """The enabled port `port` of this task may hold messages (kernel lock held)."""
        self.ready[port] = None
        self.mark_head(port)

    def mark_head(self, port: Port) -> None:
        """`port`'s head message is new (or its sequence number changed): ordered by it
        for the group receive, if the port is in the group's ready set."""
        if not port.queue or port not in self.ready:
            return
        seqno = port.queue[0].seqno
        if self.heaped.get(port) == seqno:  # (its entry is in the heap)
            return
        self.heaped[port] = seqno
        heap = self.ready_heap
        heapq.heappush(heap, (seqno, next(_ENTRIES), port))
        if len(heap) > 4 * len(self.ready) + 64:  # mostly stale: rebuild (and prune
            task = self.task  # `ready`: a port left out of the heap would stay in it)
            live = [p for p in self.ready if p.queue and p.enabled and p.receiver is task]
            self.ready = dict.fromkeys(live)
            self.ready_heap = [(p.queue[0].seqno, next(_ENTRIES), p) for p in live]
            heapq.heapify(self.ready_heap)
            self.heaped = {p: p.queue[0].seqno for p in live}

    def clear_ready(self) -> None:
        """The task died: forget the group's ports (kernel lock held)."""
        self.ready, self.ready_heap, self.heaped = {}, [], {}

    def group_select(self) -> Port | None:
        """The port of the default group whose head message is oldest, or None: the
        heap's first live entry (see module docstring)."""
        heap, ready, task, heaped = self.ready_heap, self.ready, self.task, self.heaped
        while heap:
            seqno, _, port = heap[0]
            live = port in ready and port.queue and port.enabled and port.receiver is task
            head = port.queue[0].seqno if live else None
            if head == seqno:
                return port
            if head is not None and heaped.get(port) != head:  # (head moved on: the
                heapq.heapreplace(heap, (head, next(_ENTRIES), port))  # entry follows)
                heaped[port] = head
                continue
            heapq.heappop(heap)  # (stale: the port has its entry, or is not ready)
            if heaped.get(port) == seqno:
                del heaped[port]
            if not live and port in ready:
                del ready[port]
        return None

    def ready_ports(self) -> list[Port]:
        """The ports of this task's default group (enabled ports it receives on) whose
        queues hold messages, in no particular order; `ready` is pruned of the rest."""
        ready, task = self.ready, self.task
        stale = [p for p in ready if not (p.queue and p.enabled and p.receiver is task)]
        for port in stale:
            del ready[port]
        return list(ready)
