"""What the sdist and the wheel carry, built from this tree with the project's own backend.

The wheel is the package and its metadata only. The sdist is what a distribution packager
builds and tests from: the package, the tests, the examples and docs the tests run, and the
docs site's config; not benchmarks/, fuzz/ or .ci/ (see ``[tool.hatch.build.targets.sdist]``
in pyproject.toml for why). Both listings are printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

import aioancillary

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "aioancillary"


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: hatchling comes from the test environment, no download needed.
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out


def _one(dist: Path, pattern: str) -> Path:
    (path,) = dist.glob(pattern)
    return path


def _compiler_expected() -> bool:
    """The build hook compiles the C extension here (a compiler, and not disabled)."""
    if os.environ.get("AIOANCILLARY_NO_EXTENSIONS", "") not in ("", "0"):
        return False
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    return shutil.which(cc.split()[0]) is not None


def test_wheel_carries_the_package_and_its_metadata(dist: Path) -> None:
    wheel = _one(dist, f"aioancillary-{aioancillary.__version__}-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = sorted(zf.namelist())
        metadata = email.message_from_bytes(
            zf.read(f"aioancillary-{aioancillary.__version__}.dist-info/METADATA")
        )
    print("\n".join(["", f"{wheel.name}:", *names]))
    modules = {f"aioancillary/{p.relative_to(PACKAGE).as_posix()}" for p in PACKAGE.rglob("*.py")}
    package = {n for n in names if n.startswith("aioancillary/")}
    # The C extension (issue 20): compiled into a platform wheel where a compiler is present;
    # its source stays in the sdist, its type stub ships with the package either way.
    extension = "aioancillary/_kernel/_speedups" + (sysconfig.get_config_var("EXT_SUFFIX") or "")
    built = extension in package
    assert built == _compiler_expected()
    tag = wheel.name.removeprefix(f"aioancillary-{aioancillary.__version__}-")
    assert (tag == "py3-none-any.whl") == (not built), wheel.name
    stub = "aioancillary/_kernel/_speedups.pyi"
    assert package == {*modules, "aioancillary/py.typed", stub, *([extension] if built else [])}
    info = {n.split("/", 1)[1] for n in names if ".dist-info/" in n}
    assert info == {"METADATA", "WHEEL", "RECORD", "entry_points.txt", "licenses/LICENSE"}
    with zipfile.ZipFile(wheel) as zf:
        dist_info = f"aioancillary-{aioancillary.__version__}.dist-info"
        entry_points = zf.read(f"{dist_info}/entry_points.txt")
    # The console script `aioancillary`, the same as `python -m aioancillary`.
    assert entry_points.decode().split() == [
        "[console_scripts]",
        "aioancillary",
        "=",
        "aioancillary._tools._cli:console_main",
    ]

    assert metadata["Version"] == aioancillary.__version__
    assert metadata["License-Expression"] == "MIT"
    assert metadata["Requires-Python"] == ">=3.11"
    # The optional runtime pieces; dev tools are groups, not extras.
    assert sorted(metadata.get_all("Provides-Extra") or []) == ["aiohttp", "asgi", "uvloop"]
    urls = dict(u.split(", ", 1) for u in metadata.get_all("Project-URL") or [])
    assert set(urls) == {"Homepage", "Documentation", "Source", "Changelog", "Issues"}
    assert all(u.startswith("https://") for u in urls.values())
    assert "](http" in metadata.get_payload()  # the README, with its absolute links


def test_sdist_carries_what_the_tests_need_and_no_more(dist: Path) -> None:
    sdist = _one(dist, f"aioancillary-{aioancillary.__version__}.tar.gz")
    with tarfile.open(sdist) as tf:
        names = sorted(m.name.split("/", 1)[1] for m in tf.getmembers() if m.isfile())
    print("\n".join(["", f"{sdist.name}:", *names]))
    top = {n.split("/", 1)[0] for n in names}
    assert top == {
        ".gitignore",  # hatchling always adds it: the sdist's build ignores what git ignores
        "PKG-INFO",
        "LICENSE",
        "README.md",
        "conftest.py",
        "mkdocs.yml",
        "pyproject.toml",
        "hatch_build.py",  # the build hook that compiles the optional C extension
        "docs",
        "examples",
        "src",
        "tests",
    }
    tracked = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "src", "tests", "examples", "docs"],
        capture_output=True,
        text=True,
        check=False,
    )
    if tracked.returncode == 0 and tracked.stdout:  # in a git checkout: nothing tracked is lost
        missing = set(tracked.stdout.split()) - set(names)
        assert not missing, f"tracked files missing from the sdist: {sorted(missing)}"
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert "src/aioancillary/_kernel/_speedups.c" in names
    assert "src/aioancillary/_kernel/_speedups_accept.c" in names  # #included by _speedups.c
    assert "src/aioancillary/_kernel/_speedups_send.c" in names
    assert "src/aioancillary/_kernel/_speedups_outbox.c" in names
    assert "src/aioancillary/_kernel/_speedups_write.c" in names
    assert not [n for n in names if n.endswith(".so")]  # never a module built in place


def test_wheel_builds_pure_without_a_compiler(tmp_path: Path) -> None:
    """No C compiler: the build still succeeds, with the pure-Python wheel."""
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc")}
    env.pop("AIOANCILLARY_REQUIRE_EXTENSIONS", None)
    env.pop("AIOANCILLARY_NO_EXTENSIONS", None)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--no-isolation",
            "--wheel",
            "--outdir",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert "building without the C extension (the pure-Python path): no C compiler" in (
        result.stderr + result.stdout
    )
    _one(tmp_path, f"aioancillary-{aioancillary.__version__}-py3-none-any.whl")
