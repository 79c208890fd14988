"""The one loop every training stage runs on: resumable epochs, a log record per epoch, an atomic
save of the output, and the one list of settings that do not change what a stage produces.

A stage (`training.stages.pretrain`, `training.stages.finetune`) supplies a `Steps` object (its
batch order per epoch, one optimizer step, the tensors to checkpoint, the end-of-epoch
evaluation) and `run_epochs` does the rest:

    run_dir/state.pt     trainable tensors, optimizer state, epoch, step, batch, RNG states and a
                         fingerprint of the result-changing settings (written atomically)
    run_dir/log.jsonl    one JSON line per epoch

Starting a stage whose run directory holds a `state.pt` with the same fingerprint resumes where
it stopped; `epochs` is not part of the fingerprint, so a run may continue to more epochs (the
learning-rate schedule of the remaining steps then follows the new total). A stage whose output
already exists returns it when it was made with the same settings (`reuse_finished`), continues
the run when only `epochs` grew, and refuses anything else with one line naming the differences.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from training.config import ConfigError

STATE_FILE = "state.pt"
LOG_FILE = "log.jsonl"
# Settings that do not change what a stage produces: its label, where it writes, how many
# threads compute it, how often it checkpoints, where cached hidden states live, and how it is
# computed (device, recomputed activations, gradients accumulated over micro-batches: the same
# result up to rounding, as with another thread count).
RESULT_NEUTRAL = (
    "stage",
    "threads",
    "checkpoint_every",
    "out_dir",
    "prefix_cache",
    "device",
    "gradient_checkpointing",
    "micro_batch_size",
)
# Result-changing settings added later, with the value every earlier run had: a run recorded
# without the key counts as having it, so its output is still reused and its state resumed.
ADDED_DEFAULTS = {"dtype": "float32", "autocast": False, "uniform_controls": False}
# A setting a run may grow and continue from its saved state.
GROWABLE = "epochs"


def settings_diff(stored: dict, wanted: dict, prefix: str = "") -> list[str]:
    """'key: stored -> wanted' for each result-changing setting that differs, nested keys dotted."""
    out = []
    for key in sorted(set(stored) | set(wanted)):
        if not prefix and key in RESULT_NEUTRAL:
            continue
        default = None if prefix else ADDED_DEFAULTS.get(key)
        a, b = stored.get(key, default), wanted.get(key, default)
        if isinstance(a, dict) and isinstance(b, dict):
            out += settings_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def fingerprint(cfg_dict: dict) -> str:
    """Fingerprint of a run's result-changing settings, without `epochs` (a run may grow)."""
    keep = {
        k: v
        for k, v in cfg_dict.items()
        if k not in (*RESULT_NEUTRAL, GROWABLE)
        and not (k in ADDED_DEFAULTS and v == ADDED_DEFAULTS[k])
    }
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def reuse_finished(out: Path, stored: dict | None, wanted: dict) -> bool:
    """Whether the finished output `out` (made with settings `stored`) answers `wanted` as is.

    True: same result-changing settings. False: the same but with more epochs, so the run
    continues from its saved state. Raises ConfigError for anything else, naming every
    difference, so a changed config is never answered with the output of the old one.
    """
    if stored is None:
        raise ConfigError(
            f"{out} exists but records no settings: remove it or choose another out_dir"
        )
    diff = settings_diff(stored, wanted)
    if not diff:
        return True
    grow = diff == [f"{GROWABLE}: {stored.get(GROWABLE)!r} -> {wanted.get(GROWABLE)!r}"]
    if grow and isinstance(stored.get(GROWABLE), int) and wanted[GROWABLE] > stored[GROWABLE]:
        print(f"[{wanted.get('stage')}] {out}: continuing to {wanted[GROWABLE]} epochs")
        return False
    raise ConfigError(
        f"{out} holds a finished run with other settings ({'; '.join(diff)}): "
        "remove that directory or choose another out_dir"
    )


