"""Quality metrics against hand-computed values, including ties, degenerate sets and items with
different numbers of choices."""

from __future__ import annotations

import json
import math
from itertools import permutations

import numpy as np
import pytest

from training.eval import metrics as M

# four 2-choice items; confidences 0.9, 0.8, 0.7, 0.6; the 2nd and 4th answer wrongly
PROBS = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
LABELS = np.array([0, 0, 0, 0])
CONF = np.array([0.9, 0.8, 0.7, 0.6])
RIGHT = np.array([True, False, True, False])


def test_accuracy_nll_brier_hand_computed():
    assert M.accuracy(PROBS, LABELS) == 0.5
    assert M.nll(PROBS, LABELS) == pytest.approx(-np.mean(np.log([0.9, 0.2, 0.7, 0.4])))
    # per item sum_k (p_k - y_k)^2 = 2 * (1 - p_y)^2 for two choices
    assert M.brier(PROBS, LABELS) == pytest.approx(
        np.mean([2 * 0.01, 2 * 0.64, 2 * 0.09, 2 * 0.36])
    )


def test_nll_clamps_zero_probability():
    probs = np.array([[1.0, 0.0]])
    assert M.nll(probs, np.array([1])) == pytest.approx(-math.log(1e-12))


def test_variable_choice_counts_zero_padded():
    # a 2-choice, a 3-choice and a 4-choice item, padded to 4
    probs = np.array([[0.6, 0.4, 0, 0], [0.2, 0.5, 0.3, 0], [0.1, 0.2, 0.3, 0.4]])
    labels = np.array([0, 2, 3])
    nc = np.array([2, 3, 4])
    assert M.accuracy(probs, labels, nc) == pytest.approx(2 / 3)
    expected = np.mean([0.16 + 0.16, 0.04 + 0.25 + 0.49, 0.01 + 0.04 + 0.09 + 0.36])
    assert M.brier(probs, labels, nc) == pytest.approx(expected)
    assert M.brier(probs, labels) == pytest.approx(expected)  # padding adds nothing
    ent = M.predictive_entropy(probs, nc)
    assert ent[0] == pytest.approx(-(0.6 * math.log(0.6) + 0.4 * math.log(0.4)))
    with pytest.raises(ValueError, match="past an item"):
        M.accuracy(probs, labels, np.array([2, 2, 4]))
    with pytest.raises(ValueError, match="labels"):
        M.accuracy(probs, np.array([2, 2, 3]), nc)  # label 2 of a 2-choice item


def test_rows_must_be_distributions():
    with pytest.raises(ValueError, match="sum to 1"):
        M.accuracy(np.array([[0.5, 0.4]]), np.array([0]))
    with pytest.raises(ValueError):
        M.accuracy(np.array([[1.2, -0.2]]), np.array([0]))


def test_ece_mce_hand_computed():
    # 15 bins of width 1/15: 0.9 -> bin 13, 0.8 -> bin 11, 0.7 -> bin 10, 0.6 -> bin 8
    assert M.ece(PROBS, LABELS) == pytest.approx((0.1 + 0.8 + 0.3 + 0.6) / 4)
    assert M.mce(PROBS, LABELS) == pytest.approx(0.8)
    # one bin: |mean accuracy - mean confidence|
    assert M.ece(PROBS, LABELS, n_bins=1) == pytest.approx(abs(0.5 - 0.75))
    assert M.mce(PROBS, LABELS, n_bins=1) == pytest.approx(0.25)
    # two bins (0, .5], (.5, 1]: everything in the upper bin
    assert M.ece(PROBS, LABELS, n_bins=2) == pytest.approx(0.25)


def test_bins_are_closed_on_the_right():
    bins = M.reliability_bins(
        np.array([0.0, 0.2, 0.2000001, 0.4, 1.0]), np.array([1, 1, 0, 0, 1]), n_bins=5
    )
    assert bins.count.tolist() == [2, 2, 0, 0, 1]  # 0 and 0.2 in bin 0; 0.4 closes bin 1
    assert bins.accuracy[0] == 1.0 and bins.accuracy[1] == 0.0
    assert np.isnan(bins.accuracy[2])
    assert bins.confidence[1] == pytest.approx((0.2000001 + 0.4) / 2)


def test_perfectly_calibrated_bins_have_zero_ece():
    # 10 items at 0.8 confidence, 8 of them right
    probs = np.tile([0.8, 0.2], (10, 1))
    labels = np.array([0] * 8 + [1] * 2)
    assert M.ece(probs, labels) == pytest.approx(0.0, abs=1e-12)


def test_auroc_hand_computed_and_ties():
    # pairs (correct, wrong): (.9,.8) (.9,.6) (.7,.6) ranked right, (.7,.8) wrong
    assert M.auroc(CONF, RIGHT) == pytest.approx(0.75)
    assert M.auroc(np.array([0.5, 0.5]), np.array([1, 0])) == 0.5
    # one tied pair among four: (1 + 0.5 + 1 + 1) / 4
    assert M.auroc(np.array([0.9, 0.7, 0.7, 0.2]), np.array([1, 1, 0, 0])) == pytest.approx(0.875)
    assert M.auroc(CONF, ~RIGHT) == pytest.approx(0.25)


