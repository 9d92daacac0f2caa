"""`redi convert`: public DiT/SiT/REPA/REG/ReDi state dicts load strictly and behave identically under our samplers.

The reference networks below are written out from the published model definitions (facebookresearch/DiT
models.py, willisma/SiT models.py, sihyun-yu/REPA models/sit.py, Martinser/REG, zelaki/ReDi models.py, with
timm's PatchEmbed/Attention/Mlp), minimal and literal, with their exact key names, at a tiny size.
"""
from __future__ import annotations

import itertools
import argparse
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

from redi.cli import app
from redi.common.errors import UserError
from redi.sampler.guidance import GuidanceConfig, GuidedModel
from redi.sampler.samplers import ode_euler
from redi.trainer.convert import ConvertConfig, ConvertResult, convert_checkpoint, fold_time_reversal
from redi.trainer.models import ModelConfig, build_model

HIDDEN, DEPTH, HEADS, INPUT, CLASSES, Z_DIM, PROJ_DIM = 64, 2, 2, 8, 10, 16, 2048  # "debug" backbone


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):  # timm PatchEmbed (flatten, bias)
    def __init__(self, in_chans, embed_dim, patch_size):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):  # timm Attention, qkv_bias=True, qk_norm=False, the non-fused path
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):  # timm Mlp with tanh-GELU
    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size, bias=True), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size, bias=True))
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):  # class_dropout_prob > 0: one extra (null) row
    def __init__(self, num_classes, hidden_size):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels):
        return self.embedding_table(labels)


class Block(nn.Module):  # DiTBlock / SiTBlock
    def __init__(self, hidden_size, num_heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, 4 * hidden_size)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):  # REG's adds linear_cls on token 0
    def __init__(self, hidden_size, patch_size, out_channels, cls_token_dim=None):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        if cls_token_dim:
            self.linear_cls = nn.Linear(hidden_size, cls_token_dim, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c, cls=None):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        x = modulate(self.norm_final(x), shift, scale)
        if cls is None:
            return self.linear(x), None
        return self.linear(x[:, 1:]), self.linear_cls(x[:, 0])


def build_mlp(hidden_size, projector_dim, z_dim):
    return nn.Sequential(nn.Linear(hidden_size, projector_dim), nn.SiLU(), nn.Linear(projector_dim, projector_dim),
                         nn.SiLU(), nn.Linear(projector_dim, z_dim))


class PublicNet(nn.Module):
    """DiT/SiT with ReDi's 4 + r channels, REPA's `projectors` (or ReDi's `projector`) and REG's class token."""

    def __init__(self, in_channels=4, learn_sigma=False, projectors=(), single_projector=False, reg=False, encoder_depth=1):
        super().__init__()
        self.in_channels, self.learn_sigma, self.reg, self.encoder_depth = in_channels, learn_sigma, reg, encoder_depth
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.x_embedder = PatchEmbed(in_channels, HIDDEN, 2)
        self.t_embedder = TimestepEmbedder(HIDDEN)
        self.y_embedder = LabelEmbedder(CLASSES, HIDDEN)
        self.pos_embed = nn.Parameter(torch.zeros(1, (INPUT // 2) ** 2 + int(reg), HIDDEN), requires_grad=False)
        self.blocks = nn.ModuleList([Block(HIDDEN, HEADS) for _ in range(DEPTH)])
        if single_projector:
            self.projector = build_mlp(HIDDEN, PROJ_DIM, Z_DIM)  # ReDi with repa_loss
        if projectors:
            self.projectors = nn.ModuleList([build_mlp(HIDDEN, PROJ_DIM, z) for z in projectors])  # REPA / REG
        self.final_layer = FinalLayer(HIDDEN, 2, self.out_channels, Z_DIM if reg else None)
        if reg:
            self.cls_projectors2 = nn.Linear(Z_DIM, HIDDEN, bias=True)
            self.wg_norm = nn.LayerNorm(HIDDEN, elementwise_affine=True, eps=1e-6)

    def unpatchify(self, x):
        c, p = self.out_channels, 2
        h = w = int(x.shape[1] ** 0.5)
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], h, w, p, p, c))
        return x.reshape(x.shape[0], c, h * p, h * p)

    def forward(self, x, t, y, cls_token=None):
        """(full output (N, out_channels, H, W), REPA projections per projector, REG class-token output)."""
        x = self.x_embedder(x)
        if cls_token is not None:  # REG
            cls_token = self.wg_norm(self.cls_projectors2(cls_token)).unsqueeze(1)
            x = torch.cat((cls_token, x), dim=1)
        x = x + self.pos_embed
        N, T, D = x.shape
        c = self.t_embedder(t) + self.y_embedder(y)
        zs = []
        for i, block in enumerate(self.blocks):
            x = block(x, c)
            if (i + 1) == self.encoder_depth:
                heads = list(getattr(self, "projectors", [])) + ([self.projector] if hasattr(self, "projector") else [])
                zs = [projector(x.reshape(-1, D)).reshape(N, T, -1) for projector in heads]
        x, cls_out = self.final_layer(x, c, cls=cls_token)
        return self.unpatchify(x), zs, cls_out


