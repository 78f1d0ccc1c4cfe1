"""The kernel's interfaces, declared once with our MIG (like Mach's include/mach/*.defs).

Everything here is a remote procedure call on a port: task and port operations go to a
task port, thread operations to a thread port, host queries to the host port. The kernel
serves them (kern/ipc_kobject.py); `pymach.mach` exposes the generated client stubs; the
kernel sends the memory_object routines to data managers (vm/memory_object.py), which
serve them (pagers/). Out-parameters of the paper's signatures are return values.
"""

from __future__ import annotations

from pymach.include.mig import (
    BOOL,
    CODE,
    DATA,
    FLOAT,
    INT,
    INT_ARRAY,
    MEMORY,
    PORT,
    PORT_ARRAY,
    PORT_POLY,
    STR,
    Subsystem,
)

TASK_KERNEL_PORT = 1
TASK_NOTIFY_PORT = 2
TASK_BOOTSTRAP_PORT = 4
THREAD_KERNEL_PORT, THREAD_REPLY_PORT = 1, 2  # thread_get_special_port (Mach 2.5)
PORT_TYPE_SEND, PORT_TYPE_RECEIVE, PORT_TYPE_OWN = 1, 2, 4  # port_names: rights of a name
TASK_ENTRY_MAX = 4096  # characters of a task's entry point (task_set_entry)
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
task_defs.routine("task_set_name", "target_task", [("name", STR)],
                  doc="Name the task in reports (ps, lsmp); threads created after take it "
                  "as their prefix. A pymach addition.")
task_defs.routine("task_set_entry", "target_task", [("entry", STR)],
                  doc="Record the task's entry point for migration: the documented place "
                  "its threads restart after task migration (text, at most "
                  "TASK_ENTRY_MAX characters; \"\": the task cannot migrate). The kernel "
                  "keeps it and never interprets it. A pymach addition (paper 8.2).")
task_defs.routine("task_get_entry", "target_task", outs=[("entry", STR)],
                  doc="The task's entry point for migration (task_set_entry), \"\" if it "
                  "has none. A pymach addition.")

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
port_defs.routine("port_extract_right", "task", [("name", INT), ("disposition", INT)],
                  [("port", PORT_POLY)],
                  doc="Take a right out of the task's name space, as if the task had sent "
                  "it with `disposition` (COPY_SEND, MAKE_SEND, MOVE_SEND, MOVE_RECEIVE, "
                  "MOVE_OWNERSHIP, MOVE_ALL); the caller gets it under a name of its own. "
                  "Mach 3.0's mach_port_extract_right (Mach 2.5: port_extract_*).")
port_defs.routine("port_insert_right", "task", [("name", INT), ("port", PORT_POLY)],
                  doc="Give the task the caller's right `port` (a Port item: name and "
                  "disposition) under the name `name`: a name the task has never used "
                  "(names are never reused), or its name for that same port. On failure "
                  "the right sent is destroyed, as for any kernel call that fails. Mach "
                  "3.0's mach_port_insert_right (Mach 2.5: port_insert_*).")
port_defs.routine("port_names", "task", outs=[("names", INT_ARRAY), ("types", INT_ARRAY)],
                  doc="Every name of the task's port name space, in increasing order, and "
                  "the rights each holds: a sum of PORT_TYPE_SEND (1), PORT_TYPE_RECEIVE "
                  "(2) and PORT_TYPE_OWN (4) (Mach 2.5's port_names, whose PORT_TYPE_RECEIVE "
                  "is 3: these bits).")

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
thread_defs.routine("thread_get_special_port", "target_thread", [("which_port", INT)],
                    [("port", PORT)],
                    doc="A send right to one of the thread's special ports (Mach 2.5): "
                    "THREAD_KERNEL_PORT (the thread's port) or THREAD_REPLY_PORT (its MIG "
                    "reply port, PORT_NULL until it has one).")

host_defs = Subsystem("host", 5000)
host_defs.routine("host_info", "host",
                  outs=[("page_size", INT), ("memory_size", INT), ("task_count", INT),
                        ("thread_count", INT), ("deterministic", BOOL)],
                  doc="The host's page size, memory size, and numbers of tasks and threads.")
host_defs.routine("host_kernel_version", "host", outs=[("version", STR)],
                  doc="The kernel's version string.")
host_defs.routine("host_report", "host", [("what", STR), ("task", STR)], [("json", STR)],
                  doc="pymach: a report of the host as JSON: 'ps', 'lsmp' or 'vmmap' (of "
                  "`task`, by name or id), or 'vm_stat'. The pymach ps/lsmp/vmmap/vm_stat "
                  "commands use it.")
host_defs.routine("task_for_id", "host", [("task_id", INT)], [("task", PORT)],
                  doc="A send right to the port of the live task with this id (as `ps` "
                  "shows it), if the caller's task has the same user "
                  "(KERN_PROTECTION_FAILURE otherwise; KERN_INVALID_TASK if none). "
                  "Mach 2.5's task_by_unix_pid, XNU's task_for_pid; what `pymach "
                  "migrate` uses.")

