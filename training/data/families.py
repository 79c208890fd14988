"""Question families of the synthetic audio-QA benchmark.

Each family is a function `(rng, ctx) -> Example`: it lays out sound events, renders them over
the item's noise bed through a `SceneBuilder`, and phrases a question (one of several templates)
with its choices in a canonical order; `generate.py` shuffles the choices per item. `ctx.level`
in [0, 1] is the difficulty knob, mapped through `ramp` (quadratic): 0 keeps the family's cue
large and salient (two-octave glides, 24 dB level differences, 3x durations, widely spaced events,
28 dB band SNR), 1 brings it to the threshold of perception, where answers are genuinely
uncertain. Two-sound comparisons use fixed slots (first half / second half of the clip), so the
cue is where a small model can find it.

Families (in the spirit of DCASE 2025 Task 5 temporal/complex QA):
  count             how many beeps / noise bursts (1-4)
  order             which of 2-3 different sounds came first / last
  pitch_direction   is a glide or a run of beeps rising or falling
  duration          which of two sounds is longer (or shorter)
  loudness          which of two sounds is louder (or quieter)
  noise_type        white, pink or brown background noise
  rhythm            is a train of beeps / bursts regular or irregular
  presence          is a named sound (beep, chirp, noise burst, clicks, warble) present
  timing            is a named sound near the start, in the middle or near the end
  distinct_pitches  how many different pitches a run of beeps uses (1-4; optional)
  speech            which number word is spoken (optional; needs espeak-ng)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from training.data.scene import Bed, Event, Scene, SceneBuilder

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Sound kinds a question may name: kind -> (choice label, phrase with article, plural).
KINDS = ("beep", "chirp", "noise", "clicks", "warble")
KIND_TEXT = {
    "beep": ("beep", "a beep", "beeps"),
    "chirp": ("chirp", "a chirp", "chirps"),
    "noise": ("noise burst", "a burst of noise", "noise bursts"),
    "clicks": ("clicking", "a series of clicks", "click trains"),
    "warble": ("warbling tone", "a warbling tone", "warbling tones"),
}
DISTINCT_KINDS = ("beep", "noise", "clicks")  # easiest to tell apart
NOISE_CLASSES = ("white", "pink", "brown")  # spectral exponent 0, 1, 2
NOISE_CHOICES = ("white noise", "pink noise", "brown noise")


@dataclass(frozen=True)
class Context:
    """Per-item settings shared by all families."""

    level: float  # difficulty in [0, 1]
    snr_db: float  # base band SNR of events over the bed (shift already applied)
    timbre: str  # oscillator waveform of tonal events
    bed: Bed  # background bed (families may replace it, e.g. noise_type)
    shift: bool = False  # rendering for the shift split
    min_duration_s: float = 2.0
    max_duration_s: float = 6.0


@dataclass
class Example:
    """A rendered question before choice shuffling."""

    scene: Scene
    mix: np.ndarray  # (n,) float64 rendered clip
    question: str
    choices: tuple[str, ...]  # canonical order
    answer: str  # one of choices
    params: dict[str, float | str] = field(default_factory=dict)  # difficulty parameters


def ramp(easy: float, hard: float, level: float) -> float:
    """A difficulty knob's value at `level` in [0, 1]: quadratic, so the easy half of the range
    stays within the easiest quarter of the cue (salient) and only levels near 1 approach the
    perceptual threshold."""
    return easy + (hard - easy) * level**2


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**31 - 1))


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _template(rng: np.random.Generator, templates: tuple[str, ...], **fmt) -> tuple[str, int]:
    k = int(rng.integers(len(templates)))
    return templates[k].format(**fmt), k


def kind_duration(kind: str, rng: np.random.Generator) -> float:
    """A typical duration (s) of one event of `kind`."""
    lo, hi = {
        "beep": (0.2, 0.4),
        "chirp": (0.2, 0.35),
        "noise": (0.15, 0.35),
        "clicks": (0.3, 0.45),
        "warble": (0.35, 0.5),
    }[kind]
    return float(rng.uniform(lo, hi))


def make_event(
    kind: str, onset: float, duration: float, rng: np.random.Generator, ctx: Context, **over
) -> Event:
    """An event of `kind` with that kind's random parameters (overridable via `over`)."""
    params: dict = {"timbre": ctx.timbre, "seed": _seed(rng)}
    if kind == "beep":
        params["f0_hz"] = _log_uniform(rng, 400, 2000)
    elif kind == "chirp":
        lo = _log_uniform(rng, 300, 700)
        hi = lo * 2 ** rng.uniform(1.2, 2.0)
        params["f0_hz"], params["f1_hz"] = (lo, hi) if rng.random() < 0.5 else (hi, lo)
    elif kind == "warble":
        params["f0_hz"] = _log_uniform(rng, 500, 1400)
        params["rate_hz"] = float(rng.uniform(6, 9))
        params["depth"] = float(rng.uniform(0.12, 0.18))
    elif kind == "clicks":
        params["rate_hz"] = float(rng.uniform(20, 25))
    params.update(over)
    return Event(kind, onset_s=onset, duration_s=duration, **params)


