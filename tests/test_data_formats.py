"""Real-dataset loaders on tiny fixtures: DCASE 2025 Task 5 / MMAU JSON and Clotho-AQA CSV.

The fixture texts live in tests/fixtures/; their audio is written here (including an MP3 saved
under a ".wav" name, as found in the DCASE data)."""

from __future__ import annotations

import io
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from training.data.formats import (
    FormatError,
    load_clotho_aqa_csv,
    load_dcase_json,
    sniff_audio_format,
)
from training.data.manifest import load_audio_file

FIXTURES = Path(__file__).parent / "fixtures"


def _tone(seconds: float, rate: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture()
def audio_root(tmp_path) -> Path:
    root = tmp_path / "audio"
    root.mkdir()
    sf.write(root / "scene_0001.wav", _tone(1.0, 16000), 16000, subtype="PCM_16")
    # An MP3 stream behind a .wav name.
    sf.write(root / "scene_0002.wav", _tone(1.5, 22050), 22050, format="MP3")
    stereo = np.stack([_tone(0.5, 44100), _tone(0.5, 44100, 660.0)], axis=1)
    sf.write(root / "clip_a.flac", stereo, 44100)
    sf.write(root / "clip_b.wav", _tone(2.0, 16000), 16000)
    sf.write(root / "river.wav", _tone(1.0, 16000), 16000)
    sf.write(root / "street.wav", _tone(1.0, 16000), 16000)
    return root


def test_sniff_audio_format_from_bytes():
    def encoded(fmt: str) -> bytes:
        buf = io.BytesIO()
        sf.write(buf, _tone(0.2, 16000), 16000, format=fmt)
        return buf.getvalue()[:16]

    assert sniff_audio_format(encoded("WAV")) == "wav"
    assert sniff_audio_format(encoded("FLAC")) == "flac"
    assert sniff_audio_format(encoded("OGG")) == "ogg"
    assert sniff_audio_format(encoded("MP3")) == "mp3"
    assert sniff_audio_format(b"ID3\x04\x00" + b"\x00" * 11) == "mp3"
    assert sniff_audio_format(b"\x00\x00\x00\x20ftypM4A " + b"\x00" * 4) == "mp4"
    assert sniff_audio_format(b"hello world12345") == "unknown"


def test_dcase_json_list(audio_root, caplog):
    stats: Counter = Counter()
    with caplog.at_level(logging.WARNING):
        items = load_dcase_json(
            FIXTURES / "dcase_task5_sample.json", audio_root, "dev", stats=stats
        )
    assert [it.id for it in items] == ["tsqa_dev_0001", "tsqa_dev_0002", "tsqa_dev_0005"]
    first, second, letter = items
    assert first.answer == "car horn" and first.family == "temporal_order"
    assert first.audio == "scene_0001.wav" and first.split == "dev"
    assert first.difficulty["format"] == "wav" and first.duration_s == pytest.approx(1.0)
    # "Three." matches "three" (case, trailing period); the file is really an MP3.
    assert second.answer == "three" and len(second.choices) == 3
    assert second.difficulty["format"] == "mp3" and second.difficulty["declared_format"] == "wav"
    assert letter.answer == "downsweep"  # answer given as the letter "B"
    assert stats == Counter(loaded=3, answer_not_in_choices=1, missing_audio=1)
    assert "skipped 2 of 5" in caplog.text and "answer_not_in_choices: 1" in caplog.text
    # Decodes whatever the container, as 16 kHz mono float32.
    wave = load_audio_file(audio_root, second)
    assert wave.dtype == np.float32 and abs(len(wave) - 24000) < 2000


def test_dcase_strict_raises_on_bad_answer(audio_root):
    with pytest.raises(FormatError, match="not in"):
        load_dcase_json(FIXTURES / "dcase_task5_sample.json", audio_root, strict=True)


def test_mmau_jsonl_and_single_object(audio_root):
    stats: Counter = Counter()
    items = load_dcase_json(FIXTURES / "mmau_sample.jsonl", audio_root, "test", stats=stats)
    assert [it.id for it in items] == ["mmau-1", "mmau-2"]  # the duplicate id is skipped
    assert stats["duplicate_id"] == 1 and stats["loaded"] == 2
    a, b = items
    assert a.audio == "clip_a.flac" and a.answer == "joyful" and a.family == "music"
    assert a.difficulty["level_name"] == "easy" and a.difficulty["category"] == "Emotion"
    assert b.audio == "clip_b.wav" and b.answer == "flute"
    single = load_dcase_json(FIXTURES / "dcase_single.json", audio_root)
    assert len(single) == 1 and single[0].answer == "orca" and single[0].family == "species"
    assert single[0].difficulty["format"] == "flac"
    wave = load_audio_file(audio_root, single[0])  # 44.1 kHz stereo -> 16 kHz mono
    assert wave.shape == (8000,) and wave.dtype == np.float32


def test_dcase_directory_reads_every_file(audio_root, tmp_path):
    d = tmp_path / "json"
    d.mkdir()
    for name in ("dcase_single.json", "mmau_sample.jsonl"):
        (d / name).write_text((FIXTURES / name).read_text())
    items = load_dcase_json(d, audio_root)
    assert sorted(it.id for it in items) == ["bqa_dev_0042", "mmau-1", "mmau-2"]


def test_clotho_aqa_csv(audio_root, caplog):
    stats: Counter = Counter()
    with caplog.at_level(logging.WARNING):
        items = load_clotho_aqa_csv(
            FIXTURES / "clotho_aqa_sample.csv", audio_root, "test", stats=stats
        )
    assert stats == Counter(loaded=5, missing_audio=1)
    assert "missing_audio: 1" in caplog.text
    by_q = {it.question: it for it in items}
    flowing = by_q["Is there water flowing?"]
    assert flowing.choices == ("yes", "no") and flowing.answer == "yes"
    assert flowing.family == "yes_no" and flowing.difficulty["agreement"] == pytest.approx(
        2 / 3, abs=1e-3
    )
    assert by_q["Are birds singing?"].answer == "no"
    vehicle = by_q["What vehicle passes by?"]
    assert vehicle.answer == "truck" and vehicle.family == "one_word"
    assert len(vehicle.choices) == 4 and len(set(vehicle.choices)) == 4
    pool = {"water", "sand", "car", "truck", "outside", "street"}
    assert set(vehicle.choices) <= pool
    assert by_q["Where is this recorded?"].answer == "street"
    assert by_q["What is flowing in the stream?"].answer == "water"
    assert all(it.audio in ("river.wav", "street.wav") for it in items)


def test_clotho_choices_are_deterministic_per_seed(audio_root):
    path = FIXTURES / "clotho_aqa_sample.csv"
    a = load_clotho_aqa_csv(path, audio_root, seed=0)
    b = load_clotho_aqa_csv(path, audio_root, seed=0)
    assert a == b
    others = [load_clotho_aqa_csv(path, audio_root, seed=s) for s in range(1, 6)]
    one_word = lambda items: [it.choices for it in items if it.family == "one_word"]  # noqa: E731
    assert any(one_word(o) != one_word(a) for o in others)
    for o in others:
        assert [it.answer for it in o] == [it.answer for it in a]


def test_clotho_missing_columns(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("file,question\nx.wav,Is it?\n")
    with pytest.raises(FormatError, match="lacks columns"):
        load_clotho_aqa_csv(bad, tmp_path)
