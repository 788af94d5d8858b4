"""Per-layer CP ranks under a budget: the ``ranks`` config group's ``ranks=budget``.

With ``ranks=uniform`` (the default) every factorized layer gets the rank ``rate`` gives it. With
``ranks=budget`` the ranks are chosen per layer so that the whole model's %BOPs
(``ranks.bops_pct``) or stored size (``ranks.size_kb``) is at or under the target and the
predicted loss of accuracy is least:

1. **Candidates** (:func:`candidates`): each selected conv may take the ranks that the rates
   ``ranks.rates`` give it. What each candidate costs (the layer's BOPs or stored bits) and what
   everything else costs are counted by :mod:`qaf.metrics.bops` and :mod:`qaf.metrics.size` on the
   model built as the run builds it (:meth:`qaf.methods.base.DecompositionMethod.assemble` with
   placeholder factors of the right shapes, every activation quantizer given a grid as the
   protocol gives it one), so the total of an allocation is the figure metrics.json reports.
2. **Sensitivity** (:func:`sensitivity`): for each layer and candidate rank, the layer factorized
   by the run's own method (its init, solver and ``bits``: CPD-EPC and ADMM-EPC get their own
   curves), every other layer and all activations left in float, the batch-norm statistics
   re-estimated on the same images under ``data.bn_transform`` (as the protocol re-estimates them
   after compression), and the
   mean KL divergence of the model's output distribution from the float model's on the first
   ``ranks.samples`` calibration images (training images; evaluation images are never read).
   Each point is cached
   under the factorization's keys, the model, the images and :data:`VERSION`, and the
   factorizations under their own keys, so a sweep over budgets pays for the scan once.
3. **Allocation** (:func:`allocate`): one candidate per layer minimising the summed KL with the
   total cost within the budget, solved exactly (a multiple-choice knapsack, by dynamic
   programming over Pareto fronts).
4. The usual factorization at the chosen ranks (cache hits: the scan computed them).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from qaf.cache import FactorCache, key_digest, tensor_digest
from qaf.calib import recalibrating_bn, run_passes
from qaf.config import ConfigError, check_options, option
from qaf.decomp.cp import cp_rank, max_rate, weight_to_tensor
from qaf.metrics.bops import bops_pct, layer_costs, total_macs
from qaf.metrics.size import storage_entries
from qaf.quant.modules import act_quantizers, set_submodule
from qaf.quant.uniform import Grid

if TYPE_CHECKING:
    from qaf.methods.base import CompressContext
    from qaf.methods.cp import CP

#: Version of the sensitivity numerics (what a cached curve point holds): part of its cache key.
VERSION = 4

__all__ = ["BudgetOptions", "Candidates", "allocate", "allocate_ranks", "candidates", "check_budget",
           "effective_rate", "factor_rate", "sensitivity"]


@dataclass
class BudgetOptions:
    """The keys of ``ranks=budget`` (``conf/ranks/budget.yaml``), checked by :meth:`from_config`.

    Attributes
    ----------
    bops_pct : float or None
        Target: the whole model's %BOPs (qaf's count, as metrics.json ``bops_pct``) at most this.
    size_kb : float or None
        Target: the stored size (metrics.json ``size_bytes`` / 1000) at most this. Exactly one
        of the two targets is given.
    rates : list of float
        Candidate rates; each layer may take the ranks they give it (``cp_rank``).
    samples : int
        Calibration images of the sensitivity scan (the first ones of the calibration set).
    """

    bops_pct: float | None = option(None, low=0, low_open=True, high=100)
    size_kb: float | None = option(None, low=0, low_open=True)
    rates: list[float] = option([1.5, 2.0, 2.5, 3.0, 4.0, 6.0], low=1, low_open=True)
    samples: int = option(256, low=1)

    @classmethod
    def from_config(cls, node: Any) -> "BudgetOptions":
        """The checked options of a ``ranks`` node; one ``ConfigError`` naming the key otherwise."""
        values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
        accepted = sorted(f.name for f in dataclasses.fields(cls))
        unknown = sorted(set(values) - set(accepted))  # type: ignore[arg-type]
        if unknown:
            raise ConfigError(f"ranks.{unknown[0]} is not an option of ranks=budget: accepted {', '.join(accepted)}")
        options = cls(**values)  # type: ignore[arg-type]
        check_options(options, "ranks")
        if (options.bops_pct is None) == (options.size_kb is None):
            given = "both" if options.bops_pct is not None else "neither"
            raise ConfigError(f"ranks=budget needs one target, {given} given: accepted ranks.bops_pct=<%BOPs> "
                              "or ranks.size_kb=<kB>")
        return options

    @property
    def axis(self) -> str:
        """``bops`` or ``size``: what the target limits."""
        return "bops" if self.bops_pct is not None else "size"

    @property
    def target(self) -> float:
        """The target's value (%BOPs or kB)."""
        return self.bops_pct if self.bops_pct is not None else self.size_kb  # type: ignore[return-value]

    @property
    def key(self) -> str:
        """The target's config key."""
        return "ranks.bops_pct" if self.axis == "bops" else "ranks.size_kb"


