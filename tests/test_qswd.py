"""QSWD solver (W ~ Z C, sparse quantized codes, quantized dictionary) and its layers.

The special cases are checked against direct implementations: truncated SVD, Lloyd's k-means,
iterative hard thresholding and an exhaustive single-atom search.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from qaf.decomp.qswd import kmeans_pp, matrix_to_weight, project_codes, qswd, weight_to_matrix
from qaf.decomp.qswd_layer import QSWDConv2d, QSWDLinear
from qaf.models.cifar_resnet import build
from qaf.quant.uniform import make_grid, symmetric_grid


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _spectrum_matrix(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """float64 matrix with singular values decaying from 1 to ~0.03."""
    gen = _gen(seed)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    r = min(n, d)
    return u[:, :r] * torch.logspace(0, -1.5, r, dtype=torch.float64) @ v[:, :r].T


def _rel_err(w: torch.Tensor, approx: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(w - approx) / torch.linalg.vector_norm(w))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def conv_weight() -> torch.Tensor:
    return build(20).get_submodule("layer3.2.conv2").weight.detach()


# --- reshapes -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,block", [
    ((6, 4, 3, 3), "kernel"), ((6, 4, 3, 3), "row"), ((6, 4, 3, 3), "input"),
    ((5, 3, 1, 1), "kernel"), ((5, 3, 1, 1), "input"), ((7, 5), "row"), ((7, 5), "input"),
])
def test_matrix_round_trip_and_layout(shape, block):
    weight = torch.randn(shape, generator=_gen())
    matrix = weight_to_matrix(weight, block)
    cout, cin = shape[:2]
    if block == "kernel":  # one sub-vector per (out, in) pair
        assert matrix.shape == (cout * cin, math.prod(shape[2:]))
        assert torch.equal(matrix[2 * cin + 1], weight[2, 1].flatten())
    elif block == "row":  # one per output channel
        assert matrix.shape == (cout, weight[0].numel()) and torch.equal(matrix[3], weight[3].flatten())
    else:  # one per input channel
        assert matrix.shape == (cin, weight[:, 0].numel()) and torch.equal(matrix[1], weight[:, 1].flatten())
    assert torch.equal(matrix_to_weight(matrix, weight.shape, block), weight)


def test_bad_blocks_raise():
    with pytest.raises(ValueError, match="'kernel', 'row', 'input'"):
        weight_to_matrix(torch.zeros(4, 3, 3, 3), "channel")
    with pytest.raises(ValueError, match="no kernel"):
        weight_to_matrix(torch.zeros(4, 3), "kernel")
    with pytest.raises(ValueError, match="cannot form"):
        matrix_to_weight(torch.zeros(5, 9), (4, 3, 3, 3), "kernel")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"k": 4, "sparsity": 5}, "sparsity"),
        ({"k": 4, "sparsity": 2, "unit_codes": True}, "unit_codes"),
        ({"k": 4, "sparsity": 1, "unit_codes": True, "code_bits": 4}, "unit_codes"),
        ({"k": 4, "sparsity": 2, "dict_bits": 1}, "bits"),
        ({"k": 4, "sparsity": 2, "init": "kmeans++"}, "init"),
        ({"k": 4, "sparsity": 1, "unit_codes": True, "init": "svd"}, "init"),
    ],
)
def test_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        qswd(torch.randn(20, 6, generator=_gen()), **kwargs)


# --- the Z projection --------------------------------------------------------------------


@pytest.mark.parametrize("k,s", [(5, 2), (6, 3), (4, 1)])
@pytest.mark.parametrize("bits", [2, 3, None])
def test_code_projection_is_the_exact_euclidean_projection(k, s, bits):
    grid = None if bits is None else symmetric_grid(torch.tensor(1.0, dtype=torch.float64), bits)
    x = 1.6 * torch.randn(200, k, generator=_gen(k + s), dtype=torch.float64)  # reaching past the clamp
    index, z, shadow = project_codes(x, s, grid)
    rounded = x if grid is None else grid(x)
    best = torch.full((200,), math.inf, dtype=torch.float64)
    for support in itertools.combinations(range(k), s):  # every support, rounded on it, 0 elsewhere
        cand = torch.zeros_like(x)
        cand[:, support] = rounded[:, support]
        best = torch.minimum(best, (x - cand).square().sum(1))
    assert torch.allclose((x - z).square().sum(1), best, atol=1e-12)
    assert torch.equal(z.gather(1, index), rounded.gather(1, index)) and torch.equal(index, index.sort(1).values)
    assert torch.equal(shadow.gather(1, index), x.gather(1, index)) and int((shadow != 0).sum(1).max()) <= s


# --- (a) dense float codes: truncated SVD ---------------------------------------------------


@pytest.mark.parametrize("n,d,k", [(40, 30, 5), (25, 36, 3), (20, 12, 6)])
@pytest.mark.parametrize("init", ["svd", "random"])
def test_dense_float_codes_reach_the_truncated_svd_optimum(n, d, k, init):
    w = _spectrum_matrix(n, d)
    sv = torch.linalg.svdvals(w)
    optimum = float(sv[k:].square().sum().sqrt() / sv.square().sum().sqrt())
    res = qswd(w, k, k, init=init, max_iter=3000, tol=1e-10, generator=_gen(1))
    assert res.error == pytest.approx(optimum, rel=1e-8 if init == "svd" else 1e-4)
    assert res.error == pytest.approx(_rel_err(w, res.dense_codes() @ res.dictionary), rel=1e-9)
    if init == "svd":  # the start is already optimal
        assert res.history[0] == pytest.approx(optimum, rel=1e-8)
    else:  # it really travelled
        assert res.history[0] > 1.5 * optimum


# --- (b) unit codes, s = 1: k-means ---------------------------------------------------------


def _clustered(n_per: int, d: int, centres: int, seed: int) -> torch.Tensor:
    gen = _gen(seed)
    means = 4.0 * torch.randn(centres, d, generator=gen, dtype=torch.float64)
    return (means[:, None, :] + torch.randn(centres, n_per, d, generator=gen, dtype=torch.float64)).reshape(-1, d)


def _direct_lloyd(x: torch.Tensor, centroids: torch.Tensor, iters: int = 200):
    """Textbook Lloyd: Euclidean nearest centroid, per-cluster mean (empty clusters stay)."""
    for _ in range(iters):
        assign = torch.cdist(x, centroids).argmin(1)
        new = torch.stack([x[assign == j].mean(0) if (assign == j).any() else centroids[j]
                           for j in range(len(centroids))])
        if torch.equal(new, centroids):
            break
        centroids = new
    return torch.cdist(x, centroids).argmin(1), centroids


@pytest.mark.parametrize("d,centres,k,seed", [(2, 5, 5, 0), (9, 6, 8, 1), (4, 3, 6, 2)])
def test_unit_codes_are_lloyds_kmeans(d, centres, k, seed):
    x = _clustered(40, d, centres, seed)
    res = qswd(x, k, 1, unit_codes=True, tol=0.0, generator=_gen(seed))
    assign, centroids = _direct_lloyd(x, kmeans_pp(x, k, _gen(seed)))
    assert torch.equal(res.index[:, 0], assign)
    assert torch.allclose(res.dictionary, centroids, atol=1e-12)
    assert torch.equal(res.values, torch.ones_like(res.values))
    assert res.error == pytest.approx(_rel_err(x, centroids[assign]), rel=1e-9)
    assert all(b <= a + 1e-15 for a, b in zip(res.history, res.history[1:]))  # exact block steps


def test_kmeans_pp_draws_distinct_rows_deterministically():
    x = _clustered(30, 3, 4, 0)
    seeds = kmeans_pp(x, 6, _gen(5))
    rows = [int((x == s).all(1).nonzero()[0]) for s in seeds]
    assert len(set(rows)) == 6
    assert torch.equal(kmeans_pp(x, 6, _gen(5)), seeds)
    assert not torch.equal(kmeans_pp(x, 6, _gen(6)), seeds)


def test_quantized_kmeans_rounds_the_cluster_means():
    x = _clustered(40, 4, 5, 3)
    res = qswd(x, 5, 1, unit_codes=True, dict_bits=3, generator=_gen(0))
    grid = res.dict_grid
    assign = res.index[:, 0]
    means = torch.stack([x[assign == j].mean(0) for j in range(5)])
    # The exact C step on a grid: the rounded means of the final assignment; atoms are on the grid.
    assert torch.equal(res.dictionary, grid(means))
    assert torch.equal(assign, torch.cdist(x, res.dictionary).argmin(1))


# --- (c) sparse float codes: sparse coding / IHT --------------------------------------------


def _balanced(z: torch.Tensor, c: torch.Tensor):
    """Rescale atoms to ||Z[:, j]|| = ||C[j]|| (the solver's balancing is then the identity)."""
    f = (z.norm(dim=0) / c.norm(dim=1)).sqrt()
    return z / f, c * f[:, None]


def _direct_iht(w, z, c, s, iters):
    """Alternating gradient steps, Z hard-thresholded row by row; errors per iteration."""
    def keep_top(u):
        out = torch.zeros_like(u)
        for i in range(u.shape[0]):
            top = u[i].abs().argsort(descending=True)[:s]
            out[i, top] = u[i, top]
        return out

    z = keep_top(z)
    errors = [_rel_err(w, z @ c)]
    for _ in range(iters):
        z = keep_top(z - (z @ c - w) @ c.T / torch.linalg.matrix_norm(c @ c.T, ord=2))
        c = c - z.T @ (z @ c - w) / torch.linalg.matrix_norm(z.T @ z, ord=2)
        errors.append(_rel_err(w, z @ c))
    return errors, z, c


@pytest.mark.parametrize("n,d,k,s", [(30, 8, 12, 2), (24, 10, 6, 3), (16, 5, 5, 1)])
def test_sparse_float_codes_are_iterative_hard_thresholding(n, d, k, s):
    gen = _gen(n)
    w = torch.randn(n, d, generator=gen, dtype=torch.float64)
    z0, c0 = _balanced(torch.randn(n, k, generator=gen, dtype=torch.float64),
                       torch.randn(k, d, generator=gen, dtype=torch.float64) * 0.3)
    iters = 25
    res = qswd(w, k, s, init=(z0, c0), max_iter=iters, tol=0.0, patience=iters + 1)
    errors, z, c = _direct_iht(w, z0, c0, s, iters)
    assert res.history == pytest.approx(errors, rel=1e-9)
    assert res.iterations == iters and res.error == pytest.approx(errors[-1], rel=1e-9)
    assert torch.allclose(res.dense_codes(), z, atol=1e-10) and torch.allclose(res.dictionary, c, atol=1e-10)
    assert all(b <= a * (1 + 1e-12) for a, b in zip(res.history, res.history[1:]))  # monotone


@pytest.mark.parametrize("block,k,s", [("kernel", 32, 2), ("row", 24, 6), ("kernel", 9, 3)])
def test_sparse_codes_improve_on_their_start_and_keep_s_per_row(conv_weight, block, k, s):
    w = weight_to_matrix(conv_weight, block)
    res = qswd(w, k, s, max_iter=150, generator=_gen(0))
    assert res.error < 0.97 * res.history[0]
    z = res.dense_codes()
    assert int((z != 0).sum(1).max()) <= s
    assert torch.equal(res.index, res.index.sort(dim=1).values)
    assert res.error == pytest.approx(_rel_err(w, z @ res.dictionary), rel=1e-4)


@pytest.mark.parametrize("k", [6, 20])
def test_single_code_start_is_the_exhaustive_optimum(k):
    w = _clustered(15, 5, 4, 7)
    res = qswd(w, k, 1, init="kmeans", max_iter=0, generator=_gen(0))
    c = res.dictionary
    # Exhaustive: every atom with its least-squares coefficient, keep the best per row.
    best = torch.stack([(w - (w @ c[j] / c[j].dot(c[j]))[:, None] * c[j]).norm(dim=1) for j in range(k)]).min(0)
    assert torch.allclose((w - res.reconstruct()).norm(dim=1), best.values, atol=1e-10)
    # Free code values contain vector quantization: never worse than k-means with the same seed.
    vq = qswd(w, k, 1, unit_codes=True, generator=_gen(0))
    assert res.error <= vq.error + 1e-12


# --- (d) quantized factors ------------------------------------------------------------------


@pytest.mark.parametrize("block,k,s,dict_bits,code_bits", [
    ("row", 16, 4, 4, 3), ("kernel", 24, 2, 3, 4), ("row", 12, 12, 2, 2), ("kernel", 9, 1, None, 4),
])
def test_quantized_factors_lie_on_their_grids(conv_weight, block, k, s, dict_bits, code_bits):
    w = weight_to_matrix(conv_weight, block)
    res = qswd(w, k, s, dict_bits=dict_bits, code_bits=code_bits, max_iter=120, generator=_gen(0))
    for tensor, grid, bits in ((res.values, res.code_grid, code_bits), (res.dictionary, res.dict_grid, dict_bits)):
        if bits is None:
            assert grid is None
            continue
        assert torch.equal(grid(tensor), tensor)
        assert tensor.unique().numel() <= 2**bits and grid.num_levels == 2**bits
    assert res.error == pytest.approx(_rel_err(w, res.reconstruct()), rel=1e-5)
    assert res.error == min(res.history) and res.error <= res.history[0]


@pytest.mark.parametrize("block,k,s", [("row", 32, 8), ("kernel", 64, 2)])
def test_error_falls_as_bits_rise(conv_weight, block, k, s):
    w = weight_to_matrix(conv_weight, block)
    errors = [qswd(w, k, s, dict_bits=b, code_bits=b, max_iter=150, generator=_gen(0)).error for b in (2, 3, 4, 8)]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("block,k,s", [("row", 16, 16), ("kernel", 9, 3)])
def test_quantized_solve_ends_at_a_plain_pgd_fixed_point(conv_weight, block, k, s):
    # After the lazy phase, monotone plain PGD polishes the best iterate until nothing changes.
    w = weight_to_matrix(conv_weight, block)
    res = qswd(w, k, s, dict_bits=4, code_bits=4, generator=_gen(0))
    assert res.iterations < 1000  # stopped by the rule, not the cap
    assert res.history[-1] == res.history[-2] == res.error < res.history[0]


def test_fine_grids_come_close_to_float_factors(conv_weight):
    # Steps far below an 8-bit grid step round back to the same point; the lazy (shadow) steps
    # must still travel from the rounded start to about the float solution.
    w = weight_to_matrix(conv_weight, "row")
    float_err = qswd(w, 32, 8, generator=_gen(0)).error
    res = qswd(w, 32, 8, dict_bits=8, code_bits=8, generator=_gen(0))
    assert res.history[0] > 1.5 * float_err
    assert res.error < 1.03 * float_err


def test_fixed_seed_gives_identical_results():
    w = torch.randn(40, 9, generator=_gen(3))
    runs = [qswd(w, 12, 2, dict_bits=4, code_bits=4, init="random", max_iter=40, generator=_gen(9))
            for _ in range(2)]
    assert runs[0].history == runs[1].history
    assert torch.equal(runs[0].index, runs[1].index) and torch.equal(runs[0].dictionary, runs[1].dictionary)


# --- layers ---------------------------------------------------------------------------------


def _conv(cin=4, cout=6, k=3, stride=1, padding=1, bias=True, seed=0) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=bias)


