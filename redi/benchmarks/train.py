"""Training throughput: images/s and MFU of the real loop (`trainer.train.train`) on synthetic shards.

The shards have the real ImageNet-256 shapes (moments 8×32×32, 32 PCs at 16×16, CLS 768, and
the 256×768 patch tokens when the method aligns). The figures are those the loop itself logs
in metrics.jsonl, after one logging interval of warm-up (and compilation). `reference_step`
times the same step the way the public reference code does it: fp32, activation checkpointing
on every block, and DINOv2 run inside the step on the images. `profile_loop` runs the same loop
under torch.profiler and splits the kernel time by kind (matmuls, attention, fused elementwise,
optimiser, EMA, copies) and the GPU's idle share: where the MFU is lost.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import tempfile
import time
from pathlib import Path

import torch

from redi.benchmarks.loader import make_stage_inputs
from redi.pipeline.encoders import ENCODER, random_init
from redi.pipeline.shard_info import read_shard_info
from redi.pipeline.representations import dinov2_base_config
from redi.pipeline.shards import ShardsConfig, build_shards
from redi.trainer.config import TrainConfig
from redi.trainer.metrics import read_metrics
from redi.trainer.models import build_model
from redi.trainer.objectives import TrainBatch, compute_loss
from redi.trainer.plan import loss_config, model_config
from redi.trainer.train import train

WITH_PATCH_TOKENS = ("repa", "reg", "redi+repa")


def make_shards(root: Path, num: int, patch_tokens: bool, *, latent_side: int = 32, grid: int = 16, dim: int = 768,
                pcs: int = 32) -> Path:
    """Synthetic stages and their zarr shards; the defaults are ImageNet-256's shapes (smaller for --quick runs)."""
    make_stage_inputs(root, num, latent_side=latent_side, grid=grid, dim=dim, num_classes=1000, chunk=256)
    build_shards(root, ShardsConfig(pcs=pcs, patch_tokens=patch_tokens, shard_size=256), progress=False)
    return root / "shards"


