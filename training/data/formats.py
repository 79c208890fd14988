"""Loaders that turn real audio-QA datasets into manifest `Item`s.

Two families of formats:

- DCASE 2025 Task 5 / MMAU / MMAR style JSON: one question per record with
  `id`, an audio reference (`audio_url`, `audio_path`, `audio_id`, `audio` or `file_name`),
  `question`, the options (`choice` or `choices`), `answer` (the option's text, or its letter),
  and a category (`question_type`, `task`, `category`). A file may hold a list, one object, or
  JSON Lines; a directory is read file by file in sorted order.
- Clotho-AQA CSV: `file_name, QuestionText, answer, confidence`, one row per annotator. Rows of
  the same (file, question) are merged by majority vote; yes/no questions become the 2-choice
  items ("yes", "no"); other one-word answers get 3 distractors drawn deterministically from the
  file's pool of answers (4 choices, order shuffled by seed).

Audio paths are resolved against an audio root and stored relative to it, so
`load_audio_file(audio_root, item)` reads them. The real container format is sniffed from the
first bytes (some DCASE ".wav" files are MP3) and kept in `item.difficulty["format"]`. Records
that cannot be used (answer not among the choices, missing audio, too few choices, duplicate id)
are skipped and counted; a single warning reports the counts, `strict=True` raises instead.

    items = load_dcase_json(Path("dev.json"), audio_root=Path("audio"), split="dev")
    items = load_clotho_aqa_csv(Path("clotho_aqa_test.csv"), Path("audio"), split="test")
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
import soundfile as sf

from training.data.manifest import MAX_CHOICES, Item

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".m4a")
_AUDIO_KEYS = ("audio_path", "audio_url", "audio_id", "audio", "file_name", "audio_file")
_CHOICE_KEYS = ("choices", "choice", "options")
_FAMILY_KEYS = ("question_type", "task", "category", "sub-category")


class FormatError(ValueError):
    """A record that cannot become an Item (raised only with strict=True)."""


def sniff_audio_format(head: bytes) -> str:
    """Container format from a file's first bytes: wav, flac, ogg, mp3, mp4, webm, or unknown."""
    if head[:4] in (b"RIFF", b"RIFX", b"RF64") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:3] == b"ID3":
        return "mp3"
    if len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xE0) == 0xE0 and (head[1] & 0x06):
        return "mp3"  # MPEG audio frame sync (layer bits non-zero), no ID3 tag
    if head[4:8] == b"ftyp":
        return "mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "webm"
    return "unknown"


def probe_audio(path: Path) -> tuple[str, float]:
    """(sniffed format, duration in seconds or 0.0 when libsndfile cannot read it)."""
    with path.open("rb") as fh:
        fmt = sniff_audio_format(fh.read(16))
    try:
        info = sf.info(path)
        duration = float(info.frames) / float(info.samplerate) if info.samplerate else 0.0
    except (sf.LibsndfileError, RuntimeError, ValueError):
        duration = 0.0
    return fmt, round(duration, 4)


def _norm(text: str) -> str:
    """Case/space/punctuation-insensitive form used to match answers to options."""
    return re.sub(r"[\s]+", " ", str(text)).strip().strip(".").strip().casefold()


def _first(record: dict[str, Any], keys: Iterable[str]) -> Any:
    for k in keys:
        if record.get(k) not in (None, "", []):
            return record[k]
    return None


def _resolve_audio(ref: str, audio_root: Path) -> Path | None:
    """Find the audio file a record points to; None when absent.

    URLs keep their path's last component; a bare id gets the usual extensions tried.
    """
    ref = str(ref)
    if "://" in ref:
        ref = PurePosixPath(unquote(urlparse(ref).path)).name
    candidates = [audio_root / ref, audio_root / PurePosixPath(ref).name]
    if not PurePosixPath(ref).suffix:
        candidates += [audio_root / f"{ref}{ext}" for ext in AUDIO_EXTENSIONS]
    for c in candidates:
        if c.is_file():
            return c
    return None


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()  # outside the root: keep it absolute


def _iter_json_records(path: Path) -> Iterator[dict[str, Any]]:
    """Records of one file: a JSON list, one object, a {id: record} object, or JSON Lines."""
    text = path.read_text(encoding="utf-8-sig")
    try:
        data: Any = json.loads(text) if path.suffix != ".jsonl" else None
    except json.JSONDecodeError:
        data = None  # not one JSON document: read it as JSON Lines
    if data is None:
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise FormatError(f"{path}:{lineno}: invalid JSON: {exc}") from exc
    elif isinstance(data, list):
        yield from data
    elif isinstance(data, dict) and "question" in data:
        yield data
    elif isinstance(data, dict):  # {id: record, ...}
        for key, rec in data.items():
            if isinstance(rec, dict):
                yield {"id": key, **rec}
    else:
        raise FormatError(f"{path}: expected a JSON list or object")


