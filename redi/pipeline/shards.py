"""Stage `shards`: join latents, features and the PCA into the training shards (docs/FORMATS.md).

Only images valid in both `latents/` and `features/` are kept; they are written in a fixed
pseudo-random order (a seeded permutation inside groups of `group_blocks` consecutive blocks,
as many as fit in GROUP_BYTES of memory), so that a block of `shard_size` samples mixes many
classes even though the image index is sorted by class folder. Block b holds shard samples [b·S, (b+1)·S): it is one zarr block
(whole chunks of every array, so a rewrite never touches another block), one WebDataset
tar `wds/shard-BBBBBB.tar`, and one committed stage chunk. After a block's files are
written their SHA-256s go to `checksums/BBBBBB.json`, then the chunk is committed;
`keys.json` and last `shards.json` are written once every block is committed.

Zarr arrays are uncompressed with a CRC-32C per chunk (zarr's `crc32c` codec), so any zarr
reader detects a damaged chunk; `shards.json` also records the SHA-256 of every file
(each tar, each zarr chunk file, each `zarr.json`, `keys.json`).

WebDataset member names: `KEY.FIELD.npy` and `KEY.label.cls`, where KEY is the image key
with '%' → '%25', '.' → '%2E' and '/' → '%2F' (webdataset splits a member name at the
first dot of its basename, and keys hold '/' and may hold dots); `decode_key` reverses it.
"""
from __future__ import annotations

import io
import math
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from redi.common.atomic import atomic_write_bytes, atomic_write_json, remove_temporaries, sha256_file, try_read_json
from redi.common.display import progress_bar
from redi.common.errors import UserError, writing
from redi.common.schema import OneOf, Range, Shaped, try_load
from redi.common.lock import exclusive
from redi.common.runtime import resolve_device
from redi.pipeline.latent_norm import ChannelStats, LatentNorm
from redi.pipeline.pca import features_fingerprint, load_stage_pca
from redi.pipeline.pca_file import PCA_FILE, PCAModel
from redi.pipeline.shards_config import (  # ShardsConfig: importable from here as before
    FORMATS, SHARDS_FORMAT_VERSION, SHARDS_JSON, ShardsConfig, ShardsResult, write_shards_stamp,
)
from redi.pipeline.stage import (
    KEYS_JSON, Identity, InputCheck, Manifest, SourceRecord, StageDir, StageState, open_array, read_errors, read_keys,
    read_manifest, stage_lock,
)
from redi.pipeline.vaes import LatentSpace, manifest_space

if TYPE_CHECKING:  # the layout and its names read without torch (the shards' readers); the projection imports it
    import torch

DATA_FIELDS = ("moments", "pcs", "cls", "patch_tokens")  # the array fields a sample may hold, besides label
CHUNK_BYTES = 16 << 20  # target size of one zarr chunk file
GROUP_BYTES = 1 << 30  # memory for the write-time shuffle: decides how many blocks one permutation spans
READ_ROWS = 256  # source images read (and projected) per step
ZARR_DIR = "samples.zarr"
CHECKSUMS_DIR = "checksums"  # per-block {relpath: sha256}, written before the block is committed


def encode_key(key: str) -> str:
    """An image key as a WebDataset sample key: no '.' and no '/' (reversible)."""
    return key.replace("%", "%25").replace(".", "%2E").replace("/", "%2F")


def decode_key(encoded: str) -> str:
    """Inverse of `encode_key`."""
    return encoded.replace("%2F", "/").replace("%2E", ".").replace("%25", "%")


def tar_relpath(block: int) -> str:
    """Path of block `block`'s WebDataset shard, relative to the shards directory."""
    return f"wds/shard-{block:06d}.tar"


