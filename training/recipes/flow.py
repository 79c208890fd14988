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

import time
from collections.abc import Callable
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
    took = round(time.time() - t, 1)
    if took < CACHED_S and key in times:
        print(f"[recipe] {key}: cached (took {times[key]:.0f} s when it ran)", flush=True)
    else:
        times[key] = took
        print(f"[recipe] {key}: {took:.0f} s", flush=True)
    return out


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


def finetune_pair(cfgs: dict, times: dict | None = None, progress: bool = True) -> dict[str, Path]:
    """Fine-tune every config (a finished run with the same settings is reused); returns the
    posterior directories by name and records each run's time in `times[<name>_s]`."""
    from training.stages.finetune import finetune

    times = {} if times is None else times
    return {name: timed(times, f"{name}_s", finetune, cfg, progress) for name, cfg in cfgs.items()}


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

    results: dict[str, dict[str, dict]] = {}
    for name, post in posts.items():
        k = samples_for(name, samples)
        calibrate_posterior(
            base, post, data_dir, "calib", samples=k, progress=progress, prefix_cache=prefix_cache
        )
        for split in splits:
            results.setdefault(name, {})[split] = evaluate_posterior(
                base,
                post,
                data_dir,
                split,
                samples=k,
                out_dir=None if reports is None else Path(reports) / f"{name}-{split}",
                progress=progress,
                prefix_cache=prefix_cache,
            )
    return results


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Markdown table lines: a header row, the rule, one line per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]
