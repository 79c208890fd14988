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
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar
from tqdm import tqdm

from training.eval.metrics import (
    NLL_FLOOR,
    aurc,
    auroc,
    confidence,
    correctness,
    coverage_at_risk,
    risk_at_coverage,
    risk_averse_confidence,
    summarize,
)
from training.eval.predictions import SplitPredictions, predict_split
from training.eval.selective import DEFAULT_TARGETS, calibrate_table, table_to_json, threshold_for

FORMAT_VERSION = 1
SPLITS = ("test", "test_shift")  # reported splits; `calib` only fits T and the thresholds
RISKS = (0.01, 0.05, 0.1)  # coverage at these selective risks
COVERAGES = (0.5, 0.8)  # selective risk at these coverages
# metric key -> (column title, shown in percent)
COLUMNS = {
    "accuracy": ("acc %", True),
    "ece": ("ECE %", True),
    "mce": ("MCE %", True),
    "nll": ("NLL", False),
    "brier": ("Brier", False),
    "auroc": ("AUROC", False),
    "aurc": ("AURC %", True),
    "coverage_at_risk_0.01": ("cov@1%", True),
    "coverage_at_risk_0.05": ("cov@5%", True),
    "coverage_at_risk_0.1": ("cov@10%", True),
    "risk_at_coverage_0.5": ("risk@50%", True),
    "risk_at_coverage_0.8": ("risk@80%", True),
}
SELECTIVE_KEYS = tuple(k for k in COLUMNS if k.startswith(("auroc", "aurc", "cov", "risk")))


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


# ---------------------------------------------------------------------------------------------
# temperature scaling
# ---------------------------------------------------------------------------------------------


def _log_probs(probs: np.ndarray, n_choices: np.ndarray | None) -> np.ndarray:
    """log p (n, C) in float64, -inf on padded choices, valid ones floored at NLL_FLOOR."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"probs must have shape (n, C) with n >= 1, got {p.shape}")
    nc = np.full(p.shape[0], p.shape[1]) if n_choices is None else np.asarray(n_choices)
    valid = np.arange(p.shape[1])[None, :] < nc[:, None]  # (n, C)
    return np.where(valid, np.log(np.maximum(p, NLL_FLOOR)), -np.inf)


def _softmax_scaled(logp: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T) over each row: (n, C) -> (n, C), padding stays 0."""
    z = logp / temperature
    z = z - z.max(1, keepdims=True)  # the max is finite: every item has >= 1 valid choice
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def apply_temperature(
    probs: np.ndarray, temperature: float, n_choices: np.ndarray | None = None
) -> np.ndarray:
    """softmax(log p / T) per item: (n, C) -> (n, C) float64, zero padding kept.

    Log-probabilities are logits up to a per-item constant, so this is temperature scaling of the
    model's logits. T > 1 softens, T < 1 sharpens, T = 1 returns p (renormalised).
    """
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    return _softmax_scaled(_log_probs(probs, n_choices), temperature)


def fit_temperature(
    probs: np.ndarray,
    labels: np.ndarray,
    n_choices: np.ndarray | None = None,
    bounds: tuple[float, float] = (0.01, 100.0),
) -> float:
    """The temperature T minimising the NLL of softmax(log p / T) on (probs, labels).

    NLL is convex in 1/T (log-sum-exp of a linear function minus a linear term), so a bounded
    scalar search over log T finds the global minimum inside `bounds`.
    """
    lo, hi = bounds
    if not 0 < lo < 1 < hi:
        raise ValueError(f"bounds must satisfy 0 < low < 1 < high, got {bounds}")
    logp = _log_probs(probs, n_choices)
    y = np.asarray(labels, dtype=np.int64)
    if (
        y.shape != (logp.shape[0],)
        or np.any(y < 0)
        or np.any(~np.isfinite(logp[np.arange(len(y)), y]))
    ):
        raise ValueError("labels must index a valid choice of each item")
    rows = np.arange(len(y))

    def nll(log_t: float) -> float:
        q = _softmax_scaled(logp, math.exp(log_t))
        return float(-np.log(np.maximum(q[rows, y], NLL_FLOOR)).mean())

    res = minimize_scalar(
        nll, bounds=(math.log(lo), math.log(hi)), method="bounded", options={"xatol": 1e-6}
    )
    return float(math.exp(res.x))


