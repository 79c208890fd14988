"""training/eval/served.py: the server's threshold rule replayed on cached predictions, on a
hand-checked example."""

from __future__ import annotations

import numpy as np
import pytest

from training.data.manifest import Item
from training.eval.predictions import SplitPredictions
from training.eval.served import (
    family_accuracy_vs_chance,
    served_items,
    served_summary,
    versus,
)


def _item(i: int, family: str, control: str = "") -> Item:
    diff = {"control": control} if control else {}
    return Item(f"t-{i}", f"a/{i}.wav", "q?", ("a", "b"), 0, family, "test", 2.0, diff)


def _preds(conf: list[float], right: list[bool], families: list[str]) -> SplitPredictions:
    """Two-choice items: label 0; the top choice has probability conf, on the label iff right."""
    p = np.array(
        [[c, 1 - c] if r else [1 - c, c] for c, r in zip(conf, right, strict=True)], np.float32
    )
    n = len(conf)
    return SplitPredictions(
        p, p[:, None, :].repeat(2, 1), np.zeros(n, int), np.full(n, 2), np.array(families)
    )


CALIB = {
    "targets": [
        {"max_risk": 0.05, "threshold": None, "coverage": 0.0, "feasible": False},
        {"max_risk": 0.1, "threshold": 0.9, "coverage": 0.3, "feasible": True},
        {"max_risk": 0.2, "threshold": 0.7, "coverage": 0.6, "feasible": True},
    ]
}


# 6 answerable items, 2 controls. Confidence >= 0.9 answers at the default target (0.1, the
# lowest feasible): items 0, 1, 2 (one wrong) and control 6 (wrong).
BY_HAND_CONF = [0.95, 0.92, 0.91, 0.8, 0.6, 0.55, 0.93, 0.5]
BY_HAND_RIGHT = [True, True, False, True, True, False, False, True]


def _by_hand() -> tuple[SplitPredictions, list[Item]]:
    fams = ["f"] * 6 + ["control"] * 2
    items = [_item(i, f, "silence" if f == "control" else "") for i, f in enumerate(fams)]
    return _preds(BY_HAND_CONF, BY_HAND_RIGHT, fams), items


def test_served_summary_by_hand() -> None:
    preds, items = _by_hand()
    out = served_summary(preds, items, CALIB, samples=2)
    d = out["default_target"]
    assert d["max_risk"] == 0.1 and d["threshold"] == 0.9
    assert d["answered"] == 4 and d["coverage"] == pytest.approx(4 / 8)
    assert d["coverage_answerable"] == pytest.approx(3 / 6)
    assert d["risk"] == pytest.approx(2 / 4)
    assert d["within_target"] is False
    assert 0.5 < d["risk_upper_bound"] < 1.0
    ctl = out["controls_abstention"]
    assert ctl["n"] == 2 and ctl["targets"]["0.1"]["abstention"] == pytest.approx(0.5)
    assert ctl["targets"]["0.05"]["abstention"] == 1.0  # infeasible: abstain on everything
    f = out["families"]["f"]
    assert (
        f["n"] == 6 and f["accuracy"] == pytest.approx(4 / 6) and "control" not in out["families"]
    )
    # a configured target overrides the lowest feasible one
    d2 = served_summary(preds, items, CALIB, 2, configured_risk=0.2)
    assert d2["default_target"]["threshold"] == 0.7 and d2["default_target"]["answered"] == 5


def test_served_summary_with_the_answerable_decision_by_hand() -> None:
    """The stored decision replaces the max-probability rule: its score (max probability x
    (1 - P(control)) ** power) against its own table."""
    from app.scores import Decision

    preds, items = _by_hand()
    p_control = np.array([0.0, 0.1, 0.0, 0.0, 0.0, 0.0, 0.5, 0.9])
    table = {"targets": [{"max_risk": 0.1, "threshold": 0.8, "coverage": 0.4, "feasible": True}]}
    decision = Decision(score="answerable", control_power=2.0, calibration=table)
    got = served_items(preds, items, CALIB, 2, decision=decision, p_control=p_control)
    want = np.array(BY_HAND_CONF) * (1 - p_control) ** 2  # 0.95, 0.745, 0.91, 0.8, ..., 0.2325
    np.testing.assert_allclose(got.confidence, want)
    assert got.threshold == 0.8 and got.calibration is table
    assert got.answered.tolist() == [True, False, True, True, False, False, False, False]
    out = served_summary(preds, items, CALIB, 2, decision=decision, p_control=p_control)
    assert out["score"] == "answerable"
    assert out["default_target"]["answered"] == 3 and out["default_target"]["risk"] == 1 / 3
    # control 6 (0.93 x 0.25) is now withheld: both controls at the decision's table's 0.1
    assert out["controls_abstention"]["targets"]["0.1"]["abstention"] == 1.0
    with pytest.raises(ValueError, match="p_control"):
        served_items(preds, items, CALIB, 2, decision=decision)


