"""Property-based tests of the IPC semantics (paper 3.1-3.2, Mach 2.5 rules).

a. Rights conservation, model-based: a hypothesis state machine drives the bootstrap task
   and a few worker tasks (each a real Mach thread executing commands sent to it in
   messages) through allocations, sends that carry rights, receives, deallocations,
   backlog changes, timed-out sends and task terminations; after every step the kernel's
   state must equal a plain Python model of who holds which right and which rights ride
   in which queued message, and every holder must have got exactly the expected
   notifications.
b. Per-sender FIFO order through a small backlog, under both schedulers.
c. Backlog limits and send timeouts: a refused send leaves the sender's rights intact.
d. Port death in every state of the port, with waiters, notifications and carried rights.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import pymach as m
from pymach import Disposition, MachError
from pymach.include.message import Code
from pymach.ipc.kmsg import KPort, KPortArray
from pymach.kern.host import Kernel
from pymach.kern.task import Task
from pymach.kern.thread import current_thread

PROPS = settings(max_examples=25, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEW = settings(PROPS, max_examples=8)

HELLO, CMD, DONE = 7001, 7002, 7003
WAIT_MS = 20_000  # an upper bound for "soon"; a hang fails instead of blocking the suite
BOOT = 0  # the actor number of the bootstrap task

COPY_SEND, MAKE_SEND, MOVE_SEND = m.COPY_SEND, m.MAKE_SEND, m.MOVE_SEND
MOVE_RECEIVE, MOVE_OWNERSHIP, MOVE_ALL = m.MOVE_RECEIVE, m.MOVE_OWNERSHIP, m.MOVE_ALL
RECV_KINDS = (MOVE_RECEIVE, MOVE_ALL)
OWN_KINDS = (MOVE_OWNERSHIP, MOVE_ALL)
ARRIVES_AS = {COPY_SEND: MOVE_SEND, MAKE_SEND: MOVE_SEND, MOVE_SEND: MOVE_SEND,
              MOVE_RECEIVE: MOVE_RECEIVE, MOVE_OWNERSHIP: MOVE_OWNERSHIP, MOVE_ALL: MOVE_ALL}
DELETED, RECEIVE_RIGHTS, OWNERSHIP_RIGHTS = (
    m.NOTIFY_PORT_DELETED, m.NOTIFY_RECEIVE_RIGHTS, m.NOTIFY_OWNERSHIP_RIGHTS)


# --------------------------------------------------------------------------------------
# Operations, run in the thread of the acting task (directly for the bootstrap task, by a
# worker for the others). `got` is the list of (name, disposition) of the rights that
# arrived with the command.

def op_got(got: list[tuple[int, Disposition]]) -> list[tuple[int, Disposition]]:
    return got


def op_alloc(got: Any) -> int:
    return m.port_allocate(m.task_self())


def op_send(got: Any, dest: int, reply: int, rdisp: Disposition | None,
            items: list[tuple[int, Disposition]], mid: int, timeout: float | None = 0) -> None:
    msg = m.Message(dest, reply, mid, [m.Port(n, d) for n, d in items],
                    local_disposition=rdisp)
    if timeout is None:
        m.msg_send(msg)
    else:
        m.msg_send(msg, m.SEND_TIMEOUT, timeout)


def op_recv(got: Any, name: int, timeout: float | None = 0) -> tuple[Any, ...]:
    msg = (m.msg_receive(name) if timeout is None
           else m.msg_receive(name, m.RCV_TIMEOUT, timeout))
    return (msg.id, msg.local_port, msg.remote_port,
            [(i.name, i.disposition) for i in msg.items if isinstance(i, m.Port)])


def op_dealloc(got: Any, name: int) -> None:
    m.port_deallocate(m.task_self(), name)


def op_backlog(got: Any, name: int, backlog: int) -> None:
    m.port_set_backlog(m.task_self(), name, backlog)


def op_status(got: Any, name: int) -> tuple[Any, ...]:
    return tuple(m.port_status(m.task_self(), name))


def op_drain(got: Any) -> list[tuple[int, int]]:
    """Receive everything queued on the task's notify port: (id, name) pairs."""
    note = m.task_notify()
    out = []
    while True:
        try:
            msg = m.msg_receive(note, m.RCV_TIMEOUT, 0)
        except m.RcvError as e:
            assert e.code == "RCV_TIMED_OUT"
            return out
        assert len(msg.items) == 1 and isinstance(msg.items[0], m.Int)
        out.append((msg.id, msg.items[0].value))


def _hear_every_notification() -> None:
    """The calling task's notify port holds PORT_BACKLOG_MAX notifications, more than
    one step of these scenarios causes: the models do not model NOTIFY_OVERFLOW."""
    m.port_set_backlog(m.task_self(), m.task_notify(), m.PORT_BACKLOG_MAX)


def _worker_main(world: World, actor: int) -> None:
    """A worker task's thread: announce a command port, then execute commands forever."""
    bootstrap = m.task_get_special_port(m.task_self(), m.TASK_BOOTSTRAP_PORT)
    _hear_every_notification()
    cmd = m.port_allocate(m.task_self())
    m.msg_send(m.Message(bootstrap, cmd, HELLO, [m.Int(actor)]))
    while True:
        req = m.msg_receive(cmd)
        code = req.items[0]
        assert req.id == CMD and isinstance(code, Code)
        got = [(i.name, i.disposition) for i in req.items[1:] if isinstance(i, m.Port)]
        try:
            out: tuple[str, Any] = ("ok", code.fn(got, *code.args))
        except MachError as e:
            out = ("err", e.code)
        world.results[actor] = out
        m.msg_send(m.Message(req.remote_port, id=DONE, items=[m.Int(actor)]))


