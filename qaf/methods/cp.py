"""Quantization Aware Factorization: one method class :class:`CP`, four named configs.

Each selected conv (a kernel larger than 1x1, groups 1, put at ``bits`` by the layer policy) is
replaced by a :class:`qaf.decomp.CPConv2d` whose three factors lie on ``bits``-bit grids. Two
options choose how (``conf/cp_solver/default.yaml`` holds the rest; ``conf/method/<name>.yaml``
sets these two):

- ``method=cpd`` (``init=als, solver=quantize``): float CP by ALS, then each factor quantized;
- ``method=cpd_epc`` (``init=epc, solver=quantize``): ALS, error-preserving correction (EPC), then
  each factor quantized;
- ``method=admm`` (``init=svd | random | als, solver=admm``): quantized CP by AO-ADMM from that start;
- ``method=admm_epc`` (``init=epc, solver=admm``): quantized CP by AO-ADMM from the CP-EPC solution.

Every other conv/linear layer is quantized as the policy says; inputs of the factorized layers'
three sub-convs are quantized at ``act_bits`` (fitted by the pipeline's observers). Float starts
(ALS, EPC) and ADMM results are cached separately, so a sweep over bit widths and over
``admm``/``admm_epc`` computes each start once per layer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from qaf.cache import FactorCache, tensor_digest
from qaf.config import ConfigError, option
from qaf.decomp import admm as admm_module
from qaf.decomp import cp as cp_module
from qaf.decomp import epc as epc_module
from qaf.decomp.cp import cp_als, cp_rank, init_factors, max_rate, relative_error, weight_to_tensor
from qaf.decomp.epc import cp_epc
from qaf.decomp.layers import CPConv2d
from qaf.methods import ranks as ranks_module
from qaf.methods.base import CompressContext, DecompositionMethod, DecompositionOptions
from qaf.quant.uniform import VERSION as QUANT_VERSION
from qaf.quant.uniform import Grid, make_grid
from qaf.results import MethodInfo

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
INITS = ("svd", "random", "als", "epc")
SOLVERS = ("quantize", "admm")
#: Factors from this size up fit their MSE grids by sorted prefix sums (:func:`qaf.quant.clip.sorted_mse`):
#: 3.5x faster at 512 x 1903 (a third of an ADMM outer iteration before). The CIFAR models' factors
#: (at most 64 x 224) stay below it, so their documented figures are unchanged.
SORTED_SEARCH_ELEMENTS = 1 << 16
_Entry = tuple[dict[str, Tensor], dict[str, Any]]  # a cache entry: tensors, metadata


@dataclass
class CPOptions(DecompositionOptions):
    """Options of the CP family (``conf/cp_solver/default.yaml``); see :class:`CP`."""

    init: str = option("svd", choices=INITS)
    solver: str = option("admm", choices=SOLVERS)
    symmetric: bool = option(True)
    p: float = option(2.0, low=0, low_open=True)
    dtype: str = option("float32", choices=tuple(_DTYPES))
    als_iters: int = option(50, low=1, high=10**7)
    als_tol: float = option(1e-7, low=0)
    epc_iters: int = option(1000, low=1, high=10**7)
    epc_min_iters: int = option(50, low=1, high=10**7)
    epc_work: float = option(2.4e9, low=0)
    epc_tol: float = option(1e-6, low=0)
    epc_one_step: bool = option(False)
    admm_outer: int = option(100, low=1, high=10**7)
    admm_inner: int = option(10, low=1, high=10**7)
    admm_tol_inner: float = option(1e-4, low=0)
    admm_tol_outer: float = option(1e-4, low=0)
    admm_patience: int = option(5, low=1, high=10**7)
    admm_relaxation: float = option(1.0, low=0, low_open=True, high=1.9)
    admm_work: float = option(0.0, low=0)
    admm_min_outer: int = option(10, low=1, high=10**7)
    # Not in conf/cp_solver/default.yaml, so the config hashes of existing runs stay: a check, not
    # a setting of the computation (``+method.min_rank=1`` allows rank-1 layers).
    min_rank: int = option(2, low=1, high=10**7)
    # The `ranks` group's node (conf/ranks/budget.yaml puts it here); checked by BudgetOptions.from_config.
    ranks: dict | None = None


class CP(DecompositionMethod):
    """Quantized CP factorization of the selected convs: one class, four named configs.

    Parameters
    ----------
    bits, act_bits, rate
        Factor bit width, input-activation bit width and parameter reduction rate per layer.
    include, exclude : list of str
        fnmatch patterns on module names, applied to the convs the policy puts at ``bits``.
    init : {"svd", "random", "als", "epc"}
        The float start: SVD or random factors, ALS (from SVD), or ALS then EPC.
    solver : {"quantize", "admm"}
        Quantize the start's factors (``als`` or ``epc`` start), or AO-ADMM from the start.
    symmetric : bool
        Factor grids symmetric (zero point 0) or affine; both have ``2^b`` levels.
    clip : {"minmax", "mse", "lp", "aciq"}
        Clip rule of the per-tensor factor grids (and of the weights of non-factorized layers).
    p : float
        Exponent of the ``lp`` clip rule.
    act_clip : {"minmax", "mse", "lp", "aciq"}
        Clip rule of the activation quantizers.
    dtype : {"float32", "float64"}
        Dtype of the solvers' GEMMs (R x R algebra is always float64).
    als_iters, als_tol
        ALS budget and stopping tolerance.
    epc_iters, epc_min_iters, epc_work, epc_tol
        EPC sweeps: ``clamp(epc_work / R^3, epc_min_iters, epc_iters)`` (an EPC sweep costs about three R x R
        Cholesky factorizations and their solves, so large ranks get fewer sweeps), stop on a relative
        change of ``||lambda||`` below ``epc_tol``.
    epc_one_step : bool
        From the third EPC sweep on, one Newton step per block from an extrapolated multiplier
        instead of a solve to convergence (:func:`qaf.decomp.epc.cp_epc`): half the cost of a sweep
        at large ranks.
    admm_outer, admm_inner, admm_tol_inner, admm_tol_outer, admm_patience
        AO-ADMM budgets (see :func:`qaf.decomp.admm.cp_admm`).
    admm_relaxation : float
        Over-relaxation alpha of the inner ADMM steps, in (0, 1.9]; 1 for none (1.5-1.8 is usual).
    admm_work, admm_min_outer
        0 (default): every layer gets ``admm_outer`` outer sweeps at most. Otherwise a layer of rank R
        gets ``clamp(admm_work / R^3, admm_min_outer, admm_outer)``, as EPC does: at large ranks a
        sweep costs about R^3 and a longer EPC start buys more than ADMM sweeps (docs/qaf_solvers.md).
    min_rank : int
        The smallest rank ``rate`` may give a selected conv (2: a rank-1 layer, a rate too large
        by mistake, is refused; ``+method.min_rank=1`` allows it).
    ranks : dict or None
        The ``ranks`` group (``ranks=budget``: per-layer ranks under a %BOPs or size target,
        :mod:`qaf.methods.ranks`); None (``ranks=uniform``): every rank from ``rate``.

    Attributes
    ----------
    name : str
        ``cpd`` (ALS, quantize), ``cpd_epc`` (EPC, quantize), ``admm`` (AO-ADMM from an SVD,
        random or ALS start), ``admm_epc`` (AO-ADMM from EPC).
    """

    Options = CPOptions
    log_fields = ("rank", "e_quant", "seconds_als", "seconds_epc", "seconds_admm")

    def __init__(self, bits: int = 4, act_bits: int = 8, rate: float = 2.0, **options: Any):
        super().__init__(bits=bits, act_bits=act_bits, rate=rate, **options)
        if self.solver == "quantize" and self.init not in ("als", "epc"):
            raise ConfigError(f"method.init={self.init!r} is invalid with method.solver=quantize: accepted als, epc "
                              "(the factors of a CP decomposition)")
        self.als = {"iters": self.als_iters, "tol": self.als_tol}
        self.epc = {"iters": self.epc_iters, "min_iters": self.epc_min_iters, "work": self.epc_work,
                    "tol": self.epc_tol, "one_step": self.epc_one_step}
        self.admm = {"outer": self.admm_outer, "inner": self.admm_inner, "tol_inner": self.admm_tol_inner,
                     "tol_outer": self.admm_tol_outer, "patience": self.admm_patience,
                     "relaxation": self.admm_relaxation, "work": self.admm_work, "min_outer": self.admm_min_outer}
        self.budget = None if self.ranks is None else ranks_module.BudgetOptions.from_config(self.ranks)
        self.layer_ranks: dict[str, int] | None = None  # chosen by the allocation; None: from `rate`
        self.effective_rate: float | None = None

    @property
    def name(self) -> str:  # type: ignore[override]
        """``cpd``, ``cpd_epc``, ``admm`` or ``admm_epc``: what the options make it."""
        return ("cpd" if self.solver == "quantize" else "admm") + ("_epc" if self.init == "epc" else "")

    @property
    def info(self) -> MethodInfo:  # type: ignore[override]
        """``CPD→PTQ``, ``CPD-EPC→PTQ``, ``ADMM``, ``ADMM-EPC``; the rate applies. Under ``ranks=budget``
        the variant ``ranks=budget`` and, once compressed, the rate of all factorized layers together."""
        epc, admm = self.init == "epc", self.solver == "admm"
        display = ("ADMM" if admm else "CPD") + ("-EPC" if epc else "") + ("" if admm else "→PTQ")
        variant = "" if self.budget is None else "ranks=budget"
        return MethodInfo(display=display, uses_rate=True, order=40 + 20 * admm + 10 * epc, variant=variant,
                          rate=self.effective_rate)

    def check_layers(self, layers: list[tuple[str, nn.Conv2d]]) -> None:
        """Every selected conv gets a rank >= ``min_rank`` at ``rate``; raise one ``ConfigError``
        naming the first layer that would not, and the rates accepted."""
        if self.budget is not None:  # the allocation picks every rank
            return
        # cp_rank = floor(max_rate / rate) >= min_rank  <=>  rate <= max_rate / min_rank
        limit = min(max_rate(weight_to_tensor(conv.weight).shape) for _, conv in layers) / self.min_rank
        for name, conv in layers:
            rank = cp_rank(weight_to_tensor(conv.weight).shape, self.rate)
            if rank < self.min_rank:
                allow = " (+method.min_rank=1 allows rank 1)" if rank == 1 else ""
                raise ConfigError(
                    f"rate={self.rate} is invalid: layer {name} {tuple(conv.weight.shape)} would get rank {rank}, "
                    f"below method.min_rank={self.min_rank}; accepted a rate in (1, {limit:.4g}] for the "
                    f"selected layers{allow}")

    def schemes(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Per-tensor symmetric weights and affine activations with the method's clip rules and ``p``."""
        return ({"symmetric": True, "clip": self.clip, "p": self.p},
                {"clip": self.act_clip, "p": self.p, "symmetric": False})

    def grid_factory(self, x: Tensor) -> Grid:
        """Per-tensor grid of ``bits`` bits fitted to ``x`` with the method's clip rule; the MSE search
        of a factor with at least :data:`SORTED_SEARCH_ELEMENTS` entries by sorted prefix sums."""
        fast = self.clip == "mse" and x.numel() >= SORTED_SEARCH_ELEMENTS
        return make_grid(x, self.bits, symmetric=self.symmetric, clip=self.clip, p=self.p, sorted_search=fast)

    def rank_of(self, name: str, conv: nn.Conv2d) -> int:
        """The rank of a selected conv: from ``rate``, or what the ``ranks`` allocation chose for it."""
        if self.layer_ranks is not None:
            return self.layer_ranks[name]
        return cp_rank(weight_to_tensor(conv.weight).shape, self.rate)

    def decompose(self, name: str, conv: nn.Conv2d, ctx: CompressContext,
                  cache: FactorCache) -> tuple[nn.Module, dict[str, Grid | None], dict]:
        """The :class:`CPConv2d` of one conv with quantized factors at its rank (:meth:`rank_of`)."""
        return self.factorize(name, conv, self.rank_of(name, conv), ctx, cache)

    def compress(self, model: nn.Module, ctx: CompressContext) -> list[dict]:
        """Choose the ranks (``ranks=budget``: :func:`qaf.methods.ranks.allocate_ranks`), then factorize."""
        if self.budget is not None:
            model.to(ctx.device)
            self.layer_ranks, self.summary["ranks"] = ranks_module.allocate_ranks(self, model, ctx, self.budget)
        reports = super().compress(model, ctx)
        if self.budget is not None:
            self.effective_rate = ranks_module.effective_rate(reports)
        return reports

    def check(self, model: nn.Module, ctx: CompressContext) -> None:
        """The selection and ranks (:meth:`check_layers`); under ``ranks=budget``, a target some allocation
        reaches and enough calibration images (:func:`qaf.methods.ranks.check_budget`)."""
        super().check(model, ctx)
        if self.budget is not None:
            ranks_module.check_budget(self, model, ctx, self.budget)

    def factorize(self, name: str, conv: nn.Conv2d, rank: int, ctx: CompressContext,
                  cache: FactorCache) -> tuple[nn.Module, dict[str, Grid | None], dict]:
        """The :class:`CPConv2d` of one conv with quantized factors of rank ``rank``, its sub-convs' grids,
        its report."""
        dt = _DTYPES[self.dtype]
        tensor = weight_to_tensor(conv.weight.detach()).to(ctx.device, dt)
        keys = self.stage_keys(conv, rank, ctx)
        hits: list[bool] = []
        seconds = {"seconds_als": 0.0, "seconds_epc": 0.0, "seconds_admm": 0.0}  # 0 when cached or not run
        start = self._start(tensor, rank, keys, cache, ctx.seed, hits, seconds)
        e_float = relative_error(tensor, start)
        iterations = 0
        if self.solver == "quantize":
            grids = [self.grid_factory(f) for f in start]
            factors = [g(f) for g, f in zip(grids, start)]
        else:
            def run_admm() -> tuple[dict[str, Tensor], dict[str, Any]]:
                res = self.solve_admm(tensor, start)
                return {**_as_dict(res.factors), **_grids_as_dict(res.grids)}, {
                    "iterations": res.iterations, "diverged": res.diverged, "inner_iterations": res.inner_iterations,
                    "qrange": [[g.qmin, g.qmax] for g in res.grids]}

            stored, meta, hit = cache.get_or_compute(keys["admm"], _timed(run_admm, seconds, "seconds_admm"),
                                                     schema=_admm_schema(len(start)))
            hits.append(hit)
            factors = _as_list(stored, ctx.device, dt)
            grids = [Grid(stored[f"scale{n}"].to(ctx.device), stored[f"zero_point{n}"].to(ctx.device), *qr)
                     for n, qr in enumerate(meta["qrange"])]
            iterations = int(meta["iterations"])
        e_quant = relative_error(tensor, factors)
        report = {"name": name, "shape": list(conv.weight.shape), "rank": rank,
                  "rate": ranks_module.factor_rate(conv.weight.shape, rank), "bits": self.bits,
                  "method": self.name, "init": self.init, "iterations": iterations,
                  "e_float": round(e_float, 6), "e_quant": round(e_quant, 6), "cached": all(hits), **seconds}
        return (*self._cp_layer(conv, factors, grids), report)

    def shell(self, conv: nn.Conv2d, rank: int) -> tuple[nn.Module, dict[str, Grid | None]]:
        """A :class:`CPConv2d` of rank ``rank`` built as :meth:`factorize` builds it, its factors and grids
        placeholders (grids fitted to evenly spaced values): what it costs and stores is what the
        solved layer costs and stores."""
        kh, kw = conv.kernel_size
        factors = [torch.linspace(-1, 1, n * rank, device=conv.weight.device).reshape(n, rank)
                   for n in (conv.out_channels, conv.in_channels, kh * kw)]
        return self._cp_layer(conv, factors, [self.grid_factory(f) for f in factors])

    @staticmethod
    def _cp_layer(conv: nn.Conv2d, factors: list[Tensor], grids: list[Grid]) -> tuple[nn.Module, dict[str, Grid]]:
        wdt = conv.weight.dtype
        a, b, c = (Grid(g.scale.to(wdt), g.zero_point.to(wdt), g.qmin, g.qmax) for g in grids)
        # pointwise_in holds factor B, depthwise C, pointwise_out A
        return CPConv2d(conv, [f.to(wdt) for f in factors]), {"pointwise_in": b, "depthwise": c, "pointwise_out": a}

    def stage_keys(self, conv: nn.Conv2d, rank: int, ctx: CompressContext) -> dict[str, dict]:
        """The cache keys of each stage of one conv's factorization at ``rank``, start first: ``init``
        (SVD, random) or ``als`` [and ``epc``], then ``admm`` or ``quantize`` (the quantized factors,
        not cached themselves: the key names them for results computed from them)."""
        shape = list(weight_to_tensor(conv.weight).shape)
        base = {"weight": tensor_digest(conv.weight), "shape": shape, "rank": rank,
                "dtype": self.dtype, "device": ctx.device.type, "seed": ctx.seed}
        if self.init in ("svd", "random"):
            keys = {"init": {**base, "stage": "init", "init": self.init, "version": cp_module.VERSION}}
        else:
            keys = {"als": {**base, "stage": "als", "version": cp_module.VERSION, "als": self.als}}
            if self.init == "epc":
                keys["epc"] = {**keys["als"], "stage": "epc", "epc_version": epc_module.VERSION,
                               "epc": {**self.epc, "sweeps": self.epc_sweeps(rank)}}
        start = list(keys.values())[-1]
        grid = {"grids": QUANT_VERSION, "bits": self.bits, "symmetric": self.symmetric, "clip": self.clip, "p": self.p,
                "sorted_from": SORTED_SEARCH_ELEMENTS}
        if self.solver == "admm":
            keys["admm"] = {**start, "stage": "admm", "version": admm_module.VERSION, **grid,
                            "admm": {**self.admm, "sweeps": self.admm_sweeps(rank)}}
        else:
            keys["quantize"] = {**start, "stage": "quantize", **grid}
        return keys

    def epc_sweeps(self, rank: int) -> int:
        """EPC sweeps of a rank-``rank`` layer: ``clamp(epc_work / R^3, epc_min_iters, epc_iters)``."""
        return _work_sweeps(self.epc["work"], rank, self.epc["min_iters"], self.epc["iters"])

    def admm_sweeps(self, rank: int) -> int:
        """Outer AO-ADMM sweeps at most of a rank-``rank`` layer: ``admm_outer``, or under ``admm_work > 0``
        ``clamp(admm_work / R^3, admm_min_outer, admm_outer)``."""
        if self.admm["work"] == 0:
            return self.admm["outer"]
        return _work_sweeps(self.admm["work"], rank, self.admm["min_outer"], self.admm["outer"])

    def solve_epc(self, tensor: Tensor, start: list[Tensor]) -> epc_module.EPCResult:
        """EPC of ``start`` (rank ``R`` factors of ``tensor``) with this method's budget."""
        return cp_epc(tensor, start, n_iter=self.epc_sweeps(start[0].shape[1]), tol=self.epc["tol"],
                      one_step=self.epc["one_step"])

    def solve_admm(self, tensor: Tensor, start: list[Tensor]) -> admm_module.ADMMResult:
        """AO-ADMM from ``start`` with this method's grids and budget."""
        admm = self.admm
        return admm_module.cp_admm(tensor, start, self.grid_factory, max_outer=self.admm_sweeps(start[0].shape[1]),
                                   max_inner=admm["inner"], tol_inner=admm["tol_inner"], tol_outer=admm["tol_outer"],
                                   patience=admm["patience"], relaxation=admm["relaxation"])

    def _start(self, tensor: Tensor, rank: int, keys: dict[str, dict], cache: FactorCache, seed: int,
               hits: list[bool], seconds: dict[str, float]) -> list[Tensor]:
        """Float starting factors (an init, ALS or EPC), cached under ``keys``; the seconds of each
        stage computed here (not served by the cache) go into ``seconds``."""
        dev, dt = tensor.device, tensor.dtype
        if "init" in keys:
            return init_factors(tensor, rank, self.init, torch.Generator().manual_seed(seed))
        schema = _factor_schema(tensor.dim())

        def run_als() -> tuple[dict[str, Tensor], dict[str, Any]]:
            res = cp_als(tensor, rank, n_iter=self.als["iters"], tol=self.als["tol"], init="svd",
                         generator=torch.Generator().manual_seed(seed))
            return _as_dict(res.factors), {"iterations": res.iterations, "error": res.error}

        stored, _, hit = cache.get_or_compute(keys["als"], _timed(run_als, seconds, "seconds_als"), schema=schema)
        hits.append(hit)
        als = _as_list(stored, dev, dt)
        if "epc" not in keys:
            return als

        def run_epc() -> tuple[dict[str, Tensor], dict[str, Any]]:
            res = self.solve_epc(tensor, als)
            return _as_dict(res.factors), {"iterations": res.iterations, "error": res.error}

        stored, _, hit = cache.get_or_compute(keys["epc"], _timed(run_epc, seconds, "seconds_epc"), schema=schema)
        hits.append(hit)
        return _as_list(stored, dev, dt)


