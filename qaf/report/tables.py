"""Turn jobs into the paper's table: Method | w/a | rate | %BOPs | Top-1 (csv, Markdown, LaTeX).

One row per (model, data, method, weight bits, activation bits, rate); several seeds of the same
setting are shown as mean ± std. The float model is the top row. Paper numbers, when known, sit
beside ours.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from qaf.report.collect import INCOMPLETE, OK, Job

FLOAT_METHOD = "fp32"
# Methods whose result depends on the rate: only they show one. Baselines keep every weight.
FACTORIZING = {"cpd", "cpd_epc", "admm", "admm_epc"}
DISPLAY = {
    "fp32": "Float",
    "ptq": "PTQ",
    "lapq": "LAPQ",
    "cpd": "CPD→PTQ",
    "cpd_epc": "CPD-EPC→PTQ",
    "admm": "ADMM",
    "admm_epc": "ADMM-EPC",
}
_ORDER = list(DISPLAY)

Key = tuple[str, str, str, int, int, "float | None"]  # model, data, method, w, a, rate


@dataclass
class Row:
    """One line of the table: a setting and its aggregated results.

    Attributes
    ----------
    model, data, method : str
        What was run.
    w_bits, a_bits : int
        Weight and activation bit widths (32/32 for the float model).
    rate : float | None
        Parameter reduction rate; None for methods that do not factorize.
    top1, top1_std : float | None
        Mean and standard deviation over seeds (std None with a single seed).
    top5, bops_pct : float | None
        Means over seeds.
    seeds : int
        Number of distinct seeds aggregated (0 for a paper-only row).
    paper_top1, paper_bops_pct : float | None
        The paper's numbers for this setting, when known.
    jobs : list[Job]
        The finished jobs behind the row.
    """

    model: str
    data: str
    method: str
    w_bits: int
    a_bits: int
    rate: float | None
    top1: float | None = None
    top1_std: float | None = None
    top5: float | None = None
    bops_pct: float | None = None
    seeds: int = 0
    paper_top1: float | None = None
    paper_bops_pct: float | None = None
    jobs: list[Job] = field(default_factory=list)

    @property
    def key(self) -> Key:
        """The row's identity."""
        return (self.model, self.data, self.method, self.w_bits, self.a_bits, self.rate)

    @property
    def base_method(self) -> str:
        """The method without its variant (``ptq[clip=mse]`` -> ``ptq``)."""
        return self.method.partition("[")[0]

    @property
    def label(self) -> str:
        """The method as the paper names it, with the swept method options, e.g. ``PTQ (clip=mse)``."""
        variant = self.method.partition("[")[2].rstrip("]")
        name = DISPLAY.get(self.base_method, self.base_method)
        return f"{name} ({variant})" if variant else name


def job_key(job: Job) -> Key:
    """The table row a finished job belongs to.

    Parameters
    ----------
    job : Job
        A job with status ``ok``.

    Returns
    -------
    Key
        (model, data, method, w_bits, a_bits, rate); the float model is 32/32 without rate; swept
        ``method.*`` options make the method ``name[key=value,...]``.
    """
    m = job.metrics or {}
    method = str(m.get("method", job.method))
    if method == FLOAT_METHOD:
        return (str(m.get("model", "?")), str(m.get("data", "?")), method, 32, 32, None)
    rate = float(m["rate"]) if method in FACTORIZING and m.get("rate") is not None else None
    # Swept method options (method.clip=mse, ...) are different methods, not repeats to average.
    variant = ",".join(sorted(o.split(".", 1)[1] for o in job.overrides if o.startswith("method.")))
    if variant:
        method = f"{method}[{variant}]"
    return (str(m.get("model", "?")), str(m.get("data", "?")), method,
            int(m.get("bits", 32)), int(m.get("act_bits", 32)), rate)


def aggregate(jobs: Iterable[Job], paper: dict[tuple, dict] | None = None,
              paper_for: set[tuple[str, str]] | None = None) -> list[Row]:
    """Group finished jobs into table rows, mean ± std over seeds, float row first.

    Parameters
    ----------
    jobs : Iterable[Job]
        Jobs of any status; only ``ok`` ones contribute numbers.
    paper : dict | None
        Paper numbers keyed by (method, w_bits, a_bits, rate), as from :func:`read_paper_csv`.
        Paper settings that were not run become rows without our numbers.
    paper_for : set[tuple[str, str]] | None
        The (model, data) pairs the paper numbers apply to; None: every pair in the jobs.

    Returns
    -------
    list[Row]
        Sorted by model, data, then float, then method order, bits and rate.
    """
    groups: dict[Key, list[Job]] = defaultdict(list)
    fp32_ref: dict[tuple[str, str], list[float]] = defaultdict(list)
    for job in jobs:
        if job.status != OK:
            continue
        key = job_key(job)
        groups[key].append(job)
        if (job.metrics or {}).get("fp32_top1") is not None:
            fp32_ref[key[:2]].append(float(job.metrics["fp32_top1"]))
    rows = {key: _row(key, members) for key, members in groups.items()}
    # Every job measures the float model's accuracy: give the table its float row even when
    # the sweep did not run method=fp32.
    for (model, data), values in fp32_ref.items():
        key = (model, data, FLOAT_METHOD, 32, 32, None)
        if key not in rows:
            rows[key] = Row(model, data, FLOAT_METHOD, 32, 32, None, top1=statistics.fmean(values),
                            bops_pct=100.0, seeds=1)
    if paper:
        _attach_paper(rows, paper, paper_for)
    return sorted(rows.values(), key=_sort_key)


