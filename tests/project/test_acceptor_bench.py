"""The TCP hand-off benchmark runs end to end in its --quick mode (no timing is checked)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import NO_UVLOOP, uvloop

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(
    not (ROOT / "benchmarks").is_dir(),
    reason="benchmarks/ is not here: the sdist does not ship the benchmark harness",
)
@pytest.mark.skipif(shutil.which("cc") is None, reason="the benchmark's client is C: needs cc")
@pytest.mark.skipif(uvloop is None, reason=f"{NO_UVLOOP}; the benchmark runs both loops")
def test_handoff_benchmark_quick_mode_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "handoff_bench.py"), "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    table = (ROOT / "benchmarks" / "_out" / "handoff.md").read_text()
    assert table.strip() == result.stdout.strip()
    for row in (
        "sharing one listener",
        "blocking stdlib",
        "docs idiom, uvloop",
        "toolkit, uvloop",
        "asyncio workers on SO_REUSEPORT",
        "uvloop workers on SO_REUSEPORT",
    ):
        assert row in table
    assert "conn/s ≥ uvloop SO_REUSEPORT" in table
    assert "Client errors (refused, reset or cut short): 0." in table
