"""The kernel thread that stands for one thread of a native task's process, and the trap
table it serves.

`serve_remote` is the code of a kernel `Thread` in machd: it sends the process thread
its welcome, then serves its traps and its page faults until the connection ends:

- a trap frame (include/traps.py) is checked against its layout and dispatched through
  `TRAP_TABLE` (trap number -> handler), which runs the embedded kernel's trap function
  as this Mach thread, so a native task gets exactly the embedded semantics and errors;
  the reply carries the address-space changes the process must apply first;
- a page fault of the process thread (from the fault poller) runs vm_fault for this
  thread; the pmap then resolves it in the process (pmap/uffd_pmap.py). A fault that
  vm_fault refuses (an unallocated address, a protection violation, a memory error)
  ends the task with that diagnostic: a process cannot take a Python exception at a
  hardware fault.

A message trap that must wait for a message does not sleep in the kernel: it parks
with a continuation (kern/sched_prim.py, ipc/mach_msg.py) and this thread goes back to
waiting on the connection. The thread whose send completes it (another task's kernel
thread, the fault poller, ...) copies the message out and writes this trap's REPLY to
the process itself (`TrapHandoff.deliver`, a write that never blocks: what the socket
does not take at once is left to this thread), so a message between two native tasks
wakes no thread in machd but the sender's. A parked trap that times out, or is handed
back (its thread was terminated or suspended), is finished here (`_continue`).

`RemoteState.busy` is held while this thread acts as its process thread (a trap, a
posted fault, a parked trap's rest); a parked trap holds nothing, as it does not act
as the thread: its completion only touches the task's space and map, under the
kernel lock. The fault poller takes `busy` to run a fault as the thread
(machd/faults.py), and so does whoever runs a parked fault (machd/fault_park.py). A
fault parked for this thread is dropped when the process thread makes a trap (it has
left that fault: the event was stale) and when the connection ends; a parked fault
that vm_fault refused comes here (`FailedFault`) to end the task.

A frame that breaks the wire format or a trap's layout ends this connection (the
thread), logged; nothing else is affected. The connection, the fault queue and the
wake pipe belong to this thread; the REPLY to a parked trap is written by whoever
completes it (only one party can), and what it could not write by this thread.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pymach import mach
from pymach.errors import MachError, ThreadTerminated
from pymach.include import traps, wire
from pymach.include.channel import Channel, Disconnected, Frame, close_fds
from pymach.include.doorbell import Doorbell
from pymach.include.vm_param import VM_PROT_READ, VM_PROT_WRITE, trunc_page
from pymach.ipc.mach_msg import (
    msg_receive_trap,
    msg_rpc_trap,
    msg_send_receive_trap,
    msg_send_trap,
)
from pymach.kern.sched_prim import NOT_YET, Parked, thread_cancel, thread_continue
from pymach.machd.channels import ChannelTable
from pymach.machd.fault_park import (
    FailedFault,
    drop_parked_fault,
    fault_access,
    fault_nowait,
    has_parked_fault,
)
from pymach.pmap.uffd import UffdError
from pymach.vm.memory_object import object_window
from pymach.vm.vm_fault import vm_fault_trap
from pymach.vm.vm_object import VmObject

if TYPE_CHECKING:
    from pymach.include.message import Code
    from pymach.kern.thread import Thread
    from pymach.machd.machd import Machd
    from pymach.pmap.native_map import NativeMapBinding
    from pymach.pmap.uffd import Fault

log = logging.getLogger("pymach.machd")

ENV_MAX_ENTRIES, ENV_MAX_CHARS = 256, 4096  # bounds on a task's sys.path as it reports it


@dataclass
class TaskEnv:
    """Where a task's program runs, as the task reported it (STDIO trap): used only to
    start processes for the tasks it creates, which run as the same user."""

    cwd: str = ""
    sys_path: list[str] = field(default_factory=list)
    main: str = ""  # the script run as __main__, for callables pickled by reference


def task_env(values: list[Any]) -> TaskEnv:
    """A STDIO trap's (cwd, sys.path, main), bounded (WireError past the bounds)."""
    cwd, path, main = values
    if len(path) > ENV_MAX_ENTRIES or not all(isinstance(p, str) for p in path) or any(
            len(p) > ENV_MAX_CHARS for p in [cwd, main, *path]):
        raise wire.WireError(f"a task environment holds at most {ENV_MAX_ENTRIES} paths "
                             f"of {ENV_MAX_CHARS} characters")
    return TaskEnv(cwd, list(path), main)


