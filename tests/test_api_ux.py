"""The API as a new user meets it (issue 13, items 10, 13, 14, 17, 18).

- Bad input to a Mach call is a `MachError`, whatever the input (a fuzzed message).
- Timeouts are milliseconds everywhere, and a timeout is also Python's `TimeoutError`.
- A handle's `.name` is the task's name and `.port` its port; a MIG stub called with the
  wrong arguments raises `TypeError`, as a Python function does.
- `take_ool` is public; `DataManager` says when `super().__init__()` was forgotten and
  hands `write` runs of pages.
- Mach's edge cases as GNU Mach has them: zero-length calls anywhere, fixed vm_allocate
  at an unaligned address.
- `thread_terminate` and the task's thread counts agree at once.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pymach as m
from machutil import recv, start_thread, thread_state, wait_until
from pagerutil import spawn_manager
from pymach import Message, Subsystem
from pymach.include.message import is_utf8
from pymach.include.mig import INT
from pymach.include.vm_param import VM_MAX_ADDRESS
from pymach.pagers.data_manager import WRITE_RUN_MAX, write_runs

CONTRACT = True  # these run as native tasks of machd too (conftest.py)
PS = 4096
R = m.VM_PROT_READ


# -- item 10: every bad input to a message is a MachError -----------------------------------


def test_str_with_a_lone_surrogate_is_a_mach_error(kernel: m.Kernel) -> None:
    me = m.task_self()
    p = m.port_allocate(me)
    with pytest.raises(m.SendError) as e:
        m.msg_send(Message(remote_port=p, items=[m.Str("ok \ud800")]))
    assert e.value.code == "SEND_INVALID_TYPE" and "surrogate" in e.value.detail
    assert m.port_status(me, p)[1] == 0  # nothing was queued
    with pytest.raises(m.KernError) as k:  # a stub's str argument: before sending
        m.task_set_name(me, "\udfff")
    assert k.value.code == "KERN_INVALID_ARGUMENT"
    m.msg_send(Message(remote_port=p, items=[m.Str("ünïcødé ✓ \U0001f600")]))
    assert recv(p).values() == ["ünïcødé ✓ \U0001f600"]


@pytest.mark.parametrize("names", [(), None], ids=["no-names", "some-names"])
@pytest.mark.parametrize("disposition", [0, 7, 99, -1, True, "MOVE_SEND", None, 2.0])
def test_port_items_with_a_bad_disposition_are_mach_errors(
        kernel: m.Kernel, names: tuple[int, ...] | None, disposition: Any) -> None:
    me = m.task_self()
    p = m.port_allocate(me)
    items: list[Any] = [m.PortArray(names if names is not None else (p,), disposition)]
    if names is None:
        items.append(m.Port(p, disposition))
    for item in items:
        with pytest.raises(m.SendError) as e:
            m.msg_send(Message(remote_port=p, items=[item]))
        assert e.value.code == "SEND_INVALID_TYPE" and "disposition" in e.value.detail
    assert m.port_status(me, p)[1] == 0


_HUGE = 1 << 64  # beyond any port name and any address: fuzzing touches nothing real
_VALUES = st.one_of(
    st.integers(min_value=_HUGE, max_value=1 << 70), st.integers(max_value=-1),
    st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
    st.text(st.one_of(st.characters(), st.characters(categories=["Cs"]))),
    st.binary(max_size=64), st.lists(st.integers(min_value=_HUGE), max_size=3),
    st.tuples(st.integers(min_value=_HUGE)), st.sampled_from(list(m.Disposition)),
    st.just(object()), st.just({1: 2}))
_NAMES = _VALUES.filter(lambda v: not isinstance(v, m.Disposition))  # (1..6 may be names)
# (Text with lone surrogates as a trap's option or timeout: see the note at
# test_fuzzed_messages_fail_only_with_mach_errors.)
_TRAP_VALUES = _VALUES.filter(lambda v: not isinstance(v, str) or is_utf8(v))
_ITEMS = st.one_of(
    st.builds(m.Int, _VALUES), st.builds(m.Float, _VALUES), st.builds(m.Bytes, _VALUES),
    st.builds(m.Str, _VALUES), st.builds(m.IntArray, _VALUES),
    st.builds(m.Port, _NAMES, _VALUES), st.builds(m.PortArray, _NAMES, _VALUES),
    st.builds(m.OOL, _NAMES, _VALUES, _VALUES), st.builds(m.OOL, data=_VALUES))
_FUZZ = settings(max_examples=120, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])


@_FUZZ
@given(items=st.lists(_ITEMS, max_size=3), msg_id=_VALUES, option=_TRAP_VALUES,
       timeout=_TRAP_VALUES)
def test_fuzzed_messages_fail_only_with_mach_errors(kernel: m.Kernel, items: list[Any],
                                                    msg_id: Any, option: Any,
                                                    timeout: Any) -> None:
    """Any items, header and options: a MachError or a sent message. (Not fuzzed: a
    lone-surrogate str as a trap argument in a native task; include/wire.py encodes it
    with surrogatepass, machd refuses the frame and closes the thread's connection.)"""
    me = m.task_self()
    p = m.port_allocate(me)
    try:
        for args in ((), (m.SEND_TIMEOUT, 0), (option, timeout)):
            for msg in (Message(remote_port=p, items=items), Message(remote_port=p, id=msg_id)):
                try:
                    m.msg_send(msg, *args)
                except m.MachError as e:
                    assert e.detail, e  # says what was wrong
            while m.port_status(me, p)[1]:  # what was sent arrives whole
                assert isinstance(recv(p, 0), Message)
    finally:
        m.port_deallocate(me, p)


# -- item 13: handles, units, TimeoutError ---------------------------------------------------


def _wait_forever() -> None:
    m.msg_receive(m.port_allocate(m.task_self()))


def test_a_spawned_task_has_its_name_and_its_port(kernel: m.Kernel) -> None:
    h = m.spawn(_wait_forever, name="worker")
    assert h.name == "worker" and isinstance(h.port, int) and not isinstance(h.port, bool)
    assert m.task_info(h.port)[0] == "worker"
    m.task_terminate(h.port)
    assert h.result(20_000) is None and h.name == "worker"
    assert m.spawn(lambda: "done", name="brief").result(20_000) == "done"
    anonymous = m.spawn(_wait_forever)
    assert anonymous.name == m.task_info(anonymous.port)[0]
    assert anonymous.name.startswith("task")
    m.task_terminate(anonymous.port)
    assert anonymous.result(20_000) is None


@pytest.mark.parametrize("bad", ["5", -1, math.nan, True, [5]])
def test_result_refuses_a_timeout_that_is_not_milliseconds(kernel: m.Kernel, bad: Any) -> None:
    h = m.spawn(lambda: 1)
    with pytest.raises(m.KernError) as e:
        h.result(bad)
    assert e.value.code == "KERN_INVALID_ARGUMENT" and "milliseconds" in e.value.detail
    assert h.result(20_000) == 1


def test_timeouts_are_timeout_errors_and_mach_errors(kernel: m.Kernel) -> None:
    me = m.task_self()
    p = m.port_allocate(me)
    with pytest.raises(TimeoutError) as r:
        m.msg_receive(p, m.RCV_TIMEOUT, 0)
    assert isinstance(r.value, m.RcvError) and r.value.code == "RCV_TIMED_OUT"
    assert isinstance(r.value, m.RcvTimeoutError) and r.value.value == -203
    m.port_set_backlog(me, p, 1)
    m.msg_send(Message(remote_port=p))
    with pytest.raises(m.SendError) as s:  # the old way still catches it
        m.msg_send(Message(remote_port=p), m.SEND_TIMEOUT, 0)
    assert isinstance(s.value, TimeoutError) and s.value.code == "SEND_TIMED_OUT"
    h = m.spawn(_wait_forever, name="sleeper")
    with pytest.raises(TimeoutError) as k:
        h.result(10)  # milliseconds
    assert isinstance(k.value, m.KernError) and k.value.code == "KERN_OPERATION_TIMED_OUT"
    assert "10" in str(k.value) and "ms" in str(k.value)
    m.task_terminate(h.port)
    assert h.result(20_000) is None
    # the classes come from the code, however the error is made
    assert type(m.MachError("RCV_TIMED_OUT")) is m.RcvTimeoutError
    assert type(m.KernError("KERN_OPERATION_TIMED_OUT")) is m.KernTimeoutError
    assert type(m.MachError("RCV_INVALID_PORT")) is m.RcvError
    assert not isinstance(m.MachError("KERN_FAILURE"), TimeoutError)


def test_a_timeout_error_travels_from_a_spawned_task(kernel: m.Kernel) -> None:
    def times_out() -> None:
        m.msg_receive(m.port_allocate(m.task_self()), m.RCV_TIMEOUT, 1)

    with pytest.raises(TimeoutError) as e:
        m.spawn(times_out).result(20_000)
    assert isinstance(e.value, m.RcvError) and e.value.code == "RCV_TIMED_OUT"


def test_host_wait_takes_milliseconds() -> None:
    with m.Network() as net:
        a = net.host("A")
        assert a.start(lambda: 42, name="quick").wait(20_000) == 42
        slow = a.start(_wait_forever, name="slow")
        with pytest.raises(TimeoutError) as e:
            slow.wait(20)
        assert e.value.code == "KERN_OPERATION_TIMED_OUT" and "20 ms" in str(e.value)
        with pytest.raises(m.KernError):
            slow.wait(-1)


# -- item 14: stubs are Python functions; take_ool; DataManager ------------------------------


def test_a_stub_called_with_the_wrong_arguments_raises_type_error(kernel: m.Kernel) -> None:
    me = m.task_self()
    assert list(inspect.signature(m.vm_allocate).parameters) == [
        "target_task", "address", "size", "anywhere"]
    with pytest.raises(TypeError, match=r"vm_allocate\(\).*anywhere"):
        m.vm_allocate(me, 0, PS)
    with pytest.raises(TypeError, match="vm_allocate"):
        m.vm_allocate(me, 0, PS, True, 0)
    with pytest.raises(TypeError, match="where"):
        m.vm_allocate(me, 0, PS, where=True)
    with pytest.raises(TypeError, match="multiple values"):
        m.vm_allocate(me, 0, PS, True, size=PS)
    with pytest.raises(TypeError):
        m.vm_regions(me, 0, PS, 1)
    with pytest.raises(TypeError):
        m.vm_statistics()
    calc = Subsystem("calc_ux", 7100)
    calc.routine("calc_add", "server", [("a", INT), ("b", INT)], [("sum", INT)])
    calc_add = calc.stub("calc_add")
    p = m.port_allocate(me)  # nobody serves it: nothing may be sent
    with pytest.raises(TypeError, match=r"calc_add\(\): missing .*'b'"):
        calc_add(p, 2)
    with pytest.raises(m.KernError) as e:  # wrong types stay Mach's KERN_INVALID_ARGUMENT
        calc_add(p, 2, "40")
    assert e.value.code == "KERN_INVALID_ARGUMENT"
    assert m.port_status(me, p)[1] == 0
    assert m.vm_allocate(me, 0, PS, anywhere=True)  # keywords work as they should


def test_take_ool_is_public_and_frees_the_region(kernel: m.Kernel) -> None:
    me = m.task_self()
    p = m.port_allocate(me)
    m.msg_send(Message(remote_port=p, items=[m.OOL(data=b"out of line" * 1000)]))
    item = recv(p).items[0]
    assert isinstance(item, m.OOL)
    assert any(r.address == item.address for r in m.vm_regions(me))
    assert m.take_ool(item) == b"out of line" * 1000
    assert not any(r.address == item.address for r in m.vm_regions(me))
    assert m.take_ool(m.OOL(data=b"given")) == b"given"
    for bad in (5, b"bytes", None, m.Int(3)):
        with pytest.raises(m.KernError) as e:
            m.take_ool(bad)  # type: ignore[arg-type]
        assert e.value.code == "KERN_INVALID_ARGUMENT"


def test_a_read_only_region_gives_a_read_only_buffer(native: str) -> None:
    me = m.task_self()
    a = m.vm_allocate(me, 0, 3 * PS, True)
    m.memory()[a:a + 4] = b"data"
    m.vm_protect(me, a + PS, 2 * PS, False, R)
    ro = np.frombuffer(m.memory().buffer(a + PS, 2 * PS), dtype=np.uint8)
    assert not ro.flags.writeable
    with pytest.raises(ValueError):
        ro[0] = 1  # refused by NumPy, instead of killing the task
    across = m.memory().buffer(a, 3 * PS)  # a range with any read-only page
    assert across.readonly and bytes(across[:4]) == b"data"
    rw = np.frombuffer(m.memory().buffer(a, PS), dtype=np.uint8)
    assert rw.flags.writeable
    rw[:2] = [7, 8]
    assert m.vm_read(me, a, 2) == b"\x07\x08"


class Forgetful(m.DataManager):
    def __init__(self) -> None:  # no super().__init__()
        self.mine = 1


def test_a_data_manager_that_forgets_super_init_says_so(kernel: m.Kernel) -> None:
    dm = Forgetful()
    with pytest.raises(AttributeError, match=r"super\(\).__init__\(\)"):
        dm.create_memory_object()
    with pytest.raises(AttributeError, match=r"super\(\).__init__\(\)"):
        dm.requests(1)
    with pytest.raises(AttributeError) as e:  # other attributes: the usual message
        dm.nothing  # type: ignore[attr-defined]  # noqa: B018
    assert "super" not in str(e.value)
    assert dm.mine == 1 and not hasattr(dm, "uses")


class Recorder(m.DataManager):
    """Records each write() call: (offset, length, data)."""

    def __init__(self, threads: int) -> None:
        super().__init__()
        self.threads = threads  # type: ignore[misc]
        self.calls: list[tuple[int, int, bytes]] = []
        self.terminated = False

    def write(self, memory_object: int, offset: int, data: bytes) -> None:
        self.calls.append((offset, len(data), data))

    def pager_terminate(self, memory_object: int, request: int) -> None:
        self.terminated = True


def _dirty_and_release(kernel: m.Kernel, dm: Recorder, pages: int, gap: range) -> None:
    """Map `pages` pages of dm's object, write each page but those in `gap`, and let go."""
    me = m.task_self()
    handle, (obj,) = spawn_manager(kernel, dm, name="recorder")
    a = m.vm_allocate_with_pager(me, 0, pages * PS, True, obj, 0)
    mem = m.memory()
    for i in range(pages):
        if i not in gap:
            mem[a + i * PS:a + i * PS + 8] = i.to_bytes(8, "little")
    m.vm_deallocate(me, a, pages * PS)
    wait_until(lambda: dm.terminated and len(_pages_written(dm)) == pages - len(gap), 20_000)
    m.task_terminate(handle.port)


def _pages_written(dm: Recorder) -> dict[int, bytes]:
    out = {}
    for offset, length, data in dm.calls:
        assert length % PS == 0 and offset % PS == 0 and len(data) == length
        for i in range(length // PS):
            out[offset // PS + i] = data[i * PS:(i + 1) * PS]
    return out


@pytest.mark.embedded_only("the manager object, with its lock, is shared with the test")
def test_data_manager_write_gets_runs_of_pages(kernel: m.Kernel) -> None:
    dm = Recorder(threads=1)
    _dirty_and_release(kernel, dm, 256, range(100, 110))
    calls = [(offset, length) for offset, length, _ in dm.calls]
    if kernel.sched.deterministic:  # one call per run, not one per page
        assert calls == [(0, 100 * PS), (110 * PS, 146 * PS)]
    else:  # (a thread the pool grew may hold one message when a run is taken)
        assert len(calls) <= 6 and all(o + n <= 100 * PS or o >= 110 * PS for o, n in calls)
    pages = _pages_written(dm)
    assert sorted(pages) == [i for i in range(256) if not 100 <= i < 110]
    assert all(data[:8] == i.to_bytes(8, "little") and data[8:] == bytes(PS - 8)
               for i, data in pages.items())


@pytest.mark.embedded_only("the manager object, with its lock, is shared with the test")
def test_data_manager_with_threads_still_joins_pages(kernel: m.Kernel) -> None:
    dm = Recorder(threads=2)
    _dirty_and_release(kernel, dm, 256, range(0))
    pages = _pages_written(dm)
    assert sorted(pages) == list(range(256))  # every page once
    assert len(dm.calls) < 20  # runs (a message a serving thread holds may split one)


def test_runs_keep_the_order_of_overlapping_writes() -> None:
    ool = m.OOL(0, 0)
    disjoint = [(1, 2 * PS, ool, PS), (1, 0, ool, PS), (2, 0, ool, PS), (1, PS, ool, PS)]
    assert [[w[:2] for w in run] for run in write_runs(disjoint)] == [
        [(1, 0), (1, PS), (1, 2 * PS)], [(2, 0)]]
    again = [(1, PS, ool, PS), (1, 0, ool, PS), (1, PS, ool, PS)]  # page 1 twice
    assert [[w[:2] for w in run] for run in write_runs(again)] == [
        [(1, PS)], [(1, 0), (1, PS)]]
    many = [(1, i * PS, ool, PS) for i in range(2 * WRITE_RUN_MAX // PS + 1)]
    assert [len(run) for run in write_runs(many)] == [WRITE_RUN_MAX // PS] * 2 + [1]


# -- item 17: Mach's edge cases, as GNU Mach has them ----------------------------------------


def test_zero_length_calls_succeed_anywhere(kernel: m.Kernel) -> None:
    me = m.task_self()
    a = m.vm_allocate(me, 0, 2 * PS, True)
    m.vm_protect(me, a + PS, PS, False, R)
    before = m.vm_regions(me)
    nowhere = VM_MAX_ADDRESS + 12345  # beyond the address space, unaligned
    for address in (a + 1, a + PS + 3, 1, 0, nowhere):
        m.vm_write(me, address, b"")
        m.vm_copy(me, address, 0, a + 7)
        m.vm_copy(me, a, 0, address)
        assert m.vm_read(me, address, 0) == b""
        m.vm_deallocate(me, address, 0)
        m.vm_protect(me, address, 0, False, m.VM_PROT_NONE)
        m.vm_inherit(me, address, 0, m.VM_INHERIT_SHARE)
        assert m.vm_regions(me, address, 0) == []
    assert m.vm_allocate(me, 0, 0, True) == 0  # size 0: nothing, at address 0
    assert m.vm_allocate(me, a + 5, 0, False) == 0
    assert m.vm_regions(me) == before
    with pytest.raises(m.KernError) as e:  # types are still checked
        m.vm_copy(me, -1, 0, a)
    assert e.value.code == "KERN_INVALID_ARGUMENT"


def test_fixed_vm_allocate_at_an_unaligned_address_takes_its_page(kernel: m.Kernel) -> None:
    me = m.task_self()
    base = m.vm_allocate(me, 0, 4 * PS, True)
    m.vm_deallocate(me, base, 4 * PS)
    # GNU Mach: address = trunc_page(address), size = round_page(size)
    assert m.vm_allocate(me, base + PS + 123, 100, False) == base + PS
    assert [(r.address, r.size) for r in m.vm_regions(me, base, 4 * PS)] == [(base + PS, PS)]
    assert m.vm_allocate(me, base + 3 * PS - 1, PS + 1, False) == base + 2 * PS
    assert [(r.address, r.size) for r in m.vm_regions(me, base, 4 * PS)] == [
        (base + PS, PS), (base + 2 * PS, 2 * PS)]
    with pytest.raises(m.KernError) as e:  # the page it is in is taken
        m.vm_allocate(me, base + PS + 1, PS, False)
    assert e.value.code == "KERN_NO_SPACE"
    m.memory()[base + PS + 123] = 9
    assert m.vm_read(me, base + PS + 123, 1) == b"\x09"
    m.vm_deallocate(me, base, 4 * PS)


# -- item 18: thread_terminate and the counts ------------------------------------------------


def test_task_threads_and_task_info_agree_right_after_thread_terminate(
        kernel: m.Kernel) -> None:
    me = m.task_self()
    block = m.port_allocate(me)
    threads = [start_thread(recv, block, 60_000)[0] for _ in range(3)]
    wait_until(lambda: all(thread_state(t) == "waiting" for t in threads))
    for i, thread in enumerate(threads):
        m.thread_terminate(thread)
        listed = m.task_threads(me)
        assert thread not in listed
        assert len(listed) == m.task_info(me)[2], f"after terminating {i + 1}"
    assert len(m.task_threads(me)) == m.task_info(me)[2] >= 1