@dataclass
class Candidates:
    """The candidate ranks of each selected conv and what they cost.

    Attributes
    ----------
    names : list of str
        The selected convs, in module order.
    ranks : list of list of int
        Per layer, its distinct candidate ranks, ascending.
    costs : list of list of int
        Per layer and candidate: the layer's BOPs (per image) or stored bits.
    fixed : int
        The same for everything else in the model.
    capacity : int
        The largest total (fixed + layers) that meets the target.
    axis : str
        ``bops`` or ``size``.
    fp32_macs : int
        MACs of the float model (the reference of %BOPs).
    """

    names: list[str]
    ranks: list[list[int]]
    costs: list[list[int]]
    fixed: int
    capacity: int
    axis: str
    fp32_macs: int

    def total(self, choice: Sequence[int]) -> int:
        """The model's total cost with candidate ``choice[i]`` at layer ``i``."""
        return self.fixed + sum(costs[c] for costs, c in zip(self.costs, choice))

    def figure(self, total: int) -> float:
        """A total as reported: %BOPs, or kB (whole bytes, as ``size_bytes``)."""
        return bops_pct(total, self.fp32_macs) if self.axis == "bops" else math.ceil(total / 8) / 1e3


def candidates(method: "CP", model: nn.Module, ctx: "CompressContext", options: BudgetOptions) -> Candidates:
    """The candidate ranks of the selected convs and their costs, counted on the model as the run builds it.

    Parameters
    ----------
    method : CP
        The run's CP method (its selection, bits, grids, policy handling).
    model : nn.Module
        The float model (left unchanged: the costs are counted on copies).
    ctx : CompressContext
        The run's policy and data (the input size).
    options : BudgetOptions
        The candidate rates and the target.

    Returns
    -------
    Candidates

    Raises
    ------
    ConfigError
        When the rates give a layer no rank >= 1.
    """
    layers = method.select_layers(model, ctx.policy)
    ranks = []
    for name, conv in layers:
        shape = weight_to_tensor(conv.weight).shape
        found = sorted({cp_rank(shape, rate) for rate in options.rates} - {0})
        if not found:
            raise ConfigError(f"ranks.rates={list(options.rates)} gives layer {name} {tuple(conv.weight.shape)} "
                              f"no rank >= 1: accepted rates up to {max_rate(shape):.4g}")
        ranks.append(found)
    costs: list[list[int]] = [[] for _ in layers]
    fixed = None
    for k in range(max(len(r) for r in ranks)):
        pick = {name: r[k] for (name, _), r in zip(layers, ranks) if k < len(r)}
        per_layer, rest = _costs(method, model, ctx, pick, options.axis)
        if fixed is not None and rest != fixed:
            raise RuntimeError(f"the cost outside the factorized layers changed with their ranks ({fixed} -> {rest})")
        fixed = rest
        for i, (name, _) in enumerate(layers):
            if name in pick:
                costs[i].append(per_layer[name])
    fp32_macs = total_macs(layer_costs(model, ctx.data.input_size))
    capacity = _capacity(options, fp32_macs)
    return Candidates([n for n, _ in layers], ranks, costs, int(fixed or 0), capacity, options.axis, fp32_macs)


