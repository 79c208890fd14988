"""The report's design goals as PASS/FAIL rows, computed from the aggregated results.

    rows = goal_checks(results, "IVON BMA K=8")   # [{goal, split, pass, detail}]

`pass` is None where a goal cannot be checked (a split the benchmark lacks, no control items,
no risk target feasible on calib).
The goals on the served IVON pair use the paired bootstrap intervals of `report_scores`: a
difference counts only when its interval excludes zero.
"""

from __future__ import annotations

from training.recipes.flow import pct
from training.recipes.report_scores import CONTROLS, key


def _m(agg: dict, split: str, pred: str, key_: str) -> tuple[float | None, float | None]:
    a = agg[split][pred][key_]
    return a["mean"], a["std"]


def _interval(d: dict, as_pct: bool = True) -> str:
    if d["low"] is None:
        return "n/a"
    f = pct if as_pct else (lambda x: f"{x:.3f}")
    return f"{f(d['diff'])} [{f(d['low'])}, {f(d['high'])}]"


def goal_checks(results: dict, main: str) -> list[dict]:
    """The design goals as {goal, split, pass, detail} rows (pass None: cannot be checked)."""
    agg = results["aggregate"]
    splits = results["splits"]
    rows = []
    for split in splits:
        ivon_ece, _ = _m(agg, split, main, "ece")
        adam_ece, _ = _m(agg, split, "AdamW", "ece")
        ok = None if None in (ivon_ece, adam_ece) else ivon_ece <= 0.5 * adam_ece
        rows.append(
            {
                "goal": f"{main} ECE <= 0.5 x AdamW ECE",
                "split": split,
                "pass": ok,
                "detail": f"{pct(ivon_ece)} vs 0.5 x {pct(adam_ece)}",
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
                "detail": f"{pct(ia)} vs {pct(aa)} - {pct(spread)}",
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
                "detail": f"{pct(ic)} vs AdamW {pct(ac)}, AdamW + TS {pct(tc)}",
            }
        )
    rows += _served_goals(results)
    thr = results["thresholds"]["summary"][key(main, "maxprob")]
    informative = [t for t in thr if t["feasible_seeds"] > 0]
    rows.append(
        {
            "goal": f"{main} guaranteed thresholds hold on test (risk <= target, every seed)",
            "split": "test",
            "pass": _held(thr, informative),
            "detail": ", ".join(
                f"{t['max_risk']:g}: held {t['held_test']}/{t['seeds']} "
                f"(feasible {t['feasible_seeds']})"
                for t in thr
            ),
        }
    )
    rows.append(
        {
            "goal": f"{main} abstains more on test_shift than on test (every feasible target)",
            "split": "test vs test_shift",
            "pass": all(
                t["abstain_test_shift"]["mean"] > t["abstain_test"]["mean"] for t in informative
            )
            if informative
            else None,
            "detail": ", ".join(
                f"{t['max_risk']:g}: {pct(t['abstain_test']['mean'])} -> "
                f"{pct(t['abstain_test_shift']['mean'])}"
                for t in informative
            )
            or "no target was feasible on calib",
        }
    )
    return rows


def _held(thr: list[dict], feasible: list[dict]) -> bool | None:
    """Whether every target's thresholds held on test on every seed; None (n/a) when no target
    was feasible on any seed: an abstain-always rule holds by definition, so there is nothing to
    check."""
    return all(t["held_test"] == t["seeds"] for t in thr) if feasible else None


def _served_goals(results: dict) -> list[dict]:
    """Goals on the served IVON pair (chosen on calib per seed): shift, real audio, controls,
    and the served thresholds on test."""
    boot = results["bootstrap"]
    ts = key("AdamW + TS", "maxprob")
    cmp = f"served - {ts}"
    rows = []
    for split in ("test_shift", "test_real"):
        if split not in results["splits"]:
            rows.append(
                {
                    "goal": "served IVON AURC < AdamW + TS and coverage at 10% risk higher, "
                    "intervals excluding zero",
                    "split": split,
                    "pass": None,
                    "detail": f"the benchmark has no {split} split",
                }
            )
            continue
        d_aurc, d_cov = boot[split][cmp]["aurc"], boot[split][cmp]["coverage_at_risk_0.1"]
        ok = (
            d_aurc["high"] is not None
            and d_cov["low"] is not None
            and d_aurc["high"] < 0
            and d_cov["low"] > 0
        )
        rows.append(
            {
                "goal": "served IVON AURC < AdamW + TS and coverage at 10% risk higher, "
                "intervals excluding zero",
                "split": split,
                "pass": ok,
                "detail": f"AURC diff {_interval(d_aurc)}, cov@10% diff {_interval(d_cov)}",
            }
        )
    ctl = results["aggregate_scores"][CONTROLS]
    served, base = ctl["served"]["auroc_control"]["mean"], ctl[ts]["auroc_control"]["mean"]
    d = boot[CONTROLS][cmp]["auroc_control"]
    rows.append(
        {
            "goal": "served IVON control AUROC >= 0.9 and > AdamW + TS max-probability's",
            "split": CONTROLS,
            "pass": None if None in (served, base) else served >= 0.9 and served > base,
            "detail": "no control items"
            if None in (served, base)
            else f"{served:.3f} vs {base:.3f}; diff {_interval(d, as_pct=False)}",
        }
    )
    thr = results["thresholds"]["summary"]["served"]
    feasible = [t for t in thr if t["feasible_seeds"] > 0]
    rows.append(
        {
            "goal": "served IVON guaranteed thresholds hold on test (every feasible target, "
            "every seed)",
            "split": "test",
            "pass": _held(thr, feasible),
            "detail": ", ".join(
                f"{t['max_risk']:g}: held {t['held_test']}/{t['seeds']} "
                f"(feasible {t['feasible_seeds']})"
                for t in feasible
            )
            or "no target was feasible on calib",
        }
    )
    return rows