class World:
    """The bootstrap task plus worker tasks that run operations on its behalf."""

    def __init__(self, k: Kernel) -> None:
        self.k = k
        self.boot: Task = current_thread().task
        me = m.task_self()
        self.reply = m.port_allocate(me)  # DONE messages from workers arrive here
        self.idle = m.port_allocate(me)  # never gets a message: for letting time pass
        registry = m.port_allocate(me)
        m.task_set_special_port(me, m.TASK_BOOTSTRAP_PORT, registry)
        self.registry = registry
        self.tasks: dict[int, Task] = {BOOT: self.boot}
        self.task_names: dict[int, int] = {}  # actor -> bootstrap's name for its task port
        self.cmd: dict[int, int] = {}  # actor -> bootstrap's name for its command port
        self.results: dict[int, tuple[str, Any]] = {}
        self._done: set[int] = set()

    def add_worker(self, actor: int) -> None:
        tname = m.task_create(m.task_self())
        with self.k.sched.lock:
            task = self.boot.space.names[tname].port.kobject
        assert isinstance(task, Task)
        m.thread_create(tname, _worker_main, self, actor)
        hello = m.msg_receive(self.registry, m.RCV_TIMEOUT, WAIT_MS)
        assert (hello.id, hello.values()) == (HELLO, [actor])
        self.tasks[actor] = task
        self.task_names[actor] = tname
        self.cmd[actor] = hello.remote_port

    def terminate(self, actor: int) -> None:
        m.task_terminate(self.task_names.pop(actor))
        del self.cmd[actor]

    def start(self, actor: int, fn: Callable[..., Any], *args: Any,
              carry: list[tuple[int, Disposition]] = ()) -> None:  # type: ignore[assignment]
        """Send a command to worker `actor`; raises (nothing sent) if copyin fails."""
        items: list[Any] = [Code(fn, args)] + [m.Port(n, d) for n, d in carry]
        m.msg_send(m.Message(self.cmd[actor], self.reply, CMD, items))

    def finish(self, actor: int) -> tuple[str, Any]:
        """Wait for worker `actor` to finish its command; ("ok", value) or ("err", code)."""
        while actor not in self._done:
            msg = m.msg_receive(self.reply, m.RCV_TIMEOUT, WAIT_MS)
            assert msg.id == DONE
            self._done.add(msg.items[0].value)  # type: ignore[union-attr]
        self._done.discard(actor)
        return self.results.pop(actor)

    def call(self, actor: int, fn: Callable[..., Any], *args: Any,
             carry: list[tuple[int, Disposition]] = ()) -> tuple[str, Any]:  # type: ignore[assignment]
        """Run fn in `actor`'s task and return ("ok", value) or ("err", code)."""
        if actor == BOOT:
            assert not carry
            try:
                return ("ok", fn([], *args))
            except MachError as e:
                return ("err", e.code)
        try:
            self.start(actor, fn, *args, carry=carry)
        except MachError as e:
            return ("err", e.code)
        return self.finish(actor)

    def ok(self, actor: int, fn: Callable[..., Any], *args: Any,
           carry: list[tuple[int, Disposition]] = ()) -> Any:  # type: ignore[assignment]
        status, value = self.call(actor, fn, *args, carry=carry)
        assert status == "ok", value
        return value

    def kport(self, actor: int, name: int) -> Any:
        with self.k.sched.lock:
            return self.tasks[actor].space.names[name].port

    def name_in(self, actor: int, kp: Any) -> int | None:
        with self.k.sched.lock:
            return kp.holders.get(self.tasks[actor].space)

    def settle(self, pred: Callable[[], bool], limit_ms: float = WAIT_MS) -> None:
        """Let other threads run (virtual or real time passes) until pred() holds."""
        waited = 0
        while True:
            with self.k.sched.lock:
                if pred():
                    return
            assert waited < limit_ms, "condition not reached"
            try:
                m.msg_receive(self.idle, m.RCV_TIMEOUT, 1)
            except m.RcvError as e:
                assert e.code == "RCV_TIMED_OUT"
            waited += 1

    def blocked_on(self, actor: int, waitq_of: Callable[[], Any]) -> bool:
        """(Kernel lock held.) True if actor's first thread waits on the given queue."""
        threads = self.tasks[actor].threads
        return bool(threads) and threads[0].wait_queue is waitq_of()


def global_invariants(k: Kernel) -> None:
    """Kernel-wide invariants that hold whatever the program did (kernel lock taken)."""
    with k.sched.lock:
        receive: Counter[Any] = Counter()
        owner: Counter[Any] = Counter()
        live_ports = set()
        for task in k.tasks.values():
            assert task.active
            for name, e in task.space.names.items():
                assert e.send or e.receive or e.owner, "an entry holds at least one right"
                assert not e.port.dead, f"dead port {e.port} still named in {task.name}"
                assert e.port.holders.get(task.space) == name
                live_ports.add(e.port)
                receive[e.port] += e.receive
                owner[e.port] += e.owner
                if e.receive:
                    assert e.port.receiver is task
                if e.owner:
                    assert e.port.owner is task
        # Rights also ride in queued messages, on ports that may be reachable only
        # through other queued messages: walk the queues transitively.
        todo = list(live_ports)
        while todo:
            for kmsg in todo.pop().queue:
                for item in kmsg.items:
                    kports = ([item.port] if isinstance(item, KPort) else
                              item.ports if isinstance(item, KPortArray) else [])
                    for p in kports:
                        if p is None or p.dead:
                            continue
                        receive[p] += item.kind in RECV_KINDS  # type: ignore[union-attr]
                        owner[p] += item.kind in OWN_KINDS  # type: ignore[union-attr]
                        if p not in live_ports:
                            live_ports.add(p)
                            todo.append(p)
        for port in live_ports:
            if port.is_kernel_port:
                continue
            for space, name in port.holders.items():
                assert space.names[name].port is port
            if port.receiver is not None:
                assert receive[port] == 1, f"{port}: {receive[port]} receive rights"
            elif port.receive_in_transit:  # the message may sit in a cycle of ports whose
                # receive rights ride in each other's queues, unreachable from any task
                # (Mach leaks such cycles too): then this walk does not see it
                assert receive[port] <= 1, f"{port}: {receive[port]} receive rights"
            assert owner[port] <= 1


# --------------------------------------------------------------------------------------
# a. The model of rights


@dataclass
class PortM:
    receiver: int | None
    owner: int | None
    recv_msg: int | None = None  # id of the queued message carrying the receive right
    own_msg: int | None = None  # likewise for ownership
    dead: bool = False
    queue: list[int] = field(default_factory=list)
    backlog: int = m.PORT_BACKLOG_DEFAULT


@dataclass
class MsgM:
    dest: int
    reply: int | None  # port id of the send right in the reply field
    items: list[tuple[int, Disposition]]  # (port id, how it arrives)


