"""Messages as a task sees them: a fixed header and a list of typed items (paper 3.2).

A `Message` is what user code builds and what `msg_receive` returns. Port rights inside
it are *names* in the holder's name space; the kernel converts them to port objects
(copyin) on send and back to names in the receiver's space (copyout) on receive.

Header (Mach 2.5 field meanings): on send, `remote_port` is the destination and
`local_port` the reply port; on receive, `local_port` is the port the message arrived
on and `remote_port` the reply port, so a server replies to ``msg.remote_port``.

Invariants: `Message.size` is computed from the items (header + 8-byte descriptor per item
+ data rounded up to 4 bytes); every item checks its own Python types and values in
`validate()`, so any malformed item fails the send with SEND_INVALID_TYPE (a `MachError`)
and never with another exception.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from pymach.errors import MachError

PORT_NULL = 0
MSG_HEADER_SIZE = 24
MSG_DESCRIPTOR_SIZE = 8
MSG_SIZE_MAX = 8192  # Mach 2.5 default inline limit; a boot parameter
PORT_BACKLOG_DEFAULT = 5
PORT_BACKLOG_MAX = 16

# msg_send / msg_receive / msg_rpc options (Mach 2.5 msg.h)
MSG_OPTION_NONE = 0x0
SEND_TIMEOUT = 0x1
SEND_INTERRUPT = 0x2
RCV_TIMEOUT = 0x100
RCV_INTERRUPT = 0x200
_SEND_OPTIONS = SEND_TIMEOUT | SEND_INTERRUPT
_RCV_OPTIONS = RCV_TIMEOUT | RCV_INTERRUPT
ALL_OPTIONS = _SEND_OPTIONS | _RCV_OPTIONS

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def check_timeout(timeout: object, what: str) -> float | None:
    """A timeout in milliseconds (pymach's one unit for timeouts, as Mach's): None (wait
    forever) or a number >= 0; KERN_INVALID_ARGUMENT otherwise (a bool, NaN, text)."""
    if timeout is None:
        return None
    if (isinstance(timeout, bool) or not isinstance(timeout, int | float)
            or not timeout >= 0):  # (NaN is not >= 0)
        raise MachError("KERN_INVALID_ARGUMENT", f"{what} timeout must be a number of "
                        f"milliseconds >= 0 or None, not {timeout!r:.40}")
    return float(timeout)


class Disposition(IntEnum):
    """What a port item does with the sender's right, and what the receiver gets.

    On receipt every send right arrives as MOVE_SEND (so it can be forwarded), a receive
    right as MOVE_RECEIVE, ownership as MOVE_OWNERSHIP, both as MOVE_ALL.
    """

    COPY_SEND = 1  # sender keeps its send right; receiver gets one
    MAKE_SEND = 2  # sender holds receive rights; receiver gets a new send right
    MOVE_SEND = 3  # sender's send right moves to the receiver
    MOVE_RECEIVE = 4  # receive rights move (the sender keeps a send right)
    MOVE_OWNERSHIP = 5  # ownership rights move (the sender keeps a send right)
    MOVE_ALL = 6  # receive and ownership rights move together


COPY_SEND = Disposition.COPY_SEND
MAKE_SEND = Disposition.MAKE_SEND
MOVE_SEND = Disposition.MOVE_SEND
MOVE_RECEIVE = Disposition.MOVE_RECEIVE
MOVE_OWNERSHIP = Disposition.MOVE_OWNERSHIP
MOVE_ALL = Disposition.MOVE_ALL
_DISPOSITIONS = frozenset(int(d) for d in Disposition)


def _round4(n: int) -> int:
    return (n + 3) & ~3


def _require(ok: bool, detail: str) -> None:
    if not ok:
        raise MachError("SEND_INVALID_TYPE", detail)


def _check_disposition(disposition: object, what: str) -> None:
    """SEND_INVALID_TYPE unless `disposition` is one of `Disposition`'s values."""
    _require(isinstance(disposition, int) and not isinstance(disposition, bool)
             and disposition in _DISPOSITIONS,
             f"{what} item has bad disposition {disposition!r:.40} (use COPY_SEND, "
             f"MAKE_SEND, MOVE_SEND, MOVE_RECEIVE, MOVE_OWNERSHIP or MOVE_ALL)")


