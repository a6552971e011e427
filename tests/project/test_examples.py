"""The runnable examples and the demo finish by themselves, exit 0 and say they succeeded.

They run with ``ResourceWarning`` as an error in every process they start (``-W`` for the
script, ``PYTHONWARNINGS`` for the children: workers, daemons, generations), and their output
must not show one: a warning raised in a ``__del__`` or a callback is only printed ("Exception
ignored in ..."), never fails the process, so the output is what tells. The documentation's
samples that are whole programs but cannot run in-process (a ``WorkerPool`` imports its handler
by name) run the same way, as scripts.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
DOCS = ROOT / "docs"

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

#: What a ResourceWarning turned error leaves in the output of a process that survived it.
WARNING_SIGNS = ("ResourceWarning", "Exception ignored", "unclosed")


def run_strict(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python args`` with ResourceWarning an error in it and in every child it starts."""
    env = {**os.environ, "PYTHONWARNINGS": "error::ResourceWarning"}
    return subprocess.run(
        [sys.executable, "-W", "error::ResourceWarning", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_clean(result: subprocess.CompletedProcess[str]) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Traceback" not in output, output
    signs = [sign for sign in WARNING_SIGNS if sign in output]
    assert not signs, f"{signs} in the output:\n{output}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_example_runs_and_succeeds(name: str) -> None:
    args, key_line = CASES[name]
    result = run_strict(args, ROOT)
    assert_clean(result)
    assert key_line in result.stdout, result.stdout + result.stderr


def test_every_example_is_tested() -> None:
    scripts = {path.stem for path in EXAMPLES.glob("*.py")}
    assert scripts <= set(CASES), f"examples without a test: {sorted(scripts - set(CASES))}"


def script_samples() -> list[tuple[str, str]]:
    """Skipped ```python blocks of the docs that are whole programs (``__main__`` guard)."""
    found = []
    for page in sorted(DOCS.rglob("*.md")):
        text = page.read_text()
        pattern = r"<!-- skip: next -->\n(?:(?!```)[^\n]*\n)*?```python\n(.*?)```"
        for n, match in enumerate(re.finditer(pattern, text, re.DOTALL)):
            code = match.group(1)
            if 'if __name__ == "__main__":' in code:
                found.append((f"{page.relative_to(DOCS).as_posix()}#{n}", code))
    return found


SCRIPT_SAMPLES = script_samples()


def test_the_prefork_pool_sample_is_run_as_a_script() -> None:
    assert any(name.startswith("how-to/prefork-pool.md") for name, _ in SCRIPT_SAMPLES)


@pytest.mark.parametrize(("name", "code"), SCRIPT_SAMPLES, ids=[n for n, _ in SCRIPT_SAMPLES])
def test_docs_script_sample_runs_clean(name: str, code: str, tmp_path: Path) -> None:
    script = tmp_path / "sample.py"
    script.write_text(code)
    assert_clean(run_strict([str(script)], tmp_path))
