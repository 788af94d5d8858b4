"""Turn jobs into the paper's table (csv, Markdown, LaTeX; the page reuses :func:`main_table`).

One row per setting: model, data, method (with swept ``method.*`` options), weight and activation
bits, rate, evaluation images and calibration protocol (policy, BN re-estimation, calibration
transforms, fine-tuning). Several seeds of a setting are shown as ``mean ± std (k seeds)``, one
seed as top-1 with its 95 % Wilson interval. The float model is the top row. A row's mark
(:attr:`Row.mark`, set by :func:`qaf.report.pareto.mark_rows`) judges it at matched cost: bold
when nothing at equal or lower %BOPs is more accurate, ``≈`` when an exact McNemar test on the same
images cannot tell it from the best row at equal or lower %BOPs (p ≥ 0.05). Protocol columns that are the same for every
compressed row are stated once under the table instead. Paper numbers, when known, sit beside ours.
How a method's rows are labelled, ordered, given a rate or made the float row is what the method
declares (``metrics.json["method_info"]``, :class:`qaf.results.MethodInfo`), never its name.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

from qaf.metrics.stats import wilson_interval
from qaf.provenance import code_label
from qaf.report.collect import OK, Job
from qaf.report.compare import p_text
from qaf.results import Metrics, MethodInfo

#: The float model's row when no job of a reference method gives it (every job measures the float
#: model: ``fp32_top1``), and the key it is filed under.
FLOAT = MethodInfo(display="Float", reference=True, order=0)
FLOAT_KEY = "float"
#: ``--bops`` conventions: the metrics.json field each reads.
BOPS_FIELDS = {"qaf": "bops_pct", "paper": "bops_pct_paper"}
BOPS_NOTES = {
    "qaf": "%BOPs: qaf's count, every layer at its own weight x input bits, relative to the float "
           "model's MACs x 32 x 32.",
    "paper": "%BOPs: the QAF paper's convention, unfactorized models at w*a/1024 of the float "
             "model's BOPs, factorized models counted per layer.",
}
#: Protocol fields, in :attr:`Key.protocol` order: column headers and names in the note.
PROTOCOL_COLUMNS = ("Policy", "BN re-est.", "Calibration", "Fine-tuning")
_PROTOCOL_NAMES = ("policy", "BN re-estimation", "calibration", "fine-tuning")
LEVEL_TEXT = "p ≥ 0.05"


class Key(NamedTuple):
    """A row's identity."""

    model: str
    data: str
    method: str
    w_bits: int
    a_bits: int
    rate: float | None
    eval_samples: int | None = None
    protocol: tuple[str, ...] = ()


