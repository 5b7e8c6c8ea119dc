"""Joint fine-tuning with a flow (the released two-step iteration) and flow pre-training through fit."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from densehybrid.engine.flow_joint import (
    build_flow_optimizer,
    flow_bits_per_dim,
    flow_joint_step,
    flow_step,
    random_crops,
    segmenter_step,
)
from densehybrid.flows import DenseFlow, load_flow_state
from densehybrid.flows.negatives import FlowNegatives, MixedNegatives, to_8bit
from densehybrid.losses import DenseHybridLoss
from tests.helpers import TinySegmentation, tiny_model


def tiny_flow(seed: int = 0) -> DenseFlow:
    torch.manual_seed(seed)
    return DenseFlow([1, 1, 1], [1, 1, 1], [8, 8, 8], growth_rate=2, coupling_depth=1, coupling_growth=8)


def joint_setup(seed: int = 0, flow_lr: float = 1e-3):
    data = TinySegmentation(n=4, size=(32, 48), seed=seed)
    images = torch.stack([data[i]["image"] for i in range(4)])
    target = torch.stack([data[i]["target"] for i in range(4)])
    model = tiny_model().train()
    flow = tiny_flow(seed).train()
    source = FlowNegatives(flow, patches_per_image=2, min_side=8, max_side=16)
    loss = DenseHybridLoss(beta=0.01, lambda_=0.1)
    seg_opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    flow_opt = build_flow_optimizer(flow, lr=flow_lr)
    return images, target, model, flow, source, loss, seg_opt, flow_opt


def test_segmenter_step_trains_the_segmenter_and_gives_the_flow_no_gradient():
    images, target, model, flow, source, loss, seg_opt, _ = joint_setup()
    before = [p.detach().clone() for p in model.parameters()]
    logs = segmenter_step(
        model,
        images,
        target,
        loss=loss,
        optimizer=seg_opt,
        negatives=source,
        generator=torch.Generator().manual_seed(0),
    )
    assert set(logs) == {"loss", "seg", "likelihood", "posterior"} and logs["likelihood"] != 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in flow.parameters())


def test_flow_step_gradient_reaches_the_flow_through_the_pasted_samples_only():
    images, target, model, flow, source, _, _, flow_opt = joint_setup()
    model_before = [p.detach().clone() for p in model.parameters()]
    flow_before = [p.detach().clone() for p in flow.parameters()]
    # MLE off: any flow gradient must come through the pasted samples and the segmenter's JSD.
    logs = flow_step(
        model,
        flow,
        images,
        target,
        optimizer=flow_opt,
        negatives=source,
        mle_weight=0.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert logs["flow_jsd"] > 0
    grads = [p.grad for p in flow.parameters()]
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert float(flow.base_dist.loc.grad.abs().sum()) > 0  # the base latent, reached only through the samples
    assert any(not torch.equal(a, b) for a, b in zip(flow_before, flow.parameters()))
    # the segmenter is neither stepped nor given gradients
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(model_before, model.parameters()))


def test_flow_step_leaves_unused_flow_parameters_without_gradient_and_unmoved():
    # The released flow step calls backward(): parameters the loss does not reach keep grad None and Adamax skips
    # them. A zero gradient would move them through the momentum of earlier steps.
    images, target, model, flow, source, _, _, _ = joint_setup()
    flow.register_parameter("unreached", torch.nn.Parameter(torch.ones(3)))
    flow_opt = build_flow_optimizer(flow, lr=1e-3)
    flow.unreached.grad = torch.ones(3)  # an earlier step that reached it: Adamax now holds momentum for it
    flow_opt.step()
    before = flow.unreached.detach().clone()
    flow_step(model, flow, images, target, optimizer=flow_opt, negatives=source, generator=torch.Generator())
    assert flow.unreached.grad is None and torch.equal(flow.unreached, before)
    assert flow.base_dist.loc.grad is not None


def test_joint_steps_lower_the_flows_bits_per_dim_on_inlier_crops():
    images, target, model, flow, source, loss, seg_opt, flow_opt = joint_setup(flow_lr=1e-2)
    g = torch.Generator().manual_seed(0)
    # A flow fresh from initialisation: ActNorm statistics from inlier crops, as pre-training's first step sets them.
    with torch.no_grad():
        flow.train().log_prob(to_8bit(random_crops(TinySegmentation(n=4, size=(32, 48)), 8, 16, g)))
    held_out = random_crops(TinySegmentation(n=8, size=(32, 48), seed=5), 8, 16, torch.Generator().manual_seed(0))
    before = flow_bits_per_dim(flow.eval(), held_out)
    flow.train()
    for _ in range(6):
        logs = flow_joint_step(
            model,
            flow,
            images,
            target,
            loss=loss,
            segmenter_optimizer=seg_opt,
            flow_optimizer=flow_opt,
            negatives=source,
            generator=g,
        )
    assert set(logs) >= {"loss", "flow_jsd", "flow_bpd"}
    after = flow_bits_per_dim(flow.eval(), held_out)
    assert after < before - 0.2, (before, after)  # measured: 8.27 -> 7.83


def test_joint_step_with_a_mixture_of_real_and_synthetic_negatives():
    images, target, model, flow, source, loss, seg_opt, flow_opt = joint_setup()
    mixed = MixedNegatives(source, 0.5)
    reals = [torch.rand(4, 3, 24, 24)] * 2
    logs = flow_joint_step(
        model,
        flow,
        images,
        target,
        loss=loss,
        segmenter_optimizer=seg_opt,
        flow_optimizer=flow_opt,
        negatives=mixed,
        real_negatives=reals,
        generator=torch.Generator().manual_seed(0),
    )
    assert logs["likelihood"] != 0 and logs["flow_bpd"] > 0
    with pytest.raises(ValueError, match="real_negatives"):
        segmenter_step(model, images, target, loss=loss, optimizer=seg_opt, negatives=mixed)


def test_pretraining_runs_in_fit_writes_a_grid_per_epoch_and_resumes(tmp_path):
    """Flow pre-training is fit with the likelihood objective: no loop of its own."""
    from densehybrid.data.transforms import AugmentedDataset, SegmentationAugment
    from densehybrid.engine import TrainConfig, fit
    from densehybrid.engine.flow_objectives import FlowLikelihoodObjective

    data = AugmentedDataset(TinySegmentation(n=6, size=(24, 24), seed=2), SegmentationAugment(16, (1.0, 1.0)), seed=0)
    held_out = random_crops(TinySegmentation(n=6, size=(24, 24), seed=7), 6, 16, torch.Generator().manual_seed(0))
    flow = tiny_flow()
    before = flow_bits_per_dim(flow.eval(), held_out)
    config = dict(batch_size=3, lr=1e-2, lr_min=1e-2, schedule="constant", optimizer="adamax", amp=False)
    config.update(backbone_lr_ratio=1.0, device="cpu", progress=False, hflip=False)
    objective = FlowLikelihoodObjective(tmp_path, grid_samples=4, grid_size=16)
    result = fit(
        flow, data, objective, TrainConfig(epochs=2, **config), out_dir=tmp_path, on_epoch_end=objective.on_epoch_end
    )
    assert result.epoch == 2 and len(result.history) == 2 and "bpd" in result.history[0]
    assert [p.name for p in objective.grids] == ["samples_epoch001.png", "samples_epoch002.png"]
    with Image.open(objective.grids[0]) as grid:
        assert grid.size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)  # 2x2 grid of 16 px samples, 2 px padding
    assert flow_bits_per_dim(flow.eval(), held_out) < before - 0.5
    # the checkpoint loads into a fresh flow of the same configuration
    fresh = tiny_flow(seed=9)
    load_flow_state(fresh, torch.load(tmp_path / "last.pt", weights_only=True)["model"])
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), flow.state_dict().values()))
    # resuming to 3 epochs trains one more epoch only, continuing the history
    again = FlowLikelihoodObjective(tmp_path, grid_samples=4, grid_size=16)
    resumed = fit(
        tiny_flow(seed=9),
        data,
        again,
        TrainConfig(epochs=3, **config),
        out_dir=tmp_path,
        resume=True,
        on_epoch_end=again.on_epoch_end,
    )
    assert resumed.epoch == 3 and len(resumed.history) == 3 and len(again.grids) == 1
    assert resumed.history[:2] == result.history
