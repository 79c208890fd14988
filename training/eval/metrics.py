"""Offline quality metrics of multiple-choice predictions: accuracy, calibration, selective
prediction and sample-based uncertainty.

Used by `quaver evaluate` and the report on the cached per-item arrays of
`training.eval.predictions.SplitPredictions`:

    probs = preds.bma()                                   # (n, C_max), zero-padded rows
    report = summarize(probs, preds.labels, preds.families, n_choices=preds.n_choices,
                       sample_probs=preds.sample_probs)   # JSON-ready dict
    report["overall"]["ece"], report["by_family"]["temporal"]["aurc"]

Conventions (c = confidence = max probability, a = 1 if the argmax is the label):
- Items may offer different numbers of choices. Rows of `probs` are zero-padded past each item's
  choices; `n_choices` (n,) is optional and, when given, is checked against the padding.
- Calibration metrics (accuracy, ece, mce, nll, brier) take `(probs, labels)`. Selective metrics
  (auroc, aurc, e_aurc, coverage_at_risk, risk_at_coverage, risk_coverage_curve) take
  `(confidence, correct)` so that any score (for example `risk_averse_confidence`) can be ranked.
- Abstain rule everywhere: an item is answered iff its confidence >= threshold. Items with tied
  confidence are therefore answered or withheld together; see `risk_coverage_curve` and `aurc`
  for how ties are treated.
- Entropies and mutual information are in nats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

from training.data.controls import CONTROL_FAMILY

_ROW_SUM_TOL = 1e-3  # float32 softmax rows sum to 1 within this
_RISK_TOL = 1e-12  # slack when comparing a risk ratio with a target (1/10 vs 0.1)
NLL_FLOOR = 1e-12  # p_y is clamped to at least this before the log


# ---------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------


def _check_probs(
    probs: np.ndarray, n_choices: np.ndarray | None, name: str = "probs"
) -> np.ndarray:
    """Validated float64 copy of zero-padded probabilities (..., C_max), padding zeroed."""
    p = np.array(probs, dtype=np.float64)
    if p.ndim < 2 or p.shape[0] == 0 or p.shape[-1] == 0:
        raise ValueError(f"{name} must have shape (n, ..., C) with n, C >= 1, got {p.shape}")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError(f"{name} must be finite and non-negative")
    if n_choices is not None:
        nc = np.asarray(n_choices)
        if nc.shape != (p.shape[0],):
            raise ValueError(f"n_choices must have shape ({p.shape[0]},), got {nc.shape}")
        if np.any(nc < 1) or np.any(nc > p.shape[-1]):
            raise ValueError(f"n_choices must lie in [1, {p.shape[-1]}]")
        # (n, C) mask of valid choices, broadcast over any sample axis in between
        valid = np.arange(p.shape[-1])[None, :] < nc[:, None]
        valid = valid.reshape((p.shape[0],) + (1,) * (p.ndim - 2) + (p.shape[-1],))
        if np.any(np.where(valid, 0.0, p) > 1e-6):
            raise ValueError(f"{name} has probability mass past an item's n_choices")
        p = np.where(valid, p, 0.0)
    sums = p.sum(-1)
    if np.any(np.abs(sums - 1.0) > _ROW_SUM_TOL):
        raise ValueError(
            f"every row of {name} must sum to 1 (worst: {sums.flat[np.argmax(np.abs(sums - 1))]:.6f})"
        )
    return p


def _check_labels(labels: np.ndarray, p: np.ndarray, n_choices: np.ndarray | None) -> np.ndarray:
    y = np.asarray(labels)
    if y.shape != (p.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be an integer array of shape ({p.shape[0]},)")
    upper = np.asarray(n_choices) if n_choices is not None else p.shape[-1]
    if np.any(y < 0) or np.any(y >= upper):
        raise ValueError("labels must index one of the item's choices")
    return y.astype(np.int64)


def _check_scores(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(confidence, dtype=np.float64)
    a = np.asarray(correct)
    if c.ndim != 1 or c.shape[0] == 0 or a.shape != c.shape:
        raise ValueError("confidence and correct must be 1-D arrays of the same non-zero length")
    if not np.all(np.isfinite(c)):
        raise ValueError("confidence must be finite")
    if not np.all((a == 0) | (a == 1)):
        raise ValueError("correct must hold booleans or 0/1")
    return c, a.astype(bool)


# ---------------------------------------------------------------------------------------------
# point predictions and calibration
# ---------------------------------------------------------------------------------------------


def confidence(probs: np.ndarray) -> np.ndarray:
    """Max probability per item: (n, C) -> (n,)."""
    return np.asarray(probs, dtype=np.float64).max(-1)


def predictions(probs: np.ndarray) -> np.ndarray:
    """Argmax choice per item (first index on ties): (n, C) -> (n,)."""
    return np.asarray(probs).argmax(-1)


def correctness(
    probs: np.ndarray, labels: np.ndarray, n_choices: np.ndarray | None = None
) -> np.ndarray:
    """(n,) bool: whether the argmax choice is the label."""
    p = _check_probs(probs, n_choices)
    y = _check_labels(labels, p, n_choices)
    return p.argmax(-1) == y


def accuracy(probs: np.ndarray, labels: np.ndarray, n_choices: np.ndarray | None = None) -> float:
    """Top-1 accuracy."""
    return float(correctness(probs, labels, n_choices).mean())


@dataclass(frozen=True)
class ReliabilityBins:
    """Equal-width confidence bins; bin m is (edges[m], edges[m+1]], the first also holds 0."""

    edges: np.ndarray  # (B+1,) from 0 to 1
    count: np.ndarray  # (B,) items per bin
    accuracy: np.ndarray  # (B,) mean correctness per bin, nan when empty
    confidence: np.ndarray  # (B,) mean confidence per bin, nan when empty

    @property
    def gap(self) -> np.ndarray:
        """(B,) |accuracy - confidence| per bin, nan when empty."""
        return np.abs(self.accuracy - self.confidence)


def reliability_bins(
    confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15
) -> ReliabilityBins:
    """Per-bin accuracy and confidence for a reliability diagram (and ECE / MCE)."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    c, a = _check_scores(confidence, correct)
    if np.any(c < 0) or np.any(c > 1):
        raise ValueError("confidence must lie in [0, 1] for reliability bins")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # number of inner edges strictly below c: c == edges[m] falls in bin m-1 (right-closed),
    # c == 0 in bin 0
    idx = np.searchsorted(edges[1:-1], c, side="left")
    count = np.bincount(idx, minlength=n_bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(idx, weights=a.astype(np.float64), minlength=n_bins) / count
        conf = np.bincount(idx, weights=c, minlength=n_bins) / count
    return ReliabilityBins(edges, count, acc, conf)


def ece(
    probs: np.ndarray, labels: np.ndarray, n_bins: int = 15, n_choices: np.ndarray | None = None
) -> float:
    """Expected calibration error: sum_m |B_m|/n * |acc(B_m) - conf(B_m)|."""
    p = _check_probs(probs, n_choices)
    bins = reliability_bins(p.max(-1), correctness(p, labels, n_choices), n_bins)
    full = bins.count > 0
    return float((bins.count[full] * bins.gap[full]).sum() / bins.count.sum())


def mce(
    probs: np.ndarray, labels: np.ndarray, n_bins: int = 15, n_choices: np.ndarray | None = None
) -> float:
    """Maximum calibration error: the largest gap over non-empty bins."""
    p = _check_probs(probs, n_choices)
    bins = reliability_bins(p.max(-1), correctness(p, labels, n_choices), n_bins)
    return float(np.nanmax(bins.gap))


def nll(probs: np.ndarray, labels: np.ndarray, n_choices: np.ndarray | None = None) -> float:
    """Negative log-likelihood -mean log max(p_y, 1e-12), nats."""
    p = _check_probs(probs, n_choices)
    y = _check_labels(labels, p, n_choices)
    py = p[np.arange(len(y)), y]
    return float(-np.log(np.maximum(py, NLL_FLOOR)).mean())


def brier(probs: np.ndarray, labels: np.ndarray, n_choices: np.ndarray | None = None) -> float:
    """Multi-class Brier score: mean over items of sum_k (p_k - y_k)^2 over the item's choices.

    Padded choices have p = y = 0, so they add nothing. Ranges from 0 to 2.
    """
    p = _check_probs(probs, n_choices)
    y = _check_labels(labels, p, n_choices)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    return float(((p - onehot) ** 2).sum(-1).mean())


# ---------------------------------------------------------------------------------------------
# selective prediction
# ---------------------------------------------------------------------------------------------


def auroc(confidence: np.ndarray, correct: np.ndarray) -> float:
    """P(confidence of a correct item > confidence of a wrong one), ties counting 1/2.

    The Mann-Whitney statistic from average ranks. nan when all items are correct or all wrong.
    """
    c, a = _check_scores(confidence, correct)
    n_pos, n_neg = int(a.sum()), int((~a).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(c)  # average ranks: a tie between a correct and a wrong item counts 1/2
    u = ranks[a].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def control_auroc(confidence: np.ndarray, control: np.ndarray) -> float:
    """AUROC of telling answerable items (higher score) from control items (audio that holds no
    answer: training.data.controls); nan without both kinds."""
    answerable = ~np.asarray(control, dtype=bool)
    if answerable.all() or not answerable.any():
        return float("nan")
    return auroc(confidence, answerable)


def _tie_groups(c: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct confidences descending, with items and errors in each tie group: 3 x (G,)."""
    values, inverse = np.unique(-c, return_inverse=True)  # ascending in -c = descending in c
    size = np.bincount(inverse, minlength=len(values))
    errors = np.bincount(inverse, weights=(~a).astype(np.float64), minlength=len(values))
    return -values, size, errors


@dataclass(frozen=True)
class RiskCoverage:
    """Selective risk at every achievable threshold, from strictest to loosest."""

    threshold: np.ndarray  # (G,) distinct confidences, descending; answer iff c >= threshold
    coverage: np.ndarray  # (G,) fraction answered, increasing, last = 1
    risk: np.ndarray  # (G,) error rate among the answered
    answered: np.ndarray  # (G,) number answered
    errors: np.ndarray  # (G,) number of errors among the answered


def risk_coverage_curve(confidence: np.ndarray, correct: np.ndarray) -> RiskCoverage:
    """Coverage and selective risk at each distinct confidence used as the threshold.

    Tied items are answered together (abstain iff c < threshold), so only coverages at the ends
    of tie groups are achievable.
    """
    c, a = _check_scores(confidence, correct)
    values, size, errors = _tie_groups(c, a)
    answered = np.cumsum(size)
    cum_err = np.cumsum(errors)
    return RiskCoverage(
        values, answered / len(c), cum_err / answered, answered, cum_err.round().astype(np.int64)
    )


def aurc(confidence: np.ndarray, correct: np.ndarray) -> float:
    """Area under the risk-coverage curve: mean selective risk over coverages 1/n, 2/n, ..., 1.

    Items are ranked by confidence, descending. Ties: a threshold cannot split tied items, so the
    risk at a coverage inside a tie group is its expectation over a uniformly random order of the
    group (errors before the group + i * group error rate, over the count). The result does not
    depend on the input order and equals the average AURC over all tie-breaking orders.
    """
    c, a = _check_scores(confidence, correct)
    n = len(c)
    _, size, errors = _tie_groups(c, a)
    start = np.concatenate([[0], np.cumsum(size)[:-1]])  # (G,) items before each group
    err_before = np.concatenate([[0.0], np.cumsum(errors)[:-1]])
    group = np.repeat(np.arange(len(size)), size)  # (n,) group of the i-th ranked item
    pos = np.arange(1, n + 1)  # (n,) coverage count i
    expected_err = err_before[group] + (pos - start[group]) * errors[group] / size[group]
    return float((expected_err / pos).mean())


def optimal_aurc(correct: np.ndarray) -> float:
    """AURC of a perfect ranking (every correct item above every wrong one) of the same items."""
    a = np.asarray(correct).astype(bool)
    n, n_right = len(a), int(a.sum())
    pos = np.arange(1, n + 1)
    return float((np.maximum(pos - n_right, 0) / pos).mean())


def e_aurc(confidence: np.ndarray, correct: np.ndarray) -> float:
    """Excess AURC: AURC minus the AURC of a perfect ranking of the same items.

    The perfect ranking's AURC is computed exactly on the n items; its large-n limit is the
    closed form r + (1 - r) ln(1 - r), r the overall error rate. 0 for a perfect ranking.
    """
    _, a = _check_scores(confidence, correct)
    return aurc(confidence, correct) - optimal_aurc(a)


def coverage_at_risk(confidence: np.ndarray, correct: np.ndarray, max_risk: float) -> float:
    """Largest achievable coverage whose selective risk is <= max_risk; 0.0 if none.

    Empirical (no finite-sample guarantee; see training.eval.selective for that).
    """
    if not 0.0 <= max_risk <= 1.0:
        raise ValueError(f"max_risk must lie in [0, 1], got {max_risk}")
    curve = risk_coverage_curve(confidence, correct)
    ok = curve.risk <= max_risk + _RISK_TOL
    return float(curve.coverage[ok].max()) if ok.any() else 0.0


def risk_at_coverage(confidence: np.ndarray, correct: np.ndarray, coverage: float) -> float:
    """Selective risk at the smallest achievable coverage >= `coverage` (in (0, 1])."""
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must lie in (0, 1], got {coverage}")
    curve = risk_coverage_curve(confidence, correct)
    i = int(np.argmax(curve.coverage >= coverage - _RISK_TOL))  # last coverage is 1: always hit
    return float(curve.risk[i])


# ---------------------------------------------------------------------------------------------
# uncertainty from the predictive distribution and from posterior samples
# ---------------------------------------------------------------------------------------------


def _entropy(p: np.ndarray) -> np.ndarray:
    """Entropy over the last axis in nats, with 0 log 0 = 0."""
    logp = np.log(np.where(p > 0, p, 1.0))
    return -(p * logp).sum(-1)


def predictive_entropy(probs: np.ndarray, n_choices: np.ndarray | None = None) -> np.ndarray:
    """H(p) per item, nats: (n, C) -> (n,)."""
    return _entropy(_check_probs(probs, n_choices))


def _check_samples(sample_probs: np.ndarray, n_choices: np.ndarray | None) -> np.ndarray:
    s = _check_probs(sample_probs, n_choices, name="sample_probs")
    if s.ndim != 3 or s.shape[1] == 0:
        raise ValueError(f"sample_probs must have shape (n, K, C) with K >= 1, got {s.shape}")
    return s


def mutual_information(sample_probs: np.ndarray, n_choices: np.ndarray | None = None) -> np.ndarray:
    """Epistemic uncertainty H(mean_k p_k) - mean_k H(p_k), nats: (n, K, C) -> (n,).

    Non-negative by concavity of H; rounding below zero is clipped.
    """
    s = _check_samples(sample_probs, n_choices)
    return np.maximum(_entropy(s.mean(1)) - _entropy(s).mean(1), 0.0)


def sample_agreement(sample_probs: np.ndarray, n_choices: np.ndarray | None = None) -> np.ndarray:
    """Fraction of samples whose argmax equals the argmax of the BMA: (n, K, C) -> (n,)."""
    s = _check_samples(sample_probs, n_choices)
    bma_choice = s.mean(1).argmax(-1)  # (n,)
    return (s.argmax(-1) == bma_choice[:, None]).mean(1)


def risk_averse_confidence(
    sample_probs: np.ndarray, lam: float = 1.0, n_choices: np.ndarray | None = None
) -> np.ndarray:
    """Mean minus lam * std over samples of the BMA-chosen option's probability: (n,).

    std is the population std over the K samples (ddof 0), so K = 1 gives the plain confidence.
    The score may be negative; it is a ranking score, not a probability.
    """
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    s = _check_samples(sample_probs, n_choices)
    chosen = s.mean(1).argmax(-1)  # (n,)
    p_chosen = np.take_along_axis(s, chosen[:, None, None], axis=2)[..., 0]  # (n, K)
    return p_chosen.mean(1) - lam * p_chosen.std(1)


# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------


def above_chance(correct: np.ndarray, n_choices: np.ndarray) -> dict[str, float]:
    """Is accuracy above guessing? {"chance", "z", "p_above_chance"}.

    A guesser gets item i right with probability 1 / n_choices_i, so its number of hits is
    Poisson-binomial with mean sum(c_i) and variance sum(c_i (1 - c_i)); `z` is the observed hits'
    distance from that mean in standard deviations and `p_above_chance` the one-sided p-value
    (normal approximation, with a continuity correction of half a hit).
    """
    right = np.asarray(correct, dtype=bool)
    k = np.asarray(n_choices, dtype=np.float64)
    if right.shape != k.shape or right.ndim != 1 or not len(right):
        raise ValueError(
            f"correct {right.shape} and n_choices {k.shape} must be equal, 1-D, non-empty"
        )
    if (k < 1).any():
        raise ValueError("n_choices must be >= 1")
    c = 1.0 / k  # each item's chance of a guess being right
    sd = math.sqrt(float((c * (1 - c)).sum()))
    excess = float(right.sum() - c.sum())
    z = (excess - 0.5) / sd if sd > 0 else (math.inf if excess > 0 else -math.inf)
    return {"chance": float(c.mean()), "z": z, "p_above_chance": 0.5 * math.erfc(z / math.sqrt(2))}


def _json_float(x: float) -> float | None:
    """Plain float for JSON; nan/inf (undefined metrics) become None."""
    x = float(x)
    return x if math.isfinite(x) else None


def _summary(
    p: np.ndarray,
    y: np.ndarray,
    s: np.ndarray | None,
    n_bins: int,
    risks: Sequence[float],
    coverages: Sequence[float],
    risk_lambda: float,
) -> dict[str, float | int | None]:
    conf = p.max(-1)
    right = p.argmax(-1) == y
    bins = reliability_bins(conf, right, n_bins)
    full = bins.count > 0
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    out: dict[str, float | int | None] = {
        "n": len(y),
        "accuracy": right.mean(),
        "ece": (bins.count[full] * bins.gap[full]).sum() / len(y),
        "mce": np.nanmax(bins.gap),
        "nll": -np.log(np.maximum(p[np.arange(len(y)), y], NLL_FLOOR)).mean(),
        "brier": ((p - onehot) ** 2).sum(-1).mean(),
        "mean_confidence": conf.mean(),
        "mean_entropy": _entropy(p).mean(),
        "auroc": auroc(conf, right),
        "aurc": aurc(conf, right),
        "e_aurc": e_aurc(conf, right),
    }
    for r in risks:
        out[f"coverage_at_risk_{r:g}"] = coverage_at_risk(conf, right, r)
    for c in coverages:
        out[f"risk_at_coverage_{c:g}"] = risk_at_coverage(conf, right, c)
    if s is not None:
        mi = np.maximum(_entropy(s.mean(1)) - _entropy(s).mean(1), 0.0)
        agree = (s.argmax(-1) == s.mean(1).argmax(-1)[:, None]).mean(1)
        chosen = s.mean(1).argmax(-1)
        pc = np.take_along_axis(s, chosen[:, None, None], axis=2)[..., 0]  # (n, K)
        averse = pc.mean(1) - risk_lambda * pc.std(1)
        out |= {
            "samples": s.shape[1],
            "mean_mutual_information": mi.mean(),
            "mean_agreement": agree.mean(),
            "auroc_mutual_information": auroc(-mi, right),  # low MI ranks as confident
            "auroc_agreement": auroc(agree, right),
            "auroc_risk_averse": auroc(averse, right),
            "aurc_risk_averse": aurc(averse, right),
        }
    return {k: v if isinstance(v, int) else _json_float(v) for k, v in out.items()}


def summarize(
    probs: np.ndarray,
    labels: np.ndarray,
    families: np.ndarray | None = None,
    *,
    n_choices: np.ndarray | None = None,
    sample_probs: np.ndarray | None = None,
    n_bins: int = 15,
    risks: Sequence[float] = (0.01, 0.05, 0.1),
    coverages: Sequence[float] = (0.5, 0.8),
    risk_lambda: float = 1.0,
) -> dict:
    """All metrics, overall and per family, as a JSON-serialisable dict.

    Returns `{"overall": M, "by_family": {family: M, ...}}` (by_family empty without families),
    where M maps: n, accuracy, ece, mce, nll, brier, mean_confidence, mean_entropy, auroc, aurc,
    e_aurc, coverage_at_risk_<r> for r in risks, risk_at_coverage_<c> for c in coverages and,
    with sample_probs (n, K, C): samples, mean_mutual_information, mean_agreement,
    auroc_mutual_information, auroc_agreement, auroc_risk_averse, aurc_risk_averse; with
    n_choices also chance, z and p_above_chance (`above_chance`); with families that include
    control items (family "control"), auroc_control (`control_auroc` of the max probability).
    Confidence is max(probs); `probs` is normally the BMA of `sample_probs`. Undefined values
    (AUROC with all items correct or all wrong) are None.
    """
    p = _check_probs(probs, n_choices)
    if p.ndim != 2:
        raise ValueError(f"probs must have shape (n, C), got {p.shape}")
    y = _check_labels(labels, p, n_choices)
    s = None
    if sample_probs is not None:
        s = _check_samples(sample_probs, n_choices)
        if s.shape[0] != p.shape[0] or s.shape[2] != p.shape[1]:
            raise ValueError(f"sample_probs {s.shape} does not match probs {p.shape}")
    if risk_lambda < 0:
        raise ValueError(f"risk_lambda must be >= 0, got {risk_lambda}")
    report: dict = {
        "overall": _summary(p, y, s, n_bins, risks, coverages, risk_lambda),
        "by_family": {},
    }
    right = p.argmax(-1) == y
    if n_choices is not None:
        k = np.asarray(n_choices)
        report["overall"] |= {k_: _json_float(v) for k_, v in above_chance(right, k).items()}
    if families is not None:
        fam = np.asarray(families).astype(str)
        if fam.shape != y.shape:
            raise ValueError(f"families must have shape {y.shape}, got {fam.shape}")
        for name in sorted(set(fam.tolist())):
            m = fam == name
            report["by_family"][name] = _summary(
                p[m], y[m], None if s is None else s[m], n_bins, risks, coverages, risk_lambda
            )
            if n_choices is not None:
                test = above_chance(right[m], k[m])
                report["by_family"][name] |= {k_: _json_float(v) for k_, v in test.items()}
        if (fam == CONTROL_FAMILY).any():  # max probability against the control items
            ctrl = fam == CONTROL_FAMILY
            report["overall"]["auroc_control"] = _json_float(control_auroc(p.max(-1), ctrl))
    return report
