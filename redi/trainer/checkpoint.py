"""The checkpoint and config.json: one owner of their layout, and of their files.

The record. A checkpoint is a `Checkpoint`; a run's config.json is a `RunConfig`; the parts they share carry the same
names in both: `train` (the TrainConfig as resolved), `model_config` (the network) and `shards` (a `ShardSummary`:
what sampling needs of the shards, and what a resumed run's shards must match). A checkpoint adds `step`, the
weights `model` and `ema`, the optimiser state `opt`, and for `redi convert` output, `origin`. Files of the
layout before (redi up to main 5cb68c9) still load: there a checkpoint's `train` was called `config`, and
config.json's `model_config` was called `model` (tests/fixtures/run-v0).

The files. Atomic writes (in a background thread from a CPU snapshot), keep-last-N plus milestones, safe
(weights_only) loading, and a SHA-256 per checkpoint (`step-N.pt.sha256`, sha256sum's format) written before the
checkpoint itself and checked when it is loaded, so a file damaged on disk is never trained or sampled from.

Post-hoc EMA (`--phema`, trainer/phema.py). A checkpoint of such a run holds the tracked profiles in `phema` (resume
state); every --phema-every steps the profiles alone go to `RUN/phema/step-N.pt` (a `PhemaSnapshot`, with its own
`.sha256`), which `redi ema` combines into `RUN/ema/step-N-sigmaS.pt`: a checkpoint whose `ema` weights are the
reconstruction (`model` and `opt` None) and whose `posthoc_ema` says how it was made."""
from __future__ import annotations

import dataclasses
import logging
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any, ClassVar

import torch
from torch import Tensor

from redi.common.atomic import atomic_write_bytes, atomic_write_json, atomic_write_with, sha256_file
from redi.common.errors import UserError
from redi.common.schema import Range, Shaped, load, read
from redi.pipeline.stage import Identity
from redi.pipeline.latent_norm import LatentNorm
from redi.pipeline.shard_info import ShardInfo
from redi.pipeline.shards import VaeRecord
from redi.pipeline.vaes import LatentSpace, legacy_space
from redi.trainer.config import TrainConfig
from redi.trainer.models import ModelConfig