def layout(
    rng: np.random.Generator, durations: list[float], gaps: list[float], ctx: Context
) -> tuple[list[float], float]:
    """Onsets of events played one after another (gap i between events i and i+1; negative gaps
    overlap) and the clip duration (margins of 0.15-0.5 s, at least ctx.min_duration_s)."""
    onsets = [float(rng.uniform(0.15, 0.5))]
    for dur, gap in zip(durations[:-1], gaps, strict=True):
        onsets.append(onsets[-1] + max(dur + gap, 0.08))  # onsets at least 80 ms apart
    end = max(o + d for o, d in zip(onsets, durations, strict=True))
    total = max(ctx.min_duration_s, end + float(rng.uniform(0.2, 0.5)))
    if total > ctx.max_duration_s:
        raise ValueError(f"layout needs {total:.2f} s > max_duration_s {ctx.max_duration_s}")
    return onsets, round(total, 3)


def slot_layout(
    rng: np.random.Generator,
    durations: list[float],
    spacing: float,
    ctx: Context,
    total: float | None = None,
) -> tuple[list[float], float]:
    """Onsets on a fixed grid (0.2 s + i * spacing, each nudged by up to 0.1 s), so "the first"
    and "the second" sound sit at stable places in the clip; spacing below the durations makes
    the sounds overlap (onsets stay at least spacing - 0.1 s apart). `total` fixes the clip length
    (default: last end + 0.2-0.5 s, at least ctx.min_duration_s)."""
    onsets = [0.2 + i * spacing + float(rng.uniform(0.0, 0.1)) for i in range(len(durations))]
    end = max(o + d for o, d in zip(onsets, durations, strict=True))
    if total is None:
        total = max(ctx.min_duration_s, end + float(rng.uniform(0.2, 0.5)))
    if end > total or total > ctx.max_duration_s:
        raise ValueError(f"slot layout ends at {end:.2f} s; clip {total:.2f} s")
    return onsets, round(total, 3)


def _peak(rng: np.random.Generator) -> float:
    return float(rng.uniform(0.5, 0.9))


# --------------------------------------------------------------------------------------------
# Families


def count(rng: np.random.Generator, ctx: Context) -> Example:
    """How many beeps / noise bursts; spacing, level spread and a distractor set difficulty."""
    d = ctx.level
    kind = str(rng.choice(["beep", "noise"]))
    n = int(rng.integers(1, 5))
    min_gap = ramp(0.35, 0.05, d)
    jitter_db = ramp(0.0, 8.0, d)
    f0 = _log_uniform(rng, 400, 1600)
    kinds = [kind] * n
    distractor = ""
    if d > 0.5 and rng.random() < 0.5:
        distractor = str(rng.choice(["clicks", "chirp", "warble"]))
        kinds.insert(int(rng.integers(0, n + 1)), distractor)
    durs = [kind_duration(k, rng) for k in kinds]
    gaps = [float(rng.uniform(min_gap, min_gap + 0.25)) for _ in kinds[1:]]
    onsets, total = layout(rng, durs, gaps, ctx)
    b = SceneBuilder(total, ctx.bed)
    for k, o, dur in zip(kinds, onsets, durs, strict=True):
        role = "target" if k == kind else "distractor"
        over = {"f0_hz": f0} if k == "beep" else {}
        snr = ctx.snr_db + float(rng.uniform(-jitter_db, 0.0))
        b.add(make_event(k, o, dur, rng, ctx, role=role, **over), snr_db=snr)
    scene, mix = b.finish(_peak(rng))
    pl = KIND_TEXT[kind][2]
    q, t = _template(
        rng,
        (
            "How many {pl} are there?",
            "How many {pl} can you hear?",
            "Count the {pl} in the clip. How many are there?",
            "How many times is a {sg} heard?",
        ),
        pl=pl,
        sg=KIND_TEXT[kind][0],
    )
    params = {
        "n_events": float(n),
        "min_gap_s": min_gap,
        "level_spread_db": jitter_db,
        "target_kind": kind,
        "distractor": distractor or "none",
        "template": float(t),
    }
    return Example(scene, mix, q, NUMBER_WORDS[1:5], NUMBER_WORDS[n], params)


