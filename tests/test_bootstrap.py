"""Paired bootstrap intervals (training.eval.bootstrap) against hand-checked examples."""

from __future__ import annotations

import numpy as np
import pytest

from training.eval.bootstrap import paired_bootstrap
from training.eval.metrics import aurc


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x))


def test_two_items_hand_checked():
    """a = (1, 0), b = (0, 0), metric = mean. A resample of 2 items draws item 0 zero, one or two
    times with probability 1/4, 1/2, 1/4, so the difference is 0, 0.5 or 1 with those
    probabilities: the 95% interval is [0, 1], it includes zero, and half the draws give 0.5."""
    a, b = np.array([1.0, 0.0]), np.array([0.0, 0.0])
    d = paired_bootstrap(_mean, a, b, n_boot=4000, seed=0)
    assert d["diff"] == 0.5 and d["a"] == 0.5 and d["b"] == 0.0
    assert d["low"] == 0.0 and d["high"] == 1.0
    assert not d["counts"] and d["dropped"] == 0


def test_constant_difference_counts_and_no_difference_does_not():
    a, b = np.ones(30), np.zeros(30)
    d = paired_bootstrap(_mean, a, b, n_boot=200)
    assert (d["diff"], d["low"], d["high"], d["counts"]) == (1.0, 1.0, 1.0, True)
    same = paired_bootstrap(_mean, a, a.copy(), n_boot=200)
    assert (same["diff"], same["low"], same["high"], same["counts"]) == (0.0, 0.0, 0.0, False)


def test_pairing_removes_shared_item_noise():
    """b = a + 0.1 on every item: each paired resample differs by exactly -0.1, however noisy the
    items are, while an unpaired comparison of such noisy items could not tell them apart."""
    a = np.random.default_rng(1).normal(0.0, 5.0, 50)
    d = paired_bootstrap(_mean, a, a + 0.1, n_boot=300, seed=2)
    assert d["low"] == pytest.approx(-0.1) and d["high"] == pytest.approx(-0.1)
    assert d["counts"]


def test_tuple_inputs_and_undefined_resamples():
    """Several arrays per predictor (a score and correctness, as for AURC); a metric that is nan on
    some resamples drops those and says how many."""
    conf_a = np.array([0.9, 0.8, 0.3, 0.2])
    conf_b = np.array([0.2, 0.3, 0.8, 0.9])  # ranks the two errors first
    right = np.array([True, True, False, False])
    d = paired_bootstrap(aurc, (conf_a, right), (conf_b, right), n_boot=300, seed=0)
    assert d["diff"] == pytest.approx(aurc(conf_a, right) - aurc(conf_b, right)) and d["diff"] < 0

    def first_is_one(x):  # undefined (nan) when item 0 is not drawn
        return 1.0 if 0 in x else float("nan")

    idx = np.arange(3)
    d = paired_bootstrap(first_is_one, idx, idx, n_boot=500, seed=0)
    # item 0 is missing from a 3-draw resample with probability (2/3)^3 = 8/27 ~ 0.30
    assert 0.22 < d["dropped"] / 500 < 0.38
    with pytest.raises(ValueError, match="same"):
        paired_bootstrap(_mean, np.ones(3), np.ones(4))
