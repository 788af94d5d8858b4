"""Real sweeps on the embedded default (tiny sample sizes), their reports, resume and launchers.

Each sweep runs ``python run.py -m ...`` in a subprocess, as a user would, into a temporary sweep
directory with its own factor cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from qaf.report import build_report
from qaf.report.collect import FAILED, NOT_STARTED, OK, collect_sweep

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.eval_samples=64", "data.calib_samples=64", "logger=csv", "progress=false"]
EXPERIMENTS = sorted(p.stem for p in (REPO / "experiments").glob("*.yaml"))


def run_qaf(args: list[str], sweep_dir: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python run.py -m ARGS`` into ``sweep_dir`` (factor cache beside it)."""
    cmd = [sys.executable, "run.py", "-m", *args, f"hydra.sweep.dir={sweep_dir}",
           f"cache.dir={sweep_dir.parent / 'cache'}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def metrics_files(sweep_dir: Path) -> dict[str, Path]:
    """Each job's metrics.json, by job directory name."""
    return {p.parent.name: p for p in sweep_dir.glob("*/metrics.json")}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``method=fp32,ptq bits=4,8`` on 64 evaluation and 64 calibration images."""
    sweep_dir = tmp_path_factory.mktemp("sweep") / "sweep"
    proc = run_qaf(["method=fp32,ptq", "bits=4,8", *TINY], sweep_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep_dir


def test_every_job_writes_metrics(sweep: Path) -> None:
    files = metrics_files(sweep)
    assert len(files) == 4
    for path in files.values():
        m = json.loads(path.read_text())
        assert m["data"] and m["model"] and 0.0 <= m["top1"] <= 100.0
        assert m["method"] in {"fp32", "ptq"} and m["bits"] in {4, 8}


def test_report_of_real_sweep(sweep: Path, tmp_path: Path) -> None:
    report = build_report([sweep], tmp_path)
    assert [j.status for j in report.jobs] == [OK] * 4
    assert [(r.method, r.w_bits, r.a_bits) for r in report.rows] == [
        ("fp32", 32, 32), ("ptq", 4, 8), ("ptq", 8, 8)]
    fp32 = report.rows[0]
    measured = {json.loads(p.read_text())["fp32_top1"] for p in metrics_files(sweep).values()}
    assert len(measured) == 1 and fp32.top1 == pytest.approx(measured.pop())
    assert fp32.bops_pct == pytest.approx(100.0)
    ptq4, ptq8 = report.rows[1:]
    assert ptq4.bops_pct < ptq8.bops_pct < 100.0
    assert "4 of 4 jobs finished" in report.markdown
    for name in ("results.csv", "table.md", "table.tex", "pareto.png", "index.html"):
        assert (tmp_path / name).stat().st_size > 0


def test_rerun_skips_finished_jobs_and_reruns_killed_one(sweep: Path) -> None:
    files = metrics_files(sweep)
    killed = sorted(files)[0]
    files[killed].unlink()  # what a job killed before its atomic write leaves behind
    before = {name: p.stat().st_mtime_ns for name, p in files.items() if name != killed}
    proc = run_qaf(["method=fp32,ptq", "bits=4,8", *TINY], sweep)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = metrics_files(sweep)
    assert set(after) == set(files)
    assert {name: after[name].stat().st_mtime_ns for name in before} == before
    for name in before:
        assert "skipped" in (sweep / name / "run.log").read_text()
    assert "skipped" not in (sweep / killed / "run.log").read_text()


def test_failed_job_and_unstarted_jobs_are_listed(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    # bits=1 is rejected before any work; the sequential sweep stops there.
    proc = run_qaf(["method=fp32", "bits=4,1,8", *TINY], sweep_dir)
    assert proc.returncode != 0
    jobs = {j.setting("bits"): j for j in collect_sweep(sweep_dir)}
    assert jobs[4].status == OK
    assert jobs[1].status == FAILED and "bits" in jobs[1].error
    assert jobs[8].status == NOT_STARTED and jobs[8].path is None
    report = build_report([sweep_dir], sweep_dir)
    assert "failed: " in report.markdown and "not started: " in report.markdown


def test_joblib_launcher_two_jobs(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    proc = run_qaf(["method=fp32,ptq", "bits=4", *TINY, "hydra/launcher=joblib",
                    "hydra.launcher.n_jobs=2"], sweep_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    assert len(metrics_files(sweep_dir)) == 2


def test_submitit_local_launcher(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    proc = run_qaf(["method=fp32,ptq", "bits=4", *TINY, "hydra/launcher=submitit_local",
                    "hydra.launcher.timeout_min=10"], sweep_dir, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(metrics_files(sweep_dir)) == 2
    assert (sweep_dir / ".submitit").is_dir()
    assert [j.status for j in collect_sweep(sweep_dir)] == [OK, OK]  # .submitit is no job


@pytest.fixture
def hydra_conf() -> Iterator[None]:
    """Hydra's compose API on the repository's conf/."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_as_a_sweep(name: str, hydra_conf: None) -> None:
    cfg = compose("config", overrides=[f"experiment={name}"], return_hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    params = cfg.hydra.sweeper.params
    assert params and "method" in params
    for method in str(params.method).split(","):
        assert (REPO / "conf" / "method" / f"{method.strip()}.yaml").is_file(), method


def test_paper_experiments_share_one_sweep_and_paper_numbers(hydra_conf: None) -> None:
    ids = {compose("config", overrides=[f"experiment={name}"]).sweep_id
           for name in ("paper_resnet18_imagenet", "paper_resnet18_imagenet_baselines")}
    assert ids == {"paper_resnet18_imagenet"}
    cfg = compose("config", overrides=["experiment=paper_resnet18_imagenet"],
                  return_hydra_config=True)
    assert cfg.hydra.runtime.choices.model == "resnet18"
    assert cfg.hydra.runtime.choices.data == "imagenet"
    assert (REPO / "experiments" / "paper_resnet18_imagenet.paper.csv").is_file()
