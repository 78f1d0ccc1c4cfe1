"""The life of rights: deallocation, transfer between receiver and owner, port death.

Mach 2.5 rules, kept here and nowhere else:
- a task that gives up receive rights but is not the owner passes them to the owner
  (who gets NOTIFY_RECEIVE_RIGHTS); one that gives up ownership passes it to the receiver
  (NOTIFY_OWNERSHIP_RIGHTS); one that holds both and gives them up destroys the port;
- when a port is destroyed, every other task holding rights to it loses its name and gets
  NOTIFY_PORT_DELETED, blocked senders and receivers wake with an error, and the messages
  still queued are destroyed, releasing the rights they carry (which may destroy more
  ports: receive rights in a destroyed message are receive rights destroyed).
All functions run with the kernel lock held.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pymach.include.message import Disposition
from pymach.ipc.ipc_mqueue import mqueue_wake_all
from pymach.ipc.ipc_notify import (
    NOTIFY_OWNERSHIP_RIGHTS,
    NOTIFY_PORT_DELETED,
    NOTIFY_RECEIVE_RIGHTS,
    notify_task,
)
from pymach.ipc.kmsg import KOOL, KMsg, KPort, KPortArray, kmsg_uncharge
from pymach.ipc.port import port_receiver_changed

if TYPE_CHECKING:
    from pymach.ipc.port import Port
    from pymach.ipc.space import IpcSpace


def entry_deallocate(space: IpcSpace, name: int) -> None:
    """port_deallocate: remove all of `space`'s rights named `name` (name must exist)."""
    entry = space.remove(name)
    port = entry.port
    if entry.receive and entry.owner:
        port_destroy(port)
    elif entry.receive:
        receive_right_lost(port)
    elif entry.owner:
        ownership_lost(port)


def receive_right_lost(port: Port) -> None:
    """The port's receive rights were given up or destroyed: to the owner, else death."""
    if port.observer is not None:
        port.observer.receiver_leaving(port)
    port.receiver, port.receive_in_transit, port.enabled = None, False, False
    owner = port.owner
    if owner is not None and owner.active:
        name = owner.space.insert(port, send=True, receive=True)
        port.receiver = owner
        port_receiver_changed(port)
        mqueue_wake_all(port)
        notify_task(owner, NOTIFY_RECEIVE_RIGHTS, name)
    else:
        port_destroy(port)


def ownership_lost(port: Port) -> None:
    """The port's ownership was given up or destroyed: to the receiver, else wait for it."""
    port.owner, port.ownership_in_transit = None, False
    receiver = port.receiver
    if receiver is not None and receiver.active:
        name = receiver.space.insert(port, send=True, owner=True)
        port.owner = receiver
        notify_task(receiver, NOTIFY_OWNERSHIP_RIGHTS, name)
    elif not port.receive_in_transit:
        port_destroy(port)


def port_destroy(port: Port) -> None:
    """Destroy a port: notify holders, fail waiters, destroy queued messages."""
    if port.dead:
        return
    if port.observer is not None:
        port.observer.receiver_leaving(port)
    port.dead = True
    port.receiver = port.owner = None
    port.receive_in_transit = port.ownership_in_transit = port.enabled = False
    for space, name in list(port.holders.items()):
        space.remove(name)
        if space.active:
            notify_task(space.task, NOTIFY_PORT_DELETED, name)
    port.kernel.trace_event(f"port death {port.label or port.serial}")
    while port.queue:
        kmsg_destroy(port.queue.popleft())
    mqueue_wake_all(port)
    port_receiver_changed(port)
    port.receiver_hooks = []
    hooks, port.death_hooks = port.death_hooks, []
    for hook in hooks:
        hook(port)


def kmsg_destroy(kmsg: KMsg) -> None:
    """Release every right and region a message carries (it will never be received),
    and its sender's charge for queued out-of-line memory."""
    kmsg_uncharge(kmsg)
    for item in kmsg.items:
        if isinstance(item, KPort):
            _release_in_transit(item.port, item.kind)
        elif isinstance(item, KPortArray):
            for p in item.ports:
                _release_in_transit(p, item.kind)
        elif isinstance(item, KOOL):
            from pymach.vm.vm_map_copy import vm_map_copy_discard

            vm_map_copy_discard(item.copy)


def _release_in_transit(port: Port | None, kind: Disposition) -> None:
    if port is None or port.dead:
        return
    if kind == Disposition.MOVE_ALL:
        port_destroy(port)
    elif kind == Disposition.MOVE_RECEIVE:
        receive_right_lost(port)
    elif kind == Disposition.MOVE_OWNERSHIP:
        ownership_lost(port)


def space_destroy(space: IpcSpace) -> None:
    """A task died: give up every right in its space, in name order."""
    space.active = False
    for name in sorted(space.names):
        if name in space.names:
            entry_deallocate(space, name)
    space.clear_ready()
