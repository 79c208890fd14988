"""`quaver report`: the results report, IVON against AdamW over several fine-tuning seeds.

    quaver report --ivon-config configs/default-ivon.yaml \
        --adamw-config configs/default-adamw.yaml --seeds 0,1,2 --work work/default --out docs

One command repeats the whole fine-tuning (IVON and AdamW, plus the extra AdamW runs of the deep
ensemble) once per seed, predicts `calib`, `test`, `test_shift` and, when the benchmark has it,
`test_real` with every posterior, and writes docs/results.md, docs/results.json (the same
numbers, to compare versions) and PNG plots under docs/results/. It is resumable by
construction: `finetune` skips a run whose posterior exists and `predict_split` caches its
arrays; the hidden states below the LoRA layers are shared by all posteriors through
`<work>/prefix-cache`. The run of a config's own seed keeps the config's out_dir; other seeds
go to `<out_dir>-s<seed>`.

Predictors compared (each on every seed):
- IVON posterior mean (K=1, no noise) and IVON Bayesian model averaging over the first K of 32
  weight samples, K = 1, 4, 8, 16, 32; IVON BMA + TS (the served K's averaged probabilities
  temperature-scaled, T fitted on `calib`); where K = 32 on every split costs too much,
  `--ks 1,4,8 --large-ks 16,32` draws the large K on `test` only (`large_splits`) and reports
  them in a table of their own;
- AdamW-LoRA, AdamW-LoRA with temperature scaling fitted on `calib` (`fit_temperature`), and a
  deep ensemble of `ensemble_size` AdamW runs (seeds s, s+100, s+200, s+300 for report seed s;
  the extra runs go through `seed_config` and `finetune_pair`, so they are resumed like the rest;
  all runs go to one `finetune_pair` call, which trains as many side by side as the cores hold).
Confidence scores (`app.scores`): the maximum averaged probability; for predictors with samples
the risk-averse score (mean minus lambda times the std of the chosen option's probability,
lambda from `risk_lambdas` by lowest calib AURC) and minus the mutual information; for every
predictor, when `pretrain` holds control items, "answerable": the max probability times
(1 - P(control)) ^ power, P(control) from the control probe fitted on `pretrain`'s prefix states
(`training.eval.control_probe`), power from `control_powers` by lowest calib AURC.

Per predictor and split: accuracy, ECE (15 bins), MCE, NLL, Brier, AUROC, AURC, coverage at
risk 1/5/10/20 %, risk at coverage 50/80 %; per (predictor, score): the selective numbers and
the AUROC of telling control items (family "control") from answerable ones; all as mean and std
over seeds. Guaranteed-risk thresholds (SGR, Clopper-Pearson) per (predictor, score) calibrated on
`calib` per seed, with realised risk and coverage on every split. The served IVON pair (predictor
+ score, chosen on calib: `training.eval.decision`) is compared with the baselines by paired
bootstrap intervals over items pooled over seeds; with `write_decision` it is stored in each IVON
posterior's quaver.json for the server. The design goals are computed as PASS/FAIL lines.

This module holds the flow (fine-tune both optimizers per seed through `recipes.flow`, predict,
score, write); `report_scores` the numbers (predictors, scores, thresholds, bootstrap,
aggregation), `report_goals` the PASS/FAIL goals,
`report_render` the plots and results.md, `training.eval.temperature` the temperature scaling.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from training.data.generate import REAL_SPLITS
from training.data.manifest import manifest_path
from training.eval.control_probe import (
    attach_control_probe,
    fit_control_probe,
    prefix_model,
    split_features,
    split_p_control,
    split_states,
)
from training.eval.decision import write_decision
from training.eval.metrics import control_auroc
from training.eval.posterior_shape import run_shape
from training.eval.predictions import SplitPredictions, predict_split
from training.eval.selective import DEFAULT_TARGETS
from training.recipes.flow import OPTIMIZERS, finetune_pair, samples_for
from training.recipes.report_goals import goal_checks
from training.recipes.report_render import make_plots, render_markdown
from training.recipes.report_scores import (
    SPLITS,
    bootstrap_differences,
    ensemble_name,
    ensemble_seeds,
    large_k_summary,
    predictor_names,
    score_seeds,
    summarize_seeds,
)

if TYPE_CHECKING:
    import numpy as np

    from app.control import ControlProbe
    from training.config import FinetuneConfig

FORMAT_VERSION = 5  # 2: scores per predictor, ensemble, controls, bootstrap, served decision;
# 3: posterior_shape (Hessian movement, measured update sizes); 4: benchmark; 5: control_probe
# (the "answerable" score of every predictor, control_power per seed)


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
    # IVON BMA sizes above `samples`, drawn only on `large_splits` (K=32 costs four K=8 passes per
    # split): a separate table of the same metrics, K = main_samples recomputed from that draw
    large_samples: tuple[int, ...] = ()
    large_splits: tuple[str, ...] = ("test",)  # splits the large_samples are drawn on
    targets: tuple[float, ...] = DEFAULT_TARGETS  # risk targets of the thresholds
    delta: float = 0.05  # failure probability of each guaranteed threshold
    # risk-averse score = mean - lambda * std of the chosen option; lambda from this grid by
    # lowest AURC on calib, per predictor and seed
    risk_lambdas: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
    # "answerable" = maxprob * (1 - P(control)) ** power; the power from this grid by lowest
    # AURC on calib, per predictor and seed
    control_powers: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
    ensemble_size: int = 4  # AdamW deep ensemble members (1: no ensemble row)
    n_boot: int = 1000  # paired bootstrap resamples of the differences between predictors
    boot_seed: int = 0
    write_decision: bool = False  # store each seed's served choice in its IVON quaver.json
    # fit the control probe (app.control) on `pretrain`'s prefix states and add its "answerable"
    # score to every predictor (skipped with a note when `pretrain` holds no control items)
    control_probe: bool = True
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
        self.large_samples = tuple(sorted(int(k) for k in self.large_samples))
        self.large_splits = tuple(str(sp) for sp in self.large_splits)
        self.targets = tuple(sorted(float(t) for t in self.targets))
        self.risk_lambdas = tuple(sorted(float(x) for x in self.risk_lambdas))
        self.control_powers = tuple(sorted(float(x) for x in self.control_powers))
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and non-empty, got {self.seeds}")
        if not self.samples or self.samples[0] < 1 or len(set(self.samples)) != len(self.samples):
            raise ValueError(f"samples must be distinct sample counts >= 1, got {self.samples}")
        if self.main_samples not in self.samples:
            raise ValueError(f"main_samples={self.main_samples} must be one of {self.samples}")
        if self.large_samples and (
            self.large_samples[0] <= max(self.samples)
            or len(set(self.large_samples)) != len(self.large_samples)
        ):
            raise ValueError(
                f"large_samples must be distinct and above samples' {max(self.samples)}, "
                f"got {self.large_samples}"
            )
        if self.large_samples and not self.large_splits:
            raise ValueError("large_samples need at least one split in large_splits")
        if not self.targets or not all(0 < t < 1 for t in self.targets):
            raise ValueError(f"targets must be risks in (0, 1), got {self.targets}")
        if 0.05 not in self.targets:
            raise ValueError("targets must include 0.05 (the goals and plots use it)")
        if not 0 < self.delta < 1 or self.batch_size < 1 or self.n_boot < 1:
            raise ValueError("need 0 < delta < 1, batch_size >= 1 and n_boot >= 1")
        if not self.risk_lambdas or self.risk_lambdas[0] < 0:
            raise ValueError(f"risk_lambdas must be lambdas >= 0, got {self.risk_lambdas}")
        if not self.control_powers or self.control_powers[0] < 0:
            raise ValueError(f"control_powers must be powers >= 0, got {self.control_powers}")
        if self.ensemble_size < 1:
            raise ValueError(f"ensemble_size must be >= 1, got {self.ensemble_size}")
        members = [s + 100 * i for s in self.seeds for i in range(self.ensemble_size)]
        if len(set(members)) != len(members):
            raise ValueError(
                f"seeds {self.seeds} share AdamW ensemble members (seed + 100 i): use seeds "
                "that differ by something other than a multiple of 100"
            )
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
    if cfg.large_samples:
        parts.append(f"--large-ks {','.join(map(str, cfg.large_samples))}")
        if cfg.large_splits != ("test",):
            parts.append(f"--large-splits {','.join(cfg.large_splits)}")
    if cfg.ensemble_size != 4:
        parts.append(f"--ensemble-size {cfg.ensemble_size}")
    if cfg.n_boot != 1000:
        parts.append(f"--n-boot {cfg.n_boot}")
    if cfg.write_decision:
        parts.append("--write-decision")
    if not cfg.control_probe:
        parts.append("--no-control-probe")
    return " ".join(parts)


def report_splits(data_dir: Path) -> tuple[str, ...]:
    """The splits reported: `test`, `test_shift`, and the real-recording splits the benchmark
    has (`test_real` exists only when it was generated with real sources)."""
    real = tuple(sp for sp in REAL_SPLITS if manifest_path(data_dir, sp).exists())
    return (*SPLITS, *real)


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


def benchmark_info(data_dir: Path) -> dict:
    """Which benchmark the report measured: its folder, seed and fingerprint, and the Debian
    packages its real recordings came from (none for the synthetic benchmark)."""
    meta = json.loads((Path(data_dir) / "dataset.json").read_text())
    sources = meta.get("sources") or {}
    return {
        "data_dir": str(data_dir),
        "seed": meta["seed"],
        "fingerprint": meta["fingerprint"],
        "real_sources": bool(meta["config"].get("real_sources")),
        "packages": sorted(sources.get("packages", {})),
        "counts": meta["counts"],
    }


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


def report_probe(
    run: FinetuneConfig,
    posterior_dir: Path,
    splits: Sequence[str],
    cache_root: Path,
    progress: bool,
) -> tuple[ControlProbe | None, dict[str, np.ndarray] | None, dict]:
    """The control probe fitted on `pretrain` (`run`: the FinetuneConfig of `posterior_dir`)
    and its P(control) on calib and every reported split; (None, None, note) when `pretrain`
    has no control items or is missing. The third element is results.json's "control_probe"
    entry."""
    from training.data.controls import control_mask
    from training.data.manifest import read_manifest

    data = Path(run.data_dir)
    if not manifest_path(data, "pretrain").exists():
        return None, None, {"fitted": False, "why": "the benchmark has no pretrain split"}
    if not control_mask(read_manifest(data, "pretrain")).any():  # before any model or state work
        return None, None, {"fitted": False, "why": "pretrain holds no control items"}
    loaded, layer, _ = prefix_model(run.base_dir, posterior_dir, run.dtype)

    def states(split: str):
        return split_states(
            loaded, run.base_dir, posterior_dir, data, split, layer, cache_root, progress, run.dtype
        )

    fit = states("pretrain")
    info = {"fitted_on": "pretrain"}
    probe = fit_control_probe(split_features(loaded, fit), fit.is_control, layer, info=info)
    p_control, auroc = {}, {}
    for sp in ("calib", *splits):
        st = states(sp)
        p_control[sp] = split_p_control(probe, loaded, st)
        auroc[sp] = (
            control_auroc(1.0 - p_control[sp], st.is_control) if st.is_control.any() else None
        )
    entry = {"fitted": True, **dict(probe.info or {}), "layer": layer, "auroc_control": auroc}
    return probe, p_control, entry


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
        for which in OPTIMIZERS:
            run_cfgs[(which, seed)] = seed_config(cfg, which, seed)
    # the deep ensemble's extra AdamW runs (member 0 is the seed's own AdamW run above)
    extra = sorted(
        {m for s in cfg.seeds for m in ensemble_seeds(cfg, s)[1:]} if ensemble_name(cfg) else []
    )
    for member in extra:
        run_cfgs[("adamw", member)] = seed_config(cfg, "adamw", member)
    for (which, seed), run in run_cfgs.items():
        print(f"[report] fine-tune {which} seed {seed} -> {run.out_dir}", flush=True)
    # all runs in one call, so that they share the cores (two at a time at 1 thread on 2 cores)
    named = {f"{which}-{seed}": run for (which, seed), run in run_cfgs.items()}
    posts = finetune_pair(named, progress=cfg.progress)
    for which, seed in run_cfgs:
        runs[which][seed] = posts[f"{which}-{seed}"]
    times["finetune_s"] = round(time.time() - t0, 1)
    # how far each run moved (IVON's Hessian from hess_init; the measured update of every run)
    shapes = {
        w: {str(s): run_shape(p, run_cfgs[(w, s)].init_from) for s, p in sorted(r.items())}
        for w, r in runs.items()
    }
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
    splits = report_splits(run_cfgs[("ivon", cfg.seeds[0])].data_dir)
    jobs = [(w, s, sp) for s in cfg.seeds for w in OPTIMIZERS for sp in ("calib", *splits)]
    jobs += [("adamw", m, sp) for m in extra for sp in ("calib", *splits)]
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
    large = {}
    if cfg.large_samples:
        t = time.time()
        unknown = sorted(set(cfg.large_splits) - set(splits))
        if unknown:
            raise ValueError(f"large_splits {unknown} are not reported splits {splits}")
        jobs = [(s, sp) for s in cfg.seeds for sp in cfg.large_splits]
        for seed, split in tqdm(jobs, desc="report large K", disable=not cfg.progress):
            run = run_cfgs[("ivon", seed)]
            large[(seed, split)] = predict_split(
                run.base_dir,
                runs["ivon"][seed],
                run.data_dir,
                split,
                samples=max(cfg.large_samples),
                seed=seed,
                batch_size=cfg.batch_size,
                progress=cfg.progress,
                prefix_cache=pcache,
                device=cfg.device or run.device,
                dtype=run.dtype,
            )
        times["predict_large_s"] = round(time.time() - t, 1)

    t = time.time()
    probe, p_control, probe_entry = None, None, {"fitted": False, "why": "--no-control-probe"}
    if cfg.control_probe:
        first = cfg.seeds[0]
        probe, p_control, probe_entry = report_probe(
            run_cfgs[("ivon", first)], runs["ivon"][first], splits, pcache, cfg.progress
        )
        print(f"[report] control probe: {probe_entry}", flush=True)
    times["control_probe_s"] = round(time.time() - t, 1)

    t = time.time()
    names = predictor_names(cfg)
    per_seed, temperatures, thresholds_seed, pooled = score_seeds(cfg, preds, splits, p_control)
    summary = summarize_seeds(cfg, per_seed, thresholds_seed, splits)
    boot = bootstrap_differences(cfg, pooled, probe=p_control is not None)
    times["metrics_s"] = round(time.time() - t, 1)
    decisions = {s: per_seed[s]["decision"] for s in per_seed}
    if cfg.write_decision:
        for seed in cfg.seeds:
            d = decisions[str(seed)]
            table = thresholds_seed[str(seed)][d["key"]]["calibration"]
            if probe is not None:  # the served score may need it; the response shows it
                attach_control_probe(runs["ivon"][seed], probe)
            path = write_decision(runs["ivon"][seed], d, table)
            print(f"[report] served decision of seed {seed} ({d['key']}) -> {path}", flush=True)

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
            "large_samples": list(cfg.large_samples),
            "large_splits": list(cfg.large_splits) if cfg.large_samples else [],
            "main_predictor": main,
            "targets": list(cfg.targets),
            "delta": cfg.delta,
            "threshold_method": "sgr",
            "risk_lambdas": list(cfg.risk_lambdas),
            "control_powers": list(cfg.control_powers),
            "ensemble_size": cfg.ensemble_size,
            "ensemble": ensemble_name(cfg),
            "n_boot": cfg.n_boot,
            "bootstrap": "paired percentile, 95%, items pooled over seeds",
            "ece_bins": 15,
            "std": "sample std over seeds (ddof 1)",
            **cfg.extra,
        },
        "benchmark": benchmark_info(run_cfgs[("ivon", cfg.seeds[0])].data_dir),
        "splits": list(splits),
        "items": {sp: len(preds[("ivon", cfg.seeds[0], sp)].labels) for sp in ("calib", *splits)},
        "controls": {
            sp: int((preds[("ivon", cfg.seeds[0], sp)].families == "control").sum())
            for sp in ("calib", *splits)
        },
        "n_choices": sorted({int(c) for c in first.n_choices}),
        "runs": {w: {str(s): str(p) for s, p in r.items()} for w, r in runs.items()},
        "posterior_shape": shapes,
        "control_probe": probe_entry,
        "temperature": temperatures,
        "predictors": names,
        "aggregate": summary["aggregate"],
        "aggregate_scores": summary["aggregate_scores"],
        "decision": decisions,
        "bootstrap": boot,
        "by_family_accuracy": summary["by_family_accuracy"],
        "large_k": large_k_summary(cfg, large) if large else {},
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
