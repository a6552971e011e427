"""Run the aioancillary benchmarks: ``.venv/bin/python benchmarks/run.py``.

Every implementation runs in the same invocation, interleaved (repeat 1 of every cell, then
repeat 2, ...), so that the ratios to the C program come from one run on one machine state.
Prints the table and writes ``latest.md``, ``latest.json`` and ``performance.png`` into the
ignored ``benchmarks/_out/``; with ``--publish``, into ``benchmarks/results/latest.md`` (+
``latest.json``) and ``docs/performance.png``, the files the documentation shows. See
``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import importlib
import importlib.metadata
import json
import math
import os
import platform
import pstats
import resource
import shlex
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import _cells
import _report
from _cells import IMPLS, SOAK, WORKLOADS, CellError, CellResult, Impl, Workload

OUT = _cells.HERE / "_out"  # gitignored: every run that is not published
RESULTS = _cells.HERE / "results"  # --publish: the committed report ...
PLOT = _cells.HERE.parent / "docs" / "performance.png"  # ... and the plot the docs show


@dataclass(frozen=True)
class Outputs:
    """Where a run writes its report, raw results and plot."""

    report: Path
    raw: Path
    plot: Path


def outputs(publish: bool) -> Outputs:
    if publish:
        return Outputs(RESULTS / "latest.md", RESULTS / "latest.json", PLOT)
    return Outputs(OUT / "latest.md", OUT / "latest.json", OUT / "performance.png")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="aioancillary benchmark harness (not part of the test suite)"
    )
    parser.add_argument("--quick", action="store_true", help="short smoke run (~0.1 s cells)")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help="run only matching workloads and/or implementations (glob, repeatable); "
        f"workloads: {', '.join(w.name for w in [*WORKLOADS, SOAK])}; "
        f"implementations: {', '.join(i.name for i in IMPLS)}. The C reference always runs.",
    )
    parser.add_argument("--repeat", type=int, help="interleaved repeats per cell (default 3)")
    parser.add_argument("--seconds", type=float, help="target duration per cell (default 1.0)")
    parser.add_argument("--soak-messages", type=int, help="messages in the soak (default 1M)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of benchmarking, cProfile both sides of aioancillary cells (default "
        "stream-1fd, framed, both loops; narrow or widen with --only)",
    )
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="let the scheduler place the ping-pong sides (default: both on one CPU)",
    )
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    parser.add_argument(
        "--publish",
        action="store_true",
        help="write benchmarks/results/latest.md and docs/performance.png (the published "
        "report) instead of benchmarks/_out/",
    )
    parser.add_argument(
        "--replot",
        action="store_true",
        help="rewrite latest.md and the PNG from latest.json (of _out/, or of results/ with "
        "--publish)",
    )
    parser.add_argument("--cc", default="cc", help="C compiler (default: cc)")
    args = parser.parse_args(argv)
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.pin = not args.no_pin
    args.seconds = args.seconds or (0.1 if args.quick else 1.0)
    args.soak_messages = args.soak_messages or (100_000 if args.quick else 1_000_000)
    return args


def _select(only: list[str]) -> tuple[list[Workload], list[Impl]]:
    workloads = [*WORKLOADS, SOAK]
    wanted_w = [p for p in only if any(fnmatch.fnmatch(w.name, p) for w in workloads)]
    wanted_i = [p for p in only if p not in wanted_w]
    for pattern in wanted_i:
        if not any(fnmatch.fnmatch(i.name, pattern) for i in IMPLS):
            sys.exit(f"--only {pattern!r} matches no workload or implementation")
    if wanted_w:
        workloads = [w for w in workloads if any(fnmatch.fnmatch(w.name, p) for p in wanted_w)]
    impls = IMPLS
    if wanted_i:
        impls = [
            i for i in IMPLS if i.name == "c" or any(fnmatch.fnmatch(i.name, p) for p in wanted_i)
        ]
    return workloads, impls


def _available(impls: list[Impl]) -> tuple[list[Impl], list[str]]:
    """Import every implementation in the parent (children then fork with it loaded)."""
    ok, notes = [], []
    for impl in impls:
        try:
            if impl.module != "c":
                importlib.import_module(f"impl_{impl.module}")
            if impl.loop == "uvloop":
                importlib.import_module("uvloop")
        except ImportError as exc:
            notes.append(f"{impl.name}: skipped ({exc})")
            continue
        ok.append(impl)
    return ok, notes


def _pilot_n(workload: Workload, quick: bool) -> int:
    return (500 if quick else 3000) if workload.kind != "oneway" else (2000 if quick else 20000)


def _round(n: float) -> int:
    """Two significant digits, so that N reads well in the table."""
    n = max(1000, min(5_000_000, n))
    scale = 10 ** (int(math.log10(n)) - 1)
    return int(round(n / scale) * scale)


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _run_matrix(
    args: argparse.Namespace, workloads: list[Workload], impls: list[Impl], tmp: Path
) -> tuple[dict[tuple[str, str], list[CellResult]], dict[tuple[str, str], str]]:
    cells = [(w, i) for w in workloads if w is not SOAK for i in impls if i.applies(w)]
    sizes: dict[tuple[str, str], int] = {}
    results: dict[tuple[str, str], list[CellResult]] = {}
    errors: dict[tuple[str, str], str] = {}
    for rep in range(args.repeat):
        for workload, impl in cells:
            key = (workload.name, impl.name)
            if key in errors:
                continue
            try:
                if key not in sizes:
                    pilot_n = _pilot_n(workload, args.quick)
                    pilot = _cells.run_cell(workload, impl, pilot_n, tmpdir=tmp, pin=args.pin)
                    sizes[key] = _round(pilot.rate * args.seconds)
                res = _cells.run_cell(workload, impl, sizes[key], tmpdir=tmp, pin=args.pin)
            except CellError as exc:
                errors[key] = str(exc)
                _progress(
                    f"[{rep + 1}/{args.repeat}] {workload.name:14} {impl.name:28} FAILED {exc}"
                )
                continue
            results.setdefault(key, []).append(res)
            _progress(
                f"[{rep + 1}/{args.repeat}] {workload.name:14} {impl.name:28} "
                f"{res.rate:>11,.0f}/s  {res.seconds:5.2f} s  "
                f"leaked {res.leaked_rx}/{res.leaked_tx}"
            )
    return results, errors


def _run_soak(
    args: argparse.Namespace, impls: list[Impl], tmp: Path
) -> tuple[dict[str, CellResult], dict[tuple[str, str], str]]:
    soak: dict[str, CellResult] = {}
    errors: dict[tuple[str, str], str] = {}
    n = args.soak_messages
    for impl in impls:
        if not (impl.module == "aioancillary" and impl.variant == "framed"):
            continue
        try:
            res = _cells.run_cell(SOAK, impl, n, tmpdir=tmp, rss_every=max(1, n // 10))
        except CellError as exc:
            errors[(SOAK.name, impl.name)] = str(exc)
            _progress(f"soak {impl.name} FAILED {exc}")
            continue
        soak[impl.name] = res
        _progress(f"soak {impl.name}: {res.rate:,.0f}/s, RSS rx {res.rss_rx}, tx {res.rss_tx}")
    return soak, errors


def _environment(argv: list[str]) -> dict[str, str]:
    def out(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "?"

    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = []
    for mod in ("aioancillary", "uvloop", "anyio"):
        try:
            versions.append(f"{mod} {importlib.metadata.version(mod)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{mod} missing")
    repo = _cells.HERE.parent
    commit = out(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"])
    dirty = out(["git", "-C", str(repo), "status", "--porcelain", "--", "src"])
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join([".venv/bin/python", "benchmarks/run.py", *argv]),
        "machine": f"{cpu}, {len(os.sched_getaffinity(0))} CPUs, Linux {platform.release()}",
        "python": f"CPython {platform.python_version()}; " + ", ".join(versions),
        "cc": out(["cc", "--version"]).splitlines()[0] if out(["cc", "--version"]) else "?",
        "commit": commit + (" + uncommitted changes in src/" if dirty and dirty != "?" else ""),
        "load average": _loadavg(),
    }


def _write(
    out: Outputs,
    *,
    rows: list[_report.Row],
    soak: dict[str, CellResult],
    env: dict[str, str],
    settings: dict[str, float],
    notes: list[str],
) -> str:
    verdicts = _report.targets(rows, soak)
    parts = [
        "# Benchmark results (latest run)",
        "",
        *[f"- {k}: {v}" for k, v in env.items()],
        f"- repeats per cell: {settings['repeat']}, interleaved; target {settings['seconds']} s "
        "per cell. msgs/s, x C and the latencies are from each cell's best repeat; x C (median) "
        "is the ratio of the medians; spread = (max - min) / best",
        "- ping-pong: both sides pinned to one CPU"
        if settings.get("pin", True)
        else "- ping-pong: not pinned (--no-pin)",
        "",
        _report.table(rows),
        "",
    ]
    if soak:
        parts += ["## Soak", "", _report.soak_table(soak), ""]
    if verdicts:
        parts += ["## Targets", "", _report.targets_table(verdicts), ""]
    if notes:
        parts += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    text = "\n".join(parts)
    out.report.parent.mkdir(parents=True, exist_ok=True)
    out.report.write_text(text)
    return text


def _loadavg() -> str:
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def _profile(args: argparse.Namespace, tmp: Path) -> None:
    """cProfile both sides of aioancillary cells (default: stream-1fd, framed, both loops)."""
    names = [w.name for w in [*WORKLOADS, SOAK]]
    only = list(args.only)
    if not any(fnmatch.fnmatch(n, p) for p in only for n in names):
        only.append("stream-1fd")
    if all(any(fnmatch.fnmatch(n, p) for n in names) for p in only):
        only.append("aioancillary-*-framed")
    workloads, impls = _select(only)
    for workload in workloads:
        for impl in impls:
            if impl.module != "aioancillary" or not impl.applies(workload):
                continue
            pilot = _cells.run_cell(workload, impl, _pilot_n(workload, False), tmpdir=tmp)
            n = _round(pilot.rate * args.seconds)
            prefix = _cells.BUILD / f"profile-{workload.name}-{impl.name}"
            res = _cells.run_cell(workload, impl, n, tmpdir=tmp, profile=str(prefix))
            report = prefix.with_suffix(".txt")
            with open(report, "w") as f:
                f.write(
                    f"# {workload.name}, {impl.name}: {n:,} messages, {res.rate:,.0f}/s "
                    f"under cProfile ({pilot.rate:,.0f}/s without)\n"
                )
                for side in ("rx", "tx"):
                    path = Path(f"{prefix}-{side}.pstats")
                    if not path.exists():
                        continue
                    f.write(f"\n## {side} ({'receiving' if side == 'rx' else 'sending'} side)\n")
                    stats = pstats.Stats(str(path), stream=f)
                    stats.strip_dirs().sort_stats("cumulative").print_stats(25)
                    stats.sort_stats("tottime").print_stats(20)
                    path.unlink()
            print(f"{workload.name} {impl.name}: {res.rate:,.0f}/s under cProfile -> {report}")


def _replot(out: Outputs) -> int:
    """Rewrite latest.md and the PNG from latest.json (after changing the report code)."""
    raw = json.loads(out.raw.read_text())
    results = {
        tuple(key.split("/")): [CellResult(**r) for r in runs] for key, runs in raw["cells"].items()
    }
    soak = {k: CellResult(**v) for k, v in raw["soak"].items()}
    errors = {tuple(k.split("/")): v for k, v in raw["errors"].items()}
    _finish(
        out,
        raw["environment"],
        raw["settings"],
        results=results,
        soak=soak,
        errors=errors,
        notes=raw["notes"],
        plot=True,
    )
    return 0


def _finish(
    out: Outputs,
    env: dict[str, str],
    settings: dict[str, float],
    *,
    results: dict[tuple[str, str], list[CellResult]],
    soak: dict[str, CellResult],
    errors: dict[tuple[str, str], str],
    notes: list[str],
    plot: bool,
) -> None:
    rows = _report.aggregate(results, errors)
    text = _write(out, rows=rows, soak=soak, env=env, settings=settings, notes=notes)
    raw = {
        "environment": env,
        "settings": settings,
        "cells": {f"{w}/{i}": [asdict(r) for r in rs] for (w, i), rs in results.items()},
        "soak": {k: asdict(v) for k, v in soak.items()},
        "errors": {f"{w}/{i}": e for (w, i), e in errors.items()},
        "notes": notes,
    }
    out.raw.write_text(json.dumps(raw, indent=1))
    print(text)
    written = [out.report, out.raw]
    if plot and rows:
        _report.plot(rows, out.plot, f"{env['date']}, {env['machine']}")
        written.append(out.plot)
    print(f"\nwrote {', '.join(str(p) for p in written)}")


def main(argv: list[str]) -> int:
    args = _parse(argv)
    out = outputs(args.publish)
    if args.replot:
        return _replot(out)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # fds in flight count against it
    _cells.build_c(args.cc)
    env = _environment(argv)
    with tempfile.TemporaryDirectory(prefix="aioancillary-bench-") as tmpdir:
        tmp = Path(tmpdir)
        if args.profile:
            _profile(args, tmp)
            return 0
        workloads, impls = _select(args.only)
        impls, notes = _available(impls)
        results, errors = _run_matrix(args, workloads, impls, tmp)
        soak: dict[str, CellResult] = {}
        if SOAK in workloads:
            soak, soak_errors = _run_soak(args, impls, tmp)
            errors.update(soak_errors)
    env["load average"] += " at start, " + _loadavg() + " at end"
    settings = {"repeat": args.repeat, "seconds": args.seconds, "pin": args.pin}
    _finish(
        out,
        env,
        settings,
        results=results,
        soak=soak,
        errors=errors,
        notes=notes,
        plot=not args.no_plot,
    )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
