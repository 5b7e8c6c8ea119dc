"""Adapters for segmentation_models_pytorch, transformers and torchvision: the split reproduces the third-party
model's own logits, gradients reach both heads and the backbone, local pretrained files load, and the registered
names (``smp:ARCH:ENCODER``, ``hf:segformer``, ``hf:upernet``, ``tv:BUILDER``) build, rebuild and export."""

from __future__ import annotations

import copy
import sys

import pytest
import segmentation_models_pytorch as smp
import torch
import transformers

from densehybrid.cli import main
from densehybrid.errors import CheckpointError, DenseHybridError
from densehybrid.export import check_parity, export_model
from densehybrid.models import DenseHybrid, create_model
from densehybrid.models.checkpoint import model_from_checkpoint
from densehybrid.models.registry import is_family_name
from densehybrid.models.third_party import from_smp, from_torchvision, from_transformers
from densehybrid.recipes import load_recipe
from tests.third_party_models import HF_DOD, SEGFORMER_TINY, SMALL_ENCODER, SMP_DOD, TV_MODELS, UPERNET_TINY

pytestmark = pytest.mark.usefixtures("one_thread")

DOD = {**SMP_DOD, **HF_DOD}
PLAIN = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # the wrapper passes images through unchanged


def _images(*size, seed=0):
    return torch.rand(*size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted({**DOD, **TV_MODELS}))
def test_forward_at_two_sizes_and_gradients_reach_both_heads_and_the_backbone(name):
    torch.manual_seed(0)
    kwargs = {**DOD, **TV_MODELS}[name]
    model = create_model(name, num_classes=3, **kwargs)
    assert model.model_name == name and model.num_classes == 3
    model.eval()
    with torch.no_grad():
        for size in ((64, 96), (50, 70)):  # a multiple of 32 and one that is not
            out = model(_images(2, 3, *size))
            assert out.logits.shape == (2, 3, *size) and out.ood_logits.shape == (2, 2, *size)
            assert torch.isfinite(out.logits).all() and torch.isfinite(out.ood_logits).all()
    model.train()
    out = model(_images(2, 3, 64, 64, seed=1))
    (out.logits.square().mean() + out.ood_logits.square().mean()).backward()
    backbone = [p for n, p in model.named_parameters() if ".backbone." in n]
    assert backbone and any(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.logits_ood.parameters())
    classifier = model.segmenter.classifier
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in classifier.parameters())


@pytest.mark.parametrize(
    "arch", ["Unet", "FPN", "DeepLabV3", "DeepLabV3Plus", "PSPNet", "Linknet", "UnetPlusPlus", "MAnet", "PAN"]
)
def test_smp_split_reproduces_the_smp_logits(arch):
    torch.manual_seed(0)
    kwargs = {"decoder_channels": 16} if arch.startswith("DeepLabV3") else {}
    encoder = SMALL_ENCODER if arch not in ("UnetPlusPlus", "PAN") else "resnet18"  # PAN needs a dilatable encoder
    net = smp.create_model(arch, encoder_name=encoder, encoder_weights=None, classes=4, **kwargs).eval()
    model = DenseHybrid(from_smp(net), num_classes=4, **PLAIN).eval()
    images = _images(1, 3, *((128, 128) if arch == "PAN" else (64, 96)))  # PAN's attention pyramid pools to 1/256
    with torch.no_grad():
        torch.testing.assert_close(model(images).logits, net(images), rtol=0, atol=1e-6)
        features = model.forward_features(images)
    assert features.shape[1] == net.segmentation_head[0].in_channels == model.segmenter.feature_channels


