"""FID, sFID, Inception Score, precision and recall as ADM's evaluator computes them, and its .npz batches.

Reference: openai/guided-diffusion `evaluations/evaluator.py` (TensorFlow). Differences,
all below the metrics' reporting precision:
- Fréchet distance: ADM takes `scipy.linalg.sqrtm(Σ1·Σ2)`; here tr √(Σ1Σ2) is the sum of
  singular values of A1ᵀA2 with Σi = AiAiᵀ (rank-revealing eigen-factors, float64). Equal
  in exact arithmetic; stable where Σ is singular (fewer images than dimensions, dead
  channels), where sqrtm returns garbage or ADM falls back to adding 1e-6 to the diagonal.
- Precision/recall: ADM computes the pairwise squared distances in float16 (float32 if
  that overflows); here faiss computes them exactly in float32.
- Inception Score: the same formula in float64 instead of float32.
"""
from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from redi.common.errors import UserError

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")  # ADM's precomputed pool_3 and spatial statistics


@dataclass(frozen=True)
class FIDStatistics:
    """The Gaussian fitted to a set of Inception features, as ADM's `FIDStatistics`."""

    mu: np.ndarray  # (D,) float64 mean
    sigma: np.ndarray  # (D, D) float64 covariance (unbiased, np.cov)
    factor: np.ndarray | None = None  # (D, N) with factor·factorᵀ = sigma, kept when N ≤ D (exact, spares an eigh)


def feature_statistics(features: np.ndarray) -> FIDStatistics:
    """Mean and unbiased covariance of (N, D) features, in float64 (ADM: np.mean, np.cov)."""
    assert features.ndim == 2 and len(features) >= 2, f"need (N>=2, D) features, got {features.shape}"
    f = features.astype(np.float64)
    mu = f.mean(axis=0)  # (D,)
    factor = (f - mu).T / np.sqrt(len(f) - 1) if len(f) <= f.shape[1] else None  # (D, N)
    return FIDStatistics(mu=mu, sigma=np.cov(f, rowvar=False), factor=factor)


def _psd_factor(stats: FIDStatistics) -> np.ndarray:
    """A (D, r) with A·Aᵀ = Σ; from eigh, keeping only the eigen-directions above round-off (numpy's rank tolerance)."""
    if stats.factor is not None:
        return stats.factor
    lam, vec = np.linalg.eigh(stats.sigma)  # ascending eigenvalues, orthonormal columns
    keep = lam > lam.max(initial=0.0) * stats.sigma.shape[0] * np.finfo(np.float64).eps
    return vec[:, keep] * np.sqrt(lam[keep])  # (D, r)


def frechet_distance(a: FIDStatistics, b: FIDStatistics) -> float:
    """‖μa − μb‖² + tr Σa + tr Σb − 2 tr √(Σa Σb): the Fréchet distance of two Gaussians (FID, sFID)."""
    assert a.mu.shape == b.mu.shape and a.sigma.shape == b.sigma.shape, (
        f"statistics of different widths: {a.mu.shape} vs {b.mu.shape}"
    )
    diff = a.mu - b.mu  # (D,)
    # Σa Σb = Fa Faᵀ Fb Fbᵀ has the eigenvalues of (FaᵀFb)(FaᵀFb)ᵀ, so tr √(ΣaΣb) = Σ singular values of FaᵀFb.
    tr_covmean = np.linalg.svd(_psd_factor(a).T @ _psd_factor(b), compute_uv=False).sum()
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * tr_covmean)


def inception_score(probs: np.ndarray, split_size: int = 5000) -> float:
    """Mean over splits of exp E_x KL(p(y|x) ‖ p(y)), splits of `split_size` images (ADM: 5000, i.e. 10 for 50K)."""
    tiny = np.finfo(np.float64).tiny  # makes 0·log 0 = 0 without a warning
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start : start + split_size].astype(np.float64)  # (S, C) softmax rows
        marginal = part.mean(axis=0, keepdims=True)  # (1, C) p(y)
        kl = part * (np.log(np.maximum(part, tiny)) - np.log(np.maximum(marginal, tiny)))  # (S, C)
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


def faiss_module() -> ModuleType:
    """faiss, imported only here: precision/recall need it, sampling and training must not (the `eval` extra)."""
    try:
        import faiss
    except ImportError:
        raise UserError("redi eval needs faiss for precision and recall: pip install -e '.[eval]' in redi's checkout "
                        "(or pip install faiss-cpu).") from None
    return faiss


def manifold_radii(features: np.ndarray, k: int = 3) -> np.ndarray:
    """Squared L2 distance of each feature to its k-th nearest neighbour, itself counted as the 0-th (ADM)."""
    assert len(features) > k, f"need more than k={k} features for the k-NN radii, got {len(features)}"
    x = np.ascontiguousarray(features, dtype=np.float32)  # (N, D)
    index = faiss_module().IndexFlatL2(x.shape[1])  # exact search
    index.add(x)
    dist, _ = index.search(x, k + 1)  # (N, k+1) squared distances, ascending, self first
    return dist[:, k].astype(np.float64)  # (N,)