def _costs(method: "CP", model: nn.Module, ctx: "CompressContext", pick: dict[str, int],
           axis: str) -> tuple[dict[str, int], int]:
    """BOPs or stored bits of each picked layer at its rank, and of the rest, on a copy of ``model``
    built as :meth:`compress` builds it (unpicked selected convs stay as they are: they count as rest
    and are not part of the caller's figures)."""
    shell = copy.deepcopy(model)
    method.assemble(shell, ctx.policy, {name: method.shell(shell.get_submodule(name), rank)
                                        for name, rank in pick.items()})
    for quantizer in act_quantizers(shell):  # the protocol fits every one; stored as a grid
        quantizer.set_grid(Grid(torch.tensor(1.0), torch.tensor(0.0), 0, 2 ** quantizer.bits - 1))
    if axis == "bops":
        items = [(c.name, c.bops) for c in layer_costs(shell, ctx.data.input_size)]
    else:
        items = [(name, count * bits) for name, count, bits in storage_entries(shell)]
    per_layer = dict.fromkeys(pick, 0)
    rest = 0
    for name, value in items:
        owner = next((p for p in pick if name == p or name.startswith(p + ".")), None)
        if owner is None:
            rest += value
        else:
            per_layer[owner] += value
    return per_layer, rest


def _capacity(options: BudgetOptions, fp32_macs: int) -> int:
    """The largest total BOPs (or stored bits) whose reported figure is at most the target."""
    if options.axis == "size":
        limit = math.floor(options.target * 1e3)
        while limit / 1e3 > options.target:  # float rounding of target * 1000
            limit -= 1
        return 8 * limit
    limit = math.floor(options.target / 100 * fp32_macs * 1024)
    while limit > 0 and bops_pct(limit, fp32_macs) > options.target:
        limit -= 1
    while bops_pct(limit + 1, fp32_macs) <= options.target:
        limit += 1
    return limit


def check_budget(method: "CP", model: nn.Module, ctx: "CompressContext", options: BudgetOptions) -> Candidates:
    """Raise ``ConfigError`` before any heavy work when the scan needs more calibration images than there
    are, or when no allocation over the candidates meets the target; return the candidates."""
    if options.samples > ctx.data.calib_samples:
        raise ConfigError(f"ranks.samples={options.samples} is too large: the calibration set has "
                          f"{ctx.data.calib_samples} images (raise data.calib_samples or lower this)")
    found = candidates(method, model, ctx, options)
    cheapest = found.fixed + sum(min(c) for c in found.costs)
    if cheapest > found.capacity:
        unit = "%BOPs" if options.axis == "bops" else "kB"
        least = math.ceil(found.figure(cheapest) * 1e4) / 1e4
        raise ConfigError(
            f"{options.key}={options.target:g} is invalid: no allocation reaches it, the cheapest (every layer at "
            f"its largest rate of ranks.rates={list(options.rates)}) is {least:g} {unit}; accepted >= {least:g}, "
            "or add larger rates to ranks.rates")
    return found


