"""Interface definitions, our MIG: declare a subsystem once, get client stubs and a server.

A `Subsystem` has a base message id; each `routine` gets the next id and a list of typed
in and out arguments. The first argument of every routine is the port the request goes
to (MIG's target). From the declaration:

- `Subsystem.stub(name)` is the client function: a call with missing, extra or unknown
  arguments raises `TypeError`, as any Python function does (the stub has the routine's
  signature); it checks argument types (raising KERN_INVALID_ARGUMENT before anything is
  sent), builds the request, calls `msg_rpc` on
  the thread's reply port, checks the reply (MIG_REPLY_MISMATCH, MIG_TYPE_ERROR), raises
  the server's error code as a `MachError`, and returns the out arguments.
- `Subsystem.demux(impl, msg_id, target, items)` is the server side: it decodes and checks
  a request, calls ``impl.<routine>(target, *ins)``, and returns the reply items. A
  `MachError` from the implementation becomes the reply's return code; any other
  exception (a bug in the server) is logged and becomes KERN_FAILURE, so a bad request
  cannot kill the server's thread.

Replies have id ``request id + 100`` and start with an Int return code; an error reply
also carries a Str detail.

This module is the declaration, as GNU Mach keeps its .defs in include/mach: it knows
the message format and nothing of the kernel or of a task. Two things are supplied from
above it. How argument values become items is an `ItemCodec`: `TASK_CODEC` here for user
servers, where port arguments are names; the kernel's server passes its own
(kern/mig.py: port objects and copies in transit). And a client stub sends messages,
which only the user library can do: `pymach.mach` installs the stub maker
(`install_stub_maker`) when it is imported, which `import pymach` does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pymach.errors import MachError
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
    is_utf8,
)

REPLY_ID_OFFSET = 100
REPLY_SIZE_ANY = 1 << 40  # the rcv_size stubs use: the interface, not the caller, sizes replies
log = logging.getLogger("pymach")


@dataclass(frozen=True)
class ArgType:
    """How one argument travels: its item class and the Python values it accepts."""

    name: str
    items: tuple[type, ...]  # item classes a task-side server accepts
    accepts: tuple[type, ...]  # Python types accepted by the client stub
    disposition: Disposition | None = None  # for port arguments

    def check(self, routine: str, arg: str, value: Any) -> None:
        """Raise KERN_INVALID_ARGUMENT unless the client's `value` fits this type."""
        if not _fits(self.name, value, self.accepts):
            hint = (" (a port name is an int: a spawned task's port is its handle's "
                    ".port; .name is the task's name)"
                    if self.name == "port" and isinstance(value, str) else "")
            raise MachError("KERN_INVALID_ARGUMENT", f"{routine}: {arg} must be "
                            f"{self.name}, not {value!r:.60}{hint}")


class ItemCodec:
    """Argument values to items and back, for a server and client in a task: port
    arguments are names (`Port`, `PortArray`), out-of-line data an `OOL` region. The
    kernel's server extends it for its own items (kern/mig.py)."""

    def accepts(self, t: ArgType, item: Any) -> bool:
        """True if `item` may carry an argument of type `t`."""
        return isinstance(item, t.items)

    def to_item(self, t: ArgType, value: Any) -> Any:
        """The item that carries `value` as an argument of type `t`."""
        if t.disposition is not None:
            if isinstance(value, tuple | list):
                return PortArray(tuple(value), t.disposition)
            return Port(value, t.disposition)
        if t.name == "code":
            return value if isinstance(value, Code) else Code(value)
        if t.name == "port_poly":
            return value  # a Port item: name and disposition
        if t.name in ("data", "memory"):
            return value if isinstance(value, OOL) else OOL(data=bytes(value))
        if t.name == "int_array":
            return IntArray(tuple(value))
        cls = {"int": Int, "bool": Int, "float": Float, "str": Str, "bytes": Bytes}[t.name]
        return cls(value)

    def from_item(self, t: ArgType, item: Any) -> Any:
        """The Python value `item` stands for."""
        if isinstance(item, Port):
            return item.name
        if isinstance(item, PortArray):
            return item.names
        if isinstance(item, IntArray):
            return item.values
        if isinstance(item, Code | OOL):
            return item
        return bool(item.value) if t.name == "bool" else item.value


TASK_CODEC = ItemCodec()


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
    if kind == "str":
        return isinstance(value, str) and is_utf8(value)
    return isinstance(value, accepts)


