"""The runnable examples and the demo finish by themselves, exit 0 and say they succeeded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import NO_UVLOOP, uvloop

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

CASES = {
    "acceptor_worker": (
        [str(EXAMPLES / "acceptor_worker.py")],
        "OK: all 6 clients were answered by the 2 worker processes",
    ),
    "prefork_pool": (
        [str(EXAMPLES / "prefork_pool.py")],
        "OK: 200 visitors answered by",
    ),
    "zero_downtime_reload": (
        [str(EXAMPLES / "zero_downtime_reload.py")],
        "none refused or dropped",
    ),
    "uvloop_daemon": (
        [str(EXAMPLES / "uvloop_daemon.py")],
        "OK: 18 visitors counted 1 to 18 by two daemon processes (socket-activated, then reloaded",
    ),
    "demo": (
        ["-m", "aioancillary", "demo"],
        "neither process leaked a file descriptor",
    ),
}


# Without uvloop the uvloop daemon example runs on asyncio, where its manager's proc.wait() for
# systemd-socket-activate also waits for EOF on the stderr pipe, which the reloaded daemon
# inherited and keeps open (asyncio's Process.wait waits for the pipes; uvloop's does not):
# the example hangs there. A defect of the example, reported; skipped until it is fixed.
NEEDS_UVLOOP = {"uvloop_daemon"}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            name,
            marks=pytest.mark.skipif(
                uvloop is None and name in NEEDS_UVLOOP,
                reason=f"{NO_UVLOOP}; this example hangs on asyncio (see NEEDS_UVLOOP)",
            ),
        )
        for name in sorted(CASES)
    ],
)
def test_example_runs_and_succeeds(name: str) -> None:
    args, key_line = CASES[name]
    result = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert key_line in result.stdout, output
    assert "Traceback" not in output, output


def test_every_example_is_tested() -> None:
    scripts = {path.stem for path in EXAMPLES.glob("*.py")}
    assert scripts <= set(CASES), f"examples without a test: {sorted(scripts - set(CASES))}"
