"""The accuracy-vs-cost plot: top-1 against %BOPs, one series per method (per method and
activation bits when several are swept), each point labelled with its weight bits and rate, the
float model as a horizontal line, the paper's points (when known) as hollow markers."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: works on headless machines and inside launchers
import matplotlib.pyplot as plt  # noqa: E402

from qaf.report.tables import FLOAT_METHOD, Row  # noqa: E402


def _series(rows: list[Row]) -> dict[str, list[Row]]:
    """Rows grouped by method (and activation bits if they vary), each series sorted by %BOPs."""
    compressed = [r for r in rows if r.method != FLOAT_METHOD]
    several_a = len({r.a_bits for r in compressed}) > 1
    series: dict[str, list[Row]] = defaultdict(list)
    for row in compressed:
        series[f"{row.label} a{row.a_bits}" if several_a else row.label].append(row)
    return {name: sorted(rs, key=lambda r: r.bops_pct or r.paper_bops_pct or 0.0)
            for name, rs in sorted(series.items())}


def plot_pareto(rows: list[Row], path: Path, title: str) -> Path:
    """Write ``pareto.png``: top-1 against %BOPs, one panel per (model, data).

    Parameters
    ----------
    rows : list[Row]
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
    panels = sorted({r.key[:2] for r in rows}) or [("", "")]
    fig, axes = plt.subplots(1, len(panels), figsize=(9.0 * len(panels), 5.0), squeeze=False)
    for ax, (model, data) in zip(axes[0], panels):
        panel_rows = [r for r in rows if r.key[:2] == (model, data)]
        _draw_panel(ax, panel_rows)
        ax.set_title(f"{model} / {data}" if model else "")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # readers never see half a PNG
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _draw_panel(ax: plt.Axes, rows: list[Row]) -> None:
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, series) in enumerate(_series(rows).items()):
        color = colors[i % len(colors)]
        ours = [r for r in series if r.top1 is not None and r.bops_pct is not None]
        if ours:
            ax.errorbar([r.bops_pct for r in ours], [r.top1 for r in ours],
                        yerr=[r.top1_std or 0.0 for r in ours], marker="o", color=color,
                        capsize=3, label=name)
            for r in ours:  # which bit width / rate each point is
                text = f"w{r.w_bits}" + (f" r{r.rate:g}" if r.rate is not None else "")
                ax.annotate(text, (r.bops_pct, r.top1), textcoords="offset points", xytext=(4, 4),
                            fontsize="x-small", color=color)
        paper = [r for r in series if r.paper_top1 is not None and r.paper_bops_pct is not None]
        if paper:
            ax.plot([r.paper_bops_pct for r in paper], [r.paper_top1 for r in paper],
                    marker="o", markerfacecolor="none", linestyle="--", color=color,
                    label=f"{name} (paper)")
    for r in rows:
        if r.method == FLOAT_METHOD and r.top1 is not None:
            ax.axhline(r.top1, color="black", linestyle=":", label=f"Float {r.top1:.2f}")
        if r.method == FLOAT_METHOD and r.paper_top1 is not None:
            ax.axhline(r.paper_top1, color="gray", linestyle=":",
                       label=f"Float {r.paper_top1:.2f} (paper)")
    ax.set_xlabel("%BOPs of the float model")
    ax.set_ylabel("Top-1 accuracy (%)")
    ax.grid(True, alpha=0.3)
    if ax.has_data():
        # Outside the axes: a sweep has many series and the legend must not hide points.
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