def _row(key: Key, jobs: list[Job]) -> Row:
    # Jobs with the same seed are repeats of one experiment (e.g. fp32 at bits=4 and bits=8):
    # average them first so that only distinct seeds make the spread.
    by_seed: dict[Any, list[dict]] = defaultdict(list)
    for job in jobs:
        by_seed[(job.metrics or {}).get("seed")].append(job.metrics or {})
    per_seed = [{k: _mean([m.get(k) for m in ms]) for k in ("top1", "top5", "bops_pct")}
                for ms in by_seed.values()]
    top1s = [s["top1"] for s in per_seed if s["top1"] is not None]
    return Row(*key, top1=_mean(top1s),
               top1_std=statistics.stdev(top1s) if len(top1s) > 1 else None,
               top5=_mean([s["top5"] for s in per_seed]),
               bops_pct=_mean([s["bops_pct"] for s in per_seed]),
               seeds=len(per_seed), jobs=jobs)


def _mean(values: list[Any]) -> float | None:
    nums = [float(v) for v in values if v is not None]
    return statistics.fmean(nums) if nums else None


def _attach_paper(rows: dict[Key, Row], paper: dict[tuple, dict],
                  paper_for: set[tuple[str, str]] | None) -> None:
    pairs = sorted(paper_for if paper_for is not None else {k[:2] for k in rows}) or [("?", "?")]
    for pkey, values in paper.items():
        for model, data in pairs:
            key = (model, data, *pkey)
            if key not in rows:
                rows[key] = Row(*key)
            rows[key].paper_top1 = values.get("top1")
            rows[key].paper_bops_pct = values.get("bops_pct")


def _sort_key(row: Row) -> tuple:
    order = _ORDER.index(row.base_method) if row.base_method in _ORDER else len(_ORDER)
    return (row.model, row.data, order, row.method, row.w_bits, row.a_bits,
            -1.0 if row.rate is None else row.rate)


def read_paper_csv(path: Path) -> dict[tuple, dict]:
    """Read an experiment's paper numbers.

    Parameters
    ----------
    path : Path
        CSV with columns ``method, w_bits, a_bits, rate, bops_pct, top1`` (rate empty for
        methods that do not factorize; method names as in configs, e.g. ``admm_epc``).

    Returns
    -------
    dict[tuple, dict]
        ``{(method, w_bits, a_bits, rate): {"top1": float, "bops_pct": float | None}}``.
    """
    out: dict[tuple, dict] = {}
    with open(path, newline="") as fh:
        for rec in csv.DictReader(line for line in fh if not line.startswith("#")):
            method = rec["method"].strip()
            rate = rec.get("rate", "").strip()
            key = (method, int(rec["w_bits"]), int(rec["a_bits"]),
                   float(rate) if rate and method in FACTORIZING else None)
            bops = rec.get("bops_pct", "").strip()
            out[key] = {"top1": float(rec["top1"]), "bops_pct": float(bops) if bops else None}
    return out


# ---------------------------------------------------------------------------------- formatting

def fmt_rate(rate: float | None) -> str:
    """``2`` for 2.0, ``2.5`` for 2.5, ``–`` when the method does not factorize."""
    return "–" if rate is None else f"{rate:g}"


