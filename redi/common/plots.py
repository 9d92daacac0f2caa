"""The figures redi draws for a person (PCA explained variance, channel histograms, training curves).

matplotlib's object API without pyplot: no GUI backend, no global figure registry, safe in any thread. PNGs are
written atomically and without the matplotlib version in their metadata, so the same data gives the same bytes.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import ticker
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from redi.common.atomic import atomic_write_with
from redi.common.stamp import PNG_KEY

DPI = 100
HIST_BINS = 60
HIST_COLUMNS = 4  # histogram panels per row
BLUE, ORANGE = "#4678be", "#c8501e"


def save_png(fig: Figure, path: Path, drawn_from: str | None = None) -> Path:
    """Write `fig` to `path` as a PNG, atomically; the same figure gives the same bytes (no version metadata), with
    `drawn_from` (common/stamp.py: the digest of its inputs) as its stamp."""
    metadata = {"Software": None} | ({PNG_KEY: drawn_from} if drawn_from else {})
    atomic_write_with(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, metadata=metadata))
    return Path(path)


def explained_variance_figure(ratio: np.ndarray, dim: int, k: int) -> Figure:
    """Bars of the explained-variance ratio of the first k components, their cumulative ratio as a line (right axis)."""
    shown = np.asarray(ratio[:k], dtype=np.float64)  # (k,)
    index = np.arange(1, len(shown) + 1)
    fig = Figure(figsize=(7.6, 4.4), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(index, shown, color=BLUE, width=0.7)
    ax.set_xlabel("component")
    ax.set_ylabel("explained-variance ratio (bars)", color=BLUE)
    ax.yaxis.set_major_formatter(lambda v, _: f"{v:.1%}")
    ax.set_xlim(0.4, len(shown) + 0.6)
    ax.grid(axis="y", color="0.9")
    cum = ax.twinx()
    cum.plot(index, np.cumsum(shown), color=ORANGE, marker="o", markersize=3)
    cum.set_ylim(0, 1)
    cum.set_ylabel("cumulative (line)", color=ORANGE)
    cum.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    ax.set_title(f"PCA of {dim}-d patch tokens: first {len(shown)} components hold {shown.sum():.1%} of the variance")
    return fig


def histograms_figure(groups: Sequence[tuple[str, np.ndarray, Sequence[str]]], title: str) -> Figure:
    """One histogram per channel: `groups` = (group name, values (N, C), channel names); a row of panels per group.

    Each panel gives the channel's mean and std, and its x range is the 0.1–99.9 percentile range (the tails are
    counted in the outermost bins), so one outlier does not flatten the rest.
    """
    rows = sum(math.ceil(values.shape[1] / HIST_COLUMNS) for _, values, _ in groups)
    fig = Figure(figsize=(3.2 * HIST_COLUMNS, 2.3 * rows + 0.6), layout="constrained")
    fig.suptitle(title)
    grid = fig.add_gridspec(rows, HIST_COLUMNS)
    row = 0
    for group, values, names in groups:
        for c in range(values.shape[1]):
            ax = fig.add_subplot(grid[row + c // HIST_COLUMNS, c % HIST_COLUMNS])
            _histogram(ax, values[:, c], f"{group} {names[c]}")
        row += math.ceil(values.shape[1] / HIST_COLUMNS)
    return fig


def _histogram(ax: Axes, values: np.ndarray, title: str) -> None:
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    lo, hi = np.percentile(v, (0.1, 99.9)) if len(v) else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    ax.hist(np.clip(v, lo, hi), bins=HIST_BINS, range=(lo, hi), color=BLUE)
    ax.set_title(f"{title}\nmean {v.mean():.3g}, std {v.std():.3g}" if len(v) else f"{title}\n(no values)", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.set_yticks([])


def curves_figure(rows: list[dict[str, Any]], batch_sizes: Sequence[tuple[int, int]] | None, loss_terms: Sequence[str],
                  title: str) -> Figure:
    """Training curves from metrics.jsonl rows: loss terms, grad norm, images/s, and FID against step and images seen.

    Losses and the grad norm are drawn on a log scale (they fall over decades), the losses on a symmetric log scale
    (linear through 0) when a term is signed, as REPA's alignment loss (a negative cosine similarity); every term
    metrics.jsonl holds is drawn. The top axis of each panel counts the images seen, the unit papers plot against:
    `batch_sizes` holds the (first step, global batch) of each stretch of the run (a resume may change the batch),
    and each step counts at its stretch's batch; None (not known) leaves the axis out.
    """
    fig = Figure(figsize=(12, 7.5), layout="constrained")
    fig.suptitle(title)
    (losses, grad), (speed, fid) = fig.subplots(2, 2, sharex=True)
    logged = [r for r in rows if "loss" in r]
    values = []
    for name in loss_terms:
        points = [(r["step"], r[name]) for r in logged if _finite(r.get(name))]
        if points:
            losses.plot(*zip(*points, strict=True), label=name, linewidth=1.2)
            values += [v for _, v in points]
    signed = any(v <= 0 for v in values)
    _finish(losses, "loss terms (symmetric log axis: some are signed)" if signed else "loss terms", log=not signed,
            legend=True)
    if signed:
        _symlog(losses, values)
    _line(grad, [(r["step"], r["grad_norm"]) for r in logged if _positive(r.get("grad_norm"))], "grad norm", BLUE)
    _finish(grad, "gradient norm (before clipping)", log=True)
    _line(speed, [(r["step"], r["images_per_s"]) for r in logged if _positive(r.get("images_per_s"))], "images/s", BLUE)
    _finish(speed, "images/s (sample grids and evaluations left out)")
    evals = [r for r in rows if "fid" in r]
    for name, colour in (("fid", BLUE), ("fd_dinov2", ORANGE)):
        _line(fid, [(r["step"], r[name]) for r in evals if _positive(r.get(name))], name.replace("_", "-").upper(), colour)
    if evals:
        card = next((r["card"] for r in reversed(evals) if isinstance(r.get("card"), dict)), {})
        _finish(fid, f"FID during training ({_eval_label(card)})", legend=True)
    else:
        _finish(fid, "FID during training")
        fid.text(0.5, 0.5, "no evaluation yet (redi train --eval-every N)", ha="center", va="center",
                 transform=fid.transAxes, color="0.4")
    for ax in (losses, grad):
        ax.set_xlabel("")  # the shared step axis is labelled below
    for ax in (losses, grad, speed, fid) if batch_sizes else ():
        top = ax.secondary_xaxis("top", functions=images_seen(batch_sizes))
        top.xaxis.set_major_formatter(ticker.EngFormatter())  # 160, 1.2 k, 3.4 M
        top.set_xlabel("images seen", fontsize=8)
        top.tick_params(labelsize=7)
    return fig


def images_seen(batch_sizes: Sequence[tuple[int, int]]) -> tuple[Callable[[Any], np.ndarray], Callable[[Any], np.ndarray]]:
    """(step → images seen, images seen → step) for stretches (first step, batch) in step order: piecewise linear,
    each stretch at its own batch, the first and last stretches extended beyond the run's ends (the axes' margins)."""
    firsts = np.array([first for first, _ in batch_sizes], dtype=np.float64)  # (S,)
    sizes = np.array([batch for _, batch in batch_sizes], dtype=np.float64)  # (S,)
    starts = np.concatenate([[0.0], np.cumsum(np.diff(firsts) * sizes[:-1])])  # (S,) images before each first step

    def images(step: Any) -> np.ndarray:
        step = np.asarray(step, dtype=np.float64)
        i = np.clip(np.searchsorted(firsts, step, side="right") - 1, 0, None)  # the stretch of each step
        return starts[i] + (step - firsts[i]) * sizes[i]

    def steps(seen: Any) -> np.ndarray:
        seen = np.asarray(seen, dtype=np.float64)
        i = np.clip(np.searchsorted(starts, seen, side="right") - 1, 0, None)
        return firsts[i] + (seen - starts[i]) / sizes[i]

    return images, steps


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _positive(value: Any) -> bool:
    return _finite(value) and value > 0


def _symlog(ax: Axes, values: list[float]) -> None:
    """A symmetric log y axis for signed values: logarithmic beyond ±t, linear within, t the power of ten at or
    below the smallest non-zero magnitude (at least a thousandth of the largest), with a line at 0."""
    magnitudes = [abs(v) for v in values if v != 0] or [1.0]
    threshold = 10.0 ** math.floor(math.log10(max(min(magnitudes), max(magnitudes) / 1000)))
    ax.set_yscale("symlog", linthresh=threshold, linscale=0.5)
    ax.axhline(0.0, color="0.6", linewidth=0.8)
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))


def _line(ax: Axes, points: list[tuple[float, float]], label: str, colour: str) -> None:
    if points:
        ax.plot(*zip(*points, strict=True), label=label, color=colour, linewidth=1.2, marker="." if len(points) < 30 else None)


def _finish(ax: Axes, title: str, log: bool = False, legend: bool = False) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(color="0.9")
    if not log or not ax.has_data():
        ax.ticklabel_format(axis="y", useOffset=False)  # 68.35, not +6.834e1 and a tick of 0.0092
    else:
        ax.set_yscale("log")
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis(ticker.FuncFormatter(lambda v, _: f"{v:g}"))  # 0.6, 2, 40 rather than 6×10⁻¹
    if legend and ax.has_data():
        ax.legend(fontsize=8)


def _eval_label(card: dict[str, Any]) -> str:
    """'10,000 samples, ode 50 steps, guidance rg' from an evaluation's card (its recorded settings)."""
    parts = [f"{card['num_samples']:,} samples" if isinstance(card.get("num_samples"), int) else None,
             f"{card.get('sampler')} {card.get('steps')} steps" if card.get("sampler") else None,
             f"guidance {card['guidance'].get('mode')}" if isinstance(card.get("guidance"), dict) else None]
    return ", ".join(p for p in parts if p) or "settings in metrics.jsonl"