def _timed(compute: Callable[[], _Entry], seconds: dict[str, float], stage: str) -> Callable[[], _Entry]:
    """``compute`` that records its wall time in ``seconds[stage]`` (a cache hit never calls it)."""

    def run() -> _Entry:
        start = time.perf_counter()
        out = compute()
        seconds[stage] = round(time.perf_counter() - start, 3)
        return out

    return run


def _as_dict(factors: list[Tensor]) -> dict[str, Tensor]:
    return {f"factor{n}": f for n, f in enumerate(factors)}


def _grids_as_dict(grids: list) -> dict[str, Tensor]:
    out = {}
    for n, g in enumerate(grids):
        out[f"scale{n}"], out[f"zero_point{n}"] = g.scale, g.zero_point
    return out


def _as_list(stored: dict[str, Tensor], device: torch.device, dtype: torch.dtype) -> list[Tensor]:
    count = sum(k.startswith("factor") for k in stored)
    return [stored[f"factor{n}"].to(device, dtype) for n in range(count)]


def _factor_schema(modes: int) -> dict[str, Any]:
    return {"tensors": [f"factor{n}" for n in range(modes)], "meta": ["iterations", "error"]}


def _work_sweeps(work: float, rank: int, low: int, high: int) -> int:
    """``clamp(work / R^3, low, high)`` sweeps: a sweep at rank R costs about R^3."""
    return int(min(high, max(low, work / rank**3)))


def _admm_schema(modes: int) -> dict[str, Any]:
    names = [f"{kind}{n}" for n in range(modes) for kind in ("factor", "scale", "zero_point")]
    return {"tensors": names, "meta": ["iterations", "diverged", "inner_iterations", "qrange"]}


__all__ = ["CP", "CPOptions"]
