"""Shards from a URL: the readers, train, verify and publish over loopback HTTP and S3 (moto), retries, read-ahead,
and two torchrun "nodes" reading the same shards over HTTP."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from faults import Launcher, serve_http

from redi.benchmarks import loader as loader_bench
from redi.benchmarks.loader import make_stage_inputs
from redi.cli import app
from redi.common.errors import UserError
from redi.pipeline.readers import StreamPlan, make_loader
from redi.common.urls import redact
from redi.pipeline.remote import RemotePath, as_location, is_transient, read_ahead
from redi.pipeline.shards import ShardsConfig, build_shards, tar_relpath
from redi.trainer.checkpoint import Checkpoint, list_checkpoints, newest_checkpoint
from redi.trainer.config import TrainConfig
from redi.trainer.metrics import read_metrics
from redi.trainer.train import train

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["--model", "SiT-debug", "--method", "redi", "--pca-rank", "4", "--batch-size", "8", "--log-every", "1",
         "--save-every", "1000", "--workers", "0", "--seed", "3", "--lr", "1e-3", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root with 96 samples in 3 blocks of both formats (latent 8×8, 4×4 patch grid, D = 16)."""
    root = tmp_path_factory.mktemp("remote") / "data"
    make_stage_inputs(root, 96, latent_side=8, grid=4, dim=16, num_classes=4)
    build_shards(root, ShardsConfig(pcs=6, shard_size=32, formats=("zarr", "wds"), device="cpu"), progress=False)
    return root


def batches(shards: str | Path, fmt: str, **kwargs) -> list[dict]:
    return list(make_loader(shards, batch_size=10, format=fmt, seed=5, epochs=1, drop_last=False, **kwargs))


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys() and x["key"] == y["key"]
        assert all(torch.equal(x[k], y[k]) for k in x if k != "key")


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, " ".join(result.output.split())


def said(output: str, text: str) -> bool:
    """`text` is in the CLI output, wherever the console wrapped its lines."""
    return "".join(text.split()) in "".join(output.split())


def losses(run: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(run / "metrics.jsonl")]


def test_both_readers_over_http_give_the_local_batches_with_one_request_per_tar_and_a_dropped_one_retried(
        data: Path) -> None:
    local = {fmt: batches(data / "shards", fmt) for fmt in ("wds", "zarr")}
    with serve_http(data.parent) as (base, served):
        served.drop_once.add("/data/shards/wds/shard-000001.tar")
        remote = batches(f"{base}/data/shards", "wds", num_workers=2)
        tars = {path: n for path, n in served.gets.items() if path.endswith(".tar")}
        assert_same_batches(local["wds"], remote)
        assert tars == {"/data/shards/wds/shard-000000.tar": 1, "/data/shards/wds/shard-000001.tar": 2,
                        "/data/shards/wds/shard-000002.tar": 1}  # whole tars, once each; the cut one again
        chunk = "/data/shards/samples.zarr/pcs/c/1/0/0/0"
        served.drop_once.add(chunk)
        assert_same_batches(local["zarr"], batches(f"{base}/data/shards", "zarr"))
        assert served.gets[chunk] == 2  # zarr's chunk requests are retried the same way