def order(rng: np.random.Generator, ctx: Context) -> Example:
    """Which of 2-3 different sounds comes first / last; hard items overlap."""
    d = ctx.level
    # The easiest items contrast a tone with a noise burst; then clicks join, and from level 0.4
    # the confusable tonal kinds (chirp, warble); from 0.5 some items have a third sound.
    k = 3 if d >= 0.5 and rng.random() < 0.5 else 2
    pool = DISTINCT_KINDS[:2] if d < 0.2 else DISTINCT_KINDS if d < 0.4 else KINDS
    kinds = [str(x) for x in rng.choice(pool, size=k, replace=False)]
    durs = [kind_duration(x, rng) for x in kinds]
    spacing = ramp(1.3, 0.25, d)  # 1.3 s grid when easy; hard items overlap
    onsets, total = slot_layout(rng, durs, spacing, ctx)
    b = SceneBuilder(total, ctx.bed)
    for i, (x, o, dur) in enumerate(zip(kinds, onsets, durs, strict=True)):
        b.add(make_event(x, o, dur, rng, ctx, role=f"pos{i}"), snr_db=ctx.snr_db)
    scene, mix = b.finish(_peak(rng))
    ask = "first" if rng.random() < 0.5 else "last"
    templates = {
        "first": (
            "Which sound comes first?",
            "Which of these sounds is heard first?",
            "What is the earliest sound in the clip?",
        ),
        "last": (
            "Which sound comes last?",
            "Which of these sounds is heard last?",
            "What is the final sound to start in the clip?",
        ),
    }[ask]
    q, t = _template(rng, templates)
    choices = tuple(KIND_TEXT[x][0] for x in KINDS if x in kinds)
    answer = KIND_TEXT[kinds[0] if ask == "first" else kinds[-1]][0]
    params = {"n_events": float(k), "spacing_s": spacing, "ask": ask, "template": float(t)}
    return Example(scene, mix, q, choices, answer, params)


def pitch_direction(rng: np.random.Generator, ctx: Context) -> Example:
    """Rising or falling: one glide, or a run of 3-4 beeps; the pitch span sets difficulty."""
    d = ctx.level
    rising = rng.random() < 0.5
    span = ramp(24.0, 0.7, d) * float(rng.uniform(0.85, 1.15))  # semitones
    lo = _log_uniform(rng, 250, 2500 / 2 ** (span / 12))
    hi = lo * 2 ** (span / 12)
    f_start, f_end = (lo, hi) if rising else (hi, lo)
    variant = "glide" if rng.random() < 0.7 else "steps"
    if variant == "glide":
        dur = float(rng.uniform(0.8, 1.5))
        onsets, total = layout(rng, [dur], [], ctx)
        b = SceneBuilder(total, ctx.bed)
        ev = make_event(
            "glide", onsets[0], dur, rng, ctx, f0_hz=f_start, f1_hz=f_end, role="target"
        )
        b.add(ev, snr_db=ctx.snr_db)
    else:
        m = int(rng.integers(3, 5))
        freqs = f_start * (f_end / f_start) ** (np.arange(m) / (m - 1))
        dur = float(rng.uniform(0.15, 0.25))
        gaps = [float(rng.uniform(0.08, 0.15)) for _ in range(m - 1)]
        onsets, total = layout(rng, [dur] * m, gaps, ctx)
        b = SceneBuilder(total, ctx.bed)
        for f, o in zip(freqs, onsets, strict=True):
            b.add(
                make_event("beep", o, dur, rng, ctx, f0_hz=float(f), role="target"),
                snr_db=ctx.snr_db,
            )
    scene, mix = b.finish(_peak(rng))
    q, t = _template(
        rng,
        (
            "Is the pitch rising or falling?",
            "Does the pitch go up (rising) or down (falling)?",
            "How does the pitch change over time?",
            "Is the sequence of tones rising or falling in pitch?",
        ),
    )
    params = {"span_semitones": span, "variant": variant, "template": float(t)}
    return Example(scene, mix, q, ("rising", "falling"), "rising" if rising else "falling", params)


