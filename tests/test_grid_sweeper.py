"""The grid sweeper (``hydra/sweeper=grid``): its job list as a pure function, real sweeps with it
(command-line grid, experiment file from another working directory), and the report's prediction
of its jobs.

Real sweeps run ``python run.py -m ...`` in this process (``run_main``: the same main, Hydra and
basic launcher) on the embedded default with tiny sample sizes, using only ``method=fp32`` and
``method=ptq`` (seconds per job).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from hydra.errors import HydraException
from omegaconf import OmegaConf

from qaf.report.collect import NOT_STARTED, OK, collect_sweep

from conftest import expected_overrides, run_main

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `pytest` without `python -m`: the repo's hydra_plugins/
    sys.path.insert(0, str(REPO))

from hydra_plugins.qaf_grid_sweeper.expand import expand_grid  # noqa: E402

TINY = ["data.eval_samples=64", "data.calib_samples=64", "logger=csv", "progress=false"]


# --- the job list -------------------------------------------------------------------------------


def test_union_of_products_in_item_order() -> None:
    grid = [{"method": "fp32"}, {"method": "ptq", "bits": "4,8", "act_bits": "4,8"}]
    assert expand_grid(grid) == [
        ["method=fp32"],
        ["method=ptq", "bits=4", "act_bits=4"],
        ["method=ptq", "bits=4", "act_bits=8"],
        ["method=ptq", "bits=8", "act_bits=4"],
        ["method=ptq", "bits=8", "act_bits=8"],
    ]


def test_exact_duplicates_removed_first_occurrence_wins() -> None:
    grid = [
        {"method": "ptq", "bits": "4,8"},
        {"method": "ptq", "bits": "2,4"},  # bits=4 again
        {"bits": 8, "method": "ptq"},  # same job, keys in another order
        {"method": "ptq"},  # not a duplicate: no bits override
    ]
    assert expand_grid(grid) == [
        ["method=ptq", "bits=4"], ["method=ptq", "bits=8"], ["method=ptq", "bits=2"],
        ["method=ptq"]]


def test_command_line_axis_replaces_that_axis_everywhere() -> None:
    grid = [{"method": "fp32"}, {"method": "ptq", "bits": "2,3,4"}, {"method": "ptq", "bits": 8}]
    jobs = expand_grid(grid, overrides=["bits=4,6", "seed=1"])
    assert jobs == [
        ["method=fp32", "bits=4", "seed=1"], ["method=fp32", "bits=6", "seed=1"],
        ["method=ptq", "bits=4", "seed=1"], ["method=ptq", "bits=6", "seed=1"]]
    # A group on the command line replaces every item's choice; the union collapses.
    assert expand_grid(grid, overrides=["method=fp32"]) == [
        ["method=fp32"], ["method=fp32", "bits=2"], ["method=fp32", "bits=3"],
        ["method=fp32", "bits=4"], ["method=fp32", "bits=8"]]


def test_params_are_common_axes_and_an_item_axis_replaces_them() -> None:
    params = {"act_bits": "4,8", "bits": 4}
    grid = [{"method": "fp32"}, {"method": "ptq", "bits": "6,8"}]
    assert expand_grid(grid, params) == [
        ["act_bits=4", "bits=4", "method=fp32"], ["act_bits=8", "bits=4", "method=fp32"],
        ["act_bits=4", "bits=6", "method=ptq"], ["act_bits=4", "bits=8", "method=ptq"],
        ["act_bits=8", "bits=6", "method=ptq"], ["act_bits=8", "bits=8", "method=ptq"]]
    # ... and the command line replaces both.
    assert expand_grid(grid, params, ["bits=2"]) == [
        ["act_bits=4", "bits=2", "method=fp32"], ["act_bits=8", "bits=2", "method=fp32"],
        ["act_bits=4", "bits=2", "method=ptq"], ["act_bits=8", "bits=2", "method=ptq"]]


def test_group_choices_dotted_keys_and_yaml_scalars() -> None:
    grid = [
        {"method": "ptq", "method.per_channel": "false,true", "bits": "range(2,4)"},
        {"method": "lapq", "method.per_channel": False, "+method.extra": None},
        {"~method.per_channel": None, "rate": 1.5},
    ]
    assert expand_grid(grid) == [
        ["method=ptq", "method.per_channel=False", "bits=2"],
        ["method=ptq", "method.per_channel=False", "bits=3"],
        ["method=ptq", "method.per_channel=True", "bits=2"],
        ["method=ptq", "method.per_channel=True", "bits=3"],
        ["method=lapq", "method.per_channel=False", "+method.extra=null"],
        ["~method.per_channel=null", "rate=1.5"],  # Hydra's own spelling of ``~key``
    ]


def test_without_grid_it_is_the_basic_product() -> None:
    for grid in (None, []):
        assert expand_grid(grid, {"method": "fp32,ptq"}, ["bits=4,8", "seed=0"]) == [
            ["method=fp32", "bits=4", "seed=0"], ["method=fp32", "bits=8", "seed=0"],
            ["method=ptq", "bits=4", "seed=0"], ["method=ptq", "bits=8", "seed=0"]]
    assert expand_grid(None) == [[]]


def test_unsupported_items_are_rejected() -> None:
    with pytest.raises(TypeError, match="comma separated"):
        expand_grid([{"bits": [4, 8]}])
    with pytest.raises(TypeError, match="mapping"):
        expand_grid(["bits=4"])  # type: ignore[list-item]
    with pytest.raises(HydraException, match="INTERVAL"):
        expand_grid([{"rate": "interval(1,2)"}])


# --- the report's prediction from multirun.yaml -------------------------------------------------


def _multirun_yaml(sweep: Path, sweeper: dict, choice: str, task: list[str]) -> None:
    sweep.mkdir(parents=True)
    OmegaConf.save({"hydra": {"sweeper": sweeper, "overrides": {"task": task},
                              "runtime": {"choices": {"hydra/sweeper": choice}}}},
                   sweep / "multirun.yaml")


def test_expected_overrides_of_grid_and_basic_sweeps(tmp_path: Path) -> None:
    grid = [{"method": "fp32"}, {"method": "ptq", "bits": "4,8"}, {"method": "ptq", "bits": 4}]
    _multirun_yaml(tmp_path / "grid", {"params": {"act_bits": 8}, "grid": grid}, "grid", ["seed=1"])
    assert expected_overrides(tmp_path / "grid") == [
        ["act_bits=8", "method=fp32", "seed=1"], ["act_bits=8", "method=ptq", "bits=4", "seed=1"],
        ["act_bits=8", "method=ptq", "bits=8", "seed=1"]]
    # The basic sweeper's prediction is unchanged (and ignores a stray grid key).
    _multirun_yaml(tmp_path / "basic", {"params": {"method": "fp32,ptq"}, "grid": grid}, "basic",
                   ["bits=4,8"])
    assert expected_overrides(tmp_path / "basic") == [
        ["method=fp32", "bits=4"], ["method=fp32", "bits=8"], ["method=ptq", "bits=4"],
        ["method=ptq", "bits=8"]]
    # Not predictable: no prediction rather than a wrong one.
    _multirun_yaml(tmp_path / "interval", {"grid": [{"rate": "interval(1,2)"}]}, "grid", [])
    assert expected_overrides(tmp_path / "interval") is None


def test_report_loads_the_expansion_without_the_namespace_package(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An editable install that predates the plugin does not map hydra_plugins.qaf_grid_sweeper.
    monkeypatch.setitem(sys.modules, "hydra_plugins.qaf_grid_sweeper.expand", None)
    _multirun_yaml(tmp_path / "s", {"grid": [{"method": "fp32"}, {"method": "ptq"}]}, "grid", [])
    assert expected_overrides(tmp_path / "s") == [["method=fp32"], ["method=ptq"]]


# --- real sweeps ---------------------------------------------------------------------------------


def _jobs_on_disk(sweep_dir: Path) -> list[tuple[int, list[str], Path]]:
    """(hydra.job.num, overrides, directory) of every job, by job number."""
    jobs = []
    for cfg in sweep_dir.glob("*/.hydra/hydra.yaml"):
        hydra_cfg = OmegaConf.load(cfg).hydra
        overrides = list(OmegaConf.load(cfg.parent / "overrides.yaml"))
        jobs.append((int(hydra_cfg.job.num), overrides, cfg.parents[1]))
    return sorted(jobs, key=lambda j: j[0])


# Item 3 repeats a job of item 2; batches of 2 check that job numbers run on across batches.
CLI_GRID = '[{method: fp32}, {method: ptq, bits: "4,8"}, {bits: 4, method: ptq}]'
CLI_GRID_PY = [{"method": "fp32"}, {"method": "ptq", "bits": "4,8"}, {"bits": 4, "method": "ptq"}]


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[str]]]:
    """A grid given on the command line: 3 jobs (fp32; ptq at 4 and 8 bits), in batches of 2."""
    root = tmp_path_factory.mktemp("grid")
    sweep_dir = root / "sweep"
    task = [*TINY, f"cache.dir={root / 'cache'}"]
    with pytest.MonkeyPatch.context() as patch:
        status, out, err = run_main(["-m", "hydra/sweeper=grid", f"+hydra.sweeper.grid={CLI_GRID}",
                                     "hydra.sweeper.max_batch_size=2", f"hydra.sweep.dir={sweep_dir}", *task], REPO,
                                    patch)
    assert status == 0, err[-3000:]
    assert "Grid sweeper: 3 grid item(s), 3 job(s)" in out + err
    return sweep_dir, expand_grid(CLI_GRID_PY, None, task)


def test_command_line_grid_runs_its_expansion(grid_sweep: tuple[Path, list[list[str]]]) -> None:
    sweep_dir, expected = grid_sweep
    assert len(expected) == 3
    jobs = _jobs_on_disk(sweep_dir)
    assert [num for num, _, _ in jobs] == [0, 1, 2]
    assert [overrides for _, overrides, _ in jobs] == expected
    # Directories named by override_dirname (logger, progress, cache.dir excluded), as basic.
    assert sorted(path.name for _, _, path in jobs) == sorted([
        "data.calib_samples=64,data.eval_samples=64,method=fp32",
        "bits=4,data.calib_samples=64,data.eval_samples=64,method=ptq",
        "bits=8,data.calib_samples=64,data.eval_samples=64,method=ptq"])
    settings = [(m["method"], m["bits"]) for m in
                (json.loads((path / "metrics.json").read_text()) for _, _, path in jobs)]
    assert settings[1:] == [("ptq", 4), ("ptq", 8)] and settings[0][0] == "fp32"
    assert expected_overrides(sweep_dir) == expected


def test_report_lists_a_deleted_job_as_not_started(
        grid_sweep: tuple[Path, list[list[str]]], tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    shutil.copytree(grid_sweep[0], sweep_dir)
    removed = _jobs_on_disk(sweep_dir)[1]
    shutil.rmtree(removed[2])
    jobs = collect_sweep(sweep_dir)
    assert [j.status for j in jobs] == [OK, OK, NOT_STARTED]
    assert jobs[-1].path is None and jobs[-1].overrides == removed[1]
    assert jobs[-1].method == "ptq" and jobs[-1].setting("bits") == 4


EXPERIMENT = """\
# @package _global_
defaults:
  - override /hydra/sweeper: grid

