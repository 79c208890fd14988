"""Prometheus metrics of the service (names and labels as in DESIGN.md, prefix `quaver_`).

One `Metrics` object per app, on its own registry, so several apps (tests) can coexist.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
PROB_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))
MI_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
AUDIO_BUCKETS = (0.5, 1, 2, 4, 6, 8, 10, 20, 30)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("quaver_requests", "HTTP requests", ["route", "status"], registry=r)
        self.answers = Counter(
            "quaver_answers", "answers by outcome", ["outcome", "max_risk"], registry=r
        )
        self.confidence = Histogram(
            "quaver_confidence", "confidence of answers", buckets=PROB_BUCKETS, registry=r
        )
        self.mutual_information = Histogram(
            "quaver_mutual_information",
            "epistemic uncertainty (nats)",
            buckets=MI_BUCKETS,
            registry=r,
        )
        self.no_answer = Histogram(
            "quaver_no_answer_probability",
            "control probe's probability that the audio holds no answer (posteriors with a probe)",
            buckets=PROB_BUCKETS,
            registry=r,
        )
        self.request_duration = Histogram(
            "quaver_request_duration_seconds",
            "request latency",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "quaver_inference_duration_seconds",
            "forward pass per micro-batch",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "quaver_queue_wait_seconds",
            "time queued before inference",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "quaver_batch_size", "decoder rows per micro-batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("quaver_queue_depth", "requests waiting", registry=r)
        self.audio_duration = Histogram(
            "quaver_audio_duration_seconds",
            "uploaded audio length",
            buckets=AUDIO_BUCKETS,
            registry=r,
        )
        self.errors = Counter("quaver_errors", "errors by type", ["type"], registry=r)
        self.model_info = Gauge(
            "quaver_model_info", "loaded model", ["base", "posterior"], registry=r
        )
        self.ready = Gauge(
            "quaver_ready",
            "1 while /readyz answers 200: loaded, warmed up, worker progressing, queue not full",
            registry=r,
        )
        self.worker_heartbeat_age = Gauge(
            "quaver_worker_heartbeat_age_seconds",
            "seconds since the engine worker last made progress (+Inf before it starts)",
            registry=r,
        )
        self.worker_heartbeat_age.set(float("inf"))
        self.jobs_abandoned = Counter(
            "quaver_jobs_abandoned",
            "jobs whose pass was stopped at a layer boundary (deadline passed, or shutdown)",
            registry=r,
        )
        self.rejected = Counter(
            "quaver_rejected",
            "requests refused by a bound on their cost (app/limits.py)",
            ["limit"],
            registry=r,
        )
