"""Corruption fuzzer: every file redi reads back, damaged six ways, then each command that reads it, through the CLI.

A tiny data root, run and sample set are built once per session; each case copies them, damages one
file (delete, truncate, zero-fill, flip a byte, random bytes, valid JSON of the wrong type) and runs
one command on the copy. A case passes when the command
- succeeds with the same result as on the undamaged copy (the baseline, computed the same way: a stage
  rewrites a damaged record of its own, training resumes from the checkpoint before a damaged one), or
- refuses with one sentence (one `error:` line, no traceback) and exit code 2.
`verify` must not call a damaged file consistent (it fails, or warns); `info` must only not crash.
Anything else fails: another exception, a traceback, or a different result reported as success.

Only the CLI and the files on disk are used, so the cases survive a reorganisation of the modules.
Select with `-m fuzz`; seeded, so every run damages the same bytes.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from faults import serve_http
from redi.cli import app

pytestmark = pytest.mark.fuzz

R = ["--resolution", "32", "--workers", "0", "--batch-size", "4", "--chunk-size", "4"]
TRAIN = ["--model", "SiT-debug", "--method", "redi", "--pca-rank", "2", "--batch-size", "4", "--save-every", "1",
         "--log-every", "1", "--workers", "0"]
SAMPLE = ["--guidance", "rg", "--steps", "2", "--num", "2", "--batch-size", "2"]
RUN_PARTS = ("run", "samples")  # copied only for the commands that read them


def invoke(*args: str | Path) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def ok(*args: str | Path) -> str:
    result = invoke(*args)
    assert result.exit_code == 0, f"redi {' '.join(map(str, args))}\n{result.output}"
    return result.output


# --- what each command produces: compared with the baseline when it reports success ---

def _files(root: Path) -> dict[str, str]:
    """SHA-256 of every file under `root` (lock files aside)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


def _pca(tree: Path) -> Any:
    path = tree / "data" / "pca.safetensors"
    with safe_open(str(path), framework="numpy") as f:
        tensors = {k: f.get_tensor(k).tobytes() for k in f.keys()}  # noqa: SIM118 — safetensors' safe_open is not a dict
        meta = f.metadata()
    return tensors, meta, json.loads((tree / "data" / "pca.json").read_text())["manifest"]


def _flat(obj: Any, key: str = "") -> list[tuple[str, Any]]:
    """A checkpoint's content as (path, bytes or value) pairs."""
    if isinstance(obj, torch.Tensor):
        return [(key, (str(obj.dtype), tuple(obj.shape), obj.numpy().tobytes()))]
    if isinstance(obj, dict):
        return [item for k in sorted(obj, key=str) for item in _flat(obj[k], f"{key}/{k}")]
    if isinstance(obj, (list, tuple)):
        return [item for i, v in enumerate(obj) for item in _flat(v, f"{key}/{i}")]
    return [(key, obj)]


def _trained(tree: Path) -> Any:
    state = torch.load(tree / "run" / "checkpoints" / "step-0000003.pt", weights_only=True)
    return _flat({k: state[k] for k in ("model", "ema", "opt", "step")})


def _samples(folder: Path) -> Any:
    with np.load(folder / "samples.npz") as f:
        return f["arr_0"].tobytes(), f["arr_1"].tobytes()


@dataclass(frozen=True)
class Command:
    argv: Callable[[Path, Path], list[str | Path]]  # (tree, images) → arguments
    product: Callable[[Path], Any] | None  # what must equal the baseline on success; None: a report (see `verdict`)
    needs_run: bool = False
    prepare: Callable[[Path], None] | None = None  # applied to the copy before the damage


def _cut_shards(tree: Path) -> None:
    """The state a kill -9 during the last block of `shards` leaves behind."""
    root = tree / "data" / "shards"
    for name in ("shards.json", "errors.jsonl", "progress/000001.json"):
        (root / name).unlink()


