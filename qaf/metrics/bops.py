"""MACs, BOPs and weight storage of the model actually evaluated.

MACs are counted with forward hooks during one pass at the data set's input size, so factorized
layers, wrappers and shared modules are counted as they really run:

- ``Conv2d``: H_out * W_out * C_out * (C_in / groups) * k_h * k_w
- ``Linear``: out_features * in_features (per sample)
- ``BatchNorm2d``: 2 * C * H * W (a scale and a shift per element)
- a layer type whose ``macs(output)`` (:class:`qaf.layer_type.LayerType`) is not None (e.g.
  QSWD layers, which run a dense conv on a generated weight): what it says; other layer types
  (quantized, CP layers) are counted through their sub-layers
- ReLU, pooling and everything else: 0

BOPs = sum over layers of MACs * weight bits * input-activation bits, with the bits read from
``module.qaf_bits`` (set by whoever quantized the layer) and (32, 32) for layers left in float.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qaf.layer_type import LayerType

FLOAT_BITS = (32, 32)
_COUNTED = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)


@dataclass(frozen=True)
class LayerCost:
    """Cost of one leaf layer per input sample."""

    name: str
    kind: str
    macs: int
    w_bits: int
    a_bits: int

    @property
    def bops(self) -> int:
        return self.macs * self.w_bits * self.a_bits


def _macs(module: nn.Module, output: torch.Tensor) -> int | None:
    if isinstance(module, LayerType):  # None: its sub-layers are counted
        return module.macs(output)
    per_sample = output[0].numel()
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return per_sample * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return per_sample * module.in_features
    return 2 * per_sample  # BatchNorm2d


@torch.no_grad()
def layer_costs(model: nn.Module, input_size: tuple[int, ...]) -> list[LayerCost]:
    """Per-layer MACs and bit widths from one forward pass of a single zero image.

    Parameters
    ----------
    model : nn.Module
        The model as evaluated (compressed or not); left in the train/eval mode it had.
    input_size : tuple of int
        (C, H, W) of one input sample.

    Returns
    -------
    list of LayerCost
        One entry per call of a conv, linear or batch-norm leaf, in execution order.
    """
    costs: list[LayerCost] = []
    names = {module: name for name, module in model.named_modules()}

    def hook(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        macs = _macs(module, output)
        if macs is not None:
            w_bits, a_bits = getattr(module, "qaf_bits", FLOAT_BITS)
            costs.append(LayerCost(names[module], type(module).__name__, int(macs), w_bits, a_bits))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (*_COUNTED, LayerType))]
    was_training = model.training
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        model.eval()
        model(torch.zeros(1, *input_size, device=device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return costs


def total_macs(costs: list[LayerCost]) -> int:
    """Sum of MACs over all counted layers."""
    return sum(c.macs for c in costs)


def total_bops(costs: list[LayerCost]) -> int:
    """Sum of MACs * weight bits * activation bits over all counted layers."""
    return sum(c.bops for c in costs)


def bops_pct(bops: int, fp32_macs: int) -> float:
    """BOPs as a percentage of the float model's (its MACs at 32x32 bits)."""
    return 100.0 * bops / (fp32_macs * FLOAT_BITS[0] * FLOAT_BITS[1])


def paper_bops_pct(model: nn.Module, costs: list[LayerCost], fp32_macs: int, bits: int, act_bits: int) -> float:
    """%BOPs under the QAF paper's convention.

    The paper plots unfactorized baselines (PTQ, LAPQ, AdaRound, ...) at ``w * a / 1024`` of the
    float model's BOPs, and factorized models by the per-layer count (as :func:`bops_pct`).

    Parameters
    ----------
    model : nn.Module
        The model as evaluated.
    costs : list of LayerCost
        Its per-layer costs (:func:`layer_costs`).
    fp32_macs : int
        MACs of the float model.
    bits, act_bits : int
        The run's weight and activation bit widths.

    Returns
    -------
    float
        100 for an unquantized model; ``100 * bits * act_bits / 1024`` when no layer is
        factorized; else the per-layer %BOPs.
    """
    if not any(c.w_bits != FLOAT_BITS[0] or c.a_bits != FLOAT_BITS[1] for c in costs):
        return 100.0
    if any(isinstance(m, LayerType) and m.factorized for m in model.modules()):
        return bops_pct(total_bops(costs), fp32_macs)
    return 100.0 * bits * act_bits / (FLOAT_BITS[0] * FLOAT_BITS[1])
