"""The Qwen2.5-Omni thinker family: chosen from the checkpoint's config, loaded from the published
layout, Quaver's split forward equal to the stock thinker forward, its chat prompt, K samples."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from app.family import IM_START, OMNI_SYSTEM, QWEN2_AUDIO, QWEN25_OMNI
from app.forward import collate, prefix_hidden, suffix_letter_logits
from app.modeling import ModelLoadError, checkpoint_family, load_checkpoint
from app.predict import Predictor, Request
from tests.conftest import random_posterior, tone

CHOICES = ["one", "two", "three"]


@pytest.fixture(scope="module")
def omni(tiny_omni_dir):
    return load_checkpoint(tiny_omni_dir)


def test_family_comes_from_the_checkpoint_config(tiny_dir, tiny_omni_dir, tmp_path):
    assert checkpoint_family(tiny_dir) is QWEN2_AUDIO
    assert checkpoint_family(tiny_omni_dir) is QWEN25_OMNI
    # the published layout: the whole Omni config, thinker weights under `thinker.`
    assert json.loads((tiny_omni_dir / "config.json").read_text())["model_type"] == "qwen2_5_omni"
    with safe_open(tiny_omni_dir / "model.safetensors", "pt") as f:
        assert all(k.startswith("thinker.") for k in f.keys())  # noqa: SIM118
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="not a supported family"):
        checkpoint_family(tmp_path)


def test_split_forward_equals_the_stock_thinker(omni):
    """Audio packed per clip, prompts right-padded, plain positions: the letter logits equal
    the stock forward's (which builds multimodal RoPE positions and its own audio features)."""
    assert omni.family is QWEN25_OMNI and omni.features.n_mels == 128
    feats = [omni.features(tone(s, 440.0 * (1 + s))) for s in (1.0, 2.7, 4.3)]
    prompts = [
        omni.prompts.build(omni.family.audio_tokens_for_frames(f.n_frames), "How many?", CHOICES)
        for f in feats
    ]
    batch = collate(prompts, feats, omni.tokenizer.pad_token_id)
    with torch.no_grad():
        h = prefix_hidden(omni.model, batch, 2, omni.family)
        ours = suffix_letter_logits(omni.model, h, batch.lengths, 2, omni.letter_ids, omni.family)
        for i, (p, f) in enumerate(zip(prompts, feats, strict=True)):
            mask = (torch.arange(f.features.shape[-1]) < f.n_frames).long()[None]
            out = omni.model(
                input_ids=p.ids[None], input_features=f.features[None], feature_attention_mask=mask
            )
            torch.testing.assert_close(
                ours[i], out.logits[0, -1, omni.letter_ids], atol=1e-5, rtol=0
            )


def test_chat_prompt_wraps_the_audio_block(omni):
    p = omni.prompts.build(7, "How many beeps are there?", CHOICES)
    text = omni.tokenizer.decode(p.ids)
    assert text.startswith(f"{IM_START}system\n{OMNI_SYSTEM}")
    assert "<|im_start|>user\n<|audio_bos|>" + "<|AUDIO|>" * 7 + "<|audio_eos|>\nQuestion:" in text
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\nAnswer:")


def test_k_samples_on_every_llm_layer(tiny_omni_dir):
    """A posterior on all decoder layers: K=1 at the mean equals the merged model; K samples
    spread; the audio tower and vision tower carry no LoRA."""
    loaded = load_checkpoint(tiny_omni_dir)
    post = random_posterior(loaded.model, layers=(0, 1, 2, 3), base_hash=loaded.identity)
    assert all(m.startswith("model.language_model.layers.") for m in post.spec.modules)
    predictor = Predictor(loaded, post)
    assert predictor.split == 0  # LoRA reaches layer 0: nothing shared below it
    prepared = predictor.prepare(tone(2.0), "How many beeps are there?", CHOICES)
    mean, k8 = predictor.predict([Request(prepared, 1), Request(prepared, 8, seed=1)])
    assert mean.sample_probs.shape == (1, 3) and k8.sample_probs.shape == (8, 3)
    assert np.ptp(k8.sample_probs[:, 0]) > 0
    batch = predictor.batch([prepared])
    with torch.no_grad():  # the merged model's own deterministic pass
        h = prefix_hidden(loaded.model, batch, 0, loaded.family)
        logits = suffix_letter_logits(
            loaded.model, h, batch.lengths, 0, loaded.letter_ids, loaded.family
        )
    ref = torch.softmax(logits[0, :3], -1).numpy()
    np.testing.assert_allclose(mean.probs, prepared.prompt.to_user_order(ref), atol=1e-6)