COMMANDS: dict[str, Command] = {
    "encode": Command(lambda t, i: ["encode", i, "--data", t / "data", "--vae", "tiny-random", *R],
                      lambda t: _files(t / "data" / "latents")),
    "features": Command(lambda t, i: ["features", i, "--data", t / "data", "--encoder", "tiny-random", *R],
                        lambda t: _files(t / "data" / "features")),
    "pca": Command(lambda t, i: ["pca", "--data", t / "data"], _pca),
    "pca --force": Command(lambda t, i: ["pca", "--data", t / "data", "--force"], _pca),
    "shards": Command(lambda t, i: ["shards", "--data", t / "data", "--pcs", "4", "--format", "both", "--shard-size", "4"],
                      lambda t: _files(t / "data" / "shards")),
    "shards --force": Command(lambda t, i: ["shards", "--data", t / "data", "--pcs", "4", "--format", "both",
                                            "--shard-size", "4", "--force"], lambda t: _files(t / "data" / "shards")),
    "shards (resumed)": Command(lambda t, i: ["shards", "--data", t / "data", "--pcs", "4", "--format", "both",
                                              "--shard-size", "4"], lambda t: _files(t / "data" / "shards"),
                                prepare=_cut_shards),
    "verify": Command(lambda t, i: ["verify", t / "data"], None),
    "info": Command(lambda t, i: ["info", t / "data"], None),
    "train": Command(lambda t, i: ["train", "--shards", t / "data", "--run", t / "run", *TRAIN, "--max-steps", "3"],
                     _trained, needs_run=True),
    "train --format wds": Command(lambda t, i: ["train", "--shards", t / "data", "--run", t / "run", *TRAIN,
                                                "--max-steps", "3", "--format", "wds"], _trained, needs_run=True),
    "sample (rerun)": Command(lambda t, i: ["sample", "--run", t / "run", *SAMPLE, "--out", t / "samples"],
                              lambda t: (_samples(t / "samples"), _files(t / "samples" / "images")), needs_run=True),
    "sample (new)": Command(lambda t, i: ["sample", "--run", t / "run", *SAMPLE, "--out", t / "samples2"],
                            lambda t: _samples(t / "samples2"), needs_run=True),
    "verify RUN": Command(lambda t, i: ["verify", t / "run"], None, needs_run=True),
    "info RUN": Command(lambda t, i: ["info", t / "run"], None, needs_run=True),
}
REPORTS = ("info", "info RUN")  # displays: they must not crash, nothing more
VERDICTS = ("verify", "verify RUN")  # must not call damaged files consistent

# Every file redi reads back, and the commands that read it.
FILES: dict[str, tuple[str, tuple[str, ...]]] = {
    "latents manifest.json": ("data/latents/manifest.json", ("encode", "shards", "verify", "info")),
    "features manifest.json": ("data/features/manifest.json", ("features", "pca", "shards", "verify")),
    "latents ledger": ("data/latents/progress/000000.json", ("encode", "shards --force", "verify", "info")),
    "features ledger": ("data/features/progress/000000.json", ("features", "pca --force", "shards --force", "verify")),
    "latents errors.jsonl": ("data/latents/errors.jsonl", ("encode", "shards", "verify", "info")),
    "latents keys.json": ("data/latents/keys.json", ("shards", "verify")),
    "latents labels chunk": ("data/latents/store.zarr/labels/c/0", ("shards --force", "verify")),
    "latents moments chunk": ("data/latents/store.zarr/moments/c/0/0/0/0", ("shards --force", "verify")),
    "features patch chunk": ("data/features/store.zarr/patch/c/0/0/0", ("pca --force", "shards --force", "verify")),
    "latents zarr.json": ("data/latents/store.zarr/moments/zarr.json", ("shards", "verify")),
    "pca.safetensors": ("data/pca.safetensors", ("pca", "shards", "verify", "info")),
    "pca.json": ("data/pca.json", ("pca", "verify")),
    "shards manifest.json": ("data/shards/manifest.json", ("shards",)),
    "shards ledger": ("data/shards/progress/000000.json", ("shards", "shards (resumed)", "verify")),
    "shards block checksums": ("data/shards/checksums/000000.json", ("shards (resumed)",)),
    "shards.json": ("data/shards/shards.json", ("shards", "train", "verify", "info")),
    "shards keys.json": ("data/shards/keys.json", ("train", "verify")),
    "shards zarr chunk": ("data/shards/samples.zarr/moments/c/0/0/0/0", ("train", "verify")),
    "shards tar": ("data/shards/wds/shard-000000.tar", ("train --format wds", "verify")),
    "run config.json": ("run/config.json", ("train", "verify RUN", "info RUN")),
    "metrics.jsonl": ("run/metrics.jsonl", ("train", "info RUN")),
    "checkpoint": ("run/checkpoints/step-0000002.pt", ("train", "sample (new)", "verify RUN", "info RUN")),
    "sample.json": ("samples/sample.json", ("sample (rerun)",)),
}