def test_smp_segformer_upernet_and_dpt_architectures_split():
    for arch, encoder, kwargs in (
        ("Segformer", SMALL_ENCODER, {"decoder_segmentation_channels": 16}),
        ("UPerNet", SMALL_ENCODER, {"decoder_channels": 16}),
        ("DPT", "tu-test_vit", {"decoder_intermediate_channels": (8, 8, 8, 8), "decoder_fusion_channels": 8}),
    ):
        torch.manual_seed(0)
        net = smp.create_model(arch, encoder_name=encoder, encoder_weights=None, classes=3, **kwargs).eval()
        model = DenseHybrid(from_smp(net), num_classes=3, **PLAIN).eval()
        size = (64, 64) if arch == "DPT" else (64, 96)
        images = _images(1, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(model(images).logits, net(images), rtol=0, atol=1e-6, msg=arch)


def test_transformers_split_reproduces_segformer_and_upernet_logits():
    torch.manual_seed(0)
    images = _images(1, 3, 64, 96)
    segformer = transformers.SegformerForSemanticSegmentation(
        transformers.SegformerConfig(num_labels=3, **SEGFORMER_TINY)
    ).eval()
    with torch.no_grad():
        expected = copy.deepcopy(segformer)(images).logits  # (1, 3, 16, 24): SegFormer's logits are at stride 4
        model = DenseHybrid(from_transformers(segformer), num_classes=3, **PLAIN).eval()
        torch.testing.assert_close(model.forward_head(model.forward_features(images)), expected, rtol=0, atol=1e-6)
    upernet = transformers.UperNetForSemanticSegmentation(
        transformers.UperNetConfig(num_labels=3, use_auxiliary_head=False, **UPERNET_TINY)
    ).eval()
    with torch.no_grad():
        expected = copy.deepcopy(upernet)(images).logits  # upsampled to the input by the model itself
        model = DenseHybrid(from_transformers(upernet), num_classes=3, **PLAIN).eval()
        torch.testing.assert_close(model(images).logits, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("builder", ["lraspp_mobilenet_v3_large", "fcn_resnet50"])
def test_torchvision_split_reproduces_the_torchvision_logits(builder):
    from torchvision.models import segmentation

    torch.manual_seed(0)
    net = getattr(segmentation, builder)(weights=None, weights_backbone=None, num_classes=3).eval()
    model = DenseHybrid(from_torchvision(net), num_classes=3, **PLAIN).eval()
    images = _images(1, 3, 72, 100)
    with torch.no_grad():
        torch.testing.assert_close(model(images).logits, net(images)["out"], rtol=0, atol=1e-5)
    expected_channels = 40 + 128 if builder.startswith("lraspp") else 512
    assert model.segmenter.feature_channels == expected_channels


def test_smp_loads_a_local_state_dict_and_a_save_pretrained_folder(tmp_path):
    torch.manual_seed(0)
    net = smp.FPN(SMALL_ENCODER, encoder_weights=None, classes=3, decoder_segmentation_channels=32)
    torch.save(net.state_dict(), tmp_path / "fpn.pt")
    net.save_pretrained(str(tmp_path / "folder"))
    name = f"smp:FPN:{SMALL_ENCODER}"
    for source in (tmp_path / "fpn.pt", tmp_path / "folder"):
        model = create_model(name, num_classes=3, pretrained=str(source), decoder_segmentation_channels=32).eval()
        images = _images(1, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(
                model(images).logits, net.eval()(model.normalize(images)), rtol=0, atol=1e-6, msg=str(source)
            )
    # another number of classes: everything but the classifier loads, and a warning says so
    with pytest.warns(UserWarning, match="classifier for another number of classes"):
        model = create_model(name, num_classes=5, pretrained=str(tmp_path / "fpn.pt"), decoder_segmentation_channels=32)
    torch.testing.assert_close(model.segmenter.backbone.state_dict(), net.encoder.state_dict())
    # another architecture does not load
    with pytest.raises(CheckpointError, match="missing"):
        create_model(f"smp:Unet:{SMALL_ENCODER}", num_classes=3, pretrained=str(tmp_path / "fpn.pt"))


@pytest.mark.parametrize("member", ["segformer", "upernet"])
def test_transformers_loads_a_save_pretrained_folder_and_checkpoints_rebuild_without_it(member, tmp_path):
    torch.manual_seed(0)
    config_cls = transformers.SegformerConfig if member == "segformer" else transformers.UperNetConfig
    model_cls = (
        transformers.SegformerForSemanticSegmentation
        if member == "segformer"
        else transformers.UperNetForSemanticSegmentation
    )
    tiny = SEGFORMER_TINY if member == "segformer" else UPERNET_TINY
    net = model_cls(config_cls(num_labels=4, **tiny)).eval()  # UperNet's auxiliary head is saved and ignored
    net.save_pretrained(str(tmp_path / "hf"))
    model = create_model(f"hf:{member}", num_classes=4, pretrained=str(tmp_path / "hf"), **PLAIN).eval()
    images = _images(1, 3, 64, 96)
    with torch.no_grad():
        expected = copy.deepcopy(net)(images).logits
        got = model.forward_head(model.forward_features(images)) if member == "segformer" else model(images).logits
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert "config" in model.model_kwargs and "pretrained" in model.model_kwargs
    # a training checkpoint records the folder's configuration: it rebuilds after the folder is gone
    torch.save(
        {"model": model.state_dict(), "model_name": f"hf:{member}", "model_kwargs": model.model_kwargs},
        tmp_path / "ckpt.pt",
    )
    for path in (tmp_path / "hf").iterdir():
        path.unlink()
    (tmp_path / "hf").rmdir()
    rebuilt, metadata = model_from_checkpoint(torch.load(tmp_path / "ckpt.pt", weights_only=True), tmp_path / "ckpt.pt")
    assert metadata["model_name"] == f"hf:{member}" and metadata["num_classes"] == 4
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images).logits, model(images).logits)


def test_missing_folder_and_classifier_of_another_size(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        create_model("hf:segformer", num_classes=3, pretrained=str(tmp_path))
    net = transformers.SegformerForSemanticSegmentation(transformers.SegformerConfig(num_labels=7, **SEGFORMER_TINY))
    net.save_pretrained(str(tmp_path / "hf"))
    with pytest.warns(UserWarning, match="starts fresh"):
        model = create_model("hf:segformer", num_classes=3, pretrained=str(tmp_path / "hf"))
    torch.testing.assert_close(model.segmenter.backbone.state_dict(), net.segformer.state_dict())


@pytest.mark.parametrize(
    ("module", "name", "extra"),
    [("segmentation_models_pytorch", "smp:Unet:resnet34", "smp"), ("transformers", "hf:segformer", "hf")],
)
def test_a_missing_extra_gets_one_message_with_the_install_command(monkeypatch, module, name, extra):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(DenseHybridError, match=rf"pip install 'densehybrid\[{extra}\]'") as info:
        create_model(name, num_classes=3)
    assert name in str(info.value)


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("smp:Unet", "smp:ARCH:ENCODER"),
        ("smp:Nope:resnet34", "Unknown smp architecture 'Nope'.*DeepLabV3Plus"),
        ("smp:Unet:nope50", "Unknown smp encoder 'nope50'"),
        ("hf:mask2former", "hf:segformer, hf:upernet"),
        ("tv:fcn_nope", "tv:lraspp_mobilenet_v3_large"),
        ("nope:x", "families: smp:..., hf:..., tv:..."),
    ],
)
def test_bad_names_are_clear_errors(name, match):
    with pytest.raises(ValueError, match=match):
        create_model(name, num_classes=3)


