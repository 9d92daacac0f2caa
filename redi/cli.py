"""`redi`: one thin command per stage. Parses flags, builds a config, calls one function.

Results (summary tables, JSON) go to stdout; logs, progress bars, warnings and errors to stderr, so `redi info DATA > f`
and `redi verify DATA --json | jq` work. The flags of a command that runs a stage are its config's fields
(common/flags.py): the dataclass docstrings are the --help.
"""
from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from redi.common.display import configure_logging
from redi.common.errors import UserError, disk_full
from redi.common.flags import Command, ConfigGroup, Flag, FromConfig, OneOf, config_command, given_flags, ranged, with_range
from redi.common.schema import Range
from redi.common.urls import local_path

if TYPE_CHECKING:  # the commands' config classes; their modules import torch, so they load when a command runs
    from redi.pipeline.demo_vae import DemoVaeConfig
    from redi.pipeline.encode import EncodeConfig
    from redi.pipeline.pca import PCAConfig
    from redi.pipeline.repa_import import RepaImportConfig
    from redi.pipeline.shards_config import ShardsConfig
    from redi.pipeline.timm_vit import EncoderConvertConfig
    from redi.sampler.evaluate import EvalConfig, EvalResult
    from redi.sampler.preview import PreviewConfig
    from redi.sampler.config import SampleConfig
    from redi.trainer.config import TrainConfig
    from redi.trainer.convert import ConvertConfig
    from redi.trainer.posthoc import EmaConfig

