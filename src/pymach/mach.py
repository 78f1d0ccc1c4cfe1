"""The task's view of the kernel (our libmach): the traps and the generated RPC stubs.

Traps: msg_send, msg_receive, msg_rpc (Table 3-1) and the identity calls task_self,
thread_self, task_notify, thread_reply, host_self. Everything else is a MIG stub from
include/mach_defs.py that sends a message to a task, thread or host port. `make_stub`
makes every client stub (`Subsystem.stub`, include/mig.py).
Timeouts are in milliseconds and apply only with SEND_TIMEOUT / RCV_TIMEOUT, as in Mach.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import pkgutil
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from pymach.errors import MachError, code_name
from pymach.include import traps
from pymach.include.mach_defs import (
    TASK_ENTRY_MAX,
    TASK_NOTIFY_PORT,
    host_defs,
    pager_defs,
    port_defs,
    task_defs,
    thread_defs,
    vm_defs,
)
from pymach.include.message import (
    MAKE_SEND,
    MSG_OPTION_NONE,
    MSG_SIZE_MAX,
    OOL,
    PORT_NULL,
    RCV_TIMEOUT,
    Code,
    Int,
    Item,
    Message,
    Port,
    Str,
    check_timeout,
)
from pymach.include.mig import (
    DATA,
    MEMORY,
    PORT,
    REPLY_ID_OFFSET,
    REPLY_SIZE_ANY,
    TASK_CODEC,
    Routine,
    Subsystem,
    decode_items,
    install_stub_maker,
)
from pymach.include.vm_param import VM_MAX_ADDRESS
from pymach.kern.syscall_sw import TrapTransport
from pymach.kern.task import check_spawn
from pymach.kern.thread import current_thread
from pymach.mach_vm import VmRegion, VmStatistics, take_ool


def _traps() -> TrapTransport:
    """The calling thread's way into its kernel (kern/syscall_sw.py)."""
    return current_thread().transport


def msg_send(message: Message, option: int = MSG_OPTION_NONE,
             timeout: float | None = None) -> None:
    """Send a message to the destination in its header (Table 3-1).

    A full destination queue blocks; with SEND_TIMEOUT it waits at most `timeout` ms
    (0: fail at once) and raises SEND_TIMED_OUT, leaving the sender's rights untouched.
    """
    _traps().msg_send(message, option, timeout)


def msg_receive(port: int | Message = PORT_NULL, option: int = MSG_OPTION_NONE,
                timeout: float | None = None, rcv_size: int = MSG_SIZE_MAX) -> Message:
    """Receive a message from `port`, or from the task's default group if PORT_NULL.

    Returns the message: `local_port` is the port it arrived on, `remote_port` the reply
    port. With RCV_TIMEOUT, raises RCV_TIMED_OUT after `timeout` ms.
    """
    return _traps().msg_receive(port, option, timeout, rcv_size)


def msg_rpc(message: Message, option: int = MSG_OPTION_NONE, rcv_size: int = MSG_SIZE_MAX,
            send_timeout: float | None = None,
            receive_timeout: float | None = None) -> Message:
    """Send a message, then receive the reply on its `local_port` (Table 3-1)."""
    return _traps().msg_rpc(message, option, rcv_size, send_timeout, receive_timeout)


def msg_send_receive(message: Message, port: int = PORT_NULL,
                     option: int = MSG_OPTION_NONE, rcv_size: int = MSG_SIZE_MAX,
                     send_timeout: float | None = None,
                     receive_timeout: float | None = None) -> Message:
    """A server's reply and its next request in one kernel call (Mach 3.0's mach_msg
    with both SEND and RCV): send `message`, then receive from `port` (PORT_NULL: the
    task's default group), as msg_send then msg_receive would. A SEND_* error means
    nothing was sent; an RCV_* error means the message was sent and nothing received.
    In native mode it saves a round trip to machd per request."""
    return _traps().msg_send_receive(message, port, option, rcv_size, send_timeout,
                                     receive_timeout)


def task_self() -> int:
    """The calling task's name for its own task port."""
    return _traps().identity(traps.TASK_SELF)


