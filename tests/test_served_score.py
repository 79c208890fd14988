"""The served score (app.scores): its math against the evaluation's, the posterior's "decision"
read by the server (threshold from the decision's own table, the response naming the score),
and a posterior without a decision served exactly as before."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.scores import Decision, score_values, temper
from app.server import create_app
from app.settings import Settings
from tests.conftest import tone, wav_bytes
from training.eval.metrics import mutual_information, risk_averse_confidence
from training.eval.temperature import apply_temperature, fit_temperature

QUESTION = "How many beeps are there?"
CHOICES = ["one", "two", "three"]


def _samples(n: int, k: int, c: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, (n, k, c))
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_scores_equal_the_evaluation_metrics():
    s = _samples(50, 6, 4)
    np.testing.assert_allclose(score_values(s, "maxprob"), s.mean(1).max(-1))
    np.testing.assert_allclose(
        score_values(s, "risk_averse", risk_lambda=1.5), risk_averse_confidence(s, 1.5)
    )
    np.testing.assert_allclose(score_values(s, "mutual_information"), -mutual_information(s))
    # temperature only enters the max-probability score
    np.testing.assert_allclose(
        score_values(s, "maxprob", temperature=2.0), apply_temperature(s.mean(1), 2.0).max(-1)
    )
    with pytest.raises(ValueError, match="unknown score"):
        score_values(s, "entropy")


def test_risk_averse_hand_checked():
    # one item, two samples: chosen option 0 (BMA 0.7), its probs 0.9 and 0.5: mean 0.7, std 0.2
    s = np.array([[[0.9, 0.1], [0.5, 0.5]]])
    assert score_values(s, "risk_averse", risk_lambda=2.0)[0] == pytest.approx(0.7 - 0.4)
    assert score_values(s, "risk_averse", risk_lambda=0.0)[0] == pytest.approx(0.7)


def test_temperature_scaling_of_a_bma_recovers_a_known_temperature():
    """A BMA made overconfident by exactly T* (samples sharpened by 1/T*): the temperature fitted
    on its averaged probabilities recovers T*, and app.scores.temper applies it as training does."""
    rng = np.random.default_rng(4)
    n, k, c, true_t = 8000, 4, 3, 2.0
    logits = rng.normal(0.0, 1.5, (n, c))
    truth = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    labels = (rng.random(n)[:, None] > truth.cumsum(1)).sum(1)
    sharp = logits[:, None, :] / (1.0 / true_t) + rng.normal(0.0, 0.05, (n, k, c))
    samples = np.exp(sharp - sharp.max(-1, keepdims=True))
    samples /= samples.sum(-1, keepdims=True)
    bma = samples.mean(1)
    t = fit_temperature(bma, labels)
    assert t == pytest.approx(true_t, rel=0.1)
    np.testing.assert_allclose(temper(bma, t), apply_temperature(bma, t), atol=1e-12)
    rows = np.arange(n)
    assert -np.log(temper(bma, t)[rows, labels]).mean() < -np.log(bma[rows, labels]).mean()
    # the decision applies the same scaling to one request's (K, C) samples
    shown, conf = Decision(temperature=t).apply(samples[0])
    np.testing.assert_allclose(shown, apply_temperature(bma[:1], t)[0], atol=1e-12)
    assert conf == pytest.approx(shown.max())


def test_decision_from_meta_and_validation():
    assert Decision.from_meta({}) == Decision()
    d = Decision.from_meta({"decision": {"score": "risk_averse", "risk_lambda": 0.5}})
    assert d.score == "risk_averse" and d.risk_lambda == 0.5 and d.needs_samples
    assert Decision.from_meta({"decision": d.to_json()}) == d
    with pytest.raises(ValueError, match="not one of"):
        Decision(score="entropy")
    with pytest.raises(ValueError, match="temperature"):
        Decision(temperature=0.0)


# served decisions: a copy of the test posterior with a "decision" whose table differs from the
# posterior's own "calibration" (thresholds 0.9/0.6/0.4 at 0.05/0.1/0.2 there)
DECISION_TABLE = {
    "delta": 0.05,
    "method": "sgr",
    "n": 100,
    "targets": [
        {"max_risk": 0.1, "threshold": -0.3, "coverage": 0.5, "risk_bound": 0.1, "feasible": True},
        {"max_risk": 0.2, "threshold": -0.7, "coverage": 0.8, "risk_bound": 0.2, "feasible": True},
    ],
}


def _with_decision(src, dst, decision: dict):
    shutil.copytree(src, dst)
    meta = json.loads((dst / "quaver.json").read_text())
    meta["decision"] = decision
    (dst / "quaver.json").write_text(json.dumps(meta))
    return dst


def _client(tiny_dir, post_dir, **kw) -> TestClient:
    s = Settings(model_dir=tiny_dir, posterior_dir=post_dir, default_samples=4, **kw)
    return TestClient(create_app(s, load_in_background=False))


def _ask(client, **data):
    form = {"question": QUESTION, "choices": CHOICES, **data}
    files = {"audio": ("clip.wav", wav_bytes(tone(1.5)), "audio/wav")}
    r = client.post("/answer", files=files, data=form)
    assert r.status_code == 200, r.text
    return r.json()


def test_mutual_information_decision_is_served(tiny_dir, posterior_dir, tmp_path):
    post = _with_decision(
        posterior_dir,
        tmp_path / "mi",
        {"score": "mutual_information", "temperature": None, "calibration": DECISION_TABLE},
    )
    with _client(tiny_dir, post, adaptive=True) as c:
        body = _ask(c, samples="4", max_risk="0.15", seed="1")
        model = c.get("/model").json()
    assert body["score"] == "mutual_information" and model["score"] == "mutual_information"
    # the confidence is minus the samples' mutual information, not a probability
    mi = body["uncertainty"]["mutual_information"]
    assert body["confidence"] == pytest.approx(-mi, abs=1e-6) and body["confidence"] <= 0
    # threshold from the decision's table (0.1 -> -0.3), not the posterior's own (0.1 -> 0.6)
    assert body["threshold"] == -0.3 and body["max_risk"] == 0.1
    assert body["abstain"] == (body["confidence"] < -0.3)
    # a sample score: adaptive sampling always draws the K samples
    assert body["samples"] == 4
    assert [t["max_risk"] for t in model["targets"]] == [0.1, 0.2]
    assert body["lowest_guaranteed_risk"] == 0.1


def test_tempered_maxprob_decision_is_served(tiny_dir, posterior_dir, tmp_path):
    plain = _ask_plain(tiny_dir, posterior_dir)
    post = _with_decision(
        posterior_dir, tmp_path / "ts", {"score": "maxprob", "temperature": 3.0}
    )  # no table of its own: the posterior's calibration stays in force
    with _client(tiny_dir, post, adaptive=False) as c:
        body = _ask(c, samples="4", max_risk="0.1", seed="3")
    assert body["score"] == "maxprob"
    want = apply_temperature(np.array([list(plain["probabilities"].values())]), 3.0)[0]
    np.testing.assert_allclose(list(body["probabilities"].values()), want, atol=1e-5)
    assert body["confidence"] == pytest.approx(max(want), abs=1e-5)
    assert body["answer"] == plain["answer"] and body["threshold"] == 0.6


def _ask_plain(tiny_dir, posterior_dir) -> dict:
    with _client(tiny_dir, posterior_dir, adaptive=False) as c:
        return _ask(c, samples="4", max_risk="0.1", seed="3")


def test_no_decision_is_served_as_before(tiny_dir, posterior_dir):
    body = _ask_plain(tiny_dir, posterior_dir)
    assert body["score"] == "maxprob"
    assert body["confidence"] == max(body["probabilities"].values())
    assert body["threshold"] == 0.6
