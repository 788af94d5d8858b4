"""CP (CANDECOMP/PARAFAC) building blocks: ranks, reshapes, MTTKRP, reconstruction and ALS.

A conv weight (Cout, Cin, kh, kw) is treated as the 3-way tensor (Cout, Cin, kh*kw); a 1x1 conv
or a linear weight as the matrix (Cout, Cin). Factors are lists of (I_n, R) matrices. All
functions run on the tensors' device and dtype; the small R x R algebra (Gram matrices, their
Cholesky factors) is done in float64 because it is cheap and decides the accuracy.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

#: Version of the numerics of ALS and the SVD/random inits: part of every cache key of their results. Bump it with
#: any change that can change a result (tests/test_cache.py fails until the bump is recorded).
VERSION = 3

__all__ = [
    "CPResult",
    "MttkrpPlan",
    "balance_factors",
    "cp_als",
    "cp_norm_sq",
    "cp_rank",
    "cp_to_tensor",
    "init_factors",
    "max_rate",
    "relative_error",
    "spd_right_solver",
    "weight_to_tensor",
]


def weight_to_tensor(weight: Tensor) -> Tensor:
    """Reshape a conv or linear weight into the tensor that is factorized.

    Parameters
    ----------
    weight : Tensor
        Conv weight (Cout, Cin, kh, kw) or linear weight (Cout, Cin).

    Returns
    -------
    Tensor
        (Cout, Cin, kh*kw) for a conv with kh*kw > 1, else the matrix (Cout, Cin).
    """
    if weight.dim() == 2:
        return weight
    if weight.dim() != 4:
        raise ValueError(f"expected a 2-D or 4-D weight, got shape {tuple(weight.shape)}")
    cout, cin, kh, kw = weight.shape
    if kh * kw == 1:
        return weight.reshape(cout, cin)
    return weight.reshape(cout, cin, kh * kw)


def cp_rank(shape: tuple[int, ...] | torch.Size, rate: float) -> int:
    """Rank that reduces the parameter count of a tensor by ``rate``.

    Parameters
    ----------
    shape : tuple of int
        Shape of the tensor being factorized (see :func:`weight_to_tensor`).
    rate : float
        Parameter reduction factor, > 0.

    Returns
    -------
    int
        ``floor(prod(shape) / sum(shape) / rate)``; may be 0 when ``rate`` is too large.
    """
    return int(math.floor(math.prod(shape) / sum(shape) / rate))


def max_rate(shape: tuple[int, ...] | torch.Size) -> float:
    """Largest rate for which :func:`cp_rank` is still >= 1."""
    return math.prod(shape) / sum(shape)


def cp_to_tensor(factors: list[Tensor]) -> Tensor:
    """Reconstruct the full tensor ``[[U_1, ..., U_N]]`` (N = 2 or 3).

    Parameters
    ----------
    factors : list of Tensor
        Factor matrices (I_n, R).

    Returns
    -------
    Tensor
        The (I_1, ..., I_N) tensor. The 3-way case is K batched GEMMs, never materializing an
        (I*J, R) Khatri-Rao product.
    """
    if len(factors) == 2:
        return factors[0] @ factors[1].T
    if len(factors) != 3:
        raise ValueError("only 2- and 3-way CP is supported")
    a, b, c = factors
    slices = (a.unsqueeze(0) * c.unsqueeze(1)) @ b.T  # (K, I, J)
    return slices.permute(1, 2, 0)


def relative_error(tensor: Tensor, factors: list[Tensor]) -> float:
    """Exact ``||T - [[factors]]||_F / ||T||_F``, computed in float64."""
    t64 = tensor.detach().double()
    rec = cp_to_tensor([f.detach().double() for f in factors])
    return float(torch.linalg.vector_norm(t64 - rec) / torch.linalg.vector_norm(t64))


def cp_norm_sq(grams: list[Tensor]) -> Tensor:
    """``||[[U_1..U_N]]||_F^2`` from the factors' Gram matrices (no reconstruction)."""
    had = grams[0]
    for g in grams[1:]:
        had = had * g
    return had.sum()


