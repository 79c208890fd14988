"""Real-recording sources: sounds read from installed Debian packages, indexed and split by package.

Nothing is downloaded or installed at run time: `bin/setup --system` installs the packages, this
module only reads them. `build_library` decodes every chosen recording once (mono, 16 kHz,
trimmed, at most `MAX_RECORDING_S`), writes it as PCM16 WAV under the library directory and an
index line per recording (path, package, licence, class label, group, category, duration, level,
pool, sha256):

    from training.data.sources import SourceConfig, build_library
    lib = build_library(SourceConfig(), Path("data/real/sources"))
    lib.pool("train")          # recordings that pretrain/train may hear

Splitting is by *source package* first: packages on the "train" side feed pretrain/train/calib/
test, the "heldout" side feeds only test_real and test_shift, so test_real holds recordings from
packages never heard in training. Inside a side, whole groups (a stamp and its spoken description,
one sound-font program, one original recording cut into several effects) go to one pool by a hash,
and a decoded copy identical to an earlier one is dropped, so no recording is in two pools;
pretrain and train share the "train" pool.

The recordings of `sound-theme-freedesktop` and `alsa-utils` are refused outright: they are kept
apart for an independent check and never enter an index.

Packages (see docs/real_sounds.md for sizes):
  train    tuxpaint-stamps-default    animal, household, instrument sounds; spoken names (GPL-2)
           timgm6mb-soundfont          General MIDI instrument notes via fluidsynth (GPL-2)
           csound-soundfont            a second General MIDI font, the same notes (public domain)
           espeak-ng                   synthesised number words and phrases, 15 voices (GPL-3)
  heldout  openttd-opensfx             vehicle, machine, animal, crowd, weather effects (CC-BY 3.0,
                                       CC0, CC-BY-SA 3.0: per sound, recorded in the index)
           fluidr3mono-gm-soundfont    Fluid R3 instrument notes via fluidsynth (MIT)
           asterisk-core-sounds-en-wav a recorded human voice: digits and prompts (CC-BY-SA 3.0)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import soundfile as sf

from training.data.signals import SR, fade

LIBRARY_VERSION = 5  # bump when decoding / trimming / pooling changes
MAX_RECORDING_S = 4.0  # longer recordings are cut (an event never needs more)
MIN_RECORDING_S = 0.08
FORBIDDEN_PACKAGES = ("sound-theme-freedesktop", "alsa-utils")
# Where the forbidden packages put their recordings (refused even when reached by another path).
FORBIDDEN_DIRS = ("usr/share/sounds/freedesktop", "usr/share/sounds/alsa")
SIDES = ("train", "heldout")
POOLS = {"train": ("train", "calib", "test"), "heldout": ("test_real", "test_shift")}
POOL_SHARES = {"train": (0.7, 0.15, 0.15), "heldout": (0.75, 0.25)}
# Which pool each benchmark split draws its recordings from.
SPLIT_POOL = {
    "pretrain": "train",
    "train": "train",
    "calib": "calib",
    "test": "test",
    "test_real": "test_real",
    "test_shift": "test_shift",
}
CATEGORIES = ("animal", "machine", "instrument", "voice", "other")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class MissingPackageError(FileNotFoundError):
    """A source package (or the tool that renders it) is not installed (the CLI reports it in
    one line, exit 2, as it does every missing input)."""


@dataclass(frozen=True)
class Package:
    """One Debian package the benchmark may read recordings from."""

    name: str
    side: str  # "train" or "heldout"
    licence: str  # the package's licence (per-recording licences may be narrower)
    probe: str  # a path relative to the root that exists when the package is installed
    reader: str  # key of READERS: how its recordings are listed and decoded


PACKAGES: dict[str, Package] = {
    p.name: p
    for p in (
        Package(
            "tuxpaint-stamps-default", "train", "GPL-2", "usr/share/tuxpaint/stamps", "tuxpaint"
        ),
        Package(
            "timgm6mb-soundfont", "train", "GPL-2", "usr/share/sounds/sf2/TimGM6mb.sf2", "font"
        ),
        Package(
            "csound-soundfont",
            "train",
            "public-domain",
            "usr/share/sounds/sf2/sf_GMbank.sf2",
            "font",
        ),
        Package("espeak-ng", "train", "GPL-3", "usr/bin/espeak-ng", "espeak"),
        Package(
            "openttd-opensfx",
            "heldout",
            "CC-BY-SA-3.0 (catalogue); per sound CC-BY-3.0, CC0-1.0 or CC-BY-SA-3.0",
            "usr/share/games/openttd/baseset/opensfx/opensfx.cat",
            "opensfx",
        ),
        Package(
            "fluidr3mono-gm-soundfont",
            "heldout",
            "MIT",
            "usr/share/sounds/sf3/FluidR3Mono_GM.sf3",
            "font",
        ),
        Package(
            "asterisk-core-sounds-en-wav",
            "heldout",
            "CC-BY-SA-3.0",
            "usr/share/asterisk/sounds/en_US_f_Allison",
            "asterisk",
        ),
    )
}
DEFAULT_PACKAGES = tuple(PACKAGES)


def install_hint(names: list[str] | tuple[str, ...]) -> str:
    return f"install with `apt-get install {' '.join(names)}` (or run `bin/setup --system`)"


@dataclass(frozen=True)
class SourceConfig:
    """Which packages the library reads and where the system root is."""

    packages: tuple[str, ...] = DEFAULT_PACKAGES  # names from PACKAGES
    root: str = "/"  # filesystem root the packages are installed under (tests: a fixture dir)
    seed: int = 0  # salt of the group -> pool hash
    tuxpaint_languages: tuple[str, ...] = ("", "fr", "es")  # spoken names: "" is English

    def __post_init__(self) -> None:
        if not isinstance(self.packages, tuple):
            object.__setattr__(self, "packages", tuple(self.packages))
        bad = [p for p in self.packages if p in FORBIDDEN_PACKAGES]
        if bad:
            raise ValueError(
                f"refusing {bad}: their recordings are kept apart for an independent check "
                "and are never used"
            )
        unknown = [p for p in self.packages if p not in PACKAGES]
        if unknown:
            raise ValueError(f"unknown source packages {unknown}; choose from {list(PACKAGES)}")
        if len(set(self.packages)) != len(self.packages):
            raise ValueError("packages has duplicates")
        sides = {PACKAGES[p].side for p in self.packages}
        if self.packages and sides != set(SIDES):
            raise ValueError(f"need packages on both sides {SIDES}, got only {sorted(sides)}")


@dataclass(frozen=True)
class Recording:
    """One indexed recording (the decoded 16 kHz copy lives at `<library>/<file>`)."""

    key: str  # "<package>:<path inside the package>[#entry]": unique
    package: str
    source_path: str  # the installed file it was read from
    licence: str
    label: str  # class label: "dog", "ship horn", "seven", "piano"
    group: str  # recordings of one group always share a pool
    category: str  # one of CATEGORIES
    side: str  # "train" | "heldout"
    pool: str  # "train" | "calib" | "test" | "test_real" | "test_shift"
    file: str  # relative to the library dir
    duration_s: float
    level_dbfs: float  # RMS level of the decoded copy
    peak_dbfs: float
    sha256: str  # of the decoded copy's WAV bytes
    note: int = -1  # instrument notes: the MIDI note number
    speech_text: str = ""  # voice recordings: what is said, when known
    kin: str = ""  # recordings of one kin are too alike to be offered as each other's distractor


@dataclass(frozen=True)
class Library:
    """The index of a built library; `path(rec)` gives the decoded WAV of a recording."""

    root: str  # the library directory
    recordings: tuple[Recording, ...]
    fingerprint: str  # sha256 over the index: changes when any recording changes

    def path(self, rec: Recording) -> str:
        return os.path.join(self.root, rec.file)

    def pool(self, pool: str, category: str | None = None) -> tuple[Recording, ...]:
        """Recordings of one pool (optionally one category), in index order."""
        return tuple(
            r
            for r in self.recordings
            if r.pool == pool and (category is None or r.category == category)
        )

    def for_split(self, split: str, category: str | None = None) -> tuple[Recording, ...]:
        return self.pool(SPLIT_POOL[split], category)


# ------------------------------------------------------------------------------ raw recordings


@dataclass
class Raw:
    """A recording as a reader yields it, before decoding to the library."""

    key: str
    source_path: str
    label: str
    group: str
    category: str
    load: Callable[[], tuple[np.ndarray, int]]  # -> (samples (n,) or (n, ch), rate)
    licence: str = ""
    note: int = -1
    speech_text: str = ""
    kin: str = ""  # default: the group


def _refuse_forbidden(path: str | Path, root: Path) -> None:
    rel = os.path.relpath(os.path.realpath(path), os.path.realpath(root))
    for bad in FORBIDDEN_DIRS:
        if rel == bad or rel.startswith(bad + os.sep):
            raise ValueError(f"refusing {path}: recordings of {FORBIDDEN_PACKAGES} are never used")


def _sf_load(path: Path) -> Callable[[], tuple[np.ndarray, int]]:
    def load() -> tuple[np.ndarray, int]:
        x, rate = sf.read(path, dtype="float64", always_2d=True)
        return x, int(rate)

    return load


def _words(stem: str) -> str:
    """'sea_lion2' -> 'sea lion', 'Washing-machine' -> 'washing machine'."""
    s = re.sub(r"[_\-]+", " ", stem).strip().lower()
    return re.sub(r"\s*\d+$", "", s).strip() or s


# Stamp names that are not what a listener would call the sound: stem -> (label, category).
TUX_LABELS = {
    "cow_white": ("cow", "animal"), "pig_golden": ("pig", "animal"),
    "pig_golden2": ("pig", "animal"), "sheep_lamb": ("sheep", "animal"),
    "bat_left": ("bat", "animal"), "blackcat": ("cat", "animal"), "spider": ("spider", "animal"),
    "heron_greatblue_flying": ("heron", "animal"), "tucan": ("toucan", "animal"),
    "drum_tomtom_floor": ("tom-tom drum", "instrument"), "cymbal_crash": ("cymbal", "instrument"),
    "drumkit": ("drum kit", "instrument"), "camera_35mm": ("camera shutter", "machine"),
    "scissors_small_closed": ("scissors", "other"), "scissors_small_open": ("scissors", "other"),
    "mallet_metal": ("mallet", "other"), "firetruck": ("fire truck siren", "machine"),
    "apollo_lander": ("rocket", "machine"), "washing-machine": ("washing machine", "machine"),
    "rubberduck": ("squeaky toy", "other"), "lightningbolt": ("thunder", "other"),
    "apple_red": ("apple bite", "other"), "fireworks": ("fireworks", "other"),
}  # fmt: skip
# Stamp folders whose members sound alike (hen / rooster, cow / bull): one kin each.
TUX_KIN_DIRS = frozenset(
    [
        "birds",
        "bovines",
        "equines",
        "cats",
        "dogs",
        "deer",
        "apes",
        "rodents",
        "aquatic",
        "camel",
        "insects",
        "bears",
        "marsupials",
        "percussion",
        "string",
        "wind",
        "dishes",
        "tools",
        "arttools",
        "hanukkah",
    ]
)
TUX_CATEGORY = (
    ("animals/", "animal"),
    ("hobbies/music/", "instrument"),
    ("household/", "machine"),
    ("vehicles/", "machine"),
    ("space/", "machine"),
    ("hobbies/camera", "machine"),
)


def _read_tuxpaint(pkg: Package, root: Path, cfg: SourceConfig) -> Iterator[Raw]:
    """Stamp sounds (`<stamp>.ogg`: what the pictured thing sounds like; its label is the stamp
    name) and spoken descriptions (`<stamp>_desc[_<lang>].ogg`: voice, text from `<stamp>.txt`);
    spoken digits of symbols/math (`<d>.ogg`: voice saying the number)."""
    base = root / pkg.probe
    for path in sorted(base.rglob("*.ogg")):
        rel = path.relative_to(base).as_posix()
        stem = path.stem
        if rel.startswith("symbols/"):
            if rel.startswith("symbols/math/") and re.fullmatch(r"\d", stem):
                # One speaker says all ten digits: the digits are one group, so a pool gets
                # the whole voice (every number word) or none of it.
                word = NUMBER_WORDS[int(stem)]
                raw = Raw(
                    f"{pkg.name}:{rel}",
                    str(path),
                    word,
                    f"{pkg.name}:symbols/math",
                    "voice",
                    _sf_load(path),
                    speech_text=word,
                )
                yield raw
                yield telephone_copy(raw)
            continue
        m = re.fullmatch(r"(.+?)_desc(?:_(\w+))?", stem)
        if m:
            lang = m.group(2) or ""
            if lang not in cfg.tuxpaint_languages:
                continue
            stamp = path.parent / m.group(1)
            text = ""
            txt = stamp.with_suffix(".txt")
            if lang == "" and txt.is_file():
                text = (txt.read_text(errors="replace").splitlines() or [""])[0].strip()
            group = f"{pkg.name}:{(path.parent.relative_to(base) / m.group(1)).as_posix()}"
            label = f"speech ({lang or 'en'})"
            yield Raw(
                f"{pkg.name}:{rel}", str(path), label, group, "voice", _sf_load(path),
                speech_text=text,
            )  # fmt: skip
            continue
        if "desc" in stem or "." in stem:
            continue  # a misnamed description file, not a stamp sound
        category = next((c for prefix, c in TUX_CATEGORY if rel.startswith(prefix)), "other")
        label, category = TUX_LABELS.get(stem.lower(), (_words(stem), category))
        group = f"{pkg.name}:{rel[:-4]}"
        parent = path.parent.name
        kin = f"{pkg.name}:{parent}" if parent in TUX_KIN_DIRS else ""
        yield Raw(f"{pkg.name}:{rel}", str(path), label, group, category, _sf_load(path), kin=kin)


# (keyword in the catalogue title, category, label): first match wins; titles without a match
# are skipped (a splat or a "Good Year" jingle has no class a listener could name).
OPENSFX_CLASSES = (
    ("sheep", "animal", "sheep"),
    ("cow", "animal", "cow"),
    ("horse", "animal", "horse"),
    ("bird", "animal", "bird"),
    ("lion", "animal", "lion"),
    ("monkey", "animal", "monkeys"),
    ("applause", "other", "applause"),
    ("oooh", "voice", "crowd"),
    ("helicopter", "machine", "helicopter"),
    ("jet", "machine", "jet plane"),
    ("propeller", "machine", "propeller plane"),
    ("ship horn", "machine", "ship horn"),
    ("ferry horn", "machine", "ship horn"),
    ("steam", "machine", "steam train"),
    ("train station departure", "machine", "train"),
    ("level crossing", "machine", "level crossing bell"),
    ("bus start", "machine", "bus"),
    ("truck", "machine", "truck"),
    ("car horn", "machine", "car horn"),
    ("jackhammer", "machine", "jackhammer"),
    ("chainsaw", "machine", "chainsaw"),
    ("sawmill", "machine", "circular saw"),
    ("mining machinery", "machine", "machinery"),
    ("factory whistle", "machine", "factory whistle"),
    ("electric sparking", "machine", "electric sparks"),
    ("cash till", "machine", "cash register"),
    ("explosion", "other", "explosion"),
    ("wind", "other", "wind"),
    ("falling tree", "other", "falling tree"),
    ("crashing tree", "other", "falling tree"),
)


OPENSFX_KIN = {
    "bus": "road vehicle", "truck": "road vehicle", "car horn": "road vehicle",
    "steam train": "rail", "train": "rail", "level crossing bell": "rail",
    "jet plane": "aircraft", "propeller plane": "aircraft", "helicopter": "aircraft",
    "ship horn": "horn", "factory whistle": "horn",
    "jackhammer": "tool", "chainsaw": "tool", "circular saw": "tool", "machinery": "tool",
}  # fmt: skip


def read_cat(path: Path) -> list[tuple[str, bytes]]:
    """Entries of an OpenTTD sound catalogue: [(title, RIFF WAV bytes)]. Layout: a table of
    (offset, WAV size) uint32 pairs, then per entry a length byte, the title and the WAV data."""
    blob = path.read_bytes()
    if len(blob) < 8:
        raise ValueError(f"{path}: not a sound catalogue")
    n = (struct.unpack_from("<I", blob, 0)[0] & 0x7FFFFFFF) // 8
    out = []
    for i in range(n):
        off, size = struct.unpack_from("<II", blob, 8 * i)
        off &= 0x7FFFFFFF
        ln = blob[off]
        title = blob[off + 1 : off + 1 + ln].rstrip(b"\0").decode("latin-1")
        out.append((title, blob[off + 1 + ln : off + 1 + ln + size]))
    return out


def _opensfx_licence(title: str) -> str:
    m = re.search(r"License:\s*([^.]+(?:\.\d)?[^.]*)", title)
    text = m.group(1).strip() if m else ""
    if "Zero" in text:
        return "CC0-1.0"
    if "ShareAlike" in text:
        return "CC-BY-SA-3.0"
    if "Attribution" in text:
        return "CC-BY-3.0"
    return text or "see package"


def _read_opensfx(pkg: Package, root: Path, cfg: SourceConfig) -> Iterator[Raw]:
    """Sound effects of the OpenSFX catalogue; the title names the sound, its original recording
    (the group: one original cut into two effects stays in one pool) and its licence."""
    path = root / pkg.probe
    for i, (title, wav) in enumerate(read_cat(path)):
        m = re.match(r'"([^"]*)"', title)
        name = (m.group(1) if m else title).lower()
        hit = next(((c, lab) for kw, c, lab in OPENSFX_CLASSES if kw in name), None)
        if hit is None or len(wav) <= 44 or name.startswith("toyland"):
            continue  # no nameable class, empty, or a cartoon remix of another entry
        orig = re.search(r'Original "([^"]+)"', title)
        group = f"{pkg.name}:{(orig.group(1) if orig else name).lower()}"

        def load(data: bytes = wav) -> tuple[np.ndarray, int]:
            import io

            x, rate = sf.read(io.BytesIO(data), dtype="float64", always_2d=True)
            return x, int(rate)

        yield Raw(
            f"{pkg.name}:opensfx.cat#{i}", f"{path}#{i}", hit[1], group, hit[0], load,
            licence=_opensfx_licence(title), kin=f"{pkg.name}:{OPENSFX_KIN.get(hit[1], hit[1])}",
        )  # fmt: skip


def _read_asterisk(pkg: Package, root: Path, cfg: SourceConfig) -> Iterator[Raw]:
    """A recorded voice: digits/<d>.wav say the number; every other prompt is speech."""
    base = root / pkg.probe
    for path in sorted(base.rglob("*.wav")):
        rel = path.relative_to(base).as_posix()
        stem = path.stem
        if rel.startswith("digits/") and re.fullmatch(r"\d", stem):
            word = NUMBER_WORDS[int(stem)]
            yield Raw(
                f"{pkg.name}:{rel}", str(path), word, f"{pkg.name}:{rel}", "voice",
                _sf_load(path), speech_text=word,
            )  # fmt: skip
        else:
            yield Raw(
                f"{pkg.name}:{rel}", str(path), "speech (en)", f"{pkg.name}:{rel}", "voice",
                _sf_load(path), speech_text=_words(stem),
            )  # fmt: skip


# General MIDI programs rendered from each sound font: (program, label); notes below.
GM_PROGRAMS = (
    (0, "piano"), (1, "piano"), (4, "electric piano"),
    (11, "vibraphone"), (12, "marimba"), (14, "bells"),
    (16, "organ"), (19, "organ"), (21, "accordion"),
    (24, "guitar"), (25, "guitar"), (27, "electric guitar"),
    (32, "bass"), (33, "bass"),
    (40, "violin"), (42, "cello"), (46, "harp"), (47, "timpani"),
    (56, "trumpet"), (57, "trombone"), (60, "french horn"),
    (65, "saxophone"), (68, "oboe"), (71, "clarinet"),
    (73, "flute"), (74, "flute"), (75, "pan flute"),
)  # fmt: skip
GM_NOTES = (48, 52, 55, 59, 62, 65, 69, 72)  # C3 .. C5; bass programs an octave lower
NOTE_S = 1.0  # held; the release tail is kept up to NOTE_SLOT_S
NOTE_SLOT_S = 1.6

NoteRenderer = Callable[[Path, list[tuple[int, int]]], list[np.ndarray]]


def _midi(notes: list[tuple[int, int]], velocity: int = 100) -> bytes:
    """A type-0 MIDI file playing (program, note) pairs one per NOTE_SLOT_S (120 bpm, 480 tpq)."""

    def vlq(n: int) -> bytes:
        out = [n & 0x7F]
        n >>= 7
        while n:
            out.append((n & 0x7F) | 0x80)
            n >>= 7
        return bytes(reversed(out))

    tpq, per_s = 480, 960  # ticks per quarter, ticks per second at 120 bpm
    on, rest = round(NOTE_S * per_s), round((NOTE_SLOT_S - NOTE_S) * per_s)
    ev = b""
    for prog, note in notes:
        ev += vlq(0) + bytes([0xC0, prog]) + vlq(0) + bytes([0x90, note, velocity])
        ev += vlq(on) + bytes([0x80, note, 0]) + vlq(rest) + bytes([0xB0, 120, 0])
    ev += vlq(0) + b"\xff\x2f\x00"
    head = b"MThd" + struct.pack(">IHHH", 6, 0, 1, tpq)
    return head + b"MTrk" + struct.pack(">I", len(ev)) + ev


def render_notes_fluidsynth(font: Path, notes: list[tuple[int, int]]) -> list[np.ndarray]:
    """Render (program, note) pairs with the fluidsynth binary (reverb and chorus off, 16 kHz):
    one call per font; returns one (n,) float64 array of NOTE_SLOT_S per note."""
    binary = shutil.which("fluidsynth")
    if binary is None:
        raise MissingPackageError(
            f"the fluidsynth binary renders sound-font notes but is not installed; "
            f"{install_hint(['fluidsynth'])}"
        )
    with tempfile.TemporaryDirectory() as tmp:
        mid, wav = Path(tmp) / "notes.mid", Path(tmp) / "notes.wav"
        mid.write_bytes(_midi(notes))
        subprocess.run(
            [binary, "-ni", "-q", "-R", "0", "-C", "0", "-g", "1.0", "-r", str(SR),
             "-F", str(wav), str(font), str(mid)],
            check=True, capture_output=True, timeout=600,
        )  # fmt: skip
        x, rate = sf.read(wav, dtype="float64", always_2d=True)
    x = x.mean(axis=1)
    if rate != SR:
        raise RuntimeError(f"fluidsynth wrote {rate} Hz, asked for {SR}")
    slot = round(NOTE_SLOT_S * SR)
    x = np.pad(x, (0, max(0, slot * len(notes) - len(x))))
    return [x[i * slot : (i + 1) * slot] for i in range(len(notes))]


def _read_font(
    pkg: Package, root: Path, cfg: SourceConfig, renderer: NoteRenderer
) -> Iterator[Raw]:
    """Notes of GM_PROGRAMS at GM_NOTES, rendered from the package's sound font; one program's
    notes form one group (an instrument never straddles two pools)."""
    font = root / pkg.probe
    notes = [
        (prog, note - (12 if label == "bass" else 0))
        for prog, label in GM_PROGRAMS
        for note in GM_NOTES
    ]
    waves = renderer(font, notes)
    labels = dict(GM_PROGRAMS)
    for (prog, note), wave in zip(notes, waves, strict=True):
        yield Raw(
            f"{pkg.name}:program{prog}/note{note}", f"{font}", labels[prog],
            f"{pkg.name}:program{prog}", "instrument",
            lambda w=wave: (w[:, None], SR), note=note, kin=f"gm-family{prog // 8}",
        )  # fmt: skip


ESPEAK_PHRASES = (
    "hello, how are you", "the train leaves at seven", "please close the door",
    "it is going to rain today", "where is the station", "thank you very much",
    "the dog is barking", "turn left at the corner",
)  # fmt: skip


# espeak-ng voice variants (all in espeak-ng-data) with a speed (words per minute) and pitch
# (0..99) each: 15 synthetic speakers, male and female, British and American English.
ESPEAK_VOICES = (
    ("en+m1", 150, 40), ("en+m2", 170, 30), ("en+m3", 140, 50), ("en+m4", 180, 45),
    ("en+m5", 160, 35), ("en+m6", 175, 55), ("en+m7", 145, 25), ("en+f1", 165, 60),
    ("en+f2", 150, 70), ("en+f3", 185, 50), ("en+f4", 140, 65), ("en+f5", 170, 75),
    ("en-us+m3", 160, 45), ("en-us+f2", 155, 60), ("en+klatt", 165, 50),
)  # fmt: skip


def _read_espeak(pkg: Package, root: Path, cfg: SourceConfig) -> Iterator[Raw]:
    """Synthesised voices: the ten number words and a few phrases, each said by every voice of
    ESPEAK_VOICES. One voice is one group, so held-out pools hear voices that training never
    heard, saying the same words; every number word also gets a telephone-band copy."""
    binary = root / pkg.probe
    if not os.access(binary, os.X_OK):
        raise MissingPackageError(f"{binary} is not executable; {install_hint([pkg.name])}")
    texts = [(w, w) for w in NUMBER_WORDS] + [("speech (en)", p) for p in ESPEAK_PHRASES]
    for voice, speed, pitch in ESPEAK_VOICES:
        for label, text in texts:

            def load(
                t: str = text, v: str = voice, s: int = speed, p: int = pitch
            ) -> tuple[np.ndarray, int]:
                with tempfile.TemporaryDirectory() as tmp:
                    out = Path(tmp) / "s.wav"
                    subprocess.run(
                        [str(binary), "-w", str(out), "-v", v, "-s", str(s), "-p", str(p), t],
                        check=True, capture_output=True, timeout=30,
                    )  # fmt: skip
                    x, rate = sf.read(out, dtype="float64", always_2d=True)
                return x, int(rate)

            raw = Raw(
                f"{pkg.name}:{text}@{voice}", str(binary), label,
                f"{pkg.name}:{voice}", "voice", load, speech_text=text,
            )  # fmt: skip
            yield raw
            if label in NUMBER_WORDS:
                yield telephone_copy(raw)


READERS = {
    "tuxpaint": _read_tuxpaint,
    "opensfx": _read_opensfx,
    "asterisk": _read_asterisk,
    "espeak": _read_espeak,
}


# ------------------------------------------------------------------------------ decoding


def _to_mono_16k(x: np.ndarray, rate: int) -> np.ndarray:
    """(n, ch) or (n,) at `rate` -> (n',) float64 at 16 kHz."""
    mono = x.mean(axis=1) if x.ndim == 2 else x
    if rate != SR:
        from math import gcd

        from scipy.signal import resample_poly

        g = gcd(int(rate), SR)
        mono = resample_poly(mono, SR // g, int(rate) // g)
    return np.asarray(mono, dtype=np.float64)


TELEPHONE_BAND_HZ = (300.0, 3400.0)


def telephone_band(x: np.ndarray) -> np.ndarray:
    """(n,) at 16 kHz -> (2 * ceil(n / 2),) at 16 kHz as a telephone line carries it: sampled
    at 8 kHz and band-passed to TELEPHONE_BAND_HZ (4th-order Butterworth, zero phase). An odd n
    comes back one sample longer; the library trims every recording afterwards, and cutting it
    here would change the measured run's library."""
    from scipy.signal import butter, resample_poly, sosfiltfilt

    narrow = resample_poly(x, 1, 2)  # 8 kHz; resample_poly low-passes first
    sos = butter(4, TELEPHONE_BAND_HZ, btype="bandpass", fs=SR // 2, output="sos")
    return np.asarray(resample_poly(sosfiltfilt(sos, narrow), 2, 1), dtype=np.float64)


def telephone_copy(raw: Raw) -> Raw:
    """The same recording heard through a telephone band, as one more training-side recording of
    the same group and label (so it shares the original's pool and never leaks into another)."""

    def load() -> tuple[np.ndarray, int]:
        x, rate = raw.load()
        return telephone_band(_to_mono_16k(x, rate))[:, None], SR

    return replace(raw, key=f"{raw.key}/telephone", load=load)


def trim(x: np.ndarray, thresh_db: float = -45.0) -> np.ndarray:
    """Cut leading and trailing 10 ms frames more than `thresh_db` below the loudest frame."""
    hop = SR // 100
    n = len(x) // hop
    if n == 0:
        return x
    energy = (x[: n * hop].reshape(n, hop) ** 2).sum(axis=1)
    if energy.max() <= 0:
        return x[:0]
    active = np.flatnonzero(energy > energy.max() * 10 ** (thresh_db / 10))
    return x[active[0] * hop : (active[-1] + 1) * hop]


def _db(v: float) -> float:
    return round(20 * np.log10(max(v, 1e-10)), 2)


def pool_of(group: str, side: str, seed: int) -> str:
    """The pool a group goes to: a hash of (seed, group) against POOL_SHARES of its side."""
    h = hashlib.sha256(f"{seed}\n{group}".encode()).digest()
    u = int.from_bytes(h[:8], "little") / 2**64
    for pool, edge in zip(POOLS[side], np.cumsum(POOL_SHARES[side]), strict=True):
        if u < edge:
            return pool
    return POOLS[side][-1]


def check_installed(cfg: SourceConfig) -> None:
    """Raise MissingPackageError naming every missing package and the command that installs it."""
    root = Path(cfg.root)
    missing = [p for p in cfg.packages if not (root / PACKAGES[p].probe).exists()]
    if missing:
        where = ", ".join(f"{p} (no {root / PACKAGES[p].probe})" for p in missing)
        raise MissingPackageError(
            f"real-recording source packages are not installed: {where}; {install_hint(missing)}"
        )


def iter_raw(cfg: SourceConfig, renderer: NoteRenderer | None = None) -> Iterator[Raw]:
    """Every recording of the configured packages, package by package."""
    check_installed(cfg)
    root = Path(cfg.root)
    for name in cfg.packages:
        pkg = PACKAGES[name]
        if pkg.reader == "font":
            yield from _read_font(pkg, root, cfg, renderer or render_notes_fluidsynth)
        else:
            yield from READERS[pkg.reader](pkg, root, cfg)


def _config_blob(cfg: SourceConfig) -> dict:
    d = asdict(cfg)
    d.pop("root")  # where the packages are installed does not change what they hold
    return {"library_version": LIBRARY_VERSION, "config": d}


def build_library(
    cfg: SourceConfig,
    out_dir: Path,
    *,
    renderer: NoteRenderer | None = None,
    progress: bool = False,
) -> Library:
    """Decode the recordings of `cfg.packages` into `out_dir` (index.jsonl + WAVs) and return the
    library; a complete library of the same config is reused as it is."""
    out_dir = Path(out_dir)
    meta_path = out_dir / "library.json"
    blob = json.loads(json.dumps(_config_blob(cfg)))  # as read back from library.json
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == blob:
            lib = load_library(out_dir)
            intact = all(os.path.isfile(lib.path(r)) for r in lib.recordings)
            if intact and lib.fingerprint == meta.get("fingerprint"):
                return lib
    check_installed(cfg)
    root = Path(cfg.root)
    meta_path.unlink(missing_ok=True)  # written last: its presence marks a finished library
    recs: list[Recording] = []
    keys: set[str] = set()
    seen: set[str] = set()  # sha256 of the decoded copies kept so far
    for raw in iter_raw(cfg, renderer):
        _refuse_forbidden(raw.source_path.split("#")[0], root)
        if raw.key in keys:
            raise ValueError(f"duplicate recording key {raw.key}")
        keys.add(raw.key)
        pkg = PACKAGES[raw.key.split(":", 1)[0]]
        try:
            x, rate = raw.load()
        except (sf.LibsndfileError, RuntimeError, subprocess.SubprocessError) as exc:
            raise ValueError(f"cannot decode {raw.source_path}: {exc}") from exc
        x = trim(_to_mono_16k(x, rate))[: round(MAX_RECORDING_S * SR)]
        if len(x) < MIN_RECORDING_S * SR:
            continue
        x = fade(x, 0.005)
        peak = float(np.max(np.abs(x)))
        if peak <= 1e-4:
            continue
        x = x * min(1.0, 0.9 / peak)  # PCM16 without clipping; levels are kept otherwise
        pcm = np.clip(np.round(x * 32767), -32768, 32767).astype(np.int16)
        rel = f"{pkg.name}/{len([r for r in recs if r.package == pkg.name]):05d}.wav"
        data = _wav(pcm)
        sha = hashlib.sha256(data).hexdigest()
        if sha in seen:  # the same audio under another name (badger.ogg == beaver.ogg): one copy
            continue
        seen.add(sha)
        (out_dir / pkg.name).mkdir(parents=True, exist_ok=True)
        (out_dir / rel).write_bytes(data)
        y = pcm.astype(np.float64) / 32768
        recs.append(
            Recording(
                key=raw.key,
                package=pkg.name,
                source_path=raw.source_path,
                licence=raw.licence or pkg.licence,
                label=raw.label,
                group=raw.group,
                category=raw.category,
                side=pkg.side,
                pool=pool_of(raw.group, pkg.side, cfg.seed),
                file=rel,
                duration_s=round(len(pcm) / SR, 4),
                level_dbfs=_db(float(np.sqrt(np.mean(y**2)))),
                peak_dbfs=_db(float(np.max(np.abs(y)))),
                sha256=sha,
                note=raw.note,
                speech_text=raw.speech_text,
                kin=raw.kin or raw.group,
            )
        )
        if progress and len(recs) % 200 == 0:
            print(f"[sources] {len(recs)} recordings", flush=True)
    index = out_dir / "index.jsonl"
    index.write_text("".join(json.dumps(asdict(r), sort_keys=True) + "\n" for r in recs))
    lib = load_library(out_dir)
    meta = {"key": blob, "fingerprint": lib.fingerprint, "counts": counts(lib)}
    tmp = out_dir / "library.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, meta_path)
    return lib


def load_library(lib_dir: Path) -> Library:
    """Read `<lib_dir>/index.jsonl` (written by build_library)."""
    lib_dir = Path(lib_dir)
    index = lib_dir / "index.jsonl"
    if not index.is_file():
        raise FileNotFoundError(f"no recording index at {index}: run build_library first")
    text = index.read_text()
    recs = tuple(Recording(**json.loads(line)) for line in text.splitlines() if line.strip())
    return Library(str(lib_dir), recs, hashlib.sha256(text.encode()).hexdigest())


def counts(lib: Library) -> dict:
    """{pool: {category: n}} and per-package totals, for dataset.json and the docs."""
    by_pool: dict[str, dict[str, int]] = {}
    by_pkg: dict[str, int] = {}
    for r in lib.recordings:
        by_pool.setdefault(r.pool, {}).setdefault(r.category, 0)
        by_pool[r.pool][r.category] += 1
        by_pkg[r.package] = by_pkg.get(r.package, 0) + 1
    return {"pools": by_pool, "packages": by_pkg}


# ------------------------------------------------------------------------------ fixtures


@dataclass
class FixtureSpec:
    """What `write_fixture_root` lays out (every sound generated here, nothing copied)."""

    animals: tuple[str, ...] = ("dog", "cow", "duck", "frog", "bee", "owl")
    household: tuple[str, ...] = ("kettle", "saw", "toilet", "vacuum cleaner")
    music: tuple[str, ...] = ("violin", "cello", "drum")
    sfx: tuple[str, ...] = (
        '"Sheep". License: Creative Commons Zero 1.0.',
        '"Cow". Original "moo.wav" by "x". License: Creative Commons Zero 1.0.',
        '"Ship horn". License: Creative Commons Attribution 3.0 Unported.',
        '"Helicopter". License: Creative Commons Attribution-ShareAlike 3.0 Unported.',
        '"Modern jet take off". License: Creative Commons Zero 1.0.',
        '"Tropical: Bird (1)". Original "bird1.wav" by "y". License: Creative Commons Zero 1.0.',
        '"Applause". License: Creative Commons Attribution 3.0 Unported.',
        '"Splat". License: Creative Commons Zero 1.0.',
    )
    prompts: tuple[str, ...] = ("goodbye", "please-try-again", "vm-intro")
    extra: dict[str, bytes] = field(default_factory=dict)  # relative path -> file bytes


def _fixture_sound(seed: int, seconds: float, kind: str) -> np.ndarray:
    """A distinct test sound: harmonic tone with vibrato, filtered noise, or a syllable train."""
    rng = np.random.default_rng(seed)
    n = round(seconds * SR)
    t = np.arange(n) / SR
    if kind == "voice":  # syllable-gated formant buzz
        f0 = rng.uniform(100, 220)
        x = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 12))
        x *= 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 5) * t) ** 2
    elif kind == "noise":
        x = np.convolve(rng.standard_normal(n), np.hanning(int(rng.integers(3, 40))), "same")
    else:
        f0 = rng.uniform(200, 1200)
        vib = 1 + 0.02 * np.sin(2 * np.pi * rng.uniform(4, 7) * t)
        x = sum(np.sin(2 * np.pi * k * f0 * np.cumsum(vib) / SR) / k**1.5 for k in range(1, 6))
    env = np.minimum(1.0, np.minimum(t / 0.02, (t[-1] - t + 1e-3) / 0.05))
    return 0.3 * x * env / max(np.max(np.abs(x)), 1e-9)


