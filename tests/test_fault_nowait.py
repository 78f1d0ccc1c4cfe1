"""A fault run for a thread that may not block (Thread.no_wait, sched_prim.WouldBlock).

machd's fault poller runs each fault itself first with waiting forbidden and hands only
the faults that must wait to the faulting thread's kernel thread. What makes that safe
is checked here on the embedded kernel: a fault that needs nothing but memory completes
under no_wait; one that must wait for a data manager raises WouldBlock at the wait (the
kernel lock released, nothing half done) and, run again normally, gets the manager's
data; a wait anywhere else in the kernel refuses the same way.
"""

from __future__ import annotations

import pytest

import pymach as m
from pagerutil import Pager
from pymach.kern.sched_prim import WaitQueue, WouldBlock, thread_block
from pymach.kern.thread import current_thread
from pymach.vm.vm_fault import vm_fault_trap

PS = 4096


@pytest.mark.embedded_only("calls vm_fault_trap of the embedded kernel directly")
def test_a_zero_fill_fault_completes_without_waiting(kernel: m.Kernel) -> None:
    me, thread = m.task_self(), current_thread()
    a = m.vm_allocate(me, 0, PS, True)
    assert thread.task.map is not None and thread.task.map.pmap is not None
    thread.no_wait = True
    try:
        vm_fault_trap(thread, a, m.VM_PROT_WRITE)
    finally:
        thread.no_wait = False
    assert thread.task.map.pmap.pmap_access(a) & m.VM_PROT_WRITE
    assert m.vm_read(me, a, PS) == bytes(PS)


@pytest.mark.embedded_only("calls vm_fault_trap of the embedded kernel directly")
def test_a_fault_that_needs_the_manager_stops_at_the_wait_and_completes_later(
        kernel: m.Kernel) -> None:
    thread = current_thread()
    p = Pager(data=b"M" * (4 * PS))
    a = p.map()
    p.start()  # a thread of this task serves the object (so this one may wait on it)
    thread.no_wait = True
    try:
        with pytest.raises(WouldBlock):
            vm_fault_trap(thread, a, m.VM_PROT_READ)
    finally:
        thread.no_wait = False
    assert not kernel.sched.lock.locked()  # the trap let go of the kernel lock
    vm_fault_trap(thread, a, m.VM_PROT_READ)  # run normally: waits for the data
    assert m.memory()[a:a + 4] == b"MMMM"
    assert p.count("pager_data_request") == 1  # the second run waited on the first ask


@pytest.mark.embedded_only("blocks on a kernel wait queue directly")
def test_every_kernel_wait_refuses_under_no_wait(kernel: m.Kernel) -> None:
    thread = current_thread()
    q = WaitQueue(kernel.sched.lock, "test")
    thread.no_wait = True
    try:
        with kernel.sched.lock, pytest.raises(WouldBlock):
            thread_block(kernel.sched, thread, q, deadline=None)
    finally:
        thread.no_wait = False
