"""Stage 1 for a pretrained base: align the projector so the language model hears the audio.

    quaver train --config configs/default-align.yaml

The assembled default (`quaver build-base`) joins a pretrained Whisper encoder and a pretrained
instruct LM through a NEW, randomly initialised projector. This stage trains that projector alone
(AdamW) on the benchmark's `pretrain` split, with the option-letter loss the server scores with;
encoder and LM stay frozen. The encoder is frozen, so its output is computed once per clip and
cached; each step runs projector -> decoder -> letter logits and back-propagates to the projector.
Resumable; writes a full checkpoint directory (the base with the trained projector) that stage 2
(`training.stages.finetune`) and the server load like any other.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from app.forward import DecoderRunner, audio_hidden, choice_log_probs, embed_prompts
from app.modeling import load_checkpoint, save_checkpoint
from training.config import AlignConfig, to_dict
from training.stages.batches import Example, epoch_order, make_batch, pad_rows, prepare_split
from training.stages.loop import append_log, fingerprint, load_state, save_state
from training.stages.pretrain import lr_at


class AudioCache:
    """Frozen-encoder outputs per example, trimmed to each clip's audio tokens."""

    def __init__(self, model, examples: list[Example], pad_id: int, progress: bool) -> None:
        self.hidden: list[torch.Tensor] = []
        with torch.no_grad():
            for i in tqdm(
                range(0, len(examples), 16), desc="cache encoder", disable=not progress, leave=False
            ):
                batch, _ = make_batch(examples[i : i + 16], pad_id)
                h, lens = audio_hidden(model, batch.features, batch.n_frames)
                self.hidden.extend(h[j, : int(n)].clone() for j, n in enumerate(lens))

    def batch(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_rows([self.hidden[i] for i in idx])


def _log_probs(loaded, cache: AudioCache, examples: list[Example], idx: list[int]) -> torch.Tensor:
    model = loaded.model
    batch, _ = make_batch([examples[i] for i in idx], loaded.tokenizer.pad_token_id)
    hidden, lens = cache.batch(idx)
    audio = loaded.family.projector(model)(hidden)  # (b, A_max, d_text): the trained part
    h = embed_prompts(model, batch.ids, audio, lens)
    runner = DecoderRunner(model)
    h = runner.run(h, 0, runner.num_layers)
    last = runner.lm.norm(h[torch.arange(len(idx)), batch.lengths - 1])
    logits = last @ loaded.family.lm_head(model).weight[loaded.letter_ids].T
    return choice_log_probs(logits, batch.n_choices)


def align(cfg: AlignConfig, progress: bool = True) -> Path:
    """Train the projector; returns the aligned checkpoint directory."""
    if (cfg.out_dir / "config.json").exists():
        print(f"[align] {cfg.out_dir} exists: nothing to do")
        return cfg.out_dir
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    loaded = load_checkpoint(cfg.base_dir)
    model = loaded.model
    for p in model.parameters():
        p.requires_grad_(False)
    projector = loaded.family.projector(model)
    for p in projector.parameters():
        p.requires_grad_(True)
    pad = loaded.tokenizer.pad_token_id
    train = prepare_split(loaded, cfg.data_dir, cfg.split, cfg.limit, progress)
    evals = prepare_split(loaded, cfg.data_dir, cfg.eval_split, cfg.eval_limit, progress)
    train_cache = AudioCache(model, train, pad, progress)
    eval_cache = AudioCache(model, evals, pad, progress)
    opt = torch.optim.AdamW(projector.parameters(), lr=cfg.lr, weight_decay=0.0)
    run_dir = cfg.out_dir.with_name(cfg.out_dir.name + ".run")
    fp = fingerprint(to_dict(cfg))
    state = load_state(run_dir, fp)
    start_epoch, step, skip = 0, 0, 0
    if state is not None:
        projector.load_state_dict(state["projector"])
        opt.load_state_dict(state["opt"])
        start_epoch, step, skip = state["epoch"], state["step"], state["batch_in_epoch"]
        print(f"[align] resuming at epoch {start_epoch + 1}, step {step}")
    order_len = math.ceil(len(train) / cfg.batch_size)
    total = order_len * cfg.epochs
    t0 = time.time()

    def checkpoint(epoch: int, batch_in_epoch: int) -> None:
        save_state(
            run_dir,
            {
                "fingerprint": fp,
                "projector": projector.state_dict(),
                "opt": opt.state_dict(),
                "epoch": epoch,
                "step": step,
                "batch_in_epoch": batch_in_epoch,
            },
        )

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        losses, hits, seen = [], 0, 0
        order = epoch_order(len(train), cfg.batch_size, cfg.seed, epoch)
        bar = tqdm(
            order,
            desc=f"align epoch {epoch + 1}/{cfg.epochs}",
            disable=not progress,
            initial=skip,
            total=len(order),
        )
        for b, idx in enumerate(order):
            if b < skip:
                continue
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, cfg.lr, cfg.warmup_steps)
            labels = torch.tensor([train[i].label for i in idx])
            lp = _log_probs(loaded, train_cache, train, idx)
            loss = torch.nn.functional.nll_loss(lp, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(projector.parameters(), 1.0)
            opt.step()
            step += 1
            losses.append(loss.item())
            hits += int((lp.argmax(-1) == labels).sum())
            seen += len(idx)
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
            if step % cfg.checkpoint_every == 0:
                checkpoint(epoch, b + 1)
        bar.close()
        skip = 0
        model.eval()
        with torch.no_grad():
            correct = 0
            for i in range(0, len(evals), 16):
                idx = list(range(i, min(len(evals), i + 16)))
                lp = _log_probs(loaded, eval_cache, evals, idx)
                correct += int((lp.argmax(-1) == torch.tensor([evals[j].label for j in idx])).sum())
        record = {
            "stage": "align",
            "epoch": epoch + 1,
            "step": step,
            "loss": sum(losses) / max(1, len(losses)),
            "train_acc": hits / max(1, seen),
            f"{cfg.eval_split}_acc": correct / max(1, len(evals)),
            "elapsed_s": time.time() - t0,
        }
        print(f"[align] {record}")
        append_log(run_dir, record)
        checkpoint(epoch + 1, 0)
    for p in model.parameters():
        p.requires_grad_(False)
    tmp = cfg.out_dir.with_name(cfg.out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(model, loaded.tokenizer, tmp)
    tmp.rename(cfg.out_dir)
    return cfg.out_dir
