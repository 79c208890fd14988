"""Stage 1: build the tiny Qwen2-Audio model and train all its weights on `pretrain` (AdamW).

    quaver train --config configs/tiny-pretrain.yaml

Trains a byte-level BPE tokenizer on the benchmark's text, builds the random-init tiny model
(app.family.tiny_config), trains it to pick the right option letter (cross-entropy over the
offered letters at the answer position, the same scores the server uses), and saves a checkpoint
directory that `app.modeling.load_checkpoint` reads, with the settings that made it
(`quaver_stage.json`). Runs on the shared loop (training.stages.loop): a run stopped midway
continues from its last checkpoint in `<out_dir>.run`, a finished one is reused only with the
same settings, and more epochs continue it.

The prompt letters the choices in a canonical (sorted) order (app.prompt), the order served, so
the answer letter follows from the audio and question alone: the model does not also have to look
its answer up among shuffled options, which a model trained from scratch did not learn.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from app.family import AUDIO_TOKEN, build_model, tiny_config
from app.forward import letter_log_probs
from app.modeling import LoadedModel, load_checkpoint, save_checkpoint
from training.base.tokenizer import train_tokenizer
from training.config import PretrainConfig, to_dict
from training.data.manifest import read_manifest
from training.stages.batches import bucketed_order, make_batch, prepare_split
from training.stages.loop import Steps, fingerprint, reuse_finished, run_epochs, save_atomic

STAGE_FILE = "quaver_stage.json"  # in a finished output: the settings that made it


def _stage_settings(path: Path) -> dict | None:
    f = Path(path) / STAGE_FILE
    return json.loads(f.read_text()).get("settings") if f.exists() else None


def _write_stage_settings(path: Path, settings: dict) -> None:
    (Path(path) / STAGE_FILE).write_text(json.dumps({"settings": settings}, indent=2) + "\n")


def init_dir(cfg: PretrainConfig) -> Path:
    """Tokenizer + random-init model saved to `<out_dir>.init` (the loader then reads it).

    Rebuilt when the settings it depends on (data, splits, vocabulary, seed) changed.
    """
    init_dir = cfg.out_dir.with_name(cfg.out_dir.name + ".init")
    wanted = {
        "data": json.loads((cfg.data_dir / "dataset.json").read_text()).get("fingerprint"),
        "splits": [cfg.split, cfg.eval_split],
        "vocab_size": cfg.vocab_size,
        "seed": cfg.seed,
    }
    if (init_dir / "config.json").exists() and _stage_settings(init_dir) == wanted:
        return init_dir
    texts = []
    for split in (cfg.split, cfg.eval_split):
        for item in read_manifest(cfg.data_dir, split):
            texts.append(item.question)
            texts.extend(item.choices)
    tok = train_tokenizer(texts, cfg.vocab_size)
    model_cfg = tiny_config(len(tok), tok.convert_tokens_to_ids(AUDIO_TOKEN), tok.pad_token_id)

    def write(tmp: Path) -> None:
        save_checkpoint(build_model(model_cfg, cfg.seed), tok, tmp)
        _write_stage_settings(tmp, wanted)

    return save_atomic(init_dir, write)


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


class _FullSteps(Steps):
    """AdamW steps on every weight of the tiny model, batches grouped by clip length."""

    def __init__(self, cfg: PretrainConfig, loaded: LoadedModel, train, evals) -> None:
        self.cfg, self.loaded, self.model = cfg, loaded, loaded.model
        self.train, self.evals = train, evals
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        self.total = math.ceil(len(train) / cfg.batch_size) * cfg.epochs
        self.lengths = [e.prepared.audio.n_frames for e in train]
        self.pad = loaded.tokenizer.pad_token_id

    def order(self, epoch: int) -> list[list[int]]:
        return list(bucketed_order(self.lengths, self.cfg.batch_size, self.cfg.seed, epoch))

    def start_epoch(self, epoch: int) -> None:
        self.model.train()

    def step(self, idx: list[int], step: int) -> tuple[list[float], int, int]:
        cfg = self.cfg
        for g in self.opt.param_groups:
            g["lr"] = lr_at(step, self.total, cfg.lr, cfg.warmup_steps)
        batch, labels = make_batch([self.train[i] for i in idx], self.pad)
        lp = letter_log_probs(self.model, batch, self.loaded.letter_ids)
        loss = torch.nn.functional.nll_loss(lp, labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        return [loss.item()], int((lp.argmax(-1) == labels).sum()), len(idx)

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict()}

    def restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])

    def evaluate(self) -> dict:
        eval_acc, by_family = accuracy(self.loaded, self.evals)
        split = self.cfg.eval_split
        return {f"{split}_acc": eval_acc, f"{split}_acc_by_family": by_family}


def pretrain(cfg: PretrainConfig, progress: bool = True) -> Path:
    """Run stage 1; returns the checkpoint directory."""
    if (cfg.out_dir / "config.json").exists() and reuse_finished(
        cfg.out_dir, _stage_settings(cfg.out_dir), to_dict(cfg)
    ):
        print(f"[pretrain] {cfg.out_dir} exists with these settings: nothing to do")
        return cfg.out_dir
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    loaded = load_checkpoint(init_dir(cfg))
    train = prepare_split(loaded, cfg.data_dir, cfg.split, progress=progress)
    evals = prepare_split(loaded, cfg.data_dir, cfg.eval_split, progress=progress)
    steps = _FullSteps(cfg, loaded, train, evals)
    run_epochs(
        steps,
        stage="pretrain",
        run_dir=run_dir(cfg.out_dir),
        fp=fingerprint(to_dict(cfg)),
        epochs=cfg.epochs,
        checkpoint_every=cfg.checkpoint_every,
        progress=progress,
    )
    loaded.model.eval()

    def write(tmp: Path) -> None:
        save_checkpoint(loaded.model, loaded.tokenizer, tmp)
        _write_stage_settings(tmp, to_dict(cfg))

    return save_atomic(cfg.out_dir, write)


def run_dir(out_dir: Path) -> Path:
    """Where stage 1 keeps its resumable state and per-epoch log: `<out_dir>.run`."""
    return out_dir.with_name(out_dir.name + ".run")
