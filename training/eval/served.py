"""What the service would do on a benchmark split: the decisions of the served threshold rule.

`evaluate.py` scores probabilities; this module replays the server's rule on them. For a
posterior's calibration table (quaver.json "calibration") and the cached predictions of one split
(`predictions.py`), at the risk target a request gets when it names none (`app.thresholds`),
with the posterior's served score when it stores a "decision" (`app.scores`):

  - coverage (share answered) over all items and over the answerable ones (not controls);
  - realised selective risk of the answered items, with a one-sided Clopper-Pearson upper bound,
    set against the target the threshold guarantees;
  - abstention on the control items (silence, noise, unrelated audio: `training.data.controls`);
  - accuracy per family against chance, with a one-sided exact binomial p-value (is the family
    heard better than guessing?).

    from training.eval.served import served_summary
    report = served_summary(preds, items, meta["calibration"], samples=8)
    report["default_target"]["coverage"], report["families"]["sound_class"]["p_value"]

`served_items` gives the same decisions per item, and `versus` sets two posteriors' decisions on
the same items side by side (paired bootstrap intervals): how `quaver default` tells whether a
new default serves users at least as well as the shipped one (recipes/default_goals.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from app.scores import Decision, score_values
from app.thresholds import default_risk, threshold_for
from training.data.controls import abstention_on_controls, control_mask
from training.data.manifest import Item
from training.eval.bootstrap import paired_bootstrap
from training.eval.metrics import confidence, correctness
from training.eval.predictions import SplitPredictions


def _upper_bound(k: int, n: int, delta: float) -> float | None:
    """One-sided (1 - delta) Clopper-Pearson upper bound of a rate k / n."""
    if n == 0:
        return None
    if k == n:
        return 1.0
    from scipy.stats import beta

    return float(beta.ppf(1.0 - delta, k + 1, n - k))


def family_accuracy_vs_chance(
    correct: np.ndarray, families: np.ndarray, n_choices: np.ndarray
) -> dict[str, dict]:
    """{family: {n, accuracy, chance, p_value}}: p_value is the one-sided exact binomial test of
    accuracy > chance (chance = 1 / choices; where a family's items differ in choices, the mean
    chance is used, which is conservative when the p-value is small). Controls are left out."""
    from scipy.stats import binomtest

    out: dict[str, dict] = {}
    for fam in sorted(set(families.tolist()) - {"control"}):
        sel = families == fam
        n, k = int(sel.sum()), int(correct[sel].sum())
        chance = float(np.mean(1.0 / n_choices[sel]))
        p = binomtest(k, n, chance, alternative="greater").pvalue
        out[fam] = {"n": n, "accuracy": k / n, "chance": chance, "p_value": float(p)}
    return out


@dataclass
class ServedItems:
    """The served rule's decisions on one split, per item (all arrays (n,))."""

    answered: np.ndarray  # bool: confidence >= the default target's threshold
    correct: np.ndarray  # bool: the top choice is the label
    control: np.ndarray  # bool: a control item (any answer is a guess)
    family: np.ndarray  # str: the item's family
    confidence: np.ndarray  # float: the served confidence (the decision's score, or max prob)
    calibration: Mapping  # the threshold table the rule used (the decision's, or the posterior's)
    max_risk: float  # the default target a request without max_risk gets
    guaranteed_by: float | None  # the table's target whose threshold is used (None: none)
    threshold: float  # that threshold (+inf: abstain on everything)


