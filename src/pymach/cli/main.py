"""The `pymach` command: `demo`, `bench`, and for native mode `machd`, `exec` and the
tools `ps`, `vmmap`, `vm_stat`, `lsmp` (see cli/tools.py) and `top` (cli/top.py), and
`cluster` (credentials for machd hosts joined over TCP); `trace` reads an embedded
kernel's trace (cli/trace.py); `bench --plot`, `demo --plot` and `trace --plot` draw
(cli/plot.py); also `python -m pymach`.

What every subcommand keeps: a bad option value is an argparse error naming the option
(cli/options.py), never a traceback; every option has help text, and the help shows its
default; output into a pipe that closes early ends the command quietly (status 1);
`exec` runs a script as python would (cli/script.py).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from pymach.cli.bench_table import format_result
from pymach.cli.migrate import add_migrate_parser
from pymach.cli.options import (
    DefaultsFormatter,
    address,
    apply_cluster_config,
    as_options,
    machd_option_error,
    positive_float,
    positive_int,
    positive_size,
    uid,
)
from pymach.cli.tools import add_parsers
from pymach.cli.top import add_top_parser
from pymach.cli.trace import add_trace_parser, demo_plot_end, demo_plot_start
from pymach.include.channel import default_socket_path
from pymach.include.version import __version__
from pymach.machd.machd import Limits
from pymach.net.tcp import TcpConfig, TcpLimits, tcp_config

SOCKET_DEFAULTS = ("$PYMACH_SOCKET if set, else $XDG_RUNTIME_DIR/pymach/machd.sock, "
                   "/run/pymach/machd.sock for root, or /tmp/pymach-UID/machd.sock")


def _demo_fs(**opts: Any) -> None:
    from pymach.cli.demo_fs import run_fs_demo

    run_fs_demo(**opts)


def _demo_shm(**opts: Any) -> None:
    from pymach.cli.demo_shm import run_shm_demo

    run_shm_demo(**opts)


def _demo_unixio(**opts: Any) -> None:
    from pymach.cli.demo_unixio import run_unixio_demo

    run_unixio_demo(**opts)


def _demo_blackboard(**opts: Any) -> None:
    from pymach.cli.demo_blackboard import run_blackboard_demo

    run_blackboard_demo(**opts)


def _demo_net(**opts: Any) -> None:
    from pymach.cli.demo_net import run_net_demo

    run_net_demo(**opts)


def _demo_migrate(**opts: Any) -> None:
    from pymach.cli.demo_migrate import run_migrate_demo

    run_migrate_demo(**opts)


def _demo_rvm(**opts: Any) -> None:
    from pymach.cli.demo_rvm import run_rvm_demo

    if not run_rvm_demo(**opts):
        raise SystemExit(1)


DEMOS = {"fs": _demo_fs, "shm": _demo_shm, "unixio": _demo_unixio, "rvm": _demo_rvm,
         "blackboard": _demo_blackboard, "net": _demo_net,
         "migrate": _demo_migrate}  # beyond ipc and vm


def _bench_unixio(args: argparse.Namespace) -> dict[str, Any]:
    from pymach.bench import unixio

    return unixio.run(mode=args.mode)


def _bench_rvm(args: argparse.Namespace) -> dict[str, Any]:
    from pymach.bench import rvm

    return rvm.run(mode=args.mode, rounds=args.rounds)


def _bench_net_shm(args: argparse.Namespace) -> dict[str, Any]:
    from pymach.bench import net_shm

    return net_shm.run()


def _bench_net(args: argparse.Namespace) -> dict[str, Any]:
    from pymach.bench import net, net_memory

    out = net.run(n=args.n, rounds=args.rounds)
    memory = net_memory.measure(tcp_mib_s=out["tcp_stream_mib_s"],
                                tls_mib_s=out["tls_stream_mib_s"])
    out.update((f"memory_{k}", v) for k, v in memory.items()
               if k not in ("benchmark", "tcp_stream_mib_s", "tls_stream_mib_s"))
    return out


# Benchmarks that choose their own setting (either mode, or machd hosts they start):
BOTH_MODES: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "unixio": _bench_unixio, "rvm": _bench_rvm, "net": _bench_net,
    "net-shm": _bench_net_shm}


def _cmd_demo(args: argparse.Namespace) -> int:
    from pymach.cli.demo import run_demo
    from pymach.cli.demo_vm import run_vm_demo

    opts: dict[str, Any] = {"deterministic": args.deterministic, "seed": args.seed,
                            "trace": args.trace}
    try:
        lines = demo_plot_start(args.plot, args.trace, opts)  # --plot: collect the trace
    except (ImportError, OSError) as e:
        print(f"pymach demo: {e}", file=sys.stderr)
        return 2
    if args.part in ("all", "ipc"):
        run_demo(**opts)
    if args.part == "all":
        print()
    if args.part in ("all", "vm"):
        run_vm_demo(**opts)
    if args.part in DEMOS:
        DEMOS[args.part](**opts)
    return demo_plot_end(lines, args.plot)


def _cmd_bench(args: argparse.Namespace) -> int:
    from pymach.cli.plot import check_output
    from pymach.cli.progress import stages, wanted

    try:
        if args.plot:
            check_output(args.plot)  # before a long run, not after it
    except (ImportError, OSError) as e:
        print(f"pymach bench: {e}", file=sys.stderr)
        return 2
    with stages(f"pymach bench {args.what}", wanted(args.progress, sys.stderr)):
        return _bench(args)


def _bench(args: argparse.Namespace) -> int:
    if args.what in BOTH_MODES:  # the applications' benchmarks run in either mode
        result = BOTH_MODES[args.what](args)
    elif args.mode == "native":
        try:
            from pymach.bench import native
        except ImportError as e:
            print(f"pymach bench: native benchmarks need NumPy ({e}): "
                  f"pip install 'pymach[native]'", file=sys.stderr)
            return 2

        if args.what == "cache":
            print("pymach bench: 'cache' runs on the embedded kernel only", file=sys.stderr)
            return 2
        if args.what == "migrate":
            from pymach.bench import migrate

            result = migrate.run(rounds=min(args.rounds, 3))
        else:
            result = native.run(args.what, n=args.n, rounds=args.rounds)
    elif args.what in ("pager", "huge", "migrate", "all"):
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
    print(json.dumps(result, indent=2) if args.json else format_result(result))
    return _plot_bench(args, result)


def _plot_bench(args: argparse.Namespace, result: dict[str, Any]) -> int:
    from pymach.cli.plot import plot_bench

    if not args.plot:
        return 0
    try:
        panels = plot_bench(result, args.plot, args.what, args.mode)
    except OSError as e:
        print(f"pymach bench: cannot write {args.plot}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"pymach bench: {panels} chart(s) written to {args.plot}", file=sys.stderr)
    return 0


def _cmd_machd(args: argparse.Namespace) -> int:
    import logging

    from pymach.errors import MachError
    from pymach.machd.machd import Machd, MachdError, run_machd

    why = apply_cluster_config(args) or machd_option_error(args)
    if why is not None:
        print(f"pymach machd: {why}", file=sys.stderr)
        return 2
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
                      pager_cluster_pages=args.pager_cluster,
                      read_ahead_pages=args.read_ahead, limits=limits,
                      allow_uids=args.allow_user, port_names_max=args.port_names_max,
                      ool_queued_max=args.ool_queued_max,
                      tasks_max_per_user=args.tasks_max_per_user,
                      threads_max_per_task=args.threads_max_per_task,
                      network=_network(args))
        return run_machd(machd)
    except MachdError as e:
        print(f"pymach machd: {e}", file=sys.stderr)
        return 1
    except MachError as e:  # a bad option value
        print(f"pymach machd: {as_options(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine refused something machd needs
        print(f"pymach machd: {e.strerror or e}"
              f"{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 1


def _network(args: argparse.Namespace) -> TcpConfig | None:
    """The cluster machd joins (--cluster and its companions), or None; MachError if the
    credentials are not usable."""
    if args.cluster is None:
        return None
    return tcp_config(args.cluster, args.host_name, args.listen, tuple(args.peer),
                      TcpLimits(peer_timeout=args.peer_timeout))


def _cmd_cluster(args: argparse.Namespace) -> int:
    from pymach.errors import MachError
    from pymach.net.cluster import cluster_init

    try:
        made, kept = cluster_init(args.dir, args.hosts)
    except MachError as e:
        print(f"pymach cluster: {e}", file=sys.stderr)
        return 1
    for path in made:
        print(f"made {path}")
    for name in kept:
        print(f"kept {name}: it has a certificate already")
    print(f"Host NAME needs ca.crt, NAME.crt and NAME.key from {args.dir}; keep ca.key "
          f"where hosts are added.")
    return 0


def _cmd_exec(args: argparse.Namespace) -> int:
    from pymach.cli.script import run_script

    return run_script(args.socket, args.script, args.args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="pymach", description="The Mach kernel of the "
                                     "1987 'Duality of Memory and Communication' paper, in Python.")
    parser.add_argument("--version", action="version", version=f"pymach {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="run a narrated multi-task program on the embedded kernel",
                          formatter_class=DefaultsFormatter)
    demo.add_argument("part", nargs="?", default="all",
                      choices=["all", "ipc", "vm", *DEMOS],
                      help="which part: ports and messages (ipc), virtual memory (vm), "
                      "the section 4.1 filesystem (fs), section 4.2 shared memory across "
                      "hosts (shm), UNIX-style file I/O on mapped files (unixio, 8.1), a "
                      "shared blackboard on three hosts (blackboard, 8.4), recoverable memory "
                      "with a crash and a recovery (rvm, 8.3); "
                      "'all' runs ipc and vm")
    demo.add_argument("--deterministic", action="store_true",
                      help="one thread at a time, in an order drawn from --seed")
    demo.add_argument("--seed", type=int, default=0,
                      help="the seed of the --deterministic schedule")
    demo.add_argument("--trace", action="store_true", help="print the kernel's event trace")
    demo.add_argument("--plot", default=None, metavar="FILE.png",
                      help="draw a timeline of the kernel's trace (faults and kernel-manager "
                      "messages by task) into FILE.png; needs matplotlib: "
                      "pip install 'pymach[plot]'")
    demo.set_defaults(func=_cmd_demo)
    _bench_parser(sub)
    _machd_parser(sub)
    _cluster_parser(sub)
    _task_parsers(sub)
    return parser


def _bench_parser(sub: Any) -> None:
    bench = sub.add_parser("bench", help="measure pymach against baselines in the same run",
                           formatter_class=DefaultsFormatter)
    bench.add_argument("what", choices=["ipc", "vm", "cache", "pager", "huge", "migrate",
                                        "all", *BOTH_MODES],
                       help="ipc, vm, cache (embedded); with --mode native: ipc, vm, pager, "
                       "huge (2 MiB pages; needs vm.nr_hugepages), migrate (task migration, "
                       "1 MiB vs 1 GiB) or all; in either mode: " + ", ".join(BOTH_MODES))
    bench.add_argument("--mode", choices=["embedded", "native"], default="embedded",
                       help="native: tasks are processes under a machd the benchmark starts")
    bench.add_argument("--json", action="store_true", help="print the results as JSON")
    bench.add_argument("-n", type=positive_int, default=5000, metavar="N",
                       help="round trips per round (ipc)")
    bench.add_argument("--rounds", type=positive_int, default=5, metavar="N",
                       help="rounds; each figure is the median of the rounds")
    bench.add_argument("--plot", default=None, metavar="FILE.png",
                       help="also draw each figure beside its baselines into FILE.png; needs "
                       "matplotlib: pip install 'pymach[plot]'")
    bench.add_argument("--progress", action="store_true",
                       help="a line per stage on stderr (the default when stderr is a "
                       "terminal)")
    bench.set_defaults(func=_cmd_bench)


def _machd_parser(sub: Any) -> None:
    machd = sub.add_parser("machd", help="run the native host daemon in the foreground",
                           formatter_class=DefaultsFormatter)
    machd.add_argument("--socket", default=None, metavar="PATH", help=f"where to listen "
                       f"(default: {SOCKET_DEFAULTS}; here that is {default_socket_path()}). "
                       f"Its directory is made private")
    machd.add_argument("--allow-user", action="append", default=[], metavar="USER", type=uid,
                       help="also serve this user (name or uid; repeatable). By default "
                       "only machd's own user may connect")
    d = Limits()
    machd.add_argument("--hello-timeout", type=positive_float, default=d.hello_timeout,
                       metavar="S", help="seconds a new connection has to introduce itself")
    machd.add_argument("--max-pending", type=positive_int, default=d.max_pending,
                       metavar="N", help="connections that may owe their introduction at "
                       "once, all users together")
    machd.add_argument("--max-connections-per-user", type=positive_int, metavar="N",
                       default=d.max_connections_per_user,
                       help="thread and control connections of one user")
    machd.add_argument("--max-processes-per-user", type=positive_int, metavar="N",
                       default=d.max_processes_per_user,
                       help="task processes of one user at once")
    machd.add_argument("--port-names-max", type=positive_int, default=4096, metavar="N",
                       help="port names in one task's space")
    machd.add_argument("--tasks-max-per-user", type=positive_int, default=1024, metavar="N",
                       help="live tasks of one user, with or without a process")
    machd.add_argument("--threads-max-per-task", type=positive_int, default=1024,
                       metavar="N", help="threads of one task")
    _machd_memory_options(machd)
    _machd_network_options(machd)
    machd.add_argument("--log-level", default="info",
                       choices=["debug", "info", "warning", "error"],
                       help="the least severe messages machd prints")
    machd.set_defaults(func=_cmd_machd)


def _machd_memory_options(machd: argparse.ArgumentParser) -> None:
    machd.add_argument("--memory", type=positive_size, default="1G", metavar="SIZE",
                       help="physical memory for resident pages (e.g. 512M, 2G, 1T); at most "
                       "the machine's memory. Pageout goes to the default pager beyond it")
    machd.add_argument("--page-size", type=positive_size, default="4K", metavar="SIZE",
                       help="the VM page size, a multiple of 4K; a multiple "
                       "of the huge page (2M) keeps memory in huge pages, which needs "
                       "vm.nr_hugepages to hold --memory")
    machd.add_argument("--swap-dir", default=None, metavar="DIR",
                       help="an existing directory for the default pager's file "
                       "(default: the system's temporary directory)")
    machd.add_argument("--swap-size", type=positive_size, default=None, metavar="SIZE",
                       help="the most the default pager's file may hold (default: no limit)")
    machd.add_argument("--ool-queued-max", type=positive_size, default=None, metavar="SIZE",
                       help="out-of-line memory one task's queued messages may hold "
                       "(default: memory + swap size, or 4x memory with unlimited swap)")
    machd.add_argument("--pager-timeout", type=positive_float, default=None, metavar="MS",
                       help="how long a fault waits for an external pager (default: no limit)")
    machd.add_argument("--pager-timeout-action", default="error",
                       choices=["error", "zero_fill"],
                       help="after the timeout: end the faulting task with a memory error, "
                       "or give it zero-filled memory (paper 6.2.1)")
    machd.add_argument("--pager-cluster", type=positive_int, default=16, metavar="PAGES",
                       help="pages a fault asks an external pager for at once")
    machd.add_argument("--read-ahead", type=positive_int, default=None, metavar="PAGES",
                       help="read-ahead: while a task reads a pager's object in order, "
                       "each request asks for twice the pages of the last, up to this "
                       "many (default: 16 MiB of pages, at most 1024, at least "
                       "--pager-cluster, and none with --pager-cluster 1; --read-ahead "
                       "equal to --pager-cluster turns it off)")


def _machd_network_options(machd: argparse.ArgumentParser) -> None:
    machd.add_argument("--config", default=None, metavar="FILE",
                       help="read the cluster options below from a TOML file (keys cluster, "
                       "host-name, listen, peers, peer-timeout); options given here win")
    machd.add_argument("--cluster", default=None, metavar="DIR",
                       help="join a cluster of hosts, with the credentials in DIR (ca.crt, "
                       "NAME.crt, NAME.key; see `pymach cluster init`) (default: no network)")
    machd.add_argument("--host-name", default=None, metavar="NAME",
                       help="this host's name in the cluster, as its certificate names it "
                       f"(default: this machine's name, {socket.gethostname()})")
    machd.add_argument("--listen", type=address, default=None, metavar="ADDR:PORT",
                       help="accept other hosts here (:PORT for every address) (default: "
                       "accept none; this host only dials its --peer hosts)")
    machd.add_argument("--peer", type=address, action="append", default=[],
                       metavar="ADDR:PORT", help="a host to connect to and keep connected "
                       "to (repeatable)")
    machd.add_argument("--peer-timeout", type=positive_float, metavar="S", default=None,
                       help="a host not heard from for this long is down: its ports die "
                       "here; a connection that breaks meanwhile is dialed again and "
                       f"nothing is lost (default: {TcpLimits.peer_timeout})")


def _cluster_parser(sub: Any) -> None:
    cluster = sub.add_parser("cluster", help="make the credentials hosts of a cluster "
                             "authenticate each other with", formatter_class=DefaultsFormatter)
    what = cluster.add_subparsers(dest="action", required=True, metavar="ACTION",
                                  help="init: make the credentials")
    init = what.add_parser("init", help="make a cluster CA in DIR if it has none, and a key "
                           "and certificate for each host (uses the openssl command)",
                           formatter_class=DefaultsFormatter)
    init.add_argument("dir", metavar="DIR", help="the cluster's directory (made mode 0700)")
    init.add_argument("hosts", nargs="+", metavar="NAME", help="host names (letters, digits, "
                      "'.', '_', '-'); a host with a certificate already keeps it")
    init.set_defaults(func=_cmd_cluster)


def _task_parsers(sub: Any) -> None:
    socket_help = (f"machd's socket (default: {SOCKET_DEFAULTS}; here that is "
                   f"{default_socket_path()})")
    ex = sub.add_parser("exec", help="run a Python script as a task of the running machd, "
                        "as `python SCRIPT [ARGS]` runs it",
                        usage="pymach exec [-h] [--socket PATH] SCRIPT [ARGS ...]")
    ex.add_argument("--socket", default=None, metavar="PATH", help=socket_help)
    ex.add_argument("script", metavar="SCRIPT", help="the Python script (or a directory or "
                    "zip archive with a __main__.py)")
    rest = ex.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS",
                           help="the script's arguments (its sys.argv[1:])")
    rest.required = False  # argparse makes a REMAINDER positional required
    ex.set_defaults(func=_cmd_exec)
    add_parsers(sub, socket_help)
    add_migrate_parser(sub, socket_help)
    add_top_parser(sub, socket_help)
    add_trace_parser(sub)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `pymach` console script (and `python -m pymach`). Output to a
    pipe that closes early (`pymach lsmp x | head`) ends the command quietly, as the
    Python documentation recommends (signal module, "Note on SIGPIPE")."""
    args = build_parser().parse_args(argv)
    try:
        status = int(args.func(args))
        sys.stdout.flush()
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at devnull so that flush, too,
        # succeeds instead of printing another BrokenPipeError.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
