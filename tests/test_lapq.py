"""method=lapq: p* fit guard, Powell never worse than its start, bias correction, clip sharing, data use,
incremental loss evaluations equal to whole forward passes."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from qaf.config import ConfigError
from qaf.data import DataBundle
from qaf.methods.base import CompressContext
from qaf.methods.lapq import LAPQ, calibration_batches, calibration_loss, fit_p_star
from qaf.quant.modules import ActQuantizer, QuantLayer, QuantReLU
from qaf.quant.policy import LayerPolicy

LAPQ_POLICY = LayerPolicy(name="lapq", stem="float", last_conv="float", classifier="float")
UNIFORM = LayerPolicy()


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU()  # reused twice, as in torchvision's BasicBlock

    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x)


def tiny_resnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Sequential(Block(8), Block(8)), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4)).eval()


class Forbidden(Dataset):
    """Evaluation set that must never be read during calibration."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i):
        raise AssertionError("LAPQ read an evaluation image")


def bundle(n: int = 48) -> DataBundle:
    g = torch.Generator().manual_seed(1)
    pool = TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g))
    same = {"train": lambda x: x, "eval": lambda x: x}
    return DataBundle("synthetic", pool, Forbidden(), same, 4, (3, 8, 8), calib_samples=n, seed=0, batch_size=16,
                      num_workers=0)


def ctx(policy: LayerPolicy = LAPQ_POLICY, progress: bool = False) -> CompressContext:
    return CompressContext(data=bundle(), device=torch.device("cpu"), policy=policy, progress=progress)


def run(model: nn.Module, progress: bool = False, policy: LayerPolicy = LAPQ_POLICY, **options) -> LAPQ:
    method = LAPQ(**{"bits": 3, "act_bits": 3, "calib_samples": 32, "batch_size": 16, "p_count": 4,
                     "placement": "input", **options})
    method.report = method.compress(model, ctx(policy, progress))
    return method


def whole_loss(model: nn.Module, batches: list) -> float:
    """The calibration loss of ``model`` as it is, by plain forward passes."""
    with torch.no_grad():
        return calibration_loss(batches, [model(x) for x, _ in batches])


def test_fit_p_star_guards() -> None:
    ps = np.linspace(2, 4, 10)
    p_star, _, fallback = fit_p_star(ps, (ps - 3.2) ** 2 + 1)
    assert p_star == pytest.approx(3.2) and fallback == ""
    concave = -((ps - 3.0) ** 2)
    assert fit_p_star(ps, concave)[2] == "non-convex fit" and fit_p_star(ps, concave)[0] in (2.0, 4.0)
    p_star, _, fallback = fit_p_star(ps, (ps - 5.0) ** 2)
    assert "outside" in fallback and p_star == 4.0


@pytest.mark.parametrize("maxiter", [1])
def test_powell_never_returns_a_loss_above_its_start(maxiter: int, caplog) -> None:
    model = tiny_resnet()
    with caplog.at_level(logging.INFO, logger="qaf"):
        method = run(model, progress=True, maxiter=maxiter)
    assert "lapq p-sweep over 4 p in [2, 4]" in caplog.text and "lapq Powell iteration 1" in caplog.text
    s = method.summary
    assert s["loss_final"] <= s["loss_p_star"]
    assert s["loss_evaluations"] > 1 + s["n_clips"]  # Powell really searched
    batches = calibration_batches(bundle(), 32, 16, torch.device("cpu"))
    assert whole_loss(model, batches) == pytest.approx(s["loss_final"], rel=1e-6)  # model holds the best


def test_layers_clips_and_float_policy() -> None:
    model = tiny_resnet()
    method = run(model, maxiter=0)
    assert method.summary["weight_clips"] == ["3.0.conv1", "3.0.conv2", "3.1.conv1"]  # first and last conv, Linear float
    assert not hasattr(model[0], "qaf_bits") and not hasattr(model[6], "qaf_bits")
    assert model[3][1].conv2.__class__ is nn.Conv2d
    assert method.summary["n_clips"] == 6 and method.summary["float_layers"] == ["0", "3.1.conv2", "6"]
    assert model[3][0].conv1.layer.qaf_bits == (3, 3)
    assert all(r["a_unsigned"] for r in method.report if "a_unsigned" in r)  # inputs are post-ReLU
    assert len(method.summary["p_sweep_loss"]) == 4


