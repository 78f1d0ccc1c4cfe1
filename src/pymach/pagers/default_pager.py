"""The default pager: backing store for the kernel's own memory objects (paper 6.2.2).

A task started at boot, known to the kernel by its default pager port. As in Mach it is
a server above the kernel, not part of vm/: the kernel is given `start_default_pager`
when it boots (kern/host.py, `install_default_pager`; `pymach` installs it). It serves the
objects the kernel creates (zero-fill memory, shadows) through the same memory-object
interface as any data manager: pager_create hands it a new memory object, then
pager_data_write stores pages and pager_data_request returns them, or
pager_data_unavailable when it never stored the page (the kernel then zero-fills, or
looks in the original for a shadow, footnote 6).

Pages live in a real file: a sparse swap file in a configurable directory, with an
allocation map of page-sized blocks. The file has no name: it is created unlinked
(O_TMPFILE, or unlinked right after creation where that is unsupported) and lives only
as long as its descriptor, so a kernel (or machd) killed by SIGKILL leaves nothing
behind. A full store never loses data: the pager answers pager_data_error and the
kernel keeps the page (and stops paging out that object).

The pager serves the kernel's own objects, so its name space is not bounded by
port_names_max (it holds three names per object the kernel pages out). It learns that
an object is gone from NOTIFY_PORT_DELETED on its request port; if its notify port
overflowed (NOTIFY_OVERFLOW), it re-checks every request port it knows instead. An
object that died while its pager_create was still queued (a region deallocated while
the pageout daemon was writing it out) is heard of by neither: its request port arrives
as PORT_NULL. The pager then keeps nothing of it and deallocates its memory object port
at once, which destroys the pageouts queued on it (the kernel's holding memory is
released as for any destroyed message); keeping it would keep its blocks forever.

One thread receives from the default group, which takes messages in the order the
kernel sent them; that order is what keeps successive pageouts of one page in order.
It is vm-privileged (it may use the reserved pool) and never allocates memory of its
own while serving a pageout. State below belongs to that thread alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pymach import mach, mach_vm
from pymach.errors import MachError, ThreadTerminated
from pymach.include.mach_defs import memory_object_defs
from pymach.include.message import OOL, PORT_BACKLOG_MAX, PORT_NULL, Code, Int, Message
from pymach.include.mig import serve_message
from pymach.ipc import mach_port
from pymach.ipc.ipc_notify import NOTIFY_OVERFLOW, NOTIFY_PORT_DELETED

if TYPE_CHECKING:
    from pymach.kern.host import Kernel


class BackingStore:
    """A sparse swap file of page-sized blocks with an allocation map."""

    def __init__(self, directory: str | None, page_size: int, max_pages: int | None) -> None:
        self.page_size = page_size  # immutable
        self.max_pages = max_pages  # immutable; None: grow as needed
        self.directory = directory or tempfile.gettempdir()  # immutable
        self.fd = _open_unlinked(self.directory)
        self.used = bytearray()  # allocation map: 1 = block in use
        self.free_blocks: list[int] = []  # freed blocks, the most recently freed reused first
        self.in_use = 0

    def alloc(self) -> int | None:
        """A free block number, or None if the store is full."""
        if self.free_blocks:
            block = self.free_blocks.pop()
        elif self.max_pages is None or len(self.used) < self.max_pages:
            block = len(self.used)
            self.used.append(0)
        else:
            return None
        self.used[block] = 1
        self.in_use += 1
        return block

    def free(self, block: int) -> None:
        """Return a block to the free list."""
        if self.used[block]:
            self.used[block] = 0
            self.in_use -= 1
            self.free_blocks.append(block)

    def write(self, block: int, data: bytes) -> None:
        """Store one page in a block."""
        os.pwrite(self.fd, data.ljust(self.page_size, b"\0"), block * self.page_size)

    def read(self, block: int) -> bytes:
        """Load one page from a block."""
        data = os.pread(self.fd, self.page_size, block * self.page_size)
        return data.ljust(self.page_size, b"\0")

    def close(self) -> None:
        """Close the swap file (it has no name; closing frees its blocks)."""
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _open_unlinked(directory: str) -> int:
    """A read-write descriptor for a new file in `directory` that has no name there."""
    tmpfile = getattr(os, "O_TMPFILE", 0)
    if tmpfile:
        try:
            return os.open(directory, tmpfile | os.O_RDWR, 0o600)
        except OSError:  # the filesystem cannot: fall back to create-then-unlink
            pass
    fd, path = tempfile.mkstemp(prefix="pymach-swap-", dir=directory)
    os.unlink(path)
    return fd


def _runs(blocks: dict[int, int], offset: int, length: int,
          ps: int) -> list[tuple[int, int, bool]]:
    """The pages of [offset, offset+length) as runs (first offset, pages, stored):
    adjacent pages that all have a block, or all have none."""
    runs: list[tuple[int, int, bool]] = []
    for off in range(offset, offset + length, ps):
        stored = off in blocks
        if runs and runs[-1][2] == stored:
            first, n, _ = runs[-1]
            runs[-1] = (first, n + 1, stored)
        else:
            runs.append((off, 1, stored))
    return runs


@dataclass
class DpObject:
    """One memory object the default pager backs (names in the pager's space)."""

    memory_object: int
    request: int
    name: int
    blocks: dict[int, int] = field(default_factory=dict)  # pager offset -> block


class DefaultPager:
    """The server: handlers for the memory_object routines (see module docstring)."""

    def __init__(self, store: BackingStore) -> None:
        self.store = store
        self.objects: dict[int, DpObject] = {}  # memory object name -> object
        self.by_request: dict[int, int] = {}  # request port name -> memory object name

    def pager_create(self, pager: int, memory_object: int, request: int, name: int) -> None:
        """A new object to back; one whose request port arrives as PORT_NULL died on the
        way (see module docstring) and is let go at once."""
        if request == PORT_NULL:
            if memory_object != PORT_NULL:
                mach.port_deallocate(mach.task_self(), memory_object)
            return
        self.objects[memory_object] = DpObject(memory_object, request, name)
        self.by_request[request] = memory_object
        mach.port_enable(mach.task_self(), memory_object)

    def pager_data_request(self, memory_object: int, request: int, offset: int, length: int,
                           desired_access: int) -> None:
        """Answer a run of pages the kernel asks for (a fault's cluster) a run at a time:
        the stored pages in one pager_data_provided, the others in one
        pager_data_unavailable, so a cluster costs a message or two, not one a page."""
        obj = self.objects.get(memory_object)
        ps = self.store.page_size
        for off, n, stored in _runs(obj.blocks if obj else {}, offset, length, ps):
            if stored:
                data = b"".join(self.store.read(obj.blocks[off + i * ps])  # type: ignore[union-attr]
                                for i in range(n))
                mach.pager_data_provided(request, off, data, n * ps, 0)
            else:
                mach.pager_data_unavailable(request, off, n * ps)

    def pager_data_write(self, memory_object: int, offset: int, data: OOL,
                         data_count: int) -> None:
        try:
            raw = mach_vm.memory().read(data.address, data.size)[:data_count]
            obj = self.objects.get(memory_object)
            ps = self.store.page_size
            for i in range(0, len(raw), ps):
                if obj is not None and not self._store(obj, offset + i, raw[i:i + ps]):
                    # Said while we still hold the data, so the kernel can take it back;
                    # an object that died meanwhile (its request port gone) wants nothing.
                    with contextlib.suppress(MachError):
                        mach.pager_data_error(obj.request, offset + i, ps,
                                              MachError("KERN_RESOURCE_SHORTAGE").value)
        finally:  # the pages it brought are ours to free, whatever happened
            mach.vm_deallocate(mach.task_self(), data.address, data.size)

    def _store(self, obj: DpObject, off: int, page: bytes) -> bool:
        block = obj.blocks.get(off)
        if block is None:
            block = self.store.alloc()
            if block is None:
                return False
            obj.blocks[off] = block
        self.store.write(block, page)
        return True

    def pager_init(self, memory_object: int, request: int, name: int) -> None:
        """Not expected: the default pager is given objects by pager_create."""

    def pager_data_unlock(self, memory_object: int, request: int, offset: int, length: int,
                          desired_access: int) -> None:
        """Not expected: the default pager never locks data."""

    def port_deleted(self, name: int) -> None:
        """The kernel let go of an object (its request port died): free its blocks."""
        mo = self.by_request.pop(name, None)
        obj = self.objects.pop(mo, None) if mo is not None else None
        if obj is None:
            return
        for block in obj.blocks.values():
            self.store.free(block)
        mach.port_deallocate(mach.task_self(), obj.memory_object)

    def notifications_lost(self) -> None:
        """NOTIFY_OVERFLOW: some port deaths went unheard; find them by looking."""
        for request in mach.names_gone(list(self.by_request)):
            self.port_deleted(request)


def default_pager_loop(dp: DefaultPager, notify: int) -> None:
    """The pager thread: serve memory-object messages and notifications forever."""
    while True:
        msg: Message = mach.msg_receive()
        try:
            _serve_one(dp, notify, msg)
        except MachError as e:  # a dead request port: the object is already gone
            _log(f"default pager: {e}")
        except ThreadTerminated:
            raise
        except Exception:  # the kernel's pager must outlive any one message
            logging.getLogger("pymach").exception("default pager: message %d", msg.id)


def _serve_one(dp: DefaultPager, notify: int, msg: Message) -> None:
    """One message: a notification on `notify`, or a memory_object request."""
    if msg.local_port != notify:
        serve_message(memory_object_defs, dp, msg)
    elif msg.id == NOTIFY_PORT_DELETED and isinstance(msg.items[0], Int):
        dp.port_deleted(msg.items[0].value)
    elif msg.id == NOTIFY_OVERFLOW:
        dp.notifications_lost()


def _log(text: str) -> None:
    logging.getLogger("pymach").debug(text)


def start_default_pager(kernel: Kernel, directory: str | None,
                        max_pages: int | None) -> BackingStore:
    """Create the default pager task and its thread (kernel lock held)."""
    task = kernel.task_create_locked(None, False, "default_pager")
    task.space.names_max = None  # see module docstring
    name = mach_port.port_allocate(task.space, "default_pager")
    port = task.space.names[name].port
    port.enabled = True
    assert task.notify_port is not None
    task.notify_port.enabled = True
    task.notify_port.backlog = PORT_BACKLOG_MAX  # fewer overflows to recover from
    kernel.vm.default_pager_port = port
    store = BackingStore(directory, kernel.page_size, max_pages)
    args: tuple[Any, ...] = (DefaultPager(store), task.notify_name)
    thread = kernel.thread_create_locked(task, Code(default_pager_loop, args),
                                         "default_pager.1", start=False)
    thread.vm_privileged = thread.daemon = True
    thread.start()
    return store
