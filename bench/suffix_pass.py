"""Cost of evaluation's K-sample pass, before and after its three savings, side by side.

    python bench/suffix_pass.py --shape tiny                                  # seconds, anywhere
    python bench/suffix_pass.py --model artifacts/base --data work/default/data/bench --split test

`predict_split` runs, per batch of 8 items, the layers above the first LoRA layer at 8 x K rows.
Three savings, each exact up to float rounding (tests/test_forward.py, tests/test_predictions.py):
  last_token   the last decoder layer runs for each row's last token alone; only its keys and
               values cover every position (`app.forward.last_token_layer`)
  every_row    when every row of the pass carries a sample, the LoRA deviations are added without
               gathering and scattering rows (`app.lora.SampleSet.every_row`)
  sorted       batches of similar audio length, so less of each batch is padding
               (`training.stages.batches.length_batches`)
Variants (cumulative), timed in one process on the same model, prefixes and posterior:
  before       the whole last layer, rows gathered, batches in manifest order
  last_token   + last_token
  every_row    + every_row
  sorted       + sorted (all three: what `predict_split` does now)
Clip lengths come from a benchmark split's manifest (--data, --split; the first --items items)
or, without --data, are spread evenly over 2-6 s. The posterior is random (the cost does not
depend on its values). Prints one JSON document with seconds per variant and ratios to `before`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from app.family import QWEN2_AUDIO, build_model
from app.lora import SampleSet
from app.predict import Predictor, Request
from bench.k_samples import random_posterior, shape_config, synthetic_loaded, synthetic_request
from training.stages.batches import length_batches

VARIANTS = ("before", "last_token", "every_row", "sorted")


class BenchPredictor(Predictor):
    """A Predictor whose savings can be switched off (`switch`): `gather` gathers the sample rows
    as before `every_row`; the family's `plain_decoder_layers` off runs the whole last layer."""

    gather = False

    def _draw(self, requests: list[Request], ks: list[int]) -> SampleSet | None:
        samples = super()._draw(requests, ks)
        if samples is None or not self.gather:
            return samples
        return dataclasses.replace(samples, every_row=False)

    def switch(self, variant: str) -> None:
        """Savings of `variant` on (VARIANTS are cumulative)."""
        on = VARIANTS.index(variant)
        self.loaded.family = dataclasses.replace(QWEN2_AUDIO, plain_decoder_layers=on >= 1)
        self.gather = on < 2


def durations(data: Path | None, split: str, items: int) -> list[float]:
    """Clip lengths in manifest order: a split's first `items`, or an even 2-6 s spread."""
    if data is None:
        return [2.0 + 4.0 * ((i * 7) % items) / items for i in range(items)]
    from training.data.manifest import read_manifest

    return [it.duration_s for it in read_manifest(data, split)[:items]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="tiny", choices=["tiny", "whisper-tiny-smollm2"])
    p.add_argument("--model", default=None, help="a checkpoint directory instead of --shape")
    p.add_argument("--data", type=Path, default=None, help="benchmark dir for clip lengths")
    p.add_argument("--split", default="test")
    p.add_argument("--items", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--samples", type=int, default=8, help="K")
    p.add_argument("--top-layers", type=int, default=4, help="LoRA on the top N decoder layers")
    p.add_argument("--text-tokens", type=int, default=40)
    p.add_argument("--reps", type=int, default=2, help="passes over all batches per variant")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.model:
        from app.modeling import load_checkpoint

        base, label = load_checkpoint(a.model).model, a.model
    else:
        base, label = build_model(shape_config(a.shape)), a.shape
    base.eval()
    cfg = base.config
    n_layers = len(QWEN2_AUDIO.language_model(base).layers)
    layers = list(range(n_layers - a.top_layers, n_layers))
    secs = durations(a.data, a.split, a.items)
    prepared = [synthetic_request(cfg, s, a.text_tokens, seed=i) for i, s in enumerate(secs)]
    loaded = SimpleNamespace(**vars(synthetic_loaded(base, torch.device("cpu"))))
    predictor = BenchPredictor(loaded, random_posterior(base, layers, 8))
    manifest_order = [
        list(range(b, min(b + a.batch_size, len(secs)))) for b in range(0, len(secs), a.batch_size)
    ]
    orders = {v: manifest_order for v in VARIANTS[:-1]}
    orders["sorted"] = length_batches(secs, a.batch_size)
    prefixes = {}  # (variant's order, batch) -> prefix: shared, as the prefix cache does
    for v in ("before", "sorted"):
        for b, index in enumerate(orders[v]):
            prefixes[v, b] = predictor.prefix([prepared[i] for i in index])

    @torch.inference_mode()
    def run(v: str) -> float:
        key = "sorted" if v == "sorted" else "before"
        predictor.switch(v)
        t = time.perf_counter()
        for b, index in enumerate(orders[v]):
            reqs = [Request(prepared[i], samples=a.samples, seed=i) for i in index]
            predictor.predict(reqs, prefix=prefixes[key, b])
        return time.perf_counter() - t

    padded = {
        v: sum(len(ix) * max(len(prepared[i].prompt.ids) for i in ix) for ix in orders[v])
        for v in ("before", "sorted")
    }
    res = {
        "model": label,
        "threads": torch.get_num_threads(),
        "items": len(secs),
        "batch_size": a.batch_size,
        "samples": a.samples,
        "lora_layers": layers,
        "clip_s": {"min": min(secs), "mean": sum(secs) / len(secs), "max": max(secs)},
        "padded_positions": padded,
        "real_positions": sum(len(x.prompt.ids) for x in prepared),
    }
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    run("before")  # warm-up
    for _ in range(a.reps):  # interleaved, so a slower stretch of the machine hits every variant
        for v in VARIANTS:
            times[v].append(run(v))
    best = {v: min(t) for v, t in times.items()}
    res["seconds"] = {v: round(s, 3) for v, s in best.items()}
    res["speedup_vs_before"] = {v: round(best["before"] / s, 3) for v, s in best.items()}
    print(json.dumps(res, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
