"""The sweep report on fake sweep directories laid out as Hydra and the pipeline write them."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import yaml

from qaf.report import build_report
from qaf.report.__main__ import main
from qaf.report.collect import (FAILED, INCOMPLETE, NOT_STARTED, OK, collect_sweep,
                                expected_overrides, latest_sweeps)
from qaf.report.tables import Row, aggregate, read_paper_csv, render_latex

REPO = Path(__file__).resolve().parents[1]
FP32_TOP1 = 91.73


def metrics(method: str, bits: int, act_bits: int = 8, rate: float = 2.0, seed: int = 0,
            top1: float = 80.0, bops_pct: float = 5.0, sweep_id: str = "s",
            model: str = "resnet20_cifar") -> dict:
    """A metrics.json as the pipeline writes it (the keys of docs/design.md)."""
    return {
        "method": method, "model": model, "data": "cifar10_embedded",
        "bits": bits, "act_bits": act_bits, "rate": rate, "seed": seed, "top1": top1,
        "top5": min(100.0, top1 + 8), "fp32_top1": FP32_TOP1, "macs": 41_000_000,
        "fp32_macs": 41_000_000, "bops": 1.0e9, "bops_pct": bops_pct, "params": 270_000,
        "compressed_bits": 1_000_000, "layers": [{"name": "layer1.0.conv1"}],
        "timings": {"total": 1.0}, "sweep_id": sweep_id,
        "overrides": [f"method={method}", f"bits={bits}"], "config_hash": "abc",
        "config": {"bits": bits, "act_bits": act_bits, "rate": rate, "seed": seed,
                   "sweep_id": sweep_id},
    }


def make_job(job_dir: Path, overrides: list[str], result: dict | None,
             choices: dict | None = None, log: str = "", conf_dir: Path | None = None) -> Path:
    """Write a job directory: .hydra/{config,overrides,hydra}.yaml, a log, metrics.json."""
    hydra_dir = job_dir / ".hydra"
    hydra_dir.mkdir(parents=True)
    cfg = {k.split("=")[0]: yaml.safe_load(k.split("=", 1)[1]) for k in overrides}
    (hydra_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    (hydra_dir / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    sources = [{"path": str(conf_dir), "schema": "file", "provider": "main"}] if conf_dir else []
    runtime = {"choices": choices or {"method": cfg.get("method", "fp32")},
               "config_sources": sources, "output_dir": str(job_dir)}
    (hydra_dir / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": runtime}}))
    (job_dir / "run.log").write_text(log)
    if result is not None:
        (job_dir / "metrics.json").write_text(json.dumps(result))
    return job_dir


def write_multirun(sweep: Path, task: list[str], params: dict | None = None) -> None:
    """The sweep root's multirun.yaml (only the keys the report reads)."""
    hydra = {"overrides": {"task": task}, "sweeper": {"params": params or {}},
             "runtime": {"choices": {"hydra/sweeper": "basic"}}}
    sweep.mkdir(parents=True, exist_ok=True)
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": hydra}))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """method=fp32,ptq bits=4,8 with ptq bits=8 failed and ptq bits=4 never started, plus
    admm_epc with two seeds at one rate."""
    root = tmp_path / "multirun_outputs" / "2024-01-01_00-00-00_ab12"
    write_multirun(root, ["method=fp32,ptq", "bits=4,8"])
    make_job(root / "0", ["method=fp32", "bits=4"], metrics("fp32", 4, top1=FP32_TOP1,
                                                             bops_pct=100.0))
    make_job(root / "1", ["method=fp32", "bits=8"], metrics("fp32", 8, top1=FP32_TOP1,
                                                            bops_pct=100.0))
    make_job(root / "3", ["method=ptq", "bits=8"], None,
             log="[INFO] start\nqaf.config.ConfigError: bits=8 broke on purpose\n")
    return root


def test_statuses_and_not_started_jobs(sweep: Path) -> None:
    jobs = collect_sweep(sweep)
    by_name = {j.name: j for j in jobs}
    assert by_name["0"].status == OK and by_name["1"].status == OK
    assert by_name["3"].status == FAILED
    assert "broke on purpose" in by_name["3"].error
    missing = [j for j in jobs if j.status == NOT_STARTED]
    assert [sorted(j.overrides) for j in missing] == [["bits=4", "method=ptq"]]


def test_incomplete_job_without_error(tmp_path: Path) -> None:
    make_job(tmp_path / "s" / "0", ["method=ptq", "bits=4"], None, log="[INFO] running\n")
    (job,) = collect_sweep(tmp_path / "s")
    assert job.status == INCOMPLETE and job.error is None


def test_expected_overrides_combine_sweeper_params_and_command_line(tmp_path: Path) -> None:
    write_multirun(tmp_path, ["method=admm,admm_epc", "seed=1"], {"bits": "4,6,8"})
    combos = expected_overrides(tmp_path)
    assert len(combos) == 6
    assert ["bits=6", "method=admm_epc", "seed=1"] in combos


def test_float_row_on_top_and_fp32_shown_as_32_32(sweep: Path) -> None:
    make_job(sweep / "2", ["method=ptq", "bits=4"], metrics("ptq", 4, top1=85.0, bops_pct=6.5))
    rows = aggregate(collect_sweep(sweep))
    assert [(r.method, r.w_bits, r.a_bits) for r in rows] == [("fp32", 32, 32), ("ptq", 4, 8)]
    # fp32 at bits=4 and bits=8 are the same experiment (same seed): no spread.
    assert rows[0].top1 == pytest.approx(FP32_TOP1) and rows[0].top1_std is None
    assert rows[1].rate is None  # PTQ does not factorize: no rate column value


def test_seeds_give_mean_and_std(tmp_path: Path) -> None:
    root = tmp_path / "s"
    for i, (seed, top1) in enumerate([(0, 70.0), (1, 72.0), (2, 74.0)]):
        make_job(root / str(i), ["method=admm_epc", f"seed={seed}"],
                 metrics("admm_epc", 4, rate=2.5, seed=seed, top1=top1, bops_pct=1.75))
    rows = aggregate(collect_sweep(root))
    admm = [r for r in rows if r.method == "admm_epc"]
    assert len(admm) == 1
    assert admm[0].top1 == pytest.approx(72.0)
    assert admm[0].top1_std == pytest.approx(2.0)
    assert admm[0].seeds == 3 and admm[0].rate == 2.5
    # No fp32 job ran: the float row comes from fp32_top1.
    assert rows[0].method == "fp32" and rows[0].top1 == pytest.approx(FP32_TOP1)


def test_report_files_list_failed_and_missing_jobs(sweep: Path) -> None:
    report = build_report([sweep], sweep)
    for path in report.files.values():
        assert path.is_file() and path.stat().st_size > 0
    md = (sweep / "table.md").read_text()
    assert "| Float | 32/32 | – | 100.00 | 91.73 |" in md
    assert "failed: 3" in md and "broke on purpose" in md
    assert "not started" in md and "2 of 4 jobs finished" in md
    html = (sweep / "index.html").read_text()
    assert "data:image/png;base64," in html and "broke on purpose" in html
    assert (sweep / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(sweep / "results.csv") as fh:
        recs = list(csv.DictReader(fh))
    assert [r["status"] for r in recs] == [OK, OK, FAILED, NOT_STARTED]
    assert recs[0]["w_bits"] == "32"  # fp32 jobs report a float model


def test_latex_has_float_row_then_rule() -> None:
    rows = [Row("m", "d", "fp32", 32, 32, None, top1=91.7, bops_pct=100.0),
            Row("m", "d", "cpd_epc", 4, 8, 2.0, top1=60.1, top1_std=0.5, bops_pct=2.07)]
    tex = render_latex(rows, "a_b")
    lines = tex.splitlines()
    float_line = next(i for i, line in enumerate(lines) if line.startswith("Float"))
    assert lines[float_line + 1] == "\\midrule"
    assert "CPD-EPC$\\to$PTQ & 4/8 & 2 & 2.07 & 60.10 $\\pm$ 0.50 \\\\" in tex
    assert "a\\_b" in tex


def test_paper_column_from_experiment(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    (conf / "experiment").mkdir(parents=True)
    (conf / "experiment" / "toy.paper.csv").write_text(
        "# toy numbers\nmethod,w_bits,a_bits,rate,bops_pct,top1\n"
        "fp32,32,32,,100,69.76\nadmm_epc,4,8,2,2.07,67.75\nadmm_epc,4,8,3,1.54,64.57\n")
    root = tmp_path / "s"
    make_job(root / "0", ["method=admm_epc", "experiment=toy"],
             metrics("admm_epc", 4, rate=2.0, top1=66.0, bops_pct=2.1),
             choices={"method": "admm_epc", "experiment": "toy"}, conf_dir=conf)
    report = build_report([root], root)
    assert report.paper_csv == conf / "experiment" / "toy.paper.csv"
    md = report.markdown
    assert "Top-1 (paper)" in md
    assert "| ADMM-EPC | 4/8 | 2 | 2.10 | 66.00 | 2.07 | 67.75 |" in md
    # A paper setting we did not run is shown, without our numbers.
    assert "| ADMM-EPC | 4/8 | 3 | – | – | 1.54 | 64.57 |" in md
    # Reported beside a sweep of another model, the paper numbers stay with the experiment's.
    other = tmp_path / "other"
    make_job(other / "0", ["method=ptq"], metrics("ptq", 4, model="resnet32_cifar"))
    rows = build_report([root, other], tmp_path / "both").rows
    assert {r.model for r in rows if r.paper_top1 is not None} == {"resnet20_cifar"}
    assert {r.model for r in rows} == {"resnet20_cifar", "resnet32_cifar"}


@pytest.mark.parametrize("name", ["paper_resnet18_imagenet"])
def test_shipped_paper_csv_parses(name: str) -> None:
    paper = read_paper_csv(REPO / "experiments" / f"{name}.paper.csv")
    assert paper[("fp32", 32, 32, None)]["top1"] == pytest.approx(69.76)
    assert paper[("admm_epc", 4, 8, 1.2)] == {"top1": 69.11, "bops_pct": 3.13}
    assert paper[("cpd_epc", 8, 8, 4.0)] == {"top1": 60.82, "bops_pct": 2.07}


def test_cli_latest_and_out(tmp_path: Path, sweep: Path, capsys: pytest.CaptureFixture) -> None:
    older = tmp_path / "multirun_outputs" / "2023-12-31_00-00-00_zz99"
    make_job(older / "0", ["method=fp32"], metrics("fp32", 4, top1=FP32_TOP1, bops_pct=100.0))
    past = 1_600_000_000
    for p in [older, older / "0"]:
        os.utime(p, (past, past))
    assert latest_sweeps(tmp_path / "multirun_outputs") == [sweep]
    assert main(["--latest", "--root", str(tmp_path / "multirun_outputs")]) == 0
    out, err = capsys.readouterr()
    assert "| Float | 32/32 |" in out and "broke on purpose" in err
    assert (sweep / "table.md").is_file() and not (older / "table.md").exists()
    combined = tmp_path / "combined"
    assert main([str(sweep), str(older), "--out", str(combined)]) == 0
    with open(combined / "results.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 5


def test_cli_no_finished_job_exits_1(tmp_path: Path) -> None:
    make_job(tmp_path / "s" / "0", ["method=ptq"], None)
    assert main([str(tmp_path / "s")]) == 1


def test_cli_rejects_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="not a directory"):
        main([str(tmp_path / "nope")])


def test_wandb_offline_run_with_table_and_scatter(sweep: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    from qaf.report.collect import collect_sweep as collect_one
    from qaf.report.wandb_chart import log_to_wandb, sweep_groups, table_data

    jobs = collect_one(sweep)
    assert {k: len(v) for k, v in sweep_groups(jobs).items()} == {"s": 4}  # metrics' sweep_id
    data = table_data(jobs)
    assert [row[1] for row in data] == [OK, OK, FAILED, NOT_STARTED]
    assert data[0][3] == "Float" and data[0][4] == 32
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dirs = log_to_wandb(jobs, "qaf-test", "offline", tmp_path / "wb")
    assert len(run_dirs) == 1  # one group per sweep, failed jobs included
    run_dir = Path(run_dirs[0])
    assert run_dir.name.startswith("offline-run-")
    assert list(run_dir.glob("*.wandb"))
