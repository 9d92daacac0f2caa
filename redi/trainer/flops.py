"""Analytic FLOPs of the diffusion transformer, for MFU = train_flops_per_image × images/s / peak FLOP/s.

Counts 2 FLOPs per multiply-add of every matmul (all Linear layers including adaLN, the timestep
MLP and the REPA projector; the patch-embedding convolutions; attention's QKᵀ and AV) and ignores
element-wise work (norms, activations, softmax, modulation), as PaLM/nanoGPT-style MFU does.
"""
from __future__ import annotations

from redi.trainer.models import FREQUENCY_EMBEDDING_SIZE, MLP_RATIO, ModelConfig

BACKWARD_FACTOR = 2  # backward = gradients w.r.t. inputs and w.r.t. weights, each as costly as the forward


def linear_flops(tokens: int, d_in: int, d_out: int) -> int:
    """FLOPs of a Linear applied to `tokens` vectors."""
    return 2 * tokens * d_in * d_out


def block_flops(cfg: ModelConfig) -> int:
    """One DiT block on one image: adaLN, qkv, QKᵀ, AV, output projection, MLP."""
    d, t = cfg.hidden_size, cfg.num_tokens
    ada_ln = linear_flops(1, d, 6 * d)
    qkv = linear_flops(t, d, 3 * d)
    scores = 2 * t * t * d  # QKᵀ summed over heads
    mix = 2 * t * t * d  # AV summed over heads
    proj = linear_flops(t, d, d)
    mlp = linear_flops(t, d, MLP_RATIO * d) + linear_flops(t, MLP_RATIO * d, d)
    return ada_ln + qkv + scores + mix + proj + mlp


def forward_flops(cfg: ModelConfig) -> float:
    """Matmul FLOPs of one forward pass on one image."""
    d, n_patch, p2 = cfg.hidden_size, cfg.num_patches, cfg.patch_size**2
    heads = 2 if cfg.fusion == "separate" else 1
    flops = linear_flops(n_patch, p2 * cfg.in_channels, d)  # patch embedding(s): inputs sum to in_channels
    flops += linear_flops(1, FREQUENCY_EMBEDDING_SIZE, d) + linear_flops(1, d, d)  # timestep MLP
    flops += cfg.depth * block_flops(cfg)
    flops += heads * linear_flops(1, d, 2 * d)  # final adaLN per output head
    flops += linear_flops(n_patch, d, p2 * cfg.out_channels)  # output head(s): their channels sum to out_channels
    if cfg.reg_token:
        flops += linear_flops(1, cfg.repa_dim, d) + linear_flops(1, d, cfg.repa_dim)  # class-token embedding and head
    if cfg.repa_depth:
        aligned = n_patch + int(cfg.reg_token)  # REG projects its class token too
        width = cfg.projector_dim
        flops += linear_flops(aligned, d, width) + linear_flops(aligned, width, width)
        flops += linear_flops(aligned, width, cfg.repa_dim)  # REPA projector
    return float(flops)


def train_flops_per_image(cfg: ModelConfig) -> float:
    """Matmul FLOPs of forward + backward for one image (3× the forward)."""
    return (1 + BACKWARD_FACTOR) * forward_flops(cfg)