class Model:
    """Who holds which right to which test port; what rides in which queued message."""

    def __init__(self) -> None:
        self.ports: dict[int, PortM] = {}
        self.names: dict[tuple[int, int], int] = {}  # (actor, pid) -> name
        self.send: set[tuple[int, int]] = set()  # (actor, pid) with the send bit
        self.history: dict[tuple[int, int], int] = {}  # (actor, name) -> pid, ever
        self.alive: set[int] = {BOOT}
        self.notes: dict[int, Counter[tuple[int, int]]] = defaultdict(Counter)
        self.msgs: dict[int, MsgM] = {}
        self._pids = itertools.count(1)

    # -- queries --
    def holds(self, a: int, p: int) -> bool:
        return (a, p) in self.names

    def rights(self, a: int, p: int) -> tuple[bool, bool, bool]:
        P = self.ports[p]
        return ((a, p) in self.send, P.receiver == a, P.owner == a)

    def stale_names(self, a: int) -> list[int]:
        held = {n for (b, _), n in self.names.items() if b == a}
        return sorted(n for (b, n) in self.history if b == a and n not in held)

    # -- bookkeeping --
    def record_name(self, a: int, p: int, name: int) -> None:
        if (a, p) in self.names:
            assert self.names[(a, p)] == name, "a space has one name per port"
            return
        assert name > 0
        assert (a, name) not in self.history, f"name {name} reused in actor {a}'s space"
        previous = [n for (b, n) in self.history if b == a]
        assert name > max(previous, default=0), "names are handed out in increasing order"
        self.names[(a, p)] = name
        self.history[(a, name)] = p

    def drop(self, a: int, p: int) -> int:
        self.send.discard((a, p))
        return self.names.pop((a, p))

    def tidy(self, a: int, p: int) -> None:
        if (a, p) in self.names and not any(self.rights(a, p)):
            self.drop(a, p)

    def notify(self, a: int, note: int, p: int) -> None:
        if a in self.alive:
            self.notes[a][(note, p)] += 1

    # -- the rules of Mach 2.5 --
    def allocate(self, a: int, name: int) -> int:
        p = next(self._pids)
        self.ports[p] = PortM(receiver=a, owner=a)
        self.record_name(a, p, name)
        self.send.add((a, p))
        return p

    def destroy(self, p: int) -> None:
        P = self.ports[p]
        if P.dead:
            return
        P.dead = True
        P.receiver = P.owner = P.recv_msg = P.own_msg = None
        for (a, q) in list(self.names):
            if q == p:
                self.drop(a, p)
                self.notify(a, DELETED, p)
        queue, P.queue = P.queue, []
        for mid in queue:
            for q, kind in self.msgs.pop(mid).items:
                self.release(q, kind)

    def release(self, q: int, kind: Disposition) -> None:
        """A right riding in a destroyed message is given up."""
        if self.ports[q].dead:
            return
        if kind == MOVE_ALL:
            self.destroy(q)
        elif kind == MOVE_RECEIVE:
            self.receive_lost(q)
        elif kind == MOVE_OWNERSHIP:
            self.ownership_lost(q)

    def receive_lost(self, p: int) -> None:
        P = self.ports[p]
        P.receiver = P.recv_msg = None
        if P.owner is not None and P.owner in self.alive:
            P.receiver = P.owner
            self.send.add((P.owner, p))
            self.notify(P.owner, RECEIVE_RIGHTS, p)
        else:
            self.destroy(p)

    def ownership_lost(self, p: int) -> None:
        P = self.ports[p]
        P.owner = P.own_msg = None
        if P.receiver is not None and P.receiver in self.alive:
            P.owner = P.receiver
            self.send.add((P.receiver, p))
            self.notify(P.receiver, OWNERSHIP_RIGHTS, p)
        elif P.recv_msg is None:
            self.destroy(p)

    def deallocate(self, a: int, p: int) -> None:
        _, rcv, own = self.rights(a, p)
        self.drop(a, p)
        if rcv and own:
            self.destroy(p)
        elif rcv:
            self.receive_lost(p)
        elif own:
            self.ownership_lost(p)

    def terminate(self, a: int) -> None:
        self.alive.discard(a)
        self.notes.pop(a, None)
        for _name, p in sorted((n, p) for (b, p), n in self.names.items() if b == a):
            if (a, p) in self.names:
                self.deallocate(a, p)

    def reply_disposition(self, a: int, p: int, rdisp: Disposition | None) -> Disposition:
        if rdisp is not None:
            return rdisp
        return MAKE_SEND if self.ports[p].receiver == a else COPY_SEND

    def check_rights(self, a: int, reply: int | None, rdisp: Disposition | None,
                     items: list[tuple[int, Disposition]], dest: int | None) -> str | None:
        """Copyin's all-or-nothing check of a message's rights; the error code or None."""
        scratch: dict[int, list[bool]] = {}

        def ok(p: int, disp: Disposition) -> bool:
            if not self.holds(a, p):
                return False
            s = scratch.setdefault(p, list(self.rights(a, p)))
            allowed = {COPY_SEND: any(s), MAKE_SEND: s[1], MOVE_SEND: s[0],
                       MOVE_RECEIVE: s[1], MOVE_OWNERSHIP: s[2], MOVE_ALL: s[1] and s[2]}[disp]
            if allowed:
                if disp == MOVE_SEND:
                    s[0] = False
                if disp in RECV_KINDS:
                    s[0], s[1] = True, False
                if disp in OWN_KINDS:
                    s[0], s[2] = True, False
            return allowed

        if reply is not None and not ok(reply, self.reply_disposition(a, reply, rdisp)):
            return "SEND_INVALID_PORT"
        for p, d in items:
            if not ok(p, d) or (p == dest and d in RECV_KINDS):
                return "SEND_INVALID_RIGHT"
        return None

    def predict_send(self, a: int, dest: int, reply: int | None, rdisp: Disposition | None,
                     items: list[tuple[int, Disposition]]) -> str | None:
        if not self.holds(a, dest):
            return "SEND_INVALID_PORT"
        P = self.ports[dest]
        if len(P.queue) >= P.backlog:
            return "SEND_TIMED_OUT"  # waiting comes before copyin
        return self.check_rights(a, reply, rdisp, items, dest)

    def take(self, a: int, p: int, disp: Disposition, mid: int) -> None:
        P = self.ports[p]
        if disp == MOVE_SEND:
            self.send.discard((a, p))
        if disp in RECV_KINDS:
            P.receiver, P.recv_msg = None, mid
            self.send.add((a, p))
        if disp in OWN_KINDS:
            P.owner, P.own_msg = None, mid
            self.send.add((a, p))
        self.tidy(a, p)

    def copyin(self, a: int, reply: int | None, rdisp: Disposition | None,
               items: list[tuple[int, Disposition]], mid: int) -> MsgM:
        if reply is not None:
            self.take(a, reply, self.reply_disposition(a, reply, rdisp), mid)
        for p, d in items:
            self.take(a, p, d, mid)
        return MsgM(-1, reply, [(p, ARRIVES_AS[d]) for p, d in items])

    def send_msg(self, a: int, dest: int, reply: int | None, rdisp: Disposition | None,
                 items: list[tuple[int, Disposition]], mid: int) -> None:
        msg = self.copyin(a, reply, rdisp, items, mid)
        msg.dest = dest
        self.msgs[mid] = msg
        self.ports[dest].queue.append(mid)

    def put(self, a: int, p: int, kind: Disposition, name: int) -> None:
        """Copyout of one right into a's space under `name` (0: the port died)."""
        P = self.ports[p]
        if P.dead:
            assert name == 0, "a right to a dead port arrives as PORT_NULL"
            return
        self.record_name(a, p, name)
        self.send.add((a, p))
        if kind in RECV_KINDS:
            P.receiver, P.recv_msg = a, None
            if P.owner is None and P.own_msg is None:
                P.owner = a
        if kind in OWN_KINDS:
            P.owner, P.own_msg = a, None

    def predict_receive(self, a: int, p: int) -> str | None:
        if not self.holds(a, p) or self.ports[p].receiver != a:
            return "RCV_INVALID_PORT"
        if not self.ports[p].queue:
            return "RCV_TIMED_OUT"
        return None

    def receive(self, a: int, p: int, got: tuple[Any, ...]) -> None:
        mid = self.ports[p].queue.pop(0)
        msg = self.msgs.pop(mid)
        rid, local, remote, items = got
        assert rid == mid, "FIFO: the head message arrives"
        assert local == self.names[(a, p)]
        if msg.reply is None:
            assert remote == 0
        else:
            self.put(a, msg.reply, MOVE_SEND, remote)
        assert [k for _, k in items] == [k for _, k in msg.items], "rights arrive as MOVE_*"
        for (name, kind), (q, _) in zip(items, msg.items, strict=True):
            self.put(a, q, kind, name)


