"""The `pymach` command: `demo`, `bench`, and for native mode `machd`, `exec` and the
tools `ps`, `vmmap`, `vm_stat`, `lsmp` (see cli/tools.py)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _cmd_demo(args: argparse.Namespace) -> int:
    from pymach.cli.demo import run_demo
    from pymach.cli.demo_vm import run_vm_demo

    opts = {"deterministic": args.deterministic, "seed": args.seed, "trace": args.trace}
    if args.part in ("all", "ipc"):
        run_demo(**opts)
    if args.part == "all":
        print()
    if args.part in ("all", "vm"):
        run_vm_demo(**opts)
    if args.part == "fs":
        from pymach.cli.demo_fs import run_fs_demo

        run_fs_demo(**opts)
    if args.part == "shm":
        from pymach.cli.demo_shm import run_shm_demo

        run_shm_demo(**opts)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.mode == "native":
        try:
            from pymach.bench import native
        except ImportError as e:
            print(f"pymach bench: native benchmarks need NumPy ({e}): "
                  f"pip install 'pymach[native]'", file=sys.stderr)
            return 2

        if args.what == "cache":
            print("pymach bench: 'cache' runs on the embedded kernel only", file=sys.stderr)
            return 2
        result = native.run(args.what, n=args.n, rounds=args.rounds)
    elif args.what in ("pager", "huge", "all"):
        print(f"pymach bench: '{args.what}' needs --mode native", file=sys.stderr)
        return 2
    elif args.what == "ipc":
        from pymach.bench import ipc

        result = ipc.run(n=args.n, rounds=args.rounds)
    elif args.what == "vm":
        from pymach.bench import vm

        result = vm.run(rounds=min(args.rounds, 3))
    elif args.what == "cache":
        from pymach.bench import cache

        result = cache.run()
    else:  # argparse restricts the choices
        raise AssertionError(args.what)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:<34} {value}")
    return 0


def _size(text: str) -> int:
    """'512M', '1G', '4096' -> bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def _uid(user: str) -> int:
    """A user name or number -> uid (argparse error if there is no such user)."""
    import pwd

    if user.isdigit():
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no user {user!r}") from None


def _cmd_machd(args: argparse.Namespace) -> int:
    import logging

    from pymach.errors import MachError
    from pymach.machd.machd import Limits, Machd, MachdError, run_machd

    logging.basicConfig(level=args.log_level.upper(),
                        format="machd %(levelname)s %(message)s")
    try:
        limits = Limits(hello_timeout=args.hello_timeout, max_pending=args.max_pending,
                        max_connections_per_user=args.max_connections_per_user,
                        max_processes_per_user=args.max_processes_per_user)
        machd = Machd(args.socket, memory_size=args.memory, page_size=args.page_size,
                      swap_dir=args.swap_dir, swap_size=args.swap_size,
                      pager_timeout_ms=args.pager_timeout,
                      pager_timeout_action=args.pager_timeout_action,
                      pager_cluster_pages=args.pager_cluster, limits=limits,
                      allow_uids=args.allow_user, port_names_max=args.port_names_max,
                      ool_queued_max=args.ool_queued_max,
                      tasks_max_per_user=args.tasks_max_per_user,
                      threads_max_per_task=args.threads_max_per_task)
        return run_machd(machd)
    except MachdError as e:
        print(f"pymach machd: {e}", file=sys.stderr)
        return 1
    except MachError as e:  # a bad option value
        print(f"pymach machd: {e}", file=sys.stderr)
        return 2


def _cmd_exec(args: argparse.Namespace) -> int:
    import os
    import runpy

    from pymach.errors import MachError
    from pymach.libmach.task import attach

    try:
        attach(args.socket, name=os.path.basename(args.script))
    except MachError as e:
        print(f"pymach exec: {e}", file=sys.stderr)
        return 1
    sys.argv = [args.script, *args.args]
    runpy.run_path(args.script, run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="pymach", description="The Mach kernel of the "
                                     "1987 'Duality of Memory and Communication' paper, in Python.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a narrated multi-task program on the embedded kernel")
    demo.add_argument("part", nargs="?", default="all", choices=["all", "ipc", "vm", "fs", "shm"],
                      help="which part: ports and messages (ipc), virtual memory (vm), "
                      "the section 4.1 filesystem (fs), section 4.2 shared memory across "
                      "hosts (shm); 'all' runs ipc and vm")
    demo.add_argument("--deterministic", action="store_true",
                      help="one thread at a time, in an order drawn from --seed")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--trace", action="store_true", help="print the kernel's event trace")
    demo.set_defaults(func=_cmd_demo)
    bench = sub.add_parser("bench", help="measure pymach against baselines in the same run")
    bench.add_argument("what", choices=["ipc", "vm", "cache", "pager", "huge", "all"],
                       help="ipc, vm, cache (embedded); with --mode native: ipc, vm, pager, "
                       "huge (2 MiB pages; needs vm.nr_hugepages) or all")
    bench.add_argument("--mode", choices=["embedded", "native"], default="embedded",
                       help="native: tasks are processes under a machd the benchmark starts")
    bench.add_argument("--json", action="store_true", help="print the results as JSON")
    bench.add_argument("-n", type=int, default=5000, help="round trips per round")
    bench.add_argument("--rounds", type=int, default=5)
    bench.set_defaults(func=_cmd_bench)
    _native_parsers(sub)
    return parser


