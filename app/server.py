"""Quaver's web service: a thin FastAPI layer over the engine.

    quaver serve                         # or: uvicorn --factory app.server:create_app

Routes: POST /answer (multipart: audio, question, choices..., samples, max_risk, seed, adaptive),
GET /healthz, GET /readyz, GET /metrics, GET / (a page to try it), OpenAPI at /docs.
The model loads in a background thread at start-up, so /healthz answers at once and /readyz turns
200 after one warm-up pass. Errors are `QuaverError`s mapped to status codes in one handler.

Every request is bounded before it reaches the engine (`app.limits`: text, tokens, prompt; audio
duration; K; body size). `/healthz` fails once the engine worker has made no progress for
QUAVER_WATCHDOG_S; `/readyz` is false while loading, draining, stuck or with a full queue.
SIGTERM (under `serve`) drains: new requests get 503, in-flight ones have QUAVER_SHUTDOWN_GRACE_S
to finish or fail with 503, then the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import audio as audio_mod
from app.engine import Engine, Job
from app.errors import (
    AudioTooLong,
    BodyTimeout,
    InvalidInput,
    LimitExceeded,
    NotFound,
    NotReady,
    PayloadTooLarge,
    QuaverError,
    Unauthorized,
    UnsupportedMediaType,
)
from app.examples import example_file, list_examples
from app.limits import RequestLimits
from app.metrics import Metrics
from app.predict import Predictor
from app.predict import Request as PredictRequest
from app.prompt import MIN_CHOICES, PromptError
from app.settings import Settings
from app.thresholds import default_risk, lowest_guaranteed_risk, targets, threshold_for

STATIC = Path(__file__).resolve().parent / "static"


class Uncertainty(BaseModel):
    entropy: float = Field(description="entropy of the averaged probabilities (nats)")
    mutual_information: float = Field(description="epistemic part: H(mean p) - mean H(p_k)")
    agreement: float = Field(description="fraction of samples agreeing with the answer")
    no_answer: float | None = Field(
        default=None,
        description="the control probe's probability that the audio holds no answer (silence, "
        "noise, unrelated sound), read off the model's hidden states; null when the posterior "
        "has no probe",
    )


class ModelIds(BaseModel):
    base: str
    posterior: str


class Timing(BaseModel):
    queue: float
    inference: float
    total: float


class AnswerResponse(BaseModel):
    answer: str
    answer_index: int
    confidence: float
    abstain: bool
    threshold: float | None = Field(description="abstain iff confidence < threshold; null = always")
    max_risk: float | None = Field(description="the calibrated risk target used")
    lowest_guaranteed_risk: float | None = Field(
        description="the lowest risk target the posterior guarantees (null: none): ask for at "
        "least this to get answers"
    )
    probabilities: dict[str, float]
    uncertainty: Uncertainty
    samples: int = Field(description="posterior samples actually drawn (1 = posterior mean)")
    score: str = Field(
        description="which score `confidence` is and the abstention compares with `threshold`: "
        "maxprob (max averaged probability), risk_averse (mean - lambda x std of the chosen "
        "option over samples), mutual_information (minus the samples' mutual information) or "
        "answerable (maxprob x (1 - uncertainty.no_answer) ^ the decision's power)"
    )
    model: ModelIds
    timing_ms: Timing


def load_predictor(settings: Settings) -> Predictor:
    """Default loader: base checkpoint + posterior from the settings' directories."""
    import torch

    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if settings.threads:
        torch.set_num_threads(settings.threads)
    return Predictor.from_dirs(
        settings.model_dir,
        settings.posterior_dir,
        device=device,
        dtype=getattr(torch, settings.dtype),
        use_decision=True,  # the posterior's chosen score and temperature, when it stores one
    )


