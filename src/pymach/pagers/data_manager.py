"""`DataManager`: the base class for a user-level data manager (pager), paper 3.4.

A data manager is an ordinary task that owns memory object ports and answers the
kernel's calls on them (Table 3-5) by calling the kernel back on the pager request port
(Table 3-6). Subclass `DataManager`, override what you need, and call `serve()` from a
thread of the manager's task:

- `read(memory_object, offset, length, access)` returns the bytes of a range (or None:
  no data, zero-fill) and `write(memory_object, offset, data)` stores changed data.
  These two are enough for most pagers: the default `pager_data_request` and
  `pager_data_write` call them. `write` gets *runs*: a flush writes adjacent dirty
  pages back in one pager_data_write (up to the kernel's WRITE_RUN_PAGES), a pageout
  a page per message, and the writes already queued when one is stored are joined,
  contiguous pages into one call (so 256 dirty pages written back together come as
  one call of 256 pages, not 256 calls). A manager that overrides
  `pager_data_write` gets each message as the kernel sent it instead.
- `read()`'s data go back with `provide` (pager_data_provided without waiting): in a
  native task, data of OOL_MIN bytes or more go out of line (machd then copies them
  into the object's pages once per run instead of reading them from its socket).
  Better, where the object has a window (a native task, an object a task maps): data
  of whole pages (at least `window_min` bytes: by default any) are written into the
  object's memory here and announced with pager_data_provided_in_place, so machd
  copies nothing
  (`_placed`; the window is asked for once per request port, closed when it dies).
  The other way too (`writes_in_place`, on by default): an object's dirty pages going
  back (a flush, a clean, a pageout, the object's termination) stay in its memory, and
  the kernel names them in pager_data_write_in_place; the manager reads them from the
  window, releases them (pager_data_write_released) and stores them as any
  write-back, through `write()` or an overriding `pager_data_write`. A manager that
  waits for write-backs as pager_data_write messages sets `writes_in_place = False`.
- Or override the paper's handlers themselves: `pager_init`, `pager_data_request`,
  `pager_data_write`, `pager_data_unlock`, and `pager_terminate` (the kernel let go of
  the object: its request port died).
- `services` lists extra MIG subsystems the manager also serves on its own ports (for
  example the file server's fs_read_file); their routines are methods of the subclass.

`serve()` runs a receive loop on the task's default group in `threads` threads (the
calling one and more made with thread_create), so one thread can serve a request while
another waits (paper 6.1). Handlers may therefore run concurrently, in any order;
a manager that needs requests in kernel order sets `threads = 1`.

Written-back data is stored by one thread at a time, in arrival order, except that
writes to disjoint ranges may be stored in offset order (their order cannot matter).
A subclass's `__init__` must call ``super().__init__()``; one that does not gets an
AttributeError saying so at its first use of the base class's state.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from collections import deque
from typing import TYPE_CHECKING, Any, ClassVar

from pymach import mach
from pymach.errors import MachError
from pymach.include.mach_defs import memory_object_defs, pager_defs
from pymach.include.message import OOL, RCV_TIMEOUT, SEND_TIMEOUT, Int, Message
from pymach.include.mig import Subsystem, decode_items, serve_message
from pymach.include.vm_param import VM_PROT_NONE
from pymach.ipc.ipc_notify import NOTIFY_OVERFLOW, NOTIFY_PORT_DELETED
from pymach.mach_vm import NativeAddressSpace, PagerWindow, memory, vm_page_size

log = logging.getLogger("pymach.pagers")
STOP_ID = 2299
# The answers to a data request go without waiting for the kernel's reply (a manager
# streams them; the kernel logs a bad one): one message each way per request.
# The default pager_data_request's answer goes with the serving thread's next receive
# (_answer): one kernel call per request.
_provided_message = mach.oneway_message(pager_defs, "pager_data_provided")
_unavailable_message = mach.oneway_message(pager_defs, "pager_data_unavailable")
_in_place_message = mach.oneway_message(pager_defs, "pager_data_provided_in_place")
_answers = threading.local()  # .folding: in the default pager_data_request on a serving
# thread; .held: the answer it made, sent with the thread's next receive
_DATA_WRITE = memory_object_defs.by_name["pager_data_write"]
_BASE_STATE = frozenset({"uses", "_by_request", "_stop_port", "_task", "_deferred", "_lock",
                         "_started", "_busy", "_writes", "_writing", "_windows",
                         "window_bytes"})
Write = tuple[int, int, "OOL | WindowData", int]  # memory object, offset, data (out of
# line, or read from the object's window), data_count
WRITE_RUN_MAX = 16 << 20  # bytes one write() call gets at most (a run is split beyond)
OOL_MIN = 1 << 20  # provided data this large go out of line in a native task (provide)
STAGING_PAGES = 16  # ... through the thread's staging region if so many pages hold them
WINDOW_MIN = 1  # read()'s data this large (any whole pages) go through the object's
# window: even one page is cheaper so (a one-page fault 291-301 -> 251-267 us, pinned)


class DataManager:
    """Base class of user-level data managers (see module docstring)."""

    threads: ClassVar[int] = 2
    window_min: ClassVar[int] = WINDOW_MIN  # read()'s data of whole pages this large go
    # through the object's window where it has one (0: never)
    writes_in_place: ClassVar[bool] = True  # with a window, take write-backs through it
    # (pager_data_write_in_place)
    max_threads: ClassVar[int] = 16
    staging_pages: ClassVar[int] = STAGING_PAGES  # provide()'s, for read()'s data
    services: ClassVar[tuple[Subsystem, ...]] = ()

    def __init__(self) -> None:
        self.uses: dict[int, dict[int, int]] = {}  # memory object -> {request: name port}
        self._by_request: dict[int, int] = {}  # request port -> memory object
        self._stop_port = 0
        self._task = 0
        self._deferred: deque[Message] = deque()  # received while awaiting something
        # else (any thread: each takes with one popleft, never a look and then a pop)
        self._lock = threading.Lock()  # guards the counters and the write queue below;
        # never held across a Mach call
        self._started = self._busy = 0
        self._writes: deque[Write] = deque()
        self._writing = False
        self.window_bytes = 0  # (_lock) bytes of read()'s data written into windows
        self._windows: dict[int, PagerWindow | None] = {}  # request port -> the object's
        # window (None: it has none), asked once, closed when the request port dies

    if not TYPE_CHECKING:  # (for mypy the base class's state is declared above)
        def __getattr__(self, name: str) -> Any:
            """Only for attributes not found: say why the base class's state is missing."""
            if name in _BASE_STATE:
                raise AttributeError(
                    f"{type(self).__name__!r} object has no attribute {name!r}: its "
                    f"__init__ must call super().__init__() (DataManager keeps its "
                    f"state there)", name=name, obj=self)
            raise AttributeError(f"{type(self).__name__!r} object has no attribute "
                                 f"{name!r}", name=name, obj=self)

    # -- memory objects ---------------------------------------------------------------
    def create_memory_object(self) -> int:
        """A new memory object port served by this manager (call from its task)."""
        uses = self.uses  # (first: a subclass that skipped our __init__ learns it here)
        me = mach.task_self()
        port: int = mach.port_allocate(me)
        mach.port_enable(me, port)
        uses[port] = {}
        return port

    def requests(self, memory_object: int) -> list[int]:
        """The pager request ports of the kernels using `memory_object` (one per kernel)."""
        return list(self.uses.get(memory_object, {}))

    # -- the loop -----------------------------------------------------------------------
    def serve(self, threads: int | None = None) -> None:
        """Serve until `stop()`: this thread plus `threads - 1` more of the same task.
        Returns once every write-back received so far has been stored."""
        with self._lock:  # (first: a subclass that skipped our __init__ learns it here)
            self._started = threads or self.threads
        me = mach.task_self()
        self._task = me
        self._stop_port = mach.port_allocate(me)
        mach.port_enable(me, self._stop_port)
        mach.port_enable(me, mach.task_notify())
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
            msg = self._next_message()
            if msg.local_port == self._stop_port:
                self.stop()  # pass it on to the next thread
                return
            if msg.local_port == notify:
                self._notification(msg)
            else:
                self._dispatch(msg)

    def _next_message(self) -> Message:
        """A message kept for later (`_deferred`), else the next one received; the
        answer the last request left (`_answer`) is sent first, with the receive."""
        held, _answers.held = getattr(_answers, "held", None), None
        try:  # (one step: a look, then a pop, let two threads race for the last one,
            kept = self._deferred.popleft()  # and the loser's pop raised IndexError)
        except IndexError:
            kept = None
        if kept is not None:
            if held is not None:
                _send_logged(held)
            return kept
        if held is None:
            return mach.msg_receive()
        try:
            return mach.msg_send_receive(held)
        except MachError as e:
            if e.code.startswith("RCV_"):  # (sent; the receive failed)
                raise
            _refused(held, e)  # nothing was sent
        return mach.msg_receive()

    def queue_write(self, mo: int, offset: int, data: OOL | WindowData,
                    data_count: int) -> None:
        """Store written-back data (see module docstring): this thread stores it, and
        whatever arrives meanwhile, unless another thread is at it. Unless a subclass
        overrides pager_data_write, the writes already queued are joined into runs."""
        with self._lock:
            self._writes.append((mo, offset, data, data_count))
            if self._writing:
                return
            self._writing = True
        joined = type(self).pager_data_write is DataManager.pager_data_write
        while True:
            if joined:
                self._take_queued_writes(mo)
            with self._lock:
                if not self._writes:
                    self._writing = False
                    return
                batch = list(self._writes) if joined else [self._writes[0]]
                for _ in batch:
                    self._writes.popleft()
            for run in write_runs(batch):
                try:
                    self._store_run(run)
                except Exception:  # (one failed store neither stops the others nor
                    log.exception("a data manager's store of written-back data failed")
                mo = run[0][0]  # leaves the queue without a thread to store it)

    def _take_queued_writes(self, mo: int) -> None:
        """Queue, without waiting, the pager_data_write messages already queued on `mo`
        (the kernel sends a run of dirty pages together), up to WRITE_RUN_MAX bytes;
        the first other message is kept for the receive loop."""
        taken = 0
        while taken < WRITE_RUN_MAX:
            try:
                msg = mach.msg_receive(mo, RCV_TIMEOUT, 0)
            except MachError:  # none left (RCV_TIMED_OUT), or the port is gone
                return
            try:
                if msg.id != _DATA_WRITE.id:
                    raise MachError("MIG_BAD_ID")
                offset, data, count = decode_items(_DATA_WRITE, _DATA_WRITE.ins, msg.items,
                                                   "MIG_BAD_ARGUMENTS")
            except MachError:  # served (or refused) by the loop, in order
                self._deferred.append(msg)
                return
            with self._lock:
                self._writes.append((mo, offset, data, count))
            taken += count

    def _store_run(self, run: list[Write]) -> None:
        """Hand one run of written-back data to pager_data_write, then release it (only
        now: until then the kernel still has the data). A store that raises releases
        nothing read from a window (the kernel takes those back at its deadline and
        sends them again); out-of-line regions are deallocated either way."""
        stored = False
        try:
            raw = b"".join(written_bytes(data, count) for _, _, data, count in run)
            self.pager_data_write(run[0][0], run[0][1], raw)
            stored = True
        finally:
            for _, _, data, _ in run:
                if stored or not isinstance(data, WindowData):
                    release_written(data)

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
        with self._lock:
            mo = self._by_request.pop(request, None)
            window = self._windows.pop(request, None)
        if window is not None:
            window.close()
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
            _data_unavailable(request, offset, length)
        elif not self._placed(request, offset, length, data):
            provide(request, offset, data, staging_pages=self.staging_pages)

    def _placed(self, request: int, offset: int, length: int,
                data: bytes | bytearray | memoryview) -> bool:
        """Write read()'s data for the asked range [offset, offset+length) into the
        object's window and say so to the kernel (pager_data_provided_in_place), if the
        object has a window and they are whole pages of at least `window_min` bytes.
        Data past the asked range are dropped (read-ahead the kernel did not ask for:
        in the window they could land on a page the kernel has and a task changed, and
        in a message they would answer another request whose answer may still be
        written in place). False if nothing was done."""
        size = min(len(data), length)
        if not self.window_min or size < self.window_min:
            return False
        window = self._window(request)
        if window is None or not window.fits(offset, size):
            return False
        with memoryview(data) as view:
            try:
                window.write(offset, view[:size])
            except (MachError, OSError):  # (closed: the request port died meanwhile)
                return False
            with self._lock:
                self.window_bytes += size
            _answer(_in_place_message(request, window.key, offset, size, VM_PROT_NONE),
                    True)
        return True

    def _window(self, request: int) -> PagerWindow | None:
        """The window of the object whose request port is `request`, asked of the kernel
        the first time (memory().pager_window), then kept until the port dies."""
        with self._lock:
            if request in self._windows:
                return self._windows[request]
        try:
            window = memory().pager_window(request, writes_in_place=self.writes_in_place)
        except MachError:  # (the port died meanwhile, say): the data go in the message
            window = None
        with self._lock:
            kept = self._windows.setdefault(request, window) \
                if request in self._by_request else None
        if window is not None and kept is not window:  # another thread's, or too late
            window.close()
        return kept

    def pager_data_write(self, memory_object: int, offset: int, data: bytes) -> None:
        """A kernel writes changed data back: store it with `write()`."""
        self.write(memory_object, offset, data)

    def pager_data_write_in_place(self, memory_object: int, request: int, window: int,
                                  offset: int, data_count: int) -> None:
        """A kernel left changed data of the object in its window (whose key is
        `window`): read them and store them as a pager_data_write's, then release them
        (as an out-of-line region is deallocated only once stored: until then a fault
        on those pages waits for them, not for this manager's store). A run in a window
        this manager no longer has is not released: the kernel takes the data back at
        the pageout deadline and sends them again."""
        with self._lock:
            held = self._windows.get(request)
        if held is None or held.key != window:
            log.warning("a write-back in place to window %d, which this manager does not "
                        "hold: left to the kernel's deadline", window)
            return
        try:
            data = held.read(offset, data_count)
        except MachError as e:  # (closed meanwhile)
            log.warning("a write-back in place could not be read (%s): left to the "
                        "kernel's deadline", e)
            return
        if not held.holds(offset, data_count):  # the kernel took them back (a late
            return  # manager): they come again in pager_data_write
        self.queue_write(memory_object, offset,
                         WindowData(data, request, window, offset, data_count), data_count)

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


