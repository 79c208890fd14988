"""Shared fixtures: tiny random-init models of both families (Qwen2-Audio, Qwen2.5-Omni's thinker)
and a random posterior, built in-process."""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from app.family import AUDIO_TOKEN, DECODER_LINEARS, build_model, tiny_config
from app.modeling import save_checkpoint
from app.posterior import LoRASpec, Posterior, save_posterior
from training.data import sources as src
from training.data.signals import SR

WORDS = [
    "How many beeps are there?",
    "Which sound is louder?",
    "first",
    "second",
    "rising",
    "falling",
    "one",
    "two",
    "three",
    "four",
    "yes",
    "no",
    "Is there a click?",
]


def make_tiny_checkpoint(path, seed: int = 0):
    from training.base.tokenizer import train_tokenizer

    tok = train_tokenizer(WORDS * 5, vocab_size=400)
    cfg = tiny_config(len(tok), tok.convert_tokens_to_ids(AUDIO_TOKEN), tok.pad_token_id)
    save_checkpoint(build_model(cfg, seed), tok, path)
    return path


def make_tiny_omni_checkpoint(path, seed: int = 0):
    """A random-weight Qwen2.5-Omni thinker (cut-down real config) in the published Omni layout,
    with a locally trained tokenizer carrying the audio and chat special tokens."""
    from app.family import (
        AUDIO_BOS,
        AUDIO_EOS,
        IM_END,
        IM_START,
        build_omni_model,
        tiny_omni_config,
    )
    from training.base.tokenizer import train_tokenizer

    tok = train_tokenizer(WORDS * 5, vocab_size=400, chat_tokens=(IM_START, IM_END))
    ids = tok.convert_tokens_to_ids([AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS])
    cfg = tiny_omni_config(len(tok), ids[0], tok.pad_token_id, ids[1], ids[2])
    save_checkpoint(build_omni_model(cfg, seed), tok, path)
    return path


def random_posterior(
    model,
    layers=(2, 3),
    rank: int = 4,
    seed: int = 0,
    std: float = 0.05,
    calibration: dict | None = None,
    base_hash: str = "",
) -> Posterior:
    gen = torch.Generator().manual_seed(seed)
    modules = []
    named = dict(model.named_modules())
    for layer in layers:
        for leaf in DECODER_LINEARS:
            sub = "self_attn" if leaf.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            modules.append(f"model.language_model.layers.{layer}.{sub}.{leaf}")
    spec = LoRASpec(rank, 2.0 * rank, tuple(modules), tuple(layers), DECODER_LINEARS)
    mean, sd = {}, {}
    for m in modules:
        lin = named[m]
        for which, shape in (("A", (rank, lin.in_features)), ("B", (lin.out_features, rank))):
            key = f"{m}.lora_{which}.weight"
            mean[key] = torch.randn(shape, generator=gen) * 0.1
            sd[key] = torch.rand(shape, generator=gen) * std + 1e-4
    meta = {
        "name": "test-posterior",
        "base": {"path": "tiny", "identity": base_hash},
        "optimizer": "ivon",
    }
    if calibration is not None:
        meta["calibration"] = calibration
    return Posterior(spec, mean, sd, meta)


CALIBRATION = {
    "delta": 0.05,
    "method": "sgr",
    "n": 100,
    "targets": [
        {"max_risk": 0.05, "threshold": 0.9, "coverage": 0.3, "risk_bound": 0.05, "feasible": True},
        {"max_risk": 0.1, "threshold": 0.6, "coverage": 0.6, "risk_bound": 0.1, "feasible": True},
        {"max_risk": 0.2, "threshold": 0.4, "coverage": 0.9, "risk_bound": 0.2, "feasible": True},
        {
            "max_risk": 0.01,
            "threshold": None,
            "coverage": 0.0,
            "risk_bound": 1.0,
            "feasible": False,
        },
        {"max_risk": 0.5, "threshold": 0.0, "coverage": 1.0, "risk_bound": 0.5, "feasible": True},
    ],
}


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_omni_dir(tmp_path_factory):
    return make_tiny_omni_checkpoint(tmp_path_factory.mktemp("tiny-omni") / "model")


@pytest.fixture(scope="session")
def posterior_dir(tiny_dir, tmp_path_factory):
    from app.modeling import load_checkpoint

    loaded = load_checkpoint(tiny_dir)
    post = random_posterior(loaded.model, calibration=CALIBRATION, base_hash=loaded.identity)
    return save_posterior(tmp_path_factory.mktemp("post") / "posterior", post)


