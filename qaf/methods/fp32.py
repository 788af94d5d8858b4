"""``method=fp32``: nothing compressed; the float reference."""

from __future__ import annotations

from torch import nn

from qaf.methods.base import CompressContext, Method
from qaf.results import MethodInfo


class FP32(Method):
    """Leave the model in float (BOPs counted at 32x32 bits): the reference of every report."""

    name = "fp32"
    info = MethodInfo(display="Float", reference=True, order=0)

    def compress(self, model: nn.Module, ctx: CompressContext) -> list[dict]:
        return []
