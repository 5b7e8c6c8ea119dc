"""DenseFlow: the released state-dict layout, the reference outputs, checkpoint loading, and the flow's invariants.

References: ``tests/data/compat/denseflow_{keys.json,ref.npz}`` (copied from ``shared/compat``), computed with the
released flow definition for deterministic weights derived from the parameter names.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from densehybrid.errors import CheckpointError
from densehybrid.flows import DenseFlow, load_flow_state

COMPAT = Path(__file__).resolve().parents[1] / "data" / "compat"


def small_flow(seed: int = 0, **kwargs) -> DenseFlow:
    """A fast configuration: the released topology (3 blocks, stride 8) with few layers and thin couplings."""
    torch.manual_seed(seed)
    config = dict(
        block_config=[2, 2, 1],
        layers_config=[1, 1, 2],
        layer_mid_chnls=[8, 8, 8],
        growth_rate=2,
        coupling_depth=2,
        coupling_growth=8,
    )
    config.update(kwargs)
    return DenseFlow(**config)


def fixture_state_dict(flow: DenseFlow, seed: int = 7) -> dict[str, torch.Tensor]:
    """The fixture weights, as ``shared/compat/README.md`` (section DenseFlow) defines them."""
    state = {}
    for name, tensor in flow.state_dict().items():
        shape = tuple(tensor.shape)
        h = int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:8], 16)
        g = torch.Generator().manual_seed(h)
        if name.endswith("initialized"):
            value = torch.ones(shape)
        elif len(shape) == 2 and shape[0] == shape[1]:  # invertible 1x1 convolutions: a random rotation
            q, r = torch.linalg.qr(torch.randn(shape, generator=g, dtype=torch.float64))
            value = (q * torch.sign(torch.diagonal(r))).float()
        elif len(shape) >= 2:
            value = 0.1 * torch.randn(shape, generator=g) * math.sqrt(2 / math.prod(shape[1:]))
        elif name.endswith("weight"):
            value = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            value = 0.1 * torch.randn(shape, generator=g)
        state[name] = value.to(tensor.dtype)
    return state


def relative_error(actual: torch.Tensor, reference: np.ndarray) -> float:
    return float((actual - torch.from_numpy(reference)).abs().max() / np.abs(reference).max())


@pytest.fixture(scope="module")
def released() -> DenseFlow:
    return DenseFlow()


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    return dict(np.load(COMPAT / "denseflow_ref.npz"))


def test_state_dict_equals_released_layout(released):
    expected = json.loads((COMPAT / "denseflow_keys.json").read_text())
    actual = {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in released.state_dict().items()}
    assert list(actual) == list(expected)  # same names in the same order
    assert actual == expected  # same shapes and dtypes
    assert released.latent_channels == 108 and released.stride == 8


def test_log_prob_latent_and_decode_match_released_flow(released, reference):
    released.load_state_dict(fixture_state_dict(released), strict=True)
    released.eval()
    x = torch.from_numpy(reference["x"])
    with torch.no_grad():
        z, log_prob = released.forward_latent(x, noise="mean")
        log_prob_only = released.log_prob(x, noise="mean")
        continuous = released.decode(
            torch.from_numpy(reference["eps_base"]),
            [torch.from_numpy(reference["eps_factored_0"]), torch.from_numpy(reference["eps_factored_1"])],
        )
    assert log_prob.shape == (2,)
    assert relative_error(log_prob, reference["log_prob"]) < 1e-4
    assert relative_error(log_prob_only, reference["log_prob"]) < 1e-4
    assert relative_error(z, reference["z"]) < 1e-4
    assert relative_error(continuous, reference["continuous"]) < 1e-4
    bpd = -log_prob / (math.log(2) * x[0].numel())
    assert relative_error(bpd, reference["bpd"]) < 1e-4
    # Quantised as the released inverse does (floor, clamp); with random weights most pixels saturate.
    quantised = released.transforms[0].inverse(continuous)
    assert (quantised.numpy() == reference["sample"]).mean() > 0.999


@pytest.mark.parametrize("layout", ["bare", "flow_prefix", "nested", "nested_prefix", "module_prefix"])
def test_released_checkpoint_layouts_load_strictly(tmp_path, layout):
    flow = small_flow(seed=1)
    state = {k: v + 0.5 if v.is_floating_point() else v for k, v in flow.state_dict().items()}
    obj = {
        "bare": state,
        "flow_prefix": {f"flow.{k}": v for k, v in state.items()},
        "nested": {"state_dict": state, "epoch": 3},
        "nested_prefix": {"flow": {f"flow.{k}": v for k, v in state.items()}, "epoch": 3},
        "module_prefix": {"model": {f"module.flow.{k}": v for k, v in state.items()}},
    }[layout]
    torch.save(obj, tmp_path / "flow.pt")
    target = small_flow(seed=2)
    metadata = load_flow_state(target, tmp_path / "flow.pt")
    for k, v in target.state_dict().items():
        assert torch.equal(v, state[k]), k
    if layout.startswith("nested"):
        assert metadata["epoch"] == 3
    # an already loaded object works too
    load_flow_state(small_flow(seed=3), obj)


def test_wrong_configuration_lists_mismatched_keys_and_leaves_flow_untouched(tmp_path):
    torch.save({"flow": small_flow(layer_mid_chnls=[16, 8, 8]).state_dict()}, tmp_path / "other.pt")
    flow = small_flow()
    before = {k: v.clone() for k, v in flow.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_flow_state(flow, tmp_path / "other.pt")
    message = str(info.value)
    assert "other.pt" in message and "shape-mismatched" in message
    assert "transforms.3.blocks.0.transforms.0.transforms.2.coupling_net.0.dn.transform.0.weight" in message
    assert "checkpoint (16, 6, 1, 1) vs flow (8, 6, 1, 1)" in message
    assert "22 shape-mismatched" in message and message.count(": checkpoint (") == 22  # every key listed
    assert "DenseFlow()" in message
    assert all(torch.equal(v, before[k]) for k, v in flow.state_dict().items())


def test_missing_keys_are_refused_when_strict(tmp_path):
    state = small_flow().state_dict()
    del state["base_dist.loc"]
    with pytest.raises(CheckpointError, match=r"(?s)1 missing.*missing keys \(1\):\n    base_dist\.loc"):
        load_flow_state(small_flow(), state)


def test_decode_inverts_the_forward_pass():
    """With one step per block (no appended noise) the flow is a bijection: encoding a decoded image gives back the
    latents, the factored halves included."""
    from densehybrid.flows.denseflow import Transition, squeeze2x2

    flow = small_flow(block_config=[1, 1, 1]).eval()
    with torch.no_grad():  # move the couplings and the base away from the identity
        for p in flow.parameters():
            p.add_(0.02 * torch.randn_like(p))
    g = torch.Generator().manual_seed(0)
    base_shape, factored_shapes = flow.latent_shapes(16, 24)
    assert base_shape == (flow.latent_channels, 2, 3)
    eps_base = torch.randn(2, *base_shape, generator=g)
    eps_factored = [torch.randn(2, *s, generator=g) for s in factored_shapes]
    with torch.no_grad():
        z = flow.decode(eps_base, eps_factored)  # the [0, 1] data space
        factored = []
        for t in flow.transforms[1:]:
            if isinstance(t, Transition):
                factored.append(squeeze2x2(z).chunk(2, dim=1)[1])
            z, _ = t(z)
    assert torch.allclose(z, flow.base_dist.reparameterise(eps_base), atol=1e-4)
    for got, want in zip(factored[::-1], eps_factored):
        assert torch.allclose(got, want, atol=1e-4)


def test_log_prob_is_a_density_over_8bit_images_in_expectation():
    """Sanity of the bound's scale: a fresh flow (identity couplings) gives about 8 bits/dim + Gaussian terms."""
    flow = small_flow()
    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    bpd = flow.bits_per_dim(x, generator=torch.Generator().manual_seed(0))
    assert 7.0 < float(bpd.detach()) < 12.0
    # noise="mean" is deterministic, "sample" is not
    assert torch.equal(flow.log_prob(x, noise="mean"), flow.log_prob(x, noise="mean"))
    a = flow.log_prob(x, generator=torch.Generator().manual_seed(1))
    b = flow.log_prob(x, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(a, b)


def test_sample_ranges_and_gradients():
    flow = small_flow()
    g = torch.Generator().manual_seed(0)
    hard = flow.sample(3, (16, 8), generator=g)
    assert hard.shape == (3, 3, 16, 8) and not hard.requires_grad
    assert float(hard.min()) >= 0 and float(hard.max()) <= 255 and torch.equal(hard, hard.floor())
    soft = flow.sample(2, (8, 24), generator=g, differentiable=True)
    assert soft.shape == (2, 3, 8, 24) and soft.requires_grad
    assert float(soft.detach().min()) >= 0 and float(soft.detach().max()) <= 255
    soft.mean().backward()
    assert flow.base_dist.loc.grad is not None and flow.base_dist.loc.grad.abs().sum() > 0
    # the same generator state gives the same samples
    assert torch.equal(
        flow.sample(2, (8, 8), torch.Generator().manual_seed(5)),
        flow.sample(2, (8, 8), torch.Generator().manual_seed(5)),
    )


def test_actnorm_initialises_from_the_first_training_batch():
    flow = small_flow().train()
    actnorm = flow.transforms[3].blocks[0].transforms[0].transforms[0]
    assert float(actnorm.initialized) == 0
    flow.log_prob(torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8))
    assert float(actnorm.initialized) == 1 and actnorm.log_scale.abs().sum() > 0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda f: f.log_prob(torch.zeros(1, 3, 12, 16, dtype=torch.uint8)), r"multiples of 8.*12x16"),
        (lambda f: f.log_prob(torch.zeros(1, 3, 16, 16)), r"integer tensor.*float32"),
        (lambda f: f.log_prob(torch.zeros(1, 1, 16, 16, dtype=torch.uint8)), r"shape \(N, 3, H, W\)"),
        (lambda f: f.log_prob(torch.full((1, 3, 8, 8), 256)), r"values in \[0, 255\]"),
        (lambda f: f.log_prob(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), noise="zero"), r"`noise`"),
        (lambda f: f.sample(1, (20, 16)), r"multiples of 8.*20x16"),
        (lambda f: f.decode(torch.zeros(1, 5, 2, 2), []), r"eps_base"),
        (lambda f: f.decode(torch.zeros(1, f.latent_channels, 2, 2), []), r"eps_factored"),
    ],
)
def test_bad_inputs_get_one_clear_message(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call(small_flow())


def test_small_configuration_and_gradient_checkpointing_give_the_same_function():
    flow = DenseFlow.small()
    assert flow.stride == 8 and sum(p.numel() for p in flow.parameters()) < 300_000
    torch.manual_seed(0)
    plain = DenseFlow.small(layers_config=[1, 1, 1])
    torch.manual_seed(0)
    saving = DenseFlow.small(layers_config=[1, 1, 1], checkpointing=True)
    saving.load_state_dict(plain.state_dict())
    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    grads = []
    for f in (plain, saving):
        f.train()
        with torch.no_grad():  # move the zero-initialised couplings so that their gradients are not trivial
            for p in f.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        f.bits_per_dim(x, generator=torch.Generator().manual_seed(0)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in f.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_log_prob_of_an_empty_batch_is_empty_not_an_index_error():
    flow = small_flow()
    empty = torch.zeros(0, 3, 16, 16, dtype=torch.uint8)
    assert flow.log_prob(empty).shape == (0,)
    z, log_prob = flow.forward_latent(empty, noise="mean")
    assert z.shape == (0, *flow.latent_shapes(16, 16)[0]) and log_prob.shape == (0,)
