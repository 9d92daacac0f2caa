"""The papers' claims in miniature: baseline, REPA, ReDi and ReDi with Representation Guidance trained at equal steps on
the demo data (`make demo`'s data root) with the demo's recipe, each over several seeds, scored by FD-PC and FD-latent
(`sampler/learning.py`, docs/METHOD.md) of their EMA weights; the untrained network beside them.

FD-PC needs generated PCs, so it exists for ReDi only; FD-latent scores every method's latents in the VAE's space.
With the VAE `make demo` fits (`redi demo-vae`) those latents encode the images' shapes and colours; with a
tiny-random VAE they are mostly its posterior noise. The table shows what comes out, whichever way
(docs/BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from redi.common.errors import UserError
from redi.sampler.guidance import GuidanceConfig
from redi.sampler.learning import LearningScore, TrainingSet, score_checkpoint
from redi.trainer.checkpoint import Checkpoint, newest_checkpoint
from redi.trainer.config import TrainConfig, resolve_shards_dir
from redi.trainer.train import train

DEMO_DATA = "data/demo"  # where `make demo` writes its data root


@dataclass(frozen=True)
class Recipe:
    """The demo's training and sampling settings (the Makefile's `demo` target passes the same flags; it adds
    classifier-free guidance on all channels to its pictures, which the comparison of methods leaves out)."""

    model: str = "SiT-debug"
    pca_rank: int = 8
    batch_size: int = 16
    steps: int = 4500
    lr: float = 3e-3
    ema_decay: float = 0.995
    projector_dim: int = 256  # REPA's 2048-wide projector would cost 25 times the debug network
    sampler: str = "ode"
    sample_steps: int = 50
    rg_scale: float = 1.5
    num: int = 64  # generated samples scored per run (the demo's 64)


# (row, method trained, guidance sampled): ReDi with RG is the ReDi run sampled with RG, as the paper.
ROWS = (("baseline", "baseline", "none"), ("REPA", "repa", "none"), ("ReDi", "redi", "none"), ("ReDi + RG", "redi", "rg"))


def train_run(shards: str, run: Path, method: str, seed: int, recipe: Recipe) -> Checkpoint:
    """Train one run of the recipe (or find it finished) and load its last checkpoint."""
    cfg = TrainConfig(shards=shards, run=str(run), model=recipe.model, method=method, pca_rank=recipe.pca_rank,
                      batch_size=recipe.batch_size, max_steps=recipe.steps, lr=recipe.lr, ema_decay=recipe.ema_decay,
                      projector_dim=recipe.projector_dim, seed=seed, num_workers=0, log_every=max(1, recipe.steps // 10),
                      save_every=recipe.steps, tracker="none", sample_every=0)
    if (stopped := train(cfg, device="cpu").stopped_by):  # Ctrl-C or SIGTERM: the run checkpointed, the bench ends
        sys.exit(128 + stopped)
    return Checkpoint.load(newest_checkpoint(run))


def score(ckpt: Checkpoint, weights: str, guidance: str, training: TrainingSet, recipe: Recipe, seed: int) -> LearningScore:
    mode = GuidanceConfig(mode="rg", rg_scale=recipe.rg_scale) if guidance == "rg" else GuidanceConfig()
    return score_checkpoint(ckpt, weights, training, recipe.num, recipe.sampler, recipe.sample_steps, mode, seed)


def spread(values: list[float]) -> str:
    """'mean ± sample standard deviation (each value)'."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} ± {sd:.2f} ({', '.join(f'{v:.2f}' for v in values)})"


def run(quick: bool = False, shards: str | None = None, seeds: int | None = None, steps: int | None = None
        ) -> dict[str, str | float]:
    """Train every row's method for each seed on the demo data root and report FD-PC and FD-latent, mean ± std."""
    data = str(resolve_shards_dir(shards or DEMO_DATA)) if (shards or Path(DEMO_DATA).exists()) else None
    if data is None:
        raise UserError(f"No demo data at {DEMO_DATA}: run `make demo` first, or pass --shards DATA.")
    recipe = Recipe(steps=steps or (30 if quick else Recipe.steps), num=16 if quick else Recipe.num)
    seeds = seeds or (1 if quick else 3)
    training = TrainingSet.read(data)
    scores: dict[str, list[LearningScore]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="redi-bench-learn-") as tmp:
        for seed in range(seeds):
            runs = {m: train_run(data, Path(tmp) / f"{m}-{seed}", m, seed, recipe) for m in ("baseline", "repa", "redi")}
            scores.setdefault("untrained", []).append(score(runs["redi"], "init", "none", training, recipe, seed))
            for row, method, guidance in ROWS:
                scores.setdefault(row, []).append(score(runs[method], "ema", guidance, training, recipe, seed))
    figures: dict[str, str | float] = {
        "data": data, "recipe": f"{recipe.model}, batch {recipe.batch_size}, {recipe.steps} steps, lr {recipe.lr:g}, "
                                f"EMA {recipe.ema_decay}, {recipe.sampler} {recipe.sample_steps} steps, "
                                f"{recipe.num} samples per run, seeds 0…{seeds - 1}",
    }
    for row, rows in scores.items():
        figures[f"{row} FD-latent"] = spread([s.fd_latent for s in rows])  # mean ± sd (seed 0, 1, …)
        if rows[0].fd_pc is not None:
            figures[f"{row} FD-PC"] = spread([s.fd_pc for s in rows])
            figures[f"{row} nearest training PCs"] = spread([s.nearest.generated for s in rows])
    figures["seconds"] = time.perf_counter() - started
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(run(args.quick, args.shards, args.seeds, args.steps), indent=1))
