"""The `encode` and `features` stages: outputs, pre-processing, cache and resume, bad input, encoders."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

import faults
from faults import StopPoint, signal_when_stopped
from redi.cli import app
from redi.pipeline.demo_data import CLASSES, write_demo_images
from redi.pipeline.encoders import ENCODER, VAE, load, resolve
from redi.pipeline.images import center_crop_arr, decode_rgb, open_source
from redi.pipeline.representations import (
    CLIP_MEAN, CLIP_STD, HALF, IMAGENET_MEAN, IMAGENET_STD, encoder_tokens, feature_spec, fit_positions, tiny_configs, tiny_dino_config,
)
from redi.pipeline.vaes import latent_space, tiny_sd_config, vae_moments

R = 64  # crop side: 8×8 latents, 4×4 DINOv2 patches (56-pixel input)
TINY = ["--resolution", str(R), "--workers", "0", "--batch-size", "4"]


def grid(resolution: int) -> int:
    """The token grid of SD-VAE's f8 latents in patches of 2: R/16."""
    return latent_space(tiny_sd_config()).token_grid(resolution)


def redi(*args: str | Path) -> tuple[int, str]:
    """Run the CLI in-process; (exit code, output with whitespace collapsed)."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, " ".join(result.output.split())


def read_store(stage: Path) -> dict[str, np.ndarray]:
    return {name: arr[:] for name, arr in zarr.open_group(stage / "store.zarr", mode="r").arrays()}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_images(tmp_path_factory.mktemp("demo") / "images", 12).out


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def test_encode_and_features_with_tiny_random(images: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    code, out = redi("encode", images, "--data", data, "--vae", "tiny-random", "--chunk-size", "5", *TINY)
    assert code == 0, out
    assert "tiny-random" in out
    code, out = redi("features", images, "--data", data, "--encoder", "tiny-random", "--chunk-size", "5", *TINY)
    assert code == 0, out

    latents, features = read_store(data / "latents"), read_store(data / "features")
    assert latents["moments"].shape == (12, 8, R // 8, R // 8) and latents["moments"].dtype == np.float16
    assert features["cls"].shape == (12, 32) and features["cls"].dtype == np.float16
    assert features["patch"].shape == (12, (R // 16) ** 2, 32) and features["patch"].dtype == np.float16
    keys = json.loads((data / "latents" / "keys.json").read_text())
    assert keys == json.loads((data / "features" / "keys.json").read_text()) == open_source(images).keys
    folder_labels = [sorted(CLASSES).index(k.split("/")[0]) for k in keys]
    for store in (latents, features):
        assert store["labels"].tolist() == folder_labels and store["valid"].all()
    assert (latents["moments"][:, 4:] > 0).all()  # std half is positive

    for stage, cls in (("latents", "AutoencoderKL"), ("features", "Dinov2WithRegistersModel")):
        manifest = json.loads((data / stage / "manifest.json").read_text())
        assert manifest["tiny_random"] is True
        assert manifest["encoder"]["kind"] == "tiny-random" and manifest["encoder"]["class"] == cls
        assert manifest["params"]["resolution"] == R and manifest["source"]["count"] == 12
        assert (data / stage / "errors.jsonl").read_text() == ""

    # Row i of each array is image i, encoded exactly as the per-batch maps do it.
    vae, dino = load(resolve(VAE, "tiny-random")), load(resolve(ENCODER, "tiny-random"))
    src = open_source(images)
    pixels = torch.from_numpy(np.stack([center_crop_arr(decode_rgb(src.read_bytes(i)), R) for i in (0, 7, 11)]))
    with torch.inference_mode():
        moments = vae_moments(vae, pixels).half().numpy()
        cls, patch = encoder_tokens(dino, pixels, grid(R))
    np.testing.assert_allclose(latents["moments"][[0, 7, 11]], moments, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(features["cls"][[0, 7, 11]], cls.half().numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(features["patch"][[0, 7, 11]], patch.half().numpy(), rtol=1e-3, atol=1e-3)

    code, out = redi("info", data)
    assert code == 0 and "latents/" in out and "complete" in out and "(12, 8, 8, 8) float16" in out and "missing" in out


def _bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """(n_out, n_in) weights of cubic-convolution resampling, half-pixel centres, clamped borders."""
    def kernel(t: float) -> float:
        t = abs(t)
        if t <= 1:
            return (a + 2) * t**3 - (a + 3) * t**2 + 1
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a if t < 2 else 0.0

    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        base = int(np.floor(src))
        for k in range(base - 1, base + 3):
            m[i, min(max(k, 0), n_in - 1)] += kernel(src - k)
    return m


def _triangle_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of antialiased bilinear downsampling (torchvision/PIL): a triangle stretched by n_in/n_out."""
    scale = n_in / n_out
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = (i + 0.5) * scale - 0.5
        m[i] = np.maximum(0.0, 1 - np.abs(np.arange(n_in) - centre) / scale)
    return m / m.sum(axis=1, keepdims=True)