CONFIG_JSON = "config.json"
CHECKSUM_SUFFIX = ".sha256"
_NAME = re.compile(r"^step-(\d{7,})\.pt$")
PHEMA_DIR, POSTHOC_DIR = "phema", "ema"  # RUN/phema/step-N.pt: profile snapshots; RUN/ema/: `redi ema` output
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSummary:
    """What a run records of its shards (plain types, so weights_only loading accepts it)."""

    root: str | None
    """The shards directory (str(): a URL without its credentials); None for a converted public checkpoint."""
    shards_json_sha256: str | None
    vae: Annotated[dict[str, Any], Shaped(VaeRecord)]
    """The VAE's identity (id, revision, kind)."""
    encoder: Annotated[dict[str, Any], Shaped(Identity, types_only=True)]
    """The representation encoder's identity; {} when unknown."""
    num_samples: Annotated[int | None, Range(1)]
    num_classes: Annotated[int, Range(1)]
    resolution: Annotated[int, Range(1)]
    latent_shape: list[Annotated[int, Range(1)]]
    """(V, h, h) of the VAE latent."""
    pcs: Annotated[int, Range(0)]
    """K: principal components stored per sample (0: a converted checkpoint without PC channels)."""
    grid: Annotated[int, Range(1)]
    """p: side of the PC / patch-token grid."""
    feature_dim: Annotated[int, Range(1)]
    latent_space: Annotated[dict[str, Any], Shaped(LatentSpace)] | None
    """The latents' VAE class, channels, downsampling and config factors (pipeline.vaes.LatentSpace.record)."""
    latent_norm: Annotated[dict[str, Any], Shaped(LatentNorm)] | None
    """z' = (z − shift)·scale per channel: applied in training, inverted before decoding (LatentNorm.record)."""
    pca_sha256: str | None

    SAME_DATA: ClassVar[tuple[str, ...]] = (  # what a resumed run's shards must share (a copy elsewhere is fine)
        "vae", "encoder", "num_samples", "num_classes", "resolution", "latent_shape", "pcs", "feature_dim",
        "latent_space", "latent_norm", "pca_sha256")

    @classmethod
    def of(cls, info: ShardInfo) -> ShardSummary:
        return cls(
            root=str(info.root), shards_json_sha256=info.sha256, vae=info.raw["vae"], encoder=info.raw.get("encoder", {}),
            num_samples=info.num_samples, num_classes=info.num_classes, resolution=info.resolution,
            latent_shape=list(info.latent_shape), pcs=info.pcs, grid=info.grid, feature_dim=info.feature_dim,
            latent_space=info.latent_space.record(), latent_norm=info.latent_norm.record(), pca_sha256=info.pca_sha256,
        )

    @classmethod
    def from_older(cls, value: dict[str, Any]) -> dict[str, Any]:
        """A summary as saved, in today's layout (common.schema reads it through this): a field an older file lacks
        is None (and `vae` {}), so sampling can fall back or ask; a file from before the latent records holds SD-VAE
        latents scaled as its `vae_scale` and `vae_shift` say."""
        today = {f.name: value.get(f.name) for f in dataclasses.fields(cls)} | {"vae": value.get("vae") or {}}
        if value.get("latent_norm") or not isinstance(today["vae"], dict):
            return today
        vae = {k: v for k, v in today["vae"].items() if k not in ("scale", "shift")}  # now in latent_norm
        return today | {"vae": vae} | _legacy_latents(value)

    @property
    def norm(self) -> LatentNorm:
        """The latent normalisation the run trained with."""
        if self.latent_norm is None:
            raise UserError("The checkpoint records no latent normalisation (nor a VAE scale); it cannot be decoded.")
        return LatentNorm.from_record(self.latent_norm)

    @property
    def space(self) -> LatentSpace | None:
        """The latent space the run trained on, where recorded."""
        return None if self.latent_space is None else LatentSpace.from_record(self.latent_space)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def differences(self, other: ShardSummary) -> list[str]:
        """The SAME_DATA fields in which `other` differs."""
        return [k for k in self.SAME_DATA if getattr(self, k) != getattr(other, k)]


def _legacy_latents(value: dict[str, Any]) -> dict[str, Any]:
    """latent_space and latent_norm of a summary written before them: SD-VAE latents, z' = z · vae_scale + vae_shift
    (the scale in `vae` before that); {} when it records no scale."""
    vae, shape = value.get("vae") or {}, value.get("latent_shape")
    scale = value.get("vae_scale", vae.get("scale"))
    if scale is None or not shape or not value.get("resolution"):
        return {}
    shift = value.get("vae_shift", vae.get("shift")) or 0.0
    return {"latent_space": legacy_space(shape[0], shape[1], value["resolution"]).record(),
            "latent_norm": LatentNorm.legacy(float(scale), float(shift), shape[0]).record()}


@dataclass(frozen=True)
class SettingsChange:
    """A resume that changed settings on purpose: from `step` on, the run trains with `settings` instead of `before`."""

    step: Annotated[int, Range(0)]
    settings: Annotated[dict[str, Any], Shaped(TrainConfig, types_only=True)]
    """The new values, under TrainConfig's names (and `world_size`: the processes of the resumed job)."""
    before: Annotated[dict[str, Any], Shaped(TrainConfig, types_only=True)]
    """The values they replace."""