app = typer.Typer(
    name="redi",
    help="Representation-aware latent diffusion (ReDi, REPA, REG): encode → features → pca → shards → train → sample → eval.",
    cls=ConfigGroup,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
out = Console(soft_wrap=True)  # results: tables (wrapped to the width) and lines, never wrapped (paths stay whole)
err = Console(stderr=True, soft_wrap=True)  # errors and warnings: never wrapped (a path stays whole and copyable)
F = TypeVar("F", bound=Callable[..., Any])
DATA_PANEL, MODEL_PANEL, CHECK_PANEL = "Prepare data", "Train and sample", "Inspect and measure"  # of `redi --help`


def _version(shown: bool) -> None:
    if shown:
        print(f"redi {importlib.metadata.version('redi')}")
        raise typer.Exit()


@app.callback()
def _display(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version of redi and exit.")] = False,
) -> None:
    configure_logging()  # before any command: the library's log lines and warnings go through one rich handler


# What to lower when a command runs out of GPU memory.
MEMORY_HINTS = {
    "encode_command": "a smaller --batch-size", "features_command": "a smaller --batch-size",
    "pca_command": "a smaller --batch-size", "sample_command": "a smaller --batch-size",
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
            err.print(f"[bold red]error:[/] {escape(str(e))}")  # paths may hold [brackets]
            sys.exit(2)
        except json.JSONDecodeError as e:  # the long tail: a damaged JSON file the command reads
            err.print(f"[bold red]error:[/] a JSON file this command reads is damaged ({escape(str(e))}); "
                      "`redi verify DATA` or `redi info` names the stage to redo.")
            sys.exit(2)
        except Exception as e:
            if (full := disk_full(e)) is not None:  # a write outside the atomic helper (zarr chunks, metrics lines)
                err.print(f"[bold red]error:[/] {escape(str(full))}")
                sys.exit(2)
            if type(e).__name__ != "OutOfMemoryError":  # torch.OutOfMemoryError, without importing torch here
                raise
            detail = str(e).split(".")[0].strip()
            err.print(f"[bold red]error:[/] The GPU ran out of memory ({detail}): rerun with {MEMORY_HINTS.get(fn.__name__, 'a smaller batch')}.")
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


# The end of each command's --help: real command lines (tests/test_vocabulary.py parses every one). The demo's paths
# are `make demo`'s; the others those of README.md's ImageNet recipe.
EXAMPLES = {
    "demo-data": ("redi demo-data --out data/demo/images --num 64",),
    "demo-vae": ("redi demo-vae data/demo/images --out data/demo/vae",),
    "encode": ("redi encode data/demo/images --data data/demo --vae tiny-random",
               "redi encode /datasets/imagenet/train --data /scratch/redi --with-features"),
    "features": ("redi features data/demo/images --data data/demo --encoder tiny-random",
                 "redi features /datasets/imagenet/train --data /scratch/dinov2-b \\",
                 "    --encoder facebook/dinov2-base"),
    "pca": ("redi pca --data data/demo",
            "redi pca --data /scratch/redi --import dino_pca_model.pth --trust-pickle"),
    "shards": ("redi shards --data data/demo --pcs 16 --format both --patch-tokens",
               "redi shards --data /scratch/redi --format wds --latent-norm channel"),
    "publish": ("redi publish /scratch/redi s3://my-bucket/imagenet256",),
    "convert-encoder": ("redi convert-encoder dinov1_vitb.pth --from dinov1 --out /models/dino-vit-b16",
                        "redi convert-encoder mocov3_vitl.pth --from mocov3 --out /models/mocov3-vit-l"),
    "import-repa": ("redi import-repa /datasets/repa-imagenet256 --data /scratch/redi",),
    "train": ("redi train --shards data/demo --run runs/a --model SiT-debug --max-steps 300",
              "torchrun --nproc-per-node 8 -m redi train --shards /scratch/redi \\",
              "    --run runs/sit-xl-redi --model SiT-XL/2 --method redi --compile"),
    "sample": ("redi sample --run runs/sit-xl-redi --guidance cfg+rg --num 50000",
               "redi sample --ckpt redi-xl.pt --guidance rg --labels 207,360 --num 8",
               "redi sample --run runs/a --weights init --num 64 --out runs/a/untrained"),
    "ema": ("redi ema runs/sit-b-redi --sigma-rel 0.05,0.075,0.1,0.125,0.15",
            "redi ema runs/sit-b-redi --sigma-rel 0.1 --step 200000"),
    "preview": ("redi preview data/demo",
                "redi preview data/demo --samples data/demo/samples"),
    "eval": ("redi eval samples/a/samples.npz --ref VIRTUAL_imagenet256_labeled.npz",
             "redi eval samples/a/samples.npz --ref VIRTUAL_imagenet256_labeled.npz \\",
             "    --metrics fid,fd_dinov2 --fd-encoder /models/dinov2-large",
             "redi eval data/demo/samples --ref data/demo \\",
             "    --before data/demo/samples-untrained"),
    "convert": ("redi convert SiT-XL-2-256x256.pt --from sit --out sit-xl.pt",
                "redi convert SiT-ReDi-XL-2-3M.pt --from redi --out redi-xl.pt --trust-pickle"),
    "info": ("redi info data/demo", "redi info runs/a --json"),
    "verify": ("redi verify data/demo", "redi verify s3://my-bucket/imagenet256 --no-deep"),
    "bench": ("redi bench loader --shards data/demo --quick", "redi bench all --json",
              "redi bench learn --shards data/demo --seeds 3"),
}


def examples(name: str) -> str:
    """The epilog of `redi NAME --help`: its examples, one line each (a longer one continued with a backslash), each
    short enough for 80 columns; rich markup, so no example holds a [."""
    return "Examples:\n" + "\n".join(EXAMPLES[name])


def stage_command(name: str, spec: FromConfig, panel: str) -> Callable[[F], F]:
    """A command whose flags are `spec`'s config fields (then its own parameters), its errors one sentence."""
    return config_command(app, name, spec, guard=user_errors, rich_help_panel=panel, epilog=examples(name))


def print_summary(table: Any, paths: Sequence[tuple[str, Any]] = ()) -> None:
    """A result table, then each path on a line of its own: in a table cell a long path is cut ("…") or folded
    mid-word at 80 columns; a line is never wrapped, so the path stays whole to copy (the terminal folds it)."""
    out.print(table, soft_wrap=False)
    for name, path in paths:
        out.print(f"{name}: {escape(str(path))}")


def print_json(value: Any) -> None:
    """A result as JSON on stdout, for scripts (`--json`)."""
    print(json.dumps(value, indent=2, default=str))


# --- demo-data, encode, features ---

AT_LEAST_0, AT_LEAST_1 = Range(0), Range(1)  # the ranges of the numeric options that are no config's fields
SOURCE = Flag(argument=True, type=str)
# A data root on a local disk: a URL is one sentence, never a folder. Its Path flags have path_type=str (the text as
# typed: a Path would fold a URL's "//" into "/"), which local_root makes a Path.
LOCAL_ROOT = "redi.pipeline.remote:local_root"
DATA = Flag(default=Path("data"), parse=LOCAL_ROOT)
VAE_DEFAULT, ENCODER_DEFAULT = "stabilityai/sd-vae-ft-ema", "facebook/dinov2-with-registers-base"
VAE_HELP = ("VAE: hub id or local directory of a diffusers AutoencoderKL (SD-VAE, SDXL, SD3, FLUX.1) or AutoencoderDC "
            "(DC-AE), or tiny-random[:sd|flux|dc] (tests and demos only).")
ENCODER_HELP = ("Representation encoder: hub id or local directory of a DINOv2, DINOv3, SigLIP, SigLIP2, CLIP, MAE, "
                "I-JEPA or ViT model (MoCo v3, DINOv1: redi convert-encoder; docs/ENCODERS.md), or tiny-random[:FAMILY] "
                "(tests and demos only).")
ENCODE = FromConfig("redi.pipeline.encode:EncodeConfig", panels={},
                    flags={"source": SOURCE, "data": DATA, "model": Flag(("--vae",), VAE_HELP, VAE_DEFAULT),
                           "revision": Flag(("--vae-revision", "--revision"), "Hub revision (branch, tag or commit) of "
                                            "--vae; recorded in the manifest.")})
FEATURES = FromConfig("redi.pipeline.encode:EncodeConfig", panels={},
                      flags={"source": SOURCE, "data": DATA, "model": Flag(("--encoder",), ENCODER_HELP, ENCODER_DEFAULT),
                             "revision": Flag(("--encoder-revision", "--revision"), "Hub revision (branch, tag or "
                                              "commit) of --encoder; recorded in the manifest.")})


def _print_stage_result(result: Any) -> None:
    """Summary table of an encode/features run, with the nothing-to-do and skipped-images notes."""
    from redi.pipeline.stage import StageState

    if result.rank != 0:
        return
    if result.state is StageState.COMPLETE:
        out.print(f"[green]{escape(str(result.out))} is complete with these settings: nothing to do.[/]")
    print_summary(result.table(), [("output", result.out)])
    if result.skipped:
        err.print(f"[yellow]warning:[/] {result.skipped} images could not be read and were skipped "
                  f"(listed in {escape(str(result.out / 'errors.jsonl'))}).")


@app.command("demo-data", cls=Command, rich_help_panel=DATA_PANEL, epilog=examples("demo-data"))
@user_errors
def demo_data_command(
    out_dir: Annotated[Path, typer.Option("--out", path_type=str, help="Folder to write the images into (ImageFolder layout).")] = Path("data/demo-images"),
    num: Annotated[int, typer.Option("--num", help=with_range("Number of images (5 classes, cycled).", AT_LEAST_1),
                                     **ranged(AT_LEAST_1, int))] = 64,
    seed: Annotated[int, typer.Option("--seed", help=with_range("Seed of the generated images.", AT_LEAST_0),
                                      **ranged(AT_LEAST_0, int))] = 0,
) -> None:
    """Write the embedded demo image set: coloured shapes on textured backgrounds, generated in code."""
    from redi.pipeline.demo_data import write_demo_images

    result = write_demo_images(local_path(out_dir, "--out"), num, seed)
    out.print(f"[green]Wrote {result.count} demo images in {len(result.classes)} classes ({', '.join(result.classes)}) "
              f"to {escape(str(result.out))}.[/]")


DEMO_VAE = FromConfig("redi.pipeline.demo_vae:DemoVaeConfig", panels={},
                      flags={"images": Flag(argument=True), "out": Flag(("--out",))})


@stage_command("demo-vae", DEMO_VAE, DATA_PANEL)
def demo_vae_command(cfg: DemoVaeConfig) -> None:
    """Fit a small AutoencoderKL (the tiny-random architecture) to an image folder, so the demo's decoded latents and
    samples show its images (the tiny-random VAE decodes every latent to texture); `redi encode --vae DIR` loads
    it. Cached: the same images and settings again do nothing."""
    from redi.pipeline.demo_vae import fit_demo_vae

    result = fit_demo_vae(cfg)
    rec = result.record
    if not result.fitted:
        out.print(f"[green]{escape(str(result.out))} holds this fit already: nothing to do.[/]")
    out.print(f"VAE fitted to {rec['num_images']} images: {rec['settings']['max_steps']:,} steps, loss {rec['first_loss']:.4f} "
              f"→ {rec['last_loss']:.4f}, reconstruction PSNR {rec['psnr_db']:.1f} dB, latent std {rec['latent_std']:.3f} "
              f"(scaling_factor {1 / rec['latent_std']:.4f}), {rec['seconds']:.0f} s.")
    out.print(f"output: {escape(str(result.out))}")


@stage_command("encode", ENCODE, DATA_PANEL)
def encode_command(
    cfg: EncodeConfig,
    with_features: Annotated[bool, typer.Option("--with-features", help="Also run the features stage in the same pass, decoding each image once (what `make encode` does).")] = False,
    encoder: Annotated[str, typer.Option("--encoder", help=f"With --with-features: {ENCODER_HELP}")] = ENCODER_DEFAULT,
    encoder_revision: Annotated[str, typer.Option("--encoder-revision", help="With --with-features: hub revision of --encoder.")] = "main",
) -> None:
    """Stage encode: VAE posterior moments (mean, std) of every centre-cropped image → DATA/latents (with
    --with-features, also the features stage → DATA/features, from the same decoded images)."""
    import dataclasses

    from redi.pipeline.encode import ENCODE as ENCODE_STAGE, FEATURES as FEATURES_STAGE, run_stages

    features = dataclasses.replace(cfg, model=encoder, revision=encoder_revision)
    for result in run_stages([(ENCODE_STAGE, cfg), *([(FEATURES_STAGE, features)] if with_features else [])]):
        _print_stage_result(result)


@stage_command("features", FEATURES, DATA_PANEL)
def features_command(cfg: EncodeConfig) -> None:
    """Stage features: the encoder's patch tokens (and its CLS or pooled global token) of every centre-cropped image → DATA/features,
    on the diffusion model's token grid (the latent side of DATA/latents, or of the default VAE, over the patch size)."""
    from redi.pipeline.encode import run_features

    _print_stage_result(run_features(cfg))


# --- pca ---

PCA = FromConfig("redi.pipeline.pca:PCAConfig", panels={}, flags={"batch_images": Flag(("--batch-size", "--batch-images"))})


@stage_command("pca", PCA, DATA_PANEL)
def pca_command(
    cfg: PCAConfig,
    data: Annotated[Path, typer.Option("--data", path_type=str, help="Data root: reads DATA/features, writes DATA/pca.safetensors.")] = Path("data"),
    import_file: Annotated[Path | None, typer.Option("--import", help="Convert a reference ReDi dino_pca_model.pth instead of fitting.", show_default=False)] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle/--no-trust-pickle", help="Allow unpickling the --import file (it can run code).")] = False,
) -> None:
    """Fit the standardised PCA of the encoder's patch tokens (docs/METHOD.md), or import the reference one."""
    from rich.table import Table

    from redi.pipeline.pca import ImportConfig, explained_variance_rows, import_pca, run_pca
    from redi.pipeline.remote import local_root

    if import_file is not None:
        result = import_pca(local_root(data), ImportConfig(file=import_file, trust_pickle=trust_pickle, force=cfg.force))
    else:
        result = run_pca(local_root(data), cfg)
    m = result.model
    rows = explained_variance_rows(m)
    table = Table(title=f"Explained variance, first {len(rows)} of {len(m.explained_variance)} components")
    for name in ("PC", "variance", "ratio", "cumulative"):
        table.add_column(name, justify="right")
    for index, variance, ratio, cumulative in rows:
        table.add_row(str(index), f"{variance:.4g}", f"{ratio:.2%}", f"{cumulative:.2%}")
    out.print(table, soft_wrap=False)
    source = m.source if len(m.source) <= 28 else m.source[:28] + "…"
    what = f"{m.n_images:,} images, {m.n_tokens:,} tokens of {m.dim} dims, source {source}"
    if result.up_to_date:
        out.print(f"nothing to do: {escape(str(result.path))} is up to date ({what}).")
    else:
        rate = f", {m.n_tokens / result.seconds:,.0f} tokens/s" if import_file is None and result.seconds > 0 else ""
        out.print(f"[green]wrote[/] {escape(str(result.path))} ({what}) in {result.seconds:.1f} s{rate}; "
                  f"plot: {escape(str(result.plot))}")

# --- shards, publish ---


def _formats(name: str) -> tuple[str, ...]:
    """--format zarr | wds | both → the stores to write."""
    return ("zarr", "wds") if name == "both" else (name,)


SHARDS = FromConfig("redi.pipeline.shards_config:ShardsConfig", panels={}, flags={
    "formats": Flag(("--format",), default="zarr", type=Annotated[str, OneOf(("zarr", "wds", "both"))], parse=_formats)})


@stage_command("shards", SHARDS, DATA_PANEL)
def shards_command(
    cfg: ShardsConfig,
    data: Annotated[Path, typer.Option("--data", path_type=str, help="Data root: reads latents/, features/ and pca.safetensors, writes DATA/shards.")] = Path("data"),
) -> None:
    """Join latents, features and the PCA into training shards (Zarr and/or WebDataset) described by shards.json."""
    from rich.table import Table

    from redi.pipeline.remote import local_root
    from redi.pipeline.shards_config import finished_shards

    root = local_root(data)
    if (result := finished_shards(root, cfg)) is None:  # else shards/stamp.json agrees: no array read, no torch
        from redi.pipeline.shards import build_shards

        result = build_shards(root, cfg)
    if result.up_to_date:
        out.print(f"[green]{escape(str(result.root))} is complete with these settings: nothing to do.[/]")
    table = Table(title="redi shards")
    table.add_column("")
    table.add_column("value", justify="right")
    rate = f"{result.written_samples / result.seconds:,.0f}" if result.written_samples and result.seconds > 0 else "–"
    for name, value in [("samples", f"{result.num_samples:,}"), ("skipped images", f"{result.num_skipped:,}"),
                        ("shards", f"{result.num_shards:,} × {cfg.shard_size}"), ("formats", ", ".join(result.formats)),
                        ("PCs per sample", str(result.info["pca"]["K"])),
                        ("written now", f"{result.written_samples:,}"), ("time", f"{result.seconds:.1f} s"),
                        ("samples/s", rate)]:
        table.add_row(name, value)
    print_summary(table, [("output", result.root)])
    if result.num_skipped:
        err.print(f"[yellow]warning:[/] {result.num_skipped} images are invalid in latents/ or features/ and were left "
                  f"out (listed under 'skipped' in {escape(str(result.root / 'shards.json'))}).")


@app.command("publish", cls=Command, rich_help_panel=DATA_PANEL, epilog=examples("publish"))
@user_errors
def publish_command(
    data: Annotated[Path, typer.Argument(path_type=str, help="Data root whose finished shards/ (and pca.safetensors) to copy.", show_default=False)],
    dest: Annotated[str, typer.Argument(help="Where: s3://bucket/prefix, gs://…, any fsspec URL or a local path; it gets DEST/shards/ and DEST/pca.safetensors. Credentials come from the environment.", show_default=False)],
) -> None:
    """Copy finished shards to a bucket (each file checked against shards.json, shards.json last), for `redi train --shards DEST`."""
    from rich.table import Table

    from redi.pipeline.publish import publish_shards
    from redi.pipeline.remote import local_root

    result = publish_shards(local_root(data), dest)
    if result.up_to_date:
        out.print(f"[green]{escape(str(result.dest))} already holds these shards: nothing to do.[/]")
        return
    table = Table(title="redi publish", show_header=False)
    for name, value in [("files", f"{result.files:,}" + ("" if result.pca else " (no pca.safetensors: absent, or fitted after these shards)")),
                        ("bytes", f"{result.bytes / 1e6:,.1f} MB"), ("time", f"{result.seconds:.1f} s"),
                        ("MB/s", f"{result.bytes / 1e6 / max(result.seconds, 1e-9):,.1f}")]:
        table.add_row(name, value)
    print_summary(table, [("copied to", result.dest)])
    out.print(f"next: redi verify {escape(str(result.dest))}   then   redi train --shards {escape(str(result.dest))} --format wds …")


# --- train ---

TRAIN = FromConfig(
    "redi.trainer.config:TrainConfig",
    panels={
        "Data": ("shards", "data_format", "num_workers", "read_ahead"),
        "Model": ("model", "method", "pca_rank", "fusion", "repa_depth", "learn_sigma", "unconditional"),
        "Method": ("lambda_z", "rep_drop", "rep_drop_mode", "rep_drop_target", "repa_weight", "align_until",
                   "align_fade", "cls_weight", "class_dropout", "weighting"),
        "Optimisation": ("batch_size", "micro_batch", "max_steps", "epochs", "lr", "beta1", "beta2", "weight_decay",
                         "grad_clip", "ema_decay", "phema", "phema_sigma_rels", "phema_every"),
        "Run": ("run", "init", "seed", "precision", "compile", "log_every", "save_every", "ckpt_every", "keep",
                "max_bad_steps"),
        "Watching": ("tracker", "sample_every", "sample_num", "sample_steps", "sample_guidance", "eval_every",
                     "eval_ref", "inception", "eval_num", "eval_labels"),
    },
    flags={"data_format": Flag(("--format",)), "num_workers": Flag(("--workers", "--num-workers")),
           "max_steps": Flag(("--max-steps", "--steps")),
           "inception": Flag(envvar="REDI_INCEPTION"),
           "phema_sigma_rels": Flag(type=str, default="0.05,0.10", parse="redi.trainer.phema:parse_sigma_rels")},
    skip=("resolution",),  # read from the shards
)


@stage_command("train", TRAIN, MODEL_PANEL)
def train_command(
    cfg: TrainConfig,
    ctx: typer.Context,
    device: Annotated[str, typer.Option(help="Where the run trains: auto (cuda if available, else cpu), cpu, cuda or cuda:N "
                                             "(torchrun ranks: their local GPU).", rich_help_panel="Run")] = "auto",
    dry_run: Annotated[bool, typer.Option(help="Print the resolved config and parameter count, then exit.", rich_help_panel="Run")] = False,
) -> None:
    """Train SiT/DiT with baseline, ReDi, REPA, REG or ReDi+REPA on prepared shards (resumes an existing run)."""
    from redi.trainer.plan import describe
    from redi.trainer.train import train
    from redi.sampler.watch import RunWatch

    local_path(cfg.run, "--run")
    given = given_flags(ctx)  # an existing run keeps its recorded value of every other setting
    if dry_run:
        summary = describe(cfg, given)
        print_json(summary)
        err.print(f"{summary['train']['model']} {summary['train']['method']}: {summary['parameters'] / 1e6:.1f}M parameters, "
                  f"{summary['train_gflops_per_image']:.1f} GFLOP per training image")
        return
    result = train(cfg, device=device, watch=RunWatch, given=given)
    if os.environ.get("RANK", "0") != "0":
        raise typer.Exit(128 + result.stopped_by if result.stopped_by else 0)
    if result.stopped_by:
        import signal

        from redi.trainer.stop import STOP_GRACE_S

        name = signal.Signals(result.stopped_by).name
        stalled = (f" (the data of step {result.step + 1:,} had not come {STOP_GRACE_S:g} s after the signal)"
                   if result.data_stalled else "")
        if result.step == 0:
            err.print(f"[yellow]Stopped by {name} before the first step{stalled}: nothing to save; rerun the same "
                      "command to start.[/]")
        else:
            err.print(f"[yellow]Stopped by {name} after step {result.step:,}{stalled}, with a checkpoint: rerun the "
                      "same command to resume.[/]")
        raise typer.Exit(128 + result.stopped_by)  # what the shell reports for a process ended by that signal
    if result.steps_run == 0:
        out.print(f"{escape(str(result.run))} is already at step {result.step} (--max-steps {result.max_steps}): nothing to do.")
        return
    from rich.table import Table

    table = Table(title="redi train", show_header=False)
    for key, value in (("steps", f"{result.steps_run:,} run now, at step {result.step:,}"),
                       ("skipped (non-finite)", f"{result.skipped_steps}"), ("last loss", f"{result.last_loss:.4f}"),
                       ("time", f"{result.seconds:,.1f} s" + (f" ({result.watch_seconds:,.1f} s of sample grids and "
                                                               "evaluations)" if result.watch_seconds else "")),
                       ("images/s", f"{result.images_per_s:,.1f}")):
        table.add_row(key, escape(value))
    print_summary(table, [("run", result.run), ("checkpoints", result.run / "checkpoints"),
                          ("metrics", result.run / "metrics.jsonl"),
                          *((("sample grids", result.run / "samples"),) if result.watch_seconds else ())])


# --- sample ---

SAMPLE = FromConfig(
    "redi.sampler.config:SampleConfig",
    panels={
        "Checkpoint": ("run", "ckpt", "weights", "vae", "force_vae"),
        "Guidance": ("guidance", "cfg_scale", "rg_scale", "cfg_channels", "cls_cfg_scale", "interval"),
        "AutoGuidance": ("ag_scale", "guide_run", "guide_ckpt", "guide_step", "guide_weights"),
        "Sampler": ("sampler", "steps", "solver", "atol", "rtol", "last_step", "last_step_size"),
        "Output": ("num", "seed", "labels", "out", "quantize", "force"),
        "Run": ("batch_size", "device", "precision"),
    },
    flags={"interval": Flag(type=str | None, parse="redi.sampler.config:parse_interval"),
           "labels": Flag(("--labels", "--class-labels"), type=str, parse="redi.sampler.labels:parse_labels")},
    skip=("rank", "world_size"),  # torchrun's; a Python caller may split the work itself
)


@stage_command("sample", SAMPLE, MODEL_PANEL)
def sample_command(cfg: SampleConfig) -> None:
    """Sample a checkpoint: per-image PNGs, a grid, the generated PCs, an ADM .npz and sample.json (resumable, torchrun-ready)."""
    from redi.sampler.sample import run_sample


    result = run_sample(cfg)
    if result.rank != 0:
        return
    print_summary(result.table(), [("output", result.out)])
    if result.work.nonfinite:
        from redi.sampler.outputs import ERRORS_JSONL

        err.print(f"[bold red]error:[/] {len(result.work.nonfinite):,} of {result.num:,} samples are not finite (NaN or inf) "
                  f"and were not written (listed in {escape(str(result.out / ERRORS_JSONL))}): lower --cfg-scale or "
                  "--rg-scale, or check the checkpoint.")
        raise typer.Exit(2)
    if result.missing:
        err.print(f"[yellow]{result.missing:,} images are still missing (other ranks): rerun to finish and assemble {escape(str(result.out))}.[/]")

PREVIEW = FromConfig("redi.sampler.preview:PreviewConfig", panels={},
                     flags={"data": Flag(argument=True, parse=LOCAL_ROOT)})
TINY_RANDOM_NOTE = (
    "The VAE here is tiny-random: random weights decode any latent to texture, the training latents too, so the "
    "pictures of the first and third rows look like noise however well the model learns (at best the first shows "
    "where each shape lies). The PCs come from the encoder's features through a fitted PCA, so they show the "
    "images' shapes and colours: compare the generated PCs with the training ones. With a real VAE and encoder "
    "(`make encode`), the same rows show images."
)


@stage_command("preview", PREVIEW, MODEL_PANEL)
def preview_command(cfg: PreviewConfig) -> None:
    """One captioned picture: the shards' training latents decoded by their VAE and their PCs, and with --samples,
    a `redi sample` folder's images and generated PCs beside them."""
    from rich.table import Table

    from redi.sampler.preview import preview

    result = preview(cfg)
    table = Table(title="redi preview", show_header=False)
    for i, row in enumerate(result.rows, 1):
        table.add_row(f"row {i}", escape(f"{row.caption}: {row.meaning}."))
    print_summary(table, [("picture", result.out)])
    if result.tiny_random:
        out.print(TINY_RANDOM_NOTE)


# --- eval ---

EVAL = FromConfig("redi.sampler.evaluate:EvalConfig", panels={},
                  flags={"samples": Flag(argument=True), "inception": Flag(envvar="REDI_INCEPTION"),
                         "metrics": Flag(type=str, default="fid,sfid,is,pr", parse="redi.sampler.evaluate:parse_metrics")},
                  skip=("split_size", "nearest_k"))  # ADM's protocol: 10 Inception Score splits of 5,000, k = 3


@stage_command("eval", EVAL, MODEL_PANEL)
def eval_command(cfg: EvalConfig) -> None:
    """FID, sFID, Inception Score, precision and recall against an ADM reference batch, as ADM's evaluator computes them,
    and FD-DINOv2 (--metrics …,fd_dinov2); the JSON report carries an eval card (checkpoint, sampler, NFE, guidance,
    labels, hashes, time).

    Two files that redi never downloads: the reference batch (VIRTUAL_imagenet256_labeled.npz; 512 px:
    VIRTUAL_imagenet512.npz), linked from openai/guided-diffusion's evaluations/README.md, and pytorch-fid's
    Inception weights pt_inception-2015-12-05-6726825d.pth, from its GitHub release "fid_weights".
    FID needs thousands of samples: with fewer than 2,048 (the Inception feature width) it is not meaningful.

    With a data root as --ref (redi eval SAMPLE_DIR --ref DATA [--before DIR]): FD-PC and the nearest-neighbour check of
    the PCs a ReDi model generated against the training PCs (docs/METHOD.md): whether a model learned its data.
    """
    from rich.table import Table

    from redi.sampler.evaluate import evaluate

    result = evaluate(cfg)
    if "fd_pc" in result.metrics:
        _print_pc_metrics(result, cfg.before is not None)
        return
    table = Table(title=f"{result.num_samples:,} samples vs {result.num_ref:,} reference images")
    table.add_column("metric")
    table.add_column("value", justify="right")
    names = {"inception_score": "Inception Score", "fid": "FID", "sfid": "sFID", "precision": "Precision",
             "recall": "Recall", "fd_dinov2": "FD-DINOv2"}
    for key, value in result.metrics.items():
        table.add_row(names[key], f"{value:.4f}")
    out.print(table, soft_wrap=False)
    stats = "precomputed reference statistics" if result.precomputed_ref_stats else "reference statistics from its images"
    out.print(f"[green]wrote[/] {escape(str(result.out))} in {result.seconds:.1f} s "
              f"({result.images_per_s:,.1f} img/s on {result.device}, {stats})")


def _print_pc_metrics(result: EvalResult, before: bool) -> None:
    """The PC metrics of `redi eval SAMPLES --ref DATA`: FD-PC and the nearest-neighbour distances, beside --before's."""
    from rich.table import Table

    m = result.metrics
    table = Table(title=f"Generated PCs of {result.num_samples} samples vs {result.num_ref} training images")
    table.add_column("")
    if before:
        table.add_column("--before", justify="right")
    table.add_column("samples", justify="right")
    rows = [("FD-PC (lower is closer)", "fd_pc"), ("distance to the nearest training PCs", "nn_generated")]
    for name, key in rows:
        table.add_row(name, *([f"{m['before_' + key]:.2f}"] if before else []), f"{m[key]:.2f}")
    out.print(table)
    out.print(f"Nearest training PCs: {m['nn_noise']:.2f} away from noise of their per-PC mean and std, "
              f"{m['nn_training']:.2f} from another training image. [green]wrote[/] {escape(str(result.out))}")


# --- convert ---

CONVERT = FromConfig("redi.trainer.convert:ConvertConfig", panels={},
                     flags={"checkpoint": Flag(argument=True), "origin": Flag(("--from",))})


@stage_command("convert", CONVERT, MODEL_PANEL)
def convert_command(cfg: ConvertConfig) -> None:
    """Convert a public DiT/SiT/REPA/REG/ReDi checkpoint to a redi checkpoint that samples identically."""
    from rich.table import Table

    from redi.trainer.convert import convert_checkpoint

    result = convert_checkpoint(cfg)
    m, train = result.model_config, result.train_config
    table = Table(title="redi convert")
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
    print_summary(table, [("output", result.out)])


CONVERT_ENCODER = FromConfig("redi.pipeline.timm_vit:EncoderConvertConfig", panels={},
                             flags={"checkpoint": Flag(argument=True), "origin": Flag(("--from",))})


@stage_command("convert-encoder", CONVERT_ENCODER, DATA_PANEL)
def convert_encoder_command(cfg: EncoderConvertConfig) -> None:
    """Convert a MoCo v3 or DINOv1 checkpoint (timm-style ViT) to a model directory for redi features --encoder."""
    from redi.pipeline.timm_vit import convert_encoder

    result = convert_encoder(cfg)
    c = result.config
    side = c["image_size"] // c["patch_size"]
    out.print(f"[green]wrote[/] {escape(str(result.out))}: {result.origin.title} ViT, {c['hidden_size']} wide, "
              f"{c['num_hidden_layers']} layers, {c['num_attention_heads']} heads, patch {c['patch_size']}, "
              f"{side}×{side} position table, {result.num_params / 1e6:.1f}M parameters, in {result.seconds:.1f} s")
    out.print(f"next: redi features IMAGES --data DATA --encoder {escape(str(result.out))}")


EMA = FromConfig("redi.trainer.posthoc:EmaConfig", panels={},
                 flags={"run": Flag(argument=True),
                        "sigma_rel": Flag(type=str, parse="redi.trainer.phema:parse_sigma_rels")})


@stage_command("ema", EMA, MODEL_PANEL)
def ema_command(cfg: EmaConfig) -> None:
    """Post-hoc EMA: reconstruct the EMA of any length σ_rel from the snapshots of a run trained with --phema (edm2's
    least-squares fit), as checkpoints that sample, eval and train --init take."""
    from rich.table import Table

    from redi.trainer.posthoc import reconstruct

    result = reconstruct(cfg)
    table = Table(title=f"redi ema: the EMA at step {result.step:,}, from {len(result.snapshots)} snapshots")
    for column in ("σ_rel", "profile fit error", "checkpoint"):
        table.add_column(column, no_wrap=True)
    for r in result.outputs:
        table.add_row(f"{r.sigma_rel:g}", f"{r.fit_error:.2%}", escape(r.path.name))
    print_summary(table, [("folder", result.outputs[0].path.parent), ("time", f"{result.seconds:.1f} s"),
                          ("next", f"redi sample --ckpt {result.outputs[0].path}")])


IMPORT_REPA = FromConfig("redi.pipeline.repa_import:RepaImportConfig", panels={},
                         flags={"root": Flag(argument=True), "data": DATA})


@stage_command("import-repa", IMPORT_REPA, DATA_PANEL)
def import_repa_command(cfg: RepaImportConfig) -> None:
    """Stage encode from REPA's latents: copy vae-sd/*.npy into DATA/latents without running the VAE."""
    from redi.pipeline.repa_import import import_repa

    _print_stage_result(import_repa(cfg))
    out.print(f"next: redi features {escape(str(cfg.images or cfg.root / 'images'))} --data {escape(str(cfg.data))}  "
              "(same image index, so shards joins them)")

# --- info, verify, bench ---

AsJson = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts) instead of a table.")]


@app.command("info", cls=Command, rich_help_panel=CHECK_PANEL, epilog=examples("info"))
@user_errors
def info_command(
    data: Annotated[Path, typer.Argument(path_type=str, help="Data root (latents/, features/, pca.safetensors, shards/) or run directory.", show_default=False)],
    as_json: AsJson = False,
) -> None:
    """Show what each stage of a data root holds (counts, shapes, encoders, completeness, skipped images), or a run's
    state; draws the PCA and per-channel histograms of a data root, or a run's training curves (curves.png) and, once
    two `redi ema` reconstructions are evaluated, each metric against the EMA length (ema_sweep.png), unless --json."""
    from redi.info import describe, info_json, info_plots, info_table
    from redi.pipeline.remote import local_root

    data = local_root(data)  # a URL is one sentence (`redi verify URL` is what reads a published root)
    parts = describe(data)
    if as_json:  # for scripts: what the root holds, without drawing
        print_json(info_json(data, parts))
        return
    print_summary(info_table(data, parts), [("root", data), *(("plot", path) for path in info_plots(data))])

@app.command("verify", cls=Command, rich_help_panel=CHECK_PANEL, epilog=examples("verify"))
@user_errors
def verify_command(
    data: Annotated[str, typer.Argument(help="Data root to check (latents/, features/, pca.safetensors, shards/), a URL that `redi publish` wrote (its shards/ and pca.safetensors), or a run directory (config.json, its pca.safetensors, checkpoints).", show_default=False)],
    deep: Annotated[bool, typer.Option("--deep/--no-deep", help="Hash and decode every input chunk and hash every shard file and checkpoint; --no-deep checks manifests, shapes and presence only.")] = True,
    repair: Annotated[bool, typer.Option("--repair", help="Forget the encode/features chunks whose files are missing or changed, so that rerunning the stage rewrites only them.")] = False,
    as_json: AsJson = False,
) -> None:
    """Re-check every stage of a data root (manifests, committed chunks, arrays, PCA, shard checksums and counts), or a run's PCA copy and every checkpoint against their SHA-256."""
    import dataclasses

    from rich.table import Table

    from redi.info import is_run_dir
    from redi.common.urls import is_url, redact
    from redi.pipeline.verify import verify_data

    is_run = not is_url(data) and is_run_dir(Path(data))
    if is_run:
        from redi.trainer.verify import verify_run

        checks = verify_run(Path(data), deep=deep)
    else:
        checks = verify_data(data, deep=deep, repair=repair)
    failed = [check for check in checks if check.problem]
    if as_json:
        print_json({"root": redact(data), "kind": "run" if is_run else "data", "consistent": not failed,
                    "checks": [dataclasses.asdict(check) for check in checks]})
    else:
        shown = escape(redact(data))  # a URL without its credentials
        colours = {"ok": "green", "absent": "dim", "warning": "yellow", "FAILED": "bold red"}
        table = Table(title="redi verify")
        for name in ("stage", "status", "details"):
            table.add_column(name)
        for check in checks:
            table.add_row(check.stage, f"[{colours[check.status]}]{check.status}[/]", escape(check.details))
        print_summary(table, [("root", redact(data))])
        if not failed:
            out.print(f"[green]{shown}: every {'part' if is_run else 'stage present'} is consistent.[/]")
    if failed:
        raise UserError(failed[0].problem)





def _figure(value: object) -> str:
    """A benchmark figure for a table: thousands separators for rates, 3 significant digits for ratios."""
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


BENCH_TARGETS = ("encode", "pca", "loader", "train", "sample", "eval")


@app.command("bench", cls=Command, rich_help_panel=CHECK_PANEL, epilog=examples("bench"))
@user_errors
def bench_command(
    target: Annotated[str, typer.Argument(help=f"One of {', '.join(BENCH_TARGETS)}, or all; learn: the methods' FD-PC on the demo data; gpu: the GPU suite (docs/BENCHMARKS.md).")] = "all",
    quick: Annotated[bool, typer.Option(help="Seconds-long smoke version of each benchmark.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    num: Annotated[int | None, typer.Option("--num", "--samples", help=with_range("loader: synthetic dataset size (default 8192); with --shards, samples to read (default one epoch).", AT_LEAST_1), **ranged(AT_LEAST_1, int))] = None,
    shards: Annotated[str | None, typer.Option(help="loader: read these shards (a data root, local or a URL) instead of synthetic ones; learn: the demo's data root (default data/demo).")] = None,
    seeds: Annotated[int | None, typer.Option(help=with_range("learn: training seeds per method (default 3).", AT_LEAST_1), **ranged(AT_LEAST_1, int))] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="gpu: folder of the JSON files (default $OUT, else runs/bench-gpu).", show_default=False)] = None,
    only: Annotated[str | None, typer.Option(help="gpu: the items to run, e.g. ab (default abcd).")] = None,
    budget: Annotated[float | None, typer.Option(help=with_range("gpu: seconds after which no further step starts.", AT_LEAST_0), **ranged(AT_LEAST_0, float))] = None,
) -> None:
    """Measure throughput of the pipeline, trainer and sampler on this machine (figures for docs/BENCHMARKS.md); learn:
    baseline, REPA, ReDi and ReDi + RG trained alike on the demo data, scored by FD-PC and FD-latent (tens of minutes on
    a CPU; not part of all)."""
    import importlib

    from rich.table import Table

    targets = BENCH_TARGETS if target == "all" else (target,)
    if any(t not in (*BENCH_TARGETS, "gpu", "learn") for t in targets):
        raise UserError(f"Unknown benchmark '{target}': choose one of {', '.join(BENCH_TARGETS)}, all, learn or gpu.")
    takes = {"loader": ("num", "shards"), "learn": ("shards", "seeds"), "gpu": ("out", "only", "budget")}
    given = {k: v for k, v in {"num": num, "shards": shards, "seeds": seeds, "out": out_dir, "only": only,
                               "budget": budget}.items() if v is not None}
    if stray := [f"--{k}" for k in given if not any(k in takes.get(t, ()) for t in targets)]:
        raise UserError(f"Not an option of `redi bench {target}`: {', '.join(stray)} (see `redi bench --help`).")
    options = {t: {k: v for k, v in given.items() if k in takes.get(t, ())} for t in targets}
    results = {t: importlib.import_module(f"redi.benchmarks.{t}").run(quick=quick, **options[t]) for t in targets}
    if as_json:
        print_json(results)
        return
    for name, figures in results.items():
        table = Table(title=f"redi bench {name}", show_header=False)
        for key, value in figures.items():
            table.add_row(key, _figure(value))
        out.print(table, soft_wrap=False)

