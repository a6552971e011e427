"""Build the optional C extension ``aioancillary._kernel._speedups`` (a hatchling build hook).

hatchling does not compile C by itself: this hook does, with the C compiler the running
Python was built with (``CC``, or ``cc``), and never fails the build. Without a compiler, or
if the compilation fails, the wheel is the pure-Python one and the package works the same,
more slowly (``python -m aioancillary --version`` says which path is in use).

* A regular wheel gets the compiled module and a platform tag.
* An editable install (``pip install -e .``) compiles it next to its source, in
  ``src/aioancillary/_kernel/`` (ignored by git), where the editable path finds it.
* ``AIOANCILLARY_NO_EXTENSIONS=1`` at build time skips the compilation (a pure wheel).
* ``AIOANCILLARY_CFLAGS`` adds compiler flags (CI: ``-Werror -Wconversion``; the sanitizer
  build: ``-fsanitize=address,undefined``).
* ``AIOANCILLARY_REQUIRE_EXTENSIONS=1`` makes a failed compilation fail the build (CI).

Run as a script to (re)build the extension in place for the current interpreter::

    .venv/bin/python hatch_build.py
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
SOURCE = ROOT / "src" / "aioancillary" / "_kernel" / "_speedups.c"
TARGET = "aioancillary/_kernel/_speedups"
# Warnings on by default; -Werror only where asked (CI): a user's newer compiler may warn.
CFLAGS = ["-O2", "-Wall", "-Wextra", "-fvisibility=hidden", "-std=c11", "-D_GNU_SOURCE"]


def _truthy(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def compile_extension(output: Path) -> str | None:
    """Compile the extension to ``output``; return why not (a message) or None when built."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    if not output.name.endswith(suffix):
        return f"output name must end with {suffix}"
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    command = shlex.split(cc)
    if shutil.which(command[0]) is None:
        return f"no C compiler ({command[0]} not found)"
    include = sysconfig.get_paths()["include"]
    link = ["-shared", "-fPIC"]
    if sys.platform == "darwin":
        link += ["-undefined", "dynamic_lookup"]
    extra = shlex.split(os.environ.get("AIOANCILLARY_CFLAGS", ""))
    args = [*command, *CFLAGS, *extra, f"-I{include}", *link, str(SOURCE), "-o", str(output)]
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return f"{shlex.join(args)} failed:\n{result.stdout}{result.stderr}"
    if result.stderr.strip():
        print(result.stderr, file=sys.stderr)
    return None


def _report(why: str) -> None:
    if _truthy("AIOANCILLARY_REQUIRE_EXTENSIONS"):
        raise RuntimeError(f"aioancillary: the C extension was required but not built: {why}")
    print(
        f"aioancillary: building without the C extension (the pure-Python path): {why}",
        file=sys.stderr,
    )


try:
    from hatchling.builders.hooks.plugin.interface import BuildHookInterface
except ImportError:  # run as a script without hatchling
    BuildHookInterface = object  # type: ignore[assignment,misc]


class SpeedupsHook(BuildHookInterface):  # type: ignore[type-arg]
    """Compile the extension into the wheel (or in place for an editable install)."""

    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        if _truthy("AIOANCILLARY_NO_EXTENSIONS"):  # asked for: never an error
            print("aioancillary: AIOANCILLARY_NO_EXTENSIONS is set: pure Python", file=sys.stderr)
            return
        suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
        if version == "editable":
            output = SOURCE.with_name("_speedups" + suffix)
            why = compile_extension(output)
            if why is not None:
                output.unlink(missing_ok=True)  # never leave a stale module behind
                _report(why)
            return
        build_dir = Path(tempfile.mkdtemp(prefix="aioancillary-build-"))
        output = build_dir / ("_speedups" + suffix)
        why = compile_extension(output)
        if why is not None:
            _report(why)
            return
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        build_data["force_include"][str(output)] = TARGET + suffix


def main() -> int:
    """Build the extension in place for this interpreter (a developer's rebuild)."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    output = SOURCE.with_name("_speedups" + suffix)
    why = compile_extension(output)
    if why is not None:
        print(why, file=sys.stderr)
        return 1
    print(f"built {output.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
