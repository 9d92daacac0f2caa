"""Stage `shards`: output equals its inputs, skipped images, cache and refusals, resume, `redi verify`."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import zarr
from typer.testing import CliRunner

from redi.benchmarks.loader import make_stage_inputs
from redi.cli import app
from redi.common.atomic import atomic_write_json, sha256_file
from redi.common.errors import UserError
from redi.pipeline.pca_file import load_pca
from redi.pipeline.readers import make_loader
from redi.pipeline.shards import ShardsConfig, ShardWriter, build_shards, decode_key, encode_key
from redi.pipeline.verify import verify_data

N, H, GRID, DIM, K, S = 150, 4, 3, 16, 4, 32  # images, latent side, patch grid side, DINOv2 width, PCs, shard size
BAD_LATENTS, BAD_FEATURES = (3, 40), (40, 97, 149)
CFG = ShardsConfig(formats=("zarr", "wds"), pcs=K, shard_size=S, device="cpu")
runner = CliRunner()


def make_data(root: Path, num_classes: int = 5) -> Path:
    make_stage_inputs(root, N, latent_side=H, grid=GRID, dim=DIM, invalid_latents=BAD_LATENTS,
                      invalid_features=BAD_FEATURES, num_classes=num_classes)
    # the record `redi pca` keeps of its file, which verify and shards check the file against
    atomic_write_json(root / "pca.json", {"manifest": {"stage": "pca", "params": {}}, "pca_sha256": sha256_file(root / "pca.safetensors")})
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = make_data(tmp_path_factory.mktemp("shards"))
    build_shards(data, CFG, progress=False)
    return data


def stage_array(data: Path, stage: str, name: str) -> np.ndarray:
    return zarr.open_array(data / stage / "store.zarr" / name, mode="r")[:]


def test_key_encoding_round_trips_and_has_no_dots_or_slashes() -> None:
    for key in ["n01440764/n01440764_10026", "a.b/c.d.e", "100%/x%2Fy", "ünï/cödé"]:
        encoded = encode_key(key)
        assert "." not in encoded and "/" not in encoded
        assert decode_key(encoded) == key


def test_shards_equal_their_inputs(built: Path) -> None:
    shards = built / "shards"
    info = json.loads((shards / "shards.json").read_text())
    keys = json.loads((shards / "keys.json").read_text())
    source_keys = json.loads((built / "latents" / "keys.json").read_text())
    bad = set(BAD_LATENTS) | set(BAD_FEATURES)
    assert info["num_samples"] == len(keys) == N - len(bad)
    assert sorted(keys) == [k for i, k in enumerate(source_keys) if i not in bad]
    assert keys != sorted(keys), "the write-time shuffle mixes the class-sorted image order"
    skipped = {(s["index"], s["stage"]) for s in info["skipped"]}
    assert skipped == {(i, "latents") for i in BAD_LATENTS} | {(i, "features") for i in BAD_FEATURES}
    assert all(s["reason"].startswith("unreadable in") for s in info["skipped"])
    assert info["pca"]["K"] == K and info["num_shards"] == -(-len(keys) // S)
    assert info["latent_norm"] == {"kind": "config", "shift": [0.0] * 4, "scale": [0.18215] * 4}  # SD-VAE's config
    assert info["latent_shape"] == [4, H, H] and info["fields"]["pcs"]["shape"] == [K, GRID, GRID]

    moments, cls, patch = (stage_array(built, "latents", "moments"), stage_array(built, "features", "cls"),
                           stage_array(built, "features", "patch"))
    labels = stage_array(built, "latents", "labels")
    pca = load_pca(built / "pca.safetensors")
    out = {name: zarr.open_array(shards / "samples.zarr" / name, mode="r")[:] for name in info["fields"]}
    for j in [0, 1, len(keys) // 2, len(keys) - 1]:
        i = source_keys.index(keys[j])
        np.testing.assert_array_equal(out["moments"][j], moments[i])
        np.testing.assert_array_equal(out["cls"][j], cls[i])
        assert out["label"][j] == labels[i]
        expected = pca.project(torch.from_numpy(patch[i]), K).T.reshape(K, GRID, GRID).numpy()  # (K, p, p)
        np.testing.assert_allclose(out["pcs"][j].astype(np.float32), expected, rtol=2e-3, atol=2e-3)


def test_webdataset_tars_read_by_webdataset_equal_the_zarr_store(built: Path) -> None:
    shards = built / "shards"
    keys = json.loads((shards / "keys.json").read_text())
    tars = sorted(str(p) for p in (shards / "wds").glob("shard-*.tar"))
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode())
    assert [decode_key(s["__key__"]) for s in samples] == keys
    pcs = zarr.open_array(shards / "samples.zarr" / "pcs", mode="r")
    label = zarr.open_array(shards / "samples.zarr" / "label", mode="r")
    for j in [0, S, len(keys) - 1]:
        np.testing.assert_array_equal(samples[j]["pcs.npy"], pcs[j])
        assert samples[j]["label.cls"] == label[j]


def test_rerun_does_nothing_other_pcs_refused_unless_force(built: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(built, data)
    again = build_shards(data, CFG, progress=False)
    assert again.up_to_date and again.written_samples == 0
    result = runner.invoke(app, ["shards", "--data", str(data), "--format", "both", "--pcs", str(K + 1),
                                 "--shard-size", str(S), "--device", "cpu"])
    assert result.exit_code == 2 and "--force" in result.output and "params.pcs" in result.output
    result = runner.invoke(app, ["shards", "--data", str(data), "--format", "both", "--pcs", str(K + 1),
                                 "--shard-size", str(S), "--device", "cpu", "--force"])
    assert result.exit_code == 0, result.output
    assert json.loads((data / "shards" / "shards.json").read_text())["pca"]["K"] == K + 1
    result = runner.invoke(app, ["shards", "--data", str(data), "--pcs", str(DIM + 1), "--device", "cpu", "--force"])
    assert result.exit_code == 2 and f"--pcs {DIM + 1} exceeds the {DIM} components" in result.output


def test_a_rerun_with_nothing_to_do_answers_from_the_stamp_and_a_changed_input_is_caught(
        built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DATA/.shards.stamp.json: settings and file digests agree, so no input is opened and torch is not imported; a
    touched file with the same bytes keeps the fast answer; a changed one sends the rerun through the stage."""
    import os
    import subprocess
    import sys

    import redi.pipeline.shards as stage

    data = tmp_path / "data"
    shutil.copytree(built, data)
    args = ["shards", "--data", str(data), "--format", "both", "--pcs", str(K), "--shard-size", str(S), "--device", "cpu"]
    script = ("import sys; from typer.testing import CliRunner; from redi.cli import app; "
              f"r = CliRunner().invoke(app, {args!r}); print(r.exit_code, 'torch' in sys.modules, r.output)")
    fresh = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert fresh.stdout.startswith("0 False") and "nothing to do" in fresh.stdout, fresh.stdout + fresh.stderr

    def opened(*args: object) -> None:
        raise AssertionError("the stage opened its inputs on a rerun with nothing to do")

    monkeypatch.setattr(stage, "open_inputs", opened)
    manifest = data / "latents" / "manifest.json"
    was = manifest.stat().st_mtime_ns
    os.utime(manifest, ns=(was + 10**9, was + 10**9))  # touched, the same bytes
    for _ in range(2):  # the stamp takes the new time: the second rerun compares stats only
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and "nothing to do" in result.output, result.output
    monkeypatch.undo()
    record = json.loads(manifest.read_text())
    record["params"]["chunk_size"] += 1  # latents/ now says it was made otherwise
    manifest.write_text(json.dumps(record))
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "different settings" in result.output, result.output