def test_auroc_undefined_when_all_correct_or_all_wrong():
    assert math.isnan(M.auroc(CONF, np.ones(4, bool)))
    assert math.isnan(M.auroc(CONF, np.zeros(4, bool)))


def test_aurc_hand_computed():
    # risks at coverage 1..4 of 4: 0/1, 1/2, 1/3, 2/4
    assert M.aurc(CONF, RIGHT) == pytest.approx((0 + 1 / 2 + 1 / 3 + 2 / 4) / 4)
    assert M.aurc(CONF, np.ones(4, bool)) == 0.0
    assert M.aurc(CONF, np.zeros(4, bool)) == 1.0


def test_aurc_ties_average_over_orders():
    conf = np.array([0.9, 0.6, 0.6, 0.6, 0.3])
    right = np.array([1, 1, 0, 0, 1], bool)

    def ordered(order):  # AURC of an explicit ranking
        a = right[list(order)]
        return np.mean(np.cumsum(~a) / np.arange(1, len(a) + 1))

    tie_orders = [(0, *p, 4) for p in permutations([1, 2, 3])]
    assert M.aurc(conf, right) == pytest.approx(np.mean([ordered(o) for o in tie_orders]))
    # independent of input order
    perm = np.array([3, 0, 4, 2, 1])
    assert M.aurc(conf[perm], right[perm]) == pytest.approx(M.aurc(conf, right))


def test_e_aurc_zero_for_perfect_ranking_and_near_closed_form():
    conf = np.array([0.9, 0.8, 0.7, 0.6])
    right = np.array([1, 1, 0, 0], bool)
    assert M.e_aurc(conf, right) == pytest.approx(0.0, abs=1e-15)
    assert M.e_aurc(CONF, RIGHT) == pytest.approx(M.aurc(CONF, RIGHT) - (0 + 0 + 1 / 3 + 2 / 4) / 4)
    rng = np.random.default_rng(0)
    n, r = 20000, 0.3
    right = rng.random(n) > r
    r_hat = 1 - right.mean()
    assert M.optimal_aurc(right) == pytest.approx(
        r_hat + (1 - r_hat) * math.log(1 - r_hat), abs=1e-3
    )
    assert M.e_aurc(rng.random(n), right) > 0.1  # a random ranking is far from perfect


def test_coverage_at_risk_and_risk_at_coverage():
    # curve: coverage .25 -> 0, .5 -> .5, .75 -> 1/3, 1 -> .5
    assert M.coverage_at_risk(CONF, RIGHT, 0.0) == 0.25
    assert M.coverage_at_risk(CONF, RIGHT, 0.4) == 0.75
    assert M.coverage_at_risk(CONF, RIGHT, 0.5) == 1.0
    assert M.coverage_at_risk(np.array([0.9, 0.8]), np.array([0, 1]), 0.1) == 0.0  # none
    assert M.risk_at_coverage(CONF, RIGHT, 0.5) == 0.5
    assert M.risk_at_coverage(CONF, RIGHT, 0.6) == pytest.approx(1 / 3)  # next achievable: .75
    assert M.risk_at_coverage(CONF, RIGHT, 1.0) == 0.5
    with pytest.raises(ValueError):
        M.risk_at_coverage(CONF, RIGHT, 0.0)


def test_ties_are_answered_together():
    conf = np.array([0.9, 0.5, 0.5, 0.5])
    right = np.array([1, 1, 0, 1], bool)
    curve = M.risk_coverage_curve(conf, right)
    assert curve.coverage.tolist() == [0.25, 1.0]
    assert curve.threshold.tolist() == [0.9, 0.5]
    assert curve.risk.tolist() == [0.0, 0.25]
    assert M.coverage_at_risk(conf, right, 0.2) == 0.25
    assert M.risk_at_coverage(conf, right, 0.5) == 0.25


def test_entropy_mutual_information_agreement_hand_computed():
    # item 0: two samples that disagree completely; item 1: identical samples
    s = np.array([[[1.0, 0.0], [0.0, 1.0]], [[0.7, 0.3], [0.7, 0.3]]])
    mi = M.mutual_information(s)
    assert mi[0] == pytest.approx(math.log(2))  # H(.5,.5) - 0
    assert mi[1] == pytest.approx(0.0, abs=1e-12)
    ent = M.predictive_entropy(s.mean(1))
    assert ent[0] == pytest.approx(math.log(2))
    # 3 samples, BMA argmax = choice 0; one sample votes for choice 1
    s3 = np.array([[[0.9, 0.1], [0.8, 0.2], [0.4, 0.6]]])
    assert M.sample_agreement(s3)[0] == pytest.approx(2 / 3)
    assert M.sample_agreement(s)[1] == 1.0


