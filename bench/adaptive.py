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

from app.posterior import load_posterior
from app.predict import Predictor, Request
from app.thresholds import threshold_for
from training.data.manifest import load_audio_file, read_manifest
from training.eval.predictions import predict_split


def decisions(probs: np.ndarray, thr: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(answer, abstain, confidence) per row of (n, C) probabilities."""
    conf = probs.max(-1)
    return probs.argmax(-1), conf < thr, conf


def agreement_table(mean: np.ndarray, bma: np.ndarray, thr: float, margins: list[float]) -> list:
    """Per margin: share of items redone with K samples and decision agreement with always-K."""
    a_k, s_k, _ = decisions(bma, thr)
    a_m, s_m, c_m = decisions(mean, thr)
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
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    margins = [float(x) for x in a.margins.split(",")]
    preds = predict_split(
        Path(a.model), Path(a.posterior), Path(a.data), a.split, samples=a.samples, progress=True
    )
    calibration = load_posterior(a.posterior).calibration
    table = {}
    for risk in (float(x) for x in a.risks.split(",")):
        thr = threshold_for(calibration, risk)
        table[str(risk)] = {
            "threshold": thr.value if math.isfinite(thr.value) else None,
            "rows": agreement_table(preds.mean_probs, preds.bma(a.samples), thr.value, margins),
        }

    for value in (float(x) for x in a.fixed_thresholds.split(",") if x.strip()):
        # a fixed threshold: shows the rule's behaviour where the calibrated table has none
        table[f"threshold={value:g}"] = {
            "threshold": value,
            "rows": agreement_table(preds.mean_probs, preds.bma(a.samples), value, margins),
        }

    predictor = Predictor.from_dirs(a.model, a.posterior)
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
