"""UNIX-style file I/O on mapped files (paper section 8.1), as a library for tasks.

"An open call would result in the file being mapped into memory. Subsequent read and
write calls would operate directly on virtual memory. The filesystem server task would
operate as an external pager, managing the virtual memory corresponding to the file.
Shared process state information can be passed on to child processes using inherited
shared memory." This module is that library; its server is
`pymach.apps.unixio_server.UnixFileServer`, an external pager for a real directory.

The calls are those of `os`: `open(path, flags, mode) -> fd`, `read`, `write`, `pread`,
`pwrite`, `lseek`, `fstat`, `ftruncate`, `fsync`, `dup` and `close`, with the errors a
Python user expects (OSError with its errno, ValueError for an embedded null byte);
`FileIO` is a `RawIOBase` over them, and `io_open` is Python's `open()` (the buffered
and text layers by mode). A failure of Mach itself (the server died) is a MachError.

Where everything lives:
- `open` asks the server (one message) and maps the file's memory object into the task
  (read-only for a task that only reads it), inherited VM_INHERIT_SHARE. `read` and
  `write` copy from and to that mapping. No message, unless a write grows the file
  (uio_extend) or the file has grown past this task's mapping (it is mapped again,
  larger, at a new address; the old mapping goes once the new one holds the object).
- The server's *table* (a memory object every client maps read-write, also
  VM_INHERIT_SHARE) holds each file's size and each open file description's offset, so
  tasks sharing a description move one offset in shared memory, and all tasks see one
  size.
- The task's *u-area*, at a fixed address (UAREA_ADDRESS) and VM_INHERIT_COPY, holds its
  descriptor table (fd -> description) and where its files are mapped. A child made
  with `task_create(parent, True)` or `spawn(..., inherit=True)` inherits a copy of it,
  the table and the mappings; at its first call it finds them there and registers with
  the server. `unixio.spawn` first hands the server a ticket for the child's references
  (UNIX fork); a child made otherwise takes references at its first call, and loses a
  descriptor that every other holder closed before that.
- The server is reached through the task's bootstrap port: `attach(server)` sets it, so
  children inherit it.

Invariants: the u-area and the per-task caches (`_Client`) describe only the calling
task's own mappings, and a mapping record's inode generation matches the server's, or
it is ignored; offsets are changed only by holders of the description, sizes only by
the server. Not atomic: two tasks moving one shared offset at the same instant (as in
UNIXes before per-file locks), and open/close/dup/spawn from two threads of one task at
once. The library is not a security boundary: a task holding a file's memory object
could write it.
"""

from __future__ import annotations

import errno
import io
import operator
import os
import struct
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pymach import mach
from pymach.apps.unixio_server import (
    FILE_BASE,
    INODE_BASE,
    RECORD,
    STAT_NAMES,
    unixio_defs,
)
from pymach.errors import MachError
from pymach.include.mach_defs import TASK_BOOTSTRAP_PORT
from pymach.include.vm_param import VM_INHERIT_SHARE, VM_PROT_READ, round_page
from pymach.kern.thread import current_thread, running_thread
from pymach.mach_vm import memory, vm_page_size
from pymach.pmap.native_map import WINDOW_BASE, WINDOW_SIZE

uio_attach = unixio_defs.stub("uio_attach")
uio_open = unixio_defs.stub("uio_open")
uio_object = unixio_defs.stub("uio_object")
uio_close = unixio_defs.stub("uio_close")
uio_dup = unixio_defs.stub("uio_dup")
uio_fork = unixio_defs.stub("uio_fork")
uio_adopt = unixio_defs.stub("uio_adopt")
uio_drop = unixio_defs.stub("uio_drop")
uio_extend = unixio_defs.stub("uio_extend")
uio_truncate = unixio_defs.stub("uio_truncate")
uio_fsync = unixio_defs.stub("uio_fsync")
uio_fstat = unixio_defs.stub("uio_fstat")
uio_sync = unixio_defs.stub("uio_sync")
uio_stats = unixio_defs.stub("uio_stats")

