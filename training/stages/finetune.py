"""Stage 2: LoRA fine-tuning on `train` with IVON or AdamW through one loop; exports a posterior.

    quaver train --config configs/tiny-ivon.yaml     # or configs/tiny-adamw.yaml

The base model is frozen; PEFT LoRA adapters sit on the configured Linear layers of the top N
decoder layers. Because nothing below the first LoRA layer trains, each clip's hidden states
entering that layer are computed once and cached: a step runs only the LoRA layers above.
IVON draws one weight sample per MC sample per step inside `sampled_params` (the mean is restored
even if the step raises) and learns a Gaussian posterior (mean m, std s) over the LoRA weights;
AdamW learns a point estimate (exported with std 0). The run directory gets a resumable state,
`log.jsonl` per epoch, and `posterior/` in the format of app.posterior.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tqdm import tqdm

from app.forward import choice_log_probs, prefix_hidden, suffix_letter_logits
from app.modeling import LoadedModel, load_checkpoint
from app.posterior import LoRASpec, Posterior, PosteriorError, load_posterior, save_posterior
from training.config import ConfigError, FinetuneConfig, to_dict
from training.ivon import IVON
from training.stages.batches import Example, epoch_order, make_batch, pad_rows, prepare_split
from training.stages.distributed import DistInfo, all_reduce_grads, barrier, setup
from training.stages.loop import (
    append_log,
    fingerprint,
    load_state,
    prefix_cache_key,
    save_state,
)


def lora_spec(loaded: LoadedModel, cfg: FinetuneConfig) -> LoRASpec:
    layers = cfg.lora.layers(loaded.num_layers)
    modules = []
    lm_layers = loaded.family.language_model(loaded.model).layers
    for i in layers:
        prefix = loaded.family.decoder_layer_prefix(i)
        for name, _ in lm_layers[i].named_modules():
            if name.rsplit(".", 1)[-1] in cfg.lora.target_modules:
                modules.append(f"{prefix}.{name}")
    return LoRASpec(cfg.lora.rank, cfg.lora.alpha, tuple(modules), layers, cfg.lora.target_modules)


def module_of(param_name: str) -> tuple[str, str]:
    """PEFT parameter name -> (module path in the base model, "A" or "B")."""
    # e.g. base_model.model.model.language_model.layers.3.mlp.up_proj.lora_A.default.weight
    name = param_name.removeprefix("base_model.model.")
    head, _, tail = name.partition(".lora_")
    return head, tail[0]


class CachedPrefix:
    """Hidden states entering the first LoRA layer, per example (computed once, frozen base).

    With `store`, they are kept on disk under a key of everything they depend on (the base's
    weight files, the data, the split and its limit, the first LoRA layer), so later runs on the
    same base (other seeds, optimizers, hyperparameters) load them instead of recomputing.
    """

    def __init__(
        self,
        model,
        examples: list[Example],
        split: int,
        pad_id: int,
        progress: bool,
        store: Path | None = None,
        key: str = "",
    ):
        self.hidden: list[torch.Tensor] = []
        path = Path(store) / f"{key}.pt" if store is not None else None
        if path is not None and path.exists():
            self.hidden = torch.load(path, weights_only=True)
            if len(self.hidden) == len(examples):
                return
            self.hidden = []
        with torch.no_grad():
            for i in tqdm(
                range(0, len(examples), 16), desc="cache prefix", disable=not progress, leave=False
            ):
                chunk = examples[i : i + 16]
                batch, _ = make_batch(chunk, pad_id)
                h = prefix_hidden(model, batch, split)  # (b, T, d)
                for j, ex in enumerate(chunk):
                    self.hidden.append(h[j, : len(ex.prepared.prompt.ids)].clone())
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")  # concurrent runs may write it too
            torch.save(self.hidden, tmp)
            tmp.replace(path)

    def batch(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_rows([self.hidden[i] for i in idx])


def warm_start(named, loaded: LoadedModel, spec: LoRASpec, init_from: Path) -> None:
    """Copy the mean of posterior `init_from` into the LoRA parameters `named` (PEFT names).

    The earlier run must sit on the same base (config hash) with the same LoRA placement; the
    tensors are checked by `load_posterior` against the model's layers.
    """
    prior = load_posterior(init_from, expected_config_hash=loaded.config_hash, model=loaded.model)
    if (prior.spec.rank, prior.spec.alpha, prior.spec.modules) != (
        spec.rank,
        spec.alpha,
        spec.modules,
    ):
        raise PosteriorError(
            f"init_from {init_from}: its LoRA placement (rank {prior.spec.rank}, alpha "
            f"{prior.spec.alpha}, {len(prior.spec.modules)} modules) differs from this run's "
            f"(rank {spec.rank}, alpha {spec.alpha}, {len(spec.modules)} modules)"
        )
    for name, p in named:
        module, which = module_of(name)
        with torch.no_grad():
            p.copy_(prior.mean[f"{module}.lora_{which}.weight"])


def prefix_key(cfg: FinetuneConfig, data_split: str, limit: int | None, first_layer: int) -> str:
    """Cache key of one split's prefix hidden states (see CachedPrefix)."""
    return prefix_cache_key(cfg.base_dir, cfg.data_dir, data_split, first_layer, limit)


