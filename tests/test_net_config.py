"""machd's cluster config file (`pymach machd --config FILE`, cli/options.py; issue 11).

- The file's keys (cluster, host-name, listen, peers, peer-timeout) become the options'
  values, checked as the options check theirs; a relative cluster directory is the
  file's; options given on the command line win over the file; unset ones take their
  defaults.
- An unknown key, a value of the wrong kind, a file that is not TOML or cannot be read:
  machd refuses to start (status 2), naming the file and the key, and makes nothing.
- Two machd hosts configured by files alone link, and a cross-host RPC goes through.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import textwrap
from pathlib import Path

import pytest

from nativeutil import uffd_or_skip
from pymach.cli.main import build_parser
from pymach.cli.options import apply_cluster_config, read_cluster_config
from pymach.errors import MachError
from pymach.machd.machd import start_daemon, stop_daemon
from pymach.net.cluster import cluster_init
from pymach.net.tcp import TcpLimits
from test_net_tcp import LOOPBACK, cross_host_rpc, free_port, pymach_cmd

EXAMPLE = """
# the cluster settings of host A (README, "Network over TCP")
cluster = "creds"                  # relative: next to this file
host-name = "A"
listen = "127.0.0.1:7391"
peers = ["127.0.0.1:7392", "[::1]:7393"]
peer-timeout = 2.5
"""


def write(tmp: Path, text: str, name: str = "machd.toml") -> str:
    path = tmp / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def machd_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["machd", *argv])


def test_the_file_sets_the_cluster_options(tmp_path: Path) -> None:
    settings = read_cluster_config(write(tmp_path, EXAMPLE))
    assert settings == {"cluster": str(tmp_path / "creds"), "host_name": "A",
                        "listen": ("127.0.0.1", 7391),
                        "peer": [("127.0.0.1", 7392), ("::1", 7393)], "peer_timeout": 2.5}


def test_the_command_line_wins_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, EXAMPLE)
    args = machd_args("--config", path, "--host-name", "B", "--peer", "10.0.0.9:1")
    assert apply_cluster_config(args) is None
    assert (args.host_name, args.peer) == ("B", [("10.0.0.9", 1)])
    assert (args.listen, args.peer_timeout) == (("127.0.0.1", 7391), 2.5)  # from the file
    args = machd_args("--config", path, "--peer-timeout", "9", "--listen", ":1")
    assert apply_cluster_config(args) is None
    assert (args.peer_timeout, args.listen, args.cluster) == (9.0, ("", 1),
                                                               str(tmp_path / "creds"))


def test_without_a_file_the_defaults_apply(tmp_path: Path) -> None:
    args = machd_args()
    assert apply_cluster_config(args) is None
    assert args.host_name == socket.gethostname() and args.cluster is None
    assert args.peer_timeout == TcpLimits.peer_timeout and args.peer == []
    partial = write(tmp_path, 'cluster = "/abs/dir"\nlisten = ":7391"\n')
    args = machd_args("--config", partial)
    assert apply_cluster_config(args) is None
    assert (args.cluster, args.peer_timeout) == ("/abs/dir", TcpLimits.peer_timeout)


@pytest.mark.parametrize(("text", "message"), [
    ('clustr = "x"\n', "unknown key 'clustr' (the keys are cluster, host-name, listen, "
                       "peers, peer-timeout)"),
    ("[cluster]\nlisten = ':1'\n", "cluster = {'listen': ':1'}: must be a non-empty string"),
    ('listen = "nowhere"\n', "'nowhere' is not ADDR:PORT"),
    ('listen = 7391\n', "listen = 7391: must be a non-empty string"),
    ('peers = "127.0.0.1:1"\n', 'must be a list of "ADDR:PORT" strings'),
    ('peers = ["127.0.0.1:99999"]\n', "is not ADDR:PORT"),
    ("peer-timeout = -1\n", "must be a number of seconds more than 0"),
    ("peer-timeout = true\n", "must be a number of seconds more than 0"),
    ('peer-timeout = "5"\n', "must be a number of seconds more than 0"),
    ("peer-timeout = nan\n", "must be a number of seconds more than 0"),
    ('host-name = "../etc"\n', "cannot name a host"),
    ('cluster = ""\n', "must be a non-empty string"),
    ("listen = \n", "not TOML"),
])
def test_bad_files_are_refused_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(MachError) as e:
        read_cluster_config(path)
    assert e.value.code == "KERN_INVALID_ARGUMENT"
    assert e.value.detail.startswith(f"--config {path}: ") and message in e.value.detail


def test_machd_refuses_a_bad_file_before_it_makes_anything(tmp_path: Path) -> None:
    sock = tmp_path / "s" / "machd.sock"
    for config, message in ((write(tmp_path, 'listen = ":1"\nport = 3\n'), "unknown key 'port'"),
                            (str(tmp_path / "missing.toml"), "cannot read it")):
        r = pymach_cmd("machd", "--socket", str(sock), "--config", config)
        assert r.returncode == 2 and f"pymach machd: --config {config}: " in r.stderr, r.stderr
        assert message in r.stderr and "Traceback" not in r.stderr
    r = pymach_cmd("machd", "--socket", str(sock), "--config",
                   write(tmp_path, 'cluster = "c"\n'))  # the checks of the options apply
    assert r.returncode == 2 and "--cluster needs --listen" in r.stderr, r.stderr
    assert not sock.exists()


def test_the_help_shows_the_config_option() -> None:
    r = pymach_cmd("machd", "--help")
    assert "--config FILE" in r.stdout and "(default: 5.0)" in r.stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_two_machd_hosts_configured_by_files(tmp_path: Path) -> None:
    uffd_or_skip()
    cluster_init(str(tmp_path / "creds"), ["A", "B"])
    a, b = f"{LOOPBACK}:{free_port()}", f"{LOOPBACK}:{free_port()}"
    files = [write(tmp_path, f'cluster = "creds"\nhost-name = "A"\nlisten = "{a}"\n', "a.toml"),
             write(tmp_path, f'cluster = "creds"\nhost-name = "B"\nlisten = "{b}"\n'
                   f'peers = ["{a}"]\npeer-timeout = 3\n', "b.toml")]
    socks = str(tmp_path / "a" / "machd.sock"), str(tmp_path / "b" / "machd.sock")
    daemons = []
    try:
        for sock, config in zip(socks, files, strict=True):
            daemons.append(start_daemon(sock, "--memory", "256M", "--config", config))
        cross_host_rpc(*socks, tmp_path)
    finally:
        for d in daemons:
            stop_daemon(d)
