"""Choosing on `calib` what the service serves, and storing it in the posterior's quaver.json.

    lam, by_lam = choose_lambda(calib_samples, calib_correct, grid=(0.0, 0.5, 1.0, 2.0))
    power, by_power = choose_power(calib_maxprob, calib_p_control, calib_correct, (1.0, 4.0))
    best = choose_served(candidates)        # [{predictor, score, temperature, risk_lambda,
                                            #   aurc, nll}, ...] all measured on calib
    write_decision(posterior_dir, best, calibration_table)

The risk-averse score's multiple lambda is the grid value with the lowest AURC on calib (ties:
the smaller lambda, so lambda 0 = plain max probability wins a tie); the "answerable" score's
power on 1 - P(control) likewise. The served pair is the
candidate with the lowest calib AURC (the ranking that abstention uses); equal AURC goes to the
lower calib NLL (so temperature scaling, which barely moves the ranking, is kept when it helps
the probabilities shown). Nothing here looks at `test`. The server reads the entry back with
`app.scores.Decision.from_meta`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from app.scores import Decision, answerable, score_values
from training.eval.metrics import aurc

AURC_TIE = 1e-12


def choose_lambda(
    sample_probs: np.ndarray, correct: np.ndarray, grid: Sequence[float]
) -> tuple[float, dict[str, float]]:
    """The lambda of `grid` whose risk-averse score has the lowest AURC on these (calib) items,
    and the AURC of every grid value ({"0.5": aurc, ...})."""
    if not grid or any(g < 0 for g in grid):
        raise ValueError(f"grid must hold lambdas >= 0, got {grid}")
    by = {
        float(g): aurc(score_values(sample_probs, "risk_averse", risk_lambda=float(g)), correct)
        for g in sorted(grid)
    }
    best = min(by, key=lambda g: (by[g], g))
    return best, {f"{g:g}": v for g, v in by.items()}


def choose_power(
    maxprob: np.ndarray, p_control: np.ndarray, correct: np.ndarray, grid: Sequence[float]
) -> tuple[float, dict[str, float]]:
    """The power of `grid` whose "answerable" score maxprob * (1 - p_control) ** power has the
    lowest AURC on these (calib) items (ties: the smaller power), and every grid value's AURC."""
    if not grid or any(g < 0 for g in grid):
        raise ValueError(f"grid must hold powers >= 0, got {grid}")
    by = {float(g): aurc(answerable(maxprob, p_control, float(g)), correct) for g in sorted(grid)}
    best = min(by, key=lambda g: (by[g], g))
    return best, {f"{g:g}": v for g, v in by.items()}


def choose_served(candidates: Sequence[Mapping]) -> dict:
    """The candidate with the lowest calib "aurc" (ties within 1e-12: lower "nll", then order)."""
    if not candidates:
        raise ValueError("no candidate to choose from")
    lowest = min(float(c["aurc"]) for c in candidates)
    tied = [c for c in candidates if float(c["aurc"]) <= lowest + AURC_TIE]
    return dict(min(tied, key=lambda c: float(c.get("nll", 0.0))))


def write_decision(posterior_dir: Path, chosen: Mapping, calibration: Mapping) -> Path:
    """Store `chosen` (predictor, score, temperature, risk_lambda, control_power) with the
    threshold table `calibration` computed on that score as quaver.json's "decision"; returns
    the file.

    Only quaver.json changes: posterior.safetensors (and so every prediction cache) stays."""
    decision = Decision(
        score=str(chosen["score"]),
        temperature=None if chosen.get("temperature") is None else float(chosen["temperature"]),
        risk_lambda=float(chosen.get("risk_lambda") or 0.0),
        control_power=float(chosen.get("control_power", 1.0)),
        predictor=chosen.get("predictor"),
        calibration=dict(calibration),
    )  # validates what the server will read back
    path = Path(posterior_dir) / "quaver.json"
    meta = json.loads(path.read_text())
    meta["decision"] = {**decision.to_json(), "chosen_on": "calib"}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(path)
    return path
