"""The report's numbers: predictors and confidence scores per seed, their metrics and thresholds,
the served choice, paired bootstrap differences and aggregation over seeds (`recipes.report`
runs them; `report_goals` turns them into PASS/FAIL goals; `report_render` draws and writes).

Predictors (per seed; temperatures fitted on `calib` only):
- "IVON mean", "IVON BMA K=k" (mean of the first k sample probabilities);
- "IVON BMA + TS": softmax(log p / T) of the served K's BMA p, T minimising calib NLL of p (the
  scaling acts on the log of the averaged probabilities, not on each sample);
- "AdamW", "AdamW + TS" (same scaling of the AdamW probabilities);
- "AdamW ensemble (M)": the mean of M AdamW runs' probabilities (seeds s, s+100, ...); its
  members are its samples, so the sample scores apply to it.
Scores (`app.scores`, the ones the server can use): "maxprob" for every predictor; for predictors
with samples (IVON BMA K > 1, the ensemble) also "risk_averse" (mean - lambda * std of the chosen
option, lambda from `cfg.risk_lambdas` by lowest calib AURC) and "mutual_information"
(confidence = -MI). With the control probe (`training.eval.control_probe`, fitted on
`pretrain`), every predictor also gets "answerable": its max probability times
(1 - P(control)) ** power, P(control) the probe's probability that the audio holds no answer and
the power from `cfg.control_powers` by lowest calib AURC (per predictor and seed). The probe reads the frozen states below
the LoRA layers, so it is the same for IVON and AdamW: the AdamW rows get it too, and the served
IVON choice is compared with "AdamW + TS | answerable" as well as with plain AdamW + TS.
Every (predictor, score) gets its own guaranteed-risk table on calib.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from app.scores import PROBE_SCORES, SAMPLE_SCORES, answerable, score_values
from training.eval.bootstrap import paired_bootstrap
from training.eval.decision import choose_lambda, choose_power, choose_served
from training.eval.metrics import (
    NLL_FLOOR,
    aurc,
    auroc,
    confidence,
    control_auroc,
    correctness,
    coverage_at_risk,
    reliability_bins,
    risk_at_coverage,
    summarize,
)
from training.eval.predictions import SplitPredictions
from training.eval.selective import calibrate_table, table_to_json, threshold_for
from training.eval.temperature import apply_temperature, fit_temperature

if TYPE_CHECKING:
    from training.recipes.report import ReportConfig

SPLITS = ("test", "test_shift")  # always reported; "test_real" too when the benchmark has it
CONTROLS = "controls"  # the control items of every reported split, against the answerable ones
RISKS = (0.01, 0.05, 0.1, 0.2)  # coverage at these selective risks
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
    "coverage_at_risk_0.2": ("cov@20%", True),
    "risk_at_coverage_0.5": ("risk@50%", True),
    "risk_at_coverage_0.8": ("risk@80%", True),
}
SELECTIVE_KEYS = tuple(k for k in COLUMNS if k.startswith(("auroc", "aurc", "cov", "risk")))
# per (predictor, score): the selective columns plus control detection
SCORE_COLUMNS = {
    "aurc": ("AURC %", True),
    "coverage_at_risk_0.05": ("cov@5%", True),
    "coverage_at_risk_0.1": ("cov@10%", True),
    "coverage_at_risk_0.2": ("cov@20%", True),
    "auroc": ("AUROC err", False),
    "auroc_control": ("AUROC ctrl", False),
}
BMA_TS = "IVON BMA + TS"


def key(predictor: str, score: str) -> str:
    """The name of a (predictor, score) pair in results.json."""
    return f"{predictor} | {score}"


def ensemble_name(cfg: ReportConfig) -> str | None:
    """Row name of the AdamW deep ensemble (None when ensemble_size is 1: not reported)."""
    return f"AdamW ensemble ({cfg.ensemble_size})" if cfg.ensemble_size > 1 else None


def ensemble_seeds(cfg: ReportConfig, seed: int) -> list[int]:
    """AdamW seeds of report seed `seed`'s ensemble: seed, seed + 100, seed + 200, ..."""
    return [seed + 100 * i for i in range(cfg.ensemble_size)]


