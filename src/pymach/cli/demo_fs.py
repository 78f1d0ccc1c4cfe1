"""`pymach demo fs`: the paper's section 4.1 client program against the minimal filesystem.

The client reads a file as copy-on-write memory, randomly changes its contents, writes
back half of it, and throws its copy away, exactly as in the paper. A second client
reads the file while the first is changing it, and sees the original contents. Then
the file is read twice more: the second read is served from the kernel's cache with no
pager messages (section 9). With --trace every kernel-manager message is printed.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Callable
from typing import Any

import pymach
from pymach import Message, Port
from pymach.pagers.fs import FileServer, fs_read_file, fs_write_file

FILE_SIZE = 4 * 4096


def _server(root: str) -> int:
    fs = FileServer(root)
    inbox = pymach.msg_receive(pymach.task_notify(), pymach.RCV_TIMEOUT, 30_000)
    svc = pymach.port_allocate(pymach.task_self())
    pymach.port_enable(pymach.task_self(), svc)
    pymach.msg_send(Message(remote_port=inbox.items[0].value,  # type: ignore[arg-type]
                            items=[Port(svc, pymach.MAKE_SEND)]))
    fs.serve()
    return fs.disk_reads


def _fs_server_port() -> int:
    """The file server's port: our bootstrap port (the demo set it so)."""
    return pymach.task_get_special_port(pymach.task_self(),  # type: ignore[no-any-return]
                                        pymach.TASK_BOOTSTRAP_PORT)


def _paper_client(kernel: pymach.Kernel, seed: int, original: bytes,
                  say: Callable[[str], None]) -> bytes:
    """The client program of section 4.1, line by line (plus a look by another task)."""
    server = _fs_server_port()
    rand = random.Random(seed).random  # random in [0,1)
    mem = pymach.memory()
    file_data, file_size = fs_read_file(server, "filename")  # read the file
    say(f"[client] fs_read_file: {file_size} bytes of copy-on-write memory at "
        f"{file_data:#x}")
    for _ in range(file_size):  # randomly change contents
        i = file_data + int(file_size * rand())
        mem[i] = (mem[i] + 1) % 256
    snapshot = mem[file_data:file_data + file_size]
    seen = kernel.run(_reader, name="reader")
    say(f"[reader] meanwhile another task reads the file: "
        f"{'the original contents' if seen == original else 'CHANGED CONTENTS'}")
    fs_write_file(server, "filename", file_data, file_size // 2)  # write back some results
    pymach.vm_deallocate(pymach.task_self(), file_data, file_size)  # throw away the copy
    say(f"[client] changed {file_size} random bytes, wrote back the first half, "
        f"deallocated its copy")
    return snapshot


def _reader() -> bytes:
    address, size = fs_read_file(_fs_server_port(), "filename")
    data = pymach.memory()[address:address + size]
    pymach.vm_deallocate(pymach.task_self(), address, size)
    return data


def _pager_messages(kernel: pymach.Kernel) -> int:
    return kernel.vm_stat()["pager_messages"]


def run_fs_demo(deterministic: bool = False, seed: int = 0, trace: bool = False,
                out: Callable[[str], Any] = print) -> None:
    """Run the narrated section 4.1 demo in a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="pymach-fs-") as root:
        original = bytes((i * 7 + i // 4096) % 251 for i in range(FILE_SIZE))
        with open(os.path.join(root, "filename"), "wb") as f:
            f.write(original)
        with pymach.boot(deterministic=deterministic, seed=seed, trace=trace) as kernel:
            _narrate(kernel, root, original, seed, out)
            if trace:
                out("\nkernel-manager messages:\n" + "\n".join(
                    line for line in kernel.trace_log if "kernel ->" in line
                    or "-> kernel" in line or "cache" in line))


def _narrate(kernel: pymach.Kernel, root: str, original: bytes, seed: int,
             say: Callable[[str], None]) -> None:
    say("-- the minimal filesystem (paper 4.1) --")
    me = pymach.task_self()
    inbox = pymach.port_allocate(me)
    server_task = kernel.spawn(_server, root, name="fs")
    notify = pymach.task_get_special_port(server_task.port, pymach.TASK_NOTIFY_PORT)
    pymach.msg_send(Message(remote_port=notify, items=[Port(inbox, pymach.MAKE_SEND)]))
    server = pymach.msg_receive(inbox, pymach.RCV_TIMEOUT, 30_000).items[0].value
    pymach.task_set_special_port(me, pymach.TASK_BOOTSTRAP_PORT, server)  # for our children
    snapshot = kernel.run(_paper_client, kernel, seed, original, say, name="client")
    before = _pager_messages(kernel)
    other = kernel.run(_reader, name="reader2")
    first = _pager_messages(kernel) - before
    with open(os.path.join(root, "filename"), "rb") as f:
        on_disk = f.read()
    half = len(original) // 2
    say(f"[disk]   the file is now {len(on_disk)} bytes: the client's first half "
        f"({'matches' if on_disk == snapshot[:half] else 'DIFFERS'}), "
        f"{sum(a != b for a, b in zip(on_disk, original, strict=False))} bytes changed")
    say(f"[reader2] a later read sees the new file: {'yes' if other == on_disk else 'NO'} "
        f"({first} kernel-to-manager messages)")
    before = _pager_messages(kernel)
    again = kernel.run(_reader, name="reader3")
    say(f"[reader3] reads it again: {'same data' if again == on_disk else 'WRONG'}, "
        f"{_pager_messages(kernel) - before} kernel-to-manager messages: the pages stayed "
        f"cached after the last unmap (pager_cache, section 9)")