TWO_SLOT_SPACING_S = 1.45  # the second sound starts 1.45 s after the first
TWO_SLOT_CLIP_S = 3.2  # fixed clip length: the first sound in the first half, the second after


def _two_events(rng: np.random.Generator, ctx: Context, durs: list[float]):
    """Shared layout of `duration` and `loudness`: two same-kind sounds on fixed slots, so the
    comparison is between the clip's first and second half."""
    kind = str(rng.choice(["beep", "noise"]))
    clip = max(TWO_SLOT_CLIP_S, ctx.min_duration_s)
    onsets, total = slot_layout(rng, durs, TWO_SLOT_SPACING_S, ctx, clip)
    f0 = _log_uniform(rng, 400, 1600)
    over = {"f0_hz": f0} if kind == "beep" else {}
    return kind, onsets, total, over


def duration(rng: np.random.Generator, ctx: Context) -> Example:
    """Which of two sounds lasts longer (or shorter); the duration ratio sets difficulty."""
    d = ctx.level
    ratio = max(1.03, ramp(3.0, 1.05, d) * float(rng.uniform(0.9, 1.1)))
    short = float(rng.uniform(0.2, 0.35))
    first_longer = rng.random() < 0.5
    durs = [short * ratio, short] if first_longer else [short, short * ratio]
    kind, onsets, total, over = _two_events(rng, ctx, durs)
    b = SceneBuilder(total, ctx.bed)
    ev = b.add(
        make_event(kind, onsets[0], durs[0], rng, ctx, role="first", **over), snr_db=ctx.snr_db
    )
    # Same gain for both: the level must not hint at the duration.
    b.add(make_event(kind, onsets[1], durs[1], rng, ctx, role="second", gain=ev.gain, **over))
    scene, mix = b.finish(_peak(rng))
    sg, pl = KIND_TEXT[kind][0], KIND_TEXT[kind][2]
    templates = (
        ("Which {sg} lasts longer, the first or the second?", "longer"),
        ("Is the first or the second {sg} longer?", "longer"),
        ("Of the two {pl}, which one is longer?", "longer"),
        ("Which of the two {pl} is shorter?", "shorter"),
    )
    t = int(rng.integers(len(templates)))
    text, ask = templates[t]
    answer_first = first_longer if ask == "longer" else not first_longer
    params = {"ratio": ratio, "ask": ask, "target_kind": kind, "template": float(t)}
    return Example(
        scene,
        mix,
        text.format(sg=sg, pl=pl),
        ("the first", "the second"),
        "the first" if answer_first else "the second",
        params,
    )


