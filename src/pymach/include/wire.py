"""The typed wire format: how traps, replies and Mach messages travel as bytes.

Every frame between a task process and machd (and, later, between hosts) is this
format; nothing on the wire is ever unpickled. A frame is a fixed 16-byte header and a
body of typed values, all little-endian:

    header  magic "PYMW" (4 bytes) | version u16 | op u16 | body length u32 | fds u32

`op` is a trap or frame number (include/traps.py); `fds` is how many descriptors ride
with the header as SCM_RIGHTS (Unix sockets only). The body is a sequence of values,
each a tag byte and its payload:

    0x00 None   0x01 False   0x02 True
    0x03 int    i64                       0x04 float  f64
    0x05 bytes  u32 length, bytes         0x06 str    u32 length, UTF-8
    0x07 list   u32 count, values         0x08 message (below)

A message is the Mach header and its typed items (include/message.py, paper 3.2):

    remote_port i64 | local_port i64 | id i64 | local_disposition u8 (0: none)
    | sender_uid i64 (-1: unknown) | item count u32 | items

    0x10 Int        i64                   0x11 Float     f64
    0x12 Bytes      u32 length, bytes     0x13 Str       u32 length, UTF-8
    0x14 IntArray   u32 count, i64 each   0x15 Port      name i64, disposition u8
    0x16 PortArray  disposition u8, u32 count, i64 each
    0x17 OOL        address u64, size u64, flags u8 (1 deallocate, 2 data follows)
                    [u32 length, bytes]
    0x18 Code       origin uid i64, flags u8 (1 refused), u32 length, blob

Decoding checks every length against what remains before reading or allocating, caps
list nesting, item counts and string sizes, refuses unknown tags, trailing bytes,
invalid UTF-8 and out-of-range numbers, and builds nothing but the values above. Any
violation is a `WireError` (MIG_TYPE_ERROR) naming the offset; a reader that gets one
drops the connection. A Code item's blob is carried, never decoded, here.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from pymach.errors import MachError
from pymach.include.message import (
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

MAGIC = b"PYMW"
VERSION = 1
HEADER = struct.Struct("<4sHHII")
HEADER_SIZE = HEADER.size  # 16
MAX_BODY = 64 << 20  # the largest body either side accepts (OOL data rides inline)
MAX_FDS = 16  # descriptors per frame
MAX_DEPTH = 4  # list nesting
MAX_COUNT = 1 << 20  # elements of one list or array, items of one message

_I64 = struct.Struct("<q")
_U64 = struct.Struct("<Q")
_F64 = struct.Struct("<d")
_U32 = struct.Struct("<I")
_MSG_HEAD = struct.Struct("<qqqBqI")
_OOL_HEAD = struct.Struct("<QQB")
_CODE_HEAD = struct.Struct("<qBI")
_PORT = struct.Struct("<qB")

T_NONE, T_FALSE, T_TRUE, T_INT, T_FLOAT, T_BYTES, T_STR, T_LIST, T_MSG = range(9)
I_INT, I_FLOAT, I_BYTES, I_STR, I_INTARRAY, I_PORT, I_PORTARRAY, I_OOL, I_CODE = range(
    0x10, 0x19)
OOL_DEALLOCATE, OOL_DATA = 1, 2
CODE_REFUSED = 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class WireError(MachError):
    """A frame that breaks the wire format (see module docstring)."""

    def __new__(cls, detail: str) -> WireError:
        return Exception.__new__(cls)

    def __init__(self, detail: str) -> None:
        super().__init__("MIG_TYPE_ERROR", f"bad frame: {detail}")


# -- encoding -----------------------------------------------------------------------------
def pack_header(op: int, body_len: int, nfds: int) -> bytes:
    """The 16-byte header of a frame."""
    return HEADER.pack(MAGIC, VERSION, op, body_len, nfds)


def unpack_header(data: bytes) -> tuple[int, int, int]:
    """(op, body length, fd count) of a header, or WireError if it is not one of ours."""
    if len(data) != HEADER_SIZE:
        raise WireError(f"short header ({len(data)} bytes)")
    magic, version, op, length, nfds = HEADER.unpack(data)
    if magic != MAGIC:
        raise WireError("not a pymach frame (bad magic)")
    if version != VERSION:
        raise WireError(f"wire version {version}, this side speaks {VERSION}")
    if length > MAX_BODY:
        raise WireError(f"body of {length} bytes exceeds {MAX_BODY}")
    if nfds > MAX_FDS:
        raise WireError(f"{nfds} descriptors exceed {MAX_FDS}")
    return op, length, nfds


def encode(values: Sequence[Any]) -> bytes:
    """The body for `values` (None, bool, int, float, bytes, str, list/tuple, Message);
    WireError for anything else, or for an item holding a value of the wrong kind."""
    out = bytearray()
    try:
        for v in values:
            _put(out, v, 0)
    except (TypeError, ValueError, AttributeError, OverflowError, struct.error) as e:
        raise WireError(f"cannot encode: {e}") from None
    return bytes(out)


def _put_int(out: bytearray, v: int) -> None:
    if not INT64_MIN <= v <= INT64_MAX:
        raise WireError(f"integer {v} does not fit in 64 bits")
    out += _I64.pack(v)


def _put_blob(out: bytearray, data: bytes) -> None:
    out += _U32.pack(len(data))
    out += data


def _put(out: bytearray, v: Any, depth: int) -> None:
    if v is None:
        out.append(T_NONE)
    elif v is True or v is False:
        out.append(T_TRUE if v else T_FALSE)
    elif isinstance(v, int):
        out.append(T_INT)
        _put_int(out, v)
    elif isinstance(v, float):
        out.append(T_FLOAT)
        out += _F64.pack(v)
    elif isinstance(v, bytes | bytearray | memoryview):
        out.append(T_BYTES)
        _put_blob(out, bytes(v))
    elif isinstance(v, str):
        out.append(T_STR)
        _put_blob(out, v.encode("utf-8", "surrogatepass"))
    elif isinstance(v, list | tuple):
        if depth >= MAX_DEPTH:
            raise WireError("lists nest too deep")
        out.append(T_LIST)
        out += _U32.pack(len(v))
        for x in v:
            _put(out, x, depth + 1)
    elif isinstance(v, Message):
        out.append(T_MSG)
        _put_message(out, v)
    else:
        raise WireError(f"a {type(v).__name__} cannot travel on the wire")


def _put_message(out: bytearray, msg: Message) -> None:
    disp = 0 if msg.local_disposition is None else int(msg.local_disposition)
    uid = -1 if msg.sender_uid is None else msg.sender_uid
    for f in (msg.remote_port, msg.local_port, msg.id, uid):
        if not INT64_MIN <= f <= INT64_MAX:
            raise WireError(f"message header field {f} does not fit in 64 bits")
    out += _MSG_HEAD.pack(msg.remote_port, msg.local_port, msg.id, disp, uid,
                          len(msg.items))
    for item in msg.items:
        _put_item(out, item)


def _put_item(out: bytearray, item: Item) -> None:
    if isinstance(item, Int):
        out.append(I_INT)
        _put_int(out, item.value)
    elif isinstance(item, Float):
        out.append(I_FLOAT)
        out += _F64.pack(float(item.value))
    elif isinstance(item, Bytes):
        out.append(I_BYTES)
        _put_blob(out, bytes(item.value))
    elif isinstance(item, Str):
        out.append(I_STR)
        _put_blob(out, item.value.encode("utf-8", "surrogatepass"))
    elif isinstance(item, IntArray):
        out.append(I_INTARRAY)
        out += _U32.pack(len(item.values))
        for v in item.values:
            _put_int(out, v)
    elif isinstance(item, Port):
        out.append(I_PORT)
        out += _PORT.pack(item.name, int(item.disposition))
    elif isinstance(item, PortArray):
        out.append(I_PORTARRAY)
        out += bytes((int(item.disposition),)) + _U32.pack(len(item.names))
        for n in item.names:
            _put_int(out, n)
    elif isinstance(item, OOL):
        _put_ool(out, item)
    elif isinstance(item, Code):
        _put_code(out, item)
    else:
        raise WireError(f"not a message item: {type(item).__name__}")


def _put_ool(out: bytearray, item: OOL) -> None:
    flags = (OOL_DEALLOCATE if item.deallocate else 0) | (OOL_DATA if item.data is not None
                                                          else 0)
    if not (0 <= item.address < 2**64 and 0 <= item.size < 2**64):
        raise WireError("OOL address and size must be unsigned 64-bit values")
    out.append(I_OOL)
    out += _OOL_HEAD.pack(item.address, item.size, flags)
    if item.data is not None:
        _put_blob(out, bytes(item.data))


def _put_code(out: bytearray, item: Code) -> None:
    if item.blob is None:
        raise WireError("a Code item travels as a blob (pickle it in the task first)")
    out.append(I_CODE)
    out += _CODE_HEAD.pack(item.origin_uid, CODE_REFUSED if item.refused else 0,
                           len(item.blob))
    out += item.blob


# -- decoding -----------------------------------------------------------------------------
class _Reader:
    """A bounds-checked cursor over one body."""

    __slots__ = ("buf", "end", "pos")

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self.buf = data if isinstance(data, bytes) else memoryview(data).toreadonly()
        # (no copy of a received body: byte strings are copied out once, by `take`)
        self.end = len(self.buf)
        self.pos = 0

    def _need(self, n: int) -> int:
        """The current offset, having checked that n more bytes are there."""
        pos = self.pos
        if n < 0 or pos + n > self.end:
            raise WireError(f"truncated at offset {pos} (wanted {n} bytes, "
                            f"{self.end - pos} remain)")
        self.pos = pos + n
        return pos

    def take(self, n: int) -> bytes:
        pos = self._need(n)
        return bytes(self.buf[pos:pos + n])  # (a slice of bytes is not copied again)

    def unpack(self, st: struct.Struct) -> tuple[Any, ...]:
        return st.unpack_from(self.buf, self._need(st.size))

    def u8(self) -> int:
        return self.buf[self._need(1)]

    def count(self, min_each: int, most: int = MAX_COUNT) -> int:
        """An element count, refused past `most` or if the rest of the body could not
        hold it."""
        n: int = _U32.unpack_from(self.buf, self._need(4))[0]
        if n > most or n * min_each > self.end - self.pos:
            raise WireError(f"count {n} at offset {self.pos - 4} exceeds the frame")
        return n

    def blob(self) -> bytes:
        """A byte string: bounded by the body (MAX_BODY), not by MAX_COUNT."""
        return self.take(self.count(1, MAX_BODY))

    def text(self) -> str:
        at = self.pos
        try:
            return self.blob().decode("utf-8")
        except UnicodeDecodeError:
            raise WireError(f"invalid UTF-8 at offset {at}") from None


def decode(data: bytes | bytearray | memoryview) -> list[Any]:
    """The values of a body (see module docstring), or WireError."""
    r = _Reader(data)
    out = []
    while r.pos < r.end:
        out.append(_get(r, 0))
    return out


def _get(r: _Reader, depth: int) -> Any:
    tag = r.u8()
    if tag == T_INT:
        return r.unpack(_I64)[0]
    if tag == T_NONE:
        return None
    if tag in (T_FALSE, T_TRUE):
        return tag == T_TRUE
    if tag == T_FLOAT:
        return r.unpack(_F64)[0]
    if tag == T_BYTES:
        return r.blob()
    if tag == T_STR:
        return r.text()
    if tag == T_LIST:
        if depth >= MAX_DEPTH:
            raise WireError(f"lists nest too deep at offset {r.pos}")
        return [_get(r, depth + 1) for _ in range(r.count(1))]
    if tag == T_MSG:
        return _get_message(r)
    raise WireError(f"unknown tag {tag:#x} at offset {r.pos - 1}")


def _disposition(value: int, at: int) -> Disposition:
    try:
        return Disposition(value)
    except ValueError:
        raise WireError(f"bad port disposition {value} at offset {at}") from None


def _get_message(r: _Reader) -> Message:
    remote, local, msg_id, disp, uid, _n = r.unpack(_MSG_HEAD)
    r.pos -= 4
    n = r.count(1)
    items = [_get_item(r) for _ in range(n)]
    local_disp = None if disp == 0 else _disposition(disp, r.pos)
    return Message(remote, local, msg_id, items, local_disp,
                   sender_uid=None if uid < 0 else uid)


def _get_item(r: _Reader) -> Item:
    at = r.pos
    tag = r.u8()
    if tag == I_INT:
        return Int(r.unpack(_I64)[0])
    if tag == I_FLOAT:
        return Float(r.unpack(_F64)[0])
    if tag == I_BYTES:
        return Bytes(r.blob())
    if tag == I_STR:
        return Str(r.text())
    if tag == I_INTARRAY:
        n = r.count(8)
        return IntArray(struct.unpack_from(f"<{n}q", r.buf, r._need(8 * n)))
    if tag == I_PORT:
        name, disp = r.unpack(_PORT)
        return Port(name, _disposition(disp, at))
    if tag == I_PORTARRAY:
        disp = _disposition(r.u8(), at)
        n = r.count(8)
        return PortArray(struct.unpack_from(f"<{n}q", r.buf, r._need(8 * n)), disp)
    if tag == I_OOL:
        address, size, flags = r.unpack(_OOL_HEAD)
        if flags & ~(OOL_DEALLOCATE | OOL_DATA):
            raise WireError(f"bad OOL flags {flags:#x} at offset {at}")
        data = r.blob() if flags & OOL_DATA else None
        return OOL(address, size, bool(flags & OOL_DEALLOCATE), data)
    if tag == I_CODE:
        uid, flags = r.unpack(_CODE_HEAD)[:2]
        r.pos -= 4
        return Code(None, blob=r.blob(), origin_uid=uid, refused=bool(flags & CODE_REFUSED))
    raise WireError(f"unknown item type {tag:#x} at offset {at}")


# -- signatures ---------------------------------------------------------------------------
def check(values: list[Any], signature: Sequence[tuple[type, ...] | type], what: str) -> None:
    """Refuse (WireError) values whose count or types differ from `signature`, a type
    or tuple of types per position. Decoded values have exact types, so the check is
    by exact type (a bool is not an int here)."""
    if len(values) != len(signature):
        raise WireError(f"{what} takes {len(signature)} values, got {len(values)}")
    for n, v in enumerate(values):
        want = signature[n]
        if type(v) is want or (type(want) is tuple and type(v) in want):
            continue
        types = want if isinstance(want, tuple) else (want,)
        names = "/".join("None" if t is type(None) else t.__name__ for t in types)
        raise WireError(f"{what} value {n} is {type(v).__name__}, not {names}")
