"""The real-sounds goals of the embedded default as PASS/FAIL rows, from the served summaries.

    rows = shipping_goals(summary["served"]["ivon"])   # [{goal, split, pass, detail}]
    ready = all(r["pass"] for r in rows)

`quaver default` stores the rows in its summary and the report renders them, so the decision to
ship a default trained on the real mix is read from the run itself. The goals (docs/real_sounds.md):
- `test_real` (recordings of packages never heard in training): every family with at least
  `min_items` items above chance, one-sided exact binomial p < `p_max`;
- at the service's default risk target, `test_real` coverage at least `min_coverage` with the
  realised selective risk within the target the threshold guarantees;
- control items (silence, noise, unrelated audio) withheld at least `min_abstention` of the time
  at the default target, on every split that has them;
- accuracy over the synthetic families of `test` at least `min_synthetic` (the shipped synthetic
  default's IVON figure), for the served predictor.
`pass` is None where a goal cannot be checked (a split the run lacks).
"""

from __future__ import annotations

from training.recipes.flow import pct


def _family_rows(real: dict, min_items: int, p_max: float) -> list[dict]:
    rows = []
    for fam, v in real["families"].items():
        enough = v["n"] >= min_items
        rows.append(
            {
                "goal": f"{fam} above chance (p < {p_max:g}, n >= {min_items})",
                "split": "test_real",
                "pass": (v["p_value"] < p_max) if enough else None,
                "detail": f"{pct(v['accuracy'])} vs chance {pct(v['chance'])}, "
                f"p = {v['p_value']:.1e}, n = {v['n']}",
            }
        )
    return rows


def _coverage_row(real: dict, min_coverage: float) -> dict:
    d = real["default_target"]
    ok = d["coverage"] >= min_coverage and d["within_target"] is True
    risk = "no answers" if d["risk"] is None else f"risk {pct(d['risk'])}"
    return {
        "goal": f"coverage >= {pct(min_coverage)} at the default target, risk within it",
        "split": "test_real",
        "pass": ok,
        "detail": f"target {d['max_risk']:g} (guaranteed by {d['guaranteed_by']}): "
        f"coverage {pct(d['coverage'])}, {risk}",
    }


def _controls_row(split: str, summary: dict, min_abstention: float) -> dict:
    d, ctl = summary["default_target"], summary["controls_abstention"]
    key = None if d["guaranteed_by"] is None else f"{d['guaranteed_by']:g}"
    # No guarantee at any target: the server abstains on everything, controls included.
    rate = 1.0 if key is None else ctl["targets"].get(key, {}).get("abstention")
    return {
        "goal": f"controls withheld >= {pct(min_abstention)} at the default target",
        "split": split,
        "pass": None if rate is None else rate >= min_abstention,
        "detail": f"{pct(rate)} of {ctl['n']}",
    }


def shipping_goals(
    served: dict,
    min_items: int = 40,
    p_max: float = 0.01,
    min_coverage: float = 0.30,
    min_abstention: float = 0.90,
    min_synthetic: float = 0.66,
) -> list[dict]:
    """The goals as {goal, split, pass, detail} rows for one predictor's served summaries
    ({split: served_summary}, `test` with its "synthetic" accuracy)."""
    rows: list[dict] = []
    real = served.get("test_real")
    if real is None:
        rows.append(
            {"goal": "test_real goals", "split": "test_real", "pass": None, "detail": "no split"}
        )
    else:
        rows += _family_rows(real, min_items, p_max)
        rows.append(_coverage_row(real, min_coverage))
    for split, summary in served.items():
        if summary["controls_abstention"]["n"]:
            rows.append(_controls_row(split, summary, min_abstention))
    synth = served.get("test", {}).get("synthetic")
    acc = None if synth is None else synth["accuracy"]
    rows.append(
        {
            "goal": f"synthetic families' accuracy >= {pct(min_synthetic)}",
            "split": "test",
            "pass": None if acc is None else acc >= min_synthetic,
            "detail": "n/a" if synth is None else f"{pct(acc)} of {synth['n']}",
        }
    )
    return rows


def unmet(rows: list[dict] | None) -> list[dict]:
    """The rows that do not pass (failed or not checkable); none when there are no goals."""
    return [r for r in rows or [] if r["pass"] is not True]


def goals_section(rows: list[dict], predictor: str) -> list[str]:
    """Report lines: the rows as a table and whether every goal passed."""
    from training.recipes.flow import md_table

    mark = {True: "PASS", False: "FAIL", None: "n/a"}
    failed = unmet(rows)
    verdict = (
        "Every goal passes: this run may ship (`quaver default --real-mix`)."
        if not failed
        else f"{len(failed)} of {len(rows)} goals do not pass: this run does not ship."
    )
    return [
        f"## The real-sounds goals ({predictor}, the served predictor)",
        "",
        verdict,
        "",
        *md_table(
            ["goal", "split", "result", "detail"],
            [[r["goal"], r["split"], mark[r["pass"]], r["detail"]] for r in rows],
        ),
        "",
    ]