def save_atomic(out: Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` to fill a fresh folder next to `out`, then put it in place of `out`: a
    run stopped midway never leaves a half-written output that a later run would reuse."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    old = out.with_name(out.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def save_state(run_dir: Path, state: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {
        **state,
        "rng": {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": np.random.get_state(),
        },
    }
    tmp = run_dir / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, run_dir / STATE_FILE)


def load_state(run_dir: Path, fp: str) -> dict | None:
    """The saved state if it exists and matches fingerprint `fp`, else None (fresh start)."""
    path = run_dir / STATE_FILE
    if not path.exists():
        return None
    state = torch.load(path, weights_only=False)
    if state.get("fingerprint") != fp:
        raise ConfigError(
            f"{run_dir} holds an unfinished run with other settings (fingerprint "
            f"{state.get('fingerprint')} != {fp}): use another out_dir or delete {path}"
        )
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    return state


def reset_peak_memory() -> None:
    """Start a new peak-memory window on the GPUs in use (the CPU peak is the process's)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)


def peak_memory_mb() -> dict:
    """Peak memory since `reset_peak_memory`: allocated on each GPU in use (`cuda_mb`), and the
    process's peak resident set on the host (`host_mb`, since the process started)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {"host_mb": rss / (1 << 20) if sys.platform == "darwin" else rss / 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_mb"] = max(
            torch.cuda.max_memory_allocated(i) / (1 << 20) for i in range(torch.cuda.device_count())
        )
    return out


def append_log(run_dir: Path, record: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOG_FILE, "a") as f:
        f.write(json.dumps(record, default=float) + "\n")


def read_log(run_dir: Path) -> list[dict]:
    """The per-epoch records of a run ([] when it has none)."""
    log = Path(run_dir) / LOG_FILE
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


class Steps:
    """What a stage plugs into `run_epochs`."""

    def order(self, epoch: int) -> list[list[int]]:
        """The batches (lists of example indices) of one epoch; deterministic in the epoch."""
        raise NotImplementedError

    def start_epoch(self, epoch: int) -> None:
        """Called before an epoch's first step (e.g. to put the model in train mode)."""

    def step(self, idx: list[int], step: int) -> tuple[list[float], int, int] | None:
        """One optimizer step on batch `idx` at global step `step`: (losses, hits, items), or
        None when the batch is skipped (it then does not count as a step)."""
        raise NotImplementedError

    def state(self) -> dict:
        """Trainable tensors and optimizer state to checkpoint."""
        raise NotImplementedError

    def restore(self, state: dict) -> None:
        """Load what `state()` returned."""
        raise NotImplementedError

    def evaluate(self) -> dict:
        """End-of-epoch fields of the log record (e.g. calib accuracy)."""
        return {}


def run_epochs(
    steps: Steps,
    *,
    stage: str,
    run_dir: Path,
    fp: str,
    epochs: int,
    header: dict | None = None,
    checkpoint_every: int = 0,
    progress: bool = True,
    is_main: bool = True,
    desc: str | None = None,
) -> float:
    """Train epochs [resumed epoch, epochs) and return the seconds this invocation trained.

    Checkpoints every `checkpoint_every` steps (0: at epoch ends only) and at each epoch end;
    `header` fields open every log record. Only the main process (`is_main`) writes.
    """
    state = load_state(run_dir, fp)
    start_epoch, step, skip = 0, 0, 0
    if state is not None:
        steps.restore(state)
        start_epoch, step, skip = state["epoch"], state["step"], state["batch_in_epoch"]
        print(f"[{stage}] resuming at epoch {start_epoch + 1}, step {step}")
    t0 = time.time()

    def checkpoint(epoch: int, batch_in_epoch: int) -> None:
        if is_main:
            save_state(
                run_dir,
                {
                    "fingerprint": fp,
                    **steps.state(),
                    "epoch": epoch,
                    "step": step,
                    "batch_in_epoch": batch_in_epoch,
                },
            )

    for epoch in range(start_epoch, epochs):
        order = steps.order(epoch)
        steps.start_epoch(epoch)
        losses: list[float] = []
        hits = seen = 0
        step_s: list[float] = []
        reset_peak_memory()
        bar = tqdm(
            total=len(order),
            initial=skip,
            desc=f"{desc or stage} epoch {epoch + 1}/{epochs}",
            disable=not progress,
        )
        for b, idx in enumerate(order):
            if b < skip:
                continue
            t_step = time.perf_counter()
            out = steps.step(idx, step)
            if out is None:
                continue
            step_s.append(time.perf_counter() - t_step)
            step_losses, step_hits, step_seen = out
            step += 1
            losses += step_losses
            hits += step_hits
            seen += step_seen
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
            if checkpoint_every and step % checkpoint_every == 0:
                checkpoint(epoch, b + 1)
        bar.close()
        skip = 0
        record = {
            "stage": stage,
            **(header or {}),
            "epoch": epoch + 1,
            "step": step,
            "loss": sum(losses) / max(1, len(losses)),
            "train_acc": hits / max(1, seen),
            "elapsed_s": time.time() - t0,
            # this epoch's steps (median: the first steps include warm-up) and peak memory
            "step_s": float(np.median(step_s)) if step_s else None,
            "peak_memory_mb": peak_memory_mb(),
            **steps.evaluate(),
        }
        if is_main:
            print(f"[{stage}] {record}")
            append_log(run_dir, record)
        checkpoint(epoch + 1, 0)
    return time.time() - t0
