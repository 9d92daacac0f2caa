"""The FID Inception-v3: pytorch-fid's port of the TensorFlow graph that ADM's evaluator runs.

The network is `inception-2015-12-05/classify_image_graph_def.pb`, the graph of TTUR's
FID and of openai/guided-diffusion's `evaluations/evaluator.py`. Its PyTorch port is
pytorch-fid's `FIDInceptionA/C/E_1/E_2` variant of torchvision's Inception3, weights
`pt_inception-2015-12-05-6726825d.pth`; the module names below equal torchvision's, so
that file loads strict. No torchvision is needed: the blocks are written out here.

What ADM reads from the graph, and where it lives in this module:
- `pool_3:0` (FID, precision/recall): the 8×8 average pool after `mixed_10` = `Mixed_7c`.
- `mixed_6/conv:0` (sFID): the TF graph names its 11 mixed blocks `mixed`, `mixed_1`, …,
  `mixed_10` = torchvision's Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d, 6e, 7a, 7b, 7c, so `mixed_6`
  is `Mixed_6d`; inside a block the TF scope `conv` is the 1×1 branch (its conv, batch-norm
  and ReLU, the op named after the scope), so `mixed_6/conv` is `Mixed_6d.branch1x1`'s
  output, 17×17×192 (the TF→PyTorch weight map maps `mixed_6/conv/conv2d_params` to
  `Mixed_6d.branch1x1.conv`). ADM keeps its first 7 channels, NHWC-flattened: 17·17·7 = 2023.
- `softmax/logits/MatMul` (Inception Score): ADM multiplies pool_3 by that MatMul's weight
  only, so the class logits here are `pool @ fc.weight.T` without the bias, as ADM's.
- Input: the graph takes float RGB in [0, 255] at any size, resizes it to 299×299 with
  TensorFlow 1's bilinear `ResizeBilinear` (align_corners=False, no half-pixel centres,
  which differs from torch's `interpolate`), then computes (x − 128) / 128 ∈ [−1, 1).
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from redi.common.errors import UserError

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
FID_WEIGHTS_SHA256_PREFIX = "6726825d"  # torch.hub's hash-in-file-name convention for the file above
INPUT_SIZE = 299  # the TF graph's ResizeBilinear target
NUM_CLASSES = 1008  # the 2015 graph's softmax width (1000 ImageNet classes + 8 unused)
POOL_DIM = 2048  # pool_3 width
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]
SPATIAL_GRID = 17  # mixed_6's spatial side for a 299×299 input
SPATIAL_DIM = SPATIAL_CHANNELS * SPATIAL_GRID * SPATIAL_GRID  # 2023, the sFID feature width


class InceptionFeatures(NamedTuple):
    """What ADM's evaluator reads from the network for one batch."""

    pool: torch.Tensor  # (N, 2048) pool_3: FID and precision/recall
    spatial: torch.Tensor  # (N, 7·17·17) mixed_6/conv[..., :7], NHWC-flattened: sFID
    logits: torch.Tensor  # (N, 1008) pool_3 @ W without bias: Inception Score after softmax


class BasicConv2d(nn.Module):
    """Conv (no bias) → batch-norm (eps 1e-3, as the TF graph) → ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **conv_kwargs: int | tuple[int, int]):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """3×3 stride-1 average pool that, like TensorFlow's, ignores the zero padding."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35×35 block (Mixed_5b/c/d): 1×1, 5×5, double 3×3 and pooled branches."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], 1)  # (N, 224 + pool_features, 35, 35)


class InceptionB(nn.Module):
    """Grid reduction 35→17 (Mixed_6a)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([self.branch3x3(x), branch3x3dbl, branch_pool], 1)  # (N, 768, 17, 17)


class InceptionC(nn.Module):
    """17×17 block with factorised 7×7 convolutions (Mixed_6b/c/d/e)."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four branch outputs, each (N, 192, 17, 17); branch 0 is the TF scope `conv`."""
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        branch7x7dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(branch7x7dbl))
        branch7x7dbl = self.branch7x7dbl_5(self.branch7x7dbl_4(branch7x7dbl))
        branch_pool = self.branch_pool(_tf_avg_pool(x))
        return [self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.branches(x), 1)  # (N, 768, 17, 17)


