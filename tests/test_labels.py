"""Evaluation labels: random per index (the papers), class-balanced (REPA-E, RAE, LightningDiT), or a list."""
from __future__ import annotations

import numpy as np
import pytest

from redi.common.errors import UserError
from redi.sampler.labels import balanced_labels, class_labels, labels_setting, parse_labels
from redi.sampler.config import SampleConfig


@pytest.mark.parametrize("num,classes", [(50, 10), (1000, 1000), (53, 10), (7, 10)])
def test_balanced_labels_have_exact_counts_per_class(num: int, classes: int) -> None:
    labels = class_labels(num, 3, "balanced", classes)
    counts = np.bincount(labels, minlength=classes)
    assert labels.dtype == np.int64 and len(labels) == num and counts.sum() == num
    assert set(counts.tolist()) <= {num // classes, num // classes + 1}  # N/K each, the N mod K rest one more
    assert (counts == num // classes + 1).sum() == num % classes


def test_balanced_order_is_shuffled_by_the_seed_only() -> None:
    a, b, c = balanced_labels(100, 0, 10), balanced_labels(100, 0, 10), balanced_labels(100, 1, 10)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert not np.array_equal(a, np.sort(a))  # shuffled, not class by class
    assert np.array_equal(np.sort(a), np.sort(c))  # the same multiset whatever the seed


def test_random_labels_are_unbalanced_and_per_index() -> None:
    random = class_labels(1000, 0, "random", 10)
    assert np.ptp(np.bincount(random, minlength=10)) > 5  # a multinomial draw, unlike the balanced one
    assert np.array_equal(random[:10], class_labels(10, 0, "random", 10))  # label i depends on (seed, i) only


def test_settings_record_the_mode_and_refusals() -> None:
    assert labels_setting("balanced", 10, 50) == {"mode": "balanced", "num": 50}  # N decides the labels
    assert labels_setting("random", 10, 50) == {"mode": "random"}
    assert labels_setting((3, 1), 10, 50) == {"mode": "list", "values": [3, 1]}
    assert labels_setting("balanced", 1, 50) == {"mode": "unconditional"}
    with pytest.raises(UserError, match="--labels takes random, balanced or a comma list"):
        SampleConfig(run="r", labels="uniform")
    with pytest.raises(UserError, match="integers ≥ 0"):
        SampleConfig(run="r", labels=(1, -2))


def test_one_flag_parses_modes_and_lists() -> None:
    assert parse_labels("random") == "random" and parse_labels(" Balanced") == "balanced"
    assert parse_labels("207,360") == (207, 360)
    for bad in ("uniform", "1,x", "1,-2", ""):
        with pytest.raises(UserError, match="--labels takes"):
            parse_labels(bad)
