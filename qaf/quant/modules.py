"""Fake-quant modules: activation quantizers, quantized conv/linear wrappers, model rewriting."""

from __future__ import annotations

from typing import Any, Callable, Collection

import torch
from torch import Tensor, nn

from qaf.config import ConfigError
from qaf.quant.uniform import Grid, check_scheme, correct_mean, make_grid

MODES = ("off", "observe", "quant")
#: Bit width BatchNorm is counted at in a quantized model (BOPs convention of the issue).
BN_BITS = (8, 8)


class ActQuantizer(nn.Module):
    """Per-tensor activation fake-quantizer with a clip observed on calibration data.

    Modes: ``"off"`` is the identity; ``"observe"`` records a running min/max and a bounded random
    subsample of what passes (identity output); switching to ``"quant"`` fits the grid to the
    observations (unless a grid was set explicitly with ``set_grid``) and quantizes from then on.

    Parameters
    ----------
    bits : int
        Bit width.
    clip : {"minmax", "mse", "lp", "aciq"}
        Clip rule (see ``qaf.quant.uniform.make_grid``).
    symmetric : bool
        Signed grid around 0; False (default) gives the affine [min, max] grid.
    unsigned : bool
        Unsigned grid over [0, alpha] (post-ReLU inputs).
    p : float
        Exponent for ``clip="lp"``.
    max_samples : int
        Bound on the stored subsample (elements).
    per_batch : int
        Elements drawn at random from each observed batch.
    seed : int
        Seed of the subsampling generator (observation is deterministic).
    """

    def __init__(
        self,
        bits: int,
        *,
        clip: str = "mse",
        symmetric: bool = False,
        unsigned: bool = False,
        p: float = 2.0,
        max_samples: int = 1 << 20,
        per_batch: int = 1 << 16,
        seed: int = 0,
    ):
        super().__init__()
        check_scheme(bits, clip, p, key="act_clip")
        self.bits, self.clip, self.symmetric, self.unsigned, self.p = bits, clip, symmetric, unsigned, p
        self.max_samples, self.per_batch = max_samples, per_batch
        self._gen = torch.Generator().manual_seed(seed)
        self._mode = "off"
        self.grid: Grid | None = None
        self._samples: list[Tensor] = []
        self._unfitted = False  # observations made since the grid was last fitted or set
        self.register_buffer("running_min", torch.tensor(float("inf")))
        self.register_buffer("running_max", torch.tensor(float("-inf")))

    @property
    def mode(self) -> str:
        """Current mode; setting ``"quant"`` fits the grid to observations made since the last grid."""
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is invalid: accepted {', '.join(MODES)}")
        if mode == "quant" and (self._unfitted or self.grid is None):
            self.grid = self._fit()
            self._unfitted = False
        self._mode = mode

    def sample(self) -> Tensor:
        """The stored subsample, with the observed extremes included (clip search sees them)."""
        if not self._samples:
            raise RuntimeError("ActQuantizer has observed nothing: run calibration data in 'observe' mode")
        extremes = torch.stack([self.running_min, self.running_max]).to(self._samples[0].device)
        return torch.cat([*self._samples, extremes])

    def set_grid(self, grid: Grid) -> None:
        """Use ``grid`` as is (a method chose the clip itself); earlier observations will not refit it."""
        self.grid = grid
        self._unfitted = False

    def reset(self) -> None:
        """Forget observations and grid."""
        self._samples.clear()
        self._unfitted = False
        self.grid = None
        self.running_min.fill_(float("inf"))
        self.running_max.fill_(float("-inf"))

    def _fit(self) -> Grid:
        return make_grid(
            self.sample(), self.bits, symmetric=self.symmetric, unsigned=self.unsigned, clip=self.clip, p=self.p
        )

    def _observe(self, x: Tensor) -> None:
        self._unfitted = True
        flat = x.detach().reshape(-1).float()
        self.running_min.copy_(torch.minimum(self.running_min, flat.min()))
        self.running_max.copy_(torch.maximum(self.running_max, flat.max()))
        if flat.numel() > self.per_batch:
            idx = torch.randint(flat.numel(), (self.per_batch,), generator=self._gen).to(flat.device)
            flat = flat[idx]
        self._samples.append(flat.clone())
        total = sum(s.numel() for s in self._samples)
        if total > self.max_samples:  # keep a uniform subsample of everything seen so far
            pool = torch.cat(self._samples)
            idx = torch.randperm(pool.numel(), generator=self._gen)[: self.max_samples].to(pool.device)
            self._samples = [pool[idx]]

    def forward(self, x: Tensor) -> Tensor:
        if self._mode == "off":
            return x
        if self._mode == "observe":
            self._observe(x)
            return x
        assert self.grid is not None
        if self.grid.scale.device != x.device:
            self.grid = self.grid.to(x.device)
        return self.grid(x)

    def extra_repr(self) -> str:
        kind = "unsigned" if self.unsigned else "symmetric" if self.symmetric else "affine"
        return f"bits={self.bits}, clip={self.clip}, {kind}, mode={self._mode}"


