"""The contract every compression method follows, and the loop the decomposition methods share.

A method family is one module here plus one config in ``conf/method/``. The pipeline knows
nothing method-specific: it calls ``check`` then ``compress``, then runs the same calibration
protocol (batch-norm re-estimation, activation observation, optional fine-tuning) on whatever
the method produced, and records the method's ``info`` for the report. A method that sets its own
activation clips (LAPQ) simply leaves no quantizer for the observers to fit.
"""

from __future__ import annotations

import abc
import dataclasses
import fnmatch
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qaf.cache import FactorCache
from qaf.config import ConfigError, check_options, option
from qaf.quant.clip import CLIP_RULES
from qaf.quant.modules import quantize_model, set_submodule
from qaf.quant.policy import LayerPolicy, layer_plan, layer_roles
from qaf.quant.uniform import Grid
from qaf.results import MethodInfo

if TYPE_CHECKING:
    from qaf.data import DataBundle

log = logging.getLogger("qaf")


@dataclass
class CompressContext:
    """What a method may use while compressing.

    Attributes
    ----------
    data : DataBundle
        Calibration pool (``data.calib(...)``); evaluation images are off limits.
    device : torch.device
        Where solvers run.
    policy : LayerPolicy
        Which layers are compressed, kept at ``keep_bits`` or left in float.
    cache : FactorCache or None
        Cache of expensive per-layer results.
    seed : int
        Run seed.
    progress : bool
        Log per-layer / per-iteration progress lines.
    """

    data: "DataBundle"
    device: torch.device
    policy: LayerPolicy = field(default_factory=LayerPolicy)
    cache: FactorCache | None = None
    seed: int = 0
    progress: bool = True

    def log(self, message: str, *args: Any) -> None:
        """A progress line (``progress=false`` silences it)."""
        if self.progress:
            log.info(message, *args)


@dataclass
class NoOptions:
    """The options of a method that has none."""


def clip_option(default: str = "mse") -> Any:
    """A clip rule option (``minmax | mse | lp | aciq``), declared once for every method."""
    return option(default, choices=CLIP_RULES)


class Method(abc.ABC):
    """A post-training compression method.

    Subclasses are instantiated from ``conf/method/<name>.yaml``; the pipeline passes ``bits``,
    ``act_bits`` and ``rate`` as keyword arguments along with the method's own options, which the
    subclass declares as the dataclass ``Options`` (fields made with :func:`qaf.config.option`:
    default and accepted values); ``self.options`` holds them, checked, and each reads as an
    attribute too (``self.clip``).

    Attributes
    ----------
    name : str
        The method's name as it appears in configs, tables and W&B.
    info : MethodInfo
        How reports show it (recorded in metrics.json).
    summary : dict
        Method-level figures written to metrics.json (``method_summary``) after ``compress``.
    """

    name: str = "base"
    Options: type = NoOptions

    def __init__(self, bits: int = 4, act_bits: int = 8, rate: float = 2.0, **options: Any):
        self.bits = bits
        self.act_bits = act_bits
        self.rate = rate
        self.summary: dict[str, Any] = {}
        accepted = sorted(f.name for f in dataclasses.fields(self.Options))
        self.options = self.Options(**{k: v for k, v in options.items() if k in accepted})
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ConfigError(f"method.{unknown[0]} is not an option of method={self.name}: accepted "
                              f"{', '.join(accepted) or 'none'}")
        check_options(self.options, "method")

    @property
    def info(self) -> MethodInfo:
        """How reports show the method: its name, no rate, unless the subclass declares ``info``."""
        return MethodInfo(display=self.name)

    def __getattr__(self, key: str) -> Any:
        """An option read as an attribute (``self.clip`` is ``self.options.clip``)."""
        options = self.__dict__.get("options")
        if options is None or key not in options.__dataclass_fields__:
            raise AttributeError(f"{type(self).__name__} has no attribute {key!r}")
        return getattr(options, key)

    def check(self, model: nn.Module, ctx: CompressContext) -> None:
        """Validate options against the model and context before heavy work; raise ``ConfigError``."""

    @abc.abstractmethod
    def compress(self, model: nn.Module, ctx: CompressContext) -> list[dict]:
        """Compress ``model`` in place and return one report dict per compressed layer."""


@dataclass
class DecompositionOptions:
    """Options of every decomposition method: which convs it replaces and the other layers' clips."""

    include: list[str] = option(["*"])
    exclude: list[str] = option([])
    clip: str = clip_option()
    act_clip: str = clip_option()