def manifold_fraction(manifold: np.ndarray, radii: np.ndarray, queries: np.ndarray) -> float:
    """Fraction of `queries` inside ∪ᵢ ball(manifoldᵢ, radiiᵢ), radii squared (ADM's `evaluate_pr`).

    ‖q − r‖² ≤ ρ_r  ⇔  [2q, 1]·[r, ρ_r − ‖r‖²] ≥ ‖q‖², so one exact maximum-inner-product
    search (faiss IndexFlatIP, top 1) answers "is q in some ball" for every query.
    """
    m = manifold.astype(np.float64)  # (M, D)
    q = queries.astype(np.float64)  # (Q, D)
    db = np.concatenate([m, (radii - (m * m).sum(axis=1))[:, None]], axis=1)  # (M, D+1)
    qs = np.concatenate([2.0 * q, np.ones((len(q), 1))], axis=1)  # (Q, D+1)
    index = faiss_module().IndexFlatIP(db.shape[1])
    index.add(np.ascontiguousarray(db, dtype=np.float32))
    best, _ = index.search(np.ascontiguousarray(qs, dtype=np.float32), 1)  # (Q, 1)
    return float(np.mean(best[:, 0] >= (q * q).sum(axis=1)))


def precision_recall(ref: np.ndarray, samples: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN balls, as ADM's evaluator.

    Precision: the fraction of samples inside the reference manifold; recall: the fraction
    of reference images inside the sample manifold.
    """
    shift = ref.astype(np.float64).mean(axis=0)  # distances are translation-invariant; centring keeps float32 sums small
    ref_c, samples_c = ref - shift, samples - shift  # (N_ref, D), (N_samples, D)
    precision = manifold_fraction(ref_c, manifold_radii(ref_c, k), samples_c)
    recall = manifold_fraction(samples_c, manifold_radii(samples_c, k), ref_c)
    return precision, recall


@dataclass(frozen=True)
class AdmBatch:
    """An ADM-format batch: `arr_0` uint8 (N, H, W, 3) images, optionally ADM's precomputed statistics."""

    path: Path  # the .npz file
    num_images: int  # N
    height: int  # H
    width: int  # W
    pool_stats: FIDStatistics | None  # `mu`, `sigma` (pool_3) when the file carries them
    spatial_stats: FIDStatistics | None  # `mu_s`, `sigma_s` (mixed_6/conv) when the file carries them

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Stream `arr_0` in (B, H, W, 3) uint8 batches without loading the whole array."""
        with zipfile.ZipFile(self.path) as zf, zf.open("arr_0.npy") as f:
            _read_npy_header(f, self.path)
            row = self.height * self.width * 3
            for start in range(0, self.num_images, batch_size):
                n = min(batch_size, self.num_images - start)
                data = f.read(n * row)
                if len(data) != n * row:
                    raise UserError(f"{self.path} is truncated: arr_0 ends after {start + len(data) // row} of {self.num_images} images.")
                yield np.frombuffer(bytearray(data), dtype=np.uint8).reshape(n, self.height, self.width, 3)  # writable


def _read_npy_header(f: zipfile.ZipExtFile, path: Path) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype of an .npy stream, leaving it at the first data byte."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(f)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(f)
    except ValueError as e:
        raise UserError(f"{path}: arr_0 is not a valid .npy array ({e}).") from None
    raise UserError(f"{path}: arr_0 uses .npy format version {version}; save it with numpy.savez (version 1.0 or 2.0).")


def read_adm_batch(path: Path, expected_dims: tuple[int, int]) -> AdmBatch:
    """Open and check an ADM .npz batch; `expected_dims` = (pool, spatial) widths of precomputed statistics."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory; pass the .npz file (e.g. {path / 'samples.npz'}).")
    if not path.is_file():
        raise UserError(f"{path} does not exist.")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise UserError(f"{path} is not an .npz file (not a zip archive written by numpy.savez).") from None
    with zf:
        names = {n.removesuffix(".npy") for n in zf.namelist() if n.endswith(".npy")}
        if "arr_0" not in names:
            raise UserError(f"{path} has no arr_0 (it holds {', '.join(sorted(names)) or 'nothing'}); ADM batches store the images as arr_0.")
        with zf.open("arr_0.npy") as f:
            shape, fortran, dtype = _read_npy_header(f, path)
    if dtype != np.uint8:
        raise UserError(f"{path}: arr_0 is {dtype}, but ADM batches hold uint8 images (0–255).")
    if len(shape) != 4 or shape[3] != 3:
        raise UserError(f"{path}: arr_0 has shape {shape}, but ADM batches are N×H×W×3 (RGB, channels last).")
    if fortran:
        raise UserError(f"{path}: arr_0 is stored in Fortran order; save a C-contiguous array (numpy.ascontiguousarray).")
    present = [k for k in STAT_KEYS if k in names]
    pool_stats = spatial_stats = None
    if present:
        if len(present) != len(STAT_KEYS):
            missing = sorted(set(STAT_KEYS) - set(present))
            raise UserError(f"{path} has precomputed statistics without {', '.join(missing)}; ADM files carry all of {', '.join(STAT_KEYS)}.")
        with np.load(path) as npz:
            pool_stats = _checked_stats(path, npz["mu"], npz["sigma"], expected_dims[0], "mu/sigma")
            spatial_stats = _checked_stats(path, npz["mu_s"], npz["sigma_s"], expected_dims[1], "mu_s/sigma_s")
    return AdmBatch(path, num_images=shape[0], height=shape[1], width=shape[2], pool_stats=pool_stats, spatial_stats=spatial_stats)


def _checked_stats(path: Path, mu: np.ndarray, sigma: np.ndarray, dim: int, name: str) -> FIDStatistics:
    """Precomputed statistics after a shape check against the network's feature width."""
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise UserError(f"{path}: {name} have shapes {mu.shape} and {sigma.shape}, expected ({dim},) and ({dim}, {dim}).")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserError(f"{path}: {name} hold values that are not finite; use another reference batch.")
    return FIDStatistics(mu=mu.astype(np.float64), sigma=sigma.astype(np.float64))
