"""The tiny pipeline end to end, timed: benchmark -> stage 1 -> IVON and AdamW -> evaluation.

    quaver pipeline --work work/tiny     # ~13.5 min on 2 CPU cores; resumes where it stopped
                                         # (the times then cover the resuming invocation only)

Writes `<work>/pipeline.json` (times, test metrics, per-family accuracy against chance) and
`<work>/pipeline.md` with two figures: test accuracy per family (IVON mean, IVON BMA, AdamW,
chance) and stage 1's calib accuracy per family against the step. A family counts as above
chance when its one-sided p-value (`training.eval.metrics.above_chance`) is below `ABOVE_CHANCE_P`.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

from training.recipes.flow import OPTIMIZERS, md_table

ABOVE_CHANCE_P = 0.01
# The tiny recipe's benchmark (docs/tiny_model.md has the runs behind it): 6000 `pretrain` items
# (the benchmark's default is 3000) in which `rhythm` has three times and `order` twice the items
# of each other family: 1500 rhythm, 1000 order, 500 of each of the other seven. With 3000 items,
# `order` and `presence` stopped improving on calib while the train loss kept falling; with more
# items in the default mix, `rhythm` (learned last) stayed at chance.
TINY_SPLIT_SIZES = {"pretrain": 6000}
TINY_PRETRAIN_WEIGHTS = {"rhythm": 3, "order": 2}


def run_pipeline(
    work: Path,
    configs: Path,
    seed: int = 0,
    samples: int = 8,
    split_sizes: dict[str, int] | None = None,
    overrides: dict[str, dict] | None = None,
) -> dict:
    """Run (or resume) every step; returns the summary also written to `<work>/pipeline.json`.

    `split_sizes` overrides the benchmark's split sizes (`TINY_SPLIT_SIZES`, then the benchmark's
    defaults; `pretrain` always has `TINY_PRETRAIN_WEIGHTS`) and `overrides` the stage configs'
    fields ({"pretrain" | "ivon" | "adamw": {field: value}}): the tests run the pipeline at toy
    sizes through the same code.
    """
    from training.config import PretrainConfig, load_config
    from training.data.generate import BenchmarkConfig, generate_benchmark
    from training.recipes.flow import calibrate_and_evaluate, finetune_pair, load_pair, timed
    from training.stages.pretrain import pretrain

    work, configs = Path(work), Path(configs)
    data_dir = work / "data" / "bench"
    times: dict[str, float] = {}
    overrides = overrides or {}
    sizes = {**TINY_SPLIT_SIZES, **(split_sizes or {})}
    bench = BenchmarkConfig(seed=seed, pretrain_weights=TINY_PRETRAIN_WEIGHTS, **sizes)
    timed(times, "data_s", generate_benchmark, bench, data_dir)
    pre = load_config(
        configs / "tiny-pretrain.yaml",
        PretrainConfig,
        {
            **overrides.get("pretrain", {}),
            "data_dir": str(data_dir),
            "out_dir": str(work / "artifacts" / "tiny-base"),
        },
    )
    base = timed(times, "pretrain_s", pretrain, pre)
    dirs = {"data_dir": str(data_dir), "base_dir": str(base)}
    cfgs = load_pair(
        {name: configs / f"tiny-{name}.yaml" for name in OPTIMIZERS},
        {
            name: {
                **overrides.get(name, {}),
                **dirs,
                "out_dir": str(work / "runs" / f"tiny-{name}"),
            }
            for name in OPTIMIZERS
        },
    )
    posts = finetune_pair(cfgs, times)
    t = time.time()
    evals = {
        name: by_split["test"]
        for name, by_split in calibrate_and_evaluate(
            base, posts, data_dir, samples, ("test",), work / "reports", progress=False
        ).items()
    }
    times["evaluate_s"] = time.time() - t
    times["total_s"] = sum(times.values())
    predictors = {
        "IVON mean": evals["ivon"]["mean"],
        f"IVON BMA K={samples}": evals["ivon"].get(f"bma_k{samples}", evals["ivon"]["mean"]),
        "AdamW": evals["adamw"]["mean"],
    }
    summary = {
        "machine": f"{platform.machine()}, {_cpus()} CPU threads",
        "times_s": times,
        "test": {name: r["overall"] for name, r in predictors.items()},
        "by_family": {
            name: {
                fam: {k: m[k] for k in ("n", "accuracy", "chance", "p_above_chance")}
                for fam, m in r["by_family"].items()
            }
            for name, r in predictors.items()
        },
        "stage1_curve": _stage1_curve(base),
        "base": str(base),
        "posteriors": {k: str(v) for k, v in posts.items()},
    }
    (work / "pipeline.json").write_text(json.dumps(summary, indent=2, default=float))
    write_pipeline_report(summary, work / "pipeline.md")
    return summary


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _stage1_curve(base: Path) -> list[dict]:
    """Stage 1's per-epoch log records (step, calib accuracy overall and per family)."""
    from training.stages.loop import read_log
    from training.stages.pretrain import run_dir

    return read_log(run_dir(base))


