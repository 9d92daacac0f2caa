"""`redi verify`: re-check every stage of a data root: manifests, committed chunks, arrays, PCA, shard checksums.

A data root at a URL (what `redi publish` writes) holds shards/ only (and the PCA file): that is what is checked there.
The PCA file is checked against every record of it: its own pca.json (a local root) and the shards' shards.json.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from rich.progress import Progress

from redi.common.display import progress_bar
from redi.common.errors import UserError
from redi.common.urls import redact
from redi.pipeline.pca import PCA_RECORD, load_stage_pca
from redi.pipeline.pca_file import PCA_FILE, parse_pca
from redi.pipeline.remote import CONCURRENT_REQUESTS, Location, RemotePath, as_location, open_zarr_array, \
    sha256_of
from redi.pipeline.shard_info import read_shard_info, rebuild_hint, shards_pca
from redi.pipeline.shards import KEYS_JSON, ZARR_DIR, tar_relpath, unreadable_chunk
from redi.pipeline.stage import ZARR_METADATA_ERRORS, StageDir, open_array, read_errors, read_keys, read_manifest

# Arrays of each input stage and their number of dimensions (docs/FORMATS.md).
STAGE_ARRAYS = {
    "latents": {"moments": 4, "labels": 1, "valid": 1},
    "features": {"cls": 2, "patch": 3, "labels": 1, "valid": 1},  # cls: only with a global token
}


@dataclass(frozen=True)
class StageCheck:
    """The verdict on one stage of a data root."""

    stage: str  # "latents/", "features/", "pca.safetensors", "shards/"
    status: str  # "ok", "absent" (not built: fine), "warning" (usable, see details) or "FAILED"
    details: str  # what was checked, or what is wrong
    problem: str | None = None  # for FAILED: one sentence naming the bad file


def _check_array_stage(root: Path, deep: bool, bar: Progress, repair: bool = False) -> StageCheck:
    """latents/ or features/: manifest, every chunk committed, errors.jsonl, arrays readable with the right shapes;
    deep: every chunk file against the SHA-256 recorded when it was written (`repair` forgets the damaged chunks)."""
    manifest = read_manifest(root)
    errors = read_errors(root)  # UserError unless the stage finished
    n = len(read_keys(root, "rerun the stage with --force"))
    stage = StageDir(root, math.ceil(n / manifest.params["chunk_size"]))
    if stage.pending():
        raise UserError(f"{root / 'progress' / f'{stage.pending()[0]:06d}.json'} is missing or damaged: that chunk "
                        f"is not committed; rerun the stage (the same command) to write it again.")
    if deep and (damaged := stage.damaged_files()):
        if repair:
            chunks = stage.uncommit(damaged)
            raise UserError(f"{len(damaged)} files of {root} were missing or changed; forgot their {len(chunks)} "
                            f"chunks: rerun the stage (same command) to write them again.")
        raise UserError(f"{root / damaged[0]} is missing or changed since it was written ({len(damaged)} files in all); "
                        f"`redi verify {root.parent} --repair`, then rerunning the stage, rewrites only those chunks.")
    shapes = []
    for name, ndim in STAGE_ARRAYS[root.name].items():
        if name == "cls" and "cls" not in (manifest.params.get("arrays") or {"cls": None}):
            continue  # an encoder without a global token (I-JEPA) has no `cls`
        path = root / "store.zarr" / name
        arr = open_array(path, "rerun the stage with --force")
        if arr.ndim != ndim or arr.shape[0] != n or (name == "moments" and arr.shape[1] != 8):
            raise UserError(f"{path} has shape {arr.shape}; expected {ndim} dimensions and {n} rows (keys.json).")
        if deep:
            task = bar.add_task(f"{root.name}/{name}", total=n)
            rows = (arr.shards or arr.chunks)[0]
            for lo in range(0, n, rows):
                bad = unreadable_chunk(arr, lo, min(n, lo + rows))
                if bad is not None:
                    raise UserError(f"{path / bad[0]} cannot be read ({bad[1]}); rerun the stage with --force.")
                bar.advance(task, min(n, lo + rows) - lo)
        shapes.append(f"{name} {tuple(arr.shape[1:])}")
    return StageCheck(f"{root.name}/", "ok", f"{n} images, {len(errors)} skipped; " + ", ".join(shapes))


def _check_pca(data: Location) -> StageCheck:
    """pca.safetensors is the file its record pca.json names (a local root), the PCA the shards were projected with
    (shards.json), loads, and matches the features' width."""
    path = data / PCA_FILE
    try:
        info = read_shard_info(data / "shards")
    except UserError:  # no shards (yet), or a shards.json that the shards/ row reports
        info = None
    if info is not None:
        raw = shards_pca(info)
        if raw is None:  # only where there is no pca.json either (_guarded reports a local root's as absent)
            return StageCheck(path.name, "warning", f"not published with the shards: runs trained on {data} keep "
                                                    f"no copy of the PCA their PCs come from")
        pca, digest = parse_pca(raw, path), info.pca_sha256
    else:
        if isinstance(data, RemotePath):
            return StageCheck(path.name, "absent", "not checked: the shards/ row says why shards.json is unreadable")
        pca, digest = load_stage_pca(data)
    if isinstance(data, Path) and (patch := data / "features" / "store.zarr" / "patch").exists():
        dim = open_array(patch, "rerun `redi features` with --force").shape[-1]
        if dim != pca.dim:
            raise UserError(f"{path} is {pca.dim}-dimensional but {patch} holds {dim}-dimensional tokens.")
    details = f"{pca.dim} dims, {pca.components.shape[0]} components, {pca.n_images} images, sha256 {digest[:12]}" + \
        ("; the shards' own" if info is not None else "")
    if isinstance(data, Path) and not (data / PCA_RECORD).exists():
        return StageCheck(path.name, "warning", details + f"; no record {PCA_RECORD} of the `redi pca` that made it "
                                                          "(a copy of a published root, or its record was deleted)")
    return StageCheck(path.name, "ok", details)


