"""Stage 1: build the tiny Qwen2-Audio model and train all its weights on `pretrain` (AdamW).

    quaver train --config configs/tiny-pretrain.yaml

Trains a byte-level BPE tokenizer on the benchmark's text, builds the random-init tiny model
(app.family.tiny_config), trains it to pick the right option letter (cross-entropy over the
offered letters at the answer position, the same scores the server uses), and saves a checkpoint
directory that `app.modeling.load_checkpoint` reads. Resumable: a run stopped midway continues
from its last checkpoint.

The prompt letters the choices in a canonical (sorted) order (app.prompt), the order served, so
the answer letter follows from the audio and question alone: the model does not also have to look
its answer up among shuffled options, which a model trained from scratch did not learn.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from app.family import AUDIO_TOKEN, build_model, tiny_config
from app.forward import letter_log_probs
from app.modeling import LoadedModel, load_checkpoint, save_checkpoint
from training.base.tokenizer import train_tokenizer
from training.config import PretrainConfig, to_dict
from training.data.manifest import read_manifest
from training.stages.batches import bucketed_order, make_batch, prepare_split
from training.stages.loop import append_log, fingerprint, load_state, save_state


def init_dir(cfg: PretrainConfig) -> Path:
    """Tokenizer + random-init model saved to `<out_dir>.init` (the loader then reads it)."""
    init_dir = cfg.out_dir.with_name(cfg.out_dir.name + ".init")
    if (init_dir / "config.json").exists():
        return init_dir
    texts = []
    for split in (cfg.split, cfg.eval_split):
        for item in read_manifest(cfg.data_dir, split):
            texts.append(item.question)
            texts.extend(item.choices)
    tok = train_tokenizer(texts, cfg.vocab_size)
    model_cfg = tiny_config(len(tok), tok.convert_tokens_to_ids(AUDIO_TOKEN), tok.pad_token_id)
    tmp = init_dir.with_name(init_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(build_model(model_cfg, cfg.seed), tok, tmp)
    tmp.rename(init_dir)
    return init_dir


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


@torch.no_grad()
def accuracy(loaded: LoadedModel, examples, batch_size: int = 32) -> tuple[float, dict[str, float]]:
    """Accuracy of the deterministic model on prepared examples: overall and per family."""
    loaded.model.eval()
    pad = loaded.tokenizer.pad_token_id
    hits: dict[str, int] = {}
    counts: dict[str, int] = {}
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        batch, labels = make_batch(chunk, pad)
        lp = letter_log_probs(loaded.model, batch, loaded.letter_ids)
        for e, ok in zip(chunk, (lp.argmax(-1) == labels).tolist(), strict=True):
            hits[e.item.family] = hits.get(e.item.family, 0) + int(ok)
            counts[e.item.family] = counts.get(e.item.family, 0) + 1
    overall = sum(hits.values()) / max(1, len(examples))
    return overall, {f: round(hits[f] / counts[f], 4) for f in sorted(counts)}


def pretrain(cfg: PretrainConfig, progress: bool = True) -> Path:
    """Run stage 1; returns the checkpoint directory."""
    if (cfg.out_dir / "config.json").exists():
        print(f"[pretrain] {cfg.out_dir} exists: nothing to do")
        return cfg.out_dir
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    run_dir = cfg.out_dir.with_name(cfg.out_dir.name + ".run")
    loaded = load_checkpoint(init_dir(cfg))
    model = loaded.model
    train = prepare_split(loaded, cfg.data_dir, cfg.split, progress=progress)
    evals = prepare_split(loaded, cfg.data_dir, cfg.eval_split, progress=progress)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    fp = fingerprint(to_dict(cfg))
    state = load_state(run_dir, fp)
    start_epoch, step = 0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start_epoch, step = state["epoch"], state["step"]
        print(f"[pretrain] resuming at epoch {start_epoch}, step {step}")
    pad = loaded.tokenizer.pad_token_id
    lengths = [e.prepared.audio.n_frames for e in train]
    t0 = time.time()
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        losses, hits = [], 0
        bar = tqdm(
            bucketed_order(lengths, cfg.batch_size, cfg.seed, epoch),
            desc=f"pretrain epoch {epoch + 1}/{cfg.epochs}",
            disable=not progress,
        )
        for idx in bar:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, cfg.lr, cfg.warmup_steps)
            batch, labels = make_batch([train[i] for i in idx], pad)
            lp = letter_log_probs(model, batch, loaded.letter_ids)
            loss = torch.nn.functional.nll_loss(lp, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            losses.append(loss.item())
            hits += int((lp.argmax(-1) == labels).sum())
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        eval_acc, eval_by_family = accuracy(loaded, evals)
        record = {
            "stage": "pretrain",
            "epoch": epoch + 1,
            "step": step,
            "loss": sum(losses) / len(losses),
            "train_acc": hits / len(train),
            f"{cfg.eval_split}_acc": eval_acc,
            f"{cfg.eval_split}_acc_by_family": eval_by_family,
            "elapsed_s": time.time() - t0,
        }
        print(f"[pretrain] {record}")
        append_log(run_dir, record)
        save_state(
            run_dir,
            {
                "fingerprint": fp,
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "epoch": epoch + 1,
                "step": step,
            },
        )
    model.eval()
    tmp = cfg.out_dir.with_name(cfg.out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(model, loaded.tokenizer, tmp)
    tmp.rename(cfg.out_dir)
    return cfg.out_dir