@pytest.mark.parametrize("block,k,s", [("kernel", 8, 2), ("row", 4, 4), ("input", 3, 2)])
@pytest.mark.parametrize("weight_bits", [8, None])
@pytest.mark.parametrize("stride,padding,bias", [(1, 1, True), (2, 0, False)])
def test_qswd_conv_equals_conv_with_generated_weight(block, k, s, weight_bits, stride, padding, bias):
    conv = _conv(stride=stride, padding=padding, bias=bias)
    res = qswd(weight_to_matrix(conv.weight.detach(), block), k, s, dict_bits=4, code_bits=4, generator=_gen(0))
    layer = QSWDConv2d(conv, res, block, weight_bits=weight_bits).eval()
    weight = matrix_to_weight(res.dense_codes() @ res.dictionary, conv.weight.shape, block)
    if weight_bits is not None:
        weight = make_grid(weight, weight_bits, clip="mse")(weight)
    x = torch.randn(2, 4, 9, 9, generator=_gen(1))
    expected = F.conv2d(x, weight, conv.bias, stride, padding)
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_qswd_linear_equals_linear_with_generated_weight():
    torch.manual_seed(0)
    linear = nn.Linear(12, 10)
    res = qswd(weight_to_matrix(linear.weight.detach(), "input"), 5, 2, dict_bits=4, code_bits=4)
    layer = QSWDLinear(linear, res, "input", weight_bits=None)
    x = torch.randn(3, 12, generator=_gen(1))
    weight = (res.dense_codes() @ res.dictionary).T
    assert torch.allclose(layer(x), F.linear(x, weight, linear.bias), atol=1e-5)


