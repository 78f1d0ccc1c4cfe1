"""Protection and inheritance values, address-space bounds and page rounding (mach/vm_*.h).

Protections are bit sets of VM_PROT_READ, VM_PROT_WRITE and VM_PROT_EXECUTE; every region
has a current and a maximum protection, and the current never exceeds the maximum.
Inheritance says what a child created by task_create gets of a region: the same memory
(share), a copy-on-write copy (copy), or nothing (none).
"""

from __future__ import annotations

from pymach.errors import MachError

VM_PROT_NONE = 0x0
VM_PROT_READ = 0x1
VM_PROT_WRITE = 0x2
VM_PROT_EXECUTE = 0x4
VM_PROT_DEFAULT = VM_PROT_READ | VM_PROT_WRITE
VM_PROT_ALL = VM_PROT_READ | VM_PROT_WRITE | VM_PROT_EXECUTE

VM_INHERIT_SHARE = 0
VM_INHERIT_COPY = 1
VM_INHERIT_NONE = 2
VM_INHERIT_DEFAULT = VM_INHERIT_COPY
INHERIT_NAMES = {VM_INHERIT_SHARE: "share", VM_INHERIT_COPY: "copy", VM_INHERIT_NONE: "none"}

VM_MIN_ADDRESS = 0x10000  # the first 64 KiB stay unmapped, so small ints fault
VM_MAX_ADDRESS = 1 << 47  # a 128 TiB user address space, like x86-64
PLACED_MAX = 64 << 20  # bytes one pager_data_provided_in_place covers at most (as much
# as a message's data: the kernel's work per call stays bounded), so also the most a
# request to a manager with a window asks for (vm_fault._cluster)


def prot_text(prot: int) -> str:
    """'rwx'-style text for a protection."""
    return "".join(c if prot & b else "-" for c, b in
                   (("r", VM_PROT_READ), ("w", VM_PROT_WRITE), ("x", VM_PROT_EXECUTE)))


def trunc_page(addr: int, page_size: int) -> int:
    """`addr` rounded down to a page boundary."""
    return addr - addr % page_size


def round_page(addr: int, page_size: int) -> int:
    """`addr` rounded up to a page boundary."""
    return -(-addr // page_size) * page_size


def check_int(value: object, what: str, minimum: int = 0) -> int:
    """`value` as an int >= minimum, or KERN_INVALID_ARGUMENT."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MachError("KERN_INVALID_ARGUMENT", f"{what} must be an int >= {minimum}, "
                        f"not {value!r:.40}")
    return value


def check_prot(value: object, what: str = "protection") -> int:
    """A valid protection bit set, or KERN_INVALID_ARGUMENT."""
    prot = check_int(value, what)
    if prot & ~VM_PROT_ALL:
        raise MachError("KERN_INVALID_ARGUMENT", f"{what} {prot:#x} has bits outside "
                        f"VM_PROT_ALL")
    return prot


def check_inherit(value: object) -> int:
    """A valid inheritance value, or KERN_INVALID_ARGUMENT."""
    inh = check_int(value, "inheritance")
    if inh not in INHERIT_NAMES:
        raise MachError("KERN_INVALID_ARGUMENT", f"inheritance must be VM_INHERIT_SHARE, "
                        f"_COPY or _NONE, not {inh}")
    return inh