def _skip(stats: Counter, reason: str, message: str, strict: bool) -> None:
    stats[reason] += 1
    if strict:
        raise FormatError(message)
    log.debug("skipped: %s", message)


def _report(stats: Counter, source: Path, total: int) -> None:
    skipped = {k: v for k, v in stats.items() if k != "loaded"}
    if skipped:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items()))
        log.warning(
            "%s: skipped %d of %d questions (%s)", source, sum(skipped.values()), total, detail
        )


def record_to_item(
    rec: dict[str, Any],
    audio_root: Path,
    split: str,
    stats: Counter,
    strict: bool = False,
    index: int = 0,
) -> Item | None:
    """One DCASE/MMAU-style record -> Item, or None (counted in `stats`) when unusable."""
    rid = str(_first(rec, ("id", "question_id", "qid")) or f"{split}-{index:06d}")
    choices = _first(rec, _CHOICE_KEYS)
    question = str(rec.get("question") or "").strip()
    if not question or not isinstance(choices, list):
        _skip(stats, "malformed", f"{rid}: needs a question and a list of choices", strict)
        return None
    choices = [" ".join(str(c).split()) for c in choices]
    if not 2 <= len(choices) <= MAX_CHOICES or any(not c for c in choices):
        _skip(stats, "bad_choices", f"{rid}: {len(choices)} choices (need 2-{MAX_CHOICES})", strict)
        return None
    if len({_norm(c) for c in choices}) != len(choices):
        _skip(stats, "duplicate_choices", f"{rid}: duplicate choices {choices}", strict)
        return None
    answer = str(rec.get("answer", "")).strip()
    matches = [i for i, c in enumerate(choices) if _norm(c) == _norm(answer)]
    if not matches:  # also accept "B" or "B. text" when no option is literally "B"
        m = re.fullmatch(r"\(?([A-Ja-j])\)?(?:[.:)]\s*(.*))?", answer)
        k = ord(m.group(1).upper()) - ord("A") if m else len(choices)
        if k < len(choices) and (m.group(2) is None or _norm(m.group(2)) == _norm(choices[k])):
            matches = [k]
    if not matches:
        _skip(stats, "answer_not_in_choices", f"{rid}: answer {answer!r} not in {choices}", strict)
        return None
    ref = _first(rec, _AUDIO_KEYS)
    path = _resolve_audio(ref, audio_root) if ref else None
    if path is None:
        _skip(stats, "missing_audio", f"{rid}: audio {ref!r} not found under {audio_root}", strict)
        return None
    fmt, duration = probe_audio(path)
    difficulty: dict[str, float | str] = {"format": fmt}
    declared = path.suffix.lower().lstrip(".")
    if declared and fmt != "unknown" and declared != fmt:
        difficulty["declared_format"] = declared  # e.g. an MP3 named .wav
    for key in ("difficulty", "task", "category", "sub-category", "dataset"):
        value = rec.get(key)
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            name = "level_name" if key == "difficulty" else key  # "easy"/"hard" or a number
            difficulty[name] = value if isinstance(value, str) else float(value)
    family = str(_first(rec, _FAMILY_KEYS) or "unknown")
    stats["loaded"] += 1
    return Item(
        id=rid,
        audio=_relative(path, audio_root),
        question=question,
        choices=tuple(choices),
        answer_index=matches[0],
        family=family,
        split=split,
        duration_s=duration,
        difficulty=difficulty,
    )


def load_dcase_json(
    path: Path,
    audio_root: Path,
    split: str = "test",
    strict: bool = False,
    stats: Counter | None = None,
) -> list[Item]:
    """Items of a DCASE 2025 Task 5 / MMAU-style .json/.jsonl file or a directory of them."""
    path, audio_root = Path(path), Path(audio_root)
    files = (
        sorted(p for p in path.rglob("*") if p.suffix in (".json", ".jsonl"))
        if path.is_dir()
        else [path]
    )
    stats = stats if stats is not None else Counter()
    items: list[Item] = []
    seen: set[str] = set()
    total = 0
    for f in files:
        for rec in _iter_json_records(f):
            total += 1
            if not isinstance(rec, dict):
                _skip(stats, "malformed", f"{f}: record {total} is not an object", strict)
                continue
            item = record_to_item(rec, audio_root, split, stats, strict, index=total - 1)
            if item is None:
                continue
            if item.id in seen:
                stats["loaded"] -= 1
                _skip(stats, "duplicate_id", f"{item.id}: duplicate id", strict)
                continue
            seen.add(item.id)
            items.append(item)
    _report(stats, path, total)
    return items


