"""`pymach demo vm`: copy-on-write after task_create, sharing, and a large OOL message.

The narration shows the paper's section 3.3 at work on the embedded kernel: a child
created by task_create inherits one region copy-on-write and another shared; writes
on either side fault (vm_stat counts them) and the `vmmap` report shows the shadow
objects and the sharing map. Then a 64 MiB region travels out of line to another task
in one message, without copying, and stays isolated from later writes; finally memory
much smaller than the data pages out to the default pager's swap file and back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pymach
from pymach import OOL, Message, Port
from pymach.vm.vm_report import format_vmmap

MIB = 1 << 20


def _cow_and_share(kernel: pymach.Kernel, say: Callable[[str], None]) -> None:
    me = pymach.task_self()
    mem = pymach.memory()
    private = pymach.vm_allocate(me, 0, 4 * 4096, True)
    shared = pymach.vm_allocate(me, 0, 4096, True)
    pymach.vm_inherit(me, shared, 4096, pymach.VM_INHERIT_SHARE)
    mem[private:private + 8] = b"original"
    mem[shared:shared + 6] = b"parent"
    say(f"[parent] wrote 'original' at {private:#x} (inherit copy) and 'parent' at "
        f"{shared:#x} (inherit share)")
    before = kernel.vm_stat()["cow_faults"]
    child = kernel.spawn(_child, private, shared, name="child", inherit=True)
    seen, after_write = child.result(timeout=30_000)
    say(f"[child]  read {seen!r}, wrote 'CHILD!!!', now reads {after_write!r}")
    say(f"[parent] still reads {mem[private:private + 8]!r} in the copied region, and "
        f"{mem[shared:shared + 6]!r} in the shared one")
    mem[private:private + 8] = b"PARENT!!"
    say(f"[parent] wrote 'PARENT!!' too; copy-on-write faults so far: "
        f"{kernel.vm_stat()['cow_faults'] - before}")
    say("\n" + format_vmmap("bootstrap", kernel.vmmap("bootstrap")) + "\n")


def _child(private: int, shared: int) -> tuple[bytes, bytes]:
    mem = pymach.memory()
    seen = mem[private:private + 8]
    mem[private:private + 8] = b"CHILD!!!"
    mem[shared:shared + 6] = b"CHILD!"
    return seen, mem[private:private + 8]


def _big_ool(kernel: pymach.Kernel, say: Callable[[str], None], timing: bool) -> None:
    me = pymach.task_self()
    mem = pymach.memory()
    size = 64 * MIB
    region = pymach.vm_allocate(me, 0, size, True)
    for off in range(0, size, 1 << 16):
        mem[region + off] = 0xAB
    port = pymach.port_allocate(me)
    receiver = kernel.spawn(_receive_big, name="receiver")
    notify = pymach.task_get_special_port(receiver.port, pymach.TASK_NOTIFY_PORT)
    pymach.msg_send(Message(remote_port=notify, items=[Port(port, pymach.MAKE_SEND)]))
    reply = pymach.msg_receive(port, pymach.RCV_TIMEOUT, 30_000)  # receiver's port
    handed = reply.items[0]
    assert isinstance(handed, Port)
    target = handed.name
    t0 = time.perf_counter()
    pymach.msg_send(Message(remote_port=target, items=[OOL(region, size)]))
    sent = time.perf_counter() - t0
    mem[region] = 0xCD  # the receiver's copy must not see this
    pymach.msg_send(Message(remote_port=target, id=2))  # "look now"
    first, size_seen = receiver.result(timeout=30_000)
    when = f" in {sent * 1e3:.2f} ms" if timing else ""
    say(f"[parent] sent a 64 MiB region out of line{when}, then changed its first byte")
    say(f"[receiver] got {size_seen >> 20} MiB; its first byte is {first:#x} (the value "
        f"at send time)")


def _receive_big() -> tuple[int, int]:
    me = pymach.task_self()
    back = pymach.msg_receive(pymach.task_notify(), pymach.RCV_TIMEOUT, 30_000)
    inbox = pymach.port_allocate(me)
    pymach.msg_send(Message(remote_port=back.items[0].value,  # type: ignore[arg-type]
                            items=[Port(inbox, pymach.MAKE_SEND)]))
    msg = pymach.msg_receive(inbox, pymach.RCV_TIMEOUT, 30_000)
    item = msg.items[0]
    assert isinstance(item, OOL)
    pymach.msg_receive(inbox, pymach.RCV_TIMEOUT, 30_000)  # the sender has changed its copy
    return pymach.memory()[item.address], item.size


def _pressure(say: Callable[[str], None], deterministic: bool, seed: int) -> None:
    with pymach.boot(memory_size=MIB, deterministic=deterministic, seed=seed) as k:
        me = pymach.task_self()
        mem = pymach.memory()
        size = 4 * MIB
        a = pymach.vm_allocate(me, 0, size, True)
        for i, off in enumerate(range(0, size, 4096)):
            mem[a + off:a + off + 4] = i.to_bytes(4, "little")
        ok = all(int.from_bytes(mem[a + off:a + off + 4], "little") == i
                 for i, off in enumerate(range(0, size, 4096)))
        s = k.vm_stat()
        say(f"[pressure] 4 MiB written and read back through 1 MiB of physical memory: "
            f"{'intact' if ok else 'CORRUPT'}; pageouts {s['pageouts']}, pageins "
            f"{s['pageins']}, reactivations {s['reactivations']}")


def run_vm_demo(deterministic: bool = False, seed: int = 0, trace: bool = False,
                out: Callable[[str], Any] = print) -> None:
    """Boot an embedded kernel and run the narrated VM demo, printing with `out`."""
    with pymach.boot(deterministic=deterministic, seed=seed, trace=trace) as kernel:
        out("-- virtual memory (paper 3.3, 5) --")
        _cow_and_share(kernel, out)
        _big_ool(kernel, out, timing=not deterministic)
        if trace:
            out("\nkernel trace:\n" + "\n".join(kernel.trace_log))
    _pressure(out, deterministic, seed)
