"""Tasks and threads (paper 3.1): creation, termination, suspension, special ports."""

from __future__ import annotations

import contextlib

import pytest

import pymach as m
from machutil import (
    assert_kernel_ok,
    has_name,
    notifications,
    recv,
    sleep_ms,
    start_thread,
    thread_state,
    wait_notification,
    wait_until,
)
from pymach import NOTIFY_PORT_DELETED, Int, Message, Port

CONTRACT = True  # these run as native tasks of machd too (conftest.py)

BOOT = m.TASK_BOOTSTRAP_PORT


def new_port() -> int:
    return m.port_allocate(m.task_self())  # type: ignore[no-any-return]


def send(dest: int, *items: object, timeout: float = 1000) -> None:
    m.msg_send(Message(remote_port=dest, items=list(items)), m.SEND_TIMEOUT, timeout)


def counter_loop(box: dict[str, int]) -> None:
    """Count rounds of Mach calls until box["stop"] is set."""
    box.setdefault("n", 0)
    while not box.get("stop"):
        box["n"] += 1
        sleep_ms(1)


# -- identity ------------------------------------------------------------------------


def test_identity_calls(kernel: m.Kernel) -> None:
    me = m.task_self()
    assert m.task_self() == me  # one name per port
    assert m.task_info(me) == ("bootstrap", 0, 1, len(kernel.lsmp("bootstrap")))
    assert m.thread_info(m.thread_self()) == ("bootstrap.main", "running", 0)
    assert m.task_threads(me) == (m.thread_self(),)
    assert m.task_get_special_port(me, m.TASK_KERNEL_PORT) == me
    assert m.task_get_special_port(me, m.TASK_NOTIFY_PORT) == m.task_notify()
    assert m.task_get_special_port(me, BOOT) == m.PORT_NULL  # the first task has none
    reply = m.thread_reply()
    assert m.thread_reply() == reply
    assert m.port_status(me, reply)[3:] == (True, True)
    page, memory, ntasks, nthreads, det = m.host_info(m.host_self())
    assert (page, memory) == (kernel.page_size, kernel.memory_size)
    # us, and the default pager task (6.2.2) with its one thread (and under machd, the
    # thread-less bootstrap task our task was created from)
    assert (ntasks, nthreads, det) == (len(kernel.ps()), 2, kernel.sched.deterministic)
    assert ntasks in (2, 3)
    assert m.host_kernel_version(m.host_self()).startswith(f"pymach {m.__version__}")


def test_thread_reply_is_replaced_when_destroyed(kernel: m.Kernel) -> None:
    reply = m.thread_reply()
    # As in Mach, the RPC that destroys its own reply port cannot get its reply
    with pytest.raises(m.RcvError) as e:
        m.port_deallocate(m.task_self(), reply)
    assert e.value.code == "RCV_INVALID_PORT"
    assert not has_name(reply)
    new = m.thread_reply()
    assert new != reply and m.port_status(m.task_self(), new)[3:] == (True, True)
    assert_kernel_ok()


# -- tasks --------------------------------------------------------------------------------


def test_task_create_makes_empty_child(kernel: m.Kernel) -> None:
    me = m.task_self()
    child = m.task_create(me)
    name, suspended, nthreads, nports = m.task_info(child)
    assert (suspended, nthreads) == (0, 0)
    assert nports == 2  # its own task port and its notify port
    assert m.task_threads(child) == ()
    rows = {r.name: r for r in kernel.ps()}
    assert rows[name].parent == "bootstrap" and rows[name].threads == ()
    grandchild = m.task_create(child, True)
    assert next(r for r in kernel.ps() if r.name == m.task_info(grandchild)[0]).parent == name
    m.task_terminate(child)
    m.task_terminate(grandchild)


