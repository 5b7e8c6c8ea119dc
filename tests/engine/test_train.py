from __future__ import annotations

import re

import pytest
import torch

from densehybrid.engine import ClosedSetObjective, TrainConfig, atomic_torch_save, fit, select_device
from densehybrid.engine.train import cosine_lr, epoch_line
from densehybrid.errors import CheckpointError
from tests.helpers import tiny_model

FAST = dict(batch_size=4, lr=3e-3, device="cpu", progress=False, seed=3, num_workers=0)


def test_closed_set_training_lowers_the_loss(tiny_set):
    model = tiny_model()
    result = fit(model, tiny_set, ClosedSetObjective(), TrainConfig(epochs=4, **FAST))
    losses = [h["loss"] for h in result.history]
    assert result.finished and result.global_step == 4 * (len(tiny_set) // 4)
    assert losses[-1] < 0.7 * losses[0]


def test_interrupted_run_resumes_to_identical_parameters(tiny_set, tmp_path):
    config = TrainConfig(epochs=2, checkpoint_every=1, **FAST)
    reference = tiny_model()
    fit(reference, tiny_set, ClosedSetObjective(), config, out_dir=tmp_path / "ref")

    # stop part-way through the first epoch, as a killed run would after its last checkpoint
    interrupted = tiny_model()
    stopped = fit(
        interrupted, tiny_set, ClosedSetObjective(), TrainConfig(epochs=2, max_steps=3, **FAST), out_dir=tmp_path / "b"
    )
    assert not stopped.finished and stopped.global_step == 3
    resumed = tiny_model()  # a fresh process: new model, state comes only from the checkpoint
    result = fit(resumed, tiny_set, ClosedSetObjective(), config, out_dir=tmp_path / "b", resume=True)
    assert result.finished and result.global_step == 2 * (len(tiny_set) // 4)
    ref_state, new_state = reference.state_dict(), resumed.state_dict()
    assert ref_state.keys() == new_state.keys()
    for key in ref_state:
        assert torch.equal(ref_state[key], new_state[key]), key


def test_resume_refuses_a_checkpoint_of_another_architecture(tiny_set, tmp_path):
    from densehybrid.models import create_model

    fit(tiny_model(), tiny_set, ClosedSetObjective(), TrainConfig(epochs=1, max_steps=1, **FAST), out_dir=tmp_path)
    other = create_model("ladder_resnet18", num_classes=4, decoder_channels=16)
    with pytest.raises(CheckpointError, match="(?i)missing"):
        fit(other, tiny_set, ClosedSetObjective(), TrainConfig(epochs=1, **FAST), out_dir=tmp_path, resume=True)


def test_atomic_save_keeps_the_previous_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_torch_save({"step": 1}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        atomic_torch_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind


def test_cosine_schedule_matches_the_released_formula():
    assert cosine_lr(1e-3, 1e-7, 0, 10) == pytest.approx(1e-3)
    assert cosine_lr(1e-3, 1e-7, 5, 10) == pytest.approx(1e-7 + (1e-3 - 1e-7) / 2)
    assert cosine_lr(1e-3, 1e-7, 10, 10) == pytest.approx(1e-7)


def test_config_and_device_errors_name_the_argument(tiny_set):
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        fit(tiny_model(), tiny_set, ClosedSetObjective(), TrainConfig(epochs=1, **{**FAST, "batch_size": 64}))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            select_device("cuda")
    assert select_device("cpu").type == "cpu"


def test_densehybrid_finetuning_with_pasted_negatives_learns_the_posterior(tiny_set, tiny_negatives):
    from densehybrid.engine import DenseHybridObjective, NegativeStream
    from densehybrid.losses import DenseHybridLoss
    from densehybrid.negatives import NegativePaster

    model = tiny_model()
    fit(model, tiny_set, ClosedSetObjective(), TrainConfig(epochs=2, **FAST))
    objective = DenseHybridObjective(DenseHybridLoss(), NegativeStream(tiny_negatives, crop_size=20), NegativePaster())
    result = fit(model, tiny_set, objective, TrainConfig(epochs=4, **FAST))
    first, last = result.history[0], result.history[-1]
    assert {"loss", "seg", "likelihood", "posterior"} <= set(first)
    assert last["posterior"] < first["posterior"]


def test_negative_stream_crops_to_size_and_upscales_small_images(tiny_negatives):
    from densehybrid.engine import NegativeStream

    g = torch.Generator().manual_seed(0)
    images, segments = NegativeStream(tiny_negatives, crop_size=16).draw(3, g)
    assert images.shape == (3, 3, 16, 16) and segments.shape == (3, 16, 16)
    big_images, big_segments = NegativeStream(tiny_negatives, crop_size=40).draw(2, g)
    assert big_images.shape == (2, 3, 40, 40) and set(big_segments.unique().tolist()) <= {0, 1}


# -- valid data that used to stop training ---------------------------------------------------------------------------
def test_a_crop_without_labelled_pixels_gives_zero_loss_not_nan():
    model = tiny_model()
    images = torch.rand(2, 3, 32, 32)
    void = torch.full((2, 32, 32), 255, dtype=torch.long)
    loss, logs = ClosedSetObjective()(model, images, void, torch.Generator())
    assert loss.item() == 0.0 and logs["loss"] == 0.0
    loss.backward()  # a step on it is a no-op, not an error
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_closed_set_training_survives_a_batch_of_void_labels(tiny_set):
    class VoidFirst(torch.utils.data.Dataset):
        def __len__(self):
            return len(tiny_set)

        def __getitem__(self, i):
            sample = dict(tiny_set[i])
            sample["target"] = torch.full_like(sample["target"], 255)
            return sample

    result = fit(tiny_model(), VoidFirst(), ClosedSetObjective(), TrainConfig(epochs=1, **FAST))
    assert result.finished and result.history[-1]["loss"] == 0.0


# -- failures that used to be internal errors ------------------------------------------------------------------------
def test_a_full_disk_while_saving_last_pt_is_an_output_error_and_keeps_the_previous_file(tmp_path, monkeypatch):
    from densehybrid.errors import OutputError

    path = tmp_path / "last.pt"
    atomic_torch_save({"step": 1}, path)

    def full_disk(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OutputError, match="is the disk full"):
        atomic_torch_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1} and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_whole_images_of_different_sizes_in_one_batch_are_named_not_a_stack_error():
    from densehybrid.engine.batches import collate

    samples = [{"image": torch.zeros(3, 8, 8)}, {"image": torch.zeros(3, 8, 6)}]
    with pytest.raises(ValueError, match=r"share one size.*\(3, 8, 6\) and \(3, 8, 8\).*augment.crop.*batch size of 1"):
        collate(samples)


def test_ctrl_c_during_a_long_negative_pasting_step_stops_at_once_with_the_state_before_it(
    tiny_set, tiny_negatives, tmp_path
):
    from densehybrid.engine import DenseHybridObjective, NegativeStream
    from densehybrid.engine.runtime import clear_stop, request_stop
    from densehybrid.losses import DenseHybridLoss
    from densehybrid.negatives import NegativePaster

    class StopsAfterThreeDraws(NegativeStream):
        draws = 0

        def draw(self, count, generator):
            StopsAfterThreeDraws.draws += 1
            if StopsAfterThreeDraws.draws == 3:
                request_stop()  # what the first SIGINT of `densehybrid train` does
            return super().draw(count, generator)

    stream = StopsAfterThreeDraws(tiny_negatives, crop_size=20)
    objective = DenseHybridObjective(DenseHybridLoss(), stream, NegativePaster(), pastes=10_000)
    try:
        result = fit(tiny_model(), tiny_set, objective, TrainConfig(epochs=1, **FAST), out_dir=tmp_path)
    finally:
        clear_stop()
    assert result.interrupted and result.global_step == 0 and StopsAfterThreeDraws.draws == 3
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert saved["global_step"] == 0 and saved["step_in_epoch"] == 0


# -- the loop's console lines -----------------------------------------------------------------------------------------
def test_the_loop_tells_one_line_per_epoch_with_validation_time_and_eta(tiny_set, one_thread):
    lines: list[str] = []
    calls = iter([{"val_miou": 0.5, "val_ap": 0.25, "val_fpr95": float("nan")}, {"val_miou": 0.625}])
    fit(
        tiny_model(),
        tiny_set,
        ClosedSetObjective(),
        TrainConfig(epochs=2, **FAST),
        on_epoch_end=lambda epoch, model: next(calls),
        echo=lines.append,
    )
    assert len(lines) == 2
    first, last = lines
    assert first.startswith("epoch 1/2  loss ") and "val mIoU 50.0%  AP 25.0%  FPR95 n/a" in first
    assert re.search(r"  (\d+m )?\d+s  ETA (\d+h )?(\d+m )?\d+s?$", first)
    assert last.startswith("epoch 2/2  loss ") and "val mIoU 62.5%" in last and "AP" not in last
    assert last.endswith("  done")


def test_a_resumed_loop_says_from_which_step_of_how_many(tiny_set, tmp_path, one_thread):
    stopped = fit(tiny_model(), tiny_set, ClosedSetObjective(), TrainConfig(epochs=2, max_steps=3, **FAST), tmp_path)
    assert stopped.global_step == 3
    lines: list[str] = []
    fit(tiny_model(), tiny_set, ClosedSetObjective(), TrainConfig(epochs=2, **FAST), tmp_path, True, echo=lines.append)
    per_epoch = len(tiny_set) // 4
    assert (
        lines[0] == f"resuming from step 3 of {2 * per_epoch} (epoch 1/2, step 3/{per_epoch}) in {tmp_path / 'last.pt'}"
    )
    assert [line.split("  ")[0] for line in lines[1:]] == ["epoch 1/2", "epoch 2/2"]


def test_epoch_line_formats_durations_and_leaves_out_what_a_record_lacks():
    line = epoch_line({"epoch": 3, "loss": 0.5}, 10, seconds=125.4, eta_seconds=7 * 3600 + 60 * 5)
    assert line == "epoch 3/10  loss 0.5000  2m 05s  ETA 7h 05m"
