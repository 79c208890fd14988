"""The embedded default: base overlays (fast, on the tiny model) and the shipped app/default/
(slow: assembles the real base from the pinned packages, then checks the recorded answers)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from app.modeling import load_checkpoint
from app.overlay import OVERLAY_FILE, apply_overlay, write_overlay
from app.posterior import PosteriorError, load_posterior
from app.predict import Predictor, Request
from app.server import load_predictor
from app.settings import Settings
from app.thresholds import default_risk

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "app" / "default"
PROJ = ("model.multi_modal_projector.",)


def _fake_assembled(tiny_dir: Path, dest: Path, recipe: str = "r" * 64) -> Path:
    shutil.copytree(tiny_dir, dest)
    (dest / "quaver_base.json").write_text(json.dumps({"recipe_hash": recipe}))
    return dest


def _trained_overlay(tiny_dir, posterior_dir, tmp_path):
    """A base dir, a posterior dir with an overlay, and the 'trained' projector weight."""
    base = _fake_assembled(tiny_dir, tmp_path / "base")
    trained = load_checkpoint(base).model
    with torch.no_grad():
        trained.model.multi_modal_projector.linear.weight.mul_(-0.5).add_(0.01)
    post = tmp_path / "post"
    shutil.copytree(posterior_dir, post)
    write_overlay(post, trained, PROJ, base)
    return base, post, trained


def test_overlay_round_trip_through_the_server_loader(tiny_dir, posterior_dir, tmp_path):
    base, post, trained = _trained_overlay(tiny_dir, posterior_dir, tmp_path)
    meta = json.loads((post / "quaver.json").read_text())
    assert meta["base"]["recipe_hash"] == "r" * 64
    assert meta["base"]["overlay"]["tensors"] == [
        "model.multi_modal_projector.linear.bias",
        "model.multi_modal_projector.linear.weight",
    ]
    predictor = load_predictor(Settings(model_dir=str(base), posterior_dir=str(post)))
    got = predictor.loaded.model.model.multi_modal_projector.linear.weight
    assert torch.equal(got, trained.model.multi_modal_projector.linear.weight)
    # and the untouched base differs, so the overlay is what changed the answer path
    plain = load_checkpoint(base).model.model.multi_modal_projector.linear.weight
    assert not torch.equal(got, plain)
    wave = 0.1 * np.sin(np.arange(16000) / 5.0).astype(np.float32)
    prepared = predictor.prepare(wave, "Which sound is louder?", ["first", "second"])
    [with_overlay] = predictor.predict([Request(prepared, samples=1)])
    without = load_predictor(Settings(model_dir=str(base), posterior_dir=str(posterior_dir)))
    [plain_pred] = without.predict(
        [Request(without.prepare(wave, "Which sound is louder?", ["first", "second"]), samples=1)]
    )
    assert not np.allclose(with_overlay.probs, plain_pred.probs)


def test_overlay_refuses_other_recipe_tampering_and_shape(tiny_dir, posterior_dir, tmp_path):
    _, post, _ = _trained_overlay(tiny_dir, posterior_dir, tmp_path)
    other = _fake_assembled(tiny_dir, tmp_path / "other", recipe="s" * 64)
    with pytest.raises(PosteriorError, match="recipe"):
        apply_overlay(post, load_checkpoint(other))
    with pytest.raises(PosteriorError, match="not an assembled base"):
        apply_overlay(post, load_checkpoint(tiny_dir))
    base = tmp_path / "base"
    blob = bytearray((post / OVERLAY_FILE).read_bytes())
    blob[-3] ^= 0xFF
    (post / OVERLAY_FILE).write_bytes(bytes(blob))
    loaded = load_checkpoint(base)
    before = loaded.model.model.multi_modal_projector.linear.weight.clone()
    with pytest.raises(PosteriorError, match="sha256"):
        apply_overlay(post, loaded)
    assert torch.equal(before, loaded.model.model.multi_modal_projector.linear.weight)
    (post / OVERLAY_FILE).unlink()
    with pytest.raises(PosteriorError, match="missing its base overlay"):
        apply_overlay(post, loaded)


def test_posterior_without_overlay_leaves_the_model_alone(tiny_dir, posterior_dir):
    loaded = load_checkpoint(tiny_dir)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    assert apply_overlay(posterior_dir, loaded) == []
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------ the shipped default (slow)


def _shipped_meta() -> dict:
    if not (SHIPPED / "quaver.json").exists():
        pytest.fail("app/default/quaver.json is missing: the embedded default is not shipped")
    return json.loads((SHIPPED / "quaver.json").read_text())


def test_shipped_files_are_small_and_complete():
    meta = _shipped_meta()
    for name in ("posterior.safetensors", "quaver.json", "golden.json", OVERLAY_FILE):
        assert (SHIPPED / name).exists(), name
    total = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert total < 20 * 2**20  # a few MB: the 650 MB base is rebuilt, never committed
    assert meta["base"]["overlay"]["tensors"]
    assert meta["calibration"]["targets"]
    assert meta["recipe"]["command"] == "quaver default"
    if meta.get("control_probe"):  # the served answerable score reads it at start-up
        assert (SHIPPED / meta["control_probe"]["file"]).exists()
    # the server's default target (the rule on the served table) is the one the recipe's
    # replay of the served rule recorded on every split
    table = (meta.get("decision") or {}).get("calibration") or meta["calibration"]
    served = default_risk(table, None)
    for split, got in meta["recipe"]["served"]["ivon"].items():
        assert got["default_target"]["max_risk"] == served, split


@pytest.mark.slow
def test_shipped_default_reproduces_recorded_answers(assembled_base, capsys):
    from training.base import build as bm
    from training.cli import main
    from training.data.manifest import SAMPLE_RATE

    meta = _shipped_meta()
    assert meta["base"]["recipe_hash"] == bm.recipe_hash()
    assert meta["base"]["identity"] == load_checkpoint(assembled_base).identity
    golden = json.loads((SHIPPED / "golden.json").read_text())
    assert len(golden["items"]) >= 4
    predictor = load_predictor(Settings(model_dir=str(assembled_base), posterior_dir=str(SHIPPED)))
    for rec in golden["items"]:
        wave, rate = sf.read(SHIPPED / rec["audio"], dtype="float32")  # the test clip, shipped
        assert rate == SAMPLE_RATE and wave.ndim == 1
        [pred] = predictor.predict(
            [Request(predictor.prepare(wave, rec["question"], rec["choices"]), samples=1)]
        )
        np.testing.assert_allclose(pred.probs, rec["probabilities"], atol=2e-4)
        assert pred.answer_index == rec["answer_index"]
    # `quaver ask` answers from the command line through the same loader
    rec = golden["items"][0]
    args = ["ask", str(SHIPPED / rec["audio"]), "--question", rec["question"], "--samples", "4"]
    for c in rec["choices"]:
        args += ["--choice", c]
    args += ["--model", str(assembled_base), "--posterior", str(SHIPPED)]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["answer"] in rec["choices"]
    assert abs(sum(out["probabilities"].values()) - 1.0) < 1e-3
    assert out["score"] == meta.get("decision", {}).get("score", "maxprob")
    if meta.get("control_probe"):  # P(no answer) of a recorded test clip: answerable audio
        assert 0.0 <= out["no_answer"] < 0.5


def test_report_tables_every_family_and_predictor(tmp_path):
    from training.recipes.default import write_report

    def res(acc):
        return {
            "overall": {"accuracy": acc, "ece": 0.1, "nll": 0.7, "brier": 0.3, "aurc": 0.2},
            "by_family_accuracy": {"count": acc, "loudness": 1 - acc},
        }

    summary = {
        "times_s": {"adapt_s": 100.0, "total_s": 200.0},
        "results": {
            "ivon": {s: {"mean": res(0.8), "bma_k8": res(0.7)} for s in ("test", "test_shift")},
            "adamw": {s: {"mean": res(0.6)} for s in ("test", "test_shift")},
        },
        "reworded_test_accuracy_ivon_mean": {
            "count": {"accuracy": 0.5, "n": 20, "chance": 0.25},
            "overall": {"accuracy": 0.5, "n": 20},
        },
    }
    reports = tmp_path / "reports"
    for run in ("ivon-test", "adamw-test_shift"):
        (reports / run).mkdir(parents=True)
        (reports / run / "reliability.png").write_bytes(b"png " + run.encode())
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "stale-plot.png").write_bytes(b"old")  # from an earlier report: removed
    fams = {"sound_class": {"n": 50, "accuracy": 0.6, "chance": 1 / 3, "p_value": 1.2e-4}}
    summary["served"] = {
        "ivon": {
            "test_real": {
                "default_target": {
                    "max_risk": 0.2,
                    "guaranteed_by": 0.2,
                    "coverage": 0.4,
                    "coverage_answerable": 0.45,
                    "risk": 0.15,
                    "risk_upper_bound": 0.21,
                },
                "controls_abstention": {"n": 90, "targets": {"0.2": {"abstention": 0.95}}},
                "families": fams,
            }
        }
    }
    text = write_report(summary, tmp_path / "r.md", reports).read_text()
    assert "| ivon | test_real | 0.2 | 40.0 | 45.0 | 15.0 (<= 21.0) | 95.0 of 90 |" in text
    assert "| sound_class | 50 | 60.0 | 33.3 | 1.2e-04 |" in text
    assert "`test_real`" in text and "## Accuracy per family on `test_real`" not in text
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [
        "adamw-test_shift-reliability.png",
        "ivon-test-reliability.png",
    ]
    assert (tmp_path / "r" / "ivon-test-reliability.png").read_bytes() == b"png ivon-test"
    assert "![ivon-test-reliability](r/ivon-test-reliability.png)" in text
    assert "| count | 80.0 | 70.0 | 60.0 |" in text
    assert "| loudness | 20.0 | 30.0 | 40.0 |" in text
    assert "## Accuracy per family on `test_shift`" in text
    assert "| count | 50.0 | 25.0 | 20 |" in text
    assert "| adapt | 100 |" in text


def test_ship_on_the_tiny_model_records_reproducible_answers(tiny_dir, posterior_dir, tmp_path):
    from training.data.generate import BenchmarkConfig, generate_benchmark
    from training.recipes.default import DefaultRecipe, reworded_accuracy, ship

    data = tmp_path / "work" / "data" / "bench"
    sizes = {"pretrain": 0, "train": 0, "calib": 0, "test": 9, "test_shift": 0}
    generate_benchmark(BenchmarkConfig(seed=3, **sizes), data, progress=False)
    base = _fake_assembled(tiny_dir, tmp_path / "base")
    aligned = tmp_path / "aligned"
    trained = load_checkpoint(base)
    with torch.no_grad():
        trained.model.model.multi_modal_projector.linear.weight.mul_(2.0)
    from app.modeling import save_checkpoint

    save_checkpoint(trained.model, trained.tokenizer, aligned)
    recipe = DefaultRecipe(
        work=tmp_path / "work",
        base_dir=base,
        ship_dir=tmp_path / "ship",
        examples_dir=None,  # the page's clips need the real families (tests/test_examples.py)
        seed=3,
        golden_items=3,
    )
    dest = ship(recipe, aligned, posterior_dir, {"times_s": {"total_s": 1.0}})
    golden = json.loads((dest / "golden.json").read_text())
    assert [g["index"] for g in golden["items"]] == [0, 1, 2]
    meta = json.loads((dest / "quaver.json").read_text())
    assert meta["recipe"]["command"] == "quaver default"
    # the shipped dir on the plain base == the aligned model + posterior
    shipped = load_predictor(Settings(model_dir=str(base), posterior_dir=str(dest)))
    # (the trained base is another base by content, so the posterior is attached unchecked)
    trained_base = load_checkpoint(aligned)
    direct = Predictor(trained_base, load_posterior(posterior_dir, model=trained_base.model))
    from training.data.manifest import load_audio_file, read_manifest

    for rec, item in zip(golden["items"], read_manifest(data, "test"), strict=False):
        wave = load_audio_file(data, item)
        assert (dest / rec["audio"]).read_bytes() == (data / item.audio).read_bytes()
        for pred_ in (shipped, direct):
            [p] = pred_.predict([Request(pred_.prepare(wave, rec["question"], rec["choices"]))])
            np.testing.assert_allclose(p.probs, rec["probabilities"], atol=1e-5)
    rw = reworded_accuracy(base, dest, data, per_family=1, progress=False)
    families = {f: v for f, v in rw.items() if f != "overall"}
    assert rw["overall"]["n"] == 9 and len(families) == 9  # one item of each family
    assert all(v["n"] == 1 and v["accuracy"] in (0.0, 1.0) for v in families.values())
    assert rw["overall"]["accuracy"] == pytest.approx(
        np.mean([v["accuracy"] for v in families.values()])
    )


def test_prefix_cache_gives_the_same_predictions_and_is_shared(tiny_dir, tmp_path):
    """Evaluation with the on-disk prefix cache equals evaluation without it, for a posterior
    that filled the cache and for another posterior (same LoRA layers) that only read it."""
    from app.posterior import save_posterior
    from tests.conftest import CALIBRATION, random_posterior
    from training.data.generate import BenchmarkConfig, generate_benchmark
    from training.eval.predictions import is_cached, predict_split

    data = tmp_path / "bench"
    sizes = {"pretrain": 0, "train": 0, "calib": 0, "test": 6, "test_shift": 0}
    generate_benchmark(BenchmarkConfig(seed=5, **sizes), data, progress=False)
    model = load_checkpoint(tiny_dir)
    posts = [
        save_posterior(
            tmp_path / f"post{s}",
            random_posterior(
                model.model, seed=s, calibration=CALIBRATION, base_hash=model.identity
            ),
        )
        for s in (1, 2)
    ]
    cache = tmp_path / "pc"
    results = []
    for post in posts:
        assert not is_cached(post, data, "test", samples=3)
        with_cache = predict_split(
            tiny_dir,
            post,
            data,
            "test",
            samples=3,
            batch_size=4,
            progress=False,
            prefix_cache=cache,
        )
        assert len(list(cache.glob("*.pt"))) == 1  # written by the first, reused by the second
        assert is_cached(post, data, "test", samples=3)
        assert not is_cached(post, data, "test", samples=3, seed=1)  # another draw of the noise
        [saved] = (post / "predictions").iterdir()  # one finished .npz, no temporary left over
        assert saved.suffix == ".npz"
        again = predict_split(tiny_dir, post, data, "test", samples=3, progress=False)
        np.testing.assert_array_equal(again.sample_probs, with_cache.sample_probs)  # read back
        shutil.rmtree(post / "predictions")
        plain = predict_split(tiny_dir, post, data, "test", samples=3, batch_size=4, progress=False)
        np.testing.assert_allclose(with_cache.mean_probs, plain.mean_probs, atol=1e-5)
        np.testing.assert_allclose(with_cache.sample_probs, plain.sample_probs, atol=1e-5)
        results.append(plain.sample_probs)
    assert not np.allclose(results[0], results[1])  # two posteriors, one shared cache


def test_step_times_survive_a_resumed_invocation(monkeypatch):
    # A step finished by an earlier invocation keeps the time it took then, not ~0 s.
    import time

    import training.recipes.flow as dm

    monkeypatch.setattr(dm, "CACHED_S", 0.05)
    times = {"adapt_s": 2736.0}
    assert dm.timed(times, "adapt_s", lambda: "cached") == "cached"
    assert times["adapt_s"] == 2736.0
    dm.timed(times, "adapt_s", time.sleep, 0.1)  # it ran again: the new time counts
    assert 0.05 <= times["adapt_s"] < 2736.0
    # never recorded before: its time counts, however short (any step would look "cached" now,
    # so this holds on a machine of any speed)
    monkeypatch.setattr(dm, "CACHED_S", 1e9)
    dm.timed(times, "ship_s", lambda: None)
    assert 0 <= times["ship_s"] < 1e9
