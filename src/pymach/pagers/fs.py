"""The minimal filesystem of paper section 4.1: read-whole-file, write-whole-file.

`fs_read_file(server, name)` returns the file as *new memory* in the caller's address
space, copy-on-write: other clients keep seeing the original contents while this one
changes its copy, and nothing is read from disk until a page is touched.
`fs_write_file(server, name, data, size)` stores data back. Files live in a real
directory on disk.

The server does what the paper shows: it keeps a memory object (a port) per file,
maps it into its *own* address space with vm_allocate_with_pager, and returns that
region through IPC (out of line, deallocated from its own space), so the kernel maps it
copy-on-write in the client. Its pager_data_request is the paper's code: allocate a
buffer, read the disk into it, pager_data_provided with no lock, deallocate the buffer.
It allows caching (pager_cache), so a file read again is served from memory with no
pager messages (section 9).

Each memory object stands for one *version* of a file: it keeps an open descriptor of
the inode it was made for. fs_write_file writes a new file and puts it in place (a new
inode); later reads get a new memory object, while clients still holding the old copy
keep seeing the old contents, even for pages not yet read, until the old object is let
go (the server then withdraws its cache permission).
"""

from __future__ import annotations

import contextlib
import os

from pymach import mach
from pymach.errors import MachError
from pymach.include.message import OOL
from pymach.include.mig import INT, MEMORY, STR, Subsystem
from pymach.include.vm_param import VM_PROT_NONE
from pymach.mach_vm import memory, take_ool
from pymach.pagers.data_manager import DataManager

fs_defs = Subsystem("fs", 6000)
fs_defs.routine("fs_read_file", "server", [("name", STR)], [("data", MEMORY), ("size", INT)],
                "The whole file as new copy-on-write memory in the caller's address space.")
fs_defs.routine("fs_write_file", "server", [("name", STR), ("data", MEMORY), ("size", INT)],
                doc="Store `size` bytes of `data` (an OOL region or bytes) as the file.")
_fs_read_file = fs_defs.stub("fs_read_file")
_fs_write_file = fs_defs.stub("fs_write_file")

def fs_read_file(server: int, name: str) -> tuple[int, int]:
    """Read a whole file: (address of new copy-on-write memory, file size)."""
    data, size = _fs_read_file(server, name)
    return data.address, size


def fs_write_file(server: int, name: str, data: int | bytes, size: int) -> None:
    """Write `size` bytes as the file: from the caller's memory at address `data`, or
    from bytes."""
    item = OOL(data, size) if isinstance(data, int) else bytes(data)
    _fs_write_file(server, name, item, size)


def _remove_quietly(path: str) -> None:
    """Remove a file if it exists; a name that cannot be a file is ignored."""
    with contextlib.suppress(OSError, ValueError):
        os.remove(path)


class FileServer(DataManager):
    """The section 4.1 server: one memory object per file of `root` (see module doc)."""

    services = (fs_defs,)

    def __init__(self, root: str) -> None:
        super().__init__()
        self.root = os.path.abspath(root)
        self.paths: dict[int, str] = {}  # memory object -> file
        self.fds: dict[int, int] = {}  # memory object -> descriptor of its file version
        self.mapping: dict[int, int] = {}  # memory object -> our mappings whose pager_init
        # we have not seen yet (a kernel object may be made anew while the old one's
        # death notification is still queued)
        self.objects: dict[str, int] = {}  # file -> memory object of its current version
        self.disk_reads = 0  # I/O operations, for the section 9 benchmark

    def _path(self, name: str) -> str:
        path = os.path.abspath(os.path.join(self.root, name))
        if os.path.dirname(path) != self.root or not name:
            raise MachError("KERN_INVALID_ARGUMENT", f"{name!r} is not a file name of the "
                            f"server's directory")
        return path

    # -- the file interface ---------------------------------------------------------------
    def fs_read_file(self, server: int, name: str) -> tuple[OOL, int]:
        path = self._path(name)
        if not os.path.isfile(path):
            raise MachError("KERN_INVALID_NAME", f"no file {name!r}")
        size = os.path.getsize(path)
        if size == 0:
            return OOL(data=b""), 0
        new_object = self.objects.get(path)
        if new_object is None:  # allocate a memory object (a port) and accept requests
            new_object = self.create_memory_object()
            self.paths[new_object], self.objects[path] = path, new_object
            self.fds[new_object] = os.open(path, os.O_RDONLY)
        me = mach.task_self()  # map the memory object into our own address space
        self.mapping[new_object] = self.mapping.get(new_object, 0) + 1
        data = mach.vm_allocate_with_pager(me, 0, size, True, new_object, 0)
        return OOL(data, size, deallocate=True), size

    def fs_write_file(self, server: int, name: str, data: OOL, size: int) -> None:
        path = self._path(name)
        raw = take_ool(data)[:size]
        tmp = path + ".tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(raw)
            os.replace(tmp, path)  # a new inode: the old version's readers keep theirs
        except BaseException:
            _remove_quietly(tmp)  # a failed write leaves nothing behind for readers
            raise
        old = self.objects.pop(path, None)
        if old is not None:  # the old version need not outlive its last user
            for request in self.requests(old):
                mach.pager_cache(request, False)

    # -- the pager side ---------------------------------------------------------------------
    def pager_init(self, memory_object: int, request: int, name: int) -> None:
        super().pager_init(memory_object, request, name)
        self.mapping[memory_object] = max(self.mapping.get(memory_object, 0) - 1, 0)
        mach.pager_cache(request, True)  # keep the file's pages after the last unmap

    def pager_data_request(self, memory_object: int, request: int, offset: int,
                           length: int, access: int) -> None:
        me = mach.task_self()
        data = mach.vm_allocate(me, 0, length, True)  # allocate disk buffer
        memory().write(data, self.disk_read(memory_object, offset, length))
        # return the data with no locking
        mach.pager_data_provided(request, offset, OOL(data, length), length, VM_PROT_NONE)
        mach.vm_deallocate(me, data, length)  # deallocate disk buffer

    def disk_read(self, memory_object: int, offset: int, length: int) -> bytes:
        """Read [offset, offset+length) of the object's file (zeros past its end)."""
        self.disk_reads += 1
        return os.pread(self.fds[memory_object], length, offset).ljust(length, b"\0")

    def pager_terminate(self, memory_object: int, request: int) -> None:
        """The kernel let go of the file's object: forget it once no kernel uses it and no
        mapping of ours awaits its pager_init."""
        if not self.requests(memory_object) and not self.mapping.get(memory_object):
            path = self.paths.pop(memory_object, None)
            if path is not None and self.objects.get(path) == memory_object:
                del self.objects[path]
            os.close(self.fds.pop(memory_object))
            self.uses.pop(memory_object, None)
            self.mapping.pop(memory_object, None)
            mach.port_deallocate(mach.task_self(), memory_object)
