"""The contract every compression method follows."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from qaf.cache import FactorCache
    from qaf.data import DataBundle


@dataclass
class CompressContext:
    """What a method may use while compressing: calibration data, device, cache, seed."""

    data: "DataBundle"
    device: torch.device
    cache: "FactorCache | None" = None
    seed: int = 0
    progress: bool = True


class Method(abc.ABC):
    """A post-training compression method.

    Subclasses are instantiated from ``conf/method/<name>.yaml``; the pipeline passes ``bits``,
    ``act_bits`` and ``rate`` as keyword arguments along with the method's own options.

    Attributes
    ----------
    name : str
        The method's name as it appears in configs, tables and W&B.
    bn_calibration : bool
        Whether the pipeline re-estimates batch-norm statistics after ``compress``.
    observe_activations : bool
        Whether the pipeline runs calibration data through the model's ``ActQuantizer`` modules
        in ``"observe"`` mode before evaluation (False for methods that set their own clips).
    """

    name: str = "base"
    bn_calibration: bool = False
    observe_activations: bool = True

    def __init__(self, bits: int = 4, act_bits: int = 8, rate: float = 2.0, **options: Any):
        self.bits = bits
        self.act_bits = act_bits
        self.rate = rate
        if options:
            raise TypeError(f"{type(self).__name__} got unknown options {sorted(options)}")

    def check(self, model: nn.Module, data: "DataBundle") -> None:
        """Validate settings against the model before heavy work; raise ``ConfigError``."""

    @abc.abstractmethod
    def compress(self, model: nn.Module, ctx: CompressContext) -> list[dict]:
        """Compress ``model`` in place and return one report dict per compressed layer."""