class RemoteState:
    """A kernel thread's record of the process thread it stands for (its
    `host_data`): that thread's id, the faults waiting for it, and its wake pipe."""

    def __init__(self, tid: int) -> None:
        self.tid = tid  # immutable: the process thread's id (0: a helper)
        self.busy = threading.Lock()  # held while the kernel thread acts as the process
        # thread (a trap, a posted fault); the poller runs a fault only if it can take it
        self.brief = False  # set by a holder of `busy` that holds the kernel lock and
        # never waits (a parked fault's run: fault_park.py), so the poller may wait for
        # it; a hint, read without locks
        self.faults: deque[Fault | FailedFault | None] = deque()
        self.wake_r, self.wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)  # (pipe_lock
        # for kick and close: -1 once closed)
        self.pipe_lock = threading.Lock()  # a leaf
        self.handoff: TrapHandoff | None = None  # set once by serve_remote
        self.outgoing: deque[Outgoing] = deque()  # parked traps' replies left to write
        self.alert: Doorbell | None = None  # (kernel lock) the thread's alert, once asked for

    def ring_alert(self) -> None:
        """Make the process thread enter the kernel if it waits on a direct channel
        (kernel lock held)."""
        if self.alert is not None:
            self.alert.ring()

    def post(self, fault: Fault | FailedFault | None) -> None:
        """Queue a fault for the thread (by the poller, or a parked fault's end)."""
        self.faults.append(fault)
        self.kick()

    def kick(self) -> None:
        """Wake the kernel thread (it looks at its faults, outgoing replies, and parked
        trap); nothing once its state is closed (the number may be reused)."""
        with self.pipe_lock, contextlib.suppress(OSError):
            if self.wake_w >= 0:
                os.write(self.wake_w, b"f")

    def drain(self) -> None:
        """Empty the wake pipe."""
        with contextlib.suppress(OSError):
            os.read(self.wake_r, 4096)

    def close(self) -> None:
        """Close the wake pipe and the alert (after which kick and ring do nothing)."""
        with self.pipe_lock:
            fds, self.wake_r, self.wake_w = (self.wake_r, self.wake_w), -1, -1
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.alert is not None:
            self.alert.close()


# A reply a parked trap's completion could not write at once: the whole frame (its
# values and descriptors), or the bytes of it the socket did not take.
Outgoing = tuple[list[Any], list[int]] | bytes


class TrapHandoff:
    """The Handoff (kern/sched_prim.py) of one kernel thread's parked traps: their
    outcome becomes the REPLY the process thread waits for, written by whoever
    completes the trap (see module docstring)."""

    def __init__(self, thread: Thread, conn: Channel, state: RemoteState) -> None:
        self.thread, self.conn, self.state = thread, conn, state  # immutable

    def deliver(self, outcome: Any) -> None:
        """The parked trap completed with `outcome` (kernel lock held, any thread)."""
        if isinstance(outcome, MachError):
            values, fds = reply_values(self.thread, traps.REPLY_ERROR, None, outcome.code,
                                       outcome.detail)
        else:
            values, fds = reply_values(self.thread, traps.REPLY_OK, outcome)
        try:  # (after anything still left to write: frames never interleave)
            rest = None if self.state.outgoing else _send_nowait(self.conn, values, fds)
        except (Disconnected, OSError):  # the process is gone: this thread ends
            close_fds(fds)
            return
        if rest is None:
            self.state.outgoing.append((values, fds))  # (its fds are closed once sent)
        else:
            close_fds(fds)
            if not rest:
                return
            self.state.outgoing.append(rest)
        self.state.kick()

    def wake(self) -> None:
        """The parked trap needs this kernel thread (kernel lock held, any thread)."""
        self.state.kick()


