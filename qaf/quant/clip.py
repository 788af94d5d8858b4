"""Clip rules: how far a uniform grid reaches before it saturates.

A rule chooses, per channel, the fraction ``t`` in (0, 1] of the data's extent that the grid
covers (``t = 1`` is min-max).  MSE and Lp rules minimise ``mean |Q_t(x) - x|^p``: a vectorised
coarse search over log-spaced ``t`` in [0.01, 1] (which contains ``t = 1``, so the result is never
worse than min-max) refined by golden-section search between the best coarse point's neighbours.  ACIQ uses the closed-form
Laplace rule ``alpha = c_b * E|x - mu|`` of Banner et al.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from scipy.optimize import brentq
from torch import Tensor

#: A fake-quantizer: maps data to its quantized values (``qaf.quant.uniform.Grid`` is one).
Quantizer = Callable[[Tensor], Tensor]

CLIP_RULES = ("minmax", "mse", "lp", "aciq")

#: ACIQ Laplace clip constants ``alpha / b`` for a signed grid (ACIQ code; README gives 3.86 for 3).
ACIQ_LAPLACE = {2: 2.83, 3: 3.89, 4: 5.03, 8: 9.89}
#: ACIQ Laplace constants for post-ReLU (unsigned) data, ``b`` = mean of the non-zeros.
ACIQ_LAPLACE_RELU = {2: 3.89, 3: 5.02, 4: 6.2}

_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
#: Elements materialised at once during the search (bounds memory to ~64 MB of float32).
_CHUNK_ELEMENTS = 1 << 24


def aciq_laplace_constant(bits: int, unsigned: bool = False) -> float:
    """ACIQ clip-to-scale ratio for Laplace data.

    Uses the published constants where they exist; otherwise solves the stationarity condition of
    ACIQ's error model ``2 b^2 e^(-a/b) + a^2 / (3 * 4^B)`` i.e. ``e^(-a) = a / (3 * 4^B)``, with
    ``B = bits`` for a signed grid and ``B = bits + 1`` for an unsigned one (one-sided data: same
    step over half the range), which reproduces every tabulated value to within 0.05.

    Parameters
    ----------
    bits : int
        Bit width.
    unsigned : bool
        Post-ReLU data on an unsigned grid.

    Returns
    -------
    float
        ``alpha / b`` where ``b`` is the Laplace scale.
    """
    table = ACIQ_LAPLACE_RELU if unsigned else ACIQ_LAPLACE
    if bits in table:
        return table[bits]
    levels_exp = bits + 1 if unsigned else bits
    denom = 3.0 * 4.0**levels_exp
    return float(brentq(lambda a: math.exp(-a) - a / denom, 1e-3, 200.0))


def lp_error(quantize: Quantizer, x: Tensor, p: float) -> Tensor:
    """Mean ``|quantize(x) - x|^p`` over the last dimension.

    Parameters
    ----------
    quantize : callable
        A fake-quantizer (a grid) whose scale broadcasts against ``x``.
    x : Tensor
        Data, reduced over its last dimension.
    p : float
        Norm exponent (> 0).

    Returns
    -------
    Tensor
        Error with the last dimension reduced.
    """
    diff = (quantize(x) - x).abs_()
    # Accumulate in float64: the search compares these errors, and float32 sums depend on the
    # thread count (a DDP rank runs with fewer threads), which would flip near-ties.
    if p == 2.0:
        return diff.square_().mean(-1, dtype=torch.float64)
    return diff.pow_(p).mean(-1, dtype=torch.float64)


def search_fraction(
    x2d: Tensor,
    build: Callable[[Tensor], Quantizer],
    p: float,
    coarse: int = 32,
    refine_iters: int = 20,
    t_min: float = 0.01,
) -> Tensor:
    """Per-row fraction ``t`` in (0, 1] minimising ``mean |Q_t(x) - x|^p``.

    Parameters
    ----------
    x2d : Tensor
        Data of shape (C, N): one row per channel (C = 1 for per-tensor).
    build : callable
        Maps fractions shaped (K, C, 1) to a fake-quantizer (a grid) whose scale has that shape.
    p : float
        Norm exponent.
    coarse : int
        Number of coarse candidates, log-spaced over [t_min, 1] (relative resolution matters:
        low-bit optima of heavy-tailed data sit far below min-max).
    refine_iters : int
        Golden-section iterations in the bracket around the best coarse candidate.
    t_min : float
        Smallest coarse candidate.

    Returns
    -------
    Tensor
        Fractions of shape (C,); never worse than ``t = 1`` (min-max) on ``x2d``.
    """
    rows = x2d.shape[0]
    ts = torch.logspace(torch.log10(torch.tensor(t_min)).item(), 0.0, coarse, device=x2d.device, dtype=x2d.dtype)
    ts[-1] = 1.0  # exactly min-max
    chunk = max(1, _CHUNK_ELEMENTS // max(1, x2d.numel()))
    errs = []
    for start in range(0, coarse, chunk):
        t = ts[start : start + chunk].view(-1, 1, 1).expand(-1, rows, 1)
        errs.append(lp_error(build(t), x2d.unsqueeze(0), p))
    err = torch.cat(errs)  # (K, C)
    best_err, best_k = err.min(0)
    best_t = ts[best_k]

    def f(t: Tensor) -> Tensor:
        return lp_error(build(t.view(1, rows, 1)), x2d.unsqueeze(0), p)[0]

    # Golden-section search in [t_{k-1}, t_{k+1}]: the coarse grid brackets the minimum.
    ratio = float(ts[1] / ts[0])
    a = ts[(best_k - 1).clamp_min(0)]
    a = torch.where(best_k == 0, a / ratio, a)
    b = ts[(best_k + 1).clamp_max(coarse - 1)]
    c = b - _GOLDEN * (b - a)
    d = a + _GOLDEN * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(refine_iters):
        left = fc < fd
        b = torch.where(left, d, b)
        a = torch.where(left, a, c)
        new = torch.where(left, b - _GOLDEN * (b - a), a + _GOLDEN * (b - a))
        fnew = f(new)
        c, d = torch.where(left, new, d), torch.where(left, c, new)
        fc, fd = torch.where(left, fnew, fd), torch.where(left, fc, fnew)
    refined = torch.where(fc < fd, c, d)
    refined_err = torch.minimum(fc, fd)
    return torch.where(refined_err < best_err, refined, best_t)


def laplace_scale(x2d: Tensor, unsigned: bool) -> tuple[Tensor, Tensor]:
    """Centre and Laplace scale ``b = E|x - mu|`` per row, as ACIQ estimates them.

    Parameters
    ----------
    x2d : Tensor
        Data of shape (C, N).
    unsigned : bool
        Post-ReLU data: centre 0 and ``b`` = mean of the positive values.

    Returns
    -------
    tuple of Tensor
        ``(mu, b)``, each of shape (C,).
    """
    if unsigned:
        pos = x2d.clamp_min(0)
        count = (pos > 0).sum(1).clamp_min(1)
        return torch.zeros_like(pos[:, 0]), pos.sum(1) / count
    mu = x2d.mean(1)
    return mu, (x2d - mu[:, None]).abs().mean(1)