hydra:
  mode: MULTIRUN
  sweeper:
    params:
      act_bits: 8
    grid:
      - {method: fp32}
      - {method: ptq, bits: "4,6"}
      - method: ptq
        bits: 2,3
"""


def test_experiment_file_from_another_working_directory(tmp_path: Path, monkeypatch, capsys) -> None:
    """The documented experiment pattern; ``bits=8`` on the command line replaces every item's
    bits, so the two ptq items collapse into one job."""
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "grid_demo.yaml").write_text(EXPERIMENT)
    sweep_dir = tmp_path / "sweep"
    task = ["experiment=grid_demo", "bits=8", *TINY, f"cache.dir={tmp_path / 'cache'}"]
    status, _, err = run_main([*task, f"hydra.sweep.dir={sweep_dir}", f"hydra.searchpath=[file://{tmp_path / 'conf'}]"],
                              tmp_path, monkeypatch, capsys)
    assert status == 0, err[-3000:]
    expected = expand_grid(OmegaConf.to_container(OmegaConf.create(EXPERIMENT).hydra.sweeper.grid),
                           {"act_bits": 8}, task)
    assert [j[1] for j in _jobs_on_disk(sweep_dir)] == expected
    assert [(j.method, j.setting("bits"), j.setting("act_bits"), j.status)
            for j in collect_sweep(sweep_dir)] == [("fp32", 8, 8, OK), ("ptq", 8, 8, OK)]
