"""Fault injection for the reliability tests, through the CLI and the files on disk only: a small tmpfs filled
to leave N bytes, signals at seeded points to a `redi` process or its whole process group, a loopback HTTP
server that drops or stalls responses, and the comparison of what a faulted-then-rerun command left with what
an uninterrupted one wrote."""
from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from redi.cli import app
from redi.common.atomic import read_jsonl

REPO = Path(__file__).resolve().parents[1]
TEMPORARY = re.compile(r"\.tmp$|\.partial$")  # what an interrupted atomic write (ours or zarr's) leaves
LOCKS = re.compile(r"^\.(.+\.)?(lock|stamp\.json)$")  # lock files (empty) and stamps (caches of stats): not compared

# The tiny pipeline every fault is injected into: 16 images of 64², one committed chunk or block per image.
IMAGES = 16
TINY = ["--resolution", 64, "--batch-size", 1, "--chunk-size", 1]
ENCODE = ["--vae", "tiny-random", "--with-features", "--encoder", "tiny-random", *TINY]
SHARDS = ["--pcs", 4, "--shard-size", 1, "--format", "both"]
STEPS, NUM = 12, 12  # training steps (one metrics line each), images sampled
TIMING = {"steps_per_s", "images_per_s", "mfu"}  # metrics that are wall-clock measurements


