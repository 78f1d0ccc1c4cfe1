"""`pymach demo unixio`: UNIX-style file I/O on mapped files (paper section 8.1).

A file server task is the external pager for a temporary directory. A client opens a
file (the file is mapped into it), reads part of it, and starts a child with
`unixio.spawn`: the child inherits the open file through shared memory and continues
reading at its parent's offset, then appends a line, which the parent sees. fsync
writes the change back (pager_clean_request and pager_flush_request, then the server's
disk write and os.fsync). The file
is read again through Python's io layers, then by a new task from the kernel's cache
with no disk reads (section 9). Last, the errors a Python user expects. With --trace
the kernel-manager messages are printed at the end.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

import pymach
from pymach.apps import unixio
from pymach.apps.unixio_server import start_server

STORY = b"Once upon a time\nthere was a kernel.\n"


def _child(fd: int, say: Callable[[str], None]) -> None:
    """The child: same descriptor, same offset, same file."""
    at = unixio.lseek(fd, 0, os.SEEK_CUR)
    say(f"[child] continues at offset {at}: read(fd, 5) -> {unixio.read(fd, 5)!r}")
    unixio.lseek(fd, 0, os.SEEK_END)
    unixio.write(fd, b"It had a child.\n")
    say(f"[child] appended a line; the file is {unixio.fstat(fd).st_size} bytes")


def _read_all(name: str) -> bytes:
    fd = unixio.open(name)
    try:
        return unixio.read(fd, 1 << 20)
    finally:
        unixio.close(fd)


def run_unixio_demo(deterministic: bool = False, seed: int = 0, trace: bool = False,
                    out: Callable[[str], Any] = print) -> None:
    """Run the narrated section 8.1 demo in a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="pymach-unixio-") as root:
        with open(os.path.join(root, "story.txt"), "wb") as f:
            f.write(STORY)
        with pymach.boot(deterministic=deterministic, seed=seed, trace=trace) as kernel:
            _narrate(root, out)
            if trace:
                out("\nkernel-manager messages:\n" + "\n".join(
                    line for line in kernel.trace_log if "kernel ->" in line
                    or "-> kernel" in line))


def _narrate(root: str, say: Callable[[str], None]) -> None:
    say("-- UNIX-style file I/O on mapped files (paper 8.1) --")
    server_task, server = start_server(root)
    unixio.attach(server)  # (and our bootstrap port, so children find the server)
    say(f"[server] task {server_task.name!r} is the external pager for the files of a "
        f"directory")
    fd = unixio.open("story.txt", os.O_RDWR)
    address, size, _ = unixio.mapping(fd)
    (region,) = pymach.vm_regions(pymach.task_self(), address, size)
    say(f"[parent] open('story.txt', O_RDWR) -> fd {fd}: the file is mapped at "
        f"{address:#x} ({size >> 10} KiB, inheritance "
        f"{'share' if region.inheritance == pymach.VM_INHERIT_SHARE else 'WRONG'})")
    say(f"[parent] read(fd, 11) -> {unixio.read(fd, 11)!r}")
    unixio.spawn(_child, fd, say, name="child").result(60_000)
    at = unixio.lseek(fd, 0, os.SEEK_CUR)
    unixio.lseek(fd, 0, os.SEEK_SET)
    text = unixio.read(fd, 1 << 20)
    say(f"[parent] the shared offset is now {at}; the file reads {text!r}")
    say(f"[parent] the parent sees the child's line: "
        f"{'yes' if text == STORY + b'It had a child.' + bytes([10]) else 'WRONG'}")
    _fsync(root, fd, text, say)
    unixio.close(fd)
    _layers_and_cache(say)
    _errors(say)
    pymach.task_terminate(server_task.port)


def _fsync(root: str, fd: int, text: bytes, say: Callable[[str], None]) -> None:
    with open(os.path.join(root, "story.txt"), "rb") as f:
        before = f.read()
    writes = unixio.server_stats()["disk_writes"]
    unixio.fsync(fd)
    with open(os.path.join(root, "story.txt"), "rb") as f:
        after = f.read()
    say(f"[parent] before fsync the file on disk {'lacks' if before != text else 'has'} "
        f"the child's line; fsync (pager_clean_request, pager_flush_request): "
        f"{unixio.server_stats()['disk_writes'] - writes} disk write(s); on disk after "
        f"fsync: {'yes' if after == text else 'WRONG'}")


def _layers_and_cache(say: Callable[[str], None]) -> None:
    with unixio.io_open("story.txt", encoding="ascii") as f:
        layers = f"{type(f).__name__} over {type(f.buffer).__name__} over " \
                 f"{type(f.buffer.raw).__module__}.{type(f.buffer.raw).__name__}"
        lines = [line.rstrip("\n") for line in f]
    say(f"[parent] io_open('story.txt'): {layers}; lines {lines}")
    stats = unixio.server_stats()
    again = pymach.spawn(_read_all, "story.txt", name="reader").result(60_000)
    after = unixio.server_stats()
    say(f"[reader] a new task reads the file again: {len(again)} bytes, "
        f"{after['disk_reads'] - stats['disk_reads']} disk reads, "
        f"{after['pager_messages'] - stats['pager_messages']} pager messages (the pages "
        f"stayed cached in the kernel, section 9)")


def _errors(say: Callable[[str], None]) -> None:
    for what, call in (("open('missing')", lambda: unixio.open("missing")),
                       ("io_open('story.txt', 'rw')",
                        lambda: unixio.io_open("story.txt", "rw")),
                       ("read(42, 1)", lambda: unixio.read(42, 1))):
        try:
            call()
            say(f"[errors] {what}: no error (WRONG)")
        except (OSError, ValueError) as e:
            say(f"[errors] {what}: {type(e).__name__}: {e}")