# The u-area: a header, the descriptor table, the mapping table (little-endian int64s).
UAREA_ADDRESS = WINDOW_BASE + WINDOW_SIZE - (1 << 30)  # in both modes' address spaces
MAGIC = int.from_bytes(b"UNIXIO01", "little")
H_MAGIC, H_NONCE, H_TABLE, H_TABLE_SIZE, H_TICKET = 0, 8, 16, 24, 32
NFD = 256  # descriptors per task
FD_BASE = 64  # fd record: file + 1, generation, inode + 1, inode generation
NMAP = 256  # files one task can have mapped
MAP_BASE = FD_BASE + NFD * RECORD  # map record: inode + 1, inode generation, address,
# capacity | writable
UAREA_BYTES = MAP_BASE + NMAP * RECORD
MIN_MAP_PAGES = 16  # a file is mapped with room to grow: at least this, and half again
_RECORD = struct.Struct("<4q")
_INT = struct.Struct("<q")


def _fail(code: int, filename: str | None = None) -> OSError:
    """The OSError (FileNotFoundError, ...) for an errno, as os calls raise them."""
    if filename is None:
        return OSError(code, os.strerror(code))
    return OSError(code, os.strerror(code), filename)


def _check(code: int, filename: str | None = None) -> None:
    if code:
        raise _fail(code, filename)


def _not_negative(value: Any) -> int:
    """A count, offset or length: TypeError if not an int, EINVAL if negative (checked
    before the descriptor, as Linux does)."""
    value = operator.index(value)
    if value < 0:
        raise _fail(errno.EINVAL)
    return int(value)


# -- windows on mapped memory -------------------------------------------------------------

class _Window:
    """Bytes and int64 records of one mapped range, through the software MMU (embedded
    mode: every access is checked and may fault into the kernel). It keeps no
    reference to its task (the client cache is weakly keyed by the task)."""

    def __init__(self, address: int, size: int) -> None:
        self.address, self.size = address, size

    def read(self, off: int, n: int) -> bytes:
        return memory().read(self.address + off, n)

    def readinto(self, off: int, buf: memoryview) -> None:
        buf[:] = memory().read(self.address + off, len(buf))

    def write(self, off: int, data: bytes | memoryview) -> None:
        memory().write(self.address + off, data)

    def get(self, off: int) -> int:
        value: int = _INT.unpack(memory().read(self.address + off, 8))[0]
        return value

    def put(self, off: int, value: int) -> None:
        memory().write(self.address + off, _INT.pack(value))

    def record(self, off: int) -> tuple[int, int, int, int]:
        return _RECORD.unpack(memory().read(self.address + off, RECORD))

    def close(self) -> None:
        """Forget the memory (before it is deallocated)."""


class _Buffer(_Window):
    """The same over real memory (native mode): plain loads and stores, whose faults
    machd serves."""

    def __init__(self, address: int, size: int) -> None:
        super().__init__(address, size)
        self.view = memory().buffer(address, size)

    def read(self, off: int, n: int) -> bytes:
        return self.view[off:off + n].tobytes()

    def readinto(self, off: int, buf: memoryview) -> None:
        buf[:] = self.view[off:off + len(buf)]

    def write(self, off: int, data: bytes | memoryview) -> None:
        self.view[off:off + len(data)] = data

    def get(self, off: int) -> int:
        value: int = _INT.unpack_from(self.view, off)[0]
        return value

    def put(self, off: int, value: int) -> None:
        _INT.pack_into(self.view, off, value)

    def record(self, off: int) -> tuple[int, int, int, int]:
        return _RECORD.unpack_from(self.view, off)

    def close(self) -> None:
        self.view.release()


def _window(address: int, size: int) -> _Window:
    return _Buffer(address, size) if current_thread().native else _Window(address, size)


# -- the calling task's client state --------------------------------------------------------

@dataclass
class _Mapping:
    """Where this task maps one file (a cache of its u-area record `index`)."""

    index: int
    inode: int
    generation: int
    capacity: int
    writable: bool
    window: _Window


@dataclass
class _Client:
    """One task's connection to its file server (a cache of what its memory holds)."""

    server: int
    token: int  # our port; its death tells the server to close our files
    uarea: _Window
    table: _Window
    objects: dict[int, int]  # inode -> send right to its memory object
    maps: dict[int, _Mapping]  # inode -> our mapping of it
    fds: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)  # the u-area's
    # descriptor records, as _fd returns them (only this task changes them)


