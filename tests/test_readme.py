"""The README's programs run and print what the README says they print."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _program(containing: str) -> str:
    """The README's Python block that contains `containing`."""
    text = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if containing in b]
    assert len(blocks) == 1, f"expected one README block with {containing!r}"
    return blocks[0]


def _run(program: str) -> list[str]:
    r = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_readme_first_program_runs() -> None:
    out = _run(_program("def echo_server"))
    assert out[:3] == ["42", "bye", "(False, 0, 5, True, True)"]


def test_readme_vm_program_runs() -> None:
    out = _run(_program("KERN_PROTECTION_FAILURE"))
    assert out == ["KERN_PROTECTION_FAILURE", "b'hello'", "b'hello' 1"]


def test_readme_data_manager_tutorial_runs() -> None:
    out = _run(_program("class Squares"))
    assert out == ["25", "page 0 written back"]


def test_readme_network_example_runs() -> None:
    out = _run(_program('a.start(serve, name="server")'))
    assert out == ["42"]


def test_demo_command_runs() -> None:
    r = subprocess.run([sys.executable, "-m", "pymach.cli.main", "demo", "--deterministic",
                        "--seed", "3"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "calc_add(2, 40) = 42" in r.stdout
    assert "NOTIFY_PORT_DELETED" in r.stdout
    assert "SEND_INVALID_PORT" in r.stdout


def test_readme_native_program_runs(machd_socket: str, tmp_path: Path) -> None:
    script = tmp_path / "squares.py"
    script.write_text(_program("class SquarePager"))
    r = subprocess.run([sys.executable, "-m", "pymach.cli.main", "exec", "--socket",
                        machd_socket, str(script)], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    text = (ROOT / "README.md").read_text()
    shown = text.split("$ pymach exec squares.py\n", 1)[1].split("```", 1)[0].splitlines()
    assert r.stdout.splitlines() == shown


def _expected_output(containing: str) -> list[str]:
    """The lines of the ```text block that follows the README's Python block with
    `containing` (what the README says the program prints)."""
    text = (ROOT / "README.md").read_text()
    start = text.index(_program(containing))
    block = re.search(r"```text\n(.*?)```", text[start:], re.S)
    assert block is not None
    return block.group(1).splitlines()


def test_readme_unixio_example_prints_what_the_readme_says() -> None:
    assert _run(_program("unixio.spawn(child, fd)")) == \
        _expected_output("unixio.spawn(child, fd)")


def test_readme_blackboard_example_prints_what_the_readme_says() -> None:
    marker = "from pymach.apps.blackboard import Blackboard"
    assert _run(_program(marker)) == _expected_output(marker)


def test_readme_mig_example_runs() -> None:
    assert _run(_program('calc = Subsystem("calc", 7000)')) == ["42", "stopped"]


def test_readme_rvm_program_runs() -> None:
    out = _run(_program("rvm.start_manager"))
    assert out[:2] == ["b'hello'", "b'world'"]
    assert out[2].startswith("RvmStatistics(records_applied=2, pages_written=2, wal_forces=1")
