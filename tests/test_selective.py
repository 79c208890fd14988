"""Guaranteed-risk thresholds: the exact binomial bound, SGR against brute force, the guarantee
measured on repeated synthetic calibrations, infeasible targets and the stored table format."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import binom

from app.thresholds import threshold_for as server_threshold_for
from training.eval import selective as S


def _draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic scores: c ~ U(0, 1), P(wrong | c) = (1 - c)^2 / 2.

    True selective risk at threshold t: E[wrong | c >= t] = (1 - t)^2 / 6.
    """
    c = rng.random(n)
    wrong = rng.random(n) < 0.5 * (1 - c) ** 2
    return c, ~wrong


def _true_risk(t: float) -> float:
    return (1 - t) ** 2 / 6


def _brute_force(conf: np.ndarray, right: np.ndarray, delta_each: float):
    """Every distinct threshold from strict to loose: (thresholds, coverage, bound).

    Counts by direct comparison per threshold; the exact upper bound by bisection on the binomial
    cdf (independent of the beta quantile used by the module).
    """
    thresholds = np.array(sorted(set(conf.tolist()), reverse=True))
    answered = conf[None, :] >= thresholds[:, None]  # (T, n)
    m = answered.sum(1)
    e = (answered & ~right[None, :]).sum(1)
    lo, hi = e / m, np.ones(len(m))
    for _ in range(60):
        mid = (lo + hi) / 2
        above = binom.cdf(e, m, mid) > delta_each  # bound lies above mid
        lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
    return thresholds, m / len(conf), np.where(e == m, 1.0, hi)


def test_clopper_pearson_upper():
    assert S.clopper_pearson_upper(0, 0, 0.05) == 1.0
    assert S.clopper_pearson_upper(5, 5, 0.05) == 1.0
    # zero errors: (1 - u)^n = delta
    assert S.clopper_pearson_upper(0, 100, 0.05) == pytest.approx(1 - 0.05 ** (1 / 100))
    # defining property: P(Binom(n, u) <= k) = delta
    u = S.clopper_pearson_upper(7, 200, 0.01)
    assert binom.cdf(7, 200, u) == pytest.approx(0.01, rel=1e-6)
    assert u > 7 / 200
    assert S.clopper_pearson_upper(7, 200, 0.001) > u  # more confidence, looser bound
    with pytest.raises(ValueError):
        S.clopper_pearson_upper(3, 2, 0.05)


def test_sgr_matches_brute_force_when_the_bound_is_unimodal():
    # 300 ranked items: one early error, a clean stretch, then only errors; the bound falls while
    # clean items accumulate and rises through the error block
    n = 300
    conf = np.linspace(1, 0, n, endpoint=False)
    right = np.ones(n, bool)
    right[5] = False
    right[200:] = False
    k = S.sgr_probes(n)
    assert k == 9
    thr, cov, bound = _brute_force(conf, right, 0.05 / k)
    for target in (0.05, 0.1, 0.2):
        feasible = np.flatnonzero(bound <= target)
        best = int(feasible.max())
        # precondition of the binary search: the feasible candidates are contiguous and contain
        # the first probe (the middle one)
        assert np.array_equal(feasible, np.arange(feasible.min(), best + 1))
        assert feasible.min() <= (n - 1) // 2 <= best
        res = S.select_threshold(conf, right, target, delta=0.05)
        assert res.feasible
        assert res.threshold == thr[best]
        assert res.coverage == pytest.approx(cov[best])
        assert res.risk_bound == pytest.approx(bound[best], abs=1e-6)


def test_sgr_choice_is_feasible_by_brute_force_on_random_scores():
    rng = np.random.default_rng(3)
    for n in (50, 333, 1000):
        conf, right = _draw(rng, n)
        conf = np.round(conf, 2)  # ties
        k = S.sgr_probes(n)
        thr, cov, bound = _brute_force(conf, right, 0.05 / k)
        for target in (0.02, 0.05, 0.1):
            res = S.select_threshold(conf, right, target, delta=0.05)
            ok = bound <= target
            if not res.feasible:
                assert math.isinf(res.threshold) and res.coverage == 0.0
                continue
            i = int(np.flatnonzero(thr == res.threshold)[0])
            assert ok[i]
            assert res.risk_bound == pytest.approx(bound[i], abs=1e-6)
            assert res.coverage == pytest.approx(cov[i])
            assert res.coverage <= cov[ok].max() + 1e-12
            answered = conf >= res.threshold
            assert res.empirical_risk == pytest.approx((~right[answered]).mean())


@pytest.mark.parametrize("method", ["sgr", "ltt"])
def test_guarantee_holds_on_repeated_calibration(method):
    rng = np.random.default_rng(2024)
    reps, n, target, delta = 300, 1000, 0.05, 0.05
    violations, naive_violations, coverages = 0, 0, []
    for _ in range(reps):
        conf, right = _draw(rng, n)
        res = S.select_threshold(conf, right, target, delta=delta, method=method)
        if res.feasible:
            coverages.append(res.coverage)
            violations += _true_risk(res.threshold) > target
        # without a bound: the loosest threshold whose empirical risk meets the target
        order = np.argsort(-conf)
        emp = np.cumsum(~right[order]) / np.arange(1, n + 1)
        naive_t = conf[order][np.flatnonzero(emp <= target).max()]
        naive_violations += _true_risk(naive_t) > target
    slack = 3 * math.sqrt(delta * (1 - delta) / reps)
    assert violations / reps <= delta + slack
    assert len(coverages) > 0.8 * reps  # some draws are unlucky enough to be infeasible
    # useful, not trivially strict: the oracle coverage is 1 - sqrt(0.3) ~ 0.45
    assert 0.25 < np.mean(coverages) < 1 - math.sqrt(0.3)
    assert naive_violations / reps > 0.2  # the check can fail: ignoring the bound does


