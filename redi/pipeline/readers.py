"""Readers of the shards for the trainer: one sample order, two storage formats (Zarr and WebDataset).

The order of one epoch is a function of (seed, epoch, world_size) only:
1. the blocks of S samples are permuted with rng(seed, epoch), giving a sequence of all M samples;
2. rank r takes the contiguous part [r·M//W, (r+1)·M//W) of it (parts differ by at most one
   sample; a block on a boundary is shared by two ranks);
3. that part is cut into windows of `window_blocks` block segments, and each window's samples
   are shuffled with rng(seed, epoch, world_size, rank, window).
Blocks are read whole and contiguously (fast) and shuffled in memory; the write-time shuffle of
the `shards` stage makes every block a mix of classes. A rank's stream is epoch 0, epoch 1, …
concatenated and batches are cut from it, so a batch may span two epochs and every rank yields
batches forever (no DDP rank runs out first). The cursor counts the samples of the stream
already returned: step × batch_size on every rank, the one number a checkpoint keeps; resuming
from it continues the uninterrupted order exactly (for the same seed and world size).
DataLoader workers read whole windows round-robin and the loader receives them in stream
order, so the samples and their order do not depend on num_workers, nor on the format.

The shards may be local or behind any fsspec URL (pipeline/remote.py): the WebDataset reader fetches
each tar whole (one request per tar) with `read_ahead` tars downloading ahead of the one it decodes,
and the Zarr reader reads a remote store through zarr's FsspecStore (one request per chunk).
"""
from __future__ import annotations

import hashlib
import io
import itertools
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from redi.common.errors import UserError
from redi.common.runtime import loader_worker_init
from redi.pipeline.remote import Location, MissingChunk, open_zarr_array, read_ahead
from redi.pipeline.shard_info import ShardInfo, read_shard_info, rebuild_hint
from redi.pipeline.shards import DATA_FIELDS, ZARR_DIR, decode_key, tar_relpath, unreadable_chunk
from redi.pipeline.stage import ZARR_METADATA_ERRORS, read_keys

DEFAULT_FIELDS = ("moments", "pcs", "cls")
Batch = dict[str, Any]  # {"moments", "pcs", "cls", ["patch_tokens"]: tensors; "label", "index": int64; "key": list}
_TAR_BLOCK = 512
_ZERO_BLOCK = bytes(_TAR_BLOCK)


@dataclass(frozen=True)
class Segment:
    """Shard samples [start, stop) of block `block`."""

    block: int
    start: int
    stop: int


@dataclass(frozen=True)
class Window:
    """The unit of reading and shuffling: consecutive segments of one rank's epoch."""

    epoch: int
    ordinal: int  # position among the rank's windows of this epoch
    segments: tuple[Segment, ...]

    @property
    def size(self) -> int:
        return sum(s.stop - s.start for s in self.segments)


@dataclass(frozen=True)
class StreamPlan:
    """The sample order of one rank (see the module docstring)."""

    num_samples: int  # M
    shard_size: int  # S
    seed: int
    rank: int
    world_size: int
    window_blocks: int  # block segments shuffled together

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise UserError(f"Rank {self.rank} is outside a world of {self.world_size} processes.")
        if self.window_blocks < 1:
            raise UserError(f"window_blocks must be at least 1, not {self.window_blocks}.")
        if self.epoch_size == 0:
            raise UserError(f"{self.num_samples} samples cannot feed {self.world_size} ranks.")

    @property
    def part(self) -> tuple[int, int]:
        """This rank's [lo, hi) of the epoch's block-permuted sample sequence."""
        return self.rank * self.num_samples // self.world_size, (self.rank + 1) * self.num_samples // self.world_size

    @property
    def epoch_size(self) -> int:
        lo, hi = self.part
        return hi - lo

    def windows(self, epoch: int) -> list[Window]:
        """This rank's windows of `epoch`, in stream order."""
        lo, hi = self.part
        segments: list[Segment] = []
        pos = 0  # position of the current block in the permuted sequence
        num_blocks = math.ceil(self.num_samples / self.shard_size)
        for block in np.random.default_rng([self.seed, epoch]).permutation(num_blocks):
            start, stop = int(block) * self.shard_size, min((int(block) + 1) * self.shard_size, self.num_samples)
            a, z = max(lo, pos), min(hi, pos + stop - start)
            if a < z:
                segments.append(Segment(int(block), start + a - pos, start + z - pos))
            pos += stop - start
            if pos >= hi:
                break
        wb = self.window_blocks
        return [Window(epoch, i, tuple(segments[j:j + wb])) for i, j in enumerate(range(0, len(segments), wb))]

    def shuffle(self, window: Window) -> np.ndarray:
        """(n,) the within-window permutation of `window`'s samples."""
        rng = np.random.default_rng([self.seed, window.epoch, self.world_size, self.rank, window.ordinal])
        return rng.permutation(window.size)

    def stream(self, cursor: int, epochs: int | None) -> Iterator[tuple[Window, int]]:
        """(window, samples of it to skip) from `cursor` on, through epoch `epochs` - 1 (None: forever)."""
        first_epoch, offset = divmod(cursor, self.epoch_size)
        for epoch in itertools.count(first_epoch):
            if epochs is not None and epoch >= epochs:
                return
            for window in self.windows(epoch):
                if offset >= window.size:
                    offset -= window.size
                    continue
                yield window, offset
                offset = 0


