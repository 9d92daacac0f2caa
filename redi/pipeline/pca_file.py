"""`pca.safetensors`: the fitted (or imported) PCA of DINOv2 patch tokens and its projection, and the one reader of
the file, which checks it against the SHA-256s that pca.json, shards.json and a run's config.json recorded of it."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors.numpy import load, save

from redi.common.atomic import atomic_write_bytes
from redi.common.errors import UserError
from redi.pipeline.remote import Location

if TYPE_CHECKING:  # the file reads without torch (redi info); the projection imports it
    import torch

PCA_FILE = "pca.safetensors"
PCA_FORMAT_VERSION = 1


@dataclass(frozen=True)
class PCAModel:
    """Per-dimension standardisation followed by PCA: z_pca = ((z - mu)/std - pca_mean) @ components[:r].T."""

    mu: np.ndarray  # (D,) float64
    std: np.ndarray  # (D,) float64
    pca_mean: np.ndarray  # (D,) float64
    components: np.ndarray  # (D, D) float64, rows sorted by explained variance
    explained_variance: np.ndarray  # (D,) float64
    explained_variance_ratio: np.ndarray  # (D,) float64
    n_images: int
    n_tokens: int
    seed: int
    source: str

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    def project(self, tokens: torch.Tensor, rank: int) -> torch.Tensor:
        """(..., D) tokens → (..., rank) principal-component values, computed in float32 on tokens' device."""
        import torch

        if rank > self.components.shape[0]:
            raise UserError(f"PCA rank {rank} exceeds the {self.components.shape[0]} stored components.")
        dev = tokens.device
        mu = torch.from_numpy(self.mu).to(dev, torch.float32)
        std = torch.from_numpy(self.std).to(dev, torch.float32)
        m = torch.from_numpy(self.pca_mean).to(dev, torch.float32)
        c = torch.from_numpy(self.components[:rank]).to(dev, torch.float32)  # (r, D)
        return ((tokens.float() - mu) / std - m) @ c.T  # (..., r)

    def save(self, path: Path) -> None:
        tensors = {
            "mu": self.mu, "std": self.std, "pca_mean": self.pca_mean, "components": self.components,
            "explained_variance": self.explained_variance,
            "explained_variance_ratio": self.explained_variance_ratio,
        }
        tensors = {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in tensors.items()}
        meta = {
            "n_images": str(self.n_images), "n_tokens": str(self.n_tokens), "seed": str(self.seed),
            "source": self.source, "format_version": str(PCA_FORMAT_VERSION),
        }
        atomic_write_bytes(Path(path), canonical_safetensors(save(tensors, metadata=meta)))


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted: safetensors writes the metadata in hash-map
    order, which differs between processes, so equal PCAs would otherwise give files of different SHA-256."""
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header with spaces to 8 bytes
    return len(header).to_bytes(8, "little") + header + data[8 + n:]  # tensor offsets are relative to the data


@dataclass(frozen=True)
class PCARecord:
    """The SHA-256 that a record kept of a pca.safetensors, and what to do when the file differs from it."""

    sha256: str
    where: str  # the record: pca.json (as `redi pca` wrote it), shards.json (projected with it), a run's config.json
    fix: str  # the sentence's end: how to mend it


def read_pca_bytes(path: Location, *records: PCARecord) -> bytes:
    """The bytes of the pca.safetensors at `path` (a local file or a URL), refused in one sentence naming the file,
    the first record its SHA-256 differs from and that record's fix. FileNotFoundError when there is no file.

    The one reader of the file: whatever reads it (pca, shards, train, verify, info) checks it against the records
    it has, so a damaged or replaced PCA never projects, trains or passes a check."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    for record in records:
        if digest != record.sha256:
            raise UserError(f"{path} differs from the SHA-256 recorded in {record.where} (damaged or replaced): "
                            f"{record.fix}.")
    return data


def load_pca(path: Location, *records: PCARecord) -> PCAModel:
    """The PCA in `path`, checked against `records` (read_pca_bytes); one sentence when it is missing or unreadable."""
    try:
        data = read_pca_bytes(path, *records)
    except FileNotFoundError:
        raise UserError(f"No PCA file at {path}: run `redi pca --data {path.parent}` first.") from None
    return parse_pca(data, path)


def parse_pca(data: bytes, path: Location) -> PCAModel:
    """The PCA held in `data`, the bytes of `path` (named in the sentence that refuses a file that is not one)."""
    try:
        t = load(data)
        n = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
        return PCAModel(
            mu=t["mu"], std=t["std"], pca_mean=t["pca_mean"], components=t["components"],
            explained_variance=t["explained_variance"], explained_variance_ratio=t["explained_variance_ratio"],
            n_images=int(meta.get("n_images", 0)), n_tokens=int(meta.get("n_tokens", 0)),
            seed=int(meta.get("seed", -1)), source=str(meta.get("source", "")),
        )
    except Exception as e:  # safetensors raises several types for damaged files; a missing tensor, a bad number
        raise UserError(f"{path} is not a readable pca.safetensors file ({type(e).__name__}: {e}).") from None
