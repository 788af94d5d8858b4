"""``method=ptq``: round-to-nearest post-training quantization with a classic clip rule."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from qaf.config import ConfigError, option
from qaf.methods.base import CompressContext, Method, clip_option
from qaf.quant.modules import quantize_model
from qaf.quant.policy import layer_plan
from qaf.results import MethodInfo


@dataclass
class PTQOptions:
    """Options of PTQ (``conf/method/ptq.yaml``); see :class:`PTQ`."""

    clip: str = clip_option()
    act_clip: str = clip_option()
    per_channel: bool = option(False)
    p: float = option(2.0, low=0, low_open=True)


class PTQ(Method):
    """Every conv/linear the layer policy quantizes, rounded to nearest on a clipped grid.

    Weights: symmetric grid, per tensor (or per output channel), clip rule ``clip``.  Input
    activations of every quantized layer: affine grid with clip rule ``act_clip``, fitted on
    calibration data by the pipeline's observers.

    Parameters
    ----------
    bits, act_bits, rate
        From the top-level config (``rate`` is unused).
    clip : {"minmax", "mse", "lp", "aciq"}
        Weight clip rule.
    act_clip : {"minmax", "mse", "lp", "aciq"}
        Activation clip rule.
    per_channel : bool
        Per-output-channel weight grids.
    p : float
        Exponent of the ``lp`` rule (weights and activations).
    """

    name = "ptq"
    info = MethodInfo(display="PTQ", order=10)
    Options = PTQOptions

    def check(self, model: nn.Module, ctx: CompressContext) -> None:
        """Reject models without conv/linear layers."""
        if not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules()):
            raise ConfigError("method=ptq needs a model with Conv2d or Linear layers")

    def compress(self, model: nn.Module, ctx: CompressContext) -> list[dict]:
        """Quantize the weights in place and insert activation quantizers (observed later)."""
        model.to(ctx.device)
        weight_scheme = {"symmetric": True, "clip": self.clip, "p": self.p, "per_channel": self.per_channel,
                         "ch_axis": 0}
        act_scheme = {"clip": self.act_clip, "p": self.p, "symmetric": False}
        return quantize_model(model, layer_plan(model, ctx.policy, self.bits, self.act_bits),
                              weight_scheme=weight_scheme, act_scheme=act_scheme)
