"""The process machd starts for a task that has none (task_create, then thread_create).

    python -m pymach.libmach.taskproc SOCKET TOKEN

It attaches as the first thread of that task (bringing the process's userfaultfd),
runs the thread's code, and then stays: a task made by task_create lives until
task_terminate, and may get more threads. machd ends the process then.
"""

from __future__ import annotations

import sys
import threading

from pymach.libmach.task import NativeProcess, run_thread


def main(argv: list[str]) -> int:
    """Entry point: argv is [SOCKET, TOKEN]."""
    if len(argv) < 2:
        print("usage: python -m pymach.libmach.taskproc SOCKET TOKEN", file=sys.stderr)
        return 2
    process = NativeProcess(argv[0])
    run_thread(process, bytes.fromhex(argv[1]), first=True)
    threading.Event().wait()  # until machd ends the task (the control thread exits us)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
