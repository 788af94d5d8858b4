"""The paper-grid benchmark's job list and figures (the solving itself is ``python -m qaf.bench --paper-grid``)."""

from __future__ import annotations

import pytest

from qaf.bench.paper_grid import grid_jobs, job_row, markdown
from qaf.config import ConfigError


def test_grid_is_the_experiments_sweep_in_the_basic_sweepers_order():
    jobs = grid_jobs()
    assert len(jobs) == 42 and len({tuple(j.items()) for j in jobs}) == 42
    # The last sweeper param varies fastest: the first 7 jobs are admm_epc at 4 bits over every rate,
    # so they compute every rate's ALS/EPC start and the other 35 jobs are served from the cache.
    assert [j["rate"] for j in jobs[:7]] == ["1.2", "1.5", "2", "2.5", "2.7", "3", "4"]
    assert {(j["method"], j["bits"]) for j in jobs[:7]} == {("admm_epc", "4")}
    assert {j["method"] for j in jobs} == {"admm_epc", "cpd_epc"} and {j["bits"] for j in jobs} == {"4", "6", "8"}


def test_a_rate_subset_keeps_its_jobs_and_a_wrong_rate_is_named():
    assert [(j["method"], j["bits"]) for j in grid_jobs(["2"])] == [
        (m, b) for m in ("admm_epc", "cpd_epc") for b in ("4", "6", "8")]
    with pytest.raises(ConfigError, match=r"--rates 5 .*1\.2,1\.5,2,2\.5,2\.7,3,4"):
        grid_jobs(["2", "5"])


def test_job_row_splits_seconds_by_stage():
    layers = [{"name": f"l{i}", "rank": 10, "e_float": 0.1, "e_quant": q, "iterations": 3,
               "seconds_als": 1.0, "seconds_epc": 2.0 * i, "seconds_admm": 0.5} for i, q in enumerate((0.2, 0.4))]
    row = job_row({"method": "admm_epc", "bits": "4", "rate": "2"}, layers, seconds=10.0, cpu_seconds=9.0)
    assert (row["als_s"], row["epc_s"], row["admm_s"], row["other_s"]) == (2.0, 2.0, 1.0, 5.0)
    assert row["mean_e_quant"] == pytest.approx(0.3)
    table = markdown({"jobs": [row], "per_rate_s": {"2": 10.0},
                      "per_stage_s": {"als": 2.0, "epc": 2.0, "admm": 1.0, "other": 5.0},
                      "total_s": 10.0, "total_cpu_s": 9.0, "peak_mem_gb": 1.5})
    assert "| admm_epc | 4 | 2 | 0.300000 | 10.0 | 2.0 | 2.0 | 1.0 | 5.0 | 9.0 |" in table
