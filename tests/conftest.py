"""Shared fixtures for the pymach test suite.

`kernel` runs a test body as a Mach thread: on the embedded kernel in both scheduler
modes ("free", "det"), and, for modules that set `CONTRACT = True`, also as a native task
of the session's machd ("native"), with a facade answering what the tests ask of the
kernel (nativeutil.NativeKernel). That makes those modules the contract suite: the same
IPC, VM and pager tests pass in both settings. A test that needs the embedded kernel's
insides (its scheduler, trace, objects) says so with @pytest.mark.embedded_only.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import pymach
from nativeutil import machd_socket, native, native_kernel  # noqa: F401  (native fixtures)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "embedded_only(why): not part of the native contract")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "kernel" not in metafunc.fixturenames:
        return
    modes = ["free", "det"]
    if (getattr(metafunc.module, "CONTRACT", False)
            and metafunc.definition.get_closest_marker("embedded_only") is None):
        modes.append("native")
    metafunc.parametrize("kernel", modes, indirect=True)


@pytest.fixture
def kernel(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A booted kernel (or machd, for "native"); the test runs as one of its threads."""
    if request.param == "native":
        socket_path = request.getfixturevalue("machd_socket")
        with native_kernel(socket_path) as k:
            yield k
        return
    with pymach.boot(deterministic=request.param == "det", seed=1987, trace=True) as k:
        yield k