def test_a_corrupted_or_missing_tar_at_a_url_is_one_sentence_naming_it(data: Path, tmp_path: Path) -> None:
    shutil.copytree(data / "shards", tmp_path / "data" / "shards")
    tar = tmp_path / "data" / "shards" / "wds" / "shard-000002.tar"
    raw = bytearray(tar.read_bytes())
    raw[2000] ^= 0x01
    tar.write_bytes(bytes(raw))
    with serve_http(tmp_path) as (base, _):
        again = rf"; publish them again \(`redi publish DATA {base}/data`\)\.$"  # not `redi shards`: no stage is there
        with pytest.raises(UserError, match=rf"^{base}/data/shards/wds/shard-000002.tar is corrupted \(its SHA-256.*{again}"):
            batches(f"{base}/data/shards", "wds")
        tar.unlink()
        with pytest.raises(UserError, match=rf"^{base}/data/shards/wds/shard-000002.tar is missing{again}"):
            batches(f"{base}/data/shards", "wds")
        chunk = tmp_path / "data" / "shards" / "samples.zarr" / "pcs" / "c" / "1" / "0" / "0" / "0"
        chunk.unlink()  # zarr alone would give zeros for it
        with pytest.raises(UserError, match=rf"^{base}/data/shards/samples.zarr/pcs/c/1/0/0/0 is missing{again}"):
            batches(f"{base}/data/shards", "zarr")
        with pytest.raises(UserError, match=rf"^No shards.json at {base}/nothing/shards: publish a data root's shards "
                                            rf"there \(`redi publish DATA {base}/nothing`\)"):
            batches(f"{base}/nothing/shards", "wds")


def test_the_stages_refuse_a_url_data_root_and_write_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a URL read as a path would become folders here (`./http:/127.0.0.1:8766/…`)
    url = "http://127.0.0.1:8766/data"
    for argv in (["encode", "images", "--data", url, "--vae", "tiny-random"], ["features", "images", "--data", url],
                 ["pca", "--data", url], ["shards", "--data", url], ["import-repa", "repa", "--data", url],
                 ["publish", url, str(tmp_path / "dest")], ["preview", url], ["info", url]):
        code, out = cli(*argv)
        assert code == 2 and out.startswith(f"error: {url} is a URL, but this command needs a data root on a local "
                                            f"disk") and out.count("error:") == 1, (argv, out)
        assert said(out, f"`redi publish DATA {url}` copies finished shards to a URL."), out
    assert not any(tmp_path.iterdir())


def test_train_over_http_has_the_local_losses_and_verify_of_the_url_catches_a_corrupted_tar(
        data: Path, tmp_path: Path) -> None:
    shutil.copytree(data / "shards", tmp_path / "served" / "data" / "shards")
    with serve_http(tmp_path / "served") as (base, _):
        for name, shards in (("local", str(data)), ("http", f"{base}/data")):
            code, out = cli("train", "--shards", shards, "--run", str(tmp_path / name), "--format", "wds",
                            "--max-steps", "5", *TRAIN)
            assert code == 0, out
        assert len(losses(tmp_path / "http")) == 5 and losses(tmp_path / "http") == losses(tmp_path / "local")
        summary = Checkpoint.load(newest_checkpoint(tmp_path / "http")).shards
        assert summary.root == f"{base}/data/shards"

        secret = base.replace("http://", "http://someone:s3cr3t@")  # credentials in a URL are used, never shown
        code, out = cli("verify", f"{secret}/data")
        assert code == 0 and said(out, "every stage present is consistent") and "s3cr3t" not in out, out
        tar = tmp_path / "served" / "data" / "shards" / "wds" / "shard-000001.tar"
        raw = bytearray(tar.read_bytes())
        raw[100] ^= 0x01
        tar.write_bytes(bytes(raw))
        code, out = cli("verify", f"{secret}/data")
        assert code == 2 and "s3cr3t" not in out, out
        assert said(out, f"error: {base}/data/shards/wds/shard-000001.tar does not match its SHA-256 in shards.json")
        assert said(out, "publish them again")
        code, out = cli("train", "--shards", f"{secret}/data", "--run", str(tmp_path / "bad"), "--format", "wds",
                        "--max-steps", "5", *TRAIN)
        assert code == 2 and said(out, "shard-000001.tar is corrupted") and "s3cr3t" not in out, out
        assert "s3cr3t" not in (tmp_path / "bad" / "config.json").read_text()


