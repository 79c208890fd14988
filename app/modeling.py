"""Loading a checkpoint directory of a supported model family (app.family).

One loader for every model Quaver serves or trains: the tiny random-init model, the embedded
default assembled by `quaver build-base`, and any local checkpoint in the published layout of
Qwen2-Audio-7B-Instruct or Qwen2.5-Omni-3B/7B (config.json + safetensors weights + tokenizer files
+ preprocessor_config.json). The family is read from config.json's `model_type`. Nothing is
fetched from a hub: `local_files_only` is always set.

    from app.modeling import load_checkpoint
    ckpt = load_checkpoint("artifacts/base")   # -> LoadedModel(model, tokenizer, features, ...)
    ckpt.identity                              # sha256 of the weights + tokenizer + config

A base is identified by its content (`base_identity`): a posterior records the identity of the
base it was trained on and refuses any other, even one of the same shape. The identity is
computed once, when a checkpoint is saved or first loaded, and stored beside the weights in
`quaver_identity.json` together with each hashed file's size and mtime; a file rewritten since
is noticed by its stamp and the identity recomputed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, PretrainedConfig

from app.audio import FeatureExtractor
from app.family import ModelFamily, family_for
from app.prompt import PromptBuilder

# Keys of config.to_dict() that do not change the computation.
_VOLATILE_KEYS = {
    "transformers_version",
    "_name_or_path",
    "architectures",
    "dtype",
    "torch_dtype",
    "_commit_hash",
    "_attn_implementation_autoset",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
}


IDENTITY_FILE = "quaver_identity.json"
# What a base's identity covers besides its *.safetensors weights: the architecture, the audio
# features and the tokenizer (a locally trained tokenizer differs between bases of one shape).
IDENTITY_FILES = (
    "config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


class ModelLoadError(RuntimeError):
    """A model directory that cannot be loaded (missing files, wrong architecture)."""


def _canonical(obj):
    if isinstance(obj, dict):
        return {k: _canonical(v) for k, v in sorted(obj.items()) if k not in _VOLATILE_KEYS}
    if isinstance(obj, list | tuple):
        return [_canonical(v) for v in obj]
    return obj


def config_hash(config: PretrainedConfig) -> str:
    """sha256 of the canonical JSON of a model config (identifies the architecture + vocab)."""
    blob = json.dumps(_canonical(config.to_dict()), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _identity_files(model_dir: Path) -> list[Path]:
    return sorted(
        p
        for p in model_dir.iterdir()
        if p.is_file() and (p.name in IDENTITY_FILES or p.suffix == ".safetensors")
    )


def base_identity(model_dir: str | Path) -> str:
    """sha256 of a checkpoint's weights, tokenizer and config files (names and bytes).

    Read from `quaver_identity.json` when every hashed file still has the size and mtime stored
    there; otherwise computed (about 1 s per GB) and stored, when the folder is writable.
    """
    path = Path(model_dir)
    files = _identity_files(path)
    stamp = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}
    try:
        stored = json.loads((path / IDENTITY_FILE).read_text())
        if stored.get("files") == stamp:
            return str(stored["identity"])
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0")
        with p.open("rb") as f:
            for block in iter(lambda f=f: f.read(1 << 22), b""):
                h.update(block)
    identity = h.hexdigest()
    tmp = path / f".{IDENTITY_FILE}.{os.getpid()}"
    try:
        tmp.write_text(json.dumps({"identity": identity, "files": stamp}, indent=2) + "\n")
        os.replace(tmp, path / IDENTITY_FILE)
    except OSError:  # a read-only checkpoint: the identity is recomputed at each load
        with contextlib.suppress(OSError):  # on a read-only file system unlink fails too
            tmp.unlink(missing_ok=True)
    return identity


@dataclass
class LoadedModel:
    """A model with everything needed to turn (audio, question, choices) into letter scores."""

    model: nn.Module  # e.g. Qwen2AudioForConditionalGeneration, an Omni thinker
    tokenizer: object
    features: FeatureExtractor
    prompts: PromptBuilder
    family: ModelFamily
    path: Path
    config_hash: str  # the architecture (config) alone
    identity: str  # the content: weights, tokenizer, config (`base_identity`)

    @property
    def letter_ids(self) -> torch.Tensor:
        return torch.tensor(self.prompts.letter_ids, dtype=torch.long, device=self.device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_layers(self) -> int:
        return len(self.family.language_model(self.model).layers)


def _n_mels(model_dir: Path, config) -> int:
    pre = model_dir / "preprocessor_config.json"
    if pre.exists():
        return int(
            json.loads(pre.read_text()).get("feature_size", config.audio_config.num_mel_bins)
        )
    return int(config.audio_config.num_mel_bins)


def checkpoint_family(model_dir: str | Path) -> ModelFamily:
    """The family of a checkpoint directory, from its config.json `model_type`."""
    path = Path(model_dir)
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except FileNotFoundError:
        raise ModelLoadError(f"{path} is not a model directory (no config.json)") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path / 'config.json'}: {exc}") from exc
    try:
        return family_for(str(model_type))
    except ValueError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc


def load_checkpoint(
    model_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """Load model + tokenizer + feature settings from a local directory (eval mode); the family
    is the checkpoint's own (`checkpoint_family`)."""
    path = Path(model_dir)
    family = checkpoint_family(path)
    try:
        model = family.load_model(path, dtype)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model from {path}: {exc}") from exc
    model = model.to(device).eval()
    cfg = model.config
    features = FeatureExtractor(_n_mels(path, cfg), family.window_frames(cfg))
    prompts = PromptBuilder(tokenizer, family.audio_token_id(model), family.wrap_prompt)
    return LoadedModel(
        model, tokenizer, features, prompts, family, path, config_hash(cfg), base_identity(path)
    )


def save_checkpoint(model, tokenizer, model_dir: str | Path) -> Path:
    """Write a checkpoint in the layout `load_checkpoint` reads (safetensors, tokenizer, features)."""
    from transformers import WhisperFeatureExtractor

    from app.family import HOP_LENGTH, SAMPLE_RATE

    path = Path(model_dir)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    family = family_for(cfg.model_type)
    family.published(model).save_pretrained(path)
    tokenizer.save_pretrained(path)
    frames = family.window_frames(cfg)
    WhisperFeatureExtractor(
        feature_size=cfg.audio_config.num_mel_bins,
        sampling_rate=SAMPLE_RATE,
        hop_length=HOP_LENGTH,
        chunk_length=max(1, frames * HOP_LENGTH // SAMPLE_RATE),
        n_samples=frames * HOP_LENGTH,
    ).save_pretrained(path)
    base_identity(path)  # computed once now, stored beside the weights
    return path
