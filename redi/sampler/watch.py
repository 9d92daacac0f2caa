"""What a person sees of a run while it trains, besides its metrics: the sample grids and the in-training FID.

`redi train` passes `RunWatch` to `train(watch=...)`: the loop calls `after_step(state)` after every step, which draws
the grid and the evaluation due at that step and returns the seconds they took (the loop leaves them out of
images/s). A run resumed at a step whose grid or evaluation is missing (killed or stopped before it) draws it first.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from redi.common.distributed import DistInfo
from redi.common.errors import UserError
from redi.sampler.grids import RunSampler, grid_path, write_grid
from redi.sampler.periodic_eval import PeriodicEval
from redi.trainer.checkpoint import Checkpoint
from redi.trainer.metrics import read_metrics
from redi.trainer.plan import TrainPlan
from redi.trainer.watch import RunLog

if TYPE_CHECKING:
    from redi.trainer.state import TrainState

log = logging.getLogger(__name__)


class RunWatch(RunLog):
    """RunLog (metrics.jsonl, the tracker) with the grids (rank 0) and the evaluation (every rank) of one run."""

    def __init__(self, plan: TrainPlan, dist_info: DistInfo, state: TrainState):
        super().__init__(plan, dist_info, state)
        cfg, main, step = plan.cfg, dist_info.is_main, state.step
        ckpt = state.checkpoint(plan)
        self.grids = self._grid_sampler(ckpt) if main and 0 < cfg.sample_every <= cfg.max_steps else None
        self.evaluation = PeriodicEval(cfg, ckpt, dist_info) if cfg.eval_every else None
        if step:
            self._catch_up(state)

    def _grid_sampler(self, ckpt: Checkpoint) -> RunSampler | None:
        """The grids' sampler; a VAE that cannot be loaded here turns the grids off (said once), not the run."""
        try:
            return RunSampler.build(self.cfg, ckpt, self.dist_info.device, self.cfg.sample_num)
        except UserError as e:
            if self.cfg.sample_guidance is not None:
                raise  # a guidance asked for that this model cannot give
            log.warning(f"{e} This run draws no sample grids (--sample-every 0 says so without this warning).")
            return None

    def after_step(self, state: TrainState) -> float:
        """The grid and the evaluation due at the state's step; the seconds they took (every rank: the evaluation is
        collective)."""
        seconds, step = 0.0, state.step
        if self.grids is not None and step % self.cfg.sample_every == 0:
            seconds += self._grid(state.checkpoint(self.plan))
        if self.evaluation is not None and step % self.cfg.eval_every == 0:
            seconds += self._evaluate(state.checkpoint(self.plan))
        self.seconds += seconds
        return seconds

    def _grid(self, ckpt: Checkpoint) -> float:
        assert self.grids is not None
        path, grid, seconds = write_grid(self.run, ckpt.step, self.grids, ckpt)
        self.log({"step": ckpt.step, "sample_seconds": seconds})
        self.tracker.image("samples", grid, ckpt.step)
        log.info(f"step {ckpt.step}: sample grid {path} ({seconds:.1f} s)")
        return seconds

    def _evaluate(self, ckpt: Checkpoint) -> float:
        assert self.evaluation is not None
        row, seconds = self.evaluation(ckpt.step, ckpt)
        if row is not None:
            self.log(row)
            log.info(f"step {ckpt.step}: FID {row['fid']:.3f}, sFID {row['sfid']:.3f}, IS {row['inception_score']:.2f}, "
                     f"precision {row['precision']:.3f}, recall {row['recall']:.3f} ({row['eval_seconds']:.1f} s)")
        return seconds

    def _catch_up(self, state: TrainState) -> None:
        """The resumed step's grid and evaluation when the run ended before making them."""
        step = state.step
        if self.grids is not None and step % self.cfg.sample_every == 0 and not grid_path(self.run, step).exists():
            self._grid(state.checkpoint(self.plan))
        if self.evaluation is not None and step % self.cfg.eval_every == 0:
            rows = read_metrics(self.run / "metrics.jsonl")
            done = torch.tensor(float(any(r.get("step") == step and "fid" in r for r in rows)), device=self.dist_info.device)
            if torch.distributed.is_initialized():
                torch.distributed.broadcast(done, src=0)  # every rank takes part in the evaluation, or none
            if not done.item():
                self._evaluate(state.checkpoint(self.plan))
