"""UNIX-style file I/O on mapped files (paper 8.1): pymach.apps.unixio and its server.

A file server task (apps/unixio_server.py) is the external pager for the files of a real
directory; the library maps each file it opens and reads and writes that memory. Checked:

- every call against the same calls of `os` on a second real directory, in random
  sequences (the model-based test): the bytes and the offsets each call returns, the
  errno of each failure, and after every fsync the bytes on disk;
- a child made by `unixio.spawn` (or by a plain spawn with inheritance) continues from
  its parent's offsets, and each sees the other's writes; a child's descriptors stay
  open after the parent closes its own, and a task that ends closes its files;
- two tasks writing one file see one content, also when the file grows past their
  mappings (each maps it again);
- fsync writes back through pager_clean_request and the server's disk write; a file
  read again is served from the kernel's cache with no I/O (section 9);
- the errors a Python user expects (missing files, directories, bad modes, bad
  descriptors), and the io layers (BufferedReader, TextIOWrapper...) over `FileIO`.

CONTRACT: each test runs embedded (both schedulers) and as a native task of machd.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import pymach as m
from machutil import wait_until
from nativeutil import native_kernel, running_machd
from pymach.apps import unixio
from pymach.apps.unixio_server import start_server

CONTRACT = True
ROOT = Path(__file__).resolve().parents[1]
CLOSED_OS_FD = 1 << 20  # above any descriptor limit: always EBADF


@pytest.fixture
def uio(kernel: Any, tmp_path: Path) -> Iterator[tuple[Any, Path, int]]:
    """A file server on tmp_path/root; the test's task is its client."""
    root = tmp_path / "root"
    root.mkdir()
    handle, port = start_server(str(root))
    unixio.attach(port)
    yield kernel, root, port
    with contextlib.suppress(m.MachError):
        m.task_terminate(handle.port)


