"""The memory-per-connection benchmark runs end to end (no size is checked: that is the
benchmark's report, not a test)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(
    not (ROOT / "benchmarks").is_dir(),
    reason="benchmarks/ is not here: the sdist does not ship the benchmark harness",
)
def test_memory_benchmark_quick_mode_runs() -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "memory_bench.py"),
            "--quick",
            "--loop",
            "asyncio",
            "--kind",
            "aioancillary-py",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| asyncio |")]
    assert [row.split("|")[2].strip() for row in rows] == ["streams", "aioancillary-py"]