_clients: weakref.WeakKeyDictionary[Any, _Client] = weakref.WeakKeyDictionary()
_last: tuple[weakref.ref[Any] | None, _Client | None] = (None, None)  # the last lookup


def attach(server: int | None = None, inherit: bool = True) -> None:
    """Make the calling task a client of the file server `server` (a send right), or of
    the one its bootstrap port names. With `inherit`, the bootstrap port is set to the
    server, so children reach it too. A task that inherited open files takes them over
    here (every call attaches on first use)."""
    task = current_thread().task
    client = _clients.get(task)
    if client is not None:
        if server is not None and server != client.server:
            raise MachError("KERN_INVALID_ARGUMENT", "this task already uses another "
                            "file server")
        return
    me = mach.task_self()
    if server is None:
        server = mach.task_get_special_port(me, TASK_BOOTSTRAP_PORT)
        if not server:
            raise MachError("KERN_INVALID_ARGUMENT", "no file server: call "
                            "unixio.attach(server) first (or set the bootstrap port)")
    elif inherit:
        mach.task_set_special_port(me, TASK_BOOTSTRAP_PORT, server)
    _clients[task] = _connect(me, server)


def _client() -> _Client:
    """The calling task's client state (attaching on first use)."""
    global _last
    task = current_thread().task
    ref, client = _last
    if ref is not None and ref() is task and client is not None:
        return client
    client = _clients.get(task)
    if client is None:
        attach()
        client = _clients[task]
    _last = (weakref.ref(task), client)
    return client


def _connect(me: int, server: int) -> _Client:
    """Register with the server and set up (or take over) the u-area and the table."""
    token = mach.port_allocate(me)
    code, table_object, nonce, _, _, table_size = uio_attach(server, token)
    _check(code)
    size = round_page(UAREA_BYTES, vm_page_size())
    inherited = any(r.address <= UAREA_ADDRESS < r.address + r.size
                    for r in mach.vm_regions(me, UAREA_ADDRESS, size))
    if not inherited:
        mach.vm_allocate(me, UAREA_ADDRESS, size, False)  # VM_INHERIT_COPY: a child's own
    uarea = _window(UAREA_ADDRESS, size)
    if inherited and uarea.get(H_MAGIC) != MAGIC:  # never overwrite someone's memory
        raise MachError("KERN_NO_SPACE", f"unixio needs {UAREA_ADDRESS:#x} for its "
                        f"u-area, and this task uses that address for something else")
    ours = inherited and uarea.get(H_NONCE) == nonce
    if ours:
        table_address = uarea.get(H_TABLE)
    else:
        table_address = mach.vm_allocate_with_pager(me, 0, table_size, True, table_object, 0)
        mach.vm_inherit(me, table_address, table_size, VM_INHERIT_SHARE)
        uarea.write(0, bytes(size))
        uarea.write(0, struct.pack("<5q", MAGIC, nonce, table_address, table_size, 0))
    mach.port_deallocate(me, table_object)
    client = _Client(server, token, uarea, _window(table_address, table_size), {}, {})
    if ours:
        _adopt(client)
    return client


def _adopt(c: _Client) -> None:
    """Take over the descriptors inherited from the parent: by its fork ticket, or one
    by one (those closed by everyone meanwhile are gone)."""
    ticket = c.uarea.get(H_TICKET)
    if ticket:
        c.uarea.put(H_TICKET, 0)
        if uio_adopt(c.server, c.token, ticket) == 0:
            return
    records = _records(c, FD_BASE, NFD)
    fds = [fd for fd, record in enumerate(records) if record[0]]
    pairs: list[int] = []
    for fd in fds:
        pairs += [records[fd][0] - 1, records[fd][1]]
    code, valid = uio_dup(c.server, c.token, pairs)
    _check(code)
    for fd, ok in zip(fds, valid, strict=True):
        if not ok:
            _set_fd(c, fd, None)


# -- descriptors and mappings -------------------------------------------------------------

