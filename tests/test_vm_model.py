"""Model-based test of the virtual memory operations (paper 3.3, Table 3-3, and 5).

A hypothesis state machine drives the embedded kernel through random sequences of
vm_allocate, memory-view reads and writes, vm_read, vm_write, vm_copy, vm_protect,
vm_inherit, vm_deallocate, task_create with inheritance, short-lived children started
by `spawn(inherit=True)`, out-of-line messages (copied, and moved with deallocate)
between tasks, task_terminate, and threads of several tasks touching the same pages at
once, and mirrors every operation on a plain Python model.

The model keeps, per task, a dict from virtual page number to a `Page`: the protection,
maximum protection and inheritance of that page in that task, and a `cell` (a
bytearray of one page) holding its contents. Tasks that share memory through
VM_INHERIT_SHARE hold the *same* cell object; every copy (COPY inheritance, an
out-of-line message, vm_copy, vm_write) makes new bytes. So copy-on-write isolation and
read/write sharing are both checked simply by comparing each read with the cells.

The kernel boots with 64 page frames while the data is several times larger, so pages
keep going out to the default pager and coming back. After every step vm_regions must
describe exactly the model's pages and attributes, and vm_statistics must stay sane;
every few steps all memory of every task is read back and compared.

Where the brief of an operation leaves a corner open, the model follows CMU Mach's
vm_user.c / vm_map.c: vm_protect may never raise a maximum protection, and
vm_deallocate of zero bytes does nothing. Memory received out of line is whole pages
(the bytes around the data in its first and last page come with it, as in Mach).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import pymach as m

PS = 4096
FRAMES = 64
MEMORY = FRAMES * PS
WAIT_MS = 20_000  # an upper bound for "soon": a hang fails instead of blocking the suite
MIN_VPN = 0x10000 // PS  # vm_allocate(anywhere) starts here
FIX_VPN = 0x4000_0000 // PS  # fixed-address allocations go to a window here
FIX_SLOTS = 64
MAX_CHILDREN = 3
MAX_TASK_PAGES = 420
FULL_CHECK_EVERY = 10

R, W, X = m.VM_PROT_READ, m.VM_PROT_WRITE, m.VM_PROT_EXECUTE
SHARE, COPY, NONE = m.VM_INHERIT_SHARE, m.VM_INHERIT_COPY, m.VM_INHERIT_NONE
# Current protections used: never write-only (2 or 6), whose reads are not specified.
PROTS = [R | W, R, R | W | X, R | X, 0, X, R | W]
# Maximum protections: any current protection masked by these is still in PROTS.
MAX_PROTS = [R | W | X, R | W, R, R | X, 0]
INVALID, PROT_FAIL = "KERN_INVALID_ADDRESS", "KERN_PROTECTION_FAILURE"
DONE, HANDSHAKE, CARGO = 7101, 7102, 7103

Outcome = tuple[str, Any]  # ("ok", value) or ("err", MachError code)


def pattern(seed: int, n: int) -> bytes:
    """`n` pseudo-random bytes determined by `seed` (cheap to draw, easy to reproduce)."""
    return random.Random(seed).randbytes(n)


def outcome(fn: Callable[..., Any], *args: Any) -> Outcome:
    """Run fn(*args) and return ("ok", result) or ("err", code of the MachError)."""
    try:
        return "ok", fn(*args)
    except m.MachError as e:
        return "err", e.code


# --------------------------------------------------------------------------------------
# The model


class Page:
    """One virtual page of one task: its attributes there, and the memory it shows."""

    __slots__ = ("cell", "inh", "maxp", "prot")

    def __init__(self, cell: bytearray, prot: int = m.VM_PROT_DEFAULT,
                 maxp: int = m.VM_PROT_ALL, inh: int = m.VM_INHERIT_DEFAULT) -> None:
        self.cell, self.prot, self.maxp, self.inh = cell, prot, maxp, inh

    def __repr__(self) -> str:
        return f"Page(prot={self.prot}, maxp={self.maxp}, inh={self.inh})"


class TaskModel:
    """A task as the model sees it: its port name (in the bootstrap task) and pages."""

    def __init__(self, label: str, port: int) -> None:
        self.label, self.port = label, port
        self.pages: dict[int, Page] = {}

    def __repr__(self) -> str:
        return self.label

    def runs(self) -> list[tuple[int, int]]:
        """Maximal runs [first, end) of allocated virtual page numbers."""
        out: list[tuple[int, int]] = []
        for vpn in sorted(self.pages):
            if out and out[-1][1] == vpn:
                out[-1] = (out[-1][0], vpn + 1)
            else:
                out.append((vpn, vpn + 1))
        return out

    def free(self, first: int, end: int) -> bool:
        return not any(v in self.pages for v in range(first, end))

    def add(self, first: int, cells: list[bytearray], prot: int = m.VM_PROT_DEFAULT,
            maxp: int = m.VM_PROT_ALL, inh: int = m.VM_INHERIT_DEFAULT) -> None:
        for i, cell in enumerate(cells):
            assert first + i not in self.pages
            self.pages[first + i] = Page(cell, prot, maxp, inh)

    def remove(self, first: int, end: int) -> None:
        for v in range(first, end):
            self.pages.pop(v, None)

    def bytes_at(self, addr: int, n: int) -> bytes:
        out = bytearray()
        for vpn in range(addr // PS, -(-(addr + n) // PS)):
            out += self.pages[vpn].cell
        start = addr % PS
        return bytes(out[start:start + n])

    def store(self, addr: int, data: bytes) -> None:
        """Write into the cells (every task sharing a cell sees it)."""
        pos = 0
        while pos < len(data):
            va = addr + pos
            k = min(len(data) - pos, PS - va % PS)
            self.pages[va // PS].cell[va % PS:va % PS + k] = data[pos:pos + k]
            pos += k

    def cell_spans(self, addr: int, n: int) -> list[tuple[int, int, int]]:
        """(id of the cell, first byte, end byte) for each allocated page [addr, addr+n)
        touches: what an access there may read or change."""
        out = []
        for vpn in range(*vpn_span(addr, n)):
            p = self.pages.get(vpn)
            if p is not None:
                lo, hi = max(addr, vpn * PS) - vpn * PS, min(addr + n, (vpn + 1) * PS) - vpn * PS
                out.append((id(p.cell), lo, hi))
        return out

    # -- expected outcomes ------------------------------------------------------------
    def call_error(self, first: int, end: int, need: int) -> str | None:
        """Error of a kernel call on pages [first, end): any hole first, then protection."""
        pages = [self.pages.get(v) for v in range(first, end)]
        if any(p is None for p in pages):
            return INVALID
        if any(p.prot & need != need for p in pages if p is not None):
            return PROT_FAIL
        return None

    def view_error(self, va: int, need: int) -> str | None:
        """Error of a memory-view access to the page of `va` (a memory exception)."""
        p = self.pages.get(va // PS)
        if p is None:
            return INVALID
        if p.prot & need != need:
            return PROT_FAIL
        return None

    def view_read(self, addr: int, n: int) -> Outcome:
        for vpn in range(addr // PS, -(-(addr + n) // PS)):
            err = self.view_error(vpn * PS, R)
            if err:
                return "err", err
        return "ok", self.bytes_at(addr, n)

    def view_write(self, addr: int, data: bytes) -> Outcome:
        """Page by page, as the MMU does: pages before a faulting one are written."""
        pos = 0
        while pos < len(data):
            va = addr + pos
            k = min(len(data) - pos, PS - va % PS)
            err = self.view_error(va, W)
            if err:
                return "err", err
            self.store(va, data[pos:pos + k])
            pos += k
        return "ok", None

    def fork(self, label: str, port: int) -> TaskModel:
        """The child's model after task_create(this task, inherit=True) (3.3)."""
        child = TaskModel(label, port)
        for vpn, p in self.pages.items():
            if p.inh == NONE:
                continue
            cell = p.cell if p.inh == SHARE else bytearray(p.cell)
            child.pages[vpn] = Page(cell, p.prot, p.maxp, p.inh)
        return child


