"""Fitting the control probe (`app.control`) on one split's prefix states and scoring others.

    states = split_states(loaded, run, "pretrain", cache_root)      # rows + examples
    probe = fit_control_probe(*probe_data(loaded, states), layer=run.first_layer)
    p = split_p_control(probe, loaded, split_states(loaded, run, "calib", cache_root))  # (n,)
    attach_control_probe(posterior_dir, probe)   # control_probe.safetensors + quaver.json entry

The probe is fitted on `pretrain` (the broad split stage 1b learns from; it holds a few hundred
control items in the default benchmark), never on `calib` or a test split, and reads the states
entering the first LoRA layer, which no posterior changes: one probe serves every seed and both
optimizers of a report. The states come from the prefix cache that fine-tuning and prediction
already keep (`training.eval.predictions.PrefixCache`, the same key), computed and stored when
that split is not cached yet. `quaver report` fits it, adds the "answerable" score and, with
`--write-decision`, stores it in each IVON posterior.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from app.control import QUARTERS, ControlProbe, audio_quarter_means
from app.modeling import LoadedModel
from training.stages.batches import Example, prepare_split

DEFAULT_L2 = 1e-2  # the penalty bench/linear_probe.py measured with (docs/sweeps.md)


@dataclass
class SplitStates:
    """One split's prefix states (one (T_i, d) tensor per item) with its prepared items."""

    split: str
    rows: list[torch.Tensor]
    examples: list[Example]

    @property
    def is_control(self) -> np.ndarray:
        return np.array([ex.is_control for ex in self.examples], dtype=bool)


def split_states(
    loaded: LoadedModel,
    base_dir: Path,
    posterior_dir: Path,
    data_dir: Path,
    split: str,
    first_layer: int,
    cache_root: Path | None,
    progress: bool = True,
    dtype: str = "float32",
) -> SplitStates:
    """The states entering `first_layer` for every item of `split`: read from the prefix cache
    of `posterior_dir` (its base overlay is part of the key), else computed with `loaded` (which
    must carry that overlay already, in `dtype`) and stored there."""
    from training.eval.predictions import PrefixCache
    from training.stages.prefix import CachedPrefix

    examples = prepare_split(loaded, Path(data_dir), split, progress=progress)
    key, root = None, None
    if cache_root is not None:
        cache = PrefixCache(
            cache_root, base_dir, posterior_dir, data_dir, split, first_layer, dtype
        )
        if cache.complete and len(cache.rows) == len(examples):
            return SplitStates(split, [cache.rows[i] for i in range(len(examples))], examples)
        key, root = cache.path.stem, cache.path.parent
    pad = loaded.tokenizer.pad_token_id or 0
    states = CachedPrefix(
        loaded.model, examples, first_layer, pad, progress, root, key or "", loaded.family
    )
    return SplitStates(split, states.hidden, examples)


def split_features(loaded: LoadedModel, states: SplitStates) -> torch.Tensor:
    """(n, QUARTERS * d) audio-quarter means of every item (the probe's input)."""
    audio_id = loaded.family.audio_token_id(loaded.model)
    out = []
    for h, ex in zip(states.rows, states.examples, strict=True):
        ids = ex.prepared.prompt.ids[: len(h)]
        out.append(audio_quarter_means(h[None], (ids == audio_id)[None], QUARTERS)[0])
    return torch.stack(out)


def fit_control_probe(
    x: torch.Tensor,
    is_control: np.ndarray,
    layer: int,
    l2: float = DEFAULT_L2,
    info: Mapping | None = None,
) -> ControlProbe:
    """L2-penalised logistic regression P(control | x) by L-BFGS on features standardised with
    the fitting split's own statistics. `x` (n, F); `is_control` (n,) bool, both classes present."""
    y = torch.as_tensor(np.asarray(is_control, dtype=np.float32))
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"features {tuple(x.shape)} do not match {len(y)} labels")
    if not 0 < float(y.sum()) < len(y):
        raise ValueError("fitting a control probe needs both control and answerable items")
    x = x.to(torch.float32)
    mean, scale = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / scale
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y)
        loss = loss + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    meta = {"l2": l2, "n": len(y), "n_control": int(y.sum()), **dict(info or {})}
    return ControlProbe(mean, scale, w.detach().clone(), float(b.detach()), layer, QUARTERS, meta)


def split_p_control(probe: ControlProbe, loaded: LoadedModel, states: SplitStates) -> np.ndarray:
    """(n,) P(control) of every item of a split, as the server computes it per request."""
    with torch.no_grad():
        z = probe.logits(split_features(loaded, states))
    return torch.sigmoid(z).numpy().astype(np.float64)


def attach_control_probe(posterior_dir: Path, probe: ControlProbe) -> Path:
    """Write the probe into a posterior directory and its entry into quaver.json (atomically);
    posterior.safetensors, and so every prediction cache, stays as it was."""
    path = Path(posterior_dir) / "quaver.json"
    meta = json.loads(path.read_text())
    meta["control_probe"] = probe.save(posterior_dir)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(path)
    return path


def prefix_model(
    base_dir: Path, posterior_dir: Path, dtype: str = "float32"
) -> tuple[LoadedModel, int, dict]:
    """What a posterior's prefix states are computed with: the base in `dtype` with the
    posterior's base overlay applied, the posterior's first LoRA layer, and its quaver.json."""
    from app.modeling import load_checkpoint
    from app.overlay import apply_overlay
    from app.posterior import META_FILE, LoRASpec

    meta = json.loads((Path(posterior_dir) / META_FILE).read_text())
    loaded = load_checkpoint(base_dir, dtype=getattr(torch, dtype))
    apply_overlay(posterior_dir, loaded)
    return loaded, LoRASpec.from_json(meta["lora"]).first_layer, meta


def posterior_p_control(
    base_dir: Path,
    posterior_dir: Path,
    data_dir: Path,
    splits: Sequence[str],
    cache_root: Path | None = None,
    progress: bool = False,
) -> dict[str, np.ndarray] | None:
    """{split: (n,) P(control)} from the probe a posterior directory stores, as the server
    computes it (None when the posterior has no probe)."""
    from app.control import load_control_probe
    from app.posterior import META_FILE

    if not json.loads((Path(posterior_dir) / META_FILE).read_text()).get("control_probe"):
        return None
    loaded, layer, meta = prefix_model(base_dir, posterior_dir)
    probe = load_control_probe(posterior_dir, meta, first_layer=layer)
    out = {}
    for split in splits:
        states = split_states(
            loaded, base_dir, posterior_dir, data_dir, split, layer, cache_root, progress
        )
        out[split] = split_p_control(probe, loaded, states)
    return out