def _send_nowait(conn: Channel, values: list[Any], fds: list[int]) -> bytes | None:
    """Channel.send_nowait of a REPLY; a value that cannot travel becomes its error."""
    try:
        return conn.send_nowait(traps.REPLY, values, fds)
    except wire.WireError as e:
        return conn.send_nowait(traps.REPLY, _unencodable(values, e), fds)


def _unencodable(values: list[Any], e: wire.WireError) -> list[Any]:
    """A REPLY's values with its value replaced by the error saying it cannot travel."""
    return [traps.REPLY_ERROR, None, "MIG_TYPE_ERROR", e.detail, *values[4:]]


def _flush(conn: Channel, state: RemoteState) -> None:
    """Write the replies parked traps' completions left to this thread, in order."""
    while state.outgoing:
        out = state.outgoing.popleft()
        if isinstance(out, bytes):
            conn.send_rest(out)
        else:
            send_reply(conn, *out)


# -- the trap table -------------------------------------------------------------------------
@dataclass
class WithFds:
    """A trap's value that owns descriptors: they ride last in its REPLY (and are
    closed here once sent)."""

    value: Any
    fds: list[int]


def _channels(thread: Thread) -> ChannelTable:
    table: ChannelTable = thread.task.host.channels  # type: ignore[attr-defined]
    return table


def _channel_trap(call: Callable[..., Any]) -> Callable[[Thread, list[Any]], Any]:
    """A channel trap (machd/channels.py) entered as a kernel call; a descriptor machd
    cannot make (EMFILE, say) is KERN_RESOURCE_SHORTAGE for the caller."""
    def trap(thread: Thread, args: list[Any]) -> Any:
        with thread.kernel.trap(thread):
            try:
                value = call(_channels(thread), thread, *args)
            except OSError as e:
                raise MachError("KERN_RESOURCE_SHORTAGE", f"no direct channel: "
                                f"{e.strerror or e}") from None
            return WithFds(*value) if isinstance(value, tuple) else value
    return trap


def _thread_alert(thread: Thread, args: list[Any]) -> Any:
    """The thread's alert (a doorbell, made once: include/doorbell.py), rung when it is
    suspended or terminated (RemoteState.ring_alert); a kernel boundary, so a
    suspension made before the alert existed takes effect here."""
    state: RemoteState = thread.host_data
    with thread.kernel.trap(thread):
        try:
            if state.alert is None:
                state.alert = Doorbell()
            return WithFds([1], [state.alert.handout()])
        except OSError as e:  # (out of descriptors): the caller's call fails, clearly
            raise MachError("KERN_RESOURCE_SHORTAGE", f"no alert for this thread: {e}") \
                from None


def _boundary(thread: Thread, args: list[Any]) -> Any:
    with thread.kernel.trap(thread):
        pass


def _handoff(thread: Thread) -> TrapHandoff | None:
    handoff: TrapHandoff | None = thread.host_data.handoff
    return handoff


def _msg_send(thread: Thread, args: list[Any]) -> Any:
    msg_send_trap(thread, *args)


def _msg_receive(thread: Thread, args: list[Any]) -> Any:
    name, option, timeout, rcv_size = args
    return msg_receive_trap(thread, name, option, timeout, rcv_size, _handoff(thread))


def _msg_rpc(thread: Thread, args: list[Any]) -> Any:
    msg, option, rcv_size, send_timeout, receive_timeout = args
    return msg_rpc_trap(thread, msg, option, rcv_size, send_timeout, receive_timeout,
                        _handoff(thread))


def _msg_send_receive(thread: Thread, args: list[Any]) -> Any:
    msg, port, option, rcv_size, send_timeout, receive_timeout = args
    return msg_send_receive_trap(thread, msg, port, option, rcv_size, send_timeout,
                                 receive_timeout, _handoff(thread))


