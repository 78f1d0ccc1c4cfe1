"""The `pymach` command as a new user meets it (issue 13, items 3, 7, 8, 9 and 16):
`exec` behaves as `python script.py`; machd's options are checked with clear messages;
the benchmarks and tools print readable output, refuse bad counts, survive a closed
pipe and never pick one of two same-named tasks silently; a child's exception comes
back with its traceback; and the package has a version, `python -m pymach` and type
information. Each command runs as a user would run it, in a subprocess, and its output
is checked."""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pymach as m
from nativeutil import uffd_or_skip
from pymach.cli.main import build_parser
from pymach.cli.options import machine_memory, size

ROOT = Path(__file__).resolve().parents[1]
PYMACH = [sys.executable, "-m", "pymach.cli.main"]


def run(*argv: str, cwd: Path | None = None, env: dict[str, str] | None = None,
        stdout: Any = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    """`pymach ARGV...` as a user runs it."""
    return subprocess.run([*PYMACH, *argv], stdout=stdout, stderr=subprocess.PIPE,
                          text=True, timeout=120, cwd=cwd, env=env)


def clean_error(r: subprocess.CompletedProcess[str], status: int, *words: str) -> None:
    """The command failed with `status` and a message holding `words`, no traceback."""
    assert r.returncode == status, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)


# -- 3. pymach exec behaves as python ------------------------------------------------------
_MAIN = """\
import sys
import helper
print(sys.path[0])
print(sys.argv)
print(helper.VALUE)
"""