def test_arguments_the_library_rejects_are_one_clear_error():
    with pytest.raises(ValueError, match=r"Cannot build 'smp:FPN:resnet18' .*smp says"):
        create_model("smp:FPN:resnet18", num_classes=3, decoder_segmentation_channels=8)  # GroupNorm needs 32 | C
    with pytest.raises(ValueError, match=r"Cannot configure 'hf:upernet' .*transformers says"):
        create_model("hf:upernet", num_classes=3, config={"backbone_config": {"model_type": "no-such-backbone"}})


def test_adapter_arguments_are_not_overridable():
    with pytest.raises(ValueError, match="`encoder_weights`"):
        create_model("smp:Unet:resnet18", num_classes=3, encoder_weights="imagenet")  # nothing may download
    with pytest.raises(ValueError, match="`num_labels`"):
        create_model("hf:segformer", num_classes=3, config={"num_labels": 5})


def test_recipes_accept_family_names_and_still_refuse_unknown_names():
    assert is_family_name("smp:Unet:resnet34") and is_family_name("hf:segformer") and not is_family_name("smp:")
    recipe = load_recipe("generic", ["model.name=smp:DeepLabV3Plus:resnet34"])
    assert recipe["model"]["name"] == "smp:DeepLabV3Plus:resnet34"
    with pytest.raises(ValueError, match="model.name"):
        load_recipe("generic", ["model.name=unet"])


