"""The results report: temperature scaling, aggregation, and `quaver report` end to end on a
tiny pipeline (toy benchmark, one-epoch stage 1, two seeds of one-epoch IVON and AdamW runs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from app.posterior import load_posterior
from app.scores import Decision
from tests.conftest import (
    FIXTURE_PACKAGES,
    fixture_benchmark,
    fixture_library,
    toy_pretrain_config,
    write_real_fixture_root,
)
from training.eval.metrics import summarize
from training.eval.posterior_shape import update_size
from training.eval.predictions import predict_split
from training.eval.temperature import apply_temperature, fit_temperature
from training.recipes.report import ReportConfig
from training.recipes.report_scores import COVERAGES, RISKS, aggregate, predictor_names


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_temperature_one_is_identity_and_keeps_padding():
    probs = np.array([[0.7, 0.2, 0.1, 0.0], [0.5, 0.5, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    n_choices = np.array([3, 2, 4])
    out = apply_temperature(probs, 1.0, n_choices)
    np.testing.assert_allclose(out, probs, atol=1e-12)
    hot = apply_temperature(probs, 1e6, n_choices)  # T -> inf: uniform over the item's choices
    np.testing.assert_allclose(hot[0], [1 / 3, 1 / 3, 1 / 3, 0.0], atol=1e-5)
    np.testing.assert_allclose(hot[1], [0.5, 0.5, 0.0, 0.0], atol=1e-12)
    # hand-checked: T = 2 takes square roots, then renormalises
    half = apply_temperature(np.array([[0.64, 0.36]]), 2.0)
    np.testing.assert_allclose(half, [[0.8 / 1.4, 0.6 / 1.4]], atol=1e-12)
    with pytest.raises(ValueError):
        apply_temperature(probs, 0.0, n_choices)


@pytest.mark.parametrize("true_t", [0.5, 2.0])
def test_fit_temperature_recovers_a_known_temperature(true_t):
    rng = np.random.default_rng(0)
    n, c = 20000, 4
    logits = rng.normal(0.0, 2.0, (n, c))
    # labels drawn from softmax(z / T*): the model's softmax(z) is miscalibrated by exactly T*
    truth = _softmax(logits / true_t)
    labels = (rng.random(n)[:, None] > truth.cumsum(1)).sum(1)
    t = fit_temperature(_softmax(logits), labels)
    assert t == pytest.approx(true_t, rel=0.06)
    # the fitted T lowers the NLL compared with T = 1
    p1 = _softmax(logits)
    pt = apply_temperature(p1, t)
    rows = np.arange(n)
    assert -np.log(pt[rows, labels]).mean() < -np.log(p1[rows, labels]).mean()


def test_fit_temperature_already_calibrated_stays_near_one():
    rng = np.random.default_rng(1)
    logits = rng.normal(0.0, 1.5, (20000, 3))
    probs = _softmax(logits)
    labels = (rng.random(len(probs))[:, None] > probs.cumsum(1)).sum(1)
    assert fit_temperature(probs, labels) == pytest.approx(1.0, abs=0.06)
    with pytest.raises(ValueError, match="valid choice"):
        fit_temperature(np.array([[1.0, 0.0]]), np.array([1]), n_choices=np.array([1]))


def test_aggregate_mean_std_and_missing():
    a = aggregate([0.2, 0.4, None])
    assert a["mean"] == pytest.approx(0.3) and a["std"] == pytest.approx(np.std([0.2, 0.4], ddof=1))
    assert a["n"] == 2 and a["values"] == [0.2, 0.4, None]
    assert aggregate([0.5])["std"] is None
    assert aggregate([None])["mean"] is None


def test_config_is_validated(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        ReportConfig(ivon_config=tmp_path / "x.yaml", adamw_config=tmp_path / "y.yaml")
    (tmp_path / "x.yaml").write_text("optimizer: ivon\n")
    with pytest.raises(ValueError, match="main_samples"):
        ReportConfig(
            ivon_config=tmp_path / "x.yaml", adamw_config=tmp_path / "x.yaml", samples=(1, 4)
        )
    with pytest.raises(ValueError, match="distinct"):
        ReportConfig(
            ivon_config=tmp_path / "x.yaml", adamw_config=tmp_path / "x.yaml", seeds=(1, 1)
        )
    with pytest.raises(ValueError, match="large_samples"):  # must lie above the main draw's K
        ReportConfig(
            ivon_config=tmp_path / "x.yaml",
            adamw_config=tmp_path / "x.yaml",
            samples=(1, 4, 8),
            large_samples=(8, 16),
        )


def _no_nan(name: str):
    raise AssertionError(f"results.json holds {name}: not strict JSON")


def _run_report(work: Path, base: Path, data: Path, *extra: str) -> None:
    """`quaver report` through the CLI on a tiny pipeline: two seeds of one-epoch IVON and AdamW
    runs, an ensemble of two, with their configs written into `work`."""
    from training.cli import main

    common = {
        "base_dir": "unused",  # replaced by --base below
        "data_dir": "unused",
        "epochs": 1,
        "batch_size": 8,
        "seed": 0,
        "lora": {"rank": 4, "alpha": 8, "top_layers": 1},
    }
    ivon = {
        **common,
        "optimizer": "ivon",
        "out_dir": str(work / "runs" / "ivon"),
        "ivon": {"lr": 0.1, "ess": 2000.0, "hess_init": 0.1, "clip_radius": float("inf")},
    }
    adamw = {
        **common,
        "optimizer": "adamw",
        "out_dir": str(work / "runs" / "adamw"),
        "adamw": {"lr": 0.003},
    }
    (work / "ivon.yaml").write_text(yaml.safe_dump(ivon))
    (work / "adamw.yaml").write_text(yaml.safe_dump(adamw))
    argv = [
        "report",
        "--ivon-config",
        str(work / "ivon.yaml"),
        "--adamw-config",
        str(work / "adamw.yaml"),
        "--seeds",
        "0,1",
        "--work",
        str(work),
        "--out",
        str(work / "docs"),
        "--base",
        str(base),
        "--data",
        str(data),
        "--ensemble-size",
        "2",
        "--n-boot",
        "50",
        "--write-decision",
        *extra,
    ]
    assert main(argv) == 0


@pytest.fixture(scope="module")
def report(toy_bench, toy_base, tmp_path_factory):
    """`quaver report` on the toy benchmark (no test_real, no control items)."""
    work = tmp_path_factory.mktemp("report")
    _run_report(work, toy_base, toy_bench)
    return work, toy_base, toy_bench


@pytest.fixture(scope="module")
def real_report(tmp_path_factory):
    """`quaver report` on a toy real-recording mix (fixture packages): control items in every
    split and a `test_real` split, with a tiny base trained on its `pretrain`."""
    from training.data.generate import BenchmarkConfig
    from training.stages.pretrain import pretrain

    work = tmp_path_factory.mktemp("real-report")
    cfg = BenchmarkConfig(
        seed=2,
        pretrain=48,
        train=24,
        calib=24,
        test=24,
        test_shift=16,
        test_real=32,
        control_fraction=0.15,
        real_sources=True,
        real_packages=FIXTURE_PACKAGES,
        sources_root=str(write_real_fixture_root(work / "root")),
    )
    data = work / "bench"
    fixture_benchmark(cfg, fixture_library(cfg, work / "library"), data)
    base = pretrain(toy_pretrain_config(data, work / "base"), progress=False)
    large = ("--large-ks", "16,32", "--large-splits", "test,test_real")
    _run_report(work, base, data, "--ks", "1,4,8", *large)
    return work


def test_report_files_cover_every_predictor_and_split(report):
    work = report[0]
    docs = work / "docs"
    res = json.loads((docs / "results.json").read_text(), parse_constant=_no_nan)  # strict JSON
    md = (docs / "results.md").read_text()
    cfg = ReportConfig(
        ivon_config=work / "ivon.yaml", adamw_config=work / "adamw.yaml", ensemble_size=2
    )
    names = predictor_names(cfg)
    assert names[0] == "IVON mean" and "IVON BMA K=32" in names and "AdamW + TS" in names
    assert "IVON BMA + TS" in names and names[-1] == "AdamW ensemble (2)"
    assert res["splits"] == ["test", "test_shift"]  # the toy benchmark has no test_real
    assert res["benchmark"]["real_sources"] is False and "synthetic signals only" in md
    assert (
        res["command"].startswith("quaver report --ivon-config") and "--seeds 0,1" in res["command"]
    )
    assert res["command"] in md and "CPUs" in md
    for split in ("test", "test_shift"):
        assert set(res["aggregate"][split]) == set(names)
        for name in names:
            acc = res["aggregate"][split][name]["accuracy"]
            per = [res["per_seed"][s][split]["metrics"][name]["overall"]["accuracy"] for s in "01"]
            assert acc["n"] == 2 and acc["values"] == per
            assert acc["mean"] == pytest.approx(np.mean(per))
            assert acc["std"] == pytest.approx(np.std(per, ddof=1))
            assert len(res["per_seed"]["1"][split]["metrics"][name]["by_family"]) >= 1
        assert f"### {split}" in md
    for name in names:
        assert f"| {name} |" in md
    # seed 0 reuses the config's out_dir; other seeds get <out_dir>-s<seed>
    assert res["runs"]["ivon"]["0"] == str(work / "runs" / "ivon" / "posterior")
    assert res["runs"]["adamw"]["1"] == str(work / "runs" / "adamw-s1" / "posterior")
    assert any((work / "prefix-cache").iterdir())
    # the runs' own training time, summed from each posterior (not this invocation's wall time)
    trained = [
        json.loads((Path(p) / "quaver.json").read_text())["train_seconds"]
        for by_seed in res["runs"].values()
        for p in by_seed.values()
    ]
    assert len(trained) == 2 + 2 + 2  # IVON, AdamW, and one extra ensemble member per seed
    assert res["times_s"]["finetune_runs_s"] == pytest.approx(sum(trained), abs=0.1)
    assert all(t > 0 for t in trained)
    # the ensemble's extra AdamW runs (seed + 100) are ordinary resumable runs
    assert res["runs"]["adamw"]["101"] == str(work / "runs" / "adamw-s101" / "posterior")
    # goals are computed, one line each, PASS / FAIL (n/a: no test_real, no control items)
    assert len(res["goals"]) == 4 * 2 + 4 + 2
    assert all(g["pass"] in (True, False, None) for g in res["goals"])
    verdicts = md.count("**PASS**") + md.count("**FAIL**") + md.count("**n/a**")
    assert verdicts == len(res["goals"])
    # the served choice of each seed is written into its IVON posterior for the server
    for s in ("0", "1"):
        meta = json.loads((Path(res["runs"]["ivon"][s]) / "quaver.json").read_text())
        d = Decision.from_meta(meta)
        assert d.score == res["decision"][s]["score"]
        want = res["thresholds"]["per_seed"][s]["served"]["calibration"]
        assert d.calibration == want
    # thresholds: one row per target, realised numbers consistent with the rule
    rows = res["thresholds"]["summary"]["IVON BMA K=8 | maxprob"]
    assert [r["max_risk"] for r in rows] == [0.01, 0.02, 0.05, 0.1, 0.2]
    per_seed = [res["thresholds"]["per_seed"][s]["IVON BMA K=8 | maxprob"] for s in "01"]
    for i, r in enumerate(rows):
        realised = [p["test"][i] for p in per_seed]
        held = sum(x["risk"] is None or x["risk"] <= r["max_risk"] for x in realised)
        assert r["held_test"] == held and r["seeds"] == 2
        cov, abst = r["coverage_test"]["mean"], r["abstain_test"]["mean"]
        assert cov + abst == pytest.approx(1.0)
    # how far each run moved: IVON's Hessian from its log, every run's update from its weights
    shape = res["posterior_shape"]
    assert set(shape) == {"ivon", "adamw"} and set(shape["adamw"]) == {"0", "1", "100", "101"}
    ivon0 = shape["ivon"]["0"]
    log = [json.loads(x) for x in (work / "runs" / "ivon" / "log.jsonl").read_text().splitlines()]
    assert ivon0["hessian"]["h_median"] == log[-1]["hessian"]["h_median"]
    assert shape["adamw"]["0"]["hessian"] is None
    post = load_posterior(res["runs"]["adamw"]["0"])
    assert shape["adamw"]["0"]["update"] == update_size(post, None)  # no init_from: from zero
    assert shape["adamw"]["0"]["update"]["dw_fro"] > 0
    assert "## How far each run moved" in md and "| ivon | 1 |" in md
    for png in res["plots"]:
        assert (docs / png).read_bytes().startswith(b"\x89PNG") and png in md
    assert {"results/reliability_test.png", "results/shift.png"} <= set(res["plots"])


def test_report_numbers_equal_recomputed_metrics(report):
    work, base, data = report
    res = json.loads((work / "docs" / "results.json").read_text())
    for seed in (0, 1):
        post = res["runs"]["ivon"][str(seed)]
        preds = predict_split(
            base,
            post,
            data,
            "test",
            samples=32,
            seed=seed,
            progress=False,
            prefix_cache=work / "prefix-cache",
        )  # cached: the report's own arrays
        want = summarize(
            preds.bma(4),
            preds.labels,
            preds.families,
            n_choices=preds.n_choices,
            sample_probs=preds.sample_probs[:, :4],
            risks=RISKS,
            coverages=COVERAGES,
            risk_lambda=res["per_seed"][str(seed)]["risk_lambda"]["IVON BMA K=4"],
        )
        assert res["per_seed"][str(seed)]["test"]["metrics"]["IVON BMA K=4"] == want
    # AdamW + TS: the stored temperature applied to the AdamW probabilities of seed 1
    post = res["runs"]["adamw"]["1"]
    shift = predict_split(base, post, data, "test_shift", samples=1, seed=1, progress=False)
    calib = predict_split(base, post, data, "calib", samples=1, seed=1, progress=False)
    t = fit_temperature(calib.mean_probs, calib.labels, calib.n_choices)
    assert res["temperature"]["1"] == pytest.approx(t)
    scaled = apply_temperature(shift.mean_probs, t, shift.n_choices)
    want = summarize(scaled, shift.labels, shift.families, n_choices=shift.n_choices)
    got = res["per_seed"]["1"]["test_shift"]["metrics"]["AdamW + TS"]
    assert got["overall"]["nll"] == pytest.approx(want["overall"]["nll"])
    assert got["overall"]["ece"] == pytest.approx(want["overall"]["ece"])
    # each seed is its own fine-tuning: the AdamW runs differ between seeds
    nll = [res["per_seed"][s]["test"]["metrics"]["AdamW"]["overall"]["nll"] for s in ("0", "1")]
    assert nll[0] != nll[1]
    # the aggregate is the mean over the per-seed numbers
    per = [res["per_seed"][s]["test"]["metrics"]["AdamW"]["overall"]["ece"] for s in ("0", "1")]
    assert res["aggregate"]["test"]["AdamW"]["ece"]["mean"] == pytest.approx(np.mean(per))


def test_report_on_real_mix_covers_test_real_and_controls(real_report):
    docs = real_report / "docs"
    res = json.loads((docs / "results.json").read_text(), parse_constant=_no_nan)
    md = (docs / "results.md").read_text()
    assert res["splits"] == ["test", "test_shift", "test_real"]
    assert res["benchmark"]["real_sources"] and "openttd-opensfx" in res["benchmark"]["packages"]
    assert "real recordings from" in md and res["benchmark"]["fingerprint"][:16] in md
    # every split's control items are counted, and told apart from answerable ones per score
    assert all(res["controls"][sp] > 0 for sp in ("test", "test_shift", "test_real"))
    ctl = res["aggregate_scores"]["controls"]
    for name in ("served", "AdamW + TS | maxprob", "IVON BMA K=8 | mutual_information"):
        auroc = ctl[name]["auroc_control"]
        assert auroc["n"] == 2 and 0.0 <= auroc["mean"] <= 1.0
    # the goals on test_real and the controls are checked, not n/a
    checked = {(g["split"], g["goal"][:12]) for g in res["goals"] if g["pass"] is not None}
    assert ("test_real", "served IVON ") in checked and ("controls", "served IVON ") in checked
    assert "### test_real" in md and "controls (the control items of every split)" in md
    hist = [p for p in res["plots"] if p.startswith("results/controls_")]
    assert hist and all((docs / p).read_bytes().startswith(b"\x89PNG") for p in hist)
    # the control probe, fitted on pretrain's controls, gates every predictor's answerable score
    probe = res["control_probe"]
    assert probe["fitted"] and probe["fitted_on"] == "pretrain" and probe["n_control"] > 0
    assert {"AdamW + TS | answerable", "IVON BMA + TS | answerable"} <= set(ctl)
    assert "answerable = max probability x (1 - P(control))" in md
    # only the served score decides the abstention of the written posteriors, which carry the
    # probe the server loads
    for s in ("0", "1"):
        post = Path(res["runs"]["ivon"][s])
        meta = json.loads((post / "quaver.json").read_text())
        assert Decision.from_meta(meta).score == res["decision"][s]["score"]
        assert (post / meta["control_probe"]["file"]).exists()
        assert meta["control_probe"]["layer"] == probe["layer"]
    # the stored probe, read back as the served-rule replay reads it, gives the report's AUROC
    from training.eval.control_probe import posterior_p_control
    from training.eval.metrics import control_auroc

    post = Path(res["runs"]["ivon"]["0"])
    base = Path(json.loads((post / "quaver.json").read_text())["base"]["path"])
    got = posterior_p_control(base, post, real_report / "bench", ("test_real",))["test_real"]
    z = np.load(next((post / "predictions").glob("test_real-K*-s0-*.npz")))
    assert got.shape == z["labels"].shape and ((got >= 0) & (got <= 1)).all()
    control = z["families"] == "control"
    want = probe["auroc_control"]["test_real"]
    assert control_auroc(1.0 - got, control) == pytest.approx(want, abs=1e-6)


def test_large_k_drawn_on_named_splits_only(real_report):
    """--large-ks 16,32 on test and test_real: one K=32 draw per seed and split, each row the
    first K samples of it, checked against the cached draw by hand."""
    from training.eval.metrics import summarize

    docs = real_report / "docs"
    res = json.loads((docs / "results.json").read_text(), parse_constant=_no_nan)
    md = (docs / "results.md").read_text()
    assert res["settings"]["large_samples"] == [16, 32]
    assert set(res["large_k"]) == {"test", "test_real"}  # not test_shift
    assert set(res["large_k"]["test"]) == {"IVON BMA K=8", "IVON BMA K=16", "IVON BMA K=32"}
    assert "IVON BMA K=32" not in res["predictors"]  # not a row of the main tables
    assert "--large-ks 16,32 --large-splits test,test_real" in res["command"]
    assert "## IVON BMA at larger K" in md
    post = Path(res["runs"]["ivon"]["0"])
    (cached,) = (post / "predictions").glob("test-K32-s0-*.npz")
    z = np.load(cached)
    assert z["sample_probs"].shape[1] == 32
    for k in (8, 16, 32):
        want = summarize(
            z["sample_probs"][:, :k].mean(1),
            z["labels"],
            n_choices=z["n_choices"],
            sample_probs=z["sample_probs"][:, :k],
            risks=(0.05, 0.1, 0.2),
        )["overall"]
        row = res["large_k"]["test"][f"IVON BMA K={k}"]
        for m in ("accuracy", "ece", "nll", "coverage_at_risk_0.1"):
            assert row[m]["values"][0] == pytest.approx(want[m], abs=1e-9), (k, m)
        assert row["accuracy"]["n"] == 2
    assert (docs / "results/metrics_vs_k_test.png").read_bytes().startswith(b"\x89PNG")
