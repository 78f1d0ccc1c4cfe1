"""Kernel messages: a message in transit, with port objects instead of names.

`copyin` turns a task's `Message` into a `KMsg`, taking the rights it carries out of the
sender's space; `copyout` puts them into the receiver's space and returns a `Message`.

Invariant: copyin is all-or-nothing. It first checks every right against a scratch copy
of the sender's entries and only then changes anything, so a refused message leaves the
sender exactly as it was. Rights inside a KMsg belong to the message until copyout or
`ipc_right.kmsg_destroy`.

Accounting (the limits of one task): a message a task sends to a queue is charged the
page-rounded size of its out-of-line items (`ool_charge`; address ranges and data=bytes
alike) against the *sender's* `IpcSpace.ool_queued`, up to the kernel's `ool_queued_max`
(SEND_NO_BUFFER beyond it). The sender is charged, not the receiver, because the sender
decides to make the kernel hold the memory: charging receivers would let any client
use up a server's allowance and make its other clients fail. The charge is released
exactly once (`kmsg_uncharge`), when the message is dequeued for receipt or destroyed
(port death, which task death causes for the ports it received on). Invariant:
`space.ool_queued` is the sum of `charge` over the queued messages charged to it.
Receiving needs room for the rights' new names (`copyout_names_needed`).

A *plain* message (only data items: Int, Float, Bytes, Str, IntArray; the common RPC)
takes the same checks with nothing to look at but its header: copyin marks its KMsg
`plain`, and copyout and the receive checks skip the item walks for it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

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
    message_size,
)
from pymach.include.vm_param import round_page, trunc_page
from pymach.ipc.port import port_receiver_changed

if TYPE_CHECKING:
    from pymach.ipc.port import Port as KernelPort
    from pymach.ipc.space import IpcEntry, IpcSpace
    from pymach.vm.vm_map_copy import VmMapCopy

_kmsg_seq = itertools.count(1)


def next_kmsg_seqno() -> int:
    """A sequence number later than every message's so far (the group receive order)."""
    return next(_kmsg_seq)

# What each disposition needs from the sender's entry and what the message then carries.
_ARRIVES_AS = {
    Disposition.COPY_SEND: Disposition.MOVE_SEND,
    Disposition.MAKE_SEND: Disposition.MOVE_SEND,
    Disposition.MOVE_SEND: Disposition.MOVE_SEND,
    Disposition.MOVE_RECEIVE: Disposition.MOVE_RECEIVE,
    Disposition.MOVE_OWNERSHIP: Disposition.MOVE_OWNERSHIP,
    Disposition.MOVE_ALL: Disposition.MOVE_ALL,
}


@dataclass
class KPort:
    """A port right inside a kernel message; `kind` is how it arrives (MOVE_*)."""

    port: KernelPort | None
    kind: Disposition = Disposition.MOVE_SEND

    def data_size(self) -> int:
        return 4


@dataclass
class KPortArray:
    """An array of port rights of one kind inside a kernel message."""

    ports: list[KernelPort | None]
    kind: Disposition = Disposition.MOVE_SEND

    def data_size(self) -> int:
        return 4 * len(self.ports)


@dataclass
class KOOL:
    """Out-of-line memory inside a kernel message: a copy-on-write copy in transit."""

    copy: VmMapCopy

    def data_size(self) -> int:
        return 8


KItem = Item | KPort | KPortArray | KOOL


@dataclass
class KMsg:
    """A message in the kernel: destination and reply as port objects, rights as KPorts."""

    dest: KernelPort
    reply: KernelPort | None
    id: int
    items: list[KItem]
    sender: str = "kernel"  # name of the sending task, for traces and reports
    sender_uid: int = -1  # the sending task's user (the receiver's trailer); -1: kernel
    seqno: int = field(default_factory=next_kmsg_seqno)
    charged: IpcSpace | None = None  # the space its out-of-line bytes are charged to
    charge: int = 0  # those bytes (see module docstring)
    notify_overflow: bool = False  # the kernel's NOTIFY_OVERFLOW notice (ipc_notify.py)
    plain: bool = False  # only data items (set by copyin; see module docstring)

    @property
    def size(self) -> int:
        return message_size(self.items)


# With unlimited swap, the default ool_queued_max counts swap as this many times memory.
UNLIMITED_SWAP_FACTOR = 3


def ool_queued_limit(value: int | None, memory_size: int, swap_size: int | None) -> int:
    """The ool_queued_max boot parameter: `value` (a positive int), or by default what
    the kernel can hold at all, memory plus swap (swap counted as UNLIMITED_SWAP_FACTOR
    times memory when it is unlimited, so 4 * memory_size)."""
    if value is None:
        swap = UNLIMITED_SWAP_FACTOR * memory_size if swap_size is None else swap_size
        return memory_size + swap
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise MachError("KERN_INVALID_ARGUMENT", f"ool_queued_max must be a positive int "
                        f"or None, not {value!r}")
    return value