def test_no_table_answers_everything_and_claims_no_guarantee() -> None:
    preds = _preds([0.9, 0.6], [True, False], ["f", "f"])
    d = served_summary(preds, [_item(0, "f"), _item(1, "f")], {"targets": []}, 2)
    assert d["default_target"]["guaranteed_by"] is None and d["default_target"]["answered"] == 2
    assert d["default_target"]["within_target"] is None  # nothing was guaranteed


def test_binomial_p_values() -> None:
    # 30 of 40 right at chance 1/2: P(X >= 30) for Binomial(40, 0.5) = 0.001111 (by hand: sum of
    # C(40, k) / 2^40 for k = 30..40); 20 of 40 at chance 1/2 is not evidence (p > 0.5).
    correct = np.array([True] * 30 + [False] * 10 + [True] * 20 + [False] * 20)
    fams = np.array(["a"] * 40 + ["b"] * 40)
    out = family_accuracy_vs_chance(correct, fams, np.full(80, 2))
    assert out["a"]["p_value"] == pytest.approx(0.0011107, rel=1e-3)
    assert out["b"]["p_value"] > 0.5
    assert out["a"]["chance"] == 0.5


def test_item_count_must_match() -> None:
    preds = _preds([0.9], [True], ["f"])
    with pytest.raises(ValueError, match="2 items but predictions for 1"):
        served_summary(preds, [_item(0, "f"), _item(1, "f")], CALIB, 2)


def test_served_items_are_the_summary_per_item() -> None:
    preds, items = _by_hand()
    got = served_items(preds, items, CALIB, samples=2)
    assert got.answered.tolist() == [True, True, True, False, False, False, True, False]
    assert got.correct.tolist() == BY_HAND_RIGHT
    assert got.control.tolist() == [False] * 6 + [True] * 2
    d = served_summary(preds, items, CALIB, samples=2)["default_target"]
    assert got.answered.sum() == d["answered"]


def test_versus_by_hand() -> None:
    # 4 controls, 4 synthetic ("count") and 4 real ("pitch_real") items. The new posterior
    # withholds 3 controls (the old one 1), gets 2 of 4 synthetic (old 3) and 4 of 4 real (old 1).
    fams = ["control"] * 4 + ["count"] * 4 + ["pitch_real"] * 4
    items = [_item(i, f, "noise" if f == "control" else "") for i, f in enumerate(fams)]
    new = _preds(
        [0.95, 0.6, 0.6, 0.6] + [0.8] * 8,
        [True] * 4 + [True, True, False, False] + [True] * 4,
        fams,
    )
    old = _preds(
        [0.95, 0.95, 0.95, 0.6] + [0.8] * 8,
        [True] * 4 + [True, True, True, False] + [True, False, False, False],
        fams,
    )
    calib = {"targets": [{"max_risk": 0.2, "threshold": 0.7, "coverage": 0.5, "feasible": True}]}
    a, b = (served_items(x, items, calib, samples=2) for x in (new, old))
    out = versus(a, b, synthetic=("count",), n_boot=200, seed=1)
    assert out["controls_withheld"]["a"] == 0.75 and out["controls_withheld"]["b"] == 0.25
    assert out["synthetic_accuracy"]["diff"] == pytest.approx(-0.25)
    assert out["real_accuracy"]["diff"] == pytest.approx(0.75)
    assert {k: v["n"] for k, v in out.items()} == {
        "controls_withheld": 4,
        "synthetic_accuracy": 4,
        "real_accuracy": 4,
    }
    # paired: every resample of the real items keeps new >= old, so the interval is >= 0
    assert out["real_accuracy"]["low"] >= 0 and out["real_accuracy"]["high"] <= 1
    # no synthetic family on the split: no synthetic row, every answerable item is "real";
    # decisions on other items are refused
    no_ctl = versus(*(served_items(x, items, calib, 2) for x in (new, old)), synthetic=("x",))
    assert "synthetic_accuracy" not in no_ctl and no_ctl["real_accuracy"]["n"] == 8
    with pytest.raises(ValueError, match="same items"):
        versus(a, served_items(_preds([0.9], [True], ["f"]), [_item(0, "f")], calib, 2), ("f",))
