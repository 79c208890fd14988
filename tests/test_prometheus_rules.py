"""Monitoring checks: Prometheus config, recording and alert rules, and the dashboard's PromQL.

promtool validates the config and the rules and runs the unit tests in deploy/prometheus/tests
(the abstention alert fires on a spike and stays quiet on a steady series, and so on). Without
promtool those tests skip; deploy/install-tools.sh installs it (Debian package `prometheus`).
Every expression of the rules and of the Grafana dashboard may only name metrics of the service's
contract (app/metrics.py), recording rules defined in deploy/prometheus/rules, or `up`.

    python -m pytest tests/test_prometheus_rules.py -q
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROM_DIR = ROOT / "deploy" / "prometheus"
RULE_FILES = sorted((PROM_DIR / "rules").glob("*.yml"))
TEST_FILES = sorted((PROM_DIR / "tests").glob("*.yml"))
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "quaver.json"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"

# The metric contract (DESIGN.md, app/metrics.py): family name -> (type, label names).
CONTRACT: dict[str, tuple[str, set[str]]] = {
    "quaver_requests": ("counter", {"route", "status"}),
    "quaver_answers": ("counter", {"outcome", "max_risk"}),
    "quaver_confidence": ("histogram", set()),
    "quaver_mutual_information": ("histogram", set()),
    "quaver_no_answer_probability": ("histogram", set()),
    "quaver_request_duration_seconds": ("histogram", {"route"}),
    "quaver_inference_duration_seconds": ("histogram", set()),
    "quaver_queue_wait_seconds": ("histogram", set()),
    "quaver_batch_size": ("histogram", set()),
    "quaver_queue_depth": ("gauge", set()),
    "quaver_audio_duration_seconds": ("histogram", set()),
    "quaver_errors": ("counter", {"type"}),
    "quaver_model_info": ("gauge", {"base", "posterior"}),
    "quaver_ready": ("gauge", set()),
    "quaver_worker_heartbeat_age_seconds": ("gauge", set()),
    "quaver_jobs_abandoned": ("counter", set()),
    "quaver_rejected": ("counter", {"limit"}),
}
ALERTS = {
    "QuaverAbstentionSpike",
    "QuaverHighErrorRate",
    "QuaverHighLatencyP95",
    "QuaverNotReady",
    "QuaverWorkerStuck",
}
TARGET_LABELS = {"job", "instance"}  # added by Prometheus to every scraped series
BUILTIN_SERIES = {"up"}  # written by Prometheus itself
PROMQL_KEYWORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "inf",
    "nan",
    "atan2",
}
GRAFANA_RANGES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}


def _series_names(family: str, kind: str) -> set[str]:
    """Sample names Prometheus stores for a metric family of the given type."""
    if kind == "counter":
        return {f"{family}_total"}
    if kind == "histogram":
        return {f"{family}_bucket", f"{family}_sum", f"{family}_count"}
    return {family}


CONTRACT_SERIES = {n for fam, (kind, _) in CONTRACT.items() for n in _series_names(fam, kind)}
SERIES_LABELS = {
    n: labels | TARGET_LABELS | ({"le"} if n.endswith("_bucket") else set())
    for fam, (kind, labels) in CONTRACT.items()
    for n in _series_names(fam, kind)
}
KNOWN_LABELS = set().union(*SERIES_LABELS.values())


def _load_rules() -> list[dict]:
    rules = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            rules.extend(group["rules"])
    return rules


def _recorded() -> set[str]:
    return {r["record"] for r in _load_rules() if "record" in r}


def _dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def _grafana_to_promql(expr: str) -> str:
    """Replace Grafana's range variables by fixed durations so that promtool can parse it."""
    for var, duration in GRAFANA_RANGES.items():
        expr = expr.replace(var, duration)
    return expr


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords, labels excluded)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range and subquery windows
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.:$])[A-Za-z_:][A-Za-z0-9_:]*", s):
        if s[m.end() :].lstrip().startswith("("):  # function or aggregation operator
            continue
        if m.group().lower() in PROMQL_KEYWORDS:
            continue
        names.add(m.group())
    return names