@dataclass
class Scored:
    """One predictor on one split: probabilities, optional samples and its confidence scores."""

    probs: np.ndarray  # (n, C) predictive probabilities
    samples: np.ndarray | None  # (n, K, C) per-sample (or per-member) probabilities
    labels: np.ndarray  # (n,)
    n_choices: np.ndarray  # (n,)
    families: np.ndarray  # (n,)
    p_control: np.ndarray | None = None  # (n,) the control probe's P(control) (None: no probe)
    control_power: float = 1.0  # "answerable"'s power on 1 - P(control), chosen on calib

    @property
    def correct(self) -> np.ndarray:
        return correctness(self.probs, self.labels, self.n_choices)

    @property
    def control(self) -> np.ndarray:
        """(n,) bool: control items (family "control": no answer is in the audio)."""
        return np.asarray(self.families) == "control"

    def nll_items(self) -> np.ndarray:
        """-log p(label) per item (n,)."""
        p = self.probs[np.arange(len(self.labels)), self.labels]
        return -np.log(np.maximum(p, NLL_FLOOR))

    def score(self, kind: str, lam: float = 0.0) -> np.ndarray:
        """Confidence score (n,): "maxprob" of `probs`, or a sample score of `samples`."""
        if kind == "maxprob":
            return confidence(self.probs)
        if kind == "answerable":
            if self.p_control is None:
                raise ValueError("the answerable score needs the control probe's p_control")
            return answerable(confidence(self.probs), self.p_control, self.control_power)
        if self.samples is None:
            raise ValueError(f"the {kind} score needs per-sample probabilities")
        return score_values(self.samples, kind, risk_lambda=lam)


def predictor_names(cfg: ReportConfig) -> list[str]:
    """Row names of the metrics table, in order."""
    names = ["IVON mean"] + [f"IVON BMA K={k}" for k in cfg.samples] + [BMA_TS]
    names += ["AdamW", "AdamW + TS"]
    return names + ([ensemble_name(cfg)] if ensemble_name(cfg) else [])


def sample_predictors(cfg: ReportConfig) -> list[str]:
    """Predictors with samples (the sample scores apply to them)."""
    out = [f"IVON BMA K={k}" for k in cfg.samples if k > 1]
    return out + ([ensemble_name(cfg)] if ensemble_name(cfg) else [])


def selective_entries(cfg: ReportConfig, probe: bool = False) -> list[tuple[str, str]]:
    """(predictor, score) pairs whose thresholds are calibrated and whose ranking is reported
    (`probe`: with the control probe's "answerable" score for every predictor)."""
    pairs = [(name, "maxprob") for name in predictor_names(cfg)]
    pairs += [(n, s) for n in sample_predictors(cfg) for s in SAMPLE_SCORES]
    return pairs + ([(n, s) for n in predictor_names(cfg) for s in PROBE_SCORES] if probe else [])


