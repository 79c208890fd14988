"""The control probe (app.control, training.eval.control_probe): its feature by hand, its file
format and the errors of a bad one, its fit, the "answerable" score, the Predictor's P(control)
against the probe applied to the prefix by hand, and the server answering with that score."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from app.control import CONTROL_PROBE_FILE, ControlProbe, audio_quarter_means, load_control_probe
from app.posterior import PosteriorError, load_posterior
from app.predict import Predictor, Request
from app.scores import Decision, score_values
from app.server import create_app
from app.settings import Settings
from tests.conftest import tone, wav_bytes
from training.eval.control_probe import attach_control_probe, fit_control_probe
from training.eval.metrics import control_auroc

QUESTION = "How many beeps are there?"
CHOICES = ["one", "two", "three"]


def test_audio_quarter_means_by_hand():
    torch.manual_seed(0)
    h = torch.randn(2, 14, 3)
    mask = torch.zeros(2, 14, dtype=torch.bool)
    mask[0, 1:11] = True  # 10 audio tokens: quarters split at 0, 2, 5, 7, 10
    mask[1, 2:5] = True  # 3 tokens: quarters 0..2 hold none, one, one; the last holds one
    got = audio_quarter_means(h, mask)
    assert got.shape == (2, 12)
    a = h[0, 1:11]
    want0 = torch.cat([a[0:2].mean(0), a[2:5].mean(0), a[5:7].mean(0), a[7:10].mean(0)])
    torch.testing.assert_close(got[0], want0)
    b = h[1, 2:5]  # bounds 0, 0, 1, 2, 3: the first quarter is empty (zeros)
    want1 = torch.cat([torch.zeros(3), b[0], b[1], b[2]])
    torch.testing.assert_close(got[1], want1)
    with pytest.raises(ValueError, match="differ"):
        audio_quarter_means(h, mask[:, :5])


def _probe(d: int, layer: int, seed: int = 0) -> ControlProbe:
    g = torch.Generator().manual_seed(seed)
    f = 4 * d
    return ControlProbe(
        mean=torch.randn(f, generator=g),
        scale=torch.rand(f, generator=g) + 0.5,
        weight=torch.randn(f, generator=g) * 0.3,
        bias=-0.5,
        layer=layer,
        info={"fitted_on": "test"},
    )


def _with_probe(src, dst, probe: ControlProbe, decision: dict | None = None):
    shutil.copytree(src, dst)
    attach_control_probe(dst, probe)
    if decision is not None:
        meta = json.loads((dst / "quaver.json").read_text())
        meta["decision"] = decision
        (dst / "quaver.json").write_text(json.dumps(meta))
    return dst


def test_probe_file_round_trip_and_errors(tmp_path):
    probe = _probe(8, layer=3)
    entry = probe.save(tmp_path)
    assert entry["file"] == CONTROL_PROBE_FILE and entry["layer"] == 3
    meta = {"control_probe": entry}
    back = load_control_probe(tmp_path, meta, first_layer=3, hidden_size=8)
    for name in ("mean", "scale", "weight"):
        torch.testing.assert_close(getattr(back, name), getattr(probe, name))
    assert back.bias == pytest.approx(-0.5) and back.info["fitted_on"] == "test"
    assert load_control_probe(tmp_path, {}, first_layer=3) is None  # no entry: no probe
    with pytest.raises(PosteriorError, match="first LoRA layer is 4"):
        load_control_probe(tmp_path, meta, first_layer=4)
    with pytest.raises(PosteriorError, match="hidden size 8"):
        load_control_probe(tmp_path, meta, first_layer=3, hidden_size=16)
    with pytest.raises(PosteriorError, match="unknown control probe feature"):
        load_control_probe(tmp_path, {"control_probe": {**entry, "feature": "x"}}, first_layer=3)
    (tmp_path / CONTROL_PROBE_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(PosteriorError, match="cannot read the control probe"):
        load_control_probe(tmp_path, meta, first_layer=3)
    (tmp_path / CONTROL_PROBE_FILE).unlink()
    with pytest.raises(PosteriorError, match="lacks"):
        load_control_probe(tmp_path, meta, first_layer=3)
    with pytest.raises(ValueError, match="NaN"):
        ControlProbe(torch.zeros(4), torch.ones(4), torch.full((4,), float("nan")), 0.0, 1)
    with pytest.raises(ValueError, match="positive"):
        ControlProbe(torch.zeros(4), torch.zeros(4), torch.zeros(4), 0.0, 1)


def test_fit_separates_controls_and_needs_both_classes():
    rng = np.random.default_rng(0)
    n, f = 200, 16
    control = rng.random(n) < 0.2
    x = rng.normal(size=(n, f))
    x[control, 0] += 3.0  # controls differ along one direction
    probe = fit_control_probe(torch.tensor(x, dtype=torch.float32), control, layer=2)
    p = torch.sigmoid(probe.logits(torch.tensor(x, dtype=torch.float32))).numpy()
    assert control_auroc(1 - p, control) > 0.95
    assert probe.info["n"] == n and probe.info["n_control"] == int(control.sum())
    with pytest.raises(ValueError, match="both"):
        fit_control_probe(torch.tensor(x, dtype=torch.float32), np.zeros(n, bool), layer=2)


def test_answerable_score_by_hand():
    s = np.array([[[0.6, 0.4], [0.8, 0.2]], [[0.5, 0.5], [0.3, 0.7]]])  # (2 items, K=2, C=2)
    got = score_values(s, "answerable", p_control=np.array([0.25, 0.5]))
    np.testing.assert_allclose(got, [0.7 * 0.75, 0.6 * 0.5])
    with pytest.raises(ValueError, match="p_control"):
        score_values(s, "answerable")
    with pytest.raises(ValueError, match="probabilities"):
        score_values(s, "answerable", p_control=np.array([0.2, 1.5]))
    d = Decision(score="answerable", temperature=2.0)
    assert d.needs_probe and not d.needs_samples and not Decision().needs_probe
    probs, conf = d.apply(s[0], p_control=0.25)
    assert conf == pytest.approx(probs.max() * 0.75)


def test_predictor_p_control_is_the_probe_on_the_prefix(tiny_dir, posterior_dir, tmp_path):
    post = load_posterior(posterior_dir)
    d = int(post.mean[next(iter(post.mean))].shape[1])  # lora_A of a q_proj: (r, d)
    probe = _probe(d, post.spec.first_layer)
    path = _with_probe(posterior_dir, tmp_path / "probe", probe)
    pred = Predictor.from_dirs(tiny_dir, path)
    assert pred.control_probe is not None
    preps = [pred.prepare(tone(s, f), QUESTION, CHOICES) for s, f in ((1.0, 440), (2.0, 880))]
    out = pred.predict([Request(p, samples=3, seed=1) for p in preps])
    h, batch = pred.prefix(preps)
    audio = batch.ids == pred.loaded.family.audio_token_id(pred.loaded.model)
    want = probe.p_control(h, audio)
    np.testing.assert_allclose([o.p_control for o in out], want.numpy(), rtol=1e-5)
    assert want.min() > 0 and want.max() < 1
    # without a probe: no P(control); an answerable decision without one refuses to load
    plain = Predictor.from_dirs(tiny_dir, posterior_dir)
    assert plain.predict([Request(preps[0])])[0].p_control is None
    bad = tmp_path / "bad"
    shutil.copytree(posterior_dir, bad)
    meta = json.loads((bad / "quaver.json").read_text())
    meta["decision"] = {"score": "answerable"}
    (bad / "quaver.json").write_text(json.dumps(meta))
    with pytest.raises(PosteriorError, match="needs a control probe"):
        Predictor.from_dirs(tiny_dir, bad, use_decision=True)


def test_server_answers_with_the_answerable_score(tiny_dir, posterior_dir, tmp_path):
    post = load_posterior(posterior_dir)
    d = int(post.mean[next(iter(post.mean))].shape[1])
    table = {
        "delta": 0.05,
        "targets": [
            {"max_risk": 0.1, "threshold": 0.3, "coverage": 0.5, "risk_bound": 0.1},
            {"max_risk": 0.2, "threshold": 0.1, "coverage": 0.8, "risk_bound": 0.2},
        ],
    }
    decision = {"score": "answerable", "temperature": 2.0, "calibration": table}
    path = _with_probe(posterior_dir, tmp_path / "ans", _probe(d, post.spec.first_layer), decision)
    s = Settings(model_dir=tiny_dir, posterior_dir=path, default_samples=4, adaptive=False)
    with TestClient(create_app(s, load_in_background=False)) as c:
        files = {"audio": ("clip.wav", wav_bytes(tone(1.5)), "audio/wav")}
        form = {"question": QUESTION, "choices": CHOICES, "max_risk": "0.1", "samples": "4"}
        r = c.post("/answer", files=files, data=form)
        assert c.get("/model").json()["score"] == "answerable"
    assert r.status_code == 200, r.text
    body = r.json()
    p_none = body["uncertainty"]["no_answer"]
    assert body["score"] == "answerable" and 0 < p_none < 1
    shown = max(body["probabilities"].values())  # temperature-scaled BMA
    assert body["confidence"] == pytest.approx(shown * (1 - p_none), rel=1e-5)
    assert body["threshold"] == 0.3 and body["abstain"] == (body["confidence"] < 0.3)
