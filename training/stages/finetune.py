"""The LoRA stages, IVON or AdamW on the shared loop (training.stages.loop); export a posterior.

    quaver train --config configs/tiny-ivon.yaml      # stage: finetune (stage 2, on `train`)
    quaver train --config configs/default-adapt.yaml  # stage: adapt (the default's stage 1b)

The base model is frozen (in `dtype`, on `device`); PEFT LoRA adapters (fp32) sit on the
configured Linear layers of the top N decoder layers. Because nothing below the first LoRA layer
trains, each clip's hidden states entering that layer are computed once and cached: a step runs
only the LoRA layers above. With LoRA on every layer there is nothing worth caching (the states
entering layer 0 are the spliced embeddings), so they are recomputed per batch (`LivePrefix`).
A step of `batch_size` prompts may run as several micro-batches whose gradients accumulate, and
the LoRA layers may recompute their activations in the backward pass (`gradient_checkpointing`).
IVON draws one weight sample per MC sample per step inside `sampled_params` (the mean is restored
even if the step raises) and learns a Gaussian posterior (mean m, std s) over the LoRA weights;
AdamW learns a point estimate (exported with std 0). The run directory gets a resumable state,
`log.jsonl` per epoch, and `posterior/` in the format of app.posterior (written atomically; its
`hyperparameters` are the settings a later run is compared with).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from app.family import QWEN2_AUDIO
from app.forward import choice_log_probs, suffix_letter_logits
from app.modeling import LoadedModel, load_checkpoint
from app.posterior import LoRASpec, Posterior, PosteriorError, load_posterior, save_posterior
from training.config import FinetuneConfig, to_dict
from training.ivon import IVON
from training.stages.batches import Example, answer_loss, epoch_order, prepare_split
from training.stages.distributed import (
    DistInfo,
    all_reduce_grads,
    barrier,
    resolve_device,
    setup,
)
from training.stages.loop import Steps, fingerprint, reuse_finished, run_epochs, save_atomic
from training.stages.prefix import CachedPrefix, LivePrefix, prefix_cache_key


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


def attach_lora(base, spec: LoRASpec, gradient_checkpointing: bool = False):
    """PEFT LoRA adapters (fp32) on the frozen `base` at `spec`'s modules, in place: returns the
    PEFT model (its `unload()` gives the plain base back) and the trainable (name, parameter)s."""
    for p in base.parameters():
        p.requires_grad_(False)
    if gradient_checkpointing:  # checkpointed in train mode only (_LoRASteps.start_epoch)
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = get_peft_model(
        base,
        LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha,
            lora_dropout=0.0,
            target_modules=spec.peft_target_regex(),
        ),
    )
    named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    for _, p in named:  # PEFT keeps adapters in fp32 on a bf16 base; make it a guarantee
        p.data = p.data.float()
    return peft_model, named


def module_of(param_name: str) -> tuple[str, str]:
    """PEFT parameter name -> (module path in the base model, "A" or "B")."""
    # e.g. base_model.model.model.language_model.layers.3.mlp.up_proj.lora_A.default.weight
    name = param_name.removeprefix("base_model.model.")
    head, _, tail = name.partition(".lora_")
    return head, tail[0]


def warm_start(named, loaded: LoadedModel, spec: LoRASpec, init_from: Path) -> None:
    """Copy the mean of posterior `init_from` into the LoRA parameters `named` (PEFT names).

    The earlier run must sit on the same base (config hash) with the same LoRA placement; the
    tensors are checked by `load_posterior` against the model's layers.
    """
    prior = load_posterior(init_from, expected_base=loaded.identity, model=loaded.model)
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
    return prefix_cache_key(
        cfg.base_dir, cfg.data_dir, data_split, first_layer, limit, dtype=cfg.dtype
    )


def _log_probs(model, cache, examples, idx, split, letter_ids, family=QWEN2_AUDIO):
    h, lengths = cache.batch(idx)
    n_choices = torch.tensor([examples[i].prepared.prompt.n_choices for i in idx])
    logits = suffix_letter_logits(model, h, lengths, split, letter_ids, family)
    return choice_log_probs(logits, n_choices.to(logits.device))


@torch.no_grad()
def evaluate_mean(model, cache, examples, split, letter_ids, family=QWEN2_AUDIO) -> dict:
    """Accuracy / NLL / mean confidence of the current mean weights."""
    lps = []
    for i in range(0, len(examples), 32):
        idx = list(range(i, min(len(examples), i + 32)))
        lps.append(_log_probs(model, cache, examples, idx, split, letter_ids, family).cpu())
    lp = torch.cat(lps)
    labels = torch.tensor([e.label for e in examples])
    return {
        "acc": float((lp.argmax(-1) == labels).float().mean()),
        "nll": float(-lp.gather(1, labels[:, None]).mean()),
        "conf": float(lp.exp().max(-1).values.mean()),
    }


class _LoRASteps(Steps):
    """IVON or AdamW steps on the LoRA parameters, over the cached prefix hidden states."""

    def __init__(
        self,
        cfg: FinetuneConfig,
        model,
        params: list[torch.Tensor],
        opt,
        data: tuple[list[Example], CachedPrefix, list[Example], CachedPrefix],
        split: int,
        loaded: LoadedModel,
        info: DistInfo,
    ) -> None:
        self.cfg, self.model, self.params, self.opt = cfg, model, params, opt
        self.train, self.cache, self.evals, self.eval_cache = data
        self.split, self.letter_ids, self.info = split, loaded.letter_ids, info
        self.family = loaded.family
        # the LoRA layers, put in train mode for gradient checkpointing (no dropout in them)
        self.lora_layers = loaded.family.language_model(model).layers[split:]
        ivon = cfg.optimizer == "ivon"
        self.base_lr = cfg.ivon.lr if ivon else cfg.adamw.lr
        self.mc = cfg.ivon.mc_samples if ivon else 1
        self.total = math.ceil(len(self.train) / cfg.batch_size) * cfg.epochs

    def order(self, epoch: int) -> list[list[int]]:
        return epoch_order(len(self.train), self.cfg.batch_size, self.cfg.seed, epoch)

    def start_epoch(self, epoch: int) -> None:
        if self.cfg.gradient_checkpointing:  # HF layers checkpoint only in train mode
            self.lora_layers.train()

    def _amp(self):
        """torch.autocast(bfloat16) on the model's device when `autocast` is set, else a no-op."""
        if not self.cfg.autocast:
            return _null()
        device = next(self.model.parameters()).device.type
        return torch.autocast(device_type=device, dtype=torch.bfloat16)

    def _micro_batches(self, idx: list[int]) -> list[tuple[list[int], float]]:
        """(indices, weight) of the passes of one step: weights are the micro-batch's share of
        the step's items, so the accumulated gradient is the mean over the whole batch."""
        size = self.cfg.micro_batch_size
        if size is None or size >= len(idx):
            return [(idx, 1.0)]
        return [
            (idx[i : i + size], len(idx[i : i + size]) / len(idx)) for i in range(0, len(idx), size)
        ]

    def step(self, idx: list[int], step: int) -> tuple[list[float], int, int] | None:
        cfg, opt = self.cfg, self.opt
        cos = 0.5 * (1 + math.cos(math.pi * step / self.total))
        for g in opt.param_groups:
            g["lr"] = self.base_lr * (cos if cfg.cosine else 1.0)
        if len(idx) < self.info.world:  # a last batch too small to share: every rank skips it
            return None
        idx = self.info.shard(idx)  # this rank's part of the batch
        opt.zero_grad(set_to_none=True)
        losses, hits = [], 0
        for _ in range(self.mc):
            ctx = opt.sampled_params(train=True) if cfg.optimizer == "ivon" else _null()
            loss_sum, hits = 0.0, 0
            with ctx:
                for part, weight in self._micro_batches(idx):
                    with self._amp():
                        lp = _log_probs(
                            self.model, self.cache, self.train, part, self.split,
                            self.letter_ids, self.family,
                        ).float()  # fmt: skip
                    rows = [self.train[i] for i in part]
                    labels = torch.tensor([e.label for e in rows], device=lp.device)
                    uniform = torch.tensor(
                        [cfg.uniform_controls and e.is_control for e in rows], device=lp.device
                    )
                    loss = answer_loss(lp, labels, uniform)
                    (loss if weight == 1.0 else loss * weight).backward()
                    loss_sum += loss.item() * weight
                    hits += int((lp.argmax(-1) == labels).sum())
            losses.append(loss_sum)
        if cfg.optimizer == "adamw":
            all_reduce_grads(self.params, self.info)
        opt.step()
        return losses, hits, len(idx)

    def state(self) -> dict:
        return {"params": [p.detach().clone() for p in self.params], "opt": self.opt.state_dict()}

    def restore(self, state: dict) -> None:
        for p, saved in zip(self.params, state["params"], strict=True):
            p.data.copy_(saved)
        self.opt.load_state_dict(state["opt"])

    def evaluate(self) -> dict:
        cfg, opt = self.cfg, self.opt
        self.lora_layers.eval()
        metrics = evaluate_mean(
            self.model, self.eval_cache, self.evals, self.split, self.letter_ids, self.family
        )
        self.start_epoch(0)  # back to train mode for the next epoch's steps
        record = {f"{cfg.eval_split}_{k}": v for k, v in metrics.items()}
        if cfg.optimizer == "ivon":
            record["hessian"] = opt.hessian_stats()  # with the posterior std's min/median/max
        return record


