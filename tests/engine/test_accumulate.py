"""Gradient accumulation in `fit` (`TrainConfig.accumulate`) and the per-slice generators that make W processes x A
slices draw what 1 process x W*A slices draws."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from densehybrid.engine import TrainConfig, distributed, fit
from densehybrid.models.output import HybridOutput

FAST = dict(batch_size=4, lr=1e-2, device="cpu", progress=False, seed=3, num_workers=0, hflip=False)


class _Linear(nn.Module):
    """No BatchNorm, no dropout: a step's gradient does not depend on how the batch is sliced."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Conv2d(3, 3, 3, padding=1)
        self.ood = nn.Conv2d(3, 2, 1)

    def forward(self, images: torch.Tensor, output_size=None) -> HybridOutput:
        return HybridOutput(self.head(images), self.ood(images))


class _MeanSquare:
    """A loss that averages over every pixel (equal slices: the mean of the slices' means is the batch mean), and
    records the sizes of the slices and one draw of each slice's generator."""

    name = "mean_square"

    def __init__(self) -> None:
        self.calls: list[tuple[int, float]] = []

    def __call__(self, model, images, target, generator):
        self.calls.append((images.shape[0], float(torch.rand((), generator=generator))))
        out = model(images)
        loss = (out.logits - 0.5).square().mean() + out.ood_logits.square().mean()
        return loss, {"loss": float(loss.detach())}


def test_two_accumulated_slices_take_the_step_of_the_whole_batch(tiny_set):
    whole, sliced = _Linear(), _Linear()
    whole_objective, sliced_objective = _MeanSquare(), _MeanSquare()
    first = fit(whole, tiny_set, whole_objective, TrainConfig(epochs=1, max_steps=3, **FAST))
    second = fit(sliced, tiny_set, sliced_objective, TrainConfig(epochs=1, max_steps=3, accumulate=2, **FAST))
    assert [size for size, _ in whole_objective.calls] == [4, 4, 4]
    assert [size for size, _ in sliced_objective.calls] == [2] * 6  # two slices of 2 per step
    assert first.global_step == second.global_step == 3
    for (name, a), b in zip(whole.state_dict().items(), sliced.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(whole.head.weight, _Linear().head.weight)  # it trained


def test_a_slice_draws_the_same_at_any_split_over_processes(monkeypatch):
    def draws(world_rank: int, count: int) -> list[float]:
        monkeypatch.setattr(distributed, "rank", lambda: world_rank)
        shared = torch.Generator().manual_seed(11)
        return [float(torch.rand((), generator=g)) for g in distributed.slice_generators(shared, count)]

    one_process = draws(0, 4)  # 1 process x 4 slices
    assert draws(0, 2) + draws(1, 2) == one_process  # 2 processes x 2 slices
    assert [draws(r, 1)[0] for r in range(4)] == one_process  # 4 processes x 1 slice
    assert len(set(one_process)) == 4  # the slices differ
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    shared = torch.Generator().manual_seed(11)
    assert float(torch.rand((), generator=distributed.rank_generator(shared))) == one_process[1]


def test_a_batch_that_the_slices_do_not_divide_is_refused(tiny_set):
    with pytest.raises(ValueError, match=r"divisible by the 1 process\(es\) x 3 accumulated slice"):
        fit(_Linear(), tiny_set, _MeanSquare(), TrainConfig(epochs=1, accumulate=3, **FAST))
    with pytest.raises(ValueError, match="`accumulate` to be >= 1"):
        TrainConfig(accumulate=0)


def test_gradients_are_unchanged_in_one_process():
    gradients = [torch.ones(2), None]
    assert distributed.average_gradients(gradients) is gradients
