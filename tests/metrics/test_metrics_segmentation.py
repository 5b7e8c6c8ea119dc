"""Closed-set mIoU and open-IoU against a hand-computed confusion matrix."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix, jaccard_score

from densehybrid.metrics import ConfusionMatrix, miou, open_miou

# K = 3 known classes, id 3 = anomaly (target) / unknown (prediction). Hand-built matrix C[target, prediction]:
#            pred 0  pred 1  pred 2  pred 3
# target 0      5       1       0       2      (2 false anomaly detections)
# target 1      0       4       1       0
# target 2      1       0       3       0
# target 3      2       0       1       4      (3 undetected anomalies)
MATRIX = np.array([[5, 1, 0, 2], [0, 4, 1, 0], [1, 0, 3, 0], [2, 0, 1, 4]])


def _pixels(ignored: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    targets, preds = [], []
    for row in range(4):
        for col in range(4):
            targets += [row] * int(MATRIX[row, col])
            preds += [col] * int(MATRIX[row, col])
    targets += [255] * ignored
    preds += [1] * ignored
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(0))
    return torch.tensor(preds)[order].reshape(1, 1, -1), torch.tensor(targets)[order].reshape(1, 1, -1)


def test_open_iou_hand_computed():
    pred, target = _pixels()
    matrix = ConfusionMatrix(num_classes=3)
    matrix.update(pred, target)
    assert matrix.confusion().tolist() == MATRIX.tolist()
    result = matrix.compute()
    # IoU_k = C_kk / (column sum + row sum - C_kk), anomaly row and column included.
    class0 = 5 / (8 + 8 - 5)  # column 0 = 5+0+1+2 (2 undetected anomalies), row 0 = 5+1+0+2 (2 false detections)
    class1 = 4 / (5 + 5 - 4)
    class2 = 3 / (5 + 4 - 3)
    anomaly = 4 / (6 + 7 - 4)
    assert result["open_iou"] == pytest.approx([class0, class1, class2])
    assert result["open_miou"] == pytest.approx((class0 + class1 + class2) / 3)
    assert result["anomaly_iou"] == pytest.approx(anomaly)
    # Closed set: the 3x3 block only.
    closed = [5 / (6 + 6 - 5), 4 / (5 + 5 - 4), 3 / (4 + 4 - 3)]
    assert result["iou"] == pytest.approx(closed)
    assert result["miou"] == pytest.approx(sum(closed) / 3)
    assert result["num_pixels"] == MATRIX.sum() and result["num_ignored"] == 3


def test_matrix_matches_sklearn_and_closed_miou_matches_jaccard():
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, 4, (2, 10, 12), generator=g)
    pred = torch.randint(0, 3, (2, 10, 12), generator=g)  # closed-set predictions
    target[0, :2] = 255
    matrix = ConfusionMatrix(num_classes=3)
    matrix.update(pred, target)
    keep = target != 255
    expected = confusion_matrix(target[keep].numpy(), pred[keep].numpy(), labels=[0, 1, 2, 3])
    assert matrix.confusion().numpy().tolist() == expected.tolist()
    inliers = keep & (target < 3)
    jaccard = jaccard_score(target[inliers].numpy(), pred[inliers].numpy(), average=None, labels=[0, 1, 2])
    assert matrix.compute()["iou"] == pytest.approx(jaccard.tolist())


def test_functional_twins_match_the_class():
    pred, target = _pixels()
    matrix = ConfusionMatrix(num_classes=3)
    matrix.update(pred, target)
    result = matrix.compute()
    assert miou(pred, target, 3) == result["miou"]
    assert open_miou(pred, target, 3) == result["open_miou"]


def test_absent_classes_are_skipped_by_the_means():
    pred = torch.tensor([[[0, 0, 2]]])
    target = torch.tensor([[[0, 0, 2]]])
    matrix = ConfusionMatrix(num_classes=3)
    matrix.update(pred, target)
    values = matrix.compute()
    assert math.isnan(values["open_iou"][1]) and values["open_miou"] == 1.0
    assert math.isnan(values["anomaly_iou"])


def test_merge_and_chunks_equal_single_pass():
    pred, target = _pixels()
    single = ConfusionMatrix(num_classes=3)
    single.update(pred, target)
    left, right = ConfusionMatrix(num_classes=3), ConfusionMatrix(num_classes=3)
    left.update(pred[..., :10], target[..., :10])
    right.update(pred[..., 10:], target[..., 10:])
    assert torch.equal(left.merge(right).confusion(), single.confusion())


def test_empty_matrix_warns():
    with pytest.warns(UserWarning, match="No class appears"):
        assert math.isnan(ConfusionMatrix(num_classes=2).compute()["miou"])


@pytest.mark.parametrize(
    ("pred", "target", "match"),
    [
        (torch.tensor([[[4]]]), torch.tensor([[[0]]]), r"`pred` ids in \[0, 4\)"),
        (torch.tensor([[[0]]]), torch.tensor([[[7]]]), r"`target` ids in \[0, 4\)"),
        (torch.tensor([[[0, 1]]]), torch.tensor([[[0]]]), "same shape"),
    ],
)
def test_invalid_inputs_raise(pred, target, match):
    with pytest.raises(ValueError, match=match):
        ConfusionMatrix(num_classes=3).update(pred, target)


def test_invalid_configuration_raises():
    with pytest.raises(ValueError, match="num_classes"):
        ConfusionMatrix(num_classes=0)
    with pytest.raises(ValueError, match="ignore_index"):
        ConfusionMatrix(num_classes=3, ignore_index=3)
