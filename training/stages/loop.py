"""Resumable training state: one file per run, written atomically.

A run directory holds `state.pt` (model-trainable tensors, optimizer state, epoch, step, RNG
states, a fingerprint of the config) and `log.jsonl` (one JSON line per epoch). Starting a run
whose directory has a `state.pt` with the same fingerprint resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from app.prompt import PROMPT_VERSION

STATE_FILE = "state.pt"
LOG_FILE = "log.jsonl"


def weights_stamp(model_dir: Path) -> bytes:
    """Cheap identity of a checkpoint's weights (names, sizes, mtimes of its .safetensors), for
    caches of activations that depend on them; rewriting the weights changes it."""
    parts = []
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        st = f.stat()
        parts.append(f"{f.name}|{st.st_size}|{st.st_mtime_ns}")
    return ";".join(parts).encode()


def prefix_cache_key(
    base_dir: Path,
    data_dir: Path,
    split: str,
    first_layer: int,
    limit: int | None = None,
    overlay_sha: str | None = None,
) -> str:
    """File stem of one split's cached prefix hidden states (the states entering `first_layer`).

    One key for fine-tuning (training.stages.finetune.CachedPrefix) and prediction
    (training.eval.predictions.PrefixCache), so a split cached by either is reused by the other. It
    covers everything the states depend on: the base's weight files, a base overlay applied at
    load (its sha256), the benchmark, the split and its limit, the first LoRA layer, the prompt
    format (app.prompt.PROMPT_VERSION).
    """
    h = hashlib.sha256(weights_stamp(base_dir))
    h.update((Path(data_dir) / "dataset.json").read_bytes())
    h.update(f"{Path(base_dir).resolve()}|{split}|{limit}|{first_layer}".encode())
    h.update(f"|prompt v{PROMPT_VERSION}".encode())
    if overlay_sha is not None:
        h.update(f"|overlay {overlay_sha}".encode())
    return f"{split}-L{first_layer}-{h.hexdigest()[:16]}"


def fingerprint(cfg_dict: dict) -> str:
    """Config fingerprint, ignoring fields that do not change the result (epochs may grow)."""
    keep = {
        k: v for k, v in cfg_dict.items() if k not in ("threads", "checkpoint_every", "out_dir")
    }
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
        raise RuntimeError(
            f"{run_dir} holds a run with another config (fingerprint {state.get('fingerprint')} "
            f"!= {fp}); use another out_dir or delete {path}"
        )
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    return state


def append_log(run_dir: Path, record: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOG_FILE, "a") as f:
        f.write(json.dumps(record, default=float) + "\n")
