"""Generate the synthetic audio-QA benchmark (`quaver data`).

    from training.data.generate import BenchmarkConfig, generate_benchmark
    generate_benchmark(BenchmarkConfig(seed=0), Path("data/synth"))

writes the dataset layout of `manifest.py` with five splits:

  pretrain    broad mix, the largest split (pre-training the tiny model's audio path)
  train       small fine-tuning split (small on purpose: over-fitting can show)
  calib       held-out split for threshold calibration
  test        in-distribution test split
  test_shift  distribution shift: held-out noise beds (hum, babble), SNR lowered by
              `shift_snr_drop_db`, square/sawtooth timbres instead of sines

With `real_sources=True` (off by default: the synthetic splits above are then byte-identical to a
config without the real-recording fields) the families of `real_families.py` join every split's
rotation, drawing recordings from the split's own pool of the library built by `sources.py`
(under `<out>/sources`), and a sixth split is written:

  test_real   real-recording families only, from packages never heard in training, with
              `test_real_control_fraction` control items (silence, noise, unrelated recordings)

Every item draws its randomness from `SeedSequence([seed, split code, index])`, so an item does
not depend on generation order or worker count, and the same config gives byte-identical WAVs
and manifests. Families rotate with the index (balanced; `pretrain_weights` gives chosen families
more slots in `pretrain`'s rotation); the choice order is shuffled per item, so the answer letter
is uniform. A split whose manifest, audio and fingerprint in dataset.json match the config is
skipped on a re-run; anything else (missing, partial, other config) is regenerated from scratch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from tqdm import tqdm

from training.data import families as fam
from training.data.controls import CONTROL_FAMILY
from training.data.families import NUMBER_WORDS
from training.data.manifest import SAMPLE_RATE, Item, manifest_path, read_manifest, write_manifest
from training.data.scene import Bed, SceneBuilder
from training.data.signals import TIMBRES_SHIFT
from training.data.sources import DEFAULT_PACKAGES, PACKAGES, Library, SourceConfig

GENERATOR_VERSION = 2  # bump when rendering changes: invalidates resumable splits
SPLITS = ("pretrain", "train", "calib", "test", "test_shift")
REAL_SPLITS = ("test_real",)  # written only with real_sources
REAL_FAMILY_NAMES = (
    "sound_class",
    "source_kind",
    "speech_presence",
    "spoken_number",
    "count_real",
    "loudness_real",
    "pitch_real",
    "order_real",
    "presence_real",
    "timing_real",
    "duration_real",
)
# Fields that exist only for real sources: dropped from the fingerprinted content when off, so
# the synthetic benchmark's fingerprints and dataset.json stay what they were before them.
REAL_FIELDS = (
    "real_sources",
    "real_families",
    "real_packages",
    "test_real_control_fraction",
    "real_bed_fraction",
)
BED_LABELS = ("wind", "applause", "crowd")  # non-voice recordings that make a background
SHIFT_SPLITS = frozenset({"test_shift"})
IN_BEDS = (("white", 0.0), ("pink", 1.0), ("brown", 2.0))  # (kind, spectral exponent)
SHIFT_BEDS = ("hum", "babble")  # never seen outside the shift split
HARD_CAP_S = 10.0  # no clip is ever longer


@dataclass(frozen=True)
class BenchmarkConfig:
    """What `generate_benchmark` renders; every field except `workers` changes the data."""

    seed: int = 0  # root seed of every item
    pretrain: int = 3000  # items per split
    train: int = 400
    calib: int = 400
    test: int = 400
    test_shift: int = 400
    # Question families, rotated by index (distinct_pitches may be added; speech via `speech`).
    families: tuple[str, ...] = fam.DEFAULT_FAMILIES
    # {family: k}: in `pretrain` only, the family takes k slots of the rotation (the others one),
    # so the base model sees k times as many distinct items of it; the other splits are unchanged.
    pretrain_weights: dict[str, int] = field(default_factory=dict)
    hard_fraction: float = 0.3  # share of items with difficulty in [0.5, 1] (rest in [0, 0.5))
    snr_easy_db: float = 28.0  # band SNR of events at difficulty 0
    snr_hard_db: float = 0.0  # band SNR of events at difficulty 1
    shift_snr_drop_db: float = 6.0  # test_shift: SNR lowered by this much
    min_duration_s: float = 2.0  # clips are padded to at least this long
    max_duration_s: float = 6.0  # and never longer than this (hard cap 10 s)
    control_fraction: float = 0.0  # share of items whose audio is silence / unrelated noise
    speech: bool = False  # add the `speech` family when espeak-ng is installed
    # Real recordings (sources.py): off by default. On, the real families join every split and
    # the test_real split is written; the packages must be installed (`bin/setup --system`).
    real_sources: bool = False
    test_real: int = 400  # items of test_real (only with real_sources)
    real_families: tuple[str, ...] = REAL_FAMILY_NAMES  # which real families (real_sources)
    real_packages: tuple[str, ...] = DEFAULT_PACKAGES  # source packages (sources.PACKAGES)
    test_real_control_fraction: float = 0.15  # test_real: at least this share are controls
    # Share of synthetic-family items (not noise_type / speech) whose bed is a real recording of the
    # split's pool (speech, crowd, wind, applause) instead of coloured noise (real_sources).
    real_bed_fraction: float = 0.25
    sources_root: str = "/"  # where the packages are installed (tests: a fixture root)
    workers: int = 1  # processes rendering items (results do not depend on it)

    def __post_init__(self) -> None:
        for split, n in self.split_sizes.items():
            if not isinstance(n, int) or n < 0:
                raise ValueError(f"split size {split}={n!r} must be a non-negative integer")
        if not isinstance(self.families, tuple):
            object.__setattr__(self, "families", tuple(self.families))
        if not self.families:
            raise ValueError("families is empty")
        unknown = [f for f in self.families if f not in fam.FAMILIES or f == "speech"]
        if unknown:
            choices = [f for f in fam.FAMILIES if f != "speech"]
            raise ValueError(
                f"unknown families {unknown}; choose from {choices} "
                "(enable speech with speech=True)"
            )
        if len(set(self.families)) != len(self.families):
            raise ValueError("families has duplicates")
        if not isinstance(self.pretrain_weights, dict):
            raise ValueError("pretrain_weights must be a mapping {family: k}")
        for name, k in self.pretrain_weights.items():
            if name not in self.families:
                raise ValueError(f"pretrain_weights: {name!r} is not one of families")
            if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                raise ValueError(f"pretrain_weights: {name}={k!r} must be an integer >= 1")
        if not 0.0 <= self.hard_fraction <= 1.0:
            raise ValueError(f"hard_fraction {self.hard_fraction} outside [0, 1]")
        if not 0.0 <= self.control_fraction <= 1.0:
            raise ValueError(f"control_fraction {self.control_fraction} outside [0, 1]")
        if self.snr_easy_db < self.snr_hard_db:
            raise ValueError("snr_easy_db must be >= snr_hard_db")
        if self.shift_snr_drop_db < 0:
            raise ValueError("shift_snr_drop_db must be >= 0")
        if not 2.0 <= self.min_duration_s <= self.max_duration_s <= HARD_CAP_S:
            raise ValueError(
                f"need 2 <= min_duration_s <= max_duration_s <= {HARD_CAP_S}, got "
                f"{self.min_duration_s}, {self.max_duration_s}"
            )
        if self.max_duration_s < 6.0:
            raise ValueError("max_duration_s below 6 s cannot fit every family's layout")
        if self.workers < 1:
            raise ValueError("workers must be >= 1")
        for name in ("real_families", "real_packages"):
            if not isinstance(getattr(self, name), tuple):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if not isinstance(self.test_real, int) or self.test_real < 0:
            raise ValueError(f"split size test_real={self.test_real!r} must be >= 0")
        if self.real_sources:
            bad = [f for f in self.real_families if f not in REAL_FAMILY_NAMES]
            if bad or not self.real_families:
                raise ValueError(f"real_families {bad or '()'}: choose from {REAL_FAMILY_NAMES}")
            SourceConfig(packages=self.real_packages, root=self.sources_root)  # validates
        if not 0.0 <= self.test_real_control_fraction <= 1.0:
            raise ValueError("test_real_control_fraction outside [0, 1]")
        if not 0.0 <= self.real_bed_fraction <= 1.0:
            raise ValueError("real_bed_fraction outside [0, 1]")

    @property
    def splits(self) -> tuple[str, ...]:
        """The splits this config writes: SPLITS, and test_real with real_sources."""
        return (*SPLITS, *REAL_SPLITS) if self.real_sources else SPLITS

    @property
    def split_sizes(self) -> dict[str, int]:
        """{split: number of items}, in `splits` order."""
        return {s: getattr(self, s) for s in self.splits}

    @property
    def source_config(self) -> SourceConfig:
        return SourceConfig(packages=self.real_packages, root=self.sources_root)

    def content_dict(self) -> dict[str, Any]:
        """The fields that change every split's data (no split sizes, no workers, and no
        `pretrain_weights`: they change `pretrain` alone, see `split_fingerprint`)."""
        d = dataclasses.asdict(self)
        for k in (*SPLITS, *REAL_SPLITS, "workers", "pretrain_weights", "sources_root"):
            d.pop(k)
        d["families"] = list(self.families)
        if not self.real_sources:
            for k in REAL_FIELDS:
                d.pop(k)
        else:
            d["real_families"] = list(self.real_families)
            d["real_packages"] = list(self.real_packages)
        return d


def family_cycle(
    cfg: BenchmarkConfig, split: str, library: Library | None = None
) -> tuple[str, ...]:
    """The families that item i of `split` rotates through (item i: cycle[i % len(cycle)]).
    With real_sources, the real families the split's pool can feed follow the synthetic ones
    (test_real: only they)."""
    names = active_families(cfg)
    if cfg.real_sources:
        real = real_cycle(cfg, split, _need_library(cfg, library))
        names = real if split in REAL_SPLITS else (*names, *real)
    if split != "pretrain":
        return names
    return tuple(f for f in names for _ in range(cfg.pretrain_weights.get(f, 1)))


def _need_library(cfg: BenchmarkConfig, library: Library | None) -> Library:
    if library is None:
        raise ValueError(
            "real_sources is on: pass the library (sources.build_library(cfg.source_config, "
            "dir)); generate_benchmark builds it under <out>/sources"
        )
    return library


def _pool(library: Library, split: str):
    """The split's pool of recordings (cached per library and split: distractor tables)."""
    from training.data.real_families import Pool

    key = (library.root, library.fingerprint, split)
    if key not in _POOLS:
        _POOLS[key] = Pool.for_split(library, split)
    return _POOLS[key]