INT = ArgType("int", (Int,), (int,))
BOOL = ArgType("bool", (Int,), (bool, int))
FLOAT = ArgType("float", (Float,), (float, int))
STR = ArgType("str", (Str,), (str,))
BYTES = ArgType("bytes", (Bytes,), (bytes, bytearray, memoryview))
INT_ARRAY = ArgType("int_array", (IntArray,), (tuple, list))
CODE = ArgType("code", (Code,), (Code,))
# Out-of-line data: a client passes bytes (sent by value) or an OOL region of its own
# memory; a user server gets the OOL item (address, size in its space); the kernel gets
# the copy in transit; a client stub's reply value is the bytes (pymach.mach.make_stub).
DATA = ArgType("data", (OOL,), (bytes, bytearray, memoryview, OOL))
# Out-of-line memory that stays memory: like DATA, but a client stub's reply value is the
# OOL item itself (new memory in the caller's address space), as fs_read_file returns.
MEMORY = ArgType("memory", (OOL,), (bytes, bytearray, memoryview, OOL))
PORT = ArgType("port", (Port,), (int,), Disposition.COPY_SEND)  # a send right
PORT_MAKE = ArgType("port", (Port,), (int,), Disposition.MAKE_SEND)
PORT_MOVE_RECEIVE = ArgType("port", (Port,), (int,), Disposition.MOVE_RECEIVE)
PORT_ARRAY = ArgType("port_array", (PortArray,), (tuple, list), Disposition.COPY_SEND)
# A right whose disposition the caller chooses: the client passes a Port item, the kernel
# gets the right in transit with its kind, a reply's right arrives as the kernel says.
PORT_POLY = ArgType("port_poly", (Port,), (Port,))


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


StubMaker = Callable[[Routine], Callable[..., Any]]
_stub_maker: StubMaker | None = None


def install_stub_maker(maker: StubMaker) -> None:
    """Called by the user library (pymach.mach), which makes the client stubs."""
    global _stub_maker
    _stub_maker = maker


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
        if _stub_maker is None:
            raise MachError("KERN_FAILURE", "client stubs come from the user library: "
                            "import pymach first")
        return _stub_maker(self.by_name[name])

    def demux(self, impl: object, msg_id: int, target: Any, items: Sequence[Any],
              codec: ItemCodec = TASK_CODEC) -> list[Item] | None:
        """Serve one request; returns reply items (None for a simpleroutine)."""
        r = self.routines.get(msg_id)
        if r is None:
            return error_reply("MIG_BAD_ID", f"{self.name} has no routine {msg_id}")
        try:
            args = decode_items(r, r.ins, items, "MIG_BAD_ARGUMENTS", codec)
            result = getattr(impl, r.name)(target, *args)
            reply = encode_outs(r, result, codec)
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
                 code: str, codec: ItemCodec = TASK_CODEC) -> list[Any]:
    """Check item count and classes against `spec`; return the plain values."""
    if len(items) != len(spec):
        raise MachError(code, f"{r.name}: expected {len(spec)} items, got {len(items)}")
    values = []
    for (arg, t), item in zip(spec, items, strict=True):
        if not codec.accepts(t, item):
            raise MachError(code, f"{r.name}: {arg} must be {t.name}, got "
                            f"{type(item).__name__}")
        values.append(codec.from_item(t, item))
    return values


def encode_outs(r: Routine, result: Any, codec: ItemCodec = TASK_CODEC) -> list[Item]:
    """Reply items for a successful call: KERN_SUCCESS and the out values."""
    values: tuple[Any, ...]
    if len(r.outs) == 0:
        values = ()
    elif len(r.outs) == 1:
        values = (result,)
    else:
        values = tuple(result)
    return [Int(0)] + [codec.to_item(t, v) for (_, t), v in zip(r.outs, values, strict=True)]


def serve_message(subsystem: Subsystem, impl: object, msg: Message) -> Message | None:
    """For user servers: the reply Message for a received request (None: no reply: a
    simpleroutine, or a request that named no reply port). KERN_INVALID_ARGUMENT unless
    `subsystem` is a Subsystem and `msg` a Message."""
    if not isinstance(subsystem, Subsystem) or not isinstance(msg, Message):
        raise MachError("KERN_INVALID_ARGUMENT", f"serve_message(subsystem, impl, msg) "
                        f"needs a Subsystem and a Message, not {type(subsystem).__name__} "
                        f"and {type(msg).__name__}")
    items = subsystem.demux(impl, msg.id, msg.local_port, msg.items)
    if items is None or not msg.remote_port:
        return None
    return Message(remote_port=msg.remote_port, id=msg.id + REPLY_ID_OFFSET, items=items)