# --------------------------------------------------------------------------------------
# Code run by threads of child tasks


def view_read(addr: int, n: int) -> bytes:
    return bytes(m.memory().read(addr, n))


def view_write(addr: int, data: bytes) -> None:
    m.memory().write(addr, data)


def view_probe(ops: list[tuple[str, int, Any]]) -> list[Outcome]:
    """Reads ("r", addr, n) and writes ("w", addr, data) through the caller's memory view."""
    mem = m.memory()
    out: list[Outcome] = []
    for kind, addr, arg in ops:
        if kind == "r":
            out.append(outcome(mem.read, addr, arg))
        else:
            out.append(outcome(mem.write, addr, arg))
    return out


def _bootstrap_port() -> int:
    return m.task_get_special_port(m.task_self(), m.TASK_BOOTSTRAP_PORT)  # type: ignore[no-any-return]


def send_ool(addr: int, n: int, dealloc: bool) -> None:
    """Send [addr, addr+n) out of line to the bootstrap task."""
    m.msg_send(m.Message(remote_port=_bootstrap_port(), id=CARGO,
                         items=[m.OOL(addr, n, deallocate=dealloc)]))


def receive_ool() -> list[tuple[int, int]]:
    """Give the bootstrap task a send right to a new port; return the OOL items received."""
    me = m.task_self()
    q = m.port_allocate(me)
    m.msg_send(m.Message(remote_port=_bootstrap_port(), id=HANDSHAKE,
                         items=[m.Port(q, m.MAKE_SEND)]))
    msg = m.msg_receive(q, m.RCV_TIMEOUT, WAIT_MS)
    m.port_deallocate(me, q)
    return [(i.address, i.size) for i in msg.items if isinstance(i, m.OOL)]


