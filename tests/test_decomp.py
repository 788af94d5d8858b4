"""CP solvers (ALS, EPC, AO-ADMM) and CP layers on synthetic and real weights."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from qaf.decomp import (
    CPConv2d,
    CPLinear,
    MttkrpPlan,
    cp_admm,
    cp_als,
    cp_epc,
    cp_rank,
    cp_to_tensor,
    max_rate,
    relative_error,
    weight_to_tensor,
)
from qaf.decomp.cp import spd_right_solver
from qaf.decomp.epc import epc_block, epc_step
from qaf.models.cifar_resnet import build
from qaf.quant.uniform import make_grid


def _low_rank(shape: tuple[int, ...], rank: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return cp_to_tensor([torch.randn(s, rank, generator=gen, dtype=torch.float64) for s in shape])


@pytest.fixture(scope="module")
def resnet20() -> nn.Module:
    return build(20)


@pytest.mark.parametrize("shape,rank", [((12, 10, 9), 4), ((20, 16, 9), 7), ((15, 11), 3)])
@pytest.mark.parametrize("init", ["svd", "random"])
def test_als_recovers_exact_low_rank(shape, rank, init):
    tensor = _low_rank(shape, rank)
    res = cp_als(tensor, rank, n_iter=1000, tol=1e-15, init=init, generator=torch.Generator().manual_seed(3))
    assert res.error < 1e-5
    assert relative_error(tensor, res.factors) == pytest.approx(res.error)


@pytest.mark.parametrize("shape", [(8, 6, 9), (7, 5)])
def test_mttkrp_matches_khatri_rao_definition(shape):
    gen = torch.Generator().manual_seed(0)
    tensor = torch.randn(*shape, generator=gen, dtype=torch.float64)
    factors = [torch.randn(s, 4, generator=gen, dtype=torch.float64) for s in shape]
    plan = MttkrpPlan(tensor)
    for mode in range(len(shape)):
        others = [f for n, f in enumerate(factors) if n != mode]
        kr = others[0]
        for f in others[1:]:  # Khatri-Rao with the first index varying slowest (row-major unfolding)
            kr = (kr.unsqueeze(1) * f.unsqueeze(0)).reshape(-1, 4)
        unfold = tensor.movedim(mode, 0).reshape(shape[mode], -1)
        assert torch.allclose(plan.mttkrp(factors, mode), unfold @ kr)


def test_rank_from_rate_and_limit():
    assert cp_rank((64, 64, 9), 2.0) == 134  # the reference rank maps
    assert cp_rank((512, 512, 9), 2.0) == 1141
    assert cp_rank((256, 128, 9), 2.0) == 375
    limit = max_rate((64, 64, 9))
    assert cp_rank((64, 64, 9), limit) == 1 and cp_rank((64, 64, 9), limit * 1.01) == 0
    assert weight_to_tensor(torch.zeros(8, 4, 3, 3)).shape == (8, 4, 9)
    assert weight_to_tensor(torch.zeros(8, 4, 1, 1)).shape == (8, 4)


@pytest.mark.parametrize("rows,rank", [(3, 40), (9, 36), (40, 40), (64, 20)])  # both branches (rows < R/4 or not)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spd_right_solver_matches_a_dense_solve(rows, rank, dtype):
    gen = torch.Generator().manual_seed(rows * rank)
    a = torch.randn(rank, 2 * rank, generator=gen, dtype=torch.float64)
    matrix = a @ a.T / rank + torch.eye(rank, dtype=torch.float64)
    rhs = torch.randn(rows, rank, generator=gen, dtype=torch.float64)
    out = spd_right_solver(matrix, rows, dtype)(rhs.to(dtype))
    assert out.dtype == dtype
    truth = torch.linalg.solve(matrix, rhs.T).T
    assert torch.allclose(out.double(), truth, rtol=0, atol=1e-4 if dtype == torch.float32 else 1e-10)


@pytest.mark.parametrize("rows", [2, 12])  # both branches
def test_spd_right_solver_survives_singular_gram(rows):
    gen = torch.Generator().manual_seed(rows)
    u = torch.randn(3, 16, generator=gen, dtype=torch.float64)
    gram = u.T @ u  # rank 3 of 16: plain Cholesky fails
    assert torch.linalg.cholesky_ex(gram).info != 0
    rhs = torch.randn(rows, 16, generator=gen, dtype=torch.float64) @ gram  # in gram's range: X gram = rhs solvable
    out = spd_right_solver(gram, rows, torch.float64)(rhs)
    # The solve of gram + a tiny jitter: a solution of X gram = rhs to the accuracy the jitter allows.
    torch.testing.assert_close(out @ gram, rhs, rtol=1e-3, atol=1e-3 * float(rhs.abs().max()))


def _epc_system(rows: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """F and Gamma of an EPC block (Gamma the Hadamard product of two Grams of unit columns), and
    the least-squares residual ``||W||^2 - tr(F Gamma^-1 F^T)`` of a W with ``||W||^2 = norm_sq``."""
    gen = torch.Generator().manual_seed(seed)
    grams = []
    for size in (rank // 2 + 3, 7):
        u = torch.randn(size, rank, generator=gen, dtype=torch.float64)
        u = u / u.norm(dim=0)
        grams.append(u.T @ u)
    gamma = grams[0] * grams[1]
    f = torch.randn(rows, rank, generator=gen, dtype=torch.float64)
    fit = float((f * torch.linalg.solve(gamma, f.T).T).sum())
    return f, gamma, fit


def _epc_block_by_eigh(f, gamma, norm_sq, delta_sq):
    """Independent truth: the block solution in Gamma's eigenbasis, mu by bisection."""
    s, v = torch.linalg.eigh(gamma)
    z = f @ v
    zsq = z.pow(2).sum(0)

    def g(mu: float) -> float:
        t = mu / (1 + mu * s)
        return norm_sq + float((zsq * (s * t * t - 2 * t)).sum())

    lo, hi = 0.0, 1.0
    while g(hi) > delta_sq:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if g(mid) > delta_sq else (lo, mid)
    mu = 0.5 * (lo + hi)
    return (z * (mu / (1 + mu * s))) @ v.T, mu