def finished_settings(post_dir: Path) -> dict | None:
    """The settings a finished run's posterior records (None when there is none)."""
    meta = post_dir / "quaver.json"
    if not meta.exists():
        return None
    return json.loads(meta.read_text()).get("hyperparameters")


def finetune(cfg: FinetuneConfig, progress: bool = True) -> Path:
    """Run the LoRA stage and export; returns the posterior directory."""
    post_dir = cfg.out_dir / "posterior"
    if post_dir.exists() and reuse_finished(post_dir, finished_settings(post_dir), to_dict(cfg)):
        print(f"[{cfg.stage}] {post_dir} exists with these settings: nothing to do")
        return post_dir
    device = resolve_device(cfg.device)
    info = setup(device)  # torchrun: one rank per process; otherwise a single process
    progress = progress and info.is_main
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    loaded = load_checkpoint(cfg.base_dir, device=device, dtype=getattr(torch, cfg.dtype))
    spec = lora_spec(loaded, cfg)
    split = spec.first_layer
    train = prepare_split(loaded, cfg.data_dir, cfg.split, cfg.limit, progress)
    evals = prepare_split(loaded, cfg.data_dir, cfg.eval_split, progress=progress)
    pad = loaded.tokenizer.pad_token_id
    base = loaded.model
    store, fam = cfg.prefix_cache, loaded.family
    if split == 0:  # LoRA on every layer: nothing below it worth keeping
        train_cache = LivePrefix(base, train, split, pad, fam)
        eval_cache = LivePrefix(base, evals, split, pad, fam)
    else:
        train_key = prefix_key(cfg, cfg.split, cfg.limit, split)
        eval_key = prefix_key(cfg, cfg.eval_split, None, split)
        train_cache = CachedPrefix(base, train, split, pad, progress, store, train_key, fam)
        eval_cache = CachedPrefix(base, evals, split, pad, progress, store, eval_key, fam)
    peft_model, named = attach_lora(base, spec, cfg.gradient_checkpointing)
    model = peft_model.base_model.model  # the base model, LoRA layers injected
    params = [p for _, p in named]
    if cfg.init_from is not None:
        warm_start(named, loaded, spec, cfg.init_from)
    opt = make_optimizer(cfg, params, sync=info.enabled)
    data = (train, train_cache, evals, eval_cache)
    steps = _LoRASteps(cfg, model, params, opt, data, split, loaded, info)
    train_s = run_epochs(
        steps,
        stage=cfg.stage,
        run_dir=cfg.out_dir,
        fp=fingerprint(to_dict(cfg)),
        epochs=cfg.epochs,
        header={"optimizer": cfg.optimizer},
        checkpoint_every=cfg.checkpoint_every,
        progress=progress,
        is_main=info.is_main,
        desc=cfg.optimizer,
    )
    if info.enabled:
        _write_rank_digest(cfg, named, opt, info)
    if info.is_main:
        save_atomic(post_dir, lambda tmp: export(cfg, loaded, spec, named, opt, train_s, tmp))
    barrier(info)
    return post_dir


