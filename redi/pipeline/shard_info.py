"""`shards.json` read as a `ShardInfo`, and the PCA beside the shards checked against it: what the trainer, the
sampler, `verify`, `publish`, `info` and `preview` know of a set of shards, without opening an array or importing torch
(the sample streams are `pipeline.readers`; the stage that writes the file is `pipeline.shards`)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redi.common.atomic import decode_json
from redi.common.errors import UserError
from redi.common.schema import load
from redi.pipeline.latent_norm import LatentNorm
from redi.pipeline.pca import PCA_RECORD, load_stage_pca
from redi.pipeline.pca_file import PCA_FILE, PCARecord, read_pca_bytes
from redi.pipeline.remote import Location, RemotePath, as_location
from redi.pipeline.shards import SHARDS_JSON, FieldSpec, ShardsRecord, model_patch
from redi.pipeline.vaes import LatentSpace, legacy_space


@dataclass(frozen=True)
class ShardInfo:
    """A typed view of `shards.json`."""

    root: Location  # the shards directory: a local path or a URL
    num_samples: int  # M
    shard_size: int  # S, samples per block
    num_shards: int  # blocks (tars)
    num_classes: int  # largest label + 1
    resolution: int  # image side R
    latent_shape: tuple[int, int, int]  # (C, h, h) of the VAE latent z; the moments hold 2C channels
    latent_space: LatentSpace  # the VAE's class, channels, downsampling, config scale and shift
    latent_norm: LatentNorm  # z' = (z − shift) · scale, applied by the trainer, inverted by the sampler
    patch_size: int  # the diffusion model's default patch (its token grid is the features' where they align)
    pcs: int  # K principal components stored per sample
    grid: int  # p, side of the PC / patch grid
    feature_dim: int  # D, the encoder's width (global and patch tokens), from its config
    has_patch_tokens: bool
    pca_sha256: str
    formats: tuple[str, ...]
    fields: dict[str, FieldSpec]  # per-sample shape and dtype, "label" included
    files: dict[str, str]  # relative path → SHA-256
    raw: dict[str, Any]  # the whole of shards.json (what a run records of its shards)
    sha256: str  # of shards.json as read

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid


def rebuild_hint(data: Location) -> str:
    """How to replace the damaged or missing shards of the data root `data`: rebuild them on a local disk, publish a
    good copy again to a URL."""
    if isinstance(data, RemotePath):
        return f"publish them again (`redi publish DATA {data}`)"
    return f"rebuild the shards (`redi shards --data {data} --force`)"


def read_shard_info(shards_dir: Location | str) -> ShardInfo:
    """Read `shards_dir/shards.json` (written last by `redi shards`, so its presence means complete)."""
    root = as_location(shards_dir) if isinstance(shards_dir, str) else shards_dir
    path = root / SHARDS_JSON
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if isinstance(root, RemotePath):
            raise UserError(f"No {SHARDS_JSON} at {root}: publish a data root's shards there (`redi publish DATA "
                            f"{root.parent}`), or let the publish finish.") from None
        raise UserError(f"No {SHARDS_JSON} in {root}: run `redi shards --data {root.parent}` (or let it finish).") \
            from None
    remedy = rebuild_hint(root.parent)
    try:
        raw = decode_json(data)
    except ValueError:
        raise UserError(f"{path} is damaged (it is not readable JSON); {remedy}.") from None
    record: ShardsRecord = load(ShardsRecord, raw, path, remedy)  # every field checked: a wrong one is named
    k, p, _ = record.fields["pcs"].shape
    space, norm, patch = _latent_records(record, p)
    return ShardInfo(
        root=root, num_samples=record.num_samples, shard_size=record.shard_size, num_shards=record.num_shards,
        num_classes=record.num_classes, resolution=record.resolution, latent_shape=record.latent_shape,
        latent_space=space, latent_norm=norm, patch_size=patch, pcs=k, grid=p, feature_dim=_feature_dim(record),
        has_patch_tokens="patch_tokens" in record.fields, pca_sha256=record.pca.sha256, formats=record.formats,
        fields=record.fields, files=record.files, raw=raw, sha256=hashlib.sha256(data).hexdigest(),
    )


def shards_pca(info: ShardInfo) -> bytes | None:
    """The PCA beside the shards (DATA/pca.safetensors), refused in one sentence unless it is the one they were
    projected with (shards.json's pca.sha256) and, on a local data root, the one its record pca.json names; None
    where there is none (`redi publish` leaves out a PCA fitted after the shards)."""
    data = info.root.parent
    path = data / PCA_FILE
    made_here = isinstance(data, Path) and (data / PCA_RECORD).exists()
    if made_here:
        load_stage_pca(data)  # a file changed since `redi pca` wrote it is that stage's to mend
        fix = f"the shards were projected with another PCA; rebuild them with this one (`redi shards --data {data} --force`)"
    elif isinstance(data, RemotePath):
        fix = f"publish the data root there again (`redi publish DATA {data}`)"
    else:
        fix = "copy it again with the shards it belongs to, from where they were made or published"
    try:
        return read_pca_bytes(path, PCARecord(info.pca_sha256, str(info.root / SHARDS_JSON), fix))
    except FileNotFoundError:
        return None


def _latent_records(record: ShardsRecord, grid: int) -> tuple[LatentSpace, LatentNorm, int]:
    """Latent space, normalisation and default patch of shards.json; shards made before they were recorded hold
    SD-VAE latents (f8), normalised as their `vae.scale` and `vae.shift` said, for patch-2 models."""
    if record.latent_norm is not None and record.latent_space is not None and record.patch_size is not None:
        return LatentSpace.from_record(record.latent_space), LatentNorm.from_record(record.latent_norm), record.patch_size
    channels, side, _ = record.latent_shape
    space = legacy_space(channels, side, record.resolution)
    norm = LatentNorm.legacy(record.vae["scale"], record.vae["shift"], channels)
    return space, norm, model_patch(side, grid, space)


def _feature_dim(record: ShardsRecord) -> int:
    """D from the stored tokens, or from the encoder's config when the shards hold neither `cls` nor patch tokens."""
    if "cls" in record.fields:
        return record.fields["cls"].shape[0]
    return record.fields["patch_tokens"].shape[1] if "patch_tokens" in record.fields else (record.encoder or {})["dim"]
