"""Read a sweep's jobs from disk: Hydra's job configs, each job's ``metrics.json``, and the jobs
the sweep should have launched but did not finish.

A job is any directory holding ``.hydra/config.yaml``; a single run is a sweep directory that is
itself a job. Nothing is dropped: a job without ``metrics.json`` is kept with a status that says
why (failed, incomplete, not started).
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

OK = "ok"
FAILED = "failed"  # the job's log records an error
INCOMPLETE = "incomplete"  # no metrics.json and no error: still running, or killed
NOT_STARTED = "not started"  # in the sweep's product, but no job directory exists

# Directories inside a sweep that never hold jobs: Hydra's own, submitit's logs, W&B and
# Lightning outputs.
_SKIP_DIRS = {".hydra", ".submitit", "wandb", "csv", "lightning_logs", "__pycache__"}


@dataclass
class Job:
    """One job of a sweep, finished or not.

    Attributes
    ----------
    sweep : Path
        The sweep directory the job belongs to.
    path : Path | None
        The job's output directory; None for a job that was never started.
    status : str
        ``ok``, ``failed``, ``incomplete`` or ``not started``.
    overrides : list[str]
        The job's Hydra overrides (its coordinates in the sweep).
    choices : dict[str, str]
        Hydra's config-group choices (``method``, ``model``, ``data``, ``experiment``, ...).
    config : dict
        The job's config (resolved one from ``metrics.json`` when present).
    metrics : dict | None
        The parsed ``metrics.json``; None unless status is ``ok``.
    error : str | None
        The last error line found in the job's log, for failed jobs.
    config_dirs : list[Path]
        Hydra's file config sources (used to find an experiment's paper numbers).
    """

    sweep: Path
    path: Path | None
    status: str
    overrides: list[str] = field(default_factory=list)
    choices: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] | None = None
    error: str | None = None
    config_dirs: list[Path] = field(default_factory=list)

    @property
    def name(self) -> str:
        """A short label: the job directory relative to the sweep, or its overrides."""
        if self.path is None:
            return " ".join(self.overrides)
        rel = os.path.relpath(self.path, self.sweep)
        return self.path.name if rel == "." else rel  # a single run is its own sweep

    @property
    def method(self) -> str:
        """The method name, from metrics, else Hydra's group choice."""
        if self.metrics and "method" in self.metrics:
            return str(self.metrics["method"])
        return str(self.choices.get("method") or self._override("method") or "?")

    @property
    def experiment(self) -> str | None:
        """The experiment config the job was composed with, if any."""
        name = self.choices.get("experiment") or self._override("experiment")
        return str(name) if name else None

    def setting(self, key: str) -> Any:
        """A top-level setting (``bits``, ``act_bits``, ``rate``, ``seed``): metrics first."""
        if self.metrics and key in self.metrics:
            return self.metrics[key]
        if key in self.config:
            return self.config[key]
        return _number(self._override(key))

    def _override(self, key: str) -> str | None:
        for item in self.overrides:
            k, _, v = item.partition("=")
            if k.lstrip("+~") == key:
                return v
        return None


def _number(text: str | None) -> int | float | str | None:
    """An override value as a number when it is one (``bits=4`` gives 4)."""
    if text is None:
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def find_job_dirs(sweep: Path) -> list[Path]:
    """List the job directories under ``sweep`` (the sweep itself for a single run).

    Parameters
    ----------
    sweep : Path
        A sweep directory (``multirun_outputs/<sweep_id>``) or a single run's directory.

    Returns
    -------
    list[Path]
        Directories containing ``.hydra/config.yaml``, sorted naturally (2 before 10).
    """
    found: list[Path] = []
    for root, dirs, _files in os.walk(sweep):
        here = Path(root)
        if (here / ".hydra" / "config.yaml").is_file():
            found.append(here)
            dirs.clear()  # a job's own subdirectories are outputs, not jobs
            continue
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.startswith(".")]
    return sorted(found, key=_natural_key)


def _natural_key(path: Path) -> list[Any]:
    parts = []
    for text in path.parts:
        parts.extend(int(t) if t.isdigit() else t for t in _split_digits(text))
    return [(0, p) if isinstance(p, int) else (1, p) for p in parts]


def _split_digits(text: str) -> list[str]:
    return ["".join(g) for _, g in itertools.groupby(text, key=str.isdigit)]