class RightsMachine(RuleBasedStateMachine):
    """Drive the kernel and the model side by side; compare after every step."""

    deterministic = False

    def __init__(self) -> None:
        super().__init__()
        self.k: Kernel | None = None
        self._boot: Any = None

    @initialize(seed=st.integers(0, 2**16))
    def boot(self, seed: int) -> None:
        self._boot = m.boot(deterministic=self.deterministic, seed=seed)
        self.k = self._boot.__enter__()
        _hear_every_notification()
        self.world = World(self.k)
        self.model = Model()
        self.kports: dict[int, Any] = {}
        self.pid_of: dict[Any, int] = {}
        self.mids = itertools.count(100)
        self.next_actor = 1
        for _ in range(2):
            self._add_worker()
        for a in sorted(self.model.alive) * 2:
            self._allocate(a)

    def teardown(self) -> None:
        if self._boot is not None:
            self._boot.__exit__(None, None, None)

    # -- helpers --
    def _add_worker(self) -> None:
        actor = self.next_actor
        self.next_actor += 1
        self.world.add_worker(actor)
        self.model.alive.add(actor)

    def _actor(self, data: st.DataObject) -> int:
        return data.draw(st.sampled_from(sorted(self.model.alive)), label="actor")

    def _pid(self, data: st.DataObject, preferred: list[int]) -> int:
        if preferred and data.draw(st.integers(0, 4), label="prefer") > 0:
            return data.draw(st.sampled_from(sorted(preferred)), label="pid")
        return data.draw(st.sampled_from(sorted(self.model.ports)), label="pid")

    def _held(self, a: int) -> list[int]:
        return [p for (b, p) in self.model.names if b == a]

    def _name(self, data: st.DataObject, a: int, p: int) -> int:
        """a's name for p, or (if it holds none) a stale name or a name never given."""
        if self.model.holds(a, p):
            return self.model.names[(a, p)]
        return data.draw(st.sampled_from([*self.model.stale_names(a), 99_999]), label="bad")

    # -- rules --
    @rule(data=st.data())
    def allocate(self, data: st.DataObject) -> None:
        self._allocate(self._actor(data))

    def _allocate(self, a: int) -> None:
        name = self.world.ok(a, op_alloc)
        p = self.model.allocate(a, name)
        kp = self.world.kport(a, name)
        self.kports[p] = kp
        self.pid_of[kp] = p

    def _right(self, data: st.DataObject, a: int) -> tuple[int, Disposition]:
        """A (port, disposition) to carry: mostly one that a's rights allow."""
        valid = []
        for p in self._held(a):
            send, rcv, own = self.model.rights(a, p)
            allowed = {COPY_SEND: True, MAKE_SEND: rcv, MOVE_SEND: send, MOVE_RECEIVE: rcv,
                       MOVE_OWNERSHIP: own, MOVE_ALL: rcv and own}
            valid += [(p, d) for d, ok in allowed.items() if ok]
        if valid and data.draw(st.integers(0, 4), label="valid right") > 0:
            return data.draw(st.sampled_from(sorted(valid)), label="right")
        return (data.draw(st.sampled_from(sorted(self.model.ports)), label="pid"),
                data.draw(st.sampled_from(list(Disposition)), label="disposition"))

    @rule(data=st.data())
    def send(self, data: st.DataObject) -> None:
        a = self._actor(data)
        held = self._held(a)
        dest = self._pid(data, held)
        reply = rdisp = None
        if data.draw(st.integers(0, 3), label="with reply") == 0:
            reply = self._pid(data, held)
            rdisp = data.draw(st.sampled_from([None, COPY_SEND, MAKE_SEND, MOVE_SEND]))
        items = [self._right(data, a) for _ in range(data.draw(st.integers(0, 2)))]
        mid = next(self.mids)
        expected = self.model.predict_send(a, dest, reply, rdisp, items)
        result = self.world.call(
            a, op_send, self._name(data, a, dest),
            0 if reply is None else self._name(data, a, reply), rdisp,
            [(self._name(data, a, p), d) for p, d in items], mid)
        if expected is None:
            assert result == ("ok", None)
            self.model.send_msg(a, dest, reply, rdisp, items, mid)
        else:
            assert result == ("err", expected)

    @rule(data=st.data())
    def receive(self, data: st.DataObject) -> None:
        md = self.model
        ready = sorted((P.receiver, p) for p, P in md.ports.items()
                       if P.queue and P.receiver in md.alive)
        if ready and data.draw(st.integers(0, 4), label="ready") > 0:
            a, p = data.draw(st.sampled_from(ready), label="receiver")
        else:
            a = self._actor(data)
            p = self._pid(data, [p for p in self._held(a) if md.ports[p].receiver == a])
        expected = md.predict_receive(a, p)
        result = self.world.call(a, op_recv, self._name(data, a, p))
        if expected is None:
            assert result[0] == "ok", result
            md.receive(a, p, result[1])
        else:
            assert result == ("err", expected)

    @rule(data=st.data())
    def deallocate(self, data: st.DataObject) -> None:
        a = self._actor(data)
        p = self._pid(data, self._held(a))
        held = self.model.holds(a, p)
        result = self.world.call(a, op_dealloc, self._name(data, a, p))
        if held:
            assert result == ("ok", None)
            self.model.deallocate(a, p)
        else:
            assert result == ("err", "KERN_INVALID_NAME")

    @rule(data=st.data(), backlog=st.one_of(st.integers(1, 3), st.sampled_from([0, 16, 17])))
    def set_backlog(self, data: st.DataObject, backlog: int) -> None:
        a = self._actor(data)
        p = self._pid(data, self._held(a))
        result = self.world.call(a, op_backlog, self._name(data, a, p), backlog)
        if not self.model.holds(a, p):
            assert result == ("err", "KERN_INVALID_NAME")
        elif self.model.ports[p].receiver != a:
            assert result == ("err", "KERN_NOT_RECEIVER")
        elif not 1 <= backlog <= m.PORT_BACKLOG_MAX:
            assert result == ("err", "KERN_INVALID_ARGUMENT")
        else:
            assert result == ("ok", None)
            self.model.ports[p].backlog = backlog

    @precondition(lambda self: self.model.ports and len(self.model.alive) > 1)
    @rule(data=st.data())
    def give(self, data: st.DataObject) -> None:
        """The bootstrap task hands rights to a worker in the command message itself."""
        dst = data.draw(st.sampled_from(sorted(self.model.alive - {BOOT})), label="to")
        items2 = [self._right(data, BOOT) for _ in range(data.draw(st.integers(1, 2)))]
        expected = self.model.check_rights(BOOT, None, None, items2, None)
        result = self.world.call(dst, op_got,
                                 carry=[(self._name(data, BOOT, p), d) for p, d in items2])
        if expected is not None:
            assert result == ("err", expected)
            return
        assert result[0] == "ok"
        msg = self.model.copyin(BOOT, None, None, items2, -1)
        got = result[1]
        assert [k for _, k in got] == [k for _, k in msg.items]
        for (name, kind), (q, _) in zip(got, msg.items, strict=True):
            self.model.put(dst, q, kind, name)

    @precondition(lambda self: len(self.model.alive) > 1)
    @rule(data=st.data())
    def terminate(self, data: st.DataObject) -> None:
        a = data.draw(st.sampled_from(sorted(self.model.alive - {BOOT})), label="victim")
        self.world.terminate(a)
        self.model.terminate(a)

    @precondition(lambda self: len(self.model.alive) < 4 and self.next_actor < 6)
    @rule()
    def add_worker(self) -> None:
        self._add_worker()

    # -- the comparison --
    @precondition(lambda self: self.k is not None)
    @invariant()
    def kernel_matches_model(self) -> None:
        assert self.k is not None
        md, world = self.model, self.world
        for a in sorted(md.alive):
            got: Counter[tuple[int, int]] = Counter()
            for note, name in world.ok(a, op_drain):
                p = md.history.get((a, name))
                if p is not None:  # notifications about the harness's own ports are ignored
                    got[(note, p)] += 1
            assert got == md.notes[a], f"notifications of actor {a}"
            md.notes[a].clear()
        global_invariants(self.k)
        with self.k.sched.lock:
            tasks = world.tasks
            actor_of = {tasks[a].space: a for a in md.alive}
            for p, P in md.ports.items():
                kp = self.kports[p]
                if P.dead:
                    assert kp.dead and not kp.holders and not kp.queue
                    assert kp.receiver is None and kp.owner is None
                    continue
                assert not kp.dead, f"port {p} should be alive"
                holders = {actor_of.get(s, s.task.name): n for s, n in kp.holders.items()}
                assert holders == {a: n for (a, q), n in md.names.items() if q == p}
                for a, n in holders.items():
                    e = tasks[a].space.names[n]  # type: ignore[index]
                    assert e.port is kp
                    assert (e.send, e.receive, e.owner) == md.rights(a, p)  # type: ignore[arg-type]
                assert kp.receiver is (None if P.receiver is None else tasks[P.receiver])
                assert kp.owner is (None if P.owner is None else tasks[P.owner])
                assert kp.receive_in_transit == (P.recv_msg is not None)
                assert kp.ownership_in_transit == (P.own_msg is not None)
                assert kp.backlog == P.backlog
                assert [km.id for km in kp.queue] == P.queue
                for km in kp.queue:
                    msg = md.msgs[km.id]
                    assert km.reply is (None if msg.reply is None else self.kports[msg.reply])
                    carried = [(self.pid_of[i.port], i.kind) for i in km.items
                               if isinstance(i, KPort)]
                    assert carried == msg.items
        # The model itself: a right in transit rides in exactly the message it names.
        for p, P in md.ports.items():
            riding = [(mid, kind) for mid, msg in md.msgs.items()
                      for q, kind in msg.items if q == p]
            assert [mid for mid, kind in riding if kind in RECV_KINDS] == (
                [] if P.recv_msg is None else [P.recv_msg])
            if not P.dead:
                assert [mid for mid, kind in riding if kind in OWN_KINDS] == (
                    [] if P.own_msg is None else [P.own_msg])


