"""method=ptq: which layers get which bits, option checks, and accuracy on the embedded default."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qaf.config import ConfigError
from qaf.methods.base import CompressContext
from qaf.methods.ptq import PTQ
from qaf.calib import observing_activations, run_passes
from qaf.quant.modules import QuantLayer
from qaf.quant.policy import LayerPolicy


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 5)).eval()


def ctx(policy: LayerPolicy | None = None) -> CompressContext:
    return CompressContext(data=None, device=torch.device("cpu"), policy=policy or LayerPolicy())


@pytest.mark.parametrize("treatment", ["keep", "bits", "float"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_policy_decides_stem_and_classifier_bits(treatment, per_channel) -> None:
    model = net()
    policy = LayerPolicy(name="t", stem=treatment, classifier=treatment, keep_bits=6)
    report = PTQ(bits=3, act_bits=5, per_channel=per_channel).compress(model, ctx(policy))
    bits = {r["name"]: (r["w_bits"], r["a_bits"]) for r in report}
    edge = {"keep": {"0": (6, 6), "12": (6, 6)}, "bits": {"0": (3, 5), "12": (3, 5)}, "float": {}}[treatment]
    assert bits == {"3": (3, 5), "6": (3, 5), "10": (3, 5), **edge}
    assert all(isinstance(model[int(n)], QuantLayer) for n in bits)
    assert torch.unique(model[3].layer.weight).numel() <= 2**3 * (8 if per_channel else 1)
    assert model[1].qaf_bits == (8, 8)


@pytest.mark.parametrize("clip", ["minmax", "mse", "lp", "aciq"])
def test_observe_then_quant_is_close_to_float_at_8_bits(clip) -> None:
    model, ref = net(), net()
    x = torch.randn(32, 3, 8, 8)
    PTQ(bits=8, act_bits=8, clip=clip, act_clip=clip).compress(model, ctx())
    with torch.no_grad(), observing_activations(model):
        model(x)
    with torch.no_grad():
        out, want = model(x), ref(x)
    assert not torch.equal(out, want)
    assert (out - want).abs().max() < 0.05 * want.abs().max()


@pytest.mark.parametrize("options,key", [({"clip": "kl"}, "method.clip"), ({"act_clip": "max"}, "method.act_clip"),
                                         ({"p": -1.0}, "method.p"), ({"per_channel": "yes"}, "method.per_channel"),
                                         ({"nosuch": 1}, "method.nosuch")])
def test_bad_options_raise_config_error(options, key) -> None:
    with pytest.raises(ConfigError, match=key):
        PTQ(**options).check(net(), ctx())


def test_embedded_resnet20_w8a8_close_to_fp32() -> None:
    from qaf.data.cifar10 import embedded
    from qaf.models.cifar_resnet import build

    data = embedded(calib_samples=256, eval_samples=1000, batch_size=250)

    def top1(model: nn.Module) -> float:
        with torch.no_grad():
            hits = sum(int((model(x).argmax(1) == y).sum()) for x, y, _ in data.eval_loader())
        return 100 * hits / len(data.eval)

    fp32 = top1(build(20))
    model = build(20)
    PTQ(bits=8, act_bits=8).compress(model, CompressContext(data=data, device=torch.device("cpu")))
    with observing_activations(model):
        run_passes(model, data.calib_loader())
    assert abs(top1(model) - fp32) <= 0.5