def test_models_command_lists_the_families(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "ladder_resnet18" in out and "smp:ARCH:ENCODER" in out and "hf:segformer | hf:upernet" in out
    assert "tv:BUILDER" in out and "densehybrid[smp]" in out and "densehybrid[hf]" in out


# ONNX: the legacy exporter cannot export adaptive average pooling to a fixed grid (UperNet's pyramid pooling)
# when the input size is dynamic; TorchScript can.
ONNX_UNSUPPORTED = {"hf:upernet"}


@pytest.mark.parametrize("name", sorted({**DOD, "tv:lraspp_mobilenet_v3_large": {}}))
def test_export_parity(name, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, **{**DOD, **TV_MODELS}[name]).eval()
    sizes = ((1, 50, 70), (2, 64, 96))  # one size the encoder's stride does not divide: padding is in the graph
    for fmt in ("torchscript", "onnx"):
        path = tmp_path / f"m.{fmt}"
        if fmt == "onnx" and name in ONNX_UNSUPPORTED:
            with pytest.raises(DenseHybridError, match="adaptive_avg_pool2d"):
                export_model(model, path, fmt, threshold=0.0, example_size=(1, 64, 96))
            continue
        if fmt == "onnx" and name.endswith(":resnet18"):
            continue  # the same graph as with the small encoder, which is checked; saves CI time
        export_model(model, path, fmt, threshold=0.0, example_size=(1, 64, 96))
        report = check_parity(model, path, fmt, threshold=0.0, sizes=sizes)
        assert report.passed, report.lines()


# the ONNX column of docs/models.md for the other smp architectures (TorchScript exports them all)
SMP_OTHERS = {
    "DeepLabV3": (SMALL_ENCODER, {"decoder_channels": 16}, None),
    "Segformer": (SMALL_ENCODER, {"decoder_segmentation_channels": 16}, None),
    "UnetPlusPlus": (SMALL_ENCODER, {"decoder_channels": [16, 16, 16, 16, 16]}, None),
    "MAnet": (SMALL_ENCODER, {"decoder_channels": [16, 16, 16, 16, 16]}, None),
    "Linknet": (SMALL_ENCODER, {}, None),
    "PAN": ("resnet18", {"decoder_channels": 16}, None),
    "PSPNet": (SMALL_ENCODER, {"psp_out_channels": 16}, "adaptive_avg_pool2d"),
    "UPerNet": (SMALL_ENCODER, {"decoder_channels": 16}, "adaptive_avg_pool2d"),
    "DPT": ("tu-test_vit", {"decoder_intermediate_channels": (8, 8, 8, 8), "decoder_fusion_channels": 8}, "bicubic"),
}


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(SMP_OTHERS))
def test_other_smp_architectures_export(arch, tmp_path):
    encoder, kwargs, onnx_failure = SMP_OTHERS[arch]
    torch.manual_seed(0)
    model = create_model(f"smp:{arch}:{encoder}", num_classes=3, **kwargs).eval()
    large = arch in ("PAN", "DPT")  # PAN pools its top map by 1/256 overall: inputs of at least 128 px
    example, sizes = ((1, 128, 160), ((1, 130, 150), (2, 160, 192))) if large else ((1, 64, 96), ((1, 50, 70),))
    for fmt in ("torchscript", "onnx"):
        path = tmp_path / f"m.{fmt}"
        if fmt == "onnx" and onnx_failure:
            with pytest.raises(DenseHybridError, match=onnx_failure):
                export_model(model, path, fmt, threshold=0.0, example_size=example)
            continue
        export_model(model, path, fmt, threshold=0.0, example_size=example)
        report = check_parity(model, path, fmt, threshold=0.0, sizes=sizes)
        assert report.passed, report.lines()


def test_torchvision_loads_a_local_state_dict_with_its_auxiliary_classifier(tmp_path):
    from torchvision.models import segmentation

    torch.manual_seed(0)
    net = segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=3, aux_loss=True).eval()
    torch.save(net.state_dict(), tmp_path / "fcn.pt")  # as torchvision's released files: aux_classifier.* included
    model = create_model("tv:fcn_resnet50", num_classes=3, pretrained=str(tmp_path / "fcn.pt")).eval()
    images = _images(1, 3, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(model(images).logits, net(model.normalize(images))["out"], rtol=0, atol=1e-5)
    with pytest.warns(UserWarning, match="starts fresh"):
        create_model("tv:fcn_resnet50", num_classes=5, pretrained=str(tmp_path / "fcn.pt"))
