"""Error-Preserving Correction (EPC) of a CP decomposition (Phan et al., 2019).

Given a CP approximation with error ``delta``, EPC solves

    min ||lambda||^2  s.t.  ||W - [[lambda; U_1, ..., U_N]]||_F <= delta,  ||u_r^(n)|| = 1

one factor at a time. With the other factors fixed and ``X = U_n diag(lambda)`` the block
problem is ``min ||X||_F^2 s.t. ||W_(n) - X K^T||^2 <= delta^2`` (K the Khatri-Rao product of
the other factors), a least-squares problem on a sphere. With ``Gamma = K^T K = V diag(s) V^T``
and ``Z = W_(n) K V`` its solution is ``X = Z diag(t) V^T``, ``t_r = mu / (1 + mu s_r)``, where
the multiplier ``mu > 0`` solves the secular equation

    g(mu) = ||W||^2 + sum_r ||z_r||^2 (s_r t_r^2 - 2 t_r) = delta^2.

``g`` is convex and decreasing in ``mu``, so Newton's method started left of the root converges
monotonically. EPC bounds the norms of the rank-1 terms, which removes the huge dynamic range
of ALS factors that makes them impossible to quantize per tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from qaf.decomp.cp import MttkrpPlan, hadamard_except, relative_error, small_linalg_threads

#: Version of the numerics of EPC: part of every cache key of their results. Bump it with
#: any change that can change a result (tests/test_cache.py fails until the bump is recorded).
VERSION = 2

__all__ = ["EPCResult", "cp_epc", "solve_secular"]


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


def solve_secular(
    zsq: Tensor, s: Tensor, norm_sq: float, delta_sq: float, mu0: float = 0.0, max_iter: int = 200
) -> float:
    """Solve ``g(mu) = delta^2`` for the sphere-constrained least-squares block.

    Parameters
    ----------
    zsq : Tensor
        ``||z_r||^2`` per eigen-direction (float64).
    s : Tensor
        Eigenvalues of ``Gamma`` (float64, >= 0).
    norm_sq : float
        ``||W||_F^2``.
    delta_sq : float
        Target squared error.
    mu0 : float
        A starting point known to lie left of the root (``g(mu0) >= delta^2``), e.g. 0.
    max_iter : int
        Newton steps at most.

    Returns
    -------
    float
        The multiplier ``mu``; ``inf`` if even the unconstrained least-squares solution misses
        ``delta`` (then the caller takes the least-squares solution).
    """
    pos = s > 0
    ls_err = norm_sq - float((zsq[pos] / s[pos]).sum())
    unbounded = bool((zsq[~pos] > 0).any())  # g -> -inf along a null direction of Gamma
    if ls_err >= delta_sq and not unbounded:
        return math.inf

    def g_and_dg(mu: float) -> tuple[float, float]:
        d = 1.0 + mu * s
        t = mu / d
        g = norm_sq + float((zsq * (s * t * t - 2.0 * t)).sum())
        dg = -2.0 * float((zsq / d.pow(3)).sum())
        return g, dg

    mu = mu0
    g, dg = g_and_dg(mu)
    if g < delta_sq:  # the warm start overshot: restart from the safe side
        mu = 0.0
        g, dg = g_and_dg(mu)
    for _ in range(max_iter):
        step = (g - delta_sq) / -dg
        mu_new = mu + step
        if step <= 1e-14 * max(mu_new, 1e-300):
            return mu_new
        mu = mu_new
        g, dg = g_and_dg(mu)
    return mu


def cp_epc(
    tensor: Tensor,
    factors: list[Tensor],
    delta: float | None = None,
    *,
    n_iter: int = 50,
    tol: float = 1e-4,
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
    grams = [u.T @ u for u in units]
    mus = [0.0] * len(factors)
    history: list[float] = []
    it = 0
    for it in range(1, n_iter + 1):
        for n in range(len(factors)):
            gamma = hadamard_except(grams, n)
            with small_linalg_threads(gamma):
                s, v = torch.linalg.eigh(gamma)
            s = s.clamp_min(0.0)
            z = plan.mttkrp(work, n).double() @ v
            zsq = z.pow(2).sum(0)
            mu = solve_secular(zsq, s, plan.norm_sq, delta_sq, mus[n])
            if math.isinf(mu):
                t = torch.where(s > 1e-12 * s.max(), 1.0 / s, torch.zeros_like(s))
            else:
                t = mu / (1.0 + mu * s)
                mus[n] = mu * 0.5  # a warm start that stays left of the next root
            x = (z * t) @ v.T
            lam = torch.linalg.vector_norm(x, dim=0).clamp_min(1e-300)
            units[n] = x / lam
            work[n] = units[n].to(dt)
            grams[n] = units[n].T @ units[n]
        history.append(float(torch.linalg.vector_norm(lam)))
        if it > 1 and abs(history[-2] - history[-1]) < tol * history[-2]:
            break
    root = lam.pow(1.0 / len(factors))
    out = [(u * root).to(dt) for u in units]
    return EPCResult(out, lam, relative_error(tensor, out), it, history)
