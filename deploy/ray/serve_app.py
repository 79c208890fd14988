"""Quaver on Ray Serve: the web service of `app.server` as a scaled-out Serve deployment.

Each Serve replica builds the very same FastAPI app (`app.server.create_app`) and serves it as the
deployment's ingress, so routes, errors, metrics and the page are those of `quaver serve`. One
replica holds one model copy; with a GPU in the cluster each replica reserves one GPU, and Serve
adds or removes replicas to keep about `target_ongoing_requests` requests in flight on each.

    # one machine (starts a local Ray; HTTP on QUAVER_HOST:QUAVER_PORT, default 127.0.0.1:8000)
    QUAVER_MODEL_DIR=artifacts/base python -m deploy.ray.serve_app max_replicas=2
    # an existing cluster (run on the head node; see deploy/ray/README.md)
    RAY_ADDRESS=auto python -m deploy.ray.serve_app min_replicas=1 max_replicas=8
    # or with Serve's own CLI (HTTP on port 8000 of every node)
    serve run deploy.ray.serve_app:build_app num_gpus=1 max_replicas=8

Arguments are `key=value` pairs naming `ScaleConfig` fields; `QUAVER_RAY_<FIELD>` environment
variables give defaults, and the service settings come from the `QUAVER_` environment as for
`quaver serve` (read once by the process that deploys, then handed to every replica).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI, Request
from ray import serve
from ray.serve import Application

from app.server import ServiceState, create_app
from app.settings import Settings

ENV_PREFIX = "QUAVER_RAY_"
REPLICA_HEADER = "X-Quaver-Replica"
DEPLOYMENT_NAME = "Quaver"
APP_NAME = "quaver"


@dataclass
class ScaleConfig:
    """Placement and scaling of the Quaver deployment on a Ray cluster."""

    num_replicas: int | None = None
    """A fixed number of replicas; None = autoscale between min_replicas and max_replicas."""
    min_replicas: int = 1
    """Fewest replicas kept when autoscaling (0 lets the deployment idle at no cost)."""
    max_replicas: int = 4
    """Most replicas when autoscaling; with num_gpus=1 at most the cluster's GPU count."""
    target_ongoing_requests: float = 8.0
    """Requests in flight per replica that autoscaling aims at: the engine batches about
    max_batch_rows / samples = 64 / 8 requests into one forward pass, so ~8 keeps batches full."""
    max_ongoing_requests: int = 32
    """Requests Serve sends one replica at once; more wait in the proxy. Keep it at most
    QUAVER_QUEUE_SIZE, or the replica's own queue answers 503."""
    num_gpus: float | None = None
    """GPUs reserved per replica; None = 1 if a GPU is visible to the deploying process, else 0.
    A fraction (0.5) packs several replicas onto one GPU."""
    num_cpus: float = 1.0
    """CPUs reserved per replica (audio decoding and features run on the CPU)."""
    upscale_delay_s: float = 10.0
    """How long the load must stay above target before replicas are added."""
    downscale_delay_s: float = 300.0
    """How long the load must stay below target before replicas are removed (a model load is
    slow, so scaling down is deliberately lazy)."""

    def __post_init__(self) -> None:
        if self.num_replicas is not None and self.num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {self.num_replicas}")
        if self.min_replicas < 0:
            raise ValueError(f"min_replicas must be >= 0, got {self.min_replicas}")
        if self.max_replicas < max(1, self.min_replicas):
            raise ValueError(
                f"max_replicas must be >= max(1, min_replicas), got max_replicas="
                f"{self.max_replicas}, min_replicas={self.min_replicas}"
            )
        if self.target_ongoing_requests <= 0:
            raise ValueError(
                f"target_ongoing_requests must be > 0, got {self.target_ongoing_requests}"
            )
        if self.max_ongoing_requests < 1:
            raise ValueError(f"max_ongoing_requests must be >= 1, got {self.max_ongoing_requests}")
        if self.num_gpus is not None and self.num_gpus < 0:
            raise ValueError(f"num_gpus must be >= 0, got {self.num_gpus}")
        if self.num_cpus <= 0:
            raise ValueError(f"num_cpus must be > 0, got {self.num_cpus}")
        if self.upscale_delay_s < 0 or self.downscale_delay_s < 0:
            raise ValueError("upscale_delay_s and downscale_delay_s must be >= 0")

    @classmethod
    def from_args(
        cls, args: Mapping[str, str], environ: Mapping[str, str] | None = None
    ) -> ScaleConfig:
        """Build from `key=value` arguments over `QUAVER_RAY_<KEY>` environment defaults.

        Values are strings (as `serve run` passes them); "none" clears an optional field.
        """
        environ = os.environ if environ is None else environ
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise ValueError(f"unknown argument(s) {unknown}; known: {sorted(known)}")
        values: dict[str, Any] = {}
        for name, field in known.items():
            raw = args.get(name, environ.get(ENV_PREFIX + name.upper()))
            if raw is None:
                continue
            values[name] = _parse(name, str(field.type), str(raw))
        return cls(**values)

    def gpus_per_replica(self) -> float:
        """num_gpus, with None resolved: 1 when a GPU is visible here (or in the cluster)."""
        if self.num_gpus is not None:
            return self.num_gpus
        if ray.is_initialized():
            return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        import torch  # `serve run` builds the app before it connects to the cluster

        return 1.0 if torch.cuda.is_available() else 0.0

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments for `Deployment.options`: replicas, autoscaling and resources."""
        opts: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.gpus_per_replica()},
        }
        if self.num_replicas is not None:
            opts["num_replicas"] = self.num_replicas
        else:
            opts["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "initial_replicas": max(1, self.min_replicas),
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s,
            }
        return opts


def _parse(name: str, type_name: str, raw: str) -> Any:
    if "None" in type_name and raw.strip().lower() in ("", "none"):
        return None
    try:
        return int(raw) if type_name.startswith("int") else float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()  # late-bound: the app is built on the replica, see __serve_build_asgi_app__
class QuaverReplica:
    """One Serve replica: a model copy behind the FastAPI app of `app.server`.

    The app cannot be built in the deploying process and shipped, since its state holds threads
    and (once loaded) the model; each replica builds its own from the deployment's settings.
    """

    def __init__(self, settings: dict[str, Any]) -> None:
        self._settings = Settings(**settings)
        self._state: ServiceState | None = None

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Called by Serve on the replica after __init__; Serve then runs the app's lifespan."""
        # Load in the foreground: the lifespan start-up returns only once the model is loaded
        # and warmed up, so Serve routes no traffic to a replica that would answer 503.
        app = create_app(self._settings, load_in_background=False)
        self._state = app.state.quaver
        replica_id = serve.get_replica_context().replica_id.unique_id

        @app.middleware("http")
        async def name_replica(request: Request, call_next):
            response = await call_next(request)
            response.headers[REPLICA_HEADER] = replica_id
            return response

        return app

    def check_health(self) -> None:
        """Serve's health probe (also run once before the replica takes traffic)."""
        state = self._state
        if state is None or state.engine is None:
            reason = state.load_error if state is not None else None
            raise RuntimeError(f"Quaver model not loaded: {reason or 'still loading'}")


