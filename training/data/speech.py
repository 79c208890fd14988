"""Optional spoken-word events rendered with the `espeak-ng` binary (never required).

The `speech` question family exists only when `espeak-ng` is on PATH and the benchmark config
asks for it; `available()` tells. Rendering is deterministic: the voice's speed and pitch come
from the event seed.

    if available():
        wave = synthesize("seven", seed=3)     # (n,) float64 at 16 kHz, unit RMS
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from training.data.signals import SR, fade, n_samples, unit_rms

BINARY = "espeak-ng"


def available() -> bool:
    """True when the espeak-ng binary is installed."""
    return shutil.which(BINARY) is not None


def synthesize(text: str, duration_s: float | None = None, seed: int = 0) -> np.ndarray:
    """Speak `text`; returns (n,) float64 at 16 kHz, unit RMS, trimmed of leading/trailing
    silence, cut or zero-padded to `duration_s` when given."""
    if not available():
        raise RuntimeError(f"{BINARY} is not installed; the speech family needs it")
    rng = np.random.default_rng(seed)
    speed = int(rng.integers(140, 190))  # words per minute
    pitch = int(rng.integers(30, 70))  # espeak pitch 0..99
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speech.wav"
        subprocess.run(
            [BINARY, "-w", str(path), "-s", str(speed), "-p", str(pitch), text],
            check=True,
            capture_output=True,
            timeout=30,
        )
        x, rate = sf.read(path, dtype="float64", always_2d=True)
    x = x.mean(axis=1)
    if rate != SR:
        from math import gcd

        from scipy.signal import resample_poly

        g = gcd(int(rate), SR)
        x = resample_poly(x, SR // g, int(rate) // g)
    active = np.flatnonzero(np.abs(x) > 0.02 * np.max(np.abs(x)))
    if active.size:
        x = x[active[0] : active[-1] + 1]
    if duration_s is not None:
        n = n_samples(duration_s)
        x = np.pad(x[:n], (0, max(0, n - len(x))))
    return unit_rms(fade(x, 0.005))
