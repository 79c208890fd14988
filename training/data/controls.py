"""Control items and how often a predictor abstains on them.

A control item (family "control", `generate.py`) keeps a family's question and choices but its
audio holds none of the question's sounds: near-silence ("silence"), a noise bed ("unrelated"),
or, with real sources, an unrelated recording looped ("unrelated_real"). Any answer is a guess,
so the right behaviour is to abstain. Presence questions ("is there speech?") are never controls:
over such audio their answer is "no" (`generate.ABSENT_ANSWERS`), an ordinary item of the
family. `abstention_on_controls` measures abstention for a calibration table (the "calibration"
entry of a posterior's quaver.json) and the confidences a predictor gave the items of one split,
in item order:

    from training.data.controls import abstention_on_controls
    report = abstention_on_controls(items, confidence, meta["calibration"])
    report["targets"]["0.2"]["abstention"]          # share of controls withheld at risk 0.2
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from training.data.manifest import Item

CONTROL_FAMILY = "control"  # the `family` of every control item
CONTROL_KINDS = ("silence", "unrelated", "unrelated_real")


def control_mask(items: Sequence[Item]) -> np.ndarray:
    """(n,) bool: which items are controls."""
    return np.array([it.family == CONTROL_FAMILY for it in items], dtype=bool)


def thresholds_of(calibration: Mapping) -> dict[str, float]:
    """{max_risk as text: threshold} from a quaver.json "calibration" entry; an infeasible
    target (threshold null) is +inf: the server abstains on everything at it."""
    out = {}
    for e in calibration["targets"]:
        t = e.get("threshold")
        out[f"{float(e['max_risk']):g}"] = float("inf") if t is None else float(t)
    return out


def _lower_bound(k: int, n: int, delta: float) -> float | None:
    """One-sided (1 - delta) Clopper-Pearson lower bound of a rate k / n."""
    if n == 0:
        return None
    if k == 0:
        return 0.0
    from scipy.stats import beta

    return float(beta.ppf(delta, k, n - k + 1))


def abstention_on_controls(
    items: Sequence[Item],
    confidence: np.ndarray,
    calibration: Mapping,
    delta: float = 0.05,
) -> dict:
    """Abstention on the control items of one split at every target of `calibration`.

    Returns {"n": controls, "kinds": {kind: n}, "targets": {max_risk: {"threshold",
    "abstention", "abstention_lower_bound" (one-sided 1 - delta), "by_kind": {kind: rate}}}}.
    """
    conf = np.asarray(confidence, dtype=np.float64)
    if conf.shape != (len(items),):
        raise ValueError(f"confidence has shape {conf.shape}, want ({len(items)},)")
    mask = control_mask(items)
    kinds = np.array([str(it.difficulty.get("control", "")) for it in items])
    present = [k for k in CONTROL_KINDS if np.any(mask & (kinds == k))]
    report: dict = {
        "n": int(mask.sum()),
        "kinds": {k: int(np.sum(mask & (kinds == k))) for k in present},
        "targets": {},
    }
    for risk, thr in thresholds_of(calibration).items():
        withheld = conf < thr  # the server's rule: abstain iff confidence < threshold
        k = int(np.sum(withheld & mask))
        n = report["n"]
        report["targets"][risk] = {
            "threshold": None if not np.isfinite(thr) else thr,
            "abstention": k / n if n else None,
            "abstention_lower_bound": _lower_bound(k, n, delta),
            "by_kind": {kind: float(np.mean(withheld[mask & (kinds == kind)])) for kind in present},
        }
    return report