@pytest.mark.parametrize("rows,rank", [(9, 30), (24, 24), (40, 16), (64, 57)])
@pytest.mark.parametrize("fraction", [0.02, 0.5, 0.95])  # where delta^2 lies between the LS residual and ||W||^2
@pytest.mark.parametrize("start", [0.0, 0.5, 1.01, 4.0])  # mu0 as a multiple of the root (0: none)
def test_epc_block_matches_the_eigh_solution(rows, rank, fraction, start):
    f, gamma, fit = _epc_system(rows, rank, seed=rows + rank)
    ls = 0.3 * fit
    norm_sq = fit + ls
    delta_sq = ls + fraction * fit
    truth, mu_true = _epc_block_by_eigh(f, gamma, norm_sq, delta_sq)
    x, mu, evals = epc_block(f, gamma, norm_sq, delta_sq, start * mu_true)
    assert mu == pytest.approx(mu_true, rel=1e-7)
    assert float((x - truth).norm() / truth.norm()) < 1e-7
    g = norm_sq - 2 * float((f * x).sum()) + float(((x.T @ x) * gamma).sum())
    assert g == pytest.approx(delta_sq, rel=1e-9)  # the error bound is met
    assert 1 <= evals <= 10


def test_epc_block_returns_the_least_squares_solution_when_it_misses_delta():
    f, gamma, fit = _epc_system(12, 20, seed=3)
    norm_sq = fit + 1.0  # least-squares residual 1.0
    x, mu, evals = epc_block(f, gamma, norm_sq, delta_sq=0.5)
    assert mu == math.inf and evals == 0
    assert torch.allclose(x, torch.linalg.solve(gamma, f.T).T, atol=1e-8)


@pytest.mark.parametrize("rows,rank", [(9, 30), (40, 16), (64, 57)])
@pytest.mark.parametrize("off", [0.9, 0.97, 1.03, 1.1])  # the prediction as a multiple of the root
def test_epc_step_lands_near_the_root_from_a_near_prediction(rows, rank, off):
    f, gamma, fit = _epc_system(rows, rank, seed=rows + rank)
    norm_sq, delta_sq = 1.3 * fit, 0.8 * fit
    truth, mu_true = _epc_block_by_eigh(f, gamma, norm_sq, delta_sq)
    x, mu = epc_step(f, gamma, norm_sq, delta_sq, off * mu_true)
    # Newton: the multiplier's error falls from |off - 1| to about its square; X follows to first order.
    assert abs(mu / mu_true - 1) < 2 * (off - 1) ** 2
    assert float((x - truth).norm() / truth.norm()) < 2 * (off - 1) ** 2
    g = norm_sq - 2 * float((f * x).sum()) + float(((x.T @ x) * gamma).sum())
    assert g == pytest.approx(delta_sq, rel=(off - 1) ** 2)


