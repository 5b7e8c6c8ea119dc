"""Tiny configurations of the third-party families (CPU tests: random weights, nothing downloaded)."""

from __future__ import annotations

SMALL_ENCODER = "tu-mobilenetv3_small_050"  # timm's MobileNetV3-Small 0.5 through smp's timm-universal encoder
RESNET = "resnet18"  # smp's own ResNet encoder

SEGFORMER_TINY = {
    "num_encoder_blocks": 2,
    "depths": [1, 1],
    "sr_ratios": [2, 1],
    "hidden_sizes": [8, 16],
    "num_attention_heads": [1, 1],
    "decoder_hidden_size": 16,
    "patch_sizes": [7, 3],
    "strides": [4, 2],
    "mlp_ratios": [2, 2],
}
UPERNET_TINY = {
    "backbone_config": {
        "model_type": "resnet",
        "embedding_size": 8,
        "hidden_sizes": [8, 16, 16, 16],
        "depths": [1, 1, 1, 1],
        "out_features": ["stage1", "stage2", "stage3", "stage4"],
    },
    "hidden_size": 16,
}

#: name -> kwargs of the definition-of-done models: smp Unet/FPN/DeepLabV3+ on two encoders, SegFormer, UperNet
SMP_DOD = {
    f"smp:{arch}:{encoder}": kwargs
    for encoder in (SMALL_ENCODER, RESNET)
    for arch, kwargs in (
        ("Unet", {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}),
        ("FPN", {"decoder_pyramid_channels": 16, "decoder_segmentation_channels": 32}),
        ("DeepLabV3Plus", {"decoder_channels": 16}),
    )
}
HF_DOD = {"hf:segformer": {"config": SEGFORMER_TINY}, "hf:upernet": {"config": UPERNET_TINY}}
TV_MODELS = {"tv:lraspp_mobilenet_v3_large": {}, "tv:fcn_resnet50": {}}