RightsMachine.TestCase.settings = settings(
    PROPS, max_examples=100, stateful_step_count=40)
TestRightsFree = RightsMachine.TestCase


class DeterministicRightsMachine(RightsMachine):
    deterministic = True


DeterministicRightsMachine.TestCase.settings = settings(
    PROPS, max_examples=60, stateful_step_count=40)
TestRightsDeterministic = DeterministicRightsMachine.TestCase


# --------------------------------------------------------------------------------------
# b. Per-sender ordering


def _thread_sender(port: int, sender: int, count: int) -> None:
    for i in range(count):
        m.msg_send(m.Message(port, id=1, items=[m.Int(sender), m.Int(i)]))


def _task_sender(sender: int, count: int) -> int:
    port = m.task_get_special_port(m.task_self(), m.TASK_BOOTSTRAP_PORT)
    _thread_sender(port, sender, count)
    return count


@settings(PROPS, max_examples=24)
@given(deterministic=st.booleans(), seed=st.integers(0, 2**16),
       threads=st.integers(0, 3), tasks=st.integers(0, 2), count=st.integers(1, 12),
       backlog=st.integers(1, 3))
def test_each_senders_messages_arrive_in_order(deterministic: bool, seed: int, threads: int,
                                               tasks: int, count: int, backlog: int) -> None:
    if threads + tasks == 0:
        threads = 1
    with m.boot(deterministic=deterministic, seed=seed) as k:
        me = m.task_self()
        port = m.port_allocate(me)
        m.port_set_backlog(me, port, backlog)
        m.task_set_special_port(me, m.TASK_BOOTSTRAP_PORT, port)
        for s in range(threads):
            m.thread_create(me, _thread_sender, port, s, count)
        handles = [k.spawn(_task_sender, threads + s, count, name=f"sender{s}")
                   for s in range(tasks)]
        seen: dict[int, list[int]] = defaultdict(list)
        for _ in range((threads + tasks) * count):
            msg = m.msg_receive(port, m.RCV_TIMEOUT, WAIT_MS)
            sender, i = msg.values()
            seen[sender].append(i)
            assert m.port_status(me, port)[1] <= backlog
        assert {s: seen[s] for s in range(threads + tasks)} == {
            s: list(range(count)) for s in range(threads + tasks)}
        assert [h.result(WAIT_MS) for h in handles] == [count] * tasks
        with pytest.raises(m.RcvError) as exc:
            m.msg_receive(port, m.RCV_TIMEOUT, 0)
        assert exc.value.code == "RCV_TIMED_OUT"
        global_invariants(k)