def ool_charge(msg: Message, page_size: int) -> int:
    """Bytes of memory the out-of-line items of a (validated) message make the kernel
    hold while it is queued: whole pages, as the copies in transit cover."""
    total = 0
    for item in msg.items:
        if not isinstance(item, OOL) or not item.size:
            continue
        if item.data is not None:
            total += round_page(len(item.data), page_size)
        else:
            total += (round_page(item.address + item.size, page_size)
                      - trunc_page(item.address, page_size))
    return total


def ool_check_room(space: IpcSpace, msg: Message, charge: int) -> None:
    """SEND_NO_BUFFER unless `charge` more bytes (of `msg`) fit the sender's out-of-line
    allowance; a message that is wrong anyway gets that error first (copyin_check)."""
    limit = space.task.kernel.ool_queued_max
    if charge and space.ool_queued + charge > limit:
        copyin_check(space, msg)
        raise MachError("SEND_NO_BUFFER", f"task {space.task.name!r} has {space.ool_queued} "
                        f"bytes of out-of-line memory queued; {charge} more would pass the "
                        f"limit of {limit} (ool_queued_max); nothing was sent")


def kmsg_charge(space: IpcSpace, kmsg: KMsg, charge: int) -> None:
    """Charge a message about to be queued to its sender's space."""
    if charge:
        kmsg.charged, kmsg.charge = space, charge
        space.ool_queued += charge


def kmsg_uncharge(kmsg: KMsg) -> None:
    """Release a message's charge (idempotent): it was dequeued or destroyed."""
    space, kmsg.charged = kmsg.charged, None
    if space is not None:
        space.ool_queued -= kmsg.charge
        kmsg.charge = 0


@dataclass
class _Scratch:
    """A copy of one entry's rights, changed as copyin checks each item."""

    send: bool
    receive: bool
    owner: bool


def _holds_for(s: _Scratch, disp: Disposition) -> bool:
    """True if rights `s` can give `disp`."""
    if disp == Disposition.COPY_SEND:
        return s.send or s.receive or s.owner
    if disp in (Disposition.MAKE_SEND, Disposition.MOVE_RECEIVE):
        return s.receive
    if disp == Disposition.MOVE_SEND:
        return s.send
    if disp == Disposition.MOVE_OWNERSHIP:
        return s.owner
    if disp == Disposition.MOVE_ALL:
        return s.receive and s.owner
    raise KeyError(disp)  # (as the table this replaces: not a disposition)


def _check_right(scratch: dict[int, _Scratch], space: IpcSpace, name: int,
                 disp: Disposition, code: str) -> KernelPort:
    """Check that `name` can give `disp`, update the scratch rights; return the port."""
    entry: IpcEntry = space.lookup(name, code)
    s = scratch.setdefault(name, _Scratch(entry.send, entry.receive, entry.owner))
    if not _holds_for(s, disp):
        raise MachError(code, f"name {name} does not hold the right for {disp.name}")
    if disp == Disposition.MOVE_SEND:
        s.send = False
    if disp in (Disposition.MOVE_RECEIVE, Disposition.MOVE_ALL):
        s.receive, s.send = False, True
    if disp in (Disposition.MOVE_OWNERSHIP, Disposition.MOVE_ALL):
        s.owner, s.send = False, True
    return entry.port


def _reply_disposition(space: IpcSpace, msg: Message) -> Disposition:
    if msg.local_disposition is not None:
        return msg.local_disposition
    entry = space.names.get(msg.local_port)
    return Disposition.MAKE_SEND if entry is not None and entry.receive else Disposition.COPY_SEND


_PLAIN_ITEMS = frozenset((Int, Float, Bytes, Str, IntArray))


def is_plain(items: list[Item]) -> bool:
    """True if every item is a data item (no right, region or code): see docstring."""
    plain = _PLAIN_ITEMS
    return all(type(i) in plain for i in items)


def copyin_check(space: IpcSpace, msg: Message,
                 plain: bool = False) -> tuple[KernelPort, KernelPort | None]:
    """Phase 1: check the whole message against the sender's rights; change nothing.
    `plain`: the caller found only data items (is_plain): only the header is checked."""
    scratch: dict[int, _Scratch] = {}
    dest = _check_right(scratch, space, msg.remote_port, Disposition.COPY_SEND,
                        "SEND_INVALID_PORT")
    reply = None
    if msg.local_port:
        reply = _check_right(scratch, space, msg.local_port, _reply_disposition(space, msg),
                             "SEND_INVALID_PORT")
    if plain:
        return dest, reply
    _check_ool(space, msg)
    for item in msg.items:
        names = (item.name,) if isinstance(item, Port) else (
            item.names if isinstance(item, PortArray) else ())
        for name in names:
            port = _check_right(scratch, space, name, item.disposition,  # type: ignore[union-attr]
                                "SEND_INVALID_RIGHT")
            _check_not_circular(port, dest, item.disposition)  # type: ignore[union-attr]
    return dest, reply


