"""`redi import-repa`: REPA-format latents become a latents/ stage that shards joins exactly like our own encode's."""
from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image
from typer.testing import CliRunner

from redi.cli import app
from redi.common.errors import UserError
from redi.pipeline.encode import EncodeConfig, run_encode, run_features
from redi.pipeline.pca import PCAConfig, run_pca
from redi.pipeline.shard_info import read_shard_info
from redi.pipeline.repa_import import RepaImportConfig, import_repa
from redi.pipeline.shards import ShardsConfig, build_shards
from redi.pipeline.stage import StageState, read_manifest

R, N, CHUNK, K = 32, 7, 3, 4  # image side (4×4 latents, 2×2 DINOv2 patches), images, chunk size, PCs
SHARDS = ShardsConfig(formats=("zarr", "wds"), pcs=K, shard_size=4, device="cpu")


def repa_name(index: int, stem: str, ext: str) -> str:
    """dataset_tools.py names: AAAAA/<stem>NNNNNNNN.<ext>."""
    idx = f"{index:08d}"
    return f"{idx[:5]}/{stem}{idx}.{ext}"


def write_repa_images(root: Path) -> Path:
    """REPA's `convert` output: R×R PNGs and dataset.json labels."""
    rng = np.random.default_rng(0)
    images = root / "images"
    labels = []
    for i in range(N):
        path = images / repa_name(i, "img", "png")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (R, R, 3), dtype=np.uint8)).save(path)
        labels.append([repa_name(i, "img", "png"), int(i % 3)])
    (images / "dataset.json").write_text(json.dumps({"labels": labels}))
    return images


def write_vae_sd(root: Path, moments: np.ndarray, labels: np.ndarray) -> Path:
    """REPA's `encode` output: one float32 mean‖std .npy per image and dataset.json keyed by the .npy names."""
    out = root / "vae-sd"
    for i, m in enumerate(moments):
        path = out / repa_name(i, "img-mean-std-", "npy")
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, m.astype(np.float32))
    names = [[repa_name(i, "img-mean-std-", "npy"), int(label)] for i, label in enumerate(labels)]
    (out / "dataset.json").write_text(json.dumps({"labels": names}))
    return out