def dino_input(pixels: torch.Tensor, resolution: int) -> torch.Tensor:
    """DINOv2's input for uint8 crops (REPA's pre-processing at 224·R/256)."""
    spec = feature_spec(tiny_dino_config(), grid(resolution))
    return spec.preprocess(pixels, spec.side)


@pytest.mark.parametrize("family, mean, std, resize_first", [
    ("dinov2-reg", IMAGENET_MEAN, IMAGENET_STD, False),  # REPA: normalise, then bicubic to 224·R/256 (SPEC §3)
    ("clip", CLIP_MEAN, CLIP_STD, True),  # REPA: bicubic to 224·R/256, then CLIP's mean/std
])
def test_repa_preprocessing_by_hand(family: str, mean: tuple[float, ...], std: tuple[float, ...], resize_first: bool) -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (2, R, R, 3), dtype=np.uint8)
    spec = feature_spec(tiny_configs()[family](), grid(R))
    got = spec.preprocess(torch.from_numpy(img), spec.side).numpy()  # (2, 3, 56, 56)
    side = 224 * R // 256
    w = _bicubic_matrix(R, side)
    resize = lambda x: np.einsum("yh,nhwc,xw->nyxc", w, x, w)  # separable bicubic resize
    normalise = lambda x: (x - np.array(mean)) / np.array(std)
    x = img / 255.0
    want = normalise(resize(x)) if resize_first else resize(normalise(x))
    assert spec.side == side and got.shape == (2, 3, side, side)
    np.testing.assert_allclose(got, want.transpose(0, 3, 1, 2), atol=1e-4)  # float32 vs float64


def test_siglip_preprocessing_follows_its_preprocessor_config() -> None:
    """A SigLIP/14 (so400m-like): resized to 14·R/16 with the json's bilinear, antialiased, then its mean/std."""
    config = {**tiny_configs()["siglip"](), "patch_size": 14}
    processor = {"resample": 2, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.5], "rescale_factor": 1 / 255}
    spec = feature_spec(config, grid(R), processor)
    img = np.random.default_rng(1).integers(0, 256, (2, R, R, 3), dtype=np.uint8)
    got = spec.preprocess(torch.from_numpy(img), spec.side).numpy()
    w = _triangle_matrix(R, 56)
    want = (np.einsum("yh,nhwc,xw->nyxc", w, img / 255.0, w) - processor["image_mean"]) / processor["image_std"]
    assert spec.side == 56 and spec.preprocess.source == "preprocessor_config.json"
    np.testing.assert_allclose(got, want.transpose(0, 3, 1, 2), atol=1e-4)
    assert feature_spec(config, grid(R)).preprocess.mean == HALF  # without the json: SiglipImageProcessor's defaults


def test_dino_tokens_keep_cls_and_patches_drop_registers() -> None:
    dino = load(resolve(ENCODER, "tiny-random"))
    pixels = torch.randint(0, 256, (2, 128, 128, 3), dtype=torch.uint8)
    with torch.inference_mode():
        cls, patch = encoder_tokens(dino, pixels, grid(128))
        h = dino(pixel_values=dino_input(pixels, 128)).last_hidden_state  # (2, 1 + 4 + 64, 32)
    assert h.shape == (2, 1 + 4 + 64, 32)
    torch.testing.assert_close(cls, h[:, 0])
    torch.testing.assert_close(patch, h[:, 5:])