def test_task_terminate_destroys_task_port(kernel: m.Kernel) -> None:
    child = m.task_create(m.task_self())
    name = m.task_info(child)[0]
    m.task_terminate(child)
    assert not has_name(child)
    assert (NOTIFY_PORT_DELETED, child) in notifications()
    with pytest.raises(m.SendError) as e:
        m.task_info(child)
    assert e.value.code == "SEND_INVALID_PORT"
    assert name not in [r.name for r in kernel.ps()]
    assert_kernel_ok()


@pytest.mark.embedded_only("the child task shares a Python dict with the test")
def test_task_terminate_ends_running_threads(kernel: m.Kernel) -> None:
    box: dict[str, int] = {}

    def child() -> str:
        try:
            counter_loop(box)
        finally:
            box["unwound"] = 1
        return "finished"

    h = kernel.spawn(child, name="looper")
    wait_until(lambda: box.get("n", 0) > 3)
    m.task_terminate(h.port)
    assert h.result(5000) is None  # it never returned
    assert box["unwound"] == 1
    assert "looper" not in [r.name for r in kernel.ps()]


def test_task_terminates_itself(kernel: m.Kernel) -> None:
    box: dict[str, int] = {}

    def child() -> str:
        m.task_terminate(m.task_self())
        box["after"] = 1
        return "returned"

    assert kernel.run(child, timeout=5000) is None
    assert box == {}
    assert_kernel_ok()


def test_spawned_task_ends_with_first_thread(kernel: m.Kernel) -> None:
    def child(a: int, *, b: int) -> tuple[object, ...]:
        return a + b, m.task_info(m.task_self())[:3]

    h = kernel.spawn(child, 1, b=2, name="adder")
    assert h.result(5000) == (3, ("adder", 0, 1))
    assert h.done
    wait_notification(NOTIFY_PORT_DELETED, h.port)
    assert "adder" not in [r.name for r in kernel.ps()]


def test_task_handle_reraises_and_times_out(kernel: m.Kernel) -> None:
    def fails() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        kernel.run(fails, timeout=5000)

    def waits() -> None:
        recv(new_port(), 5000)

    h = kernel.spawn(waits)
    with pytest.raises(m.KernError) as e:
        h.result(10)
    assert e.value.code == "KERN_OPERATION_TIMED_OUT"
    m.task_terminate(h.port)
    assert h.result(5000) is None


@pytest.mark.embedded_only("the child task shares a Python dict with the test")
def test_task_suspend_and_resume(kernel: m.Kernel) -> None:
    box: dict[str, int] = {}
    h = kernel.spawn(counter_loop, box)
    wait_until(lambda: box.get("n", 0) > 2)
    m.task_suspend(h.port)
    m.task_suspend(h.port)
    assert m.task_info(h.port)[1] == 2
    thread = m.task_threads(h.port)[0]
    wait_until(lambda: thread_state(thread) == "suspended")
    frozen = box["n"]
    sleep_ms(30)
    assert box["n"] == frozen
    m.task_resume(h.port)
    sleep_ms(20)
    assert box["n"] == frozen  # still suspended once
    assert thread_state(thread) == "suspended"
    m.task_resume(h.port)
    wait_until(lambda: box["n"] > frozen)
    with pytest.raises(m.KernError) as e:
        m.task_resume(h.port)
    assert e.value.code == "KERN_FAILURE"
    box["stop"] = 1
    h.result(5000)


@pytest.mark.embedded_only("the child task shares a Python dict with the test")
def test_task_suspends_itself_until_resumed(kernel: m.Kernel) -> None:
    box: dict[str, int] = {}

    def child() -> str:
        m.task_suspend(m.task_self())
        box["resumed"] = 1
        return "ok"

    h = kernel.spawn(child)
    thread = m.task_threads(h.port)[0]
    wait_until(lambda: thread_state(thread) == "suspended")
    sleep_ms(10)
    assert box == {}
    m.task_resume(h.port)
    assert h.result(5000) == "ok"
    assert box == {"resumed": 1}