def test_exec_runs_a_script_as_python_does(machd_socket: str, tmp_path: Path) -> None:
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "helper.py").write_text("VALUE = 'helper found'\n")
    (proj / "main.py").write_text(_MAIN)
    python = subprocess.run([sys.executable, "proj/main.py", "a", "-x"], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    assert python.returncode == 0, python.stderr
    ours = run("exec", "--socket", machd_socket, "proj/main.py", "a", "-x", cwd=tmp_path)
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == python.stdout
    assert ours.stdout.splitlines() == [os.path.realpath(proj), "['proj/main.py', 'a', '-x']",
                                        "helper found"]


def test_exec_refuses_a_missing_script_before_making_a_task(tmp_path: Path) -> None:
    # No machd listens at this socket: the script is checked first, as python would.
    r = run("exec", "--socket", str(tmp_path / "none.sock"), "nosuchfile.py", cwd=tmp_path)
    python = subprocess.run([sys.executable, "nosuchfile.py"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=60)
    clean_error(r, python.returncode, "can't open file", "nosuchfile.py",
                "No such file or directory")
    assert r.stderr.count("\n") == 1 and "machd" not in r.stderr
    (tmp_path / "empty").mkdir()
    clean_error(run("exec", "--socket", str(tmp_path / "none.sock"), "empty", cwd=tmp_path),
                1, "can't find '__main__' module")


def test_exec_without_a_script_prints_a_correct_usage() -> None:
    r = run("exec")
    clean_error(r, 2, "usage: pymach exec", "SCRIPT [ARGS ...]",
                "the following arguments are required: SCRIPT")
    assert "args" not in r.stderr.splitlines()[-1]


# -- 7. machd's options --------------------------------------------------------------------
def test_machd_refuses_a_swap_dir_that_does_not_exist(tmp_path: Path) -> None:
    sock = tmp_path / "m.sock"
    r = run("machd", "--socket", str(sock), "--swap-dir", str(tmp_path / "nonexistent"))
    clean_error(r, 2, "--swap-dir", "no such directory")
    assert r.stderr.count("\n") == 1
    assert not sock.exists()


def test_machd_sizes_get_clear_messages(tmp_path: Path) -> None:
    sock = str(tmp_path / "m.sock")
    clean_error(run("machd", "--socket", sock, "--memory", "abc"), 2,
                "argument --memory: 'abc' is not a size", "512M")
    zero = run("machd", "--socket", sock, "--memory", "0")
    clean_error(zero, 2, "argument --memory: '0'", "more than 0")
    assert "memory_size" not in zero.stderr and "_size" not in zero.stderr
    assert size("10T") == 10 << 40 and size("1.5G") == 3 << 29 and size("2KiB") == 2048
    assert not Path(sock).exists()


def test_machd_names_its_options_in_the_kernels_messages(tmp_path: Path) -> None:
    uffd_or_skip()  # (the kernel checks these once machd knows it can run)
    sock = tmp_path / "m.sock"
    clean_error(run("machd", "--socket", str(sock), "--memory", "1000"), 2,
                "--memory must be a multiple of --page-size")
    clean_error(run("machd", "--socket", str(sock), "--page-size", "1000"), 2,
                "--page-size must be a multiple of 4096")
    clean_error(run("machd", "--socket", str(sock), "--read-ahead", "2000"), 2,
                "--read-ahead must be an int from 1 to 1024")
    clean_error(run("machd", "--socket", str(sock), "--pager-cluster", "8", "--read-ahead",
                    "4"), 2, "--read-ahead must be at least --pager-cluster")
    assert not sock.exists()


def test_machd_refuses_more_memory_than_the_machine_has(tmp_path: Path) -> None:
    total = machine_memory()
    if not total:
        pytest.skip("this system does not say how much memory it has")
    sock = tmp_path / "m.sock"
    too_much = f"{(2 * total >> 30) + 1}G"
    r = run("machd", "--socket", str(sock), "--memory", too_much)
    clean_error(r, 2, f"--memory {(2 * total >> 30) + 1} GiB is more than this machine's",
                "physical memory", f"at most {total >> 20}M")
    assert not sock.exists()
    if total < 10 << 40:  # 10T is a size machd understands, and refuses only for the machine
        clean_error(run("machd", "--socket", str(sock), "--memory", "10T"), 2,
                    "--memory 10 TiB is more than this machine's")


def test_machd_help_shows_defaults_and_every_option_has_help() -> None:
    r = run("machd", "--help")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    for shown in ("--memory SIZE", "(default: 1G)", "(default: 4K)", "(default: 16)",
                  "(default: 5.0)", "(default: error)", "(default: info)", "$PYMACH_SOCKET"):
        assert shown in text, shown
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, parser in sub.choices.items():  # type: ignore[union-attr]
        for action in parser._actions:
            assert action.help, f"pymach {name} {action.option_strings or action.dest}"


def _wait_for_socket(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, "machd exited"
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("machd did not start")


def test_machd_and_its_clients_honour_pymach_socket(tmp_path: Path) -> None:
    uffd_or_skip()
    sock = tmp_path / "env" / "machd.sock"
    env = {**os.environ, "PYMACH_SOCKET": str(sock)}
    daemon = subprocess.Popen([*PYMACH, "machd", "--log-level", "warning"], env=env)
    try:
        _wait_for_socket(sock, daemon)
        r = run("ps", "--json", env=env)
        assert r.returncode == 0, r.stderr
        assert "default_pager" in {row["name"] for row in json.loads(r.stdout)}
    finally:
        daemon.terminate()
        assert daemon.wait(20) == 0
    assert not sock.exists()


# -- 8. the benchmarks and the tools ---------------------------------------------------------
def test_bench_refuses_counts_below_one() -> None:
    clean_error(run("bench", "ipc", "-n", "0"), 2, "argument -n: '0': must be more than 0")
    clean_error(run("bench", "ipc", "--rounds", "0"), 2,
                "argument --rounds: '0': must be more than 0")
    clean_error(run("bench", "ipc", "-n", "x"), 2, "argument -n: 'x' is not a whole number")


def test_bench_cache_prints_a_table_and_json_on_request() -> None:
    r = run("bench", "cache")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "{" not in r.stdout and lines[0].startswith("16 files of 64 KiB")
    assert lines[1].split() == ["way", "pass", "client", "msgs", "pager", "msgs", "I/O",
                                "ops", "time"]
    rows = [line.split() for line in lines[2:6]]
    assert [row[:-2] for row in rows] == [
        ["mapped", "1", "16", "272", "256"], ["mapped", "2", "16", "0", "0"],
        ["read", "calls", "1", "272", "0", "256"], ["read", "calls", "2", "272", "0", "256"]]
    assert "mapped 256, read calls 512" in lines[6]
    j = run("bench", "cache", "--json")
    assert json.loads(j.stdout)["mapped_pass2"]["io_operations"] == 0


def _into_closed_pipe(*argv: str) -> subprocess.CompletedProcess[str]:
    """`pymach ARGV | head -0`: its stdout is a pipe nobody reads any more."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return run(*argv, stdout=write_end)
    finally:
        os.close(write_end)


def _blocked() -> None:
    m.msg_receive(m.port_allocate(m.task_self()))  # until task_terminate


@pytest.fixture
def children(native: str) -> Iterator[list[Any]]:
    """Tasks named sleeper, twin, twin and a long name, spawned by the test's task (their
    handles), ended afterwards."""
    long_name = "a-task-name-far-longer-than-the-column"
    handles = [m.spawn(_blocked, name=n) for n in ("sleeper", "twin", "twin", long_name)]
    try:
        yield handles
    finally:
        for h in handles:
            m.task_terminate(h.port)


def _ps(socket_path: str) -> list[dict[str, Any]]:
    r = run("ps", "--json", "--socket", socket_path)
    assert r.returncode == 0, r.stderr
    rows: list[dict[str, Any]] = json.loads(r.stdout)
    return rows


def test_tools_name_tasks_clearly(native: str, children: list[Any]) -> None:
    rows = _ps(native)
    ids = {r["name"]: r["id"] for r in rows}
    twins = sorted(r["id"] for r in rows if r["name"] == "twin")
    assert len(twins) == 2
    r = run("vmmap", "twin", "--socket", native)
    clean_error(r, 1, "2 tasks are named 'twin'", f"ids {twins[0]}, {twins[1]}")
    v = run("vmmap", str(ids["sleeper"]), "--socket", native)
    assert v.returncode == 0 and v.stdout.startswith("address space of task 'sleeper'")
    me = m.task_info(m.task_self())[0]
    lsmp = run("lsmp", str(ids[me]), "--socket", native)
    assert lsmp.returncode == 0, lsmp.stderr
    assert " task:sleeper " in lsmp.stdout and "notify:sleeper" in lsmp.stdout
    assert lsmp.stdout.startswith(f"port name space of task {me!r}")


def test_ps_keeps_its_columns_in_line_with_long_names(native: str,
                                                      children: list[Any]) -> None:
    r = run("ps", "--socket", native)
    assert r.returncode == 0, r.stderr
    header, *rows = r.stdout.splitlines()
    at = header.index("THREADS")
    for row in rows:
        assert row[at - 2:at] == "  " and row[at] != " ", row
    assert any("a-task-name-far~" in row for row in rows)
    whole = {row["name"] for row in _ps(native)}
    assert "a-task-name-far-longer-than-the-column" in whole  # JSON keeps it whole


def test_tools_end_quietly_when_their_pipe_closes(native: str) -> None:
    me = str(m.task_info(m.task_self())[0])
    for argv in (("ps",), ("lsmp", me), ("vmmap", me), ("vm_stat",)):
        r = _into_closed_pipe(*argv, "--socket", native)
        assert r.returncode == 1 and r.stderr == "", (argv, r.stderr)
    r = _into_closed_pipe("bench", "cache")
    assert r.returncode == 1 and r.stderr == ""


# -- 9. exceptions: the user's frames, and the child's traceback -----------------------------
_RAISES = """\
def check(n):
    if n > 2:
        raise ValueError(f"n is {n}")

check(3)
"""


def test_exec_shows_only_the_scripts_frames(machd_socket: str, tmp_path: Path) -> None:
    (tmp_path / "raises.py").write_text(_RAISES)
    r = run("exec", "--socket", machd_socket, "raises.py", cwd=tmp_path)
    assert r.returncode == 1
    frames = [line.strip() for line in r.stderr.splitlines() if line.strip().startswith("File")]
    assert frames == ['File "raises.py", line 5, in <module>',
                      'File "raises.py", line 3, in check'], r.stderr
    assert r.stderr.rstrip().endswith("ValueError: n is 3")


_SPAWNS = """\
import pymach

def deep(x):
    raise KeyError(x)

def child(x):
    return deep(x)

if __name__ == "__main__":
    try:
        pymach.spawn(child, "k", name="kid").result(60_000)
    except KeyError as e:
        cause = e.__cause__
        print("caught", repr(e), type(cause).__name__)
        print(cause.text, end="")
"""


def test_a_childs_exception_comes_back_with_its_traceback(machd_socket: str,
                                                          tmp_path: Path) -> None:
    (tmp_path / "spawns.py").write_text(_SPAWNS)
    r = run("exec", "--socket", machd_socket, "spawns.py", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # collected by result(): the child printed nothing
    out = r.stdout.splitlines()
    assert out[0] == "caught KeyError('k') RemoteTraceback"
    assert out[1] == "Traceback (most recent call last):"
    assert 'File "spawns.py", line 7, in child' in out[2] and "return deep(x)" in out[3]
    assert any('File "spawns.py", line 4, in deep' in line for line in out)
    assert out[-1] == "KeyError: 'k'"


def _raise_lookup() -> None:
    raise LookupError("from the child")


def test_result_chains_the_remote_traceback(native: str) -> None:
    h = m.spawn(_raise_lookup, name="raiser")
    with pytest.raises(LookupError, match="from the child") as info:
        h.result(60_000)
    cause = info.value.__cause__
    assert isinstance(cause, m.RemoteTraceback)
    assert "in _raise_lookup" in cause.text and 'raise LookupError("from the child")' in \
        cause.text
    assert "_spawned_main" not in cause.text  # the child's frames from its function on
    assert str(cause).startswith('\n"""\nTraceback')


# -- 16. packaging ---------------------------------------------------------------------------
def test_version_and_python_dash_m() -> None:
    r = run("--version")
    assert r.returncode == 0 and r.stdout == f"pymach {m.__version__}\n"
    dash_m = subprocess.run([sys.executable, "-m", "pymach", "--version"], capture_output=True,
                            text=True, timeout=60)
    assert dash_m.returncode == 0 and dash_m.stdout == r.stdout
    usage = subprocess.run([sys.executable, "-m", "pymach", "exec"], capture_output=True,
                           text=True, timeout=60)
    assert usage.returncode == 2 and "usage: pymach exec" in usage.stderr


def test_pyproject_metadata_and_py_typed() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    meta = project["project"]
    assert meta["authors"] == [{"name": "pymach developers"}]
    assert "Typing :: Typed" in meta["classifiers"]
    assert all(url for url in meta.get("urls", {}).values())  # none empty or invented
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["pymach"]
    assert importlib.resources.files("pymach").joinpath("py.typed").is_file()


def test_a_build_ships_py_typed(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / part, tmp_path / part)
    shutil.copytree(ROOT / "src", tmp_path / "src",
                    ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    r = subprocess.run([sys.executable, "-c", "import setuptools; setuptools.setup()", "-q",
                        "build_py", "--build-lib", "out", "egg_info"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "pymach" / "py.typed").is_file()
    assert (tmp_path / "out" / "pymach" / "__main__.py").is_file()
    info = (tmp_path / "src" / "pymach.egg-info" / "PKG-INFO").read_text()
    assert "Author: pymach developers" in info


def test_mypy_checks_a_users_calls_into_pymach(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    try:
        importlib.metadata.distribution("pymach")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("pymach is not installed (mypy finds installed packages only)")
    (tmp_path / "user.py").write_text(textwrap.dedent("""\
        import pymach

        name: str = pymach.task_self()
        """))
    r = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"),
                        "--no-error-summary", "user.py"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert "import-untyped" not in r.stdout and "py.typed" not in r.stdout, r.stdout
    assert 'user.py:3: error: Incompatible types in assignment (expression has type "int", ' \
        'variable has type "str")' in r.stdout, r.stdout


# -- item 11: a script run with python instead of `pymach exec` ---------------------------

def test_a_script_run_without_pymach_exec_is_told_about_it(tmp_path: Path) -> None:
    script = tmp_path / "squares.py"
    script.write_text("import pymach\npymach.task_self()\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1
    assert "pymach exec" in r.stderr and "pymach.boot()" in r.stderr


# -- item 9, embedded: an exception collected by .result() is not printed too --------------

def test_an_embedded_task_exception_collected_by_result_is_not_printed(
        tmp_path: Path) -> None:
    script = tmp_path / "collect.py"
    script.write_text(textwrap.dedent("""
        import pymach

        def fails():
            raise ValueError("boom")

        with pymach.boot() as k:
            try:
                k.spawn(fails, name="f").result(10_000)
            except ValueError as e:
                print("collected", e)
    """))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "collected boom"
    assert r.stderr == ""
