"""``method=ptq``: round-to-nearest post-training quantization with a classic clip rule."""

from __future__ import annotations

from torch import nn

from qaf.config import ConfigError
from qaf.methods.base import CompressContext, Method
from qaf.quant.clip import CLIP_RULES
from qaf.quant.modules import quantize_model

# Any conv or linear layer the pipeline can quantize.
QUANTIZABLE = (nn.Conv2d, nn.Linear)


class PTQ(Method):
    """Weights of every conv/linear at ``bits`` (first conv and classifier at ``keep_bits``).

    Weights: symmetric grid, per tensor (or per output channel), clip rule ``clip``.  Input
    activations of every quantized layer: affine grid at ``act_bits`` with clip rule ``act_clip``,
    fitted by the pipeline on calibration data (``observe_activations``).

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
    keep_bits : int or None
        Weight and activation bits of the first conv and the last linear layer; None treats them
        like every other layer.
    bn_calibration : bool
        Re-estimate BN statistics after quantizing the weights.
    """

    name = "ptq"
    observe_activations = True

    def __init__(self, bits: int = 4, act_bits: int = 8, rate: float = 2.0, *, clip: str = "mse",
                 act_clip: str = "mse", per_channel: bool = False, p: float = 2.0,
                 keep_bits: int | None = 8, bn_calibration: bool = False, **options):
        super().__init__(bits=bits, act_bits=act_bits, rate=rate, **options)
        self.clip, self.act_clip, self.per_channel, self.p = clip, act_clip, per_channel, p
        self.keep_bits = keep_bits
        self.bn_calibration = bn_calibration

    def check(self, model: nn.Module, data=None) -> None:
        """Reject unknown clip rules, bad ``p``/``keep_bits`` and models without conv/linear layers."""
        for key, value in (("method.clip", self.clip), ("method.act_clip", self.act_clip)):
            if value not in CLIP_RULES:
                raise ConfigError(f"{key}={value!r} is invalid: accepted {', '.join(CLIP_RULES)}")
        if not isinstance(self.per_channel, bool):
            raise ConfigError(f"method.per_channel={self.per_channel!r} is invalid: accepted true, false")
        if not isinstance(self.p, (int, float)) or isinstance(self.p, bool) or not self.p > 0:
            raise ConfigError(f"method.p={self.p!r} is invalid: accepted a number > 0")
        if self.keep_bits is not None and (not isinstance(self.keep_bits, int) or isinstance(self.keep_bits, bool)
                                           or not 2 <= self.keep_bits <= 16):
            raise ConfigError(f"method.keep_bits={self.keep_bits!r} is invalid: accepted null or 2..16")
        if not isinstance(self.bn_calibration, bool):
            raise ConfigError(f"method.bn_calibration={self.bn_calibration!r} is invalid: accepted true, false")
        if not any(isinstance(m, QUANTIZABLE) for m in model.modules()):
            raise ConfigError("method=ptq needs a model with Conv2d or Linear layers")

    def compress(self, model: nn.Module, ctx: CompressContext) -> list[dict]:
        """Quantize the weights in place and insert activation quantizers (observed later)."""
        self.check(model)
        model.to(ctx.device)
        edges = edge_layers(model)

        def bits_for(name: str, module: nn.Module) -> int | tuple[int, int]:
            if self.keep_bits is not None and name in edges:
                return (self.keep_bits, self.keep_bits)
            return self.bits

        weight_scheme = {"symmetric": True, "clip": self.clip, "p": self.p, "per_channel": self.per_channel,
                         "ch_axis": 0}
        act_scheme = {"clip": self.act_clip, "p": self.p, "symmetric": False}
        return quantize_model(model, bits_for, self.act_bits, weight_scheme=weight_scheme, act_scheme=act_scheme)


def edge_layers(model: nn.Module) -> set[str]:
    """Names of the first Conv2d and the last Linear in ``named_modules`` order (stem and classifier)."""
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return set(convs[:1]) | set(linears[-1:])
