"""bench/linear_probe.py's probe: reads a linear signal, and finds none where there is none."""

import numpy as np

from bench.linear_probe import fit_and_score


def test_probe_reads_a_linear_signal_and_not_noise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 20))
    y = np.where(x[:, 3] - 0.5 * x[:, 7] > 0, "rising", "falling")  # a linear rule
    assert fit_and_score(x[:400], y[:400], x[400:], y[400:], l2=1e-2) > 0.9
    noise = rng.choice(["rising", "falling"], size=600)  # labels unrelated to x
    assert abs(fit_and_score(x[:400], noise[:400], x[400:], noise[400:], l2=1e-2) - 0.5) < 0.12