def wav_bytes(wave: np.ndarray, rate: int = 16000, fmt: str = "WAV", channels: int = 1) -> bytes:
    data = np.stack([wave] * channels, axis=1) if channels > 1 else wave
    buf = io.BytesIO()
    sf.write(buf, data, rate, format=fmt)
    return buf.getvalue()


def tone(seconds: float = 1.0, freq: float = 440.0, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


# The toy benchmark every training test shares: a few dozen clips per split, rendered once.
TOY_SIZES = {"pretrain": 48, "train": 20, "calib": 16, "test": 16, "test_shift": 8}


@pytest.fixture(scope="session")
def toy_bench(tmp_path_factory):
    from training.data.generate import BenchmarkConfig, generate_benchmark

    out = tmp_path_factory.mktemp("toy") / "bench"
    return generate_benchmark(BenchmarkConfig(seed=3, **TOY_SIZES), out, progress=False)


def toy_pretrain_config(data_dir, out_dir, **changes):
    """Stage 1 at toy size: one epoch over the toy benchmark's `pretrain` split."""
    from training.config import PretrainConfig

    settings = {"epochs": 1, "batch_size": 8, "vocab_size": 600, "warmup_steps": 2, **changes}
    return PretrainConfig(data_dir=data_dir, out_dir=out_dir, **settings)


@pytest.fixture(scope="session")
def toy_base(toy_bench, tmp_path_factory):
    """A 1-epoch stage-1 tiny base trained on the toy benchmark (shared, never modified)."""
    from training.stages.pretrain import pretrain

    out = tmp_path_factory.mktemp("toy-base") / "base"
    return pretrain(toy_pretrain_config(toy_bench, out), progress=False)


@pytest.fixture(scope="session")
def assembled_base(tmp_path_factory):
    """The embedded default's real base, assembled once per session from the pinned packages
    (about 1-2 min); skipped where those packages are not installed."""
    from training.base import build as bm

    try:
        bm.locate_weights(bm.WHISPER, check_hash=False)
        bm.locate_weights(bm.SMOLLM2, check_hash=False)
        import gguf  # noqa: F401
    except (bm.BaseBuildError, ImportError) as exc:
        pytest.skip(str(exc))
    return bm.build_base(tmp_path_factory.mktemp("assembled") / "base", progress=False)


# Real-recording fixtures (training.data.sources.write_fixture_root): the fonts' notes come from
# fake_notes, so no sound font and no fluidsynth are needed.
FONTS = ("timgm6mb-soundfont", "csound-soundfont", "fluidr3mono-gm-soundfont")
FIXTURE_PACKAGES = (*src.FIXTURE_PACKAGES, *FONTS)


def fake_notes(font: Path, notes: list[tuple[int, int]]) -> list[np.ndarray]:
    """Stand-in for fluidsynth: a decaying harmonic tone per (program, note), the font's bytes
    and the program shaping the timbre."""
    salt = int(hashlib.sha256(font.read_bytes()).hexdigest()[:4], 16)
    t = np.arange(round(src.NOTE_SLOT_S * SR)) / SR
    out = []
    for prog, note in notes:
        f0 = 440.0 * 2 ** ((note - 69) / 12) * (1 + (salt % 11) / 300)  # each font its tuning
        roll = 1.0 + ((prog * 7 + salt) % 5) / 2
        x = sum(np.sin(2 * np.pi * k * f0 * t) / k**roll for k in range(1, 8) if k * f0 < 7000)
        env = np.exp(-t * (1 + prog / 20)) * (t < src.NOTE_S) + 1e-4  # distinct per program
        out.append(0.3 * x * env)
    return out


def write_real_fixture_root(path: Path) -> Path:
    """A fixture root of every package in FIXTURE_PACKAGES (fonts as stand-in bytes)."""
    extra = {pkg.probe: f"fake font {pkg.name}".encode() for pkg in map(src.PACKAGES.get, FONTS)}
    return src.write_fixture_root(path, src.FixtureSpec(extra=extra))


def fixture_library(cfg, out: Path) -> src.Library:
    """The source library of a BenchmarkConfig over the fixture packages, notes by fake_notes."""
    return src.build_library(cfg.source_config, out, renderer=fake_notes)


def fixture_benchmark(cfg, library: src.Library, out: Path) -> Path:
    """generate_benchmark of `cfg` into `out`, reading the fonts' notes from `library` (copied in
    as the benchmark's sources), so nothing is rendered with fluidsynth."""
    from training.data.generate import generate_benchmark

    shutil.copytree(library.root, out / "sources")
    return generate_benchmark(cfg, out, progress=False)
