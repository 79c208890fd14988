"""Adaptive sampling: decide at the posterior mean, draw K samples only near the threshold.

    python bench/adaptive.py --model artifacts/base \
        --posterior work/default/runs/ivon/posterior --data work/default/data/bench

The engine (app/engine.py) answers an adaptive request with one pass at the posterior mean and
re-runs it with K samples only when the mean's confidence lies within `margin` of the abstain
threshold. This script measures, side by side in one run:
  agreement  over the whole split: the (answer, abstain) decision of the adaptive rule vs always
             drawing K samples, per margin and risk target (from the split's cached predictions,
             the same ones `quaver evaluate` computes);
  cost       on `--time-items` clips: median latency of the mean pass (t1, what the merged
             deterministic model costs: the mean is merged into the weights) and of the K-sample
             pass (tK), and of the redo given the first pass's prefix hidden states (what the
             engine runs: the audio tower and the layers below the LoRA layers are not run
             again); the adaptive average is (t1 + redo_rate * t_redo) / t1, and the full
             re-run's (t1 + redo_rate * tK) / t1 is printed beside it.
When the posterior stores a served "decision" (app.scores: `quaver report --write-decision`),
the decisions use its score and its threshold table, as the server does: the mean pass's score
from the posterior mean's probabilities, always-K's from the K samples, and for the
"answerable" score the control probe's P(control) of each item (the same in both passes, read off
the prefix states; `--prefix-cache` reuses the states evaluation cached). `--plain` keeps the
max-probability rule and the posterior's own table. The timed passes are the served ones.
Prints one JSON document (and writes it with --out).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from app.predict import Predictor, Request
from app.scores import score_values
from app.thresholds import threshold_for
from training.data.manifest import load_audio_file, read_manifest
from training.eval.control_probe import posterior_p_control
from training.eval.predictions import predict_split


def decisions(
    probs: np.ndarray, thr: float, conf: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(answer, abstain, confidence) per row of (n, C) probabilities (`conf`: the served score
    of each row; None: the max probability)."""
    conf = probs.max(-1) if conf is None else conf
    return probs.argmax(-1), conf < thr, conf


def agreement_table(
    mean: np.ndarray,
    bma: np.ndarray,
    thr: float,
    margins: list[float],
    conf_mean: np.ndarray | None = None,
    conf_k: np.ndarray | None = None,
) -> list:
    """Per margin: share of items redone with K samples and decision agreement with always-K
    (`conf_mean`, `conf_k`: the served score of the two passes; None: max probability)."""
    a_k, s_k, _ = decisions(bma, thr, conf_k)
    a_m, s_m, c_m = decisions(mean, thr, conf_mean)
    rows = []
    for margin in margins:
        redo = np.abs(c_m - thr) <= margin if math.isfinite(thr) else np.zeros(len(c_m), bool)
        ans = np.where(redo, a_k, a_m)
        abst = np.where(redo, s_k, s_m)
        rows.append(
            {
                "margin": margin,
                "redo_rate": float(redo.mean()),
                "decision_agreement": float(((ans == a_k) & (abst == s_k)).mean()),
                "abstain_agreement": float((abst == s_k).mean()),
            }
        )
    return rows