@dataclass
class Row:
    """One line of the table: a setting and its aggregated results.

    Attributes
    ----------
    model, data, method : str
        What was run (``method`` carries swept options: ``ptq[clip=mse]``).
    w_bits, a_bits : int
        Weight and activation bit widths (32/32 for the float model).
    rate : float | None
        Parameter reduction rate; None for methods whose ``info.uses_rate`` is false.
    eval_samples : int | None
        Evaluation images (None for a paper-only row).
    protocol : tuple[str, ...]
        Policy, BN re-estimation, calibration, fine-tuning as text; () for float and paper rows.
    top1, top1_std : float | None
        Mean and standard deviation over seeds (std None with a single seed).
    top1_ci : tuple[float, float] | None
        95 % Wilson interval of a single-seed row.
    top5, bops_pct, size_bytes, compression_ratio : float | None
        Means over seeds (``bops_pct`` in the report's convention).
    vs_fp32_diff, vs_fp32_p : float | None
        Paired difference to the float model (mean over seeds) and its McNemar p (largest).
    deploy_top1, deploy_diff, deploy_p : float | None
        Top-1 of the deployable form (``metrics.json["deploy_top1"]``, mean over seeds), its paired
        difference to ``top1`` (mean) and that difference's McNemar p (largest).
    seeds : int
        Number of distinct seeds aggregated (0 for a paper-only row).
    paper_top1, paper_bops_pct : float | None
        The paper's numbers for this setting, when known.
    paper_source : str | None
        Where they come from (the paper CSV's ``source`` column).
    mark : str
        ``best`` (bold: nothing at equal or lower cost is more accurate), ``tie`` (≈: not
        significantly worse than the best row at equal or lower cost) or "" (set by
        :func:`qaf.report.pareto.mark_rows`).
    jobs : list[Job]
        The finished jobs behind the row.
    info : MethodInfo | None
        What the method declares (for a method no job ran: its paper CSV ``label``).
    """

    model: str
    data: str
    method: str
    w_bits: int
    a_bits: int
    rate: float | None
    eval_samples: int | None = None
    protocol: tuple[str, ...] = ()
    top1: float | None = None
    top1_std: float | None = None
    top1_ci: tuple[float, float] | None = None
    top5: float | None = None
    bops_pct: float | None = None
    size_bytes: float | None = None
    compression_ratio: float | None = None
    vs_fp32_diff: float | None = None
    vs_fp32_p: float | None = None
    deploy_top1: float | None = None
    deploy_diff: float | None = None
    deploy_p: float | None = None
    seeds: int = 0
    paper_top1: float | None = None
    paper_bops_pct: float | None = None
    paper_source: str | None = None
    mark: str = ""
    jobs: list[Job] = field(default_factory=list)
    info: MethodInfo | None = None

    @property
    def key(self) -> Key:
        """The row's identity."""
        return Key(self.model, self.data, self.method, self.w_bits, self.a_bits, self.rate,
                   self.eval_samples, self.protocol)

    @property
    def base_method(self) -> str:
        """The method without its variant (``ptq[clip=mse]`` -> ``ptq``)."""
        return self.method.partition("[")[0]

    @property
    def label(self) -> str:
        """The method as the paper names it, with the swept method options, e.g. ``PTQ (clip=mse)``."""
        variant = self.method.partition("[")[2].removesuffix("]")  # a value may end in "]" too
        name = self.info.display if self.info else self.base_method
        return f"{name} ({variant})" if variant else name

    @property
    def is_float(self) -> bool:
        """Whether this is the float model's row (its method is the reference)."""
        return self.info is not None and self.info.reference

    @property
    def ours(self) -> bool:
        """Whether the row has our own numbers (not only the paper's)."""
        return self.top1 is not None


def protocol_of(metrics: Metrics) -> tuple[str, ...]:
    """The calibration protocol of a run as text, in :data:`PROTOCOL_COLUMNS` order.

    Parameters
    ----------
    metrics : Metrics
        A run's results.

    Returns
    -------
    tuple[str, ...]
        Policy name; ``on, <transform> transform`` or ``off``; ``<n> <split> images, <transform>
        transform`` for the observers' calibration; ``none`` or ``KD, <steps> steps``.
    """
    proto = metrics.protocol
    policy = metrics.policy or (proto.get("policy") or {}).get("name") or "?"
    recal = proto.get("bn_recalibration")
    bn = "?" if recal is None else (f"on, {proto.get('bn_transform', '?')} transform" if recal else "off")
    calib = (f"{proto.get('calib_samples', '?')} {proto.get('calib_split', '?')} images, "
             f"{proto.get('calib_transform', '?')} transform")
    finetune = proto.get("finetune")
    tuned = "none" if not finetune else (
        f"KD, {finetune['steps']} steps" if isinstance(finetune, dict) and "steps" in finetune else "yes")
    return (str(policy), bn, calib, tuned)


def job_key(job: Job) -> Key:
    """The table row a finished job belongs to.

    Parameters
    ----------
    job : Job
        A job with status ``ok``.

    Returns
    -------
    Key
        A reference method's row is 32/32 without rate or protocol; the rate only where the method
        uses it; swept ``method.*`` options make the method ``name[key=value,...]``.
    """
    m = job.metrics
    assert m is not None
    if m.method_info.reference:
        # The plain float model has no protocol; one with re-estimated BN (or fine-tuned) is
        # another model, with its own row.
        changed = bool(m.protocol.get("bn_recalibration") or m.protocol.get("finetune"))
        return Key(m.model, m.data, m.method, 32, 32, None, m.eval_samples, protocol_of(m) if changed else ())
    # Swept method options (method.clip=mse, ...) and the variant the method declares (ranks=budget)
    # are different methods, not repeats to average.
    variant = ",".join(sorted([o.split(".", 1)[1] for o in job.overrides if o.startswith("method.")]
                              + ([m.method_info.variant] if m.method_info.variant else [])))
    method = f"{m.method}[{variant}]" if variant else m.method
    return Key(m.model, m.data, method, m.bits, m.act_bits, shown_rate(m), m.eval_samples, protocol_of(m))