def _identity(call: Callable[[], int]) -> Callable[[Thread, list[Any]], Any]:
    return lambda thread, args: call()


def _fault_in(thread: Thread, args: list[Any]) -> Any:
    """memory()'s trap before it touches [address, address+size): take the faults the
    access would take, so that a failure is a MachError for the caller (as in the
    embedded kernel) instead of a memory exception that ends the task."""
    address, size, access = args
    if not (address >= 0 and 0 <= size <= traps.FAULT_IN_MAX) or access & ~(
            VM_PROT_READ | VM_PROT_WRITE):
        raise MachError("KERN_INVALID_ARGUMENT", f"fault_in of {size:#x} bytes at "
                        f"{address:#x} (at most {traps.FAULT_IN_MAX:#x}, access read/write)")
    vmap = thread.task.map
    if vmap is None or vmap.pmap is None:
        return
    if address + size > vmap.max_offset or address < vmap.min_offset:
        raise MachError("KERN_INVALID_ADDRESS", f"{address:#x}+{size:#x} is outside the "
                        f"task's address space")
    ps = thread.kernel.page_size
    for va in range(trunc_page(address, ps), address + size, ps):
        if access & ~vmap.pmap.pmap_access(va):
            vm_fault_trap(thread, va, access)


def _mapped(thread: Thread, args: list[Any]) -> Any:
    """The process has applied a batch of mappings: arm its ranges."""
    binding = _binding(thread)
    if binding is not None:
        with thread.kernel.sched.lock:
            binding.arm(args[0])


def _pager_window(thread: Thread, args: list[Any]) -> Any:
    """The window of the external object whose pager request port the caller names (a
    send right it holds: the object's manager), for pager_data_provided_in_place:
    [key, paging offset, object size, huge page size or 0, 1] and a read-write
    descriptor of the object's memfd (memory_object.object_window); None if it has
    none. A true `args[1]` also says the manager takes the object's write-backs in
    place (pager_data_write_in_place)."""
    with thread.kernel.trap(thread):
        name, writes = args
        entry = thread.task.space.lookup(name)
        obj = entry.port.kobject
        if not entry.can_send or not isinstance(obj, VmObject) or \
                obj.pager_request is not entry.port:
            raise MachError("KERN_INVALID_ARGUMENT", f"port {name} is not a pager "
                            f"request port")
        try:
            fd = object_window(obj)
        except OSError as e:  # (out of descriptors)
            raise MachError("KERN_RESOURCE_SHORTAGE", f"no window: {e.strerror or e}") \
                from None
        if fd is None:
            return None
        obj.writes_in_place = bool(writes)
        return WithFds([obj.serial, obj.paging_offset, obj.size, obj.vm.phys.huge, 1],
                       [fd])


def _binding(thread: Thread) -> NativeMapBinding | None:
    """The map-change record of the thread's task (its UffdPmap's), if it has a map."""
    vmap = thread.task.map
    return getattr(vmap.pmap, "binding", None) if vmap is not None else None


TRAP_TABLE: dict[int, Callable[[Thread, list[Any]], Any]] = {
    traps.TASK_SELF: _identity(mach.task_self),
    traps.THREAD_SELF: _identity(mach.thread_self),
    traps.TASK_NOTIFY: _identity(mach.task_notify),
    traps.HOST_SELF: _identity(mach.host_self),
    traps.THREAD_REPLY: _identity(mach.thread_reply),
    traps.MSG_SEND: _msg_send,
    traps.MSG_RECEIVE: _msg_receive,
    traps.MSG_RPC: _msg_rpc,
    traps.MSG_SEND_RECEIVE: _msg_send_receive,
    traps.FAULT_IN: _fault_in,
    traps.MAPPED: _mapped,
    traps.PAGER_WINDOW: _pager_window,
    traps.CHANNEL_OPEN: _channel_trap(ChannelTable.open),
    traps.CHANNEL_ACCEPT: _channel_trap(ChannelTable.accept),
    traps.CHANNEL_CLOSE: _channel_trap(ChannelTable.close),
    traps.CHANNEL_BIND: _channel_trap(ChannelTable.bind),
    traps.CHANNEL_REPLIES: _channel_trap(ChannelTable.replies),
    traps.CHANNEL_HOLD: _channel_trap(ChannelTable.hold),
    traps.CHANNEL_CLAIM: _channel_trap(ChannelTable.claim),
    traps.THREAD_ALERT: _thread_alert,
    traps.BOUNDARY: _boundary,
}


