"""Scenes: the event list + noise bed from which one benchmark clip is rendered.

A family generator (see `families.py`) lays events out in time and adds them to a
`SceneBuilder`, which renders the bed once and sets each event's gain by the band-limited SNR
rule of `signals.gain_for_snr`. The frozen `Scene` it returns holds everything needed to re-render
the clip exactly (kinds, times, frequencies, gains, per-event noise seeds), so the label checkers
in `checks.py` can analyse clean renders of the same events independently of the generator.

    builder = SceneBuilder(duration_s=3.0, bed=Bed("pink", alpha=1.0, seed=7))
    builder.add(Event("beep", onset_s=0.5, duration_s=0.3, f0_hz=800.0), snr_db=20.0)
    scene, mix = builder.finish(peak=0.8)      # mix: (n,) float64, what the WAV holds
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import soundfile as sf

from training.data import signals
from training.data.signals import n_samples

EVENT_KINDS = ("beep", "chirp", "glide", "warble", "noise", "clicks", "speech", "recording")
BED_KINDS = ("white", "pink", "brown", "hum", "babble", "silence", "recording")
SILENCE_RMS = 3e-4  # about -70 dBFS: "silent" controls still differ sample by sample


@dataclass(frozen=True)
class Event:
    """One sound event; rendered at unit RMS, then scaled by `gain`."""

    kind: str  # one of EVENT_KINDS
    onset_s: float
    duration_s: float
    f0_hz: float = 0.0  # tonal kinds: start (or centre) frequency
    f1_hz: float = 0.0  # glide/chirp end frequency (0: same as f0)
    rate_hz: float = 0.0  # warble FM rate or click rate
    depth: float = 0.0  # warble FM depth (fraction of f0)
    timbre: str = "sine"  # oscillator waveform of tonal kinds
    seed: int = 0  # noise/click randomness
    gain: float = 1.0  # linear amplitude of the unit-RMS render
    role: str = ""  # what the family uses it for: "target", "distractor", ...
    text: str = ""  # speech: the spoken text
    source: str = ""  # recording: path of its decoded 16 kHz WAV (see sources.py)

    def __post_init__(self) -> None:
        if self.kind not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {self.kind!r}")
        if (self.kind == "recording") != bool(self.source):
            raise ValueError("a recording event needs a source, and only it has one")
        if self.duration_s <= 0 or self.onset_s < 0:
            raise ValueError(f"bad event timing onset={self.onset_s} duration={self.duration_s}")

    @property
    def end_s(self) -> float:
        return self.onset_s + self.duration_s


@dataclass(frozen=True)
class Bed:
    """Background noise bed, rendered at unit RMS times `level`."""

    kind: str  # one of BED_KINDS
    alpha: float = 0.0  # spectral exponent of coloured noise (white 0, pink 1, brown 2)
    seed: int = 0
    level: float = 1.0
    source: str = ""  # recording: its decoded 16 kHz WAV, looped, over a faint pink floor

    def __post_init__(self) -> None:
        if self.kind not in BED_KINDS:
            raise ValueError(f"unknown bed kind {self.kind!r}")
        if (self.kind == "recording") != bool(self.source):
            raise ValueError("a recording bed needs a source, and only it has one")


@dataclass(frozen=True)
class Scene:
    """Everything needed to re-render one clip."""

    duration_s: float
    bed: Bed
    events: tuple[Event, ...]
    out_gain: float = 1.0  # applied to bed + events to reach the target peak

    @property
    def n(self) -> int:
        return n_samples(self.duration_s)


@lru_cache(maxsize=512)
def load_recording(path: str) -> np.ndarray:
    """A library WAV (16 kHz mono PCM16) as read-only (n,) float64; cached per process."""
    x, rate = sf.read(path, dtype="float64")
    if rate != signals.SR or x.ndim != 1:
        raise ValueError(f"{path}: expected 16 kHz mono, got {rate} Hz, shape {x.shape}")
    x.setflags(write=False)
    return x


def render_event(ev: Event) -> np.ndarray:
    """The event's samples (n_event,) at its gain, starting at its onset."""
    rng = np.random.default_rng(ev.seed)
    if ev.kind in ("beep", "chirp", "glide"):
        x = signals.tone(ev.f0_hz, ev.f1_hz or ev.f0_hz, ev.duration_s, ev.timbre)
    elif ev.kind == "warble":
        x = signals.warble(ev.f0_hz, ev.rate_hz, ev.depth, ev.duration_s, ev.timbre)
    elif ev.kind == "noise":
        x = signals.noise_burst(ev.duration_s, rng)
    elif ev.kind == "clicks":
        x = signals.click_train(ev.duration_s, ev.rate_hz, rng)
    elif ev.kind == "recording":
        n = n_samples(ev.duration_s)
        rec = load_recording(ev.source)[:n]
        x = signals.unit_rms(signals.fade(np.pad(rec, (0, n - len(rec))), 0.005))
    else:  # speech
        from training.data.speech import synthesize

        x = synthesize(ev.text, ev.duration_s, ev.seed)
    return x * ev.gain


