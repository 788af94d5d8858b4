"""Real sweeps on the embedded default (tiny sample sizes), their reports, resume and launchers.

Each sweep runs ``python run.py -m ...`` as a user would (in a subprocess, or in this process through
``run_main``: the same main, Hydra and basic launcher), into a temporary sweep directory with its
own factor cache.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import run_main
from qaf.report import build_report
from qaf.report.collect import KILLED, OK, collect_sweep

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.eval_samples=64", "data.calib_samples=64", "logger=csv", "progress=false"]
EXPERIMENTS = sorted(p.stem for p in (REPO / "experiments").glob("*.yaml"))


def run_qaf(args: list[str], sweep_dir: Path, timeout: int = 300, wandb: str = "disabled") -> subprocess.CompletedProcess:
    """``python run.py -m ARGS`` into ``sweep_dir`` (factor cache beside it)."""
    cmd = [sys.executable, "run.py", "-m", *args, f"hydra.sweep.dir={sweep_dir}",
           f"cache.dir={sweep_dir.parent / 'cache'}"]
    env = {**os.environ, "WANDB_MODE": wandb, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def metrics_files(sweep_dir: Path) -> dict[str, Path]:
    """Each job's metrics.json, by job directory name."""
    return {p.parent.name: p for p in sweep_dir.glob("*/metrics.json")}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """``method=fp32,ptq bits=4,8`` on 64 evaluation and 64 calibration images, in one process with
    the basic launcher and the default logger (W&B, offline), as users run it."""
    sweep_dir = tmp_path_factory.mktemp("sweep") / "sweep"
    proc = run_qaf(["method=fp32,ptq", "bits=4,8", *TINY[:-2], "sweep_id=wb"], sweep_dir, wandb="offline")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep_dir, proc


def test_every_job_writes_metrics(sweep: tuple[Path, subprocess.CompletedProcess]) -> None:
    files = metrics_files(sweep[0])
    assert len(files) == 4
    for path in files.values():
        m = json.loads(path.read_text())
        assert m["data"] and m["model"] and 0.0 <= m["top1"] <= 100.0
        assert m["method"] in {"fp32", "ptq"} and m["bits"] in {4, 8}


