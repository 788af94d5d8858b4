"""The sweep report on synthetic job folders laid out as Hydra and the pipeline write them.

Every finished job is built from per-image correctness arrays, so its top-1, interval, paired test
against the float model and ``predictions.npz`` agree the way the pipeline makes them agree; the
expected table cells are computed from the same arrays with :mod:`qaf.metrics.stats`.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
import re
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from qaf.metrics.stats import paired_comparison, wilson_interval
from qaf.report import build_report
from qaf.report.__main__ import main
from qaf.report.collect import (FAILED, INCOMPLETE, INVALID, KILLED, NOT_STARTED, OK, RUNNING, Launch,
                                collect_sweep, latest_sweeps, record_launch)
from qaf.report.compare import NotComparable, compare_runs
from qaf.report.pareto import mark_rows, matched_cost, pareto_front, render_frontier_markdown
from qaf.report.tables import FLOAT, Row, aggregate, read_paper_csv, render_latex, result_record
from qaf.results import MethodInfo

from conftest import compose, expected_overrides

REPO = Path(__file__).resolve().parents[1]
N = 400
MODEL, DATA = "resnet20_cifar", "cifar10_embedded"


def correct(accuracy: float, n: int = N, seed: int = 0, base: np.ndarray | None = None) -> np.ndarray:
    """Per-image correctness with the given accuracy; derived from ``base`` (few flips) if given."""
    rng = np.random.default_rng(seed)
    if base is None:
        out = np.zeros(n, dtype=bool)
        out[rng.permutation(n)[:round(accuracy * n)]] = True
        return out
    out = base.copy()
    target = round(accuracy * n)
    idx = rng.permutation(n)
    for i in idx:  # flip right -> wrong (or wrong -> right) until the count matches
        if out.sum() == target:
            break
        if out.sum() > target and out[i]:
            out[i] = False
        elif out.sum() < target and not out[i]:
            out[i] = True
    return out


FP32 = correct(0.92)


@functools.cache
def info_of(method: str) -> MethodInfo:
    """What ``conf/method/<method>.yaml``'s method declares (its config instantiated)."""
    from hydra.utils import instantiate

    return instantiate(compose(f"method={method}").method, bits=4, act_bits=8, rate=2.0).info


def metrics_of(c1: np.ndarray, method: str, bits: int = 4, act_bits: int = 8, rate: float = 2.0, seed: int = 0,
               bops_pct: float = 5.0, bops_pct_paper: float | None = None, size_bytes: int = 150_000,
               policy: str = "uniform", bn: bool | None = None, model: str = MODEL, data: str = DATA,
               fp32: np.ndarray = FP32) -> dict:
    """A metrics.json as the pipeline writes it, consistent with the correctness array ``c1``."""
    n = int(c1.size)
    fp32 = fp32[:n]
    bn = method != "fp32" if bn is None else bn  # the protocol's default: the float model as it is
    return {
        "schema_version": 2, "method": method, "method_info": dataclasses.asdict(info_of(method)), "model": model, "data": data, "bits": bits, "act_bits": act_bits, "rate": rate,
        "seed": seed, "policy": policy, "top1": 100.0 * c1.mean(), "top5": min(100.0, 100.0 * c1.mean() + 5),
        "eval_samples": n, "top1_ci95": list(wilson_interval(int(c1.sum()), n)),
        "fp32_top1": 100.0 * fp32.mean(), "vs_fp32": paired_comparison(c1, fp32).as_dict(),
        "macs": 41_000_000, "fp32_macs": 41_000_000, "bops": 10**9, "bops_pct": bops_pct,
        "bops_pct_paper": bops_pct if bops_pct_paper is None else bops_pct_paper, "params": 270_000,
        "size_bytes": size_bytes, "fp32_size_bytes": 1_080_000, "compression_ratio": 1_080_000 / size_bytes,
        "protocol": {"bn_recalibration": bn, "calib_samples": 64, "calib_split": "train", "bn_transform": "train",
                     "calib_transform": "eval", "eval_samples": n, "policy": {"name": policy}, "finetune": None},
        "layers": [], "timings": {"eval": 1.0}, "sweep_id": "s", "overrides": [f"method={method}"],
        "config_hash": f"h{method}{bits}{seed}",
        "config": {"bits": bits, "act_bits": act_bits, "rate": rate, "seed": seed,
                   "data": {"_target_": "qaf.data.cifar10.embedded", "eval_samples": n}},
    }


