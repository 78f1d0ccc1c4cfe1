"""Option values of the `pymach` command: sizes, positive counts, users, and the checks
`pymach machd` makes before it starts anything, and machd's cluster config file.

Each `type=` function here either returns a valid value or raises
`argparse.ArgumentTypeError` with a message that names what was wrong, so argparse
prints `pymach machd: error: argument --memory: 'abc' is not a size ...`. The checks
that need several options at once (`machd_option_error`) run after parsing and before
machd makes its socket, so a refused option leaves nothing behind.

`pymach machd --config FILE` reads the cluster settings from a TOML file
(`read_cluster_config`); an option given on the command line wins over the file
(`apply_cluster_config`), and an unknown key or a bad value is refused with a message
that names the file and the key.
"""

from __future__ import annotations

import argparse
import math
import os
import pwd
import re
import socket
import tempfile
import tomllib
from typing import Any

from pymach.errors import MachError
from pymach.net.cluster import check_host_name
from pymach.net.tcp import Address, TcpLimits, parse_address
from pymach.pmap.hugetlb import uses_huge_pages

SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"(\d+(?:\.\d*)?)\s*(?:([KMGT])I?)?B?")
_SIZE_HELP = "a number of bytes, or a number with K, M, G or T (e.g. 512M, 2G)"


def size(text: str) -> int:
    """'512M', '1G', '10T', '1.5G', '4096', '2KiB' -> bytes (ArgumentTypeError if it is
    not a size)."""
    m = _SIZE.fullmatch(text.strip().upper())
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: {_SIZE_HELP}")
    return int(float(m[1]) * SIZE_UNITS.get(m[2] or "", 1))


