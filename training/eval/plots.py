"""PNG figures for the evaluation report: reliability diagrams, risk-coverage curves, confidence
histograms, accuracy / ECE against the number of posterior samples K, and in-distribution vs
shifted-input bars.

Every function takes plain arrays or dicts and an output path, writes one PNG and returns the
path. Figures are drawn on matplotlib's Agg canvas created inside each call (no pyplot, no global
backend switch), so plotting works headless and from worker threads:

    reliability_diagram({"IVON": (conf_ivon, correct_ivon), "AdamW": (conf_adam, correct_adam)},
                        "runs/report/reliability.png")
    risk_coverage_plot({"IVON": (conf, correct)}, "runs/report/risk_coverage.png",
                       targets=(0.05, 0.1))
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from training.eval.metrics import aurc, reliability_bins, risk_coverage_curve

Scores = tuple[np.ndarray, np.ndarray]  # (confidence (n,), correct (n,) bool)


def _figure(n_panels: int, panel_size: tuple[float, float] = (4.0, 3.6)) -> tuple[Any, list]:
    """A figure with n side-by-side axes on an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(panel_size[0] * n_panels, panel_size[1]), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    return fig, list(axes)


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _need(mapping: Mapping, what: str) -> None:
    if not mapping:
        raise ValueError(f"{what} must not be empty")


def reliability_diagram(
    predictors: Mapping[str, Scores], path: str | Path, n_bins: int = 15, title: str | None = None
) -> Path:
    """One reliability panel per predictor: accuracy per confidence bin against the diagonal.

    Bars show bin accuracy, the hatched part the gap to the bin's mean confidence; the panel title
    carries the ECE.
    """
    _need(predictors, "predictors")
    fig, axes = _figure(len(predictors))
    for ax, (name, (conf, correct)) in zip(axes, predictors.items(), strict=True):
        bins = reliability_bins(conf, correct, n_bins)
        full = bins.count > 0
        ece = float((bins.count[full] * bins.gap[full]).sum() / bins.count.sum())
        left, width = bins.edges[:-1][full], np.diff(bins.edges)[full]
        ax.bar(
            left,
            bins.accuracy[full],
            width=width,
            align="edge",
            color="tab:blue",
            edgecolor="black",
            linewidth=0.5,
            label="accuracy",
        )
        ax.bar(
            left,
            bins.confidence[full] - bins.accuracy[full],
            bottom=bins.accuracy[full],
            width=width,
            align="edge",
            color="none",
            edgecolor="tab:red",
            hatch="//",
            linewidth=0.5,
            label="gap to confidence",
        )
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set(
            xlim=(0, 1),
            ylim=(0, 1),
            xlabel="confidence",
            ylabel="accuracy",
            title=f"{name}: ECE {ece:.3f} (n={bins.count.sum()})",
        )
        ax.legend(loc="upper left", fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def risk_coverage_plot(
    predictors: Mapping[str, Scores],
    path: str | Path,
    targets: Sequence[float] = (),
    title: str | None = None,
) -> Path:
    """Selective risk against coverage, one line per predictor (AURC in the legend).

    `targets` draws dashed horizontal lines at those risk levels.
    """
    _need(predictors, "predictors")
    fig, (ax,) = _figure(1, (5.5, 4.0))
    for i, (name, (conf, correct)) in enumerate(predictors.items()):
        curve = risk_coverage_curve(conf, correct)
        ax.step(
            curve.coverage,
            curve.risk,
            where="post",
            # past the ten colours of the cycle, the same colours dashed: no two lines alike
            linestyle="-" if i < 10 else "--",
            label=f"{name} (AURC {aurc(conf, correct):.3f})",
        )
    for r in targets:
        ax.axhline(r, color="gray", linestyle="--", linewidth=0.8)
        ax.annotate(f"risk {r:g}", (0.01, r), fontsize=7, color="gray", va="bottom")
    ax.set(
        xlim=(0, 1),
        ylim=(0, None),
        xlabel="coverage",
        ylabel="selective risk",
        title=title or "risk-coverage",
    )
    ax.legend(fontsize=8)
    return _save(fig, path)


def confidence_histogram(
    confidence: np.ndarray,
    correct: np.ndarray,
    path: str | Path,
    n_bins: int = 20,
    threshold: float | None = None,
    title: str | None = None,
    groups: tuple[str, str] = ("correct", "wrong"),
) -> Path:
    """Histograms of confidence for correct and for wrong answers, with an optional threshold.

    `groups` names the True and False items (e.g. ("answerable", "control") for control items)."""
    conf = np.asarray(confidence, dtype=np.float64)
    right = np.asarray(correct).astype(bool)
    if conf.ndim != 1 or conf.shape != right.shape or conf.size == 0:
        raise ValueError("confidence and correct must be 1-D arrays of the same non-zero length")
    fig, (ax,) = _figure(1, (5.5, 4.0))
    lo, hi = min(0.0, float(conf.min())), max(1.0, float(conf.max()))
    edges = np.linspace(lo, hi, n_bins + 1)
    yes, no = groups
    ax.hist(conf[right], bins=edges, alpha=0.6, color="tab:green", label=f"{yes} ({right.sum()})")
    ax.hist(conf[~right], bins=edges, alpha=0.6, color="tab:red", label=f"{no} ({(~right).sum()})")
    if threshold is not None and math.isfinite(threshold):
        ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3f}")
    ax.set(xlabel="confidence", ylabel="items", title=title or "confidence")
    ax.legend(fontsize=8)
    return _save(fig, path)