def thread_self() -> int:
    """The calling task's name for the calling thread's port."""
    return _traps().identity(traps.THREAD_SELF)


def task_notify() -> int:
    """The calling task's name for its notify port (where notifications arrive)."""
    return _traps().identity(traps.TASK_NOTIFY)


def host_self() -> int:
    """The calling task's name for the host port."""
    return _traps().identity(traps.HOST_SELF)


def thread_reply() -> int:
    """The calling thread's reply port for RPCs (allocated on first use)."""
    return _traps().identity(traps.THREAD_REPLY)


# -- MIG client stubs ----------------------------------------------------------------

def make_stub(r: Routine) -> Callable[..., Any]:
    """The client stub for `r` (what `Subsystem.stub` returns; include/mig.py)."""
    names = [r.target] + [n for n, _ in r.ins]
    signature = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names])

    def stub(*args: Any, **kwargs: Any) -> Any:
        msg = _request(r, _bind(r, signature, args, kwargs))
        if r.simple:
            msg_send(msg)
            return None
        msg.local_port = thread_reply()  # any reply fits: one left queued as too
        return _unpack_reply(r, msg_rpc(msg, rcv_size=REPLY_SIZE_ANY))  # large would
        # block every later call of this thread

    stub.__name__ = stub.__qualname__ = r.name
    stub.__signature__ = signature  # type: ignore[attr-defined]  # (for help and inspect)
    sig = ", ".join(names)
    outs = ", ".join(n for n, _ in r.outs) or "None"
    stub.__doc__ = f"{r.name}({sig}) -> {outs}\n\n{r.doc}\n\nMIG routine {r.id}."
    return stub


def oneway_stub(subsystem: Subsystem, name: str) -> Callable[..., None]:
    """A stub for routine `name` of `subsystem` that sends the request and does not wait
    for the reply: the request names no reply port, so the server sends none, and an
    error it finds is logged where the server runs (as a simpleroutine's is). For a
    server that streams requests and needs no answer, as a data manager providing data
    does (Mach 3.0 made memory_object_data_provided a simpleroutine). Arguments are
    checked here as the routine's stub checks them."""
    message = oneway_message(subsystem, name)

    def send(*args: Any, **kwargs: Any) -> None:
        msg_send(message(*args, **kwargs))

    signature = inspect.signature(message)
    send.__name__ = send.__qualname__ = f"{name}_oneway"
    send.__signature__ = signature  # type: ignore[attr-defined]  # (for help and inspect)
    send.__doc__ = f"{name}({', '.join(signature.parameters)}) sent without waiting for " \
        f"the reply."
    return send


def oneway_message(subsystem: Subsystem, name: str) -> Callable[..., Message]:
    """What `oneway_stub(subsystem, name)` sends, built and not sent: the request with
    no reply port, its arguments checked as the routine's stub checks them. For a
    server that sends it itself: with its next receive, say (msg_send_receive)."""
    r = subsystem.by_name[name]
    names = [r.target] + [n for n, _ in r.ins]
    signature = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names])

    def message(*args: Any, **kwargs: Any) -> Message:
        if not kwargs and len(args) == len(names):  # (what bind gives, without its cost)
            return _request(r, list(args))
        return _request(r, _bind(r, signature, args, kwargs))

    message.__name__ = message.__qualname__ = f"{r.name}_message"
    message.__signature__ = signature  # type: ignore[attr-defined]  # (for help, inspect)
    message.__doc__ = f"The one-way request {r.name}({', '.join(names)})."
    return message


def _request(r: Routine, values: list[Any]) -> Message:
    """The request message of routine `r` for its checked argument values."""
    target = values[0]
    PORT.check(r.name, r.target, target)
    for (arg, t), v in zip(r.ins, values[1:], strict=True):
        t.check(r.name, arg, v)
    return Message(remote_port=target, id=r.id,
                   items=[TASK_CODEC.to_item(t, v)
                          for (_, t), v in zip(r.ins, values[1:], strict=True)])


