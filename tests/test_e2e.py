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
from training.config import AdamWConfig, FinetuneConfig, LoRAConfig
from training.data.manifest import read_manifest
from training.stages.finetune import finetune
from training.stages.pretrain import pretrain

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture(scope="module")
def pipeline(toy_bench, toy_base, tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    data, base = toy_bench, toy_base
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
    post = load_posterior(post_dir, expected_base=loaded.identity, model=loaded.model)
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
    from training.eval.predictions import PredictionRun

    data, base, post_dir, _ = pipeline
    run = PredictionRun(base, post_dir, data, samples=4, progress=False)
    table = calibrate_posterior(run, "calib")
    assert [t["max_risk"] for t in table["targets"]] == [0.01, 0.02, 0.05, 0.1, 0.2]
    assert table["n"] == 16 and table["samples"] == 4
    for t in table["targets"]:
        assert (t["threshold"] is None) == (not t["feasible"])
    assert load_posterior(post_dir).calibration == table
    with pytest.raises(ValueError, match="never on test"):
        calibrate_posterior(run, "test")
    with pytest.raises(ValueError, match="samples must be at least 1"):
        PredictionRun(base, post_dir, data, samples=0)
    res = evaluate_posterior(run, "test", out_dir=tmp_path / "rep")
    assert res["n"] == 16
    # the reported accuracy is the one of the cached per-item predictions it was computed from
    from training.eval.predictions import predict_split

    preds = predict_split(base, post_dir, data, "test", samples=4, progress=False)
    hits = (preds.bma(4).argmax(-1) == preds.labels).mean()
    assert res["bma_k4"]["overall"]["accuracy"] == pytest.approx(float(hits))
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
        probs = body["probabilities"]
        assert body["confidence"] == pytest.approx(max(probs.values()))
        assert body["answer"] == max(probs, key=probs.get)
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)


def test_every_stage_refuses_a_finished_output_made_with_other_settings(
    toy_bench, toy_base, pipeline, tmp_path, capsys
):
    import yaml

    from tests.conftest import toy_pretrain_config
    from training.cli import main
    from training.config import ConfigError, to_dict

    # pretrain: the shared toy base, asked for with another learning rate
    with pytest.raises(ConfigError, match=r"other settings \(lr: 0.002 -> 0.001\)"):
        pretrain(toy_pretrain_config(toy_bench, toy_base, lr=1e-3), progress=False)
    # the same settings with other threads: a result-neutral change, the base is reused
    again = toy_pretrain_config(toy_bench, toy_base, threads=1)
    assert pretrain(again, progress=False) == toy_base
    # adapt and finetune, through the CLI: one line on stderr, exit 2
    _, _, _, run = pipeline
    for stage in ("finetune", "adapt"):
        path = tmp_path / f"{stage}.yaml"
        path.write_text(yaml.safe_dump({**to_dict(run), "stage": stage, "batch_size": 4}))
        assert main(["train", "--config", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert "holds a finished run with other settings (batch_size: 8 -> 4)" in err


def test_more_epochs_continue_a_finished_run(toy_bench, toy_base, tmp_path):
    from tests.conftest import toy_pretrain_config
    from training.stages.loop import read_log
    from training.stages.pretrain import run_dir

    # LoRA stage, constant learning rate: one epoch then a second equals two epochs straight
    def run(out, epochs):
        cfg = FinetuneConfig(
            base_dir=toy_base,
            data_dir=toy_bench,
            out_dir=out,
            epochs=epochs,
            batch_size=8,
            cosine=False,
        )
        cfg.lora.top_layers = 1
        cfg.ivon.ess, cfg.ivon.hess_init, cfg.ivon.clip_radius = 2000.0, 0.1, float("inf")
        return cfg

    finetune(run(tmp_path / "grown", 1), progress=False)
    grown = load_posterior(finetune(run(tmp_path / "grown", 2), progress=False))
    straight = load_posterior(finetune(run(tmp_path / "straight", 2), progress=False))
    assert [r["epoch"] for r in read_log(tmp_path / "grown")] == [1, 2]
    assert grown.meta["hyperparameters"]["epochs"] == 2
    for key in straight.mean:
        assert grown.mean[key].allclose(straight.mean[key], atol=1e-6), key
        assert grown.std[key].allclose(straight.std[key], atol=1e-6), key
    # stage 1: the second epoch continues from the first one's state, not from scratch
    one = toy_pretrain_config(toy_bench, tmp_path / "base")
    pretrain(one, progress=False)
    first = load_checkpoint(one.out_dir).model.state_dict()
    pretrain(dataclasses.replace(one, epochs=2), progress=False)
    log = read_log(run_dir(one.out_dir))
    assert [r["epoch"] for r in log] == [1, 2] and log[1]["step"] == 2 * log[0]["step"]
    second = load_checkpoint(one.out_dir).model.state_dict()
    assert any(not first[k].equal(second[k]) for k in first)
    # fewer epochs than the finished run cannot be answered by it
    from training.config import ConfigError

    with pytest.raises(ConfigError, match=r"epochs: 2 -> 1"):
        pretrain(one, progress=False)


def test_an_unfinished_run_with_other_settings_is_refused_in_one_line(pipeline, tmp_path, capsys):
    import yaml

    from training.cli import main
    from training.config import to_dict
    from training.stages.loop import fingerprint, save_state

    _, _, _, run = pipeline
    out = tmp_path / "stopped"
    other = dataclasses.replace(run, out_dir=out, seed=run.seed + 1)
    save_state(out, {"fingerprint": fingerprint(to_dict(other))})  # a run stopped midway
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**to_dict(run), "out_dir": str(out)}))
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err  # after the model loaded: its progress bar, then the error
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"quaver train: error: {out} holds an unfinished run with other")


