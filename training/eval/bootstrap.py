"""Paired bootstrap intervals for the difference of a metric between two predictors.

Both predictors are scored on the same items, so the items are resampled together (one set of
indices for both): the interval reflects which items happened to be drawn, not the two
predictors' noise separately.

    def aurc_of(conf, correct):
        return aurc(conf, correct)
    d = paired_bootstrap(aurc_of, (conf_a, right_a), (conf_b, right_b), n_boot=1000, seed=0)
    d["diff"], d["low"], d["high"], d["counts"]   # metric(a) - metric(b), 95% interval

`counts` is True only when the interval excludes zero: a difference inside the noise of the
items drawn is not reported as one. Percentile intervals; a resample on which the metric is
undefined (nan, e.g. AUROC with one class drawn) is dropped and counted in `dropped`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

MetricFn = Callable[..., float]


def _as_arrays(x: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    if isinstance(x, np.ndarray):
        return [x]
    return [np.asarray(a) for a in x]


def paired_bootstrap(
    metric_fn: MetricFn,
    a: np.ndarray | Sequence[np.ndarray],
    b: np.ndarray | Sequence[np.ndarray],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """metric_fn(*a) - metric_fn(*b) with a paired percentile bootstrap interval over items.

    `a` and `b` are arrays (or tuples of arrays) whose first axis is the same n items, in the
    same order; metric_fn takes the arrays of one predictor and returns a float. Returns
    {diff, low, high, level, n_boot, dropped, counts, a, b} with `a`, `b` the two metrics on all
    items and `counts` = the interval excludes zero.
    """
    xs, ys = _as_arrays(a), _as_arrays(b)
    n = len(xs[0])
    if n == 0 or any(len(x) != n for x in (*xs, *ys)):
        raise ValueError("a and b must hold arrays over the same, non-empty set of items")
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < level < 1, got {n_boot}, {level}")
    ma, mb = float(metric_fn(*xs)), float(metric_fn(*ys))
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        d = float(metric_fn(*(x[idx] for x in xs))) - float(metric_fn(*(y[idx] for y in ys)))
        if math.isfinite(d):
            diffs.append(d)
    diff = ma - mb
    if not diffs or not math.isfinite(diff):
        low = high = None
    else:
        tail = 100 * (1 - level) / 2
        low, high = (float(v) for v in np.percentile(diffs, [tail, 100 - tail]))
    return {
        "diff": diff if math.isfinite(diff) else None,
        "low": low,
        "high": high,
        "level": level,
        "n_boot": n_boot,
        "dropped": n_boot - len(diffs),
        "counts": low is not None and (low > 0 or high < 0),
        "a": ma if math.isfinite(ma) else None,
        "b": mb if math.isfinite(mb) else None,
    }
