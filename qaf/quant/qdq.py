"""Fake quantization in the standard quantize / dequantize ops that ``torch.onnx.export`` lowers to
``QuantizeLinear`` / ``DequantizeLinear`` (``torch.ops.quantized_decomposed``, as PyTorch's PT2E
quantization represents a quantized model).

Each layer type's ``onnx_module()`` is built from these: :class:`QuantizeDequantize` for an
activation grid, :class:`LoweredLayer` for a conv / linear layer whose weight is integer codes
dequantized on its grid (:class:`DequantizedWeight`). They exist for the exporter; the fake-quant
modules remain what a run evaluates.
"""

from __future__ import annotations

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
import torch.nn.functional as F
from torch import Tensor, nn

from qaf.quant.uniform import Grid

_OPS = torch.ops.quantized_decomposed
#: Integer types of ONNX Q/DQ, smallest first (16-bit ones from opset 21).
_TYPES = (torch.uint8, torch.int8, torch.uint16, torch.int16)


def int_type(qmin: int, qmax: int) -> tuple[torch.dtype, int, int]:
    """(dtype, type min, type max) of the smallest Q/DQ integer type holding ``qmin..qmax``."""
    for dtype in _TYPES:
        info = torch.iinfo(dtype)
        if info.min <= qmin and qmax <= info.max:
            return dtype, info.min, info.max
    raise NotImplementedError(f"codes {qmin}..{qmax} do not fit a 16-bit ONNX type")


class QuantizeDequantize(nn.Module):
    """A per-tensor activation grid: ``QuantizeLinear -> DequantizeLinear`` in the integer type of its
    codes, behind a ``Clip`` to its first and last level when the grid is narrower than the type
    (``round(clip(x, lo, hi) / s) + z`` is the grid's ``clamp(round(x / s) + z, qmin, qmax)``).

    Parameters
    ----------
    grid : Grid
        A per-tensor grid with an integer zero point.
    """

    def __init__(self, grid: Grid):
        super().__init__()
        zero_point = float(grid.zero_point)
        if grid.scale.dim() != 0 or zero_point != round(zero_point):
            raise NotImplementedError("only per-tensor activation grids with an integer zero point lower to ONNX")
        self.scale, self.zero_point = float(grid.scale), int(zero_point)
        self.dtype, self.tmin, self.tmax = int_type(grid.qmin, grid.qmax)
        lo, hi = grid.bounds()
        self.clip = None if (grid.qmin, grid.qmax) == (self.tmin, self.tmax) else (float(lo), float(hi))

    def forward(self, x: Tensor) -> Tensor:
        if self.clip is not None:
            x = x.clamp(*self.clip)
        args = (self.scale, self.zero_point, self.tmin, self.tmax, self.dtype)
        return _OPS.dequantize_per_tensor(_OPS.quantize_per_tensor(x, *args), *args)


class DequantizedWeight(nn.Module):
    """A weight as integer codes: ``DequantizeLinear`` (per tensor, or per output channel), then the
    subtraction of a per-channel ``offset`` (bias correction) when given.

    LAPQ's zero-free grid (zero point ``(2^b - 1) / 2``, which ONNX cannot hold) is stored as the odd
    integers ``2 q - (2^b - 1)`` with half the scale: ``(2q - 2z) * (s / 2)`` and ``(q - z) * s`` are
    one rounding of the same real number, so the dequantized weight is bit-identical.

    Parameters
    ----------
    grid : Grid
        The weight's grid (scale 0-d, or shaped ``[C, 1, ...]`` along the output channels).
    codes : Tensor
        Its codes (``grid.codes(weight)``).
    offset : Tensor, optional
        Subtracted after dequantization.
    dtype : torch.dtype, optional
        The codes' integer type (default: the smallest holding them); ``torch.int32`` for a bias
        on the grid of an integer kernel's accumulator.
    """

    def __init__(self, grid: Grid, codes: Tensor, offset: Tensor | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        scale, zero_point = grid.scale.detach().float().cpu(), grid.zero_point.detach().float().cpu()
        codes = codes.detach().cpu()
        if bool((zero_point != torch.round(zero_point)).any()):
            codes, scale, zero_point = codes * 2 - zero_point * 2, scale / 2, torch.zeros_like(zero_point)
        codes, zero_point = codes.round().long(), zero_point.round().long()
        lo, hi = min(int(codes.min()), int(zero_point.min())), max(int(codes.max()), int(zero_point.max()))
        if dtype is None:
            self.dtype, self.tmin, self.tmax = int_type(lo, hi)
        else:
            self.dtype, self.tmin, self.tmax = dtype, torch.iinfo(dtype).min, torch.iinfo(dtype).max
        self.per_channel = scale.dim() > 0
        if self.per_channel and scale.numel() != codes.shape[0]:
            raise NotImplementedError("a per-channel weight grid lowers to ONNX along the output channels only")
        self.register_buffer("codes", codes.to(self.dtype))
        if self.per_channel:
            self.register_buffer("scale", scale.reshape(-1))
            self.register_buffer("zero_point", zero_point.reshape(-1))
        else:  # numbers, as the per-tensor op takes them
            self.scale, self.zero_point = float(scale), int(zero_point)
        self.register_buffer("offset", None if offset is None else offset.detach().float().cpu())

    def forward(self) -> Tensor:
        if self.per_channel:
            weight = _OPS.dequantize_per_channel(self.codes, self.scale, self.zero_point, 0, self.tmin, self.tmax,
                                                 self.dtype)
        else:
            weight = _OPS.dequantize_per_tensor(self.codes, self.scale, self.zero_point, self.tmin, self.tmax,
                                                self.dtype)
        return weight if self.offset is None else weight - self.offset


class LoweredLayer(nn.Module):
    """A conv or linear layer on a given weight, behind an input module (a lowered quantizer).

    Parameters
    ----------
    weight : DequantizedWeight or Tensor
        Integer codes to dequantize, or a float weight.
    bias : DequantizedWeight, Tensor or None
        The bias: int32 codes to dequantize (the accumulator's grid of an integer kernel), float, or none.
    conv : tuple, optional
        ``(stride, padding, dilation, groups)`` of a conv with zero padding; None: a linear layer.
    act : nn.Module, optional
        Applied to the input first.
    """

    def __init__(self, weight: DequantizedWeight | Tensor, bias: DequantizedWeight | Tensor | None,
                 conv: tuple | None = None, act: nn.Module | None = None):
        super().__init__()
        self.act = act if act is not None else nn.Identity()
        if isinstance(weight, Tensor):
            self.register_buffer("float_weight", weight.detach().float().cpu())
        else:
            self.weight = weight
        if isinstance(bias, DequantizedWeight):
            self.bias_codes = bias
        else:
            self.register_buffer("bias", None if bias is None else bias.detach().float().cpu())
        self.conv = conv

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(x)
        weight = self.float_weight if hasattr(self, "float_weight") else self.weight()
        bias = self.bias_codes() if hasattr(self, "bias_codes") else self.bias
        if self.conv is None:
            return F.linear(x, weight, bias)
        return F.conv2d(x, weight, bias, *self.conv)