# --- the six kinds of damage ---

def _seed(*words: str) -> int:
    return zlib.crc32("/".join(words).encode())


def _wrong_json(data: bytes, path: Path, rng: np.random.Generator) -> bytes:
    """Valid JSON of the wrong type: a list where an object is expected and the other way round."""
    if path.suffix == ".jsonl":
        return b'[1]\n"x"\n5\n'
    try:
        was = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        was = None
    return b'{"1": 1}' if isinstance(was, list) else b"[1]"


MUTATIONS: dict[str, Callable[[bytes, Path, np.random.Generator], bytes | None]] = {
    "delete": lambda data, path, rng: None,
    "truncate": lambda data, path, rng: data[: len(data) // 2],
    "zero-fill": lambda data, path, rng: bytes(len(data)),
    "flip a byte": lambda data, path, rng: (lambda at: data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:])(
        int(rng.integers(len(data)))),
    "random bytes": lambda data, path, rng: rng.bytes(len(data)),
    "wrong-type JSON": _wrong_json,
}


def damage(path: Path, mutation: str, kind: str) -> bool:
    """Apply `mutation` to `path`; True when the file's content really changed."""
    data = path.read_bytes()
    new = MUTATIONS[mutation](data, path, np.random.default_rng(_seed(kind, mutation)))
    if new is None:
        path.unlink()
        return True
    path.write_bytes(new)
    return new != data


# --- the tree, the baselines, the verdict ---

@dataclass
class Built:
    root: Path  # holds images/, data/, run/, samples/
    baselines: dict[str, Any]


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    root = tmp_path_factory.mktemp("fuzz")
    images, data = root / "images", root / "data"
    ok("demo-data", "--out", images, "--num", "8")
    (images / "circle" / "circle_broken.png").write_bytes(b"")  # an unreadable image: errors.jsonl lists it
    ok("encode", images, "--data", data, "--vae", "tiny-random", "--with-features", "--encoder", "tiny-random", *R)
    ok("pca", "--data", data)
    ok("shards", "--data", data, "--pcs", "4", "--format", "both", "--shard-size", "4")
    ok("train", "--shards", data, "--run", root / "run", *TRAIN, "--max-steps", "2")
    ok("sample", "--run", root / "run", *SAMPLE, "--out", root / "samples")
    return Built(root, {})


def copy_tree(built: Built, dest: Path, command: Command) -> Path:
    shutil.copytree(built.root / "data", dest / "data")
    if command.needs_run:
        for part in RUN_PARTS:
            shutil.copytree(built.root / part, dest / part)
    if command.prepare is not None:
        command.prepare(dest)
    return dest


def baseline(built: Built, name: str, tmp: Path) -> Any:
    """The command's product on an undamaged copy (computed once per session)."""
    command = COMMANDS[name]
    if name not in built.baselines:
        tree = copy_tree(built, tmp / "baseline", command)
        ok(*command.argv(tree, built.root / "images"))
        built.baselines[name] = command.product(tree) if command.product else None
    return built.baselines[name]