def test_bias_correction_removes_channel_mean_shift() -> None:
    for correct in (True, False):
        model = tiny_resnet()
        run(model, maxiter=0, bias_correction=correct)
        layer = model[3][0].conv1
        dims = (1, 2, 3)
        shift = (layer.layer.weight.mean(dims) - layer.weight_fp.mean(dims)).abs().max()
        assert (shift < 1e-6) == correct


def test_zero_free_grid_by_default() -> None:
    model = tiny_resnet()
    run(model, maxiter=0, bias_correction=False)
    assert not (model[3][0].conv1.layer.weight == 0).any()
    assert torch.unique(model[3][0].conv1.layer.weight).numel() <= 2**3
    model = tiny_resnet()
    run(model, maxiter=0, bias_correction=False, weight_grid="symmetric")
    assert torch.unique(model[3][0].conv1.layer.weight).numel() <= 2**3


def test_input_placement_shares_one_clip_between_layers_reading_one_tensor() -> None:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(weights=None).eval()
    layers, slots = LAPQ(bits=4, act_bits=4, placement="input").insert_quantizers(
        model, LAPQ_POLICY, torch.randn(2, 3, 32, 32))
    assert len(layers) == 18 and len(slots) == 15
    block = model.layer2[0]
    assert block.conv1.act is block.downsample[0].act
    assert isinstance(block.conv1.act, ActQuantizer) and isinstance(block.downsample[0], QuantLayer)


