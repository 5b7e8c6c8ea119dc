from __future__ import annotations

import pytest
import torch
from torch import nn

from densehybrid.models import DenseHybrid, HybridOutput, create_model, list_models
from densehybrid.models.adapters import SplitSegmenter

ADAPTER_MODELS = ["ladder_resnet18", "ladder_mobilenetv3", "deeplabv3_mobilenet_v3_large", "deeplabv3_resnet50"]


@pytest.mark.parametrize("name", ADAPTER_MODELS)
def test_every_adapter_runs_forward_and_backward(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5)
    images = torch.rand(2, 3, 64, 96)
    out = model(images)
    assert isinstance(out, HybridOutput)
    assert out.logits.shape == (2, 5, 64, 96) and out.ood_logits.shape == (2, 2, 64, 96)
    (out.logits.logsumexp(1).mean() + out.ood_logits.log_softmax(1)[:, 1].mean()).backward()
    head_grad = model.logits_ood.conv.weight.grad
    assert head_grad is not None and head_grad.abs().sum() > 0
    backbone_grads = [p.grad for p in model.segmenter.parameters() if p.requires_grad]
    assert all(g is not None for g in backbone_grads)
    assert all(torch.isfinite(g).all() for g in backbone_grads)


def test_output_size_and_eval_determinism():
    model = create_model("ladder_mobilenetv3", num_classes=3).eval()
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a = model(images, output_size=(17, 33))
        b = model(images, output_size=(17, 33))
    assert a.logits.shape == (1, 3, 17, 33) and a.ood_logits.shape == (1, 2, 17, 33)
    assert torch.equal(a.logits, b.logits)


def test_normalisation_is_applied_and_kept_out_of_the_state_dict():
    model = create_model("ladder_mobilenetv3", num_classes=3)
    assert not any("normalize" in k for k in model.state_dict())
    assert model.data_config == {
        "mean": pytest.approx([0.485, 0.456, 0.406]),
        "std": pytest.approx([0.229, 0.224, 0.225]),
    }
    x = torch.full((1, 3, 2, 2), 0.485)
    assert model.normalize(x)[0, 0].abs().max() < 1e-6


def test_custom_segmenter_through_split_adapter():
    features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    seg = SplitSegmenter(features, nn.Conv2d(8, 4, 1), feature_channels=8)
    model = DenseHybrid(seg, num_classes=4, mean=(0, 0, 0), std=(1, 1, 1))
    out = model(torch.rand(2, 3, 8, 8))
    assert out.logits.shape == (2, 4, 8, 8)
    # head on the same features: 8 BN weights + 8 BN biases + 16 conv weights + 2 biases
    assert sum(p.numel() for p in model.logits_ood.parameters()) == 8 + 8 + 16 + 2


def test_freeze_segmenter_trains_only_the_head():
    model = create_model("ladder_mobilenetv3", num_classes=3, decoder_channels=16)
    model.freeze_segmenter()
    model.train()
    assert not model.segmenter.training and model.logits_ood.training
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("logits_ood.") for n in trainable)


def test_bad_inputs_give_clear_errors():
    model = create_model("ladder_mobilenetv3", num_classes=3, decoder_channels=16)
    with pytest.raises(ValueError, match=r"`images`.*\(N, 3, H, W\)"):
        model(torch.rand(3, 32, 32))
    with pytest.raises(TypeError, match="float"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match="forward_features"):
        DenseHybrid(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="Unknown model 'nope'.*ladder_resnet18"):
        create_model("nope", num_classes=3)
    with pytest.raises(ValueError, match="num_classes"):
        create_model("ladder_resnet18", num_classes=0)
    wrong = DenseHybrid(SplitSegmenter(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 5, 1), 4), num_classes=3)
    with pytest.raises(ValueError, match="3 logit channels"):
        wrong(torch.rand(1, 3, 4, 4))


def test_registry_lists_every_family():
    names = list_models()
    for expected in ("ladder_resnet18", "deeplabv3_resnet50", "ldn121", "deeplabv3plus_wrn38", "segmenter_vit_b16"):
        assert expected in names
