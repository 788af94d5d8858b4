"""Error-Preserving Correction (EPC) of a CP decomposition (Phan et al., 2019).

Given a CP approximation with error ``delta``, EPC solves

    min ||lambda||^2  s.t.  ||W - [[lambda; U_1, ..., U_N]]||_F <= delta,  ||u_r^(n)|| = 1

one factor at a time. With the other factors fixed and ``X = U_n diag(lambda)`` the block
problem is ``min ||X||_F^2 s.t. ||W_(n) - X K^T||^2 <= delta^2`` (K the Khatri-Rao product of
the other factors), a least-squares problem on a sphere. With ``Gamma = K^T K`` and
``F = W_(n) K`` its solution is ``X = F (Gamma + I / mu)^-1``, where the multiplier ``mu > 0``
solves the secular equation (in Gamma's eigenbasis ``Gamma = V diag(s) V^T``, ``Z = F V``)

    g(mu) = ||W||^2 + sum_r ||z_r||^2 (s_r t_r^2 - 2 t_r) = delta^2,   t_r = mu / (1 + mu s_r).

:func:`epc_block` evaluates ``g`` by Cholesky factorizations of ``Gamma + I / mu`` instead of
the eigendecomposition, and finds the root by Newton's method on ``(g - g_ls)^(-1/2)``.

EPC bounds the norms of the rank-1 terms, which removes the huge dynamic range of ALS factors
that makes them impossible to quantize per tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from qaf.decomp.cp import (
    MttkrpPlan,
    gram,
    hadamard_except,
    relative_error,
    small_linalg_threads,
    spd_cholesky,
)

#: Version of the numerics of EPC: part of every cache key of their results. Bump it with
#: any change that can change a result (tests/test_cache.py fails until the bump is recorded).
VERSION = 4

__all__ = ["EPCResult", "cp_epc", "epc_block", "epc_step"]

#: Largest relative change of the multiplier :func:`epc_step` accepts from its prediction.
ONE_STEP_MAX = 0.5


@dataclass
class EPCResult:
    """Outcome of :func:`cp_epc`.

    Attributes
    ----------
    factors : list of Tensor
        Factors with the weights folded in evenly (column r of every factor has norm
        ``lambda_r^(1/N)``), in the input tensor's dtype.
    weights : Tensor
        The final ``lambda`` (float64).
    error : float
        Exact relative error of the returned factors.
    iterations : int
        Sweeps run.
    history : list of float
        ``||lambda||`` after each sweep.
    """

    factors: list[Tensor]
    weights: Tensor
    error: float
    iterations: int
    history: list[float] = field(default_factory=list)


def _solves(chol: Tensor, rhs_t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``L^-1 F^T``, ``M^-1 F^T`` and ``L^-1 M^-1 F^T`` for ``M = L L^T`` (three triangular solves)."""
    y = torch.linalg.solve_triangular(chol, rhs_t, upper=False)
    x = torch.linalg.solve_triangular(chol.T, y, upper=True)
    return y, x, torch.linalg.solve_triangular(chol, x, upper=False)