# -- Table 3-3 (and 3-4): virtual memory operations on a task ----------------------------
vm_defs = Subsystem("vm", 2800)
vm_defs.routine("vm_allocate", "target_task", [("address", INT), ("size", INT),
                                               ("anywhere", BOOL)], [("address", INT)],
                "Allocate zero-filled memory at `address` (page aligned), or anywhere space "
                "can be found; `size` is rounded up to pages. Returns the address.")
vm_defs.routine("vm_deallocate", "target_task", [("address", INT), ("size", INT)],
                doc="Deallocate a range of addresses (rounded out to pages; holes are fine).")
vm_defs.routine("vm_inherit", "target_task", [("address", INT), ("size", INT),
                                              ("inheritance", INT)],
                doc="Set how the range is inherited by child tasks: VM_INHERIT_SHARE, "
                "VM_INHERIT_COPY or VM_INHERIT_NONE.")
vm_defs.routine("vm_protect", "target_task", [("address", INT), ("size", INT),
                                              ("set_max", BOOL), ("new_protection", INT)],
                doc="Set the current protection of the range, or with `set_max` its maximum "
                "(which also lowers the current).")
vm_defs.routine("vm_read", "target_task", [("address", INT), ("size", INT)],
                [("data", DATA)],
                "Read the task's memory; the data travels out of line (copy-on-write) and "
                "the stub returns it as bytes.")
vm_defs.routine("vm_write", "target_task", [("address", INT), ("data", DATA)],
                doc="Write data (bytes, or an OOL region of the caller) at `address` (page "
                "aligned). Whole pages are replaced by a virtual copy; where the range is "
                "shared through inheritance every sharer sees the change.")
vm_defs.routine("vm_copy", "target_task", [("source_address", INT), ("count", INT),
                                           ("dest_address", INT)],
                doc="Copy a range (page aligned) to another address, copy-on-write.")
vm_defs.routine("vm_regions", "target_task", [("address", INT), ("size", INT)],
                [("addresses", INT_ARRAY), ("sizes", INT_ARRAY), ("protections", INT_ARRAY),
                 ("max_protections", INT_ARRAY), ("inheritances", INT_ARRAY),
                 ("shared", INT_ARRAY), ("offsets", INT_ARRAY), ("object_names", PORT_ARRAY)],
                "Describe the regions overlapping [address, address+size).")
vm_defs.routine("vm_statistics", "target_task",
                outs=[("page_size", INT), ("free_count", INT), ("active_count", INT),
                      ("inactive_count", INT), ("wire_count", INT), ("faults", INT),
                      ("zero_fill_count", INT), ("cow_faults", INT), ("pageins", INT),
                      ("pageouts", INT), ("reactivations", INT), ("lookups", INT),
                      ("hits", INT)],
                doc="Page counts and VM event counters of the task's host.")
vm_defs.routine("vm_allocate_with_pager", "target_task",
                [("address", INT), ("size", INT), ("anywhere", BOOL), ("memory_object", PORT),
                 ("offset", INT)], [("address", INT)],
                "Map `size` bytes of a memory object, from `offset`, at `address` or anywhere "
                "(Table 3-4). The first mapping by this kernel sends pager_init before the "
                "call returns.")

vm_defs.routine("vm_pager_timeout", "target_task",
                [("address", INT), ("size", INT), ("timeout_ms", FLOAT), ("zero_fill", BOOL)],
                doc="pymach (paper 6.2.1): faults in the range wait at most `timeout_ms` for "
                "a data manager, then get zero-filled memory (`zero_fill`) or "
                "KERN_MEMORY_ERROR. Overrides the host's boot-time policy for these mappings.")
vm_defs.routine("vm_map_copyout", "target_task",
                [("address", INT), ("data", MEMORY), ("protection", INT),
                 ("max_protection", INT), ("inheritance", INT)],
                doc="Map memory in transit (an OOL region of the caller, page aligned: "
                "sent with deallocate it moves) at `address` (page aligned; the range must "
                "be free) with these protections and inheritance, copy-on-write: no page is "
                "copied, the task's pages come from the copy when first touched. Mach's "
                "vm_map_copyout at a chosen address; what task migration builds a task "
                "with (vm_write, natively, writes into pages the task has).")
vm_defs.routine("vm_resident", "target_task", [("address", INT), ("size", INT)],
                [("addresses", INT_ARRAY), ("counts", INT_ARRAY)],
                doc="pymach (as mincore): the runs of pages of the range resident in their "
                "region's own object now (the task's working set), in address order: each "
                "run's first address and page count; at most RESIDENT_RUNS_MAX runs (what "
                "follows is left out). What task migration pre-pages.")
RESIDENT_RUNS_MAX = 256  # runs vm_resident returns at most (an inline reply)

# -- Table 3-5: kernel to data manager (asynchronous: simpleroutines) -----------------------
memory_object_defs = Subsystem("memory_object", 2200)
memory_object_defs.routine(
    "pager_init", "memory_object", [("pager_request_port", PORT), ("pager_name", PORT)],
    doc="Initialize a memory object: the manager learns this kernel's request and name "
    "ports.", simple=True)
