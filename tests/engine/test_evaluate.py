from __future__ import annotations

import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from densehybrid.engine.evaluate import evaluate, model_outputs
from densehybrid.labels import anomaly_target
from densehybrid.scores import get_score
from tests.helpers import NUM_CLASSES, TinySegmentation, tiny_model


class WithAnomalies(TinySegmentation):
    """Tiny scenes with a bright square labelled as anomaly (id K) and a family id per image."""

    def __getitem__(self, i):
        sample = dict(super().__getitem__(i))
        image, target = sample["image"].clone(), sample["target"].clone()
        image[:, 4:10, 6:14] = 1.0
        target[4:10, 6:14] = NUM_CLASSES
        sample.update(image=image, target=target, family=torch.tensor(1 + i % 2))
        return sample


def test_evaluate_matches_sklearn_on_the_same_outputs():
    model, data = tiny_model(), WithAnomalies(n=4)
    result = evaluate(
        model, data, ["densehybrid", "msp"], num_classes=NUM_CLASSES, device="cpu", progress=False, threshold=0.0
    )
    scores, targets = [], []
    for batch, out in model_outputs(model, data, "cpu", progress=False):
        scores.append(get_score("densehybrid")(out.logits, out.ood_logits))
        targets.append(anomaly_target(batch["target"], NUM_CLASSES))
    s, t = torch.cat(scores).flatten(), torch.cat(targets).flatten()
    keep = t != 255
    ap = average_precision_score(t[keep].numpy(), s[keep].numpy())
    auc = roc_auc_score(t[keep].numpy(), s[keep].numpy())
    assert result.anomaly["densehybrid"]["all"]["ap"] == pytest.approx(ap, abs=1e-4)
    assert result.anomaly["densehybrid"]["all"]["auroc"] == pytest.approx(auc, abs=1e-4)
    assert set(result.anomaly) == {"densehybrid", "msp"}
    assert result.num_images == 4
    assert 0 <= result.closed_set["miou"] <= 1 and 0 <= result.open_set["open_miou"] <= 1


def test_groups_and_pixel_samples():
    model, data = tiny_model(), WithAnomalies(n=4)

    def by_family(batch, binary):
        out = {"all": binary}
        for fam, name in ((1, "odd"), (2, "even")):
            t = binary.clone()
            other = (batch["family"] != fam).view(-1, 1, 1).expand_as(t) & (t == 1)
            t[other] = 255
            out[name] = t
        return out

    result = evaluate(
        model,
        data,
        ["max_logit"],
        num_classes=NUM_CLASSES,
        groups=by_family,
        sample_pixels=200,
        device="cpu",
        progress=False,
    )
    groups = result.anomaly["max_logit"]
    assert set(groups) == {"all", "odd", "even"}
    assert groups["odd"]["num_anomaly"] + groups["even"]["num_anomaly"] == groups["all"]["num_anomaly"]
    scores, labels, ids = result.samples["max_logit"]
    assert scores.shape == labels.shape == ids.shape and 0 < len(labels) <= 200
    assert set(ids[labels == 1].tolist()) <= {1}  # 'all' is the first group claiming every anomaly pixel


def test_evaluate_argument_errors():
    with pytest.raises(ValueError, match="num_classes"):
        evaluate(tiny_model(), WithAnomalies(n=2), ["msp"], device="cpu", progress=False)
    with pytest.raises(ValueError, match="target_kind"):
        evaluate(tiny_model(), WithAnomalies(n=2), ["msp"], target_kind="x", device="cpu", progress=False)
    with pytest.raises(ValueError, match="Unknown score"):
        evaluate(tiny_model(), WithAnomalies(n=2), ["nope"], num_classes=NUM_CLASSES, device="cpu", progress=False)


def test_cityscapes_metrics_join_the_closed_set_results():
    from densehybrid.metrics import ConfusionMatrix
    from densehybrid.metrics.cityscapes import CityscapesInstanceMetrics

    g = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(3):
        target = torch.randint(0, 19, (32, 48), generator=g)
        instances = torch.full((32, 48), 7, dtype=torch.int64)
        instances[4:12, 5:20] = 26001  # car
        instances[14:30, 30:40] = 24002  # person
        target[4:12, 5:20], target[14:30, 30:40] = 13, 11
        samples.append({"image": torch.rand(3, 32, 48, generator=g), "target": target, "instances": instances})
    torch.manual_seed(0)
    model = tiny_model(num_classes=19).eval()
    result = evaluate(
        model, samples, ["msp"], num_classes=19, batch_size=2, progress=False, amp=False, cityscapes_metrics=True
    )
    matrix, official = ConfusionMatrix(19), CityscapesInstanceMetrics()
    with torch.no_grad():
        for sample in samples:
            pred = model(sample["image"][None], output_size=(32, 48)).logits.argmax(1)
            matrix.update(pred, sample["target"][None])
            official.update(pred, sample["instances"][None])
    expected = official.compute(matrix.confusion())
    assert result.closed_set["iiou"] == pytest.approx(expected["iiou"], nan_ok=True)
    assert result.closed_set["category_iou"] == pytest.approx(expected["category_iou"])
    assert set(result.closed_set["category_iious"]) == {"human", "vehicle"}
    plain = evaluate(model, samples, ["msp"], num_classes=19, batch_size=2, progress=False, amp=False)
    assert "iiou" not in plain.closed_set


def test_nan_input_images_are_blamed_on_the_images_not_the_weights():
    from densehybrid.engine.evaluate import check_finite_outputs
    from densehybrid.errors import NonFiniteError

    model = tiny_model().eval()
    images = torch.rand(1, 3, 32, 32)
    images[0, 0, 0, 0] = float("nan")
    with torch.no_grad():
        out = model(images)
    with pytest.raises(NonFiniteError, match="input images") as info:
        check_finite_outputs(out, {"image": images, "name": ["frame7"]})
    assert "weights" not in str(info.value).split(":")[0] and "frame7" in str(info.value)
