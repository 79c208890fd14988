"""The synthetic benchmark: determinism, label correctness per family, format, balance, splits,
distribution shift, resume, controls and the manifest contract."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from training.data.checks import check_answer, classify_kind
from training.data.families import DEFAULT_FAMILIES, FAMILIES, KINDS, Context, make_event
from training.data.generate import (
    SHIFT_BEDS,
    SPLITS,
    BenchmarkConfig,
    generate_benchmark,
    generate_item,
    split_fingerprint,
    wav_bytes,
)
from training.data.manifest import (
    Item,
    load_audio_file,
    manifest_path,
    read_manifest,
    write_manifest,
)
from training.data.scene import Bed, render_event
from training.data.speech import available as speech_available

TINY = BenchmarkConfig(seed=3, pretrain=20, train=20, calib=20, test=20, test_shift=20)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return generate_benchmark(TINY, tmp_path_factory.mktemp("synth") / "ds", progress=False)


def _wavs(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*.wav"))}


def _mtimes(d: Path) -> dict[str, int]:
    return {p.relative_to(d).as_posix(): p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()}


# ----------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_bytes_whatever_the_worker_count(dataset, tmp_path):
    again = generate_benchmark(dataclasses.replace(TINY, workers=2), tmp_path / "b", progress=False)
    for split in SPLITS:
        assert (
            manifest_path(again, split).read_bytes() == manifest_path(dataset, split).read_bytes()
        )
    assert _wavs(again) == _wavs(dataset)
    assert (again / "dataset.json").read_bytes() == (dataset / "dataset.json").read_bytes()


def test_other_seed_gives_other_data(dataset):
    other = dataclasses.replace(TINY, seed=4)
    a = generate_item(TINY, "test", 0)
    b = generate_item(other, "test", 0)
    assert not np.array_equal(a.pcm, b.pcm)


def test_item_does_not_depend_on_generation_order(dataset):
    items = read_manifest(dataset, "test")
    for index in (13, 2, 7):  # out of order, alone
        gen = generate_item(TINY, "test", index)
        assert gen.item == items[index]
        assert wav_bytes(gen.pcm) == (dataset / items[index].audio).read_bytes()


# ------------------------------------------------------------------------- label correctness


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "speech"])
@pytest.mark.parametrize("split", ["train", "test_shift"])
def test_labels_agree_with_independent_checker_at_easy_difficulty(family, split):
    for i in range(10):
        gen = generate_item(TINY, split, 100 + i, family=family, level=0.02 * i)
        assert gen.item.family == family
        assert gen.item.answer == gen.example.answer
        got = check_answer(family, gen.example)
        assert got == gen.example.answer, (i, gen.item.question, gen.item.difficulty)


def test_checker_catches_a_wrong_label():
    """Swapping the two levels of a loudness item flips what the checker hears."""
    gen = generate_item(TINY, "train", 5, family="loudness", level=0.0)
    ex = gen.example
    a, b = ex.scene.events
    swapped = dataclasses.replace(
        ex.scene, events=(dataclasses.replace(a, gain=b.gain), dataclasses.replace(b, gain=a.gain))
    )
    assert check_answer("loudness", ex) == ex.answer
    assert check_answer("loudness", dataclasses.replace(ex, scene=swapped)) != ex.answer


@pytest.mark.parametrize("timbre", ["sine", "square", "sawtooth"])
def test_every_sound_kind_is_recognised_from_its_clean_render(timbre):
    rng = np.random.default_rng(0)
    ctx = Context(0.0, 20.0, timbre, Bed("white"))
    for kind in KINDS:
        for _ in range(8):
            ev = make_event(kind, 0.0, {"warble": 0.4, "clicks": 0.35}.get(kind, 0.25), rng, ctx)
            assert classify_kind(render_event(ev)) == kind, ev


# ------------------------------------------------------------------------- format and layout


def test_audio_is_16k_mono_pcm16_and_short(dataset):
    for split in SPLITS:
        for item in read_manifest(dataset, split):
            info = sf.info(dataset / item.audio)
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
            assert 2.0 <= info.duration <= TINY.max_duration_s <= 10.0
            assert info.duration == pytest.approx(item.duration_s, abs=1e-3)
            wave = load_audio_file(dataset, item)
            assert wave.dtype == np.float32 and wave.ndim == 1
            assert 0.2 < np.abs(wave).max() <= 1.0


def test_items_are_well_formed(dataset):
    for split in SPLITS:
        items = read_manifest(dataset, split)
        assert len(items) == TINY.split_sizes[split]
        for it in items:
            assert it.split == split and it.family in DEFAULT_FAMILIES
            assert 2 <= len(it.choices) <= 4 and len(set(it.choices)) == len(it.choices)
            assert it.question.endswith("?")
            assert 0.0 <= it.difficulty["level"] <= 1.0
            assert it.audio == f"audio/{split}/{it.id}.wav"
        # Families rotate with the index: every family in every 20-item split.
        assert set(Counter(it.family for it in items)) == set(DEFAULT_FAMILIES)


def test_dataset_json_records_config_counts_and_fingerprint(dataset):
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["seed"] == TINY.seed and meta["sample_rate"] == 16000
    assert meta["counts"] == TINY.split_sizes
    h = hashlib.sha256()
    for split in SPLITS:
        h.update(f"{split}\n".encode())
        h.update(manifest_path(dataset, split).read_bytes())
    assert meta["fingerprint"] == h.hexdigest()


def test_answer_letters_are_uniform_and_answers_balanced():
    by_n: dict[int, Counter] = {}
    answers: dict[str, Counter] = {}
    for i in range(360):
        it = generate_item(TINY, "pretrain", i).item
        by_n.setdefault(len(it.choices), Counter())[it.answer_index] += 1
        answers.setdefault(it.family, Counter())[it.answer] += 1
    for n, counts in by_n.items():
        total = sum(counts.values())
        if total < 40:
            continue
        sigma = np.sqrt((1 / n) * (1 - 1 / n) / total)  # binomial spread of one position's share
        for pos in range(n):
            assert abs(counts[pos] / total - 1 / n) < 3.5 * sigma, (n, counts)
    for family in ("loudness", "duration", "pitch_direction", "rhythm", "presence", "timing"):
        counts = answers[family]
        n_answers = 3 if family == "timing" else 2
        assert len(counts) == n_answers and min(counts.values()) >= 5, (family, counts)


def test_difficulty_spans_easy_and_hard_items():
    levels = np.array([generate_item(TINY, "train", i).item.difficulty["level"] for i in range(90)])
    assert 0.15 < np.mean(levels >= 0.5) < 0.5  # a minority of hard items (hard_fraction 0.3)
    assert levels.min() < 0.1 and levels.max() > 0.8


# ------------------------------------------------------------------------ splits and shift


def test_no_identical_audio_across_splits(dataset):
    digests = [hashlib.sha256(b).hexdigest() for b in _wavs(dataset).values()]
    assert len(digests) == len(set(digests)) == 100


def test_shift_split_uses_held_out_noise_timbre_and_lower_snr(dataset):
    shift = read_manifest(dataset, "test_shift")
    test = read_manifest(dataset, "test")
    beds = {it.difficulty["noise"] for it in shift if it.family != "noise_type"}
    assert beds and beds <= set(SHIFT_BEDS)
    assert {it.difficulty["timbre"] for it in shift} <= {"square", "sawtooth"}
    for split in ("pretrain", "train", "calib", "test"):
        for it in read_manifest(dataset, split):
            assert it.difficulty["noise"] not in SHIFT_BEDS and it.difficulty["timbre"] == "sine"
    # Same difficulty draw, lower SNR: compare SNR net of the difficulty ramp (28 dB * level^2).
    base = lambda it: it.difficulty["snr_db"] + 28.0 * it.difficulty["level"] ** 2  # noqa: E731
    assert np.mean([base(i) for i in shift]) < np.mean([base(i) for i in test]) - 4.0


# ---------------------------------------------------------------------------------- resume


def test_resume_skips_complete_splits_and_redoes_broken_ones(tmp_path):
    cfg = dataclasses.replace(TINY, pretrain=10, train=10, calib=10, test=10, test_shift=10)
    d = generate_benchmark(cfg, tmp_path / "ds", progress=False)
    original = _wavs(d)
    before = _mtimes(d)

    generate_benchmark(cfg, d, progress=False)  # nothing to do
    after = _mtimes(d)
    assert {k: v for k, v in after.items() if k != "dataset.json"} == {
        k: v for k, v in before.items() if k != "dataset.json"
    }

    # A missing WAV and a truncated manifest mark those splits as partial.
    (d / "audio/calib/calib-000004.wav").unlink()
    text = manifest_path(d, "test").read_text().splitlines(keepends=True)
    manifest_path(d, "test").write_text("".join(text[:5]))
    generate_benchmark(cfg, d, progress=False)
    now = _mtimes(d)
    assert now["calib.jsonl"] != before["calib.jsonl"]
    assert now["test.jsonl"] != before["test.jsonl"]
    for split in ("pretrain", "train", "test_shift"):
        assert now[f"{split}.jsonl"] == before[f"{split}.jsonl"]
        assert (
            now[f"audio/{split}/{split}-000000.wav"] == before[f"audio/{split}/{split}-000000.wav"]
        )
    assert _wavs(d) == original  # regenerated bytes are the same

    # A changed split size regenerates that split only; stale files are removed.
    smaller = dataclasses.replace(cfg, train=4)
    generate_benchmark(smaller, d, progress=False)
    assert len(read_manifest(d, "train")) == 4
    assert len(list((d / "audio/train").glob("*.wav"))) == 4
    assert _mtimes(d)["pretrain.jsonl"] == before["pretrain.jsonl"]
    assert json.loads((d / "dataset.json").read_text())["counts"]["train"] == 4


# -------------------------------------------------------------------------- options, config


def test_control_items_are_silent_or_unrelated(tmp_path):
    cfg = dataclasses.replace(TINY, control_fraction=1.0)
    kinds = Counter()
    for i in range(12):
        gen = generate_item(cfg, "test", i)
        assert gen.example.scene.events == ()
        if gen.item.difficulty.get("absent_audio"):
            # a presence question over control audio: answerable, "no", as the checker hears it
            assert gen.item.family == "presence" and gen.example.answer == "no"
            assert check_answer("presence", gen.example) == "no"
            assert "control" not in gen.item.difficulty
            kinds["absent"] += 1
            continue
        assert gen.item.family == "control"
        assert gen.item.difficulty["of_family"] in DEFAULT_FAMILIES
        assert gen.item.difficulty["of_family"] != "presence"
        kind = gen.item.difficulty["control"]
        kinds[kind] += 1
        if kind == "silence":
            assert np.abs(gen.pcm).max() < 100  # about -50 dBFS peak or below
        else:
            assert gen.example.scene.bed.kind in ("white", "pink", "brown")
    assert set(kinds) == {"silence", "unrelated", "absent"}


@pytest.mark.parametrize(
    "change",
    [
        {"train": -1},
        {"families": ("count", "nope")},
        {"hard_fraction": 1.5},
        {"max_duration_s": 12.0},
        {"snr_easy_db": -5.0},
        {"workers": 0},
        {"families": ()},
        {"pretrain_weights": {"nope": 2}},
        {"pretrain_weights": {"rhythm": 0}},
        {"pretrain_weights": ("rhythm",)},
    ],
)
def test_config_rejects_bad_values(change):
    with pytest.raises(ValueError):
        dataclasses.replace(TINY, **change)


@pytest.mark.skipif(not speech_available(), reason="espeak-ng is not installed")
def test_speech_family_when_espeak_is_installed():
    cfg = dataclasses.replace(TINY, speech=True)
    gen = generate_item(cfg, "test", 0, family="speech")
    assert gen.item.family == "speech" and gen.item.answer in gen.item.choices
    assert np.abs(gen.pcm).max() > 1000


def test_speech_is_skipped_cleanly_without_espeak(monkeypatch):
    import training.data.speech as speech

    monkeypatch.setattr(speech, "available", lambda: False)
    cfg = dataclasses.replace(TINY, speech=True)
    with pytest.warns(UserWarning, match="espeak-ng"):
        fams = {generate_item(cfg, "test", i).item.family for i in range(len(DEFAULT_FAMILIES))}
    assert fams == set(DEFAULT_FAMILIES)


# -------------------------------------------------------------------------------- manifest


def test_item_json_round_trip_and_validation(tmp_path):
    item = Item(
        "a-1",
        "audio/a.wav",
        "Which?",
        ("x", "y", "z"),
        2,
        "count",
        "test",
        1.5,
        {"level": 0.25, "noise": "pink"},
    )
    assert Item.from_json(item.to_json()) == item
    assert Item.from_json(json.loads(item.to_json())) == item
    assert item.answer == "z"
    write_manifest(tmp_path, "test", [item])
    assert read_manifest(tmp_path, "test") == [item]
    with pytest.raises(ValueError):
        Item("a", "a.wav", "Q?", ("x",), 0, "f", "s", 1.0)
    with pytest.raises(ValueError):
        Item("a", "a.wav", "Q?", ("x", "y"), 2, "f", "s", 1.0)
    manifest_path(tmp_path, "bad").write_text(item.to_json() + "\n" + item.to_json() + "\n")
    with pytest.raises(ValueError, match="duplicate"):
        read_manifest(tmp_path, "bad")


def test_load_audio_file_downmixes_and_resamples(tmp_path):
    t = np.arange(44100) / 44100
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.zeros_like(t)], axis=1) * 0.5
    sf.write(tmp_path / "s.wav", stereo, 44100)
    item = Item("s", "s.wav", "Q?", ("a", "b"), 0, "f", "x", 1.0)
    wave = load_audio_file(tmp_path, item)
    assert wave.dtype == np.float32 and wave.shape == (16000,)
    assert np.sqrt(np.mean(wave[1000:-1000] ** 2)) == pytest.approx(0.25 / np.sqrt(2), rel=0.02)


def test_optional_distinct_pitches_family_can_be_enabled():
    cfg = dataclasses.replace(TINY, families=(*DEFAULT_FAMILIES, "distinct_pitches"))
    n = len(cfg.families)
    gen = generate_item(cfg, "test", n - 1)  # families rotate with the index
    assert gen.item.family == "distinct_pitches"
    assert gen.item.choices and set(gen.item.choices) == {"one", "two", "three", "four"}


def test_pretrain_weights_change_the_pretrain_mix_and_nothing_else():
    cfg = dataclasses.replace(TINY, pretrain_weights={"rhythm": 3})
    n = len(DEFAULT_FAMILIES) + 2  # one rotation: rhythm takes three slots
    counts = Counter(generate_item(cfg, "pretrain", i).item.family for i in range(2 * n))
    assert counts["rhythm"] == 6 and all(counts[f] == 2 for f in DEFAULT_FAMILIES if f != "rhythm")
    # The other splits are item for item the unweighted ones, and keep their fingerprints.
    for split in ("train", "test"):
        a, b = generate_item(cfg, split, 7), generate_item(TINY, split, 7)
        assert a.item == b.item and np.array_equal(a.pcm, b.pcm)
        assert split_fingerprint(cfg, split) == split_fingerprint(TINY, split)
    assert split_fingerprint(cfg, "pretrain") != split_fingerprint(TINY, "pretrain")
