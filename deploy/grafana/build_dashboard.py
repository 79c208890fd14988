"""The Grafana dashboard of the Quaver service, as code: writes deploy/grafana/dashboards/quaver.json.

Grafana loads the JSON file through the provisioning in deploy/grafana/provisioning; this script
is its source. Edit the panels here and regenerate:

    python deploy/grafana/build_dashboard.py           # rewrite quaver.json
    python deploy/grafana/build_dashboard.py --check   # exit 1 if quaver.json is out of date

Queries read the metric contract of app/metrics.py (prefix `quaver_`) and the recording rules of
deploy/prometheus/rules. Grafana's own range variables ($__rate_interval, $__range) adapt the
windows of the raw-metric queries to the zoom level; the recording rules carry fixed windows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards" / "quaver.json"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}  # provisioning/datasources uid
GRID_WIDTH = 24  # Grafana's grid is 24 columns wide

Panel = dict[str, Any]


def target(
    expr: str, legend: str = "", *, ref: str = "A", instant: bool = False, fmt: str = "time_series"
) -> dict[str, Any]:
    """One PromQL query of a panel; `legend` is Grafana's legend template ({{label}})."""
    return {
        "datasource": DATASOURCE,
        "expr": expr,
        "legendFormat": legend,
        "refId": ref,
        "instant": instant,
        "range": not instant,
        "format": fmt,
    }


