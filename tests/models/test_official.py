"""Official architectures: key-for-key and output equivalence with the released models, forward/backward, weights.

The references are the compatibility fixtures in ``tests/data/compat`` (copied from ``shared/compat``): the state-dict
layout of the official models and their outputs for deterministic weights derived from the parameter names.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision

from densehybrid.errors import CheckpointError
from densehybrid.models import HybridOutput, create_model, load_checkpoint
from densehybrid.models.deeplabv3plus import deeplabv3plus_wrn38, load_closed_set_weights
from densehybrid.models.ldn import ldn121
from densehybrid.models.registry import get_model_entry
from densehybrid.models.segmenter import segmenter_vit_ti16
from densehybrid.models.window import SlidingWindow, sliding_window_outputs

COMPAT = Path(__file__).resolve().parents[1] / "data" / "compat"
FIXTURES = {"ldn121": ("ldn121_th", 12), "deeplabv3plus_wrn38": ("dlv3p_wrn38_th", 19)}
OWN_MODELS = ["ldn121", "deeplabv3plus_wrn38", "segmenter_vit_ti16", "segmenter_vit_s16", "segmenter_vit_b16"]


def deterministic_state_dict(model: torch.nn.Module, seed: int = 7) -> dict[str, torch.Tensor]:
    """The fixture weights, exactly as ``shared/compat/README.md`` defines them from each entry's name and shape."""
    state = {}
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point():  # integer entries (num_batches_tracked) keep the module's own value
            state[name] = tensor.clone()
            continue
        shape = tuple(tensor.shape)
        h = int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:8], 16)
        g = torch.Generator().manual_seed(h)
        if name.endswith("running_var"):
            value = 0.5 + torch.rand(shape, generator=g)
        elif name.endswith("running_mean"):
            value = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) >= 2:
            value = torch.randn(shape, generator=g) * math.sqrt(2 / math.prod(shape[1:]))
        elif name.endswith("weight"):
            value = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            value = 0.1 * torch.randn(shape, generator=g)
        state[name] = value.to(tensor.dtype)
    return state


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    """The two fixture models, built once per module (DeepLabV3+ WRN38 has 137M parameters)."""
    return {name: create_model(name, num_classes=k) for name, (_, k) in FIXTURES.items()}


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return float((actual - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize("name", list(FIXTURES))
def test_state_dict_equals_released_layout(models, name):
    prefix, _ = FIXTURES[name]
    expected = json.loads((COMPAT / f"{prefix}_keys.json").read_text())
    actual = {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in models[name].state_dict().items()}
    assert list(actual) == list(expected)  # same names in the same order
    assert actual == expected  # same shapes and dtypes


@pytest.mark.parametrize("name", list(FIXTURES))
def test_outputs_match_released_model(models, name):
    prefix, _ = FIXTURES[name]
    model = models[name]
    model.load_state_dict(deterministic_state_dict(model), strict=True)
    model.eval()
    ref = np.load(COMPAT / f"{prefix}_ref.npz")
    with torch.no_grad():
        out = model(torch.from_numpy(ref["input"]))
    assert isinstance(out, HybridOutput)
    assert relative_error(out.logits, torch.from_numpy(ref["logits"])) < 1e-4
    assert relative_error(out.ood_logits, torch.from_numpy(ref["logits_ood"])) < 1e-4


@pytest.mark.parametrize(("name", "align_corners"), [("ldn121", False), ("deeplabv3plus_wrn38", True)])
def test_split_forward_equals_forward(models, name, align_corners):
    model = models[name].eval()
    images = torch.rand(1, 3, 40, 56)
    with torch.no_grad():
        out = model(images, output_size=(20, 28))
        features = model.forward_features(images)
        logits, ood = model.forward_head(features), model.forward_ood_head(features)
    assert features.shape[1] == model.feature_channels
    assert out.logits.shape == (1, model.num_classes, 20, 28) and out.ood_logits.shape == (1, 2, 20, 28)
    # Both outputs are the feature-resolution heads, resized bilinearly with the model's own convention.
    for full, low in ((out.logits, logits), (out.ood_logits, ood)):
        resized = F.interpolate(low, size=(20, 28), mode="bilinear", align_corners=align_corners)
        torch.testing.assert_close(full, resized)


def test_data_config_and_normalisation_buffers(models):
    assert models["ldn121"].data_config == {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    cfg = models["deeplabv3plus_wrn38"].data_config
    assert cfg["mean"] == pytest.approx([0.485, 0.456, 0.406]) and cfg["std"] == pytest.approx([0.229, 0.224, 0.225])
    for model in models.values():
        assert not any(k.startswith("normalize.") for k in model.state_dict())


@pytest.mark.parametrize("name", list(FIXTURES))
def test_forward_backward_small(models, name):
    model = models[name].train()
    images = torch.rand(2, 3, 48, 64)
    out = model(images)
    assert out.logits.shape == (2, model.num_classes, 48, 64) and out.ood_logits.shape == (2, 2, 48, 64)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.ood_logits).all()
    (out.logits.logsumexp(1).mean() + out.ood_logits.log_softmax(1)[:, 1].mean()).backward()
    first_conv = next(p for n, p in model.named_parameters() if n.endswith("conv0.weight") or n == "mod1.conv1.weight")
    for param in (first_conv, model.logits_ood.conv.weight):
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


@pytest.fixture(scope="module")
def segmenter_b16() -> torch.nn.Module:
    """The released COCO20 Segmenter (ViT-B/16, 119M parameters) with the fixture weights, built once per module."""
    model = create_model("segmenter_vit_b16", num_classes=20)
    model.load_state_dict(deterministic_state_dict(model), strict=True)
    return model.eval()


def test_segmenter_state_dict_equals_released_layout(segmenter_b16):
    expected = json.loads((COMPAT / "segmenter_vitb_th_keys.json").read_text())
    actual = {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in segmenter_b16.state_dict().items()}
    assert list(actual) == list(expected)  # same names in the same order
    assert actual == expected  # same shapes and dtypes
    assert sum(p.numel() for p in segmenter_b16.parameters()) == 119_115_540


def test_segmenter_outputs_match_released_model(segmenter_b16):
    ref = np.load(COMPAT / "segmenter_vitb_th_ref.npz")
    images = torch.from_numpy(ref["input"])
    with torch.no_grad():
        out = segmenter_b16.forward_whole(images)
    assert relative_error(out.logits, torch.from_numpy(ref["logits"])) < 1e-4
    assert relative_error(out.ood_logits, torch.from_numpy(ref["logits_ood"])) < 1e-4
    assert segmenter_b16.data_config["mean"] == pytest.approx([0.485, 0.456, 0.406])
    # Eval-mode forward is the same whole-image pass: logits, never probabilities.
    with torch.no_grad():
        torch.testing.assert_close(segmenter_b16(images).logits, out.logits)
    assert segmenter_b16.inference_window == SlidingWindow(512, 320, "probabilities")  # the released COCO setting


def test_released_segmenter_checkpoint_names_fit_strictly(segmenter_b16, tmp_path):
    from densehybrid.models.checkpoint import check_state_dict

    # Every name and shape of the released state dict fits (meta tensors: no memory).
    expected = json.loads((COMPAT / "segmenter_vitb_th_keys.json").read_text())
    released = {k: torch.empty(shape, device="meta") for k, (shape, _) in expected.items()}
    missing, unexpected, mismatched, message = check_state_dict(segmenter_b16, released)
    assert (missing, unexpected, mismatched, message) == ([], [], [], "")
    # The file round trip through load_checkpoint(strict=True), on the small size of the same design.
    small = create_model("segmenter_vit_ti16", num_classes=20, image_size=64)
    state = deterministic_state_dict(small)
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "segmenter_coco20.pth")
    fresh = create_model("segmenter_vit_ti16", num_classes=20, image_size=64)
    load_checkpoint(fresh, tmp_path / "segmenter_coco20.pth", strict=True)
    torch.testing.assert_close(fresh.decoder_th.proj_patch, state["decoder_th.proj_patch"])


@pytest.fixture(scope="module")
def segmenter_ti() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("segmenter_vit_ti16", num_classes=3, image_size=64, window_size=64, window_stride=40).eval()


WINDOW = SlidingWindow(64, 40, "logits")


def test_eval_forward_is_the_whole_image_logits_on_a_window_sized_input(segmenter_ti):
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        whole = segmenter_ti.forward_whole(images)
        for a, b in zip(segmenter_ti(images), whole):  # eval mode: logits, not the window's probabilities
            torch.testing.assert_close(a, b)
    assert not torch.allclose(whole.logits.sum(1), torch.ones(2, 64, 64))


@pytest.mark.parametrize("merge", ["logits", "probabilities"])
def test_sliding_window_on_one_window_equals_whole_image(segmenter_ti, merge):
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        slid = sliding_window_outputs(segmenter_ti, images, SlidingWindow(64, 40, merge))
        whole = segmenter_ti.forward_whole(images)
    for a, b in zip(slid, whole):
        torch.testing.assert_close(a, b if merge == "logits" else b.softmax(1))


def test_sliding_window_resizes_up_and_averages_overlaps(segmenter_ti):
    images = torch.rand(1, 3, 40, 60)  # shorter side 40 < 64: resized to 64 x 96, windows at columns 0 and 32
    with torch.no_grad():
        slid = sliding_window_outputs(segmenter_ti, images, WINDOW, output_size=(20, 30))
        resized = F.interpolate(images, size=(64, 96), mode="bilinear", align_corners=False)
        left, right = segmenter_ti.forward_whole(resized[..., :64]), segmenter_ti.forward_whole(resized[..., 32:])
    for i, full in enumerate(slid):
        merged = torch.zeros(1, full.shape[1], 64, 96)
        merged[..., :64] += left[i]
        merged[..., 32:] += right[i]
        merged[..., 32:64] /= 2
        expected = F.interpolate(merged, size=(40, 60), mode="bilinear", align_corners=False)
        expected = F.interpolate(expected, size=(20, 30), mode="bilinear", align_corners=False)
        torch.testing.assert_close(full, expected)


def test_open_set_model_runs_the_models_released_window(segmenter_ti):
    from densehybrid.openset import OpenSetModel

    images = torch.rand(1, 3, 40, 60)
    with torch.no_grad():
        auto = OpenSetModel(segmenter_ti, window="auto")(images, return_outputs=True)
        slid = sliding_window_outputs(segmenter_ti, images, segmenter_ti.inference_window)
    assert segmenter_ti.inference_window == SlidingWindow(64, 40, "probabilities")
    torch.testing.assert_close(auto.outputs.logits, slid.logits)
    torch.testing.assert_close(auto.outputs.logits.sum(1), torch.ones(1, 40, 60))  # probabilities, as released


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"window_size": 0}, "window_size"),
        ({"window_size": 64, "window_stride": 100}, "window_stride"),
        ({"window_merge": "mean"}, "window_merge"),
        ({"window_merge": "max"}, "window_merge"),
    ],
)
def test_segmenter_rejects_bad_window_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model("segmenter_vit_ti16", num_classes=3, image_size=32, **kwargs)