@torch.no_grad()
def sensitivity(method: "CP", model: nn.Module, ctx: "CompressContext", found: Candidates,
                samples: int) -> tuple[list[list[float]], int]:
    """The KL curve of each layer over its candidate ranks, each point cached.

    Parameters
    ----------
    method : CP
        The run's CP method: each point factorizes the layer with it (:meth:`CP.factorize`).
    model : nn.Module
        The float model, on ``ctx.device``; each layer is swapped in and back, so it is unchanged.
    ctx : CompressContext
        The calibration images (``ctx.data.calib``), device, cache, progress lines.
    found : Candidates
        The layers and their candidate ranks.
    samples : int
        Calibration images to score on.

    Returns
    -------
    tuple
        Per layer and candidate, the mean KL divergence (nats per image) of the outputs with only
        that layer factorized from the float model's; and how many points came from the cache.
    """
    from qaf.methods.lapq import calibration_batches  # the same batches LAPQ scores its clips on

    cache = ctx.cache if ctx.cache is not None else FactorCache("", enabled=False)
    batches = [x for x, _ in calibration_batches(ctx.data, samples, ctx.data.batch_size, ctx.device)]
    # The protocol re-estimates BN statistics under data.bn_transform: the training augmentation the
    # model's statistics come from (under the evaluation transform the float model itself drifts).
    bn_batches = [(x,) for x, _ in calibration_batches(ctx.data, samples, ctx.data.batch_size, ctx.device,
                                                       ctx.data.bn_transform)]
    was_training = model.training
    model.eval()
    digest = key_digest({name: tensor_digest(t) for name, t in model.state_dict().items()})
    base = {"stage": "rank_sensitivity", "version": VERSION, "model": digest, "loss": "kl",
            "images": tensor_digest(torch.cat(batches)),
            "bn_images": tensor_digest(torch.cat([x for x, in bn_batches]))}
    reference: list[Tensor] = []  # the float model's log-probabilities, computed on the first miss
    layers = dict(method.select_layers(model, ctx.policy))
    curves, hits = [], 0
    try:
        for i, (name, ranks) in enumerate(zip(found.names, found.ranks)):
            start = time.perf_counter()
            conv = layers[name]
            curve = []
            for rank in ranks:
                key = {**base, "layer": name, "factors": list(method.stage_keys(conv, rank, ctx).values())[-1]}
                _, meta, hit = cache.get_or_compute(
                    key, lambda: _score(method, model, name, conv, rank, ctx, cache, batches, bn_batches, reference),
                    schema={"tensors": ["kl"], "meta": ["kl"]})
                curve.append(float(meta["kl"]))
                hits += hit
            curves.append(curve)
            ctx.log("ranks [%d/%d] %s KL %s: %.1f s", i + 1, len(found.names), name,
                    " ".join(f"{kl:.3g}@r{rank}" for kl, rank in zip(curve, ranks)), time.perf_counter() - start)
    finally:
        model.train(was_training)
    return curves, hits


def _score(method: "CP", model: nn.Module, name: str, conv: nn.Conv2d, rank: int, ctx: "CompressContext",
           cache: FactorCache, batches: list[Tensor], bn_batches: list[tuple[Tensor]],
           reference: list[Tensor]) -> tuple[dict[str, Tensor], dict]:
    """One curve point: a copy of the model with ``name`` factorized at ``rank``, its batch-norm
    statistics re-estimated on ``bn_batches`` (as the protocol re-estimates them after compression:
    without it the scan scores shifts of the layer's output statistics that the final model no
    longer has), and its mean KL divergence on ``batches`` (nats per image) from the float model's outputs, whose
    log-probabilities ``reference`` holds (filled on the first call)."""
    if not reference:
        reference.extend(F.log_softmax(model(x), dim=1).double() for x in batches)
    module, _, _ = method.factorize(name, conv, rank, ctx, cache)
    shell = copy.deepcopy(model)
    set_submodule(shell, name, module)
    with recalibrating_bn(shell):
        run_passes(shell, bn_batches)
    total = sum(F.kl_div(F.log_softmax(shell(x), dim=1).double(), ref, log_target=True, reduction="sum").item()
                for x, ref in zip(batches, reference))
    kl = total / sum(len(x) for x in batches)
    return {"kl": torch.tensor(kl, dtype=torch.float64)}, {"kl": kl}


