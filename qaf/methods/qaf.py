"""Quantization Aware Factorization: ``method=cpd | cpd_epc | admm | admm_epc``.

Each selected conv (default: every conv with a kernel larger than 1x1 except the first conv) is
replaced by a :class:`qaf.decomp.CPConv2d` whose three factors lie on ``bits``-bit grids:

- ``cpd``: float CP by ALS, then each factor quantized;
- ``cpd_epc``: ALS, error-preserving correction (EPC), then each factor quantized;
- ``admm``: quantized CP by AO-ADMM from an ``svd``, ``random`` or ``als`` start;
- ``admm_epc``: quantized CP by AO-ADMM from the CP-EPC solution.

Every other conv/linear layer keeps its weight at ``keep_bits``; all inputs are quantized at
``act_bits`` (observed by the pipeline on calibration data), and BN is re-calibrated.
Float starts (ALS, EPC) and ADMM results are cached separately, so a sweep over bit widths and
over ``admm``/``admm_epc`` computes each start once per layer.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from typing import Any

import torch
from torch import Tensor, nn

from qaf.cache import FactorCache, tensor_digest
from qaf.config import ConfigError
from qaf.decomp.admm import cp_admm
from qaf.decomp.cp import cp_als, cp_rank, init_factors, max_rate, relative_error, weight_to_tensor
from qaf.decomp.epc import cp_epc
from qaf.decomp.layers import CPConv2d
from qaf.methods.base import CompressContext, Method
from qaf.quant.clip import CLIP_RULES
from qaf.quant.modules import quantize_model, set_submodule
from qaf.quant.uniform import make_grid

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_SUBCONVS = ("pointwise_in", "depthwise", "pointwise_out")


class QAFMethod(Method):
    """Shared machinery of the four CP methods (subclasses fix ``solver``, ``epc_start``).

    Parameters
    ----------
    bits, act_bits, rate
        Factor bit width, input-activation bit width and parameter reduction rate per layer.
    include, exclude : list of str
        fnmatch patterns on module names; a conv (groups 1, kernel > 1x1, not the first conv)
        is factorized if it matches an include and no exclude pattern.
    keep_bits : int or None
        Weight bits of every layer that is not factorized (first conv, 1x1 downsample convs,
        classifier); None: ``bits``.
    symmetric : bool
        Factor grids symmetric (zero point 0) or affine; both have ``2^b`` levels.
    clip : {"minmax", "mse", "lp", "aciq"}
        Clip rule of the per-tensor factor grids (and of the ``keep_bits`` weights).
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
    bn_calibration : bool
        Re-estimate BN statistics after compression.
    """

    name = "qaf"
    solver = "cpd"
    epc_start = False
    bn_calibration = True
    observe_activations = True

    def __init__(self, bits: int = 4, act_bits: int = 8, rate: float = 2.0, *,
                 include: list[str] | None = None, exclude: list[str] | None = None,
                 keep_bits: int | None = 8, symmetric: bool = True, clip: str = "mse", p: float = 2.0, act_clip: str = "mse",
                 init: str = "svd", dtype: str = "float32",
                 als_iters: int = 50, als_tol: float = 1e-7,
                 epc_iters: int = 1000, epc_min_iters: int = 50, epc_work: float = 2.4e9, epc_tol: float = 1e-6,
                 admm_outer: int = 100, admm_inner: int = 10, admm_tol_inner: float = 1e-4,
                 admm_tol_outer: float = 1e-4, admm_patience: int = 5,
                 bn_calibration: bool = True, **options: Any):
        super().__init__(bits=bits, act_bits=act_bits, rate=rate, **options)
        self.include = list(include) if include is not None else ["*"]
        self.exclude = list(exclude) if exclude is not None else []
        self.keep_bits, self.clip, self.p, self.act_clip = keep_bits, clip, p, act_clip
        self.symmetric = symmetric
        self.init, self.dtype = init, dtype
        self.als = {"iters": als_iters, "tol": als_tol}
        self.epc = {"iters": epc_iters, "min_iters": epc_min_iters, "work": epc_work, "tol": epc_tol}
        self.admm = {"outer": admm_outer, "inner": admm_inner, "tol_inner": admm_tol_inner,
                     "tol_outer": admm_tol_outer, "patience": admm_patience}
        self.bn_calibration = bn_calibration

    # ----------------------------------------------------------------------------- checks
    def select_layers(self, model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
        """The convs this method factorizes, in module order."""
        convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        first = convs[0][0] if convs else None
        chosen = []
        for name, conv in convs:
            kh, kw = conv.kernel_size
            if name == first or conv.groups != 1 or kh * kw == 1:
                continue
            if any(fnmatch.fnmatchcase(name, pat) for pat in self.include) and not any(
                fnmatch.fnmatchcase(name, pat) for pat in self.exclude
            ):
                chosen.append((name, conv))
        return chosen

    def check(self, model: nn.Module, data: Any = None) -> None:
        """Validate options, ranks and weights; raise one ``ConfigError`` naming the key."""
        _check_int("bits", self.bits, 2, 16)
        _check_int("act_bits", self.act_bits, 2, 16)
        if self.keep_bits is not None:
            _check_int("method.keep_bits", self.keep_bits, 2, 16)
        for key, value in (("method.clip", self.clip), ("method.act_clip", self.act_clip)):
            if value not in CLIP_RULES:
                raise ConfigError(f"{key}={value!r} is invalid: accepted {', '.join(CLIP_RULES)}")
        if self.init not in ("svd", "random", "als"):
            raise ConfigError(f"method.init={self.init!r} is invalid: accepted svd, random, als")
        if not isinstance(self.symmetric, bool):
            raise ConfigError(f"method.symmetric={self.symmetric!r} is invalid: accepted true, false")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"method.dtype={self.dtype!r} is invalid: accepted {', '.join(_DTYPES)}")
        if not isinstance(self.rate, (int, float)) or isinstance(self.rate, bool) or not self.rate > 0:
            raise ConfigError(f"rate={self.rate!r} is invalid: accepted a number > 0")
        for key, value in [(f"method.als_{k}", v) for k, v in self.als.items() if k == "iters"] + [
            ("method.epc_iters", self.epc["iters"]), ("method.epc_min_iters", self.epc["min_iters"]),
            ("method.admm_outer", self.admm["outer"]), ("method.admm_inner", self.admm["inner"]),
            ("method.admm_patience", self.admm["patience"]),
        ]:
            _check_int(key, value, 1, 10**7)
        layers = self.select_layers(model)
        if not layers:
            raise ConfigError(
                f"method={self.name} selects no layer: method.include={self.include} / "
                f"method.exclude={self.exclude} match no conv with a kernel larger than 1x1 "
                "(the first conv is never factorized)"
            )
        limit = min(max_rate(weight_to_tensor(conv.weight).shape) for _, conv in layers)
        for name, conv in layers:
            shape = weight_to_tensor(conv.weight).shape
            if cp_rank(shape, self.rate) < 1:
                raise ConfigError(
                    f"rate={self.rate} is invalid: layer {name} {tuple(conv.weight.shape)} would get "
                    f"rank < 1; the largest valid rate for the selected layers is {limit:.4g}"
                )
            if not bool(torch.isfinite(conv.weight).all()):
                raise ConfigError(f"layer {name} has non-finite weights (NaN or inf): cannot factorize it")

    # --------------------------------------------------------------------------- compress
    def compress(self, model: nn.Module, ctx: CompressContext) -> list[dict]:
        """Factorize the selected convs in place, then wrap every conv/linear with quantizers."""
        self.check(model)
        model.to(ctx.device)
        layers = self.select_layers(model)
        reports, cp_names = [], set()
        for idx, (name, conv) in enumerate(layers):
            start = time.perf_counter()
            factors, report = self.factorize(name, conv, ctx)
            report["seconds"] = round(time.perf_counter() - start, 3)
            cp = CPConv2d(conv, factors)
            for sub in _SUBCONVS:
                getattr(cp, sub).qaf_weight_quantized = True
                cp_names.add(f"{name}.{sub}")
            set_submodule(model, name, cp)
            reports.append(report)
            if ctx.progress:
                log.info("[%d/%d] %s rank %d: %.1f s, e_quant %.4f%s", idx + 1, len(layers), name,
                         report["rank"], report["seconds"], report["e_quant"],
                         " (cached)" if report["cached"] else "")
        keep = self.keep_bits if self.keep_bits is not None else self.bits

        def bits_for(name: str, module: nn.Module) -> tuple[int, int]:
            return (self.bits if name in cp_names else keep, self.act_bits)

        quantize_model(
            model, bits_for, self.act_bits,
            weight_scheme={"symmetric": True, "clip": self.clip, "p": self.p},
            act_scheme={"clip": self.act_clip, "p": self.p, "symmetric": False},
            weight_quantized=cp_names,
        )
        return reports

    def grid_factory(self, x: Tensor):
        """Per-tensor grid of ``bits`` bits fitted to ``x`` with the method's clip rule."""
        return make_grid(x, self.bits, symmetric=self.symmetric, clip=self.clip, p=self.p)

    def factorize(self, name: str, conv: nn.Conv2d, ctx: CompressContext) -> tuple[list[Tensor], dict]:
        """Quantized CP factors of one conv and its report dict."""
        dt = _DTYPES[self.dtype]
        tensor = weight_to_tensor(conv.weight.detach()).to(ctx.device, dt)
        rank = cp_rank(tensor.shape, self.rate)
        base = {"weight": tensor_digest(conv.weight), "shape": list(tensor.shape), "rank": rank,
                "dtype": self.dtype, "seed": ctx.seed}
        cache = ctx.cache if ctx.cache is not None else FactorCache("", enabled=False)
        hits: list[bool] = []
        start_key, start = self._start(tensor, rank, base, cache, ctx.seed, hits)
        e_float = relative_error(tensor, start)
        iterations = 0
        if self.solver == "cpd":
            factors = [self.grid_factory(f)(f) for f in start]
        else:
            key = {**start_key, "stage": "admm", "bits": self.bits, "symmetric": self.symmetric,
                   "clip": self.clip, "p": self.p,
                   "admm": self.admm}

            def run_admm() -> tuple[dict[str, Tensor], dict[str, Any]]:
                res = cp_admm(tensor, start, self.grid_factory, max_outer=self.admm["outer"],
                              max_inner=self.admm["inner"], tol_inner=self.admm["tol_inner"],
                              tol_outer=self.admm["tol_outer"], patience=self.admm["patience"])
                return _as_dict(res.factors), {"iterations": res.iterations, "diverged": res.diverged,
                                               "inner_iterations": res.inner_iterations}

            stored, meta, hit = cache.get_or_compute(key, run_admm)
            hits.append(hit)
            factors = _as_list(stored, ctx.device, dt)
            iterations = int(meta["iterations"])
        e_quant = relative_error(tensor, factors)
        report = {"name": name, "shape": list(conv.weight.shape), "rank": rank, "bits": self.bits,
                  "method": self.name, "init": self._init_name(), "iterations": iterations,
                  "e_float": round(e_float, 6), "e_quant": round(e_quant, 6), "cached": all(hits)}
        return [f.to(conv.weight.dtype) for f in factors], report

    def _init_name(self) -> str:
        if self.solver == "cpd" or self.epc_start:
            return "epc" if self.epc_start else "als"
        return self.init

    def _start(self, tensor: Tensor, rank: int, base: dict, cache: FactorCache, seed: int,
               hits: list[bool]) -> tuple[dict, list[Tensor]]:
        """Float starting factors (ALS, EPC or an ADMM init), cached; returns (key, factors)."""
        dev, dt = tensor.device, tensor.dtype
        kind = self._init_name()
        if kind in ("svd", "random"):
            gen = torch.Generator().manual_seed(seed)
            return {**base, "stage": "init", "init": kind}, init_factors(tensor, rank, kind, gen)
        als_key = {**base, "stage": "als", "als": self.als}

        def run_als() -> tuple[dict[str, Tensor], dict[str, Any]]:
            res = cp_als(tensor, rank, n_iter=self.als["iters"], tol=self.als["tol"], init="svd",
                         generator=torch.Generator().manual_seed(seed))
            return _as_dict(res.factors), {"iterations": res.iterations, "error": res.error}

        stored, _, hit = cache.get_or_compute(als_key, run_als)
        hits.append(hit)
        als = _as_list(stored, dev, dt)
        if kind == "als":
            return als_key, als
        sweeps = int(min(self.epc["iters"], max(self.epc["min_iters"], self.epc["work"] / rank**3)))
        epc_key = {**als_key, "stage": "epc", "epc": {**self.epc, "sweeps": sweeps}}

        def run_epc() -> tuple[dict[str, Tensor], dict[str, Any]]:
            res = cp_epc(tensor, als, n_iter=sweeps, tol=self.epc["tol"])
            return _as_dict(res.factors), {"iterations": res.iterations, "error": res.error}

        stored, _, hit = cache.get_or_compute(epc_key, run_epc)
        hits.append(hit)
        return epc_key, _as_list(stored, dev, dt)


