"""Recipe keys of the flow: the ``[flow]`` section of DenseHybrid fine-tuning (used when ``negatives.source`` is
``synthetic`` or ``mixed``) and of ``denseflow-pretrain``.

The defaults are the released joint fine-tuning's for traffic scenes (``dlv3_cityscapes_finetune_flow.py``); the COCO20
recipes set ``max_side = 104`` and ``lr_decay = 0.975``.
"""

from __future__ import annotations

from densehybrid.recipes.schema import Key

__all__ = ["FLOW_CONFIGS", "FLOW_FINETUNE_KEYS", "FLOW_MODEL_KEYS", "FLOW_PRETRAIN_KEYS", "NEGATIVE_SOURCES"]

#: ``negatives.source``: pasted real images, flow samples trained jointly, or each pasted negative synthetic with
#: probability ``negatives.synthetic_fraction`` (our reading of the TPAMI paper's b).
NEGATIVE_SOURCES = ("real", "synthetic", "mixed")
#: ``flow.config``: the released DenseFlow, or ``DenseFlow.small()`` for CPU runs and tests.
FLOW_CONFIGS = ("released", "small")

#: Which flow, and where its weights come from (both methods).
FLOW_MODEL_KEYS: dict[str, Key] = {
    "init": Key(
        "str",
        "",
        "flow weights to start from (--flow-init overrides): a released DenseFlow file, or the last.pt of a "
        "denseflow-pretrain or flow fine-tuning run; empty: random initialisation",
    ),
    "config": Key(
        "str",
        "released",
        "DenseFlow configuration: released (DenseFlow(), 35.7 M parameters) or small (DenseFlow.small(), for CPU "
        "runs and tests)",
        choices=FLOW_CONFIGS,
    ),
    "checkpointing": Key(
        "bool", True, "recompute the flow's coupling networks in the backward pass (saves memory; as released)"
    ),
}

#: The flow of joint fine-tuning: its optimiser, its patches and the flow step's weights.
FLOW_FINETUNE_KEYS: dict[str, Key] = {
    **FLOW_MODEL_KEYS,
    "lr": Key("float", 1e-5, "Adamax learning rate of a pre-trained flow", minimum=1e-12),
    "lr_random_init": Key(
        "float",
        1e-3,
        "Adamax learning rate when flow.init is empty (the released rate for a random flow)",
        minimum=1e-12,
    ),
    "lr_decay": Key("float", 0.99, "the flow's learning rate is multiplied by this after every epoch", minimum=0.0),
    "betas": Key("floats", [0.9, 0.999], "Adamax betas", minimum=0.0, length=2, below=1.0),
    "eps": Key("float", 1e-7, "Adamax epsilon", minimum=0.0),
    "min_side": Key("int", 16, "smallest side of a flow patch, a multiple of 8", minimum=8),
    "max_side": Key("int", 216, "largest side of a flow patch, a multiple of 8 (at most augment.crop)", minimum=8),
    "side_step": Key("int", 8, "step between flow patch sides, a multiple of 8", minimum=8),
    "jsd_weight": Key("float", 0.03, "weight of the flow step's Jensen-Shannon term", minimum=0.0),
    "mle_weight": Key("float", 1.0, "weight of the flow step's bits/dim term", minimum=0.0),
}

#: The flow of ``denseflow-pretrain`` (its optimiser is ``[optim]``'s Adamax).
FLOW_PRETRAIN_KEYS: dict[str, Key] = {
    **FLOW_MODEL_KEYS,
    "grid_samples": Key("int", 16, "samples in the grid written after every epoch (0: none)", minimum=0),
    "grid_size": Key("int", 64, "side of each grid sample, a multiple of 8", minimum=8),
}
