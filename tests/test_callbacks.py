"""qaf.callbacks.SweepSummary: the launch record, the end-of-sweep report and the exit status.

The unit tests drive the callback with a hand-made Hydra config and synthetic job folders; one test
runs a real tiny sweep (``method=fp32,ptq bits=4,1``: the bits=1 jobs are config errors).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from conftest import run_main
from test_report import FP32, correct, make_job, md_rows, run_job

from qaf.callbacks import SweepSummary
from qaf.report import build_report
from qaf.report.collect import FAILED, NOT_STARTED, OK, collect_sweep, read_launches

REPO = Path(__file__).resolve().parents[1]


def hydra_config(sweep: Path, task: list[str], excludes: list[str] | None = None):
    """The parts of a multirun's config the callback reads (basic sweeper)."""
    return OmegaConf.create({"hydra": {
        "sweep": {"dir": str(sweep)}, "overrides": {"task": task},
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": None},
        "runtime": {"choices": {"hydra/sweeper": "basic"}},
        "job": {"config": {"override_dirname": {"exclude_keys": excludes or []}}}}})


def fail(job_dir: Path, message: str) -> None:
    (job_dir / "failed.json").write_text(json.dumps(
        {"error_type": "ConfigError", "message": message, "stage": "setup", "config_hash": "x", "time": 0.0}))


