"""A static page per sweep: the table, the plot embedded as data (no external files, no scripts,
opens offline), and every job without results."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from qaf.report.collect import OK, Job
from qaf.report.tables import Row, problem_jobs, problem_line, table_cells

_STYLE = """
body { font-family: sans-serif; margin: 2em; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border-bottom: 1px solid #ccc; padding: 0.3em 0.8em; text-align: right; }
th { border-bottom: 2px solid #333; }
td.text, th.text { text-align: left; }
tr.float td { font-weight: bold; }
li.failed { color: #a00; }
"""


def render_html(rows: list[Row], jobs: list[Job], title: str, plot_png: Path | None) -> str:
    """Build the page.

    Parameters
    ----------
    rows : list[Row]
        From :func:`qaf.report.tables.aggregate`.
    jobs : list[Job]
        All jobs (problem ones are listed).
    title : str
        Page title.
    plot_png : Path | None
        ``pareto.png`` to embed, if written.

    Returns
    -------
    str
        A complete HTML document.
    """
    header, body = table_cells(rows)
    n_text = header.index("rate")
    esc = html.escape
    parts = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>",
             f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>{esc(title)}</h1>", "<table><thead><tr>"]
    parts += [f"<th class='{'text' if i < n_text else 'num'}'>{esc(h)}</th>"
              for i, h in enumerate(header)]
    parts.append("</tr></thead><tbody>")
    for row, cells in zip(rows, body):
        cls = " class='float'" if row.method == "fp32" else ""
        tds = "".join(f"<td class='{'text' if i < n_text else 'num'}'>{esc(c)}</td>"
                      for i, c in enumerate(cells))
        parts.append(f"<tr{cls}>{tds}</tr>")
    parts.append("</tbody></table>")
    ok = sum(j.status == OK for j in jobs)
    parts.append(f"<p>{ok} of {len(jobs)} jobs finished.</p>")
    if plot_png is not None and Path(plot_png).is_file():
        data = base64.b64encode(Path(plot_png).read_bytes()).decode("ascii")
        parts.append(f"<img alt='top-1 against %BOPs' src='data:image/png;base64,{data}'>")
    problems = problem_jobs(jobs)
    if problems:
        parts.append("<h2>Jobs without results</h2><ul>")
        parts += [f"<li class='failed'>{esc(problem_line(j))}</li>" for j in problems]
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