def test_killed_run_resumes_to_the_same_bytes(built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_data(tmp_path / "data")
    original = ShardWriter.write_block
    calls: list[int] = []

    def dies_on_third_block(self: ShardWriter, block: int, keys: list[str], values: dict) -> dict[str, str]:
        calls.append(block)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return original(self, block, keys, values)

    monkeypatch.setattr(ShardWriter, "write_block", dies_on_third_block)
    with pytest.raises(KeyboardInterrupt):
        build_shards(data, CFG, progress=False)
    assert not (data / "shards" / "shards.json").exists()
    monkeypatch.setattr(ShardWriter, "write_block", original)
    resumed = build_shards(data, CFG, progress=False)
    assert resumed.written_samples == resumed.num_samples - 2 * S
    want = json.loads((built / "shards" / "shards.json").read_text())["files"]
    assert json.loads((data / "shards" / "shards.json").read_text())["files"] == want


def test_inputs_from_different_sources_are_refused(tmp_path: Path) -> None:
    data = make_data(tmp_path / "data")
    path = data / "features" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["source"]["fingerprint"] = "another-source"
    path.write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="different image sources"):
        build_shards(data, CFG, progress=False)


def test_verify_passes_then_names_a_corrupted_tar_and_a_truncated_chunk(built: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(built, data)
    result = runner.invoke(app, ["verify", str(data)])
    assert result.exit_code == 0, result.output
    assert [c.status for c in verify_data(data, progress=False)] == ["ok"] * 4

    tar = data / "shards" / "wds" / "shard-000002.tar"
    raw = bytearray(tar.read_bytes())
    raw[5000] ^= 0xFF
    tar.write_bytes(bytes(raw))
    result = runner.invoke(app, ["verify", str(data)])
    assert result.exit_code == 2 and "shard-000002.tar" in result.output.replace("\n", "")
    assert [c.status for c in verify_data(data, deep=False, progress=False)] == ["ok"] * 4  # presence only
    shutil.copy(built / "shards" / "wds" / "shard-000002.tar", tar)

    chunk = data / "shards" / "samples.zarr" / "moments" / "c" / "1" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:100])
    checks = {c.stage: c for c in verify_data(data, progress=False)}
    assert checks["shards/"].status == "FAILED" and str(chunk) in checks["shards/"].problem
    assert checks["latents/"].status == "ok"