def families_above_chance(summary: dict, predictor: str) -> tuple[list[str], list[str]]:
    """(families above chance at p < ABOVE_CHANCE_P, the others) for one predictor."""
    fams = summary["by_family"][predictor]
    above = [f for f, m in fams.items() if (m["p_above_chance"] or 1.0) < ABOVE_CHANCE_P]
    return above, [f for f in fams if f not in above]


def write_pipeline_report(summary: dict, path: Path) -> Path:
    """`pipeline.md` with its figures next to it (family_accuracy.png, stage1_curves.png)."""
    from training.eval import plots

    path = Path(path)
    names = list(summary["by_family"])
    fams = list(summary["by_family"][names[0]])
    chance = {f: summary["by_family"][names[0]][f]["chance"] for f in fams}
    plots.family_accuracy_bars(
        {n: {f: m["accuracy"] for f, m in summary["by_family"][n].items()} for n in names},
        chance,
        path.with_name("family_accuracy.png"),
        title="tiny model: test accuracy per family",
    )
    curve = [r for r in summary["stage1_curve"] if "calib_acc_by_family" in r]
    if curve:
        plots.learning_curves(
            [r["step"] for r in curve],
            {
                **{f: [r["calib_acc_by_family"][f] for r in curve] for f in fams},
                "all": [r["calib_acc"] for r in curve],
            },
            path.with_name("stage1_curves.png"),
            title="stage 1: calib accuracy per family",
        )
    t = summary["times_s"]
    lines = [
        "# Tiny pipeline: measured run",
        "",
        f"`quaver pipeline` from an empty work directory on {summary['machine']}:",
        "",
        *md_table(["step", "seconds"], [[k.removesuffix("_s"), f"{v:.0f}"] for k, v in t.items()]),
        "",
        "Test split, overall:",
        "",
        *md_table(
            ["predictor", "accuracy", "chance", "ECE", "NLL"],
            [
                [n, *(f"{m[k]:.3f}" for k in ("accuracy", "chance", "ece", "nll"))]
                for n, m in summary["test"].items()
            ],
        ),
        "",
        "Test accuracy per family (n items; p: one-sided p-value of the accuracy against guessing):",
        "",
    ]
    rows = []
    for f in fams:
        first = summary["by_family"][names[0]][f]
        accs = [f"{summary['by_family'][n][f]['accuracy']:.2f}" for n in names]
        rows.append([f, str(first["n"]), f"{first['chance']:.2f}", *accs])
        rows[-1].append(f"{first['p_above_chance']:.2g}")
    lines += md_table(["family", "n", "chance", *names, f"p ({names[0]})"], rows)
    for name in names:
        above, below = families_above_chance(summary, name)
        lines.append("")
        lines.append(
            f"{name}: above chance (p < {ABOVE_CHANCE_P}) on {len(above)} of {len(fams)} families"
            + (f"; not on {', '.join(below)}." if below else ".")
        )
    lines += ["", "![test accuracy per family](family_accuracy.png)", ""]
    if curve:
        lines += ["![stage 1 calib accuracy per family](stage1_curves.png)", ""]
    path.write_text("\n".join(lines))
    return path
