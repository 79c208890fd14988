"""Cost of K posterior samples per request: Quaver's engine side by side with its baselines.

    python bench/k_samples.py --shape tiny                      # seconds, anywhere
    python bench/k_samples.py --model artifacts/base --audio-s 10 --ks 1,4,8   # embedded default, CPU
    python bench/k_samples.py --shape qwen2-audio-7b --audio-s 30   # GPU (random bf16 weights)

All variants run in one process on the same random-weight model (or a real checkpoint) and are
reported as ratios to the merged pass, the plain deterministic forward that an AdamW deployment
runs (LoRA merged into the weights):
  merged        plain model, no posterior attached
  ours_k1       Quaver at the posterior mean (mean merged at load; wrappers idle)
  seq           K sequential single-sample passes (encoder and all layers each time)
  ours_all      Quaver, K samples, LoRA on every decoder layer (encoder once, decoder at K rows)
  ours_top8/4   Quaver, K samples, LoRA on the top 8 / 4 layers (lower layers once per request)
Prints one JSON document (and writes it with --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from types import SimpleNamespace

import torch
from torch import nn
from transformers import Qwen2AudioConfig

from app.audio import AudioFeatures
from app.family import DECODER_LINEARS, QWEN2_AUDIO, build_model
from app.forward import letter_log_probs
from app.lora import SampleSet, active_samples, detach_posterior
from app.posterior import LoRASpec, Posterior
from app.predict import Predictor, Prepared, Request
from app.prompt import PromptIds


def shape_config(shape: str) -> Qwen2AudioConfig:
    """Random-weight configs of the published model sizes (no download: config only)."""
    cfg = Qwen2AudioConfig()
    t, a = cfg.text_config, cfg.audio_config
    t.intermediate_size, t.vocab_size = 11008, 156032  # Qwen-7B LM of Qwen2-Audio-7B
    if shape == "qwen2.5-omni-3b":  # the thinker LM of the reference paper's model
        t.hidden_size, t.num_hidden_layers, t.intermediate_size = 2048, 36, 11008
        t.num_attention_heads, t.num_key_value_heads, t.vocab_size = 16, 2, 151936
    elif shape == "whisper-tiny-smollm2":  # the embedded default's shape
        a.d_model, a.encoder_layers, a.encoder_attention_heads, a.encoder_ffn_dim = 384, 4, 6, 1536
        a.num_mel_bins, a.max_source_positions = 80, 500
        t.hidden_size, t.num_hidden_layers, t.intermediate_size = 576, 30, 1536
        t.num_attention_heads, t.num_key_value_heads, t.vocab_size = 9, 3, 49152
        t.model_type = "llama"
        cfg.audio_token_id = 49151
    elif shape == "tiny":
        a.d_model, a.encoder_layers, a.encoder_attention_heads, a.encoder_ffn_dim = 64, 2, 4, 128
        a.max_source_positions = 500
        t.hidden_size, t.num_hidden_layers, t.intermediate_size = 64, 12, 128
        t.num_attention_heads = t.num_key_value_heads = 4
        t.vocab_size = 1000
        cfg.audio_token_id = 999
    if getattr(t, "layer_types", None) is not None:
        t.layer_types = ["full_attention"] * t.num_hidden_layers
    return cfg


def random_posterior(model: nn.Module, layers: list[int], rank: int, seed: int = 0) -> Posterior:
    gen = torch.Generator().manual_seed(seed)
    named = dict(model.named_modules())
    modules, mean, std = [], {}, {}
    for layer in layers:
        prefix = QWEN2_AUDIO.decoder_layer_prefix(layer)
        for name, mod in named.items():
            if name.startswith(prefix + ".") and name.rsplit(".", 1)[-1] in DECODER_LINEARS:
                modules.append(name)
                for which, shape in (
                    ("A", (rank, mod.in_features)),
                    ("B", (mod.out_features, rank)),
                ):
                    key = f"{name}.lora_{which}.weight"
                    mean[key] = torch.randn(shape, generator=gen) * 0.02
                    std[key] = torch.full(shape, 0.01)
    spec = LoRASpec(rank, 2.0 * rank, tuple(modules), tuple(layers), DECODER_LINEARS)
    return Posterior(spec, mean, std, {"name": f"random-top{len(layers)}"})


def synthetic_loaded(model: nn.Module, device: torch.device):
    """A LoadedModel stand-in: the bench feeds token ids directly (no tokenizer needed)."""
    n_letters = 10
    letter_ids = list(range(10, 10 + n_letters))
    return SimpleNamespace(
        model=model,
        family=QWEN2_AUDIO,
        path="random",
        device=device,
        num_layers=len(QWEN2_AUDIO.language_model(model).layers),
        letter_ids=torch.tensor(letter_ids, device=device),
        tokenizer=SimpleNamespace(pad_token_id=0),
        features=SimpleNamespace(max_seconds=0),
    )


def synthetic_request(cfg: Qwen2AudioConfig, audio_s: float, text_tokens: int, seed: int = 0):
    window = QWEN2_AUDIO.window_frames(cfg)
    frames = min(window, int(audio_s * 100))
    n_audio = QWEN2_AUDIO.audio_tokens_for_frames(frames)
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(cfg.audio_config.num_mel_bins, window, generator=gen)
    text = torch.randint(
        100, min(cfg.text_config.vocab_size - 1, 30000), (text_tokens,), generator=gen
    )
    ids = torch.cat(
        [torch.tensor([1]), torch.full((n_audio,), cfg.audio_token_id), torch.tensor([2]), text]
    )
    return Prepared(
        AudioFeatures(feats, frames, audio_s), PromptIds(ids, n_audio, 4), ("a", "b", "c", "d")
    )


def timed(fn, reps: int, sync) -> float:
    for _ in range(2):
        fn()
    xs = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        xs.append(time.perf_counter() - t)
    return statistics.median(xs) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--shape",
        default="tiny",
        choices=["tiny", "whisper-tiny-smollm2", "qwen2-audio-7b", "qwen2.5-omni-3b"],
    )
    p.add_argument("--model", default=None, help="a checkpoint directory instead of --shape")
    p.add_argument("--audio-s", type=float, default=10.0)
    p.add_argument("--text-tokens", type=int, default=40)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--ks", default="1,4,8,16,32")
    p.add_argument("--tops", default="all,8,4", help="LoRA placements: all or top-N layers")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    device = torch.device(
        "cuda"
        if a.device == "auto" and torch.cuda.is_available()
        else ("cpu" if a.device == "auto" else a.device)
    )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if a.threads:
        torch.set_num_threads(a.threads)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.time()
    if a.model:
        from app.modeling import load_checkpoint

        base = load_checkpoint(a.model, device=device, dtype=dtype).model
        label = a.model
    else:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            base = build_model(shape_config(a.shape))
        torch.set_default_dtype(torch.float32)
        label = a.shape
    cfg = base.config
    base.eval()
    n_layers = len(QWEN2_AUDIO.language_model(base).layers)
    prepared = synthetic_request(cfg, a.audio_s, a.text_tokens)
    res = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "model": label,
        "dtype": str(dtype),
        "audio_s": a.audio_s,
        "rank": a.rank,
        "layers": n_layers,
        "tokens": len(prepared.prompt.ids),
        "build_s": round(time.time() - t0, 1),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(res), flush=True)
    if device.type == "cuda":  # clocks up before timing
        x = torch.randn(8192, 8192, device=device, dtype=dtype)
        t1 = time.time()
        while time.time() - t1 < 2:
            x @ x
        sync()
    plain = synthetic_loaded(base, device)
    batch = Predictor.batch(SimpleNamespace(pad_id=0), [prepared]).to(device)

    @torch.inference_mode()
    def merged():
        return letter_log_probs(base, batch, plain.letter_ids)

    res["merged_ms"] = timed(merged, a.reps, sync)
    print("merged_ms", res["merged_ms"], flush=True)
    ks = [int(k) for k in a.ks.split(",")]
    for top in a.tops.split(","):
        layers = (
            list(range(n_layers)) if top == "all" else list(range(n_layers - int(top), n_layers))
        )
        model = base  # weights' values do not change the timings; wrappers come off below
        post = random_posterior(model, layers, a.rank)
        pred = Predictor(synthetic_loaded(model, device), post)
        key = "all" if top == "all" else f"top{top}"
        res[f"ours_{key}_k1_ms"] = timed(
            lambda p=pred: p.predict([Request(prepared, 1)]), a.reps, sync
        )
        if top == "all":  # K sequential single-sample passes (the naive way)
            one = pred.sampler.draw(1, torch.Generator(device=device).manual_seed(0))
            samples = SampleSet(torch.tensor([0], device=device), one)

            @torch.inference_mode()
            def single(samples=samples, model=model):
                with active_samples(samples):
                    return letter_log_probs(model, batch, plain.letter_ids)

            res["single_sample_ms"] = timed(single, a.reps, sync)
        for k in ks:
            if k == 1:
                continue
            ms = timed(lambda k=k, p=pred: p.predict([Request(prepared, k, seed=1)]), a.reps, sync)
            res[f"ours_{key}_k{k}_ms"] = ms
            print(f"ours_{key}_k{k}_ms", round(ms, 2), flush=True)
        detach_posterior(model)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    m = res["merged_ms"]
    ratios = {}
    for k in ks:
        row = {"seq": round(res["single_sample_ms"] * k / m, 2) if k > 1 else 1.0}
        for top in a.tops.split(","):
            key = "all" if top == "all" else f"top{top}"
            v = res.get(f"ours_{key}_k{k}_ms", res.get(f"ours_{key}_k1_ms"))
            row[key] = round(v / m, 2)
        ratios[f"K{k}"] = row
    res["ratios_to_merged"] = ratios
    res["merged_end_ms"] = timed(merged, a.reps, sync)
    if device.type == "cuda":
        res["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
