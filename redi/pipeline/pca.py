"""Stage `pca`: fit (or import) the standardised PCA of DINOv2 patch tokens (docs/METHOD.md).

The fit is exact and streams: one pass over the selected images accumulates, in float64,
the sum and the sum of outer products of the raw tokens (shifted by the first batch's mean
for numerical safety). The mean μ, the std s and the covariance of the standardised tokens
follow analytically, Cov((z − μ)/s) = S⁻¹ Cov(z) S⁻¹ with S = diag(s), and its
eigendecomposition is the PCA. Memory depends on the batch size and D, never on the
number of images.
"""
from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import zarr

from redi.common.atomic import atomic_write_json, atomic_write_with, remove_temporaries, sha256_file, try_read_json
from redi.common.display import counting
from redi.common.errors import UserError
from redi.common.lock import exclusive
from redi.common.runtime import resolve_device
from redi.common.schema import Range, Shaped, check_ranges, same_json, try_load
from redi.common.stamp import content_digest
from redi.pipeline.pca_file import PCA_FILE, PCAModel, PCARecord, parse_pca, read_pca_bytes
from redi.pipeline.stage import ZARR_METADATA_ERRORS, Identity, InputCheck, Manifest, diff_keys, open_array, read_errors, \
    read_manifest

if TYPE_CHECKING:  # the stage's records read without torch (redi info, shards, verify); the fit and the import load it
    import torch

FEATURES_DIR = "features"
PCA_RECORD = "pca.json"  # the stage cache record: manifest of the run that wrote PCA_FILE, and its hash
PLOT_FILE = "pca_explained_variance.png"
REFERENCE_PATCH_TOKENS = 256  # 16×16 DINOv2-B/14 grid at R = 256, the public reference file's setting
PLOT_COMPONENTS = 32  # components shown in the summary table and the plot

# Key names the public ReDi `dino_pca_model.pth` may use for its three entries.
REFERENCE_PCA_KEYS = ("pca_model", "pca", "model")
REFERENCE_MEAN_KEYS = ("mean", "mu")
REFERENCE_STD_KEYS = ("std", "sigma")


@dataclass(frozen=True)
class PCAConfig:
    """How to fit the PCA (docs/METHOD.md) on the patch tokens of a features store: the flags of `redi pca`."""

    num_images: Annotated[int, Range(1)] = 76_800
    """Images drawn at random (seeded) among the valid ones; all if fewer.

    Uniformly, without replacement."""
    seed: Annotated[int, Range(0)] = 0
    """Seed of the image draw."""
    device: str = "auto"
    """Where the float64 accumulation runs: auto, cpu, cuda or cuda:N."""
    batch_images: Annotated[int, Range(1)] = 128
    """Images read and accumulated per step (bounds memory).

    The working set is about batch_images·P·D·10 bytes."""
    force: bool = False
    """Replace a pca.safetensors made with other settings instead of refusing."""

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass(frozen=True)
class ImportConfig:
    """How to import the public ReDi reference PCA file (`dino_pca_model.pth`)."""

    file: Path
    """The torch-saved dict {"pca_model": sklearn PCA, "mean": (D,), "std": (D,)}."""
    trust_pickle: bool = False
    """Allow unpickling the file (runs code from it); required, since the format is a pickle."""
    force: bool = False
    """Replace a pca.safetensors made with other settings instead of refusing."""


@dataclass(frozen=True)
class PCAResult:
    """What the stage left under the data root."""

    path: Path  # pca.safetensors
    plot: Path  # the explained-variance PNG
    model: PCAModel
    up_to_date: bool  # True when an equal earlier run made the file: nothing was done
    seconds: float  # wall time of the fit or import (0 when up to date)


@dataclass(frozen=True)
class FeatureStore:
    """The inputs of the fit, read from `features/` (docs/FORMATS.md)."""

    patch: zarr.Array  # (N, P, D) float16
    valid: np.ndarray  # (N,) bool
    fingerprint: str  # identifies the features stage's output (see features_fingerprint)
    manifest: Manifest
    check: InputCheck | None = None  # the chunk files read are checked against the features stage's ledger


@dataclass(frozen=True)
class TokenMoments:
    """First and second moments of a set of tokens, float64."""

    n: int  # number of tokens
    mean: np.ndarray  # (D,)
    cov: np.ndarray  # (D, D), biased (divides by n)


def features_fingerprint(features_manifest: Manifest) -> str:
    """SHA-256 of the features manifest (parameters, encoder, source): equal fingerprints, equal features."""
    text = json.dumps(features_manifest.to_json(), sort_keys=True, default=str)
    return "features:" + hashlib.sha256(text.encode()).hexdigest()


