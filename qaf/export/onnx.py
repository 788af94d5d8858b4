"""ONNX export: ``torch.onnx.export`` of the model with every layer type lowered to the standard
quantize / dequantize ops, which the exporter writes as ``QuantizeLinear`` / ``DequantizeLinear``.

Each layer type (:class:`qaf.layer_type.LayerType`) is replaced by its ``onnx_module()``, built
from :mod:`qaf.quant.qdq`, so the graph says what the PyTorch model computes:

- an activation quantizer becomes ``QuantizeLinear -> DequantizeLinear`` with its scale and zero
  point, in the 8-bit type of its code range (``uint8`` for unsigned / affine grids, ``int8`` for
  symmetric ones; 16-bit types above 8 bits), behind a ``Clip`` to its first and last level when
  the grid is narrower than the type (2..7 bits);
- a quantized weight becomes an integer initializer (its grid codes) and ``DequantizeLinear``
  (per tensor, or per output channel with ``axis=0``) feeding the ``Conv`` / ``Gemm``; LAPQ's
  zero-free grid as odd integers with half the scale, its bias correction as a ``Sub``;
- a bias on the int32 grid of an integer kernel's accumulator (the deployable form,
  :mod:`qaf.export.deploy`) becomes an ``int32`` initializer and ``DequantizeLinear``, so that
  onnxruntime's optimizer fuses ``DQ -> Conv -> Q`` into ``QLinearConv`` with that bias;
- a CP layer is its three convs (the generic lowering: its forward through its lowered
  sub-convs); a QSWD layer is one conv on its regenerated weight's codes;
- float layers stay float, as the exporter writes them (its optimizer folds a float conv's batch
  norm into the conv, as onnxruntime does).

The exporter (``dynamo=True``, opset 21) traces the lowered model with ``torch.export`` and
optimizes the graph; this module only names each node after the module it comes from
(``layer1.0.conv1.depthwise/Conv``), which the exporter records in the node's metadata.
"""

from __future__ import annotations

import ast
import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from qaf.layer_type import converted

OPSET = 21


def lowered(model: nn.Module) -> nn.Module:
    """A CPU copy of ``model`` with every layer type replaced by its ``onnx_module()``, recursively
    (a shared module stays shared)."""
    return converted(copy.deepcopy(model).cpu().eval(), "onnx_module")


def _name_nodes(proto: Any) -> None:
    """Name each node ``<module path>/<op type>`` from the exporter's scope metadata."""
    seen: dict[str, int] = {}
    for node in proto.graph.node:
        scopes = next((ast.literal_eval(p.value) for p in node.metadata_props
                       if p.key == "pkg.torch.onnx.name_scopes"), [])  # ["", "layer1", "layer1.0", ..., op]
        name = f"{scopes[-2] if len(scopes) > 1 else ''}/{node.op_type}"
        seen[name] = seen.get(name, 0) + 1
        node.name = name if seen[name] == 1 else f"{name}_{seen[name]}"


def to_onnx(model: nn.Module, input_size: tuple[int, ...] = (3, 32, 32), *, opset: int = OPSET) -> Any:
    """The ONNX ``ModelProto`` of ``model`` (see the module docstring).

    Parameters
    ----------
    model : nn.Module
        A (compressed, calibrated) model; copied, not changed.
    input_size : tuple of int
        ``(C, H, W)`` of one input; the batch dimension is dynamic (``batch``).
    opset : int
        ONNX opset (21: 16-bit Q/DQ types).
    """
    module = lowered(model)
    program = torch.onnx.export(module, (torch.zeros(2, *input_size),), dynamo=True, opset_version=opset,
                                input_names=["input"], output_names=["logits"], verbose=False,
                                dynamic_shapes=({0: torch.export.Dim("batch")},))
    proto = program.model_proto
    _name_nodes(proto)
    return proto


def export_onnx(model: nn.Module, path: str | Path, input_size: tuple[int, ...] = (3, 32, 32), *,
                opset: int = OPSET, check: bool = True) -> dict[str, Any]:
    """Write ``model`` as ONNX with Q/DQ nodes to ``path`` (``onnx.checker`` run on it).

    Returns
    -------
    dict
        ``path`` and ``bytes``.
    """
    import onnx

    proto = to_onnx(model, input_size, opset=opset)
    if check:
        onnx.checker.check_model(proto, full_check=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return {"path": str(path), "bytes": path.stat().st_size}


#: onnxruntime graph optimization levels by name. ``basic`` runs the graph as written (Q/DQ nodes
#: executed as such: float arithmetic on the grid, as PyTorch's fake quantization); ``all`` (the
#: default of onnxruntime) also fuses DequantizeLinear -> Conv -> QuantizeLinear into integer
#: QLinearConv kernels, which round differently (docs/export.md).
LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
          "all": "ORT_ENABLE_ALL"}


def session(path: str | Path, threads: int | None = None, level: str = "all",
            optimized_path: str | Path | None = None) -> Any:
    """An onnxruntime CPU session.

    Parameters
    ----------
    path : path
        The ONNX file.
    threads : int, optional
        Intra-op threads (default: onnxruntime's choice, one per core).
    level : {"disable", "basic", "extended", "all"}
        Graph optimization level (see :data:`LEVELS`).
    optimized_path : path, optional
        Where onnxruntime writes the graph it runs (after its optimizer).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[level])
    options.log_severity_level = 3
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


#: onnxruntime ops of a conv / linear layer on integer kernels, and in float (the NCHWc layout
#: transformer's convs have op type Conv in the com.microsoft.nchwc domain).
INTEGER_OPS = {"QLinearConv", "ConvInteger", "QGemm", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat",
               "DynamicQuantizeMatMul"}
FLOAT_OPS = {"Conv", "FusedConv", "NhwcFusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"}


def kernel_counts(path: str | Path) -> dict[str, int]:
    """Convs and linear layers of an (optimized) ONNX graph on integer kernels and in float."""
    import onnx

    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    return {"integer": sum(op in INTEGER_OPS for op in ops), "float": sum(op in FLOAT_OPS for op in ops)}


def onnx_logits(sess: Any, images: Tensor, batch_size: int = 256) -> Tensor:
    """Logits of an onnxruntime session over ``images`` (N, C, H, W), in batches."""
    out = [sess.run(["logits"], {"input": images[i:i + batch_size].numpy()})[0]
           for i in range(0, len(images), batch_size)]
    return torch.from_numpy(np.concatenate(out))
