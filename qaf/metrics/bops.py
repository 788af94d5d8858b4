"""MACs, BOPs and weight storage of the model actually evaluated.

MACs are counted with forward hooks during one pass at the data set's input size, so factorized
layers, wrappers and shared modules are counted as they really run:

- ``Conv2d``: H_out * W_out * C_out * (C_in / groups) * k_h * k_w
- ``Linear``: out_features * in_features (per sample)
- ``BatchNorm2d``: 2 * C * H * W (a scale and a shift per element)
- ReLU, pooling and everything else: 0

BOPs = sum over layers of MACs * weight bits * input-activation bits, with the bits read from
``module.qaf_bits`` (set by whoever quantized the layer) and (32, 32) for layers left in float.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

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


def _macs(module: nn.Module, output: torch.Tensor) -> int:
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
        w_bits, a_bits = getattr(module, "qaf_bits", FLOAT_BITS)
        costs.append(LayerCost(names[module], type(module).__name__, _macs(module, output), w_bits, a_bits))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _COUNTED)]
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


def storage_bits(model: nn.Module) -> int:
    """Bits needed to store the weights of the model as evaluated.

    Weights of conv and linear layers count at their weight bit width (``qaf_bits``); biases and
    batch-norm parameters and statistics at the layer's weight bits too when it carries
    ``qaf_bits`` on a BN layer, else 32. Parameters of other modules count at 32 bits.
    """
    total = 0
    counted: set[int] = set()
    for module in model.modules():
        if not isinstance(module, _COUNTED):
            continue
        w_bits = getattr(module, "qaf_bits", FLOAT_BITS)[0]
        for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if not tensor.is_floating_point():
                continue  # num_batches_tracked
            counted.add(id(tensor))
            weight_like = name == "weight" or isinstance(module, nn.BatchNorm2d)
            total += tensor.numel() * (w_bits if weight_like else FLOAT_BITS[0])
    for tensor in model.parameters():
        if id(tensor) not in counted:
            total += tensor.numel() * FLOAT_BITS[0]
    return total
