"""``method=lapq``: Loss Aware Post-training Quantization (Nahshan et al.), our implementation.

Steps (as LAPQ's reference ``lapq_v2.py`` does them, see docs/baselines.md for where we differ):

1. Per-tensor weight quantizers (zero-free grid by default, mean bias correction re-applied at every
   evaluation) on the convs ``[skip_first : len - skip_last]`` in ``named_modules`` order; the
   classifier stays in float unless ``quantize_linear``.  Activation quantizers (unsigned for
   post-ReLU data) sit on the *inputs* of the quantized layers; layers that read the very same
   tensor (a block's first conv and its downsample conv) share one quantizer.  This handles
   torchvision ResNets, which reuse one ReLU module per block, and CIFAR ResNets alike.
2. Calibration loss = mean cross-entropy of the quantized model on ``calib_samples`` calibration
   images (never evaluation images).
3. p-sweep: for ``p`` in ``linspace(p_min, p_max, p_count)`` every clip is set to its Lp-optimal
   value and the loss recorded; a quadratic fit gives ``p*`` (guarded: a non-convex fit or ``p*``
   outside the sweep falls back to the best swept ``p``).
4. Joint Powell search over all clips from ``alpha(p*)``; the best point evaluated is kept, so the
   result is never worse than the start.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from torch import Tensor, nn

from qaf.config import ConfigError
from qaf.methods.base import CompressContext, Method
from qaf.quant.modules import ActQuantizer, QuantLayer, mark_batchnorm, set_submodule
from qaf.quant.uniform import make_grid, symmetric_grid, unsigned_grid

log = logging.getLogger(__name__)

WEIGHT_GRIDS = ("zero_free", "symmetric")
#: Log a progress line every this many loss evaluations (Powell runs hundreds).
LOG_EVERY = 25


@dataclass
class _ActSlot:
    """One activation clip: a quantizer, the layers reading its tensor, and its grid kind."""

    quantizer: ActQuantizer
    layers: list[str]
    unsigned: bool


class LAPQ(Method):
    """LAPQ: Lp-optimal clip initialisation, then joint Powell search on the calibration loss.

    Parameters
    ----------
    bits, act_bits, rate
        From the top-level config (``rate`` is unused).
    calib_samples : int
        Calibration images used for the loss (the first ones of the calibration set).
    p_min, p_max : float
        Range of the p-sweep.
    p_count : int
        Number of p values in the sweep.
    maxiter : int
        Powell iterations (``scipy.optimize.minimize(method="Powell")``).
    bias_correction : bool
        Mean-only per-output-channel weight correction.
    weight_grid : {"zero_free", "symmetric"}
        LAPQ's zero-free 2^b-level grid, or the symmetric 2^b-1-level grid with zero.
    skip_first, skip_last : int
        Convs (in ``named_modules`` order) left in float at the start and the end.
    quantize_linear : bool
        Also quantize Linear layers (default: the classifier stays in float, as in the reference).
    batch_size : int
        Batch size of the loss evaluation.
    reuse_blocks : bool
        Reuse the cached outputs of blocks (children of ``nn.Sequential``) that precede every clip
        changed since the last evaluation (exact; about halves Powell's cost on ResNets).
    """

    name = "lapq"
    bn_calibration = False
    observe_activations = False

    def __init__(self, bits: int = 4, act_bits: int = 4, rate: float = 2.0, *, calib_samples: int = 512,
                 p_min: float = 2.0, p_max: float = 4.0, p_count: int = 10, maxiter: int = 2,
                 bias_correction: bool = True, weight_grid: str = "zero_free", skip_first: int = 1,
                 skip_last: int = 1, quantize_linear: bool = False, batch_size: int = 256,
                 reuse_blocks: bool = True, **options):
        super().__init__(bits=bits, act_bits=act_bits, rate=rate, **options)
        self.calib_samples, self.maxiter, self.batch_size = calib_samples, maxiter, batch_size
        self.p_min, self.p_max, self.p_count = p_min, p_max, p_count
        self.bias_correction, self.weight_grid = bias_correction, weight_grid
        self.skip_first, self.skip_last, self.quantize_linear = skip_first, skip_last, quantize_linear
        self.reuse_blocks = reuse_blocks
        self.summary: dict = {}

    # ------------------------------------------------------------------ checks
    def check(self, model: nn.Module, data=None) -> None:
        """Validate options (and the calibration set size when ``data`` is given)."""
        ints = {"method.calib_samples": (self.calib_samples, 1), "method.p_count": (self.p_count, 3),
                "method.maxiter": (self.maxiter, 0), "method.skip_first": (self.skip_first, 0),
                "method.skip_last": (self.skip_last, 0), "method.batch_size": (self.batch_size, 1)}
        for key, (value, low) in ints.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{key}={value!r} is invalid: accepted an integer >= {low}")
        if not (isinstance(self.p_min, (int, float)) and isinstance(self.p_max, (int, float))
                and 0 < self.p_min < self.p_max):
            raise ConfigError(f"method.p_min={self.p_min!r}, method.p_max={self.p_max!r} are invalid: "
                              "accepted 0 < p_min < p_max")
        if self.weight_grid not in WEIGHT_GRIDS:
            raise ConfigError(f"method.weight_grid={self.weight_grid!r} is invalid: "
                              f"accepted {', '.join(WEIGHT_GRIDS)}")
        for key in ("bias_correction", "quantize_linear", "reuse_blocks"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"method.{key}={getattr(self, key)!r} is invalid: accepted true, false")
        if not self._targets(model):
            raise ConfigError(f"method.skip_first={self.skip_first}, method.skip_last={self.skip_last} "
                              "leave no layer to quantize: accepted values that keep at least one conv")
        if data is not None and len(data.calib) < self.calib_samples:
            raise ConfigError(f"method.calib_samples={self.calib_samples} is too large: the calibration set "
                              f"has {len(data.calib)} images (raise data.calib_samples or lower this)")

    def _targets(self, model: nn.Module) -> list[str]:
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        chosen = convs[self.skip_first: len(convs) - self.skip_last]
        if self.quantize_linear:
            chosen += [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        return chosen

    # ------------------------------------------------------------------ main
    def compress(self, model: nn.Module, ctx: CompressContext) -> list[dict]:
        """Quantize ``model`` in place with LAPQ; fills ``self.summary``."""
        self.check(model, ctx.data)
        start = time.perf_counter()
        model.to(ctx.device).eval()
        batches = calibration_batches(ctx.data, self.calib_samples, self.batch_size, ctx.device)
        targets = self._targets(model)
        slots = self._insert_quantizers(model, targets, batches[0][0])
        layers = {name: model.get_submodule(name) for name in targets}
        mark_batchnorm(model)

        # Activation statistics of the float model (quantizers observe; weights still float).
        for slot in slots:
            slot.quantizer.mode = "observe"
        with torch.no_grad():
            for x, _ in batches:
                model(x)
        samples = [slot.quantizer.sample() for slot in slots]
        for slot in slots:
            slot.quantizer.mode = "off"

        def lp_clips(p: float | None) -> np.ndarray:
            return self._clips(layers, slots, samples, p)

        evals = {"n": 0}
        best = {"loss": float("inf"), "x": None}
        owners = [[name] for name in layers] + [slot.layers for slot in slots]
        memo = BlockMemo(model, owners, batches[0][0]) if self.reuse_blocks else None

        def loss_at(alphas: np.ndarray) -> float:
            self._apply(layers, slots, alphas)
            loss = calibration_loss(model, batches, memo, alphas)
            evals["n"] += 1
            if loss < best["loss"]:
                best["loss"], best["x"] = loss, np.array(alphas, dtype=np.float64)
            if evals["n"] % LOG_EVERY == 0:
                self._log(ctx, f"lapq evaluation {evals['n']}: loss={loss:.4f} best={best['loss']:.4f}")
            return loss

        try:
            alpha_max = lp_clips(None)
            loss_max = loss_at(alpha_max)
            self._log(ctx, f"lapq: {len(layers)} weight clips + {len(slots)} activation clips; "
                           f"max-abs clips loss={loss_max:.4f}")

            ps = np.linspace(self.p_min, self.p_max, self.p_count)
            sweep = []
            for i, p in enumerate(ps):
                sweep.append(loss_at(lp_clips(float(p))))
                self._log(ctx, f"lapq p-sweep {i + 1}/{len(ps)}: p={p:.3f} loss={sweep[-1]:.4f}")
            p_star, fit, fallback = fit_p_star(ps, np.array(sweep))
            if fallback:
                self._log(ctx, f"lapq: quadratic fit unusable ({fallback}); p*={p_star:.3f} (best swept p)")
            alpha0 = lp_clips(p_star)
            best["loss"], best["x"] = float("inf"), None  # Powell's start is alpha(p*): best-so-far starts here
            loss0 = loss_at(alpha0)
            self._log(ctx, f"lapq: p*={p_star:.3f} loss={loss0:.4f}; Powell maxiter={self.maxiter} "
                           f"over {alpha0.size} clips")

            iteration = {"k": 0}

            def progress(_xk: np.ndarray) -> None:
                iteration["k"] += 1
                self._log(ctx, f"lapq Powell iteration {iteration['k']}: best loss={best['loss']:.4f} "
                               f"({evals['n']} loss evaluations)")

            iterations = 0
            if self.maxiter > 0:  # maxiter=0: LAPQ's initialisation alpha(p*) only (ablation)
                result = minimize(loss_at, alpha0, method="Powell", callback=progress,
                                  options={"maxiter": self.maxiter, "xtol": 1e-4, "ftol": 1e-4})
                iterations = int(result.nit)
            final = best["x"]
            loss_final = loss_at(final)  # re-applies the best clips to the model
        finally:
            if memo is not None:
                memo.close()
        for slot in slots:
            slot.quantizer.mode = "quant"
        elapsed = time.perf_counter() - start
        self._log(ctx, f"lapq: final loss={loss_final:.4f} (start {loss0:.4f}), {evals['n']} evaluations, "
                       f"{elapsed:.1f}s")

        n_w = len(layers)
        self.summary = {
            "p_values": [float(p) for p in ps], "p_sweep_loss": [float(v) for v in sweep],
            "quadratic_fit": [float(c) for c in fit], "p_star": float(p_star), "p_star_fallback": fallback,
            "loss_maxabs": loss_max, "loss_p_star": loss0, "loss_final": loss_final,
            "powell_iterations": iterations, "loss_evaluations": evals["n"],
            "calib_samples": sum(len(y) for _, y in batches), "n_clips": int(alpha0.size),
            "seconds": elapsed, "weight_grid": self.weight_grid, "bias_correction": self.bias_correction,
            "float_layers": [n for n, m in model.named_modules()
                             if isinstance(m, (nn.Conv2d, nn.Linear)) and not hasattr(m, "qaf_bits")],
        }
        report = []
        for i, name in enumerate(layers):
            slot = next(s for s in slots if name in s.layers)
            j = n_w + slots.index(slot)
            report.append({
                "name": name, "w_bits": self.bits, "a_bits": self.act_bits, "clip": "lapq",
                "shape": list(layers[name].weight_fp.shape), "p_star": float(p_star),
                "w_alpha_max": float(alpha_max[i]), "w_alpha_p_star": float(alpha0[i]), "w_alpha": float(final[i]),
                "a_alpha_max": float(alpha_max[j]), "a_alpha_p_star": float(alpha0[j]), "a_alpha": float(final[j]),
                "a_unsigned": slot.unsigned, "a_shared_with": [n for n in slot.layers if n != name],
            })
        return report

    # ------------------------------------------------------------------ helpers
    def _insert_quantizers(self, model: nn.Module, targets: list[str], x: Tensor) -> list[_ActSlot]:
        """Wrap the target layers; one activation quantizer per distinct input tensor."""
        inputs: dict[str, Tensor] = {}
        trace_inputs(model, targets, x, lambda n, args: inputs.__setitem__(n, args[0]))
        slots: list[_ActSlot] = []
        for name in targets:
            tensor = inputs[name]
            slot = next((s for s in slots if inputs[s.layers[0]] is tensor), None)
            if slot is None:
                unsigned = bool(tensor.min() >= 0)
                slot = _ActSlot(ActQuantizer(self.act_bits, clip="lp", symmetric=True, unsigned=unsigned,
                                             per_batch=1 << 16).to(tensor.device), [], unsigned)
                slots.append(slot)
            slot.layers.append(name)
            module = model.get_submodule(name)
            set_submodule(model, name, QuantLayer(module, self.bits, self.act_bits, weight_quantized=True,
                                                  act=slot.quantizer))
        return slots

    def _clips(self, layers: dict[str, QuantLayer], slots: list[_ActSlot], samples: list[Tensor],
               p: float | None) -> np.ndarray:
        """Lp-optimal clips (``p=None``: max-abs) of all weights, then all activations."""
        clip = "minmax" if p is None else "lp"
        p = 2.0 if p is None else p
        zero_free = self.weight_grid == "zero_free"
        out = [make_grid(q.weight_fp, self.bits, clip=clip, p=p, zero_free=zero_free).alpha
               for q in layers.values()]
        out += [make_grid(s, self.act_bits, clip=clip, p=p, unsigned=slot.unsigned).alpha
                for s, slot in zip(samples, slots)]
        return np.array([float(a) for a in out], dtype=np.float64)

    def _apply(self, layers: dict[str, QuantLayer], slots: list[_ActSlot], alphas: np.ndarray) -> None:
        """Put every layer's weight and every activation quantizer on the grids of ``alphas``."""
        zero_free = self.weight_grid == "zero_free"
        for alpha, layer in zip(alphas, layers.values()):
            a = torch.tensor(float(alpha), device=layer.weight_fp.device)
            layer.set_weight_grid(symmetric_grid(a, self.bits, zero_free), bias_correction=self.bias_correction)
        for alpha, slot in zip(alphas[len(layers):], slots):
            a = torch.tensor(float(alpha), device=slot.quantizer.running_max.device)
            grid = unsigned_grid(a, self.act_bits) if slot.unsigned else symmetric_grid(a, self.act_bits)
            slot.quantizer.set_grid(grid)
            slot.quantizer.mode = "quant"

    @staticmethod
    def _log(ctx: CompressContext, message: str) -> None:
        if not ctx.progress:
            return
        if logging.getLogger().hasHandlers():
            log.info(message)
        else:  # no logging configured (plain script): still show progress
            print(message, flush=True)


def trace_inputs(model: nn.Module, names: list[str], x: Tensor,
                 record: Callable[[str, tuple], None]) -> None:
    """One no-grad forward pass of ``x`` calling ``record(name, inputs)`` as each named module runs."""
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda _m, args, n=n: record(n, args))
             for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()