def test_launch_is_recorded_and_its_failures_fail_the_sweep(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sweep = tmp_path / "s"
    config = hydra_config(sweep, ["method=fp32,ptq", "progress=false"], ["progress"])
    callback = SweepSummary()
    callback.on_multirun_start(config)
    (launch,) = read_launches(sweep)
    assert launch.expected == [["method=fp32", "progress=False"], ["method=ptq", "progress=False"]]
    run_job(sweep / "fp32", "fp32", FP32, ["method=fp32", "progress=False"], bops_pct=100.0)
    fail(make_job(sweep / "ptq", ["method=ptq", "progress=False"]), "ptq broke on purpose")
    with pytest.raises(SystemExit) as stop:
        callback.on_multirun_end(config)
    assert stop.value.code == 1
    out, err = capsys.readouterr()
    assert "| Float | 32/32 |" in out and "failed: ptq [method=ptq progress=False]: ConfigError" in out
    assert "1 job(s) of this launch have no results" in err and "ptq broke on purpose" in err
    for name in ("results.csv", "table.md", "table.tex", "pareto.png", "frontier.md", "index.html"):
        assert (sweep / name).stat().st_size > 0


def test_only_this_launchs_jobs_decide_the_exit(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sweep = tmp_path / "s"
    first = SweepSummary()
    first.on_multirun_start(hydra_config(sweep, ["method=ptq"]))
    fail(make_job(sweep / "ptq", ["method=ptq"]), "an earlier launch's failure")
    with pytest.raises(SystemExit):
        first.on_multirun_end(hydra_config(sweep, ["method=ptq"]))
    second = SweepSummary()
    config = hydra_config(sweep, ["method=fp32"])
    second.on_multirun_start(config)
    run_job(sweep / "fp32", "fp32", FP32, ["method=fp32"], bops_pct=100.0)
    second.on_multirun_end(config)  # no SystemExit: its own job finished
    assert "an earlier launch's failure" in capsys.readouterr().out  # still in the report
    assert [j.status for j in collect_sweep(sweep)] == [OK, FAILED]
    # A third launch whose job never started (the launcher died) fails.
    third = SweepSummary(report=False)
    config = hydra_config(sweep, ["method=lapq"])
    third.on_multirun_start(config)
    with pytest.raises(SystemExit):
        third.on_multirun_end(config)
    assert "not started: method=lapq" in capsys.readouterr().err
    assert len(read_launches(sweep)) == 3


def test_grid_launch_records_the_sweepers_expansion(tmp_path: Path) -> None:
    from hydra_plugins.qaf_grid_sweeper.expand import expand_grid

    grid = [{"method": "fp32"}, {"method": "ptq", "bits": "4,8"}]
    config = hydra_config(tmp_path / "s", ["seed=1"])
    config.hydra.sweeper = {"_target_": "hydra_plugins.qaf_grid_sweeper.grid_sweeper.GridSweeper",
                            "params": {"act_bits": 8}, "grid": grid}
    config.hydra.runtime.choices["hydra/sweeper"] = "grid"
    SweepSummary().on_multirun_start(config)
    (launch,) = read_launches(tmp_path / "s")
    assert launch.expected == expand_grid(grid, {"act_bits": 8}, ["seed=1"]) and len(launch.expected) == 3


def test_reporting_problems_never_crash_the_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    sweep = tmp_path / "s"
    config = hydra_config(sweep, ["method=ptq"])
    callback = SweepSummary()
    callback.on_multirun_start(config)
    run_job(sweep / "ptq", "ptq", correct(0.9), ["method=ptq"])

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("qaf.report.build_report", broken)
    callback.on_multirun_end(config)  # returns: the job finished, the report failed
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write the report" in err and "OSError: disk full" in err
    # A sweep directory that cannot hold the launch record: one line, no exception.
    blocked = tmp_path / "blocked"
    (blocked / ".qaf").parent.mkdir()
    (blocked / ".qaf").write_text("not a directory")
    SweepSummary().on_multirun_start(hydra_config(blocked, ["method=ptq"]))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot record the launch" in err
    # No sweep directory at all: silent here, the sweeper stops on it next with one line (qaf.cli).
    (tmp_path / "file").write_text("not a directory")
    SweepSummary().on_multirun_start(hydra_config(tmp_path / "file" / "sweep", ["method=ptq"]))
    assert capsys.readouterr().err == ""


def test_real_sweep_reports_and_exits_non_zero_on_a_bad_job(tmp_path: Path, monkeypatch, capsys) -> None:
    sweep = tmp_path / "sweep"
    status, stdout, stderr = run_main(["-m", "method=fp32,ptq", "bits=4,1", "data.eval_samples=64",
                                       "data.calib_samples=64", "logger=csv", "progress=false",
                                       f"hydra.sweep.dir={sweep}", f"cache.dir={tmp_path / 'cache'}"], REPO,
                                      monkeypatch, capsys)
    assert status != 0, stderr[-3000:]
    table = md_rows(stdout)
    assert set(table) == {"Float", "PTQ"}
    metrics = json.loads(next(sweep.glob("bits=4,*method=ptq/metrics.json")).read_text())
    lo, hi = metrics["top1_ci95"]
    assert table["PTQ"]["Top-1"] == f"{metrics['top1']:.2f} [{lo:.2f}, {hi:.2f}]"
    for name in ("results.csv", "table.md", "table.tex", "pareto.png", "frontier.md", "index.html"):
        assert (sweep / name).stat().st_size > 0
    (launch,) = read_launches(sweep)
    assert len(launch.expected) == 4
    jobs = {(j.method, j.setting("bits")): j for j in collect_sweep(sweep)}
    assert jobs[("fp32", 4)].status == OK and jobs[("ptq", 4)].status == OK
    for method in ("fp32", "ptq"):
        bad = jobs[(method, 1)]
        assert bad.status == FAILED and "bits=1" in bad.error, (bad.status, bad.error)
        assert f"failed: bits=1,data.calib_samples=64,data.eval_samples=64,method={method}" in stdout
    assert "2 job(s) of this launch have no results" in stderr
    assert NOT_STARTED not in {j.status for j in jobs.values()}
    failed = json.loads((jobs[("ptq", 1)].path / "failed.json").read_text())
    assert failed["error_type"] == "ConfigError" and failed["stage"] == "validate"
    shutil.rmtree(jobs[("ptq", 4)].path)  # a job the sweep never got to
    jobs = {(j.method, j.setting("bits")): j for j in collect_sweep(sweep)}
    assert jobs[("ptq", 4)].status == NOT_STARTED and jobs[("ptq", 4)].path is None
    report = build_report([sweep], sweep)
    assert "failed" in report.markdown and "not started" in report.markdown