def test_kill_9_resume_is_bitwise_identical_then_cached(images: Path, tmp_path: Path) -> None:
    args = ["encode", str(images), "--vae", "tiny-random", "--chunk-size", "1", "--resolution", str(R),
            "--workers", "0", "--batch-size", "1"]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    assert redi(*args, "--data", clean)[0] == 0

    # A fresh `redi encode` that stops itself mid-way through its second chunk's writes, killed there: no race with
    # its end, however loaded the machine.
    point = StopPoint(killed, target=1, skip=2, files=("latents/progress/*.json",))
    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(Path(faults.__file__)), json.dumps(point.to_json()), *args,
                                 "--data", str(killed)], stdout=out, stderr=subprocess.STDOUT)
    signal_when_stopped(proc.pid, signal.SIGKILL, False, log)
    assert proc.wait() == -signal.SIGKILL
    progress = killed / "latents" / "progress"
    committed = len(list(progress.glob("*.json")))
    assert committed == 1 and not (killed / "latents" / "errors.jsonl").exists()
    assert f"incomplete ({committed} of 12 chunks)" in redi("info", killed)[1]

    code, out = redi(*args, "--data", killed)
    assert code == 0, out
    assert f"{12 - committed} of 12 chunks to do" in out
    want, got = read_store(clean / "latents"), read_store(killed / "latents")
    assert want.keys() == got.keys()
    for name in want:
        assert want[name].tobytes() == got[name].tobytes(), name

    before = _mtimes(killed / "latents")
    code, out = redi(*args, "--data", killed)
    assert code == 0 and "nothing to do" in out
    assert _mtimes(killed / "latents") == before

    code, out = redi(*args[:-2], "--batch-size", "2", "--data", killed)  # args end with --batch-size 1
    assert code == 2 and "--force" in out and "batch_size" in out
    assert _mtimes(killed / "latents") == before