def loudness(rng: np.random.Generator, ctx: Context) -> Example:
    """Which of two otherwise identical sounds is louder (or quieter); the level gap sets
    difficulty (24 dB easy, 0.5 dB at the threshold)."""
    d = ctx.level
    diff_db = ramp(24.0, 0.5, d) * float(rng.uniform(0.85, 1.15))
    dur = float(rng.uniform(0.3, 0.5))
    first_louder = rng.random() < 0.5
    kind, onsets, total, over = _two_events(rng, ctx, [dur, dur])
    b = SceneBuilder(total, ctx.bed)
    # The louder one sits at the item SNR; the other is exactly diff_db below it.
    loud_at = 0 if first_louder else 1
    loud = make_event(kind, onsets[loud_at], dur, rng, ctx, role="louder", **over)
    loud = dataclasses.replace(loud, gain=b.gain_for(loud, ctx.snr_db))
    quiet = make_event(
        kind,
        onsets[1 - loud_at],
        dur,
        rng,
        ctx,
        role="quieter",
        gain=loud.gain * 10 ** (-diff_db / 20),
        **over,
    )
    for ev in sorted([loud, quiet], key=lambda e: e.onset_s):
        b.add(ev)
    scene, mix = b.finish(_peak(rng))
    sg, pl = KIND_TEXT[kind][0], KIND_TEXT[kind][2]
    templates = (
        ("Which {sg} is louder, the first or the second?", "louder"),
        ("Is the first or the second {sg} louder?", "louder"),
        ("Of the two {pl}, which one is louder?", "louder"),
        ("Which of the two {pl} is quieter?", "quieter"),
    )
    t = int(rng.integers(len(templates)))
    text, ask = templates[t]
    answer_first = first_louder if ask == "louder" else not first_louder
    params = {"level_diff_db": diff_db, "ask": ask, "target_kind": kind, "template": float(t)}
    return Example(
        scene,
        mix,
        text.format(sg=sg, pl=pl),
        ("the first", "the second"),
        "the first" if answer_first else "the second",
        params,
    )


def noise_type(rng: np.random.Generator, ctx: Context) -> Example:
    """White / pink / brown background; the spectral exponent's jitter sets difficulty."""
    d = ctx.level
    cls = int(rng.integers(3))
    spread = ramp(0.08, 0.55, d) + (0.15 if ctx.shift else 0.0)
    alpha = cls + float(rng.uniform(-spread, spread))
    total = round(float(rng.uniform(max(2.0, ctx.min_duration_s), 4.0)), 3)
    bed = Bed(NOISE_CLASSES[cls], alpha=alpha, seed=_seed(rng))
    b = SceneBuilder(total, bed)
    n_beeps = int(rng.integers(0, 3))  # distractors, unrelated to the answer
    for i in range(n_beeps):
        slot = total / max(n_beeps, 1)
        dur = kind_duration("beep", rng)
        onset = i * slot + float(rng.uniform(0.05, max(0.06, slot - dur - 0.05)))
        b.add(make_event("beep", onset, dur, rng, ctx, role="distractor"), snr_db=ctx.snr_db)
    scene, mix = b.finish(_peak(rng))
    q, t = _template(
        rng,
        (
            "What kind of background noise is this?",
            "Which noise colour best describes the background?",
            "The background hiss is best described as which type of noise?",
        ),
    )
    params = {
        "alpha": alpha,
        "alpha_spread": spread,
        "noise": NOISE_CLASSES[cls],
        "template": float(t),
    }
    return Example(scene, mix, q, NOISE_CHOICES, NOISE_CHOICES[cls], params)


def rhythm(rng: np.random.Generator, ctx: Context) -> Example:
    """Regular or irregular train of short beeps / bursts; timing jitter sets difficulty."""
    d = ctx.level
    kind = str(rng.choice(["beep", "noise"]))
    n = int(rng.integers(5, 9))
    base = float(rng.uniform(0.35, 0.45))
    regular = rng.random() < 0.5
    # Easy irregular trains mix intervals of about 0.45x and 1.55x the beat: every short one is
    # shorter than any regular interval, a local cue.
    jitter = 0.0 if regular else ramp(0.55, 0.05, d)
    signs = np.array([1.0, -1.0] * n)[: n - 1]
    rng.shuffle(signs)  # both directions present: irregular trains never drift uniformly
    iois = base * (1 + jitter * signs * rng.uniform(0.8, 1.0, n - 1))
    dur = float(rng.uniform(0.05, 0.08))
    gaps = [float(x) - dur for x in iois]
    onsets, total = layout(rng, [dur] * n, gaps, ctx)
    b = SceneBuilder(total, ctx.bed)
    f0 = _log_uniform(rng, 500, 1600)
    over = {"f0_hz": f0} if kind == "beep" else {}
    first = b.add(
        make_event(kind, onsets[0], dur, rng, ctx, role="target", **over), snr_db=ctx.snr_db
    )
    for o in onsets[1:]:
        b.add(make_event(kind, o, dur, rng, ctx, role="target", gain=first.gain, **over))
    scene, mix = b.finish(_peak(rng))
    pl = KIND_TEXT[kind][2]
    q, t = _template(
        rng,
        (
            "Is the rhythm regular or irregular?",
            "Is the timing of the {pl} regular or irregular?",
            "Do the {pl} follow a steady (regular) or uneven (irregular) beat?",
        ),
        pl=pl,
    )
    params = {
        "jitter": jitter,
        "n_events": float(n),
        "ioi_s": base,
        "target_kind": kind,
        "template": float(t),
    }
    return Example(
        scene, mix, q, ("regular", "irregular"), "regular" if regular else "irregular", params
    )


