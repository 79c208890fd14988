"""The real-sounds goals (training/recipes/default_goals.py) on hand-made served summaries."""

from __future__ import annotations

import copy

from training.recipes.default_goals import goals_section, shipping_goals, unmet


def _summary(coverage=0.4, risk=0.15, within=True, abstention=0.95, guaranteed=0.2):
    return {
        "default_target": {
            "max_risk": 0.2,
            "guaranteed_by": guaranteed,
            "coverage": coverage,
            "risk": risk,
            "within_target": within,
        },
        "controls_abstention": {"n": 40, "targets": {"0.2": {"abstention": abstention}}},
        "families": {
            "sound_class": {"n": 50, "accuracy": 0.6, "chance": 1 / 3, "p_value": 1e-4},
            "pitch_real": {"n": 45, "accuracy": 0.8, "chance": 0.5, "p_value": 2e-5},
            "tiny_family": {"n": 12, "accuracy": 0.2, "chance": 0.5, "p_value": 0.9},
        },
    }


def _served():
    test = _summary()
    test["synthetic"] = {"n": 500, "accuracy": 0.7}
    return {"test": test, "test_real": _summary()}


def _by_goal(rows):
    return {(r["goal"].split(" ")[0], r["split"]): r["pass"] for r in rows}


def test_a_run_that_meets_every_goal_passes_all_checkable_rows():
    rows = _by_goal(shipping_goals(_served()))
    assert rows[("sound_class", "test_real")] is True
    assert rows[("pitch_real", "test_real")] is True
    assert rows[("tiny_family", "test_real")] is None  # 12 items: too few to test
    assert rows[("coverage", "test_real")] is True
    assert rows[("controls", "test")] is True and rows[("controls", "test_real")] is True
    assert rows[("synthetic", "test")] is True


def test_each_goal_fails_on_its_own():
    served = _served()
    served["test_real"]["families"]["pitch_real"]["p_value"] = 0.02
    assert _by_goal(shipping_goals(served))[("pitch_real", "test_real")] is False
    for change in ({"coverage": 0.29}, {"within": False}, {"within": None, "risk": None}):
        served = _served()
        served["test_real"] = _summary(**change)
        assert _by_goal(shipping_goals(served))[("coverage", "test_real")] is False, change
    served = _served()
    served["test"]["controls_abstention"]["targets"]["0.2"]["abstention"] = 0.89
    rows = _by_goal(shipping_goals(served))
    assert rows[("controls", "test")] is False and rows[("controls", "test_real")] is True
    served = _served()
    served["test"]["synthetic"]["accuracy"] = 0.65
    assert _by_goal(shipping_goals(served))[("synthetic", "test")] is False


def test_without_any_guaranteed_target_controls_are_withheld_and_coverage_fails():
    served = _served()
    served["test_real"] = _summary(guaranteed=None, coverage=0.0, risk=None, within=None)
    rows = _by_goal(shipping_goals(served))
    assert rows[("controls", "test_real")] is True  # the server abstains on everything
    assert rows[("coverage", "test_real")] is False


def test_the_section_says_whether_the_run_ships():
    rows = shipping_goals(_served())
    text = "\n".join(goals_section(rows, "ivon"))
    assert "1 of 7 goals do not pass: this run does not ship." in text  # tiny_family: n/a
    assert "| tiny_family above chance (p < 0.01, n >= 40) | test_real | n/a |" in text
    ok = [r for r in copy.deepcopy(rows) if r["pass"] is not None]
    assert "Every goal passes" in "\n".join(goals_section(ok, "ivon"))
    missing = shipping_goals({"test": _served()["test"]})
    assert any(r["split"] == "test_real" and r["pass"] is None for r in missing)


def test_unmet_lists_what_blocks_shipping():
    rows = shipping_goals(_served())
    assert [r["goal"].split(" ")[0] for r in unmet(rows)] == ["tiny_family"]
    assert unmet(None) == [] and unmet([r for r in rows if r["pass"]]) == []
