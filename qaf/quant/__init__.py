"""Quantization primitives: uniform grids and clip rules, observers, fake-quant modules."""

from qaf.quant.modules import ActQuantizer, QuantLayer, quantize_model
from qaf.quant.observer import Observer
from qaf.quant.uniform import Grid, correct_mean, make_grid

__all__ = ["ActQuantizer", "Grid", "Observer", "QuantLayer", "correct_mean", "make_grid", "quantize_model"]