def refused(output: str) -> bool:
    """One `error:` sentence and no traceback."""
    return output.count("error:") == 1 and "Traceback" not in output


def verdict(built: Built, kind: str, mutation: str, name: str, tmp: Path) -> str | None:
    """None when the case passes, else what went wrong."""
    command = COMMANDS[name]
    expected = baseline(built, name, tmp) if command.product else None
    tree = copy_tree(built, tmp / "case", command)
    target = tree / FILES[kind][0]
    changed = damage(target, mutation, kind)
    return judge(built, name, tree, changed, expected)


def judge(built: Built, name: str, tree: Path, changed: bool, expected: Any, images: Path | None = None) -> str | None:
    """Run command `name` on the damaged `tree`: None when it refuses in one sentence or does no harm, else what went
    wrong (`expected`: its product on the undamaged tree; `images`: the image source, by default the built one)."""
    command = COMMANDS[name]
    result = invoke(*command.argv(tree, images or built.root / "images"))
    output = result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return f"{type(result.exception).__name__}: {result.exception}\n{output[-1500:]}"
    if result.exit_code != 0:
        return None if result.exit_code == 2 and refused(output) else f"exit {result.exit_code}, not one sentence:\n{output[-1500:]}"
    if name in REPORTS:
        return None
    if name in VERDICTS:
        return None if not changed or "warning" in output else f"called damaged data consistent:\n{output[-1500:]}"
    try:
        got = command.product(tree)  # type: ignore[misc]
    except Exception as e:  # an output the command claims but cannot be read back
        got = f"unreadable product: {type(e).__name__}: {e}"
    if got == expected:
        return None
    return f"succeeded with a different result:\n{output[-1500:]}"


CASES = [(kind, mutation, name) for kind, (_, names) in FILES.items() for name in names for mutation in MUTATIONS]


@pytest.mark.parametrize(("kind", "mutation", "command"), CASES, ids=[f"{k}|{m}|{c}" for k, m, c in CASES])
def test_damaged_file_is_refused_or_harmless(built: Built, kind: str, mutation: str, command: str, tmp_path: Path) -> None:
    problem = verdict(built, kind, mutation, command, tmp_path)
    assert problem is None, f"{command} with {kind} ({mutation}): {problem}"


def test_every_listed_file_exists_in_the_built_tree(built: Built) -> None:
    """The fuzzer damages real files: a path that no longer exists would make its cases vacuous."""
    missing = [path for path, _ in FILES.values() if not (built.root / path).is_file()]
    assert not missing and len(CASES) == 6 * sum(len(names) for _, names in FILES.values())


# --- the repros of issue 12, with the sentences they must give ---

def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _said(result: Any) -> str:
    return " ".join(result.output.split())


