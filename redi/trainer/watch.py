"""What a run logs as it trains: metrics.jsonl and the tracker (rank 0).

The training loop makes two calls inside `with watch:`: `log(row)` on logging steps and `after_step(state)` after
every step (it returns the seconds spent on work that the loop leaves out of images/s). `RunLog` does only the
logging; sampler/watch.py's `RunWatch` adds the sample grids and the in-training FID, and `redi train` passes it to
`train(watch=...)` (trainer/ never imports sampler/: DESIGN's direction of imports).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from redi.common.distributed import DistInfo
from redi.trainer.metrics import MetricsLog
from redi.trainer.plan import TrainPlan
from redi.trainer.trackers import default_tracker, open_tracker

if TYPE_CHECKING:
    from redi.trainer.state import TrainState


class RunLog:
    """metrics.jsonl and the tracker of one run (rank 0); a subclass adds work done after steps."""

    def __init__(self, plan: TrainPlan, dist_info: DistInfo, state: TrainState):
        self.plan, self.cfg, self.dist_info = plan, plan.cfg, dist_info
        self.run = Path(plan.cfg.run)
        self.seconds = 0.0
        """Spent in `after_step` (the training's images/s leaves it out)."""
        cfg, main, step = plan.cfg, dist_info.is_main, state.step
        self.metrics = MetricsLog(self.run / "metrics.jsonl", resume_step=step) if main else None
        self.tracker = open_tracker(cfg.tracker or default_tracker(), self.run, step, cfg.to_json(), main)

    def log(self, row: dict[str, Any]) -> None:
        """One metrics.jsonl line (rank 0), also to the tracker."""
        if self.metrics is not None:
            self.metrics.write(row)
            self.tracker.scalars(row, row["step"])

    def after_step(self, state: TrainState) -> float:
        """Work due at the state's step; the seconds it took (none here)."""
        return 0.0

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.tracker.close()  # however the loop ends (a full disk, a refusal): no file left open


WatchFactory = type[RunLog]  # what `train(watch=...)` takes: RunLog, or sampler.watch.RunWatch
