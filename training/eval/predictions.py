"""Per-item predictions of a posterior on a benchmark split, cached to disk.

Evaluation, calibration and the report all start from the same arrays: for every item, the
probabilities of each of K posterior samples (and of the posterior mean). They are computed once
per (posterior, split, K, seed) through the server's Predictor and stored as .npz next to the
posterior, so `quaver evaluate`, `quaver calibrate` and the report never recompute them.

    preds = predict_split(base_dir, posterior_dir, data_dir, "test", samples=8)
    preds.sample_probs   # (n, K, C_max) float32, zero-padded past each item's choices

    run = PredictionRun(base_dir, posterior_dir, data_dir, samples=8)   # the same, as settings
    run.predict("test")  # what evaluate / calibrate take instead of ten loose arguments

With `prefix_cache=DIR`, the hidden states entering the first LoRA layer are stored per item
too (`PrefixCache`): they depend only on the base weights, the data and that layer, so every
posterior with LoRA in the same layers (other seeds, other optimizers, other hyperparameters)
skips the audio encoder and the frozen lower layers. The mean path and the K-sample path of one
item share one prefix computation either way.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from app.predict import Predictor, Request
from app.prompt import PROMPT_VERSION
from training.data.manifest import load_audio_file, read_manifest
from training.stages.batches import length_batches, pad_rows
from training.stages.distributed import resolve_device
from training.stages.prefix import prefix_cache_key


class PrefixCache:
    """Per-item prefix hidden states of one split on disk, keyed by everything they depend on."""

    def __init__(
        self,
        root: Path,
        base_dir: Path,
        posterior_dir: Path,
        data_dir: Path,
        split: str,
        first_layer: int,
        dtype: str = "float32",
    ) -> None:
        meta = json.loads((Path(posterior_dir) / "quaver.json").read_text())
        overlay = (meta.get("base", {}).get("overlay") or {}).get("sha256")
        key = prefix_cache_key(
            base_dir, data_dir, split, first_layer, overlay_sha=overlay, dtype=dtype
        )
        self.path = Path(root) / f"{key}.pt"  # the file fine-tuning writes for this split too
        # one (T_i, d) tensor per item, in the split's order (the file's order too)
        self.rows: dict[int, torch.Tensor] = (
            dict(enumerate(torch.load(self.path, weights_only=True))) if self.path.exists() else {}
        )
        self.complete = self.path.exists()

    def get(self, index: list[int]) -> list[torch.Tensor] | None:
        """The rows of items `index` (None until the whole split is cached)."""
        return [self.rows[i] for i in index] if self.complete else None

    def add(self, index: list[int], h: torch.Tensor, lengths: torch.Tensor) -> None:
        """Keep rows of `h` (b, T, d), trimmed to `lengths`, as the items `index`."""
        if not self.complete:
            for j, (i, t) in enumerate(zip(index, lengths.tolist(), strict=True)):
                self.rows[i] = h[j, :t].cpu().clone()

    def save(self) -> None:
        if not self.complete:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")  # concurrent evaluations
            torch.save([self.rows[i] for i in range(len(self.rows))], tmp)
            tmp.replace(self.path)
            self.complete = True


@dataclass
class SplitPredictions:
    mean_probs: np.ndarray  # (n, C) posterior-mean probabilities (K=1 path)
    sample_probs: np.ndarray  # (n, K, C) per-sample probabilities (K draws)
    labels: np.ndarray  # (n,) answer index
    n_choices: np.ndarray  # (n,)
    families: np.ndarray  # (n,) str

    def bma(self, k: int | None = None) -> np.ndarray:
        """BMA probabilities over the first k samples (all when None): (n, C)."""
        return self.sample_probs[:, :k].mean(1)


def _cache_path(
    posterior_dir: Path, data_dir: Path, split: str, samples: int, seed: int, dtype: str = "float32"
) -> Path:
    """Keyed by the data, the posterior, split, K, seed, prompt format and (when not float32) the
    base's dtype; the device is not in the key (the same dtype gives the same answers up to
    kernel rounding)."""
    meta = (Path(data_dir) / "dataset.json").read_bytes()
    post = (Path(posterior_dir) / "posterior.safetensors").read_bytes()
    tag = f"{split}|{samples}|{seed}|prompt v{PROMPT_VERSION}"
    tag += "" if dtype == "float32" else f"|dtype {dtype}"
    key = hashlib.sha256(meta + post + tag.encode()).hexdigest()[:16]
    dt = "" if dtype == "float32" else f"-{dtype}"
    return Path(posterior_dir) / "predictions" / f"{split}-K{samples}-s{seed}{dt}-{key}.npz"


def is_cached(
    posterior_dir: Path,
    data_dir: Path,
    split: str,
    samples: int,
    seed: int = 0,
    dtype: str = "float32",
) -> bool:
    """Whether `predict_split` with these arguments would read its answer from disk."""
    return _cache_path(posterior_dir, data_dir, split, samples, seed, dtype).exists()


DTYPES = ("float32", "bfloat16")  # what the base may run in for predictions


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")


@dataclass(frozen=True)
class PredictionRun:
    """One posterior's predictions, as evaluation and calibration ask for them: which model on
    which data, with how many samples, on which device. `predict(split)` runs `predict_split`."""

    base_dir: Path
    """The assembled base model directory."""
    posterior_dir: Path
    """The exported posterior (mean, variance, quaver.json)."""
    data_dir: Path
    """The benchmark directory (manifests and audio)."""
    samples: int = 8
    """K posterior samples per item; 1 means the posterior mean alone."""
    seed: int = 0
    """Seed of the posterior draws."""
    prefix_cache: Path | None = None
    """Directory of cached frozen-prefix hidden states shared across posteriors (or None)."""
    device: str = "cpu"
    """cpu, cuda, cuda:N or auto."""
    dtype: str = "float32"
    """The base's dtype: float32 or bfloat16."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"samples must be at least 1, got {self.samples}")
        _check_dtype(self.dtype)
        for name in ("base_dir", "posterior_dir", "data_dir"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        if self.prefix_cache is not None:
            object.__setattr__(self, "prefix_cache", Path(self.prefix_cache))

    def predict(self, split: str) -> SplitPredictions:
        """Mean and K-sample probabilities of every item of `split` (cached on disk)."""
        return predict_split(
            self.base_dir,
            self.posterior_dir,
            self.data_dir,
            split,
            samples=self.samples,
            seed=self.seed,
            progress=self.progress,
            prefix_cache=self.prefix_cache,
            device=self.device,
            dtype=self.dtype,
        )


def predict_split(
    base_dir: Path,
    posterior_dir: Path,
    data_dir: Path,
    split: str,
    samples: int = 8,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
    prefix_cache: Path | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> SplitPredictions:
    """Mean and K-sample probabilities for every item of `split` (cached on disk), with the base
    in `dtype` on `device` (cpu, cuda, cuda:N, auto); the probabilities are float32 either way."""
    _check_dtype(dtype)
    cache = _cache_path(posterior_dir, data_dir, split, samples, seed, dtype)
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        return SplitPredictions(
            z["mean_probs"], z["sample_probs"], z["labels"], z["n_choices"], z["families"]
        )
    predictor = Predictor.from_dirs(
        base_dir, posterior_dir, device=str(resolve_device(device)), dtype=getattr(torch, dtype)
    )
    pcache = (
        PrefixCache(prefix_cache, base_dir, posterior_dir, data_dir, split, predictor.split, dtype)
        if prefix_cache is not None
        else None
    )
    items = read_manifest(Path(data_dir), split)
    c_max = max(len(i.choices) for i in items)
    mean = np.zeros((len(items), c_max), np.float32)
    samp = np.zeros((len(items), samples, c_max), np.float32)
    torch.manual_seed(seed)
    for index in tqdm(
        length_batches([it.duration_s for it in items], batch_size),
        desc=f"predict {split} K={samples}",
        disable=not progress,
    ):
        chunk = [items[i] for i in index]
        prepared = [
            predictor.prepare(load_audio_file(Path(data_dir), it), it.question, list(it.choices))
            for it in chunk
        ]
        cached = pcache.get(index) if pcache is not None else None
        if cached is None:
            h, batch = predictor.prefix(prepared)  # (b, T, d): once for both paths below
            if pcache is not None:
                pcache.add(index, h, batch.lengths)
        else:
            h, batch = pad_rows(cached)[0].to(predictor.loaded.device), predictor.batch(prepared)
        means = predictor.predict([Request(p, samples=1) for p in prepared], prefix=(h, batch))
        draws = (
            predictor.predict(
                # an item's draws depend on the seed and its index only, not on its batch
                [
                    Request(p, samples=samples, seed=seed * 1_000_003 + i)
                    for i, p in zip(index, prepared, strict=True)
                ],
                prefix=(h, batch),
            )
            if samples > 1
            else means
        )
        for j, (i, it) in enumerate(zip(index, chunk, strict=True)):
            c = len(it.choices)
            mean[i, :c] = means[j].probs
            samp[i, :, :c] = draws[j].sample_probs
    if pcache is not None:
        pcache.save()
    out = SplitPredictions(
        mean,
        samp,
        np.array([i.answer_index for i in items]),
        np.array([len(i.choices) for i in items]),
        np.array([i.family for i in items]),
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    # written whole, then renamed: a run stopped mid-write leaves no half file to be read back,
    # and two processes predicting the same split never read each other's partial output
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(
            f,
            mean_probs=out.mean_probs,
            sample_probs=out.sample_probs,
            labels=out.labels,
            n_choices=out.n_choices,
            families=out.families,
        )
    os.replace(tmp, cache)
    return out
