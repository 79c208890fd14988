"""Fine-tuning's on-disk prefix cache: loaded states equal computed ones; keys separate splits."""

from __future__ import annotations

import torch

from app.modeling import load_checkpoint
from training.config import FinetuneConfig
from training.data.generate import BenchmarkConfig, generate_benchmark
from training.stages.batches import prepare_split
from training.stages.finetune import prefix_key
from training.stages.prefix import CachedPrefix


def test_cached_prefix_round_trips_through_disk(tiny_dir, tmp_path):
    data = tmp_path / "bench"
    sizes = {"pretrain": 0, "train": 5, "calib": 3, "test": 0, "test_shift": 0}
    generate_benchmark(BenchmarkConfig(seed=1, **sizes), data, progress=False)
    loaded = load_checkpoint(tiny_dir)
    examples = prepare_split(loaded, data, "train", progress=False)
    for ex in examples:  # a label is the answer's letter in the prompt's canonical order
        assert ex.prepared.choices[ex.prepared.prompt.order[ex.label]] == ex.item.answer
    cfg = FinetuneConfig(base_dir=tiny_dir, data_dir=data, prefix_cache=tmp_path / "pc")
    key = prefix_key(cfg, "train", None, 2)
    assert key != prefix_key(cfg, "calib", None, 2) != prefix_key(cfg, "train", None, 3)
    assert key != prefix_key(cfg, "train", 4, 2)
    pad = loaded.tokenizer.pad_token_id
    first = CachedPrefix(loaded.model, examples, 2, pad, False, cfg.prefix_cache, key)
    assert (tmp_path / "pc" / f"{key}.pt").exists()
    memory = CachedPrefix(loaded.model, examples, 2, pad, False)
    again = CachedPrefix(None, examples, 2, pad, False, cfg.prefix_cache, key)  # no model needed
    for a, b, c in zip(first.hidden, memory.hidden, again.hidden, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    h, lengths = again.batch([0, 2])  # (2, T_max, d), right-padded
    assert h.shape[0] == 2 and lengths.tolist() == [len(first.hidden[0]), len(first.hidden[2])]


def test_prediction_reuses_the_file_fine_tuning_wrote(tiny_dir, posterior_dir, tmp_path):
    # One key for both caches: evaluating a posterior reuses the split fine-tuning cached.
    import json
    import shutil

    from training.eval.predictions import PrefixCache

    data = tmp_path / "bench"
    sizes = {"pretrain": 0, "train": 0, "calib": 3, "test": 0, "test_shift": 0}
    generate_benchmark(BenchmarkConfig(seed=1, **sizes), data, progress=False)
    cfg = FinetuneConfig(base_dir=tiny_dir, data_dir=data, prefix_cache=tmp_path / "pc")
    written = cfg.prefix_cache / f"{prefix_key(cfg, 'calib', None, 2)}.pt"
    assert PrefixCache(cfg.prefix_cache, tiny_dir, posterior_dir, data, "calib", 2).path == written
    # A posterior whose base carries an overlay sees other states: another file.
    overlaid = shutil.copytree(posterior_dir, tmp_path / "post")
    meta = json.loads((overlaid / "quaver.json").read_text())
    meta["base"]["overlay"] = {"sha256": "ab" * 32}
    (overlaid / "quaver.json").write_text(json.dumps(meta))
    assert PrefixCache(cfg.prefix_cache, tiny_dir, overlaid, data, "calib", 2).path != written
