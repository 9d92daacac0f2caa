"""FD-DINOv2 features: the CLS token of DINOv2 ViT-L/14's final normed output, as edm2 and Stein et al. (2023) define it.

edm2's `DINOv2Detector` (calculate_metrics.py, its default `resize_mode='torch'`): uint8 images resized to 224×224
with torch's bicubic interpolation (antialiased), /255, normalised with the ImageNet mean and std, through torch.hub's
`dinov2_vitl14`, whose forward returns `x_norm_clstoken`. Here the same weights come through the features stage's
encoder loading (`pipeline.encoders`: a hub id such as facebook/dinov2-large, a local directory, or tiny-random for
tests), where the transformers port's `last_hidden_state[:, 0]` is that normed CLS token. The Fréchet distance of
these features is `sampler.metrics.frechet_distance`, as for FID.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from redi.common.errors import UserError
from redi.pipeline.encoders import ENCODER, load, resolve
from redi.pipeline.stage import describe_identity
from redi.pipeline.representations import IMAGENET_MEAN, IMAGENET_STD, Preprocess, family_of

DEFAULT_FD_ENCODER = "facebook/dinov2-large"  # DINOv2 ViT-L/14 without registers: torch.hub's dinov2_vitl14
FD_ENCODER = dataclasses.replace(ENCODER, what="FD-DINOv2 encoder (DINOv2 ViT-L/14, as edm2's)", flag="--fd-encoder",
                                 example_dir="/path/to/dinov2-large")  # loaded as the features stage's, named for eval
INPUT_SIDE = 224  # edm2 and dgm-eval resize every image to 224×224
# Resize first (in [0, 1] rather than edm2's [0, 255]: the same up to rounding, interpolation being linear), then normalise.
EDM2_PREPROCESS = Preprocess(IMAGENET_MEAN, IMAGENET_STD, "bicubic", antialias=True, normalise_first=False,
                             source="edm2 DINOv2Detector (resize_mode torch)")
REFERENCE_SHAPE = {"model_type": "dinov2", "hidden_size": 1024, "num_hidden_layers": 24, "patch_size": 14}  # ViT-L/14


class DinoV2Features:
    """The frozen encoder and its CLS features of uint8 images."""

    def __init__(self, name: str, device: torch.device):
        ref = resolve(FD_ENCODER, name)
        family = family_of(ref.config)
        if not family.cls:
            raise UserError(f"--fd-encoder {name} is a {family.title} model, which has no CLS token: FD-DINOv2 takes the "
                            f"CLS token of a DINOv2 model (default {DEFAULT_FD_ENCODER}).")
        self.identity: dict[str, Any] = ref.identity
        self.dim = int(ref.config["hidden_size"])
        self.comparable = all(ref.config.get(k) == v for k, v in REFERENCE_SHAPE.items()) and not ref.tiny_random
        """DINOv2 ViT-L/14 without registers: the network of published FD-DINOv2 figures."""
        self._model = load(ref, device)
        self._call = family.call
        self._grid = INPUT_SIDE // int(ref.config["patch_size"])

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) → float32 (N, D) CLS tokens of the final normed output."""
        x = EDM2_PREPROCESS(images, INPUT_SIDE)  # (N, 3, 224, 224)
        tokens, _ = self._call(self._model, x.to(self._model.dtype), self._grid)  # (N, 1 + registers + G², D)
        return tokens[:, 0].float()  # (N, D)

    def record(self) -> dict[str, Any]:
        """What an eval report says of the encoder."""
        return {"identity": self.identity, "describe": describe_identity(self.identity), "dim": self.dim,
                "comparable": self.comparable, "preprocess": EDM2_PREPROCESS.source, "input_side": INPUT_SIDE}
