"""CP decomposition with quantized factors by AO-ADMM (alternating optimization, ADMM inside).

Outer loop: for each mode n, ``G = *_{m != n} U_m^T U_m`` and ``F = MTTKRP_n``; the factor
solves ``min ||W_(n) - H K^T||^2 s.t. H on a quantization grid`` by ADMM:

    H~ = (F + rho (H + U)) (G + rho I)^-1      (one Cholesky per inner solve, rho = tr(G)/R)
    H^ = alpha H~ + (1 - alpha) H               (over-relaxation; alpha = 1: none)
    H  = Q(H^ - U)                              (projection onto a FIXED grid)
    U  = U + H - H^

stopping when the primal ``||H - H~|| / ||H||`` and dual ``||H - H_prev|| / ||U||`` residuals
are both below ``tol_inner``. Duals carry over between outer iterations (warm start).

Differences from the reference implementation, and why:
- the grid (scale, zero point) is estimated once per factor update, from the first ``H~ - U``,
  and then fixed, so ``Q`` is a projection onto a fixed set: the inner loop can converge and its
  stopping test is met instead of running into the iteration cap;
- ``G + rho I`` is factorized once per factor update (Cholesky with jitter fallback, so
  rank-deficient Gram matrices do not crash a solve); each inner step is then one GEMM with its
  inverse, or two float64 triangular solves for a factor with few rows (the kernel mode), see
  :func:`qaf.decomp.cp.spd_right_solver`;
- optional over-relaxation (``relaxation`` alpha in (0, 2), Boyd et al. 2011, section 3.4.3): with
  alpha = 1.8 a rank-943 ResNet-18 layer reaches in 20 outer iterations the error that alpha = 1
  reaches in 40-60, and ends lower (docs/qaf_solvers.md);
- every outer iteration's quantized error is measured exactly (from the MTTKRP and the Grams)
  and the best quantized iterate is returned (the starting point, quantized, included); a
  diverging run (non-finite or exploding error) stops early, restores the best and warns.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from qaf.decomp.cp import (
    MttkrpPlan,
    fit_error,
    gram,
    hadamard_except,
    relative_error,
    small_linalg_threads,
    spd_right_solver,
)

#: Version of the numerics of AO-ADMM: part of every cache key of their results. Bump it with
#: any change that can change a result (tests/test_cache.py fails until the bump is recorded).
VERSION = 4

__all__ = ["ADMMResult", "GridFactory", "Projector", "admm_factor_update", "cp_admm"]

Projector = Callable[[Tensor], Tensor]
"""Maps a tensor onto a fixed grid (e.g. a :class:`qaf.quant.uniform.Grid`)."""
GridFactory = Callable[[Tensor], Projector]
"""Estimates a grid from a tensor and returns its projector."""


@dataclass
class ADMMResult:
    """Outcome of :func:`cp_admm`.

    Attributes
    ----------
    factors : list of Tensor
        The best quantized factors found; ``grids[n](factors[n]) == factors[n]``.
    grids : list of Projector
        The grid each returned factor lies on.
    e_quant : float
        Exact relative error of ``[[factors]]``.
    iterations : int
        Outer iterations run.
    best_iteration : int
        Outer iteration the returned factors come from (0 = the quantized start).
    inner_iterations : int
        Total inner ADMM steps over all factor updates.
    diverged : bool
        Whether the run stopped because the error became non-finite or exploded.
    history : list of float
        Quantized relative error after each outer iteration (index 0: the start).
    """

    factors: list[Tensor]
    grids: list[Projector]
    e_quant: float
    iterations: int
    best_iteration: int
    inner_iterations: int
    diverged: bool = False
    history: list[float] = field(default_factory=list)


def admm_factor_update(
    factor: Tensor,
    dual: Tensor,
    mttkrp: Tensor,
    gram_matrix: Tensor,
    grid_factory: GridFactory,
    *,
    max_iter: int = 50,
    tol: float = 1e-4,
    relaxation: float = 1.0,
) -> tuple[Tensor, Tensor, Projector, int]:
    """One quantized least-squares factor update by ADMM.

    Parameters
    ----------
    factor : Tensor
        Current factor H (I, R), on its previous grid or float.
    dual : Tensor
        Scaled dual U (I, R), carried across outer iterations.
    mttkrp : Tensor
        F = W_(n) K (I, R).
    gram_matrix : Tensor
        G = K^T K (R, R), any float dtype.
    grid_factory : GridFactory
        Called once, on the first ``H~ - U``, to fix the grid for this update.
    max_iter : int
        Inner steps at most.
    tol : float
        Threshold on the primal and dual residuals (relative Frobenius norms).
    relaxation : float
        Over-relaxation alpha in (0, 2): the projection and the dual see ``alpha H~ + (1 - alpha) H``.

    Returns
    -------
    tuple
        ``(H, U, grid, steps)``: the quantized factor, the new dual, its grid and the number of
        inner steps run.
    """
    shifted = gram_matrix.double().clone()
    rho = float(shifted.trace()) / shifted.shape[0]
    shifted.diagonal().add_(rho)
    solve = spd_right_solver(shifted, factor.shape[0], factor.dtype, reuse=max_iter > 4)
    h, u = factor, dual
    grid: Projector | None = None
    steps = 0
    for steps in range(1, max_iter + 1):
        h_tilde = solve(torch.add(mttkrp, h + u, alpha=rho))
        h_hat = h_tilde if relaxation == 1.0 else torch.lerp(h, h_tilde, relaxation)
        target = h_hat - u
        if grid is None:
            grid = grid_factory(target)
        h_prev = h
        h = grid(target)
        gap = h - h_hat
        u = u + gap
        primal = float(torch.linalg.vector_norm(gap if relaxation == 1.0 else h - h_tilde)) / max(
            float(torch.linalg.vector_norm(h)), 1e-30)
        dual_res = float(torch.linalg.vector_norm(h - h_prev)) / max(
            float(torch.linalg.vector_norm(u)), 1e-30
        )
        if primal < tol and dual_res < tol:
            break
    assert grid is not None
    return h, u, grid, steps


def cp_admm(
    tensor: Tensor,
    factors: list[Tensor],
    grid_factory: GridFactory,
    *,
    max_outer: int = 30,
    max_inner: int = 50,
    tol_inner: float = 1e-4,
    tol_outer: float = 1e-4,
    patience: int = 3,
    divergence_factor: float = 10.0,
    relaxation: float = 1.0,
) -> ADMMResult:
    """Quantized CP by AO-ADMM, started from ``factors``.

    Parameters
    ----------
    tensor : Tensor
        2- or 3-way tensor; GEMMs run in its dtype on its device.
    factors : list of Tensor
        Starting factors (I_n, R), e.g. balanced EPC factors.
    grid_factory : GridFactory
        Estimates a grid from a tensor (per tensor, per factor update) and returns its
        projector.
    max_outer : int
        Outer (mode-sweep) iterations at most.
    max_inner : int
        Inner ADMM steps per factor update at most.
    tol_inner : float
        Primal/dual residual threshold of the inner loop.
    tol_outer : float
        Relative improvement of the best quantized error that counts as progress.
    patience : int
        Stop after this many outer iterations without progress.
    divergence_factor : float
        Stop (and warn) when the error exceeds this multiple of the best one, or is not finite.
    relaxation : float
        Over-relaxation of the inner steps (see :func:`admm_factor_update`); 1 for none.

    Returns
    -------
    ADMMResult
        The best quantized iterate and diagnostics.
    """
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError("tensor has non-finite entries")
    if not 0.0 < relaxation < 2.0:
        raise ValueError(f"relaxation must be in (0, 2), got {relaxation}")
    dt = tensor.dtype
    plan = MttkrpPlan(tensor)
    grids = [grid_factory(f.to(dt)) for f in factors]
    current = [g(f.to(dt)) for g, f in zip(grids, factors)]
    duals = [torch.zeros_like(f) for f in current]
    best_factors, best_grids = list(current), list(grids)
    best_err = relative_error(tensor, current)
    history = [best_err]
    best_it, stale, inner_total, diverged = 0, 0, 0, False
    grams = [gram(f) for f in current]
    it = 0
    last = len(current) - 1
    with small_linalg_threads(grams[0]):
        for it in range(1, max_outer + 1):
            err = math.nan
            try:
                for n in range(len(current)):
                    mttkrp = plan.mttkrp(current, n)
                    h, duals[n], grids[n], steps = admm_factor_update(
                        current[n], duals[n], mttkrp, hadamard_except(grams, n), grid_factory,
                        max_iter=max_inner, tol=tol_inner, relaxation=relaxation,
                    )
                    inner_total += steps
                    current[n] = h
                    grams[n] = gram(h)
                    if not bool(torch.isfinite(grams[n]).all()):
                        raise torch.linalg.LinAlgError(f"factor {n} is not finite")
                err = fit_error(plan, (mttkrp.double() * current[last].double()).sum(), grams)
            except torch.linalg.LinAlgError:
                pass  # a broken factor: reported below as divergence
            history.append(err)
            if not math.isfinite(err) or err > divergence_factor * best_err:
                diverged = True
                warnings.warn(
                    f"ADMM diverged at outer iteration {it} (error {err:.4g}, best {best_err:.4g});"
                    " returning the best iterate",
                    RuntimeWarning,
                    stacklevel=2,
                )
                break
            if err < best_err * (1.0 - tol_outer):
                stale = 0
            else:
                stale += 1
            if err < best_err:
                best_err, best_it = err, it
                best_factors, best_grids = list(current), list(grids)
            if stale >= patience:
                break
    return ADMMResult(
        best_factors,
        best_grids,
        relative_error(tensor, best_factors),
        it,
        best_it,
        inner_total,
        diverged,
        history,
    )