def test_segmenter_ti_forward_backward():
    model = create_model("segmenter_vit_ti16", num_classes=5, image_size=64).train()
    out = model(torch.rand(2, 3, 40, 56))  # not a multiple of 16: padded, then cropped
    assert out.logits.shape == (2, 5, 40, 56) and out.ood_logits.shape == (2, 2, 40, 56)
    (out.logits.logsumexp(1).mean() + out.ood_logits.log_softmax(1)[:, 1].mean()).backward()
    for param in (model.encoder.patch_embed.proj.weight, model.decoder.cls_emb, model.decoder_th.cls_emb):
        assert param.grad is not None and param.grad.abs().sum() > 0
    cfg = model.data_config
    assert cfg["mean"] == pytest.approx([0.485, 0.456, 0.406]) and cfg["std"] == pytest.approx([0.229, 0.224, 0.225])


@pytest.mark.parametrize("name", ["segmenter_vit_s16", "segmenter_vit_b16"])
def test_segmenter_forward_tiny(name):
    model = create_model(name, num_classes=3, image_size=32, sliding_window=False).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 32, 48), output_size=(16, 24))
        features = model.forward_features(torch.rand(1, 3, 32, 48))
    assert out.logits.shape == (1, 3, 16, 24) and out.ood_logits.shape == (1, 2, 16, 24)
    assert features.shape == (1, model.feature_channels, 2, 3)
    assert torch.isfinite(out.logits).all()