def build_predictors(
    cfg: ReportConfig,
    ivon: SplitPredictions,
    adamw: SplitPredictions,
    temperature: float,
    bma_temperature: float,
    members: Sequence[SplitPredictions] = (),
    p_control: np.ndarray | None = None,
) -> dict[str, Scored]:
    """Every predictor of the table on one split of one seed (`members`: the ensemble's AdamW
    runs, the seed's own first; `p_control`: the control probe's (n,) P(control) of the split's
    items, the same for every predictor)."""
    if p_control is not None and len(p_control) != len(ivon.labels):
        raise ValueError(f"p_control has {len(p_control)} items, the split {len(ivon.labels)}")
    meta = (ivon.labels, ivon.n_choices, ivon.families, p_control)
    for other in (adamw, *members):
        if not np.array_equal(ivon.labels, other.labels):
            raise ValueError("IVON and AdamW predictions are not on the same items")
    out = {"IVON mean": Scored(ivon.mean_probs, None, *meta)}
    for k in cfg.samples:
        out[f"IVON BMA K={k}"] = Scored(ivon.bma(k), ivon.sample_probs[:, :k], *meta)
    main = ivon.bma(cfg.main_samples)
    out[BMA_TS] = Scored(apply_temperature(main, bma_temperature, ivon.n_choices), None, *meta)
    out["AdamW"] = Scored(adamw.mean_probs, None, *meta)
    out["AdamW + TS"] = Scored(
        apply_temperature(adamw.mean_probs, temperature, adamw.n_choices), None, *meta
    )
    name = ensemble_name(cfg)
    if name:
        if len(members) != cfg.ensemble_size:
            raise ValueError(f"{name} needs {cfg.ensemble_size} members, got {len(members)}")
        stack = np.stack([m.mean_probs for m in members], axis=1)  # (n, M, C)
        out[name] = Scored(stack.mean(1), stack, *meta)
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


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def selective_metrics(
    conf: np.ndarray, correct: np.ndarray, control: np.ndarray | None = None
) -> dict[str, float | None]:
    """AUROC, AURC, coverage at RISKS and risk at COVERAGES of any confidence score, and with
    `control` the AUROC of telling control items apart from answerable ones."""
    out: dict[str, float] = {"auroc": auroc(conf, correct), "aurc": aurc(conf, correct)}
    for r in RISKS:
        out[f"coverage_at_risk_{r:g}"] = coverage_at_risk(conf, correct, r)
    for c in COVERAGES:
        out[f"risk_at_coverage_{c:g}"] = risk_at_coverage(conf, correct, c)
    if control is not None:
        out["auroc_control"] = control_auroc(conf, control)
        out["n_control"] = int(np.sum(control))
    return {k: (v if isinstance(v, int) else _finite(v)) for k, v in out.items()}


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


# per-item arrays the bootstrap resamples: (score, correct, -log p(label), max prob, control)
def _items(s: Scored, conf: np.ndarray) -> tuple[np.ndarray, ...]:
    return (conf, s.correct, s.nll_items(), confidence(s.probs), s.control)


def _ece(pconf: np.ndarray, correct: np.ndarray) -> float:
    bins = reliability_bins(np.clip(pconf, 0.0, 1.0), correct, 15)
    full = bins.count > 0
    return float((bins.count[full] * bins.gap[full]).sum() / len(correct))


# metric of one predictor's per-item arrays (as `_items` packs them), for the paired bootstrap
BOOT_METRICS = {
    "aurc": lambda c, ok, nll, pc, ctl: aurc(c, ok),
    "coverage_at_risk_0.1": lambda c, ok, nll, pc, ctl: coverage_at_risk(c, ok, 0.1),
    "nll": lambda c, ok, nll, pc, ctl: float(nll.mean()),
    "ece": lambda c, ok, nll, pc, ctl: _ece(pc, ok),
    "auroc_control": lambda c, ok, nll, pc, ctl: control_auroc(c, ctl),
}


def comparisons(cfg: ReportConfig, probe: bool = False) -> list[tuple[str, str]]:
    """(a, b) pairs whose differences get paired bootstrap intervals; "served" is the IVON
    predictor and score chosen on calib for each seed. With the control probe, the served one
    is also compared with AdamW + TS gated by the same probe (what AdamW could serve)."""
    main = f"IVON BMA K={cfg.main_samples}"
    pairs = [("served", key("AdamW + TS", "maxprob")), ("served", key("AdamW", "maxprob"))]
    if probe:
        pairs.append(("served", key("AdamW + TS", "answerable")))
    if ensemble_name(cfg):
        pairs.append(("served", key(ensemble_name(cfg), "maxprob")))
    return [*pairs, (key(main, "maxprob"), key("AdamW + TS", "maxprob"))]


def served_candidates(
    cfg: ReportConfig, calib: dict[str, Scored], lambdas: dict[str, float], t_bma: float
) -> list[dict]:
    """What IVON can serve at the served K, each measured on calib (AURC of the score, NLL of
    the probabilities shown; "answerable" only when the split has the probe's p_control)."""
    main = f"IVON BMA K={cfg.main_samples}"
    options = [(main, "maxprob", None, 0.0), (BMA_TS, "maxprob", t_bma, 0.0)]
    if cfg.main_samples > 1:
        options.append((main, "risk_averse", None, lambdas[main]))
        options.append((main, "mutual_information", None, 0.0))
    if calib[main].p_control is not None:  # the control probe's gate on both BMA predictors
        options += [(main, "answerable", None, 0.0), (BMA_TS, "answerable", t_bma, 0.0)]
    out = []
    for pred, score, temp, lam in options:
        s = calib[pred]
        out.append(
            {
                "predictor": pred,
                "score": score,
                "temperature": temp,
                "risk_lambda": lam,
                "control_power": s.control_power if score in PROBE_SCORES else 1.0,
                "aurc": float(aurc(s.score(score, lam), s.correct)),
                "nll": float(s.nll_items().mean()),
            }
        )
    return out


