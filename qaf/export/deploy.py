"""The deployable form of a compressed model: the model as integer kernels execute it.

A run evaluates fake quantization as the method left the model: a batch norm after each quantized
conv, residual additions in float, float biases. Integer kernels (onnxruntime's ``QLinearConv``,
``QLinearAdd``, ``QGemm``) need more: a conv's output channels scaled and shifted by its batch
norm before they are requantized, both operands and the result of an addition on grids, biases on
the int32 grid the products accumulate on. Deployment toolchains (onnxruntime's quantization
tools, AIMET, Intel Neural Compressor, TensorRT) make these changes; :func:`deployable` makes them
on a compressed, calibrated model, so that the run can evaluate what is deployed
(``deploy_top1``) and :func:`qaf.export.export_onnx` can write it:

1. every layer type becomes its ``deploy_module()`` (activation quantizers as modules of their own,
   a CP layer as its three convs, a QSWD layer as a dense conv on its regenerated weight) and the
   model is traced by ``torch.fx``;
2. a batch norm whose input is a conv's or linear layer's output (its only reader) is folded into
   that layer (:meth:`qaf.quant.modules.QuantLayer.fold_affine`): a weight on a grid keeps its
   codes and its grid's scale becomes per output channel, a float weight is scaled; exact up to
   float rounding;
3. an addition whose operands are quantized tensors or quantized layers' outputs runs on grids:
   an operand already on a grid (a quantizer's output, or values it selects: slices, zero
   padding, max pooling, ReLU) is requantized on that grid (exact); a float tensor that a
   quantizer also reads is read through that quantizer (e.g. a residual shortcut reads the
   quantized block input the first conv reads); a quantized layer's output gets a new quantizer;
   the sum (after its ReLU) is quantized by the quantizer that reads it, or a new one;
4. a quantizer reading values selected from a float tensor (max pooling after the stem's ReLU)
   is applied before the selection as well, so the conv's output is quantized where the conv
   ends (exact: selection commutes with rounding onto a grid);
5. the new quantizers (``DEPLOY_BITS``, affine, MSE clip) are fitted on calibration data by the
   caller's ``calibrate``; then every quantized layer whose input lies on a grid computes as an
   integer kernel does (:meth:`qaf.quant.modules.QuantLayer.run_on_integers`): its bias rounded
   onto the int32 grid of step ``input scale x weight scale``, its products summed exactly.

Steps 3 and 5 change what the model computes (a few roundings at 8 bits and finer); their cost is
``deploy_top1`` against ``top1`` (docs/export.md, "The deployable form").
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from qaf.calib import observing_activations, run_passes
from qaf.layer_type import converted
from qaf.quant.modules import ActQuantizer, QuantLayer, fold_affine

#: Bits of the quantizers the deployable form adds (the integer kernels' width).
DEPLOY_BITS = 8

_ADDS = (operator.add, operator.iadd, torch.add)
_RELUS = (F.relu, torch.relu)
#: Ops whose output values are values of their input (or zeros): a tensor on a grid that holds 0
#: stays on it, and rounding onto the grid commutes with them.
_SELECT_FUNCTIONS = (operator.getitem, torch.flatten, F.max_pool2d, F.pad)
_SELECT_MODULES = (nn.MaxPool2d, nn.Flatten, nn.Identity, nn.Dropout)
_SELECT_METHODS = ("flatten", "view", "reshape", "contiguous")


class _Tracer(fx.Tracer):
    """Quantizers and quantized layers are leaves; everything else is traced through."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (ActQuantizer, QuantLayer)) or super().is_leaf_module(m, module_qualified_name)


def deployable(model: nn.Module, calibrate: Callable[[nn.Module], Any]) -> fx.GraphModule:
    """The deployable form of ``model`` (see the module docstring).

    Parameters
    ----------
    model : nn.Module
        A compressed, calibrated model (not changed: a copy is transformed).
    calibrate : callable
        Fits the quantizers the form adds: called once with the form, whose new quantizers have no
        grid (e.g. a pass over calibration images in :func:`qaf.calib.observing_activations`).

    Returns
    -------
    torch.fx.GraphModule
        The form, in eval mode on the model's device; ``deploy_summary`` holds what changed:
        ``batch_norms_folded``, ``additions_on_grids``, ``additions_in_float``,
        ``quantizers_added``, ``integer_layers``, ``biases_on_grids``.
    """
    plain = converted(copy.deepcopy(model).eval(), "deploy_module")
    form = fx.GraphModule(plain, _Tracer().trace(plain))
    summary = {"batch_norms_folded": _fold_batchnorms(form)}
    summary.update(_quantize_additions(form))
    summary["quantizers_added"] += _quantize_before_selections(form)
    _merge_quantizers(form)
    form.graph.eliminate_dead_code()
    form.delete_all_unused_submodules()  # the folded batch norms
    form.graph.lint()
    form.recompile()
    form.eval()
    calibrate(form)
    summary.update(_run_on_integers(form))
    form.deploy_summary = summary
    return form


