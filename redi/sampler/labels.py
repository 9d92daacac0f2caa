"""The class label of every sample index: drawn at random per index, class-balanced, or a given list (`--labels`:
random, balanced, or a comma list of class indices).

random (the default, as the papers we reproduce evaluate: ADM, DiT, SiT, REPA, REG, ReDi): label i is drawn from
(seed, i) alone, so image i does not depend on N. balanced (REPA-E, RAE, LightningDiT): N / K images of each of
the K classes, in an order shuffled by the seed; when K does not divide N the remaining N mod K images go to
classes picked by the seed, one each. A balanced label therefore depends on N too, which sample.json records.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from redi.common.choices import LABEL_MODES
from redi.common.errors import UserError

LABEL_STREAM = 0x1ABE1  # SeedSequence word that keeps the label draws apart from the noise generators
BALANCED_STREAM = 0xBA1  # a second word: the balanced order is a stream of its own


Labels = str | tuple[int, ...]  # "random", "balanced", or the class indices to cycle over the images


def class_labels(num: int, seed: int, labels: Labels, num_classes: int) -> np.ndarray:
    """int64 (N,) label of every index: 0 for unconditional models, a list cycled, or drawn as `labels` says."""
    if num_classes == 1:
        if isinstance(labels, tuple):
            raise UserError("--labels with a list has no effect on an unconditional model (num_classes 1): leave it out.")
        return np.zeros(num, dtype=np.int64)
    if isinstance(labels, tuple):
        if max(labels) >= num_classes:
            raise UserError(f"--labels has {max(labels)}, but the model knows classes 0…{num_classes - 1}.")
        return np.resize(np.asarray(labels, dtype=np.int64), num)  # labels[i % len(labels)]
    if labels == "balanced":
        return balanced_labels(num, seed, num_classes)
    draws = [np.random.default_rng([LABEL_STREAM, seed, i]).integers(num_classes) for i in range(num)]
    return np.asarray(draws, dtype=np.int64)


def balanced_labels(num: int, seed: int, num_classes: int) -> np.ndarray:
    """int64 (N,): ⌊N/K⌋ images of every class and one more of N mod K seeded classes, in a seeded order."""
    rng = np.random.default_rng([LABEL_STREAM, BALANCED_STREAM, seed])
    whole = np.repeat(np.arange(num_classes, dtype=np.int64), num // num_classes)  # (K·⌊N/K⌋,)
    rest = np.sort(rng.permutation(num_classes)[: num % num_classes]).astype(np.int64)  # (N mod K,)
    return rng.permutation(np.concatenate([whole, rest]))  # (N,)


def labels_setting(labels: Labels, num_classes: int, num: int) -> dict[str, Any]:
    """How the labels were chosen, for sample.json and every eval report (balanced ones depend on N: recorded)."""
    if num_classes == 1:
        return {"mode": "unconditional"}
    if isinstance(labels, tuple):
        return {"mode": "list", "values": list(labels)}
    return {"mode": "balanced", "num": num} if labels == "balanced" else {"mode": "random"}


def check_labels(labels: Labels) -> None:
    """One sentence unless `labels` is a mode of LABEL_MODES or a non-empty list of class indices."""
    if isinstance(labels, tuple) and (not labels or min(labels) < 0):
        raise UserError("--labels takes random, balanced or a comma list of class indices (integers ≥ 0).")
    if not isinstance(labels, tuple) and labels not in LABEL_MODES:
        raise UserError(f"--labels takes {', '.join(LABEL_MODES)} or a comma list of class indices, not {labels!r}.")


def parse_labels(text: str) -> Labels:
    """'random' or 'balanced' as they are; '1,2,3' → (1, 2, 3)."""
    if text.strip().lower() in LABEL_MODES:
        return text.strip().lower()
    try:
        labels = tuple(int(part) for part in text.split(","))
    except ValueError:
        labels = ()
    check_labels(labels)
    return labels
