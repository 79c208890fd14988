"""Independent label checkers for the real-recording families (`real_families.py`).

The generator knows which recording it placed; these checkers do not look: they cut a clean,
events-only render into segments (`checks.segments`), identify which indexed recording starts at
each segment by normalised cross-correlation against *every* recording of the library, and
re-derive the answer from the identified recordings' index entries (label, category) and from the
signal itself (segment counts, RMS levels, autocorrelation pitch). A wrong recording, a label
mapped to the wrong file, a play that merges with another or a note run going the wrong way
shows up as a disagreement.

    ident = Identifier(library)
    assert check_real_answer(gen.item.family, gen.example, ident) == gen.example.answer
"""

from __future__ import annotations

import numpy as np

from training.data.checks import check_duration, check_loudness, segments
from training.data.families import TIMING_CHOICES, Example
from training.data.real_families import KIND_CHOICES
from training.data.scene import load_recording, render
from training.data.signals import SR
from training.data.sources import NUMBER_WORDS, Library, Recording

TEMPLATE_S = 0.25  # how much of each recording's start is matched
SEARCH_S = 0.15  # a segment may start this much after (or before) its recording's onset
MIN_SCORE = 0.8  # normalised correlation accepted as "this recording starts here"


class Identifier:
    """Matches the start of a sound against the start of every recording of a library."""

    def __init__(self, library: Library, recordings: tuple[Recording, ...] | None = None) -> None:
        self.recordings = recordings if recordings is not None else library.recordings
        n = round(TEMPLATE_S * SR)
        rows = []
        for r in self.recordings:
            x = np.asarray(load_recording(library.path(r)))[:n]
            x = np.pad(x, (0, n - len(x)))
            rows.append(x / max(float(np.linalg.norm(x)), 1e-12))
        self.templates = np.stack(rows)  # (n_recordings, n): unit-norm starts
        self.n = n

    def identify(self, x: np.ndarray, start: int) -> tuple[Recording | None, float]:
        """The recording whose start best matches x near sample `start` (None below MIN_SCORE),
        and the score."""
        m = round(SEARCH_S * SR)
        lo = max(0, start - m)
        w = x[lo : start + m + self.n]
        w = np.pad(w, (0, max(0, 2 * m + self.n - len(w))))
        size = 1 << int(np.ceil(np.log2(len(w) + self.n)))
        spec = np.fft.rfft(w, size)[None, :] * np.conj(np.fft.rfft(self.templates, size, axis=1))
        corr = np.fft.irfft(spec, size, axis=1)[:, : len(w) - self.n + 1]  # (n_rec, lags)
        c2 = np.concatenate([[0.0], np.cumsum(w**2)])
        norm = np.sqrt(np.maximum(c2[self.n :] - c2[: -self.n], 1e-20))[: corr.shape[1]]
        score = (corr / norm[None, :]).max(axis=1)
        best = int(np.argmax(score))
        if score[best] < MIN_SCORE:
            return None, float(score[best])
        return self.recordings[best], float(score[best])

    def heard(self, ex: Example) -> list[Recording]:
        """The recordings identified at the segments of a clean render of ex's events, in order
        (segments that are the middle of a recording match nothing and are skipped)."""
        x = render(ex.scene, bed=False)
        out = []
        for a, _ in segments(x):
            rec, _score = self.identify(x, a)
            if rec is not None:
                out.append(rec)
        return out


def _is_speech(r: Recording) -> bool:
    return r.category == "voice" and r.label != "crowd"


def _first(ex: Example, ident: Identifier) -> Recording:
    heard = ident.heard(ex)
    if not heard:
        raise ValueError("no indexed recording identified in the clip")
    return heard[0]


def check_sound_class(ex: Example, ident: Identifier) -> str:
    return _first(ex, ident).label


def check_source_kind(ex: Example, ident: Identifier) -> str:
    return KIND_CHOICES[_first(ex, ident).category]


def check_speech_presence(ex: Example, ident: Identifier) -> str:
    heard = ident.heard(ex)
    if not heard and not ex.scene.events:
        return "no"  # silence or a noise bed alone: nothing was meant to be heard
    if not heard:
        raise ValueError("no indexed recording identified in the clip")
    return "yes" if any(_is_speech(r) for r in heard) else "no"


def check_spoken_number(ex: Example, ident: Identifier) -> str:
    label = _first(ex, ident).label
    if label not in NUMBER_WORDS:
        raise ValueError(f"identified {label!r}, not a number word")
    return label