@pytest.mark.embedded_only("the child task shares a Python dict with the test")
def test_new_threads_of_suspended_task_stop_at_first_call(kernel: m.Kernel) -> None:
    child = m.task_create(m.task_self())
    m.task_suspend(child)
    box: dict[str, int] = {}

    def body() -> None:
        m.task_self()
        box["ran"] = 1

    t = m.thread_create(child, body)
    wait_until(lambda: thread_state(t) == "suspended")
    assert box == {}
    m.task_resume(child)
    wait_until(lambda: box.get("ran") == 1)
    m.task_terminate(child)


def test_task_threads_lists_threads_oldest_first(kernel: m.Kernel) -> None:
    stop = new_port()
    t1, _ = start_thread(recv, stop)
    t2, _ = start_thread(recv, stop)
    assert m.task_threads(m.task_self()) == (m.thread_self(), t1, t2)
    assert m.task_info(m.task_self())[2] == 3
    send(stop, Int(0))
    send(stop, Int(0))
    wait_until(lambda: m.task_threads(m.task_self()) == (m.thread_self(),))


# -- threads ------------------------------------------------------------------------------


def test_thread_create_runs_in_task(kernel: m.Kernel) -> None:
    p = new_port()

    def body(x: int) -> None:
        # a thread shares its task's name space: it can receive on the task's ports
        msg = recv(p)
        send(msg.remote_port, Int(x + msg.values()[0]))

    t, box = start_thread(body, 40)
    name, state, count = m.thread_info(t)
    assert name.startswith("bootstrap.") and count == 0
    assert state in ("running", "waiting")
    reply = new_port()
    m.msg_send(Message(remote_port=p, local_port=reply, items=[Int(2)]))
    assert recv(reply).values() == [42]
    wait_until(lambda: "done" in box)
    wait_notification(NOTIFY_PORT_DELETED, t)  # a halted thread's port dies
    with pytest.raises(m.SendError):
        m.thread_info(t)


def test_thread_create_in_another_task(kernel: m.Kernel) -> None:
    b = new_port()
    m.task_set_special_port(m.task_self(), BOOT, b)
    child = m.task_create(m.task_self())

    def body() -> None:
        send(m.task_get_special_port(m.task_self(), BOOT), Int(len(m.task_threads(
            m.task_self()))), Port(m.task_self(), m.COPY_SEND))

    m.thread_create(child, body)
    msg = recv(b)
    assert msg.values()[0] == 1
    assert msg.values()[1] == child  # a right to the child's task port: our name for it
    m.task_terminate(child)


def test_thread_terminate_while_blocked_in_receive(kernel: m.Kernel) -> None:
    p = new_port()
    box: dict[str, object] = {}

    def body() -> None:
        try:
            m.msg_receive(p)
            box["received"] = True
        except m.MachError as e:
            box["error"] = e.code
        finally:
            box["finally"] = True

    t = m.thread_create(m.task_self(), body)
    wait_until(lambda: thread_state(t) == "waiting")
    m.thread_terminate(t)
    wait_until(lambda: "finally" in box)
    assert box == {"finally": True}  # unwound: no return, no MachError
    assert not has_name(t)
    assert m.task_threads(m.task_self()) == (m.thread_self(),)
    # the port it waited on is unharmed
    send(p, Int(1))
    assert recv(p).values() == [1]


def test_thread_terminate_running_thread_and_itself(kernel: m.Kernel) -> None:
    box: dict[str, int] = {}
    t, tbox = start_thread(counter_loop, box)
    wait_until(lambda: box.get("n", 0) > 1)
    m.thread_terminate(t)
    wait_until(lambda: "done" in tbox)
    assert "result" not in tbox and "error" not in tbox

    after: dict[str, int] = {}

    def suicide() -> None:
        m.thread_terminate(m.thread_self())
        after["ran"] = 1

    _, box2 = start_thread(suicide)
    wait_until(lambda: "done" in box2)
    assert after == {} and "result" not in box2
    # a halted thread's port is dead, so our name for it is gone
    with pytest.raises(m.SendError) as e:
        m.thread_terminate(t)
    assert e.value.code == "SEND_INVALID_PORT"