def open_features(features_dir: Path) -> FeatureStore:
    """Open a complete features stage for reading; UserError if it is missing or unfinished."""
    features_dir = Path(features_dir)
    manifest = read_manifest(features_dir)
    read_errors(features_dir)  # raises unless every chunk was committed
    store_path = features_dir / "store.zarr"
    patch, valid_arr = (open_array(store_path / name, "rerun `redi features` with --force") for name in ("patch", "valid"))
    if not (patch.ndim == 3 and valid_arr.shape == (patch.shape[0],)):
        raise UserError(f"{store_path} does not hold patch (N, P, D) and valid (N,) arrays; rerun `redi features` "
                        "with --force.")
    check = InputCheck(features_dir, patch.shape[0])
    check.rows("valid", 0, patch.shape[0])
    valid = np.asarray(valid_arr[:], dtype=bool)
    return FeatureStore(patch=patch, valid=valid, fingerprint=features_fingerprint(manifest), manifest=manifest,
                        check=check)


def select_images(valid: np.ndarray, num_images: int, seed: int) -> np.ndarray:
    """Sorted indices of min(num_images, #valid) valid images drawn uniformly without replacement."""
    candidates = np.flatnonzero(valid)
    if candidates.size == 0:
        raise UserError("The features store holds no valid image: nothing to fit the PCA on.")
    if num_images >= candidates.size:
        return candidates
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(candidates, size=num_images, replace=False))


def read_batches(patch: zarr.Array, indices: np.ndarray, batch_images: int,
                 check: Callable[[int, int], None] | None = None) -> Iterator[np.ndarray]:
    """Yield (B, P, D) blocks of the given sorted rows, reading the next block while the caller works;
    `check(first, last)` runs before rows [first, last) are read."""

    def read(start: int) -> np.ndarray:
        rows = indices[start : start + batch_images]
        if check is not None:
            check(int(rows[0]), int(rows[-1]) + 1)
        if rows[-1] - rows[0] + 1 == len(rows):  # contiguous: a plain slice is the cheapest read
            return np.asarray(patch[int(rows[0]) : int(rows[-1]) + 1])
        return np.asarray(patch.get_orthogonal_selection((rows,)))

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: Future[np.ndarray] | None = None
        for start in range(0, len(indices), batch_images):
            upcoming = pool.submit(read, start)
            if pending is not None:
                yield pending.result()  # the caller works on this block while `upcoming` is read
            pending = upcoming
        if pending is not None:
            yield pending.result()


class MomentAccumulator:
    """Streaming float64 sum and sum of outer products of tokens, shifted by a provisional mean."""

    def __init__(self, dim: int, device: torch.device):
        import torch

        self.n = 0
        self.shift: torch.Tensor | None = None  # (D,) first batch's mean: keeps the sums small
        self.s1 = torch.zeros(dim, dtype=torch.float64, device=device)  # Σ (z − shift)
        self.s2 = torch.zeros(dim, dim, dtype=torch.float64, device=device)  # Σ (z − shift)(z − shift)ᵀ
        self.device = device

    def update(self, tokens: np.ndarray) -> None:
        """Add a block of tokens of shape (..., D)."""
        import torch

        x = torch.from_numpy(tokens).to(self.device).reshape(-1, self.s1.shape[0]).to(torch.float64)  # (T, D)
        if self.shift is None:
            self.shift = x.mean(0)  # (D,)
        x.sub_(self.shift)  # (T, D)
        self.s1 += x.sum(0)  # (D,)
        self.s2.addmm_(x.T, x)  # (D, D)
        self.n += x.shape[0]

    def moments(self) -> TokenMoments:
        """Mean and biased covariance of everything added so far."""
        assert self.shift is not None and self.n > 0, "moments() before any update()"
        d = self.s1 / self.n  # (D,) mean − shift
        cov = self.s2 / self.n - d.outer(d)  # (D, D)
        cov = (cov + cov.T) / 2  # exact symmetry for eigh
        return TokenMoments(n=self.n, mean=(self.shift + d).cpu().numpy(), cov=cov.cpu().numpy())