@contextlib.contextmanager
def small_linalg_threads(matrix: Tensor, limit: int = 384) -> Iterator[None]:
    """Run the work of a small rank (R x R factorizations, GEMMs with R columns) on one CPU thread.

    ``matrix`` is any tensor whose last dimension is the rank. Measured on 2 shared cores:
    ``eigh`` of a 134 x 134 matrix takes 0.9 ms on one thread and 22 ms on two when the other
    core is busy (thread contention), and 8 AO-ADMM sweeps of a rank-134 ResNet-20 layer 1.0 s
    against 4.5 s; so small-rank solves are pinned to one thread, large ones keep all threads.
    """
    if matrix.device.type != "cpu" or matrix.shape[-1] > limit:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def spd_cholesky(matrix: Tensor, max_tries: int = 8) -> Tensor:
    """Float64 Cholesky factor of a symmetric positive (semi)definite matrix.

    If the factorization fails, a diagonal jitter growing by 100x per try (starting at
    1e-12 * mean diagonal) is added, so rank-deficient Gram matrices do not crash a solve.

    Parameters
    ----------
    matrix : Tensor
        (R, R) symmetric matrix, any float dtype.
    max_tries : int
        Number of jitter levels tried before giving up.

    Returns
    -------
    Tensor
        Lower-triangular float64 L with ``L L^T = matrix + jitter I``.
    """
    m = matrix.double()  # LAPACK reads the lower triangle only: no symmetrizing copy needed
    scale = float(m.diagonal().abs().mean().clamp_min(1e-300))
    for attempt in range(max_tries):
        with small_linalg_threads(m):
            chol, info = torch.linalg.cholesky_ex(m)
        if int(info) == 0:
            return chol
        m = matrix.double().clone()
        m.diagonal().add_(scale * 1e-12 * 100.0**attempt)
    raise torch.linalg.LinAlgError("Gram matrix is not positive definite even with jitter")


def gram(factor: Tensor) -> Tensor:
    """``U^T U`` computed in the factor's dtype (a GEMM), returned in float64."""
    return (factor.T @ factor).double()


def spd_right_solver(
    matrix: Tensor, rows: int, dtype: torch.dtype, *, reuse: bool = False
) -> Callable[[Tensor], Tensor]:
    """``rhs -> rhs @ matrix^-1`` for (rows, R) right-hand sides, from one Cholesky factorization.

    The Cholesky factor of the symmetric positive definite ``matrix`` is always computed in
    float64 (Hadamard products of Grams are badly conditioned). Few right-hand sides (rows < R/4,
    e.g. the kernel mode) are then solved in float64. Many are solved with the factor cast to
    ``dtype``: for one use, two triangular solves cost less than forming the inverse (at R = 1141
    about a third less per mode) at the same accuracy as multiplying by a cast inverse; for
    repeated use (``reuse``) the inverse is formed once in ``dtype`` and each call is one GEMM
    (at R = 1903, 512 rows: 0.06 s against 0.08 s for the two solves, the inverse 0.09 s).

    Parameters
    ----------
    matrix : Tensor
        (R, R) symmetric positive (semi)definite matrix (jittered if singular, see
        :func:`spd_cholesky`).
    rows : int
        Rows of the right-hand sides the solver will see.
    dtype : torch.dtype
        Dtype of the right-hand sides and of the results.
    reuse : bool
        The solver will be called many times (about 5 or more) with the same matrix.

    Returns
    -------
    callable
        Maps an (rows, R) tensor to ``rhs @ matrix^-1``.
    """
    chol = spd_cholesky(matrix)
    if 4 * rows < matrix.shape[0]:
        return lambda rhs: torch.cholesky_solve(rhs.double().T, chol).T.to(dtype)
    chol_dt = chol.to(dtype)
    if reuse:
        inverse = torch.cholesky_inverse(chol_dt)
        return lambda rhs: rhs @ inverse
    return lambda rhs: torch.cholesky_solve(rhs.T, chol_dt).T


