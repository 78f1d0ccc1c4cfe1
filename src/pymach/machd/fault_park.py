"""Page faults parked with a continuation: a fault that waits holds no machd thread.

Mach 3.0 lets a thread that must wait in vm_fault give up its kernel stack and name a
continuation (`vm_fault_continue`). Here a fault of a native task that the fault poller
ran (machd/faults.py) and that stopped at a wait on a VM object's page queue (for a
data manager's data, or for a page another fault is bringing in) *parks* on that queue
(kern/sched_prim.py's continuations) instead of going to the faulting thread's kernel
thread to block there. Whoever wakes the queue (the data manager's kernel thread running
pager_data_provided, the object's termination, ...) runs the fault again on its own
thread, as the faulting thread and with waiting forbidden (`Thread.no_wait`), and the
pmap's UFFDIO_CONTINUE wakes the process thread. So a fault a data manager serves wakes
two machd threads (the poller, and the manager's kernel thread whose trap provides the
data), not four (the faulting thread's kernel thread once to take the fault and once
more when the data came).

What parks: a fault that stopped at a wait with no deadline on the page queue of the
object it waits for (`WouldBlock.waiting`), while its thread has no parked trap, with
tracing off and the free scheduler. Anything else goes to the kernel thread as before
(`RemoteState.post`), which runs it again and blocks.

Invariants (kernel lock):
- a parked fault is its thread's `continuation` and on its queue's `parked` list, and
  looks to the rest of the kernel like a fault blocked there: the thread is "waiting" on
  that queue, its `vm_waiting` names the object (the self-backing check of
  memory_object.py sees it), and the fault holds a reference to the object, as
  vm_fault's own wait does; whoever ends the park releases both;
- exactly one party ends it: the waker whose run completes it, or finds that it must
  wait elsewhere or cannot act as the thread now (the fault then goes to the kernel
  thread); a hand-back (the thread was terminated or suspended, or failed by the
  self-backing check: the kernel thread runs the fault, or acts on that failure); or
  `drop_parked_fault` (the process thread has left the fault: it made a trap or took
  another fault, so the event was stale; or its connection ended);
- a waker runs the fault only if it can take the thread's `busy` lock at once (nobody
  else acts as the thread; remote.py); otherwise the kernel thread runs it next. While
  it runs it, it marks `busy` as held briefly (`RemoteState.brief`): the fault it
  resolves lets the process thread run on and fault again before the run has quite
  ended, and the poller, finding `busy` held by such a run, waits for it (which takes
  no longer than the kernel lock it needs next anyway) instead of handing the new
  fault to the kernel thread;
- a fault vm_fault refuses is never acted on under the kernel lock (ending a task takes
  that lock): the refusal goes to the kernel thread as a `FailedFault`, which ends the
  task as a refused fault always does (remote.serve_fault).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pymach.errors import MachError, ThreadTerminated
from pymach.include.vm_param import VM_PROT_READ, VM_PROT_WRITE
from pymach.kern.sched_prim import NOT_YET, Parked, WouldBlock, thread_cancel, thread_park
from pymach.pmap.uffd import UffdError
from pymach.vm.vm_fault import vm_fault_locked
from pymach.vm.vm_object import VmObject, vm_object_deallocate

if TYPE_CHECKING:
    from pymach.kern.sched_prim import WaitQueue
    from pymach.kern.thread import Thread
    from pymach.pmap.uffd import Fault

log = logging.getLogger("pymach.machd")

_REPOST: Any = object()  # an attempt's outcome: the kernel thread must run the fault


@dataclass(frozen=True)
class FailedFault:
    """A parked fault that vm_fault refused: the kernel thread acts on the refusal."""

    fault: Fault
    error: MachError


def fault_access(fault: Fault) -> int:
    """The access a userfaultfd fault needs."""
    return VM_PROT_WRITE if (fault.write or fault.wp) else VM_PROT_READ


class FaultHandoff:
    """The Handoff (kern/sched_prim.py) of one parked fault, and the attempt a waker
    runs (see module docstring)."""

    def __init__(self, thread: Thread, fault: Fault, obj: VmObject, waitq: WaitQueue) -> None:
        self.thread, self.fault, self.obj, self.waitq = thread, fault, obj, waitq  # immutable

    def attempt(self) -> Any:
        """Run the fault again as the thread, without waiting (a waker's thread, kernel
        lock held): None once resolved, NOT_YET if it still waits on the same queue for
        the same object, _REPOST if the kernel thread must run it; raises the
        MachError of a refused fault."""
        thread = self.thread
        state = thread.host_data
        if not state.busy.acquire(blocking=False):
            return _REPOST  # someone acts as the thread now: its kernel thread runs it next
        state.brief = True  # (the poller may wait for us: its next fault can come now)
        thread.no_wait = True
        try:
            vm_fault_locked(thread, self.fault.address, fault_access(self.fault))
        except WouldBlock as e:
            same = e.waitq is self.waitq and e.deadline is None and e.waiting is self.obj
            return NOT_YET if same else _REPOST
        except ThreadTerminated:
            return _REPOST
        except UffdError as e:  # the process died while its fault was resolved (ESRCH)
            log.info("task %s: a fault not resolved: %s", thread.task.name, e)
        except MachError:
            raise  # a refused fault: the kernel thread acts on it (deliver)
        except Exception:  # a bug: never the waker's to suffer; the kernel thread retries
            log.exception("task %s: a parked fault failed", thread.task.name)
            return _REPOST
        finally:
            thread.no_wait = False
            state.brief = False
            state.busy.release()
        return None

    def rest(self) -> None:
        """The blocking version of the fault (kernel lock held), for thread_continue;
        unused here, as a handed-back fault goes to the kernel thread (`wake`)."""
        vm_fault_locked(self.thread, self.fault.address, fault_access(self.fault))

    def deliver(self, outcome: Any) -> None:
        """The waker ended the park (kernel lock held): resolved (None), or the kernel
        thread takes over (_REPOST, or the MachError of a refused fault)."""
        self.release()
        if outcome is _REPOST:
            self.thread.host_data.post(self.fault)
        elif isinstance(outcome, MachError):
            self.thread.host_data.post(FailedFault(self.fault, outcome))

    def wake(self) -> None:
        """Handed back (kernel lock held): the kernel thread runs the fault (it unwinds
        or waits while suspended there), or acts on the self-backing check's verdict."""
        thread = self.thread
        thread.continuation = None  # nobody runs thread_continue for a fault
        self.release()
        if thread.vm_wait_error:
            reason, thread.vm_wait_error = thread.vm_wait_error, ""
            thread.host_data.post(FailedFault(self.fault, MachError("KERN_MEMORY_ERROR",
                                                                     reason)))
        else:
            thread.host_data.post(self.fault)

    def release(self) -> None:
        """Let go of what the parked fault held as a waiting fault (kernel lock held)."""
        if self.thread.vm_waiting is self.obj:
            self.thread.vm_waiting = None
        vm_object_deallocate(self.obj)


