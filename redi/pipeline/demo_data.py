"""The embedded default image set: coloured shapes on textured backgrounds, generated in code.

Deterministic (numpy seeded per image, so image i is the same whatever `num` is), in
ImageFolder layout, with the awkward cases a real dataset has: sizes below and above the
crop resolution (some ≥ 512 so the ADM halving runs), odd aspect ratios, JPEG and PNG,
greyscale (L), RGBA and palette (P) images.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from redi.common.atomic import atomic_write_with
from redi.common.errors import UserError
from redi.pipeline.images import walk_images

CLASSES = ("circle", "ring", "square", "stripes", "triangle")
SIZES = ((200, 150), (640, 512), (96, 128), (300, 301), (512, 768), (257, 390), (1100, 540), (333, 250))
# (PIL mode, file format, extension), cycled over images.
ENCODINGS = (
    ("RGB", "JPEG", "jpg"), ("RGB", "PNG", "png"), ("L", "JPEG", "jpg"), ("RGBA", "PNG", "png"),
    ("P", "PNG", "png"), ("RGB", "JPEG", "jpeg"), ("L", "PNG", "png"), ("RGB", "JPEG", "jpg"),
)


@dataclass(frozen=True)
class DemoResult:
    """What `write_demo_images` wrote."""

    out: Path  # the ImageFolder root
    count: int  # images written
    classes: tuple[str, ...]  # class folder names, label order
    files: tuple[str, ...]  # relative paths, sorted


def demo_files(num: int) -> list[tuple[int, str]]:
    """(image number, relative path) of the first `num` demo images."""
    out = []
    for i in range(num):
        cls = CLASSES[i % len(CLASSES)]
        out.append((i, f"{cls}/{cls}_{i:04d}.{ENCODINGS[i % len(ENCODINGS)][2]}"))
    return out


def demo_image(i: int, seed: int = 0) -> Image.Image:
    """Demo image number `i`: a shape of class i % 5 on a noisy gradient, in its cycled PIL mode."""
    rng = np.random.default_rng([seed, i])
    w, h = SIZES[(i * 3 + i // len(SIZES)) % len(SIZES)]
    xx = (np.arange(w, dtype=np.float32) / max(w, h))[None, :, None]  # (1, w, 1) in [0, 1)
    yy = (np.arange(h, dtype=np.float32) / max(w, h))[:, None, None]  # (h, 1, 1)
    base, grad = rng.uniform(40, 200, 3), rng.uniform(-70, 70, (2, 3))
    noise = 14 * rng.standard_normal((h, w, 3), dtype=np.float32)  # (h, w, 3) texture
    bg = base + xx * grad[0] + yy * grad[1] + noise  # (h, w, 3)
    img = Image.fromarray(bg.clip(0, 255).astype(np.uint8), "RGB")
    _draw_shape(ImageDraw.Draw(img), CLASSES[i % len(CLASSES)], w, h, rng)
    mode = ENCODINGS[i % len(ENCODINGS)][0]
    if mode == "RGBA":
        fade = np.broadcast_to(255 * (0.5 + 0.5 * xx[..., 0]), (h, w))  # (h, w) left-to-right
        alpha = Image.fromarray(fade.astype(np.uint8), "L")
        img.putalpha(alpha)
        return img
    if mode == "P":
        return img.convert("P", palette=Image.Palette.WEB, dither=Image.Dither.NONE)
    return img.convert(mode)


def _draw_shape(draw: ImageDraw.ImageDraw, cls: str, w: int, h: int, rng: np.random.Generator) -> None:
    """Draw one instance of class `cls` in a random colour, its size and place drawn near the middle of the image's
    centre square (the part a centre crop keeps): sized and placed anywhere, as they were, a few thousand CPU steps of
    the demo's model learnt blobs where the shapes lay (docs/BENCHMARKS.md, "What the demo learns")."""
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    side = min(w, h)  # the centre square that the centre crop keeps
    r = side * rng.uniform(0.25, 0.32)
    cx, cy = w / 2 + side * rng.uniform(-0.05, 0.05), h / 2 + side * rng.uniform(-0.05, 0.05)
    box = (cx - r, cy - r, cx + r, cy + r)
    if cls == "circle":
        draw.ellipse(box, fill=colour)
    elif cls == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(r / 2.5)))
    elif cls == "square":
        draw.rectangle(box, fill=colour)
    elif cls == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    else:
        step = max(4, int(r / 2.5))
        for x in range(int(cx - r), int(cx + r), 2 * step):
            draw.rectangle((x, cy - r, x + step, cy + r), fill=colour)


def write_demo_images(out: Path, num: int = 64, seed: int = 0) -> DemoResult:
    """Write the first `num` demo images under `out` in ImageFolder layout (atomic, idempotent)."""
    if num < 1:
        raise UserError(f"--num must be at least 1 (got {num}).")
    out = Path(out)
    files = demo_files(num)
    if out.is_dir():
        others = sorted(set(walk_images(out)) - {p for _, p in files})
        if others:
            raise UserError(f"{out} already holds other images (e.g. {others[0]}); choose an empty or new folder.")
    elif out.exists():
        raise UserError(f"{out} exists and is not a folder.")
    try:
        for i, rel in files:
            img, fmt = demo_image(i, seed), ENCODINGS[i % len(ENCODINGS)][1]
            atomic_write_with(out / rel, lambda tmp, img=img, fmt=fmt: img.save(tmp, format=fmt))
    except OSError as e:
        raise UserError(f"Cannot write the demo images to {out}: {e.strerror}.") from None
    return DemoResult(out, num, CLASSES, tuple(sorted(p for _, p in files)))
