"""`redi preview`: the training latents decoded, their PCs, and a sample folder's images and PCs, captioned."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image
from typer.testing import CliRunner

from redi.cli import app
from redi.pipeline.encoders import VAE, load, resolve
from redi.sampler.outputs import to_uint8
from redi.sampler import preview as preview_module
from redi.sampler.preview import CAPTION_HEIGHT, CELL, PAD, _cells


def test_preview_rows_are_the_decoded_training_latents_their_pcs_and_the_samples(
        pipeline: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, torch_free: Callable[[list[str]], bool]) -> None:
    data, samples, out = pipeline["ref_data"], pipeline["ref_samples"], tmp_path / "preview.png"
    result = CliRunner().invoke(app, ["preview", str(data), "--samples", str(samples), "--num", "5", "--out", str(out)],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "row 4" in text and "step 12, EMA weights, guidance none" in text and "tiny-random" in text
    sheet = np.asarray(Image.open(out))  # 4 rows of 5 cells, each under its caption
    assert sheet.shape == (PAD + 4 * (CAPTION_HEIGHT + CELL + PAD), max(640, PAD + 5 * (CELL + PAD)), 3)

    moments = zarr.open_array(data / "shards" / "samples.zarr" / "moments", mode="r")[:5]  # (5, 2C, h, h)
    vae = load(resolve(VAE, "tiny-random"))
    with torch.no_grad():
        decoded = _cells(to_uint8(vae.decode(torch.from_numpy(moments[:, : moments.shape[1] // 2].astype(np.float32))).sample))
    for i in range(5):  # row 1: what the VAE makes of each training latent (the lower half: no class label there)
        left, top = PAD + i * (CELL + PAD), PAD + CAPTION_HEIGHT
        assert np.array_equal(sheet[top + CELL // 2: top + CELL, left: left + CELL], decoded[i, CELL // 2:])
    for row in (1, 3):  # the PC rows are pictures, not a constant
        top = PAD + row * (CAPTION_HEIGHT + CELL + PAD) + CAPTION_HEIGHT
        assert sheet[top: top + CELL, PAD: PAD + 5 * (CELL + PAD)].std() > 10

    alone = CliRunner().invoke(app, ["preview", str(data), "--num", "3", "--out", str(tmp_path / "alone.png")])
    assert alone.exit_code == 0 and np.asarray(Image.open(tmp_path / "alone.png")).shape[0] == PAD + 2 * (CAPTION_HEIGHT + CELL + PAD)
    refused = CliRunner().invoke(app, ["preview", str(data), "--samples", str(tmp_path)])
    assert refused.exit_code == 2 and "not a `redi sample` output folder" in " ".join(refused.output.split())
    unfinished = tmp_path / "unfinished"
    (unfinished / "images").mkdir(parents=True)
    started = json.loads((samples / "sample.json").read_text())  # what `redi sample` writes before the first image
    started = json.dumps({"settings": started["settings"], "checkpoint_path": started["checkpoint_path"], "complete": False})
    for text, says in ((started, "is not finished"), ("{not json", "rerun `redi sample"),
                       ('{"settings": 1.5}', "its field `settings` is 1.5, not an object")):
        (unfinished / "sample.json").write_text(text)
        refused = CliRunner().invoke(app, ["preview", str(data), "--samples", str(unfinished)])
        assert refused.exit_code == 2 and says in " ".join(refused.output.split()), refused.output

    def decoded_again(*args: object) -> None:
        raise AssertionError("a current preview was drawn again")

    monkeypatch.setattr(preview_module, "_training", decoded_again)  # a rerun on the same inputs: the stamp agrees
    drawn = out.read_bytes()
    again = CliRunner().invoke(app, ["preview", str(data), "--samples", str(samples), "--num", "5", "--out", str(out)])
    assert again.exit_code == 0 and "row 4" in again.stdout and out.read_bytes() == drawn, again.output
    other = CliRunner().invoke(app, ["preview", str(data), "--samples", str(samples), "--num", "4", "--out", str(out)])
    assert other.exit_code == 1 and isinstance(other.exception, AssertionError)  # other inputs: drawn again
    assert torch_free(["preview", str(data), "--samples", str(samples), "--num", "5", "--out", str(out)])



@pytest.mark.parametrize(("channels", "caption"), [("vae", "guidance cfg 2.4, ode"),
                                                   ("all", "guidance cfg 2.4 on all channels, ode")])
def test_a_caption_says_when_cfg_guides_the_pcs_too(channels: str, caption: str) -> None:
    from redi.sampler.settings import describe_settings
    settings = {"guidance": {"mode": "cfg", "cfg_scale": 2.4, "rg_scale": 1.5, "cfg_channels": channels},
                "checkpoint": {"step": 5000, "weights": "ema"}, "model": {"name": "SiT-debug/2", "method": "redi"},
                "sampler": "ode", "steps": 50, "seed": 0}
    assert describe_settings(settings) == f"SiT-debug/2 redi, step 5,000, EMA weights, {caption} 50 steps, seed 0"
