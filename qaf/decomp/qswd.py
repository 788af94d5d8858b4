"""QSWD: quantized sparse weight decomposition ``W ~ Z C`` (Kuzmin et al. 2022, arXiv 2207.11048).

A weight is cut into sub-vectors, the rows of a matrix W (n, d) (:func:`weight_to_matrix`), and
each row is approximated by a sparse combination of the atoms of a dictionary: ``W ~ Z C`` with
the dictionary C (k, d) on a uniform symmetric grid of ``dict_bits`` bits and the codes Z (n, k)
holding at most ``s`` non-zeros per row, on a grid of ``code_bits`` bits or fixed to 1.
Special cases of the same problem:

- ``s = k``, float factors: truncated SVD (the SVD start is then already optimal);
- ``s = 1``, unit codes: vector quantization, solved exactly as k-means (Lloyd's algorithm);
- ``s < k``, float factors: sparse PCA / sparse coding (iterative hard thresholding inside).

Solver (:func:`qswd`): alternating projected gradient descent on ``f = 1/2 ||W - Z C||_F^2``.
Each block takes a gradient step of size ``1/L`` (``L`` the Lipschitz constant of that block's
gradient) evaluated at the projected point; the step is applied to a float "shadow" iterate which
is then projected, so steps smaller than half a grid step accumulate instead of rounding back to
the same point.  The Z projection (keep ``s`` entries per row, round them) is the exact Euclidean
projection onto the set of ``s``-sparse rows with grid values.  Grids are per tensor, fitted once
to the start with the MSE clip rule and then fixed, so every projection is onto a fixed set.
The exact error of the projected iterate is measured every iteration and the best one returned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.nn import functional as F

from qaf.decomp.cp import small_linalg_threads
from qaf.quant.uniform import Grid, check_scheme, make_grid

__all__ = [
    "BLOCKS",
    "QSWDResult",
    "kmeans_pp",
    "matrix_to_weight",
    "project_codes",
    "qswd",
    "sparse_product",
    "weight_to_matrix",
]

#: How a weight (Cout, Cin, kh, kw) is cut into sub-vectors (the rows of the factorized matrix).
#: Version of the QSWD solver's numerics: part of every cache key of its results (see qaf/decomp/cp.py).
VERSION = 1

BLOCKS = ("kernel", "row", "input")


def _check_block(block: str, dim: int) -> None:
    if block not in BLOCKS:
        raise ValueError(f"block={block!r} is invalid: accepted {', '.join(map(repr, BLOCKS))}")
    if dim not in (2, 4):
        raise ValueError(f"expected a 2-D (linear) or 4-D (conv) weight, got {dim}-D")
    if dim == 2 and block == "kernel":
        raise ValueError("a linear (2-D) weight has no kernel: accepted block 'row', 'input'")


def weight_to_matrix(weight: Tensor, block: str = "kernel") -> Tensor:
    """Cut a conv or linear weight into the sub-vectors that are factorized.

    Parameters
    ----------
    weight : Tensor
        Conv weight (Cout, Cin, kh, kw) or linear weight (Cout, Cin).
    block : {"kernel", "row", "input"}
        ``"kernel"``: one sub-vector per (out, in) pair, (Cout*Cin, kh*kw) (convs only);
        ``"row"``: one per output channel, (Cout, Cin*kh*kw);
        ``"input"``: one per input channel, (Cin, Cout*kh*kw).

    Returns
    -------
    Tensor
        The matrix W (n, d); :func:`matrix_to_weight` inverts it exactly.
    """
    _check_block(block, weight.dim())
    if block == "input":
        return weight.transpose(0, 1).reshape(weight.shape[1], -1)
    rows = weight.shape[0] * weight.shape[1] if block == "kernel" else weight.shape[0]
    return weight.reshape(rows, -1)


def matrix_to_weight(matrix: Tensor, shape: tuple[int, ...] | torch.Size, block: str = "kernel") -> Tensor:
    """Inverse of :func:`weight_to_matrix`.

    Parameters
    ----------
    matrix : Tensor
        (n, d) matrix of sub-vectors.
    shape : tuple of int
        Shape of the weight it came from.
    block : {"kernel", "row", "input"}
        The block it was cut with.

    Returns
    -------
    Tensor
        The weight of shape ``shape`` (contiguous).
    """
    shape = tuple(shape)
    _check_block(block, len(shape))
    if matrix.numel() != math.prod(shape):
        raise ValueError(f"a {tuple(matrix.shape)} matrix cannot form a weight of shape {shape}")
    if block == "input":
        return matrix.reshape(shape[1], shape[0], *shape[2:]).transpose(0, 1).contiguous()
    return matrix.reshape(shape)


def sparse_product(index: Tensor, values: Tensor, dictionary: Tensor) -> Tensor:
    """``Z C`` from the sparse codes: row i is ``sum_j values[i, j] * dictionary[index[i, j]]``.

    Parameters
    ----------
    index : Tensor
        (n, s) long atom indices.
    values : Tensor
        (n, s) code values.
    dictionary : Tensor
        (k, d) atoms.

    Returns
    -------
    Tensor
        (n, d); differentiable in ``values`` and ``dictionary`` (n s d work, no dense Z).
    """
    return torch.einsum("ns,nsd->nd", values, dictionary[index])


@dataclass
class QSWDResult:
    """Outcome of :func:`qswd`: ``W ~ Z C`` with sparse codes Z and dictionary C.

    Attributes
    ----------
    index : Tensor
        (n, s) long: the atom of each non-zero of Z, ascending per row.
    values : Tensor
        (n, s): the non-zero values of Z (dequantized, on ``code_grid``; ones for unit codes).
        A value may round to 0, so a row has at most ``s`` non-zeros.
    dictionary : Tensor
        (k, d): the atoms C (dequantized, on ``dict_grid``).
    code_grid, dict_grid : Grid or None
        Per-tensor symmetric grids of the code values and the dictionary (None: float).
    unit_codes : bool
        Whether the values are fixed to 1 (vector quantization; they cost 0 bits).
    error : float
        ``||W - Z C||_F / ||W||_F`` of the returned factors.
    iterations : int
        Iterations run (after the start).
    best_iteration : int
        Iteration the returned factors come from (0 = the projected start).
    history : list of float
        Relative error of the projected iterate per iteration (index 0: the start).
    """

    index: Tensor
    values: Tensor
    dictionary: Tensor
    code_grid: Grid | None
    dict_grid: Grid | None
    unit_codes: bool
    error: float
    iterations: int
    best_iteration: int
    history: list[float] = field(default_factory=list)

    def dense_codes(self) -> Tensor:
        """Z as a dense (n, k) matrix."""
        z = self.values.new_zeros(self.index.shape[0], self.dictionary.shape[0])
        return z.scatter_(1, self.index, self.values)

    def reconstruct(self) -> Tensor:
        """The approximation ``Z C`` (n, d)."""
        return sparse_product(self.index, self.values, self.dictionary)


class _Tracker:
    """Error history, best projected iterate and the stopping rule (shared by both solvers).

    Stops when the best error has not improved by a relative ``tol`` for ``patience`` iterations.
    """

    def __init__(self, w_norm: Tensor, tol: float, patience: int):
        self.w_norm, self.tol, self.patience = w_norm, tol, patience
        self.history: list[float] = []
        self.best_err = math.inf
        self.best_iteration = 0
        self.best: tuple[Tensor, ...] = ()
        self._stall = 0

    def update(self, residual: Tensor, state: tuple[Tensor, ...]) -> bool:
        """Record the iterate with residual ``Z C - W``; True when the solve should stop."""
        err = float(torch.linalg.vector_norm(residual) / self.w_norm)
        self.history.append(err)
        if not math.isfinite(err):  # a diverged step: keep the best so far and stop
            return True
        self._stall = 0 if err < self.best_err * (1.0 - self.tol) else self._stall + 1
        if err < self.best_err:
            self.best_err, self.best_iteration = err, len(self.history) - 1
            self.best = tuple(t.clone() for t in state)
        return self._stall >= self.patience

    def restart(self) -> None:
        """Give a new phase of the solve its full patience."""
        self._stall = 0

    @property
    def repeated(self) -> bool:
        """Whether the last error equals the one before (a fixed point of plain PGD)."""
        return len(self.history) > 1 and self.history[-1] == self.history[-2]


def _fit_grid(x: Tensor, bits: int | None) -> Grid | None:
    """Per-tensor symmetric grid fitted to ``x`` with the MSE clip rule (None for float)."""
    return None if bits is None else make_grid(x, bits, symmetric=True, clip="mse")


def _on_grid(x: Tensor, grid: Grid | None) -> Tensor:
    return x if grid is None else grid(x)


def _top_eigenvalue(gram: Tensor) -> Tensor:
    """Largest eigenvalue of a symmetric PSD matrix (float64 ``eigvalsh``), > 0, in its dtype."""
    with small_linalg_threads(gram):
        top = torch.linalg.eigvalsh(gram.double())[-1]
    return top.clamp_min(torch.finfo(torch.float64).tiny).to(gram.dtype)


def _dict_lipschitz(c: Tensor) -> Tensor:
    """``L_Z = ||C C^T||_2``, from the smaller of ``C C^T`` and ``C^T C``."""
    return _top_eigenvalue(c @ c.T if c.shape[0] <= c.shape[1] else c.T @ c)


def _code_lipschitz(index: Tensor, z: Tensor) -> Tensor:
    """``L_C = ||Z^T Z||_2``, with ``Z^T Z`` accumulated from the s non-zeros of each row.

    ``n s^2`` work instead of the ``n k^2`` of a dense GEMM (at n = 4096, k = 256, s = 2 the
    dense Gram took most of the iteration time).
    """
    k = z.shape[1]
    values = z.gather(1, index)
    pairs = (index[:, :, None] * k + index[:, None, :]).reshape(-1)
    gram = z.new_zeros(k * k).index_add_(0, pairs, (values[:, :, None] * values[:, None, :]).reshape(-1))
    return _top_eigenvalue(gram.view(k, k))


def project_codes(x: Tensor, s: int, grid: Grid | None) -> tuple[Tensor, Tensor, Tensor]:
    """Exact projection of each row of ``x`` onto s-sparse vectors with values on ``grid``.

    Keeping entry ``x`` as ``q = grid(x)`` instead of 0 lowers the squared distance by
    ``x^2 - (x - q)^2``; the best support is the ``s`` largest such gains (for float values, the
    ``s`` largest magnitudes: hard thresholding).  With a clamped signed grid this differs from
    ranking by magnitude: the code range -2^(b-1)..2^(b-1)-1 reaches further on the negative side.

    Parameters
    ----------
    x : Tensor
        (n, k) rows to project.
    s : int
        Non-zeros kept per row, 1..k.
    grid : Grid or None
        Grid of the kept values (None: float).

    Returns
    -------
    tuple of Tensor
        ``(index, z, shadow)``: the support (n, s) ascending per row, the projected dense codes
        (n, k), and ``x`` restricted to the support (the float shadow iterate, unrounded).
    """
    rounded = _on_grid(x, grid)
    gain = x.square() - (x - rounded).square()
    index = gain.topk(s, dim=1).indices.sort(dim=1).values
    z = torch.zeros_like(x).scatter_(1, index, rounded.gather(1, index))
    shadow = torch.zeros_like(x).scatter_(1, index, x.gather(1, index))
    return index, z, shadow


def _randn(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal draws from a CPU generator (identical on every device)."""
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(like.device, like.dtype)


