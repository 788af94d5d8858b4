"""Quantizer properties: levels, idempotence, error vs bits, clip rules, fake-quant modules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qaf.config import ConfigError
from qaf.quant.clip import (
    ACIQ_LAPLACE,
    ACIQ_LAPLACE_RELU,
    aciq_laplace_constant,
    lp_error,
    search_fraction,
    sorted_mse,
    sorted_values,
)
from qaf.calib import observing_activations
from qaf.quant.modules import ActQuantizer, QuantLayer, quantize_model
from qaf.quant.observer import batch_index
from qaf.quant.uniform import Grid, affine_grid, correct_mean, make_grid, symmetric_grid, unsigned_grid

BITS = [2, 3, 4, 8]
# (make_grid kwargs, expected number of levels as a function of bits)
KINDS = {
    "symmetric": ({"symmetric": True}, lambda b: 2**b),
    "zero_free": ({"symmetric": True, "zero_free": True}, lambda b: 2**b),
    "unsigned": ({"unsigned": True}, lambda b: 2**b),
    "affine": ({"symmetric": False}, lambda b: 2**b),
}


def sample(dist: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dist == "gauss":
        return torch.randn(shape, generator=g)
    if dist == "laplace":
        u = torch.rand(shape, generator=g) - 0.5
        return -torch.sign(u) * torch.log1p(-2 * u.abs())
    if dist == "uniform":
        return torch.rand(shape, generator=g) * 3 - 1
    if dist == "outliers":
        x = torch.randn(shape, generator=g)
        x.view(-1)[:: max(1, x.numel() // 7)] *= 25
        return x
    raise ValueError(dist)


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean())


def fake_quantize(x: torch.Tensor, bits: int, **kwargs) -> torch.Tensor:
    return make_grid(x, bits, **kwargs)(x)


def levels(grid: Grid) -> torch.Tensor:
    """All levels of a per-tensor grid, ascending."""
    return (torch.arange(grid.qmin, grid.qmax + 1, dtype=grid.scale.dtype) - grid.zero_point) * grid.scale


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_number_of_levels(bits: int, kind: str) -> None:
    kwargs, expected = KINDS[kind]
    # symmetric grids span [-max|x|, max|x|]: give them data reaching both ends
    x = torch.linspace(-1.0 if kind == "affine" else -2.0, 2.0, 200_001)
    if kind == "unsigned":
        x = x.clamp_min(0)
    grid = make_grid(x, bits, clip="minmax", **kwargs)
    assert grid.num_levels == expected(bits)
    # every level is a fixed point (the full-range symmetric grid's lowest level lies one step past -alpha)
    assert torch.unique(grid(torch.cat([x, levels(grid)]))).numel() == expected(bits)
    assert levels(grid).numel() == expected(bits)


@pytest.mark.parametrize("bits", [2, 4])
def test_zero_is_a_level_except_on_the_zero_free_grid(bits: int) -> None:
    x = torch.randn(1000)
    for kind in ("symmetric", "affine"):
        assert (levels(make_grid(x, bits, clip="minmax", **KINDS[kind][0])) == 0).any()
    zero_free = levels(make_grid(x, bits, clip="minmax", symmetric=True, zero_free=True))
    assert not (zero_free == 0).any()
    assert torch.allclose(zero_free, -zero_free.flip(0))  # symmetric about 0


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("per_channel", [False, True])
def test_idempotent(bits: int, kind: str, per_channel: bool) -> None:
    x = sample("gauss", (8, 4, 3, 3))
    grid = make_grid(x, bits, clip="mse", per_channel=per_channel, **KINDS[kind][0])
    once = grid(x)
    assert torch.equal(grid(once), once)
    assert once.shape == x.shape and once.dtype == x.dtype


@pytest.mark.parametrize("clip", ["minmax", "mse", "lp", "aciq"])
@pytest.mark.parametrize("kind", ["symmetric", "affine"])
def test_error_falls_as_bits_rise(clip: str, kind: str) -> None:
    x = sample("laplace", (64, 512))
    errors = [mse(fake_quantize(x, b, clip=clip, p=3.0, **KINDS[kind][0]), x) for b in range(2, 11)]
    assert all(e1 < e0 for e0, e1 in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("dist", ["gauss", "laplace", "uniform", "outliers"])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("shape,per_channel", [((5000,), False), ((16, 8, 3, 3), False), ((16, 8, 3, 3), True),
                                               ((10, 64), True)])
def test_mse_clip_never_worse_than_minmax(bits: int, dist: str, kind: str, shape, per_channel: bool) -> None:
    x = sample(dist, shape, seed=bits)
    if kind == "unsigned":
        x = x.relu()
    kwargs = {"per_channel": per_channel, **KINDS[kind][0]}
    e_mse = mse(fake_quantize(x, bits, clip="mse", **kwargs), x)
    e_max = mse(fake_quantize(x, bits, clip="minmax", **kwargs), x)
    assert e_mse <= e_max


@pytest.mark.parametrize("dist", ["gauss", "laplace"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lp_clip_grows_with_p(dist: str, bits: int) -> None:
    x = sample(dist, (50_000,))
    alphas = [float(make_grid(x, bits, clip="lp", p=p).alpha) for p in (1.5, 2.0, 3.0, 4.0)]
    assert all(a1 > a0 for a0, a1 in zip(alphas, alphas[1:])), alphas


@pytest.mark.parametrize("dist", ["gauss", "laplace"])
@pytest.mark.parametrize("p", [2.0, 3.0, 4.0])
def test_lp_clip_grows_with_bits(dist: str, p: float) -> None:
    x = sample(dist, (50_000,))
    alphas = [float(make_grid(x, b, clip="lp", p=p).alpha) for b in (2, 3, 4, 6)]
    assert all(a1 > a0 for a0, a1 in zip(alphas, alphas[1:])), alphas


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dist", ["gauss", "laplace", "uniform", "outliers"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_sorted_mse_is_the_elementwise_mse(bits: int, dist: str, kind: str) -> None:
    # The sorted prefix-sum evaluation against the direct one, for every kind of grid and fractions
    # from deep clipping to min-max (so runs at both clamped ends and empty levels are covered).
    x = sample(dist, (20_000,), seed=bits)
    if kind == "unsigned":
        x = x.relu()
    data = x.reshape(1, -1)
    extent, lo, hi = data.abs().amax(1, keepdim=True), data.amin(1, keepdim=True), data.amax(1, keepdim=True)
    build = {"symmetric": lambda t: symmetric_grid(t * extent, bits),
             "zero_free": lambda t: symmetric_grid(t * extent, bits, zero_free=True),
             "unsigned": lambda t: unsigned_grid(t * hi.clamp_min(0), bits),
             "affine": lambda t: affine_grid(t * lo, t * hi, bits)}[kind]
    ts = torch.tensor([0.003, 0.05, 0.2, 0.5, 0.9, 1.0]).view(-1, 1, 1)
    direct = lp_error(build(ts), data.unsqueeze(0), 2.0)
    fast = sorted_mse(x, build)(ts)
    assert fast.shape == direct.shape
    # The direct error squares in float32 (about 1e-8 relative per term); these sums are float64.
    torch.testing.assert_close(fast, direct, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_numpy_sort_gives_torch_sort_values(dtype: torch.dtype) -> None:
    # Rounded so that ties are many; the values of a sort are unique, whatever the algorithm.
    x = (sample("laplace", (30_000,), seed=1) * 8).round().to(dtype)
    out = sorted_values(x)
    assert out.dtype == dtype
    assert torch.equal(out, torch.sort(x).values)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dist", ["gauss", "outliers"])
def test_sorted_search_finds_the_same_clip(bits: int, dist: str) -> None:
    x = sample(dist, (100_000,), seed=bits)
    exact, fast = make_grid(x, bits), make_grid(x, bits, sorted_search=True)
    assert float(fast.scale) == pytest.approx(float(exact.scale), rel=1e-4)
    assert mse(fast(x), x) == pytest.approx(mse(exact(x), x), rel=1e-6)


def test_sorted_search_needs_one_row_and_squares() -> None:
    x = sample("gauss", (4, 100))
    grid = lambda t: symmetric_grid(t, 4)  # noqa: E731
    with pytest.raises(ValueError, match="one row and p = 2"):
        search_fraction(x, grid, 2.0, sorted_search=True)
    with pytest.raises(ValueError, match="one row and p = 2"):
        search_fraction(x[:1], grid, 3.0, sorted_search=True)


def test_mse_clip_matches_known_gaussian_optimum() -> None:
    # Uniform 4-bit symmetric (16 levels) MSE-optimal clip for N(0, 1) is ~2.5 sigma.
    x = sample("gauss", (400_000,))
    assert 2.3 < float(make_grid(x, 4, clip="mse").alpha) < 2.7


@pytest.mark.parametrize("bits,unsigned", [(b, False) for b in ACIQ_LAPLACE] + [(b, True) for b in ACIQ_LAPLACE_RELU])
def test_aciq_constant_solver_matches_table(bits: int, unsigned: bool) -> None:
    table = ACIQ_LAPLACE_RELU if unsigned else ACIQ_LAPLACE
    levels_exp = bits + 1 if unsigned else bits
    solved = [a / 100 for a in range(100, 3000)]
    best = min(solved, key=lambda a: abs(math.exp(-a) - a / (3 * 4**levels_exp)))
    assert abs(best - table[bits]) < 0.05
    assert aciq_laplace_constant(bits, unsigned) == table[bits]
    assert aciq_laplace_constant(bits + 1, unsigned) > aciq_laplace_constant(bits, unsigned) or bits == 8


def test_aciq_clip_on_laplace_data() -> None:
    x = sample("laplace", (200_000,))  # b = 1
    alpha = float(make_grid(x, 4, clip="aciq").alpha)
    assert abs(alpha - ACIQ_LAPLACE[4]) < 0.1


@pytest.mark.parametrize("ch_axis", [0, 1])
def test_per_channel_grid_shape(ch_axis: int) -> None:
    x = sample("gauss", (6, 5, 3, 3))
    x[2] *= 10
    grid = make_grid(x, 4, per_channel=True, ch_axis=ch_axis, clip="minmax")
    expected = [1, 1, 1, 1]
    expected[ch_axis] = x.shape[ch_axis]
    assert list(grid.scale.shape) == expected
    per_tensor = make_grid(x, 4, clip="minmax")
    assert per_tensor.scale.dim() == 0
    assert mse(grid(x), x) < mse(per_tensor(x), x)


@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (10, 64)])
def test_correct_mean_removes_channel_mean_shift(shape) -> None:
    w = sample("laplace", shape) * 0.1 + 0.01
    w_q = make_grid(w, 3, clip="minmax", zero_free=True)(w)
    dims = tuple(range(1, w.dim()))
    assert (w_q.mean(dims) - w.mean(dims)).abs().max() > 1e-4
    corrected = correct_mean(w_q, w)
    assert torch.allclose(corrected.mean(dims), w.mean(dims), atol=1e-6)
    # only a per-channel shift: differences within a channel are unchanged
    assert torch.allclose(corrected - corrected.mean(dims, keepdim=True), w_q - w_q.mean(dims, keepdim=True),
                          atol=1e-6)


@pytest.mark.parametrize("kwargs", [{"clip": "median"}, {"clip": "lp", "p": 0}])
def test_bad_scheme_raises_config_error(kwargs) -> None:
    with pytest.raises(ConfigError, match="accepted"):
        make_grid(torch.randn(10), 4, **kwargs)
    with pytest.raises(ConfigError, match="bits"):
        make_grid(torch.randn(10), 1)


def test_act_quantizer_modes() -> None:
    q = ActQuantizer(4, clip="mse", max_samples=5000, per_batch=1000)
    x = torch.randn(8, 3, 16, 16)
    assert torch.equal(q(x), x)  # off
    with pytest.raises(RuntimeError, match="observed nothing"):
        q.mode = "quant"
    q.mode = "observe"
    for i in range(10):
        assert torch.equal(q(x * (1 + i)), x * (1 + i))
    assert q.observer.sample().numel() <= 5000 + 2  # bounded memory (plus the two extremes)
    assert float(q.observer.running_max) == pytest.approx(float((x * 10).max()))
    q.mode = "quant"
    y = q(x)
    assert torch.unique(y).numel() <= 16 and not torch.equal(y, x)
    q.mode = "off"
    assert torch.equal(q(x), x)
    q.mode = "quant"  # back to quant keeps the fitted grid
    assert torch.equal(q(x), y)
    with pytest.raises(ValueError, match="mode"):
        q.mode = "train"


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()


def test_quantize_model_marks_bits_and_reports() -> None:
    net = small_net()
    w3 = net[3].weight.detach().clone()
    grid = make_grid(w3, 4)
    net[3].weight.data = grid(w3)
    w3 = net[3].weight.detach().clone()
    report = quantize_model(net, {"0": None, "3": (4, 6), "8": (8, 8)}, weight_grids={"3": grid})
    assert [r["name"] for r in report] == ["3", "8"]
    assert isinstance(net[3], QuantLayer) and isinstance(net[0], nn.Conv2d)
    assert not hasattr(net[0], "qaf_bits")
    assert net[3].layer.qaf_bits == (4, 6) and net[8].layer.qaf_bits == (8, 8)
    assert net[1].qaf_bits == (8, 8) and net[4].qaf_bits == (8, 8)
    assert torch.equal(net[3].layer.weight, w3) and net[3].weight_grid is grid  # already on its grid: untouched
    assert torch.unique(net[8].layer.weight).numel() <= 255
    assert report[0]["shape"] == [8, 8, 3, 3] and report[0]["weight_quantized"]
    x = torch.randn(4, 3, 8, 8)
    with observing_activations(net):
        net(x)
    assert net(x).shape == (4, 5)


def test_quant_layer_rejects_other_layers() -> None:
    with pytest.raises(TypeError):
        QuantLayer(nn.ReLU(), 4, 4)


def test_observation_is_independent_of_batch_order_and_merges_exactly() -> None:
    # Bottom-k subsampling keyed by batch index: two "ranks" seeing alternate batches, merged,
    # give exactly what one process seeing all batches gets.
    batches = [torch.randn(4, 3, 8, 8) * (i + 1) for i in range(6)]
    single, rank0, rank1 = (ActQuantizer(4, max_samples=300, per_batch=100, seed=3) for _ in range(3))
    for q in (single, rank0, rank1):
        q.mode = "observe"
    for i, x in enumerate(batches):
        with batch_index(i):
            single(x)
            (rank0 if i % 2 == 0 else rank1)(x)
    rank0.observer.merge([rank0.observer.observation(), rank1.observer.observation()])
    assert torch.equal(single.observer.sample(), rank0.observer.sample())
    single.mode = rank0.mode = "quant"
    assert torch.equal(single.grid.scale, rank0.grid.scale)


def test_straight_through_gradient_inside_the_grid_only() -> None:
    x = torch.linspace(-3, 3, 61, requires_grad=True)
    grid = make_grid(torch.linspace(-1, 1, 11), 3, clip="minmax")
    y = grid.ste(x)
    torch.testing.assert_close(y.detach(), grid(x.detach()))
    y.sum().backward()
    lo, hi = grid.bounds()
    assert torch.equal(x.grad, ((x >= lo) & (x <= hi)).float())