def allocate(losses: Sequence[Sequence[float]], costs: Sequence[Sequence[int]], capacity: int) -> list[int]:
    """One candidate per layer with the least summed loss and the summed cost at most ``capacity``.

    An exact multiple-choice knapsack: layer by layer, the Pareto front of (cost, loss) over the
    choices so far (each point cheaper than, or better than, every other), pruned of points the
    cheapest remaining choices would take over the capacity. Ties go to the cheaper allocation,
    then to the first candidates in order, so the answer is deterministic.

    Parameters
    ----------
    losses, costs : sequence of sequences
        Per layer, per candidate: the loss it adds and what it costs (integers).
    capacity : int
        The largest summed cost allowed.

    Returns
    -------
    list of int
        The chosen candidate of each layer.

    Raises
    ------
    ValueError
        When even the cheapest choices exceed ``capacity``.
    """
    cheapest_rest = np.cumsum([min(c) for c in costs][::-1])[::-1].tolist()[1:] + [0]
    front_cost, front_loss = np.zeros(1, dtype=np.int64), np.zeros(1)
    steps = []
    for layer_losses, layer_costs, rest in zip(losses, costs, cheapest_rest):
        k = len(layer_costs)
        cost = (front_cost[:, None] + np.asarray(layer_costs, dtype=np.int64)[None, :]).ravel()
        loss = (front_loss[:, None] + np.asarray(layer_losses, dtype=np.float64)[None, :]).ravel()
        parent, choice = np.divmod(np.arange(cost.size), k)
        fits = cost + rest <= capacity
        cost, loss, parent, choice = cost[fits], loss[fits], parent[fits], choice[fits]
        order = np.lexsort((loss, cost))  # by cost, then loss; stable, so ties keep the earlier choice
        cost, loss, parent, choice = cost[order], loss[order], parent[order], choice[order]
        best_before = np.minimum.accumulate(np.concatenate([[np.inf], loss[:-1]]))
        keep = loss < best_before
        front_cost, front_loss = cost[keep], loss[keep]
        steps.append((parent[keep], choice[keep]))
    if front_cost.size == 0:
        raise ValueError(f"no allocation within the capacity {capacity}")
    index = int(np.argmin(front_loss))
    chosen = []
    for parent, choice in reversed(steps):
        chosen.append(int(choice[index]))
        index = int(parent[index])
    return chosen[::-1]


def allocate_ranks(method: "CP", model: nn.Module, ctx: "CompressContext",
                   options: BudgetOptions) -> tuple[dict[str, int], dict[str, Any]]:
    """The ranks of the selected convs under the budget, and what to record of the allocation.

    Parameters
    ----------
    method : CP
        The run's CP method.
    model : nn.Module
        The float model, on ``ctx.device`` (unchanged).
    ctx : CompressContext
        The run's context.
    options : BudgetOptions
        Target, candidate rates, scan images.

    Returns
    -------
    tuple
        ``{layer: rank}``; and the summary written to metrics.json (``method_summary.ranks``): the
        target, the predicted figure (what metrics.json will report), the summed KL, the scan's
        seconds and cache hits, and each layer's curve ``[rank, rate, kl, cost]`` per candidate.
    """
    start = time.perf_counter()
    found = check_budget(method, model, ctx, options)
    curves, hits = sensitivity(method, model, ctx, found, options.samples)
    choice = allocate(curves, found.costs, found.capacity - found.fixed)
    ranks = {name: found.ranks[i][c] for i, (name, c) in enumerate(zip(found.names, choice))}
    layers = dict(method.select_layers(model, ctx.policy))
    predicted = found.figure(found.total(choice))
    unit = "%BOPs" if options.axis == "bops" else "kB"
    summary = {
        "target": {options.key.split(".")[1]: options.target}, "predicted": predicted, "unit": unit,
        "kl": sum(curve[c] for curve, c in zip(curves, choice)), "samples": options.samples,
        "rates": list(options.rates), "seconds": round(time.perf_counter() - start, 3),
        "points": sum(len(r) for r in found.ranks), "cached_points": hits,
        "curves": {name: [[rank, factor_rate(layers[name].weight.shape, rank), kl, cost] for rank, kl, cost in
                          zip(found.ranks[i], curves[i], found.costs[i])] for i, name in enumerate(found.names)},
    }
    ctx.log("ranks: %s <= %g %s: %.4g %s predicted, summed KL %.4g (scan %.1f s, %d of %d points cached)",
            options.key, options.target, unit, predicted, unit, summary["kl"], summary["seconds"], hits,
            summary["points"])
    return ranks, summary


def factor_rate(shape: Sequence[int], rank: int) -> float:
    """The parameter reduction of a conv weight of ``shape`` factorized at ``rank`` (4 decimals)."""
    cout, cin, *kernel = shape
    modes = (cout, cin, math.prod(kernel))
    return round(math.prod(modes) / (sum(modes) * rank), 4)


def effective_rate(reports: Sequence[dict]) -> float:
    """The parameter reduction of all factorized layers together (their weights over their factors),
    from their per-layer reports (``shape``, ``rank``)."""
    weights = sum(math.prod(r["shape"]) for r in reports)
    factors = sum((r["shape"][0] + r["shape"][1] + math.prod(r["shape"][2:])) * r["rank"] for r in reports)
    return round(weights / factors, 4)
