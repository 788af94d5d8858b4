"""A static page per sweep (``index.html``): no scripts, the plot embedded as data, opens offline.

The page is a sequence of sections (:data:`SECTIONS`), each a function of the :class:`Page`
returning its HTML lines, so a new view is one more function:

- what ran: the commands (with their dates), the code version, model, data, evaluation images and
  calibration protocol of the results;
- the layer policies the rows use, role by role (from the policy each job recorded);
- the table and its notes, each row linking to its job folders, ``metrics.json`` and ``run.log``
  (relative links: the page works opened from disk, wherever the folder is moved);
- the plot; the matched-cost tables when two or more methods are reported; the per-layer rates of
  jobs that chose their CP ranks under a budget; every job without results.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import math
import os
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from qaf import outputs
from qaf.quant.policy import ROLE_NAMES, ROLES, LayerPolicy
from qaf.report.collect import OK, Command, Job, mtime, sweep_commands
from qaf.report.pareto import AXES, count_methods, matched_cost, matched_table
from qaf.report.tables import (BOPS_NOTES, Row, Table, code_labels, main_table, problem_jobs, problem_line,
                               protocol_of)
from qaf.results import Metrics

_STYLE = """
body { font-family: sans-serif; margin: 2em; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border-bottom: 1px solid #ccc; padding: 0.3em 0.8em; text-align: right; }
th { border-bottom: 2px solid #333; }
td.text, th.text { text-align: left; }
tr.float td, tr.best td { font-weight: bold; }
td.files { font-weight: normal !important; font-size: small; text-align: left; white-space: nowrap; }
p.note { font-size: small; color: #444; margin: 0.2em 0; }
dl.ran { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dl.ran dt { font-weight: bold; }
dl.ran dd { margin: 0; }
code { background: #f4f4f4; padding: 0.1em 0.3em; }
li.problem { color: #a00; }
img { max-width: 100%; }
"""
_TIME = "%Y-%m-%d %H:%M"
esc = html.escape


@dataclass
class Page:
    """What the page shows.

    Attributes
    ----------
    rows : Sequence[Row]
        From :func:`qaf.report.tables.aggregate`, marked.
    jobs : Sequence[Job]
        Every job (problem ones are listed).
    title : str
        Page title.
    out_dir : Path
        Where ``index.html`` is written: links are relative to it.
    sweeps : Sequence[Path]
        The sweep folders reported (their commands are shown).
    plot_png : Path | None
        ``pareto.png`` to embed, if written.
    bops_text : str
        The %BOPs sentence (:func:`qaf.report.tables.bops_note`).
    ranks_png : Path | None
        ``ranks.png`` (per-layer rates of the jobs that chose their ranks under a budget), if written.
    """

    rows: Sequence[Row]
    jobs: Sequence[Job]
    title: str
    out_dir: Path
    sweeps: Sequence[Path] = ()
    plot_png: Path | None = None
    bops_text: str = BOPS_NOTES["qaf"]
    ranks_png: Path | None = None

    @property
    def finished(self) -> list[tuple[Job, Metrics]]:
        """The jobs with results, each with its metrics."""
        return [(j, j.metrics) for j in self.jobs if j.status == OK and j.metrics is not None]


def html_table(table: Table, extra: tuple[str, list[str]] | None = None) -> list[str]:
    """A :class:`qaf.report.tables.Table` as HTML (bold rows by class), then its notes.

    ``extra``: a last column's header and, per row, its cell as HTML (already escaped).
    """
    def cls(i: int) -> str:
        return "text" if i < table.n_text else "num"

    parts = ["<table><thead><tr>"]
    parts += [f"<th class='{cls(i)}'>{esc(h)}</th>" for i, h in enumerate(table.header)]
    parts += [f"<th class='text'>{esc(extra[0])}</th>"] if extra else []
    parts.append("</tr></thead><tbody>")
    for i, (cells, bold, is_float) in enumerate(zip(table.body, table.bold, table.float_rows)):
        row_cls = " class='best'" if bold else (" class='float'" if is_float else "")
        tds = "".join(f"<td class='{cls(i)}'>{esc(c)}</td>" for i, c in enumerate(cells))
        tds += f"<td class='files'>{extra[1][i]}</td>" if extra else ""
        parts.append(f"<tr{row_cls}>{tds}</tr>")
    parts.append("</tbody></table>")
    parts += [f"<p class='note'>{esc(note)}</p>" for note in table.notes]
    return parts


def href(target: Path, out_dir: Path, folder: bool = False) -> str:
    """A link from a page in ``out_dir`` to ``target``, relative and URL-quoted (``/`` ends a folder)."""
    rel = Path(os.path.relpath(target, out_dir)).as_posix()
    return urllib.parse.quote(rel) + ("/" if folder else "")


def job_links(job: Job, out_dir: Path) -> str:
    """Links to a job's folder and to those of its ``metrics.json`` and ``run.log`` that exist."""
    if job.path is None:
        return "–"
    links = [f"<a href='{href(job.path, out_dir, folder=True)}'>folder</a>"]
    links += [f"<a href='{href(job.path / name, out_dir)}'>{name}</a>"
              for name in (outputs.METRICS_FILE, outputs.LOG_FILE) if (job.path / name).is_file()]
    return " · ".join(links)


def _row_links(row: Row, out_dir: Path) -> str:
    if not row.jobs:
        return "–"
    if len(row.jobs) == 1:
        return job_links(row.jobs[0], out_dir)
    return "<br>".join(f"seed {esc(str(j.setting('seed')))}: {job_links(j, out_dir)}" for j in row.jobs)


def _when(seconds: float | None) -> str:
    return time.strftime(_TIME, time.localtime(seconds)) if seconds is not None and math.isfinite(seconds) else ""


def _distinct(values: Sequence[str]) -> str:
    return "; ".join(dict.fromkeys(values)) or "–"


def what_ran(page: Page) -> list[str]:
    """The commands and their dates, code version, model, data, images and protocol of the results."""
    commands: list[Command] = [c for sweep in page.sweeps for c in sweep_commands(sweep)]
    written = sorted(t for t in (mtime(j.path / outputs.METRICS_FILE) for j, _ in page.finished if j.path)
                     if math.isfinite(t))
    metrics = [m for _, m in page.finished]
    versions = sorted({str(m.code["qaf_version"]) for m in metrics if m.code.get("qaf_version")})
    protocols = [protocol_of(m)[1:] for m in metrics if not m.method_info.reference]
    items = [("Command", f"<code>{esc(c.text)}</code>" + (f" ({when})" if (when := _when(c.started)) else ""))
             for c in commands] or [("Command", "not recorded")]
    items += [
        ("Results written", f"{_when(written[0])} – {_when(written[-1])}" if written else "–"),
        ("Code", esc(", ".join(code_labels(page.jobs)) or "–") + (f" (qaf {esc(', '.join(versions))})"
                                                                  if versions else "")),
        ("Model", esc(_distinct([m.model for m in metrics]))),
        ("Data", esc(_distinct([f"{m.data}, {m.eval_samples} evaluation images" for m in metrics]))),
        ("Protocol", esc(_distinct([f"BN re-estimation {bn}; calibration {calib}; fine-tuning {tuned}"
                                    for bn, calib, tuned in protocols]))),
    ]
    return ["<h2>What ran</h2>", "<dl class='ran'>",
            *[f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in items], "</dl>"]


def policies(page: Page) -> list[str]:
    """The layer policies of the compressed rows: how each treats every role, and who used it."""
    used: dict[str, tuple[LayerPolicy | None, list[str]]] = {}
    for row in page.rows:
        for job in row.jobs:
            if job.metrics is None or row.is_float:
                continue
            record = job.metrics.protocol.get("policy") or {}
            name = str(record.get("name") or job.metrics.policy or "?")
            policy, labels = used.setdefault(name, (_policy(record), []))
            if row.label not in labels:
                labels.append(row.label)
    if not used:
        return []
    parts = ["<h2>Layer policies</h2>", "<table><thead><tr><th class='text'>Policy</th><th class='text'>Used by</th>"]
    parts += [f"<th class='text'>{esc(ROLE_NAMES[r])}</th>" for r in ROLES] + ["</tr></thead><tbody>"]
    for name, (policy, labels) in used.items():
        cells = [name, ", ".join(labels)] + [policy.treatment_text(r) if policy else "not recorded" for r in ROLES]
        parts.append("<tr>" + "".join(f"<td class='text'>{esc(c)}</td>" for c in cells) + "</tr>")
    parts.append("</tbody></table>")
    parts.append("<p class='note'>w/a bits: the row's weight and activation bits; n/n bits: kept at those bits "
                 "whatever the row's; float: not quantized. A method's config chooses its reference policy "
                 "(conf/policy/); policy=... on the command line replaces it.</p>")
    return parts


def _policy(record: dict) -> LayerPolicy | None:
    """The policy a job recorded, when it recorded every field of one."""
    fields = {f.name for f in dataclasses.fields(LayerPolicy)}
    return LayerPolicy.from_config({k: record[k] for k in fields}) if fields <= set(record) else None


def results(page: Page) -> list[str]:
    """The table, its notes and each row's links, then how many jobs finished."""
    links = ("Files", [_row_links(row, page.out_dir) for row in page.rows])
    parts = ["<h2>Results</h2>", *html_table(main_table(page.rows, page.bops_text), links)]
    return parts + [f"<p>{len(page.finished)} of {len(page.jobs)} jobs finished.</p>"]


def _image(png: Path | None, alt: str) -> list[str]:
    """The PNG embedded as data (nothing when it was not written)."""
    if png is None or not Path(png).is_file():
        return []
    data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
    return [f"<img alt='{esc(alt)}' src='data:image/png;base64,{data}'>"]


def plot(page: Page) -> list[str]:
    """``pareto.png``, inline."""
    return _image(page.plot_png, "top-1 against %BOPs and model size")


def allocation(page: Page) -> list[str]:
    """``ranks.png``: each layer's rate in the jobs that chose their ranks under a budget."""
    if page.ranks_png is None:
        return []
    return ["<h2>Per-layer ranks under a budget</h2>", *_image(page.ranks_png, "each layer's rate under each budget")]


def matched_costs(page: Page) -> list[str]:
    """The matched-cost tables (two or more methods)."""
    if count_methods(page.rows) < 2:
        return []
    parts = ["<h2>Matched cost</h2>"]
    for axis in AXES:
        for mc in matched_cost(page.rows, axis):
            what = "%BOPs" if axis == "bops" else "model size"
            parts.append(f"<h3>{esc(f'{mc.model} / {mc.data}: by {what}')}</h3>")
            parts += html_table(matched_table(mc))
    return parts


def problems(page: Page) -> list[str]:
    """Every job without results, with links to its folder and log."""
    jobs = problem_jobs(page.jobs)
    if not jobs:
        return []
    items = [f"<li class='problem'>{esc(problem_line(j))}" + (f" ({job_links(j, page.out_dir)})" if j.path else "")
             + "</li>" for j in jobs]
    return ["<h2>Jobs without results</h2><ul>", *items, "</ul>"]


#: The page's sections, in order.
SECTIONS: tuple[Callable[[Page], list[str]], ...] = (what_ran, policies, results, plot, matched_costs, allocation,
                                                         problems)


def render_html(page: Page) -> str:
    """Build the page: the title, then every section of :data:`SECTIONS`.

    Parameters
    ----------
    page : Page
        What to show.

    Returns
    -------
    str
        A complete HTML document.
    """
    parts = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>",
             f"<title>{esc(page.title)}</title><style>{_STYLE}</style></head><body>", f"<h1>{esc(page.title)}</h1>"]
    for section in SECTIONS:
        parts += section(page)
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"

