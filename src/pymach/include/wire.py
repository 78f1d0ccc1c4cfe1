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
_TAG_I64 = struct.Struct("<Bq")
_TAG_U32 = struct.Struct("<BI")

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
    return bytes(_encoded(values))


def encode_parts(values: Sequence[Any]) -> list[bytes]:
    """encode(values) as a list of byte strings whose concatenation is the body, for a
    gathering write (sendmsg): a byte string of at least SPILL_MIN bytes (a pager's
    data, say) is its own part, not copied into the body (twice) as `encode` does.
    The parts are immutable, so the caller may send them later."""
    out = _Spilling()
    _fill(out, values)
    out.spill(b"")
    return out.parts


SPILL_MIN = 64 << 10  # bytes: a byte string this large is a part of its own
SPILL_PARTS_MAX = 256  # parts at most (a gathering write takes at most IOV_MAX, 1024,
# buffers): past it, large byte strings are copied into the body as `encode` does


class _Spilling(bytearray):
    """The body being encoded, which large byte strings leave as parts of their own."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[bytes] = []

    def spill(self, data: bytes) -> None:
        """End the current part and add `data` (bytes: not copied) as a part."""
        if self:
            self.parts.append(bytes(self))
            self.clear()
        if data:
            self.parts.append(data)


def _encoded(values: Sequence[Any]) -> bytearray:
    out = bytearray()
    _fill(out, values)
    return out


def _fill(out: bytearray, values: Sequence[Any]) -> None:
    try:
        for v in values:
            _put(out, v, 0)
    except (TypeError, ValueError, AttributeError, OverflowError, struct.error) as e:
        raise WireError(f"cannot encode: {e}") from None


def encode_with_blob(values: Sequence[Any], blob: bytes | memoryview) -> bytes:
    """encode([*values, blob]), copying the (large) bytes `blob` once, not twice."""
    return b"".join((blob_head(values, len(blob)), blob))


def blob_head(values: Sequence[Any], size: int) -> bytes:
    """What encode([*values, blob]) puts before the bytes of a `size`-byte `blob` (so a
    caller can build the body around a blob it writes in place)."""
    head = _encoded(values)
    head.append(T_BYTES)
    head += _U32.pack(size)
    return bytes(head)


def _put_int(out: bytearray, v: int) -> None:
    if not INT64_MIN <= v <= INT64_MAX:
        raise WireError(f"integer {v} does not fit in 64 bits")
    out += _I64.pack(v)


def _put_blob(out: bytearray, data: bytes) -> None:
    out += _U32.pack(len(data))
    if len(data) >= SPILL_MIN and type(out) is _Spilling and len(out.parts) < SPILL_PARTS_MAX:
        out.spill(data)
    else:
        out += data


def _put(out: bytearray, v: Any, depth: int) -> None:
    t = type(v)
    if t is int:  # the commonest values inline (a trap's numbers, a reply's strings)
        if not INT64_MIN <= v <= INT64_MAX:
            raise WireError(f"integer {v} does not fit in 64 bits")
        out += _TAG_I64.pack(T_INT, v)
    elif t is str:
        data = v.encode("utf-8", "surrogatepass")
        out += _TAG_U32.pack(T_STR, len(data))
        out += data
    else:
        put = _PUT.get(t)  # other exact types: one lookup
        if put is not None:
            put(out, v, depth)
        else:
            _put_other(out, v, depth)


def _put_other(out: bytearray, v: Any, depth: int) -> None:
    """Values of other types: subclasses of the wire's types, or refused."""
    if v is True or v is False:
        out.append(T_TRUE if v else T_FALSE)
    elif isinstance(v, int):
        _put_int_value(out, v, depth)
    elif isinstance(v, float):
        _put_float_value(out, v, depth)
    elif isinstance(v, bytes | bytearray | memoryview):
        _put_bytes_value(out, v, depth)
    elif isinstance(v, str):
        _put_str_value(out, v, depth)
    elif isinstance(v, list | tuple):
        _put_list_value(out, v, depth)
    elif isinstance(v, Message):
        _put_message_value(out, v, depth)
    else:
        raise WireError(f"a {type(v).__name__} cannot travel on the wire")


def _put_none(out: bytearray, v: None, depth: int) -> None:
    out.append(T_NONE)


def _put_bool(out: bytearray, v: bool, depth: int) -> None:
    out.append(T_TRUE if v else T_FALSE)


