"""The convolution exponential (Hoogeboom, Garcia Satorras, Tomczak & Welling, NeurIPS 2020).

y = exp(M)·x, with M a zero-padded k×k convolution: exp(M) is invertible whatever M is, its
inverse is exp(−M), and log|det exp(M)| = tr M = H·W·Σ_c K[c, c, centre]. exp(M)·x is the
series Σ_i M^i x / i!, each term one convolution of the previous term.

Follows github.com/ehoogeboom/convolution_exponential_and_sylvester at commit
0e4dd9ea8eef13d49490a0b22f2cb41ebb9b1012:

- ``models/transformations/convexp/functional.py``: ``conv_exp`` (the series, 3×3 kernel,
  padding 1), ``inv_conv_exp`` (``conv_exp`` with the kernel negated), ``log_det`` (the trace:
  the sum of the kernel's centre diagonal, times H·W in the module).
- ``models/transformations/convexp/convexp_module.py``: the mixer ``ConvExp`` is a bias, an
  invertible 1×1 convolution, the convolution exponential, a bias (both biases of shape
  C×H×W, zero at start); kernel ~ N(0, 1)/(C·k·k); ``spectral_norm_conv`` with ``coeff`` =
  ``--convexp_coeff`` (``settings.py``: 0.95).
- ``models/transformations/convexp/spectral.py``: K = K_raw / (max(1, σ/coeff) + 1e-5), σ the
  spectral norm of the convolution on the layer's input size: a constraint, inactive while σ ≤ coeff.
- ``models/distributions/flow.py`` (``get_mixing_transform``, ``--mixing convexp`` in the README's
  CIFAR-10 command): that whole module is the mixer, so here too the convolution exponential
  comes after Glow's 1×1 convolution (``ConvExpMixer``).

Where this deviates, and why:

- σ. The authors estimate σ by one power-iteration step per training batch (vectors kept in
  buffers, none at evaluation): an estimate from below that lags the kernel, so ‖M‖ ≤ coeff,
  on which the truncation below rests, is not guaranteed. Here σ is an upper bound computed
  from the kernel in every forward (``spectral_norm_bound``): M is the compression of the
  circular convolution on the (H+r)×(W+r) torus (r = k // 2; the extra rows and columns only
  ever meet the zero padding), whose norm is the largest singular value of its C×C Fourier
  matrices; each is bounded by Gram iteration (Delattre et al., ICML 2023): ‖A‖ ≤
  ‖(A^H A)^(2^(t−1))‖_F^(1/2^t), no larger than C^(1/2^(t+1))·‖A‖ (under 1 % over at t = 8, C ≤ 96).
  The normalisation is thus enforced in the map as a reparametrisation of the raw kernel.
- Truncation. The authors sum 6 terms in training and 13 in evaluation, so training and
  evaluation compute different maps and tr M is the log-det of neither. The rule here: with
  s = coeff ≥ ‖M‖₂, the remainder after N terms is
  ‖Σ_{i>N} M^i/i!‖₂ ≤ r_N(s) = s^(N+1)/(N+1)! · (N+2)/(N+2−s), and N is the fewest terms with
  r_N(s) ≤ u, u the unit roundoff of the input's dtype (2^−53 for float64, 2^−24 for float32):
  17 terms in float64 and 10 in float32 at coeff 0.95 (``series_terms``). Then the series
  computes exp(M)·x to within u·‖x‖, below the rounding of the result itself; the round trip
  exp_N(−M)·exp_N(M) is the identity to within (2e^s + 1)·u; and
  |log|det exp_N(M)| − tr M| ≤ −D·log(1 − e^s·u) ≈ 2.6·D·u for D = C·H·W inputs (~1e−12
  at 3072 float64 inputs): the log-det stated is the log-det of the map computed.
- The bias before the 1×1 convolution is dropped: the mixer is affine, so
  E·W·(x + b₁) + b₂ = E·W·x + (E·W·b₁ + b₂) and b₁ spans nothing b₂ does not (the authors call
  both "probably not useful"); the bias after is kept.
- The authors switch to a Householder 1×1 convolution above 64 channels; their CIFAR-10
  models never reach it (12 and 24 channels). Here the plain 1×1 convolution (their
  ``Conv1x1``, flowbench's ``InvConv1x1``) is used at every width.
"""

from __future__ import annotations

import math
from functools import cache

import torch
from torch import nn

from flowbench.flows.base import Flow, FlowSequence, exact_conv2d, spatial_size
from flowbench.flows.conv1x1 import InvConv1x1
from flowbench.flows.glow import TINY, glow_architecture
from flowbench.flows.registry import register_model

GRAM_ITERATIONS = 8


@cache
def series_terms(norm_bound: float, dtype: torch.dtype) -> int:
    """Fewest terms N with r_N(s) = s^(N+1)/(N+1)!·(N+2)/(N+2−s) ≤ the dtype's unit roundoff,
    s = ``norm_bound`` ≥ ‖M‖₂: r_N bounds ‖exp(M) − Σ_{i≤N} M^i/i!‖₂ (a geometric tail with
    ratio s/(N+2) past the first term left out)."""
    unit_roundoff = torch.finfo(dtype).eps / 2
    terms = max(0, math.floor(norm_bound) - 1)  # the tail is geometric once the ratio s/(N+2) < 1

    def remainder_bound(n: int) -> float:
        return norm_bound ** (n + 1) / math.factorial(n + 1) * (n + 2) / (n + 2 - norm_bound)

    while remainder_bound(terms) > unit_roundoff:
        terms += 1
    return terms


