"""Model-family specifics in one place.

Quaver's prompt contract and engine only need a handful of facts about an audio-language model:
where its audio tower, projector, decoder layers and LM head live, which token marks audio, and
how long an audio window the encoder takes. This module holds those facts for the Qwen2-Audio
family (`Qwen2AudioForConditionalGeneration`), and the two configurations Quaver builds itself:

- `tiny_config()`: a random-init model small enough to train on 2 CPU cores in minutes (tests, CI);
- `default_config()`: the embedded default's shape (Whisper tiny.en encoder + SmolLM2-135M decoder).

A real checkpoint (e.g. Qwen2-Audio-7B-Instruct) brings its own config.json and is read as is.
Another family (e.g. Qwen2.5-Omni's thinker) would add a second `ModelFamily` here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

# Special tokens of the Qwen2-Audio prompt format.
AUDIO_BOS = "<|audio_bos|>"
AUDIO_TOKEN = "<|AUDIO|>"
AUDIO_EOS = "<|audio_eos|>"
AUDIO_SPECIAL_TOKENS = (AUDIO_BOS, AUDIO_TOKEN, AUDIO_EOS)

# Linear layers of a Llama/Qwen2 decoder layer, the LoRA targets of the reference recipe.
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

SAMPLE_RATE = 16_000
HOP_LENGTH = 160  # Whisper: 10 ms per mel frame


@dataclass(frozen=True)
class ModelFamily:
    """Where the parts of a Qwen2-Audio-architecture model live."""

    name: str = "qwen2-audio"

    def audio_tower(self, model: nn.Module) -> nn.Module:
        return model.model.audio_tower

    def projector(self, model: nn.Module) -> nn.Module:
        return model.model.multi_modal_projector

    def language_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack (embed_tokens, layers, norm, rotary_emb)."""
        return model.model.language_model

    def lm_head(self, model: nn.Module) -> nn.Linear:
        return model.lm_head

    def decoder_layer_prefix(self, layer: int) -> str:
        """Module path of decoder layer `layer`, relative to the full model."""
        return f"model.language_model.layers.{layer}"

    def run_audio_tower(
        self, tower: nn.Module, features: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The encoder's forward on a mel window up to its full length (the stock forward only
        takes the full window): features (R, n_mels, F), F even -> hidden (R, F / 4, d_audio).

        Same modules, same order as `Qwen2AudioEncoder.forward` (conv1, conv2, fixed positions,
        layers, pool by 2, layer norm); positions are the first F / 2 rows of the table.
        """
        x = nn.functional.gelu(tower.conv1(features))
        x = nn.functional.gelu(tower.conv2(x)).permute(0, 2, 1)  # (R, F / 2, d_audio)
        if x.shape[1] > tower.embed_positions.weight.shape[0]:
            raise ValueError(f"mel window of {features.shape[-1]} frames exceeds the encoder's")
        h = x + tower.embed_positions.weight[: x.shape[1]]
        h = nn.functional.dropout(h, p=tower.dropout, training=tower.training)
        for layer in tower.layers:
            if tower.training and tower.layerdrop > 0 and torch.rand([]) < tower.layerdrop:
                continue
            h = layer(h, attention_mask)
        h = tower.avg_pooler(h.permute(0, 2, 1)).permute(0, 2, 1)  # (R, F / 4, d_audio)
        return tower.layer_norm(h)

    def audio_token_id(self, model: nn.Module) -> int:
        return int(model.config.audio_token_id)

    def window_frames(self, model_config: Qwen2AudioConfig) -> int:
        """Mel frames the encoder takes: max_source_positions x the two conv strides (1 and 2)."""
        return int(model_config.audio_config.max_source_positions) * 2

    def window_seconds(self, model_config: Qwen2AudioConfig) -> float:
        return self.window_frames(model_config) * HOP_LENGTH / SAMPLE_RATE

    def context_window(self, model_config: Qwen2AudioConfig) -> int:
        """Positions the decoder was built for: no prompt may be longer."""
        return int(model_config.text_config.max_position_embeddings)

    def audio_tokens_for_frames(self, n_frames: int) -> int:
        """Audio tokens the encoder emits for `n_frames` valid mel frames (conv stride 2, pool 2)."""
        after_conv = (n_frames - 1) // 2 + 1
        return (after_conv - 2) // 2 + 1


QWEN2_AUDIO = ModelFamily()


def tiny_config(
    vocab_size: int, audio_token_id: int, pad_token_id: int, window_s: float = 6.0
) -> Qwen2AudioConfig:
    """A ~0.5M-parameter Qwen2-Audio model; its audio window (default 6 s, the benchmark's
    longest clip) sets the encoder positions: window_s * 100 frames / 2."""
    return Qwen2AudioConfig(
        audio_config={
            "model_type": "qwen2_audio_encoder",
            "num_mel_bins": 80,
            "d_model": 64,
            "encoder_layers": 2,
            "encoder_attention_heads": 4,
            "encoder_ffn_dim": 128,
            "max_source_positions": round(window_s * 50),
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": vocab_size,
            "hidden_size": 96,
            "intermediate_size": 192,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
            "tie_word_embeddings": False,
            "pad_token_id": pad_token_id,
            "layer_types": ["full_attention"] * 4,
        },
        audio_token_id=audio_token_id,
    )


def init_like_pytorch(model: nn.Module, seed: int) -> None:
    """Re-initialise every Linear/Embedding with PyTorch's default init.

    transformers' default (normal, std 0.02) leaves a tiny from-scratch Qwen2-Audio model at chance
    loss for hundreds of steps; PyTorch's fan-in init trains.
    """
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for module in model.modules():
            if isinstance(module, nn.Linear | nn.Conv1d):
                module.reset_parameters()
            elif isinstance(module, nn.Embedding) and module.weight.requires_grad:
                nn.init.normal_(module.weight, std=1.0 / module.weight.shape[1] ** 0.5)
    finally:
        torch.random.set_rng_state(gen_state)


def sinusoid_positions(length: int, channels: int, max_timescale: float = 10_000.0) -> torch.Tensor:
    """Whisper's fixed encoder positions: (length, channels), sines in the first half of the
    channels and cosines in the second, timescales geometric from 1 to `max_timescale`."""
    if channels % 2 or channels < 4:
        raise ValueError(f"sinusoidal positions need an even channel count >= 4, got {channels}")
    step = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-step * torch.arange(channels // 2, dtype=torch.float64))
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_timescales[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def build_model(config: Qwen2AudioConfig, seed: int = 0) -> Qwen2AudioForConditionalGeneration:
    """A randomly initialised model of `config` (fp32, eval mode).

    The audio encoder's position table is frozen (as in Whisper and Qwen2-Audio, whose encoders
    use fixed sinusoids); transformers fills it with small random noise, which leaves a model
    trained from scratch no usable notion of *when* a sound happens, so it gets the sinusoids.
    """
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(config)
    init_like_pytorch(model, seed)
    table = QWEN2_AUDIO.audio_tower(model).embed_positions.weight  # (max_source_positions, d)
    with torch.no_grad():
        table.copy_(sinusoid_positions(*table.shape))
    return model.eval()
