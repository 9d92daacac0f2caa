"""`redi info DATA | RUN`: what each stage of a data root holds, or what a training run holds, as a table or JSON, and
their pictures.

It sits above pipeline/, trainer/ and sampler/ (beside the CLI) because it reads all three's formats; what reads a
run imports torch and is imported where it is used, so `redi info DATA` runs without torch."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from rich.markup import escape
from rich.table import Table

from redi.common.atomic import try_read_json
from redi.common.errors import UserError
from redi.common.stamp import content_digest, picture_stamp
from redi.pipeline.latent_norm import LatentNorm
from redi.pipeline.pca import PLOT_FILE, load_stage_pca, plot_explained_variance, plot_source
from redi.pipeline.shard_info import read_shard_info
from redi.pipeline.shards_config import SHARDS_JSON
from redi.pipeline.stage import ZARR_METADATA_ERRORS, StageDir, describe_identity, read_manifest

log = logging.getLogger(__name__)
ARRAY_STAGES = ("latents", "features")
HISTOGRAMS_PNG = "channel_histograms.png"  # per-channel histograms of a data root's latents and PCs
CURVES_PNG = "curves.png"  # a run's training curves
HIST_SAMPLES = 512  # images whose every latent and PC value enters the histograms (the shards' first, shuffled at write)
HIST_LATENT_CHANNELS = 16  # VAE channels shown at most
HIST_PCS = 8  # principal components shown at most (the default rank r)


@dataclass(frozen=True)
class Fact:
    """A value as `--json` gives it, and the words the table shows for it."""

    value: Any  # JSON: numbers, strings, null, lists, objects
    text: str


@dataclass(frozen=True)
class StageInfo:
    """One stage's entry in a data root."""

    name: str  # "latents/", "features/", "pca.safetensors", "shards/"
    status: str  # "complete", "incomplete (…)", "missing", "unreadable (…)"
    rows: list[tuple[str, Any]] = field(default_factory=list)  # (what, value): a JSON value or a Fact
    tiny_random: bool = False  # made with tiny-random encoders


def as_text(value: Any) -> str:
    """A row's value in the table: a Fact's words, integers with thousands separators, floats to 4 significant
    digits, null as "none", lists joined."""
    if isinstance(value, Fact):
        return value.text
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(as_text, value))
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def as_json(value: Any) -> Any:
    """A row's value for `--json`: a Fact's value, the rest as it is."""
    return value.value if isinstance(value, Fact) else list(value) if isinstance(value, tuple) else value


def describe(root: Path) -> list[StageInfo]:
    """The parts of a run directory, or the stages of a data root."""
    return describe_run(root) if is_run_dir(root) else describe_data_root(root)