def test_thread_suspend_resume_counts(kernel: m.Kernel) -> None:
    box: dict[str, int] = {}
    t, _ = start_thread(counter_loop, box)
    wait_until(lambda: box.get("n", 0) > 1)
    m.thread_suspend(t)
    m.thread_suspend(t)
    wait_until(lambda: thread_state(t) == "suspended")
    assert m.thread_info(t)[2] == 2
    frozen = box["n"]
    sleep_ms(20)
    assert box["n"] == frozen
    m.thread_resume(t)
    assert m.thread_info(t)[1:] == ("suspended", 1)
    m.thread_resume(t)
    wait_until(lambda: box["n"] > frozen)
    with pytest.raises(m.KernError) as e:
        m.thread_resume(t)
    assert e.value.code == "KERN_FAILURE"
    box["stop"] = 1


def test_suspended_thread_blocked_in_receive_stops_after_it_returns(kernel: m.Kernel) -> None:
    p = new_port()
    box: dict[str, object] = {}

    def body() -> None:
        box["got"] = recv(p, 10_000).values()

    t = m.thread_create(m.task_self(), body)
    wait_until(lambda: thread_state(t) == "waiting")
    m.thread_suspend(t)
    send(p, Int(5))
    # the message is taken, but the thread does not get back to its code
    wait_until(lambda: m.port_status(m.task_self(), p)[1] == 0)
    wait_until(lambda: thread_state(t) == "suspended")
    sleep_ms(20)
    assert box == {}
    m.thread_resume(t)
    wait_until(lambda: "got" in box)
    assert box["got"] == [5]


def test_suspended_thread_whose_receive_times_out_stays_stopped(kernel: m.Kernel) -> None:
    """A call that fails returns too: the suspension holds there as well."""
    p = new_port()
    t, box = start_thread(lambda: m.msg_receive(p, m.RCV_TIMEOUT, 20))
    wait_until(lambda: thread_state(t) == "waiting")
    m.thread_suspend(t)
    sleep_ms(60)
    assert "done" not in box
    assert m.thread_info(t)[1:] == ("suspended", 1)
    m.thread_resume(t)
    wait_until(lambda: "done" in box)
    assert box["error"] == "RCV_TIMED_OUT"


def test_thread_in_loop_of_failing_calls_can_be_terminated(kernel: m.Kernel) -> None:
    box: dict[str, int] = {"n": 0}

    def body() -> None:
        while box["n"] < 100_000:
            box["n"] += 1
            with contextlib.suppress(m.MachError):
                m.msg_send("not a message")  # type: ignore[arg-type]

    t, tbox = start_thread(body)
    if not kernel.sched.deterministic:
        wait_until(lambda: box["n"] > 10)
    m.thread_terminate(t)
    wait_until(lambda: "done" in tbox, timeout_ms=10_000)
    assert box["n"] < 100_000


# -- special ports -----------------------------------------------------------------------


def test_bootstrap_port_is_inherited(kernel: m.Kernel) -> None:
    b = new_port()
    m.task_set_special_port(m.task_self(), BOOT, b)
    assert m.task_get_special_port(m.task_self(), BOOT) == b

    def grandchild() -> None:
        send(m.task_get_special_port(m.task_self(), BOOT), text_item("grandchild"))

    def child() -> None:
        send(m.task_get_special_port(m.task_self(), BOOT), text_item("child"))
        kernel.run(grandchild, timeout=5000)

    kernel.run(child, timeout=5000)
    assert [recv(b).values()[0], recv(b).values()[0]] == ["child", "grandchild"]
    # task_create children inherit too
    child_task = m.task_create(m.task_self())
    assert m.task_info(child_task)[3] == 3  # task port, notify port, bootstrap port
    m.task_terminate(child_task)


def text_item(text: str) -> m.Str:
    return m.Str(text)