def _with_refs(targets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Give the queries of one panel distinct refIds A, B, C, ..."""
    return [{**t, "refId": chr(ord("A") + i)} for i, t in enumerate(targets)]


def timeseries(
    title: str,
    description: str,
    targets: list[dict[str, Any]],
    *,
    unit: str,
    minimum: float | None = 0,
    maximum: float | None = None,
    stacked: bool = False,
    bars: bool = False,
) -> Panel:
    """A time-series panel; `unit` is a Grafana unit id (s, percentunit, reqps, short...)."""
    defaults: dict[str, Any] = {
        "unit": unit,
        "custom": {
            "drawStyle": "bars" if bars else "line",
            "fillOpacity": 60 if bars else 10,
            "lineWidth": 1,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"mode": "normal" if stacked else "none", "group": "A"},
        },
    }
    if minimum is not None:
        defaults["min"] = minimum
    if maximum is not None:
        defaults["max"] = maximum
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": _with_refs(targets),
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def heatmap(title: str, description: str, metric: str, unit: str) -> Panel:
    """A heatmap of a Prometheus histogram: observations per bucket and time step."""
    expr = f"sum by (le) (increase({metric}_bucket[$__rate_interval]))"
    return {
        "type": "heatmap",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": [target(expr, "{{le}}", fmt="heatmap")],
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {
            "calculate": False,
            "cellGap": 1,
            "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64, "exponent": 0.5},
            "yAxis": {"axisPlacement": "left", "unit": unit},
            "rowsFrame": {"layout": "auto"},
            "tooltip": {"mode": "single", "yHistogram": True},
        },
    }


def stat(
    title: str,
    description: str,
    targets: list[dict[str, Any]],
    *,
    unit: str = "short",
    thresholds: list[tuple[float | None, str]] | None = None,
) -> Panel:
    """A single-value panel (last value of each series); `thresholds` are (from, color) steps."""
    steps = [{"value": v, "color": c} for v, c in (thresholds or [(None, "green")])]
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": _with_refs(targets),
        "fieldConfig": {
            "defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}},
            "overrides": [],
        },
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background",
            "graphMode": "none",
            "textMode": "value_and_name",
        },
    }


def table(title: str, description: str, targets: list[dict[str, Any]]) -> Panel:
    """A table of the labels of instant series (model_info)."""
    return {
        "type": "table",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": _with_refs(targets),
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {"showHeader": True},
        "transformations": [
            {
                "id": "organize",
                "options": {"excludeByName": {"Time": True, "Value": True, "__name__": True}},
            }
        ],
    }


def quantiles(metric: str, qs: tuple[float, ...], by: str = "le") -> list[dict[str, Any]]:
    """histogram_quantile queries of a histogram metric, one per quantile in `qs`."""
    return [
        target(
            f"histogram_quantile({q}, sum by ({by}) (rate({metric}_bucket[$__rate_interval])))",
            f"p{round(q * 100):d}",
        )
        for q in qs
    ]


def mean(metric: str) -> dict[str, Any]:
    """Mean of a histogram's observations over the rate interval."""
    return target(
        f"sum(rate({metric}_sum[$__rate_interval])) / sum(rate({metric}_count[$__rate_interval]))",
        "mean",
    )


def row(title: str) -> Panel:
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


def layout(sections: list[tuple[str, list[tuple[Panel, int, int]]]]) -> list[Panel]:
    """Place rows and their (panel, width, height) left to right, wrapping at 24 columns."""
    panels: list[Panel] = []
    y = 0
    for title, items in sections:
        panels.append({**row(title), "gridPos": {"x": 0, "y": y, "w": GRID_WIDTH, "h": 1}})
        y += 1
        x, line_height = 0, 0
        for panel, w, h in items:
            if x + w > GRID_WIDTH:
                x, y, line_height = 0, y + line_height, 0
            panels.append({**panel, "gridPos": {"x": x, "y": y, "w": w, "h": h}})
            x += w
            line_height = max(line_height, h)
        y += line_height
    for i, panel in enumerate(panels, start=1):
        panel["id"] = i
    return panels


def build_dashboard() -> dict[str, Any]:
    """The whole dashboard as a JSON-ready dict."""
    rate = "[$__rate_interval]"
    uncertainty = [
        (
            timeseries(
                "Abstention rate",
                "Share of answers withheld because confidence fell under the threshold of the "
                "request's max_risk. A rise against the 1 h baseline is the first sign of input "
                "drift (alert QuaverAbstentionSpike).",
                [
                    target("quaver:abstention_rate:ratio_rate5m", "all (5m)"),
                    target("quaver:abstention_rate:ratio_rate1m", "all (1m)"),
                    target("quaver:abstention_rate:ratio_rate1h", "baseline (1h)"),
                ],
                unit="percentunit",
                maximum=1,
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Abstention rate by max_risk",
                "Each risk target has its own threshold and so its own abstention rate (5 min).",
                [target("quaver_max_risk:abstention_rate:ratio_rate5m", "max_risk {{max_risk}}")],
                unit="percentunit",
                maximum=1,
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Answered vs abstained",
                "Answers per second by outcome.",
                [target(f"sum by (outcome) (rate(quaver_answers_total{rate}))", "{{outcome}}")],
                unit="reqps",
                stacked=True,
                bars=True,
            ),
            12,
            8,
        ),
        (
            stat(
                "Answers in the time range",
                "Answered and abstained answers over the dashboard's time range.",
                [
                    target(
                        "sum by (outcome) (increase(quaver_answers_total[$__range]))",
                        "{{outcome}}",
                        instant=True,
                    )
                ],
                unit="short",
            ),
            12,
            8,
        ),
        (
            heatmap(
                "Confidence distribution",
                "Confidence (max of the averaged predictive distribution) of answers, per "
                "bucket and time step.",
                "quaver_confidence",
                "percentunit",
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Confidence quantiles",
                "Quantiles of confidence, and the 5-minute mean (recording rule).",
                [
                    *quantiles("quaver_confidence", (0.1, 0.5, 0.9)),
                    target("quaver:confidence:mean_rate5m", "mean (5m)"),
                ],
                unit="percentunit",
                maximum=1,
            ),
            12,
            8,
        ),
        (
            heatmap(
                "Mutual information distribution",
                "Epistemic uncertainty (mutual information between answer and weights, nats) "
                "per bucket and time step.",
                "quaver_mutual_information",
                "none",
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Mutual information quantiles",
                "Quantiles of mutual information (nats), and the 5-minute mean.",
                [
                    *quantiles("quaver_mutual_information", (0.5, 0.9, 0.99)),
                    target("quaver:mutual_information:mean_rate5m", "mean (5m)"),
                ],
                unit="none",
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Audio that holds no answer (control probe)",
                "uncertainty.no_answer of every request: the share whose audio the control "
                "probe calls silence, noise or an unrelated sound (P > 0.5), and the mean "
                "probability. A rise with unchanged traffic means clients send audio nothing "
                "can be answered about (a muted microphone, a broken upload path); those "
                "abstentions are right. Empty when the posterior has no probe.",
                [
                    target(
                        '1 - sum(rate(quaver_no_answer_probability_bucket{le="0.5"}'
                        "[$__rate_interval])) / sum(rate(quaver_no_answer_probability_count"
                        "[$__rate_interval]))",
                        "share with P(no answer) > 0.5",
                    ),
                    {**mean("quaver_no_answer_probability"), "refId": "B"},
                ],
                unit="percentunit",
                maximum=1,
            ),
            24,
            8,
        ),
    ]
    performance = [
        (
            timeseries(
                "Latency of POST /answer",
                "Request latency quantiles over 5 minutes (recording rules); alert "
                "QuaverHighLatencyP95 at p95 > 5 s.",
                [
                    target(
                        'quaver_route:request_duration_seconds:p50_rate5m{route="/answer"}', "p50"
                    ),
                    target(
                        'quaver_route:request_duration_seconds:p95_rate5m{route="/answer"}', "p95"
                    ),
                    target(
                        'quaver_route:request_duration_seconds:p99_rate5m{route="/answer"}', "p99"
                    ),
                ],
                unit="s",
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Queue wait",
                "Time a request waits in the engine queue before its micro-batch runs.",
                quantiles("quaver_queue_wait_seconds", (0.5, 0.95, 0.99)),
                unit="s",
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Inference time per micro-batch",
                "Forward pass of one micro-batch (all its requests and weight samples).",
                quantiles("quaver_inference_duration_seconds", (0.5, 0.95, 0.99)),
                unit="s",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Batch size",
                "Decoder rows (requests x weight samples) per micro-batch.",
                [*quantiles("quaver_batch_size", (0.5, 0.95)), mean("quaver_batch_size")],
                unit="short",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Queue depth",
                "Requests waiting in the engine queue, per server; when the queue is full, "
                "requests get 503.",
                [target("sum by (instance) (quaver_queue_depth)", "{{instance}}")],
                unit="short",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Audio duration",
                "Length of the uploaded audio.",
                quantiles("quaver_audio_duration_seconds", (0.5, 0.95)),
                unit="s",
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Request rate by route",
                "Requests per second by route.",
                [target(f"sum by (route) (rate(quaver_requests_total{rate}))", "{{route}}")],
                unit="reqps",
            ),
            12,
            8,
        ),
    ]
    health = [
        (
            timeseries(
                "Requests by status (POST /answer)",
                "POST /answer requests per second by HTTP status.",
                [
                    target(
                        f'sum by (status) (rate(quaver_requests_total{{route="/answer"}}{rate}))',
                        "{{status}}",
                    )
                ],
                unit="reqps",
                stacked=True,
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Errors by type",
                "Typed errors per second (client and server errors).",
                [target(f"sum by (type) (rate(quaver_errors_total{rate}))", "{{type}}")],
                unit="reqps",
                stacked=True,
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Server error ratio (POST /answer)",
                "Share of POST /answer requests that ended in a 5xx; alert QuaverHighErrorRate "
                "above 5 %.",
                [
                    target("quaver:answer_errors:ratio_rate5m", "5m"),
                    target("quaver:answer_errors:ratio_rate1m", "1m"),
                ],
                unit="percentunit",
                maximum=1,
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Requests refused by a bound",
                "Requests per second refused by each bound on their cost (app/limits.py: "
                "question/choice characters and tokens, choices, prompt tokens, batch budget).",
                [target(f"sum by (limit) (rate(quaver_rejected_total{rate}))", "{{limit}}")],
                unit="reqps",
                stacked=True,
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Engine worker heartbeat age",
                "Seconds since each server's engine worker last made progress; /healthz fails "
                "past QUAVER_WATCHDOG_S (30 s), alert QuaverWorkerStuck above 60 s. Abandoned "
                "jobs: passes stopped at a layer boundary once their deadline passed.",
                [
                    target("quaver_worker_heartbeat_age_seconds", "age {{instance}}"),
                    target(f"sum(rate(quaver_jobs_abandoned_total{rate}))", "abandoned jobs/s"),
                ],
                unit="s",
            ),
            8,
            8,
        ),
        (
            stat(
                "Ready",
                "1 while /readyz answers 200: model loaded and warmed up, not draining, worker "
                "progressing, queue not full; scrape target up.",
                [
                    target("quaver_ready", "ready {{instance}}", instant=True),
                    target('up{job="quaver"}', "up {{instance}}", instant=True),
                ],
                thresholds=[(None, "red"), (1, "green")],
            ),
            8,
            8,
        ),
        (
            table(
                "Model",
                "Base model and posterior each server has loaded.",
                [target("quaver_model_info", instant=True, fmt="table")],
            ),
            8,
            8,
        ),
    ]
    return {
        "uid": "quaver",
        "title": "Quaver",
        "description": "Uncertainty-aware audio question answering: abstention, confidence, "
        "latency, queue and errors.",
        "tags": ["quaver"],
        "timezone": "browser",
        "editable": False,
        "graphTooltip": 1,
        "refresh": "10s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": []},
        "annotations": {"list": []},
        "links": [],
        "panels": layout(
            [
                ("Uncertainty and drift", uncertainty),
                ("Latency and throughput", performance),
                ("Errors and health", health),
            ]
        ),
    }


def render() -> str:
    """The dashboard as the text of quaver.json."""
    return json.dumps(build_dashboard(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="only compare with the file; exit 1 if it differs"
    )
    parser.add_argument("--out", type=Path, default=OUT, help="where to write the JSON")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is out of date: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