def test_every_owned_model_is_registered():
    from densehybrid.models import list_models

    assert set(OWN_MODELS) <= set(list_models())


def test_ldn_checkpointing_matches_plain_training_step():
    torch.manual_seed(0)
    plain = ldn121(num_classes=4).train()
    ckpt = ldn121(num_classes=4, checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    images = torch.rand(2, 3, 64, 64)
    outputs = []
    for model in (plain, ckpt):
        out = model(images)
        (out.logits.square().mean() + out.ood_logits.square().mean()).backward()
        outputs.append(out)
    torch.testing.assert_close(outputs[0].logits, outputs[1].logits)
    grads = [dict((n, p.grad) for n, p in m.named_parameters()) for m in (plain, ckpt)]
    for name in ("backbone.features.conv0.weight", "spp.spp.spp.spp_fuse.conv.weight", "logits_ood.conv.weight"):
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)
    # Recomputation in the backward pass must not fold the batch into the BatchNorm statistics a second time.
    torch.testing.assert_close(plain.state_dict(), ckpt.state_dict())


def test_ldn_loads_torchvision_and_timm_densenet_weights(tmp_path):
    reference = torchvision.models.densenet121().state_dict()
    # torchvision's published file uses the old names (`norm.1` for `norm1`) and has no `num_batches_tracked`.
    old_names = {
        k.replace("norm1", "norm.1").replace("conv1", "conv.1").replace("norm2", "norm.2").replace("conv2", "conv.2"): v
        for k, v in reference.items()
        if not k.endswith("num_batches_tracked")
    }
    torch.save(old_names, tmp_path / "densenet121-tv.pth")
    model = ldn121(num_classes=3, pretrained_backbone=tmp_path / "densenet121-tv.pth")
    own = model.state_dict()
    for name in ("features.conv0.weight", "features.denseblock3.denselayer7.conv2.weight"):
        torch.testing.assert_close(own[f"backbone.{name}"], reference[name])

    from safetensors.torch import save_file

    timm_state = timm.create_model("densenet121", pretrained=False).state_dict()
    save_file(timm_state, str(tmp_path / "densenet121-timm.safetensors"))
    model = ldn121(num_classes=3, pretrained_backbone=tmp_path / "densenet121-timm.safetensors")
    torch.testing.assert_close(
        model.state_dict()["backbone.features.denseblock4.denselayer16.norm2.running_var"],
        timm_state["features.denseblock4.denselayer16.norm2.running_var"],
    )


