"""`python run.py` end to end on the embedded default (subprocesses, as a user runs it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli


def metrics_files(root: Path) -> list[Path]:
    return sorted(root.glob("multirun_outputs/*/**/metrics.json"))


def load_single(root: Path) -> dict:
    (path,) = metrics_files(root)
    return json.loads(path.read_text())


def test_fp32_scores_the_published_91_73(tmp_path: Path):
    result = run_cli(["method=fp32", "logger=csv", "progress=false"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = load_single(tmp_path)
    assert round(metrics["top1"], 2) == 91.73  # 776 of the 846 lossless test images
    assert metrics["fp32_top1"] == metrics["top1"]
    assert metrics["bops_pct"] == pytest.approx(100.0)
    assert metrics["macs"] == metrics["fp32_macs"] > 40_000_000  # ResNet-20 is about 41M MACs
    required = {"method", "model", "data", "bits", "act_bits", "rate", "seed", "top1", "top5", "fp32_top1",
                "macs", "fp32_macs", "bops", "bops_pct", "params", "compressed_bits", "layers", "timings"}
    assert required <= set(metrics)
    assert metrics["model"] == "resnet20_cifar" and metrics["data"] == "cifar10_embedded"
    assert list(tmp_path.glob("multirun_outputs/*/csv/*/metrics.csv"))


def test_ptq_run_logs_to_wandb_offline(tmp_path: Path):
    args = ["method=ptq", "bits=8", "sweep_id=ptq8", "data.eval_samples=128", "data.calib_samples=128",
            "progress=false"]
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "multirun_outputs" / "ptq8"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "ptq" and metrics["bits"] == 8
    assert 0 < metrics["bops_pct"] < 100 * 64 / 1024 + 1e-9  # every layer at 8x8 bits or less
    assert metrics["layers"] and all("name" in layer for layer in metrics["layers"])
    assert abs(metrics["top1"] - metrics["fp32_top1"]) < 5
    assert list(out.glob("wandb/offline-run-*/run-*.wandb")), "W&B offline run missing"


def test_failed_run_leaves_no_metrics(tmp_path: Path):
    missing = tmp_path / "nope.th"
    result = run_cli(["method=ptq", f"model.checkpoint={missing}", "logger=none"], cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert "model.checkpoint" in result.stderr and "Traceback" not in result.stderr
    assert not metrics_files(tmp_path)


def test_imagenet_folders_and_torchvision_resnet18_end_to_end(tmp_path: Path, shared_data: Path):
    # The real ImageNet path: torchvision ResNet-18 (random init: no pretrained weights offline)
    # on class folders labelled through the canonical WNID list, at 224x224.
    root = shared_data / "imagenet_val_1300"
    result = run_cli(["method=ptq", "bits=8", "model=resnet18", "model.pretrained=false", "data=imagenet",
                      f"data.root={root}", "data.calib_split=val", "data.calib_samples=8", "data.eval_samples=16",
                      "data.batch_size=8", "data.num_workers=0", "logger=none", "progress=false"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = load_single(tmp_path)
    assert metrics["data"] == "imagenet" and metrics["model"] == "resnet18"
    assert metrics["fp32_macs"] == 1_819_040_768
    assert metrics["bops_pct"] < 100 * 64 / 1024 + 1e-9
