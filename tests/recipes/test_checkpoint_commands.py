"""Every checkpoint a command writes (train, flow pre-training, distillation, calibrate) reads through the one reader
with the current format version and the class names of the folder tree it was trained on, and `export` puts those
names into the exported file's metadata."""

from __future__ import annotations

import json

import onnx
import torch

from densehybrid.cli import main
from densehybrid.data import RoadSceneBenchmark
from densehybrid.models.checkpoint import FORMAT_VERSION, read_checkpoint
from tests.recipes.conftest import LIGHT_LADDER, TINY, make_folder_tree, sets

#: ten classes, as many as the generated road scenes have (calibration needs the benchmark's K)
CLASSES = [f"thing{i}" for i in range(10)]


def _train(recipe: str, root, out, *items: str, init=None) -> list[str]:
    args = ["train", "--recipe", recipe, "--data-root", str(root), "--out", str(out), "--device", "cpu"]
    args += ["--no-progress", "--max-steps", "1", *sets(*items)]
    return args + (["--init", str(init)] if init else [])


def test_every_command_writes_the_one_format_with_the_trained_classes(tmp_path, capsys):
    root = make_folder_tree(tmp_path / "mine", n_train=4, n_val=2, classes=CLASSES)
    generic, flow, dicnet = tmp_path / "generic", tmp_path / "flow", tmp_path / "dicnet"
    assert main(_train("generic", root, generic, *TINY, *LIGHT_LADDER)) == 0, capsys.readouterr().err
    flow_items = ["data.dataset=folder", "augment.crop=16", "flow.config=small", "flow.checkpointing=false"]
    flow_items += ["flow.grid_samples=1", "flow.grid_size=16", "optim.batch_size=2", "run.num_workers=0"]
    assert main(_train("denseflow-pretrain", root, flow, *flow_items)) == 0, capsys.readouterr().err
    dicnet_items = ["optim.batch_size=2", "run.num_workers=0", "model.kwargs.student_backbone=mobilenetv3_large_100"]
    init = generic / "last.pt"
    assert main(_train("dicnet", root, dicnet, *dicnet_items, init=init)) == 0, capsys.readouterr().err
    scenes = tmp_path / "scenes"
    RoadSceneBenchmark(scenes, seed=0, image_size=(48, 96), sizes={"train": 1, "val": 2, "test": 1}).prepare()
    calibrated = tmp_path / "calibrated.pt"
    code = main(
        ["calibrate", "--checkpoint", str(generic / "last.pt"), "--benchmark", "roadscene", "--root", str(scenes)]
        + ["--out", str(calibrated), "--device", "cpu", "--num-workers", "0", "--no-progress"]
    )
    assert code == 0, capsys.readouterr().err

    written = {
        "train": generic / "last.pt",
        "flow pre-training": flow / "last.pt",
        "distillation": dicnet / "last.pt",
        "calibrate": calibrated,
    }
    methods = {"train": "closed-set", "flow pre-training": "denseflow-pretrain", "distillation": "dicnet"}
    for command, path in written.items():
        info = read_checkpoint(path)
        assert info.layout == "densehybrid-2" and info.format_version == FORMAT_VERSION, command
        assert info.class_names == CLASSES and len(info.palette) == 10 and info.ignore_index == 255, command
        assert info.recipe is not None and info.method == methods.get(command, "closed-set"), command
    assert read_checkpoint(calibrated).calibration["benchmark"] == "roadscene"
    assert read_checkpoint(calibrated).model_name == "ladder_mobilenetv3"

    exported = tmp_path / "model.pt"
    code = main(["export", "--checkpoint", str(calibrated), "--format", "torchscript", "--out", str(exported)])
    assert code == 0, capsys.readouterr().err
    files = {"densehybrid.json": ""}
    torch.jit.load(str(exported), _extra_files=files)
    metadata = {key: json.loads(value) for key, value in json.loads(files["densehybrid.json"]).items()}
    assert metadata["class_names"] == CLASSES
    assert metadata["palette"] == read_checkpoint(calibrated).palette and metadata["threshold"] is not None


def test_onnx_export_carries_the_class_names(tmp_path, capsys):
    root = make_folder_tree(tmp_path / "mine", n_train=2, n_val=0, classes=("sky", "road"))
    out = tmp_path / "run"
    assert main(_train("generic", root, out, *TINY, *LIGHT_LADDER, "run.validate=false")) == 0
    onnx_file = tmp_path / "model.onnx"
    code = main(["export", "--checkpoint", str(out / "last.pt"), "--format", "onnx", "--out", str(onnx_file)])
    assert code == 0, capsys.readouterr().err
    props = {p.key: json.loads(p.value) for p in onnx.load(str(onnx_file)).metadata_props}
    props = {key.removeprefix("densehybrid."): value for key, value in props.items()}
    assert props["class_names"] == ["sky", "road"] and len(props["palette"]) == 2