class MttkrpPlan:
    """Matricized-tensor-times-Khatri-Rao products of one fixed 2- or 3-way tensor.

    For a 3-way tensor W (I, J, K) the mode products are built from two GEMMs:
    ``P_B = W_(ik, j) @ B`` (I, K, R) gives both ``F_A = sum_k P_B C`` and ``F_C = sum_i P_B A``;
    ``P_A = W_(jk, i) @ A`` (J, K, R) gives ``F_B``. A partial product is reused as long as the
    factor it was built from is the same object (factors are never modified in place), so an
    A, B, C sweep costs two GEMMs instead of three.

    Parameters
    ----------
    tensor : Tensor
        The 2- or 3-way tensor; its dtype is the GEMM dtype.
    """

    def __init__(self, tensor: Tensor):
        if tensor.dim() not in (2, 3):
            raise ValueError("MttkrpPlan supports 2- and 3-way tensors")
        self.tensor = tensor
        self.norm_sq = float(tensor.double().pow(2).sum())
        if tensor.dim() == 3:
            i, j, k = tensor.shape
            self._w_ik_j = tensor.permute(0, 2, 1).reshape(i * k, j).contiguous()
            self._w_jk_i = tensor.permute(1, 2, 0).reshape(j * k, i).contiguous()
        self._partial: dict[int, tuple[Tensor, Tensor]] = {}

    def _partial_over(self, mode: int, factor: Tensor) -> Tensor:
        """W contracted with ``factor`` along ``mode`` (0 or 1), cached per factor object."""
        hit = self._partial.get(mode)
        if hit is not None and hit[0] is factor:
            return hit[1]
        i, j, k = self.tensor.shape
        if mode == 1:
            out = (self._w_ik_j @ factor).view(i, k, -1)
        else:
            out = (self._w_jk_i @ factor).view(j, k, -1)
        self._partial[mode] = (factor, out)
        return out

    def mttkrp(self, factors: list[Tensor], mode: int) -> Tensor:
        """The MTTKRP of ``mode``: ``W_(mode) (Khatri-Rao of the other factors)``, (I_mode, R)."""
        if self.tensor.dim() == 2:
            other = factors[1 - mode]
            return self.tensor @ other if mode == 0 else self.tensor.T @ other
        a, b, c = factors
        # Broadcast-multiply-and-sum: 15x faster than torch.einsum here, which routes these
        # reductions through a batched matmul with batch R.
        if mode == 0:
            return (self._partial_over(1, b) * c.unsqueeze(0)).sum(1)
        if mode == 1:
            return (self._partial_over(0, a) * c.unsqueeze(0)).sum(1)
        return (self._partial_over(1, b) * a.unsqueeze(1)).sum(0)


def hadamard_except(grams: list[Tensor], mode: int) -> Tensor:
    """Hadamard product of all Gram matrices except ``grams[mode]``."""
    out = None
    for n, g in enumerate(grams):
        if n != mode:
            out = g.clone() if out is None else out * g
    assert out is not None
    return out


def init_factors(
    tensor: Tensor, rank: int, init: str = "svd", generator: torch.Generator | None = None
) -> list[Tensor]:
    """Starting factors for CP.

    Parameters
    ----------
    tensor : Tensor
        2- or 3-way tensor.
    rank : int
        CP rank R >= 1.
    init : {"svd", "random"}
        ``"svd"``: leading left singular vectors of each unfolding scaled by
        ``(sigma_1)^(1/N)``, padded with small random columns when I_n < R. ``"random"``:
        standard normal entries scaled so that the CP norm is about ``||T||``.
    generator : torch.Generator, optional
        CPU generator for the random parts (results are identical on every device).

    Returns
    -------
    list of Tensor
        One (I_n, R) matrix per mode, on the tensor's device and dtype.
    """
    if init not in ("svd", "random"):
        raise ValueError(f"init={init!r} is invalid: accepted 'svd', 'random'")
    n_modes = tensor.dim()
    dev, dt = tensor.device, tensor.dtype
    rand = [
        torch.randn(s, rank, generator=generator, dtype=torch.float64) for s in tensor.shape
    ]
    norm = float(torch.linalg.vector_norm(tensor.double()))
    if init == "random":
        scale = (norm / math.sqrt(rank)) ** (1.0 / n_modes) / math.sqrt(
            math.prod(tensor.shape) ** (1.0 / n_modes)
        )
        return [(r * scale).to(dev, dt) for r in rand]
    factors = []
    for n, s in enumerate(tensor.shape):
        unfold = tensor.double().movedim(n, 0).reshape(s, -1)
        u, sv, _ = torch.linalg.svd(unfold, full_matrices=False)
        k = min(rank, u.shape[1])
        col_scale = float(sv[0]) ** (1.0 / n_modes)
        f = rand[n].to(dev) * (col_scale / math.sqrt(s)) * 1e-2
        f[:, :k] = u[:, :k] * col_scale
        factors.append(f.to(dt))
    return factors


