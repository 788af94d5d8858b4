"""Layers whose weight is generated on the fly from QSWD factors (:mod:`qaf.decomp.qswd`).

The layer stores the sparse codes of Z (atom indices and values), the dictionary C and fixed
per-tensor grids.  Its weight is ``W = matrix_to_weight(Z C)`` quantized per tensor to
``weight_bits`` on a grid fitted once, at construction.  For fine-tuning, the code values and the
dictionary are float parameters holding the dequantized values; the forward pass rounds them (and
the generated weight) with a straight-through estimator, so the grids and the sparsity pattern
stay fixed while the values move.  In eval mode the generated weight is cached.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from qaf.decomp.qswd import QSWDResult, matrix_to_weight, sparse_product, weight_to_matrix
from qaf.layer_type import LayerType, TensorReader, TensorWriter
from qaf.quant.modules import QuantLayer
from qaf.quant.qdq import DequantizedWeight, LoweredLayer
from qaf.quant.uniform import Grid, make_grid, same_bits

__all__ = ["QSWDConv2d", "QSWDLinear"]

#: The tensors that may lie on a grid, in storage order.
_GRIDDED = ("values", "dictionary", "weight")


def _bits(grid: Grid) -> int:
    """Bit width of a grid with 2^b levels."""
    return grid.num_levels.bit_length() - 1


def _ste(x: Tensor, grid: Grid | None) -> Tensor:
    return x if grid is None else grid.ste(x)


class _QSWDLayer(LayerType):
    """Weight generation, caching, export and storage shared by the conv and linear layers.

    Parameters
    ----------
    weight : Tensor
        The weight being replaced: gives the shape, device and dtype.
    bias : Tensor or None
        Its bias (copied into a trainable parameter).
    result : QSWDResult
        Factors of ``weight_to_matrix(weight, block)``.
    block : str
        The block the matrix was cut with.
    weight_bits : int or None
        Bits of the per-tensor symmetric grid of the generated weight (MSE clip); None: float.
    """

    factorized = True

    def __init__(
        self, weight: Tensor, bias: Tensor | None, result: QSWDResult, block: str, weight_bits: int | None
    ):
        super().__init__()
        n, d = weight_to_matrix(weight.detach(), block).shape
        if result.index.shape[0] != n or result.dictionary.shape[1] != d:
            raise ValueError(
                f"factors ({result.index.shape[0]} rows, atoms of {result.dictionary.shape[1]}) do not "
                f"match the {(n, d)} matrix of a {tuple(weight.shape)} weight cut by {block!r}"
            )
        like = {"device": weight.device, "dtype": weight.dtype}
        self.block, self.weight_shape, self.unit_codes = block, tuple(weight.shape), result.unit_codes
        self._ranges: dict[str, tuple[int, int]] = {}
        self._cache: tuple[tuple[int, ...], Tensor] | None = None
        self.register_buffer("index", result.index.to(weight.device))
        if self.unit_codes:  # fixed to 1: not trained, not stored
            self.register_buffer("values", torch.ones(result.values.shape, **like))
        else:
            self.values = nn.Parameter(result.values.detach().to(**like))
        self.dictionary = nn.Parameter(result.dictionary.detach().to(**like))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self._set_grid("values", result.code_grid)
        self._set_grid("dictionary", result.dict_grid)
        with torch.no_grad():
            generated = self._generate()
        self._set_grid("weight", None if weight_bits is None else make_grid(generated, weight_bits, clip="mse"))

    def _set_grid(self, name: str, grid: Grid | None) -> None:
        if grid is None:
            return
        self._ranges[name] = (grid.qmin, grid.qmax)
        self.register_buffer(f"{name}_scale", grid.scale.detach().to(self.dictionary).clone())
        self.register_buffer(f"{name}_zero_point", grid.zero_point.detach().to(self.dictionary).clone())

    def grid(self, name: str) -> Grid | None:
        """The fixed grid of ``"values"``, ``"dictionary"`` or ``"weight"`` (None: float)."""
        if name not in self._ranges:
            return None
        return Grid(getattr(self, f"{name}_scale"), getattr(self, f"{name}_zero_point"), *self._ranges[name])

    def _generate(self) -> Tensor:
        """``Z C`` from the (straight-through rounded) factors, reshaped to the weight, rounded."""
        values = _ste(self.values, self.grid("values"))
        dictionary = _ste(self.dictionary, self.grid("dictionary"))
        weight = matrix_to_weight(sparse_product(self.index, values, dictionary), self.weight_shape, self.block)
        return _ste(weight, self.grid("weight"))

    @property
    def weight(self) -> Tensor:
        """The generated (quantized) weight; cached in eval mode when no gradient is recorded."""
        params = [p for p in (self.values, self.dictionary) if isinstance(p, nn.Parameter)]
        if self.training or (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
            return self._generate()
        key = tuple(p._version for p in params)  # bumped by every in-place update (optimizer, load)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self._generate())
        return self._cache[1]

    def _apply(self, fn, *args, **kwargs):
        self._cache = None  # .to(), .half(), ... replace the tensors the cache was made from
        return super()._apply(fn, *args, **kwargs)

    def storage(self) -> list[tuple[str, int, int]]:
        """What the layer stores: ``(name, entries, bits per entry)`` per tensor.

        Code values cost ``code_bits`` (32 when float, 0 for unit codes). The sparsity pattern
        costs the cheaper of ``ceil(log2 k)`` bits per index and an n x k bitmap, and nothing when
        ``s = k`` (dense codes). The dictionary costs ``dict_bits`` (32 when float); each grid's
        scale and zero point, and the bias, 32 bits per entry.
        """
        (n, s), k = self.index.shape, self.dictionary.shape[0]
        values_grid, dict_grid = self.grid("values"), self.grid("dictionary")
        entries = [("values", n * s, 0 if self.unit_codes else (_bits(values_grid) if values_grid else 32))]
        index_bits = 0 if s == k else math.ceil(math.log2(k))
        entries.append(("index", n * s, index_bits) if index_bits * s <= k else ("bitmap", n * k, 1))
        entries.append(("dictionary", self.dictionary.numel(), _bits(dict_grid) if dict_grid else 32))
        for name in _GRIDDED:
            if name in self._ranges:
                entries += [(f"{name}_scale", 1, 32), (f"{name}_zero_point", 1, 32)]
        if self.bias is not None:
            entries.append(("bias", self.bias.numel(), 32))
        return entries

    def export_record(self, name: str, writer: TensorWriter) -> dict[str, Any]:
        """Code values and dictionary as codes on their grids (float without one), the atom indices
        as cheaply as :meth:`storage` counts them, the three grids and the bias."""
        (n, s), k = self.index.shape, self.dictionary.shape[0]
        record: dict[str, Any] = {"block": self.block, "unit_codes": self.unit_codes, "n": n, "s": s, "k": k,
                                  "grids": {}, "bias": self.bias is not None}
        for part in _GRIDDED:
            grid = self.grid(part)
            if grid is not None:
                record["grids"][part] = writer.grid(f"{name}.{part}", grid.to("cpu"), always_zero_point=True)
        for part in ("dictionary",) if self.unit_codes else ("values", "dictionary"):
            tensor, grid = getattr(self, part).detach().cpu(), self.grid(part)
            if grid is None:
                writer.float(f"{name}.{part}", tensor)
            else:
                grid = grid.to("cpu")
                writer.codes(f"{name}.{part}_codes", grid.codes(tensor), grid.qmin, grid.qmax)
            record[part] = "float" if grid is None else "codes"
        index = self.index.cpu()
        index_bits = 0 if s == k else math.ceil(math.log2(k))
        ascending = bool((index[:, 1:] > index[:, :-1]).all()) if s > 1 else True
        if index_bits == 0 and bool((index == torch.arange(k)).all()):
            record["index"] = "dense"
        elif index_bits * s > k and ascending:
            writer.codes(f"{name}.bitmap", torch.zeros(n, k, dtype=torch.long).scatter_(1, index, 1), 0, 1)
            record["index"] = "bitmap"
        else:
            writer.codes(f"{name}.index", index, 0, (1 << max(index_bits, (k - 1).bit_length())) - 1)
            record["index"] = "packed"
        if self.bias is not None:
            writer.float(f"{name}.bias", self.bias)
        return record

    @classmethod
    def from_record(cls, name: str, record: dict[str, Any], current: nn.Module, reader: TensorReader) -> nn.Module:
        n, s, k = record["n"], record["s"], record["k"]
        grids = {part: reader.grid(f"{name}.{part}", spec) for part, spec in record["grids"].items()}

        def part(key: str) -> Tensor:
            if record[key] == "float":
                return reader.float(f"{name}.{key}")
            return grids[key].dequantize(reader.codes(f"{name}.{key}_codes"))

        if record["index"] == "dense":
            index = torch.arange(k).expand(n, k).clone()
        elif record["index"] == "bitmap":
            index = torch.nonzero(reader.codes(f"{name}.bitmap").bool())[:, 1].reshape(n, s)
        else:
            index = reader.codes(f"{name}.index")
        dictionary = part("dictionary")
        values = torch.ones(n, s, dtype=dictionary.dtype) if record["unit_codes"] else part("values")
        result = QSWDResult(index, values, dictionary, grids.get("values"), grids.get("dictionary"),
                            record["unit_codes"], 0.0, 0, 0)
        layer = cls(current, result, record["block"], weight_bits=None)
        if "weight" in grids:
            layer._set_grid("weight", grids["weight"])
        layer._cache = None
        if record["bias"]:
            with torch.no_grad():
                layer.bias.copy_(reader.float(f"{name}.bias"))
        return layer

    def onnx_module(self) -> nn.Module:
        """One dense conv / linear layer on the regenerated weight's codes (the sparse factors are
        the artifact's business)."""
        with torch.no_grad():
            weight = self.weight.detach().cpu()
        lowered: DequantizedWeight | Tensor = weight
        grid = self.grid("weight")
        if grid is not None:
            grid = grid.to("cpu")
            codes = grid.codes(weight)
            if same_bits(grid.dequantize(codes, weight.dtype), weight):
                lowered = DequantizedWeight(grid, codes)
        conv = (self.stride, self.padding, self.dilation, 1) if isinstance(self, QSWDConv2d) else None
        return LoweredLayer(lowered, self.bias, conv)

    def deploy_module(self) -> nn.Module:
        """A dense conv / linear layer on the regenerated weight: a ``QuantLayer`` on the weight's
        grid (a float layer without one)."""
        with torch.no_grad():
            weight = self.weight.detach()
        if isinstance(self, QSWDConv2d):
            cout, cin, kh, kw = self.weight_shape
            dense: nn.Module = nn.Conv2d(cin, cout, (kh, kw), self.stride, self.padding, self.dilation,
                                         bias=self.bias is not None, device=weight.device, dtype=weight.dtype)
        else:
            dense = nn.Linear(self.weight_shape[1], self.weight_shape[0], bias=self.bias is not None,
                              device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            dense.weight.copy_(weight)
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        grid = self.grid("weight")
        if grid is None:
            return dense
        bits = getattr(self, "qaf_bits", (_bits(grid), 32))
        return QuantLayer(dense, _bits(grid), bits[1], weight_grid=grid, fit_weight=False, act=nn.Identity())


class QSWDConv2d(_QSWDLayer):
    """A conv layer whose weight is generated from QSWD factors (see the module doc).

    Parameters
    ----------
    conv : nn.Conv2d
        The layer being replaced (groups == 1, zero padding); supplies stride, padding,
        dilation and bias.
    result : QSWDResult
        Factors of ``weight_to_matrix(conv.weight, block)``.
    block : {"kernel", "row", "input"}
        How the weight was cut into sub-vectors.
    weight_bits : int or None
        Bits of the generated weight's grid (fitted once here); None: not quantized.
    """

    kind = "qswd_conv2d"

    def __init__(self, conv: nn.Conv2d, result: QSWDResult, block: str = "kernel", weight_bits: int | None = 8):
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError("QSWDConv2d needs a conv with groups == 1 and padding_mode 'zeros'")
        super().__init__(conv.weight, conv.bias, result, block, weight_bits)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)

    def macs(self, output: Tensor) -> int:
        """MACs per sample of the dense conv it runs (see qaf.metrics.bops)."""
        cout, cin, kh, kw = self.weight_shape
        return output[0].numel() * cin * kh * kw


class QSWDLinear(_QSWDLayer):
    """A linear layer whose weight is generated from QSWD factors (blocks ``"row"``, ``"input"``).

    Parameters are those of :class:`QSWDConv2d`, with ``linear`` the layer being replaced.
    """

    kind = "qswd_linear"

    def __init__(self, linear: nn.Linear, result: QSWDResult, block: str = "row", weight_bits: int | None = 8):
        super().__init__(linear.weight, linear.bias, result, block, weight_bits)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def macs(self, output: Tensor) -> int:
        """MACs per sample of the dense linear layer it runs (see qaf.metrics.bops)."""
        return output[0].numel() * self.weight_shape[1]
