"""The DCASE 2025 Task 5 style dev set -> train/calib/test: seeded, stratified by question type,
every clip in one split, a dataset directory the stages read."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import soundfile as sf

from training.cli import main
from training.data.manifest import load_audio_file, read_manifest
from training.recipes.dcase import SPLITS, prepare_dcase

TYPES = {"counting": 10, "temporal_order": 10, "bioacoustics": 5}


def _dev_set(root):
    """A dev file in the Task 5 layout: per type, clips with two questions each (URL refs)."""
    audio = root / "audio"
    audio.mkdir(parents=True)
    records = []
    for qtype, clips in TYPES.items():
        for c in range(clips):
            name = f"{qtype}_{c:02d}.wav"
            sf.write(audio / name, np.zeros(1600, np.float32), 16000, subtype="PCM_16")
            for q in range(2):
                records.append(
                    {
                        "id": f"{qtype}-{c}-{q}",
                        "audio_url": f"https://example.org/task5/audio/{name}",
                        "question": f"Question {q} about {name}?",
                        "choice": ["yes", "no"],
                        "answer": "yes",
                        "question_type": qtype,
                    }
                )
    (root / "dev.json").write_text(json.dumps(records))
    return root / "dev.json", audio


def _splits(out):
    return {s: read_manifest(out, s) for s in SPLITS}


def test_split_is_stratified_by_type_and_keeps_clips_together(tmp_path):
    dev, audio = _dev_set(tmp_path / "task5")
    out = prepare_dcase(dev, audio, tmp_path / "data", seed=0)
    splits = _splits(out)
    per_type = {s: Counter(it.family for it in items) for s, items in splits.items()}
    # 10 clips x 2 questions per type: 6/2/2 clips; 5 clips: 3/1/1
    assert per_type["train"] == {"counting": 12, "temporal_order": 12, "bioacoustics": 6}
    assert (
        per_type["calib"]
        == per_type["test"]
        == {
            "counting": 4,
            "temporal_order": 4,
            "bioacoustics": 2,
        }
    )
    clips = {s: {it.audio for it in items} for s, items in splits.items()}
    assert not (clips["train"] & clips["calib"] or clips["train"] & clips["test"])
    assert not clips["calib"] & clips["test"]
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["counts"] == {"train": 30, "calib": 10, "test": 10} and meta["seed"] == 0
    wave = load_audio_file(out, splits["test"][0])  # the audio is reachable from the directory
    assert wave.shape == (1600,)


def test_split_is_seeded(tmp_path):
    dev, audio = _dev_set(tmp_path / "task5")
    ids = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        splits = _splits(prepare_dcase(dev, audio, tmp_path / name, seed=seed))
        ids[name] = {s: [it.id for it in items] for s, items in splits.items()}
    assert ids["a"] == ids["b"]
    assert ids["a"] != ids["c"]
    assert (tmp_path / "a" / "dataset.json").read_text().replace('"seed": 0', "") != (
        tmp_path / "c" / "dataset.json"
    ).read_text().replace('"seed": 1', "")


def test_cli_prepares_and_reports_bad_input_in_one_line(tmp_path, capsys):
    dev, audio = _dev_set(tmp_path / "task5")
    assert (
        main(
            [
                "prepare-dcase",
                "--dev",
                str(dev),
                "--audio",
                str(audio),
                "--out",
                str(tmp_path / "d"),
            ]
        )
        == 0
    )
    assert "'train': 30" in capsys.readouterr().out
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    code = main(
        ["prepare-dcase", "--dev", str(empty), "--audio", str(audio), "--out", str(tmp_path / "e")]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no usable questions" in err


def test_real_configs_carry_the_papers_hyperparameters():
    from pathlib import Path

    from training.config import FinetuneConfig, load_config

    configs = sorted((Path(__file__).resolve().parent.parent / "configs" / "real").glob("*.yaml"))
    assert len(configs) == 4  # Qwen2.5-Omni-3B and Qwen2-Audio-7B-Instruct, IVON and AdamW
    for path in configs:
        cfg = load_config(path, FinetuneConfig)
        assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.top_layers) == (8, 16.0, None)
        assert cfg.epochs == 3 and cfg.cosine and (cfg.device, cfg.dtype) == ("cuda", "bfloat16")
        assert cfg.data_dir == Path("data/dcase5") and cfg.eval_split == "calib"
        if cfg.optimizer == "ivon":
            i = cfg.ivon
            assert (i.lr, i.ess, i.hess_init, i.weight_decay) == (0.03, 1e7, 1e-3, 0.0)
        else:
            assert (cfg.adamw.lr, cfg.adamw.weight_decay) == (5e-5, 0.0)
