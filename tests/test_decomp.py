"""CP solvers (ALS, EPC, AO-ADMM) and CP layers on synthetic and real weights."""

from __future__ import annotations

import pytest
import torch
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
from qaf.decomp.cp import spd_inverse
from qaf.decomp.epc import solve_secular
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


def test_spd_inverse_survives_singular_gram():
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    gram = u.T @ u  # rank 3 of 6: plain Cholesky fails
    assert torch.linalg.cholesky_ex(gram).info != 0
    inv = spd_inverse(gram)
    # The inverse of gram + a tiny jitter: a generalized inverse on gram's range (to the accuracy its
    # condition number ~1e12 allows), symmetric positive definite.
    torch.testing.assert_close(gram @ inv @ gram, gram, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(inv, inv.T)
    assert float(torch.linalg.eigvalsh(inv).min()) > 0


def test_spd_inverse_of_a_regular_matrix_is_the_inverse():
    gen = torch.Generator().manual_seed(1)
    u = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    gram = u.T @ u + 0.1 * torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(spd_inverse(gram), torch.linalg.inv(gram), rtol=1e-10, atol=1e-12)


def test_secular_solution_meets_the_error_bound():
    gen = torch.Generator().manual_seed(0)
    s = torch.rand(6, generator=gen, dtype=torch.float64) + 0.1
    zsq = torch.rand(6, generator=gen, dtype=torch.float64)
    norm_sq = float((zsq / s).sum()) + 0.5  # least-squares residual 0.5
    mu = solve_secular(zsq, s, norm_sq, 0.8, 0.0)
    t = mu / (1 + mu * s)
    assert norm_sq + float((zsq * (s * t * t - 2 * t)).sum()) == pytest.approx(0.8, rel=1e-9)


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