def load_job(path: Path, sweep: Path) -> Job:
    """Read one job directory.

    Parameters
    ----------
    path : Path
        The job's output directory (holds ``.hydra/``).
    sweep : Path
        The sweep it belongs to.

    Returns
    -------
    Job
        With status ``ok`` when a readable ``metrics.json`` exists, else ``failed`` (an error in
        its log, or an unreadable ``metrics.json``) or ``incomplete``.
    """
    hydra_dir = path / ".hydra"
    overrides = _load_list(hydra_dir / "overrides.yaml")
    hydra_cfg = _load_yaml(hydra_dir / "hydra.yaml").get("hydra", {})
    runtime = hydra_cfg.get("runtime", {}) or {}
    choices = {str(k): str(v) for k, v in (runtime.get("choices") or {}).items() if v is not None}
    config_dirs = [
        Path(src["path"])
        for src in runtime.get("config_sources") or []
        if src.get("schema") == "file" and src.get("path")
    ]
    job = Job(sweep=sweep, path=path, status=INCOMPLETE, overrides=overrides, choices=choices,
              config=_load_yaml(hydra_dir / "config.yaml"), config_dirs=config_dirs)
    metrics_file = path / "metrics.json"
    if metrics_file.is_file():
        try:
            job.metrics = json.loads(metrics_file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            # metrics.json is written atomically, so this means outside damage: report it.
            job.status, job.error = FAILED, f"unreadable metrics.json: {err}"
            return job
        job.status = OK
        if isinstance(job.metrics.get("config"), dict):
            job.config = job.metrics["config"]
        return job
    job.error = _last_error_line(path)
    if job.error:
        job.status = FAILED
    return job


def _load_yaml(path: Path) -> dict[str, Any]:
    """Load a YAML file as plain data without resolving interpolations (``${hydra:...}``
    cannot be resolved outside a Hydra run)."""
    if not path.is_file():
        return {}
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    return data if isinstance(data, dict) else {}


def _load_list(path: Path) -> list[str]:
    if not path.is_file():
        return []
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    return [str(x) for x in data] if isinstance(data, list) else []


def _last_error_line(path: Path) -> str | None:
    """The last line mentioning an error or exception in the job's ``*.log`` files."""
    last = None
    for log in sorted(path.glob("*.log")):
        try:
            lines = log.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            # Logging's ERROR level and Python exception lines; not lowercase "error", which
            # solvers use for approximation errors in progress lines.
            if any(mark in line for mark in ("ERROR", "Error:", "Exception", "Traceback")):
                last = line.strip()
    return last


def expected_overrides(sweep: Path) -> list[list[str]] | None:
    """The override lists of every job a basic-sweeper multirun launches.

    Rebuilt from ``multirun.yaml`` the way Hydra's basic sweeper does it: the sweeper's
    ``params`` first, then the command-line task overrides, expanded as a cartesian product.

    Parameters
    ----------
    sweep : Path
        The sweep directory.

    Returns
    -------
    list[list[str]] | None
        One override list per job, or None when the sweep has no ``multirun.yaml`` or used
        another sweeper (its jobs cannot be predicted).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hydra_cfg = _load_yaml(sweep / "multirun.yaml").get("hydra")
    if not hydra_cfg:
        return None
    choices = (hydra_cfg.get("runtime") or {}).get("choices") or {}
    if choices.get("hydra/sweeper", "basic") != "basic":
        return None
    params = (hydra_cfg.get("sweeper") or {}).get("params") or {}
    task = ((hydra_cfg.get("overrides") or {}).get("task")) or []
    args = [f"{k}={v}" for k, v in params.items()] + [str(t) for t in task]
    axes: dict[str, list[str]] = {}
    for override in OverridesParser.create().parse_overrides(args):
        key = override.get_key_element()
        if override.is_sweep_override():
            if not override.is_discrete_sweep():
                return None  # ranges of floats etc.: not predictable here
            axes[key] = [f"{key}={v}" for v in override.sweep_string_iterator()]
        else:
            axes[key] = [f"{key}={override.get_value_element_as_str()}"]
    return [list(combo) for combo in itertools.product(*axes.values())]


def collect_sweep(sweep: Path) -> list[Job]:
    """Every job of one sweep: those on disk, plus those the sweep should have started.

    Parameters
    ----------
    sweep : Path
        A sweep directory or a single run's directory.

    Returns
    -------
    list[Job]
        Jobs found on disk, in directory order, then ``not started`` jobs.
    """
    sweep = Path(sweep)
    jobs = [load_job(d, sweep) for d in find_job_dirs(sweep)]
    expected = expected_overrides(sweep)
    if expected:
        seen = {frozenset(j.overrides) for j in jobs}
        template = jobs[0] if jobs else None
        for overrides in expected:
            if frozenset(overrides) not in seen:
                jobs.append(Job(sweep=sweep, path=None, status=NOT_STARTED, overrides=overrides,
                                config_dirs=template.config_dirs if template else []))
    return jobs


def collect(sweeps: list[Path]) -> list[Job]:
    """Concatenate :func:`collect_sweep` over several sweep directories.

    Parameters
    ----------
    sweeps : list[Path]
        Sweep directories.

    Returns
    -------
    list[Job]
        All their jobs.
    """
    return [job for sweep in sweeps for job in collect_sweep(Path(sweep))]


def latest_sweeps(root: Path, count: int = 1) -> list[Path]:
    """The ``count`` most recently written sweep directories directly under ``root``.

    Parameters
    ----------
    root : Path
        Usually ``multirun_outputs/``.
    count : int
        How many to return.

    Returns
    -------
    list[Path]
        Newest first; only directories that contain at least one job.
    """
    candidates = [p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith(".")]
    sweeps = [p for p in candidates if find_job_dirs(p)]
    return sorted(sweeps, key=_last_write, reverse=True)[:count]


def _last_write(sweep: Path) -> float:
    """The newest modification time of the sweep directory, its ``multirun.yaml`` and its job
    directories (a resumed sweep counts as recent)."""
    paths = [sweep, sweep / "multirun.yaml", *find_job_dirs(sweep)]
    return max(p.stat().st_mtime for p in paths if p.exists())
