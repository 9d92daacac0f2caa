"""`pca.safetensors`: the fitted (or imported) PCA of DINOv2 patch tokens and its projection."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save
from safetensors import safe_open

from redi.common.atomic import atomic_write_bytes
from redi.common.errors import UserError

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


def load_pca(path: Path) -> PCAModel:
    path = Path(path)
    if not path.exists():
        raise UserError(f"No PCA file at {path}: run `redi pca --data {path.parent}` first.")
    try:
        t = load_file(str(path))
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises several types for damaged files
        raise UserError(f"{path} is not a readable pca.safetensors file ({e}).") from None
    return PCAModel(
        mu=t["mu"], std=t["std"], pca_mean=t["pca_mean"], components=t["components"],
        explained_variance=t["explained_variance"], explained_variance_ratio=t["explained_variance_ratio"],
        n_images=int(meta.get("n_images", 0)), n_tokens=int(meta.get("n_tokens", 0)),
        seed=int(meta.get("seed", -1)), source=meta.get("source", ""),
    )