def test_epc_step_refuses_a_prediction_far_from_the_root():
    f, gamma, fit = _epc_system(40, 16, seed=56)
    norm_sq, delta_sq = 1.3 * fit, 0.8 * fit
    _, mu_true = _epc_block_by_eigh(f, gamma, norm_sq, delta_sq)
    assert epc_step(f, gamma, norm_sq, delta_sq, 0.1 * mu_true) is None  # a step of about 9 mu
    assert epc_step(f, gamma, norm_sq, delta_sq, 0.1 * mu_true, max_step=100.0) is not None


def test_one_step_epc_keeps_the_error_and_the_norms_of_full_solves(resnet20):
    tensor = weight_to_tensor(resnet20.layer3[1].conv1.weight.detach()).double()
    als = cp_als(tensor, cp_rank(tensor.shape, 2.0), n_iter=30, generator=torch.Generator().manual_seed(0))
    full = cp_epc(tensor, als.factors, n_iter=40, tol=0.0)
    fast = cp_epc(tensor, als.factors, n_iter=40, tol=0.0, one_step=True)
    assert fast.error == pytest.approx(als.error, rel=1e-5)
    assert float(fast.weights.norm()) == pytest.approx(float(full.weights.norm()), rel=1e-3)
    assert not torch.equal(fast.weights, full.weights)  # the one-step path ran


def test_epc_keeps_error_and_shrinks_norms(resnet20):
    tensor = weight_to_tensor(resnet20.layer2[1].conv1.weight.detach()).double()
    rank = cp_rank(tensor.shape, 2.0)
    als = cp_als(tensor, rank, n_iter=30, generator=torch.Generator().manual_seed(0))
    epc = cp_epc(tensor, als.factors, n_iter=30)
    assert epc.error == pytest.approx(als.error, rel=1e-6)
    als_lam = torch.stack([f.norm(dim=0) for f in als.factors]).prod(0)
    assert epc.weights.norm() < 0.9 * als_lam.norm()
    assert epc.history[-1] <= epc.history[0]


def _grid(bits):
    return lambda x: make_grid(x, bits)


@pytest.fixture(scope="module")
def epc_start(resnet20):
    tensor = weight_to_tensor(resnet20.layer3[2].conv2.weight.detach())
    rank = cp_rank(tensor.shape, 2.0)
    als = cp_als(tensor, rank, n_iter=50, generator=torch.Generator().manual_seed(0))
    return tensor, cp_epc(tensor, als.factors, n_iter=100)


def test_admm_factors_lie_exactly_on_their_grids(epc_start):
    tensor, start = epc_start
    res = cp_admm(tensor, start.factors, _grid(4), max_outer=5)
    for factor, grid in zip(res.factors, res.grids):
        assert torch.equal(grid(factor), factor)
        levels = torch.unique(factor)
        assert len(levels) <= 2**4
    assert res.e_quant == pytest.approx(relative_error(tensor, res.factors))
    assert res.e_quant <= res.history[0] + 1e-9  # the best iterate: never worse than the start


def test_admm_error_falls_as_bits_rise(epc_start):
    tensor, start = epc_start
    errs = [cp_admm(tensor, start.factors, _grid(b), max_outer=8).e_quant for b in (3, 4, 6, 8)]
    assert errs == sorted(errs, reverse=True)
    assert errs[-1] < errs[0] * 0.8


def test_over_relaxed_admm_stays_on_its_grids_and_checks_alpha(epc_start):
    tensor, start = epc_start
    relaxed = cp_admm(tensor, start.factors, _grid(4), max_outer=3, relaxation=1.8)
    for factor, grid in zip(relaxed.factors, relaxed.grids):
        assert torch.equal(grid(factor), factor)
    assert relaxed.e_quant <= relaxed.history[0] + 1e-9
    for bad in (0.0, 2.0):
        with pytest.raises(ValueError, match="relaxation must be in"):
            cp_admm(tensor, start.factors, _grid(4), max_outer=1, relaxation=bad)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 8])
