"""Clip rules: how far a uniform grid reaches before it saturates.

A rule chooses, per channel, the fraction ``t`` in (0, 1] of the data's extent that the grid
covers (``t = 1`` is min-max).  MSE and Lp rules minimise ``mean |Q_t(x) - x|^p``: a vectorised
coarse search over log-spaced ``t`` in [0.01, 1] (which contains ``t = 1``, so the result is never
worse than min-max) refined by golden-section search between the best coarse point's neighbours.  ACIQ uses the closed-form
Laplace rule ``alpha = c_b * E|x - mu|`` of Banner et al.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from scipy.optimize import brentq
from torch import Tensor

if TYPE_CHECKING:
    from qaf.quant.uniform import Grid

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


def sorted_values(x: Tensor) -> Tensor:
    """``torch.sort(x).values``; on the CPU by NumPy, whose SIMD sort is about 3x faster (the sorted
    values are unique, so the result is the same bit for bit)."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(np.sort(x.detach().numpy()))
    return torch.sort(x).values


def sorted_mse(x: Tensor, build: Callable[[Tensor], "Grid"]) -> Callable[[Tensor], Tensor]:
    """Mean squared error of grids on one row of data, from sorted data and prefix sums.

    After one sort, the elements that a grid maps to each level form a contiguous run whose ends are
    found by bisection at the midpoints between levels, so each candidate costs ``O(levels log N)``
    instead of a pass over the data: ``sum_k n_k v_k^2 - 2 v_k S1_k + S2_k`` with ``S1``, ``S2`` the
    run's sums of x and x^2 (float64). Mathematically :func:`lp_error` with ``p = 2``; the sums are
    taken in another order, so values differ in the last bits (ties exactly on a midpoint, measure
    zero, may round the other way).

    Parameters
    ----------
    x : Tensor
        Data (N,).
    build : callable
        Maps fractions shaped (K, 1, 1) to a :class:`qaf.quant.uniform.Grid` with scale and zero
        point of that shape.

    Returns
    -------
    callable
        Maps fractions (K, 1, 1) to errors (K, 1), as ``lp_error(build(t), x[None, None], 2.0)``.
    """
    xs = sorted_values(x.reshape(-1)).double()
    zero = xs.new_zeros(1)
    sums = torch.cat([zero, xs.cumsum(0)]), torch.cat([zero, xs.square().cumsum(0)])
    n = xs.numel()

    def error(t: Tensor) -> Tensor:
        grid = build(t)
        codes = torch.arange(grid.qmin, grid.qmax + 1, device=xs.device, dtype=torch.float64)
        scale, zp = grid.scale.double().reshape(-1, 1), grid.zero_point.double().reshape(-1, 1)
        levels = (codes - zp) * scale  # (K, L)
        cuts = torch.searchsorted(xs, ((codes[:-1] + 0.5 - zp) * scale).contiguous())  # (K, L - 1)
        ends = torch.cat([cuts.new_zeros(len(cuts), 1), cuts, cuts.new_full((len(cuts), 1), n)], 1)
        count = (ends[:, 1:] - ends[:, :-1]).double()
        s1, s2 = (c[ends[:, 1:]] - c[ends[:, :-1]] for c in sums)
        err = (count * levels.square() - 2.0 * levels * s1 + s2).sum(1, keepdim=True) / n
        return err.clamp_min(0.0)

    return error


def search_fraction(
    x2d: Tensor,
    build: Callable[[Tensor], Quantizer],
    p: float,
    coarse: int = 32,
    refine_iters: int = 20,
    t_min: float = 0.01,
    sorted_search: bool = False,
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
    sorted_search : bool
        Evaluate the errors by :func:`sorted_mse` (one sort, then ``O(levels log N)`` per candidate
        instead of a pass over the data); needs one row and ``p = 2``. The same objective, its
        values rounded differently, so the chosen fraction may differ in the last digits.

    Returns
    -------
    Tensor
        Fractions of shape (C,); never worse than ``t = 1`` (min-max) on ``x2d``.
    """
    rows = x2d.shape[0]
    ts = torch.logspace(torch.log10(torch.tensor(t_min)).item(), 0.0, coarse, device=x2d.device, dtype=x2d.dtype)
    ts[-1] = 1.0  # exactly min-max
    if sorted_search:
        if rows != 1 or p != 2.0:
            raise ValueError(f"sorted_search needs one row and p = 2, got {rows} rows and p = {p}")
        evaluate = sorted_mse(x2d[0], build)
        err = evaluate(ts.view(-1, 1, 1))
    else:
        def evaluate(t: Tensor) -> Tensor:
            return lp_error(build(t), x2d.unsqueeze(0), p)

        chunk = max(1, _CHUNK_ELEMENTS // max(1, x2d.numel()))
        err = torch.cat([evaluate(ts[start : start + chunk].view(-1, 1, 1).expand(-1, rows, 1))
                         for start in range(0, coarse, chunk)])  # (K, C)
    best_err, best_k = err.min(0)
    best_t = ts[best_k]

    def f(t: Tensor) -> Tensor:
        return evaluate(t.view(1, rows, 1))[0]

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
