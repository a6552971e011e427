"""``python -m aioancillary fdholder``: the operator's commands, run as an operator runs them.

``list`` and ``delete`` talk to a holder process (on each loop); usage errors exit 2, a
holder that refuses or cannot be reached exits 1 with the reason on stderr.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import LOOP_NAMES
from helpers.fdholder import HolderProcess, holders

from aioancillary import FdHolderBlockingClient

TIMEOUT = 120


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aioancillary", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
        check=False,
    )


@pytest.fixture(params=LOOP_NAMES)
def holder(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[HolderProcess]:
    with holders() as started:
        process = HolderProcess(tmp_path / "holder.sock", request.param)
        started.append(process)
        yield process.serving()


def test_the_help_shows_the_command_and_its_actions() -> None:
    top = run("--help")
    assert "fdholder" in top.stdout
    result = run("fdholder", "--help")
    assert result.returncode == 0
    for word in ("--socket", "--allow-uid", "--allow-gid", "--loop", "--max-entries",
                 "--max-fds", "list", "delete", "AIOANCILLARY_FDHOLDER_SOCKET"):  # fmt: skip
        assert word in result.stdout, word


def test_list_and_delete_talk_to_the_holder(holder: HolderProcess) -> None:
    r, w = os.pipe()
    try:
        with FdHolderBlockingClient.connect(holder.path) as client:
            client.store("web", w)
            client.store("state files", [r, w], timeout=600)
        result = run("fdholder", "list", "--socket", holder.path)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0].split() == ["FDS", "EXPIRES", "NAME"]
        rows = [line.split(maxsplit=2) for line in lines[1:]]
        assert [(fds, name) for fds, _expires, name in rows] == [("2", "state files"), ("1", "web")]
        assert rows[1][1] == "never"
        assert rows[0][1].endswith("s")
        assert 590 < float(rows[0][1][:-1]) <= 600
        # --socket before the action, and from the environment, work too.
        names = [line.split(maxsplit=2)[2] for line in lines]
        again = run("fdholder", "--socket", holder.path, "list").stdout.splitlines()
        assert [line.split(maxsplit=2)[2] for line in again] == names
        env = {**os.environ, "AIOANCILLARY_FDHOLDER_SOCKET": holder.path}
        again = run("fdholder", "list", env=env).stdout.splitlines()
        assert [line.split(maxsplit=2)[2] for line in again] == names

        deleted = run("fdholder", "delete", "state files", "--socket", holder.path)
        assert (deleted.returncode, deleted.stdout) == (0, "deleted 'state files'\n")
        with FdHolderBlockingClient.connect(holder.path) as client:
            assert [e.name for e in client.list()] == ["web"]

        missing = run("fdholder", "delete", "nope", "--socket", holder.path)
        assert missing.returncode == 1
        assert "no entry named 'nope'" in missing.stderr
        bad = run("fdholder", "delete", "a:b", "--socket", holder.path)
        assert bad.returncode == 2
        assert "':'" in bad.stderr
    finally:
        os.close(r)
        os.close(w)


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "AIOANCILLARY_FDHOLDER_SOCKET"}
    result = run("fdholder", "list", env=env)
    assert result.returncode == 2
    assert "--socket PATH (or set $AIOANCILLARY_FDHOLDER_SOCKET)" in result.stderr
    result = run("fdholder", "--socket", str(tmp_path / "s"), "--allow-uid", "no-such-user")
    assert result.returncode == 2
    assert "no user named 'no-such-user'" in result.stderr
    result = run("fdholder", "--socket", str(tmp_path / "s"), "--max-entries", "10001")
    assert result.returncode == 2
    assert "max_entries must be 1..10000" in result.stderr
    assert not (tmp_path / "s").exists()


def test_a_holder_that_is_not_there_exits_1(tmp_path: Path) -> None:
    result = run("fdholder", "list", "--socket", str(tmp_path / "nothing.sock"))
    assert result.returncode == 1
    assert "fdholder list:" in result.stderr
    assert "nothing.sock" in result.stderr
