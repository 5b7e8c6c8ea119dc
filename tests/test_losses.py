"""Tests for densehybrid.losses: formulas by hand, the released code's computation, gradients, variants, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special as sp
import torch
import torch.nn.functional as F

from densehybrid.losses import DenseHybridLoss, LossOutput, SegmentationLoss, densehybrid_loss, segmentation_loss

K = 4


def _batch(seed: int = 0, n: int = 2, h: int = 5, w: int = 6, requires_grad: bool = False):
    """Random logits, ood_logits, target with void pixels, and a negative mask (negatives labelled ignore)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, K, h, w, generator=gen, dtype=torch.float64) * 2
    ood_logits = torch.randn(n, 2, h, w, generator=gen, dtype=torch.float64)
    target = torch.randint(0, K, (n, h, w), generator=gen)
    target[torch.rand(n, h, w, generator=gen) < 0.2] = 255
    negative_mask = torch.zeros(n, h, w, dtype=torch.bool)
    negative_mask[:, 1:3, 2:5] = True
    target[negative_mask] = 255
    if requires_grad:
        logits.requires_grad_(True)
        ood_logits.requires_grad_(True)
    return logits, ood_logits, target, negative_mask


def _released_code_loss(logits, ood_logits, target, negative_mask, beta=0.03):
    """The released training step's loss (semseg_negatives_joint_th.py), minus its gradient-free regulariser."""
    label = target.clone()
    label[label == 255] = K  # the released code uses K as the ignore id
    label_ood = negative_mask.long()
    loss_seg = F.nll_loss(F.log_softmax(logits, dim=1), label, ignore_index=K)
    lse = torch.logsumexp(logits, 1) * label_ood
    loss_ood = lse.sum() / label_ood[label_ood == 1].numel()
    loss_th = F.nll_loss(F.log_softmax(ood_logits, dim=1), label_ood)
    return loss_seg + beta * loss_ood + beta * 10 * loss_th


def test_total_matches_released_code_computation():
    logits, ood_logits, target, negative_mask = _batch()
    out = densehybrid_loss(logits, ood_logits, target, negative_mask)
    assert isinstance(out, LossOutput)
    torch.testing.assert_close(out.total, _released_code_loss(logits, ood_logits, target, negative_mask))
    torch.testing.assert_close(out.total, out.seg + 0.03 * out.likelihood + 0.3 * out.posterior)


def test_total_on_hand_computed_case():
    # One image of 1x3 pixels, K = 2: an inlier (class 1), a void pixel and a negative.
    logits = torch.tensor([[[[1.0, 0.0, 2.0]], [[3.0, 5.0, 2.0]]]], dtype=torch.float64)
    ood_logits = torch.tensor([[[[0.0, 1.0, 0.0]], [[0.0, 0.0, 2.0]]]], dtype=torch.float64)
    target = torch.tensor([[[1, 255, 255]]])
    negative_mask = torch.tensor([[[False, False, True]]])
    seg = -(3.0 - math.log(math.exp(1.0) + math.exp(3.0)))
    lik = math.log(2 * math.exp(2.0))  # logsumexp of the negative pixel only
    post = (
        -(0.0 - math.log(2.0))  # inlier: d_in with ood logits (0, 0)
        - (1.0 - math.log(math.exp(1.0) + 1.0))  # void pixel also counts as d_in (released code)
        - (2.0 - math.log(1.0 + math.exp(2.0)))  # negative: d_out
    ) / 3
    out = densehybrid_loss(logits, ood_logits, target, negative_mask)
    for got, want in zip(out, (seg + 0.03 * lik + 0.3 * post, seg, lik, post)):
        assert got.item() == pytest.approx(want, rel=1e-12)
    # Excluding void from the posterior term drops the middle pixel.
    post_no_void = (math.log(2.0) - (2.0 - math.log(1.0 + math.exp(2.0)))) / 2
    out = densehybrid_loss(logits, ood_logits, target, negative_mask, posterior_ignore_void=True)
    assert out.posterior.item() == pytest.approx(post_no_void, rel=1e-12)