@dataclass(frozen=True)
class FieldSpec:
    """Per-sample shape and dtype of one stored field."""

    shape: tuple[Annotated[int, Range(1)], ...]
    dtype: Annotated[str, OneOf(("int64", "float16", "float32"))]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class ShardLayout:
    """How samples are cut into blocks and what each sample holds."""

    num_samples: int  # M, samples in the shards
    shard_size: int  # S, samples per block (zarr block, tar shard, stage chunk)
    fields: dict[str, FieldSpec]  # "label" and the data fields, in member order

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_samples / self.shard_size)

    @property
    def sample_bytes(self) -> int:
        return sum(f.nbytes for f in self.fields.values())

    def block_range(self, block: int) -> tuple[int, int]:
        """First and one-past-last shard sample index of `block`."""
        return block * self.shard_size, min((block + 1) * self.shard_size, self.num_samples)

    def chunk_rows(self, name: str) -> int:
        """Samples per zarr chunk of field `name`: the largest divisor of S that fits CHUNK_BYTES."""
        per_sample = max(1, self.fields[name].nbytes)
        fits = [d for d in range(1, self.shard_size + 1) if self.shard_size % d == 0 and d * per_sample <= CHUNK_BYTES]
        return max(fits, default=1)


@dataclass(frozen=True)
class VaeRecord:
    """shards.json `vae`: the VAE's identity, short."""

    id: str | None = None
    revision: str | None = None
    """The hub commit or revision, or a local config's hash."""
    kind: str | None = None
    scale: Annotated[float | None, Range()] = None
    """Shards written before `latent_norm`: z' = z · scale + shift (SD-VAE: 0.18215 and 0)."""
    shift: Annotated[float | None, Range()] = None


@dataclass(frozen=True)
class PcaRecord:
    """shards.json `pca`: the PCA the PCs were projected with."""

    sha256: str
    """Of pca.safetensors: runs and `redi verify` hold the file to it."""
    K: Annotated[int, Range(1)]
    """Principal components stored per sample."""
    source: str = ""
    explained_variance: tuple[float, ...] = ()
    explained_variance_fraction: Annotated[float | None, Range(0, 1)] = None


@dataclass(frozen=True)
class ZarrRecord:
    """shards.json `zarr`: where the Zarr store is and how it is chunked."""

    path: str
    chunk_rows: dict[str, Annotated[int, Range(1)]]
    codecs: str


@dataclass(frozen=True)
class WdsRecord:
    """shards.json `wds`: how the tars are named and their members."""

    pattern: str
    members: str
    key_encoding: str


@dataclass(frozen=True)
class WriteOrder:
    """shards.json `write_order`: the write-time shuffle."""

    seed: Annotated[int, Range(0)]
    group_blocks: Annotated[int, Range(1)]


@dataclass(frozen=True)
class SkippedImage:
    """One entry of shards.json `skipped`: an image left out, and by which stage."""

    index: Annotated[int, Range(0)]
    key: str
    stage: str
    reason: str


@dataclass(frozen=True)
class ShardsRecord:
    """shards.json (docs/FORMATS.md), as every reader checks it before use (pipeline/readers.py: ShardInfo)."""

    num_samples: Annotated[int, Range(1)]
    shard_size: Annotated[int, Range(1)]
    num_shards: Annotated[int, Range(1)]
    num_classes: Annotated[int, Range(1)]
    resolution: Annotated[int, Range(1)]
    latent_shape: tuple[Annotated[int, Range(1)], Annotated[int, Range(1)], Annotated[int, Range(1)]]
    """[C, h, h] of the VAE latent."""
    fields: dict[str, FieldSpec]
    vae: Annotated[dict[str, Any], Shaped(VaeRecord)]
    pca: PcaRecord
    formats: tuple[Annotated[str, OneOf(FORMATS)], ...]
    files: dict[str, str]
    """Relative path → SHA-256 of every file of the shards."""
    encoder: Annotated[dict[str, Any], Shaped(Identity)] | None = None
    format_version: int = SHARDS_FORMAT_VERSION
    num_images: Annotated[int | None, Range(1)] = None
    num_skipped: Annotated[int | None, Range(0)] = None
    patch_size: Annotated[int | None, Range(1)] = None
    latent_space: Annotated[dict[str, Any], Shaped(LatentSpace)] | None = None
    latent_norm: Annotated[dict[str, Any], Shaped(LatentNorm)] | None = None
    zarr: ZarrRecord | None = None
    wds: WdsRecord | None = None
    write_order: WriteOrder | None = None
    source: Annotated[dict[str, Any], Shaped(SourceRecord)] | None = None
    tiny_random: bool = False
    skipped: list[SkippedImage] = field(default_factory=list)
    checksum: str = ""

    def __post_init__(self) -> None:  # ValueError: the loader names the file
        missing = [name for name in ("label", "moments", "pcs") if name not in self.fields]
        if missing or len(self.fields["pcs"].shape) != 3 or len(self.fields["moments"].shape) != 3:
            raise ValueError(f"its fields lack {', '.join(missing)}" if missing else "pcs or moments is not 3-dimensional")
        if self.fields["pcs"].shape[0] != self.pca.K or self.fields["moments"].shape[0] != 2 * self.latent_shape[0]:
            raise ValueError("pca.K, latent_shape and the fields' shapes disagree")
        if self.num_shards != math.ceil(self.num_samples / self.shard_size) or not self.formats:
            raise ValueError("num_shards, num_samples, shard_size and formats disagree")
        if self.latent_norm is not None and (self.latent_space is None or self.patch_size is None):
            raise ValueError("latent_norm comes without latent_space and patch_size")
        if self.latent_norm is None and (self.vae.get("scale") is None or self.vae.get("shift") is None):
            raise ValueError("it holds neither latent_norm nor the vae's scale and shift of older shards")
        if not ({"cls", "patch_tokens"} & set(self.fields) or (self.encoder or {}).get("dim", 0) > 0):
            raise ValueError("the encoder's width is in neither its fields nor its encoder record")


