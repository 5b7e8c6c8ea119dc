"""Flow pre-training, joint flow fine-tuning and DiCNet distillation under torchrun (2 gloo CPU processes) follow one
process with the same global batch, and a joint flow run resumes across a change of world size in both directions.

The equivalence tested: a step's global batch of B images is cut into slices, and every slice draws its flips,
negatives, flow samples and the flow's noise from its own generator (``distributed.slice_generators``) and normalises
its own BatchNorm statistics. 2 processes x 1 slice of B/2 and 1 process x 2 accumulated slices of B/2
(``--accumulate 2``) therefore see the same images, the same random draws and the same statistics per slice, and
average the same gradients (DistributedDataParallel / the flow's all-reduce against accumulation); only the order of
float32 sums differs. (1 process with ``--accumulate 1`` draws B images from one generator: the same distribution,
not the same numbers.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from densehybrid.cli import main
from densehybrid.models import create_model
from tests.datasets.fake_trees import make_fake_cityscapes, make_fake_streethazards
from tests.recipes.conftest import LIGHT_LADDER, TINY_NEGATIVES, make_image_folder, sets

REPO = Path(__file__).resolve().parents[2]
#: |logged value(2 processes) - logged value(1 process, 2 slices)| allowed per step: float32 sums in another order
#: (the same bound as the closed-set DDP test, tests/recipes/test_resume_and_distributed.py).
LOSS_TOLERANCE = 1e-4
RUN = ["run.num_workers=0", "run.checkpoint_every=1", "optim.batch_size=4"]
FLOW = ["flow.config=small", "flow.checkpointing=false"]
JOINT = [*RUN, *FLOW, *LIGHT_LADDER, "augment.crop=32", "flow.max_side=24", "optim.epochs=2", "flow.lr_decay=0.5"]
#: pre-training keeps the released gradient checkpointing (recomputed coupling networks inside DDP's backward)
PRETRAIN = [*RUN, "flow.config=small", "augment.crop=16", "flow.grid_samples=2", "flow.grid_size=16", "optim.epochs=1"]
DISTILL = [*RUN, "model.name=dicnet", "model.kwargs.student_backbone=mobilenetv3_large_100"]
MIXED = [
    *TINY_NEGATIVES,
    "negatives.dataset=folder",
    "negatives.source=mixed",
    "negatives.synthetic_fraction=0.5",
    "negatives.pastes=2",
]
JOINT_KEYS = ("loss", "seg", "likelihood", "posterior", "flow_jsd", "flow_bpd")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO)])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _logs(out: Path) -> dict[int, dict[str, float]]:
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {line["step"]: line for line in lines if line["kind"] == "train"}


def _summary(out: Path) -> dict:
    return json.loads((out / "train-summary.json").read_text())


def _assert_same_steps(got: Path, expected: Path, steps: list[int], keys: tuple[str, ...]) -> None:
    a, b = _logs(got), _logs(expected)
    assert sorted(a) == steps and set(steps) <= set(b), (sorted(a), sorted(b))
    for step in steps:
        for key in keys:
            assert abs(a[step][key] - b[step][key]) <= LOSS_TOLERANCE, (step, key, a[step], b[step])


def _assert_same_parameters(got: Path, expected: Path) -> None:
    """The segmenter's parameters and the flow's state agree (BatchNorm running statistics are kept per process)."""
    a, b = torch.load(got, weights_only=True), torch.load(expected, weights_only=True)
    params = [k for k in b["model"] if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(params) > 50
    for key in params:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-3, atol=1e-5, msg=key)
    flow_a, flow_b = a["objective_state"]["flow"], b["objective_state"]["flow"]
    assert flow_a.keys() == flow_b.keys()
    for key in flow_b:
        torch.testing.assert_close(flow_a[key], flow_b[key], rtol=1e-3, atol=1e-5, msg=key)
    lr = [s["objective_state"]["flow_optimizer"]["param_groups"][0]["lr"] for s in (a, b)]
    assert lr[0] == lr[1] == pytest.approx(1e-5 * 0.5**2)  # the flow's schedule: x0.5 after each of the 2 epochs


@pytest.mark.slow
def test_two_gloo_processes_train_flows_and_distil_as_one_process_with_two_slices(tmp_path):
    cityscapes = make_fake_cityscapes(tmp_path / "cs", splits=("train", "val"), n_per_city=4)  # 8 frames: 2 steps
    streethazards = make_fake_streethazards(tmp_path / "sh", splits=("train",))
    negatives = make_image_folder(tmp_path / "neg")
    torch.manual_seed(3)
    teacher = create_model("ladder_mobilenetv3", num_classes=13, decoder_channels=8)
    teacher_file = tmp_path / "teacher.pt"
    torch.save({"model": teacher.state_dict(), "model_name": teacher.model_name, "model_kwargs": teacher.model_kwargs},
               teacher_file)  # fmt: skip
    flow_file = tmp_path / "pre1" / "last.pt"

    def pretrain(out: str) -> list[str]:
        command = ["train", "--recipe", "denseflow-pretrain", "--data-root", str(cityscapes)]
        return [*command, "--out", str(tmp_path / out), "--device", "cpu", "--no-progress", *sets(*PRETRAIN)]

    def joint(out: str, *extra: str, items: tuple[str, ...] = ()) -> list[str]:
        command = ["train", "--recipe", "dlv3p-cityscapes-finetune-flow", "--data-root", str(cityscapes)]
        command += ["--flow-init", str(flow_file), "--out", str(tmp_path / out), "--device", "cpu", "--no-progress"]
        return [*command, *extra, *sets(*JOINT, *items)]

    def mixed(out: str) -> list[str]:  # real negatives and flow patches, 2 per image
        return joint(out, "--neg-root", str(negatives), "--max-steps", "2", items=tuple(MIXED))

    def distil(out: str) -> list[str]:
        command = ["train", "--recipe", "dicnet-streethazards", "--data-root", str(streethazards)]
        command += ["--init", str(teacher_file), "--out", str(tmp_path / out), "--max-steps", "2", "--device", "cpu"]
        return [*command, "--no-progress", *sets(*DISTILL)]

    one = ["--accumulate", "2"]  # 1 process, 2 slices of 2 images: the references
    for args in (
        pretrain("pre1"),
        joint("joint1"),
        joint("part1", "--max-steps", "2"),
        mixed("mixed1"),
        distil("dist1"),
    ):
        assert main([*args, *one]) == 0, args

    commands = [
        pretrain("pre2"),
        joint("joint2", "--max-steps", "2"),
        joint("part1"),  # the 1-process checkpoint (step 2) resumes in 2 processes
        mixed("mixed2"),
        distil("dist2"),
    ]
    (tmp_path / "commands.json").write_text(json.dumps(commands))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    driver = str(REPO / "tests" / "recipes" / "one_process_group.py")
    done = subprocess.run(
        [*torchrun, driver, str(tmp_path / "commands.json")], env=_env(), capture_output=True, timeout=400
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]

    # flow pre-training: DistributedDataParallel over the flow
    _assert_same_steps(tmp_path / "pre2", tmp_path / "pre1", [1, 2], ("loss", "bpd"))
    assert _summary(tmp_path / "pre2")["world_size"] == 2 and _summary(tmp_path / "pre1")["accumulate"] == 2
    assert [p.name for p in (tmp_path / "pre2").glob("samples_epoch*.png")] == ["samples_epoch001.png"]
    # joint fine-tuning: both steps of every iteration, the segmenter and the flow's terms
    _assert_same_steps(tmp_path / "joint2", tmp_path / "joint1", [1, 2], JOINT_KEYS)
    assert torch.load(tmp_path / "joint2" / "last.pt", weights_only=True)["world_size"] == 2
    _assert_same_steps(tmp_path / "mixed2", tmp_path / "mixed1", [1, 2], JOINT_KEYS)  # real crops drawn per slice too
    # distillation
    _assert_same_steps(tmp_path / "dist2", tmp_path / "dist1", [1, 2], ("loss",))

    # resume across a change of world size: 1 -> 2 processes (above) and 2 -> 1 process (now)
    assert main([*joint("joint2"), *one]) == 0
    for resumed in ("part1", "joint2"):
        summary = _summary(tmp_path / resumed)
        assert summary["resumed"] and summary["finished"] and summary["global_step"] == 4
        _assert_same_steps(tmp_path / resumed, tmp_path / "joint1", [1, 2, 3, 4], JOINT_KEYS)
        assert [h["flow_lr"] for h in summary["history"]] == pytest.approx([5e-6, 2.5e-6])
        _assert_same_parameters(tmp_path / resumed / "last.pt", tmp_path / "joint1" / "last.pt")
    assert _summary(tmp_path / "part1")["world_size"] == 2 and _summary(tmp_path / "joint2")["world_size"] == 1
