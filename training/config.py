"""Typed configs of the training pipeline, loaded from YAML (`configs/*.yaml`).

Every field has a comment saying what it does; `__post_init__` validates up front so a bad config
fails before any work starts. YAML files hold plain values only (no class names).

    cfg = load_config("configs/tiny-ivon.yaml", FinetuneConfig)
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from app.family import DECODER_LINEARS


class ConfigError(ValueError):
    """A config file or value that cannot be used."""


@dataclass
class LoRAConfig:
    rank: int = 8  # LoRA rank r
    alpha: float = 16.0  # LoRA alpha; the update is (alpha / r) * B @ A
    target_modules: tuple[str, ...] = DECODER_LINEARS  # leaf Linear names in each decoder layer
    top_layers: int | None = None  # LoRA only in the top N decoder layers (None = all layers)

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        if self.rank < 1 or self.alpha <= 0:
            raise ConfigError(
                f"lora: rank must be >= 1 and alpha > 0, got {self.rank}, {self.alpha}"
            )
        bad = set(self.target_modules) - set(DECODER_LINEARS)
        if bad or not self.target_modules:
            raise ConfigError(
                f"lora.target_modules must be a subset of {DECODER_LINEARS}, got {bad}"
            )
        if self.top_layers is not None and self.top_layers < 1:
            raise ConfigError("lora.top_layers must be >= 1 or null (all layers)")

    def layers(self, num_layers: int) -> tuple[int, ...]:
        n = num_layers if self.top_layers is None else min(self.top_layers, num_layers)
        return tuple(range(num_layers - n, num_layers))


@dataclass
class IVONConfig:
    lr: float = 0.03  # learning rate of the mean (cosine-decayed when `cosine`)
    ess: float = 1e7  # effective sample size lambda (inverse temperature of the posterior)
    hess_init: float = 1e-3  # initial Hessian estimate h0; initial std = 1/sqrt(ess*(h0+wd))
    beta1: float = 0.9  # momentum of the gradient
    beta2: float = 0.99999  # decay of the Hessian estimate (lower it for short runs)
    weight_decay: float = 0.0  # weight decay = prior precision delta
    clip_radius: float = 1e-3  # elementwise clip of the preconditioned step (inf = none)
    mc_samples: int = 1  # weight samples (forward/backward passes) per training step
    rescale_lr: bool = False  # multiply lr by (hess_init + wd), the reference's default mode

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.ess <= 0 or self.hess_init <= 0:
            raise ConfigError("ivon: lr, ess and hess_init must be positive")
        if not (0 <= self.beta1 < 1 and 0 < self.beta2 < 1):
            raise ConfigError("ivon: need 0 <= beta1 < 1 and 0 < beta2 < 1")
        if self.weight_decay < 0 or self.clip_radius <= 0 or self.mc_samples < 1:
            raise ConfigError("ivon: weight_decay >= 0, clip_radius > 0, mc_samples >= 1")

    @property
    def initial_std(self) -> float:
        return 1.0 / math.sqrt(self.ess * (self.hess_init + self.weight_decay))


@dataclass
class AdamWConfig:
    lr: float = 5e-5  # learning rate (cosine-decayed when `cosine`)
    weight_decay: float = 0.0  # decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # Adam moment decays

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError("adamw: lr must be positive and weight_decay >= 0")


@dataclass
class PretrainConfig:
    """Stage 1: build and train the tiny base model (full weights, AdamW) on `pretrain`."""

    STAGES: typing.ClassVar[tuple[str, ...]] = ("pretrain",)  # values `stage` may take
    stage: str = "pretrain"  # the stage this config is for (the only one: pretrain)
    data_dir: Path = Path("data/bench")  # benchmark directory (from `quaver data`)
    out_dir: Path = Path("artifacts/tiny-base")  # checkpoint directory written at the end
    split: str = "pretrain"  # training split
    eval_split: str = "calib"  # split whose accuracy is logged per epoch
    vocab_size: int = 1024  # tokenizer vocabulary (trained on the benchmark text)
    epochs: int = 6  # passes over the split
    batch_size: int = 16  # prompts per step
    lr: float = 2e-3  # AdamW learning rate (cosine with warm-up)
    warmup_steps: int = 50  # linear warm-up steps
    weight_decay: float = 0.01  # AdamW weight decay
    seed: int = 0  # seed of init, shuffling and dropout
    checkpoint_every: int = 0  # steps between resumable checkpoints (0 = at epoch ends only)
    threads: int = 0  # torch threads (0 = torch's default)

    def __post_init__(self) -> None:
        self.data_dir, self.out_dir = Path(self.data_dir), Path(self.out_dir)
        _check_stage(self)
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("pretrain: epochs, batch_size and lr must be positive")


@dataclass
class FinetuneConfig:
    """A LoRA stage on a frozen base, IVON or AdamW through the same loop: `finetune` (stage 2,
    the limited-data fine-tuning on `train`) or `adapt` (the default's stage 1b, AdamW on the
    broad `pretrain` split, whose adapter stage 2 starts from)."""

    STAGES: typing.ClassVar[tuple[str, ...]] = ("finetune", "adapt")  # values `stage` may take
    stage: str = "finetune"  # "finetune" or "adapt": a label of the run (logs, messages)
    base_dir: Path = Path("artifacts/tiny-base")  # base checkpoint (stage 1 output or build-base)
    data_dir: Path = Path("data/bench")  # benchmark directory
    out_dir: Path = Path("runs/tiny-ivon")  # run directory: checkpoints, log, exported posterior
    optimizer: str = "ivon"  # "ivon" or "adamw"
    split: str = "train"  # fine-tuning split
    eval_split: str = "calib"  # split evaluated per epoch (never `test`)
    epochs: int = 3  # passes over the split
    batch_size: int = 8  # prompts per step
    cosine: bool = True  # cosine decay of the learning rate to 0
    seed: int = 0  # seed of LoRA init, shuffling and IVON noise
    limit: int | None = None  # use only the first N training items (None = all)
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # where the adapters sit
    ivon: IVONConfig = field(default_factory=IVONConfig)  # used when optimizer == "ivon"
    adamw: AdamWConfig = field(default_factory=AdamWConfig)  # used when optimizer == "adamw"
    # Folder keeping the hidden states below the first LoRA layer on disk, shared by every run on
    # the same base, data split and first LoRA layer (other seeds, optimizers, hyperparameters);
    # None keeps them in memory for this run only.
    prefix_cache: Path | None = None
    # Posterior directory of an earlier run on the same base with the same LoRA placement (e.g.
    # the default's stage 1b, `configs/default-adapt.yaml`): its mean initialises the adapter
    # instead of PEFT's init (A random, B = 0). None = PEFT's init.
    init_from: Path | None = None
    checkpoint_every: int = 50  # steps between resumable checkpoints
    threads: int = 0  # torch threads (0 = torch's default)
    # Where the base runs: "cpu", "cuda", "cuda:N" or "auto" (cuda when present); under torchrun
    # "cuda" is each rank's own GPU (LOCAL_RANK).
    device: str = "cpu"
    # dtype of the frozen base weights: "float32" or "bfloat16". LoRA parameters, IVON state and
    # the exported posterior are float32 whatever this is.
    dtype: str = "float32"
    # Run the forward passes under torch.autocast(bfloat16) on `device`: matmuls in bf16 on a
    # float32 base (the usual mixed precision of GPU training). LoRA parameters, their gradients,
    # the IVON state and the exported posterior stay float32. Changes the result (bf16 rounding).
    autocast: bool = False
    # Recompute each LoRA decoder layer's activations in the backward pass instead of keeping
    # them (memory for about a third more compute); same result.
    gradient_checkpointing: bool = False
    # Prompts per forward/backward pass: a step of `batch_size` prompts accumulates the gradients
    # of batch_size / micro_batch_size passes (same result up to rounding); None = one pass.
    micro_batch_size: int | None = None
    # Train control items (family "control": silence, noise or unrelated audio under a question)
    # towards the uniform distribution over their choices instead of the answer of the item they
    # were made from, which the audio no longer holds (outlier exposure; docs/sweeps.md).
    uniform_controls: bool = False

    def __post_init__(self) -> None:
        self.base_dir, self.data_dir, self.out_dir = (
            Path(self.base_dir),
            Path(self.data_dir),
            Path(self.out_dir),
        )
        if self.prefix_cache is not None:
            self.prefix_cache = Path(self.prefix_cache)
        if self.init_from is not None:
            self.init_from = Path(self.init_from)
        _check_stage(self)
        if self.optimizer not in ("ivon", "adamw"):
            raise ConfigError(f"optimizer must be 'ivon' or 'adamw', got {self.optimizer!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("finetune: epochs and batch_size must be >= 1")
        if self.eval_split == "test":
            raise ConfigError("eval_split must not be 'test': tune on calib, report on test")
        check_device(self.device, self.dtype)
        if self.micro_batch_size is not None and not 1 <= self.micro_batch_size <= self.batch_size:
            raise ConfigError(
                f"micro_batch_size must be in 1..batch_size ({self.batch_size}), "
                f"got {self.micro_batch_size}"
            )


DTYPES = ("float32", "bfloat16")  # base-weight dtypes a stage may use


def check_device(device: str, dtype: str) -> None:
    """`device` is cpu / cuda / cuda:N / auto and `dtype` one of DTYPES, or a ConfigError."""
    if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", str(device)):
        raise ConfigError(f"device must be cpu, cuda, cuda:N or auto, got {device!r}")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


STAGES = ("pretrain", "adapt", "finetune")  # the values of a config's `stage` key


def _check_stage(cfg) -> None:
    _check_stage_name(type(cfg), cfg.stage)


def _check_stage_name(cls, stage) -> None:
    if stage not in cls.STAGES:
        raise ConfigError(f"{cls.__name__}: stage {stage!r} is not one of {', '.join(cls.STAGES)}")


def _coerce_number(owner: str, key: str, hint, value):
    """Numbers for `float` / `int` fields, or one clear error.

    YAML 1.1 reads `1e5` (no dot, no exponent sign) as a string, and `--set ivon.ess=1e5` is the
    natural way to type it; without this the dataclass check would fail with a bare TypeError.
    """
    if hint is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{owner}.{key}: expected a number, got {value!r}") from None
    if hint is int and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{owner}.{key}: expected an integer, got {value!r}") from None
    return value


def _build(cls, data: dict):
    """Instantiate dataclass `cls` from a dict, recursing into dataclass-typed fields."""
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = _build(hint, value)
        kwargs[key] = _coerce_number(cls.__name__, key, hint, value)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from exc


def load_config(path: str | Path, cls, overrides: dict | None = None):
    """Read a YAML file into config dataclass `cls`; `overrides` (dotted keys) win.

    The file's top-level `stage` key (pretrain / adapt / finetune) is a field of the config and
    is validated against `cls` (a pretrain file read as a LoRA stage is refused).
    """
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    if "stage" in data:  # before the other keys: a file of another stage fails on its name
        _check_stage_name(cls, data["stage"])
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return _build(cls, data)


def to_dict(cfg) -> dict:
    """JSON-friendly dict of a config dataclass (paths and tuples as JSON types)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