def check_count_real(ex: Example, ident: Identifier) -> str:
    q = ex.question.lower()
    x = render(ex.scene, bed=False)
    n = 0
    for a, _ in segments(x):
        rec, _ = ident.identify(x, a)
        if rec is not None and rec.label in q:
            n += 1
    return NUMBER_WORDS[n]


def log_spectrum(x: np.ndarray, bins_per_octave: int = 48) -> np.ndarray:
    """Log magnitude spectrum of x on a log-frequency axis 50 Hz - 6.4 kHz; (7 octaves * bins,)."""
    size = 1 << 14
    mag = np.abs(np.fft.rfft(x * np.hanning(len(x)), size))
    f = np.fft.rfftfreq(size, 1 / SR)
    grid = 50.0 * 2 ** (np.arange(7 * bins_per_octave) / bins_per_octave)
    return np.log(np.interp(grid, f, mag) + 1e-6)


def pitch_shift_semitones(a: np.ndarray, b: np.ndarray, max_st: float = 24.0) -> float:
    """How many semitones b's harmonic pattern sits above a's: the lag of the best match of
    their log-frequency spectra (a shift moves every harmonic alike, so an octave error of a
    single pitch estimate cannot flip it)."""
    bpo = 48
    kernel = np.ones(bpo) / bpo  # one octave: the spectral envelope, removed below

    def peaks(x: np.ndarray) -> np.ndarray:
        s = log_spectrum(x, bpo)
        s = s - np.convolve(np.pad(s, bpo // 2, mode="edge"), kernel, "same")[bpo // 2 : -bpo // 2]
        return np.maximum(s, 0.0)  # the harmonics standing above the envelope

    sa, sb = peaks(a), peaks(b)
    m = round(max_st / 12 * bpo)
    n = len(sa)
    scores = [float(np.dot(sa[max(0, -k) : n - max(0, k)], sb[max(0, k) : n - max(0, -k)]))
              / (n - abs(k)) for k in range(-m, m + 1)]  # fmt: skip
    return (int(np.argmax(scores)) - m) * 12 / bpo


def check_pitch_real(ex: Example, ident: Identifier) -> str:
    x = render(ex.scene, bed=False)
    segs = segments(x)
    if len(segs) < 3:
        raise ValueError(f"expected 3-4 notes, found {len(segs)}")
    n = round(0.2 * SR)

    def body(seg: tuple[int, int]) -> np.ndarray:
        a = seg[0] + round(0.04 * SR)  # past the attack
        return x[a : a + n]

    return "rising" if pitch_shift_semitones(body(segs[0]), body(segs[-1])) > 0 else "falling"


def check_order_real(ex: Example, ident: Identifier) -> str:
    heard = ident.heard(ex)
    if not heard:
        raise ValueError("no indexed recording identified in the clip")
    q = ex.question.lower()
    return heard[0].label if "first" in q else heard[-1].label


def check_presence_real(ex: Example, ident: Identifier) -> str:
    q = ex.question.lower()
    named = [c for c in {r.label for r in ident.recordings} if f"a {c} " in q or f"a {c}?" in q]
    if not named:
        raise ValueError(f"no indexed label named in {ex.question!r}")
    target = max(named, key=len)
    return "yes" if any(r.label == target for r in ident.heard(ex)) else "no"


def check_timing_real(ex: Example, ident: Identifier) -> str:
    x = render(ex.scene, bed=False)
    segs = segments(x)
    if not segs:
        raise ValueError("nothing audible")
    rec, _ = ident.identify(x, segs[0][0])
    if rec is None or rec.label not in ex.question.lower():
        raise ValueError("the named sound is not the one heard")
    mid = (segs[0][0] + segs[-1][1]) / 2 / SR
    return TIMING_CHOICES[int(np.clip(mid / (ex.scene.duration_s / 3), 0, 2))]


REAL_CHECKERS = {
    "sound_class": check_sound_class,
    "source_kind": check_source_kind,
    "speech_presence": check_speech_presence,
    "spoken_number": check_spoken_number,
    "count_real": check_count_real,
    "loudness_real": lambda ex, ident: check_loudness(ex),
    "pitch_real": check_pitch_real,
    "order_real": check_order_real,
    "presence_real": check_presence_real,
    "timing_real": check_timing_real,
    "duration_real": lambda ex, ident: check_duration(ex),
}


def check_real_answer(family: str, ex: Example, ident: Identifier) -> str:
    """The answer text of a real-family item recomputed from the audio and the index."""
    if family not in REAL_CHECKERS:
        raise ValueError(f"no checker for real family {family!r}")
    return REAL_CHECKERS[family](ex, ident)
