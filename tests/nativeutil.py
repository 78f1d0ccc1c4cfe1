"""Native mode under test: one machd per test session, a fresh native task per test.

`machd_socket` starts `pymach machd` (a real daemon process) on a private socket;
`native` makes the test process a task of it for the test (attach) and leaves after
(detach), so the test body runs as native task code. Where userfaultfd is not allowed
the native tests are skipped with the reason, except under CI, where that is a failure.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pymach.machd.task import attach, detach
from pymach.machd.uffd import probe


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"native mode cannot run in CI: {reason}")
    pytest.skip(f"native mode needs userfaultfd: {reason}")


def start_machd(path: Path, *extra: str) -> subprocess.Popen[bytes]:
    """Start a machd on `path` and wait until it accepts connections."""
    proc = subprocess.Popen([sys.executable, "-m", "pymach.cli.main", "machd", "--socket",
                             str(path), "--log-level", "warning", *extra])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"machd exited with {proc.returncode}")
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("machd did not start")


def stop_machd(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def uffd_or_skip() -> None:
    """Skip (fail under CI) if this machine cannot run native mode."""
    reason = probe()
    if reason:
        _unavailable(reason)


@pytest.fixture(scope="session")
def machd_socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A running machd for the session (skipped, or failed under CI, without uffd)."""
    uffd_or_skip()
    path = tmp_path_factory.mktemp("machd") / "machd.sock"
    proc = start_machd(path, "--memory", "512M")
    yield str(path)
    stop_machd(proc)


@pytest.fixture
def native(machd_socket: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """The test body runs as a new native task of the session's machd."""
    attach(machd_socket, name=request.node.name[:40])
    try:
        yield machd_socket
    finally:
        detach()
