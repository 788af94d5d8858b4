"""Quantization primitives: uniform grids and clip rules, fake-quant modules."""

from qaf.quant.uniform import Grid, correct_mean, fake_quantize, make_grid

__all__ = ["Grid", "correct_mean", "fake_quantize", "make_grid"]
