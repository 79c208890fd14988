"""Temperature scaling: softmax(log p / T), with T fitted by NLL on a calibration split.

    t = fit_temperature(calib_probs, calib_labels, n_choices)
    scaled = apply_temperature(test_probs, t, n_choices)

The cheap post-hoc calibration baseline the report compares IVON against (AdamW + TS).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar

from training.eval.metrics import NLL_FLOOR


def _log_probs(probs: np.ndarray, n_choices: np.ndarray | None) -> np.ndarray:
    """log p (n, C) in float64, -inf on padded choices, valid ones floored at NLL_FLOOR."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"probs must have shape (n, C) with n >= 1, got {p.shape}")
    nc = np.full(p.shape[0], p.shape[1]) if n_choices is None else np.asarray(n_choices)
    valid = np.arange(p.shape[1])[None, :] < nc[:, None]  # (n, C)
    return np.where(valid, np.log(np.maximum(p, NLL_FLOOR)), -np.inf)


def _softmax_scaled(logp: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T) over each row: (n, C) -> (n, C), padding stays 0."""
    z = logp / temperature
    z = z - z.max(1, keepdims=True)  # the max is finite: every item has >= 1 valid choice
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def apply_temperature(
    probs: np.ndarray, temperature: float, n_choices: np.ndarray | None = None
) -> np.ndarray:
    """softmax(log p / T) per item: (n, C) -> (n, C) float64, zero padding kept.

    Log-probabilities are logits up to a per-item constant, so this is temperature scaling of the
    model's logits. T > 1 softens, T < 1 sharpens, T = 1 returns p (renormalised).
    """
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    return _softmax_scaled(_log_probs(probs, n_choices), temperature)


def fit_temperature(
    probs: np.ndarray,
    labels: np.ndarray,
    n_choices: np.ndarray | None = None,
    bounds: tuple[float, float] = (0.01, 100.0),
) -> float:
    """The temperature T minimising the NLL of softmax(log p / T) on (probs, labels).

    NLL is convex in 1/T (log-sum-exp of a linear function minus a linear term), so a bounded
    scalar search over log T finds the global minimum inside `bounds`.
    """
    lo, hi = bounds
    if not 0 < lo < 1 < hi:
        raise ValueError(f"bounds must satisfy 0 < low < 1 < high, got {bounds}")
    logp = _log_probs(probs, n_choices)
    y = np.asarray(labels, dtype=np.int64)
    if (
        y.shape != (logp.shape[0],)
        or np.any(y < 0)
        or np.any(~np.isfinite(logp[np.arange(len(y)), y]))
    ):
        raise ValueError("labels must index a valid choice of each item")
    rows = np.arange(len(y))

    def nll(log_t: float) -> float:
        q = _softmax_scaled(logp, math.exp(log_t))
        return float(-np.log(np.maximum(q[rows, y], NLL_FLOOR)).mean())

    res = minimize_scalar(
        nll, bounds=(math.log(lo), math.log(hi)), method="bounded", options={"xatol": 1e-6}
    )
    return float(math.exp(res.x))
