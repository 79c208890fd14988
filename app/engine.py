"""The inference engine: a bounded queue and one worker thread that micro-batches requests.

The web layer calls `await engine.submit(job)`; the worker gathers queued jobs into a micro-batch
(up to `max_batch_rows` decoder rows = sum of K, waiting at most `max_wait_ms` for more), runs one
`Predictor.predict` call for the whole batch off the event loop, and resolves each job's future.
A full queue raises `Overloaded` at once (HTTP 503 + Retry-After) instead of growing without
bound. Adaptive jobs are first decided at the posterior mean (K=1); only those whose confidence
lands within `margin` of their threshold are re-run with K samples.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

from app.errors import InferenceTimeout, Overloaded
from app.metrics import Metrics
from app.predict import Prediction, Predictor, Request


@dataclass
class Job:
    request: Request
    threshold: float  # abstain iff confidence < threshold (inf = always abstain)
    adaptive: bool = False
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)


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
        max_wait_ms: float = 5.0,
        queue_size: int = 64,
        adaptive_margin: float = 0.15,
    ):
        self.predictor = predictor
        self.metrics = metrics
        self.max_batch_rows = max_batch_rows
        self.max_wait_s = max_wait_ms / 1000
        self.margin = adaptive_margin
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="quaver-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._thread = None

    async def submit(self, job: Job, timeout_s: float) -> Outcome:
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
                f"no answer within {timeout_s:.0f} s; retry later", headers={"Retry-After": "5"}
            ) from None

    def run_now(self, jobs: list[Job]) -> list[Outcome]:
        """Synchronously run jobs as one micro-batch (warm-up, CLI, tests)."""
        return self._process(jobs)

    # -- worker ---------------------------------------------------------------------------------
    def _rows(self, job: Job) -> int:
        return 1 if job.adaptive else job.request.samples

    def _gather(self, first: Job) -> list[Job]:
        jobs, rows = [first], self._rows(first)
        deadline = time.perf_counter() + self.max_wait_s
        while rows < self.max_batch_rows:
            remaining = deadline - time.perf_counter()
            try:
                job = (
                    self._queue.get(timeout=max(remaining, 0))
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)
                break
            jobs.append(job)
            rows += self._rows(job)
        return jobs

    def _run(self) -> None:
        while not self._stop.is_set():
            first = self._queue.get()
            if first is None:
                break
            # Claim each job: a job cancelled (timed out) while queued is dropped, and a claimed
            # one can no longer be cancelled, so setting its result below cannot race a cancel.
            jobs = [j for j in self._gather(first) if j.future.set_running_or_notify_cancel()]
            self.metrics.queue_depth.set(self._queue.qsize())
            if not jobs:
                continue
            try:
                outcomes = self._process(jobs)
            except Exception as exc:  # a failed batch fails its jobs, never the worker
                for job in jobs:
                    job.future.set_exception(exc)
                continue
            for job, outcome in zip(jobs, outcomes, strict=True):
                job.future.set_result(outcome)

    def _forward(self, requests: list[Request]) -> tuple[list[Prediction], float]:
        t = time.perf_counter()
        preds = self.predictor.predict(requests)
        dt = time.perf_counter() - t
        self.metrics.inference_duration.observe(dt)
        self.metrics.batch_size.observe(sum(r.samples for r in requests))
        return preds, dt

    def _process(self, jobs: list[Job]) -> list[Outcome]:
        start = time.perf_counter()
        waits = [(start - j.enqueued) * 1000 for j in jobs]
        for w in waits:
            self.metrics.queue_wait.observe(w / 1000)
        first = [replace(j.request, samples=1) if j.adaptive else j.request for j in jobs]
        preds, dt = self._forward(first)
        used = [r.samples for r in first]
        infer = [dt * 1000] * len(jobs)
        redo = [
            i
            for i, j in enumerate(jobs)
            if j.adaptive
            and j.request.samples > 1
            and abs(preds[i].confidence - j.threshold) <= self.margin
        ]
        if redo:
            again, dt2 = self._forward([jobs[i].request for i in redo])
            for i, pred in zip(redo, again, strict=True):
                preds[i], used[i] = pred, jobs[i].request.samples
                infer[i] += dt2 * 1000
        return [Outcome(p, u, w, t) for p, u, w, t in zip(preds, used, waits, infer, strict=True)]
