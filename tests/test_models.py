"""The network: layout, initialisation, fusion, REG/REPA heads, attention, sizes, position embedding, FLOPs."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from redi.common.errors import UserError
from redi.trainer.flops import forward_flops, train_flops_per_image
from redi.trainer.models import (
    Attention,
    ModelConfig,
    TimestepEmbedder,
    build_model,
    get_2d_sincos_pos_embed,
    join_heads,
    patchify,
    unpatchify,
)

TINY = dict(size="debug", input_size=8, num_classes=10, repa_dim=16)


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter non-zero random values, so zero-initialised paths carry signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def inputs(cfg: ModelConfig, n: int = 2, seed: int = 0):
    """Random (x, t, y, cls) for a model."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t = torch.rand(n, generator=g)
    y = torch.randint(0, cfg.num_classes + 1, (n,), generator=g)
    cls = torch.randn(n, cfg.repa_dim, generator=g) if cfg.reg_token else None
    return x, t, y, cls


def test_patchify_unpatchify_round_trip():
    x = torch.randn(2, 5, 8, 8)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 16, 20)
    assert torch.equal(unpatchify(tokens, 2, 5), x)
    # token k covers rows 2i..2i+1, cols 2j..2j+1 with k = i·4 + j; features are (p, q, c) row-major
    assert torch.equal(tokens[1, 1 * 4 + 2].view(2, 2, 5), x[1, :, 2:4, 4:6].permute(1, 2, 0))


def test_patch_embedding_is_linear_on_patchified_tokens():
    model = build_model(ModelConfig(objective="sit", pca_rank=2, **TINY))
    x, *_ = inputs(model.cfg)
    w = model.x_embedder.proj.weight  # (D, C, p, q)
    expected = patchify(x, 2) @ w.permute(0, 2, 3, 1).reshape(w.shape[0], -1).T + model.x_embedder.proj.bias
    assert torch.allclose(model.x_embedder(x), expected, atol=1e-5)


@pytest.mark.parametrize(
    "extra",
    [
        dict(objective="sit"),
        dict(objective="sit", pca_rank=3, repa_depth=1, reg_token=True),
        dict(objective="dit", pca_rank=3, fusion="separate", learn_sigma=True, repa_depth=2, reg_token=True),
    ],
)
def test_output_is_zero_at_init(extra):
    model = build_model(ModelConfig(**TINY, **extra))
    out = model(*inputs(model.cfg))
    assert out.out.shape == (2, model.cfg.out_channels, 8, 8)
    assert torch.count_nonzero(out.out) == 0
    if model.cfg.reg_token:
        assert torch.count_nonzero(out.cls_out) == 0
    if model.cfg.repa_depth:
        assert out.repa.abs().sum() > 0  # the projector is not zero-initialised


def test_merged_fusion_is_sum_of_modality_embeddings():
    model = build_model(ModelConfig(objective="sit", pca_rank=3, **TINY))
    x, *_ = inputs(model.cfg)
    w, b = model.x_embedder.proj.weight, model.x_embedder.proj.bias
    h_x = F.conv2d(x[:, :4], w[:, :4], stride=2)  # x·W_x
    h_z = F.conv2d(x[:, 4:], w[:, 4:], stride=2)  # z·W_z
    expected = (h_x + h_z + b.view(1, -1, 1, 1)).flatten(2).transpose(1, 2)
    assert torch.allclose(model.x_embedder(x), expected, atol=1e-5)


def block_input_length(model: torch.nn.Module) -> int:
    """Sequence length entering the first block, captured with a hook."""
    seen = {}
    handle = model.blocks[0].register_forward_hook(lambda mod, args, out: seen.update(t=args[0].shape[1]))
    model(*inputs(model.cfg))
    handle.remove()
    return seen["t"]


def test_sequence_length_per_fusion_and_reg_token():
    merged = build_model(ModelConfig(objective="sit", pca_rank=3, **TINY))
    separate = build_model(ModelConfig(objective="sit", pca_rank=3, fusion="separate", **TINY))
    separate_reg = build_model(
        ModelConfig(objective="sit", pca_rank=3, fusion="separate", reg_token=True, repa_depth=1, **TINY)
    )
    assert block_input_length(merged) == merged.cfg.num_tokens == 16
    assert block_input_length(separate) == separate.cfg.num_tokens == 32
    assert block_input_length(separate_reg) == separate_reg.cfg.num_tokens == 33


