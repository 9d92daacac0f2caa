"""What a features manifest records of how its encoder was fed (`params.representation`): the pre-processing and the
token grid. A module of its own, light (neither torch nor transformers at import), so that reading a manifest (`redi
info`, `verify`, `shards`) needs no encoder library; pipeline/representations.py makes these records
(FeatureSpec.record)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal

from redi.common.schema import OneOf, Range

if TYPE_CHECKING:  # reading a manifest needs no torch; encoding images does
    import torch


@dataclass(frozen=True)
class Preprocess:
    """uint8 crops → encoder input: /255, then normalise and resize to the input side (in that order or reversed)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: Annotated[str, OneOf(("bicubic", "bilinear"))]  # F.interpolate mode (align_corners=False)
    antialias: bool  # the image processors (torchvision) antialias; REPA's F.interpolate does not
    normalise_first: bool  # REPA normalises before resizing for DINOv2/MAE/I-JEPA and after for CLIP
    source: str  # where these values come from (recorded in the manifest)

    def __call__(self, images: torch.Tensor, side: int) -> torch.Tensor:
        """uint8 (N, R, R, 3) → float32 (N, 3, S, S); no resize when S = R."""
        import torch.nn.functional as F

        x = images.permute(0, 3, 1, 2).float() / 255  # (N, 3, R, R) in [0, 1]
        if self.normalise_first:
            x = self._normalise(x)
        if side != x.shape[-1]:
            x = F.interpolate(x, size=(side, side), mode=self.interpolation, align_corners=False,
                              antialias=self.antialias)  # (N, 3, S, S)
        return x if self.normalise_first else self._normalise(x)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


@dataclass(frozen=True)
class TableRecord:
    """`params.representation.position_table`: the checkpoint's n × n position table resampled once to the grid."""

    from_: Annotated[int, Range(1)]
    """n (JSON key "from")."""
    to: Annotated[int, Range(1)]
    """The token grid G."""
    resample: str
    """How (pipeline/positions.py's words)."""


@dataclass(frozen=True)
class RepresentationRecord:
    """`params.representation` of a features manifest: how the encoder was fed (docs/FORMATS.md)."""

    family: str
    """The encoder family's key (dinov2-reg, siglip, …)."""
    input_side: Annotated[int, Range(1)]
    """Encoder input side S = patch · grid, in pixels."""
    grid: Annotated[int, Range(1)]
    """G: patch tokens per side."""
    patch_size: Annotated[int, Range(1)]
    """The encoder's patch, in pixels."""
    tokens_dropped: Annotated[int, Range(0)]
    """Tokens before the patches (CLS, registers), not stored."""
    global_token: Literal["cls", "pooled"] | None
    """What the `cls` array holds, or null: none."""
    preprocess: Preprocess
    """uint8 crops → encoder input."""
    position_table: TableRecord | None = None
    """Where REPA resamples a learned position table (absent: none resampled)."""
