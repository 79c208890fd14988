"""The embedded default, reproduced end to end: the recipe behind the files in `app/default/`.

    quaver default                      # -> work/default/..., then ships into app/default/
    quaver default --no-ship            # everything but the copy into app/default/
    quaver default --synthetic --no-ship --work work/default-synth  # the earlier synthetic mix

The shipped default is trained on the real-recording mix (`BENCHMARK`, docs/real_sounds.md) and
ships only when the goals that guard today's users pass (`default_goals.blocking`).

Steps (each cached or resumable, so an interrupted run picks up where it stopped):
  1. benchmark (`training.data`, seed 0: the real-recording mix of `BENCHMARK`; without
     `real_mix`, the synthetic families only) into work/default/data/bench
  2. base model assembled from the pinned packages (`quaver build-base`) into artifacts/base
  3. stage 1b (`adapt`): AdamW LoRA on the top 4 decoder layers over `pretrain`
     (configs/default-adapt.yaml; with real_mix, 4 epochs: `REAL_MIX_ADAPT`): the model learns
     to answer from the audio on the broad split.
     The projector keeps its fixed-seed random init: training it alone first (46 min) left
     calib accuracy at chance, and stage 1b reads the answer through the random projector.
  4. stage 2: IVON and AdamW LoRA fine-tuning on `train`, starting from the stage-1b adapter
     (configs/default-{ivon,adamw}.yaml)
  5. guaranteed-risk thresholds on `calib`; metrics on `test`, `test_shift` and `test_real`
     (plots in work/default/reports/), the served rule per split and the shipping goals
     (default_goals.py), and free-form rewordings of the test questions
  6. ship: the IVON posterior + the trained projector (a base overlay, app/overlay.py) + answers
     recorded for a few fixed test clips (`golden.json`, checked by tests/test_default_model.py),
     and the web page's example clips (training/recipes/examples.py, app/static/examples/)
Wall-clock time per step goes to work/default/times.json as each step ends (an interrupted run
keeps them), then to work/default/default.json and the shipped quaver.json.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from training.data.families import DEFAULT_FAMILIES
from training.recipes.default_goals import blocking, goals_section, shipping_goals
from training.recipes.flow import (
    OPTIMIZERS,
    calibrate_and_evaluate,
    finetune_pair,
    load_pair,
    md_table,
    samples_for,
    timed,
)

if TYPE_CHECKING:
    from app.scores import Decision

GOLDEN_FILE = "golden.json"
# The benchmark of `real_mix` (training.data.generate.BenchmarkConfig fields; `DefaultRecipe.sizes`
# overrides any of them; without real_mix the synthetic defaults are used). Real recordings from the training-side
# Debian packages join every split's rotation, and `test_real` holds recordings of packages never
# heard in training (docs/real_sounds.md). The synthetic families keep two slots each in
# `pretrain`'s rotation so that they lose a quarter of their stage-1b items, not half, to the 11
# real families; `pretrain` grows from 3000 to 3600 for the same reason. 8 % of every split are
# control items (silence, noise, unrelated recordings: any answer is a guess), so training sees
# audio with no answer in it and `calib` / `test` measure abstention on it.
BENCHMARK: dict = {
    "real_sources": True,
    "pretrain": 3600,
    "test": 600,
    "test_real": 600,
    "control_fraction": 0.08,
    "pretrain_weights": {name: 2 for name in DEFAULT_FAMILIES},
}
# Stage 1b settings of `real_mix` over configs/default-adapt.yaml's, chosen on `calib` (the
# adapt run logs calib accuracy per epoch; docs/real_sounds.md): with 2 epochs the real mix left
# calib at 55 %, with 4 it reached 59 % after epoch 3 and 60.5 % after epoch 4 (train 74 %, so
# more epochs mostly fit `pretrain`). Each epoch over the cached prefix costs about 4 min here.
# With the source diversity of library version 5: 50.0 / 58.5 / 65.5 / 64.0 % (epoch 3 vs 4 is
# 6 items of 400, within noise; kept at 4).
REAL_MIX_ADAPT: dict = {"epochs": 4}
SPLITS = ("test", "test_shift", "test_real")  # evaluated after calibration on `calib` (test_real:
# only with real_mix)
PROJECTOR_PREFIX = ("model.multi_modal_projector.",)
# Question wordings that none of the benchmark's templates use, per family: the prompt format is
# fixed, but users phrase questions their own way. The choices stay the item's own.
REWORDINGS: dict[str, str] = {
    "count": "Listen carefully: how many separate sound events can you hear in this recording?",
    "order": "Thinking about the sequence of sounds, which option describes it correctly?",
    "pitch_direction": "Over the course of the sound, does its frequency go up, down or neither?",
    "duration": "Comparing how long each sound lasts, which option fits?",
    "loudness": "Judging by volume alone, which option is right?",
    "noise_type": "What kind of background hiss or noise sits under the recording?",
    "rhythm": "How would you describe the timing pattern of the repeated sounds?",
    "presence": "Is the described sound part of this recording?",
    "timing": "At what point in the recording does the sound occur?",
    "distinct_pitches": "How many different notes can be heard?",
}


@dataclass
class DefaultRecipe:
    """Where the default recipe reads and writes; the training settings live in configs/."""

    work: Path = Path("work/default")  # benchmark, runs, prefix cache, reports
    base_dir: Path = Path("artifacts/base")  # assembled base (shared with `quaver serve`)
    configs: Path = Path("configs")  # default-{adapt,ivon,adamw}.yaml
    ship_dir: Path | None = Path("app/default")  # where the shipped files go (None: no ship)
    examples_dir: Path | None = Path("app/static/examples")  # the page's clips (real_mix + ship)
    real_mix: bool = True  # BENCHMARK (real recordings, controls, test_real); False: synthetic only
    report: Path | None = Path("docs/default_model.md")  # per-family results (None: none)
    seed: int = 0  # benchmark seed
    sizes: dict = field(default_factory=dict)  # BenchmarkConfig fields over BENCHMARK's
    samples: int = 8  # K for calibration and evaluation
    golden_items: int = 4  # test clips whose answers are recorded in golden.json
    reworded_per_family: int = 20  # test items per family asked with REWORDINGS
    workers: int = 2  # processes rendering the benchmark

    def __post_init__(self) -> None:
        self.work, self.base_dir, self.configs = (
            Path(self.work),
            Path(self.base_dir),
            Path(self.configs),
        )
        self.ship_dir = None if self.ship_dir is None else Path(self.ship_dir)
        if self.samples < 2 or self.golden_items < 1 or self.reworded_per_family < 1:
            raise ValueError("samples >= 2, golden_items >= 1 and reworded_per_family >= 1")

    @property
    def data_dir(self) -> Path:
        return self.work / "data" / "bench"


def reworded_accuracy(
    base_dir: Path, posterior_dir: Path, data_dir: Path, per_family: int, progress: bool = True
) -> dict:
    """Posterior-mean accuracy on `test` items whose question is replaced by REWORDINGS."""
    from app.predict import Predictor, Request
    from training.data.manifest import load_audio_file, read_manifest

    predictor = Predictor.from_dirs(base_dir, posterior_dir)
    hits: dict[str, list[int]] = {}
    chance: dict[str, float] = {}  # 1 / choices of the family's first item
    for item in read_manifest(Path(data_dir), "test"):
        fam = item.family
        if fam not in REWORDINGS or len(hits.get(fam, [])) >= per_family:
            continue
        chance.setdefault(fam, 1.0 / len(item.choices))
        prepared = predictor.prepare(
            load_audio_file(Path(data_dir), item), REWORDINGS[fam], list(item.choices)
        )
        [pred] = predictor.predict([Request(prepared, samples=1)])
        hits.setdefault(fam, []).append(int(pred.answer_index == item.answer_index))
    out = {
        fam: {"accuracy": float(np.mean(h)), "n": len(h), "chance": chance[fam]}
        for fam, h in sorted(hits.items())
    }
    all_hits = [x for h in hits.values() for x in h]
    out["overall"] = {"accuracy": float(np.mean(all_hits)), "n": len(all_hits)}
    if progress:
        print(f"[default] reworded questions: {json.dumps(out)}", flush=True)
    return out


def record_golden(
    base_dir: Path, posterior_dir: Path, data_dir: Path, n: int, bench_seed: int, clips: Path
) -> dict:
    """Posterior-mean probabilities (as served: with the posterior's decision) for the first `n`
    test items, through a freshly loaded base plus the shipped overlay: what
    tests/test_default_model.py must reproduce. The clips are
    copied into `clips` (the benchmark's real recordings come from Debian packages, so the test
    reads the clips rather than rendering them again)."""
    from app.predict import Predictor, Request
    from training.data.manifest import load_audio_file, read_manifest

    # what the server returns: the posterior's stored decision (temperature) applied
    predictor = Predictor.from_dirs(base_dir, posterior_dir, use_decision=True)
    clips = Path(clips)
    clips.mkdir(parents=True, exist_ok=True)
    items = []
    for index, item in enumerate(read_manifest(Path(data_dir), "test")[:n]):
        prepared = predictor.prepare(
            load_audio_file(Path(data_dir), item), item.question, list(item.choices)
        )
        [pred] = predictor.predict([Request(prepared, samples=1)])
        shutil.copyfile(Path(data_dir) / item.audio, clips / f"{item.id}.wav")
        items.append(
            {
                "split": "test",
                "index": index,
                "audio": f"{clips.name}/{item.id}.wav",
                "family": item.family,
                "question": item.question,
                "choices": list(item.choices),
                "label": item.answer_index,
                "answer_index": pred.answer_index,
                "probabilities": [round(float(p), 6) for p in pred.probs],
            }
        )
    return {"benchmark_seed": bench_seed, "samples": 1, "items": items}


def served_rule(
    base: Path, post: Path, data_dir: Path, splits: tuple[str, ...], prefix_cache: Path | None
) -> tuple[dict, Decision | None, dict[str, np.ndarray] | None]:
    """What a posterior directory serves: (its calibration table, its stored decision or None,
    {split: P(control)} of its control probe or None), as `Predictor.from_dirs` reads them."""
    from app.posterior import META_FILE
    from app.scores import Decision
    from training.eval.control_probe import posterior_p_control

    meta = json.loads((Path(post) / META_FILE).read_text())
    decision = Decision.from_meta(meta) if "decision" in meta else None
    p_control = None
    if decision is not None and decision.needs_probe:
        p_control = posterior_p_control(base, post, data_dir, splits, prefix_cache)
    return meta["calibration"], decision, p_control


def served_results(
    base: Path,
    posts: dict[str, Path],
    data_dir: Path,
    samples: int,
    splits: tuple[str, ...],
    prefix_cache: Path | None = None,
) -> dict[str, dict[str, dict]]:
    """{name: {split: served_summary}}: the server's default-target decisions (with each
    posterior's served score), control abstention and per-family accuracy against chance, from
    the predictions evaluation cached."""
    from training.data.manifest import read_manifest
    from training.eval.predictions import predict_split
    from training.eval.served import served_summary

    out: dict[str, dict[str, dict]] = {}
    for name, post in posts.items():
        k = samples_for(name, samples)
        calibration, decision, p_control = served_rule(base, post, data_dir, splits, prefix_cache)
        for split in splits:
            preds = predict_split(
                base, post, data_dir, split, samples=max(k, 1), prefix_cache=prefix_cache
            )
            items = read_manifest(data_dir, split)
            out.setdefault(name, {})[split] = served_summary(
                preds,
                items,
                calibration,
                k,
                decision=decision,
                p_control=None if p_control is None else p_control[split],
            )
    return out


SHIPPED_BEFORE = "shipped-before"  # <work>/<this>: a copy of the default this run would replace


def versus_shipped(
    recipe: DefaultRecipe, base: Path, candidate: Path, splits: tuple[str, ...]
) -> dict | None:
    """{split: versus(candidate, shipped)} of the served rules on the same items (None when
    nothing is shipped in recipe.ship_dir, or it is this very posterior).

    The shipped default is copied to <work>/shipped-before on the first invocation (its
    predictions are cached there, not in app/default), so a resumed or repeated invocation,
    which may have shipped in between, compares with the same default."""
    from training.data.manifest import read_manifest
    from training.eval.predictions import predict_split
    from training.eval.served import served_items, versus
    from training.stages.loop import save_atomic

    old = recipe.work / SHIPPED_BEFORE
    if not old.exists():
        src = recipe.ship_dir
        weights = "posterior.safetensors"
        if src is None or not (src / weights).exists():
            return None
        if (src / weights).read_bytes() == (Path(candidate) / weights).read_bytes():
            return None
        ignore = shutil.ignore_patterns("predictions", "golden")
        save_atomic(old, lambda tmp: shutil.copytree(src, tmp, ignore=ignore))
    cache = recipe.work / "prefix-cache"
    rules = {p: served_rule(base, p, recipe.data_dir, splits, cache) for p in (candidate, old)}
    out = {}
    for split in splits:
        items = read_manifest(recipe.data_dir, split)
        new_old = []
        for post in (candidate, old):
            calibration, decision, p_control = rules[post]
            preds = predict_split(
                base, post, recipe.data_dir, split, samples=recipe.samples, prefix_cache=cache
            )
            pc = None if p_control is None else p_control[split]
            new_old.append(
                served_items(preds, items, calibration, recipe.samples, None, decision, pc)
            )
        out[split] = versus(*new_old, synthetic=DEFAULT_FAMILIES)
    return out


def synthetic_accuracy(families: dict[str, dict]) -> dict:
    """Accuracy over the synthetic families (DEFAULT_FAMILIES) of a served_summary's table."""
    rows = [v for fam, v in families.items() if fam in DEFAULT_FAMILIES]
    n = sum(v["n"] for v in rows)
    hits = sum(v["accuracy"] * v["n"] for v in rows)
    return {"n": n, "accuracy": hits / n if n else None}


def _pct(x) -> str:
    return "-" if x is None else f"{100 * float(x):.1f}"


def copy_figures(reports: Path, dest: Path) -> list[Path]:
    """Copy `<reports>/<run>-<split>/*.png` (what `evaluate_posterior` drew) to `dest` as
    `<run>-<split>-<plot>.png`, replacing the earlier copies; returns the copies, sorted."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.png"):
        old.unlink()
    out = []
    for png in sorted(Path(reports).glob("*/*.png")):
        target = dest / f"{png.parent.name}-{png.name}"
        shutil.copyfile(png, target)
        out.append(target)
    return out


def served_section(served: dict) -> list[str]:
    """Report lines: the default risk target on every split, controls, test_real vs chance."""
    if not served:
        return []
    lines = [
        "## What the service does at its default risk target",
        "",
        "A request that names no `max_risk` gets the lowest target the calibration table",
        "guarantees with at least 30 % of `calib` answered (`app/thresholds.py`,",
        "`default_risk`). Coverage is the share answered (of all items, and of the answerable",
        "ones); risk is the error rate of the answered items, with its one-sided 95 % upper",
        "bound; controls are silence, noise and unrelated audio (any answer a guess).",
        "",
    ]
    rows = []
    for name, by_split in served.items():
        for split, v in by_split.items():
            d = v["default_target"]
            ctl = v["controls_abstention"]
            key = None if d["guaranteed_by"] is None else f"{d['guaranteed_by']:g}"
            abst = ctl["targets"].get(key, {}).get("abstention") if key else None
            rows.append(
                [
                    name,
                    split,
                    f"{d['max_risk']:g}",
                    _pct(d["coverage"]),
                    _pct(d["coverage_answerable"]),
                    f"{_pct(d['risk'])} (<= {_pct(d['risk_upper_bound'])})",
                    f"{_pct(abst)} of {ctl['n']}",
                ]
            )
    lines += md_table(
        ["predictor", "split", "target", "coverage", "of answerable", "risk", "controls withheld"],
        rows,
    )
    lines.append("")
    for name, by_split in served.items():
        fams = by_split.get("test_real", {}).get("families")
        if not fams:
            continue
        lines += [
            f"## `test_real` against chance ({name}, the served predictor)",
            "",
            "Recordings of packages never heard in training. p: one-sided exact binomial test of",
            "accuracy > chance.",
            "",
        ]
        lines += md_table(
            ["family", "n", "accuracy", "chance", "p"],
            [
                [f, str(v["n"]), _pct(v["accuracy"]), _pct(v["chance"]), f"{v['p_value']:.1e}"]
                for f, v in fams.items()
            ],
        )
        lines.append("")
    return lines


def write_report(summary: dict, path: Path, reports: Path | None = None) -> Path:
    """docs/default_model.md: per-family accuracy and the headline metrics, from `summary`;
    with `reports`, the evaluation's plots are copied to `<path's folder>/<path's stem>/`."""
    res, times = summary["results"], summary["times_s"]
    lines = [
        "# The embedded default: measured results",
        "",
        "Generated by `quaver default` (training/recipes/default.py) on this machine; the same",
        "numbers are in `app/default/quaver.json` under `recipe`. Accuracy in %, chance is",
        "1/(number of choices): 50 % for two-choice families, 25-33 % for the others.",
        "",
        "## Wall-clock time per step (seconds)",
        "",
        "Each step's time when it ran (a step finished by an earlier, interrupted invocation",
        "keeps the time it took then); `total` is their sum, `this_invocation` the wall time of",
        "the invocation that wrote this file.",
        "",
        *md_table(["step", "s"], [[k.removesuffix("_s"), f"{v:.0f}"] for k, v in times.items()]),
        "",
    ]
    for split in SPLITS:
        cols = [
            (name, key) for name in ("ivon", "adamw") for key in res.get(name, {}).get(split, {})
        ]
        if not cols:  # a split this summary has no results for
            continue
        fams = sorted({f for n, k in cols for f in res[n][split][k]["by_family_accuracy"]})
        rows = [
            [fam, *(_pct(res[n][split][k]["by_family_accuracy"].get(fam)) for n, k in cols)]
            for fam in fams
        ]
        for metric in ("accuracy", "ece", "nll", "brier", "aurc", "coverage_at_risk_0.05"):
            vals = [res[n][split][k]["overall"].get(metric) for n, k in cols]
            fmt = (
                _pct
                if metric in ("accuracy", "ece", "aurc", "coverage_at_risk_0.05")
                else (lambda v: "-" if v is None else f"{float(v):.3f}")
            )
            rows.append([f"**{metric}**", *(fmt(v) for v in vals)])
        lines += [f"## Accuracy per family on `{split}`", ""]
        lines += md_table(["family", *(f"{n} {k}" for n, k in cols)], rows)
        lines.append("")
    lines += served_section(summary.get("served", {}))
    if summary.get("goals"):
        lines += goals_section(summary["goals"], "ivon")
    rw = summary["reworded_test_accuracy_ivon_mean"]
    lines += [
        "## Free-form rewordings (IVON posterior mean, `test`)",
        "",
        "Each family's question replaced by one wording none of the benchmark's templates use",
        "(`REWORDINGS` in training/recipes/default.py); the choices stay the item's own.",
        "",
        *md_table(
            ["family", "accuracy", "chance", "n"],
            [
                [fam, _pct(v["accuracy"]), _pct(v.get("chance")), str(v["n"])]
                for fam, v in rw.items()
            ],
        ),
        "",
    ]
    if reports is not None:
        figures = copy_figures(reports, Path(path).with_suffix(""))
        lines += ["## Plots", ""]
        lines += [f"![{f.stem}]({Path(path).stem}/{f.name})" for f in figures]
        lines.append("")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines))
    return Path(path)