class WindowData:
    """Written-back data read from the object's window (pager_data_write_in_place),
    and what releasing them takes."""

    __slots__ = ("count", "data", "offset", "request", "window")

    def __init__(self, data: bytes, request: int, window: int, offset: int,
                 count: int) -> None:
        self.data, self.request, self.window = data, request, window
        self.offset, self.count = offset, count

    def release(self) -> None:
        """pager_data_write_released (once stored); a refusal is logged: the kernel
        took the data back past its deadline and sends them again."""
        try:
            in_time = mach.pager_data_write_released(self.request, self.window,
                                                     self.offset, self.count)
        except MachError as e:  # (the kernel let go of the object meanwhile)
            in_time, reason = False, str(e)
        else:
            reason = "past the pageout deadline"
        if not in_time:
            log.warning("a write-back in place was released too late (%s): what was "
                        "stored may not be the data, which come again", reason)


def written_bytes(data: OOL | WindowData, count: int) -> bytes:
    """The `count` bytes of a queued write-back (queue_write's `data`): read from its
    out-of-line region, or as read from the object's window."""
    if isinstance(data, WindowData):
        return data.data[:count]
    return memory().read(data.address, data.size)[:count] if data.size else b""


def release_written(data: OOL | WindowData) -> None:
    """Let go of a queued write-back once stored: deallocate its out-of-line region, or
    release the run read from the window."""
    if isinstance(data, WindowData):
        data.release()
    elif data.size:
        mach.vm_deallocate(mach.task_self(), data.address, data.size)