def epc_block(
    mttkrp: Tensor,
    gamma: Tensor,
    norm_sq: float,
    delta_sq: float,
    mu0: float = 0.0,
    *,
    step_tol: float = 1e-4,
    max_evals: int = 50,
) -> tuple[Tensor, float, int]:
    """Solve one EPC block, ``min ||X||^2 s.t. ||W_(n) - X K^T||^2 = delta^2``, by Cholesky solves.

    The solution is ``X = F (Gamma + I / mu)^-1`` for the root ``mu`` of the secular equation
    ``g(mu) = delta^2``. With ``M = Gamma + I / mu = L L^T``, ``Y = F L^-T`` and ``X = Y L^-1``:

        g(mu) = ||W||^2 - ||Y||^2 - ||X||^2 / mu,    g'(mu) = -2 ||X L^-T||^2 / mu^3,

    so each evaluation is one Cholesky factorization and three triangular solves, several times
    cheaper than the eigendecomposition of ``Gamma`` it replaces. In the eigenbasis
    ``g(mu) - g_ls = sum_r c_r / (1 + mu s_r)^2`` (``g_ls`` the least-squares residual), so
    ``psi(mu) = (g(mu) - g_ls)^(-1/2)`` is concave and increasing, and nearly linear: Newton's
    method on ``psi`` (the trust-region subproblem's secular equation, More and Sorensen 1983)
    needs about two evaluations from the previous sweep's ``mu``. Once the Newton step is below
    ``step_tol * mu``, ``X`` is moved to the root by its first-order correction
    ``dX/dmu = M^-1 X / mu^2``.

    Parameters
    ----------
    mttkrp : Tensor
        ``F = W_(n) K`` (I, R), any float dtype; the solves run in float64.
    gamma : Tensor
        ``Gamma = K^T K`` (R, R), symmetric positive semidefinite.
    norm_sq : float
        ``||W||_F^2``.
    delta_sq : float
        Target squared error.
    mu0 : float
        Starting multiplier (e.g. the root of this mode's previous block); 0 for none.
    step_tol : float
        Relative Newton step below which the root is reached by the first-order correction.
    max_evals : int
        Evaluations (Cholesky factorizations) at most.

    Returns
    -------
    tuple
        ``(X, mu, evaluations)``: the block solution (I, R) in float64, the multiplier (``inf``
        when even the least-squares solution misses ``delta``: ``X`` is then that solution) and
        the number of evaluations of ``g``.
    """
    f_t = mttkrp.double().T  # (R, I): triangular solves take the right-hand sides as columns
    with small_linalg_threads(gamma):
        chol = spd_cholesky(gamma)
        y = torch.linalg.solve_triangular(chol, f_t, upper=False)
        ls = norm_sq - float(y.pow(2).sum())
        if ls >= delta_sq:
            return torch.linalg.solve_triangular(chol.T, y, upper=True).T, math.inf, 0
        target = (delta_sq - ls) ** -0.5
        # Newton from mu = 0 (g = ||W||^2, g' = -2 ||F||^2) lands left of the root: psi is concave.
        gap0 = norm_sq - ls
        mu_left = (target - gap0**-0.5) / (gap0**-1.5 * float(f_t.pow(2).sum()))
        mu, evals = max(mu0, mu_left), 0
        while True:
            evals += 1
            shifted = gamma.clone()
            shifted.diagonal().add_(1.0 / mu)
            chol = spd_cholesky(shifted)
            y, x, z = _solves(chol, f_t)
            gap = norm_sq - float(y.pow(2).sum()) - float(x.pow(2).sum()) / mu - ls
            if gap > 0.0:
                step = (target - gap**-0.5) / (gap**-1.5 * float(z.pow(2).sum()) / mu**3)
            else:  # rounding at the least-squares end, far right of the root: back to the safe side
                step = mu_left - mu
            if abs(step) <= step_tol * mu or evals == max_evals:
                x = x + (step / mu**2) * torch.linalg.solve_triangular(chol.T, z, upper=True)
                return x.T, mu + step, evals
            # From the right of the root, the tangent of the concave psi may overshoot past mu_left.
            mu = max(mu + step, mu_left)


def epc_step(
    mttkrp: Tensor,
    gamma: Tensor,
    norm_sq: float,
    delta_sq: float,
    mu: float,
    *,
    max_step: float = ONE_STEP_MAX,
) -> tuple[Tensor, float] | None:
    """One EPC block by a single Newton step on ``g`` from a predicted multiplier.

    ``g`` and ``g'`` are evaluated at ``mu`` as in :func:`epc_block` (one Cholesky factorization,
    three triangular solves), the Newton step ``d = (g(mu) - delta^2) / -g'(mu)`` is taken and ``X``
    is moved to ``mu + d`` by its first-order correction. The constraint then holds up to a term in
    ``d^2``; the next sweep starts from there, so across sweeps the errors do not add up.

    Parameters
    ----------
    mttkrp, gamma, norm_sq, delta_sq
        As in :func:`epc_block`.
    mu : float
        Predicted multiplier (> 0).
    max_step : float
        Largest accepted ``|d| / mu``: a prediction further off returns None.

    Returns
    -------
    tuple or None
        ``(X, mu + d)`` (X (I, R) in float64), or None when the step is too large or not finite
        (solve the block with :func:`epc_block` instead).
    """
    f_t = mttkrp.double().T
    with small_linalg_threads(gamma):
        shifted = gamma.clone()
        shifted.diagonal().add_(1.0 / mu)
        chol = spd_cholesky(shifted)
        y, x, z = _solves(chol, f_t)
        g = norm_sq - float(y.pow(2).sum()) - float(x.pow(2).sum()) / mu
        step = (g - delta_sq) * mu**3 / (2.0 * float(z.pow(2).sum()))
        if not abs(step) <= max_step * mu:  # also catches NaN
            return None
        x = x + (step / mu**2) * torch.linalg.solve_triangular(chol.T, z, upper=True)
        return x.T, mu + step