# ---------------------------------------------------------------------------------------------
# runs and predictions
# ---------------------------------------------------------------------------------------------


def seed_config(cfg: ReportConfig, which: str, seed: int):
    """The FinetuneConfig of optimizer config `which` ("ivon"/"adamw") for one seed."""
    from training.config import FinetuneConfig, load_config

    path = cfg.ivon_config if which == "ivon" else cfg.adamw_config
    base = load_config(path, FinetuneConfig)
    overrides: dict = {"seed": seed}
    if cfg.base_dir is not None:
        overrides["base_dir"] = str(cfg.base_dir)
    if cfg.data_dir is not None:
        overrides["data_dir"] = str(cfg.data_dir)
    if seed != base.seed:  # the config's own seed keeps its out_dir (existing runs are reused)
        overrides["out_dir"] = str(base.out_dir.with_name(f"{base.out_dir.name}-s{seed}"))
    run = load_config(path, FinetuneConfig, overrides)
    if run.optimizer != which:
        raise ValueError(f"{path}: optimizer is {run.optimizer!r}, expected {which!r}")
    return run


@dataclass
class Scored:
    """One predictor on one split: probabilities, optional samples and its confidence scores."""

    probs: np.ndarray  # (n, C) predictive probabilities
    samples: np.ndarray | None  # (n, K, C) per-sample probabilities (None: deterministic)
    labels: np.ndarray  # (n,)
    n_choices: np.ndarray  # (n,)
    families: np.ndarray  # (n,)

    @property
    def correct(self) -> np.ndarray:
        return correctness(self.probs, self.labels, self.n_choices)

    def score(self, kind: str, lam: float) -> np.ndarray:
        """Confidence score (n,): "maxprob" or "risk_averse" (needs samples)."""
        if kind == "maxprob":
            return confidence(self.probs)
        if self.samples is None:
            raise ValueError("the risk-averse score needs per-sample probabilities")
        return risk_averse_confidence(self.samples, lam, self.n_choices)


def predictor_names(cfg: ReportConfig) -> list[str]:
    """Row names of the metrics table, in order."""
    return ["IVON mean"] + [f"IVON BMA K={k}" for k in cfg.samples] + ["AdamW", "AdamW + TS"]


def build_predictors(
    cfg: ReportConfig, ivon: SplitPredictions, adamw: SplitPredictions, temperature: float
) -> dict[str, Scored]:
    """Every predictor of the table on one split of one seed."""
    meta = (ivon.labels, ivon.n_choices, ivon.families)
    if not np.array_equal(ivon.labels, adamw.labels):
        raise ValueError("IVON and AdamW predictions are not on the same items")
    out = {"IVON mean": Scored(ivon.mean_probs, None, *meta)}
    for k in cfg.samples:
        out[f"IVON BMA K={k}"] = Scored(ivon.bma(k), ivon.sample_probs[:, :k], *meta)
    out["AdamW"] = Scored(adamw.mean_probs, None, *meta)
    out["AdamW + TS"] = Scored(
        apply_temperature(adamw.mean_probs, temperature, adamw.n_choices), None, *meta
    )
    return out


def summarize_scored(s: Scored, lam: float) -> dict:
    """`metrics.summarize` of one predictor (the numbers stored in results.json)."""
    return summarize(
        s.probs,
        s.labels,
        s.families,
        n_choices=s.n_choices,
        sample_probs=s.samples,
        risks=RISKS,
        coverages=COVERAGES,
        risk_lambda=lam,
    )


