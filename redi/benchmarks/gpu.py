"""The GPU suite: one command that gives every GPU figure docs/BENCHMARKS.md lacks, step by step.

In order: (a) the train profile of the big model (kernel time by kind, the GPU's idle share) at
two micro-batches with compile; (b) images/s and MFU of the big and the small model with and
without compile; (c) sampling at 250 NFE with CFG, guidance interval on and off; (d) encoding
with the real SD-VAE and DINOv2-B architectures at random weights, the stage and the models
alone, at two batch sizes. Every step also records its peak GPU memory (reset per step) and its
seconds. Each step is isolated: an error (out of memory, say) is recorded in its JSON and the
suite goes on. After each step the item's file OUT/<item>.json is rewritten (atomically), so a
run cut short still leaves every finished step's figures. The steps are the `benchmarks/*.py`
functions themselves; `--quick` runs the same steps at tiny sizes on a CPU (the test suite does).

On a bare GPU machine (no .venv, no network) run `python3 -m redi.benchmarks.gpu`: packages its
python3 lacks are installed first from the wheels `make gpu-wheels` put in .whl/.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
WHEELS = REPO / ".whl"  # written by `make gpu-wheels` on a machine with PyPI
NEEDED = {"zarr": "3.1.3", "diffusers": "0.29", "torchdiffeq": "0.2.5"}  # import name → lowest version pyproject.toml admits
ITEMS = {"a": "train-profile", "b": "train-throughput", "c": "sample", "d": "encode"}
GUIDANCE_INTERVAL = (0.0, 0.7)  # REPA/REG's interval (docs/METHOD.md)
Figures = dict[str, Any]


@dataclass(frozen=True)
class Sizes:
    """What the suite runs at: ImageNet-256 and the paper's models on a GPU, tiny ones on a CPU (--quick)."""

    big: str  # the model whose MFU issue 17 targets
    small: str
    batch: int  # global training batch
    profile_micro_batches: tuple[int, ...]
    big_micro_batch: int  # micro-batch of the throughput runs
    small_micro_batch: int
    train_steps: int  # the second half is timed (the loop's own metrics)
    warm_steps: int  # profiler: steps before the profiled ones (compilation)
    active_steps: int
    compile: bool  # False only where compiling is too slow (a CPU): the same steps run uncompiled
    shards: dict[str, int]  # make_shards' sizes
    sample_model: str
    sample_steps: int
    sample_batch: int
    sample_batches: int  # timed, after one warm-up batch
    real_arch: bool  # VAE (also the sampler's decoder) and DINOv2: real architectures, random weights; or tiny-random
    encode_images: int
    encode_batches: tuple[int, ...]
    resolution: int


GPU = Sizes(big="SiT-XL/2", small="SiT-B/2", batch=256, profile_micro_batches=(64, 128), big_micro_batch=64,
            small_micro_batch=128, train_steps=16, warm_steps=3, active_steps=3, compile=True,
            shards=dict(num=512, latent_side=32, grid=16, dim=768, pcs=32), sample_model="SiT-XL/2",
            sample_steps=250, sample_batch=64, sample_batches=1, real_arch=True, encode_images=512,
            encode_batches=(64, 256), resolution=256)
QUICK = replace(GPU, big="SiT-debug", small="SiT-debug", batch=8, profile_micro_batches=(4, 8), big_micro_batch=4,
                small_micro_batch=8, train_steps=2, warm_steps=2, active_steps=1, compile=False,
                shards=dict(num=32, latent_side=8, grid=4, dim=16, pcs=8), sample_model="SiT-debug", sample_steps=2,
                sample_batch=2, sample_batches=1, real_arch=False, encode_images=4, encode_batches=(2, 4),
                resolution=64)


@dataclass(frozen=True)
class Step:
    item: str  # a key of ITEMS: the file it is recorded in
    name: str
    config: Figures  # what it runs, recorded with its figures
    run: Callable[[Path], Figures]  # scratch directory → figures


