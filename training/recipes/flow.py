"""The flow every recipe shares: fine-tune IVON and AdamW, calibrate, evaluate, write markdown.

    cfgs = load_pair({"ivon": "configs/tiny-ivon.yaml", "adamw": ...}, overrides)
    posts = finetune_pair(cfgs, times)                 # {"ivon": posterior dir, "adamw": ...}
    results = calibrate_and_evaluate(base, posts, data_dir, samples=8, splits=("test",))

The tiny pipeline (`recipes.tiny`), the embedded default (`recipes.default`) and the results
report (`recipes.report`) run these functions, so they train, time and evaluate the same way:
IVON at K posterior samples, AdamW at K=1 (`samples_for`: its exported std is 0, so K samples
would all be its mean).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

OPTIMIZERS = ("ivon", "adamw")
CACHED_S = 2.0  # a step that returns faster than this was done by an earlier invocation


def samples_for(optimizer: str, samples: int) -> int:
    """K for an optimizer's posterior: `samples` for IVON, 1 for AdamW (std 0: K draws = mean)."""
    return samples if optimizer == "ivon" else 1


def timed(times: dict, key: str, fn: Callable, *args, **kwargs):
    """Run one step and record its wall time in `times[key]`.

    A step finished by an earlier invocation returns at once; it keeps the time recorded when it
    ran (when `times` starts from an earlier summary), so a recipe states what each step cost
    rather than 0 s.
    """
    t = time.time()
    out = fn(*args, **kwargs)
    _record(times, key, round(time.time() - t, 1))
    return out


def _record(times: dict, key: str, took: float) -> None:
    """`times[key] = took`, unless the step was cached and an earlier time is on record."""
    if took < CACHED_S and key in times:
        print(f"[recipe] {key}: cached (took {times[key]:.0f} s when it ran)", flush=True)
    else:
        times[key] = took
        print(f"[recipe] {key}: {took:.0f} s", flush=True)


def load_pair(files: dict[str, Path], overrides: dict[str, dict] | None = None) -> dict:
    """{"ivon" | "adamw": FinetuneConfig} from YAML files, with per-optimizer overrides; each
    file must be for the optimizer it is filed under."""
    from training.config import ConfigError, FinetuneConfig, load_config

    cfgs = {}
    for name, path in files.items():
        cfg = load_config(path, FinetuneConfig, (overrides or {}).get(name))
        if cfg.optimizer != name:
            raise ConfigError(f"{path}: optimizer is {cfg.optimizer!r}, expected {name!r}")
        cfgs[name] = cfg
    return cfgs


def side_by_side_workers(cfgs: dict, cpus: int | None = None) -> int:
    """How many of `cfgs` `finetune_pair` trains at the same time: as many as the machine's
    cores hold at the largest thread count any config names, when every config names one and
    runs on the CPU; otherwise 1 (one after the other, in the calling process). The default
    recipe's IVON and AdamW take 1 thread each on 2 cores: about 8 min together instead of 16
    one after the other; the report's 15 runs go two at a time. Threads do not change a run's
    result (`RESULT_NEUTRAL`)."""
    cpus = (os.cpu_count() or 1) if cpus is None else cpus
    threads = [cfg.threads for cfg in cfgs.values()]
    if len(cfgs) < 2 or not all(t > 0 for t in threads):
        return 1
    if not all(cfg.device == "cpu" for cfg in cfgs.values()):
        return 1
    return max(1, min(len(cfgs), cpus // max(threads)))


def _finetune_timed(cfg, progress: bool) -> tuple[Path, float]:
    """One run in a worker process: its posterior directory and its own wall time."""
    from training.stages.finetune import finetune

    t = time.time()
    return finetune(cfg, progress), round(time.time() - t, 1)


def finetune_pair(cfgs: dict, times: dict | None = None, progress: bool = True) -> dict[str, Path]:
    """Fine-tune every config (a finished run with the same settings is reused); returns the
    posterior directories by name and records each run's time in `times[<name>_s]`.

    The runs go side by side in spawned processes, `side_by_side_workers` of them at a time
    (the next one starts as soon as one ends), when they fit the machine; otherwise one after
    the other in this process. Either way the caller's torch thread count is left as it was (a
    run sets its own), so what follows does not inherit a run's 1 thread.
    """
    import torch

    from training.stages.finetune import finetune

    times = {} if times is None else times
    threads = torch.get_num_threads()
    workers = side_by_side_workers(cfgs)
    try:
        if workers < 2:
            return {
                name: timed(times, f"{name}_s", finetune, cfg, progress)
                for name, cfg in cfgs.items()
            }
        # spawn, not fork: this process may hold torch threads that fork would copy half-way.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            futures = {n: pool.submit(_finetune_timed, c, progress) for n, c in cfgs.items()}
            posts = {}
            for name, fut in futures.items():
                posts[name], took = fut.result()
                _record(times, f"{name}_s", took)
            return posts
    finally:
        torch.set_num_threads(threads)


def calibrate_and_evaluate(
    base: Path,
    posts: dict[str, Path],
    data_dir: Path,
    samples: int,
    splits: tuple[str, ...] = ("test",),
    reports: Path | None = None,
    prefix_cache: Path | None = None,
    progress: bool = True,
) -> dict[str, dict[str, dict]]:
    """Guaranteed-risk thresholds on `calib` (into each posterior's quaver.json), then metrics on
    every split: {name: {split: evaluate_posterior's result}}; plots in `<reports>/<name>-<split>`.
    """
    from training.eval.evaluate import calibrate_posterior, evaluate_posterior
    from training.eval.predictions import PredictionRun

    results: dict[str, dict[str, dict]] = {}
    for name, post in posts.items():
        run = PredictionRun(
            base,
            post,
            data_dir,
            samples=samples_for(name, samples),
            prefix_cache=prefix_cache,
            progress=progress,
        )
        calibrate_posterior(run, "calib")
        for split in splits:
            out = None if reports is None else Path(reports) / f"{name}-{split}"
            results.setdefault(name, {})[split] = evaluate_posterior(run, split, out_dir=out)
    return results


def pct(x: float | None) -> str:
    """A fraction as a percentage with one decimal ("12.5%"); "n/a" for None."""
    return "n/a" if x is None else f"{100 * x:.1f}%"


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Markdown table lines: a header row, the rule, one line per row. A "|" inside a cell
    (e.g. "predictor | score") is escaped, so it does not split the cell."""

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header)] + [line(r) for r in rows]
