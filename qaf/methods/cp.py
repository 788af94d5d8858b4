"""Quantization Aware Factorization: ``method=cpd | cpd_epc | admm | admm_epc``.

Each selected conv (a kernel larger than 1x1, groups 1, put at ``bits`` by the layer policy) is
replaced by a :class:`qaf.decomp.CPConv2d` whose three factors lie on ``bits``-bit grids:

- ``cpd``: float CP by ALS, then each factor quantized;
- ``cpd_epc``: ALS, error-preserving correction (EPC), then each factor quantized;
- ``admm``: quantized CP by AO-ADMM from an ``svd``, ``random`` or ``als`` start;
- ``admm_epc``: quantized CP by AO-ADMM from the CP-EPC solution.

Every other conv/linear layer is quantized as the policy says; inputs of the factorized layers'
three sub-convs are quantized at ``act_bits`` (fitted by the pipeline's observers). Float starts
(ALS, EPC) and ADMM results are cached separately, so a sweep over bit widths and over
``admm``/``admm_epc`` computes each start once per layer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from qaf.cache import FactorCache, tensor_digest
from qaf.config import ConfigError, check_bool, check_choice, check_int, check_number
from qaf.decomp import admm as admm_module
from qaf.decomp import cp as cp_module
from qaf.decomp import epc as epc_module
from qaf.decomp.cp import cp_als, cp_rank, init_factors, max_rate, relative_error, weight_to_tensor
from qaf.decomp.epc import cp_epc
from qaf.decomp.layers import CPConv2d
from qaf.methods.base import CompressContext, Method, decomposable_convs
from qaf.quant.clip import CLIP_RULES
from qaf.quant.modules import quantize_model, set_submodule
from qaf.quant.policy import LayerPolicy, layer_plan
from qaf.quant.uniform import VERSION as QUANT_VERSION
from qaf.quant.uniform import Grid, make_grid

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_SUBCONVS = ("pointwise_in", "depthwise", "pointwise_out")
INITS = ("svd", "random", "als")
_Entry = tuple[dict[str, Tensor], dict[str, Any]]  # a cache entry: tensors, metadata


class CPMethod(Method):
    """Shared machinery of the four CP methods (subclasses fix ``solver``, ``epc_start``).

    Parameters
    ----------
    bits, act_bits, rate
        Factor bit width, input-activation bit width and parameter reduction rate per layer.
    include, exclude : list of str
        fnmatch patterns on module names, applied to the convs the policy puts at ``bits``.
    symmetric : bool
        Factor grids symmetric (zero point 0) or affine; both have ``2^b`` levels.
    clip : {"minmax", "mse", "lp", "aciq"}
        Clip rule of the per-tensor factor grids (and of the weights of non-factorized layers).
    p : float
        Exponent of the ``lp`` clip rule.
    act_clip : {"minmax", "mse", "lp", "aciq"}
        Clip rule of the activation quantizers.
    init : {"svd", "random", "als"}
        Start of ``admm`` (the other methods ignore it: ALS starts from ``svd``).
    dtype : {"float32", "float64"}
        Dtype of the solvers' GEMMs (R x R algebra is always float64).
    als_iters, als_tol
        ALS budget and stopping tolerance.
    epc_iters, epc_min_iters, epc_work, epc_tol
        EPC sweeps: ``clamp(epc_work / R^3, epc_min_iters, epc_iters)`` (EPC costs three R x R
        eigendecompositions per sweep, so large ranks get fewer sweeps), stop on a relative
        change of ``||lambda||`` below ``epc_tol``.
    admm_outer, admm_inner, admm_tol_inner, admm_tol_outer, admm_patience
        AO-ADMM budgets (see :func:`qaf.decomp.admm.cp_admm`).
    """

    name = "cp"
    solver = "cpd"
    epc_start = False

    def __init__(self, bits: int = 4, act_bits: int = 8, rate: float = 2.0, *,
                 include: list[str] | None = None, exclude: list[str] | None = None,
                 symmetric: bool = True, clip: str = "mse", p: float = 2.0, act_clip: str = "mse",
                 init: str = "svd", dtype: str = "float32",
                 als_iters: int = 50, als_tol: float = 1e-7,
                 epc_iters: int = 1000, epc_min_iters: int = 50, epc_work: float = 2.4e9, epc_tol: float = 1e-6,
                 admm_outer: int = 100, admm_inner: int = 10, admm_tol_inner: float = 1e-4,
                 admm_tol_outer: float = 1e-4, admm_patience: int = 5, **options: Any):
        super().__init__(bits=bits, act_bits=act_bits, rate=rate, **options)
        self.include = list(include) if include is not None else ["*"]
        self.exclude = list(exclude) if exclude is not None else []
        self.clip, self.p, self.act_clip, self.symmetric = clip, p, act_clip, symmetric
        self.init, self.dtype = init, dtype
        self.als = {"iters": als_iters, "tol": als_tol}
        self.epc = {"iters": epc_iters, "min_iters": epc_min_iters, "work": epc_work, "tol": epc_tol}
        self.admm = {"outer": admm_outer, "inner": admm_inner, "tol_inner": admm_tol_inner,
                     "tol_outer": admm_tol_outer, "patience": admm_patience}

    # ----------------------------------------------------------------------------- checks
    def select_layers(self, model: nn.Module, policy: LayerPolicy) -> list[tuple[str, nn.Conv2d]]:
        """The convs this method factorizes, in module order."""
        return decomposable_convs(model, policy, self.include, self.exclude)

    def check(self, model: nn.Module, ctx: CompressContext) -> None:
        """Validate options and ranks; raise one ``ConfigError`` naming the key."""
        for key in ("clip", "act_clip"):
            check_choice(f"method.{key}", getattr(self, key), CLIP_RULES)
        check_choice("method.init", self.init, INITS)
        check_choice("method.dtype", self.dtype, tuple(_DTYPES))
        check_bool("method.symmetric", self.symmetric)
        check_number("method.p", self.p, 0, low_open=True)
        for key, value in (("als_iters", self.als["iters"]), ("epc_iters", self.epc["iters"]),
                           ("epc_min_iters", self.epc["min_iters"]), ("admm_outer", self.admm["outer"]),
                           ("admm_inner", self.admm["inner"]), ("admm_patience", self.admm["patience"])):
            check_int(f"method.{key}", value, 1, 10**7)
        for key, value in (("als_tol", self.als["tol"]), ("epc_tol", self.epc["tol"]), ("epc_work", self.epc["work"]),
                           ("admm_tol_inner", self.admm["tol_inner"]), ("admm_tol_outer", self.admm["tol_outer"])):
            check_number(f"method.{key}", value, 0)
        policy = ctx.policy
        layers = self.select_layers(model, policy)
        if not layers:
            raise ConfigError(
                f"method={self.name} selects no layer: method.include={self.include} / "
                f"method.exclude={self.exclude} with policy={policy.name} match no conv with a kernel larger "
                "than 1x1 that the policy puts at `bits`"
            )
        limit = min(max_rate(weight_to_tensor(conv.weight).shape) for _, conv in layers)
        for name, conv in layers:
            if cp_rank(weight_to_tensor(conv.weight).shape, self.rate) < 1:
                raise ConfigError(
                    f"rate={self.rate} is invalid: layer {name} {tuple(conv.weight.shape)} would get "
                    f"rank < 1; the largest valid rate for the selected layers is {limit:.4g}"
                )

    # --------------------------------------------------------------------------- compress
    def compress(self, model: nn.Module, ctx: CompressContext) -> list[dict]:
        """Factorize the selected convs in place, then quantize every layer the policy asks for."""
        model.to(ctx.device)
        plan = dict(layer_plan(model, ctx.policy, self.bits, self.act_bits))
        layers = self.select_layers(model, ctx.policy)
        reports, grids = [], {}
        for idx, (name, conv) in enumerate(layers):
            start = time.perf_counter()
            factors, factor_grids, report = self.factorize(name, conv, ctx)
            report["seconds"] = round(time.perf_counter() - start, 3)
            set_submodule(model, name, CPConv2d(conv, factors))
            del plan[name]
            for sub, grid in zip(_SUBCONVS, _subconv_grids(factor_grids)):
                plan[f"{name}.{sub}"] = (self.bits, self.act_bits)
                grids[f"{name}.{sub}"] = grid
            reports.append(report)
            ctx.log("[%d/%d] %s rank %d: %.1f s (ALS %.1f, EPC %.1f, ADMM %.1f), e_quant %.4f%s", idx + 1,
                    len(layers), name, report["rank"], report["seconds"], report["seconds_als"],
                    report["seconds_epc"], report["seconds_admm"], report["e_quant"],
                    " (cached)" if report["cached"] else "")
        quantize_model(model, plan, weight_scheme={"symmetric": True, "clip": self.clip, "p": self.p},
                       act_scheme={"clip": self.act_clip, "p": self.p, "symmetric": False}, weight_grids=grids)
        return reports

    def grid_factory(self, x: Tensor) -> Grid:
        """Per-tensor grid of ``bits`` bits fitted to ``x`` with the method's clip rule."""
        return make_grid(x, self.bits, symmetric=self.symmetric, clip=self.clip, p=self.p)

    def factorize(self, name: str, conv: nn.Conv2d, ctx: CompressContext) -> tuple[list[Tensor], list[Grid], dict]:
        """Quantized CP factors of one conv, their grids, and its report dict."""
        dt = _DTYPES[self.dtype]
        tensor = weight_to_tensor(conv.weight.detach()).to(ctx.device, dt)
        rank = cp_rank(tensor.shape, self.rate)
        base = {"weight": tensor_digest(conv.weight), "shape": list(tensor.shape), "rank": rank,
                "dtype": self.dtype, "device": ctx.device.type, "seed": ctx.seed}
        cache = ctx.cache if ctx.cache is not None else FactorCache("", enabled=False)
        hits: list[bool] = []
        seconds = {"seconds_als": 0.0, "seconds_epc": 0.0, "seconds_admm": 0.0}  # 0 when cached or not run
        start_key, start = self._start(tensor, rank, base, cache, ctx.seed, hits, seconds)
        e_float = relative_error(tensor, start)
        iterations = 0
        if self.solver == "cpd":
            grids = [self.grid_factory(f) for f in start]
            factors = [g(f) for g, f in zip(grids, start)]
        else:
            key = {**start_key, "stage": "admm", "version": admm_module.VERSION, "grids": QUANT_VERSION, "bits": self.bits,
                   "symmetric": self.symmetric, "clip": self.clip, "p": self.p, "admm": self.admm}

            def run_admm() -> tuple[dict[str, Tensor], dict[str, Any]]:
                res = admm_module.cp_admm(tensor, start, self.grid_factory, max_outer=self.admm["outer"],
                                          max_inner=self.admm["inner"], tol_inner=self.admm["tol_inner"],
                                          tol_outer=self.admm["tol_outer"], patience=self.admm["patience"])
                return {**_as_dict(res.factors), **_grids_as_dict(res.grids)}, {
                    "iterations": res.iterations, "diverged": res.diverged, "inner_iterations": res.inner_iterations,
                    "qrange": [[g.qmin, g.qmax] for g in res.grids]}

            stored, meta, hit = cache.get_or_compute(key, _timed(run_admm, seconds, "seconds_admm"),
                                                     schema=_admm_schema(len(start)))
            hits.append(hit)
            factors = _as_list(stored, ctx.device, dt)
            grids = [Grid(stored[f"scale{n}"].to(ctx.device), stored[f"zero_point{n}"].to(ctx.device), *qr)
                     for n, qr in enumerate(meta["qrange"])]
            iterations = int(meta["iterations"])
        e_quant = relative_error(tensor, factors)
        report = {"name": name, "shape": list(conv.weight.shape), "rank": rank, "bits": self.bits,
                  "method": self.name, "init": self._init_name(), "iterations": iterations,
                  "e_float": round(e_float, 6), "e_quant": round(e_quant, 6), "cached": all(hits), **seconds}
        wdt = conv.weight.dtype
        grids = [Grid(g.scale.to(wdt), g.zero_point.to(wdt), g.qmin, g.qmax) for g in grids]
        return [f.to(wdt) for f in factors], grids, report

    def _init_name(self) -> str:
        if self.solver == "cpd" or self.epc_start:
            return "epc" if self.epc_start else "als"
        return self.init

    def _start(self, tensor: Tensor, rank: int, base: dict, cache: FactorCache, seed: int,
               hits: list[bool], seconds: dict[str, float]) -> tuple[dict, list[Tensor]]:
        """Float starting factors (ALS, EPC or an ADMM init), cached; returns (key, factors).

        The seconds of each stage computed here (not served by the cache) go into ``seconds``.
        """
        dev, dt = tensor.device, tensor.dtype
        kind = self._init_name()
        if kind in ("svd", "random"):
            gen = torch.Generator().manual_seed(seed)
            return {**base, "stage": "init", "init": kind, "version": cp_module.VERSION}, \
                init_factors(tensor, rank, kind, gen)
        als_key = {**base, "stage": "als", "version": cp_module.VERSION, "als": self.als}
        schema = _factor_schema(tensor.dim())

        def run_als() -> tuple[dict[str, Tensor], dict[str, Any]]:
            res = cp_als(tensor, rank, n_iter=self.als["iters"], tol=self.als["tol"], init="svd",
                         generator=torch.Generator().manual_seed(seed))
            return _as_dict(res.factors), {"iterations": res.iterations, "error": res.error}

        stored, _, hit = cache.get_or_compute(als_key, _timed(run_als, seconds, "seconds_als"), schema=schema)
        hits.append(hit)
        als = _as_list(stored, dev, dt)
        if kind == "als":
            return als_key, als
        sweeps = int(min(self.epc["iters"], max(self.epc["min_iters"], self.epc["work"] / rank**3)))
        epc_key = {**als_key, "stage": "epc", "epc_version": epc_module.VERSION, "epc": {**self.epc, "sweeps": sweeps}}

        def run_epc() -> tuple[dict[str, Tensor], dict[str, Any]]:
            res = cp_epc(tensor, als, n_iter=sweeps, tol=self.epc["tol"])
            return _as_dict(res.factors), {"iterations": res.iterations, "error": res.error}

        stored, _, hit = cache.get_or_compute(epc_key, _timed(run_epc, seconds, "seconds_epc"), schema=schema)
        hits.append(hit)
        return epc_key, _as_list(stored, dev, dt)


