"""Interface definitions, our MIG: declare a subsystem once, get client stubs and a server.

A `Subsystem` has a base message id; each `routine` gets the next id and a list of typed
in and out arguments. The first argument of every routine is the port the request goes
to (MIG's target). From the declaration:

- `Subsystem.stub(name)` is the client function: it checks argument types (raising
  KERN_INVALID_ARGUMENT before anything is sent), builds the request, calls `msg_rpc` on
  the thread's reply port, checks the reply (MIG_REPLY_MISMATCH, MIG_TYPE_ERROR), raises
  the server's error code as a `MachError`, and returns the out arguments.
- `Subsystem.demux(impl, msg_id, target, items)` is the server side: it decodes and checks
  a request, calls ``impl.<routine>(target, *ins)``, and returns the reply items. A
  `MachError` from the implementation becomes the reply's return code; any other
  exception (a bug in the server) is logged and becomes KERN_FAILURE, so a bad request
  cannot kill the server's thread.

Replies have id ``request id + 100`` and start with an Int return code; an error reply
also carries a Str detail. The same definitions serve the kernel's own interfaces (where
port arguments arrive as kernel port objects) and user servers (where they are names).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pymach.errors import MachError, code_name
from pymach.include.message import (
    INT64_MAX,
    INT64_MIN,
    OOL,
    Bytes,
    Code,
    Disposition,
    Float,
    Int,
    IntArray,
    Item,
    Message,
    Port,
    PortArray,
    Str,
)
from pymach.ipc.kmsg import KOOL, KPort, KPortArray
from pymach.ipc.port import Port as KernelPort

REPLY_ID_OFFSET = 100
log = logging.getLogger("pymach")


@dataclass(frozen=True)
class ArgType:
    """How one argument travels: its item class and the Python values it accepts."""

    name: str
    items: tuple[type, ...]  # item classes accepted on the server side
    accepts: tuple[type, ...]  # Python types accepted by the client stub
    disposition: Disposition | None = None  # for port arguments

    def to_item(self, value: Any) -> Any:
        """Build the request or reply item for `value`."""
        if self.disposition is not None:
            if isinstance(value, KernelPort) or value is None:
                return KPort(value, Disposition.MOVE_SEND)  # from the kernel's server
            if isinstance(value, tuple | list) and value and all(
                    v is None or isinstance(v, KernelPort) for v in value):
                return KPortArray(list(value), Disposition.MOVE_SEND)  # from the kernel
            if isinstance(value, tuple | list):
                return PortArray(tuple(value), self.disposition)
            return Port(value, self.disposition)
        if self.name == "code":
            return value if isinstance(value, Code) else Code(value)
        if self.name in ("data", "memory"):
            return _data_item(value)
        if self.name == "int_array":
            return IntArray(tuple(value))
        cls = {"int": Int, "bool": Int, "float": Float, "str": Str, "bytes": Bytes}[self.name]
        return cls(value)

    def from_item(self, item: Any) -> Any:
        """The Python value an item stands for, on either side."""
        if isinstance(item, Port):
            return item.name
        if isinstance(item, KPort):
            return item.port
        if isinstance(item, PortArray):
            return item.names
        if isinstance(item, KPortArray):
            return item.ports
        if isinstance(item, IntArray):
            return item.values
        if isinstance(item, Code | OOL):
            return item
        if isinstance(item, KOOL):
            return item.copy
        return bool(item.value) if self.name == "bool" else item.value

    def check(self, routine: str, arg: str, value: Any) -> None:
        """Raise KERN_INVALID_ARGUMENT unless the client's `value` fits this type."""
        if not _fits(self.name, value, self.accepts):
            raise MachError("KERN_INVALID_ARGUMENT", f"{routine}: {arg} must be "
                            f"{self.name}, not {value!r:.60}")