@dataclass(frozen=True)
class RunConfig:
    """config.json: what a run is, written when it starts, under the names its checkpoints use; a resume that changes
    a setting appends a `SettingsChange` and never rewrites `train`."""

    train: Annotated[dict[str, Any], Shaped(TrainConfig, types_only=True)]
    """TrainConfig.to_json() as resolved when the run started (resolution from the shards, max_steps from --epochs)."""
    model_config: ModelConfig
    shards: ShardSummary
    world_size: Annotated[int, Range(1)] = 1
    """Processes of the job that started the run."""
    changes: tuple[SettingsChange, ...] = ()
    """Each resume that changed a setting, in the order they happened."""

    @property
    def settings(self) -> dict[str, Any]:
        """The settings the run trains with now: `train` with every change applied (what a resume keeps)."""
        current = dict(self.train)
        for change in self.changes:
            current.update({k: v for k, v in change.settings.items() if k != "world_size"})
        return current

    @property
    def current_world_size(self) -> int:
        return next((c.settings["world_size"] for c in reversed(self.changes) if "world_size" in c.settings),
                    self.world_size)

    @property
    def batch_sizes(self) -> tuple[tuple[int, int], ...]:
        """(first step, global batch size) of each stretch the run trained or trains at, in step order; a resume that
        went back to an older checkpoint replaces the stretches recorded after its step."""
        stretches = [(0, int(self.train["batch_size"]))]
        for change in self.changes:
            if "batch_size" in change.settings:
                stretches = [s for s in stretches if s[0] < change.step] + [(change.step, int(change.settings["batch_size"]))]
        return tuple(stretches)

    def samples_before(self, step: int) -> int:
        """Samples the run has trained on before `step`, each stretch of steps at its own batch size."""
        stretches = self.batch_sizes
        ends = [first for first, _ in stretches[1:]] + [step]
        return sum(max(0, min(end, step) - first) * batch for (first, batch), end in zip(stretches, ends, strict=True))

    def with_change(self, change: SettingsChange) -> RunConfig:
        return dataclasses.replace(self, changes=(*self.changes, change))

    def save(self, run: Path) -> None:
        atomic_write_json(Path(run) / CONFIG_JSON, {
            "train": self.train, "model_config": dataclasses.asdict(self.model_config), "shards": self.shards.to_json(),
            "world_size": self.world_size} | ({"changes": [dataclasses.asdict(c) for c in self.changes]} if self.changes else {}))

    @classmethod
    def from_older(cls, value: dict[str, Any]) -> dict[str, Any]:
        """config.json (or a checkpoint's shared parts) in today's layout: `model_config` was called `model`."""
        return {"model_config": value["model"], **value} if "model_config" not in value and "model" in value else value

    @classmethod
    def load(cls, run: Path) -> RunConfig:
        """config.json of `run`; a damaged one, or one with a field of the wrong type, is one sentence."""
        path = Path(run) / CONFIG_JSON
        if not path.is_file():
            raise UserError(f"{run} has no {CONFIG_JSON}: it is not a `redi train` run directory.")
        return read(cls, path, "restore it from a checkpoint's `train` or use another --run directory")


