"""Tests for densehybrid.negatives: pixels, labels and mask agree; mask sampling follows the released code."""

from __future__ import annotations

import pytest
import torch

from densehybrid.negatives import NegativePaster, PasteResult, paste_negatives


def _coordinate_negatives(n: int, h: int, w: int) -> torch.Tensor:
    """Negatives whose pixels encode (row, col, 100 + item), so every pasted pixel tells where it came from."""
    neg = torch.empty(n, 3, h, w)
    neg[:, 0] = torch.arange(h, dtype=torch.float32)[:, None]
    neg[:, 1] = torch.arange(w, dtype=torch.float32)[None, :]
    neg[:, 2] = 100 + torch.arange(n, dtype=torch.float32)[:, None, None]
    return neg


def _inliers(n: int, h: int, w: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, h, w, generator=gen)
    target = torch.randint(0, 19, (n, h, w), generator=gen)
    target[:, :2] = 255
    return images, target


def _noise_segments(n: int, h: int, w: int, num_ids: int = 6, seed: int = 1) -> torch.Tensor:
    # Per-pixel random ids: a union of <= 2 of them is never a solid rectangle, so branches are told apart.
    return torch.randint(0, num_ids, (n, h, w), generator=torch.Generator().manual_seed(seed))


def _check_and_locate(images, target, out: PasteResult) -> list[tuple[int, int] | None]:
    """Assert pixels/labels/mask agree; return per item the shift (row, col) from negative to image coordinates."""
    assert out.images.shape == images.shape and out.target.shape == target.shape
    assert out.negative_mask.dtype == torch.bool and out.negative_mask.shape == target.shape
    shifts = []
    for n in range(images.shape[0]):
        m = out.negative_mask[n]
        assert torch.equal(out.images[n][:, ~m], images[n][:, ~m])
        assert torch.equal(out.target[n][~m], target[n][~m])
        assert (out.target[n][m] == 255).all()
        if not m.any():
            shifts.append(None)
            continue
        ys, xs = torch.nonzero(m, as_tuple=True)
        pixels = out.images[n][:, ys, xs]
        assert (pixels[2] == 100 + n).all(), "pasted pixels come from this item's negative"
        dy, dx = ys - pixels[0].long(), xs - pixels[1].long()
        assert (dy == dy[0]).all() and (dx == dx[0]).all(), "one rigid translation of the negative"
        shifts.append((int(dy[0]), int(dx[0])))
    return shifts


def _is_solid_box(mask: torch.Tensor) -> tuple[bool, int, int]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    h, w = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
    return int(mask.sum()) == h * w, h, w


def test_rectangles_follow_the_side_grid_and_stay_inside_the_crop():
    n, size, neg_size = 96, 56, 40
    images, target = _inliers(n, size, size)
    negatives = _coordinate_negatives(n, neg_size, neg_size)
    out = paste_negatives(images, target, negatives, rect_prob=1.0, generator=torch.Generator().manual_seed(0))
    shifts = _check_and_locate(images, target, out)
    boxes = []
    for i, shift in enumerate(shifts):
        assert shift is not None
        dy, dx = shift
        assert 0 <= dy <= size - neg_size and 0 <= dx <= size - neg_size
        solid, h, w = _is_solid_box(out.negative_mask[i])
        assert solid
        boxes.append((h, w))
    # {16, 24, 32}: every grid side occurs for heights and for widths, and nothing else does.
    assert {h for h, _ in boxes} == {w for _, w in boxes} == set(range(16, neg_size, 8))
    # Heights and widths are drawn independently: most of the 9 (h, w) pairs occur, not only squares.
    assert len(set(boxes)) >= 7


def test_rectangle_grid_is_configurable():
    images, target = _inliers(48, 40, 40)
    out = paste_negatives(
        images,
        target,
        _coordinate_negatives(48, 30, 30),
        rect_prob=1.0,
        min_side=6,
        side_step=5,
        generator=torch.Generator().manual_seed(1),
    )
    _check_and_locate(images, target, out)
    sides = set()
    for m in out.negative_mask:
        solid, h, w = _is_solid_box(m)
        assert solid
        sides.update((h, w))
    assert sides <= set(range(6, 30, 5)) and len(sides) >= 4


