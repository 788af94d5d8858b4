"""ONNX export with QuantizeLinear/DequantizeLinear nodes exactly where the fake-quant modules are.

The model is traced with ``torch.fx`` (qaf's modules as leaves) and each node written by hand, so
the graph says what the PyTorch model computes:

- an activation quantizer (``ActQuantizer``, in front of a layer, at a ReLU output, in front of a
  QSWD layer) becomes ``QuantizeLinear -> DequantizeLinear`` with its scale and zero point, in the
  8-bit type of its code range (``uint8`` for unsigned / affine grids, ``int8`` for symmetric
  ones; 16-bit types above 8 bits). A grid narrower than the type (2..7 bits) is preceded by a
  ``Clip`` to its first and last level: ``Q(clip(x))`` equals the grid's clamp of ``Q(x)``
  exactly, and every grid width 2..16 is handled the same way (int4/uint4 types would cover 4
  bits only, and onnxruntime has no 4-bit conv kernels);
- a quantized weight becomes an integer initializer (its grid codes) and ``DequantizeLinear``
  (per tensor, or per output channel with ``axis=0``) feeding the Conv / Gemm;
- LAPQ's zero-free grid (half-integer zero point, which ONNX cannot hold) is stored as the odd
  integers ``2 q - (2^b - 1)`` with half the scale, which dequantizes to the same floats bit for
  bit; its bias-corrected weights subtract the per-channel offset after the DequantizeLinear
  (``Sub``), as ``correct_mean`` does;
- a CP layer is its three convs (1x1, depthwise, 1x1), each with its own Q/DQ input and
  dequantized weight; a QSWD layer is one conv on its regenerated weight's codes (the sparse
  factors are an on-disk format: see the artifact);
- float layers and batch norm stay float (``Conv``, ``Gemm``, ``BatchNormalization``).

Every dequantized weight is checked to equal the module's weight bit for bit; one that does not
(a solver that ran in float64) is written as a float initializer with a warning.
"""

from __future__ import annotations

import copy
import logging
import operator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from qaf.export.artifact import _same_bits, dequantize, grid_codes
from qaf.quant.modules import ActQuantizer, QuantLayer
from qaf.quant.uniform import Grid

log = logging.getLogger("qaf")

OPSET = 21
IR_VERSION = 10
_INT64_MAX = 2**63 - 1


def _leaf_types() -> tuple[type, ...]:
    from qaf.decomp.layers import CPConv2d, CPLinear
    from qaf.decomp.qswd_layer import _QSWDLayer

    return (QuantLayer, ActQuantizer, CPConv2d, CPLinear, _QSWDLayer)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _leaf_types()) or super().is_leaf_module(m, qualname)


def _int_type(qmin: int, qmax: int) -> tuple[Any, int, int]:
    """(numpy dtype, type min, type max) of the smallest ONNX integer type holding ``qmin..qmax``."""
    for dtype in (np.uint8, np.int8, np.uint16, np.int16):
        info = np.iinfo(dtype)
        if info.min <= qmin and qmax <= info.max:
            return dtype, int(info.min), int(info.max)
    raise NotImplementedError(f"codes {qmin}..{qmax} do not fit a 16-bit ONNX type")


class _Graph:
    """Nodes and initializers of the graph being written."""

    def __init__(self) -> None:
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.names: set[str] = set()

    def unique(self, name: str) -> str:
        base, n = name, 1
        while name in self.names:
            n += 1
            name = f"{base}_{n}"
        self.names.add(name)
        return name

    def init(self, name: str, value: np.ndarray | Tensor) -> str:
        if isinstance(value, Tensor):
            value = value.detach().cpu().numpy()
        name = self.unique(name)
        self.inits.append(self.numpy_helper.from_array(np.array(value, order="C"), name))  # 0-d stays 0-d
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs: Any) -> str:
        """Add node ``name/op``; returns its output ``name/op:0``."""
        node_name = self.unique(f"{name}/{op}")
        out = self.unique(f"{node_name}:0")
        self.nodes.append(self.helper.make_node(op, inputs, [out], name=node_name, **attrs))
        return out


