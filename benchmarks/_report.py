"""Aggregating repeated cells, the table, the targets, the Markdown report and the plot."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _cells import IMPLS, SOAK, WORKLOADS, CellResult, Impl

_RSS_FLAT_KIB = 1024  # "flat": the end of the soak is within 1 MiB of its 10 % mark


@dataclass
class Row:
    """A cell's repeats, summarised by its best repeat.

    Noise on a shared machine only ever slows a cell down, so the fastest repeat is the
    steadiest estimate of what the code can do (the reasoning of ``timeit``); ratios use the
    best repeat of each side, and the median ratio is shown next to it.
    """

    workload: str
    impl: str
    n: int
    rates: list[float]
    rate: float = 0.0  # best repeat
    ratio: float | None = None  # best / best of C
    median_ratio: float | None = None  # median / median of C
    p50_us: float | None = None  # of the best repeat
    p99_us: float | None = None
    cpu_rx: float = 0.0  # of the best repeat: CPU time / wall time of each side
    cpu_tx: float = 0.0
    leaked_rx: int = 0  # worst repeat
    leaked_tx: int = 0
    error: str = ""


def aggregate(
    results: dict[tuple[str, str], list[CellResult]], errors: dict[tuple[str, str], str]
) -> list[Row]:
    """One row per cell, in the order of WORKLOADS x IMPLS; C is the ratio reference."""
    rows = []
    for workload in [*WORKLOADS, SOAK]:
        runs_c = results.get((workload.name, "c"), [])
        best_c = max((r.rate for r in runs_c), default=None)
        median_c = statistics.median(r.rate for r in runs_c) if runs_c else None
        for impl in IMPLS:
            key = (workload.name, impl.name)
            runs = results.get(key, [])
            if not runs:
                if key in errors:
                    rows.append(Row(workload.name, impl.name, 0, [], error=errors[key]))
                continue
            best = max(runs, key=lambda r: r.rate)
            median = statistics.median(r.rate for r in runs)
            rows.append(
                Row(
                    workload=workload.name,
                    impl=impl.name,
                    n=best.n,
                    rates=[r.rate for r in runs],
                    rate=best.rate,
                    ratio=best.rate / best_c if best_c else None,
                    median_ratio=median / median_c if median_c else None,
                    p50_us=best.p50_us,
                    p99_us=best.p99_us,
                    cpu_rx=best.cpu_rx,
                    cpu_tx=best.cpu_tx,
                    leaked_rx=max(r.leaked_rx for r in runs),
                    leaked_tx=max(r.leaked_tx for r in runs),
                    error=errors.get(key, ""),
                )
            )
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: Sequence[Row]) -> str:
    """The results as a Markdown table (also readable as plain text)."""
    head = (
        "| workload | implementation | msgs/s | x C | x C (median) | p50 µs | p99 µs | spread | "
        "CPU % rx/tx | fds leaked rx/tx | N |"
    )
    lines = [head, "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for row in rows:
        if row.error and not row.rates:
            lines.append(f"| {row.workload} | {row.impl} | failed: {row.error} |||||||||")
            continue
        spread = (max(row.rates) - min(row.rates)) / row.rate if len(row.rates) > 1 else None
        lines.append(
            f"| {row.workload} | {row.impl} | {row.rate:,.0f} | {_fmt(row.ratio, '.2f')} | "
            f"{_fmt(row.median_ratio, '.2f')} | "
            f"{_fmt(row.p50_us, '.1f')} | {_fmt(row.p99_us, '.1f')} | "
            f"{_fmt(spread and spread * 100, '.0f')}{'%' if spread else ''} | "
            f"{row.cpu_rx * 100:.0f}/{row.cpu_tx * 100:.0f} | "
            f"{row.leaked_rx}/{row.leaked_tx} | {row.n:,} |"
        )
    return "\n".join(lines)


def _find(rows: Sequence[Row], workload: str, impl: str) -> Row | None:
    return next((r for r in rows if r.workload == workload and r.impl == impl), None)


def targets(rows: Sequence[Row], soak: dict[str, CellResult]) -> list[tuple[str, str, str]]:
    """``(target, measured, verdict)`` for each target of the issue that this run covers.

    Throughput targets compare median ratios (the median of the interleaved repeats).
    """
    out = []

    def med(workload: str, impl: str) -> float | None:
        row = _find(rows, workload, impl)
        return None if row is None else row.median_ratio

    for suffix, path in (("", ""), ("-py", " (pure Python)")):
        for loop in ("uvloop", "asyncio"):
            for workload, variant in (("seqpacket-1fd", "framed"), ("stream-1fd", "raw")):
                ours = med(workload, f"aioancillary-{loop}-{variant}{suffix}")
                for other in (f"naive-{loop}", "stdlib"):
                    theirs = med(workload, other)
                    if ours is None or theirs is None:
                        continue
                    out.append(
                        (
                            f"{workload}, {variant}, {loop}{path}: ≥ {other}",
                            f"{ours:.2f}x C vs {theirs:.2f}x C",
                            "met" if ours >= theirs else "not met",
                        )
                    )
            for workload, variant, need in (
                ("stream-4fd", "framed", 0.9),
                ("stream-1fd", "framed", 1.0),
                ("stream-1fd", "batch", 1.5),
            ):
                ours = med(workload, f"aioancillary-{loop}-{variant}{suffix}")
                if ours is None:
                    continue
                api = "recv_batch()" if variant == "batch" else "async for"
                out.append(
                    (
                        f"{workload}, framed, {api}, {loop}{path}: ≥ {need:.1f}x C",
                        f"{ours:.2f}x C",
                        "met" if ours >= need else "not met",
                    )
                )
            for workload in ("pingpong", "pingpong-unpinned"):
                ping = _find(rows, workload, f"aioancillary-{loop}-framed{suffix}")
                ref = _find(rows, workload, f"naive-{loop}")
                if ping and ref and ping.p50_us and ref.p50_us:
                    factor = ping.p50_us / ref.p50_us
                    out.append(
                        (
                            f"{workload} p50, framed, {loop}{path}: ≤ 1.1x naive-{loop}",
                            f"{ping.p50_us:.1f} µs vs {ref.p50_us:.1f} µs = {factor:.2f}x",
                            "met" if factor <= 1.1 else "not met",
                        )
                    )
    for name, res in soak.items():
        growth_rx = res.rss_rx[-1] - res.rss_rx[1] if len(res.rss_rx) > 2 else None
        growth_tx = res.rss_tx[-1] - res.rss_tx[1] if len(res.rss_tx) > 2 else None
        flat = all(g is not None and g <= _RSS_FLAT_KIB for g in (growth_rx, growth_tx))
        leaks = res.leaked_rx + res.leaked_tx
        out.append(
            (
                f"{res.n:,} messages, {name}: flat RSS (≤ 1 MiB growth after 10 %), 0 fds leaked",
                f"RSS growth rx {growth_rx} KiB, tx {growth_tx} KiB; leaked {res.leaked_rx}/"
                f"{res.leaked_tx}",
                "met" if flat and leaks == 0 and res.n >= 1_000_000 else "not met",
            )
        )
    return out


def targets_table(verdicts: Sequence[tuple[str, str, str]]) -> str:
    lines = ["| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {t} | {m} | **{v}** |" for t, m, v in verdicts]
    return "\n".join(lines)


def soak_table(soak: dict[str, CellResult]) -> str:
    lines = [
        "| implementation | messages | msgs/s | RSS rx KiB (start → 10 % → end) | "
        "RSS tx KiB (start → 10 % → end) | fds leaked rx/tx |",
        "|---|--:|--:|---|---|--:|",
    ]
    for name, res in soak.items():

        def trail(samples: list[int]) -> str:
            return " → ".join(str(s) for s in (samples[0], samples[1], samples[-1]))

        lines.append(
            f"| {name} | {res.n:,} | {res.rate:,.0f} | {trail(res.rss_rx)} | "
            f"{trail(res.rss_tx)} | {res.leaked_rx}/{res.leaked_tx} |"
        )
    return "\n".join(lines)


# Colours by loop and mode: one hue per event loop (grey for blocking and C), one shade per
# mode (framed darkest, raw lighter, batch lightest), so that a panel reads at a glance.
_LOOP_SHADES = {
    "asyncio": {"framed": "#1f4e8c", "raw": "#4f86c6", "batch": "#9cc0e8"},
    "uvloop": {"framed": "#2d7a3a", "raw": "#5fb06b", "batch": "#a7d8ae"},
}
# Other implementations on a loop: anyio in ambers, the hand-written loop in reds.
_OTHER_SHADES = {
    ("anyio", "asyncio"): "#f0b04a",
    ("anyio", "uvloop"): "#b8741a",
    ("naive", "asyncio"): "#d9645f",
    ("naive", "uvloop"): "#9c2f2b",
}
_PLAIN = {"c": "#333333", "stdlib": "#9a9a9a"}


def colour(impl: Impl) -> str:
    """The colour of an implementation: its loop's hue, its mode's shade."""
    if impl.module in _PLAIN:
        return _PLAIN[impl.module]
    if impl.module == "aioancillary":
        return _LOOP_SHADES.get(impl.loop, _LOOP_SHADES["asyncio"])[impl.variant or "framed"]
    return _OTHER_SHADES.get((impl.module, impl.loop), "#7f7f7f")


#: Targets relative to C, drawn on every throughput panel (one x-scale for all of them).
_TARGETS = (
    (0.9, "framed target (stream-4fd)"),
    (1.0, "C; framed target (stream-1fd)"),
    (1.5, "batch target (stream-1fd)"),
)


def _throughput_panel(ax: Any, rows: Sequence[Row], workload: str, title: str, xmax: float) -> None:
    impls = {impl.name: impl for impl in IMPLS}
    mine = [r for r in rows if r.workload == workload and r.ratio is not None][::-1]
    values = [r.ratio or 0.0 for r in mine]
    ys = list(range(len(mine)))
    bars = ax.barh(ys, values, color=[colour(impls[r.impl]) for r in mine])
    # The spread: every repeat's rate against the best C rate, min to max, drawn over the bar.
    for y, row in zip(ys, mine, strict=True):
        scale = (row.ratio or 0.0) / row.rate if row.rate else 0.0
        low, high = min(row.rates) * scale, max(row.rates) * scale
        ax.plot([low, high], [y, y], color="black", linewidth=1.2, solid_capstyle="butt")
        ax.plot([low, low], [y - 0.18, y + 0.18], color="black", linewidth=1.0)
    labels = [f"{r.ratio:.2f}x  {r.rate / 1000:.0f}k/s" for r in mine]
    ax.bar_label(bars, labels=labels, fontsize=8, padding=2)
    for x, text in _TARGETS:
        ax.axvline(x, color="black" if x == 1.0 else "#7a3e9d", linewidth=0.8, linestyle="--")
        ax.text(x, len(mine) - 0.4, f" {text}", fontsize=7, rotation=90, va="top", ha="left")
    ax.set_yticks(ys, [r.impl for r in mine], fontsize=8)
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("throughput relative to C (best repeat; whisker: all repeats)", fontsize=9)
    ax.set_xlim(0, xmax)


def _latency_panel(ax: Any, rows: Sequence[Row]) -> None:
    impls = {impl.name: impl for impl in IMPLS}
    ping = [r for r in rows if r.workload == "pingpong" and r.p50_us is not None][::-1]
    ys = list(range(len(ping)))
    p99 = [r.p99_us or 0.0 for r in ping]
    p50 = [r.p50_us or 0.0 for r in ping]
    bars99 = ax.barh([y + 0.2 for y in ys], p99, height=0.4, color="#c9d6e8")
    ax.bar_label(bars99, labels=[f"p99 {v:.0f}" for v in p99], fontsize=7, padding=2)
    colors = [colour(impls[r.impl]) for r in ping]
    bars = ax.barh([y - 0.2 for y in ys], p50, height=0.4, color=colors)
    ax.bar_label(bars, labels=[f"p50 {v:.0f}" for v in p50], fontsize=8, padding=2)
    # The target: within 1.1x of the careful naive loop on the same event loop.
    for loop, tint in (("asyncio", "#c0504d"), ("uvloop", "#7f1f1b")):
        naive = next((r.p50_us for r in ping if r.impl == f"naive-{loop}"), None)
        if naive:
            ax.axvline(1.1 * naive, color=tint, linewidth=0.8, linestyle=":")
            ax.text(
                1.1 * naive,
                len(ping) - 0.5 - (loop == "uvloop"),
                f" target ({loop}): 1.1x naive p50",
                fontsize=7,
                color=tint,
                va="bottom",
            )
    ax.set_xscale("log")
    ax.set_xlim(min([*p50, 10.0]) / 2, max([*p99, 100.0]) * 4)
    ax.set_yticks(ys, [r.impl for r in ping], fontsize=8)
    ax.set_xlabel("round-trip latency, µs, log scale (p50 dark, p99 light)", fontsize=9)
    ax.set_title("ping-pong, 1 fd each way (lower is better)", fontsize=11)


def plot(rows: Sequence[Row], path: Path, subtitle: str) -> None:
    """Bar charts: throughput relative to C per workload, and ping-pong latency."""
    import matplotlib  # noqa: PLC0415 - bench-only, imported after all the forking

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.patches import Patch  # noqa: PLC0415

    panels = [w for w in WORKLOADS if w.kind != "pingpong"]
    fig, axes = plt.subplots(2, 3, figsize=(16, 10.5), layout="constrained")
    names = {w.name for w in panels}
    ratios = [r.ratio for r in rows if r.workload in names and r.ratio is not None]
    xmax = max([*ratios, *(x for x, _ in _TARGETS)]) * 1.35  # one scale for every panel
    for ax, workload in zip(axes.flat, panels, strict=False):
        _throughput_panel(ax, rows, workload.name, workload.title, xmax)
    _latency_panel(axes.flat[len(panels)], rows)
    shown = {r.impl for r in rows}
    handles = [Patch(color=colour(i), label=i.name) for i in IMPLS if i.name in shown]
    fig.legend(handles=handles, loc="outside lower center", ncols=6, fontsize=8)
    fig.suptitle(f"aioancillary benchmarks: {subtitle}", fontsize=12)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