METRIC_NAMES = {"fid": "FID", "sfid": "sFID", "fd_dinov2": "FD-DINOv2", "inception_score": "Inception Score",
                "precision": "precision", "recall": "recall"}


def ema_sweep_figure(lines: Sequence[tuple[str, dict[str, list[tuple[float, float]]]]], metrics: Sequence[str],
                     lower_better: Sequence[bool], notes: Sequence[str | None], title: str) -> Figure:
    """One panel per metric against the post-hoc EMA length σ_rel; a line per group of like-made evaluations
    (`lines`: label, metric → [(σ_rel, value)]), its best σ_rel ringed and named in the legend; `notes` (one per
    metric, or None) go under a panel's title."""
    fig = Figure(figsize=(5.2 * len(metrics), 4.2), layout="constrained")
    fig.suptitle(title)
    panels = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric, lower, note in zip(panels, metrics, lower_better, notes, strict=True):
        name = METRIC_NAMES.get(metric, metric.replace("_", "-").upper())  # fd_dinov2 → FD-DINOV2
        for label, series in lines:
            points = series.get(metric) or []
            if len(points) < 2:
                continue
            sigma, value = zip(*points, strict=True)
            best = (min if lower else max)(points, key=lambda p: p[1])
            drawn = ax.plot(sigma, value, marker="o", markersize=4, linewidth=1.2,
                            label=f"{label}: best σ_rel {best[0]:g}")
            ax.plot(*best, marker="o", markersize=11, fillstyle="none", color=drawn[0].get_color())
        ax.set_xlabel("EMA length σ_rel (relative standard deviation)", fontsize=8)
        ax.set_title(f"{name} ({'lower' if lower else 'higher'} is better)" + (f"\n{note}" if note else ""), fontsize=10)
        ax.tick_params(labelsize=7)
        ax.grid(color="0.9")
        ax.ticklabel_format(axis="y", useOffset=False)
        if ax.has_data():
            ax.legend(fontsize=7)
    return fig