class ServiceState:
    """What the routes share: settings, metrics, and the engine once it is loaded."""

    def __init__(self, settings: Settings, loader: Callable[[Settings], Predictor]) -> None:
        self.settings = settings
        self.loader = loader
        self.metrics = Metrics()
        self.engine: Engine | None = None
        self.limits: RequestLimits | None = None
        self.load_error: str | None = None
        self.ready = threading.Event()
        self.metrics.ready.set_function(lambda: float(self.readiness() is None))

    def load(self) -> None:
        try:
            predictor = self.loader(self.settings)
            s = self.settings
            cfg, fam = predictor.loaded.model.config, predictor.loaded.family
            limits = RequestLimits.for_model(
                s, fam.context_window(cfg), fam.audio_tokens_for_frames(fam.window_frames(cfg))
            )
            engine = Engine(
                predictor,
                self.metrics,
                max_batch_rows=s.max_batch_rows,
                max_batch_tokens=s.max_batch_tokens
                or max(s.max_batch_rows, s.max_samples) * limits.max_prompt_tokens,
                max_wait_ms=s.max_wait_ms,
                queue_size=s.queue_size,
                adaptive_margin=s.adaptive_margin,
            )
            self._warm_up(engine)
            engine.start()
            self.metrics.worker_heartbeat_age.set_function(engine.heartbeat_age)
            self.limits, self.engine = limits, engine
            base = Path(str(predictor.loaded.path)).name
            post = predictor.posterior.name if predictor.posterior else "none"
            self.metrics.model_info.labels(base=base, posterior=post).set(1)
            self.ready.set()
        except Exception as exc:  # reported by /readyz; the process stays up for diagnosis
            self.load_error = f"{type(exc).__name__}: {exc}"
            print(f"[quaver] model failed to load: {self.load_error}", flush=True)

    def _warm_up(self, engine: Engine) -> None:
        p = engine.predictor
        wave = np.zeros(16000, dtype=np.float32)
        prepared = p.prepare(wave, "warm-up", ["yes", "no"])
        engine.run_now([Job(PredictRequest(prepared, samples=2, seed=0), threshold=0.0)])

    def stuck(self) -> str | None:
        """Why the engine worker counts as stuck (no progress past the watchdog), or None."""
        if self.engine is None:
            return None
        age = self.engine.heartbeat_age()
        if age > self.settings.watchdog_s:
            what = "has stopped" if math.isinf(age) else f"made no progress for {age:.1f} s"
            return f"the engine worker {what} (watchdog {self.settings.watchdog_s:g} s)"
        return None

    def readiness(self) -> str | None:
        """Why the service should not be sent requests now, or None when it is ready."""
        if self.engine is None:
            return self.load_error or "the model is still loading"
        if self.engine.draining:
            return "the server is shutting down"
        if self.engine.saturated:
            return "the inference queue is full"
        return self.stuck()

    def begin_shutdown(self) -> None:
        """SIGTERM: refuse new work; what is in flight gets the grace period less a margin in
        which its 503 still reaches the client before the HTTP server closes connections."""
        if self.engine is not None:
            grace = self.settings.shutdown_grace_s
            self.engine.drain(max(grace - 2.0, grace / 2))


def get_state(request: Request) -> ServiceState:
    return request.app.state.quaver


def require_engine(state: Annotated[ServiceState, Depends(get_state)]) -> Engine:
    if state.engine is None:
        raise NotReady(
            state.load_error or "the model is still loading", headers={"Retry-After": "5"}
        )
    return state.engine


def check_api_key(request: Request, state: Annotated[ServiceState, Depends(get_state)]) -> None:
    key = state.settings.api_key
    if key and request.headers.get("authorization", "") != f"Bearer {key}":
        raise Unauthorized("missing or wrong bearer token")


