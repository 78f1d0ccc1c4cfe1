"""Small helpers for tests that run inside a booted kernel (as a Mach thread)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pymach as m
from pymach import Message

WAIT_MS = 3000  # upper bound for anything that should happen "soon"


def recv(port: int = m.PORT_NULL, timeout: float = WAIT_MS,
         rcv_size: int = m.MSG_SIZE_MAX) -> Message:
    """msg_receive with a timeout, so a bug fails instead of hanging."""
    return m.msg_receive(port, m.RCV_TIMEOUT, timeout, rcv_size)


def sleep_ms(ms: float) -> None:
    """Let time pass inside the kernel (virtual time in deterministic mode)."""
    task = m.task_self()
    p = m.port_allocate(task)
    try:
        m.msg_receive(p, m.RCV_TIMEOUT, ms)
    except m.RcvError as e:
        assert e.code == "RCV_TIMED_OUT"
    finally:
        m.port_deallocate(task, p)


def wait_until(pred: Callable[[], Any], timeout_ms: float = WAIT_MS, step_ms: float = 2) -> Any:
    """Poll `pred` (letting other threads run between polls) until it is true."""
    waited = 0.0
    while True:
        value = pred()
        if value:
            return value
        if waited >= timeout_ms:
            raise AssertionError(f"condition not met within {timeout_ms} ms")
        sleep_ms(step_ms)
        waited += step_ms


def notifications(timeout: float = 0) -> list[tuple[int, int]]:
    """Drain the caller's notify port: (id, name) of each queued notification."""
    port = m.task_notify()
    out = []
    while True:
        try:
            msg = m.msg_receive(port, m.RCV_TIMEOUT, timeout)
        except m.RcvError as e:
            assert e.code == "RCV_TIMED_OUT"
            return out
        assert len(msg.items) == 1 and isinstance(msg.items[0], m.Int)
        out.append((msg.id, msg.items[0].value))


def wait_notification(kind: int, name: int, timeout: float = WAIT_MS) -> list[tuple[int, int]]:
    """Receive notifications until (kind, name) arrives; return all seen, in order."""
    port = m.task_notify()
    seen = []
    while True:
        msg = recv(port, timeout)
        seen.append((msg.id, msg.items[0].value))  # type: ignore[union-attr]
        if seen[-1] == (kind, name):
            return seen


def bootstrap_port() -> int:
    """A new port of ours, made our bootstrap port (children inherit it: their
    parent_port())."""
    p: int = m.port_allocate(m.task_self())
    m.task_set_special_port(m.task_self(), m.TASK_BOOTSTRAP_PORT, p)
    return p


def parent_port() -> int:
    """Our bootstrap port (a child's way to its parent's bootstrap_port())."""
    return m.task_get_special_port(m.task_self(), m.TASK_BOOTSTRAP_PORT)  # type: ignore


def has_name(name: int) -> bool:
    """True if the calling task still holds a right named `name`."""
    try:
        m.port_status(m.task_self(), name)
    except m.KernError as e:
        assert e.code == "KERN_INVALID_NAME"
        return False
    return True


def start_thread(fn: Callable[..., Any], *args: Any,
                 task: int | None = None) -> tuple[int, dict[str, Any]]:
    """Create a thread in `task` (default: the caller's) running fn(*args); returns (its
    port name, box). The box gets "result", or "error" (a MachError's code) and
    "detail", then "done", when fn ends.
    """
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            box["result"] = fn(*args)
        except m.MachError as e:
            box["error"] = e.code
            box["detail"] = str(e)
        finally:
            box["done"] = True

    return m.thread_create(m.task_self() if task is None else task, body), box


def thread_state(thread_name: int) -> str:
    """The run state of a thread, by the caller's name for its port."""
    return m.thread_info(thread_name)[1]  # type: ignore[no-any-return]


def assert_kernel_ok() -> None:
    """A normal round of RPCs and messages still works."""
    task = m.task_self()
    p = m.port_allocate(task)
    m.msg_send(Message(remote_port=p, id=4242, items=[m.Int(1), m.Str("ok")]),
               m.SEND_TIMEOUT, 0)
    assert m.port_status(task, p) == (False, 1, m.PORT_BACKLOG_DEFAULT, True, True)
    msg = recv(p, 1000)
    assert (msg.id, msg.values()) == (4242, [1, "ok"])
    m.port_deallocate(task, p)
    assert not has_name(p)
    assert m.task_info(task)[2] >= 1  # the caller's task has threads


def blocked_waiter(lock: Any, got: list[str], timeout: float = -1) -> threading.Thread:
    """A thread that takes `lock` (a kern.lock.KernelLock; recording "waiter" in `got`),
    started and blocked. Callable with the kernel lock held: it waits for the thread to
    block with time.sleep, never entering the kernel (wait_until would)."""
    def take() -> None:
        if lock.acquire(True, timeout):
            got.append("waiter")
            lock.release()
    before = lock.waiting  # (other threads may be waiting already)
    t = threading.Thread(target=take, daemon=True)
    t.start()
    deadline = time.monotonic() + 5
    while lock.waiting <= before:
        if time.monotonic() > deadline:
            raise AssertionError("the waiter did not block on the lock within 5 s")
        time.sleep(0.001)
    return t


def noting(events: list[str], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn`, noting `name` in `events` when it starts and "end" when it returns."""
    def noted(*args: Any, **kwargs: Any) -> Any:
        events.append(name)
        try:
            return fn(*args, **kwargs)
        finally:
            events.append("end")
    return noted


def waiter_got_in_during(events: list[str], start: str) -> list[str]:
    """The events from the last `start` before a blocked_waiter got the lock up to it:
    AssertionError unless it got the lock, and before that work's "end" (noting)."""
    assert "waiter" in events, "the waiter never got the lock"
    got = events.index("waiter")
    during = events[got - events[:got][::-1].index(start) - 1:got]
    assert "end" not in during, f"the waiter got the lock only after the {start}"
    return during
