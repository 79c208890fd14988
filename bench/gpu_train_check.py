"""The training half on a GPU: random-weight Qwen2.5-Omni-3B- and Qwen2-Audio-7B-shaped models in
bf16, LoRA r8/alpha16 on every LLM linear layer, 20 IVON and 20 AdamW steps through the stages'
own step code (micro-batches, gradient checkpointing), export, then serve K=8 from the exported
posterior: the K-sample ratio to the merged pass and the engine's micro-batching throughput at
16 concurrent clients (batched vs one request per pass, same run).

    python3 bench/gpu_train_check.py --device cuda --out gpu-results/train.json
    python3 bench/gpu_train_check.py --device cpu --tiny      # the same flow, tiny shapes, CPU

The real shapes are the published configs' LLM and audio-encoder sizes (the Omni vision tower,
never used, is cut to one small block). Weights are random: times and memory are meaningful,
answers are not. Prints one JSON line per model and writes them all to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import (
    Qwen2_5OmniThinkerConfig,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen2AudioConfig,
    Qwen2AudioForConditionalGeneration,
)

from app.audio import FeatureExtractor
from app.engine import Engine, Job
from app.family import (
    AUDIO_BOS,
    AUDIO_EOS,
    AUDIO_TOKEN,
    IM_END,
    IM_START,
    family_for,
    tiny_config,
    tiny_omni_config,
)
from app.metrics import Metrics
from app.modeling import LoadedModel, config_hash
from app.posterior import load_posterior
from app.predict import Predictor, Request
from app.prompt import PromptBuilder
from training.base.tokenizer import train_tokenizer
from training.config import FinetuneConfig, LoRAConfig
from training.stages.batches import Example
from training.stages.distributed import DistInfo, resolve_device
from training.stages.finetune import _LoRASteps, attach_lora, export, lora_spec, make_optimizer
from training.stages.prefix import LivePrefix

SHAPES = ("qwen2.5-omni-3b", "qwen2-audio-7b")
WORDS = ["How many sounds are there?", "Which sound is louder?", "one", "two", "three", "four"]
ENCODER = {  # the Whisper-large-v3-sized audio encoder both families ship
    "num_mel_bins": 128,
    "d_model": 1280,
    "encoder_layers": 32,
    "encoder_attention_heads": 20,
    "encoder_ffn_dim": 5120,
}


def model_config(shape: str, tiny: bool, vocab: int, audio: int, pad: int, bos: int, eos: int):
    """The shape's config; `tiny`: the cut-down configs of the tests (app.family)."""
    if shape == "qwen2.5-omni-3b":
        if tiny:
            return tiny_omni_config(vocab, audio, pad, bos, eos)
        return Qwen2_5OmniThinkerConfig(
            audio_config={**ENCODER, "n_window": 100, "output_dim": 2048},
            vision_config={"depth": 1, "hidden_size": 64, "num_heads": 2, "out_hidden_size": 2048},
            text_config={
                "vocab_size": 151936,
                "hidden_size": 2048,
                "intermediate_size": 11008,
                "num_hidden_layers": 36,
                "num_attention_heads": 16,
                "num_key_value_heads": 2,
                "max_position_embeddings": 32768,
                "tie_word_embeddings": True,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 1e6,
                    "mrope_section": [16, 24, 24],
                },
            },
            audio_token_index=audio,
            audio_start_token_id=bos,
            audio_end_token_id=eos,
        )
    if tiny:
        return tiny_config(vocab, audio, pad, window_s=30.0)
    return Qwen2AudioConfig(
        audio_config={"model_type": "qwen2_audio_encoder", **ENCODER, "max_source_positions": 1500},
        text_config={
            "model_type": "qwen2",
            "vocab_size": 156032,
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "max_position_embeddings": 8192,
            "layer_types": ["full_attention"] * 32,
        },
        audio_token_id=audio,
    )


