"""The documented figures come from the code: three rows of docs/results.md are rerun from their
recorded overrides and must give exactly the documented numbers (slow: each evaluates all 10,000
test images). PTQ, a quantized CP and the headline ADMM-EPC row: the solvers are where a thread
count or a code change would move a figure."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from conftest import ROOT, compose

DOCS = ROOT / "docs"
ROWS = [  # (sweep CSV in docs/results/, job folder name)
    ("cifar10_baselines", "act_bits=8,bits=4,method.clip=mse,method.per_channel=False,method=ptq"),
    ("cifar10_qaf", "bits=4,method=cpd,rate=2"),
    ("cifar10_qaf", "bits=4,method=admm_epc,rate=2"),
]


def documented(sweep: str, job: str) -> dict[str, str]:
    with open(DOCS / "results" / f"{sweep}.csv", newline="") as f:
        (row,) = [r for r in csv.DictReader(f) if r["job"] == job]
    return row


@pytest.mark.slow
@pytest.mark.parametrize("sweep, job", ROWS, ids=[j.rsplit("method=", 1)[1] for _, j in ROWS])
def test_a_documented_row_is_what_the_code_computes(sweep: str, job: str, tmp_path: Path, monkeypatch) -> None:
    from qaf.pipeline import run

    row = documented(sweep, job)
    assert row["status"] == "ok" and row["code"], "a documented row records the commit that produced it"
    monkeypatch.chdir(tmp_path)
    metrics = run(compose(*row["overrides"].split(), "logger=none", "progress=false", "cache.dir=cache",
                          "sweep_id=rerun"))
    assert metrics["eval_samples"] == int(row["eval_samples"]) == 10_000
    assert metrics["top1"] == float(row["top1"])
    assert metrics["top1_ci95"] == [float(row["top1_ci_low"]), float(row["top1_ci_high"])]
    assert metrics["bops_pct"] == pytest.approx(float(row["bops_pct"]), rel=1e-12)
    assert metrics["size_bytes"] == int(row["size_bytes"])
    lo, hi = metrics["top1_ci95"]
    assert f"{metrics['top1']:.2f} [{lo:.2f}, {hi:.2f}]" in (DOCS / "results.md").read_text()