def test_separate_fusion_embeds_each_modality_with_shared_positions():
    model = build_model(ModelConfig(objective="sit", pca_rank=3, fusion="separate", **TINY))
    x, t, y, _ = inputs(model.cfg)
    seen = {}
    model.blocks[0].register_forward_hook(lambda mod, args, out: seen.update(h=args[0]))
    model(x, t, y)
    assert torch.allclose(seen["h"][:, :16], model.x_embedder(x[:, :4]) + model.pos_embed)
    assert torch.allclose(seen["h"][:, 16:], model.z_embedder(x[:, 4:]) + model.pos_embed)


def test_separate_heads_keep_merged_channel_layout():
    ox = torch.arange(2 * 8).view(1, 8, 1, 2).float()  # [eps_x (4 ch), var_x (4 ch)]
    oz = -torch.arange(1, 1 + 2 * 6).view(1, 6, 1, 2).float()  # [eps_z (3 ch), var_z (3 ch)]
    joined = join_heads(ox, oz, groups=2)
    expected = torch.cat([ox[:, :4], oz[:, :3], ox[:, 4:], oz[:, 3:]], dim=1)
    assert torch.equal(joined, expected)
    assert torch.equal(join_heads(ox, oz, groups=1), torch.cat([ox, oz], dim=1))


def test_separate_fusion_output_heads():
    cfg = ModelConfig(objective="dit", pca_rank=3, fusion="separate", learn_sigma=True, **TINY)
    model = build_model(cfg)
    randomize(model)
    out = model(*inputs(cfg)).out
    assert out.shape == (2, 14, 8, 8)
    model.z_final_layer.linear.weight.data.zero_()
    model.z_final_layer.linear.bias.data.zero_()
    out = model(*inputs(cfg)).out
    assert torch.count_nonzero(out[:, 4:7]) == 0 and torch.count_nonzero(out[:, 11:14]) == 0  # z channels
    assert torch.count_nonzero(out[:, :4]) > 0 and torch.count_nonzero(out[:, 7:11]) > 0  # x channels


def test_reg_token_and_repa_projector():
    cfg = ModelConfig(objective="sit", pca_rank=2, reg_token=True, repa_depth=1, **TINY)
    model = build_model(cfg)
    randomize(model)
    x, t, y, cls = inputs(cfg)
    seen = {}
    model.blocks[0].register_forward_hook(lambda mod, args, out: seen.update(h_in=args[0], h_k=out))
    out = model(x, t, y, cls)
    assert out.cls_out.shape == (2, 16) and out.repa.shape == (2, 1 + 16, 16)
    cls_token = model.cls_norm(model.cls_embedder(cls))  # Linear then LayerNorm, no position embedding
    assert torch.allclose(seen["h_in"][:, 0], cls_token, atol=1e-6)
    assert torch.allclose(out.repa, model.projector(seen["h_k"]), atol=1e-6)  # REG: the class token and the patches
    assert sum(isinstance(m, torch.nn.Linear) for m in model.projector) == 3
    assert model.projector[0].out_features == model.projector[2].out_features == 2048
    with pytest.raises(AssertionError):
        model(x, t, y)  # a REG model needs the noised class token


def test_cls_token_changes_patch_outputs():
    cfg = ModelConfig(objective="sit", reg_token=True, repa_depth=1, **TINY)
    model = build_model(cfg)
    randomize(model)
    x, t, y, cls = inputs(cfg)
    assert not torch.allclose(model(x, t, y, cls).out, model(x, t, y, cls + 1).out)


def test_sdpa_attention_equals_naive_attention():
    torch.manual_seed(0)
    attn = Attention(dim=32, num_heads=4)
    x = torch.randn(3, 7, 32)
    q, k, v = attn.qkv(x).view(3, 7, 3, 4, 8).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)  # (N, h, T, T)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(3, 7, 32))
    assert torch.allclose(attn(x), expected, atol=1e-5)


@pytest.mark.parametrize("size,params", [("S/2", 33e6), ("B/2", 130e6), ("L/2", 458e6), ("XL/2", 675e6)])
def test_parameter_counts(size, params):
    with torch.device("meta"):
        model = build_model(ModelConfig(size=size, objective="sit"))
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - params) / params < 0.01, f"{size}: {count / 1e6:.1f}M parameters"