def calibration_batches(data, samples: int, batch_size: int, device: torch.device) -> list[tuple[Tensor, Tensor]]:
    """The first ``samples`` calibration images and labels, batched and moved to ``device``.

    Parameters
    ----------
    data : DataBundle
        Source of the calibration set (``data.calib``; evaluation images are never touched).
    samples, batch_size : int
        How many images, and how many per batch.
    device : torch.device
        Where the batches are kept for the whole search.

    Returns
    -------
    list of (Tensor, Tensor)
        Image and label batches.
    """
    count = min(samples, len(data.calib))
    items = [data.calib[i] for i in range(count)]
    images = torch.stack([torch.as_tensor(x) for x, _ in items]).to(device)
    labels = torch.tensor([int(y) for _, y in items], device=device)
    return [(images[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, count, batch_size)]


@torch.no_grad()
def calibration_loss(model: nn.Module, batches: list[tuple[Tensor, Tensor]], memo: "BlockMemo | None" = None,
                     alphas: np.ndarray | None = None) -> float:
    """Mean cross-entropy of ``model`` over the calibration batches (per image).

    Parameters
    ----------
    model : nn.Module
        The model with its clips applied.
    batches : list of (Tensor, Tensor)
        Calibration images and labels.
    memo : BlockMemo, optional
        Block-output cache; needs the ``alphas`` the model currently carries.
    alphas : np.ndarray, optional
        The clips applied (for ``memo``).

    Returns
    -------
    float
        Cross-entropy per image.
    """
    if memo is not None:
        memo.begin(alphas)
    total, count = 0.0, 0
    for i, (x, y) in enumerate(batches):
        if memo is not None:
            memo.batch = i
        total += F.cross_entropy(model(x), y, reduction="sum").item()
        count += len(y)
    return total / count


class BlockMemo:
    """Reuse outputs of blocks that no changed clip can affect.

    Blocks are the outermost children of ``nn.Sequential`` containers (nested ``Sequential``s are
    looked through), in execution order; each must
    run once per forward and feed the next (true of ResNets, VGG-style nets).  A clip belongs to the
    first block holding one of its layers; when clips change, every block from the earliest owner on
    is recomputed and the earlier ones are served from the cache.  Clips of layers outside any block
    invalidate everything.

    Parameters
    ----------
    model : nn.Module
        The model (block ``forward`` methods are patched until ``close``).
    owners : list of list of str
        For each clip, the names of the layers it acts on.
    x : Tensor
        A sample batch, to find the execution order.
    """

    def __init__(self, model: nn.Module, owners: list[list[str]], x: Tensor):
        seqs = [n for n, m in model.named_modules() if isinstance(m, nn.Sequential)]
        candidates = [f"{s}.{c}" if s else c for s in seqs
                      for c, m in model.get_submodule(s).named_children() if not isinstance(m, nn.Sequential)]
        outer = [n for n in candidates if not any(n.startswith(o + ".") for o in candidates if o != n)]
        order: list[str] = []
        trace_inputs(model, outer, x, lambda n, _args: order.append(n))
        self.blocks = order if len(order) == len(set(order)) else []  # a block run twice: no reuse
        position = {n: i for i, n in enumerate(self.blocks)}

        def owner(layer: str) -> int:
            hits = [position[b] for b in self.blocks if layer.startswith(b + ".")]
            return min(hits) if hits else 0

        self.owner = np.array([min(owner(n) for n in names) for names in owners])
        self.batch = 0
        self._fresh_below = 0
        self._last: np.ndarray | None = None
        self._cache: list[dict[int, Tensor]] = [{} for _ in self.blocks]
        self._modules = [model.get_submodule(n) for n in self.blocks]
        for pos, module in enumerate(self._modules):
            module.forward = self._wrap(pos, module.forward)

    def _wrap(self, pos: int, forward):
        def cached_forward(*args, **kwargs):
            if pos < self._fresh_below and self.batch in self._cache[pos]:
                return self._cache[pos][self.batch]
            out = forward(*args, **kwargs)
            self._cache[pos][self.batch] = out
            return out
        return cached_forward

    def begin(self, alphas: np.ndarray) -> None:
        """Start an evaluation at clips ``alphas``: invalidate blocks from the first changed owner."""
        if self._last is None or self._last.shape != alphas.shape:
            self._fresh_below = 0
        else:
            changed = np.flatnonzero(alphas != self._last)
            self._fresh_below = int(self.owner[changed].min()) if changed.size else len(self.blocks)
        self._last = np.array(alphas, dtype=np.float64)

    def close(self) -> None:
        """Restore the blocks' own ``forward`` and drop the cache."""
        for module in self._modules:
            del module.forward
        self._cache = [{} for _ in self.blocks]


def fit_p_star(ps: np.ndarray, losses: np.ndarray) -> tuple[float, np.ndarray, str]:
    """Quadratic fit of loss over p and its minimiser ``p*``, guarded.

    Parameters
    ----------
    ps, losses : np.ndarray
        The sweep.

    Returns
    -------
    tuple
        ``(p_star, coefficients, fallback)``; ``fallback`` is "" when ``p* = -b / 2a`` of a convex fit
        inside ``[min(ps), max(ps)]`` was used, else why the best swept ``p`` was taken instead.
    """
    fit = np.polyfit(ps, losses, 2)
    best = float(ps[int(np.argmin(losses))])
    if not np.all(np.isfinite(fit)) or fit[0] <= 0:
        return best, fit, "non-convex fit"
    p_star = float(-fit[1] / (2 * fit[0]))
    if not ps.min() <= p_star <= ps.max():
        return best, fit, f"p*={p_star:.3f} outside [{ps.min():g}, {ps.max():g}]"
    return p_star, fit, ""