class Suite:
    """The steps, and the inputs several steps share (built once, before the first step)."""

    def __init__(self, sizes: Sizes, scratch: Path):
        self.sizes = sizes
        self.scratch = scratch
        self._inputs: dict[str, Path | str] = {}  # name → the input, or why it could not be built

    def prepare(self, items: str) -> Figures:
        """Build the inputs the steps of `items` share: per input its seconds, or the error its steps will report."""
        from redi.benchmarks.train import make_shards

        sizes = dict(self.sizes.shards)
        num = sizes.pop("num")
        builders = {"shards": ("ab", lambda: make_shards(self.scratch / "data", num, patch_tokens=False, **sizes)),
                    "images": ("d", lambda: demo_images(self.scratch / "images", self.sizes.encode_images))}
        built: Figures = {}
        for name, (users, build) in builders.items():
            if not set(users) & set(items):
                continue
            t0 = time.perf_counter()
            try:
                self._inputs[name] = build()
                built[name] = {"seconds": time.perf_counter() - t0}
            except Exception as e:  # recorded; the steps that need other inputs still run
                self._inputs[name] = f"the suite's {name} could not be built ({type(e).__name__}: {e})"
                built[name] = {"error": self._inputs[name]}
        return built

    def input(self, name: str) -> Path:
        if not isinstance(found := self._inputs.get(name), Path):
            raise RuntimeError(found or f"the suite's {name} were not built")
        return found

    def steps(self) -> list[Step]:
        s = self.sizes
        steps = [self._profile(mb) for mb in s.profile_micro_batches]
        for model, micro_batch in ((s.big, s.big_micro_batch), (s.small, s.small_micro_batch)):
            steps += [self._throughput(model, micro_batch, compile) for compile in (True, False)]
        steps += [self._sample(interval) for interval in (GUIDANCE_INTERVAL, None)]
        steps += [self._encode(batch, first=i == 0) for i, batch in enumerate(s.encode_batches)]
        return steps

    def _profile(self, micro_batch: int) -> Step:
        s = self.sizes
        config = {"model": s.big, "method": "redi", "batch": s.batch, "micro_batch": micro_batch, "compile": s.compile,
                  "warm_steps": s.warm_steps, "active_steps": s.active_steps}

        def run(scratch: Path) -> Figures:
            from redi.benchmarks.train import profile_loop

            out = scratch / "profile"
            figures = profile_loop(self.input("shards"), scratch / "run", out, device=None, **config)
            return figures | {"kernels": (out / "kernels.txt").read_text().splitlines()}

        return Step("a", f"profile {s.big} micro-batch {micro_batch}{compiled(True, s.compile)}", config, run)

    def _throughput(self, model: str, micro_batch: int, compile: bool) -> Step:
        s = self.sizes
        config = {"model": model, "method": "redi", "batch": s.batch, "micro_batch": micro_batch,
                  "compile": compile and s.compile, "steps": s.train_steps}

        def run(scratch: Path) -> Figures:
            from redi.benchmarks.train import loop_throughput

            return loop_throughput(self.input("shards"), scratch / "run", device=None, **config)

        return Step("b", f"train {model} micro-batch {micro_batch}{compiled(compile, s.compile)}", config, run)

    def _sample(self, interval: tuple[float, float] | None) -> Step:
        s = self.sizes
        config = {"model": s.sample_model, "method": "redi", "steps": s.sample_steps, "batch": s.sample_batch,
                  "batches": s.sample_batches, "guidance": "cfg", "cfg_scale": 1.8, "interval": interval}

        def run(scratch: Path) -> Figures:
            from redi.benchmarks import sample

            return sample.run(quick=not s.real_arch, **config)  # quick: the tiny-random decoder

        where = "off" if interval is None else f"{interval[0]:g},{interval[1]:g}"
        return Step("c", f"sample {s.sample_model} {s.sample_steps} steps, CFG, interval {where}", config, run)

    def _encode(self, batch: int, first: bool) -> Step:
        s = self.sizes
        config = {"real_arch": s.real_arch, "images": s.encode_images, "batch_size": batch, "resolution": s.resolution}

        def run(scratch: Path) -> Figures:
            from redi.benchmarks import encode

            workers = None if s.real_arch else 0  # a CPU run: no worker start-up
            stage = encode.run(quick=not s.real_arch, real_arch=s.real_arch, resolution=s.resolution, workers=workers,
                               batch_size=batch, one_at_a_time=first, images=self.input("images"))
            models = encode.models_images_per_s(s.real_arch, batch, s.resolution)
            return stage | {f"models_alone_{k}": v for k, v in models.items() if k != "batch_size"}

        arch = "SD-VAE + DINOv2-B (random weights)" if s.real_arch else "tiny-random encoders"
        return Step("d", f"encode {arch}, batch {batch}", config, run)


