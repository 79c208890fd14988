"""Control items in training: with `uniform_controls` the LoRA stages train them towards the
uniform distribution over their choices, so the model learns to say "any answer is a guess" on
audio that holds no answer, instead of memorising the answer of the item each was made from."""

from __future__ import annotations

import pytest

from training.config import FinetuneConfig
from training.data.families import DEFAULT_FAMILIES
from training.data.generate import ABSENT_ANSWERS, BenchmarkConfig, generate_benchmark
from training.eval.predictions import predict_split
from training.stages.finetune import finetune


@pytest.fixture(scope="module")
def control_bench(tmp_path_factory):
    """Every item a control, 16 of them in `train` (silence or an unrelated noise bed under a family's question)."""
    families = tuple(f for f in DEFAULT_FAMILIES if f not in ABSENT_ANSWERS)  # "no" items
    cfg = BenchmarkConfig(
        seed=5, pretrain=8, train=16, calib=8, test=8, test_shift=8, control_fraction=1.0,
        families=families,
    )  # fmt: skip
    return generate_benchmark(cfg, tmp_path_factory.mktemp("ctrl") / "bench", progress=False)


def _max_prob(toy_base, data, out, uniform: bool) -> tuple[float, float]:
    """Train AdamW LoRA hard on the control items; (mean max prob, mean 1/n) on them."""
    cfg = FinetuneConfig(
        base_dir=toy_base, data_dir=data, out_dir=out, optimizer="adamw", epochs=15,
        batch_size=8, uniform_controls=uniform,
    )  # fmt: skip
    cfg.lora.top_layers = 2
    cfg.adamw.lr = 3e-2
    post = finetune(cfg, progress=False)
    preds = predict_split(toy_base, post, data, "train", samples=1, progress=False)
    assert (preds.families == "control").all()
    return float(preds.mean_probs.max(1).mean()), float((1.0 / preds.n_choices).mean())


def test_uniform_controls_train_towards_one_over_n(toy_base, control_bench, tmp_path):
    labelled, chance = _max_prob(toy_base, control_bench, tmp_path / "labels", uniform=False)
    uniform, _ = _max_prob(toy_base, control_bench, tmp_path / "uniform", uniform=True)
    # Trained on their labels, the same steps start memorising answers (max prob above 1/n);
    # trained towards uniform, the unanswerable items come out near 1/n.
    assert labelled > chance + 0.08
    assert uniform - chance < 0.05 and uniform - chance < 0.5 * (labelled - chance)
