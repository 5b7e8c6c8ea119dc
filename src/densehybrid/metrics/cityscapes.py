"""The official Cityscapes pixel-level metrics beyond the class IoU: iIoU, category IoU and category iIoU.

As ``cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling`` defines them, on the 19 evaluated classes
(trainIds 0..18; void pixels not evaluated):

* **iIoU** of an instance class (person, rider, car, truck, bus, train, motorcycle, bicycle):
  ``TP_w / (TP_w + FP + FN_w)``. Each ground-truth instance (``*_gtFine_instanceIds.png`` value
  ``labelId * 1000 + k``) adds its pixels predicted as its class (TP) and the others (FN), weighted by the class's
  average instance size divided by the instance's size; FP are the unweighted false positives of the class IoU.
* **category IoU** over the 7 categories (flat, construction, object, nature, sky, human, vehicle): the IoU of the
  union of a category's classes, from the same confusion matrix.
* **category iIoU** of human and vehicle: as iIoU, a pixel of an instance counting as TP when it is predicted as any
  class of the instance's category.

The means (``iiou``, ``category_miou``, ``category_iiou``) skip NaN entries, as the official ``getScoreAverage``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from densehybrid.metrics._base import SumStateMetric, exact_sum_add, exact_sum_state, exact_sum_value

__all__ = [
    "CITYSCAPES_AVG_INSTANCE_SIZE",
    "CITYSCAPES_CATEGORIES",
    "CityscapesInstanceMetrics",
    "cityscapes_category_iou",
]

#: labelIds of the 19 trainIds.
_TRAIN_TO_LABEL = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
#: The official ``args.avgClassSize`` (pixels) of the evaluated instance classes, by trainId.
CITYSCAPES_AVG_INSTANCE_SIZE: dict[int, float] = {
    11: 3462.4756337644,  # person
    12: 3930.4788056518,  # rider
    13: 12794.0202738185,  # car
    14: 27855.1264367816,  # truck
    15: 35732.1511111111,  # bus
    16: 67583.7075812274,  # train
    17: 6298.7200839748,  # motorcycle
    18: 4672.3249222261,  # bicycle
}
#: The official categories (in their order) and their evaluated trainIds.
CITYSCAPES_CATEGORIES: dict[str, tuple[int, ...]] = {
    "flat": (0, 1),
    "construction": (2, 3, 4),
    "object": (5, 6, 7),
    "nature": (8, 9),
    "sky": (10,),
    "human": (11, 12),
    "vehicle": (13, 14, 15, 16, 17, 18),
}
#: Categories whose classes all have instances: the ones with an iIoU.
_INSTANCE_CATEGORIES = ("human", "vehicle")


def _iou(tp: float, fp: float, fn: float) -> float:
    denominator = tp + fp + fn
    return tp / denominator if denominator > 0 else math.nan


def _mean(values: list[float]) -> float:
    valid = [v for v in values if not math.isnan(v)]
    return sum(valid) / len(valid) if valid else math.nan


def cityscapes_category_iou(confusion: torch.Tensor) -> dict[str, float]:
    """Category IoUs from a (19, 19) (or larger, extra rows/columns ignored) confusion matrix, rows = target."""
    matrix = confusion[:19, :19].to(torch.float64)
    result = {}
    for name, ids in CITYSCAPES_CATEGORIES.items():
        index = torch.tensor(ids)
        tp = float(matrix[index][:, index].sum())
        fn = float(matrix[index].sum()) - tp
        fp = float(matrix[:, index].sum()) - tp
        result[name] = _iou(tp, fp, fn)
    return result


class CityscapesInstanceMetrics(SumStateMetric):
    """Accumulates the instance-weighted TP and FN of the official iIoU; :meth:`compute` adds the confusion matrix.

    State: per trainId and per instance category, the weighted TP and FN sums, kept exactly (see
    :mod:`densehybrid.metrics._base`), so the result does not depend on the batches or the number of processes.
    """

    def _config(self) -> tuple:
        return ()

    def _new_state(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {
            "class_weighted": exact_sum_state(2 * 19, device),  # [tp_w (19), fn_w (19)]
            "category_weighted": exact_sum_state(2 * len(_INSTANCE_CATEGORIES), device),
        }

    @torch.no_grad()
    def update(self, pred: torch.Tensor, instances: torch.Tensor) -> None:
        """Add a batch.

        Args:
            pred: (N, H, W) predicted trainIds (0..18).
            instances: (N, H, W) official instance ids (``labelId * 1000 + k`` inside instances, else the labelId).
        """
        if pred.shape != instances.shape:
            raise ValueError(
                f"Expected `pred` and `instances` of the same shape, but got {tuple(pred.shape)} and "
                f"{tuple(instances.shape)}."
            )
        state = self._ensure_state(pred.device)
        device = pred.device
        terms: dict[tuple[str, int], list[float]] = {}

        def add(name: str, rows: torch.Tensor, values: torch.Tensor) -> None:
            for row, value in zip(rows.tolist(), values.tolist()):
                terms.setdefault((name, row), []).append(value)

        label_to_train = torch.full((1 << 16,), -1, dtype=torch.int64, device=device)
        label_to_train[torch.tensor(_TRAIN_TO_LABEL, device=device)] = torch.arange(19, device=device)
        avg = torch.zeros(19, dtype=torch.float64, device=device)
        for train_id, size in CITYSCAPES_AVG_INSTANCE_SIZE.items():
            avg[train_id] = size
        category_of = torch.full((20,), -1, dtype=torch.int64, device=device)
        for c, name in enumerate(_INSTANCE_CATEGORIES):
            category_of[torch.tensor(CITYSCAPES_CATEGORIES[name], device=device)] = c
        for image_pred, image_instances in zip(pred.to(device), instances.to(device)):
            flat = image_instances.reshape(-1).to(torch.int64)
            inside = flat > 1000
            if not bool(inside.any()):
                continue
            ids, inverse, sizes = torch.unique(flat[inside], return_inverse=True, return_counts=True)
            classes = label_to_train[(ids // 1000).clamp(max=(1 << 16) - 1)]
            evaluated = (classes >= 0) & (avg[classes.clamp(min=0)] > 0)  # instance classes not ignored in evaluation
            predicted = image_pred.reshape(-1)[inside].to(torch.int64)
            expected = classes[inverse]
            tp = torch.bincount(inverse, weights=(predicted == expected).double(), minlength=ids.numel())
            weight = avg[classes.clamp(min=0)] / sizes.double()
            tp_w, fn_w = (tp * weight)[evaluated], ((sizes.double() - tp) * weight)[evaluated]
            kept = classes[evaluated]
            add("class_weighted", kept, tp_w)
            add("class_weighted", kept + 19, fn_w)
            in_category = category_of[predicted.clamp(0, 19)] == category_of[expected.clamp(min=0)]
            category_tp = torch.bincount(inverse, weights=in_category.double(), minlength=ids.numel())
            categories = category_of[classes.clamp(min=0)]
            has = evaluated & (categories >= 0)
            add("category_weighted", categories[has], (category_tp * weight)[has])
            add(
                "category_weighted",
                categories[has] + len(_INSTANCE_CATEGORIES),
                ((sizes.double() - category_tp) * weight)[has],
            )
        for (name, row), values in terms.items():
            exact_sum_add(state[name], row, values)

    def compute(self, confusion: torch.Tensor) -> dict[str, Any]:
        """The official metrics, with the false positives from ``confusion`` ((19, 19)+, rows = target).

        Returns:
            ``iiou`` (mean), ``class_iiou`` (19 values, NaN for classes without instances), ``category_miou``,
            ``category_iou`` ({category: IoU}), ``category_iiou`` (mean) and ``category_iious`` ({human, vehicle}).
        """
        state = self._state or self._new_state(torch.device("cpu"))
        weighted = [exact_sum_value(row) for row in state["class_weighted"].cpu()]
        matrix = confusion[:19, :19].to(torch.float64)
        false_positives = matrix.sum(0) - matrix.diagonal()
        class_iiou = [
            _iou(float(weighted[c]), float(false_positives[c]), float(weighted[c + 19]))
            if c in CITYSCAPES_AVG_INSTANCE_SIZE
            else math.nan
            for c in range(19)
        ]
        category_iou = cityscapes_category_iou(confusion)
        categories = [exact_sum_value(row) for row in state["category_weighted"].cpu()]
        category_iious = {}
        for c, name in enumerate(_INSTANCE_CATEGORIES):
            index = torch.tensor(CITYSCAPES_CATEGORIES[name])
            fp = float(matrix[:, index].sum() - matrix[index][:, index].sum())
            category_iious[name] = _iou(float(categories[c]), fp, float(categories[c + len(_INSTANCE_CATEGORIES)]))
        return {
            "iiou": _mean(class_iiou),
            "class_iiou": class_iiou,
            "category_miou": _mean(list(category_iou.values())),
            "category_iou": category_iou,
            "category_iiou": _mean(list(category_iious.values())),
            "category_iious": category_iious,
        }
