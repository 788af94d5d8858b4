"""The accuracy-vs-cost plot ``pareto.png``: per (model, data) two panels, top-1 against %BOPs
and top-1 against model size (log scale). One series per method (see
:func:`qaf.report.pareto.series_names`), each point labelled with its bits and rate and drawn with
its 95 % interval (one seed) or standard deviation (seeds); the float model as a horizontal line;
the paper's points (when known) hollow; the overall Pareto frontier of our points as a step line.
And ``ranks.png`` when jobs chose their CP ranks per layer under a budget: each layer's rate."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: works on headless machines and inside launchers
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from qaf.report.collect import Job  # noqa: E402
from qaf.report.pareto import pareto_front, series_names  # noqa: E402
from qaf.report.tables import Row  # noqa: E402

#: Panels: x label, x scale, our x value of a row (size in kB), the paper's x value.
_PANELS: tuple[tuple[str, str, Callable[[Row], float | None], Callable[[Row], float | None]], ...] = (
    ("%BOPs of the float model", "linear", lambda r: r.bops_pct, lambda r: r.paper_bops_pct),
    ("model size (kB, log scale)", "log", lambda r: None if r.size_bytes is None else r.size_bytes / 1e3,
     lambda r: None),
)


def _series(rows: Sequence[Row]) -> dict[str, list[Row]]:
    """Compressed rows grouped by series, in name order."""
    series: dict[str, list[Row]] = defaultdict(list)
    for row, name in zip(rows, series_names(rows)):
        if not row.is_float:
            series[name].append(row)
    return dict(sorted(series.items()))


def plot_pareto(rows: Sequence[Row], path: Path, title: str) -> Path:
    """Write ``pareto.png``: one row of two panels per (model, data).

    Parameters
    ----------
    rows : Sequence[Row]
        From :func:`qaf.report.tables.aggregate`.
    path : Path
        Output PNG file.
    title : str
        Figure title.

    Returns
    -------
    Path
        ``path``.
    """
    pairs = sorted({r.key[:2] for r in rows}) or [("", "")]
    fig, axes = plt.subplots(len(pairs), len(_PANELS), figsize=(15.0, 4.8 * len(pairs)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = sorted(_series(rows))
    color_of = {name: colors[i % len(colors)] for i, name in enumerate(names)}
    for ax_row, (model, data) in zip(axes, pairs):
        pair_rows = [r for r in rows if r.key[:2] == (model, data)]
        for ax, panel in zip(ax_row, _PANELS):
            _draw_panel(ax, pair_rows, panel, color_of)
            ax.set_title(f"{model} / {data}" if model else "")
    return _save(fig, title, Path(path))


def _save(fig: plt.Figure, title: str, path: Path) -> Path:
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # readers never see half a PNG
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _yerr(rows: Sequence[Row]) -> list[list[float]]:
    """Asymmetric error bars: the Wilson interval of a single seed, the std over seeds."""
    low, high = [], []
    for r in rows:
        if r.top1_ci is not None and r.seeds <= 1:
            low.append(max(0.0, r.top1 - r.top1_ci[0]))  # type: ignore[operator]
            high.append(max(0.0, r.top1_ci[1] - r.top1))  # type: ignore[operator]
        else:
            low.append(r.top1_std or 0.0)
            high.append(r.top1_std or 0.0)
    return [low, high]


def _draw_panel(ax: plt.Axes, rows: Sequence[Row], panel: tuple, color_of: dict[str, str]) -> None:
    xlabel, scale, ours_x, paper_x = panel
    for name, series in _series(rows).items():
        color = color_of.get(name, "gray")
        ours = sorted((r for r in series if r.ours and ours_x(r) is not None), key=ours_x)
        if ours:
            ax.errorbar([ours_x(r) for r in ours], [r.top1 for r in ours], yerr=_yerr(ours), marker="o",
                        color=color, capsize=3, label=name)
            for r in ours:  # which bit widths / rate each point is
                text = f"w{r.w_bits}a{r.a_bits}" + (f" r{r.rate:g}" if r.rate is not None else "")
                ax.annotate(text, (ours_x(r), r.top1), textcoords="offset points", xytext=(4, 4),
                            fontsize="x-small", color=color)
        paper = sorted((r for r in series if r.paper_top1 is not None and paper_x(r) is not None), key=paper_x)
        if paper:
            ax.plot([paper_x(r) for r in paper], [r.paper_top1 for r in paper], marker="o",
                    markerfacecolor="none", linestyle="none", color=color, label=f"{name} (paper)")
    _draw_frontier(ax, rows, ours_x)
    _draw_float(ax, rows)
    ax.set_xscale(scale)
    if scale == "log":  # plain numbers (150, 200), not 1.5x10^2
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("Top-1 accuracy (%)")
    ax.grid(True, alpha=0.3)
    if ax.has_data():
        # Outside the axes: a sweep has many series and the legend must not hide points.
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))


def _draw_frontier(ax: plt.Axes, rows: Sequence[Row], x_of: Callable[[Row], float | None]) -> None:
    points = [(float(x_of(r)), float(r.top1), r) for r in rows  # type: ignore[arg-type]
              if r.ours and not r.is_float and x_of(r) is not None]
    front = pareto_front(points)
    if len(front) > 1:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="gray", alpha=0.6,
                linewidth=2.5, zorder=0, label="Pareto frontier")


def _draw_float(ax: plt.Axes, rows: Sequence[Row]) -> None:
    for r in rows:
        if r.is_float and r.top1 is not None:
            ax.axhline(r.top1, color="black", linestyle=":", label=f"Float {r.top1:.2f}")
        if r.is_float and r.paper_top1 is not None:
            ax.axhline(r.paper_top1, color="gray", linestyle=":", label=f"Float {r.paper_top1:.2f} (paper)")


def allocations(jobs: Sequence[Job]) -> dict[str, list[tuple[str, list[tuple[str, float]]]]]:
    """The per-layer allocations of the finished jobs that chose their ranks under a budget
    (``ranks=budget``), by panel (model and method), each ``(label, [(layer, rate), ...])``, the
    loosest budget first."""
    found: dict[str, list[tuple[float, str, list[tuple[str, float]]]]] = defaultdict(list)
    for job in jobs:
        m = job.metrics
        ranks = m.method_summary.get("ranks") if m is not None else None
        if not ranks:
            continue
        (_, target), = ranks["target"].items()
        label = f"≤ {target:g} {ranks['unit']} (w{m.bits}a{m.act_bits})"
        found[f"{m.model}: {m.method_info.display}"].append(
            (-target, label, [(layer["name"], layer["rate"]) for layer in m.layers]))
    return {panel: [(label, layers) for _, label, layers in sorted(items)] for panel, items in sorted(found.items())}


def plot_allocation(jobs: Sequence[Job], path: Path, title: str) -> Path | None:
    """Write ``ranks.png``: per model and method, each layer's rate (bars) under each budget; None
    (nothing written) when no job chose its ranks under a budget.

    Parameters
    ----------
    jobs : Sequence[Job]
        The sweep's jobs (:func:`qaf.report.collect.collect`).
    path : Path
        Output PNG file.
    title : str
        Figure title.

    Returns
    -------
    Path or None
        ``path``, or None.
    """
    panels = allocations(jobs)
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(12.0, 3.2 * len(panels)), squeeze=False)
    for ax, (panel, series) in zip(axes[:, 0], panels.items()):
        names = list(dict.fromkeys(name for _, layers in series for name, _ in layers))
        width = 0.8 / len(series)
        for i, (label, layers) in enumerate(series):
            rate = dict(layers)
            xs = [j + (i - (len(series) - 1) / 2) * width for j, name in enumerate(names) if name in rate]
            ax.bar(xs, [rate[name] for name in names if name in rate], width=width, label=label)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize="x-small")
        ax.set_ylabel("layer rate (weights / factors)")
        ax.set_title(panel)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return _save(fig, title, Path(path))
