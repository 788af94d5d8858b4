"""The contract every compression method follows.

A method family is one module here plus one config in ``conf/method/``. The pipeline knows
nothing method-specific: it calls ``check`` then ``compress``, then runs the same calibration
protocol (batch-norm re-estimation, activation observation, optional fine-tuning) on whatever
the method produced. A method that sets its own activation clips (LAPQ) simply leaves no
quantizer for the observers to fit.
"""

from __future__ import annotations

import abc
import fnmatch
import inspect
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qaf.config import ConfigError
from qaf.quant.policy import LayerPolicy, layer_roles

if TYPE_CHECKING:
    from qaf.cache import FactorCache
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
    cache: "FactorCache | None" = None
    seed: int = 0
    progress: bool = True

    def log(self, message: str, *args: Any) -> None:
        """A progress line (``progress=false`` silences it)."""
        if self.progress:
            log.info(message, *args)


class Method(abc.ABC):
    """A post-training compression method.

    Subclasses are instantiated from ``conf/method/<name>.yaml``; the pipeline passes ``bits``,
    ``act_bits`` and ``rate`` as keyword arguments along with the method's own options.

    Attributes
    ----------
    name : str
        The method's name as it appears in configs, tables and W&B.
    summary : dict
        Method-level figures written to metrics.json (``method_summary``) after ``compress``.
    """

    name: str = "base"

    def __init__(self, bits: int = 4, act_bits: int = 8, rate: float = 2.0, **options: Any):
        self.bits = bits
        self.act_bits = act_bits
        self.rate = rate
        self.summary: dict[str, Any] = {}
        if options:
            accepted = sorted(p.name for cls in type(self).__mro__ if issubclass(cls, Method)
                              for p in inspect.signature(cls.__init__).parameters.values()
                              if p.kind == p.KEYWORD_ONLY)
            raise ConfigError(f"method.{sorted(options)[0]} is not an option of method={self.name}: accepted "
                              f"{', '.join(dict.fromkeys(accepted)) or 'none'}")

    def check(self, model: nn.Module, ctx: CompressContext) -> None:
        """Validate options against the model and context before heavy work; raise ``ConfigError``."""

    @abc.abstractmethod
    def compress(self, model: nn.Module, ctx: CompressContext) -> list[dict]:
        """Compress ``model`` in place and return one report dict per compressed layer."""


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