def ship(recipe: DefaultRecipe, trained_base: Path, posterior: Path, summary: dict) -> Path:
    """Copy the IVON posterior + the projector of `trained_base` (the base the posterior was
    trained on) as an overlay + golden answers into recipe.ship_dir."""
    from app.modeling import load_checkpoint
    from app.overlay import write_overlay
    from training.stages.loop import save_atomic

    def write(tmp: Path) -> None:
        shutil.copytree(posterior, tmp, ignore=shutil.ignore_patterns("predictions"))  # no caches
        write_overlay(tmp, load_checkpoint(trained_base).model, PROJECTOR_PREFIX, recipe.base_dir)
        golden = record_golden(
            recipe.base_dir, tmp, recipe.data_dir, recipe.golden_items, recipe.seed, tmp / "golden"
        )
        (tmp / GOLDEN_FILE).write_text(json.dumps(golden, indent=2) + "\n")
        meta = json.loads((tmp / "quaver.json").read_text())
        meta["name"] = "quaver-default"
        meta["recipe"] = {"command": "quaver default", **summary}
        (tmp / "quaver.json").write_text(json.dumps(meta, indent=2, default=float) + "\n")

    shipped = save_atomic(Path(recipe.ship_dir), write)
    if recipe.examples_dir is not None and recipe.real_mix:  # the clips need the real families
        from training.recipes.examples import write_examples

        write_examples(recipe.data_dir, Path(recipe.examples_dir))
    return shipped