def _data_provided(request: int, offset: int, data: Any, data_count: int,
                   lock_value: int) -> None:
    """pager_data_provided sent without waiting (`_answer`)."""
    _answer(_provided_message(request, offset, data, data_count, lock_value),
            isinstance(data, bytes))


def _data_unavailable(request: int, offset: int, size: int) -> None:
    """pager_data_unavailable sent without waiting (`_answer`)."""
    _answer(_unavailable_message(request, offset, size), True)


def _answer(msg: Message, movable: bool) -> None:
    """Send a one-way answer to the kernel. In the default pager_data_request of a
    serving thread (whose answer is the last thing it does) the answer is held and sent
    with the thread's next receive, in one kernel call (msg_send_receive: in native
    mode one round trip to machd instead of two); a refusal is then logged, as the
    kernel logs a bad one-way request. Data given out of line (`movable` False: a
    region whose fate the caller learns from the send) goes at once."""
    if movable and getattr(_answers, "folding", False) and \
            getattr(_answers, "held", None) is None:
        _answers.held = msg
    else:
        mach.msg_send(msg)


def _send_logged(msg: Message) -> None:
    """Send a held answer now, logging a refusal."""
    try:
        mach.msg_send(msg)
    except MachError as e:
        _refused(msg, e)


def _refused(msg: Message, e: MachError) -> None:
    log.warning("a data manager's answer (message %d) to port %d was refused: %s",
                msg.id, msg.remote_port, e)


