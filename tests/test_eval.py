"""`redi eval`: the FID Inception network, ADM's metrics, the ADM .npz readers and the command end to end."""
from __future__ import annotations

import io
import json
import math
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from redi.cli import app
from redi.common.atomic import sha256_file
from redi.common.errors import UserError
from redi.sampler.inception import FIDInceptionV3, he_init_, load_fid_inception, tf_resize_bilinear
from redi.sampler.metrics import (
    FIDStatistics,
    faiss_module,
    feature_statistics,
    frechet_distance,
    inception_score,
    manifold_fraction,
    manifold_radii,
    precision_recall,
    read_adm_batch,
)

DIMS = (2048, 2023)  # pool_3 and mixed_6/conv[..., :7] widths


# ---------------------------------------------------------------- the network


def _basic_convs() -> list[tuple[str, int, int, int, int]]:
    """(module, in, out, kh, kw) of every BasicConv2d of pytorch-fid's FID Inception (torchvision's Inception3 layout)."""
    convs = [
        ("Conv2d_1a_3x3", 3, 32, 3, 3),
        ("Conv2d_2a_3x3", 32, 32, 3, 3),
        ("Conv2d_2b_3x3", 32, 64, 3, 3),
        ("Conv2d_3b_1x1", 64, 80, 1, 1),
        ("Conv2d_4a_3x3", 80, 192, 3, 3),
    ]
    for name, cin, pool in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
        convs += [
            (f"{name}.branch1x1", cin, 64, 1, 1),
            (f"{name}.branch5x5_1", cin, 48, 1, 1),
            (f"{name}.branch5x5_2", 48, 64, 5, 5),
            (f"{name}.branch3x3dbl_1", cin, 64, 1, 1),
            (f"{name}.branch3x3dbl_2", 64, 96, 3, 3),
            (f"{name}.branch3x3dbl_3", 96, 96, 3, 3),
            (f"{name}.branch_pool", cin, pool, 1, 1),
        ]
    convs += [
        ("Mixed_6a.branch3x3", 288, 384, 3, 3),
        ("Mixed_6a.branch3x3dbl_1", 288, 64, 1, 1),
        ("Mixed_6a.branch3x3dbl_2", 64, 96, 3, 3),
        ("Mixed_6a.branch3x3dbl_3", 96, 96, 3, 3),
    ]
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        convs += [
            (f"{name}.branch1x1", 768, 192, 1, 1),
            (f"{name}.branch7x7_1", 768, c7, 1, 1),
            (f"{name}.branch7x7_2", c7, c7, 1, 7),
            (f"{name}.branch7x7_3", c7, 192, 7, 1),
            (f"{name}.branch7x7dbl_1", 768, c7, 1, 1),
            (f"{name}.branch7x7dbl_2", c7, c7, 7, 1),
            (f"{name}.branch7x7dbl_3", c7, c7, 1, 7),
            (f"{name}.branch7x7dbl_4", c7, c7, 7, 1),
            (f"{name}.branch7x7dbl_5", c7, 192, 1, 7),
            (f"{name}.branch_pool", 768, 192, 1, 1),
        ]
    convs += [
        ("Mixed_7a.branch3x3_1", 768, 192, 1, 1),
        ("Mixed_7a.branch3x3_2", 192, 320, 3, 3),
        ("Mixed_7a.branch7x7x3_1", 768, 192, 1, 1),
        ("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7),
        ("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1),
        ("Mixed_7a.branch7x7x3_4", 192, 192, 3, 3),
    ]
    for name, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
        convs += [
            (f"{name}.branch1x1", cin, 320, 1, 1),
            (f"{name}.branch3x3_1", cin, 384, 1, 1),
            (f"{name}.branch3x3_2a", 384, 384, 1, 3),
            (f"{name}.branch3x3_2b", 384, 384, 3, 1),
            (f"{name}.branch3x3dbl_1", cin, 448, 1, 1),
            (f"{name}.branch3x3dbl_2", 448, 384, 3, 3),
            (f"{name}.branch3x3dbl_3a", 384, 384, 1, 3),
            (f"{name}.branch3x3dbl_3b", 384, 384, 3, 1),
            (f"{name}.branch_pool", cin, 192, 1, 1),
        ]
    return convs


def _published_layout_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the key names and shapes of pt_inception-2015-12-05-6726825d.pth (no num_batches_tracked)."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, cin, cout, kh, kw in _basic_convs():
        state[f"{name}.conv.weight"] = torch.randn((cout, cin, kh, kw), generator=gen) * (2 / (cin * kh * kw)) ** 0.5
        state[f"{name}.bn.weight"] = torch.ones(cout)
        state[f"{name}.bn.bias"] = torch.zeros(cout)
        state[f"{name}.bn.running_mean"] = torch.zeros(cout)
        state[f"{name}.bn.running_var"] = torch.ones(cout)
    state["fc.weight"] = torch.randn((1008, 2048), generator=gen) * 0.03
    state["fc.bias"] = torch.randn(1008, generator=gen)
    return state


def test_architecture_has_the_published_keys_and_shapes() -> None:
    state = _published_layout_state_dict()
    assert len(_basic_convs()) == 94
    assert state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert state["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
    assert state["Mixed_6d.branch1x1.conv.weight"].shape == (192, 768, 1, 1)
    assert state["fc.weight"].shape == (1008, 2048)
    ours = {k: tuple(v.shape) for k, v in FIDInceptionV3().state_dict().items() if not k.endswith("num_batches_tracked")}
    assert ours == {k: tuple(v.shape) for k, v in state.items()}
    FIDInceptionV3().load_state_dict(state, strict=True)  # the file's layout, without num_batches_tracked


def test_load_fid_inception_reads_a_file_and_refuses_bad_ones(tmp_path: Path) -> None:
    state = _published_layout_state_dict()
    good = tmp_path / "pt_inception.pth"
    torch.save(state, good)
    net = load_fid_inception(good, torch.device("cpu"))
    assert torch.equal(net.Mixed_6d.branch1x1.conv.weight, state["Mixed_6d.branch1x1.conv.weight"])
    assert not net.training
    with pytest.raises(UserError, match="pytorch-fid/releases"):
        load_fid_inception(None, torch.device("cpu"))
    del state["fc.bias"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(UserError, match=r"fc\.bias"):
        load_fid_inception(tmp_path / "partial.pth", torch.device("cpu"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a PyTorch state dict"):
        load_fid_inception(tmp_path / "junk.pth", torch.device("cpu"))


def test_tf_resize_bilinear_has_no_half_pixel_shift() -> None:
    x = torch.tensor([[[[0.0, 10.0], [20.0, 30.0]]]])  # (1, 1, 2, 2)
    out = tf_resize_bilinear(x, 5)  # source coordinates i·2/5 = 0, .4, .8, 1.2→clamped, 1.6→clamped
    row = torch.tensor([0.0, 4.0, 8.0, 10.0, 10.0])
    expected = torch.stack([row + 20 * t for t in (0.0, 0.4, 0.8, 1.0, 1.0)])
    torch.testing.assert_close(out[0, 0], expected)
    same = torch.rand(1, 3, 299, 299)
    assert torch.equal(tf_resize_bilinear(same, 299), same)


def test_forward_outputs_pool_spatial_and_unbiased_logits() -> None:
    net = he_init_(FIDInceptionV3(), seed=0).eval().requires_grad_(False)
    captured: list[torch.Tensor] = []
    net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.append(o))
    images = torch.randint(0, 256, (2, 32, 40, 3), dtype=torch.uint8)
    with torch.inference_mode():
        feats = net(images)
    assert feats.pool.shape == (2, 2048) and feats.spatial.shape == (2, 2023) and feats.logits.shape == (2, 1008)
    mixed_6_conv = captured[0]  # (2, 192, 17, 17)
    assert mixed_6_conv.shape == (2, 192, 17, 17)
    torch.testing.assert_close(feats.spatial, mixed_6_conv.permute(0, 2, 3, 1)[..., :7].reshape(2, -1))
    torch.testing.assert_close(feats.logits, feats.pool @ net.fc.weight.T)
    assert feats.pool.std() > 1e-3  # the He init keeps signal through the 47 ReLU layers


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_features_match_cpu() -> None:
    from redi.sampler.evaluate import full_fp32

    net = he_init_(FIDInceptionV3(), seed=0).eval()
    images = torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8)
    with torch.inference_mode(), full_fp32():
        cpu = net(images)
        gpu = net.cuda()(images.cuda())
    torch.testing.assert_close(gpu.pool.cpu(), cpu.pool, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gpu.spatial.cpu(), cpu.spatial, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- the metrics


def test_fid_of_a_batch_against_itself_is_zero() -> None:
    rng = np.random.default_rng(0)
    full_rank = feature_statistics(rng.normal(size=(200, 16)))
    assert abs(frechet_distance(full_rank, full_rank)) <= 1e-6
    few = feature_statistics(rng.gamma(2.0, size=(8, 64)) * 30)  # 8 images, 64 dims: Σ has rank 7
    assert few.factor is not None and abs(frechet_distance(few, few)) <= 1e-6
    from_file = FIDStatistics(few.mu, few.sigma)  # as read from an .npz: no factor, rank found by eigh
    assert abs(frechet_distance(from_file, from_file)) <= 1e-6
    assert frechet_distance(from_file, full_rank_64 := feature_statistics(rng.normal(size=(300, 64)))) == pytest.approx(
        frechet_distance(few, full_rank_64), rel=1e-9
    )


def test_fid_equals_the_closed_form_for_diagonal_gaussians() -> None:
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=32), rng.normal(size=32)
    var1, var2 = rng.uniform(0.1, 5, 32), rng.uniform(0.1, 5, 32)
    expected = ((mu1 - mu2) ** 2).sum() + (var1 + var2 - 2 * np.sqrt(var1 * var2)).sum()
    got = frechet_distance(FIDStatistics(mu1, np.diag(var1)), FIDStatistics(mu2, np.diag(var2)))
    assert got == pytest.approx(expected, rel=1e-10)


def test_fid_matches_adm_sqrtm_formula_on_dense_covariances() -> None:
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(2)
    a = feature_statistics(rng.normal(size=(300, 24)) @ rng.normal(size=(24, 24)))
    b = feature_statistics(rng.normal(size=(300, 24)) @ rng.normal(size=(24, 24)) + 0.5)
    covmean = linalg.sqrtm(a.sigma @ b.sigma).real  # ADM's evaluator
    diff = a.mu - b.mu
    adm = diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean)
    assert frechet_distance(a, b) == pytest.approx(adm, rel=1e-9)


def test_inception_score_of_uniform_and_of_confident_predictions() -> None:
    assert inception_score(np.full((20, 1008), 1 / 1008, np.float32)) == pytest.approx(1.0, abs=1e-6)
    one_hot = np.tile(np.eye(10, dtype=np.float32), (2, 1))  # 20 confident predictions, 10 classes, 2 splits of 10
    assert inception_score(one_hot, split_size=10) == pytest.approx(10.0, rel=1e-6)


def test_manifold_search_equals_brute_force() -> None:
    rng = np.random.default_rng(3)
    manifold, queries = rng.normal(size=(60, 8)), rng.normal(size=(40, 8)) * 1.3
    d2 = ((manifold[:, None] - manifold[None]) ** 2).sum(-1)  # (60, 60)
    radii = np.sort(d2, axis=1)[:, 3]  # ADM: k-th column of the sorted row, self at 0
    np.testing.assert_allclose(manifold_radii(manifold, 3), radii, rtol=1e-4)
    inside = (((queries[:, None] - manifold[None]) ** 2).sum(-1) <= radii[None]).any(axis=1)
    assert manifold_fraction(manifold, radii, queries) == pytest.approx(inside.mean())
    assert 0 < inside.mean() < 1  # the check can tell a wrong answer from a right one


def test_precision_recall_on_identical_disjoint_and_subset_sets() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(50, 16)), rng.normal(size=(50, 16)) + 100.0  # two far-apart clusters
    assert precision_recall(a, a) == (1.0, 1.0)
    assert precision_recall(a, b) == (0.0, 0.0)
    precision, recall = precision_recall(np.concatenate([a, b]), a)  # samples cover half the reference
    assert precision == 1.0 and recall == pytest.approx(0.5)


# ---------------------------------------------------------------- ADM .npz batches


def _images(n: int, side: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def _adm_stats() -> dict[str, np.ndarray]:
    return {"mu": np.zeros(2048), "sigma": np.eye(2048), "mu_s": np.zeros(2023), "sigma_s": np.eye(2023)}


def test_read_adm_batch_streams_images_with_and_without_statistics(tmp_path: Path) -> None:
    images = _images(5)
    np.savez(tmp_path / "plain.npz", images, np.arange(5))  # arr_0 images, arr_1 labels (redi sample / ADM)
    plain = read_adm_batch(tmp_path / "plain.npz", DIMS)
    assert (plain.num_images, plain.height, plain.width, plain.pool_stats) == (5, 16, 16, None)
    np.testing.assert_array_equal(np.concatenate(list(plain.batches(2))), images)
    assert [len(b) for b in plain.batches(2)] == [2, 2, 1]
    np.savez_compressed(tmp_path / "ref.npz", arr_0=images, **_adm_stats())  # VIRTUAL_imagenet256_labeled.npz layout
    ref = read_adm_batch(tmp_path / "ref.npz", DIMS)
    assert ref.pool_stats is not None and ref.spatial_stats is not None
    assert ref.spatial_stats.sigma.shape == (2023, 2023)
    np.testing.assert_array_equal(np.concatenate(list(ref.batches(3))), images)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"arr_1": np.zeros(3)}, "has no arr_0"),
        ({"arr_0": np.zeros((2, 8, 8, 3), np.float32)}, "float32, but ADM batches hold uint8"),
        ({"arr_0": np.zeros((2, 8, 8), np.uint8)}, r"shape \(2, 8, 8\)"),
        ({"arr_0": np.zeros((2, 8, 8, 3), np.uint8), "mu": np.zeros(2048)}, "without mu_s, sigma, sigma_s"),
        ({"arr_0": np.zeros((2, 8, 8, 3), np.uint8), **_adm_stats(), "mu": np.zeros(7)}, r"mu/sigma have shapes \(7,\)"),
        ({"arr_0": np.zeros((2, 8, 8, 3), np.uint8), **_adm_stats(), "sigma_s": np.full((2023, 2023), np.nan)}, "not finite"),
    ],
)
def test_read_adm_batch_rejects_malformed_files(tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(UserError, match=message):
        read_adm_batch(tmp_path / "bad.npz", DIMS)


def test_read_adm_batch_rejects_a_non_npz_and_a_truncated_one(tmp_path: Path) -> None:
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(UserError, match=r"not an \.npz file"):
        read_adm_batch(tmp_path / "text.npz", DIMS)
    header = np.lib.format.header_data_from_array_1_0(np.zeros((4, 8, 8, 3), np.uint8))
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    with zipfile.ZipFile(tmp_path / "short.npz", "w") as zf:
        zf.writestr("arr_0.npy", buf.getvalue() + bytes(2 * 8 * 8 * 3))  # header says 4 images, data holds 2
    batch = read_adm_batch(tmp_path / "short.npz", DIMS)
    with pytest.raises(UserError, match="truncated"):
        list(batch.batches(4))


# ---------------------------------------------------------------- the command


def _random_weights(tmp_path: Path) -> Path:
    weights = tmp_path / "inception.pth"
    torch.save(he_init_(FIDInceptionV3(), seed=0).state_dict(), weights)
    return weights


def _sample_json(num: int) -> dict:
    """What `redi sample` writes of an assembled folder (sampler/outputs.py: SampleRecord)."""
    from redi.common.schema import dump
    from redi.pipeline.latent_norm import LatentNorm
    from redi.sampler.settings import CheckpointRef, DecoderRef, ModelRef, SampleSettings
    from redi.trainer.models import ModelConfig

    guidance = {"mode": "cfg+rg", "cfg_scale": 2.4, "rg_scale": 1.5, "cfg_channels": "vae", "cls_cfg_scale": None,
                "interval": None}
    settings = SampleSettings(
        CheckpointRef("0" * 64, 12, "ema"), ModelRef("SiT-debug/2", "redi", 0.2, dump(ModelConfig("debug", "sit"))),
        "sde", 4, {}, 0, guidance, {"mode": "random"},
        DecoderRef({"id": "tiny-random", "kind": "tiny-random"}, LatentNorm("config", (0.0,) * 4, (0.18215,) * 4).record()),
        "fp32", "nearest", True)
    return {"settings": dump(settings), "checkpoint_path": "run/checkpoints/step-0000012.pt", "complete": True, "num": num}


def test_redi_eval_end_to_end(tmp_path: Path) -> None:
    weights = _random_weights(tmp_path)
    run_dir = tmp_path / "samples"
    run_dir.mkdir()
    np.savez(run_dir / "samples.npz", _images(4, seed=1), np.zeros(4, np.int64))
    (run_dir / "sample.json").write_text(json.dumps(_sample_json(4)))
    np.savez(tmp_path / "ref.npz", arr_0=_images(5, side=24, seed=2))
    runner = CliRunner()

    missing = runner.invoke(app, ["eval", str(run_dir / "samples.npz"), "--ref", str(tmp_path / "ref.npz")], env={"REDI_INCEPTION": ""})
    assert missing.exit_code == 2 and "--inception" in missing.output

    args = ["eval", str(run_dir / "samples.npz"), "--ref", str(tmp_path / "ref.npz"), "--inception", str(weights)]
    result = runner.invoke(app, [*args, "--batch-size", "3", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads((run_dir / "samples.eval.json").read_text())
    assert set(report["metrics"]) == {"inception_score", "fid", "sfid", "precision", "recall"}
    assert all(np.isfinite(v) for v in report["metrics"].values())
    assert report["metrics"]["inception_score"] >= 1.0 and report["metrics"]["fid"] > 0 and report["metrics"]["sfid"] > 0
    assert 0.0 <= report["metrics"]["precision"] <= 1.0 and 0.0 <= report["metrics"]["recall"] <= 1.0
    assert report["sample_settings"] == _sample_json(4) and report["card"]["guidance"]["mode"] == "cfg+rg"
    assert not report["ref"]["precomputed_stats"] and not report["samples"]["precomputed_stats"]
    assert report["inception"]["official"] is False and "not comparable" in result.output
    card = report["card"]
    assert card["inception_sha256"] == sha256_file(weights) and card["ref_sha256"] == sha256_file(tmp_path / "ref.npz")
    assert card["num_samples"] == 4 and card["metrics"] == ["fid", "sfid", "is", "pr"] and card["seconds"] > 0
    assert (report["samples"]["num_images"], report["ref"]["num_images"]) == (4, 5)
    assert "INFO features of samples.npz 4/4 (100%) | " in result.output  # stderr is not a terminal: plain lines

    bad = tmp_path / "bad.npz"
    np.savez(bad, arr_0=np.zeros((4, 8, 8, 3), np.float32))
    refused = runner.invoke(app, [*args[:1], str(bad), *args[2:]])
    assert refused.exit_code == 2 and "uint8" in refused.output


def test_evaluate_uses_the_reference_files_statistics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from redi.sampler import evaluate as evaluate_module

    seen: list[tuple[FIDStatistics, FIDStatistics]] = []
    # Record the statistics compared instead of paying two 2048-wide eigendecompositions on the CI's CPU.
    monkeypatch.setattr(evaluate_module, "frechet_distance", lambda a, b: seen.append((a, b)) or 0.0)
    np.savez(tmp_path / "samples.npz", _images(4, seed=1))
    np.savez(tmp_path / "ref.npz", arr_0=_images(4, seed=2), **_adm_stats())
    out = tmp_path / "report.json"
    cfg = evaluate_module.EvalConfig(
        samples=tmp_path / "samples.npz", ref=tmp_path / "ref.npz", inception=_random_weights(tmp_path), device="cpu", out=out
    )
    result = evaluate_module.evaluate(cfg)
    (sample_pool, ref_pool), (sample_spatial, ref_spatial) = seen
    assert np.array_equal(ref_pool.sigma, np.eye(2048)) and np.array_equal(ref_spatial.sigma, np.eye(2023))
    assert sample_pool.factor is not None and sample_spatial.mu.shape == (2023,)  # computed from the 4 samples
    assert result.precomputed_ref_stats and json.loads(out.read_text())["ref"]["precomputed_stats"]
    assert result.out == out and result.num_ref == 4
    # 4 samples against 2048 features: said, once (the reference's statistics are its file's), and in the report.
    few = [w for w in result.warnings if "fewer than the 2,048 Inception features" in w]
    assert len(few) == 1 and few[0].startswith("samples.npz holds 4 images")
    assert json.loads(out.read_text())["warnings"] == result.warnings


def test_eval_without_the_reference_batch_says_where_to_get_it(tmp_path: Path) -> None:
    from redi.sampler.evaluate import EvalConfig, evaluate

    np.savez(tmp_path / "samples.npz", _images(4, seed=1))
    cfg = EvalConfig(samples=tmp_path / "samples.npz", ref=tmp_path / "VIRTUAL_imagenet256_labeled.npz", device="cpu")
    with pytest.raises(UserError, match=r"does not exist: download .*guided-diffusion.*ref_batches/imagenet/256/"):
        evaluate(cfg)


def test_eval_without_faiss_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # as if the `eval` extra were not installed
    with pytest.raises(UserError, match=r"pip install -e '\.\[eval\]'.*pip install faiss-cpu"):
        faiss_module()


# ---------------------------------------------------------------- FD-DINOv2


def edm2_dinov2_detector(model: torch.nn.Module, images: torch.Tensor, offset: float, antialias: bool) -> torch.Tensor:
    """edm2 calculate_metrics.py `DINOv2Detector.__call__` (resize_mode 'torch') on uint8 NCHW images, through torch.hub
    dinov2's `DinoVisionTransformer.forward` (vision_transformer.py: prepare_tokens_with_masks with its
    `interpolate_pos_encoding`, blocks, norm, x_norm_clstoken), on the transformers weights of `model` as loaded
    (its table the checkpoint's). `dinov2_vitl14`: interpolate_offset 0.1, interpolate_antialias False; the `_reg` models:
    0.0 and True."""
    x = torch.nn.functional.interpolate(images.to(torch.float32), size=(224, 224), mode="bicubic", antialias=True)
    x = x.to(torch.float32) / 255
    x = x - torch.tensor([0.485, 0.456, 0.406]).reshape(1, -1, 1, 1)
    x = x / torch.tensor([0.229, 0.224, 0.225]).reshape(1, -1, 1, 1)
    e = model.embeddings
    b, _, w, h = x.shape
    tokens = torch.cat((e.cls_token.expand(b, -1, -1), e.patch_embeddings(x)), dim=1)
    pos_embed = e.position_embeddings.float()  # interpolate_pos_encoding (npatch ≠ N)
    n, dim, patch = pos_embed.shape[1] - 1, tokens.shape[-1], model.config.patch_size
    m, w0, h0 = int(math.sqrt(n)), w // patch, h // patch
    kwargs = {"scale_factor": (float(w0 + offset) / m, float(h0 + offset) / m)} if offset else {"size": (w0, h0)}
    patch_pos_embed = torch.nn.functional.interpolate(pos_embed[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2),
                                                      mode="bicubic", antialias=antialias, **kwargs)
    assert (w0, h0) == patch_pos_embed.shape[-2:]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    tokens = tokens + torch.cat((pos_embed[:, 0].unsqueeze(0), patch_pos_embed), dim=1)
    registers = getattr(e, "register_tokens", None)
    if registers is not None:
        tokens = torch.cat((tokens[:, :1], registers.expand(b, -1, -1), tokens[:, 1:]), dim=1)
    for block in model.encoder.layer:
        tokens = block(tokens)
    return model.layernorm(tokens)[:, 0]


@pytest.mark.parametrize("side", [256, 512])
@pytest.mark.parametrize(("family", "offset", "antialias"), [("dinov2", 0.1, False), ("dinov2-reg", 0.0, True)])
def test_fd_dinov2_features_equal_edm2s_detector(family: str, offset: float, antialias: bool, side: int) -> None:
    """DINOv2 with the real checkpoints' 37×37 table (image_size 518, patch 14): our features equal edm2's detector
    written from its code, as dinov2_vitl14 (offset scale factor, not antialiased) and as the `_reg` models."""
    from redi.pipeline.encoders import ENCODER, load, resolve
    from redi.sampler.fd_dinov2 import DinoV2Features

    fd = DinoV2Features(f"tiny-random:{family}", torch.device("cpu"))
    checkpoint = load(resolve(ENCODER, f"tiny-random:{family}"))
    assert checkpoint.embeddings.position_embeddings.shape[1] == 1 + 37 * 37
    images = torch.from_numpy(_images(3, side=side, seed=side))  # uint8 (3, S, S, 3)
    with torch.inference_mode():
        ours, edm2 = fd(images), edm2_dinov2_detector(checkpoint, images.permute(0, 3, 1, 2), offset, antialias)
    assert float((ours - edm2).norm() / edm2.norm()) <= 1e-6
    assert (fd.record()["position_table"] is not None) == (family == "dinov2")  # resampled once, the hub's way


def test_fd_dinov2_takes_the_normed_cls_token_and_refuses_encoders_without_one() -> None:
    from redi.sampler.fd_dinov2 import DinoV2Features, edm2_input

    fd = DinoV2Features("tiny-random", torch.device("cpu"))
    images = torch.from_numpy(_images(2, side=32, seed=5))
    hidden = fd._model(pixel_values=edm2_input(images)).last_hidden_state  # (2, 1 + 4 + 256, 32)
    assert torch.equal(fd(images), hidden[:, 0]) and fd.dim == 32 and not fd.comparable
    normed = fd._model.layernorm.weight.detach()  # the final LayerNorm ran: unit variance times its weight
    assert torch.allclose(fd(images).var(dim=1, unbiased=False), torch.full((2,), float(normed.pow(2).mean())), rtol=0.2)
    with pytest.raises(UserError, match="no CLS token"):
        DinoV2Features("tiny-random:ijepa", torch.device("cpu"))


def test_fd_dinov2_of_a_shifted_and_scaled_set_equals_the_closed_form() -> None:
    from redi.sampler.evaluate import score
    from redi.sampler.metrics import AdmBatch

    rng = np.random.default_rng(0)
    # Columns orthonormal and orthogonal to the ones vector: 64 features of exactly zero mean and unit covariance.
    f = np.linalg.qr(np.c_[np.ones(64), rng.standard_normal((64, 8))])[0][:, 1:] * np.sqrt(63)  # (64, 8)
    ref = AdmBatch(Path("ref.npz"), 64, 8, 8, None, None)
    shift = rng.standard_normal(8)
    same = score(("fd_dinov2",), {"dinov2": f}, {"dinov2": f}, ref)["fd_dinov2"]
    moved = score(("fd_dinov2",), {"dinov2": 1.5 * f + shift}, {"dinov2": f}, ref)["fd_dinov2"]
    assert abs(same) < 1e-9
    assert moved == pytest.approx(shift @ shift + 8 * (1.5 - 1.0) ** 2, rel=1e-9)  # ‖Δμ‖² + Σ (σa − σb)²


def test_redi_eval_fd_dinov2_alone_needs_no_inception_and_a_set_against_itself_is_zero(tmp_path: Path) -> None:
    np.savez(tmp_path / "samples.npz", _images(40, side=32, seed=6))
    args = ["eval", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "samples.npz"), "--metrics", "fd_dinov2",
            "--fd-encoder", "tiny-random", "--device", "cpu", "--out", str(tmp_path / "report.json")]
    result = CliRunner().invoke(app, args, env={"REDI_INCEPTION": ""})
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert list(report["metrics"]) == ["fd_dinov2"] and abs(report["metrics"]["fd_dinov2"]) < 1e-6
    assert report["inception"] is None and report["fd_encoder"]["identity"]["kind"] == "tiny-random"
    assert "FD-DINOv2" in result.output and "not comparable" in result.output
    card = report["card"]
    assert card["metrics"] == ["fd_dinov2"] and card["num_samples"] == 40 and card["inception_sha256"] is None
    assert card["ref_sha256"] == report["ref"]["sha256"] and card["checkpoint"] is None  # no sample.json: not known
    unknown = CliRunner().invoke(app, [*args[:4], "--metrics", "fid,kid"])
    assert unknown.exit_code == 2 and "--metrics takes a comma list" in unknown.output


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "no answer"])
def test_fd_dinov2_offline_fails_at_once_naming_the_flag_and_the_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline: str) -> None:
    """Without the network: one sentence within seconds (not the hub client's ~23 s of retries) naming --fd-encoder and
    DINOv2 ViT-L/14, the network the metric needs."""
    import time

    from huggingface_hub import constants, try_to_load_from_cache

    from redi.pipeline import encoders
    from redi.sampler.fd_dinov2 import DEFAULT_FD_ENCODER

    if isinstance(try_to_load_from_cache(DEFAULT_FD_ENCODER, "config.json"), str):
        pytest.skip(f"{DEFAULT_FD_ENCODER} is in this machine's Hugging Face cache: it loads offline")
    encoders._hub_answers.cache_clear()  # the probe's answer is kept per process: ask again here, and after
    if offline == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    np.savez(tmp_path / "samples.npz", _images(4, seed=1))
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "samples.npz"),
                                      "--metrics", "fd_dinov2", "--device", "cpu"])
    seconds = time.perf_counter() - started
    encoders._hub_answers.cache_clear()
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and said.count("error:") == 1 and "Retrying" not in said, said
    assert "--fd-encoder /path/to/dinov2-large" in said and "DINOv2 ViT-L/14" in said and "--encoder " not in said
    assert seconds < 5, f"{seconds:.1f} s"
