"""The task's view of its own memory, and the VM calls' user-side helpers (our libmach).

`memory()` gives the calling task's address space: index and slice it like a bytearray
(``mem[a]``, ``mem[a:b] = data``) or use `read` and `write`. In the embedded kernel every
access goes through the software MMU page by page; a page the MMU refuses is a fault (a
kernel entry) that vm_fault resolves, and an access to unallocated memory or against
protection raises `MachError` KERN_INVALID_ADDRESS or KERN_PROTECTION_FAILURE at the
access, as a memory exception would. In a native task the memory is real: `buffer()`
gives it through the buffer protocol, loads and stores are plain, machd serves the
faults, and a memory exception ends the task (a process cannot take an exception at a
hardware fault).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, overload

from pymach.errors import MachError, code_name
from pymach.include import traps
from pymach.include.message import OOL, RCV_TIMEOUT, Int, Message
from pymach.include.vm_param import VM_PROT_READ, VM_PROT_WRITE
from pymach.kern.thread import Thread, current_thread
from pymach.vm.vm_fault import vm_fault_trap

if TYPE_CHECKING:
    from pymach.kern.task import Task


def _check_range(address: object, size: object) -> tuple[int, int]:
    for what, v in (("address", address), ("size", size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise MachError("KERN_INVALID_ARGUMENT", f"{what} must be an int >= 0, not {v!r:.40}")
    return address, size  # type: ignore[return-value]


class Memory(ABC):
    """Indexing and slicing over `read` and `write` (shared by both kinds of memory)."""

    @abstractmethod
    def read(self, address: int, size: int) -> bytes:
        """The `size` bytes at `address` (each kind of memory reads its own way)."""

    @abstractmethod
    def write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        """Store `data` at `address` (each kind of memory writes its own way)."""

    @overload
    def __getitem__(self, key: int) -> int: ...

    @overload
    def __getitem__(self, key: slice) -> bytes: ...

    def __getitem__(self, key: int | slice) -> int | bytes:
        if isinstance(key, slice):
            start, stop = _slice_bounds(key)
            return self.read(start, stop - start)
        return self.read(key, 1)[0]

    def __setitem__(self, key: int | slice, value: Any) -> None:
        if isinstance(key, slice):
            start, stop = _slice_bounds(key)
            data = _as_bytes(value)
            if len(data) != stop - start:
                raise MachError("KERN_INVALID_ARGUMENT", f"slice of {stop - start} bytes "
                                f"cannot take {len(data)} bytes")
            self.write(start, data)
        else:
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 256:
                raise MachError("KERN_INVALID_ARGUMENT", f"a byte must be an int in 0..255, "
                                f"not {value!r:.40}")
            self.write(key, bytes((value,)))

    def region(self, address: int, size: int) -> Region:
        """A window [address, address+size) indexed from 0."""
        return Region(self, *_check_range(address, size))

    def buffer(self, address: int, size: int) -> memoryview:
        """The memory itself, through the buffer protocol (numpy.frombuffer works on it).
        Only real memory has one: native tasks."""
        raise MachError("KERN_INVALID_ARGUMENT", "the embedded kernel's memory is reached "
                        "through the software MMU and has no buffer; native tasks have one")

    def pager_window(self, request: int, writes_in_place: bool = False
                     ) -> PagerWindow | None:
        """The window (PagerWindow) of the memory object whose pager request port this
        task names `request` (a send right: the object's manager); None where the
        kernel keeps the object's pages in no such place (the embedded kernel; in
        machd, an object no task maps, or the kernel's own). With `writes_in_place`
        the manager also takes the object's write-backs through the window
        (pager_data_write_in_place), not in pager_data_write."""
        return None


class PagerWindow:
    """The memory that holds a memory object's pages at their offsets, into which its
    data manager may write the data the kernel asked for (native mode: the object's
    memfd; `memory().pager_window`), then say so with pager_data_provided_in_place: the
    data then reach the object's pages without a copy through machd. The kernel takes
    only the pages of a range it asked for; what a manager writes anywhere else is
    punched out or, over a page the kernel has, changes that page (the manager's own
    object). Close it when the object's request port dies."""

    def __init__(self, key: int, base: int, size: int, huge: int, fd: int,
                 page_size: int) -> None:
        self.key = key  # names the window to the kernel (the object's serial)
        self.base = base  # the memory-object offset of the window's first byte
        self.size = size  # bytes of the object the window holds
        self.huge = huge  # the huge page size if the memfd is hugetlb, else 0
        self.fd = fd  # (owned; lock) read-write descriptor of the object's memfd, -1
        # once closed
        self.page_size = page_size
        self.lock = threading.Lock()  # a write and the close never overlap

    def fits(self, offset: int, size: int) -> bool:
        """True if [offset, offset+size) is whole pages of the object within the window."""
        ps = self.page_size
        return (offset % ps == 0 and size % ps == 0 and size > 0
                and self.base <= offset and offset - self.base + size <= self.size)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write `data` at memory-object offset `offset` (a range that `fits`);
        KERN_INVALID_ARGUMENT if it does not, or if the window is closed."""
        if not self.fits(offset, len(data)):
            raise MachError("KERN_INVALID_ARGUMENT", f"{len(data):#x} bytes at {offset:#x} "
                            f"are not whole pages of the window")
        with self.lock:
            if self.fd < 0:
                raise MachError("KERN_INVALID_ARGUMENT", "the window is closed")
            self._write(offset - self.base, data)

    def _write(self, at: int, data: bytes | bytearray | memoryview) -> None:
        """Write `data` at byte `at` of the memfd (lock held)."""
        with memoryview(data) as view:
            if self.huge:  # (hugetlbfs has no write(): through a mapping)
                from pymach.pmap import hugetlb  # (deferred: only a pager of huge pages
                # needs it, and `import pymach` loads no pmap backend)

                hugetlb.write(self.fd, at, [view], self.huge)
                return
            done = 0
            while done < len(view):
                done += os.pwrite(self.fd, view[done:], at + done)

    def read(self, offset: int, size: int) -> bytes:
        """The `size` bytes at memory-object offset `offset` (whole pages from the
        window's base on; the object may have grown past `size` since the window was
        given): what the kernel left there for pager_data_write_in_place.
        KERN_INVALID_ARGUMENT if the range is not such pages, lies past the object's
        memory, or if the window is closed."""
        ps = self.page_size
        if offset % ps or size % ps or size <= 0 or offset < self.base:
            raise MachError("KERN_INVALID_ARGUMENT", f"{size:#x} bytes at {offset:#x} "
                            f"are not whole pages of the window")
        parts, done, at = [], 0, offset - self.base
        with self.lock:
            if self.fd < 0:
                raise MachError("KERN_INVALID_ARGUMENT", "the window is closed")
            while done < size:  # (hugetlbfs reads as any file does)
                part = os.pread(self.fd, size - done, at + done)
                if not part:  # past the memfd's end: never so short where the kernel
                    raise MachError("KERN_INVALID_ARGUMENT", f"the window ends before "
                                    f"{offset + done:#x}")  # left data
                parts.append(part)
                done += len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def holds(self, offset: int, size: int) -> bool:
        """False if the window has a hole in [offset, offset+size) now: the kernel took
        a page of it back (read before: what was read there may be zeros). True if
        not, or where the memory cannot tell (hugetlbfs reports no holes)."""
        with self.lock:
            if self.fd < 0:
                return False
            try:
                return os.lseek(self.fd, offset - self.base, os.SEEK_HOLE) >= \
                    offset - self.base + size
            except OSError:  # (ENXIO: past the end)
                return False

    def close(self) -> None:
        """Give the descriptor back (idempotent; after a write under way)."""
        with self.lock:
            fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


class AddressSpace(Memory):
    """One task's memory as its own threads see it (see module docstring)."""

    def __init__(self, task: Task) -> None:
        self.task = task

    def _thread(self) -> Thread:
        thread = current_thread()
        if thread.task is not self.task:
            raise MachError("KERN_INVALID_TASK", f"thread {thread.name!r} is not in task "
                            f"{self.task.name!r}; use vm_read/vm_write on its task port")
        if self.task.map is None:
            raise MachError("KERN_INVALID_TASK", f"task {self.task.name!r} has terminated")
        return thread

    def read(self, address: int, size: int) -> bytes:
        """The `size` bytes at `address`."""
        address, size = _check_range(address, size)
        thread = self._thread()
        pmap: Any = self.task.map.pmap  # type: ignore[union-attr]
        if not hasattr(pmap, "mmu_read"):  # a kernel-internal task of machd
            return _kernel_access(thread, address, size, None)
        ps = thread.kernel.page_size
        out = bytearray()
        va, end = address, address + size
        while va < end:
            n = min(end - va, ps - va % ps)
            chunk = pmap.mmu_read(va, n)
            if chunk is None:
                vm_fault_trap(thread, va, VM_PROT_READ)
                continue
            out += chunk
            va += n
        return bytes(out)

    def write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        """Store `data` at `address`."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise MachError("KERN_INVALID_ARGUMENT", f"data must be bytes, not "
                            f"{type(data).__name__}")
        address, _ = _check_range(address, len(data))
        thread = self._thread()
        pmap: Any = self.task.map.pmap  # type: ignore[union-attr]
        if not hasattr(pmap, "mmu_write"):
            _kernel_access(thread, address, len(data), bytes(data))
            return
        ps = thread.kernel.page_size
        view = memoryview(data).cast("B")
        pos = 0
        while pos < len(view):
            va = address + pos
            n = min(len(view) - pos, ps - va % ps)
            if not pmap.mmu_write(va, view[pos:pos + n]):
                vm_fault_trap(thread, va, VM_PROT_WRITE)
                continue
            pos += n


def _kernel_access(thread: Thread, address: int, size: int, data: bytes | None) -> bytes:
    """Read (data None) or write a task's memory through the kernel, for tasks whose
    pmap has no software MMU: machd's own tasks, such as the default pager."""
    from pymach.vm.vm_kern import map_read, map_write  # (kernel-side: only machd needs it)

    with thread.kernel.trap(thread):
        assert thread.task.map is not None
        if data is None:
            return map_read(thread, thread.task.map, address, size)
        map_write(thread, thread.task.map, address, data)
        return b""


class NativeAddressSpace(Memory):
    """A native task's real memory, in its own process (libmach/task.py)."""

    def __init__(self, process: Any) -> None:
        self.process = process

    def _check(self, address: int, size: int, access: int = VM_PROT_READ,
               fault_in: bool = False) -> None:
        """Refuse a bad access with the embedded kernel's error; with `fault_in`, also
        have machd take its faults now, so a pager's failure is a MachError here."""
        _check_range(address, size)
        self.process.check_access(address, size, access)
        thread: Any = current_thread()  # a NativeThread
        for at in range(address, address + size if fault_in else address,
                        traps.FAULT_IN_MAX):
            thread.trap(traps.FAULT_IN, at, min(traps.FAULT_IN_MAX, address + size - at),
                        access)

    def read(self, address: int, size: int) -> bytes:
        """The `size` bytes at `address` (a plain load: machd serves the faults). The copy
        runs without the GIL, so other threads of the task go on while it waits on a
        fault (they may be the ones serving it)."""
        self._check(address, size, fault_in=True)
        buf = ctypes.create_string_buffer(size)
        ctypes.memmove(buf, address, size)
        return buf.raw

    def write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        """Store `data` at `address`."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise MachError("KERN_INVALID_ARGUMENT", f"data must be bytes, not "
                            f"{type(data).__name__}")
        raw = bytes(data)
        self._check(address, len(raw), VM_PROT_WRITE, fault_in=True)
        ctypes.memmove(address, raw, len(raw))

    def pager_window(self, request: int, writes_in_place: bool = False
                     ) -> PagerWindow | None:
        """See Memory.pager_window: machd hands over a descriptor of the object's memfd."""
        thread: Any = current_thread()  # a NativeThread
        value, fds = thread.trap_fds(traps.PAGER_WINDOW, request, int(writes_in_place))
        if not fds:
            return None
        key, base, size, huge, _ = value
        return PagerWindow(key, base, size, huge, fds[0], vm_page_size())

    def buffer(self, address: int, size: int) -> memoryview:
        """The memory itself (numpy.frombuffer works on it): a writable memoryview where
        the whole range allows writes now, else a read-only one (NumPy reports
        writeable=False). A later vm_protect does not change a view already made: a
        write through it where the protection forbids one is a memory exception, and
        machd ends the task, as hardware would."""
        self._check(address, size)
        view = memoryview((ctypes.c_char * size).from_address(address)).cast("B")
        try:
            self.process.check_access(address, size, VM_PROT_WRITE)
        except MachError:  # (KERN_PROTECTION_FAILURE: the range was checked mapped)
            return view.toreadonly()
        return view


def _as_bytes(value: object) -> bytes:
    """The bytes a slice assignment stores: a bytes-like object, or an iterable of ints
    in 0..255 (as bytearray takes); KERN_INVALID_ARGUMENT otherwise (an int, which
    bytes() would take as a length, text, a float)."""
    if isinstance(value, int | str | float) or value is None:
        raise MachError("KERN_INVALID_ARGUMENT", f"memory slices take bytes, not "
                        f"{type(value).__name__}")
    try:
        return bytes(value)  # type: ignore[call-overload,no-any-return]
    except (TypeError, ValueError, OverflowError) as e:
        raise MachError("KERN_INVALID_ARGUMENT", f"memory slices take bytes: {e}") from None


def _slice_bounds(key: slice) -> tuple[int, int]:
    if key.step not in (None, 1) or key.start is None or key.stop is None:
        raise MachError("KERN_INVALID_ARGUMENT", "memory slices need a start and a stop "
                        "and no step")
    start, stop = _check_range(key.start, key.stop)
    if stop < start:
        raise MachError("KERN_INVALID_ARGUMENT", f"slice stop {stop:#x} is below start")
    return start, stop


class Region:
    """A window of a task's memory, indexed from 0 (like a bytearray of `size` bytes)."""

    def __init__(self, space: Memory, address: int, size: int) -> None:
        self.space, self.address, self.size = space, address, size

    def __len__(self) -> int:
        return self.size

    def _abs(self, start: int, stop: int) -> tuple[int, int]:
        if not 0 <= start <= stop <= self.size:
            raise MachError("KERN_INVALID_ADDRESS", f"[{start}:{stop}] is outside a region "
                            f"of {self.size} bytes")
        return self.address + start, self.address + stop

    def _key(self, key: object) -> tuple[int, int]:
        """The absolute [a, b) an index or a step-less slice names; KERN_INVALID_ARGUMENT
        for any other key, KERN_INVALID_ADDRESS outside the region."""
        if isinstance(key, slice) and key.step in (None, 1):
            try:
                start, stop, _ = key.indices(self.size)
            except TypeError:
                start = stop = -1
            if start >= 0:
                return self._abs(start, max(start, stop))
        elif isinstance(key, int) and not isinstance(key, bool):
            return self._abs(key, key + 1)
        raise MachError("KERN_INVALID_ARGUMENT", f"a region takes an int index or a slice "
                        f"of ints with no step, not {key!r:.40}")

    def __getitem__(self, key: int | slice) -> int | bytes:
        a, b = self._key(key)
        if isinstance(key, slice):
            return self.space.read(a, b - a)
        return self.space[a]

    def __setitem__(self, key: int | slice, value: Any) -> None:
        a, b = self._key(key)
        if isinstance(key, slice):
            self.space[a:b] = value
        else:
            self.space[a] = value

    def read(self) -> bytes:
        """All bytes of the region."""
        return self.space.read(self.address, self.size)

    def write(self, data: bytes, offset: int = 0) -> None:
        """Store `data` at `offset` within the region."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise MachError("KERN_INVALID_ARGUMENT", f"data must be bytes, not "
                            f"{type(data).__name__}")
        if isinstance(offset, bool) or not isinstance(offset, int):
            raise MachError("KERN_INVALID_ARGUMENT", f"offset must be an int, not "
                            f"{offset!r:.40}")
        a, _ = self._abs(offset, offset + len(data))
        self.space.write(a, data)


def memory() -> Memory:
    """The calling task's address space (real memory in a native task)."""
    thread = current_thread()
    if thread.native:
        return NativeAddressSpace(thread.task)
    return AddressSpace(thread.task)


def vm_page_size() -> int:
    """The system page size of the calling thread's kernel (a boot parameter)."""
    return current_thread().kernel.page_size


def take_ool(item: OOL) -> bytes:
    """The bytes of out-of-line memory received in a message (an `OOL` item: new memory
    in the calling task's address space); the region is then deallocated, so call it
    once per item. What a data manager does with the data of pager_data_write, and a
    server with an `OOL` argument it does not keep as memory. An item made with
    `OOL(data=...)` gives its data. KERN_INVALID_ARGUMENT for anything but an OOL item."""
    from pymach import mach  # (mach imports this module: both are the user library)

    if not isinstance(item, OOL):
        raise MachError("KERN_INVALID_ARGUMENT", f"take_ool needs an OOL item, not "
                        f"{item!r:.60}")
    if item.data is not None:
        return bytes(item.data)
    _check_range(item.address, item.size)
    if item.size == 0:
        return b""
    try:
        return memory().read(item.address, item.size)
    finally:
        mach.vm_deallocate(mach.task_self(), item.address, item.size)


@dataclass(frozen=True)
class VmRegion:
    """One region as vm_regions describes it."""

    address: int
    size: int
    protection: int
    max_protection: int
    inheritance: int
    shared: bool
    offset: int
    object_name: int  # a send right to the object's name port, or PORT_NULL


@dataclass(frozen=True)
class VmStatistics:
    """vm_statistics: page counts (in pages) and event counters of the host."""

    page_size: int
    free_count: int
    active_count: int
    inactive_count: int
    wire_count: int
    faults: int
    zero_fill_count: int
    cow_faults: int
    pageins: int
    pageouts: int
    reactivations: int
    lookups: int
    hits: int


def copy_to_safe_memory(address: int, size: int, timeout_ms: float | None = None) -> int:
    """Copy [address, address+size) of the calling task into new anonymous memory (backed
    by the default pager) and return its address (paper 6.1).

    For data received from a data manager that may change it, or never provide it: the
    copy is made by a separate thread, so with `timeout_ms` a manager that does not
    answer costs the caller a KERN_MEMORY_ERROR instead of a hang (the copying thread is
    terminated). The copy never changes behind the caller's back.
    """
    from pymach import mach  # (mach imports this module: both are the user library)

    address, size = _check_range(address, size)
    me = mach.task_self()
    safe: int = mach.vm_allocate(me, 0, max(size, 1), True)
    done = mach.port_allocate(me)

    def copier() -> None:
        space = memory()
        code = 0
        try:
            space.write(safe, space.read(address, size))
        except MachError as e:
            code = e.value
        mach.msg_send(Message(remote_port=done, items=[Int(code)]))

    worker = mach.thread_create(me, copier)
    try:
        reply = mach.msg_receive(done, RCV_TIMEOUT if timeout_ms is not None else 0,
                                 timeout_ms)
        code = reply.items[0].value if reply.items else 0
    except MachError as e:
        with _suppress():
            mach.thread_terminate(worker)
        mach.vm_deallocate(me, safe, max(size, 1))
        raise MachError("KERN_MEMORY_ERROR", f"the data at {address:#x} could not be copied "
                        f"within {timeout_ms} ms ({e.code})") from None
    finally:
        mach.port_deallocate(me, done)
    if code:
        mach.vm_deallocate(me, safe, max(size, 1))
        raise MachError(code_name(int(code)), f"copying {address:#x}+{size:#x} failed")  # type: ignore[arg-type]
    return safe


def _suppress() -> Any:
    return contextlib.suppress(MachError)