@dataclass
class Int:
    """A 64-bit signed integer item."""

    value: int

    def validate(self) -> None:
        _require(isinstance(self.value, int), f"Int item holds {type(self.value).__name__}")
        _require(INT64_MIN <= self.value <= INT64_MAX, f"Int item {self.value} exceeds 64 bits")

    def data_size(self) -> int:
        return 8


@dataclass
class Float:
    """A 64-bit IEEE float item."""

    value: float

    def validate(self) -> None:
        _require(
            isinstance(self.value, float | int) and not isinstance(self.value, bool),
            f"Float item holds {type(self.value).__name__}, not float",
        )

    def data_size(self) -> int:
        return 8


@dataclass
class Bytes:
    """A byte-string item (inline)."""

    value: bytes

    def validate(self) -> None:
        _require(
            isinstance(self.value, bytes | bytearray | memoryview),
            f"Bytes item holds {type(self.value).__name__}, not bytes",
        )
        self.value = bytes(self.value)

    def data_size(self) -> int:
        return _round4(len(self.value))


@dataclass
class Str:
    """A text item, carried as UTF-8 with a terminating NUL."""

    value: str

    def validate(self) -> None:
        _require(isinstance(self.value, str), f"Str item holds {type(self.value).__name__}")
        _require(is_utf8(self.value), f"Str item {self.value!r:.40} is not valid Unicode "
                 f"text (a lone surrogate has no UTF-8 form)")

    def data_size(self) -> int:
        return _round4(len(self.value.encode("utf-8", "surrogatepass")) + 1)


def is_utf8(text: str) -> bool:
    """True if `text` has a UTF-8 form (no lone surrogates), as a Str item must."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass
class IntArray:
    """An array of 64-bit signed integers."""

    values: tuple[int, ...]

    @property
    def value(self) -> tuple[int, ...]:
        """The item's plain value (uniform across item types)."""
        return self.values

    def validate(self) -> None:
        _require(isinstance(self.values, tuple | list), "IntArray needs a tuple of ints")
        self.values = tuple(self.values)
        for v in self.values:
            _require(isinstance(v, int) and INT64_MIN <= v <= INT64_MAX, f"bad IntArray {v!r}")

    def data_size(self) -> int:
        return 8 * len(self.values)


@dataclass
class Port:
    """A port right, named in the holder's space, with what to do with it."""

    name: int
    disposition: Disposition = Disposition.COPY_SEND

    @property
    def value(self) -> int:
        """The item's plain value (uniform across item types)."""
        return self.name

    def validate(self) -> None:
        _require(isinstance(self.name, int) and not isinstance(self.name, bool),
                 f"Port item name must be an int, not {type(self.name).__name__}")
        _check_disposition(self.disposition, "Port")
        self.disposition = Disposition(self.disposition)

    def data_size(self) -> int:
        return 4


@dataclass
class PortArray:
    """An array of port rights with one disposition for all."""

    names: tuple[int, ...]
    disposition: Disposition = Disposition.COPY_SEND

    @property
    def value(self) -> tuple[int, ...]:
        """The item's plain value (uniform across item types)."""
        return self.names

    def validate(self) -> None:
        _require(isinstance(self.names, tuple | list), "PortArray needs a tuple of names")
        self.names = tuple(self.names)
        _check_disposition(self.disposition, "PortArray")
        for n in self.names:
            Port(n, self.disposition).validate()
        self.disposition = Disposition(self.disposition)

    def data_size(self) -> int:
        return 4 * len(self.names)


@dataclass
class OOL:
    """Out-of-line memory: `size` bytes at `address` of the sender's address space.

    Sent copy-on-write (no data is copied); with `deallocate` the region leaves the
    sender and moves to the receiver. `OOL(data=b"...")` sends Python bytes out of line
    instead (the kernel keeps them until the receiver first touches the memory). The
    receiver always gets `OOL(address, size)` naming new memory in its own address space.
    """

    address: int = 0
    size: int = 0
    deallocate: bool = False
    data: bytes | None = None

    @property
    def value(self) -> OOL:
        """The item's plain value (uniform across item types)."""
        return self

    def validate(self) -> None:
        if self.data is not None:
            _require(isinstance(self.data, bytes | bytearray | memoryview),
                     f"OOL data must be bytes, not {type(self.data).__name__}")
            self.data = bytes(self.data)
            self.address, self.size = 0, len(self.data)
            return
        _require(isinstance(self.address, int) and isinstance(self.size, int)
                 and not isinstance(self.address, bool) and not isinstance(self.size, bool),
                 "OOL item needs int address and size")
        _require(self.size >= 0 and self.address >= 0, "OOL item has a negative address or size")
        _require(isinstance(self.deallocate, bool), "OOL deallocate must be a bool")

    def data_size(self) -> int:
        return 8