@dataclass(eq=False)  # tensors have no truth value: compare to_state() (tests/faults.py same_value)
class Checkpoint:
    """One checkpoint file: a step's whole training state and everything sampling needs (nanoGPT's idea: the file
    carries the model arguments), as edm2's CheckpointIO owns all state."""

    step: int
    train: dict[str, Any]
    """TrainConfig.to_json() of the run (or what a converted origin implies)."""
    model_config: ModelConfig
    shards: ShardSummary
    model: dict[str, Tensor] | None
    """The optimiser's weights; None in a post-hoc EMA reconstruction (its weights are `ema`)."""
    ema: dict[str, Tensor] | None
    """The EMA weights (what sampling and --init use)."""
    opt: dict[str, Any] | None = None
    """AdamW's state; None in a converted checkpoint or a reconstruction (they do not resume)."""
    origin: dict[str, Any] | None = None
    """`redi convert`: the public file the weights came from and how they were mapped."""
    phema: dict[str, Any] | None = None
    """--phema: the tracked power-function EMA profiles, {"sigma_rels": [...], "profiles": [weights, ...]}."""
    posthoc_ema: dict[str, Any] | None = None
    """`redi ema`: the σ_rel and step of the reconstructed `ema` weights, and the snapshots and coefficients used."""
    path: Path | None = None
    """Where `load` read it (not saved)."""
    sha256: str | None = None
    """The SHA-256 of the file `load` read (not saved)."""

    @property
    def rep_drop(self) -> float:
        """The representation drop the model was trained with (0 for methods without PC channels)."""
        return float(self.train.get("rep_drop", 0.0)) if self.model_config.pca_rank > 0 else 0.0

    def weights(self, which: str) -> dict[str, Tensor]:
        """The `ema` or `model` weights."""
        chosen = self.ema if which == "ema" else self.model
        if chosen is None:
            raise UserError(f"{self.path} holds no {which} weights: pass --weights {'model' if which == 'ema' else 'ema'}.")
        return chosen

    def to_state(self) -> dict[str, Any]:
        """What torch.save writes: tensors and plain types only."""
        state = {"step": self.step, "train": self.train, "model_config": dataclasses.asdict(self.model_config),
                 "shards": self.shards.to_json(), "model": self.model, "ema": self.ema, "opt": self.opt}
        optional = {"origin": self.origin, "phema": self.phema, "posthoc_ema": self.posthoc_ema}
        return state | {k: v for k, v in optional.items() if v is not None}

    @classmethod
    def from_state(cls, state: Any, path: Path) -> Checkpoint:
        """The record of a loaded file (of this layout or the one before); another file is one sentence."""
        train = state.get("train", state.get("config")) if isinstance(state, dict) else None  # older layout: config
        missing = [k for k in ("step", "model_config", "shards", "model") if not isinstance(state, dict) or k not in state]
        if missing or train is None:
            raise UserError(f"{path} is not a `redi train` checkpoint (it lacks {', '.join(missing or ['train'])}).")
        shared = load(RunConfig, {"train": train, "model_config": state["model_config"], "shards": state["shards"]}, path,
                      "it holds a network or data record redi does not know")  # the parts config.json holds too
        if type(state["step"]) is not int or state["step"] < 0:
            raise UserError(f"{path} is damaged: its step is {state['step']!r}, not an integer ≥ 0.")
        return cls(step=state["step"], train=shared.train, model_config=shared.model_config, shards=shared.shards,
                   model=state["model"], ema=state.get("ema"), opt=state.get("opt"), origin=state.get("origin"),
                   phema=state.get("phema"), posthoc_ema=state.get("posthoc_ema"), path=Path(path))

    @classmethod
    def load(cls, path: Path, map_location: str | torch.device = "cpu") -> Checkpoint:
        """Read and check a checkpoint (weights_only: no pickled code runs)."""
        state, digest = load_checked(Path(path), map_location)
        record = cls.from_state(state, Path(path))
        record.sha256 = digest
        return record

    def save(self, path: Path) -> None:
        """Write it at `path` atomically, with its SHA-256 record (for `redi convert`; train saves through the
        BackgroundCheckpointer)."""
        write_checkpoint(path, self.to_state())


def load_checked(path: Path, map_location: str | torch.device = "cpu") -> tuple[Any, str]:
    """torch.load(weights_only=True) of a file checked against its SHA-256 record, and that SHA-256."""
    digest = check_checkpoint(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True), digest
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError … for bad files
        raise UserError(f"Cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0]}).") from None


@dataclass(frozen=True)
class PhemaSnapshot:
    """RUN/phema/step-N.pt: the power-function EMA profiles at one step, {"step", "images", "sigma_rels", "profiles"}."""

    step: int
    images: int
    """Training images seen at `step`: the profiles' time."""
    sigma_rels: tuple[float, ...]
    profiles: list[dict[str, Tensor]]
    """One set of weights per σ_rel, float32 as trained."""

    @classmethod
    def load(cls, path: Path) -> PhemaSnapshot:
        """Read and check a snapshot; another file is one sentence."""
        state, _ = load_checked(Path(path))
        try:
            snapshot = cls(int(state["step"]), int(state["images"]), tuple(float(s) for s in state["sigma_rels"]),
                           list(state["profiles"]))
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path} is not a post-hoc EMA snapshot (step, sigma_rels, profiles).") from None
        if len(snapshot.profiles) != len(snapshot.sigma_rels) or not all(
                isinstance(p, dict) and all(isinstance(v, Tensor) for v in p.values()) for p in snapshot.profiles):
            raise UserError(f"{path} is not a post-hoc EMA snapshot (one set of weights per σ_rel).")
        return snapshot