def _score_one_seed(
    cfg: ReportConfig,
    preds: dict,
    seed: int,
    splits: Sequence[str],
    p_control: dict[str, np.ndarray] | None = None,
) -> dict:
    """Everything of one seed: scored predictors per split, lambdas, temperatures, decision."""
    cal_adam = preds[("adamw", seed, "calib")]
    cal_ivon = preds[("ivon", seed, "calib")]
    temp = fit_temperature(cal_adam.mean_probs, cal_adam.labels, cal_adam.n_choices)
    t_bma = fit_temperature(cal_ivon.bma(cfg.main_samples), cal_ivon.labels, cal_ivon.n_choices)
    members = ensemble_seeds(cfg, seed) if ensemble_name(cfg) else []
    scored = {
        sp: build_predictors(
            cfg,
            preds[("ivon", seed, sp)],
            preds[("adamw", seed, sp)],
            temp,
            t_bma,
            [preds[("adamw", m, sp)] for m in members],
            None if p_control is None else p_control[sp],
        )
        for sp in ("calib", *splits)
    }
    lambdas, lambda_aurc = {}, {}
    for n in predictor_names(cfg):
        if n in sample_predictors(cfg):
            cal = scored["calib"][n]
            lambdas[n], lambda_aurc[n] = choose_lambda(cal.samples, cal.correct, cfg.risk_lambdas)
        else:
            lambdas[n] = 0.0
    powers, power_aurc = {}, {}
    if p_control is not None:  # the answerable score's power per predictor, on calib
        for n in predictor_names(cfg):
            cal = scored["calib"][n]
            powers[n], power_aurc[n] = choose_power(
                confidence(cal.probs), cal.p_control, cal.correct, cfg.control_powers
            )
            for sp in scored:
                scored[sp][n].control_power = powers[n]
    candidates = served_candidates(cfg, scored["calib"], lambdas, t_bma)
    chosen = choose_served(candidates)
    chosen["key"] = key(chosen["predictor"], chosen["score"])
    return {
        "scored": scored,
        "temperature": temp,
        "bma_temperature": t_bma,
        "lambdas": lambdas,
        "lambda_aurc": lambda_aurc,
        "control_power": powers,
        "control_power_aurc": power_aurc,
        "decision": {**chosen, "candidates": candidates, "chosen_on": "calib"},
    }