def vpn_span(addr: int, n: int) -> tuple[int, int]:
    """The pages [first, end) that bytes [addr, addr+n) touch."""
    return addr // PS, -(-(addr + n) // PS)


# --------------------------------------------------------------------------------------
# The state machine


class VmModel(RuleBasedStateMachine):
    """Kernel VM against the model (see module docstring)."""

    deterministic = False

    def __init__(self) -> None:
        super().__init__()
        self.cm: Any = None
        self.tasks: list[TaskModel] = []
        self.serial = 0
        self.hot: list[int] = []  # pages recent operations started at (any task)
        self.steps = 0
        self.last_stats: m.VmStatistics | None = None

    # -- boot and teardown ------------------------------------------------------------
    @initialize(seed=st.integers(0, 2**16), big=st.integers(FRAMES, 2 * FRAMES))
    def boot(self, seed: int, big: int) -> None:
        self.cm = m.boot(memory_size=MEMORY, page_size=PS, deterministic=self.deterministic,
                         seed=seed)
        self.kernel: m.Kernel = self.cm.__enter__()
        self.me = m.task_self()
        self.mem = m.memory()
        self.sig = m.port_allocate(self.me)  # where children's threads report
        self.root = TaskModel("bootstrap", self.me)
        self.tasks = [self.root]
        # A region larger than physical memory, every page touched through the MMU.
        addr = m.vm_allocate(self.me, 0, big * PS, True)
        assert addr % PS == 0
        self.root.add(addr // PS, [bytearray(PS) for _ in range(big)])
        for i in range(big):
            a = addr + i * PS + (i * 97) % (PS - 16)
            data = pattern(seed + i, 16)
            self.mem[a:a + 16] = data
            self.root.store(a, data)

    def teardown(self) -> None:
        if self.cm is not None:
            cm, self.cm = self.cm, None
            cm.__exit__(None, None, None)

    # -- helpers ----------------------------------------------------------------------
    def children(self) -> list[TaskModel]:
        return [t for t in self.tasks if t is not self.root]

    def in_task(self, t: TaskModel, fn: Callable[..., Any], *args: Any,
                on_message: Callable[[m.Message], None] | None = None) -> Outcome:
        """fn(*args) in a thread of task t (directly if t is the bootstrap task)."""
        if t is self.root:
            return outcome(fn, *args)
        box: list[Any] = []

        def body() -> None:
            try:
                box.append(outcome(fn, *args))
            except Exception as e:
                box.append(("exc", e))
            finally:
                m.msg_send(m.Message(remote_port=_bootstrap_port(), id=DONE))

        m.thread_create(t.port, body)
        while True:
            msg = m.msg_receive(self.sig, m.RCV_TIMEOUT, WAIT_MS)
            if msg.id == DONE:
                break
            assert on_message is not None, f"unexpected message {msg}"
            on_message(msg)
        kind, value = box[0]
        if kind == "exc":
            raise value
        return kind, value

    def pick_task(self, data: st.DataObject) -> TaskModel:
        return data.draw(st.sampled_from(self.tasks), label="task")

    def pick_pages(self, data: st.DataObject, t: TaskModel, most: int = 8) -> tuple[int, int]:
        """Pages [first, end): mostly inside an allocated run, often where an earlier
        operation (of any task) was, sometimes past a run's end or somewhere that may be
        unallocated."""
        runs = t.runs()
        where = data.draw(st.integers(0, 7), label="where")
        if where == 0 or not runs:
            base = data.draw(st.sampled_from([MIN_VPN, FIX_VPN]), label="base")
            first = base + data.draw(st.integers(0, 48), label="first")
            end = first + data.draw(st.integers(1, most), label="npages")
        elif where <= 3 and self.hot:
            first = data.draw(st.sampled_from(self.hot), label="hot")
            end = first + data.draw(st.integers(1, most), label="npages")
        else:
            s, e = data.draw(st.sampled_from(runs), label="run")
            first = data.draw(st.integers(s, e - 1), label="first")
            end = data.draw(st.integers(first + 1, min(e + 1, first + most)), label="end")
        self.hot = [*self.hot[-11:], first]
        return first, end

    def pick_fixed(self, data: st.DataObject, t: TaskModel) -> int:
        """A page for a fixed-address allocation: in the window, or just after or at the
        start of an allocated run (so regions touch, or the space is taken)."""
        runs = t.runs()
        how = data.draw(st.sampled_from(["window", "after", "at"]), label="fixed")
        if how == "window" or not runs:
            return FIX_VPN + data.draw(st.integers(0, FIX_SLOTS), label="slot")
        s, e = data.draw(st.sampled_from(runs), label="run")
        return e if how == "after" else s

    def pick_bytes(self, data: st.DataObject, t: TaskModel, most: int = 3) -> tuple[int, int]:
        """A byte range (addr, n), n >= 1, of any alignment."""
        first, end = self.pick_pages(data, t, most)
        off = data.draw(st.integers(0, PS - 1), label="offset")
        n = data.draw(st.integers(1, (end - first) * PS - off), label="nbytes")
        return first * PS + off, n

    def check_read(self, t: TaskModel, first: int, end: int) -> None:
        """vm_read the pages [first, end) of t (all readable) and compare."""
        got = m.vm_read(t.port, first * PS, (end - first) * PS)
        want = t.bytes_at(first * PS, (end - first) * PS)
        if got != want:
            bad = next(i for i in range(len(got)) if got[i] != want[i])
            raise AssertionError(f"{t}: byte {first * PS + bad:#x} is {got[bad]}, "
                                 f"model says {want[bad]}")

    def full_check(self) -> None:
        """Every readable page of every task equals the model; unreadable ones fault."""
        for t in self.tasks:
            for s, e in t.runs():
                v = s
                while v < e:
                    if t.pages[v].prot & R:
                        w = v
                        while w < e and t.pages[w].prot & R:
                            w += 1
                        self.check_read(t, v, w)
                        v = w
                    else:
                        assert outcome(m.vm_read, t.port, v * PS, 1) == ("err", PROT_FAIL)
                        v += 1

    # -- allocation -------------------------------------------------------------------
    @rule(data=st.data())
    def allocate(self, data: st.DataObject) -> None:
        t = self.pick_task(data)
        npages = data.draw(st.integers(1, 16), label="npages")
        size = npages * PS - data.draw(st.integers(0, PS - 1), label="short_by")
        if len(t.pages) + npages > MAX_TASK_PAGES:
            return
        if data.draw(st.booleans(), label="anywhere"):
            addr = m.vm_allocate(t.port, 0, size, True)
            assert addr % PS == 0, hex(addr)
            assert t.free(addr // PS, addr // PS + npages), f"{t}: {addr:#x} was in use"
        else:
            addr = self.pick_fixed(data, t) * PS
            got = outcome(m.vm_allocate, t.port, addr, size, False)
            if not t.free(addr // PS, addr // PS + npages):
                assert got == ("err", "KERN_NO_SPACE"), got
                return
            assert got == ("ok", addr), got
        t.add(addr // PS, [bytearray(PS) for _ in range(npages)])

    @rule(data=st.data())
    def deallocate(self, data: st.DataObject) -> None:
        t = self.pick_task(data)
        addr, n = self.pick_bytes(data, t, most=6)
        if data.draw(st.integers(0, 9), label="zero_size") == 0:
            m.vm_deallocate(t.port, addr, 0)  # nothing (Mach: size 0 returns at once)
            return
        m.vm_deallocate(t.port, addr, n)
        t.remove(*vpn_span(addr, n))
        assert outcome(m.vm_read, t.port, addr, n) == ("err", INVALID)

    # -- the memory view (the MMU) ----------------------------------------------------
    @rule(data=st.data())
    def view_write(self, data: st.DataObject) -> None:
        t = self.pick_task(data)
        addr, n = self.pick_bytes(data, t)
        payload = pattern(data.draw(st.integers(0, 2**32), label="seed"), n)
        want = t.view_write(addr, payload)
        got = self.in_task(t, view_write, addr, payload)
        assert got == want, (t, hex(addr), n, got, want)

    @rule(data=st.data())
    def view_read(self, data: st.DataObject) -> None:
        t = self.pick_task(data)
        addr, n = self.pick_bytes(data, t)
        want = t.view_read(addr, n)
        got = self.in_task(t, view_read, addr, n)
        assert got == want, (t, hex(addr), n, got[0], want[0], got[1] if got[0] == "err" else "")

    @rule(data=st.data())
    def view_stride(self, data: st.DataObject) -> None:
        """One byte of every page of a run, in order: many faults and pageins."""
        t = self.pick_task(data)
        runs = [r for r in t.runs() if r[1] - r[0] >= 8]
        if not runs:
            return
        s, e = data.draw(st.sampled_from(runs), label="run")
        off = data.draw(st.integers(0, PS - 1), label="offset")
        write = data.draw(st.booleans(), label="write")
        ops: list[tuple[str, int, Any]] = []
        for v in range(s, e):
            ops.append(("w", v * PS + off, bytes([v & 0xFF])) if write
                       else ("r", v * PS + off, 1))
        want = [t.view_write(a, arg) if k == "w" else t.view_read(a, arg) for k, a, arg in ops]
        got = self.in_task(t, view_probe, ops)
        assert got == ("ok", want), (t, got, want)

    # -- vm_read, vm_write, vm_copy ---------------------------------------------------
    @rule(data=st.data())
    def vm_read(self, data: st.DataObject) -> None:
        t = self.pick_task(data)
        addr, n = self.pick_bytes(data, t, most=6)
        err = t.call_error(*vpn_span(addr, n), R)
        got = outcome(m.vm_read, t.port, addr, n)
        assert got == (("err", err) if err else ("ok", t.bytes_at(addr, n))), (t, got[0])

    @rule(data=st.data())
    def vm_write(self, data: st.DataObject) -> None:
        t = self.pick_task(data)
        first, end = self.pick_pages(data, t, most=6)
        n = data.draw(st.integers(1, (end - first) * PS), label="nbytes")
        payload = pattern(data.draw(st.integers(0, 2**32), label="seed"), n)
        err = t.call_error(*vpn_span(first * PS, n), W)
        got = outcome(m.vm_write, t.port, first * PS, payload)
        assert got == (("err", err) if err else ("ok", None)), (t, got)
        if not err:
            t.store(first * PS, payload)

    @rule(data=st.data())
    def vm_copy(self, data: st.DataObject) -> None:
        t = self.pick_task(data)
        first, end = self.pick_pages(data, t, most=6)
        n = end - first
        dst, _ = self.pick_pages(data, t, most=6)
        err = t.call_error(first, end, 0) or t.call_error(dst, dst + n, 0)
        err = err or t.call_error(first, end, R) or t.call_error(dst, dst + n, W)
        got = outcome(m.vm_copy, t.port, first * PS, n * PS, dst * PS)
        assert got == (("err", err) if err else ("ok", None)), (t, got)
        if not err:
            t.store(dst * PS, t.bytes_at(first * PS, n * PS))  # memmove of the old contents

    # -- attributes -------------------------------------------------------------------
    @rule(data=st.data())
    def vm_protect(self, data: st.DataObject) -> None:
        t = self.pick_task(data)
        addr, n = self.pick_bytes(data, t, most=6)
        set_max = data.draw(st.booleans(), label="set_max")
        prot = data.draw(st.sampled_from(MAX_PROTS if set_max else PROTS), label="prot")
        first, end = vpn_span(addr, n)
        err = t.call_error(first, end, 0)
        # The new protection, current or maximum, may not exceed the maximum: the maximum
        # can only be lowered (Mach's vm_protect: "the new protection increased the maximum
        # protection for some region" -> KERN_PROTECTION_FAILURE).
        if not err and any(prot & ~t.pages[v].maxp for v in range(first, end)):
            err = PROT_FAIL
        got = outcome(m.vm_protect, t.port, addr, n, set_max, prot)
        assert got == (("err", err) if err else ("ok", None)), (t, set_max, prot, got)
        if err:
            return
        for v in range(first, end):
            p = t.pages[v]
            if set_max:
                p.maxp, p.prot = prot, p.prot & prot
            else:
                p.prot = prot

    @rule(data=st.data())
    def vm_inherit(self, data: st.DataObject) -> None:
        t = self.pick_task(data)
        addr, n = self.pick_bytes(data, t, most=8)
        inh = data.draw(st.sampled_from([SHARE, COPY, NONE]), label="inheritance")
        first, end = vpn_span(addr, n)
        err = t.call_error(first, end, 0)
        got = outcome(m.vm_inherit, t.port, addr, n, inh)
        assert got == (("err", err) if err else ("ok", None)), (t, got)
        if not err:
            for v in range(first, end):
                t.pages[v].inh = inh

    # -- tasks ------------------------------------------------------------------------
    @precondition(lambda self: len(self.tasks) <= MAX_CHILDREN)
    @rule(data=st.data())
    def task_create(self, data: st.DataObject) -> None:
        parent = self.pick_task(data)
        inherit = data.draw(st.integers(0, 7), label="inherit") > 0
        port = m.task_create(parent.port, inherit)
        m.task_set_special_port(port, m.TASK_BOOTSTRAP_PORT, self.sig)
        self.serial += 1
        label = f"child{self.serial}(of {parent})"
        self.tasks.append(parent.fork(label, port) if inherit else TaskModel(label, port))

    @precondition(lambda self: len(self.tasks) > 1)
    @rule(data=st.data())
    def task_terminate(self, data: st.DataObject) -> None:
        t = data.draw(st.sampled_from(self.children()), label="child")
        m.task_terminate(t.port)  # (its task port dies, and the name with it, as in Mach 2.5)
        self.tasks.remove(t)

    @rule(data=st.data())
    def concurrent_access(self, data: st.DataObject) -> None:
        """Two or three threads (of the same or different tasks) read and write at the
        same time, often the same pages, shared or copy-on-write, racing each other's
        faults and the pageout daemon; no byte one of them writes is touched by another,
        so the outcome is determined."""
        actors = data.draw(st.lists(st.sampled_from(self.tasks), min_size=2, max_size=3),
                           label="actors")
        claims: list[tuple[int, int, int, int, bool]] = []  # (actor, cell id, lo, hi, write)
        plans: list[tuple[TaskModel, list[tuple[str, int, Any]]]] = []
        for i, t in enumerate(actors):
            ops: list[tuple[str, int, Any]] = []
            for _ in range(data.draw(st.integers(1, 3), label="nops")):
                addr, n = self.pick_bytes(data, t, most=2)
                write = data.draw(st.booleans(), label="write")
                mine = [(i, cid, lo, hi, write) for cid, lo, hi in t.cell_spans(addr, n)]
                if any(j != i and cid == c and lo < hi2 and lo2 < hi and (write or w)
                       for _, cid, lo, hi, _ in mine for j, c, lo2, hi2, w in claims):
                    continue
                claims += mine
                ops.append(("w", addr, pattern(data.draw(st.integers(0, 2**32)), n)) if write
                           else ("r", addr, n))
            plans.append((t, ops))
        want = [[t.view_write(a, arg) if k == "w" else t.view_read(a, arg) for k, a, arg in ops]
                for t, ops in plans]
        boxes: list[list[Any]] = []
        for t, ops in plans:
            box: list[Any] = []
            boxes.append(box)
            done_to = self.sig if t is self.root else None

            def body(ops: list[tuple[str, int, Any]] = ops, box: list[Any] = box,
                     done_to: int | None = done_to) -> None:
                try:
                    box.append(view_probe(ops))
                finally:
                    m.msg_send(m.Message(remote_port=done_to or _bootstrap_port(), id=DONE))

            m.thread_create(t.port, body)
        for _ in plans:
            assert m.msg_receive(self.sig, m.RCV_TIMEOUT, WAIT_MS).id == DONE
        assert [b[0] if b else None for b in boxes] == want, (actors, plans)

    @rule(data=st.data())
    def spawn_probe(self, data: st.DataObject) -> None:
        """A short-lived child of the bootstrap task (spawn, inherit=True) reads and
        writes its inherited memory through its own memory view."""
        child = self.root.fork("probe", 0)
        ops: list[tuple[str, int, Any]] = []
        for _ in range(data.draw(st.integers(1, 4), label="nops")):
            addr, n = self.pick_bytes(data, self.root, most=2)
            if data.draw(st.booleans(), label="write"):
                ops.append(("w", addr, pattern(data.draw(st.integers(0, 2**32)), n)))
            else:
                ops.append(("r", addr, n))
        want = [child.view_write(a, arg) if k == "w" else child.view_read(a, arg)
                for k, a, arg in ops]
        h = self.kernel.spawn(view_probe, ops, name="probe", inherit=True)
        got = h.result(WAIT_MS)
        assert got == want, (got, want)

    # -- out-of-line memory -----------------------------------------------------------
    def _receive_into(self, t: TaskModel, item: tuple[int, int], addr: int, n: int,
                      snapshot: list[bytearray]) -> None:
        """Record (and check) OOL memory `item` (address, size) that arrived in t for the
        bytes [addr, addr+n) of the sender, whose pages were `snapshot` at the send."""
        address, size = item
        assert size == n, (size, n)
        assert address % PS == addr % PS, (hex(address), hex(addr))
        first = address // PS
        assert t.free(first, first + len(snapshot)), f"{t}: OOL landed on {address:#x}"
        t.add(first, snapshot)
        self.check_read(t, first, first + len(snapshot))

    @rule(data=st.data())
    def ool_to_self(self, data: st.DataObject) -> None:
        """The bootstrap task sends memory to itself, maybe changes the source before the
        message is received: the receiver sees the memory as it was at the send."""
        t = self.root
        addr, n = self.pick_bytes(data, t, most=6)
        dealloc = data.draw(st.booleans(), label="deallocate")
        first, end = vpn_span(addr, n)
        port = m.port_allocate(self.me)
        err = t.call_error(first, end, R)
        got = outcome(m.msg_send, m.Message(remote_port=port,
                                            items=[m.OOL(addr, n, deallocate=dealloc)]))
        if err:
            assert got == ("err", "SEND_INVALID_MEMORY"), got
            m.port_deallocate(self.me, port)
            return
        assert got == ("ok", None), got
        snapshot = [bytearray(t.pages[v].cell) for v in range(first, end)]
        if dealloc:
            t.remove(first, end)
        if data.draw(st.booleans(), label="scribble"):
            payload = pattern(data.draw(st.integers(0, 2**32), label="seed"), n)
            want = t.view_write(addr, payload)
            assert outcome(self.mem.write, addr, payload) == want
        msg = m.msg_receive(port, m.RCV_TIMEOUT, WAIT_MS)
        m.port_deallocate(self.me, port)
        (item,) = msg.items
        assert isinstance(item, m.OOL)
        self._receive_into(t, (item.address, item.size), addr, n, snapshot)

    @rule(seed=st.integers(0, 2**32), n=st.integers(1, 3 * PS))
    def ool_data(self, seed: int, n: int) -> None:
        """Python bytes sent out of line arrive as new, page-aligned memory."""
        payload = pattern(seed, n)
        port = m.port_allocate(self.me)
        m.msg_send(m.Message(remote_port=port, items=[m.OOL(data=payload)]))
        msg = m.msg_receive(port, m.RCV_TIMEOUT, WAIT_MS)
        m.port_deallocate(self.me, port)
        (item,) = msg.items
        assert isinstance(item, m.OOL) and item.size == n and item.address % PS == 0
        first, end = vpn_span(item.address, n)
        assert self.root.free(first, end), hex(item.address)
        assert self.mem.read(item.address, n) == payload
        # what follows the data in its last page is not specified: make it known
        tail = pattern(seed + 1, end * PS - item.address - n)
        self.mem.write(item.address + n, tail)
        self.root.add(first, [bytearray(PS) for _ in range(first, end)])
        self.root.store(item.address, payload + tail)

    @precondition(lambda self: len(self.tasks) > 1)
    @rule(data=st.data())
    def ool_between_tasks(self, data: st.DataObject) -> None:
        """Memory sent out of line from one task to another (one of them a child)."""
        child = data.draw(st.sampled_from(self.children()), label="child")
        others = [t for t in self.tasks if t is not child]
        other = data.draw(st.sampled_from(others), label="other")
        sender, receiver = ((child, other) if data.draw(st.booleans(), label="child_sends")
                            else (other, child))
        addr, n = self.pick_bytes(data, sender, most=6)
        dealloc = data.draw(st.booleans(), label="deallocate")
        first, end = vpn_span(addr, n)
        err = sender.call_error(first, end, R)
        if err and sender is self.root:
            return  # failed sends are checked by ool_to_self
        snapshot = [bytearray(sender.pages[v].cell) for v in range(first, end)] if not err \
            else []
        arrived: list[tuple[int, int]] = []

        def cargo(msg: m.Message) -> None:
            assert msg.id == CARGO, msg
            (item,) = msg.items
            assert isinstance(item, m.OOL)
            arrived.append((item.address, item.size))

        if sender is not self.root:
            got = self.in_task(sender, send_ool, addr, n, dealloc, on_message=cargo)
            if err:
                assert got == ("err", "SEND_INVALID_MEMORY") and not arrived, (got, arrived)
                return
            assert got == ("ok", None) and len(arrived) == 1, (got, arrived)
        if dealloc:
            sender.remove(first, end)
        if receiver is self.root:
            self._receive_into(receiver, arrived[0], addr, n, snapshot)
            return
        # To the child: from the bootstrap task's memory, or relayed through it (moved).
        src, src_n, src_dealloc = ((addr, n, dealloc) if sender is self.root
                                   else (arrived[0][0], arrived[0][1], True))

        def give(msg: m.Message) -> None:
            assert msg.id == HANDSHAKE, msg
            (right,) = msg.items
            assert isinstance(right, m.Port)
            m.msg_send(m.Message(remote_port=right.name,
                                 items=[m.OOL(src, src_n, deallocate=src_dealloc)]))
            # (the send right goes away when the child deallocates the port)

        got = self.in_task(receiver, receive_ool, on_message=give)
        assert got[0] == "ok" and len(got[1]) == 1, got
        self._receive_into(receiver, got[1][0], addr, n, snapshot)

    # -- invariants -------------------------------------------------------------------
    @invariant()
    def regions_match_model(self) -> None:
        for t in self.tasks:
            seen: dict[int, tuple[int, int, int]] = {}
            prev_end = 0
            for r in m.vm_regions(t.port):
                assert r.size > 0 and r.address % PS == 0 and r.size % PS == 0, r
                assert r.address >= prev_end, f"{t}: regions overlap or are unsorted"
                assert r.protection & ~r.max_protection == 0, r
                prev_end = r.address + r.size
                for v in range(r.address // PS, prev_end // PS):
                    seen[v] = (r.protection, r.max_protection, r.inheritance)
            want = {v: (p.prot, p.maxp, p.inh) for v, p in t.pages.items()}
            if seen != want:
                diff = sorted(set(seen.items()) ^ set(want.items()))[:6]
                where = [(hex(v * PS), seen.get(v), want.get(v)) for v, _ in diff]
                raise AssertionError(f"{t}: vm_regions differs from the model at "
                                     f"(address, kernel, model) {where}")

    @invariant()
    def statistics_sane(self) -> None:
        s = m.vm_statistics(self.me)
        assert s.page_size == PS
        for name, value in vars(s).items():
            assert value >= 0, (name, value)
        assert s.free_count + s.active_count + s.inactive_count + s.wire_count <= FRAMES, s
        if self.last_stats is not None:
            for name in ("faults", "zero_fill_count", "cow_faults", "pageins", "pageouts",
                         "reactivations", "lookups", "hits"):
                assert getattr(s, name) >= getattr(self.last_stats, name), name
        self.last_stats = s

    @invariant()
    def indexes_match_walks(self) -> None:
        """What the kernel keeps instead of walking equals the walk: each object's count
        of busy pages (has_busy_pages, asked of both objects at every collapse), and each
        task map's entries by sharing map (_pmap_ranges, unlink)."""
        if not hasattr(self, "kernel"):
            return
        with self.kernel.sched.lock:
            objects = {id(p.object): p.object for p in self.kernel.vm.resident.pages
                       if p is not None and p.object is not None}
            for obj in objects.values():
                assert obj.busy_pages == sum(p.busy for p in obj.memq.values()), obj
            for task in self.kernel.tasks.values():
                vmap = task.map
                if vmap is None:
                    continue
                walked: dict[object, list[object]] = {}
                for e in vmap.entries:
                    if e.share_map is not None:
                        walked.setdefault(e.share_map, []).append(e)
                        assert vmap in e.share_map.sharers
                assert {k: set(v) for k, v in vmap.shared.items()} == \
                    {k: set(v) for k, v in walked.items()}

    @invariant()
    def contents_match_model(self) -> None:
        self.steps += 1
        if self.steps % FULL_CHECK_EVERY == 0:
            self.full_check()


class VmModelDeterministic(VmModel):
    """The same, under the seeded deterministic scheduler."""

    deterministic = True


HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
FREE = settings(max_examples=60, stateful_step_count=50, deadline=None,
                suppress_health_check=HEALTH)
DET = settings(FREE, max_examples=40, stateful_step_count=40)
# The long runs: 100 programs of 100 steps (10,000 steps, every memory read back in full
# every FULL_CHECK_EVERY steps); 200 programs took 4.7 minutes, a fifth of CI on 2 cores.
LONG = settings(FREE, max_examples=100, stateful_step_count=100)


# A passing run takes well under a minute; the long timeouts leave hypothesis the time to
# shrink a failure (several minutes at most) instead of dying with a bare timeout.

@pytest.mark.timeout(900)
def test_vm_model() -> None:
    run_state_machine_as_test(VmModel, settings=FREE)  # type: ignore[no-untyped-call]


@pytest.mark.timeout(900)
def test_vm_model_deterministic() -> None:
    run_state_machine_as_test(VmModelDeterministic, settings=DET)  # type: ignore[no-untyped-call]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_vm_model_long_runs() -> None:
    run_state_machine_as_test(VmModel, settings=LONG)  # type: ignore[no-untyped-call]


# --------------------------------------------------------------------------------------
# Memory pressure, directly: data larger than physical memory goes out and comes back.


@pytest.fixture(params=[False, True], ids=["free", "det"])
def small_kernel(request: pytest.FixtureRequest) -> Iterator[m.Kernel]:
    with m.boot(memory_size=MEMORY, page_size=PS, deterministic=request.param,
                seed=1987) as k:
        yield k


def test_pressure_pages_out_and_back(small_kernel: m.Kernel) -> None:
    me, mem = m.task_self(), m.memory()
    npages = 3 * FRAMES
    addr = m.vm_allocate(me, 0, npages * PS, True)
    for i in range(npages):
        mem[addr + i * PS:addr + (i + 1) * PS] = pattern(i, PS)
    child = m.task_create(me, True)  # a copy-on-write copy of all of it
    for i in range(0, npages, 2):
        mem[addr + i * PS:addr + i * PS + 8] = b"parent!!"
    for i in range(npages):
        want = pattern(i, PS)
        assert m.vm_read(child, addr + i * PS, PS) == want
        if i % 2 == 0:
            want = b"parent!!" + want[8:]
        assert mem[addr + i * PS:addr + (i + 1) * PS] == want
    s = m.vm_statistics(me)
    assert s.pageouts >= npages - FRAMES and s.pageins > 0, s
    assert s.free_count + s.active_count + s.inactive_count + s.wire_count <= FRAMES, s


# --------------------------------------------------------------------------------------
# Corners the state machine reaches only now and then, checked directly.


def test_vm_regions_of_a_fragmented_address_space(small_kernel: m.Kernel) -> None:
    """vm_regions describes every region however many there are (3.3: "a description of
    this task's address space"), and a large answer leaves the caller's later calls
    working."""
    me = m.task_self()
    base = FIX_VPN * PS
    for i in range(400):
        m.vm_allocate(me, base + 2 * i * PS, PS, False)
    assert [r.address for r in m.vm_regions(me) if r.address >= base] == [
        base + 2 * i * PS for i in range(400)]
    assert m.vm_read(me, base, 4) == bytes(4)


def test_vm_deallocate_of_nothing(small_kernel: m.Kernel) -> None:
    """Deallocating zero bytes deallocates nothing, wherever the address is (Mach's
    vm_deallocate returns at once for size 0)."""
    me = m.task_self()
    a = m.vm_allocate(me, 0, 2 * PS, True)
    m.vm_deallocate(me, a + 100, 0)
    m.vm_deallocate(me, a + PS, 0)
    assert [(r.address, r.size) for r in m.vm_regions(me, a, 2 * PS)] == [(a, 2 * PS)]