def shown_rate(m: Metrics) -> float | None:
    """The rate a run's row shows: none when the method does not use it, else the method's own
    (per-layer ranks: all factorized layers together) or the config's."""
    if not m.method_info.uses_rate:
        return None
    return m.method_info.rate if m.method_info.rate is not None else m.rate


def aggregate(jobs: Iterable[Job], paper: dict[tuple, dict] | None = None,
              paper_for: set[tuple[str, str]] | None = None, bops: str = "qaf") -> list[Row]:
    """Group finished jobs into table rows, float row first (unmarked: see
    :func:`qaf.report.pareto.mark_rows`).

    Parameters
    ----------
    jobs : Iterable[Job]
        Jobs of any status; only ``ok`` ones contribute numbers.
    paper : dict | None
        Paper numbers keyed by (method, w_bits, a_bits, rate), as from :func:`read_paper_csv`.
        Paper settings that were not run become rows without our numbers.
    paper_for : set[tuple[str, str]] | None
        The (model, data) pairs the paper numbers apply to; None: every pair in the jobs.
    bops : str
        ``qaf`` or ``paper``: which %BOPs the rows carry (:data:`BOPS_FIELDS`).

    Returns
    -------
    list[Row]
        Sorted by model, data, then float, then method order, bits and rate.
    """
    groups: dict[Key, list[Job]] = defaultdict(list)
    for job in jobs:
        if job.status == OK:
            groups[job_key(job)].append(job)
    rows = {key: _row(key, members, BOPS_FIELDS[bops]) for key, members in groups.items()}
    _add_float_rows(rows, [j for members in groups.values() for j in members])
    if paper:
        _attach_paper(rows, paper, paper_for, {r.base_method: r.info for r in rows.values() if r.info})
    return sorted(rows.values(), key=_sort_key)


def _row(key: Key, jobs: list[Job], bops_field: str) -> Row:
    metrics = [j.metrics for j in jobs if j.metrics is not None]
    # Jobs with the same seed are repeats of one experiment (e.g. fp32 at bits=4 and bits=8):
    # average them first so that only distinct seeds make the spread.
    by_seed: dict[Any, list[Metrics]] = defaultdict(list)
    for m in metrics:
        by_seed[m.seed].append(m)
    fields = {"top1": "top1", "top5": "top5", "bops_pct": bops_field, "size_bytes": "size_bytes",
              "compression_ratio": "compression_ratio"}
    per_seed = [{name: _mean([getattr(m, src) for m in ms]) for name, src in fields.items()}
                for ms in by_seed.values()]
    top1s = [s["top1"] for s in per_seed if s["top1"] is not None]
    row = Row(*key, top1=_mean(top1s), top1_std=statistics.stdev(top1s) if len(top1s) > 1 else None,
              seeds=len(per_seed), jobs=jobs, info=max(metrics, key=lambda m: m.schema_version).method_info,
              **{name: _mean([s[name] for s in per_seed]) for name in fields if name != "top1"})
    if len(per_seed) == 1:
        row.top1_ci = interval_of(metrics[0].top1_ci95)
    if not row.is_float:
        tests = [m.vs_fp32 for m in metrics if m.vs_fp32 is not None]
        row.vs_fp32_diff = _mean([t.get("diff") for t in tests])
        row.vs_fp32_p = max((float(t["p_value"]) for t in tests if _is_number(t.get("p_value"))), default=None)
        deploys = [m.deploy_vs_top1 for m in metrics if m.deploy_vs_top1 is not None]
        row.deploy_top1 = _mean([m.deploy_top1 for m in metrics])
        row.deploy_diff = _mean([t.get("diff") for t in deploys])
        row.deploy_p = max((float(t["p_value"]) for t in deploys if _is_number(t.get("p_value"))), default=None)
    return row