def _put_int_value(out: bytearray, v: int, depth: int) -> None:
    out.append(T_INT)
    _put_int(out, v)


def _put_float_value(out: bytearray, v: float, depth: int) -> None:
    out.append(T_FLOAT)
    out += _F64.pack(v)


def _put_bytes_value(out: bytearray, v: bytes | bytearray | memoryview, depth: int) -> None:
    out.append(T_BYTES)
    _put_blob(out, bytes(v))


def _put_str_value(out: bytearray, v: str, depth: int) -> None:
    out.append(T_STR)
    _put_blob(out, v.encode("utf-8", "surrogatepass"))


def _put_list_value(out: bytearray, v: list[Any] | tuple[Any, ...], depth: int) -> None:
    if depth >= MAX_DEPTH:
        raise WireError("lists nest too deep")
    out.append(T_LIST)
    out += _U32.pack(len(v))
    for x in v:
        _put(out, x, depth + 1)


def _put_message_value(out: bytearray, v: Message, depth: int) -> None:
    out.append(T_MSG)
    _put_message(out, v)


_PUT: dict[type, Any] = {
    type(None): _put_none, bool: _put_bool, int: _put_int_value, float: _put_float_value,
    bytes: _put_bytes_value, bytearray: _put_bytes_value, memoryview: _put_bytes_value,
    str: _put_str_value, list: _put_list_value, tuple: _put_list_value,
    Message: _put_message_value,
}


def _put_message(out: bytearray, msg: Message) -> None:
    disp = 0 if msg.local_disposition is None else int(msg.local_disposition)
    uid = -1 if msg.sender_uid is None else msg.sender_uid
    for f in (msg.remote_port, msg.local_port, msg.id, uid):
        if not INT64_MIN <= f <= INT64_MAX:
            raise WireError(f"message header field {f} does not fit in 64 bits")
    out += _MSG_HEAD.pack(msg.remote_port, msg.local_port, msg.id, disp, uid,
                          len(msg.items))
    put_items(out, msg.items)


def put_items(out: bytearray, items: Sequence[Item]) -> None:
    """Append message items as a message's body carries them (module docstring; their
    count is the caller's to write). WireError for a value that is no item."""
    for item in items:
        put = _PUT_ITEM.get(type(item))
        if put is None:  # a subclass of an item type, or not an item
            put = next((f for t, f in _PUT_ITEM.items() if isinstance(item, t)), None)
            if put is None:
                raise WireError(f"not a message item: {type(item).__name__}")
        put(out, item)


def _put_int_item(out: bytearray, item: Int) -> None:
    out.append(I_INT)
    _put_int(out, item.value)


def _put_float_item(out: bytearray, item: Float) -> None:
    out.append(I_FLOAT)
    out += _F64.pack(float(item.value))


def _put_bytes_item(out: bytearray, item: Bytes) -> None:
    out.append(I_BYTES)
    _put_blob(out, bytes(item.value))


def _put_str_item(out: bytearray, item: Str) -> None:
    out.append(I_STR)
    _put_blob(out, item.value.encode("utf-8", "surrogatepass"))


def _put_int_array(out: bytearray, item: IntArray) -> None:
    out.append(I_INTARRAY)
    out += _U32.pack(len(item.values))
    for v in item.values:
        _put_int(out, v)


def _put_port(out: bytearray, item: Port) -> None:
    out.append(I_PORT)
    out += _PORT.pack(item.name, int(item.disposition))


def _put_port_array(out: bytearray, item: PortArray) -> None:
    out.append(I_PORTARRAY)
    out += bytes((int(item.disposition),)) + _U32.pack(len(item.names))
    for n in item.names:
        _put_int(out, n)


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
    """A Code item: its blob, or none for a refused one (another user's code, which
    arrives inert: the kernel dropped its blob)."""
    if item.blob is None and not item.refused:
        raise WireError("a Code item travels as a blob (pickle it in the task first)")
    blob = b"" if item.refused else item.blob
    assert blob is not None
    out.append(I_CODE)
    out += _CODE_HEAD.pack(item.origin_uid, CODE_REFUSED if item.refused else 0, len(blob))
    out += blob


_PUT_ITEM: dict[type, Any] = {
    Int: _put_int_item, Float: _put_float_item, Bytes: _put_bytes_item, Str: _put_str_item,
    IntArray: _put_int_array, Port: _put_port, PortArray: _put_port_array, OOL: _put_ool,
    Code: _put_code,
}


