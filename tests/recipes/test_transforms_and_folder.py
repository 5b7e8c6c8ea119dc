"""Augmentations (torchvision v2), the recipes' negative preprocessing, the folder dataset and its doctor check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from densehybrid.cli import main
from densehybrid.data.datasets import FolderDataset, ImageFolder
from densehybrid.data.transforms import AugmentedDataset, JitterCrop, NegativeCrop, SegmentationAugment
from densehybrid.doctor import diagnose
from densehybrid.errors import DatasetError
from densehybrid.labels import IGNORE_INDEX
from densehybrid.negatives import paste_negatives
from densehybrid.recipes import load_recipe
from tests.recipes.conftest import make_folder_tree


def _coded(h: int, w: int, block: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """An image whose red channel encodes the label (constant in ``block`` x ``block`` squares), so image and label
    can be checked to move together."""
    coarse = torch.randint(0, 5, (-(-h // block), -(-w // block)), generator=torch.Generator().manual_seed(0))
    target = coarse.repeat_interleave(block, 0).repeat_interleave(block, 1)[:h, :w]
    image = torch.stack([target / 10, torch.full((h, w), 0.5), torch.full((h, w), 0.5)]).float()
    return image, target


def test_jitter_crop_pads_small_images_with_the_fill_and_the_ignore_label():
    image, target = _coded(10, 12)
    torch.manual_seed(0)
    crop = JitterCrop(32, scale=(1.0, 1.0), fill=(73, 83, 72))
    out_image, out_target = crop(image, target)
    assert out_image.shape == (3, 32, 32) and out_target.shape == (32, 32)
    padded = out_target == IGNORE_INDEX
    assert int(padded.sum()) == 32 * 32 - 10 * 12
    fill = torch.tensor([73, 83, 72]) / 255
    torch.testing.assert_close(out_image[:, padded].T, fill.expand(int(padded.sum()), 3))
    # where the label survived, the image pixel is the one that belonged to it
    torch.testing.assert_close(out_image[0][~padded], out_target[~padded].float() / 10)


def test_jitter_scale_range_and_flip_keep_image_and_label_together():
    image, target = _coded(20, 30, block=8)  # smaller than the crop at most scales: the padded area varies
    augment = SegmentationAugment(24, scale=(0.5, 2.0), fill=(0, 0, 0), flip=True)
    sizes = set()
    for seed in range(40):
        torch.manual_seed(seed)
        sample = augment({"image": image, "target": target, "name": "x"})
        out_image, out_target = sample["image"], sample["target"]
        assert sample["name"] == "x" and out_image.shape == (3, 24, 24) and out_target.dtype == torch.int64
        valid = out_target != IGNORE_INDEX
        # nearest-resized labels and bilinear images agree away from label edges; most pixels must match exactly
        agree = (out_image[0][valid] * 10).round() == out_target[valid].float()
        assert agree.float().mean() > 0.6
        sizes.add(int(valid.sum()))
    assert len(sizes) > 3  # the rescale factor varies


def test_augmented_dataset_is_seeded_per_sample_and_epoch():
    data = [{"image": _coded(40, 60)[0], "target": _coded(40, 60)[1]} for _ in range(3)]
    wrapped = AugmentedDataset(data, SegmentationAugment(16, scale=(0.5, 2.0)), seed=1)
    first = wrapped[2]["image"]
    torch.manual_seed(123)  # the global RNG does not matter
    assert torch.equal(wrapped[2]["image"], first)
    wrapped.set_epoch(1)
    assert not torch.equal(wrapped[2]["image"], first)


@pytest.mark.parametrize(
    ("recipe", "crop"),
    [("dlv3p-cityscapes-finetune", 192), ("ldn121-streethazards-finetune", 384), ("segmenter-coco20-finetune", 256)],
)
def test_each_recipe_preprocesses_ade20k_negatives_as_released(recipe, crop):
    section = load_recipe(recipe)["negatives"]
    transform = NegativeCrop(section["crop"], section["resize"], section["scale"], section["fill"])
    image = torch.rand(3, 512, 683)
    columns = torch.arange(683).expand(512, 683)  # "classes" = source column, to measure the crop's extent
    spans = set()
    for seed in range(16):
        torch.manual_seed(seed)
        out_image, out_segments = transform(image, columns)
        assert out_image.shape == (3, crop, crop) and out_segments.shape == (crop, crop)
        assert not bool((out_segments == IGNORE_INDEX).any())  # the shorter side is resized to at least the crop
        spans.add(int(out_segments.max() - out_segments.min()) + 1)
    # 512 x 683 -> shorter side `resize` (x 0.75 for 384, 0.5 for 256); a crop spans crop / factor source columns
    factor = section["resize"] / 512
    if recipe == "dlv3p-cityscapes-finetune":  # jitter 0.5..2 on top: spans from 192 / (0.75 * 2) to 192 / 0.375
        assert min(spans) < 0.7 * crop / factor < max(spans) and max(spans) <= crop / (factor * 0.5) + 2
    else:
        assert all(abs(span - crop / factor) <= 2 for span in spans)


def test_coco_pastes_draw_only_small_classes():
    g = torch.Generator().manual_seed(0)
    negatives = torch.rand(8, 3, 64, 64)
    segments = torch.zeros(8, 64, 64, dtype=torch.int64)  # class 0: 4096 - 64 px; class 1: an 8 x 8 square
    segments[:, :8, :8] = 1
    images, target = torch.zeros(8, 3, 64, 64), torch.zeros(8, 64, 64, dtype=torch.long)
    out = paste_negatives(images, target, negatives, segments, generator=g, rect_prob=0.0, max_class_pixels=100)
    assert (out.negative_mask.sum(dim=(1, 2)) == 64).all()  # only the small class is ever pasted


def test_folder_dataset_reads_its_tree_and_names_bad_label_values(tmp_path):
    root = make_folder_tree(tmp_path / "mine", n_train=2, n_val=1)
    train, val = FolderDataset(root, "train"), FolderDataset(root, "val")
    assert train.num_classes == 3 and train.class_names == ("a", "b", "c") and len(train) == 2 and len(val) == 1
    assert set(train[0]["target"].unique().tolist()) <= {0, 1, 2, IGNORE_INDEX}
    assert 3 in val[0]["target"].unique().tolist()  # K = anomaly in validation labels
    label = root / "labels" / "f1.png"
    Image.fromarray(np.full((40, 56), 3, dtype=np.uint8)).save(label)  # K is not allowed in training labels
    with pytest.raises(DatasetError, match=rf"classes.txt in '{label}': 0\.\.2, 255 \(ignore\), but it holds 3\."):
        train[1]
    with pytest.raises(DatasetError, match="classes.txt"):
        FolderDataset(tmp_path, "train")
    assert len(ImageFolder(root)) == 2 and ImageFolder(root)[0][1].shape == (40, 56)


def test_doctor_folder_reports_unpaired_files_and_bad_values(tmp_path, capsys):
    root = make_folder_tree(tmp_path / "mine", n_train=2, n_val=1)
    assert diagnose("folder", root).ok
    assert main(["doctor", "folder", str(root)]) == 0
    assert "3 classes: a, b, c" in capsys.readouterr().out
    (root / "images" / "extra.jpg").write_bytes((root / "images" / "f0.png").read_bytes())
    Image.fromarray(np.full((40, 56), 9, dtype=np.uint8)).save(root / "val" / "labels" / "f0.png")
    report = diagnose("folder", root)
    problems = " ".join(f.problem for f in report.errors)
    assert not report.ok and "extra.jpg' has no label" in problems and "but got 9" in problems
    assert main(["doctor", "folder", str(tmp_path / "missing")]) == 1


# -- training data that used to be silently wrong -----------------------------------------------------------------
def test_a_labels_pixels_stay_under_their_image_pixels_whatever_the_exif_orientation(tmp_path):
    root = make_folder_tree(tmp_path / "mine", n_train=1, n_val=0, size=(20, 20))  # square: no size mismatch
    stored = np.zeros((20, 20, 3), dtype=np.uint8)
    stored[:5, :8] = 255  # a white block at the stored top-left ...
    label = np.zeros((20, 20), dtype=np.uint8)
    label[:5, :8] = 1  # ... labelled 1 in the same stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(stored).save(root / "images" / "f0.png", exif=exif)
    Image.fromarray(label).save(root / "labels" / "f0.png")
    sample = FolderDataset(root, "train")[0]
    white = sample["image"].min(dim=0).values > 0.9
    assert not white[:5, :8].all()  # the image is shown upright (turned) ...
    assert torch.equal(white, sample["target"] == 1)  # ... and its label turned with it


def test_a_byte_order_mark_is_not_part_of_the_first_class_name(tmp_path):
    root = make_folder_tree(tmp_path / "mine", n_train=1, n_val=0)
    (root / "classes.txt").write_bytes("\ufeffroad\ncar\nsky\n".encode())
    assert FolderDataset(root, "train").class_names == ("road", "car", "sky")


def test_duplicate_and_non_utf8_class_names_are_refused_with_the_file(tmp_path):
    root = make_folder_tree(tmp_path / "mine", n_train=1, n_val=0)
    (root / "classes.txt").write_text("road\ncar\nroad\n")
    with pytest.raises(DatasetError, match="more than once: 'road'"):
        FolderDataset(root, "train")
    (root / "classes.txt").write_bytes(b"road\ncar\xe9\nsky\n")
    with pytest.raises(DatasetError, match="classes.txt' to be UTF-8 text"):
        FolderDataset(root, "train")


def test_a_damaged_file_of_a_users_own_tree_is_not_sent_to_an_archive(tmp_path):
    root = make_folder_tree(tmp_path / "mine", n_train=1, n_val=0)
    (root / "images" / "f0.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DatasetError, match="f0.png") as info:
        FolderDataset(root, "train")[0]
    assert "Replace this file" in str(info.value) and not str(info.value).endswith("benchmark's archive.")