def read_wandb_run(path: Path) -> dict:
    """Config and summary of an offline W&B run, read from its .wandb log (``wandb leet inspect``)."""
    out = subprocess.run(["wandb", "leet", "inspect", "--json", str(path)], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    run: dict = {"summary": {}}
    for line in out.splitlines():
        record = json.loads(line)
        if record.get("type") == "run":
            run.update(id=record["run"]["run_id"], group=record["run"].get("run_group"),
                       job_type=record["run"].get("job_type"), tags=record["run"].get("tags", []),
                       config=record["run"]["config"]["update"])
        elif record.get("type") == "summary":
            run["summary"].update(record["summary"].get("update", {}))
    return run


def test_each_job_of_a_one_process_sweep_is_its_own_wandb_run(sweep: tuple[Path, subprocess.CompletedProcess]) -> None:
    # The basic launcher runs every job in this one process with the default logger (W&B offline):
    # each job must get, and finish, its own run.
    sweep_dir, proc = sweep
    assert proc.stdout.rstrip().splitlines()[-1].startswith("wrote ")  # the sweep table, then its files
    # rows with intervals (bold on the Pareto frontier)
    assert any(line.startswith(("| PTQ |", "| **PTQ** |")) and "[" in line for line in proc.stdout.splitlines())
    assert "anonymous" not in proc.stdout + proc.stderr and "wandb: " not in proc.stdout + proc.stderr
    runs = sorted(sweep_dir.glob("*/wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 4
    seen = [read_wandb_run(p) for p in runs]
    assert len({r["id"] for r in seen}) == 4
    for path, run in zip(runs, seen):
        metrics = json.loads((path.parents[2] / "metrics.json").read_text())
        assert run["config"]["bits"] == metrics["bits"] and run["summary"]["top1"] == metrics["top1"]
        assert run["group"] == "wb" and run["job_type"] == metrics["method"]
        # A dashboard splits runs by the short names, in the config and in the tags.
        assert (run["config"]["method"], run["config"]["policy"]) == (metrics["method"], metrics["policy"])
        assert run["config"]["method_config"]["_target_"] == metrics["config"]["method"]["_target_"]
        assert set(run["tags"]) == {metrics["method"], f"policy:{metrics['policy']}"}
        # Neither method depends on the rate: its summary does not carry it; the float run's no bits.
        assert "rate" not in run["summary"] and "rate" in metrics
        assert ("bits" in run["summary"]) == (metrics["method"] != "fp32")


def test_report_of_real_sweep(sweep: tuple[Path, subprocess.CompletedProcess], tmp_path: Path) -> None:
    sweep, _ = sweep
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


def _kill_last_job(sweep: Path) -> tuple[str, dict, dict[str, int]]:
    """Remove the last job's metrics.json, as a job killed before its atomic write leaves it: (its name,
    its metrics, the other jobs' metrics.json modification times)."""
    files = metrics_files(sweep)
    killed = sorted(files)[-1]  # a PTQ job
    first = json.loads(files[killed].read_text())
    files[killed].unlink()
    return killed, first, {name: p.stat().st_mtime_ns for name, p in files.items() if name != killed}


def _assert_resumed(sweep: Path, killed: str, first: dict, before: dict[str, int]) -> None:
    """Only the killed job ran again, with the same figures; the others were skipped untouched."""
    after = metrics_files(sweep)
    assert set(after) == set(before) | {killed}
    assert {name: after[name].stat().st_mtime_ns for name in before} == before
    for name in before:
        assert "skipped" in (sweep / name / "run.log").read_text()
    assert "skipped" not in (sweep / killed / "run.log").read_text()
    again = json.loads(after[killed].read_text())
    assert again["method"] == "ptq" and again["config_hash"] == first["config_hash"]
    for key in ("top1", "top1_ci95", "top5", "vs_fp32", "bops", "size_bytes"):
        assert again[key] == first[key], key
    strip = ("seconds", "cached")
    assert [{k: v for k, v in layer.items() if k not in strip} for layer in again["layers"]] == \
        [{k: v for k, v in layer.items() if k not in strip} for layer in first["layers"]]


def test_resume_skips_finished_jobs_whatever_the_execution_settings_and_reruns_a_killed_one(
        sweep: tuple[Path, subprocess.CompletedProcess], tmp_path: Path, monkeypatch, capsys) -> None:
    sweep_dir = tmp_path / "sweep"
    shutil.copytree(sweep[0], sweep_dir)
    killed, first, before = _kill_last_job(sweep_dir)
    # another machine: CPU solvers, loader workers, progress bars, another logger; same results
    status, _, err = run_main(["-m", "method=fp32,ptq", "bits=4,8", *TINY, "device=cpu", "data.num_workers=1",
                               "progress=true", f"hydra.sweep.dir={sweep_dir}", f"cache.dir={sweep[0].parent / 'cache'}"],
                              REPO, monkeypatch, capsys)
    assert status == 0, err[-3000:]
    _assert_resumed(sweep_dir, killed, first, before)


@pytest.mark.slow  # two DDP processes start; the default suite resumes in one process
def test_a_resumed_job_in_two_ddp_processes_gives_the_single_process_figures(
        sweep: tuple[Path, subprocess.CompletedProcess], tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    shutil.copytree(sweep[0], sweep_dir)
    killed, first, before = _kill_last_job(sweep_dir)
    proc = run_qaf(["method=fp32,ptq", "bits=4,8", *TINY, "trainer.devices=2", "device=cpu"], sweep_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_resumed(sweep_dir, killed, first, before)


def test_a_killed_job_leaves_no_metrics_and_is_reported_killed(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "run.py", "method=cpd", "logger=none", "progress=false", "data.eval_samples=64",
           "data.calib_samples=64", f"hydra.run.dir={out}", f"cache.dir={tmp_path / 'cache'}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "running.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert (out / "running.json").exists(), "the run never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (out / "metrics.json").exists() and not (out / "failed.json").exists()
    (job,) = collect_sweep(out)
    assert job.status == KILLED


@pytest.mark.slow
def test_joblib_launcher_two_jobs(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    proc = run_qaf(["method=fp32,ptq", "bits=4", *TINY, "hydra/launcher=joblib",
                    "hydra.launcher.n_jobs=2"], sweep_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    assert len(metrics_files(sweep_dir)) == 2


@pytest.mark.slow
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


def documented_job_count(name: str) -> int | None:
    """The "(... N jobs)" an experiment file's header comment promises."""
    import re

    header = "".join(line for line in (REPO / "experiments" / f"{name}.yaml").read_text().splitlines(True)
                     if line.startswith("#"))
    found = re.search(r"(\d+) jobs[,)]", header.replace("\n#", ""))
    return int(found.group(1)) if found else None


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_as_a_sweep(name: str, hydra_conf: None) -> None:
    from hydra.utils import instantiate
    from hydra_plugins.qaf_grid_sweeper.expand import expand_grid
    from omegaconf import OmegaConf

    from qaf.config import validate

    cfg = compose("config", overrides=[f"experiment={name}"], return_hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    sweeper = OmegaConf.to_container(cfg.hydra.sweeper)
    params = {k: str(v) for k, v in (sweeper.get("params") or {}).items()}
    jobs = expand_grid(sweeper["grid"], params, []) if sweeper.get("grid") else expand_grid([params], None, [])
    assert len({tuple(sorted(job)) for job in jobs}) == len(jobs)  # no job twice
    assert len(jobs) == documented_job_count(name), "the header comment's job count is stale"
    for job in jobs:  # every job composes, validates, and its method accepts its options
        job_cfg = compose("config", overrides=[f"experiment={name}", *job])
        validate(job_cfg)
        method = instantiate(job_cfg.method, bits=job_cfg.bits, act_bits=job_cfg.act_bits, rate=float(job_cfg.rate))
        assert f"method={method.name}" in job


def test_paper_experiments_share_one_sweep_and_paper_numbers(hydra_conf: None) -> None:
    ids = {compose("config", overrides=[f"experiment={name}"]).sweep_id
           for name in ("paper_resnet18_imagenet", "paper_resnet18_imagenet_baselines")}
    assert ids == {"paper_resnet18_imagenet"}
    cfg = compose("config", overrides=["experiment=paper_resnet18_imagenet"],
                  return_hydra_config=True)
    assert cfg.hydra.runtime.choices.model == "resnet18"
    assert cfg.hydra.runtime.choices.data == "imagenet"
    assert (REPO / "experiments" / "paper_resnet18_imagenet.paper.csv").is_file()