def make_optimizer(cfg: FinetuneConfig, params: list, sync: bool = False):
    """The stage's optimizer, chosen once: IVON (a posterior) or AdamW (a point estimate)."""
    if cfg.optimizer == "ivon":
        ic = cfg.ivon
        return IVON(
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
            sync=sync,  # torchrun: all-reduce IVON's statistics so ranks agree
        )
    ac = cfg.adamw
    return torch.optim.AdamW(params, lr=ac.lr, betas=ac.betas, weight_decay=ac.weight_decay)


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
    cfg: FinetuneConfig,
    loaded: LoadedModel,
    spec: LoRASpec,
    named,
    opt,
    train_s: float,
    out: Path | None = None,
) -> Path:
    """Write the posterior (app.posterior format) from the trained LoRA parameters into `out`
    (default `<out_dir>/posterior`)."""
    mean, std = {}, {}
    for name, p in named:
        module, which = module_of(name)
        key = f"{module}.lora_{which}.weight"
        mean[key] = p.detach().float().cpu().clone()  # fp32 on the host, whatever the base
        std[key] = (
            opt.posterior_std(p).float().cpu().clone()
            if cfg.optimizer == "ivon"
            else torch.zeros_like(mean[key])
        )
    dataset_meta = json.loads((cfg.data_dir / "dataset.json").read_text())
    meta = {
        "name": cfg.out_dir.name,
        "base": {
            "path": str(cfg.base_dir),
            "identity": loaded.identity,
            "config_hash": loaded.config_hash,
        },
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
    out = cfg.out_dir / "posterior" if out is None else out
    return save_posterior(out, Posterior(spec, mean, std, meta))
