"""The HTML report as headless Chromium renders it: the table's rows and a screenshot.

Skipped when no Chromium is found, unless ``QAF_REQUIRE_BROWSER=1`` (set by CI), which turns
the missing browser into a failure so that CI cannot pass by skipping.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import struct
import sys
import time
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from qaf.methods.cp import CP
from qaf.methods.fp32 import FP32
from qaf.methods.ptq import PTQ
from qaf.quant.policy import LayerPolicy
from qaf.report import build_report
from qaf.report.browser import (BrowserNotFound, find_chromium, follow_links, render_dom, require_chromium,
                                screenshot)
from qaf.report.collect import launch_from_hydra, record_launch

REPO = Path(__file__).resolve().parents[1]
REQUIRE = os.environ.get("QAF_REQUIRE_BROWSER", "") not in ("", "0")
FP32_TOP1 = 91.73
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def chromium() -> str:
    """The browser binary; skip (or fail under ``QAF_REQUIRE_BROWSER=1``) without one."""
    try:
        return require_chromium()
    except BrowserNotFound as err:
        if REQUIRE:
            pytest.fail(f"QAF_REQUIRE_BROWSER=1 but {err}", pytrace=False)
        pytest.skip(str(err))


#: What the methods declare (labels, rate, reference), as the pipeline records it.
INFO = {"fp32": FP32().info, "ptq": PTQ().info, "admm_epc": CP(init="epc", solver="admm").info}
#: Each method's reference layer policy (conf/method/ chooses it), as the pipeline records it.
POLICY = {"fp32": "uniform", "ptq": "uniform", "admm_epc": "qaf"}
COMMIT = "0123456789abcdef0123456789abcdef01234567"
ARGV = ["run.py", "-m", "method=fp32,ptq", "bits=4", "hydra.sweep.dir=/where it ran"]


def write_job(job_dir: Path, method: str, bits: int, top1: float, bops_pct: float,
              rate: float | None = None, seed: int = 0) -> None:
    """A finished job as Hydra and the pipeline leave it: .hydra/ configs, run.log and metrics.json."""
    overrides = [f"method={method}", f"bits={bits}", f"seed={seed}"]
    config = {"bits": bits, "act_bits": 8, "rate": rate, "seed": seed}
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job_dir / "run.log").write_text(f"[qaf][INFO] - run {method}{bits}{seed}\n")
    policy = LayerPolicy.from_config(yaml.safe_load((REPO / "conf" / "policy" / f"{POLICY[method]}.yaml").read_text()))
    metrics = {"method": method, "model": "resnet20_cifar", "data": "cifar10_embedded",
               "bits": bits, "act_bits": 8, "rate": rate, "seed": seed, "top1": top1,
               "top5": min(100.0, top1 + 8), "fp32_top1": FP32_TOP1, "bops_pct": bops_pct,
               "eval_samples": 10000, "top1_ci95": [top1 - 0.5, top1 + 0.5], "policy": policy.name,
               "protocol": {"bn_recalibration": method != "fp32", "calib_samples": 2048, "calib_split": "train",
                            "bn_transform": "train", "calib_transform": "eval", "policy": policy.as_dict(),
                            "finetune": None},
               "config_hash": f"{method}{bits}{seed}", "config": config,
               "code": {"qaf_version": "0.1.0", "git_commit": COMMIT, "git_dirty": False},
               "method_info": dataclasses.asdict(INFO[method])}
    (job_dir / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """Float, PTQ W4A8, and ADMM-EPC W4A8 at rate 2.5 with two seeds (72.00 and 74.00), and the
    record of the launch that wrote them."""
    root = tmp_path / "2024-01-01_00-00-00_browser"
    write_job(root / "0", "fp32", 32, FP32_TOP1, 100.0)
    write_job(root / "1", "ptq", 4, 85.25, 6.5)
    write_job(root / "2", "admm_epc", 4, 72.0, 1.75, rate=2.5, seed=0)
    write_job(root / "3", "admm_epc", 4, 74.0, 1.75, rate=2.5, seed=1)
    record_launch(root, launch_from_hydra({}, started=1_700_000_000.0, argv=ARGV))
    return root


class Tables(HTMLParser):
    """Every ``<table>`` of a document as rows of cell texts (``th`` and ``td`` alike), the links of
    each row (``links[table][row]``: hrefs as written) and the document's whole text."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.links: list[list[list[str]]] = []
        self.text: list[str] = []
        self._row: list[str] | None = None
        self._hrefs: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "table":
            self.tables.append([])
            self.links.append([])
        elif tag == "tr" and self.tables:
            self._row, self._hrefs = [], []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "a" and self._row is not None:
            self._hrefs += [value for name, value in attrs if name == "href"]

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[-1].append(self._row)
            self.links[-1].append(self._hrefs)
            self._row = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def table_with(self, header: str) -> tuple[list[list[str]], list[list[str]]]:
        """The first table with a column called ``header``: its rows and their links."""
        return next((t, links) for t, links in zip(self.tables, self.links) if t and header in t[0])


