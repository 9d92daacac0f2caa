"""The post-hoc EMA sweep of a run: each metric against σ_rel over the evaluated `redi ema` reconstructions
(`redi info RUN` draws RUN/ema_sweep.png from the `redi eval` reports found under the run).

An evaluation report (samples.eval.json) carries its card, and the card the sampled checkpoint's record: a
reconstruction's σ_rel and step (sampler/settings.py: checkpoint_record). Reports are grouped so that a line only
joins numbers made alike: the reconstruction step, sampler, steps, guidance, labels, number of samples and reference
batch; several reports of one σ_rel in a group (seeds) are averaged. A panel says when its numbers cannot be compared
with published ones (Inception weights other than pytorch-fid's, an FD encoder other than DINOv2 ViT-L/14).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redi.common.atomic import try_read_json

SWEEP_PNG = "ema_sweep.png"
LOWER_IS_BETTER = ("fid", "sfid")  # and every fd_* metric (FD-DINOv2, …)
HIGHER_IS_BETTER = ("inception_score", "precision", "recall")
INCEPTION_METRICS = ("fid", "sfid", "inception_score", "precision", "recall")


@dataclass
class SweepLine:
    """One group of like-made evaluations: σ_rel → the mean of each metric."""

    label: str
    points: dict[float, dict[str, list[float]]] = field(default_factory=dict)
    """σ_rel → metric → values (one per report)."""
    caveats: dict[str, str] = field(default_factory=dict)
    """metric → why its numbers are not comparable with published ones."""

    def series(self, metric: str) -> list[tuple[float, float]]:
        """(σ_rel, mean value) of `metric`, by σ_rel."""
        found = [(s, sum(v[metric]) / len(v[metric])) for s, v in self.points.items() if v.get(metric)]
        return sorted(found)


def evaluation_reports(run: Path) -> list[Path]:
    """Every `redi eval` report under the run (samples.eval.json beside each sample set's .npz), sorted."""
    return sorted(Path(run).glob("**/*.eval.json"))


def sweep_lines(run: Path) -> list[SweepLine]:
    """The evaluated reconstructions under `run`, grouped; groups with fewer than two σ_rel are left out."""
    groups: dict[str, SweepLine] = {}
    for path in evaluation_reports(run):
        report = try_read_json(path)
        card = report.get("card") if isinstance(report, dict) else None
        checkpoint = card.get("checkpoint") if isinstance(card, dict) else None
        posthoc = checkpoint.get("posthoc_ema") if isinstance(checkpoint, dict) else None
        metrics = report.get("metrics") if isinstance(report, dict) else None
        if not isinstance(posthoc, dict) or not isinstance(metrics, dict) or not _number(posthoc.get("sigma_rel")):
            continue
        key = json.dumps([posthoc.get("step"), *(card.get(k) for k in (
            "sampler", "steps", "sampler_options", "guidance", "labels", "num_samples", "ref_sha256"))],
            sort_keys=True, default=str)
        line = groups.setdefault(key, SweepLine(_label(posthoc, card)))
        values = line.points.setdefault(float(posthoc["sigma_rel"]), {})
        for name, value in metrics.items():
            if _number(value):
                values.setdefault(name, []).append(float(value))
        line.caveats |= caveats(report)
    return [line for line in groups.values() if len(line.points) >= 2]


def plotted_metrics(lines: list[SweepLine]) -> list[str]:
    """FID first, then every Fréchet distance (FD-DINOv2, …), then the rest that any line holds two values of."""
    held = {m for line in lines for m in {k for v in line.points.values() for k in v} if len(line.series(m)) >= 2}
    order = [m for m in ("fid",) if m in held] + sorted(m for m in held if m.startswith("fd_"))
    return order + [m for m in (*LOWER_IS_BETTER, *HIGHER_IS_BETTER) if m in held and m not in order]


def plot_ema_sweep(run: Path, path: Path, drawn_from: str | None = None) -> Path | None:
    """RUN/ema_sweep.png, one panel per metric against σ_rel, stamped `drawn_from` (common/stamp.py); None when no two
    reconstructions of one group are evaluated."""
    lines = sweep_lines(run)
    metrics = plotted_metrics(lines)
    if not metrics:
        return None
    from redi.common.plots import ema_sweep_figure, save_png

    title = f"{Path(run).resolve().name}: post-hoc EMA sweep (redi ema → sample → eval)"
    notes = [next((line.caveats[m] for line in lines if m in line.caveats), None) for m in metrics]
    return save_png(ema_sweep_figure([(line.label, {m: line.series(m) for m in metrics}) for line in lines], metrics,
                                     [m not in HIGHER_IS_BETTER for m in metrics], notes, title), path, drawn_from)


def caveats(report: dict[str, Any]) -> dict[str, str]:
    """metric → why a report's numbers are not comparable with published ones, from its networks' records."""
    found = {}
    if isinstance(report.get("inception"), dict) and report["inception"].get("official") is False:
        found |= dict.fromkeys(INCEPTION_METRICS, "not comparable: unofficial Inception weights")
    if isinstance(report.get("fd_encoder"), dict) and report["fd_encoder"].get("comparable") is False:
        found["fd_dinov2"] = "not comparable: not DINOv2 ViT-L/14"
    return found


def _label(posthoc: dict[str, Any], card: dict[str, Any]) -> str:
    guidance = card.get("guidance") if isinstance(card.get("guidance"), dict) else {}
    mode = guidance.get("mode", "?")
    scale = {"cfg": "cfg_scale", "rg": "rg_scale", "autoguidance": "ag_scale"}.get(str(mode).split("+")[0])
    shown = f"{mode} {guidance[scale]:g}" if scale and _number(guidance.get(scale)) else str(mode)
    samples = f"{card['num_samples']:,}" if isinstance(card.get("num_samples"), int) else "?"
    return f"step {posthoc.get('step')}, {card.get('sampler')} {card.get('steps')}, {shown}, {samples} samples"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
