"""The report's files: PNG plots under <out>/results/ and results.md, both from the results
dict that `recipes.report.run_report` also writes to results.json (every number shown there).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from app.scores import SAMPLE_SCORES
from training.recipes.flow import md_table
from training.recipes.report_scores import (
    BMA_TS,
    COLUMNS,
    CONTROLS,
    SCORE_COLUMNS,
    key,
)

if TYPE_CHECKING:
    from training.recipes.report import ReportConfig


def _pool(pooled: dict, key_: str) -> tuple[np.ndarray, np.ndarray]:
    """(score, correct) of one (predictor, score) pair, items pooled over seeds."""
    items = pooled[key_]
    return items[0], items[1]


def make_plots(cfg: ReportConfig, results: dict, pooled: dict, main: str) -> list[str]:
    """Every PNG of the report under <out>/results/; returns paths relative to <out>."""
    from training.eval import plots

    folder = cfg.out / "results"
    splits = results["splits"]
    shown = ["IVON mean", main, "AdamW", "AdamW + TS"]
    written = []
    for sp in splits:
        scores = {n: _pool(pooled[sp], key(n, "maxprob")) for n in shown}
        written.append(
            plots.reliability_diagram(
                scores, folder / f"reliability_{sp}.png", title=f"{sp}, items pooled over seeds"
            )
        )
        # every predictor's max probability, the sample scores of the served K, and the served
        rc = {n: _pool(pooled[sp], key(n, "maxprob")) for n in results["predictors"]}
        if main != "IVON BMA K=1":
            for score in SAMPLE_SCORES:
                rc[f"{main} {score}"] = _pool(pooled[sp], key(main, score))
        rc["served IVON"] = _pool(pooled[sp], "served")
        gated = key("AdamW + TS", "answerable")  # the same control probe on AdamW
        if gated in pooled[sp]:
            rc["AdamW + TS answerable"] = _pool(pooled[sp], gated)
        written.append(
            plots.risk_coverage_plot(
                rc,
                folder / f"risk_coverage_{sp}.png",
                targets=(0.05, 0.1, 0.2),
                title=f"risk-coverage, {sp}, items pooled over seeds",
            )
        )
        for n, slug in ((main, "ivon"), ("AdamW", "adamw"), ("AdamW + TS", "adamw_ts")):
            conf, corr = scores[n]
            written.append(
                plots.confidence_histogram(
                    conf, corr, folder / f"confidence_{slug}_{sp}.png", title=f"{n}, {sp}"
                )
            )
        # K of the main draw, then the large K where this split has them (their own draw)
        rows = [results["aggregate"][sp][f"IVON BMA K={k}"] for k in cfg.samples]
        large = results.get("large_k", {}).get(sp, {})
        ks = [*cfg.samples, *(k for k in cfg.large_samples if f"IVON BMA K={k}" in large)]
        rows += [large[f"IVON BMA K={k}"] for k in ks[len(cfg.samples) :]]
        values = {m: [r[m]["mean"] for r in rows] for m in ("accuracy", "ece", "nll")}
        agg = results["aggregate"][sp]
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
    ctl = pooled[CONTROLS]
    if ctl["served"][4].any() and not ctl["served"][4].all():  # control score histograms
        shown_ctl = [("served", "served_ivon"), (key("AdamW + TS", "maxprob"), "adamw_ts")]
        if key("AdamW + TS", "answerable") in ctl:
            shown_ctl.append((key("AdamW + TS", "answerable"), "adamw_ts_answerable"))
        for k, slug in shown_ctl:
            conf, control = ctl[k][0], ctl[k][4]
            written.append(
                plots.confidence_histogram(
                    conf,
                    ~control,
                    folder / f"controls_{slug}.png",
                    title=f"{k}: control vs answerable items, all splits",
                    groups=("answerable", "control"),
                )
            )
    bars = {}
    for n in shown:
        bars[n] = {}
        thr = results["thresholds"]["summary"][key(n, "maxprob")]
        at5 = next(t for t in thr if abs(t["max_risk"] - 0.05) < 1e-12)
        for sp in splits:
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
            title=f"{' vs '.join(splits)}, mean over seeds",
        )
    )
    return [str(Path(p).relative_to(cfg.out)) for p in written]


def _fmt(a: dict | None, pct: bool) -> str:
    """'mean ± std' of an aggregate (percent when pct)."""
    if a is None or a["mean"] is None:
        return "n/a"
    scale, digits = (100.0, 1) if pct else (1.0, 3)
    out = f"{scale * a['mean']:.{digits}f}"
    if a["std"] is not None:
        out += f" ± {scale * a['std']:.{digits}f}"
    return out


def _verdict(g: dict) -> str:
    return "n/a" if g["pass"] is None else ("PASS" if g["pass"] else "FAIL")


def _diff(d: dict, pct: bool) -> str:
    """'diff [low, high]' of a bootstrap result, starred when the interval excludes zero."""
    if d["diff"] is None or d["low"] is None:
        return "n/a"
    scale, digits = (100.0, 1) if pct else (1.0, 3)
    out = f"{scale * d['diff']:+.{digits}f} [{scale * d['low']:+.{digits}f}, "
    out += f"{scale * d['high']:+.{digits}f}]"
    return out + (" *" if d["counts"] else "")


def _benchmark_line(bench: dict | None) -> str:
    """'- Benchmark: ...': the folder, seed, fingerprint and where the recordings came from."""
    if not bench:
        return "- Benchmark: not recorded (a report written before format 4)."
    kind = (
        f"synthetic signals plus real recordings from {len(bench['packages'])} Debian packages "
        f"({', '.join(bench['packages'])})"
        if bench["real_sources"]
        else "synthetic signals only"
    )
    return (
        f"- Benchmark: `{bench['data_dir']}`, seed {bench['seed']}, fingerprint "
        f"{bench['fingerprint'][:16]}: {kind}."
    )


def _header(results: dict) -> list[str]:
    st = results["settings"]
    m = results["machine"]
    seeds = st["seeds"]
    items = ", ".join(
        f"{sp} {n} ({results.get('controls', {}).get(sp, 0)} controls)"
        for sp, n in results["items"].items()
    )
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
        "mean ± sample std (ddof 1) over seeds unless it says pooled.",
        _benchmark_line(results.get("benchmark")),
        f"- Items: {items}; choices per item: {', '.join(map(str, results['n_choices']))}.",
        f"- Reported splits: {', '.join(results['splits'])}; `calib` only fits temperatures, "
        "lambdas, thresholds and the served choice.",
        f"- {st['main_predictor']} is the served K; the served IVON predictor and score are "
        'chosen on calib per seed (section "Served choice").',
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
        lines.append(f"- **{_verdict(g)}** ({g['split']}) {g['goal']}: {g['detail']}")
    return lines


def _metrics_tables(results: dict) -> list[str]:
    lines = [
        "",
        "## Metrics",
        "",
        "Percent columns are rates x 100. ECE and MCE use 15 equal-width bins; NLL in nats; AURC",
        "is the mean selective risk over all coverages; cov@r% is the largest coverage whose",
        "empirical selective risk is at most r (chosen on the evaluated split itself, as in the",
        "literature; the guaranteed thresholds below are chosen on calib instead). Confidence",
        "here is the max probability of each predictor.",
    ]
    cols = list(COLUMNS)
    for sp in results["splits"]:
        lines += ["", f"### {sp}", ""]
        rows = [
            [n] + [_fmt(results["aggregate"][sp][n][c], COLUMNS[c][1]) for c in cols]
            for n in results["predictors"]
        ]
        lines += md_table(["predictor"] + [COLUMNS[c][0] for c in cols], rows)
    return lines


def _large_k_tables(results: dict) -> list[str]:
    """IVON BMA at the large K, on the splits they were drawn on (none: no section)."""
    large = results.get("large_k") or {}
    if not large:
        return []
    cols = ["accuracy", "ece", "nll", "brier", "aurc", "coverage_at_risk_0.05"]
    cols += ["coverage_at_risk_0.1", "coverage_at_risk_0.2"]
    lines = [
        "",
        "## IVON BMA at larger K",
        "",
        "Drawn on " + ", ".join(f"`{sp}`" for sp in large) + " only, one draw of "
        f"K = {max(results['settings']['large_samples'])} per seed; each row averages its first "
        "K samples, so the rows differ only in K (the "
        f"{results['settings']['main_predictor']} row here comes from this draw). "
        "Confidence is the max probability; MI AURC ranks by minus the mutual information.",
    ]
    for sp, rows in large.items():
        lines += ["", f"### {sp}", ""]
        body = [
            [n]
            + [_fmt(agg[c], COLUMNS[c][1]) for c in cols]
            + [_fmt(agg["aurc_mutual_information"], True)]
            for n, agg in rows.items()
        ]
        lines += md_table(["predictor"] + [COLUMNS[c][0] for c in cols] + ["MI AURC %"], body)
    return lines


def _score_tables(results: dict) -> list[str]:
    lam = ", ".join(f"{x:g}" for x in results["settings"]["risk_lambdas"])
    lines = [
        "",
        "## Scores: max probability, risk-averse, mutual information",
        "",
        "Same predictions, different rankings for abstention. risk_averse = mean - lambda x std "
        "over the samples (ensemble: members) of the chosen option's probability, lambda from "
        f"{{{lam}}} by lowest AURC on calib per predictor and seed; mutual_information ranks by "
        "minus the samples' mutual information (pure disagreement). AUROC err: telling right "
        "from wrong answers; AUROC ctrl: telling answerable items from control items (silence, "
        "noise, unrelated audio), higher score = answerable. `served` is each seed's choice.",
    ]
    probe = results.get("control_probe") or {}
    if probe.get("fitted"):
        powers = ", ".join(f"{x:g}" for x in results["settings"].get("control_powers", []))
        auroc = ", ".join(
            f"{sp} {v:.3f}" for sp, v in probe.get("auroc_control", {}).items() if v is not None
        )
        lines += [
            "",
            "answerable = max probability x (1 - P(control)) ^ power, P(control) from the "
            f"control probe (a logistic regression on the layer-{probe['layer']} states of the "
            f"audio, fitted on {probe['fitted_on']}: {probe['n']} items, {probe['n_control']} "
            f"controls), power from {{{powers}}} by lowest calib AURC per predictor and seed. "
            "The probe reads states below the LoRA layers, so it is the same for every "
            "optimizer and seed; its own control AUROC (P(control) alone): "
            f"{auroc}.",
        ]
    elif probe:
        lines += ["", f"No control probe: {probe.get('why')}."]
    cols = list(SCORE_COLUMNS)
    for sp in (*results["splits"], CONTROLS):
        agg = results["aggregate_scores"][sp]
        use = cols if sp != CONTROLS else ["auroc_control"]
        title = sp if sp != CONTROLS else "controls (the control items of every split)"
        lines += ["", f"### {title}", ""]
        rows = [[k] + [_fmt(agg[k].get(c), SCORE_COLUMNS[c][1]) for c in use] for k in agg]
        lines += md_table(["predictor | score"] + [SCORE_COLUMNS[c][0] for c in use], rows)
    return lines


def _served_section(results: dict) -> list[str]:
    lines = [
        "",
        "## Served choice",
        "",
        "Per seed, on calib only: the IVON candidates at the served K (max probability, with "
        "and without temperature, risk-averse, mutual information, and with the control probe "
        "the answerable score with and without temperature) ranked by calib AURC; equal AURC "
        "goes to the lower calib NLL. `quaver report --write-decision` stores the choice, its "
        "temperature, lambda, power and threshold table (and the control probe) in the IVON "
        "posterior's quaver.json, and "
        'the server then answers with that score (docs/architecture.md, "Served score").',
        "",
    ]
    rows = []
    for seed, d in results["decision"].items():
        cands = ", ".join(
            f"{c['predictor']} {c['score']} {100 * c['aurc']:.2f}" for c in d["candidates"]
        )
        t = "-" if d["temperature"] is None else f"{d['temperature']:.3f}"
        served = d["key"].replace(" | ", " ")  # "predictor | score": a pipe would split the cell
        power = f"{d['control_power']:g}" if d["score"] == "answerable" else "-"
        rows.append([seed, served, t, f"{d['risk_lambda']:g}", power, cands])
    head = ["seed", "served", "T", "lambda", "power", "calib AURC % of each candidate"]
    lines += md_table(head, rows)
    return lines


BOOT_SHOWN = (
    ("aurc", "AURC %", True),
    ("coverage_at_risk_0.1", "cov@10%", True),
    ("nll", "NLL", False),
    ("ece", "ECE %", True),
    ("auroc_control", "AUROC ctrl", False),
)


def _bootstrap_section(results: dict) -> list[str]:
    st = results["settings"]
    lines = [
        "",
        "## Differences with paired bootstrap intervals",
        "",
        f"a - b with a {st['bootstrap']} interval ({st['n_boot']} resamples of the items; "
        "every seed's items enter as their own). * = the interval excludes zero: only those "
        "differences count. Lower is better for AURC, NLL and ECE; higher for cov@10% and "
        "AUROC ctrl.",
    ]
    for sp, by in results["bootstrap"].items():
        lines += ["", f"### {sp}", ""]
        rows = [[pair] + [_diff(by[pair][m], pct) for m, _, pct in BOOT_SHOWN] for pair in by]
        lines += md_table(["a - b"] + [t for _, t, _ in BOOT_SHOWN], rows)
    return lines


def _family_tables(results: dict) -> list[str]:
    main = results["settings"]["main_predictor"]
    shown = ["IVON mean", main, "AdamW", "AdamW + TS"]
    lines = ["", "## Accuracy per family (%)"]
    for sp in results["splits"]:
        fams = results["by_family_accuracy"][sp][shown[0]]
        lines += ["", f"### {sp}", ""]
        rows = [
            [f] + [_fmt(results["by_family_accuracy"][sp][n][f], True) for n in shown] for f in fams
        ]
        lines += md_table(["family", *shown], rows)
    return lines


def _threshold_tables(results: dict) -> list[str]:
    st = results["settings"]
    main = st["main_predictor"]
    splits = results["splits"]
    lines = [
        "",
        "## Guaranteed-risk thresholds",
        "",
        f"Per seed and (predictor, score), thresholds are chosen on calib by SGR (Clopper-Pearson "
        f"bound, confidence {1 - st['delta']:.2f} per target, union bound over the probed "
        "thresholds); the service abstains iff score < threshold. A target no threshold meets "
        "on calib means abstain always (risk n/a, counted as held). Held = seeds whose realised "
        "selective risk is at most the target. The guarantee allows a failure with probability "
        f"{st['delta']:g} per target and seed. Temperatures are fitted on the same calib.",
    ]
    shown = [key(n, "maxprob") for n in ("IVON mean", main, BMA_TS, "AdamW", "AdamW + TS")]
    shown.append("served")
    header = ["target", "feasible", "cov calib %"]
    for sp in splits:
        header += [f"cov {sp} %", f"risk {sp} %", f"held {sp}"]
    for k in shown:
        rows = []
        for t in results["thresholds"]["summary"][k]:
            row = [
                f"{100 * t['max_risk']:g}%",
                f"{t['feasible_seeds']}/{t['seeds']}",
                _fmt(t["coverage_calib"], True),
            ]
            for sp in splits:
                row += [
                    _fmt(t[f"coverage_{sp}"], True),
                    _fmt(t[f"risk_{sp}"], True),
                    f"{t[f'held_{sp}']}/{t['seeds']}",
                ]
            rows.append(row)
        lines += ["", f"### {k}", ""]
        lines += md_table(header, rows)
    return lines


def _shape_section(results: dict) -> list[str]:
    """Per run: how far it moved (training.eval.posterior_shape)."""
    shapes = results.get("posterior_shape")
    if not shapes:
        return []
    lines = [
        "",
        "## How far each run moved",
        "",
        "dW = scale * B @ A summed over the adapted layers, its change from the adapter the run "
        "started from (Frobenius norm, and relative to the norm of the start's dW), and for IVON the last "
        "epoch's Hessian: median h / h0 - 1, the share of entries that moved more than 1 %, and "
        "the posterior std's median. A Hessian that never left hess_init is a prior, not a "
        "posterior shaped by the data. Sample spread: the RMS over 8 weight samples of "
        "||dW(sample) - dW(mean)||, how far the served samples lie from the mean (IVON only).",
        "",
        "| run | seed | dW change (Frobenius) | relative | sample spread | h median "
        "| h/h0 - 1 (median) | moved > 1 % | std median |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for which, by_seed in shapes.items():
        for seed, sh in by_seed.items():
            u, h = sh["update"], sh.get("hessian") or {}
            rel = "-" if u["dw_rel"] is None else f"{u['dw_rel']:.3f}"
            spread = "-" if u.get("sample_spread") is None else f"{u['sample_spread']:.4g}"
            hess = (
                f"{h['h_median']:.3g} | {h['rel_change_median']:+.3f} | "
                f"{100 * h['frac_changed']:.1f} % | {h['std_median']:.3g}"
                if h
                else "- | - | - | -"
            )
            lines.append(f"| {which} | {seed} | {u['dw_fro']:.4g} | {rel} | {spread} | {hess} |")
    return lines


def render_markdown(results: dict) -> str:
    """docs/results.md from the results dict (every number also in results.json)."""
    lines = _header(results)
    lines += _metrics_tables(results)
    lines += _large_k_tables(results)
    lines += _score_tables(results)
    lines += _served_section(results)
    lines += _bootstrap_section(results)
    lines += _family_tables(results)
    lines += _threshold_tables(results)
    lines += _shape_section(results)
    temps = results["temperature"]
    bma = {s: d["temperature"][BMA_TS] for s, d in results["per_seed"].items()}
    lines += [
        "",
        "## Temperature scaling",
        "",
        "softmax(log p / T), T minimising the NLL on calib. AdamW + TS: "
        + ", ".join(f"seed {s}: T = {t:.3f}" for s, t in temps.items())
        + f". {BMA_TS} (p = the served K's averaged probabilities): "
        + ", ".join(f"seed {s}: T = {t:.3f}" for s, t in bma.items())
        + ".",
        "",
        "## Plots",
        "",
        "Items are pooled over seeds in the reliability, risk-coverage and histogram plots; the "
        "K and shift plots show means over seeds. controls_*.png: the score of answerable and "
        "of control items, all splits.",
        "",
    ]
    for p in results["plots"]:
        lines.append(f"![{Path(p).stem}]({p})")
    lines += ["", "## Runs", ""]
    for which, per in results["runs"].items():
        lines.append(f"- {which}: " + ", ".join(f"seed {s}: `{p}`" for s, p in per.items()))
    return "\n".join(lines) + "\n"
