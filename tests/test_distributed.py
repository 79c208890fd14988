"""torchrun with 2 CPU processes (gloo): both ranks end with the same IVON posterior, and the
exported posterior loads in the server's predictor."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app.modeling import load_checkpoint
from app.posterior import load_posterior
from app.predict import Predictor, Request
from tests.conftest import tone

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_torchrun_two_ranks_identical_posterior(toy_bench, toy_base, tmp_path):
    data, base = toy_bench, toy_base
    cfg = {
        "stage": "finetune",
        "base_dir": str(base),
        "data_dir": str(data),
        "out_dir": str(tmp_path / "run"),
        "optimizer": "ivon",
        "epochs": 2,
        "batch_size": 8,
        "lora": {"rank": 4, "top_layers": 2},
        "ivon": {"ess": 2000.0, "hess_init": 0.1, "beta2": 0.999, "clip_radius": 0.01},
    }
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "training.cli",
            "train",
            "--config",
            str(tmp_path / "ddp.yaml"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "run"
    digests = [(run / f"rank{r}.sha256").read_text() for r in (0, 1)]
    assert digests[0] == digests[1]
    loaded = load_checkpoint(base)
    post = load_posterior(run / "posterior", expected_base=loaded.identity, model=loaded.model)
    assert all((s > 0).all() for s in post.std.values())
    predictor = Predictor(loaded, post)
    [pred] = predictor.predict(
        [Request(predictor.prepare(tone(2.0), "Is there a beep?", ["yes", "no"]), samples=4)]
    )
    assert abs(pred.probs.sum() - 1) < 1e-5
