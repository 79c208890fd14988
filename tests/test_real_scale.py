"""The real-scale path on CPU: for each family, a random-weight model of the real architecture
(cut-down config, published layout, local tokenizer) is fine-tuned with IVON on a bf16 base
(LoRA on every LLM linear layer, micro-batches, gradient checkpointing), exported, loaded by the
server and asked over POST /answer; the posterior is fp32 whatever the base dtype, and serving
it on an fp32 base and on a bf16 base agrees within a stated tolerance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from app.predict import Predictor, Request
from app.server import create_app
from app.settings import Settings
from tests.conftest import tone, wav_bytes
from training.config import ConfigError, FinetuneConfig, IVONConfig, LoRAConfig
from training.stages.finetune import finetune
from training.stages.loop import read_log

# Letter probabilities of one posterior served on an fp32 base and on a bf16 base differ by the
# bf16 rounding of weights and activations (8 mantissa bits, about 0.4% per value). Measured on
# these tiny models: at most 0.002 (K=1 and K=8, both families); the bound leaves 5x room.
BF16_SERVE_ATOL = 0.01


def _train(base_dir, data_dir, out_dir, **changes) -> FinetuneConfig:
    settings = dict(
        base_dir=base_dir,
        data_dir=data_dir,
        out_dir=out_dir,
        optimizer="ivon",
        epochs=1,
        batch_size=4,
        limit=8,
        dtype="bfloat16",
        micro_batch_size=2,
        gradient_checkpointing=True,
        lora=LoRAConfig(rank=4, alpha=8.0),  # every decoder layer, every linear of the LLM
        ivon=IVONConfig(lr=0.05, ess=1e3, hess_init=0.1, beta2=0.999, clip_radius=1.0),
    )
    settings.update(changes)
    return FinetuneConfig(**settings)


@pytest.fixture(scope="module", params=["qwen2-audio", "qwen2.5-omni"])
def trained(request, tiny_dir, tiny_omni_dir, toy_bench, tmp_path_factory):
    base = tiny_dir if request.param == "qwen2-audio" else tiny_omni_dir
    cfg = _train(base, toy_bench, tmp_path_factory.mktemp("real") / "run")
    return cfg, finetune(cfg, progress=False)


def test_bf16_training_exports_an_fp32_posterior_on_every_layer(trained):
    cfg, post_dir = trained
    tensors = load_file(post_dir / "posterior.safetensors")
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())
    layers = {k.split(".layers.")[1].split(".")[0] for k in tensors}
    assert layers == {"0", "1", "2", "3"}  # LoRA reached layer 0: no prefix cache was used
    stds = torch.cat([t.flatten() for k, t in tensors.items() if k.endswith(".std")])
    assert torch.isfinite(stds).all() and float(stds.max()) > 0
    [record] = read_log(cfg.out_dir)
    assert record["step_s"] > 0 and record["peak_memory_mb"]["host_mb"] > 0
    assert np.isfinite(record["loss"])


def test_trained_posterior_serves_over_http(trained):
    cfg, post_dir = trained
    settings = Settings(
        model_dir=cfg.base_dir, posterior_dir=post_dir, default_samples=4, adaptive=False
    )
    with TestClient(create_app(settings, load_in_background=False)) as client:
        choices = ["one", "two", "three"]
        r = client.post(
            "/answer",
            files={"audio": ("clip.wav", wav_bytes(tone(1.5)), "audio/wav")},
            data={"question": "How many beeps are there?", "choices": choices, "samples": "4"},
        )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["answer"] in choices and body["samples"] == 4
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def test_bf16_trained_posterior_agrees_served_in_fp32_and_bf16(trained):
    cfg, post_dir = trained
    preds = {}
    for dtype in (torch.float32, torch.bfloat16):
        predictor = Predictor.from_dirs(cfg.base_dir, post_dir, dtype=dtype)
        prepared = [
            predictor.prepare(tone(s, f), "How many beeps are there?", ["one", "two", "three"])
            for s, f in ((1.0, 440.0), (2.5, 880.0))
        ]
        requests = [Request(p, 1) for p in prepared] + [Request(p, 8, seed=5) for p in prepared]
        preds[dtype] = np.stack([p.probs for p in predictor.predict(requests)])
    gap = np.abs(preds[torch.float32] - preds[torch.bfloat16]).max()
    print(f"fp32 vs bf16 serving: max |dp| = {gap:.4f}")
    assert gap < BF16_SERVE_ATOL, gap


def test_device_and_dtype_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="device"):
        FinetuneConfig(device="gpu")
    with pytest.raises(ConfigError, match="dtype"):
        FinetuneConfig(dtype="float16")
    with pytest.raises(ConfigError, match="micro_batch_size"):
        FinetuneConfig(batch_size=4, micro_batch_size=8)
    assert FinetuneConfig(device="cuda:1").device == "cuda:1"


def test_evaluation_in_bf16_is_cached_apart_and_agrees(trained, tmp_path):
    """predict_split / calibrate_posterior with the base in bf16: its own prediction and prefix
    caches (the fp32 keys are unchanged), float32 probabilities close to the fp32 ones, and the
    calibration table says which dtype it was made in."""
    import json
    import shutil

    from training.eval.evaluate import calibrate_posterior
    from training.eval.predictions import PredictionRun, _cache_path, is_cached, predict_split
    from training.stages.prefix import prefix_cache_key

    cfg, trained_dir = trained
    post_dir = shutil.copytree(trained_dir, tmp_path / "posterior")  # calibrate writes into it
    data = cfg.data_dir
    assert (
        prefix_cache_key(cfg.base_dir, data, "test", 2)
        == prefix_cache_key(cfg.base_dir, data, "test", 2, dtype="float32")
        != prefix_cache_key(cfg.base_dir, data, "test", 2, dtype="bfloat16")
    )
    assert "bfloat16" not in _cache_path(post_dir, data, "test", 4, 0).name
    assert _cache_path(post_dir, data, "test", 4, 0, "bfloat16").name.startswith(
        "test-K4-s0-bfloat16-"
    )
    out = {}
    for dtype in ("float32", "bfloat16"):
        out[dtype] = predict_split(
            cfg.base_dir, post_dir, data, "test", samples=4, progress=False, dtype=dtype
        )
        assert is_cached(post_dir, data, "test", 4, dtype=dtype)
        assert out[dtype].sample_probs.dtype == np.float32
    gap = np.abs(out["float32"].sample_probs - out["bfloat16"].sample_probs).max()
    assert gap < BF16_SERVE_ATOL, gap
    run = PredictionRun(cfg.base_dir, post_dir, data, samples=4, progress=False, dtype="bfloat16")
    table = calibrate_posterior(run, "calib")
    assert table["dtype"] == "bfloat16"
    meta = json.loads((post_dir / "quaver.json").read_text())
    assert meta["calibration"]["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="dtype must be float32 or bfloat16"):
        predict_split(cfg.base_dir, post_dir, data, "test", samples=1, dtype="float16")


def test_autocast_trains_in_bf16_and_keeps_fp32_state(tiny_dir, toy_bench, tmp_path):
    """`autocast` on an fp32 base: the forward runs in bf16 (the first step's loss moves by bf16
    rounding, not by more), the posterior stays fp32, and a run without the setting is still
    the run it was (ADDED_DEFAULTS)."""
    from training.stages.loop import settings_diff

    logs, posts = {}, {}
    for amp in (False, True):
        cfg = _train(tiny_dir, toy_bench, tmp_path / f"amp{amp}", dtype="float32", autocast=amp)
        posts[amp] = finetune(cfg, progress=False)
        logs[amp] = read_log(cfg.out_dir)
    steps = {amp: [r for r in log if "loss" in r] for amp, log in logs.items()}
    first = {amp: s[0]["loss"] for amp, s in steps.items()}
    assert first[False] != first[True]  # bf16 compute really happened
    assert abs(first[False] - first[True]) < 0.05 * abs(first[False]), first
    tensors = load_file(posts[True] / "posterior.safetensors")
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert settings_diff({"dtype": "float32"}, {"dtype": "float32", "autocast": False}) == []
    assert settings_diff({}, {"autocast": True}) == ["autocast: False -> True"]
