"""The tiny pipeline's report: per-family table against chance, verdict, and its figures."""

import json
from pathlib import Path

from training.recipes.tiny import families_above_chance, write_pipeline_report

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _summary():
    fam = {
        "count": {"n": 45, "accuracy": 0.8, "chance": 0.25, "p_above_chance": 1e-12},
        "order": {"n": 45, "accuracy": 0.5, "chance": 0.48, "p_above_chance": 0.4},
    }
    overall = {"accuracy": 0.65, "chance": 0.37, "ece": 0.05, "nll": 0.8}
    return {
        "machine": "x86_64, 2 CPU threads",
        "times_s": {"data_s": 30.0, "pretrain_s": 400.0, "total_s": 430.0},
        "test": {"IVON mean": overall, "AdamW": overall},
        "by_family": {"IVON mean": fam, "AdamW": fam},
        "stage1_curve": [
            {"step": 188, "calib_acc": 0.4, "calib_acc_by_family": {"count": 0.3, "order": 0.5}},
            {"step": 376, "calib_acc": 0.6, "calib_acc_by_family": {"count": 0.7, "order": 0.5}},
        ],
    }


def test_report_names_the_families_at_chance(tmp_path):
    summary = _summary()
    assert families_above_chance(summary, "IVON mean") == (["count"], ["order"])
    path = write_pipeline_report(summary, tmp_path / "pipeline.md")
    text = path.read_text()
    assert "| count | 45 | 0.25 | 0.80 | 0.80 | 1e-12 |" in text
    assert "above chance (p < 0.01) on 1 of 2 families; not on order." in text
    assert "| total | 430 |" in text
    for png in ("family_accuracy.png", "stage1_curves.png"):
        assert (tmp_path / png).stat().st_size > 5000
        assert f"]({png})" in text


def test_pipeline_runs_end_to_end_at_toy_size(tmp_path):
    """`quaver pipeline`'s function with the shipped configs, at toy sizes: every step runs and
    the summary and report carry the per-family table of all three predictors."""
    from training.recipes.tiny import run_pipeline

    sizes = {"pretrain": 36, "train": 18, "calib": 18, "test": 18, "test_shift": 9}
    summary = run_pipeline(
        tmp_path,
        CONFIGS,
        seed=5,
        samples=2,
        split_sizes=sizes,
        overrides={
            "pretrain": {"epochs": 1, "vocab_size": 600},
            "ivon": {"epochs": 1},
            "adamw": {"epochs": 1},
        },
    )
    assert set(summary["times_s"]) == {
        "data_s",
        "pretrain_s",
        "ivon_s",
        "adamw_s",
        "evaluate_s",
        "total_s",
    }
    assert list(summary["by_family"]) == ["IVON mean", "IVON BMA K=2", "AdamW"]
    fams = summary["by_family"]["IVON mean"]
    assert sum(m["n"] for m in fams.values()) == sizes["test"]
    assert len(fams) == 9  # families rotate by index: 18 items cover all nine
    assert summary["stage1_curve"][0]["calib_acc_by_family"]
    saved = json.loads((tmp_path / "pipeline.json").read_text())
    assert saved["test"]["AdamW"]["accuracy"] == summary["test"]["AdamW"]["accuracy"]
    assert "| timing |" in (tmp_path / "pipeline.md").read_text()
    assert (tmp_path / "runs" / "tiny-ivon" / "posterior" / "posterior.safetensors").exists()