def test_publish_to_a_local_path_then_again_is_up_to_date_and_refuses_a_damaged_file(
        data: Path, tmp_path: Path) -> None:
    code, out = cli("publish", str(data), f"file://{tmp_path}/bucket")
    assert code == 0 and "publish" in out, out
    assert sorted(p.name for p in (tmp_path / "bucket").iterdir()) == ["pca.safetensors", "shards"]
    assert cli("verify", str(tmp_path / "bucket"))[0] == 0
    assert_same_batches(batches(data / "shards", "wds"), batches(tmp_path / "bucket" / "shards", "wds"))
    assert said(cli("publish", str(data), str(tmp_path / "bucket"))[1], "nothing to do")

    copy = tmp_path / "damaged"
    shutil.copytree(data, copy)
    chunk = copy / "shards" / "samples.zarr" / "moments" / "c" / "2" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-3])
    code, out = cli("publish", str(copy), str(tmp_path / "other"))
    assert code == 2 and said(out, f"{chunk} does not match its SHA-256"), out
    assert not (tmp_path / "other" / "shards" / "shards.json").exists()  # an incomplete copy has no listing


@pytest.fixture(scope="module")
def s3(data: Path) -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 holding `data` published to s3://redi-test/data (AWS_* set for s3fs)."""
    try:
        from moto.server import ThreadedMotoServer
        import s3fs
    except ImportError as e:
        pytest.skip(f"moto[server] and s3fs are needed for the S3 tests ({e}); `pip install -e '.[dev,remote]'`")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    try:
        server.start()
    except OSError as e:
        pytest.skip(f"the moto S3 server cannot start here ({e})")
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        patch.delenv("AWS_PROFILE", raising=False)
        s3fs.S3FileSystem.clear_instance_cache()
        code, out = cli("publish", str(data), "s3://redi-test/data")
        assert code == 0, out
        yield "s3://redi-test/data"
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def test_train_and_verify_through_s3(data: Path, s3: str, tmp_path: Path) -> None:
    for name, shards in (("local", str(data)), ("s3", s3)):
        code, out = cli("train", "--shards", shards, "--run", str(tmp_path / name), "--format", "wds",
                        "--max-steps", "5", *TRAIN)
        assert code == 0, out
    assert len(losses(tmp_path / "s3")) == 5 and losses(tmp_path / "s3") == losses(tmp_path / "local")
    assert (tmp_path / "s3" / "pca.safetensors").read_bytes() == (data / "pca.safetensors").read_bytes()
    assert_same_batches(batches(data / "shards", "zarr"), batches(f"{s3}/shards", "zarr", num_workers=2))
    code, out = cli("verify", s3)
    assert code == 0 and "testing-secret" not in out, out

    tar = as_location(f"{s3}/shards/wds/shard-000000.tar")
    good = tar.read_bytes()
    try:
        tar.write_bytes(good[:512] + bytes([good[512] ^ 1]) + good[513:])
        code, out = cli("verify", s3)
        assert code == 2 and said(out, f"error: {s3}/shards/wds/shard-000000.tar does not match its SHA-256"), out
    finally:
        tar.write_bytes(good)


def test_transient_errors_are_retried_and_others_are_not(monkeypatch: pytest.MonkeyPatch) -> None:
    class ClientPayloadError(Exception):  # aiohttp's name for a body cut short
        pass

    class ClientResponseError(Exception):
        def __init__(self, status: int):
            self.status = status

    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError()) and is_transient(ClientPayloadError())
    assert is_transient(ClientResponseError(503)) and not is_transient(ClientResponseError(403))
    assert not is_transient(FileNotFoundError()) and not is_transient(PermissionError()) and not is_transient(ValueError())
    assert redact("http://user:pw@host:1/a?X-Amz-Signature=abc b") == "http://host:1/a b"
    with pytest.raises(UserError, match=r"^nosuch://bucket/x cannot be opened .*pip install -e '\.\[remote\]'"):
        as_location("nosuch://user:pw@bucket/x")
    assert as_location("file:///tmp/x") == Path("/tmp/x")

    monkeypatch.setattr("redi.pipeline.remote.BACKOFF_S", 0.001)
    calls = []

    class Flaky:
        def cat_file(self, path: str) -> bytes:
            calls.append(path)
            if len(calls) < 3:
                raise ConnectionResetError("reset by peer")
            return b"tar"

        def unstrip_protocol(self, path: str) -> str:
            return f"s3://{path}"

    assert RemotePath(Flaky(), "b/k").read_bytes() == b"tar" and len(calls) == 3
    calls.clear()
    Flaky.cat_file = lambda self, path: (calls.append(path), (_ for _ in ()).throw(ConnectionResetError("down")))
    with pytest.raises(UserError, match=r"^s3://b/k could not be read after 5 attempts \(ConnectionResetError: down\)"):
        RemotePath(Flaky(), "b/k").read_bytes()
    assert len(calls) == 5


