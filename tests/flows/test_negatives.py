"""Synthetic negatives: rectangle pasting, the flow source, and real/synthetic mixtures."""

from __future__ import annotations

import math

import pytest
import torch

from densehybrid.flows import DenseFlow
from densehybrid.flows.negatives import FlowNegatives, MixedNegatives, paste_rectangles, to_8bit
from densehybrid.negatives import PasteResult


def tiny_flow(seed: int = 0) -> DenseFlow:
    torch.manual_seed(seed)
    return DenseFlow([1, 1, 1], [1, 1, 1], [8, 8, 8], growth_rate=2, coupling_depth=1, coupling_growth=8)


def batch(n: int = 2, h: int = 32, w: int = 48, value: float = 0.0):
    images = torch.full((n, 3, h, w), value)
    target = torch.randint(0, 3, (n, h, w))
    return images, target


def test_rectangles_land_whole_with_the_last_patch_on_top():
    images, target = batch(3)
    images = torch.rand(images.shape)
    patches = torch.stack([torch.full((3, 3, 8, 16), float(p + 1)) for p in range(4)], dim=1)  # (N, P, C, h, w)
    patches = patches + torch.arange(8.0).view(1, 1, 1, 8, 1) / 100  # rows tell where a patch pixel came from
    out = paste_rectangles(images, target, patches, generator=torch.Generator().manual_seed(0))
    assert out.images.shape == images.shape and out.negative_mask.dtype == torch.bool
    assert torch.equal(out.target[out.negative_mask], torch.full_like(out.target[out.negative_mask], 255))
    assert torch.equal(out.target[~out.negative_mask], target[~out.negative_mask])
    assert torch.equal(out.images[:, :, ~out.negative_mask[0]][0], images[:, :, ~out.negative_mask[0]][0])
    for n in range(3):
        # every patch is an 8x16 rectangle; the mask is their union; the top one (largest id) is fully visible
        ids = out.images[n, 0].floor()
        top_id = int(ids[out.negative_mask[n]].max())
        assert top_id == 4
        ys, xs = torch.nonzero(ids == 4, as_tuple=True)
        assert (ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) == (8, 16) and len(ys) == 128
        # rows of the visible top patch come in order 0..7
        rows = out.images[n, 0, ys.min() : ys.min() + 8, xs.min()] - 4
        assert torch.allclose(rows, torch.arange(8.0) / 100, atol=1e-5)
        assert 128 <= int(out.negative_mask[n].sum()) <= 4 * 128
    # `replaced` is what each rectangle covered before pasting
    assert out.replaced.shape == (3, 4, 3, 8, 16)


def test_replaced_content_and_gradients_through_patches():
    images = torch.rand(2, 3, 16, 24)
    target = torch.zeros(2, 16, 24, dtype=torch.long)
    patches = torch.rand(2, 1, 3, 8, 8, requires_grad=True)
    out = paste_rectangles(images, target, patches, generator=torch.Generator().manual_seed(3))
    for n in range(2):
        ys, xs = torch.nonzero(out.negative_mask[n], as_tuple=True)
        y0, x0 = int(ys.min()), int(xs.min())
        assert torch.equal(out.replaced[n, 0], images[n, :, y0 : y0 + 8, x0 : x0 + 8])
        assert torch.equal(out.images[n, :, y0 : y0 + 8, x0 : x0 + 8], patches[n, 0].detach())
    out.images.sum().backward()
    assert torch.equal(patches.grad, torch.ones_like(patches))


def test_positions_are_uniform_over_every_valid_corner():
    images, target = batch(400, 16, 16)
    patches = torch.ones(400, 1, 3, 8, 8)
    out = paste_rectangles(images, target, patches, generator=torch.Generator().manual_seed(1))
    corners = torch.stack([torch.nonzero(m)[0] for m in out.negative_mask])  # top-left pixel of each rectangle
    assert int(corners.min()) == 0 and int(corners.max()) == 8  # both extremes reached
    # 9 x 9 corners, 400 draws: every row index appears (P(miss one) < 9 * (8/9)^400)
    assert set(corners[:, 0].tolist()) == set(range(9))


def test_regions_keep_patches_inside_the_unpadded_area():
    images, target = batch(50, 32, 32)
    regions = torch.tensor([[8, 4, 16, 20]] * 50)
    out = paste_rectangles(images, target, torch.ones(50, 3, 8, 8), regions=regions)
    ys, xs = torch.nonzero(out.negative_mask.any(0), as_tuple=True)
    assert int(ys.min()) >= 8 and int(ys.max()) < 24 and int(xs.min()) >= 4 and int(xs.max()) < 24


def test_flow_source_follows_the_released_size_rules():
    flow = tiny_flow()
    source = FlowNegatives(flow, patches_per_image=3, min_side=8, max_side=24)
    assert source.sides == [8, 16, 24]
    g = torch.Generator().manual_seed(0)
    sizes = {source.sample_size(g) for _ in range(200)}
    assert sizes == {(h, w) for h in (8, 16, 24) for w in (8, 16, 24)}  # sides drawn independently
    images, target = batch(2, 32, 32)
    out = source.paste(images, target, generator=g)
    assert isinstance(out.as_paste_result(), PasteResult)
    assert out.replaced.shape[:2] == (2, 3)
    h, w = out.replaced.shape[-2:]
    for n in range(2):
        assert h * w <= int(out.negative_mask[n].sum()) <= 3 * h * w
    pasted = out.images[out.negative_mask[:, None].expand_as(out.images)]
    # The released TPAMI flow only clamps its samples to [0, 255] (no floor), in the segmenter step too.
    assert 0 <= float(pasted.min()) and float(pasted.max()) <= 1
    assert not torch.equal(pasted * 255, (pasted * 255).floor())
    assert not out.images.requires_grad
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    clamped = flow.sample(2, (16, 16), generator=g2, quantize=False)
    assert torch.equal(source.sample(2, (16, 16), g1), clamped / 255)
    assert torch.equal(clamped.floor(), flow.sample(2, (16, 16), generator=torch.Generator().manual_seed(5)))


