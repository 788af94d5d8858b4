"""Scale-out: `trainer.devices=2` on the CPU (DDP over gloo) gives the single-process metrics.

Calibration and evaluation run in two processes, each on whole batches of the single-process run
(uneven: 3 calibration batches, 7 evaluation batches); batch-norm statistics and activation
observations are merged across ranks, and every image is scored exactly once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["logger=none", "progress=false", "trainer.accelerator=cpu", "data.eval_samples=650",
          "data.calib_samples=300", "data.batch_size=100", "cache.enabled=false"]
METHODS = {
    "ptq": ["method=ptq"],
    "admm_epc": ["method=admm_epc", "method.include=[layer3.*]", "method.als_iters=5", "method.epc_iters=5",
                 "method.epc_min_iters=2", "method.admm_outer=2"],
}


def run(args: list[str], out: Path) -> dict:
    # Same thread count in every process: the solvers' float sums are then bitwise reproducible.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), *args, f"hydra.run.dir={out}"], cwd=out.parent,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow  # four fresh processes (so is test_sweeps' resume in two DDP processes)
@pytest.mark.parametrize("method", METHODS)
def test_two_processes_reproduce_the_single_process_metrics(method: str, tmp_path: Path) -> None:
    single = run([*METHODS[method], *COMMON, "trainer.devices=1"], tmp_path / "single")
    ddp = run([*METHODS[method], *COMMON, "trainer.devices=2"], tmp_path / "ddp")
    assert ddp["config_hash"] == single["config_hash"]  # devices do not change what is computed
    for key in ("top1", "top5", "top1_ci95", "vs_fp32", "bops", "size_bytes", "eval_samples"):
        assert ddp[key] == single[key], key
    assert ddp["eval_samples"] == 650
    assert not (tmp_path / "ddp" / "failed.json").exists()
