"""The command line as a user types it (``python run.py ...``, in this process through ``run_main``):
bad input of any origin is one line on stderr and exit 2 before heavy work; the export shorthand
composes with the export keys; job folders whose names would be too long still run and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT, run_main
from qaf.cli import expand_shorthand
from qaf.config import NAME_MAX, cpu_cores, job_dirname

TINY = ["data.eval_samples=64", "data.calib_samples=64", "logger=none", "progress=false", "cache.dir=cache"]
OPTIONS = {"method": "admm, admm_epc, cpd, cpd_epc, fp32, lapq, ptq, qswd", "policy": "lapq, qaf, uniform"}


def one_error_line(status: int, err: str) -> str:
    """The single line a refused command prints (exit 2, no traceback)."""
    assert status == 2, err[-3000:]
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err[-3000:]
    return err.strip()


@pytest.mark.parametrize("override, message", [
    ("method=ADMM_EPC", f"Could not find 'method/ADMM_EPC': accepted method={OPTIONS['method']}"),
    ("policy=nosuch", f"Could not find 'policy/nosuch': accepted policy={OPTIONS['policy']}"),
    ("nosuch=1", "Could not override 'nosuch'. To append to your config use +nosuch=1 (Key 'nosuch' is not in struct)"),
    ("bits=[", ("no viable alternative at input '[' See https://hydra.cc/docs/1.2/advanced/override_grammar/basic "
                "for details")),
])
def test_hydra_composition_errors_are_config_errors(override: str, message: str, tmp_path: Path, monkeypatch,
                                                    capsys) -> None:
    status, _, err = run_main(["method=ptq", override, *TINY], tmp_path, monkeypatch, capsys)
    assert one_error_line(status, err) == f"qaf: config error: {message}"
    assert not (tmp_path / "multirun_outputs").exists()


@pytest.mark.parametrize("sweep", [False, True])
def test_unwritable_output_folder_is_one_line(sweep: bool, tmp_path: Path, monkeypatch, capsys) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    where = blocker / "out"  # a folder inside a file: cannot be created, whoever runs the test
    args = ["-m", "method=fp32,ptq", f"hydra.sweep.dir={where}"] if sweep else ["method=ptq", f"hydra.run.dir={where}"]
    status, _, err = run_main([*args, *TINY], tmp_path, monkeypatch, capsys)
    line = one_error_line(status, err)
    assert line.startswith(f"qaf: config error: cannot create the output folder (Not a directory: {blocker}")
    assert line.endswith("): accepted hydra.run.dir (hydra.sweep.dir for a sweep) set to a folder this user can write")


def test_more_cpu_processes_than_cores_are_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    cores = cpu_cores()
    status, _, err = run_main(["method=ptq", "trainer.accelerator=cpu", f"trainer.devices={cores + 1}", *TINY],
                              tmp_path, monkeypatch, capsys)
    assert one_error_line(status, err) == (
        f"qaf: config error: trainer.devices={cores + 1} is invalid: accepted an integer in 1..{cores} on the CPU, "
        f"one DDP process per core ({cores} cores here)")
    assert not list(tmp_path.rglob("metrics.json"))


def test_rate_giving_rank_one_is_refused_before_any_solver(tmp_path: Path, monkeypatch, capsys) -> None:
    status, _, err = run_main(["method=admm_epc", "rate=50", *TINY], tmp_path, monkeypatch, capsys)
    assert one_error_line(status, err) == (
        "qaf: config error: rate=50.0 is invalid: layer layer1.0.conv1 (16, 16, 3, 3) would get rank 1, below "
        "method.min_rank=2; accepted a rate in (1, 28.1] for the selected layers (+method.min_rank=1 allows rank 1)")
    (failed,) = tmp_path.rglob("failed.json")
    assert {k: v for k, v in json.loads(failed.read_text()).items() if k in ("error_type", "stage")} == {
        "error_type": "ConfigError", "stage": "setup"}  # before the float evaluation
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and "cache" in p.parts]  # nothing computed


def test_export_shorthand_composes_with_the_export_keys(tmp_path: Path, monkeypatch, capsys) -> None:
    assert expand_shorthand(["export=true", "export.onnx=true", "export=False", "bits=4"]) == [
        "export.artifact=true", "export.onnx=true", "export.artifact=false", "bits=4"]
    status, _, err = run_main(["method=ptq", "export=true", "export.onnx=true", "sweep_id=both", *TINY], tmp_path,
                              monkeypatch, capsys)
    assert status == 0, err[-3000:]
    job = tmp_path / "multirun_outputs" / "both"
    assert (job / "model.qaf.safetensors").is_file() and (job / "model.onnx").is_file()
    assert "error" not in json.loads((job / "metrics.json").read_text())["export"]


def test_job_folder_names_stay_within_the_file_system_limit() -> None:
    long = ",".join(f"method.include=[layer{i}.*]" for i in range(40))
    name = job_dirname(long)
    assert len(name.encode()) == NAME_MAX and name.startswith(long[:200]) and name == job_dirname(long)
    assert job_dirname(long + "x") != name  # the tail is a hash of the whole name
    assert job_dirname("bits=4,method=ptq") == "bits=4,method=ptq" and job_dirname("") == "default"
    assert len(job_dirname("é" * 300).encode()) <= NAME_MAX  # never cut inside a character


def test_sweep_with_job_names_over_255_bytes_runs_every_job_and_resumes(tmp_path: Path, monkeypatch, capsys) -> None:
    folder = tmp_path / ("checkpoints_" + "a" * 110) / ("resnet20_" + "b" * 110)
    folder.mkdir(parents=True)
    checkpoint = folder / "resnet20.th"
    checkpoint.symlink_to(ROOT / "qaf" / "models" / "assets" / "resnet20-12fca82f.th")
    args = ["-m", "method=fp32,ptq", f"model.checkpoint={checkpoint}", "sweep_id=long", *TINY]
    status, _, err = run_main(args, tmp_path, monkeypatch, capsys)
    assert status == 0, err[-3000:]
    sweep = tmp_path / "multirun_outputs" / "long"
    jobs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    assert len(jobs) == 2 and all(len(j.name.encode()) <= NAME_MAX and "~" in j.name for j in jobs)
    for job in jobs:  # the full overrides stay inside the folder
        assert f"model.checkpoint={checkpoint}" in (job / ".hydra" / "overrides.yaml").read_text()
    written = {j: (j / "metrics.json").stat().st_mtime_ns for j in jobs}
    status, _, err = run_main(args, tmp_path, monkeypatch, capsys)
    assert status == 0, err[-3000:]
    assert {j: (j / "metrics.json").stat().st_mtime_ns for j in jobs} == written  # resumed: both skipped
    assert sorted(p.parent for p in sweep.glob("*/metrics.json")) == jobs
