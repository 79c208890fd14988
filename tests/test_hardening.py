"""No single request can hold the service: bounds on cost, deadlines, watchdog, drain, shutdown.

Each bound is a 422 naming it; an oversized question or choice is refused before any model work;
a pass whose callers all gave up is abandoned at a layer boundary; a worker that stops making
progress turns /healthz to 503; an oversized body gets a readable 413; SIGTERM exits 0 within the
grace period even with a long pass in flight.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.engine import Engine, Job
from app.errors import InferenceTimeout, LimitExceeded
from app.forward import Abandoned
from app.metrics import Metrics
from app.predict import Predictor
from app.predict import Request as PredictRequest
from app.server import create_app, load_predictor
from app.settings import Settings
from tests.conftest import tone, wav_bytes

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "How many beeps are there?"
CHOICES = ["one", "two", "three"]


def post(client, audio=None, question=QUESTION, choices=CHOICES, **data):
    audio = wav_bytes(tone(1.5)) if audio is None else audio
    form = {"question": question, "choices": choices, **data}
    return client.post("/answer", files={"audio": ("a.wav", audio, "audio/wav")}, data=form)


def passes(client) -> float:
    """Forward passes the engine ran so far (the batch-size histogram's count)."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("quaver_batch_size_count"):
            return float(line.split()[-1])
    raise AssertionError("no quaver_batch_size_count in /metrics")


def metric(client, name: str) -> float:
    """An unlabelled sample's value from /metrics."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no {name} in /metrics")


@pytest.fixture(scope="module")
def limited(tiny_dir, posterior_dir):
    settings = Settings(
        model_dir=tiny_dir,
        posterior_dir=posterior_dir,
        default_samples=2,
        adaptive=False,
        max_question_chars=200,
        max_choice_chars=40,
        max_choices=4,
        max_question_tokens=12,
        max_choice_tokens=3,
        max_prompt_tokens=100,  # a 1.5 s clip's prompt is about 60 tokens, a 5 s clip's 150
    )
    with TestClient(create_app(settings, load_in_background=False)) as c:
        yield c


LIMIT_CASES = [
    ("question_chars", dict(question="beep " * 50), "QUAVER_MAX_QUESTION_CHARS"),
    ("choice_chars", dict(choices=["one", "x" * 41]), "QUAVER_MAX_CHOICE_CHARS"),
    ("choices", dict(choices=["one", "two", "three", "four", "five"]), "QUAVER_MAX_CHOICES"),
    ("question_tokens", dict(question="one two three " * 6), "QUAVER_MAX_QUESTION_TOKENS"),
    ("choice_tokens", dict(choices=["one two three four five", "two"]), "QUAVER_MAX_CHOICE_TOKENS"),
    ("prompt_tokens", dict(audio=wav_bytes(tone(5.0))), "QUAVER_MAX_PROMPT_TOKENS"),
]


@pytest.mark.parametrize(("limit", "kw", "setting"), LIMIT_CASES, ids=[c[0] for c in LIMIT_CASES])
def test_each_limit_is_a_422_naming_it(limited, limit, kw, setting):
    before = passes(limited)
    r = post(limited, **kw)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["type"] == "limit_exceeded" and err["limit"] == limit
    assert err["value"] > err["bound"]
    assert setting in err["message"] and str(err["value"]) in err["message"]
    assert passes(limited) == before  # refused before the engine ran anything
    assert f'quaver_rejected_total{{limit="{limit}"}}' in limited.get("/metrics").text
    assert post(limited).status_code == 200  # and the next good request is answered


def test_limits_admit_what_they_should(limited):
    # exactly at each bound is fine: 4 choices of at most 3 tokens, a 12-token question
    r = post(limited, question="How many beeps are there?", choices=["one", "two", "three", "four"])
    assert r.status_code == 200, r.text


def test_huge_question_and_choice_are_refused_before_any_model_work(tiny_dir, posterior_dir):
    settings = Settings(
        model_dir=tiny_dir, posterior_dir=posterior_dir, default_samples=2, adaptive=False
    )
    app = create_app(settings, load_in_background=False)
    with TestClient(app) as client:
        predictor = app.state.quaver.engine.predictor
        calls = []
        encode = predictor.loaded.tokenizer.encode
        predictor.loaded.tokenizer.encode = lambda *a, **k: calls.append(a) or encode(*a, **k)
        try:
            before = passes(client)
            r = post(client, question="x" * 1_000_000)
            assert r.status_code == 422 and r.json()["error"]["limit"] == "question_chars"
            r = post(client, choices=["one", "y" * 200_000])
            assert r.status_code == 422 and r.json()["error"]["limit"] == "choice_chars"
            r = post(client, choices=json.dumps(["one", "y" * 200_000]))
            assert r.status_code == 422 and r.json()["error"]["limit"] == "choice_chars"
            assert calls == [] and passes(client) == before  # not even tokenised
        finally:
            predictor.loaded.tokenizer.encode = encode
        assert post(client).status_code == 200


def test_default_prompt_bound_comes_from_the_model(tiny_dir, posterior_dir):
    app = create_app(
        Settings(model_dir=tiny_dir, posterior_dir=posterior_dir), load_in_background=False
    )
    with TestClient(app):
        state = app.state.quaver
        cfg = state.engine.predictor.loaded.model.config
        # tiny model: 6 s window -> 150 audio tokens; 1024 positions
        assert state.limits.max_prompt_tokens == min(1024, 150 + 2 + 512)
        assert state.engine.max_batch_tokens == 64 * state.limits.max_prompt_tokens  # 64 rows
        assert cfg.text_config.max_position_embeddings == 1024
    with pytest.raises(ValueError, match="context window"):
        from app.limits import RequestLimits

        RequestLimits.for_model(Settings(max_prompt_tokens=5000), 1024, 150)


# -- the engine: budget, deadlines, abandonment --------------------------------------------------
@pytest.fixture(scope="module")
def predictor(tiny_dir, posterior_dir):
    return Predictor.from_dirs(tiny_dir, posterior_dir)


def prepared(predictor, seconds=1.5):
    return predictor.prepare(tone(seconds).astype("float32"), QUESTION, CHOICES)


def test_a_pass_checks_should_stop_at_every_layer_boundary(predictor):
    req = PredictRequest(prepared(predictor), samples=3, seed=1)
    calls = []
    out = predictor.predict([req], should_stop=lambda: calls.append(1) or False)
    # once before the audio tower, once per decoder layer (prefix and suffix together)
    assert len(calls) == 1 + predictor.loaded.num_layers
    [ref] = predictor.predict([req])
    assert (out[0].probs == ref.probs).all()  # the checks change nothing
    with pytest.raises(Abandoned):
        predictor.predict([req], should_stop=lambda: len(calls) > 3 or bool(calls.append(1)))


class SlowPredictor:
    """Wraps a Predictor: every pass takes `layers` x `layer_s`, asking should_stop per layer."""

    def __init__(self, inner: Predictor, layers: int = 400, layer_s: float = 0.05):
        self.inner, self.layers, self.layer_s = inner, layers, layer_s
        self.started = threading.Event()
        self.slow = True

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def predict(self, requests, prefix=None, should_stop=None):
        self.started.set()
        for _ in range(self.layers if self.slow else 0):
            if should_stop is not None and should_stop():
                raise Abandoned
            time.sleep(self.layer_s)
        return self.inner.predict(requests, prefix, should_stop)


async def _submit(engine, job, timeout_s):
    return await engine.submit(job, timeout_s)


def test_a_batch_of_timed_out_jobs_does_not_keep_the_worker(predictor):
    import asyncio

    slow = SlowPredictor(predictor)  # a pass would take 20 s
    metrics = Metrics()
    engine = Engine(slow, metrics, max_wait_ms=0)
    engine.start()
    try:
        job = Job(PredictRequest(prepared(predictor), samples=2), threshold=0.5)
        with pytest.raises(InferenceTimeout):
            asyncio.run(_submit(engine, job, 0.3))
        slow.slow = False
        good = Job(PredictRequest(prepared(predictor), samples=2), threshold=0.5)
        out = asyncio.run(_submit(engine, good, 60))  # answered: the worker was freed
        assert out.samples_used == 2
        assert metrics.jobs_abandoned._value.get() == 1
    finally:
        engine.stop()


def test_the_engine_refuses_a_job_over_the_batch_budget_and_splits_batches(predictor):
    metrics = Metrics()
    p = prepared(predictor)
    t = len(p.prompt.ids)
    engine = Engine(predictor, metrics, max_batch_tokens=4 * t, max_wait_ms=200)
    big = Job(PredictRequest(p, samples=5), threshold=0.5)
    assert engine._refusal(big) is not None and isinstance(engine._refusal(big), LimitExceeded)
    small = [Job(PredictRequest(p, samples=2), threshold=0.5) for _ in range(3)]
    for j in small[1:]:
        engine._queue.put_nowait(j)
    batch = engine._gather(small[0])
    assert batch == small[:2]  # 2 x 2 rows x t tokens fill the budget; the third waits
    assert engine._carry is small[2]
    assert engine._gather(engine._next(0)) == [small[2]]


def test_a_job_past_its_deadline_is_never_started(predictor):
    import asyncio

    slow = SlowPredictor(predictor, layers=40, layer_s=0.05)  # 2 s per pass
    engine = Engine(slow, Metrics(), max_wait_ms=0)
    engine.start()
    try:
        first = Job(PredictRequest(prepared(predictor), samples=2), threshold=0.5)
        queued = Job(PredictRequest(prepared(predictor), samples=2), threshold=0.5)

        async def both():
            a = asyncio.create_task(engine.submit(first, 60))
            await asyncio.to_thread(slow.started.wait, 10)
            b = asyncio.create_task(engine.submit(queued, 0.2))
            return await asyncio.gather(a, b, return_exceptions=True)

        ok, late = asyncio.run(both())
        assert ok.samples_used == 2 and isinstance(late, InferenceTimeout)
        assert queued.future.cancelled()  # dropped from the queue, never run
    finally:
        engine.stop()


# -- health: the watchdog ------------------------------------------------------------------------
def test_a_stuck_worker_turns_healthz_to_503_and_back(tiny_dir, posterior_dir):
    release = threading.Event()

    class Blocking(SlowPredictor):
        def predict(self, requests, prefix=None, should_stop=None):
            if self.slow:
                self.started.set()
                release.wait(60)  # stuck inside a pass: no layer boundary, no heartbeat
            return self.inner.predict(requests, prefix, should_stop)

    holder = {}

    def loader(settings):
        holder["p"] = Blocking(load_predictor(settings))
        holder["p"].slow = False  # the warm-up pass runs normally
        return holder["p"]

    settings = Settings(
        model_dir=tiny_dir,
        posterior_dir=posterior_dir,
        watchdog_s=0.5,
        request_timeout_s=30,
        default_samples=2,
        adaptive=False,
    )
    app = create_app(settings, loader, load_in_background=False)
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        holder["p"].slow = True
        t = threading.Thread(target=post, args=(client,), daemon=True)
        t.start()
        assert holder["p"].started.wait(10)
        seen = None
        for _ in range(200):  # up to 20 s; the watchdog period is 0.5 s
            r = client.get("/healthz")
            if r.status_code == 503:
                seen = r
                break
            time.sleep(0.1)
        assert seen is not None, "/healthz never reported the stuck worker"
        assert seen.json()["status"] == "stuck" and "no progress" in seen.json()["error"]
        assert client.get("/readyz").status_code == 503
        assert metric(client, "quaver_ready") == 0.0
        assert metric(client, "quaver_worker_heartbeat_age_seconds") > 0.5
        holder["p"].slow = False
        release.set()
        t.join(30)
        for _ in range(100):
            if client.get("/healthz").status_code == 200:
                break
            time.sleep(0.1)
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200 and metric(client, "quaver_ready") == 1.0


# -- a real HTTP server: oversized bodies, SIGTERM ------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVER = textwrap.dedent(
    """
    import sys, time
    from app import server
    from app.forward import Abandoned

    class Slow:  # every pass takes 60 s unless should_stop ends it (a layer boundary per 50 ms)
        def __init__(self, inner):
            self.inner, self.warm = inner, True
        def __getattr__(self, name):
            return getattr(self.inner, name)
        def predict(self, requests, prefix=None, should_stop=None):
            for _ in range(0 if self.warm else 1200):
                if should_stop is not None and should_stop():
                    raise Abandoned
                time.sleep(0.05)
            self.warm = False
            return self.inner.predict(requests, prefix, should_stop)

    slow = sys.argv[1] == "slow"
    server.serve(loader=(lambda s: Slow(server.load_predictor(s))) if slow else None)
    """
)


def _start_server(tmp_path, tiny_dir, posterior_dir, mode: str, **env):
    port = _free_port()
    script = tmp_path / "serve.py"
    script.write_text(SERVER)
    environ = dict(
        os.environ,
        QUAVER_MODEL_DIR=str(tiny_dir),
        QUAVER_POSTERIOR_DIR=str(posterior_dir),
        QUAVER_HOST="127.0.0.1",
        QUAVER_PORT=str(port),
        QUAVER_ADAPTIVE="false",
        QUAVER_DEFAULT_SAMPLES="2",
        PYTHONPATH=str(ROOT),
        **env,
    )
    proc = subprocess.Popen(
        [sys.executable, str(script), mode],
        env=environ,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/readyz", timeout=1, trust_env=False).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stdout.read()}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("server not ready in 60 s")


def _send_whole_then_read(
    url: str, body: bytes, chunked: bool, declared: int | None = None
) -> tuple[int, dict]:
    """A naive client: send the whole request, then read the reply (raw socket, no retries)."""
    host, port = url.removeprefix("http://").split(":")
    head = (
        "POST /answer HTTP/1.1\r\nHost: x\r\n"
        "Content-Type: multipart/form-data; boundary=zz\r\n"
        + (
            "Transfer-Encoding: chunked\r\n"
            if chunked
            else f"Content-Length: {declared or len(body)}\r\n"
        )
        + "\r\n"
    ).encode()
    if chunked:
        step = 1 << 16
        parts = [
            b"%x\r\n%s\r\n" % (len(c), c)
            for c in (body[i : i + step] for i in range(0, len(body), step))
        ]
        body = b"".join(parts) + b"0\r\n\r\n"
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + body)  # a reset here or below = the 413 was lost
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    status = int(reply.split(b" ", 2)[1])
    return status, json.loads(reply.split(b"\r\n\r\n", 1)[1])


def test_oversized_or_stalled_body_gets_a_readable_413_or_408(tmp_path, tiny_dir, posterior_dir):
    proc, url = _start_server(
        tmp_path,
        tiny_dir,
        posterior_dir,
        "fast",
        QUAVER_MAX_UPLOAD_BYTES="100000",
        QUAVER_BODY_TIMEOUT_S="1",
    )
    try:
        head = (
            b'--zz\r\nContent-Disposition: form-data; name="audio"; filename="a.wav"\r\n'
            b"Content-Type: audio/wav\r\n\r\n"
        )
        body = head + b"\x00" * (20 * 1024 * 1024)  # 200x the limit
        for chunked in (False, True):  # declared Content-Length, and none (cut while streaming)
            status, err = _send_whole_then_read(url, body, chunked)
            assert status == 413 and err["error"]["type"] == "payload_too_large", err
        # a Content-Length larger than what is sent: the body stalls, 408 after 1 s of silence
        status, err = _send_whole_then_read(url, head + b"abc", False, declared=len(head) + 5000)
        assert status == 408 and err["error"]["type"] == "body_timeout", err
        ok = httpx.post(
            url + "/answer",
            files={"audio": ("a.wav", wav_bytes(tone(1.0)), "audio/wav")},
            data={"question": QUESTION, "choices": CHOICES},
            timeout=30,
            trust_env=False,
        )
        assert ok.status_code == 200, ok.text
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.slow
def test_sigterm_drains_and_exits_within_the_grace_period(tmp_path, tiny_dir, posterior_dir):
    grace = 2.0
    proc, url = _start_server(
        tmp_path, tiny_dir, posterior_dir, "slow", QUAVER_SHUTDOWN_GRACE_S=str(grace)
    )
    result = {}

    def in_flight():
        try:
            result["r"] = httpx.post(
                url + "/answer",
                files={"audio": ("a.wav", wav_bytes(tone(1.0)), "audio/wav")},
                data={"question": QUESTION, "choices": CHOICES},
                timeout=90,
                trust_env=False,
            )
        except httpx.HTTPError as exc:
            result["err"] = exc

    t = threading.Thread(target=in_flight, daemon=True)
    t.start()
    time.sleep(1.0)  # the request is now inside a 60 s pass
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=grace + 20)  # the pass alone would take a minute
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("SIGTERM did not stop the server") from None
    waited = time.monotonic() - t0
    t.join(10)
    log = proc.stdout.read()
    assert rc == 0, log
    assert "r" in result, f"in-flight request got no response: {result.get('err')}"
    assert result["r"].status_code == 503, result["r"].text
    assert result["r"].json()["error"]["type"] == "shutting_down"
    print(f"SIGTERM to exit: {waited:.2f} s (grace {grace:g} s)")
    # in-flight work is failed inside the grace period; what follows is the process's own exit
    assert waited < grace + 5, log


def test_the_k_sample_redo_stays_inside_the_batch_budgets(predictor):
    """Adaptive jobs run their first pass at 1 row each; the redo at K rows each is split so
    that no pass holds more rows or row-tokens than the engine's budgets."""
    metrics = Metrics()
    p = prepared(predictor)
    engine = Engine(predictor, metrics, max_batch_rows=8, adaptive_margin=1.0)
    jobs = [
        Job(PredictRequest(p, samples=8, seed=s), threshold=0.5, adaptive=True) for s in range(3)
    ]
    out = engine.run_now(jobs)
    # one first pass of 3 rows, then three redo passes of 8 rows (8 + 8 > 8)
    assert metrics.batch_size._sum.get() == 3 + 3 * 8
    assert sum(b.get() for b in metrics.batch_size._buckets) == 4
    for job, o in zip(jobs, out, strict=True):
        [direct] = predictor.predict([job.request])
        assert o.samples_used == 8
        np.testing.assert_allclose(o.prediction.probs, direct.probs, atol=1e-6)
    t = len(p.prompt.ids)
    tight = Engine(predictor, Metrics(), max_batch_tokens=16 * t, adaptive_margin=1.0)
    assert tight._within_budget(jobs, [0, 1, 2]) == [[0, 1], [2]]


def test_the_k_sample_redo_reuses_the_first_pass_prefix(predictor):
    """The audio tower and the layers below the LoRA layers run once per adaptive job: the redo
    takes its rows of the first pass's prefix (`take_prefix`), and answers as a fresh pass."""

    class Counting:
        def __init__(self, inner):
            self.inner, self.prefixes, self.given = inner, 0, []

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def prefix(self, prepared, should_stop=None):
            self.prefixes += 1
            return self.inner.prefix(prepared, should_stop)

        def predict(self, requests, prefix=None, should_stop=None):
            self.given.append(None if prefix is None else int(prefix[0].shape[0]))
            return self.inner.predict(requests, prefix, should_stop)

    short = prepared(predictor)
    long = predictor.prepare(
        tone(1.5).astype("float32"), "Of all the options below, which one is correct?", ["x", "y"]
    )
    assert len(long.prompt.ids) > len(short.prompt.ids)  # rows of unequal length: padding
    counting = Counting(predictor)
    engine = Engine(counting, Metrics(), max_batch_rows=8, adaptive_margin=1.0)
    jobs = [
        Job(PredictRequest(pp, samples=4, seed=s), threshold=0.5, adaptive=True)
        for s, pp in enumerate([short, long, short])  # the last redo: trimmed
    ]
    out = engine.run_now(jobs)
    assert counting.prefixes == 1  # the first pass only
    assert counting.given == [3, 2, 1]  # first pass: 3 rows; redo of 4 + 4 rows, then 4
    for job, o in zip(jobs, out, strict=True):
        [direct] = predictor.predict([job.request])
        assert o.samples_used == 4
        np.testing.assert_allclose(o.prediction.probs, direct.probs, atol=1e-5)