def _add_float_rows(rows: dict[Key, Row], jobs: list[Job]) -> None:
    """Every job measures the float model: give the table its float row even when the sweep did
    not run a reference method (top-1 from ``fp32_top1``, interval from the images)."""
    have = {(r.model, r.data, r.eval_samples) for r in rows.values() if r.is_float and not r.protocol}
    found: dict[Key, list[Metrics]] = defaultdict(list)
    for m in (job.metrics for job in jobs):
        if m is not None and m.fp32_top1 is not None and (m.model, m.data, m.eval_samples) not in have:
            found[Key(m.model, m.data, FLOAT_KEY, 32, 32, None, m.eval_samples)].append(m)
    for key, ms in found.items():
        top1 = statistics.fmean(m.fp32_top1 for m in ms)  # type: ignore[misc]
        n = key.eval_samples
        ci = wilson_interval(round(top1 * n / 100), n) if isinstance(n, int) and n > 0 else None
        rows[key] = Row(*key, top1=top1, top1_ci=ci, bops_pct=100.0, seeds=1, compression_ratio=1.0,
                        size_bytes=_mean([m.fp32_size_bytes for m in ms]), info=FLOAT)


def _mean(values: Iterable[Any]) -> float | None:
    nums = [float(v) for v in values if _is_number(v)]
    return statistics.fmean(nums) if nums else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def interval_of(value: Any) -> tuple[float, float] | None:
    """A metrics.json ``[low, high]`` as a tuple, or None when it is not two finite numbers."""
    if isinstance(value, list) and len(value) == 2 and all(_is_number(v) for v in value):
        return (float(value[0]), float(value[1]))
    return None


def _attach_paper(rows: dict[Key, Row], paper: dict[tuple, dict], paper_for: set[tuple[str, str]] | None,
                  infos: dict[str, MethodInfo]) -> None:
    """Put the paper numbers beside our rows; a paper row at 32/32 bits without rate is the float
    model's. A setting no job ran becomes a row of its own (labelled as the method's jobs declare,
    else by the CSV's ``label``)."""
    pairs = sorted(paper_for if paper_for is not None else {k[:2] for k in rows}) or [("?", "?")]
    for pkey, values in paper.items():
        method, *setting = pkey
        for model, data in pairs:
            if setting == [32, 32, None]:
                matches = [r for r in rows.values() if r.key[:2] == (model, data) and r.is_float and not r.protocol]
            else:
                matches = [r for k, r in rows.items() if k[:6] == (model, data, *pkey)]
            if not matches:
                info = FLOAT if setting == [32, 32, None] else infos.get(method) or MethodInfo(
                    display=values.get("label") or method, uses_rate=pkey[3] is not None)
                row = Row(model, data, *pkey, info=info)
                rows[row.key] = row
                matches = [row]
            for row in matches:
                row.paper_top1 = values.get("top1")
                row.paper_bops_pct = values.get("bops_pct")
                row.paper_source = values.get("source")


def _sort_key(row: Row) -> tuple:
    order = (row.info or MethodInfo("")).order
    return (row.model, row.data, not row.is_float, order, row.method, row.w_bits, row.a_bits,
            -1.0 if row.rate is None else row.rate, row.eval_samples or 0, row.protocol)


def read_paper_csv(path: Path) -> dict[tuple, dict]:
    """Read an experiment's paper numbers.

    Parameters
    ----------
    path : Path
        CSV with columns ``method, w_bits, a_bits, rate, bops_pct, top1`` and optionally
        ``source`` and ``label`` (rate empty for methods whose rate does not apply; the float
        model's row at 32/32 bits; method names as in configs, e.g. ``admm_epc``, or methods qaf
        does not run, e.g. ``adaround``, with the ``label`` tables show for them); ``#`` lines
        are comments.

    Returns
    -------
    dict[tuple, dict]
        ``{(method, w_bits, a_bits, rate): {"top1": float, "bops_pct": float | None,
        "source": str | None, "label": str | None}}``.

    Raises
    ------
    ValueError
        For a row that cannot be read, naming the file and line.
    """
    out: dict[tuple, dict] = {}
    with open(path, newline="") as fh:
        lines = [(i, line) for i, line in enumerate(fh, 1) if line.strip() and not line.startswith("#")]
    reader = csv.DictReader(line for _, line in lines)
    for (lineno, _), rec in zip(lines[1:], reader):
        try:
            key, values = _paper_record(rec)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}:{lineno}: cannot read paper row {dict(rec)} ({err})") from None
        out[key] = values
    return out