def presence(rng: np.random.Generator, ctx: Context) -> Example:
    """Is a named sound present among 1-3 others; target SNR and spacing set difficulty."""
    d = ctx.level
    target = str(rng.choice(KINDS))
    present = rng.random() < 0.5
    others = [x for x in KINDS if x != target]
    n_other = 1 + int(rng.random() < 0.5) + int(d > 0.5)
    kinds = [str(x) for x in rng.choice(others, size=n_other, replace=True)]
    if present:
        kinds.insert(int(rng.integers(0, len(kinds) + 1)), target)
    durs = [kind_duration(x, rng) for x in kinds]
    min_gap = ramp(0.3, 0.05, d)
    gaps = [float(rng.uniform(min_gap, min_gap + 0.3)) for _ in kinds[1:]]
    onsets, total = layout(rng, durs, gaps, ctx)
    b = SceneBuilder(total, ctx.bed)
    target_snr = ctx.snr_db - ramp(0.0, 6.0, d)
    for x, o, dur in zip(kinds, onsets, durs, strict=True):
        is_t = x == target
        b.add(
            make_event(x, o, dur, rng, ctx, role="target" if is_t else "distractor"),
            snr_db=target_snr if is_t else ctx.snr_db,
        )
    scene, mix = b.finish(_peak(rng))
    phrase = KIND_TEXT[target][1]
    q, t = _template(
        rng,
        ("Is there {p} in the recording?", "Can you hear {p}?", "Does the clip contain {p}?"),
        p=phrase,
    )
    params = {
        "target_kind": target,
        "target_snr_db": target_snr,
        "n_events": float(len(kinds)),
        "template": float(t),
    }
    return Example(scene, mix, q, ("yes", "no"), "yes" if present else "no", params)


TIMING_CLIP_S = 4.5  # clip length of the timing family (thirds of 1.5 s)
TIMING_CHOICES = ("near the start", "in the middle", "near the end")


def timing(rng: np.random.Generator, ctx: Context) -> Example:
    """When a named sound occurs: which third of the clip holds its midpoint. Easy sounds sit at
    a third's centre; hard ones approach a border, at low SNR, with a distractor elsewhere."""
    d = ctx.level
    total = max(TIMING_CLIP_S, ctx.min_duration_s)
    width = total / 3
    kind = str(rng.choice(KINDS))
    dur = kind_duration(kind, rng)
    third = int(rng.integers(3))
    reach = ramp(0.08, 0.45, d) * width  # largest offset of the midpoint from the third's centre
    mid = width * (third + 0.5) + float(rng.uniform(-reach, reach))
    mid = min(max(mid, dur / 2 + 0.05), total - dur / 2 - 0.05)
    b = SceneBuilder(round(total, 3), ctx.bed)
    events = [(kind, mid - dur / 2, dur, "target")]
    if d > 0.5 and rng.random() < 0.5:
        other = str(rng.choice([k for k in KINDS if k != kind]))
        o_third = int(rng.choice([i for i in range(3) if i != third]))
        o_dur = kind_duration(other, rng)
        o_mid = width * (o_third + 0.5) + float(rng.uniform(-0.15, 0.15)) * width
        events.append((other, o_mid - o_dur / 2, o_dur, "distractor"))
    for k, onset, du, role in sorted(events, key=lambda e: e[1]):
        b.add(make_event(k, onset, du, rng, ctx, role=role), snr_db=ctx.snr_db)
    scene, mix = b.finish(_peak(rng))
    q, t = _template(
        rng,
        (
            "When is {p} heard?",
            "When does {p} occur in the clip?",
            "Is {p} heard near the start, in the middle or near the end?",
            "At what point in the recording do you hear {p}?",
        ),
        p=KIND_TEXT[kind][1],
    )
    params = {
        "target_kind": kind,
        "offset_frac": abs(mid / width - third - 0.5),
        "n_events": float(len(events)),
        "template": float(t),
    }
    return Example(scene, mix, q, TIMING_CHOICES, TIMING_CHOICES[third], params)


