"""Native mode under test: one machd per test session, a fresh native task per test.

`machd_socket` starts `pymach machd` (a real daemon process) on a private socket;
`native` makes the test process a task of it for the test (attach) and leaves after
(detach), so the test body runs as native task code. Where userfaultfd is not allowed
the native tests are skipped with the reason, except under CI, where that is a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pymach as m
from pymach.libmach.task import attach, attached, detach
from pymach.machd.machd import start_daemon, stop_daemon
from pymach.pmap.native_map import WINDOW_BASE, WINDOW_SIZE
from pymach.pmap.uffd import probe


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"native mode cannot run in CI: {reason}")
    pytest.skip(f"native mode needs userfaultfd: {reason}")


def start_machd(path: Path, *extra: str) -> subprocess.Popen[bytes]:
    """Start a machd on `path` and wait until it accepts connections."""
    return start_daemon(str(path), *extra)


def stop_machd(proc: subprocess.Popen[bytes]) -> None:
    """Stop a machd started by start_machd."""
    stop_daemon(proc)


def uffd_or_skip() -> None:
    """Skip (fail under CI) if this machine cannot run native mode."""
    reason = probe()
    if reason:
        _unavailable(reason)


def running_machd(factory: pytest.TempPathFactory, *options: str) -> Iterator[str]:
    """Fixture body: a machd with `options` on a fresh socket (skipped, or failed under
    CI, without userfaultfd), stopped afterwards."""
    uffd_or_skip()
    path = factory.mktemp("machd") / "machd.sock"
    proc = start_machd(path, *options)
    yield str(path)
    stop_machd(proc)


@pytest.fixture(scope="session")
def machd_socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A running machd for the session."""
    yield from running_machd(tmp_path_factory, "--memory", "512M", "--pager-cluster", "1")
    # one page per request, as the embedded kernel's default: the contract tests count


@pytest.fixture
def native(machd_socket: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """The test body runs as a new native task of the session's machd."""
    yield from as_native_task(machd_socket, request)


def as_native_task(socket_path: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """Fixture body: the test body runs as a new native task of the machd at
    `socket_path` (named after the test), which it leaves afterwards."""
    attach(socket_path, name=request.node.name[:40])
    try:
        yield socket_path
    finally:
        detach()


class TaskRef:
    """Stands for the embedded kernel's Task object in a handle: just its name."""

    def __init__(self, name: str) -> None:
        self.name = name


class Clock:
    """Stands for the embedded scheduler where tests only read the time (ms)."""

    deterministic = False

    def now(self) -> float:
        """Milliseconds, as the free-running scheduler counts them."""
        return time.monotonic() * 1000.0


class NativeHandle:
    """`Kernel.spawn`'s handle, for a native child task (see NativeKernel)."""

    def __init__(self, spawned: Any) -> None:
        self.spawned, self.port, self.name = spawned, spawned.port, spawned.name
        self.task = TaskRef(spawned.name)

    def result(self, timeout: float | None = None) -> Any:
        """The child's result, or its exception (None if it ended without returning)."""
        return self.spawned.result(timeout)

    @property
    def done(self) -> bool:
        """True once the child has returned or ended."""
        return bool(self.spawned.done)


class NativeKernel:
    """What the embedded tests ask of `kernel`, answered by the session's machd, so the
    same test bodies run as native tasks (the contract suite). Reports come through
    `host_report`; "bootstrap", the embedded test's own task, means the test's task."""

    msg_size_max = 8192
    sched = Clock()
    vm_max = WINDOW_BASE + WINDOW_SIZE  # the end of a native task's address space

    def __init__(self) -> None:
        self.page_size = m.vm_page_size()
        self.memory_size = m.host_info(m.host_self())[1]

    def spawn(self, fn: Any, *args: Any, name: str = "", inherit: bool = False,
              **kwargs: Any) -> NativeHandle:
        """Run fn(*args, **kwargs) in a new native task (a process)."""
        return NativeHandle(m.spawn(fn, *args, name=name, inherit=inherit, **kwargs))

    def run(self, fn: Any, *args: Any, name: str = "", timeout: float | None = None,
            **kwargs: Any) -> Any:
        """Spawn and wait for the result."""
        return self.spawn(fn, *args, name=name, **kwargs).result(timeout)

    def _report(self, what: str, which: Any = "") -> Any:
        from pymach.cli.tools import as_rows

        if isinstance(which, NativeHandle | TaskRef):
            which = which.task.name if isinstance(which, NativeHandle) else which.name
        if which == "bootstrap":  # the test's own task (machd has a bootstrap task too)
            process = attached()
            assert process is not None
            which = process.task_serial
        return as_rows(what, json.loads(m.mach.host_report(m.host_self(), what, str(which))))

    def ps(self) -> Any:
        """Every task of machd."""
        return self._report("ps")

    def lsmp(self, which: Any) -> Any:
        """One task's port names."""
        return self._report("lsmp", which)

    def vmmap(self, which: Any) -> Any:
        """One task's regions."""
        return self._report("vmmap", which)

    def vm_stat(self) -> Any:
        """machd's VM counters."""
        return self._report("vm_stat")


@contextlib.contextmanager
def native_kernel(socket_path: str) -> Iterator[NativeKernel]:
    """The calling thread as a fresh native task named like the embedded tests' own
    task, with the kernel facade."""
    attach(socket_path, name="bootstrap")
    try:
        yield NativeKernel()
    finally:
        detach()
