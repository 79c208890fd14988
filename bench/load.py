"""Bounded load generator and throughput benchmark of a Quaver server, on loopback only.

N concurrent clients (default 16) each send a fixed number of `POST /answer` requests and stop;
a time limit bounds the run as well. Audio comes from a benchmark split directory (the layout of
training/data/manifest.py) or, without one, from synthetic tones. One JSON document reports
requests/s, p50/p95 latency, HTTP status counts and answered/abstained counts.

    # against a running server (127.0.0.1 / localhost / ::1 only)
    python bench/load.py --url http://127.0.0.1:8000 --data data/synth --split test
    python bench/load.py --url http://127.0.0.1:8000 --data data/synth --phases test,test_shift

    # server started in-process on a tiny random model built in a temp dir (seconds, anywhere)
    python bench/load.py --tiny

    # micro-batching on vs off, same load, one process, printed side by side with the ratio
    python bench/load.py --compare-batching --tiny
    python bench/load.py --compare-batching --model artifacts/base --posterior app/default

`--compare-batching` starts the server twice in this process: once with the service's default
micro-batching (max_batch_rows 64, max_wait_ms 5) and once one request at a time
(max_batch_rows = K, the rows of one request, and max_wait_ms 0, so no two requests ever share a
forward pass). Adaptive sampling is off in both runs so that every request costs exactly K rows.
Each side also reports its forward passes, mean decoder rows per pass and seconds spent in the
model (from the server's /metrics). The tiny model runs the default comparison in well under a
minute on 2 CPU cores; there the decoder's cost grows with its rows, so batching saves only the
per-pass overhead, and the ratio says more on an accelerator or a larger model.

Reused by tests/test_monitoring_live.py: `LoadConfig`, `run_load`, `split_payloads`,
`build_tiny`, `serve_in_thread`, `free_port`.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
TOO_MANY_CHOICES = 11  # one past the letters A-J a prompt can offer
SAMPLE_RATE = 16_000

# Text the tiny model's tokenizer is trained on: the benchmark's question/choice vocabulary.
TINY_TEXT = (
    "How many beeps are there?",
    "How many noise bursts can you hear?",
    "Which sound is louder?",
    "Is the pitch rising or falling?",
    "Which comes first?",
    "Is there a click?",
    "first second rising falling steady",
    "one two three four five",
    "yes no low high fast slow tone noise burst click sweep louder quieter same different",
)

# Threshold table of the tiny posterior (quaver.json "calibration"): one infeasible target
# (always abstain), one that always answers, three in between. The model is random, so these
# are fixed numbers, not the output of a calibration.
TINY_CALIBRATION: dict[str, Any] = {
    "delta": 0.05,
    "method": "fixed (tiny random model)",
    "n": 0,
    "targets": [
        {
            "max_risk": 0.01,
            "threshold": None,
            "coverage": 0.0,
            "risk_bound": 1.0,
            "feasible": False,
        },
        {"max_risk": 0.05, "threshold": 0.6, "coverage": 0.3, "risk_bound": 0.05, "feasible": True},
        {"max_risk": 0.1, "threshold": 0.45, "coverage": 0.6, "risk_bound": 0.1, "feasible": True},
        {"max_risk": 0.2, "threshold": 0.35, "coverage": 0.9, "risk_bound": 0.2, "feasible": True},
        {"max_risk": 0.5, "threshold": 0.0, "coverage": 1.0, "risk_bound": 0.5, "feasible": True},
    ],
}


# -- what the clients send ----------------------------------------------------------------------
@dataclass(frozen=True)
class Payload:
    """One request's content: encoded audio file plus the question and its options."""

    audio: bytes  # the file as uploaded (WAV)
    question: str
    choices: tuple[str, ...]
    filename: str = "clip.wav"


def split_payloads(dataset_dir: Path, split: str, limit: int | None = None) -> list[Payload]:
    """Payloads of a benchmark split (`<dir>/<split>.jsonl`), in manifest order, at most `limit`."""
    from training.data.manifest import read_manifest

    items = read_manifest(Path(dataset_dir), split)
    if limit is not None:
        items = items[:limit]
    if not items:
        raise ValueError(f"split {split!r} of {dataset_dir} has no items")
    return [
        Payload(
            (Path(dataset_dir) / it.audio).read_bytes(),
            it.question,
            tuple(it.choices),
            Path(it.audio).name,
        )
        for it in items
    ]