def _pattern(tag: int, n: int) -> bytes:
    return bytes((i * 7 + tag * 31 + i // 251) % 256 for i in range(n))


def _whole(name: str) -> bytes:
    """A file's contents through the library (a fresh descriptor)."""
    fd = unixio.open(name)
    try:
        return unixio.read(fd, 1 << 30)
    finally:
        unixio.close(fd)


def _outcome(call: Callable[[], Any]) -> tuple[str, Any]:
    """("ok", value), or ("err", errno or the exception's type name)."""
    try:
        return "ok", call()
    except OSError as e:
        return "err", e.errno
    except ValueError as e:
        return "err", type(e).__name__


# -- the model: os calls on a real directory ------------------------------------------------

class Model:
    """Random operations applied to unixio (files under `root`) and to os (files under
    `ref`), compared call by call."""

    NAMES = ("a", "b", "c")
    FLAGS = (os.O_RDONLY, os.O_WRONLY | os.O_CREAT, os.O_RDWR | os.O_CREAT,
             os.O_RDWR | os.O_APPEND | os.O_CREAT, os.O_WRONLY | os.O_TRUNC | os.O_CREAT,
             os.O_RDWR | os.O_CREAT | os.O_EXCL, os.O_RDWR, os.O_WRONLY | os.O_APPEND)

    def __init__(self, root: Path, ref: Path, seed: int) -> None:
        self.root, self.ref, self.rng = root, ref, random.Random(seed)
        self.fds: list[tuple[int, int]] = []  # (ours, os); closed ones stay, to test EBADF
        self.appending: set[tuple[int, int]] = set()  # pairs opened with O_APPEND
        self.log: list[str] = []

    def both(self, what: str, ours: Callable[[], Any], theirs: Callable[[], Any],
             same_value: bool = True) -> tuple[tuple[str, Any], tuple[str, Any]]:
        """Both calls' outcomes, which must agree (in kind only for new descriptors)."""
        a, b = _outcome(ours), _outcome(theirs)
        self.log.append(f"{what} -> {str(b)[:60]}")
        agree = a == b if same_value or a[0] == "err" else a[0] == b[0]
        assert agree, f"{what}: unixio {a} but os {b}\n" + "\n".join(self.log[-15:])
        return a, b

    def step(self) -> None:
        ops = [self.open, self.read, self.read, self.write, self.write, self.lseek,
               self.pread, self.pwrite, self.ftruncate, self.fstat, self.fsync, self.dup,
               self.close]
        self.rng.choice(ops)()

    def pick(self) -> tuple[int, int] | None:
        if not self.fds:
            return None
        p = self.rng.choice(self.fds)
        self.log.append(f"  on fd {p[0]} (os fd {p[1]})")
        return p

    def open(self) -> None:
        name, flags = self.rng.choice(self.NAMES), self.rng.choice(self.FLAGS)
        a, b = self.both(f"open {name} {flags:#o}", lambda: unixio.open(name, flags),
                         lambda: os.open(self.ref / name, flags, 0o644), same_value=False)
        if a[0] == "ok":
            self.add((a[1], b[1]), bool(flags & os.O_APPEND))

    def add(self, pair: tuple[int, int], appending: bool) -> None:
        """A new pair of descriptors. A closed pair whose number came back is stale:
        it goes."""
        self.fds = [q for q in self.fds if q[0] != pair[0]] + [pair]
        self.appending.discard(pair)
        if appending:
            self.appending.add(pair)
        self.log.append(f"  new fd {pair[0]} (os fd {pair[1]})")

    def dup(self) -> None:
        if (p := self.pick()) is not None:
            a, b = self.both("dup", lambda: unixio.dup(p[0]), lambda: os.dup(p[1]),
                             same_value=False)
            if a[0] == "ok":
                self.add((a[1], b[1]), p in self.appending)

    def read(self) -> None:
        if (p := self.pick()) is not None:
            n = self.rng.choice([0, 1, 100, 4096, 5000, 20000])
            self.both(f"read {n}", lambda: unixio.read(p[0], n), lambda: os.read(p[1], n))

    def write(self) -> None:
        if (p := self.pick()) is not None:
            data = self.rng.randbytes(self.rng.choice([0, 1, 10, 3000, 9000]))
            self.both(f"write {len(data)}", lambda: unixio.write(p[0], data),
                      lambda: os.write(p[1], data))

    def lseek(self) -> None:
        if (p := self.pick()) is not None:
            how = self.rng.choice([os.SEEK_SET, os.SEEK_CUR, os.SEEK_END])
            # (not SEEK_DATA / SEEK_HOLE: where a file system keeps holes is its own
            # business; the server's files have none, which POSIX allows)
            pos = self.rng.choice([0, 1, -1, 100, 4096, 30000, -100000])
            self.both(f"lseek {pos} {how}", lambda: unixio.lseek(p[0], pos, how),
                      lambda: os.lseek(p[1], pos, how))

    def pread(self) -> None:
        if (p := self.pick()) is not None:
            n, at = self.rng.choice([1, 4096, 7000]), self.rng.choice([0, 5, 4095, 20000, -1])
            self.both(f"pread {n} {at}", lambda: unixio.pread(p[0], n, at),
                      lambda: os.pread(p[1], n, at))

    def pwrite(self) -> None:
        # (not with O_APPEND: Linux's pwrite then appends, a documented bug; unixio
        # writes at the offset, as POSIX says)
        if (p := self.pick()) is not None and p not in self.appending:
            data = self.rng.randbytes(self.rng.choice([1, 50, 5000]))
            at = self.rng.choice([0, 7, 4090, 12000, -1])
            self.both(f"pwrite {len(data)} {at}", lambda: unixio.pwrite(p[0], data, at),
                      lambda: os.pwrite(p[1], data, at))

    def ftruncate(self) -> None:
        if (p := self.pick()) is not None:
            n = self.rng.choice([0, 1, 100, 4096, 4097, 10000, 50000, -1])
            self.both(f"ftruncate {n}", lambda: unixio.ftruncate(p[0], n),
                      lambda: os.ftruncate(p[1], n))

    def fstat(self) -> None:
        if (p := self.pick()) is not None:
            self.both("fstat", lambda: unixio.fstat(p[0]).st_size,
                      lambda: os.fstat(p[1]).st_size)

    def fsync(self) -> None:
        if (p := self.pick()) is not None:
            a, _ = self.both("fsync", lambda: unixio.fsync(p[0]), lambda: os.fsync(p[1]))
            if a[0] == "ok":  # what fsync wrote is on the server's disk
                self.check_disk(self._name_of(p[0]))

    def _name_of(self, fd: int) -> str | None:
        ino = unixio.fstat(fd).st_ino
        return next((n for n in self.NAMES if (self.root / n).exists()
                     and (self.root / n).stat().st_ino == ino), None)

    def close(self) -> None:
        if (p := self.pick()) is not None:
            a, _ = self.both("close", lambda: unixio.close(p[0]), lambda: os.close(p[1]))
            if a[0] == "ok":  # keep it to try it again, but never with an os fd number
                # that may come back (to this process's other files: the server's, say)
                self.fds[self.fds.index(p)] = (p[0], CLOSED_OS_FD)

    def check_disk(self, only: str | None = None) -> None:
        for name in self.NAMES if only is None else (only,):
            if (self.ref / name).exists():
                assert (self.root / name).read_bytes() == (self.ref / name).read_bytes(), \
                    f"disk copy of {name} differs after fsync\n" + "\n".join(self.log[-15:])

    def check_contents(self) -> None:
        for name in self.NAMES:
            if (self.ref / name).exists():
                assert _whole(name) == (self.ref / name).read_bytes(), name

    def close_all(self) -> None:
        for ours, theirs in self.fds:
            with contextlib.suppress(OSError):
                unixio.close(ours)
            with contextlib.suppress(OSError):
                os.close(theirs)


def _model(root: Path, ref: Path, seed: int, steps: int) -> Model:
    model = Model(root, ref, seed)
    for name in model.NAMES[:2]:  # two files exist at the start
        data = model.rng.randbytes(model.rng.choice([0, 100, 9000]))
        (root / name).write_bytes(data)
        (ref / name).write_bytes(data)
    try:
        for i in range(steps):
            model.step()
            if i % 40 == 39:
                model.check_contents()
        model.check_contents()
    finally:
        model.close_all()
    unixio.sync()
    model.check_disk()
    return model


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_operations_match_os_calls(uio: tuple[Any, Path, int], tmp_path: Path,
                                          seed: int) -> None:
    _, root, _ = uio
    ref = tmp_path / "ref"
    ref.mkdir()
    model = _model(root, ref, seed, 160)
    assert len(model.log) > 100


# -- inheritance ------------------------------------------------------------------------------

def test_a_child_continues_reading_where_its_parent_stopped(uio: tuple[Any, Path, int]) -> None:
    _, root, _ = uio
    (root / "f").write_bytes(_pattern(1, 20000))
    fd = unixio.open("f", os.O_RDWR)
    assert unixio.read(fd, 100) == _pattern(1, 20000)[:100]

    def child() -> tuple[bytes, int]:
        data = unixio.read(fd, 50)  # the same descriptor: the parent's offset
        unixio.write(fd, b"written by the child")
        return data, unixio.lseek(fd, 0, os.SEEK_CUR)

    data, offset = unixio.spawn(child, name="child").result(30_000)
    assert data == _pattern(1, 20000)[100:150]
    assert offset == 170
    assert unixio.lseek(fd, 0, os.SEEK_CUR) == 170  # one offset, shared
    assert unixio.pread(fd, 20, 150) == b"written by the child"  # and one content
    unixio.close(fd)
    unixio.sync()
    assert (root / "f").read_bytes()[150:170] == b"written by the child"


def test_a_child_keeps_its_descriptors_after_the_parent_closes(
        uio: tuple[Any, Path, int]) -> None:
    _, root, _ = uio
    (root / "g").write_bytes(_pattern(2, 9000))
    fd = unixio.open("g")
    unixio.lseek(fd, 4000, os.SEEK_SET)
    signal = unixio.open("signal", os.O_RDWR | os.O_CREAT)

    def late_reader() -> bytes:
        while unixio.pread(signal, 1, 0) != b"1":  # until the parent has closed fd
            _nap()
        return unixio.read(fd, 10)  # not closing anything: the task's end does

    h = unixio.spawn(late_reader)
    unixio.close(fd)  # the child still holds the description (it came with its ticket)
    unixio.pwrite(signal, b"1", 0)
    assert h.result(30_000) == _pattern(2, 9000)[4000:4010]
    unixio.close(signal)
    wait_until(lambda: unixio.server_stats()["open_files"] == 0, 10_000)


def _nap(ms: float = 5) -> None:
    """Let time pass in the kernel."""
    me = m.task_self()
    p = m.port_allocate(me)
    with contextlib.suppress(m.MachError):
        m.msg_receive(p, m.RCV_TIMEOUT, ms)
    m.port_deallocate(me, p)


def test_a_plain_child_with_inheritance_takes_over_the_descriptors(
        uio: tuple[Any, Path, int]) -> None:
    _, root, _ = uio
    (root / "h").write_bytes(_pattern(3, 5000))
    fd = unixio.open("h")
    unixio.read(fd, 1000)

    def child() -> bytes:
        return unixio.read(fd, 10)  # found in the inherited u-area, referenced at once

    assert m.spawn(child, inherit=True).result(30_000) == _pattern(3, 5000)[1000:1010]
    assert unixio.lseek(fd, 0, os.SEEK_CUR) == 1010
    unixio.close(fd)


# -- two writers ----------------------------------------------------------------------------------

def _writer(name: str, tag: int, rounds: int, chunk: int) -> bytes:
    """Open `name` for itself and write its slots (every other chunk), growing the file."""
    fd = unixio.open(name, os.O_RDWR | os.O_CREAT)
    for i in range(rounds):
        unixio.pwrite(fd, bytes([tag]) * chunk, (2 * i + tag - 1) * chunk)
    data = unixio.pread(fd, 1 << 30, 0)
    unixio.close(fd)
    return data


def test_two_writers_see_one_content(uio: tuple[Any, Path, int]) -> None:
    _, root, _ = uio
    rounds, chunk = 40, 3000  # 240 KB: past both tasks' first mappings
    fd = unixio.open("shared", os.O_RDWR | os.O_CREAT)
    h = unixio.spawn(_writer, "shared", 2, rounds, chunk)
    mine = _writer("shared", 1, rounds, chunk)
    theirs = h.result(60_000)
    expected = b"".join(bytes([1]) * chunk + bytes([2]) * chunk for _ in range(rounds))
    final = unixio.pread(fd, 1 << 30, 0)
    assert final == expected
    for seen in (mine, theirs):  # each saw a prefix of the final content, never other bytes
        assert seen == final[:len(seen)] or all(
            a in (b, 0) for a, b in zip(seen, final, strict=False))
    unixio.fsync(fd)
    assert (root / "shared").read_bytes() == expected
    unixio.close(fd)


def test_a_file_grown_past_the_mapping_is_mapped_again(uio: tuple[Any, Path, int]) -> None:
    reader = unixio.open("grow", os.O_RDONLY | os.O_CREAT)
    _, first_capacity, writable = unixio.mapping(reader)
    assert not writable  # read-only until a descriptor of ours may write
    fd = unixio.open("grow", os.O_RDWR)
    assert unixio.mapping(fd)[2]  # mapped again, writable
    data = _pattern(4, 5 * first_capacity)
    for at in range(0, len(data), 10_000):
        unixio.write(fd, data[at:at + 10_000])
    address, capacity, _ = unixio.mapping(fd)
    assert capacity >= len(data) > first_capacity
    assert unixio.mapping(reader) == unixio.mapping(fd)  # one mapping per task and file
    regions = m.vm_regions(m.task_self())
    (mine,) = [r for r in regions if r.address == address]
    assert mine.size == capacity
    assert [r.address for r in regions if r.object_name == mine.object_name] == [address]
    assert unixio.read(reader, 1 << 30) == data
    unixio.close(fd)
    unixio.close(reader)


# -- write-back and the cache --------------------------------------------------------------------

def test_fsync_writes_back_through_clean_request(uio: tuple[Any, Path, int]) -> None:
    kernel, root, _ = uio
    (root / "s").write_bytes(bytes(20000))
    fd = unixio.open("s", os.O_RDWR)
    unixio.pwrite(fd, b"synced", 12000)
    before = unixio.server_stats()["disk_writes"]
    unixio.fsync(fd)
    assert unixio.server_stats()["disk_writes"] > before
    assert (root / "s").read_bytes()[12000:12006] == b"synced"
    if hasattr(kernel, "trace_log"):  # the embedded kernel shows the protocol
        log = "\n".join(str(e) for e in kernel.trace_log)
        assert "pager_clean_request" in log and "pager_data_write" in log
    unixio.close(fd)


def test_a_file_read_again_needs_no_io(uio: tuple[Any, Path, int]) -> None:
    _, root, _ = uio
    (root / "r").write_bytes(_pattern(5, 40000))
    assert _whole("r") == _pattern(5, 40000)
    before = unixio.server_stats()
    assert _whole("r") == _pattern(5, 40000)  # closed and opened again: cached pages
    m.spawn(_whole, "r").result(30_000)  # and so in another task
    after = unixio.server_stats()
    assert after["disk_reads"] == before["disk_reads"]
    assert after["pager_messages"] == before["pager_messages"]


def test_truncate_then_grow_reads_zeros(uio: tuple[Any, Path, int]) -> None:
    _, root, _ = uio
    fd = unixio.open("t", os.O_RDWR | os.O_CREAT)
    unixio.write(fd, _pattern(6, 10000))
    unixio.ftruncate(fd, 5000)
    unixio.ftruncate(fd, 9000)
    assert unixio.pread(fd, 9000, 0) == _pattern(6, 10000)[:5000] + bytes(4000)
    unixio.pwrite(fd, b"end", 12000)  # a hole
    assert unixio.pread(fd, 1 << 20, 0) == _pattern(6, 10000)[:5000] + bytes(7000) + b"end"
    unixio.fsync(fd)
    assert (root / "t").read_bytes() == _pattern(6, 10000)[:5000] + bytes(7000) + b"end"
    unixio.close(fd)


# -- errors -----------------------------------------------------------------------------------

def test_missing_files_directories_and_bad_descriptors(uio: tuple[Any, Path, int]) -> None:
    _, root, _ = uio
    (root / "d").mkdir()
    (root / "x").write_bytes(b"x")
    cases = [
        (lambda: unixio.open("missing"), FileNotFoundError, errno.ENOENT),
        (lambda: unixio.open(""), FileNotFoundError, errno.ENOENT),
        (lambda: unixio.open("d"), IsADirectoryError, errno.EISDIR),
        (lambda: unixio.open("d", os.O_WRONLY), IsADirectoryError, errno.EISDIR),
        (lambda: unixio.open("x", os.O_CREAT | os.O_EXCL | os.O_WRONLY), FileExistsError,
         errno.EEXIST),
        (lambda: unixio.open("x/y"), NotADirectoryError, errno.ENOTDIR),
        (lambda: unixio.open("n" * 300), OSError, errno.ENAMETOOLONG),
        (lambda: unixio.read(200, 1), OSError, errno.EBADF),
        (lambda: unixio.close(5000), OSError, errno.EBADF),
    ]
    for call, kind, code in cases:
        with pytest.raises(kind) as e:
            call()
        assert e.value.errno == code
    with pytest.raises(FileNotFoundError) as e:
        unixio.open("missing")
    assert e.value.filename == "missing"
    with pytest.raises(ValueError, match="embedded null byte"):
        unixio.open("a\0b")
    # the server's directory is the root of the names: nothing outside is reached
    fd = unixio.open("/x")
    assert unixio.read(fd, 5) == b"x"
    # no holes: data up to the end, one hole there (SEEK_DATA, SEEK_HOLE), ENXIO past it
    assert (unixio.lseek(fd, 0, os.SEEK_DATA), unixio.lseek(fd, 0, os.SEEK_HOLE)) == (0, 1)
    with pytest.raises(OSError) as e:
        unixio.lseek(fd, 1, os.SEEK_DATA)
    assert e.value.errno == errno.ENXIO
    unixio.close(fd)
    with pytest.raises(FileNotFoundError):
        unixio.open("../../../etc/passwd")


def test_calls_a_descriptor_does_not_allow(uio: tuple[Any, Path, int]) -> None:
    _, root, _ = uio
    (root / "f").write_bytes(b"0123456789")
    ro, wo = unixio.open("f"), unixio.open("f", os.O_WRONLY)
    for call, code in [(lambda: unixio.write(ro, b"x"), errno.EBADF),
                       (lambda: unixio.read(wo, 1), errno.EBADF),
                       (lambda: unixio.ftruncate(ro, 0), errno.EINVAL),
                       (lambda: unixio.ftruncate(wo, -1), errno.EINVAL),
                       (lambda: unixio.lseek(ro, -1, os.SEEK_SET), errno.EINVAL),
                       (lambda: unixio.lseek(ro, 0, 99), errno.EINVAL),
                       (lambda: unixio.read(ro, -1), errno.EINVAL)]:
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == code
    unixio.close(ro)
    with pytest.raises(OSError) as e:
        unixio.read(ro, 1)
    assert e.value.errno == errno.EBADF
    unixio.close(wo)


@pytest.mark.parametrize("mode", ["rw", "q", "rr", "rbt", "", "+", "r+w", "ab+x"])
def test_bad_modes_fail_as_in_python(uio: tuple[Any, Path, int], tmp_path: Path,
                                     mode: str) -> None:
    _, root, _ = uio
    (root / "f").write_bytes(b"x")
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(ValueError) as ours:
        unixio.io_open("f", mode)
    with pytest.raises(ValueError) as python:
        open(tmp_path / "f", mode)  # noqa: SIM115
    assert str(ours.value) == str(python.value)


def test_io_open_argument_errors(uio: tuple[Any, Path, int]) -> None:
    with pytest.raises(ValueError, match="binary mode doesn't take an encoding argument"):
        unixio.io_open("f", "wb", encoding="utf-8")
    with pytest.raises(ValueError, match="binary mode doesn't take a newline argument"):
        unixio.io_open("f", "rb", newline="")
    with pytest.raises(ValueError, match="unbuffered text"):
        unixio.io_open("f", "w", buffering=0)
    with pytest.raises(FileNotFoundError):
        unixio.io_open("nothing", "rb")


# -- the io layers ---------------------------------------------------------------------------

def test_io_layers_over_fileio(uio: tuple[Any, Path, int]) -> None:
    text = "first line\nsecond line, é\nthird\n"
    with unixio.io_open("t.txt", "w", encoding="utf-8") as f:
        assert isinstance(f, io.TextIOWrapper) and isinstance(f.buffer, io.BufferedWriter)
        f.write(text)
    with unixio.io_open("t.txt", encoding="utf-8") as f:
        assert isinstance(f.buffer, io.BufferedReader)
        assert isinstance(f.buffer.raw, unixio.FileIO) and f.buffer.raw.mode == "rb"
        assert f.readline() == "first line\n"
        assert list(f) == ["second line, é\n", "third\n"]
    with unixio.io_open("t.txt", "a", encoding="utf-8") as f:
        f.write("appended\n")
    with unixio.io_open("t.txt", "r+b") as f:
        assert isinstance(f, io.BufferedRandom)
        f.seek(6)
        f.write(b"LINE")
        f.seek(0)
        assert f.read(10) == b"first LINE"
        assert f.seek(0, os.SEEK_END) == len((text + "appended\n").encode())
    with unixio.io_open("t.txt", "rb", buffering=0) as raw:
        assert isinstance(raw, unixio.FileIO) and isinstance(raw, io.RawIOBase)
        assert raw.readall() == (text + "appended\n").encode().replace(b"first line",
                                                                         b"first LINE")
    with pytest.raises(FileExistsError):
        unixio.io_open("t.txt", "x")
    with unixio.io_open("t.txt", "w") as f:  # truncates
        f.write("new")
    assert _whole("t.txt") == b"new"
    raw = unixio.FileIO("t.txt")
    raw.close()
    with pytest.raises(ValueError, match="closed file"):
        raw.read(1)
    with pytest.raises(io.UnsupportedOperation):
        unixio.FileIO("t.txt").write(b"x")


@pytest.mark.embedded_only("shares one Python file object between two tasks")
def test_a_file_object_belongs_to_its_task(uio: tuple[Any, Path, int]) -> None:
    f = unixio.FileIO("mine", "w")

    def other_task() -> int | None:
        try:
            f.write(b"not yours")
        except OSError as e:
            return e.errno
        return None

    assert m.spawn(other_task).result(30_000) == errno.EBADF
    f.close()
    assert _whole("mine") == b""


# The README's example (README "UNIX-style file I/O on mapped files"), and its output.
EXAMPLE = r"""import os
import tempfile

import pymach
from pymach.apps import unixio
from pymach.apps.unixio_server import start_server

root = tempfile.mkdtemp()
with open(os.path.join(root, "notes.txt"), "w") as f:
    f.write("first line\n")


def child(fd):
    print("child:", unixio.read(fd, 100))         # the parent's descriptor and offset
    unixio.write(fd, b"from the child\n")          # O_APPEND: at the end


with pymach.boot():
    server_task, server = start_server(root)       # the external pager for `root`
    unixio.attach(server)                          # (children inherit it)
    fd = unixio.open("notes.txt", os.O_RDWR | os.O_APPEND)
    print(unixio.read(fd, 6))                      # copied from the mapped file
    unixio.spawn(child, fd).result(10_000)         # UNIX fork: inherits fd
    print(unixio.lseek(fd, 0, os.SEEK_CUR), unixio.fstat(fd).st_size)
    unixio.fsync(fd)                               # pager_clean_request, the disk write
    unixio.close(fd)
    with unixio.io_open("notes.txt") as f:         # Python's io layers over FileIO
        print(f.readlines())
    try:
        unixio.open("missing.txt")
    except FileNotFoundError as e:
        print(e)
    pymach.task_terminate(server_task.port)
with open(os.path.join(root, "notes.txt")) as f:
    print(repr(f.read()))
"""
EXAMPLE_OUTPUT = ["b'first '", "child: b'line\\n'", "26 26",
                  "['first line\\n', 'from the child\\n']",
                  "[Errno 2] No such file or directory: 'missing.txt'",
                  "'first line\\nfrom the child\\n'"]


def test_readme_example_prints_what_the_readme_says() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, "-c", EXAMPLE], capture_output=True, text=True,
                       timeout=120, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == EXAMPLE_OUTPUT


# -- the demo and the benchmark ----------------------------------------------------------------

def test_demo_unixio_runs() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, "-c", "from pymach.cli.demo_unixio import "
                        "run_unixio_demo; run_unixio_demo()"], capture_output=True,
                       text=True, timeout=120, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "[child] continues at offset 11" in out
    assert "the parent sees the child's line: yes" in out
    assert "on disk after fsync: yes" in out
    assert "0 disk reads" in out
    assert "FileNotFoundError" in out and "ValueError" in out
    assert "WRONG" not in out