def spectral_norm_bound(kernel: torch.Tensor, height: int, width: int, iterations: int = GRAM_ITERATIONS):
    """An upper bound of ‖M‖₂, M the zero-padded k×k convolution by ``kernel`` on H×W images:
    the norm of the circular convolution on the (H+r)×(W+r) torus, each Fourier matrix bounded
    by ``iterations`` steps of Gram iteration. Matrix products only: no device read."""
    k = kernel.shape[-1]
    r = k // 2
    rows, cols = height + r, width + r
    # tap (a, b) reads x[i + a − r, j + b − r]: on the torus, offset (a − r) mod (H + r); taps
    # that meet on a small torus add up (they only ever meet the zero padding, so M stays its compression)
    taps_row = ((torch.arange(k, device=kernel.device) - r) % rows)[:, None].expand(k, k)
    taps_col = ((torch.arange(k, device=kernel.device) - r) % cols)[None, :].expand(k, k)
    grid = kernel.new_zeros(rows, cols, *kernel.shape[:2])
    grid = grid.index_put((taps_row, taps_col), kernel.permute(2, 3, 0, 1), accumulate=True)
    # a real kernel's frequencies ω and −ω have conjugate matrices, with the same singular values
    matrices = torch.fft.rfft2(grid, dim=(0, 1)).flatten(0, 1)  # [frequencies, C, C]
    log_scale = matrices.real.new_zeros(matrices.shape[0])
    for _ in range(iterations):
        # (A^H A)^(2^t) rescaled at each step, its scale kept in log_scale: no overflow
        norm = torch.linalg.matrix_norm(matrices).clamp_min(torch.finfo(log_scale.dtype).tiny)
        matrices = matrices / norm[:, None, None]
        matrices = matrices.mH @ matrices
        log_scale = 2 * (log_scale + norm.log())
    log_bound = (torch.linalg.matrix_norm(matrices).log() + log_scale) / 2**iterations
    return log_bound.amax().exp()


def conv_exp(x: torch.Tensor, kernel: torch.Tensor, terms: int) -> torch.Tensor:
    """Σ_{i≤terms} M^i x / i!, M the zero-padded convolution by ``kernel`` (the authors' ``conv_exp``)."""
    result = term = x
    for i in range(1, terms + 1):
        term = exact_conv2d(term, kernel, padding=kernel.shape[-1] // 2) / i
        result = result + term
    return result


class ConvolutionExponential(Flow):
    """y = exp(M)·x + b, M the zero-padded k×k convolution by the normalised kernel
    K = K_raw / (max(1, σ/coeff) + 1e-5), σ ≥ ‖M_raw‖₂ (``spectral_norm_bound``), b a bias per
    channel and pixel; x = exp(−M)·(y − b); log|det J| = H·W·Σ_c K[c, c, centre]. The series is
    summed to ``series_terms(coeff, dtype)`` terms: see the module docstring."""

    def __init__(self, channels: int, size: tuple[int, int], kernel_size: int = 3, coeff: float = 0.95):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if coeff <= 0:
            raise ValueError(f"coeff (the bound on the convolution's spectral norm) must be positive, got {coeff}")
        self.coeff = coeff
        shape = (channels, channels, kernel_size, kernel_size)
        self.raw_kernel = nn.Parameter(torch.randn(shape) / (channels * kernel_size * kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels, *size))

    def kernel(self, height: int, width: int) -> torch.Tensor:
        """The normalised kernel for H×W inputs: its convolution's spectral norm is at most coeff."""
        sigma = spectral_norm_bound(self.raw_kernel, height, width)
        return self.raw_kernel / (torch.clamp(sigma / self.coeff, min=1.0) + 1e-5)

    def forward(self, x):
        kernel = self.kernel(*x.shape[2:]).to(x.dtype)
        r = kernel.shape[-1] // 2
        y = conv_exp(x, kernel, series_terms(self.coeff, x.dtype)) + self.bias.to(x.dtype)
        logdet = spatial_size(x) * torch.diagonal(kernel[:, :, r, r]).sum()
        return y, logdet.expand(x.shape[0])

    def inverse(self, y):
        kernel = self.kernel(*y.shape[2:]).to(y.dtype)
        return conv_exp(y - self.bias.to(y.dtype), -kernel, series_terms(self.coeff, y.dtype))


class ConvExpMixer(FlowSequence):
    """The authors' ``ConvExp`` mixer: Glow's invertible 1×1 convolution, then the convolution
    exponential with its bias."""

    def __init__(self, channels: int, size: tuple[int, int], kernel_size: int = 3, coeff: float = 0.95):
        super().__init__(InvConv1x1(channels), ConvolutionExponential(channels, size, kernel_size, coeff))


@register_model(
    "convexp",
    paper="Hoogeboom et al., The Convolution Exponential and Generalized Sylvester Flows (NeurIPS 2020)",
    year=2020,
    code="https://github.com/ehoogeboom/convolution_exponential_and_sylvester",
    tiny=TINY,
)
def build_convexp(
    image_shape,
    depth=8,
    levels=3,
    hidden_channels=128,
    additive=False,
    kernel_size=3,
    coeff=0.95,
    n_bits=8,
    actnorm=True,
    learned_prior=True,
):
    """Hoogeboom et al. 2020: ActNorm → 1×1 conv + convolution exponential → affine coupling."""

    def mixer(channels, size):
        return ConvExpMixer(channels, size, kernel_size=kernel_size, coeff=coeff)

    return glow_architecture(
        image_shape, mixer, depth, levels, hidden_channels, additive, n_bits, actnorm, learned_prior
    )