def _is_int64(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and INT64_MIN <= v <= INT64_MAX


def _fits(kind: str, value: Any, accepts: tuple[type, ...]) -> bool:
    """True if a client value is acceptable for an argument of type `kind`."""
    if kind in ("int", "port"):
        return _is_int64(value)
    if kind == "float":
        return isinstance(value, accepts) and not isinstance(value, bool)
    if kind in ("int_array", "port_array"):
        return isinstance(value, tuple | list) and all(_is_int64(v) for v in value)
    return isinstance(value, accepts)


def _data_item(value: Any) -> Any:
    """The item for out-of-line data: a kernel copy, a task's region, or Python bytes."""
    if isinstance(value, OOL | KOOL):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return OOL(data=bytes(value))
    return KOOL(value)  # a VmMapCopy made by the kernel


INT = ArgType("int", (Int,), (int,))
BOOL = ArgType("bool", (Int,), (bool, int))
FLOAT = ArgType("float", (Float,), (float, int))
STR = ArgType("str", (Str,), (str,))
BYTES = ArgType("bytes", (Bytes,), (bytes, bytearray, memoryview))
INT_ARRAY = ArgType("int_array", (IntArray,), (tuple, list))
CODE = ArgType("code", (Code,), (Code,))
# Out-of-line data: a client passes bytes (sent by value) or an OOL region of its own
# memory; a user server gets the OOL item (address, size in its space); the kernel gets
# the copy in transit; a client stub's reply value is the bytes (see _unpack_reply).
DATA = ArgType("data", (OOL, KOOL), (bytes, bytearray, memoryview, OOL))
# Out-of-line memory that stays memory: like DATA, but a client stub's reply value is the
# OOL item itself (new memory in the caller's address space), as fs_read_file returns.
MEMORY = ArgType("memory", (OOL, KOOL), (bytes, bytearray, memoryview, OOL))
PORT = ArgType("port", (Port, KPort), (int,), Disposition.COPY_SEND)  # a send right
PORT_MAKE = ArgType("port", (Port, KPort), (int,), Disposition.MAKE_SEND)
PORT_MOVE_RECEIVE = ArgType("port", (Port, KPort), (int,), Disposition.MOVE_RECEIVE)
PORT_ARRAY = ArgType("port_array", (PortArray, KPortArray), (tuple, list),
                     Disposition.COPY_SEND)


@dataclass(frozen=True)
class Routine:
    """One remote procedure: id, target argument name, typed ins and outs."""

    name: str
    id: int
    target: str
    ins: tuple[tuple[str, ArgType], ...]
    outs: tuple[tuple[str, ArgType], ...]
    doc: str = ""
    simple: bool = False  # a simpleroutine: no reply is awaited


@dataclass
class Subsystem:
    """A set of routines with consecutive message ids from `base`."""

    name: str
    base: int
    routines: dict[int, Routine] = field(default_factory=dict)
    by_name: dict[str, Routine] = field(default_factory=dict)

    def routine(self, name: str, target: str, ins: Sequence[tuple[str, ArgType]] = (),
                outs: Sequence[tuple[str, ArgType]] = (), doc: str = "",
                simple: bool = False) -> Routine:
        """Declare the next routine of the subsystem."""
        r = Routine(name, self.base + len(self.routines), target, tuple(ins), tuple(outs),
                    doc, simple)
        self.routines[r.id] = r
        self.by_name[name] = r
        return r

    def stub(self, name: str) -> Callable[..., Any]:
        """The client function for routine `name` (see module docstring)."""
        return make_stub(self.by_name[name])

    def demux(self, impl: object, msg_id: int, target: Any,
              items: Sequence[Any]) -> list[Item] | None:
        """Serve one request; returns reply items (None for a simpleroutine)."""
        r = self.routines.get(msg_id)
        if r is None:
            return error_reply("MIG_BAD_ID", f"{self.name} has no routine {msg_id}")
        try:
            args = decode_items(r, r.ins, items, "MIG_BAD_ARGUMENTS")
            result = getattr(impl, r.name)(target, *args)
            reply = encode_outs(r, result)
        except MachError as e:
            if r.simple:  # no reply can carry it: say it where a developer will look
                log.warning("%s(%s) failed with no reply to carry the error: %s",
                            r.name, target, e)
                return None
            return error_reply(e.code, e.detail)
        except Exception as e:  # a bug in the server: it must not take the server down
            log.exception("%s(%s): the server's implementation raised", r.name, target)
            return None if r.simple else error_reply(
                "KERN_FAILURE", f"{r.name}: the server failed: {e!r}")
        return None if r.simple else reply


def error_reply(code: str, detail: str) -> list[Item]:
    """Reply items for a failed request."""
    return [Int(MachError(code).value), Str(detail)]


def decode_items(r: Routine, spec: Sequence[tuple[str, ArgType]], items: Sequence[Any],
                 code: str) -> list[Any]:
    """Check item count and classes against `spec`; return the plain values."""
    if len(items) != len(spec):
        raise MachError(code, f"{r.name}: expected {len(spec)} items, got {len(items)}")
    values = []
    for (arg, t), item in zip(spec, items, strict=True):
        if not isinstance(item, t.items):
            raise MachError(code, f"{r.name}: {arg} must be {t.name}, got "
                            f"{type(item).__name__}")
        values.append(t.from_item(item))
    return values


def encode_outs(r: Routine, result: Any) -> list[Item]:
    """Reply items for a successful call: KERN_SUCCESS and the out values."""
    values: tuple[Any, ...]
    if len(r.outs) == 0:
        values = ()
    elif len(r.outs) == 1:
        values = (result,)
    else:
        values = tuple(result)
    return [Int(0)] + [t.to_item(v) for (_, t), v in zip(r.outs, values, strict=True)]


REPLY_SIZE_ANY = 1 << 40  # the rcv_size stubs use: the interface, not the caller, sizes replies


def make_stub(r: Routine) -> Callable[..., Any]:
    """Build the client stub for `r`."""
    names = [r.target] + [n for n, _ in r.ins]

    def stub(*args: Any, **kwargs: Any) -> Any:
        from pymach import mach

        values = _bind(r, names, args, kwargs)
        target = values[0]
        PORT.check(r.name, r.target, target)
        for (arg, t), v in zip(r.ins, values[1:], strict=True):
            t.check(r.name, arg, v)
        msg = Message(remote_port=target, id=r.id,
                      items=[t.to_item(v) for (_, t), v in zip(r.ins, values[1:], strict=True)])
        if r.simple:
            mach.msg_send(msg)
            return None
        msg.local_port = mach.thread_reply()  # any reply fits: one left queued as too
        return _unpack_reply(r, mach.msg_rpc(msg, rcv_size=REPLY_SIZE_ANY))  # large would
        # block every later call of this thread

    stub.__name__ = stub.__qualname__ = r.name
    sig = ", ".join(names)
    outs = ", ".join(n for n, _ in r.outs) or "None"
    stub.__doc__ = f"{r.name}({sig}) -> {outs}\n\n{r.doc}\n\nMIG routine {r.id}."
    return stub


def _bind(r: Routine, names: list[str], args: tuple[Any, ...],
          kwargs: dict[str, Any]) -> list[Any]:
    if len(args) > len(names):
        raise MachError("KERN_INVALID_ARGUMENT", f"{r.name} takes {len(names)} arguments")
    values = dict(zip(names, args, strict=False))
    for k, v in kwargs.items():
        if k not in names or k in values:
            raise MachError("KERN_INVALID_ARGUMENT", f"{r.name}: unexpected argument {k!r}")
        values[k] = v
    missing = [n for n in names if n not in values]
    if missing:
        raise MachError("KERN_INVALID_ARGUMENT", f"{r.name}: missing {', '.join(missing)}")
    return [values[n] for n in names]


def _unpack_reply(r: Routine, reply: Message) -> Any:
    if reply.id != r.id + REPLY_ID_OFFSET:
        raise MachError("MIG_REPLY_MISMATCH", f"{r.name}: reply id {reply.id}, expected "
                        f"{r.id + REPLY_ID_OFFSET}")
    if not reply.items or not isinstance(reply.items[0], Int):
        raise MachError("MIG_TYPE_ERROR", f"{r.name}: reply has no return code")
    code = reply.items[0].value
    if code != 0:
        detail = reply.items[1].value if len(reply.items) > 1 and isinstance(
            reply.items[1], Str) else ""
        raise MachError(code_name(code), detail)
    outs = decode_items(r, r.outs, reply.items[1:], "MIG_TYPE_ERROR")
    outs = [_ool_to_bytes(v) if t is DATA else v for (_, t), v in zip(r.outs, outs,
                                                                       strict=True)]
    if not outs:
        return None
    return outs[0] if len(outs) == 1 else tuple(outs)


def _ool_to_bytes(item: OOL) -> bytes:
    """Read out-of-line reply data into bytes and release the region it arrived in."""
    from pymach import mach_vm

    return mach_vm.take_ool(item)


def serve_message(subsystem: Subsystem, impl: object, msg: Message) -> Message | None:
    """For user servers: the reply Message for a received request (None: no reply)."""
    items = subsystem.demux(impl, msg.id, msg.local_port, msg.items)
    if items is None or not msg.remote_port:
        return None
    return Message(remote_port=msg.remote_port, id=msg.id + REPLY_ID_OFFSET, items=items)
