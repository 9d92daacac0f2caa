"""Absolute position tables of the representation encoders, as the reference code uses them.

- `resample`: a pretrained encoder's table resampled once to a token grid, so that the forward adds it as it is,
  in one of two ways (`Interpolation`), both on `torch.nn.functional.interpolate` in float32:
  `REPA`: REPA's `load_encoders` (utils.py) applies timm's `resample_abs_pos_embed` (bicubic to the grid's size,
  antialiased) once (timm is not a dependency);
  `DINOV2_HUB`: torch.hub's plain DINOv2 (facebookresearch/dinov2 `DinoVisionTransformer.interpolate_pos_encoding`,
  `interpolate_offset` 0.1, `interpolate_antialias` False), which edm2's FD-DINOv2 runs, interpolates at every call
  by the scale factor (G + 0.1)/n rather than to the size G; the same operation done once gives the same table.
- `sincos`: the fixed 2-D sin-cos tables that MAE, I-JEPA and MoCo v3 checkpoints hold (not learned), for the
  tiny-random models, whose tables must be shaped and valued like the real ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Interpolation:
    """How an n × n table is resized bicubically (align_corners=False, in float32) to G × G."""

    antialias: bool
    offset: float | None  # None: to the size G; else by the scale factor (G + offset)/n, which lands on G rows
    words: str  # what a manifest or report records


REPA = Interpolation(True, None, "once at load, timm resample_abs_pos_embed (bicubic, antialiased), as REPA load_encoders")
DINOV2_HUB = Interpolation(False, 0.1, "once at load, as torch.hub dinov2 interpolate_pos_encoding (bicubic, scale factor "
                                       "(G + 0.1)/n, not antialiased)")


def resample(table: torch.Tensor, grid: int, prefix: int, how: Interpolation = REPA) -> torch.Tensor:
    """(1, prefix + n², D) → (1, prefix + G², D): the prefix rows (the CLS token's position) are kept and the n × n grid
    is resized `how` says; a table already of G² rows is returned as is (as timm's `resample_abs_pos_embed(table,
    [G, G], num_prefix_tokens=prefix)` and dinov2's `interpolate_pos_encoding` both do)."""
    if table.shape[1] == prefix + grid * grid:
        return table
    head, rows = table[:, :prefix], table[:, prefix:]  # (1, prefix, D), (1, n², D)
    side = math.isqrt(rows.shape[1])
    assert side * side == rows.shape[1], f"a position table of {rows.shape[1]} rows is not a square grid"
    dim = rows.shape[-1]
    to = {"size": (grid, grid)} if how.offset is None else {"scale_factor": ((grid + how.offset) / side,) * 2}
    image = rows.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)  # (1, D, n, n)
    image = F.interpolate(image, mode="bicubic", antialias=how.antialias, align_corners=False, **to)  # (1, D, G, G)
    assert image.shape[-2:] == (grid, grid), f"{how} resized a {side}² table to {tuple(image.shape[-2:])}, not {grid}²"
    rows = image.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(table.dtype)  # (1, G², D)
    return torch.cat([head, rows], dim=1)


def sincos(dim: int, grid: int, rows_first: bool, prefix: int = 0) -> torch.Tensor:
    """The fixed 2-D sin-cos table (1, prefix + G², D) in row-major grid order, prefix rows zero: for each axis
    sin(p·ω) then cos(p·ω) with ω_k = 10000^(−k / (D/4)), k < D/4. MAE and I-JEPA (`get_2d_sincos_pos_embed`,
    numpy meshgrid(w, h)) put the column coordinate first; MoCo v3 (`build_2d_sincos_position_embedding`, torch
    meshgrid(w, h) with 'ij' indexing) the row coordinate. Computed in float64, returned as float32."""
    assert dim % 4 == 0, f"a 2-D sin-cos table needs a width divisible by 4, not {dim}"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (D/4,)
    index = torch.arange(grid, dtype=torch.float64)
    row, col = (a.reshape(-1) for a in torch.meshgrid(index, index, indexing="ij"))  # (G²,) each, row-major
    axes = (row, col) if rows_first else (col, row)
    parts = [f(a[:, None] * omega) for a in axes for f in (torch.sin, torch.cos)]  # 4 × (G², D/4)
    table = torch.cat([torch.zeros(prefix, dim, dtype=torch.float64), torch.cat(parts, dim=1)])  # (prefix + G², D)
    return table.float()[None]
