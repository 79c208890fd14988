"""Question families over real recordings (the library of `sources.py`).

Each family is a function `(rng, ctx, pool) -> Example` like those of `families.py`, where `pool`
holds the recordings the item's split may use (`Library.for_split`): a split never reaches a
recording of another pool. Events are `Event("recording", source=<decoded WAV>)` placed over the
item's bed by the same band-SNR rule; labels come from the index (file names, catalogue titles,
sound-font programs) and are correct by construction; `real_checks.py` re-derives every answer
from the audio by identifying which indexed recordings are audible.

Families:
  sound_class      which sound is this (3-4 class labels; distractors never share a word or a
                   kin with the answer: no "hen" against "rooster", "guitar" vs "electric guitar")
  source_kind      what kind of source: an animal, a machine, a musical instrument or a voice
  speech_presence  is there speech (a voice recording, alone or with another sound), yes / no
  spoken_number    which number word a recorded or synthesised voice says (4 choices)
  count_real       how many times a named real sound is heard (1-4)
  loudness_real    which of two plays of a real sound is louder (or quieter)
  pitch_real       do 3-4 notes of a sampled instrument rise or fall
  order_real       which of 2-3 different real sounds comes first / last
  presence_real    is a named real sound among 1-3 others, yes / no
  timing_real      is a named real sound near the start, in the middle or near the end
  duration_real    which of two held notes of a sampled instrument lasts longer (or shorter)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from training.data.families import (
    NUMBER_WORDS,
    TIMING_CHOICES,
    TIMING_CLIP_S,
    TWO_SLOT_CLIP_S,
    TWO_SLOT_SPACING_S,
    Context,
    Example,
    _peak,
    _template,
    layout,
    ramp,
    slot_layout,
)
from training.data.scene import Event, SceneBuilder, load_recording
from training.data.sources import Library, Recording

KIND_CHOICES = {
    "animal": "an animal",
    "machine": "a machine or vehicle",
    "instrument": "a musical instrument",
    "voice": "a voice",
}
NAMEABLE = ("animal", "machine", "instrument")  # categories whose labels a question may offer
EVENT_MAX_S = 2.5  # a real event is cut to at most this long
COUNT_EVENT_MAX_S = 0.6  # counted / compared plays are short, so they never touch


@dataclass(frozen=True)
class Pool:
    """The recordings one split may use, and where their decoded WAVs are."""

    library: Library
    recordings: tuple[Recording, ...]

    @classmethod
    def for_split(cls, library: Library, split: str) -> Pool:
        return cls(library, library.for_split(split))

    def of(self, *categories: str) -> list[Recording]:
        return [r for r in self.recordings if r.category in categories]

    @cached_property
    def distractors(self) -> dict[str, list[str]]:
        """{recording key: compatible distractor labels} for the nameable recordings."""
        return {r.key: compatible_distractors(r, self.recordings) for r in self.of(*NAMEABLE)}

    @cached_property
    def sustained(self) -> list[Recording]:
        """Instrument notes that hold their level for their first second (organ, strings, wind;
        not a decaying piano): cut short, such a note sounds exactly as long as it is cut."""
        out = []
        for r in self.of("instrument"):
            if r.note < 0 or r.duration_s < 1.0:
                continue
            x = load_recording(self.library.path(r))[:16_000]
            env = np.sqrt((x[: 100 * 160].reshape(100, 160) ** 2).mean(axis=1))  # 10 ms frames
            if env[5:].min() > env.max() * 10 ** (-12 / 20):
                out.append(r)
        return out

    @cached_property
    def short(self) -> list[Recording]:
        """Nameable recordings whose first COUNT_EVENT_MAX_S is one compact sound (no dip that
        could be heard as two plays), for counting and comparing plays."""
        return [
            r
            for r in self.of(*NAMEABLE)
            if r.duration_s >= 0.2 and compact(load_recording(self.library.path(r)))
        ]

    def speech(self) -> list[Recording]:
        """Voice recordings that carry words (not a crowd's murmur)."""
        return [r for r in self.of("voice") if r.label != "crowd"]

    def numbers(self) -> list[Recording]:
        return [r for r in self.of("voice") if r.label in NUMBER_WORDS]

    def notes(self) -> dict[str, list[Recording]]:
        """{program group: its notes sorted by pitch}, for programs with >= 3 notes."""
        out: dict[str, list[Recording]] = {}
        for r in self.of("instrument"):
            if r.note >= 0:
                out.setdefault(r.group, []).append(r)
        return {g: sorted(v, key=lambda r: r.note) for g, v in out.items() if len(v) >= 3}


def _pick(rng: np.random.Generator, recs: list[Recording]) -> Recording:
    """A category uniformly, then a group (a stamp, a program, an original recording) uniformly,
    then one of its recordings: 216 notes of a sound font do not outweigh 40 effects."""
    if not recs:
        raise ValueError("no recording available for this family in this split")
    tree: dict[str, dict[str, list[Recording]]] = {}
    for r in recs:
        tree.setdefault(r.category, {}).setdefault(r.group, []).append(r)
    cats = sorted(tree)
    groups = tree[cats[int(rng.integers(len(cats)))]]
    names = sorted(groups)
    members = groups[names[int(rng.integers(len(names)))]]
    return members[int(rng.integers(len(members)))]


def _event(rec: Recording, pool: Pool, onset: float, dur: float, role: str, **kw) -> Event:
    return Event(
        "recording",
        onset_s=onset,
        duration_s=round(dur, 4),
        source=pool.library.path(rec),
        role=role,
        **kw,
    )


def _equal_level(b: SceneBuilder, events: list[Event], snr_db: float) -> None:
    """Add `events` to the scene at one level: the first at `snr_db`, the rest at its gain (so a
    question about them never hinges on a level the builder chose per event)."""
    first = b.add(events[0], snr_db=snr_db)
    for ev in events[1:]:
        b.add(dataclasses.replace(ev, gain=first.gain))


def _dur(rec: Recording, cap: float) -> float:
    return min(rec.duration_s, cap)


def _params(recs: list[Recording], **extra) -> dict[str, float | str]:
    """Difficulty parameters every real item records: its recordings and their packages."""
    return {
        "recordings": "|".join(r.key for r in recs),
        "packages": "|".join(sorted({r.package for r in recs})),
        **extra,
    }


def compatible_distractors(answer: Recording, recs: list[Recording]) -> list[str]:
    """Labels that can stand against `answer`: nameable, another label sharing no word, of
    another kin. Sorted, de-duplicated."""
    words = set(answer.label.split())
    out = set()
    for r in recs:
        if r.category not in NAMEABLE or r.label == answer.label or r.kin == answer.kin:
            continue
        if words & set(r.label.split()):
            continue
        out.add(r.label)
    # Labels that share a kin with the answer under another recording are excluded too.
    kin_labels = {r.label for r in recs if r.kin == answer.kin}
    return sorted(out - kin_labels)


def _single(rng, ctx: Context, pool: Pool, rec: Recording, others: list[Recording] = ()):
    """One recording (and optionally others after it) laid out over the item's bed."""
    recs = [rec, *others]
    gaps = [float(rng.uniform(0.3, 0.6)) for _ in recs[1:]]
    # layout's margins take up to 1 s: what is left is shared by the recordings
    cap = min(EVENT_MAX_S, (ctx.max_duration_s - 1.0 - sum(gaps)) / len(recs))
    durs = [_dur(r, cap) for r in recs]
    onsets, total = layout(rng, durs, gaps, ctx)
    b = SceneBuilder(total, ctx.bed)
    for i, (r, o, d) in enumerate(zip(recs, onsets, durs, strict=True)):
        b.add(_event(r, pool, o, d, "target" if i == 0 else "other"), snr_db=ctx.snr_db)
    return b.finish(_peak(rng))


def sound_class(rng: np.random.Generator, ctx: Context, pool: Pool) -> Example:
    """Which sound is this: the answer's label against 2-3 compatible distractor labels."""
    cands = [r for r in pool.of(*NAMEABLE) if len(pool.distractors[r.key]) >= 2]
    rec = _pick(rng, cands)
    labels = pool.distractors[rec.key]
    k = min(len(labels), 2 if ctx.level < 0.5 else 3)
    picked = [str(x) for x in rng.choice(labels, size=k, replace=False)]
    scene, mix = _single(rng, ctx, pool, rec)
    q, t = _template(
        rng,
        (
            "What is this sound?",
            "Which of these best describes the sound?",
            "What can be heard in this clip?",
            "What makes the sound in this recording?",
        ),
    )
    choices = tuple(sorted([rec.label, *picked]))
    return Example(scene, mix, q, choices, rec.label, _params([rec], template=float(t)))


def source_kind(rng: np.random.Generator, ctx: Context, pool: Pool) -> Example:
    """What kind of source: one recording of a category drawn uniformly among those present."""
    present = [c for c in KIND_CHOICES if (pool.speech() if c == "voice" else pool.of(c))]
    if len(present) < 2:
        raise ValueError("source_kind needs recordings of at least two categories")
    cat = present[int(rng.integers(len(present)))]
    rec = _pick(rng, pool.speech() if cat == "voice" else pool.of(cat))
    scene, mix = _single(rng, ctx, pool, rec)
    q, t = _template(
        rng,
        (
            "What kind of source makes this sound?",
            "What produces the sound in this clip?",
            "Is this sound made by an animal, a machine, an instrument or a voice?",
        ),
    )
    choices = tuple(KIND_CHOICES[c] for c in KIND_CHOICES)
    return Example(
        scene, mix, q, choices, KIND_CHOICES[cat], _params([rec], kind=cat, template=float(t))
    )


def speech_presence(rng: np.random.Generator, ctx: Context, pool: Pool) -> Example:
    """Is there speech: a voice recording (maybe with another sound) or only other sounds."""
    present = rng.random() < 0.5
    others = pool.of(*NAMEABLE)
    recs = [_pick(rng, pool.speech())] if present else [_pick(rng, others)]
    if rng.random() < 0.5:  # a second, non-speech sound: speech is not just "anything audible"
        recs.append(_pick(rng, others))
        if rng.random() < 0.5:
            recs.reverse()
    scene, mix = _single(rng, ctx, pool, recs[0], recs[1:])
    q, t = _template(
        rng,
        (
            "Is there speech in this clip?",
            "Does anyone speak in the recording?",
            "Can you hear a voice saying words?",
        ),
    )
    answer = "yes" if present else "no"
    return Example(scene, mix, q, ("yes", "no"), answer, _params(recs, template=float(t)))


def spoken_number(rng: np.random.Generator, ctx: Context, pool: Pool) -> Example:
    """Which number word is spoken, by a recorded or synthesised voice; 4 choices."""
    rec = _pick(rng, pool.numbers())
    word_i = NUMBER_WORDS.index(rec.label)
    others = [i for i in range(10) if i != word_i]
    options = sorted([word_i, *(int(x) for x in rng.choice(others, size=3, replace=False))])
    scene, mix = _single(rng, ctx, pool, rec)
    q, t = _template(rng, ("Which number is spoken?", "What number does the voice say?"))
    return Example(
        scene,
        mix,
        q,
        tuple(NUMBER_WORDS[i] for i in options),
        rec.label,
        _params([rec], template=float(t)),
    )


def compact(x: np.ndarray, cap_s: float = COUNT_EVENT_MAX_S) -> bool:
    """True when the first `cap_s` of x is one run of 10 ms frames at each of several levels
    below its loudest frame (no internal gap longer than one frame)."""
    hop = 160
    x = x[: round(cap_s * 16_000)]
    n = len(x) // hop
    if n < 3:
        return False
    energy = (x[: n * hop].reshape(n, hop) ** 2).sum(axis=1)
    for db in (-35.0, -28.0, -21.0, -14.0):
        on = np.flatnonzero(energy > energy.max() * 10 ** (db / 10))
        if np.any(np.diff(on) > 2):
            return False
    return True


def _short(pool: Pool) -> list[Recording]:
    return pool.short


def count_real(rng: np.random.Generator, ctx: Context, pool: Pool) -> Example:
    """How many times a named real sound plays (1-4); plays 0.35 s or more apart."""
    d = ctx.level
    rec = _pick(rng, _short(pool))
    n = int(rng.integers(1, 5))
    dur = _dur(rec, COUNT_EVENT_MAX_S)
    gaps = [float(rng.uniform(ramp(0.6, 0.35, d), ramp(0.8, 0.5, d))) for _ in range(n - 1)]
    onsets, total = layout(rng, [dur] * n, gaps, ctx)
    b = SceneBuilder(total, ctx.bed)
    _equal_level(b, [_event(rec, pool, o, dur, "target") for o in onsets], ctx.snr_db)
    scene, mix = b.finish(_peak(rng))
    q, t = _template(
        rng,
        (
            "How many times is the {lab} sound heard?",
            "How many times can you hear the {lab}?",
            "Count the {lab} sounds. How many are there?",
        ),
        lab=rec.label,
    )
    params = _params([rec], n_events=float(n), template=float(t))
    return Example(scene, mix, q, NUMBER_WORDS[1:5], NUMBER_WORDS[n], params)


def _first_or_second(
    rng: np.random.Generator,
    scene,
    mix: np.ndarray,
    templates: tuple[tuple[str, bool], ...],
    label: str,
    first_is_more: bool,
    params: dict,
) -> Example:
    """A "the first / the second" question: a template (text, asks for the "more" side: louder,
    longer) phrased about `label`; the answer follows which play has more."""
    t = int(rng.integers(len(templates)))
    text, asks_more = templates[t]
    answer_first = first_is_more if asks_more else not first_is_more
    params = {**params, "ask": "more" if asks_more else "less", "template": float(t)}
    return Example(
        scene,
        mix,
        text.format(lab=label),
        ("the first", "the second"),
        "the first" if answer_first else "the second",
        params,
    )


def loudness_real(rng: np.random.Generator, ctx: Context, pool: Pool) -> Example:
    """Which of two plays of the same real sound is louder (20 dB easy, 1 dB at the hardest)."""
    d = ctx.level
    rec = _pick(rng, _short(pool))
    diff_db = ramp(20.0, 1.0, d) * float(rng.uniform(0.85, 1.15))
    dur = _dur(rec, COUNT_EVENT_MAX_S)  # the part `compact` vouches for
    first_louder = rng.random() < 0.5
    clip = max(TWO_SLOT_CLIP_S, ctx.min_duration_s)
    onsets, total = slot_layout(rng, [dur, dur], TWO_SLOT_SPACING_S, ctx, clip)
    b = SceneBuilder(total, ctx.bed)
    loud_at = 0 if first_louder else 1
    loud = _event(rec, pool, onsets[loud_at], dur, "louder")
    loud = dataclasses.replace(loud, gain=b.gain_for(loud, ctx.snr_db))
    quiet = _event(
        rec, pool, onsets[1 - loud_at], dur, "quieter", gain=loud.gain * 10 ** (-diff_db / 20)
    )
    for ev in sorted([loud, quiet], key=lambda e: e.onset_s):
        b.add(ev)
    scene, mix = b.finish(_peak(rng))
    templates = (
        ("Which {lab} sound is louder, the first or the second?", True),
        ("Is the first or the second {lab} louder?", True),
        ("Which of the two {lab} sounds is quieter?", False),
    )
    params = _params([rec], level_diff_db=diff_db)
    return _first_or_second(rng, scene, mix, templates, rec.label, first_louder, params)


def pitch_real(rng: np.random.Generator, ctx: Context, pool: Pool) -> Example:
    """Rising or falling run of 3-4 notes of one sampled instrument (steps of 3-4 semitones)."""
    programs = pool.notes()
    if not programs:
        raise ValueError("pitch_real needs sound-font notes in this split")
    names = sorted(programs)
    notes = programs[names[int(rng.integers(len(names)))]]
    m = min(len(notes), int(rng.integers(3, 5)))
    start = int(rng.integers(len(notes) - m + 1))
    run = notes[start : start + m]
    rising = rng.random() < 0.5
    if not rising:
        run = run[::-1]
    dur = float(rng.uniform(0.35, 0.5))
    gaps = [float(rng.uniform(0.12, 0.2)) for _ in range(m - 1)]
    onsets, total = layout(rng, [dur] * m, gaps, ctx)
    b = SceneBuilder(total, ctx.bed)
    notes = [_event(r, pool, o, dur, "target") for r, o in zip(run, onsets, strict=True)]
    _equal_level(b, notes, ctx.snr_db)
    scene, mix = b.finish(_peak(rng))
    q, t = _template(
        rng,
        (
            "Does the {lab} play a rising or a falling run of notes?",
            "Is the melody rising or falling in pitch?",
            "Do the notes go up (rising) or down (falling)?",
        ),
        lab=run[0].label,
    )
    span = abs(run[-1].note - run[0].note)
    params = _params(run, span_semitones=float(span), n_events=float(m), template=float(t))
    return Example(scene, mix, q, ("rising", "falling"), "rising" if rising else "falling", params)


def _distinct(rng: np.random.Generator, pool: Pool, k: int, recs: list[Recording]):
    """k recordings of k different labels, no two of one kin or sharing a word (each play can
    be named without doubt)."""
    out: list[Recording] = []
    for _ in range(60):
        if len(out) == k:
            break
        r = _pick(rng, recs)
        if all(r.kin != o.kin and not set(r.label.split()) & set(o.label.split()) for o in out):
            out.append(r)
    if len(out) < k:
        raise ValueError(f"could not draw {k} distinct sounds from this split")
    return out


def order_real(rng: np.random.Generator, ctx: Context, pool: Pool) -> Example:
    """Which of 2-3 different real sounds comes first / last; plays on a grid, never touching."""
    k = 3 if ctx.level >= 0.5 and rng.random() < 0.5 else 2
    recs = _distinct(rng, pool, k, _short(pool))
    durs = [_dur(r, COUNT_EVENT_MAX_S) for r in recs]
    spacing = ramp(1.3, 0.9, ctx.level)
    onsets, total = slot_layout(rng, durs, spacing, ctx)
    b = SceneBuilder(total, ctx.bed)
    for i, (r, o, d) in enumerate(zip(recs, onsets, durs, strict=True)):
        b.add(_event(r, pool, o, d, f"pos{i}"), snr_db=ctx.snr_db)
    scene, mix = b.finish(_peak(rng))
    ask = "first" if rng.random() < 0.5 else "last"
    q, t = _template(
        rng,
        (f"Which sound comes {ask}?", f"Which of these sounds is heard {ask}?"),
    )
    answer = recs[0].label if ask == "first" else recs[-1].label
    choices = tuple(sorted(r.label for r in recs))
    return Example(scene, mix, q, choices, answer, _params(recs, ask=ask, template=float(t)))


def presence_real(rng: np.random.Generator, ctx: Context, pool: Pool) -> Example:
    """Is a named real sound present among 1-3 other, distinct sounds."""
    present = rng.random() < 0.5
    n_other = 1 + int(rng.random() < 0.5) + int(ctx.level > 0.5)
    drawn = _distinct(rng, pool, n_other + 1, _short(pool))
    target, others = drawn[0], drawn[1:]
    recs = list(others)
    if present:
        recs.insert(int(rng.integers(0, len(recs) + 1)), target)
    durs = [_dur(r, COUNT_EVENT_MAX_S) for r in recs]
    gaps = [float(rng.uniform(0.35, 0.6)) for _ in recs[1:]]
    onsets, total = layout(rng, durs, gaps, ctx)
    b = SceneBuilder(total, ctx.bed)
    for r, o, d in zip(recs, onsets, durs, strict=True):
        b.add(_event(r, pool, o, d, "target" if r is target else "other"), snr_db=ctx.snr_db)
    scene, mix = b.finish(_peak(rng))
    q, t = _template(
        rng,
        (
            "Is there a {lab} sound in the recording?",
            "Can you hear a {lab}?",
            "Does the clip contain the sound of a {lab}?",
        ),
        lab=target.label,
    )
    answer = "yes" if present else "no"
    return Example(scene, mix, q, ("yes", "no"), answer, _params(recs, template=float(t)))


def timing_real(rng: np.random.Generator, ctx: Context, pool: Pool) -> Example:
    """When a named real sound plays: which third of the clip holds its midpoint."""
    total = max(TIMING_CLIP_S, ctx.min_duration_s)
    width = total / 3
    rec = _pick(rng, _short(pool))
    dur = _dur(rec, COUNT_EVENT_MAX_S)
    third = int(rng.integers(3))
    reach = ramp(0.08, 0.35, ctx.level) * width
    mid = width * (third + 0.5) + float(rng.uniform(-reach, reach))
    mid = min(max(mid, dur / 2 + 0.05), total - dur / 2 - 0.05)
    b = SceneBuilder(round(total, 3), ctx.bed)
    b.add(_event(rec, pool, mid - dur / 2, dur, "target"), snr_db=ctx.snr_db)
    scene, mix = b.finish(_peak(rng))
    q, t = _template(
        rng,
        (
            "When is the {lab} heard?",
            "Is the {lab} heard near the start, in the middle or near the end?",
            "At what point in the recording do you hear the {lab}?",
        ),
        lab=rec.label,
    )
    params = _params([rec], offset_frac=abs(mid / width - third - 0.5), template=float(t))
    return Example(scene, mix, q, TIMING_CHOICES, TIMING_CHOICES[third], params)


def duration_real(rng: np.random.Generator, ctx: Context, pool: Pool) -> Example:
    """Which of two held notes of one sampled instrument lasts longer (or shorter); the length
    ratio sets difficulty (3x easy, 1.15x at the hardest); both at the same gain."""
    rec = _pick(rng, pool.sustained)
    ratio = max(1.1, ramp(3.0, 1.15, ctx.level) * float(rng.uniform(0.95, 1.05)))
    short = float(rng.uniform(0.3, 1.0 / ratio))
    first_longer = rng.random() < 0.5
    durs = [short * ratio, short] if first_longer else [short, short * ratio]
    clip = max(TWO_SLOT_CLIP_S, ctx.min_duration_s)
    onsets, total = slot_layout(rng, durs, TWO_SLOT_SPACING_S, ctx, clip)
    b = SceneBuilder(total, ctx.bed)
    plays = [
        _event(rec, pool, onsets[i], durs[i], role) for i, role in enumerate(("first", "second"))
    ]
    _equal_level(b, plays, ctx.snr_db)
    scene, mix = b.finish(_peak(rng))
    templates = (
        ("Which {lab} note lasts longer, the first or the second?", True),
        ("Is the first or the second {lab} note longer?", True),
        ("Which of the two {lab} notes is shorter?", False),
    )
    params = _params([rec], ratio=ratio)
    return _first_or_second(rng, scene, mix, templates, rec.label, first_longer, params)


RealFamilyFn = Callable[[np.random.Generator, Context, Pool], Example]

REAL_FAMILIES: dict[str, RealFamilyFn] = {
    "sound_class": sound_class,
    "source_kind": source_kind,
    "speech_presence": speech_presence,
    "spoken_number": spoken_number,
    "count_real": count_real,
    "loudness_real": loudness_real,
    "pitch_real": pitch_real,
    "order_real": order_real,
    "presence_real": presence_real,
    "timing_real": timing_real,
    "duration_real": duration_real,
}


def _has_distinct(pool: Pool, k: int) -> bool:
    """Whether k short recordings of pairwise different kins and words exist (greedy)."""
    chosen: list[Recording] = []
    for r in _short(pool):
        if all(r.kin != o.kin and not set(r.label.split()) & set(o.label.split()) for o in chosen):
            chosen.append(r)
            if len(chosen) == k:
                return True
    return False


def feasible(name: str, pool: Pool) -> bool:
    """Whether `pool` holds what family `name` needs (checked once per split, not per item)."""
    nameable = pool.of(*NAMEABLE)
    if name == "sound_class":
        return any(len(v) >= 2 for v in pool.distractors.values())
    if name == "source_kind":
        cats = [c for c in KIND_CHOICES if (pool.speech() if c == "voice" else pool.of(c))]
        return len(cats) >= 2
    if name == "speech_presence":
        return bool(pool.speech()) and bool(nameable)
    if name == "spoken_number":
        return bool(pool.numbers())
    if name in ("count_real", "loudness_real"):
        return bool(_short(pool))
    if name == "pitch_real":
        return bool(pool.notes())
    if name in ("order_real", "presence_real"):
        return _has_distinct(pool, 3)
    if name == "timing_real":
        return bool(_short(pool))
    if name == "duration_real":
        return bool(pool.sustained)
    raise ValueError(f"unknown real family {name!r}")