def _check_ool(space: IpcSpace, msg: Message) -> None:
    """Every out-of-line region must be allocated and readable, and a region that leaves
    the sender (deallocate) may not overlap another region of the same message."""
    from pymach.vm.vm_map_copy import vm_map_copy_check

    regions = [i for i in msg.items if isinstance(i, OOL) and i.data is None and i.size]
    vmap = space.task.map
    for item in regions:
        if vmap is None:
            raise MachError("SEND_INVALID_MEMORY", "the sender has no address space")
        try:
            vm_map_copy_check(vmap, item.address, item.size)
        except MachError as e:
            raise MachError("SEND_INVALID_MEMORY", f"out-of-line region {item.address:#x}+"
                            f"{item.size:#x}: {e.detail}") from None
    ps = space.task.kernel.page_size
    for a in regions:
        for b in regions:
            if a is not b and (a.deallocate or b.deallocate) and _overlap(a, b, ps):
                raise MachError("SEND_INVALID_MEMORY", "a deallocated out-of-line region "
                                "shares a page with another region of the message")


def _overlap(a: OOL, b: OOL, page_size: int) -> bool:
    """True if two regions touch a common page (deallocation works on whole pages)."""
    a0, a1 = a.address // page_size, (a.address + a.size - 1) // page_size
    b0, b1 = b.address // page_size, (b.address + b.size - 1) // page_size
    return a0 <= b1 and b0 <= a1


def _copyin_ool(space: IpcSpace, item: OOL) -> KOOL:
    """Phase 2 for one region: make the copy in transit (checked already; cannot fail)."""
    from pymach.vm.vm_map_copy import vm_map_copy_from_bytes, vm_map_copyin

    vm = space.task.kernel.vm
    if item.data is not None:
        return KOOL(vm_map_copy_from_bytes(vm, item.data))
    if item.size == 0:
        return KOOL(vm_map_copy_from_bytes(vm, b""))
    assert space.task.map is not None
    return KOOL(vm_map_copyin(space.task.map, item.address, item.size, item.deallocate))


def _check_not_circular(port: KernelPort, dest: KernelPort, disp: Disposition) -> None:
    if port is dest and disp in (Disposition.MOVE_RECEIVE, Disposition.MOVE_ALL):
        raise MachError("SEND_INVALID_RIGHT", "a port's receive rights cannot be sent to itself")


def _take_right(space: IpcSpace, name: int, disp: Disposition) -> KernelPort:
    """Phase 2 for one right: remove what `disp` moves out of the sender's entry."""
    entry = space.names[name]
    port = entry.port
    if disp == Disposition.MOVE_SEND:
        entry.send = False
    if disp in (Disposition.MOVE_RECEIVE, Disposition.MOVE_ALL):
        if port.observer is not None:
            port.observer.receiver_leaving(port)
        entry.receive = False
        port.receiver, port.receive_in_transit, port.enabled = None, True, False
        port_receiver_changed(port)
        port.sched.thread_wakeup(port.rcv_waitq)  # the sender's blocked receives now fail
        entry.send = True  # the sender keeps a send right
    if disp in (Disposition.MOVE_OWNERSHIP, Disposition.MOVE_ALL):
        entry.owner = False
        port.owner, port.ownership_in_transit = None, True
        entry.send = True
    space.drop_if_empty(name)
    return port


def copyin(space: IpcSpace, msg: Message, sender: str) -> KMsg:
    """Turn a checked user message into a KMsg, moving rights out of `space`."""
    plain = is_plain(msg.items)
    dest, reply = copyin_check(space, msg, plain)
    if reply is not None:
        _take_right(space, msg.local_port, _reply_disposition(space, msg))
    if plain:
        return KMsg(dest, reply, msg.id, list(msg.items), sender=sender,
                    sender_uid=space.task.uid, plain=True)
    items: list[KItem] = []
    for item in msg.items:
        if isinstance(item, Port):
            items.append(KPort(_take_right(space, item.name, item.disposition),
                               _ARRIVES_AS[item.disposition]))
        elif isinstance(item, PortArray):
            ports: list[KernelPort | None] = [
                _take_right(space, n, item.disposition) for n in item.names]
            items.append(KPortArray(ports, _ARRIVES_AS[item.disposition]))
        elif isinstance(item, OOL):
            items.append(_copyin_ool(space, item))
        elif isinstance(item, Code):
            items.append(replace(item, origin_uid=space.task.uid))  # the kernel's word
        else:
            items.append(item)
    return KMsg(dest, reply, msg.id, items, sender=sender, sender_uid=space.task.uid)


