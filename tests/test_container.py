"""The container image and the compose stack for real: built and run with podman.

The image is built from the repository's Dockerfile by deploy/podman_build.py on the local
base images that deploy/local-images.sh makes from Debian packages (no image registry is
reachable here), with this host's pip configuration lent to the build. Then:

- the image runs as its non-root user with a read-only root file system, as the compose file
  runs it (`--read-only`, a tmpfs at /tmp, the work volume read-only); its HEALTHCHECK command passes and
  /readyz turns 200; benchmark clips POSTed to /answer get the answers the native server gives on
  the same clips and seeds (the embedded default: app/default on the base assembled from the
  pinned packages, the session fixture the slow tests share); SIGTERM stops it by itself within
  the grace period (exit status 0, not the 137 of the SIGKILL that follows the grace period);
- docker-compose.yml brought up with podman-compose (app + prometheus, on the local Prometheus
  image): Prometheus scrapes the app by its service name and the abstention recording rule
  answers through Prometheus's HTTP API. Grafana runs only where its image is present (there is
  none in any registry reachable here); its provisioning is checked by test_deploy_static.py.

Skips, saying why, where podman, debootstrap or podman-compose is missing, where the local
images cannot be made, where podman cannot start a container, or where podman's storage has too
little free disk for a build (deploy/podman_build.py says how much, after removing the stale
images of earlier builds); a failed image build fails.
On 2 cores: about 10 min where the base images are yet to be made, 7 min with them (the image
build is 5), 2.5 min with the image in podman's cache; a change to the project's files reruns
the build's steps after `COPY app`. Build time, image size and start-to-ready time are printed
(docs/deploy.md records them).

    python -m pytest tests/test_container.py -q -s
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.settings import Settings
from bench.load import free_port, serve_in_thread, split_payloads

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "localhost/quaver:cpu"  # what docker-compose.yml names the CPU image (quaver:cpu)
PROMETHEUS_IMAGE = "localhost/quaver-prometheus:bookworm"
GRAFANA_IMAGE = "grafana/grafana-oss:11.3.1"  # as docker-compose.yml names it
# podman-compose of this environment first (the dev extra's)
PATH = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
ENV = {
    **os.environ,
    "CONTAINERS_CONF": str(ROOT / "deploy" / "podman" / "containers.conf"),
    "PATH": PATH,
}
EXIT_NO_SPACE = 3  # deploy/podman_build.py's exit status for too little disk to build on
GRACE_S = 30  # SIGTERM, then SIGKILL after this long (docker stop / podman stop --time)
ABSTENTION_RULE = "quaver:abstention_rate:ratio_rate1m"
DASHBOARD_TITLE = json.loads((ROOT / "deploy/grafana/dashboards/quaver.json").read_text())["title"]
ASK = {"samples": "4", "max_risk": "0.2", "adaptive": "false"}  # every request, both servers
SEEDS = (0, 7, 123)


def podman(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["podman", *args], env=ENV, capture_output=True, text=True, timeout=timeout, check=check
    )


def _tail(text: str, n: int = 3000) -> str:
    return text[-n:]


@pytest.fixture(scope="module")
def engine():
    """podman with the local base images, able to start a container; else a skip that says why."""
    for tool in ("podman", "debootstrap"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (bin/setup --system installs it)")
    made = subprocess.run(
        [str(ROOT / "deploy" / "local-images.sh")],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    print(made.stdout, end="")
    if made.returncode != 0:
        pytest.skip(f"deploy/local-images.sh could not make the base images: {_tail(made.stderr)}")
    smoke = podman("run", "--rm", "localhost/quaver-python:3.11-bookworm", "true", check=False)
    if smoke.returncode != 0:
        pytest.skip(f"podman cannot start a container here: {_tail(smoke.stderr)}")


@pytest.fixture(scope="module")
def image(engine):
    """The image built from the repository's Dockerfile: (name, build seconds, size in bytes)."""
    t0 = time.monotonic()
    build = subprocess.run(
        [sys.executable, "deploy/podman_build.py", "--tag", IMAGE],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    seconds = time.monotonic() - t0
    if build.returncode == EXIT_NO_SPACE:  # the machine's disk, not the project: say so, skip
        pytest.skip(f"deploy/podman_build.py: {_tail(build.stderr, 500)}")
    assert build.returncode == 0, f"image build failed:\n{_tail(build.stdout + build.stderr)}"
    size = int(podman("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout)
    print(f"[container] {IMAGE}: built in {seconds:.0f} s, {size / 1e6:.0f} MB")
    return IMAGE, seconds, size


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Three clips of the benchmark's `test` split, made by `quaver data`."""
    out = tmp_path_factory.mktemp("container-bench")
    sizes = {"pretrain": 0, "train": 0, "calib": 0, "test": 3, "test_shift": 0}
    args = [str(Path(sys.executable).parent / "quaver"), "data", "--out", str(out), "--seed", "0"]
    for split, n in sizes.items():
        args += ["--size", f"{split}={n}"]
    subprocess.run(args, check=True, capture_output=True, timeout=600)
    return split_payloads(out, "test")


def post_answer(url: str, payload, seed: int) -> dict:
    files = [("audio", (payload.filename, payload.audio, "audio/wav"))]
    data = {"question": payload.question, "choices": list(payload.choices), "seed": str(seed)}
    r = httpx.post(url + "/answer", files=files, data={**data, **ASK}, timeout=120, trust_env=False)
    assert r.status_code == 200, r.text
    body = r.json()
    body.pop("timing_ms")
    return body


def wait_for(what: str, check, timeout_s: float, alive=None):
    """Poll `check()` until truthy (returning its value); `alive()` False ends the wait early."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise AssertionError(f"{what}: the container is no longer running")
        try:
            value = check()
            if value:
                return value
        except (httpx.HTTPError, ValueError, KeyError, IndexError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout_s:.0f} s")


def app_outcomes(url: str) -> dict[str, float]:
    """{outcome: answers} of the app's own answer counter (its /metrics)."""
    text = httpx.get(url + "/metrics", timeout=10, trust_env=False).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "quaver_answers_total" and sample.value:
                outcome = sample.labels["outcome"]
                out[outcome] = out.get(outcome, 0.0) + sample.value
    return out


def ready(url: str) -> bool:
    """/readyz is 200; a model that failed to load ends the wait at once, with its error."""
    r = httpx.get(url + "/readyz", timeout=5, trust_env=False)
    if r.status_code != 200 and r.json().get("status") == "failed":
        raise AssertionError(f"the model failed to load: {r.json().get('error')}")
    return r.status_code == 200


# ------------------------------------------------------------------ the image alone


@pytest.fixture(scope="module")
def container(image):
    """The image running read-only, published on a free loopback port: (name, url, seconds from
    `podman run` to /readyz 200)."""
    name = f"quaver-test-{uuid.uuid4().hex[:8]}"
    volume = f"{name}-work"
    port = free_port()
    podman("volume", "create", volume)
    t0 = time.monotonic()
    podman(
        "run", "--detach", "--name", name,
        "--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp",
        "--volume", f"{volume}:/var/lib/quaver/work:ro",
        "--publish", f"127.0.0.1:{port}:8000",
        image[0],
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def running() -> bool:
        state = podman("inspect", "--format", "{{.State.Status}}", name, check=False).stdout
        return state.strip() == "running"

    try:
        wait_for("/readyz 200", lambda: ready(url), 600, alive=running)
        seconds = time.monotonic() - t0
        print(f"[container] start to ready: {seconds:.1f} s")
        yield name, url, seconds
    except AssertionError as exc:
        logs = podman("logs", name, check=False)
        raise AssertionError(f"{exc}\n{_tail(logs.stdout + logs.stderr)}") from None
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)
        podman("volume", "rm", "--force", volume, check=False)


def test_container_runs_read_only_as_the_service_user(container):
    name, _, _ = container
    config = json.loads(podman("inspect", name).stdout)[0]
    assert config["HostConfig"]["ReadonlyRootfs"] is True
    assert podman("exec", name, "id", "-u").stdout.strip() == "10001"
    denied = podman("exec", name, "touch", "/opt/quaver/probe", check=False)
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr


def test_healthcheck_command_passes_on_the_running_container(container):
    name, _, _ = container
    health = json.loads(podman("image", "inspect", IMAGE).stdout)[0].get("Healthcheck")
    assert health and "/healthz" in " ".join(health["Test"]), "image lost its HEALTHCHECK"
    # `podman healthcheck run` runs the image's HEALTHCHECK command in the container: 0 = healthy
    wait_for(
        "HEALTHCHECK passing",
        lambda: podman("healthcheck", "run", name, check=False).returncode == 0,
        120,
    )
    state = json.loads(podman("inspect", name).stdout)[0]["State"]
    assert state["Health"]["Status"] == "healthy", state["Health"]
    # The same command fails where nothing answers (here: a port nobody listens on).
    assert health["Test"][0] == "CMD"
    probe = podman("exec", "--env", "QUAVER_PORT=9", name, *health["Test"][1:], check=False)
    assert probe.returncode == 1, probe.stderr


def test_container_answers_as_the_native_server(container, clips, assembled_base):
    _, url, _ = container
    from_container = [post_answer(url, clip, seed) for clip in clips for seed in SEEDS]
    settings = Settings(model_dir=assembled_base, posterior_dir=ROOT / "app" / "default")
    with serve_in_thread(settings) as native:
        from_native = [post_answer(native, clip, seed) for clip in clips for seed in SEEDS]
    worst = 0.0
    for got, want in zip(from_container, from_native, strict=True):
        for body in (got, want):
            body["model"].pop("base")  # the base directory's name differs, not its content
        probs, want_probs = got.pop("probabilities"), want.pop("probabilities")
        assert probs.keys() == want_probs.keys()
        worst = max(worst, *(abs(probs[c] - want_probs[c]) for c in probs))
        floats = ("confidence",)
        for key in floats:
            assert math.isclose(got.pop(key), want.pop(key), rel_tol=0, abs_tol=1e-6)
        for part in ("entropy", "mutual_information"):
            assert math.isclose(
                got["uncertainty"].pop(part), want["uncertainty"].pop(part), abs_tol=1e-6
            )
        assert got == want  # answer, index, abstain, threshold, samples, agreement, model
    print(f"[container] {len(from_container)} answers as native; largest |dp| {worst:.2e}")
    assert worst <= 1e-6


def test_sigterm_stops_the_container_within_the_grace_period(container):
    name, _, _ = container
    t0 = time.monotonic()
    # SIGTERM, then SIGKILL once GRACE_S have passed: exit status 0 only if it stopped by itself
    podman("stop", "--time", str(GRACE_S), name, timeout=GRACE_S + 60)
    seconds = time.monotonic() - t0
    state = json.loads(podman("inspect", name).stdout)[0]["State"]
    print(f"[container] stopped {seconds:.1f} s after SIGTERM, exit status {state['ExitCode']}")
    assert state["Status"] == "exited"
    assert state["ExitCode"] == 0, "killed after the grace period instead of exiting on SIGTERM"


# ------------------------------------------------------------------ the compose stack


class Stack:
    """`podman-compose` on docker-compose.yml under a project name of its own."""

    def __init__(self) -> None:
        self.project = f"quavertest{uuid.uuid4().hex[:8]}"
        ports = {name: free_port() for name in ("QUAVER", "PROMETHEUS", "GRAFANA")}
        self.env = {
            **ENV,
            **{f"{name}_PUBLISH_PORT": str(port) for name, port in ports.items()},
            "PROMETHEUS_IMAGE": PROMETHEUS_IMAGE,
        }
        self.app = f"http://127.0.0.1:{ports['QUAVER']}"
        self.prom = f"http://127.0.0.1:{ports['PROMETHEUS']}"
        self.grafana = f"http://127.0.0.1:{ports['GRAFANA']}"

    def compose(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = ["podman-compose", "-p", self.project, "-f", str(ROOT / "docker-compose.yml")]
        done = subprocess.run(
            [*cmd, *args], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=600
        )
        if check:
            assert done.returncode == 0, _tail(done.stdout + done.stderr)
        return done

    def query(self, expr: str) -> list[dict]:
        r = httpx.get(
            self.prom + "/api/v1/query", params={"query": expr}, timeout=10, trust_env=False
        )
        body = r.json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    def logs(self) -> str:
        out = []
        for service in ("app", "prometheus"):
            done = podman("logs", f"{self.project}_{service}_1", check=False)
            out.append(f"--- {service}\n{_tail(done.stdout + done.stderr, 1500)}")
        return "\n".join(out)


@pytest.fixture(scope="module")
def stack(image):
    if shutil.which("podman-compose", path=PATH) is None:
        pytest.skip("podman-compose not installed (the dev extra installs it)")
    s = Stack()  # the app service's image is the one just built: quaver:cpu
    try:
        s.compose("up", "--detach", "--no-build", "app", "prometheus")
        yield s
    finally:
        s.compose("down", "--volumes", check=False)
        # what `down` may leave behind: the project's network and pod
        podman("network", "rm", "--force", f"{s.project}_default", check=False)
        podman("pod", "rm", "--force", f"pod_{s.project}", check=False)


def test_compose_prometheus_scrapes_the_app_and_records_abstention(stack, clips):
    try:
        wait_for("app /readyz", lambda: ready(stack.app), 600)
        wait_for(
            "prometheus ready",
            lambda: httpx.get(stack.prom + "/-/ready", trust_env=False).status_code == 200,
            120,
        )

        # A few answers at a time until the 1 min rule has an answer rate to divide by: rate()
        # needs two scrapes (every 5 s) of a counter that grew, and the rule runs every 15 s.
        # The value is boxed: a rate of 0.0 (every answer given, none abstained) is data too,
        # and wait_for polls until its check returns something truthy.
        def rule_value() -> tuple[float] | None:
            post_answer(stack.app, clips[0], seed=len(clips))
            result = stack.query(ABSTENTION_RULE)
            value = float(result[0]["value"][1]) if result else math.nan
            return (value,) if math.isfinite(value) else None

        (value,) = wait_for(f"{ABSTENTION_RULE} with data", rule_value, 180)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{stack.logs()}") from None
    (up,) = stack.query('up{job="quaver"}')
    assert up["metric"]["instance"] == "app:8000" and up["value"][1] == "1"
    # One clip, one seed: every answer has the same outcome, so the app's own counters give the
    # rate exactly (1 if that outcome is abstained, else 0), and the rule must give it too.
    outcomes = app_outcomes(stack.app)
    assert len(outcomes) == 1, outcomes
    assert value == (1.0 if "abstained" in outcomes else 0.0), (value, outcomes)
    print(
        f"[container] compose: prometheus scrapes app:8000; {ABSTENTION_RULE} = {value:.3f} "
        f"(app counters: {outcomes})"
    )


def test_compose_grafana(stack):
    if podman("image", "exists", GRAFANA_IMAGE, check=False).returncode != 0:
        pytest.skip(
            f"grafana not run: no Grafana binary or image ({GRAFANA_IMAGE}) on this machine and "
            "none in the registries reachable here; its provisioning and dashboard are checked "
            "statically (tests/test_deploy_static.py)"
        )
    stack.compose("up", "--detach", "--no-build", "grafana")
    wait_for("grafana health", lambda: httpx.get(stack.grafana + "/api/health").is_success, 180)
    found = httpx.get(stack.grafana + "/api/search", params={"query": DASHBOARD_TITLE}).json()
    assert [d["title"] for d in found] == [DASHBOARD_TITLE]