def label_names(expr: str) -> set[str]:
    """Label names an expression matches on or groups by."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    names = set()
    for block in re.findall(r"\{([^}]*)\}", s):
        names.update(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", block))
    for block in re.findall(
        r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", s
    ):
        names.update(x.strip() for x in block.split(",") if x.strip())
    return names


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (Debian package prometheus): deploy/install-tools.sh")
    return path


def _run(cmd: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


# ------------------------------------------------------------------ the parsers of this file


def test_metric_name_parser_on_known_expressions():
    expr = (
        "histogram_quantile(0.95, sum by (route, le) (rate(quaver_request_duration_seconds_bucket"
        '{route="/answer", status=~"5.."}[5m]))) > 2 * (quaver:x:rate1h offset 15m) '
        "and on (job) up == bool 0 or vector(1e3)"
    )
    assert metric_names(expr) == {"quaver_request_duration_seconds_bucket", "quaver:x:rate1h", "up"}
    assert label_names(expr) == {"route", "le", "status", "job"}
    assert metric_names('sum(rate(foo_total{a="b(c)"}[$__rate_interval])) by (le)') == {"foo_total"}


# ------------------------------------------------------------------ the metric contract


def test_contract_matches_the_metrics_the_service_exports():
    metrics = pytest.importorskip("app.metrics")
    prom = pytest.importorskip("prometheus_client")
    from prometheus_client.metrics import MetricWrapperBase

    m = metrics.Metrics()
    exported = {}
    for obj in vars(m).values():
        if isinstance(obj, MetricWrapperBase):
            (family,) = obj.describe()
            exported[family.name] = (family.type, obj)
    for family, (kind, labels) in CONTRACT.items():
        assert family in exported, f"app/metrics.py does not export {family}"
        assert exported[family][0] == kind, f"{family} is a {exported[family][0]}"
        metric = exported[family][1]
        if labels:  # labels() accepts exactly the contract's label names
            child = metric.labels(**dict.fromkeys(labels, "x"))
        else:
            with pytest.raises(ValueError):
                metric.labels()
            child = metric
        if kind == "gauge":
            child.set(1)
        elif kind == "counter":
            child.inc()
        else:
            child.observe(0.5)
    text = prom.generate_latest(m.registry).decode()
    exported_series = set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)", text, re.M))
    assert exported_series >= CONTRACT_SERIES, CONTRACT_SERIES - exported_series


# ------------------------------------------------------------------ promtool


def test_promtool_check_config():
    result = _run([_promtool(), "check", "config", str(PROM_DIR / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    # the config's rule_files glob must find every rule file
    assert f"{len(RULE_FILES)} rule files found" in result.stdout + result.stderr


def test_promtool_check_rules():
    assert RULE_FILES, "no rule files in deploy/prometheus/rules"
    result = _run([_promtool(), "check", "rules", *map(str, RULE_FILES)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_of_rules_pass():
    assert TEST_FILES, "no promtool tests in deploy/prometheus/tests"
    result = _run([_promtool(), "test", "rules", *map(str, TEST_FILES)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAILED" not in result.stdout + result.stderr


def test_promtool_unit_tests_cover_every_alert_firing_and_quiet():
    fired, quiet = set(), set()
    for path in TEST_FILES:
        doc = yaml.safe_load(path.read_text())
        for rf in doc["rule_files"]:
            assert (path.parent / rf).resolve() in {p.resolve() for p in RULE_FILES}, rf
        for test in doc["tests"]:
            for case in test.get("alert_rule_test", []):
                (fired if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert fired == ALERTS, f"alerts never tested firing: {ALERTS - fired}"
    assert quiet == ALERTS, f"alerts never tested quiet: {ALERTS - quiet}"


def test_unit_tests_fail_when_the_spike_alert_is_broken(tmp_path: Path):
    """The unit tests can fail: with a doubled-threshold factor of 100 the spike never fires."""
    promtool = _promtool()
    rules = tmp_path / "rules"
    tests = tmp_path / "tests"
    shutil.copytree(PROM_DIR / "rules", rules)
    shutil.copytree(PROM_DIR / "tests", tests)
    alerts = rules / "quaver-alerts.yml"
    text = alerts.read_text()
    assert "> 2 * (quaver_max_risk:abstention_rate:ratio_rate1h offset 15m)" in text
    alerts.write_text(text.replace("> 2 * (quaver_max_risk", "> 100 * (quaver_max_risk"))
    result = _run([promtool, "test", "rules", str(tests / "quaver-alerts.test.yml")], cwd=tmp_path)
    assert result.returncode != 0
    assert "QuaverAbstentionSpike" in result.stdout + result.stderr


def test_dashboard_queries_parse(tmp_path: Path):
    """Every panel query is valid PromQL: promtool parses them as recording rules."""
    promtool = _promtool()
    exprs = _dashboard_exprs()
    assert exprs
    rules = [
        {"record": f"dashboard:query_{i}:check", "expr": _grafana_to_promql(e)}
        for i, e in enumerate(exprs)
    ]
    path = tmp_path / "dashboard.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _run([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------ rules and names (no tools)


def test_rules_are_the_expected_ones():
    rules = _load_rules()
    alerts = {r["alert"]: r for r in rules if "alert" in r}
    assert set(alerts) == ALERTS
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert {"summary", "description"} <= set(rule["annotations"]), name
        assert rule.get("for"), f"{name} fires on a single evaluation"
    recorded = _recorded()
    for name in (
        "quaver:abstention_rate:ratio_rate5m",
        "quaver_max_risk:abstention_rate:ratio_rate5m",
        "quaver:answer_errors:ratio_rate5m",
        "quaver_route:request_duration_seconds:p50_rate5m",
        "quaver_route:request_duration_seconds:p95_rate5m",
        "quaver:confidence:mean_rate5m",
    ):
        assert name in recorded
    # every 5-minute rule has a 1-minute twin, which a test against a live server can read
    for name in recorded:
        if name.endswith("rate5m"):
            assert name.removesuffix("5m") + "1m" in recorded, f"{name} has no 1m twin"


def test_abstention_rule_is_abstained_over_all_answers():
    expr = next(
        r["expr"] for r in _load_rules() if r.get("record") == "quaver:abstention_rate:ratio_rate5m"
    )
    compact = re.sub(r"\s+", "", expr)
    assert 'rate(quaver_answers_total{outcome="abstained"}[5m])' in compact
    assert compact.endswith("/sum(rate(quaver_answers_total[5m]))")


def test_rule_expressions_name_only_contract_metrics_and_recorded_rules():
    allowed = CONTRACT_SERIES | _recorded() | BUILTIN_SERIES
    for rule in _load_rules():
        unknown = metric_names(rule["expr"]) - allowed
        assert not unknown, f"{rule.get('record') or rule.get('alert')}: unknown {unknown}"
        labels = label_names(rule["expr"]) - KNOWN_LABELS
        assert not labels, f"{rule.get('record') or rule.get('alert')}: unknown labels {labels}"


def test_dashboard_queries_name_only_contract_metrics_and_recorded_rules():
    allowed = CONTRACT_SERIES | _recorded() | BUILTIN_SERIES
    used: set[str] = set()
    for expr in _dashboard_exprs():
        names = metric_names(_grafana_to_promql(expr))
        assert names, f"query selects no metric: {expr}"
        assert not names - allowed, f"{expr}: unknown {names - allowed}"
        assert not label_names(expr) - KNOWN_LABELS, f"{expr}: unknown labels"
        used |= names
    # the dashboard shows every metric family of the contract, directly or through a rule
    exprs = {r["record"]: r["expr"] for r in _load_rules() if "record" in r}
    todo = [n for n in used if n in exprs]
    while todo:
        new = metric_names(exprs[todo.pop()]) - used
        used |= new
        todo.extend(n for n in new if n in exprs)
    for family, (kind, _) in CONTRACT.items():
        assert used & _series_names(family, kind), f"no panel shows {family}"


def test_alerts_link_to_sections_of_the_deploy_doc():
    if not DEPLOY_DOC.exists():
        pytest.fail("docs/deploy.md is missing")
    headings = {
        line.lstrip("#").strip()
        for line in DEPLOY_DOC.read_text().splitlines()
        if line.startswith("#")
    }
    for rule in _load_rules():
        if "alert" in rule:
            assert rule["alert"] in headings, f"docs/deploy.md has no section {rule['alert']}"
            assert f"section {rule['alert']}" in rule["annotations"]["description"]