def test_storage_matches_hand_count():
    conv = _conv(cin=3, cout=4)  # W (4, 3, 3, 3): kernel block n = 12 sub-vectors of d = 9
    res = qswd(weight_to_matrix(conv.weight.detach(), "kernel"), 8, 2, dict_bits=4, code_bits=3)
    layer = QSWDConv2d(conv, res, "kernel", weight_bits=8)
    entries = {name: (count, bits) for name, count, bits in layer.storage()}
    assert entries == {
        "values": (24, 3),  # 12 rows x 2 codes at 3 bits
        "index": (24, 3),  # ceil(log2 8) = 3 bits each: 72 bits < a 12 x 8 bitmap (96)
        "dictionary": (72, 4),  # 8 atoms x 9 at 4 bits
        **{f"{g}_{p}": (1, 32) for g in ("values", "dictionary", "weight") for p in ("scale", "zero_point")},
        "bias": (4, 32),
    }
    assert sum(c * b for _, c, b in layer.storage()) == 72 + 72 + 288 + 6 * 32 + 4 * 32


def test_storage_of_vq_and_bitmap_patterns():
    conv = _conv(cin=3, cout=4, bias=False)
    w = weight_to_matrix(conv.weight.detach(), "kernel")
    vq = QSWDConv2d(conv, qswd(w, 6, 1, unit_codes=True, generator=_gen(0)), "kernel", weight_bits=None)
    assert vq.storage() == [("values", 12, 0), ("index", 12, 3), ("dictionary", 54, 32)]
    dense_ish = QSWDConv2d(conv, qswd(w, 4, 3), "kernel", weight_bits=None)  # 3 x 2 bits > 4-bit bitmap
    assert ("bitmap", 48, 1) in dense_ish.storage()
    dense = QSWDConv2d(conv, qswd(w, 4, 4), "kernel", weight_bits=None)
    assert ("index", 48, 0) in dense.storage()