def describe_data_root(root: Path) -> list[StageInfo]:
    """Inspect every stage under `root`; missing stages are reported as such, never an error."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"The data root {root} does not exist or is not a folder.")
    return [*(_array_stage(root / name) for name in ARRAY_STAGES), _pca(root / "pca.safetensors"), _shards(root / "shards")]


def is_run_dir(root: Path) -> bool:
    """config.json is written before the first step, checkpoints/ holds the steps; data roots have neither."""
    return (Path(root) / "config.json").is_file() or (Path(root) / "checkpoints").is_dir()


def describe_run(root: Path) -> list[StageInfo]:
    """A run directory: its configuration, checkpoints, last logged metrics and sample folders."""
    from redi.trainer.checkpoint import (  # the trainer owns a run's formats
        CONFIG_JSON, POSTHOC_DIR, RunConfig, list_checkpoints, list_phema_snapshots,
    )
    from redi.trainer.metrics import read_metrics

    root = Path(root)
    keys = ("model", "method", "pca_rank", "fusion", "rep_drop", "batch_size", "max_steps", "precision", "shards")
    try:
        config = RunConfig.load(root)
        entries = [StageInfo(CONFIG_JSON, "complete", [(k, _short(config.train[k])) for k in keys if k in config.train]
                             + [("num_classes", config.model_config.num_classes)])]
    except UserError as e:
        entries = [StageInfo(CONFIG_JSON, "unreadable (damaged)", [("problem", str(e))]) if (root / CONFIG_JSON).exists()
                   else StageInfo(CONFIG_JSON, "missing")]
    steps = [step for step, _ in list_checkpoints(root)]
    entries.append(StageInfo("checkpoints/", f"{len(steps)} checkpoints" if steps else "missing",
                             [("steps", _steps(steps)), ("newest", f"step-{steps[-1]:07d}.pt")] if steps else []))
    if snapshots := [step for step, _ in list_phema_snapshots(root)]:  # --phema runs only
        entries.append(StageInfo("phema/", f"{len(snapshots)} post-hoc EMA snapshots", [("steps", _steps(snapshots))]))
    if made := sorted(p.name for p in (root / POSTHOC_DIR).glob("*.pt")):
        shown = made if len(made) <= 6 else Fact(made, f"{made[0]}, {made[1]}, … {made[-1]}")
        entries.append(StageInfo(f"{POSTHOC_DIR}/", f"{len(made)} reconstructions", [("files", shown)]))
    lines = read_metrics(root / "metrics.jsonl")
    last = lines[-1] if lines else {}
    unread = "unreadable (no complete line)" if (root / "metrics.jsonl").exists() else "missing"
    entries.append(StageInfo("metrics.jsonl", f"{len(lines)} lines" if lines else unread,
                             [(k, _short(v)) for k, v in last.items()]))
    found = sorted((root / "samples").iterdir()) if (root / "samples").is_dir() else []
    samples = [p.name for p in found if p.is_dir()]  # `redi sample`'s directories
    grids = [p.name for p in found if p.name.startswith("step-") and p.suffix == ".png"]  # --sample-every's grids
    rows = (([("sets", samples)] if samples else [])
            + ([("grids", Fact({"count": len(grids), "newest": grids[-1]}, f"{len(grids)}, newest {grids[-1]}"))] if grids else []))
    entries.append(StageInfo("samples/", f"{len(samples)} sets, {len(grids)} grids" if found else "missing", rows))
    return entries


def info_table(root: Path, parts: list[StageInfo]) -> Table:
    """The stages of a data root, or the parts of a run directory, as one rich table."""
    table = Table(title="redi info", show_lines=True)
    for col in ("stage", "status", "contents"):
        table.add_column(col)
    for s in parts:
        status = {"complete": "[green]complete[/]", "missing": "[dim]missing[/]"}.get(s.status, f"[yellow]{escape(s.status)}[/]")
        if s.tiny_random:
            status += "\n[bold yellow]tiny-random[/]"
        table.add_row(s.name, status, escape("\n".join(f"{k}: {as_text(v)}" for k, v in s.rows)))  # paths may hold [brackets]
    return table


def info_json(root: Path, parts: list[StageInfo]) -> dict[str, Any]:
    """What `info_table` shows, for scripts: each part's status and contents."""
    return {"root": str(root), "kind": "run" if is_run_dir(root) else "data",
            "parts": [{"name": s.name, "status": s.status, "tiny_random": s.tiny_random,
                       "contents": {k: as_json(v) for k, v in s.rows}} for s in parts]}


def info_plots(root: Path) -> list[Path]:
    """The pictures of a run (RUN/curves.png) or a data root (the PCA plot, DATA/channel_histograms.png), drawn now;
    a part that is missing or unreadable is left out (the table says why), a folder we may not write to is said once."""
    try:
        return _draw(Path(root))
    except OSError as e:  # a read-only or full disk: the table was shown, the pictures cannot be
        log.warning(f"No pictures drawn in {root}: {e.strerror or e}.")
        return []


def _curves(root: Path, name: str) -> Path | None:
    """RUN/curves.png, drawn again when metrics.jsonl or config.json changed."""
    source = content_digest([root / "metrics.jsonl", root / "config.json"], name)
    if picture_stamp(root / CURVES_PNG) == source:
        return root / CURVES_PNG
    return plot_curves(root, root / CURVES_PNG, source)


def plot_curves(run: Path, path: Path, drawn_from: str | None = None) -> Path | None:
    """RUN/curves.png from metrics.jsonl (the source of truth) and config.json's batch sizes (each resume's change
    counted from its step), stamped `drawn_from`; None when nothing is logged."""
    from redi.common.plots import curves_figure, save_png
    from redi.trainer.checkpoint import RunConfig  # torch: `redi info DATA` goes without
    from redi.trainer.metrics import LOSS_TERMS, read_metrics

    rows = read_metrics(run / "metrics.jsonl")
    if not any("loss" in r for r in rows):
        return None
    try:
        record: RunConfig | None = RunConfig.load(run)
        batches = record.batch_sizes if all(b > 0 for _, b in record.batch_sizes) else None
    except (UserError, ValueError, TypeError, KeyError):  # damaged: the curves without the images axis
        record, batches = None, None
    train = record.settings if record is not None else {}
    said = ", ".join(f"{b} from step {first:,}" if first else str(b) for first, b in batches or ())
    title = f"{run.resolve().name}: {train.get('model', '?')} {train.get('method', '?')}, batch {said or '?'}"
    return save_png(curves_figure(rows, batches, LOSS_TERMS, title), path, drawn_from)


