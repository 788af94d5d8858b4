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

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from qaf.cache import FactorCache, tensor_digest
from qaf.config import ConfigError, option
from qaf.decomp import qswd as qswd_module
from qaf.decomp.qswd import BLOCKS, QSWDResult, qswd, weight_to_matrix
from qaf.decomp.qswd_layer import QSWDConv2d
from qaf.methods.base import CompressContext, DecompositionMethod, DecompositionOptions
from qaf.quant.modules import ActQuantizer, QuantInput
from qaf.quant.uniform import VERSION as QUANT_VERSION
from qaf.quant.uniform import Grid
from qaf.results import MethodInfo

INITS = ("svd", "kmeans", "random", "kmeans++")


@dataclass
class QSWDOptions(DecompositionOptions):
    """Options of QSWD (``conf/method/qswd.yaml``); see :class:`QSWD`."""

    block: str = option("kernel", choices=BLOCKS)
    atoms: int = option(64, low=1)
    sparsity: int = option(1, low=1, high="atoms")
    dict_bits: int | None = option(8, low=2, high=16)
    code_bits: int | None = option(4, low=2, high=16)
    unit_codes: bool = option(False)
    weight_bits: int | None = option(8, low=2, high=16)
    init: str | None = option(None, choices=INITS)
    max_iter: int = option(300, low=1)
    tol: float = option(1e-4, low=0)
    patience: int = option(30, low=1)


class QSWD(DecompositionMethod):
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
    info = MethodInfo(display="QSWD", order=30)
    Options = QSWDOptions
    log_fields = ("n", "d", "k", "s", "iterations", "error")

    def __init__(self, bits: int = 4, act_bits: int = 8, rate: float = 2.0, **options: Any):
        super().__init__(bits=bits, act_bits=act_bits, rate=rate, **options)
        if self.unit_codes and (self.sparsity != 1 or self.code_bits is not None):
            raise ConfigError(f"method.unit_codes=true needs method.sparsity=1 and method.code_bits=null "
                              f"(vector quantization), got sparsity={self.sparsity}, code_bits={self.code_bits}")

    def decompose(self, name: str, conv: nn.Conv2d, ctx: CompressContext,
                  cache: FactorCache) -> tuple[nn.Module, dict[str, Grid | None], dict]:
        """The QSWD layer of one conv (factors cached) behind its input quantizer, and its report."""
        matrix = weight_to_matrix(conv.weight.detach(), self.block).to(ctx.device, torch.float32)
        n, d = matrix.shape
        k = min(self.atoms, n)
        s = min(self.sparsity, k)
        options = {"dict_bits": self.dict_bits, "code_bits": self.code_bits, "unit_codes": self.unit_codes,
                   "init": self.init, "max_iter": self.max_iter, "tol": self.tol, "patience": self.patience}
        key = {"stage": "qswd", "version": qswd_module.VERSION, "grids": QUANT_VERSION, "weight": tensor_digest(conv.weight),
               "block": self.block, "k": k, "s": s, **options, "dtype": "float32", "device": ctx.device.type,
               "seed": ctx.seed}

        def solve() -> tuple[dict[str, Tensor], dict[str, Any]]:
            res = qswd(matrix, k, s, generator=torch.Generator().manual_seed(ctx.seed), **options)
            return _result_tensors(res), {"error": res.error, "iterations": res.iterations,
                                          "best_iteration": res.best_iteration, "ranges": _ranges(res)}

        stored, meta, hit = cache.get_or_compute(key, solve, schema={"tensors": ["index", "values", "dictionary"],
                                                                      "meta": ["error", "iterations", "ranges"]})
        layer = QSWDConv2d(conv, _result_from(stored, meta, self.unit_codes, ctx.device), self.block, self.weight_bits)
        layer.qaf_bits = (self.weight_bits or 32, self.act_bits)
        act = ActQuantizer(self.act_bits, clip=self.act_clip).to(conv.weight.device)
        report = {"name": name, "shape": list(conv.weight.shape), "block": self.block, "n": n, "d": d, "k": k, "s": s,
                  "dict_bits": self.dict_bits, "code_bits": self.code_bits, "unit_codes": self.unit_codes,
                  "iterations": int(meta["iterations"]), "error": round(float(meta["error"]), 6), "cached": hit}
        return QuantInput(layer, act), {}, report


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
