"""`DataManager`: the base class for a user-level data manager (pager), paper 3.4.

A data manager is an ordinary task that owns memory object ports and answers the
kernel's calls on them (Table 3-5) by calling the kernel back on the pager request port
(Table 3-6). Subclass `DataManager`, override what you need, and call `serve()` from a
thread of the manager's task:

- `read(memory_object, offset, length, access)` returns the bytes of a range (or None:
  no data, zero-fill) and `write(memory_object, offset, data)` stores changed data.
  These two are enough for most pagers: the default `pager_data_request` and
  `pager_data_write` call them.
- Or override the paper's handlers themselves: `pager_init`, `pager_data_request`,
  `pager_data_write`, `pager_data_unlock`, and `pager_terminate` (the kernel let go of
  the object: its request port died).
- `services` lists extra MIG subsystems the manager also serves on its own ports (for
  example the file server's fs_read_file); their routines are methods of the subclass.

`serve()` runs a receive loop on the task's default group in `threads` threads (the
calling one and more made with thread_create), so one thread can serve a request while
another waits (paper 6.1). Handlers may therefore run concurrently, in any order;
a manager that needs requests in kernel order sets `threads = 1`.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from typing import Any, ClassVar

from pymach import mach
from pymach.errors import MachError
from pymach.include.mach_defs import memory_object_defs
from pymach.include.message import OOL, RCV_TIMEOUT, SEND_TIMEOUT, Int, Message
from pymach.include.mig import Subsystem, serve_message
from pymach.include.vm_param import VM_PROT_NONE
from pymach.ipc.ipc_notify import NOTIFY_OVERFLOW, NOTIFY_PORT_DELETED
from pymach.mach_vm import memory

STOP_ID = 2299


class DataManager:
    """Base class of user-level data managers (see module docstring)."""

    threads: ClassVar[int] = 2
    max_threads: ClassVar[int] = 16
    services: ClassVar[tuple[Subsystem, ...]] = ()

    def __init__(self) -> None:
        self.uses: dict[int, dict[int, int]] = {}  # memory object -> {request: name port}
        self._by_request: dict[int, int] = {}  # request port -> memory object
        self._stop_port = 0
        self._task = 0
        self._deferred: deque[Message] = deque()  # received while awaiting something else
        self._lock = threading.Lock()  # guards the counters and the write queue below;
        # never held across a Mach call
        self._started = self._busy = 0
        self._writes: deque[tuple[int, int, OOL, int]] = deque()
        self._writing = False

    # -- memory objects ---------------------------------------------------------------
    def create_memory_object(self) -> int:
        """A new memory object port served by this manager (call from its task)."""
        me = mach.task_self()
        port: int = mach.port_allocate(me)
        mach.port_enable(me, port)
        self.uses[port] = {}
        return port

    def requests(self, memory_object: int) -> list[int]:
        """The pager request ports of the kernels using `memory_object` (one per kernel)."""
        return list(self.uses.get(memory_object, {}))

    # -- the loop -----------------------------------------------------------------------
    def serve(self, threads: int | None = None) -> None:
        """Serve until `stop()`: this thread plus `threads - 1` more of the same task.
        Returns once every write-back received so far has been stored."""
        me = mach.task_self()
        self._task = me
        self._stop_port = mach.port_allocate(me)
        mach.port_enable(me, self._stop_port)
        mach.port_enable(me, mach.task_notify())
        self._started = threads or self.threads
        for _ in range(self._started - 1):
            mach.thread_create(me, self._loop)
        self._loop()
        self._await_stored_writes()

    def _await_stored_writes(self) -> None:
        """Wait (in Mach time) until every received write-back has been stored."""
        nap = mach.port_allocate(mach.task_self())
        try:
            while True:
                with self._lock:
                    if not self._writes and not self._writing:
                        return
                with contextlib.suppress(MachError):
                    mach.msg_receive(nap, RCV_TIMEOUT, 2)
        finally:
            mach.port_deallocate(mach.task_self(), nap)

    def stop(self) -> None:
        """Ask every serving thread to return (callable from any thread of the task).
        One stop message goes around: each thread passes it on before returning, so
        threads the pool grew meanwhile see it too."""
        mach.msg_send(Message(remote_port=self._stop_port, id=STOP_ID))

    def _loop(self) -> None:
        notify = mach.task_notify()
        while True:
            msg = self._deferred.popleft() if self._deferred else mach.msg_receive()
            if msg.local_port == self._stop_port:
                self.stop()  # pass it on to the next thread
                return
            if msg.local_port == notify:
                self._notification(msg)
            else:
                self._dispatch(msg)

    def queue_write(self, mo: int, offset: int, data: OOL, data_count: int) -> None:
        """Store written-back data in arrival order (see module docstring): this thread
        stores it, and whatever arrives meanwhile, unless another thread is at it."""
        with self._lock:
            self._writes.append((mo, offset, data, data_count))
            if self._writing:
                return
            self._writing = True
        while True:
            with self._lock:
                if not self._writes:
                    self._writing = False
                    return
                mo, offset, data, data_count = self._writes.popleft()
            raw = memory().read(data.address, data.size)[:data_count] if data.size else b""
            try:
                self.pager_data_write(mo, offset, raw)
            finally:  # released only now: until then the kernel still has the data
                if data.size:
                    mach.vm_deallocate(mach.task_self(), data.address, data.size)

    def await_message(self, port: int, wanted: Any, timeout_ms: float = 30_000) -> Message:
        """Receive on `port` until `wanted(msg)` holds; other messages are kept and served
        later, in order (for single-threaded managers waiting inside a handler)."""
        while True:
            msg = mach.msg_receive(port, RCV_TIMEOUT, timeout_ms)
            if wanted(msg):
                return msg
            self._deferred.append(msg)

    def _notification(self, msg: Message) -> None:
        if msg.id == NOTIFY_OVERFLOW:  # some deaths went unheard: find them by looking
            for request in mach.names_gone(list(self._by_request)):
                self._request_died(request)
        elif msg.id == NOTIFY_PORT_DELETED and isinstance(msg.items[0], Int):
            self._request_died(msg.items[0].value)

    def _request_died(self, request: int) -> None:
        """A kernel's request port for one of our objects died: it let the object go."""
        mo = self._by_request.pop(request, None)
        if mo is not None:
            self.uses.get(mo, {}).pop(request, None)
            self.pager_terminate(mo, request)

    def _dispatch(self, msg: Message) -> None:
        with self._lock:
            self._busy += 1
            grow = self._busy >= self._started and self._started < self.max_threads
            self._started += grow
        if grow:  # everyone is busy: a request for us must still find a thread
            mach.thread_create(mach.task_self(), self._loop)
        try:
            self._dispatch_one(msg)
        finally:
            with self._lock:
                self._busy -= 1

    def _dispatch_one(self, msg: Message) -> None:
        for sub in (memory_object_defs, *self.services):
            if msg.id in sub.routines:
                target: Any = _Adapter(self) if sub is memory_object_defs else self
                reply = serve_message(sub, target, msg)
                if reply is not None:
                    with contextlib.suppress(MachError):  # the client may have gone
                        mach.msg_send(reply, SEND_TIMEOUT, 0)
                return

    # -- the paper's handlers (Table 3-5); override as needed ----------------------------
    def pager_init(self, memory_object: int, request: int, name: int) -> None:
        """A kernel maps the object for the first time: remember its ports."""
        self.uses.setdefault(memory_object, {})[request] = name
        self._by_request[request] = memory_object

    def pager_data_request(self, memory_object: int, request: int, offset: int,
                           length: int, access: int) -> None:
        """A kernel needs data: provide `read()`'s bytes, or say none exists."""
        data = self.read(memory_object, offset, length, access)
        if data is None:
            mach.pager_data_unavailable(request, offset, length)
        else:
            mach.pager_data_provided(request, offset, bytes(data), len(data), VM_PROT_NONE)

    def pager_data_write(self, memory_object: int, offset: int, data: bytes) -> None:
        """A kernel writes changed data back: store it with `write()`."""
        self.write(memory_object, offset, data)

    def pager_data_unlock(self, memory_object: int, request: int, offset: int, length: int,
                          access: int) -> None:
        """A task needs more access than a lock allows: by default, grant it."""
        mach.pager_data_lock(request, offset, length, VM_PROT_NONE)

    def pager_terminate(self, memory_object: int, request: int) -> None:
        """A kernel let go of the object (its request port died)."""

    # -- the simple hooks -----------------------------------------------------------------
    def read(self, memory_object: int, offset: int, length: int, access: int) -> bytes | None:
        """The object's bytes [offset, offset+length), or None for zero-fill."""
        return None

    def write(self, memory_object: int, offset: int, data: bytes) -> None:
        """Store changed bytes of the object."""


class _Adapter:
    """Turns raw memory_object messages into the handlers' plain arguments."""

    def __init__(self, dm: DataManager) -> None:
        self.dm = dm

    def pager_init(self, mo: int, request: int, name: int) -> None:
        self.dm.pager_init(mo, request, name)

    def pager_data_request(self, mo: int, request: int, offset: int, length: int,
                           access: int) -> None:
        self.dm.pager_data_request(mo, request, offset, length, access)

    def pager_data_write(self, mo: int, offset: int, data: OOL, data_count: int) -> None:
        self.dm.queue_write(mo, offset, data, data_count)

    def pager_data_unlock(self, mo: int, request: int, offset: int, length: int,
                          access: int) -> None:
        self.dm.pager_data_unlock(mo, request, offset, length, access)

    def pager_create(self, pager: int, mo: int, request: int, name: int) -> None:
        raise MachError("KERN_INVALID_ARGUMENT", "pager_create goes to the default pager")