def demo_images(root: Path, num: int, distinct: int = 64) -> Path:
    """An image folder of `num` files: `distinct` demo images and hard links to them. Encoding costs the same per
    file; writing 512 distinct ones (noisy PNGs up to 1100×540) would take half a minute of the GPU's time."""
    from redi.pipeline.demo_data import write_demo_images

    out = write_demo_images(root, min(num, distinct)).out
    files = sorted(p for p in out.rglob("*") if p.is_file())
    for k in range(num - len(files)):
        source = files[k % len(files)]
        os.link(source, source.with_name(f"{source.stem}-copy{k // len(files) + 1}{source.suffix}"))
    return out


def compiled(asked: bool, allowed: bool) -> str:
    """A step name's compile mark: a --quick run keeps the GPU run's names but compiles nothing."""
    return "" if not asked else ", compile" if allowed else ", compile (off in --quick)"


def run_step(step: Step, scratch: Path) -> Figures:
    """Run one step in its own scratch directory; its figures, or its error, with seconds and peak GPU memory."""
    cuda = torch.cuda.is_available()
    torch.compiler.reset()  # each compiled step compiles as a fresh process would (static shapes)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    record: Figures = {"name": step.name, "config": step.config}
    t0 = time.perf_counter()
    try:
        record |= {"status": "ok", "figures": step.run(scratch)}
    except Exception as e:  # recorded, and the suite goes on to the next step
        record |= {"status": "error", "error": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc().splitlines()[-12:]}
    record["seconds"] = time.perf_counter() - t0
    record["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    gc.collect()  # an out-of-memory step's tensors go before the next step starts
    if cuda:
        torch.cuda.empty_cache()
    return record


def machine() -> Figures:
    """What ran the suite, recorded in every file."""
    cuda = torch.cuda.is_available()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return {"device": torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)",
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "commit": commit or None,
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def headline(record: Figures) -> str:
    """One line per step for the summary table."""
    if record["status"] != "ok":
        return f"{record['status']}: {record.get('error', '')}"[:160]
    f = record["figures"]
    parts = []
    if "images_per_s" in f:
        parts.append(f"{f['images_per_s']:,.1f} images/s")
    if f.get("mfu") is not None:
        parts.append(f"MFU {f['mfu']:.1%}")
    if "nfe_per_image" in f:
        parts.append(f"{f['nfe_per_image']:g} NFE")
    if "gpu_idle" in f:
        idle = f", GPU idle {f['gpu_idle']:.0%}" if f["gpu_idle"] is not None else ""
        parts.append(f"{f['wall_s_per_step']:.3f} s/step{idle}")
        parts.append(", ".join(f"{k} {v:.0%}" for k, v in list(f["shares"].items())[:3]))
    if "batched_images_per_s" in f:
        parts.append(f"stage {f['batched_images_per_s']:,.1f} images/s, "
                     f"models alone {f['models_alone_both_images_per_s']:,.1f}")
    if record["peak_memory_gib"] is not None:
        parts.append(f"peak {record['peak_memory_gib']:.1f} GiB")
    return "; ".join([*parts, f"{record['seconds']:.0f} s"])


def run(quick: bool = False, out: Path | None = None, only: str = "abcd", budget: float | None = None) -> Figures:
    """Run the suite's steps of items `only` in order, writing OUT/<item>.json after each; a summary per step.

    `budget`: no step starts after this many seconds (the ones left are recorded as skipped), so a
    caller with a hard time limit still gets a clean end and every file.
    """
    from redi.common.atomic import atomic_write_json
    from redi.common.errors import UserError

    if not quick and not torch.cuda.is_available():
        raise UserError("The GPU suite needs a CUDA device; on a CPU run it with --quick (tiny sizes, same steps).")
    if unknown := set(only) - set(ITEMS):
        raise UserError(f"Unknown suite item(s) {', '.join(sorted(unknown))}; choose from {', '.join(ITEMS)}.")
    out = Path(out or os.environ.get("OUT") or REPO / "runs" / "bench-gpu")
    out.mkdir(parents=True, exist_ok=True)
    meta = machine() | {"quick": quick, "budget_s": budget}
    records: dict[str, list[Figures]] = {item: [] for item in ITEMS if item in only}
    summary: Figures = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="redi-bench-gpu-") as tmp:
        suite = Suite(QUICK if quick else GPU, Path(tmp))
        if built := suite.prepare(only):
            meta["inputs"] = built
            print(f"[{time.perf_counter() - started:6.0f} s] inputs: {built}", flush=True)
        for step in (s for s in suite.steps() if s.item in only):
            label = f"{step.item}{len(records[step.item]) + 1}"  # a1, a2, b1, …
            if budget is not None and time.perf_counter() - started > budget:
                record = {"label": label, "name": step.name, "config": step.config, "status": "skipped",
                          "error": f"the {budget:g} s budget was spent", "seconds": 0.0, "peak_memory_gib": None}
            else:
                print(f"[{time.perf_counter() - started:6.0f} s] {label}. {step.name} …", flush=True)
                scratch = Path(tmp) / label
                scratch.mkdir()
                record = {"label": label} | run_step(step, scratch)
                shutil.rmtree(scratch, ignore_errors=True)  # an XL/2 run leaves an 11 GB checkpoint; the disk is finite
            records[step.item].append(record)
            atomic_write_json(out / f"{step.item}-{ITEMS[step.item]}.json",
                              meta | {"item": ITEMS[step.item], "steps": records[step.item]})
            summary[f"{label}. {step.name}"] = headline(record)
            print(f"[{time.perf_counter() - started:6.0f} s] {label}. {headline(record)}", flush=True)
    summary["total seconds"] = time.perf_counter() - started
    summary["output"] = str(out)
    return summary