def pca_from_moments(m: TokenMoments) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(mu, std, components, explained_variance, explained_variance_ratio) of the standardised tokens.

    std is the population std (ddof=0), as `np.std` in the reference ReDi `calc_pca.py`; a dimension
    of zero variance gets std 1 (as scikit-learn's StandardScaler). Explained variances use the
    unbiased n − 1 normaliser, as scikit-learn's PCA.
    """
    if m.n < 2:
        raise UserError(f"The PCA needs at least 2 tokens, the selection holds {m.n}.")
    var = np.clip(np.diag(m.cov), 0.0, None)  # (D,)
    std = np.where(var > 0, np.sqrt(var), 1.0)  # (D,)
    cov_std = m.cov / np.outer(std, std) * (m.n / (m.n - 1))  # (D, D) unbiased covariance of (z − μ)/s
    eigval, eigvec = np.linalg.eigh(cov_std)  # ascending, columns
    order = np.argsort(eigval)[::-1]
    components = eigvec[:, order].T  # (D, D) rows, descending variance
    rows = np.arange(components.shape[0])
    components *= np.sign(components[rows, np.abs(components).argmax(1)])[:, None]  # largest-|.| entry positive
    explained = np.clip(eigval[order], 0.0, None)  # round-off can leave tiny negatives
    return m.mean, std, components, explained, explained / np.trace(cov_std)


def fit_pca(
    features: FeatureStore, cfg: PCAConfig, on_images: Callable[[int], None] | None = None
) -> PCAModel:
    """Fit the standardised PCA on the patch tokens of the selected images, streaming in image order."""
    selected = select_images(features.valid, cfg.num_images, cfg.seed)
    acc = MomentAccumulator(features.patch.shape[2], resolve_device(cfg.device))
    check = None if features.check is None else functools.partial(features.check.rows, "patch")
    for block in read_batches(features.patch, selected, cfg.batch_images, check):  # (B, P, D) float16
        acc.update(block)
        if on_images is not None:
            on_images(block.shape[0])
    moments = acc.moments()
    mu, std, components, explained, ratio = pca_from_moments(moments)
    return PCAModel(
        mu=mu, std=std,
        pca_mean=np.zeros_like(mu),  # mean of (z − μ)/s with μ the tokens' own mean: exactly 0
        components=components, explained_variance=explained, explained_variance_ratio=ratio,
        n_images=len(selected), n_tokens=moments.n, seed=cfg.seed, source=features.fingerprint,
    )


def _pick(d: dict[Any, Any], keys: tuple[str, ...], what: str, file: Path) -> Any:
    for k in keys:
        if k in d:
            return d[k]
    raise UserError(
        f"{file} has no {what} entry (looked for {', '.join(keys)}; found {', '.join(map(str, d)) or 'no keys'})."
    )


def load_reference_pca(file: Path, trust_pickle: bool, patch_tokens: int) -> PCAModel:
    """Convert a ReDi reference `dino_pca_model.pth` (pickled sklearn PCA + mean + std) to a PCAModel, signs kept."""
    file = Path(file)
    if not trust_pickle:
        raise UserError(
            f"{file} is a pickle and loading it runs code from it; redi will not unpickle an untrusted file: "
            "pass --trust-pickle if you trust the file."
        )
    if not file.is_file():
        raise UserError(f"No file at {file}.")
    import torch

    try:
        blob = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as e:  # pickle and torch raise many types for foreign or damaged files
        if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] == "sklearn":
            raise UserError(f"{file} holds a scikit-learn PCA: reading it needs scikit-learn, "
                            "pip install -e '.[reference]' in redi's checkout (or pip install scikit-learn).") from None
        raise UserError(f"{file} is not a readable torch file ({type(e).__name__}: {e}).") from None
    if not isinstance(blob, dict):
        raise UserError(f"{file} holds a {type(blob).__name__}, expected a dict with a PCA, a mean and a std.")
    pca = _pick(blob, REFERENCE_PCA_KEYS, "PCA", file)
    if not all(hasattr(pca, a) for a in ("components_", "mean_", "explained_variance_", "n_samples_")):
        raise UserError(f"The PCA entry of {file} is a {type(pca).__name__}, not a fitted scikit-learn PCA.")
    if getattr(pca, "whiten", False):
        raise UserError(f"The PCA in {file} is whitened; redi's projection (SPEC §4) is for a PCA without whitening.")
    mu = np.asarray(torch.as_tensor(_pick(blob, REFERENCE_MEAN_KEYS, "mean", file)), dtype=np.float64)  # (D,)
    std = np.asarray(torch.as_tensor(_pick(blob, REFERENCE_STD_KEYS, "std", file)), dtype=np.float64)  # (D,)
    components = np.asarray(pca.components_, dtype=np.float64)  # (k, D)
    dim = components.shape[1]
    if mu.shape != (dim,) or std.shape != (dim,) or np.asarray(pca.mean_).shape != (dim,):
        raise UserError(f"{file}: mean {mu.shape}, std {std.shape} and PCA width {dim} disagree.")
    n_tokens = int(pca.n_samples_)
    return PCAModel(
        mu=mu, std=std, pca_mean=np.asarray(pca.mean_, dtype=np.float64), components=components,
        explained_variance=np.asarray(pca.explained_variance_, dtype=np.float64),
        explained_variance_ratio=np.asarray(pca.explained_variance_ratio_, dtype=np.float64),
        n_images=n_tokens // patch_tokens if n_tokens % patch_tokens == 0 else 0,
        n_tokens=n_tokens, seed=-1, source="import:" + sha256_file(file),
    )


def explained_variance_rows(model: PCAModel, k: int = PLOT_COMPONENTS) -> list[tuple[int, float, float, float]]:
    """(index from 1, explained variance, ratio, cumulative ratio) of the first k components."""
    cumulative = np.cumsum(model.explained_variance_ratio)
    return [
        (i + 1, float(model.explained_variance[i]), float(model.explained_variance_ratio[i]), float(cumulative[i]))
        for i in range(min(k, len(model.explained_variance)))
    ]


def plot_explained_variance(model: PCAModel, path: Path, k: int = PLOT_COMPONENTS) -> None:
    """PNG: bars of the explained-variance ratio of the first k components, the cumulative ratio as a line; stamped
    with the digest of the PCA file beside it (`plot_source`), so `redi info` draws it again only when that changed."""
    from redi.common.plots import explained_variance_figure, save_png  # matplotlib: imported to draw, not to read

    save_png(explained_variance_figure(model.explained_variance_ratio, model.dim, k), path, plot_source(path.parent, k))


def plot_source(data: Path, k: int = PLOT_COMPONENTS) -> str:
    """What DATA's PCA plot is drawn from: the digest of DATA/pca.safetensors (and of how many components it shows)."""
    return content_digest([Path(data) / PCA_FILE], f"first {k} components")


@dataclass(frozen=True)
class PCAParams:
    """`params` of the pca stage's manifest: the fit's (num_images, seed) or the imported file's hash."""

    num_images: Annotated[int | None, Range(1)] = None
    seed: Annotated[int | None, Range(0)] = None
    import_sha256: str | None = None


@dataclass(frozen=True)
class PCASource:
    """`source` of the pca stage's manifest: the features it was fitted on (none for an import)."""

    features: str | None = None


@dataclass(frozen=True)
class PCAManifest(Manifest):
    """The manifest pca.json records, its parts checked."""

    params: Annotated[dict[str, Any], Shaped(PCAParams)]
    encoder: Annotated[dict[str, Any], Shaped(Identity, types_only=True)] = field(default_factory=dict)
    source: Annotated[dict[str, Any], Shaped(PCASource)] = field(default_factory=dict)


@dataclass(frozen=True)
class PCAJson:
    """DATA/pca.json: the manifest of the `redi pca` run that wrote pca.safetensors, and that file's SHA-256."""

    manifest: Annotated[dict[str, Any], Shaped(PCAManifest)]
    pca_sha256: str


def _read_record(data: Path) -> PCAJson | None:
    """DATA/pca.json, or None when it is missing or damaged (a record to redo)."""
    return try_load(PCAJson, try_read_json(data / PCA_RECORD))


def stage_record(data: Path) -> PCARecord | None:
    """What DATA/pca.json kept of DATA/pca.safetensors when `redi pca` wrote it; None without a record (a file made
    by other means, which cannot be checked and is taken as is); one sentence when the record is damaged."""
    record_path = data / PCA_RECORD
    if not record_path.exists():
        return None
    if (record := _read_record(data)) is None:
        raise UserError(f"{record_path} is damaged, so {data / PCA_FILE} cannot be checked: rerun the `redi pca` "
                        "command that made it with --force.")
    return PCARecord(record.pca_sha256, record_path.name, "rerun the `redi pca` command that made it")


def load_stage_pca(data: Path) -> tuple[PCAModel, str]:
    """DATA/pca.safetensors, refused (one sentence) when it differs from what its record pca.json kept, and its
    SHA-256."""
    path = data / PCA_FILE
    record = stage_record(data)
    try:
        raw = read_pca_bytes(path, *([record] if record else []))
    except FileNotFoundError:
        raise UserError(f"No PCA file at {path}: run `redi pca --data {data}` first.") from None
    return parse_pca(raw, path), hashlib.sha256(raw).hexdigest()


def _up_to_date(data: Path, manifest: Manifest, force: bool) -> bool:
    """True when DATA/pca.safetensors was made by an equal manifest; UserError when it was not and not force."""
    pca_path, record_path = data / PCA_FILE, data / PCA_RECORD
    wanted = manifest.to_json()
    if (record := _read_record(data)) is not None:
        have = record.manifest
        if same_json(have, wanted):
            # An equal record but another (or no) file: an interrupted or replaced write, so redo it.
            return pca_path.exists() and sha256_file(pca_path) == record.pca_sha256
        if not force:
            raise UserError(
                f"{pca_path} was made with different settings ({', '.join(sorted(diff_keys(have, wanted)))}); "
                "pass --force to replace it."
            )
    elif pca_path.exists() and not force:
        if record_path.exists():
            raise UserError(f"{record_path}, the record of {pca_path.name}, is damaged; pass --force to replace both.")
        raise UserError(f"{pca_path} exists without its record {record_path.name}; pass --force to replace it.")
    return False


def _write(data: Path, model: PCAModel, manifest: Manifest) -> None:
    """Commit the PCA file with its cache record, then draw the plot (each write atomic).

    The record naming the new file's hash is written before the file replaces the old one, so an
    interruption (kill, full disk) leaves a record whose file does not match it, which a rerun
    redoes, never a file without its record (which a rerun would refuse). A missing plot is redrawn.
    """
    def save_then_record(tmp: Path) -> None:
        model.save(tmp)
        atomic_write_json(data / PCA_RECORD, asdict(PCAJson(manifest.to_json(), sha256_file(tmp))))

    atomic_write_with(data / PCA_FILE, save_then_record)
    plot_explained_variance(model, data / PLOT_FILE)


def _cached_result(data: Path) -> PCAResult:
    model, _ = load_stage_pca(data)
    if not (data / PLOT_FILE).exists():
        plot_explained_variance(model, data / PLOT_FILE)
    return PCAResult(path=data / PCA_FILE, plot=data / PLOT_FILE, model=model, up_to_date=True, seconds=0.0)


def run_pca(data: Path, cfg: PCAConfig) -> PCAResult:
    """The `pca` stage: fit on DATA/features, write DATA/pca.safetensors and its plot (cached); one process at a time."""
    with exclusive(Path(data) / ".pca.lock", f"{Path(data) / 'pca.safetensors'}"):
        remove_temporaries(Path(data), recursive=False)  # a killed run's; the stages write only in their folders
        return fit_stage(Path(data), cfg)


def fit_stage(data: Path, cfg: PCAConfig) -> PCAResult:
    """`run_pca` without the lock."""
    features = open_features(data / FEATURES_DIR)
    manifest = Manifest(
        stage="pca",
        params={"num_images": cfg.num_images, "seed": cfg.seed},
        encoder=features.manifest.encoder,
        source={"features": features.fingerprint},
        tiny_random=features.manifest.tiny_random,
    )
    if _up_to_date(data, manifest, cfg.force):
        return _cached_result(data)
    n_selected = len(select_images(features.valid, cfg.num_images, cfg.seed))
    start = time.perf_counter()
    with counting("pca", n_selected, transient=True) as advance:
        model = fit_pca(features, cfg, on_images=advance)
    seconds = time.perf_counter() - start
    _write(data, model, manifest)
    return PCAResult(path=data / PCA_FILE, plot=data / PLOT_FILE, model=model, up_to_date=False, seconds=seconds)


def _patch_shape(store_path: Path) -> tuple[int, int] | None:
    """(P, D) of a features store's patch tokens, or None where there is no such store."""
    try:
        patch = zarr.open_group(store_path, mode="r")["patch"]
    except ZARR_METADATA_ERRORS:
        return None
    return int(patch.shape[1]), int(patch.shape[2])


def import_pca(data: Path, cfg: ImportConfig) -> PCAResult:
    """Convert a reference PCA file into DATA/pca.safetensors (cached by the file's hash)."""
    data = Path(data)
    if not Path(cfg.file).is_file():
        raise UserError(f"No file at {cfg.file}.")
    manifest = Manifest(stage="pca", params={"import_sha256": sha256_file(cfg.file)})
    if _up_to_date(data, manifest, cfg.force):
        return _cached_result(data)
    shape = _patch_shape(data / FEATURES_DIR / "store.zarr")  # (P, D) of the features, if there are any
    start = time.perf_counter()
    model = load_reference_pca(cfg.file, cfg.trust_pickle, shape[0] if shape else REFERENCE_PATCH_TOKENS)
    if shape is not None and shape[1] != model.dim:
        raise UserError(f"{cfg.file} is a PCA of {model.dim}-d tokens but {data / FEATURES_DIR} holds {shape[1]}-d tokens.")
    seconds = time.perf_counter() - start
    _write(data, model, manifest)
    return PCAResult(path=data / PCA_FILE, plot=data / PLOT_FILE, model=model, up_to_date=False, seconds=seconds)
