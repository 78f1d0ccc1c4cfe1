"""Helpers for tests of external memory management (paper 3.4, 6): hand-made data managers.

`Pager` is a data manager for ONE memory object whose port the calling task (the
test's own task) allocates. Either the test drives it message by message (`expect`,
`next_message`), or `start()` runs a serving thread in the test's task that answers the
kernel with a policy the test can change at any time (`data`, `lock_value`, `mode`,
`hold_writes`, ...). The calls the manager made and received are kept in `log`, so a
test can wait for them (`wait_for`). Because the serving thread is another thread of
the faulting task, the kernel's self-deadlock check (6.1) lets the test's main thread
fault on the object while it is served.

`spawn_manager` starts a `DataManager` in a task of its own and gives the caller send
rights to the memory objects it made. `run_in_task` runs a function as a thread of a
child task made by the caller (with memory mapped into it beforehand).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pymach as m
from machutil import WAIT_MS, recv, sleep_ms, start_thread, wait_until
from pymach import OOL, Int, Message, Port
from pymach.include.mach_defs import memory_object_defs
from pymach.mach_vm import take_ool

PS = 4096
STOP_ID = 2298
MO_ROUTINES = memory_object_defs.routines


def routine(msg: Message) -> str:
    """The memory_object routine a kernel-to-manager message is (Table 3-5)."""
    r = MO_ROUTINES.get(msg.id)
    return r.name if r is not None else f"id {msg.id}"


def values(msg: Message) -> list[Any]:
    """The plain values of a message's items (port items give their names)."""
    out: list[Any] = []
    for item in msg.items:
        if isinstance(item, Port):
            out.append(item.name)
        elif isinstance(item, OOL):
            out.append(item)
        else:
            out.append(item.value)  # type: ignore[union-attr]
    return out