def test_read_ahead_keeps_order_and_at_most_depth_fetches_in_flight() -> None:
    lock, running, most = threading.Lock(), [0], [0]

    def fetch(key: int) -> int:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.01)
        with lock:
            running[0] -= 1
        return key * key

    assert list(read_ahead(fetch, range(20), depth=3)) == [k * k for k in range(20)]
    assert 1 < most[0] <= 3
    assert list(read_ahead(fetch, range(5), depth=0)) == [0, 1, 4, 9, 16]


def test_loader_benchmark_reads_shards_at_a_url(data: Path) -> None:
    with serve_http(data.parent) as (base, _):
        figures = loader_bench.run(shards=f"{base}/data")
    for name in ("wds_samples_per_s", "wds_no_read_ahead_samples_per_s", "zarr_samples_per_s"):
        assert isinstance(figures[name], float) and figures[name] > 0, name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_over_http_equal_one_process_and_a_sigterm_to_one_node_stops_both_with_one_checkpoint(
        data: Path, tmp_path: Path) -> None:
    run = tmp_path / "two-nodes"
    endpoint = f"127.0.0.1:{_free_port()}"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    with serve_http(data.parent) as (base, _):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--local-addr", "127.0.0.1",
               "--", str(Path(sys.executable).parent / "redi"), "train", "--shards", f"{base}/data", "--run", str(run),
               "--format", "wds", "--max-steps", "100000", *TRAIN]
        nodes = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True) for _ in range(2)]  # a process group per node
        try:
            deadline = time.monotonic() + 240
            while not ((run / "metrics.jsonl").exists() and len(read_metrics(run / "metrics.jsonl")) >= 3):
                assert all(n.poll() is None for n in nodes) and time.monotonic() < deadline, \
                    "the two nodes never logged 3 steps:\n" + "\n".join(n.communicate(timeout=60)[0][-3000:] for n in nodes)
                time.sleep(0.05)
            os.killpg(nodes[1].pid, signal.SIGTERM)  # one node's torchrun and its worker
            outputs = [n.communicate(timeout=120)[0] for n in nodes]
        finally:
            for n in nodes:
                if n.poll() is None:
                    os.killpg(n.pid, signal.SIGKILL)
    assert "Stopped by SIGTERM" in "".join(outputs), "\n".join(o[-3000:] for o in outputs)
    ((stop_step, path),) = list_checkpoints(run)
    assert Checkpoint.load(path).step == stop_step == read_metrics(run / "metrics.jsonl")[-1]["step"]

    one = TrainConfig(shards=str(data), run=str(tmp_path / "one"), model="SiT-debug", method="redi", pca_rank=4,
                      batch_size=8, micro_batch=4, max_steps=stop_step, log_every=1, save_every=1000, num_workers=0,
                      seed=3, lr=1e-3, data_format="wds")
    train(one, device="cpu")  # the same global batch of 8: one process accumulating 2 micro-batches of 4
    a, b = Checkpoint.load(newest_checkpoint(tmp_path / "one")).model, Checkpoint.load(path).model
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=f"{key} differs between 1 process and 2 nodes")
    assert losses(tmp_path / "one") == pytest.approx(losses(run), rel=1e-5)


# --- a stalled server: timeouts on every request, and a stop signal honoured while the loop waits for data ---

