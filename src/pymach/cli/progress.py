"""Progress of a long `pymach bench` run on stderr: a short line per stage.

A stage is a call of one of the benchmark modules' public functions (bench/: `bench_*`,
`run_*`, the baselines, `native_task` starting a machd, ...; not the `run` the command
calls). While `stages` is active each of those module attributes is replaced by a
wrapper that writes one line when the stage starts, with the seconds since the run
began and the first sentence of the function's docstring, indented by how deep the
stage is nested; the originals are put back when the block ends, whatever happens.
The wrapper adds one call and one write per stage, outside the loops the stages time.

Lines go to stderr only, never stdout (so `--json` output stays clean); only from the
process that began the run (a forked baseline or task process writes nothing), and
only when asked for: by `--progress`, or by stderr being a terminal.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from pymach.bench import cache, ipc, net, rvm, unixio, vm

WATCHED: list[types.ModuleType] = [cache, ipc, net, rvm, unixio, vm]
try:  # the native benchmarks and their baselines need NumPy
    from pymach.bench import baselines, native

    WATCHED += [baselines, native]
except ImportError:
    pass
WIDTH = 100  # a progress line is cut to this many characters


def wanted(asked: bool, stream: TextIO) -> bool:
    """Whether to show progress: asked for (--progress), or `stream` is a terminal."""
    return asked or stream.isatty()


def _stage_functions(module: types.ModuleType) -> dict[str, Callable[..., Any]]:
    """The module's attributes that are stages (see module docstring)."""
    return {name: fn for name, fn in vars(module).items()
            if isinstance(fn, types.FunctionType) and not name.startswith("_")
            and name != "run" and fn.__module__.startswith("pymach.bench")}


def _first_sentence(fn: Callable[..., Any]) -> str:
    doc = " ".join((fn.__doc__ or "").split())
    return doc.split(". ")[0].rstrip(".")


@contextlib.contextmanager
def stages(title: str, enabled: bool, stream: TextIO = sys.stderr) -> Iterator[None]:
    """While the block runs, write a line per benchmark stage to `stream` (if
    `enabled`), then `title: done in N s`."""
    if not enabled:
        yield
        return
    t0, pid, depth = time.monotonic(), os.getpid(), threading.local()

    def say(text: str) -> None:
        if os.getpid() == pid:
            line = f"{title} [{time.monotonic() - t0:7.1f} s] {text}"
            stream.write(line[:WIDTH] + "\n")
            stream.flush()

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def stage(*args: Any, **kwargs: Any) -> Any:
            level = getattr(depth, "n", 0)
            say(f"{'  ' * level}{fn.__name__}: {_first_sentence(fn)}")
            depth.n = level + 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth.n = level

        return stage

    saved = [(m, _stage_functions(m)) for m in WATCHED]
    try:
        for module, functions in saved:
            for name, fn in functions.items():
                setattr(module, name, wrap(fn))
        say("started")
        yield
        say("done")
    finally:
        for module, functions in saved:
            for name, fn in functions.items():
                setattr(module, name, fn)