def _svd_init(w: Tensor, k: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """``Z = U_k S_k^(1/2)``, ``C = S_k^(1/2) V_k^T``; atoms beyond the rank are random.

    The random atoms get the SVD atoms' mean norm and zero codes, so the start keeps the
    truncated-SVD error and the atoms are there for the sparse projection to pick.
    """
    u, sv, vh = torch.linalg.svd(w, full_matrices=False)
    r = min(k, sv.numel())
    root = sv[:r].sqrt()
    z = w.new_zeros(w.shape[0], k)
    z[:, :r] = u[:, :r] * root
    extra = _randn((k - r, w.shape[1]), w, generator)
    extra = extra * (root.mean() / torch.linalg.vector_norm(extra, dim=1, keepdim=True).clamp_min(1e-30))
    return z, torch.cat([vh[:r] * root[:, None], extra])


def _random_init(w: Tensor, k: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Gaussian factors scaled so that ``E ||Z C||_F^2 = ||W||_F^2``."""
    n, d = w.shape
    z, c = _randn((n, k), w, generator), _randn((k, d), w, generator)
    scale = (torch.linalg.vector_norm(w) ** 2 / (n * k * d)) ** 0.25
    return z * scale, c * scale


def kmeans_pp(matrix: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """k-means++ seeding: k rows of ``matrix``, each drawn with probability ~ D^2.

    Parameters
    ----------
    matrix : Tensor
        (n, d) data, n >= k.
    k : int
        Number of seeds.
    generator : torch.Generator, optional
        CPU generator; all k uniforms are drawn up front, so seeding is deterministic on any device.

    Returns
    -------
    Tensor
        (k, d) seeds (rows of ``matrix``). When fewer than k rows are distinct, the remaining
        seeds are drawn uniformly (D^2 is then all zero).
    """
    n = matrix.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} is invalid for k-means++ on {n} rows: accepted 1..{n}")
    uniforms = torch.rand(k, generator=generator, dtype=torch.float64).to(matrix.device)
    first = (uniforms[0] * n).long().clamp_max(n - 1)
    chosen = [first]
    d2 = (matrix - matrix[first]).square().sum(1).double()
    for j in range(1, k):
        # Inverse-CDF sampling on the device; an all-zero D^2 falls back to uniform weights.
        weights = torch.where(d2.sum() > 0, d2, torch.ones_like(d2))
        cdf = weights.cumsum(0)
        pick = torch.searchsorted(cdf, uniforms[j] * cdf[-1], right=True).clamp_max(n - 1)
        chosen.append(pick)
        d2 = torch.minimum(d2, (matrix - matrix[pick]).square().sum(1).double())
    return matrix[torch.stack(chosen)]


def _nearest_atom(w: Tensor, c: Tensor) -> Tensor:
    """Index of the nearest atom per row (first one on ties): ``argmin ||c||^2 - 2 <w, c>``."""
    return (c.square().sum(1) - 2.0 * (w @ c.T)).argmin(1)


def _lloyd(w: Tensor, c0: Tensor, dict_grid: Grid | None, max_iter: int, tracker: _Tracker) -> None:
    """Vector quantization: PGD with exact block steps is Lloyd's algorithm.

    With unit codes and ``s = 1`` the Z block is one-hot; its exact minimiser is the nearest atom,
    and the C block minimiser ``(Z^T Z)^-1 Z^T W`` is the cluster means (``Z^T Z`` is diagonal,
    the counts).  On a grid the C objective separates per coordinate into
    ``count * (c - mean)^2``, so rounding the means is still exact.  Empty clusters keep their atom.
    """
    k = c0.shape[0]
    c = _on_grid(c0, dict_grid)
    assign = _nearest_atom(w, c)
    z = F.one_hot(assign, k).to(w.dtype)
    tracker.update(z @ c - w, (assign[:, None], z, c))
    for _ in range(max_iter):
        counts = z.sum(0)
        means = (z.T @ w) / counts.clamp_min(1.0)[:, None]
        c = _on_grid(torch.where(counts[:, None] > 0, means, c), dict_grid)
        new_assign = _nearest_atom(w, c)
        z = F.one_hot(new_assign, k).to(w.dtype)
        stop = tracker.update(z @ c - w, (new_assign[:, None], z, c))
        if stop or torch.equal(new_assign, assign):  # a fixed point: nothing changes any more
            break
        assign = new_assign


def _pgd(
    w: Tensor, z0: Tensor, c0: Tensor, s: int, grids: tuple[Grid | None, Grid | None], max_iter: int,
    tracker: _Tracker,
) -> None:
    """Alternating projected gradient steps (see the module doc), in up to two phases.

    With a grid, the first phase steps lazily (gradient at the projected point, step on the float
    shadow): it moves through the grid but is not monotone.  When it stalls, plain PGD (the
    iterate is its own shadow) polishes the best iterate: with step ``1/L`` and an exact
    projection each block step minimises a majoriser of ``f`` over the feasible set, so the error
    never increases, and an unchanged error means a fixed point.  Float factors use plain PGD
    throughout (their shadows are the projected points anyway: iterative hard thresholding for Z).
    """
    code_grid, dict_grid = grids
    lazy = code_grid is not None or dict_grid is not None
    index, z, shadow_z = project_codes(z0, s, code_grid)
    shadow_c = c0
    c = _on_grid(c0, dict_grid)
    residual = z @ c - w
    tracker.update(residual, (index, z, c))
    for _ in range(max_iter):
        # Gradients at the projected point, steps on the shadows, then projection.
        index, z, shadow_z = project_codes(shadow_z - (residual @ c.T) / _dict_lipschitz(c), s, code_grid)
        residual = z @ c - w
        shadow_c = shadow_c - (z.T @ residual) / _code_lipschitz(index, z)
        c = _on_grid(shadow_c, dict_grid)
        residual = z @ c - w
        stop = tracker.update(residual, (index, z, c))
        if not lazy:
            if stop or tracker.repeated:
                break
            shadow_z, shadow_c = z, c
        elif stop:  # switch to the polishing phase, from the best iterate
            lazy = False
            index, z, c = tracker.best
            shadow_z, shadow_c = z, c
            residual = z @ c - w
            tracker.restart()


def _check_args(matrix: Tensor, k: int, sparsity: int, bits: tuple[int | None, int | None], unit: bool) -> None:
    if matrix.dim() != 2 or not matrix.is_floating_point():
        raise ValueError(f"expected a 2-D float matrix, got {matrix.dim()}-D {matrix.dtype}")
    if k < 1:
        raise ValueError(f"k={k} is invalid: accepted an integer >= 1")
    if not 1 <= sparsity <= k:
        raise ValueError(f"sparsity={sparsity} is invalid: accepted 1..k={k}")
    for b in bits:
        if b is not None:
            check_scheme(b, "mse", 2.0)
    if unit and (sparsity != 1 or bits[1] is not None):
        raise ValueError("unit_codes is vector quantization: it needs sparsity=1 and code_bits=None")


def _best_single_codes(w: Tensor, c: Tensor) -> Tensor:
    """Exact s = 1 codes for a fixed dictionary, as dense (n, k) Z.

    Per row the atom maximising ``<w, c>^2 / ||c||^2`` with the least-squares value
    ``<w, c> / ||c||^2`` (exhaustive over the k atoms, one GEMM).
    """
    inner = w @ c.T
    norm_sq = c.square().sum(1).clamp_min(torch.finfo(w.dtype).tiny)
    index = (inner.square() / norm_sq).argmax(1, keepdim=True)
    return torch.zeros_like(inner).scatter_(1, index, inner.gather(1, index) / norm_sq[index])


def _balance(z: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """Rescale each atom and its codes to equal norms ``||Z[:, j]|| = ||C[j]||`` (Z C unchanged).

    The SVD split already has this form.  Without it a k-means start gives tiny atoms huge
    codes, and a per-tensor code grid fitted with the MSE rule then wastes its range on them
    (measured: 4-bit start error 0.80 instead of 0.31 on ResNet-20 layer3.2.conv2).  Atoms or
    code columns that are zero are left as they are.
    """
    zn, cn = torch.linalg.vector_norm(z, dim=0), torch.linalg.vector_norm(c, dim=1)
    f = torch.where((zn > 0) & (cn > 0), (zn / cn.clamp_min(torch.finfo(c.dtype).tiny)).sqrt(), 1.0)
    return z / f, c * f[:, None]


def _default_init(shape: torch.Size, k: int, unit: bool) -> str:
    """``"kmeans++"`` for unit codes, ``"kmeans"`` for an overcomplete dictionary, else ``"svd"``.

    With k > d the SVD gives only d atoms and the random extra atoms are rarely picked up by the
    sparse steps (ResNet-20 layer3.2.conv2, kernel block, k = 64, s = 1, float: error 0.46 from
    "svd", 0.28 from "kmeans"); a k-means start is never worse than vector quantization.
    """
    if unit:
        return "kmeans++"
    return "kmeans" if shape[1] < k <= shape[0] else "svd"


def _start(
    w: Tensor, k: int, init: str | tuple[Tensor, Tensor], unit: bool, generator: torch.Generator | None
) -> tuple[Tensor | None, Tensor]:
    """Starting ``(Z, C)`` (Z is None for vector quantization: Lloyd assigns it)."""
    if isinstance(init, tuple):
        z0, c0 = init
        if c0.shape != (k, w.shape[1]) or (not unit and z0.shape != (w.shape[0], k)):
            raise ValueError("init factors do not match W (n, d) ~ Z (n, k) C (k, d)")
        return (None if unit else z0.to(w)), c0.to(w)
    accepted = ("kmeans++", "random") if unit else ("svd", "kmeans", "random")
    if init not in accepted:
        raise ValueError(f"init={init!r} is invalid here: accepted {', '.join(map(repr, accepted))} or (Z, C)")
    if (unit or init == "kmeans") and k > w.shape[0]:
        raise ValueError(f"init={init!r} with k={k} atoms needs at least {k} rows, got {w.shape[0]}")
    if init == "kmeans":
        c0 = qswd(w, k, 1, unit_codes=True, generator=generator).dictionary  # Lloyd to its fixed point
        return _best_single_codes(w, c0), c0
    if init == "kmeans++":
        return None, kmeans_pp(w, k, generator)
    if unit:  # Forgy: k distinct random rows
        return None, w[torch.randperm(w.shape[0], generator=generator)[:k].to(w.device)]
    return _svd_init(w, k, generator) if init == "svd" else _random_init(w, k, generator)


def qswd(
    matrix: Tensor,
    k: int,
    sparsity: int,
    *,
    dict_bits: int | None = None,
    code_bits: int | None = None,
    unit_codes: bool = False,
    init: str | tuple[Tensor, Tensor] | None = None,
    max_iter: int = 1000,
    tol: float = 1e-4,
    patience: int = 50,
    generator: torch.Generator | None = None,
) -> QSWDResult:
    """Quantized sparse factorization ``W ~ Z C`` by projected gradient descent.

    Parameters
    ----------
    matrix : Tensor
        W (n, d), e.g. from :func:`weight_to_matrix`. Work runs on its device and dtype.
    k : int
        Number of atoms (rows of the dictionary C).
    sparsity : int
        s, the most non-zeros per row of Z, 1..k.
    dict_bits, code_bits : int or None
        Bits of the dictionary's and the codes' per-tensor symmetric grids (None: float).
    unit_codes : bool
        Fix the non-zeros of Z to 1 (needs ``sparsity=1``, ``code_bits=None``): vector
        quantization, solved by Lloyd's algorithm.
    init : {"svd", "kmeans", "random", "kmeans++"}, (Z, C) or None
        Start. ``"svd"``: truncated SVD split as ``U S^(1/2)``, ``S^(1/2) V^T``, with random atoms
        (zero codes) beyond the rank; ``"kmeans"``: the dictionary of vector quantization (float,
        Lloyd from k-means++) with the exact s = 1 codes for it; ``"random"``: Gaussian factors.
        With unit codes ``"kmeans++"`` or ``"random"`` (k distinct random rows) seed Lloyd.
        None: ``"kmeans++"`` for unit codes, ``"kmeans"`` when ``d < k <= n``, else ``"svd"``.
        A tuple gives float factors (Z (n, k) is ignored with unit codes), projected first.
    max_iter : int
        Iterations at most (both phases together, see below).
    tol : float
        Relative improvement of the best error that resets the patience counter.
    patience : int
        A phase stops after this many iterations without such an improvement.
    generator : torch.Generator, optional
        CPU generator for the random parts: the result is deterministic for a given seed.

    Returns
    -------
    QSWDResult
        The best projected iterate; never worse than the projected start. Grids are fitted once,
        to the start (the dictionary, and the values the first projection keeps), then fixed.

    Notes
    -----
    Quantized factors are solved in two phases: lazy steps on float shadows (they move through
    the grid), then plain monotone PGD from the best iterate until a fixed point. Float factors
    use plain PGD. Unit codes with ``s = 1`` use exact block steps: Lloyd's algorithm.
    """
    _check_args(matrix, k, sparsity, (dict_bits, code_bits), unit_codes)
    w = matrix.detach()
    tracker = _Tracker(torch.linalg.vector_norm(w).clamp_min(torch.finfo(w.dtype).tiny), tol, patience)
    z0, c0 = _start(w, k, init or _default_init(w.shape, k, unit_codes), unit_codes, generator)
    code_grid = None
    if z0 is None:
        dict_grid = _fit_grid(c0, dict_bits)
        _lloyd(w, c0, dict_grid, max_iter, tracker)
    else:
        z0, c0 = _balance(z0, c0)
        dict_grid = _fit_grid(c0, dict_bits)
        if code_bits is not None:  # fit to the non-zeros the first projection keeps
            kept = z0.gather(1, z0.abs().topk(sparsity, dim=1).indices)
            code_grid = _fit_grid(kept[kept != 0], code_bits)
        _pgd(w, z0, c0, sparsity, (code_grid, dict_grid), max_iter, tracker)
    index, z, c = tracker.best
    return QSWDResult(
        index=index,
        values=z.gather(1, index),
        dictionary=c,
        code_grid=code_grid,
        dict_grid=dict_grid,
        unit_codes=unit_codes,
        error=tracker.best_err,
        iterations=len(tracker.history) - 1,
        best_iteration=tracker.best_iteration,
        history=tracker.history,
    )