class BodyLimit:
    """ASGI middleware: 413 as soon as a request body exceeds the limit, while it streams in.

    A client that is still sending when the server answers and closes would see a connection
    reset instead of the 413 (the kernel resets a socket closed with unread data). So before the
    413 is sent, the rest of the body is read and discarded, up to `drain` bytes; a body larger
    still gets the 413 written and the connection closed, and such a client may see the reset.

    A body that stops arriving (a Content-Length larger than what is sent, a stalled upload) gets
    a 408 once no byte came for `idle_s`, so a slow client cannot hold a request open forever.
    """

    def __init__(
        self, app, limit: int, metrics: Metrics, drain: int = 0, idle_s: float = 30.0
    ) -> None:
        self.app, self.limit, self.metrics, self.drain = app, limit, metrics, drain
        self.idle_s = idle_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_big = PayloadTooLarge(f"upload larger than {self.limit} bytes")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._discard(receive, 0)
            return await self._reject(scope, send, too_big)
        seen, overflow, ended, stalled = 0, False, False, False

        async def limited_receive():
            nonlocal seen, overflow, ended, stalled
            try:
                message = await self._receive(receive)
            except _BodyStalled:
                stalled = True
                raise
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                ended = not message.get("more_body", False)
                if seen > self.limit:
                    overflow = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message):
            if not (overflow or stalled):  # the app's reply to a cut-off body is replaced below
                await send(message)

        with contextlib.suppress(_BodyTooLarge, _BodyStalled):
            await self.app(scope, limited_receive, guarded_send)
        if stalled:
            err = BodyTimeout(f"no part of the request body arrived for {self.idle_s:g} s")
            await self._reject(scope, send, err)
        elif overflow:
            if not ended:
                await self._discard(receive, seen)
            await self._reject(scope, send, too_big)

    async def _discard(self, receive, seen: int) -> None:
        """Read the body to its end (or `drain` bytes in all) and throw it away."""
        while seen <= self.drain:
            try:
                message = await self._receive(receive)
            except _BodyStalled:
                return
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    async def _receive(self, receive):
        try:
            return await asyncio.wait_for(receive(), self.idle_s)
        except TimeoutError:
            raise _BodyStalled from None

    async def _reject(self, scope, send, err: QuaverError):
        self.metrics.errors.labels(type=err.type).inc()
        path = scope.get("path", "")
        route = path if path in ("/answer", "/healthz", "/readyz", "/metrics", "/") else "unmatched"
        self.metrics.requests.labels(route=route, status=str(err.status)).inc()
        resp = JSONResponse(err.body(), status_code=err.status, headers={"Connection": "close"})
        await resp(scope, _empty_receive, send)


class _BodyTooLarge(Exception):
    pass


class _BodyStalled(Exception):
    pass


async def _empty_receive():
    return {"type": "http.disconnect"}


def _parse_choices(raw: list[str], limits: RequestLimits) -> list[str]:
    if len(raw) == 1 and raw[0].strip().startswith("["):
        if len(raw[0]) > limits.max_choices * (limits.max_choice_chars + 8) + 2:
            raise LimitExceeded(
                "choice_chars",
                len(raw[0]),
                limits.max_choices * limits.max_choice_chars,
                f"the JSON list of choices has {len(raw[0])} characters; the limit is "
                f"{limits.max_choices} choices of {limits.max_choice_chars} characters "
                "(QUAVER_MAX_CHOICES, QUAVER_MAX_CHOICE_CHARS)",
            )
        try:
            parsed = json.loads(raw[0])
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"choices is not a valid JSON list: {exc}") from exc
        if not isinstance(parsed, list) or not all(isinstance(c, str) for c in parsed):
            raise InvalidInput("choices must be a list of strings")
        raw = parsed
    limits.check_choices(raw)  # count and characters before any other work on them
    choices = [c.strip() for c in raw]
    if len(choices) < MIN_CHOICES:
        raise InvalidInput(f"give at least {MIN_CHOICES} choices, got {len(choices)}")
    if any(not c for c in choices):
        raise InvalidInput("choices must not be empty")
    if len({c.lower() for c in choices}) != len(choices):
        raise InvalidInput("choices must be distinct")
    return choices