def pattern(tag: int, size: int) -> bytes:
    """`size` bytes that differ at every byte position within 251 bytes and per tag."""
    return bytes((i * 7 + tag * 31 + i // 251) % 256 for i in range(size))


class Pager:
    """One memory object managed by the calling task (see module docstring).

    `mode` says how the serving thread answers pager_data_request: "provide" (data from
    `data` with `lock_value`), "unavailable", "error" (pager_data_error), "ignore"
    (never answer), or a callable (request, offset, length, access) run in the serving
    thread. `unlock` says how it answers pager_data_unlock: "grant" or "ignore".
    """

    def __init__(self, size: int = 4 * PS, data: bytes | None = None) -> None:
        self.task = m.task_self()
        self.mo: int = m.port_allocate(self.task)
        self.data = bytearray(data if data is not None else pattern(1, size))
        self.log: list[tuple[Any, ...]] = []  # ("pager_data_request", offset, len, access)
        self.requests: list[int] = []  # pager request ports, one per pager_init
        self.names: list[int] = []  # pager name ports
        self.writes: list[tuple[int, bytes]] = []  # pager_data_write (offset, data)
        self.held: list[OOL] = []  # regions of writes not released (hold_writes)
        self.mode: str | Callable[[int, int, int, int], None] = "provide"
        self.unlock = "grant"
        self.lock_value = m.VM_PROT_NONE
        self.extra_pages = 0  # provide this many pages more than asked
        self.hold_writes = False  # keep pager_data_write regions instead of releasing them
        self.store_writes = True  # copy written-back data into `data`
        self.threads: list[tuple[int, dict[str, Any]]] = []
        self.failures: list[str] = []  # errors in the serving threads

    # -- mapping -----------------------------------------------------------------------
    def map(self, size: int | None = None, offset: int = 0, task: int | None = None,
            address: int = 0, anywhere: bool = True) -> int:
        """vm_allocate_with_pager of this object into `task` (default: the caller's)."""
        size = len(self.data) - offset if size is None else size
        return m.vm_allocate_with_pager(self.task if task is None else task, address, size,
                                        anywhere, self.mo, offset)

    @property
    def request(self) -> int:
        """The pager request port of the (latest) kernel using the object; with a serving
        thread, waits for its pager_init."""
        if not self.requests and self.threads:
            wait_until(lambda: self.requests)
        assert self.requests, "no pager_init received yet"
        return self.requests[-1]

    def count(self, name: str) -> int:
        """How many kernel-to-manager calls named `name` have been handled."""
        return sum(1 for e in self.log if e[0] == name)

    def entries(self, name: str) -> list[tuple[Any, ...]]:
        """The logged calls named `name`, in order."""
        return [e for e in self.log if e[0] == name]

    def wait_for(self, name: str, n: int = 1, timeout_ms: float = WAIT_MS) -> list[tuple[Any, ...]]:
        """Wait until `n` calls named `name` have been handled; return them."""
        wait_until(lambda: self.count(name) >= n, timeout_ms)
        return self.entries(name)

    # -- driving it by hand ----------------------------------------------------------------
    def next_message(self, timeout: float = WAIT_MS) -> tuple[str, list[Any]]:
        """Receive and handle (log) the next kernel message by hand; (routine, values)."""
        msg = recv(self.mo, timeout)
        name, vals = routine(msg), values(msg)
        self._record(name, vals)
        return name, vals

    def expect(self, name: str, timeout: float = WAIT_MS) -> list[Any]:
        """The next message, which must be the routine `name`; its values."""
        got, vals = self.next_message(timeout)
        assert got == name, f"expected {name}, got {got} {vals}"
        return vals

    def init(self) -> int:
        """Receive pager_init by hand; returns the request port."""
        self.expect("pager_init")
        return self.request

    def provide(self, offset: int, length: int = PS, lock: int | None = None,
                data: bytes | None = None) -> None:
        """pager_data_provided of `data` (default: the object's bytes there)."""
        chunk = bytes(self.data[offset:offset + length]) if data is None else data
        m.pager_data_provided(self.request, offset, chunk, len(chunk),
                              self.lock_value if lock is None else lock)

    def _record(self, name: str, vals: list[Any]) -> None:
        if name == "pager_init":
            self.requests.append(vals[0])
            self.names.append(vals[1])
            self.log.append((name, vals[0], vals[1]))
        elif name in ("pager_data_request", "pager_data_unlock"):
            self.log.append((name, *vals[1:]))  # offset, length, access
        elif name == "pager_data_write":
            offset, ool, count = vals
            if self.hold_writes:
                self.held.append(ool)
                raw = m.memory().read(ool.address, ool.size)[:count]
            else:
                raw = take_ool(ool)[:count]
            self.writes.append((offset, raw))
            if self.store_writes:
                self.data[offset:offset + len(raw)] = raw
            self.log.append((name, offset, count, raw))
        else:
            self.log.append((name, *vals))

    # -- serving in the background ------------------------------------------------------
    def start(self, threads: int = 1) -> Pager:
        """Serve the object from `threads` new threads of the calling task."""
        for _ in range(threads):
            box: dict[str, Any] = {}
            self.threads.append((m.thread_create(self.task, self._serve, box), box))
        return self

    def stop(self) -> None:
        """Ask the serving threads to return, and wait for them."""
        for _ in self.threads:
            m.msg_send(Message(remote_port=self.mo, id=STOP_ID), m.SEND_TIMEOUT, WAIT_MS)
        wait_until(lambda: all(box.get("done") for _, box in self.threads))
        self.threads = []

    def _serve(self, box: dict[str, Any]) -> None:
        try:
            while True:
                msg = m.msg_receive(self.mo)
                if msg.id == STOP_ID:
                    return
                name, vals = routine(msg), values(msg)
                self._record(name, vals)
                try:
                    self._answer(name, vals)
                except m.MachError as e:  # the kernel may have let go meanwhile
                    self.failures.append(f"{name}: {e.code}")
        finally:
            box["done"] = True

    def _answer(self, name: str, vals: list[Any]) -> None:
        if name == "pager_data_request":
            request, offset, length, access = vals
            mode = self.mode
            if callable(mode):
                mode(request, offset, length, access)
            elif mode == "provide":
                n = length + self.extra_pages * PS
                chunk = bytes(self.data[offset:offset + n]).ljust(n, b"\0")
                m.pager_data_provided(request, offset, chunk, n, self.lock_value)
            elif mode == "unavailable":
                m.pager_data_unavailable(request, offset, length)
            elif mode == "error":
                m.pager_data_error(request, offset, length,
                                   m.MachError("KERN_FAILURE").value)
        elif name == "pager_data_unlock" and self.unlock == "grant":
            request, offset, length, _access = vals
            m.pager_data_lock(request, offset, length, m.VM_PROT_NONE)


# -- tasks ---------------------------------------------------------------------------------

def read(a: int, n: int = PS) -> bytes:
    """The caller's memory [a, a+n)."""
    return m.memory()[a:a + n]  # type: ignore[return-value]


def write(a: int, data: bytes) -> None:
    """Store `data` at `a` in the caller's memory."""
    m.memory()[a:a + len(data)] = data


def pager_messages(k: m.Kernel) -> int:
    """Kernel-to-manager messages so far."""
    return k.vm_stat()["pager_messages"]


def run_in_task(task: int, fn: Callable[..., Any], *args: Any) -> dict[str, Any]:
    """Run fn(*args) as a new thread of `task`; its box (see machutil.start_thread)."""
    return start_thread(fn, *args, task=task)[1]


def finished(box: dict[str, Any], timeout_ms: float = WAIT_MS) -> dict[str, Any]:
    """Wait until a box from run_in_task / start_thread is done; return it."""
    wait_until(lambda: box.get("done"), timeout_ms)
    return box


class Recording(m.DataManager):
    """A one-thread manager whose page n holds the byte n % 256 until a write-back
    changes it; records each request's (offset, length) in `asked` and each
    write-back's (offset, data) in `written`, and stops at its object's termination."""

    threads = max_threads = 1

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[tuple[int, int]] = []
        self.written: list[tuple[int, bytes]] = []
        self.pages: dict[int, bytes] = {}  # page number -> data written back

    def read(self, memory_object: int, offset: int, length: int, access: int) -> bytes:
        self.asked.append((offset, length))
        first = offset // PS
        return b"".join(self.pages.get(n, bytes([n % 256]) * PS)
                        for n in range(first, first + length // PS))

    def write(self, memory_object: int, offset: int, data: bytes) -> None:
        self.written.append((offset, bytes(data)))
        for i in range(len(data) // PS):
            self.pages[offset // PS + i] = bytes(data[i * PS:(i + 1) * PS])

    def pager_terminate(self, memory_object: int, request: int) -> None:
        self.stop()


def _manager_main(dm: m.DataManager, n: int) -> None:
    inbox_msg = m.msg_receive(m.task_notify(), m.RCV_TIMEOUT, 10_000)
    inbox = inbox_msg.items[0].value  # type: ignore[union-attr]
    objects = [dm.create_memory_object() for _ in range(n)]
    m.msg_send(Message(remote_port=inbox, items=[Port(o, m.MAKE_SEND) for o in objects]))
    dm.serve()


def spawn_manager(kernel: m.Kernel, dm: m.DataManager, n: int = 1, name: str = "manager"
                  ) -> tuple[m.TaskHandle, list[int]]:
    """Start `dm` serving in a new task; (its handle, send rights to its n objects)."""
    me = m.task_self()
    inbox = m.port_allocate(me)
    handle = kernel.spawn(_manager_main, dm, n, name=name)
    notify = m.task_get_special_port(handle.port, m.TASK_NOTIFY_PORT)
    m.msg_send(Message(remote_port=notify, items=[Port(inbox, m.MAKE_SEND)]))
    msg = recv(inbox, 10_000)
    m.port_deallocate(me, inbox)
    return handle, [item.value for item in msg.items]  # type: ignore[union-attr]


def _service_main(dm: m.DataManager) -> None:
    inbox_msg = m.msg_receive(m.task_notify(), m.RCV_TIMEOUT, 10_000)
    inbox = inbox_msg.items[0].value  # type: ignore[union-attr]
    me = m.task_self()
    service = m.port_allocate(me)
    m.port_enable(me, service)
    m.msg_send(Message(remote_port=inbox, items=[Port(service, m.MAKE_SEND)]))
    dm.serve()


def spawn_service(kernel: m.Kernel, dm: m.DataManager, name: str = "server"
                  ) -> tuple[m.TaskHandle, int]:
    """Start `dm` serving in a new task with a service port (for its `services`);
    (its handle, a send right to the service port)."""
    me = m.task_self()
    inbox = m.port_allocate(me)
    handle = kernel.spawn(_service_main, dm, name=name)
    notify = m.task_get_special_port(handle.port, m.TASK_NOTIFY_PORT)
    m.msg_send(Message(remote_port=notify, items=[Port(inbox, m.MAKE_SEND)]))
    msg = recv(inbox, 10_000)
    m.port_deallocate(me, inbox)
    return handle, msg.items[0].value  # type: ignore[union-attr,return-value]


def send_int(port: int, value: int) -> None:
    """A one-Int message (for signalling between tasks)."""
    m.msg_send(Message(remote_port=port, items=[Int(value)]), m.SEND_TIMEOUT, WAIT_MS)


def quiet(ms: float = 20) -> None:
    """Let other threads run for a while."""
    with contextlib.suppress(m.MachError):
        sleep_ms(ms)


@contextlib.contextmanager
def watchdog(kernel: m.Kernel, seconds: float, what: str) -> Iterator[None]:
    """Fail (instead of hanging) if the block has not finished after `seconds` of real
    time: the kernel is shut down, which unwinds every thread blocked in it."""
    fired = threading.Event()

    def fire() -> None:
        fired.set()
        kernel.shutdown(join_timeout=0.2)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    except BaseException:
        if fired.is_set():
            raise AssertionError(f"{what}: not done after {seconds} s of real time (the "
                                 f"kernel was shut down to end the test)") from None
        raise
    finally:
        timer.cancel()
    if fired.is_set():
        raise AssertionError(f"{what}: not done after {seconds} s of real time")
