"""The README's first program runs and prints what the README says it prints."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _first_program() -> str:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)[0]


def test_readme_first_program_runs() -> None:
    r = subprocess.run([sys.executable, "-c", _first_program()], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:3] == ["42", "bye", "(False, 0, 5, True, True)"]


def test_demo_command_runs() -> None:
    r = subprocess.run([sys.executable, "-m", "pymach.cli.main", "demo", "--deterministic",
                        "--seed", "3"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "calc_add(2, 40) = 42" in r.stdout
    assert "NOTIFY_PORT_DELETED" in r.stdout
    assert "SEND_INVALID_PORT" in r.stdout
