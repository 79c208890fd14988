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


def test_control_probe_separates_what_is_separable():
    from bench.linear_probe import control_auroc_of_probe

    rng = np.random.default_rng(1)
    x = rng.normal(size=(600, 10))
    control = rng.random(600) < 0.2
    x[control, 2] += 3.0  # controls sit apart along one direction
    assert control_auroc_of_probe(x[:400], control[:400], x[400:], control[400:], 1e-2) > 0.95
    shuffled = rng.permutation(control)  # no relation to x
    auc = control_auroc_of_probe(x[:400], shuffled[:400], x[400:], shuffled[400:], 1e-2)
    assert abs(auc - 0.5) < 0.15
