"""`quaver ask`: answer one question about one audio file from the command line.

Goes through the same Predictor and threshold table as the server.

    quaver ask clip.wav --question "Which sound is louder?" --choice first --choice second
"""

from __future__ import annotations

import math
from pathlib import Path

from app import audio as audio_mod
from app.predict import Request
from app.server import load_predictor
from app.settings import Settings
from app.thresholds import default_risk, threshold_for


def ask(
    audio_path: Path,
    question: str,
    choices: list[str],
    *,
    model_dir: str | None = None,
    posterior_dir: str | None = None,
    samples: int = 8,
    seed: int = 0,
    max_risk: float | None = None,
) -> dict:
    """Load model + posterior, answer once; returns a JSON-friendly dict."""
    overrides = {
        k: v
        for k, v in (("model_dir", model_dir), ("posterior_dir", posterior_dir))
        if v is not None
    }
    settings = Settings(**overrides)
    predictor = load_predictor(settings)
    wave = audio_mod.to_mono_16k(*audio_mod.decode(Path(audio_path).read_bytes()))
    prepared = predictor.prepare(wave, question, choices)
    [pred] = predictor.predict([Request(prepared, samples=samples, seed=seed)])
    calibration = predictor.calibration  # the table on the served score
    risk = (
        default_risk(calibration, settings.default_max_risk, settings.default_min_coverage)
        if max_risk is None
        else max_risk
    )
    thr = threshold_for(calibration, risk)
    return {
        "answer": choices[pred.answer_index],
        "confidence": round(pred.confidence, 4),
        "score": pred.score,
        "abstain": bool(pred.confidence < thr.value),
        "threshold": thr.value if math.isfinite(thr.value) else None,
        "max_risk": thr.max_risk,
        "probabilities": {c: round(float(p), 4) for c, p in zip(choices, pred.probs, strict=True)},
        "mutual_information": round(pred.mutual_information, 5),
        "no_answer": None if pred.p_control is None else round(pred.p_control, 4),
        "samples": samples,
    }