def _fd(c: _Client, fd: int) -> tuple[int, int, int, int]:
    """(file, generation, inode, inode generation) of a descriptor, or EBADF."""
    found = c.fds.get(fd)
    if found is not None:
        return found
    if isinstance(fd, bool) or not isinstance(fd, int):
        raise TypeError(f"a file descriptor is an int, not {type(fd).__name__}")
    if not 0 <= fd < NFD:
        raise _fail(errno.EBADF)
    file1, generation, inode1, igen = c.uarea.record(FD_BASE + fd * RECORD)
    if not file1:
        raise _fail(errno.EBADF)
    found = c.fds[fd] = (file1 - 1, generation, inode1 - 1, igen)
    return found


def _set_fd(c: _Client, fd: int, record: tuple[int, int, int, int] | None) -> None:
    """Write (or, with None, clear) a descriptor record of the u-area."""
    c.fds.pop(fd, None)
    if record is None:
        c.uarea.write(FD_BASE + fd * RECORD, bytes(RECORD))
    else:
        file, generation, inode, igen = record
        c.uarea.write(FD_BASE + fd * RECORD, _RECORD.pack(file + 1, generation, inode + 1,
                                                          igen))


def _description(c: _Client, file: int, generation: int) -> tuple[int, int]:
    """(offset, flags) of an open file description, or EBADF if it was closed."""
    offset, g, _, flags = c.table.record(FILE_BASE + file * RECORD)
    if g != generation:
        raise _fail(errno.EBADF)
    return offset, flags


def _size(c: _Client, inode: int) -> int:
    return c.table.get(INODE_BASE + inode * RECORD)


def _mapping(c: _Client, inode: int, igen: int) -> _Mapping | None:
    """This task's mapping of an inode: cached, or found in the u-area (inherited)."""
    m = c.maps.get(inode)
    if m is not None or not igen:
        return m
    for index, (inode1, g, address, cap) in enumerate(_records(c, MAP_BASE, NMAP)):
        if inode1 == inode + 1 and g == igen:
            m = _Mapping(index, inode, g, cap & ~1, bool(cap & 1),
                         _window(address, cap & ~1))
            c.maps[inode] = m
            return m
    return None


