"""Quantization primitives: uniform grids and clip rules, fake-quant modules."""

from qaf.quant.modules import ActQuantizer, QuantLayer, quantize_model, set_act_mode
from qaf.quant.uniform import Grid, correct_mean, fake_quantize, make_grid

__all__ = ["ActQuantizer", "Grid", "QuantLayer", "correct_mean", "fake_quantize", "make_grid", "quantize_model",
           "set_act_mode"]