def test_reference_slots_on_resnet18_are_lapq_v2s_18_weight_and_15_activation_clips() -> None:
    # lapq_v2.py with its custom ResNet-18: convs[1:-1] (downsample convs included) and ReLUs[1:-1]
    # (separate relu1/relu2 per block), 33 Powell variables.
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(weights=None).eval()
    layers, slots = LAPQ(bits=4, act_bits=4).insert_quantizers(model, LAPQ_POLICY, torch.randn(2, 3, 32, 32))
    blocks = [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    convs = [f"{b}.conv{i}" for b in blocks for i in (1, 2)]
    downsample = {"layer2.0": "layer2.0.downsample.0", "layer3.0": "layer3.0.downsample.0",
                  "layer4.0": "layer4.0.downsample.0"}
    expected_w = [n for b in blocks for n in (f"{b}.conv1", f"{b}.conv2", downsample.get(b)) if n][:-1]
    assert list(layers) == expected_w and len(layers) == 18 and "conv1" not in layers and convs[-1] not in layers
    relus = [f"{b}.relu{i}" for b in blocks for i in (1, 2)]
    assert [s.owners[0] for s in slots] == relus[:-1] and len(slots) == 15  # stem relu and last relu2 float
    assert all(s.unsigned for s in slots)


def test_relu_placement_quantizes_what_the_identity_shortcut_reads() -> None:
    from qaf.calib import observing_activations, run_passes
    from qaf.models.cifar_resnet import build

    model = build(20)
    x = torch.randn(8, 3, 32, 32)
    _, slots = LAPQ(bits=4, act_bits=4).insert_quantizers(model, LAPQ_POLICY, x)
    assert len(slots) == 17 and isinstance(model.layer1[0].relu2, QuantReLU)
    with observing_activations(model):
        run_passes(model, [(x,)])
    seen = {}
    model.layer1[1].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model(x)
    # block layer1.1's input: its conv1 and its identity shortcut both read the quantized tensor
    grid = model.layer1[0].relu2.act.grid
    assert torch.equal(grid(seen["x"]), seen["x"]) and seen["x"].unique().numel() <= 16


def test_uniform_policy_puts_lapq_and_ptq_on_the_same_bops() -> None:
    from qaf.methods.ptq import PTQ
    from qaf.metrics.bops import layer_costs
    from qaf.models.cifar_resnet import build

    bops = {}
    for name, method in (("lapq", LAPQ(bits=4, act_bits=4)), ("ptq", PTQ(bits=4, act_bits=4))):
        model = build(20)
        if name == "lapq":
            method.insert_quantizers(model, UNIFORM, torch.randn(4, 3, 32, 32))
        else:
            method.compress(model, ctx(UNIFORM))
        bops[name] = {c.name: (c.w_bits, c.a_bits) for c in layer_costs(model, (3, 32, 32))}
    assert bops["lapq"] == bops["ptq"]
    assert bops["ptq"]["conv1.layer"] == (8, 8) and bops["ptq"]["linear.layer"] == (8, 8)
    assert bops["ptq"]["layer1.0.conv1.layer"] == (4, 4) and bops["ptq"]["layer3.2.conv2.layer"] == (4, 4)


@pytest.mark.parametrize("options,key", [({"weight_grid": "zero"}, "method.weight_grid"),
                                         ({"maxiter": -1}, "method.maxiter"),
                                         ({"p_min": 4.0, "p_max": 2.0}, "method.p_max"),
                                         ({"placement": "output"}, "method.placement"),
                                         ({"calib_samples": 100}, "method.calib_samples")])
def test_bad_options_raise_config_error(options, key) -> None:
    with pytest.raises(ConfigError, match=key):
        LAPQ(**options).check(tiny_resnet(), ctx())


def test_everything_quantized_when_the_policy_says_so() -> None:
    model = tiny_resnet()
    policy = LayerPolicy(name="all", stem="bits", classifier="bits")
    method = run(model, maxiter=0, policy=policy)
    assert method.summary["weight_clips"] == ["0", "3.0.conv1", "3.0.conv2", "3.1.conv1", "3.1.conv2", "6"]
    assert method.summary["float_layers"] == []
    stem = next(r for r in method.report if r["name"] == "0" and "a_unsigned" in r)
    assert not stem["a_unsigned"]  # the image input is signed: symmetric grid
    assert model[0].act.grid.bounds()[0] < 0


def prepared(build, placement: str, policy: LayerPolicy, size: int) -> SimpleNamespace:
    """A model built by ``build()`` with LAPQ's quantizers, observed on two random batches: the model,
    batches, weight clip names, max-abs clips, LAPQ's objective, and a function applying all clips."""
    model = build().eval()
    x = torch.randn(16, 3, size, size, generator=torch.Generator().manual_seed(2))
    batches = [(x[i:i + 8], torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(i)))
               for i in range(0, 16, 8)]
    method = LAPQ(bits=3, act_bits=3, placement=placement)
    layers, slots = method.insert_quantizers(model, policy, x[:2])
    for slot in slots:
        slot.quantizer.mode = "observe"
    whole_loss(model, batches)
    alphas = method.clips(layers, slots, [slot.quantizer.observer.sample() for slot in slots], None)
    return SimpleNamespace(model=model, batches=batches, weight_clips=list(layers), alphas=alphas,
                           loss=method.objective(model, layers, slots, batches),
                           apply_all=lambda a: method._apply(layers, slots, a, np.arange(a.size)))


def cifar_resnet20() -> nn.Module:
    from qaf.models.cifar_resnet import build

    return build(20)


def torchvision_resnet18() -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10)


@pytest.mark.parametrize("build,placement,policy,size", [
    (tiny_resnet, "input", UNIFORM, 8),
    (tiny_resnet, "relu", UNIFORM, 8),
    (cifar_resnet20, "relu", LAPQ_POLICY, 16),
    (torchvision_resnet18, "relu", LAPQ_POLICY, 32),
    (torchvision_resnet18, "input", UNIFORM, 32),
], ids=["tiny-input-uniform", "tiny-relu-uniform", "resnet20-relu-lapq", "resnet18-relu-lapq",
        "resnet18-input-uniform"])
