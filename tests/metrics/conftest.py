"""Seeded random (scores, target) cases shared by the metric tests.

Each kind stresses one property of the ranking: continuous scores, heavy ties, a single score value, a single
anomaly pixel, scores near the float32 limits (subnormal, smallest normals, +-3.4e38), scores spanning sixty orders of magnitude,
float16 scores and signed zeros. Every case has both classes and ~10% ignored pixels (id 255).
"""

from __future__ import annotations

import pytest
import torch

KINDS = (
    "continuous",
    "ties",
    "all_equal",
    "single_anomaly",
    "float32_limits",
    "magnitudes",
    "float16",
    "signed_zeros",
)


def make_case(kind: str, seed: int, shape: tuple[int, int, int] = (2, 16, 24)) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(scores, target)`` of ``shape``: target 0/1 with 255 on ~10% of the pixels."""
    g = torch.Generator().manual_seed(seed)
    n = shape[0] * shape[1] * shape[2]
    prevalence = 0.05 + 0.4 * torch.rand((), generator=g).item()
    target = (torch.rand(n, generator=g) < prevalence).long()
    target[0], target[1] = 1, 0
    if kind == "continuous":
        scores = torch.randn(n, generator=g) + 1.5 * target
    elif kind == "ties":
        scores = torch.randint(0, 5, (n,), generator=g).float() + target * torch.randint(0, 2, (n,), generator=g)
    elif kind == "all_equal":
        scores = torch.full((n,), 0.25)
    elif kind == "single_anomaly":
        target = torch.zeros(n, dtype=torch.long)
        target[int(torch.randint(0, n, (1,), generator=g))] = 1
        scores = torch.randn(n, generator=g)
    elif kind == "float32_limits":
        # Subnormals closer than a bin to zero (e.g. 1e-45) are covered by the functional tests only.
        tiny = torch.tensor([1e-40, 1.18e-38, 2e-38, 5e-38, 1e-37])
        huge = torch.tensor([3.0e38, 3.2e38, 3.3e38, 3.4e38, 1e38])
        pool = torch.cat([tiny, -tiny, huge, -huge, torch.zeros(1)])
        scores = pool[torch.randint(0, pool.numel(), (n,), generator=g)]
        scores = torch.where(target.bool() & (torch.rand(n, generator=g) < 0.5), scores.abs(), scores)
    elif kind == "magnitudes":
        exponent = torch.rand(n, generator=g) * 60 - 30
        sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        scores = sign * torch.pow(10.0, exponent) + target * torch.pow(10.0, exponent - 1)
    elif kind == "float16":
        scores = (torch.randn(n, generator=g) + target).half()
    elif kind == "signed_zeros":
        scores = torch.tensor([-0.0, 0.0, 1.0, -1.0])[torch.randint(0, 4, (n,), generator=g)]
    else:
        raise ValueError(f"unknown case kind {kind!r}")
    ignored = torch.rand(n, generator=g) < 0.1
    ignored[:2] = False
    if kind == "single_anomaly":
        ignored[target.bool()] = False
    target[ignored] = 255
    return scores.reshape(shape), target.reshape(shape)


SEEDS = 4


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise every test that asks for ``case`` over all kinds and seeds."""
    if "case" in metafunc.fixturenames:
        params = [(kind, seed) for kind in KINDS for seed in range(SEEDS)]
        metafunc.parametrize("case", params, ids=[f"{kind}-{seed}" for kind, seed in params], indirect=True)


@pytest.fixture
def case(request: pytest.FixtureRequest) -> tuple[str, torch.Tensor, torch.Tensor]:
    """``(kind, scores, target)`` of one seeded case."""
    kind, seed = request.param
    return (kind, *make_case(kind, seed))


@pytest.fixture
def case_factory():
    """The case builder itself, for tests that need other shapes or seeds."""
    return make_case
