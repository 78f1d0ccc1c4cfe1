"""The file server of paper section 8.1: an external pager for the files of a directory.

`UnixFileServer(root)` is the section 4.1 server (`pymach.pagers.fs.FileServer`: same
directory, same `pager_data_request`, same disk reads, and it still answers
fs_read_file / fs_write_file) extended with what the UNIX emulation library
(`pymach.apps.unixio`) needs: files that clients map read-write and share, the sizes of
those files, and open file descriptions with offsets.

- **One memory object per open inode** (st_dev, st_ino). Every task that opens the file
  maps that object, so all of them see one content: the kernel's pages (in native mode,
  one memfd). Page n of the object is page n of the file. pager_data_request reads the
  disk (the 4.1 code); pager_data_write writes the disk, clipped to the file's size.
  The object stays cached (pager_cache) after the last close, so a file read again
  costs no I/O (section 9).
- **The table**: one more memory object, which every client maps read-write and the
  server maps too. It holds a record per inode (its size; only the server changes it, in
  uio_extend and uio_truncate) and a record per open file description (its offset,
  which clients move in place, and its generation, inode and flags, which the server
  sets). So clients read sizes and move offsets in memory, without a message.
- **Holders**: descriptions are counted per holder. A holder is a client task's token
  port, whose death releases everything the task held (as exit(2) closes files), or a
  fork ticket (uio_fork), which a child adopts (uio_adopt).

Invariants:
- The server's state changes in one thread only, the service thread: client requests,
  and the reaping of objects the kernel let go and of holders that died (forwarded to
  it as messages). No lock is held across a Mach call.
- Each inode's memory object is received by a thread of its own, in the kernel's order,
  and a write-back is on disk before that thread takes its next message. A *barrier* (a
  message through that port) therefore returns only when everything the kernel sent
  before it is stored. fsync is pager_clean_request (and pager_flush_request, see
  `_sync`), a barrier, then os.fsync. A
  truncation flushes the pages past the new end, waits for a barrier, then truncates
  the disk file. An object is closed only after a barrier.
- The disk file's length is the file's size: every change of size is an ftruncate.
- Every reply starts with an errno (0: success), which the library raises as OSError;
  a failure of Mach itself stays a MachError.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import struct
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any

from pymach import mach
from pymach.errors import MachError
from pymach.include.mach_defs import TASK_NOTIFY_PORT
from pymach.include.message import (
    MAKE_SEND,
    OOL,
    RCV_TIMEOUT,
    SEND_TIMEOUT,
    Int,
    Message,
    Port,
)
from pymach.include.mig import (
    INT,
    INT_ARRAY,
    PORT,
    PORT_ARRAY,
    PORT_MAKE,
    STR,
    Subsystem,
    serve_message,
)
from pymach.include.vm_param import round_page, trunc_page
from pymach.ipc.ipc_notify import NOTIFY_OVERFLOW, NOTIFY_PORT_DELETED
from pymach.mach_vm import memory, vm_page_size
from pymach.pagers.data_manager import (
    DataManager,
    WindowData,
    release_written,
    written_bytes,
)
from pymach.pagers.fs import FileServer, fs_defs

NINODE = 1024  # inode records in the table
NFILE = 4096  # open file description records in the table
RECORD = 32  # bytes per record: four little-endian int64
INODE_BASE = 0  # inode record: size, generation, 0, 0
FILE_BASE = NINODE * RECORD  # description record: offset, generation, inode, flags
TABLE_BYTES = FILE_BASE + NFILE * RECORD
FILE_SIZE_MAX = 1 << 40  # EFBIG beyond
WHOLE = 1 << 46  # a length covering any object (the kernel clips to the object)
OPEN_FLAGS = os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_APPEND  # flags open looks at

# Messages the server's own threads send to its ports (not part of the interface).
OBJECT_BARRIER = 6890  # to an inode's object: reply once everything before is stored
REAP_OBJECT = 6891  # to the service port: the kernel let go of this object
REAP_HOLDER = 6892  # to the service port: this holder's token port died

unixio_defs = Subsystem("unixio", 6800)
unixio_defs.routine("uio_attach", "server", [("token", PORT_MAKE)],
                    [("errno", INT), ("table", PORT), ("nonce", INT), ("ninode", INT),
                     ("nfile", INT), ("table_size", INT)],
                    "Register a client task (by its token port, whose death closes its "
                    "files); the table object and its layout.")
unixio_defs.routine("uio_open", "server", [("token", PORT), ("path", STR), ("flags", INT),
                                           ("mode", INT)],
                    [("errno", INT), ("file", INT), ("generation", INT), ("inode", INT),
                     ("inode_generation", INT), ("object", PORT_ARRAY)],
                    "Open a file: a new description held by `token`, and the memory "
                    "object of its inode (none on error).")
unixio_defs.routine("uio_object", "server", [("token", PORT), ("inode", INT),
                                             ("inode_generation", INT)],
                    [("errno", INT), ("object", PORT_ARRAY)],
                    "The memory object of an open inode (for a child that inherited it).")
unixio_defs.routine("uio_close", "server", [("token", PORT), ("file", INT),
                                            ("generation", INT)], [("errno", INT)],
                    "Drop one reference of `token` to a description.")
unixio_defs.routine("uio_dup", "server", [("token", PORT), ("files", INT_ARRAY)],
                    [("errno", INT), ("valid", INT_ARRAY)],
                    "One more reference of `token` to each (file, generation) pair that "
                    "is still open; which were.")
unixio_defs.routine("uio_fork", "server", [("token", PORT)], [("errno", INT), ("ticket", INT)],
                    "A ticket holding a copy of every reference of `token`, for a child.")
unixio_defs.routine("uio_adopt", "server", [("token", PORT), ("ticket", INT)],
                    [("errno", INT)], "Move a ticket's references to `token`.")
unixio_defs.routine("uio_drop", "server", [("ticket", INT)], [("errno", INT)],
                    "Release a ticket nobody will adopt.")
unixio_defs.routine("uio_extend", "server", [("token", PORT), ("file", INT),
                                             ("generation", INT), ("end", INT),
                                             ("append", INT)],
                    [("errno", INT), ("start", INT), ("size", INT)],
                    "Grow the file to at least `end`; with append > 0, reserve `append` "
                    "bytes at its end instead (O_APPEND). Where to write, and the size.")
unixio_defs.routine("uio_truncate", "server", [("token", PORT), ("file", INT),
                                               ("generation", INT), ("length", INT)],
                    [("errno", INT)],
                    "Set the file's size (ftruncate).")
unixio_defs.routine("uio_fsync", "server", [("token", PORT), ("file", INT),
                                            ("generation", INT)],
                    [("errno", INT)], "Write the file's changed pages to disk, and sync it.")
unixio_defs.routine("uio_fstat", "server", [("token", PORT), ("file", INT),
                                            ("generation", INT)],
                    [("errno", INT), ("stat", INT_ARRAY)],
                    "st_mode, st_ino, st_dev, st_nlink, st_uid, st_gid, st_size, and the "
                    "access, modification and change times in ns.")
unixio_defs.routine("uio_sync", "server", outs=[("errno", INT)],
                    doc="fsync every open file (sync(2)).")
unixio_defs.routine("uio_stats", "server", outs=[("stats", INT_ARRAY)],
                    doc="Counters: disk reads, disk writes, client requests, kernel "
                        "messages about files, open descriptions, open inodes, bytes read "
                        "and written.")
STAT_NAMES = ("disk_reads", "disk_writes", "requests", "pager_messages", "open_files",
              "inodes", "disk_bytes_read", "disk_bytes_written")


@dataclass
class Inode:
    """An open (or still cached) file: one memory object, one disk descriptor."""

    slot: int
    generation: int
    key: tuple[int, int]  # (st_dev, st_ino)
    path: str
    fd: int
    writable: bool  # fd was opened O_RDWR
    object: int  # the memory object port (receive rights: ours)
    size: int
    opens: int = 0  # descriptions open on it


@dataclass
class OpenFile:
    """An open file description (its offset lives in the table)."""

    generation: int
    inode: int
    flags: int
    refs: int = 0


class UnixFileServer(FileServer):
    """The section 8.1 file server for the files under `root` (see module docstring)."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.nonce = secrets.randbits(62)
        self.service = 0  # the port clients send to (served by the service thread)
        self.table = 0  # the table's memory object, and where we map it
        self.table_address = 0
        self.table_pages: dict[int, bytes] = {}  # table pages written back to us
        self.inodes: dict[int, Inode] = {}
        self.by_key: dict[tuple[int, int], int] = {}
        self.by_object: dict[int, int] = {}
        self.inode_generations = [0] * NINODE
        self.files: dict[int, OpenFile] = {}
        self.file_generations = [0] * NFILE
        self.holders: dict[int, Counter[int]] = {}  # token name or -ticket -> file refs
        self.tickets = 0
        self.disk_writes = self.served = self.pager_messages = 0
        self.bytes_read = self.bytes_written = 0
        self._size_lock = threading.Lock()  # a size change and a clipped disk write
        # exclude each other (held around os calls only, never across a Mach call)

    # -- starting ---------------------------------------------------------------------
    def service_port(self) -> int:
        """The port clients send to (allocated on first call; call from the server's
        task before `serve`)."""
        if not self.service:
            self.service = mach.port_allocate(mach.task_self())
        return self.service

    def serve(self, threads: int | None = None) -> None:
        """Map the table, start the service thread, and serve until `stop()`."""
        me = mach.task_self()
        self.service_port()
        self.table = self.create_memory_object()
        size = round_page(TABLE_BYTES, vm_page_size())
        self.table_address = mach.vm_allocate_with_pager(me, 0, size, True, self.table, 0)
        mach.thread_create(me, self._service_loop)
        super().serve(threads)

    # -- the service thread -----------------------------------------------------------
    def _service_loop(self) -> None:
        while True:
            try:
                msg = mach.msg_receive(self.service)
            except MachError:  # our port is gone: the server is ending
                return
            if msg.id == REAP_OBJECT:
                self._reap_object(_int(msg))
            elif msg.id == REAP_HOLDER:
                self._reap_holder(_int(msg))
            else:
                self._serve_request(msg)

    def _serve_request(self, msg: Message) -> None:
        self.served += 1
        for sub in (unixio_defs, fs_defs):
            if msg.id in sub.routines:
                reply = serve_message(sub, self, msg)
                if reply is not None:
                    with contextlib.suppress(MachError):  # the client may have gone
                        mach.msg_send(reply, SEND_TIMEOUT, 0)
                return

    def _forward(self, msg_id: int, value: int) -> None:
        """Hand an event to the service thread (from another thread of ours)."""
        mach.msg_send(Message(remote_port=self.service, id=msg_id, items=[Int(value)]))

    # -- the table ------------------------------------------------------------------------
    def _put(self, offset: int, *values: int) -> None:
        memory().write(self.table_address + offset, struct.pack(f"<{len(values)}q", *values))

    def _put_inode(self, ino: Inode) -> None:
        self._put(INODE_BASE + ino.slot * RECORD, ino.size, ino.generation)

    def _put_file(self, slot: int, f: OpenFile, offset: int = 0) -> None:
        self._put(FILE_BASE + slot * RECORD, offset, f.generation, f.inode, f.flags)

    # -- the interface (each returns an errno first: see module docstring) ----------------
    def uio_attach(self, server: int, token: int) -> tuple[int, int, int, int, int, int]:
        """A client task registers its token port (see unixio_defs)."""
        self.holders.setdefault(token, Counter())
        return 0, self.table, self.nonce, NINODE, NFILE, round_page(TABLE_BYTES,
                                                                     vm_page_size())

    def uio_open(self, server: int, token: int, path: str, flags: int,
                 mode: int) -> tuple[int, int, int, int, int, list[int]]:
        """Open `path` for `token`: a new description, and its inode's object."""
        ino = None
        try:
            holder = self._holder(token)
            ino = self._inode_for(self._resolve(path), flags, mode)
            if flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY:
                self._truncate(ino, 0)
            slot = self._file_new(ino, flags, holder)
        except OSError as e:
            if ino is not None and not ino.opens:
                self._reap_object(ino.object)
            return _errno(e), 0, 0, 0, 0, []
        f = self.files[slot]
        return 0, slot, f.generation, ino.slot, ino.generation, [ino.object]

    def uio_object(self, server: int, token: int, inode: int,
                   generation: int) -> tuple[int, list[int]]:
        """The memory object of an inode `token` holds a description of."""
        ino = self.inodes.get(inode)
        refs = self.holders.get(token, Counter())
        if ino is None or ino.generation != generation or not any(
                self.files[f].inode == inode for f in refs):
            return errno.EBADF, []
        return 0, [ino.object]

    def uio_close(self, server: int, token: int, file: int, generation: int) -> int:
        """Drop one of `token`'s references to a description."""
        refs = self.holders.get(token)
        if not refs or not refs[file] or self.files[file].generation != generation:
            return errno.EBADF
        self._release(refs, file, 1)
        return 0

    def uio_dup(self, server: int, token: int, files: tuple[int, ...]) -> tuple[int, list[int]]:
        """One more reference of `token` to each still-open (file, generation)."""
        refs = self.holders.get(token)
        if refs is None or len(files) % 2:
            return errno.EINVAL, []
        valid = []
        for file, generation in zip(files[::2], files[1::2], strict=True):
            f = self.files.get(file)
            ok = f is not None and f.generation == generation
            if ok:
                self._take(refs, file, 1)
            valid.append(int(ok))
        return 0, valid

    def uio_fork(self, server: int, token: int) -> tuple[int, int]:
        """A ticket holding a copy of `token`'s references, for a child."""
        refs = self.holders.get(token)
        if refs is None:
            return errno.EINVAL, 0
        self.tickets += 1
        ticket = Counter[int]()
        for file, n in refs.items():
            self._take(ticket, file, n)
        self.holders[-self.tickets] = ticket
        return 0, self.tickets

    def uio_adopt(self, server: int, token: int, ticket: int) -> int:
        """Move a ticket's references to `token` (the child's first call)."""
        refs = self.holders.get(token)
        held = self.holders.get(-ticket) if ticket > 0 else None
        if refs is None or held is None:
            return errno.EINVAL
        del self.holders[-ticket]
        refs.update(held)
        return 0

    def uio_drop(self, server: int, ticket: int) -> int:
        """Release a ticket nobody will adopt."""
        held = self.holders.pop(-ticket, None) if ticket > 0 else None
        if held is None:
            return errno.EINVAL
        for file, n in list(held.items()):
            self._release(held, file, n)
        return 0

    def uio_extend(self, server: int, token: int, file: int, generation: int, end: int,
                   append: int) -> tuple[int, int, int]:
        """Grow the file (to `end`, or by `append` bytes at its end)."""
        f = self._held(token, file, generation)
        if f is None or f.flags & os.O_ACCMODE == os.O_RDONLY:
            return errno.EBADF, 0, 0
        ino = self.inodes[f.inode]
        start = ino.size if append > 0 else end
        new = max(ino.size, start + max(append, 0))
        if not 0 <= new <= FILE_SIZE_MAX:
            return errno.EFBIG, 0, 0
        if new > ino.size:
            try:
                self._set_size(ino, new)
            except OSError as e:
                return _errno(e), 0, 0
        return 0, start, ino.size

    def uio_truncate(self, server: int, token: int, file: int, generation: int,
                     length: int) -> int:
        """ftruncate: the file's new size."""
        f = self._held(token, file, generation)
        if f is None:
            return errno.EBADF
        if f.flags & os.O_ACCMODE == os.O_RDONLY or not 0 <= length <= FILE_SIZE_MAX:
            return errno.EINVAL
        try:
            self._truncate(self.inodes[f.inode], length)
        except OSError as e:
            return _errno(e)
        return 0

    def uio_fsync(self, server: int, token: int, file: int, generation: int) -> int:
        """fsync the description's file (see _sync)."""
        f = self._held(token, file, generation)
        if f is None:
            return errno.EBADF
        try:
            self._sync(self.inodes[f.inode])
        except OSError as e:
            return _errno(e)
        return 0

    def uio_fstat(self, server: int, token: int, file: int,
                  generation: int) -> tuple[int, list[int]]:
        """The disk file's attributes, with the file's size."""
        f = self._held(token, file, generation)
        if f is None:
            return errno.EBADF, []
        ino = self.inodes[f.inode]
        st = os.fstat(ino.fd)
        return 0, [st.st_mode, st.st_ino, st.st_dev, st.st_nlink, st.st_uid, st.st_gid,
                   ino.size, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns]

    def _held(self, token: int, file: int, generation: int) -> OpenFile | None:
        """The description, if `token` holds it (a client may act only on its own)."""
        f = self.files.get(file)
        refs = self.holders.get(token)
        if f is None or f.generation != generation or not refs or not refs[file]:
            return None
        return f

    def uio_sync(self, server: int) -> int:
        """fsync every inode; the first errno met."""
        code = 0
        for ino in list(self.inodes.values()):
            try:
                self._sync(ino)
            except OSError as e:
                code = code or _errno(e)
        return code

    def uio_stats(self, server: int) -> list[int]:
        """The counters named in STAT_NAMES."""
        return [self.disk_reads, self.disk_writes, self.served, self.pager_messages,
                len(self.files), len(self.inodes), self.bytes_read, self.bytes_written]

    # -- names -----------------------------------------------------------------------------
    def _resolve(self, path: str) -> str:
        """The file `path` names: the server's directory is the root of the names
        (a leading "/" and ".." stop there, as under chroot)."""
        if "\0" in path:
            raise OSError(errno.EINVAL, "embedded null byte", path)
        if not path:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        full = os.path.join(self.root, os.path.normpath("/" + path).lstrip("/"))
        real = os.path.realpath(full)
        if real != self.root and not real.startswith(self.root + os.sep):
            raise OSError(errno.EACCES, "outside the server's directory", path)
        return full

    # -- inodes and descriptions --------------------------------------------------------------
    def _inode_for(self, path: str, flags: int, mode: int) -> Inode:
        """The inode `path` opens with `flags` (the OS checks access and existence
        exactly as open(2) would), made and mapped if it is not open yet."""
        access = flags & os.O_ACCMODE
        if access not in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        fd = os.open(path, access | (flags & (os.O_CREAT | os.O_EXCL)) | os.O_NONBLOCK
                     | os.O_CLOEXEC | os.O_NOCTTY, mode & 0o7777)
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise OSError(errno.EISDIR, os.strerror(errno.EISDIR), path)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EOPNOTSUPP, "not a regular file", path)
            slot = self.by_key.get((st.st_dev, st.st_ino))
            if slot is not None:
                ino = self.inodes[slot]
                if access != os.O_RDONLY and not ino.writable:
                    self._upgrade(ino, fd)
                    fd = -1
                return ino
            ino = self._inode_new(path, fd, access, st)
            fd = -1
            return ino
        finally:
            if fd >= 0:
                os.close(fd)

    def _inode_new(self, path: str, fd: int, access: int, st: os.stat_result) -> Inode:
        slot = next((i for i in range(NINODE) if i not in self.inodes), None)
        if slot is None:
            raise OSError(errno.ENFILE, "the server's inode table is full")
        writable = access == os.O_RDWR
        if not writable:  # keep a descriptor that can write back, if the file allows
            with contextlib.suppress(OSError):
                fd = _reopen_rdwr(path, fd, st)
                writable = True
        me = mach.task_self()
        mo = self.create_memory_object()
        mach.port_disable(me, mo)  # received by its own thread, not the default group
        self.inode_generations[slot] += 1
        ino = Inode(slot, self.inode_generations[slot], (st.st_dev, st.st_ino), path, fd,
                    writable, mo, st.st_size)
        self.inodes[slot], self.by_key[ino.key], self.by_object[mo] = ino, slot, slot
        self.fds[mo] = fd
        mach.thread_create(me, self._object_loop, mo)
        self._put_inode(ino)
        return ino

    def _upgrade(self, ino: Inode, fd: int) -> None:
        """Write access to an inode we hold read-only: keep `fd` (opened for write)."""
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != ino.key:
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE), ino.path)
        fd = _reopen_rdwr(ino.path, fd, st)
        old, ino.fd, ino.writable = ino.fd, fd, True
        self.fds[ino.object] = fd
        os.close(old)

    def _file_new(self, ino: Inode, flags: int, holder: Counter[int]) -> int:
        slot = next((i for i in range(NFILE) if i not in self.files), None)
        if slot is None:
            raise OSError(errno.ENFILE, "the server's file table is full")
        self.file_generations[slot] += 1
        f = OpenFile(self.file_generations[slot], ino.slot,
                     flags & (os.O_ACCMODE | os.O_APPEND))
        self.files[slot] = f
        ino.opens += 1
        self._take(holder, slot, 1)
        self._put_file(slot, f)
        return slot

    def _holder(self, token: int) -> Counter[int]:
        refs = self.holders.get(token)
        if refs is None:
            raise OSError(errno.EINVAL, "the client has not attached (uio_attach)")
        return refs

    def _take(self, refs: Counter[int], file: int, n: int) -> None:
        refs[file] += n
        self.files[file].refs += n

    def _release(self, refs: Counter[int], file: int, n: int) -> None:
        """Drop `n` references of one holder; the last one closes the description."""
        refs[file] -= n
        if refs[file] <= 0:
            del refs[file]
        f = self.files[file]
        f.refs -= n
        if f.refs > 0:
            return
        del self.files[file]
        self.file_generations[file] += 1  # stale descriptors in clients fail (EBADF)
        f.generation = self.file_generations[file]
        self._put_file(file, f)
        ino = self.inodes[f.inode]
        ino.opens -= 1
        if not ino.opens and not self.requests(ino.object):
            self._reap_object(ino.object)

    # -- sizes and write-back ----------------------------------------------------------------
    def _set_size(self, ino: Inode, size: int) -> None:
        """The file's size, on disk and in the table. Write-backs stored from now on
        stop at the new end."""
        with self._size_lock:
            os.ftruncate(ino.fd, size)
            ino.size = size
        self._put_inode(ino)

    def _truncate(self, ino: Inode, length: int) -> None:
        """Shrink or grow the file. When it shrinks, the pages from the new end on
        leave every kernel (pager_flush_request: changed ones are written back, clipped
        to the new size) and what is on its way is stored (the barrier) before we
        return, so no old byte comes back if the file grows again."""
        old = ino.size
        self._set_size(ino, length)
        if length < old:
            start = trunc_page(length, vm_page_size())
            for request in self.requests(ino.object):
                with contextlib.suppress(MachError):  # that kernel let go meanwhile
                    mach.pager_flush_request(request, start, WHOLE)
            self._barrier(ino)

    def _sync(self, ino: Inode) -> None:
        """fsync: every changed page goes back (pager_clean_request), is stored (the
        barrier), and the disk file is synced.

        The kernel's clean copies each changed page into a new frame and silently skips
        a page when no frame is free (it stays changed in memory). So a flush follows:
        it sends whatever is still changed by moving the page itself, which needs no
        frame, and drops the file's pages from memory (they are read again from disk).
        """
        for request in self.requests(ino.object):
            with contextlib.suppress(MachError):  # that kernel let go meanwhile
                mach.pager_clean_request(request, 0, WHOLE)
        for request in self.requests(ino.object):
            with contextlib.suppress(MachError):
                mach.pager_flush_request(request, 0, WHOLE)
        self._barrier(ino)
        os.fsync(ino.fd)

    def _barrier(self, ino: Inode) -> None:
        """Return once the object's thread has handled every message queued before."""
        mach.msg_rpc(Message(remote_port=ino.object, local_port=mach.thread_reply(),
                             id=OBJECT_BARRIER))

    # -- an inode's own thread ----------------------------------------------------------------
    def _object_loop(self, mo: int) -> None:
        """Receive the kernel's messages about one inode in order (see module doc)."""
        while True:
            try:
                msg = mach.msg_receive(mo)
            except MachError:  # the object was closed (its port destroyed)
                return
            if msg.id == OBJECT_BARRIER:
                with contextlib.suppress(MachError):
                    mach.msg_send(Message(remote_port=msg.remote_port, id=msg.id + 100),
                                  SEND_TIMEOUT, 0)
                continue
            self.pager_messages += 1
            self._dispatch_one(msg)

    def queue_write(self, mo: int, offset: int, data: OOL | WindowData,
                    data_count: int) -> None:
        """A file's write-back is stored at once, by the object's own thread (the
        order the barrier relies on); the table's go through the base class's queue."""
        if mo not in self.by_object:
            super().queue_write(mo, offset, data, data_count)
            return
        try:
            self.pager_data_write(mo, offset, written_bytes(data, data_count))
        except BaseException:  # (data read from the window are left to the kernel's
            if isinstance(data, OOL):  # deadline, which sends them again)
                release_written(data)
            raise
        release_written(data)

    def pager_data_write(self, memory_object: int, offset: int, data: bytes) -> None:
        """Store written-back pages: a file's on disk (up to its size), the table's here."""
        slot = self.by_object.get(memory_object)
        if memory_object == self.table:
            ps = vm_page_size()
            for at in range(0, len(data), ps):
                self.table_pages[offset + at] = data[at:at + ps]
        elif slot is not None:
            ino = self.inodes[slot]
            with self._size_lock:
                n = max(0, min(len(data), ino.size - offset))
                if n:
                    os.pwrite(ino.fd, data[:n], offset)
            self.disk_writes += bool(n)
            self.bytes_written += n

    def pager_data_request(self, memory_object: int, request: int, offset: int,
                           length: int, access: int) -> None:
        """A file's data comes from disk (the section 4.1 code); the table's from here."""
        if memory_object == self.table:
            DataManager.pager_data_request(self, memory_object, request, offset, length,
                                           access)
        else:
            super().pager_data_request(memory_object, request, offset, length, access)

    def disk_read(self, memory_object: int, offset: int, length: int) -> bytes:
        """The 4.1 server's disk read, counting the bytes too."""
        data = super().disk_read(memory_object, offset, length)
        slot = self.by_object.get(memory_object)
        end = offset + length if slot is None else self.inodes[slot].size
        self.bytes_read += max(0, min(length, end - offset))  # (not the zeros past the end)
        return data

    def read(self, memory_object: int, offset: int, length: int, access: int) -> bytes | None:
        """The table's pages that came back to us (zeros for the others)."""
        ps = vm_page_size()
        pages = [self.table_pages.get(offset + at) for at in range(0, length, ps)]
        if not any(pages):
            return None
        return b"".join(p if p is not None else bytes(ps) for p in pages)

    # -- letting go ---------------------------------------------------------------------------
    def pager_terminate(self, memory_object: int, request: int) -> None:
        """The kernel let go of an object: a file's is reaped by the service thread."""
        if memory_object in self.by_object:
            self._forward(REAP_OBJECT, memory_object)
        elif memory_object != self.table:
            super().pager_terminate(memory_object, request)

    def _reap_object(self, mo: int) -> None:
        """Close an inode nobody has open and no kernel uses, once what is on its way
        has been handled (the barrier: a mapping's pager_init may be queued still)."""
        slot = self.by_object.get(mo)
        if slot is None or self.inodes[slot].opens:
            return
        ino = self.inodes[slot]
        self._barrier(ino)
        if ino.opens or self.requests(mo):
            return
        del self.inodes[slot], self.by_key[ino.key], self.by_object[mo]
        self.inode_generations[slot] += 1
        ino.generation, ino.size = self.inode_generations[slot], 0
        self._put_inode(ino)
        self.fds.pop(mo, None)
        self.uses.pop(mo, None)
        self.mapping.pop(mo, None)
        os.close(ino.fd)
        mach.port_deallocate(mach.task_self(), mo)  # its thread's receive ends it

    def _notification(self, msg: Message) -> None:
        """A client's token died: its references go (forwarded to the service thread)."""
        super()._notification(msg)
        if msg.id == NOTIFY_PORT_DELETED and _int(msg) in self.holders:
            self._forward(REAP_HOLDER, _int(msg))
        elif msg.id == NOTIFY_OVERFLOW:
            for name in mach.names_gone([h for h in list(self.holders) if h > 0]):
                self._forward(REAP_HOLDER, name)

    def _reap_holder(self, token: int) -> None:
        if token <= 0 or token not in self.holders or not mach.names_gone([token]):
            return  # a live client's token is never reaped
        refs = self.holders.pop(token)
        for file, n in list(refs.items()):
            self._release(refs, file, n)


