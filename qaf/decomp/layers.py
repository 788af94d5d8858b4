"""Factorized layers built from CP factors.

A conv weight ``W[o, i, y, x] = sum_r A[o, r] B[i, r] C[y*kw + x, r]`` is applied as
1x1 conv (Cin -> R, weight B^T) -> depthwise kh x kw conv (R groups, weight C, the original
stride / padding / dilation) -> 1x1 conv (R -> Cout, weight A, the original bias). A 1x1 conv
or linear layer ``W = A B^T`` becomes two layers (Cin -> R, R -> Cout).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn

from qaf.layer_type import LayerType, TensorReader, TensorWriter
from qaf.quant.modules import QuantLayer

__all__ = ["CPConv2d", "CPLinear"]

#: Run CP convs in channels_last during CPU inference (exact; False restores the plain path).
CHANNELS_LAST_ON_CPU = True


class CPConv2d(LayerType):
    """A conv layer given by rank-R CP factors, as three convolutions.

    Parameters
    ----------
    conv : nn.Conv2d
        The layer being replaced (groups == 1); supplies stride, padding, dilation, padding
        mode and bias.
    factors : list of Tensor
        ``[A (Cout, R), B (Cin, R), C (kh*kw, R)]``.
    """

    kind = "cp_conv2d"
    factorized = True

    def __init__(self, conv: nn.Conv2d, factors: list[Tensor]):
        super().__init__()
        if conv.groups != 1:
            raise ValueError("CPConv2d needs a conv with groups == 1")
        a, b, c = factors
        kh, kw = conv.kernel_size
        self.rank = rank = a.shape[1]
        if a.shape[0] != conv.out_channels or b.shape[0] != conv.in_channels or c.shape[0] != kh * kw:
            raise ValueError("factor shapes do not match the conv weight")
        kw_args = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        self.pointwise_in = nn.Conv2d(conv.in_channels, rank, 1, bias=False, **kw_args)
        self.depthwise = nn.Conv2d(
            rank, rank, (kh, kw), stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=rank, bias=False, padding_mode=conv.padding_mode, **kw_args,
        )
        self.pointwise_out = nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None, **kw_args)
        with torch.no_grad():
            self.pointwise_in.weight.copy_(b.T.reshape(rank, conv.in_channels, 1, 1))
            self.depthwise.weight.copy_(c.T.reshape(rank, 1, kh, kw))
            self.pointwise_out.weight.copy_(a.reshape(conv.out_channels, rank, 1, 1))
            if conv.bias is not None:
                self.pointwise_out.bias.copy_(conv.bias)

    def export_record(self, name: str, writer: TensorWriter) -> dict[str, Any]:
        return {"rank": self.rank}  # the sub-convs have records or float tensors of their own

    @classmethod
    def from_record(cls, name: str, record: dict[str, Any], current: nn.Module, reader: TensorReader) -> nn.Module:
        kh, kw = current.kernel_size
        sizes = (current.out_channels, current.in_channels, kh * kw)
        return cls(current, [current.weight.new_zeros(n, record["rank"]) for n in sizes])

    def deploy_module(self) -> nn.Module:
        """Its three convs in a row (the plain path of :meth:`forward`)."""
        return nn.Sequential(OrderedDict(pointwise_in=self.pointwise_in, depthwise=self.depthwise,
                                         pointwise_out=self.pointwise_out))

    def forward(self, x: Tensor) -> Tensor:
        if not (CHANNELS_LAST_ON_CPU and x.dim() == 4 and x.device.type == "cpu" and not torch.is_grad_enabled()):
            return self.pointwise_out(self.depthwise(self.pointwise_in(x)))
        # Inference on the CPU: the three convs run in channels_last (oneDNN's 1x1 and depthwise
        # kernels are several times faster there, with the same results bit for bit), and the
        # input quantizers of the sub-convs quantize the tensors this layer owns in place (the
        # channels_last copy of the input, the sub-convs' outputs) instead of allocating new ones.
        # The output is returned in the input's memory format; tests/test_export.py checks that
        # logits are bit-identical to the plain path.
        y = x.contiguous(memory_format=torch.channels_last)
        owned = y is not x
        for sub in (self.pointwise_in, self.depthwise, self.pointwise_out):
            y = sub(y, inplace=True) if owned and isinstance(sub, QuantLayer) else sub(y)
            owned = True
        return y if x.is_contiguous(memory_format=torch.channels_last) else y.contiguous()


class CPLinear(LayerType):
    """A linear layer (or 1x1 conv) ``W = A B^T`` as two layers of width R.

    Parameters
    ----------
    layer : nn.Linear or nn.Conv2d
        The layer being replaced (a conv must be 1x1, groups == 1); supplies the bias and, for a
        conv, the stride.
    factors : list of Tensor
        ``[A (Cout, R), B (Cin, R)]``.
    """

    kind = "cp_linear"
    factorized = True

    def __init__(self, layer: nn.Linear | nn.Conv2d, factors: list[Tensor]):
        super().__init__()
        a, b = factors
        self.rank = rank = a.shape[1]
        bias = layer.bias is not None
        kw_args = {"device": layer.weight.device, "dtype": layer.weight.dtype}
        first: nn.Module
        second: nn.Module
        if isinstance(layer, nn.Linear):
            first = nn.Linear(b.shape[0], rank, bias=False, **kw_args)
            second = nn.Linear(rank, a.shape[0], bias=bias, **kw_args)
            w1, w2 = b.T, a
        else:
            if layer.kernel_size != (1, 1) or layer.groups != 1:
                raise ValueError("CPLinear replaces only 1x1 convs with groups == 1")
            first = nn.Conv2d(b.shape[0], rank, 1, stride=layer.stride, padding=layer.padding, bias=False,
                              **kw_args)
            second = nn.Conv2d(rank, a.shape[0], 1, bias=bias, **kw_args)
            w1, w2 = b.T[:, :, None, None], a[:, :, None, None]
        with torch.no_grad():
            first.weight.copy_(w1)
            second.weight.copy_(w2)
            if bias:
                second.bias.copy_(layer.bias)
        self.first, self.second = first, second

    def export_record(self, name: str, writer: TensorWriter) -> dict[str, Any]:
        return {"rank": self.rank}

    @classmethod
    def from_record(cls, name: str, record: dict[str, Any], current: nn.Module, reader: TensorReader) -> nn.Module:
        cout, cin = current.weight.shape[:2]
        return cls(current, [current.weight.new_zeros(cout, record["rank"]), current.weight.new_zeros(cin, record["rank"])])

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(x))

