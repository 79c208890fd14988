"""`quaver report`: the results report, IVON against AdamW over several fine-tuning seeds.

    quaver report --ivon-config configs/default-ivon.yaml \
        --adamw-config configs/default-adamw.yaml --seeds 0,1,2 --work work/default --out docs

One command repeats the whole fine-tuning (IVON and AdamW) once per seed, predicts `calib`,
`test` and `test_shift` with every posterior, and writes docs/results.md, docs/results.json (the
same numbers, to compare versions) and PNG plots under docs/results/. It is resumable by
construction: `finetune` skips a run whose posterior exists and `predict_split` caches its
arrays; the hidden states below the LoRA layers are shared by all posteriors through
`<work>/prefix-cache`. The run of a config's own seed keeps the config's out_dir; other seeds
go to `<out_dir>-s<seed>`.

Predictors compared (each on every seed):
- IVON posterior mean (K=1, no noise) and IVON Bayesian model averaging over the first K of 32
  weight samples, K = 1, 4, 8, 16, 32;
- AdamW-LoRA, and AdamW-LoRA with temperature scaling fitted on `calib` (`fit_temperature`).
Confidence scores: the maximum averaged probability, and for IVON BMA the risk-averse score
(mean minus `risk_lambda` times the std over samples of the chosen option's probability).

Per predictor and split: accuracy, ECE (15 bins), MCE, NLL, Brier, AUROC, AURC, coverage at
risk 1/5/10 %, risk at coverage 50/80 %, as mean and std over seeds; guaranteed-risk thresholds
(SGR, Clopper-Pearson) calibrated on `calib` per seed, with their realised risk and coverage on
`test` and `test_shift`; and the design goals computed as PASS/FAIL lines.

This module holds the flow (fine-tune both optimizers per seed through `recipes.flow`, predict,
score, write); `report_scores` the numbers (predictors, thresholds, aggregation, goals),
`report_render` the plots and results.md, `training.eval.temperature` the temperature scaling.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from training.eval.predictions import SplitPredictions, predict_split
from training.eval.selective import DEFAULT_TARGETS
from training.recipes.flow import OPTIMIZERS, finetune_pair, samples_for
from training.recipes.report_render import make_plots, render_markdown
from training.recipes.report_scores import (
    SPLITS,
    goal_checks,
    predictor_names,
    score_seeds,
    summarize_seeds,
)

FORMAT_VERSION = 1


@dataclass
class ReportConfig:
    """What `run_report` trains, predicts and writes."""

    ivon_config: Path  # FinetuneConfig YAML of the IVON runs (its out_dir serves its own seed)
    adamw_config: Path  # FinetuneConfig YAML of the AdamW baseline
    seeds: tuple[int, ...] = (0, 1, 2)  # fine-tuning seeds; the whole fine-tuning is repeated
    work: Path = Path("work/default")  # holds <work>/prefix-cache, shared by all posteriors
    out: Path = Path("docs")  # results.md, results.json and results/*.png go here
    base_dir: Path | None = None  # overrides both configs' base_dir
    data_dir: Path | None = None  # overrides both configs' data_dir
    samples: tuple[int, ...] = (1, 4, 8, 16, 32)  # IVON BMA sizes; the largest is drawn once
    main_samples: int = 8  # K of the served predictor, the one the goals are checked on
    targets: tuple[float, ...] = DEFAULT_TARGETS  # risk targets of the thresholds
    delta: float = 0.05  # failure probability of each guaranteed threshold
    risk_lambda: float = 1.0  # risk-averse score = mean - lambda * std of the chosen option
    batch_size: int = 8  # items per prediction batch
    threads: int = 0  # torch threads for prediction (0 = torch's default)
    # device for prediction (None: each run's own `device`); the base's dtype is each run's own
    # `dtype` (a bf16-trained run is evaluated in bf16; the caches keep the two apart)
    device: str | None = None
    progress: bool = True  # progress bars
    extra: dict = field(default_factory=dict)  # free-form notes copied into results.json

    def __post_init__(self) -> None:
        self.ivon_config, self.adamw_config = Path(self.ivon_config), Path(self.adamw_config)
        self.work, self.out = Path(self.work), Path(self.out)
        self.base_dir = Path(self.base_dir) if self.base_dir is not None else None
        self.data_dir = Path(self.data_dir) if self.data_dir is not None else None
        self.seeds = tuple(int(s) for s in self.seeds)
        self.samples = tuple(sorted(int(k) for k in self.samples))
        self.targets = tuple(sorted(float(t) for t in self.targets))
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and non-empty, got {self.seeds}")
        if not self.samples or self.samples[0] < 1 or len(set(self.samples)) != len(self.samples):
            raise ValueError(f"samples must be distinct sample counts >= 1, got {self.samples}")
        if self.main_samples not in self.samples:
            raise ValueError(f"main_samples={self.main_samples} must be one of {self.samples}")
        if not self.targets or not all(0 < t < 1 for t in self.targets):
            raise ValueError(f"targets must be risks in (0, 1), got {self.targets}")
        if 0.05 not in self.targets:
            raise ValueError("targets must include 0.05 (the goals and plots use it)")
        if not 0 < self.delta < 1 or self.risk_lambda < 0 or self.batch_size < 1:
            raise ValueError("need 0 < delta < 1, risk_lambda >= 0 and batch_size >= 1")
        for path in (self.ivon_config, self.adamw_config):
            if not path.is_file():
                raise ValueError(f"config file {path} not found")


def report_command(cfg: ReportConfig) -> str:
    """The command line that reproduces `cfg` (printed at the top of results.md)."""
    parts = [
        "quaver report",
        f"--ivon-config {cfg.ivon_config}",
        f"--adamw-config {cfg.adamw_config}",
        f"--seeds {','.join(map(str, cfg.seeds))}",
        f"--work {cfg.work}",
        f"--out {cfg.out}",
    ]
    if cfg.base_dir is not None:
        parts.append(f"--base {cfg.base_dir}")
    if cfg.data_dir is not None:
        parts.append(f"--data {cfg.data_dir}")
    if cfg.samples != (1, 4, 8, 16, 32):
        parts.append(f"--ks {','.join(map(str, cfg.samples))}")
    return " ".join(parts)


def seed_config(cfg: ReportConfig, which: str, seed: int):
    """The FinetuneConfig of optimizer config `which` ("ivon"/"adamw") for one seed."""
    from training.config import FinetuneConfig, load_config
    from training.recipes.flow import load_pair

    path = cfg.ivon_config if which == "ivon" else cfg.adamw_config
    base = load_config(path, FinetuneConfig)
    overrides: dict = {"seed": seed}
    if cfg.base_dir is not None:
        overrides["base_dir"] = str(cfg.base_dir)
    if cfg.data_dir is not None:
        overrides["data_dir"] = str(cfg.data_dir)
    if seed != base.seed:  # the config's own seed keeps its out_dir (existing runs are reused)
        overrides["out_dir"] = str(base.out_dir.with_name(f"{base.out_dir.name}-s{seed}"))
    return load_pair({which: path}, {which: overrides})[which]


def machine_info() -> dict:
    """Where the report was computed."""
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": cpus,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


def run_report(cfg: ReportConfig) -> dict:
    """Train every seed (skipping finished runs), predict, compute, write; returns results.json."""
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    times: dict[str, float] = {}
    runs: dict[str, dict[int, Path]] = {"ivon": {}, "adamw": {}}
    run_cfgs = {}
    for seed in cfg.seeds:
        cfgs = {which: seed_config(cfg, which, seed) for which in OPTIMIZERS}
        for which, run in cfgs.items():
            run_cfgs[(which, seed)] = run
            print(f"[report] fine-tune {which} seed {seed} -> {run.out_dir}", flush=True)
        for which, post in finetune_pair(cfgs, progress=cfg.progress).items():
            runs[which][seed] = post
    times["finetune_s"] = round(time.time() - t0, 1)
    # Runs finished by an earlier invocation (or by `quaver train`) cost this one nothing: their
    # own training time, recorded in each posterior, is what reproducing them costs.
    times["finetune_runs_s"] = round(
        sum(
            float(json.loads((p / "quaver.json").read_text()).get("train_seconds", 0.0))
            for by_seed in runs.values()
            for p in by_seed.values()
        ),
        1,
    )

    t = time.time()
    pcache = cfg.work / "prefix-cache"
    preds: dict[tuple[str, int, str], SplitPredictions] = {}
    jobs = [(w, s, sp) for s in cfg.seeds for w in OPTIMIZERS for sp in ("calib", *SPLITS)]
    for which, seed, split in tqdm(jobs, desc="report predictions", disable=not cfg.progress):
        run = run_cfgs[(which, seed)]
        preds[(which, seed, split)] = predict_split(
            run.base_dir,
            runs[which][seed],
            run.data_dir,
            split,
            samples=samples_for(which, max(cfg.samples)),
            seed=seed,
            batch_size=cfg.batch_size,
            progress=cfg.progress,
            prefix_cache=pcache,
            device=cfg.device or run.device,
            dtype=run.dtype,
        )
    times["predict_s"] = round(time.time() - t, 1)

    t = time.time()
    names = predictor_names(cfg)
    per_seed, temperatures, thresholds_seed, pooled = score_seeds(cfg, preds)
    summary = summarize_seeds(cfg, per_seed, thresholds_seed)
    times["metrics_s"] = round(time.time() - t, 1)

    main = f"IVON BMA K={cfg.main_samples}"
    first = preds[("ivon", cfg.seeds[0], "test")]
    results: dict = {
        "format_version": FORMAT_VERSION,
        "command": report_command(cfg),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "settings": {
            "seeds": list(cfg.seeds),
            "samples": list(cfg.samples),
            "main_predictor": main,
            "targets": list(cfg.targets),
            "delta": cfg.delta,
            "threshold_method": "sgr",
            "risk_lambda": cfg.risk_lambda,
            "ece_bins": 15,
            "std": "sample std over seeds (ddof 1)",
            **cfg.extra,
        },
        "items": {sp: len(preds[("ivon", cfg.seeds[0], sp)].labels) for sp in ("calib", *SPLITS)},
        "n_choices": sorted({int(c) for c in first.n_choices}),
        "runs": {w: {str(s): str(p) for s, p in r.items()} for w, r in runs.items()},
        "temperature": temperatures,
        "predictors": names,
        "aggregate": summary["aggregate"],
        "aggregate_risk_averse": summary["aggregate_risk_averse"],
        "by_family_accuracy": summary["by_family_accuracy"],
        "thresholds": {"summary": summary["thresholds"], "per_seed": thresholds_seed},
        "per_seed": per_seed,
    }
    results["goals"] = goal_checks(results, main)
    t = time.time()
    results["plots"] = make_plots(cfg, results, pooled, main)
    times["plots_s"] = round(time.time() - t, 1)
    times["total_s"] = round(time.time() - t0, 1)
    results["times_s"] = times

    # the sweep log kept by hand next to the report (docs/sweeps.md), linked when present
    results["sweeps"] = "sweeps.md" if (cfg.out / "sweeps.md").exists() else None
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (cfg.out / "results.md").write_text(render_markdown(results))
    print(f"[report] {cfg.out / 'results.md'} and results.json written", flush=True)
    return results
