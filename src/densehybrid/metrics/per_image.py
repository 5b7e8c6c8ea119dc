"""Per-image anomaly metrics averaged over images (protocol ``per_image``, the StreetHazards convention).

Each image is evaluated exactly on its own pixels (one sort per image) and only the per-image results are kept,
so the state is a handful of sums whatever the dataset size (exact sums: the means do not depend on the batch size
or the number of processes). The variants differ in the FPR95 rule and in how
images without anomalies (or without inliers) are treated:

``"densehybrid"`` (default) — the released DenseHybrid evaluation, ``evaluations/base.py::
calculate_ood_scores_per_image`` (https://github.com/matejgrcic/DenseHybrid): per image scikit-learn
``average_precision_score``, ``auc(roc_curve)`` and the FPR at the first point of ``roc_curve`` with TPR > 0.95;
each metric is then averaged with ``np.nanmean``. With scikit-learn >= 1.1 an image without anomaly pixels gives
AP = 0 and FPR = 0 (both counted) and AUROC = NaN (skipped); an image without inliers gives AP = 1 (counted) and
NaN AUROC/FPR (skipped). (Older scikit-learn returned NaN AP there, which ``nanmean`` skipped.)

Which scikit-learn produced the published per-image numbers is not known, so both conventions for the AP of an
image without anomaly pixels are available by name (``no_anomaly_ap``): ``"zero"`` (default; scikit-learn >= 1.1,
the released code run today) and ``"skip"`` (scikit-learn < 1.1, whose NaN ``nanmean`` skipped). FPR95 is 0 and
counted in both (the first point of a curve whose TPR is undefined everywhere), AUROC is skipped in both.

``"streethazards"`` — the original benchmark code, ``eval_ood.py`` + ``anom_utils.py`` of hendrycks/anomaly-seg:
images without anomaly pixels or without inlier pixels are skipped; FPR95 is the FPR at the operating point whose
TPR is closest to 0.95; plain means over the remaining images.

``"dicnet"`` — the released DiCNet evaluation (zhouhuan-hust/DiCNet ``evaluation_with_seg.py`` + ``anom_utils.py``):
the same per-image rule as ``"streethazards"`` (scikit-learn AP and AUROC, the Hendrycks FPR95 at the TPR closest to
0.95, plain means). DiCNet has no ignore label: "unlabeled" and "other" count as inliers, which on StreetHazards means
the ``hendrycks`` encoding (13 classes, nothing ignored); every void pixel (``ignore_index``, e.g. an id voided by
``--void-unknown-ids``) counts as an inlier too. Its code fails on an image without anomaly pixels; here such
images are skipped, as in ``"streethazards"``.

Every variant skips images without any evaluated pixel (the reference code would fail on them).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from densehybrid.labels import IGNORE_INDEX
from densehybrid.metrics import _curve
from densehybrid.metrics._base import SumStateMetric, exact_sum_add, exact_sum_state, exact_sum_value
from densehybrid.metrics._inputs import check_anomaly_inputs, check_ignore_index, valid_pixels
from densehybrid.metrics.functional import exact_curve

VARIANTS = ("densehybrid", "streethazards", "dicnet")
#: AP of an image without anomaly pixels under the ``densehybrid`` variant: 0 and counted (scikit-learn >= 1.1) or
#: skipped (scikit-learn < 1.1 returned NaN, which ``np.nanmean`` skips).
NO_ANOMALY_AP = ("zero", "skip")
_SUMS = ("ap", "auroc", "fpr95")


class PerImageAnomalyMetrics(SumStateMetric):
    r"""Mean over images of per-image AP, AUROC and FPR95 (protocol ``per_image``).

    .. math:: \overline{\mathrm{AP}} = \frac{1}{|I_{AP}|}\sum_{i \in I_{AP}} \mathrm{AP}(\text{pixels of image } i)

    where ``I_AP`` are the images whose AP counts under the chosen variant (likewise for AUROC and FPR95).

    Args:
        variant: ``"densehybrid"`` (released DenseHybrid code), ``"streethazards"`` (hendrycks/anomaly-seg) or
            ``"dicnet"`` (released DiCNet code, the ``"streethazards"`` rule without an ignore label); see the module
            docstring.
        ignore_index: target id of pixels that are not evaluated, or None.
        validate_args: scan every batch for NaN scores and ids outside {0, 1, ``ignore_index``}.
        device: device of the (tiny) state; None: the device of the first update.
        no_anomaly_ap: ``variant="densehybrid"`` only: ``"zero"`` counts AP = 0 for an image without anomaly pixels
            (scikit-learn >= 1.1), ``"skip"`` leaves it out of the AP mean (scikit-learn < 1.1). The
            ``streethazards`` variant always skips such images.

    Example:
        >>> metric = PerImageAnomalyMetrics()
        >>> metric.update(torch.tensor([[[0.9, 0.8], [0.7, 0.1]]]), torch.tensor([[[1, 0], [1, 0]]]))
        >>> result = metric.compute()
        >>> round(result["ap"], 4), result["auroc"], result["num_images"]
        (0.8333, 0.75, 1)
    """

    protocol = "per_image"

    def __init__(
        self,
        *,
        variant: str = "densehybrid",
        ignore_index: int | None = IGNORE_INDEX,
        validate_args: bool = True,
        device: torch.device | str | None = None,
        no_anomaly_ap: str = "zero",
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"Unknown per-image variant {variant!r}. Available: {', '.join(VARIANTS)}.")
        if no_anomaly_ap not in NO_ANOMALY_AP:
            raise ValueError(
                f"Expected `no_anomaly_ap` to be one of {', '.join(NO_ANOMALY_AP)}, but got {no_anomaly_ap!r}."
            )
        check_ignore_index(ignore_index)
        self.no_anomaly_ap = no_anomaly_ap
        self.variant = variant
        self.ignore_index = ignore_index
        self.validate_args = validate_args
        super().__init__(device)

    def _config(self) -> tuple:
        return (self.variant, self.ignore_index, self.no_anomaly_ap)

    def _new_state(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {
            # Per metric: the exact sum of the per-image values (see densehybrid.metrics._base) and the images counted.
            "sums": exact_sum_state(len(_SUMS), device),
            "counts": torch.zeros(len(_SUMS), dtype=torch.int64, device=device),
            # images seen, images skipped entirely, images without anomaly pixels, anomaly/inlier/ignored pixels.
            "tally": torch.zeros(6, dtype=torch.int64, device=device),
        }

    def _image_metrics(self, curve: _curve.Curve) -> tuple[float, float, float] | None:
        """(AP, AUROC, FPR95) of one image under the variant, NaN for "not counted"; None to skip the image."""
        num_pos, num_neg = curve.num_pos, curve.num_neg
        if num_pos + num_neg == 0:
            return None
        if self.variant in ("streethazards", "dicnet"):
            if num_pos == 0 or num_neg == 0:
                return None
            index = _curve.index_closest_tpr(curve, 0.95)
            return _curve.average_precision(curve), _curve.auroc(curve), _curve.fpr_at_index(curve, index)
        # densehybrid: scikit-learn >= 1.1 behaviour on one-class images, aggregated with nanmean.
        if num_pos == 0:
            return (0.0 if self.no_anomaly_ap == "zero" else math.nan), math.nan, 0.0
        if num_neg == 0:
            return 1.0, math.nan, math.nan
        index = _curve.index_at_tpr(curve, 0.95, strict=True)
        return _curve.average_precision(curve), _curve.auroc(curve), _curve.fpr_at_index(curve, index)

    @torch.no_grad()
    def update(self, scores: torch.Tensor, target: torch.Tensor) -> None:
        """Evaluate each image of the batch and add its results.

        Args:
            scores: (N, H, W) floating anomaly scores, higher is more anomalous.
            target: (N, H, W) integer ids: 0 inlier, 1 anomaly, ``ignore_index`` not evaluated.

        Raises:
            ValueError: mismatched shapes, NaN scores or ids outside the encoding.
        """
        check_anomaly_inputs(scores, target, self.ignore_index, batched=True, validate_args=self.validate_args)
        state = self._ensure_state(scores.device)
        sums: list[list[float]] = [[], [], []]
        counts = [0, 0, 0]
        tally = [0] * 6
        if self.variant == "dicnet" and self.ignore_index is not None and target.dtype != torch.bool:
            # The released DiCNet evaluation has no ignore label: void pixels (also ids voided by
            # --void-unknown-ids) count as inliers.
            target = target.masked_fill(target == self.ignore_index, 0)
        for image_scores, image_target in zip(scores, target):
            flat_scores, flat_target, num_ignored = valid_pixels(image_scores, image_target, self.ignore_index)
            curve = exact_curve(flat_scores, flat_target)
            tally[0] += 1
            tally[3] += curve.num_pos
            tally[4] += curve.num_neg
            tally[5] += num_ignored
            if curve.num_pos == 0:
                tally[2] += 1
            values = self._image_metrics(curve)
            if values is None:
                tally[1] += 1
                continue
            for slot, value in enumerate(values):
                if not math.isnan(value):
                    sums[slot].append(value)
                    counts[slot] += 1
        device = state["sums"].device
        for slot, values in enumerate(sums):
            exact_sum_add(state["sums"], slot, values)
        state["counts"] += torch.tensor(counts, dtype=torch.int64, device=device)
        state["tally"] += torch.tensor(tally, dtype=torch.int64, device=device)

    def compute(self) -> dict[str, Any]:
        """Per-image means.

        Returns:
            A dict with ``ap``, ``auroc``, ``fpr95`` (means over the images that count for each), ``num_images``
            (images seen), ``num_images_skipped``, ``num_images_without_anomaly``, ``num_anomaly``, ``num_inlier``,
            ``num_ignored`` (pixels), ``protocol`` ("per_image"), ``variant`` and (``densehybrid`` variant)
            ``no_anomaly_ap``. Without any anomaly pixel every
            metric is NaN, with a ``UserWarning``.
        """
        state = self._state or self._new_state(torch.device("cpu"))
        sums = [exact_sum_value(row) for row in state["sums"].cpu()]
        counts, tally = state["counts"].tolist(), state["tally"].tolist()
        result: dict[str, Any] = {"protocol": self.protocol, "variant": self.variant}
        if self.variant == "densehybrid":
            result["no_anomaly_ap"] = self.no_anomaly_ap
        no_anomaly = tally[3] == 0
        if no_anomaly:
            warnings.warn(
                "No anomaly pixels were evaluated: the per-image anomaly metrics are undefined and reported as NaN.",
                UserWarning,
                stacklevel=2,
            )
        for name, total, count in zip(_SUMS, sums, counts):
            result[name] = total / count if count and not no_anomaly else math.nan
        result.update(
            num_images=tally[0],
            num_images_skipped=tally[1],
            num_images_without_anomaly=tally[2],
            num_anomaly=tally[3],
            num_inlier=tally[4],
            num_ignored=tally[5],
        )
        return result