def _reopen_rdwr(path: str, fd: int, st: os.stat_result) -> int:
    """A read-write descriptor of the same file as `fd` (which it closes), or OSError."""
    rw = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    st2 = os.fstat(rw)
    if (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino):
        os.close(rw)
        raise OSError(errno.ESTALE, os.strerror(errno.ESTALE), path)
    os.close(fd)
    return rw


def _errno(e: OSError) -> int:
    return e.errno or errno.EIO


def _int(msg: Message) -> int:
    """The value of a message's first item if it is an Int (0 otherwise)."""
    item = msg.items[0] if msg.items else None
    return item.value if isinstance(item, Int) else 0


def _port(msg: Message) -> int:
    """The name in a message's first item, which must be a port right."""
    item = msg.items[0] if msg.items else None
    if not isinstance(item, Port):
        raise MachError("MIG_TYPE_ERROR", "expected a message carrying a port right")
    return item.name


# -- starting a server in a task of its own -----------------------------------------------------

def _server_main(root: str) -> None:
    server = UnixFileServer(root)
    port = server.service_port()
    inbox = _port(mach.msg_receive(mach.task_notify(), RCV_TIMEOUT, 30_000))
    mach.msg_send(Message(remote_port=inbox, items=[Port(port, MAKE_SEND)]))
    server.serve()


def start_server(root: str, name: str = "unixio") -> tuple[Any, int]:
    """Start a UnixFileServer for `root` in a new task (a process in native mode);
    (its handle, a send right to its port). Works in both modes (pymach.spawn)."""
    me = mach.task_self()
    inbox = mach.port_allocate(me)
    handle = mach.spawn(_server_main, os.path.abspath(root), name=name)
    notify = mach.task_get_special_port(handle.port, TASK_NOTIFY_PORT)
    mach.msg_send(Message(remote_port=notify, items=[Port(inbox, MAKE_SEND)]))
    try:
        reply = mach.msg_receive(inbox, RCV_TIMEOUT, 30_000)
    finally:
        mach.port_deallocate(me, inbox)
    return handle, _port(reply)
