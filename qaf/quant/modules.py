"""Fake-quant modules: activation quantizers, quantized conv/linear wrappers, model rewriting."""

from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qaf.config import ConfigError
from qaf.layer_type import LayerType, TensorReader, TensorWriter
from qaf.quant.observer import Observer
from qaf.quant.qdq import DequantizedWeight, LoweredLayer, QuantizeDequantize
from qaf.quant.uniform import Grid, check_scheme, correct_mean, make_grid, same_bits

log = logging.getLogger("qaf")

MODES = ("off", "observe", "quant")
#: Bit width BatchNorm is counted at in a quantized model (BOPs convention of the issue).
BN_BITS = (8, 8)


class ActQuantizer(LayerType):
    """Per-tensor activation fake-quantizer whose grid is fitted to what its observer saw.

    Modes: ``"off"`` is the identity; ``"observe"`` passes the input to ``observer``
    (:class:`qaf.quant.observer.Observer`, identity output); switching to ``"quant"`` fits the
    grid to the observations (unless a grid was set with ``set_grid``) and quantizes from then on.

    Parameters
    ----------
    bits : int
        Bit width.
    clip : {"minmax", "mse", "lp", "aciq"}
        Clip rule (see ``qaf.quant.uniform.make_grid``).
    symmetric : bool
        Signed grid around 0; False (default) gives the affine [min, max] grid.
    unsigned : bool
        Unsigned grid over [0, alpha] (post-ReLU inputs).
    p : float
        Exponent for ``clip="lp"``.
    max_samples, per_batch, seed
        The observer's subsampling (:class:`qaf.quant.observer.Observer`).
    """

    kind = "act_quantizer"

    def __init__(
        self,
        bits: int,
        *,
        clip: str = "mse",
        symmetric: bool = False,
        unsigned: bool = False,
        p: float = 2.0,
        max_samples: int = 1 << 20,
        per_batch: int = 1 << 16,
        seed: int = 0,
    ):
        super().__init__()
        check_scheme(bits, clip, p, key="act_clip")
        self.bits, self.clip, self.symmetric, self.unsigned, self.p = bits, clip, symmetric, unsigned, p
        self.observer = Observer(max_samples, per_batch, seed)
        self._mode = "off"
        self.grid: Grid | None = None
        self._unfitted = False  # observations made since the grid was last fitted or set
        self._fast_grid: Grid | None = None  # the grid _has_offset was computed for
        self._has_offset = False

    @property
    def mode(self) -> str:
        """Current mode; setting ``"quant"`` fits the grid to observations made since the last grid."""
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is invalid: accepted {', '.join(MODES)}")
        if mode == "quant" and (self._unfitted or self.grid is None):
            self.grid = make_grid(self.observer.sample(), self.bits, symmetric=self.symmetric, unsigned=self.unsigned,
                                  clip=self.clip, p=self.p)
            self._unfitted = False
        self._mode = mode

    def set_grid(self, grid: Grid) -> None:
        """Use ``grid`` as is (a method chose the clip itself); earlier observations will not refit it."""
        self.grid = grid
        self._unfitted = False

    def forward(self, x: Tensor, inplace: bool = False) -> Tensor:
        """Quantize ``x`` (mode ``quant``); ``inplace=True`` may overwrite ``x`` (a caller's private tensor)."""
        if self._mode == "off":
            return x
        if self._mode == "observe":
            self._unfitted = True
            return self.observer(x)
        grid = self.grid
        assert grid is not None
        if grid.scale.device != x.device:
            grid = self.grid = grid.to(x.device)
        if x.requires_grad:
            return grid.ste(x)  # STE while fine-tuning
        return self._quantize(grid, x, inplace)

    def _quantize(self, grid: Grid, x: Tensor, inplace: bool) -> Tensor:
        """``grid(x)`` with one new tensor at most (none with ``inplace``), bit for bit the same.

        Mirrors ``Grid.__call__`` op for op (same ops, same operands, same order), only run in
        place on the quotient instead of on fresh temporaries, and with the grid's "has an
        offset" test cached instead of synchronised on every call (tests/test_export.py checks
        the equality on every kind of grid and on whole compressed models).
        """
        if self._fast_grid is not grid:  # the grid was set, fitted or moved since
            self._fast_grid, self._has_offset = grid, bool(grid._offset.any())
        per_tensor = grid.scale.dim() == 0 and x.is_floating_point()
        if inplace and per_tensor:
            v = x.div_(grid.scale)
        elif per_tensor or x.dtype == torch.result_type(x, grid.scale):
            v = x / grid.scale
        else:
            return grid(x)
        if self._has_offset:
            v.add_(grid._offset)
        return v.round_().add_(grid._zp_int).clamp_(grid.qmin, grid.qmax).sub_(grid.zero_point).mul_(grid.scale)

    @property
    def scheme(self) -> str:
        """``"unsigned"``, ``"symmetric"`` or ``"affine"``."""
        return "unsigned" if self.unsigned else "symmetric" if self.symmetric else "affine"

    def extra_repr(self) -> str:
        return f"bits={self.bits}, clip={self.clip}, {self.scheme}, mode={self._mode}"

    def storage(self) -> list[tuple[str, int, int]]:
        """Its grid's scale and zero point (the observations are calibration state, not stored)."""
        return [("scale_zero_point", 2, 32)] if self.grid is not None else []

    def export_record(self, name: str, writer: TensorWriter) -> dict[str, Any]:
        record = {"bits": self.bits, "scheme": self.scheme, "clip": self.clip, "p": self.p, "mode": self.mode}
        if self.grid is not None:
            grid = self.grid.to("cpu")
            if grid.scale.dim() != 0:
                raise NotImplementedError(f"activation quantizer {name} has a per-channel grid")
            writer.float(f"{name}.scale_zero_point", torch.stack([grid.scale.float(), grid.zero_point.float()]))
            record["grid"] = [grid.qmin, grid.qmax]
        return record

    @classmethod
    def from_record(cls, name: str, record: dict[str, Any], current: nn.Module, reader: TensorReader) -> nn.Module:
        q = cls(record["bits"], clip=record["clip"], symmetric=record["scheme"] == "symmetric",
                unsigned=record["scheme"] == "unsigned", p=record["p"])
        if "grid" in record:
            pair = reader.float(f"{name}.scale_zero_point")
            q.set_grid(Grid(pair[0].clone(), pair[1].clone(), *record["grid"]))
        q._mode = record["mode"] if record["mode"] != "observe" else "off"
        return q

    def onnx_module(self) -> nn.Module:
        if self.mode == "observe":
            raise RuntimeError("an activation quantizer is still observing: calibrate the model first")
        if self.mode == "off" or self.grid is None:
            return nn.Identity()
        return QuantizeDequantize(self.grid.to("cpu"))