def metrics_vs_samples(
    ks: Sequence[int],
    values: Mapping[str, Sequence[float]],
    path: str | Path,
    baselines: Mapping[str, float] | None = None,
    title: str | None = None,
) -> Path:
    """One panel per metric (e.g. {"accuracy": [...], "ECE": [...]}) against the K of `ks`.

    `baselines` (same metric names) draws a dashed line each, e.g. the posterior mean or AdamW.
    """
    _need(values, "values")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be non-empty sample counts >= 1, got {list(ks)}")
    for name, ys in values.items():
        if len(ys) != len(ks):
            raise ValueError(f"{name}: {len(ys)} values for {len(ks)} sample counts")
    fig, axes = _figure(len(values))
    for ax, (name, ys) in zip(axes, values.items(), strict=True):
        ax.plot(ks, ys, "o-", label=name)
        if baselines and name in baselines:
            ax.axhline(baselines[name], color="gray", linestyle="--", label="baseline")
        ax.set(xscale="log", xlabel="posterior samples K", ylabel=name, title=name)
        ax.minorticks_off()  # log axis: label only the K values themselves
        ax.set_xticks(list(ks), [str(k) for k in ks])
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def shift_bars(
    results: Mapping[str, Mapping[str, Mapping[str, float | None]]],
    path: str | Path,
    metrics: Sequence[str] = ("accuracy", "ece", "abstain_rate"),
    title: str | None = None,
) -> Path:
    """Grouped bars, one panel per metric: results[predictor][condition][metric].

    Conditions (e.g. "in-distribution", "silence", "noise") are the x groups, predictors the bars
    within a group. Missing or None values are left out.
    """
    _need(results, "results")
    if not metrics:
        raise ValueError("metrics must not be empty")
    conditions: list[str] = []
    for per_condition in results.values():
        conditions += [c for c in per_condition if c not in conditions]
    predictors = list(results)
    width = 0.8 / len(predictors)
    x = np.arange(len(conditions))
    fig, axes = _figure(len(metrics), (max(4.0, 1.2 * len(conditions) + 1.5), 3.8))
    for ax, metric in zip(axes, metrics, strict=True):
        for j, pred in enumerate(predictors):
            ys = [results[pred].get(c, {}).get(metric) for c in conditions]
            keep = [i for i, y in enumerate(ys) if y is not None and math.isfinite(y)]
            ax.bar(
                x[keep] + (j - (len(predictors) - 1) / 2) * width,
                [ys[i] for i in keep],
                width=width,
                label=pred,
            )
        ax.set_xticks(x, conditions, rotation=20, ha="right")
        ax.set(ylabel=metric, title=metric)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def family_accuracy_bars(
    accuracy: Mapping[str, Mapping[str, float]],
    chance: Mapping[str, float],
    path: str | Path,
    title: str | None = None,
) -> Path:
    """Accuracy per question family, one bar per predictor (accuracy[predictor][family]), with
    each family's chance level (the mean of 1 / choices over its items) as a black tick."""
    _need(accuracy, "accuracy")
    _need(chance, "chance")
    families = list(chance)
    predictors = list(accuracy)
    width = 0.8 / len(predictors)
    x = np.arange(len(families))
    fig, axes = _figure(1, (max(5.0, 0.9 * len(families) + 1.5), 3.8))
    ax = axes[0]
    for j, pred in enumerate(predictors):
        ys = [accuracy[pred].get(f, math.nan) for f in families]
        ax.bar(x + (j - (len(predictors) - 1) / 2) * width, ys, width=width, label=pred)
    ax.hlines([chance[f] for f in families], x - 0.45, x + 0.45, colors="black", label="chance")
    ax.set_xticks(x, families, rotation=25, ha="right")
    ax.set(ylabel="accuracy", ylim=(0, 1), title=title or "accuracy per family")
    ax.legend(fontsize=8)
    return _save(fig, path)


def learning_curves(
    steps: Sequence[int],
    curves: Mapping[str, Sequence[float]],
    path: str | Path,
    ylabel: str = "accuracy",
    title: str | None = None,
) -> Path:
    """One line per curve (e.g. per family) against the training step."""
    _need(curves, "curves")
    fig, axes = _figure(1, (6.0, 4.0))
    ax = axes[0]
    for name, ys in curves.items():
        if len(ys) != len(steps):
            raise ValueError(f"{name}: {len(ys)} values for {len(steps)} steps")
        ax.plot(steps, ys, "o-", markersize=3, label=name)
    ax.set(xlabel="step", ylabel=ylabel, title=title or ylabel)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)
