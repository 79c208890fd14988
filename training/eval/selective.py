"""Confidence thresholds with a finite-sample risk guarantee, and the calibration table format.

`quaver calibrate` runs this on a held-out calibration split and stores the table in the
posterior's quaver.json under "calibration"; the server reads it with `app.thresholds`
(same selection rule as `threshold_for` here):

    table = calibrate_table(confidence, correct, targets=(0.01, 0.05, 0.1), delta=0.05)
    meta["calibration"] = table_to_json(table)
    tau = threshold_for(table, max_risk=0.05)    # abstain iff confidence < tau

Methods (both assume calibration and future items are exchangeable; under shift, report the
realised risk against the target rather than trusting the bound):
- "sgr": Selection with Guaranteed Risk (Geifman & El-Yaniv, 2017). The candidates are the
  distinct calibration confidences. A binary search probes at most k = ceil(log2 n) of them; each
  probe bounds its selective risk with a one-sided Clopper-Pearson upper bound at confidence
  1 - delta/k (union bound over the probes). The result is the probed candidate with the largest
  coverage whose bound is <= the target; with probability >= 1 - delta its true selective risk is
  <= the target.
- "ltt": fixed-sequence Learn-then-Test. Candidates are tested from strict to loose, each at the
  full delta (binomial test of H0: risk > target, equivalent to the Clopper-Pearson bound at
  1 - delta being <= target); the sequence stops at the first candidate that fails, and the last
  one that passed is returned. Candidates answering fewer items than any zero-error test could
  reject are skipped: they can never pass, and skipping depends on the scores only.

A target that no candidate meets gives `feasible=False` and threshold +inf (abstain always).
Abstain rule everywhere: abstain iff confidence < threshold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import beta

from training.eval.metrics import RiskCoverage, risk_coverage_curve

METHODS = ("sgr", "ltt")
DEFAULT_TARGETS = (0.01, 0.02, 0.05, 0.1, 0.2)


def clopper_pearson_upper(k: int, n: int, delta: float) -> float:
    """One-sided exact binomial upper bound: P(true rate <= bound) >= 1 - delta for k errors in n.

    n = 0 (no evidence) and k = n give 1.0.
    """
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    if n < 0 or not 0 <= k <= max(n, 0):
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0 or k == n:
        return 1.0
    return float(beta.ppf(1.0 - delta, k + 1, n - k))


@dataclass(frozen=True)
class ThresholdResult:
    """One calibrated risk target."""

    target_risk: float  # selective risk not to exceed, with probability >= 1 - delta
    delta: float  # allowed failure probability of the guarantee
    threshold: float  # abstain iff confidence < threshold; +inf = abstain always
    coverage: float  # fraction of calibration items answered at threshold (0 when infeasible)
    empirical_risk: float  # error rate of the answered calibration items (nan when infeasible)
    # upper bound on the selective risk at threshold; when infeasible, the tightest bound found
    # (> target), showing how far the target is out of reach
    risk_bound: float
    n: int  # calibration items
    feasible: bool  # False: no candidate met the target, the server abstains always
    method: str = "sgr"  # "sgr" or "ltt"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.feasible == math.isinf(self.threshold):
            raise ValueError("threshold must be finite iff the target is feasible")


def _inputs(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(confidence, dtype=np.float64)
    a = np.asarray(correct)
    if c.ndim != 1 or a.shape != c.shape:
        raise ValueError("confidence and correct must be 1-D arrays of the same length")
    if not np.all(np.isfinite(c)):
        raise ValueError("confidence must be finite")
    if not np.all((a == 0) | (a == 1)):
        raise ValueError("correct must hold booleans or 0/1")
    return c, a.astype(bool)


def sgr_probes(n: int) -> int:
    """Number of candidates SGR may probe on n items, k = max(1, ceil(log2 n))."""
    return max(1, math.ceil(math.log2(n))) if n > 1 else 1


def _result(
    curve: RiskCoverage,
    i: int | None,
    bound: float,
    target: float,
    delta: float,
    n: int,
    method: str,
) -> ThresholdResult:
    if i is None:
        return ThresholdResult(target, delta, math.inf, 0.0, math.nan, bound, n, False, method)
    return ThresholdResult(
        target,
        delta,
        float(curve.threshold[i]),
        float(curve.coverage[i]),
        float(curve.risk[i]),
        bound,
        n,
        True,
        method,
    )


def _sgr(curve: RiskCoverage, target: float, delta: float, n: int) -> ThresholdResult:
    k = sgr_probes(n)
    delta_each = delta / k  # union bound over the k probes
    # candidates in curve order: index 0 strictest (fewest answered), last answers everything
    lo, hi = 0, len(curve.threshold) - 1
    best, best_bound, tightest = None, math.nan, math.inf
    for _ in range(k):
        if lo > hi:
            break
        mid = (lo + hi) // 2
        bound = clopper_pearson_upper(int(curve.errors[mid]), int(curve.answered[mid]), delta_each)
        tightest = min(tightest, bound)
        if bound <= target:
            if best is None or mid > best:  # later index = larger coverage
                best, best_bound = mid, bound
            lo = mid + 1  # met: try a looser threshold
        else:
            hi = mid - 1  # missed: try a stricter threshold
    return _result(
        curve, best, best_bound if best is not None else tightest, target, delta, n, "sgr"
    )


def _ltt(curve: RiskCoverage, target: float, delta: float, n: int) -> ThresholdResult:
    # a candidate answering m items can pass only if (1 - target)^m <= delta (zero errors)
    testable = np.flatnonzero(curve.answered >= math.log(delta) / math.log1p(-target))
    if len(testable) == 0:
        return _result(curve, None, 1.0, target, delta, n, "ltt")
    m, e = curve.answered[testable], curve.errors[testable]
    # Clopper-Pearson upper bounds of all testable candidates at once (strict to loose)
    bounds = np.where(e >= m, 1.0, beta.ppf(1.0 - delta, e + 1, np.maximum(m - e, 1)))
    failed = np.flatnonzero(bounds > target)
    stop = failed[0] if len(failed) else len(bounds)  # fixed sequence: stop at the first failure
    if stop == 0:
        return _result(curve, None, float(bounds[0]), target, delta, n, "ltt")
    return _result(curve, int(testable[stop - 1]), float(bounds[stop - 1]), target, delta, n, "ltt")


def select_threshold(
    confidence: np.ndarray,
    correct: np.ndarray,
    target_risk: float,
    delta: float = 0.05,
    method: str = "sgr",
) -> ThresholdResult:
    """The threshold with the largest calibration coverage whose risk bound is <= target_risk.

    confidence: (n,) scores (higher = more confident); correct: (n,) bool. Abstain iff
    confidence < threshold. See the module docstring for the methods and the guarantee.
    """
    if not 0.0 < target_risk < 1.0:
        raise ValueError(f"target_risk must lie in (0, 1), got {target_risk}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    c, a = _inputs(confidence, correct)
    n = len(c)
    if n == 0:
        return ThresholdResult(target_risk, delta, math.inf, 0.0, math.nan, 1.0, 0, False, method)
    curve = risk_coverage_curve(c, a)
    return (_sgr if method == "sgr" else _ltt)(curve, target_risk, delta, n)


def calibrate_table(
    confidence: np.ndarray,
    correct: np.ndarray,
    targets: Sequence[float] = DEFAULT_TARGETS,
    delta: float = 0.05,
    method: str = "sgr",
) -> list[ThresholdResult]:
    """One `select_threshold` result per target, sorted by target.

    Each entry holds with probability >= 1 - delta on its own (the server uses one target per
    request).
    """
    if not targets:
        raise ValueError("targets must not be empty")
    if len(set(targets)) != len(targets):
        raise ValueError(f"targets must be distinct, got {tuple(targets)}")
    return [select_threshold(confidence, correct, t, delta, method) for t in sorted(targets)]


def _none_if_nonfinite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def table_to_json(table: Sequence[ThresholdResult]) -> dict:
    """The "calibration" entry of quaver.json (strict JSON: inf / nan are written as null)."""
    if not table:
        raise ValueError("empty calibration table")
    head = table[0]
    if any((r.delta, r.method, r.n) != (head.delta, head.method, head.n) for r in table):
        raise ValueError("all entries of a table must share delta, method and n")
    return {
        "delta": head.delta,
        "method": head.method,
        "n": head.n,
        "targets": [
            {
                "max_risk": r.target_risk,
                "threshold": _none_if_nonfinite(r.threshold),
                "coverage": r.coverage,
                "risk_bound": _none_if_nonfinite(r.risk_bound),
                "empirical_risk": _none_if_nonfinite(r.empirical_risk),
                "feasible": r.feasible,
            }
            for r in table
        ],
    }


def table_from_json(calibration: Mapping) -> list[ThresholdResult]:
    """Inverse of `table_to_json`; a missing or null threshold of an infeasible entry is +inf."""
    try:
        delta, method = float(calibration["delta"]), str(calibration["method"])
        n = int(calibration["n"])
        out = []
        for e in calibration["targets"]:
            feasible = bool(e.get("feasible", True))
            thr = e.get("threshold")
            out.append(
                ThresholdResult(
                    target_risk=float(e["max_risk"]),
                    delta=delta,
                    threshold=float(thr) if feasible else math.inf,
                    coverage=float(e.get("coverage", 0.0)),
                    empirical_risk=math.nan
                    if e.get("empirical_risk") is None
                    else float(e["empirical_risk"]),
                    risk_bound=math.nan if e.get("risk_bound") is None else float(e["risk_bound"]),
                    n=n,
                    feasible=feasible,
                    method=method,
                )
            )
    except (KeyError, TypeError) as err:
        raise ValueError(f"malformed calibration table: {err!r}") from err
    return sorted(out, key=lambda r: r.target_risk)


def threshold_for(table: Sequence[ThresholdResult] | Mapping, max_risk: float) -> float:
    """Threshold for a request's max_risk: the entry with the largest target <= max_risk.

    The server applies the same rule (app.thresholds.threshold_for) to the stored JSON. An
    infeasible entry, or a max_risk below every target, gives +inf: abstain always.
    """
    entries = table_from_json(table) if isinstance(table, Mapping) else list(table)
    if not entries:
        raise ValueError("empty calibration table")
    usable = [r for r in entries if r.target_risk <= max_risk + 1e-12]
    if not usable:
        return math.inf
    best = max(usable, key=lambda r: r.target_risk)
    return best.threshold if best.feasible else math.inf