# --------------------------------------------------------------------------------------
# c. Backlog and timeouts


def _entry(k: Kernel, name: int) -> tuple[bool, bool, bool, Any]:
    with k.sched.lock:
        e = current_thread().task.space.names[name]
        p = e.port
        return (e.send, e.receive, e.owner,
                (p.receiver, p.owner, p.receive_in_transit, p.ownership_in_transit))


def _blocking_send(port: int, carried: int, box: dict[str, Any]) -> None:
    m.msg_send(m.Message(port, id=77, items=[m.Port(carried, MOVE_SEND)]))
    box["sent"] = True


@PROPS
@given(deterministic=st.booleans(), seed=st.integers(0, 1000),
       backlog=st.integers(1, m.PORT_BACKLOG_MAX),
       disp=st.sampled_from(list(Disposition)), timeout=st.sampled_from([0, 0, 3]))
def test_backlog_and_send_timeout(deterministic: bool, seed: int, backlog: int,
                                  disp: Disposition, timeout: int) -> None:
    with m.boot(deterministic=deterministic, seed=seed) as k:
        me = m.task_self()
        p = m.port_allocate(me)
        q = m.port_allocate(me)
        m.port_set_backlog(me, p, backlog)
        assert m.port_status(me, p) == (False, 0, backlog, True, True)
        for i in range(backlog):  # room for exactly `backlog` messages, none waits
            m.msg_send(m.Message(p, id=i, items=[m.Int(i)]), m.SEND_TIMEOUT, 0)
        before = _entry(k, q)
        t0 = k.sched.now()
        with pytest.raises(m.SendError) as exc:
            m.msg_send(m.Message(p, id=999, items=[m.Port(q, disp)]), m.SEND_TIMEOUT, timeout)
        assert exc.value.code == "SEND_TIMED_OUT"
        if deterministic:
            assert k.sched.now() == t0 + timeout  # virtual time passed exactly the timeout
        else:
            assert k.sched.now() - t0 >= timeout
        assert _entry(k, q) == before, "a refused send leaves the sender's rights intact"
        assert m.port_status(me, p)[1] == backlog

        assert m.msg_receive(p, m.RCV_TIMEOUT, 0).values() == [0]  # frees one slot
        m.msg_send(m.Message(p, id=999, items=[m.Port(q, disp)]), m.SEND_TIMEOUT, 0)
        send, receive, owner, _ = _entry(k, q)
        assert receive == (disp not in RECV_KINDS)
        assert owner == (disp not in OWN_KINDS)
        assert send == (disp != MOVE_SEND)
        with pytest.raises(m.SendError) as exc:  # full again
            m.msg_send(m.Message(p, id=5), m.SEND_TIMEOUT, 0)
        assert exc.value.code == "SEND_TIMED_OUT"

        # A sender without a timeout blocks until a receive makes room.
        box: dict[str, Any] = {}
        m.thread_create(me, _blocking_send, p, p, box)
        world_idle = m.port_allocate(me)
        waited = 0
        while True:
            with k.sched.lock:
                th = [t for t in current_thread().task.threads if t.code is not None]
                if th and th[0].wait_queue is not None:
                    assert th[0].wait_queue is current_thread().task.space.names[
                        p].port.send_waitq
                    break
            assert "sent" not in box
            with pytest.raises(m.RcvError):
                m.msg_receive(world_idle, m.RCV_TIMEOUT, 1)
            waited += 1
            assert waited < WAIT_MS
        got = [m.msg_receive(p, m.RCV_TIMEOUT, WAIT_MS) for _ in range(backlog + 1)]
        assert [g.id for g in got] == [*range(1, backlog), 999, 77]
        assert box == {"sent": True}
        assert m.port_status(me, p)[1] == 0
        # The carried right comes back under the sender's own name for it, all rights again.
        assert got[-2].items == [m.Port(q, ARRIVES_AS[disp])]
        assert _entry(k, q)[:3] == (True, True, True)
        global_invariants(k)


@FEW
@given(deterministic=st.booleans(), seed=st.integers(0, 1000))
def test_backlog_bounds_and_raising_backlog_wakes_senders(deterministic: bool,
                                                          seed: int) -> None:
    with m.boot(deterministic=deterministic, seed=seed) as k:
        me = m.task_self()
        p = m.port_allocate(me)
        for bad in (0, m.PORT_BACKLOG_MAX + 1, -1):
            with pytest.raises(m.KernError) as exc:
                m.port_set_backlog(me, p, bad)
            assert exc.value.code == "KERN_INVALID_ARGUMENT"
        m.port_set_backlog(me, p, 1)
        m.msg_send(m.Message(p, id=1), m.SEND_TIMEOUT, 0)
        box: dict[str, Any] = {}
        m.thread_create(me, _blocking_send, p, p, box)
        idle = m.port_allocate(me)
        for _ in range(5):
            with pytest.raises(m.RcvError):
                m.msg_receive(idle, m.RCV_TIMEOUT, 1)
        assert "sent" not in box
        m.port_set_backlog(me, p, 2)  # more room: the blocked sender proceeds
        for _ in range(WAIT_MS):
            if box:
                break
            with pytest.raises(m.RcvError):
                m.msg_receive(idle, m.RCV_TIMEOUT, 1)
        assert box == {"sent": True}
        assert m.port_status(me, p)[1] == 2
        global_invariants(k)


# --------------------------------------------------------------------------------------
# d. Port death in every state


