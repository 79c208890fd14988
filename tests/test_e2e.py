"""End to end on the tiny model: benchmark -> stage 1 -> IVON LoRA -> export -> serve -> POST.

This is the real pipeline at toy sizes (a few dozen clips, one or two epochs), through the same
CLI functions a user runs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.modeling import load_checkpoint
from app.posterior import load_posterior
from app.server import create_app
from app.settings import Settings
from training.config import AdamWConfig, FinetuneConfig, LoRAConfig, PretrainConfig
from training.data.generate import BenchmarkConfig, generate_benchmark
from training.data.manifest import read_manifest
from training.stages.finetune import finetune
from training.stages.pretrain import pretrain

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    data = generate_benchmark(
        BenchmarkConfig(seed=3, pretrain=48, train=24, calib=16, test=16, test_shift=8),
        work / "bench",
        progress=False,
    )
    base = pretrain(
        PretrainConfig(
            data_dir=data,
            out_dir=work / "base",
            epochs=1,
            batch_size=8,
            vocab_size=600,
            warmup_steps=2,
        ),
        progress=False,
    )
    run = FinetuneConfig(
        base_dir=base,
        data_dir=data,
        out_dir=work / "ivon",
        epochs=2,
        batch_size=8,
        checkpoint_every=2,
    )
    run.lora.top_layers = 2
    run.ivon.ess, run.ivon.hess_init, run.ivon.clip_radius = 2000.0, 0.1, float("inf")
    return data, base, finetune(run, progress=False), run


def test_export_round_trip(pipeline):
    _, base, post_dir, run = pipeline
    loaded = load_checkpoint(base)
    post = load_posterior(post_dir, expected_config_hash=loaded.config_hash, model=loaded.model)
    assert post.spec.layers == (2, 3) and len(post.spec.modules) == 14
    assert post.meta["optimizer"] == "ivon" and post.meta["data"]["fingerprint"]
    stds = [s for k, s in post.std.items()]
    assert all((s > 0).all() for s in stds)
    log = [json.loads(x) for x in (run.out_dir / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and "hessian" in log[-1]


def test_resume_continues_the_same_run(pipeline, tmp_path):
    _, _, post_dir, run = pipeline
    # Stop after one epoch, then resume to two: the result equals the uninterrupted run.
    short = FinetuneConfig(**{**run.__dict__, "out_dir": tmp_path / "r", "epochs": 2})
    import training.stages.finetune as ft

    calls = {"n": 0}
    real_step = ft.IVON.step

    def crashing_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    ft.IVON.step = crashing_step
    try:
        with pytest.raises(KeyboardInterrupt):
            finetune(short, progress=False)
    finally:
        ft.IVON.step = real_step
    resumed = load_posterior(finetune(short, progress=False))
    full = load_posterior(post_dir)
    for key in full.mean:
        assert resumed.mean[key].allclose(full.mean[key], atol=1e-6), key
        assert resumed.std[key].allclose(full.std[key], atol=1e-6), key


def test_finished_run_is_reused_only_with_the_same_settings(pipeline):
    # `quaver report` and `quaver default` skip finished runs: a changed config must not be
    # answered with the posterior of the old one.
    from training.config import ConfigError

    _, _, post_dir, run = pipeline
    before = (post_dir / "posterior.safetensors").stat().st_mtime_ns
    same = dataclasses.replace(run, threads=1)  # threads do not change the result
    assert finetune(same, progress=False) == post_dir
    assert (post_dir / "posterior.safetensors").stat().st_mtime_ns == before
    changed = dataclasses.replace(run, ivon=dataclasses.replace(run.ivon, lr=run.ivon.lr / 3))
    with pytest.raises(ConfigError, match=r"other settings \(ivon\.lr: "):
        finetune(changed, progress=False)


def test_warm_start_begins_at_the_earlier_mean(pipeline, tmp_path):
    # Stage 1b -> stage 2 of the default: `init_from` starts the adapter at an earlier run's mean.
    from app.posterior import PosteriorError

    _, _, post_dir, run = pipeline
    warm = dataclasses.replace(
        run,
        out_dir=tmp_path / "w",
        epochs=1,
        init_from=post_dir,
        optimizer="adamw",
        adamw=AdamWConfig(lr=1e-12),  # a step that cannot move the weights
    )
    after = load_posterior(finetune(warm, progress=False))
    before = load_posterior(post_dir)
    assert after.meta["hyperparameters"]["init_from"] == str(post_dir)
    for key in before.mean:
        assert after.mean[key].allclose(before.mean[key], atol=1e-6), key
    other = dataclasses.replace(
        warm, out_dir=tmp_path / "x", lora=LoRAConfig(rank=4, alpha=8.0, top_layers=2)
    )
    with pytest.raises(PosteriorError, match="LoRA placement"):
        finetune(other, progress=False)


def test_evaluate_and_calibrate(pipeline, tmp_path):
    from training.eval.evaluate import calibrate_posterior, evaluate_posterior

    data, base, post_dir, _ = pipeline
    table = calibrate_posterior(base, post_dir, data, "calib", samples=4, progress=False)
    assert [t["max_risk"] for t in table["targets"]] == [0.01, 0.02, 0.05, 0.1, 0.2]
    assert table["n"] == 16 and table["samples"] == 4
    for t in table["targets"]:
        assert (t["threshold"] is None) == (not t["feasible"])
    assert load_posterior(post_dir).calibration == table
    with pytest.raises(ValueError, match="never on test"):
        calibrate_posterior(base, post_dir, data, "test", progress=False)
    res = evaluate_posterior(
        base, post_dir, data, "test", samples=4, out_dir=tmp_path / "rep", progress=False
    )
    assert res["n"] == 16 and 0 <= res["bma_k4"]["overall"]["accuracy"] <= 1
    assert set(res["mean"]["by_family"]) == set(res["bma_k4"]["by_family"])
    for png in ("reliability.png", "risk_coverage.png", "confidence_hist.png"):
        assert (tmp_path / "rep" / png).stat().st_size > 1000


def test_serve_and_answer(pipeline):
    data, base, post_dir, _ = pipeline
    item = read_manifest(data, "test")[0]
    settings = Settings(model_dir=base, posterior_dir=post_dir, adaptive=False)
    with TestClient(create_app(settings, load_in_background=False)) as client:
        assert client.get("/readyz").status_code == 200
        audio = (data / item.audio).read_bytes()
        r = client.post(
            "/answer",
            files={"audio": ("clip.wav", audio, "audio/wav")},
            data={"question": item.question, "choices": list(item.choices), "samples": "8"},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["answer"] in item.choices and body["samples"] == 8
        assert 0 < body["confidence"] <= 1 and body["uncertainty"]["mutual_information"] >= 0
