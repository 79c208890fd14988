"""Model-family specifics in one place.

Quaver's prompt contract and engine only need a handful of facts about an audio-language model:
where its audio tower, projector, decoder layers and LM head live, which token marks audio, and
how long an audio window the encoder takes, how a checkpoint of the family is loaded and saved.
Two families:

- `QWEN2_AUDIO` (`Qwen2AudioForConditionalGeneration`): the tiny model, the embedded default and
  Qwen2-Audio-7B(-Instruct);
- `QWEN25_OMNI` (the thinker of Qwen2.5-Omni-3B/7B, `Qwen2_5OmniThinkerForConditionalGeneration`,
  loaded from the published directory of the whole Omni model; talker and vocoder are skipped).

A checkpoint's family is read from its own config.json (`model_type`, `family_for`), never named by
a class string in a Quaver config. Configurations Quaver builds itself:

- `tiny_config()`: a random-init model small enough to train on 2 CPU cores in minutes (tests, CI);
- `tiny_omni_config()`: the Qwen2.5-Omni thinker architecture cut down the same way (tests);
- `default_config()`: the embedded default's shape (Whisper tiny.en encoder + SmolLM2-135M decoder).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    PretrainedConfig,
    Qwen2_5OmniConfig,
    Qwen2_5OmniForConditionalGeneration,
    Qwen2_5OmniThinkerConfig,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen2AudioConfig,
    Qwen2AudioForConditionalGeneration,
)

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
    """Where the parts of a Qwen2-Audio-architecture model live (the base of every family)."""

    name: str = "qwen2-audio"
    model_types: tuple[str, ...] = ("qwen2_audio",)  # config.json `model_type`s of the family
    # True: the tower takes the clips' valid frames packed into one sequence and returns the
    # projected audio embeddings itself (`encode_packed_audio`); False: `run_audio_tower` on the
    # padded window, then `projector`.
    packed_audio: bool = False
    # True: the decoder layers are Llama's or Qwen2's (pre-norm attention with 1-D RoPE, then the
    # MLP), so the last layer can run for each row's last token alone
    # (`app.forward.last_token_layer`); False: it runs over every position like the others.
    plain_decoder_layers: bool = True

    def load_model(self, path: Path, dtype: torch.dtype) -> nn.Module:
        """The model of a local checkpoint directory, in `dtype` on the CPU (never a hub)."""
        return Qwen2AudioForConditionalGeneration.from_pretrained(
            path, dtype=dtype, local_files_only=True
        )

    def published(self, model: nn.Module) -> nn.Module:
        """The module whose `save_pretrained` writes the family's published layout."""
        return model

    def wrap_prompt(self, text: str) -> tuple[str, str] | None:
        """(text before the audio block, text after it) for `text` (question, choices, cue), or
        None for the plain format (audio block, then `text`)."""
        return None

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

# Qwen2.5-Omni's chat format (its processor's chat template) and default system prompt.
OMNI_SYSTEM = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of "
    "perceiving auditory and visual inputs, as well as generating text and speech."
)
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# The processor pads to 300 s; Whisper's normalisation makes the valid frames the same for any
# window at least as long as the clip, so Quaver takes 30 s, the length the thinker was tuned on.
OMNI_WINDOW_S = 30.0


