"""DiT/SiT backbone with ReDi fusion (merged or separate tokens), a REPA projector and a REG class token.

One readable file in the style of facebookresearch/DiT: the names (`x_embedder`, `t_embedder`,
`y_embedder`, `blocks`, `final_layer`, `adaLN_modulation`) and the initialisation are DiT's, so the
state-dict keys of a merged-fusion model match the public DiT/SiT/REPA/ReDi checkpoints.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from redi.common.errors import UserError

DEFAULT_PATCH = 2  # DiT/SiT's "/2", for f8 latents; shards.json names the data's default (1 on f16 and f32)
MLP_RATIO = 4  # MLP hidden width = 4 × hidden
FREQUENCY_EMBEDDING_SIZE = 256  # sinusoidal timestep features fed to the timestep MLP
PROJECTOR_DIM = 2048  # REPA's projector width (its models/sit.py projector_dim)
SIZES: dict[str, tuple[int, int, int]] = {  # name -> (depth, hidden, heads); DiT's "XL/2" is size XL, patch 2
    "debug": (2, 64, 2),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
REPA_DEPTHS: dict[str, int] = {  # the block k whose output feeds the REPA projector (REPA/REG papers)
    "debug": 1,
    "S": 4,
    "B": 4,
    "L": 8,
    "XL": 8,
}
OBJECTIVES = ("sit", "dit")
FUSIONS = ("merged", "separate")


@dataclass(frozen=True)
class ModelConfig:
    """Everything that defines the network; stored in every checkpoint so sampling needs nothing else."""

    size: str
    """Backbone name, a key of SIZES: "S" | "B" | "L" | "XL" | "debug" (DiT's "B/2", as configs before `patch_size`
    had it, sets the patch too)."""
    objective: str
    """"sit" (linear interpolant, velocity; t in [0,1], t=1 is noise) | "dit" (DDPM eps; t in 0..999)."""
    input_size: int = 32
    """Latent side h = R/f (32 for SD-VAE at 256)."""
    patch_size: int = DEFAULT_PATCH
    """p: side of a square patch of latents per token (2 on f8 latents, 1 on f16 and f32: shards.json's default)."""
    vae_channels: int = 4
    """Channels of the VAE latent (the first channels of the input)."""
    pca_rank: int = 0
    """r: number of PC channels after the VAE channels (0 = no representation channels)."""
    fusion: str = "merged"
    """"merged": one patch embedding over all channels | "separate": [x tokens; z tokens], two heads."""
    num_classes: int = 1000
    """Number of classes (1 = unconditional); the null (CFG) label is index num_classes."""
    class_dropout: float = 0.1
    """Label-dropout rate the model is trained with (the objective applies it; > 0 means CFG is available)."""
    repa_depth: int = 0
    """0 = no REPA projector; else the block index k (1-based) whose output feeds the projector."""
    repa_dim: int = 768
    """Encoder width D of the REPA targets and of the REG class token (shards.json: 768 for DINOv2-B)."""
    projector_dim: int = PROJECTOR_DIM
    """Width of the REPA projector's hidden layers (REPA: 2048)."""
    reg_token: bool = False
    """REG: one entangled class token prepended to the sequence."""
    learn_sigma: bool = False
    """DiT only: also predict the interpolation of the variance (hybrid loss)."""

    def __post_init__(self) -> None:
        """Refuse inconsistent settings with one clear sentence."""
        base, slash, patch = self.size.partition("/")
        if slash and patch.isdigit():  # "B/2": the size and the patch in DiT's notation
            object.__setattr__(self, "size", base)
            object.__setattr__(self, "patch_size", int(patch))
        if self.size not in SIZES:
            raise UserError(f"unknown model size {self.size!r}; choose one of {', '.join(SIZES)}")
        if self.objective not in OBJECTIVES:
            raise UserError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if self.fusion not in FUSIONS:
            raise UserError(f"unknown fusion {self.fusion!r}; choose one of {', '.join(FUSIONS)}")
        if self.patch_size < 1 or self.input_size % self.patch_size != 0:
            raise UserError(f"latent size {self.input_size} is not divisible by the patch size {self.patch_size}")
        if self.vae_channels < 1 or self.pca_rank < 0:
            raise UserError("vae_channels must be at least 1 and pca_rank at least 0")
        if self.fusion == "separate" and self.pca_rank == 0:
            raise UserError("separate fusion needs PC channels: set a PCA rank above 0")
        if self.learn_sigma and self.objective != "dit":
            raise UserError("learned sigma exists only for the DiT (DDPM) objective")
        if self.num_classes < 1:
            raise UserError("num_classes must be at least 1 (1 = unconditional)")
        if not 0.0 <= self.class_dropout < 1.0:
            raise UserError(f"class dropout {self.class_dropout} must lie in [0, 1)")
        if not 0 <= self.repa_depth <= self.depth:
            raise UserError(f"REPA depth {self.repa_depth} must lie in [0, {self.depth}] for {self.size}")
        if self.repa_dim < 1 or self.projector_dim < 1:
            raise UserError("repa_dim and projector_dim must be at least 1")

    @property
    def depth(self) -> int:
        """Number of transformer blocks."""
        return SIZES[self.size][0]

    @property
    def hidden_size(self) -> int:
        """Token width."""
        return SIZES[self.size][1]

    @property
    def num_heads(self) -> int:
        """Attention heads per block."""
        return SIZES[self.size][2]

    @property
    def in_channels(self) -> int:
        """Input channels: VAE latent then PCs."""
        return self.vae_channels + self.pca_rank

    @property
    def out_channels(self) -> int:
        """Output channels: the prediction, then the variance values when learn_sigma."""
        return self.in_channels * (2 if self.learn_sigma else 1)

    @property
    def num_patches(self) -> int:
        """L: patch tokens per modality, (input_size / patch)²."""
        return (self.input_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """Sequence length seen by the blocks: L (merged) or 2L (separate), plus one REG token."""
        return self.num_patches * (2 if self.fusion == "separate" else 1) + int(self.reg_token)


@dataclass
class ModelOutput:
    """What one forward pass returns."""

    out: Tensor
    """(N, out_channels, H, W): velocity (sit) or eps, then the variance values when learn_sigma (dit)."""
    cls_out: Tensor | None
    """(N, repa_dim): REG class-token velocity, else None."""
    repa: Tensor | None
    """(N, L, repa_dim): REPA projector on the (x-stream) patch tokens after block repa_depth; (N, 1 + L, repa_dim)
    with a REG token, which is projected too (REG `models/sit.py`); else None."""


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: per-sample affine map of normalised tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def patchify(x: Tensor, p: int) -> Tensor:
    """(N, C, H, W) → (N, L, p·p·C) with DiT's token layout (inverse of unpatchify)."""
    n, c, hh, ww = x.shape
    x = x.reshape(n, c, hh // p, p, ww // p, p)  # (N, C, h, p, w, q)
    x = torch.einsum("nchpwq->nhwpqc", x)  # (N, h, w, p, q, C)
    return x.reshape(n, (hh // p) * (ww // p), p * p * c)  # (N, L, p·p·C)


def unpatchify(x: Tensor, p: int, c: int) -> Tensor:
    """(N, L, p·p·C) → (N, C, H, W), DiT's layout."""
    h = w = math.isqrt(x.shape[1])
    assert h * w == x.shape[1], f"{x.shape[1]} tokens do not form a square grid"
    x = x.reshape(x.shape[0], h, w, p, p, c)  # (N, h, w, p, q, C)
    x = torch.einsum("nhwpqc->nchpwq", x)  # (N, C, h, p, w, q)
    return x.reshape(x.shape[0], c, h * p, w * p)  # (N, C, H, W)


def get_1d_sincos_pos_embed(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions → (M, embed_dim): [sin(pos·ω), cos(pos·ω)], ω_k = 10000^(−2k/embed_dim), float64."""
    assert embed_dim % 2 == 0, f"embedding width {embed_dim} must be even"
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))  # (D/2,)
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """DiT/MAE fixed 2-D sin-cos table (grid_size², embed_dim); token k = row·G + col, first half encodes col."""
    assert embed_dim % 4 == 0, f"embedding width {embed_dim} must be divisible by 4"
    grid_h = np.arange(grid_size, dtype=np.float64)
    grid_w = np.arange(grid_size, dtype=np.float64)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0)  # (2, G, G); grid[0] = column index (w goes first)
    emb_h = get_1d_sincos_pos_embed(embed_dim // 2, grid[0])  # (G², D/2)
    emb_w = get_1d_sincos_pos_embed(embed_dim // 2, grid[1])  # (G², D/2)
    return np.concatenate([emb_h, emb_w], axis=1)  # (G², D)


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches → tokens (a strided conv = one Linear on each flattened patch)."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) → (N, L, D)."""
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, L, D)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps → vectors: sinusoidal features then a 2-layer MLP (DiT)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = FREQUENCY_EMBEDDING_SIZE) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        """(N,) possibly fractional timesteps → (N, dim) [cos, sin] features (GLIDE/DiT)."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]  # (N, dim/2)
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2·(dim/2))
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)  # (N, dim)
        return embedding

    def forward(self, t: Tensor) -> Tensor:
        """(N,) → (N, D)."""
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)  # (N, 256)
        return self.mlp(t_freq)  # (N, D)


class LabelEmbedder(nn.Module):
    """Class labels → vectors; row num_classes is the null label (label dropout is the objective's job)."""

    def __init__(self, num_classes: int, hidden_size: int) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes

    def forward(self, y: Tensor) -> Tensor:
        """(N,) long → (N, D)."""
        return self.embedding_table(y)  # (N, D)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (bias) through scaled_dot_product_attention."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        assert dim % num_heads == 0, f"width {dim} is not divisible by {num_heads} heads"
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        """(N, T, D) → (N, T, D)."""
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads)  # (N, T, 3, h, d/h)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 × (N, h, T, d/h)
        x = F.scaled_dot_product_attention(q, k, v)  # (N, h, T, d/h)
        x = x.transpose(1, 2).reshape(n, t, d)  # (N, T, D)
        return self.proj(x)  # (N, T, D)


class Mlp(nn.Module):
    """Linear → tanh-GELU → Linear."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        """(N, T, D) → (N, T, D)."""
        return self.fc2(self.act(self.fc1(x)))  # (N, T, D)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (shift/scale/gate for attention and MLP)."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, MLP_RATIO * hidden_size)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x (N, T, D), c (N, D) → (N, T, D)."""
        modulation = self.adaLN_modulation(c).chunk(6, dim=1)  # 6 × (N, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (N, T, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, T, D)
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale), then a Linear to p·p·out_channels; with cls_dim > 0, token 0 is REG's class token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, cls_dim: int = 0) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.linear_cls = nn.Linear(hidden_size, cls_dim, bias=True) if cls_dim else None
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, c: Tensor) -> tuple[Tensor, Tensor | None]:
        """x (N, [1+]L, D), c (N, D) → patch outputs (N, L, p·p·C), class-token output (N, cls_dim) or None."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 × (N, D)
        x = modulate(self.norm_final(x), shift, scale)  # (N, [1+]L, D)
        if self.linear_cls is None:
            return self.linear(x), None  # (N, L, p·p·C)
        return self.linear(x[:, 1:]), self.linear_cls(x[:, 0])  # (N, L, p·p·C), (N, cls_dim)


def build_projector(hidden_size: int, projector_dim: int, out_dim: int) -> nn.Sequential:
    """REPA's 3-layer MLP projector: hidden → projector_dim → projector_dim → out_dim, SiLU between."""
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, out_dim),
    )


