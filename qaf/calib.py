"""Calibration as library steps: context managers around forward passes over calibration data.

    with recalibrating_bn(model):            # BN statistics re-estimated from what passes through
        run_passes(model, loader)
    with observing_activations(model):       # activation quantizers fit their grids on exit
        run_passes(model, loader)

Both are exact to reproduce: batch-norm statistics are accumulated in float64 (a plain average of
the per-batch statistics, as BN's ``momentum=None``), and observers subsample deterministically per
batch. With several processes (DDP, each running whole batches of the single-process run, see
:class:`qaf.data.ShardedBatchSampler`), :func:`sync_across_ranks` merges both, so the result equals
a single process's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from qaf.quant.modules import ActQuantizer, act_quantizers
from qaf.quant.observer import batch_index

__all__ = ["BN_TYPES", "batch_index", "observing_activations", "recalibrating_bn", "run_passes",
           "sync_across_ranks", "train_mode_modules"]

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _BNAccumulator:
    """Sums of per-batch means and unbiased variances of one BN layer's input, in float64."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        self.sum_mean = torch.zeros(bn.num_features, dtype=torch.float64, device=bn.running_mean.device)
        self.sum_var = torch.zeros_like(self.sum_mean)
        self.count = torch.zeros((), dtype=torch.float64, device=bn.running_mean.device)

    def __call__(self, _module: nn.Module, args: tuple) -> None:
        x = args[0].detach().float()
        dims = [d for d in range(x.dim()) if d != 1]
        var, mean = torch.var_mean(x, dim=dims, correction=1)
        self.sum_mean += mean.double()
        self.sum_var += var.double()
        self.count += 1


def train_mode_modules(model: nn.Module) -> list[nn.Module]:
    """Modules a calibration pass must run in train mode (BN layers being re-estimated)."""
    return [m for m in model.modules() if getattr(m, "_qaf_recalibrating", False)]


@contextmanager
def recalibrating_bn(model: nn.Module) -> Iterator[list[nn.Module]]:
    """Re-estimate every batch-norm layer's running statistics from the passes run inside.

    BN layers normalize with batch statistics (train mode) while everything else stays in eval
    mode; on exit each layer's running mean/variance become the average of the per-batch
    statistics seen (``num_batches_tracked`` = batches). Affine parameters are untouched.
    Layers that saw no batch keep their statistics.

    Parameters
    ----------
    model : nn.Module
        The model; left in eval mode on exit.

    Yields
    ------
    list of nn.Module
        The BN layers being re-estimated.
    """
    bns = [m for m in model.modules() if isinstance(m, BN_TYPES) and m.track_running_stats]
    saved = [m.momentum for m in bns]
    hooks = []
    model.eval()
    for bn in bns:
        bn._qaf_bn_acc = _BNAccumulator(bn)
        hooks.append(bn.register_forward_pre_hook(bn._qaf_bn_acc))
        bn.momentum = 0.0  # batch statistics normalize; running stats are written on exit only
        bn._qaf_recalibrating = True
        bn.train()
    try:
        yield bns
        with torch.no_grad():
            for bn in bns:
                acc = bn._qaf_bn_acc
                if acc.count > 0:
                    bn.running_mean.copy_(acc.sum_mean / acc.count)
                    bn.running_var.copy_(acc.sum_var / acc.count)
                    bn.num_batches_tracked.fill_(int(acc.count))
    finally:
        for hook in hooks:
            hook.remove()
        for bn, momentum in zip(bns, saved):
            bn.momentum = momentum
            del bn._qaf_bn_acc, bn._qaf_recalibrating
        model.eval()


@contextmanager
def observing_activations(model: nn.Module) -> Iterator[list[ActQuantizer]]:
    """Let every activation quantizer without a grid observe the passes run inside.

    On exit each fits its grid to what it saw and quantizes from then on. Quantizers that already
    have a grid (a method chose their clips) are left alone.

    Parameters
    ----------
    model : nn.Module
        The model.

    Yields
    ------
    list of ActQuantizer
        The quantizers observing (empty: nothing to calibrate).
    """
    pending = [q for q in act_quantizers(model) if q.grid is None]
    for q in pending:
        q.mode = "observe"
    yield pending
    for q in pending:  # not on an exception: a half-observed quantizer must not fit a grid
        q.mode = "quant"


@torch.no_grad()
def run_passes(model: nn.Module, batches: Any) -> None:
    """Forward every batch ``(x, ...)`` through ``model`` (plain loop, no Lightning)."""
    for i, batch in enumerate(batches):
        with batch_index(i):
            model(batch[0])


def sync_across_ranks(model: nn.Module) -> None:
    """Merge BN accumulators and observer samples of all ranks (no-op in a single process)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for module in model.modules():
        acc = getattr(module, "_qaf_bn_acc", None)
        if acc is not None:
            for tensor in (acc.sum_mean, acc.sum_var, acc.count):
                dist.all_reduce(tensor)
    observing = [q for q in act_quantizers(model) if q.mode == "observe"]
    if observing:
        states = [q.observer.observation() for q in observing]
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, [{k: v.cpu() for k, v in s.items()} for s in states])
        for i, q in enumerate(observing):
            q.observer.merge([rank_states[i] for rank_states in gathered])