_THREAD_OPS = frozenset((*TRAP_TABLE, traps.STDIO, traps.EXIT))  # a thread's frames


def check_frame(frame: Frame, allowed: Callable[[int], bool]) -> None:
    """WireError unless the frame's op is `allowed` and its values fit the op's layout."""
    if frame.op not in traps.SIGNATURES or not allowed(frame.op):
        raise wire.WireError(f"op {frame.op} is not allowed here")
    wire.check(frame.values, traps.SIGNATURES[frame.op], traps.NAMES[frame.op])


# -- serving one process thread ----------------------------------------------------------------
def serve_remote(machd: Machd, thread: Thread, conn: Channel, code: Code | None,
                 control_token: bytes) -> None:
    """Serve one process thread (see module docstring); ends with its connection."""
    state: RemoteState = thread.host_data
    state.handoff = TrapHandoff(thread, conn, state)
    machd.poller.register_thread(thread)
    try:
        reply(thread, conn, traps.REPLY_OK, _welcome(machd, thread, code, control_token))
        _loop(machd, thread, conn, state)
    except (Disconnected, ThreadTerminated):
        pass
    except wire.WireError as e:
        log.warning("task %s thread %s: %s; connection closed", thread.task.name,
                    thread.name, e.detail)
    finally:
        with thread.kernel.sched.lock:  # a trap parked now has nobody to answer
            drop_parked_fault(thread)
            thread_cancel(thread)
        machd.poller.unregister_thread(thread)
        conn.close()
        for out in state.outgoing:
            if not isinstance(out, bytes):
                close_fds(out[1])
        state.close()
        machd.connection_closed(thread.task.uid)
        with thread.kernel.sched.lock:  # (last: the cleanup above never waits for it)
            machd.channels.thread_ended(thread)  # a token it held may never come


def refuse_thread(thread: Thread, conn: Channel) -> None:
    """The thread was terminated before it ran: its process thread, waiting for its
    welcome, is told so (it ends without running its code)."""
    with contextlib.suppress(Disconnected, OSError, ThreadTerminated):
        reply(thread, conn, traps.REPLY_TERMINATED, None)
    conn.close()
    thread.host_data.close()


def _welcome(machd: Machd, thread: Thread, code: Code | None,
             control_token: bytes) -> list[Any]:
    """The WELCOME_FIELDS of a new process thread."""
    task = thread.task
    return [task.serial, task.name, thread.name, machd.kernel.page_size,
            code.blob if code is not None else None,
            code.origin_uid if code is not None else -1, mach.task_self(),
            mach.thread_reply(), control_token]


def _loop(machd: Machd, thread: Thread, conn: Channel, state: RemoteState) -> None:
    poller = select.poll()
    conn_fd, wake_fd = conn.fileno(), state.wake_r
    poller.register(conn_fd, select.POLLIN)
    poller.register(wake_fd, select.POLLIN)
    while True:
        ready = {fd for fd, _ in poller.poll(_poll_timeout(thread))}
        if wake_fd in ready or not ready:  # kicked, or a parked trap's deadline
            state.drain()
            _flush(conn, state)
            if thread.continuation is not None:
                _continue(thread, conn)
            while state.faults:
                fault = state.faults.popleft()
                if fault is not None:
                    with state.busy:
                        serve_fault(machd, thread, fault)
        if conn_fd in ready and not _serve_frame(machd, thread, conn):
            return