def loop_throughput(shards: Path, run: Path, *, model: str, method: str, batch: int, steps: int,
                    compile: bool, device: str | None, micro_batch: int | None = None) -> dict[str, float | str | None]:
    """Run `steps` optimiser steps of the real loop; report the second logging interval's figures."""
    log_every = max(1, steps // 2)
    cfg = TrainConfig(shards=str(shards), run=str(run), model=model, method=method, batch_size=batch,
                      max_steps=2 * log_every, log_every=log_every, save_every=10**9, ckpt_every=10**9,
                      compile=compile, num_workers=4, seed=0, micro_batch=micro_batch)
    train(cfg, device=device)
    last = read_metrics(run / "metrics.jsonl")[-1]
    return {"model": model, "method": method, "batch": batch, "micro_batch": micro_batch or batch, "compile": compile,
            "images_per_s": last["images_per_s"], "steps_per_s": last["steps_per_s"], "mfu": last["mfu"]}


KERNEL_KINDS = (  # (kind, pattern on the kernel or op name); the first match wins
    ("outside ops (Python, data)", r"^ProfilerStep"),  # CPU only: a step's self time not spent in any op
    ("optimiser (AdamW)", r"adam"),
    ("EMA and other foreach", r"foreach|lerp"),
    ("attention", r"flash|fmha|attention|sdpa|efficient"),
    ("matmul", r"gemm|matmul|cutlass|xmma|nvjet|cublas|addmm|aten::mm|aten::bmm|aten::linear"),
    ("memory copies", r"memcpy|memset|aten::copy_|to_copy"),
    ("fused by inductor", r"^triton_"),
    ("norms and elementwise", r"norm|elementwise|reduce|vectorized|gelu|softmax|fill|mul|add|sub|div|exp|cat"),
)


def kernel_breakdown(events: list[tuple[str, float]]) -> dict[str, float]:
    """Share of the total self time per kernel kind, from (name, self time) pairs."""
    total = sum(t for _, t in events) or 1.0
    shares: dict[str, float] = {}
    for name, t in events:
        kind = next((k for k, pattern in KERNEL_KINDS if re.search(pattern, name, re.IGNORECASE)), "other")
        shares[kind] = shares.get(kind, 0.0) + t / total
    return dict(sorted(shares.items(), key=lambda kv: -kv[1]))


def profile_loop(shards: Path, run: Path, out: Path, *, model: str, method: str, batch: int, compile: bool,
                 device: str | None, micro_batch: int | None = None, warm_steps: int = 3, active_steps: int = 3,
                 trace: bool = False, pca_rank: int = 8) -> dict[str, object]:
    """Profile `active_steps` steps of the real loop after `warm_steps` (compilation, allocator warm-up).

    Writes OUT/kernels.txt (the top kernels by self time), OUT/breakdown.json and, with `trace`,
    OUT/trace.json (chrome://tracing). On a GPU the times are kernel (device) times and `gpu_idle`
    is the share of the active steps' wall time with no kernel running; on a CPU they are op times.
    """
    from torch.profiler import ProfilerActivity, profile, schedule

    cuda = torch.cuda.is_available() and device != "cpu"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    cfg = TrainConfig(shards=str(shards), run=str(run), model=model, method=method, batch_size=batch,
                      max_steps=warm_steps + active_steps, log_every=10**9, save_every=10**9, ckpt_every=10**9,
                      compile=compile, num_workers=4, seed=0, micro_batch=micro_batch, pca_rank=pca_rank)
    stamps: list[float] = []
    with profile(activities=activities, schedule=schedule(wait=warm_steps - 1, warmup=1, active=active_steps)) as prof:
        def on_step() -> None:
            if cuda:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            prof.step()

        train(cfg, device=device, on_step=on_step)
    averages = prof.key_averages()
    timed = [(e.key, e.self_device_time_total if cuda else e.self_cpu_time_total) for e in averages]
    timed = sorted(((k, t) for k, t in timed if t > 0), key=lambda kt: -kt[1])
    busy_s = sum(t for _, t in timed) / 1e6  # µs → s
    wall_s = stamps[-1] - stamps[warm_steps - 1]
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.txt").write_text(averages.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                                    row_limit=40, max_name_column_width=90))
    result: dict[str, object] = {
        "model": model, "method": method, "batch": batch, "micro_batch": micro_batch or batch, "compile": compile,
        "device": torch.cuda.get_device_name() if cuda else "cpu", "active_steps": active_steps,
        "wall_s_per_step": wall_s / active_steps, "busy_s_per_step": busy_s / active_steps,
        "gpu_idle": max(0.0, 1.0 - busy_s / wall_s) if cuda else None,
        "shares": kernel_breakdown(timed), "top": [{"name": k, "ms_per_step": t / 1e3 / active_steps} for k, t in timed[:15]],
    }
    (out / "breakdown.json").write_text(json.dumps(result, indent=2))
    if trace:
        prof.export_chrome_trace(str(out / "trace.json"))
    return result


def checkpoint_stall(model: str = "SiT-B/2", device: str = "cpu") -> dict[str, float]:
    """Seconds the loop waits per checkpoint of `model` (model + EMA + AdamW state): the whole write when
    saving in the loop, against only the copy into reused host buffers with the background checkpointer
    (the first save also allocates them)."""
    from redi.trainer.checkpoint import BackgroundCheckpointer, save_checkpoint
    from redi.trainer.models import ModelConfig

    net = build_model(ModelConfig(size=model.partition("-")[2], objective="sit", pca_rank=8)).to(device)
    opt = torch.optim.AdamW(net.parameters())
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # creates the two moment buffers
    state = {"model": net.state_dict(), "ema": copy.deepcopy(net).state_dict(), "opt": opt.state_dict(), "step": 1}
    with tempfile.TemporaryDirectory(prefix="redi-bench-ckpt-") as tmp:
        t0 = time.perf_counter()
        save_checkpoint(Path(tmp) / "sync", 1, state, keep=1, milestone_every=0)
        sync_s = time.perf_counter() - t0
        with BackgroundCheckpointer() as checkpointer:
            t0 = time.perf_counter()
            checkpointer.save(Path(tmp) / "background", 1, state, keep=1, milestone_every=0)
            first_s = time.perf_counter() - t0  # allocates the host buffers
            checkpointer.wait()  # in training, the steps between two saves cover this
            t0 = time.perf_counter()
            checkpointer.save(Path(tmp) / "background", 2, state, keep=1, milestone_every=0)
            background_s = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in (Path(tmp) / "sync").rglob("*.pt"))
    return {"checkpoint_gb": size / 1e9, "loop_wait_s_in_loop_write": sync_s, "loop_wait_s_background_first": first_s,
            "loop_wait_s_background": background_s}