def test_negatives_get_no_cross_entropy_gradient():
    logits, ood_logits, target, negative_mask = _batch(requires_grad=True)
    target[negative_mask] = 1  # even when a caller leaves class ids under the negatives
    out = densehybrid_loss(logits, ood_logits, target, negative_mask)
    (grad,) = torch.autograd.grad(out.seg, logits)
    per_pixel = grad.abs().sum(dim=1)
    assert (per_pixel[negative_mask] == 0).all()
    inliers = (target != 255) & ~negative_mask
    assert (per_pixel[inliers] > 0).all()
    assert (per_pixel[(target == 255) & ~negative_mask] == 0).all()


def test_likelihood_term_touches_only_negative_pixels():
    logits, ood_logits, target, negative_mask = _batch(requires_grad=True)
    out = densehybrid_loss(logits, ood_logits, target, negative_mask)
    (grad,) = torch.autograd.grad(out.likelihood, logits)
    per_pixel = grad.abs().sum(dim=1)
    assert (per_pixel[~negative_mask] == 0).all()
    # d/ds mean_O LSE(s) = softmax(s) / |O| on negative pixels.
    expected = torch.softmax(logits.detach(), dim=1) / negative_mask.sum()
    torch.testing.assert_close(grad.permute(0, 2, 3, 1)[negative_mask], expected.permute(0, 2, 3, 1)[negative_mask])


def test_posterior_term_counts_every_valid_pixel():
    logits, ood_logits, target, negative_mask = _batch(requires_grad=True)
    void = (target == 255) & ~negative_mask
    assert void.any()
    out = densehybrid_loss(logits, ood_logits, target, negative_mask)
    (grad,) = torch.autograd.grad(out.posterior, ood_logits)
    assert (grad.abs().sum(dim=1) > 0).all()  # default: every pixel, void included
    ce = F.cross_entropy(ood_logits.detach(), negative_mask.long(), reduction="none")
    assert out.posterior.item() == pytest.approx(ce.mean().item())

    out = densehybrid_loss(logits, ood_logits, target, negative_mask, posterior_ignore_void=True)
    (grad,) = torch.autograd.grad(out.posterior, ood_logits)
    per_pixel = grad.abs().sum(dim=1)
    assert (per_pixel[void] == 0).all() and (per_pixel[~void] > 0).all()
    assert out.posterior.item() == pytest.approx(ce[~void].mean().item())


def test_paired_likelihood_formula_and_shift_invariance():
    logits, ood_logits, target, negative_mask = _batch()
    inliers = (target != 255) & ~negative_mask
    lse = torch.logsumexp(logits, dim=1)
    out = densehybrid_loss(logits, ood_logits, target, negative_mask, likelihood="paired")
    torch.testing.assert_close(out.likelihood, lse[negative_mask].mean() - lse[inliers].mean())
    torch.testing.assert_close(out.total, out.seg + 0.03 * out.likelihood + 0.3 * out.posterior)
    # ln Z cancels: adding a constant to every logit changes the unpaired term but not the paired one.
    shifted = densehybrid_loss(logits + 7.0, ood_logits, target, negative_mask, likelihood="paired")
    torch.testing.assert_close(shifted.likelihood, out.likelihood)
    plain = densehybrid_loss(logits, ood_logits, target, negative_mask)
    plain_shifted = densehybrid_loss(logits + 7.0, ood_logits, target, negative_mask)
    assert plain_shifted.likelihood.item() == pytest.approx(plain.likelihood.item() + 7.0)


def _jsd_reference(logits: np.ndarray) -> np.ndarray:
    p = sp.softmax(logits, axis=1)
    u = np.full_like(p, 1.0 / p.shape[1])
    m = (p + u) / 2
    return 0.5 * sp.rel_entr(p, m).sum(axis=1) + 0.5 * sp.rel_entr(u, m).sum(axis=1)


def test_jsd_negative_loss_formula():
    logits, ood_logits, target, negative_mask = _batch(seed=1)
    out = densehybrid_loss(logits, ood_logits, target, negative_mask, negative_loss="jsd")
    ref = _jsd_reference(logits.numpy())[negative_mask.numpy()].mean()
    assert out.likelihood.item() == pytest.approx(ref, rel=1e-10)
    torch.testing.assert_close(out.total, out.seg + 0.03 * out.likelihood + 0.3 * out.posterior)
    maps = densehybrid_loss(logits, ood_logits, target, negative_mask, negative_loss="jsd", reduction="none")
    np.testing.assert_allclose(maps.likelihood.numpy(), np.where(negative_mask, _jsd_reference(logits.numpy()), 0))
    # Bounds: 0 for a uniform prediction, below ln 2 always, and finite for one-hot-like logits.
    flat = densehybrid_loss(
        torch.zeros(1, K, 2, 2), None, torch.full((1, 2, 2), 255), torch.ones(1, 2, 2), negative_loss="jsd"
    )
    assert flat.likelihood.item() == pytest.approx(0.0, abs=1e-7)
    sharp = torch.zeros(1, K, 2, 2)
    sharp[:, 0] = 1e4
    sharp_out = densehybrid_loss(sharp, None, torch.full((1, 2, 2), 255), torch.ones(1, 2, 2), negative_loss="jsd")
    assert sharp_out.likelihood.item() == pytest.approx(_jsd_reference(sharp.double().numpy()).mean(), rel=1e-5)
    assert 0 < sharp_out.likelihood.item() < math.log(2)