def test_realised_risk_on_a_fresh_draw_meets_the_target():
    rng = np.random.default_rng(5)
    conf, right = _draw(rng, 2000)
    res = S.select_threshold(conf, right, 0.05)
    test_conf, test_right = _draw(rng, 200_000)
    answered = test_conf >= res.threshold
    assert (~test_right[answered]).mean() <= 0.05
    assert answered.mean() == pytest.approx(1 - res.threshold, abs=0.01)


def test_infeasible_target_abstains_always():
    rng = np.random.default_rng(0)
    conf, right = _draw(rng, 200)
    res = S.select_threshold(conf, right, 0.001)  # needs ~3000 error-free items
    assert not res.feasible
    assert res.threshold == math.inf and res.coverage == 0.0 and math.isnan(res.empirical_risk)
    assert res.risk_bound > 0.001
    assert not S.select_threshold(conf, ~np.ones(200, bool), 0.2).feasible  # all wrong
    assert not S.select_threshold(np.array([]), np.array([], bool), 0.2).feasible
    assert not S.select_threshold(conf, right, 0.001, method="ltt").feasible


def test_all_correct_gives_full_coverage():
    conf = np.linspace(0.3, 1, 500)
    for method in S.METHODS:
        res = S.select_threshold(conf, np.ones(500, bool), 0.05, method=method)
        assert res.feasible and res.coverage == 1.0 and res.threshold == pytest.approx(0.3)
        assert res.empirical_risk == 0.0


def test_ltt_stops_at_first_failure():
    # 100 ranked items, one error at rank 60; the first testable candidate answers
    # ceil(log(.05) / log(.9)) = 29 items
    conf = np.linspace(1, 0, 100, endpoint=False)
    right = np.ones(100, bool)
    right[60] = False
    res = S.select_threshold(conf, right, 0.1, delta=0.05, method="ltt")
    assert res.feasible and res.coverage == 1.0  # every bound <= 0.1, last: 1 error in 100
    assert res.risk_bound == pytest.approx(S.clopper_pearson_upper(1, 100, 0.05))
    # a burst from rank 65: 66 items hold 2 errors (bound .092), 67 hold 3 (bound .112): stop,
    # even though looser candidates are never reached
    right[65:75] = False
    res = S.select_threshold(conf, right, 0.1, delta=0.05, method="ltt")
    assert res.feasible and res.coverage == pytest.approx(0.66)
    assert res.risk_bound == pytest.approx(S.clopper_pearson_upper(2, 66, 0.05))
    # too few items for any test
    assert not S.select_threshold(conf[:20], right[:20], 0.1, method="ltt").feasible


def test_table_json_round_trip_and_threshold_for():
    rng = np.random.default_rng(7)
    conf, right = _draw(rng, 1000)
    table = S.calibrate_table(conf, right, targets=(0.2, 0.001, 0.05, 0.1), delta=0.05)
    assert [r.target_risk for r in table] == [0.001, 0.05, 0.1, 0.2]
    assert not table[0].feasible and all(r.feasible for r in table[1:])
    # looser target, lower threshold, more coverage
    assert table[1].threshold >= table[2].threshold >= table[3].threshold
    doc = S.table_to_json(table)
    text = json.dumps(doc, allow_nan=False)
    assert doc["method"] == "sgr" and doc["n"] == 1000 and doc["delta"] == 0.05
    assert doc["targets"][0]["threshold"] is None and doc["targets"][0]["feasible"] is False
    back = S.table_from_json(json.loads(text))
    assert back[1:] == table[1:]
    assert back[0].threshold == math.inf and not back[0].feasible
    for max_risk in (0.0005, 0.001, 0.01, 0.05, 0.07, 0.1, 0.5):
        ours = S.threshold_for(table, max_risk)
        assert ours == S.threshold_for(doc, max_risk)
        assert ours == server_threshold_for(doc, max_risk).value  # the server's rule agrees
    assert S.threshold_for(table, 0.0005) == math.inf  # below every target
    assert S.threshold_for(table, 0.01) == math.inf  # largest target <= 0.01 is infeasible
    assert S.threshold_for(table, 0.07) == table[1].threshold


def test_invalid_arguments():
    conf, right = np.array([0.5, 0.6]), np.array([1, 0])
    with pytest.raises(ValueError):
        S.select_threshold(conf, right, 0.0)
    with pytest.raises(ValueError):
        S.select_threshold(conf, right, 0.1, delta=1.0)
    with pytest.raises(ValueError):
        S.select_threshold(conf, right, 0.1, method="bonferroni")
    with pytest.raises(ValueError):
        S.select_threshold(conf, np.array([2, 0]), 0.1)
    with pytest.raises(ValueError):
        S.ThresholdResult(0.1, 0.05, math.inf, 0.0, math.nan, 1.0, 10, True)
    with pytest.raises(ValueError):
        S.table_from_json({"delta": 0.05, "targets": []})
