"""The deployable form (qaf.export.deploy): batch norms folded exactly, additions and biases on grids,
and ``deploy_top1`` in metrics.json beside the run's unchanged ``top1``."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from qaf.export.deploy import calibrating_on, deployable
from qaf.export.rerun import compose, compressed_model
from qaf.quant.modules import QuantLayer

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

EVAL, CALIB = 1024, 64
FAMILIES = {
    "ptq": ["method=ptq"],
    "admm_epc": ["method=admm_epc", "method.als_iters=5", "method.epc_iters=5", "method.epc_min_iters=2",
                 "method.admm_outer=2", "method.admm_inner=2"],
}
# The end-to-end tests of PTQ run in make test-all; the CP family's (its models hold PTQ's layers
# too) in the default suite, its ONNX there at onnxruntime's default level only.
HEAVY_PARAMS = [pytest.param("ptq", marks=pytest.mark.slow), "admm_epc"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache_dir(factor_cache) -> Path:
    return factor_cache  # factorizations shared with the other export/deploy tests


def _cfg(cache: Path, *overrides: str, eval_samples: int = EVAL):
    return compose(*overrides, f"data.eval_samples={eval_samples}", f"data.calib_samples={CALIB}", f"cache.dir={cache}",
                   "logger=none", "device=cpu", "progress=false")


@pytest.fixture(scope="module")
def compressed(cache_dir):
    """family -> (model, data), compressed and calibrated once per module."""
    done: dict[str, tuple] = {}

    def get(family: str):
        if family not in done:
            done[family] = compressed_model(_cfg(cache_dir, *FAMILIES[family]))
        return done[family]

    return get


def _affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale.detach(), (bn.bias - bn.running_mean * scale).detach()


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float rounding: 1e-5 of the largest magnitude."""
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


@torch.no_grad()
def test_folded_float_model_computes_the_unfolded_one(cache_dir):
    model, data = compressed_model(_cfg(cache_dir, "method=fp32"))
    form = deployable(model, lambda _: None)
    assert form.deploy_summary["batch_norms_folded"] == 19
    assert not any(isinstance(m, nn.BatchNorm2d) for m in form.modules())
    images = data.eval.images[:256]
    _close(form(images), model(images))


@torch.no_grad()
def test_folding_into_a_quantized_conv_keeps_its_codes_and_is_exact(compressed):
    model, data = compressed("ptq")
    conv, bn = copy.deepcopy(model.conv1), model.bn1
    before = conv.weight_codes()
    conv.fold_affine(*_affine(bn))
    after = conv.weight_codes()
    assert torch.equal(before[1], after[1])  # the same integer codes, per-channel scales
    assert after[0].scale.shape == (16, 1, 1, 1)
    images = data.eval.images[:64]
    _close(conv(images), bn(model.conv1(images)))


@torch.no_grad()
def test_a_cp_layer_folds_its_batch_norm_into_its_last_sub_conv(compressed):
    model, data = compressed("admm_epc")
    block = model.layer1[0]
    convs = copy.deepcopy(block.conv1).deploy_module()
    assert [name for name, _ in convs.named_children()] == ["pointwise_in", "depthwise", "pointwise_out"]
    convs.pointwise_out.fold_affine(*_affine(block.bn1))
    x = torch.relu(model.bn1(model.conv1(data.eval.images[:64])))
    _close(convs(x), block.bn1(block.conv1(x)))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_deployable_form_puts_additions_and_biases_on_grids(compressed, family):
    model, data = compressed(family)
    state = copy.deepcopy(model.state_dict())
    form = deployable(model, calibrating_on(data.calib_loader()))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # the model is left alone
    summary = form.deploy_summary
    assert summary["batch_norms_folded"] == 19 and summary["additions_on_grids"] == 9
    assert summary["additions_in_float"] == 0
    calls = [n for n in form.graph.nodes if n.op == "call_module"]
    with_bias = [(form.get_submodule(n.target), form.get_submodule(n.args[0].target)) for n in calls
                 if isinstance(form.get_submodule(n.target), QuantLayer)
                 and form.get_submodule(n.target).layer.bias is not None]
    assert summary["biases_on_grids"] == len(with_bias) > 0
    for layer, quantizer in with_bias:  # on the int32 grid of step input scale x weight scale
        bias = layer.layer.bias.detach()
        assert torch.equal(layer.bias_grid(bias), bias) and layer.bias_grid.qmax == 2**31 - 1
        assert torch.equal(layer.bias_grid.scale.reshape(-1), (quantizer.grid.scale * layer.weight_grid.scale).reshape(-1))


