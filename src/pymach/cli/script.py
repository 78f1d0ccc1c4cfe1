"""`pymach exec SCRIPT [ARGS]`: run a Python script as a new task of the running machd,
the way `python SCRIPT [ARGS]` runs it.

What holds, as for `python script.py`:

- a script that cannot be opened (or a directory without `__main__.py`) is refused with
  python's message and status (2, or 1) before any task is made;
- `sys.argv` is `[SCRIPT, *ARGS]` with SCRIPT as given, and `sys.path[0]` is the
  script's directory with symlinks resolved (a directory or zip archive is run as its
  `__main__.py`, with itself on `sys.path`); the entry the `pymach` launcher put there
  is gone; with `python -P` (safe path) nothing is added. (One difference: `__file__`
  is SCRIPT as given, as `runpy.run_path` sets it, where python 3.9+ makes it absolute.)
- an exception the script does not catch goes to `sys.excepthook` with the script's
  frames only (none of pymach's or runpy's), and the status is 1; `sys.exit(n)` ends
  with status n.
"""

from __future__ import annotations

import os
import runpy
import sys
import zipfile
from types import TracebackType

from pymach.errors import MachError
from pymach.libmach.task import attach
from pymach.mach import end_spawned_tasks

# Frames of the launcher itself, left out of a script's traceback.
_LAUNCHER_FILES = frozenset({__file__, runpy.__file__, "<frozen runpy>"})


def script_error(script: str) -> tuple[str, int] | None:
    """Why `script` cannot be run, in python's words, with python's exit status; or None."""
    path = os.path.abspath(script)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "__main__.py")):
            return f"can't find '__main__' module in {path!r}", 1
        return None
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        return f"can't open file {path!r}: [Errno {e.errno}] {e.strerror}", 2
    return None


def run_script(socket_path: str | None, script: str, args: list[str]) -> int:
    """Attach as a task named after the script and run it as `__main__` (see module
    docstring); returns the exit status."""
    why = script_error(script)
    if why is not None:
        print(f"pymach exec: {why[0]}", file=sys.stderr)
        return why[1]
    path = os.path.abspath(script)
    try:
        attach(socket_path, name=os.path.basename(os.path.normpath(path)))
    except MachError as e:
        print(f"pymach exec: {e}", file=sys.stderr)
        return 1
    sys.argv = [script, *args]
    _set_path0(path)
    try:
        runpy.run_path(script, run_name="__main__")
    except KeyboardInterrupt:  # Ctrl-C ends the program and the tasks it spawned
        end_spawned_tasks()
        raise
    except SystemExit:
        raise
    except BaseException as e:
        tb = user_frames(e.__traceback__)
        sys.excepthook(type(e), e.with_traceback(tb), tb)
        return 1
    return 0


def _set_path0(path: str) -> None:
    """sys.path[0] as python sets it for `path` (the launcher's entry replaced)."""
    if sys.flags.safe_path:
        return
    if os.path.isdir(path) or zipfile.is_zipfile(path):
        del sys.path[0]  # run_path puts the directory or archive itself there
    else:
        sys.path[0] = os.path.dirname(os.path.realpath(path))


def user_frames(tb: TracebackType | None) -> TracebackType | None:
    """A traceback from the first frame that is not the launcher's (None if none is)."""
    while tb is not None and tb.tb_frame.f_code.co_filename in _LAUNCHER_FILES:
        tb = tb.tb_next
    return tb