class ShardDataset(IterableDataset, ABC):
    """One rank's stream of shuffled windows, each a batch dict; DataLoader workers take windows round-robin."""

    format = ""  # the shards.json format this reader needs

    def __init__(self, shards_dir: Location | str, *, fields: tuple[str, ...] = DEFAULT_FIELDS, rank: int = 0,
                 world_size: int = 1, seed: int = 0, cursor: int = 0, epochs: int | None = None,
                 window_blocks: int = 4, verify: bool = True, read_ahead: int = 2):
        self.info = read_shard_info(shards_dir)
        if self.format not in self.info.formats:
            raise UserError(f"{self.info.root} has no {self.format} shards (it holds {', '.join(self.info.formats)}); "
                            f"rerun `redi shards --format {self.format}` or read the other format.")
        unknown = [f for f in fields if f not in DATA_FIELDS]
        if unknown:
            raise UserError(f"Unknown shard field(s) {', '.join(unknown)}; choose from {', '.join(DATA_FIELDS)}.")
        missing = [f for f in fields if f not in self.info.fields]
        if missing:
            raise UserError(f"{self.info.root} holds no {', '.join(missing)}; "
                            f"rerun `redi shards --patch-tokens --force`.")
        self.fields = ("label", *fields)
        self.plan = StreamPlan(self.info.num_samples, self.info.shard_size, seed, rank, world_size, window_blocks)
        self.cursor = cursor  # first sample of the stream to yield
        self.epochs = epochs
        self.verify = verify  # WebDataset: check each tar's SHA-256 (zarr chunks always carry a CRC-32C)
        self.read_ahead = read_ahead  # WebDataset: tars downloading ahead of the one being decoded, per process
        self.rebuild = rebuild_hint(self.info.root.parent)  # the end of every sentence about damaged shards
        self.keys = read_keys(self.info.root, self.rebuild)

    @abstractmethod
    def read_segment(self, segment: Segment) -> dict[str, np.ndarray]:
        """Arrays of `self.fields` for shard samples [segment.start, segment.stop), in sample order."""

    def read_window(self, window: Window, skip: int = 0) -> Batch:
        """The shuffled samples of `window`, without its first `skip` (after shuffling), as a batch dict.

        Each segment is scattered straight into its shuffled rows of a preallocated batch: one copy per
        sample, and only one segment in memory besides the batch, however many blocks a window holds.
        """
        order = self.plan.shuffle(window)[skip:]  # (n,) window position of each batch row
        rows = np.full(window.size, -1, dtype=np.int64)  # (window.size,) batch row of each window position; -1: skipped
        rows[order] = np.arange(len(order))
        arrays: dict[str, np.ndarray] = {}
        offset = 0
        for segment in window.segments:
            seg_rows = rows[offset:offset + segment.stop - segment.start]  # (m,)
            offset += segment.stop - segment.start
            kept = slice(None) if skip == 0 else seg_rows >= 0  # a view, not a copy, when nothing is skipped
            for name, values in self.read_segment(segment).items():  # (m, ...) each
                if name not in arrays:
                    arrays[name] = np.empty((len(order), *values.shape[1:]), values.dtype)  # (n, ...)
                arrays[name][seg_rows[kept]] = values[kept]
        index = np.concatenate([np.arange(s.start, s.stop) for s in window.segments])[order]
        batch: Batch = {name: torch.from_numpy(arrays[name]) for name in self.fields}
        batch["index"] = torch.from_numpy(index)
        batch["key"] = [self.keys[i] for i in index]
        return batch

    def windows(self) -> Iterator[tuple[Window, int]]:
        """This process's (window, samples to skip) in stream order: DataLoader workers take windows round-robin."""
        worker = get_worker_info()
        wid, workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        return itertools.islice(self.plan.stream(self.cursor, self.epochs), wid, None, workers)

    def __iter__(self) -> Iterator[Batch]:
        for window, skip in self.windows():
            yield self.read_window(window, skip)