@pytest.mark.parametrize("family, level, n", [  # n: evaluation images (the form runs slowly in PyTorch)
    pytest.param("ptq", "basic", EVAL, marks=pytest.mark.slow), pytest.param("ptq", "all", EVAL, marks=pytest.mark.slow),
    pytest.param("admm_epc", "basic", EVAL, marks=pytest.mark.slow), ("admm_epc", "all", 512)])
def test_onnx_of_the_deployable_form_runs_on_integer_kernels_and_scores_like_pytorch(compressed, family, level, n,
                                                                                       tmp_path):
    from qaf.export.onnx import export_onnx, kernel_counts, onnx_logits, session

    model, data = compressed(family)
    form = deployable(model, calibrating_on(data.calib_loader()))
    export_onnx(form, tmp_path / "deploy.onnx")
    images, labels = data.eval.images[:n], torch.tensor(data.eval.labels[:n])
    with torch.no_grad():
        expected = torch.cat([form(images[i:i + 256]) for i in range(0, len(images), 256)]).argmax(1)
    optimized = tmp_path / f"{level}.onnx"
    got = onnx_logits(session(tmp_path / "deploy.onnx", level=level, optimized_path=optimized), images).argmax(1)
    # The convs match onnxruntime's integer kernels code for code; its QLinearAdd requantizes
    # with fixed-point multipliers, which rounds a few sums per million the other way, and in
    # the deep CP network these one-code differences grow (docs/export.md, "The deployable form").
    min_agree = 0.99 if level == "all" and family != "ptq" else 0.995
    assert float((got == expected).float().mean()) >= min_agree
    assert abs(float((got == labels).float().mean() - (expected == labels).float().mean())) <= 0.003
    if level == "all":  # onnxruntime's fusions: every layer on integer kernels
        layers = sum(isinstance(m, QuantLayer) for m in form.modules())  # every conv and the linear layer
        assert kernel_counts(optimized) == {"integer": layers, "float": 0}
        ops = [node.op_type for node in onnx.load(str(optimized)).graph.node]
        assert ops.count("QLinearAdd") == form.deploy_summary["additions_on_grids"] == 9


@pytest.mark.parametrize("family", HEAVY_PARAMS)
def test_run_records_deploy_top1_beside_an_unchanged_top1(cache_dir, compressed, tmp_path, monkeypatch, family):
    from qaf.data.cifar10 import embedded
    from qaf.pipeline import run

    monkeypatch.chdir(tmp_path)
    n = 256  # the pipeline's wiring; agreement on 1,024 images is the ONNX test's
    metrics = run(_cfg(cache_dir, *FAMILIES[family], f"sweep_id={family}", eval_samples=n))
    model = compressed(family)[0]  # the same compression, done apart from the run
    images = embedded(calib_samples=CALIB, eval_samples=n).eval
    with torch.no_grad():
        top1 = 100 * float((model(images.images).argmax(1) == torch.tensor(images.labels)).float().mean())
    assert round(top1, 4) == metrics["top1"]
    deploy, vs = metrics["deploy_top1"], metrics["deploy_vs_top1"]
    lo, hi = metrics["deploy_top1_ci95"]
    assert lo <= deploy <= hi
    assert vs["n"] == n and vs["diff"] == pytest.approx(deploy - metrics["top1"], abs=1e-3)
    assert vs["a_only"] + vs["b_only"] <= 0.03 * n  # the two forms disagree on few images
    assert metrics["deploy"]["batch_norms_folded"] == 19 and {"deploy", "deploy_eval"} <= set(metrics["timings"])
