"""predict_split's batches: grouped by clip length, and no item's numbers depend on its batch."""

import shutil

import numpy as np

from app.modeling import load_checkpoint
from training.stages.batches import length_batches


def test_length_batches_group_similar_clips_and_keep_every_item_once():
    secs = [5.0, 2.0, 3.0, 2.0, 6.0, 2.5, 4.0]
    batches = length_batches(secs, 3)
    assert batches == [[1, 3, 5], [2, 6, 0], [4]]  # ties in manifest order
    assert sorted(i for b in batches for i in b) == list(range(len(secs)))
    assert length_batches([], 4) == []


def test_predictions_do_not_depend_on_the_batching(tiny_dir, tmp_path):
    """Each item's draws are seeded by its index, and rows do not see each other: batches of 1
    (manifest order) and of 4 (length-grouped) give the same arrays, in manifest order."""
    from app.posterior import save_posterior
    from tests.conftest import random_posterior
    from training.data.generate import BenchmarkConfig, generate_benchmark
    from training.data.manifest import read_manifest
    from training.eval.predictions import predict_split

    data = tmp_path / "bench"
    sizes = {"pretrain": 0, "train": 0, "calib": 0, "test": 7, "test_shift": 0}
    generate_benchmark(BenchmarkConfig(seed=3, **sizes), data, progress=False)
    items = read_manifest(data, "test")
    assert length_batches([it.duration_s for it in items], 4) != [
        [0, 1, 2, 3],
        [4, 5, 6],
    ]  # the order really changes
    model = load_checkpoint(tiny_dir)
    post = save_posterior(
        tmp_path / "post", random_posterior(model.model, seed=4, base_hash=model.identity)
    )
    runs = []
    for batch_size in (1, 4):
        runs.append(
            predict_split(
                tiny_dir,
                post,
                data,
                "test",
                samples=3,
                batch_size=batch_size,
                progress=False,
                prefix_cache=tmp_path / f"pc{batch_size}",
            )
        )
        shutil.rmtree(post / "predictions")
    one, four = runs
    np.testing.assert_allclose(one.sample_probs, four.sample_probs, atol=1e-5)
    np.testing.assert_allclose(one.mean_probs, four.mean_probs, atol=1e-5)
    assert one.labels.tolist() == [it.answer_index for it in items]
    assert not np.allclose(one.sample_probs[:, 0], one.sample_probs[:, 1])  # real draws
