"""Report figures: every plot function writes a non-empty PNG and rejects empty input."""

from __future__ import annotations

import numpy as np
import pytest

from training.eval import plots as P

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _scores(seed: int, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.25, 1.0, n)
    return conf, rng.random(n) < conf


def _is_png(path) -> bool:
    data = path.read_bytes()
    return data.startswith(PNG_MAGIC) and len(data) > 5000


def test_reliability_and_risk_coverage(tmp_path):
    preds = {"IVON": _scores(0), "AdamW": _scores(1)}
    out = P.reliability_diagram(preds, tmp_path / "sub" / "rel.png", title="test split")
    assert out == tmp_path / "sub" / "rel.png" and _is_png(out)
    out = P.risk_coverage_plot(preds, tmp_path / "rc.png", targets=(0.05, 0.1))
    assert _is_png(out)
    with pytest.raises(ValueError):
        P.reliability_diagram({}, tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()


def test_confidence_histogram(tmp_path):
    conf, right = _scores(2)
    assert _is_png(P.confidence_histogram(conf, right, tmp_path / "h.png", threshold=0.7))
    # infinite threshold (abstain always) and all-correct input still draw
    assert _is_png(
        P.confidence_histogram(
            conf, np.ones_like(right), tmp_path / "h2.png", threshold=float("inf")
        )
    )


def test_metrics_vs_samples_and_shift_bars(tmp_path):
    out = P.metrics_vs_samples(
        [1, 2, 4, 8],
        {"accuracy": [0.6, 0.62, 0.63, 0.63], "ECE": [0.08, 0.06, 0.05, 0.05]},
        tmp_path / "k.png",
        baselines={"accuracy": 0.61},
    )
    assert _is_png(out)
    with pytest.raises(ValueError, match="values"):
        P.metrics_vs_samples([1, 2], {"accuracy": [0.5]}, tmp_path / "bad.png")
    results = {
        "IVON": {
            "in-distribution": {"accuracy": 0.7, "ece": 0.04, "abstain_rate": 0.2},
            "silence": {"accuracy": 0.3, "ece": 0.1, "abstain_rate": 0.8},
        },
        "AdamW": {
            "in-distribution": {"accuracy": 0.72, "ece": 0.09, "abstain_rate": 0.1},
            "silence": {"accuracy": 0.3, "ece": None},
        },
    }
    assert _is_png(P.shift_bars(results, tmp_path / "shift.png"))


def test_family_bars_and_learning_curves(tmp_path):
    acc = {"IVON mean": {"count": 0.8, "order": 0.5}, "AdamW": {"count": 0.7, "order": 0.45}}
    out = P.family_accuracy_bars(acc, {"count": 0.25, "order": 0.48}, tmp_path / "fam.png")
    assert _is_png(out)
    with pytest.raises(ValueError, match="chance"):
        P.family_accuracy_bars(acc, {}, tmp_path / "none.png")
    out = P.learning_curves(
        [188, 376], {"count": [0.3, 0.5], "order": [0.4, 0.5]}, tmp_path / "lc.png"
    )
    assert _is_png(out)
    with pytest.raises(ValueError, match="steps"):
        P.learning_curves([188], {"count": [0.3, 0.5]}, tmp_path / "bad.png")