def _check_files(root: Location, data: Location, files: dict[str, str], deep: bool, bar: Progress) -> None:
    """Every file shards.json lists is there, and with deep=True has its SHA-256 (a URL: a few requests at once)."""
    def check(rel: str) -> None:
        path = root / rel
        try:
            if not deep and not path.is_file():
                raise FileNotFoundError(rel)
            if deep and sha256_of(path) != files[rel]:
                raise UserError(f"{path} does not match its SHA-256 in shards.json (damaged or changed since it was "
                                f"written); {rebuild_hint(data)}.")
        except FileNotFoundError:
            raise UserError(f"{path} is missing; {rebuild_hint(data)}.") from None

    task = bar.add_task("shards/ checksums", total=len(files))
    with ThreadPoolExecutor(CONCURRENT_REQUESTS if isinstance(root, RemotePath) else 1) as pool:
        for _ in pool.map(check, files):  # in order: the first bad file of the listing is the one named
            bar.advance(task)


def _check_shards(root: Location, data: Location, deep: bool, bar: Progress) -> StageCheck:
    """shards/: shards.json present, every listed file present with its SHA-256, counts consistent."""
    info = read_shard_info(root)
    made_here = isinstance(root, Path) and (root / "progress").is_dir()  # a published copy has no stage records
    pending = StageDir(root, info.num_shards).pending() if made_here else []
    if pending:
        raise UserError(f"{root / 'progress' / f'{pending[0]:06d}.json'} is missing or damaged: that shard is not "
                        f"committed; rerun `redi shards` (the same command) to write it again.")
    _check_files(root, data, info.files, deep, bar)
    keys = read_keys(root, rebuild_hint(data))
    if len(keys) != info.num_samples:
        raise UserError(f"{root / KEYS_JSON} lists {len(keys)} keys where shards.json says {info.num_samples} samples.")
    if "wds" in info.formats:
        absent = [tar_relpath(b) for b in range(info.num_shards) if tar_relpath(b) not in info.files]
        if absent:
            raise UserError(f"shards.json lists no checksum for {root / absent[0]}; rebuild the shards.")
    if "zarr" in info.formats:
        for name in info.fields:
            try:
                arr = open_zarr_array(root / ZARR_DIR / name)
            except ZARR_METADATA_ERRORS:
                raise UserError(f"{root / ZARR_DIR / name} is missing or its zarr.json is damaged; {rebuild_hint(data)}.") \
                    from None
            if arr.shape != (info.num_samples, *info.fields[name].shape):
                raise UserError(f"{root / ZARR_DIR / name} has shape {arr.shape}, not the "
                                f"{(info.num_samples, *info.fields[name].shape)} of shards.json.")
    details = (f"{info.num_samples} samples in {info.num_shards} shards ({', '.join(info.formats)}), K={info.pcs}, "
               f"{len(info.files)} files {'hashed' if deep else 'present'}")
    return StageCheck("shards/", "ok", details)


