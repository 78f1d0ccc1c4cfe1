"""userfaultfd(2) from Python (ctypes): create, register, read faults, resolve them.

machd holds the userfaultfd of every native task and resolves all their faults itself
(../shared/DESIGN.md: a faulting thread holds its interpreter lock, so a process can
never serve its own faults). The operations used:

- `Uffd.create()` makes a userfaultfd with the features machd needs (thread ids,
  missing, write-protect and minor faults on shared memory);
- `register(start, length, modes)` arms a range of a task's MAP_SHARED memfd mapping;
- `read_events()` returns pending page faults (address, flags, thread id);
- `copy` (UFFDIO_COPY) fills a missing page, `cont` (UFFDIO_CONTINUE) maps a page that
  is already in the memfd, `zeropage`, `writeprotect` (set or clear), `wake`.

All of these act on the task's address space although they run in machd. `probe()`
says whether this machine allows userfaultfd, and why not.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from dataclasses import dataclass

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.restype = ctypes.c_int
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]

SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282}.get(os.uname().machine, 323)
O_CLOEXEC, O_NONBLOCK = os.O_CLOEXEC, os.O_NONBLOCK
UFFD_USER_MODE_ONLY = 1
UFFD_API = 0xAA

FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
FEATURE_MISSING_HUGETLBFS = 1 << 4
FEATURE_MISSING_SHMEM = 1 << 5
FEATURE_THREAD_ID = 1 << 8
FEATURE_MINOR_HUGETLBFS = 1 << 9
FEATURE_MINOR_SHMEM = 1 << 10
FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
BASE_FEATURES = (FEATURE_PAGEFAULT_FLAG_WP | FEATURE_MISSING_SHMEM | FEATURE_THREAD_ID
                 | FEATURE_MINOR_SHMEM | FEATURE_WP_HUGETLBFS_SHMEM)
WANTED_FEATURES = BASE_FEATURES | FEATURE_MISSING_HUGETLBFS | FEATURE_MINOR_HUGETLBFS
# (the hugetlbfs ones serve machd's 2 MiB pages; a kernel without them gets BASE_FEATURES)

MODE_MISSING, MODE_WP, MODE_MINOR = 1 << 0, 1 << 1, 1 << 2
COPY_MODE_DONTWAKE, COPY_MODE_WP = 1 << 0, 1 << 1
WP_MODE_WP, WP_MODE_DONTWAKE = 1 << 0, 1 << 1
CONTINUE_MODE_DONTWAKE, CONTINUE_MODE_WP = 1 << 0, 1 << 1

FLAG_WRITE, FLAG_WP, FLAG_MINOR = 1 << 0, 1 << 1, 1 << 2
EVENT_PAGEFAULT = 0x12
MSG_SIZE = 32


def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (0xAA << 8) | nr


def _ior(nr: int, size: int) -> int:
    return (2 << 30) | (size << 16) | (0xAA << 8) | nr


UFFDIO_API = _iowr(0x3F, 24)
UFFDIO_REGISTER = _iowr(0x00, 32)
UFFDIO_UNREGISTER = _ior(0x01, 16)
UFFDIO_WAKE = _ior(0x02, 16)
UFFDIO_COPY = _iowr(0x03, 40)
UFFDIO_ZEROPAGE = _iowr(0x04, 32)
UFFDIO_WRITEPROTECT = _iowr(0x06, 24)
UFFDIO_CONTINUE = _iowr(0x07, 32)
USERFAULTFD_IOC_NEW = (0xAA << 8) | 0x00


class UffdError(OSError):
    """A userfaultfd call failed; `errno` says why."""


@dataclass(frozen=True)
class Fault:
    """One page fault read from a userfaultfd."""

    address: int
    flags: int
    tid: int

    @property
    def write(self) -> bool:
        """The access was a write."""
        return bool(self.flags & FLAG_WRITE)

    @property
    def wp(self) -> bool:
        """A write to a write-protected page."""
        return bool(self.flags & FLAG_WP)

    @property
    def minor(self) -> bool:
        """The page is in the memfd, just not mapped in this task."""
        return bool(self.flags & FLAG_MINOR)


def _ioctl(fd: int, request: int, buf: ctypes.Array[ctypes.c_char]) -> None:
    if _libc.ioctl(fd, request, buf) < 0:
        e = ctypes.get_errno()
        raise UffdError(e, f"userfaultfd ioctl {request:#x}: {os.strerror(e)}")


def _new_fd(flags: int) -> int:
    """A userfaultfd: by the syscall, else through /dev/userfaultfd."""
    fd = _libc.syscall(SYS_USERFAULTFD, flags)
    if fd >= 0:
        return int(fd)
    first = ctypes.get_errno()
    try:
        dev = os.open("/dev/userfaultfd", os.O_RDWR | O_CLOEXEC)
    except OSError:
        raise UffdError(first, f"userfaultfd: {os.strerror(first)}") from None
    try:
        fd = _libc.ioctl(dev, USERFAULTFD_IOC_NEW, ctypes.c_void_p(flags))
        if fd < 0:
            e = ctypes.get_errno()
            raise UffdError(e, f"/dev/userfaultfd: {os.strerror(e)}")
        return int(fd)
    finally:
        os.close(dev)


class Uffd:
    """One userfaultfd (one task's address space). Methods are safe from any thread."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def create(cls, features: int = WANTED_FEATURES) -> Uffd:
        """A new userfaultfd for the calling process, with the API handshake done."""
        try:
            return cls._handshake(features)
        except UffdError as e:
            if e.errno != errno.EINVAL or features == features & BASE_FEATURES:
                raise
            return cls._handshake(features & BASE_FEATURES)  # an older kernel

    @classmethod
    def _handshake(cls, features: int) -> Uffd:
        fd = _new_fd(O_CLOEXEC | O_NONBLOCK)
        buf = ctypes.create_string_buffer(struct.pack("QQQ", UFFD_API, features, 0), 24)
        try:
            _ioctl(fd, UFFDIO_API, buf)
        except UffdError:
            os.close(fd)
            raise
        return cls(fd)

    def close(self) -> None:
        """Close the descriptor (faults still waiting then fail with SIGBUS)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def register(self, start: int, length: int, modes: int) -> int:
        """Arm [start, start+length) of the task for `modes`; returns the ioctls allowed."""
        buf = ctypes.create_string_buffer(struct.pack("QQQQ", start, length, modes, 0), 32)
        _ioctl(self.fd, UFFDIO_REGISTER, buf)
        return int(struct.unpack_from("Q", buf.raw, 24)[0])

    def unregister(self, start: int, length: int) -> None:
        """Disarm a range."""
        _ioctl(self.fd, UFFDIO_UNREGISTER,
               ctypes.create_string_buffer(struct.pack("QQ", start, length), 16))

    def read_events(self) -> list[Fault]:
        """The page faults waiting to be read (none if there are none)."""
        try:
            data = os.read(self.fd, MSG_SIZE * 64)
        except BlockingIOError:
            return []
        faults = []
        for off in range(0, len(data), MSG_SIZE):
            event = data[off]
            if event == EVENT_PAGEFAULT:
                flags, address, tid = struct.unpack_from("QQI", data, off + 8)
                faults.append(Fault(address, flags, tid))
        return faults

    def copy(self, dst: int, src: int, length: int, wp: bool = False,
             wake: bool = True) -> bool:
        """UFFDIO_COPY: fill missing pages at `dst` from machd's memory at `src`."""
        mode = (COPY_MODE_WP if wp else 0) | (0 if wake else COPY_MODE_DONTWAKE)
        return self._retry(UFFDIO_COPY, struct.pack("QQQQq", dst, src, length, mode, 0), 40)

    def zeropage(self, start: int, length: int, wake: bool = True) -> bool:
        """UFFDIO_ZEROPAGE: fill missing pages with zeros."""
        mode = 0 if wake else COPY_MODE_DONTWAKE
        return self._retry(UFFDIO_ZEROPAGE, struct.pack("QQQq", start, length, mode, 0), 32)

    def cont(self, start: int, length: int, wp: bool = False, wake: bool = True) -> bool:
        """UFFDIO_CONTINUE: map pages that are already in the memfd. False if they were
        mapped already (EEXIST)."""
        mode = (CONTINUE_MODE_WP if wp else 0) | (0 if wake else CONTINUE_MODE_DONTWAKE)
        return self._retry(UFFDIO_CONTINUE, struct.pack("QQQq", start, length, mode, 0), 32)

    def writeprotect(self, start: int, length: int, protect: bool, wake: bool = True) -> None:
        """Set or clear write protection of a range (clearing wakes faulting threads
        unless `wake` is False; setting never wakes, and the kernel refuses DONTWAKE
        with it)."""
        mode = WP_MODE_WP if protect else (0 if wake else WP_MODE_DONTWAKE)
        buf = ctypes.create_string_buffer(struct.pack("QQQ", start, length, mode), 24)
        _ioctl(self.fd, UFFDIO_WRITEPROTECT, buf)

    def wake(self, start: int, length: int) -> None:
        """Wake threads waiting on faults in the range (they fault again)."""
        _ioctl(self.fd, UFFDIO_WAKE,
               ctypes.create_string_buffer(struct.pack("QQ", start, length), 16))

    def _retry(self, request: int, payload: bytes, size: int) -> bool:
        """Run a filling ioctl; False if the pages were there already (EEXIST)."""
        buf = ctypes.create_string_buffer(payload, size)
        while True:
            try:
                _ioctl(self.fd, request, buf)
                return True
            except UffdError as e:
                if e.errno == errno.EEXIST:
                    return False
                if e.errno != errno.EAGAIN:
                    raise


def probe() -> str:
    """'' if userfaultfd works here for shared memory, else the reason and the fix."""
    try:
        u = Uffd.create()
    except UffdError as e:
        if e.errno in (errno.EPERM, errno.EACCES):
            return ("userfaultfd is not allowed for this user: run machd as root, or set "
                    "vm.unprivileged_userfaultfd=1 (sysctl), or give read-write access to "
                    "/dev/userfaultfd")
        if e.errno == errno.ENOSYS:
            return "this kernel has no userfaultfd (CONFIG_USERFAULTFD is off)"
        return f"userfaultfd failed: {e}"
    except (OSError, AttributeError) as e:
        return f"userfaultfd failed: {e}"
    u.close()
    return ""


_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def allocate(fd: int, offset: int, length: int) -> None:
    """Give [offset, offset+length) of a memfd pages (zeros where it had none); the
    error (ENOSPC: no huge pages left) comes here, not as a SIGBUS at first touch."""
    _fallocate(fd, 0, offset, length, "fallocate")


def _fallocate(fd: int, mode: int, offset: int, length: int, what: str) -> None:
    """fallocate(2), started again when a signal interrupts it (as os calls are, PEP
    475: zeroing huge pages takes long enough to be interrupted); UffdError else."""
    while _libc.fallocate(fd, mode, offset, length) < 0:
        e = ctypes.get_errno()
        if e != errno.EINTR:
            raise UffdError(e, f"{what}: {os.strerror(e)}")


def reopen(fd: int, writable: bool) -> int:
    """A new descriptor (close-on-exec) of the file `fd` names, read-write or read-only,
    with an open file description of its own: what a task is handed, so that nothing it
    does to its descriptor's status flags (O_APPEND, which makes every pwrite append)
    reaches machd's."""
    return os.open(f"/proc/self/fd/{fd}",
                   (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Drop [offset, offset+length) of a memfd: the pages leave every mapping, and the
    next access is a missing fault again."""
    _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length,
               "fallocate(PUNCH_HOLE)")