def selective_metrics(conf: np.ndarray, correct: np.ndarray) -> dict[str, float | None]:
    """AUROC, AURC, coverage at RISKS and risk at COVERAGES of any confidence score."""
    out: dict[str, float] = {"auroc": auroc(conf, correct), "aurc": aurc(conf, correct)}
    for r in RISKS:
        out[f"coverage_at_risk_{r:g}"] = coverage_at_risk(conf, correct, r)
    for c in COVERAGES:
        out[f"risk_at_coverage_{c:g}"] = risk_at_coverage(conf, correct, c)
    return {k: (float(v) if math.isfinite(v) else None) for k, v in out.items()}


def realised(conf: np.ndarray, correct: np.ndarray, threshold: float) -> dict:
    """Coverage, abstention and selective risk of `abstain iff conf < threshold`."""
    answered = conf >= threshold
    n_ans = int(answered.sum())
    errors = int((answered & ~correct).sum())
    return {
        "coverage": n_ans / len(conf),
        "abstain_rate": 1.0 - n_ans / len(conf),
        "risk": errors / n_ans if n_ans else None,  # None: nothing answered, nothing wrong
        "answered": n_ans,
        "errors": errors,
    }


# ---------------------------------------------------------------------------------------------
# aggregation over seeds and goal checks
# ---------------------------------------------------------------------------------------------