def _ema_sweep(root: Path, name: str) -> Path | None:
    """RUN/ema_sweep.png, drawn again when an evaluation report under the run changed, came or went."""
    from redi.sampler.ema_sweep import SWEEP_PNG, evaluation_reports, plot_ema_sweep

    reports = evaluation_reports(root)
    if not reports:
        return None
    source = content_digest(reports, "\n".join([name, *(str(p.relative_to(root)) for p in reports)]))
    if picture_stamp(root / SWEEP_PNG) == source:
        return root / SWEEP_PNG
    return plot_ema_sweep(root, root / SWEEP_PNG, source)


def _draw(root: Path) -> list[Path]:
    """Each picture whose stamp (common/stamp.py) is not the digest of its inputs now is drawn again; the others stay."""
    name = root.resolve().name  # in the titles
    if is_run_dir(root):
        return [path for path in (_curves(root, name), _ema_sweep(root, name)) if path is not None]
    plots = []
    if (root / "pca.safetensors").exists():
        try:
            model, _ = load_stage_pca(root)  # refused when it changed since `redi pca` wrote it
            if picture_stamp(root / PLOT_FILE) != plot_source(root):
                plot_explained_variance(model, root / PLOT_FILE)
            plots.append(root / PLOT_FILE)
        except UserError:
            pass
    latents = root / "latents"  # the histograms' values: the shards' (shards.json holds every file's SHA-256), else
    inputs = [root / "shards" / "shards.json", latents / "manifest.json", *sorted((latents / "progress").glob("*.json"))]
    source = content_digest(inputs, f"{name} {HIST_SAMPLES} {HIST_LATENT_CHANNELS} {HIST_PCS}")  # latents/' records
    if picture_stamp(root / HISTOGRAMS_PNG) == source:
        plots.append(root / HISTOGRAMS_PNG)
    elif values := channel_values(root):
        from redi.common.plots import histograms_figure, save_png

        title = f"{name}: every value of each channel, {values.images}"
        plots.append(save_png(histograms_figure(values.groups, title), root / HISTOGRAMS_PNG, source))
    return plots


def _normalised(norm: LatentNorm) -> str:
    """The histogram's title: the latent normalisation, in numbers when one scale and shift serve every channel."""
    if len(set(norm.scale)) == 1 and len(set(norm.shift)) == 1:
        return f"latent ((mean − {norm.shift[0]:g}) × {norm.scale[0]:g})"
    return f"latent (mean, {norm.kind} normalisation per channel)"


@dataclass(frozen=True)
class ChannelValues:
    """What the channel histograms show."""

    groups: list[tuple[str, np.ndarray, list[str]]]  # (group, values (N·h·w, C), channel names)
    images: str  # which images they come from, e.g. "all 64 images of the shards"


def channel_values(root: Path) -> ChannelValues | None:
    """The latents as the trainer scales them and the first PCs, per channel, from the shards' first samples
    (shuffled at write); the latent store's posterior means when there are no Zarr shards; None without either."""
    shards = root / "shards"
    try:
        norm = read_shard_info(str(shards)).latent_norm  # z' = (z − shift_c)·scale_c, as the trainer normalises
        store = zarr.open_group(shards / "samples.zarr", mode="r")
        shown = min(norm.channels, HIST_LATENT_CHANNELS)
        shift, scale = (np.asarray(v[:shown], np.float64).reshape(1, shown, 1, 1) for v in (norm.shift, norm.scale))
        z = (np.asarray(store["moments"][:HIST_SAMPLES, :shown], np.float64) - shift) * scale  # (N, C, h, h)
        pcs = np.asarray(store["pcs"][:HIST_SAMPLES, :HIST_PCS], np.float64)  # (N, k, p, p)
        return ChannelValues([(_normalised(norm), _per_channel(z), [f"c{i}" for i in range(shown)]),
                              ("PC", _per_channel(pcs), [str(i + 1) for i in range(pcs.shape[1])])],
                             _which(len(z), store["moments"].shape[0], "of the shards", "(shuffled at write)"))
    except (OSError, UserError, *ZARR_METADATA_ERRORS):
        pass
    try:  # no (readable) Zarr shards: the encode stage's posterior means, unscaled
        store = zarr.open_group(root / "latents" / "store.zarr", mode="r")
        every = np.flatnonzero(np.asarray(store["valid"][:]))
        valid = every[:HIST_SAMPLES]
        moments = store["moments"]
        shown = min(moments.shape[1] // 2, HIST_LATENT_CHANNELS)
        mean = np.asarray(moments.get_orthogonal_selection((valid, slice(0, shown))), np.float64)  # (N, C, h, h)
        groups = [("posterior mean", _per_channel(mean), [f"c{i}" for i in range(shown)])]
        return ChannelValues(groups, _which(len(valid), len(every), "of latents/", "valid")) if len(valid) else None
    except (OSError, *ZARR_METADATA_ERRORS):
        return None


def _which(shown: int, total: int, where: str, how: str) -> str:
    """'all 64 images of the shards', or 'the first 512 of 1,281,167 images of the shards (shuffled at write)'."""
    return f"all {total:,} images {where}" if shown == total else f"the first {shown:,} of {total:,} images {where} ({how})"


def _per_channel(x: np.ndarray) -> np.ndarray:
    """(N, C, h, w) → (N·h·w, C): every value of each channel."""
    return x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1])