def positive_size(text: str) -> int:
    """A size (see `size`) of at least one byte."""
    value = size(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the size must be more than 0")
    return value


def positive_int(text: str) -> int:
    """An integer of at least 1 (ArgumentTypeError otherwise)."""
    return int(_positive(text, int, "a whole number"))


def positive_float(text: str) -> float:
    """A number more than 0 (ArgumentTypeError otherwise)."""
    return float(_positive(text, float, "a number"))


def _positive(text: str, kind: type[int] | type[float], noun: str) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0")
    return value


def uid(user: str) -> int:
    """A user name or number -> uid (ArgumentTypeError if there is no such user)."""
    if user.isdigit():
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no user {user!r}") from None


def address(text: str) -> Address:
    """'ADDR:PORT' -> (ADDR, PORT) (ArgumentTypeError if it is not one)."""
    try:
        return parse_address(text)
    except MachError as e:
        raise argparse.ArgumentTypeError(e.detail) from None


# The keys of machd's config file and the options they stand for (argparse dest, option)
CONFIG_KEYS = {"cluster": ("cluster", "--cluster"), "host-name": ("host_name", "--host-name"),
               "listen": ("listen", "--listen"), "peers": ("peer", "--peer"),
               "peer-timeout": ("peer_timeout", "--peer-timeout")}


def read_cluster_config(path: str) -> dict[str, Any]:
    """The settings of machd's TOML config file at `path`, by argparse dest (`cluster`,
    `host_name`, `listen`, `peer`, `peer_timeout`), each checked as its option checks it;
    a relative `cluster` directory is taken from the file's directory.
    KERN_INVALID_ARGUMENT, naming the file and the key, if the file cannot be read, is
    not TOML, has a key that is not one of CONFIG_KEYS, or a value of the wrong kind."""
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except OSError as e:
        raise MachError("KERN_INVALID_ARGUMENT",
                        f"--config {path}: cannot read it ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise MachError("KERN_INVALID_ARGUMENT", f"--config {path}: not TOML: {e}") from None
    unknown = sorted(set(table) - set(CONFIG_KEYS))
    if unknown:
        raise MachError("KERN_INVALID_ARGUMENT", f"--config {path}: unknown key "
                        f"{unknown[0]!r} (the keys are {', '.join(CONFIG_KEYS)})")
    settings: dict[str, Any] = {}
    for key, value in table.items():
        try:
            settings[CONFIG_KEYS[key][0]] = _config_value(key, value, os.path.dirname(path))
        except MachError as e:
            raise MachError("KERN_INVALID_ARGUMENT", f"--config {path}: {key} = {value!r}: "
                            f"{e.detail}") from None
    return settings


def _config_value(key: str, value: Any, here: str) -> Any:
    """One config file value, checked (KERN_INVALID_ARGUMENT saying what it should be)."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise MachError("KERN_INVALID_ARGUMENT", f"must be {what}")

    if key == "peers":
        need(isinstance(value, list) and all(isinstance(v, str) for v in value),
             'a list of "ADDR:PORT" strings')
        return [parse_address(v) for v in value]
    if key == "peer-timeout":
        need(type(value) in (int, float) and math.isfinite(value) and value > 0,
             "a number of seconds more than 0")
        return float(value)
    need(isinstance(value, str) and value != "", "a non-empty string")
    if key == "cluster":
        return os.path.join(here, os.path.expanduser(value))
    return parse_address(value) if key == "listen" else check_host_name(value)


def apply_cluster_config(args: argparse.Namespace) -> str | None:
    """Fill machd's cluster options from `--config FILE` where the command line left them
    unset, then the defaults; what is wrong with the file, or None."""
    if args.config is not None:
        try:
            settings = read_cluster_config(args.config)
        except MachError as e:
            return e.detail
        for dest, value in settings.items():
            if getattr(args, dest) in (None, []):
                setattr(args, dest, value)
    if args.host_name is None:
        args.host_name = socket.gethostname()
    if args.peer_timeout is None:
        args.peer_timeout = TcpLimits.peer_timeout
    return None


def machine_memory() -> int:
    """This machine's physical memory in bytes (0 if the system does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def human(n: int) -> str:
    """Bytes as the largest unit that keeps one decimal: 1.5 GiB, 512 MiB, 4096 B."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f}".removesuffix(".0") + f" {unit}"
    return f"{n} B"


def machd_option_error(args: argparse.Namespace) -> str | None:
    """What is wrong with `pymach machd`'s options taken together, or None.

    --swap-dir must be a directory where machd can make its file; --memory must fit in
    this machine's physical memory (a larger limit could never be used, and machd would
    spend seconds setting up frames for it). With huge pages the pool check (pmap/hugetlb.py) is the
    stricter one and says what to set, so this check leaves it to that one. --listen and
    --peer need --cluster, and --cluster needs one of them."""
    if (args.listen or args.peer) and args.cluster is None:
        return "--listen and --peer join a cluster: give its credentials with --cluster DIR"
    if args.cluster is not None and not (args.listen or args.peer):
        return "--cluster needs --listen ADDR:PORT, --peer ADDR:PORT, or both"
    d = args.swap_dir
    if d is not None and not os.path.isdir(d):
        return f"--swap-dir {d}: no such directory (create it, or leave --swap-dir out)"
    if d is not None:
        try:  # as the default pager will: an unnamed file in it
            tempfile.TemporaryFile(dir=d).close()
        except OSError as e:
            return f"--swap-dir {d}: cannot make the swap file there ({e.strerror or e})"
    total = machine_memory()
    if total and args.memory > total and not uses_huge_pages(args.page_size):
        return (f"--memory {human(args.memory)} is more than this machine's "
                f"{human(total)} of physical memory: give at most {total >> 20}M")
    return None


# The kernel's boot keywords, as machd's options (the kernel checks the values; its
# messages name the keyword).
_KEYWORD_OPTIONS = {"memory_size": "--memory", "page_size": "--page-size",
                    "swap_size": "--swap-size", "ool_queued_max": "--ool-queued-max",
                    "pager_cluster_pages": "--pager-cluster", "pager_timeout_ms": "--pager-timeout",
                    "read_ahead_pages": "--read-ahead"}
_KEYWORD = re.compile(r"\b(" + "|".join(_KEYWORD_OPTIONS) + r")\b")


def as_options(text: str) -> str:
    """A kernel message about its boot keywords, naming machd's options instead."""
    return _KEYWORD.sub(lambda m: _KEYWORD_OPTIONS[m[1]], text)


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows each option's default, except where it has none to show (None,
    an empty list, an off flag) or the help text says it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, []) or "(default" in text:
            return text
        return super()._get_help_string(action) or text