def _native_parsers(sub: Any) -> None:
    from pymach.include.channel import default_socket_path
    from pymach.machd.machd import Limits

    where = default_socket_path()
    machd = sub.add_parser("machd", help="run the native host daemon in the foreground")
    machd.add_argument("--socket", default=None, help=f"where to listen (default: "
                       f"$PYMACH_SOCKET or {where}; its directory is made private)")
    machd.add_argument("--allow-user", action="append", default=[], metavar="USER", type=_uid,
                       help="also serve this user (name or uid; repeatable). By default "
                       "only machd's own user may connect")
    d = Limits()
    machd.add_argument("--hello-timeout", type=float, default=d.hello_timeout, metavar="S",
                       help="seconds a new connection has to introduce itself "
                       f"(default {d.hello_timeout})")
    machd.add_argument("--max-pending", type=int, default=d.max_pending,
                       help="connections that may wait for their hello at once "
                       f"(default {d.max_pending})")
    machd.add_argument("--max-connections-per-user", type=int,
                       default=d.max_connections_per_user,
                       help=f"default {d.max_connections_per_user}")
    machd.add_argument("--max-processes-per-user", type=int,
                       default=d.max_processes_per_user,
                       help=f"task processes of one user at once (default "
                       f"{d.max_processes_per_user})")
    machd.add_argument("--port-names-max", type=int, default=4096,
                       help="port names in one task's space (default 4096)")
    machd.add_argument("--tasks-max-per-user", type=int, default=1024,
                       help="live tasks of one user, with or without a process (default "
                       "1024)")
    machd.add_argument("--threads-max-per-task", type=int, default=1024,
                       help="threads of one task (default 1024)")
    machd.add_argument("--ool-queued-max", type=_size, default=None, metavar="SIZE",
                       help="out-of-line memory one task's queued messages may hold "
                       "(default: memory + swap size, or 4x memory with unlimited swap)")
    machd.add_argument("--memory", type=_size, default=1 << 30,
                       help="physical memory limit for resident pages (e.g. 512M, 2G)")
    machd.add_argument("--page-size", type=_size, default=4096, metavar="SIZE",
                       help="the VM page size, a multiple of 4K (default 4096); a multiple "
                       "of the huge page (2M) keeps memory in huge pages, which needs "
                       "vm.nr_hugepages to hold --memory")
    machd.add_argument("--swap-dir", default=None, help="where the default pager's file goes")
    machd.add_argument("--swap-size", type=_size, default=None, help="backing store limit")
    machd.add_argument("--pager-timeout", type=float, default=None, metavar="MS",
                       help="how long a fault waits for an external pager (default: no limit)")
    machd.add_argument("--pager-timeout-action", default="error",
                       choices=["error", "zero_fill"],
                       help="after the timeout: end the faulting task with a memory error, "
                       "or give it zero-filled memory (paper 6.2.1)")
    machd.add_argument("--pager-cluster", type=int, default=16, metavar="PAGES",
                       help="pages a fault asks an external pager for at once (default 16)")
    machd.add_argument("--log-level", default="info",
                       choices=["debug", "info", "warning", "error"])
    machd.set_defaults(func=_cmd_machd)
    from pymach.cli.tools import add_parsers

    socket_help = f"machd's socket (default: $PYMACH_SOCKET or {where})"
    ex = sub.add_parser("exec", help="run a Python script as a task of the running machd")
    ex.add_argument("--socket", default=None, help=socket_help)
    ex.add_argument("script")
    ex.add_argument("args", nargs=argparse.REMAINDER)
    ex.set_defaults(func=_cmd_exec)
    add_parsers(sub, socket_help)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `pymach` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