def create_app(
    settings: Settings | None = None,
    loader: Callable[[Settings], Predictor] = load_predictor,
    load_in_background: bool = True,
) -> FastAPI:
    """The app factory. `loader` builds the Predictor (tests inject a tiny one)."""
    settings = settings or Settings()
    state = ServiceState(settings, loader)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        thread = threading.Thread(target=state.load, name="quaver-load", daemon=True)
        thread.start()
        if not load_in_background:
            thread.join()
        yield
        if state.engine is not None:
            state.engine.stop(timeout_s=2.0)  # a daemon thread: a stuck one cannot hold the exit

    app = FastAPI(
        title="Quaver",
        version="0.1.0",
        lifespan=lifespan,
        description="Audio question answering that knows when it does not know.",
    )
    app.state.quaver = state
    app.add_middleware(
        BodyLimit,
        limit=settings.max_upload_bytes,
        metrics=state.metrics,
        drain=settings.max_drain_bytes,
        idle_s=settings.body_timeout_s,
    )

    @app.exception_handler(QuaverError)
    async def quaver_error(request: Request, exc: QuaverError):
        state.metrics.errors.labels(type=exc.type).inc()
        if isinstance(exc, LimitExceeded):
            state.metrics.rejected.labels(limit=exc.limit).inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        parts = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query"))
            parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        return await quaver_error(request, InvalidInput("; ".join(parts) or "invalid request"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        err = QuaverError(str(exc.detail))
        err.status, err.type = (
            exc.status_code,
            "not_found" if exc.status_code == 404 else "http_error",
        )
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        t = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:
            route = getattr(request.scope.get("route"), "path", "unmatched")  # bounded labels
            state.metrics.errors.labels(type="internal_error").inc()
            state.metrics.requests.labels(route=route, status="500").inc()
            return JSONResponse(QuaverError("internal error").body(), status_code=500)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        state.metrics.requests.labels(route=path, status=str(response.status_code)).inc()
        state.metrics.request_duration.labels(route=path).observe(time.perf_counter() - t)
        return response

    @app.get("/healthz")
    async def healthz():
        stuck = state.stuck()
        if stuck is not None:
            return JSONResponse({"status": "stuck", "error": stuck}, status_code=503)
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        why = state.readiness()
        if why is None:
            return {"status": "ready"}
        if state.engine is None:
            status = "failed" if state.load_error else "loading"
        else:
            status = "draining" if state.engine.draining else "unavailable"
        return JSONResponse({"status": status, "error": why}, status_code=503)

    @app.get("/model")
    async def model(engine: Annotated[Engine, Depends(require_engine)]):
        """What is served and which risk targets its calibration guarantees (the page reads it)."""
        p = engine.predictor
        calibration = p.calibration
        s = state.settings
        return {
            "base": Path(str(p.loaded.path)).name,
            "posterior": p.posterior.name if p.posterior else "none",
            "score": p.score,
            "default_max_risk": default_risk(
                calibration, s.default_max_risk, s.default_min_coverage
            ),
            "lowest_guaranteed_risk": lowest_guaranteed_risk(calibration),
            "targets": targets(calibration),
            "default_samples": s.default_samples,
            "max_samples": s.max_samples,
            "max_seconds": p.max_seconds,
        }

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/examples")
    async def examples():
        """Example clips to try (question, choices, correct answer, provenance)."""
        return {"examples": list_examples(state.settings.examples_dir)}

    @app.get("/examples/{name}", include_in_schema=False)
    async def example_clip(name: str):
        path = example_file(state.settings.examples_dir, name)
        if path is None:
            raise NotFound(f"no example clip {name!r}; GET /examples lists them")
        return FileResponse(path, media_type="audio/wav")

    @app.post("/answer", response_model=AnswerResponse, dependencies=[Depends(check_api_key)])
    async def answer(
        request: Request,
        engine: Annotated[Engine, Depends(require_engine)],
        audio: Annotated[UploadFile, File(description="audio file (WAV, FLAC, OGG, ...)")],
        question: Annotated[str, Form(description="the question about the audio")],
        choices: Annotated[list[str], Form(description="2-10 answer options")],
        samples: Annotated[int | None, Form(description="posterior samples K")] = None,
        max_risk: Annotated[float | None, Form(description="target selective risk")] = None,
        seed: Annotated[int, Form(description="seed of the weight samples")] = 0,
        adaptive: Annotated[bool | None, Form(description="sample only near the threshold")] = None,
    ) -> AnswerResponse:
        t0 = time.perf_counter()
        s = state.settings
        form = await request.form()  # parsed already for the parameters above: no second read
        for name in ("audio", "question", "samples", "max_risk", "seed", "adaptive"):
            if len(form.getlist(name)) > 1:
                raise InvalidInput(f"give {name} once, got {len(form.getlist(name))}")
        k = s.default_samples if samples is None else samples
        if not 1 <= k <= s.max_samples:
            raise InvalidInput(f"samples must be between 1 and {s.max_samples}, got {k}")
        calibration = engine.predictor.calibration  # the table on the served score
        risk = (
            default_risk(calibration, s.default_max_risk, s.default_min_coverage)
            if max_risk is None
            else max_risk
        )
        if not (0 < risk < 1) or not math.isfinite(risk):
            raise InvalidInput(f"max_risk must be in (0, 1), got {risk}")
        limits = state.limits
        limits.check_question(question)
        if not question.strip():
            raise InvalidInput("question must not be empty")
        opts = _parse_choices(choices, limits)
        if not 0 <= seed < 2**63:
            raise InvalidInput("seed must be a non-negative 64-bit integer")
        data = await audio.read()
        if len(data) > s.max_upload_bytes:
            raise PayloadTooLarge(f"upload larger than {s.max_upload_bytes} bytes")
        ctype = (audio.content_type or "").lower()
        if ctype and not (
            ctype.startswith("audio/")
            or ctype in ("application/octet-stream", "application/ogg", "video/ogg")
        ):
            raise UnsupportedMediaType(f"audio must be an audio file, got content type {ctype}")
        # decoding + features are CPU work: off the event loop, like inference
        prepared = await run_in_threadpool(_prepare, engine.predictor, limits, data, question, opts)
        state.metrics.audio_duration.observe(prepared.audio.duration_s)
        thr = threshold_for(calibration, risk)
        use_adaptive = s.adaptive if adaptive is None else adaptive
        job = Job(
            PredictRequest(prepared, samples=k, seed=seed),
            threshold=thr.value,
            adaptive=use_adaptive and k > 1,
        )
        out = await engine.submit(job, s.request_timeout_s)
        pred = out.prediction
        abstain = pred.confidence < thr.value
        label = "none" if thr.max_risk is None else f"{thr.max_risk:g}"
        state.metrics.answers.labels(
            outcome="abstained" if abstain else "answered", max_risk=label
        ).inc()
        state.metrics.confidence.observe(pred.confidence)
        state.metrics.mutual_information.observe(pred.mutual_information)
        if pred.p_control is not None:
            state.metrics.no_answer.observe(pred.p_control)
        p = engine.predictor
        return AnswerResponse(
            answer=opts[pred.answer_index],
            answer_index=pred.answer_index,
            confidence=pred.confidence,
            abstain=bool(abstain),
            threshold=thr.value if math.isfinite(thr.value) else None,
            max_risk=thr.max_risk,
            lowest_guaranteed_risk=lowest_guaranteed_risk(calibration),
            probabilities={c: float(v) for c, v in zip(opts, pred.probs, strict=True)},
            uncertainty=Uncertainty(
                entropy=pred.entropy,
                mutual_information=pred.mutual_information,
                agreement=pred.agreement,
                no_answer=pred.p_control,
            ),
            samples=out.samples_used,
            score=pred.score,
            model=ModelIds(
                base=Path(str(p.loaded.path)).name,
                posterior=p.posterior.name if p.posterior else "none",
            ),
            timing_ms=Timing(
                queue=out.queue_ms,
                inference=out.inference_ms,
                total=(time.perf_counter() - t0) * 1000,
            ),
        )

    return app


def _prepare(
    predictor: Predictor, limits: RequestLimits, data: bytes, question: str, choices: list[str]
):
    # text first: its bounds are cheaper to check than decoding the audio
    limits.check_tokens(predictor.loaded.tokenizer, question, choices)
    try:
        samples, rate = audio_mod.decode(data, predictor.max_seconds)
        wave = audio_mod.to_mono_16k(samples, rate)
        prepared = predictor.prepare(wave, question, choices)
    except audio_mod.AudioError as exc:
        if exc.kind == "unsupported":
            raise UnsupportedMediaType(str(exc)) from exc
        if exc.kind == "too_long":
            raise AudioTooLong(str(exc)) from exc
        raise InvalidInput(str(exc)) from exc
    except PromptError as exc:
        raise InvalidInput(str(exc)) from exc
    limits.check_prompt(len(prepared.prompt.ids))
    return prepared


def serve(
    host: str | None = None,
    port: int | None = None,
    loader: Callable[[Settings], Predictor] | None = None,
) -> None:
    """Run the service with uvicorn (settings from the environment, overrides from the CLI).

    SIGTERM or SIGINT: the listening socket closes, /readyz turns 503, the engine drains (new
    requests 503, in-flight ones finish or fail within QUAVER_SHUTDOWN_GRACE_S) and the process
    exits 0."""
    import uvicorn

    settings = Settings()
    if host:
        settings.host = host
    if port:
        settings.port = port
    print(
        f"[quaver] serving on http://{settings.host}:{settings.port} "
        f"(model {settings.model_dir}, posterior {settings.posterior_dir})",
        flush=True,
    )
    app = create_app(settings, loader or load_predictor)
    state: ServiceState = app.state.quaver

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            state.begin_shutdown()
            super().handle_exit(sig, frame)
            # uvicorn re-raises a captured signal once it has shut down (exit status 143); a
            # drained shutdown on SIGTERM is a clean exit, so it exits 0 instead.
            captured = getattr(self, "_captured_signals", [])
            if sig == signal.SIGTERM and sig in captured:
                captured.remove(sig)

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_graceful_shutdown=max(1, math.ceil(settings.shutdown_grace_s)),
    )
    Server(config).run()
