"""FD-DINOv2 features: the CLS token of DINOv2 ViT-L/14's final normed output, as edm2 and Stein et al. (2023) define it.

edm2's `DINOv2Detector` (calculate_metrics.py, its default `resize_mode='torch'`): uint8 images as float32 in
[0, 255] resized to 224×224 with torch's bicubic interpolation (antialiased), /255, normalised with the ImageNet mean
and std, through torch.hub's `dinov2_vitl14`, whose forward returns `x_norm_clstoken`. Here the same weights come
through the features stage's encoder loading (`pipeline.encoders`: a hub id such as facebook/dinov2-large, a local
directory, or tiny-random for tests), where the transformers port's `last_hidden_state[:, 0]` is that normed CLS token.

The position table: the checkpoint's is 37×37 (518 px) and the input's grid 16×16. torch.hub's model interpolates it
at every call by the scale factor (16 + 0.1)/37, not antialiased (dinov2 `interpolate_pos_encoding`, offset 0.1);
transformers' `Dinov2Model` interpolates to the size 16, which samples other points (the CLS features differed by
6e-4 relative on a tiny model with the real table size). So the table is resampled once at load the hub's way
(`positions.DINOV2_HUB`), and the transformers forward then adds it as it is. A with-registers model needs nothing:
transformers interpolates it as the hub's `_reg` models do (to the size, antialiased).

The Fréchet distance of these features is `sampler.metrics.frechet_distance`, as for FID.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from redi.common.errors import UserError
from redi.pipeline import positions
from redi.pipeline.encoders import ENCODER, load, resolve
from redi.pipeline.representations import IMAGENET_MEAN, IMAGENET_STD, feature_spec, fit_positions
from redi.pipeline.stage import describe_identity

DEFAULT_FD_ENCODER = "facebook/dinov2-large"  # DINOv2 ViT-L/14 without registers: torch.hub's dinov2_vitl14
FD_ENCODER = dataclasses.replace(ENCODER, what="FD-DINOv2 encoder (DINOv2 ViT-L/14, as edm2's)", flag="--fd-encoder",
                                 example_dir="/path/to/dinov2-large")  # loaded as the features stage's, named for eval
INPUT_SIDE = 224  # edm2 and dgm-eval resize every image to 224×224
PREPROCESS = "edm2 DINOv2Detector (resize_mode torch)"  # what a report records
REFERENCE_SHAPE = {"model_type": "dinov2", "hidden_size": 1024, "num_hidden_layers": 24, "patch_size": 14}  # ViT-L/14


def edm2_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) → float32 (N, 3, 224, 224), in edm2's order: the [0, 255] values resized (bicubic,
    antialiased), then /255, minus the ImageNet mean, over its std."""
    x = images.permute(0, 3, 1, 2).float()  # (N, 3, H, W) in [0, 255]
    x = F.interpolate(x, size=(INPUT_SIDE, INPUT_SIDE), mode="bicubic", antialias=True) / 255  # (N, 3, 224, 224)
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return (x - mean) / std


class DinoV2Features:
    """The frozen encoder and its CLS features of uint8 images."""

    def __init__(self, name: str, device: torch.device):
        ref = resolve(FD_ENCODER, name)
        self._grid = INPUT_SIDE // int(ref.config["patch_size"])
        spec = feature_spec(ref.config, self._grid)
        if not spec.family.cls:
            raise UserError(f"--fd-encoder {name} is a {spec.family.title} model, which has no CLS token: FD-DINOv2 takes the "
                            f"CLS token of a DINOv2 model (default {DEFAULT_FD_ENCODER}).")
        self.identity: dict[str, Any] = ref.identity
        self.dim = int(ref.config["hidden_size"])
        self.comparable = all(ref.config.get(k) == v for k, v in REFERENCE_SHAPE.items()) and not ref.tiny_random
        """DINOv2 ViT-L/14 without registers: the network of published FD-DINOv2 figures."""
        self.position_table = positions.DINOV2_HUB.words if spec.resamples else None
        """How the checkpoint's position table was fitted to the grid (None: transformers interpolates, or it fits)."""
        self._model = fit_positions(load(ref, device), spec, positions.DINOV2_HUB)
        self._call = spec.family.call

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) → float32 (N, D) CLS tokens of the final normed output."""
        x = edm2_input(images)  # (N, 3, 224, 224)
        tokens, _ = self._call(self._model, x.to(self._model.dtype), self._grid)  # (N, 1 + registers + G², D)
        return tokens[:, 0].float()  # (N, D)

    def record(self) -> dict[str, Any]:
        """What an eval report says of the encoder."""
        return {"identity": self.identity, "describe": describe_identity(self.identity), "dim": self.dim,
                "comparable": self.comparable, "preprocess": PREPROCESS, "input_side": INPUT_SIDE,
                "position_table": self.position_table}