def _array_stage(path: Path) -> StageInfo:
    """latents/ or features/: manifest, arrays, committed chunks, errors."""
    name = f"{path.name}/"
    if not path.is_dir() or not any(path.iterdir()):
        return StageInfo(name, "missing")
    if not (path / "manifest.json").exists():
        return StageInfo(name, "unreadable (no manifest.json)", [("problem", f"{path} holds files but no manifest.json "
                                                                 "saying what made them; rerun the stage with --force")])
    try:
        manifest = read_manifest(path)  # every field checked: a wrong one is named
    except UserError as e:
        return StageInfo(name, "unreadable (manifest.json is damaged)", [("problem", str(e))])
    params, source = manifest.params, manifest.source
    stage = StageDir(path, -(-source["count"] // params["chunk_size"]))
    status = "complete" if stage.is_complete() else f"incomplete ({stage.n_chunks - len(stage.pending())} of {stage.n_chunks} chunks)"
    n_errors = len(stage.chunk_errors())
    rows = [
        ("images", source.get("count")),
        ("resolution", params.get("resolution")),
        *_array_rows(path / "store.zarr"),
        ("encoder", _identity(manifest.encoder)),
        *(_tokens(params["representation"]) if params.get("representation") else []),
        *(_latents(params["latent_space"]) if params.get("latent_space") else []),
        ("skipped images", n_errors),
    ]
    return StageInfo(name, status, rows, manifest.tiny_random)


def _identity(identity: Any) -> Fact:
    """An encoder's recorded identity, and its one line."""
    identity = identity if isinstance(identity, dict) else {}
    return Fact(identity, describe_identity(identity))


def _tokens(rep: dict[str, Any]) -> list[tuple[str, Any]]:
    """features/: the encoder's token grid, input side, position table (when resampled) and global token, from the manifest."""
    g, side, table = rep.get("grid"), rep.get("input_side"), rep.get("position_table")
    resampled = ([("position table", Fact(table, f"{table.get('from')}² → {g}², resampled once"))]
                 if isinstance(table, dict) else [])
    return [("token grid", Fact({"grid": g, "input_side": side}, f"{g}×{g} at {side} px")), *resampled,
            ("global token", rep.get("global_token") or None)]


def _latents(space: dict[str, Any]) -> list[tuple[str, Any]]:
    """latents/: the VAE's latent space and its config normalisation, from the manifest."""
    std = ", std 0" if space.get("deterministic") else ""
    shift = f", shift {space['shift_factor']:g}" if isinstance(space.get("shift_factor"), (int, float)) else ""
    scale = space.get("scaling_factor")
    keys = ("channels", "downsampling", "deterministic")
    return [("latent space", Fact({k: space.get(k) for k in keys}, f"{space.get('channels')} ch, "
                                  f"f{space.get('downsampling')}{std}")),  # the class: the encoder row
            ("config scale", Fact({"scaling_factor": scale, "shift_factor": space.get("shift_factor")},
                                  f"{scale:g}{shift}" if isinstance(scale, (int, float)) else f"{scale}{shift}"))]


def _array_rows(store: Path) -> list[tuple[str, Any]]:
    if not store.exists():
        return [("arrays", Fact(None, "none yet"))]
    try:
        group = zarr.open_group(store, mode="r")
        return [(name, Fact({"shape": list(arr.shape), "dtype": str(arr.dtype)}, f"{tuple(arr.shape)} {arr.dtype}"))
                for name, arr in sorted(group.arrays())]
    except ZARR_METADATA_ERRORS:
        return [("arrays", Fact(None, "unreadable (damaged zarr.json)"))]


def _pca(path: Path) -> StageInfo:
    if not path.exists():
        return StageInfo(path.name, "missing")
    try:
        pca, _ = load_stage_pca(path.parent)
    except UserError as e:
        return StageInfo(path.name, f"unreadable ({e})")
    first = float(pca.explained_variance_ratio[:8].sum())
    rows = [
        ("components", Fact(list(pca.components.shape), str(tuple(pca.components.shape)))),
        ("fit on", Fact({"images": pca.n_images, "tokens": pca.n_tokens, "seed": pca.seed},
                        f"{pca.n_images:,} images, {pca.n_tokens:,} tokens, seed {pca.seed}")),
        ("first 8 PCs", Fact(first, f"{first:.1%} of the variance")),
        ("source", Fact(pca.source, pca.source[:16])),
    ]
    return StageInfo(path.name, "complete", rows)


def _shards(path: Path) -> StageInfo:
    """shards/: the summary of shards.json (written last, so its presence means complete)."""
    name = f"{path.name}/"
    if not path.exists():
        return StageInfo(name, "missing")
    manifest = try_read_json(path / "manifest.json")
    tiny = bool(manifest.get("tiny_random")) if isinstance(manifest, dict) else False
    if not (path / SHARDS_JSON).exists():
        return StageInfo(name, "incomplete (no shards.json)", [], tiny)
    try:
        info = read_shard_info(path)  # every field checked: a wrong one is named
    except UserError as e:
        return StageInfo(name, "unreadable (shards.json is damaged)", [("problem", str(e))], tiny)
    return StageInfo(name, "complete", _shard_rows(info.raw, info.latent_norm), tiny)


def _shard_rows(s: dict[str, Any], norm: LatentNorm) -> list[tuple[str, Any]]:
    """What a person asks of shards: how many samples, in which stores, made from what, holding which arrays."""
    vae, pca, order = _dict(s, "vae"), _dict(s, "pca"), _dict(s, "write_order")
    fraction = pca.get("explained_variance_fraction")
    source = _dict(s, "source").get("kind")
    return [
        ("samples", Fact({"samples": s["num_samples"], "shards": s["num_shards"], "shard_size": s["shard_size"],
                          "formats": list(s["formats"])},
                         f"{s['num_samples']:,} in {s['num_shards']:,} shards of {s['shard_size']:,} "
                         f"({', '.join(s['formats'])})")),
        ("skipped images", s["num_skipped"]),
        ("classes", s["num_classes"]),
        ("images", Fact({"resolution": s["resolution"], "source": source}, f"{s['resolution']} px; source {source}")),
        ("VAE", Fact({"id": vae.get("id"), "revision": vae.get("revision"), "latent_shape": list(s["latent_shape"])},
                     f"{vae.get('id')}, latent {'×'.join(map(str, s['latent_shape']))}")),
        ("latent norm", Fact(norm.record(), norm.describe())),
        ("encoder", _identity(s.get("encoder"))),
        ("PCs", Fact({"K": pca["K"], "explained_variance_fraction": fraction},
                     f"K = {pca['K']}" + (f", {fraction:.1%} of the variance" if isinstance(fraction, float) else ""))),
        *((field, Fact({"shape": list(spec["shape"]), "dtype": spec["dtype"]},
                       f"{'×'.join(map(str, spec['shape'])) or 'scalar'} {spec['dtype']}"))
          for field, spec in _dict(s, "fields").items()),
        ("order", Fact({"seed": order.get("seed")}, f"shuffled with seed {order.get('seed')}")),
        ("checksums", Fact(len(_dict(s, "files")), f"SHA-256 of {len(_dict(s, 'files')):,} files")),
    ]


def _steps(steps: list[int]) -> list[int] | Fact:
    """The steps; the table shows '100, 200, … 9,000' beyond 8 of them."""
    return steps if len(steps) <= 8 else Fact(steps, f"{steps[0]:,}, {steps[1]:,}, … {steps[-1]:,}")


def _dict(value: Any, key: str) -> dict[str, Any]:
    """value[key] when both are objects, else {}."""
    inner = value.get(key) if isinstance(value, dict) else None
    return inner if isinstance(inner, dict) else {}


def _short(value: Any, width: int = 100) -> Any:
    """A config or metrics value: as it is, for JSON; a Fact cut at `width` where its words would be longer."""
    text = as_text(value)
    return value if len(text) <= width else Fact(value, text[: width - 1] + "…")
