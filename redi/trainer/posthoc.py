"""`redi ema RUN --sigma-rel X[,Y…] [--step S]`: the EMA of any length, reconstructed after training from the
power-function EMA snapshots a `--phema` run saved (edm2's reconstruct_phema.py; the math is trainer/phema.py).

Each output is a checkpoint (trainer/checkpoint.py) whose `ema` weights are Σ_i x_i·(snapshot profile i) over the
snapshots up to step S, so `redi sample --ckpt`, `redi eval` and `redi train --init` take it like any other.
The snapshots are read one at a time; the sums are float64 (8 bytes per parameter per σ_rel asked for at once).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch

from redi.common.display import counting
from redi.common.errors import UserError
from redi.common.schema import Range, check_ranges
from redi.trainer.checkpoint import Checkpoint, PhemaSnapshot, RunConfig, list_phema_snapshots, posthoc_path
from redi.trainer.models import build_model
from redi.trainer.phema import check_sigma_rels, combine, posthoc_coefficients, profile_inner_product


@dataclass(frozen=True)
class EmaConfig:
    """Every setting of one `redi ema` run: its flags and their help are these fields."""

    run: Path
    """Run directory trained with --phema (it holds RUN/phema/step-N.pt)."""
    sigma_rel: tuple[float, ...]
    """Comma list of EMA lengths σ_rel to reconstruct, e.g. 0.05,0.075,0.1,0.125,0.15.

    σ_rel is the EMA profile's standard deviation relative to the training time (edm2); each gives one checkpoint."""
    step: Annotated[int | None, Range(1)] = None
    """Reconstruct the EMA at this snapshot's step; default: the newest snapshot."""
    out: Path | None = None
    """Folder of the reconstructed checkpoints; default RUN/ema (files step-N-sigmaX.pt)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "sigma_rel", check_sigma_rels(self.sigma_rel, "--sigma-rel"))
        check_ranges(self)


@dataclass(frozen=True)
class Reconstruction:
    """One reconstructed EMA."""

    sigma_rel: float
    path: Path
    fit_error: float
    """‖Σ x_i·p_i − p‖ / ‖p‖ of the profiles themselves (continuous power functions): how well the snapshots span it."""


@dataclass(frozen=True)
class EmaResult:
    """What `redi ema` wrote."""

    run: Path
    step: int
    snapshots: list[int]
    """The snapshot steps combined."""
    outputs: list[Reconstruction]
    seconds: float


def profile_fit_error(in_t: np.ndarray, in_sigma: np.ndarray, t: float, sigma_rel: float, x: np.ndarray) -> float:
    """Relative L2 distance between the profile (t, σ_rel) and Σ x_i·p_i, from the same inner products the solve uses."""
    gram = profile_inner_product(in_t[:, None], in_sigma[:, None], in_t[None, :], in_sigma[None, :])  # (n, n)
    cross = profile_inner_product(in_t, in_sigma, t, sigma_rel)  # (n,)
    norm2 = float(profile_inner_product(t, sigma_rel, t, sigma_rel))
    return float(np.sqrt(max(x @ gram @ x - 2 * x @ cross + norm2, 0.0) / norm2))


def reconstruct(cfg: EmaConfig) -> EmaResult:
    """Write one checkpoint per σ_rel: the EMA at the chosen snapshot step, from every snapshot up to it."""
    started = time.perf_counter()
    run = Path(cfg.run)
    config = RunConfig.load(run)
    found = list_phema_snapshots(run)
    if not found:
        raise UserError(f"{run} holds no post-hoc EMA snapshots ({run / 'phema'}): train it with --phema.")
    step = cfg.step if cfg.step is not None else found[-1][0]
    if step not in {s for s, _ in found}:
        raise UserError(f"{run} has no post-hoc EMA snapshot at step {step}: pick one of "
                        f"{', '.join(str(s) for s, _ in found)}.")
    used = [(s, p) for s, p in found if s <= step]
    tracked = tuple(float(s) for s in config.train.get("phema_sigma_rels") or ())
    images = [config.samples_before(s) for s, _ in used]  # the profiles' time: images seen, as edm2's cur_nimg
    in_t = np.repeat(np.float64(images), len(tracked))  # (n·k,): each snapshot's profiles in order
    in_sigma = np.tile(np.float64(tracked), len(used))  # (n·k,)
    if len(in_t) == 0:
        raise UserError(f"{run}/config.json records no --phema-sigma-rels: was it trained with --phema?")
    x = posthoc_coefficients(in_t, in_sigma, float(images[-1]), cfg.sigma_rel)  # (n·k, m)
    network = build_model_on_meta(config)
    averaged, names = {n for n, _ in network.named_parameters()}, set(network.state_dict())  # buffers are copied
    sums: list[dict[str, torch.Tensor]] = [{} for _ in cfg.sigma_rel]
    with counting("reading snapshots", len(used), unit="files/s") as advance:
        for i, (s, path) in enumerate(used):
            snapshot = PhemaSnapshot.load(path)
            if (snapshot.step, snapshot.images) != (s, images[i]) or snapshot.sigma_rels != tracked or any(
                    set(p) != names for p in snapshot.profiles):
                raise UserError(f"{path} holds profiles of step {snapshot.step} ({snapshot.images:,} images) and σ_rel "
                                f"{','.join(f'{v:g}' for v in snapshot.sigma_rels)} (or of another network), not what "
                                "its name and the run's config.json say: move it out of RUN/phema.")
            rows = slice(i * len(tracked), (i + 1) * len(tracked))
            for j in range(len(cfg.sigma_rel)):
                combine(snapshot.profiles, x[rows, j].tolist(), averaged, into=sums[j])
            advance(1)
    reference = snapshot.profiles[-1]  # the dtypes the run trained in
    outputs = []
    for j, sigma_rel in enumerate(cfg.sigma_rel):
        weights = {k: v.to(reference[k].dtype) for k, v in sums[j].items()}
        path = posthoc_path(run, step, sigma_rel) if cfg.out is None else Path(cfg.out) / posthoc_path(run, step, sigma_rel).name
        error = profile_fit_error(in_t, in_sigma, float(images[-1]), sigma_rel, x[:, j])
        record = {"sigma_rel": sigma_rel, "step": step, "images": images[-1], "snapshots": [s for s, _ in used],
                  "tracked": list(tracked),
                  "coefficients": x[:, j].tolist(), "profile_fit_error": error}
        Checkpoint(step=step, train=config.train, model_config=config.model_config, shards=config.shards, model=None,
                   ema=weights, opt=None, posthoc_ema=record).save(path)
        outputs.append(Reconstruction(sigma_rel, path, error))
    return EmaResult(run, step, [s for s, _ in used], outputs, time.perf_counter() - started)


def build_model_on_meta(config: RunConfig) -> torch.nn.Module:
    """The run's network on the meta device (names only, nothing allocated)."""
    with torch.device("meta"):
        return build_model(config.model_config)
