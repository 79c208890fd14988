"""The served confidence score: which number decides abstention, read from the posterior.

`quaver report` chooses, on `calib` only, the predictor and score the service uses and writes
them into the posterior's quaver.json as

    "decision": {"score": "risk_averse", "temperature": null, "risk_lambda": 1.0,
                 "control_power": 1.0, "predictor": "IVON BMA K=8",
                 "calibration": {...thresholds on that score...}}

and the server reads it back here:

    decision = Decision.from_meta(posterior.meta)          # maxprob, T = 1 without "decision"
    probs, conf = decision.apply(sample_probs)              # (K, C) -> (C,), float

Scores (higher = more confident; abstain iff score < threshold):
- "maxprob": the largest averaged probability, after temperature scaling when `temperature` is
  set (softmax(log p / T) of the BMA p, the "IVON BMA + TS" predictor);
- "risk_averse": mean - risk_lambda * std over the K samples of the chosen option's probability;
- "mutual_information": minus the mutual information H(mean p) - mean H(p_k) of the samples
  (pure epistemic disagreement; 0 is the most confident);
- "answerable": the "maxprob" score times (1 - P(control)) ** control_power, P(control) being
  the control probe's probability that the audio holds no answer (`app.control`; read off the
  prefix states, the same for every sample). The power (chosen on calib by AURC, like lambda)
  sets how hard the probe gates: the probe is fitted on a split where controls are a twelfth of
  the items, so its P(control) of a control item is often well below 1. It needs a posterior
  that stores a probe.
The sample scores use the raw per-sample probabilities (temperature only reshapes the BMA). With
K = 1 they degenerate (std 0, MI 0), so the engine always draws K samples for them. A posterior
without "decision" is served exactly as before: max BMA probability and its "calibration" table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

SCORES = ("maxprob", "risk_averse", "mutual_information", "answerable")
SAMPLE_SCORES = ("risk_averse", "mutual_information")  # need K >= 2 samples to mean anything
PROBE_SCORES = ("answerable",)  # need the control probe's P(control)
PROB_FLOOR = 1e-12


def temper(probs: np.ndarray, temperature: float | None) -> np.ndarray:
    """softmax(log p / T) over the last axis (T None or 1: p itself); zero entries stay zero."""
    p = np.asarray(probs, dtype=np.float64)
    if temperature is None or temperature == 1.0:
        return p
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    logp = np.where(p > 0, np.log(np.maximum(p, PROB_FLOOR)), -np.inf)
    z = logp / temperature
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(-1)


def answerable(maxprob: np.ndarray, p_control: np.ndarray, power: float = 1.0) -> np.ndarray:
    """maxprob * (1 - p_control) ** power, elementwise (power >= 0; 0 ignores the probe)."""
    if not (power >= 0 and math.isfinite(power)):
        raise ValueError(f"control_power must be >= 0, got {power}")
    return np.asarray(maxprob, dtype=np.float64) * (1.0 - np.asarray(p_control)) ** power


def score_values(
    sample_probs: np.ndarray,
    score: str,
    temperature: float | None = None,
    risk_lambda: float = 0.0,
    p_control: np.ndarray | float | None = None,
    control_power: float = 1.0,
) -> np.ndarray:
    """The score of each item: (..., K, C) per-sample probabilities -> (...,) scores.
    `p_control` (shape (...,)): the control probe's P(control), needed by "answerable"."""
    s = np.asarray(sample_probs, dtype=np.float64)
    if s.ndim < 2:
        raise ValueError(f"sample_probs must have shape (..., K, C), got {s.shape}")
    bma = s.mean(-2)
    if score == "maxprob":
        return temper(bma, temperature).max(-1)
    if score == "answerable":
        if p_control is None:
            raise ValueError("the answerable score needs the control probe's p_control")
        pc = np.asarray(p_control, dtype=np.float64)
        if pc.shape != bma.shape[:-1] or not np.all((pc >= 0) & (pc <= 1)):
            raise ValueError(f"p_control must be probabilities of shape {bma.shape[:-1]}")
        return answerable(temper(bma, temperature).max(-1), pc, control_power)
    if score == "risk_averse":
        if risk_lambda < 0:
            raise ValueError(f"risk_lambda must be >= 0, got {risk_lambda}")
        chosen = bma.argmax(-1)[..., None, None]  # (..., 1, 1)
        pc = np.take_along_axis(s, np.broadcast_to(chosen, (*s.shape[:-1], 1)), -1)[..., 0]
        return pc.mean(-1) - risk_lambda * pc.std(-1)
    if score == "mutual_information":
        return -np.maximum(_entropy(bma) - _entropy(s).mean(-1), 0.0)
    raise ValueError(f"unknown score {score!r}; expected one of {SCORES}")


@dataclass(frozen=True)
class Decision:
    """How the service turns K samples into the probabilities it shows and the score it gates."""

    score: str = "maxprob"
    temperature: float | None = None
    risk_lambda: float = 0.0
    control_power: float = 1.0  # the "answerable" score's power on 1 - P(control)
    predictor: str | None = None  # the report's name of the chosen predictor (informational)
    calibration: dict | None = None  # threshold table on this score (None: the posterior's own)

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ValueError(f"decision score {self.score!r} is not one of {SCORES}")
        if self.temperature is not None and not (
            self.temperature > 0 and math.isfinite(self.temperature)
        ):
            raise ValueError(f"decision temperature must be positive, got {self.temperature}")
        if not (self.risk_lambda >= 0 and math.isfinite(self.risk_lambda)):
            raise ValueError(f"decision risk_lambda must be >= 0, got {self.risk_lambda}")
        if not (self.control_power >= 0 and math.isfinite(self.control_power)):
            raise ValueError(f"decision control_power must be >= 0, got {self.control_power}")

    @property
    def needs_samples(self) -> bool:
        """Whether the score is only meaningful with K >= 2 samples."""
        return self.score in SAMPLE_SCORES

    @property
    def needs_probe(self) -> bool:
        """Whether the score needs the control probe's P(control)."""
        return self.score in PROBE_SCORES

    @classmethod
    def from_meta(cls, meta: Mapping | None) -> Decision:
        """The "decision" entry of a quaver.json (the plain max-probability rule without one)."""
        d = (meta or {}).get("decision")
        if not d:
            return cls()
        t = d.get("temperature")
        return cls(
            score=str(d.get("score", "maxprob")),
            temperature=None if t is None else float(t),
            risk_lambda=float(d.get("risk_lambda") or 0.0),
            control_power=float(d.get("control_power", 1.0)),
            predictor=d.get("predictor"),
            calibration=d.get("calibration"),
        )

    def to_json(self) -> dict:
        return {
            "score": self.score,
            "temperature": self.temperature,
            "risk_lambda": self.risk_lambda,
            "control_power": self.control_power,
            "predictor": self.predictor,
            "calibration": self.calibration,
        }

    def apply(
        self, sample_probs: np.ndarray, p_control: float | None = None
    ) -> tuple[np.ndarray, float]:
        """(K, C) per-sample probabilities (and, for "answerable", the request's P(control))
        -> (shown probabilities (C,), confidence score)."""
        s = np.asarray(sample_probs, dtype=np.float64)
        probs = temper(s.mean(0), self.temperature)
        pc = None if p_control is None else np.float64(p_control)
        conf = score_values(
            s, self.score, self.temperature, self.risk_lambda, pc, self.control_power
        )
        conf = float(conf)
        return probs, conf
