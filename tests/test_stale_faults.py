"""A fault event the faulting thread no longer waits on (machd/remote.fault_pending).

userfaultfd events can outlive their fault: a thread woken another way (a range armed
again, say) runs on, and may even have unmapped the address by the time machd reads the
event. machd must not end a task for such an event, so before it does it asks the
kernel where the thread waits (its wait channel): only a thread asleep in
handle_userfault is waiting on a fault.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

from pymach.errors import MachError
from pymach.machd.fault_park import FailedFault
from pymach.machd.faults import FaultPoller
from pymach.machd.remote import fault_pending, serve_fault
from pymach.pmap.uffd import Fault, UffdError


@contextlib.contextmanager
def asleep_elsewhere() -> Iterator[int]:
    """A thread of this process asleep in a wait that is no fault; yields its tid."""
    tids: list[int] = []
    stop = threading.Event()

    def sleeper() -> None:
        tids.append(threading.get_native_id())
        stop.wait(10)

    t = threading.Thread(target=sleeper)
    t.start()
    try:
        time.sleep(0.1)
        yield tids[0]
    finally:
        stop.set()
        t.join()


def test_a_thread_asleep_elsewhere_waits_on_no_fault() -> None:
    with asleep_elsewhere() as tid:
        assert fault_pending(os.getpid(), tid) is False


def test_when_it_cannot_tell_it_treats_the_fault_as_pending() -> None:
    assert fault_pending(os.getpid(), threading.get_native_id()) is True  # running
    assert fault_pending(2**22 + 12345, 1) is True  # no such process


def test_a_fault_that_fails_affects_its_process_only() -> None:
    """A process that dies while machd resolves its fault makes UFFDIO_CONTINUE fail
    with ESRCH; that must not end machd's fault poller (every task would hang)."""
    class DyingUffd:
        def read_events(self) -> list[object]:
            raise UffdError(3, "UFFDIO_CONTINUE: No such process")

    poller = FaultPoller.__new__(FaultPoller)  # only _serve_events is exercised
    proc = SimpleNamespace(uffd=DyingUffd(), task=SimpleNamespace(name="gone"))
    poller._serve_events(proc)  # type: ignore[arg-type]  # returns: nothing raised


def test_a_stale_fault_refused_on_a_kernel_thread_leaves_that_thread_serving() -> None:
    """A fault vm_fault refuses whose thread no longer waits on it (asleep elsewhere)
    is ignored; the kernel thread that ran it must go on serving its process thread
    (it used to unwind as if the task had been ended)."""
    with asleep_elsewhere() as tid:
        killed: list[str] = []
        machd = SimpleNamespace(kill=lambda proc, why: killed.append(why))
        thread = SimpleNamespace(task=SimpleNamespace(
            name="t", process=SimpleNamespace(pid=os.getpid())))
        failed = FailedFault(Fault(0x1000, 0, tid), MachError("KERN_INVALID_ADDRESS"))
        serve_fault(machd, thread, failed)  # type: ignore[arg-type]  # returns: no unwind
        assert killed == []