def score_seeds(
    cfg: ReportConfig,
    preds: dict,
    splits: Sequence[str] = SPLITS,
    p_control: dict[str, np.ndarray] | None = None,
) -> tuple[dict, dict, dict, dict]:
    """Every predictor and score of every seed on every split, from the cached predictions
    `preds` ({(optimizer, seed, split): SplitPredictions}, the ensemble's extra AdamW runs under
    their own seeds) and, when given, the control probe's P(control) per split ({split: (n,)},
    calib included): (per-seed metrics, AdamW temperature per seed, per-seed thresholds with
    their realised risk, per-item arrays pooled over seeds for plots and the bootstrap)."""
    names = predictor_names(cfg)
    entries = selective_entries(cfg, probe=p_control is not None)
    per_seed: dict[str, dict] = {}
    temperatures: dict[str, float] = {}  # AdamW + TS (IVON BMA + TS: per_seed "temperature")
    thresholds_seed: dict[str, dict] = {}
    sets = (*splits, CONTROLS)
    keys = [key(n, score) for n, score in entries]
    pooled: dict[str, dict[str, list]] = {sp: {} for sp in sets}
    for seed in cfg.seeds:
        one = _score_one_seed(cfg, preds, seed, splits, p_control)
        scored, lambdas, decision = one["scored"], one["lambdas"], one["decision"]
        temperatures[str(seed)] = one["temperature"]
        res: dict = {
            "temperature": {"AdamW + TS": one["temperature"], BMA_TS: one["bma_temperature"]},
            "risk_lambda": lambdas,
            "risk_lambda_calib_aurc": one["lambda_aurc"],
            "control_power": one["control_power"],
            "control_power_calib_aurc": one["control_power_aurc"],
            "decision": decision,
            "control_probe": p_control is not None,
        }
        for sp in splits:
            res[sp] = {
                "metrics": {n: summarize_scored(scored[sp][n], lambdas[n]) for n in names},
                "scores": {},
            }
            for n, score in entries:
                s = scored[sp][n]
                conf = s.score(score, lambdas[n])
                res[sp]["scores"][key(n, score)] = selective_metrics(conf, s.correct, s.control)
                items = _items(s, conf)
                pooled[sp].setdefault(key(n, score), []).append(items)
                pooled[CONTROLS].setdefault(key(n, score), []).append(items)
        res[CONTROLS] = {}
        for k in keys:
            parts = pooled[CONTROLS][k][-len(splits) :]  # this seed's splits
            conf, ctl = (np.concatenate([p[i] for p in parts]) for i in (0, 4))
            res[CONTROLS][k] = {
                "auroc_control": _finite(control_auroc(conf, ctl)),
                "n_control": int(ctl.sum()),
                "n": len(ctl),
            }
        for sp in sets:
            pooled[sp].setdefault("served", []).append(
                _concat(pooled[sp][decision["key"]][-len(splits) :])
                if sp == CONTROLS
                else pooled[sp][decision["key"]][-1]
            )
        per_seed[str(seed)] = res
        thresholds_seed[str(seed)] = _thresholds(cfg, scored, lambdas, entries, splits)
        thresholds_seed[str(seed)]["served"] = thresholds_seed[str(seed)][decision["key"]]
    pooled = {sp: {k: _concat(v) for k, v in by.items()} for sp, by in pooled.items()}
    return per_seed, temperatures, thresholds_seed, pooled


def _concat(parts: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(len(parts[0])))


def _thresholds(
    cfg: ReportConfig,
    scored: dict[str, dict[str, Scored]],
    lambdas: dict[str, float],
    entries: list[tuple[str, str]],
    splits: Sequence[str],
) -> dict:
    """Per (predictor, score): the guaranteed table on calib and its outcome on every split."""
    out = {}
    for n, score in entries:
        cal = scored["calib"][n]
        table = table_to_json(
            calibrate_table(
                cal.score(score, lambdas[n]),
                cal.correct,
                targets=cfg.targets,
                delta=cfg.delta,
                method="sgr",
            )
        )
        entry: dict = {"calibration": table}
        for sp in splits:
            s = scored[sp][n]
            conf, corr = s.score(score, lambdas[n]), s.correct
            entry[sp] = [
                {"max_risk": r, **realised(conf, corr, threshold_for(table, r))}
                for r in cfg.targets
            ]
        out[key(n, score)] = entry
    return out


def bootstrap_differences(cfg: ReportConfig, pooled: dict, probe: bool = False) -> dict:
    """{set: {"a - b": {metric: paired_bootstrap result}}} on items pooled over seeds (each
    seed's items are its own draws: paired by seed and item; `probe`: the scores include the
    control probe's "answerable")."""
    out: dict[str, dict] = {}
    for sp, by in pooled.items():
        out[sp] = {}
        for a, b in comparisons(cfg, probe):
            out[sp][f"{a} - {b}"] = {
                m: paired_bootstrap(fn, by[a], by[b], n_boot=cfg.n_boot, seed=cfg.boot_seed)
                for m, fn in BOOT_METRICS.items()
            }
    return out


