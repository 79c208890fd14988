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