def _paper_record(rec: dict[str, str]) -> tuple[tuple, dict]:
    method = rec["method"].strip()
    rate = (rec.get("rate") or "").strip()
    key = (method, int(rec["w_bits"]), int(rec["a_bits"]), float(rate) if rate else None)
    bops = (rec.get("bops_pct") or "").strip()
    text = {name: (rec.get(name) or "").strip() or None for name in ("source", "label")}
    return key, {"top1": float(rec["top1"]), "bops_pct": float(bops) if bops else None, **text}


# ---------------------------------------------------------------------------------- formatting

def fmt_rate(rate: float | None) -> str:
    """``2`` for 2.0, ``2.5`` for 2.5, ``–`` when the method does not factorize."""
    return "–" if rate is None else f"{rate:g}"


def fmt_num(value: float | None, std: float | None = None, digits: int = 2) -> str:
    """Two decimals, ``mean ± std`` when a spread is known, ``–`` when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{value:.{digits}f}"


def fmt_top1(row: Row) -> str:
    """``89.99 [89.39, 90.56]`` (one seed), ``73.00 ± 1.41 (2 seeds)``, ``–``; ``≈`` for a tie."""
    if row.top1 is None:
        return "–"
    if row.seeds > 1:
        text = f"{fmt_num(row.top1, row.top1_std)} ({row.seeds} seeds)"
    elif row.top1_ci is not None:
        text = f"{row.top1:.2f} [{row.top1_ci[0]:.2f}, {row.top1_ci[1]:.2f}]"
    else:
        text = fmt_num(row.top1)
    return f"{text} ≈" if row.mark == "tie" else text


def fmt_delta(row: Row) -> str:
    """``-1.20 (p=0.080)``, ``-9.00 (p<0.001)``; with several seeds the mean difference and the largest p."""
    if row.is_float or row.vs_fp32_diff is None:
        return "–"
    if row.vs_fp32_p is None:
        return f"{row.vs_fp32_diff:+.2f}"
    if row.seeds > 1:
        return f"{row.vs_fp32_diff:+.2f} (max {p_text(row.vs_fp32_p)}, {row.seeds} seeds)"
    return f"{row.vs_fp32_diff:+.2f} ({p_text(row.vs_fp32_p)})"


def fmt_deploy(row: Row) -> str:
    """``89.55 (-0.20, p=0.250)``: the deployable form's top-1 and its paired difference to Top-1."""
    if row.deploy_top1 is None:
        return "–"
    if row.deploy_diff is None:
        return f"{row.deploy_top1:.2f}"
    p = "" if row.deploy_p is None else f", {'max ' if row.seeds > 1 else ''}{p_text(row.deploy_p)}"
    return f"{row.deploy_top1:.2f} ({row.deploy_diff:+.2f}{p})"


def has_paper(rows: Sequence[Row]) -> bool:
    """Whether any row carries paper numbers (then the tables get paper columns)."""
    return any(r.paper_top1 is not None for r in rows)


@dataclass
class Table:
    """A table ready to render: cells as text plus what the renderers style.

    Attributes
    ----------
    header : list[str]
        Column headers.
    body : list[list[str]]
        Cell texts, one list per row.
    bold : list[bool]
        Rows to emphasise (the best of their group).
    float_rows : list[bool]
        The float model's rows (a rule follows them in LaTeX).
    n_text : int
        Leading text columns (left-aligned); the rest are numbers.
    notes : list[str]
        Sentences printed under the table.
    """

    header: list[str]
    body: list[list[str]]
    bold: list[bool]
    float_rows: list[bool]
    n_text: int
    notes: list[str] = field(default_factory=list)