class CPD(CPMethod):
    """``method=cpd``: float CP by ALS, then each factor quantized."""

    name, solver, epc_start = "cpd", "cpd", False


class CPDEPC(CPMethod):
    """``method=cpd_epc``: ALS, error-preserving correction, then each factor quantized."""

    name, solver, epc_start = "cpd_epc", "cpd", True


class ADMM(CPMethod):
    """``method=admm``: quantized CP by AO-ADMM from an ``svd`` / ``random`` / ``als`` start."""

    name, solver, epc_start = "admm", "admm", False


class ADMMEPC(CPMethod):
    """``method=admm_epc``: quantized CP by AO-ADMM started from the CP-EPC solution."""

    name, solver, epc_start = "admm_epc", "admm", True


def _timed(compute: Callable[[], _Entry], seconds: dict[str, float], stage: str) -> Callable[[], _Entry]:
    """``compute`` that records its wall time in ``seconds[stage]`` (a cache hit never calls it)."""

    def run() -> _Entry:
        start = time.perf_counter()
        out = compute()
        seconds[stage] = round(time.perf_counter() - start, 3)
        return out

    return run


def _subconv_grids(grids: list[Grid]) -> list[Grid]:
    """Grids of the three sub-convs (pointwise_in holds B, depthwise C, pointwise_out A)."""
    a, b, c = grids
    return [b, c, a]


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


def _admm_schema(modes: int) -> dict[str, Any]:
    names = [f"{kind}{n}" for n in range(modes) for kind in ("factor", "scale", "zero_point")]
    return {"tensors": names, "meta": ["iterations", "diverged", "inner_iterations", "qrange"]}


__all__ = ["ADMM", "ADMMEPC", "CPD", "CPDEPC", "CPMethod"]