def build(shape: str, tiny: bool, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """A random-weight model of the shape, built in `dtype` directly on `device`."""
    tok = train_tokenizer(WORDS * 5, vocab_size=400, chat_tokens=(IM_START, IM_END))
    audio, bos, eos = tok.convert_tokens_to_ids([AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS])
    cfg = model_config(shape, tiny, len(tok), audio, tok.pad_token_id, bos, eos)
    cls = (
        Qwen2_5OmniThinkerForConditionalGeneration
        if shape.startswith("qwen2.5")
        else Qwen2AudioForConditionalGeneration
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    family = family_for(cfg.model_type)
    features = FeatureExtractor(cfg.audio_config.num_mel_bins, family.window_frames(cfg))
    prompts = PromptBuilder(tok, family.audio_token_id(model), family.wrap_prompt)
    identity = f"random-{shape}{'-tiny' if tiny else ''}"
    return LoadedModel(
        model, tok, features, prompts, family, Path(identity), config_hash(cfg), identity
    )


def clips(loaded: LoadedModel, n: int, audio_s: float, seed: int = 0) -> list[Example]:
    """n prepared questions on noise clips of `audio_s` seconds, 4 choices, random labels."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        wave = (0.1 * rng.standard_normal(int(audio_s * 16000))).astype(np.float32)
        prepared = Predictor(loaded).prepare(wave, "How many sounds are there?", WORDS[2:6])
        out.append(Example(prepared, int(rng.integers(4)), None))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(loaded, optimizer, args, work: Path, device) -> tuple[dict, Path]:
    """`args.steps` steps of the stage's own step code; returns figures and the posterior dir."""
    cfg = FinetuneConfig(
        base_dir=work / "random",
        data_dir=work,
        out_dir=work / optimizer,
        optimizer=optimizer,
        epochs=1,
        batch_size=args.batch,
        micro_batch_size=args.micro,
        gradient_checkpointing=True,
        device=str(device),
        dtype=args.dtype,
        lora=LoRAConfig(rank=8, alpha=16.0),  # every decoder layer; IVON/AdamW: paper defaults
    )
    spec = lora_spec(loaded, cfg)
    examples = clips(loaded, 2 * args.batch, args.audio_s)
    peft_model, named = attach_lora(loaded.model, spec, gradient_checkpointing=True)
    model = peft_model.base_model.model
    params = [p for _, p in named]
    cache = LivePrefix(
        model, examples, spec.first_layer, loaded.tokenizer.pad_token_id, loaded.family
    )
    opt = make_optimizer(cfg, params)
    steps = _LoRASteps(
        cfg,
        model,
        params,
        opt,
        (examples, cache, examples, cache),
        spec.first_layer,
        loaded,
        DistInfo(),
    )
    steps.start_epoch(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, tokens = [], []
    for step in range(args.steps):
        idx = [(step * args.batch + i) % len(examples) for i in range(args.batch)]
        sync(device)
        t0 = time.perf_counter()
        losses, _, _ = steps.step(idx, step)
        sync(device)
        times.append(time.perf_counter() - t0)
        tokens.append(sum(len(examples[i].prepared.prompt.ids) for i in idx))
        if not all(math.isfinite(x) for x in losses):
            raise RuntimeError(f"{optimizer}: non-finite loss at step {step}")
    timed = times[2:] if len(times) > 4 else times  # the first steps warm kernels up
    figures = {
        "steps": args.steps,
        "step_s_median": float(np.median(timed)),
        "tokens_per_s": float(sum(tokens[-len(timed) :]) / sum(timed)),
        "peak_memory_gb": (
            torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
        ),
        "lora_params": sum(p.numel() for p in params),
        "lora_dtype": str({p.dtype for p in params}),
    }
    (work / "dataset.json").write_text(json.dumps({"fingerprint": "synthetic"}))
    post_dir = export(cfg, loaded, spec, named, opt, sum(times), work / f"{optimizer}-posterior")
    peft_model.unload()  # the plain base again, for the next optimizer and for serving
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    return figures, post_dir


def timed(fn, reps: int, device) -> float:
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / reps


async def _clients(engine: Engine, prepared, clients: int, each: int, k: int) -> float:
    async def client(c: int) -> None:
        for i in range(each):
            job = Job(Request(prepared[(c + i) % len(prepared)], k, seed=c * each + i), 0.0)
            await engine.submit(job, timeout_s=600)

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    return time.perf_counter() - t0


def serve(loaded, post_dir: Path, args, device) -> dict:
    """K=8 from the exported posterior: ratio to the merged pass, micro-batching throughput."""
    posterior = load_posterior(post_dir, expected_base=loaded.identity, model=loaded.model)
    dtypes = {t.dtype for t in (*posterior.mean.values(), *posterior.std.values())}
    predictor = Predictor(loaded, posterior)
    prepared = [e.prepared for e in clips(loaded, 4, args.audio_s, seed=1)]
    merged = timed(lambda: predictor.predict([Request(prepared[0], 1)]), args.reps, device)
    k8 = timed(lambda: predictor.predict([Request(prepared[0], 8, seed=0)]), args.reps, device)
    out = {
        "posterior_dtypes": sorted(str(d) for d in dtypes),
        "merged_ms": merged * 1e3,
        "k8_ms": k8 * 1e3,
        "k8_ratio": k8 / merged,
    }
    walls = {}
    for name, rows in (("one_per_pass", 8), ("batched", 8 * args.clients)):
        engine = Engine(predictor, Metrics(), max_batch_rows=rows, max_wait_ms=5.0, queue_size=256)
        engine.start()
        try:
            walls[name] = asyncio.run(_clients(engine, prepared, args.clients, args.each, 8))
        finally:
            engine.stop()
    n = args.clients * args.each
    out["requests"] = n
    out["req_per_s"] = {k: n / v for k, v in walls.items()}
    out["microbatch_speedup"] = walls["one_per_pass"] / walls["batched"]
    predictor.detach()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--tiny", action="store_true", help="tiny shapes (the tests'), for a CPU run")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8, help="prompts per optimizer step")
    p.add_argument("--micro", type=int, default=4, help="prompts per forward/backward pass")
    p.add_argument("--audio-s", type=float, default=30.0)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--each", type=int, default=4, help="requests per client")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results = []
    for shape in args.shapes.split(","):
        t0 = time.perf_counter()
        loaded = build(shape, args.tiny, device, dtype)
        res = {"shape": shape, "tiny": args.tiny, "device": card, "dtype": args.dtype}
        res["audio_s"], res["batch"], res["micro"] = args.audio_s, args.batch, args.micro
        with tempfile.TemporaryDirectory() as tmp:
            posts = {}
            for optimizer in ("ivon", "adamw"):
                res[optimizer], posts[optimizer] = train(loaded, optimizer, args, Path(tmp), device)
            res["serve"] = serve(loaded, posts["ivon"], args, device)
        res["wall_s"] = time.perf_counter() - t0
        print(json.dumps(res), flush=True)
        results.append(res)
        del loaded
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