def distinct_pitches(rng: np.random.Generator, ctx: Context) -> Example:
    """How many different pitches a run of 4-6 beeps uses (1-4); pitch spacing sets difficulty
    (6 semitones easy, under one semitone at the threshold)."""
    d = ctx.level
    k = int(rng.integers(1, 5))
    n = int(rng.integers(max(k, 4), 7))
    spacing = ramp(6.0, 0.8, d) * float(rng.uniform(0.9, 1.1))  # semitones
    positions = np.sort(rng.choice(5, size=k, replace=False))
    base = _log_uniform(rng, 300, 450)
    pitches = base * 2 ** (positions * spacing / 12)
    seq = list(range(k)) + [int(x) for x in rng.integers(0, k, n - k)]
    rng.shuffle(seq)
    dur = float(rng.uniform(0.18, 0.26))
    gaps = [float(rng.uniform(0.12, 0.25)) for _ in range(n - 1)]
    onsets, total = layout(rng, [dur] * n, gaps, ctx)
    b = SceneBuilder(total, ctx.bed)
    jitter_db = ramp(0.0, 6.0, d)
    for i, o in zip(seq, onsets, strict=True):
        ev = make_event("beep", o, dur, rng, ctx, f0_hz=float(pitches[i]), role="target")
        b.add(ev, snr_db=ctx.snr_db - float(rng.uniform(0, jitter_db)))
    scene, mix = b.finish(_peak(rng))
    q, t = _template(
        rng,
        (
            "How many different pitches are played?",
            "How many distinct notes can be heard?",
            "The beeps use how many different pitches?",
        ),
    )
    params = {
        "n_pitches": float(k),
        "n_events": float(n),
        "spacing_semitones": spacing,
        "template": float(t),
    }
    return Example(scene, mix, q, NUMBER_WORDS[1:5], NUMBER_WORDS[k], params)


def speech(rng: np.random.Generator, ctx: Context) -> Example:
    """Which number word is spoken (needs espeak-ng); SNR sets difficulty."""
    from training.data.speech import synthesize

    word_i = int(rng.integers(1, 10))
    others = [i for i in range(1, 10) if i != word_i]
    options = sorted([word_i, *(int(x) for x in rng.choice(others, size=3, replace=False))])
    seed = _seed(rng)
    dur = len(synthesize(NUMBER_WORDS[word_i], None, seed)) / 16_000
    onsets, total = layout(rng, [dur], [], ctx)
    b = SceneBuilder(total, ctx.bed)
    ev = Event("speech", onsets[0], dur, seed=seed, role="target", text=NUMBER_WORDS[word_i])
    b.add(ev, snr_db=ctx.snr_db)
    scene, mix = b.finish(_peak(rng))
    q, t = _template(rng, ("Which number is spoken?", "What number does the voice say?"))
    return Example(
        scene,
        mix,
        q,
        tuple(NUMBER_WORDS[i] for i in options),
        NUMBER_WORDS[word_i],
        {"template": float(t)},
    )


FamilyFn = Callable[[np.random.Generator, Context], Example]

FAMILIES: dict[str, FamilyFn] = {
    "count": count,
    "order": order,
    "pitch_direction": pitch_direction,
    "duration": duration,
    "loudness": loudness,
    "noise_type": noise_type,
    "rhythm": rhythm,
    "presence": presence,
    "timing": timing,
    "distinct_pitches": distinct_pitches,
    "speech": speech,
}
# distinct_pitches is optional: counting spectral peaks proved hard for a tiny model trained
# from scratch on a few thousand clips (near chance), so the default set leaves it out.
DEFAULT_FAMILIES = tuple(f for f in FAMILIES if f not in ("speech", "distinct_pitches"))
