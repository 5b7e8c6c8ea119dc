"""The official Cityscapes iIoU and category IoU / iIoU against cityscapesscripts on a generated gtFine tree."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from densehybrid.metrics import ConfusionMatrix
from densehybrid.metrics.cityscapes import CityscapesInstanceMetrics

_TRAIN_TO_LABEL = np.array([7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33])


def _label_to_train() -> np.ndarray:
    table = np.full(256, 255, dtype=np.int64)
    table[_TRAIN_TO_LABEL] = np.arange(19)
    return table


def _make_pair(rng: np.random.Generator, height: int = 48, width: int = 64):
    """labelIds, instanceIds and a predicted labelIds map, with instances of every kind (also caravan, ignored)."""
    labels = rng.choice([0, 4, 7, 8, 11, 17, 21, 23, 9, 26, 24], size=(height // 8, width // 8))
    labels = np.kron(labels, np.ones((8, 8), dtype=np.int64))
    instances = labels.copy()
    for k, label in enumerate([24, 24, 25, 26, 26, 27, 28, 29, 31, 32, 33]):
        y, x = rng.integers(0, height - 6), rng.integers(0, width - 6)
        h, w = rng.integers(2, 12), rng.integers(2, 14)
        labels[y : y + h, x : x + w] = label
        instances[y : y + h, x : x + w] = label * 1000 + k
    instances[(labels == 26) & (instances < 1000)] = 26  # crowd car pixels without an instance id
    predicted = _TRAIN_TO_LABEL[rng.integers(0, 19, size=labels.shape)]
    near = rng.random(labels.shape) < 0.6
    valid = np.isin(labels, _TRAIN_TO_LABEL)
    predicted[near & valid] = labels[near & valid]
    return labels, instances, predicted


@pytest.mark.parametrize("seed", [0, 1])
def test_iiou_and_category_metrics_equal_cityscapesscripts(tmp_path, seed, monkeypatch):
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as evaluation

    # cityscapesscripts 2.3 calls np.in1d, which numpy 2.4 removed: give it its documented equivalent.
    monkeypatch.setattr(np, "in1d", lambda a, b, invert=False: np.isin(a, b, invert=invert).ravel(), raising=False)
    rng = np.random.default_rng(seed)
    gt_files, pred_files = [], []
    matrix, instance_metrics = ConfusionMatrix(19), CityscapesInstanceMetrics()
    table = _label_to_train()
    for i in range(3):
        labels, instances, predicted = _make_pair(rng)
        stem = f"frankfurt_000000_{i:06d}"
        folder = tmp_path / "gtFine" / "val" / "frankfurt"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(labels.astype(np.uint8)).save(folder / f"{stem}_gtFine_labelIds.png")
        Image.fromarray(instances.astype(np.uint16)).save(folder / f"{stem}_gtFine_instanceIds.png")
        Image.fromarray(predicted.astype(np.uint8)).save(tmp_path / f"{stem}_pred.png")
        gt_files.append(str(folder / f"{stem}_gtFine_labelIds.png"))
        pred_files.append(str(tmp_path / f"{stem}_pred.png"))
        target = torch.from_numpy(table[labels])[None]
        pred = torch.from_numpy(table[predicted])[None]
        matrix.update(pred, target)
        instance_metrics.update(pred, torch.from_numpy(instances)[None])
    args = evaluation.args
    args.quiet, args.JSONOutput, args.evalInstLevelScore = True, False, True
    official = evaluation.evaluateImgLists(pred_files, gt_files, args)
    ours = instance_metrics.compute(matrix.confusion())
    assert not math.isnan(ours["iiou"]) and not any(math.isnan(v) for v in ours["category_iious"].values())

    def same(a: float, b: float) -> bool:
        return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-12, abs=1e-15)

    names = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation"]
    names += ["terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]
    for c, name in enumerate(names):
        assert same(ours["class_iiou"][c], official["classInstScores"][name]), name
    assert same(ours["iiou"], official["averageScoreInstClasses"])
    for name, value in ours["category_iou"].items():
        assert same(value, official["categoryScores"][name]), name
    assert same(ours["category_miou"], official["averageScoreCategories"])
    for name, value in ours["category_iious"].items():
        assert same(value, official["categoryInstScores"][name]), name
    assert same(ours["category_iiou"], official["averageScoreInstCategories"])
    assert same(matrix.compute()["miou"], official["averageScoreClasses"])
