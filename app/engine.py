"""The inference engine: a bounded queue and one worker thread that micro-batches requests.

The web layer calls `await engine.submit(job, timeout_s)`; the worker gathers queued jobs into a
micro-batch (up to `max_batch_rows` decoder rows = sum of K, and at most `max_batch_tokens`
rows x padded prompt tokens, waiting at most `max_wait_ms` for more), runs one `Predictor.predict`
call for the whole batch, and resolves each job's future. Adaptive jobs are first decided at the
posterior mean (K=1); only those whose confidence lands within `margin` of their threshold are
re-run with K samples. A served score that needs samples (`app.scores.SAMPLE_SCORES`: the
risk-averse score, mutual information) means nothing at K=1, so then every adaptive job is re-run.

What keeps one request from holding the service (docs/deploy.md, "Bounded work"):
- backpressure: a full queue raises `Overloaded` at once (HTTP 503 + Retry-After);
- a budget: a job whose rows x tokens alone exceed `max_batch_tokens` is refused, never run;
- deadlines: every job carries its caller's deadline; a job past it is never started, and a
  running batch whose every job is past it is abandoned at the next layer boundary;
- a heartbeat: the worker beats while idle and at every layer boundary, so `heartbeat_age()` says
  whether it is making progress (`/healthz` fails past the watchdog period);
- draining: `drain(grace_s)` refuses new jobs and fails what has not finished when the grace
  period ends, so SIGTERM never waits on a long pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

from app.errors import InferenceTimeout, LimitExceeded, Overloaded, QuaverError, ShuttingDown
from app.forward import Abandoned, Prefix, take_prefix
from app.metrics import Metrics
from app.predict import Prediction, Predictor, Request

IDLE_BEAT_S = 0.5  # the idle worker wakes this often to beat (and to see a stop)


@dataclass
class Job:
    request: Request
    threshold: float  # abstain iff confidence < threshold (inf = always abstain)
    adaptive: bool = False
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)
    deadline: float = math.inf  # perf_counter time after which nobody waits for the answer

    @property
    def tokens(self) -> int:
        return len(self.request.prepared.prompt.ids)


@dataclass
class Outcome:
    prediction: Prediction
    samples_used: int
    queue_ms: float
    inference_ms: float


class Engine:
    """Owns the Predictor; the only code that runs the model."""

    def __init__(
        self,
        predictor: Predictor,
        metrics: Metrics,
        *,
        max_batch_rows: int = 64,
        max_batch_tokens: int | None = None,
        max_wait_ms: float = 5.0,
        queue_size: int = 64,
        adaptive_margin: float = 0.15,
    ):
        self.predictor = predictor
        self.metrics = metrics
        self.max_batch_rows = max_batch_rows
        self.max_batch_tokens = max_batch_tokens or math.inf
        self.max_wait_s = max_wait_ms / 1000
        self.margin = adaptive_margin
        self.queue_size = queue_size
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self._carry: Job | None = None  # gathered but over the batch budget: first in the next
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._drain_deadline = math.inf  # perf_counter time at which draining fails the rest
        self._beat = time.monotonic()

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._beat = time.monotonic()
            self._thread = threading.Thread(target=self._run, name="quaver-engine", daemon=True)
            self._thread.start()

    def drain(self, grace_s: float) -> None:
        """Refuse new jobs from now on; what has not finished in `grace_s` fails (503)."""
        self._drain_deadline = min(self._drain_deadline, time.perf_counter() + grace_s)

    @property
    def draining(self) -> bool:
        return self._drain_deadline < math.inf

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the worker (a pass in flight is abandoned at its next layer) and fail every job
        still queued, so that no caller waits on a worker that is gone."""
        self.drain(0.0)
        self._stop.set()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)  # wakes an idle worker at once (a full queue: busy)
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            self._thread = None
        self._fail_queued(ShuttingDown("the server is shutting down; retry on another replica"))

    # -- health ---------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def heartbeat_age(self) -> float:
        """Seconds since the worker last made progress (inf once it is dead or not started)."""
        return time.monotonic() - self._beat if self.alive else math.inf

    @property
    def saturated(self) -> bool:
        return self._queue.qsize() >= self.queue_size

    # -- the web layer's side -------------------------------------------------------------------
    async def submit(self, job: Job, timeout_s: float) -> Outcome:
        if self.draining or self._stop.is_set():
            raise ShuttingDown(
                "the server is shutting down; retry on another replica",
                headers={"Retry-After": "1"},
            )
        job.deadline = job.enqueued + timeout_s
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Overloaded(
                "the inference queue is full; retry shortly", headers={"Retry-After": "1"}
            ) from None
        self.metrics.queue_depth.set(self._queue.qsize())
        try:
            return await asyncio.wait_for(asyncio.wrap_future(job.future), timeout_s)
        except TimeoutError:
            job.future.cancel()
            raise InferenceTimeout(
                f"no answer within {timeout_s:g} s; retry later", headers={"Retry-After": "5"}
            ) from None

    def run_now(self, jobs: list[Job]) -> list[Outcome]:
        """Synchronously run jobs as one micro-batch (warm-up, CLI, tests)."""
        return self._process(jobs)

    # -- worker ---------------------------------------------------------------------------------
    def _rows(self, job: Job) -> int:
        return 1 if job.adaptive else job.request.samples

    def _cost(self, rows: int, tokens: int) -> int:
        """Decoder rows x padded tokens: what one pass over such a batch computes."""
        return rows * tokens

    def _next(self, timeout: float) -> Job | None:
        if self._carry is not None:
            job, self._carry = self._carry, None
            return job
        try:
            return self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None

    def _gather(self, first: Job) -> list[Job]:
        """`first` plus what joins it within max_wait_s, inside the row and token budgets."""
        jobs, rows, tokens = [first], self._rows(first), first.tokens
        deadline = time.perf_counter() + self.max_wait_s
        while rows < self.max_batch_rows and not self._stop.is_set():
            job = self._next(deadline - time.perf_counter())
            if job is None:  # nothing more came, or stop()'s wake-up
                break
            t = max(tokens, job.tokens)
            if self._cost(rows + self._rows(job), t) > self.max_batch_tokens:
                self._carry = job  # it starts the next batch instead
                break
            jobs.append(job)
            rows, tokens = rows + self._rows(job), t
        return jobs

    def _run(self) -> None:
        while not self._stop.is_set():
            self._beat = time.monotonic()
            first = self._next(IDLE_BEAT_S)
            if first is None:
                if self.draining and time.perf_counter() >= self._drain_deadline:
                    self._fail_queued(ShuttingDown("the server is shutting down"))
                continue
            gathered = self._gather(first)
            self.metrics.queue_depth.set(self._queue.qsize())
            jobs = []
            for job in gathered:
                # Claim each job: a job cancelled (timed out) while queued is dropped, and a
                # claimed one can no longer be cancelled, so its result below cannot race one.
                if not job.future.set_running_or_notify_cancel():
                    continue
                err = self._refusal(job)
                if err is not None:
                    job.future.set_exception(err)
                else:
                    jobs.append(job)
            if not jobs:
                continue
            try:
                outcomes = self._process(jobs)
            except Abandoned:
                self.metrics.jobs_abandoned.inc(len(jobs))
                err = (
                    ShuttingDown("the server shut down before the answer was ready")
                    if self.draining
                    else InferenceTimeout("the request's deadline passed during inference")
                )
                for job in jobs:
                    job.future.set_exception(err)
                continue
            except Exception as exc:  # a failed batch fails its jobs, never the worker
                for job in jobs:
                    job.future.set_exception(exc)
                continue
            for job, outcome in zip(jobs, outcomes, strict=True):
                job.future.set_result(outcome)

    def _refusal(self, job: Job) -> QuaverError | None:
        """Why a claimed job must not run, or None."""
        now = time.perf_counter()
        if now >= self._drain_deadline:
            return ShuttingDown("the server is shutting down")
        if now >= job.deadline:
            return InferenceTimeout("the request's deadline passed while it was queued")
        cost = self._cost(job.request.samples, job.tokens)
        if cost > self.max_batch_tokens:
            return LimitExceeded(
                "batch_tokens",
                cost,
                int(self.max_batch_tokens),
                f"the request needs {job.request.samples} samples x {job.tokens} tokens = {cost}"
                f" row-tokens; one batch may hold {self.max_batch_tokens:g} "
                "(QUAVER_MAX_BATCH_TOKENS): ask for fewer samples or a shorter prompt",
            )
        return None

    def _within_budget(self, jobs: list[Job], ids: list[int]) -> list[list[int]]:
        """`ids` (one per job, at K rows each) in consecutive groups inside both budgets."""
        groups: list[list[int]] = []
        rows = tokens = 0
        for job, i in zip(jobs, ids, strict=True):
            k, t = job.request.samples, max(tokens, job.tokens)
            if groups and (
                rows + k > self.max_batch_rows or self._cost(rows + k, t) > self.max_batch_tokens
            ):
                groups.append([])
                rows, t = 0, job.tokens
            if not groups:
                groups.append([])
            groups[-1].append(i)
            rows, tokens = rows + k, t
        return groups

    def _fail_queued(self, err: QuaverError) -> None:
        while not self._queue.empty() or self._carry is not None:
            job = self._next(0)
            if job is not None and job.future.set_running_or_notify_cancel():
                job.future.set_exception(err)
        self.metrics.queue_depth.set(0)

    def _should_stop(self, jobs: list[Job]):
        """The check a pass makes at every layer boundary; it doubles as the heartbeat."""

        def check() -> bool:
            self._beat = time.monotonic()
            now = time.perf_counter()
            return (
                self._stop.is_set()
                or now >= self._drain_deadline
                or all(now >= j.deadline for j in jobs)
            )

        return check

    def _forward(
        self,
        requests: list[Request],
        jobs: list[Job],
        prefix: Prefix | None = None,
        spent_s: float = 0.0,
    ) -> tuple[list[Prediction], float]:
        """One pass; `spent_s`: time already spent on it (computing `prefix`)."""
        t = time.perf_counter()
        preds = self.predictor.predict(requests, prefix, should_stop=self._should_stop(jobs))
        dt = time.perf_counter() - t + spent_s
        self.metrics.inference_duration.observe(dt)
        self.metrics.batch_size.observe(sum(r.samples for r in requests))
        return preds, dt

    def _process(self, jobs: list[Job]) -> list[Outcome]:
        start = time.perf_counter()
        waits = [(start - j.enqueued) * 1000 for j in jobs]
        for w in waits:
            self.metrics.queue_wait.observe(w / 1000)
        first = [replace(j.request, samples=1) if j.adaptive else j.request for j in jobs]
        prefix, t = None, time.perf_counter()
        if any(j.adaptive for j in jobs):  # kept for the redo (one row per job, (R, T, d))
            prefix = self.predictor.prefix([r.prepared for r in first], self._should_stop(jobs))
        preds, dt = self._forward(first, jobs, prefix, time.perf_counter() - t)
        used = [r.samples for r in first]
        infer = [dt * 1000] * len(jobs)
        now = time.perf_counter()
        always = self.predictor.needs_samples  # a sample score: K=1 cannot decide
        redo = [
            i
            for i, j in enumerate(jobs)
            if j.adaptive
            and j.request.samples > 1
            and now < j.deadline
            and (always or abs(preds[i].confidence - j.threshold) <= self.margin)
        ]
        # The K-sample redo has more rows than the first pass (K per job, not 1), so it runs in
        # as many passes as the row and token budgets need (each job alone fits: `_refusal`).
        # The redo reuses the first pass's prefix hidden states: only the LoRA layers run again.
        for part in self._within_budget([jobs[i] for i in redo], redo):
            again, dt2 = self._forward(
                [jobs[i].request for i in part], [jobs[i] for i in part], take_prefix(prefix, part)
            )
            for i, pred in zip(part, again, strict=True):
                preds[i], used[i] = pred, jobs[i].request.samples
                infer[i] += dt2 * 1000
        return [Outcome(p, u, w, t) for p, u, w, t in zip(preds, used, waits, infer, strict=True)]