def aggregate(values: Sequence[float | None]) -> dict:
    """Mean and sample std (ddof 1; None with one value) over seeds, ignoring None values."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "values": list(values)}
    arr = np.array(vals)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else None
    return {"mean": float(arr.mean()), "std": std, "n": len(arr), "values": list(values)}


def _agg_tree(per_seed: list[dict]) -> dict:
    """Aggregate dicts of metrics (same keys per seed) key by key."""
    keys = [
        k for k in per_seed[0] if isinstance(per_seed[0][k], (int, float)) or per_seed[0][k] is None
    ]
    return {k: aggregate([d.get(k) for d in per_seed]) for k in keys}


def _m(agg: dict, split: str, pred: str, key: str) -> tuple[float | None, float | None]:
    a = agg[split][pred][key]
    return a["mean"], a["std"]


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def goal_checks(results: dict, main: str) -> list[dict]:
    """The design goals as {goal, split, pass, detail} rows, computed from the aggregates."""
    agg = results["aggregate"]
    rows = []
    for split in SPLITS:
        ivon_ece, _ = _m(agg, split, main, "ece")
        adam_ece, _ = _m(agg, split, "AdamW", "ece")
        ok = None if None in (ivon_ece, adam_ece) else ivon_ece <= 0.5 * adam_ece
        rows.append(
            {
                "goal": f"{main} ECE <= 0.5 x AdamW ECE",
                "split": split,
                "pass": ok,
                "detail": f"{_pct(ivon_ece)} vs 0.5 x {_pct(adam_ece)}",
            }
        )
        ivon_nll, _ = _m(agg, split, main, "nll")
        adam_nll, _ = _m(agg, split, "AdamW", "nll")
        ok = None if None in (ivon_nll, adam_nll) else ivon_nll < adam_nll
        rows.append(
            {
                "goal": f"{main} NLL < AdamW NLL",
                "split": split,
                "pass": ok,
                "detail": f"{ivon_nll:.4f} vs {adam_nll:.4f}" if ok is not None else "n/a",
            }
        )
        ia, isd = _m(agg, split, main, "accuracy")
        aa, asd = _m(agg, split, "AdamW", "accuracy")
        spread = max(isd or 0.0, asd or 0.0)
        rows.append(
            {
                "goal": f"{main} accuracy >= AdamW accuracy - seed spread (larger std)",
                "split": split,
                "pass": ia >= aa - spread,
                "detail": f"{_pct(ia)} vs {_pct(aa)} - {_pct(spread)}",
            }
        )
        ic, _ = _m(agg, split, main, "coverage_at_risk_0.05")
        ac, _ = _m(agg, split, "AdamW", "coverage_at_risk_0.05")
        tc, _ = _m(agg, split, "AdamW + TS", "coverage_at_risk_0.05")
        rows.append(
            {
                "goal": f"{main} coverage at 5% risk > AdamW and > AdamW + TS",
                "split": split,
                "pass": ic > ac and ic > tc,
                "detail": f"{_pct(ic)} vs AdamW {_pct(ac)}, AdamW + TS {_pct(tc)}",
            }
        )
    thr = results["thresholds"]["summary"][f"{main} | maxprob"]
    rows.append(
        {
            "goal": f"{main} guaranteed thresholds hold on test (risk <= target, every seed)",
            "split": "test",
            "pass": all(t["held_test"] == t["seeds"] for t in thr),
            "detail": ", ".join(
                f"{t['max_risk']:g}: held {t['held_test']}/{t['seeds']} "
                f"(feasible {t['feasible_seeds']})"
                for t in thr
            ),
        }
    )
    informative = [t for t in thr if t["feasible_seeds"] > 0]
    rows.append(
        {
            "goal": f"{main} abstains more on test_shift than on test (every feasible target)",
            "split": "test vs test_shift",
            "pass": bool(informative)
            and all(
                t["abstain_test_shift"]["mean"] > t["abstain_test"]["mean"] for t in informative
            ),
            "detail": ", ".join(
                f"{t['max_risk']:g}: {_pct(t['abstain_test']['mean'])} -> "
                f"{_pct(t['abstain_test_shift']['mean'])}"
                for t in informative
            )
            or "no target was feasible on calib",
        }
    )
    return rows


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------


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


def _selective_entries(cfg: ReportConfig) -> list[tuple[str, str]]:
    """(predictor, score) pairs whose thresholds are calibrated."""
    pairs = [(name, "maxprob") for name in predictor_names(cfg)]
    pairs += [(f"IVON BMA K={k}", "risk_averse") for k in cfg.samples if k > 1]
    return pairs


def run_report(cfg: ReportConfig) -> dict:
    """Train every seed (skipping finished runs), predict, compute, write; returns results.json."""
    import torch

    from training.stages.finetune import finetune

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    times: dict[str, float] = {}
    runs: dict[str, dict[int, Path]] = {"ivon": {}, "adamw": {}}
    run_cfgs = {}
    for seed in cfg.seeds:
        for which in ("ivon", "adamw"):
            run = seed_config(cfg, which, seed)
            run_cfgs[(which, seed)] = run
            print(f"[report] fine-tune {which} seed {seed} -> {run.out_dir}", flush=True)
            runs[which][seed] = finetune(run, progress=cfg.progress)
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
    jobs = [(w, s, sp) for s in cfg.seeds for w in ("ivon", "adamw") for sp in ("calib", *SPLITS)]
    for which, seed, split in tqdm(jobs, desc="report predictions", disable=not cfg.progress):
        run = run_cfgs[(which, seed)]
        preds[(which, seed, split)] = predict_split(
            run.base_dir,
            runs[which][seed],
            run.data_dir,
            split,
            samples=max(cfg.samples) if which == "ivon" else 1,  # AdamW: std 0, one sample
            seed=seed,
            batch_size=cfg.batch_size,
            progress=cfg.progress,
            prefix_cache=pcache,
        )
    times["predict_s"] = round(time.time() - t, 1)

    t = time.time()
    names = predictor_names(cfg)
    entries = _selective_entries(cfg)
    per_seed: dict[str, dict] = {}
    temperatures: dict[str, float] = {}
    thresholds_seed: dict[str, dict] = {}
    pooled: dict[str, dict[str, list]] = {sp: {} for sp in SPLITS}  # plots pool items over seeds
    for seed in cfg.seeds:
        cal_adam = preds[("adamw", seed, "calib")]
        temp = fit_temperature(cal_adam.mean_probs, cal_adam.labels, cal_adam.n_choices)
        temperatures[str(seed)] = temp
        scored = {
            sp: build_predictors(cfg, preds[("ivon", seed, sp)], preds[("adamw", seed, sp)], temp)
            for sp in ("calib", *SPLITS)
        }
        per_seed[str(seed)] = {}
        for sp in SPLITS:
            per_seed[str(seed)][sp] = {
                "metrics": {n: summarize_scored(scored[sp][n], cfg.risk_lambda) for n in names},
                "risk_averse": {
                    n: selective_metrics(
                        scored[sp][n].score("risk_averse", cfg.risk_lambda), scored[sp][n].correct
                    )
                    for n, score in entries
                    if score == "risk_averse"
                },
            }
            for n, score in entries:
                s = scored[sp][n]
                pooled[sp].setdefault(f"{n} | {score}", []).append(
                    (s.score(score, cfg.risk_lambda), s.correct)
                )
        thresholds_seed[str(seed)] = {}
        for n, score in entries:
            cal = scored["calib"][n]
            table = table_to_json(
                calibrate_table(
                    cal.score(score, cfg.risk_lambda),
                    cal.correct,
                    targets=cfg.targets,
                    delta=cfg.delta,
                    method="sgr",
                )
            )
            entry: dict = {"calibration": table}
            for sp in SPLITS:
                s = scored[sp][n]
                conf, corr = s.score(score, cfg.risk_lambda), s.correct
                entry[sp] = [
                    {"max_risk": r, **realised(conf, corr, threshold_for(table, r))}
                    for r in cfg.targets
                ]
            thresholds_seed[str(seed)][f"{n} | {score}"] = entry

    aggregate_metrics = {
        sp: {
            n: _agg_tree([per_seed[str(s)][sp]["metrics"][n]["overall"] for s in cfg.seeds])
            for n in names
        }
        for sp in SPLITS
    }
    aggregate_ra = {
        sp: {
            n: _agg_tree([per_seed[str(s)][sp]["risk_averse"][n] for s in cfg.seeds])
            for n in per_seed[str(cfg.seeds[0])][sp]["risk_averse"]
        }
        for sp in SPLITS
    }
    families = sorted(
        {
            f
            for sp in SPLITS
            for f in per_seed[str(cfg.seeds[0])][sp]["metrics"][names[0]]["by_family"]
        }
    )
    by_family = {
        sp: {
            n: {
                f: aggregate(
                    [
                        per_seed[str(s)][sp]["metrics"][n]["by_family"].get(f, {}).get("accuracy")
                        for s in cfg.seeds
                    ]
                )
                for f in families
            }
            for n in names
        }
        for sp in SPLITS
    }
    thr_summary = {}
    for n, score in entries:
        key = f"{n} | {score}"
        rows = []
        for i, r in enumerate(cfg.targets):
            seeds_rows = [thresholds_seed[str(s)][key] for s in cfg.seeds]
            cal = [e["calibration"]["targets"][i] for e in seeds_rows]
            test = [e["test"][i] for e in seeds_rows]
            shift = [e["test_shift"][i] for e in seeds_rows]
            rows.append(
                {
                    "max_risk": r,
                    "seeds": len(cfg.seeds),
                    "feasible_seeds": sum(c["feasible"] for c in cal),
                    "coverage_calib": aggregate([c["coverage"] for c in cal]),
                    "coverage_test": aggregate([x["coverage"] for x in test]),
                    "risk_test": aggregate([x["risk"] for x in test]),
                    "held_test": sum(x["risk"] is None or x["risk"] <= r + 1e-12 for x in test),
                    "abstain_test": aggregate([x["abstain_rate"] for x in test]),
                    "coverage_test_shift": aggregate([x["coverage"] for x in shift]),
                    "risk_test_shift": aggregate([x["risk"] for x in shift]),
                    "held_test_shift": sum(
                        x["risk"] is None or x["risk"] <= r + 1e-12 for x in shift
                    ),
                    "abstain_test_shift": aggregate([x["abstain_rate"] for x in shift]),
                }
            )
        thr_summary[key] = rows
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
        "aggregate": aggregate_metrics,
        "aggregate_risk_averse": aggregate_ra,
        "by_family_accuracy": by_family,
        "thresholds": {"summary": thr_summary, "per_seed": thresholds_seed},
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


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------


def _pool(pooled: dict, key: str) -> tuple[np.ndarray, np.ndarray]:
    pairs = pooled[key]
    return np.concatenate([c for c, _ in pairs]), np.concatenate([a for _, a in pairs])


def make_plots(cfg: ReportConfig, results: dict, pooled: dict, main: str) -> list[str]:
    """Every PNG of the report under <out>/results/; returns paths relative to <out>."""
    from training.eval import plots

    folder = cfg.out / "results"
    shown = ["IVON mean", main, "AdamW", "AdamW + TS"]
    written = []
    for sp in SPLITS:
        scores = {n: _pool(pooled[sp], f"{n} | maxprob") for n in shown}
        written.append(
            plots.reliability_diagram(
                scores, folder / f"reliability_{sp}.png", title=f"{sp}, items pooled over seeds"
            )
        )
        rc = dict(scores)
        if main != "IVON BMA K=1":
            rc[f"{main} risk-averse"] = _pool(pooled[sp], f"{main} | risk_averse")
        written.append(
            plots.risk_coverage_plot(
                rc,
                folder / f"risk_coverage_{sp}.png",
                targets=(0.05, 0.1),
                title=f"risk-coverage, {sp}",
            )
        )
        for n, slug in ((main, "ivon"), ("AdamW", "adamw"), ("AdamW + TS", "adamw_ts")):
            conf, corr = scores[n]
            written.append(
                plots.confidence_histogram(
                    conf, corr, folder / f"confidence_{slug}_{sp}.png", title=f"{n}, {sp}"
                )
            )
        agg = results["aggregate"][sp]
        ks = list(cfg.samples)
        values = {
            "accuracy": [agg[f"IVON BMA K={k}"]["accuracy"]["mean"] for k in ks],
            "ece": [agg[f"IVON BMA K={k}"]["ece"]["mean"] for k in ks],
            "nll": [agg[f"IVON BMA K={k}"]["nll"]["mean"] for k in ks],
        }
        base = {m: agg["AdamW"][m]["mean"] for m in values}
        written.append(
            plots.metrics_vs_samples(
                ks,
                values,
                folder / f"metrics_vs_k_{sp}.png",
                baselines=base,
                title=f"IVON BMA vs K on {sp} (dashed: AdamW), mean over seeds",
            )
        )
    bars = {}
    for n in shown:
        bars[n] = {}
        thr = results["thresholds"]["summary"][f"{n} | maxprob"]
        at5 = next(t for t in thr if abs(t["max_risk"] - 0.05) < 1e-12)
        for sp in SPLITS:
            agg = results["aggregate"][sp][n]
            bars[n][sp] = {
                "accuracy": agg["accuracy"]["mean"],
                "ece": agg["ece"]["mean"],
                "nll": agg["nll"]["mean"],
                "abstain at 5% risk": at5[f"abstain_{sp}"]["mean"],
            }
    written.append(
        plots.shift_bars(
            bars,
            folder / "shift.png",
            metrics=("accuracy", "ece", "nll", "abstain at 5% risk"),
            title="test vs test_shift, mean over seeds",
        )
    )
    return [str(Path(p).relative_to(cfg.out)) for p in written]


# ---------------------------------------------------------------------------------------------
# markdown
# ---------------------------------------------------------------------------------------------


def _fmt(a: dict | None, pct: bool) -> str:
    """'mean ± std' of an aggregate (percent when pct)."""
    if a is None or a["mean"] is None:
        return "n/a"
    scale, digits = (100.0, 1) if pct else (1.0, 3)
    out = f"{scale * a['mean']:.{digits}f}"
    if a["std"] is not None:
        out += f" ± {scale * a['std']:.{digits}f}"
    return out


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def render_markdown(results: dict) -> str:
    """docs/results.md from the results dict (every number also in results.json)."""
    st = results["settings"]
    main = st["main_predictor"]
    m = results["machine"]
    seeds = st["seeds"]
    lines = [
        "# Quaver results: IVON against AdamW",
        "",
        "Generated by one command (re-running it resumes: finished fine-tuning runs and cached",
        "predictions are reused):",
        "",
        "```",
        results["command"],
        "```",
        "",
        f"- Date: {results['date']}",
        f"- Machine: {m['platform']}, {m['processor']}, {m['cpus']} CPUs, {m['device']}, "
        f"python {m['python']}, torch {m['torch']}",
        f"- Seeds of the whole fine-tuning: {', '.join(map(str, seeds))}; every number is the "
        "mean ± sample std (ddof 1) over seeds.",
        f"- Items: calib {results['items']['calib']}, test {results['items']['test']}, "
        f"test_shift {results['items']['test_shift']}; choices per item: "
        f"{', '.join(map(str, results['n_choices']))}.",
        f"- The served predictor is {main} (max averaged probability as the confidence).",
        f"- Wall time of the invocation that wrote this: {results['times_s']['total_s']} s "
        f"(fine-tuning {results['times_s']['finetune_s']} s, "
        f"prediction {results['times_s']['predict_s']} s; finished runs and cached predictions "
        "cost it nothing). The fine-tuning runs' own training time, summed: "
        f"{results['times_s'].get('finetune_runs_s', 0.0)} s.",
    ]
    if len(seeds) < 3:
        lines.append(f"- Only {len(seeds)} seed(s): fewer than the 3 the evaluation asks for.")
    if results.get("sweeps"):
        lines.append(
            f"- How these settings were chosen (runs compared on calib, never on test): "
            f"[{results['sweeps']}]({results['sweeps']})."
        )
    lines += ["", "## Goal checks", ""]
    for g in results["goals"]:
        verdict = "n/a" if g["pass"] is None else ("PASS" if g["pass"] else "FAIL")
        lines.append(f"- **{verdict}** ({g['split']}) {g['goal']}: {g['detail']}")

    lines += [
        "",
        "## Metrics",
        "",
        "Percent columns are rates x 100. ECE and MCE use 15 equal-width bins; NLL in nats; AURC",
        "is the mean selective risk over all coverages; cov@r% is the largest coverage whose",
        "empirical selective risk is at most r (chosen on the evaluated split itself, as in the",
        "literature; the guaranteed thresholds below are chosen on calib instead).",
    ]
    cols = list(COLUMNS)
    for sp in SPLITS:
        lines += ["", f"### {sp}", ""]
        rows = [
            [n] + [_fmt(results["aggregate"][sp][n][c], COLUMNS[c][1]) for c in cols]
            for n in results["predictors"]
        ]
        lines += _table(["predictor"] + [COLUMNS[c][0] for c in cols], rows)

    lines += [
        "",
        "## Risk-averse confidence",
        "",
        f"Score = mean - {st['risk_lambda']:g} x std over the K samples of the probability of the "
        "BMA-chosen option (it ranks items; it is not a probability). Same predictions as the "
        "rows above, only the ranking for abstention changes.",
    ]
    sel = [c for c in cols if c in SELECTIVE_KEYS]
    for sp in SPLITS:
        lines += ["", f"### {sp}", ""]
        rows = []
        for n in results["aggregate_risk_averse"][sp]:
            rows.append(
                [f"{n}, max prob"]
                + [_fmt(results["aggregate"][sp][n][c], COLUMNS[c][1]) for c in sel]
            )
            rows.append(
                [f"{n}, risk-averse"]
                + [_fmt(results["aggregate_risk_averse"][sp][n][c], COLUMNS[c][1]) for c in sel]
            )
        lines += _table(["predictor, score"] + [COLUMNS[c][0] for c in sel], rows)

    lines += ["", "## Accuracy per family (%)"]
    shown = ["IVON mean", main, "AdamW", "AdamW + TS"]
    for sp in SPLITS:
        fams = results["by_family_accuracy"][sp][shown[0]]
        lines += ["", f"### {sp}", ""]
        rows = [
            [f] + [_fmt(results["by_family_accuracy"][sp][n][f], True) for n in shown] for f in fams
        ]
        lines += _table(["family", *shown], rows)

    lines += [
        "",
        "## Guaranteed-risk thresholds",
        "",
        f"Per seed and predictor, thresholds are chosen on calib by SGR (Clopper-Pearson bound, "
        f"confidence {1 - st['delta']:.2f} per target, union bound over the probed thresholds); "
        "the service abstains iff confidence < threshold. A target no threshold meets on calib "
        "means abstain always (risk n/a, counted as held). Held = seeds whose realised "
        "selective risk is at most the target. The guarantee allows a failure with probability "
        f"{st['delta']:g} per target and seed. AdamW + TS fits its temperature on the same calib.",
    ]
    for key in (f"{n} | maxprob" for n in shown):
        rows = []
        for t in results["thresholds"]["summary"][key]:
            rows.append(
                [
                    f"{100 * t['max_risk']:g}%",
                    f"{t['feasible_seeds']}/{t['seeds']}",
                    _fmt(t["coverage_calib"], True),
                    _fmt(t["coverage_test"], True),
                    _fmt(t["risk_test"], True),
                    f"{t['held_test']}/{t['seeds']}",
                    _fmt(t["abstain_test"], True),
                    _fmt(t["abstain_test_shift"], True),
                    _fmt(t["risk_test_shift"], True),
                    f"{t['held_test_shift']}/{t['seeds']}",
                ]
            )
        lines += ["", f"### {key.replace(' | maxprob', '')}", ""]
        lines += _table(
            [
                "target",
                "feasible",
                "cov calib %",
                "cov test %",
                "risk test %",
                "held test",
                "abstain test %",
                "abstain shift %",
                "risk shift %",
                "held shift",
            ],
            rows,
        )
    ra_key = f"{main} | risk_averse"
    if ra_key in results["thresholds"]["summary"]:
        rows = [
            [
                f"{100 * t['max_risk']:g}%",
                f"{t['feasible_seeds']}/{t['seeds']}",
                _fmt(t["coverage_test"], True),
                _fmt(t["risk_test"], True),
                f"{t['held_test']}/{t['seeds']}",
                _fmt(t["abstain_test"], True),
                _fmt(t["abstain_test_shift"], True),
            ]
            for t in results["thresholds"]["summary"][ra_key]
        ]
        lines += ["", f"### {main}, risk-averse score", ""]
        lines += _table(
            [
                "target",
                "feasible",
                "cov test %",
                "risk test %",
                "held test",
                "abstain test %",
                "abstain shift %",
            ],
            rows,
        )

    temps = results["temperature"]
    lines += [
        "",
        "## Temperature scaling",
        "",
        "AdamW + TS = softmax(log p / T), T minimising the NLL on calib: "
        + ", ".join(f"seed {s}: T = {t:.3f}" for s, t in temps.items())
        + ".",
        "",
        "## Plots",
        "",
        "Items are pooled over seeds in the reliability, risk-coverage and histogram plots; the "
        "K and shift plots show means over seeds.",
        "",
    ]
    for p in results["plots"]:
        lines.append(f"![{Path(p).stem}]({p})")
    lines += [
        "",
        "## Runs",
        "",
    ]
    for which, per in results["runs"].items():
        lines.append(f"- {which}: " + ", ".join(f"seed {s}: `{p}`" for s, p in per.items()))
    return "\n".join(lines) + "\n"
