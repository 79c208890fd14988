"""The posterior directory: IVON's Gaussian over the LoRA weights, as written by `quaver export`.

    posterior.safetensors      fp32 "<module>.lora_A.weight.mean" / ".std", same for lora_B
    adapter_model.safetensors  the mean as a plain PEFT adapter ("base_model.model.<module>...")
    adapter_config.json        PEFT LoRA config for that adapter
    quaver.json                format_version, base (path, identity, config_hash), lora spec,
                               optimizer and its hyperparameters, data fingerprint, metrics,
                               calibration table

`<module>` is the module path inside `Qwen2AudioForConditionalGeneration`, e.g.
`model.language_model.layers.3.self_attn.q_proj`. lora_A is (r, in_features), lora_B is
(out_features, r); the LoRA update of a weight is `(alpha / r) * B @ A`.

`load_posterior` checks everything before a server starts and fails with one clear message.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
POSTERIOR_FILE = "posterior.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
META_FILE = "quaver.json"
PEFT_PREFIX = "base_model.model."


class PosteriorError(ValueError):
    """A posterior directory that does not match the model or is malformed."""


@dataclass(frozen=True)
class LoRASpec:
    """Where the LoRA adapters sit and how they scale."""

    rank: int
    alpha: float
    modules: tuple[
        str, ...
    ]  # module paths carrying LoRA, e.g. model.language_model.layers.3.mlp.up_proj
    layers: tuple[int, ...]  # decoder layers that carry LoRA
    target_modules: tuple[str, ...]  # leaf names, e.g. q_proj

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def first_layer(self) -> int:
        """The first decoder layer with LoRA: below it, all posterior samples compute the same."""
        return min(self.layers)

    def peft_target_regex(self) -> str:
        """A PEFT `target_modules` regex matching exactly `modules` (full match)."""
        return "^(?:" + "|".join(re.escape(m) for m in self.modules) + ")$"

    def to_json(self) -> dict:
        return {
            **asdict(self),
            "modules": list(self.modules),
            "layers": list(self.layers),
            "target_modules": list(self.target_modules),
        }

    @classmethod
    def from_json(cls, d: dict) -> LoRASpec:
        return cls(
            int(d["rank"]),
            float(d["alpha"]),
            tuple(d["modules"]),
            tuple(d["layers"]),
            tuple(d["target_modules"]),
        )


@dataclass
class Posterior:
    """Mean and std of every LoRA factor, plus the metadata of quaver.json."""

    spec: LoRASpec
    mean: dict[str, torch.Tensor]  # "<module>.lora_A.weight" -> (r, in); lora_B -> (out, r)
    std: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def name(self) -> str:
        return str(self.meta.get("name") or (self.path.name if self.path else "posterior"))

    @property
    def calibration(self) -> dict | None:
        return self.meta.get("calibration")

    def factor(self, module: str, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        key = f"{module}.lora_{which}.weight"
        return self.mean[key], self.std[key]


def _umask() -> int:
    """The process's umask, read without changing it (os.umask can only set it, which would
    briefly change it for every thread); 0o022 where /proc does not say."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def save_tensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """safetensors' `save_file`, with the mode of any other file this process writes.
    safetensors creates its files 0600, so a posterior exported by one user could not be served
    by another (the image's service user, a directory mounted into the container)."""
    path = Path(path)
    save_file(tensors, str(path), metadata=metadata)
    path.chmod(0o666 & ~_umask())
    return path


def tensor_keys(spec: LoRASpec) -> list[str]:
    return [f"{m}.lora_{w}.weight" for m in spec.modules for w in ("A", "B")]


def save_posterior(out_dir: str | Path, posterior: Posterior) -> Path:
    """Write the posterior directory (see module docstring); returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key in tensor_keys(posterior.spec):
        tensors[f"{key}.mean"] = posterior.mean[key].detach().float().cpu().contiguous()
        tensors[f"{key}.std"] = posterior.std[key].detach().float().cpu().contiguous()
    save_tensors(tensors, out / POSTERIOR_FILE, metadata={"format": "quaver-posterior"})
    adapter = {PEFT_PREFIX + k: v for k, v in tensors.items() if k.endswith(".mean")}
    adapter = {k.removesuffix(".mean"): v for k, v in adapter.items()}
    save_tensors(adapter, out / ADAPTER_FILE, metadata={"format": "pt"})
    spec = posterior.spec
    peft_cfg = {
        "peft_type": "LORA",
        "task_type": None,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": spec.peft_target_regex(),
        "fan_in_fan_out": False,
        "inference_mode": True,
        "base_model_name_or_path": str(posterior.meta.get("base", {}).get("path", "")),
    }
    (out / ADAPTER_CONFIG).write_text(json.dumps(peft_cfg, indent=2))
    meta = {**posterior.meta, "format_version": FORMAT_VERSION, "lora": spec.to_json()}
    (out / META_FILE).write_text(json.dumps(meta, indent=2, default=float))
    return out


def check_base(path: Path, meta: dict, expected_base: str) -> None:
    """Refuse a posterior trained on another base than the loaded one (identity `expected_base`)."""
    base = meta.get("base", {})
    trained_on = base.get("identity")
    if trained_on is None:
        raise PosteriorError(
            f"posterior {path} records no base identity (base.identity in {META_FILE}): "
            "export it again with this Quaver"
        )
    if trained_on != expected_base:
        raise PosteriorError(
            f"posterior {path} was trained on base {base.get('path')!r} (identity "
            f"{str(trained_on)[:12]}), but the loaded base has identity {expected_base[:12]}: "
            "use the matching base model or posterior"
        )


def load_posterior(
    path: str | Path,
    *,
    expected_base: str | None = None,
    model: torch.nn.Module | None = None,
) -> Posterior:
    """Read and validate a posterior directory.

    Checks: files present, format version, every tensor present with fp32 dtype and the right
    shape (against `model`'s Linear layers when given), finite means, finite positive stds, and the
    identity of the base it was trained on (when `expected_base`, the loaded base's
    `app.modeling.base_identity`, is given).
    """
    p = Path(path)
    if not p.is_dir():
        raise PosteriorError(f"posterior directory {p} does not exist")
    for name in (POSTERIOR_FILE, META_FILE):
        if not (p / name).exists():
            raise PosteriorError(f"posterior {p} is missing {name}")
    try:
        meta = json.loads((p / META_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise PosteriorError(f"{p / META_FILE} is not valid JSON: {exc}") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise PosteriorError(
            f"posterior {p} has format_version {meta.get('format_version')}, "
            f"this Quaver reads {FORMAT_VERSION}"
        )
    try:
        spec = LoRASpec.from_json(meta["lora"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PosteriorError(f"posterior {p}: bad 'lora' section in {META_FILE}: {exc}") from exc
    if expected_base is not None:
        check_base(p, meta, expected_base)
    try:
        tensors = load_file(p / POSTERIOR_FILE)
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise PosteriorError(f"cannot read {p / POSTERIOR_FILE}: {exc}") from exc
    mean, std = {}, {}
    modules = dict(model.named_modules()) if model is not None else {}
    for key in tensor_keys(spec):
        for part, store in (("mean", mean), ("std", std)):
            name = f"{key}.{part}"
            if name not in tensors:
                raise PosteriorError(f"posterior {p} is missing tensor {name}")
            t = tensors[name]
            if t.dtype != torch.float32:
                raise PosteriorError(f"tensor {name} is {t.dtype}, expected float32")
            if not torch.isfinite(t).all():
                raise PosteriorError(f"tensor {name} has NaN or infinite values")
            if part == "std" and (t < 0).any():
                raise PosteriorError(f"tensor {name} has negative standard deviations")
            store[key] = t
        if mean[key].shape != std[key].shape:
            raise PosteriorError(
                f"{key}: mean shape {tuple(mean[key].shape)} != std shape {tuple(std[key].shape)}"
            )
    for module_name in spec.modules:
        a, b = mean[f"{module_name}.lora_A.weight"], mean[f"{module_name}.lora_B.weight"]
        if a.shape[0] != spec.rank or b.shape[1] != spec.rank:
            raise PosteriorError(
                f"{module_name}: LoRA shapes {tuple(a.shape)}, {tuple(b.shape)} "
                f"do not have rank {spec.rank}"
            )
        if model is not None:
            lin = modules.get(module_name)
            if lin is None or not hasattr(lin, "in_features"):
                raise PosteriorError(f"posterior targets {module_name}, which the model lacks")
            want_a, want_b = (spec.rank, lin.in_features), (lin.out_features, spec.rank)
            if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                raise PosteriorError(
                    f"{module_name}: posterior shapes {tuple(a.shape)}, {tuple(b.shape)} "
                    f"!= model's {want_a}, {want_b}"
                )
    if not math.isfinite(spec.scale) or spec.rank <= 0:
        raise PosteriorError(f"bad LoRA rank/alpha: {spec.rank}/{spec.alpha}")
    return Posterior(spec, mean, std, meta, p)