def _guarded(stage: str, path: Location, check: Callable[[], StageCheck]) -> StageCheck:
    """Run one stage's check: absent when its local output is not there, FAILED with the sentence on a UserError."""
    if isinstance(path, Path) and not path.exists():
        return StageCheck(stage, "absent", "not built")
    try:
        return check()
    except UserError as e:
        return StageCheck(stage, "FAILED", str(e), str(e))
    except (OSError, ValueError, KeyError) as e:  # unreadable JSON, metadata or files
        sentence = f"{path} cannot be read ({type(e).__name__}: {redact(str(e))})."
        return StageCheck(stage, "FAILED", sentence, sentence)


def verify_data(data: Location | str, *, deep: bool = True, progress: bool = True,
                repair: bool = False) -> list[StageCheck]:
    """Check every stage present under `data`; deep=True also hashes and decodes every input chunk and hashes every
    shard file; repair=True un-commits damaged input chunks so that rerunning their stage rewrites them."""
    data = as_location(data)
    if isinstance(data, RemotePath):
        if repair:
            raise UserError("--repair rewrites input stages, which live on a local data root, not at a URL.")
        with progress_bar(None, transient=True, enabled=progress) as bar:
            return [_guarded("shards/", data / "shards", lambda: _check_shards(data / "shards", data, deep, bar)),
                    _guarded(PCA_FILE, data / PCA_FILE, lambda: _check_pca(data))]
    if not data.is_dir():
        raise UserError(f"{data} is not a directory: pass a data root (the --data of the stages).")
    with progress_bar(None, transient=True, enabled=progress) as bar:
        checks = [
            *(_guarded(f"{name}/", data / name, lambda name=name: _check_array_stage(data / name, deep, bar, repair))
              for name in STAGE_ARRAYS),
            _guarded(PCA_FILE, data / (PCA_FILE if (data / PCA_FILE).exists() else PCA_RECORD), lambda: _check_pca(data)),
            _guarded("shards/", data / "shards", lambda: _check_shards(data / "shards", data, deep, bar)),
        ]
    if all(c.status == "absent" for c in checks):
        raise UserError(f"{data} holds no stage output (latents/, features/, pca.safetensors, shards/) to verify.")
    return _same_images(data, checks)


def _same_images(data: Path, checks: list[StageCheck]) -> list[StageCheck]:
    """latents/ and features/ must come from the same image source, or no shards can join them."""
    lat, feat = checks[0], checks[1]
    if lat.status != "ok" or feat.status != "ok":
        return checks
    if read_manifest(data / "latents").source != read_manifest(data / "features").source:
        feat = StageCheck(feat.stage, "warning", feat.details + "; made from other images than latents/ "
                          "(rerun one of the two stages on the other's source)")
    return [lat, feat, *checks[2:]]
