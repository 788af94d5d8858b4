"""Matched cost: which method wins at equal %BOPs (or equal model size).

For each (model, data), the overall Pareto frontier of our compressed rows (nothing cheaper is as
accurate) gives the budgets; at each budget every method shows its best top-1 at or below it, the
leader is compared with the runner-up by the exact McNemar test on the same images
(``predictions.npz``) and named, or the budget is a tie when the test cannot tell them apart.
``frontier.md`` holds the tables, by %BOPs and by size; the page and the printed output show them
when at least two methods are in the report. The main table's marks (:func:`mark_rows`) judge each
row the same way: against the best row of any method at equal or lower %BOPs.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence

from qaf.metrics.stats import PairedComparison
from qaf.report.compare import compare_job_sets, fmt_p
from qaf.report.tables import LEVEL_TEXT, Row, Table, markdown_table

#: The two cost axes: header text, unit divisor, value of a row.
AXES: dict[str, tuple[str, float, Callable[[Row], float | None]]] = {
    "bops": ("%BOPs ≤", 1.0, lambda r: r.bops_pct),
    "size": ("Size ≤ (kB)", 1e3, lambda r: r.size_bytes),
}


def series_names(rows: Sequence[Row]) -> list[str]:
    """The series (plot line, frontier column) of each row, aligned with ``rows``.

    The method's label, with the activation bits when compressed rows differ in them and the
    protocol values (policy, BN re-estimation, ...) that differ between rows of the same label.
    """
    compressed = [r for r in rows if not r.is_float]
    several_a = len({r.a_bits for r in compressed}) > 1
    protocols: dict[str, set[tuple[str, ...]]] = defaultdict(set)
    for r in compressed:
        if r.protocol:
            protocols[r.label].add(r.protocol)
    names = []
    for r in rows:
        name = r.label + (f" a{r.a_bits}" if several_a and not r.is_float else "")
        seen = protocols.get(r.label, set())
        if len(seen) > 1 and r.protocol:
            differing = [r.protocol[i] for i in range(len(r.protocol)) if len({p[i] for p in seen}) > 1]
            name += f" [{', '.join(differing)}]"
        names.append(name)
    return names


def pareto_front(points: Sequence[tuple[float, float, Row]]) -> list[tuple[float, float, Row]]:
    """The points no other point beats on both cost and top-1, cheapest first.

    Parameters
    ----------
    points : Sequence[tuple[float, float, Row]]
        ``(cost, top1, row)``.

    Returns
    -------
    list
        Sorted by cost; each point is more accurate than every cheaper one.
    """
    front: list[tuple[float, float, Row]] = []
    for cost, top1, row in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or top1 > front[-1][1]:
            front.append((cost, top1, row))
    return front


@dataclass
class MatchedCost:
    """One matched-cost table: a (model, data) pair on one cost axis.

    Attributes
    ----------
    model, data, axis : str
        What it covers; ``axis`` is ``bops`` or ``size``.
    methods : list[str]
        Series names, the table's method columns.
    budgets : list[float]
        Costs of the frontier points, cheapest first.
    best : list[dict[str, Row]]
        Per budget: each method's best row at or below it.
    """

    model: str
    data: str
    axis: str
    methods: list[str]
    budgets: list[float]
    best: list[dict[str, Row]]

    def leader(self, i: int) -> tuple[Row | None, Row | None, PairedComparison | None]:
        """Leader and runner-up (other methods) at budget ``i``, and their paired comparison (None
        without a runner-up or shared predictions)."""
        ranked = sorted(self.best[i].values(), key=lambda r: -(r.top1 or 0.0))
        if not ranked:
            return None, None, None
        if len(ranked) == 1:
            return ranked[0], None, None
        return ranked[0], ranked[1], compare_job_sets(ranked[0].jobs, ranked[1].jobs)


def matched_cost(rows: Sequence[Row], axis: str) -> list[MatchedCost]:
    """The matched-cost tables of ``rows`` on one axis, one per (model, data).

    Parameters
    ----------
    rows : Sequence[Row]
        From :func:`qaf.report.tables.aggregate`; only our compressed rows with a top-1 and a
        cost on ``axis`` count (the float model is the reference line, paper rows have no
        predictions).
    axis : str
        ``bops`` or ``size``.

    Returns
    -------
    list[MatchedCost]
        One per (model, data) with at least one such row.
    """
    value = AXES[axis][2]
    names = series_names(rows)
    panels: dict[tuple[str, str], list[tuple[float, float, Row, str]]] = defaultdict(list)
    for row, name in zip(rows, names):
        cost = value(row)
        if row.ours and not row.is_float and cost is not None:
            panels[(row.model, row.data)].append((float(cost), float(row.top1), row, name))  # type: ignore[arg-type]
    tables = []
    for (model, data), points in sorted(panels.items()):
        budgets = [cost for cost, _, _ in pareto_front([(c, t, r) for c, t, r, _ in points])]
        methods = sorted({name for *_, name in points}, key=names.index)
        best = [_best_within(points, budget) for budget in budgets]
        tables.append(MatchedCost(model, data, axis, methods, budgets, best))
    return tables


def _best_within(points: Sequence[tuple[float, float, Row, str]], budget: float) -> dict[str, Row]:
    """Each series' most accurate row costing at most ``budget``."""
    best: dict[str, Row] = {}
    for cost, top1, row, name in points:
        if cost <= budget * (1 + 1e-9) and (name not in best or top1 > (best[name].top1 or 0.0)):
            best[name] = row
    return best


