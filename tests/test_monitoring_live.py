"""Monitoring against a live server: the real Prometheus binary scrapes Quaver on loopback.

The shipped default (or another model, see below) is served by uvicorn in this process; a small
benchmark is generated in a temp dir; bench/load.py sends the `test` split, then `test_shift`,
with a few malformed requests so that the error series have data. Prometheus runs with the
repository's rule files, scraping and evaluating every second. Checked:

- every rule group of deploy/prometheus/rules loads and every rule evaluates with health ok;
- every query of every panel of deploy/grafana/dashboards/quaver.json returns data through
  Prometheus's HTTP API (Grafana's $__rate_interval -> 20s, $__range -> 1h);
- the abstention-rate recording rule (1 min window) gives, for each phase, the ratio of the app's
  own /metrics counters over that phase (abstained / all answers).

Each phase is observed by a fresh Prometheus started after the earlier traffic: its 1-minute
window then holds that phase alone, which a long-running one would only show a minute later.
Before the first Prometheus starts, the same requests are sent once, so that every counter
series already exists (`rate` cannot see the jump of a series born inside its window).

The app serves the shipped default (app/default on the base assembled from the pinned packages,
shared with the slow tests), or the model QUAVER_LIVE_MODEL_DIR / QUAVER_LIVE_POSTERIOR_DIR
name; the load asks for the risk targets its calibration table marks feasible, and abstention
must be higher under shift (QUAVER_LIVE_REQUESTS sets the requests per phase, default 48).
Where the default's packages are missing, a tiny random model is served instead and its rates
are printed, not judged.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from app.posterior import load_posterior
from app.settings import Settings
from bench.load import (
    LoadConfig,
    build_tiny,
    free_port,
    run_load,
    serve_in_thread,
    split_payloads,
)
from training.data.generate import BenchmarkConfig, generate_benchmark

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("prometheus") is None,
        reason="prometheus binary not on PATH (deploy/install-tools.sh)",
    ),
]

ROOT = Path(__file__).resolve().parents[1]
RULE_FILES = sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"))
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "quaver.json"
GRAFANA_VARS = {"$__rate_interval": "20s", "$__interval": "5s", "$__range": "1h"}
ABSTENTION_RULE = "quaver:abstention_rate:ratio_rate1m"
# its 5 min twin, read instead when a phase on a slow machine outlasts the 1 min window
ABSTENTION_RULE_5M = "quaver:abstention_rate:ratio_rate5m"
TRAINED = (os.environ.get("QUAVER_LIVE_MODEL_DIR"), os.environ.get("QUAVER_LIVE_POSTERIOR_DIR"))
N_REQUESTS = int(os.environ.get("QUAVER_LIVE_REQUESTS", "48"))  # per phase
CLIENTS = 8


class Prometheus:
    """A Prometheus process on 127.0.0.1 with its own config and storage; `stop()` kills it."""

    def __init__(self, work: Path, target: str) -> None:
        work.mkdir(parents=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in RULE_FILES],
            "scrape_configs": [
                {
                    "job_name": "quaver",
                    "scrape_interval": "1s",
                    "scrape_timeout": "1s",
                    "static_configs": [{"targets": [target]}],
                }
            ],
        }
        (work / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = work / "prometheus.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={work / 'prometheus.yml'}",
                    f"--storage.tsdb.path={work / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.started = time.time()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def _get(self, path: str, **params) -> Any:
        r = httpx.get(self.url + path, params=params, timeout=10, trust_env=False)
        body = r.json()
        assert body.get("status") == "success", (path, params, body)
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        data = self._get("/api/v1/query", **params)
        return data["result"] if isinstance(data["result"], list) else [data["result"]]

    def query_range(self, expr: str, start: float, end: float, step: str = "1s") -> list[dict]:
        return self._get(
            "/api/v1/query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=step
        )["result"]

    def rules(self) -> list[dict]:
        return self._get("/api/v1/rules")["groups"]

    def wait_until(self, what: str, check, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited: {self.log.read_text()[-2000:]}")
            try:
                if check():
                    return
            except (httpx.HTTPError, AssertionError, KeyError, IndexError, ValueError):
                pass
            time.sleep(0.2)
        raise AssertionError(
            f"prometheus: {what} not within {timeout_s} s; log:\n{self.log.read_text()[-2000:]}"
        )

    def wait_scraping(self) -> None:
        """Ready, the target scraped at least twice, every rule evaluated once."""
        self.wait_until(
            "ready", lambda: httpx.get(self.url + "/-/ready", trust_env=False).status_code == 200
        )
        self.wait_until(
            "two scrapes of the app",
            lambda: len(self.query('up{job="quaver"}[10s]')[0]["values"]) >= 2,
        )
        self.wait_until(
            "rule evaluation",
            lambda: all(r.get("health") != "unknown" for g in self.rules() for r in g["rules"]),
        )


def app_answers(url: str) -> dict[str, float]:
    """The app's own answer counters from /metrics: {outcome: count} summed over max_risk."""
    text = httpx.get(url + "/metrics", trust_env=False, timeout=10).text
    out = {"answered": 0.0, "abstained": 0.0}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "quaver_answers_total":
                out[s.labels["outcome"]] += s.value
    return out