class QuantLayer(LayerType):
    """A Conv2d/Linear with fake-quantized weight and input activations.

    The weight is quantized once (into ``layer.weight``); the float weight is kept (non-persistent
    buffer ``weight_fp``) so that a method can move it to another grid with ``set_weight_grid``,
    and fine-tuning can train it through straight-through rounding (``master`` parameter).

    Parameters
    ----------
    layer : nn.Conv2d or nn.Linear
        The layer to wrap (modified in place: its weight becomes the quantized one).
    w_bits, a_bits : int
        Weight and input-activation bit widths.
    weight_grid : Grid, optional
        The weight already lies on this grid (e.g. CP factors from ADMM): keep it as is.
    fit_weight : bool
        Fit a grid to the weight now (False: the method sets one later with ``set_weight_grid``).
    weight_scheme : dict, optional
        ``make_grid`` keyword arguments for the weight (default per-tensor symmetric MSE).
    act_scheme : dict, optional
        ``ActQuantizer`` keyword arguments (default affine MSE).
    act : nn.Module, optional
        Use this module for the input: a shared ``ActQuantizer`` (layers reading the same tensor),
        or ``nn.Identity()`` when the input is quantized upstream (e.g. at a ReLU output).
    """

    kind = "quant_layer"

    def __init__(
        self,
        layer: nn.Module,
        w_bits: int,
        a_bits: int,
        *,
        weight_grid: Grid | None = None,
        fit_weight: bool = True,
        weight_scheme: dict[str, Any] | None = None,
        act_scheme: dict[str, Any] | None = None,
        act: nn.Module | None = None,
    ):
        super().__init__()
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"QuantLayer wraps Conv2d or Linear, got {type(layer).__name__}")
        self.layer = layer
        self.w_bits, self.a_bits = w_bits, a_bits
        self.weight_scheme = {"symmetric": True, "clip": "mse", **(weight_scheme or {})}
        self.act = act if act is not None else ActQuantizer(a_bits, **(act_scheme or {})).to(layer.weight.device)
        self.register_buffer("weight_fp", layer.weight.detach().clone(), persistent=False)
        self.weight_grid: Grid | None = weight_grid
        # The deployable form's (run_on_integers): its input's grid, the int32 accumulator's grid.
        self.input_grid: Grid | None = None
        self.bias_grid: Grid | None = None
        self.bias_correction = False
        self.master: nn.Parameter | None = None
        if weight_grid is None and fit_weight:
            self.set_weight_grid(make_grid(self.weight_fp, w_bits, **self.weight_scheme))
        layer.qaf_bits = (w_bits, a_bits)

    @torch.no_grad()
    def set_weight_grid(self, grid: Grid, bias_correction: bool = False) -> None:
        """Quantize the float weight onto ``grid`` (optionally mean-corrected per output channel)."""
        self.weight_grid, self.bias_correction = grid, bias_correction
        self.layer.weight.copy_(self._quantized(self.weight_fp))

    def _quantized(self, weight: Tensor) -> Tensor:
        assert self.weight_grid is not None
        w_q = self.weight_grid.ste(weight) if weight.requires_grad else self.weight_grid(weight)
        return correct_mean(w_q, weight) if self.bias_correction else w_q

    def train_weight(self, enable: bool) -> None:
        """Start (or end, writing the result back) fine-tuning of the float weight.

        While enabled, ``master`` (initialised from the float weight) is a trainable parameter and
        the forward pass quantizes it with straight-through rounding onto the fixed grid.
        """
        if enable and self.master is None and self.weight_grid is not None:
            self.master = nn.Parameter(self.weight_fp.clone())
        elif not enable and self.master is not None:
            with torch.no_grad():
                self.weight_fp.copy_(self.master)
                self.layer.weight.copy_(self._quantized(self.weight_fp))
            self.master = None

    def storage(self) -> list[tuple[str, int, int]]:
        """Stored tensors ``(name, entries, bits)``: weight codes, grid, bias (see qaf.metrics.size)."""
        weight = self.layer.weight
        out = [("weight_codes", weight.numel(), self.w_bits)]
        if self.weight_grid is not None:
            out.append(("weight_scale", self.weight_grid.scale.numel(), 32))
            if bool((self.weight_grid.zero_point != 0).any()):
                out.append(("weight_zero_point", self.weight_grid.zero_point.numel(), 32))
        if self.bias_correction:  # a float offset per output channel
            out.append(("weight_offset", weight.shape[0], 32))
        if self.layer.bias is not None:
            out.append(("bias", self.layer.bias.numel(), 32))
        return out

    def weight_codes(self) -> tuple[Grid, Tensor, Tensor | None] | None:
        """The weight as codes on its grid: ``(grid, codes, offset)`` (on the CPU) with the weight equal to
        ``grid.dequantize(codes) - offset`` (offset None: 0) bit for bit; None when no grid gives it."""
        if self.weight_grid is None:
            return None
        weight = self.layer.weight.detach()
        grid = self.weight_grid.to(weight.device)
        # The offset a loaded or folded model records; else LAPQ's, recomputed below.
        offset = getattr(self, "qaf_weight_offset", None) if self.bias_correction else None
        if not self.bias_correction:
            source = weight
        elif offset is None:  # LAPQ: the weight is grid(weight_fp) shifted per channel (correct_mean)
            source = self.weight_fp.detach()
        else:
            source = weight + offset.to(weight.device)
        codes = grid.codes(source)
        w_q = grid.dequantize(codes, weight.dtype)
        if self.bias_correction:
            if offset is None:  # the very tensor correct_mean subtracts
                dims = list(range(1, weight.dim()))
                offset = w_q.mean(dims, keepdim=True) - source.mean(dims, keepdim=True)
            w_q = w_q - offset.to(weight.device)
        if not same_bits(w_q, weight):
            log.warning("%s: the weight is not its grid's dequantized codes bit for bit; exported in float",
                        type(self).__name__)
            return None
        return grid.to("cpu"), codes.cpu(), None if offset is None else offset.cpu()

    def export_record(self, name: str, writer: TensorWriter) -> dict[str, Any]:
        layer = self.layer
        record: dict[str, Any] = {"w_bits": self.w_bits, "a_bits": self.a_bits, "weight": "float",
                                  "bias_correction": self.bias_correction, "bias": layer.bias is not None}
        codes = self.weight_codes()
        if codes is None:
            writer.float(f"{name}.weight", layer.weight)
        else:
            grid, q, offset = codes
            record.update(weight="codes", grid=writer.grid(f"{name}.weight", grid))
            writer.codes(f"{name}.weight_codes", q, grid.qmin, grid.qmax)
            if offset is not None:
                writer.float(f"{name}.weight_offset", offset)
        if layer.bias is not None:
            writer.float(f"{name}.bias", layer.bias)
        return record

    @classmethod
    def from_record(cls, name: str, record: dict[str, Any], current: nn.Module, reader: TensorReader) -> nn.Module:
        grid = offset = None
        with torch.no_grad():
            if record["weight"] == "codes":
                grid = reader.grid(f"{name}.weight", record["grid"])
                weight = grid.dequantize(reader.codes(f"{name}.weight_codes"), current.weight.dtype)
                if record["bias_correction"]:
                    offset = reader.float(f"{name}.weight_offset")
                    weight = weight - offset
            else:
                weight = reader.float(f"{name}.weight")
            current.weight.copy_(weight)
            if record["bias"]:
                current.bias.copy_(reader.float(f"{name}.bias"))
        # The input module is rebuilt from its own record (or stays the identity).
        layer = cls(current, record["w_bits"], record["a_bits"], weight_grid=grid, fit_weight=False, act=nn.Identity())
        layer.bias_correction = record["bias_correction"]
        if offset is not None:
            layer.qaf_weight_offset = offset  # the weight is its codes minus this (re-export needs it)
        return layer

    def onnx_module(self) -> nn.Module:
        layer = self.layer
        codes = self.weight_codes()
        weight = DequantizedWeight(*codes) if codes is not None else layer.weight
        bias = layer.bias
        if bias is not None and self.bias_grid is not None:  # int32 codes, as an integer kernel takes it
            bias = DequantizedWeight(self.bias_grid, self.bias_grid.codes(bias.detach()), dtype=torch.int32)
        if isinstance(layer, nn.Linear):
            return LoweredLayer(weight, bias, act=self.act)
        if layer.padding_mode != "zeros":
            raise NotImplementedError(f"padding_mode={layer.padding_mode!r} does not lower to ONNX")
        return LoweredLayer(weight, bias, (layer.stride, layer.padding, layer.dilation, layer.groups), self.act)

    def deploy_module(self) -> nn.Module:
        """Its input quantizer as a module of its own in front of it (:class:`QuantInput`), so that
        the deployable form sees every quantizer; the layer itself keeps no input module."""
        if not isinstance(self.act, ActQuantizer):
            return self
        act, self.act = self.act, nn.Identity()
        return QuantInput(self, act)

    @torch.no_grad()
    def fold_affine(self, scale: Tensor, shift: Tensor) -> None:
        """Fold ``y[c] * scale[c] + shift[c]`` (a batch norm reading the output) into the layer.

        A weight on a grid keeps its codes and its grid's scale becomes ``scale[c]`` times its own
        per output channel (a per-tensor grid becomes per channel), so the folded layer computes
        what the layer and the batch norm compute up to float rounding; a bias correction's offset
        is scaled along. A float weight is scaled (:func:`fold_affine`), and so is the bias.

        Parameters
        ----------
        scale, shift : Tensor
            One value per output channel.
        """
        codes = self.weight_codes()
        factor = fold_affine(self.layer, scale, shift)
        self.weight_fp.mul_(factor)
        if codes is None:
            self.weight_grid = None
            return
        weight = self.layer.weight
        grid, q, offset = codes  # on the CPU
        per_channel = grid.scale.to(weight.device) * factor
        self.weight_grid = Grid(per_channel, grid.zero_point.to(weight.device).expand_as(per_channel).clone(),
                                grid.qmin, grid.qmax)
        folded = self.weight_grid.dequantize(q.to(weight.device), weight.dtype)
        if offset is not None:
            self.qaf_weight_offset = offset.to(weight.device) * factor
            folded = folded - self.qaf_weight_offset
        weight.copy_(folded)

    @torch.no_grad()
    def run_on_integers(self, input_grid: Grid) -> bool:
        """Compute as an integer kernel does on inputs on ``input_grid`` (the deployable form).

        The bias is rounded onto the grid the kernel accumulates on: int32 codes with step
        ``input scale x weight scale`` (per output channel when the weight grid is), zero point 0.
        The forward then convolves the input's codes (minus its zero point) with the weight's,
        integer values whose sums float32 holds exactly (below 2^24), adds the bias codes and
        multiplies by that step once, as an integer kernel's accumulator and requantization do:
        summing dequantized values in float instead rounds at every product, which moves a few
        activation codes per image against onnxruntime's integer kernels.

        Parameters
        ----------
        input_grid : Grid
            The per-tensor grid of the layer's input.

        Returns
        -------
        bool
            Whether it does: the weight is on a grid without a bias correction (LAPQ's offset is
            subtracted in float, which no integer kernel computes).
        """
        codes = self.weight_codes()
        if codes is None or codes[2] is not None:
            return False
        grid, q, _ = codes
        weight, bias = self.layer.weight, self.layer.bias
        scale = input_grid.scale.to(weight) * grid.scale.to(weight)
        scale = scale.reshape(-1) if scale.dim() else scale  # per output channel, or per tensor
        info = torch.iinfo(torch.int32)
        self.bias_grid = Grid(scale, torch.zeros_like(scale), info.min, info.max)
        self.input_grid = input_grid.to(weight.device)
        self.register_buffer("integer_weight", (q.to(weight) - grid.zero_point.to(weight)), persistent=False)
        if bias is not None:
            bias.copy_(self.bias_grid(bias))
        return True

    def _integer_forward(self, x: Tensor) -> Tensor:
        """The forward of :meth:`run_on_integers`."""
        codes = self.input_grid.codes(x).sub_(self.input_grid.zero_point)
        bias = self.layer.bias
        bias = None if bias is None else self.bias_grid.codes(bias.detach())
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(codes, self.integer_weight, bias).mul_(self.bias_grid.scale.view(-1, 1, 1))
        return F.linear(codes, self.integer_weight, bias).mul_(self.bias_grid.scale)

    def forward(self, x: Tensor, inplace: bool = False) -> Tensor:
        """``inplace=True``: ``x`` is the caller's private tensor, the input quantizer may overwrite it."""
        x = self.act(x, inplace=True) if inplace and isinstance(self.act, ActQuantizer) else self.act(x)
        if self.input_grid is not None:
            return self._integer_forward(x)
        if self.master is None:
            return self.layer(x)
        weight = self._quantized(self.master)
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, weight, self.layer.bias)
        return F.linear(x, weight, self.layer.bias)