memory_object_defs.routine(
    "pager_data_request", "memory_object",
    [("pager_request_port", PORT), ("offset", INT), ("length", INT),
     ("desired_access", INT)],
    doc="The kernel asks for data (a page fault missed the cache).", simple=True)
memory_object_defs.routine(
    "pager_data_write", "memory_object", [("offset", INT), ("data", DATA),
                                           ("data_count", INT)],
    doc="The kernel writes changed data back; the manager vm_deallocates `data` when it "
    "no longer needs it.", simple=True)
memory_object_defs.routine(
    "pager_data_unlock", "memory_object",
    [("pager_request_port", PORT), ("offset", INT), ("length", INT),
     ("desired_access", INT)],
    doc="A task needs more access than pager_data_lock allows.", simple=True)
memory_object_defs.routine(
    "pager_create", "pager", [("new_memory_object", PORT), ("new_request_port", PORT),
                              ("new_name", PORT)],
    doc="Sent to the default pager: back a kernel-created object (receive rights to "
    "`new_memory_object` come with it).", simple=True)
memory_object_defs.routine(
    "pager_data_write_in_place", "memory_object",
    [("pager_request_port", PORT), ("window", INT), ("offset", INT), ("data_count", INT)],
    doc="pymach, native mode: as pager_data_write, for changed data the kernel leaves in "
    "the object's window (whose key is `window`) at their offsets until released. Sent "
    "only to a manager that asked for them (memory().pager_window(request, "
    "writes_in_place=True)). The manager reads the range from its window and then calls "
    "pager_data_write_released; only if that answers True were the bytes it read the "
    "written-back data (else the kernel took them back, and they come again in "
    "pager_data_write).", simple=True)

# -- Table 3-6: data manager to kernel (on the pager request port) ------------------------
pager_defs = Subsystem("pager", 2300)
pager_defs.routine(
    "pager_data_provided", "pager_request_port",
    [("offset", INT), ("data", DATA), ("data_count", INT), ("lock_value", INT)],
    doc="Supply data for [offset, offset+data_count); whole pages only (partial pages are "
    "discarded); `lock_value` is the access to prevent.")
pager_defs.routine("pager_data_unavailable", "pager_request_port",
                   [("offset", INT), ("size", INT)],
                   doc="No data exists for the range: zero-fill it (or, for a shadow, use "
                   "the original).")
pager_defs.routine("pager_data_lock", "pager_request_port",
                   [("offset", INT), ("length", INT), ("lock_value", INT)],
                   doc="Prevent `lock_value` access to cached data of the range.")
pager_defs.routine("pager_flush_request", "pager_request_port",
                   [("offset", INT), ("length", INT)], [("pages_written", INT)],
                   doc="Invalidate cached data of the range, writing back changes. Returns "
                   "how many pages went back in pager_data_write (already queued to the "
                   "memory object when this returns).")
pager_defs.routine("pager_clean_request", "pager_request_port",
                   [("offset", INT), ("length", INT)], [("pages_written", INT)],
                   doc="Write back changed data of the range; the kernel may keep using it. "
                   "Returns how many pages went back in pager_data_write.")
pager_defs.routine("pager_cache", "pager_request_port", [("should_cache", BOOL)],
                   doc="Allow (or forbid) keeping the object's data after its last unmap.")
pager_defs.routine("pager_data_error", "pager_request_port",
                   [("offset", INT), ("size", INT), ("error_value", INT)],
                   doc="The manager cannot supply (or store) the range: waiting faults fail "
                   "with a memory error; data it could not store stays with the kernel. "
                   "(pymach; Mach 3's memory_object_data_error.)")

pager_defs.routine("pager_data_provided_in_place", "pager_request_port",
                   [("window", INT), ("offset", INT), ("data_count", INT),
                    ("lock_value", INT)],
                   doc="pymach, native mode: as pager_data_provided, for data the manager "
                   "wrote itself into the object's window (PagerWindow: memory().pager_"
                   "window), whose key is `window`. The kernel copies nothing; it takes the "
                   "pages of the range it asked for (a page left unwritten reads as "
                   "zeros), asks again if pages of that range left the object meanwhile, "
                   "and fails the waiting faults if the window is not the object's.")
pager_defs.routine("pager_data_write_released", "pager_request_port",
                   [("window", INT), ("offset", INT), ("data_count", INT)],
                   [("in_time", BOOL)],
                   doc="pymach, native mode: the manager has read the range of a "
                   "pager_data_write_in_place from its window; the kernel frees those "
                   "pages. `in_time` is False if the kernel had already taken the data "
                   "back (the manager kept them past the pageout deadline): what the "
                   "manager read may not be the data, which come again in "
                   "pager_data_write.")

SUBSYSTEMS = (task_defs, port_defs, thread_defs, host_defs, vm_defs, memory_object_defs,
              pager_defs)