def mark_rows(rows: Sequence[Row]) -> None:
    """Set each row's :attr:`~qaf.report.tables.Row.mark` by matched cost, across methods.

    Among our compressed rows of one model, data and evaluation set (two or more), a row is
    ``best`` (bold) when no row at equal or lower %BOPs has a higher top-1 (it is on the Pareto
    frontier), and ``tie`` (≈) when the exact McNemar test cannot tell it from the most accurate
    row at equal or lower %BOPs; other rows, the float model and paper-only rows are unmarked.

    Parameters
    ----------
    rows : Sequence[Row]
        From :func:`qaf.report.tables.aggregate` (``bops_pct`` in the report's convention).
    """
    groups: dict[tuple, list[tuple[float, float, Row, str]]] = defaultdict(list)
    for row in rows:
        row.mark = ""
        if row.ours and row.jobs and not row.is_float and row.bops_pct is not None:
            groups[(row.model, row.data, row.eval_samples)].append(
                (float(row.bops_pct), float(row.top1), row, ""))  # type: ignore[arg-type]
    for points in groups.values():
        if len(points) < 2:
            continue
        for cost, top1, row, _ in points:
            best = _best_within(points, cost)[""]
            if top1 >= (best.top1 or 0.0):
                row.mark = "best"
            elif (result := compare_job_sets(best.jobs, row.jobs)) is not None and not result.significant:
                row.mark = "tie"


def count_methods(rows: Sequence[Row]) -> int:
    """How many series of our compressed rows the report holds (the view needs two)."""
    return len({name for row, name in zip(rows, series_names(rows)) if row.ours and not row.is_float})


def _point_text(row: Row) -> str:
    rate = f", r{row.rate:g}" if row.rate is not None else ""
    return f"{row.top1:.2f} ({row.w_bits}/{row.a_bits}{rate})"


def matched_table(mc: MatchedCost) -> Table:
    """A :class:`MatchedCost` as a :class:`qaf.report.tables.Table`: the Leader column names the winner,
    or says ``tie`` when the test cannot tell it from the runner-up."""
    header_text, unit, _ = AXES[mc.axis]
    header = [header_text, *mc.methods, "Leader", "p vs runner-up"]
    body, bold = [], []
    for i, budget in enumerate(mc.budgets):
        leader, runner, result = mc.leader(i)
        cells = [f"{budget / unit:.2f}" if mc.axis == "bops" else f"{budget / unit:.1f}"]
        cells += [_point_text(mc.best[i][m]) if m in mc.best[i] else "–" for m in mc.methods]
        names = {id(row): name for name, row in mc.best[i].items()}
        tie = result is not None and not result.significant
        cells += [f"tie ({names[id(leader)]}, {names[id(runner)]})" if tie  # type: ignore[arg-type]
                  else names[id(leader)] if leader is not None else "–",
                  "–" if runner is None else (f"{fmt_p(result.p_value)} ({names[id(runner)]})"
                                              if result is not None else "n/a")]
        body.append(cells)
        bold.append(False)
    notes = [f"Best top-1 (%) of each method at or below each budget (w/a bits and rate in brackets); the "
             f"budgets are the costs of the points on the overall Pareto frontier. p: exact McNemar test of the "
             f"leader against the best other method on the same images (n/a: no shared predictions); tie: "
             f"the two are not significantly different ({LEVEL_TEXT})."]
    return Table(header, body, bold, [False] * len(body), 1, notes)


def render_frontier_markdown(rows: Sequence[Row]) -> str:
    """``frontier.md``: the matched-cost tables by %BOPs and by size, per (model, data).

    Parameters
    ----------
    rows : Sequence[Row]
        From :func:`qaf.report.tables.aggregate`.

    Returns
    -------
    str
        Markdown; says so when fewer than two methods leave nothing to compare.
    """
    lines = ["# Matched cost", ""]
    if count_methods(rows) < 2:
        return "\n".join(lines + ["Fewer than two methods with results: nothing to compare at equal cost."]) + "\n"
    floats = {(r.model, r.data): r.top1 for r in rows if r.is_float and r.top1 is not None}
    for axis in AXES:
        for mc in matched_cost(rows, axis):
            ref = floats.get((mc.model, mc.data))
            lines += [f"## {mc.model} / {mc.data}: by {'%BOPs' if axis == 'bops' else 'model size'}", ""]
            if ref is not None:
                lines += [f"Float model: {ref:.2f} %.", ""]
            lines += markdown_table(matched_table(mc)) + [""]
    return "\n".join(lines)