def served_items(
    preds: SplitPredictions,
    items: Sequence[Item],
    calibration: Mapping,
    samples: int,
    configured_risk: float | None = None,
    decision: Decision | None = None,
    p_control: np.ndarray | None = None,
) -> ServedItems:
    """Per-item decisions of the server's default-target rule (see served_summary). With the
    posterior's `decision` (app.scores), the server's confidence is that score and its
    threshold table the decision's own (`p_control`: the control probe's (n,) P(control),
    needed by the "answerable" score); without one, the max averaged probability and
    `calibration`."""
    probs = preds.mean_probs if samples <= 1 else preds.bma(samples)
    if len(items) != len(probs):
        raise ValueError(f"{len(items)} items but predictions for {len(probs)}")
    if decision is None:
        conf = confidence(probs)
    else:
        draws = probs[:, None, :] if samples <= 1 else preds.sample_probs[:, :samples]
        conf = score_values(
            draws,
            decision.score,
            decision.temperature,
            decision.risk_lambda,
            p_control,
            decision.control_power,
        )
        calibration = decision.calibration or calibration
    risk = default_risk(dict(calibration), configured_risk)
    thr = threshold_for(dict(calibration), risk)
    return ServedItems(
        answered=conf >= thr.value,
        correct=correctness(probs, preds.labels, preds.n_choices),
        control=control_mask(items),
        family=np.asarray(preds.families, dtype=str),
        confidence=conf,
        calibration=calibration,
        max_risk=risk,
        guaranteed_by=thr.max_risk,
        threshold=float(thr.value),
    )


def versus(
    new: ServedItems,
    old: ServedItems,
    synthetic: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict]:
    """`new` against `old` on the same items: {measure: paired_bootstrap result (new - old)}.

    Measures, each only where the split has its items: "controls_withheld" (share of the
    control items not answered), "synthetic_accuracy" (accuracy over the families in
    `synthetic`) and "real_accuracy" (accuracy over the answerable items of the other families).
    """
    if len(new.correct) != len(old.correct) or not np.array_equal(new.family, old.family):
        raise ValueError("versus needs both posteriors' decisions on the same items")
    synth = np.isin(new.family, list(synthetic)) & ~new.control
    masks = {
        "controls_withheld": (new.control, lambda s: ~s.answered),
        "synthetic_accuracy": (synth, lambda s: s.correct),
        "real_accuracy": (~synth & ~new.control, lambda s: s.correct),
    }
    out = {}
    for name, (mask, value) in masks.items():
        if mask.any():
            a, b = value(new)[mask].astype(float), value(old)[mask].astype(float)
            out[name] = {
                **paired_bootstrap(np.mean, a, b, n_boot=n_boot, seed=seed),
                "n": int(mask.sum()),
            }
    return out


def served_summary(
    preds: SplitPredictions,
    items: Sequence[Item],
    calibration: Mapping,
    samples: int,
    configured_risk: float | None = None,
    delta: float = 0.05,
    decision: Decision | None = None,
    p_control: np.ndarray | None = None,
) -> dict:
    """The served rule on one split: see the module docstring. `samples` is the K the server
    draws (1: the posterior mean); `configured_risk` is QUAVER_DEFAULT_MAX_RISK (None: unset);
    `decision` and `p_control` as in `served_items`."""
    got = served_items(preds, items, calibration, samples, configured_risk, decision, p_control)
    conf, correct, controls, answered = got.confidence, got.correct, got.control, got.answered
    n_ans, n_err = int(answered.sum()), int((answered & ~correct).sum())
    answerable = ~controls
    return {
        "n": len(items),
        "controls": int(controls.sum()),
        "default_target": {
            "max_risk": got.max_risk,
            "guaranteed_by": got.guaranteed_by,
            "threshold": None if not np.isfinite(got.threshold) else got.threshold,
            "coverage": n_ans / len(items),
            "coverage_answerable": float(answered[answerable].mean()) if answerable.any() else None,
            "answered": n_ans,
            "risk": n_err / n_ans if n_ans else None,
            "risk_upper_bound": _upper_bound(n_err, n_ans, delta),
            # the realised risk is at most the guaranteed target (the guarantee holds with
            # probability 1 - delta over calibration sets, so one split may exceed it)
            "within_target": (
                None
                if not n_ans or got.guaranteed_by is None
                else bool(n_err / n_ans <= got.guaranteed_by)
            ),
        },
        "score": "maxprob" if decision is None else decision.score,
        "controls_abstention": abstention_on_controls(items, conf, got.calibration, delta),
        "families": family_accuracy_vs_chance(correct, preds.families, preds.n_choices),
    }