def _notes(world: World, actor: int) -> list[tuple[int, int]]:
    return world.ok(actor, op_drain)  # type: ignore[no-any-return]


def _is_dead_everywhere(world: World, kp: Any) -> None:
    with world.k.sched.lock:
        assert kp.dead and not kp.holders and not kp.queue
        assert kp.receiver is None and kp.owner is None
    global_invariants(world.k)


@contextmanager
def _setup(deterministic: bool, seed: int) -> Iterator[m.Kernel]:
    """A kernel whose boot task hears every notification these scenarios cause (a
    notify port holds at most its backlog of them, ipc_notify.py)."""
    with m.boot(deterministic=deterministic, seed=seed) as k:
        _hear_every_notification()
        yield k


MODES = dict(deterministic=st.booleans(), seed=st.integers(0, 2**16))


@FEW
@given(**MODES)
def test_death_of_an_idle_port(deterministic: bool, seed: int) -> None:
    with _setup(deterministic, seed) as k:
        w = World(k)
        w.add_worker(1)
        w.add_worker(2)
        p = m.port_allocate(m.task_self())
        kp = w.kport(BOOT, p)
        [(a_p, _)] = w.ok(1, op_got, carry=[(p, COPY_SEND)])
        [(b_p, _)] = w.ok(2, op_got, carry=[(p, MAKE_SEND)])
        m.port_deallocate(m.task_self(), p)
        _is_dead_everywhere(w, kp)
        assert _notes(w, 1) == [(DELETED, a_p)]
        assert _notes(w, 2) == [(DELETED, b_p)]
        assert (DELETED, p) not in _notes(w, BOOT)  # the destroyer is not told
        assert w.call(1, op_send, a_p, 0, None, [], 1) == ("err", "SEND_INVALID_PORT")
        assert w.call(2, op_status, b_p) == ("err", "KERN_INVALID_NAME")


@FEW
@given(**MODES)
def test_death_with_queued_messages_releases_their_rights(deterministic: bool,
                                                          seed: int) -> None:
    with _setup(deterministic, seed) as k:
        w = World(k)
        w.add_worker(1)
        w.add_worker(2)
        me = m.task_self()
        p, q, r, s = (m.port_allocate(me) for _ in range(4))
        kp, kq, kr, ks = (w.kport(BOOT, n) for n in (p, q, r, s))
        [(a_r, _)] = w.ok(1, op_got, carry=[(r, COPY_SEND)])
        [(b_p, _)] = w.ok(2, op_got, carry=[(p, COPY_SEND)])
        for n, d in ((q, MOVE_RECEIVE), (r, MOVE_ALL), (s, MOVE_OWNERSHIP), (q, COPY_SEND)):
            m.msg_send(m.Message(p, items=[m.Port(n, d)]), m.SEND_TIMEOUT, 0)
        with k.sched.lock:
            assert kq.receive_in_transit and kr.receive_in_transit and kr.ownership_in_transit
            assert ks.ownership_in_transit and ks.receiver is w.boot
        m.port_deallocate(me, p)
        _is_dead_everywhere(w, kp)
        _is_dead_everywhere(w, kr)  # receive + ownership in a destroyed message: destroyed
        with k.sched.lock:
            assert not kq.dead and kq.receiver is w.boot and kq.owner is w.boot
            assert not ks.dead and ks.receiver is w.boot and ks.owner is w.boot
        assert Counter(n for n in _notes(w, BOOT) if n[1] in (p, q, r, s)) == Counter(
            [(RECEIVE_RIGHTS, q), (DELETED, r), (OWNERSHIP_RIGHTS, s)])
        assert _notes(w, 1) == [(DELETED, a_r)]
        assert _notes(w, 2) == [(DELETED, b_p)]
        assert m.port_status(me, q)[3:] == (True, True)
        assert m.port_status(me, s)[3:] == (True, True)


@FEW
@given(**MODES, waiters=st.integers(1, 2))
def test_death_wakes_blocked_senders(deterministic: bool, seed: int, waiters: int) -> None:
    with _setup(deterministic, seed) as k:
        w = World(k)
        me = m.task_self()
        p = m.port_allocate(me)
        kp = w.kport(BOOT, p)
        m.port_set_backlog(me, p, 1)
        m.msg_send(m.Message(p, id=1), m.SEND_TIMEOUT, 0)
        names = {}
        for a in range(1, waiters + 1):
            w.add_worker(a)
            [(names[a], _)] = w.ok(a, op_got, carry=[(p, COPY_SEND)])
            x = w.ok(a, op_alloc)  # the blocked message carries this receive right
            w.start(a, op_send, names[a], 0, None, [(x, MOVE_RECEIVE)], 2, None)
            names[a, "x"] = x
        w.settle(lambda: all(w.blocked_on(a, lambda: kp.send_waitq)
                             for a in range(1, waiters + 1)))
        m.port_deallocate(me, p)
        for a in range(1, waiters + 1):
            assert w.finish(a) == ("err", "SEND_INVALID_PORT")
            assert w.ok(a, op_status, names[a, "x"])[3:] == (True, True)  # rights intact
            assert _notes(w, a) == [(DELETED, names[a])]
        _is_dead_everywhere(w, kp)


@FEW
@given(**MODES, owner_elsewhere=st.booleans())
def test_blocked_receiver_wakes_when_its_receive_right_goes(deterministic: bool, seed: int,
                                                            owner_elsewhere: bool) -> None:
    with _setup(deterministic, seed) as k:
        w = World(k)
        w.add_worker(1)
        w.add_worker(2)
        me = m.task_self()
        p = m.port_allocate(me)
        kp = w.kport(BOOT, p)
        if owner_elsewhere:  # receiver 1, owner 2
            [(a_p, _)] = w.ok(1, op_got, carry=[(p, MOVE_RECEIVE)])
            [(b_p, _)] = w.ok(2, op_got, carry=[(p, MOVE_OWNERSHIP)])
        else:  # 1 holds both
            [(a_p, _)] = w.ok(1, op_got, carry=[(p, MOVE_ALL)])
        w.start(1, op_recv, a_p, None)
        w.settle(lambda: w.blocked_on(1, lambda: kp.rcv_waitq))
        m.port_deallocate(w.task_names[1], a_p)  # through the task port, from outside
        assert w.finish(1) == ("err", "RCV_INVALID_PORT")
        assert (DELETED, a_p) not in _notes(w, 1)
        if owner_elsewhere:  # the receive right went to the owner
            with k.sched.lock:
                assert not kp.dead and kp.receiver is w.tasks[2] and kp.owner is w.tasks[2]
            assert _notes(w, 2) == [(RECEIVE_RIGHTS, b_p)]
            assert w.ok(2, op_status, b_p)[3:] == (True, True)
        else:
            _is_dead_everywhere(w, kp)
            assert [n for n in _notes(w, BOOT) if n[1] == p] == [(DELETED, p)]