def _wav(x: np.ndarray, rate: int = SR, fmt: str = "WAV") -> bytes:
    import io

    buf = io.BytesIO()
    sub = "PCM_16" if fmt == "WAV" else "VORBIS"
    sf.write(buf, x, rate, format=fmt, subtype=sub)
    return buf.getvalue()


def write_cat(path: Path, entries: list[tuple[str, bytes]]) -> None:
    """Write an OpenTTD-style sound catalogue (the inverse of read_cat)."""
    table = 8 * len(entries)
    body = b""
    offsets = []
    for title, wav in entries:
        t = title.encode("latin-1") + b"\0"
        offsets.append((table + len(body), len(wav)))
        body += bytes([len(t)]) + t + wav
    head = b"".join(struct.pack("<II", off, size) for off, size in offsets)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(head + body)


def write_fixture_root(root: Path, spec: FixtureSpec | None = None) -> Path:
    """A fake system root with tiny generated stand-ins of the file-based packages (tuxpaint
    stamps, an OpenSFX catalogue, asterisk prompts); for tests. Returns `root`."""
    spec = spec or FixtureSpec()
    root = Path(root)
    stamps = root / PACKAGES["tuxpaint-stamps-default"].probe
    seed = 0

    def put(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    for sub, names, kind in (
        ("animals", spec.animals, "tone"),
        ("household", spec.household, "noise"),
        ("hobbies/music", spec.music, "tone"),
    ):
        for name in names:
            seed += 1
            stem = name.replace(" ", "_")
            put(stamps / sub / f"{stem}.ogg", _wav(_fixture_sound(seed, 0.6, kind), 22050, "OGG"))
            put(stamps / sub / f"{stem}.txt", f"A {name}.\nfr.utf8=Un {name}.\n".encode())
            put(stamps / sub / f"{stem}_desc.ogg", _wav(_fixture_sound(seed + 500, 0.7, "voice")))
    for d in range(10):
        put(stamps / "symbols/math" / f"{d}.ogg", _wav(_fixture_sound(100 + d, 0.5, "voice")))
    entries = []
    for i, title in enumerate(spec.sfx):
        seconds = 3.5 if i == 2 else 0.8  # one long sound: layouts must fit it with another
        entries.append((title, _wav(_fixture_sound(200 + i, seconds, "noise"), 22050)))
    write_cat(root / PACKAGES["openttd-opensfx"].probe, entries)
    ast = root / PACKAGES["asterisk-core-sounds-en-wav"].probe
    for d in range(10):
        put(ast / "digits" / f"{d}.wav", _wav(_fixture_sound(300 + d, 0.5, "voice"), 8000))
    for i, p in enumerate(spec.prompts):
        put(ast / f"{p}.wav", _wav(_fixture_sound(400 + i, 3.5 if i == 0 else 0.9, "voice"), 8000))
    for rel, data in spec.extra.items():
        put(root / rel, data)
    return root


FIXTURE_PACKAGES = ("tuxpaint-stamps-default", "openttd-opensfx", "asterisk-core-sounds-en-wav")
