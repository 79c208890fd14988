"""Real-recording sources and families: indexing, package-based splitting, refused and missing
packages, labels checked against the audio, controls, and the synthetic benchmark left as it was.

Everything here runs on a tiny generated fixture root (sources.write_fixture_root: no recording
is copied from a package); the last tests read the installed packages and skip without them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import (
    FIXTURE_PACKAGES,
    fixture_benchmark,
    fixture_library,
    write_real_fixture_root,
)
from training.data import sources as src
from training.data.generate import (
    ABSENT_ANSWERS,
    REAL_FAMILY_NAMES,
    SPLITS,
    BenchmarkConfig,
    generate_benchmark,
    generate_item,
    split_fingerprint,
)
from training.data.manifest import read_manifest
from training.data.real_checks import Identifier, check_real_answer, pitch_shift_semitones
from training.data.scene import render
from training.data.signals import SR


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_real_fixture_root(tmp_path_factory.mktemp("root"))


@pytest.fixture(scope="module")
def cfg(root) -> BenchmarkConfig:
    return BenchmarkConfig(
        seed=2,
        pretrain=24,
        train=16,
        calib=16,
        test=16,
        test_shift=16,
        test_real=48,
        real_sources=True,
        real_packages=FIXTURE_PACKAGES,
        sources_root=str(root),
    )


@pytest.fixture(scope="module")
def library(cfg, tmp_path_factory) -> src.Library:
    return fixture_library(cfg, tmp_path_factory.mktemp("lib"))


@pytest.fixture(scope="module")
def dataset(cfg, library, tmp_path_factory) -> Path:
    return fixture_benchmark(cfg, library, tmp_path_factory.mktemp("real") / "ds")


# ----------------------------------------------------------------------------- the default


# split_fingerprint of BenchmarkConfig() and sha256 of item 7's samples, recorded before the real
# sources existed: the shipped default's data, golden answers and figures rest on them.
DEFAULT_FINGERPRINTS = {
    "pretrain": ("87bbc659a3e21082", "e09adb0325814a48"),
    "train": ("2b6d99635135ab79", "c94a31d5fec171a5"),
    "calib": ("e844b65cc96a7da6", "656b24e380ebed25"),
    "test": ("ee8ae1c799f4d271", "c7e524cc2b22bddb"),
    "test_shift": ("4a83268da023242e", "ac57991a1613aef2"),
}


def test_synthetic_benchmark_is_unchanged_with_real_sources_off():
    cfg = BenchmarkConfig()
    assert cfg.splits == SPLITS
    assert not any(k.startswith(("real", "test_real", "sources")) for k in cfg.content_dict())
    for split, (fp, pcm) in DEFAULT_FINGERPRINTS.items():
        assert split_fingerprint(cfg, split)[:16] == fp
        gen = generate_item(cfg, split, 7)
        assert hashlib.sha256(gen.pcm.tobytes()).hexdigest()[:16] == pcm
    with pytest.raises(ValueError, match="unknown split"):
        generate_item(cfg, "test_real", 0)
    with pytest.raises(ValueError, match="real_sources"):
        generate_item(cfg, "test", 0, family="sound_class")


# ----------------------------------------------------------------------------- the index


def test_index_records_path_package_licence_label_duration_level(library):
    recs = library.recordings
    assert {r.package for r in recs} == set(FIXTURE_PACKAGES)
    by_label = defaultdict(set)
    for r in recs:
        by_label[r.package].add(r.label)
        assert r.licence and r.duration_s >= src.MIN_RECORDING_S and r.duration_s <= 4.0
        assert -80 < r.level_dbfs <= r.peak_dbfs <= 0
        assert r.category in src.CATEGORIES and r.side == src.PACKAGES[r.package].side
        wav = Path(library.path(r))
        assert hashlib.sha256(wav.read_bytes()).hexdigest() == r.sha256
    tux = by_label["tuxpaint-stamps-default"]
    assert {"dog", "cow", "kettle", "violin", "vacuum cleaner", "seven", "speech (en)"} <= tux
    assert {"sheep", "cow", "ship horn", "helicopter", "jet plane", "bird", "applause"} == (
        by_label["openttd-opensfx"]
    )  # the "Splat" entry names no class and is skipped
    assert {"zero", "nine", "speech (en)"} <= by_label["asterisk-core-sounds-en-wav"]
    licences = {r.label: r.licence for r in recs if r.package == "openttd-opensfx"}
    assert licences["sheep"] == "CC0-1.0" and licences["helicopter"] == "CC-BY-SA-3.0"
    notes = [r for r in recs if r.package == "timgm6mb-soundfont"]
    assert len(notes) == len(src.GM_PROGRAMS) * len(src.GM_NOTES)
    assert all(r.category == "instrument" and r.note >= 24 for r in notes)
    assert len({r.sha256 for r in recs}) == len(recs)  # identical copies are indexed once


def test_packages_split_by_side_and_groups_never_straddle_pools(library):
    pools_of_group = defaultdict(set)
    for r in library.recordings:
        assert r.pool in src.POOLS[src.PACKAGES[r.package].side]
        pools_of_group[r.group].add(r.pool)
    assert all(len(p) == 1 for p in pools_of_group.values())
    used = {r.pool for r in library.recordings}
    assert used == {"train", "calib", "test", "test_real", "test_shift"}
    # one sound-font program's notes, a stamp's sound and its spoken name: one pool each
    prog = [r.pool for r in library.recordings if r.group.endswith("timgm6mb-soundfont:program0")]
    assert len(prog) == len(src.GM_NOTES) and len(set(prog)) == 1


def test_spoken_digits_are_one_voice_with_telephone_copies_in_its_pool(library):
    digits = [r for r in library.recordings if r.group == "tuxpaint-stamps-default:symbols/math"]
    assert len({r.pool for r in digits}) == 1  # the whole voice goes to one pool
    words = defaultdict(list)
    for r in digits:
        words[r.label].append(r.key.endswith("/telephone"))
    assert set(words) == set(src.NUMBER_WORDS)
    assert all(sorted(v) == [False, True] for v in words.values())  # original + telephone copy


def test_telephone_band_keeps_speech_frequencies_and_drops_the_rest():
    t = np.arange(SR) / SR

    def gain_db(f: float) -> float:
        x = np.sin(2 * np.pi * f * t)
        y = src.telephone_band(x)[SR // 4 : -SR // 4]  # away from the edges
        return 20 * np.log10(np.sqrt(np.mean(y**2)) / np.sqrt(0.5))

    assert len(src.telephone_band(t)) == len(t) and len(src.telephone_band(t[:-1])) == len(t)
    assert abs(gain_db(1000.0)) < 0.5
    assert gain_db(100.0) < -30 and gain_db(6000.0) < -40


def test_installed_espeak_voices_each_say_every_number_word():
    missing = _installed("espeak-ng")
    if missing:
        pytest.skip(f"not installed: {missing} ({src.install_hint(missing)})")
    pkg = src.PACKAGES["espeak-ng"]
    raws = list(src._read_espeak(pkg, Path("/"), src.SourceConfig()))
    groups = defaultdict(list)
    for raw in raws:
        groups[raw.group].append(raw)
    assert len(groups) == len(src.ESPEAK_VOICES)  # one group per voice
    for rs in groups.values():
        numbers = [r for r in rs if r.label in src.NUMBER_WORDS]
        assert sorted({r.label for r in numbers}) == sorted(src.NUMBER_WORDS)
        assert sum(r.key.endswith("/telephone") for r in numbers) == len(src.NUMBER_WORDS)
    seven = [r for r in raws if r.label == "seven" and not r.key.endswith("/telephone")]
    a, b = (src._to_mono_16k(*r.load()) for r in seven[:2])
    assert len(a) != len(b) or not np.allclose(a, b)  # the voice variant changes the audio


def test_library_is_reused_and_rebuilt_when_the_config_changes(root, library, tmp_path):
    out = tmp_path / "lib"
    files = src.SourceConfig(packages=src.FIXTURE_PACKAGES, root=str(root))
    a = src.build_library(files, out)
    assert {r.key: r.sha256 for r in a.recordings} == {
        r.key: r.sha256 for r in library.recordings if r.package in src.FIXTURE_PACKAGES
    }  # same packages, same bytes
    stamp = (out / "library.json").stat().st_mtime_ns
    assert src.build_library(files, out) == a
    assert (out / "library.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    b = src.build_library(dataclasses.replace(files, seed=1), out)
    assert b.fingerprint != a.fingerprint  # other pools


# ----------------------------------------------------------------------------- refusals


def test_forbidden_packages_are_refused(root, tmp_path):
    for bad in src.FORBIDDEN_PACKAGES:
        with pytest.raises(ValueError, match="independent check"):
            src.SourceConfig(packages=(*src.FIXTURE_PACKAGES, bad), root=str(root))
        with pytest.raises(ValueError, match="independent check"):
            BenchmarkConfig(real_sources=True, real_packages=(bad,), sources_root=str(root))
    # a recording reached through another package's folder is refused too
    fake = src.write_fixture_root(tmp_path / "r")
    theme = fake / "usr/share/sounds/freedesktop/stereo/bell.ogg"
    theme.parent.mkdir(parents=True)
    shutil.copy(next((fake / "usr/share/tuxpaint/stamps/animals").glob("dog.ogg")), theme)
    (fake / "usr/share/tuxpaint/stamps/animals/bell.ogg").symlink_to(theme)
    cfg = src.SourceConfig(packages=src.FIXTURE_PACKAGES, root=str(fake))
    with pytest.raises(ValueError, match="never used"):
        src.build_library(cfg, tmp_path / "lib")


def test_missing_package_names_it_and_the_install_command(tmp_path, monkeypatch):
    fake = src.write_fixture_root(tmp_path / "r")
    shutil.rmtree(fake / "usr/share/asterisk")
    cfg = BenchmarkConfig(
        real_sources=True, real_packages=src.FIXTURE_PACKAGES, sources_root=str(fake)
    )
    with pytest.raises(src.MissingPackageError) as err:
        generate_benchmark(cfg, tmp_path / "ds", progress=False)
    msg = str(err.value)
    assert (
        "asterisk-core-sounds-en-wav" in msg
        and "apt-get install asterisk-core-sounds-en-wav" in msg
    )
    assert "tuxpaint" not in msg.split(";")[0]  # only the missing one is named
    # the sound-font renderer is a package too
    monkeypatch.setattr(src.shutil, "which", lambda name: None)
    with pytest.raises(src.MissingPackageError, match="apt-get install fluidsynth"):
        src.render_notes_fluidsynth(Path("font.sf2"), [(0, 60)])


# ----------------------------------------------------------------------------- the benchmark


def _recordings(items) -> set[str]:
    return {k for it in items for k in str(it.difficulty.get("recordings", "")).split("|") if k}


def test_no_recording_in_two_splits_and_test_real_is_held_out(dataset, library):
    side = {r.key: r.side for r in library.recordings}
    per = {s: _recordings(read_manifest(dataset, s)) for s in (*SPLITS, "test_real")}
    per["training"] = per.pop("pretrain") | per.pop("train")  # both are training
    for a in per:
        assert per[a], f"{a} has no real recording"
        for b in per:
            if a < b:
                assert not per[a] & per[b], (a, b)
    for split in ("test_real", "test_shift"):
        assert {side[k] for k in per[split]} == {"heldout"}
    for split in ("training", "calib", "test"):
        assert {side[k] for k in per[split]} == {"train"}
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["counts"]["test_real"] == 48 and meta["sources"]["library_fingerprint"]
    assert set(meta["sources"]["packages"]) == set(FIXTURE_PACKAGES)


def test_test_real_has_every_real_family_and_controls(dataset):
    items = read_manifest(dataset, "test_real")
    fams = {it.family for it in items}
    assert set(REAL_FAMILY_NAMES) <= fams and "control" in fams
    assert all(it.family in (*REAL_FAMILY_NAMES, "control") for it in items)
    answers = defaultdict(set)
    for it in items:
        answers[it.family].add(it.answer)
        assert 2 <= len(it.choices) <= 4 and len(set(it.choices)) == len(it.choices)
    assert len(answers["source_kind"]) >= 2 and answers["speech_presence"] == {"yes", "no"}


@pytest.mark.parametrize("split", ["train", "test_real"])
@pytest.mark.parametrize("family", REAL_FAMILY_NAMES)
def test_real_labels_agree_with_independent_checker(cfg, library, family, split):
    ident = Identifier(library)
    checked = 0
    for i in range(40):  # the first 6 items that are not controls, easy to medium difficulty
        gen = generate_item(
            cfg, split, 500 + i, family=family, level=0.05 * checked, library=library
        )
        if gen.item.family == "control":
            continue
        assert check_real_answer(family, gen.example, ident) == gen.example.answer, gen.item
        assert gen.item.answer == gen.example.answer
        checked += 1
        if checked == 4:
            break
    assert checked == 4


def test_checker_catches_a_wrong_recording_label(cfg, library):
    gen = generate_item(cfg, "test", 3, family="sound_class", level=0.0, library=library)
    ident = Identifier(library)
    assert check_real_answer("sound_class", gen.example, ident) == gen.example.answer
    # relabel the library as a generator bug would (labels shifted by one recording)
    shifted = [
        dataclasses.replace(r, label=library.recordings[(i + 1) % len(library.recordings)].label)
        for i, r in enumerate(library.recordings)
    ]
    wrong = Identifier(library, tuple(shifted))
    assert check_real_answer("sound_class", gen.example, wrong) != gen.example.answer


def test_pitch_checker_hears_the_direction_not_the_note_numbers():
    t = np.arange(round(0.2 * SR)) / SR

    def note(f0):
        return sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 6))

    assert pitch_shift_semitones(note(220.0), note(220.0 * 2 ** (4 / 12))) == pytest.approx(4, 0.1)
    assert pitch_shift_semitones(note(330.0), note(330.0 * 2 ** (-7 / 12))) < 0


def test_real_controls_hold_no_event_and_use_the_split_pool(cfg, library):
    kinds, absent = set(), set()
    ident = Identifier(library)
    pool_of = {r.key: r.pool for r in library.recordings}
    for i in range(40):
        gen = generate_item(
            dataclasses.replace(cfg, test_real_control_fraction=1.0), "test_real", i,
            library=library,
        )  # fmt: skip
        assert not gen.example.scene.events
        if gen.item.difficulty.get("absent_audio"):  # presence questions: answerable, "no"
            assert gen.item.family in ABSENT_ANSWERS and gen.example.answer == "no"
            assert check_real_answer(gen.item.family, gen.example, ident) == "no"
            absent.add(gen.item.family)
            continue
        assert gen.item.family == "control"
        assert gen.item.difficulty["of_family"] not in ABSENT_ANSWERS
        kind = gen.item.difficulty["control"]
        kinds.add(kind)
        if kind == "unrelated_real":
            (key,) = str(gen.item.difficulty["recordings"]).split("|")
            assert pool_of[key] == "test_real"
        if kind == "silence":
            assert np.max(np.abs(gen.pcm)) < 100
        else:
            assert np.sqrt(np.mean(render(gen.example.scene) ** 2)) > 0.05
    assert kinds == {"silence", "unrelated", "unrelated_real"}
    assert absent == {"presence_real", "speech_presence"}


def test_real_benchmark_is_deterministic_and_resumes(cfg, dataset, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(dataset / "sources", out / "sources")
    generate_benchmark(dataclasses.replace(cfg, workers=2), out, progress=False)
    for split in cfg.splits:
        assert (out / f"{split}.jsonl").read_bytes() == (dataset / f"{split}.jsonl").read_bytes()
    assert (out / "dataset.json").read_bytes() == (dataset / "dataset.json").read_bytes()
    stamp = (out / "test_real.jsonl").stat().st_mtime_ns
    generate_benchmark(cfg, out, progress=False)
    assert (out / "test_real.jsonl").stat().st_mtime_ns == stamp


# ----------------------------------------------------------------------------- installed packages


def _installed(*names: str) -> list[str]:
    return [n for n in names if not (Path("/") / src.PACKAGES[n].probe).exists()]


def test_installed_opensfx_catalogue_is_indexed_with_labels_and_licences():
    missing = _installed("openttd-opensfx")
    if missing:
        pytest.skip(f"not installed: {missing} ({src.install_hint(missing)})")
    entries = src.read_cat(Path("/") / src.PACKAGES["openttd-opensfx"].probe)
    titles = " ".join(t.lower() for t, _ in entries)
    assert len(entries) >= 60 and "sheep" in titles and "helicopter" in titles
    assert all(wav[:4] == b"RIFF" for _, wav in entries)


def test_installed_sound_font_renders_notes_in_the_right_order():
    missing = _installed("timgm6mb-soundfont")
    if missing or shutil.which("fluidsynth") is None:
        missing = missing or ["fluidsynth"]
        pytest.skip(f"not installed: {missing} ({src.install_hint(missing)})")
    font = Path("/") / src.PACKAGES["timgm6mb-soundfont"].probe
    low, high = src.render_notes_fluidsynth(font, [(0, 57), (0, 64)])
    a, b = (x[round(0.05 * SR) : round(0.25 * SR)] for x in (low, high))
    assert np.sqrt(np.mean(a**2)) > 1e-3
    assert pitch_shift_semitones(a, b) == pytest.approx(7, abs=0.5)


# ----------------------------------------------------------------------------- controls, CLI


def test_abstention_on_controls_follows_the_servers_rule(dataset):
    from training.data.controls import abstention_on_controls, control_mask

    items = read_manifest(dataset, "test_real")
    mask = control_mask(items)
    assert 0 < mask.sum() < len(items)
    conf = np.where(mask, 0.3, 0.9)  # a predictor unsure on every control
    conf[np.flatnonzero(mask)[0]] = 0.95  # but confident on one
    calibration = {
        "targets": [
            {"max_risk": 0.05, "threshold": None},  # infeasible: always abstain
            {"max_risk": 0.2, "threshold": 0.5},
            {"max_risk": 0.3, "threshold": 0.2},
        ]
    }
    rep = abstention_on_controls(items, conf, calibration)
    n = int(mask.sum())
    assert rep["n"] == n and sum(rep["kinds"].values()) == n
    assert rep["targets"]["0.05"]["abstention"] == 1.0
    assert rep["targets"]["0.2"]["abstention"] == pytest.approx((n - 1) / n)
    assert rep["targets"]["0.3"]["abstention"] == 0.0
    low = rep["targets"]["0.2"]["abstention_lower_bound"]
    assert 0 < low < (n - 1) / n
    with pytest.raises(ValueError, match="shape"):
        abstention_on_controls(items, conf[:-1], calibration)


def test_cli_data_with_real_sources_reports_a_missing_package_in_one_line(
    tmp_path, monkeypatch, capsys
):
    from training.cli import main

    gone = dataclasses.replace(src.PACKAGES["openttd-opensfx"], probe="no/such/opensfx.cat")
    monkeypatch.setitem(src.PACKAGES, "openttd-opensfx", gone)
    args = ["data", "--real-sources", "--out", str(tmp_path / "d"), "--size", "test_real=4"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "openttd-opensfx" in err and "apt-get install" in err


def test_synthetic_families_over_real_beds_keep_their_labels(cfg, library):
    from training.data.checks import check_answer
    from training.data.families import DEFAULT_FAMILIES

    pool_of = {r.key: r.pool for r in library.recordings}
    real_bed = dataclasses.replace(cfg, real_bed_fraction=1.0)
    for i, family in enumerate(f for f in DEFAULT_FAMILIES if f != "noise_type"):
        gen = generate_item(real_bed, "calib", 700 + i, family=family, level=0.0, library=library)
        if gen.item.family == "control":
            continue
        assert gen.example.scene.bed.kind == "recording"
        assert pool_of[gen.item.difficulty["recordings"]] == "calib"
        assert check_answer(family, gen.example) == gen.example.answer, gen.item


def test_real_families_fit_the_clip_length_with_the_longest_recordings(library):
    from training.data.families import Context
    from training.data.real_families import REAL_FAMILIES, Pool, feasible
    from training.data.scene import Bed

    long = tuple(r for r in library.recordings if r.duration_s > 2.0)
    assert {r.category for r in long} >= {"voice", "machine"}
    pool = Pool(library, long)
    ctx = Context(0.9, 10.0, "sine", Bed("white", seed=0), max_duration_s=6.0)
    tried = 0
    for name, fn in REAL_FAMILIES.items():
        if not feasible(name, pool):
            continue
        for seed in range(40):
            ex = fn(np.random.default_rng(seed), ctx, pool)
            assert ex.scene.duration_s <= 6.0
            tried += 1
    assert tried >= 3 * 40
