"""DenseFlow: the normalizing flow whose samples serve as synthetic negatives (TPAMI DenseHybrid, NFlowJS).

The architecture is the one released for joint training with a segmenter (Grcić, Grubišić, Šegvić, *Densely
connected normalizing flows*, NeurIPS 2021; configuration of matejgrcic/Open-set-M2F ``denseflow/``, MIT licence),
written here from its description so that the released flow checkpoints load with ``strict=True``.

Forward direction (data -> latent), for an 8-bit image :math:`x` of shape (N, 3, H, W):

1. uniform dequantisation :math:`v = (x + u) / 256`, :math:`u \\sim U(0, 1)` (log-det :math:`-D \\ln 256`);
2. shift to :math:`v - 0.5`, then a 2×2 squeeze (12 channels at H/2 × W/2);
3. three *invertible dense blocks* with 3, 2 and 1 steps. Before every step but the first, the block appends
   ``growth_rate`` channels of Gaussian noise :math:`\\hat\\eta = \\mu + \\sigma \\odot \\eta` whose mean and scale are
   predicted from the block's earlier inputs (cross-unit coupling); the term :math:`-\\ln q(\\hat\\eta \\mid x)` enters
   the log-likelihood bound. Each step is a stack of (ActNorm, invertible 1×1 convolution, affine coupling with a
   gated dense-net coupling network, channel switch) layers;
4. between blocks a *transition*: 2×2 squeeze, then half of the channels are factored out under a standard normal;
5. the final latent (108 channels at H/8 × W/8 for the released configuration) under a diagonal normal with a
   learned per-channel mean and log-scale.

``log_prob`` returns the evidence lower bound in nats per image, as the released code does; the inverse pass drops the
augmented noise channels, so sampling needs no noise network.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["DenseFlow"]

_LOG_2PI = math.log(2 * math.pi)
_NOISE_MODES = ("sample", "mean")


def _sum_per_item(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).sum(dim=1)


def _standard_normal_log_prob(x: torch.Tensor) -> torch.Tensor:
    """(N,) log N(x; 0, I) summed over everything but the batch."""
    return _sum_per_item(-0.5 * _LOG_2PI - 0.5 * x.square())


def squeeze2x2(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, 4C, H/2, W/2); output channel ``4c + 2i + j`` holds pixel (i, j) of each 2×2 cell."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(n, c * 4, h // 2, w // 2)


def unsqueeze2x2(z: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`squeeze2x2`."""
    n, c, h, w = z.shape
    z = z.reshape(n, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return z.reshape(n, c // 4, h * 2, w * 2)


class UniformDequantization(nn.Module):
    """:math:`v = (x + u) / 2^b`; the buffer ``ldj_per_dim`` = :math:`-\\ln 2^b` (kept as the released files store it)."""

    def __init__(self, num_bits: int = 8) -> None:
        super().__init__()
        self.num_bits = num_bits
        self.bins = 2**num_bits
        self.register_buffer("ldj_per_dim", -torch.log(torch.tensor(float(self.bins))))

    def forward(self, x: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = (x.to(u.dtype) + u) / self.bins
        ldj = (self.ldj_per_dim * x[0].numel()).expand(x.shape[0])
        return v, ldj

    def inverse(self, v: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        """[0, 1] data space -> [0, 2^b - 1]: floored (a quantised image) or, without ``quantize``, only clamped."""
        x = v * self.bins
        if quantize:
            x = x.floor()
        return x.clamp(0, self.bins - 1)


class ScalarAffine(nn.Module):
    """:math:`z = s x + t` with scalar buffers ``_scale`` and ``_shift`` (the released flow shifts by -0.5)."""

    def __init__(self, shift: float = 0.0, scale: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("_shift", torch.tensor(float(shift)))
        self.register_buffer("_scale", torch.tensor(float(scale)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ldj = (torch.log(self._scale.abs()) * x[0].numel()).expand(x.shape[0]).to(x.dtype)
        return x * self._scale + self._shift, ldj

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self._shift) / self._scale


class ActNorm(nn.Module):
    """Per-channel affine normalisation :math:`z = (x - b) e^{-s}`, initialised from the first training batch."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.shift = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.zeros(1))

    @torch.no_grad()
    def _data_init(self, x: torch.Tensor) -> None:
        self.shift.copy_(x.mean(dim=(0, 2, 3), keepdim=True))
        self.log_scale.copy_(torch.log(x.std(dim=(0, 2, 3), keepdim=True) + self.eps))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # data-parallel training: every process keeps the first process's initialisation (from its first slice of
            # the global batch, the slice one process initialises from when it accumulates), so the copies stay equal
            dist.broadcast(self.shift.data, src=0)
            dist.broadcast(self.log_scale.data, src=0)
        self.initialized += 1.0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and not bool(self.initialized):
            self._data_init(x)
        z = (x - self.shift) * torch.exp(-self.log_scale)
        ldj = (-self.log_scale.sum() * (x.shape[2] * x.shape[3])).expand(x.shape[0])
        return z, ldj

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return self.shift + z * torch.exp(self.log_scale)


class InvertibleConv1x1(nn.Module):
    """Glow's invertible 1×1 convolution with a full (C, C) ``weight``, initialised orthogonal."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, channels))
        nn.init.orthogonal_(self.weight)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.weight.shape[0]
        z = F.conv2d(x, self.weight.view(c, c, 1, 1))
        ldj = (torch.linalg.slogdet(self.weight)[1] * (x.shape[2] * x.shape[3])).expand(x.shape[0])
        return z, ldj

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        c = self.weight.shape[0]
        return F.conv2d(z, torch.linalg.inv(self.weight).view(c, c, 1, 1))


class _DenseLayer(nn.Module):
    """1×1 conv, ReLU, 3×3 conv to ``growth`` channels, ReLU; the output is appended to the input."""

    def __init__(self, channels: int, growth: int) -> None:
        super().__init__()
        self.nn = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, growth, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.nn(x)], dim=1)


class _GatedConv1x1(nn.Module):
    """:math:`a + b \\cdot \\sigma(c)` from one 1×1 convolution with three times the output channels."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 3 * out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, c = self.conv(x).chunk(3, dim=1)
        return a + b * torch.sigmoid(c)


class _ResidualDenseBlock(nn.Module):
    def __init__(self, channels: int, depth: int, growth: int) -> None:
        super().__init__()
        layers = [_DenseLayer(channels + i * growth, growth) for i in range(depth)]
        self.dense = nn.Sequential(*layers, _GatedConv1x1(channels + depth * growth, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dense(x)


class _CouplingDenseNet(nn.Module):
    """The coupling network: 1×1 conv to ``mid`` channels, one residual gated dense block, zero-initialised 1×1 out."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, depth: int, growth: int) -> None:
        super().__init__()
        out = nn.Conv2d(mid_channels, out_channels, kernel_size=1)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.transform = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=1), _ResidualDenseBlock(mid_channels, depth, growth), out
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transform(x)


class _CouplingNet(nn.Module):
    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, depth: int, growth: int) -> None:
        super().__init__()
        self.dn = _CouplingDenseNet(in_channels, mid_channels, out_channels, depth, growth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dn(x)


class AffineCoupling(nn.Module):
    """Affine coupling: the first ⌈C/2⌉ channels condition a shift and a bounded log-scale of the rest.

    The network's output channels alternate (log-scale, shift) per transformed channel; the log-scale is
    :math:`2 \\tanh(s / 2)`.
    """

    def __init__(self, channels: int, mid_channels: int, depth: int, growth: int, checkpointing: bool = False) -> None:
        super().__init__()
        self.transformed = channels // 2
        self.conditioning = channels - self.transformed
        self.checkpointing = checkpointing
        self.coupling_net = nn.Sequential(
            _CouplingNet(self.conditioning, mid_channels, 2 * self.transformed, depth, growth)
        )

    def _params(self, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.checkpointing and self.training and torch.is_grad_enabled():
            h = checkpoint(self.coupling_net, x1, use_reentrant=False)
        else:
            h = self.coupling_net(x1)
        n, _, height, width = h.shape
        h = h.reshape(n, self.transformed, 2, height, width)
        log_scale = 2.0 * torch.tanh(h[:, :, 0] / 2.0)
        return log_scale, h[:, :, 1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x1, x2 = x.split([self.conditioning, self.transformed], dim=1)
        log_scale, shift = self._params(x1)
        z2 = shift + torch.exp(log_scale) * x2
        return torch.cat([x1, z2], dim=1), _sum_per_item(log_scale)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        z1, z2 = z.split([self.conditioning, self.transformed], dim=1)
        log_scale, shift = self._params(z1)
        return torch.cat([z1, (z2 - shift) * torch.exp(-log_scale)], dim=1)


class ChannelSwitch(nn.Module):
    """Swap the halves: the first ⌈C/2⌉ channels move behind the rest."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = x.shape[1] - x.shape[1] // 2
        x1, x2 = x.split([first, x.shape[1] - first], dim=1)
        return torch.cat([x2, x1], dim=1), x.new_zeros(x.shape[0])

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        first = z.shape[1] - z.shape[1] // 2
        z2, z1 = z.split([z.shape[1] - first, first], dim=1)
        return torch.cat([z1, z2], dim=1)


class _Sequence(nn.Module):
    """Bijections applied in order (``transforms``); log-determinants add up."""

    def __init__(self, transforms: Sequence[nn.Module]) -> None:
        super().__init__()
        self.transforms = nn.ModuleList(transforms)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        total = x.new_zeros(x.shape[0])
        for t in self.transforms:
            x, ldj = t(x)
            total = total + ldj
        return x, total

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        for t in reversed(self.transforms):
            z = t.inverse(z)
        return z


class _NoiseParams(nn.Module):
    """Mean and log-scale (:math:`2\\tanh(\\cdot/2)`) of the appended noise, from the block's earlier inputs."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.transformation = nn.Sequential(
            nn.Conv2d(in_channels, 4 * in_channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(4 * in_channels, 2 * out_channels, kernel_size=1),
        )
        nn.init.zeros_(self.transformation[-1].weight)
        nn.init.zeros_(self.transformation[-1].bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, raw = self.transformation(x).chunk(2, dim=1)
        return mu, 2.0 * torch.tanh(raw / 2.0)


class InvertibleDenseBlock(nn.Module):
    """``num_steps`` flow steps; before step i > 0, ``growth_rate`` noise channels are appended (cross-unit coupling).

    The noise of step i is conditioned on the block input and the outputs of steps 0..i-2 (not on step i-1's output,
    as released).
    """

    def __init__(
        self,
        in_channels: int,
        num_steps: int,
        num_layers: int,
        mid_channels: int,
        growth_rate: int,
        coupling_depth: int,
        coupling_growth: int,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_steps = num_steps
        self.growth_rate = growth_rate
        # Noise of step i (i >= 1) sees the block input and the outputs of steps 0..i-2.
        noise_inputs = [
            in_channels + sum(in_channels + j * growth_rate for j in range(i - 1)) for i in range(1, num_steps)
        ]
        self.noise_params = nn.ModuleList(_NoiseParams(c, growth_rate) for c in noise_inputs)
        steps = []
        for i in range(num_steps):
            channels = in_channels + i * growth_rate
            layers = [
                _Sequence(
                    [
                        ActNorm(channels),
                        InvertibleConv1x1(channels),
                        AffineCoupling(channels, mid_channels, coupling_depth, coupling_growth, checkpointing),
                        ChannelSwitch(),
                    ]
                )
                for _ in range(num_layers)
            ]
            steps.append(_Sequence(layers))
        self.blocks = nn.Sequential(*steps)

    @property
    def out_channels(self) -> int:
        return self.in_channels + (self.num_steps - 1) * self.growth_rate

    def forward(
        self, x: torch.Tensor, noise: str = "sample", generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        total = x.new_zeros(x.shape[0])
        n, _, h, w = x.shape
        earlier = [x]
        out = x
        for i, step in enumerate(self.blocks):
            if i > 0:
                mu, log_scale = self.noise_params[i - 1](torch.cat(earlier, dim=1))
                shape = (n, self.growth_rate, h, w)
                if noise == "mean":
                    eta = x.new_zeros(shape)
                else:
                    draw_device = generator.device if generator is not None else x.device
                    eta = torch.randn(shape, generator=generator, device=draw_device, dtype=x.dtype).to(x.device)
                # -log q(eta_hat | x) = -log N(eta) + sum log sigma
                total = total - _standard_normal_log_prob(eta) + _sum_per_item(log_scale)
                earlier.append(out)
                out = torch.cat([out, mu + torch.exp(log_scale) * eta], dim=1)
            out, ldj = step(out)
            total = total + ldj
        return out, total

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        for i, step in enumerate(reversed(self.blocks)):
            z = step.inverse(z)
            if i != self.num_steps - 1:  # drop the noise channels that step appended
                z = z[:, : -self.growth_rate]
        return z


class _StandardNormal(nn.Module):
    """Standard normal prior of the factored-out half; ``buffer`` only records the device and dtype (released)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("buffer", torch.zeros(1))


class Transition(nn.Module):
    """2×2 squeeze, then the second half of the channels is factored out under a standard normal."""

    def __init__(self) -> None:
        super().__init__()
        self.dist = _StandardNormal()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kept, factored = squeeze2x2(x).chunk(2, dim=1)
        return kept, _standard_normal_log_prob(factored)

    def inverse(self, kept: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return unsqueeze2x2(torch.cat([kept, eps], dim=1))


class _Squeeze(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return squeeze2x2(x), x.new_zeros(x.shape[0])

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return unsqueeze2x2(z)


class ConvNormal2d(nn.Module):
    """Diagonal normal over the final latent with a per-channel mean ``loc`` and ``log_scale`` of shape (1, C, 1, 1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        inner = -0.5 * torch.exp(-2 * self.log_scale) * (z - self.loc).square()
        return _sum_per_item(-0.5 * _LOG_2PI - self.log_scale + inner)

    def reparameterise(self, eps: torch.Tensor) -> torch.Tensor:
        return self.loc + torch.exp(self.log_scale) * eps


class DenseFlow(nn.Module):
    """The DenseFlow normalizing flow over 8-bit RGB images; fully convolutional, any size divisible by ``stride``.

    The defaults are the released configuration (35.7 M parameters, latent 108 channels at stride 8) whose state
    dict equals the released checkpoints' ("DenseFlow pretrained on traffic scenes", "... on COCO"); load them with
    :func:`densehybrid.flows.load_flow_state`. Smaller configurations (fewer steps, layers or coupling channels) are
    for CPU experiments and tests.

    Args:
        block_config: flow steps per dense block; ``len(block_config)`` blocks give a stride of
            ``2 ** len(block_config)``.
        layers_config: (ActNorm, 1×1 conv, coupling, switch) layers per step, per block.
        layer_mid_chnls: channels of each block's coupling networks.
        growth_rate: noise channels appended before every step but a block's first.
        num_bits: bits per colour channel of the data.
        coupling_depth: dense layers in each coupling network (7 released).
        coupling_growth: channels each dense layer adds (64 released).
        in_channels: image channels.
        checkpointing: recompute the coupling networks in the backward pass to save memory (training only; the
            released training enables it; results are unchanged).

    Example:
        >>> flow = DenseFlow(block_config=[1, 1, 1], layers_config=[1, 1, 1], layer_mid_chnls=[8, 8, 8],
        ...                  coupling_depth=1, coupling_growth=8).eval()
        >>> x = torch.randint(0, 256, (2, 3, 16, 24), dtype=torch.uint8)
        >>> flow.log_prob(x, noise="mean").shape
        torch.Size([2])
        >>> flow.sample(3, (16, 8)).shape
        torch.Size([3, 3, 16, 8])
    """

    def __init__(
        self,
        block_config: Sequence[int] = (3, 2, 1),
        layers_config: Sequence[int] = (3, 4, 8),
        layer_mid_chnls: Sequence[int] = (32, 32, 32),
        growth_rate: int = 6,
        num_bits: int = 8,
        *,
        coupling_depth: int = 7,
        coupling_growth: int = 64,
        in_channels: int = 3,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        block_config, layers_config, layer_mid_chnls = list(block_config), list(layers_config), list(layer_mid_chnls)
        if not block_config or not (len(block_config) == len(layers_config) == len(layer_mid_chnls)):
            raise ValueError(
                "Expected `block_config`, `layers_config` and `layer_mid_chnls` to be non-empty and of one length, "
                f"but got {block_config}, {layers_config} and {layer_mid_chnls}."
            )
        for name, values in (("block_config", block_config), ("layers_config", layers_config)):
            if any(not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"Expected every entry of `{name}` to be a positive int, but got {values}.")
        for name, value in (
            ("growth_rate", growth_rate),
            ("num_bits", num_bits),
            ("coupling_depth", coupling_depth),
            ("coupling_growth", coupling_growth),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected `{name}` to be a positive int, but got {value!r}.")
        self.config = {
            "block_config": block_config,
            "layers_config": layers_config,
            "layer_mid_chnls": layer_mid_chnls,
            "growth_rate": growth_rate,
            "num_bits": num_bits,
            "coupling_depth": coupling_depth,
            "coupling_growth": coupling_growth,
            "in_channels": in_channels,
        }
        self.num_bits = num_bits
        self.in_channels = in_channels
        self.stride = 2 ** len(block_config)

        transforms: list[nn.Module] = [UniformDequantization(num_bits), ScalarAffine(shift=-0.5), _Squeeze()]
        channels = in_channels * 4
        #: channels of each factored-out half, in the order of the forward pass (shallowest first)
        self.factored_channels: list[int] = []
        for i, steps in enumerate(block_config):
            block = InvertibleDenseBlock(
                channels,
                steps,
                layers_config[i],
                layer_mid_chnls[i],
                growth_rate,
                coupling_depth,
                coupling_growth,
                checkpointing,
            )
            transforms.append(block)
            channels = block.out_channels
            if i != len(block_config) - 1:
                transforms.append(Transition())
                channels *= 2
                self.factored_channels.append(channels)
        self.latent_channels = channels
        self.base_dist = ConvNormal2d(channels)
        # The released flow registers the base distribution before the transforms: same state-dict order.
        self.transforms = nn.ModuleList(transforms)

    @classmethod
    def small(cls, **overrides) -> DenseFlow:
        """A 0.18 M-parameter configuration of the same topology (stride 8) for CPU runs, demos and tests (ours).

        ``block_config=[2, 2, 1]``, ``layers_config=[2, 2, 2]``, ``layer_mid_chnls=[16, 16, 16]``, ``growth_rate=4``,
        ``coupling_depth=2``, ``coupling_growth=16``; keyword arguments override any of them. It samples about 30
        64×64 patches per second on one CPU thread, against under 1 for the released configuration.
        """
        config: dict = dict(
            block_config=[2, 2, 1],
            layers_config=[2, 2, 2],
            layer_mid_chnls=[16, 16, 16],
            growth_rate=4,
            coupling_depth=2,
            coupling_growth=16,
        )
        config.update(overrides)
        return cls(**config)

    # ----------------------------------------------------------------------------------------------------- checks
    def _check_size(self, height: int, width: int, name: str) -> None:
        if height < self.stride or width < self.stride or height % self.stride or width % self.stride:
            raise ValueError(
                f"Expected `{name}` height and width to be positive multiples of {self.stride} (the flow "
                f"downsamples by {self.stride}), but got {height}x{width}. Crop or pad the input to a multiple "
                f"of {self.stride}."
            )

    def latent_shapes(self, height: int, width: int) -> tuple[tuple[int, int, int], list[tuple[int, int, int]]]:
        """Shapes (C, h, w) of the base latent and of the factored halves (deepest first) for an H×W image."""
        self._check_size(height, width, "size")
        factored = []
        for i, c in enumerate(self.factored_channels):
            scale = 2 ** (i + 2)
            factored.append((c, height // scale, width // scale))
        return (self.latent_channels, height // self.stride, width // self.stride), factored[::-1]

    # ---------------------------------------------------------------------------------------------------- density
    def forward_latent(
        self, x: torch.Tensor, noise: str = "sample", generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The final latent z (N, C, H/stride, W/stride) and log p(x) (N,) in nats; see :meth:`log_prob`."""
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"Expected `x` to have shape (N, {self.in_channels}, H, W), but got {shape}.")
        if x.is_floating_point() or x.dtype == torch.bool or x.is_complex():
            raise TypeError(
                f"Expected `x` to be an integer tensor of {self.num_bits}-bit values (e.g. uint8 in 0..255), but got "
                f"dtype {x.dtype}. Convert images in [0, 1] with `(images * 255).round().to(torch.uint8)`."
            )
        if noise not in _NOISE_MODES:
            raise ValueError(f"Expected `noise` to be one of {_NOISE_MODES}, but got {noise!r}.")
        self._check_size(x.shape[2], x.shape[3], "x")
        dtype = self.base_dist.loc.dtype
        x = x.to(self.base_dist.loc.device)
        if x.shape[0] == 0:  # an empty batch: empty results (the data-dependent layers have nothing to run on)
            base, _ = self.latent_shapes(x.shape[2], x.shape[3])
            return torch.zeros((0, *base), dtype=dtype, device=x.device), torch.zeros(0, dtype=dtype, device=x.device)
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= 2**self.num_bits):
            raise ValueError(
                f"Expected `x` values in [0, {2**self.num_bits - 1}], but got [{int(x.min())}, {int(x.max())}]."
            )
        if noise == "mean":
            u = torch.full(x.shape, 0.5, dtype=dtype, device=x.device)
        else:
            draw_device = generator.device if generator is not None else x.device
            u = torch.rand(x.shape, generator=generator, dtype=dtype, device=draw_device).to(x.device)
        z, log_prob = self.transforms[0](x, u)
        for t in self.transforms[1:]:
            if isinstance(t, InvertibleDenseBlock):
                z, ldj = t(z, noise, generator)
            else:
                z, ldj = t(z)
            log_prob = log_prob + ldj
        return z, log_prob + self.base_dist.log_prob(z)

    def forward(self, x: torch.Tensor, noise: str = "sample", generator: torch.Generator | None = None) -> torch.Tensor:
        """:meth:`log_prob` (the flow's forward pass, e.g. through ``DistributedDataParallel`` in pre-training)."""
        return self.log_prob(x, noise, generator)

    def log_prob(
        self, x: torch.Tensor, noise: str = "sample", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Log-likelihood (evidence lower bound) of 8-bit images, in nats per image.

        Args:
            x: (N, 3, H, W) integer tensor (uint8 or int64) with values in 0..255; H and W multiples of
                :attr:`stride` (8 for the released configuration).
            noise: ``"sample"`` draws the dequantisation noise u ~ U(0, 1) and the dense blocks' Gaussian noise, as
                in training; ``"mean"`` puts every draw at its mean (u = 0.5, noise 0), a deterministic value.
            generator: source of the random draws for ``"sample"``.

        Returns:
            (N,) log p(x) in nats; bits per dimension are ``-log_prob / (ln 2 · 3HW)``.

        Raises:
            TypeError: for a floating-point ``x``.
            ValueError: for a wrong shape, values outside 0..255 or a size that is not a multiple of the stride.
        """
        return self.forward_latent(x, noise, generator)[1]

    def bits_per_dim(
        self, x: torch.Tensor, noise: str = "sample", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Mean negative log-likelihood over the batch in bits per dimension (the released training loss)."""
        return -self.log_prob(x, noise, generator).sum() / (math.log(2.0) * x.numel())

    # --------------------------------------------------------------------------------------------------- sampling
    def decode(self, eps_base: torch.Tensor, eps_factored: Sequence[torch.Tensor]) -> torch.Tensor:
        """The inverse pass from given standard-normal latents, in the [0, 1] data space, before quantisation.

        Args:
            eps_base: (N, C, h, w) standard normal; the base latent is ``loc + exp(log_scale) * eps_base``.
            eps_factored: the factored-out halves in the order the inverse pass meets them (deepest first), e.g.
                (N, 108, h, w) then (N, 48, 2h, 2w) for the released configuration.

        Returns:
            (N, 3, stride·h, stride·w) images, differentiable with respect to the flow's parameters and the inputs.
        """
        if not isinstance(eps_base, torch.Tensor) or eps_base.ndim != 4 or eps_base.shape[1] != self.latent_channels:
            shape = tuple(eps_base.shape) if isinstance(eps_base, torch.Tensor) else type(eps_base).__name__
            raise ValueError(f"Expected `eps_base` to have shape (N, {self.latent_channels}, h, w), but got {shape}.")
        n, _, h, w = eps_base.shape
        _, expected = self.latent_shapes(h * self.stride, w * self.stride)
        eps_factored = list(eps_factored)
        got = [tuple(e.shape) for e in eps_factored]
        want = [(n, *s) for s in expected]
        if got != want:
            raise ValueError(
                f"Expected `eps_factored` to hold tensors of shapes {want} (deepest first), but got {got}."
            )
        z = self.base_dist.reparameterise(eps_base)
        pending = iter(eps_factored)
        for t in reversed(self.transforms[1:]):
            z = t.inverse(z, next(pending)) if isinstance(t, Transition) else t.inverse(z)
        return z

    def sample(
        self,
        n: int,
        size: tuple[int, int],
        generator: torch.Generator | None = None,
        differentiable: bool = False,
        quantize: bool | None = None,
    ) -> torch.Tensor:
        """Draw ``n`` images of ``size`` = (H, W) pixels.

        Args:
            n: number of images.
            size: (H, W), multiples of :attr:`stride`.
            generator: source of the latent draws (on the flow's device).
            differentiable: keep the graph (as the released joint training's flow step uses it); otherwise run
                without gradients.
            quantize: floor to integer values; otherwise only clamp to [0, 255], as the released TPAMI flow does in
                both steps of the joint training. None: quantize unless ``differentiable``.

        Returns:
            (n, 3, H, W) float images in [0, 255] (integer-valued when quantized).
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"Expected `n` to be a non-negative int, but got {n!r}.")
        height, width = (int(s) for s in size)
        base_shape, factored_shapes = self.latent_shapes(height, width)
        device, dtype = self.base_dist.loc.device, self.base_dist.loc.dtype

        # Draw where the generator lives (a CPU generator can drive a flow on the GPU), then move.
        draw_device = generator.device if generator is not None else device

        def draw(shape: tuple[int, ...]) -> torch.Tensor:
            return torch.randn((n, *shape), generator=generator, device=draw_device, dtype=dtype).to(device)

        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            eps_base = draw(base_shape)
            eps_factored = [draw(s) for s in factored_shapes]
            quantize = not differentiable if quantize is None else quantize
            return self.transforms[0].inverse(self.decode(eps_base, eps_factored), quantize=quantize)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.items())