def phema_snapshot_path(run: Path, step: int) -> Path:
    return Path(run) / PHEMA_DIR / f"step-{step:07d}.pt"


def list_phema_snapshots(run: Path) -> list[tuple[int, Path]]:
    """(step, path) of every post-hoc EMA snapshot of the run, oldest first."""
    folder = Path(run) / PHEMA_DIR
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))] if folder.is_dir() else []
    return sorted(found)


def sigma_label(sigma_rel: float) -> str:
    """σ_rel in file and folder names: three decimals as edm2 (0.050), more where it has them (0.0525)."""
    return f"{sigma_rel:.3f}" if round(sigma_rel, 3) == sigma_rel else f"{sigma_rel:g}"


def posthoc_path(run: Path, step: int, sigma_rel: float) -> Path:
    """Where `redi ema` writes the reconstruction of σ_rel at `step` (edm2: phema-KIMG-σ.pkl)."""
    return Path(run) / POSTHOC_DIR / f"step-{step:07d}-sigma{sigma_label(sigma_rel)}.pt"


def checkpoint_path(run: Path, step: int) -> Path:
    return Path(run) / "checkpoints" / f"step-{step:07d}.pt"


def checksum_path(path: Path) -> Path:
    """The SHA-256 record of a checkpoint: `step-N.pt.sha256`, checkable with `sha256sum -c`."""
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def recorded_sha256(path: Path) -> str | None:
    """The SHA-256 recorded when `path` was saved; None when there is no record (older or foreign checkpoints)."""
    record = checksum_path(path)
    if not record.exists():
        return None
    try:
        digest = record.read_bytes().split()[0].decode()
    except (OSError, IndexError, UnicodeDecodeError):
        digest = ""
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise UserError(f"{record} is damaged, so {path.name} cannot be checked: delete the record to use the "
                        "checkpoint unchecked.")
    return digest


def check_checkpoint(path: Path) -> str:
    """The SHA-256 of `path`; one sentence (UserError) when it is missing or differs from the one recorded when it
    was saved."""
    if not path.exists():
        raise UserError(f"No checkpoint at {path}.")
    recorded, digest = recorded_sha256(path), sha256_file(path)
    if recorded is not None and digest != recorded:
        raise UserError(f"Checkpoint {path} differs from the SHA-256 recorded when it was saved: it was damaged on disk.")
    return digest


def list_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in the run, oldest first."""
    folder = Path(run) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save `state` to `path` atomically, its SHA-256 record first: every checkpoint in place has one."""

    def write(tmp: Path) -> None:
        torch.save(state, tmp)
        atomic_write_bytes(checksum_path(path), f"{sha256_file(tmp)}  {path.name}\n".encode())

    atomic_write_with(path, write)


def save_checkpoint(run: Path, step: int, state: dict[str, Any], keep: int, milestone_every: int) -> Path:
    """Write step-<7-digit step>.pt atomically, then delete the older non-milestone checkpoints beyond the newest `keep`
    (0: delete none; milestones: steps divisible by `milestone_every` > 0). The file just written is never deleted."""
    path = checkpoint_path(run, step)
    try:
        write_checkpoint(path, state)
    except OSError as e:  # a full or failing disk: the temporary file is gone, older checkpoints are untouched
        raise UserError(f"Could not write checkpoint {path} ({e.strerror or e}); the older checkpoints are intact: "
                        "free space and rerun the same command to resume.") from None
    rolling = [(s, p) for s, p in list_checkpoints(run) if milestone_every <= 0 or s % milestone_every != 0]
    for _, old in rolling[:-keep] if keep else []:
        if old != path:
            old.unlink(missing_ok=True)
            checksum_path(old).unlink(missing_ok=True)
    return path


