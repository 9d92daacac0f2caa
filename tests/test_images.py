"""Image sources, decoding, the ADM centre crop and the demo image set."""
from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from redi.common.errors import UserError
from redi.pipeline.demo_data import CLASSES, write_demo_images
from redi.pipeline.images import center_crop_arr, decode_rgb, load_cropped, open_source


def adm_center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """guided-diffusion/improved_diffusion image_datasets.center_crop_arr, verbatim."""
    # We are not on a new enough PIL to support the `reducing_gap`
    # argument, which uses BOX downsampling at powers of two first.
    # Thus, we do it by hand to improve downsample quality.
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(
            tuple(x // 2 for x in pil_image.size), resample=Image.BOX
        )

    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(
        tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC
    )

    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_images(tmp_path_factory.mktemp("demo") / "images", 10).out


@pytest.mark.parametrize("size", [(1023, 517), (300, 301), (50, 80), (513, 1024), (256, 256)])
@pytest.mark.parametrize("resolution", [64, 256])
def test_adm_crop_equals_reference(size: tuple[int, int], resolution: int) -> None:
    rng = np.random.default_rng(size[0] * 7 + resolution)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    got = center_crop_arr(img, resolution)
    assert got.shape == (resolution, resolution, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, adm_center_crop_arr(img, resolution))


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_decode_converts_every_mode_to_rgb() -> None:
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20  # (3, 4)
    cases = {
        "L": Image.fromarray(grey, "L"),
        "LA": Image.fromarray(grey, "L").convert("LA"),
        "P": Image.fromarray(grey, "L").convert("P"),
        "RGBA": Image.fromarray(grey, "L").convert("RGBA"),
    }
    for mode, img in cases.items():
        rgb = decode_rgb(_encode(img))
        assert rgb.mode == "RGB", mode
        np.testing.assert_array_equal(np.asarray(rgb)[..., 0], grey, err_msg=mode)
    cmyk = decode_rgb(_encode(Image.new("CMYK", (4, 3), (0, 255, 0, 0)), "JPEG"))  # magenta
    assert cmyk.mode == "RGB" and np.asarray(cmyk)[0, 0, 1] < 30 and np.asarray(cmyk)[0, 0, 0] > 225
    sixteen = Image.fromarray(np.array([[0, 256, 65535]], dtype=np.uint16))  # I;16: top byte kept, not clipped
    np.testing.assert_array_equal(np.asarray(decode_rgb(_encode(sixteen)))[0, :, 0], [0, 1, 255])


@pytest.mark.parametrize(
    "data", [b"", b"this is text, not a PNG", _encode(Image.new("RGB", (64, 64), (9, 9, 9)), "JPEG")[:300]]
)
def test_decode_rejects_bad_bytes(data: bytes) -> None:
    with pytest.raises(Exception):  # noqa: B017 — whatever the decoder raises; callers record any error
        decode_rgb(data)


def test_demo_data_is_deterministic_and_varied(tmp_path: Path, demo: Path) -> None:
    again = write_demo_images(tmp_path / "again", 10).out
    files = sorted(p.relative_to(demo).as_posix() for p in demo.rglob("*") if p.is_file())
    assert len(files) == 10
    assert [(again / f).read_bytes() for f in files] == [(demo / f).read_bytes() for f in files]
    assert {f.split("/")[0] for f in files} == set(CLASSES) and len(CLASSES) >= 4
    images = [Image.open(demo / f) for f in files]
    assert {"RGB", "L", "RGBA", "P"} <= {im.mode for im in images}
    assert {"JPEG", "PNG"} <= {im.format for im in images}
    assert min(min(im.size) for im in images) < 256 and max(min(im.size) for im in images) >= 512
    write_demo_images(demo, 10)  # rewriting the same set is allowed
    with pytest.raises(UserError, match="other images"):
        write_demo_images(demo, 5)


def test_folder_source_index_labels_fingerprint(demo: Path) -> None:
    src = open_source(demo)
    rel = sorted(p.relative_to(demo).as_posix() for p in demo.rglob("*") if p.is_file())
    assert [e.relpath for e in src.entries] == rel
    assert src.keys == [r.rsplit(".", 1)[0] for r in rel]
    assert list(src.labels) == [sorted(CLASSES).index(r.split("/")[0]) for r in rel]
    lines = "".join(f"{r}\t{(demo / r).stat().st_size}\n" for r in rel)
    assert src.fingerprint() == hashlib.sha256(lines.encode()).hexdigest()


def test_flat_folder_mixed_folder_and_dataset_json(tmp_path: Path) -> None:
    png = _encode(Image.new("RGB", (8, 8)))
    (tmp_path / "flat").mkdir()
    for name in ("b.png", "a.png"):
        (tmp_path / "flat" / name).write_bytes(png)
    flat = open_source(tmp_path / "flat")
    assert flat.keys == ["a", "b"] and list(flat.labels) == [0, 0]
    (tmp_path / "flat" / "sub").mkdir()
    (tmp_path / "flat" / "sub" / "c.png").write_bytes(png)
    with pytest.raises(UserError, match="mixes images"):
        open_source(tmp_path / "flat")
    (tmp_path / "flat" / "dataset.json").write_text(json.dumps({"labels": [["a.png", 3], ["b.png", 1], ["sub/c.png", 2]]}))
    assert list(open_source(tmp_path / "flat").labels) == [3, 1, 2]


def test_missing_and_empty_sources(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        open_source(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        open_source(tmp_path / "empty")


def _same_images(a, b, resolution: int = 64) -> None:  # two ImageSources
    assert [e.relpath for e in a.entries] == [e.relpath for e in b.entries]
    assert a.keys == b.keys
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.fingerprint() == b.fingerprint()
    for i in range(len(a)):
        np.testing.assert_array_equal(load_cropped(a, i, resolution)[0], load_cropped(b, i, resolution)[0])


def test_zip_and_tar_sources_equal_the_folder(demo: Path, tmp_path: Path) -> None:
    folder = open_source(demo)
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as z:
        for e in folder.entries:
            z.write(demo / e.relpath, e.relpath)
        z.writestr("dataset.json", json.dumps({"labels": [[e.relpath, e.label] for e in folder.entries]}))
    _same_images(folder, open_source(tmp_path / "images.zip"))

    (tmp_path / "shards").mkdir()
    halves = [folder.entries[: len(folder) // 2], folder.entries[len(folder) // 2 :]]
    for n, entries in enumerate(halves):
        with tarfile.open(tmp_path / "shards" / f"shard-{n:06d}.tar", "w") as tf:
            for e in reversed(entries):  # member order must not matter
                tf.add(demo / e.relpath, e.relpath)
                info = tarfile.TarInfo(f"{e.key}.cls")
                info.size = len(str(e.label))
                tf.addfile(info, io.BytesIO(str(e.label).encode()))
    _same_images(folder, open_source(tmp_path / "shards"))
    _same_images(folder, open_source(str(tmp_path / "shards" / "shard-*.tar")))
    one = open_source(tmp_path / "shards" / "shard-000000.tar")
    assert one.keys == [e.key for e in halves[0]] and list(one.labels) == [e.label for e in halves[0]]


def test_zip_without_dataset_json_is_label_zero(demo: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "plain.zip", "w") as z:
        for p in sorted(demo.rglob("*.png")):
            z.write(p, p.relative_to(demo).as_posix())
    src = open_source(tmp_path / "plain.zip")
    assert len(src) > 0 and not src.labels.any()


def test_load_cropped_reports_unreadable_files(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "ok.png").write_bytes(_encode(Image.new("RGB", (80, 50), (1, 2, 3))))
    (tmp_path / "x" / "zero.jpg").write_bytes(b"")
    (tmp_path / "x" / "gone.png").symlink_to(tmp_path / "missing.png")
    src = open_source(tmp_path / "x")
    results = {e.relpath: load_cropped(src, i, 32) for i, e in enumerate(src.entries)}
    assert results["ok.png"][1] == "" and (results["ok.png"][0] == [1, 2, 3]).all()
    for bad in ("zero.jpg", "gone.png"):
        pixels, reason = results[bad]
        assert reason and pixels.shape == (32, 32, 3) and not pixels.any()
    assert src.entries[[e.relpath for e in src.entries].index("gone.png")].size == -1


def test_negative_or_huge_labels_are_one_sentence(tmp_path: Path) -> None:
    from redi.pipeline.images import labels_from_dataset_json

    in_range = r"labels\[0\]\[1\]` must be an integer in \[0, 1000000\)"
    with pytest.raises(UserError, match=in_range):
        labels_from_dataset_json(b'{"labels": [["a.png", -1]]}', "x.zip")
    with pytest.raises(UserError, match=in_range):
        labels_from_dataset_json(b'{"labels": [["a.png", 99999999999999999999]]}', "x.zip")
    with pytest.raises(UserError, match=in_range):  # fits int32, but no class embedding that large
        labels_from_dataset_json(b'{"labels": [["a.png", 2000000000]]}', "x.zip")
    assert labels_from_dataset_json(b'{"labels": [["a\\\\b.png", 3]]}', "x.zip") == {"a/b.png": 3}


@pytest.mark.parametrize(("text", "said"), [
    (b'{"labels": [["a.png", 1e400]]}', "is Infinity, not an integer"),  # was an OverflowError
    (b'{"labels": [["a.png", 1.5]]}', "is 1.5, not an integer"),  # was truncated to 1
    (b'{"labels": [["a.png", true]]}', "is true, not an integer"),  # was read as 1
    (b'{"labels": [["a.png", "1"]]}', 'is "1", not an integer'),
    (b'{"labels": [[0, 1]]}', "labels[0][0]` is 0, not a string"),
    (b'{"labels": {"a.png": 1}}', "labels` is an object, not a list"),
    (b'[' * 100_000 + b']' * 100_000, "is not readable JSON"),  # was a RecursionError
])
def test_a_label_that_is_not_an_integer_refuses_dataset_json_in_one_sentence(text: bytes, said: str) -> None:
    from redi.pipeline.images import labels_from_dataset_json

    with pytest.raises(UserError, match=re.escape(said)) as refused:
        labels_from_dataset_json(text, "x.zip")
    assert str(refused.value).startswith("x.zip/dataset.json ") and str(refused.value).count(". ") == 0


def test_tar_links_are_listed_not_dropped_and_mixed_folders_are_refused(demo: Path, tmp_path: Path) -> None:
    real = next(p for p in sorted(demo.rglob("*.png")))
    with tarfile.open(tmp_path / "links.tar", "w") as tf:
        tf.add(real, "a.png")
        link = tarfile.TarInfo("b.png")
        link.type, link.linkname = tarfile.SYMTYPE, "a.png"
        tf.addfile(link)
    src = open_source(tmp_path / "links.tar")
    assert src.keys == ["a", "b"]
    assert load_cropped(src, 0, 32)[1] == "" and "link" in load_cropped(src, 1, 32)[1]

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "x.png").write_bytes(real.read_bytes())
    (mixed / "s.tar").write_bytes((tmp_path / "links.tar").read_bytes())
    with pytest.raises(UserError, match=r"both images and \.tar files"):
        open_source(mixed)


def test_images_whose_crop_would_blow_up_memory_are_listed_not_decoded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 141-byte 20000×1 PNG would be resized to 5,120,000×256 pixels before the crop; a decompression bomb is
    a listed error of one line, not a warning."""
    (tmp_path / "x").mkdir()
    Image.new("L", (20000, 1)).save(tmp_path / "x" / "line.png")
    Image.new("L", (640, 10)).save(tmp_path / "x" / "wide.png")  # 64:1, the widest accepted
    Image.new("L", (650, 10)).save(tmp_path / "x" / "wider.png")
    assert (tmp_path / "x" / "line.png").stat().st_size < 200
    (tmp_path / "y").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "y" / "bomb.png")
    Image.new("RGB", (50, 50)).save(tmp_path / "y" / "bigger-bomb.png")

    def reasons(folder: Path) -> dict[str, str]:
        src = open_source(folder)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no raw warning reaches the user
            return {e.relpath: load_cropped(src, i, 32)[1] for i, e in enumerate(src.entries)}

    wide = reasons(tmp_path / "x")
    assert wide["wide.png"] == ""
    for name in ("line.png", "wider.png"):
        assert "aspect ratio beyond 64:1" in wide[name] and "\n" not in wide[name]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL warns above it and raises above twice it
    for reason in reasons(tmp_path / "y").values():
        assert "decompression-bomb limit" in reason and "\n" not in reason


def test_folder_links_are_followed_once_and_loops_are_cut(tmp_path: Path) -> None:
    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    (root / "a" / "img.png").write_bytes(_encode(Image.new("RGB", (8, 8))))
    (root / "a" / "loop").symlink_to("..")  # a/loop/a/loop/… would list the image 40 times
    (root / "b").symlink_to("a")  # the same folder under another name
    (root / "c").mkdir()
    (root / "c" / "up").symlink_to(root / "c")
    (root / "c" / "img.png").write_bytes(_encode(Image.new("RGB", (8, 8))))
    assert open_source(root).keys == ["a/img", "c/img"]


def test_encode_refuses_a_dataset_json_label_of_1e400_in_one_sentence(tmp_path: Path) -> None:
    """The CLI path of the case above: one sentence and exit 2, not an OverflowError from the label array."""
    from typer.testing import CliRunner

    from redi.cli import app
    from redi.pipeline.demo_data import write_demo_images

    images = write_demo_images(tmp_path / "images", 2).out
    from redi.pipeline.images import walk_images

    first, second = sorted(walk_images(images))
    (images / "dataset.json").write_text(f'{{"labels": [["{first}", 1], ["{second}", 1e400]]}}')
    result = CliRunner().invoke(app, ["encode", str(images), "--data", str(tmp_path / "d"), "--vae", "tiny-random",
                                      "--resolution", "32", "--workers", "0"])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and said.count("error:") == 1 and "Traceback" not in said, result.output
    assert "dataset.jsonisdamaged:itsfield`labels[1][1]`isInfinity,notaninteger" in "".join(said.split())
