"""What a checkpoint saves and a resume restores (TrainState), and where a run starts from: its newest readable
checkpoint, --init's weights, or a fresh network."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from redi.common.errors import UserError
from redi.trainer.checkpoint import Checkpoint, load_newest_readable
from redi.trainer.ema import make_ema, update_ema
from redi.trainer.models import ModelConfig, initial_network
from redi.trainer.phema import PowerFunctionEMA
from redi.trainer.plan import TrainPlan


@dataclass
class TrainState:
    """What a checkpoint saves and a resume restores: the network, its EMA, AdamW, the step and the post-hoc EMA
    profiles."""

    model: torch.nn.Module
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    step: int = 0
    phema: PowerFunctionEMA | None = None
    """--phema's power-function EMA profiles."""

    def update(self, ema_decay: float) -> None:
        """The optimiser step, then the EMA."""
        self.opt.step()
        update_ema(self.ema, self.model, ema_decay)

    def checkpoint(self, plan: TrainPlan) -> Checkpoint:
        return Checkpoint(step=self.step, train=plan.cfg.to_json(), model_config=plan.model, shards=plan.shards,
                          model=self.model.state_dict(), ema=self.ema.state_dict(), opt=self.opt.state_dict(),
                          phema=None if self.phema is None else self.phema.state_dict())


def initial_state(plan: TrainPlan, run: Path, dev: torch.device) -> TrainState:
    """The run's newest readable checkpoint, else --init's weights, else a fresh network (the same on every rank)."""
    cfg = plan.cfg
    model = initial_network(plan.model, cfg.seed).to(dev)  # identical initial weights on every rank
    ema = make_ema(model)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
        fused=dev.type == "cuda",
    )
    state = TrainState(model, ema, opt)
    if (ckpt := load_newest_readable(run, dev)) is not None:
        if ckpt.opt is None:
            raise UserError(f"{ckpt.path} holds no optimiser state, so {run} cannot resume from it: start a new run "
                            f"with --init {ckpt.path}.")
        if ckpt.phema is not None and not cfg.phema:
            raise UserError(f"{run} tracks post-hoc EMA profiles: resume it with --phema.")
        if ckpt.phema is None and cfg.phema:
            raise UserError(f"{run} was trained without --phema up to step {ckpt.step}, and post-hoc EMA profiles "
                            "average from step 0: resume it without --phema, or start a new run with --init.")
        model.load_state_dict(ckpt.model)
        ema.load_state_dict(ckpt.ema)
        opt.load_state_dict(ckpt.opt)
        for group in opt.param_groups:  # load_state_dict restores the hyperparameters it was saved with
            group.update(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
        state.step = ckpt.step
    elif cfg.init is not None:
        load_initial_weights(Path(cfg.init), model, ema, plan.model, dev)
    if cfg.phema:
        state.phema = PowerFunctionEMA(model, cfg.phema_sigma_rels)  # the weights at step 0, or those resumed …
        if ckpt is not None:
            state.phema.load_state_dict(ckpt.phema, str(ckpt.path))  # … replaced by the checkpoint's profiles
    return state


def load_initial_weights(path: Path, model: torch.nn.Module, ema: torch.nn.Module, model_cfg: ModelConfig,
                         dev: torch.device) -> None:
    """Start from another run's (or a converted public checkpoint's) weights: EMA into both, as fine-tuning does."""
    init = Checkpoint.load(path, map_location=dev)
    wanted, saved = dataclasses.asdict(model_cfg), dataclasses.asdict(init.model_config)
    if changed := sorted(k for k in wanted if k != "class_dropout" and saved.get(k) != wanted[k]):
        raise UserError(f"--init {path} holds a different network ({', '.join(changed)}); match --model/--method/--pca-rank to it.")
    weights = init.ema if init.ema is not None else init.model
    model.load_state_dict(weights)
    ema.load_state_dict(weights)


