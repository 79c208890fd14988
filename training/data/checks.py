"""Independent label checkers: recompute each family's answer from the question text and a clean
render of the scene, with signal analysis that shares no logic with the generator.

The generator knows the answer by construction; these checkers re-derive it from what is actually
audible (envelope segmentation, RMS, pitch tracks, spectral slope, timbre classification), so a
rendering bug (merged events, wrong level, a glide going the wrong way) shows up as a
disagreement. They are exact at easy difficulty; near the perceptual threshold (the hard items)
they may legitimately disagree, which is the point of those items.

    from training.data.checks import check_answer
    assert check_answer(gen.item.family, gen.example) == gen.example.answer
"""

from __future__ import annotations

import itertools

import numpy as np

from training.data.families import (
    KIND_TEXT,
    KINDS,
    NOISE_CHOICES,
    NUMBER_WORDS,
    TIMING_CHOICES,
    Example,
)
from training.data.scene import Scene, render
from training.data.signals import SR


def segments(
    x: np.ndarray,
    frame_s: float = 0.005,
    thresh_db: float = -40.0,
    merge_gap_s: float = 0.08,
    min_len_s: float = 0.02,
) -> list[tuple[int, int]]:
    """Active regions [start, end) in samples of a clean signal x (n,): frames whose energy is
    within `thresh_db` of the loudest frame, runs closer than `merge_gap_s` merged."""
    hop = round(frame_s * SR)
    n_frames = len(x) // hop
    energy = (x[: n_frames * hop].reshape(n_frames, hop) ** 2).sum(axis=1)
    if energy.max() <= 0:
        return []
    active = energy > energy.max() * 10 ** (thresh_db / 10)
    runs: list[list[int]] = []  # [first frame, last frame + 1]
    for i in np.flatnonzero(active):
        if runs and i - runs[-1][1] <= merge_gap_s / frame_s:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [(a * hop, b * hop) for a, b in runs if (b - a) * frame_s >= min_len_s]


def pitch_track(x: np.ndarray, frame_s: float = 0.04, hop_s: float = 0.01) -> np.ndarray:
    """Peak frequency (Hz) of each frame within 20 dB of the loudest frame; (n_active,)."""
    win, hop = round(frame_s * SR), round(hop_s * SR)
    if len(x) < win:
        x = np.pad(x, (0, win - len(x)))
    n = 1 + (len(x) - win) // hop
    frames = np.stack([x[i * hop : i * hop + win] for i in range(n)]) * np.hanning(win)
    energy = (frames**2).sum(axis=1)
    frames = frames[energy > energy.max() * 0.01]
    n_fft = 8192
    spec = np.abs(np.fft.rfft(frames, n_fft, axis=1))
    f = np.fft.rfftfreq(n_fft, 1 / SR)
    lo, hi = np.searchsorted(f, [100.0, 4000.0])
    k = lo + np.argmax(spec[:, lo:hi], axis=1)
    # Parabolic interpolation of the log magnitude around the peak bin.
    a, b, c = (np.log(spec[np.arange(len(k)), k + d] + 1e-12) for d in (-1, 0, 1))
    denom = a - 2 * b + c
    delta = np.where(np.abs(denom) > 1e-12, 0.5 * (a - c) / denom, 0.0)
    return (k + delta) * SR / n_fft


def classify_kind(x: np.ndarray) -> str:
    """Which of KINDS a clean single-event segment sounds like."""
    hop = 40  # 2.5 ms frames: a click is one or two frames
    n = len(x) // hop
    energy = (x[: n * hop].reshape(n, hop) ** 2).sum(axis=1)
    if np.mean(energy > energy.max() * 0.01) < 0.5:
        return "clicks"  # mostly silent between short pulses
    # Spectral flatness (geometric / arithmetic mean power, 150 Hz - 7 kHz): ~0.8 for noise.
    win = 512
    starts = range(0, max(1, len(x) - win + 1), win // 2)
    power = np.mean(
        [
            np.abs(np.fft.rfft(np.pad(x[s : s + win], (0, max(0, win - len(x)))) * np.hanning(win)))
            ** 2
            for s in starts
        ],
        axis=0,
    )
    f = np.fft.rfftfreq(win, 1 / SR)
    band = power[(f >= 150) & (f <= 7000)] + 1e-20
    if np.exp(np.mean(np.log(band))) / np.mean(band) > 0.3:
        return "noise"
    track = np.log2(pitch_track(x))
    t = np.arange(len(track))
    slope, icpt = np.polyfit(t, track, 1) if len(track) > 2 else (0.0, track.mean())
    span = slope * max(len(track) - 1, 1)  # octaves covered by the linear trend
    resid = track - (slope * t + icpt)
    if abs(span) >= 0.4:
        return "chirp"
    if resid.std() >= 0.05:
        return "warble"
    return "beep"


def _events_only(scene: Scene) -> np.ndarray:
    return render(scene, bed=False)


def _kind_in(question: str, forms: int) -> str:
    """The KINDS entry whose text form (0 label, 1 phrase, 2 plural) the question names."""
    q = question.lower()
    hits = [k for k in KINDS if KIND_TEXT[k][forms] in q]
    if len(hits) != 1:
        raise ValueError(f"cannot tell the sound kind in {question!r}")
    return hits[0]


def _seg_kinds(x: np.ndarray) -> list[tuple[int, int, str]]:
    return [(a, b, classify_kind(x[a:b])) for a, b in segments(x)]


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x**2)))


