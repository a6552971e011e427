"""``python -m aioancillary``: every behaviour of the command line, run as a user runs it.

Each test starts ``python -m aioancillary ...`` in a subprocess. uvloop's absence is simulated
with a ``uvloop`` package on ``PYTHONPATH`` whose import fails, as a missing module's does; the
children the demo and the benchmark start inherit it.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import pty
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import NO_UVLOOP, uvloop

import aioancillary
from aioancillary._kernel import _accel
from aioancillary._tools import _bench

PROG = "usage: python -m aioancillary"
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


@pytest.fixture
def without_uvloop(tmp_path: Path) -> dict[str, str]:
    """An environment in which ``import uvloop`` fails."""
    shim = tmp_path / "shim" / "uvloop"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError(\"No module named 'uvloop'\")\n")
    path = os.pathsep.join(filter(None, [str(shim.parent), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


# -- help, version, usage errors ---------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_goes_to_stdout_and_exits_0(flag: str) -> None:
    result = run(flag)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(PROG)
    for word in ("demo", "bench", "--version", "readthedocs"):
        assert word in result.stdout
    assert result.stderr == ""


def test_no_arguments_prints_the_help_to_stderr_and_exits_2() -> None:
    result = run()
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(PROG)
    assert "demo" in result.stderr
    assert "bench" in result.stderr


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag: str) -> None:
    result = run(flag)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith(f"aioancillary {aioancillary.__version__} (CPython ")
    assert ("uvloop not installed" in line) == (uvloop is None)
    # What the child selects from the environment it inherits (this process's own selection may
    # have been switched by a test); on one line, never wrapped.
    assert line.endswith(f"; hot paths: {_accel._load()[1]})")


@pytest.mark.parametrize("disabled", [False, True])
def test_version_says_which_path_is_in_use(disabled: bool) -> None:
    env = dict(os.environ, COLUMNS="40")
    env.pop("AIOANCILLARY_NO_EXTENSIONS", None)
    if disabled:
        env["AIOANCILLARY_NO_EXTENSIONS"] = "1"
    result = run("--version", env=env)
    assert result.returncode == 0, result.stderr
    if disabled:
        assert "hot paths: pure Python, AIOANCILLARY_NO_EXTENSIONS is set" in result.stdout
    elif importlib.util.find_spec("aioancillary._kernel._speedups") is not None:
        assert "hot paths: C extension)" in result.stdout
    else:
        assert "hot paths: pure Python, the C extension is not available" in result.stdout


def test_version_says_when_uvloop_is_missing(without_uvloop: dict[str, str]) -> None:
    result = run("--version", env=without_uvloop)
    assert result.returncode == 0, result.stderr
    assert "uvloop not installed" in result.stdout


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_command_help(command: str) -> None:
    result = run(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{PROG} {command}")
    assert "--loop" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["demo", "--loop", "trio"], "invalid choice: 'trio'"),
        (["demo", "extra"], "unrecognized arguments: extra"),
        (["bench", "-n", "0"], "must be at least 1"),
        (["bench", "--repeat", "many"], "not a whole number"),
    ],
)
def test_usage_errors_go_to_stderr_and_exit_2(args: list[str], message: str) -> None:
    result = run(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "usage: python -m aioancillary" in result.stderr
    assert message in result.stderr


def test_demo_worker_is_internal() -> None:
    result = run("demo-worker")
    assert result.returncode == 2
    assert "started by the demo itself" in result.stderr
    assert "demo-worker" not in run("--help").stdout


# -- the console script --------------------------------------------------------------------------

SCRIPT = Path(sys.executable).parent / "aioancillary"


def test_the_console_script_is_python_m_aioancillary() -> None:
    """``aioancillary`` ([project.scripts]) runs the same command line, under its own name."""
    assert SCRIPT.exists(), f"no {SCRIPT}: reinstall (pip install --no-deps -e .)"
    for args in (["--version"], ["--help"], ["demo", "--help"], ["frobnicate"]):
        script = subprocess.run(
            [str(SCRIPT), *args], capture_output=True, text=True, timeout=TIMEOUT, check=False
        )
        module = run(*args)
        assert script.returncode == module.returncode, script.stderr
        for mine, theirs in ((script.stdout, module.stdout), (script.stderr, module.stderr)):
            # The same text once the name is swapped (argparse wraps lines by its length).
            assert mine.split() == theirs.replace("python -m aioancillary", "aioancillary").split()


# -- a reader that leaves early (demo | head -1) --------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [["demo"], ["bench", "--loop", "asyncio", "-n", "300", "--repeat", "1"]],
    ids=["demo", "bench"],
)
def test_a_closed_pipe_ends_the_command_quietly_by_sigpipe(args: list[str]) -> None:
    """As ``python -m aioancillary demo | head -1``: no traceback, killed by SIGPIPE (141 in a
    shell), and the demo's second process gone too (stderr reaches EOF only when it is)."""
    with subprocess.Popen(
        [sys.executable, "-m", "aioancillary", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        assert proc.stderr is not None
        first = proc.stdout.readline()
        proc.stdout.close()  # what head does after its first line
        errors = proc.stderr.read()  # until every writer, the demo's child included, is gone
        status = proc.wait(timeout=TIMEOUT)
    assert first.startswith("aioancillary ")
    assert status == -signal.SIGPIPE, errors
    if args[0] == "demo":
        assert errors == ""
    else:  # bench's progress lines go to stderr, which is still open
        assert "Traceback" not in errors
        assert "Error" not in errors


# -- demo ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "loop_line"),
    [
        pytest.param(["demo", "--loop", "asyncio"], "the default asyncio loop", id="asyncio"),
        pytest.param(
            ["demo", "--loop", "uvloop"],
            "uvloop",
            id="uvloop",
            marks=pytest.mark.skipif(uvloop is None, reason=NO_UVLOOP),
        ),
        pytest.param(
            ["demo"],
            "uvloop" if uvloop is not None else "the default asyncio loop",
            id="default",
        ),
    ],
)
def test_demo_runs_on_the_chosen_loop(args: list[str], loop_line: str) -> None:
    result = run(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Both processes run on {loop_line}" in result.stdout
    assert "neither process leaked a file descriptor" in result.stdout
    # B (the worker) narrates too: the loop choice reached the child.
    assert re.search(r"\[B pid \d+\] received the client's socket", result.stdout)


def test_demo_without_uvloop_defaults_to_asyncio(without_uvloop: dict[str, str]) -> None:
    result = run("demo", env=without_uvloop)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Both processes run on the default asyncio loop" in result.stdout


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_loop_uvloop_without_uvloop_is_a_clear_error(
    command: str, without_uvloop: dict[str, str]
) -> None:
    result = run(command, "--loop", "uvloop", env=without_uvloop)
    assert result.returncode == 2
    assert result.stdout == ""
    assert f"{PROG} {command}" in result.stderr
    assert "--loop uvloop: uvloop is not installed (pip install 'aioancillary[uvloop]')" in (
        result.stderr
    )


# -- bench ---------------------------------------------------------------------------------------

ROW = re.compile(r"^(\S+)\s+(stdlib \(blocking\)|aioancillary \w+)\s+([\d,]+)\s+([\d.]+)x\s+(\S+)$")


def table_rows(stdout: str) -> list[tuple[str, str, str]]:
    """(workload, implementation, ratio) of every row of the table."""
    return [(m[1], m[2], m[4]) for line in stdout.splitlines() if (m := ROW.match(line.rstrip()))]


def test_bench_prints_the_ratio_table_and_plain_progress() -> None:
    result = run("bench", "-n", "400", "--repeat", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    loops = ["asyncio", "uvloop"] if uvloop is not None else ["asyncio"]
    rows = table_rows(result.stdout)
    expected = [
        (w, _bench.implementation_name(i)) for w in _bench.WORKLOADS for i in ["stdlib", *loops]
    ]
    assert [(w, i) for w, i, _ in rows] == expected
    assert all(ratio == "1.00" for _, i, ratio in rows if i.startswith("stdlib"))
    # stderr is a pipe here: one plain line per finished cell, no cursor control.
    lines = result.stderr.splitlines()
    total = len(expected)
    assert len(lines) == total
    for done, line in enumerate(lines, 1):
        assert line.startswith(f"[{done}/{total}] ")
        assert re.search(r"\(elapsed \d+\.\d s, ETA \d+ s\)$", line)
    assert "\r" not in result.stderr
    assert "\x1b" not in result.stderr


def test_bench_one_loop_only() -> None:
    result = run("bench", "--loop", "asyncio", "-n", "300", "--repeat", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    implementations = {i for _, i, _ in table_rows(result.stdout)}
    assert implementations == {"stdlib (blocking)", "aioancillary asyncio"}
    assert "best of 2" in result.stdout
    assert result.stderr.count("\n") == 2 * len(_bench.WORKLOADS) * 2


def test_bench_without_uvloop_says_it_was_not_measured(without_uvloop: dict[str, str]) -> None:
    result = run("bench", "-n", "300", "--repeat", "1", env=without_uvloop)
    assert result.returncode == 0, result.stdout + result.stderr
    assert {i for _, i, _ in table_rows(result.stdout)} == {
        "stdlib (blocking)",
        "aioancillary asyncio",
    }
    assert "uvloop was not measured: uvloop is not installed" in result.stdout


def test_bench_progress_on_a_terminal_redraws_one_line() -> None:
    """With stderr on a terminal the progress line is redrawn in place (``\\r``, erase line)."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "aioancillary",
                "bench",
                "--loop",
                "asyncio",
                "-n",
                "300",
                "--repeat",
                "1",
            ],
            stdout=subprocess.PIPE,
            stderr=slave,
            text=True,
        )
        os.close(slave)
        slave = -1
        chunks = []
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError as exc:  # EIO: every writer of the terminal is gone
                if exc.errno != errno.EIO:
                    raise
                break
            if not chunk:
                break
            chunks.append(chunk)
        stdout, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert proc.returncode == 0
    screen = b"".join(chunks).decode()
    total = len(_bench.WORKLOADS) * 2
    assert f"\r\x1b[K[0/{total}] elapsed" in screen  # drawn before the first cell ends
    assert "ETA unknown; running stream-1fd stdlib (blocking)" in screen
    assert f"\r\x1b[K[{total}/{total}] ping-pong aioancillary asyncio:" in screen
    assert "ping-pong" in stdout


# -- the benchmark module's failure path ----------------------------------------------------------


def test_a_failing_cell_is_reported_not_hidden() -> None:
    broken = _bench.Cell("stream-1fd", "no-such-loop")
    with pytest.raises(_bench.BenchError, match="unknown implementation 'no-such-loop'"):
        _bench.run_cell(broken, 10)
    results, errors = _bench.run_all(["no-such-loop"], 10, 2)
    assert set(errors) == set(_bench.make_cells(["no-such-loop"])) - {
        _bench.Cell(w, "stdlib") for w in _bench.WORKLOADS
    }
    table = _bench.table(results, errors, ["no-such-loop"])
    assert table.count("FAILED") == len(_bench.WORKLOADS)
    assert all(len(runs) == 2 for runs in results.values())