def test_shards_refuses_a_flipped_input_byte_until_verify_repair_and_a_rerun_rewrite_it(built: Built, tmp_path: Path) -> None:
    tree = copy_tree(built, tmp_path, COMMANDS["shards --force"])
    chunk = tree / "data" / "latents" / "store.zarr" / "moments" / "c" / "0" / "0" / "0" / "0"
    _flip(chunk, chunk.stat().st_size // 2)
    result = invoke(*COMMANDS["shards --force"].argv(tree, built.root / "images"))
    said = _said(result)
    assert result.exit_code == 2 and "moments/c/0/0/0/0 (chunk 0) differs" in said and "--repair" in said, said
    assert invoke("verify", tree / "data", "--repair").exit_code == 2  # forgets latents chunk 0
    ok(*COMMANDS["encode"].argv(tree, built.root / "images"))  # writes only that chunk again
    ok(*COMMANDS["shards --force"].argv(tree, built.root / "images"))
    assert _files(tree / "data" / "shards") == _files(built.root / "data" / "shards")


def test_a_bit_flipped_checkpoint_is_refused_by_sample_and_named_by_verify(built: Built, tmp_path: Path) -> None:
    tree = copy_tree(built, tmp_path, COMMANDS["sample (new)"])
    newest = tree / "run" / "checkpoints" / "step-0000002.pt"
    _flip(newest, newest.stat().st_size // 2)  # inside the tensor data: torch.load reads it without complaint
    result = invoke(*COMMANDS["sample (new)"].argv(tree, built.root / "images"))
    assert result.exit_code == 2 and "differs from the SHA-256 recorded when it was saved" in _said(result), result.output
    result = invoke("verify", tree / "run")
    assert result.exit_code == 2 and "FAILED" in result.output and "differs from the SHA-256" in _said(result)
    assert "step-0000002.pt" in "".join(result.output.split())  # the problem names the checkpoint


def test_damaged_pca_tensor_data_fails_verify_and_is_refused_by_shards(built: Built, tmp_path: Path) -> None:
    tree = copy_tree(built, tmp_path, COMMANDS["verify"])
    pca = tree / "data" / "pca.safetensors"
    _flip(pca, pca.stat().st_size - 100)  # a component value: the file still loads
    for argv in (COMMANDS["verify"].argv(tree, built.root / "images"), COMMANDS["shards --force"].argv(tree, built.root)):
        result = invoke(*argv)
        assert result.exit_code == 2 and "differs from the SHA-256 recorded in pca.json" in _said(result), result.output


# --- a damaged pca.safetensors never trains and never passes a check (issue 23): at a data root, at a root that
# `redi publish` wrote (served over loopback HTTP), and in a run directory, with each of the six damages ---

PCA_PLACES = {"data root": "data/pca.safetensors", "published root": "published/pca.safetensors",
              "run": "run/pca.safetensors"}
PCA_CASES = [(place, mutation) for place in PCA_PLACES for mutation in MUTATIONS]


@pytest.fixture(scope="session")
def published(built: Built) -> Path:
    """The built data root as `redi publish` copies it (shards/ and pca.safetensors), once per session."""
    dest = built.root.parent / f"{built.root.name}-published"
    if not (dest / "shards" / "shards.json").exists():
        ok("publish", built.root / "data", dest)
    return dest


def _pca_commands(tree: Path, base: str, place: str) -> dict[str, list[str | Path]]:
    """verify of the damaged place, and a training run that would read or copy the file."""
    if place == "published root":
        return {"verify": ["verify", f"{base}/published"],
                "train": ["train", "--shards", f"{base}/published", "--run", tree / "new-run", *TRAIN, "--max-steps", "1",
                          "--format", "wds"]}
    run_parts = ["--run", tree / "run", *TRAIN, "--max-steps", "3"]
    return {"verify": ["verify", tree / ("run" if place == "run" else "data")],
            "train": ["train", "--shards", tree / "data", *run_parts]}


def _pca_verdict(tree: Path, command: str, mutation: str, place: str, result: Any, original: bytes) -> str | None:
    """None when the command refused in one sentence, or succeeded without reading the damage as good."""
    output = result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return f"{type(result.exception).__name__}: {result.exception}\n{output[-1500:]}"
    if result.exit_code != 0:
        return None if result.exit_code == 2 and refused(output) else f"exit {result.exit_code}:\n{output[-1500:]}"
    if command == "verify":  # consistent only where the file is gone: nothing damaged is left to read
        gone = mutation == "delete" and ("warning" in output or "absent" in output)
        return None if gone else f"verify called a damaged PCA consistent:\n{output[-1500:]}"
    if mutation != "delete" and place != "run":  # a run's damaged copy is replaced by its shards' own
        return f"trained with a damaged PCA beside the shards:\n{output[-1500:]}"
    run = tree / ("new-run" if place == "published root" else "run")
    copy = run / "pca.safetensors"
    if copy.exists() and copy.read_bytes() != original:
        return "the run keeps a PCA other than its shards' own"
    check = invoke("verify", run)
    return None if check.exit_code == 0 else f"verify RUN after training:\n{check.output[-1500:]}"


@pytest.mark.parametrize(("place", "mutation"), PCA_CASES, ids=[f"{p}|{m}" for p, m in PCA_CASES])
def test_a_damaged_pca_file_never_trains_nor_passes_verify(built: Built, published: Path, place: str, mutation: str,
                                                           tmp_path: Path) -> None:
    tree = copy_tree(built, tmp_path, COMMANDS["train"])
    shutil.copytree(published, tree / "published")
    original = (built.root / "data" / "pca.safetensors").read_bytes()
    assert damage(tree / PCA_PLACES[place], mutation, f"pca {place}")
    with serve_http(tree) as (base, _):
        for command, argv in _pca_commands(tree, base, place).items():
            problem = _pca_verdict(tree, command, mutation, place, invoke(*argv), original)
            assert problem is None, f"{command} with the {place}'s pca.safetensors ({mutation}): {problem}"


def test_a_flipped_pca_byte_is_named_with_its_fix_wherever_it_is(built: Built, published: Path, tmp_path: Path) -> None:
    tree = copy_tree(built, tmp_path, COMMANDS["train"])
    shutil.copytree(published, tree / "published")
    for place in PCA_PLACES:
        pca = tree / PCA_PLACES[place]
        _flip(pca, pca.stat().st_size - 100)  # a component value: the file still loads
    with serve_http(tree) as (base, _):
        said = {place: {command: "".join(invoke(*argv).output.split())
                        for command, argv in _pca_commands(tree, base, place).items()} for place in PCA_PLACES}

    def says(place: str, command: str, text: str) -> bool:  # wherever the console wrapped its lines
        return "".join(text.split()) in said[place][command]

    data, run = tree / "data", tree / "run"
    for command in ("verify", "train"):
        assert says("data root", command, f"{data / 'pca.safetensors'} differs from the SHA-256 recorded in pca.json")
        assert says("published root", command, f"{base}/published/pca.safetensors differs from the SHA-256 recorded in "
                                               f"{base}/published/shards/shards.json")
        assert says("published root", command, f"(`redi publish DATA {base}/published`)")
    assert not (tree / "new-run" / "pca.safetensors").exists()
    assert says("run", "verify", f"{run / 'pca.safetensors'} differs from the SHA-256 recorded in {run / 'config.json'}")
    assert says("run", "verify", "FAILED") and says("run", "verify", "rerun the run's `redi train` command")


# --- wrong-type fields (issue 23): each field of every JSON file redi reads back, given a value of another type ---
#
# A JSON file can be valid JSON of the right shape and still hold a field of the wrong type ("params": 1.5,
# "num_classes": "8"); every reader checks its file against the record of its format (common/schema.py) first, so a
# case passes as above: one sentence and exit 2, or the result of the undamaged file (a stage rewrites a record of its
# own), and `verify` never calls it consistent. Each field is replaced once, by a value of another JSON type, and run
# with one of the commands that read the file (in turn, so every command meets several fields of each file).

COMMANDS["train --dry-run"] = Command(lambda t, i: ["train", "--shards", t / "data", "--run", t / "run2", *TRAIN,
                                                    "--max-steps", "3", "--dry-run"], None)
COMMANDS["encode (dataset.json)"] = Command(lambda t, i: ["encode", t / "images", "--data", t / "data", "--vae",
                                                          "tiny-random", *R], lambda t: _files(t / "data" / "latents"))
REPORTS += ("train --dry-run",)  # prints the resolved plan: it must refuse or not crash

JSON_FILES: dict[str, tuple[str, ...]] = {  # every JSON file redi reads back → the commands that read it
    "data/latents/manifest.json": ("encode", "shards", "verify", "info"),
    "data/features/manifest.json": ("features", "pca", "shards", "verify"),
    "data/latents/progress/000000.json": ("encode", "shards --force", "verify"),
    "data/features/progress/000000.json": ("features", "pca --force", "shards --force", "verify"),
    "data/latents/errors.jsonl": ("encode", "shards", "verify"),
    "data/latents/keys.json": ("shards", "verify"),
    "data/features/keys.json": ("shards",),
    "data/pca.json": ("pca", "verify", "shards", "info"),
    "data/shards/manifest.json": ("shards",),
    "data/shards/progress/000000.json": ("shards", "verify"),
    "data/shards/checksums/000000.json": ("shards (resumed)",),
    "data/.shards.stamp.json": ("shards",),
    "data/shards/shards.json": ("train --dry-run", "verify", "info", "shards", "train"),
    "data/shards/keys.json": ("train", "verify"),
    "run/config.json": ("train", "verify RUN", "info RUN"),
    "run/metrics.jsonl": ("train", "info RUN"),
    "samples/sample.json": ("sample (rerun)",),
    "images/dataset.json": ("encode (dataset.json)",),
}
WRONG = {dict: (1.5, "x", [1], True, 0), list: (1.5, "x", {"k": 1}, True), str: (0, 1.5, [1], {"k": 1}, True),
         bool: ("x", 1.5, 0, [1]), int: ("x", 1.5, True, [1], {"k": 1}), float: ("x", True, [1], {"k": 1}),
         type(None): ({"k": 1},)}  # by the type a field holds, values of other JSON types (null: an object)
SMALL_OBJECT = 12  # objects of more keys (a map of checksums, a config's every flag) get three cases, not one per key


def _field_paths(value: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Where to put a wrong value: each key of an object (the first three of a large one below the top), the first
    item of a list, down to three levels; a .jsonl file's first line."""
    if len(at) == 3:
        return []
    if isinstance(value, dict):
        keys = sorted(value)
        chosen = keys if not at or len(keys) <= SMALL_OBJECT else keys[:3]
        return [path for k in chosen for path in [(*at, k), *_field_paths(value[k], (*at, k))]]
    if isinstance(value, list) and value:
        return [(*at, 0), *_field_paths(value[0], (*at, 0))]
    return []


def _dataset_json(images: Path) -> bytes:
    """edm2's dataset.json with the labels ImageFolder gives these images (the encode baseline's)."""
    from redi.pipeline.images import open_source

    source = open_source(images)
    return json.dumps({"labels": [[e.relpath, e.label] for e in source.entries]}).encode()


def _read(path: str, built: Built) -> list[Any]:
    """The file's JSON values (one per line of a .jsonl)."""
    data = _dataset_json(built.root / "images") if path == "images/dataset.json" else (built.root / path).read_bytes()
    return [json.loads(line) for line in data.splitlines() if line] if path.endswith(".jsonl") else [json.loads(data)]


def _wrong_value(value: Any, where: str) -> Any:
    options = WRONG[type(value)]
    return options[_seed(where) % len(options)]


def _put(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    """`value` with the item at `path` replaced by `new` (a copy)."""
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _put(value[path[0]], path[1:], new)
    return copy


WRONG_TYPE_CASES = [(path, command) for path, commands in JSON_FILES.items() for command in commands]


@pytest.mark.parametrize(("path", "command"), WRONG_TYPE_CASES, ids=[f"{p}|{c}" for p, c in WRONG_TYPE_CASES])
def test_a_wrong_type_field_is_refused_or_harmless(built: Built, path: str, command: str, tmp_path: Path) -> None:
    """The fields of `path` (as this session's pipeline wrote it) that fall to `command`: each of the n commands of the
    file takes every n-th field, so together they cover each field once."""
    commands, fields = JSON_FILES[path], _field_paths(_read(path, built)[0])
    if len(fields) >= len(commands):  # a file of fewer fields (keys.json: one list) meets every command
        fields = fields[commands.index(command)::len(commands)]
    problems = [f"{'.'.join(map(str, field))}: {problem}" for i, field in enumerate(fields)
                if (problem := field_verdict(built, path, field, command, tmp_path / str(i))) is not None]
    assert not problems, f"{command} with a wrong-type field of {path} ({len(problems)} of {len(fields)}):\n" + \
        "\n".join(problems)


def field_verdict(built: Built, path: str, field: tuple[Any, ...], name: str, tmp: Path) -> str | None:
    """Put a value of another type at `field` of the file `path` (of its first line, for a .jsonl) and judge `name`."""
    command = COMMANDS[name]
    reference = "encode" if path == "images/dataset.json" else name  # dataset.json gives the labels encode had
    expected = baseline(built, reference, tmp) if command.product else None
    tree = copy_tree(built, tmp / "case", command)
    images = None
    if path == "images/dataset.json":
        images = Path(shutil.copytree(built.root / "images", tree / "images"))
    values = _read(path, built)
    values[0] = _put(values[0], field, _wrong_value(_get(values[0], field), f"{path}/{field}"))
    text = "".join(json.dumps(v) + "\n" for v in values) if path.endswith(".jsonl") else json.dumps(values[0])
    (tree / path).write_text(text)
    return judge(built, name, tree, True, expected, images)


def _get(value: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        value = value[key]
    return value


def _edit_json(path: Path, **fields: Any) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | fields))


@pytest.mark.parametrize(("path", "fields", "name", "said"), [
    ("data/latents/manifest.json", {"params": 1.5}, "verify", "latents/manifest.jsonisdamaged:itsfield`params`is1.5,notanobject"),
    ("data/latents/manifest.json", {"params": 1.5}, "shards", "latents/manifest.jsonisdamaged:itsfield`params`is1.5,notanobject"),
    ("data/latents/manifest.json", {"source": 0}, "shards", "latents/manifest.jsonisdamaged:itsfield`source`is0,notanobject"),
    ("data/features/manifest.json", {"params": True}, "verify", "features/manifest.jsonisdamaged:itsfield`params`istrue"),
    ("data/shards/shards.json", {"num_classes": "8"}, "train --dry-run", "shards.jsonisdamaged:itsfield`num_classes`is\"8\",notaninteger"),
])
def test_the_wrong_types_of_issue_23_are_one_sentence_naming_the_field(built: Built, path: str, fields: dict[str, Any],
                                                                       name: str, said: str, tmp_path: Path) -> None:
    """Were AttributeError (verify, shards), AttributeError (shards) and TypeError (train --dry-run) tracebacks."""
    tree = copy_tree(built, tmp_path, COMMANDS[name])
    _edit_json(tree / path, **fields)
    result = invoke(*COMMANDS[name].argv(tree, built.root / "images"))
    assert result.exit_code == 2 and refused(result.output) and said in "".join(result.output.split()), result.output


def test_info_says_what_is_wrong_with_a_stage_not_that_it_is_missing(built: Built, tmp_path: Path) -> None:
    """An encoder identity that is a string was a traceback of `redi info`; a features/ without its manifest was
    reported "missing"."""
    tree = copy_tree(built, tmp_path, COMMANDS["info"])
    _edit_json(tree / "data" / "latents" / "manifest.json", encoder="tiny-random")
    (tree / "data" / "features" / "manifest.json").unlink()
    result = invoke("info", tree / "data", "--json")
    assert result.exit_code == 0, result.output
    parts = {p["name"]: p for p in json.loads(result.stdout)["parts"]}
    latents, features = parts["latents/"], parts["features/"]
    assert latents["status"] == "unreadable (manifest.json is damaged)"
    assert "its field `encoder` is \"tiny-random\", not an object" in latents["contents"]["problem"]
    assert features["status"] == "unreadable (no manifest.json)" and "no manifest.json" in features["contents"]["problem"]
    assert parts["shards/"]["status"] == "complete"