@pytest.mark.slow
def test_bench_unixio_small() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    code = ("import json; from pymach.bench.unixio import run; print(json.dumps(run("
            "files=4, file_size=16384, passes=3, read_size=65536, chunks=(4096, 65536), "
            "rounds=1)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    mapped, calls = out["mapped_passes"], out["read_call_passes"]
    assert sorted(mapped) == sorted(calls) == ["1", "2", "3"]
    assert mapped["1"]["io_operations"] == 16 and mapped["1"]["pager_messages"] > 0
    assert mapped["2"]["io_operations"] == mapped["3"]["io_operations"] == 0
    assert mapped["2"]["pager_messages"] == 0
    assert all(p["io_operations"] == 16 for p in calls.values())  # 4 files x 4 reads
    assert out["io_operations_read_calls_total"] == 48
    assert out["ratio_io_read_calls_vs_mapped"] == 3.0
    for chunk in ("chunk_4096", "chunk_65536"):
        row = out["read_resident"][chunk]
        assert min(row["unixio_read"], row["os_read"], row["unixio_readinto"],
                   row["os_readv"]) > 0
        assert row["ratio_read_vs_os_read"] == pytest.approx(
            row["unixio_read"] / row["os_read"], abs=0.01)


# -- under memory pressure: pageouts, write-backs and truncations together ----------------------

def _pressure(root: Path, seed: int) -> tuple[int, int]:
    """Random writes, truncations, reads and fsyncs on one file larger than memory,
    checked against a bytearray; (final size, the server's disk writes)."""
    rng = random.Random(seed)
    fd = unixio.open("big", os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    ref = bytearray()
    for i in range(120):
        op = rng.random()
        if op < 0.5:
            at, data = rng.randrange(len(ref) + 5000), rng.randbytes(rng.choice([100, 9000,
                                                                                  20000]))
            unixio.pwrite(fd, data, at)
            ref[len(ref):] = bytes(max(0, at - len(ref)))
            ref[at:at + len(data)] = data
        elif op < 0.7:
            n = rng.randrange(len(ref) + 30000)
            unixio.ftruncate(fd, n)
            ref[n:] = b""
            ref[len(ref):] = bytes(n - len(ref))
        elif op < 0.9:
            at = rng.randrange(len(ref) + 1)
            assert unixio.pread(fd, 30000, at) == ref[at:at + 30000], f"step {i}"
        else:
            unixio.fsync(fd)
            assert (root / "big").read_bytes() == ref, f"step {i}: disk after fsync"
    assert unixio.pread(fd, 1 << 30, 0) == ref
    unixio.fsync(fd)
    assert (root / "big").read_bytes() == ref
    unixio.close(fd)
    return len(ref), unixio.server_stats()["disk_writes"]


@pytest.mark.parametrize("deterministic", [False, True], ids=["free", "det"])
def test_under_memory_pressure_embedded(tmp_path: Path, deterministic: bool) -> None:
    with m.boot(memory_size=48 * 4096, deterministic=deterministic, seed=5) as k:
        handle, port = start_server(str(tmp_path))
        unixio.attach(port)
        for seed in (1, 2):
            assert _pressure(tmp_path, seed)[1] > 0
        assert k.vm_stat()["pageouts"] > 50  # pages went back to the server all along
        m.task_terminate(handle.port)


@pytest.fixture(scope="module")
def small_machd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A machd with 192 KiB of memory (48 pages), for the native pressure test."""
    yield from running_machd(tmp_path_factory, "--memory", "192K", "--pager-cluster", "4")


def test_under_memory_pressure_native(small_machd: str, tmp_path: Path) -> None:
    with native_kernel(small_machd):
        handle, port = start_server(str(tmp_path))
        unixio.attach(port)
        size, writes = _pressure(tmp_path, 3)
        assert size > 0 and writes > 0
        assert m.vm_statistics(m.task_self()).pageouts > 50
        m.task_terminate(handle.port)