def test_differentiable_samples_carry_gradients_to_the_flow():
    flow = tiny_flow()
    source = FlowNegatives(flow, min_side=8, max_side=16)
    images, target = batch(2, 16, 16)
    out = source.paste(images, target, generator=torch.Generator().manual_seed(0), differentiable=True)
    assert out.images.requires_grad
    (out.images * out.negative_mask[:, None]).sum().backward()
    assert flow.base_dist.loc.grad is not None and float(flow.base_dist.loc.grad.abs().sum()) > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_side": 12}, r"`min_side` to be a positive multiple of 8.*12"),
        ({"max_side": 100}, r"`max_side` to be a positive multiple of 8.*100"),
        ({"side_step": 4}, r"`side_step` to be a positive multiple of 8"),
        ({"min_side": 32, "max_side": 16}, r"`max_side` >= `min_side`"),
        ({"patches_per_image": 0}, r"`patches_per_image`"),
    ],
)
def test_bad_patch_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FlowNegatives(tiny_flow(), **kwargs)


def test_patches_larger_than_the_crop_are_refused():
    source = FlowNegatives(tiny_flow(), min_side=16, max_side=216)
    with pytest.raises(ValueError, match=r"largest patch side \(216 px.*32x48 training crop.*at most 32"):
        source.paste(*batch(1, 32, 48))
    with pytest.raises(ValueError, match=r"no larger than the 8x8 crop, but got 16x16"):
        paste_rectangles(torch.zeros(1, 3, 8, 8), torch.zeros(1, 8, 8, dtype=torch.long), torch.zeros(1, 3, 16, 16))


REAL_VALUE = 0.123456  # not a multiple of 1/255, so never a flow sample's value


def _synthetic_per_image(out: PasteResult) -> torch.Tensor:
    """True where an image's pasted pixels came from the flow (the real negatives hold REAL_VALUE)."""
    real = (out.images[:, 0] - REAL_VALUE).abs() < 1e-6
    return ~(real & out.negative_mask).flatten(1).any(dim=1)


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_mixture_pastes_the_requested_fraction(fraction):
    """Statistical test: N = 1200 images, one negative each; tolerance 4 binomial standard deviations."""
    n = 1200
    flow = tiny_flow()
    calls = []
    original = flow.sample

    def counting_sample(count, size, **kwargs):
        calls.append(count)
        return original(count, size, **kwargs)

    flow.sample = counting_sample
    mixed = MixedNegatives(FlowNegatives(flow, min_side=8, max_side=8), fraction, rect_prob=1.0, min_side=4)
    images, target = batch(n, 16, 16)
    real = torch.full((n, 3, 12, 12), REAL_VALUE)
    out = mixed.paste(images, target, real, generator=torch.Generator().manual_seed(0))
    assert out.negative_mask.flatten(1).any(dim=1).all()  # every image got its negative
    assert torch.equal(out.target[out.negative_mask], torch.full_like(out.target[out.negative_mask], 255))
    synthetic = _synthetic_per_image(out)
    observed = float(synthetic.float().mean())
    tolerance = 4 * math.sqrt(fraction * (1 - fraction) / n)
    assert abs(observed - fraction) <= tolerance + 1e-9, (observed, fraction, tolerance)
    # only the synthetic slots were sampled from the flow
    assert sum(calls) == int(synthetic.sum())


def test_mixture_slots_are_drawn_per_pasted_negative():
    """Three rounds per image: the synthetic share of all 3N slots is b (tolerance 4 standard deviations)."""
    mixed = MixedNegatives(FlowNegatives(tiny_flow(), patches_per_image=3, min_side=8, max_side=8), 0.6)
    kinds = mixed.draw_kinds(2000, torch.Generator().manual_seed(0))
    assert kinds.shape == (2000, 3)
    assert abs(float(kinds.float().mean()) - 0.6) <= 4 * math.sqrt(0.6 * 0.4 / 6000)
    # and a paste with three rounds of real negatives runs end to end
    images, target = batch(4, 32, 32)
    reals = [torch.full((4, 3, 24, 24), REAL_VALUE)] * 3
    out = mixed.paste(images, target, reals, generator=torch.Generator().manual_seed(1))
    assert out.negative_mask.flatten(1).any(dim=1).all()


def test_mixture_errors():
    source = FlowNegatives(tiny_flow(), patches_per_image=2, min_side=8, max_side=8)
    with pytest.raises(ValueError, match=r"`synthetic_fraction` to be in \[0, 1\], but got 1.5"):
        MixedNegatives(source, 1.5)
    with pytest.raises(ValueError, match=r"Expected 2 batches of real negatives"):
        MixedNegatives(source, 0.5).paste(*batch(2, 16, 16), torch.zeros(2, 3, 8, 8))


def test_to_8bit_rounds():
    x = torch.tensor([0.0, 1 / 255 - 1e-6, 0.5, 1.0, 1.2])
    assert to_8bit(x).tolist() == [0, 1, 128, 255, 255]
