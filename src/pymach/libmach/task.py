"""Inside a native task's process: attaching to machd, traps, mappings, threads.

`attach()` makes the calling process a task of the running machd and the calling
Python thread its first Mach thread; from then on the whole pymach API works in this
process as in the embedded kernel (the traps go over the thread's connection). The
process:

- reserves its address-space window (PROT_NONE) and makes its userfaultfd, which it
  hands to machd: machd serves every page fault of the process;
- applies the address-space changes each trap reply carries, before returning from
  the trap, in the order machd issued them (threads of the task wait for batches
  other threads took first): it maps memory objects' memfds MAP_SHARED at their
  regions (and registers them with the userfaultfd), unmaps, and changes protections.
  Only the process can change its own mappings (../shared/DESIGN.md);
- keeps a control connection, on which machd asks it to start threads (thread_create)
  or to die (task_terminate, a memory error); if machd itself dies, that connection
  closes and the process exits with a message instead of hanging.

`NativeProcess` state is changed under its `lock`; each `NativeThread` and its
connection belong to one Python thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
import uuid
from typing import Any

import cloudpickle

from pymach.errors import MachError, ThreadTerminated
from pymach.include.message import Bytes, Code, Message
from pymach.include.vm_param import VM_PROT_READ, VM_PROT_WRITE
from pymach.kern.thread import set_current_thread
from pymach.libmach.ranges import Ranges
from pymach.machd.protocol import DEFAULT_SOCKET, Connection, Disconnected, close_fds
from pymach.pmap.native_map import WINDOW_BASE, WINDOW_SIZE
from pymach.pmap.uffd import MODE_MINOR, MODE_MISSING, MODE_WP, Uffd

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
PROT_NONE, PROT_READ, PROT_WRITE = 0, 1, 2
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x01, 0x02, 0x10, 0x20
MAP_NORESERVE, MAP_FIXED_NOREPLACE = 0x4000, 0x100000
MAP_FAILED = ctypes.c_void_p(-1).value
EXIT_MACHD_DIED, EXIT_KILLED = 3, 70


def _mmap(addr: int, length: int, prot: int, flags: int, fd: int = -1, offset: int = 0) -> int:
    got = _libc.mmap(addr, length, prot, flags, fd, offset)
    if got in (None, MAP_FAILED):
        e = ctypes.get_errno()
        raise MachError("KERN_NO_SPACE", f"mmap at {addr:#x}: {os.strerror(e)}")
    return int(got)


class NativeProcess:
    """This process as a native task (see module docstring)."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.lock = threading.Lock()
        self.applied = threading.Condition(self.lock)  # notified when a batch is applied
        # or a thread ends
        self.batches_applied = 0  # (lock) machd numbers its instruction batches 1, 2, ...
        self.threads_running = 0  # (lock) threads made by thread_create, still running
        self.uffd = Uffd.create()
        self.ranges = Ranges()  # (lock) what is mapped now, with its protection
        self.task_serial = 0
        self.task_name = ""
        self.page_size = 4096
        self.detaching = False
        self.control: Connection | None = None
        self.task_port = 0  # this task's name for its own task port
        self.local_code: dict[str, Code] = {}  # thread_create on our own task: shared
        _mmap(WINDOW_BASE, WINDOW_SIZE, PROT_NONE,
              MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE)

    def hello(self, conn: Connection, request: dict[str, Any], with_uffd: bool) -> Any:
        """Send a connection's first frame; returns machd's welcome."""
        request.update(pid=os.getpid(), tid=threading.get_native_id(), sys_path=sys.path,
                       cwd=os.getcwd(), main=getattr(sys.modules["__main__"], "__file__", ""))
        conn.send(request, [self.uffd.fd] if with_uffd else [])
        reply, fds = conn.recv()
        return _result(self, reply, fds)

    # -- address-space changes --------------------------------------------------------
    def apply(self, reply: dict[str, Any], fds: list[int]) -> None:
        """Apply machd's instructions in a trap reply (see module docstring), in machd's
        batch order, and return only once every batch issued before this reply is
        applied (another thread may be applying an earlier one); close the fds."""
        batch, upto = reply.get("batch", (0, 0))
        try:
            with self.applied:
                if batch:
                    self.applied.wait_for(lambda: self.batches_applied == batch - 1)
                    for ins in reply.get("maps", ()):
                        self._apply_one(ins, fds)
                    self.batches_applied = batch
                    self.applied.notify_all()
                self.applied.wait_for(lambda: self.batches_applied >= upto)
        finally:
            close_fds(fds)

    def _apply_one(self, ins: tuple[Any, ...], fds: list[int]) -> None:
        kind, start, length = ins[0], ins[1], ins[2]
        if kind == "map":
            _mmap(start, length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fds[ins[3]],
                  ins[4])
            self.uffd.register(start, length, MODE_MISSING | MODE_WP | MODE_MINOR)
            self._protect(start, length, ins[5])
        elif kind == "unmap":
            _mmap(start, length, PROT_NONE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED)
            self.ranges.remove(start, start + length)
        elif kind == "protect":
            self._protect(start, length, ins[3])

    def _protect(self, start: int, length: int, prot: int) -> None:
        """Record a range's protection; without read access nothing may touch it (write
        access is enforced by machd, which write-protects pages through the uffd)."""
        if not prot & VM_PROT_READ:
            _libc.mprotect(ctypes.c_void_p(start), ctypes.c_size_t(length), PROT_NONE)
        elif self.ranges.protections(start, start + length) != [prot]:
            _libc.mprotect(ctypes.c_void_p(start), ctypes.c_size_t(length),
                           PROT_READ | PROT_WRITE)
        self.ranges.set(start, start + length, prot)

    def check_access(self, address: int, size: int, access: int) -> None:
        """Refuse, as the embedded kernel does, an access memory() is about to make:
        KERN_INVALID_ADDRESS if part of the range is unmapped, KERN_PROTECTION_FAILURE
        if its protection lacks `access` (a VM_PROT_* mask)."""
        with self.lock:
            prots = self.ranges.protections(address, address + size) if size else []
        if prots is None:
            raise MachError("KERN_INVALID_ADDRESS", f"{address:#x}+{size:#x} is not mapped "
                            f"in this task")
        if any(access & ~p for p in prots):
            raise MachError("KERN_PROTECTION_FAILURE", f"{address:#x}+{size:#x} does not "
                            f"allow {'write' if access & VM_PROT_WRITE else 'read'} access")

    # -- the control connection ---------------------------------------------------------
    def start_control(self) -> None:
        """Open the control connection and serve it in a daemon thread."""
        conn = Connection.connect(self.socket_path)
        conn.send({"op": "control", "task": self.task_serial, "pid": os.getpid()},
                  _stdio())
        conn.recv()
        self.control = conn
        threading.Thread(target=self._control, args=(conn,), daemon=True,
                         name="pymach.control").start()

    def check_machd(self) -> None:
        """After a lost connection: if machd itself is gone, exit with a clear message
        (as the control thread does) rather than end just this thread."""
        if self.detaching:
            return
        try:
            conn = Connection.connect(self.socket_path)
            conn.sock.settimeout(5)  # a dying machd may still accept, but never answers
            conn.send({"op": "ping"})
            conn.recv()
            conn.close()
        except (OSError, Disconnected):
            _die(f"pymach: machd went away; task {self.task_name!r} exits", EXIT_MACHD_DIED)

    def _control(self, conn: Connection) -> None:
        while True:
            try:
                request, fds = conn.recv()
            except Disconnected:
                if self.detaching:
                    return
                self.check_machd()
                return  # machd lives: it is ending this task, and says so elsewhere
            close_fds(fds)
            if request.get("op") == "start_thread":
                threading.Thread(target=run_thread, args=(self, request["token"]),
                                 daemon=True, name="mach-thread").start()
            elif request.get("op") == "die":  # machd has written why to our stderr
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                os._exit(EXIT_KILLED if request.get("why") else 0)  # "": we ended ourselves