def redi(*args: object) -> tuple[int, str]:
    """Run the CLI in this process: (exit code, output with whitespace collapsed, and the traceback of a crash)."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    crash = result.exception if not isinstance(result.exception, (SystemExit, type(None))) else None
    output = result.output + ("".join(traceback.format_exception(crash)) if crash is not None else "")
    return result.exit_code, " ".join(output.split())


def build_pipeline(root: Path) -> dict[str, Path]:
    """Uninterrupted outputs of every command (data root, run, samples), each moved aside (PATH.ref) from the path
    that the faulted runs of the same command then write."""
    from redi.pipeline.demo_data import write_demo_images

    images = write_demo_images(root / "images", IMAGES).out
    data = root / "data"
    for args in (["encode", images, "--data", data, *ENCODE, "--workers", 0], ["pca", "--data", data],
                 ["shards", "--data", data, *SHARDS]):
        code, out = redi(*args)
        assert code == 0, out
    ref_data = move_aside(data)
    code, out = redi("train", *train_args(ref_data, root / "run"))
    assert code == 0, out
    ref_run = move_aside(root / "run")
    code, out = redi("sample", *sample_args(ref_run, root / "samples"))
    assert code == 0, out
    return {"root": root, "images": images, "data": data, "ref_data": ref_data, "run": root / "run", "ref_run": ref_run,
            "samples": root / "samples", "ref_samples": move_aside(root / "samples")}


def train_args(shards: Path, run: Path) -> list[object]:
    return ["--shards", shards, "--run", run, "--model", "SiT-debug", "--method", "redi", "--pca-rank", 4, "--batch-size", 4,
            "--max-steps", STEPS, "--log-every", 1, "--save-every", 4, "--seed", 3, "--lr", "1e-3", "--device", "cpu",
            "--workers", 2]


def sample_args(ref_run: Path, out: Path) -> list[object]:
    ckpt = ref_run / "checkpoints" / f"step-{STEPS:07d}.pt"  # the same file for every sampler run
    return ["--ckpt", ckpt, "--out", out, "--num", NUM, "--steps", 6, "--batch-size", 1, "--device", "cpu"]


# ----------------------------------------------------------------------------------------------- files


def digest_tree(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `root` but lock files (a single file: {name: sha256})."""
    root = Path(root)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and not LOCKS.match(p.name))
    return {str(p.relative_to(root.parent if root.is_file() else root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


def temporaries(root: Path) -> list[str]:
    """Temporary files of interrupted writes left under `root`."""
    return sorted(str(p) for p in Path(root).rglob("*") if TEMPORARY.search(p.name))


def same_value(a: Any, b: Any, where: str = "") -> None:
    """Assert two loaded checkpoints (nested dicts of tensors and plain values) are bitwise equal."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where} keys differ"
        for key in a:
            same_value(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where} differs"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same_value(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def same_metrics(run: Path, ref_run: Path) -> None:
    """metrics.jsonl of two runs hold the same rows, but for the wall-clock figures."""
    rows = [[{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(r / "metrics.jsonl")] for r in (run, ref_run)]
    assert rows[0] == rows[1]


def same_pca(data: Path, ref: Path) -> None:
    """DATA's pca.safetensors, its record pca.json and its plot are REF's, byte for byte."""
    for name in ("pca.safetensors", "pca.json", "pca_explained_variance.png"):
        assert digest_tree(data / name) == digest_tree(ref / name), name


def move_aside(path: Path) -> Path:
    """Rename `path` to PATH.ref and return that: the faulted run then writes at the very same path (outputs
    record their paths), and what it leaves is compared with the reference byte for byte."""
    ref = path.with_name(path.name + ".ref")
    path.rename(ref)
    return ref


def copy_in(ref: Path, path: Path, names: tuple[str, ...]) -> None:
    """Fresh `path` holding copies of `names` from `ref` (a faulted command's inputs)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    for name in names:
        (shutil.copytree if (ref / name).is_dir() else shutil.copy2)(ref / name, path / name)


# ----------------------------------------------------------------------------------------------- disks


@contextmanager
def small_disk(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `where` for the duration (skips the test where mounting is not permitted)."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def free_bytes(disk: Path) -> int:
    st = os.statvfs(disk)
    return st.f_bavail * st.f_frsize


@contextmanager
def filled(disk: Path, leave: int) -> Iterator[None]:
    """Fill `disk` with one file so that `leave` bytes stay free; removed on exit (the space comes back)."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, max(0, free_bytes(disk) - leave))
    try:
        yield
    finally:
        filler.unlink()


# ----------------------------------------------------------------------------------------------- signals


@dataclass(frozen=True)
class StopPoint:
    """Where a launched `redi` stops itself (SIGSTOP) for the test to signal it: before a file event under `root` (a
    file opened for writing, or a rename), the one `skip` events after the first at which `target` units are
    committed. Units are the files matching `files` (globs under `root`) plus the lines of `lines` (files under
    `root`). The stopped process is the test's readiness mark: it is mid-work, it cannot end before the signal
    whatever the machine's load, and what it has written is exactly what precedes that event."""

    root: Path
    target: int = 0
    skip: int = 0
    files: tuple[str, ...] = ()
    lines: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"root": str(self.root), "target": self.target, "skip": self.skip, "files": list(self.files),
                "lines": list(self.lines)}


NEVER = 10 ** 9  # a `skip` no run reaches: the run ends and its log says how many file events it made
EVENTS = re.compile(r"faults: (\d+) file events under ")


class Launcher:
    """Starts `redi ARGS` processes fast: a helper Python imports the CLI and every command's modules once, then
    forks one child per run, which runs the `redi` entry point in its own session (so a group kill reaches it and
    its DataLoader workers, and nothing else) with its output in a log file. A fresh `redi` pays 10-20 s of
    imports on a loaded 2-core machine; a fork, nothing, so each command can be interrupted at several points."""

    def __init__(self) -> None:
        env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
        self.proc = subprocess.Popen([sys.executable, "-c", "import faults; faults.serve()"], cwd=REPO, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def start(self, args: list[object], log: Path, point: StopPoint | None = None) -> int:
        """Fork a child running `redi ARGS` (output to `log`), stopping itself at `point`; its pid."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        request = {"args": [str(a) for a in args], "log": str(log), "point": point and point.to_json()}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return int(json.loads(self.proc.stdout.readline())["pid"])

    def wait(self) -> int:
        """The exit code of the child started last (−N when signal N ended it), once it has ended."""
        assert self.proc.stdout is not None
        return int(json.loads(self.proc.stdout.readline())["code"])

    def close(self) -> None:
        self.proc.communicate(timeout=60)


def serve() -> None:
    """The launcher's helper process: one JSON request per line, answered with the child's pid, then its exit code."""
    # the CLI and the modules the commands import lazily, paid once here
    import redi.cli
    import redi.pipeline.encode
    import redi.pipeline.pca
    import redi.pipeline.shards
    import redi.sampler.sample
    import redi.trainer.train  # noqa: F401

    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os.setsid()
            out = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            os.dup2(out, 1)
            os.dup2(out, 2)
            run_redi(request["args"], request["point"])
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)


def run_redi(args: list[str], point: dict[str, Any] | None) -> None:
    """What the `redi` console script does, stopping at `point` (StopPoint.to_json) if given; never returns."""
    code = 1
    try:
        events = stop_at(point) if point else None
        from redi.cli import app

        try:
            app(args=args, prog_name="redi")
            code = 0
        finally:
            if events is not None and events["armed"]:
                print(f"faults: {events['count']} file events under {point['root']}; the stop point was not reached",  # type: ignore[index]
                      file=sys.stderr)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def stop_at(point: dict[str, Any]) -> dict[str, Any]:
    """Install the audit hook that stops this process at `point` (StopPoint.to_json): it says where in its log, then
    waits for the test's signal (SIGCONT: it goes on, unhooked). Returns its live count of file events."""
    root = os.path.realpath(point["root"])
    pid, state, inside = os.getpid(), {"count": 0, "since": -1, "armed": True}, threading.local()

    def committed() -> int:
        files = sum(len(glob.glob(os.path.join(root, pattern))) for pattern in point["files"])
        lines = 0
        for name in point["lines"]:
            with contextlib.suppress(FileNotFoundError), open(os.path.join(root, name), "rb") as f:
                lines += f.read().count(b"\n")
        return files + lines

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if not state["armed"] or os.getpid() != pid or getattr(inside, "now", False):
            return  # a DataLoader worker (forked with the hook), or the hook's own reads
        path = _written_path(event, args)
        if path is None or not os.path.abspath(path).startswith(root + os.sep):
            return
        inside.now = True
        try:
            state["count"] += 1
            if state["since"] < 0 and committed() >= point["target"]:
                state["since"] = 0
            elif state["since"] >= 0:
                state["since"] += 1
            if state["since"] == point["skip"]:
                state["armed"] = False
                print(f"faults: stopped before {event} {path} ({point['target']} units committed)", file=sys.stderr, flush=True)
                os.kill(pid, signal.SIGSTOP)
        finally:
            inside.now = False

    sys.addaudithook(hook)
    return state


def _written_path(event: str, args: tuple[Any, ...]) -> str | None:
    """The file an audit event writes: a file opened for writing (builtins.open or os.open), a rename's target."""
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        mode, flags = args[1], args[2]
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (mode is None and flags & (os.O_WRONLY | os.O_RDWR)):
            return os.fsdecode(args[0])
    if event == "os.rename":
        return os.fsdecode(args[1])
    return None


def stopped(pid: int) -> bool:
    """True while process `pid` is stopped (SIGSTOP): the state field of /proc/PID/stat."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (FileNotFoundError, ProcessLookupError):
        return False


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def signal_when_stopped(pid: int, sig: signal.Signals, group: bool, log: Path, timeout: float = 300.0) -> None:
    """Wait until `pid` has stopped itself at its StopPoint, then send `sig` to it (or to its whole process group,
    DataLoader workers included) and let it go on. No race: it cannot move on before the signal."""
    deadline = time.monotonic() + timeout
    while not stopped(pid):  # polled, but nothing is timed: the process waits for us there
        if not running(pid) or time.monotonic() > deadline:
            raise AssertionError(f"the process never reached its stop point:\n{log.read_text()[-3000:]}")
        time.sleep(0.01)
    kill = os.killpg if group else os.kill
    with contextlib.suppress(ProcessLookupError):
        kill(pid, sig)
        kill(pid, signal.SIGCONT)  # a pending SIGTERM is handled as it resumes; SIGKILL needs no resume


def interrupt(launcher: Launcher, args: list[object], log: Path, sig: signal.Signals, group: bool,
              point: StopPoint) -> tuple[int, str]:
    """Start `redi ARGS`, which stops itself at `point`; send it `sig` there; (exit code, output)."""
    pid = launcher.start(args, log, point)
    try:
        signal_when_stopped(pid, sig, group, log)
    finally:
        code = launcher.wait()
    return code, log.read_text()


def file_events(launcher: Launcher, args: list[object], log: Path, root: Path) -> int:
    """How many file events (files opened for writing, renames) an uninterrupted `redi ARGS` makes under `root`."""
    pid = launcher.start(args, log, StopPoint(root, skip=NEVER))
    assert pid > 0 and launcher.wait() == 0, log.read_text()[-3000:]
    return int(EVENTS.findall(log.read_text())[-1])


def count(folder: Path, pattern: str = "*") -> int:
    return sum(1 for _ in Path(folder).glob(pattern)) if Path(folder).is_dir() else 0


# ----------------------------------------------------------------------------------------------- a loopback server


class Served:
    """What the loopback server saw, and what it is told to do wrong."""

    def __init__(self) -> None:
        self.gets: Counter[str] = Counter()  # GET requests per path
        self.drop_once: set[str] = set()  # paths whose next GET is cut off halfway
        self.stall: Counter[str] = Counter()  # paths whose next n GETs send half the body, then nothing
        self.stalled = threading.Event()  # set when a stall begins: the mark a test waits for
        self.released = threading.Event()  # ends every stall (the server's shutdown sets it)
        self.lock = threading.Lock()


class _Handler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *args, served: Served, **kwargs):
        self.served = served
        super().__init__(*args, **kwargs)

    def log_message(self, format: str, *args) -> None:
        pass

    def do_GET(self) -> None:
        with self.served.lock:
            self.served.gets[self.path] += 1
            self.drop = self.path in self.served.drop_once
            self.served.drop_once.discard(self.path)
            self.stalls = self.served.stall[self.path] > 0
            self.served.stall[self.path] -= self.stalls
        super().do_GET()

    def copyfile(self, source, outputfile) -> None:
        if not self.drop and not self.stalls:
            return super().copyfile(source, outputfile)
        body = source.read()
        outputfile.write(body[:len(body) // 2])  # dropped: the connection closes, fewer bytes than Content-Length
        if self.stalls:  # stalled: the connection stays open and silent
            outputfile.flush()
            self.served.stalled.set()
            self.served.released.wait()
        self.close_connection = True


@contextlib.contextmanager
def serve_http(directory: Path) -> Iterator[tuple[str, Served]]:
    """An http.server on 127.0.0.1 serving `directory`: (its base URL, what it saw)."""
    served = Served()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_Handler, served=served, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", served
    finally:
        served.released.set()
        server.shutdown()
        server.server_close()
        thread.join()


if __name__ == "__main__":  # python tests/faults.py STOP_POINT_JSON ARGS…: a fresh `redi ARGS` that stops there
    run_redi(sys.argv[2:], json.loads(sys.argv[1]))