def render_bed(bed: Bed, n: int) -> np.ndarray:
    """The bed's samples (n,) at its level."""
    rng = np.random.default_rng(bed.seed)
    if bed.kind == "hum":
        x = signals.hum(n, rng)
    elif bed.kind == "babble":
        x = signals.babble(n, rng)
    elif bed.kind == "silence":
        x = rng.standard_normal(n) * SILENCE_RMS
    elif bed.kind == "recording":
        rec = load_recording(bed.source)
        start = int(rng.integers(len(rec)))  # loop from a seeded offset
        loop = signals.unit_rms(np.resize(np.roll(rec, -start), n))
        # A faint pink floor (-20 dB): no band is empty, so the band-SNR rule never sets an
        # event's gain against nothing (a telephone voice has no energy above 4 kHz).
        x = signals.unit_rms(loop + 0.1 * signals.coloured_noise(n, 1.0, rng))
    else:
        x = signals.coloured_noise(n, bed.alpha, rng)
    return x * bed.level


def render(scene: Scene, *, bed: bool = True, events: bool = True, roles=None) -> np.ndarray:
    """(n,) float64: bed and/or the events (optionally only those whose role is in `roles`),
    scaled by the scene's output gain."""
    out = render_bed(scene.bed, scene.n) if bed else np.zeros(scene.n)
    if events:
        for ev in scene.events:
            if roles is not None and ev.role not in roles:
                continue
            x = render_event(ev)
            i = n_samples(ev.onset_s)
            out[i : i + len(x)] += x[: scene.n - i]
    return out * scene.out_gain


class SceneBuilder:
    """Collects events over a rendered bed, setting gains by band SNR (see module docstring)."""

    def __init__(self, duration_s: float, bed: Bed) -> None:
        self.duration_s = duration_s
        self.bed = bed
        self.n = n_samples(duration_s)
        self.mix = render_bed(bed, self.n)  # (n,) running mixture
        self._bed = self.mix.copy()
        self.events: list[Event] = []

    def gain_for(self, ev: Event, snr_db: float) -> float:
        """The gain that would put `ev` `snr_db` above the bed in its dominant band."""
        x = render_event(dataclasses.replace(ev, gain=1.0))
        i = n_samples(ev.onset_s)
        x = x[: self.n - i]
        return signals.gain_for_snr(x, self._bed[i : i + len(x)], snr_db)

    def add(self, ev: Event, snr_db: float | None = None) -> Event:
        """Place `ev`; with `snr_db` its gain is set against the bed, else `ev.gain` is kept."""
        if ev.end_s > self.duration_s + 1e-9:
            raise ValueError(f"event ends at {ev.end_s:.3f} s, after the clip ({self.duration_s})")
        x = render_event(dataclasses.replace(ev, gain=1.0))
        i = n_samples(ev.onset_s)
        x = x[: self.n - i]
        gain = ev.gain
        if snr_db is not None:
            gain = signals.gain_for_snr(x, self._bed[i : i + len(x)], snr_db)
        ev = dataclasses.replace(ev, gain=gain)
        self.mix[i : i + len(x)] += x * gain
        self.events.append(ev)
        return ev

    def finish(self, peak: float | None) -> tuple[Scene, np.ndarray]:
        """Freeze the scene; `peak` rescales the mixture to that absolute peak (None: keep)."""
        top = float(np.max(np.abs(self.mix)))
        out_gain = peak / top if peak is not None and top > 0 else 1.0
        scene = Scene(self.duration_s, self.bed, tuple(self.events), out_gain)
        return scene, self.mix * out_gain