def test_a_stalled_response_times_out_and_is_retried_then_reported(monkeypatch: pytest.MonkeyPatch, data: Path) -> None:
    monkeypatch.setattr("redi.pipeline.remote.READ_TIMEOUT_S", 0.5)
    monkeypatch.setattr("redi.pipeline.remote.BACKOFF_S", 0.01)
    with serve_http(data.parent) as (base, served):
        tar = "/data/shards/wds/shard-000000.tar"
        served.stall[tar] = 1  # the first GET stalls halfway, the retry gets the file
        assert RemotePath.from_url(base + tar).read_bytes() == (data / "shards" / "wds" / "shard-000000.tar").read_bytes()
        assert served.gets[tar] == 2
        served.stall[tar] = 99
        started = time.monotonic()
        with pytest.raises(UserError, match=r"shard-000000.tar could not be read after 5 attempts \(\w*Timeout"):
            RemotePath.from_url(base + tar).read_bytes()
        assert served.gets[tar] == 7 and time.monotonic() - started < 30


@pytest.fixture(scope="module")
def small_blocks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """96 samples in 12 tars of 8: a window of 4 tars holds 4 steps of 8 samples."""
    root = tmp_path_factory.mktemp("stall") / "data"
    make_stage_inputs(root, 96, latent_side=8, grid=4, dim=16, num_classes=4)
    build_shards(root, ShardsConfig(pcs=6, shard_size=8, formats=("wds",), device="cpu"), progress=False)
    return root


@pytest.fixture(scope="module")
def launcher() -> Iterator[Launcher]:
    launcher = Launcher()
    yield launcher
    launcher.close()


@pytest.mark.parametrize(("workers", "read_ahead"), [(0, 0), (1, 2)], ids=["main-process-reads", "worker-reads"])
def test_sigterm_while_a_tar_stalls_checkpoints_the_last_finished_step_within_seconds(
        small_blocks: Path, launcher: Launcher, tmp_path: Path, workers: int, read_ahead: int) -> None:
    """The loop waits for a tar the server stopped sending halfway; SIGTERM then ends it within STOP_GRACE_S (5 s),
    with a checkpoint of the last finished step, whether the main process or a DataLoader worker is reading."""
    run, log = tmp_path / "run", tmp_path / "train.log"
    args = ["train", "--shards", small_blocks, "--run", run, "--format", "wds", "--max-steps", "1000", *TRAIN]
    args[args.index("--workers") + 1] = workers
    third_window = StreamPlan(96, 8, seed=3, rank=0, world_size=1, window_blocks=4).windows(0)[2]
    stalled_tar = f"/data/shards/{tar_relpath(third_window.segments[0].block)}"  # the data of step 9 on
    with serve_http(small_blocks.parent) as (base, served):
        served.stall[stalled_tar] = 1
        args[args.index(small_blocks)] = f"{base}/data"
        pid = launcher.start([*args, "--read-ahead", read_ahead], log)
        deadline = time.monotonic() + 240
        while not (served.stalled.is_set() and (run / "metrics.jsonl").exists()
                   and len(read_metrics(run / "metrics.jsonl")) == 8):  # every step with data is done
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                launcher.wait()
                pytest.fail("training never reached the stalled tar:\n" + log.read_text()[-3000:])
            time.sleep(0.05)
        signalled = time.time()
        os.kill(pid, signal.SIGTERM)
        code = launcher.wait()
        ended = time.time()
    output = log.read_text()
    assert code == 128 + signal.SIGTERM and said(output, "Stopped by SIGTERM after step 8 (the data of step 9 had not "
                                                         "come 5 s after the signal), with a checkpoint"), output[-3000:]
    ((step, path),) = list_checkpoints(run)
    assert step == Checkpoint.load(path).step == read_metrics(run / "metrics.jsonl")[-1]["step"] == 8
    seconds = path.stat().st_mtime - signalled
    assert seconds < 30 and ended - signalled < 60, f"checkpoint {seconds:.1f} s, exit {ended - signalled:.1f} s after"
    print(f"{workers} workers: checkpoint of step {step} {seconds:.1f} s, exit {ended - signalled:.1f} s after SIGTERM")