def test_incremental_loss_equals_a_whole_forward_of_an_independent_copy(build, placement, policy, size) -> None:
    # The reusing loss on one model against plain forward passes of a second, identically built
    # model on which every clip is applied afresh: equal bit for bit, for random clip changes
    # (one or a few clips, revisited points, everything at once).
    run, twin = prepared(build, placement, policy, size), prepared(build, placement, policy, size)
    loss = run.loss
    assert loss.forward is not None
    rng = np.random.default_rng(0)
    points = [run.alphas]
    for step in range(10):
        a = points[-1].copy()
        if step % 4 == 3:
            a = points[rng.integers(len(points))]  # a point seen before
        elif step == 5:
            a = a * rng.uniform(0.7, 1.1, a.size)  # every clip at once
        else:
            for i in rng.choice(a.size, size=rng.integers(1, 3), replace=False):
                a[i] *= rng.uniform(0.5, 1.1)
        points.append(a)
        twin.apply_all(a)
        assert loss(a) == whole_loss(twin.model, twin.batches)
    assert loss.repeated >= 2


def test_incremental_loss_runs_only_what_a_change_reaches() -> None:
    run = prepared(tiny_resnet, "input", UNIFORM, 8)
    calls = {name: 0 for name in ("0", "3.0.conv1", "3.1.conv2", "6")}
    for name in calls:
        run.model.get_submodule(name).register_forward_pre_hook(
            lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
    run.loss(run.alphas)
    assert set(calls.values()) == {len(run.batches)}
    a = run.alphas.copy()
    a[run.weight_clips.index("3.1.conv2")] *= 0.8  # the last conv's clip: the stem and first block are not rerun
    run.loss(a)
    assert calls == {"0": 2, "3.0.conv1": 2, "3.1.conv2": 4, "6": 4}
    a[run.weight_clips.index("6")] *= 0.8  # the classifier's: only the classifier reruns
    run.loss(a)
    assert calls == {"0": 2, "3.0.conv1": 2, "3.1.conv2": 4, "6": 6}
    run.loss(run.alphas)  # seen before: answered from memory, nothing runs
    assert calls == {"0": 2, "3.0.conv1": 2, "3.1.conv2": 4, "6": 6} and run.loss.repeated == 1
    assert whole_loss(run.model, run.batches) == run.loss(run.alphas)  # the model carries the clips asked for


class Doubling(nn.Module):
    """Modifies its input in place (not idempotent, unlike an in-place ReLU)."""

    def forward(self, x):
        return x.mul_(2)


def test_incremental_forward_copies_values_that_are_modified_in_place() -> None:
    from qaf.quant.incremental import IncrementalForward

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), QuantLayer(nn.Linear(4, 4), 8, 8, act=Doubling()), nn.Linear(4, 3))
    inputs = [torch.randn(5, 4), torch.randn(5, 4)]
    forward = IncrementalForward(model, [["0"], ["1"], ["2"]], inputs)
    layers = [model[0], model[1].layer, model[2]]
    values = np.zeros(3)
    for i in (0, 1, 1, 2, 1, 0, 1):  # the doubling layer's input is kept for passes starting there
        values[i] += 1
        with torch.no_grad():
            layers[i].weight.mul_(0.9)
            expected = [model(x) for x in inputs]
        assert all(torch.equal(a, b) for a, b in zip(forward.outputs(values), expected, strict=True))
    assert [n.target for n in forward.copied] == ["0"]


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        out = self.conv(x)
        if out.mean() > 0:  # torch.fx cannot trace this
            out = -out
        return self.fc(out.mean((2, 3)))


def test_a_model_fx_cannot_trace_is_evaluated_whole(caplog) -> None:
    model = DataDependent().eval()
    with caplog.at_level(logging.INFO, logger="qaf"):
        method = run(model, progress=True, maxiter=1, policy=LayerPolicy(name="all", stem="bits", classifier="bits"))
    assert "does not trace with torch.fx" in caplog.text and method.summary["incremental"] is False
    batches = calibration_batches(bundle(), 32, 16, torch.device("cpu"))
    assert whole_loss(model, batches) == pytest.approx(method.summary["loss_final"], rel=1e-6)