_CLOTHO_COLUMNS = {
    "file_name": ("file_name", "filename", "file", "audio"),
    "question": ("questiontext", "question_text", "question"),
    "answer": ("answer",),
    "confidence": ("confidence",),
}
_CONFIDENCE_RANK = {"yes": 2, "maybe": 1, "no": 0}
YES_NO = ("yes", "no")


def _column_map(header: list[str]) -> dict[str, str]:
    lower = {h.strip().lower(): h for h in header}
    out = {}
    for key, aliases in _CLOTHO_COLUMNS.items():
        for a in aliases:
            if a in lower:
                out[key] = lower[a]
                break
    missing = {"file_name", "question", "answer"} - set(out)
    if missing:
        raise FormatError(f"Clotho-AQA CSV lacks columns {sorted(missing)}; header: {header}")
    return out


def _stable_seed(*parts: object) -> int:
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def load_clotho_aqa_csv(
    path: Path,
    audio_root: Path,
    split: str = "test",
    seed: int = 0,
    n_choices: int = 4,
    strict: bool = False,
    stats: Counter | None = None,
) -> list[Item]:
    """Items of a Clotho-AQA CSV; annotator rows merged by majority vote (ties: the answer
    given with the highest confidence, then alphabetical). `difficulty["agreement"]` is the share
    of annotators who gave the kept answer."""
    path, audio_root = Path(path), Path(audio_root)
    if not 2 <= n_choices <= MAX_CHOICES:
        raise ValueError(f"n_choices must be 2-{MAX_CHOICES}")
    stats = stats if stats is not None else Counter()
    groups: dict[tuple[str, str], list[tuple[str, str]]] = {}
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        cols = _column_map(list(reader.fieldnames or []))
        for row in reader:
            fname = (row.get(cols["file_name"]) or "").strip()
            question = " ".join((row.get(cols["question"]) or "").split())
            answer = " ".join((row.get(cols["answer"]) or "").split()).lower()
            conf = (row.get(cols.get("confidence", ""), "") or "").strip().lower()
            if not fname or not question or not answer:
                _skip(stats, "malformed", f"{path}: incomplete row {row}", strict)
                continue
            groups.setdefault((fname, question), []).append((answer, conf))
    # The pool of non-yes/no answers the distractors come from, sorted for determinism.
    pool = sorted({a for votes in groups.values() for a, _ in votes if a not in YES_NO})
    items: list[Item] = []
    for (fname, question), votes in groups.items():
        counts = Counter(a for a, _ in votes)
        best_conf = {a: max(_CONFIDENCE_RANK.get(c, 0) for b, c in votes if b == a) for a in counts}
        answer = min(counts, key=lambda a: (-counts[a], -best_conf[a], a))
        key = hashlib.sha256(f"{fname}\x1f{question}".encode()).hexdigest()[:10]
        rid = f"{PurePosixPath(fname).stem}-{key}"
        audio = _resolve_audio(fname, audio_root)
        if audio is None:
            _skip(stats, "missing_audio", f"{rid}: audio {fname!r} not found", strict)
            continue
        rng = np.random.default_rng(_stable_seed(seed, fname, question))
        if answer in YES_NO:
            choices, family = list(YES_NO), "yes_no"
        else:
            others = [a for a in pool if a != answer]
            k = min(n_choices - 1, len(others))
            if k < 1:
                _skip(stats, "no_distractors", f"{rid}: answer pool too small", strict)
                continue
            picked = [others[i] for i in sorted(rng.choice(len(others), size=k, replace=False))]
            choices = [answer, *picked]
            choices = [choices[i] for i in rng.permutation(len(choices))]
            family = "one_word"
        fmt, duration = probe_audio(audio)
        stats["loaded"] += 1
        items.append(
            Item(
                id=rid,
                audio=_relative(audio, audio_root),
                question=question,
                choices=tuple(choices),
                answer_index=choices.index(answer),
                family=family,
                split=split,
                duration_s=duration,
                difficulty={
                    "format": fmt,
                    "agreement": round(counts[answer] / len(votes), 4),
                    "annotators": float(len(votes)),
                },
            )
        )
    _report(stats, path, len(groups))
    return items