def _poll_timeout(thread: Thread) -> int | None:
    """How long (ms) the thread may wait for its connection: until its parked trap's
    deadline, if it has one (read without the lock: a stale value only makes the loop
    look again)."""
    cont = thread.continuation
    if cont is None or cont.deadline is None:
        return None
    return max(0, math.ceil(cont.deadline - thread.kernel.sched.now()))


def _continue(thread: Thread, conn: Channel) -> None:
    """Finish the thread's parked trap here if it was handed back or timed out. A
    parked fault is left alone: its waker completes it (fault_park.py), and the process
    thread is still in it (this loop was only kicked, say by a fault posted meanwhile);
    dropping it here would leave that thread blocked in its fault for ever."""
    _run_trap(thread, conn, lambda: thread_continue(thread), new_trap=False)


def _serve_frame(machd: Machd, thread: Thread, conn: Channel) -> bool:
    """Serve one frame of the process thread; False once it has exited."""
    frame = conn.recv()
    try:
        check_frame(frame, _THREAD_OPS.__contains__)
        if frame.op == traps.STDIO:  # where the task's next children write, and run
            env = task_env(frame.values)
            fds, frame.fds = frame.fds, []
            machd.set_stdio(thread.task, fds, env)
            reply(thread, conn, traps.REPLY_OK, None)
            return True
        if frame.fds:
            raise wire.WireError(f"{traps.NAMES[frame.op]} carries no descriptors")
    finally:
        frame.close_fds()
    if frame.op == traps.EXIT:
        thread.result = frame.values[0]
        return False
    _trap(thread, conn, frame)
    return True


def _trap(thread: Thread, conn: Channel, frame: Frame) -> None:
    """Run one trap as `thread` and send its reply (its value, or the Mach error)."""
    _run_trap(thread, conn, lambda: TRAP_TABLE[frame.op](thread, frame.values))


def _run_trap(thread: Thread, conn: Channel, call: Callable[[], Any],
              new_trap: bool = True) -> None:
    """Run `call` as `thread` and reply with its outcome; no reply if it parked (its
    completion replies) or returned NOT_YET (a parked trap still waiting). `new_trap`:
    the process thread made this trap, so it has left any fault parked for it."""
    try:
        with thread.host_data.busy:  # (released before the reply: see faults._resolve_now)
            if new_trap and has_parked_fault(thread):  # it left that fault (module
                # docstring); while we hold busy, no fault of it parks anew
                with thread.kernel.sched.lock:
                    drop_parked_fault(thread)
            value = call()
    except Parked:
        return
    except MachError as e:
        reply(thread, conn, traps.REPLY_ERROR, None, e.code, e.detail)
    except ThreadTerminated:
        reply(thread, conn, traps.REPLY_TERMINATED, None)
    else:
        if isinstance(value, WithFds):
            reply(thread, conn, traps.REPLY_OK, value.value, fds=value.fds)
        elif value is not NOT_YET:
            reply(thread, conn, traps.REPLY_OK, value)


def reply(thread: Thread, conn: Channel, status: int, value: Any, code: str = "",
          detail: str = "", fds: list[int] | None = None) -> None:
    """Send a REPLY with the task's pending address-space changes (their fds closed
    here once sent), and `fds` of the value's own after them (closed too); raise
    ThreadTerminated after a REPLY_TERMINATED."""
    own = fds or []
    if _binding(thread) is not None:
        with thread.kernel.sched.lock:
            values, batch_fds = reply_values(thread, status, value, code, detail)
    else:
        values, batch_fds = [status, value, code, detail, 0, 0, []], []
    send_reply(conn, values, [*batch_fds, *own])
    if status == traps.REPLY_TERMINATED:
        raise ThreadTerminated()