@FEW
@given(**MODES, variant=st.sampled_from(["back-to-owner", "ownerless", "move-all",
                                         "delivered"]))
def test_death_with_receive_right_in_transit(deterministic: bool, seed: int,
                                             variant: str) -> None:
    with _setup(deterministic, seed) as k:
        w = World(k)
        w.add_worker(1)
        w.add_worker(2)
        me = m.task_self()
        p, t = m.port_allocate(me), m.port_allocate(me)
        kp, kt = w.kport(BOOT, p), w.kport(BOOT, t)
        [(a_p, _)] = w.ok(1, op_got, carry=[(p, COPY_SEND)])
        disp = MOVE_ALL if variant == "move-all" else MOVE_RECEIVE
        m.msg_send(m.Message(t, id=5, items=[m.Port(p, disp)]), m.SEND_TIMEOUT, 0)
        if variant in ("ownerless", "delivered"):
            m.port_deallocate(me, p)  # ownership given up while the receive right travels
            with k.sched.lock:
                assert not kp.dead and kp.owner is None and kp.receive_in_transit
        if variant == "delivered":
            [(b_t, _)] = w.ok(2, op_got, carry=[(t, MOVE_ALL)])
            _, _, _, [(b_p, kind)] = w.ok(2, op_recv, b_t)
            assert kind == MOVE_RECEIVE
            with k.sched.lock:  # the new receiver becomes the owner too
                assert kp.receiver is w.tasks[2] and kp.owner is w.tasks[2]
            assert w.ok(2, op_status, b_p)[3:] == (True, True)
            assert _notes(w, 2) == []
            global_invariants(k)
            return
        m.port_deallocate(me, t)  # destroys the message carrying the receive right
        _is_dead_everywhere(w, kt)
        boot_notes = [n for n in _notes(w, BOOT) if n[1] in (p, t)]
        if variant == "back-to-owner":
            with k.sched.lock:
                assert not kp.dead and kp.receiver is w.boot and kp.owner is w.boot
            assert boot_notes == [(RECEIVE_RIGHTS, p)]
            assert _notes(w, 1) == []
        else:
            _is_dead_everywhere(w, kp)
            assert _notes(w, 1) == [(DELETED, a_p)]
            # With MOVE_ALL the sender kept a send right, so it is told too.
            assert boot_notes == ([(DELETED, p)] if variant == "move-all" else [])


@FEW
@given(**MODES, order=st.sampled_from(["receiver-first", "owner-first", "terminations"]))
def test_receiver_and_owner_in_different_tasks(deterministic: bool, seed: int,
                                               order: str) -> None:
    with _setup(deterministic, seed) as k:
        w = World(k)
        w.add_worker(1)
        w.add_worker(2)
        me = m.task_self()
        p = m.port_allocate(me)
        kp = w.kport(BOOT, p)
        [(a_p, _)] = w.ok(1, op_got, carry=[(p, MOVE_RECEIVE)])
        [(b_p, _)] = w.ok(2, op_got, carry=[(p, MOVE_OWNERSHIP)])
        with k.sched.lock:
            assert kp.receiver is w.tasks[1] and kp.owner is w.tasks[2]
        assert m.port_status(me, p)[3:] == (False, False)
        if order == "receiver-first":
            w.ok(1, op_dealloc, a_p)
            assert _notes(w, 2) == [(RECEIVE_RIGHTS, b_p)]
            with k.sched.lock:
                assert kp.receiver is w.tasks[2] and kp.owner is w.tasks[2]
            w.ok(2, op_dealloc, b_p)
            assert _notes(w, 1) == []
        elif order == "owner-first":
            w.ok(2, op_dealloc, b_p)
            assert _notes(w, 1) == [(OWNERSHIP_RIGHTS, a_p)]
            with k.sched.lock:
                assert kp.receiver is w.tasks[1] and kp.owner is w.tasks[1]
            w.ok(1, op_dealloc, a_p)
            assert _notes(w, 2) == []
        else:
            owner = w.tasks[2]
            w.terminate(2)
            with k.sched.lock:
                assert not owner.active and not owner.space.names
                assert kp.receiver is w.tasks[1] and kp.owner is w.tasks[1]
            assert _notes(w, 1) == [(OWNERSHIP_RIGHTS, a_p)]
            w.terminate(1)
        _is_dead_everywhere(w, kp)
        assert [n for n in _notes(w, BOOT) if n[1] == p] == [(DELETED, p)]


@FEW
@given(**MODES)
def test_death_by_task_termination(deterministic: bool, seed: int) -> None:
    with _setup(deterministic, seed) as k:
        w = World(k)
        w.add_worker(1)
        w.add_worker(2)
        me = m.task_self()
        u, q = m.port_allocate(me), m.port_allocate(me)
        kq = w.kport(BOOT, q)
        [(a_u, _)] = w.ok(1, op_got, carry=[(u, MAKE_SEND)])
        a_p = w.ok(1, op_alloc)  # the port that will die with task 1
        w.ok(1, op_backlog, a_p, 1)
        w.ok(1, op_send, a_u, 0, None, [(a_p, MAKE_SEND)], 10)
        _, _, _, [(p, _)] = op_recv([], u)
        kp = w.kport(BOOT, p)
        [(b_p, _)] = w.ok(2, op_got, carry=[(p, COPY_SEND)])
        m.msg_send(m.Message(p, id=11, items=[m.Port(q, MOVE_RECEIVE)]), m.SEND_TIMEOUT, 0)
        w.start(2, op_send, b_p, 0, None, [], 12, None)  # blocks: backlog 1 is full
        w.settle(lambda: w.blocked_on(2, lambda: kp.send_waitq))
        victim = w.tasks[1]
        w.terminate(1)
        assert w.finish(2) == ("err", "SEND_INVALID_PORT")
        _is_dead_everywhere(w, kp)
        with k.sched.lock:
            assert not victim.active and not victim.space.names and not victim.threads
            assert victim.port is not None and victim.port.dead
            assert victim.serial not in k.tasks
            assert kq.receiver is w.boot and not kq.receive_in_transit
        assert _notes(w, 2) == [(DELETED, b_p)]
        boot_notes = [n for n in _notes(w, BOOT) if n[1] in (p, q)]
        assert Counter(boot_notes) == Counter([(DELETED, p), (RECEIVE_RIGHTS, q)])