def install_missing(wheels: Path = WHEELS, target: Path | None = None) -> list[str]:
    """Install the wheels in `wheels` into `target` (put first on sys.path) when a package in NEEDED is missing or
    too old, as on a bare GPU machine whose python3 has torch but no network (default target: a folder in the temporary
    directory). Returns what was missing."""
    target = target or Path(tempfile.gettempdir()) / "redi-bench-site"
    from packaging.version import Version

    missing = [name for name, lowest in NEEDED.items()
               if importlib.util.find_spec(name) is None or Version(importlib.metadata.version(name)) < Version(lowest)]
    if not missing:
        return []
    files = sorted(str(w) for w in wheels.glob("*.whl"))
    if not files:
        raise SystemExit(f"This python3 lacks {', '.join(missing)} and {wheels} holds no wheels: "
                         f"run `make gpu-wheels` on a machine with PyPI, and bring .whl/ along.")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--upgrade", "--target", str(target), *files], check=True)
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(target), os.environ.get("PYTHONPATH"))))  # children
    importlib.invalidate_caches()
    return missing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the same steps at tiny sizes (a CPU is enough)")
    parser.add_argument("--out", type=Path, help="where the JSON files go (default: $OUT, else runs/bench-gpu)")
    parser.add_argument("--only", default="abcd", help="items to run, e.g. ab (default abcd)")
    parser.add_argument("--budget", type=float, help="seconds after which no further step starts")
    a = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model here is built locally; a GPU machine may have no network
    if missing := install_missing():
        print(f"installed from {WHEELS}: {', '.join(missing)} (and the other wheels there)", flush=True)
    from redi.common.errors import UserError

    try:
        summary = run(quick=a.quick, out=a.out, only=a.only, budget=a.budget)
    except UserError as e:
        print(e, file=sys.stderr)
        raise SystemExit(2) from None
    width = max(map(len, summary))
    print("\n".join(f"{k:<{width}}  {v:.0f}" if isinstance(v, float) else f"{k:<{width}}  {v}"
                    for k, v in summary.items()))


if __name__ == "__main__":
    main()
