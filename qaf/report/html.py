"""A static page per sweep: the table and its notes, the plot embedded as data (no external files,
no scripts, opens offline), the matched-cost tables when two or more methods are reported, the
per-layer rates of jobs that chose their CP ranks under a budget, and every job without results."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Sequence

from qaf.report.collect import OK, Job
from qaf.report.pareto import AXES, count_methods, matched_cost, matched_table
from qaf.report.tables import BOPS_NOTES, Row, Table, main_table, problem_jobs, problem_line

_STYLE = """
body { font-family: sans-serif; margin: 2em; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border-bottom: 1px solid #ccc; padding: 0.3em 0.8em; text-align: right; }
th { border-bottom: 2px solid #333; }
td.text, th.text { text-align: left; }
tr.float td, tr.best td { font-weight: bold; }
p.note { font-size: small; color: #444; margin: 0.2em 0; }
li.problem { color: #a00; }
img { max-width: 100%; }
"""


def html_table(table: Table) -> list[str]:
    """A :class:`qaf.report.tables.Table` as HTML (bold rows by class), then its notes."""
    esc = html.escape

    def cls(i: int) -> str:
        return "text" if i < table.n_text else "num"

    parts = ["<table><thead><tr>"]
    parts += [f"<th class='{cls(i)}'>{esc(h)}</th>" for i, h in enumerate(table.header)]
    parts.append("</tr></thead><tbody>")
    for cells, bold, is_float in zip(table.body, table.bold, table.float_rows):
        row_cls = " class='best'" if bold else (" class='float'" if is_float else "")
        tds = "".join(f"<td class='{cls(i)}'>{esc(c)}</td>" for i, c in enumerate(cells))
        parts.append(f"<tr{row_cls}>{tds}</tr>")
    parts.append("</tbody></table>")
    parts += [f"<p class='note'>{esc(note)}</p>" for note in table.notes]
    return parts


def _image(png: Path | None, alt: str) -> list[str]:
    """The PNG embedded as data (nothing when it was not written)."""
    if png is None or not Path(png).is_file():
        return []
    data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
    return [f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"]


def _matched_cost_section(rows: Sequence[Row]) -> list[str]:
    if count_methods(rows) < 2:
        return []
    parts = ["<h2>Matched cost</h2>"]
    for axis in AXES:
        for mc in matched_cost(rows, axis):
            what = "%BOPs" if axis == "bops" else "model size"
            parts.append(f"<h3>{html.escape(f'{mc.model} / {mc.data}: by {what}')}</h3>")
            parts += html_table(matched_table(mc))
    return parts


def render_html(rows: Sequence[Row], jobs: Sequence[Job], title: str, plot_png: Path | None,
                bops_text: str = BOPS_NOTES["qaf"], ranks_png: Path | None = None) -> str:
    """Build the page.

    Parameters
    ----------
    rows : Sequence[Row]
        From :func:`qaf.report.tables.aggregate`.
    jobs : Sequence[Job]
        All jobs (problem ones are listed).
    title : str
        Page title.
    plot_png : Path | None
        ``pareto.png`` to embed, if written.
    bops_text : str
        The %BOPs sentence (:func:`qaf.report.tables.bops_note`).
    ranks_png : Path | None
        ``ranks.png`` (per-layer rates of the jobs that chose their ranks under a budget), if written.

    Returns
    -------
    str
        A complete HTML document.
    """
    esc = html.escape
    parts = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>",
             f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>", f"<h1>{esc(title)}</h1>"]
    parts += html_table(main_table(rows, bops_text))
    ok = sum(j.status == OK for j in jobs)
    parts.append(f"<p>{ok} of {len(jobs)} jobs finished.</p>")
    parts += _image(plot_png, "top-1 against %BOPs and model size")
    parts += _matched_cost_section(rows)
    if ranks_png is not None:
        parts.append("<h2>Per-layer ranks under a budget</h2>")
        parts += _image(ranks_png, "each layer's rate under each budget")
    problems = problem_jobs(jobs)
    if problems:
        parts.append("<h2>Jobs without results</h2><ul>")
        parts += [f"<li class='problem'>{esc(problem_line(j))}</li>" for j in problems]
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
