"""``method=ptq``: round-to-nearest post-training quantization with a classic clip rule."""

from __future__ import annotations

from torch import nn

from qaf.config import ConfigError, check_bool, check_choice, check_number
from qaf.methods.base import CompressContext, Method
from qaf.quant.clip import CLIP_RULES
from qaf.quant.modules import quantize_model
from qaf.quant.policy import layer_plan


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

    def __init__(self, bits: int = 4, act_bits: int = 8, rate: float = 2.0, *, clip: str = "mse",
                 act_clip: str = "mse", per_channel: bool = False, p: float = 2.0, **options):
        super().__init__(bits=bits, act_bits=act_bits, rate=rate, **options)
        self.clip, self.act_clip, self.per_channel, self.p = clip, act_clip, per_channel, p

    def check(self, model: nn.Module, ctx: CompressContext) -> None:
        """Reject unknown clip rules, a bad ``p`` and models without conv/linear layers."""
        check_choice("method.clip", self.clip, CLIP_RULES)
        check_choice("method.act_clip", self.act_clip, CLIP_RULES)
        check_bool("method.per_channel", self.per_channel)
        check_number("method.p", self.p, 0, low_open=True)
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
