"""The W&B dashboard of a sweep: one run per sweep group logging every job as a table row and a
scatter chart of top-1 against %BOPs. Offline by default (no account needed); ``wandb sync``
uploads it later."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from qaf.report.collect import OK, Job
from qaf.report.tables import interval_of, job_key

TABLE_COLUMNS = ["job", "status", "method", "label", "w_bits", "a_bits", "rate", "seed",
                 "top1", "top1_ci_low", "top1_ci_high", "top5", "bops_pct", "bops_pct_paper", "size_bytes",
                 "fp32_top1", "error"]


def sweep_groups(jobs: list[Job]) -> dict[str, list[Job]]:
    """Jobs grouped by sweep for W&B.

    Parameters
    ----------
    jobs : list[Job]
        Jobs of one or more sweeps.

    Returns
    -------
    dict[str, list[Job]]
        Keyed by the ``sweep_id`` the pipeline's own W&B runs use as their group (read from
        a finished job's metrics), else by the sweep directory's name.
    """
    ids: dict[Path, str] = {}
    for job in jobs:
        sweep_id = job.metrics.sweep_id if job.metrics is not None else None
        if sweep_id and job.sweep not in ids:
            ids[job.sweep] = str(sweep_id)
    groups: dict[str, list[Job]] = defaultdict(list)
    for job in jobs:
        groups[ids.get(job.sweep, job.sweep.name)].append(job)
    return dict(groups)


def table_data(jobs: list[Job]) -> list[list]:
    """Rows of the W&B table, one per job (jobs without results keep empty numbers).

    Parameters
    ----------
    jobs : list[Job]
        Jobs of one group.

    Returns
    -------
    list[list]
        Values in :data:`TABLE_COLUMNS` order.
    """
    data = []
    for job in jobs:
        m = job.metrics
        if m is not None:
            key = job_key(job)
            method, w, a, rate = key.method, key.w_bits, key.a_bits, key.rate
            label = m.method_info.display if m.method_info.reference else f"{method} w{w}a{a}"
            numbers = [m.top1, *(interval_of(m.top1_ci95) or (None, None)), m.top5, m.bops_pct, m.bops_pct_paper,
                       m.size_bytes, m.fp32_top1]
        else:
            method, w, a, rate = job.method, job.setting("bits"), job.setting("act_bits"), None
            label, numbers = f"{method} w{w}a{a if a else '?'}", [None] * 8
        data.append([job.name, job.status, method, label, w, a, rate, job.setting("seed"), *numbers, job.error])
    return data


def log_to_wandb(jobs: list[Job], project: str, mode: str, save_dir: Path) -> list[str]:
    """Create one W&B run per sweep group with the jobs table and the top-1 vs %BOPs scatter.

    Parameters
    ----------
    jobs : list[Job]
        All jobs of the report.
    project : str
        W&B project.
    mode : str
        ``offline`` (default elsewhere), ``online`` or ``disabled``.
    save_dir : Path
        Where W&B writes its files (``<save_dir>/wandb/offline-run-*``, for ``wandb sync``).

    Returns
    -------
    list[str]
        The local directories of the runs written.
    """
    import wandb  # only needed with --wandb

    run_dirs = []
    for group, members in sorted(sweep_groups(jobs).items()):
        run = wandb.init(project=project, group=group, job_type="report", name=f"report-{group}",
                         mode=mode, dir=str(save_dir), reinit="create_new",
                         config={"sweep_id": group, "jobs": len(members)})
        table = wandb.Table(columns=TABLE_COLUMNS, data=table_data(members))
        chart = wandb.plot.scatter(table, "bops_pct", "top1",
                                   title=f"Top-1 vs %BOPs ({group})")
        run.log({"jobs": table, "top1_vs_bops": chart})
        run.summary["finished_jobs"] = sum(j.status == OK for j in members)
        run_dirs.append(str(Path(run.dir).parent))
        run.finish()
    return run_dirs