class _KernelInfo:
    """What task code asks of `thread.kernel` in a native process."""

    def __init__(self, process: NativeProcess) -> None:
        self.page_size = process.page_size


class NativeThread:
    """A Mach thread of this process: its traps go over its own connection to machd."""

    native = True

    def __init__(self, process: NativeProcess, conn: Connection, name: str) -> None:
        self.process = process
        self.conn = conn
        self.name = name
        self.task = process
        self.kernel = _KernelInfo(process)

    def trap(self, op: str, *args: Any) -> Any:
        """Run a trap in machd as this thread; returns its result or raises its error."""
        if op in ("msg_send", "msg_rpc"):
            args = (_portable(self.process, args[0]), *args[1:])
        try:
            self.conn.send({"op": op, "args": args})
            reply, fds = self.conn.recv()
        except Disconnected:
            self.process.check_machd()
            raise ThreadTerminated() from None  # machd ended this thread
        result = _result(self.process, reply, fds)
        return _callable_code(result) if op in ("msg_receive", "msg_rpc") else result

    def share_stdio(self) -> None:
        """Give machd this process's current stdout and stderr: the processes of tasks
        it creates next write there (as a forked child would)."""
        self.conn.send({"op": "stdio"}, _stdio())
        _result(self.process, *self.conn.recv())

    def exit(self, result: Any) -> None:
        """Tell machd this thread is done."""
        with contextlib.suppress(Disconnected):
            self.conn.send({"op": "exit", "result": _picklable(result)})
        self.conn.close()