def test_no_negative_pixels_gives_zero_likelihood():
    logits, ood_logits, target, _ = _batch(requires_grad=True)
    none = torch.zeros_like(target, dtype=torch.bool)
    for variant in ({}, {"likelihood": "paired"}, {"negative_loss": "jsd"}):
        out = densehybrid_loss(logits, ood_logits, target, none, **variant)
        assert torch.isfinite(out.total)
        if variant.get("likelihood") != "paired":
            assert out.likelihood.item() == 0.0
        out.total.backward()
        assert torch.isfinite(logits.grad).all()
    all_void = torch.full_like(target, 255)
    out = densehybrid_loss(logits, ood_logits, all_void, none)
    assert out.seg.item() == 0.0 and torch.isfinite(out.total)


def test_reductions_agree():
    logits, ood_logits, target, negative_mask = _batch()
    inliers = (target != 255) & ~negative_mask
    for variant in ({}, {"likelihood": "paired"}, {"negative_loss": "jsd", "posterior_ignore_void": True}):
        maps = densehybrid_loss(logits, ood_logits, target, negative_mask, reduction="none", **variant)
        sums = densehybrid_loss(logits, ood_logits, target, negative_mask, reduction="sum", **variant)
        means = densehybrid_loss(logits, ood_logits, target, negative_mask, **variant)
        assert all(m.shape == target.shape for m in maps)
        for m, s in zip(maps, sums):
            torch.testing.assert_close(m.sum(), s)
        torch.testing.assert_close(maps.total, maps.seg + 0.03 * maps.likelihood + 0.3 * maps.posterior)
        torch.testing.assert_close(means.seg, sums.seg / inliers.sum())
        assert (maps.seg[~inliers] == 0).all()


def test_module_twin_equals_function_and_validates_options():
    logits, ood_logits, target, negative_mask = _batch()
    options = {"beta": 0.1, "lambda_": 0.5, "likelihood": "paired", "posterior_ignore_void": True}
    module_out = DenseHybridLoss(**options)(logits, ood_logits, target, negative_mask)
    for a, b in zip(module_out, densehybrid_loss(logits, ood_logits, target, negative_mask, **options)):
        torch.testing.assert_close(a, b)
    assert "paired" in repr(DenseHybridLoss(likelihood="paired"))
    with pytest.raises(ValueError, match="`likelihood`"):
        DenseHybridLoss(likelihood="paired", negative_loss="jsd")
    with pytest.raises(ValueError, match="`reduction`"):
        DenseHybridLoss(reduction="avg")
    with pytest.raises(ValueError, match="`beta`"):
        DenseHybridLoss(beta=-1.0)


def test_optional_ood_logits_vector_inputs_and_low_precision():
    logits, _, target, negative_mask = _batch()
    out = densehybrid_loss(logits, None, target, negative_mask)
    assert out.posterior.item() == 0.0
    torch.testing.assert_close(out.total, out.seg + 0.03 * out.likelihood)
    # (N, K) per-vector inputs, e.g. a 2-D toy MLP.
    vec_logits = logits.permute(0, 2, 3, 1).reshape(-1, K)
    vec_ood = torch.randn(vec_logits.shape[0], 2, dtype=torch.float64)
    vec = densehybrid_loss(vec_logits, vec_ood, target.reshape(-1), negative_mask.reshape(-1))
    dense = densehybrid_loss(
        logits, vec_ood.reshape(2, 5, 6, 2).permute(0, 3, 1, 2), target, negative_mask.to(torch.uint8)
    )
    for a, b in zip(vec, dense):
        torch.testing.assert_close(a, b)
    low = densehybrid_loss(logits.bfloat16() * 1e3, None, target, negative_mask.float())
    assert low.total.dtype == torch.float32 and torch.isfinite(low.total)