def fmt_num(value: float | None, std: float | None = None, pm: str = "±") -> str:
    """Two decimals, ``mean ± std`` when a spread is known, ``–`` when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.2f} {pm} {std:.2f}" if std is not None else f"{value:.2f}"


def has_paper(rows: list[Row]) -> bool:
    """Whether any row carries paper numbers (then the tables get paper columns)."""
    return any(r.paper_top1 is not None for r in rows)


def table_cells(rows: list[Row], pm: str = "±") -> tuple[list[str], list[list[str]]]:
    """Header and cell text of the table, shared by Markdown, LaTeX and HTML.

    Parameters
    ----------
    rows : list[Row]
        From :func:`aggregate`.
    pm : str
        The plus-minus sign to use.

    Returns
    -------
    tuple[list[str], list[list[str]]]
        Header and rows of strings. Model and data columns appear only when the rows mix
        several models or data sets.
    """
    multi = len({r.key[:2] for r in rows}) > 1
    paper = has_paper(rows)
    header = (["Model", "Data"] if multi else []) + ["Method", "w/a", "rate", "%BOPs", "Top-1"]
    if paper:
        header += ["%BOPs (paper)", "Top-1 (paper)"]
    body = []
    for r in rows:
        cells = ([r.model, r.data] if multi else []) + [
            r.label, f"{r.w_bits}/{r.a_bits}", fmt_rate(r.rate), fmt_num(r.bops_pct),
            fmt_num(r.top1, r.top1_std, pm)]
        if paper:
            cells += [fmt_num(r.paper_bops_pct), fmt_num(r.paper_top1)]
        body.append(cells)
    return header, body


def problem_jobs(jobs: Iterable[Job]) -> list[Job]:
    """The jobs without results (failed, incomplete, not started), in order."""
    return [j for j in jobs if j.status != OK]


def problem_line(job: Job) -> str:
    """One line describing a job without results."""
    where = job.name
    if job.error:
        detail = f": {job.error}"
    elif job.status == INCOMPLETE:
        detail = ": no metrics.json and no error in its log (running, killed, or crashed)"
    else:
        detail = ""
    if job.path is not None:  # a job that never started is named by its overrides already
        where += f" [{' '.join(job.overrides)}]"
    return f"{job.status}: {where}{detail}"


def render_markdown(rows: list[Row], jobs: list[Job], title: str) -> str:
    """The table as Markdown, followed by every job that has no results.

    Parameters
    ----------
    rows : list[Row]
        From :func:`aggregate`.
    jobs : list[Job]
        All jobs (problem ones are listed under the table).
    title : str
        Heading.

    Returns
    -------
    str
        Markdown text.
    """
    header, body = table_cells(rows)
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    ok = sum(j.status == OK for j in jobs)
    lines += ["", f"{ok} of {len(jobs)} jobs finished."]
    problems = problem_jobs(jobs)
    if problems:
        lines += ["", "## Jobs without results", ""]
        lines += [f"- {problem_line(j)}" for j in problems]
    return "\n".join(lines) + "\n"


def _tex_escape(text: str) -> str:
    for char, repl in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"),
                       ("#", r"\#"), ("→", r"$\to$"), ("–", "--")):
        text = text.replace(char, repl)
    return text


def render_latex(rows: list[Row], caption: str) -> str:
    """The table as a booktabs LaTeX ``table`` (float row on top, rule below it).

    Parameters
    ----------
    rows : list[Row]
        From :func:`aggregate`.
    caption : str
        Table caption.

    Returns
    -------
    str
        LaTeX source needing ``booktabs``.
    """
    header, body = table_cells(rows, pm="PLUSMINUS")
    n_text = header.index("rate")  # text columns left, numbers right
    align = "l" * n_text + "r" * (len(header) - n_text)
    out = [r"\begin{table}[t]", r"\centering", f"\\caption{{{_tex_escape(caption)}}}",
           f"\\begin{{tabular}}{{{align}}}", r"\toprule",
           " & ".join(_tex_escape(h) for h in header) + r" \\", r"\midrule"]
    for i, (row, cells) in enumerate(zip(rows, body)):
        text = [_tex_escape(c).replace("PLUSMINUS", r"$\pm$") for c in cells]
        out.append(" & ".join(text) + r" \\")
        if row.method == FLOAT_METHOD and i + 1 < len(rows) and rows[i + 1].method != FLOAT_METHOD:
            out.append(r"\midrule")
    out += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(out) + "\n"


RESULT_COLUMNS = ["sweep", "job", "status", "method", "model", "data", "w_bits", "a_bits", "rate",
                  "seed", "top1", "top5", "fp32_top1", "bops_pct", "bops", "macs", "fp32_macs",
                  "params", "compressed_bits", "overrides", "error"]


def render_results_csv(jobs: list[Job]) -> str:
    """One CSV line per job, finished or not (the raw data behind the table).

    Parameters
    ----------
    jobs : list[Job]
        All jobs.

    Returns
    -------
    str
        CSV text with :data:`RESULT_COLUMNS`.
    """
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for job in jobs:
        m = job.metrics or {}
        is_float = job.method == FLOAT_METHOD
        rec = {
            "sweep": str(job.sweep), "job": job.name, "status": job.status, "method": job.method,
            "model": m.get("model", job.choices.get("model", "")),
            "data": m.get("data", job.choices.get("data", "")),
            "w_bits": 32 if is_float else job.setting("bits"),
            "a_bits": 32 if is_float else job.setting("act_bits"),
            "rate": job.setting("rate"), "seed": job.setting("seed"),
            "overrides": " ".join(job.overrides), "error": job.error or "",
        }
        for k in ("top1", "top5", "fp32_top1", "bops_pct", "bops", "macs", "fp32_macs", "params",
                  "compressed_bits"):
            rec[k] = m.get(k, "")
        writer.writerow(rec)
    return buf.getvalue()
