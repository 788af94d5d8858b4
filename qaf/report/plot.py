"""The accuracy-vs-cost plot ``pareto.png``: per (model, data) two panels, top-1 against %BOPs
and top-1 against model size (log scale). One series per method (see
:func:`qaf.report.pareto.series_names`), each point labelled with its bits and rate and drawn with
its 95 % interval (one seed) or standard deviation (seeds); the float model as a horizontal line;
the paper's points (when known) hollow; the overall Pareto frontier of our points as a step line.
Labels never overlap: one that would is moved to the nearest free place and joined to its point
by a leader line (:func:`spread_labels`).
And ``ranks.png`` when jobs chose their CP ranks per layer under a budget: each layer's rate."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: works on headless machines and inside launchers
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.backend_bases import RendererBase  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.text import Annotation, Text  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402

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


DPI = 110
#: Where a point's label sits by default, in points from the point: up and to the right.
LABEL_OFFSET = (4.0, 4.0)


def pareto_figure(rows: Sequence[Row], title: str) -> Figure:
    """The figure of ``pareto.png``: one row of two panels per (model, data), labels spread.

    Parameters
    ----------
    rows : Sequence[Row]
        From :func:`qaf.report.tables.aggregate`.
    title : str
        Figure title.

    Returns
    -------
    Figure
        Laid out at :data:`DPI`; the caller saves and closes it.
    """
    pairs = sorted({r.key[:2] for r in rows}) or [("", "")]
    fig, axes = plt.subplots(len(pairs), len(_PANELS), figsize=(15.0, 4.8 * len(pairs)), squeeze=False, dpi=DPI)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = sorted(_series(rows))
    color_of = {name: colors[i % len(colors)] for i, name in enumerate(names)}
    labels = []
    for ax_row, (model, data) in zip(axes, pairs):
        pair_rows = [r for r in rows if r.key[:2] == (model, data)]
        for ax, panel in zip(ax_row, _PANELS):
            labels.append((ax, _draw_panel(ax, pair_rows, panel, color_of)))
            ax.set_title(f"{model} / {data}" if model else "")
    fig.suptitle(title)
    fig.tight_layout()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    for ax, panel_labels in labels:  # after the layout: the final positions of the points
        spread_labels(ax, panel_labels, renderer)
    return fig


def plot_pareto(rows: Sequence[Row], path: Path, title: str) -> Path:
    """Write ``pareto.png`` (:func:`pareto_figure`).

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
    return _save(pareto_figure(rows, title), Path(path))


def _save(fig: Figure, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # readers never see half a PNG
    fig.savefig(tmp, dpi=DPI, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def label_box(label: Text, renderer: RendererBase) -> Bbox:
    """A label's text box in display pixels (without its leader line), where it is drawn now."""
    if isinstance(label, Annotation):
        label.update_positions(renderer)  # its transform follows the point after a layout change
    return Text.get_window_extent(label, renderer)


def spread_labels(ax: plt.Axes, labels: Sequence[Annotation], renderer: RendererBase) -> list[Annotation]:
    """Move point labels so that no two overlap.

    Labels are placed from the lowest point up; each takes the first free place among: its
    default (up and right of the point), below right, up and below left, then further up or down
    in steps of one line, inside the axes when possible. A label moved beyond its point's
    neighbourhood is drawn again with a thin leader line to the point.

    Parameters
    ----------
    ax : Axes
        The panel holding the labels.
    labels : Sequence[Annotation]
        Its point labels (``textcoords="offset points"``).
    renderer : RendererBase
        The figure's renderer (text sizes).

    Returns
    -------
    list[Annotation]
        The labels as drawn, in the order of ``labels``.
    """
    to_pixels = ax.figure.dpi / 72.0
    placed: list[Bbox] = []
    out = list(labels)
    for i in sorted(range(len(out)), key=lambda i: tuple(ax.transData.transform(out[i].xy))[::-1]):
        label = out[i]
        size = label_box(label, renderer)
        places = _label_places(size.width / to_pixels, size.height / to_pixels)
        k, box = _first_free(label, places, placed, ax.bbox, renderer)
        if k >= 4:  # away from its point: drawn again with a leader line to it
            label.remove()
            label = out[i] = ax.annotate(
                label.get_text(), label.xy, textcoords="offset points", xytext=places[k],
                fontsize=label.get_fontsize(), color=label.get_color(),
                arrowprops={"arrowstyle": "-", "color": label.get_color(), "lw": 0.6, "shrinkA": 0, "shrinkB": 2})
        placed.append(box.padded(1))
    return out


def _first_free(label: Annotation, places: list[tuple[float, float]], placed: list[Bbox], axes_box: Bbox,
                renderer: RendererBase) -> tuple[int, Bbox]:
    """Put ``label`` at the first of ``places`` where it overlaps no placed box, inside the axes
    when one is free there; returns that place's index and the label's box (place 0 when none is free)."""
    for inside in (True, False):
        for k, offset in enumerate(places):
            label.xyann = offset
            box = label_box(label, renderer)
            if (not inside or _within(box, axes_box)) and not any(box.overlaps(b) for b in placed):
                return k, box
    label.xyann = places[0]
    return 0, label_box(label, renderer)


def _label_places(w: float, h: float, steps: int = 12) -> list[tuple[float, float]]:
    """Candidate offsets (points) of a ``w`` x ``h`` label, nearest first."""
    dx, dy = LABEL_OFFSET
    right, left, up, down = dx, -dx - w, dy, -dy - h
    places = [(right, up), (right, down), (left, up), (left, down)]
    for k in range(1, steps + 1):
        step = k * (h + 2)
        places += [(right, up + step), (right, down - step), (left, up + step), (left, down - step)]
    return places


def _within(box: Bbox, outer: Bbox) -> bool:
    return outer.x0 <= box.x0 and box.x1 <= outer.x1 and outer.y0 <= box.y0 and box.y1 <= outer.y1


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


def _draw_panel(ax: plt.Axes, rows: Sequence[Row], panel: tuple, color_of: dict[str, str]) -> list[Annotation]:
    """Draw one panel; returns its point labels (placed by :func:`spread_labels` after the layout)."""
    xlabel, scale, ours_x, paper_x = panel
    labels = []
    for name, series in _series(rows).items():
        color = color_of.get(name, "gray")
        ours = sorted((r for r in series if r.ours and ours_x(r) is not None), key=ours_x)
        if ours:
            ax.errorbar([ours_x(r) for r in ours], [r.top1 for r in ours], yerr=_yerr(ours), marker="o",
                        color=color, capsize=3, label=name)
            for r in ours:  # which bit widths / rate each point is
                text = f"w{r.w_bits}a{r.a_bits}" + (f" r{r.rate:g}" if r.rate is not None else "")
                labels.append(ax.annotate(text, (ours_x(r), r.top1), textcoords="offset points",
                                          xytext=LABEL_OFFSET, fontsize="x-small", color=color))
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
    return labels


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
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, Path(path))