def answer_series(url: str) -> set[tuple[str, str]]:
    """(outcome, max_risk) label pairs of the answer counter the app has created so far."""
    text = httpx.get(url + "/metrics", trust_env=False, timeout=10).text
    return {
        (s.labels["outcome"], s.labels["max_risk"])
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "quaver_answers_total"
    }


def grafana_to_promql(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    left = re.findall(r"\$\{?\w+", expr)
    assert not left, f"dashboard query uses Grafana variables this test does not know: {left}"
    return expr


def run_phase(url: str, prom: Prometheus, name: str, payloads, cfg: LoadConfig) -> dict:
    """Load one phase, then read the abstention rule at an evaluation after its last scrape."""
    series_before, before = answer_series(url), app_answers(url)
    report = run_load(url, payloads, cfg, label=name)
    after = app_answers(url)
    assert answer_series(url) == series_before, "an answer series was born inside the phase"
    total = sum(after.values()) - sum(before.values())
    abstained = after["abstained"] - before["abstained"]
    # Prometheus has scraped the final counters, and the rule was evaluated after that scrape.
    prom.wait_until(
        "final counters scraped",
        lambda: (
            float(prom.query("sum(quaver_answers_total)")[0]["value"][1]) == sum(after.values())
        ),
    )
    seen = time.time()
    # The rule's window must hold this Prometheus's whole history (the scrapes before the phase
    # too): the 1 min rule, or its 5 min twin where the phase took longer (a loaded machine).
    rule = ABSTENTION_RULE if seen + 5 - prom.started < 60 else ABSTENTION_RULE_5M
    prom.wait_until(
        "rule evaluated after the last scrape",
        lambda: float(prom.query(f"{rule}[5s]")[0]["values"][-1][0]) >= seen + 0.5,
    )
    rule_ts, rule_value = prom.query(f"{rule}[5s]")[0]["values"][-1]
    window = 60 if rule == ABSTENTION_RULE else 300
    assert float(rule_ts) - window < prom.started, f"phase too long for the {rule} window"
    return {
        "phase": name,
        "report": report,
        "answers": total,
        "abstained": abstained,
        "app_rate": abstained / total if total else math.nan,
        "rule_rate": float(rule_value),
    }


def served(request, work: Path) -> tuple[Path, Path, tuple[float | None, ...], bool]:
    """(model dir, posterior dir, risk targets the load asks for, trained?) of the app under test.

    A trained model: the one QUAVER_LIVE_MODEL_DIR / QUAVER_LIVE_POSTERIOR_DIR name, else the
    shipped default on the base assembled from the pinned packages (the session fixture the slow
    tests share). It is asked for the risk targets its calibration could meet: at an infeasible
    one the service abstains on everything, in both phases, and there is no shift to see. Where
    the packages are missing: the tiny random model, whose confidences sit in a narrow band that
    these targets split into both outcomes.
    """
    if all(TRAINED):
        model_dir, post_dir = Path(TRAINED[0]), Path(TRAINED[1])
    else:
        try:
            model_dir, post_dir = (
                request.getfixturevalue("assembled_base"),
                ROOT / "app" / "default",
            )
        except pytest.skip.Exception:
            model_dir, post_dir = build_tiny(work / "tiny")
            return model_dir, post_dir, (0.05, 0.1, 0.2, 0.5), False
    table = load_posterior(post_dir).calibration or {}  # the format's one reader
    feasible = tuple(t["max_risk"] for t in table.get("targets", []) if t.get("feasible"))
    if not feasible:
        pytest.skip(f"{post_dir}: no calibrated risk target is feasible (always abstains)")
    return model_dir, post_dir, feasible, True


@pytest.fixture(scope="module")
def live(request, tmp_path_factory):
    work = tmp_path_factory.mktemp("live")
    model_dir, post_dir, max_risks, trained = served(request, work)
    data = generate_benchmark(
        BenchmarkConfig(
            seed=0, pretrain=0, train=0, calib=0, test=N_REQUESTS, test_shift=N_REQUESTS
        ),
        work / "bench",
        progress=False,
    )
    phases = [(s, split_payloads(data, s)) for s in ("test", "test_shift")]
    cfg = LoadConfig(
        clients=CLIENTS,
        requests_per_client=max(1, N_REQUESTS // CLIENTS),
        samples=4,
        max_risks=max_risks,
        bad_every=12,
        max_seconds=120,
    )
    settings = Settings(
        model_dir=model_dir,
        posterior_dir=post_dir,
        adaptive=False,
        default_samples=4,
        max_samples=8,
    )
    proms: list[Prometheus] = []
    try:
        with serve_in_thread(settings) as url:
            target = url.removeprefix("http://")
            for name, payloads in phases:  # create every counter series before any scrape
                run_load(url, payloads, cfg, label=f"prime-{name}")
            results, rule_groups = [], []
            for i, (name, payloads) in enumerate(phases):
                if proms:
                    proms[-1].stop()
                prom = Prometheus(work / f"prom{i}", target)
                proms.append(prom)
                prom.wait_scraping()
                results.append(run_phase(url, prom, name, payloads, cfg))
                rule_groups.append(prom.rules())
            for r in results:
                print(
                    f"[live] {r['phase']}: {r['answers']:.0f} answers, abstention app "
                    f"{r['app_rate']:.4f} rule {r['rule_rate']:.4f}; load "
                    f"{r['report'].requests_per_s} req/s, status {r['report'].status}"
                )
            yield {
                "prom": proms[-1],
                "results": results,
                "rule_groups": rule_groups,
                "trained": trained,
            }
    finally:
        for prom in proms:
            prom.stop()


def test_every_rule_group_loads_healthy(live):
    expected = {
        g["name"]: len(g["rules"])
        for f in RULE_FILES
        for g in yaml.safe_load(f.read_text())["groups"]
    }
    for groups in live["rule_groups"]:
        loaded = {g["name"]: g for g in groups}
        assert set(loaded) == set(expected)
        for name, group in loaded.items():
            assert len(group["rules"]) == expected[name], name
            bad = [
                (r["name"], r["health"], r.get("lastError"))
                for r in group["rules"]
                if r["health"] != "ok"
            ]
            assert not bad, f"group {name}: {bad}"


def test_every_dashboard_query_returns_data(live):
    prom: Prometheus = live["prom"]
    panels = json.loads(DASHBOARD.read_text())["panels"]
    queries = [(p["title"], t) for p in panels for t in p.get("targets", [])]
    assert len(queries) >= 20
    now = time.time()
    empty = []
    for title, target in queries:
        expr = grafana_to_promql(target["expr"])
        if target.get("instant"):
            values = [s["value"] for s in prom.query(expr, at=now)]
        else:
            values = [v for s in prom.query_range(expr, prom.started, now) for v in s["values"]]
        if not any(math.isfinite(float(v[1])) for v in values):
            empty.append((title, expr))
    assert not empty, f"panel queries without data: {empty}"


def test_abstention_rule_matches_app_counters(live):
    for r in live["results"]:
        assert r["answers"] >= 20, r
        assert r["report"].status.get("422", 0) >= 1, "the malformed requests were not sent"
        assert set(r["report"].status) <= {"200", "422"}, r["report"].status
        assert r["rule_rate"] == pytest.approx(r["app_rate"], abs=1e-6), r


def test_abstention_rises_under_shift(live):
    test, shift = live["results"]
    print(f"[live] abstention test {test['rule_rate']:.4f} -> test_shift {shift['rule_rate']:.4f}")
    if not live["trained"]:
        pytest.skip(
            "random tiny model (the default's packages are missing): abstention under shift "
            "is not meaningful (rates printed above)"
        )
    assert shift["rule_rate"] > test["rule_rate"]