def balance_factors(factors: list[Tensor]) -> list[Tensor]:
    """Rescale columns so that every factor's column r has the same norm ``lambda_r^(1/N)``.

    The CP tensor is unchanged; the factors' dynamic ranges become comparable, which is what
    per-tensor quantization of each factor needs.
    """
    norms = [torch.linalg.vector_norm(f.double(), dim=0) for f in factors]
    lam = torch.stack(norms).prod(0)
    target = lam.pow(1.0 / len(factors))
    out = []
    for f, nrm in zip(factors, norms):
        s = torch.where(nrm > 0, target / nrm.clamp_min(1e-300), torch.zeros_like(nrm))
        out.append((f.double() * s).to(f.dtype))
    return out


@dataclass
class CPResult:
    """Outcome of a CP solver.

    Attributes
    ----------
    factors : list of Tensor
        Factor matrices (I_n, R).
    error : float
        Relative reconstruction error at the returned factors.
    iterations : int
        Outer iterations run.
    history : list of float
        Relative error after each iteration (cheap Gram-based estimate).
    """

    factors: list[Tensor]
    error: float
    iterations: int
    history: list[float] = field(default_factory=list)


def fit_error(plan: MttkrpPlan, inner: Tensor, grams: list[Tensor]) -> float:
    """Relative error from ``<W, [[U]]>`` and the Grams, without reconstruction."""
    res = plan.norm_sq - 2.0 * float(inner) + float(cp_norm_sq(grams))
    if not math.isfinite(res):
        return math.nan
    return math.sqrt(max(res, 0.0) / plan.norm_sq)


def cp_als(
    tensor: Tensor,
    rank: int,
    *,
    n_iter: int = 100,
    tol: float = 1e-7,
    init: str | list[Tensor] = "svd",
    generator: torch.Generator | None = None,
) -> CPResult:
    """CP decomposition by alternating least squares.

    Parameters
    ----------
    tensor : Tensor
        2- or 3-way tensor; GEMMs run in its dtype on its device.
    rank : int
        CP rank R >= 1.
    n_iter : int
        Maximum number of sweeps over the modes.
    tol : float
        Stop when the relative error changes by less than ``tol`` between sweeps.
    init : str or list of Tensor
        ``"svd"``, ``"random"`` (see :func:`init_factors`) or explicit starting factors.
    generator : torch.Generator, optional
        Seeds the random parts of the initialization.

    Returns
    -------
    CPResult
        Balanced factors (see :func:`balance_factors`) and their exact relative error.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError("tensor has non-finite entries")
    factors = (
        [f.to(tensor.device, tensor.dtype) for f in init]
        if isinstance(init, list)
        else init_factors(tensor, rank, init, generator)
    )
    plan = MttkrpPlan(tensor)
    grams = [gram(f) for f in factors]
    history: list[float] = []
    it = 0
    with small_linalg_threads(grams[0]):
        for it in range(1, n_iter + 1):
            for n in range(len(factors)):
                rhs = plan.mttkrp(factors, n)
                factors[n] = spd_right_solver(hadamard_except(grams, n), rhs.shape[0], rhs.dtype)(rhs)
                grams[n] = gram(factors[n])
            mttkrp = plan.mttkrp(factors, len(factors) - 1)  # cached partial: no extra GEMM
            last = len(factors) - 1
            history.append(fit_error(plan, (mttkrp.double() * factors[last].double()).sum(), grams))
            if it > 1 and abs(history[-2] - history[-1]) < tol:
                break
    factors = balance_factors(factors)
    return CPResult(factors, relative_error(tensor, factors), it, history)