def _log_probs(model, cache, examples, idx, split, letter_ids):
    h, lengths = cache.batch(idx)
    n_choices = torch.tensor([examples[i].prepared.prompt.n_choices for i in idx])
    logits = suffix_letter_logits(model, h, lengths, split, letter_ids)
    return choice_log_probs(logits, n_choices)


@torch.no_grad()
def evaluate_mean(model, cache, examples, split, letter_ids) -> dict:
    """Accuracy / NLL / mean confidence of the current mean weights."""
    lps = []
    for i in range(0, len(examples), 32):
        idx = list(range(i, min(len(examples), i + 32)))
        lps.append(_log_probs(model, cache, examples, idx, split, letter_ids))
    lp = torch.cat(lps)
    labels = torch.tensor([e.label for e in examples])
    return {
        "acc": float((lp.argmax(-1) == labels).float().mean()),
        "nll": float(-lp.gather(1, labels[:, None]).mean()),
        "conf": float(lp.exp().max(-1).values.mean()),
    }


# settings that do not change what a finished run learned
_NOT_RESULT = ("threads", "checkpoint_every", "out_dir", "prefix_cache")


def settings_diff(stored: dict, wanted: dict, prefix: str = "") -> list[str]:
    """'key: stored -> wanted' for each setting that differs, nested keys dotted."""
    out = []
    for key in sorted(set(stored) | set(wanted)):
        if not prefix and key in _NOT_RESULT:
            continue
        a, b = stored.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += settings_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def finetune(cfg: FinetuneConfig, progress: bool = True) -> Path:
    """Run stage 2 and export; returns the posterior directory."""
    post_dir = cfg.out_dir / "posterior"
    if (post_dir / "quaver.json").exists():
        stored = json.loads((post_dir / "quaver.json").read_text()).get("hyperparameters", {})
        diff = settings_diff(stored, to_dict(cfg))
        if diff:
            raise ConfigError(
                f"{post_dir} holds a finished run with other settings ({'; '.join(diff)}): "
                "remove that directory or choose another out_dir"
            )
        print(f"[finetune] {post_dir} exists with these settings: nothing to do")
        return post_dir
    info = setup()  # torchrun: one rank per process; otherwise a single process
    progress = progress and info.is_main
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    loaded = load_checkpoint(cfg.base_dir)
    spec = lora_spec(loaded, cfg)
    split = spec.first_layer
    train = prepare_split(loaded, cfg.data_dir, cfg.split, cfg.limit, progress)
    evals = prepare_split(loaded, cfg.data_dir, cfg.eval_split, progress=progress)
    pad = loaded.tokenizer.pad_token_id
    base = loaded.model
    for p in base.parameters():
        p.requires_grad_(False)
    store = cfg.prefix_cache
    train_cache = CachedPrefix(
        base, train, split, pad, progress, store, prefix_key(cfg, cfg.split, cfg.limit, split)
    )
    eval_cache = CachedPrefix(
        base, evals, split, pad, progress, store, prefix_key(cfg, cfg.eval_split, None, split)
    )
    peft_model = get_peft_model(
        base,
        LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha,
            lora_dropout=0.0,
            target_modules=spec.peft_target_regex(),
        ),
    )
    model = peft_model.base_model.model  # the Qwen2-Audio model, LoRA layers injected
    named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if cfg.init_from is not None:
        warm_start(named, loaded, spec, cfg.init_from)
    if cfg.optimizer == "ivon":
        ic = cfg.ivon
        opt = IVON(
            params,
            lr=ic.lr,
            ess=ic.ess,
            hess_init=ic.hess_init,
            beta1=ic.beta1,
            beta2=ic.beta2,
            weight_decay=ic.weight_decay,
            clip_radius=ic.clip_radius,
            mc_samples=ic.mc_samples,
            rescale_lr=ic.rescale_lr,
            seed=cfg.seed,
            sync=info.enabled,  # torchrun: all-reduce IVON's statistics so ranks agree
        )
        base_lr, mc = ic.lr, ic.mc_samples
    else:
        ac = cfg.adamw
        opt = torch.optim.AdamW(params, lr=ac.lr, betas=ac.betas, weight_decay=ac.weight_decay)
        base_lr, mc = ac.lr, 1
    total = math.ceil(len(train) / cfg.batch_size) * cfg.epochs
    fp = fingerprint(to_dict(cfg))
    state = load_state(cfg.out_dir, fp)
    start_epoch, step, skip = 0, 0, 0
    if state is not None:
        for (_, p), saved in zip(named, state["params"], strict=True):
            p.data.copy_(saved)
        opt.load_state_dict(state["opt"])
        start_epoch, step, skip = state["epoch"], state["step"], state["batch_in_epoch"]
        print(f"[finetune] resuming at epoch {start_epoch + 1}, step {step}")
    letter_ids = loaded.letter_ids
    t0 = time.time()

    def checkpoint(epoch: int, batch_in_epoch: int) -> None:
        save_state(
            cfg.out_dir,
            {
                "fingerprint": fp,
                "params": [p.detach().clone() for p in params],
                "opt": opt.state_dict(),
                "epoch": epoch,
                "step": step,
                "batch_in_epoch": batch_in_epoch,
            },
        )

    for epoch in range(start_epoch, cfg.epochs):
        order = epoch_order(len(train), cfg.batch_size, cfg.seed, epoch)
        losses, hits, seen = [], 0, 0
        bar = tqdm(
            order,
            desc=f"{cfg.optimizer} epoch {epoch + 1}/{cfg.epochs}",
            disable=not progress,
            initial=skip,
            total=len(order),
        )
        for b, idx in enumerate(order):
            if b < skip:
                continue
            lr = base_lr * (0.5 * (1 + math.cos(math.pi * step / total)) if cfg.cosine else 1.0)
            for g in opt.param_groups:
                g["lr"] = lr
            if len(idx) < info.world:  # a last batch too small to share: every rank skips it
                continue
            idx = info.shard(idx)  # this rank's part of the batch
            labels = torch.tensor([train[i].label for i in idx])
            opt.zero_grad(set_to_none=True)
            for _ in range(mc):
                ctx = opt.sampled_params(train=True) if cfg.optimizer == "ivon" else _null()
                with ctx:
                    lp = _log_probs(model, train_cache, train, idx, split, letter_ids)
                    loss = torch.nn.functional.nll_loss(lp, labels)
                    loss.backward()
                losses.append(loss.item())
            if cfg.optimizer == "adamw":
                all_reduce_grads(params, info)
            opt.step()
            step += 1
            hits += int((lp.argmax(-1) == labels).sum())
            seen += len(idx)
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
            if step % cfg.checkpoint_every == 0 and info.is_main:
                checkpoint(epoch, b + 1)
        bar.close()
        skip = 0
        record = {
            "stage": "finetune",
            "optimizer": cfg.optimizer,
            "epoch": epoch + 1,
            "step": step,
            "loss": sum(losses) / max(1, len(losses)),
            "train_acc": hits / max(1, seen),
            "elapsed_s": time.time() - t0,
            **{
                f"{cfg.eval_split}_{k}": v
                for k, v in evaluate_mean(model, eval_cache, evals, split, letter_ids).items()
            },
        }
        if cfg.optimizer == "ivon":
            record["hessian"] = opt.hessian_stats()
            record["std_median"] = float(
                torch.cat([opt.posterior_std(p).flatten() for p in params]).median()
            )
        if info.is_main:
            print(f"[finetune] {record}")
            append_log(cfg.out_dir, record)
            checkpoint(epoch + 1, 0)
    if info.enabled:
        _write_rank_digest(cfg, named, opt, info)
    if info.is_main:
        export(cfg, loaded, spec, named, opt, time.time() - t0)
    barrier(info)
    return post_dir


