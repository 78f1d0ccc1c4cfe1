"""The kernel thread that stands for one thread of a native task's process.

`serve_remote` is the code of a kernel `Thread` in machd: it answers the process
thread's hello, then serves its traps and its page faults until the connection ends:

- a trap request runs the embedded kernel's trap function as this Mach thread, so a
  native task gets exactly the embedded semantics and errors; the reply carries the
  address-space changes the process must apply first;
- a page fault of the process thread (from the fault poller) runs vm_fault for this
  thread; the pmap then resolves it in the process (pmap/uffd_pmap.py). A fault that
  vm_fault refuses (an unallocated address, a protection violation, a memory error)
  ends the task with that diagnostic: a process cannot take a Python exception at a
  hardware fault.

The connection, the fault queue and the wake pipe belong to this thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
from collections import deque
from typing import TYPE_CHECKING, Any

from pymach import mach
from pymach.errors import MachError, ThreadTerminated
from pymach.include.vm_param import VM_PROT_READ, VM_PROT_WRITE
from pymach.ipc.mach_msg import msg_receive_trap, msg_rpc_trap, msg_send_trap
from pymach.machd.protocol import Connection, Disconnected, close_fds

if TYPE_CHECKING:
    from pymach.include.message import Code
    from pymach.kern.thread import Thread
    from pymach.machd.machd import Machd
    from pymach.pmap.uffd import Fault

log = logging.getLogger("pymach.machd")

_IDENTITY = {"task_self": mach.task_self, "thread_self": mach.thread_self,
             "task_notify": mach.task_notify, "host_self": mach.host_self,
             "thread_reply": mach.thread_reply}


class RemoteState:
    """Per-thread state: the faults waiting for this thread, and its wake pipe."""

    def __init__(self) -> None:
        self.faults: deque[Fault | None] = deque()
        self.wake_r, self.wake_w = os.pipe()

    def post(self, fault: Fault | None) -> None:
        """Queue a fault for the thread (called by the poller)."""
        self.faults.append(fault)
        with contextlib.suppress(OSError):
            os.write(self.wake_w, b"f")

    def close(self) -> None:
        for fd in (self.wake_r, self.wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


def serve_remote(machd: Machd, thread: Thread, conn: Connection, code: Code | None) -> None:
    """Serve one process thread (see module docstring); ends with its connection."""
    state = RemoteState()
    thread.remote_state = state
    machd.poller.register_thread(thread)
    try:
        _reply(thread, conn, {"ok": _welcome(machd, thread, code)})
        _loop(machd, thread, conn, state)
    except (Disconnected, ThreadTerminated):
        pass
    finally:
        machd.poller.unregister_thread(thread)
        conn.close()
        state.close()


def _welcome(machd: Machd, thread: Thread, code: Code | None) -> dict[str, Any]:
    task = thread.task
    return {"task": task.serial, "task_name": task.name, "thread": thread.name,
            "page_size": machd.kernel.page_size,
            "code": code.blob if code is not None else None}


def _loop(machd: Machd, thread: Thread, conn: Connection, state: RemoteState) -> None:
    while True:
        ready, _, _ = select.select([conn.fileno(), state.wake_r], [], [])
        if state.wake_r in ready:
            os.read(state.wake_r, 4096)
            while state.faults:
                fault = state.faults.popleft()
                if fault is not None:
                    _fault(machd, thread, fault)
        if conn.fileno() in ready:
            request, fds = conn.recv()
            if request.get("op") == "stdio":  # where the task's next children write
                machd.set_stdio(thread.task, fds)
                _reply(thread, conn, {"ok": None})
                continue
            close_fds(fds)
            if request.get("op") == "exit":
                thread.result = request.get("result")
                return
            _reply(thread, conn, _trap(thread, request))


def _trap(thread: Thread, request: dict[str, Any]) -> dict[str, Any]:
    """Run one trap as `thread`; the reply (ok, or the Mach error)."""
    op, args = request.get("op"), request.get("args", ())
    try:
        if op == "msg_send":
            msg_send_trap(thread, *args)
            return {"ok": None}
        if op == "msg_receive":
            return {"ok": msg_receive_trap(thread, *args)}
        if op == "msg_rpc":
            return {"ok": msg_rpc_trap(thread, *args)}
        if op in _IDENTITY:
            return {"ok": _IDENTITY[op]()}
        if op == "fault_in":
            _fault_in(thread, *args)
            return {"ok": None}
        raise MachError("KERN_INVALID_ARGUMENT", f"no trap {op!r}")
    except MachError as e:
        return {"err": (e.code, e.detail)}
    except ThreadTerminated:
        return {"terminated": True}


def _fault_in(thread: Thread, address: int, size: int, access: int) -> None:
    """memory()'s trap before it touches [address, address+size): take the faults the
    access would take, so that a failure is a MachError for the caller (as in the
    embedded kernel) instead of a memory exception that ends the task."""
    from pymach.include.vm_param import trunc_page
    from pymach.vm.vm_fault import vm_fault_trap

    vmap = thread.task.map
    if vmap is None or vmap.pmap is None:
        return
    ps = thread.kernel.page_size
    for va in range(trunc_page(address, ps), address + size, ps):
        if access & ~vmap.pmap.pmap_access(va):
            vm_fault_trap(thread, va, access)


def _reply(thread: Thread, conn: Connection, reply: dict[str, Any]) -> None:
    """Send a reply with the task's pending address-space changes."""
    binding = thread.task.map.native if thread.task.map is not None else None
    fds: list[int] = []
    if binding is not None:
        with thread.kernel.sched.lock:
            fields, fds = binding.take()
        reply.update(fields)
    try:
        conn.send(reply, fds)
    finally:
        close_fds(fds)
    if reply.get("terminated"):
        raise ThreadTerminated()


def _fault(machd: Machd, thread: Thread, fault: Fault) -> None:
    """Resolve one page fault of the process thread, or end the task."""
    from pymach.vm.vm_fault import vm_fault_trap

    access = VM_PROT_WRITE if (fault.write or fault.wp) else VM_PROT_READ
    try:
        vm_fault_trap(thread, fault.address, access)
    except MachError as e:
        why = (f"memory exception: {e.code} at {fault.address:#x} "
               f"({'write' if access & VM_PROT_WRITE else 'read'}): {e.detail}")
        log.warning("task %s: %s", thread.task.name, why)
        proc = thread.task.process
        if proc is not None:
            machd.kill(proc, why)
        raise ThreadTerminated() from None


def serve_faults(machd: Machd, thread: Thread) -> None:
    """A task's helper kernel thread: resolve faults of process threads Mach does not
    know (a None fault means the process is gone)."""
    state: RemoteState = thread.remote_state
    try:
        while True:
            select.select([state.wake_r], [], [])
            os.read(state.wake_r, 4096)
            while state.faults:
                fault = state.faults.popleft()
                if fault is None or not thread.task.active:
                    return
                _fault(machd, thread, fault)
    except ThreadTerminated:
        pass
    finally:
        state.close()
