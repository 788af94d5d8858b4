"""CUDA against the CPU: solvers, observers, loaders and a whole run (``cuda`` tests skip without a GPU),
and the CPU side of ``python -m qaf.bench.gpu_check``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qaf.bench import gpu_check
from qaf.models.cifar_resnet import build
from qaf.quant.modules import ActQuantizer
from conftest import run_inprocess

CUDA = torch.device("cuda")


def solver_agreement(layer: str) -> dict[str, dict]:
    """:func:`qaf.bench.gpu_check.agreement` of the CPU and CUDA solutions of one ResNet-20 layer."""
    conv = build(20).get_submodule(layer)
    methods = {"cp": gpu_check.configured("admm_epc"), "qswd": gpu_check.configured("qswd")}
    cpu, _ = gpu_check.layer_solutions(conv, methods, torch.device("cpu"))
    other, _ = gpu_check.layer_solutions(conv, methods, CUDA, reference=cpu)
    return gpu_check.agreement(gpu_check.targets_of(conv, methods), cpu, other)


@pytest.mark.cuda
def test_solvers_on_cuda_agree_with_the_cpu() -> None:
    figures = solver_agreement("layer1.0.conv1")
    assert set(figures) == {"als", "epc", "admm", "qswd"}
    bad = {solver: fig for solver, fig in figures.items() if not fig["ok"]}
    assert not bad, f"out of tolerance {gpu_check.TOLERANCES}: {bad}"
    assert all(0 < fig["error_cpu"] < 1 for fig in figures.values())


@pytest.mark.cuda
def test_observer_on_cuda_matches_the_cpu_and_keeps_observing_after_a_merge() -> None:
    # The subsample is drawn by a CPU generator, so both devices keep the same values; the
    # priorities stay on the CPU through a merge of ranks' observations, so a later observation
    # can still be appended to them.
    x = torch.randn(4, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    samples, grids = {}, {}
    for device in ("cpu", "cuda"):
        q = ActQuantizer(4, clip="minmax", max_samples=2000, per_batch=1500).to(device)
        q.mode = "observe"
        q(x.to(device))
        q.observer.merge([q.observer.observation(), {k: v.cpu() for k, v in q.observer.observation().items()}])
        q(x.to(device) * 2)
        samples[device] = q.observer.sample()
        q.mode = "quant"
        grids[device] = q.grid
    assert samples["cuda"].device.type == "cuda"
    assert torch.equal(samples["cuda"].cpu(), samples["cpu"])
    assert torch.equal(grids["cuda"].scale.cpu(), grids["cpu"].scale)
    assert torch.equal(grids["cuda"].zero_point.cpu(), grids["cpu"].zero_point)


@pytest.mark.cuda
def test_loaders_pin_batches_for_the_gpu(shared_data: Path) -> None:
    from qaf.data import imagenet

    bundle = imagenet.folders(root=str(shared_data / "imagenet_val_1300"), calib_split="val", calib_samples=8,
                              eval_samples=8, batch_size=4, num_workers=1, seed=0)
    x, _, _ = next(iter(bundle.eval_loader()))
    assert x.is_pinned()


@pytest.mark.cuda
def test_predictions_of_a_model_on_cuda_match_the_cpu() -> None:
    from qaf.data import cifar10
    from qaf.export.rerun import predictions

    loader = cifar10.embedded(calib_samples=8, eval_samples=512, seed=0).eval_loader()
    cpu_pred, labels = predictions(build(20), loader)
    cuda_pred, cuda_labels = predictions(build(20).to(CUDA), loader)
    assert np.array_equal(labels, cuda_labels) and (cpu_pred != cuda_pred).sum() <= 2  # cuDNN may use TF32


@pytest.mark.cuda
def test_a_run_with_cuda_solvers_and_a_gpu_trainer_matches_the_cpu(tmp_path: Path, monkeypatch) -> None:
    # admm_epc on two layers of the embedded ResNet-20: solvers on CUDA and Lightning on the GPU,
    # against the same job on the CPU. The solver chains start from an SVD computed on each device
    # (singular vectors may differ in sign), and cuDNN convolutions may use TF32, so the results
    # agree closely rather than bit for bit.
    monkeypatch.chdir(tmp_path)
    common = ["method=admm_epc", "bits=4", "method.include=[layer1.0.conv1,layer3.2.conv2]",
              "data.calib_samples=256", "data.eval_samples=1000", "cache.enabled=false"]
    cpu = run_inprocess(*common, "device=cpu", "trainer.accelerator=cpu", "sweep_id=cpu")
    gpu = run_inprocess(*common, "device=cuda", "trainer.accelerator=gpu", "sweep_id=gpu")
    assert [layer["name"] for layer in gpu["layers"]] == ["layer1.0.conv1", "layer3.2.conv2"]
    for a, b in zip(cpu["layers"], gpu["layers"]):
        assert b["e_quant"] == pytest.approx(a["e_quant"], rel=0.05)
    assert abs(gpu["top1"] - cpu["top1"]) <= 1.0 and gpu["fp32_top1"] == pytest.approx(cpu["fp32_top1"], abs=0.2)


def test_agreement_flags_solutions_out_of_tolerance() -> None:
    target = torch.linspace(-1, 1, 64, dtype=torch.float64).reshape(4, 16)
    residual = 0.1 * torch.linspace(1, -1, 64, dtype=torch.float64).reshape(4, 16).sin()
    cpu = {"als": target + residual, "admm": target + residual}
    e_cpu = float(residual.norm() / target.norm())
    close = gpu_check.agreement({"als": target}, cpu, {"als": target + residual * (1 + 1e-6)})
    assert close["als"]["ok"] and close["als"]["error_cpu"] == pytest.approx(e_cpu)
    worse = gpu_check.agreement({"admm": target}, cpu, {"admm": target + 2 * residual})
    assert not worse["admm"]["ok"] and worse["admm"]["error_diff"] == pytest.approx(1.0)
    # the same error elsewhere: out of tolerance for a float solver, within it for a quantized one
    elsewhere = {solver: target + residual.flip(1) for solver in ("als", "admm")}
    moved = gpu_check.agreement({"als": target, "admm": target}, cpu, elsewhere)
    assert moved["als"]["error_diff"] == pytest.approx(0.0, abs=1e-12) and moved["als"]["distance"] > 0.01
    assert not moved["als"]["ok"] and moved["admm"]["ok"]


def test_a_one_step_nudge_moves_every_weight_by_one_float32_step() -> None:
    conv = build(20).get_submodule("layer1.0.conv1")
    other = gpu_check.nudged(conv)
    with torch.no_grad():
        assert (other.weight != conv.weight).all()
        assert torch.equal(torch.nextafter(conv.weight, other.weight), other.weight)  # the adjacent float32
        assert (other.weight > conv.weight).float().mean().item() == pytest.approx(0.5, abs=0.1)


@pytest.mark.slow
def test_gpu_check_without_cuda_runs_the_cpu_side_and_exits_0(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_check, "LAYERS", ("layer1.0.conv1",))
    out = tmp_path / "out" / "gpu_check.json"
    assert gpu_check.main(["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("skipped") == 1 and "no CUDA device" in printed
    result = json.loads(out.read_text())
    assert result["cuda"] is False and result["ok"] is True and "end_to_end" not in result
    layer = result["solvers"]["layer1.0.conv1"]
    assert layer["rank"] == 28 and set(layer["cpu_s"]) == {"als", "epc", "admm", "qswd"}
    assert "agreement" not in layer


@pytest.mark.slow
def test_gpu_check_end_to_end_job_runs_and_reports(tmp_path: Path, shared_data: Path) -> None:
    # The GPU job's command with tiny budgets on the CPU: the overrides compose and the figures parse.
    tiny = ["method.als_iters=1", "method.epc_iters=1", "method.epc_min_iters=1", "method.admm_outer=1",
            "method.include=[layer4.1.conv2]", "data.calib_samples=16", "data.eval_samples=32", "data.batch_size=16",
            "device=cpu", "trainer.accelerator=cpu", f"data.root={shared_data / 'imagenet_val_1300'}"]
    result = gpu_check.end_to_end(tmp_path, tiny)
    assert result["ok"] and result["layers"] == 1 and 0 < result["mean_e_quant"] < 1
    assert result["resnet18_admm_epc_s"] == result["timings"]["compress"] > 0
    assert result["eval_images_per_s"] > 0 and 0 <= result["top1"] <= 100
