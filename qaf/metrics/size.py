"""Model size: every tensor a deployed model stores, at the bit width it is stored at.

The same rule for every method, so sizes compare across PTQ grids, CP factors and QSWD factors:

- a layer type whose ``storage()`` (:class:`qaf.layer_type.LayerType`) is not None (quantized
  layers, activation quantizers, QSWD layers) lists its tensors and those of its sub-modules as
  ``(name, entries, bits per entry)``: integer codes at their bit width, indices, scales and zero
  points (32 bits each), biases and other float leftovers (32 bits); layer types inside it list
  their own (a quantized layer's input quantizer: its scale and zero point, 2 x 32 bits);
- everything else (float layers, batch-norm parameters and running statistics) counts at its
  dtype's width; integer bookkeeping buffers (``num_batches_tracked``) and non-persistent
  buffers are not part of a deployed model.
"""

from __future__ import annotations

import math

from torch import nn

from qaf.layer_type import LayerType

FLOAT_BITS = 32


def storage_entries(model: nn.Module) -> list[tuple[str, int, int]]:
    """``(name, entries, bits)`` for every stored tensor of ``model`` (see the module docstring).

    Parameters
    ----------
    model : nn.Module
        The model as evaluated (compressed or not).

    Returns
    -------
    list of tuple
        Qualified tensor name, number of entries, bits per entry.
    """
    entries: list[tuple[str, int, int]] = []
    covered: list[str] = []
    for name, module in model.named_modules():  # each module once, even when shared
        prefix = f"{name}." if name else ""
        storage = module.storage() if isinstance(module, LayerType) else None
        if storage is not None:
            entries += [(prefix + n, count, bits) for n, count, bits in storage]
            covered.append(prefix)
            continue
        if any(name.startswith(c) for c in covered):
            continue  # inside a layer that reported its own storage
        tensors = list(module.named_parameters(recurse=False)) + [
            (n, b) for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set]
        entries += [(prefix + n, t.numel(), t.element_size() * 8) for n, t in tensors if t.is_floating_point()]
    return entries


def size_bytes(model: nn.Module) -> int:
    """Bytes needed to store ``model`` (bits of :func:`storage_entries`, rounded up to bytes)."""
    return math.ceil(sum(count * bits for _, count, bits in storage_entries(model)) / 8)

