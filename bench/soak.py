"""Soak and abuse benchmark: hostile inputs amid good traffic against the real server, on loopback.

Starts `quaver serve` as a subprocess (a tiny random model by default; the embedded default with
`--default`), then:
  1. baseline: `--clients` concurrent clients send good requests only (again after step 2, so
     that a machine whose load drifts shows it: compare the abuse phase with both);
  2. abuse: the same clients send good requests with the hostile corpus interleaved (each hostile
     case once, spread over the clients), while a prober checks every `--probe-s` seconds
     whether /healthz and /readyz tell the truth, i.e. agree with whether a good probe request
     is answered at that moment;
  3. SIGTERM, with requests in flight: the time until the process exits, and its exit status.

    python bench/soak.py                     # tiny random model (about a minute on 2 CPU cores)
    python bench/soak.py --default           # artifacts/base + app/default (quaver build-base)
    python bench/soak.py --json out.json     # also write the whole report as JSON

It prints the hostile cases with the status each got, the status codes seen, the count of 5xx
other than the documented 503 backpressure (overloaded / timeout / shutting_down), good requests
answered and lost, p50/p95 latency of good requests with and without the abuse (measured in this
one run), how often the health endpoints lied, and SIGTERM-to-exit. Every loop is bounded in
count and in time, and traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.load import build_tiny, free_port, tone_payloads, wav_bytes  # noqa: E402

QUESTION = "How many beeps are there?"
CHOICES = ["one", "two", "three", "four"]
BACKPRESSURE = {"overloaded", "timeout", "shutting_down"}  # documented 503 types


# -- raw HTTP: the cases an HTTP client library would refuse to send ----------------------------
@dataclass
class Reply:
    status: int | None  # None: no HTTP response (connection reset, timeout)
    etype: str = ""  # the JSON error type, when there is one
    note: str = ""
    seconds: float = 0.0  # from connecting to the end of the reply


def raw_request(port: int, head: bytes, body: bytes = b"", timeout_s: float = 30.0) -> Reply:
    """Send `head` + `body` on a fresh connection to 127.0.0.1, read the reply until close."""
    t0 = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
            sock.sendall(head + body)  # the request says Connection: close
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
    except OSError as exc:
        return Reply(None, note=type(exc).__name__, seconds=time.perf_counter() - t0)
    dt = time.perf_counter() - t0
    if not data.startswith(b"HTTP/"):
        return Reply(None, note="no HTTP reply", seconds=dt)
    status = int(data.split(b" ", 2)[1])
    payload = data.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in data else b""
    try:
        etype = json.loads(payload)["error"]["type"]
    except (ValueError, KeyError, TypeError):
        etype = ""
    return Reply(status, etype, seconds=dt)


def multipart(
    fields: list[tuple[str, str | tuple[str, bytes, str]]], boundary: str = "zz"
) -> bytes:
    """A multipart/form-data body from (name, text) and (name, (filename, bytes, type)) parts."""
    out = io.BytesIO()
    for name, value in fields:
        out.write(f"--{boundary}\r\n".encode())
        if isinstance(value, tuple):
            fname, data, ctype = value
            out.write(
                f'Content-Disposition: form-data; name="{name}"; filename="{fname}"\r\n'
                f"Content-Type: {ctype}\r\n\r\n".encode()
            )
            out.write(data)
        else:
            out.write(f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
            out.write(value.encode("utf-8", "surrogatepass"))
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue()


def post_head(length: int | None, ctype: str = "multipart/form-data; boundary=zz") -> bytes:
    lines = ["POST /answer HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if ctype:
        lines.append(f"Content-Type: {ctype}")
    lines.append(
        f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    )
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunked(body: bytes, step: int = 1 << 16) -> bytes:
    parts = [
        b"%x\r\n%s\r\n" % (len(c), c)
        for c in (body[i : i + step] for i in range(0, len(body), step))
    ]
    return b"".join(parts) + b"0\r\n\r\n"


# -- the hostile corpus --------------------------------------------------------------------------
def wav_header(channels: int, rate: int, bits: int = 16, data_len: int = 0) -> bytes:
    """A canonical 44-byte PCM WAV header with whatever values it is given (lies included)."""
    block = channels * bits // 8
    return (
        b"RIFF"
        + struct.pack("<I", min(36 + data_len, 0xFFFFFFFF))
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * block, block, bits)
        + b"data"
        + struct.pack("<I", data_len)
    )


def float_wav(values: np.ndarray, rate: int = 16000) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, values.astype(np.float32), rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def flac_bomb(hours: float = 2.0) -> bytes:
    """Hours of 8 kHz silence in a FLAC file of a few hundred kB (GBs once decoded)."""
    import soundfile as sf

    buf = io.BytesIO()
    block = np.zeros(8000 * 600, np.int16)  # 10 minutes
    with sf.SoundFile(buf, "w", samplerate=8000, channels=1, format="FLAC") as f:
        for _ in range(round(hours * 6)):
            f.write(block)
    return buf.getvalue()


def hostile_cases(good_wav: bytes) -> list[tuple[str, Callable[[int], Reply]]]:
    """(name, send(port) -> Reply) for every hostile input; each sends one request."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    long_audio = wav_header(1, 8000, 8, 8000 * 600) + bytes(8000 * 600)  # 10 min, 8-bit, 4.8 MB

    def form(audio=("a.wav", good_wav, "audio/wav"), question=QUESTION, choices=CHOICES, **extra):
        fields: list = []
        if audio is not None:
            fields.append(("audio", audio))
        if question is not None:
            fields.append(("question", question))
        fields += [("choices", c) for c in choices]
        fields += [(k, str(v)) for k, v in extra.items()]
        return multipart(fields)

    def send_form(**kw) -> Callable[[int], Reply]:
        body = form(**kw)
        return lambda port: raw_request(port, post_head(len(body)), body)

    def send_audio(data: bytes, ctype: str = "audio/wav") -> Callable[[int], Reply]:
        return send_form(audio=("a.wav", data, ctype))

    def send_raw(head: bytes, body: bytes, timeout_s: float = 30.0) -> Callable[[int], Reply]:
        return lambda port: raw_request(port, head, body, timeout_s)

    big = b"\x00" * (60 * 1024 * 1024)
    big_form = (
        b'--zz\r\nContent-Disposition: form-data; name="audio"; filename="a.wav"\r\n'
        b"Content-Type: audio/wav\r\n\r\n" + big
    )
    good_form = form()
    wav = ("a.wav", good_wav, "audio/wav")
    two_files = multipart(
        [("audio", wav), ("audio", wav), ("question", QUESTION), ("choices", "a"), ("choices", "b")]
    )
    cases: list[tuple[str, Callable[[int], Reply]]] = [
        # audio that is not what it claims
        ("empty audio file", send_audio(b"")),
        ("WAV header only", send_audio(good_wav[:44])),
        ("WAV cut mid-header", send_audio(good_wav[:20])),
        ("WAV cut mid-data", send_audio(good_wav[: len(good_wav) // 2])),
        ("WAV data size lies (4 GB)", send_audio(wav_header(1, 16000, 16, 0xFFFFFFF0) + noise)),
        ("wrong magic (RIFX/WAVE)", send_audio(b"RIFX" + good_wav[4:])),
        ("random bytes", send_audio(noise)),
        ("PNG bytes", send_audio(b"\x89PNG\r\n\x1a\n" + noise, "image/png")),
        ("PNG bytes as audio/wav", send_audio(b"\x89PNG\r\n\x1a\n" + noise)),
        (
            "MP3 garbage (ID3 + frame sync)",
            send_audio(b"ID3\x04\x00\x00\x00\x00\x00\x00\xff\xfb" + noise, "audio/mpeg"),
        ),
        ("FLAC garbage", send_audio(b"fLaC" + noise, "audio/flac")),
        ("OGG garbage", send_audio(b"OggS\x00\x02" + noise, "audio/ogg")),
        ("zero channels", send_audio(wav_header(0, 16000) + noise)),
        ("zero sample rate", send_audio(wav_header(1, 0) + noise)),
        ("absurd sample rate (4 GHz)", send_audio(wav_header(1, 4_000_000_000 // 4) + noise)),
        ("very long audio (10 min)", send_audio(long_audio)),
        ("FLAC bomb (2 h of silence, 0.2 MB)", send_audio(flac_bomb(), "audio/flac")),
        ("one sample of audio", send_audio(wav_header(1, 16000, 16, 2) + b"\x00\x01")),
        ("NaN samples", send_audio(float_wav(np.full(16000, np.nan)))),
        ("inf samples", send_audio(float_wav(np.full(16000, np.inf)))),
        ("text/plain audio", send_audio(good_wav, "text/plain")),
        # questions and choices
        ("1 MB question", send_form(question="x" * 1_000_000)),
        ("200 kB choice", send_form(choices=["one", "y" * 200_000])),
        ("200 kB choice in a JSON list", send_form(choices=[json.dumps(["one", "y" * 200_000])])),
        ("100 choices", send_form(choices=[f"choice {i}" for i in range(100)])),
        ("duplicate choices", send_form(choices=["one", "One "])),
        ("empty choice", send_form(choices=["one", "  "])),
        ("one choice", send_form(choices=["one"])),
        ("no choices", send_form(choices=[])),
        ("malformed JSON choices", send_form(choices=['["one", "two"'])),
        ("empty question", send_form(question="   ")),
        ("no question", send_form(question=None)),
        ("no audio part", send_form(audio=None)),
        ("NUL in question", send_form(question="How many\x00 beeps?\x00")),
        ("NUL in a choice", send_form(choices=["one\x00", "two"])),
        (
            "unicode question (emoji, RTL, combining)",
            send_form(question="كم عدد 🔔 beeps? e\u0301\u202e"),
        ),
        ("lone surrogate in question", send_form(question="beeps \udcff?")),
        # numbers
        ("samples=0", send_form(samples=0)),
        ("samples=-3", send_form(samples=-3)),
        ("samples=100000", send_form(samples=100000)),
        ("samples=abc", send_form(samples="abc")),
        ("max_risk=0", send_form(max_risk=0)),
        ("max_risk=1.5", send_form(max_risk=1.5)),
        ("max_risk=nan", send_form(max_risk="nan")),
        ("max_risk=inf", send_form(max_risk="inf")),
        ("seed=-1", send_form(seed=-1)),
        ("seed=2**70", send_form(seed=2**70)),
        ("seed=x", send_form(seed="x")),
        # the HTTP layer
        ("two audio files", send_raw(post_head(len(two_files)), two_files)),
        (
            "broken multipart (no closing boundary)",
            send_raw(post_head(len(good_form) - 8), good_form[:-8]),
        ),
        (
            "multipart with the wrong boundary",
            send_raw(post_head(len(good_form), "multipart/form-data; boundary=other"), good_form),
        ),
        (
            "multipart without a boundary",
            send_raw(post_head(len(good_form), "multipart/form-data"), good_form),
        ),
        (
            "JSON body",
            send_raw(
                post_head(60, "application/json"),
                json.dumps({"question": QUESTION, "choices": CHOICES}).encode().ljust(60),
            ),
        ),
        ("no content type", send_raw(post_head(len(good_form), ""), good_form)),
        (
            "Content-Length larger than the body",
            send_raw(post_head(len(good_form) + 5000), good_form, timeout_s=15),
        ),
        (
            "Content-Length not a number",
            send_raw(
                post_head(None).replace(b"Transfer-Encoding: chunked", b"Content-Length: lots"),
                good_form,
            ),
        ),
        ("60 MB body (Content-Length)", send_raw(post_head(len(big_form)), big_form)),
        ("60 MB body (chunked)", send_raw(post_head(None), chunked(big_form))),
        (
            "100 kB header",
            send_raw(
                b"POST /answer HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: "
                + b"a" * 100_000
                + b"\r\nContent-Length: 0\r\n\r\n",
                b"",
            ),
        ),
        (
            "GET /answer",
            send_raw(b"GET /answer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b""),
        ),
        (
            "not HTTP at all",
            send_raw(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + noise[:200], b""),
        ),
    ]
    return cases


# -- the server ----------------------------------------------------------------------------------
def start_server(model_dir: Path, posterior_dir: Path, port: int, env: dict[str, str]):
    quaver = Path(sys.executable).parent / "quaver"
    cmd = (
        [str(quaver), "serve"]
        if quaver.exists()
        else [sys.executable, "-m", "training.cli", "serve"]
    )
    environ = dict(
        os.environ,
        QUAVER_MODEL_DIR=str(model_dir),
        QUAVER_POSTERIOR_DIR=str(posterior_dir),
        QUAVER_HOST="127.0.0.1",
        QUAVER_PORT=str(port),
        **env,
    )
    return subprocess.Popen(
        cmd, env=environ, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> float:
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode} before it was ready")
        try:
            if httpx.get(url + "/readyz", timeout=2, trust_env=False).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server was not ready within {timeout_s:.0f} s")


# -- traffic -------------------------------------------------------------------------------------
@dataclass
class GoodStats:
    latencies: list[float]
    status: Counter

    @property
    def answered(self) -> int:
        return self.status.get("200", 0)

    @property
    def lost(self) -> int:
        return sum(self.status.values()) - self.answered

    def pct(self, q: float) -> float | None:
        return round(float(np.percentile(self.latencies, q)) * 1000, 1) if self.latencies else None

    def summary(self) -> dict:
        return {
            "answered": self.answered,
            "lost": self.lost,
            "p50_ms": self.pct(50),
            "p95_ms": self.pct(95),
        }


async def traffic(
    url: str,
    port: int,
    clients: int,
    good_per_client: int,
    hostile: list[tuple[str, Callable[[int], Reply]]],
    max_seconds: float,
) -> tuple[GoodStats, dict[str, Reply]]:
    """`clients` clients, each: good, hostile, good, ... (hostile cases dealt round-robin)."""
    import httpx

    payloads = tone_payloads(16, seconds=2.0)
    good = GoodStats([], Counter())
    replies: dict[str, Reply] = {}
    deadline = time.monotonic() + max_seconds
    mine = [hostile[c::clients] for c in range(clients)]
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(
        base_url=url, timeout=60, limits=limits, trust_env=False
    ) as client:

        async def one(c: int) -> None:
            todo = list(mine[c])
            for j in range(good_per_client):
                if time.monotonic() > deadline:
                    return
                p = payloads[(c + j * clients) % len(payloads)]
                t = time.perf_counter()
                try:
                    r = await client.post(
                        "/answer",
                        files={"audio": (p.filename, p.audio, "audio/wav")},
                        data={"question": p.question, "choices": list(p.choices), "seed": str(j)},
                    )
                    good.status[str(r.status_code)] += 1
                except httpx.HTTPError as exc:
                    good.status[f"error:{type(exc).__name__}"] += 1
                good.latencies.append(time.perf_counter() - t)
                if todo:
                    name, send = todo.pop(0)
                    replies[name] = await asyncio.to_thread(send, port)
            for name, send in todo:  # whatever is left when the good requests run out
                replies[name] = await asyncio.to_thread(send, port)

        await asyncio.gather(*(one(c) for c in range(clients)))
    return good, replies


class Prober(threading.Thread):
    """Every `every_s`: /healthz, /readyz, then one good request; counts the lies."""

    def __init__(self, url: str, every_s: float, payload) -> None:
        super().__init__(daemon=True)
        self.url, self.every_s, self.payload = url, every_s, payload
        self.stop_flag = threading.Event()
        self.rounds = 0
        self.healthz_lies: list[str] = []
        self.readyz_lies: list[str] = []

    def run(self) -> None:
        import httpx

        with httpx.Client(base_url=self.url, timeout=30, trust_env=False) as c:
            while not self.stop_flag.wait(self.every_s):
                try:
                    h = c.get("/healthz").status_code
                    rd = c.get("/readyz").status_code
                    p = self.payload
                    r = c.post(
                        "/answer",
                        files={"audio": (p.filename, p.audio, "audio/wav")},
                        data={"question": p.question, "choices": list(p.choices)},
                    )
                    ok = r.status_code == 200
                except httpx.HTTPError as exc:
                    h, rd, ok = None, None, False
                    self.healthz_lies.append(f"round {self.rounds}: {type(exc).__name__}")
                self.rounds += 1
                if h is not None and (h == 200) != ok:
                    self.healthz_lies.append(f"round {self.rounds}: healthz {h}, answered {ok}")
                if rd is not None and rd == 200 and not ok:
                    self.readyz_lies.append(f"round {self.rounds}: readyz {rd}, answered {ok}")


def sigterm_exit(proc: subprocess.Popen, url: str, payload, grace_s: float) -> dict:
    """SIGTERM while 8 clients keep requests in flight: seconds to exit, exit status, and what
    the requests sent around the signal got (200 answered, 503 shutting_down, or refused)."""
    import httpx

    got: Counter = Counter()
    signalled = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=url, timeout=60, trust_env=False) as c:
            for _ in range(1000):  # bounded; ends at the first refused connection
                files = {"audio": (payload.filename, payload.audio, "audio/wav")}
                data = {"question": payload.question, "choices": list(payload.choices)}
                try:
                    r = c.post("/answer", files=files, data={**data, "samples": "16"})
                except httpx.HTTPError as exc:
                    got[f"after SIGTERM: {type(exc).__name__}"] += signalled.is_set()
                    return
                if signalled.is_set():
                    etype = (
                        r.json().get("error", {}).get("type", "") if r.status_code != 200 else ""
                    )
                    got[f"after SIGTERM: {r.status_code} {etype}".strip()] += 1

    threads = [threading.Thread(target=client, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    t0 = time.monotonic()
    signalled.set()
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=grace_s + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = "killed after grace + 30 s"
    dt = time.monotonic() - t0
    for t in threads:
        t.join(10)
    return {"seconds": round(dt, 2), "exit_status": rc, "in_flight": dict(got)}


# -- the report ----------------------------------------------------------------------------------
def classify(r: Reply) -> str:
    if r.status is None:
        return f"no reply ({r.note})"
    return f"{r.status} {r.etype}".strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--default", action="store_true", help="serve artifacts/base + app/default")
    ap.add_argument("--model", type=Path, default=ROOT / "artifacts" / "base")
    ap.add_argument("--posterior", type=Path, default=ROOT / "app" / "default")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--good", type=int, default=8, help="good requests per client and phase")
    ap.add_argument("--max-seconds", type=float, default=300, help="per phase")
    ap.add_argument("--probe-s", type=float, default=0.5, help="health probe period")
    ap.add_argument("--grace-s", type=float, default=8.0, help="QUAVER_SHUTDOWN_GRACE_S")
    ap.add_argument("--json", type=Path, help="write the report here")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        if args.default:
            if not (args.model / "config.json").exists():
                raise SystemExit(
                    f"{args.model} has no base: run `quaver build-base --out {args.model}`"
                )
            model_dir, post_dir, label = args.model, args.posterior, "embedded default"
        else:
            model_dir, post_dir = build_tiny(Path(tmp))
            label = "tiny random model"
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {
            "QUAVER_SHUTDOWN_GRACE_S": str(args.grace_s),
            "QUAVER_DEFAULT_SAMPLES": "8",
            "QUAVER_BODY_TIMEOUT_S": "5",
        }
        proc = start_server(model_dir, post_dir, port, env)
        try:
            ready_s = wait_ready(url, proc, 600)
            good_wav = wav_bytes(_tone())
            cases = hostile_cases(good_wav)
            print(
                f"[soak] {label}: ready in {ready_s:.1f} s; {len(cases)} hostile cases", flush=True
            )
            base, _ = asyncio.run(traffic(url, port, args.clients, args.good, [], args.max_seconds))
            print(f"[soak] baseline: {base.answered} answered", flush=True)
            prober = Prober(url, args.probe_s, tone_payloads(1, seed=7)[0])
            prober.start()
            t0 = time.monotonic()
            abuse, replies = asyncio.run(
                traffic(url, port, args.clients, args.good, cases, args.max_seconds)
            )
            abuse_s = time.monotonic() - t0
            prober.stop_flag.set()
            prober.join(60)
            alive = proc.poll() is None
            after = (
                asyncio.run(traffic(url, port, args.clients, args.good, [], args.max_seconds))[0]
                if alive
                else GoodStats([], Counter())
            )
            shutdown = sigterm_exit(proc, url, tone_payloads(1)[0], args.grace_s) if alive else {}
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

    seen = Counter(classify(r) for r in replies.values())
    five = {
        n: classify(r)
        for n, r in replies.items()
        if r.status is not None
        and r.status >= 500
        and not (r.status == 503 and r.etype in BACKPRESSURE)
    }
    no_reply = {n: classify(r) for n, r in replies.items() if r.status is None}
    report = {
        "server": label,
        "ready_s": round(ready_s, 1),
        "clients": args.clients,
        "hostile_cases": len(cases),
        "hostile": {n: classify(r) for n, r in replies.items()},
        "hostile_ms": {n: round(r.seconds * 1000, 1) for n, r in replies.items()},
        "status_seen": dict(sorted(seen.items())),
        "5xx_other_than_backpressure": five,
        "no_reply": no_reply,
        "good": {
            "baseline": base.summary(),
            "under_abuse": {**abuse.summary(), "status": dict(abuse.status)},
            "baseline_after": after.summary(),
        },
        "abuse_phase_s": round(abuse_s, 1),
        "server_alive_after_abuse": alive,
        "health_probes": prober.rounds,
        "healthz_lies": prober.healthz_lies,
        "readyz_lies": prober.readyz_lies,
        "sigterm": shutdown,
    }
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    ok = (
        not five
        and abuse.lost == 0
        and base.lost == 0
        and after.lost == 0
        and not prober.healthz_lies
        and not prober.readyz_lies
        and alive
        and shutdown.get("exit_status") == 0
    )
    print(f"[soak] {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def _tone() -> np.ndarray:
    t = np.arange(32000) / 16000
    return (0.3 * np.sin(2 * np.pi * 440 * t) * (np.floor(t * 4) % 2 == 0)).astype(np.float32)


def print_report(r: dict) -> None:
    print(f"\n== soak: {r['server']} ({r['clients']} clients) ==")
    print(f"hostile cases: {r['hostile_cases']}")
    width = max(len(n) for n in r["hostile"])
    for name, got in r["hostile"].items():
        print(f"  {name:<{width}}  {got:<28} {r['hostile_ms'][name]:>8.1f} ms")
    print(
        "status codes seen (hostile):", ", ".join(f"{k} x{v}" for k, v in r["status_seen"].items())
    )
    print(f"5xx other than documented 503 backpressure: {len(r['5xx_other_than_backpressure'])}")
    print(f"hostile requests with no HTTP reply: {len(r['no_reply'])}")
    g = r["good"]
    for phase in ("baseline", "under_abuse", "baseline_after"):
        x = g[phase]
        print(
            f"good requests {phase:>12}: answered {x['answered']}, lost {x['lost']}, p50 {x['p50_ms']} ms, p95 {x['p95_ms']} ms"
        )
    print(f"server alive after the abuse: {r['server_alive_after_abuse']}")
    print(
        f"health probes: {r['health_probes']}; /healthz lied {len(r['healthz_lies'])}x, /readyz lied {len(r['readyz_lies'])}x"
    )
    s = r["sigterm"]
    if s:
        print(
            f"SIGTERM to exit: {s['seconds']} s, exit status {s['exit_status']}, in-flight requests got {s['in_flight']}"
        )


if __name__ == "__main__":
    sys.exit(main())