def _bind(r: Routine, signature: inspect.Signature, args: tuple[Any, ...],
          kwargs: dict[str, Any]) -> list[Any]:
    """The call's values in the routine's order; TypeError for missing, extra or unknown
    arguments, as a Python function gives (wrong types are checked after, as Mach does)."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"{r.name}(): {e}") from None
    return list(bound.arguments.values())


def _unpack_reply(r: Routine, reply: Message) -> Any:
    if reply.id != r.id + REPLY_ID_OFFSET:
        raise MachError("MIG_REPLY_MISMATCH", f"{r.name}: reply id {reply.id}, expected "
                        f"{r.id + REPLY_ID_OFFSET}")
    if not reply.items or not isinstance(reply.items[0], Int):
        raise MachError("MIG_TYPE_ERROR", f"{r.name}: reply has no return code")
    code = reply.items[0].value
    if code != 0:
        detail = reply.items[1].value if len(reply.items) > 1 and isinstance(
            reply.items[1], Str) else ""
        raise MachError(code_name(code), detail)
    outs = decode_items(r, r.outs, reply.items[1:], "MIG_TYPE_ERROR")
    # Out-of-line DATA is read into bytes and its region released (MEMORY stays memory).
    outs = [take_ool(v) if t is DATA else v for (_, t), v in zip(r.outs, outs, strict=True)]
    if not outs:
        return None
    return outs[0] if len(outs) == 1 else tuple(outs)


install_stub_maker(make_stub)

_task_create = task_defs.stub("task_create")
task_terminate = task_defs.stub("task_terminate")
task_suspend = task_defs.stub("task_suspend")
task_resume = task_defs.stub("task_resume")
task_threads = task_defs.stub("task_threads")
_thread_create = task_defs.stub("thread_create")
task_get_special_port = task_defs.stub("task_get_special_port")
thread_get_special_port = thread_defs.stub("thread_get_special_port")
task_set_special_port = task_defs.stub("task_set_special_port")
task_info = task_defs.stub("task_info")
task_set_name = task_defs.stub("task_set_name")
task_set_entry = task_defs.stub("task_set_entry")
task_get_entry = task_defs.stub("task_get_entry")

port_allocate = port_defs.stub("port_allocate")
port_deallocate = port_defs.stub("port_deallocate")
port_enable = port_defs.stub("port_enable")
port_disable = port_defs.stub("port_disable")
port_messages = port_defs.stub("port_messages")
port_status = port_defs.stub("port_status")
port_set_backlog = port_defs.stub("port_set_backlog")
port_extract_right = port_defs.stub("port_extract_right")
port_insert_right = port_defs.stub("port_insert_right")
port_names = port_defs.stub("port_names")


def names_gone(names: Iterable[int]) -> list[int]:
    """Those of `names` the calling task no longer holds: their ports died (names are
    never reused). What a server checks on NOTIFY_OVERFLOW, when some port-death
    notifications were dropped (its notify port's backlog was full). `names` is an
    iterable of names (KERN_INVALID_ARGUMENT otherwise)."""
    if not isinstance(names, Iterable) or isinstance(names, str | bytes):
        raise MachError("KERN_INVALID_ARGUMENT", f"names_gone needs port names, not "
                        f"{names!r:.40}")
    me, gone = task_self(), []
    for name in names:
        try:
            port_status(me, name)
        except MachError as e:
            if e.code == "KERN_INVALID_NAME":
                gone.append(name)
    return gone

thread_terminate = thread_defs.stub("thread_terminate")
thread_suspend = thread_defs.stub("thread_suspend")
thread_resume = thread_defs.stub("thread_resume")
thread_info = thread_defs.stub("thread_info")

vm_allocate = vm_defs.stub("vm_allocate")
vm_deallocate = vm_defs.stub("vm_deallocate")
vm_inherit = vm_defs.stub("vm_inherit")
vm_protect = vm_defs.stub("vm_protect")
vm_read = vm_defs.stub("vm_read")
vm_write = vm_defs.stub("vm_write")
vm_copy = vm_defs.stub("vm_copy")
_vm_regions = vm_defs.stub("vm_regions")
_vm_resident = vm_defs.stub("vm_resident")
_vm_statistics = vm_defs.stub("vm_statistics")
vm_allocate_with_pager = vm_defs.stub("vm_allocate_with_pager")
vm_pager_timeout = vm_defs.stub("vm_pager_timeout")
vm_map_copyout = vm_defs.stub("vm_map_copyout")
vm_read_memory = make_stub(replace(vm_defs.by_name["vm_read"], outs=(("data", MEMORY),)))
vm_read_memory.__doc__ = (
    "vm_read_memory(target_task, address, size) -> OOL\n\nvm_read as Mach returns it: "
    "the range as new memory in the caller's address space (an OOL item: address, size), "
    "copy-on-write, no page copied. The caller vm_deallocates it, or sends it on with "
    "OOL(..., deallocate=True). The same routine as vm_read, whose stub reads the data.")

pager_data_provided = pager_defs.stub("pager_data_provided")
pager_data_unavailable = pager_defs.stub("pager_data_unavailable")
pager_data_lock = pager_defs.stub("pager_data_lock")
pager_flush_request = pager_defs.stub("pager_flush_request")
pager_clean_request = pager_defs.stub("pager_clean_request")
pager_cache = pager_defs.stub("pager_cache")
pager_data_error = pager_defs.stub("pager_data_error")
pager_data_provided_in_place = pager_defs.stub("pager_data_provided_in_place")
pager_data_write_released = pager_defs.stub("pager_data_write_released")

host_info = host_defs.stub("host_info")
host_kernel_version = host_defs.stub("host_kernel_version")
host_report = host_defs.stub("host_report")
task_for_id = host_defs.stub("task_for_id")


def task_create(parent_task: int, inherit: bool = False) -> int:
    """Create a child task of `parent_task`; returns the caller's name for its task port.

    The child has no threads until thread_create; it inherits the parent's bootstrap
    port, and (with the VM system) its address space per region inheritance if `inherit`.
    """
    return _task_create(parent_task, inherit)  # type: ignore[no-any-return]


def thread_create(parent_task: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Create a thread in `parent_task` running `fn(*args, **kwargs)`; returns its port name.

    The thread starts at once. Its return value is kept by the kernel; an exception it
    raises is logged and shown by the `ps` report.
    """
    return _thread_create(parent_task, Code(fn, args, kwargs))  # type: ignore[no-any-return]


def vm_regions(target_task: int, address: int = 0,
               size: int = VM_MAX_ADDRESS) -> list[VmRegion]:
    """Describe the task's regions overlapping [address, address+size) (Table 3-3); by
    default the whole address space."""
    cols = _vm_regions(target_task, address, size)
    return [VmRegion(a, n, p, mp, inh, bool(sh), off, name)
            for a, n, p, mp, inh, sh, off, name in zip(*cols, strict=True)]


def vm_resident(target_task: int, address: int = 0,
                size: int = VM_MAX_ADDRESS) -> list[tuple[int, int]]:
    """The runs (address, pages) of [address, address+size) resident in their region's
    own object now (the task's working set; as mincore), in address order, at most
    RESIDENT_RUNS_MAX of them."""
    addresses, counts = _vm_resident(target_task, address, size)
    return list(zip(addresses, counts, strict=True))


def vm_statistics(target_task: int) -> VmStatistics:
    """Page counts and VM counters of the task's host."""
    return VmStatistics(*_vm_statistics(target_task))


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a spawned native task, as text: the
    `__cause__` of that exception when `Spawned.result()` raises it here (as
    concurrent.futures does for a process pool), so both tracebacks are shown."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text}"""'


class Spawned:
    """A task started by `spawn` in a native task (a process of its own under machd)."""

    def __init__(self, port: int, box: int, name: str, migratable: bool = False) -> None:
        self._port = port  # the caller's send right to the child's task port
        self.name = name  # the task's name (spawn's `name=`, else the kernel's taskN)
        self._box = box  # where the child's first thread sends its outcome
        self._outcome: tuple[bool, Any, str] | None = None  # ok, value, traceback text
        self._early: Message | None = None  # an outcome that came before result()
        self._migratable = migratable

    @property
    def port(self) -> int:
        """The caller's send right to the task's port; for a migratable task, the port
        of the task it is now (moves it was told of are followed first)."""
        if self._migratable and self._outcome is None and self._early is None:
            with contextlib.suppress(MachError):  # RCV_TIMED_OUT: nothing more to follow
                while self._early is None:
                    self._early = self._follow(msg_receive(self._box, RCV_TIMEOUT, 0))
        return self._port

    def result(self, timeout: float | None = None) -> Any:
        """Wait (ms) for the child's function to return; its value, or its exception.
        None if the task ended without returning (task_terminate, or machd ended it for a
        memory exception: its diagnostic is then on the task's stderr), as for a
        terminated task in the embedded kernel; KERN_OPERATION_TIMED_OUT (a
        TimeoutError too) if `timeout` (ms, as every pymach timeout) passes first. An
        exception the function raised is raised here with the child's traceback chained
        as its `__cause__` (a RemoteTraceback)."""
        import cloudpickle

        if self._outcome is None:
            msg = self._await_outcome(check_timeout(timeout, "result"))
            if msg is not None and msg.sender_uid not in (None, os.getuid()):
                raise MachError("KERN_PROTECTION_FAILURE", f"a result from uid "
                                f"{msg.sender_uid} is not decoded")
            outcome: tuple[bool, Any, str] = (True, None, "") if msg is None else \
                cloudpickle.loads(take_ool(msg.items[0]))
            self._outcome = outcome
            _spawned.pop(self._port, None)
            port_deallocate(task_self(), self._box)
        ok, value, remote = self._outcome
        if not ok:
            raise value from (RemoteTraceback(remote) if remote else None)
        return value

    def _await_outcome(self, timeout: float | None) -> Any:
        """The child's outcome message (None if it ended without one), checking every
        100 ms that the child lives."""
        if self._early is not None:
            return self._early
        deadline = None if timeout is None else time.monotonic() + timeout / 1000
        while True:
            left = 100.0 if deadline is None else min(100.0, (deadline - time.monotonic()) * 1e3)
            try:
                msg = self._follow(msg_receive(self._box, RCV_TIMEOUT, max(left, 0.0)))
                if msg is not None:
                    return msg
                continue
            except MachError as e:
                if e.code != "RCV_TIMED_OUT":
                    raise
            if not self._alive():  # its outcome may have come just before it ended
                try:
                    msg = self._follow(msg_receive(self._box, RCV_TIMEOUT, 0))
                except MachError:
                    return None  # it ended without returning
                if msg is not None:
                    return msg
            if deadline is not None and time.monotonic() >= deadline:
                raise MachError("KERN_OPERATION_TIMED_OUT", "the spawned task did not "
                                f"finish in {timeout} ms")

    def await_ready(self) -> None:
        """Wait until a migratable child has recorded its entry point (MSG_ID_READY on
        the outcome port), or has ended or sent its outcome first (kept for result)."""
        msg = self._await_outcome(None)
        if msg is not None and msg.id != MSG_ID_READY:
            self._early = msg

    def _follow(self, msg: Message) -> Message | None:
        """The outcome message, or None having followed a task that moved
        (MSG_ID_MIGRATED: the handle's port is now the new task's)."""
        if msg.id != MSG_ID_MIGRATED or not msg.items or not isinstance(msg.items[0], Port):
            return msg
        registered = _spawned.pop(self._port, None) is not None
        with contextlib.suppress(MachError):  # a dead name already, or one going
            port_deallocate(task_self(), self._port)
        self._port = msg.items[0].name
        if registered:
            _spawned[self._port] = self
        return None

    @property
    def done(self) -> bool:
        """True once the child's function has returned or the task has ended."""
        return self._outcome is not None or not self._alive()

    def _alive(self) -> bool:
        try:
            task_info(self._port)
        except MachError:
            return False
        return True


def _spawned_main(fn: Callable[..., Any], args: tuple[Any, ...],
                  kwargs: dict[str, Any], migratable: bool = False) -> None:
    """The first thread of a spawned native task: run fn, send its outcome (with the
    traceback of an exception, from fn's frame on, as text), end. Nothing is printed
    here: the parent's `result()` raises the exception. The task ends when fn returns,
    whatever became of the parent (a parent that is gone is not told). A migratable
    task records its entry point first (task_set_entry: `migration_entry`)."""
    try:
        first = msg_receive(task_notify())  # the parent's port, and the rights it passes
        box = first.items[0].value
        assert isinstance(box, int)  # (our own message: the parent's outcome port)
        args = _given_rights(args, first.items[1:])
        if migratable:  # it can be moved from now on: spawn returns
            task_set_entry(task_self(), migration_entry(fn, args, kwargs, box))
            msg_send(Message(remote_port=box, id=MSG_ID_READY))
        _send_outcome(box, _outcome(fn, args, kwargs))
    finally:
        task_terminate(task_self())


def _send_outcome(box: int, outcome: bytes) -> None:
    with contextlib.suppress(MachError):  # SEND_INVALID_PORT: the parent is gone
        msg_send(Message(remote_port=box, items=[OOL(data=outcome)]))


# -- migratable tasks (paper 8.2; apps/migrate.py moves them) -------------------------------

MSG_ID_READY = 7202  # a migratable spawned task has recorded its entry point (ids 7200-7202:
# task migration's messages, clear of the subsystems' requests and replies)
MSG_ID_MIGRATED = 7200  # sent to a spawned task's outcome port when the task has moved:
# one Port item, a send right to its new task port (Spawned.result follows it)
_migrated = False  # set in a process that a migrated task's thread started in


def migrated() -> bool:
    """True in a task that arrived by task migration: its function runs again from the
    top (`spawn(..., migratable=True)`), with its pymach memory and port names as they
    were when it was frozen. False everywhere else."""
    return _migrated


def migration_entry(fn: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any],
                    box: int = PORT_NULL) -> str:
    """The entry point text of a migratable task (task_set_entry): JSON naming `fn` by
    module and qualified name, with typed arguments (what JSON carries: None, bool, int,
    float, str, lists, str-keyed dicts; tuples arrive as lists) and the name of its
    outcome port. KERN_INVALID_ARGUMENT unless `fn` is importable by that name as this
    same object (not from __main__, not a local function or lambda) and the arguments are
    typed and fit in TASK_ENTRY_MAX characters. A callable never crosses hosts; a name
    and data can."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    try:
        found = pkgutil.resolve_name(f"{module}:{qualname}") if module != "__main__" else None
    except (ImportError, AttributeError, ValueError):
        found = None
    if found is not fn:
        raise MachError("KERN_INVALID_ARGUMENT", f"a migratable task runs a function "
                        f"importable by module:qualname (defined at the top of a module "
                        f"other than __main__), not {fn!r:.60}")
    path: list[str] = []
    entry: dict[str, Any] = {"module": module, "qualname": qualname, "args": list(args),
                             "kwargs": kwargs, "box": box, "cwd": os.getcwd(), "path": path}
    try:
        text = json.dumps(entry, allow_nan=False)
        for p in filter(None, sys.path):  # where the program runs is a hint: as much of
            longer = json.dumps({**entry, "path": [*path, p]})  # its module path as fits,
            if len(longer) > TASK_ENTRY_MAX:  # first entries first
                break
            path.append(p)
            text = longer
    except (TypeError, ValueError) as e:
        raise MachError("KERN_INVALID_ARGUMENT", f"a migratable task's arguments are typed "
                        f"data (None, bool, int, float, str, lists, str-keyed dicts): "
                        f"{e}") from None
    if len(text) > TASK_ENTRY_MAX:
        raise MachError("KERN_INVALID_ARGUMENT", f"a migratable task's entry point is at "
                        f"most {TASK_ENTRY_MAX} characters of JSON, not {len(text)}")
    return text


def parse_entry(text: str) -> tuple[str, str, list[Any], dict[str, Any], int]:
    """An entry point's (module, qualname, args, kwargs, box), checked to have those
    types (KERN_INVALID_ARGUMENT otherwise); nothing is imported here."""
    try:
        e = json.loads(text)
        fields = (e["module"], e["qualname"], e["args"], e["kwargs"], e["box"])
    except (ValueError, TypeError, KeyError):
        fields = None
    if fields is None or not (isinstance(fields[0], str) and isinstance(fields[1], str)
                              and isinstance(fields[2], list) and isinstance(fields[3], dict)
                              and isinstance(fields[4], int)):
        raise MachError("KERN_INVALID_ARGUMENT", f"not a migration entry point: {text!r:.80}")
    return fields


def entry_env(text: str) -> tuple[str, list[str]]:
    """Where a migratable task's program runs, as its entry point records it (the
    spawner's cwd and module path; ("", []) if it records none): a new host starts the
    task's process there. Bounded as a task's own report of its environment."""
    try:
        e = json.loads(text)
        cwd, path = e.get("cwd", ""), e.get("path", [])
    except (ValueError, TypeError, AttributeError):
        return "", []
    if not isinstance(cwd, str) or not isinstance(path, list) or len(path) > ENTRY_PATH_MAX \
            or not all(isinstance(p, str) and len(p) <= 4096 for p in path) or len(cwd) > 4096:
        return "", []
    return cwd, path


ENTRY_PATH_MAX = 256  # module path entries a migration entry point may name
ENTRY_BLOB = b"entry:"  # a first thread's code that runs the entry point after it (UTF-8
# JSON): how a kernel starts a migrated task's thread without a pickle (libmach/task.py)


def _migrated_main(entry: str) -> None:
    """The first thread of a migrated task: its function runs again from the top, with
    migrated() true; its outcome goes where the spawned task's would have gone."""
    global _migrated
    _migrated = True
    try:
        module, qualname, args, kwargs, box = parse_entry(entry)
        _send_outcome(box, _outcome(_run_entry, (f"{module}:{qualname}", args, kwargs), {}))
    finally:
        task_terminate(task_self())


