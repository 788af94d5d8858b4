"""Sweep reports: read every job of one or more sweeps and write ``results.csv``, ``table.md``,
``table.tex``, ``pareto.png`` and ``index.html`` (``python -m qaf.report DIR [DIR ...]``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from qaf.report.collect import OK, Job, collect
from qaf.report.html import render_html
from qaf.report.plot import plot_pareto
from qaf.report.tables import (Row, aggregate, job_key, read_paper_csv, render_latex,
                               render_markdown, render_results_csv)

# Where experiment configs (and their .paper.csv files) live in a clone of the repository.
REPO_EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


@dataclass
class Report:
    """What a report wrote and what it found.

    Attributes
    ----------
    out_dir : Path
        Directory holding the files.
    jobs : list[Job]
        Every job, with its status.
    rows : list[Row]
        The table rows.
    paper_csv : Path | None
        The paper numbers used, if any.
    files : dict[str, Path]
        ``results.csv``, ``table.md``, ``table.tex``, ``pareto.png``, ``index.html``.
    markdown : str
        The Markdown table (also printed by the command line).
    """

    out_dir: Path
    jobs: list[Job]
    rows: list[Row]
    paper_csv: Path | None
    files: dict[str, Path]
    markdown: str


def find_paper_csv(jobs: list[Job]) -> Path | None:
    """The ``<experiment>.paper.csv`` beside the experiment config the jobs were composed with.

    Parameters
    ----------
    jobs : list[Job]
        Jobs whose Hydra choices may name an ``experiment``.

    Returns
    -------
    Path | None
        The first existing file, looked up in each job's config directories
        (``<conf>/experiment/``) and then in the repository's ``experiments/``.
    """
    for job in jobs:
        name = job.experiment
        if not name:
            continue
        dirs = [d / "experiment" for d in job.config_dirs] + [REPO_EXPERIMENTS]
        for d in dirs:
            candidate = d / f"{name}.paper.csv"
            if candidate.is_file():
                return candidate
    return None


def _atomic_write(path: Path, text: str) -> None:
    # Another report (or a browser) may read these while we write: never leave half a file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def build_report(sweeps: list[Path], out_dir: Path, paper_csv: Path | None = None,
                 title: str | None = None) -> Report:
    """Read the sweeps and write the report files into ``out_dir``.

    Parameters
    ----------
    sweeps : list[Path]
        Sweep directories (or single-run directories).
    out_dir : Path
        Where to write; created if needed.
    paper_csv : Path | None
        Paper numbers to show beside ours; found from the jobs' experiment when None.
    title : str | None
        Title of the table and plot; the sweep names by default.

    Returns
    -------
    Report
        Paths written, rows and jobs.
    """
    jobs = collect(sweeps)
    paper_for = None
    if paper_csv is None and (paper_csv := find_paper_csv(jobs)) is not None:
        # Found through an experiment: the numbers belong to the experiment's model and data,
        # not to other sweeps reported alongside.
        paper_for = {job_key(j)[:2] for j in jobs if j.status == OK and j.experiment}
    paper = read_paper_csv(paper_csv) if paper_csv else None
    rows = aggregate(jobs, paper, paper_for)
    title = title or "Sweep " + ", ".join(Path(s).resolve().name for s in sweeps)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {name: out_dir / name for name in
             ("results.csv", "table.md", "table.tex", "pareto.png", "index.html")}
    markdown = render_markdown(rows, jobs, title)
    _atomic_write(files["results.csv"], render_results_csv(jobs))
    _atomic_write(files["table.md"], markdown)
    _atomic_write(files["table.tex"], render_latex(rows, title))
    plot_pareto(rows, files["pareto.png"], title)
    _atomic_write(files["index.html"], render_html(rows, jobs, title, files["pareto.png"]))
    return Report(out_dir, jobs, rows, paper_csv, files, markdown)
