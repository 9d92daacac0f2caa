"""Shard readers: same samples and order from Zarr and WebDataset, rank × worker split, epochs, resume, corruption."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from redi.benchmarks import loader as loader_bench
from redi.benchmarks.loader import make_stage_inputs
from redi.common.errors import UserError
from redi.pipeline.readers import StreamPlan, make_loader
from redi.pipeline.shard_info import read_shard_info
from redi.pipeline.shards import ShardsConfig, build_shards

N, H, GRID, DIM, K, S = 211, 4, 2, 16, 4, 16  # images, latent side, patch grid side, width, PCs, shard size
B = 10  # batch size


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("readers")
    make_stage_inputs(data, N, latent_side=H, grid=GRID, dim=DIM, invalid_features=(7,))
    build_shards(data, ShardsConfig(formats=("zarr", "wds"), pcs=K, shard_size=S, device="cpu"), progress=False)
    return data / "shards"


def take(loader, n: int) -> list[dict]:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def indices(batches: list[dict]) -> list[int]:
    return torch.cat([b["index"] for b in batches]).tolist()


def read_keys(shards: Path) -> list[str]:
    return json.loads((shards / "keys.json").read_text())


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys() and x["key"] == y["key"]
        for name in x:
            if name != "key":
                assert torch.equal(x[name], y[name]), name


def test_info_and_batch_contents(shards: Path) -> None:
    info = read_shard_info(shards)
    assert (info.num_samples, info.pcs, info.grid, info.feature_dim) == (N - 1, K, GRID, DIM)
    assert info.latent_shape == (4, H, H)
    assert not info.has_patch_tokens and info.num_classes == 5
    assert info.latent_norm.record() == {"kind": "config", "shift": [0.0] * 4, "scale": [0.18215] * 4}  # SD-VAE's config
    assert info.latent_space.downsampling == 8 and info.patch_size == 2
    batch = next(iter(make_loader(shards, batch_size=B, seed=3)))
    assert batch["moments"].shape == (B, 8, H, H) and batch["moments"].dtype == torch.float16
    assert batch["pcs"].shape == (B, K, GRID, GRID) and batch["pcs"].dtype == torch.float16
    assert batch["cls"].shape == (B, DIM) and batch["label"].dtype == torch.int64
    assert batch["index"].dtype == torch.int64
    store = {name: zarr.open_array(shards / "samples.zarr" / name, mode="r")[:] for name in ("moments", "pcs", "label")}
    keys = read_keys(shards)
    idx = batch["index"].numpy()
    np.testing.assert_array_equal(batch["moments"].numpy(), store["moments"][idx])
    np.testing.assert_array_equal(batch["pcs"].numpy(), store["pcs"][idx])
    np.testing.assert_array_equal(batch["label"].numpy(), store["label"][idx])
    assert batch["key"] == [keys[i] for i in idx]
    with pytest.raises(UserError, match="patch_tokens"):
        make_loader(shards, batch_size=B, fields=("moments", "patch_tokens"))


def test_zarr_and_webdataset_yield_identical_batches(shards: Path) -> None:
    for rank in range(2):
        args = dict(batch_size=B, seed=5, rank=rank, world_size=2, epochs=2, drop_last=False)
        zarr_batches = list(make_loader(shards, format="zarr", **args))
        wds_batches = list(make_loader(shards, format="wds", **args))
        assert_same_batches(zarr_batches, wds_batches)


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_two_ranks_two_workers_see_every_sample_once_per_epoch(shards: Path, fmt: str) -> None:
    per_rank = []
    for rank in range(2):
        loader = make_loader(shards, batch_size=B, seed=1, rank=rank, world_size=2, epochs=1, drop_last=False,
                             format=fmt, num_workers=2, window_blocks=2)
        got = indices(list(loader))
        assert len(got) == loader.samples_per_epoch and loader.cursor == len(got)
        single = make_loader(shards, batch_size=B, seed=1, rank=rank, world_size=2, epochs=1, drop_last=False,
                             format=fmt, num_workers=0, window_blocks=2)
        assert indices(list(single)) == got, "the order does not depend on num_workers"
        per_rank.append(got)
    everything = per_rank[0] + per_rank[1]
    assert sorted(everything) == list(range(N - 1))


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_window_batch_is_bitwise_the_concatenated_window_gathered_in_shuffled_order(shards: Path, fmt: str) -> None:
    """read_window scatters each segment into its rows; the batch must equal the plain concatenate-then-gather."""
    dataset = make_loader(shards, batch_size=B, seed=6, rank=1, world_size=2, format=fmt, window_blocks=3).dataset
    windows = dataset.plan.windows(1)
    assert any(len(w.segments) > 1 for w in windows) and any(s.stop - s.start < S for w in windows for s in w.segments)
    for window in windows:
        parts = [dataset.read_segment(s) for s in window.segments]
        for skip in (0, 1, window.size - 1):
            order = dataset.plan.shuffle(window)[skip:]  # (n,)
            batch = dataset.read_window(window, skip)
            for name in dataset.fields:
                expected = np.concatenate([p[name] for p in parts])[order]
                got = batch[name].numpy()
                assert (got.dtype, got.shape, got.tobytes()) == (expected.dtype, expected.shape, expected.tobytes())
            expected_index = np.concatenate([np.arange(s.start, s.stop) for s in window.segments])[order]
            np.testing.assert_array_equal(batch["index"].numpy(), expected_index)


def test_plan_covers_each_epoch_for_many_world_sizes() -> None:
    for world in (1, 2, 3, 8):
        for epoch in (0, 1):
            seen: list[int] = []
            for rank in range(world):
                plan = StreamPlan(N - 1, S, seed=0, rank=rank, world_size=world, window_blocks=3)
                windows = plan.windows(epoch)
                seen += [i for w in windows for s in w.segments for i in range(s.start, s.stop)]
                assert sum(w.size for w in windows) == plan.epoch_size
            assert sorted(seen) == list(range(N - 1))


def test_new_epoch_reorders_and_stream_continues_across_epochs(shards: Path) -> None:
    loader = make_loader(shards, batch_size=B, seed=2)
    per_epoch = loader.samples_per_epoch
    got = indices(take(loader, 3 * per_epoch // B + 1))
    first, second = got[:per_epoch], got[per_epoch:2 * per_epoch]
    assert sorted(first) == sorted(second) == list(range(N - 1))
    assert first != second
    assert indices(take(make_loader(shards, batch_size=B, seed=3), 4)) != got[:4 * B]


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_resume_from_cursor_continues_the_same_batches(shards: Path, fmt: str) -> None:
    full = take(make_loader(shards, batch_size=B, seed=4, format=fmt), 30)  # crosses the first epoch boundary
    for step in (5, 21, 29):
        resumed = make_loader(shards, batch_size=B, seed=4, format=fmt, cursor=step * B)
        assert_same_batches(take(resumed, 30 - step), full[step:])
    loader = make_loader(shards, batch_size=B, seed=4, format=fmt)
    take(loader, 7)
    assert loader.cursor == 7 * B
    loader.set_cursor(12 * B)
    assert_same_batches(take(loader, 3), full[12:15])


def test_corrupted_tar_is_named_by_the_reader(shards: Path, tmp_path: Path) -> None:
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    tar = copy / "wds" / "shard-000003.tar"
    raw = bytearray(tar.read_bytes())
    raw[3000] ^= 0x01
    tar.write_bytes(bytes(raw))
    for workers in (0, 2):
        with pytest.raises(UserError, match=r"shard-000003\.tar is corrupted") as err:
            list(make_loader(copy, batch_size=B, format="wds", epochs=1, num_workers=workers))
        assert "Traceback" not in str(err.value)
    tar.write_bytes(bytes(raw[:len(raw) // 2]))  # truncated: caught by the tar parser even without checksums
    with pytest.raises(UserError, match=r"shard-000003\.tar"):
        list(make_loader(copy, batch_size=B, format="wds", epochs=1, verify=False))


def test_damaged_or_missing_zarr_chunk_is_named_by_the_reader(shards: Path, tmp_path: Path) -> None:
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    chunk = copy / "samples.zarr" / "pcs" / "c" / "4" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-7])
    with pytest.raises(UserError, match=f"{chunk} is damaged"):
        list(make_loader(copy, batch_size=B, epochs=1))
    chunk.unlink()
    with pytest.raises(UserError, match=f"{chunk} is missing"):
        list(make_loader(copy, batch_size=B, epochs=1, num_workers=2))


def test_loader_benchmark_quick_reports_throughputs() -> None:
    figures = loader_bench.run(quick=True)
    for name in ("zarr_samples_per_s", "wds_samples_per_s", "public_layout_samples_per_s", "zarr_vs_public"):
        assert isinstance(figures[name], float) and figures[name] > 0