@dataclass(frozen=True)
class OmniThinkerFamily(ModelFamily):
    """Qwen2.5-Omni's thinker: the audio tower chunks each clip into windows of 2 x n_window mel
    frames (attention inside a window), pools by 2 and projects to the LLM width itself; the LLM
    is a Qwen2 decoder with multimodal RoPE, whose three position rows are equal for audio+text
    prompts (so plain positions 0..T-1 are exact)."""

    name: str = "qwen2.5-omni"
    model_types: tuple[str, ...] = ("qwen2_5_omni", "qwen2_5_omni_thinker")
    packed_audio: bool = True
    plain_decoder_layers: bool = False  # multimodal RoPE: the last layer runs whole

    def load_model(self, path: Path, dtype: torch.dtype) -> nn.Module:
        """The thinker, from a thinker-only directory or from the published Omni directory
        (weights `thinker.*`; `talker.*` and `token2wav.*` are not loaded)."""
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        if model_type == "qwen2_5_omni_thinker":
            return Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
                path, dtype=dtype, local_files_only=True
            )
        thinker_cfg = Qwen2_5OmniConfig.from_pretrained(path, local_files_only=True).thinker_config
        return Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
            path,
            config=thinker_cfg,
            dtype=dtype,
            local_files_only=True,
            key_mapping={r"^thinker\.": ""},
        )

    def published(self, model: nn.Module) -> nn.Module:
        """The whole Omni model (audio output off) holding `model` as its thinker: its
        `save_pretrained` writes `thinker.*` weights and the Omni config, as published."""
        config = Qwen2_5OmniConfig(thinker_config=model.config.to_dict(), enable_audio_output=False)
        with torch.device("meta"):  # the placeholder thinker is replaced at once
            outer = Qwen2_5OmniForConditionalGeneration(config)
        outer.thinker = model
        return outer

    def projector(self, model: nn.Module) -> nn.Module:
        return model.model.audio_tower.proj

    def encode_packed_audio(
        self, model: nn.Module, features: torch.Tensor, n_frames: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The stock tower on each clip's valid frames: features (R, n_mels, W), n_frames (R,)
        -> (embeds (R, A_max, d_text), audio token counts (R,)), as the thinker's
        `get_audio_features` computes them (the frames past n_frames never enter)."""
        tower = self.audio_tower(model)
        packed = torch.cat([features[r, :, : int(n)] for r, n in enumerate(n_frames)], dim=1)
        flat = tower(input_features=packed, feature_lens=n_frames).last_hidden_state  # (sum A, d)
        _, out_lens = tower._get_feat_extract_output_lengths(n_frames)
        embeds = flat.new_zeros(len(n_frames), int(out_lens.max()), flat.shape[-1])
        valid = torch.arange(embeds.shape[1], device=flat.device)[None, :] < out_lens[:, None]
        embeds[valid] = flat
        return embeds, out_lens

    def window_frames(self, model_config: PretrainedConfig) -> int:
        return round(OMNI_WINDOW_S * SAMPLE_RATE / HOP_LENGTH)

    def wrap_prompt(self, text: str) -> tuple[str, str]:
        """The chat template's system and user turns around the audio block, the assistant turn
        opened with the answer cue: "...<|im_start|>assistant\nAnswer:" then " A", " B"..."""
        body, _, cue = text.rpartition("\n")
        before = f"{IM_START}system\n{OMNI_SYSTEM}{IM_END}\n{IM_START}user\n"
        return before, f"{body}{IM_END}\n{IM_START}assistant\n{cue}"


QWEN25_OMNI = OmniThinkerFamily()
FAMILIES = (QWEN2_AUDIO, QWEN25_OMNI)


def family_for(model_type: str) -> ModelFamily:
    """The family of a checkpoint whose config.json says `model_type`."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    known = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise ValueError(f"model_type {model_type!r} is not a supported family ({known})")


def _tiny_decoder(vocab_size: int, pad_token_id: int) -> dict:
    """The tiny models' decoder: 4 layers of width 96, 4 heads (2 KV heads), untied LM head."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": 96,
        "intermediate_size": 192,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": False,
        "pad_token_id": pad_token_id,
    }


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
            **_tiny_decoder(vocab_size, pad_token_id),
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


def tiny_omni_config(
    vocab_size: int,
    audio_token_id: int,
    pad_token_id: int,
    audio_bos_id: int | None = None,
    audio_eos_id: int | None = None,
) -> Qwen2_5OmniThinkerConfig:
    """Qwen2.5-Omni-3B's thinker cut down (layers, widths, a 1-block vision tower it never uses):
    128 mels, n_window 100, three mRoPE sections sized to the head, untied LM head."""
    ids = {} if audio_bos_id is None else {"audio_start_token_id": audio_bos_id}
    if audio_eos_id is not None:
        ids["audio_end_token_id"] = audio_eos_id
    return Qwen2_5OmniThinkerConfig(
        audio_config={
            "num_mel_bins": 128,
            "d_model": 64,
            "encoder_layers": 2,
            "encoder_attention_heads": 4,
            "encoder_ffn_dim": 128,
            "n_window": 100,
            "max_source_positions": 1500,
            "output_dim": 96,
        },
        vision_config={
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 96,
            "fullatt_block_indexes": [0],
        },
        text_config={
            **_tiny_decoder(vocab_size, pad_token_id),
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1_000_000.0,
                "mrope_section": [4, 4, 4],  # head 24 -> 12 frequencies in 3 position rows
            },
        },
        audio_token_index=audio_token_id,
        **ids,
    )


def build_omni_model(
    config: Qwen2_5OmniThinkerConfig, seed: int = 0
) -> Qwen2_5OmniThinkerForConditionalGeneration:
    """A randomly initialised thinker of `config` (fp32, eval mode; its encoder positions are
    fixed sinusoids already)."""
    torch.manual_seed(seed)
    model = Qwen2_5OmniThinkerForConditionalGeneration(config)
    init_like_pytorch(model, seed)
    return model.eval()
