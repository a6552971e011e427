"""The README's first screen stays true: its test command is the one CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```sh\n(.+?)\n```", text)


def test_readme_has_demo_and_test_commands() -> None:
    demo, tests = _readme_commands()[:2]
    assert demo.endswith("python -m aioancillary demo")
    assert tests.endswith("python -m pytest")


def test_ci_runs_the_readme_test_command() -> None:
    if not (ROOT / ".ci" / "run").exists():
        pytest.skip("no .ci/run here: an sdist carries no CI script")
    tests = _readme_commands()[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci
