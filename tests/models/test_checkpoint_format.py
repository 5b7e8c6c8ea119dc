"""The one checkpoint format: every layout this package wrote before still reads through the one reader, and what the
writer writes holds the format version and the classes (`densehybrid info` shows it without building a model)."""

from __future__ import annotations

import json

import pytest
import torch

from densehybrid.cli import main
from densehybrid.engine.train import ClosedSetObjective, TrainConfig, fit
from densehybrid.flows import DenseFlow
from densehybrid.models import create_model
from densehybrid.models.checkpoint import (
    CALIBRATION_KEY,
    FORMAT_VERSION,
    LAYOUTS,
    checkpoint_dict,
    model_from_checkpoint,
    read_checkpoint,
    write_checkpoint,
)
from densehybrid.recipes.flow_methods import load_flow_init
from tests.helpers import NUM_CLASSES, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["road", "car", "tree"]
CALIBRATION = {
    "score": "densehybrid",
    "threshold": 0.25,
    "display_range": [-1.0, 2.0],
    "method": "tpr",
    "target_tpr": 0.95,
    "benchmark": "roadscene",
    "split": "val",
    "num_images": 2,
    "class_names": CLASSES,
    "palette": [[1, 2, 3], [4, 5, 6], [7, 8, 9]],
}


def _model():
    torch.manual_seed(0)
    return create_model("ladder_mobilenetv3", num_classes=3).eval()


def _old_layouts(model, flow) -> dict[str, dict]:
    """One file of every layout the package wrote before format_version 2, with its writer's exact dict structure."""
    state = model.state_dict()
    training_1 = {  # engine.train.training_checkpoint, version 1
        "format": "densehybrid-checkpoint",
        "version": 1,
        "model": state,
        "model_name": model.model_name,
        "model_kwargs": model.model_kwargs,
        "data_config": model.data_config,
        "num_classes": 3,
        "objective": "densehybrid",
        "optimizer": {"state": {}, "param_groups": []},
        "scaler": None,
        "config": {"epochs": 4, "lr": 1e-4},
        "epoch": 2,
        "step_in_epoch": 0,
        "global_step": 10,
        "generator": torch.Generator().manual_seed(0).get_state(),
        "rng": {},
        "history": [{"epoch": 1, "loss": 1.5}, {"epoch": 2, "loss": 1.25}],
        "metadata": {"kind": "densehybrid-training-run", "recipe": {"name": "generic"}, "num_classes": 3},
        "epoch_sums": {},
        "world_size": 1,
    }
    calibrated_1 = {  # calibrate._with_calibration of a released (bare) file
        "model": state,
        "model_name": model.model_name,
        "model_kwargs": {"num_classes": 3},
        "num_classes": 3,
        CALIBRATION_KEY: CALIBRATION,
    }
    flow_pretrain_1 = {  # engine.flow_joint.pretrain_flow's flow_last.pt
        "format": "densehybrid-flow-checkpoint",
        "flow": flow.state_dict(),
        "flow_config": flow.config,
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 1,
        "history": [{"epoch": 1, "bpd": 7.5, "seconds": 1.0}],
        "generator": torch.Generator().manual_seed(0).get_state(),
    }
    demo_stage_1 = {  # demo._mark_finished
        "model": state,
        "model_name": model.model_name,
        "model_kwargs": model.model_kwargs,
        "data_config": model.data_config,
        "settings": {"model": "ladder_mobilenetv3", "seed": 0},
        "history": [{"epoch": 1, "loss": 0.5}],
    }
    demo_flow_1 = {"model": flow.state_dict(), "flow_config": flow.config, "settings": {"seed": 0}, "history": []}
    demo_distillation_1 = {  # the demo's distillation loop, last.pt
        "student": {"conv.weight": torch.ones(2, 2, 1, 1)},
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 1,
        "history": [{"epoch": 1, "loss": 0.1}],
        "metadata": {"demo_settings": {"seed": 0}},
    }
    return {
        "training-1": training_1,
        "calibrated-1": calibrated_1,
        "flow-pretrain-1": flow_pretrain_1,
        "demo-stage-1": demo_stage_1,
        "demo-flow-1": demo_flow_1,
        "demo-distillation-1": demo_distillation_1,
        "released": state,
    }


@pytest.fixture(scope="module")
def old_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("old-layouts")
    model, flow = _model(), DenseFlow.small()
    paths = {}
    for layout, obj in _old_layouts(model, flow).items():
        paths[layout] = folder / f"{layout}.pt"
        torch.save(obj, paths[layout])
    return model, flow, paths


def test_every_old_layout_reads_through_the_one_reader(old_files):
    model, flow, paths = old_files
    assert set(paths) == set(LAYOUTS) - {"densehybrid-2"}
    for layout, path in paths.items():
        info = read_checkpoint(path)
        assert info.layout == layout and info.format_version == (0 if layout == "released" else 1), layout
    for layout in ("training-1", "calibrated-1", "demo-stage-1"):  # segmentation models rebuild from the file alone
        net, metadata = model_from_checkpoint(read_checkpoint(paths[layout]), paths[layout])
        assert all(torch.equal(net.state_dict()[k], v) for k, v in model.state_dict().items()), layout
        assert metadata["num_classes"] == 3 and metadata["format_version"] == 1
    net, metadata = model_from_checkpoint(
        read_checkpoint(paths["released"]), paths["released"], "ladder_mobilenetv3", 3
    )
    assert metadata["format_version"] == 0 and metadata["class_names"] == []
    training = read_checkpoint(paths["training-1"])
    assert training.method == "densehybrid" and training.recipe == {"name": "generic"} and training.resumable
    assert training.normalization == model.data_config and training.training["global_step"] == 10
    calibrated = read_checkpoint(paths["calibrated-1"])
    assert calibrated.calibration["threshold"] == 0.25 and calibrated.class_names == CLASSES  # from the calibration
    for layout in ("flow-pretrain-1", "demo-flow-1"):  # flows load as --flow-init
        fresh = DenseFlow.small()
        load_flow_init(fresh, str(paths[layout]))
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in flow.state_dict().items()), layout
        assert read_checkpoint(paths[layout]).architecture == "DenseFlow"
    student = read_checkpoint(paths["demo-distillation-1"])
    assert student.method == "dicnet" and list(student.state_dict) == ["student.conv.weight"]


def test_the_writer_refuses_other_layouts_and_its_files_hold_every_field(tmp_path):
    model = _model()
    with pytest.raises(ValueError, match="format_version"):
        write_checkpoint({"model": model.state_dict()}, tmp_path / "x.pt")
    recipe = {"name": "generic", "method": "closed-set", "optim": {"epochs": 2}}
    path = write_checkpoint(
        checkpoint_dict(
            model,
            method="closed-set",
            recipe=recipe,
            class_names=CLASSES,
            palette=CALIBRATION["palette"],
            calibration=CALIBRATION,
        ),
        tmp_path / "model.pt",
    )
    raw = torch.load(path, weights_only=True)  # plain values and tensors only
    assert raw["format_version"] == FORMAT_VERSION and raw["class_names"] == CLASSES and raw["ignore_index"] == 255
    info = read_checkpoint(path)
    assert info.layout == "densehybrid-2" and info.recipe == recipe and info.method == "closed-set"
    assert info.normalization == model.data_config and info.calibration["threshold"] == 0.25
    assert info.model_kwargs == {"num_classes": 3} and not info.resumable


def test_fit_writes_the_format_with_the_classes_it_is_given(tiny_set, tmp_path):
    config = TrainConfig(epochs=1, max_steps=1, batch_size=4, device="cpu", progress=False, num_workers=0)
    names = [f"class{i}" for i in range(NUM_CLASSES)]
    metadata = {"class_names": names, "ignore_index": 255, "kind": "test"}
    fit(tiny_model(), tiny_set, ClosedSetObjective(), config, out_dir=tmp_path, metadata=metadata)
    info = read_checkpoint(tmp_path / "last.pt")
    assert info.format_version == FORMAT_VERSION and info.class_names == names and info.method == "closed_set"
    assert info.resumable and info.training["global_step"] == 1 and info.metadata["kind"] == "test"


def test_info_prints_a_checkpoint_without_building_the_model(old_files, tmp_path, capsys, monkeypatch):
    model, _, paths = old_files
    path = write_checkpoint(
        checkpoint_dict(model, method="densehybrid", class_names=CLASSES, calibration=CALIBRATION),
        tmp_path / "calibrated.pt",
    )
    import densehybrid.models.registry

    def refuse(*args, **kwargs):
        raise AssertionError("info built a model")

    monkeypatch.setattr(densehybrid.models.registry, "create_model", refuse)
    assert main(["info", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format_version"] == FORMAT_VERSION and summary["classes"]["names"] == CLASSES
    assert summary["architecture"]["model"] == "ladder_mobilenetv3" and summary["architecture"]["num_classes"] == 3
    assert summary["calibration"]["threshold"] == 0.25 and summary["method"] == "densehybrid"
    assert main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert "classes        3: road, car, tree (ignore id 255)" in text and "threshold 0.25" in text
    assert main(["info", str(paths["training-1"])]) == 0
    text = capsys.readouterr().out
    assert "training-1" in text and "epoch 2/4, step 10 (resumable)" in text and "loss 1.25" in text
    assert main(["info", str(tmp_path / "missing.pt")]) == 1
    assert "missing" in capsys.readouterr().err


def test_only_the_checkpoint_module_calls_torch_load_or_save():
    import ast
    from pathlib import Path

    import densehybrid

    callers = set()
    package = Path(densehybrid.__file__).parent
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            func = node.func if isinstance(node, ast.Call) else None
            if isinstance(func, ast.Attribute) and func.attr in ("load", "save"):
                if isinstance(func.value, ast.Name) and func.value.id == "torch":
                    callers.add(path.relative_to(package).as_posix())
    assert callers == {"models/checkpoint.py"}  # read_checkpoint_file and atomic_save
