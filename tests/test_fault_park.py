"""Page faults parked with a continuation (machd/fault_park.py).

machd's fault poller runs a fault as the faulting thread with waiting forbidden; one
that must wait for a page (a data manager's data) parks on the object's page queue,
and whoever wakes that queue runs it again on its own thread, so the faulting thread's
kernel thread is never woken. The first tests drive the poller's own function on the
embedded kernel (free scheduler) with a thread that never runs and a real RemoteState,
the test's task acting as the data manager by hand: what a parked fault holds, who
completes it, and every way it goes back to the kernel thread (`RemoteState.faults`).
The last ones run it under machd, with a data manager in a task of its own.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import pymach as m
from machutil import wait_until
from pagerutil import PS, Pager, routine
from pymach.include import traps
from pymach.include.channel import Channel
from pymach.ipc.mach_msg import msg_receive_locked
from pymach.kern.sched_prim import NOT_YET, Parked, WaitQueue, thread_continue, thread_park
from pymach.kern.thread import Thread, current_thread
from pymach.machd.fault_park import FailedFault, FaultHandoff, drop_parked_fault
from pymach.machd.faults import FaultPoller
from pymach.machd.remote import RemoteState, _continue, _run_trap
from pymach.pmap.uffd import FLAG_WRITE, Fault
from pymach.vm.vm_map import FaultPolicy


@pytest.fixture
def k() -> Iterator[m.Kernel]:
    with m.boot() as kernel:
        yield kernel


def idle_thread(kernel: m.Kernel) -> Thread:
    """A second thread of the caller's task that never runs; its faults are run by the
    poller's function, as machd runs a process thread's faults."""
    with kernel.sched.lock:
        t = kernel.thread_create_locked(current_thread().task, None, "faulting", start=False)
    t.state = "running"
    t.host_data = RemoteState(0)
    return t


def poller() -> FaultPoller:
    return FaultPoller.__new__(FaultPoller)  # only _resolve_now is exercised


def posted(t: Thread) -> list[Any]:
    return list(t.host_data.faults)


def mapped(t: Thread, a: int) -> int:
    vmap = t.task.map
    assert vmap is not None and vmap.pmap is not None
    return vmap.pmap.pmap_access(a)


class Setup:
    """A manager's object mapped in the test's task, a thread that faults on it, and
    one fault of that thread parked (the request received by hand)."""

    def __init__(self, k: m.Kernel, pages: int = 4, write: bool = False) -> None:
        self.k, self.p = k, Pager(size=pages * PS)
        self.a = self.p.map()
        self.p.init()
        self.t = idle_thread(k)
        self.fault = Fault(self.a, FLAG_WRITE if write else 0, 0)

    def park(self, t: Thread | None = None, fault: Fault | None = None) -> None:
        t = t or self.t
        assert poller()._resolve_now(t, fault or self.fault) is True
        cont = t.continuation
        assert cont is not None and isinstance(cont.handoff, FaultHandoff)
        assert (t.state, t.wait_queue, t.vm_waiting) == ("waiting", cont.waitq, cont.handoff.obj)
        assert cont in cont.waitq.parked and posted(t) == []


def refs(s: Setup) -> int:
    cont = s.t.continuation
    assert cont is not None and isinstance(cont.handoff, FaultHandoff)
    return int(cont.handoff.obj.ref_count)


def settled(t: Thread) -> bool:
    return (t.continuation, t.vm_waiting, t.wait_queue, t.state) == (None, None, None,
                                                                      "running")


def test_the_managers_data_completes_a_parked_fault_on_the_providers_thread(
        k: m.Kernel) -> None:
    s = Setup(k)
    s.park()
    obj = s.t.continuation.handoff.obj  # type: ignore[union-attr]
    held = obj.ref_count
    assert s.p.expect("pager_data_request")[1] == 0  # asked once, by the poller's run
    assert not mapped(s.t, s.a) & m.VM_PROT_READ
    s.p.provide(0)  # this thread's trap wakes the queue: the fault completes in it
    assert settled(s.t) and posted(s.t) == []  # its kernel thread has nothing to do
    assert mapped(s.t, s.a) & m.VM_PROT_READ
    assert obj.ref_count == held - 1  # the parked fault's reference is gone
    assert m.memory()[s.a:s.a + 8] == bytes(s.p.data[:8])
    assert s.p.count("pager_data_request") == 1


def test_data_for_another_page_leaves_the_fault_parked(k: m.Kernel) -> None:
    s = Setup(k)
    s.park()
    s.p.expect("pager_data_request")
    s.p.provide(2 * PS)  # wakes the object's queue, but this page is still absent
    assert s.t.continuation is not None and posted(s.t) == []
    s.p.provide(0)
    assert settled(s.t) and mapped(s.t, s.a) & m.VM_PROT_READ


def test_two_threads_faulting_on_one_page_both_complete_with_one_answer(
        k: m.Kernel) -> None:
    s = Setup(k)
    t2 = idle_thread(k)
    s.park()
    s.park(t2, s.fault)  # finds the page asked for, and waits for it
    assert s.p.expect("pager_data_request")[1] == 0
    s.p.provide(0)
    assert settled(s.t) and settled(t2) and posted(s.t) == posted(t2) == []
    assert s.p.count("pager_data_request") == 1


def test_a_write_fault_parks_and_completes_writable(k: m.Kernel) -> None:
    s = Setup(k, write=True)
    s.park()
    s.p.expect("pager_data_request")
    s.p.provide(0)
    assert settled(s.t) and mapped(s.t, s.a) & m.VM_PROT_WRITE


def test_termination_hands_the_fault_back_to_its_kernel_thread(k: m.Kernel) -> None:
    s = Setup(k)
    s.park()
    before = refs(s) - 1
    obj = s.t.continuation.handoff.obj  # type: ignore[union-attr]
    with k.sched.lock:
        s.t.terminating = True
        k.sched.thread_interrupt(s.t)
    assert posted(s.t) == [s.fault]  # it runs the fault, and unwinds there
    assert s.t.continuation is None and s.t.vm_waiting is None
    assert obj.ref_count == before


def test_a_suspended_thread_gets_its_fault_back_when_the_data_comes(k: m.Kernel) -> None:
    s = Setup(k)
    s.park()
    s.t.suspend_count = 1
    s.p.expect("pager_data_request")
    s.p.provide(0)
    assert posted(s.t) == [s.fault] and s.t.continuation is None
    assert not mapped(s.t, s.a) & m.VM_PROT_READ  # not run for a suspended thread


def test_a_thread_someone_acts_as_gets_its_fault_back(k: m.Kernel) -> None:
    s = Setup(k)
    s.park()
    s.p.expect("pager_data_request")
    with s.t.host_data.busy:  # its kernel thread is in a trap (a stale event) meanwhile
        s.p.provide(0)
    assert posted(s.t) == [s.fault] and settled(s.t)


def test_the_self_backing_verdict_reaches_the_kernel_thread(k: m.Kernel) -> None:
    s = Setup(k)
    s.park()
    with k.sched.lock:  # what memory_object.check_not_self_backed does to a waiter
        s.t.vm_wait_error = "deadlock: no other thread is free"
        k.sched.thread_interrupt(s.t)
    [failed] = posted(s.t)
    assert isinstance(failed, FailedFault) and failed.fault == s.fault
    assert failed.error.code == "KERN_MEMORY_ERROR" and s.t.vm_wait_error == ""
    assert settled(s.t)


def test_a_fault_refused_once_the_data_comes_reaches_the_kernel_thread(
        k: m.Kernel) -> None:
    s = Setup(k)
    s.park()
    s.p.expect("pager_data_request")
    m.vm_deallocate(m.task_self(), s.a, 4 * PS)  # the fault's object stays (its reference)
    s.p.provide(0)
    [failed] = posted(s.t)
    assert isinstance(failed, FailedFault) and failed.error.code == "KERN_INVALID_ADDRESS"
    assert settled(s.t)


def test_a_dropped_fault_lets_go_and_nobody_completes_it(k: m.Kernel) -> None:
    s = Setup(k)
    s.park()
    cont = s.t.continuation
    assert cont is not None
    obj = cont.handoff.obj  # type: ignore[attr-defined]
    before = obj.ref_count
    with k.sched.lock:
        drop_parked_fault(s.t)
    assert settled(s.t) and cont not in cont.waitq.parked and obj.ref_count == before - 1
    s.p.expect("pager_data_request")
    s.p.provide(0)  # the page settles; the thread left that fault
    assert posted(s.t) == [] and not mapped(s.t, s.a) & m.VM_PROT_READ


def test_a_new_fault_of_the_thread_replaces_its_stale_parked_one(k: m.Kernel) -> None:
    s = Setup(k)
    s.park()
    old = s.t.continuation
    s.park(s.t, Fault(s.a + PS, 0, 0))  # it was woken another way, and faulted again
    assert s.t.continuation is not old and old is not None
    assert old not in old.waitq.parked
    assert [v[1] for v in (s.p.expect("pager_data_request"),
                           s.p.expect("pager_data_request"))] == [0, PS]
    s.p.provide(0)
    assert s.t.continuation is not None  # the old one is nobody's now
    s.p.provide(PS)
    assert settled(s.t) and mapped(s.t, s.a + PS) & m.VM_PROT_READ


def test_a_wait_with_a_deadline_is_left_to_the_kernel_thread(k: m.Kernel) -> None:
    s = Setup(k)
    k.vm.fault_policy = FaultPolicy(timeout_ms=60_000)
    assert poller()._resolve_now(s.t, s.fault) is False  # the caller posts it
    assert settled(s.t) and posted(s.t) == []


def test_a_thread_with_a_parked_trap_gets_no_parked_fault(k: m.Kernel) -> None:
    s = Setup(k)
    p = m.port_allocate(m.task_self())

    class Quiet:
        def deliver(self, outcome: Any) -> None:
            pass

        def wake(self) -> None:
            pass

    with k.sched.lock, pytest.raises(Parked):
        msg_receive_locked(s.t, p, None, m.MSG_SIZE_MAX, Quiet())
    trap = s.t.continuation
    assert poller()._resolve_now(s.t, s.fault) is False  # a stale event: not parked
    assert s.t.continuation is trap


def test_a_parked_fault_is_never_continued_as_a_trap(k: m.Kernel) -> None:
    s = Setup(k)
    s.park()
    assert thread_continue(s.t) is NOT_YET  # the kernel thread's loop finds nothing to do
    assert s.t.continuation is not None


def test_concurrent_faults_on_many_pages_all_complete(k: m.Kernel) -> None:
    s = Setup(k, pages=16)
    threads = [idle_thread(k) for _ in range(8)]
    for i, t in enumerate(threads):
        s.park(t, Fault(s.a + (i % 4) * PS, 0, 0))  # two threads per page
    asked = sorted(s.p.expect("pager_data_request")[1] for _ in range(4))
    assert asked == [0, PS, 2 * PS, 3 * PS]
    done = threading.Event()

    def provider() -> None:  # another thread of the task answers, in reverse order
        for off in reversed(asked):
            s.p.provide(off)
        done.set()

    m.thread_create(m.task_self(), provider)
    assert done.wait(10)
    assert all(settled(t) and posted(t) == [] for t in threads)


# -- under machd ------------------------------------------------------------------------
class Squares(m.DataManager):
    """Page n holds the int64 n*n, repeated."""

    threads = 1  # one request at a time: faults wait on each other's pages

    def read(self, memory_object: int, offset: int, length: int, access: int) -> bytes:
        return b"".join(((offset // PS + i) ** 2).to_bytes(8, "little") * (PS // 8)
                        for i in range(length // PS))

    def pager_terminate(self, memory_object: int, request: int) -> None:
        self.stop()


def _serve_squares() -> None:
    dm = Squares()
    mo = dm.create_memory_object()
    ask = m.msg_receive(m.task_notify(), m.RCV_TIMEOUT, 20_000)
    m.msg_send(m.Message(remote_port=ask.items[0].value,  # type: ignore[arg-type]
                         items=[m.Port(mo, m.MAKE_SEND)]))
    dm.serve()


def _memory_object_of(h: m.mach.Spawned) -> int:
    box = m.port_allocate(m.task_self())
    notify = m.task_get_special_port(h.port, m.TASK_NOTIFY_PORT)
    m.msg_send(m.Message(remote_port=notify, items=[m.Port(box, m.MAKE_SEND)]))
    return int(m.msg_receive(box, m.RCV_TIMEOUT, 20_000).items[0].value)  # type: ignore


def _read_pages(a: int, order: list[int], out: dict[int, int]) -> None:
    view = m.memory()
    for i in order:
        out[i] = int.from_bytes(view[a + i * PS:a + i * PS + 8], "little")


def test_threads_of_a_native_task_fault_together_on_a_pager(native: str) -> None:
    """Four threads read the same 32 pages in different orders while a pager in another
    task serves them one request at a time: faults park on the object's queue, two or
    more at once, and each is completed by the pager's call or runs on its own."""
    me = m.task_self()
    pager = m.spawn(_serve_squares, name="squares")
    n = 32
    a = m.vm_allocate_with_pager(me, 0, n * PS, True, _memory_object_of(pager), 0)
    orders = [list(range(n)), list(reversed(range(n))), list(range(0, n, 2)) +
              list(range(1, n, 2)), [(i * 7) % n for i in range(n)]]
    seen: list[dict[int, int]] = [{} for _ in orders]
    for order, out in zip(orders, seen, strict=True):
        m.thread_create(me, _read_pages, a, order, out)
    wait_until(lambda: all(len(s) == n for s in seen))
    assert all(s == {i: i * i for i in range(n)} for s in seen)
    m.vm_deallocate(me, a, n * PS)
    pager.result(20_000)


