"""Batch orders of the training loops: every item once per epoch, reproducible by seed."""

import random

import pytest

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


def test_answer_loss_by_hand():
    """Labelled rows: NLL of the label; control rows: cross-entropy to uniform over the offered
    letters only (the -inf letters past n_choices do not count)."""
    import math

    import torch

    from training.stages.batches import answer_loss

    lp = torch.log(torch.tensor([[0.7, 0.2, 0.1, 0.0], [0.5, 0.25, 0.25, 0.0], [0.9, 0.1, 0, 0]]))
    labels = torch.tensor([0, 2, 1])
    # rows offer 3, 3 and 2 letters: log 0 = -inf marks the letters past them
    none = torch.tensor([False, False, False])
    assert answer_loss(lp, labels, none).item() == pytest.approx(
        -(math.log(0.7) + math.log(0.25) + math.log(0.1)) / 3, rel=1e-6
    )
    # Row 1 and row 2 as controls: -(log .5 + log .25 + log .25) / 3 and -(log .9 + log .1) / 2.
    ctrl = torch.tensor([False, True, True])
    by_hand = (
        -math.log(0.7)
        - (math.log(0.5) + 2 * math.log(0.25)) / 3
        - (math.log(0.9) + math.log(0.1)) / 2
    ) / 3
    loss = answer_loss(lp, labels, ctrl)
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    # At the uniform distribution a control row's loss is log n, its minimum, and the gradient
    # through the -inf letters stays finite.
    logits = torch.zeros(1, 4, requires_grad=True)
    lp_u = logits.masked_fill(torch.tensor([[False, False, True, True]]), float("-inf"))
    lp_u = lp_u.log_softmax(-1)
    loss_u = answer_loss(lp_u, torch.tensor([0]), torch.tensor([True]))
    loss_u.backward()
    assert loss_u.item() == pytest.approx(math.log(2))
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().max() < 1e-6


def test_uniform_controls_is_an_added_default():
    """Runs recorded before the setting existed trained controls on their labels: they are
    still reused when it is off, and a run that turns it on is a different run."""
    from training.stages.loop import settings_diff

    assert settings_diff({"epochs": 5}, {"epochs": 5, "uniform_controls": False}) == []
    assert settings_diff({}, {"uniform_controls": True}) == ["uniform_controls: False -> True"]