def test_set_special_ports_of_another_task(kernel: m.Kernel) -> None:
    b, other = new_port(), new_port()
    child = m.task_create(m.task_self())
    m.task_set_special_port(child, BOOT, b)

    def body() -> None:
        send(m.task_get_special_port(m.task_self(), BOOT), Int(7))

    m.thread_create(child, body)
    assert recv(b).values() == [7]
    m.task_set_special_port(child, BOOT, other)
    m.thread_create(child, body)
    assert recv(other).values() == [7]
    m.task_terminate(child)


def test_set_notify_port_redirects_notifications(kernel: m.Kernel) -> None:
    me = m.task_self()
    old = m.task_notify()
    mine = new_port()
    m.task_set_special_port(me, m.TASK_NOTIFY_PORT, mine)
    assert m.task_notify() == mine
    assert m.task_get_special_port(me, m.TASK_NOTIFY_PORT) == mine
    child = m.task_create(me)
    m.task_terminate(child)
    msg = recv(mine)
    assert (msg.id, msg.values()) == (NOTIFY_PORT_DELETED, [child])
    assert m.port_status(me, old)[1] == 0


def test_kernel_port_cannot_be_set(kernel: m.Kernel) -> None:
    p = new_port()
    with pytest.raises(m.KernError) as e:
        m.task_set_special_port(m.task_self(), m.TASK_KERNEL_PORT, p)
    assert e.value.code == "KERN_INVALID_ARGUMENT"
    assert m.task_get_special_port(m.task_self(), m.TASK_KERNEL_PORT) == m.task_self()


# -- a task port held by another task ----------------------------------------------------


def test_task_port_operated_on_by_another_task(kernel: m.Kernel) -> None:
    """We give a child a send right to a third task's port; the child manipulates it."""
    b = new_port()
    m.task_set_special_port(m.task_self(), BOOT, b)
    victim = m.task_create(m.task_self())
    vname = m.task_info(victim)[0]

    def controller() -> tuple[object, ...]:
        inbox = new_port()
        send(m.task_get_special_port(m.task_self(), BOOT), Port(inbox, m.MAKE_SEND))
        target = recv(inbox).items[0].name  # type: ignore[union-attr]
        p = m.port_allocate(target)
        m.port_set_backlog(target, p, 3)
        m.task_suspend(target)
        info = m.task_info(target)
        m.task_resume(target)
        t = m.thread_create(target, lambda: None)
        m.task_terminate(target)
        return p, info, m.port_status.__name__, t

    h = kernel.spawn(controller)
    inbox = recv(b).items[0].name  # type: ignore[union-attr]
    send(inbox, Port(victim, m.COPY_SEND))
    p, info, _, _ = h.result(5000)
    assert info[0] == vname and info[1] == 1 and info[3] >= 3
    assert vname not in [r.name for r in kernel.ps()]
    assert not has_name(victim)
    _ = p


def test_thread_port_operated_on_by_another_task(kernel: m.Kernel) -> None:
    b = new_port()
    m.task_set_special_port(m.task_self(), BOOT, b)
    box: dict[str, int] = {}
    t, _ = start_thread(counter_loop, box)
    wait_until(lambda: box.get("n", 0) > 0)

    def controller() -> tuple[object, ...]:
        inbox = new_port()
        send(m.task_get_special_port(m.task_self(), BOOT), Port(inbox, m.MAKE_SEND))
        target = recv(inbox).items[0].name  # type: ignore[union-attr]
        m.thread_suspend(target)
        wait_until(lambda: m.thread_info(target)[1] == "suspended")
        info = m.thread_info(target)
        m.thread_resume(target)
        m.thread_terminate(target)
        return info

    h = kernel.spawn(controller)
    inbox = recv(b).items[0].name  # type: ignore[union-attr]
    send(inbox, Port(t, m.COPY_SEND))
    info = h.result(5000)
    assert info[1:] == ("suspended", 1)
    wait_until(lambda: not has_name(t))
    assert m.task_threads(m.task_self()) == (m.thread_self(),)