# -- decoding -----------------------------------------------------------------------------
# Each reader takes the body (`buf`, bytes or a read-only memoryview: a received body is
# never copied, byte strings are copied out once), the offset to read at and the end,
# and returns the value and the offset after it; every length is checked against the
# end before anything is read or allocated.
Buf = bytes | memoryview


def _truncated(pos: int, n: int, end: int) -> WireError:
    return WireError(f"truncated at offset {pos} (wanted {n} bytes, {end - pos} remain)")


def _count(buf: Buf, pos: int, end: int, min_each: int,
           most: int = MAX_COUNT) -> tuple[int, int]:
    """An element count at `pos`, refused past `most` or if the rest of the body could
    not hold it; (count, offset after it)."""
    if pos + 4 > end:
        raise _truncated(pos, 4, end)
    n: int = _U32.unpack_from(buf, pos)[0]
    if n > most or n * min_each > end - pos - 4:
        raise WireError(f"count {n} at offset {pos} exceeds the frame")
    return n, pos + 4


def _blob(buf: Buf, pos: int, end: int) -> tuple[bytes, int]:
    """A byte string: bounded by the body (MAX_BODY), not by MAX_COUNT."""
    n, pos = _count(buf, pos, end, 1, MAX_BODY)
    return bytes(buf[pos:pos + n]), pos + n  # (a slice of bytes is not copied again)


def _text(buf: Buf, pos: int, end: int) -> tuple[str, int]:
    data, after = _blob(buf, pos, end)
    try:
        return data.decode("utf-8"), after
    except UnicodeDecodeError:
        raise WireError(f"invalid UTF-8 at offset {pos}") from None


def _fixed(buf: Buf, pos: int, end: int, st: struct.Struct) -> tuple[Any, ...]:
    """The fields of `st` at `pos` (checked to be there)."""
    if pos + st.size > end:
        raise _truncated(pos, st.size, end)
    return st.unpack_from(buf, pos)


def decode(data: bytes | bytearray | memoryview) -> list[Any]:
    """The values of a body (see module docstring), or WireError."""
    buf: Buf = data if isinstance(data, bytes) else memoryview(data).toreadonly()
    end, pos = len(buf), 0
    out = []
    while pos < end:
        value, pos = _get(buf, pos, end, 0)
        out.append(value)
    return out


def decode_with_blob(data: bytes | bytearray | memoryview) -> tuple[list[Any], memoryview]:
    """decode() of a body whose last value is a byte string (as `encode_with_blob` makes
    it): the values before it, and that byte string as a read-only view of `data`, not
    copied (it is most of the body). WireError if the body is not such a body."""
    buf = memoryview(data).toreadonly()
    end, pos = len(buf), 0
    out: list[Any] = []
    while pos < end:
        if buf[pos] == T_BYTES:
            n, at = _count(buf, pos + 1, end, 1, MAX_BODY)
            if at + n == end:
                return out, buf[at:end]
        value, pos = _get(buf, pos, end, 0)
        out.append(value)
    raise WireError("the body does not end with a byte string")


def _get(buf: Buf, pos: int, end: int, depth: int) -> tuple[Any, int]:
    if pos >= end:
        raise _truncated(pos, 1, end)
    tag = buf[pos]
    pos += 1
    if tag == T_INT:  # (the commonest values, inline)
        if pos + 8 > end:
            raise _truncated(pos, 8, end)
        return _I64.unpack_from(buf, pos)[0], pos + 8
    if tag == T_STR:
        if pos + 4 <= end and not _U32.unpack_from(buf, pos)[0]:
            return "", pos + 4
        return _text(buf, pos, end)
    if tag == T_NONE:
        return None, pos
    if tag == T_MSG:
        return _get_message(buf, pos, end)
    if tag == T_LIST:
        if depth >= MAX_DEPTH:
            raise WireError(f"lists nest too deep at offset {pos}")
        n, pos = _count(buf, pos, end, 1)
        values = []
        for _ in range(n):
            value, pos = _get(buf, pos, end, depth + 1)
            values.append(value)
        return values, pos
    if tag in (T_FALSE, T_TRUE):
        return tag == T_TRUE, pos
    if tag == T_FLOAT:
        return _fixed(buf, pos, end, _F64)[0], pos + 8
    if tag == T_BYTES:
        return _blob(buf, pos, end)
    raise WireError(f"unknown tag {tag:#x} at offset {pos - 1}")


