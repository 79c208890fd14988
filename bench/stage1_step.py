"""Cost of one stage-1 training step of the tiny model: full audio window vs the cut window, and
random vs length-bucketed batches, side by side in one process.

    PYTHONPATH=. python bench/stage1_step.py --data work/tiny/data/bench --steps 30

Variants (same random-init tiny model, same items, batch 16, forward + backward + AdamW step):
  full_random    the encoder on the whole 6 s window (the stock encoder forward), random batches
  cut_random     the window cut to the batch's longest clip (`app.forward.audio_hidden`)
  cut_bucketed   cut window, batches grouped by clip length (`training.stages.batches.bucketed_order`)
The variants take turns over `--repeats` rounds; the median seconds per step of each are reported
with the speedup over full_random. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
from transformers.masking_utils import create_bidirectional_mask

import app.forward as F
from app.modeling import load_checkpoint
from training.config import PretrainConfig
from training.stages.batches import bucketed_order, epoch_order, make_batch, prepare_split
from training.stages.pretrain import init_dir


def full_window_audio_hidden(model, features, n_frames, family=F.QWEN2_AUDIO):
    """The encoder on the whole window, through the stock forward (the behaviour before the cut)."""
    tower = family.audio_tower(model)
    conv_lens, out_lens = tower._get_feat_extract_output_lengths(n_frames)
    enc_len = (features.shape[-1] - 2) // 2 + 1
    valid = (torch.arange(enc_len)[None] < conv_lens[:, None]).long()
    dummy = torch.zeros(features.shape[0], enc_len, 1)
    mask = create_bidirectional_mask(config=tower.config, inputs_embeds=dummy, attention_mask=valid)
    return tower(features.float(), attention_mask=mask).last_hidden_state, out_lens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="work/tiny/data/bench", help="benchmark directory")
    ap.add_argument("--split", default="calib")
    ap.add_argument("--steps", type=int, default=20, help="steps per variant per round")
    ap.add_argument("--repeats", type=int, default=3, help="rounds (variants take turns)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = Path(args.data)
    with tempfile.TemporaryDirectory() as tmp:  # stage 1's own random-init model + tokenizer
        cfg = PretrainConfig(data_dir=data, out_dir=Path(tmp) / "base", split=args.split)
        loaded = load_checkpoint(init_dir(cfg))
    examples = prepare_split(loaded, data, args.split, progress=False)
    model, pad = loaded.model.train(), loaded.tokenizer.pad_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    lengths = [e.prepared.audio.n_frames for e in examples]

    def step(idx: list[int]) -> None:
        batch, labels = make_batch([examples[i] for i in idx], pad)
        loss = torch.nn.functional.nll_loss(
            F.letter_log_probs(model, batch, loaded.letter_ids), labels
        )
        opt.zero_grad()
        loss.backward()
        opt.step()

    variants = {
        "full_random": (True, lambda e: epoch_order(len(examples), 16, 0, e)),
        "cut_random": (False, lambda e: epoch_order(len(examples), 16, 0, e)),
        "cut_bucketed": (False, lambda e: bucketed_order(lengths, 16, 0, e)),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.repeats):
        for name, (full, order) in variants.items():
            batches = [b for b in order(r) if len(b) == 16][: args.steps]
            patch = mock.patch.object(F, "audio_hidden", full_window_audio_hidden) if full else None
            with patch or mock.patch.object(F, "audio_hidden", F.audio_hidden):
                step(batches[0])  # warm-up
                t = time.perf_counter()
                for b in batches:
                    step(b)
                times[name].append((time.perf_counter() - t) / len(batches))
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "machine": f"{platform.machine()}, torch threads {torch.get_num_threads()}",
        "items": len(examples),
        "mean_clip_s": sum(lengths) / len(lengths) / 100,
        "seconds_per_step": med,
        "speedup_vs_full_random": {k: med["full_random"] / v for k, v in med.items()},
    }
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