def _waits_on(a: int) -> bytes:
    return bytes(m.memory()[a:a + 4])  # its manager never answers: it waits here


def test_a_task_whose_fault_waits_on_a_silent_manager_can_be_terminated(
        native: str) -> None:
    """The manager (this task) never answers; the task faulting on its object waits with
    its fault parked, and its termination ends it (the fault goes back to its kernel
    thread, which unwinds), while machd goes on serving faults."""
    me = m.task_self()
    mo = m.port_allocate(me)
    child = m.spawn(_waits_on_mapped, name="waiter")
    notify = m.task_get_special_port(child.port, m.TASK_NOTIFY_PORT)
    m.msg_send(m.Message(remote_port=notify, items=[m.Port(mo, m.MAKE_SEND)]))
    got = [routine(m.msg_receive(mo, m.RCV_TIMEOUT, 20_000)) for _ in range(2)]
    assert got == ["pager_init", "pager_data_request"]
    m.task_terminate(child.port)
    assert child.result(20_000) is None  # ended without returning
    b = m.vm_allocate(me, 0, PS, True)
    m.memory()[b:b + 2] = b"ok"  # machd still serves this task's faults
    assert m.memory()[b:b + 2] == b"ok"


def _waits_on_mapped() -> bytes:
    mo = m.msg_receive(m.task_notify(), m.RCV_TIMEOUT, 20_000).items[0].value
    a = m.vm_allocate_with_pager(m.task_self(), 0, PS, True, mo, 0)  # type: ignore[arg-type]
    return _waits_on(a)