def check_count(ex: Example) -> str:
    q = ex.question.lower()
    kind = next(k for k in ("beep", "noise") if KIND_TEXT[k][0] in q)
    n = sum(1 for *_, k in _seg_kinds(_events_only(ex.scene)) if k == kind)
    return NUMBER_WORDS[n]


def check_order(ex: Example) -> str:
    q = ex.question.lower()
    ask_first = "first" in q or "earliest" in q
    segs = _seg_kinds(_events_only(ex.scene))
    kind = segs[0][2] if ask_first else segs[-1][2]
    return KIND_TEXT[kind][0]


def check_pitch_direction(ex: Example) -> str:
    track = np.log2(pitch_track(_events_only(ex.scene)))
    q = max(1, len(track) // 4)
    return "rising" if np.median(track[-q:]) > np.median(track[:q]) else "falling"


def _two_segments(ex: Example) -> tuple[np.ndarray, np.ndarray]:
    x = _events_only(ex.scene)
    segs = segments(x)
    if len(segs) != 2:
        raise ValueError(f"expected two sounds, found {len(segs)}")
    return x[segs[0][0] : segs[0][1]], x[segs[1][0] : segs[1][1]]


def check_duration(ex: Example) -> str:
    a, b = _two_segments(ex)
    first_longer = len(a) > len(b)
    want_first = first_longer if "shorter" not in ex.question.lower() else not first_longer
    return "the first" if want_first else "the second"


def check_loudness(ex: Example) -> str:
    a, b = _two_segments(ex)
    first_louder = _rms(a) > _rms(b)
    want_first = first_louder if "quieter" not in ex.question.lower() else not first_louder
    return "the first" if want_first else "the second"


def spectral_exponent(x: np.ndarray) -> float:
    """alpha of a power spectrum ~ f^-alpha, fitted on third-octave-ish bands 100 Hz - 6 kHz."""
    win = 4096
    starts = range(0, len(x) - win + 1, win // 2)
    power = np.mean(
        [np.abs(np.fft.rfft(x[s : s + win] * np.hanning(win))) ** 2 for s in starts], axis=0
    )
    f = np.fft.rfftfreq(win, 1 / SR)
    edges = np.geomspace(100, 6000, 19)
    centres, levels = [], []
    for lo, hi in itertools.pairwise(edges):
        sel = (f >= lo) & (f < hi)
        centres.append(np.sqrt(lo * hi))
        levels.append(np.mean(power[sel]))  # mean power density in the band
    slope, _ = np.polyfit(np.log10(centres), np.log10(levels), 1)
    return float(-slope)


def check_noise_type(ex: Example) -> str:
    bed = render(ex.scene, events=False)
    alpha = spectral_exponent(bed)
    return NOISE_CHOICES[int(np.clip(np.round(alpha), 0, 2))]


def check_rhythm(ex: Example) -> str:
    onsets = np.array([a for a, _ in segments(_events_only(ex.scene))], dtype=float)
    iois = np.diff(onsets)
    return "regular" if iois.std() / iois.mean() < 0.08 else "irregular"


def check_presence(ex: Example) -> str:
    target = _kind_in(ex.question, 1)
    kinds = {k for *_, k in _seg_kinds(_events_only(ex.scene))}
    return "yes" if target in kinds else "no"


def check_timing(ex: Example) -> str:
    target = _kind_in(ex.question, 1)
    x = _events_only(ex.scene)
    mids = [(a + b) / 2 / SR for a, b, k in _seg_kinds(x) if k == target]
    if len(mids) != 1:
        raise ValueError(f"expected one {target}, found {len(mids)}")
    third = int(np.clip(mids[0] / (ex.scene.duration_s / 3), 0, 2))
    return TIMING_CHOICES[third]


def check_distinct_pitches(ex: Example) -> str:
    x = _events_only(ex.scene)
    pitches = np.sort([np.median(np.log2(pitch_track(x[a:b]))) for a, b in segments(x)])
    n = 1 + int(np.sum(np.diff(pitches) > 0.5 / 12))  # more than half a semitone apart
    return NUMBER_WORDS[n]


CHECKERS = {
    "count": check_count,
    "order": check_order,
    "pitch_direction": check_pitch_direction,
    "duration": check_duration,
    "loudness": check_loudness,
    "noise_type": check_noise_type,
    "rhythm": check_rhythm,
    "presence": check_presence,
    "timing": check_timing,
    "distinct_pitches": check_distinct_pitches,
}


def check_answer(family: str, ex: Example) -> str:
    """The answer text recomputed from `ex.question` and clean renders of `ex.scene`."""
    if family not in CHECKERS:
        raise ValueError(f"no checker for family {family!r}")
    return CHECKERS[family](ex)
