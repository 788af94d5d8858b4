"""Two runs on the same images: paired difference of top-1 and the exact McNemar test.

``python -m qaf.report --compare RUN_A RUN_B`` and :func:`compare_runs` read two job folders'
``predictions.npz`` (per-image correctness) and hand them to
:func:`qaf.metrics.stats.paired_comparison`. Runs are comparable only when they were scored on
the same images: the same data set (and root), the same ``eval_samples`` and the same number of
predictions; otherwise :class:`NotComparable` says why.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qaf import outputs
from qaf.metrics.stats import PairedComparison, paired_comparison, wilson_interval
from qaf.report.collect import OK, Job, load_job
from qaf.results import Metrics

#: ``config.data`` keys that choose the evaluation images (besides the data set's name).
_EVAL_KEYS = ("_target_", "root", "eval_samples")


class NotComparable(ValueError):
    """Two runs that were not scored on the same images (or lack per-image predictions)."""


def read_predictions(folder: Path) -> np.ndarray:
    """Per-image top-1 correctness of a finished job (``predictions.npz``).

    Parameters
    ----------
    folder : Path
        The job's output directory.

    Returns
    -------
    np.ndarray
        Boolean array, one entry per evaluated image, in evaluation order.

    Raises
    ------
    NotComparable
        When the file is missing or damaged.
    """
    path = Path(folder) / outputs.PREDICTIONS_FILE
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise NotComparable(f"{folder} has no {outputs.PREDICTIONS_FILE}") from None
    return _load_correct(str(path), stat.st_mtime_ns, stat.st_size).copy()


@lru_cache(maxsize=512)
def _load_correct(path: str, _mtime_ns: int, _size: int) -> np.ndarray:
    """Unpacked ``correct1`` of one file version (a report compares each row several times)."""
    try:
        with np.load(path) as data:
            n = int(data["n"])
            correct = np.unpackbits(np.asarray(data["correct1"], dtype=np.uint8))[:n].astype(bool)
    except Exception as err:  # noqa: BLE001 - truncated archive, missing keys, wrong types
        raise NotComparable(f"{path} is unreadable ({type(err).__name__}: {err})") from None
    if correct.size != n:
        raise NotComparable(f"{path} holds {correct.size} predictions, not n={n}")
    return correct


def _eval_identity(metrics: Metrics) -> tuple[Any, ...]:
    """What decides the evaluation images of a run: data set, its eval keys, eval_samples."""
    data_cfg = metrics.config.get("data")
    data_cfg = data_cfg if isinstance(data_cfg, dict) else {}
    return (metrics.data, metrics.eval_samples, *(str(data_cfg.get(k)) for k in _EVAL_KEYS))


def compare_jobs(a: Job, b: Job) -> PairedComparison:
    """Paired comparison of two finished jobs (A minus B).

    Parameters
    ----------
    a, b : Job
        Jobs with status ``ok`` and a ``predictions.npz``.

    Returns
    -------
    PairedComparison

    Raises
    ------
    NotComparable
        When either has no results or predictions, or they were scored on different images.
    """
    for job in (a, b):
        if job.status != OK or job.metrics is None or job.path is None:
            raise NotComparable(f"{job.path or job.name} has no valid results ({job.status}"
                                + (f": {job.error})" if job.error else ")"))
    ident_a, ident_b = _eval_identity(a.metrics), _eval_identity(b.metrics)  # type: ignore[arg-type]
    if ident_a != ident_b:
        raise NotComparable(f"not scored on the same images: {a.path} evaluated {_describe(a.metrics)}, "
                            f"{b.path} evaluated {_describe(b.metrics)}")
    correct_a, correct_b = read_predictions(a.path), read_predictions(b.path)
    if correct_a.size != correct_b.size:
        raise NotComparable(f"not scored on the same images: {correct_a.size} predictions in {a.path}, "
                            f"{correct_b.size} in {b.path}")
    return paired_comparison(correct_a, correct_b)


def _describe(metrics: Metrics) -> str:
    data_cfg = metrics.config.get("data")
    root = f" from {data_cfg.get('root')}" if isinstance(data_cfg, dict) and data_cfg.get("root") else ""
    return f"{metrics.eval_samples} images of {metrics.data}{root}"


def compare_runs(a: Path, b: Path) -> PairedComparison:
    """Paired comparison of two job folders (A minus B), as ``--compare`` prints it.

    Parameters
    ----------
    a, b : Path
        Job output directories holding ``metrics.json`` and ``predictions.npz``.

    Returns
    -------
    PairedComparison

    Raises
    ------
    NotComparable
        When a folder holds no valid results, or the runs were not scored on the same images.
    """
    return compare_jobs(load_job(Path(a), Path(a)), load_job(Path(b), Path(b)))


def compare_job_sets(jobs_a: Sequence[Job], jobs_b: Sequence[Job]) -> PairedComparison | None:
    """Compare two table rows through one job each: the same seed when they share one.

    Parameters
    ----------
    jobs_a, jobs_b : Sequence[Job]
        The finished jobs behind two rows (several seeds each, possibly).

    Returns
    -------
    PairedComparison | None
        On the smallest common seed (else the first job of each); None when the pair is not
        comparable (no predictions, other images).
    """
    if not jobs_a or not jobs_b:
        return None
    seeds_b = {_seed(j): j for j in jobs_b}
    common = sorted((s for s in (_seed(j) for j in jobs_a) if s in seeds_b), key=str)
    a = next((j for j in jobs_a if _seed(j) == common[0]), jobs_a[0]) if common else jobs_a[0]
    b = seeds_b[common[0]] if common else jobs_b[0]
    try:
        return compare_jobs(a, b)
    except NotComparable:
        return None


def _seed(job: Job) -> Any:
    return job.metrics.seed if job.metrics is not None else None


def fmt_p(p: float) -> str:
    """A p-value as text: ``<0.001`` or three decimals."""
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def p_text(p: float) -> str:
    """``p<0.001`` or ``p=0.011``."""
    text = fmt_p(p)
    return f"p{text}" if text.startswith("<") else f"p={text}"


def format_comparison(a: Path, b: Path, result: PairedComparison) -> str:
    """The lines ``--compare`` prints.

    Parameters
    ----------
    a, b : Path
        The two job folders.
    result : PairedComparison
        From :func:`compare_runs`.

    Returns
    -------
    str
        n, both top-1s with Wilson intervals, the paired difference with its interval, the
        discordant counts and the exact McNemar p-value with the verdict.
    """
    n = result.n
    lines = [f"A: {a}", f"B: {b}", f"images: {n} (the same in both)"]
    for name, top1 in (("A", result.top1_a), ("B", result.top1_b)):
        lo, hi = wilson_interval(round(top1 * n / 100), n)
        lines.append(f"top-1 {name}: {top1:.2f} % [{lo:.2f}, {hi:.2f}] (95 % Wilson)")
    lo, hi = result.ci95
    lines.append(f"difference A - B: {result.diff:+.2f} points [{lo:+.2f}, {hi:+.2f}] (95 %, paired)")
    lines.append(f"discordant images: {result.a_only + result.b_only} "
                 f"(only A right: {result.a_only}, only B right: {result.b_only})")
    verdict = "significant" if result.significant else "not significant"
    lines.append(f"exact McNemar {p_text(result.p_value)}: {verdict} at the 5 % level")
    return "\n".join(lines)