def test_finetune_pair_side_by_side_equals_one_after_the_other(toy_bench, toy_base, tmp_path):
    """The recipes' IVON/AdamW pair, trained in two spawned processes at 1 thread each, gives
    the same posteriors as the same configs trained here one after the other; the caller's
    torch thread count is left as it was."""
    import torch

    from training.recipes.flow import finetune_pair, side_by_side_workers

    def cfgs(root):
        out = {}
        for name in ("ivon", "adamw"):
            cfg = FinetuneConfig(
                base_dir=toy_base,
                data_dir=toy_bench,
                out_dir=root / name,
                optimizer=name,
                epochs=1,
                batch_size=8,
                threads=1,
            )
            cfg.lora.top_layers = 2
            out[name] = cfg
        return out

    pair = cfgs(tmp_path / "pair")
    assert side_by_side_workers(pair, cpus=2) == 2 and side_by_side_workers(pair, cpus=1) == 1
    assert side_by_side_workers({"ivon": pair["ivon"]}, cpus=2) == 1
    many = {f"{name}-{i}": c for i in range(3) for name, c in pair.items()}  # 6 runs, 1 thread
    assert side_by_side_workers(many, cpus=2) == 2 and side_by_side_workers(many, cpus=16) == 6
    wide = {name: dataclasses.replace(c, threads=2) for name, c in many.items()}
    assert side_by_side_workers(wide, cpus=4) == 2 and side_by_side_workers(wide, cpus=3) == 1
    threads = torch.get_num_threads()
    times: dict = {}
    try:
        posts = finetune_pair(pair, times, progress=False)
        assert torch.get_num_threads() == threads
        alone = {
            name: finetune(cfg, progress=False) for name, cfg in cfgs(tmp_path / "seq").items()
        }
    finally:
        torch.set_num_threads(threads)
    assert set(times) == {"ivon_s", "adamw_s"} and all(t > 0 for t in times.values())
    loaded = load_checkpoint(toy_base)
    for name in ("ivon", "adamw"):
        a = load_posterior(posts[name], expected_base=loaded.identity, model=loaded.model)
        b = load_posterior(alone[name], expected_base=loaded.identity, model=loaded.model)
        assert a.meta["optimizer"] == name and a.mean.keys() == b.mean.keys()
        for key in a.mean:
            assert torch.equal(a.mean[key], b.mean[key]), (name, key)
            assert torch.equal(a.std[key], b.std[key]), (name, key)