def time_passes(predictor: Predictor, clips: list, samples: int, repeats: int) -> dict:
    """Median seconds, interleaved per clip, of the mean pass (t1), the full K-sample pass (tK)
    and the engine's redo: the K-sample pass given the first pass's prefix hidden states
    (`redo`: only the LoRA layers run again)."""
    t1, tk, redo = [], [], []
    for prepared in clips:
        for _ in range(repeats):
            for k, store in ((1, t1), (samples, tk)):
                t = time.perf_counter()
                predictor.predict([Request(prepared, samples=k, seed=0)])
                store.append(time.perf_counter() - t)
            prefix = predictor.prefix([prepared])
            t = time.perf_counter()
            predictor.predict([Request(prepared, samples=samples, seed=0)], prefix)
            redo.append(time.perf_counter() - t)
    return {
        "t1_s": statistics.median(t1),
        f"t{samples}_s": statistics.median(tk),
        f"redo{samples}_s": statistics.median(redo),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="base checkpoint the posterior was trained on")
    ap.add_argument("--posterior", required=True)
    ap.add_argument("--data", required=True, help="benchmark directory")
    ap.add_argument("--split", default="test")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--margins", default="0,0.05,0.1,0.15,0.2,0.3")
    ap.add_argument("--risks", default="0.05,0.1,0.2")
    ap.add_argument("--fixed-thresholds", default="", help="e.g. 0.5,0.6 besides the risks")
    ap.add_argument("--time-items", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prefix-cache", default=None, help="cached prefix states (P(control))")
    ap.add_argument("--plain", action="store_true", help="max probability, not the decision")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    margins = [float(x) for x in a.margins.split(",")]
    cache = None if a.prefix_cache is None else Path(a.prefix_cache)
    preds = predict_split(
        Path(a.model),
        Path(a.posterior),
        Path(a.data),
        a.split,
        samples=a.samples,
        progress=True,
        prefix_cache=cache,
    )
    # the decision and threshold table exactly as the server reads them (None / the posterior's
    # own table with --plain or without a stored decision)
    predictor = Predictor.from_dirs(a.model, a.posterior, use_decision=not a.plain)
    decision, calibration = predictor.decision, predictor.calibration
    mean, bma = preds.mean_probs, preds.bma(a.samples)
    conf_mean = conf_k = None
    if decision is not None:
        pc = None
        if decision.needs_probe:
            split = (a.split,)
            pc = posterior_p_control(Path(a.model), Path(a.posterior), Path(a.data), split, cache)
            pc = pc[a.split]
        args = (decision.score, decision.temperature, decision.risk_lambda, pc)
        conf_mean = score_values(mean[:, None, :], *args, decision.control_power)
        conf_k = score_values(preds.sample_probs[:, : a.samples], *args, decision.control_power)
    table = {}
    for risk in (float(x) for x in a.risks.split(",")):
        thr = threshold_for(calibration, risk)
        table[str(risk)] = {
            "threshold": thr.value if math.isfinite(thr.value) else None,
            "rows": agreement_table(mean, bma, thr.value, margins, conf_mean, conf_k),
        }

    for value in (float(x) for x in a.fixed_thresholds.split(",") if x.strip()):
        # a fixed threshold: shows the rule's behaviour where the calibrated table has none
        table[f"threshold={value:g}"] = {
            "threshold": value,
            "rows": agreement_table(mean, bma, value, margins, conf_mean, conf_k),
        }

    items = read_manifest(Path(a.data), a.split)[: a.time_items]
    clips = [
        predictor.prepare(load_audio_file(Path(a.data), it), it.question, list(it.choices))
        for it in items
    ]
    predictor.predict([Request(clips[0], samples=a.samples)])  # warm-up
    timing = time_passes(predictor, clips, a.samples, a.repeats)
    ratio_k = timing[f"t{a.samples}_s"] / timing["t1_s"]
    ratio_redo = timing[f"redo{a.samples}_s"] / timing["t1_s"]
    for entry in table.values():
        for row in entry["rows"]:
            # the engine's redo reuses the prefix; a full re-run is kept for comparison
            row["avg_cost_vs_mean_pass"] = 1.0 + row["redo_rate"] * ratio_redo
            row["avg_cost_full_rerun"] = 1.0 + row["redo_rate"] * ratio_k
    doc = {
        "split": a.split,
        "n": len(preds.labels),
        "samples": a.samples,
        "score": "maxprob" if decision is None else decision.score,
        "timed_items": len(clips),
        "threads": a.threads,
        **timing,
        f"k{a.samples}_vs_mean_pass": ratio_k,
        f"redo{a.samples}_vs_mean_pass": ratio_redo,
        "by_risk": table,
    }
    text = json.dumps(doc, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