def provide(request: int, offset: int, data: bytes | bytearray | memoryview,
            lock_value: int = VM_PROT_NONE, staging_pages: int = STAGING_PAGES) -> None:
    """pager_data_provided of `data` at `offset`, sent without waiting (a bad one is
    logged by the kernel). In a native task, data of OOL_MIN bytes or more go out of
    line, so machd puts them into the object's pages with one copy per run rather
    than reading them from its socket: copied once into this thread's staging region
    if they fit in `staging_pages` pages (sent copy-on-write; the kernel is done with
    the copy when the send returns, so the next provide costs a write fault a page,
    not a new region), else into a fresh region that moves to the kernel (deallocate).
    Smaller data, and any in the embedded kernel (where bytes in a message are not
    copied again), go in the message."""
    size = len(data)
    if size < OOL_MIN or not isinstance(memory(), NativeAddressSpace):
        _data_provided(request, offset, bytes(data), size, lock_value)
        return
    staged = size <= staging_pages * vm_page_size()
    address = _staging_region(size) if staged else mach.vm_allocate(
        mach.task_self(), 0, size, True)
    try:
        memory().buffer(address, size)[:] = data
        _data_provided(request, offset, OOL(address, size, deallocate=not staged), size,
                       lock_value)
    except MachError as e:
        if not staged and e.code in _REFUSED_BEFORE_COPYIN:  # the region is still ours
            mach.vm_deallocate(mach.task_self(), address, size)
        raise