def _threshold_rows(cfg: ReportConfig, per_seed_entries: list[dict], splits: Sequence[str]):
    rows = []
    for i, r in enumerate(cfg.targets):
        cal = [e["calibration"]["targets"][i] for e in per_seed_entries]
        row: dict = {
            "max_risk": r,
            "seeds": len(per_seed_entries),
            "feasible_seeds": sum(c["feasible"] for c in cal),
            "feasible_per_seed": [bool(c["feasible"]) for c in cal],
            "coverage_calib": aggregate([c["coverage"] for c in cal]),
        }
        for sp in splits:
            got = [e[sp][i] for e in per_seed_entries]
            row[f"coverage_{sp}"] = aggregate([x["coverage"] for x in got])
            row[f"risk_{sp}"] = aggregate([x["risk"] for x in got])
            row[f"held_{sp}"] = sum(x["risk"] is None or x["risk"] <= r + 1e-12 for x in got)
            row[f"abstain_{sp}"] = aggregate([x["abstain_rate"] for x in got])
        rows.append(row)
    return rows


def summarize_seeds(
    cfg: ReportConfig, per_seed: dict, thresholds_seed: dict, splits: Sequence[str] = SPLITS
) -> dict:
    """Mean and std over seeds of every metric, score, per-family accuracy and threshold."""
    names = predictor_names(cfg)
    seeds = [str(s) for s in cfg.seeds]
    aggregate_metrics = {
        sp: {n: _agg_tree([per_seed[s][sp]["metrics"][n]["overall"] for s in seeds]) for n in names}
        for sp in splits
    }
    probe = bool(per_seed[seeds[0]].get("control_probe"))
    keys = [key(n, sc) for n, sc in selective_entries(cfg, probe)]
    aggregate_scores = {
        sp: {k: _agg_tree([per_seed[s][sp]["scores"][k] for s in seeds]) for k in keys}
        for sp in splits
    }
    aggregate_scores[CONTROLS] = {
        k: _agg_tree([per_seed[s][CONTROLS][k] for s in seeds]) for k in keys
    }
    for sp in (*splits, CONTROLS):  # the served pair of each seed
        src = "scores" if sp != CONTROLS else None
        vals = [
            (per_seed[s][sp][src] if src else per_seed[s][sp])[per_seed[s]["decision"]["key"]]
            for s in seeds
        ]
        aggregate_scores[sp]["served"] = _agg_tree(vals)
    families = sorted(
        {f for sp in splits for f in per_seed[seeds[0]][sp]["metrics"][names[0]]["by_family"]}
    )
    by_family = {
        sp: {
            n: {
                f: aggregate(
                    [
                        per_seed[s][sp]["metrics"][n]["by_family"].get(f, {}).get("accuracy")
                        for s in seeds
                    ]
                )
                for f in families
            }
            for n in names
        }
        for sp in splits
    }
    thr_summary = {
        k: _threshold_rows(cfg, [thresholds_seed[s][k] for s in seeds], splits)
        for k in (*keys, "served")
    }
    return {
        "aggregate": aggregate_metrics,
        "aggregate_scores": aggregate_scores,
        "by_family_accuracy": by_family,
        "thresholds": thr_summary,
    }


def large_k_summary(cfg: ReportConfig, large: dict) -> dict:
    """IVON BMA at K = main_samples and every `cfg.large_samples` size on the splits drawn with
    the largest K (`large`: {(seed, split): SplitPredictions}), the first K samples of one draw
    per seed, so the rows differ only in K: {split: {"IVON BMA K=k": {metric: aggregate}}}, the
    metrics table's columns plus "aurc_mutual_information"."""
    out: dict = {}
    for sp in sorted({sp for _, sp in large}):
        rows = {}
        for k in (cfg.main_samples, *cfg.large_samples):
            per_seed = []
            for seed in cfg.seeds:
                p = large[(seed, sp)]
                s = Scored(p.bma(k), p.sample_probs[:, :k], p.labels, p.n_choices, p.families)
                overall = summarize_scored(s, 0.0)["overall"]
                row = {c: overall.get(c) for c in COLUMNS}
                mi = s.score("mutual_information")
                row["aurc_mutual_information"] = selective_metrics(mi, s.correct)["aurc"]
                per_seed.append(row)
            rows[f"IVON BMA K={k}"] = _agg_tree(per_seed)
        out[sp] = rows
    return out


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
