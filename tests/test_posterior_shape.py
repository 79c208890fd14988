"""training.eval.posterior_shape: update sizes by hand, and the Hessian read from a run's log."""

from __future__ import annotations

import json

import pytest
import torch

from app.posterior import LoRASpec, Posterior
from training.eval.posterior_shape import hessian_movement, sample_spread, update_size


def _post(a: list[list[float]], b: list[list[float]]) -> Posterior:
    spec = LoRASpec(1, 2.0, ("m",), (0,), ("q_proj",))  # scale alpha / rank = 2
    mean = {"m.lora_A.weight": torch.tensor(a), "m.lora_B.weight": torch.tensor(b)}
    return Posterior(spec, mean, {k: torch.ones_like(v) for k, v in mean.items()})


def test_update_size_by_hand():
    start = _post([[1.0, 0.0]], [[1.0], [0.0]])  # dW = 2 * [[1, 0], [0, 0]]: norm 2
    after = _post([[1.0, 1.0]], [[1.0], [0.0]])  # dW = 2 * [[1, 1], [0, 0]]: change [[0, 2], 0]
    u = update_size(after, start)
    assert u["dw_fro"] == pytest.approx(2.0)
    assert u["dw_rel"] == pytest.approx(1.0)
    # factor entries: A changed by (0, 1), B by (0, 0): 4 entries, one moved by 1
    assert u["factor_rms"] == pytest.approx(0.5)
    fresh = update_size(after, None)  # from zero weights: the whole dW, no relative size
    assert fresh["dw_fro"] == pytest.approx(2.0 * 2**0.5) and fresh["dw_rel"] is None


def test_sample_spread_by_hand():
    post = _post([[1.0, 0.0]], [[1.0], [0.0]])
    # noise on A only, std 0.5 per entry: dW(sample) - dW(mean) = 2 * B @ eps_A, whose squared
    # norm is 4 * ||B||^2 * ||eps_A||^2, expected 4 * 1 * (0.25 + 0.25) = 2
    post.std["m.lora_A.weight"] = torch.full((1, 2), 0.5)
    post.std["m.lora_B.weight"] = torch.zeros(2, 1)
    assert sample_spread(post, draws=20000) == pytest.approx(2**0.5, rel=0.03)
    # a point estimate (AdamW) has no spread
    point = _post([[1.0, 0.0]], [[1.0], [0.0]])
    point.std.update({k: torch.zeros_like(v) for k, v in point.std.items()})
    assert sample_spread(point) is None and update_size(point, None)["sample_spread"] is None


def test_update_size_refuses_different_modules():
    other = _post([[1.0]], [[1.0]])
    other = Posterior(
        LoRASpec(1, 2.0, ("n",), (0,), ("q_proj",)),
        {k.replace("m.", "n."): v for k, v in other.mean.items()},
        {},
    )
    with pytest.raises(ValueError, match="different modules"):
        update_size(_post([[1.0]], [[1.0]]), other)


def test_hessian_movement_reads_the_last_logged_epoch(tmp_path):
    lines = [
        {"epoch": 1, "calib_accuracy": 0.5, "hessian": {"h_median": 0.1, "std_median": 0.3}},
        {"epoch": 2, "calib_accuracy": 0.6, "hessian": {"h_median": 0.2, "std_median": 0.2}},
    ]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert hessian_movement(tmp_path) == {"epoch": 2, "h_median": 0.2, "std_median": 0.2}
    (tmp_path / "log.jsonl").write_text(json.dumps({"epoch": 1, "calib_accuracy": 0.5}) + "\n")
    assert hessian_movement(tmp_path) is None  # an AdamW run logs no Hessian