_POOLS: dict = {}


def real_cycle(cfg: BenchmarkConfig, split: str, library: Library) -> tuple[str, ...]:
    """cfg.real_families that the split's pool holds enough recordings for."""
    from training.data.real_families import feasible

    pool = _pool(library, split)
    return tuple(f for f in cfg.real_families if feasible(f, pool))


def active_families(cfg: BenchmarkConfig) -> tuple[str, ...]:
    """cfg.families plus `speech` when requested and espeak-ng is installed."""
    if not cfg.speech:
        return cfg.families
    from training.data.speech import available

    if not available():
        warnings.warn("espeak-ng is not installed: the speech family is skipped", stacklevel=2)
        return cfg.families
    return (*cfg.families, "speech")


def split_fingerprint(cfg: BenchmarkConfig, split: str, library: Library | None = None) -> str:
    """sha256 of everything that determines one split's content."""
    blob = {
        "generator_version": GENERATOR_VERSION,
        "config": cfg.content_dict(),
        "families": list(active_families(cfg)),
        "split": split,
        "count": cfg.split_sizes[split],
    }
    if cfg.real_sources:  # absent when off: the synthetic fingerprints hold
        lib = _need_library(cfg, library)
        blob["library"] = lib.fingerprint
        blob["families"] = list(family_cycle(cfg, split, lib))
    real_controls = split in REAL_SPLITS and cfg.test_real_control_fraction > 0
    if cfg.control_fraction > 0 or real_controls:  # presence questions over control audio are
        # "no" items (ABSENT_ANSWERS); absent without controls, so those fingerprints hold
        blob["absent_answers"] = dict(sorted(ABSENT_ANSWERS.items()))
    if split == "pretrain" and cfg.pretrain_weights:  # absent when unused: older fingerprints hold
        blob["pretrain_weights"] = dict(sorted(cfg.pretrain_weights.items()))
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def item_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The item's own generator: independent of order, distinct across splits."""
    split_code = int.from_bytes(hashlib.sha256(split.encode()).digest()[:8], "little")
    return np.random.default_rng(np.random.SeedSequence([seed, split_code, index]))