def _write_rank_digest(cfg: FinetuneConfig, named, opt, info: DistInfo) -> None:
    """Each rank records a digest of its final posterior (ranks must agree exactly)."""
    h = hashlib.sha256()
    for _, p in named:
        h.update(p.detach().float().cpu().numpy().tobytes())
        if cfg.optimizer == "ivon":
            h.update(opt.posterior_std(p).cpu().numpy().tobytes())
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / f"rank{info.rank}.sha256").write_text(h.hexdigest() + "\n")


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def export(
    cfg: FinetuneConfig, loaded: LoadedModel, spec: LoRASpec, named, opt, train_s: float
) -> Path:
    """Write `<out_dir>/posterior` (app.posterior format) from the trained LoRA parameters."""
    mean, std = {}, {}
    for name, p in named:
        module, which = module_of(name)
        key = f"{module}.lora_{which}.weight"
        mean[key] = p.detach().float().clone()
        std[key] = (
            opt.posterior_std(p).float().clone()
            if cfg.optimizer == "ivon"
            else torch.zeros_like(mean[key])
        )
    dataset_meta = json.loads((cfg.data_dir / "dataset.json").read_text())
    meta = {
        "name": cfg.out_dir.name,
        "base": {"path": str(cfg.base_dir), "config_hash": loaded.config_hash},
        "optimizer": cfg.optimizer,
        "hyperparameters": to_dict(cfg),
        "data": {
            "dir": str(cfg.data_dir),
            "split": cfg.split,
            "fingerprint": dataset_meta.get("fingerprint"),
        },
        "train_seconds": train_s,  # unrounded: a 2-step run on a fast machine is < 0.05 s
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return save_posterior(cfg.out_dir / "posterior", Posterior(spec, mean, std, meta))
