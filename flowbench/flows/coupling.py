"""Affine and additive coupling (Dinh et al. 2017; Kingma & Dhariwal 2018) and their networks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flowbench.flows.actnorm import ActNorm
from flowbench.flows.base import Flow


class ZeroConv2d(nn.Module):
    """Glow's last layer: a zero-initialised 3×3 conv scaled by exp(3·logs), so every coupling
    starts as the identity."""

    def __init__(self, in_channels: int, out_channels: int, logscale_factor: float = 3.0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)  # type: ignore[arg-type]  # Conv2d types bias Optional; this one has it
        self.logs = nn.Parameter(torch.zeros(1, out_channels, 1, 1))
        self.logscale_factor = logscale_factor

    def forward(self, x):
        return self.conv(x) * torch.exp(self.logs * self.logscale_factor)


class GlowCouplingNet(nn.Module):
    """conv3×3 → ActNorm → ReLU → conv1×1 → ActNorm → ReLU → ZeroConv2d (openai/glow's ``f``)."""

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, hidden_channels, 3, padding=1, bias=False)
        self.norm1 = ActNorm(hidden_channels)
        self.conv2 = nn.Conv2d(hidden_channels, hidden_channels, 1, bias=False)
        self.norm2 = ActNorm(hidden_channels)
        self.out = ZeroConv2d(hidden_channels, out_channels)

    def forward(self, x):
        # in place: ActNorm keeps its input, not its output, for the backward pass
        h = F.relu(self.norm1(self.conv1(x))[0], inplace=True)
        h = F.relu(self.norm2(self.conv2(h))[0], inplace=True)
        return self.out(h)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm1, self.conv1 = ActNorm(channels), nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2, self.conv2 = ActNorm(channels), nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        h = self.conv1(F.relu(self.norm1(x)[0]))
        return x + self.conv2(F.relu(self.norm2(h)[0]))


class ResNetCouplingNet(nn.Module):
    """RealNVP's residual coupling network; ActNorm stands in for batch norm so that a sample's
    density does not depend on the rest of its batch (the flow stays exactly invertible)."""

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int, n_blocks: int):
        super().__init__()
        self.inp = nn.Conv2d(in_channels, hidden_channels, 3, padding=1)
        self.blocks = nn.Sequential(*(ResidualBlock(hidden_channels) for _ in range(n_blocks)))
        self.norm = ActNorm(hidden_channels)
        self.out = ZeroConv2d(hidden_channels, out_channels)

    def forward(self, x):
        h = self.blocks(self.inp(x))
        return self.out(F.relu(self.norm(h)[0]))


class AffineCoupling(Flow):
    """y_b = (x_b + t(x_a)) · s(x_a), x_a unchanged; log|det| = Σ log s.

    ``mask="channel"`` splits channels in half (Glow; RealNVP after a squeeze);
    ``mask="checkerboard"`` conditions on alternate pixels (RealNVP). ``parity`` swaps the
    halves. ``scale="sigmoid"`` is Glow's s = sigmoid(h + 2); ``"tanh"`` is RealNVP's
    log s = γ_c·tanh(h); ``additive=True`` fixes s = 1 (NICE / additive Glow).
    """

    def __init__(
        self,
        channels: int,
        hidden_channels: int,
        mask: str = "channel",
        parity: int = 0,
        additive: bool = False,
        scale: str = "sigmoid",
        n_blocks: int = 0,
    ):
        super().__init__()
        if mask not in ("channel", "checkerboard"):
            raise ValueError(f"mask must be 'channel' or 'checkerboard', got {mask!r}")
        if scale not in ("sigmoid", "tanh"):
            raise ValueError(f"scale must be 'sigmoid' or 'tanh', got {scale!r}")
        self.mask, self.parity, self.additive, self.scale = mask, parity, additive, scale
        if mask == "channel":
            self.split = channels // 2
            n_in = self.split if parity == 0 else channels - self.split
            n_target = channels - n_in
        else:
            n_in = n_target = channels
        n_out = n_target if additive else 2 * n_target
        self.net = (
            ResNetCouplingNet(n_in, n_out, hidden_channels, n_blocks)
            if n_blocks
            else GlowCouplingNet(n_in, n_out, hidden_channels)
        )
        if scale == "tanh" and not additive:  # an additive coupling has no scale to hold
            self.tanh_scale = nn.Parameter(torch.ones(1, n_target, 1, 1))

    # None: the network runs in its parameters' dtype; torch.bfloat16: under autocast. The flow
    # itself (the affine map and its log-det) stays in full precision either way, so it stays exact
    net_dtype: torch.dtype | None = None

    def _shift_and_log_scale(self, cond):
        if self.net_dtype is None:
            h = self.net(cond)
        else:
            with torch.autocast(cond.device.type, dtype=self.net_dtype):
                h = self.net(cond)
            h = h.to(cond.dtype)
        if self.additive:
            return h, torch.zeros_like(h)
        shift, raw = h[:, 0::2], h[:, 1::2]
        if self.scale == "sigmoid":
            return shift, F.logsigmoid(raw + 2.0)
        return shift, self.tanh_scale * torch.tanh(raw)

    def _checkerboard(self, x):
        i = torch.arange(x.shape[2], device=x.device)[:, None]
        j = torch.arange(x.shape[3], device=x.device)[None, :]
        return ((i + j + self.parity) % 2).to(x.dtype)[None, None]

    def _channel_halves(self, x):
        a, b = x[:, : self.split], x[:, self.split :]
        return (a, b) if self.parity == 0 else (b, a)

    def _join(self, cond, target):
        return torch.cat([cond, target] if self.parity == 0 else [target, cond], dim=1)

    def forward(self, x):
        if self.mask == "channel":
            cond, target = self._channel_halves(x)
            shift, log_s = self._shift_and_log_scale(cond)
            y = self._join(cond, (target + shift) * torch.exp(log_s))
        else:
            m = self._checkerboard(x)
            shift, log_s = self._shift_and_log_scale(x * m)
            shift, log_s = shift * (1 - m), log_s * (1 - m)
            y = (x + shift) * torch.exp(log_s)
        return y, log_s.flatten(1).sum(1)

    def inverse(self, y):
        if self.mask == "channel":
            cond, target = self._channel_halves(y)
            shift, log_s = self._shift_and_log_scale(cond)
            return self._join(cond, target * torch.exp(-log_s) - shift)
        m = self._checkerboard(y)
        shift, log_s = self._shift_and_log_scale(y * m)
        return y * torch.exp(-log_s * (1 - m)) - shift * (1 - m)