def main_table(rows: Sequence[Row], bops_note: str = BOPS_NOTES["qaf"]) -> Table:
    """The results table shared by Markdown, LaTeX and HTML.

    Parameters
    ----------
    rows : Sequence[Row]
        From :func:`aggregate`.
    bops_note : str
        The sentence that says which %BOPs convention the column uses (and why).

    Returns
    -------
    Table
        Model and data columns only when the rows mix several; protocol columns only where
        compressed rows differ (else one note); an Images column only when rows differ in it;
        paper columns only when paper numbers are known.
    """
    multi = len({r.key[:2] for r in rows}) > 1
    varying = _varying_protocol(rows)
    images = sorted({r.eval_samples for r in rows if r.ours and r.eval_samples is not None})
    paper, sources = has_paper(rows), sorted({r.paper_source for r in rows if r.paper_source})
    deploy = any(r.deploy_top1 is not None for r in rows)
    header = ((["Model", "Data"] if multi else []) + ["Method", "w/a", "rate"]
              + [PROTOCOL_COLUMNS[i] for i in varying]
              + ["%BOPs", "Size (kB)", "Ratio"] + (["Images"] if len(images) > 1 else [])
              + ["Top-1", "Δ float"] + (["Deploy top-1"] if deploy else [])
              + (["%BOPs (paper)", "Top-1 (paper)"] if paper else []) + (["Source"] if len(sources) > 1 else []))
    body = []
    for r in rows:
        cells = (([r.model, r.data] if multi else []) + [r.label, f"{r.w_bits}/{r.a_bits}", fmt_rate(r.rate)]
                 + [r.protocol[i] if r.protocol else "–" for i in varying]
                 + [fmt_num(r.bops_pct), fmt_num(None if r.size_bytes is None else r.size_bytes / 1e3, digits=1),
                    "–" if r.compression_ratio is None else f"{r.compression_ratio:.2f}×"]
                 + ([str(r.eval_samples or "–")] if len(images) > 1 else [])
                 + [fmt_top1(r), fmt_delta(r)] + ([fmt_deploy(r)] if deploy else [])
                 + ([fmt_num(r.paper_bops_pct), fmt_num(r.paper_top1)] if paper else [])
                 + ([r.paper_source or "–"] if len(sources) > 1 else []))
        body.append(cells)
    notes = _notes(rows, images, varying, sources, bops_note)
    return Table(header, body, [r.mark == "best" for r in rows], [r.is_float for r in rows],
                 header.index("rate") + 1 + len(varying), notes)


def _varying_protocol(rows: Sequence[Row]) -> list[int]:
    """Indices of the protocol fields that differ between compressed rows."""
    protocols = {r.protocol for r in rows if r.protocol}
    return [i for i in range(len(PROTOCOL_COLUMNS)) if len({p[i] for p in protocols}) > 1]


def _notes(rows: Sequence[Row], images: list[int], varying: list[int], sources: list[str],
           bops_note: str) -> list[str]:
    on = f"on the same {images[0]} evaluation images" if len(images) == 1 else "on the images of its row"
    notes = [f"Top-1 (%) {on}: [95 % Wilson interval] for one seed, mean ± std over seeds otherwise."]
    if any(r.mark for r in rows):
        notes.append("Bold: no row of any method at equal or lower %BOPs has a higher top-1 (the Pareto "
                     "frontier); ≈: not significantly less accurate than the best row at equal or lower %BOPs "
                     f"(exact McNemar test on the same images, {LEVEL_TEXT}).")
    if any(r.vs_fp32_diff is not None for r in rows):
        notes.append("Δ float: paired difference to the float model in points on the same images, with the "
                     "exact McNemar p-value.")
    if any(r.deploy_top1 is not None for r in rows):
        notes.append("Deploy top-1: the deployable form (batch norms folded into the convs, additions and "
                     "biases on integer grids, docs/export.md), with its paired difference to Top-1 and the "
                     "exact McNemar p-value.")
    notes.append(bops_note)
    protocols = sorted({r.protocol for r in rows if r.protocol})
    constant = [f"{_PROTOCOL_NAMES[i]} {protocols[0][i]}"
                for i in range(len(PROTOCOL_COLUMNS)) if protocols and i not in varying]
    if constant:
        notes.append("Every compressed row: " + "; ".join(constant) + ".")
    if len(sources) == 1:
        notes.append(f"Paper numbers: {sources[0]}.")
    return notes


