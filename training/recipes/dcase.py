"""A DCASE 2025 Task 5 style dev set -> a dataset directory with `train` / `calib` / `test`.

The real setting fine-tunes on part of the development questions, tunes temperature and
abstention thresholds on another part and reports on the rest. The cut is seeded and stratified
by question type (`question_type` / `task` / `category` of the records, `Item.family`): each
type is shuffled on its own and cut by the fractions, so every split holds every type in about
the same proportion (a type with fewer items than splits gives its items to the first splits).
Every question about one clip lands in one split, so no test clip was heard in training.

    quaver prepare-dcase --dev task5/dev.json --audio task5/audio --out data/dcase5
    # -> data/dcase5/{train,calib,test}.jsonl, dataset.json, audio -> task5/audio (a link)
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import replace
from pathlib import Path

from training.data.formats import load_dcase_json
from training.data.manifest import Item, manifest_path, write_manifest

SPLITS = ("train", "calib", "test")
FRACTIONS = (0.6, 0.2, 0.2)  # of each question type's clips, in the order of SPLITS


def _cut(n: int, fractions: tuple[float, ...]) -> list[int]:
    """Boundaries cutting n things by `fractions` (cumulative rounding: sizes sum to n)."""
    total, acc, out = sum(fractions), 0.0, []
    for f in fractions:
        acc += f
        out.append(round(n * acc / total))
    return out


def stratified_split(
    items: list[Item], seed: int = 0, fractions: tuple[float, ...] = FRACTIONS
) -> dict[str, list[Item]]:
    """Items by split name (SPLITS), stratified by `family`, grouped by clip, seeded.

    Within a question type, the clips (not the questions) are shuffled with a generator seeded
    by (seed, type) and cut by `fractions`; a clip's questions follow it.
    """
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"need {len(SPLITS)} non-negative fractions, got {fractions}")
    by_type: dict[str, dict[str, list[Item]]] = {}
    for item in items:
        by_type.setdefault(item.family, {}).setdefault(item.audio, []).append(item)
    out: dict[str, list[Item]] = {s: [] for s in SPLITS}
    claimed: dict[str, str] = {}  # clip -> split (a clip asked about under two types stays put)
    for family in sorted(by_type):
        clips = sorted(by_type[family])
        random.Random(f"{seed}|{family}").shuffle(clips)
        start = 0
        for split, end in zip(SPLITS, _cut(len(clips), fractions), strict=True):
            for clip in clips[start:end]:
                target = claimed.setdefault(clip, split)
                out[target] += [replace(it, split=target) for it in by_type[family][clip]]
            start = end
    for split in SPLITS:
        out[split].sort(key=lambda it: it.id)
    return out


def prepare_dcase(
    dev: Path,
    audio_root: Path,
    out_dir: Path,
    seed: int = 0,
    fractions: tuple[float, ...] = FRACTIONS,
) -> Path:
    """Load the dev questions (training.data.formats.load_dcase_json), cut them, and write the
    dataset directory the stages read; its `audio` is a link to `audio_root`."""
    out_dir = Path(out_dir)
    items = load_dcase_json(Path(dev), Path(audio_root), split="dev")
    if not items:
        raise ValueError(f"{dev}: no usable questions")
    splits = stratified_split(items, seed, fractions)
    out_dir.mkdir(parents=True, exist_ok=True)
    link = out_dir / "audio"
    if link.is_symlink() or not link.exists():
        link.unlink(missing_ok=True)
        link.symlink_to(Path(audio_root).resolve(), target_is_directory=True)
    h = hashlib.sha256()
    for split, part in splits.items():
        write_manifest(out_dir, split, [replace(it, audio=f"audio/{it.audio}") for it in part])
        h.update(f"{split}\n".encode() + manifest_path(out_dir, split).read_bytes())
    meta = {
        "format_version": 1,
        "source": {"dev": str(dev), "audio_root": str(audio_root), "format": "dcase2025-task5"},
        "seed": seed,
        "fractions": dict(zip(SPLITS, fractions, strict=True)),
        "counts": {s: len(v) for s, v in splits.items()},
        "types": {
            s: {t: sum(it.family == t for it in v) for t in sorted({it.family for it in v})}
            for s, v in splits.items()
        },
        "fingerprint": h.hexdigest(),
    }
    tmp = out_dir / "dataset.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out_dir / "dataset.json")
    return out_dir
