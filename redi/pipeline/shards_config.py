"""What `redi shards` is asked and answers, importable without torch: its settings (the flags), its result, and the
stamp of finished shards (DATA/.shards.stamp.json) that lets a rerun with nothing to do answer at once.

The stamp records the settings that decide the shards and the digests (common/stamp.py) of what they were made from,
latents/ and features/ (manifest, keys, errors and the per-chunk records that hold each chunk's SHA-256) and the
PCA (pca.safetensors and its pca.json), and of the shards themselves (shards.json, their stage records and every file
shards.json lists). A rerun whose settings and file sets agree answers "nothing to do" from shards.json without
opening an array or importing torch; anything else goes through the stage, which checks it all. The stamp is a cache
beside the stage (it holds modification times), not part of shards/, whose bytes stay those of any run; deleting it
costs one full check.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

from redi.common.atomic import try_read_json
from redi.common.choices import LATENT_NORMS
from redi.common.errors import UserError
from redi.common.flags import OneOf
from redi.common.schema import Range, check_ranges
from redi.common.stamp import FileSets, is_current, write_stamp

SHARDS_FORMAT_VERSION = 1
FORMATS = ("zarr", "wds")
SHARDS_JSON = "shards.json"
STAMP_JSON = ".shards.stamp.json"  # in the data root: what the finished shards were made from
INPUT_STAGES = ("latents", "features")
STAGE_RECORDS = ("manifest.json", "keys.json", "errors.jsonl")  # beside progress/, what a stage says it holds
PCA_FILES = ("pca.safetensors", "pca.json")


@dataclass(frozen=True)
class ShardsConfig:
    """Parameters of the `shards` stage: the flags of `redi shards`."""

    formats: tuple[str, ...] = ("zarr",)
    """Stores to write: zarr (random access, one node), wds (WebDataset tars, streaming) or both.

    "zarr" and/or "wds"."""
    pcs: Annotated[int, Range(1)] = 32
    """K: principal components kept per sample (train with any rank r ≤ K)."""
    patch_tokens: bool = False
    """Also store the full patch tokens (P×D), needed by REPA/REG alignment (large)."""
    shard_size: Annotated[int, Range(1)] = 1024
    """Samples per block: one tar, one zarr block, one committed unit."""
    seed: Annotated[int, Range(0)] = 0
    """Seed of the write-time shuffle of the sample order."""
    device: str = "auto"
    """Where the PCA projection runs: auto, cpu, cuda or cuda:N."""
    latent_norm: Annotated[str, OneOf(LATENT_NORMS)] = "config"
    """Latent normalisation the trainer applies: the VAE config's scale and shift, or per-channel statistics.

    "channel": mean and std measured over these shards' latents, as LightningDiT's latent statistics."""
    force: bool = False
    """Delete and redo shards made with other settings."""

    def __post_init__(self) -> None:
        if not self.formats or any(f not in FORMATS for f in self.formats):
            raise UserError(f"--format must name zarr, wds or both, not {','.join(self.formats) or 'nothing'}.")
        check_ranges(self)
        if self.latent_norm not in LATENT_NORMS:
            raise UserError(f"--latent-norm must be {' or '.join(LATENT_NORMS)}, not {self.latent_norm}.")

    def decisive(self) -> dict[str, Any]:
        """The settings that decide the shards' bytes (not where the projection runs, nor --force)."""
        settings = {k: v for k, v in asdict(self).items() if k not in ("device", "force")}
        return settings | {"formats": sorted(self.formats), "format_version": SHARDS_FORMAT_VERSION}


@dataclass(frozen=True)
class ShardsResult:
    """What a `shards` run did."""

    root: Path  # the shards directory
    up_to_date: bool  # True when there was nothing to do
    num_samples: int
    num_skipped: int
    num_shards: int
    written_samples: int  # samples written by this run (less than num_samples after a resume)
    formats: tuple[str, ...]
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)  # the shards.json content


def stamp_sets(data: Path, info: dict[str, Any]) -> FileSets:
    """The file sets of the stamp: each input stage's records, the PCA, and the shards (`info` is shards.json)."""
    root = data / "shards"
    listed = info.get("files") if isinstance(info.get("files"), dict) else {}
    return {**{stage: _stage_records(data / stage) for stage in INPUT_STAGES},
            "pca": [data / name for name in PCA_FILES],
            "shards": [root / SHARDS_JSON, *_stage_records(root), *sorted((root / "checksums").glob("*.json")),
                       *(root / rel for rel in sorted(listed))]}


def _stage_records(stage: Path) -> list[Path]:
    return [*(stage / name for name in STAGE_RECORDS), *sorted((stage / "progress").glob("*.json"))]


def write_shards_stamp(data: Path, cfg: ShardsConfig, info: dict[str, Any]) -> None:
    """shards/stamp.json for finished shards described by `info` (their shards.json)."""
    write_stamp(data / STAMP_JSON, cfg.decisive(), stamp_sets(data, info))


def finished_shards(data: Path, cfg: ShardsConfig) -> ShardsResult | None:
    """The result of a rerun with nothing to do, when the stamp says the shards are those `cfg` and the inputs make
    (read from shards.json); None when anything differs or is unknown: the stage then runs and checks it all."""
    started, root = time.perf_counter(), Path(data) / "shards"
    info = try_read_json(root / SHARDS_JSON)
    if cfg.force or not isinstance(info, dict) or not is_current(Path(data) / STAMP_JSON, cfg.decisive(),
                                                                 stamp_sets(Path(data), info)):
        return None
    try:
        return ShardsResult(root, True, int(info["num_samples"]), int(info["num_skipped"]), int(info["num_shards"]), 0,
                            tuple(info["formats"]), time.perf_counter() - started, info)
    except (KeyError, TypeError, ValueError):
        return None
