"""Sweep reports: read every job of one or more sweeps and write ``results.csv``, ``table.md``,
``table.tex``, ``pareto.png``, ``frontier.md`` and ``index.html`` (``python -m qaf.report DIR``),
and ``ranks.png`` when jobs chose their CP ranks per layer under a budget.

- :mod:`qaf.report.collect`: job folders and their statuses, the jobs each launch expected;
- :mod:`qaf.report.tables`: rows (intervals, paired tests, protocol), csv, Markdown, LaTeX;
- :mod:`qaf.report.compare`: two runs on the same images (``--compare``);
- :mod:`qaf.report.pareto`: matched cost, which method wins at equal %BOPs or size;
- :mod:`qaf.report.plot`, :mod:`qaf.report.html`, :mod:`qaf.report.wandb_chart`: plot, page, W&B.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from qaf.report.collect import OK, Job, collect
from qaf.report.html import Page, render_html
from qaf.report.pareto import count_methods, mark_rows, render_frontier_markdown
from qaf.report.plot import plot_allocation, plot_pareto
from qaf.report.tables import (BOPS_FIELDS, Row, aggregate, bops_note, job_key, read_paper_csv, render_latex,
                               render_markdown, render_results_csv)

# Where experiment configs (and their .paper.csv files) live in a clone of the repository.
REPO_EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
#: The files a report writes, by name.
REPORT_FILES = ("results.csv", "table.md", "table.tex", "pareto.png", "frontier.md", "index.html")


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
    bops : str
        The %BOPs convention of the table and plot (``qaf`` or ``paper``).
    files : dict[str, Path]
        :data:`REPORT_FILES` by name, and ``ranks.png`` when written.
    markdown : str
        The Markdown table (also printed by the command line).
    frontier : str
        The matched-cost Markdown (``frontier.md``).
    """

    out_dir: Path
    jobs: list[Job]
    rows: list[Row]
    paper_csv: Path | None
    bops: str
    files: dict[str, Path]
    markdown: str
    frontier: str

    @property
    def methods(self) -> int:
        """How many methods (series) with results the report compares."""
        return count_methods(self.rows)


def find_paper_csvs(jobs: Sequence[Job]) -> list[Path]:
    """The ``<experiment>.paper.csv`` files beside the experiment configs the jobs were composed with.

    Parameters
    ----------
    jobs : Sequence[Job]
        Jobs whose Hydra choices may name an ``experiment`` (several experiments may share a
        sweep folder, e.g. the paper's factorization and baseline halves).

    Returns
    -------
    list[Path]
        One file per experiment that has one, in job order, looked up in each job's config
        directories (``<conf>/experiment/``) and then in the repository's ``experiments/``.
    """
    found: dict[str, Path] = {}
    for job in jobs:
        name = job.experiment
        if not name or name in found:
            continue
        for d in [d / "experiment" for d in job.config_dirs] + [REPO_EXPERIMENTS]:
            candidate = d / f"{name}.paper.csv"
            if candidate.is_file():
                found[name] = candidate
                break
    return list(found.values())


def choose_bops(requested: str | None, paper_csv: Path | None) -> tuple[str, str | None]:
    """The %BOPs convention and why: as requested, else ``paper`` beside paper numbers, else ``qaf``.

    Parameters
    ----------
    requested : str | None
        ``qaf``, ``paper`` or None (automatic).
    paper_csv : Path | None
        The paper numbers the report shows.

    Returns
    -------
    tuple[str, str | None]
        The convention and, when chosen automatically for paper numbers, the reason to print.
    """
    if requested is not None:
        if requested not in BOPS_FIELDS:
            raise ValueError(f"bops={requested!r}: accepted {', '.join(BOPS_FIELDS)}")
        return requested, None
    if paper_csv is not None:
        return "paper", f"chosen to match the paper numbers of {paper_csv.name}; --bops qaf for qaf's count"
    return "qaf", None


def _atomic_write(path: Path, text: str) -> None:
    # Another report (or a browser) may read these while we write: never leave half a file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def build_report(sweeps: Sequence[Path], out_dir: Path, paper_csv: Path | None = None,
                 title: str | None = None, bops: str | None = None) -> Report:
    """Read the sweeps and write the report files into ``out_dir``.

    Parameters
    ----------
    sweeps : Sequence[Path]
        Sweep directories (or single-run directories).
    out_dir : Path
        Where to write; created if needed.
    paper_csv : Path | None
        Paper numbers to show beside ours; found from the jobs' experiments when None.
    title : str | None
        Title of the table and plot; the sweep names by default.
    bops : str | None
        %BOPs convention, ``qaf`` or ``paper``; None: ``paper`` when paper numbers are shown,
        else ``qaf`` (:func:`choose_bops`).

    Returns
    -------
    Report
        Paths written, rows and jobs.
    """
    jobs = collect(sweeps)
    paper_for = None
    csvs = [paper_csv] if paper_csv is not None else find_paper_csvs(jobs)
    if paper_csv is None and csvs:
        # Found through an experiment: the numbers belong to the experiment's model and data,
        # not to other sweeps reported alongside.
        paper_for = {job_key(j)[:2] for j in jobs if j.status == OK and j.experiment}
    paper = {key: row for path in csvs for key, row in read_paper_csv(path).items()} or None
    paper_csv = csvs[0] if csvs else None
    convention, reason = choose_bops(bops, paper_csv)
    rows = aggregate(jobs, paper, paper_for, bops=convention)
    mark_rows(rows)
    note = bops_note(convention, reason)
    title = title or "Sweep " + ", ".join(Path(s).resolve().name for s in sweeps)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {name: out_dir / name for name in REPORT_FILES}
    markdown = render_markdown(rows, jobs, title, note)
    frontier = render_frontier_markdown(rows)
    _atomic_write(files["results.csv"], render_results_csv(jobs))
    _atomic_write(files["table.md"], markdown)
    _atomic_write(files["table.tex"], render_latex(rows, title, note))
    _atomic_write(files["frontier.md"], frontier)
    plot_pareto(rows, files["pareto.png"], title)
    allocation = plot_allocation(jobs, out_dir / "ranks.png", title)
    if allocation is not None:
        files["ranks.png"] = allocation
    _atomic_write(files["index.html"], render_html(Page(rows, jobs, title, out_dir, sweeps, files["pareto.png"], note,
                                                        allocation)))
    return Report(out_dir, jobs, rows, paper_csv, convention, files, markdown, frontier)
