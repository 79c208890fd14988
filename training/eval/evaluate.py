"""`quaver evaluate` and `quaver calibrate`: quality of a posterior on a split, and its thresholds.

    quaver evaluate --base artifacts/tiny-base --posterior runs/tiny-ivon/posterior \
        --data data/bench --split test --samples 8 --out reports/tiny-ivon-test
    quaver calibrate --base artifacts/tiny-base --posterior runs/tiny-ivon/posterior \
        --data data/bench --split calib --samples 8

    run = PredictionRun(base_dir, posterior_dir, data_dir, samples=8)   # from Python
    calibrate_posterior(run, "calib"); evaluate_posterior(run, "test", out_dir=reports)

`evaluate` scores the posterior mean (K=1) and Bayesian model averaging over K samples: accuracy,
ECE/MCE (15 bins), NLL, Brier, AUROC, AURC, coverage at 1/5/10% risk, risk at 50/80% coverage,
overall and per family; writes metrics.json and PNG plots (reliability, risk-coverage,
confidence histogram). `calibrate` picks guaranteed-risk thresholds (SGR, Clopper-Pearson,
confidence 1 - delta) on a calibration split for the confidence the server will use (K samples)
and stores the table in the posterior's quaver.json, where the server reads it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from app.posterior import META_FILE
from training.eval.metrics import confidence, correctness, summarize
from training.eval.predictions import PredictionRun, SplitPredictions
from training.eval.selective import calibrate_table, table_to_json

TARGETS = (0.01, 0.02, 0.05, 0.1, 0.2)


def predictor_probs(preds: SplitPredictions, samples: int) -> np.ndarray:
    """The probabilities the server returns for `samples` (1 = posterior mean)."""
    return preds.mean_probs if samples <= 1 else preds.bma(samples)


def evaluate_posterior(run: PredictionRun, split: str, out_dir: Path | None = None) -> dict:
    """Metrics of the posterior mean and of K-sample BMA (K = run.samples) on `split`, plus
    plots when `out_dir` is given."""
    samples = run.samples
    preds = run.predict(split)  # cached on disk: evaluate and calibrate share one prediction run
    results = {
        "split": split,
        "n": len(preds.labels),
        "mean": summarize(
            preds.mean_probs, preds.labels, preds.families, n_choices=preds.n_choices
        ),
    }
    if samples > 1:
        results[f"bma_k{samples}"] = summarize(
            preds.bma(samples),
            preds.labels,
            preds.families,
            n_choices=preds.n_choices,
            sample_probs=preds.sample_probs,
        )
    if out_dir is not None:
        from training.eval import plots

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        scores = {}
        for name, probs in (
            ("posterior mean", preds.mean_probs),
            (f"BMA K={samples}", preds.bma(samples) if samples > 1 else None),
        ):
            if probs is None:
                continue
            scores[name] = (confidence(probs), correctness(probs, preds.labels, preds.n_choices))
        plots.reliability_diagram(scores, out / "reliability.png")
        plots.risk_coverage_plot(scores, out / "risk_coverage.png")
        conf, corr = list(scores.values())[-1]
        plots.confidence_histogram(conf, corr, out / "confidence_hist.png")
        (out / "metrics.json").write_text(json.dumps(results, indent=2))
    return results


def calibrate_posterior(
    run: PredictionRun,
    split: str = "calib",
    delta: float = 0.05,
    targets: tuple[float, ...] = TARGETS,
    method: str = "sgr",
) -> dict:
    """Guaranteed-risk thresholds on `split` for the confidence of `run.samples` samples,
    written into the posterior's quaver.json (the table records the dtype when not float32)."""
    if split == "test":
        raise ValueError("calibrate on a held-out calibration split, never on test")
    samples, dtype = run.samples, run.dtype
    preds = run.predict(split)  # cached on disk: evaluate and calibrate share one prediction run
    probs = predictor_probs(preds, samples)
    conf = confidence(probs)
    correct = correctness(probs, preds.labels, preds.n_choices)
    table = table_to_json(
        calibrate_table(conf, correct, targets=targets, delta=delta, method=method)
    )
    table.update({"split": split, "samples": samples, "score": "max BMA probability"})
    if dtype != "float32":
        table["dtype"] = dtype  # served in another dtype, the thresholds are approximate
    meta_path = run.posterior_dir / META_FILE
    meta = json.loads(meta_path.read_text())
    meta["calibration"] = table
    tmp = meta_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(meta_path)
    return table


def format_table(results: dict) -> str:
    """A plain-text table of the headline metrics per predictor."""
    cols = ("accuracy", "ece", "nll", "brier", "auroc", "aurc", "coverage_at_risk_0.05")
    if any(
        isinstance(r, dict) and "auroc_control" in r.get("overall", {}) for r in results.values()
    ):
        cols += ("auroc_control",)  # the split holds control items
    lines = ["predictor      " + " ".join(f"{c[:12]:>12}" for c in cols)]
    for name, res in results.items():
        if not isinstance(res, dict) or "overall" not in res:
            continue
        row = res["overall"]
        vals = " ".join(
            f"{row.get(c) if row.get(c) is None else round(row.get(c), 4):>12}" for c in cols
        )
        lines.append(f"{name:<14} {vals}")
    return "\n".join(lines)
