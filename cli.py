"""`redi`: one thin command per stage. Parses flags, builds a config, calls one function."""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from common.display import configure_logging
from common.errors import UserError, disk_full

app = typer.Typer(
    name="redi",
    help="Representation-aware latent diffusion (ReDi, REPA, REG): encode → features → pca → shards → train → sample → eval.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


@app.callback()
def _display() -> None:
    configure_logging()  # before any command: the library's log lines and warnings go through one rich handler


# What to lower when a command runs out of GPU memory.
MEMORY_HINTS = {
    "encode_command": "a smaller --batch-size", "features_command": "a smaller --batch-size",
    "pca_command": "a smaller --batch-images", "sample_command": "a smaller --batch-size",
    "eval_command": "a smaller --batch-size",
    "train_command": "a smaller --micro-batch (the global --batch-size stays: gradient accumulation makes it up)",
}


def user_errors(fn: F) -> F:
    """Turn a UserError (or a full disk, or running out of GPU memory) into one red sentence and exit code 2 instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            console.print(f"[bold red]error:[/] {escape(str(e))}")  # paths may hold [brackets]
            sys.exit(2)
        except json.JSONDecodeError as e:  # the long tail: a damaged JSON file the command reads
            console.print(f"[bold red]error:[/] a JSON file this command reads is damaged ({escape(str(e))}); "
                          "`redi verify DATA` or `redi info` names the stage to redo.")
            sys.exit(2)
        except Exception as e:
            if (full := disk_full(e)) is not None:  # a write outside the atomic helper (zarr chunks, metrics lines)
                console.print(f"[bold red]error:[/] {escape(str(full))}")
                sys.exit(2)
            if type(e).__name__ != "OutOfMemoryError":  # torch.OutOfMemoryError, without importing torch here
                raise
            detail = str(e).split(".")[0].strip()
            console.print(f"[bold red]error:[/] The GPU ran out of memory ({detail}): rerun with {MEMORY_HINTS.get(fn.__name__, 'a smaller batch')}.")
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


# --- demo-data, encode, features, info ---

SourceArg = Annotated[
    str,
    typer.Argument(
        help="Images: a folder (ImageFolder or flat), an edm2 .zip with dataset.json, a WebDataset .tar, "
        "a folder of .tar files or a quoted glob of them.",
        show_default=False,
    ),
]
DataOpt = Annotated[Path, typer.Option("--data", help="Data root: the stage writes DATA/latents or DATA/features.")]
RevisionOpt = Annotated[str, typer.Option("--revision", help="Hub revision (branch, tag or commit) of the model; recorded in the manifest.")]
ResolutionOpt = Annotated[int, typer.Option("--resolution", help="ADM centre-crop side R in pixels (a multiple of 16; the papers use 256 or 512).")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", help="Images per forward pass (recorded: batches shape the numerics).")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="Torch device, e.g. cpu, cuda, cuda:1; default: cuda if available, else cpu.", show_default=False)]
PrecisionOpt = Annotated[str | None, typer.Option("--precision", help="Autocast precision: bf16, fp16 or fp32; default: fp32, as the reference preprocessing (bf16 is faster on a GPU and less exact).", show_default=False)]
ForceOpt = Annotated[bool, typer.Option("--force/--no-force", help="Delete and redo a stage that was made with different settings.")]
ChunkSizeOpt = Annotated[int, typer.Option("--chunk-size", help="Images per committed unit (what a killed run redoes) and per Zarr chunk.")]
WorkersOpt = Annotated[int | None, typer.Option("--workers", help="DataLoader processes decoding and cropping images (0: in the main process); default: one per core, at most 4.", show_default=False)]
EncoderOpt = Annotated[str, typer.Option("--encoder", help="Representation encoder: hub id or local directory of a DINOv2, DINOv3, SigLIP, SigLIP2, CLIP, MAE or I-JEPA model (the family is read from its config; docs/ENCODERS.md), or tiny-random[:FAMILY] (tests and demos only).")]
DINO_DEFAULT = "facebook/dinov2-with-registers-base"
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Storage dtype of the output arrays: float16 or float32.")]


def _print_stage_result(result: Any) -> None:
    """Summary table of an encode/features run, with the nothing-to-do and skipped-images notes."""
    from pipeline.stage import StageState

    if result.rank != 0:
        return
    if result.state is StageState.COMPLETE:
        console.print(f"[green]{escape(str(result.out))} is complete with these settings: nothing to do.[/]")
    console.print(result.table())
    if result.skipped:
        console.print(
            f"[yellow]warning: {result.skipped} images could not be read and were skipped "
            f"(listed in {escape(str(result.out / 'errors.jsonl'))}).[/]"
        )


@app.command("demo-data")
@user_errors
def demo_data_command(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the images into (ImageFolder layout).")] = Path("data/demo-images"),
    num: Annotated[int, typer.Option("--num", help="Number of images (5 classes, cycled).")] = 64,
    seed: Annotated[int, typer.Option("--seed", min=0, max=2**40, help="Seed of the generated images.")] = 0,
) -> None:
    """Write the embedded demo image set: coloured shapes on textured backgrounds, generated in code."""
    from pipeline.demo_data import write_demo_images

    result = write_demo_images(out, num, seed)
    console.print(f"[green]Wrote {result.count} demo images in {len(result.classes)} classes ({', '.join(result.classes)}) to {escape(str(result.out))}.[/]")


@app.command("encode")
@user_errors
def encode_command(
    source: SourceArg,
    data: DataOpt = Path("data"),
    vae: Annotated[str, typer.Option("--vae", help="VAE: hub id, local directory, or tiny-random (tests and demos only).")] = "stabilityai/sd-vae-ft-ema",
    revision: RevisionOpt = "main",
    resolution: ResolutionOpt = 256,
    batch_size: BatchSizeOpt = 64,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    force: ForceOpt = False,
    chunk_size: ChunkSizeOpt = 256,
    workers: WorkersOpt = None,
    dtype: DtypeOpt = "float16",
    with_features: Annotated[bool, typer.Option("--with-features", help="Also run the features stage in the same pass, decoding each image once (what `make encode` does).")] = False,
    encoder: EncoderOpt = DINO_DEFAULT,
    encoder_revision: Annotated[str, typer.Option("--encoder-revision", help="Hub revision of --encoder (with --with-features).")] = "main",
) -> None:
    """Stage encode: VAE posterior moments (mean, std) of every centre-cropped image → DATA/latents
    (and with --with-features, the features stage → DATA/features from the same decoded images)."""
    from pipeline.encode import ENCODE, FEATURES, EncodeConfig, run_stages

    cfg = EncodeConfig(source, data, vae, revision, resolution, batch_size, device, precision, chunk_size, workers, dtype, force)
    jobs = [(ENCODE, cfg)] + ([(FEATURES, dataclasses.replace(cfg, model=encoder, revision=encoder_revision))] if with_features else [])
    for result in run_stages(jobs):
        _print_stage_result(result)


@app.command("features")
@user_errors
def features_command(
    source: SourceArg,
    data: DataOpt = Path("data"),
    encoder: EncoderOpt = DINO_DEFAULT,
    revision: RevisionOpt = "main",
    resolution: ResolutionOpt = 256,
    batch_size: BatchSizeOpt = 64,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    force: ForceOpt = False,
    chunk_size: ChunkSizeOpt = 256,
    workers: WorkersOpt = None,
    dtype: DtypeOpt = "float16",
) -> None:
    """Stage features: the encoder's patch tokens (and its CLS or pooled global token) of every centre-cropped image → DATA/features."""
    from pipeline.encode import EncodeConfig, run_features

    cfg = EncodeConfig(source, data, encoder, revision, resolution, batch_size, device, precision, chunk_size, workers, dtype, force)
    _print_stage_result(run_features(cfg))


@app.command("info")
@user_errors
def info_command(
    data: Annotated[Path, typer.Argument(help="Data root (latents/, features/, pca.safetensors, shards/) or run directory.")],
) -> None:
    """Show what each stage of a data root holds (counts, shapes, encoders, completeness, skipped images), or a run's state."""
    from pipeline.info import info_table

    console.print(info_table(data))

# --- pca ---

@app.command("pca")
@user_errors
def pca_command(
    data: Annotated[Path, typer.Option("--data", help="Data root: reads DATA/features, writes DATA/pca.safetensors.")] = Path("data"),
    num_images: Annotated[int, typer.Option("--num-images", help="Images drawn at random (seeded) among the valid ones; all if fewer.")] = 76_800,
    seed: Annotated[int, typer.Option("--seed", min=0, max=2**40, help="Seed of the image draw.")] = 0,
    device: Annotated[str, typer.Option("--device", help="Where the float64 accumulation runs: auto, cpu, cuda or cuda:N.")] = "auto",
    batch_images: Annotated[int, typer.Option("--batch-images", help="Images read and accumulated per step (bounds memory).")] = 128,
    import_file: Annotated[Path | None, typer.Option("--import", help="Convert a reference ReDi dino_pca_model.pth instead of fitting.")] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle/--no-trust-pickle", help="Allow unpickling the --import file (it can run code).")] = False,
    force: Annotated[bool, typer.Option("--force/--no-force", help="Replace a pca.safetensors made with other settings.")] = False,
) -> None:
    """Fit the standardised PCA of the DINOv2 patch tokens (SPEC §4), or import the reference one."""
    from rich.table import Table

    from pipeline.pca import ImportConfig, PCAConfig, explained_variance_rows, import_pca, run_pca

    if import_file is not None:
        result = import_pca(data, ImportConfig(file=import_file, trust_pickle=trust_pickle, force=force))
    else:
        cfg = PCAConfig(num_images=num_images, seed=seed, device=device, batch_images=batch_images, force=force)
        result = run_pca(data, cfg)
    m = result.model
    rows = explained_variance_rows(m)
    table = Table(title=f"Explained variance, first {len(rows)} of {len(m.explained_variance)} components")
    for name in ("PC", "variance", "ratio", "cumulative"):
        table.add_column(name, justify="right")
    for index, variance, ratio, cumulative in rows:
        table.add_row(str(index), f"{variance:.4g}", f"{ratio:.2%}", f"{cumulative:.2%}")
    console.print(table)
    source = m.source if len(m.source) <= 28 else m.source[:28] + "…"
    what = f"{m.n_images:,} images, {m.n_tokens:,} tokens of {m.dim} dims, source {source}"
    if result.up_to_date:
        console.print(f"nothing to do: {escape(str(result.path))} is up to date ({what}).")
    else:
        rate = f", {m.n_tokens / result.seconds:,.0f} tokens/s" if import_file is None and result.seconds > 0 else ""
        console.print(f"[green]wrote[/] {escape(str(result.path))} ({what}) in {result.seconds:.1f} s{rate}; "
                      f"plot: {escape(str(result.plot))}")

# --- shards, verify ---

@app.command("shards")
@user_errors
def shards_command(
    data: Annotated[Path, typer.Option("--data", help="Data root: reads latents/, features/ and pca.safetensors, writes DATA/shards.")] = Path("data"),
    format: Annotated[str, typer.Option("--format", help="Stores to write: zarr (random access, one node), wds (WebDataset tars, streaming) or both.")] = "zarr",
    pcs: Annotated[int, typer.Option("--pcs", help="K: principal components of the patch tokens kept per sample (train with any rank r ≤ K).")] = 32,
    patch_tokens: Annotated[bool, typer.Option("--patch-tokens/--no-patch-tokens", help="Also store the full patch tokens (P×D), needed by REPA/REG alignment (large).")] = False,
    shard_size: Annotated[int, typer.Option("--shard-size", help="Samples per block: one tar, one zarr block, one committed unit.")] = 1024,
    seed: Annotated[int, typer.Option("--seed", min=0, max=2**40, help="Seed of the write-time shuffle of the sample order.")] = 0,
    device: Annotated[str, typer.Option("--device", help="Where the PCA projection runs: auto, cpu, cuda or cuda:N.")] = "auto",
    force: Annotated[bool, typer.Option("--force/--no-force", help="Delete and redo shards made with other settings.")] = False,
) -> None:
    """Join latents, features and the PCA into training shards (Zarr and/or WebDataset) described by shards.json."""
    from rich.table import Table

    from pipeline.shards import ShardsConfig, build_shards

    formats = ("zarr", "wds") if format == "both" else (format,)
    cfg = ShardsConfig(formats=formats, pcs=pcs, patch_tokens=patch_tokens, shard_size=shard_size, seed=seed,
                       device=device, force=force)
    result = build_shards(data, cfg)
    if result.up_to_date:
        console.print(f"[green]{escape(str(result.root))} is complete with these settings: nothing to do.[/]")
    table = Table(title=f"shards → {escape(str(result.root))}")
    table.add_column("")
    table.add_column("value", justify="right")
    rate = f"{result.written_samples / result.seconds:,.0f}" if result.written_samples and result.seconds > 0 else "–"
    for name, value in [("samples", f"{result.num_samples:,}"), ("skipped images", f"{result.num_skipped:,}"),
                        ("shards", f"{result.num_shards:,} × {shard_size}"), ("formats", ", ".join(result.formats)),
                        ("PCs per sample", str(result.info["pca"]["K"])),
                        ("written now", f"{result.written_samples:,}"), ("time", f"{result.seconds:.1f} s"),
                        ("samples/s", rate)]:
        table.add_row(name, value)
    console.print(table)
    if result.num_skipped:
        console.print(f"[yellow]warning: {result.num_skipped} images are invalid in latents/ or features/ and were left "
                      f"out (listed under 'skipped' in {escape(str(result.root / 'shards.json'))}).[/]")


@app.command("verify")
@user_errors
def verify_command(
    data: Annotated[str, typer.Argument(help="Data root to check (latents/, features/, pca.safetensors, shards/), a URL that `redi publish` wrote (its shards/), or a run directory (config.json, checkpoints).", show_default=False)],
    deep: Annotated[bool, typer.Option("--deep/--no-deep", help="Hash and decode every input chunk and hash every shard file and checkpoint; --no-deep checks manifests, shapes and presence only.")] = True,
    repair: Annotated[bool, typer.Option("--repair", help="Forget the encode/features chunks whose files are missing or changed, so that rerunning the stage rewrites only them.")] = False,
) -> None:
    """Re-check every stage of a data root (manifests, committed chunks, arrays, PCA, shard checksums and counts), or every checkpoint of a run against its SHA-256."""
    from rich.table import Table

    from pipeline.info import is_run_dir
    from pipeline.remote import is_url, redact
    from pipeline.verify import verify_data

    is_run = not is_url(data) and is_run_dir(Path(data))
    if is_run:
        from trainer.verify import verify_run

        checks = verify_run(Path(data), deep=deep)
    else:
        checks = verify_data(data, deep=deep, repair=repair)
    shown = escape(redact(data))  # a URL without its credentials
    colours = {"ok": "green", "absent": "dim", "warning": "yellow", "FAILED": "bold red"}
    table = Table(title=f"verify {shown}")
    for name in ("stage", "status", "details"):
        table.add_column(name)
    for check in checks:
        table.add_row(check.stage, f"[{colours[check.status]}]{check.status}[/]", escape(check.details))
    console.print(table)
    failed = [check for check in checks if check.problem]
    if failed:
        raise UserError(failed[0].problem)
    console.print(f"[green]{shown}: every {'part' if is_run else 'stage present'} is consistent.[/]")


@app.command("publish")
@user_errors
def publish_command(
    data: Annotated[Path, typer.Argument(help="Data root whose finished shards/ (and pca.safetensors) to copy.", show_default=False)],
    dest: Annotated[str, typer.Argument(help="Where: s3://bucket/prefix, gs://…, any fsspec URL or a local path; it gets DEST/shards/ and DEST/pca.safetensors. Credentials come from the environment.", show_default=False)],
) -> None:
    """Copy finished shards to a bucket (each file checked against shards.json, shards.json last), for `redi train --shards DEST`."""
    from rich.table import Table

    from pipeline.publish import publish_shards

    result = publish_shards(data, dest)
    if result.up_to_date:
        console.print(f"[green]{escape(str(result.dest))} already holds these shards: nothing to do.[/]")
        return
    table = Table(title="redi publish", show_header=False)
    for name, value in [("to", escape(str(result.dest))), ("files", f"{result.files:,}" + ("" if result.pca else " (no pca.safetensors: absent, or fitted after these shards)")),
                        ("bytes", f"{result.bytes / 1e6:,.1f} MB"), ("time", f"{result.seconds:.1f} s"),
                        ("MB/s", f"{result.bytes / 1e6 / max(result.seconds, 1e-9):,.1f}")]:
        table.add_row(name, value)
    console.print(table)
    console.print(f"next: redi verify {escape(str(result.dest))}   then   redi train --shards {escape(str(result.dest))} --format wds …")


# --- train ---


@app.command("train")
@user_errors
def train_command(
    shards: Annotated[str, typer.Option(help="Data root (or its shards/ directory) made by `redi shards`: a path or a URL (s3://, gs://, https://, file://; see `redi publish`).", show_default=False)],
    run: Annotated[Path, typer.Option(help="Run directory; an existing one is resumed from its newest checkpoint.")],
    model: Annotated[str, typer.Option(help="SiT-{S,B,L,XL}/2, DiT-{S,B,L,XL}/2, or SiT-debug / DiT-debug.")] = "SiT-B/2",
    method: Annotated[str, typer.Option(help="baseline | redi | repa | reg | redi+repa.")] = "redi",
    pca_rank: Annotated[int, typer.Option(help="Principal components generated with the latent (redi); ≤ K in the shards.")] = 8,
    fusion: Annotated[str, typer.Option(help="merged (one token per patch) or separate (2x tokens).")] = "merged",
    lambda_z: Annotated[float, typer.Option(help="Weight of the PC velocity loss.")] = 1.0,
    rep_drop: Annotated[float, typer.Option(help="Representation drop probability (needed for RG sampling; 0 disables).")] = 0.2,
    rep_drop_mode: Annotated[str, typer.Option(help="sample (paper) or batch (reference code).")] = "sample",
    rep_drop_target: Annotated[str, typer.Option(help="noisy: zero z_t (paper) or clean: zero z_0 (reference code).")] = "noisy",
    repa_depth: Annotated[int | None, typer.Option(help="Block feeding the REPA projector (default: 4 for S/B, 8 for L/XL).")] = None,
    repa_weight: Annotated[float, typer.Option(help="REPA alignment loss weight.")] = 0.5,
    cls_weight: Annotated[float, typer.Option(help="REG class-token loss weight.")] = 0.03,
    weighting: Annotated[str, typer.Option(help="SiT time draw: uniform, or lognormal (REPA/REG --weighting: t = s/(1+s), ln s ~ N(0,1)).")] = "uniform",
    learn_sigma: Annotated[bool | None, typer.Option("--learn-sigma/--no-learn-sigma", help="DiT: learned variance with the VLB term (default: on for DiT, as DiT and the ReDi paper).", show_default=False)] = None,
    unconditional: Annotated[bool, typer.Option(help="Train without class labels.")] = False,
    batch_size: Annotated[int, typer.Option(help="Global batch over all ranks and accumulation steps.")] = 256,
    micro_batch: Annotated[int | None, typer.Option(help="Per-rank batch per forward (default: batch / ranks).")] = None,
    max_steps: Annotated[int, typer.Option("--max-steps", "--steps", help="Optimiser steps.")] = 400_000,
    epochs: Annotated[float | None, typer.Option(help="Train for this many epochs instead of --max-steps.")] = None,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-4,
    grad_clip: Annotated[float, typer.Option(help="Gradient-norm clip (REPA/REG; the ReDi/SiT/DiT references do not clip); 0 turns it off.")] = 1.0,
    ema_decay: Annotated[float, typer.Option(help="EMA decay.")] = 0.9999,
    precision: Annotated[str, typer.Option(help="bf16 (autocast on GPU) or fp32.")] = "bf16",
    compile: Annotated[bool, typer.Option(help="torch.compile the model.")] = False,
    seed: Annotated[int, typer.Option(min=0, max=2**40, help="Seed of weights, data order and noise.")] = 0,
    data_format: Annotated[str, typer.Option("--format", help="zarr (random access: a local disk) or wds (whole tars: a network file system or a URL).")] = "zarr",
    num_workers: Annotated[int | None, typer.Option(help="DataLoader workers per rank; default: one per core (of the rank's share of the node), at most 4.", show_default=False)] = None,
    read_ahead: Annotated[int, typer.Option(help="wds: tars downloading ahead of the one being decoded, per worker (each held whole in memory).")] = 2,
    log_every: Annotated[int, typer.Option(help="Steps between metrics lines.")] = 100,
    save_every: Annotated[int, typer.Option(help="Steps between resume checkpoints.")] = 1_000,
    ckpt_every: Annotated[int, typer.Option(help="Steps between checkpoints kept for ever.")] = 10_000,
    keep: Annotated[int, typer.Option(help="Resume checkpoints kept.")] = 2,
    device: Annotated[str | None, typer.Option(help="cuda or cpu (default: cuda if available).")] = None,
    init: Annotated[Path | None, typer.Option(help="Start a new run from these weights (a redi checkpoint or `redi convert` output).")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the resolved config and parameter count, then exit.")] = False,
) -> None:
    """Train SiT/DiT with baseline, ReDi, REPA, REG or ReDi+REPA on prepared shards (resumes an existing run)."""
    from trainer.config import TrainConfig
    from trainer.plan import describe
    from trainer.train import train

    cfg = TrainConfig(
        shards=str(shards), run=str(run), model=model, method=method, pca_rank=pca_rank, fusion=fusion,
        lambda_z=lambda_z, rep_drop=rep_drop, rep_drop_mode=rep_drop_mode, rep_drop_target=rep_drop_target,
        repa_depth=repa_depth, repa_weight=repa_weight, cls_weight=cls_weight, weighting=weighting, learn_sigma=learn_sigma,
        unconditional=unconditional, batch_size=batch_size, micro_batch=micro_batch, max_steps=max_steps,
        epochs=epochs, lr=lr, grad_clip=grad_clip, ema_decay=ema_decay, precision=precision, compile=compile,
        seed=seed, data_format=data_format, num_workers=num_workers, read_ahead=read_ahead, log_every=log_every, save_every=save_every,
        ckpt_every=ckpt_every, keep=keep, init=None if init is None else str(init),
    )
    if dry_run:
        summary = describe(cfg)
        print(json.dumps(summary, indent=2))
        console.print(f"{cfg.model} {cfg.method}: {summary['parameters'] / 1e6:.1f}M parameters, "
                      f"{summary['train_gflops_per_image']:.1f} GFLOP per training image")
        return
    result = train(cfg, device=device)
    if os.environ.get("RANK", "0") != "0":
        raise typer.Exit(128 + result.stopped_by if result.stopped_by else 0)
    if result.stopped_by:
        import signal

        console.print(f"[yellow]Stopped by {signal.Signals(result.stopped_by).name} after step {result.step:,}, with a checkpoint: "
                      f"rerun the same command to resume.[/]")
        raise typer.Exit(128 + result.stopped_by)  # what the shell reports for a process ended by that signal
    if result.steps_run == 0:
        console.print(f"{escape(str(result.run))} is already at step {result.step} (--max-steps {cfg.max_steps}): nothing to do.")
        return
    from rich.table import Table

    table = Table(title=f"redi train → {escape(str(result.run))}", show_header=False)
    for key, value in (("steps", f"{result.steps_run:,} run now, at step {result.step:,}"),
                       ("skipped (non-finite)", f"{result.skipped_steps}"), ("last loss", f"{result.last_loss:.4f}"),
                       ("time", f"{result.seconds:,.1f} s"), ("images/s", f"{result.images_per_s:,.1f}"),
                       ("checkpoints", str(result.run / "checkpoints")), ("metrics", str(result.run / "metrics.jsonl"))):
        table.add_row(key, escape(value))
    console.print(table)


# --- sample ---

@app.command("sample")
@user_errors
def sample_command(
    run: Annotated[Path | None, typer.Option("--run", help="Run directory: sample its newest checkpoint.", show_default=False)] = None,
    ckpt: Annotated[Path | None, typer.Option("--ckpt", help="Checkpoint file written by redi train (instead of --run).", show_default=False)] = None,
    guidance: Annotated[str, typer.Option("--guidance", help="none, cfg (classifier-free), rg (Representation Guidance) or cfg+rg.")] = "none",
    cfg_scale: Annotated[float | None, typer.Option("--cfg-scale", help="CFG weight w, with cfg or cfg+rg (default 2.4, ReDi's best table); 1 = no effect.", show_default=False)] = None,
    rg_scale: Annotated[float | None, typer.Option("--rg-scale", help="RG weight w_r, with rg or cfg+rg (default 1.5; ReDi: 1.5 for B, 1.1 for XL).", show_default=False)] = None,
    cfg_channels: Annotated[str, typer.Option("--cfg-channels", help="CFG on the VAE channels only (ReDi) or on all channels.")] = "vae",
    cls_cfg_scale: Annotated[float | None, typer.Option("--cls-cfg-scale", help="REG models: CFG weight of the class token wherever CFG is on (default 1.5, REG's generate.py; 0 or 1: unguided).", show_default=False)] = None,
    interval: Annotated[str | None, typer.Option("--interval", help="LO,HI: guide only at noise levels t in [LO, HI] (t = 1 is noise), e.g. 0,0.7; default: every step.", show_default=False)] = None,
    sampler: Annotated[str | None, typer.Option("--sampler", help="sde, ode or heun (SiT), ddpm (DiT); default: sde for SiT, ddpm for DiT.", show_default=False)] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Sampler steps (default 250; none with an adaptive --solver).", show_default=False)] = None,
    solver: Annotated[str | None, typer.Option("--solver", help="With --sampler ode: torchdiffeq's odeint with this method: adaptive dopri5 (SiT/ReDi's ODE), dopri8, bosh3, fehlberg2, adaptive_heun, or --steps fixed steps of euler, midpoint, heun2, heun3, rk4, explicit_adams, implicit_adams; default: redi's own fixed-step Euler.", show_default=False)] = None,
    atol: Annotated[float | None, typer.Option("--atol", help="Adaptive --solver (and implicit_adams): absolute tolerance (default 1e-6, SiT/ReDi).", show_default=False)] = None,
    rtol: Annotated[float | None, typer.Option("--rtol", help="Adaptive --solver (and implicit_adams): relative tolerance (default 1e-3, SiT/ReDi).", show_default=False)] = None,
    last_step: Annotated[str | None, typer.Option("--last-step", help="With --sampler sde: the step from t = --last-step-size to 0: mean (default; SiT/ReDi/REPA), tweedie, euler, or none (Euler-Maruyama down to 0).", show_default=False)] = None,
    last_step_size: Annotated[float | None, typer.Option("--last-step-size", help="With --sampler sde: the noise level where the last step starts (default 0.04, SiT/ReDi/REPA).", show_default=False)] = None,
    num: Annotated[int, typer.Option("--num", help="Images to generate (indices 0…N−1); 50,000 for FID.")] = 50_000,
    seed: Annotated[int, typer.Option("--seed", min=0, max=2**40, help="Image i is a function of (seed, i) only.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass and process.")] = 64,
    class_labels: Annotated[str, typer.Option("--class-labels", help="'random' (drawn per image from seed and index) or a comma list cycled over the images.")] = "random",
    out: Annotated[Path | None, typer.Option("--out", help="Output directory; default: RUN/samples/NAME (or samples/NAME next to --ckpt), NAME from step, sampler, steps, guidance, scales, seed.", show_default=False)] = None,
    vae: Annotated[str | None, typer.Option("--vae", help="Decode with this VAE (hub id, directory, tiny-random) instead of the one the checkpoint records.", show_default=False)] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N (torchrun ranks use their local GPU).")] = "auto",
    precision: Annotated[str | None, typer.Option("--precision", help="Network autocast: bf16 or fp32; default: bf16 on cuda, fp32 on cpu.", show_default=False)] = None,
    quantize: Annotated[str, typer.Option("--quantize", help="Pixels to uint8: nearest (DiT/SiT/ReDi scripts) or floor (REPA/REG generate.py, for their FID protocol).")] = "nearest",
    weights: Annotated[str, typer.Option("--weights", help="Checkpoint weights: ema or model (raw).")] = "ema",
    force: Annotated[bool, typer.Option("--force/--no-force", help="Replace samples made with other settings in --out instead of refusing.")] = False,
) -> None:
    """Sample a checkpoint: per-image PNGs, a grid, the generated PCs, an ADM .npz and sample.json (resumable, torchrun-ready)."""
    from sampler.sample import SampleConfig, parse_class_labels, parse_interval, run_sample

    cfg = SampleConfig(
        run=run, ckpt=ckpt, guidance=guidance, cfg_scale=cfg_scale, rg_scale=rg_scale, cfg_channels=cfg_channels,
        cls_cfg_scale=cls_cfg_scale, interval=parse_interval(interval), sampler=sampler, steps=steps, solver=solver,
        atol=atol, rtol=rtol, last_step=last_step, last_step_size=last_step_size, num=num, seed=seed, batch_size=batch_size,
        class_labels=parse_class_labels(class_labels), out=out, vae=vae, device=device, precision=precision,
        quantize=quantize, weights=weights, force=force,
    )
    result = run_sample(cfg)
    if result.rank != 0:
        return
    console.print(result.table())
    if result.work.nonfinite:
        from sampler.outputs import ERRORS_JSONL

        console.print(f"[bold red]error:[/] {len(result.work.nonfinite):,} of {result.num:,} samples are not finite (NaN or inf) "
                      f"and were not written (listed in {escape(str(result.out / ERRORS_JSONL))}): lower --cfg-scale or "
                      "--rg-scale, or check the checkpoint.")
        raise typer.Exit(2)
    if result.missing:
        console.print(f"[yellow]{result.missing:,} images are still missing (other ranks): rerun to finish and assemble {escape(str(result.out))}.[/]")

# --- eval ---

@app.command("eval")
@user_errors
def eval_command(
    samples: Annotated[Path, typer.Argument(help="ADM-format .npz of samples (arr_0 uint8 N×H×W×3), e.g. from redi sample.")],
    ref: Annotated[Path, typer.Option("--ref", help="ADM reference batch .npz, e.g. VIRTUAL_imagenet256_labeled.npz; its mu/sigma/mu_s/sigma_s are used when present.")],
    inception: Annotated[Path | None, typer.Option("--inception", envvar="REDI_INCEPTION", help="Local pytorch-fid FID weights pt_inception-2015-12-05-6726825d.pth (never downloaded).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per Inception forward pass; changes speed, not results.")] = 64,
    device: Annotated[str, typer.Option("--device", help="Where the network runs: auto, cpu, cuda or cuda:N.")] = "auto",
    out: Annotated[Path | None, typer.Option("--out", help="JSON report path (default: SAMPLES.eval.json next to the samples).")] = None,
) -> None:
    """FID, sFID, Inception Score, precision and recall against an ADM reference batch, as ADM's evaluator computes them."""
    from rich.table import Table

    from sampler.evaluate import EvalConfig, evaluate

    cfg = EvalConfig(samples=samples, ref=ref, inception=inception, batch_size=batch_size, device=device, out=out)
    result = evaluate(cfg)
    table = Table(title=f"{result.num_samples:,} samples vs {result.num_ref:,} reference images")
    table.add_column("metric")
    table.add_column("value", justify="right")
    names = {"inception_score": "Inception Score", "fid": "FID", "sfid": "sFID", "precision": "Precision", "recall": "Recall"}
    for key, name in names.items():
        table.add_row(name, f"{result.metrics[key]:.4f}")
    console.print(table)
    if not result.inception_official:
        console.print("[yellow]warning:[/] the Inception weights are not pt_inception-2015-12-05-6726825d.pth: these numbers are not comparable with published ones.")
    stats = "precomputed reference statistics" if result.precomputed_ref_stats else "reference statistics from its images"
    console.print(
        f"[green]wrote[/] {escape(str(result.out))} in {result.seconds:.1f} s "
        f"({result.images_per_s:,.1f} img/s on {result.device}, {stats})"
    )

# --- convert ---

@app.command("convert")
@user_errors
def convert_command(
    checkpoint: Annotated[Path, typer.Argument(help="Public checkpoint: a DiT/SiT EMA release or a REPA/REG/ReDi training checkpoint.", show_default=False)],
    origin: Annotated[str, typer.Option("--from", help="The code that wrote it: redi (zelaki/ReDi), repa, reg, sit (willisma/SiT) or dit.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="The redi checkpoint to write (then: redi sample --ckpt OUT).", show_default=False)],
    rep_drop: Annotated[float | None, typer.Option("--rep-drop", help="ReDi only: representation-drop probability it was trained with, needed for RG (default: its args, else 0).", show_default=False)] = None,
    repa_depth: Annotated[int | None, typer.Option("--repa-depth", help="Block feeding the REPA projector (default: its args, else 4 for S/B, 8 for L/XL).", show_default=False)] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle/--no-trust-pickle", help="Allow unpickling (training checkpoints store argparse args); unpickling can run code.")] = False,
    force: Annotated[bool, typer.Option("--force/--no-force", help="Replace an existing --out file.")] = False,
) -> None:
    """Convert a public DiT/SiT/REPA/REG/ReDi checkpoint to a redi checkpoint that samples identically."""
    from rich.table import Table

    from trainer.convert import ConvertConfig, convert_checkpoint

    result = convert_checkpoint(ConvertConfig(checkpoint, origin, out, rep_drop, repa_depth, trust_pickle, force))
    m, train = result.model_config, result.train_config
    table = Table(title=f"convert → {escape(str(result.out))}")
    table.add_column("")
    table.add_column("value")
    for name, value in [("origin", f"{result.origin.repository}, '{result.weights}' weights, step {result.step:,}"),
                        ("network", f"{train['model']} {train['method']}, {result.num_params / 1e6:.1f}M parameters"),
                        ("input", f"{m.in_channels}×{m.input_size}×{m.input_size} ({m.pca_rank} PC channels), "
                                  f"{m.num_classes} classes"),
                        ("origin time", result.origin.time_convention),
                        ("source sha256", result.source_sha256[:16] + "…"), ("time", f"{result.seconds:.1f} s"),
                        *(("note", note) for note in result.notes)]:
        table.add_row(name, escape(value))
    console.print(table)


@app.command("import-repa")
@user_errors
def import_repa_command(
    root: Annotated[Path, typer.Argument(help="REPA data directory with images/ and vae-sd/ (folders or .zip) from its preprocessing/dataset_tools.py.", show_default=False)],
    data: DataOpt = Path("data"),
    images: Annotated[Path | None, typer.Option("--images", help="The image source that was encoded (default: ROOT/images, else ROOT/images.zip).", show_default=False)] = None,
    latents: Annotated[Path | None, typer.Option("--latents", help="REPA's encoded latents (default: ROOT/vae-sd, else ROOT/vae-sd.zip).", show_default=False)] = None,
    vae: Annotated[str, typer.Option("--vae", help="VAE recorded for the latents and used to decode samples (REPA's default sd-vae-ft-mse has the same encoder).")] = "stabilityai/sd-vae-ft-ema",
    resolution: ResolutionOpt = 256,
    chunk_size: ChunkSizeOpt = 256,
    dtype: DtypeOpt = "float16",
    workers: Annotated[int, typer.Option("--workers", help="Threads reading the .npy files.")] = 8,
    force: ForceOpt = False,
) -> None:
    """Stage encode from REPA's latents: copy vae-sd/*.npy into DATA/latents without running the VAE."""
    from pipeline.repa_import import RepaImportConfig, import_repa

    result = import_repa(RepaImportConfig(root, data, images, latents, vae, resolution, chunk_size, dtype, workers, force))
    _print_stage_result(result)
    console.print(f"next: redi features {escape(str(images or root / 'images'))} --data {escape(str(data))}  "
                  "(same image index, so shards joins them)")

# --- bench ---


def _figure(value: object) -> str:
    """A benchmark figure for a table: thousands separators for rates, 3 significant digits for ratios."""
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)

BENCH_TARGETS = ("encode", "pca", "loader", "train", "sample", "eval")


@app.command("bench")
@user_errors
def bench_command(
    target: Annotated[str, typer.Argument(help=f"One of {', '.join(BENCH_TARGETS)}, or all; or gpu: the GPU suite (docs/BENCHMARKS.md).")] = "all",
    quick: Annotated[bool, typer.Option(help="Seconds-long smoke version of each benchmark.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    samples: Annotated[int | None, typer.Option(help="loader: synthetic dataset size (default 8192); with --shards, samples to read (default one epoch).")] = None,
    shards: Annotated[str | None, typer.Option(help="loader: read these shards (a data root, local or a URL) instead of synthetic ones.")] = None,
    out: Annotated[Path | None, typer.Option(help="gpu: folder of the JSON files (default $OUT, else runs/bench-gpu).")] = None,
    only: Annotated[str | None, typer.Option(help="gpu: the items to run, e.g. ab (default abcd).")] = None,
    budget: Annotated[float | None, typer.Option(help="gpu: seconds after which no further step starts.")] = None,
) -> None:
    """Measure throughput of the pipeline, trainer and sampler on this machine (figures for docs/BENCHMARKS.md)."""
    import importlib

    from rich.table import Table

    targets = BENCH_TARGETS if target == "all" else (target,)
    if any(t not in (*BENCH_TARGETS, "gpu") for t in targets):
        raise UserError(f"Unknown benchmark '{target}': choose one of {', '.join(BENCH_TARGETS)}, all or gpu.")
    given = {"loader": {"samples": samples, "shards": shards}, "gpu": {"out": out, "only": only, "budget": budget}}
    options = {t: {k: v for k, v in kw.items() if v is not None} for t, kw in given.items()}
    if stray := [f"--{k}" for t, kw in options.items() if t not in targets for k in kw]:
        raise UserError(f"Not an option of `redi bench {target}`: {', '.join(stray)} (see `redi bench --help`).")
    results = {t: importlib.import_module(f"benchmarks.{t}").run(quick=quick, **options.get(t, {})) for t in targets}
    if as_json:
        print(json.dumps(results, indent=2, default=str))
        return
    console = Console()
    for name, figures in results.items():
        table = Table(title=f"redi bench {name}", show_header=False)
        for key, value in figures.items():
            table.add_row(key, _figure(value))
        console.print(table)


if __name__ == "__main__":
    app()
