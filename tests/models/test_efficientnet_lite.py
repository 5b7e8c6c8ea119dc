from __future__ import annotations

import pytest
import timm
import torch
from PIL import Image
from skimage import data as skdata

from densehybrid.errors import CheckpointError
from densehybrid.models import create_model
from densehybrid.models.efficientnet_lite import (
    NUM_FLOAT_TENSORS,
    efficientnet_lite0_classifier,
    efficientnet_lite0_state_dict,
    efficientnet_lite0_weights_path,
)


def test_packaged_weights_map_onto_every_timm_tensor_in_order_and_shape():
    source = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    source_floats = [v for v in source.values() if v.is_floating_point()]
    mapped = efficientnet_lite0_state_dict()
    reference = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    float_names = [k for k, v in reference.items() if v.is_floating_point()]
    assert len(source_floats) == len(mapped) == len(float_names) == NUM_FLOAT_TENSORS == 247
    assert list(mapped) == float_names
    for tensor, (name, value) in zip(source_floats, mapped.items()):
        assert value.shape == reference[name].shape
        assert torch.equal(value, tensor)
    # the first and last pairs by name: the stem convolution and the classifier
    assert torch.equal(mapped["conv_stem.weight"], source["_conv_stem.weight"])
    assert torch.equal(mapped["classifier.bias"], source["_fc.bias"])


def test_loaded_classifier_labels_photographs_as_imagenet_does():
    model = efficientnet_lite0_classifier().eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    expected = {"chelsea": 281, "coffee": 967, "camera": 872}  # tabby cat, espresso, tripod
    with torch.inference_mode():
        for name, label in expected.items():
            image = Image.fromarray(getattr(skdata, name)()).convert("RGB")
            assert int(model(transform(image)[None]).argmax()) == label, name


def test_random_classifier_does_not_label_them():
    torch.manual_seed(0)
    model = efficientnet_lite0_classifier(pretrained=False).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    image = Image.fromarray(skdata.chelsea()).convert("RGB")
    with torch.inference_mode():
        assert int(model(transform(image)[None]).argmax()) != 281


def test_ladder_model_starts_from_the_packaged_backbone_and_runs():
    torch.manual_seed(0)
    model = create_model("ladder_efficientnet_lite0", num_classes=4)
    mapped = efficientnet_lite0_state_dict()
    backbone = model.segmenter.backbone.state_dict()
    assert torch.equal(backbone["conv_stem.weight"], mapped["conv_stem.weight"])
    assert torch.equal(backbone["blocks.6.0.bn3.running_var"], mapped["blocks.6.0.bn3.running_var"])
    assert model.segmenter.backbone.feature_info.reduction() == [4, 8, 16, 32]
    out = model(torch.rand(2, 3, 64, 96))
    assert out.logits.shape == (2, 4, 64, 96) and out.ood_logits.shape == (2, 2, 64, 96)
    random = create_model("ladder_efficientnet_lite0", num_classes=4, pretrained=False)
    assert not torch.equal(random.segmenter.backbone.state_dict()["conv_stem.weight"], mapped["conv_stem.weight"])


def test_a_file_of_other_weights_is_refused_with_its_name(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"w": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="other.pth"):
        efficientnet_lite0_state_dict(path)
