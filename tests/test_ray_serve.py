"""Ray Serve scale-out: two replicas of the Quaver app on a local CPU-only Ray answer concurrently.

Starts a private local Ray (2 CPUs, no dashboard), deploys `deploy.ray.serve_app` with two fixed
replicas of the tiny model, and POSTs /answer through Serve's HTTP proxy on loopback.

    python -m pytest tests/test_ray_serve.py -q
"""

from __future__ import annotations

import secrets
import socket
import warnings
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from app.settings import Settings
from tests.conftest import tone, wav_bytes

with warnings.catch_warnings():
    # Ray's own config models use pydantic-v1-style Field arguments: not ours to fix
    warnings.simplefilter("ignore", DeprecationWarning)
    from deploy.ray.serve_app import (
        APP_NAME,
        DEPLOYMENT_NAME,
        REPLICA_HEADER,
        ScaleConfig,
        quaver_application,
    )

QUESTION = "How many beeps are there?"
CHOICES = ["one", "two", "three"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_scale_config_options_and_validation():
    auto = ScaleConfig.from_args(
        {"max_replicas": "6", "num_gpus": "1"}, environ={"QUAVER_RAY_MIN_REPLICAS": "2"}
    )
    opts = auto.deployment_options()
    assert opts["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert "num_replicas" not in opts
    scaling = opts["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["initial_replicas"], scaling["max_replicas"]) == (
        2,
        2,
        6,
    )
    assert scaling["target_ongoing_requests"] == 8.0
    fixed = ScaleConfig.from_args({"num_replicas": "3", "num_gpus": "0.5"}, environ={})
    assert fixed.deployment_options()["num_replicas"] == 3
    assert "autoscaling_config" not in fixed.deployment_options()
    assert fixed.deployment_options()["ray_actor_options"]["num_gpus"] == 0.5
    # the argument beats the environment; "none" clears an optional field
    assert (
        ScaleConfig.from_args({"num_gpus": "none"}, {"QUAVER_RAY_NUM_GPUS": "1"}).num_gpus is None
    )
    with pytest.raises(ValueError, match="max_replicas"):
        ScaleConfig(min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="unknown argument"):
        ScaleConfig.from_args({"replicas": "2"}, environ={})
    with pytest.raises(ValueError, match="must be a number"):
        ScaleConfig.from_args({"num_cpus": "lots"}, environ={})


@pytest.fixture(scope="module")
def serve_url(tiny_dir, posterior_dir):
    import ray
    from ray import serve

    with pytest.MonkeyPatch.context() as env:
        # Ray's processes inherit this environment: no usage report (offline), one torch thread
        # each, and a throwaway token for the token authentication that ray.init turns on (so
        # none is generated and saved under ~/.ray)
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")
        env.setenv("OMP_NUM_THREADS", "1")
        env.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
        env.delenv("RAY_ADDRESS", raising=False)  # a private local Ray, never a shared one
        ray.init(
            num_cpus=2,
            num_gpus=0,
            include_dashboard=False,
            object_store_memory=100 * 1024 * 1024,
            log_to_driver=False,
        )
        try:
            port = _free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            settings = Settings(
                model_dir=tiny_dir,
                posterior_dir=posterior_dir,
                default_samples=4,
                adaptive=False,
                threads=1,
            )
            scale = ScaleConfig(num_replicas=2, num_cpus=0.5, num_gpus=0)
            serve.run(quaver_application(settings, scale), name=APP_NAME, route_prefix="/")
            yield f"http://127.0.0.1:{port}"
        finally:
            serve.shutdown()
            ray.shutdown()


def _answer(client: httpx.Client, url: str, seed: int) -> httpx.Response:
    return client.post(
        f"{url}/answer",
        files={"audio": ("clip.wav", wav_bytes(tone(1.0)), "audio/wav")},
        data={"question": QUESTION, "choices": CHOICES, "samples": "4", "seed": str(seed)},
    )


@pytest.mark.slow  # ~45 s, nearly all of it Ray start-up and two model loads
def test_two_replicas_answer_concurrent_requests(serve_url):
    from ray import serve

    status = serve.status().applications[APP_NAME]
    assert status.status == "RUNNING"
    assert status.deployments[DEPLOYMENT_NAME].replica_states == {"RUNNING": 2}

    with httpx.Client(timeout=60) as client:
        assert client.get(f"{serve_url}/readyz").json() == {"status": "ready"}
        by_replica: dict[str, list[dict]] = {}
        # Serve's router spreads concurrent requests over both replicas (it prefers the one with
        # fewer in flight); a few bounded rounds keep a rare one-sided round from failing the test.
        for _ in range(4):
            with ThreadPoolExecutor(8) as pool:
                responses = list(pool.map(lambda _: _answer(client, serve_url, 3), range(8)))
            for r in responses:
                assert r.status_code == 200, r.text
                body = r.json()
                assert body["answer"] in CHOICES
                assert body["answer"] == CHOICES[body["answer_index"]]
                assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
                assert body["samples"] == 4
                by_replica.setdefault(r.headers[REPLICA_HEADER], []).append(body)
            if len(by_replica) == 2:
                break
        assert len(by_replica) == 2, f"only replica(s) {sorted(by_replica)} answered"
        # same seed, same audio: every replica draws the same weight samples -> same answer
        first = next(iter(by_replica.values()))[0]
        for bodies in by_replica.values():
            for body in bodies:
                assert body["probabilities"] == pytest.approx(first["probabilities"], abs=1e-6)
                assert body["answer"] == first["answer"]
                assert body["uncertainty"] == pytest.approx(first["uncertainty"], abs=1e-6)
        # a different seed draws different weights and so different probabilities
        other = _answer(client, serve_url, 4).json()
        assert other["probabilities"] != pytest.approx(first["probabilities"], abs=1e-9)
        # the replicas are the app of app.server: its errors come through unchanged
        bad = client.post(
            f"{serve_url}/answer",
            files={"audio": ("clip.wav", wav_bytes(tone(1.0)), "audio/wav")},
            data={"question": QUESTION, "choices": ["one"]},
        )
        assert bad.status_code == 422, bad.text
        assert bad.json()["error"]["type"] == "invalid_input"
        assert REPLICA_HEADER in bad.headers
