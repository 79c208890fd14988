"""Projector alignment (stage 1 for a pretrained base) on the tiny model: only the projector
moves, the result loads as a checkpoint, and a stopped run resumes."""

from __future__ import annotations

import pytest
import torch

from app.modeling import load_checkpoint
from training.config import AlignConfig, PretrainConfig
from training.data.generate import BenchmarkConfig, generate_benchmark
from training.stages.pretrain import pretrain


@pytest.fixture(scope="module")
def base_and_data(tmp_path_factory):
    work = tmp_path_factory.mktemp("align")
    data = generate_benchmark(
        BenchmarkConfig(seed=7, pretrain=24, train=8, calib=8, test=4, test_shift=4),
        work / "bench",
        progress=False,
    )
    base = pretrain(
        PretrainConfig(
            data_dir=data,
            out_dir=work / "base",
            epochs=1,
            batch_size=8,
            vocab_size=600,
            warmup_steps=1,
        ),
        progress=False,
    )
    return base, data, work


def test_only_the_projector_moves(base_and_data):
    from training.align import align

    base, data, work = base_and_data
    out = align(
        AlignConfig(
            base_dir=base,
            data_dir=data,
            out_dir=work / "aligned",
            epochs=2,
            batch_size=8,
            lr=0.01,
            warmup_steps=1,
        ),
        progress=False,
    )
    before = load_checkpoint(base).model.state_dict()
    after = load_checkpoint(out).model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("model.multi_modal_projector.") for k in moved)
    log = (work / "aligned.run" / "log.jsonl").read_text().splitlines()
    assert len(log) == 2


@pytest.mark.slow
def test_resume(base_and_data, tmp_path):
    import training.align as al

    base, data, _ = base_and_data
    cfg = AlignConfig(
        base_dir=base,
        data_dir=data,
        out_dir=tmp_path / "a",
        epochs=2,
        batch_size=8,
        lr=0.01,
        warmup_steps=1,
        checkpoint_every=1,
    )
    real = torch.optim.AdamW.step
    calls = {"n": 0}

    def crash(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    torch.optim.AdamW.step = crash
    try:
        with pytest.raises(KeyboardInterrupt):
            al.align(cfg, progress=False)
    finally:
        torch.optim.AdamW.step = real
    resumed = load_checkpoint(al.align(cfg, progress=False)).model.state_dict()
    full_cfg = AlignConfig(**{**cfg.__dict__, "out_dir": tmp_path / "b"})
    full = load_checkpoint(al.align(full_cfg, progress=False)).model.state_dict()
    for k in resumed:
        if k.startswith("model.multi_modal_projector."):
            torch.testing.assert_close(resumed[k], full[k], atol=1e-6, rtol=1e-5)