def test_corrupt_files_are_skipped_and_listed_the_same_way_on_every_run(images: Path, tmp_path: Path) -> None:
    src = tmp_path / "images"
    write_demo_images(src, 6)
    jpeg = next(src.rglob("*.jpg")).read_bytes()
    (src / "circle" / "circle_zero.png").write_bytes(b"")
    (src / "ring" / "ring_truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (src / "square" / "square_text.png").write_text("not a png at all\n")  # PIL's reason names a BytesIO object
    bad = {"circle/circle_zero", "ring/ring_truncated", "square/square_text"}
    data, again = tmp_path / "data", tmp_path / "again"
    for stage, flag, sub in (("encode", "--vae", "latents"), ("features", "--encoder", "features")):
        code, out = redi(stage, src, "--data", data, flag, "tiny-random", *TINY)
        assert code == 0, out
        assert re.search(r"warning: 3 images could not be read", out), out
        errors = [json.loads(line) for line in (data / sub / "errors.jsonl").read_text().splitlines()]
        assert {e["key"] for e in errors} == bad and all(e["reason"] for e in errors)
        assert "UnidentifiedImageError: cannot identify image file" in {e["reason"] for e in errors}
        assert not any(re.search(r"0x[0-9a-f]{6,}|object at", e["reason"]) for e in errors), errors  # no memory address
        assert redi(stage, src, "--data", again, flag, "tiny-random", *TINY)[0] == 0
        assert (again / sub / "errors.jsonl").read_bytes() == (data / sub / "errors.jsonl").read_bytes()
        store, keys = read_store(data / sub), json.loads((data / sub / "keys.json").read_text())
        assert [keys[e["index"]] for e in errors] == [e["key"] for e in errors]
        assert {keys[i] for i in np.flatnonzero(~store["valid"])} == bad
        main = "moments" if sub == "latents" else "patch"
        assert not store[main][~store["valid"]].any() and store[main][store["valid"]].any()


def test_user_errors_exit_2(images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out = redi("encode", images, "--data", tmp_path, "--vae", "nobody/no-such-vae", *TINY)
    assert code == 2 and "local directory" in out and "--vae" in out
    code, out = redi("features", images, "--data", tmp_path, "--encoder", "nobody/no-such-dino", *TINY)
    assert code == 2 and "local directory" in out and "--encoder" in out
    code, out = redi("encode", tmp_path / "missing", "--data", tmp_path, "--vae", "tiny-random", *TINY)
    assert code == 2 and "does not exist" in out
    (tmp_path / "file").write_text("")
    code, out = redi("encode", images, "--data", tmp_path / "file", "--vae", "tiny-random", *TINY)
    assert code == 2 and "Cannot write" in out
    code, out = redi("encode", images, "--data", tmp_path, "--vae", "tiny-random", "--resolution", "100")
    assert code == 2 and "not a multiple of the VAE's downsampling factor 8" in out


def test_local_directory_encoder_identity(tmp_path: Path) -> None:
    from redi.pipeline.encoders import random_init

    random_init(VAE, tiny_sd_config(), 1).save_pretrained(tmp_path / "vae")
    ref = resolve(VAE, str(tmp_path / "vae"))
    assert ref.identity["kind"] == "local" and ref.identity["dim"] == 4 and len(ref.identity["hash"]) == 64
    model = load(ref)
    assert torch.equal(model.encoder.conv_in.weight, random_init(VAE, tiny_sd_config(), 1).encoder.conv_in.weight)


def test_benchmark_quick_smoke() -> None:
    from redi.benchmarks.encode import run

    figures = run(quick=True, workers=0)
    assert figures["batched_images_per_s"] > 0 and figures["one_at_a_time_images_per_s"] > 0
    assert figures["models"] == "tiny-random"


@pytest.mark.slow
def test_two_torchrun_ranks_write_the_same_store_as_one_process(images: Path, tmp_path: Path) -> None:
    for stage, flag in (("encode", "--vae"), ("features", "--encoder")):
        code, out = redi(stage, images, "--data", tmp_path / "one", flag, "tiny-random", *TINY, "--chunk-size", "4")
        assert code == 0, out
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29541",
               "--", str(Path(sys.executable).parent / "redi"), stage, str(images), "--data", str(tmp_path / "two"),
               flag, "tiny-random", *TINY, "--chunk-size", "4", "--device", "cpu"]
        done = subprocess.run(cmd, env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    for stage in ("latents", "features"):
        one, two = read_store(tmp_path / "one" / stage), read_store(tmp_path / "two" / stage)
        assert one.keys() == two.keys()
        for name in one:
            assert np.array_equal(one[name], two[name]), f"{stage}/{name} differs between 1 and 2 processes"
        assert (tmp_path / "two" / stage / "errors.jsonl").read_text() == (tmp_path / "one" / stage / "errors.jsonl").read_text()


def test_one_pass_with_features_equals_the_two_stages(images: Path, tmp_path: Path) -> None:
    chunked = [*TINY, "--chunk-size", "5"]
    separate, together, mixed = tmp_path / "separate", tmp_path / "together", tmp_path / "mixed"
    assert redi("encode", images, "--data", separate, "--vae", "tiny-random", *chunked)[0] == 0
    assert redi("features", images, "--data", separate, "--encoder", "tiny-random", *chunked)[0] == 0
    one_pass = ["encode", images, "--vae", "tiny-random", "--with-features", "--encoder", "tiny-random", *chunked]
    code, out = redi(*one_pass, "--data", together)
    assert code == 0 and "redi encode" in out and "redi features" in out, out

    # A run that died with features half done: the one pass redoes only what each stage lacks.
    assert redi("features", images, "--data", mixed, "--encoder", "tiny-random", *chunked)[0] == 0
    (mixed / "features" / "progress" / "000001.json").unlink()
    (mixed / "features" / "errors.jsonl").unlink()
    code, out = redi(*one_pass, "--data", mixed)
    assert code == 0 and "3 of 3 chunks to do" in out and "1 of 3 chunks to do" in out, out

    for data in (together, mixed):
        for stage in ("latents", "features"):
            want, got = read_store(separate / stage), read_store(data / stage)
            assert want.keys() == got.keys()
            for name in want:
                assert want[name].tobytes() == got[name].tobytes(), (data, stage, name)
            assert (separate / stage / "manifest.json").read_text() == (data / stage / "manifest.json").read_text()
    code, out = redi("features", images, "--data", together, "--encoder", "tiny-random", *chunked)
    assert code == 0 and "nothing to do" in out


def test_dinov2_without_registers_gives_repa_and_reg_their_targets(images: Path, tmp_path: Path) -> None:
    """`--encoder facebook/dinov2-base` (Dinov2Model, no registers) is what REPA/REG align with: its 37×37 table
    resampled once to the token grid (tests/test_repa_encoders.py checks that against REPA's computation)."""
    from transformers import Dinov2Config, Dinov2Model

    plain = {k: v for k, v in tiny_dino_config().items() if k != "num_register_tokens"}
    torch.manual_seed(2)
    Dinov2Model(Dinov2Config(**plain)).save_pretrained(tmp_path / "dinov2")
    ref = resolve(ENCODER, str(tmp_path / "dinov2"))
    assert ref.identity["class"] == "Dinov2Model" and ref.identity["dim"] == 32
    code, out = redi("features", images, "--data", tmp_path / "data", "--encoder", tmp_path / "dinov2", *TINY)
    assert code == 0, out
    features = read_store(tmp_path / "data" / "features")
    model = fit_positions(load(ref), feature_spec(ref.config, grid(R)))  # type: ignore[arg-type]
    assert model.embeddings.position_embeddings.shape == (1, 1 + 16, 32)
    pixels = torch.from_numpy(np.stack([center_crop_arr(decode_rgb(open_source(images).read_bytes(i)), R) for i in (0, 5)]))
    with torch.inference_mode():
        h = model(pixel_values=dino_input(pixels, R)).last_hidden_state  # (2, 1 + 16, 32): no registers
    assert features["patch"].shape == (12, 16, 32)
    np.testing.assert_allclose(features["patch"][[0, 5]], h[:, 1:].half().numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(features["cls"][[0, 5]], h[:, 0].half().numpy(), rtol=1e-3, atol=1e-3)

    (tmp_path / "swin").mkdir()
    (tmp_path / "swin" / "config.json").write_text('{"model_type": "swin", "hidden_size": 32}')
    code, out = redi("features", images, "--data", tmp_path / "other", "--encoder", tmp_path / "swin", *TINY)
    assert code == 2 and "'swin' model" in out


def test_verify_finds_a_damaged_chunk_and_repair_rewrites_only_it(images: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    args = ["encode", images, "--data", data, "--vae", "tiny-random", "--chunk-size", "5", *TINY]
    assert redi(*args)[0] == 0
    want = read_store(data / "latents")
    chunk_file = data / "latents" / "store.zarr" / "moments" / "c" / "1" / "0" / "0" / "0"
    chunk_file.write_bytes(chunk_file.read_bytes()[:-4] + b"\0\0\0\0")  # silently changed on disk
    from redi.pipeline.verify import verify_data

    (check, *_) = verify_data(data, progress=False)
    assert check.status == "FAILED" and "store.zarr/moments/c/1/0/0/0 is missing or changed" in check.details
    assert "--repair" in check.details and redi("verify", data)[0] == 2
    (check, *_) = verify_data(data, progress=False, repair=True)
    assert "forgot their 1 chunks" in check.details
    code, out = redi(*args)
    assert code == 0 and "1 of 3 chunks to do" in out, out
    got = read_store(data / "latents")
    assert all(want[k].tobytes() == got[k].tobytes() for k in want)
    chunk_file.unlink()  # a lost file is found the same way
    assert "missing or changed" in verify_data(data, progress=False)[0].details
    assert redi("verify", data, "--repair")[0] == 2 and redi(*args)[0] == 0 and redi("verify", data)[0] == 0


def test_verify_warns_when_latents_and_features_come_from_other_images(images: Path, tmp_path: Path) -> None:
    from redi.pipeline.verify import verify_data

    other = write_demo_images(tmp_path / "other", 5).out
    data = tmp_path / "data"
    assert redi("encode", images, "--data", data, "--vae", "tiny-random", *TINY)[0] == 0
    assert redi("features", other, "--data", data, "--encoder", "tiny-random", *TINY)[0] == 0
    latents, features, *_ = verify_data(data, progress=False)
    assert latents.status == "ok" and features.status == "warning" and "other images" in features.details


def test_a_stage_without_its_manifest_is_refused_not_trusted(images: Path, tmp_path: Path) -> None:
    """Without manifest.json nothing says what the chunks hold: encoding other images there is refused."""
    from redi.pipeline.stage import open_arrays
    from redi.common.errors import UserError

    data = tmp_path / "data"
    assert redi("encode", images, "--data", data, "--vae", "tiny-random", *TINY)[0] == 0
    (data / "latents" / "manifest.json").unlink()
    other = write_demo_images(tmp_path / "other", 5).out
    code, out = redi("encode", other, "--data", data, "--vae", "tiny-random", *TINY)
    assert code == 2 and "no manifest.json" in out and "--force" in out, out
    code, out = redi("encode", other, "--data", data, "--vae", "tiny-random", *TINY, "--force")
    assert code == 0 and len(json.loads((data / "latents" / "keys.json").read_text())) == 5, out
    with pytest.raises(UserError, match="pass --force"):  # a store of another image count: one sentence
        open_arrays(data / "latents", 12, {"moments": (8, R // 8, R // 8)}, 256, "float16")
