"""The real-sounds goals of the embedded default as PASS/FAIL rows, from the served summaries.

    rows = shipping_goals(summary["served"]["ivon"])   # [{goal, split, pass, blocks, detail}]
    ships = not blocking(rows)                         # the rows that hold a run back

`quaver default` stores the rows in its summary and the report renders them, so the decision to
ship a default trained on the real mix is read from the run itself. The goals (docs/real_sounds.md):
- `test_real` (recordings of packages never heard in training): every family with at least
  `min_items` items above chance, one-sided exact binomial p < `p_max`;
- at the service's default risk target, `test_real` coverage at least `min_coverage`, and the
  realised selective risk within the target the threshold guarantees;
- control items (silence, noise, unrelated audio) withheld at least `min_abstention` of the time
  at the default target, on every split that has them;
- accuracy over the synthetic families of `test` at least `min_synthetic` (the synthetic
  default's IVON figure), for the served predictor.
`pass` is None where a goal cannot be checked (a split the run lacks).

Two kinds of row. `blocks: True` rows guard what users of the service have today, measured
against the default shipped now on the same items (`versus`, from training.eval.served.versus,
paired bootstrap 95 % intervals): a candidate ships only if it withholds the control items no
less often and answers the synthetic families no worse (neither difference's interval wholly
below zero), answers `test_real` better (the interval wholly above zero), and its realised risk
on `test_real` stays within the guaranteed target. The issue's full bar (every family above
chance, the coverage target, controls >= 90 %, synthetic >= 66 %) is reported as rows that do
not block: a failure keeps the issue open, but not a better default from users. Why compare
with the shipped default rather than block on the fixed bars: on 92 control items and 243
synthetic items, 90 % and 66 % are each within a few items of what one run of the same recipe
gets or misses (docs/real_sounds.md), so a fixed bar ships or holds a run by chance. Without a
shipped default to compare with (`versus` None), the fixed bars block instead.
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
                "blocks": False,
                "detail": f"{pct(v['accuracy'])} vs chance {pct(v['chance'])}, "
                f"p = {v['p_value']:.1e}, n = {v['n']}",
            }
        )
    return rows


def _target_rows(real: dict, min_coverage: float) -> list[dict]:
    d = real["default_target"]
    where = f"target {d['max_risk']:g} (guaranteed by {d['guaranteed_by']})"
    risk = "no answers" if d["risk"] is None else f"risk {pct(d['risk'])}"
    return [
        {
            "goal": f"coverage >= {pct(min_coverage)} at the default target",
            "split": "test_real",
            "pass": d["coverage"] >= min_coverage,
            "blocks": False,
            "detail": f"{where}: coverage {pct(d['coverage'])}",
        },
        {
            # no answers at all is no breach of the guarantee (and fails the coverage row)
            "goal": "realised risk within the default target",
            "split": "test_real",
            "pass": d["within_target"] is not False,
            "blocks": True,
            "detail": f"{where}: {risk}",
        },
    ]


def _controls_row(split: str, summary: dict, min_abstention: float, blocks: bool) -> dict:
    d, ctl = summary["default_target"], summary["controls_abstention"]
    key = None if d["guaranteed_by"] is None else f"{d['guaranteed_by']:g}"
    # No guarantee at any target: the server abstains on everything, controls included.
    rate = 1.0 if key is None else ctl["targets"].get(key, {}).get("abstention")
    return {
        "goal": f"controls withheld >= {pct(min_abstention)} at the default target",
        "split": split,
        "pass": None if rate is None else rate >= min_abstention,
        "blocks": blocks,
        "detail": f"{pct(rate)} of {ctl['n']}",
    }


# versus rows: (measure, what it says, whether the candidate must be better, splits it is checked on)
VERSUS = (
    ("controls_withheld", "controls withheld", False, ("test", "test_shift", "test_real")),
    ("synthetic_accuracy", "synthetic families' accuracy", False, ("test", "test_shift")),
    ("real_accuracy", "accuracy on real recordings", True, ("test_real",)),
)


def _points(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}"


def _verdict(low: float | None, high: float | None, better: bool) -> bool | None:
    """Must be better: the interval wholly above zero. Must not be worse: not wholly below."""
    if low is None or high is None:
        return None
    return low > 0 if better else not high < 0


def _versus_rows(versus: dict) -> list[dict]:
    rows = []
    for key, what, better, splits in VERSUS:
        for split in splits:
            d = versus.get(split, {}).get(key)
            if d is None and better:  # what the new default is for cannot go unchecked
                d = {"a": None, "b": None, "diff": None, "low": None, "high": None, "n": 0}
            elif d is None:
                continue
            low, high = d["low"], d["high"]
            rows.append(
                {
                    "goal": f"{what}: {'above' if better else 'not below'} the shipped default's",
                    "split": split,
                    "pass": _verdict(low, high, better),
                    "blocks": True,
                    "detail": f"{pct(d['a'])} vs {pct(d['b'])}: {_points(d['diff'])} points "
                    f"[{_points(low)}, {_points(high)}], n = {d['n']}",
                }
            )
    return rows


def shipping_goals(
    served: dict,
    min_items: int = 40,
    p_max: float = 0.01,
    min_coverage: float = 0.30,
    min_abstention: float = 0.90,
    min_synthetic: float = 0.66,
    versus: dict | None = None,
) -> list[dict]:
    """The goals as {goal, split, pass, blocks, detail} rows for one predictor's served
    summaries ({split: served_summary}, `test` with its "synthetic" accuracy) and, when a
    default is shipped, `versus` ({split: training.eval.served.versus(candidate, shipped)})."""
    fixed_bars_block = versus is None
    rows: list[dict] = []
    real = served.get("test_real")
    if real is None:
        rows.append(
            {
                "goal": "test_real goals",
                "split": "test_real",
                "pass": None,
                "blocks": True,
                "detail": "no split",
            }
        )
    else:
        families = _family_rows(real, min_items, p_max)
        rows += [*families, *_target_rows(real, min_coverage)]
    for split, summary in served.items():
        if summary["controls_abstention"]["n"]:
            rows.append(_controls_row(split, summary, min_abstention, fixed_bars_block))
    synth = served.get("test", {}).get("synthetic")
    acc = None if synth is None else synth["accuracy"]
    rows.append(
        {
            "goal": f"synthetic families' accuracy >= {pct(min_synthetic)}",
            "split": "test",
            "pass": None if acc is None else acc >= min_synthetic,
            "blocks": fixed_bars_block,
            "detail": "n/a" if synth is None else f"{pct(acc)} of {synth['n']}",
        }
    )
    return rows + ([] if versus is None else _versus_rows(versus))


def unmet(rows: list[dict] | None) -> list[dict]:
    """The rows that do not pass (failed or not checkable); none when there are no goals."""
    return [r for r in rows or [] if r["pass"] is not True]


def blocking(rows: list[dict] | None) -> list[dict]:
    """The unmet rows that hold a run back from shipping (rows without "blocks" block)."""
    return [r for r in unmet(rows) if r.get("blocks", True)]


def goals_section(rows: list[dict], predictor: str) -> list[str]:
    """Report lines: the rows as a table and whether every goal passed."""
    from training.recipes.flow import md_table

    mark = {True: "PASS", False: "FAIL", None: "n/a"}
    failed, held = unmet(rows), blocking(rows)
    if not failed:
        verdict = "Every goal passes: this run may ship (`quaver default --real-mix`)."
    elif not held:
        verdict = (
            f"{len(failed)} of {len(rows)} goals do not pass, none of them a blocking one: "
            "this run may ship (`quaver default --real-mix`), and the issue's full bar is not met."
        )
    else:
        verdict = (
            f"{len(failed)} of {len(rows)} goals do not pass, {len(held)} of them blocking: "
            "this run does not ship."
        )
    return [
        f"## The real-sounds goals ({predictor}, the served predictor)",
        "",
        verdict,
        "",
        *md_table(
            ["goal", "split", "result", "blocks shipping", "detail"],
            [
                [
                    r["goal"],
                    r["split"],
                    mark[r["pass"]],
                    "yes" if r.get("blocks", True) else "no",
                    r["detail"],
                ]
                for r in rows
            ],
        ),
        "",
    ]
