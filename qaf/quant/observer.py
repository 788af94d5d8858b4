"""Observers: what passes through an activation during calibration, for fitting its grid.

An :class:`Observer` is the identity on its input; it records the running min/max and a bounded,
deterministic subsample. The fake-quantizer that owns it (``qaf.quant.modules.ActQuantizer``)
fits its grid to ``sample()``; ``qaf.calib`` merges the observations of several processes with
``observation()`` / ``merge()``.

The subsample is a bottom-k sample: from each call, ``per_batch`` elements are drawn with a
generator seeded by (seed, batch index, call number), each with a random priority, and the
``max_samples`` of lowest priority are kept. It does not depend on the order in which batches
arrive, so observations made by several processes merge into exactly the single-process one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

_BATCH: list[int | None] = [None]


@contextmanager
def batch_index(index: int) -> Iterator[None]:
    """Tell observers which calibration batch (single-process numbering) is passing through."""
    _BATCH.append(index)
    try:
        yield
    finally:
        _BATCH.pop()


class Observer(nn.Module):
    """Running min/max and a deterministic bottom-k subsample of what passes (identity output).

    Parameters
    ----------
    max_samples : int
        Bound on the stored subsample (elements).
    per_batch : int
        Elements drawn at random from each call.
    seed : int
        Seed of the subsampling.
    """

    def __init__(self, max_samples: int = 1 << 20, per_batch: int = 1 << 16, seed: int = 0):
        super().__init__()
        self.max_samples, self.per_batch, self.seed = max_samples, per_batch, seed
        self._values = torch.empty(0)
        self._priority = torch.empty(0)
        self._calls: dict[int, int] = {}  # batch index -> calls seen (a shared quantizer runs twice)
        self.register_buffer("running_min", torch.tensor(float("inf")))
        self.register_buffer("running_max", torch.tensor(float("-inf")))

    def forward(self, x: Tensor) -> Tensor:
        """Record ``x``; return it unchanged."""
        flat = x.detach().reshape(-1).float()
        self.running_min.copy_(torch.minimum(self.running_min, flat.min()))
        self.running_max.copy_(torch.maximum(self.running_max, flat.max()))
        batch = _BATCH[-1] if _BATCH[-1] is not None else len(self._calls)
        call = self._calls.get(batch, 0)
        self._calls[batch] = call + 1
        # hash() of a tuple of ints is the same in every process (PYTHONHASHSEED only salts str/bytes).
        gen = torch.Generator().manual_seed(hash((self.seed, batch, call)) & ((1 << 63) - 1))
        count = min(self.per_batch, flat.numel())
        idx = torch.randint(flat.numel(), (count,), generator=gen) if count < flat.numel() else torch.arange(count)
        priority = torch.rand(count, generator=gen)
        values = flat[idx.to(flat.device)]
        if not self._values.numel():
            self._values, self._priority = values.new_empty(0), priority.new_empty(0)
        self._values = torch.cat([self._values.to(flat.device), values])
        self._priority = torch.cat([self._priority, priority])
        if self._priority.numel() > 2 * self.max_samples:  # amortised: prune only now and then
            self._prune(self.max_samples)
        return x

    def sample(self) -> Tensor:
        """The stored subsample in a canonical order, with the observed extremes included."""
        if not self._values.numel():
            raise RuntimeError("the activation quantizer has observed nothing: run calibration data in "
                               "'observe' mode")
        self._prune(self.max_samples)
        order = torch.argsort(self._priority)
        extremes = torch.stack([self.running_min, self.running_max]).to(self._values.device)
        return torch.cat([self._values[order], extremes])

    def observation(self) -> dict[str, Tensor]:
        """What was observed, as tensors (to merge observations of several processes)."""
        return {"values": self._values, "priority": self._priority,
                "min": self.running_min, "max": self.running_max}

    def merge(self, states: list[dict[str, Tensor]]) -> None:
        """Replace the observation by the union of ``states`` (this process's included)."""
        device = self.running_min.device
        self._values = torch.cat([s["values"].to(device) for s in states])
        # Priorities stay where the CPU generator drew them, so later observations append to them.
        self._priority = torch.cat([s["priority"].cpu() for s in states])
        self._prune(self.max_samples)
        self.running_min.copy_(torch.stack([s["min"].to(device) for s in states]).min())
        self.running_max.copy_(torch.stack([s["max"].to(device) for s in states]).max())

    def _prune(self, keep: int) -> None:
        if self._priority.numel() > keep:
            idx = torch.topk(self._priority, keep, largest=False).indices
            self._values, self._priority = self._values[idx], self._priority[idx]