def cp_epc(
    tensor: Tensor,
    factors: list[Tensor],
    delta: float | None = None,
    *,
    n_iter: int = 50,
    tol: float = 1e-4,
    one_step: bool = False,
) -> EPCResult:
    """Error-preserving correction of CP factors.

    Parameters
    ----------
    tensor : Tensor
        2- or 3-way tensor; MTTKRPs run in its dtype, the block solves in float64.
    factors : list of Tensor
        Starting CP factors (e.g. from :func:`qaf.decomp.cp.cp_als`); column norms are taken
        as the starting ``lambda``.
    delta : float, optional
        Absolute error bound ``||W - [[...]]||_F``; default: the error of ``factors``.
    n_iter : int
        Maximum sweeps over the modes.
    tol : float
        Stop when ``||lambda||`` changes by less than ``tol`` (relative) between sweeps.
    one_step : bool
        From the third sweep on, solve each block by :func:`epc_step` from the multiplier
        extrapolated geometrically from its last two roots (one evaluation instead of about two;
        a block whose step is too large is solved fully). Not solved to convergence, each block
        still lowers ``||lambda||`` at the same error: at rank 943 the sweeps cost half and
        ``||lambda||`` after 50 of them is the same to 3e-5 (docs/qaf_solvers.md).

    Returns
    -------
    EPCResult
        Corrected factors with ``lambda`` folded in evenly, and diagnostics.
    """
    dt = tensor.dtype
    norm_w = float(torch.linalg.vector_norm(tensor.double()))
    if delta is None:
        delta = relative_error(tensor, factors) * norm_w
    delta_sq = float(delta) ** 2
    plan = MttkrpPlan(tensor)
    f64 = [f.double() for f in factors]
    norms = [torch.linalg.vector_norm(f, dim=0).clamp_min(1e-300) for f in f64]
    lam = torch.stack(norms).prod(0)
    units = [f / n for f, n in zip(f64, norms)]
    work = [u.to(dt) for u in units]
    grams = [gram(w) for w in work]  # in the GEMM dtype, like the MTTKRPs they are solved against
    roots: list[list[float]] = [[] for _ in factors]  # each mode's multipliers, last two kept
    history: list[float] = []
    it = 0
    with small_linalg_threads(grams[0]):
        for it in range(1, n_iter + 1):
            for n in range(len(factors)):
                mttkrp, gamma = plan.mttkrp(work, n), hadamard_except(grams, n)
                prev = roots[n]
                done = None
                if one_step and len(prev) == 2:
                    done = epc_step(mttkrp, gamma, plan.norm_sq, delta_sq, prev[1] ** 2 / prev[0])
                if done is None:
                    # Roots move a few percent between sweeps: the last one is the next start.
                    x, mu, _ = epc_block(mttkrp, gamma, plan.norm_sq, delta_sq, prev[-1] if prev else 0.0)
                else:
                    x, mu = done
                if math.isfinite(mu):
                    roots[n] = [*prev[-1:], mu]
                lam = torch.linalg.vector_norm(x, dim=0).clamp_min(1e-300)
                units[n] = x / lam
                work[n] = units[n].to(dt)
                grams[n] = gram(work[n])
            history.append(float(torch.linalg.vector_norm(lam)))
            if it > 1 and abs(history[-2] - history[-1]) < tol * history[-2]:
                break
    root = lam.pow(1.0 / len(factors))
    out = [(u * root).to(dt) for u in units]
    return EPCResult(out, lam, relative_error(tensor, out), it, history)