def _run_entry(name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """Import the entry point's function by name (the new process's own modules) and
    call it."""
    fn = pkgutil.resolve_name(name)
    return fn(*args, **kwargs)


@dataclass(frozen=True)
class _RightArg:
    """Stands in spawn's arguments for the i-th port right passed to the child."""

    index: int


def _port_args(args: tuple[Any, ...]) -> tuple[tuple[Any, ...], list[Item]]:
    """spawn's arguments with each `Port` item replaced by a placeholder, and the Port
    items (rights to carry to the child, with their dispositions)."""
    rights: list[Item] = []
    out = []
    for a in args:
        if isinstance(a, Port):
            out.append(_RightArg(len(rights)))
            rights.append(a)
        else:
            out.append(a)
    return tuple(out), rights


def _pass_rights(child: int, items: list[Item]) -> None:
    """Send the child's first message (to its notify port); if a right cannot go (the
    caller lacks it), the child is terminated and the error raised."""
    try:
        notify = task_get_special_port(child, TASK_NOTIFY_PORT)
        msg_send(Message(remote_port=notify, items=items))
    except MachError:
        with contextlib.suppress(MachError):
            task_terminate(child)
        raise


def _given_rights(args: tuple[Any, ...], items: Sequence[Any]) -> tuple[Any, ...]:
    """The child's arguments: each placeholder becomes the name of the right it stands
    for, in the child's space (as received)."""
    return tuple(items[a.index].name if isinstance(a, _RightArg) else a for a in args)


def _with_rights(fn: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> Any:
    """An embedded child's first code when rights are passed: take them, then run fn."""
    first = msg_receive(task_notify())
    return fn(*_given_rights(args, first.items), **kwargs)


def _outcome(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """fn's outcome, pickled: (True, value, "") or (False, exception, traceback text)."""
    import cloudpickle

    try:
        outcome: tuple[bool, Any, str] = (True, fn(*args, **kwargs), "")
    except Exception as e:
        outcome = (False, e, _traceback_text(e))
    try:
        return bytes(cloudpickle.dumps(outcome))
    except Exception as e:  # a value that cannot travel: say what it was
        return bytes(cloudpickle.dumps(
            (False, MachError("KERN_FAILURE", f"unpicklable: {e!r}"), outcome[2])))


def _traceback_text(e: BaseException) -> str:
    """`e`'s traceback from the spawned function's frame on, as text. Code that came
    pickled by value (cloudpickle names its file "<dynamic-code>") is shown with its
    module's file, which cloudpickle keeps in the function's globals."""
    tb = e.__traceback__.tb_next if e.__traceback__ else None  # skip _spawned_main
    te = traceback.TracebackException(type(e), e, tb, lookup_lines=False)
    for summary, (frame, _) in zip(te.stack, traceback.walk_tb(tb), strict=False):
        if summary.filename == "<dynamic-code>":
            summary.filename = frame.f_globals.get("__file__") or summary.filename
    return "".join(te.format())


def spawn(fn: Callable[..., Any], *args: Any, name: str = "", inherit: bool = False,
          detach: bool = False, migratable: bool = False, **kwargs: Any) -> Any:
    """Run fn(*args, **kwargs) as the first thread of a new child task, in either mode;
    `.result(timeout_ms)` waits for its value (the task ends when fn returns, whatever
    became of the caller). The handle's `.name` is the task's name (`name`, else the
    kernel's ``taskN``) and `.port` the caller's send right to its task port. In the
    embedded kernel this is kernel.spawn; in a native task, task_create (with `inherit`)
    and thread_create in a new process, which `end_spawned_tasks` (which `pymach exec`
    calls on Ctrl-C) ends unless `detach`. KERN_INVALID_ARGUMENT for a `fn` that is not
    callable or a bad `name`.

    With `migratable` (native tasks only) the task can be moved by task_migrate: `fn`
    must be importable by module:qualname and its arguments typed data or Port items
    (`migration_entry`); spawn returns once the task has recorded its entry point (its
    process has started). After a move fn(*args, **kwargs) runs again from the top in
    the new task, with migrated() true, and `.result()` follows the task."""
    thread = current_thread()
    args, rights = _port_args(args)
    if migratable:
        _check_migratable(thread.native, fn, args, kwargs)
    if not thread.native:
        if not rights:
            return thread.kernel.spawn(fn, *args, name=name, inherit=inherit, **kwargs)
        embedded = thread.kernel.spawn(_with_rights, fn, args, kwargs, name=name,
                                       inherit=inherit)
        _pass_rights(embedded.port, list(rights))
        return embedded
    check_spawn(fn, name, inherit)
    thread.share_stdio()  # type: ignore[attr-defined]  # (a NativeThread) child output: ours
    me = task_self()
    box = port_allocate(me)
    child = task_create(me, inherit)
    if name:
        task_set_name(child, name)
    else:
        name = task_info(child)[0]
    _pass_rights(child, [Port(box, MAKE_SEND), *rights])
    thread_create(child, _spawned_main, fn, args, kwargs, migratable)
    handle = Spawned(child, box, name, migratable)
    if migratable:
        handle.await_ready()
    if not detach:
        _spawned[child] = handle
    return handle


def _check_migratable(native: bool, fn: Callable[..., Any], args: tuple[Any, ...],
                      kwargs: dict[str, Any]) -> None:
    """What spawn checks of a migratable task before it creates anything."""
    if not native:
        raise MachError("KERN_INVALID_ARGUMENT", "a migratable task is a native task: "
                        "spawn it from a task of machd (pymach exec, or attach)")
    migration_entry(fn, [0 if isinstance(a, _RightArg) else a for a in args], kwargs)


_spawned: dict[int, Spawned] = {}  # task port -> handle: this process's native children
# not yet collected with .result() nor spawned with detach (end_spawned_tasks ends them)


def end_spawned_tasks() -> int:
    """Terminate the tasks this process spawned (natively, without `detach`) whose
    outcome it has not collected; returns how many were still alive. `pymach exec` calls
    it when the program is interrupted (Ctrl-C), so a program's tasks end with it."""
    ended = 0
    for port in list(_spawned):
        _spawned.pop(port, None)
        try:
            task_terminate(port)
            ended += 1
        except MachError:  # it ended already
            pass
    return ended