def test_semantic_mask_is_the_union_of_the_chosen_ids():
    n, size, neg_size = 32, 48, 32
    images, target = _inliers(n, size, size)
    negatives = _coordinate_negatives(n, neg_size, neg_size)
    segments = _noise_segments(n, neg_size, neg_size)
    out = paste_negatives(
        images, target, negatives, segments, rect_prob=0.0, generator=torch.Generator().manual_seed(2)
    )
    shifts = _check_and_locate(images, target, out)
    for i, (dy, dx) in enumerate(shifts):
        assert 0 <= dy <= size - neg_size and 0 <= dx <= size - neg_size
        region = out.negative_mask[i, dy : dy + neg_size, dx : dx + neg_size]
        assert out.negative_mask[i].sum() == region.sum(), "nothing outside the pasted crop"
        chosen = torch.unique(segments[i][region])
        assert 1 <= chosen.numel() <= 2
        assert torch.equal(region, torch.isin(segments[i], chosen))


def test_semantic_ids_drawn_with_replacement_among_present_ids():
    n, size = 400, 24
    images, target = _inliers(n, size, size)
    negatives = _coordinate_negatives(n, size, size)
    segments = torch.full((n, size, size), 3)
    segments[:, :, size // 2 :] = 7  # only ids 3 and 7 are present (ids 0..2, 4..6 never are)
    out = paste_negatives(
        images, target, negatives, segments, rect_prob=0.0, generator=torch.Generator().manual_seed(3)
    )
    _check_and_locate(images, target, out)
    areas = out.negative_mask.sum(dim=(1, 2))
    single = (areas == size * size // 2).float().mean().item()
    assert (areas == size * size).any()
    # Two draws with replacement from two ids give one class half of the time.
    assert abs(single - 0.5) < 0.1
    only_three = out.negative_mask[:, :, : size // 2].all(dim=(1, 2)) & ~out.negative_mask[:, :, size // 2 :].any(
        dim=(1, 2)
    )
    assert 0.15 < only_three.float().mean().item() < 0.35  # 1/4 expected
    # num_classes_in_mask=1 always picks exactly one class.
    one = paste_negatives(
        images,
        target,
        negatives,
        segments,
        rect_prob=0.0,
        num_classes_in_mask=1,
        generator=torch.Generator().manual_seed(3),
    )
    assert (one.negative_mask.sum(dim=(1, 2)) == size * size // 2).all()


@pytest.mark.parametrize("rect_prob", [0.3, 0.5])
def test_branches_occur_at_the_configured_rate(rect_prob):
    n = 500
    images, target = _inliers(n, 32, 32)
    out = paste_negatives(
        images,
        target,
        _coordinate_negatives(n, 24, 24),
        _noise_segments(n, 24, 24),
        rect_prob=rect_prob,
        min_side=8,
        side_step=4,
        generator=torch.Generator().manual_seed(4),
    )
    _check_and_locate(images, target, out)
    rect = sum(_is_solid_box(m)[0] for m in out.negative_mask) / n
    assert abs(rect - rect_prob) < 4 * (rect_prob * (1 - rect_prob) / n) ** 0.5


def test_larger_negatives_are_cropped_randomly_to_fit():
    n, size, neg_h, neg_w = 24, 40, 64, 50
    images, target = _inliers(n, size, size)
    negatives = _coordinate_negatives(n, neg_h, neg_w)
    segments = _noise_segments(n, neg_h, neg_w)
    out = paste_negatives(images, target, negatives, segments, generator=torch.Generator().manual_seed(5))
    shifts = _check_and_locate(images, target, out)
    crop_origins = set()
    for i, (dy, dx) in enumerate(shifts):
        # The crop covers the whole image, so the shift is minus the crop origin.
        assert -(neg_h - size) <= dy <= 0 and -(neg_w - size) <= dx <= 0
        crop_origins.add((dy, dx))
        solid, h, w = _is_solid_box(out.negative_mask[i])
        if solid:
            assert h in range(16, size, 8) and w in range(16, size, 8)
        else:
            crop = segments[i, -dy : -dy + size, -dx : -dx + size]
            chosen = torch.unique(crop[out.negative_mask[i]])
            assert torch.equal(out.negative_mask[i], torch.isin(crop, chosen))
    assert len(crop_origins) > 5


def test_list_of_negatives_of_different_sizes():
    images, target = _inliers(3, 48, 48)
    sizes = [(20, 30), (40, 24), (64, 17)]
    negatives = [_coordinate_negatives(3, h, w)[i] for i, (h, w) in enumerate(sizes)]
    segments = [_noise_segments(1, h, w, seed=i)[0] for i, (h, w) in enumerate(sizes)]
    for seed in range(5):
        out = paste_negatives(images, target, negatives, segments, generator=torch.Generator().manual_seed(seed))
        shifts = _check_and_locate(images, target, out)
        for (dy, dx), (h, w) in zip(shifts, sizes):
            assert -(max(h - 48, 0)) <= dy <= max(48 - h, 0) and 0 <= dx <= 48 - w


def test_deterministic_with_a_seeded_generator_and_inputs_untouched():
    images, target = _inliers(4, 40, 40)
    negatives, segments = _coordinate_negatives(4, 32, 32), _noise_segments(4, 32, 32)
    images_copy, target_copy = images.clone(), target.clone()
    a = paste_negatives(images, target, negatives, segments, generator=torch.Generator().manual_seed(7))
    b = paste_negatives(images, target, negatives, segments, generator=torch.Generator().manual_seed(7))
    c = paste_negatives(images, target, negatives, segments, generator=torch.Generator().manual_seed(8))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a.negative_mask, c.negative_mask)
    assert torch.equal(images, images_copy) and torch.equal(target, target_copy)
    torch.manual_seed(11)
    d = paste_negatives(images, target, negatives, segments)
    torch.manual_seed(11)
    e = paste_negatives(images, target, negatives, segments)
    assert torch.equal(d.negative_mask, e.negative_mask)


def test_module_twin_equals_function():
    images, target = _inliers(3, 40, 40)
    negatives, segments = _coordinate_negatives(3, 32, 32), _noise_segments(3, 32, 32)
    options = {"rect_prob": 0.25, "min_side": 8, "side_step": 4, "num_classes_in_mask": 3, "ignore_index": 250}
    paster = NegativePaster(**options, generator=torch.Generator().manual_seed(9))
    via_module = paster(images, target, negatives, segments)
    via_function = paste_negatives(
        images, target, negatives, segments, generator=torch.Generator().manual_seed(9), **options
    )
    for x, y in zip(via_module, via_function):
        assert torch.equal(x, y)
    assert (via_module.target[via_module.negative_mask] == 250).all()
    override = paster(images, target, negatives, segments, generator=torch.Generator().manual_seed(9))
    assert torch.equal(override.negative_mask, via_function.negative_mask)
    assert "rect_prob=0.25" in repr(paster)


def test_rectangles_only_without_segments():
    images, target = _inliers(16, 40, 40)
    out = paste_negatives(images, target, _coordinate_negatives(16, 32, 32), None, rect_prob=0.0)
    _check_and_locate(images, target, out)
    assert all(_is_solid_box(m)[0] for m in out.negative_mask)


def test_invalid_inputs_name_the_argument():
    images, target = _inliers(2, 40, 40)
    negatives, segments = _coordinate_negatives(2, 32, 32), _noise_segments(2, 32, 32)
    with pytest.raises(ValueError, match="`images`"):
        paste_negatives(images[0], target, negatives)
    with pytest.raises(ValueError, match="`target`"):
        paste_negatives(images, target[:, :5], negatives)
    with pytest.raises(TypeError, match="`target`"):
        paste_negatives(images, target.float(), negatives)
    with pytest.raises(ValueError, match="`negatives`"):
        paste_negatives(images, target, negatives[:1])
    with pytest.raises(ValueError, match="`negatives`"):
        paste_negatives(images, target, negatives[:, :1])
    with pytest.raises(ValueError, match="`negatives`"):
        paste_negatives(images, target, [negatives[0]])
    with pytest.raises(ValueError, match=r"`negatives\[1\]`"):
        paste_negatives(images, target, [negatives[0], negatives[1, 0]])
    with pytest.raises(ValueError, match="`negative_segments`"):
        paste_negatives(images, target, negatives, segments[:, :20])
    with pytest.raises(ValueError, match="`negative_segments`"):
        paste_negatives(images, target, negatives, segments - 1)
    with pytest.raises(TypeError, match="`negative_segments`"):
        paste_negatives(images, target, negatives, segments.float())
    with pytest.raises(ValueError, match="`min_side`=16"):
        paste_negatives(images, target, _coordinate_negatives(2, 16, 40), rect_prob=1.0)
    with pytest.raises(ValueError, match="`rect_prob`"):
        paste_negatives(images, target, negatives, rect_prob=1.5)
    with pytest.raises(ValueError, match="`side_step`"):
        NegativePaster(side_step=0)
    with pytest.raises(TypeError, match="`num_classes_in_mask`"):
        NegativePaster(num_classes_in_mask=2.0)
    with pytest.raises(TypeError, match="`generator`"):
        NegativePaster(generator=0)
    empty = paste_negatives(images[:0], target[:0], negatives[:0])
    assert empty.images.shape == (0, 3, 40, 40) and empty.negative_mask.shape == (0, 40, 40)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batch_matches_cpu():
    images, target = _inliers(4, 64, 64)
    negatives, segments = _coordinate_negatives(4, 48, 48), _noise_segments(4, 48, 48)
    cpu = paste_negatives(images, target, negatives, segments, generator=torch.Generator().manual_seed(1))
    gpu = paste_negatives(
        images.cuda(), target.cuda(), negatives.cuda(), segments.cuda(), generator=torch.Generator().manual_seed(1)
    )
    for x, y in zip(cpu, gpu):
        assert torch.equal(x, y.cpu())


def test_without_a_small_class_the_least_frequent_class_is_pasted_as_released():
    # Released COCO code: no id under max_class_pixels -> the crop's least frequent id (lowest on ties), no rectangle.
    negatives = _coordinate_negatives(3, 40, 40)
    segments = torch.zeros(3, 40, 40, dtype=torch.int64)  # 1600 px: id 0 is 1600 - 400 - 300 = 900 px
    segments[:, :20, :20] = 5  # 400 px
    segments[:, 20:, :15] = 7  # 300 px: the least frequent
    segments[2, 20:, 15:35] = 3  # item 2: id 3 also 400 px; id 0 shrinks to 500 px; 7 stays the rarest
    segments[1, :20, :20] = 7  # item 1: ids 0 (900) and 7 (700); still all above the limit
    images, target = _inliers(3, 64, 64)
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        out = paste_negatives(images, target, negatives, segments, generator=g, rect_prob=0.0, max_class_pixels=200)
        shifts = _check_and_locate(images, target, out)
        for n, (dy, dx) in enumerate(shifts):
            expected = segments[n] == 7
            ys, xs = torch.nonzero(out.negative_mask[n], as_tuple=True)
            assert int(out.negative_mask[n].sum()) == int(expected.sum())
            assert expected[ys - dy, xs - dx].all()
    ties = torch.zeros(1, 40, 40, dtype=torch.int64)
    ties[:, :, 20:] = 4  # ids 0 and 4: 800 px each -> the lower id, 0
    out = paste_negatives(images[:1], target[:1], negatives[:1], ties, rect_prob=0.0, max_class_pixels=200)
    (dy, dx) = _check_and_locate(images[:1], target[:1], out)[0]
    ys, xs = torch.nonzero(out.negative_mask[0], as_tuple=True)
    assert int(out.negative_mask[0].sum()) == 800 and (ties[0][ys - dy, xs - dx] == 0).all()