def parked(k: m.Kernel) -> tuple[Setup, Any]:
    """A Setup with its fault parked, and the fault's continuation."""
    s = Setup(k)
    s.park()
    cont = s.t.continuation
    assert cont is not None
    return s, cont


def test_a_trap_of_the_thread_drops_its_parked_fault(k: m.Kernel) -> None:
    """The process thread made a trap, so it is not in its fault any more (the event
    was stale): the trap runs with the fault dropped, and nothing will complete it."""
    s, cont = parked(k)
    here, there = socket.socketpair()
    with contextlib.closing(here), contextlib.closing(there):
        _run_trap(s.t, Channel(here), lambda: 42)
        assert settled(s.t) and cont not in cont.waitq.parked
        reply = Channel(there).recv()
        assert reply.op == traps.REPLY and reply.values[:2] == [traps.REPLY_OK, 42]


def test_a_kick_of_the_kernel_thread_leaves_its_parked_fault(k: m.Kernel) -> None:
    """The kernel thread's loop, kicked while a fault of its thread is parked (a fault
    posted to it meanwhile, say), looks for a parked trap to finish: it must leave the
    parked fault to its waker, or the process thread stays in its fault for ever (seen
    under load: a native task hung in a page fault machd had dropped)."""
    s, cont = parked(k)
    here, there = socket.socketpair()
    with contextlib.closing(here), contextlib.closing(there):
        _continue(s.t, Channel(here))
        assert s.t.continuation is cont and cont in cont.waitq.parked
        there.setblocking(False)
        with pytest.raises(BlockingIOError):
            there.recv(1)  # no reply: the process thread made no trap
    s.p.expect("pager_data_request")
    s.p.provide(0)  # the waker still completes it
    assert settled(s.t) and posted(s.t) == []
    assert mapped(s.t, s.a) & m.VM_PROT_READ


def test_a_wake_up_within_a_continuations_own_attempt_does_not_offer_it_again(
        k: m.Kernel) -> None:
    """A parked call's attempt may itself wake its queue (a fault's run sends messages,
    settles pages): the waker must not offer the same call again from within it (it
    would run twice, or be completed twice)."""
    q = WaitQueue(k.sched.lock, "test")
    t = idle_thread(k)
    runs: list[int] = []
    done: list[Any] = []

    class Once:
        def deliver(self, outcome: Any) -> None:
            done.append(outcome)

        def wake(self) -> None:
            done.append("woken")

    def attempt() -> str:
        runs.append(1)
        k.sched.thread_wakeup(q)  # (kernel lock held, as in a real attempt)
        return "done"

    with k.sched.lock:
        with pytest.raises(Parked):
            thread_park(t, q, None, attempt, lambda: None, Once())
        k.sched.thread_wakeup(q)
    assert runs == [1] and done == ["done"]
    assert t.continuation is None and not q.parked