def column(header: list[str], name: str) -> int:
    """The index of the column called ``name`` (exactly, else the first starting with it)."""
    for i, text in enumerate(header):
        if text == name:
            return i
    for i, text in enumerate(header):
        if text.startswith(name):
            return i
    raise AssertionError(f"no {name!r} column in {header}")


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_rendered_table_has_the_rows(chromium: str, sweep: Path) -> None:
    report = build_report([sweep], sweep)
    dom = render_dom(report.files["index.html"])
    parser = Tables()
    parser.feed(dom)
    (header, *body), _ = parser.table_with("Method")
    method, top1 = column(header, "Method"), column(header, "Top-1")
    assert [row[method] for row in body] == ["Float", "PTQ", "ADMM-EPC"]
    # The first number of the cell: a spread or an interval may follow it.
    tops = [float(row[top1].split()[0]) for row in body]
    assert tops == pytest.approx([FP32_TOP1, 85.25, 73.0])
    assert all(len(row) == len(header) for row in body)


def test_page_says_what_ran_and_links_every_row_to_its_files(chromium: str, sweep: Path) -> None:
    page = build_report([sweep], sweep).files["index.html"]
    parser = Tables()
    parser.feed(render_dom(page))
    text = " ".join(" ".join(parser.text).split())
    # What ran: the command (from the launch record), its date, the code version.
    assert f"Command python {shlex.join(ARGV)} ({time.strftime('%Y-%m-%d %H:%M', time.localtime(1.7e9))})" in text
    assert f"Code {COMMIT[:12]} (qaf 0.1.0)" in text
    assert "Model resnet20_cifar" in text and "Data cifar10_embedded, 10000 evaluation images" in text
    assert "Protocol BN re-estimation on, train transform; calibration 2048 train images, eval transform" in text
    # The legend of the policies in use, role by role, from what the jobs recorded.
    (header, *policies), _ = parser.table_with("Policy")
    legend = {row[0]: dict(zip(header, row)) for row in policies}
    assert set(legend) == {"uniform", "qaf"}
    assert legend["uniform"]["Used by"] == "PTQ" and legend["qaf"]["Used by"] == "ADMM-EPC"
    assert (legend["uniform"]["1x1 shortcut convs"], legend["qaf"]["1x1 shortcut convs"]) == ("w/a bits", "8/8 bits")
    assert legend["qaf"]["first conv"] == legend["qaf"]["classifier"] == "8/8 bits"
    # Each row links to its job folders, metrics.json and run.log, and each link opens in Chromium.
    (header, *rows), links = parser.table_with("Method")
    shown = follow_links(page)
    method = column(header, "Method")
    for row, hrefs in zip(rows, links[1:]):
        assert hrefs, f"row {row[method]} has no link"
        targets = {urllib.parse.urljoin(page.resolve().as_uri(), h): h for h in hrefs}
        assert all(shown[url] is not None for url in targets), row[method]
        metrics = [json.loads(shown[url]) for url in targets if url.endswith("/metrics.json")]  # type: ignore[arg-type]
        assert {m["method_info"]["display"] for m in metrics} == {row[method]}
        assert all("metrics.json" in shown[url] for url in targets if url.endswith("/"))  # folder listings
        assert any("[qaf][INFO] - run" in shown[url] for url in targets if url.endswith("/run.log"))
    assert len(links[-1]) == 6  # two seeds, three links each


def test_screenshot_is_a_png_of_the_page(chromium: str, sweep: Path, tmp_path: Path) -> None:
    page = build_report([sweep], sweep).files["index.html"]
    fixed = screenshot(page, tmp_path / "fixed.png", width=900, height=700)
    assert png_size(fixed) == (900, 700)
    full = screenshot(page, tmp_path / "img" / "full.png", width=1000)
    width, height = png_size(full)
    # The whole page: title, table, the embedded Pareto plot (a few hundred pixels) and text.
    assert width >= 1000 and 400 <= height <= 16384  # wider content widens it
    assert full.stat().st_size > 10_000  # a plot and text, not a blank page


def test_cli_refreshes_report_and_writes_png(chromium: str, sweep: Path, tmp_path: Path, monkeypatch,
                                            capsys) -> None:
    import runpy

    out = tmp_path / "docs" / "dashboard.png"
    script = REPO / "scripts" / "screenshot_dashboard.py"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(script), str(sweep), "--out", str(out), "--width", "800", "--height", "600"])
    with pytest.raises(SystemExit) as exit_:  # `python scripts/screenshot_dashboard.py ...`, in this process
        runpy.run_path(str(script), run_name="__main__")
    assert exit_.value.code == 0, capsys.readouterr().err
    assert (sweep / "index.html").is_file()
    assert png_size(out) == (800, 600)


def test_missing_browser_is_one_clear_line(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    monkeypatch.setenv("QAF_CHROMIUM", str(tmp_path / "no-such-chromium"))
    assert find_chromium() is None
    with pytest.raises(BrowserNotFound) as err:
        require_chromium()
    message = str(err.value)
    assert "\n" not in message
    assert "apt-get install chromium" in message and "QAF_CHROMIUM" in message