class ZarrShardDataset(ShardDataset):
    """Reads `samples.zarr` (random access over contiguous ranges; best on a local disk)."""

    format = "zarr"

    def __init__(self, shards_dir: Location | str, **kwargs: Any):
        super().__init__(shards_dir, **kwargs)
        self._arrays: dict[str, zarr.Array] = {}  # opened lazily, once per process

    def _array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            path = self.info.root / ZARR_DIR / name
            try:
                self._arrays[name] = open_zarr_array(path)
            except ZARR_METADATA_ERRORS as e:
                raise UserError(f"{path} cannot be opened ({e}); run `redi verify` on the data root.") from None
        return self._arrays[name]

    def read_segment(self, segment: Segment) -> dict[str, np.ndarray]:
        out = {}
        for name in self.fields:
            arr = self._array(name)
            try:
                out[name] = arr[segment.start:segment.stop]
            except MissingChunk as e:  # zarr alone would return the fill value
                raise UserError(f"{self.info.root / ZARR_DIR / name / e.key} is missing; {self.rebuild}.") from None
            except UserError:  # the store gave up on a transient network error
                raise
            except Exception:  # the CRC-32C codec or the decoder rejected a chunk: find which one
                raise UserError(self._damage(arr, name, segment)) from None
        return out

    def _damage(self, arr: zarr.Array, name: str, segment: Segment) -> str:
        """One sentence naming the first unreadable chunk file of `segment`."""
        bad = unreadable_chunk(arr, segment.start, segment.stop)
        if bad is None:
            return f"{self.info.root / ZARR_DIR / name} cannot be read for samples {segment.start}–{segment.stop}."
        path = self.info.root / ZARR_DIR / name / bad[0]
        return f"{path} is damaged ({bad[1]}); {self.rebuild}."


def _ustar_name(header: bytes) -> str:
    name = header[0:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0]
    return (prefix + b"/" + name if prefix else name).decode()


def _pax_path(body: bytes) -> str | None:
    """The `path` record of a pax extended header, if any."""
    path = None
    while body:
        length = int(body[:body.index(b" ")])
        key, _, value = body[body.index(b" ") + 1:length - 1].partition(b"=")
        if key == b"path":
            path = value.decode()
        body = body[length:]
    return path


