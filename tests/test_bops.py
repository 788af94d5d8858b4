"""MACs and BOPs counted by forward hooks on the model actually run."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from qaf.decomp.layers import CPConv2d
from qaf.metrics.bops import bops_pct, layer_costs, paper_bops_pct, total_bops, total_macs


def test_resnet18_macs_at_224_match_the_papers_constant():
    # conv + fc 1,814,073,344 plus BN 4,967,424 (the constant behind the paper's %BOPs).
    costs = layer_costs(torchvision.models.resnet18(), (3, 224, 224))
    assert total_macs(costs) == 1_819_040_768
    bn = sum(c.macs for c in costs if c.kind == "BatchNorm2d")
    assert bn == 4_967_424


@pytest.mark.parametrize("stride, padding, groups", [(1, 1, 1), (2, 0, 1), (1, 1, 4)])
def test_conv_macs_formula(stride, padding, groups):
    conv = nn.Conv2d(8, 12, 3, stride=stride, padding=padding, groups=groups)
    (cost,) = layer_costs(conv, (8, 10, 10))
    out = conv(torch.zeros(1, 8, 10, 10))
    assert cost.macs == out.shape[2] * out.shape[3] * 12 * (8 // groups) * 9


def test_bits_come_from_the_modules():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    costs = layer_costs(model, (3, 8, 8))
    macs = [c.macs for c in costs]
    assert total_bops(costs) == total_macs(costs) * 32 * 32
    assert bops_pct(total_bops(costs), total_macs(costs)) == pytest.approx(100.0)
    model[0].qaf_bits = (4, 8)
    model[1].qaf_bits = (8, 8)
    model[4].qaf_bits = (8, 4)
    quantized = layer_costs(model, (3, 8, 8))
    assert total_bops(quantized) == macs[0] * 32 + macs[1] * 64 + macs[2] * 32
    assert bops_pct(total_bops(quantized), total_macs(costs)) < 100.0 * 64 / 1024


def test_shared_module_counts_every_call():
    conv = nn.Conv2d(4, 4, 1)
    model = nn.Sequential(conv, conv)
    assert total_macs(layer_costs(model, (4, 5, 5))) == 2 * 25 * 16


def test_paper_convention_for_unfactorized_baselines_and_per_layer_for_factorized():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3))
    costs = layer_costs(model, (3, 10, 10))
    fp32 = total_macs(costs)
    assert paper_bops_pct(model, costs, fp32, 4, 8) == 100.0  # nothing quantized
    model[0].qaf_bits, model[1].qaf_bits, model[3].qaf_bits = (8, 8), (8, 8), (4, 8)
    costs = layer_costs(model, (3, 10, 10))
    assert paper_bops_pct(model, costs, fp32, 4, 8) == pytest.approx(100 * 4 * 8 / 1024)
    assert bops_pct(total_bops(costs), fp32) > 100 * 4 * 8 / 1024  # per layer: the 8-bit stem costs more
    g = torch.Generator().manual_seed(0)
    model[3] = CPConv2d(model[3], [torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g),
                                   torch.randn(9, 5, generator=g)])
    for sub in (model[3].pointwise_in, model[3].depthwise, model[3].pointwise_out):
        sub.qaf_bits = (4, 8)
    costs = layer_costs(model, (3, 10, 10))
    assert paper_bops_pct(model, costs, fp32, 4, 8) == pytest.approx(bops_pct(total_bops(costs), fp32))


def test_cp_layer_bops_by_hand():
    # 8 -> 12 channels, 3x3, padding 1, rank 5, on 8 x 10 x 10 inputs, every sub-conv at 4-bit
    # weights and 8-bit inputs: 1x1 in 10*10*8*5 = 4,000 MACs, depthwise 10*10*5*9 = 4,500,
    # 1x1 out 10*10*5*12 = 6,000; BOPs 14,500 * 4 * 8 = 464,000.
    g = torch.Generator().manual_seed(0)
    layer = CPConv2d(nn.Conv2d(8, 12, 3, padding=1, bias=False),
                     [torch.randn(12, 5, generator=g), torch.randn(8, 5, generator=g), torch.randn(9, 5, generator=g)])
    for sub in (layer.pointwise_in, layer.depthwise, layer.pointwise_out):
        sub.qaf_bits = (4, 8)
    costs = layer_costs(layer, (8, 10, 10))
    assert [c.macs for c in costs] == [4000, 4500, 6000]
    assert total_bops(costs) == 464_000
    layer.depthwise.qaf_bits = (6, 8)
    assert total_bops(layer_costs(layer, (8, 10, 10))) == 464_000 + 4500 * (6 - 4) * 8


def test_qswd_layer_runs_a_dense_conv_by_hand():
    # A regenerated 12 x 8 x 3 x 3 weight runs as one dense conv: 12 * 10 * 10 outputs x 8 * 9 MACs.
    from qaf.decomp.qswd import qswd, weight_to_matrix
    from qaf.decomp.qswd_layer import QSWDConv2d

    conv = nn.Conv2d(8, 12, 3, padding=1)
    result = qswd(weight_to_matrix(conv.weight.detach(), "kernel"), 4, 1, max_iter=2)
    layer = QSWDConv2d(conv, result, "kernel")
    layer.qaf_bits = (8, 8)
    (cost,) = layer_costs(layer, (8, 10, 10))
    assert cost.macs == 12 * 10 * 10 * 8 * 9 and total_bops(layer_costs(layer, (8, 10, 10))) == cost.macs * 64