def park_fault(thread: Thread, fault: Fault, stop: WouldBlock) -> bool:
    """Park `fault` of `thread`, which the caller ran as the thread and which stopped at
    `stop` (kernel lock held since, and the thread's `busy` held). False if it may not
    park (see module docstring): the caller hands it to the kernel thread."""
    obj, kernel = stop.waiting, thread.kernel
    if stop.deadline is not None or not isinstance(obj, VmObject) \
            or stop.waitq is not obj.page_waitq or kernel.sched.deterministic \
            or kernel.tracing:
        return False
    if thread.continuation is not None:
        if not isinstance(thread.continuation.handoff, FaultHandoff):
            return False  # a parked trap: the event is stale; the kernel thread runs it
        drop_parked_fault(thread)  # the thread left that fault: it faulted again
    obj.ref_count += 1  # as vm_fault's wait: the object outlives the wait
    thread.vm_waiting = obj
    handoff = FaultHandoff(thread, fault, obj, stop.waitq)
    with contextlib.suppress(Parked):  # (parked: what it raises to a trap's transport)
        thread_park(thread, stop.waitq, None, handoff.attempt, handoff.rest, handoff)
    return True


def fault_nowait(thread: Thread, fault: Fault) -> bool:
    """Run `fault` as `thread` with waiting forbidden, parking it if it stops at a wait
    it may park at (the caller holds the thread's `busy`; kernel lock not held). True
    if resolved or parked; False if it must wait otherwise or unwind (the caller runs
    it in a context that can block). Raises the MachError of a refused fault."""
    thread.no_wait = True
    try:
        with thread.kernel.trap(thread):
            try:
                vm_fault_locked(thread, fault.address, fault_access(fault))
            except WouldBlock as stop:  # (the kernel lock still held: no wake-up lost)
                if not park_fault(thread, fault, stop):
                    raise
    except (WouldBlock, ThreadTerminated):
        return False
    finally:
        thread.no_wait = False
    return True


def drop_parked_fault(thread: Thread) -> None:
    """End the thread's parked fault, if it has one, without running it (kernel lock
    held): its process thread is known to have left it (see module docstring)."""
    cont = thread.continuation
    if cont is not None and isinstance(cont.handoff, FaultHandoff):
        thread_cancel(thread)
        cont.handoff.release()


def has_parked_fault(thread: Thread) -> bool:
    """True if the thread has a parked fault (read without the kernel lock: a hint,
    to be checked again under it)."""
    cont = thread.continuation
    return cont is not None and isinstance(cont.handoff, FaultHandoff)