class CPD(QAFMethod):
    """``method=cpd``: float CP by ALS, then each factor quantized."""

    name, solver, epc_start = "cpd", "cpd", False


class CPDEPC(QAFMethod):
    """``method=cpd_epc``: ALS, error-preserving correction, then each factor quantized."""

    name, solver, epc_start = "cpd_epc", "cpd", True


class ADMM(QAFMethod):
    """``method=admm``: quantized CP by AO-ADMM from an ``svd`` / ``random`` / ``als`` start."""

    name, solver, epc_start = "admm", "admm", False


class ADMMEPC(QAFMethod):
    """``method=admm_epc``: quantized CP by AO-ADMM started from the CP-EPC solution."""

    name, solver, epc_start = "admm_epc", "admm", True


def _check_int(key: str, value: Any, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(f"{key}={value!r} is invalid: accepted {lo}..{hi}")


def _as_dict(factors: list[Tensor]) -> dict[str, Tensor]:
    return {f"factor{n}": f for n, f in enumerate(factors)}


def _as_list(stored: dict[str, Tensor], device: torch.device, dtype: torch.dtype) -> list[Tensor]:
    return [stored[f"factor{n}"].to(device, dtype) for n in range(len(stored))]


__all__ = ["ADMM", "ADMMEPC", "CPD", "CPDEPC", "QAFMethod"]
