"""Solver speed: ALS against tensorly and the FLOP bound, EPC, AO-ADMM, the ResNet-18 ``admm_epc``.

On a 512 x 512 x 9 tensor at rank 1141 (ResNet-18's largest layer at rate 2), on the solvers'
device: seconds per ALS sweep of :func:`qaf.decomp.cp_als` and of tensorly's ``parafac`` and their
ratio; the FLOP bound of one ALS sweep (3 MTTKRPs, 3 Gram updates, 3 Cholesky factorizations and the
triangular solves) at the float32 matmul rate measured in the same run; seconds per EPC sweep
(started from two ALS sweeps); seconds per AO-ADMM outer iteration (default inner budget); the whole
ResNet-18 ``admm_epc`` at rate 2, 4 bits (the rate-2, 4-bit job of :mod:`qaf.bench.paper_grid`:
random-init torchvision weights, the experiment's budgets, nothing cached; skipped by ``--quick``
unless ``--resnet18-solver``).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from qaf.bench import per_iteration, timed
from qaf.decomp.admm import cp_admm
from qaf.decomp.cp import cp_als, init_factors
from qaf.decomp.epc import cp_epc

SHAPE, RANK = (512, 512, 9), 1141


def matmul_rate(device: torch.device) -> float:
    """Measured float32 GEMM rate (FLOP/s) on the MTTKRP's shape, best of 3."""
    i, j, k = SHAPE
    a = torch.randn(i * k, j, device=device)
    b = torch.randn(j, RANK, device=device)
    a @ b
    best = min(timed(lambda: (a @ b).sum().item()) for _ in range(3))
    return 2.0 * i * j * k * RANK / best


def als_flops() -> float:
    """FLOPs of one ALS sweep: MTTKRPs, Grams, Cholesky factorizations, triangular solves."""
    i, j, k = SHAPE
    r = RANK
    mttkrp = 3 * 2.0 * i * j * k * r
    grams = sum(2.0 * n * r * r for n in SHAPE)
    chol = 3 * r**3 / 3.0
    solves = sum(2.0 * n * r * r for n in SHAPE)  # forward + backward substitution, n RHS each
    return mttkrp + grams + chol + solves


def resnet18_admm_epc(device: torch.device) -> tuple[float, list[dict]]:
    """Seconds for the paper grid's rate-2, 4-bit ``admm_epc`` job alone (nothing cached)."""
    from qaf.bench.paper_grid import run_job

    with tempfile.TemporaryDirectory(prefix="qaf-bench-") as cache_dir:
        start = time.perf_counter()
        reports = run_job({"method": "admm_epc", "bits": "4", "rate": "2"}, cache_dir, device)
        return time.perf_counter() - start, reports


def solver_figures(args: argparse.Namespace, device: torch.device) -> dict:
    """ALS / tensorly / FLOP bound / ADMM figures (and the ResNet-18 ``admm_epc`` run when asked)."""
    print(f"device {device}, {torch.get_num_threads()} threads, tensor {SHAPE} rank {RANK}")
    gen = torch.Generator().manual_seed(0)
    tensor = torch.randn(*SHAPE, generator=gen).to(device)
    start = init_factors(tensor, RANK, "random", torch.Generator().manual_seed(1))

    few, many = (1, 2) if args.quick else (1, 4)
    als = per_iteration(lambda n: cp_als(tensor, RANK, n_iter=n, tol=0.0, init=list(start)), few, many)
    print(f"ALS (ours)          {als:8.3f} s/iter")

    import tensorly as tl
    from tensorly.decomposition import parafac

    tl.set_backend("numpy")
    arr = tensor.cpu().numpy()
    tly = per_iteration(
        lambda n: parafac(arr, RANK, n_iter_max=n, init="random", tol=0.0, random_state=0), 1, 2
    )
    print(f"ALS (tensorly)      {tly:8.3f} s/iter   speed-up {tly / max(als, 1e-12):6.1f}x")

    rate = matmul_rate(device)
    bound = als_flops() / rate
    print(f"FLOP bound          {bound:8.3f} s/iter   ({als_flops() / 1e9:.1f} GFLOP at "
          f"{rate / 1e9:.1f} GFLOP/s; ours / bound {als / bound:5.2f})")

    als_start = cp_als(tensor, RANK, n_iter=2, tol=0.0, init=list(start)).factors
    epc = per_iteration(lambda n: cp_epc(tensor, als_start, n_iter=n, tol=0.0), 1, 2 if args.quick else 3)
    print(f"EPC sweep           {epc:8.3f} s/iter")

    from qaf.methods.cp import CP

    grid_factory = CP(bits=4, init="epc", solver="admm").grid_factory  # the method's grids
    admm = per_iteration(
        lambda n: cp_admm(tensor, list(start), grid_factory, max_outer=n, max_inner=10,
                          patience=10**6),
        1, 2 if args.quick else 3,
    )
    print(f"ADMM outer iter     {admm:8.3f} s/iter")

    resnet_s = None
    if args.resnet18_solver or not args.quick:
        resnet_s, reports = resnet18_admm_epc(device)
        print(f"ResNet-18 admm_epc  {resnet_s:8.1f} s (rate 2, 4 bits, {len(reports)} layers, random init)")
    return {"als_s_per_iter": als, "tensorly_s_per_iter": tly, "gemm_bound_s_per_iter": bound,
            "epc_s_per_iter": epc, "admm_s_per_outer_iter": admm, "resnet18_admm_epc_s": resnet_s}
