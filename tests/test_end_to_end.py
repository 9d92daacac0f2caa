"""The whole chain through the CLI, as `make demo` runs it, at a tiny size: every stage feeds the next."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from redi.cli import app

R = ["--resolution", "64", "--workers", "0", "--batch-size", "4", "--chunk-size", "4"]


def redi(*args: str | Path) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"redi {' '.join(map(str, args))}\n{result.output}"
    return result.output


def test_images_to_samples(tmp_path: Path) -> None:
    images, data = tmp_path / "images", tmp_path / "data"
    redi("demo-data", "--out", images, "--num", "12")
    logs = {"demo-vae": redi("demo-vae", images, "--out", tmp_path / "vae", "--resolution", "64", "--max-steps", "2",
                             "--crop", "32", "--batch-size", "2"),
            "encode": redi("encode", images, "--data", data, "--vae", tmp_path / "vae", *R),
            "features": redi("features", images, "--data", data, "--encoder", "tiny-random", *R),
            "pca": redi("pca", "--data", data),
            "shards": redi("shards", "--data", data, "--pcs", "8", "--format", "both", "--shard-size", "4", "--patch-tokens")}
    assert "consistent" in redi("verify", data)
    common = ["--shards", data, "--model", "SiT-debug", "--batch-size", "4", "--max-steps", "3", "--log-every", "1",
              "--workers", "0"]
    logs["train"] = redi("train", *common, "--run", tmp_path / "redi", "--method", "redi", "--pca-rank", "4")
    redi("train", *common, "--run", tmp_path / "reg", "--method", "reg", "--format", "wds")
    logs["sample"] = redi("sample", "--run", tmp_path / "redi", "--guidance", "cfg+rg", "--steps", "3", "--num", "4",
                          "--batch-size", "2", "--out", tmp_path / "s1")
    redi("sample", "--run", tmp_path / "reg", "--guidance", "cfg", "--interval", "0,0.7", "--steps", "3", "--num", "2",
         "--out", tmp_path / "s2")
    for out, n in ((tmp_path / "s1", 4), (tmp_path / "s2", 2)):
        with np.load(out / "samples.npz") as f:
            assert f["arr_0"].shape == (n, 64, 64, 3) and f["arr_0"].dtype == np.uint8
    assert (tmp_path / "s1" / "pcs.png").is_file()
    assert "step-0000003.pt" in redi("info", tmp_path / "redi")
    # stderr is not a terminal here: each command's progress is plain log lines, ending with its 100% line
    for command, (task, total) in {"demo-vae": ("demo-vae", 2), "encode": ("encode", 12), "features": ("features (tiny-random)", 12),
                                   "pca": ("pca", 12), "shards": ("shards", 12), "train": ("step", 3),
                                   "sample": ("sampling", 4)}.items():
        assert re.search(rf"INFO {re.escape(task)} {total}/{total} \(100%\) \| .* elapsed\n", logs[command]), (command, logs[command])