def _put_right(space: IpcSpace, port: KernelPort | None, kind: Disposition,
               name: int | None = None) -> int:
    """Copyout one right into `space` (under `name` if given: IpcSpace.insert); a right
    to a dead port arrives as PORT_NULL."""
    if port is None or port.dead:
        return 0
    recv = kind in (Disposition.MOVE_RECEIVE, Disposition.MOVE_ALL)
    own = kind in (Disposition.MOVE_OWNERSHIP, Disposition.MOVE_ALL)
    name = space.insert(port, send=True, receive=recv, owner=own, name=name)
    if recv:
        port.receiver, port.receive_in_transit = space.task, False
        if port.owner is None and not port.ownership_in_transit:
            port.owner = space.task
            space.names[name].owner = True
        port_receiver_changed(port)
    if own:
        port.owner, port.ownership_in_transit = space.task, False
    return name


def right_out(space: IpcSpace, name: int, disposition: Disposition) -> KPort:
    """One right taken out of `space` as a message item with `disposition` would take it
    (checked as copyin checks; KERN_INVALID_RIGHT if the name cannot give it): the right
    in transit."""
    _check_right({}, space, name, disposition, "KERN_INVALID_RIGHT")
    return KPort(_take_right(space, name, disposition), _ARRIVES_AS[disposition])


def right_in(space: IpcSpace, right: KPort, name: int) -> None:
    """A right in transit given to `space` under `name`, as copyout would give it
    (KERN_INVALID_RIGHT if its port died on the way: the name stays unused)."""
    if right.port is None or right.port.dead:
        raise MachError("KERN_INVALID_RIGHT", "the port died before its right arrived")
    space.check_new_name(name, right.port)
    _put_right(space, right.port, right.kind, name)


def _put_ool(space: IpcSpace, item: KOOL) -> OOL:
    """Copyout one region: map the copy anywhere in the receiver's address space."""
    from pymach.vm.vm_map_copy import vm_map_copy_discard, vm_map_copyout

    if space.task.map is None:
        vm_map_copy_discard(item.copy)
        return OOL(0, 0)
    return OOL(vm_map_copyout(space.task.map, item.copy), item.copy.size)


def copyout_fits(space: IpcSpace, kmsg: KMsg) -> bool:
    """True if the out-of-line regions of `kmsg` fit in the receiver's address space."""
    if kmsg.plain:
        return True
    total = sum(i.copy.total for i in kmsg.items if isinstance(i, KOOL))
    vmap = space.task.map
    if total == 0 or vmap is None:
        return True
    try:
        vmap.find_space(total)
    except MachError:
        return False
    return True


def copyout_names_needed(space: IpcSpace, kmsg: KMsg) -> int:
    """How many new names copying out `kmsg` would add to `space` (live ports it has no
    name for yet, each counted once)."""
    if kmsg.plain:
        reply = kmsg.reply
        return int(reply is not None and not reply.dead and space not in reply.holders)
    ports: set[KernelPort] = set()
    if kmsg.reply is not None:
        ports.add(kmsg.reply)
    for item in kmsg.items:
        if isinstance(item, KPort) and item.port is not None:
            ports.add(item.port)
        elif isinstance(item, KPortArray):
            ports.update(p for p in item.ports if p is not None)
    return sum(1 for p in ports if not p.dead and space not in p.holders)


def copyout(space: IpcSpace, kmsg: KMsg) -> Message:
    """Deliver a dequeued KMsg into `space`; returns the task's view of it."""
    local = space.name_of(kmsg.dest) or 0
    remote = _put_right(space, kmsg.reply, Disposition.MOVE_SEND) if kmsg.reply else 0
    if kmsg.plain:
        return Message(remote_port=remote, local_port=local, id=kmsg.id,
                       items=list(kmsg.items),  # type: ignore[arg-type]
                       sender_uid=None if kmsg.sender_uid < 0 else kmsg.sender_uid)
    items: list[Item] = []
    for item in kmsg.items:
        if isinstance(item, KPort):
            items.append(Port(_put_right(space, item.port, item.kind), item.kind))
        elif isinstance(item, KPortArray):
            names = tuple(_put_right(space, p, item.kind) for p in item.ports)
            items.append(PortArray(names, item.kind))
        elif isinstance(item, KOOL):
            items.append(_put_ool(space, item))
        elif isinstance(item, Code) and item.origin_uid != space.task.uid:
            items.append(Code(None, origin_uid=item.origin_uid, refused=True))  # another
            # user's code is never decoded here: it arrives inert
        else:
            items.append(item)
    return Message(remote_port=remote, local_port=local, id=kmsg.id, items=items,
                   sender_uid=None if kmsg.sender_uid < 0 else kmsg.sender_uid)