def make_layout(num_samples: int, shard_size: int, moments: tuple[int, int, int], pcs: tuple[int, int, int],
                dim: int, num_patches: int | None, cls: bool = True) -> ShardLayout:
    """The layout of the shards: label, moments (8,h,h), pcs (K,p,p), cls (D,) unless the encoder has no global
    token, optional patch_tokens (P,D)."""
    fields = {"label": FieldSpec((), "int64"), "moments": FieldSpec(moments, "float16"), "pcs": FieldSpec(pcs, "float16")}
    if cls:
        fields["cls"] = FieldSpec((dim,), "float16")
    if num_patches is not None:
        fields["patch_tokens"] = FieldSpec((num_patches, dim), "float16")
    return ShardLayout(num_samples, shard_size, fields)


def write_order(num_samples: int, shard_size: int, group_blocks: int, seed: int) -> np.ndarray:
    """(M,) kept-image position of each shard sample: a seeded permutation within each group of blocks."""
    group = group_blocks * shard_size
    parts = [lo + np.random.default_rng([seed, g]).permutation(min(group, num_samples - lo))
             for g, lo in enumerate(range(0, num_samples, group))]
    return np.concatenate(parts)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    """Add one file with fixed metadata, so equal data gives byte-identical tars."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(payload), 0, 0o644, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(payload))


def tar_bytes(keys: list[str], data: dict[str, np.ndarray]) -> bytes:
    """A WebDataset shard: for each sample, `KEY.label.cls` and `KEY.FIELD.npy` per data field."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i, key in enumerate(keys):
            base = encode_key(key)
            for name, values in data.items():
                if name == "label":
                    _add_member(tar, f"{base}.label.cls", str(int(values[i])).encode())
                else:
                    _add_member(tar, f"{base}.{name}.npy", _npy_bytes(values[i]))
    return buf.getvalue()