def wav_bytes(wave: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    """(n,) float32 mono -> a PCM16 WAV file's bytes."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, wave, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def tone_payloads(n: int = 8, seconds: float = 2.0, seed: int = 0) -> list[Payload]:
    """`n` synthetic clips (a sine of random pitch, 1-4 beeps) with a counting question."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE  # (n_samples,) seconds
    words = ("one", "two", "three", "four")
    out = []
    for i in range(n):
        beeps = int(rng.integers(1, 5))
        gate = (np.floor(t * 2 * beeps / seconds) % 2 == 0).astype(np.float32)  # on/off beeps
        wave = 0.3 * gate * np.sin(2 * np.pi * rng.uniform(200, 2000) * t)
        out.append(
            Payload(
                wav_bytes(wave.astype(np.float32)),
                "How many beeps are there?",
                words,
                f"tone-{i}.wav",
            )
        )
    return out


# -- the load ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadConfig:
    """How hard and how long the clients push."""

    clients: int = 16  # concurrent clients, each with one request in flight
    requests_per_client: int = 8  # each client stops after this many requests
    max_seconds: float = 60.0  # no new request starts after this (the run always ends)
    request_timeout_s: float = 60.0  # client-side limit of one request
    samples: int | None = 8  # K per request; None = the server's default
    max_risks: tuple[float | None, ...] = (None,)  # cycled over requests; None = server default
    # every n-th request is refused, alternately for empty audio (422 invalid_input) and for
    # more choices than the service's bound (422 limit_exceeded); 0 = none
    bad_every: int = 0
    seed: int = 0  # request i sends seed + i (weight samples are reproducible per index)
    adaptive: bool | None = None  # sample only near the threshold; None = server default

    def __post_init__(self) -> None:
        if self.clients < 1:
            raise ValueError(f"clients must be >= 1, got {self.clients}")
        if self.requests_per_client < 1:
            raise ValueError(f"requests_per_client must be >= 1, got {self.requests_per_client}")
        if not self.max_seconds > 0 or not self.request_timeout_s > 0:
            raise ValueError("max_seconds and request_timeout_s must be positive")
        if self.samples is not None and self.samples < 1:
            raise ValueError(f"samples must be >= 1 or None, got {self.samples}")
        if not self.max_risks:
            raise ValueError("max_risks is empty (use (None,) for the server's default)")
        if any(r is not None and not 0 < r < 1 for r in self.max_risks):
            raise ValueError(f"every max_risk must be in (0, 1): {self.max_risks}")
        if self.bad_every < 0 or self.seed < 0:
            raise ValueError("bad_every and seed must be non-negative")

    @property
    def total_requests(self) -> int:
        return self.clients * self.requests_per_client


@dataclass
class LoadReport:
    """What one bounded run measured (wall-clock start/end for matching server-side windows)."""

    label: str
    requests: int  # requests sent (finished or failed)
    duration_s: float
    requests_per_s: float
    latency_ms: dict[str, float]  # p50, p95, max over all requests
    status: dict[str, int]  # "200", "422", ..., or "error:<exception>" -> count
    answers: dict[str, int]  # answered / abstained among the 200s
    started_at: float  # time.time() before the first request
    ended_at: float  # time.time() after the last response
    clients: int = 0
    samples: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_loopback(url: str) -> str:
    """`url` without a trailing slash; ValueError unless it is http on a loopback host."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in LOOPBACK_HOSTS:
        raise ValueError(f"load is only sent to http on loopback ({sorted(LOOPBACK_HOSTS)}): {url}")
    return url.rstrip("/")


def _request_fields(i: int, payloads: Sequence[Payload], cfg: LoadConfig):
    """Multipart fields of global request index i: (files, data, is_bad)."""
    p = payloads[i % len(payloads)]
    bad = cfg.bad_every > 0 and (i + 1) % cfg.bad_every == 0
    data: dict[str, Any] = {
        "question": p.question,
        "choices": list(p.choices),
        "seed": str(cfg.seed + i),
    }
    if cfg.adaptive is not None:
        data["adaptive"] = "true" if cfg.adaptive else "false"
    if cfg.samples is not None:
        data["samples"] = str(cfg.samples)
    risk = cfg.max_risks[i % len(cfg.max_risks)]
    if risk is not None:
        data["max_risk"] = f"{risk:g}"
    empty = bad and ((i + 1) // cfg.bad_every) % 2 == 1
    if bad and not empty:
        data["choices"] = [f"choice {j}" for j in range(TOO_MANY_CHOICES)]
    files = {"audio": (p.filename, b"" if empty else p.audio, "audio/wav")}
    return files, data, bad


async def _run_async(url: str, payloads: Sequence[Payload], cfg: LoadConfig):
    import httpx

    deadline = time.perf_counter() + cfg.max_seconds
    latencies: list[float] = []  # seconds, one per finished request
    status: Counter[str] = Counter()
    answers: Counter[str] = Counter()
    limits = httpx.Limits(max_connections=cfg.clients, max_keepalive_connections=cfg.clients)
    # trust_env=False: never route loopback traffic through a proxy from the environment.
    async with httpx.AsyncClient(
        base_url=url, timeout=cfg.request_timeout_s, limits=limits, trust_env=False
    ) as client:

        async def one_client(c: int) -> None:
            for j in range(cfg.requests_per_client):
                if time.perf_counter() >= deadline:
                    return
                files, data, _ = _request_fields(c + j * cfg.clients, payloads, cfg)
                t = time.perf_counter()
                try:
                    r = await client.post("/answer", files=files, data=data)
                except httpx.HTTPError as exc:
                    status[f"error:{type(exc).__name__}"] += 1
                    latencies.append(time.perf_counter() - t)
                    continue
                latencies.append(time.perf_counter() - t)
                status[str(r.status_code)] += 1
                if r.status_code == 200:
                    answers["abstained" if r.json()["abstain"] else "answered"] += 1

        await asyncio.gather(*(one_client(c) for c in range(cfg.clients)))
    return latencies, status, answers


def run_load(
    url: str, payloads: Sequence[Payload], cfg: LoadConfig | None = None, label: str = "load"
) -> LoadReport:
    """Send `cfg.total_requests` requests from `cfg.clients` concurrent clients; block until done.

    Request i (client i % clients) sends payloads[i % len(payloads)], max_risks[i % len], seed
    cfg.seed + i, so two runs with the same arguments send the same requests.
    """
    cfg = cfg or LoadConfig()
    url = check_loopback(url)
    if not payloads:
        raise ValueError("no payloads to send")
    started, t0 = time.time(), time.perf_counter()
    latencies, status, answers = asyncio.run(_run_async(url, payloads, cfg))
    duration = time.perf_counter() - t0
    ended = time.time()
    lat = np.asarray(latencies) * 1000 if latencies else np.zeros(1)
    n = len(latencies)
    return LoadReport(
        label=label,
        requests=n,
        duration_s=round(duration, 4),
        requests_per_s=round(n / duration, 3) if duration > 0 else 0.0,
        latency_ms={
            "p50": round(float(np.percentile(lat, 50)), 2),
            "p95": round(float(np.percentile(lat, 95)), 2),
            "max": round(float(lat.max()), 2),
        },
        status=dict(sorted(status.items())),
        answers={"answered": answers["answered"], "abstained": answers["abstained"]},
        started_at=started,
        ended_at=ended,
        clients=cfg.clients,
        samples=cfg.samples,
    )


def run_phases(
    url: str, phases: Sequence[tuple[str, Sequence[Payload]]], cfg: LoadConfig | None = None
) -> list[LoadReport]:
    """One bounded run per (name, payloads), one after the other (e.g. test, then test_shift)."""
    return [run_load(url, payloads, cfg, label=name) for name, payloads in phases]


# -- a server in this process --------------------------------------------------------------------
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_in_thread(settings, ready_timeout_s: float = 180.0) -> Iterator[str]:
    """Run `create_app(settings)` under uvicorn on 127.0.0.1 (free port) in a daemon thread.

    Yields the base URL once /readyz answers 200 (model loaded, warm-up pass done); raises
    RuntimeError with the load error if the model fails to load. Stops the server on exit.
    """
    import httpx
    import uvicorn

    from app.server import create_app

    port = free_port()
    app = create_app(settings.model_copy(update={"host": "127.0.0.1", "port": port}))
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, name="quaver-bench-server", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            try:
                r = httpx.get(url + "/readyz", timeout=2.0, trust_env=False)
                if r.status_code == 200:
                    break
                if r.json().get("status") == "failed":
                    raise RuntimeError(f"server failed to load: {r.json().get('error')}")
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"server on {url} not ready within {ready_timeout_s:.0f} s")
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(15)


# -- the tiny random model -----------------------------------------------------------------------
def build_tiny(
    out_dir: Path, seed: int = 0, layers: tuple[int, ...] = (2, 3), rank: int = 4, std: float = 0.05
) -> tuple[Path, Path]:
    """A random-init tiny Qwen2-Audio checkpoint and a random posterior: (model_dir, posterior_dir).

    The posterior puts LoRA (rank `rank`) on every decoder linear of `layers`, with random means
    and stds up to `std`, and carries the fixed threshold table TINY_CALIBRATION.
    """
    import torch

    from app.family import AUDIO_TOKEN, DECODER_LINEARS, QWEN2_AUDIO, build_model, tiny_config
    from app.modeling import load_checkpoint, save_checkpoint
    from app.posterior import LoRASpec, Posterior, save_posterior
    from training.base.tokenizer import train_tokenizer

    out_dir = Path(out_dir)
    tok = train_tokenizer(TINY_TEXT * 5, vocab_size=400)
    cfg = tiny_config(len(tok), tok.convert_tokens_to_ids(AUDIO_TOKEN), tok.pad_token_id)
    model_dir = save_checkpoint(build_model(cfg, seed), tok, out_dir / "model")
    loaded = load_checkpoint(model_dir)
    gen = torch.Generator().manual_seed(seed)
    named = dict(loaded.model.named_modules())
    modules, mean, sd = [], {}, {}
    for layer in layers:
        prefix = QWEN2_AUDIO.decoder_layer_prefix(layer) + "."
        for name, mod in named.items():
            if name.startswith(prefix) and name.rsplit(".", 1)[-1] in DECODER_LINEARS:
                modules.append(name)
                # A: (r, in), B: (out, r), as the posterior format stores them
                for which, shape in (
                    ("A", (rank, mod.in_features)),
                    ("B", (mod.out_features, rank)),
                ):
                    key = f"{name}.lora_{which}.weight"
                    mean[key] = torch.randn(shape, generator=gen) * 0.1
                    sd[key] = torch.rand(shape, generator=gen) * std + 1e-4
    spec = LoRASpec(rank, 2.0 * rank, tuple(modules), tuple(layers), DECODER_LINEARS)
    meta = {
        "name": "tiny-random",
        "base": {"path": str(model_dir), "identity": loaded.identity},
        "optimizer": "ivon",
        "calibration": TINY_CALIBRATION,
    }
    post_dir = save_posterior(out_dir / "posterior", Posterior(spec, mean, sd, meta))
    return model_dir, post_dir


def batch_counters(url: str) -> dict[str, float]:
    """The server's forward passes, decoder rows and inference seconds so far (from /metrics)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(check_loopback(url) + "/metrics", timeout=10, trust_env=False).text
    wanted = {
        "quaver_batch_size_count": "passes",
        "quaver_batch_size_sum": "rows",
        "quaver_inference_duration_seconds_sum": "inference_s",
    }
    out = dict.fromkeys(wanted.values(), 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                out[wanted[sample.name]] += sample.value
    return out


# -- micro-batching on vs off --------------------------------------------------------------------
def compare_batching(
    model_dir: Path,
    posterior_dir: Path,
    payloads: Sequence[Payload],
    cfg: LoadConfig,
    *,
    max_batch_rows: int = 64,
    max_wait_ms: float = 5.0,
    threads: int = 0,
    warmup_per_client: int = 1,
) -> dict[str, Any]:
    """Same load against the server with micro-batching and one request at a time.

    Both servers run in this process, one after the other, with adaptive sampling off. Returns
    {"batched": report, "one_at_a_time": report, "throughput_ratio": batched / one-at-a-time}.
    """
    from app.settings import Settings

    k = cfg.samples or 8
    common = dict(
        model_dir=model_dir,
        posterior_dir=posterior_dir,
        adaptive=False,
        default_samples=k,
        max_samples=max(32, k),
        threads=threads,
        queue_size=max(64, 2 * cfg.clients),
        request_timeout_s=cfg.request_timeout_s,
    )
    modes = {
        "batched": Settings(
            **common, max_batch_rows=max(max_batch_rows, k), max_wait_ms=max_wait_ms
        ),
        # rows = K of one request and no waiting: every forward pass serves exactly one request
        "one_at_a_time": Settings(**common, max_batch_rows=k, max_wait_ms=0.0),
    }
    warm = LoadConfig(
        clients=cfg.clients,
        requests_per_client=warmup_per_client,
        samples=cfg.samples,
        max_risks=cfg.max_risks,
        seed=10**6,
    )
    reports: dict[str, Any] = {}
    for name, settings in modes.items():
        with serve_in_thread(settings) as url:
            run_load(url, payloads, warm, label=f"{name}-warmup")
            before = batch_counters(url)
            report = run_load(url, payloads, cfg, label=name)
            after = batch_counters(url)
        passes = after["passes"] - before["passes"]
        report.extra = {
            "max_batch_rows": settings.max_batch_rows,
            "max_wait_ms": settings.max_wait_ms,
            "forward_passes": int(passes),
            "mean_batch_rows": round((after["rows"] - before["rows"]) / passes, 2) if passes else 0,
            "inference_s": round(after["inference_s"] - before["inference_s"], 3),
        }
        reports[name] = report.to_dict()
    b, o = reports["batched"]["requests_per_s"], reports["one_at_a_time"]["requests_per_s"]
    reports["throughput_ratio"] = round(b / o, 3) if o else None
    return reports


# -- command line --------------------------------------------------------------------------------
def _floats(text: str) -> tuple[float | None, ...]:
    return tuple(None if x.strip() in ("", "default") else float(x) for x in text.split(","))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = p.add_argument_group("server")
    where.add_argument("--url", help="a running server (loopback only); else one is started here")
    where.add_argument("--model", type=Path, help="model directory for an in-process server")
    where.add_argument("--posterior", type=Path, help="posterior directory for it")
    where.add_argument(
        "--tiny",
        action="store_true",
        help="build a tiny random model + posterior in a temp dir and serve it",
    )
    where.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    what = p.add_argument_group("load")
    what.add_argument("--data", type=Path, help="benchmark directory (else synthetic tones)")
    what.add_argument("--split", default="test", help="split of --data to send")
    what.add_argument("--phases", help="comma-separated splits sent one after the other")
    what.add_argument("--limit", type=int, default=64, help="items per split at most")
    what.add_argument("--clients", type=int, default=16)
    what.add_argument("--requests", type=int, default=8, help="requests per client")
    what.add_argument("--samples", type=int, default=8, help="K per request")
    what.add_argument(
        "--max-risk",
        type=_floats,
        default=(None,),
        help="comma-separated max_risk values cycled over requests",
    )
    what.add_argument("--bad-every", type=int, default=0, help="every n-th request malformed")
    what.add_argument("--max-seconds", type=float, default=60.0, help="stop sending after this")
    p.add_argument(
        "--compare-batching",
        action="store_true",
        help="start the server twice: micro-batching vs one request at a time",
    )
    p.add_argument("--out", type=Path, help="also write the JSON report here")
    args = p.parse_args(argv)

    cfg = LoadConfig(
        clients=args.clients,
        requests_per_client=args.requests,
        max_seconds=args.max_seconds,
        samples=args.samples,
        max_risks=args.max_risk,
        bad_every=args.bad_every,
    )
    splits = [s for s in (args.phases or args.split).split(",") if s]
    if args.data is not None:
        phases = [(s, split_payloads(args.data, s, args.limit)) for s in splits]
    else:
        phases = [("tones", tone_payloads(min(args.limit, 16)))]
    if args.url:
        try:
            check_loopback(args.url)
        except ValueError as exc:
            p.error(str(exc))
    if args.url and (args.compare_batching or args.tiny or args.model):
        p.error("--url talks to a running server; --compare-batching/--tiny/--model start one")

    with tempfile.TemporaryDirectory(prefix="quaver-load-") as tmp:
        if args.url:
            model_dir = post_dir = None
        elif args.tiny:
            model_dir, post_dir = build_tiny(Path(tmp))
        elif args.model and args.posterior:
            model_dir, post_dir = args.model, args.posterior
        else:
            p.error("give --url, or --tiny, or --model and --posterior")

        if args.compare_batching:
            result: dict[str, Any] = compare_batching(
                model_dir, post_dir, phases[0][1], cfg, threads=args.threads
            )
        elif args.url:
            result = {"phases": [r.to_dict() for r in run_phases(args.url, phases, cfg)]}
        else:
            from app.settings import Settings

            settings = Settings(
                model_dir=model_dir, posterior_dir=post_dir, adaptive=False, threads=args.threads
            )
            with serve_in_thread(settings) as url:
                result = {"phases": [r.to_dict() for r in run_phases(url, phases, cfg)]}

    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