def test_verify_names_a_damaged_input_chunk_and_an_unfinished_stage(built: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(built, data)
    chunk = data / "features" / "store.zarr" / "patch" / "c" / "2" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:20])
    (data / "latents" / "errors.jsonl").unlink()
    checks = {c.stage: c for c in verify_data(data, progress=False)}
    assert checks["features/"].status == "FAILED" and str(chunk) in checks["features/"].problem
    assert checks["latents/"].status == "FAILED" and "errors.jsonl" in checks["latents/"].problem
    assert checks["pca.safetensors"].status == "ok"


def test_patch_tokens_are_stored_and_read_by_both_readers(tmp_path: Path) -> None:
    data = make_data(tmp_path / "data")
    build_shards(data, ShardsConfig(formats=("zarr", "wds"), pcs=K, patch_tokens=True, shard_size=S, device="cpu"),
                 progress=False)
    patch = stage_array(data, "features", "patch")
    source_keys = json.loads((data / "features" / "keys.json").read_text())
    batches = {fmt: next(iter(make_loader(data / "shards", batch_size=8, format=fmt, fields=("pcs", "patch_tokens"))))
               for fmt in ("zarr", "wds")}
    assert batches["zarr"]["key"] == batches["wds"]["key"]
    for batch in batches.values():
        assert batch["patch_tokens"].shape == (8, GRID * GRID, DIM) and "moments" not in batch
        want = np.stack([patch[source_keys.index(key)] for key in batch["key"]])
        np.testing.assert_array_equal(batch["patch_tokens"].numpy(), want)


def test_the_repair_that_verify_suggests_rebuilds_a_deleted_shard(built: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(built, data)
    victim = sorted((data / "shards" / "wds").glob("*.tar"))[0]
    want = victim.read_bytes()
    victim.unlink()
    result = runner.invoke(app, ["verify", str(data)])
    assert result.exit_code == 2 and "--force" in result.output
    result = runner.invoke(app, ["shards", "--data", str(data), "--format", "both", "--pcs", str(K), "--shard-size", str(S),
                                 "--device", "cpu", "--force"])
    assert result.exit_code == 0 and "nothing to do" not in result.output, result.output
    assert victim.read_bytes() == want and runner.invoke(app, ["verify", str(data)]).exit_code == 0


def test_a_damaged_input_chunk_is_one_sentence(built: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(built, data)
    chunk = next(p for p in sorted((data / "latents" / "store.zarr" / "moments" / "c").rglob("*")) if p.is_file())
    chunk.write_bytes(chunk.read_bytes()[:7])  # truncated on disk
    result = runner.invoke(app, ["shards", "--data", str(data), "--format", "both", "--pcs", str(K), "--shard-size", str(S),
                                 "--device", "cpu", "--force"])
    assert result.exit_code == 2 and "cannot be read" in result.output and "--repair" in result.output, result.output


def test_an_interrupted_run_on_unlabelled_images_finishes_with_the_same_bytes(tmp_path: Path) -> None:
    """Labels all 0 make all-zero label chunks: the resumed run must still write (and hash) them."""
    data = make_data(tmp_path / "data", num_classes=1)
    args = ["shards", "--data", str(data), "--pcs", str(K), "--shard-size", str(S), "--format", "both"]
    assert runner.invoke(app, args).exit_code == 0
    root = data / "shards"
    want = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    for name in ("progress/000002.json", "progress/000003.json", "errors.jsonl", "shards.json"):  # = kill -9 at block 2
        (root / name).unlink()
    resumed = runner.invoke(app, args)
    assert resumed.exit_code == 0, resumed.output
    assert {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()} == want