def _disposition(value: int, at: int) -> Disposition:
    try:
        return Disposition(value)
    except ValueError:
        raise WireError(f"bad port disposition {value} at offset {at}") from None


def _get_message(buf: Buf, pos: int, end: int) -> tuple[Message, int]:
    remote, local, msg_id, disp, uid, _n = _fixed(buf, pos, end, _MSG_HEAD)
    n, pos = _count(buf, pos + _MSG_HEAD.size - 4, end, 1)
    items, pos = get_items(buf, pos, end, n)
    local_disp = None if disp == 0 else _disposition(disp, pos)
    return Message(remote, local, msg_id, items, local_disp,
                   sender_uid=None if uid < 0 else uid), pos


def get_items(buf: Buf, pos: int, end: int, n: int) -> tuple[list[Item], int]:
    """`n` message items from `pos` (their count already checked against the rest of
    the body, at least one byte each) and the offset after them; WireError otherwise."""
    items = []
    for _ in range(n):
        item, pos = _get_item(buf, pos, end)
        items.append(item)
    return items, pos


def _get_item(buf: Buf, pos: int, end: int) -> tuple[Item, int]:
    if pos >= end:
        raise _truncated(pos, 1, end)
    get = _GET_ITEM.get(buf[pos])
    if get is None:
        raise WireError(f"unknown item type {buf[pos]:#x} at offset {pos}")
    item: tuple[Item, int] = get(buf, pos + 1, end)
    return item


def _get_int(buf: Buf, pos: int, end: int) -> tuple[Int, int]:
    return Int(_fixed(buf, pos, end, _I64)[0]), pos + 8


def _get_float(buf: Buf, pos: int, end: int) -> tuple[Float, int]:
    return Float(_fixed(buf, pos, end, _F64)[0]), pos + 8


def _get_bytes(buf: Buf, pos: int, end: int) -> tuple[Bytes, int]:
    data, pos = _blob(buf, pos, end)
    return Bytes(data), pos


def _get_str(buf: Buf, pos: int, end: int) -> tuple[Str, int]:
    text, pos = _text(buf, pos, end)
    return Str(text), pos


def _ints(buf: Buf, pos: int, end: int) -> tuple[tuple[int, ...], int]:
    n, pos = _count(buf, pos, end, 8)
    return struct.unpack_from(f"<{n}q", buf, pos), pos + 8 * n


def _get_int_array(buf: Buf, pos: int, end: int) -> tuple[IntArray, int]:
    values, pos = _ints(buf, pos, end)
    return IntArray(values), pos


def _get_port(buf: Buf, pos: int, end: int) -> tuple[Port, int]:
    name, disp = _fixed(buf, pos, end, _PORT)
    return Port(name, _disposition(disp, pos - 1)), pos + _PORT.size


def _get_port_array(buf: Buf, pos: int, end: int) -> tuple[PortArray, int]:
    if pos >= end:
        raise _truncated(pos, 1, end)
    disp = _disposition(buf[pos], pos - 1)
    names, pos = _ints(buf, pos + 1, end)
    return PortArray(names, disp), pos


def _get_ool(buf: Buf, pos: int, end: int) -> tuple[OOL, int]:
    address, size, flags = _fixed(buf, pos, end, _OOL_HEAD)
    if flags & ~(OOL_DEALLOCATE | OOL_DATA):
        raise WireError(f"bad OOL flags {flags:#x} at offset {pos - 1}")
    pos += _OOL_HEAD.size
    data = None
    if flags & OOL_DATA:
        data, pos = _blob(buf, pos, end)
    return OOL(address, size, bool(flags & OOL_DEALLOCATE), data), pos


def _get_code(buf: Buf, pos: int, end: int) -> tuple[Code, int]:
    uid, flags, _n = _fixed(buf, pos, end, _CODE_HEAD)
    blob, pos = _blob(buf, pos + _CODE_HEAD.size - 4, end)
    refused = bool(flags & CODE_REFUSED)
    return Code(None, blob=None if refused else blob, origin_uid=uid, refused=refused), pos


_GET_ITEM: dict[int, Any] = {
    I_INT: _get_int, I_FLOAT: _get_float, I_BYTES: _get_bytes, I_STR: _get_str,
    I_INTARRAY: _get_int_array, I_PORT: _get_port, I_PORTARRAY: _get_port_array,
    I_OOL: _get_ool, I_CODE: _get_code,
}


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