def test_ldn_rejects_a_non_densenet_backbone_file(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(CheckpointError, match="DenseNet weights for every encoder parameter"):
        ldn121(num_classes=3, pretrained_backbone=tmp_path / "resnet18.pth")


def test_deeplab_loads_nvidia_closed_set_format(models, tmp_path):
    model = models["deeplabv3plus_wrn38"]
    reference = deterministic_state_dict(model)
    closed = {f"module.{k}": v for k, v in reference.items() if not k.startswith("logits_ood.")}
    path = tmp_path / "cityscapes_cv0_wideresnet38_nosdcaug.pth"
    torch.save({"state_dict": closed, "epoch": 175, "mean_iu": 0.8}, path)
    del closed
    fresh = deeplabv3plus_wrn38(num_classes=19, pretrained=path)
    report = fresh.pretrained_report
    assert report["loaded"] == 268 and report["unexpected"] == []
    assert report["missing"] == [k for k in model.state_dict() if k.startswith("logits_ood.")]
    # compare with the file's own values, not with the shared model (other tests may have changed its weights)
    torch.testing.assert_close(fresh.mod7.block1.convs.conv3.weight, reference["mod7.block1.convs.conv3.weight"])

    # A file that lacks trunk weights is not silently accepted.
    broken = {k: v for k, v in fresh.state_dict().items() if not k.startswith(("mod3.", "logits_ood."))}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \(\d+\): mod3\.block1"):
        load_closed_set_weights(fresh, tmp_path / "broken.pth")


def test_segmenter_loads_timm_vit_weights(tmp_path):
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=1000)
    torch.save({"model": vit.state_dict()}, tmp_path / "vit_tiny.pth")
    model = segmenter_vit_ti16(num_classes=4, pretrained_backbone=tmp_path / "vit_tiny.pth", image_size=64)
    torch.testing.assert_close(model.encoder.blocks[5].mlp.fc1.weight, vit.blocks[5].mlp.fc1.weight)
    assert model.encoder.pos_embed.shape == (1, 1 + 4 * 4, 192)  # resampled from the 14x14 grid
    torch.save(timm.create_model("vit_small_patch16_224").state_dict(), tmp_path / "vit_small.pth")
    with pytest.raises(CheckpointError, match="another ViT size"):
        segmenter_vit_ti16(num_classes=4, pretrained_backbone=tmp_path / "vit_small.pth", image_size=64)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"output_size": (10,)}, ValueError, "output_size"),
        ({"output_size": (10, 0)}, ValueError, "output_size"),
        ({"images": torch.rand(3, 32, 32)}, ValueError, r"\(N, 3, H, W\)"),
        ({"images": torch.zeros(1, 3, 32, 32, dtype=torch.uint8)}, TypeError, "float"),
    ],
)
def test_bad_inputs_raise_clear_errors(models, kwargs, error, match):
    images = kwargs.pop("images", torch.rand(1, 3, 32, 32))
    with pytest.raises(error, match=match):
        models["ldn121"](images, **kwargs)


@pytest.mark.parametrize("name", OWN_MODELS)
@pytest.mark.parametrize("num_classes", [0, 2.0, True])
def test_entry_points_reject_bad_num_classes(name, num_classes):
    with pytest.raises(ValueError, match="num_classes"):
        get_model_entry(name)(num_classes=num_classes)