def make_job(job_dir: Path, overrides: list[str], result: dict | str | None = None,
             choices: dict | None = None, conf_dir: Path | None = None,
             predictions: np.ndarray | None = None) -> Path:
    """A job folder: .hydra/{config,overrides,hydra}.yaml, run.log, metrics.json (a dict, or raw
    text for damaged files) and predictions.npz."""
    hydra_dir = job_dir / ".hydra"
    hydra_dir.mkdir(parents=True)
    cfg = {k.split("=")[0]: yaml.safe_load(k.split("=", 1)[1]) for k in overrides}
    (hydra_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    (hydra_dir / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    sources = [{"path": str(conf_dir), "schema": "file", "provider": "main"}] if conf_dir else []
    runtime = {"choices": choices or {"method": cfg.get("method", "fp32")}, "config_sources": sources,
               "output_dir": str(job_dir)}
    (hydra_dir / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": runtime}}))
    (job_dir / "run.log").write_text("[INFO] ERROR Traceback in a log is not a status\n")
    if result is not None:
        (job_dir / "metrics.json").write_text(result if isinstance(result, str) else json.dumps(result))
    if predictions is not None:
        np.savez_compressed(job_dir / "predictions.npz", correct1=np.packbits(predictions),
                            correct5=np.packbits(predictions), n=predictions.size)
    return job_dir


def run_job(job_dir: Path, method: str, c1: np.ndarray, overrides: list[str] | None = None, **kw) -> Path:
    """A finished job of ``method`` whose predictions are ``c1``."""
    bits = kw.get("bits", 4)
    return make_job(job_dir, overrides or [f"method={method}", f"bits={bits}"], metrics_of(c1, method, **kw),
                    predictions=c1)


def write_multirun(sweep: Path, task: list[str], params: dict | None = None, excludes: list | None = None) -> None:
    """The sweep root's multirun.yaml (only the keys the report reads)."""
    hydra = {"overrides": {"task": task}, "sweeper": {"params": params or {}},
             "runtime": {"choices": {"hydra/sweeper": "basic"}},
             "job": {"config": {"override_dirname": {"exclude_keys": excludes or []}}}}
    sweep.mkdir(parents=True, exist_ok=True)
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": hydra}))


def dead_pid() -> int:
    """The pid of a process that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def top1_cell(c1: np.ndarray) -> str:
    lo, hi = wilson_interval(int(c1.sum()), c1.size)
    return f"{100 * c1.mean():.2f} [{lo:.2f}, {hi:.2f}]"


def md_rows(markdown: str) -> dict[str, dict[str, str]]:
    """The first Markdown table's rows by method cell (bold markers removed), as header: cell."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
        if len(cells) != len(header):
            break  # the next table
        rows[cells[header.index("Method")]] = dict(zip(header, cells))
    return rows


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """method=fp32,ptq bits=4,8: fp32 jobs finished, ptq bits=8 failed, ptq bits=4 never started."""
    root = tmp_path / "multirun_outputs" / "2024-01-01_00-00-00_ab12"
    write_multirun(root, ["method=fp32,ptq", "bits=4,8"])
    run_job(root / "0", "fp32", FP32, ["method=fp32", "bits=4"], bits=4, bops_pct=100.0, size_bytes=1_080_000)
    run_job(root / "1", "fp32", FP32, ["method=fp32", "bits=8"], bits=8, bops_pct=100.0, size_bytes=1_080_000)
    make_job(root / "3", ["method=ptq", "bits=8"])
    (root / "3" / "failed.json").write_text(json.dumps({
        "error_type": "ConfigError", "message": "bits=8 broke on purpose", "stage": "setup",
        "config_hash": "x", "time": 0.0}))
    return root


# ------------------------------------------------------------------------------------ statuses

def test_statuses_come_from_files(tmp_path: Path) -> None:
    root = tmp_path / "s"
    run_job(root / "ok", "ptq", correct(0.9))
    make_job(root / "running", ["method=ptq", "bits=2"])
    (root / "running" / "running.json").write_text(json.dumps(
        {"pid": os.getpid(), "host": socket.gethostname(), "started": 0.0, "config_hash": "a"}))
    make_job(root / "killed", ["method=ptq", "bits=3"])
    (root / "killed" / "running.json").write_text(json.dumps(
        {"pid": dead_pid(), "host": socket.gethostname(), "started": 0.0, "config_hash": "a"}))
    make_job(root / "failed", ["method=ptq", "bits=5"])
    (root / "failed" / "failed.json").write_text(json.dumps(
        {"error_type": "RuntimeError", "message": "CUDA out of memory", "stage": "compress", "config_hash": "a",
         "time": 0.0}))
    make_job(root / "incomplete", ["method=ptq", "bits=6"])
    # Failed once, ran again and was killed: the kill is its latest state.
    make_job(root / "rerun", ["method=ptq", "bits=7"])
    (root / "rerun" / "failed.json").write_text(json.dumps(
        {"error_type": "OSError", "message": "old", "stage": "eval", "config_hash": "a", "time": 10.0}))
    (root / "rerun" / "running.json").write_text(json.dumps(
        {"pid": dead_pid(), "host": socket.gethostname(), "started": 20.0, "config_hash": "a"}))
    jobs = {j.name: j for j in collect_sweep(root)}
    assert {name: j.status for name, j in jobs.items()} == {
        "ok": OK, "running": RUNNING, "killed": KILLED, "failed": FAILED, "incomplete": INCOMPLETE, "rerun": KILLED}
    assert jobs["failed"].error == "RuntimeError: CUDA out of memory" and jobs["failed"].stage == "compress"
    assert "is gone" in jobs["killed"].error and jobs["ok"].error is None
    # The log's ERROR/Traceback lines are not read: the incomplete job has no error from them.
    assert "Traceback" not in jobs["incomplete"].error


@pytest.mark.parametrize("text, problem", [("[]", "holds a list"), ("null", "holds a NoneType"),
                                           ('{"method": "ptq", "top1": 9', "unreadable"),
                                           ('{"method": "ptq"}', "field 'model'")])
def test_invalid_metrics_are_shown_with_their_problem(tmp_path: Path, text: str, problem: str) -> None:
    make_job(tmp_path / "s" / "0", ["method=ptq"], text)
    (job,) = collect_sweep(tmp_path / "s")
    assert job.status == INVALID and job.metrics is None
    assert problem in job.error
    report = build_report([tmp_path / "s"], tmp_path / "s")
    assert f"invalid: 0 [method=ptq]: metrics.json {job.error.split('metrics.json ', 1)[1]}" in report.markdown


@pytest.mark.parametrize("garbage", ["[]", "null", "{{{not json", ""])
def test_garbage_in_any_file_never_crashes(tmp_path: Path, garbage: str) -> None:
    root = tmp_path / "s"
    run_job(root / "ok", "ptq", correct(0.9))
    make_job(root / "f", ["method=ptq", "bits=5"])
    (root / "f" / "failed.json").write_text(garbage)
    make_job(root / "r", ["method=ptq", "bits=6"])
    (root / "r" / "running.json").write_text(garbage)
    make_job(root / "h", ["method=ptq", "bits=7"])
    (root / "h" / ".hydra" / "overrides.yaml").write_text(garbage + "\n- [unclosed")
    (root / "multirun.yaml").write_text(garbage + "\n: : [")
    (root / ".qaf" / "launches").mkdir(parents=True)
    (root / ".qaf" / "launches" / "bad.json").write_text(garbage)
    jobs = {j.name: j for j in collect_sweep(root)}
    assert jobs["ok"].status == OK and jobs["f"].status == FAILED and jobs["r"].status == KILLED
    assert jobs["h"].overrides == [] and jobs["h"].status == INCOMPLETE
    assert build_report([root], root).files["index.html"].is_file()


def test_job_in_sweep_root_does_not_hide_the_jobs_below(tmp_path: Path) -> None:
    root = tmp_path / "s"
    run_job(root, "fp32", FP32, ["method=fp32"], bops_pct=100.0)
    run_job(root / "a", "ptq", correct(0.9))
    run_job(root / "a" / ".replaced" / "old", "ptq", correct(0.1))  # moved aside: not a job
    run_job(root / ".qaf" / "x", "ptq", correct(0.1))
    run_job(root / "b" / "wandb" / "run", "ptq", correct(0.1))
    assert sorted(j.name for j in collect_sweep(root)) == ["a", "s"]


def test_failed_and_not_started_jobs(sweep: Path) -> None:
    jobs = collect_sweep(sweep)
    by_name = {j.name: j for j in jobs}
    assert by_name["0"].status == OK and by_name["1"].status == OK
    assert by_name["3"].status == FAILED and by_name["3"].error == "ConfigError: bits=8 broke on purpose"
    missing = [j for j in jobs if j.status == NOT_STARTED]
    assert [sorted(j.overrides) for j in missing] == [["bits=4", "method=ptq"]]


def test_every_launch_into_a_folder_is_expected(tmp_path: Path) -> None:
    root = tmp_path / "s"
    # Launch 1 (recorded): fp32 and ptq, quietly. Launch 2 (multirun.yaml and recorded): admm at two rates.
    record_launch(root, Launch(None, 1.0, [["method=fp32", "progress=false"], ["method=ptq", "progress=false"]],
                               ["progress"], ["method=fp32,ptq", "progress=false"]))
    write_multirun(root, ["method=admm", "rate=2,3"], excludes=["progress"])
    # ptq's folder was written by a later run without progress=false: the same job all the same.
    run_job(root / "ptq", "ptq", correct(0.9), ["method=ptq"])
    run_job(root / "admm2", "admm", correct(0.8), ["method=admm", "rate=2"])
    jobs = collect_sweep(root)
    assert [(j.name, j.status) for j in jobs] == [
        ("admm2", OK), ("ptq", OK), ("method=fp32 progress=false", NOT_STARTED), ("method=admm rate=3", NOT_STARTED)]
    assert expected_overrides(root) == [["method=admm", "rate=2"], ["method=admm", "rate=3"]]


def test_expected_overrides_combine_sweeper_params_and_command_line(tmp_path: Path) -> None:
    write_multirun(tmp_path, ["method=admm,admm_epc", "seed=1"], {"bits": "4,6,8"})
    combos = expected_overrides(tmp_path)
    assert len(combos) == 6
    assert ["bits=6", "method=admm_epc", "seed=1"] in combos


# -------------------------------------------------------------------------------------- table

def test_float_row_on_top_with_interval(sweep: Path) -> None:
    c1 = correct(0.85, seed=3)
    run_job(sweep / "2", "ptq", c1, ["method=ptq", "bits=4"], bops_pct=6.5)
    rows = aggregate(collect_sweep(sweep))
    assert [(r.method, r.w_bits, r.a_bits) for r in rows] == [("fp32", 32, 32), ("ptq", 4, 8)]
    # fp32 at bits=4 and bits=8 are the same experiment (same seed): no spread, the job's interval.
    assert rows[0].top1 == pytest.approx(100 * FP32.mean()) and rows[0].top1_std is None
    assert rows[0].top1_ci == pytest.approx(wilson_interval(int(FP32.sum()), N))
    assert rows[1].rate is None  # PTQ does not factorize: no rate
    table = md_rows(build_report([sweep], sweep).markdown)
    assert table["Float"]["Top-1"] == top1_cell(FP32)
    assert table["PTQ"]["Top-1"] == top1_cell(c1)
    vs = paired_comparison(c1, FP32)
    assert table["PTQ"]["Δ float"] == f"{vs.diff:+.2f} (p={vs.p_value:.3f})" and vs.p_value >= 0.001


def test_deploy_top1_column_shows_the_deployable_form_against_top1(sweep: Path) -> None:
    c1, deployed = correct(0.85, seed=3), correct(0.84, seed=4)
    result = metrics_of(c1, "ptq")
    vs = paired_comparison(deployed, c1)
    result.update(deploy_top1=100.0 * deployed.mean(), deploy_vs_top1=vs.as_dict(),
                  deploy_top1_ci95=list(wilson_interval(int(deployed.sum()), N)), deploy={"batch_norms_folded": 19})
    make_job(sweep / "2", ["method=ptq", "bits=4"], result, predictions=c1)
    report = build_report([sweep], sweep).markdown
    table = md_rows(report)
    assert table["PTQ"]["Deploy top-1"] == f"{100 * deployed.mean():.2f} ({vs.diff:+.2f}, p={vs.p_value:.3f})"
    assert table["Float"]["Deploy top-1"] == "–" and "Deploy top-1: the deployable form" in report
    (record,) = [r for r in map(result_record, collect_sweep(sweep)) if r["job"] == "2"]
    assert (record["deploy_top1"], record["deploy_diff"]) == (result["deploy_top1"], vs.diff)


def test_seeds_give_mean_std_and_count(tmp_path: Path) -> None:
    root = tmp_path / "s"
    arrays = [correct(a, seed=i) for i, a in enumerate((0.70, 0.72, 0.74))]
    for seed, c1 in enumerate(arrays):
        run_job(root / str(seed), "admm_epc", c1, ["method=admm_epc", f"seed={seed}"], seed=seed, rate=2.5)
    rows = aggregate(collect_sweep(root))
    admm = [r for r in rows if r.method == "admm_epc"]
    tops = [100 * c.mean() for c in arrays]
    assert len(admm) == 1 and admm[0].seeds == 3 and admm[0].rate == 2.5
    assert admm[0].top1 == pytest.approx(np.mean(tops)) and admm[0].top1_std == pytest.approx(np.std(tops, ddof=1))
    # No fp32 job ran: the float row comes from fp32_top1, its interval from the image count.
    assert rows[0].is_float and rows[0].label == "Float" and rows[0].top1_ci == pytest.approx(wilson_interval(int(FP32.sum()), N))
    cell = md_rows(build_report([root], root).markdown)["ADMM-EPC"]["Top-1"]
    assert cell == f"{np.mean(tops):.2f} ± {np.std(tops, ddof=1):.2f} (3 seeds)"


def test_best_row_bold_and_indistinguishable_rows_marked(tmp_path: Path) -> None:
    root = tmp_path / "s"
    best = correct(0.88, seed=1)
    close = correct(0.875, base=best, seed=2)  # 2 images apart: McNemar cannot tell
    far = correct(0.60, base=best, seed=3)
    for name, c1 in (("admm_epc", best), ("cpd_epc", close), ("cpd", far)):
        run_job(root / name, name, c1, [f"method={name}"])
    assert not paired_comparison(best, close).significant and paired_comparison(best, far).significant
    md = build_report([root], root).markdown
    table = md_rows(md)
    assert table["ADMM-EPC"]["Top-1"] == top1_cell(best)
    assert table["CPD-EPC→PTQ"]["Top-1"] == top1_cell(close) + " ≈"
    assert table["CPD→PTQ"]["Top-1"] == top1_cell(far)
    assert f"| **ADMM-EPC** | **4/8** | **2** |" in md and "| CPD→PTQ | 4/8 |" in md
    assert "≈: not significantly less accurate than the best row at equal or lower %BOPs" in md and "p ≥ 0.05" in md


def test_marks_compare_rows_across_methods_at_equal_or_lower_cost(tmp_path: Path) -> None:
    # Bold: nothing at equal or lower %BOPs (any method, any rate) is more accurate; ≈: the test
    # cannot tell the row from the best one at equal or lower %BOPs. Rows of different bits and
    # rates are judged against each other.
    root = tmp_path / "s"
    admm = correct(0.80, seed=1)
    ptq4 = correct(0.795, base=admm, seed=2)  # costs twice as much, 2 images apart
    cpd_epc = correct(0.7975, base=admm, seed=3)  # as cheap, 1 image apart
    cpd, ptq8 = correct(0.60, base=admm, seed=4), correct(0.90, seed=5)
    run_job(root / "a", "admm_epc", admm, ["method=admm_epc", "rate=3"], rate=3.0, bops_pct=1.5)
    run_job(root / "e", "cpd_epc", cpd_epc, ["method=cpd_epc", "rate=3"], rate=3.0, bops_pct=1.5)
    run_job(root / "d", "cpd", cpd, ["method=cpd", "rate=3"], rate=3.0, bops_pct=1.5)
    run_job(root / "b", "ptq", ptq4, ["method=ptq", "bits=4"], bops_pct=3.0)
    run_job(root / "c", "ptq", ptq8, ["method=ptq", "bits=8"], bits=8, bops_pct=6.0)
    assert not paired_comparison(admm, ptq4).significant and paired_comparison(admm, cpd).significant
    report = build_report([root], root)
    marks = {(r.method, r.w_bits, r.rate): r.mark for r in report.rows}
    assert marks == {("float", 32, None): "", ("ptq", 4, None): "tie", ("ptq", 8, None): "best",
                     ("cpd", 4, 3.0): "", ("cpd_epc", 4, 3.0): "tie", ("admm_epc", 4, 3.0): "best"}
    table = md_rows(report.markdown)
    assert table["CPD→PTQ"]["Top-1"] == top1_cell(cpd)
    # The matched-cost table does not name a leader the test cannot tell from the runner-up.
    (by_bops,) = matched_cost(report.rows, "bops")
    assert by_bops.budgets == [1.5, 6.0]
    p = paired_comparison(admm, cpd_epc).p_value
    assert p == 1.0
    assert "| 1.50 | – | 60.00 (4/8, r3) | 79.75 (4/8, r3) | 80.00 (4/8, r3) | tie (ADMM-EPC, CPD-EPC→PTQ) | " \
        "1.000 (CPD-EPC→PTQ) |" in report.frontier
    assert paired_comparison(ptq8, admm).p_value < 0.001
    assert "| 6.00 | 90.00 (8/8) | 60.00 (4/8, r3) | 79.75 (4/8, r3) | 80.00 (4/8, r3) | PTQ | <0.001 (ADMM-EPC) |" \
        in report.frontier


def test_constant_protocol_is_a_note_and_varying_protocol_a_column(tmp_path: Path) -> None:
    root = tmp_path / "s"
    run_job(root / "ptq", "ptq", correct(0.9), ["method=ptq"])
    run_job(root / "admm", "admm", correct(0.8), ["method=admm"])
    md = build_report([root], root).markdown
    assert "Policy" not in md.splitlines()[2] and "BN re-est." not in md.splitlines()[2]
    assert "Every compressed row: policy uniform; BN re-estimation on, train transform;" in md
    run_job(root / "lapq", "lapq", correct(0.7), ["method=lapq"], policy="lapq", bn=False)
    table = md_rows(build_report([root], root).markdown)
    assert table["LAPQ"]["Policy"] == "lapq" and table["LAPQ"]["BN re-est."] == "off"
    assert table["PTQ"]["Policy"] == "uniform" and table["PTQ"]["BN re-est."] == "on, train transform"
    assert table["Float"]["Policy"] == "–"


def test_a_method_the_report_never_heard_of_is_shown_as_it_declares(tmp_path: Path) -> None:
    # A new family (a truncated SVD, say) declares its label and that the rate applies: its rows
    # show the rate.
    root = tmp_path / "s"
    svd = {**dataclasses.asdict(MethodInfo(display="SVD", uses_rate=True)), "order": 5}
    for rate, c1 in ((2.0, correct(0.86, seed=1)), (3.0, correct(0.80, seed=2))):
        metrics = {**metrics_of(c1, "ptq", rate=rate), "method": "svd", "method_info": svd}
        make_job(root / f"svd{rate:g}", ["method=svd", f"rate={rate:g}"], metrics, predictions=c1)
    run_job(root / "ptq", "ptq", ptq := correct(0.9, seed=3))
    rows = aggregate(collect_sweep(root))
    assert [(r.label, r.rate) for r in rows] == [("Float", None), ("SVD", 2.0), ("SVD", 3.0), ("PTQ", None)]
    # At equal cost PTQ's 90 % is the best row; SVD at rate 2 (86 %) is not told apart from it on
    # 400 images, SVD at rate 3 (80 %) is.
    assert not paired_comparison(ptq, correct(0.86, seed=1)).significant
    mark_rows(rows)
    assert [r.mark for r in rows] == ["", "tie", "", "best"]
    table = md_rows(build_report([root], root).markdown)
    assert table["PTQ"]["rate"] == "–" and "SVD" in table


def test_metrics_written_before_method_info_are_reported(tmp_path: Path) -> None:
    # Version-1 files record no method_info: the name is shown as it is, the rate where the layers
    # report ranks, and the run that compressed nothing (the float model's size) is the float row.
    root = tmp_path / "s"
    old = {"schema_version", "method_info"}
    for name, c1, extra in (("fp32", FP32, {"size_bytes": 1_080_000}),
                            ("cpd", correct(0.7, seed=1), {"layers": [{"name": "l", "rank": 3}]}),
                            ("ptq", correct(0.9, seed=2), {"layers": [{"name": "l", "w_bits": 4}]})):
        metrics = {k: v for k, v in metrics_of(c1, name).items() if k not in old}
        make_job(root / name, [f"method={name}"], {**metrics, **extra}, predictions=c1)
    jobs = collect_sweep(root)
    assert all(j.status == OK and j.metrics.schema_version == 1 for j in jobs)
    rows = aggregate(jobs)
    assert [(r.label, r.w_bits, r.rate, r.is_float) for r in rows] == [
        ("fp32", 32, None, True), ("cpd", 4, 2.0, False), ("ptq", 4, None, False)]
    # A new file of the same setting beside them: the row takes what the method declares.
    run_job(root / "cpd_new", "cpd", correct(0.7, seed=1))
    assert [r.label for r in aggregate(collect_sweep(root))] == ["fp32", "CPD→PTQ", "ptq"]


def test_size_ratio_and_image_count(tmp_path: Path) -> None:
    root = tmp_path / "s"
    run_job(root / "ptq", "ptq", correct(0.9), ["method=ptq"], size_bytes=146_000)
    md = build_report([root], root).markdown
    assert md_rows(md)["PTQ"]["Size (kB)"] == "146.0" and md_rows(md)["PTQ"]["Ratio"] == f"{1080 / 146:.2f}×"
    assert f"on the same {N} evaluation images" in md and "Images" not in md.splitlines()[2]
    run_job(root / "ptq_small", "ptq", correct(0.9)[:100], ["method=ptq", "data.eval_samples=100"], bits=2)
    header = build_report([root], root).markdown.splitlines()[2]
    assert "| Images |" in header


def test_row_label_keeps_an_option_value_ending_in_a_bracket() -> None:
    assert Row("m", "d", "ptq[clip=mse]", 4, 8, None, info=info_of("ptq")).label == "PTQ (clip=mse)"
    assert Row("m", "d", "admm_epc[include=[layer1.*]]", 4, 8, 2.0,
               info=info_of("admm_epc")).label == "ADMM-EPC (include=[layer1.*])"


def test_latex_has_float_row_then_rule_and_bold_best() -> None:
    rows = [Row("m", "d", "fp32", 32, 32, None, top1=91.7, bops_pct=100.0, info=FLOAT),
            Row("m", "d", "cpd_epc", 4, 8, 2.0, top1=60.1, top1_std=0.5, bops_pct=2.07, seeds=2, mark="best",
                info=info_of("cpd_epc")),
            Row("m", "d", "admm", 4, 8, 2.0, top1=59.0, top1_ci=(58.0, 60.0), seeds=1, mark="tie",
                info=info_of("admm"))]
    tex = render_latex(rows, "a_b")
    lines = tex.splitlines()
    float_line = next(i for i, line in enumerate(lines) if line.startswith("Float"))
    assert lines[float_line + 1] == "\\midrule"
    assert "\\textbf{CPD-EPC$\\to$PTQ} & \\textbf{4/8} & \\textbf{2} & \\textbf{2.07}" in tex
    assert "\\textbf{60.10 $\\pm$ 0.50 (2 seeds)}" in tex
    assert "59.00 [58.00, 60.00] $\\approx$" in tex
    assert "a\\_b" in tex and "\\%BOPs: qaf" in tex


def test_results_csv_has_every_job_and_column(sweep: Path) -> None:
    build_report([sweep], sweep)
    with open(sweep / "results.csv") as fh:
        recs = list(csv.DictReader(fh))
    assert [r["status"] for r in recs] == [OK, OK, FAILED, NOT_STARTED]
    first = recs[0]
    lo, hi = wilson_interval(int(FP32.sum()), N)
    assert first["w_bits"] == "32" and first["eval_samples"] == str(N)
    assert float(first["top1_ci_low"]) == pytest.approx(lo) and float(first["top1_ci_high"]) == pytest.approx(hi)
    for column in ("bops_pct", "bops_pct_paper", "size_bytes", "compression_ratio", "policy", "bn_recalibration"):
        assert first[column] != "", column
    assert recs[2]["error"] == "ConfigError: bits=8 broke on purpose" and recs[2]["stage"] == "setup"


def test_report_files_list_failed_and_missing_jobs(sweep: Path) -> None:
    report = build_report([sweep], sweep)
    for path in report.files.values():
        assert path.is_file() and path.stat().st_size > 0
    md = (sweep / "table.md").read_text()
    assert "failed: 3 [method=ptq bits=8]: ConfigError: bits=8 broke on purpose (stage setup)" in md
    assert "not started: method=ptq bits=4" in md and "2 of 4 jobs finished" in md
    html = (sweep / "index.html").read_text()
    assert "data:image/png;base64," in html and "broke on purpose" in html
    assert re.search(r"<th class='text'>Method</th>.*<th class='num'>Top-1</th>", html, re.S)


# ------------------------------------------------------------------------------------- compare

def test_compare_prints_the_paired_test(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a_c, b_c = correct(0.90, seed=1), correct(0.85, seed=2)
    a, b = run_job(tmp_path / "a", "ptq", a_c), run_job(tmp_path / "b", "lapq", b_c)
    expected = paired_comparison(a_c, b_c)
    assert compare_runs(a, b) == expected
    assert main(["--compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    lo, hi = wilson_interval(int(a_c.sum()), N)
    assert f"images: {N}" in out and f"top-1 A: {100 * a_c.mean():.2f} % [{lo:.2f}, {hi:.2f}]" in out
    assert f"difference A - B: {expected.diff:+.2f} points [{expected.ci95[0]:+.2f}, {expected.ci95[1]:+.2f}]" in out
    assert f"only A right: {expected.a_only}, only B right: {expected.b_only}" in out
    assert ("not significant" in out) == (not expected.significant)


def test_compare_refuses_runs_on_other_images(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a = run_job(tmp_path / "a", "ptq", correct(0.9))
    fewer = run_job(tmp_path / "b", "ptq", correct(0.9)[:200])
    assert main(["--compare", str(a), str(fewer)]) == 2
    err = capsys.readouterr().err
    assert "not scored on the same images" in err and err.count("\n") == 1
    bare = run_job(tmp_path / "c", "ptq", correct(0.9))
    (bare / "predictions.npz").unlink()
    with pytest.raises(NotComparable, match="no predictions.npz"):
        compare_runs(a, bare)
    assert main(["--compare", str(a), str(tmp_path / "nothing")]) == 2
    (bare / "predictions.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(NotComparable, match="unreadable"):
        compare_runs(a, bare)


# ---------------------------------------------------------------------------------------- BOPs

def test_bops_convention_flag_and_paper_default(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    (conf / "experiment").mkdir(parents=True)
    (conf / "experiment" / "toy.paper.csv").write_text(
        "# toy numbers\nmethod,w_bits,a_bits,rate,bops_pct,top1,source,label\n"
        "fp32,32,32,,100,69.76,Paper T1,\nptq,4,8,,3.12,60.0,Paper T1,\nadaround,4,8,,3.12,68.71,BRECQ T2,AdaRound\n")
    root = tmp_path / "s"
    c1 = correct(0.9)
    make_job(root / "0", ["method=ptq", "experiment=toy"], metrics_of(c1, "ptq", bops_pct=3.19, bops_pct_paper=3.125),
             choices={"method": "ptq", "experiment": "toy"}, conf_dir=conf, predictions=c1)
    report = build_report([root], root)
    assert report.bops == "paper" and "the QAF paper's convention" in report.markdown
    assert "chosen to match the paper numbers of toy.paper.csv" in report.markdown
    table = md_rows(report.markdown)
    assert table["PTQ"]["%BOPs"] == "3.12" and table["PTQ"]["Top-1 (paper)"] == "60.00"
    # A method we do not run is a paper-only row with the CSV's label and source.
    assert table["AdaRound"]["Top-1"] == "–" and table["AdaRound"]["Source"] == "BRECQ T2"
    assert table["Float"]["Top-1 (paper)"] == "69.76"  # the 32/32 row without rate is the float model's
    assert "toy.paper.csv" in (root / "table.tex").read_text().split("\\caption")[1].splitlines()[0]
    qaf = build_report([root], root, bops="qaf")
    assert qaf.bops == "qaf" and md_rows(qaf.markdown)["PTQ"]["%BOPs"] == "3.19"


def test_shipped_paper_csvs_parse_and_hold_their_own_rows() -> None:
    source = "Results.ipynb (MSE weights; 8-bit histogram activations)"
    paper = read_paper_csv(REPO / "experiments" / "paper_resnet18_imagenet.paper.csv")
    assert paper[("fp32", 32, 32, None)]["top1"] == pytest.approx(69.76)
    assert paper[("admm_epc", 4, 8, 1.2)] == {"top1": 69.11, "bops_pct": 3.13, "source": source, "label": None}
    assert paper[("cpd_epc", 8, 8, 4.0)] == {"top1": 60.82, "bops_pct": 2.07, "source": source, "label": None}
    baselines = read_paper_csv(REPO / "experiments" / "paper_resnet18_imagenet_baselines.paper.csv")
    assert baselines[("adaround", 4, 8, None)]["top1"] == pytest.approx(68.70)
    assert baselines[("adaround", 4, 8, None)]["label"] == "AdaRound"
    assert baselines[("adaround", 4, 8, None)]["bops_pct"] == pytest.approx(100 * 4 * 8 / 1024, abs=0.01)
    assert not set(baselines) & (set(paper) - {("fp32", 32, 32, None)})  # not a copy of the other table


def test_bad_paper_row_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("# c\nmethod,w_bits,a_bits,rate,bops_pct,top1\nptq,4,8,,3,60\nptq,four,8,,3,60\n")
    with pytest.raises(ValueError, match=r"p.csv:4: cannot read paper row"):
        read_paper_csv(path)


# ------------------------------------------------------------------------------ matched cost

def test_pareto_front_keeps_only_undominated_points() -> None:
    r = [Row("m", "d", "x", 4, 8, None) for _ in range(4)]
    front = pareto_front([(3.0, 70.0, r[0]), (1.0, 60.0, r[1]), (2.0, 55.0, r[2]), (4.0, 70.0, r[3])])
    assert [(c, t) for c, t, _ in front] == [(1.0, 60.0), (3.0, 70.0)]


def test_matched_cost_tables_name_the_leader_with_its_test(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "s"
    ptq4, ptq8 = correct(0.80, seed=1), correct(0.90, seed=2)
    admm_cheap, admm_mid = correct(0.70, seed=3), correct(0.86, seed=4)
    run_job(root / "p4", "ptq", ptq4, ["method=ptq", "bits=4"], bits=4, bops_pct=3.0, size_bytes=150_000)
    run_job(root / "p8", "ptq", ptq8, ["method=ptq", "bits=8"], bits=8, bops_pct=6.0, size_bytes=280_000)
    run_job(root / "a3", "admm_epc", admm_cheap, ["method=admm_epc", "rate=3"], rate=3.0, bops_pct=1.5,
            size_bytes=60_000)
    run_job(root / "a2", "admm_epc", admm_mid, ["method=admm_epc", "rate=2"], rate=2.0, bops_pct=2.5,
            size_bytes=400_000)
    report = build_report([root], root)
    (by_bops,) = matched_cost(report.rows, "bops")
    assert by_bops.budgets == [1.5, 2.5, 6.0]  # ptq w4 (3.0, 80 %) is beaten by admm r2 (2.5, 86 %)
    assert by_bops.methods == ["PTQ", "ADMM-EPC"]
    assert [sorted(b) for b in by_bops.best] == [["ADMM-EPC"], ["ADMM-EPC"], ["ADMM-EPC", "PTQ"]]
    leader, runner, result = by_bops.leader(2)
    assert (leader.method, runner.method) == ("ptq", "admm_epc") and not result.significant
    p = result.p_value
    assert p == pytest.approx(paired_comparison(ptq8, admm_mid).p_value)
    (by_size,) = matched_cost(report.rows, "size")
    assert by_size.budgets == [60_000, 150_000, 280_000]
    text = (root / "frontier.md").read_text()
    assert text == report.frontier == render_frontier_markdown(report.rows)
    assert "| %BOPs ≤ | PTQ | ADMM-EPC | Leader | p vs runner-up |" in text
    # 90 % against 86 % on 400 images: the test cannot tell them apart, so no leader is named.
    assert f"| 6.00 | 90.00 (8/8) | 86.00 (4/8, r2) | tie (PTQ, ADMM-EPC) | {p:.3f} (ADMM-EPC) |" in text
    assert "| 1.50 | – | 70.00 (4/8, r3) | ADMM-EPC | – |" in text
    assert "| Size ≤ (kB) | PTQ | ADMM-EPC | Leader | p vs runner-up |" in text
    assert "<h2>Matched cost</h2>" in (root / "index.html").read_text()
    assert main([str(root)]) == 0
    assert "# Matched cost" in capsys.readouterr().out


def test_single_method_has_no_matched_cost_view(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "s"
    run_job(root / "p4", "ptq", correct(0.8), ["method=ptq", "bits=4"])
    run_job(root / "p8", "ptq", correct(0.9), ["method=ptq", "bits=8"], bits=8)
    assert main([str(root)]) == 0
    assert "# Matched cost" not in capsys.readouterr().out
    assert "nothing to compare" in (root / "frontier.md").read_text()
    assert "Matched cost" not in (root / "index.html").read_text()


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_plot_has_a_row_of_two_panels_per_model(tmp_path: Path) -> None:
    root = tmp_path / "s"
    run_job(root / "a", "ptq", correct(0.9), ["method=ptq"])
    width, height = png_size(build_report([root], root).files["pareto.png"])
    assert width > 2.5 * height  # two panels side by side
    run_job(root / "b", "ptq", correct(0.9), ["method=ptq", "model=resnet32"], model="resnet32_cifar")
    width2, height2 = png_size(build_report([root], root).files["pareto.png"])
    assert width2 == width and height2 == pytest.approx(2 * height, rel=0.05)


def test_plot_labels_of_crowded_points_do_not_overlap() -> None:
    # Eight points at nearly the same cost and accuracy (bits and rates of two methods) between two
    # far ones: at their default place the labels collide; as drawn, no two label boxes intersect.
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    from qaf.report.plot import LABEL_OFFSET, pareto_figure

    def row(method: str, bits: int, rate: float | None, top1: float, bops: float, size: int) -> Row:
        return Row(MODEL, DATA, method, bits, 8, rate, N, top1=top1, top1_ci=(top1 - 1, top1 + 1), bops_pct=bops,
                   size_bytes=size, seeds=1, info=info_of(method))

    rows = [Row(MODEL, DATA, "fp32", 32, 32, None, N, top1=92.0, bops_pct=100.0, size_bytes=1_080_000, seeds=1,
                info=FLOAT), row("ptq", 2, None, 40.0, 0.5, 40_000), row("ptq", 8, None, 91.0, 8.0, 280_000)]
    for i in range(8):
        method = ("ptq", "admm_epc")[i % 2]
        rows.append(row(method, 4 + i // 2, None if method == "ptq" else 2.0 + i / 10, 70.0 + 0.1 * i,
                        2.0 + 0.002 * i, 150_000 + 100 * i))
    fig = pareto_figure(rows, "crowded")
    fig.canvas.draw()  # the label boxes as drawn
    renderer = fig.canvas.get_renderer()
    panels = [ax for ax in fig.axes if ax.texts]
    assert len(panels) == 2
    for ax in panels:
        assert sorted(t.get_text() for t in ax.texts) == sorted(
            f"w{r.w_bits}a{r.a_bits}" + (f" r{r.rate:g}" if r.rate else "") for r in rows[1:])
        boxes = [Text.get_window_extent(t, renderer) for t in ax.texts]
        clashes = [(a.get_text(), b.get_text()) for i, (a, p) in enumerate(zip(ax.texts, boxes))
                   for b, q in zip(ax.texts[i + 1:], boxes[i + 1:]) if p.overlaps(q)]
        assert not clashes
        far = [t for t in ax.texts if abs(t.xyann[1]) > 20]  # moved away from its point
        assert far and all(t.arrow_patch is not None for t in far)  # joined to it by a leader line
        for t in ax.texts:  # where they would have been
            t.xyann = LABEL_OFFSET
        fig.canvas.draw()
        defaults = [Text.get_window_extent(t, renderer) for t in ax.texts]
        assert sum(p.overlaps(q) for i, p in enumerate(defaults) for q in defaults[i + 1:]) >= 4
    plt.close(fig)


def budget_job(job_dir: Path, c1: np.ndarray, target: float, rates: list[float]) -> Path:
    """A finished ADMM-EPC job with ranks=budget: its layers' rates and its allocation summary."""
    result = metrics_of(c1, "admm_epc", bops_pct=target - 0.01)
    result["method_info"].update(variant="ranks=budget", rate=2.5)
    result["layers"] = [{"name": f"layer{i}.conv1", "rank": 10 + i, "rate": rate} for i, rate in enumerate(rates)]
    result["method_summary"] = {"ranks": {"target": {"bops_pct": target}, "unit": "%BOPs"}}
    return make_job(job_dir, ["method=admm_epc", "ranks=budget", f"ranks.bops_pct={target}"], result,
                    predictions=c1)


def test_budget_rows_are_their_own_series_and_the_page_shows_the_allocation(tmp_path: Path) -> None:
    root = tmp_path / "s"
    run_job(root / "u", "admm_epc", correct(0.85), ["method=admm_epc", "rate=3"], rate=3.0)
    report = build_report([root], root)
    assert "ranks.png" not in report.files and not (root / "ranks.png").exists()
    budget_job(root / "b1", correct(0.87, seed=1), 1.2, [2.0, 4.0, 3.0])
    budget_job(root / "b2", correct(0.89, seed=2), 1.7, [1.5, 2.0, 2.5])
    report = build_report([root], root)
    rows = md_rows(report.markdown)
    assert rows["ADMM-EPC"]["rate"] == "3" and rows["ADMM-EPC (ranks=budget)"]["rate"] == "2.5"
    width, height = png_size(report.files["ranks.png"])
    assert width > height
    page = report.files["index.html"].read_text()
    assert page.count("data:image/png;base64") == 2 and "Per-layer ranks under a budget" in page
    from qaf.report.plot import allocations

    (panel, series), = allocations(report.jobs).items()
    assert panel == "resnet20_cifar: ADMM-EPC"
    assert series == [("≤ 1.7 %BOPs (w4a8)", [("layer0.conv1", 1.5), ("layer1.conv1", 2.0), ("layer2.conv1", 2.5)]),
                      ("≤ 1.2 %BOPs (w4a8)", [("layer0.conv1", 2.0), ("layer1.conv1", 4.0), ("layer2.conv1", 3.0)])]

# ----------------------------------------------------------------------------------------- CLI

def test_cli_latest_and_out(tmp_path: Path, sweep: Path, capsys: pytest.CaptureFixture) -> None:
    older = tmp_path / "multirun_outputs" / "2023-12-31_00-00-00_zz99"
    run_job(older / "0", "fp32", FP32, ["method=fp32"], bops_pct=100.0)
    past = 1_600_000_000
    for p in [older, older / "0"]:
        os.utime(p, (past, past))
    assert latest_sweeps(tmp_path / "multirun_outputs") == [sweep]
    assert main(["--latest", "--root", str(tmp_path / "multirun_outputs")]) == 0
    out, err = capsys.readouterr()
    assert "| Float | 32/32 |" in out and "WARNING failed: 3" in err and "broke on purpose" in err
    assert (sweep / "table.md").is_file() and not (older / "table.md").exists()
    combined = tmp_path / "combined"
    assert main([str(sweep), str(older), "--out", str(combined), "--title", "Both"]) == 0
    with open(combined / "results.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 5
    assert (combined / "table.md").read_text().startswith("# Both\n")


def test_cli_no_finished_job_exits_1(tmp_path: Path) -> None:
    make_job(tmp_path / "s" / "0", ["method=ptq"])
    assert main([str(tmp_path / "s")]) == 1


def test_cli_rejects_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="not a directory"):
        main([str(tmp_path / "nope")])


def test_wandb_offline_run_with_table_and_scatter(sweep: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    from qaf.report.wandb_chart import TABLE_COLUMNS, log_to_wandb, sweep_groups, table_data

    jobs = collect_sweep(sweep)
    assert {k: len(v) for k, v in sweep_groups(jobs).items()} == {"s": 4}  # metrics' sweep_id
    data = table_data(jobs)
    assert [row[1] for row in data] == [OK, OK, FAILED, NOT_STARTED]
    assert data[0][3] == "Float" and data[0][4] == 32
    assert data[2][TABLE_COLUMNS.index("error")] == "ConfigError: bits=8 broke on purpose"
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dirs = log_to_wandb(jobs, "qaf-test", "offline", tmp_path / "wb")
    assert len(run_dirs) == 1  # one group per sweep, failed jobs included
    run_dir = Path(run_dirs[0])
    assert run_dir.name.startswith("offline-run-")
    assert list(run_dir.glob("*.wandb"))


def test_float_model_with_reestimated_bn_is_its_own_row(tmp_path: Path) -> None:
    # fp32 with protocol.bn_recalibration=true is another model than the plain float one: two runs
    # of it must not be averaged with the plain model into one row.
    root = tmp_path / "s"
    plain, recal = correct(0.92, seed=1), correct(0.89, seed=2)
    run_job(root / "0", "fp32", plain, ["method=fp32"], bits=32, act_bits=32, bn=False)
    run_job(root / "1", "fp32", recal, ["method=fp32", "protocol.bn_recalibration=true"], bits=32, act_bits=32,
            bn=True)
    floats = [r for r in aggregate(collect_sweep(root)) if r.method == "fp32"]
    assert sorted(r.top1 for r in floats) == pytest.approx(sorted([100 * plain.mean(), 100 * recal.mean()]))
    assert {r.protocol[1] for r in floats if r.protocol} == {"on, train transform"}