def calibrating_on(batches: Any) -> Callable[[nn.Module], None]:
    """A ``calibrate`` for :func:`deployable`: the new quantizers observe one pass over ``batches``
    (``(images, ...)`` tuples, e.g. a calibration loader); no Lightning, one process."""
    def calibrate(form: nn.Module) -> None:
        with observing_activations(form):
            run_passes(form, batches)

    return calibrate


def _module(form: fx.GraphModule, node: Any) -> nn.Module | None:
    if isinstance(node, fx.Node) and node.op == "call_module":
        return form.get_submodule(node.target)
    return None


def _is_quantizer(form: fx.GraphModule, node: Any) -> bool:
    return isinstance(_module(form, node), ActQuantizer)


def _is_relu(form: fx.GraphModule, node: fx.Node) -> bool:
    return (isinstance(_module(form, node), nn.ReLU) or (node.op == "call_function" and node.target in _RELUS)
            or (node.op == "call_method" and node.target == "relu"))


def _selects(form: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node``'s output values are values of its first input, or zeros."""
    if node.op == "call_function" and node.target is F.pad:
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
        return mode == "constant" and not value
    return ((node.op == "call_function" and node.target in _SELECT_FUNCTIONS)
            or isinstance(_module(form, node), _SELECT_MODULES)
            or (node.op == "call_method" and node.target in _SELECT_METHODS))


def _grid_source(form: fx.GraphModule, node: Any) -> fx.Node | None:
    """The quantizer node whose grid ``node``'s values lie on (through selections and ReLUs), or None."""
    while isinstance(node, fx.Node):
        if _is_quantizer(form, node):
            return node
        if not (_selects(form, node) or _is_relu(form, node)) or not node.args:
            return None
        node = node.args[0]
    return None


def _batchnorm_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` with ``bn(y) = y * scale + shift`` per channel (eval mode)."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.affine:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    return scale.detach(), (shift + bn.bias if bn.affine else shift).detach()


def _fold_batchnorms(form: fx.GraphModule) -> int:
    folded = 0
    for node in list(form.graph.nodes):
        bn = _module(form, node)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.track_running_stats:
            continue
        source = node.args[0]
        layer = _module(form, source)
        if len(source.users) != 1 or not isinstance(layer, (QuantLayer, nn.Conv2d, nn.Linear)):
            continue
        scale, shift = _batchnorm_affine(bn)
        if isinstance(layer, QuantLayer):
            layer.fold_affine(scale, shift)
        else:
            fold_affine(layer, scale, shift)
        node.replace_all_uses_with(source)
        form.graph.erase_node(node)
        folded += 1
    return folded


def _new_quantizer(form: fx.GraphModule, after: fx.Node, scope_of: fx.Node, role: str) -> fx.Node:
    """A node of a new quantizer reading ``after``, registered in the module ``scope_of`` runs in."""
    stack = scope_of.meta.get("nn_module_stack") or {}
    scope = next(reversed(stack.values()))[0] if stack else ""
    scope = scope if scope and not isinstance(form.get_submodule(scope), (ActQuantizer, QuantLayer)) else ""
    name, k = f"{scope}.{role}".lstrip("."), 1
    while _exists(form, name):
        k += 1
        name = f"{scope}.{role}{k}".lstrip(".")
    device = next((t.device for t in form.parameters()), torch.device("cpu"))
    form.add_submodule(name, ActQuantizer(DEPLOY_BITS, clip="mse").to(device))
    with form.graph.inserting_after(after):
        return form.graph.call_module(name, (after,))


def _exists(form: fx.GraphModule, name: str) -> bool:
    try:
        form.get_submodule(name)
    except AttributeError:
        return False
    return True


def _quantize_additions(form: fx.GraphModule) -> dict[str, int]:
    on_grids = in_float = added = 0
    for node in list(form.graph.nodes):
        if not (node.op == "call_function" and node.target in _ADDS and len(node.args) == 2
                and all(isinstance(a, fx.Node) for a in node.args)):
            continue
        plans = [_operand_plan(form, node, operand) for operand in node.args]
        if None in plans:
            in_float += 1
            continue
        for i, (operand, plan) in enumerate(zip(node.args, plans)):
            kind, source = plan
            if kind == "requantize":  # values selected from a quantizer's output: the same grid again
                with form.graph.inserting_before(node):
                    read = form.graph.call_module(source.target, (operand,))
            elif kind == "reuse":  # the quantizer another reader applies to the tensor this operand selects from
                quantizer, tensor = source
                tensor.append(quantizer)  # right after its input: before every selection reading it
                read = quantizer
                if tensor is not operand:  # select from the quantized tensor, then requantize (exact):
                    # the selections then run on codes in an integer graph
                    first = next(n for n in _selection_chain(form, operand) if n.args[0] is tensor)
                    first.replace_input_with(tensor, quantizer)
                    with form.graph.inserting_before(node):
                        read = form.graph.call_module(quantizer.target, (operand,))
            elif kind == "new":
                read = _new_quantizer(form, operand, node, f"add_in{i}")
                added += 1
            else:
                continue
            node.replace_input_with(operand, read)
        end = node
        while len(end.users) == 1 and _is_relu(form, next(iter(end.users))):
            end = next(iter(end.users))
        if not any(_is_quantizer(form, user) for user in end.users):
            read = _new_quantizer(form, end, node, "add_out")
            end.replace_all_uses_with(read, delete_user_cb=lambda user: user is not read)
            added += 1
        on_grids += 1
    return {"additions_on_grids": on_grids, "additions_in_float": in_float, "quantizers_added": added}


def _operand_plan(form: fx.GraphModule, add: fx.Node, operand: fx.Node) -> tuple[str, Any] | None:
    """How an operand of ``add`` gets onto a grid: ``("quantized", None)`` (a quantizer's output),
    ``("requantize", quantizer node)`` (values selected from its output), ``("reuse", (quantizer
    node, tensor))`` (the operand is ``tensor``, or values selected from it by nodes only the
    addition reads, and the quantizer reads ``tensor`` too), ``("new", None)`` (a quantized layer's
    output); None: it cannot (a float tensor no quantizer reads)."""
    if _is_quantizer(form, operand):
        return "quantized", None
    source = _grid_source(form, operand)
    if source is not None:
        return "requantize", source
    chain = _selection_chain(form, operand)
    for tensor in [operand, *(n.args[0] for n in chain)]:
        reader = next((user for user in tensor.users if user is not add and _is_quantizer(form, user)), None)
        if reader is not None:
            return "reuse", (reader, tensor)
    if isinstance(_module(form, operand), QuantLayer):
        return "new", None
    return None


def _selection_chain(form: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """The selections ``node`` is the end of (``node`` first), each read by the next only."""
    chain: list[fx.Node] = []
    while (_selects(form, node) and node.args and isinstance(node.args[0], fx.Node)
           and (not chain or len(node.users) == 1)):
        chain.append(node)
        node = node.args[0]
    return chain


def _quantize_before_selections(form: fx.GraphModule) -> int:
    """Step 4 of the module docstring; returns the quantizer nodes added (no new module)."""
    added = 0
    for node in list(form.graph.nodes):
        current = node
        while _is_quantizer(form, current):
            selection = current.args[0]
            if not (isinstance(selection, fx.Node) and _selects(form, selection) and selection.args):
                break
            source = selection.args[0]
            if not isinstance(source, fx.Node) or len(source.users) != 1 or _grid_source(form, source) is not None:
                break
            with form.graph.inserting_after(source):
                current = form.graph.call_module(current.target, (source,))
            selection.replace_input_with(source, current)
            added += 1
    return added


def _grid_key(quantizer: ActQuantizer) -> tuple | None:
    grid = quantizer.grid
    if grid is None or grid.scale.dim() != 0:
        return None
    return float(grid.scale), float(grid.zero_point), grid.qmin, grid.qmax


def _merge_quantizers(form: fx.GraphModule) -> None:
    """Quantizer nodes reading the same tensor on the same grid become one (a shared quantizer, or
    two layers' quantizers fitted to the same observations)."""
    seen: dict[tuple, fx.Node] = {}
    for node in list(form.graph.nodes):
        if not _is_quantizer(form, node):
            continue
        key = _grid_key(form.get_submodule(node.target))
        key = (node.args[0], node.target if key is None else key)
        if key in seen:
            node.replace_all_uses_with(seen[key])
            form.graph.erase_node(node)
        else:
            seen[key] = node


def _run_on_integers(form: fx.GraphModule) -> dict[str, int]:
    layers = biases = 0
    for node in form.graph.nodes:
        layer = _module(form, node)
        source = _grid_source(form, node.args[0]) if isinstance(layer, QuantLayer) else None
        if source is not None and layer.run_on_integers(form.get_submodule(source.target).grid):
            layers += 1
            biases += layer.layer.bias is not None
    return {"integer_layers": layers, "biases_on_grids": biases}
