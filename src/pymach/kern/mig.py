"""MIG on the kernel's side: the item codec of the kernel's own server.

The interface definitions and the server dispatch are in include/mig.py (and the
kernel's interfaces in include/mach_defs.py); the client stubs are made by the user
library (pymach.mach). A request the kernel serves (kern/ipc_kobject.py) has been copied
in: its port arguments are port objects (`KPort`, `KPortArray`) and its out-of-line data a
copy in transit (`KOOL`); the kernel's implementation returns port objects and copies,
which become the same kernel items in the reply. `KERNEL_CODEC` does that conversion
and leaves every other item to the task-side codec.

The names of include/mig.py are re-exported here for code that imports them from
`pymach.kern.mig`.
"""

from __future__ import annotations

from typing import Any

from pymach.include.message import OOL, Disposition, Port, PortArray
from pymach.include.mig import (
    BOOL,
    BYTES,
    CODE,
    DATA,
    FLOAT,
    INT,
    INT_ARRAY,
    MEMORY,
    PORT,
    PORT_ARRAY,
    PORT_MAKE,
    PORT_MOVE_RECEIVE,
    PORT_POLY,
    REPLY_ID_OFFSET,
    REPLY_SIZE_ANY,
    STR,
    ArgType,
    ItemCodec,
    Routine,
    Subsystem,
    decode_items,
    encode_outs,
    error_reply,
    serve_message,
)
from pymach.ipc.kmsg import KOOL, KPort, KPortArray
from pymach.ipc.port import Port as KernelPort

# The kernel item that stands for each task-side item class.
_KERNEL_ITEMS: dict[type, type] = {Port: KPort, PortArray: KPortArray, OOL: KOOL}


class KernelCodec(ItemCodec):
    """Items of a kernel message (see module docstring)."""

    def accepts(self, t: ArgType, item: Any) -> bool:
        return super().accepts(t, item) or isinstance(
            item, tuple(_KERNEL_ITEMS[c] for c in t.items if c in _KERNEL_ITEMS))

    def to_item(self, t: ArgType, value: Any) -> Any:
        if isinstance(value, KPort):  # a right with its kind (PORT_POLY)
            return value
        if t.disposition is not None:
            if isinstance(value, KernelPort) or value is None:
                return KPort(value, Disposition.MOVE_SEND)
            if isinstance(value, tuple | list) and value and all(
                    v is None or isinstance(v, KernelPort) for v in value):
                return KPortArray(list(value), Disposition.MOVE_SEND)
        elif t.name in ("data", "memory"):
            if isinstance(value, KOOL):
                return value
            if not isinstance(value, OOL | bytes | bytearray | memoryview):
                return KOOL(value)  # a VmMapCopy made by the kernel
        return super().to_item(t, value)

    def from_item(self, t: ArgType, item: Any) -> Any:
        if isinstance(item, KPort):
            return item if t.name == "port_poly" else item.port
        if isinstance(item, KPortArray):
            return item.ports
        if isinstance(item, KOOL):
            return item.copy
        return super().from_item(t, item)


KERNEL_CODEC = KernelCodec()

__all__ = [
    "BOOL",
    "BYTES",
    "CODE",
    "DATA",
    "FLOAT",
    "INT",
    "INT_ARRAY",
    "KERNEL_CODEC",
    "MEMORY",
    "PORT",
    "PORT_ARRAY",
    "PORT_MAKE",
    "PORT_MOVE_RECEIVE",
    "PORT_POLY",
    "REPLY_ID_OFFSET",
    "REPLY_SIZE_ANY",
    "STR",
    "ArgType",
    "KernelCodec",
    "Routine",
    "Subsystem",
    "decode_items",
    "encode_outs",
    "error_reply",
    "serve_message",
]
