"""The report's numbers: predictors per seed, their metrics and thresholds, aggregation over
seeds, and the design goals as PASS/FAIL checks (`recipes.report` runs them; `report_render`
draws and writes them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from training.eval.metrics import (
    aurc,
    auroc,
    confidence,
    correctness,
    coverage_at_risk,
    risk_at_coverage,
    risk_averse_confidence,
    summarize,
)
from training.eval.predictions import SplitPredictions
from training.eval.selective import calibrate_table, table_to_json, threshold_for
from training.eval.temperature import apply_temperature, fit_temperature

if TYPE_CHECKING:
    from training.recipes.report import ReportConfig

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


def selective_entries(cfg: ReportConfig) -> list[tuple[str, str]]:
    """(predictor, score) pairs whose thresholds are calibrated."""
    pairs = [(name, "maxprob") for name in predictor_names(cfg)]
    pairs += [(f"IVON BMA K={k}", "risk_averse") for k in cfg.samples if k > 1]
    return pairs


def score_seeds(cfg: ReportConfig, preds: dict) -> tuple[dict, dict, dict, dict]:
    """Every predictor of every seed on every split, from the cached predictions `preds`
    ({(optimizer, seed, split): SplitPredictions}): (per-seed metrics, AdamW temperature per
    seed, per-seed thresholds with their realised risk, scores pooled over seeds for plots)."""
    names = predictor_names(cfg)
    entries = selective_entries(cfg)
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
    return per_seed, temperatures, thresholds_seed, pooled


def summarize_seeds(cfg: ReportConfig, per_seed: dict, thresholds_seed: dict) -> dict:
    """Mean and std over seeds of every metric, per-family accuracy and threshold outcome."""
    names = predictor_names(cfg)
    entries = selective_entries(cfg)
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
    return {
        "aggregate": aggregate_metrics,
        "aggregate_risk_averse": aggregate_ra,
        "by_family_accuracy": by_family,
        "thresholds": thr_summary,
    }


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
