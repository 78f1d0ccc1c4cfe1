"""The kernel's interfaces, declared once with our MIG (like Mach's mach.defs).

Everything here is a remote procedure call on a port: task and port operations go to a
task port, thread operations to a thread port, host queries to the host port. The kernel
serves them (kern/ipc_kobject.py); `pymach.mach` exposes the generated client stubs.
Out-parameters of the paper's signatures are return values.
"""

from __future__ import annotations

from pymach.kern.mig import BOOL, CODE, INT, INT_ARRAY, PORT, PORT_ARRAY, STR, Subsystem

TASK_KERNEL_PORT = 1
TASK_NOTIFY_PORT = 2
TASK_BOOTSTRAP_PORT = 4
SPECIAL_PORTS = {TASK_KERNEL_PORT: "kernel", TASK_NOTIFY_PORT: "notify",
                 TASK_BOOTSTRAP_PORT: "bootstrap"}

task_defs = Subsystem("task", 2000)
task_defs.routine("task_create", "parent_task", [("inherit", BOOL)], [("child_task", PORT)],
                  "Create a task whose address space inherits from the parent's if `inherit`; "
                  "returns a send right to the child's task port. The child starts with no "
                  "threads and inherits the parent's bootstrap port.")
task_defs.routine("task_terminate", "target_task", doc="Destroy the task: its threads end, "
                  "its rights are given up, its port dies.")
task_defs.routine("task_suspend", "target_task", doc="Increment the task's suspend count; "
                  "its threads stop at their next kernel boundary.")
task_defs.routine("task_resume", "target_task", doc="Decrement the task's suspend count.")
task_defs.routine("task_threads", "target_task", outs=[("thread_list", PORT_ARRAY)],
                  doc="Send rights to the ports of the task's threads, oldest first.")
task_defs.routine("thread_create", "parent_task", [("code", CODE)], [("child_thread", PORT)],
                  "Create a thread in the task that runs `code` (a Python callable with its "
                  "arguments); returns a send right to the thread's port.")
task_defs.routine("task_get_special_port", "task", [("which_port", INT)],
                  [("special_port", PORT)],
                  "A send right to the task's kernel, notify or bootstrap port.")
task_defs.routine("task_set_special_port", "task", [("which_port", INT),
                                                    ("special_port", PORT)],
                  doc="Set the task's notify or bootstrap port.")
task_defs.routine("task_info", "target_task",
                  outs=[("name", STR), ("suspend_count", INT), ("thread_count", INT),
                        ("port_count", INT)],
                  doc="The task's name, suspend count, number of threads and of port names.")

port_defs = Subsystem("port", 4000)
port_defs.routine("port_allocate", "task", outs=[("port", INT)],
                  doc="Allocate a new port; the task gets all rights; returns its name.")
port_defs.routine("port_deallocate", "task", [("port", INT)],
                  doc="Deallocate the task's rights to this port.")
port_defs.routine("port_enable", "task", [("port", INT)],
                  doc="Add this port to the task's default group of ports for msg_receive.")
port_defs.routine("port_disable", "task", [("port", INT)],
                  doc="Remove this port from the task's default group of ports.")
port_defs.routine("port_messages", "task", outs=[("ports", INT_ARRAY)],
                  doc="Names of enabled ports on which messages are currently queued.")
port_defs.routine("port_status", "task", [("port", INT)],
                  [("unrestricted", BOOL), ("num_msgs", INT), ("backlog", INT),
                   ("receiver", BOOL), ("owner", BOOL)],
                  "Status of this port: enabled, queued messages, backlog, and whether the "
                  "task is its receiver and owner.")
port_defs.routine("port_set_backlog", "task", [("port", INT), ("backlog", INT)],
                  doc="Limit the number of messages that can be waiting on this port.")

thread_defs = Subsystem("thread", 3000)
thread_defs.routine("thread_terminate", "target_thread",
                    doc="Destroy the thread; it unwinds at its next kernel boundary.")
thread_defs.routine("thread_suspend", "target_thread",
                    doc="Increment the thread's suspend count.")
thread_defs.routine("thread_resume", "target_thread",
                    doc="Decrement the thread's suspend count.")
thread_defs.routine("thread_info", "target_thread",
                    outs=[("name", STR), ("state", STR), ("suspend_count", INT)],
                    doc="The thread's name, run state and suspend count.")

host_defs = Subsystem("host", 5000)
host_defs.routine("host_info", "host",
                  outs=[("page_size", INT), ("memory_size", INT), ("task_count", INT),
                        ("thread_count", INT), ("deterministic", BOOL)],
                  doc="The host's page size, memory size, and numbers of tasks and threads.")
host_defs.routine("host_kernel_version", "host", outs=[("version", STR)],
                  doc="The kernel's version string.")

SUBSYSTEMS = (task_defs, port_defs, thread_defs, host_defs)
