"""``method=qswd``: Quantized Sparse Weight Decomposition (Kuzmin et al. 2022).

Each selected conv (a kernel larger than 1x1, groups 1, put at ``bits`` by the layer policy) is cut
into sub-vectors (``block``) and stored as sparse, quantized factors ``W ~ Z C``
(:func:`qaf.decomp.qswd.qswd`): a dictionary of ``atoms`` atoms on a ``dict_bits`` grid and codes
with at most ``sparsity`` non-zeros per row on a ``code_bits`` grid. The layer regenerates its
weight on the fly (quantized to ``weight_bits``); its input is quantized at ``act_bits``. Every
other layer is quantized as the policy says. End-to-end fine-tuning (``finetune=kd``) follows by
default (conf/method/qswd.yaml); docs/qswd.md explains the choices.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from qaf.cache import FactorCache, tensor_digest
from qaf.config import ConfigError, check_bool, check_choice, check_int, check_number
from qaf.decomp import qswd as qswd_module
from qaf.decomp.qswd import BLOCKS, QSWDResult, qswd, weight_to_matrix
from qaf.decomp.qswd_layer import QSWDConv2d
from qaf.methods.base import CompressContext, Method, decomposable_convs
from qaf.quant.clip import CLIP_RULES
from qaf.quant.modules import ActQuantizer, QuantInput, quantize_model, set_submodule
from qaf.quant.policy import layer_plan
from qaf.quant.uniform import VERSION as QUANT_VERSION
from qaf.quant.uniform import Grid

INITS = ("svd", "kmeans", "random", "kmeans++")


class QSWD(Method):
    """QSWD: sparse quantized dictionary factors per conv, regenerated on the fly.

    Parameters
    ----------
    bits, act_bits, rate
        ``bits``: weight bits of the policy's other layers (and default of ``dict_bits`` /
        ``code_bits`` in the config); ``act_bits``: input bits; ``rate`` is unused.
    block : {"kernel", "row", "input"}
        Sub-vectors: the kh*kw kernel of each (out, in) pair, a whole output row, or an input slice.
    atoms : int
        Dictionary size k per layer (at most the number of sub-vectors).
    sparsity : int
        Non-zeros per row of Z (s).
    dict_bits, code_bits : int or None
        Grids of the dictionary and of the code values (None: float).
    unit_codes : bool
        Codes fixed to 1 (with ``sparsity=1``: vector quantization, k-means).
    weight_bits : int or None
        Grid of the regenerated weight the conv runs with (None: float).
    init : {"svd", "kmeans", "random", "kmeans++"} or None
        Start of the solver (None: its default rule).
    max_iter, tol, patience
        Solver budget and stopping rule.
    clip, act_clip : {"minmax", "mse", "lp", "aciq"}
        Clip rules of the other layers' weights and of the activation quantizers.
    include, exclude : list of str
        fnmatch patterns on module names, applied to the convs the policy puts at ``bits``.
    """

    name = "qswd"

    def __init__(self, bits: int = 4, act_bits: int = 8, rate: float = 2.0, *, block: str = "kernel",
                 atoms: int = 64, sparsity: int = 1, dict_bits: int | None = 8, code_bits: int | None = 4,
                 unit_codes: bool = False, weight_bits: int | None = 8, init: str | None = None,
                 max_iter: int = 300, tol: float = 1e-4, patience: int = 30, clip: str = "mse",
                 act_clip: str = "mse", include: list[str] | None = None, exclude: list[str] | None = None,
                 **options: Any):
        super().__init__(bits=bits, act_bits=act_bits, rate=rate, **options)
        self.block, self.atoms, self.sparsity = block, atoms, sparsity
        self.dict_bits, self.code_bits, self.unit_codes, self.weight_bits = dict_bits, code_bits, unit_codes, weight_bits
        self.init, self.max_iter, self.tol, self.patience = init, max_iter, tol, patience
        self.clip, self.act_clip = clip, act_clip
        self.include = list(include) if include is not None else ["*"]
        self.exclude = list(exclude) if exclude is not None else []

    def check(self, model: nn.Module, ctx: CompressContext) -> None:
        """Validate options; raise one ``ConfigError`` naming the key."""
        check_choice("method.block", self.block, BLOCKS)
        check_int("method.atoms", self.atoms, 1)
        check_int("method.sparsity", self.sparsity, 1, self.atoms)
        for key in ("dict_bits", "code_bits", "weight_bits"):
            check_int(f"method.{key}", getattr(self, key), 2, 16, nullable=True)
        check_bool("method.unit_codes", self.unit_codes)
        if self.unit_codes and (self.sparsity != 1 or self.code_bits is not None):
            raise ConfigError(f"method.unit_codes=true needs method.sparsity=1 and method.code_bits=null "
                              f"(vector quantization), got sparsity={self.sparsity}, code_bits={self.code_bits}")
        if self.init is not None:
            check_choice("method.init", self.init, INITS)
        check_int("method.max_iter", self.max_iter, 1)
        check_int("method.patience", self.patience, 1)
        check_number("method.tol", self.tol, 0)
        for key in ("clip", "act_clip"):
            check_choice(f"method.{key}", getattr(self, key), CLIP_RULES)
        if not self._layers(model, ctx):
            raise ConfigError(f"method=qswd selects no layer: method.include={self.include} / method.exclude="
                              f"{self.exclude} with policy={ctx.policy.name} match no conv with a kernel larger "
                              "than 1x1 that the policy puts at `bits`")

    def _layers(self, model: nn.Module, ctx: CompressContext) -> list[tuple[str, nn.Conv2d]]:
        return decomposable_convs(model, ctx.policy, self.include, self.exclude)

    def compress(self, model: nn.Module, ctx: CompressContext) -> list[dict]:
        """Decompose the selected convs in place; quantize the other layers as the policy says."""
        model.to(ctx.device)
        plan = dict(layer_plan(model, ctx.policy, self.bits, self.act_bits))
        layers = self._layers(model, ctx)
        reports = []
        for idx, (name, conv) in enumerate(layers):
            start = time.perf_counter()
            result, report = self.decompose(name, conv, ctx)
            layer = QSWDConv2d(conv, result, self.block, self.weight_bits)
            layer.qaf_bits = (self.weight_bits or 32, self.act_bits)
            act = ActQuantizer(self.act_bits, clip=self.act_clip).to(conv.weight.device)
            set_submodule(model, name, QuantInput(layer, act))
            del plan[name]
            report["seconds"] = round(time.perf_counter() - start, 3)
            reports.append(report)
            ctx.log("[%d/%d] %s (n=%d, d=%d, k=%d, s=%d): %d iterations, %.1f s, relative error %.4f%s", idx + 1,
                    len(layers), name, report["n"], report["d"], report["k"], report["s"], report["iterations"],
                    report["seconds"], report["error"], " (cached)" if report["cached"] else "")
        quantize_model(model, plan, weight_scheme={"symmetric": True, "clip": self.clip},
                       act_scheme={"clip": self.act_clip, "symmetric": False})
        return reports

    def decompose(self, name: str, conv: nn.Conv2d, ctx: CompressContext) -> tuple[QSWDResult, dict]:
        """The QSWD factors of one conv (cached) and its report dict."""
        matrix = weight_to_matrix(conv.weight.detach(), self.block).to(ctx.device, torch.float32)
        n, d = matrix.shape
        k = min(self.atoms, n)
        s = min(self.sparsity, k)
        options = {"dict_bits": self.dict_bits, "code_bits": self.code_bits, "unit_codes": self.unit_codes,
                   "init": self.init, "max_iter": self.max_iter, "tol": self.tol, "patience": self.patience}
        key = {"stage": "qswd", "version": qswd_module.VERSION, "grids": QUANT_VERSION, "weight": tensor_digest(conv.weight),
               "block": self.block, "k": k, "s": s, **options, "dtype": "float32", "device": ctx.device.type,
               "seed": ctx.seed}
        cache = ctx.cache if ctx.cache is not None else FactorCache("", enabled=False)

        def solve() -> tuple[dict[str, Tensor], dict[str, Any]]:
            res = qswd(matrix, k, s, generator=torch.Generator().manual_seed(ctx.seed), **options)
            return _result_tensors(res), {"error": res.error, "iterations": res.iterations,
                                          "best_iteration": res.best_iteration, "ranges": _ranges(res)}

        stored, meta, hit = cache.get_or_compute(key, solve, schema={"tensors": ["index", "values", "dictionary"],
                                                                      "meta": ["error", "iterations", "ranges"]})
        result = _result_from(stored, meta, self.unit_codes, ctx.device)
        report = {"name": name, "shape": list(conv.weight.shape), "block": self.block, "n": n, "d": d, "k": k, "s": s,
                  "dict_bits": self.dict_bits, "code_bits": self.code_bits, "unit_codes": self.unit_codes,
                  "iterations": int(meta["iterations"]), "error": round(float(meta["error"]), 6), "cached": hit}
        return result, report


def _ranges(res: QSWDResult) -> dict[str, list[int]]:
    return {name: [g.qmin, g.qmax] for name, g in (("code", res.code_grid), ("dict", res.dict_grid)) if g is not None}


def _result_tensors(res: QSWDResult) -> dict[str, Tensor]:
    out = {"index": res.index, "values": res.values, "dictionary": res.dictionary}
    for name, grid in (("code", res.code_grid), ("dict", res.dict_grid)):
        if grid is not None:
            out[f"{name}_scale"], out[f"{name}_zero_point"] = grid.scale, grid.zero_point
    return out


def _result_from(stored: dict[str, Tensor], meta: dict[str, Any], unit_codes: bool,
                 device: torch.device) -> QSWDResult:
    grids: dict[str, Grid | None] = {}
    for name in ("code", "dict"):
        qrange = meta["ranges"].get(name)
        grids[name] = None if qrange is None else Grid(stored[f"{name}_scale"].to(device),
                                                       stored[f"{name}_zero_point"].to(device), *qrange)
    return QSWDResult(stored["index"].to(device), stored["values"].to(device), stored["dictionary"].to(device),
                      grids["code"], grids["dict"], unit_codes, float(meta["error"]), int(meta["iterations"]),
                      int(meta.get("best_iteration", 0)))


__all__ = ["QSWD"]