def quaver_application(settings: Settings, scale: ScaleConfig) -> Application:
    """The Serve application: QuaverReplica with `scale`'s options, every replica on `settings`.

    Relative model/posterior paths are made absolute here, since replicas do not share the
    deploying process's working directory; on a cluster the paths must exist on every node.
    """
    resolved = settings.model_copy(
        update={
            "model_dir": Path(settings.model_dir).resolve(),
            "posterior_dir": Path(settings.posterior_dir).resolve(),
        }
    )
    deployment = QuaverReplica.options(**scale.deployment_options())
    return deployment.bind(resolved.model_dump(mode="json"))


def build_app(args: dict[str, str]) -> Application:
    """Application builder for `serve run deploy.ray.serve_app:build_app key=value ...`."""
    return quaver_application(Settings(), ScaleConfig.from_args(args))


def main(argv: list[str] | None = None) -> None:
    """`python -m deploy.ray.serve_app key=value ...`: deploy and serve until interrupted."""
    argv = sys.argv[1:] if argv is None else argv
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise SystemExit(f"arguments are key=value pairs of ScaleConfig fields, got {bad}")
    args = dict(a.split("=", 1) for a in argv)
    settings = Settings()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # the service runs offline
    ray.init()  # joins RAY_ADDRESS when set, else starts a local Ray
    serve.start(http_options={"host": settings.host, "port": settings.port})
    application = quaver_application(settings, ScaleConfig.from_args(args))
    print(
        f"[quaver] Ray Serve on http://{settings.host}:{settings.port} "
        f"(model {settings.model_dir}, posterior {settings.posterior_dir})",
        flush=True,
    )
    try:
        serve.run(application, name=APP_NAME, route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        serve.delete(APP_NAME)  # frees the replicas (and their GPUs) of a shared cluster


if __name__ == "__main__":
    # Run through the importable module, so Ray ships QuaverReplica by reference, not __main__.
    from deploy.ray import serve_app

    serve_app.main()