def _staging_region(size: int) -> int:
    """The calling thread's staging region for provided data, of at least `size`
    bytes (made, or made larger, now)."""
    held: tuple[int, int] | None = getattr(_staging, "region", None)
    if held is not None and held[1] >= size:
        return held[0]
    me = mach.task_self()
    if held is not None:
        with contextlib.suppress(MachError):
            mach.vm_deallocate(me, *held)
        _staging.region = None
    address: int = mach.vm_allocate(me, 0, size, True)
    _staging.region = (address, size)
    return address


_staging = threading.local()  # per thread of the task: (address, size) of its region,
# kept until the task ends (at most staging_pages pages a thread)
_REFUSED_BEFORE_COPYIN = frozenset({"SEND_INVALID_PORT", "SEND_INVALID_RIGHT",
                                    "SEND_INVALID_MEMORY", "KERN_INVALID_ARGUMENT"})
# a send refused with one of these changed nothing (its region did not move)


def write_runs(writes: list[Write]) -> list[list[Write]]:
    """Writes grouped into runs of contiguous data of one object (of at most
    WRITE_RUN_MAX bytes, unless one write alone is larger), in the order to store them:
    by (object, offset) when no two overlap (then their order cannot matter), else in
    arrival order, joining only neighbours."""
    spans = sorted((mo, off, off + count) for mo, off, _, count in writes)
    disjoint = all(a[0] != b[0] or a[2] <= b[1] for a, b in itertools.pairwise(spans))
    ordered = sorted(writes, key=lambda w: (w[0], w[1])) if disjoint else writes
    runs: list[list[Write]] = []
    size = 0
    for w in ordered:
        last = runs[-1][-1] if runs else None
        if (last is not None and last[0] == w[0] and last[1] + last[3] == w[1]
                and size + w[3] <= WRITE_RUN_MAX):
            runs[-1].append(w)
            size += w[3]
        else:
            runs.append([w])
            size = w[3]
    return runs


class _Adapter:
    """Turns raw memory_object messages into the handlers' plain arguments."""

    def __init__(self, dm: DataManager) -> None:
        self.dm = dm

    def pager_init(self, mo: int, request: int, name: int) -> None:
        if not request:  # the kernel let go of the object before this arrived: its
            for port in (name,) if name else ():  # request port died on the way, and no
                with contextlib.suppress(MachError):  # notification will ever name it
                    mach.port_deallocate(mach.task_self(), port)
            return
        self.dm.pager_init(mo, request, name)

    def pager_data_request(self, mo: int, request: int, offset: int, length: int,
                           access: int) -> None:
        # The default handler answers last: its answer may wait for the next receive.
        _answers.folding = type(self.dm).pager_data_request is DataManager.pager_data_request
        try:
            self.dm.pager_data_request(mo, request, offset, length, access)
        finally:
            _answers.folding = False

    def pager_data_write(self, mo: int, offset: int, data: OOL, data_count: int) -> None:
        self.dm.queue_write(mo, offset, data, data_count)

    def pager_data_write_in_place(self, mo: int, request: int, window: int, offset: int,
                                  data_count: int) -> None:
        self.dm.pager_data_write_in_place(mo, request, window, offset, data_count)

    def pager_data_unlock(self, mo: int, request: int, offset: int, length: int,
                          access: int) -> None:
        self.dm.pager_data_unlock(mo, request, offset, length, access)

    def pager_create(self, pager: int, mo: int, request: int, name: int) -> None:
        raise MachError("KERN_INVALID_ARGUMENT", "pager_create goes to the default pager")
