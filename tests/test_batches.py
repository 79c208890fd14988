"""Batch orders of the training loops: every item once per epoch, reproducible by seed."""

import random

from training.stages.batches import bucketed_order, epoch_order


def test_epoch_order_covers_every_item_once():
    batches = epoch_order(50, 8, seed=1, epoch=2)
    assert sorted(i for b in batches for i in b) == list(range(50))
    assert batches == epoch_order(50, 8, seed=1, epoch=2)
    assert batches != epoch_order(50, 8, seed=1, epoch=3)


def test_bucketed_order_groups_similar_lengths():
    rng = random.Random(0)
    lengths = [rng.randrange(200, 600) for _ in range(1000)]
    batches = bucketed_order(lengths, 16, seed=0, epoch=0, bucket_batches=8)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert batches == bucketed_order(lengths, 16, seed=0, epoch=0, bucket_batches=8)
    assert batches != bucketed_order(lengths, 16, seed=0, epoch=1, bucket_batches=8)

    # A step costs as much as its longest clip: bucketing lowers the summed batch maxima ...
    def cost(bs):
        return sum(max(lengths[i] for i in b) for b in bs)

    assert cost(batches) < 0.85 * cost(epoch_order(1000, 16, seed=0, epoch=0))
    # ... while the batches still come in a shuffled order, not sorted by length.
    maxima = [max(lengths[i] for i in b) for b in batches]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)