class _Writer:
    """Turns the fx graph of a (compressed) model into ONNX nodes."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm, self.g = gm, _Graph()
        self.act_cache: dict[tuple[int, str], str] = {}
        self.stats = {"act_qdq": 0, "weight_dq": 0, "float_weights": 0, "clips": 0}

    # ------------------------------------------------------------------------- activations
    def act(self, name: str, q: nn.Module, x: str) -> str:
        """Q/DQ (with a Clip for a grid narrower than its type) of an activation quantizer."""
        if not isinstance(q, ActQuantizer) or q.mode != "quant" or q.grid is None:
            if isinstance(q, ActQuantizer) and q.mode == "observe":
                raise RuntimeError(f"activation quantizer {name} is still observing: calibrate first")
            return x
        key = (id(q), x)
        if key in self.act_cache:  # a quantizer shared by layers reading the same tensor
            return self.act_cache[key]
        grid = q.grid.to("cpu")
        if grid.scale.dim() != 0:
            raise NotImplementedError(f"{name}: per-channel activation grids are not exported")
        zp = float(grid.zero_point)
        if zp != round(zp):
            raise NotImplementedError(f"{name}: activation grid with a non-integer zero point")
        dtype, tmin, tmax = _int_type(grid.qmin, grid.qmax)
        scale = self.g.init(f"{name}.scale", grid.scale.float().reshape(()))
        zero = self.g.init(f"{name}.zero_point", np.array(int(zp), dtype=dtype))
        if (grid.qmin, grid.qmax) != (tmin, tmax):
            lo, hi = grid.bounds()
            x = self.g.node("Clip", [x, self.g.init(f"{name}.clip_min", lo.float().reshape(())),
                                     self.g.init(f"{name}.clip_max", hi.float().reshape(()))], name)
            self.stats["clips"] += 1
        x = self.g.node("QuantizeLinear", [x, scale, zero], name)
        out = self.g.node("DequantizeLinear", [x, scale, zero], name)
        self.stats["act_qdq"] += 1
        self.act_cache[key] = out
        return out

    # ----------------------------------------------------------------------------- weights
    def weight(self, name: str, weight: Tensor, grid: Grid | None, offset: Tensor | None = None,
               source: Tensor | None = None) -> str:
        """Integer initializer + DequantizeLinear (+ Sub offset), or a float initializer.

        ``source`` is what the codes are read from (the float weight for bias-corrected layers).
        """
        weight = weight.detach().cpu().float()
        if grid is not None:
            out = self._dequantized(name, weight, grid.to("cpu"), offset, source)
            if out is not None:
                return out
            log.warning("onnx export: %s: weight not on its grid bit for bit; written in float", name)
        self.stats["float_weights"] += 1
        return self.g.init(f"{name}.weight", weight)

    def _dequantized(self, name: str, weight: Tensor, grid: Grid, offset: Tensor | None,
                     source: Tensor | None) -> str | None:
        q = grid_codes(grid, weight if source is None else source.detach().cpu().float())
        codes, scale, zp = q, grid.scale.float(), grid.zero_point.float()
        if bool((zp != torch.round(zp)).any()):  # zero-free grid: the odd integers 2q - 2zp, half the scale
            codes, scale, zp = q * 2 - zp * 2, scale / 2, torch.zeros_like(zp)
        expected = dequantize(codes, scale, zp)  # what DequantizeLinear computes: (codes - zp) * scale
        if offset is not None:
            expected = expected - offset.cpu()
        if not _same_bits(expected, weight):
            return None
        per_channel = scale.dim() > 0
        if per_channel:
            if scale.numel() != weight.shape[0] or scale.shape[0] != weight.shape[0]:
                raise NotImplementedError(f"{name}: per-channel grid not along the output channels")
            scale, zp = scale.reshape(-1), zp.reshape(-1)
        codes, zp_int = codes.round().long(), zp.round().long()
        dtype, _, _ = _int_type(min(int(codes.min()), int(zp_int.min())), max(int(codes.max()), int(zp_int.max())))
        q_name = self.g.init(f"{name}.weight_quantized", codes.numpy().astype(dtype))
        s_name = self.g.init(f"{name}.weight_scale", scale.numpy().astype(np.float32))
        z_name = self.g.init(f"{name}.weight_zero_point", zp_int.numpy().astype(dtype))
        attrs = {"axis": 0} if per_channel else {}
        out = self.g.node("DequantizeLinear", [q_name, s_name, z_name], f"{name}.weight", **attrs)
        if offset is not None:
            out = self.g.node("Sub", [out, self.g.init(f"{name}.weight_offset", offset.float())], f"{name}.weight")
        self.stats["weight_dq"] += 1
        return out

    # ------------------------------------------------------------------------------ layers
    def conv(self, name: str, conv: nn.Conv2d, x: str, w: str, bias: Tensor | None) -> str:
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise NotImplementedError(f"{name}: padding {conv.padding!r} / mode {conv.padding_mode!r}")
        ph, pw = conv.padding
        inputs = [x, w] + ([self.g.init(f"{name}.bias", bias.detach().float())] if bias is not None else [])
        return self.g.node("Conv", inputs, name, kernel_shape=list(conv.kernel_size), strides=list(conv.stride),
                           pads=[ph, pw, ph, pw], dilations=list(conv.dilation), group=conv.groups)

    def linear(self, name: str, x: str, w: str, bias: Tensor | None) -> str:
        inputs = [x, w] + ([self.g.init(f"{name}.bias", bias.detach().float())] if bias is not None else [])
        return self.g.node("Gemm", inputs, name, transB=1)

    def quant_layer(self, name: str, m: QuantLayer, x: str) -> str:
        x = self.act(f"{name}.act", m.act, x) if isinstance(m.act, ActQuantizer) else x
        layer = m.layer
        offset = source = None
        if m.bias_correction and m.weight_grid is not None:
            offset = getattr(m, "qaf_weight_offset", None)
            if offset is None:
                source = m.weight_fp
                w_q = m.weight_grid(m.weight_fp.detach()).cpu()
                dims = list(range(1, w_q.dim()))
                offset = w_q.mean(dims, keepdim=True) - m.weight_fp.detach().cpu().mean(dims, keepdim=True)
            else:
                source = layer.weight.detach().cpu() + offset.cpu()
        w = self.weight(name, layer.weight, m.weight_grid, offset, source)
        if isinstance(layer, nn.Conv2d):
            return self.conv(name, layer, x, w, layer.bias)
        return self.linear(name, x, w, layer.bias)

    def qswd(self, name: str, m: nn.Module, x: str) -> str:
        from qaf.decomp.qswd_layer import QSWDConv2d

        with torch.no_grad():
            weight = m.weight.detach()
        w = self.weight(name, weight, m.grid("weight"))
        if isinstance(m, QSWDConv2d):
            ph, pw = m.padding
            inputs = [x, w] + ([self.g.init(f"{name}.bias", m.bias.detach().float())] if m.bias is not None else [])
            return self.g.node("Conv", inputs, name, kernel_shape=list(m.weight_shape[2:]), strides=list(m.stride),
                               pads=[ph, pw, ph, pw], dilations=list(m.dilation), group=1)
        return self.linear(name, x, w, m.bias)

    def module(self, name: str, m: nn.Module, args: list[Any]) -> str:
        from qaf.decomp.layers import CPConv2d, CPLinear
        from qaf.decomp.qswd_layer import _QSWDLayer

        x = args[0]
        if isinstance(m, QuantLayer):
            return self.quant_layer(name, m, x)
        if isinstance(m, ActQuantizer):
            return self.act(name, m, x)
        if isinstance(m, (CPConv2d, CPLinear)):
            subs = ("pointwise_in", "depthwise", "pointwise_out") if isinstance(m, CPConv2d) else ("first", "second")
            for sub in subs:
                x = self.module(f"{name}.{sub}", getattr(m, sub), [x])
            return x
        if isinstance(m, _QSWDLayer):
            return self.qswd(name, m, x)
        if isinstance(m, nn.Conv2d):
            return self.conv(name, m, x, self.weight(name, m.weight, None), m.bias)
        if isinstance(m, nn.Linear):
            return self.linear(name, x, self.weight(name, m.weight, None), m.bias)
        if isinstance(m, nn.BatchNorm2d):
            if m.running_mean is None or m.training:
                raise NotImplementedError(f"{name}: batch norm without running statistics / in training mode")
            weight = m.weight if m.weight is not None else torch.ones_like(m.running_mean)
            bias = m.bias if m.bias is not None else torch.zeros_like(m.running_mean)
            inputs = [x] + [self.g.init(f"{name}.{k}", t.detach().float()) for k, t in
                            (("weight", weight), ("bias", bias), ("running_mean", m.running_mean),
                             ("running_var", m.running_var))]
            return self.g.node("BatchNormalization", inputs, name, epsilon=float(m.eps))
        if isinstance(m, nn.ReLU):
            return self.g.node("Relu", [x], name)
        if isinstance(m, (nn.Identity, nn.Dropout)):
            return x
        if isinstance(m, nn.MaxPool2d):
            k, s, p, d = (_pair(v) for v in (m.kernel_size, m.stride or m.kernel_size, m.padding, m.dilation))
            return self.g.node("MaxPool", [x], name, kernel_shape=k, strides=s, pads=p + p, dilations=d,
                               ceil_mode=int(m.ceil_mode))
        if isinstance(m, nn.AvgPool2d):
            k, s, p = (_pair(v) for v in (m.kernel_size, m.stride or m.kernel_size, m.padding))
            return self.g.node("AveragePool", [x], name, kernel_shape=k, strides=s, pads=p + p,
                               ceil_mode=int(m.ceil_mode), count_include_pad=int(m.count_include_pad))
        if isinstance(m, nn.AdaptiveAvgPool2d) and _pair(m.output_size) == [1, 1]:
            return self.g.node("GlobalAveragePool", [x], name)
        if isinstance(m, nn.Flatten) and m.end_dim == -1:
            return self.g.node("Flatten", [x], name, axis=m.start_dim)
        raise NotImplementedError(f"onnx export: module {name} of type {type(m).__name__} is not supported")

    # ---------------------------------------------------------------------------- functions
    def function(self, node: fx.Node, args: list[Any], kwargs: dict[str, Any]) -> str:
        target, name = node.target, node.name
        if target in (operator.add, operator.iadd, torch.add):
            return self.g.node("Add", [args[0], args[1]], name)
        if target in (torch.flatten,):
            return self.flatten(name, args, kwargs)
        if target in (F.relu, torch.relu):
            return self.g.node("Relu", [args[0]], name)
        if target in (F.pad, torch._C._nn.pad):
            pad = list(args[1] if len(args) > 1 else kwargs["pad"])
            mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
            value = args[3] if len(args) > 3 else kwargs.get("value", None)
            if mode != "constant" or (value or 0.0) != 0.0:
                raise NotImplementedError("F.pad other than constant zero padding")
            rank = 4
            begins, ends = [0] * rank, [0] * rank
            for i in range(len(pad) // 2):
                begins[rank - 1 - i], ends[rank - 1 - i] = pad[2 * i], pad[2 * i + 1]
            pads = self.g.init(f"{name}.pads", np.array(begins + ends, dtype=np.int64))
            return self.g.node("Pad", [args[0], pads], name, mode="constant")
        if target is operator.getitem:
            return self.getitem(name, args[0], args[1])
        if target is torch.cat:
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            return self.g.node("Concat", list(args[0]), name, axis=dim)
        raise NotImplementedError(f"onnx export: function {target} is not supported")

    def method(self, node: fx.Node, args: list[Any], kwargs: dict[str, Any]) -> str:
        if node.target in ("contiguous",):
            return args[0]
        if node.target == "flatten":
            return self.flatten(node.name, args, kwargs)
        if node.target in ("relu", "relu_"):
            return self.g.node("Relu", [args[0]], node.name)
        if node.target in ("add", "add_"):
            return self.g.node("Add", [args[0], args[1]], node.name)
        raise NotImplementedError(f"onnx export: method .{node.target}() is not supported")

    def flatten(self, name: str, args: list[Any], kwargs: dict[str, Any]) -> str:
        start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
        end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
        if end != -1:
            raise NotImplementedError("flatten with end_dim != -1")
        return self.g.node("Flatten", [args[0]], name, axis=start)

    def getitem(self, name: str, x: str, index: Any) -> str:
        index = index if isinstance(index, tuple) else (index,)
        starts, ends, axes, steps = [], [], [], []
        for axis, item in enumerate(index):
            if not isinstance(item, slice):
                raise NotImplementedError("indexing other than by slices")
            if item == slice(None):
                continue
            starts.append(item.start or 0)
            ends.append(_INT64_MAX if item.stop is None else item.stop)
            axes.append(axis)
            steps.append(item.step or 1)
        if not axes:
            return x
        inputs = [x] + [self.g.init(f"{name}.{k}", np.array(v, dtype=np.int64))
                        for k, v in (("starts", starts), ("ends", ends), ("axes", axes), ("steps", steps))]
        return self.g.node("Slice", inputs, name)


def _pair(value: Any) -> list[int]:
    return list(value) if isinstance(value, (tuple, list)) else [int(value), int(value)]


def to_onnx(model: nn.Module, input_size: tuple[int, ...] = (3, 32, 32), *, opset: int = OPSET,
            name: str = "qaf") -> tuple[Any, dict[str, int]]:
    """The ONNX ``ModelProto`` of ``model`` (see the module docstring) and node counts.

    Parameters
    ----------
    model : nn.Module
        A (compressed, calibrated) model; copied, not changed.
    input_size : tuple of int
        ``(C, H, W)`` of one input; the batch dimension is dynamic (``batch``).
    opset : int
        ONNX opset (21: 16-bit Q/DQ types).
    name : str
        Graph name.

    Returns
    -------
    tuple
        ``(model_proto, stats)``; stats count Q/DQ pairs, dequantized weights, float weights, clips.
    """
    from onnx import TensorProto, helper

    model = copy.deepcopy(model).cpu().eval()
    graph = _Tracer().trace(model)
    gm = fx.GraphModule(model, graph)
    writer = _Writer(gm)
    env: dict[str, Any] = {}
    output = None

    def value(arg: Any) -> Any:
        return fx.node.map_arg(arg, lambda n: env[n.name])

    with torch.no_grad():
        for node in graph.nodes:
            if node.op == "placeholder":
                env[node.name] = "input"
                writer.g.names.add("input")
            elif node.op == "call_module":
                env[node.name] = writer.module(str(node.target), gm.get_submodule(str(node.target)), value(node.args))
            elif node.op == "call_function":
                env[node.name] = writer.function(node, list(value(node.args)), dict(value(node.kwargs)))
            elif node.op == "call_method":
                env[node.name] = writer.method(node, list(value(node.args)), dict(value(node.kwargs)))
            elif node.op == "output":
                output = value(node.args[0])
            else:
                raise NotImplementedError(f"onnx export: fx node {node.op} {node.target}")
    g = writer.g
    if not isinstance(output, str):
        raise NotImplementedError("onnx export: the model must return one tensor")
    g.nodes.append(helper.make_node("Identity", [output], ["logits"], name="output/Identity"))
    with torch.no_grad():
        n_out = model(torch.zeros(1, *input_size)).shape[1]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *input_size])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_out])]
    proto = helper.make_model(helper.make_graph(g.nodes, name, inputs, outputs, g.inits),
                              opset_imports=[helper.make_opsetid("", opset)], producer_name="qaf")
    proto.ir_version = IR_VERSION
    return proto, writer.stats


def export_onnx(model: nn.Module, path: str | Path, input_size: tuple[int, ...] = (3, 32, 32), *,
                opset: int = OPSET, check: bool = True) -> dict[str, Any]:
    """Write ``model`` as ONNX with Q/DQ nodes to ``path`` (``onnx.checker`` run on it).

    Returns
    -------
    dict
        ``path``, ``bytes`` and the node counts of :func:`to_onnx`.
    """
    import onnx

    proto, stats = to_onnx(model, input_size, opset=opset)
    if check:
        onnx.checker.check_model(proto, full_check=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return {"path": str(path), "bytes": path.stat().st_size, **stats}


#: onnxruntime graph optimization levels by name. ``basic`` runs the graph as written (Q/DQ nodes
#: executed as such: float arithmetic on the grid, as PyTorch's fake quantization); ``all`` (the
#: default of onnxruntime) also fuses DequantizeLinear -> Conv -> QuantizeLinear into integer
#: QLinearConv kernels, which round differently (docs/export.md).
LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
          "all": "ORT_ENABLE_ALL"}


def session(path: str | Path, threads: int | None = None, level: str = "all") -> Any:
    """An onnxruntime CPU session.

    Parameters
    ----------
    path : path
        The ONNX file.
    threads : int, optional
        Intra-op threads (default: onnxruntime's choice, one per core).
    level : {"disable", "basic", "extended", "all"}
        Graph optimization level (see :data:`LEVELS`).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[level])
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_logits(sess: Any, images: Tensor, batch_size: int = 256) -> Tensor:
    """Logits of an onnxruntime session over ``images`` (N, C, H, W), in batches."""
    out = [sess.run(["logits"], {"input": images[i:i + batch_size].numpy()})[0]
           for i in range(0, len(images), batch_size)]
    return torch.from_numpy(np.concatenate(out))