def _map(c: _Client, inode: int, igen: int, need: int, write: bool) -> _Mapping:
    """A mapping of the inode covering [0, need), writable if `write`: the current one,
    or a new larger one (the file grew past it) that replaces it."""
    m = _mapping(c, inode, igen)
    if m is not None and m.capacity >= need and (m.writable or not write):
        return m
    me = mach.task_self()
    ps = vm_page_size()
    cap = round_page(max(need + need // 2, MIN_MAP_PAGES * ps, m.capacity if m else 0), ps)
    writable = write or (m is not None and m.writable)
    address = mach.vm_allocate_with_pager(me, 0, cap, True, _object(c, inode, igen), 0)
    if not writable:
        mach.vm_protect(me, address, cap, True, VM_PROT_READ)
    mach.vm_inherit(me, address, cap, VM_INHERIT_SHARE)
    index = m.index if m is not None else _free_slot(c, MAP_BASE, NMAP, errno.EMFILE)
    if m is not None:  # the new mapping holds the object: the old one can go
        _unmap(c, m)
    c.uarea.write(MAP_BASE + index * RECORD, _RECORD.pack(inode + 1, igen, address,
                                                          cap | writable))
    new = _Mapping(index, inode, igen, cap, writable, _window(address, cap))
    c.maps[inode] = new
    return new


def _unmap(c: _Client, m: _Mapping) -> None:
    m.window.close()
    mach.vm_deallocate(mach.task_self(), m.window.address, m.capacity)
    c.uarea.write(MAP_BASE + m.index * RECORD, bytes(RECORD))
    c.maps.pop(m.inode, None)


def _object(c: _Client, inode: int, igen: int) -> int:
    """A send right to the inode's memory object (asked for once per task)."""
    mo = c.objects.get(inode)
    if mo is None:
        code, objects = uio_object(c.server, c.token, inode, igen)
        _check(code)
        mo = c.objects[inode] = objects[0]
    return mo


def _records(c: _Client, base: int, count: int) -> list[tuple[int, int, int, int]]:
    """`count` records of the u-area from `base`, read at once."""
    return list(_RECORD.iter_unpack(c.uarea.read(base, count * RECORD)))


def _free_slot(c: _Client, base: int, count: int, code: int) -> int:
    """The first free record of a u-area table (the lowest free descriptor), or `code`."""
    for i, record in enumerate(_records(c, base, count)):
        if not record[0]:
            return i
    raise _fail(code)


def _forget_if_unused(c: _Client, inode: int) -> None:
    """Unmap a file none of this task's descriptors names any more (the kernel keeps
    its pages cached) and give its memory object right back."""
    if any(file1 and inode1 == inode + 1 for file1, _, inode1, _ in _records(c, FD_BASE, NFD)):
        return
    m = c.maps.get(inode)
    if m is not None:
        _unmap(c, m)
    mo = c.objects.pop(inode, None)
    if mo is not None:
        mach.port_deallocate(mach.task_self(), mo)


# -- the calls -------------------------------------------------------------------------------

def open(path: str | bytes | os.PathLike[Any], flags: int = os.O_RDONLY,
         mode: int = 0o666) -> int:
    """os.open on the file server: a descriptor of this task. The file is mapped."""
    name = os.fsdecode(path)
    if "\0" in name:
        raise ValueError("embedded null byte")
    c = _client()
    fd = _free_slot(c, FD_BASE, NFD, errno.EMFILE)
    code, file, generation, inode, igen, objects = uio_open(c.server, c.token, name,
                                                            flags, mode)
    _check(code, name)
    c.objects[inode] = objects[0]  # (the same name as before if we hold it already)
    try:
        _map(c, inode, igen, _size(c, inode), flags & os.O_ACCMODE != os.O_RDONLY)
    except BaseException:
        uio_close(c.server, c.token, file, generation)
        _forget_if_unused(c, inode)
        raise
    _set_fd(c, fd, (file, generation, inode, igen))
    return fd


def read(fd: int, n: int) -> bytes:
    """os.read: up to `n` bytes from the descriptor's offset, copied from the mapping."""
    if type(n) is not int or n < 0:
        n = _not_negative(n)
    c = _client()
    file, generation, inode, igen = c.fds.get(fd) or _fd(c, fd)
    offset, flags = _description(c, file, generation)
    window, count = _span(c, inode, igen, flags, offset, n)
    if window is None:
        return b""
    data = window.read(offset, count)
    c.table.put(FILE_BASE + file * RECORD, offset + count)
    return data


def pread(fd: int, n: int, offset: int) -> bytes:
    """os.pread: up to `n` bytes at `offset`; the descriptor's offset stays."""
    n, offset = _not_negative(n), _not_negative(offset)
    c = _client()
    file, generation, inode, igen = _fd(c, fd)
    _, flags = _description(c, file, generation)
    window, count = _span(c, inode, igen, flags, offset, n)
    return b"" if window is None else window.read(offset, count)


def readinto(fd: int, buffer: Any) -> int:
    """Read into a writable bytes-like object; the number of bytes read."""
    c = _client()
    file, generation, inode, igen = c.fds.get(fd) or _fd(c, fd)
    offset, flags = _description(c, file, generation)
    view = memoryview(buffer).cast("B")
    window, count = _span(c, inode, igen, flags, offset, len(view))
    if window is None:
        return 0
    window.readinto(offset, view[:count])
    c.table.put(FILE_BASE + file * RECORD, offset + count)
    return count


def _span(c: _Client, inode: int, igen: int, flags: int, offset: int,
          n: int) -> tuple[_Window | None, int]:
    """Where a read of up to `n` bytes at `offset` is (the mapping, made larger if the
    file grew past it) and how many bytes it gets; (None, 0) at the end of the file.
    EBADF if the description was not opened for reading."""
    if flags & os.O_ACCMODE == os.O_WRONLY:
        raise _fail(errno.EBADF)
    count = min(n, _size(c, inode) - offset)
    if count <= 0:
        return None, 0
    m = c.maps.get(inode)
    if m is None or m.capacity < offset + count:
        m = _map(c, inode, igen, offset + count, False)
    return m.window, count


def write(fd: int, data: Any) -> int:
    """os.write: store `data` at the descriptor's offset (at the end with O_APPEND),
    growing the file if needed; the number of bytes written (all of them)."""
    c = _client()
    file, generation, inode, igen = _fd(c, fd)
    offset, flags = _description(c, file, generation)
    view = memoryview(data).cast("B")
    if flags & os.O_APPEND and view.nbytes:
        code, offset, _ = uio_extend(c.server, c.token, file, generation, 0,
                                     view.nbytes)
        _check(code)
    _write_at(c, file, generation, inode, igen, flags, offset, view)
    c.table.put(FILE_BASE + file * RECORD, offset + view.nbytes)
    return view.nbytes


def pwrite(fd: int, data: Any, offset: int) -> int:
    """os.pwrite: store `data` at `offset`; the descriptor's offset stays."""
    offset = _not_negative(offset)
    c = _client()
    file, generation, inode, igen = _fd(c, fd)
    _, flags = _description(c, file, generation)
    view = memoryview(data).cast("B")
    _write_at(c, file, generation, inode, igen, flags, offset, view)
    return view.nbytes


def _write_at(c: _Client, file: int, generation: int, inode: int, igen: int, flags: int,
              offset: int, view: memoryview) -> None:
    if flags & os.O_ACCMODE == os.O_RDONLY:
        raise _fail(errno.EBADF)
    end = offset + view.nbytes
    if not view.nbytes:
        return
    if end > _size(c, inode):
        code, _, _ = uio_extend(c.server, c.token, file, generation, end, 0)
        _check(code)
    m = c.maps.get(inode)
    if m is None or m.capacity < end or not m.writable:
        m = _map(c, inode, igen, end, True)
    m.window.write(offset, view)


def lseek(fd: int, position: int, how: int) -> int:
    """os.lseek (SEEK_SET, SEEK_CUR, SEEK_END, SEEK_DATA, SEEK_HOLE): the new offset."""
    position, how = operator.index(position), operator.index(how)
    c = _client()
    file, generation, inode, _ = _fd(c, fd)
    offset, _ = _description(c, file, generation)
    size = _size(c, inode)
    if how == os.SEEK_SET:
        new = position
    elif how == os.SEEK_CUR:
        new = offset + position
    elif how == os.SEEK_END:
        new = size + position
    elif how in (os.SEEK_DATA, os.SEEK_HOLE):  # no holes: data up to the end
        if not 0 <= position < size:
            raise _fail(errno.ENXIO if position >= 0 else errno.EINVAL)
        new = position if how == os.SEEK_DATA else size
    else:
        raise _fail(errno.EINVAL)
    if new < 0:
        raise _fail(errno.EINVAL)
    c.table.put(FILE_BASE + file * RECORD, new)
    return new


def fstat(fd: int) -> os.stat_result:
    """os.fstat: the disk file's attributes, with the size the file has now (st_blksize
    is the page size; st_blocks counts 512-byte blocks of that size)."""
    c = _client()
    file, generation, _, _ = _fd(c, fd)
    code, values = uio_fstat(c.server, c.token, file, generation)
    _check(code)
    mode, ino, dev, nlink, uid, gid, size, atime, mtime, ctime = values
    return os.stat_result((mode, ino, dev, nlink, uid, gid, size, atime // 10**9,
                           mtime // 10**9, ctime // 10**9, atime / 1e9, mtime / 1e9,
                           ctime / 1e9, atime, mtime, ctime, vm_page_size(),
                           -(-size // 512)))


def ftruncate(fd: int, length: int) -> None:
    """os.ftruncate: the file's new size (EINVAL for a descriptor not open for
    writing, as on Linux)."""
    length = _not_negative(length)
    c = _client()
    file, generation, _, _ = _fd(c, fd)
    _check(uio_truncate(c.server, c.token, file, generation, length))


def fsync(fd: int) -> None:
    """os.fsync: the file's changed pages go back to the server (pager_clean_request,
    then pager_flush_request, which also drops them from memory: see the server's
    `_sync`), which writes and syncs them before this returns."""
    c = _client()
    file, generation, _, _ = _fd(c, fd)
    _check(uio_fsync(c.server, c.token, file, generation))


fdatasync = fsync


def dup(fd: int) -> int:
    """os.dup: a new descriptor (the lowest free) for the same open file description."""
    c = _client()
    file, generation, inode, igen = _fd(c, fd)
    new = _free_slot(c, FD_BASE, NFD, errno.EMFILE)
    code, valid = uio_dup(c.server, c.token, [file, generation])
    _check(code or (0 if valid[0] else errno.EBADF))
    _set_fd(c, new, (file, generation, inode, igen))
    return new


def close(fd: int) -> None:
    """os.close: the descriptor goes; the description with its last reference, in any
    task. The file is unmapped here once none of this task's descriptors names it."""
    c = _client()
    file, generation, inode, _ = _fd(c, fd)
    _set_fd(c, fd, None)
    code = uio_close(c.server, c.token, file, generation)
    _forget_if_unused(c, inode)
    _check(code)


def mapping(fd: int) -> tuple[int, int, bool]:
    """Where this task maps the descriptor's file: (address, size of the mapping,
    writable). No message; the mapping is made if this task has none yet."""
    c = _client()
    _, _, inode, igen = _fd(c, fd)
    m = _mapping(c, inode, igen) or _map(c, inode, igen, _size(c, inode), False)
    return m.window.address, m.capacity, m.writable


def sync() -> None:
    """sync(2): every file of the server written back and synced."""
    _check(uio_sync(_client().server))


def server_stats(server: int | None = None) -> dict[str, int]:
    """The server's counters (disk reads and writes, requests, kernel messages about
    files, open descriptions, inodes)."""
    values = uio_stats(_client().server if server is None else server)
    return dict(zip(STAT_NAMES, values, strict=True))


def spawn(fn: Callable[..., Any], *args: Any, name: str = "", **kwargs: Any) -> Any:
    """pymach.spawn(fn, *args, inherit=True) as UNIX fork: the child inherits this
    task's descriptors (sharing their offsets) and mapped files, and holds its own
    references to them from the start."""
    c = _client()
    code, ticket = uio_fork(c.server, c.token)
    _check(code)
    c.uarea.put(H_TICKET, ticket)
    try:
        return mach.spawn(_child_main, fn, args, kwargs, name=name, inherit=True)
    except BaseException:
        uio_drop(c.server, ticket)
        raise
    finally:
        c.uarea.put(H_TICKET, 0)


def _child_main(fn: Callable[..., Any], args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> Any:
    """A spawned child's first thread: take over the files, then run fn."""
    _client()
    return fn(*args, **kwargs)


# -- the io layers ----------------------------------------------------------------------------

def _parse_mode(mode: str) -> tuple[int, str, bool]:
    """(os flags, FileIO's mode, binary) for a mode of Python's open(); ValueError for a
    bad one, with Python's messages."""
    if not isinstance(mode, str):
        raise TypeError(f"invalid mode: {mode!r}")
    modes = set(mode)
    if modes - set("axrwb+t") or len(mode) > len(modes):
        raise ValueError(f"invalid mode: {mode!r}")
    kinds = [k for k in "xrwa" if k in modes]
    if "t" in modes and "b" in modes:
        raise ValueError("can't have text and binary mode at once")
    if len(kinds) > 1:
        raise ValueError("must have exactly one of create/read/write/append mode")
    if not kinds:  # (Python's FileIO says this one)
        raise ValueError("Must have exactly one of create/read/write/append mode and at "
                         "most one plus")
    kind, plus = kinds[0], "+" in modes
    flags = {"r": 0, "w": os.O_CREAT | os.O_TRUNC, "x": os.O_CREAT | os.O_EXCL,
             "a": os.O_CREAT | os.O_APPEND}[kind]
    flags |= os.O_RDWR if plus else (os.O_RDONLY if kind == "r" else os.O_WRONLY)
    raw = {"r": "rb", "w": "wb", "x": "xb", "a": "ab"}[kind]
    if plus:
        raw = "rb+" if kind == "w" else raw + "+"
    return flags, raw, "b" in modes


class FileIO(io.RawIOBase):
    """A raw binary file of the file server (io.FileIO's interface; io.BufferedReader,
    BufferedWriter, BufferedRandom and TextIOWrapper wrap it). `file` is a name or a
    descriptor of this library; fileno() is that descriptor, not an OS one."""

    def __init__(self, file: str | bytes | os.PathLike[Any] | int, mode: str = "r",
                 closefd: bool = True) -> None:
        super().__init__()
        flags, self.mode, _ = _parse_mode(mode.replace("b", "") or "r")
        if isinstance(file, int):
            _fd(_client(), file)
            self._fd, self.name = file, file
        else:
            if not closefd:
                raise ValueError("Cannot use closefd=False with file name")
            self._fd = open(file, flags, 0o666)
            self.name = os.fsdecode(file)  # type: ignore[assignment]
        self._closefd = closefd
        self._readable = flags & os.O_ACCMODE != os.O_WRONLY
        self._writable = flags & os.O_ACCMODE != os.O_RDONLY
        self._owner = weakref.ref(current_thread().task)  # descriptors are per task

    def _ours(self) -> bool:
        thread = running_thread()
        return thread is not None and thread.task is self._owner()

    def _checked(self) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed file")
        if not self._ours():  # (the same number names another file there)
            raise OSError(errno.EBADF, "a descriptor of another task")
        return self._fd

    def readable(self) -> bool:
        self._checked()
        return self._readable

    def writable(self) -> bool:
        self._checked()
        return self._writable

    def seekable(self) -> bool:
        self._checked()
        return True

    def fileno(self) -> int:
        return self._checked()

    def readinto(self, buffer: Any) -> int:
        if not self._readable:
            raise io.UnsupportedOperation("File not open for reading")
        return readinto(self._checked(), buffer)

    def readall(self) -> bytes:
        fd = self._checked()
        return read(fd, max(_current_size(fd) - lseek(fd, 0, os.SEEK_CUR), 0))

    def write(self, data: Any) -> int:
        if not self._writable:
            raise io.UnsupportedOperation("File not open for writing")
        return write(self._checked(), data)

    def seek(self, position: int, whence: int = os.SEEK_SET) -> int:
        return lseek(self._checked(), position, whence)

    def tell(self) -> int:
        return lseek(self._checked(), 0, os.SEEK_CUR)

    def truncate(self, size: int | None = None) -> int:
        fd = self._checked()
        size = self.tell() if size is None else size
        ftruncate(fd, size)
        return size

    def close(self) -> None:
        """Close the descriptor (with closefd). From another task, or from the garbage
        collector in a thread that is not one of the owner's, the descriptor is left to
        the owner (its end closes it)."""
        if not self.closed:
            try:
                if self._closefd and self._ours():
                    close(self._fd)
            finally:
                super().close()


def _current_size(fd: int) -> int:
    """The file's size as this task sees it now (no message: from the table)."""
    c = _client()
    _, _, inode, _ = _fd(c, fd)
    return _size(c, inode)


def io_open(file: str | bytes | os.PathLike[Any] | int, mode: str = "r",
            buffering: int = -1, encoding: str | None = None, errors: str | None = None,
            newline: str | None = None, closefd: bool = True) -> Any:
    """Python's open() on the file server: FileIO wrapped by mode in io.BufferedReader,
    BufferedWriter or BufferedRandom, and TextIOWrapper unless the mode has "b"."""
    _, raw_mode, binary = _parse_mode(mode)
    for what, value in (("an encoding", encoding), ("an errors", errors),
                        ("a newline", newline)):
        if binary and value is not None:
            raise ValueError(f"binary mode doesn't take {what} argument")
    if not binary and buffering == 0:
        raise ValueError("can't have unbuffered text I/O")
    raw = FileIO(file, raw_mode, closefd)
    try:
        line_buffering = buffering == 1 and not binary
        if buffering in (-1, 1):
            buffering = max(vm_page_size(), io.DEFAULT_BUFFER_SIZE)
        if buffering == 0:
            return raw
        buffer: io.BufferedIOBase
        if "+" in raw_mode:
            buffer = io.BufferedRandom(raw, buffering)
        elif raw_mode.startswith("r"):
            buffer = io.BufferedReader(raw, buffering)
        else:
            buffer = io.BufferedWriter(raw, buffering)
        if binary:
            return buffer
        text = io.TextIOWrapper(buffer, io.text_encoding(encoding), errors, newline,
                                line_buffering)
        text.mode = mode  # type: ignore[misc]
        return text
    except BaseException:
        raw.close()
        raise
