"""The dataset manifest: one multiple-choice audio question per line.

Every dataset Quaver trains or evaluates on (the synthetic benchmark, converted real datasets) is
a directory laid out as

    <dir>/dataset.json                 generator config, seed, per-split counts, fingerprint
    <dir>/<split>.jsonl                one `Item` per line
    <dir>/audio/<split>/<id>.wav       16 kHz mono PCM16

and is read with

    from training.data.manifest import read_manifest, load_audio_file
    items = read_manifest(Path("data/synth"), "train")
    wave = load_audio_file(Path("data/synth"), items[0])   # (n,) float32 at 16 kHz
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16_000  # Hz; the rate of every WAV the benchmark writes and of load_audio_file
MAX_CHOICES = 10  # prompt letters A-J (app.prompt.LETTERS); the generator itself emits 2-4


@dataclass(frozen=True)
class Item:
    """One multiple-choice audio question."""

    id: str  # unique within its dataset
    audio: str  # path relative to the dataset dir (or audio root for real datasets)
    question: str
    choices: tuple[str, ...]  # 2..10 option texts in presentation order
    answer_index: int  # index into `choices` of the correct option
    family: str  # question family, e.g. "count", "loudness", or a real dataset's question_type
    split: str  # "pretrain" | "train" | "calib" | "test" | "test_shift" | a real split name
    duration_s: float  # audio duration in seconds (0.0 when unknown)
    difficulty: dict[str, float | str] = field(default_factory=dict)  # generator parameters

    def __post_init__(self) -> None:
        # Accept lists (e.g. from JSON) but store a tuple so the item stays immutable.
        if not isinstance(self.choices, tuple):
            object.__setattr__(self, "choices", tuple(self.choices))
        if not self.id:
            raise ValueError("Item.id is empty")
        if not self.question.strip():
            raise ValueError(f"Item {self.id}: question is empty")
        if not 2 <= len(self.choices) <= MAX_CHOICES:
            raise ValueError(
                f"Item {self.id}: need 2-{MAX_CHOICES} choices, got {len(self.choices)}"
            )
        if not all(isinstance(c, str) and c.strip() for c in self.choices):
            raise ValueError(f"Item {self.id}: every choice must be a non-empty string")
        if not 0 <= self.answer_index < len(self.choices):
            raise ValueError(
                f"Item {self.id}: answer_index {self.answer_index} outside 0..{len(self.choices) - 1}"
            )
        if self.duration_s < 0:
            raise ValueError(f"Item {self.id}: negative duration {self.duration_s}")

    @property
    def answer(self) -> str:
        """The text of the correct option."""
        return self.choices[self.answer_index]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (choices as a list)."""
        return {
            "id": self.id,
            "audio": self.audio,
            "question": self.question,
            "choices": list(self.choices),
            "answer_index": self.answer_index,
            "family": self.family,
            "split": self.split,
            "duration_s": self.duration_s,
            "difficulty": dict(self.difficulty),
        }

    def to_json(self) -> str:
        """One manifest line (no trailing newline); key order fixed so output is byte-stable."""
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, data: str | dict[str, Any]) -> Item:
        """Inverse of `to_json` (also accepts the already-parsed dict)."""
        obj = json.loads(data) if isinstance(data, str) else data
        try:
            return cls(
                id=str(obj["id"]),
                audio=str(obj["audio"]),
                question=str(obj["question"]),
                choices=tuple(str(c) for c in obj["choices"]),
                answer_index=int(obj["answer_index"]),
                family=str(obj.get("family", "unknown")),
                split=str(obj.get("split", "")),
                duration_s=float(obj.get("duration_s", 0.0)),
                difficulty=dict(obj.get("difficulty", {})),
            )
        except KeyError as exc:
            raise ValueError(f"manifest entry lacks field {exc.args[0]!r}") from exc


def manifest_path(dataset_dir: Path, split: str) -> Path:
    """`<dataset_dir>/<split>.jsonl`."""
    return Path(dataset_dir) / f"{split}.jsonl"


def read_manifest(dataset_dir: Path, split: str) -> list[Item]:
    """All items of `<dataset_dir>/<split>.jsonl`, in file order."""
    path = manifest_path(dataset_dir, split)
    if not path.is_file():
        raise FileNotFoundError(f"no manifest for split {split!r}: {path} does not exist")
    items: list[Item] = []
    seen: set[str] = set()
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                item = Item.from_json(line)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: {exc}") from exc
            if item.id in seen:
                raise ValueError(f"{path}:{lineno}: duplicate item id {item.id!r}")
            seen.add(item.id)
            items.append(item)
    return items


def write_manifest(dataset_dir: Path, split: str, items: Iterable[Item]) -> Path:
    """Write `<dataset_dir>/<split>.jsonl` atomically (temp file + rename); returns its path."""
    path = manifest_path(dataset_dir, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8", newline="\n") as fh:
        for item in items:
            fh.write(item.to_json() + "\n")
    os.replace(tmp, path)
    return path


def _resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Polyphase resampling (scipy) of a mono float signal."""
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(rate, target)
    return resample_poly(x, target // g, rate // g).astype(np.float32)


def load_audio_file(dataset_dir: Path, item: Item) -> np.ndarray:
    """The item's audio as (n,) float32 mono at 16 kHz (channels averaged, resampled if needed)."""
    path = Path(dataset_dir) / item.audio
    try:
        samples, rate = sf.read(path, dtype="float32", always_2d=True)  # (n, channels)
    except sf.LibsndfileError as exc:
        raise ValueError(f"cannot decode {path}: {exc}") from exc
    mono = samples.mean(axis=1)
    if rate != SAMPLE_RATE:
        mono = _resample(mono, int(rate), SAMPLE_RATE)
    return np.ascontiguousarray(mono, dtype=np.float32)