def _result(process: NativeProcess, reply: dict[str, Any], fds: list[int]) -> Any:
    process.apply(reply, fds)
    if reply.get("terminated"):
        raise ThreadTerminated()
    if "err" in reply:
        raise MachError(*reply["err"])
    return reply.get("ok")


def _portable(process: NativeProcess, msg: Any) -> Any:
    """A message whose items can travel to machd: byte items become bytes, and for Code
    items, for a thread of our own task the callable stays here (threads of a task
    share its objects) and only a key travels; for another task it is pickled by value."""
    if not isinstance(msg, Message) or not any(isinstance(i, Code | Bytes) for i in msg.items):
        return msg
    own = msg.remote_port == process.task_port

    def travel(code: Code) -> Code:
        if code.blob is not None:
            return code
        if own:
            key = uuid.uuid4().hex
            process.local_code[key] = code
            return Code(None, blob=b"local:" + key.encode())
        return Code(None, blob=_pickle_code(code))

    def portable(item: Any) -> Any:
        if isinstance(item, Code):
            return travel(item)
        if isinstance(item, Bytes) and isinstance(item.value, bytearray | memoryview):
            return Bytes(bytes(item.value))
        return item

    items = [portable(i) for i in msg.items]
    return Message(msg.remote_port, msg.local_port, msg.id, items, msg.local_disposition)


def _callable_code(msg: Any) -> Any:
    """A received message whose Code items (pickled by their sender) are callable here;
    one that cannot be loaded here stays a blob (its `fn` is None)."""
    if not isinstance(msg, Message) or not any(isinstance(i, Code) and i.fn is None
                                               for i in msg.items):
        return msg
    for n, item in enumerate(msg.items):
        if isinstance(item, Code) and item.fn is None and item.blob is not None:
            with contextlib.suppress(Exception):
                fn, args, kwargs = _unpickle_code(item.blob)
                msg.items[n] = Code(fn, args, kwargs)
    return msg


def _pickle_code(code: Code) -> bytes:
    """The callable and arguments, pickled by value, with this process's module path
    (what the other process needs to import what they refer to)."""
    inner = cloudpickle.dumps((code.fn, code.args, code.kwargs))
    blob: bytes = cloudpickle.dumps((list(sys.path), inner))
    return blob


def _unpickle_code(blob: bytes) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    path, inner = cloudpickle.loads(blob)
    sys.path.extend(p for p in path if p not in sys.path)
    fn, args, kwargs = cloudpickle.loads(inner)
    return fn, args, kwargs