def tar_members(data: bytes, path: Location, rebuild: str) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of each regular file of an in-memory tar (ustar, pax and GNU long names); `rebuild`
    ends the sentence that refuses a damaged one.

    Kept hand-written: about 10× faster than `tarfile` at listing a shard (`redi bench loader`: tar_listing_vs_tarfile,
    6–12× over runs on the busy 2-core CPU machine of docs/BENCHMARKS.md)."""
    pos, long_name = 0, None
    while pos + _TAR_BLOCK <= len(data):
        header = data[pos:pos + _TAR_BLOCK]
        if header == _ZERO_BLOCK:
            return
        try:
            size = int(header[124:136].rstrip(b"\0 ").decode() or "0", 8)
            kind, start = header[156:157], pos + _TAR_BLOCK
            if start + size > len(data):
                raise ValueError(f"member at byte {pos} runs past the end")
            body = data[start:start + size] if kind in (b"x", b"L") else b""
            if kind == b"x":
                long_name = _pax_path(body) or long_name
            elif kind == b"L":
                long_name = body.rstrip(b"\0").decode()
            elif kind in (b"0", b"\0"):
                yield long_name or _ustar_name(header), start, size
                long_name = None
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not a readable tar ({e}); {rebuild}.") from None
        pos = start + -(-size // _TAR_BLOCK) * _TAR_BLOCK
    raise UserError(f"{path} is truncated (no end-of-archive block); {rebuild}.")


class _NpyDecoder:
    """Decodes `.npy` members without copying, parsing each distinct header once: about 30× faster than `np.load`
    of each member (`redi bench loader`: npy_decoding_vs_np_load, 25–35× over runs on the same machine)."""

    def __init__(self) -> None:
        self._headers: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}

    def __call__(self, data: bytes, offset: int, size: int) -> np.ndarray:
        length_bytes = 2 if data[offset + 6] == 1 else 4  # format 1.0 has a 2-byte header length, 2.0/3.0 4 bytes
        total = 8 + length_bytes + int.from_bytes(data[offset + 8:offset + 8 + length_bytes], "little")
        header = data[offset:offset + total]
        spec = self._headers.get(header)
        if spec is None:
            f = io.BytesIO(header)
            read_header = np.lib.format.read_array_header_1_0 if np.lib.format.read_magic(f) == (1, 0) \
                else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            assert not fortran, "the shards stage writes C-order arrays"
            spec = self._headers[header] = (dtype, shape, int(np.prod(shape, dtype=np.int64)))
        dtype, shape, count = spec
        if total + count * dtype.itemsize > size:
            raise ValueError("a .npy member is shorter than its header says")
        return np.frombuffer(data, dtype, count, offset + total).reshape(shape)


class WdsShardDataset(ShardDataset):
    """Reads the WebDataset tars whole, `read_ahead` of them downloading ahead (many nodes, object stores);
    checks each tar's SHA-256."""

    format = "wds"

    def __init__(self, shards_dir: Location | str, **kwargs: Any):
        super().__init__(shards_dir, **kwargs)
        self._decode = _NpyDecoder()
        self._tars: Iterator[tuple[int, Location, bytes]] | None = None  # the read-ahead, while iterating

    def __iter__(self) -> Iterator[Batch]:
        windows, ahead = itertools.tee(self.windows())
        blocks = (segment.block for window, _ in ahead for segment in window.segments)  # the tars in reading order
        self._tars = read_ahead(self._tar, blocks, self.read_ahead)
        try:
            for window, skip in windows:
                yield self.read_window(window, skip)
        finally:
            self._tars.close()
            self._tars = None

    def _tar(self, block: int) -> tuple[int, Location, bytes]:
        """(block, path, bytes) of one tar, fetched whole (one request) and checked against its SHA-256."""
        rel = tar_relpath(block)
        path = self.info.root / rel
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise UserError(f"{path} is missing; {self.rebuild}.") from None
        if self.verify and hashlib.sha256(data).hexdigest() != self.info.files.get(rel):
            raise UserError(f"{path} is corrupted (its SHA-256 differs from shards.json); {self.rebuild}.")
        return block, path, data

    def read_segment(self, segment: Segment) -> dict[str, np.ndarray]:
        block, path, data = self._tar(segment.block) if self._tars is None else next(self._tars)
        assert block == segment.block, f"read-ahead out of step: tar {block} for a segment of tar {segment.block}"
        samples: list[tuple[str, dict[str, tuple[int, int]]]] = []  # (encoded key, {field: (offset, size)})
        for name, offset, size in tar_members(data, path, self.rebuild):
            base, _, rest = name.partition(".")
            field = "label" if rest == "label.cls" else rest.removesuffix(".npy")
            if not samples or samples[-1][0] != base:
                samples.append((base, {}))
            samples[-1][1][field] = (offset, size)
        block_start, block_stop = segment.block * self.info.shard_size, \
            min((segment.block + 1) * self.info.shard_size, self.info.num_samples)
        if len(samples) != block_stop - block_start:
            raise UserError(f"{path} holds {len(samples)} samples where shards.json says {block_stop - block_start}; "
                            f"{self.rebuild}.")
        n = segment.stop - segment.start
        out = {name: np.empty((n, *self.info.fields[name].shape), self.info.fields[name].dtype) for name in self.fields}
        for i in range(n):
            base, members = samples[segment.start - block_start + i]
            if decode_key(base) != self.keys[segment.start + i] or any(f not in members for f in self.fields):
                raise UserError(f"{path} does not hold sample {segment.start + i} ({self.keys[segment.start + i]}) "
                                f"with every field where keys.json says; {self.rebuild}.")
            for name in self.fields:
                offset, size = members[name]
                try:
                    is_label = name == "label"
                    out[name][i] = int(data[offset:offset + size]) if is_label else self._decode(data, offset, size)
                except ValueError as e:
                    raise UserError(f"{path} holds a damaged member for {base} ({e}).") from None
        return out


class _ErrorsAsItems(IterableDataset):
    """Passes a worker's UserError to the main process as an item, so it stays one clear sentence."""

    def __init__(self, dataset: ShardDataset):
        self.dataset = dataset

    def __iter__(self) -> Iterator[Batch]:
        try:
            yield from self.dataset
        except UserError as e:
            yield {"error": str(e)}


def _identity(item: Batch) -> Batch:
    return item


def _slice(batch: Batch, lo: int, hi: int) -> Batch:
    return {name: value[lo:hi] for name, value in batch.items()}


def _concat(parts: list[Batch]) -> Batch:
    return {name: [k for p in parts for k in p[name]] if name == "key" else torch.cat([p[name] for p in parts])
            for name in parts[0]}


