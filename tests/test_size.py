"""Model size: every stored tensor at its real bit width, the same rule for every method."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qaf.metrics.size import size_bytes, storage_entries
from qaf.quant.modules import quantize_model


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, 5)).eval()


def test_float_model_is_four_bytes_per_stored_float():
    model = net()
    params = sum(p.numel() for p in model.parameters())
    assert size_bytes(model) == 4 * (params + 2 * 8)  # + BN running mean and variance
    assert not any("num_batches_tracked" in name for name, _, _ in storage_entries(model))


def test_quantized_layers_count_codes_grids_and_float_leftovers():
    model = net()
    float_bytes = size_bytes(model)
    quantize_model(model, {"0": (4, 8), "4": (8, 8)}, weight_scheme={"symmetric": False, "clip": "minmax"})
    for q in (model[0].act, model[4].act):  # grids are fitted on calibration data
        q.mode = "observe"
    model(torch.randn(2, 3, 8, 8))
    for q in (model[0].act, model[4].act):
        q.mode = "quant"
    bits = (8 * 3 * 9 * 4 + 2 * 32          # conv codes + affine grid (scale, zero point)
            + 4 * 8 * 32                     # BN weight, bias, running mean, variance
            + 5 * 288 * 8 + 2 * 32 + 5 * 32  # linear codes + grid + float bias
            + 2 * 2 * 32)                    # two activation grids
    assert size_bytes(model) == pytest.approx(bits / 8, abs=1)
    assert size_bytes(model) < float_bytes / 3
    kinds = {name.rsplit(".", 1)[-1] for name, _, _ in storage_entries(model)}
    assert kinds >= {"weight_codes", "weight_scale", "bias", "running_mean"}


def test_cp_layer_size_by_hand():
    # A rank-5 CP layer of an 8 -> 12, 3x3 conv without bias, its three sub-convs at 4-bit weights on
    # symmetric grids (scale only) with 8-bit input quantizers (scale and zero point each):
    # codes (8*5 + 5*9 + 12*5) * 4 = 580 bits, weight scales 3 * 32, activation grids 3 * 64 -> 868
    # bits = 108.5 bytes, counted as 109.
    from qaf.decomp.layers import CPConv2d

    g = torch.Generator().manual_seed(0)
    layer = CPConv2d(nn.Conv2d(8, 12, 3, padding=1, bias=False),
                     [torch.randn(12, 5, generator=g), torch.randn(8, 5, generator=g), torch.randn(9, 5, generator=g)])
    model = nn.Sequential(layer).eval()
    quantize_model(model, {f"0.{s}": (4, 8) for s in ("pointwise_in", "depthwise", "pointwise_out")},
                   weight_scheme={"symmetric": True, "clip": "minmax"})
    quantizers = [m for m in model.modules() if hasattr(m, "mode") and hasattr(m, "set_grid")]
    assert len(quantizers) == 3
    for q in quantizers:
        q.mode = "observe"
    model(torch.randn(2, 8, 10, 10))
    for q in quantizers:
        q.mode = "quant"
    assert size_bytes(model) == 109
