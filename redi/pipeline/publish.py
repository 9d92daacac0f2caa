"""`redi publish`: copy finished shards, and the PCA they were projected with, to a bucket or any fsspec URL.

DEST gets the layout of a data root, `DEST/shards/…` and `DEST/pca.safetensors`, so `redi train --shards DEST`
and `redi verify DEST` take it as they take a local root. Each file is read once, checked against its SHA-256
in shards.json and uploaded from that same memory, so what lands in DEST is what `redi shards` wrote.
`shards.json` goes last, as `redi shards` writes it last: its presence at DEST means the copy is complete, and
a publish that replaces other shards deletes DEST's shards.json first.
"""
from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path


from redi.common.display import progress_bar
from redi.common.errors import UserError
from redi.pipeline.pca import PCA_RECORD, load_stage_pca
from redi.pipeline.pca_file import PCA_FILE
from redi.pipeline.shard_info import read_shard_info
from redi.pipeline.remote import CONCURRENT_REQUESTS, Location, RemotePath, as_location, read_if_exists, write_file
from redi.pipeline.shards import SHARDS_JSON


@dataclass(frozen=True)
class PublishResult:
    """What a publish did."""

    dest: Location  # the data root written (DEST)
    up_to_date: bool  # DEST already held these shards: nothing was copied
    files: int  # files copied, shards.json and the PCA included
    bytes: int
    seconds: float
    pca: bool  # pca.safetensors went too (it is the one the shards were projected with)


def _copy(source: Path, target: Location, digest: str | None) -> int:
    """Copy one file, refusing one whose bytes no longer match `digest`; returns its size."""
    data = source.read_bytes()
    if digest is not None and hashlib.sha256(data).hexdigest() != digest:
        raise UserError(f"{source} does not match its SHA-256 in shards.json (damaged or changed since it was "
                        f"written): run `redi verify` on its data root and rebuild before publishing.")
    write_file(target, data)
    return len(data)


def publish_shards(data: Path, dest: str, *, progress: bool = True) -> PublishResult:
    """Copy `data`/shards (every file shards.json lists, then shards.json) and `data`/pca.safetensors to `dest`."""
    t0 = time.perf_counter()
    data, target = Path(data), as_location(dest)
    info = read_shard_info(data / "shards")
    listing = (data / "shards" / SHARDS_JSON).read_bytes()
    out = target / "shards"
    if read_if_exists(out / SHARDS_JSON) == listing:
        return PublishResult(target, True, 0, 0, time.perf_counter() - t0, False)
    if isinstance(target, RemotePath):
        target.mkdir()  # a bucket that does not exist yet is made (when the credentials allow it)
    (out / SHARDS_JSON).unlink(missing_ok=True)  # other shards were there: incomplete until the new listing lands
    jobs = [(info.root / rel, out / rel, digest) for rel, digest in sorted(info.files.items())]
    if (data / PCA_FILE).exists() and (data / PCA_RECORD).exists():
        load_stage_pca(data)  # a PCA changed since `redi pca` wrote it is refused, never published
    pca = read_if_exists(data / PCA_FILE)
    with_pca = pca is not None and hashlib.sha256(pca).hexdigest() == info.pca_sha256  # not a PCA fitted since
    if with_pca:
        jobs.append((data / PCA_FILE, target / PCA_FILE, info.pca_sha256))  # a run directory keeps a copy
    bar = progress_bar(None, transient=True, enabled=progress)
    copied = 0
    with bar, ThreadPoolExecutor(CONCURRENT_REQUESTS if isinstance(target, RemotePath) else 1) as pool:
        task = bar.add_task(f"publish → {target}", total=len(jobs) + 1)
        for size in pool.map(lambda job: _copy(*job), jobs):
            copied += size
            bar.advance(task)
        write_file(out / SHARDS_JSON, listing)  # last: its presence means the copy is complete
    return PublishResult(target, False, len(jobs) + 1, copied + len(listing), time.perf_counter() - t0, with_pca)