def reply_values(thread: Thread, status: int, value: Any, code: str = "",
                 detail: str = "") -> tuple[list[Any], list[int]]:
    """A REPLY's values and descriptors, taking the task's pending address-space
    changes as its batch (kernel lock held). A REPLY_TERMINATED takes none: its thread
    ends without applying it (a live thread of the task gets the changes)."""
    binding = _binding(thread)
    if binding is None or status == traps.REPLY_TERMINATED:
        return [status, value, code, detail, 0, 0, []], []
    batch, fds = binding.take()
    return [status, value, code, detail, *batch], fds


def send_reply(conn: Channel, values: list[Any], fds: list[int]) -> None:
    """Send a REPLY (a value that cannot travel: the caller gets an error); its
    descriptors are closed here once sent."""
    try:
        conn.send(traps.REPLY, values, fds)
    except wire.WireError as e:
        conn.send(traps.REPLY, _unencodable(values, e), fds)
    finally:
        close_fds(fds)


def fault_pending(pid: int, tid: int) -> bool:
    """False if the kernel shows that thread `tid` of process `pid` waits somewhere other
    than in a userfaultfd fault (its wait channel): an event read for a fault the thread
    no longer waits on is stale (it was woken another way, and went on). True where it
    cannot tell (no wait channel shown, or the thread still running into its wait)."""
    for _ in range(STALE_CHECKS):
        try:
            with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                wchan = f.read().strip()
        except OSError:
            return True
        if wchan == "handle_userfault":
            return True
        if wchan not in ("", "0"):
            return False  # asleep elsewhere (in a trap's socket read, say)
        time.sleep(0.002)  # running: about to sleep in its fault, or running on
    return True


STALE_CHECKS = 5


def memory_exception(machd: Machd, thread: Thread, fault: Fault, e: MachError) -> bool:
    """vm_fault refused a fault of the process: end the task, saying why, and return
    True; unless the fault is stale (the thread is not waiting on it): False."""
    proc = thread.task.process
    if proc is not None and not fault_pending(proc.pid, fault.tid):
        log.info("task %s: stale fault at %#x ignored (%s)", thread.task.name,
                 fault.address, e.code)
        return False
    why = (f"memory exception: {e.code} at {fault.address:#x} "
           f"({'write' if fault_access(fault) & VM_PROT_WRITE else 'read'}): {e.detail}")
    log.warning("task %s: %s", thread.task.name, why)
    if proc is not None:
        machd.kill(proc, why)
    return True


def serve_fault(machd: Machd, thread: Thread, fault: Fault | FailedFault,
                park: bool = True) -> None:
    """Resolve one page fault of the process thread, or end the task (as for a parked
    fault that vm_fault refused): then ThreadTerminated; a stale fault vm_fault refuses
    is only logged, and this thread serves on. With `park`, a fault that waits for a
    page parks (fault_park.py) rather than block this thread: so it holds `busy` only
    while it runs, and the next fault of the process thread finds it free (the poller
    then runs that one itself)."""
    if isinstance(fault, FailedFault):
        if memory_exception(machd, thread, fault.fault, fault.error):
            raise ThreadTerminated()
        return  # stale: this thread serves on
    try:
        if not (park and fault_nowait(thread, fault)):
            vm_fault_trap(thread, fault.address, fault_access(fault))
    except MachError as e:
        if memory_exception(machd, thread, fault, e):
            raise ThreadTerminated() from None
    except UffdError as e:  # the process died while its fault was resolved (ESRCH)
        log.info("task %s: a fault not resolved: %s", thread.task.name, e)


def serve_faults(machd: Machd, thread: Thread) -> None:
    """A task's helper kernel thread: resolve faults of process threads Mach does not
    know (a None fault means the process is gone)."""
    state: RemoteState = thread.host_data
    poller = select.poll()
    poller.register(state.wake_r, select.POLLIN)
    try:
        while True:
            poller.poll()
            state.drain()
            while state.faults:
                fault = state.faults.popleft()
                if fault is None or not thread.task.active:
                    return
                serve_fault(machd, thread, fault, park=False)  # (it serves many threads)
    except ThreadTerminated:
        pass
    finally:
        state.close()