@dataclass
class Code:
    """A Python callable and its arguments: the entry point of a new thread.

    Embedded mode carries the reference itself. To reach another process (a native
    task) it travels as `blob`, the callable and arguments pickled by value
    (cloudpickle), and `fn` is None; the kernel never decodes the blob. The kernel
    stamps `origin_uid`, the user of the task that sent it, and a task decodes a blob
    only from its own user: one from another user arrives `refused` (blob dropped).
    """

    fn: Callable[..., Any] | None
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    blob: bytes | None = None
    origin_uid: int = -1  # set by the kernel at send; -1: not yet stamped
    refused: bool = False  # set by the kernel: it came from another user

    @property
    def value(self) -> Code:
        """The item's plain value (uniform across item types)."""
        return self

    def validate(self) -> None:
        if self.blob is not None:
            _require(isinstance(self.blob, bytes), "Code blob must be bytes")
            return
        _require(callable(self.fn), f"Code item needs a callable, not {type(self.fn).__name__}")
        _require(isinstance(self.args, tuple) and isinstance(self.kwargs, dict),
                 "Code item needs tuple args and dict kwargs")

    def data_size(self) -> int:
        return 8


Item = Int | Float | Bytes | Str | IntArray | Port | PortArray | OOL | Code
ITEM_TYPES: tuple[type, ...] = (Int, Float, Bytes, Str, IntArray, Port, PortArray, OOL, Code)


@dataclass
class Message:
    """A message: header fields plus typed items. See the module docstring for the header."""

    remote_port: int = PORT_NULL
    local_port: int = PORT_NULL
    id: int = 0
    items: list[Item] = field(default_factory=list)
    local_disposition: Disposition | None = None  # None: MAKE_SEND if receiver, else COPY_SEND
    sender_uid: int | None = None  # on receipt: the user of the sending task (a trailer,
    # as Mach's security token); ignored on send

    @property
    def size(self) -> int:
        """The message size in bytes, as msg_send checks it against the inline limit."""
        return message_size(self.items)

    @property
    def simple(self) -> bool:
        """True when the message carries no port rights and no out-of-line memory."""
        return not any(isinstance(i, Port | PortArray | OOL) for i in self.items)

    def values(self) -> list[Any]:
        """The items' plain values, in order (port items give their names)."""
        return [item_value(i) for i in self.items]


def item_value(item: Item) -> Any:
    """The plain Python value of one item (port items give their names)."""
    return item.value


def message_size(items: list[Any]) -> int:
    """Header size plus each item's descriptor and data."""
    total: int = MSG_HEADER_SIZE + sum(MSG_DESCRIPTOR_SIZE + i.data_size() for i in items)
    return total


def validate_message(msg: object) -> Message:
    """Check a user message's header and items; raise SEND_INVALID_TYPE etc. if malformed."""
    if not isinstance(msg, Message):
        raise MachError("SEND_INVALID_TYPE", f"msg_send needs a Message, not {type(msg).__name__}")
    if type(msg.remote_port) is not int or type(msg.local_port) is not int or \
            type(msg.id) is not int:  # (the common case in one test; then each field's)
        for fname in ("remote_port", "local_port", "id"):
            v = getattr(msg, fname)
            if not isinstance(v, int) or isinstance(v, bool):
                raise MachError("SEND_INVALID_TYPE", f"header field {fname} must be an int")
    if not INT64_MIN <= msg.id <= INT64_MAX:
        raise MachError("SEND_INVALID_TYPE", "header id exceeds 64 bits")
    if not isinstance(msg.items, list):
        raise MachError("SEND_INVALID_TYPE", "Message.items must be a list")
    for item in msg.items:
        if not isinstance(item, ITEM_TYPES):
            raise MachError("SEND_INVALID_TYPE", f"not a message item: {type(item).__name__}")
        item.validate()
    if msg.local_disposition is not None and msg.local_disposition not in (
        Disposition.COPY_SEND, Disposition.MAKE_SEND, Disposition.MOVE_SEND
    ):
        raise MachError("SEND_INVALID_TYPE", "reply port disposition must give a send right")
    return msg
