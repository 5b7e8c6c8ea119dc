"""``densehybrid evaluate`` end to end on tiny fake trees in every benchmark's official layout."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from densehybrid.cli import main
from densehybrid.data.datasets import BENCHMARKS, get_benchmark
from densehybrid.labels import anomaly_target
from densehybrid.metrics import ComponentMetrics, SmiycAnomalyMetrics
from densehybrid.models import create_model
from densehybrid.scores import SMLStatistics, get_score
from tests.datasets.fake_trees import FAKE_TREES, make_fake_fs_laf, make_fake_smiyc_obstacle, write_image, write_label

EVALUATED = sorted(name for name, spec in BENCHMARKS.items() if spec.protocol is not None)
MODEL_KWARGS = {"decoder_channels": 16}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """K -> (checkpoint path written like the training loop's, the model in eval mode)."""
    folder = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for k in (10, 12, 19, 20):
        torch.manual_seed(k)
        model = create_model("ladder_mobilenetv3", num_classes=k, **MODEL_KWARGS).eval()
        path = folder / f"k{k}.pt"
        torch.save(
            {"model": model.state_dict(), "model_name": model.model_name, "model_kwargs": model.model_kwargs}, path
        )
        out[k] = (path, model)
    return out


def _checkpoint_for(name, checkpoints):
    return checkpoints[{"streethazards": 12, "folder": 12, "coco20": 20, "roadscene": 10}.get(name, 19)]


def _run(benchmark, root, checkpoint, out, *extra):
    args = ["evaluate", "--benchmark", benchmark, "--root", str(root), "--checkpoint", str(checkpoint)]
    args += ["--out", str(out), "--device", "cpu", "--num-workers", "0", "--no-progress", *extra]
    return main(args)


def _outputs(model, dataset, score="densehybrid"):
    """Scores, closed-set argmax and targets of every frame, computed here one frame at a time."""
    with torch.inference_mode():
        for sample in (dataset[i] for i in range(len(dataset))):
            target = sample["target"]
            out = model(sample["image"][None], output_size=tuple(target.shape))
            yield get_score(score)(out.logits, out.ood_logits)[0], out.logits.argmax(1)[0], target


def _in_unit_interval(value):
    return value is not None and 0.0 <= value <= 1.0


# The anomaly track voids ground-truth components under 100 px, i.e. all of them in the 16x32 fake frames.
@pytest.mark.filterwarnings("ignore:No ground-truth anomaly components")
@pytest.mark.parametrize("name", EVALUATED)
def test_evaluates_every_benchmark_end_to_end(name, tmp_path, checkpoints, capsys):
    spec = get_benchmark(name)
    root = FAKE_TREES[name](tmp_path / "data")
    path, _ = _checkpoint_for(name, checkpoints)
    out = tmp_path / "result.json"
    assert _run(name, root, path, out) == 0  # no --model: the checkpoint records it
    printed = capsys.readouterr().out
    assert f"JSON: {out}" in printed
    result = json.loads(out.read_text())
    loader = spec.create(root)
    assert result["benchmark"] == name and result["split"] == spec.split and result["protocol"] == spec.protocol
    assert result["model"] == "ladder_mobilenetv3" and result["model_kwargs"] == MODEL_KWARGS
    assert result["num_images"] == len(loader) and result["complete"] is False
    assert result["target_kind"] == loader.target_kind and result["input_scale"] == 1.0
    if name == "cityscapes":  # no anomalies: closed-set mIoU only
        assert result["anomaly"] == {} and result["components"] is None
    else:
        metrics = result["anomaly"]["densehybrid"]
        assert metrics["protocol"] == spec.protocol
        assert all(_in_unit_interval(metrics[key]) for key in ("ap", "auroc", "fpr95"))
        assert metrics["num_anomaly"] > 0 and metrics["num_inlier"] > 0
        assert "densehybrid" in printed and "AP" in printed
    if spec.protocol == "smiyc":
        components = result["components"]["densehybrid"]
        assert components["threshold"] == pytest.approx(result["anomaly"]["densehybrid"]["best_f1_threshold"])
        assert all(components[key] is None or _in_unit_interval(components[key]) for key in ("siou", "ppv", "mean_f1"))
        assert result["component_track"] == ("anomaly" if name == "smiyc-anomaly" else "obstacle")
    else:
        assert result["components"] is None
    if loader.target_kind == "semantic":
        closed = result["closed_set"]
        assert _in_unit_interval(closed["miou"]) and len(closed["iou"]) == loader.num_classes
        assert closed["class_names"] == list(loader.class_names) and "closed-set mIoU" in printed
    else:
        assert result["closed_set"] is None


def test_pooled_metrics_equal_sklearn_on_the_same_outputs(tmp_path, checkpoints):
    root = make_fake_fs_laf(tmp_path / "data", n=3)
    path, model = checkpoints[19]
    assert _run("fs-laf", root, path, tmp_path / "r.json", "--score", "densehybrid", "--score", "msp") == 0
    result = json.loads((tmp_path / "r.json").read_text())
    for score in ("densehybrid", "msp"):
        pairs = [(s, t) for s, _, t in _outputs(model, get_benchmark("fs-laf").create(root), score)]
        s = torch.cat([p[0].flatten() for p in pairs]).numpy()
        t = torch.cat([p[1].flatten() for p in pairs]).numpy()
        keep = t != 255
        metrics = result["anomaly"][score]  # the pooled histogram reports how far from exact it can be
        ap_bound, auroc_bound = metrics["ap_error_bound"] + 1e-9, metrics["auroc_error_bound"] + 1e-9
        assert metrics["ap"] == pytest.approx(average_precision_score(t[keep], s[keep]), abs=ap_bound)
        assert metrics["auroc"] == pytest.approx(roc_auc_score(t[keep], s[keep]), abs=auroc_bound)
        assert ap_bound < 1e-2
        # Fishyscapes: the released rule, the first roc_curve point with TPR > 0.95
        fpr, tpr, _ = roc_curve(t[keep], s[keep])
        assert metrics["fpr95_rule"] == "above"
        assert metrics["fpr95"] == pytest.approx(fpr[np.argmax(tpr > 0.95)], abs=metrics["fpr95_error_bound"] + 1e-9)
    assert result["protocol_options"] == {"fpr95_rule": "above"}


def test_streethazards_is_per_image_with_closed_set_miou(tmp_path, checkpoints):
    root = FAKE_TREES["streethazards"](tmp_path / "data")
    path, model = checkpoints[12]
    assert _run("streethazards", root, path, tmp_path / "r.json") == 0
    result = json.loads((tmp_path / "r.json").read_text())
    aps, confusion = [], np.zeros((12, 12), dtype=np.int64)
    for scores, pred, target in _outputs(model, get_benchmark("streethazards").create(root)):
        binary = anomaly_target(target[None], 12)[0]
        keep = binary != 255
        aps.append(average_precision_score(binary[keep].numpy(), scores[keep].numpy()))
        known = target < 12  # the closed-set mIoU drops anomaly and void pixels
        np.add.at(confusion, (target[known].numpy(), pred[known].numpy()), 1)
    assert result["anomaly"]["densehybrid"]["ap"] == pytest.approx(np.mean(aps), abs=1e-9)
    assert result["anomaly"]["densehybrid"]["num_images"] == 4
    union = confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
    with np.errstate(invalid="ignore", divide="ignore"):
        expected_miou = np.nanmean(np.where(union > 0, np.diag(confusion) / union, np.nan))
    assert result["closed_set"]["miou"] == pytest.approx(expected_miou)


def test_smiyc_components_at_the_pixel_curves_best_f1_threshold(tmp_path, checkpoints):
    root = make_fake_smiyc_obstacle(tmp_path / "data", n_validation=2, size=(32, 64))
    path, model = checkpoints[19]
    assert _run("smiyc-obstacle", root, path, tmp_path / "r.json") == 0
    result = json.loads((tmp_path / "r.json").read_text())
    pixels = SmiycAnomalyMetrics()
    frames = list(_outputs(model, get_benchmark("smiyc-obstacle").create(root)))
    for scores, _, target in frames:
        pixels.update(scores[None], target[None])
    expected_pixels = pixels.compute()
    assert result["anomaly"]["densehybrid"]["ap"] == pytest.approx(expected_pixels["ap"])
    components = ComponentMetrics(expected_pixels["best_f1_threshold"], track="obstacle")
    for scores, _, target in frames:
        components.update(scores[None], target[None])
    expected = components.compute()
    got = result["components"]["densehybrid"]
    assert got["num_gt_components"] == expected["num_gt_components"] > 0
    for key in ("siou", "ppv", "mean_f1"):
        assert got[key] == pytest.approx(expected[key], nan_ok=True) or (got[key] is None and math.isnan(expected[key]))

    # --protocol overrides the benchmark's; components then run only on request
    assert _run("smiyc-obstacle", root, path, tmp_path / "p.json", "--protocol", "pooled", "--components") == 0
    pooled = json.loads((tmp_path / "p.json").read_text())
    assert pooled["protocol"] == "pooled" and pooled["anomaly"]["densehybrid"]["protocol"] == "pooled"
    assert pooled["components"]["densehybrid"]["num_gt_components"] == expected["num_gt_components"]
    assert pooled["components"]["densehybrid"]["threshold"] == pooled["anomaly"]["densehybrid"]["best_f1_threshold"]


def test_limit_input_scale_metric_options_and_sml_statistics(tmp_path, checkpoints):
    root = FAKE_TREES["streethazards"](tmp_path / "data")
    path, _ = checkpoints[12]
    statistics = tmp_path / "sml.pt"
    torch.save(SMLStatistics(torch.zeros(12), torch.ones(12), torch.ones(12, dtype=torch.int64)).to_dict(), statistics)
    extra = ["--limit", "3", "--input-scale", "0.5", "--metric-option", "variant=streethazards"]
    extra += ["--score", "sml", "--score", "max_logit", "--sml-statistics", str(statistics)]
    assert _run("streethazards", root, path, tmp_path / "r.json", *extra) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["num_images"] == 3 and result["input_scale"] == 0.5 and result["settings"]["limit"] == 3
    assert result["anomaly"]["sml"]["variant"] == "streethazards"
    # with zero means and unit deviations, SML is the negated max logit: the same ranking
    assert result["anomaly"]["sml"]["ap"] == pytest.approx(result["anomaly"]["max_logit"]["ap"])


def test_released_state_dicts_need_model_and_must_fit(tmp_path, checkpoints, capsys):
    root = make_fake_fs_laf(tmp_path / "data", n=2)
    _, model = checkpoints[19]
    bare = tmp_path / "released.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, bare)
    assert _run("fs-laf", root, bare, tmp_path / "r.json") == 1
    assert "Expected `--model`" in capsys.readouterr().err
    # the default decoder width differs from the checkpoint's: a one-line CheckpointError, not a traceback
    assert _run("fs-laf", root, bare, tmp_path / "r.json", "--model", "ladder_mobilenetv3") == 1
    err = capsys.readouterr().err
    assert "shape-mismatched" in err and "Traceback" not in err
    default = create_model("ladder_mobilenetv3", num_classes=19).eval()
    torch.save(default.state_dict(), bare)
    assert _run("fs-laf", root, bare, tmp_path / "r.json", "--model", "ladder_mobilenetv3") == 0
    assert json.loads((tmp_path / "r.json").read_text())["num_classes_from"] == "benchmark"


def _error(capsys):
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and "Traceback" not in err
    return err.splitlines()[0]


def test_missing_or_corrupt_files_give_one_line_errors(tmp_path, checkpoints, capsys):
    path, _ = checkpoints[19]
    out = tmp_path / "r.json"
    assert _run("fs-laf", tmp_path / "nowhere", path, out) == 1
    assert "nowhere" in _error(capsys)
    root = make_fake_fs_laf(tmp_path / "data", n=2)
    assert _run("fs-laf", root, tmp_path / "missing.pt", out) == 1
    assert "missing.pt" in _error(capsys)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    assert _run("fs-laf", root, corrupt, out) == 1
    assert "corrupt.pt" in _error(capsys)
    label = sorted((root / "fishyscapes_lostandfound").glob("*_labels.png"))[0]
    label.write_bytes(b"\x89PNG truncated")
    for workers in ("0", "1"):  # also when the file is read in a DataLoader worker process
        assert _run("fs-laf", root, path, out, "--num-workers", workers) == 1
        assert label.name in _error(capsys)
    assert not out.exists()


def test_argument_errors_name_the_problem(tmp_path, checkpoints, capsys):
    path19, _ = checkpoints[19]
    out = tmp_path / "r.json"
    sh = FAKE_TREES["streethazards"](tmp_path / "sh")
    assert _run("streethazards", sh, path19, out) == 1  # a 19-class model on 12-class targets
    assert "12 classes" in _error(capsys)
    assert _run("streethazards", sh, checkpoints[12][0], out, "--score", "sml") == 1
    assert "--sml-statistics" in _error(capsys)
    smiyc = FAKE_TREES["smiyc-anomaly"](tmp_path / "smiyc")
    assert _run("smiyc-anomaly", smiyc, path19, out, "--split", "all") == 1  # test labels are hidden
    assert "no public labels" in _error(capsys)
    assert _run("smiyc-anomaly", smiyc, path19, out, "--metric-option", "bits=20") == 1  # a pooled-only option
    assert "'smiyc' metric" in _error(capsys)
    assert _run("ade20k", FAKE_TREES["ade20k"](tmp_path / "ade"), path19, out) == 1
    assert "negatives" in _error(capsys)
    cityscapes = FAKE_TREES["cityscapes"](tmp_path / "cs")
    assert _run("cityscapes", cityscapes, path19, out, "--score", "msp") == 1
    assert "no anomalies" in _error(capsys)
    assert _run("nonsense", cityscapes, path19, out) == 1
    assert "Unknown benchmark" in _error(capsys)
    (tmp_path / "taken").mkdir()
    assert _run("cityscapes", cityscapes, path19, tmp_path / "taken") == 1  # --out is a directory
    assert "--out" in _error(capsys)


def test_batches_of_frames_with_different_sizes_are_refused(tmp_path, checkpoints, capsys):
    frames = tmp_path / "ra" / "RoadAnomaly_jpg" / "frames"
    for i, size in enumerate(((16, 32), (24, 32))):
        write_image(frames / f"f{i}.jpg", size)
        label = (np.arange(size[0] * size[1]).reshape(size) % 3 == 0) * 2  # 0 normal, 2 anomaly
        write_label(frames / f"f{i}.labels" / "labels_semantic.png", label)
    path, _ = checkpoints[19]
    assert _run("road-anomaly", tmp_path / "ra", path, tmp_path / "r.json", "--batch-size", "2") == 1
    assert "batch size of 1" in _error(capsys)
    assert _run("road-anomaly", tmp_path / "ra", path, tmp_path / "r.json") == 0