def save_phema_snapshot(run: Path, step: int, phema: dict[str, Any]) -> Path:
    """Write RUN/phema/step-N.pt (the profiles of a checkpoint's `phema`) atomically, with its SHA-256 record."""
    path = phema_snapshot_path(run, step)
    try:
        write_checkpoint(path, {"step": step, "images": phema["images"], "sigma_rels": phema["sigma_rels"],
                                "profiles": phema["profiles"]})
    except OSError as e:
        raise UserError(f"Could not write the post-hoc EMA snapshot {path} ({e.strerror or e}): free space and rerun the "
                        "same command to resume.") from None
    return path


def load_newest_readable(run: Path, map_location: str | torch.device) -> Checkpoint | None:
    """The newest checkpoint of `run` that loads (a damaged one is reported and passed over); None if there are none."""
    found = list_checkpoints(run)
    for _, path in reversed(found):
        try:
            return Checkpoint.load(path, map_location=map_location)
        except UserError as e:
            log.warning(f"{e} Resuming from the checkpoint before it instead.")
    if found:
        raise UserError(f"No checkpoint in {Path(run) / 'checkpoints'} can be read: move them away to start the run over.")
    return None


def resolve_checkpoint(run: Path | None, ckpt: Path | None) -> Path:
    """The checkpoint file: `ckpt` as given, or the newest one of the run directory `run`."""
    if ckpt is not None:
        return Path(ckpt)
    assert run is not None, "one of run and ckpt is given"
    if not Path(run).is_dir():
        raise UserError(f"No run directory at {run}.")
    newest = newest_checkpoint(Path(run))
    if newest is None:
        raise UserError(f"{run} holds no checkpoint yet (looked in {Path(run) / 'checkpoints'}).")
    return newest


def newest_checkpoint(run: Path) -> Path | None:
    found = list_checkpoints(run)
    return found[-1][1] if found else None


class BackgroundCheckpointer:
    """Writes checkpoints from a host snapshot in one background thread, so training goes on during the disk write.

    The snapshot goes into host buffers kept from one save to the next (pinned when the state is on a GPU,
    where the copies are queued behind the step's kernels and waited for by the writer thread), so the loop
    pays a memory copy, not an allocation or a write. At most one write is in flight: `save` first waits for
    the previous one (and re-raises its error, e.g. a full disk); leaving the context waits for the last.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending: Future[None] | None = None
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}  # position in the state → its host copy

    def __enter__(self) -> BackgroundCheckpointer:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if kind is None:
                self.wait()
        finally:
            self._pool.shutdown(wait=True)  # an interrupted run still finishes (or fails) its last write

    def save(self, run: Path, step: int, state: dict[str, Any], keep: int, milestone_every: int,
             checkpoint: bool = True, phema_snapshot: bool = False) -> None:
        """Write the checkpoint `state` (when `checkpoint`) and RUN/phema/step-N.pt from its "phema" part (when
        `phema_snapshot`; `state` may then be {"phema": ...} alone) from one host copy, whose "phema" buffers are the
        same in both cases."""
        self.wait()  # the buffers are free again
        snapshot = self._snapshot(state, ())
        copied = torch.cuda.Event() if torch.cuda.is_available() else None
        if copied is not None:
            copied.record()  # after the device-to-host copies queued above

        def write() -> None:
            if copied is not None:
                copied.synchronize()
            if phema_snapshot:
                save_phema_snapshot(run, step, snapshot["phema"])
            if checkpoint:
                save_checkpoint(run, step, snapshot, keep, milestone_every)

        self._pending = self._pool.submit(write)

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _snapshot(self, obj: Any, key: tuple[Any, ...]) -> Any:
        """`obj` with every tensor copied into its reused host buffer (other values are shared)."""
        if isinstance(obj, torch.Tensor):
            buf = self._buffers.get(key)
            if buf is None or buf.shape != obj.shape or buf.dtype != obj.dtype:
                buf = self._buffers[key] = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=obj.is_cuda)
            return buf.copy_(obj.detach(), non_blocking=obj.is_cuda)
        if isinstance(obj, dict):
            return {k: self._snapshot(v, (*key, k)) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._snapshot(v, (*key, i)) for i, v in enumerate(obj))
        return obj