ORIGIN_NETS = {  # origin → (PublicNet options, saved as a training checkpoint?)
    "dit": (dict(learn_sigma=True), False),
    "sit": (dict(learn_sigma=True), False),
    "repa": (dict(projectors=(Z_DIM, 8)), True),
    "reg": (dict(projectors=(Z_DIM,), reg=True), True),
    "redi": (dict(in_channels=4 + 3, single_projector=True), True),
}


def randomize(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random non-zero weights (REG's class-token position row stays zero, as get_2d_sincos_pos_embed makes it)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.15 if p.ndim > 1 else 0.05))
        if getattr(model, "reg", False):
            model.pos_embed[:, 0] = 0
    return {k: v.clone() for k, v in model.state_dict().items()}


def public_checkpoint(tmp_path: Path, origin: str, **extra) -> tuple[PublicNet, Path]:
    """A public network with random weights saved the way its code saves it (EMA release or training checkpoint)."""
    options, training = ORIGIN_NETS[origin]
    net = PublicNet(**options).eval()
    raw = randomize(net, seed=1)  # the raw (non-EMA) weights of a training checkpoint
    ema = randomize(net, seed=2)  # the network under test holds the EMA weights
    path = tmp_path / f"{origin}.pt"
    torch.save({"model": raw, "ema": ema, "opt": {}, "steps": 123, **extra} if training else ema, path)
    return net, path


def load_converted(path: Path) -> tuple[torch.nn.Module, dict]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(ModelConfig(**ckpt["model_config"])).eval()
    model.load_state_dict(ckpt["ema"], strict=True)
    return model, ckpt


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float32 rounding relative to the output's scale (attention kernels sum in different orders)."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=2e-5 * float(expected.detach().abs().max()) + 1e-6)


def inputs(in_channels: int, n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_channels, INPUT, INPUT, generator=g)
    t = torch.rand(n, generator=g) * 0.9 + 0.05
    y = torch.tensor([0, 3, CLASSES])[:n]  # CLASSES: the null label
    return x, t, y, torch.randn(n, Z_DIM, generator=g)


@torch.no_grad()
@pytest.mark.parametrize("origin", list(ORIGIN_NETS))
def test_converted_network_equals_the_public_one(origin: str, tmp_path: Path) -> None:
    net, path = public_checkpoint(tmp_path, origin)
    result = convert_checkpoint(ConvertConfig(checkpoint=path, origin=origin, out=tmp_path / "out.pt"))
    ours, ckpt = load_converted(result.out)  # strict: no missing or unexpected key
    x, t, y, cls = inputs(net.in_channels)
    cfg = ours.cfg
    if origin == "dit":
        steps = torch.tensor([0.0, 500.0, 999.0])
        expected, _, _ = net(x, steps, y)  # DiT returns ε and the variance values
        assert cfg.objective == "dit" and cfg.learn_sigma
        assert_same(ours(x, steps, y).out, expected)
    elif origin in ("sit", "redi"):  # t = 1 is data there: v_ours(x, t) = −v_origin(x, 1 − t)
        full, zs, _ = net(x, 1 - t, y)
        expected = full.chunk(2, dim=1)[0] if net.learn_sigma else full  # their forward keeps the mean half
        out = ours(x, t, y)
        assert_same(out.out, -expected)
        if origin == "redi":
            assert cfg.pca_rank == 3 and cfg.fusion == "merged" and cfg.repa_depth == 1
            assert_same(ours(x, t, y).repa, net(x, 1 - t, y)[1][0])
    else:  # REPA / REG: same time direction as ours
        full, zs, cls_out = net(x, t, y, cls if origin == "reg" else None)
        out = ours(x, t, y, cls if origin == "reg" else None)
        assert_same(out.out, full)
        assert_same(out.repa, zs[0])  # REG projects its class token too, and so do we
        if origin == "reg":
            assert_same(out.cls_out, cls_out)
    ema = torch.load(path, weights_only=True)
    if isinstance(ema, dict) and "ema" in ema:
        assert ckpt["origin"]["weights"] == "ema" and ckpt["step"] == 123
    assert ckpt["origin"]["name"] == origin and len(ckpt["origin"]["sha256"]) == 64
    assert ckpt["shards"]["vae"]["id"] == "stabilityai/sd-vae-ft-ema" and ckpt["shards"]["latent_norm"]["scale"] == [0.18215] * 4
    assert ckpt["train"]["class_dropout"] == 0.1 and not ckpt["train"]["unconditional"]
    assert ckpt["train"]["method"] == {"dit": "baseline", "sit": "baseline", "repa": "repa", "reg": "reg",
                                        "redi": "redi+repa"}[origin]
    assert ckpt["train"]["resolution"] == INPUT * 8 and ckpt["shards"]["latent_shape"] == [4, INPUT, INPUT]


@torch.no_grad()
@pytest.mark.parametrize("steps", [1, 4])
def test_sampler_steps_of_a_converted_sit_model_equal_the_sit_convention(steps: int, tmp_path: Path) -> None:
    net, path = public_checkpoint(tmp_path, "sit")
    ours, _ = load_converted(convert_checkpoint(ConvertConfig(path, "sit", tmp_path / "out.pt")).out)
    x, _, y, _ = inputs(4)
    (ours_x,) = ode_euler(GuidedModel(ours, y, GuidanceConfig()), (x.clone(),), steps)  # t: 1 → 0 (noise → data)
    sit_x = x.clone()
    grid = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64).tolist()  # SiT: s = 0 noise → 1 data
    for s, s_next in itertools.pairwise(grid):
        v = net(sit_x, torch.full((len(x),), s), y)[0].chunk(2, dim=1)[0]
        sit_x = sit_x + (s_next - s) * v
    assert_same(ours_x, sit_x)
    assert not torch.allclose(ours_x, x, atol=1e-2), "the step moved the state"


@torch.no_grad()
def test_fold_time_reversal_is_an_involution_on_the_network() -> None:
    model = build_model(ModelConfig(size="debug", objective="sit", input_size=INPUT, num_classes=CLASSES, repa_dim=Z_DIM))
    randomize(model, seed=3)
    folded = build_model(model.cfg)
    folded.load_state_dict(fold_time_reversal(model.state_dict()))
    x, t, y, _ = inputs(4)
    assert_same(folded(x, t, y).out, -model(x, 1 - t, y).out)
    twice = build_model(model.cfg)
    twice.load_state_dict(fold_time_reversal(folded.state_dict()))
    assert_same(twice(x, t, y).out, model(x, t, y).out)


@torch.no_grad()
def test_legacy_repa_layout_and_extra_projectors(tmp_path: Path) -> None:
    net, path = public_checkpoint(tmp_path, "repa")
    ckpt = torch.load(path, weights_only=True)
    ckpt["ema"] = {(f"decoder_blocks.{int(k.split('.')[1]) - 1}." + k.split(".", 2)[2]
                    if k.startswith("blocks.") and int(k.split(".")[1]) >= 1 else k): v for k, v in ckpt["ema"].items()}
    torch.save(ckpt, path)
    result = convert_checkpoint(ConvertConfig(path, "repa", tmp_path / "out.pt"))
    ours, _ = load_converted(result.out)
    x, t, y, _ = inputs(4)
    assert_same(ours(x, t, y).out, net(x, t, y)[0])
    assert ours.cfg.repa_depth == 1, "a legacy file's encoder depth is its number of `blocks`"
    assert any("extra REPA projector" in n for n in result.notes) and any("legacy" in n for n in result.notes)


def test_pickled_args_need_trust_and_set_the_config(tmp_path: Path) -> None:
    args = argparse.Namespace(pca_rank=3, dino_drop_prob=0.2, path_type="Linear", prediction="velocity",
                              num_classes=CLASSES)
    _, path = public_checkpoint(tmp_path, "redi", args=args)
    with pytest.raises(UserError, match="--trust-pickle"):
        convert_checkpoint(ConvertConfig(path, "redi", tmp_path / "out.pt"))
    assert not (tmp_path / "out.pt").exists()
    result = convert_checkpoint(ConvertConfig(path, "redi", tmp_path / "out.pt", trust_pickle=True))
    _, ckpt = load_converted(result.out)
    config = ckpt["train"]
    assert (config["rep_drop"], config["rep_drop_mode"], config["rep_drop_target"]) == (0.2, "batch", "clean")
    assert config["pca_rank"] == 3 and ckpt["shards"]["pcs"] == 3
    bad = argparse.Namespace(path_type="GVP")
    _, path = public_checkpoint(tmp_path, "redi", args=bad)
    with pytest.raises(UserError, match="interpolant"):
        convert_checkpoint(ConvertConfig(path, "redi", tmp_path / "out2.pt", trust_pickle=True))


def _converted_config(tmp_path: Path, origin: str, name: str, **args) -> tuple[dict, ConvertResult]:
    """Convert a public training checkpoint whose pickled argparse args are `args`; its recorded config."""
    _, path = public_checkpoint(tmp_path, origin, args=argparse.Namespace(**args))
    result = convert_checkpoint(ConvertConfig(path, origin, tmp_path / f"{name}-ours.pt", trust_pickle=True))
    ckpt = torch.load(result.out, map_location="cpu", weights_only=True)
    assert ckpt["train"]["class_dropout"] == ckpt["model_config"]["class_dropout"]
    return ckpt["train"], result


def test_recorded_settings_are_what_the_reference_trained_with(tmp_path: Path) -> None:
    """ReDi names the REPA weight --repa-weight; REPA/REG's network drops labels at 0.1 whatever --cfg-prob says."""
    redi, _ = _converted_config(tmp_path, "redi", "redi", pca_rank=3, repa_loss=True, repa_weight=0.7, proj_coeff=0.2)
    assert redi["repa_weight"] == 0.7 and redi["weighting"] == "uniform"
    repa, _ = _converted_config(tmp_path, "repa", "repa", cfg_prob=0.0, proj_coeff=0.3, weighting="lognormal")
    assert (repa["class_dropout"], repa["repa_weight"], repa["weighting"]) == (0.1, 0.3, "lognormal")
    reg, _ = _converted_config(tmp_path, "reg", "reg", cfg_prob=0.0, weighting="uniform", cls=0.05)
    assert (reg["class_dropout"], reg["cls_weight"], reg["weighting"]) == (0.1, 0.05, "uniform")
    legacy, result = _converted_config(tmp_path, "repa", "legacy", cfg_prob=0.1, legacy=True)
    assert legacy["class_dropout"] == pytest.approx(1 - 0.9 * 0.9)  # train.py's drop, then the network's
    assert any("--legacy" in note for note in result.notes)
    with pytest.raises(UserError, match="--weighting"):
        _converted_config(tmp_path, "reg", "bad", weighting="cosine")


def test_converted_redi_samples_with_representation_guidance_only_when_rep_drop_is_known(tmp_path: Path) -> None:
    _, path = public_checkpoint(tmp_path, "redi")
    sample = ["sample", "--vae", "tiny-random", "--num", "2", "--steps", "3", "--guidance", "cfg+rg", "--device", "cpu"]
    unknown = convert_checkpoint(ConvertConfig(path, "redi", tmp_path / "unknown.pt"))
    assert any("representation drop unknown" in n for n in unknown.notes)
    refused = CliRunner().invoke(app, [*sample, "--ckpt", str(unknown.out), "--out", str(tmp_path / "a")])
    assert refused.exit_code == 2 and "Representation Guidance" in refused.output
    known = convert_checkpoint(ConvertConfig(path, "redi", tmp_path / "known.pt", rep_drop=0.2))
    result = CliRunner().invoke(app, [*sample, "--ckpt", str(known.out), "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "b" / "samples.npz").is_file()


def test_refusals(tmp_path: Path) -> None:
    _, repa = public_checkpoint(tmp_path, "repa")
    with pytest.raises(UserError, match="do not fit"):  # read as SiT: its projectors have no place in a SiT network
        convert_checkpoint(ConvertConfig(repa, "sit", tmp_path / "b.pt"))
    _, redi = public_checkpoint(tmp_path, "redi")
    with pytest.raises(UserError, match="ReDi model"):
        convert_checkpoint(ConvertConfig(redi, "repa", tmp_path / "c.pt"))
    with pytest.raises(UserError, match="Unknown origin"):
        ConvertConfig(repa, "flux", tmp_path / "d.pt")
    with pytest.raises(UserError, match="--rep-drop applies"):
        ConvertConfig(repa, "repa", tmp_path / "d.pt", rep_drop=0.2)
    with pytest.raises(UserError, match="No checkpoint"):
        convert_checkpoint(ConvertConfig(tmp_path / "missing.pt", "dit", tmp_path / "e.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="Cannot read"):
        convert_checkpoint(ConvertConfig(tmp_path / "junk.pt", "dit", tmp_path / "f.pt"))
    ours = convert_checkpoint(ConvertConfig(redi, "redi", tmp_path / "ours.pt")).out
    with pytest.raises(UserError, match="already a redi checkpoint"):  # a second conversion would reverse time again
        convert_checkpoint(ConvertConfig(ours, "redi", tmp_path / "g.pt"))
    assert not any((tmp_path / n).exists() for n in ("b.pt", "c.pt", "e.pt", "f.pt", "g.pt"))


def test_cli_convert(tmp_path: Path) -> None:
    _, path = public_checkpoint(tmp_path, "dit")
    out = tmp_path / "dit-redi.pt"
    runner = CliRunner()
    result = runner.invoke(app, ["convert", str(path), "--from", "dit", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file() and "DiT-debug" in result.output
    again = runner.invoke(app, ["convert", str(path), "--from", "dit", "--out", str(out)])
    assert again.exit_code == 2 and "--force" in again.output
    forced = runner.invoke(app, ["convert", str(path), "--from", "dit", "--out", str(out), "--force"])
    assert forced.exit_code == 0, forced.output