@torch.no_grad()
def fold_affine(layer: nn.Conv2d | nn.Linear, scale: Tensor, shift: Tensor) -> Tensor:
    """Fold ``y[c] * scale[c] + shift[c]`` into a conv / linear layer's weight and bias, in place.

    Returns
    -------
    Tensor
        ``scale`` shaped to multiply the weight (one value per output channel).
    """
    weight = layer.weight
    factor = scale.to(weight).reshape(-1, *[1] * (weight.dim() - 1))
    weight.mul_(factor)
    shift = shift.to(weight)
    layer.bias = nn.Parameter(shift if layer.bias is None else layer.bias * scale.to(weight) + shift,
                              requires_grad=False)
    return factor


Plan = Mapping[str, "tuple[int, int] | None"]


def quantize_model(
    model: nn.Module,
    plan: Plan,
    *,
    weight_scheme: dict[str, Any] | None = None,
    act_scheme: dict[str, Any] | None = None,
    weight_grids: Mapping[str, Grid] | None = None,
) -> list[dict]:
    """Replace conv/linear layers by ``QuantLayer`` in place.

    Parameters
    ----------
    model : nn.Module
        Model to rewrite.
    plan : mapping
        Module name -> ``(w_bits, a_bits)``; a name mapped to None or absent stays in float
        (e.g. :func:`qaf.quant.policy.layer_plan`).
    weight_scheme, act_scheme : dict, optional
        Passed to every ``QuantLayer``.
    weight_grids : mapping, optional
        Layers whose weights already lie on a grid (e.g. CP factors), with that grid.

    Returns
    -------
    list of dict
        One entry per quantized layer: name, w_bits, a_bits, clip, act_clip, shape,
        weight_quantized (already on its grid).
    """
    weight_grids = weight_grids or {}
    targets = [(name, module, plan[name]) for name, module in model.named_modules()
               if isinstance(module, (nn.Conv2d, nn.Linear)) and plan.get(name) is not None]
    report = []
    for name, module, (w_bits, a_bits) in targets:
        grid = weight_grids.get(name)
        wrapped = QuantLayer(module, w_bits, a_bits, weight_grid=grid, weight_scheme=weight_scheme,
                             act_scheme=act_scheme)
        set_submodule(model, name, wrapped)
        report.append({"name": name, "w_bits": w_bits, "a_bits": a_bits,
                       "clip": None if grid is not None else wrapped.weight_scheme["clip"],
                       "act_clip": wrapped.act.clip, "shape": list(module.weight.shape),
                       "weight_quantized": grid is not None})
    if report:
        mark_batchnorm(model)
    return report


