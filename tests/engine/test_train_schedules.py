"""engine.fit beyond the defaults: SGD and the poly/constant schedules, best.pt, stopping on request, sharding."""

from __future__ import annotations

import math

import pytest
import torch

from densehybrid.engine import ClosedSetObjective, TrainConfig, fit
from densehybrid.engine.batches import ResumableSampler
from densehybrid.engine.distributed import ShardedBatchSampler
from densehybrid.engine.train import _set_epoch_lr, build_optimizer, epoch_lr
from tests.helpers import tiny_model

FAST = dict(batch_size=4, lr=3e-3, device="cpu", progress=False, seed=3, num_workers=0)


def test_schedules_follow_their_formulas():
    cosine = TrainConfig(epochs=4, lr=1e-3, lr_min=1e-7)
    assert epoch_lr(1e-3, cosine, 0) == pytest.approx(1e-3) and epoch_lr(1e-3, cosine, 2) == pytest.approx(5e-4 + 5e-8)
    poly = TrainConfig(epochs=80, lr=1e-3, schedule="poly", poly_power=0.9)
    assert epoch_lr(1e-3, poly, 40) == pytest.approx(1e-3 * 0.5**0.9)
    constant = TrainConfig(epochs=10, lr=1e-6, lr_min=1e-6, schedule="constant")
    assert epoch_lr(1e-6, constant, 7) == 1e-6
    with pytest.raises(ValueError, match="`schedule` to be one of cosine, constant, poly"):
        TrainConfig(schedule="step")


@pytest.mark.parametrize(("lr", "epochs"), [(4e-4, 120), (1e-5, 40)])
def test_backbone_cosine_is_the_scaled_decoder_rate_as_released(lr, epochs):
    # The released process_lr: decoder = lr_min + (lr - lr_min) * c, backbone = that / 4 (floor lr_min / 4).
    config = TrainConfig(epochs=epochs, lr=lr, lr_min=1e-7, backbone_lr_ratio=0.25)
    optimizer = build_optimizer(tiny_model(), config)
    assert len(optimizer.param_groups) == 2
    for epoch in (0, epochs // 2, epochs - 1):
        _set_epoch_lr(optimizer, config, epoch)
        c = (1 + math.cos(math.pi * epoch / epochs)) / 2
        decoder, backbone = (g["lr"] for g in optimizer.param_groups)
        assert decoder == pytest.approx(1e-7 + (lr - 1e-7) * c, rel=1e-12)
        assert backbone == pytest.approx((1e-7 + (lr - 1e-7) * c) / 4, rel=1e-12)


def test_sgd_without_momentum_is_plain_sgd():
    model = tiny_model()
    optimizer = build_optimizer(model, TrainConfig(optimizer="sgd", lr=1e-3, backbone_lr_ratio=1.0))
    assert isinstance(optimizer, torch.optim.SGD)
    assert all(g["momentum"] == 0.0 and g["lr"] == 1e-3 for g in optimizer.param_groups)


def test_best_checkpoint_is_the_epoch_with_the_highest_metric(tiny_set, tmp_path):
    scores = iter([0.2, 0.5, 0.4])
    config = TrainConfig(epochs=3, max_steps=None, best_metric="val_score", **FAST)
    result = fit(
        tiny_model(),
        tiny_set,
        ClosedSetObjective(),
        config,
        tmp_path,
        on_epoch_end=lambda e, m: {"val_score": next(scores)},
    )
    assert [h["val_score"] for h in result.history] == [0.2, 0.5, 0.4]
    assert torch.load(tmp_path / "best.pt", weights_only=True)["epoch"] == 2
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 3


def test_stop_request_checkpoints_after_the_current_step(tiny_set, tmp_path):
    steps = []
    result = fit(
        tiny_model(),
        tiny_set,
        ClosedSetObjective(),
        TrainConfig(epochs=2, **FAST),
        tmp_path,
        on_step=lambda step, logs: steps.append(step),
        stop=lambda: len(steps) >= 3,
    )
    assert result.interrupted and not result.finished and result.global_step == 3 and steps == [1, 2, 3]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["global_step"] == 3


def test_sharded_batches_split_each_global_batch_across_ranks():
    sampler = ResumableSampler(10, seed=0, epoch=0)
    whole = list(ShardedBatchSampler(sampler, 4))
    halves = [list(ShardedBatchSampler(sampler, 4, rank, 2)) for rank in (0, 1)]
    assert len(whole) == 2 and [a + b for a, b in zip(*halves)] == whole
    with pytest.raises(ValueError, match="divisible by the world size 3"):
        ShardedBatchSampler(sampler, 4, 0, 3)