def reference_step(shards: Path, *, model: str, method: str, batch: int, steps: int, device: str) -> float:
    """Images/s of the public code's step: fp32, checkpointing on every block, DINOv2-B run on the images."""
    dev = torch.device(device)
    info = read_shard_info(shards)
    cfg = TrainConfig(shards=str(shards), run="unused", model=model, method=method, batch_size=batch)
    model_cfg = model_config(cfg, info)
    net = build_model(model_cfg).to(dev)
    net.grad_checkpointing = True
    dino = random_init(ENCODER, dinov2_base_config(), seed=0).to(dev).eval()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    gen = torch.Generator(device=dev).manual_seed(0)
    in_ch, side = model_cfg.in_channels, model_cfg.input_size
    images = torch.randn(batch, 3, 224, 224, device=dev)

    def step() -> None:
        with torch.no_grad():
            dino(pixel_values=images)  # the reference encodes the batch's images every step
        x0 = torch.randn(batch, in_ch, side, side, device=dev, generator=gen)
        tokens = torch.randn(batch, info.grid**2, info.feature_dim, device=dev, generator=gen)
        tb = TrainBatch(x0=x0, y=torch.zeros(batch, dtype=torch.long, device=dev),
                        cls=torch.randn(batch, info.feature_dim, device=dev), patch_tokens=tokens)
        compute_loss(net, model_cfg, tb, loss_config(cfg), gen).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps * batch / (time.perf_counter() - t0)


def run(quick: bool = False, models: tuple[str, ...] | None = None, method: str = "redi", batch: int | None = None,
        steps: int | None = None, compile: bool = False, reference: bool = True,
        micro_batch: int | None = None) -> dict[str, float | str]:
    """Loop throughput per model (and the reference-style step on the same model for the ratio)."""
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    models = models or (("SiT-B/2", "SiT-XL/2") if cuda else ("SiT-S/2",) if quick else ("SiT-S/2", "SiT-B/2"))
    batch = batch or (256 if cuda else 4 if quick else 8)
    steps = steps or (40 if cuda else 2 if quick else 6)
    figures: dict[str, float | str] = {"device": torch.cuda.get_device_name() if cuda else "cpu", "method": method,
                                       "batch": batch, "micro_batch": micro_batch or batch, "compile": str(compile)}
    with tempfile.TemporaryDirectory(prefix="redi-bench-train-") as tmp:
        shards = make_shards(Path(tmp) / "data", max(2 * batch, 256), patch_tokens=method in WITH_PATCH_TOKENS)
        for model in models:
            row = loop_throughput(shards, Path(tmp) / model.replace("/", "_"), model=model, method=method,
                                  batch=batch, steps=steps, compile=compile, device=device, micro_batch=micro_batch)
            figures[f"{model} images/s"] = row["images_per_s"]
            if row["mfu"] is not None:
                figures[f"{model} MFU"] = row["mfu"]
            if reference:
                ref = reference_step(shards, model=model, method=method, batch=batch, steps=max(1, steps // 2),
                                     device=device)
                figures[f"{model} reference-style images/s"] = ref
                figures[f"{model} speed-up vs reference"] = row["images_per_s"] / ref
    if not quick:
        figures |= {f"{models[0]} {k}": v for k, v in checkpoint_stall(models[0], device).items()}
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="repeatable; default depends on the device")
    parser.add_argument("--method", default="redi")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--micro-batch", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--profile", type=Path, metavar="DIR", help="profile one model's loop instead; write kernels.txt and breakdown.json to DIR")
    parser.add_argument("--trace", action="store_true", help="with --profile, also write DIR/trace.json (chrome://tracing)")
    a = parser.parse_args()
    if a.profile is not None:
        with tempfile.TemporaryDirectory(prefix="redi-bench-profile-") as tmp:
            batch = a.batch or (256 if torch.cuda.is_available() else 8)
            shards = make_shards(Path(tmp) / "data", max(2 * batch, 256), patch_tokens=a.method in WITH_PATCH_TOKENS)
            model = a.model[0] if a.model else ("SiT-XL/2" if torch.cuda.is_available() else "SiT-S/2")
            print(json.dumps(profile_loop(shards, Path(tmp) / "run", a.profile, model=model, method=a.method, batch=batch,
                                          compile=a.compile, device=None, micro_batch=a.micro_batch, trace=a.trace), indent=2))
        raise SystemExit(0)
    print(json.dumps(run(models=tuple(a.model) if a.model else None, method=a.method, batch=a.batch, steps=a.steps,
                         compile=a.compile, reference=a.reference, micro_batch=a.micro_batch), indent=2))