def _headline(res: dict) -> dict:
    """Overall metrics and per-family accuracy of each predictor of one evaluation."""
    return {
        key: {
            "overall": val["overall"],
            "by_family_accuracy": {
                fam: m["accuracy"] for fam, m in val.get("by_family", {}).items()
            },
        }
        for key, val in res.items()
        if isinstance(val, dict)
    }


def run_default(recipe: DefaultRecipe, progress: bool = True) -> dict:
    """Every step of the recipe; returns the summary also written to work/default/default.json."""
    from training.base.build import build_base
    from training.config import FinetuneConfig, load_config
    from training.data.generate import BenchmarkConfig, generate_benchmark
    from training.eval.predictions import is_cached
    from training.stages.finetune import finetune

    work = recipe.work
    work.mkdir(parents=True, exist_ok=True)
    summary_path = work / "default.json"
    # Each step's time is written as soon as it is known, so an invocation stopped half-way
    # leaves the times of the steps it finished for the next one to report.
    times_path = work / "times.json"
    times: dict[str, float] = {}
    if times_path.exists():
        times = json.loads(times_path.read_text())
    elif summary_path.exists():  # written before times.json existed
        times = json.loads(summary_path.read_text()).get("times_s", {})

    def keep_times() -> None:
        times_path.write_text(json.dumps(times, indent=2) + "\n")

    t0 = time.time()
    bench = BenchmarkConfig(
        seed=recipe.seed,
        workers=recipe.workers,
        **{**(BENCHMARK if recipe.real_mix else {}), **recipe.sizes},
    )
    timed(times, "data_s", generate_benchmark, bench, recipe.data_dir, progress)
    keep_times()
    base = timed(times, "build_base_s", build_base, recipe.base_dir, progress=progress)
    keep_times()
    dirs = {"data_dir": str(recipe.data_dir), "base_dir": str(base)}
    adapt_cfg = load_config(
        recipe.configs / "default-adapt.yaml",
        FinetuneConfig,
        {
            **(REAL_MIX_ADAPT if recipe.real_mix else {}),
            **dirs,
            "out_dir": str(work / "runs" / "adapt"),
        },
    )
    adapted = timed(times, "adapt_s", finetune, adapt_cfg, progress)
    keep_times()
    cfgs = load_pair(
        {name: recipe.configs / f"default-{name}.yaml" for name in OPTIMIZERS},
        {
            name: {**dirs, "out_dir": str(work / "runs" / name), "init_from": str(adapted)}
            for name in OPTIMIZERS
        },
    )
    posts = finetune_pair(cfgs, times, progress)
    keep_times()
    splits = SPLITS if recipe.real_mix else SPLITS[:2]
    t = time.time()
    # Predictions made earlier (by a previous invocation or by `quaver report`) are read back in
    # seconds: the step's time is then the one recorded when it really ran.
    cached = all(
        is_cached(post, recipe.data_dir, split, samples_for(name, recipe.samples))
        for name, post in posts.items()
        for split in ("calib", *splits)
    )
    evals = calibrate_and_evaluate(
        base,
        posts,
        recipe.data_dir,
        recipe.samples,
        splits,
        work / "reports",
        work / "prefix-cache",  # shared by every posterior with LoRA in the same layers
        progress,
    )
    results = {
        name: {split: _headline(res) for split, res in by_split.items()}
        for name, by_split in evals.items()
    }
    served = served_results(
        base, posts, recipe.data_dir, recipe.samples, splits, work / "prefix-cache"
    )
    for by_split in served.values():
        if "test" in by_split:
            by_split["test"]["synthetic"] = synthetic_accuracy(by_split["test"]["families"])
    vs = None
    if recipe.real_mix:  # the shipped default on the same items (computed once, then cached)
        vs = timed(times, "versus_shipped_s", versus_shipped, recipe, base, posts["ivon"], splits)
        keep_times()
    if not cached or "evaluate_s" not in times:
        times["evaluate_s"] = round(time.time() - t, 1)
    reworded = timed(
        times,
        "reworded_s",
        reworded_accuracy,
        base,
        posts["ivon"],
        recipe.data_dir,
        recipe.reworded_per_family,
        progress,
    )
    times["this_invocation_s"] = round(time.time() - t0, 1)
    times["total_s"] = round(
        sum(v for k, v in times.items() if k not in ("total_s", "this_invocation_s")), 1
    )
    summary = {
        "times_s": times,
        "results": results,
        "served": served,
        # the real mix ships only when its blocking goals pass (training/recipes/default_goals.py)
        "goals": shipping_goals(served["ivon"], versus=vs) if recipe.real_mix else None,
        "versus_shipped": vs,
        "reworded_test_accuracy_ivon_mean": reworded,
        "posteriors": {k: str(v) for k, v in posts.items()},
        "base": str(base),
        "adapted": str(adapted),
    }
    summary_path.write_text(json.dumps(summary, indent=2, default=float) + "\n")
    keep_times()
    if recipe.report is not None:
        report = write_report(summary, recipe.report, work / "reports")
        print(f"[default] report: {report}", flush=True)
    failed = blocking(summary["goals"])  # the synthetic recipe has no goals and always ships
    if recipe.ship_dir is not None and failed:
        print(
            f"[default] not shipped: {len(failed)} blocking goals do not pass "
            f"({', '.join(g['goal'] for g in failed[:3])}{', ...' if len(failed) > 3 else ''});"
            f" see {recipe.report or summary_path}",
            flush=True,
        )
    elif recipe.ship_dir is not None:
        shipped = timed(times, "ship_s", ship, recipe, base, posts["ivon"], summary)
        print(f"[default] shipped to {shipped}", flush=True)
    return summary
