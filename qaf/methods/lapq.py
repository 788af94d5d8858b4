"""``method=lapq``: Loss Aware Post-training Quantization (Nahshan et al.), as its reference code.

Steps (as LAPQ's ``lapq_v2.py`` does them; docs/baselines.md lists the slots and where we differ):

1. Per-tensor weight clips on every conv/linear the layer policy quantizes (reference policy
   ``conf/policy/lapq.yaml``: convs ``[1:-1]`` in module order, classifier in float), zero-free
   grid by default, mean bias correction re-applied at every evaluation.  Activation clips
   (``placement``):

   - ``relu`` (reference): unsigned quantizers on the outputs of the ReLU modules ``[1:-1]`` in
     module order (the first joins when the stem is quantized), so the quantized ReLU output also
     feeds the identity shortcuts, as the reference's custom ResNet; torchvision blocks that reuse
     one ReLU module are first split into ``relu1``/``relu2`` (as that custom ResNet has). A
     quantized stem or classifier gets its own input quantizer.
   - ``input``: quantizers on the inputs of the quantized layers; layers that read the very same
     tensor (a block's first conv and its downsample conv) share one.

2. Calibration loss = mean cross-entropy of the quantized model on ``calib_samples`` calibration
   images (evaluation transform; never evaluation images).
3. p-sweep: for ``p`` in ``linspace(p_min, p_max, p_count)`` every clip is set to its Lp-optimal
   value and the loss recorded; a quadratic fit gives ``p*`` (guarded: a non-convex fit or ``p*``
   outside the sweep falls back to the best swept ``p``).
4. Joint Powell search over all clips from ``alpha(p*)``; the best point evaluated is kept, so the
   result is never worse than the start.

Each loss evaluation recomputes only what the clips changed since the previous one can affect
(``CalibrationLoss``, ``qaf.quant.incremental``): the same losses bit for bit as whole forward passes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from torch import Tensor, nn
from tqdm import tqdm

from qaf.config import ConfigError, option
from qaf.methods.base import CompressContext, Method
from qaf.models.torchvision_models import split_shared_relus
from qaf.quant.incremental import IncrementalForward
from qaf.quant.modules import ActQuantizer, QuantLayer, QuantReLU, mark_batchnorm, set_input_bits, set_submodule
from qaf.quant.policy import LayerPolicy, layer_plan, layer_roles
from qaf.quant.uniform import make_grid, symmetric_grid, unsigned_grid
from qaf.results import MethodInfo

WEIGHT_GRIDS = ("zero_free", "symmetric")
PLACEMENTS = ("relu", "input")


@dataclass
class LAPQOptions:
    """Options of LAPQ (``conf/method/lapq.yaml``); see :class:`LAPQ`."""

    placement: str = option("relu", choices=PLACEMENTS)
    calib_samples: int = option(512, low=1)
    p_min: float = option(2.0, low=0, low_open=True)
    p_max: float = option(4.0, low="p_min", low_open=True)
    p_count: int = option(10, low=3)
    maxiter: int = option(2, low=0)
    bias_correction: bool = option(True)
    weight_grid: str = option("zero_free", choices=WEIGHT_GRIDS)
    batch_size: int = option(256, low=1)
    reuse_blocks: bool = option(True)


@dataclass
class _ActSlot:
    """One activation clip: its quantizer, the modules it acts for (owners), bits and grid kind."""

    quantizer: ActQuantizer
    owners: list[str]
    bits: int
    unsigned: bool


class LAPQ(Method):
    """LAPQ: Lp-optimal clip initialisation, then joint Powell search on the calibration loss.

    Parameters
    ----------
    bits, act_bits, rate
        From the top-level config (``rate`` is unused).
    placement : {"relu", "input"}
        Where activation quantizers sit (see the module docstring).
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
        LAPQ's zero-free 2^b-level grid, or the symmetric 2^b-level grid with zero.
    batch_size : int
        Batch size of the loss evaluation.
    reuse_blocks : bool
        Loss evaluations recompute only what the clips changed since the last one can affect
        (``qaf.quant.incremental``), and a point evaluated before is answered from memory; exact
        (the same losses bit for bit). The name is that of the block cache this replaced, kept so
        that the config hash of every LAPQ result stays the same.
    """

    name = "lapq"
    info = MethodInfo(display="LAPQ", order=20)
    Options = LAPQOptions

    def __init__(self, bits: int = 4, act_bits: int = 4, rate: float = 2.0, **options):
        super().__init__(bits=bits, act_bits=act_bits, rate=rate, **options)

    # ------------------------------------------------------------------ checks
    def check(self, model: nn.Module, ctx: CompressContext) -> None:
        """Validate options against the model, the policy and the calibration set."""
        if not any(layer_plan(model, ctx.policy, self.bits, self.act_bits).values()):
            raise ConfigError(f"policy={ctx.policy.name} leaves no layer for method=lapq to quantize")
        if self.calib_samples > ctx.data.calib_samples:
            raise ConfigError(f"method.calib_samples={self.calib_samples} is too large: the calibration set "
                              f"has {ctx.data.calib_samples} images (raise data.calib_samples or lower this)")

    # ------------------------------------------------------------------ main
    def compress(self, model: nn.Module, ctx: CompressContext) -> list[dict]:
        """Quantize ``model`` in place with LAPQ; fills ``self.summary``."""
        start = time.perf_counter()
        layers, slots, batches, samples = self.prepare(model, ctx)

        def lp_clips(p: float | None) -> np.ndarray:
            return self.clips(layers, slots, samples, p)

        evals = {"n": 0}
        best = {"loss": float("inf"), "x": None}
        loss = self.objective(model, layers, slots, batches)
        if loss.untraced:
            ctx.log("lapq: the model does not trace with torch.fx (%s): every loss evaluation runs it whole",
                    loss.untraced)

        # Powell runs hundreds of loss evaluations: a progress bar, not a line each.
        bar = tqdm(desc="lapq loss evaluations", unit="eval", disable=not ctx.progress, leave=False, mininterval=2)

        def loss_at(alphas: np.ndarray) -> float:
            value = loss(alphas)
            evals["n"] += 1
            if value < best["loss"]:
                best["loss"], best["x"] = value, np.array(alphas, dtype=np.float64)
            bar.update()
            bar.set_postfix(best=f"{best['loss']:.4f}", refresh=False)
            return value

        try:
            alpha_max = lp_clips(None)
            loss_max = loss_at(alpha_max)
            ctx.log("lapq: %d weight clips + %d activation clips (%s placement); max-abs clips loss=%.4f",
                    len(layers), len(slots), self.placement, loss_max)

            ps = np.linspace(self.p_min, self.p_max, self.p_count)
            sweep = [loss_at(lp_clips(float(p))) for p in ps]
            ctx.log("lapq p-sweep over %d p in [%g, %g]: losses %s", len(ps), ps[0], ps[-1],
                    " ".join(f"{v:.4f}" for v in sweep))
            p_star, fit, fallback = fit_p_star(ps, np.array(sweep))
            if fallback:
                ctx.log("lapq: quadratic fit unusable (%s); p*=%.3f (best swept p)", fallback, p_star)
            alpha0 = lp_clips(p_star)
            best["loss"], best["x"] = float("inf"), None  # Powell's start is alpha(p*): best-so-far starts here
            loss0 = loss_at(alpha0)
            ctx.log("lapq: p*=%.3f loss=%.4f; Powell maxiter=%d over %d clips", p_star, loss0, self.maxiter,
                    alpha0.size)

            iteration = {"k": 0}

            def progress(_xk: np.ndarray) -> None:
                iteration["k"] += 1
                ctx.log("lapq Powell iteration %d: best loss=%.4f (%d loss evaluations)", iteration["k"],
                        best["loss"], evals["n"])

            iterations = 0
            if self.maxiter > 0:  # maxiter=0: LAPQ's initialisation alpha(p*) only (ablation)
                result = minimize(loss_at, alpha0, method="Powell", callback=progress,
                                  options={"maxiter": self.maxiter, "xtol": 1e-4, "ftol": 1e-4})
                iterations = int(result.nit)
            final = best["x"]
            loss_final = loss_at(final)  # re-applies the best clips to the model
        finally:
            bar.close()
        for slot in slots:
            slot.quantizer.mode = "quant"
        elapsed = time.perf_counter() - start
        ctx.log("lapq: final loss=%.4f (start %.4f), %d evaluations, %.1fs", loss_final, loss0, evals["n"], elapsed)

        n_w = len(layers)
        self.summary = {
            "p_values": [float(p) for p in ps], "p_sweep_loss": [float(v) for v in sweep],
            "quadratic_fit": [float(c) for c in fit], "p_star": float(p_star), "p_star_fallback": fallback,
            "loss_maxabs": loss_max, "loss_p_star": loss0, "loss_final": loss_final,
            "powell_iterations": iterations, "loss_evaluations": evals["n"],
            "loss_evaluations_repeated": loss.repeated, "incremental": loss.forward is not None,
            "calib_samples": sum(len(y) for _, y in batches), "n_clips": int(alpha0.size),
            "weight_clips": list(layers), "activation_clips": [s.owners[0] for s in slots],
            "placement": self.placement, "seconds": elapsed, "weight_grid": self.weight_grid,
            "bias_correction": self.bias_correction,
            "float_layers": [n for n, m in model.named_modules()
                             if isinstance(m, (nn.Conv2d, nn.Linear)) and not hasattr(m, "qaf_bits")],
        }
        report = [{"name": name, "w_bits": layer.w_bits, "a_bits": layer.layer.qaf_bits[1], "clip": "lapq",
                   "shape": list(layer.weight_fp.shape), "w_alpha_max": float(alpha_max[i]),
                   "w_alpha_p_star": float(alpha0[i]), "w_alpha": float(final[i])}
                  for i, (name, layer) in enumerate(layers.items())]
        report += [{"name": slot.owners[0], "a_bits": slot.bits, "clip": "lapq", "a_unsigned": slot.unsigned,
                    "a_alpha_max": float(alpha_max[n_w + j]), "a_alpha_p_star": float(alpha0[n_w + j]),
                    "a_alpha": float(final[n_w + j]), "a_shared_by": slot.owners[1:]}
                   for j, slot in enumerate(slots)]
        return report

    def prepare(self, model: nn.Module, ctx: CompressContext) -> tuple[dict[str, QuantLayer], list[_ActSlot],
                                                                      list[tuple[Tensor, Tensor]], list[Tensor]]:
        """Put ``model`` on ``ctx.device`` with its quantizers, and observe the float model's activations.

        Returns
        -------
        tuple
            The quantized layers by name, the activation slots, the calibration batches (on
            ``ctx.device``) and each slot's activation sample.
        """
        model.to(ctx.device).eval()
        batches = calibration_batches(ctx.data, self.calib_samples, self.batch_size, ctx.device)
        layers, slots = self.insert_quantizers(model, ctx.policy, batches[0][0])
        # Activation statistics of the float model (quantizers observe; weights still float).
        for slot in slots:
            slot.quantizer.mode = "observe"
        with torch.no_grad():
            for x, _ in batches:
                model(x)
        samples = [slot.quantizer.observer.sample() for slot in slots]
        for slot in slots:
            slot.quantizer.mode = "off"
        return layers, slots, batches, samples

    def objective(self, model: nn.Module, layers: dict[str, QuantLayer], slots: list[_ActSlot],
                  batches: list[tuple[Tensor, Tensor]]) -> "CalibrationLoss":
        """The calibration loss over the clips of ``layers`` then ``slots`` (incremental with ``reuse_blocks``)."""
        names: dict[int, list[str]] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            names.setdefault(id(module), []).append(name)
        # A weight clip lives in its layer; an activation clip in its quantizer (under every name it has).
        owners = [[name] for name in layers] + [names[id(slot.quantizer)] for slot in slots]
        return CalibrationLoss(model, batches, lambda alphas, changed: self._apply(layers, slots, alphas, changed),
                               owners if self.reuse_blocks else None)

    # ------------------------------------------------------------------ placement
    def insert_quantizers(self, model: nn.Module, policy: LayerPolicy,
                          x: Tensor) -> tuple[dict[str, QuantLayer], list[_ActSlot]]:
        """Wrap the policy's layers (weight clips) and insert the activation quantizers (clips).

        Parameters
        ----------
        model : nn.Module
            The float model (modified in place).
        policy : LayerPolicy
            Which layers are quantized.
        x : Tensor
            A sample batch (the placement traces one forward pass).

        Returns
        -------
        tuple
            The quantized layers by name (one weight clip each) and the activation slots.
        """
        plan = layer_plan(model, policy, self.bits, self.act_bits)
        if self.placement == "relu":
            roles = layer_roles(model)
            split_shared_relus(model)
            slots = self._relu_slots(model, plan, roles, x)
        else:
            slots = self._input_slots(model, plan, x)
        layers = {name: model.get_submodule(name) for name, bits in plan.items() if bits is not None}
        set_input_bits(model, x[:1])
        mark_batchnorm(model)
        return layers, slots

    def _new_slot(self, owners: list[str], bits: int, unsigned: bool, device: torch.device) -> _ActSlot:
        quantizer = ActQuantizer(bits, clip="lp", symmetric=True, unsigned=unsigned).to(device)
        return _ActSlot(quantizer, owners, bits, unsigned)

    def _input_slots(self, model: nn.Module, plan: dict, x: Tensor) -> list[_ActSlot]:
        """Wrap the quantized layers; one input quantizer per distinct input tensor and bit width."""
        targets = [name for name, bits in plan.items() if bits is not None]
        inputs: dict[str, Tensor] = {}
        trace_inputs(model, targets, x, lambda n, args: inputs.__setitem__(n, args[0]))
        slots: list[_ActSlot] = []
        for name in targets:
            w_bits, a_bits = plan[name]
            tensor = inputs[name]
            slot = next((s for s in slots if inputs[s.owners[0]] is tensor and s.bits == a_bits), None)
            if slot is None:
                slot = self._new_slot([], a_bits, bool(tensor.min() >= 0), tensor.device)
                slots.append(slot)
            slot.owners.append(name)
            set_submodule(model, name, QuantLayer(model.get_submodule(name), w_bits, a_bits, fit_weight=False,
                                                  act=slot.quantizer))
        return slots

    def _relu_slots(self, model: nn.Module, plan: dict, roles: dict[str, str], x: Tensor) -> list[_ActSlot]:
        """Quantizers on ReLU outputs ``[first:-1]``, plus input quantizers of a quantized stem/classifier."""
        relus = [n for n, m in model.named_modules() if isinstance(m, nn.ReLU)]
        edges = {role: name for name, role in roles.items() if role in ("stem", "classifier")}
        first = 0 if plan.get(edges.get("stem", "")) else 1
        slots = []
        for name in relus[first:-1]:
            slot = self._new_slot([name], self.act_bits, True, x.device)
            set_submodule(model, name, QuantReLU(model.get_submodule(name), slot.quantizer))
            slots.append(slot)
        inputs: dict[str, Tensor] = {}
        trace_inputs(model, list(edges.values()), x, lambda n, args: inputs.__setitem__(n, args[0]))
        for name, bits in plan.items():
            if bits is None:
                continue
            act: nn.Module = nn.Identity()
            if name in edges.values():
                slot = self._new_slot([name], bits[1], bool(inputs[name].min() >= 0), x.device)
                slots.append(slot)
                act = slot.quantizer
            set_submodule(model, name, QuantLayer(model.get_submodule(name), *bits, fit_weight=False, act=act))
        return slots

    # ------------------------------------------------------------------ clips
    def clips(self, layers: dict[str, QuantLayer], slots: list[_ActSlot], samples: list[Tensor],
              p: float | None) -> np.ndarray:
        """Lp-optimal clips (``p=None``: max-abs) of all weights, then all activations."""
        clip = "minmax" if p is None else "lp"
        p = 2.0 if p is None else p
        zero_free = self.weight_grid == "zero_free"
        out = [make_grid(q.weight_fp, q.w_bits, clip=clip, p=p, zero_free=zero_free).alpha for q in layers.values()]
        out += [make_grid(s, slot.bits, clip=clip, p=p, unsigned=slot.unsigned).alpha
                for s, slot in zip(samples, slots)]
        return np.array([float(a) for a in out], dtype=np.float64)

    def _apply(self, layers: dict[str, QuantLayer], slots: list[_ActSlot], alphas: np.ndarray,
               changed: np.ndarray) -> None:
        """Put the layers and activation quantizers whose clips are ``changed`` (indices into ``alphas``,
        weights then activations) on the grids of ``alphas``; the others already are."""
        zero_free = self.weight_grid == "zero_free"
        names, n_w = list(layers), len(layers)
        for i in changed[changed < n_w]:
            layer = layers[names[i]]
            a = torch.tensor(float(alphas[i]), device=layer.weight_fp.device)
            layer.set_weight_grid(symmetric_grid(a, layer.w_bits, zero_free), bias_correction=self.bias_correction)
        for j in changed[changed >= n_w] - n_w:
            slot = slots[j]
            a = torch.tensor(float(alphas[n_w + j]), device=slot.quantizer.observer.running_max.device)
            grid = unsigned_grid(a, slot.bits) if slot.unsigned else symmetric_grid(a, slot.bits)
            slot.quantizer.set_grid(grid)
            slot.quantizer.mode = "quant"


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


def calibration_batches(data, samples: int, batch_size: int, device: torch.device,
                        transform: str | None = None) -> list[tuple[Tensor, Tensor]]:
    """The first ``samples`` calibration images and labels, batched and moved to ``device``.

    Parameters
    ----------
    data : DataBundle
        Source of the calibration set (``data.calib()``; evaluation images are never touched).
    samples, batch_size : int
        How many images, and how many per batch.
    device : torch.device
        Where the batches are kept for the whole search.
    transform : str or None
        ``train`` or ``eval``; None: the calibration transform.

    Returns
    -------
    list of (Tensor, Tensor)
        Image and label batches.
    """
    calib = data.calib(transform, samples=samples)
    count = len(calib)
    items = [calib[i] for i in range(count)]
    images = torch.stack([torch.as_tensor(x) for x, _ in items]).to(device)
    labels = torch.tensor([int(y) for _, y in items], device=device)
    return [(images[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, count, batch_size)]


@torch.no_grad()
def calibration_loss(batches: list[tuple[Tensor, Tensor]], outputs: list[Tensor]) -> float:
    """Mean cross-entropy per image of the model ``outputs`` on the calibration ``batches``.

    Parameters
    ----------
    batches : list of (Tensor, Tensor)
        Calibration images and labels.
    outputs : list of Tensor
        The model's logits on each batch.

    Returns
    -------
    float
        Cross-entropy per image (summed per batch, as the reference does).
    """
    total, count = 0.0, 0
    for logits, (_, y) in zip(outputs, batches, strict=True):
        total += F.cross_entropy(logits, y, reduction="sum").item()
        count += len(y)
    return total / count


class CalibrationLoss:
    """LAPQ's objective: the calibration loss of ``model`` as a function of its clips.

    Each call applies the clips that changed since the previous call (``apply``), then runs the
    model on the calibration batches: whole, or, given ``owners``, from the first operation a
    changed clip reaches (:class:`qaf.quant.incremental.IncrementalForward`) and with a point
    evaluated before answered from memory (each Powell line search starts at its current point).

    Parameters
    ----------
    model : nn.Module
        The model with its quantizers in place.
    batches : list of (Tensor, Tensor)
        Calibration images and labels.
    apply : callable
        ``apply(alphas, changed)`` puts the clips ``alphas[changed]`` on the model.
    owners : list of list of str, optional
        The modules each clip acts on: evaluate incrementally and remember evaluated points (None:
        run the model whole every time).

    Attributes
    ----------
    forward : IncrementalForward or None
        The incremental forward pass (None: the model runs whole).
    untraced : str
        Why ``owners`` were given but the model runs whole (``torch.fx`` cannot trace it), or "".
    repeated : int
        Calls answered from memory.
    """

    def __init__(self, model: nn.Module, batches: list[tuple[Tensor, Tensor]],
                 apply: Callable[[np.ndarray, np.ndarray], None], owners: list[list[str]] | None = None):
        self.model, self.batches, self.apply = model, batches, apply
        self.forward: IncrementalForward | None = None
        self.untraced, self.repeated = "", 0
        if owners is not None:
            try:
                self.forward = IncrementalForward(model, owners, [x for x, _ in batches])
            except Exception as err:  # any model torch.fx cannot trace: the whole forward is as exact
                self.untraced = f"{type(err).__name__}: {err}"
        self._seen: dict[bytes, float] | None = {} if owners is not None else None
        self._applied: np.ndarray | None = None

    def __call__(self, alphas: np.ndarray) -> float:
        """The calibration loss at clips ``alphas`` (weights, then activations); the model keeps them.

        Parameters
        ----------
        alphas : np.ndarray
            All clips.

        Returns
        -------
        float
            Cross-entropy per calibration image.
        """
        alphas = np.array(alphas, dtype=np.float64)
        changed = (np.arange(alphas.size) if self._applied is None
                   else np.flatnonzero(alphas != self._applied))
        self.apply(alphas, changed)
        self._applied = alphas
        key = alphas.tobytes()
        if self._seen is not None and key in self._seen:
            self.repeated += 1
            return self._seen[key]
        with torch.no_grad():
            outputs = (self.forward.outputs(alphas) if self.forward is not None
                       else [self.model(x) for x, _ in self.batches])
        value = calibration_loss(self.batches, outputs)
        if self._seen is not None:
            self._seen[key] = value
        return value


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


def print_slots(argv: list[str] | None = None) -> None:
    """``python -m qaf.methods.lapq [resnet18|resnet20] [--placement relu|input] [--policy lapq|uniform]``:
    print the weight and activation clips LAPQ searches on that model (docs/baselines.md)."""
    import argparse

    from omegaconf import OmegaConf

    from qaf.models.cifar_resnet import build as cifar_build
    from qaf.models.torchvision_models import build as tv_build

    parser = argparse.ArgumentParser(prog="python -m qaf.methods.lapq", description=print_slots.__doc__)
    parser.add_argument("model", nargs="?", default="resnet18", choices=["resnet18", "resnet20"])
    parser.add_argument("--placement", default="relu", choices=PLACEMENTS)
    parser.add_argument("--policy", default="lapq", help="a file name in conf/policy/ (default lapq)")
    args = parser.parse_args(argv)
    conf = Path(__file__).resolve().parents[2] / "conf" / "policy" / f"{args.policy}.yaml"
    policy = LayerPolicy.from_config(OmegaConf.to_container(OmegaConf.load(conf)))
    if args.model == "resnet18":
        model, size = tv_build("resnet18", pretrained=False), 224
    else:
        model, size = cifar_build(20), 32
    method = LAPQ(bits=4, act_bits=4, placement=args.placement)
    layers, slots = method.insert_quantizers(model, policy, torch.randn(2, 3, size, size))
    print(f"{args.model}, policy={policy.name}, placement={args.placement}: {len(layers)} weight clips, "
          f"{len(slots)} activation clips ({len(layers) + len(slots)} Powell variables)")
    print("weight clips:", ", ".join(layers))
    print("activation clips:", ", ".join(f"{s.owners[0]}{' (signed)' if not s.unsigned else ''}" for s in slots))


if __name__ == "__main__":
    print_slots()