class QuantInput(LayerType):
    """Any layer (e.g. a QSWD layer) with its input fake-quantized by ``act``."""

    kind = "quant_input"

    def __init__(self, module: nn.Module, act: nn.Module):
        super().__init__()
        self.module, self.act = module, act

    def forward(self, x: Tensor) -> Tensor:
        return self.module(self.act(x))

    @classmethod
    def from_record(cls, name: str, record: dict[str, Any], current: nn.Module, reader: TensorReader) -> nn.Module:
        return cls(current, nn.Identity())  # ``act`` is rebuilt from its own record


class QuantReLU(LayerType):
    """A ReLU whose output is quantized: every consumer (identity shortcuts included) reads it.

    Parameters
    ----------
    relu : nn.Module
        The activation.
    act : ActQuantizer
        The quantizer of its output.
    """

    kind = "quant_relu"

    def __init__(self, relu: nn.Module, act: nn.Module):
        super().__init__()
        self.relu, self.act = relu, act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.relu(x))

    @classmethod
    def from_record(cls, name: str, record: dict[str, Any], current: nn.Module, reader: TensorReader) -> nn.Module:
        return cls(current, nn.Identity())  # ``act`` is rebuilt from its own record


@torch.no_grad()
def set_input_bits(model: nn.Module, x: Tensor) -> None:
    """Record on each quantized layer the bit width of the quantizer its input comes from.

    One forward pass of ``x``: a layer whose input tensor is the output of an ``ActQuantizer`` gets
    ``qaf_bits = (w_bits, that quantizer's bits)``; any other input counts as float (32 bits).

    Parameters
    ----------
    model : nn.Module
        A model with ``QuantLayer`` layers (their quantizers in any mode).
    x : Tensor
        A sample input batch.
    """
    produced: dict[int, tuple[Tensor, int]] = {}  # id -> (tensor kept alive so ids stay unique, bits)
    seen: dict[nn.Module, int] = {}

    def record(module: ActQuantizer, _args: tuple, out: Tensor) -> None:
        produced[id(out)] = (out, module.bits)

    def check(module: nn.Module, args: tuple) -> None:
        seen[module] = produced.get(id(args[0]), (None, 32))[1]

    quant_layers = [m for m in model.modules() if isinstance(m, QuantLayer)]
    hooks = [q.register_forward_hook(record) for q in act_quantizers(model)]
    hooks += [q.layer.register_forward_pre_hook(check) for q in quant_layers]
    try:
        model(x)
    finally:
        for hook in hooks:
            hook.remove()
    for q in quant_layers:
        q.layer.qaf_bits = (q.w_bits, seen.get(q.layer, 32))


def mark_batchnorm(model: nn.Module) -> None:
    """Set ``qaf_bits = (8, 8)`` on every BatchNorm2d (BN is counted at 8x8 in a quantized model)."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.qaf_bits = BN_BITS


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not child:
        raise ConfigError("cannot quantize the model itself: it must contain conv/linear layers")
    setattr(parent, child, new)


def act_quantizers(model: nn.Module) -> list[ActQuantizer]:
    """All distinct ``ActQuantizer`` modules of ``model``."""
    return [m for m in model.modules() if isinstance(m, ActQuantizer)]