def chunk_keys(arr: zarr.Array, start: int, stop: int) -> list[str]:
    """Chunk (or shard) file names, relative to the array's directory, of rows [start, stop) of `arr`."""
    rows = (arr.shards or arr.chunks)[0]
    tail = (0,) * (arr.ndim - 1)  # our arrays are chunked along the sample axis only
    return [arr.metadata.encode_chunk_key((c, *tail)) for c in range(start // rows, (stop - 1) // rows + 1)]


def unreadable_chunk(arr: zarr.Array, start: int, stop: int) -> tuple[str, str] | None:
    """(chunk key, error) of the first chunk of rows [start, stop) of `arr` that fails to decode, else None."""
    rows = (arr.shards or arr.chunks)[0]
    for c in range(start // rows, (stop - 1) // rows + 1):
        try:
            arr[c * rows:min((c + 1) * rows, arr.shape[0])]
        except Exception as e:  # codecs raise ValueError, RuntimeError, … on damaged bytes
            return chunk_keys(arr, c * rows, c * rows + 1)[0], str(e) or type(e).__name__
    return None


class ShardWriter:
    """Writes blocks of samples to `samples.zarr` and/or `wds/` tars and hashes the files it wrote."""

    def __init__(self, root: Path, layout: ShardLayout, formats: tuple[str, ...]):
        self.root = Path(root)
        self.layout = layout
        self.formats = formats
        self.arrays: dict[str, zarr.Array] = {}
        if "zarr" in formats:
            with writing(self.root / ZARR_DIR / "zarr.json"):
                group = zarr.open_group(self.root / ZARR_DIR, mode="a")
            for name, spec in layout.fields.items():
                with writing(self.root / ZARR_DIR / name / "zarr.json"):
                    self.arrays[name] = group.require_array(
                        name, shape=(layout.num_samples, *spec.shape), dtype=spec.dtype,
                        chunks=(layout.chunk_rows(name), *spec.shape), compressors=[Crc32cCodec()], fill_value=0,
                    ).with_config({"write_empty_chunks": True})  # also when reopened: every chunk has a file to hash

    def write_block(self, block: int, keys: list[str], data: dict[str, np.ndarray]) -> dict[str, str]:
        """Write one block's samples in every format; return {relpath: sha256} of the files written."""
        start, stop = self.layout.block_range(block)
        assert len(keys) == stop - start and all(len(v) == stop - start for v in data.values()), "block size mismatch"
        files: list[str] = []
        for name, arr in self.arrays.items():
            keys_written = [f"{ZARR_DIR}/{name}/{key}" for key in chunk_keys(arr, start, stop)]
            with writing(self.root / keys_written[0]):  # a full disk names the block's first chunk file of the array
                arr[start:stop] = data[name]
            files += keys_written
        if "wds" in self.formats:
            rel = tar_relpath(block)
            atomic_write_bytes(self.root / rel, tar_bytes(keys, {n: data[n] for n in self.layout.fields}))
            files.append(rel)
        return {rel: sha256_file(self.root / rel) for rel in files}

    def metadata_checksums(self) -> dict[str, str]:
        """SHA-256 of the zarr metadata files (group and arrays)."""
        if not self.arrays:
            return {}
        rels = [f"{ZARR_DIR}/zarr.json"] + [f"{ZARR_DIR}/{name}/zarr.json" for name in self.arrays]
        return {rel: sha256_file(self.root / rel) for rel in rels}


@dataclass
class _Inputs:
    """The opened, cross-checked inputs of the stage."""

    moments: zarr.Array  # (N, 2C, h, h)
    cls: zarr.Array | None  # (N, D) global token; None when the encoder has none (I-JEPA)
    patch: zarr.Array  # (N, P, D)
    labels: np.ndarray  # (N,) int64
    keys: list[str]  # N image keys
    checks: dict[str, InputCheck]  # "latents", "features": reads checked against the stages' ledgers
    kept: np.ndarray  # (M,) image index of the images valid in both stages, increasing
    skipped: list[dict[str, Any]]  # {"index", "key", "stage", "reason"} per dropped image and stage
    latents_manifest: Manifest
    features_manifest: Manifest
    latent_space: LatentSpace  # what the moments are (recorded by encode)
    pca: PCAModel
    pca_sha256: str

    @property
    def grid(self) -> int:
        """p: side of the encoder's patch grid."""
        return math.isqrt(self.patch.shape[1])


def _open_array(store: Path, name: str, ndim: int) -> zarr.Array:
    arr = open_array(store / name, "rerun the stage that writes it with --force")
    if arr.ndim != ndim:
        raise UserError(f"{store}/{name} has shape {arr.shape}; expected {ndim} dimensions (docs/FORMATS.md).")
    return arr


def _skipped(stage: str, valid: np.ndarray, errors: dict[int, str], keys: list[str]) -> list[dict[str, Any]]:
    return [{"index": int(i), "key": keys[i], "stage": stage, "reason": errors.get(int(i), "marked invalid")}
            for i in np.flatnonzero(~valid)]


def open_inputs(data: Path) -> _Inputs:
    """Open latents/, features/ and pca.safetensors and check that they describe the same images."""
    lat_root, feat_root = data / "latents", data / "features"
    lat_manifest, feat_manifest = read_manifest(lat_root), read_manifest(feat_root)
    space = manifest_space(lat_manifest.params)
    if space is None:
        raise UserError(f"{lat_root / 'manifest.json'} does not say what its latents are; rerun `redi encode` with "
                        "--force.")
    lat_errors = {e.index: e.reason for e in read_errors(lat_root)}
    feat_errors = {e.index: e.reason for e in read_errors(feat_root)}
    if lat_manifest.source["fingerprint"] != feat_manifest.source["fingerprint"]:
        raise UserError(f"{lat_root} and {feat_root} were made from different image sources; rerun one of them.")
    keys = read_keys(lat_root, f"rerun the stage that writes {lat_root.name}/ with --force")
    if read_keys(feat_root, f"rerun the stage that writes {feat_root.name}/ with --force") != keys:
        raise UserError(f"{lat_root}/keys.json and {feat_root}/keys.json list different images; rerun one stage.")
    lat_store, feat_store = lat_root / "store.zarr", feat_root / "store.zarr"
    moments, patch = _open_array(lat_store, "moments", 4), _open_array(feat_store, "patch", 3)
    arrays = feat_manifest.params.get("arrays")  # recorded by the stage (synthetic stores hold every array)
    cls = _open_array(feat_store, "cls", 2) if arrays is None or "cls" in arrays else None  # no global token: none
    n = len(keys)
    checks = {"latents": InputCheck(lat_root, n), "features": InputCheck(feat_root, n)}
    whole = {(stage, name): _rows(_open_array(store, name, 1), name, 0, n, checks[stage])
             for stage, store in (("latents", lat_store), ("features", feat_store)) for name in ("labels", "valid")}
    labels = np.asarray(whole["latents", "labels"], dtype=np.int64)
    lat_valid, feat_valid = (np.asarray(whole[stage, "valid"], dtype=bool) for stage in ("latents", "features"))
    rows = {a.shape[0] for a in (moments, patch, cls) if a is not None} | {len(labels), len(lat_valid), len(feat_valid)}
    if rows != {n}:
        raise UserError(f"{lat_root} and {feat_root} hold different numbers of images (keys.json lists {n}).")
    if not np.array_equal(labels, np.asarray(whole["features", "labels"], dtype=np.int64)):
        raise UserError(f"{lat_store}/labels and {feat_store}/labels differ; rerun one of the stages.")
    if math.isqrt(patch.shape[1]) ** 2 != patch.shape[1] or (cls is not None and cls.shape[1] != patch.shape[2]):
        raise UserError(f"{feat_store} holds patch {patch.shape} and cls {cls.shape}; expected (N, p², D) and (N, D).")
    pca_path = data / PCA_FILE
    pca, pca_sha256 = load_stage_pca(data)
    if pca.dim != patch.shape[2]:
        raise UserError(f"{pca_path} is {pca.dim}-dimensional but the patch tokens are {patch.shape[2]}-dimensional.")
    if pca.source.startswith("features:") and pca.source != features_fingerprint(feat_manifest):
        raise UserError(f"{pca_path} was fitted on another features stage; rerun `redi pca --data {data} --force`.")
    kept = np.flatnonzero(lat_valid & feat_valid)
    if len(kept) == 0:
        raise UserError(f"No image is valid in both {lat_root} and {feat_root}.")
    skipped = _skipped("latents", lat_valid, lat_errors, keys) + _skipped("features", feat_valid, feat_errors, keys)
    skipped.sort(key=lambda s: (s["index"], s["stage"]))
    if moments.shape[1] != 2 * space.channels:
        raise UserError(f"{lat_store}/moments holds {moments.shape[1]} channels where its manifest's VAE has "
                        f"2 × {space.channels}; rerun `redi encode` with --force.")
    return _Inputs(moments, cls, patch, labels, keys, checks, kept, skipped, lat_manifest, feat_manifest, space, pca,
                   pca_sha256)


def _group_blocks(layout: ShardLayout) -> int:
    return max(1, min(layout.num_shards, GROUP_BYTES // max(1, layout.shard_size * layout.sample_bytes)))


def _manifest(inputs: _Inputs, cfg: ShardsConfig, group_blocks: int) -> Manifest:
    params = {"formats": sorted(cfg.formats), "pcs": cfg.pcs, "patch_tokens": cfg.patch_tokens,
              "shard_size": cfg.shard_size, "seed": cfg.seed, "group_blocks": group_blocks, "latent_norm": cfg.latent_norm}
    return Manifest(
        stage="shards", params=params,
        encoder={"vae": inputs.latents_manifest.encoder, "dino": inputs.features_manifest.encoder,
                 "pca_sha256": inputs.pca_sha256},
        source={"fingerprint": inputs.latents_manifest.source["fingerprint"],
                "latents": inputs.latents_manifest.params, "features": inputs.features_manifest.params},
        tiny_random=inputs.latents_manifest.tiny_random or inputs.features_manifest.tiny_random,
    )


def _rows(arr: zarr.Array, name: str, first: int, last: int, check: InputCheck) -> np.ndarray:
    """Rows [first, last) of the input stage array `name`, its chunk files checked against their ledger first; a
    chunk damaged on disk is one sentence naming the way out."""
    check.rows(name, first, last)
    try:
        return arr[first:last]
    except Exception:  # codecs raise ValueError, RuntimeError, … on damaged bytes
        bad = unreadable_chunk(arr, first, last)
        where = f"chunk {bad[0]} of {check.root.name}/{name}" if bad else f"{check.root.name}/{name}"
        raise UserError(f"The input {where} cannot be read ({bad[1] if bad else 'damaged'}): run `redi verify DATA "
                        "--repair`, rerun that stage, then `redi shards`.") from None


def _read_group(inputs: _Inputs, lo: int, hi: int, layout: ShardLayout, device: torch.device) -> dict[str, np.ndarray]:
    """Every field of the kept images at positions [lo, hi), in that order; PCs projected on `device`."""
    import torch

    out = {name: np.empty((hi - lo, *spec.shape), spec.dtype) for name, spec in layout.fields.items()}
    k, p = layout.fields["pcs"].shape[:2]
    for at in range(lo, hi, READ_ROWS):
        idx = inputs.kept[at:min(hi, at + READ_ROWS)]  # (n,) increasing image indices
        first, last = int(idx[0]), int(idx[-1]) + 1
        sel = idx - first  # contiguous reads, then select: much faster than zarr's orthogonal indexing
        rows = slice(at - lo, at - lo + len(idx))
        out["label"][rows] = inputs.labels[idx]
        out["moments"][rows] = _rows(inputs.moments, "moments", first, last, inputs.checks["latents"])[sel]
        if inputs.cls is not None:
            out["cls"][rows] = _rows(inputs.cls, "cls", first, last, inputs.checks["features"])[sel]
        patch = _rows(inputs.patch, "patch", first, last, inputs.checks["features"])[sel]  # (n, P, D) float16
        tokens = torch.from_numpy(patch).to(device)
        z = inputs.pca.project(tokens, k)  # (n, P, K) float32
        out["pcs"][rows] = z.permute(0, 2, 1).reshape(len(idx), k, p, p).to(torch.float16).cpu().numpy()  # (n, K, p, p)
        if "patch_tokens" in out:
            out["patch_tokens"][rows] = patch
    return out


def model_patch(latent_side: int, grid: int, space: LatentSpace) -> int:
    """The diffusion model's default patch: the one whose token grid is the encoder's (h / p: REPA/REG align), else
    the VAE's default (2 on f8 latents, 1 on f16 and f32)."""
    return latent_side // grid if latent_side % grid == 0 else space.default_patch


def latent_norm(inputs: _Inputs, cfg: ShardsConfig, progress: bool) -> LatentNorm:
    """The VAE config's normalisation, or per-channel statistics over the kept images' latents in one streaming pass."""
    if cfg.latent_norm == "config":
        return inputs.latent_space.config_norm()
    stats = ChannelStats(inputs.latent_space.channels)
    with progress_bar("images/s", enabled=progress) as bar:
        task = bar.add_task("latent statistics", total=len(inputs.kept))
        for at in range(0, len(inputs.kept), READ_ROWS):
            idx = inputs.kept[at:at + READ_ROWS]  # (n,) increasing image indices
            first, last = int(idx[0]), int(idx[-1]) + 1
            stats.update(_rows(inputs.moments, "moments", first, last, inputs.checks["latents"])[idx - first])  # (n, 2C, h, h)
            bar.advance(task, len(idx))
    return stats.norm()


def _shards_json(inputs: _Inputs, cfg: ShardsConfig, layout: ShardLayout, group_blocks: int, norm: LatentNorm,
                 files: dict[str, str]) -> dict[str, Any]:
    lat_params, vae_id = inputs.latents_manifest.params, inputs.latents_manifest.encoder
    h = layout.fields["moments"].shape[-1]
    ev = inputs.pca.explained_variance
    return {
        "format_version": SHARDS_FORMAT_VERSION,
        "num_samples": layout.num_samples, "num_images": len(inputs.keys),
        "num_skipped": len(inputs.keys) - layout.num_samples, "num_classes": int(inputs.labels.max()) + 1,
        "shard_size": layout.shard_size, "num_shards": layout.num_shards,
        "resolution": int(lat_params["resolution"]),
        "latent_shape": [inputs.latent_space.channels, h, h],
        "patch_size": model_patch(h, inputs.grid, inputs.latent_space),
        "fields": {name: {"shape": list(spec.shape), "dtype": spec.dtype} for name, spec in layout.fields.items()},
        "vae": {"id": vae_id.get("id"), "revision": vae_id.get("commit", vae_id.get("revision", vae_id.get("hash"))),
                "kind": vae_id.get("kind")},
        "latent_space": inputs.latent_space.record(),
        "latent_norm": norm.record(),
        "encoder": inputs.features_manifest.encoder,
        "pca": {"sha256": inputs.pca_sha256, "K": cfg.pcs, "source": inputs.pca.source,
                "explained_variance": [float(v) for v in ev[:cfg.pcs]],
                "explained_variance_fraction": float(ev[:cfg.pcs].sum() / ev.sum())},
        "formats": sorted(cfg.formats),
        "zarr": {"path": ZARR_DIR, "chunk_rows": {n: layout.chunk_rows(n) for n in layout.fields},
                 "codecs": "bytes + crc32c, uncompressed"} if "zarr" in cfg.formats else None,
        "wds": {"pattern": "wds/shard-BBBBBB.tar", "members": "KEY.FIELD.npy, KEY.label.cls",
                "key_encoding": "'%' -> '%25', '.' -> '%2E', '/' -> '%2F'"} if "wds" in cfg.formats else None,
        "write_order": {"seed": cfg.seed, "group_blocks": group_blocks},
        "source": inputs.latents_manifest.source,
        "tiny_random": inputs.latents_manifest.tiny_random or inputs.features_manifest.tiny_random,
        "skipped": inputs.skipped,
        "checksum": "sha256 of every file: each tar, each zarr chunk file and zarr.json, keys.json",
        "files": dict(sorted(files.items())),
    }


def _write_pending(stage: StageDir, writer: ShardWriter, inputs: _Inputs, order: np.ndarray, group_blocks: int,
                   device: torch.device, progress: bool) -> int:
    """Write and commit every pending block, reading each write-shuffle group once; return the samples written."""
    layout, pending = writer.layout, stage.pending()
    written = 0
    with progress_bar("samples/s", enabled=progress) as bar:
        task = bar.add_task("shards", total=sum(layout.block_range(b)[1] - layout.block_range(b)[0] for b in pending))
        span = group_blocks * layout.shard_size  # kept images per write-time shuffle group
        for g in sorted({b // group_blocks for b in pending}):
            g_lo, g_hi = g * span, min(layout.num_samples, (g + 1) * span)
            group = _read_group(inputs, g_lo, g_hi, layout, device)  # kept positions [g_lo, g_hi), in that order
            for b in (b for b in pending if b // group_blocks == g):
                start, stop = layout.block_range(b)
                local = order[start:stop] - g_lo  # rows of `group` that make block b
                keys = [inputs.keys[i] for i in inputs.kept[order[start:stop]]]
                sums = writer.write_block(b, keys, {name: values[local] for name, values in group.items()})
                atomic_write_json(stage.root / CHECKSUMS_DIR / f"{b:06d}.json", sums)
                stage.commit(b, [])  # after the block's files and checksums are on disk
                written += stop - start
                bar.advance(task, stop - start)
    return written


def _block_sums(root: Path, block: int) -> dict[str, str] | None:
    """The {relpath: sha256} recorded for a block's files, or None when that record is missing or damaged."""
    sums = try_load(dict[str, str], try_read_json(root / CHECKSUMS_DIR / f"{block:06d}.json"))
    return sums or None


def _all_checksums(root: Path, writer: ShardWriter) -> dict[str, str]:
    """{relpath: sha256} of every file of the shards: the blocks' recorded sums, keys.json, zarr metadata."""
    files: dict[str, str] = {}
    for b in range(writer.layout.num_shards):
        sums = _block_sums(root, b)
        assert sums is not None, f"block {b} is committed without its checksums"
        files.update(sums)
    files[KEYS_JSON] = sha256_file(root / KEYS_JSON)
    files.update(writer.metadata_checksums())
    return files


def _readable_info(path: Path) -> dict[str, Any] | None:
    """shards.json's content, or None when it is missing or damaged (a complete stage then writes it again)."""
    info = try_read_json(path)
    return info if try_load(ShardsRecord, info) is not None else None


def build_shards(data: Path, cfg: ShardsConfig, *, progress: bool = True) -> ShardsResult:
    """Run the `shards` stage on the data root `data`: cached, resumable, shards.json written last; one process at a time."""
    with exclusive(stage_lock(Path(data) / "shards"), str(Path(data) / "shards")):
        remove_temporaries(Path(data) / "shards")  # left by a killed run
        return write_stage(Path(data), cfg, progress)


def write_stage(data: Path, cfg: ShardsConfig, progress: bool) -> ShardsResult:
    """`build_shards` without the lock."""
    t0 = time.perf_counter()
    inputs = open_inputs(data)
    if cfg.pcs > inputs.pca.components.shape[0]:
        raise UserError(f"--pcs {cfg.pcs} exceeds the {inputs.pca.components.shape[0]} components stored in "
                        f"{data / 'pca.safetensors'}.")
    device = resolve_device(cfg.device)
    p = inputs.grid
    layout = make_layout(len(inputs.kept), cfg.shard_size, tuple(inputs.moments.shape[1:]), (cfg.pcs, p, p),
                         inputs.patch.shape[2], inputs.patch.shape[1] if cfg.patch_tokens else None, inputs.cls is not None)
    group_blocks = _group_blocks(layout)
    root = data / "shards"
    stage = StageDir(root, n_chunks=layout.num_shards)
    state = stage.open(_manifest(inputs, cfg, group_blocks), cfg.force, legacy={"latent_norm": "config"})
    stage.forget([b for b in range(layout.num_shards) if stage.is_done(b) and _block_sums(root, b) is None])
    shards_json = root / SHARDS_JSON
    info = _readable_info(shards_json)
    if state is StageState.COMPLETE and not stage.pending() and info is not None:
        write_shards_stamp(data, cfg, info)  # shards made before stamps: the next rerun answers at once
        return ShardsResult(root, True, layout.num_samples, len(inputs.keys) - layout.num_samples, layout.num_shards,
                            0, tuple(sorted(cfg.formats)), time.perf_counter() - t0, info)
    order = write_order(layout.num_samples, cfg.shard_size, group_blocks, cfg.seed)
    writer = ShardWriter(root, layout, cfg.formats)
    written = _write_pending(stage, writer, inputs, order, group_blocks, device, progress)
    stage.finish()
    atomic_write_json(root / KEYS_JSON, [inputs.keys[i] for i in inputs.kept[order]])
    info = _shards_json(inputs, cfg, layout, group_blocks, latent_norm(inputs, cfg, progress), _all_checksums(root, writer))
    atomic_write_json(shards_json, info)  # then: its presence means the shards are complete
    write_shards_stamp(data, cfg, info)  # last: what they were made from, for a rerun with nothing to do
    return ShardsResult(root, False, layout.num_samples, len(inputs.keys) - layout.num_samples, layout.num_shards,
                        written, tuple(sorted(cfg.formats)), time.perf_counter() - t0, info)