def test_pos_embed_matches_dit_formula():
    dim, grid = 16, 4
    table = get_2d_sincos_pos_embed(dim, grid)
    for row, col in [(0, 0), (1, 3), (3, 2)]:
        expected = []
        for pos in (col, row):  # DiT's first half encodes the column (meshgrid puts w first)
            for fn in (math.sin, math.cos):
                expected += [fn(pos / 10000 ** (k / (dim // 4))) for k in range(dim // 4)]
        assert table[row * grid + col].tolist() == pytest.approx(expected, abs=1e-12)
    model = build_model(ModelConfig(objective="sit", **TINY))
    assert not model.pos_embed.requires_grad
    assert torch.allclose(model.pos_embed[0].double(), torch.from_numpy(get_2d_sincos_pos_embed(64, 4)), atol=1e-7)


def test_timestep_embedding_values():
    emb = TimestepEmbedder.timestep_embedding(torch.tensor([0.0, 3.0]), dim=8)
    freqs = [math.exp(-math.log(10000) * k / 4) for k in range(4)]
    assert emb[0].tolist() == pytest.approx([1.0] * 4 + [0.0] * 4)
    assert emb[1].tolist() == pytest.approx([math.cos(3 * f) for f in freqs] + [math.sin(3 * f) for f in freqs])


def test_init_follows_dit():
    model = build_model(ModelConfig(objective="sit", reg_token=True, repa_depth=1, **TINY))
    assert model.y_embedder.embedding_table.weight.shape == (11, 64)  # 10 classes + null row
    assert 0.01 < model.y_embedder.embedding_table.weight.std() < 0.03
    assert 0.01 < model.t_embedder.mlp[0].weight.std() < 0.03
    assert model.blocks[0].attn.qkv.bias.abs().sum() == 0 and model.blocks[0].attn.qkv.weight.abs().sum() > 0
    assert model.blocks[1].adaLN_modulation[-1].weight.abs().sum() == 0
    assert model.final_layer.linear_cls.weight.abs().sum() == 0
    unconditional = build_model(ModelConfig(size="debug", objective="sit", num_classes=1, input_size=8))
    assert unconditional.y_embedder.embedding_table.num_embeddings == 2  # the null row stays for uniform CFG code


def test_grad_checkpointing_gives_same_outputs_and_gradients():
    cfg = ModelConfig(objective="sit", pca_rank=2, reg_token=True, repa_depth=1, **TINY)
    model = build_model(cfg)
    randomize(model)
    batch = inputs(cfg)
    results = []
    for flag in (False, True):
        model.grad_checkpointing = flag
        model.zero_grad()
        out = model(*batch)
        (out.out.square().sum() + out.cls_out.sum() + out.repa.sum()).backward()
        results.append((out.out.detach(), model.blocks[0].attn.qkv.weight.grad.clone()))
    assert torch.allclose(results[0][0], results[1][0])
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)


def test_bad_configs_raise_user_errors():
    with pytest.raises(UserError, match="size"):
        ModelConfig(size="XXL/2", objective="sit")
    with pytest.raises(UserError, match="separate"):
        ModelConfig(size="B/2", objective="sit", fusion="separate")
    with pytest.raises(UserError, match="sigma"):
        ModelConfig(size="B/2", objective="sit", learn_sigma=True)
    with pytest.raises(UserError, match="REPA depth"):
        ModelConfig(size="debug", objective="sit", repa_depth=3)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(size="debug", objective="sit", input_size=8),
        dict(size="debug", objective="dit", input_size=8, pca_rank=3, fusion="separate", learn_sigma=True,
             repa_depth=1, repa_dim=16, reg_token=True),
        dict(size="S/2", objective="sit", pca_rank=8, repa_depth=4),
    ],
)
def test_flops_match_flop_counter(kwargs):
    cfg = ModelConfig(**kwargs)
    with torch.device("meta"):  # shapes only: fast, no memory
        model = build_model(cfg)
        x, t, y, cls = inputs_on_meta(cfg)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, y, cls)
    assert abs(counter.get_total_flops() / forward_flops(cfg) - 1) < 0.05
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(x, t, y, cls)
        total = out.out.sum()
        for extra in (out.repa, out.cls_out):
            total = total + (extra.sum() if extra is not None else 0)
        total.backward()
    assert abs(counter.get_total_flops() / train_flops_per_image(cfg) - 1) < 0.05


def inputs_on_meta(cfg: ModelConfig):
    """(x, t, y, cls) for one image on the current (meta) device."""
    x = torch.empty(1, cfg.in_channels, cfg.input_size, cfg.input_size)
    cls = torch.empty(1, cfg.repa_dim) if cfg.reg_token else None
    return x, torch.empty(1), torch.zeros(1, dtype=torch.long), cls