def test_risk_averse_confidence():
    s = np.array([[[0.9, 0.1], [0.5, 0.5]], [[0.7, 0.3], [0.7, 0.3]]])
    # item 0: BMA [.7, .3] -> choice 0, p = [.9, .5], mean .7, std .2
    ra = M.risk_averse_confidence(s, lam=1.0)
    assert ra[0] == pytest.approx(0.5)
    assert ra[1] == pytest.approx(0.7)
    assert M.risk_averse_confidence(s, lam=2.0)[0] == pytest.approx(0.3)
    assert M.risk_averse_confidence(s[:, :1], lam=3.0) == pytest.approx([0.9, 0.7])  # K = 1


def test_summarize_overall_and_per_family_json():
    rng = np.random.default_rng(1)
    n, k = 60, 4
    nc = rng.integers(2, 5, n)
    logits = rng.normal(size=(n, k, 4))
    logits[
        np.broadcast_to(np.arange(4)[None, None, :] >= nc[:, None, None], logits.shape)
    ] = -np.inf
    s = np.exp(logits - logits.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    labels = rng.integers(0, nc)
    fams = np.array(["bio", "temporal", "complex"])[rng.integers(0, 3, n)]
    probs = s.mean(1)
    rep = M.summarize(probs, labels, fams, n_choices=nc, sample_probs=s)
    json.dumps(rep, allow_nan=False)  # strict JSON
    o = rep["overall"]
    assert o["n"] == n and o["samples"] == k
    assert o["accuracy"] == pytest.approx(M.accuracy(probs, labels, nc))
    assert o["ece"] == pytest.approx(M.ece(probs, labels, n_choices=nc))
    assert o["brier"] == pytest.approx(M.brier(probs, labels))
    assert o["nll"] == pytest.approx(M.nll(probs, labels))
    conf, right = probs.max(1), probs.argmax(1) == labels
    assert o["aurc"] == pytest.approx(M.aurc(conf, right))
    assert o["coverage_at_risk_0.05"] == M.coverage_at_risk(conf, right, 0.05)
    assert o["risk_at_coverage_0.5"] == M.risk_at_coverage(conf, right, 0.5)
    assert o["mean_mutual_information"] == pytest.approx(M.mutual_information(s).mean())
    assert set(rep["by_family"]) == {"bio", "complex", "temporal"}
    assert sum(f["n"] for f in rep["by_family"].values()) == n
    m = fams == "bio"
    assert rep["by_family"]["bio"]["accuracy"] == pytest.approx(M.accuracy(probs[m], labels[m]))


def test_summarize_undefined_auroc_is_null():
    rep = M.summarize(PROBS, np.array([0, 1, 0, 1]))  # all correct
    assert rep["overall"]["accuracy"] == 1.0
    assert rep["overall"]["auroc"] is None
    assert rep["by_family"] == {}
    json.dumps(rep, allow_nan=False)


def test_above_chance_tells_guessing_from_skill():
    from training.eval.metrics import above_chance

    rng = np.random.default_rng(0)
    k = rng.choice([2, 3, 4], size=400)
    guess = rng.random(400) < 1.0 / k  # a guesser: right with probability 1/k per item
    skilled = rng.random(400) < 0.5 + 0.5 / k  # halfway between guessing and always right
    g, s = above_chance(guess, k), above_chance(skilled, k)
    assert g["chance"] == pytest.approx((1 / k).mean())
    assert g["p_above_chance"] > 0.01
    assert s["p_above_chance"] < 1e-6 and s["z"] > 5
    # exactly chance-level hits on 2-choice items: z just below 0 (continuity correction)
    half = np.arange(100) % 2 == 0
    assert above_chance(half, np.full(100, 2))["z"] == pytest.approx(-0.1)
    with pytest.raises(ValueError, match="n_choices"):
        above_chance(half, np.zeros(100))


def test_summarize_reports_chance_per_family():
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.3, 0.3, 0.4], [0.6, 0.4, 0.0]])
    report = M.summarize(
        probs,
        np.array([0, 1, 2, 1]),
        np.array(["a", "a", "b", "b"]),
        n_choices=np.array([2, 2, 3, 2]),
    )
    assert report["by_family"]["a"]["chance"] == pytest.approx(0.5)
    assert report["by_family"]["b"]["chance"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert report["overall"]["chance"] == pytest.approx((0.5 * 3 + 1 / 3) / 4)
    assert 0 < report["by_family"]["a"]["p_above_chance"] < 0.5


def test_summarize_reports_control_auroc_by_hand():
    """With control items among the families, overall gains the AUROC of telling answerable
    items (max prob 0.9, 0.6, 0.5) from controls (0.7, 0.5): 3 of the 6 pairs above, 1 tie, so
    (3 + 0.5) / 6."""
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.5, 0.5], [0.7, 0.3], [0.5, 0.5]])
    fams = np.array(["a", "a", "b", "control", "control"])
    report = M.summarize(probs, np.array([0, 1, 0, 1, 0]), fams)
    assert report["overall"]["auroc_control"] == pytest.approx(3.5 / 6)
    assert (
        "auroc_control" not in M.summarize(probs, np.zeros(5, int), np.array(["a"] * 5))["overall"]
    )
    from training.eval.evaluate import format_table

    assert "auroc_contro" in format_table({"mean": report})
