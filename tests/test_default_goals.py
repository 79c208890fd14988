"""The real-sounds goals (training/recipes/default_goals.py) on hand-made served summaries."""

from __future__ import annotations

import copy

from training.recipes.default_goals import blocking, goals_section, shipping_goals, unmet


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
    assert rows[("coverage", "test_real")] is True and rows[("realised", "test_real")] is True
    assert rows[("controls", "test")] is True and rows[("controls", "test_real")] is True
    assert rows[("synthetic", "test")] is True


def test_each_goal_fails_on_its_own():
    served = _served()
    served["test_real"]["families"]["pitch_real"]["p_value"] = 0.02
    assert _by_goal(shipping_goals(served))[("pitch_real", "test_real")] is False
    served["test_real"] = _summary(coverage=0.29)
    rows = _by_goal(shipping_goals(served))
    assert rows[("coverage", "test_real")] is False and rows[("realised", "test_real")] is True
    served["test_real"] = _summary(within=False)
    rows = _by_goal(shipping_goals(served))
    assert rows[("coverage", "test_real")] is True and rows[("realised", "test_real")] is False
    # no answers at all: no breach of the guarantee, and no coverage
    served["test_real"] = _summary(coverage=0.0, within=None, risk=None)
    rows = _by_goal(shipping_goals(served))
    assert rows[("coverage", "test_real")] is False and rows[("realised", "test_real")] is True
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
    # without a shipped default to compare with, the fixed bars block; tiny_family (n/a) does not
    assert "1 of 8 goals do not pass, none of them a blocking one: this run may ship" in text
    assert "| tiny_family above chance (p < 0.01, n >= 40) | test_real | n/a | no |" in text
    served = _served()
    served["test"]["synthetic"]["accuracy"] = 0.6
    text = "\n".join(goals_section(shipping_goals(served), "ivon"))
    assert "2 of 8 goals do not pass, 1 of them blocking: this run does not ship." in text
    ok = [r for r in copy.deepcopy(rows) if r["pass"] is not None]
    assert "Every goal passes" in "\n".join(goals_section(ok, "ivon"))
    missing = shipping_goals({"test": _served()["test"]})
    assert any(r["split"] == "test_real" and r["pass"] is None for r in missing)


def test_unmet_lists_what_fails_and_blocking_what_holds_a_run_back():
    rows = shipping_goals(_served())
    assert [r["goal"].split(" ")[0] for r in unmet(rows)] == ["tiny_family"]
    assert unmet(None) == [] and unmet([r for r in rows if r["pass"]]) == []
    assert blocking(rows) == [] and blocking(None) == []
    # a family below chance, or the coverage target missed, does not hold a run back
    served = _served()
    served["test_real"]["families"]["pitch_real"]["p_value"] = 0.5
    served["test_real"]["default_target"]["coverage"] = 0.1
    assert len(unmet(shipping_goals(served))) == 3 and blocking(shipping_goals(served)) == []
    # each guard of what users have today blocks: controls, synthetic, the realised risk
    for change in ("controls", "synthetic", "risk"):
        served = _served()
        if change == "controls":
            served["test"]["controls_abstention"]["targets"]["0.2"]["abstention"] = 0.5
        elif change == "synthetic":
            served["test"]["synthetic"]["accuracy"] = 0.5
        else:
            served["test_real"] = _summary(within=False)
        assert len(blocking(shipping_goals(served))) == 1, change
    # a run without test_real cannot show it hears real recordings: it does not ship
    assert blocking(shipping_goals({"test": _served()["test"]}))


def _versus(controls=(0.05, 0.2), synthetic=(-0.03, 0.02), real=(0.1, 0.3)):
    """versus() output with the given (low, high) intervals of new - old."""

    def d(low, high):
        return {"a": 0.6, "b": 0.5, "diff": (low + high) / 2, "low": low, "high": high, "n": 90}

    return {
        "test": {"controls_withheld": d(*controls), "synthetic_accuracy": d(*synthetic)},
        "test_shift": {"controls_withheld": d(*controls), "synthetic_accuracy": d(*synthetic)},
        "test_real": {"controls_withheld": d(*controls), "real_accuracy": d(*real)},
    }


def test_against_the_shipped_default_the_comparison_blocks_not_the_fixed_bars():
    served = _served()
    served["test"]["synthetic"]["accuracy"] = 0.65  # below the fixed bar ...
    served["test_real"]["controls_abstention"]["targets"]["0.2"]["abstention"] = 0.85
    rows = shipping_goals(served, versus=_versus())
    assert len(unmet(rows)) == 3  # tiny_family, synthetic >= 66 %, controls >= 90 %
    assert blocking(rows) == []  # ... but no worse than the shipped default: it may ship
    by = {(r["goal"].split(":")[0], r["split"]): r for r in rows if "shipped" in r["goal"]}
    assert set(by) == {
        ("controls withheld", "test"),
        ("controls withheld", "test_shift"),
        ("controls withheld", "test_real"),
        ("synthetic families' accuracy", "test"),
        ("synthetic families' accuracy", "test_shift"),
        ("accuracy on real recordings", "test_real"),
    }
    assert by[("accuracy on real recordings", "test_real")]["detail"] == (
        "60.0% vs 50.0%: +20.0 points [+10.0, +30.0], n = 90"
    )


def test_each_comparison_with_the_shipped_default_blocks_on_its_own():
    cases = {
        "controls": ({"controls": (-0.2, -0.01)}, 3),  # fewer withheld, on all three splits
        "synthetic": ({"synthetic": (-0.1, -0.02)}, 2),  # worse on test and test_shift
        "real, not better": ({"real": (-0.01, 0.2)}, 1),  # must be better, not just not worse
    }
    for name, (change, n_blocking) in cases.items():
        held = blocking(shipping_goals(_served(), versus=_versus(**change)))
        assert len(held) == n_blocking and all("shipped" in r["goal"] for r in held), name
    # an interval touching zero is not a loss; one the bootstrap could not compute is unchecked
    assert blocking(shipping_goals(_served(), versus=_versus(synthetic=(-0.05, 0.0)))) == []
    vs = _versus()
    vs["test_real"]["real_accuracy"].update(low=None, high=None)
    [held] = blocking(shipping_goals(_served(), versus=vs))
    assert held["pass"] is None and held["goal"].startswith("accuracy on real recordings")
    # a comparison without the real split cannot show the new default hears better
    del vs["test_real"]
    [held] = blocking(shipping_goals(_served(), versus=vs))
    assert held["split"] == "test_real" and held["detail"].endswith("n = 0")