def store(data: Path, stage: str) -> dict[str, np.ndarray]:
    return {name: arr[:] for name, arr in zarr.open_group(data / stage / "store.zarr", mode="r").arrays()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(REPA directory, our data root): our encode, features, PCA and shards of REPA's images; REPA's vae-sd of our moments."""
    base = tmp_path_factory.mktemp("repa")
    images = write_repa_images(base / "repa")
    data = base / "ours"
    for run, model in ((run_encode, "tiny-random"), (run_features, "tiny-random")):
        run(EncodeConfig(images, data, model, resolution=R, batch_size=4, chunk_size=CHUNK, workers=0))
    run_pca(data, PCAConfig(num_images=N, device="cpu"))
    latents = store(data, "latents")
    write_vae_sd(base / "repa", latents["moments"], latents["labels"])
    build_shards(data, SHARDS, progress=False)
    return base / "repa", data


def importing_root(reference: tuple[Path, Path], target: Path) -> Path:
    """A data root holding our features/ and pca.safetensors, ready for an imported latents/."""
    _, ours = reference
    shutil.copytree(ours / "features", target / "features")
    shutil.copy(ours / "pca.safetensors", target / "pca.safetensors")
    return target


def test_imported_latents_give_the_shards_of_our_own_encode(reference: tuple[Path, Path], tmp_path: Path) -> None:
    repa, ours = reference
    data = importing_root(reference, tmp_path / "imported")
    result = import_repa(RepaImportConfig(repa, data, resolution=R, chunk_size=CHUNK))
    assert result.state is StageState.NEW and result.processed == N and result.skipped == 0
    mine, theirs = store(data, "latents"), store(ours, "latents")
    for name in ("moments", "labels", "valid"):
        np.testing.assert_array_equal(mine[name], theirs[name])
    assert (data / "latents" / "keys.json").read_text() == (ours / "latents" / "keys.json").read_text()
    manifest = read_manifest(data / "latents")
    assert manifest.stage == "encode" and manifest.encoder["kind"] == "repa-import"
    assert manifest.encoder["id"] == "stabilityai/sd-vae-ft-ema" and manifest.encoder["revision"] == "main"
    assert manifest.source == read_manifest(ours / "features").source, "the fingerprint features computes"

    build_shards(data, SHARDS, progress=False)
    a, b = data / "shards", ours / "shards"
    info_a, info_b = json.loads((a / "shards.json").read_text()), json.loads((b / "shards.json").read_text())
    vae = info_a.pop("vae")
    assert (vae["kind"], vae["id"], vae["revision"]) == ("repa-import", "stabilityai/sd-vae-ft-ema", "main"), "decodable"
    assert info_b.pop("vae")["kind"] == "tiny-random"
    assert info_a == info_b, "same samples, order, checksums and PCA"
    for name in info_a["fields"]:
        got, want = zarr.open_array(a / "samples.zarr" / name)[:], zarr.open_array(b / "samples.zarr" / name)[:]
        np.testing.assert_array_equal(got, want)
    assert read_shard_info(a).num_samples == N


def test_rerun_resume_and_a_damaged_file(reference: tuple[Path, Path], tmp_path: Path) -> None:
    repa, ours = reference
    shutil.copytree(repa, tmp_path / "repa")
    np.save(tmp_path / "repa" / "vae-sd" / repa_name(4, "img-mean-std-", "npy"), np.zeros((8, 3, 3), np.float32))
    huge = np.load(tmp_path / "repa" / "vae-sd" / repa_name(5, "img-mean-std-", "npy"))
    np.save(tmp_path / "repa" / "vae-sd" / repa_name(5, "img-mean-std-", "npy"), huge * 0 + 1e6)  # inf in float16
    cfg = RepaImportConfig(tmp_path / "repa", tmp_path / "data", resolution=R, chunk_size=CHUNK)
    first = import_repa(cfg)
    assert first.skipped == 2
    errors = [json.loads(line) for line in (tmp_path / "data" / "latents" / "errors.jsonl").read_text().splitlines()]
    assert [e["index"] for e in errors] == [4, 5] and "shape" in errors[0]["reason"] and "float16" in errors[1]["reason"]
    latents = store(tmp_path / "data", "latents")
    assert not latents["valid"][4:6].any() and latents["valid"].sum() == N - 2 and not latents["moments"][4:6].any()
    np.testing.assert_array_equal(latents["moments"][6:], store(ours, "latents")["moments"][6:])

    assert import_repa(cfg).state is StageState.COMPLETE
    (tmp_path / "data" / "latents" / "progress" / "000001.json").unlink()  # as if killed before chunk 1 committed
    (tmp_path / "data" / "latents" / "errors.jsonl").unlink()
    resumed = import_repa(cfg)
    assert resumed.state is StageState.RESUME and resumed.processed == CHUNK and resumed.skipped == 2
    np.testing.assert_array_equal(store(tmp_path / "data", "latents")["moments"], latents["moments"])
    with pytest.raises(UserError, match="different settings"):
        import_repa(RepaImportConfig(tmp_path / "repa", tmp_path / "data", resolution=R, chunk_size=2))


def test_zipped_latents(reference: tuple[Path, Path], tmp_path: Path) -> None:
    repa, ours = reference
    archive = tmp_path / "vae-sd.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted((repa / "vae-sd").rglob("*")):
            if path.is_file():
                z.write(path, path.relative_to(repa / "vae-sd").as_posix())
    import_repa(RepaImportConfig(repa, tmp_path / "data", latents=archive, resolution=R, chunk_size=CHUNK))
    np.testing.assert_array_equal(store(tmp_path / "data", "latents")["moments"], store(ours, "latents")["moments"])


def test_refusals(reference: tuple[Path, Path], tmp_path: Path) -> None:
    repa, _ = reference
    root = tmp_path / "repa"
    shutil.copytree(repa, root)
    with pytest.raises(UserError, match="not 64×64"):
        import_repa(RepaImportConfig(root, tmp_path / "a", resolution=64))
    meta = json.loads((root / "vae-sd" / "dataset.json").read_text())
    meta["labels"][2][1] += 1
    (root / "vae-sd" / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"1 labels .* differ"):
        import_repa(RepaImportConfig(root, tmp_path / "b", resolution=R))
    shutil.copy(repa / "vae-sd" / "dataset.json", root / "vae-sd" / "dataset.json")
    moved = root / "vae-sd" / repa_name(6, "img-mean-std-", "npy")
    moved.rename(moved.with_name("img-mean-std-00000009.npy"))
    with pytest.raises(UserError, match="does not belong"):
        import_repa(RepaImportConfig(root, tmp_path / "c", resolution=R))
    moved.with_name("img-mean-std-00000009.npy").unlink()
    with pytest.raises(UserError, match="one to one"):
        import_repa(RepaImportConfig(root, tmp_path / "d", resolution=R))
    with pytest.raises(UserError, match=r"no \.npy files"):
        import_repa(RepaImportConfig(root, tmp_path / "e", latents=root / "images", resolution=R))
    assert not any((tmp_path / n / "latents").exists() for n in "abcde"), "refused before writing anything"


def test_cli_import_repa(reference: tuple[Path, Path], tmp_path: Path) -> None:
    repa, _ = reference
    args = ["import-repa", str(repa), "--data", str(tmp_path / "data"), "--resolution", str(R), "--chunk-size", str(CHUNK)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "redi features" in result.output and (tmp_path / "data" / "latents" / "errors.jsonl").exists()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "nothing to do" in again.output
    bad = CliRunner().invoke(app, [*args[:4], "--resolution", "48"])
    assert bad.exit_code == 2 and "error" in bad.output