class ShardLoader:
    """Batches of one rank's sample stream, with a cursor (samples returned so far) to save and to resume from."""

    def __init__(self, dataset: ShardDataset, *, batch_size: int, num_workers: int = 0, drop_last: bool = True,
                 pin_memory: bool = False):
        if batch_size < 1 or num_workers < 0:
            raise UserError(f"batch_size must be ≥ 1 and num_workers ≥ 0 (got {batch_size} and {num_workers}).")
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.drop_last = drop_last  # with a finite number of epochs: drop the last, smaller batch
        self.pin_memory = pin_memory and torch.cuda.is_available()  # page-locked windows: async .to("cuda")
        self._cursor = dataset.cursor

    @property
    def info(self) -> ShardInfo:
        return self.dataset.info

    @property
    def cursor(self) -> int:
        """Samples of this rank's stream returned so far (step × batch_size): save it in the checkpoint."""
        return self._cursor

    def set_cursor(self, cursor: int) -> None:
        """Resume from `cursor` at the next `iter()`: the same batches as the uninterrupted run."""
        self._cursor = cursor

    @property
    def samples_per_epoch(self) -> int:
        """Samples this rank sees per epoch (all ranks together: every sample once)."""
        return self.dataset.plan.epoch_size

    def _windows(self) -> Iterator[Batch]:
        if self.num_workers == 0:
            for window in self.dataset:
                yield {k: v.pin_memory() if self.pin_memory and k != "key" else v for k, v in window.items()}
            return
        loader = DataLoader(_ErrorsAsItems(self.dataset), batch_size=None, num_workers=self.num_workers,
                            collate_fn=_identity, prefetch_factor=2, pin_memory=self.pin_memory,
                            worker_init_fn=loader_worker_init)
        for window in loader:
            if "error" in window:
                raise UserError(window["error"])
            yield window

    def __iter__(self) -> Iterator[Batch]:
        self.dataset.cursor = self._cursor
        pieces: list[Batch] = []  # windows (or their rests) not yet returned, in stream order
        have = 0
        for window in self._windows():
            pieces.append(window)
            have += len(window["index"])
            while have >= self.batch_size:
                have -= self.batch_size
                self._cursor += self.batch_size
                yield self._take(pieces, self.batch_size)
        if have and not self.drop_last:
            self._cursor += have
            yield self._take(pieces, have)

    @staticmethod
    def _take(pieces: list[Batch], n: int) -> Batch:
        """Remove the first `n` samples from `pieces` and return them as one batch."""
        out: list[Batch] = []
        while n:
            size = len(pieces[0]["index"])
            k = min(n, size)
            out.append(_slice(pieces[0], 0, k))
            if k == size:
                pieces.pop(0)
            else:
                pieces[0] = _slice(pieces[0], k, size)
            n -= k
        return out[0] if len(out) == 1 else _concat(out)


def read_first(shards_dir: Location | str, num: int, fields: tuple[str, ...]) -> tuple[ShardInfo, list[str], dict[str, np.ndarray]]:
    """The shards' first `num` samples (shuffled at write time, so varied), in order: their info, keys and arrays of
    `fields` (and "label"), from the Zarr store if there is one, else the tars."""
    info = read_shard_info(shards_dir)
    n, size = min(num, info.num_samples), info.shard_size
    reader = (ZarrShardDataset if "zarr" in info.formats else WdsShardDataset)(shards_dir, fields=fields)
    parts = [reader.read_segment(Segment(b, b * size, min((b + 1) * size, n))) for b in range(-(-n // size))]
    return info, reader.keys[:n], {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def make_loader(shards_dir: Location | str, *, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                cursor: int = 0, epochs: int | None = None, fields: tuple[str, ...] = DEFAULT_FIELDS,
                format: str = "zarr", num_workers: int = 0, drop_last: bool = True, window_blocks: int = 4,
                verify: bool = True, pin_memory: bool = False, read_ahead: int = 2) -> ShardLoader:
    """A loader of rank `rank`'s batches, from sample `cursor` of its stream on (epochs=None: forever)."""
    readers = {"zarr": ZarrShardDataset, "wds": WdsShardDataset}
    if format not in readers:
        raise UserError(f"Unknown shard format '{format}'; use zarr or wds.")
    dataset = readers[format](shards_dir, fields=tuple(fields), rank=rank, world_size=world_size, seed=seed,
                              cursor=cursor, epochs=epochs, window_blocks=window_blocks, verify=verify,
                              read_ahead=read_ahead)
    return ShardLoader(dataset, batch_size=batch_size, num_workers=num_workers, drop_last=drop_last,
                       pin_memory=pin_memory)
