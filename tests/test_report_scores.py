"""The report's numbers on synthetic predictions (no training): the new predictors (IVON BMA + TS,
the AdamW ensemble), the scores and their calib-chosen lambda, control AUROC, the served choice,
bootstrap differences, goals and the markdown, and writing the decision into a quaver.json."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from app.scores import Decision
from training.eval.decision import choose_lambda, choose_power, choose_served, write_decision
from training.eval.metrics import aurc, auroc, mutual_information
from training.eval.predictions import SplitPredictions
from training.eval.temperature import apply_temperature, fit_temperature
from training.recipes.report import ReportConfig
from training.recipes.report_goals import goal_checks
from training.recipes.report_render import render_markdown
from training.recipes.report_scores import (
    BMA_TS,
    CONTROLS,
    bootstrap_differences,
    key,
    predictor_names,
    score_seeds,
    summarize_seeds,
)

SPLITS = ("test", "test_shift", "test_real")


def _probs(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def _split(rng, n: int, k: int, noise: float, control_share: float = 0.2) -> dict:
    """Items with 3 choices; control items carry no signal, so their samples disagree."""
    labels = rng.integers(0, 3, n)
    families = np.where(rng.random(n) < control_share, "control", "count")
    signal = np.where(families == "control", 0.0, 2.5)[:, None]
    base = rng.normal(0, 1, (n, 3)) + signal * np.eye(3)[labels]
    spread = np.where(families == "control", 2.0, 0.3)[:, None, None]
    z = base[:, None, :] + spread * rng.normal(0, noise, (n, k, 3))
    return {"labels": labels, "families": families, "z": z}


def _preds(d: dict, scale: float, k: int, rng) -> SplitPredictions:
    z = d["z"][:, :k] * scale
    samples = _probs(z + rng.normal(0, 0.05, z.shape))
    n = len(d["labels"])
    return SplitPredictions(
        _probs(z.mean(1)), samples, d["labels"], np.full(n, 3), d["families"].astype(str)
    )


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rs")
    (tmp / "x.yaml").write_text("optimizer: ivon\n")
    cfg = ReportConfig(
        ivon_config=tmp / "x.yaml",
        adamw_config=tmp / "x.yaml",
        seeds=(0, 1),
        samples=(1, 4, 8),
        ensemble_size=3,
        n_boot=60,
        out=tmp / "docs",
    )
    rng = np.random.default_rng(0)
    preds = {}
    for seed in cfg.seeds:
        for sp in ("calib", *SPLITS):
            d = _split(rng, 120, 8, 1.0)
            preds[("ivon", seed, sp)] = _preds(d, 1.0, 8, rng)
            for m in (seed, seed + 100, seed + 200):  # AdamW: overconfident (x2), no samples
                preds[("adamw", m, sp)] = _preds(d, 2.0 + 0.1 * (m // 100), 1, rng)
    per_seed, temps, thr, pooled = score_seeds(cfg, preds, SPLITS)
    summary = summarize_seeds(cfg, per_seed, thr, SPLITS)
    return cfg, preds, per_seed, temps, thr, pooled, summary


def test_new_predictors_are_what_they_say(synthetic):
    cfg, preds, per_seed, temps, *_ = synthetic
    names = predictor_names(cfg)
    assert BMA_TS in names and names[-1] == "AdamW ensemble (3)"
    for seed in ("0", "1"):
        cal = preds[("ivon", int(seed), "calib")]
        t = fit_temperature(cal.bma(8), cal.labels, cal.n_choices)
        assert per_seed[seed]["temperature"][BMA_TS] == pytest.approx(t)
        test = preds[("ivon", int(seed), "test")]
        scaled = apply_temperature(test.bma(8), t, test.n_choices)
        nll = -np.log(scaled[np.arange(len(test.labels)), test.labels]).mean()
        assert per_seed[seed]["test"]["metrics"][BMA_TS]["overall"]["nll"] == pytest.approx(nll)
    # the ensemble: mean of its members' probabilities; its members are its samples
    seed = 1
    members = [preds[("adamw", m, "test")].mean_probs for m in (1, 101, 201)]
    mean = np.mean(members, axis=0)
    labels = preds[("ivon", seed, "test")].labels
    got = per_seed["1"]["test"]["metrics"]["AdamW ensemble (3)"]["overall"]
    assert got["nll"] == pytest.approx(-np.log(mean[np.arange(len(labels)), labels]).mean())
    mi = mutual_information(np.stack(members, axis=1))
    correct = mean.argmax(-1) == labels
    got = per_seed["1"]["test"]["scores"][key("AdamW ensemble (3)", "mutual_information")]
    assert got["auroc"] == pytest.approx(auroc(-mi, correct))
    assert temps["0"] > 1.0  # AdamW made overconfident: T softens


def test_lambda_is_chosen_on_calib_and_controls_are_scored(synthetic):
    cfg, preds, per_seed, *_ = synthetic
    cal = preds[("ivon", 0, "calib")]
    s = cal.sample_probs[:, :8]
    lam, by = choose_lambda(s, cal.bma(8).argmax(-1) == cal.labels, cfg.risk_lambdas)
    assert per_seed["0"]["risk_lambda"]["IVON BMA K=8"] == lam
    assert by[f"{lam:g}"] == min(by.values()) and set(by) == {f"{x:g}" for x in cfg.risk_lambdas}
    # control AUROC: answerable items against control items, higher score = answerable
    test = preds[("ivon", 0, "test")]
    mi = mutual_information(test.sample_probs)
    want = auroc(-mi, test.families != "control")
    got = per_seed["0"]["test"]["scores"][key("IVON BMA K=8", "mutual_information")]
    assert got["auroc_control"] == pytest.approx(want) and want > 0.8  # controls disagree
    assert got["n_control"] == int((test.families == "control").sum())
    pooled = per_seed["0"][CONTROLS][key("IVON BMA K=8", "mutual_information")]
    assert pooled["n"] == 3 * 120


def test_served_choice_thresholds_and_bootstrap(synthetic):
    cfg, _, per_seed, _, thr, pooled, summary = synthetic
    for seed in ("0", "1"):
        d = per_seed[seed]["decision"]
        best = min(c["aurc"] for c in d["candidates"])
        assert d["aurc"] == best and d["chosen_on"] == "calib"
        assert thr[seed]["served"] is thr[seed][d["key"]]
    boot = bootstrap_differences(cfg, pooled)
    assert set(boot) == {*SPLITS, CONTROLS}
    pair = f"served - {key('AdamW + TS', 'maxprob')}"
    d = boot["test_shift"][pair]["aurc"]
    assert d["low"] <= d["diff"] <= d["high"] and d["n_boot"] == 60
    # the pooled arrays are the two seeds' items, in order: the point difference is exact
    conf_a, ok_a = pooled["test_shift"]["served"][:2]
    conf_b, ok_b = pooled["test_shift"][key("AdamW + TS", "maxprob")][:2]
    assert len(conf_a) == 240
    assert d["diff"] == pytest.approx(aurc(conf_a, ok_a) - aurc(conf_b, ok_b))
    results = {
        "splits": list(SPLITS),
        "aggregate": summary["aggregate"],
        "aggregate_scores": summary["aggregate_scores"],
        "thresholds": {"summary": summary["thresholds"]},
        "bootstrap": boot,
    }
    goals = goal_checks(results, "IVON BMA K=8")
    assert any(
        g["goal"].startswith("served IVON AURC") and g["split"] == "test_real" for g in goals
    )
    assert any(g["split"] == CONTROLS and g["pass"] in (True, False) for g in goals)
    served = [g for g in goals if g["split"] == "test_shift" and g["goal"].startswith("served")]
    assert re.search(r"AURC diff -?\d+\.\d%", served[0]["detail"])  # intervals in percent
    assert served[0]["pass"] == (
        d["high"] < 0 and boot["test_shift"][pair]["coverage_at_risk_0.1"]["low"] > 0
    )


def test_markdown_has_every_section(synthetic):
    cfg, _, per_seed, temps, thr, pooled, summary = synthetic
    boot = bootstrap_differences(cfg, pooled)
    results = {
        "command": "quaver report",
        "date": "today",
        "machine": {
            "platform": "p",
            "processor": "x",
            "cpus": 2,
            "device": "cpu",
            "python": "3",
            "torch": "2",
        },
        "settings": {
            "seeds": [0, 1],
            "main_predictor": "IVON BMA K=8",
            "delta": 0.05,
            "risk_lambdas": list(cfg.risk_lambdas),
            "n_boot": 60,
            "bootstrap": "paired percentile, 95%, items pooled over seeds",
        },
        "splits": list(SPLITS),
        "items": {"calib": 120, **{sp: 120 for sp in SPLITS}},
        "controls": {sp: 20 for sp in ("calib", *SPLITS)},
        "n_choices": [3],
        "times_s": {"total_s": 1, "finetune_s": 0, "predict_s": 0},
        "predictors": predictor_names(cfg),
        "aggregate": summary["aggregate"],
        "aggregate_scores": summary["aggregate_scores"],
        "by_family_accuracy": summary["by_family_accuracy"],
        "thresholds": {"summary": summary["thresholds"], "per_seed": thr},
        "decision": {s: per_seed[s]["decision"] for s in per_seed},
        "bootstrap": boot,
        "temperature": temps,
        "per_seed": per_seed,
        "plots": [],
        "runs": {},
    }
    results["goals"] = goal_checks(results, "IVON BMA K=8")
    md = render_markdown(results)
    for title in (
        "## Served choice",
        "## Differences with paired bootstrap intervals",
        "### test_real",
        "### controls",
        "| AdamW ensemble (3) |",
        "risk_averse",
    ):
        assert title in md, title
    verdicts = md.count("**PASS**") + md.count("**FAIL**") + md.count("**n/a**")
    assert verdicts == len(results["goals"])


def test_choose_served_ties_go_to_lower_nll():
    cands = [
        {"predictor": "a", "score": "maxprob", "aurc": 0.1, "nll": 0.5},
        {"predictor": "b", "score": "maxprob", "aurc": 0.1, "nll": 0.4},
        {"predictor": "c", "score": "risk_averse", "aurc": 0.2, "nll": 0.1},
    ]
    assert choose_served(cands)["predictor"] == "b"
    cands[2]["aurc"] = 0.05
    assert choose_served(cands)["predictor"] == "c"


def test_write_decision_round_trips_through_the_server_reader(tmp_path):
    (tmp_path / "quaver.json").write_text(json.dumps({"name": "p", "calibration": {"x": 1}}))
    table = {"targets": [{"max_risk": 0.1, "threshold": 0.42, "feasible": True}]}
    chosen = {"predictor": BMA_TS, "score": "maxprob", "temperature": 1.7, "risk_lambda": 0.0}
    write_decision(tmp_path, chosen, table)
    meta = json.loads((tmp_path / "quaver.json").read_text())
    assert meta["calibration"] == {"x": 1} and meta["decision"]["chosen_on"] == "calib"
    d = Decision.from_meta(meta)
    assert (d.score, d.temperature, d.calibration) == ("maxprob", 1.7, table)
    with pytest.raises(ValueError):
        write_decision(tmp_path, {"score": "entropy"}, table)


def test_answerable_score_with_the_control_probe(synthetic):
    """With a P(control) per split, every predictor gets the answerable score; its power is the
    calib AURC minimiser (checked by hand), the served candidates include it, and the served
    choice is compared with AdamW + TS gated by the same probe."""
    cfg, preds, *_ = synthetic
    rng = np.random.default_rng(1)
    p_control = {}
    for sp in ("calib", *SPLITS):
        ctl = preds[("ivon", 0, sp)].families == "control"  # the same items for every seed
        p_control[sp] = np.clip(np.where(ctl, 0.7, 0.1) + rng.normal(0, 0.1, len(ctl)), 0, 1)
    per_seed, _, thr, pooled = score_seeds(cfg, preds, SPLITS, p_control)
    one = per_seed["0"]
    assert one["control_probe"] and set(one["control_power"]) == set(predictor_names(cfg))
    # the power of IVON BMA + TS by hand on calib
    cal = preds[("ivon", 0, "calib")]
    t = one["temperature"][BMA_TS]
    probs = apply_temperature(cal.bma(8), t, cal.n_choices)
    ok = probs.argmax(-1) == cal.labels
    power, by = choose_power(probs.max(-1), p_control["calib"], ok, cfg.control_powers)
    assert one["control_power"][BMA_TS] == power and by[f"{power:g}"] == min(by.values())
    # its control AUROC on test, by hand
    test = preds[("ivon", 0, "test")]
    tp = apply_temperature(test.bma(8), t, test.n_choices).max(-1)
    want = auroc(tp * (1 - p_control["test"]) ** power, test.families != "control")
    got = one["test"]["scores"][key(BMA_TS, "answerable")]
    assert got["auroc_control"] == pytest.approx(want) and want > 0.9
    assert key("AdamW + TS", "answerable") in one["test"]["scores"]
    cands = {(c["predictor"], c["score"]) for c in one["decision"]["candidates"]}
    assert {(BMA_TS, "answerable"), ("IVON BMA K=8", "answerable")} <= cands
    boot = bootstrap_differences(cfg, pooled, probe=True)
    assert f"served - {key('AdamW + TS', 'answerable')}" in boot["controls"]
    assert key(BMA_TS, "answerable") in thr["1"]
    summary = summarize_seeds(cfg, per_seed, thr, SPLITS)
    assert key("AdamW", "answerable") in summary["aggregate_scores"][CONTROLS]


def test_choose_power_by_hand():
    maxprob = np.array([0.9, 0.8, 0.7, 0.3])
    correct = np.array([False, True, True, True])
    # item 0 is wrong but confident; only its P(control) can rank it down
    p_control = np.array([0.5, 0.0, 0.0, 0.0])
    power, by = choose_power(maxprob, p_control, correct, (0.0, 1.0, 4.0))
    # 0.9 * 0.5 = 0.45 stays above 0.3; 0.9 * 0.5 ** 4 = 0.056 puts the wrong item last
    assert power == 4.0 and by["0"] > by["1"] > by["4"]
    with pytest.raises(ValueError, match="powers"):
        choose_power(maxprob, p_control, correct, (-1.0,))