def bops_note(convention: str, reason: str | None = None) -> str:
    """The %BOPs sentence of a report, with why the convention was chosen when it was automatic."""
    return BOPS_NOTES[convention] + (f" ({reason})" if reason else "")


def code_labels(jobs: Iterable[Job]) -> list[str]:
    """The code versions (:func:`qaf.provenance.code_label`) the finished jobs' results come from."""
    return sorted({code_label(j.metrics.code) for j in jobs if j.status == OK and j.metrics})


def problem_jobs(jobs: Iterable[Job]) -> list[Job]:
    """The jobs without results (every status but ``ok``), in order."""
    return [j for j in jobs if j.status != OK]


def problem_line(job: Job) -> str:
    """One line describing a job without results: status, where, and why."""
    where = job.name
    if job.path is not None:  # a job that never started is named by its overrides already
        where += f" [{' '.join(job.overrides)}]"
    detail = f": {job.error}" if job.error else ""
    stage = f" (stage {job.stage})" if job.stage else ""
    return f"{job.status}: {where}{detail}{stage}"


def markdown_table(table: Table) -> list[str]:
    """A :class:`Table` as Markdown lines (bold rows, then its notes)."""
    lines = ["| " + " | ".join(table.header) + " |", "|" + "|".join("---" for _ in table.header) + "|"]
    for cells, bold in zip(table.body, table.bold):
        shown = [f"**{c}**" if bold and c != "–" else c for c in cells]
        lines.append("| " + " | ".join(shown) + " |")
    if table.notes:
        lines += [""] + [f"{note}  " for note in table.notes[:-1]] + [table.notes[-1]]
    return lines


def render_markdown(rows: Sequence[Row], jobs: Sequence[Job], title: str,
                    bops_text: str = BOPS_NOTES["qaf"]) -> str:
    """The table as Markdown, its notes, and every job that has no results.

    Parameters
    ----------
    rows : Sequence[Row]
        From :func:`aggregate`.
    jobs : Sequence[Job]
        All jobs (problem ones are listed under the table).
    title : str
        Heading.
    bops_text : str
        The %BOPs sentence (:func:`bops_note`).

    Returns
    -------
    str
        Markdown text.
    """
    lines = [f"# {title}", "", *markdown_table(main_table(rows, bops_text))]
    ok = sum(j.status == OK for j in jobs)
    lines += ["", f"{ok} of {len(jobs)} jobs finished."]
    codes = code_labels(jobs)
    if codes:
        lines += [f"Code: {', '.join(codes)} (git commit of the jobs' results)."]
    problems = problem_jobs(jobs)
    if problems:
        lines += ["", "## Jobs without results", ""]
        lines += [f"- {problem_line(j)}" for j in problems]
    return "\n".join(lines) + "\n"


_TEX = (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"),
        ("→", r"$\to$"), ("–", "--"), ("±", r"$\pm$"), ("≈", r"$\approx$"), ("×", r"$\times$"),
        ("Δ", r"$\Delta$"), ("≤", r"$\le$"), ("≥", r"$\ge$"))


def tex_escape(text: str) -> str:
    """Plain text with the characters tables use as LaTeX."""
    for char, repl in _TEX:
        text = text.replace(char, repl)
    return text


def latex_tabular(table: Table) -> list[str]:
    """A :class:`Table` as a booktabs ``tabular`` (bold rows, rule after float rows)."""
    align = "l" * table.n_text + "r" * (len(table.header) - table.n_text)
    out = [f"\\begin{{tabular}}{{{align}}}", r"\toprule", " & ".join(tex_escape(h) for h in table.header) + r" \\",
           r"\midrule"]
    for i, (cells, bold) in enumerate(zip(table.body, table.bold)):
        text = [f"\\textbf{{{tex_escape(c)}}}" if bold and c != "–" else tex_escape(c) for c in cells]
        out.append(" & ".join(text) + r" \\")
        if table.float_rows[i] and i + 1 < len(table.body) and not table.float_rows[i + 1]:
            out.append(r"\midrule")
    return out + [r"\bottomrule", r"\end{tabular}"]