def test_artifact_record_stores_codes_that_regenerate_the_weight():
    from qaf.export.artifact import _Reader, _Writer

    conv = _conv()
    res = qswd(weight_to_matrix(conv.weight.detach(), "row"), 4, 2, dict_bits=4, code_bits=3)
    layer = QSWDConv2d(conv, res, "row", weight_bits=6)
    writer = _Writer()
    record = layer.export_record("layer", writer)
    assert record["values"] == record["dictionary"] == "codes" and record["grids"]["weight"][:2] == [-32, 31]
    assert [writer.entries[f"layer.{part}_codes"]["bits"] for part in ("values", "dictionary")] == [3, 4]
    back = QSWDConv2d.from_record("layer", record, _conv(), _Reader(writer.tensors, writer.entries))
    assert torch.equal(back.index, layer.index) and torch.equal(back.bias, conv.bias)
    assert torch.equal(back.weight, layer.weight)


def test_fine_tuning_moves_values_not_pattern_or_grids():
    conv = _conv()
    res = qswd(weight_to_matrix(conv.weight.detach(), "kernel"), 8, 2, dict_bits=4, code_bits=4, generator=_gen(0))
    layer = QSWDConv2d(conv, res, "kernel").train()
    index, buffers = layer.index.clone(), {n: b.clone() for n, b in layer.named_buffers()}
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    x = torch.randn(4, 4, 8, 8, generator=_gen(2))
    for _ in range(3):
        opt.zero_grad()
        layer(x).square().mean().backward()
        assert layer.values.grad.abs().sum() > 0 and layer.dictionary.grad.abs().sum() > 0
        opt.step()
    assert not torch.equal(layer.values, before["values"])
    assert not torch.equal(layer.dictionary, before["dictionary"])
    assert torch.equal(layer.index, index)
    assert all(torch.equal(b, buffers[n]) for n, b in layer.named_buffers())
    # The forward uses the rounded values: the weight stays on the fixed grids and pattern.
    z = torch.zeros(24, 8).scatter_(1, index, layer.grid("values")(layer.values.detach()))
    weight = matrix_to_weight(z @ layer.grid("dictionary")(layer.dictionary.detach()), conv.weight.shape, "kernel")
    assert torch.allclose(layer.weight.detach(), layer.grid("weight")(weight), atol=1e-6)


def test_eval_output_is_cached_and_follows_parameter_changes():
    conv = _conv()
    res = qswd(weight_to_matrix(conv.weight.detach(), "kernel"), 8, 2, dict_bits=4, code_bits=4, generator=_gen(0))
    layer = QSWDConv2d(conv, res, "kernel").eval()
    x = torch.randn(2, 4, 8, 8, generator=_gen(3))
    with torch.no_grad():
        first = layer(x)
        assert layer.weight is layer.weight  # generated once
        assert torch.equal(layer(x), first)
        layer.dictionary.mul_(0.5)  # an in-place update, as an optimizer step or load_state_dict makes
        changed = layer(x)
        uncached = layer.train()(x)  # training mode always regenerates
    assert not torch.allclose(changed, first) and torch.equal(changed, uncached)
    layer.eval()
    layer(x).sum().backward()  # eval mode still differentiates when gradients are recorded
    assert layer.dictionary.grad is not None
