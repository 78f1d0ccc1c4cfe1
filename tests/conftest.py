"""Shared fixtures for the pymach test suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import pymach
from nativeutil import machd_socket, native  # noqa: F401  (native-mode fixtures)


@pytest.fixture(params=[False, True], ids=["free", "det"])
def kernel(request: pytest.FixtureRequest) -> Iterator[pymach.Kernel]:
    """A booted kernel in each scheduler mode; the test runs as thread bootstrap.main."""
    with pymach.boot(deterministic=request.param, seed=1987, trace=True) as k:
        yield k