def to_pcm16(mix: np.ndarray) -> np.ndarray:
    """float (n,) in [-1, 1] -> int16 (n,), rounded and clipped."""
    return np.clip(np.round(mix * 32767.0), -32768, 32767).astype(np.int16)


def wav_bytes(pcm: np.ndarray) -> bytes:
    """16 kHz mono PCM16 WAV file bytes (no timestamps: byte-stable)."""
    buf = io.BytesIO()
    sf.write(buf, pcm, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


@dataclass
class Generated:
    """One item with what it was rendered from (for tests and checkers)."""

    item: Item
    example: fam.Example
    pcm: np.ndarray  # (n,) int16, the WAV's samples


def _control(rng: np.random.Generator, ex: fam.Example, family: str, shift: bool):
    """Replace the audio by near-silence or an unrelated bed (no events): unanswerable items."""
    kind = "silence" if family == "noise_type" or rng.random() < 0.5 else "unrelated"
    if kind == "silence":
        bed = Bed("silence", seed=int(rng.integers(2**31 - 1)))
        peak = None
    else:
        bed = _draw_bed(rng, shift)
        peak = float(rng.uniform(0.5, 0.9))
    scene, mix = SceneBuilder(ex.scene.duration_s, bed).finish(peak)
    params = {"control": kind, "of_family": family}
    return dataclasses.replace(ex, scene=scene, mix=mix, params=params)


# Questions that audio without the event still answers: "is there speech / a dog / a beep?" over
# silence, a noise bed or an unrelated recording is "no", not a guess. Control audio under them
# makes an answerable item of the family (with `absent_audio` saying which control audio it got),
# never a control item, whose every answer must be a guess.
ABSENT_ANSWERS: dict[str, str] = {"presence": "no", "presence_real": "no", "speech_presence": "no"}


def _absent(ex: fam.Example, family: str) -> fam.Example:
    """A presence question over control audio: the answer becomes ABSENT_ANSWERS[family]."""
    answer = ABSENT_ANSWERS[family]
    if answer not in ex.choices:
        raise AssertionError(f"{family}: {answer!r} not among {ex.choices}")
    params = {k: v for k, v in ex.params.items() if k not in ("control", "of_family")}
    return dataclasses.replace(
        ex, answer=answer, params={**params, "absent_audio": ex.params["control"]}
    )


# Control audio for real-source configs, by the family asked about: which recordings may play
# without making the question answerable (never a sound the question could be about).
def _unrelated_categories(family: str) -> tuple[str, ...]:
    if family in ("sound_class", "source_kind", "speech_presence"):
        return ()  # any real sound answers these: only silence / noise controls
    if family == "spoken_number":
        return ("animal", "machine", "instrument")
    if family in (
        "count_real", "loudness_real", "pitch_real", "order_real", "presence_real",
        "timing_real", "duration_real",
    ):  # fmt: skip
        return ("voice",)
    return ("animal", "voice")  # synthetic families: no beeps, chirps, noise bursts or tones


def _control_real(
    rng: np.random.Generator, ex: fam.Example, family: str, shift: bool, pool
) -> fam.Example:
    """Real-source controls: near-silence, an unrelated noise bed, or an unrelated recording
    looped (kinds "silence", "unrelated", "unrelated_real"); no event of the question."""
    cats = _unrelated_categories(family)
    recs = [r for r in pool.of(*cats) if r.label != "crowd" and r.label not in NUMBER_WORDS]
    if family == "noise_type":
        kinds = ["silence", "unrelated_real"] if recs else ["silence"]
    else:
        kinds = ["silence", "unrelated", "unrelated_real"] if recs else ["silence", "unrelated"]
    kind = kinds[int(rng.integers(len(kinds)))]
    params: dict[str, float | str] = {"control": kind, "of_family": family}
    peak = float(rng.uniform(0.5, 0.9))
    if kind == "silence":
        bed = Bed("silence", seed=int(rng.integers(2**31 - 1)))
        peak = None
    elif kind == "unrelated":
        bed = _draw_bed(rng, shift)
    else:
        rec = recs[int(rng.integers(len(recs)))]
        bed = Bed("recording", seed=int(rng.integers(2**31 - 1)), source=pool.library.path(rec))
        params |= {"recordings": rec.key, "packages": rec.package}
    scene, mix = SceneBuilder(ex.scene.duration_s, bed).finish(peak)
    return dataclasses.replace(ex, scene=scene, mix=mix, params=params)


def _real_beds(pool) -> list:
    """Recordings of a pool that can be a clip's background: speech, crowd, wind, applause."""
    return [r for r in pool.recordings if r.category == "voice" or r.label in BED_LABELS]


def _draw_bed(rng: np.random.Generator, shift: bool) -> Bed:
    seed = int(rng.integers(2**31 - 1))
    if shift:
        return Bed(str(rng.choice(SHIFT_BEDS)), seed=seed)
    kind, alpha = IN_BEDS[int(rng.integers(len(IN_BEDS)))]
    return Bed(kind, alpha=alpha + float(rng.uniform(-0.1, 0.1)), seed=seed)


def generate_item(
    cfg: BenchmarkConfig,
    split: str,
    index: int,
    *,
    family: str | None = None,
    level: float | None = None,
    library: Library | None = None,
) -> Generated:
    """Render item `index` of `split`. `family`/`level` override the drawn ones (tests);
    `library` (sources.build_library) is needed with real_sources."""
    if split not in cfg.splits:
        raise ValueError(f"unknown split {split!r}; expected one of {cfg.splits}")
    rng = item_rng(cfg.seed, split, index)
    names = family_cycle(cfg, split, library)
    if not names:
        raise ValueError(f"split {split!r} has no family its recordings can feed")
    family = family or names[index % len(names)]
    shift = split in SHIFT_SPLITS
    # Fixed draw order: every item consumes the same leading numbers whatever the options.
    u_control, u_hard, u_level, u_snr = rng.random(4)
    if level is None:
        level = 0.5 + 0.5 * u_level if u_hard < cfg.hard_fraction else 0.5 * u_level
    snr = fam.ramp(cfg.snr_easy_db, cfg.snr_hard_db, level) + (4 * u_snr - 2)
    snr -= cfg.shift_snr_drop_db if shift else 0.0
    timbre = str(rng.choice(TIMBRES_SHIFT)) if shift else "sine"
    bed = _draw_bed(rng, shift)
    bed_rec = None
    if cfg.real_sources and family not in (*REAL_FAMILY_NAMES, "noise_type", "speech"):
        # drawn after every draw above, and only with real sources: synthetic configs keep theirs
        beds = _real_beds(_pool(_need_library(cfg, library), split))
        if rng.random() < cfg.real_bed_fraction and beds:
            bed_rec = beds[int(rng.integers(len(beds)))]
            bed = Bed("recording", seed=int(rng.integers(2**31 - 1)), source=library.path(bed_rec))
    ctx = fam.Context(level, snr, timbre, bed, shift, cfg.min_duration_s, cfg.max_duration_s)
    control_fraction = cfg.control_fraction
    if family in REAL_FAMILY_NAMES:
        from training.data.real_families import REAL_FAMILIES

        if not cfg.real_sources:
            raise ValueError(f"family {family!r} needs real_sources=True")
        pool = _pool(_need_library(cfg, library), split)
        ex = REAL_FAMILIES[family](rng, ctx, pool)
    else:
        ex = fam.FAMILIES[family](rng, ctx)
    if bed_rec is not None:
        ex.params = {**ex.params, "recordings": bed_rec.key, "packages": bed_rec.package}
    if split in REAL_SPLITS:
        control_fraction = max(control_fraction, cfg.test_real_control_fraction)
    out_family = family
    if u_control < control_fraction:
        if cfg.real_sources:
            ex = _control_real(rng, ex, family, shift, _pool(_need_library(cfg, library), split))
        else:
            ex = _control(rng, ex, family, shift)
        if family in ABSENT_ANSWERS:
            ex = _absent(ex, family)
        else:
            out_family = CONTROL_FAMILY
    perm = rng.permutation(len(ex.choices))
    choices = tuple(ex.choices[i] for i in perm)
    pcm = to_pcm16(ex.mix)
    if len(pcm) > HARD_CAP_S * SAMPLE_RATE:
        raise AssertionError(f"{family} rendered {len(pcm) / SAMPLE_RATE:.2f} s")
    difficulty: dict[str, float | str] = {
        "level": level,
        "snr_db": snr,
        "noise": ex.scene.bed.kind,
        "timbre": timbre,
        "shift": "yes" if shift else "no",
    }
    difficulty.update(ex.params)
    difficulty = {
        k: round(float(v), 4) if not isinstance(v, str) else v for k, v in difficulty.items()
    }
    item_id = f"{split}-{index:06d}"
    item = Item(
        id=item_id,
        audio=f"audio/{split}/{item_id}.wav",
        question=ex.question,
        choices=choices,
        answer_index=choices.index(ex.answer),
        family=out_family,
        split=split,
        duration_s=round(len(pcm) / SAMPLE_RATE, 4),
        difficulty=difficulty,
    )
    return Generated(item, ex, pcm)


def _render_and_write(
    cfg: BenchmarkConfig, split: str, out_dir: Path, library: Library | None, index: int
):
    """Worker body: render one item, write its WAV; returns (manifest line, wav sha256)."""
    gen = generate_item(cfg, split, index, library=library)
    data = wav_bytes(gen.pcm)
    (out_dir / gen.item.audio).write_bytes(data)
    return gen.item.to_json(), hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_meta(out_dir: Path) -> dict[str, Any]:
    path = out_dir / "dataset.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}


def _write_meta(
    out_dir: Path, cfg: BenchmarkConfig, splits: dict[str, Any], library: Library | None = None
) -> None:
    """dataset.json (atomic): config, seed, per-split entries, fingerprint over the manifests."""
    splits = {s: splits[s] for s in cfg.splits if s in splits}
    h = hashlib.sha256()
    for split in splits:
        path = manifest_path(out_dir, split)
        if path.is_file():
            h.update(f"{split}\n".encode())
            h.update(path.read_bytes())
    meta = {
        "format_version": 1,
        "generator": "quaver synthetic audio QA",
        "generator_version": GENERATOR_VERSION,
        "sample_rate": SAMPLE_RATE,
        "seed": cfg.seed,
        "config": {
            **cfg.content_dict(),
            **cfg.split_sizes,
            **({"pretrain_weights": cfg.pretrain_weights} if cfg.pretrain_weights else {}),
        },
        "families": list(active_families(cfg)),
        "splits": splits,
        "counts": {s: e["count"] for s, e in splits.items()},
        "fingerprint": h.hexdigest(),
    }
    if cfg.real_sources and library is not None:
        from training.data.sources import counts

        meta["sources"] = {
            "library": os.path.relpath(library.root, out_dir),
            "library_fingerprint": library.fingerprint,
            "packages": {
                p: {"side": PACKAGES[p].side, "licence": PACKAGES[p].licence}
                for p in cfg.real_packages
            },
            **counts(library),
        }
    tmp = out_dir / "dataset.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, out_dir / "dataset.json")


def _split_complete(out_dir: Path, split: str, fp: str, entry: dict[str, Any] | None) -> bool:
    """Same fingerprint, intact manifest (sha256), every WAV present and non-trivial."""
    if not entry or entry.get("fingerprint") != fp:
        return False
    path = manifest_path(out_dir, split)
    if not path.is_file() or _sha256_file(path) != entry.get("manifest_sha256"):
        return False
    try:
        items = read_manifest(out_dir, split)
    except ValueError:
        return False
    if len(items) != entry.get("count"):
        return False
    for it in items:
        wav = out_dir / it.audio
        if not wav.is_file() or wav.stat().st_size <= 44:
            return False
    return True


def _generate_split(
    cfg: BenchmarkConfig,
    split: str,
    out_dir: Path,
    progress: bool,
    pool=None,
    library: Library | None = None,
) -> dict:
    """Render one split from scratch (in `pool` when given); returns its dataset.json entry."""
    n = cfg.split_sizes[split]
    audio_dir = out_dir / "audio" / split
    audio_dir.mkdir(parents=True, exist_ok=True)
    for old in audio_dir.glob("*.wav"):  # stale files of an earlier config or partial run
        old.unlink()
    work = partial(_render_and_write, cfg, split, out_dir, library)
    bar = tqdm(total=n, desc=f"data {split}", unit="item", disable=not progress)
    results: list[tuple[str, str]] = []
    # imap keeps item order, so the manifest does not depend on the worker count.
    for res in pool.imap(work, range(n), chunksize=16) if pool else map(work, range(n)):
        results.append(res)
        bar.update()
    bar.close()
    items = [Item.from_json(line) for line, _ in results]
    path = write_manifest(out_dir, split, items)  # last: its presence marks a finished split
    audio_hash = hashlib.sha256("".join(sha for _, sha in results).encode()).hexdigest()
    counts: dict[str, int] = {}
    for it in items:
        counts[it.family] = counts.get(it.family, 0) + 1
    return {
        "count": n,
        "fingerprint": split_fingerprint(cfg, split, library),
        "manifest_sha256": _sha256_file(path),
        "audio_sha256": audio_hash,  # over the per-file sha256s, in item order
        "families": dict(sorted(counts.items())),
    }


def generate_benchmark(cfg: BenchmarkConfig, out_dir: Path, progress: bool = True) -> Path:
    """Write (or complete) the benchmark under `out_dir`; returns `out_dir`. With real_sources
    the recording library is built (or reused) under `<out_dir>/sources` first."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    library = None
    if cfg.real_sources:
        from training.data.sources import build_library

        library = build_library(cfg.source_config, out_dir / "sources", progress=progress)
    meta = _read_meta(out_dir)
    # Entries of earlier runs: each is trusted only after _split_complete verifies it.
    entries = (
        dict(meta.get("splits", {})) if meta.get("generator_version") == GENERATOR_VERSION else {}
    )
    todo = [
        s
        for s in cfg.splits
        if not _split_complete(out_dir, s, split_fingerprint(cfg, s, library), entries.get(s))
    ]
    pool = None
    if cfg.workers > 1 and sum(cfg.split_sizes[s] for s in todo) > 1:
        import multiprocessing as mp

        # spawn, not fork: the caller may hold torch threads that fork would copy half-way.
        pool = mp.get_context("spawn").Pool(cfg.workers)
    try:
        for split in todo:
            # Drop this split's entry before touching its files, so an interrupted run is never
            # mistaken for a complete one; the manifest is written last.
            entries.pop(split, None)
            manifest_path(out_dir, split).unlink(missing_ok=True)
            _write_meta(out_dir, cfg, entries, library)
            entries[split] = _generate_split(cfg, split, out_dir, progress, pool, library)
            _write_meta(out_dir, cfg, entries, library)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    _write_meta(out_dir, cfg, entries, library)
    return out_dir