class QuantLayer(nn.Module):
    """A Conv2d/Linear with fake-quantized weight and input activations.

    The float weight is kept (non-persistent buffer ``weight_fp``) so that a method can move the
    weight to another grid with ``set_weight_grid``.

    Parameters
    ----------
    layer : nn.Conv2d or nn.Linear
        The layer to wrap (modified in place: its weight becomes the quantized one).
    w_bits, a_bits : int
        Weight and input-activation bit widths.
    weight_quantized : bool
        The weight is already on its grid (e.g. CP factors from ADMM): leave it as is.
    weight_scheme : dict, optional
        ``make_grid`` keyword arguments for the weight (default per-tensor symmetric MSE).
    act_scheme : dict, optional
        ``ActQuantizer`` keyword arguments (default affine MSE).
    act : ActQuantizer, optional
        Use this quantizer for the input (shared between layers that read the same tensor).
    """

    def __init__(
        self,
        layer: nn.Module,
        w_bits: int,
        a_bits: int,
        *,
        weight_quantized: bool = False,
        weight_scheme: dict[str, Any] | None = None,
        act_scheme: dict[str, Any] | None = None,
        act: ActQuantizer | None = None,
    ):
        super().__init__()
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"QuantLayer wraps Conv2d or Linear, got {type(layer).__name__}")
        self.layer = layer
        self.w_bits, self.a_bits = w_bits, a_bits
        self.weight_scheme = {"symmetric": True, "clip": "mse", **(weight_scheme or {})}
        self.act = act if act is not None else ActQuantizer(a_bits, **(act_scheme or {})).to(layer.weight.device)
        self.register_buffer("weight_fp", layer.weight.detach().clone(), persistent=False)
        self.weight_grid: Grid | None = None
        if not weight_quantized:
            self.set_weight_grid(make_grid(self.weight_fp, w_bits, **self.weight_scheme))
        layer.qaf_bits = (w_bits, a_bits)

    @torch.no_grad()
    def set_weight_grid(self, grid: Grid, bias_correction: bool = False) -> None:
        """Quantize the float weight onto ``grid`` (optionally mean-corrected per output channel)."""
        self.weight_grid = grid
        w_q = grid(self.weight_fp)
        if bias_correction:
            w_q = correct_mean(w_q, self.weight_fp)
        self.layer.weight.copy_(w_q)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(self.act(x))


BitsFor = Callable[[str, nn.Module], "int | tuple[int, int] | None"]


def quantize_model(
    model: nn.Module,
    bits_for: BitsFor,
    act_bits: int,
    *,
    weight_scheme: dict[str, Any] | None = None,
    act_scheme: dict[str, Any] | None = None,
    weight_quantized: Collection[str] = (),
) -> list[dict]:
    """Replace conv/linear layers by ``QuantLayer`` in place.

    Parameters
    ----------
    model : nn.Module
        Model to rewrite.
    bits_for : callable
        ``bits_for(name, module)``: ``None`` leaves the layer in float; an int gives the weight
        bits (input activations at ``act_bits``); a tuple gives ``(w_bits, a_bits)``.
    act_bits : int
        Default input-activation bit width.
    weight_scheme, act_scheme : dict, optional
        Passed to every ``QuantLayer``.
    weight_quantized : collection of str
        Names of layers whose weights are already on their grid; a module attribute
        ``qaf_weight_quantized = True`` marks them too.

    Returns
    -------
    list of dict
        One entry per quantized layer: name, w_bits, a_bits, clip, act_clip, shape,
        weight_quantized.
    """
    targets = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            bits = bits_for(name, module)
            if bits is not None:
                targets.append((name, module, bits))
    report = []
    for name, module, bits in targets:
        w_bits, a_bits = bits if isinstance(bits, tuple) else (bits, act_bits)
        on_grid = name in weight_quantized or bool(getattr(module, "qaf_weight_quantized", False))
        wrapped = QuantLayer(
            module, w_bits, a_bits, weight_quantized=on_grid, weight_scheme=weight_scheme, act_scheme=act_scheme
        )
        set_submodule(model, name, wrapped)
        report.append(
            {
                "name": name,
                "w_bits": w_bits,
                "a_bits": a_bits,
                "clip": None if on_grid else wrapped.weight_scheme["clip"],
                "act_clip": wrapped.act.clip,
                "shape": list(module.weight.shape),
                "weight_quantized": on_grid,
            }
        )
    if report:
        mark_batchnorm(model)
    return report


def mark_batchnorm(model: nn.Module) -> None:
    """Set ``qaf_bits = (8, 8)`` on every BatchNorm2d (BN is counted at 8x8 in a quantized model)."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.qaf_bits = BN_BITS


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not child:
        raise ConfigError("cannot quantize the model itself: it must contain conv/linear layers")
    setattr(parent, child, new)


def act_quantizers(model: nn.Module) -> list[ActQuantizer]:
    """All distinct ``ActQuantizer`` modules of ``model``."""
    return [m for m in model.modules() if isinstance(m, ActQuantizer)]


def set_act_mode(model: nn.Module, mode: str) -> None:
    """Set the mode of every ``ActQuantizer`` in ``model`` (``"off"``, ``"observe"``, ``"quant"``)."""
    for q in act_quantizers(model):
        q.mode = mode
