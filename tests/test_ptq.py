"""method=ptq: which layers get which bits, option checks, and accuracy on the embedded default."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qaf.config import ConfigError
from qaf.methods.base import CompressContext
from qaf.methods.ptq import PTQ
from qaf.quant.modules import QuantLayer, set_act_mode


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 5)).eval()


def ctx() -> CompressContext:
    return CompressContext(data=None, device=torch.device("cpu"))


@pytest.mark.parametrize("keep_bits", [8, None])
@pytest.mark.parametrize("per_channel", [False, True])
def test_first_conv_and_classifier_kept_at_keep_bits(keep_bits, per_channel) -> None:
    model = net()
    report = PTQ(bits=3, act_bits=5, keep_bits=keep_bits, per_channel=per_channel).compress(model, ctx())
    bits = {r["name"]: (r["w_bits"], r["a_bits"]) for r in report}
    edge = (keep_bits, keep_bits) if keep_bits else (3, 5)
    assert bits == {"0": edge, "3": (3, 5), "6": (3, 5), "10": (3, 5), "12": edge}
    assert all(isinstance(model[int(n)], QuantLayer) for n in bits)
    assert torch.unique(model[3].layer.weight).numel() <= 2**3 * (8 if per_channel else 1)
    assert model[1].qaf_bits == (8, 8)


@pytest.mark.parametrize("clip", ["minmax", "mse", "lp", "aciq"])
def test_observe_then_quant_is_close_to_float_at_8_bits(clip) -> None:
    model, ref = net(), net()
    x = torch.randn(32, 3, 8, 8)
    PTQ(bits=8, act_bits=8, clip=clip, act_clip=clip).compress(model, ctx())
    set_act_mode(model, "observe")
    with torch.no_grad():
        model(x)
    set_act_mode(model, "quant")
    with torch.no_grad():
        out, want = model(x), ref(x)
    assert not torch.equal(out, want)
    assert (out - want).abs().max() < 0.05 * want.abs().max()


@pytest.mark.parametrize("options,key", [({"clip": "kl"}, "method.clip"), ({"act_clip": "max"}, "method.act_clip"),
                                         ({"keep_bits": 1}, "method.keep_bits"), ({"p": -1.0}, "method.p"),
                                         ({"per_channel": "yes"}, "method.per_channel")])
def test_bad_options_raise_config_error(options, key) -> None:
    with pytest.raises(ConfigError, match=key):
        PTQ(**options).check(net())


def test_embedded_resnet20_w8a8_close_to_fp32(shared_data) -> None:
    from qaf.data.cifar10 import embedded
    from qaf.models.cifar_resnet import build

    data = embedded(calib_samples=256, eval_samples=None, batch_size=256)  # all 846 images

    def top1(model: nn.Module) -> float:
        with torch.no_grad():
            hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in data.eval_loader())
        return 100 * hits / len(data.eval)

    fp32 = top1(build(20))
    model = build(20)
    PTQ(bits=8, act_bits=8).compress(model, CompressContext(data=data, device=torch.device("cpu")))
    set_act_mode(model, "observe")
    with torch.no_grad():
        for x, _ in data.calib_loader():
            model(x)
    set_act_mode(model, "quant")
    assert abs(top1(model) - fp32) <= 0.5