def _load_code(process: NativeProcess, blob: bytes) -> tuple[Any, tuple[Any, ...],
                                                             dict[str, Any]]:
    if blob.startswith(b"local:"):
        code = process.local_code.pop(blob[6:].decode())
        assert code.fn is not None
        return code.fn, code.args, code.kwargs
    return _unpickle_code(blob)


def _picklable(value: Any) -> Any:
    try:
        cloudpickle.dumps(value)
    except Exception:  # a result we cannot carry: say what it was
        return repr(value)
    return value


def _stdio() -> list[int]:
    """This process's stdout and stderr descriptors (for its children), if both open."""
    try:
        for fd in (1, 2):
            os.fstat(fd)
    except OSError:
        return []
    return [1, 2]


def _die(text: str, status: int) -> None:
    print(text, file=sys.stderr, flush=True)
    os._exit(status)


_process: NativeProcess | None = None


def attached() -> NativeProcess | None:
    """This process as a native task, or None if it is not one."""
    return _process


def attach(socket_path: str | None = None, name: str = "") -> NativeThread:
    """Make this process a new task of machd and this thread its first Mach thread."""
    global _process
    if _process is not None:
        raise MachError("KERN_FAILURE", "this process is already a native task")
    path = socket_path or os.environ.get("PYMACH_SOCKET", DEFAULT_SOCKET)
    process = NativeProcess(path)
    try:
        conn = Connection.connect(path)
    except OSError as e:
        raise MachError("KERN_FAILURE", f"no machd at {path} ({e.strerror}): start one with "
                        f"`pymach machd`") from None
    welcome = process.hello(conn, {"op": "attach", "name": name}, with_uffd=True)
    return _become(process, conn, welcome)


def _become(process: NativeProcess, conn: Connection, welcome: dict[str, Any]) -> NativeThread:
    global _process
    process.task_serial, process.task_name = welcome["task"], welcome["task_name"]
    process.page_size = welcome["page_size"]
    _process = process
    process.start_control()
    thread = NativeThread(process, conn, welcome["thread"])
    set_current_thread(thread)  # type: ignore[arg-type]
    process.task_port = thread.trap("task_self")
    return thread


def detach() -> None:
    """Stop being a native task: machd terminates the task, the process goes on (used
    by tests, which attach a fresh task for each test)."""
    global _process
    process = _process
    if process is None:
        return
    process.detaching = True
    if process.control is not None:
        with contextlib.suppress(Disconnected):
            process.control.send({"op": "detach"})
            process.control.recv()  # machd closes it once the task is gone
    process.uffd.close()  # wakes threads stuck in a fault: they see plain memory now
    with process.applied:  # and end at their next trap (the task is gone)
        process.applied.wait_for(lambda: process.threads_running == 0, DETACH_WAIT_S)
    _libc.munmap(ctypes.c_void_p(WINDOW_BASE), ctypes.c_size_t(WINDOW_SIZE))
    _process = None
    set_current_thread(None)


DETACH_WAIT_S = 5.0  # how long detach waits for the task's other threads to end


def run_thread(process: NativeProcess, token: str, first: bool = False) -> None:
    """A thread made by thread_create: connect, run its code, report its result."""
    with process.applied:
        process.threads_running += 1
    try:
        _run_thread(process, token, first)
    finally:
        with process.applied:
            process.threads_running -= 1
            process.applied.notify_all()


def _run_thread(process: NativeProcess, token: str, first: bool) -> None:
    conn = Connection.connect(process.socket_path)
    welcome = process.hello(conn, {"op": "thread", "token": token, "first": first},
                            with_uffd=first)
    thread = _become(process, conn, welcome) if first else NativeThread(
        process, conn, welcome["thread"])
    set_current_thread(thread)  # type: ignore[arg-type]
    result: Any = None
    try:
        fn, args, kwargs = _load_code(process, welcome["code"])
        result = fn(*args, **kwargs)
    except ThreadTerminated:
        pass
    except BaseException as e:  # reported, never lost (as for embedded threads)
        print(f"pymach: thread {thread.name} of task {process.task_name!r} raised {e!r}",
              file=sys.stderr, flush=True)
        result = e
    finally:
        thread.exit(result)
        set_current_thread(None)