def join_heads(out_x: Tensor, out_z: Tensor, groups: int) -> Tensor:
    """Concatenate the two heads of separate fusion so channels read [pred_x, pred_z, (var_x, var_z)] like merged."""
    pairs = zip(out_x.chunk(groups, dim=1), out_z.chunk(groups, dim=1), strict=True)  # groups × ((N, V, H, W), (N, r, H, W))
    return torch.cat([part for pair in pairs for part in pair], dim=1)  # (N, out_channels, H, W)


class DiffusionTransformer(nn.Module):
    """DiT/SiT with optional ReDi PC channels, REPA projector and REG class token."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.grad_checkpointing = False  # recompute each block in backward (the ReDi reference does, to save memory)
        hidden, p = cfg.hidden_size, cfg.patch_size
        groups = 2 if cfg.learn_sigma else 1
        separate = cfg.fusion == "separate"
        cls_dim = cfg.repa_dim if cfg.reg_token else 0
        self.x_embedder = PatchEmbed(cfg.vae_channels if separate else cfg.in_channels, hidden, p)
        self.z_embedder = PatchEmbed(cfg.pca_rank, hidden, p) if separate else None
        self.t_embedder = TimestepEmbedder(hidden)
        self.y_embedder = LabelEmbedder(cfg.num_classes, hidden)
        self.cls_embedder = nn.Linear(cfg.repa_dim, hidden) if cfg.reg_token else None
        self.cls_norm = nn.LayerNorm(hidden, eps=1e-6) if cfg.reg_token else None
        pos_embed = get_2d_sincos_pos_embed(hidden, cfg.input_size // p)  # (L, D) float64
        self.register_buffer("pos_embed", torch.tensor(pos_embed, dtype=torch.float32).unsqueeze(0))
        self.blocks = nn.ModuleList([DiTBlock(hidden, cfg.num_heads) for _ in range(cfg.depth)])
        self.projector = build_projector(hidden, cfg.projector_dim, cfg.repa_dim) if cfg.repa_depth else None
        x_out = (cfg.vae_channels if separate else cfg.in_channels) * groups
        self.final_layer = FinalLayer(hidden, p, x_out, cls_dim)
        self.z_final_layer = FinalLayer(hidden, p, cfg.pca_rank * groups) if separate else None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: xavier Linears, zero biases, N(0, 0.02) embeddings, zero adaLN and output layers."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for embedder in (self.x_embedder, self.z_embedder):
            if embedder is not None:
                w = embedder.proj.weight.data
                nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # like a Linear on flattened patches
                nn.init.zeros_(embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for final in (self.final_layer, self.z_final_layer):
            if final is not None:
                for layer in (final.adaLN_modulation[-1], final.linear, final.linear_cls):
                    if layer is not None:
                        nn.init.zeros_(layer.weight)
                        nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, t: Tensor, y: Tensor, cls: Tensor | None = None) -> ModelOutput:
        """x (N, V+r, H, W), t (N,), y (N,) long, cls (N, repa_dim) iff reg_token → ModelOutput."""
        cfg = self.cfg
        assert (cls is not None) == cfg.reg_token, "pass the noised class token exactly when the model has a REG token"
        v, p, n_patch, n_cls = cfg.vae_channels, cfg.patch_size, cfg.num_patches, int(cfg.reg_token)
        if self.z_embedder is None:
            h = self.x_embedder(x) + self.pos_embed  # (N, L, D)
        else:
            h_x = self.x_embedder(x[:, :v]) + self.pos_embed  # (N, L, D)
            h_z = self.z_embedder(x[:, v:]) + self.pos_embed  # (N, L, D): same positions as the x tokens
            h = torch.cat([h_x, h_z], dim=1)  # (N, 2L, D)
        if self.cls_embedder is not None:
            cls_token = self.cls_norm(self.cls_embedder(cls))  # (N, D); no position embedding (REG's zero row)
            h = torch.cat([cls_token.unsqueeze(1), h], dim=1)  # (N, T, D), T = 1 + L or 1 + 2L
        c = self.t_embedder(t) + self.y_embedder(y)  # (N, D)
        repa = None
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, c, use_reentrant=False)  # (N, T, D)
            else:
                h = block(h, c)  # (N, T, D)
            if i + 1 == cfg.repa_depth:
                repa = self.projector(h[:, : n_cls + n_patch])  # (N, [1+]L, repa_dim): REG token, x-stream patches
        out, cls_out = self.final_layer(h[:, : n_cls + n_patch], c)  # (N, L, p·p·C_x), (N, repa_dim) | None
        out = unpatchify(out, p, self.final_layer.linear.out_features // (p * p))  # (N, C_x, H, W)
        if self.z_final_layer is not None:
            out_z, _ = self.z_final_layer(h[:, n_cls + n_patch :], c)  # (N, L, p·p·C_z)
            out_z = unpatchify(out_z, p, self.z_final_layer.linear.out_features // (p * p))  # (N, C_z, H, W)
            out = join_heads(out, out_z, 2 if cfg.learn_sigma else 1)  # (N, out_channels, H, W)
        return ModelOutput(out=out, cls_out=cls_out, repa=repa)


def build_model(cfg: ModelConfig) -> DiffusionTransformer:
    """The network described by cfg, initialised like DiT (on the current default device)."""
    return DiffusionTransformer(cfg)


def initial_network(cfg: ModelConfig, seed: int) -> DiffusionTransformer:
    """A new run's network before its first step: built after torch.manual_seed(seed), on the CPU (the trainer's
    initialisation; `redi sample --weights init` rebuilds it)."""
    torch.manual_seed(seed)
    return build_model(cfg)

