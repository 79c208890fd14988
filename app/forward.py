"""The forward pass that scores option letters, shared by training and serving.

The stock `Qwen2AudioForConditionalGeneration.forward` computes full-vocabulary logits at every
position and cannot share work between posterior samples. Quaver's pass is split in two:

    prefix:  audio encoder (once per clip) -> projector -> token embeddings with audio spliced in
             -> decoder layers [0, split)                       rows = R requests
    suffix:  decoder layers [split, L-1) -> the last layer at each row's last token only
             -> final norm -> lm_head rows of the option letters   rows = R x K samples

`split` is the first decoder layer that carries LoRA: below it every posterior sample computes the
same thing, so it runs once per request and its hidden states are repeated to the K sample rows.
Sequences are right-padded: with causal attention a real token never sees the padding after it,
so a row's result does not depend on the other rows in the batch, and no attention mask is needed.

Both halves take an optional `should_stop` callable, asked before the audio tower and before
every decoder layer: when it returns True the pass raises `Abandoned`, so a batch whose callers
have all given up frees the engine's worker within one layer's time instead of a whole pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.masking_utils import (
    create_bidirectional_mask,
    create_causal_mask,
    create_sliding_window_causal_mask,
)

from app.family import QWEN2_AUDIO, ModelFamily

StopCheck = Callable[[], bool] | None


class Abandoned(Exception):
    """A pass stopped at a layer boundary because its `should_stop` said so."""


def _check(should_stop: StopCheck) -> None:
    if should_stop is not None and should_stop():
        raise Abandoned


@dataclass
class PromptBatch:
    """R prompts, right-padded, each with one audio clip."""

    features: torch.Tensor  # (R, n_mels, window_frames) float32 log-mel
    n_frames: torch.Tensor  # (R,) int64 valid mel frames per clip
    ids: torch.Tensor  # (R, T) int64 token ids, right-padded
    lengths: torch.Tensor  # (R,) int64 real tokens per row
    n_choices: torch.Tensor  # (R,) int64 choices offered per prompt

    def to(self, device: torch.device | str) -> PromptBatch:
        return PromptBatch(*(t.to(device) for t in self.__dict__.values()))

    @property
    def rows(self) -> int:
        return int(self.ids.shape[0])

    def take(self, rows: torch.Tensor) -> PromptBatch:
        """The batch of the given rows (an int64 index), trimmed to their longest prompt."""
        t = int(self.lengths[rows].max())
        return PromptBatch(
            self.features[rows],
            self.n_frames[rows],
            self.ids[rows, :t],
            self.lengths[rows],
            self.n_choices[rows],
        )


Prefix = tuple[torch.Tensor, PromptBatch]  # hidden states entering the LoRA layers + their batch


def take_prefix(prefix: Prefix, rows: list[int]) -> Prefix:
    """The rows `rows` of a prefix `(h (R, T, d), batch)`: what a second pass over some of a
    batch's prompts (the engine's K-sample redo) reuses instead of recomputing the audio tower
    and the layers below the LoRA layers. Right padding, so trimming T to the rows' longest
    prompt drops only padding."""
    h, batch = prefix
    index = torch.tensor(rows, dtype=torch.long, device=h.device)
    part = batch.take(index)
    return h[index, : part.ids.shape[1]], part


def collate(prompts: list, features: list, pad_id: int) -> PromptBatch:
    """Stack `PromptIds` and `AudioFeatures` into a right-padded `PromptBatch`."""
    lengths = torch.tensor([len(p.ids) for p in prompts], dtype=torch.long)
    ids = torch.full((len(prompts), int(lengths.max())), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p.ids)] = p.ids
    return PromptBatch(
        features=torch.stack([f.features for f in features]),
        n_frames=torch.tensor([f.n_frames for f in features], dtype=torch.long),
        ids=ids,
        lengths=lengths,
        n_choices=torch.tensor([p.n_choices for p in prompts], dtype=torch.long),
    )


def audio_hidden(
    model: nn.Module,
    features: torch.Tensor,
    n_frames: torch.Tensor,
    family: ModelFamily = QWEN2_AUDIO,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Audio tower only. Returns (hidden (R, A_max, d_audio), audio token counts (R,))."""
    tower = family.audio_tower(model)
    dtype = next(tower.parameters()).dtype
    conv_lens, out_lens = tower._get_feat_extract_output_lengths(n_frames)
    # Only the frames up to the longest clip (+2 for the two convolutions' right context) can
    # reach a real audio token, so the window is cut there: (R, n_mels, W) -> (R, n_mels, mel_len).
    # Padded positions are masked out of attention, so the real tokens are unchanged. With
    # batches grouped by clip length a stage-1 step is 1.55x faster (bench/stage1_step.py).
    mel_len = min(features.shape[-1], -(-(int(n_frames.max()) + 2) // 4) * 4)
    features = features[..., :mel_len]
    rows = features.shape[0]
    enc_len = (mel_len - 2) // 2 + 1  # positions after conv2 (stride 2)
    pos = torch.arange(enc_len, device=features.device)[None, :]
    mask_2d = (pos < conv_lens[:, None]).long()  # (R, enc_len): 1 = real frame
    dummy = torch.zeros(rows, enc_len, 1, dtype=dtype, device=features.device)
    mask = create_bidirectional_mask(
        config=tower.config, inputs_embeds=dummy, attention_mask=mask_2d
    )
    hidden = family.run_audio_tower(tower, features.to(dtype), mask)
    return hidden, out_lens


def encode_audio(
    model: nn.Module,
    features: torch.Tensor,
    n_frames: torch.Tensor,
    family: ModelFamily = QWEN2_AUDIO,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Audio tower + projector. Returns (embeds (R, A_max, d_text), audio token counts (R,))."""
    if family.packed_audio:  # a tower that packs the clips and projects itself (Omni's thinker)
        return family.encode_packed_audio(model, features, n_frames)
    hidden, out_lens = audio_hidden(model, features, n_frames, family)
    return family.projector(model)(hidden), out_lens


def embed_prompts(
    model: nn.Module,
    ids: torch.Tensor,
    audio_embeds: torch.Tensor,
    audio_lens: torch.Tensor,
    family: ModelFamily = QWEN2_AUDIO,
) -> torch.Tensor:
    """Token embeddings (R, T, d) with each row's audio tokens replaced by its audio features."""
    lm = family.language_model(model)
    embeds = lm.embed_tokens(ids)
    audio_mask = ids == family.audio_token_id(model)  # (R, T)
    counts = audio_mask.sum(1)
    if not torch.equal(counts.cpu(), audio_lens.cpu()):
        raise ValueError(f"audio tokens {counts.tolist()} != audio features {audio_lens.tolist()}")
    valid = torch.arange(audio_embeds.shape[1], device=ids.device)[None, :] < audio_lens[:, None]
    flat = audio_embeds[valid].to(embeds.dtype)  # (sum audio_lens, d), row-major like the mask
    return embeds.masked_scatter(audio_mask.unsqueeze(-1), flat)


class DecoderRunner:
    """Runs a slice of the decoder layers with the model's own masks and rotary embeddings."""

    def __init__(self, model: nn.Module, family: ModelFamily = QWEN2_AUDIO) -> None:
        self.lm = family.language_model(model)
        self.num_layers = len(self.lm.layers)

    def _masks(self, h: torch.Tensor, position_ids: torch.Tensor) -> dict:
        cfg = self.lm.config
        kw = dict(
            config=cfg,
            inputs_embeds=h,
            attention_mask=None,
            past_key_values=None,
            position_ids=position_ids,
        )
        masks = {"full_attention": create_causal_mask(**kw)}
        if "sliding_attention" in (getattr(cfg, "layer_types", None) or ()):
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kw)
        return masks

    @staticmethod
    def positions(h: torch.Tensor) -> torch.Tensor:
        """(1, T) position ids: 0..T-1 for every row (right padding)."""
        return torch.arange(h.shape[1], device=h.device)[None, :]

    def rotary(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's rotary (cos, sin) for positions 0..T-1 of `h` (B, T, d)."""
        return self.lm.rotary_emb(h, position_ids=self.positions(h))

    def run(
        self, h: torch.Tensor, start: int, end: int, should_stop: StopCheck = None
    ) -> torch.Tensor:
        """h: (B, T, d) hidden entering layer `start` -> hidden leaving layer `end - 1`."""
        if start >= end:
            return h
        position_ids = self.positions(h)
        masks = self._masks(h, position_ids)
        pos_emb = self.rotary(h)
        for layer in self.lm.layers[start:end]:
            _check(should_stop)
            kind = getattr(layer, "attention_type", "full_attention")
            h = layer(
                h,
                attention_mask=masks[kind],
                position_ids=position_ids,
                position_embeddings=pos_emb,
            )
        return h


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """RoPE's rotation of the two halves of the last dimension: (x1, x2) -> (-x2, x1)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _last_token_ok(layer: nn.Module, family: ModelFamily) -> bool:
    """Whether `last_token_layer` computes what `layer` would: a Llama/Qwen2 decoder layer with
    full causal attention and no attention dropout in play."""
    attn = getattr(layer, "self_attn", None)
    return (
        family.plain_decoder_layers
        and attn is not None
        and getattr(layer, "attention_type", "full_attention") == "full_attention"
        and not (attn.training and attn.attention_dropout > 0)
    )


def last_token_layer(
    layer: nn.Module,
    h: torch.Tensor,
    lengths: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """A Llama/Qwen2 decoder layer's output at each row's last real token: (B, T, d) -> (B, d).

    The letter read-out looks at one position per row, and in the final layer nothing else reads
    the other positions' outputs. So only keys and values are computed over every position
    ((B, T, d_kv) each: 6 % of a SmolLM2-135M layer's weights); the query, the attention, o_proj
    and the MLP run for one token per row. Equal to the whole layer at those positions up to
    float rounding (tests/test_forward.py); about 1.3x less work for the 4 LoRA layers of the
    default's K-sample pass (bench/suffix_pass.py).
    """
    attn = layer.self_attn
    b, t, _ = h.shape
    hd = attn.head_dim
    rows = torch.arange(b, device=h.device)
    last = lengths - 1  # (B,)
    x = layer.input_layernorm(h)  # (B, T, d)
    q = attn.q_proj(x[rows, last].unsqueeze(1)).view(b, 1, -1, hd).transpose(1, 2)  # (B, H, 1, hd)
    k = attn.k_proj(x).view(b, t, -1, hd).transpose(1, 2)  # (B, H_kv, T, hd)
    v = attn.v_proj(x).view(b, t, -1, hd).transpose(1, 2)
    cos, sin = position_embeddings  # (1, T, hd)
    cos_q, sin_q = cos[0, last][:, None, None], sin[0, last][:, None, None]  # (B, 1, 1, hd)
    q = q * cos_q + _rotate_half(q) * sin_q
    k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
    groups = attn.num_key_value_groups  # grouped-query attention: H = H_kv * groups
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    # the last token sees every real position of its row (causal), none of the padding after it
    seen = torch.arange(t, device=h.device)[None, :] < lengths[:, None]  # (B, T)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=seen[:, None, None, :], scale=attn.scaling
    )  # (B, H, 1, hd)
    h_last = h[rows, last].unsqueeze(1) + attn.o_proj(out.transpose(1, 2).reshape(b, 1, -1))
    h_last = h_last + layer.mlp(layer.post_attention_layernorm(h_last))  # (B, 1, d)
    return h_last[:, 0]


def prefix_hidden(
    model: nn.Module,
    batch: PromptBatch,
    split: int,
    family: ModelFamily = QWEN2_AUDIO,
    should_stop: StopCheck = None,
) -> torch.Tensor:
    """Hidden states (R, T, d) entering decoder layer `split` (audio encoded once per row)."""
    _check(should_stop)
    audio, audio_lens = encode_audio(model, batch.features, batch.n_frames, family)
    h = embed_prompts(model, batch.ids, audio, audio_lens, family)
    return DecoderRunner(model, family).run(h, 0, split, should_stop)


def suffix_letter_logits(
    model: nn.Module,
    h: torch.Tensor,
    lengths: torch.Tensor,
    split: int,
    letter_ids: torch.Tensor,
    family: ModelFamily = QWEN2_AUDIO,
    should_stop: StopCheck = None,
) -> torch.Tensor:
    """Layers [split, L), final norm, letter logits at each row's last token: (B, n_letters)."""
    runner = DecoderRunner(model, family)
    top = runner.num_layers - 1
    if split <= top and _last_token_ok(runner.lm.layers[top], family):
        # layers [split, L-1) over every position, the last layer at each row's last token
        h = runner.run(h, split, top, should_stop)
        _check(should_stop)
        last = last_token_layer(runner.lm.layers[top], h, lengths, runner.rotary(h))
    else:
        h = runner.run(h, split, runner.num_layers, should_stop)
        last = h[torch.arange(h.shape[0], device=h.device), lengths - 1]  # (B, d)
    last = runner.lm.norm(last)
    weight = family.lm_head(model).weight[letter_ids]  # (n_letters, d): only the rows we need
    return last @ weight.T


def choice_log_probs(letter_logits: torch.Tensor, n_choices: torch.Tensor) -> torch.Tensor:
    """Log-softmax over each row's offered letters; letters past n_choices get -inf."""
    n_letters = letter_logits.shape[-1]
    offered = torch.arange(n_letters, device=letter_logits.device)[None, :] < n_choices[:, None]
    masked = letter_logits.float().masked_fill(~offered, float("-inf"))
    return masked.log_softmax(-1)


def letter_log_probs(
    model: nn.Module,
    batch: PromptBatch,
    letter_ids: torch.Tensor,
    split: int = 0,
    family: ModelFamily = QWEN2_AUDIO,
) -> torch.Tensor:
    """One deterministic pass: (R, n_letters) log-probabilities over the offered letters."""
    h = prefix_hidden(model, batch, split, family)
    logits = suffix_letter_logits(model, h, batch.lengths, split, letter_ids, family)
    return choice_log_probs(logits, batch.n_choices)