class DecompositionMethod(Method):
    """A method that replaces the selected convs one by one (CP, QSWD): one loop for all of them.

    The loop: the convs of :func:`decomposable_convs`, each replaced by :meth:`decompose` (which
    reads and fills ``cache``), a progress line per layer with the report's :attr:`log_fields`,
    then every other layer quantized as the policy says.

    Attributes
    ----------
    log_fields : tuple of str
        Report entries shown on each layer's progress line.
    """

    Options: type = DecompositionOptions
    log_fields: tuple[str, ...] = ()

    def select_layers(self, model: nn.Module, policy: LayerPolicy) -> list[tuple[str, nn.Conv2d]]:
        """The convs this method replaces, in module order."""
        return decomposable_convs(model, policy, self.include, self.exclude)

    def check(self, model: nn.Module, ctx: CompressContext) -> None:
        """Raise ``ConfigError`` when the selection is empty; then :meth:`check_layers`."""
        layers = self.select_layers(model, ctx.policy)
        if not layers:
            raise ConfigError(
                f"method={self.name} selects no layer: method.include={self.include} / "
                f"method.exclude={self.exclude} with policy={ctx.policy.name} match no conv with a "
                "kernel larger than 1x1 that the policy puts at `bits`")
        self.check_layers(layers)

    def check_layers(self, layers: list[tuple[str, nn.Conv2d]]) -> None:
        """Validate the options against the selected convs (nothing to check by default)."""

    def schemes(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Weight and activation schemes of the layers the policy quantizes (``quantize_model``)."""
        return {"symmetric": True, "clip": self.clip}, {"clip": self.act_clip, "symmetric": False}

    @abc.abstractmethod
    def decompose(self, name: str, conv: nn.Conv2d, ctx: CompressContext,
                  cache: FactorCache) -> tuple[nn.Module, dict[str, Grid | None], dict]:
        """The module replacing ``conv``; its sub-layers (names relative to it) that the loop
        quantizes at ``bits``/``act_bits``, each on the grid given (None: fitted by the weight
        scheme); and the layer's report (with ``cached``)."""

    def compress(self, model: nn.Module, ctx: CompressContext) -> list[dict]:
        """Replace the selected convs in place, then quantize every layer the policy asks for."""
        model.to(ctx.device)
        layers = self.select_layers(model, ctx.policy)
        cache = ctx.cache if ctx.cache is not None else FactorCache("", enabled=False)
        reports, replacements = [], {}
        for idx, (name, conv) in enumerate(layers):
            start = time.perf_counter()
            module, sub_grids, report = self.decompose(name, conv, ctx, cache)
            report["seconds"] = round(time.perf_counter() - start, 3)
            replacements[name] = (module, sub_grids)
            reports.append(report)
            shown = " ".join(f"{k}={report[k]:.4g}" if isinstance(report[k], float) else f"{k}={report[k]}"
                             for k in self.log_fields)
            ctx.log("[%d/%d] %s %s: %.1f s%s", idx + 1, len(layers), name, shown, report["seconds"],
                    " (cached)" if report["cached"] else "")
        self.assemble(model, ctx.policy, replacements)
        return reports

    def assemble(self, model: nn.Module, policy: LayerPolicy,
                 replacements: dict[str, tuple[nn.Module, dict[str, Grid | None]]]) -> None:
        """Put each replacement (module, its sub-layers' grids) in place of its conv and quantize every
        layer as the policy says: the model :meth:`compress` returns, and any model costed like it.

        Parameters
        ----------
        model : nn.Module
            The float model, changed in place.
        policy : LayerPolicy
            The run's layer policy.
        replacements : dict
            Conv name -> (the module replacing it, its sub-layers quantized at ``bits``/``act_bits``
            with their grids, None: fitted by the weight scheme), as :meth:`decompose` returns them.
        """
        plan = dict(layer_plan(model, policy, self.bits, self.act_bits))
        grids = {}
        for name, (module, sub_grids) in replacements.items():
            set_submodule(model, name, module)
            del plan[name]
            for sub, grid in sub_grids.items():
                plan[f"{name}.{sub}"] = (self.bits, self.act_bits)
                if grid is not None:
                    grids[f"{name}.{sub}"] = grid
        weight_scheme, act_scheme = self.schemes()
        quantize_model(model, plan, weight_scheme=weight_scheme, act_scheme=act_scheme, weight_grids=grids)


def decomposable_convs(model: nn.Module, policy: LayerPolicy, include: list[str],
                       exclude: list[str]) -> list[tuple[str, nn.Conv2d]]:
    """The convs a decomposition method (CP, QSWD) replaces, in module order.

    Those with a kernel larger than 1x1 and groups 1 that the policy puts at ``bits``, whose name
    matches an ``include`` and no ``exclude`` fnmatch pattern; the same rule for every family,
    so they compress the same layers.
    """
    chosen = []
    for name, role in layer_roles(model).items():
        conv = model.get_submodule(name)
        if (not isinstance(conv, nn.Conv2d) or conv.groups != 1 or conv.kernel_size[0] * conv.kernel_size[1] == 1
                or policy.treatment(role) != "bits"):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in include) and not any(fnmatch.fnmatchcase(name, p) for p in exclude):
            chosen.append((name, conv))
    return chosen
