"""Code items (callables) travel only within one user: the kernel stamps the sender's
uid, another user's arrives refused, thread_create of it is refused, and a task decodes
only its own user's code. The kernel rules run embedded here (a task's uid set by hand,
as machd sets it from SO_PEERCRED); the task-side rule is checked directly."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

import pymach as m
from machutil import wait_until
from pymach.include.message import Code, Message
from pymach.kern.thread import current_thread
from pymach.libmach.task import _callable_code, _load_code

OTHER_UID = 54321


def _marker(path: str) -> None:
    Path(path).write_text("ran")


def _child_task(kernel: m.Kernel, fn: Any, *args: Any) -> tuple[Any, int]:
    """A child task (made embedded) of another user, its thread running fn(*args)."""
    handle = kernel.spawn(fn, *args, name="other-user")
    with kernel.sched.lock:
        handle.task.uid = OTHER_UID
    return handle, handle.port


def _receive_one(port_box: dict[str, int]) -> Any:
    me = m.task_self()
    port_box["port"] = m.port_allocate(me)
    return m.msg_receive(port_box["port"], m.RCV_TIMEOUT, 5000)


def test_a_code_item_from_another_user_arrives_refused(kernel: m.Kernel,
                                                       tmp_path: Path) -> None:
    box: dict[str, int] = {}
    handle, _ = _child_task(kernel, _receive_one, box)
    wait_until(lambda: "port" in box)
    with kernel.sched.lock:  # a send right to the child's port, for this test's task
        child_port = handle.task.space.names[box["port"]].port
        name = current_thread().task.space.insert(child_port, send=True)
    marker = str(tmp_path / "ran")
    m.msg_send(Message(remote_port=name, items=[Code(_marker, (marker,))]))
    got = handle.result(5000)
    item = got.items[0]
    assert isinstance(item, Code) and item.refused and item.fn is None and item.blob is None
    assert item.origin_uid == os.getuid() and got.sender_uid == os.getuid()
    assert not Path(marker).exists()


def test_thread_create_of_another_users_code_is_refused(kernel: m.Kernel,
                                                        tmp_path: Path) -> None:
    _, child = _child_task(kernel, _receive_one, {})
    marker = str(tmp_path / "ran")
    with pytest.raises(m.KernError) as e:
        m.thread_create(child, _marker, marker)
    assert e.value.code == "KERN_PROTECTION_FAILURE" and str(OTHER_UID) in str(e.value)
    assert not Path(marker).exists()
    m.task_terminate(child)


def test_a_task_decodes_only_its_own_users_blobs(tmp_path: Path) -> None:
    marker = str(tmp_path / "ran")
    blob = cloudpickle.dumps((_marker, (marker,), {}))
    mine = _callable_code(Message(items=[Code(None, blob=blob, origin_uid=os.getuid())]))
    assert mine.items[0].fn is _marker
    for uid in (OTHER_UID, -1):
        other = _callable_code(Message(items=[Code(None, blob=blob, origin_uid=uid)]))
        assert other.items[0].fn is None
    with pytest.raises(m.KernError, match="refusing code from uid"):
        _load_code(None, blob, OTHER_UID)  # type: ignore[arg-type]
    assert not Path(marker).exists()
