"""Stage `pca`: exactness against scikit-learn, streaming, subset draw, reference import, cache."""
from __future__ import annotations

import hashlib
import json
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
import zarr
from click.testing import CliRunner
from PIL import Image
from sklearn.decomposition import PCA

from redi.benchmarks.pca import peak_rss_growth
from redi.cli import app
from redi.common.errors import UserError
from redi.pipeline.pca import PCA_FILE, PLOT_FILE, PCAConfig, fit_pca, load_reference_pca, open_features, select_images
from redi.pipeline.pca_file import load_pca
from redi.pipeline.stage import ChunkError, Manifest, StageDir

CHUNK = 16  # images per zarr chunk and per committed stage chunk
BAD_VALUE = 1000.0  # what invalid images hold: any read of them spoils the fit
REDI = typer.main.get_group(app)  # the `redi` group, also while `pca` is its only command


def make_tokens(n_images: int, p: int, d: int, seed: int = 0) -> np.ndarray:
    """(N, P, D) float16 tokens with a spread spectrum and per-dimension offsets and scales."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) * np.linspace(2.0, 0.2, d)[:, None]  # (D, D)
    z = rng.standard_normal((n_images * p, d)) @ mix * rng.uniform(0.5, 3.0, d) + rng.uniform(-2.0, 2.0, d)
    return z.reshape(n_images, p, d).astype(np.float16)


def make_features(data: Path, tokens: np.ndarray, valid: np.ndarray) -> None:
    """A complete `features/` stage (docs/FORMATS.md) holding these tokens; invalid rows hold BAD_VALUE."""
    n, p, d = tokens.shape
    root = data / "features"
    stage = StageDir(root, n_chunks=-(-n // CHUNK))
    manifest = Manifest(stage="features", params={"resolution": 256, "chunk_size": CHUNK, "dtype": "float16",
                                                  "arrays": {"patch": [p, d]}},
                        encoder={"id": "tiny-random", "kind": "tiny-random", "dim": d},
                        source={"kind": "synthetic", "fingerprint": "test", "count": n}, tiny_random=True)
    stage.open(manifest, force=False)
    group = zarr.open_group(root / "store.zarr", mode="w")
    patch = group.create_array("patch", shape=(n, p, d), dtype="float16", chunks=(CHUNK, p, d))
    patch[:] = np.where(valid[:, None, None], tokens, np.float16(BAD_VALUE))
    group.create_array("valid", shape=(n,), dtype="bool", chunks=(CHUNK,))[:] = valid
    for c in range(stage.n_chunks):
        bad = [i for i in range(c * CHUNK, min(n, (c + 1) * CHUNK)) if not valid[i]]
        stage.commit(c, [ChunkError(index=i, key=f"img{i}", reason="unreadable") for i in bad])
    stage.finish()


def some_invalid(n: int, seed: int = 1) -> np.ndarray:
    valid = np.ones(n, dtype=bool)
    valid[np.random.default_rng(seed).choice(n, size=n // 8, replace=False)] = False
    return valid


def assert_rows_equal_up_to_sign(a: np.ndarray, b: np.ndarray, rtol: float) -> None:
    signs = np.sign(np.sum(a * b, axis=1, keepdims=True))
    assert np.all(signs != 0)
    np.testing.assert_allclose(a, signs * b, rtol=0, atol=rtol * np.abs(b).max())


@pytest.fixture
def small_data(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    tokens, valid = make_tokens(240, 8, 24), some_invalid(240)
    make_features(tmp_path, tokens, valid)
    return tmp_path, tokens, valid


def test_fit_equals_sklearn_on_standardised_tokens(small_data: tuple[Path, np.ndarray, np.ndarray]) -> None:
    data, tokens, valid = small_data
    cfg = PCAConfig(num_images=150, seed=3, device="cpu", batch_images=7)
    model = fit_pca(open_features(data / "features"), cfg)

    chosen = select_images(valid, 150, 3)
    z = tokens[chosen].reshape(-1, tokens.shape[2]).astype(np.float64)  # (T, D)
    mu, std = z.mean(0), z.std(0)  # ddof=0, as the reference calc_pca.py
    ref = PCA().fit((z - mu) / std)

    np.testing.assert_allclose(model.mu, mu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(model.std, std, rtol=1e-12)
    np.testing.assert_allclose(model.explained_variance, ref.explained_variance_, rtol=1e-8)
    np.testing.assert_allclose(model.explained_variance_ratio, ref.explained_variance_ratio_, rtol=1e-8)
    assert_rows_equal_up_to_sign(model.components, ref.components_, rtol=1e-6)
    assert np.abs(ref.mean_).max() < 1e-12 and np.all(model.pca_mean == 0)
    assert (model.n_images, model.n_tokens, model.seed) == (150, z.shape[0], 3)
    top = np.abs(model.components).argmax(1)
    assert np.all(model.components[np.arange(len(top)), top] > 0), "largest-|.| entry of each row positive"

    # SPEC §4 projection with sklearn's objects equals PCAModel.project (signs aligned to ours).
    r = 5
    signs = np.sign(np.sum(model.components[:r] * ref.components_[:r], axis=1))
    spec = ((z - mu) / std - ref.mean_) @ ref.components_[:r].T * signs  # (T, r)
    ours = model.project(torch.from_numpy(tokens[chosen]), r).reshape(-1, r).double().numpy()
    np.testing.assert_allclose(ours, spec, rtol=0, atol=1e-4 * np.abs(spec).max())


def test_streaming_equals_one_shot(small_data: tuple[Path, np.ndarray, np.ndarray]) -> None:
    data, _, valid = small_data
    features = open_features(data / "features")
    one = fit_pca(features, PCAConfig(num_images=10_000, device="cpu", batch_images=10_000))
    many = fit_pca(features, PCAConfig(num_images=10_000, device="cpu", batch_images=3))
    assert one.n_images == many.n_images == valid.sum()
    for name in ("mu", "std", "explained_variance", "explained_variance_ratio", "components"):
        np.testing.assert_allclose(getattr(many, name), getattr(one, name), rtol=1e-10, atol=1e-12, err_msg=name)


def traced_peak(fn: Callable[[], object]) -> int:
    """Peak bytes of Python/numpy allocations (tracemalloc) while fn runs."""
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_memory_does_not_grow_with_images(tmp_path: Path) -> None:
    n, p, d = 2000, 32, 64
    make_features(tmp_path, make_tokens(n, p, d), np.ones(n, dtype=bool))
    features = open_features(tmp_path / "features")

    def fit(num_images: int) -> Callable[[], object]:
        return lambda: fit_pca(features, PCAConfig(num_images=num_images, device="cpu", batch_images=8))

    all_f16, all_f64 = n * p * d * 2, n * p * d * 8  # holding every token at once needs at least this much
    growth = peak_rss_growth(fit(n))  # first, before other runs leave freed pages to reuse
    assert growth is None or growth < all_f64 / 4, f"resident peak grew by {growth} bytes"
    small, large = traced_peak(fit(200)), traced_peak(fit(n))
    assert small < all_f16 / 4, "probe too weak: the data must dwarf the working set"
    assert large < small + all_f16 / 4, f"numpy peak grew from {small} to {large} bytes with 10× the images"


def test_subset_draw_is_seeded_and_skips_invalid() -> None:
    valid = some_invalid(500, seed=7)
    a, b, c = select_images(valid, 100, 0), select_images(valid, 100, 0), select_images(valid, 100, 1)
    assert len(a) == 100 and np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.all(np.diff(a) > 0) and valid[a].all() and valid[c].all()
    assert np.array_equal(select_images(valid, 10_000, 0), np.flatnonzero(valid))


def test_fit_reads_only_selected_valid_images(small_data: tuple[Path, np.ndarray, np.ndarray]) -> None:
    data, _, valid = small_data
    model = fit_pca(open_features(data / "features"), PCAConfig(num_images=10_000, device="cpu"))
    assert model.n_images == valid.sum() and np.abs(model.mu).max() < 50, "an invalid (BAD_VALUE) image was read"


def test_import_reference_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    p, d = 8, 16
    z = (rng.standard_normal((64 * p, d)) @ rng.standard_normal((d, d)) + 3).astype(np.float32)  # (T, D)
    mean, std = z.mean(0), z.std(0)
    ref = PCA().fit((z - mean) / std + 0.1)  # a nonzero PCA mean, as in the public file
    file = tmp_path / "dino_pca_model.pth"
    torch.save({"pca_model": ref, "mean": torch.from_numpy(mean), "std": std}, file)
    data = tmp_path / "data"
    make_features(data, make_tokens(64, p, d), np.ones(64, dtype=bool))
    runner = CliRunner()

    refused = runner.invoke(REDI, ["pca", "--data", str(data), "--import", str(file)])
    assert refused.exit_code == 2 and "--trust-pickle" in refused.output
    assert not (data / PCA_FILE).exists()

    ok = runner.invoke(REDI, ["pca", "--data", str(data), "--import", str(file), "--trust-pickle"])
    assert ok.exit_code == 0, ok.output
    model = load_pca(data / PCA_FILE)
    assert model.n_tokens == 64 * p and model.n_images == 64 and model.source.startswith("import:")
    np.testing.assert_array_equal(model.components, ref.components_)  # signs kept as in the reference
    r = 4
    tokens = torch.from_numpy(z[:50])
    spec = ((tokens - torch.from_numpy(mean)) / torch.from_numpy(std) - torch.from_numpy(ref.mean_).float()) \
        @ torch.from_numpy(ref.components_[:r]).float().T  # (50, r), the reference formula in float32
    torch.testing.assert_close(model.project(tokens, r), spec, rtol=1e-6, atol=1e-6)  # float32 round-off only
    np.testing.assert_allclose(model.project(tokens, r).numpy(), ref.transform((z[:50] - mean) / std)[:, :r],
                               atol=1e-4)

    again = runner.invoke(REDI, ["pca", "--data", str(data), "--import", str(file), "--trust-pickle"])
    assert again.exit_code == 0 and "nothing to do" in again.output

    torch.save({"pca": ref, "average": mean}, tmp_path / "odd.pth")
    odd = runner.invoke(REDI, ["pca", "--data", str(tmp_path / "d2"), "--import", str(tmp_path / "odd.pth"),
                              "--trust-pickle"])
    assert odd.exit_code == 2 and "average" in odd.output


def test_import_reference_file_without_scikit_learn_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "dino_pca_model.pth"
    torch.save({"pca_model": PCA().fit(np.eye(4)), "mean": np.zeros(4), "std": np.ones(4)}, file)
    for name in [m for m in sys.modules if m.split(".")[0] == "sklearn"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if scikit-learn were not installed
    with pytest.raises(UserError, match=r"needs scikit-learn, pip install -e '\.\[reference\]'"):
        load_reference_pca(file, trust_pickle=True, patch_tokens=4)


def test_rerun_is_cached_and_changed_settings_refused(small_data: tuple[Path, np.ndarray, np.ndarray]) -> None:
    data, _, _ = small_data
    runner = CliRunner()
    args = ["pca", "--data", str(data), "--num-images", "100", "--device", "cpu"]

    first = runner.invoke(REDI, args)
    assert first.exit_code == 0, first.output
    made = (data / PCA_FILE).stat().st_mtime_ns
    with Image.open(data / PLOT_FILE) as img:
        assert img.size[0] > 300 and img.format == "PNG"

    second = runner.invoke(REDI, args)
    assert second.exit_code == 0 and "nothing to do" in second.output
    assert (data / PCA_FILE).stat().st_mtime_ns == made

    changed = runner.invoke(REDI, [*args[:-4], "--num-images", "50", "--device", "cpu"])
    assert changed.exit_code == 2 and "--force" in changed.output and "num_images" in changed.output
    assert load_pca(data / PCA_FILE).n_images == 100

    forced = runner.invoke(REDI, [*args[:-4], "--num-images", "50", "--device", "cpu", "--force"])
    assert forced.exit_code == 0, forced.output
    assert load_pca(data / PCA_FILE).n_images == 50


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fit_equals_cpu_fit(small_data: tuple[Path, np.ndarray, np.ndarray]) -> None:
    data, _, _ = small_data
    features = open_features(data / "features")
    cpu = fit_pca(features, PCAConfig(num_images=100, device="cpu", batch_images=5))
    gpu = fit_pca(features, PCAConfig(num_images=100, device="cuda", batch_images=5))
    for name in ("mu", "std", "explained_variance", "components"):
        np.testing.assert_allclose(getattr(gpu, name), getattr(cpu, name), rtol=1e-9, atol=1e-12, err_msg=name)


def test_refits_of_the_same_features_give_the_same_bytes(small_data: tuple[Path, np.ndarray, np.ndarray]) -> None:
    """safetensors writes its metadata in hash-map order; the saved file sorts it, so rebuilt shards keep their
    pca_sha256 and still serve the runs trained on them."""
    data, _, _ = small_data
    args = ["pca", "--data", str(data), "--num-images", "100", "--device", "cpu"]
    digests = set()
    for _ in range(4):
        for name in (PCA_FILE, "pca.json"):  # a fit from scratch each time (an equal record means nothing to do)
            (data / name).unlink(missing_ok=True)
        result = CliRunner().invoke(REDI, args)
        assert result.exit_code == 0, result.output
        digests.add(hashlib.sha256((data / PCA_FILE).read_bytes()).hexdigest())
    assert len(digests) == 1
    assert json.loads((data / "pca.json").read_text())["pca_sha256"] in digests


def test_pca_metadata_that_is_not_an_integer_is_one_sentence(tmp_path: Path) -> None:
    """safetensors keeps metadata as strings: a count that does not parse is one sentence naming the file."""
    from safetensors.numpy import save_file

    d = 4
    tensors = {name: np.ones(shape) for name, shape in (("mu", d), ("std", d), ("pca_mean", d), ("components", (d, d)),
                                                         ("explained_variance", d), ("explained_variance_ratio", d))}
    save_file(tensors, str(tmp_path / PCA_FILE), metadata={"n_images": "eight", "n_tokens": "32", "seed": "0"})
    with pytest.raises(UserError, match=r"pca\.safetensors is not a readable pca\.safetensors file \(ValueError"):
        load_pca(tmp_path / PCA_FILE)
