"""Uniform fake quantization on a fixed grid of levels.

Level sets for ``b`` bits and clip ``alpha`` (``q`` is the integer code, level = (q - zp) * scale):

=============  ===========================  =====================  ============  =================
grid           codes q                      scale                  zero point    levels
=============  ===========================  =====================  ============  =================
symmetric      -2^(b-1) .. 2^(b-1)-1        2 alpha / (2^b-1)      0             2^b, 0 exact
zero-free      0 .. 2^b-1                   2 alpha / (2^b-1)      (2^b-1)/2     2^b, 0 not a level
unsigned       0 .. 2^b-1                   alpha / (2^b-1)        0             2^b on [0, alpha]
affine         0 .. 2^b-1                   (hi-lo) / (2^b-1)      round(-lo/s)  2^b, 0 exact
=============  ===========================  =====================  ============  =================

The symmetric grid uses the full signed code range, as PyTorch's symmetric qint and the QAF
reference code do: 2^b levels spaced by 2 alpha / (2^b - 1), zero exact, so [-alpha, alpha] is
covered up to one step (the restricted range -(2^(b-1)-1)..2^(b-1)-1 wastes a level, which costs
measurably at 4 bits: docs/qaf_solvers.md).  The zero-free grid is LAPQ's weight grid (2^b levels evenly spread
over [-alpha, alpha]); it is the only grid with a half-integer zero point.  The affine grid
widens [lo, hi] to contain 0 so that zero (padding, ReLU zeros) is represented exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from qaf.config import ConfigError
from qaf.quant.clip import CLIP_RULES, aciq_laplace_constant, laplace_scale, search_fraction

#: Version of the numerics of grids and clip rules (this module and qaf.quant.clip): part of the
#: cache key of every cached result that fits grids (ADMM, QSWD). Bump it with any change that can
#: change a grid (tests/test_cache.py checks).
VERSION = 5

_EPS = 1e-12


@dataclass(frozen=True)
class Grid:
    """A fixed uniform grid; calling it fake-quantizes a tensor onto the grid.

    ``grid(x) = (clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale``.
    For the zero-free grid (half-integer zero point) rounding is of ``x / scale + zero_point``.

    Attributes
    ----------
    scale : Tensor
        Step size: 0-d (per tensor) or shaped to broadcast along the channel axis.
    zero_point : Tensor
        Same shape as ``scale``; integer-valued except for the zero-free grid.
    qmin, qmax : int
        Code range.
    """

    scale: Tensor
    zero_point: Tensor
    qmin: int
    qmax: int
    _offset: Tensor = field(init=False, repr=False, compare=False)
    _zp_int: Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        zp_int = torch.floor(self.zero_point)
        object.__setattr__(self, "_zp_int", zp_int)
        object.__setattr__(self, "_offset", self.zero_point - zp_int)

    def __call__(self, x: Tensor) -> Tensor:
        """Fake-quantize ``x`` (same shape and dtype, values on the grid)."""
        v = x / self.scale
        if self._offset.any():
            v = v + self._offset
        q = torch.round(v).add_(self._zp_int).clamp_(self.qmin, self.qmax)
        return q.sub_(self.zero_point).mul_(self.scale)

    def codes(self, x: Tensor) -> Tensor:
        """The integer codes ``q`` (as floats) that ``self(x)`` dequantizes: the ops of ``__call__``."""
        v = x / self.scale
        if bool(self._offset.any()):
            v = v + self._offset
        return torch.round(v).add_(self._zp_int).clamp_(self.qmin, self.qmax)

    def dequantize(self, codes: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """``(codes - zero_point) * scale`` in ``dtype``: bit for bit what ``__call__`` returns."""
        return codes.to(dtype, copy=True).sub_(self.zero_point).mul_(self.scale)

    def ste(self, x: Tensor) -> Tensor:
        """``self(x)`` with a straight-through gradient: 1 inside the grid's range, 0 outside."""
        q = self(x.detach())
        lo, hi = self.bounds()
        inside = (x.detach() >= lo) & (x.detach() <= hi)
        return torch.where(inside, x + (q - x).detach(), q)

    @property
    def num_levels(self) -> int:
        """Number of distinct levels."""
        return self.qmax - self.qmin + 1

    def bounds(self) -> tuple[Tensor, Tensor]:
        """Lowest and highest level (``(-alpha, alpha)``, ``(0, alpha)`` or ``(lo, hi)``)."""
        return (self.qmin - self.zero_point) * self.scale, (self.qmax - self.zero_point) * self.scale

    @property
    def alpha(self) -> Tensor:
        """The clip value a symmetric, zero-free or unsigned grid was built from (see the table)."""
        if self.qmin < 0 or bool((self.zero_point != 0).any()):  # signed: [-alpha, alpha]
            return self.scale * (self.qmax - self.qmin) / 2
        return self.scale * self.qmax  # unsigned: [0, alpha]

    def to(self, device: torch.device | str) -> "Grid":
        """The same grid with its tensors on ``device``."""
        return Grid(self.scale.to(device), self.zero_point.to(device), self.qmin, self.qmax)


def same_bits(a: Tensor, b: Tensor) -> bool:
    """Bitwise equality of two float tensors (tells -0.0 from 0.0)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


def symmetric_grid(alpha: Tensor, bits: int, zero_free: bool = False) -> Grid:
    """Signed grid over [-alpha, alpha] (see the module table).

    Parameters
    ----------
    alpha : Tensor
        Clip value(s), any shape.
    bits : int
        Bit width.
    zero_free : bool
        LAPQ's grid: 2^b levels, zero not a level.

    Returns
    -------
    Grid
    """
    alpha = alpha.abs().clamp_min(_EPS)
    if zero_free:
        qmax = 2**bits - 1
        return Grid(2 * alpha / qmax, torch.full_like(alpha, qmax / 2), 0, qmax)
    return Grid(2 * alpha / (2**bits - 1), torch.zeros_like(alpha), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def unsigned_grid(alpha: Tensor, bits: int) -> Grid:
    """Unsigned grid over [0, alpha] with 2^b levels (post-ReLU activations)."""
    alpha = alpha.abs().clamp_min(_EPS)
    qmax = 2**bits - 1
    return Grid(alpha / qmax, torch.zeros_like(alpha), 0, qmax)


def affine_grid(lo: Tensor, hi: Tensor, bits: int) -> Grid:
    """Asymmetric grid over [min(lo, 0), max(hi, 0)] with 2^b levels and zero exact."""
    lo, hi = lo.clamp_max(0), hi.clamp_min(0)
    qmax = 2**bits - 1
    scale = ((hi - lo) / qmax).clamp_min(_EPS)
    zero_point = torch.round(-lo / scale).clamp(0, qmax)
    return Grid(scale, zero_point, 0, qmax)


def check_scheme(bits: int, clip: str, p: float, key: str = "clip") -> None:
    """Raise ``ConfigError`` for an unusable bit width, clip rule or Lp exponent."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 16:
        raise ConfigError(f"bits={bits!r} is invalid: accepted 2..16")
    if clip not in CLIP_RULES:
        raise ConfigError(f"{key}={clip!r} is invalid: accepted {', '.join(CLIP_RULES)}")
    if not p > 0:
        raise ConfigError(f"p={p!r} is invalid: accepted a number > 0")


def make_grid(
    x: Tensor,
    bits: int,
    *,
    symmetric: bool = True,
    per_channel: bool = False,
    ch_axis: int = 0,
    clip: str = "mse",
    p: float = 2.0,
    unsigned: bool = False,
    zero_free: bool = False,
    sorted_search: bool = False,
) -> Grid:
    """Fit a grid to ``x`` with the given clip rule.

    Parameters
    ----------
    x : Tensor
        Data to fit (weights or an activation sample).
    bits : int
        Bit width, 2..16.
    symmetric : bool
        Signed grid around 0 (zero point 0); False gives the affine [min, max] grid.
    per_channel : bool
        One grid per index of ``ch_axis``.
    ch_axis : int
        Channel axis for ``per_channel``.
    clip : {"minmax", "mse", "lp", "aciq"}
        Clip rule: no clipping, argmin MSE, argmin mean ``|Q(x)-x|^p``, ACIQ Laplace rule.
    p : float
        Exponent for ``clip="lp"``.
    unsigned : bool
        Unsigned grid over [0, alpha] (overrides ``symmetric``).
    zero_free : bool
        With ``symmetric``: LAPQ's zero-free grid.
    sorted_search : bool
        The MSE search of a per-tensor grid by sorted prefix sums (:func:`qaf.quant.clip.sorted_mse`):
        several times faster on large tensors, the same objective rounded differently.

    Returns
    -------
    Grid
        Scale 0-d per tensor, or shaped ``[1, .., C, .., 1]`` along ``ch_axis`` per channel.
    """
    check_scheme(bits, clip, p)
    x = x.detach()
    if not x.is_floating_point():
        x = x.float()
    if per_channel:
        ch_axis = ch_axis % x.dim()
        x2d = x.movedim(ch_axis, 0).reshape(x.shape[ch_axis], -1)
        out_shape = [1] * x.dim()
        out_shape[ch_axis] = x.shape[ch_axis]
    else:
        x2d = x.reshape(1, -1)
        out_shape = []
    mn = x2d.amin(1, keepdim=True)
    mx = x2d.amax(1, keepdim=True)

    if unsigned:
        extent = mx.clamp_min(0)

        def build(t: Tensor) -> Grid:
            return unsigned_grid(t * extent, bits)
    elif symmetric:
        extent = torch.maximum(mn.abs(), mx.abs())

        def build(t: Tensor) -> Grid:
            return symmetric_grid(t * extent, bits, zero_free)
    else:

        def build(t: Tensor) -> Grid:
            return affine_grid(t * mn, t * mx, bits)

    if clip == "minmax":
        grid = build(torch.ones_like(mn))
    elif clip in ("mse", "lp"):
        t = search_fraction(x2d, build, 2.0 if clip == "mse" else float(p), sorted_search=sorted_search)
        grid = build(t[:, None])
    else:  # aciq
        mu, b = laplace_scale(x2d, unsigned)
        alpha = aciq_laplace_constant(bits, unsigned) * b[:, None]
        if unsigned:
            grid = unsigned_grid(torch.minimum(alpha, extent), bits)
        elif symmetric:
            grid = symmetric_grid(torch.minimum(alpha + mu[:, None].abs(), extent), bits, zero_free)
        else:
            lo = torch.maximum(mu[:, None] - alpha, mn)
            hi = torch.minimum(mu[:, None] + alpha, mx)
            grid = affine_grid(lo, hi, bits)
    return Grid(grid.scale.reshape(out_shape), grid.zero_point.reshape(out_shape), grid.qmin, grid.qmax)


def correct_mean(w_q: Tensor, w: Tensor, ch_axis: int = 0) -> Tensor:
    """Mean-only bias correction: shift each output channel of ``w_q`` to the mean of ``w``.

    ``w_q[c] - (mean(w_q[c]) - mean(w[c]))`` (Banner et al., as LAPQ's ``-bcw``).

    Parameters
    ----------
    w_q : Tensor
        Quantized weight.
    w : Tensor
        Float weight, same shape.
    ch_axis : int
        Output-channel axis.

    Returns
    -------
    Tensor
        Corrected weight (no longer exactly on the grid: a per-channel offset).
    """
    dims = [d for d in range(w.dim()) if d != ch_axis % w.dim()]
    if not dims:
        return w.clone()
    return w_q - (w_q.mean(dims, keepdim=True) - w.mean(dims, keepdim=True))
