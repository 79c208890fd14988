"""Reading the selective-prediction threshold table stored in a posterior's quaver.json.

`quaver calibrate` writes, under "calibration", one entry per target risk:
`{"max_risk": 0.05, "threshold": 0.83, "coverage": 0.61, "risk_bound": 0.049, "feasible": true}`.
A request's `max_risk` picks the entry with the largest target not above it; the answer is
withheld (abstain) iff confidence < threshold. An infeasible target has threshold +inf (abstain
always): no threshold met the guarantee on the calibration split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Threshold:
    value: float  # abstain iff confidence < value; +inf = always abstain
    max_risk: float | None  # the calibrated target used (None = no table: never abstain)
    calibrated: bool


def _is_guaranteed(entry: dict) -> bool:
    """Whether a table entry's threshold met its guarantee on the calibration split."""
    return bool(entry.get("feasible", True)) and entry.get("threshold") is not None


def _guaranteed(calibration: dict | None) -> list[dict]:
    """The table's guaranteed entries, by target."""
    entries = (calibration or {}).get("targets") or []
    return sorted(filter(_is_guaranteed, entries), key=lambda e: float(e["max_risk"]))


def lowest_guaranteed_risk(calibration: dict | None) -> float | None:
    """The smallest target whose threshold met its guarantee on the calibration split (None: no
    table, or no target met): what a client should ask for at the least."""
    guaranteed = _guaranteed(calibration)
    return float(guaranteed[0]["max_risk"]) if guaranteed else None


FALLBACK_RISK = 0.05  # the default target where the table guarantees none (or there is none)
# The share of requests the default target should answer, read on the calibration split: a
# first request should be answered more often than not withheld for want of confidence, and 30 %
# is the coverage the embedded default is asked for on real recordings (docs/real_sounds.md).
DEFAULT_MIN_COVERAGE = 0.3


def default_risk(
    calibration: dict | None,
    configured: float | None,
    min_coverage: float = DEFAULT_MIN_COVERAGE,
) -> float:
    """The risk target of a request that names none: the configured one, else the lowest
    target the posterior guarantees with at least `min_coverage` of the calibration split
    answered. Without such a target, the guaranteed one with the most coverage (the highest);
    with `min_coverage` 0, or where the table records no coverage, the lowest guaranteed one.
    The lowest guaranteed target alone can answer almost nothing: a table that newly
    guarantees 0.1 at 13 % coverage would make a first user's answers mostly "abstain"."""
    if configured is not None:
        return configured
    guaranteed = _guaranteed(calibration)
    if not guaranteed:
        return FALLBACK_RISK
    if min_coverage <= 0 or any(e.get("coverage") is None for e in guaranteed):
        return float(guaranteed[0]["max_risk"])
    for e in guaranteed:
        if float(e["coverage"]) >= min_coverage - 1e-12:
            return float(e["max_risk"])
    return float(guaranteed[-1]["max_risk"])


def targets(calibration: dict | None) -> list[dict]:
    """The table for people: [{max_risk, feasible, coverage, threshold}] by target."""
    entries = (calibration or {}).get("targets") or []
    out = []
    for e in sorted(entries, key=lambda e: float(e["max_risk"])):
        feasible = _is_guaranteed(e)
        out.append(
            {
                "max_risk": float(e["max_risk"]),
                "feasible": feasible,
                "coverage": float(e["coverage"]) if e.get("coverage") is not None else None,
                "threshold": float(e["threshold"]) if feasible else None,
            }
        )
    return out


def threshold_for(calibration: dict | None, max_risk: float) -> Threshold:
    """The threshold guaranteeing selective risk <= the largest calibrated target <= max_risk."""
    entries = (calibration or {}).get("targets") or []
    if not entries:
        return Threshold(0.0, None, False)
    usable = [e for e in entries if float(e["max_risk"]) <= max_risk + 1e-12]
    if not usable:
        return Threshold(math.inf, min(float(e["max_risk"]) for e in entries), True)
    best = max(usable, key=lambda e: float(e["max_risk"]))
    value = float(best["threshold"]) if best.get("feasible", True) else math.inf
    return Threshold(value, float(best["max_risk"]), True)