def test_over_relaxed_admm_gets_lower_in_the_same_outer_sweeps_at_resnet18_ranks(bits):
    # What the paper experiment's admm_relaxation=1.8 is for: a ResNet-18 conv (random init, 128 x
    # 128 x 9) at rate 1.2, rank 463. (On the small CIFAR ranks alpha = 1.8 is not always lower.)
    torch.manual_seed(0)
    tensor = weight_to_tensor(torchvision.models.resnet18().layer2[1].conv2.weight.detach())
    rank = cp_rank(tensor.shape, 1.2)
    als = cp_als(tensor, rank, n_iter=20, generator=torch.Generator().manual_seed(0))
    start = cp_epc(tensor, als.factors, n_iter=20).factors
    plain = cp_admm(tensor, start, _grid(bits), max_outer=15, patience=100)
    relaxed = cp_admm(tensor, start, _grid(bits), max_outer=15, patience=100, relaxation=1.8)
    assert relaxed.iterations == plain.iterations == 15
    assert relaxed.e_quant < plain.e_quant - 0.001


@pytest.mark.parametrize("layer", ["layer3.2.conv2", "layer2.2.conv2", "layer1.1.conv1"])
def test_admm_epc_beats_cpd_epc_at_4_bits_on_real_layers(resnet20, layer):
    tensor = weight_to_tensor(resnet20.get_submodule(layer).weight.detach())
    rank = cp_rank(tensor.shape, 2.0)
    als = cp_als(tensor, rank, n_iter=50, generator=torch.Generator().manual_seed(0))
    start = cp_epc(tensor, als.factors, n_iter=100).factors
    cpd_epc = relative_error(tensor, [make_grid(f, 4)(f) for f in start])
    admm = cp_admm(tensor, start, _grid(4), max_outer=20).e_quant
    assert admm < cpd_epc - 0.01


def test_fixed_seed_gives_identical_results(resnet20):
    tensor = weight_to_tensor(resnet20.layer1[0].conv1.weight.detach())
    rank = cp_rank(tensor.shape, 3.0)

    def run(seed):
        als = cp_als(tensor, rank, n_iter=10, init="random", generator=torch.Generator().manual_seed(seed))
        return cp_admm(tensor, cp_epc(tensor, als.factors, n_iter=10).factors, _grid(4), max_outer=3).factors

    first, second, other = run(5), run(5), run(6)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_admm_warns_and_keeps_best_on_divergence(epc_start):
    tensor, start = epc_start

    calls = []

    def exploding(x):  # the start's grids are fine, later ones produce NaN factors
        calls.append(1)
        return (lambda y: y) if len(calls) <= len(start.factors) else (lambda y: y * float("nan"))

    with pytest.warns(RuntimeWarning, match="diverged"):
        res = cp_admm(tensor, start.factors, exploding, max_outer=5)
    assert res.diverged and res.best_iteration == 0
    assert res.e_quant == pytest.approx(res.history[0])


@pytest.mark.parametrize(
    "cin,cout,k,stride,padding,dilation,bias",
    [(5, 7, 3, 1, 1, 1, False), (4, 6, 3, 2, 1, 1, True), (3, 8, 5, 2, 2, 1, True), (6, 4, 3, 1, 2, 2, False),
     (4, 5, (3, 1), 1, (1, 0), 1, True)],
)
def test_cpconv_equals_dense_conv_with_reconstructed_weight(cin, cout, k, stride, padding, dilation, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation, bias=bias).double()
    kh, kw = conv.kernel_size
    factors = [torch.randn(n, 6, dtype=torch.float64) for n in (cout, cin, kh * kw)]
    weight = cp_to_tensor(factors).reshape(cout, cin, kh, kw)
    x = torch.randn(2, cin, 11, 9, dtype=torch.float64)
    dense = F.conv2d(x, weight, conv.bias, stride, padding, dilation)
    assert torch.allclose(CPConv2d(conv, factors)(x), dense, atol=1e-10)


def test_cplinear_equals_dense_layers():
    torch.manual_seed(0)
    a, b = torch.randn(7, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    lin = nn.Linear(5, 7).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    assert torch.allclose(CPLinear(lin, [a, b])(x), F.linear(x, a @ b.T, lin.bias))
    conv = nn.Conv2d(5, 7, 1, stride=2).double()
    xi = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    ref = F.conv2d(xi, (a @ b.T)[:, :, None, None], conv.bias, 2)
    assert torch.allclose(CPLinear(conv, [a, b])(xi), ref)