def render_latex(rows: Sequence[Row], caption: str, bops_text: str = BOPS_NOTES["qaf"]) -> str:
    """The table as a booktabs LaTeX ``table``, its notes in small print below.

    Parameters
    ----------
    rows : Sequence[Row]
        From :func:`aggregate`.
    caption : str
        Table caption (the %BOPs convention is appended).
    bops_text : str
        The %BOPs sentence (:func:`bops_note`).

    Returns
    -------
    str
        LaTeX source needing ``booktabs``.
    """
    table = main_table(rows, bops_text)
    out = [r"\begin{table}[t]", r"\centering", f"\\caption{{{tex_escape(caption)}. {tex_escape(bops_text)}}}",
           *latex_tabular(table)]
    notes = [n for n in table.notes if n != bops_text]
    if notes:
        out += [r"\par\smallskip\footnotesize", " ".join(tex_escape(n) for n in notes)]
    out.append(r"\end{table}")
    return "\n".join(out) + "\n"


RESULT_COLUMNS = ["sweep", "job", "status", "error", "stage", "method", "model", "data", "w_bits", "a_bits",
                  "rate", "seed", "policy", "bn_recalibration", "bn_transform", "calib_samples", "calib_transform",
                  "eval_samples", "top1", "top1_ci_low", "top1_ci_high", "top5", "fp32_top1", "vs_fp32_diff",
                  "vs_fp32_p", "deploy_top1", "deploy_diff", "deploy_p", "bops_pct", "bops_pct_paper", "bops", "macs", "fp32_macs", "params", "size_bytes",
                  "fp32_size_bytes", "compression_ratio", "config_hash", "code", "overrides", "path"]
_COPIED = ("eval_samples", "top1", "top5", "fp32_top1", "deploy_top1", "bops_pct", "bops_pct_paper", "bops", "macs",
           "fp32_macs", "params", "size_bytes", "fp32_size_bytes", "compression_ratio", "config_hash", "policy")


def result_record(job: Job) -> dict[str, Any]:
    """One job as a :data:`RESULT_COLUMNS` record (empty cells where unknown)."""
    m = job.metrics.to_json() if job.metrics is not None else {}
    proto, vs, deploy = m.get("protocol", {}), m.get("vs_fp32") or {}, m.get("deploy_vs_top1") or {}
    ci = interval_of(m.get("top1_ci95")) or ("", "")
    is_float = job.metrics is not None and job.metrics.method_info.reference
    own_rate = job.metrics.method_info.rate if job.metrics is not None else None  # per-layer ranks' rate
    rec = {
        "sweep": str(job.sweep), "job": job.name, "status": job.status, "error": job.error or "",
        "stage": job.stage or "", "method": job.method,
        "model": m.get("model", job.choices.get("model", "")), "data": m.get("data", job.choices.get("data", "")),
        "w_bits": 32 if is_float else job.setting("bits"), "a_bits": 32 if is_float else job.setting("act_bits"),
        "rate": job.setting("rate") if own_rate is None else own_rate, "seed": job.setting("seed"),
        "bn_recalibration": proto.get("bn_recalibration", ""), "bn_transform": proto.get("bn_transform", ""),
        "calib_samples": proto.get("calib_samples", ""), "calib_transform": proto.get("calib_transform", ""),
        "top1_ci_low": ci[0], "top1_ci_high": ci[1], "vs_fp32_diff": vs.get("diff", ""),
        "vs_fp32_p": vs.get("p_value", ""), "deploy_diff": deploy.get("diff", ""),
        "deploy_p": deploy.get("p_value", ""), "overrides": " ".join(job.overrides),
        "code": code_label(m["code"]) if "code" in m else "",
        "path": "" if job.path is None else str(job.path),
    }
    rec.update({k: m.get(k) for k in _COPIED})
    return rec


def render_results_csv(jobs: Sequence[Job]) -> str:
    """One CSV line per job, finished or not (the raw data behind the table).

    Parameters
    ----------
    jobs : Sequence[Job]
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
        writer.writerow(result_record(job))
    return buf.getvalue()