class InceptionD(nn.Module):
    """Grid reduction 17→8 (Mixed_7a)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_2(self.branch7x7x3_1(x))
        branch7x7x3 = self.branch7x7x3_4(self.branch7x7x3_3(branch7x7x3))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch7x7x3, branch_pool], 1)  # (N, 1280, 8, 8)


class InceptionE(nn.Module):
    """8×8 block with expanded filter banks (Mixed_7b average-pools, Mixed_7c max-pools, as the TF graph)."""

    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool  # the FID graph's last block max-pools its pool branch (pytorch-fid's FIDInceptionE_2)
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_1(x)  # (N, 384, 8, 8)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)  # (N, 768, 8, 8)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))  # (N, 384, 8, 8)
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)], 1)  # (N, 2048, 8, 8)


def tf_resize_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """TensorFlow 1 `ResizeBilinear` (align_corners=False, half_pixel_centers=False) of (N, C, H, W) float32.

    Source coordinate of output pixel i is i·(in/out) (no half-pixel shift), the upper
    neighbour is clamped to the border, and the lerp runs along x then along y, all in
    float32, as TensorFlow's kernel does.
    """

    def taps(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scale = torch.tensor(n_in, dtype=torch.float32) / size  # float32 division, as TF's CalculateResizeScale
        src = torch.arange(size, dtype=torch.float32, device=x.device) * scale.to(x.device)  # (size,)
        lo = src.floor().long()
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo, hi, src - lo.float()

    y_lo, y_hi, dy = taps(x.shape[2])
    x_lo, x_hi, dx = taps(x.shape[3])
    left, right = x.index_select(3, x_lo), x.index_select(3, x_hi)  # (N, C, H, size)
    rows = left + (right - left) * dx  # (N, C, H, size)
    top, bottom = rows.index_select(2, y_lo), rows.index_select(2, y_hi)  # (N, C, size, size)
    return top + (bottom - top) * dy[:, None]  # (N, C, size, size)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3 (TF graph 2015-12-05), returning pool_3, mixed_6/conv[..., :7] and logits."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(POOL_DIM, NUM_CLASSES)  # the graph's softmax layer; its bias is loaded but unused (ADM)

    def forward(self, images: torch.Tensor) -> InceptionFeatures:
        """Features of uint8 (N, H, W, 3) images, any H and W."""
        x = images.permute(0, 3, 1, 2).float()  # (N, 3, H, W) in [0, 255]
        x = tf_resize_bilinear(x, INPUT_SIZE)  # (N, 3, 299, 299)
        x = (x - 128) / 128  # the graph's Sub/Mul: [-1, 1)
        x = self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))  # (N, 32, 147, 147)
        x = F.max_pool2d(self.Conv2d_2b_3x3(x), kernel_size=3, stride=2)  # (N, 64, 73, 73)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 288, 35, 35)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))  # (N, 768, 17, 17)
        branches = self.Mixed_6d.branches(x)  # 4 × (N, 192, 17, 17)
        spatial = branches[0][:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)  # (N, 17·17·7) in ADM's NHWC order
        x = self.Mixed_6e(torch.cat(branches, 1))  # (N, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (N, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # (N, 2048) pool_3
        logits = pool @ self.fc.weight.T  # (N, 1008), no bias: ADM's softmax input
        return InceptionFeatures(pool=pool, spatial=spatial, logits=logits)


def he_init_(net: FIDInceptionV3, seed: int) -> FIDInceptionV3:
    """Random He-normal weights (scale-preserving through the ReLUs), for tests and benchmarks only."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
    return net


def load_fid_inception(path: Path | None, device: torch.device) -> FIDInceptionV3:
    """The FID Inception-v3 with weights from a local pytorch-fid state-dict file, in eval mode."""
    if path is None:
        raise UserError(
            "redi eval needs the FID Inception weights pt_inception-2015-12-05-6726825d.pth (no download is made): "
            f"get the file from {FID_WEIGHTS_URL} and pass it with --inception FILE."
        )
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Inception weights {path} do not exist; get them from {FID_WEIGHTS_URL}.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch and safetensors raise many types for a bad file
        raise UserError(f"{path} is not a PyTorch state dict ({type(e).__name__}): pass pt_inception-2015-12-05-6726825d.pth.") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict of the FID Inception weights.")
    net = FIDInceptionV3()
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise UserError(f"{path} does not hold the FID Inception-v3 weights of pytorch-fid ({first[:200]}).") from None
    return net.eval().requires_grad_(False).to(device)
