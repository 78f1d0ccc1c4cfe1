"""Native mode: tasks are processes under machd, and their memory is real."""

from __future__ import annotations

import numpy as np

import pymach as m
from pymach import Int, Message

PS = 4096


def test_messages_and_ports(native: str) -> None:
    me = m.task_self()
    p = m.port_allocate(me)
    m.msg_send(Message(remote_port=p, id=7, items=[Int(41), m.Str("x")]))
    msg = m.msg_receive(p, m.RCV_TIMEOUT, 2000)
    assert (msg.id, msg.values()) == (7, [41, "x"])
    assert m.port_status(me, p) == (False, 0, 5, True, True)
    m.port_deallocate(me, p)


def test_memory_is_real_and_numpy_works_on_it(native: str) -> None:
    me = m.task_self()
    a = m.vm_allocate(me, 0, 16 * PS, True)
    mem = m.memory()
    buf = mem.buffer(a, 16 * PS)
    arr = np.frombuffer(buf, dtype=np.int64)
    arr[:] = np.arange(arr.size)
    assert int(arr.sum()) == arr.size * (arr.size - 1) // 2
    assert m.vm_read(me, a + 8, 8) == (1).to_bytes(8, "little")
    stats = m.vm_statistics(me)
    assert stats.zero_fill_count >= 16


def _child_reads_and_writes(a: int) -> tuple[bytes, bytes]:
    mem = m.memory()
    seen = mem[a:a + 5]
    mem[a:a + 5] = b"CHILD"
    return seen, mem[a:a + 5]


def test_copy_on_write_between_processes(native: str) -> None:
    me = m.task_self()
    a = m.vm_allocate(me, 0, PS, True)
    mem = m.memory()
    mem[a:a + 5] = b"hello"
    child = m.spawn(_child_reads_and_writes, a, inherit=True)
    assert child.result(20_000) == (b"hello", b"CHILD")
    assert mem[a:a + 5] == b"hello"  # the parent's memory never changed
    mem[a:a + 5] = b"again"  # and stays writable (the copy's push is done)
    assert mem[a:a + 5] == b"again"


def _child_writes_shared(a: int) -> None:
    m.memory()[a:a + 6] = b"SHARED"


def test_shared_memory_between_processes(native: str) -> None:
    me = m.task_self()
    a = m.vm_allocate(me, 0, PS, True)
    m.vm_inherit(me, a, PS, m.VM_INHERIT_SHARE)
    m.spawn(_child_writes_shared, a, inherit=True).result(20_000)
    assert m.memory()[a:a + 6] == b"SHARED"