def test_ids_under_negatives_are_not_checked():
    logits, ood_logits, target, negative_mask = _batch()
    released_encoding = target.clone()
    released_encoding[negative_mask] = K + 1  # the released code marks negatives with K + 1 before relabelling
    out = densehybrid_loss(logits, ood_logits, released_encoding, negative_mask)
    torch.testing.assert_close(out.total, densehybrid_loss(logits, ood_logits, target, negative_mask).total)


def test_bad_inputs_name_the_argument():
    logits, ood_logits, target, negative_mask = _batch()
    bad_target = target.clone()
    bad_target[0, 0, 0] = K
    with pytest.raises(ValueError, match=r"`target` ids in \[0, 4\) or the ignore index 255, but got \[4\]"):
        densehybrid_loss(logits, ood_logits, bad_target, negative_mask)
    bad_target[0, 0, 0] = -1
    with pytest.raises(ValueError, match="`target`"):
        segmentation_loss(logits, bad_target)
    nan_logits = logits.clone()
    nan_logits[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="`logits` to contain no NaN"):
        densehybrid_loss(nan_logits, ood_logits, target, negative_mask)
    with pytest.raises(ValueError, match="`logits` to contain no NaN"):
        segmentation_loss(nan_logits, target)
    nan_ood = ood_logits.clone()
    nan_ood[1, 1, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="`ood_logits` to contain no NaN"):
        densehybrid_loss(logits, nan_ood, target, negative_mask)
    with pytest.raises(ValueError, match="`logits`"):
        densehybrid_loss(logits[0], ood_logits, target, negative_mask)
    with pytest.raises(ValueError, match="`ood_logits`"):
        densehybrid_loss(logits, ood_logits[:, :1], target, negative_mask)
    with pytest.raises(ValueError, match="`ood_logits`"):
        densehybrid_loss(logits, ood_logits[..., :3], target, negative_mask)
    with pytest.raises(ValueError, match="`target`"):
        densehybrid_loss(logits, ood_logits, target[..., :3], negative_mask)
    with pytest.raises(ValueError, match="`negative_mask`"):
        densehybrid_loss(logits, ood_logits, target, negative_mask[0])
    with pytest.raises(ValueError, match="`negative_mask`"):
        densehybrid_loss(logits, ood_logits, target, negative_mask.long() * 2)
    with pytest.raises(ValueError, match="`negative_mask`"):
        densehybrid_loss(logits, ood_logits, target, None)
    with pytest.raises(TypeError, match="`target`"):
        densehybrid_loss(logits, ood_logits, target.double(), negative_mask)
    with pytest.raises(TypeError, match="`logits`"):
        densehybrid_loss(logits.long(), ood_logits, target, negative_mask)
    with pytest.raises(ValueError, match="`negative_loss`"):
        densehybrid_loss(logits, ood_logits, target, negative_mask, negative_loss="kl")
    with pytest.raises(ValueError, match="`likelihood`"):
        densehybrid_loss(logits, ood_logits, target, negative_mask, likelihood="paired", negative_loss="jsd")
    with pytest.raises(ValueError, match="`lambda_`"):
        densehybrid_loss(logits, ood_logits, target, negative_mask, lambda_=float("nan"))


def test_segmentation_loss_matches_torch_and_twin():
    logits, _, target, _ = _batch(seed=2)
    ref = F.cross_entropy(logits, target, ignore_index=255)
    torch.testing.assert_close(segmentation_loss(logits, target), ref)
    torch.testing.assert_close(SegmentationLoss()(logits, target), ref)
    torch.testing.assert_close(
        segmentation_loss(logits, target, reduction="none"),
        F.cross_entropy(logits, target, ignore_index=255, reduction="none"),
    )
    torch.testing.assert_close(
        SegmentationLoss(reduction="sum")(logits, target),
        F.cross_entropy(logits, target, ignore_index=255, reduction="sum"),
    )
    full = torch.randint(0, K, target.shape)
    torch.testing.assert_close(segmentation_loss(logits, full, ignore_index=None), F.cross_entropy(logits, full))
    assert segmentation_loss(logits, torch.full_like(target, 255)).item() == 0.0
