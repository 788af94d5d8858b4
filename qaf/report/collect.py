"""Read a sweep's jobs from disk, each with a status taken from the files it left (never its log).

A job is any directory holding ``.hydra/config.yaml``; a single run is a sweep directory that is
itself a job, and a sweep root that is a job does not hide the jobs below it. What a job folder
holds (:mod:`qaf.outputs`) gives its status:

========== ==========================================================================
status     files
========== ==========================================================================
ok         a ``metrics.json`` that :func:`qaf.results.from_json` accepts
running    ``running.json`` of a process that still runs
failed     ``failed.json`` (error type, message, stage)
invalid    ``metrics.json`` present but not valid (``[]``, ``null``, truncated, fields missing)
killed     ``running.json`` left by a process that is gone, no metrics
incomplete none of these (the job was set up and stopped before the pipeline started)
not started expected by a launch of the sweep, no folder
========== ==========================================================================

The expected jobs are the union of what ``multirun.yaml`` predicts (the latest launch) and of every
launch recorded in ``<sweep>/.qaf/launches/*.json`` (written by :class:`qaf.callbacks.SweepSummary`),
so several launches into one sweep folder are all accounted for. Damaged files never stop a report:
they become a status or are ignored.
"""

from __future__ import annotations

import itertools
import os
import shlex
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from omegaconf import OmegaConf

from qaf import outputs
from qaf.results import Metrics

OK = "ok"
RUNNING = "running"
FAILED = "failed"
INVALID = "invalid"
KILLED = "killed"
INCOMPLETE = "incomplete"
NOT_STARTED = "not started"
#: Every status, in the order a reader cares about them.
STATUSES = (OK, RUNNING, FAILED, INVALID, KILLED, INCOMPLETE, NOT_STARTED)

# Directories inside a sweep that never hold jobs: Hydra's own, submitit's logs, W&B and
# Lightning outputs, results moved aside, qaf's launch records (hidden directories too).
_SKIP_DIRS = {".hydra", ".submitit", "wandb", "csv", "lightning_logs", ".replaced", ".qaf",
              "__pycache__"}
#: Launch records, relative to the sweep directory.
LAUNCHES_DIR = Path(".qaf") / "launches"


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
        One of :data:`STATUSES`.
    overrides : list[str]
        The job's Hydra overrides (its coordinates in the sweep).
    choices : dict[str, str]
        Hydra's config-group choices (``method``, ``model``, ``data``, ``experiment``, ...).
    config : dict
        The job's config (the result config from ``metrics.json`` when present).
    metrics : Metrics | None
        The validated ``metrics.json``; None unless status is ``ok``.
    error : str | None
        Why a job has no results: the error of ``failed.json``, the problem of an invalid
        ``metrics.json``, the process a ``running.json`` names.
    stage : str | None
        The pipeline stage a failed job was in.
    config_dirs : list[Path]
        Hydra's file config sources (used to find an experiment's paper numbers).
    """

    sweep: Path
    path: Path | None
    status: str
    overrides: list[str] = field(default_factory=list)
    choices: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    metrics: Metrics | None = None
    error: str | None = None
    stage: str | None = None
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
        if self.metrics is not None:
            return self.metrics.method
        return str(self.choices.get("method") or self._override("method") or "?")

    @property
    def experiment(self) -> str | None:
        """The experiment config the job was composed with, if any."""
        name = self.choices.get("experiment") or self._override("experiment")
        return str(name) if name else None

    def setting(self, key: str) -> Any:
        """A top-level setting (``bits``, ``act_bits``, ``rate``, ``seed``): metrics first."""
        if getattr(self.metrics, key, None) is not None:
            return getattr(self.metrics, key)
        if key in self.config:
            return self.config[key]
        return _number(self._override(key))

    def _override(self, key: str) -> str | None:
        for item in self.overrides:
            k, _, v = item.partition("=")
            if override_key(k) == key:
                return v
        return None


def override_key(text: str) -> str:
    """The config key an override sets, as Hydra's ``override_dirname`` sees it (``+a@p=1`` -> ``a``)."""
    return text.partition("=")[0].lstrip("+~").partition("@")[0]


def identity(overrides: Iterable[str], exclude: Iterable[str] = ()) -> frozenset[str]:
    """What makes a job the same job: its overrides without those its folder name leaves out.

    Parameters
    ----------
    overrides : Iterable[str]
        The job's override strings.
    exclude : Iterable[str]
        Keys left out of job folder names (``hydra.job.config.override_dirname.exclude_keys``):
        two launches that differ only in them (``progress``, ``cache.dir``) run the same folder.

    Returns
    -------
    frozenset[str]
        The remaining overrides.
    """
    skip = set(exclude)
    return frozenset(o for o in overrides if override_key(o) not in skip)


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
    """List the job directories under ``sweep``, the sweep itself included when it is a job.

    Parameters
    ----------
    sweep : Path
        A sweep directory (``multirun_outputs/<sweep_id>``) or a single run's directory.

    Returns
    -------
    list[Path]
        Directories containing ``.hydra/config.yaml``, sorted naturally (2 before 10). The
        search goes on below a job (a single run written into a sweep root must not hide the
        sweep's jobs) and skips Hydra, submitit, logger and replaced-results directories.
    """
    found: list[Path] = []
    for root, dirs, _files in os.walk(sweep):
        here = Path(root)
        if (here / ".hydra" / "config.yaml").is_file():
            found.append(here)
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.startswith(".")]
    return sorted(found, key=_natural_key)


def _natural_key(path: Path) -> list[Any]:
    parts = []
    for text in path.parts:
        parts.extend(int(t) if t.isdigit() else t for t in _split_digits(text))
    return [(0, p) if isinstance(p, int) else (1, p) for p in parts]


def _split_digits(text: str) -> list[str]:
    return ["".join(g) for _, g in itertools.groupby(text, key=str.isdigit)]


@dataclass(frozen=True)
class State:
    """What a job folder's files say: status, validated metrics, and why there are none."""

    status: str
    metrics: Metrics | None = None
    error: str | None = None
    stage: str | None = None


def job_state(path: Path) -> State:
    """The status of one job folder from its ``running.json``, ``metrics.json`` and ``failed.json``.

    Parameters
    ----------
    path : Path
        A job's output directory.

    Returns
    -------
    State
        ``running`` when a live process holds the folder; else ``ok`` for valid metrics, then
        ``failed``, ``invalid``, ``killed`` and ``incomplete`` in that order (``killed`` before
        ``failed`` when the dead process started after the recorded failure).
    """
    marker, marker_problem = outputs.read_json(path / outputs.RUNNING_FILE)
    if isinstance(marker, dict) and outputs.is_alive(marker):
        return State(RUNNING, error=f"running: {_marker_text(marker)}")
    metrics, problem = outputs.read_metrics(path)
    failure, failure_problem = outputs.read_json(path / outputs.FAILED_FILE)
    if metrics is not None and not _failed_after(failure, path / outputs.METRICS_FILE):
        return State(OK, metrics=metrics)
    if failure_problem != "missing" and not _restarted_after(marker, failure):
        return _failed_state(failure, failure_problem)
    if problem != "missing":
        return State(INVALID, error=f"{outputs.METRICS_FILE} {problem}")
    if marker_problem != "missing":
        if not isinstance(marker, dict):
            return State(KILLED, error=f"{outputs.RUNNING_FILE} {marker_problem or 'is not an object'}")
        return State(KILLED, error=f"killed: {_marker_text(marker)} is gone, no {outputs.METRICS_FILE}")
    return State(INCOMPLETE, error=f"no {outputs.METRICS_FILE}, {outputs.FAILED_FILE} or {outputs.RUNNING_FILE}")


def _failed_after(failure: Any, metrics_file: Path) -> bool:
    """Whether ``failed.json`` records a later attempt than the folder's metrics (e.g. a launch of
    another config refused to overwrite them): the job's latest state is that failure."""
    failed = failure.get("time") if isinstance(failure, dict) else None
    return isinstance(failed, (int, float)) and not isinstance(failed, bool) and failed > mtime(metrics_file)


def _restarted_after(marker: Any, failure: Any) -> bool:
    """Whether a (dead) ``running.json`` is newer than ``failed.json``: the job failed, ran again
    and was killed (the old failure is not its latest state)."""
    started = marker.get("started") if isinstance(marker, dict) else None
    failed = failure.get("time") if isinstance(failure, dict) else None
    numbers = all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in (started, failed))
    return numbers and started > failed  # type: ignore[operator]


def _failed_state(failure: Any, problem: str | None) -> State:
    """``failed`` with the error ``failed.json`` records (or why it cannot be read)."""
    if not isinstance(failure, dict):
        detail = problem or f"holds a {type(failure).__name__}, not an object"
        return State(FAILED, error=f"{outputs.FAILED_FILE} {detail}")
    kind, message = failure.get("error_type"), failure.get("message")
    error = ": ".join(str(part) for part in (kind, message) if part) or "no error message recorded"
    stage = failure.get("stage")
    return State(FAILED, error=error, stage=str(stage) if stage else None)


def _marker_text(marker: Mapping[str, Any]) -> str:
    """``process 123 on host (started 2024-01-01 12:00:00)``."""
    started = marker.get("started")
    when = (time.strftime(" (started %Y-%m-%d %H:%M:%S)", time.localtime(started))
            if isinstance(started, (int, float)) and not isinstance(started, bool) else "")
    return f"process {marker.get('pid', '?')} on {marker.get('host', '?')}{when}"


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
        With the status of :func:`job_state`.
    """
    hydra_dir = path / ".hydra"
    hydra_cfg = _as_dict(_load_yaml(hydra_dir / "hydra.yaml").get("hydra"))
    runtime = _as_dict(hydra_cfg.get("runtime"))
    choices = {str(k): str(v) for k, v in _as_dict(runtime.get("choices")).items() if v is not None}
    config_dirs = [Path(src["path"]) for src in _as_list(runtime.get("config_sources"))
                   if isinstance(src, dict) and src.get("schema") == "file" and src.get("path")]
    state = job_state(path)
    config = state.metrics.config if state.metrics is not None else _load_yaml(hydra_dir / "config.yaml")
    return Job(sweep=sweep, path=path, status=state.status, overrides=_load_list(hydra_dir / "overrides.yaml"),
               choices=choices, config=config, metrics=state.metrics, error=state.error, stage=state.stage,
               config_dirs=config_dirs)


def _load_yaml(path: Path) -> dict[str, Any]:
    """A YAML file as a plain dict, interpolations unresolved (``${hydra:...}`` cannot be
    resolved outside a Hydra run); {} when it is missing, damaged or not a mapping."""
    return _as_dict(_load_plain(path))


def _load_list(path: Path) -> list[str]:
    """A YAML list of strings; [] when missing, damaged or not a list."""
    return [str(x) for x in _as_list(_load_plain(path))]


def _load_plain(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # noqa: BLE001 - truncated or foreign YAML: the job is shown without it
        return None


def _as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


# ------------------------------------------------------------------------------ expected jobs

def expected_from_hydra(hydra_cfg: Mapping[str, Any]) -> list[list[str]] | None:
    """The override lists of every job a multirun launches, basic or grid sweeper.

    The one prediction used by the report (from ``multirun.yaml``) and by
    :class:`qaf.callbacks.SweepSummary` (from the live config). Basic sweeper: its ``params``
    first, then the command-line task overrides, expanded as a cartesian product. Grid sweeper
    (``hydra/sweeper=grid``): the union of the products of its ``grid`` items, by the sweeper's
    own :func:`hydra_plugins.qaf_grid_sweeper.expand.expand_grid`.

    Parameters
    ----------
    hydra_cfg : Mapping
        The ``hydra`` node as plain data, unresolved (``sweeper``, ``overrides.task``,
        ``runtime.choices`` are read).

    Returns
    -------
    list[list[str]] | None
        One override list per job, or None when the jobs cannot be predicted (another sweeper,
        a continuous sweep, damaged input).
    """
    if not hydra_cfg:
        return None
    try:
        return _expand(hydra_cfg)
    except Exception:  # noqa: BLE001 - interval sweeps, glob over groups, bad items or types
        return None


def _expand(hydra_cfg: Mapping[str, Any]) -> list[list[str]] | None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices = _as_dict(_as_dict(hydra_cfg.get("runtime")).get("choices"))
    sweeper = _as_dict(hydra_cfg.get("sweeper"))
    params = sweeper.get("params") or {}
    task = [str(t) for t in _as_list(_as_dict(hydra_cfg.get("overrides")).get("task"))]
    if _is_grid_sweeper(choices.get("hydra/sweeper"), sweeper.get("_target_")):
        expand_grid = _grid_expander()
        return None if expand_grid is None else expand_grid(sweeper.get("grid"), params, task)
    if choices.get("hydra/sweeper", "basic") != "basic":
        return None
    args = [f"{k}={v}" for k, v in params.items()] + task
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


def dirname_excludes(hydra_cfg: Mapping[str, Any]) -> list[str]:
    """``hydra.job.config.override_dirname.exclude_keys`` of a ``hydra`` node ([] if absent)."""
    node = _as_dict(_as_dict(_as_dict(hydra_cfg.get("job")).get("config")).get("override_dirname"))
    return [str(k) for k in _as_list(node.get("exclude_keys"))]


_GRID_SWEEPER = "hydra_plugins.qaf_grid_sweeper.grid_sweeper.GridSweeper"


def _is_grid_sweeper(choice: Any, target: Any) -> bool:
    """Whether a sweep ran qaf's grid sweeper (by group choice, or by ``_target_``)."""
    return choice == "grid" or target == _GRID_SWEEPER


def _grid_expander() -> Any:
    """The grid sweeper's ``expand_grid``: imported from the ``hydra_plugins`` namespace, else
    loaded from this clone of the repository (an editable install that predates the plugin
    does not map ``hydra_plugins``); None when neither is there."""
    try:
        from hydra_plugins.qaf_grid_sweeper.expand import expand_grid
    except ImportError:
        import importlib.util

        repo = Path(__file__).resolve().parents[2]
        path = repo / "hydra_plugins" / "qaf_grid_sweeper" / "expand.py"
        spec = importlib.util.spec_from_file_location("_qaf_grid_sweeper_expand", path)
        if not path.is_file() or spec is None or spec.loader is None:
            return None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        expand_grid = module.expand_grid
    return expand_grid


# ---------------------------------------------------------------------------------- launches

@dataclass(frozen=True)
class Launch:
    """One ``python run.py -m ...`` into a sweep folder, as recorded when it started.

    Attributes
    ----------
    path : Path | None
        Its record file (None before it is written).
    started : float
        Start time (seconds since the epoch).
    expected : list[list[str]] | None
        The override list of each job it launches; None when they could not be predicted.
    exclude_keys : list[str]
        Keys left out of job folder names (see :func:`identity`).
    task : list[str]
        Its command-line task overrides.
    argv : list[str] | None
        The launching process's ``sys.argv`` (None in records written before it was kept).
    """

    path: Path | None
    started: float
    expected: list[list[str]] | None
    exclude_keys: list[str]
    task: list[str]
    argv: list[str] | None = None

    @property
    def command(self) -> str:
        """The command line as typed, or rebuilt from its task overrides when ``argv`` was not kept."""
        return command_line(self.argv) if self.argv else command_line(["run.py", "-m", *self.task])

    def owns(self, job: Job) -> bool:
        """Whether ``job`` is one of this launch's jobs."""
        if self.expected is None:  # unpredictable sweep: the jobs set up since it started
            return job.path is not None and mtime(job.path / ".hydra" / "overrides.yaml") >= self.started
        wanted = {identity(o, self.exclude_keys) for o in self.expected}
        return identity(job.overrides, self.exclude_keys) in wanted


def mtime(path: Path) -> float:
    """A file's modification time (seconds since the epoch); -inf when it cannot be read."""
    try:
        return path.stat().st_mtime
    except OSError:
        return float("-inf")


def launch_from_hydra(hydra_cfg: Mapping[str, Any], started: float | None = None,
                      argv: Sequence[str] | None = None) -> Launch:
    """The :class:`Launch` a ``hydra`` node (plain data, unresolved) describes, started by ``argv``."""
    task = [str(t) for t in _as_list(_as_dict(hydra_cfg.get("overrides")).get("task"))]
    return Launch(None, time.time() if started is None else started, expected_from_hydra(hydra_cfg),
                  dirname_excludes(hydra_cfg), task, None if argv is None else [str(a) for a in argv])


def record_launch(sweep: Path, launch: Launch) -> Path:
    """Write ``<sweep>/.qaf/launches/<time>-<pid>.json`` (atomically, never over another
    launch's record); return its path."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(launch.started))
    stamp += f".{int(launch.started % 1 * 1e6):06d}"
    path = Path(sweep) / LAUNCHES_DIR / f"{stamp}-{os.getpid()}.json"
    for i in itertools.count(1):
        if not path.exists():
            break
        path = path.with_name(f"{stamp}-{os.getpid()}-{i}.json")
    outputs.write_json_atomic(path, {
        "started": launch.started, "pid": os.getpid(), "host": socket.gethostname(),
        "expected": launch.expected, "exclude_keys": launch.exclude_keys, "task": launch.task,
        "argv": launch.argv})
    return path


def read_launches(sweep: Path) -> list[Launch]:
    """Every readable launch record of ``sweep``, oldest first (damaged ones are skipped)."""
    folder = Path(sweep) / LAUNCHES_DIR
    if not folder.is_dir():
        return []
    launches = [_launch_of(path) for path in sorted(folder.glob("*.json"))]
    return sorted((launch for launch in launches if launch is not None), key=lambda launch: launch.started)


def _launch_of(path: Path) -> Launch | None:
    payload, _ = outputs.read_json(path)
    if not isinstance(payload, dict):
        return None
    started = payload.get("started")
    expected = payload.get("expected")
    if not isinstance(started, (int, float)) or isinstance(started, bool):
        return None
    if expected is not None and not (isinstance(expected, list) and all(
            isinstance(job, list) and all(isinstance(o, str) for o in job) for job in expected)):
        return None
    excludes = [str(k) for k in _as_list(payload.get("exclude_keys"))]
    argv = [str(a) for a in _as_list(payload.get("argv"))] or None
    return Launch(path, float(started), expected, excludes, [str(t) for t in _as_list(payload.get("task"))], argv)


def command_line(argv: Sequence[str]) -> str:
    """``python`` and ``argv`` as a shell would take them back (quoted where needed)."""
    return "python " + shlex.join(argv)


@dataclass(frozen=True)
class Command:
    """A command that wrote jobs into a sweep folder.

    Attributes
    ----------
    text : str
        The command line.
    started : float | None
        When it started (seconds since the epoch), if known.
    """

    text: str
    started: float | None


def sweep_commands(sweep: Path) -> list[Command]:
    """The commands that wrote a sweep's jobs, oldest first.

    Every recorded launch (``.qaf/launches/``: its ``sys.argv``, or its task overrides); without
    any, the multirun of ``multirun.yaml`` (``python run.py -m`` and its task overrides); for a
    single run (the sweep folder is the job), ``python run.py`` and its overrides.

    Parameters
    ----------
    sweep : Path
        A sweep directory or a single run's directory.

    Returns
    -------
    list[Command]
        Empty when nothing records how the jobs were started.
    """
    sweep = Path(sweep)
    launches = read_launches(sweep)
    if launches:
        return [Command(launch.command, launch.started) for launch in launches]
    multirun = sweep / "multirun.yaml"
    if multirun.is_file():
        task = _as_list(_as_dict(_as_dict(_load_yaml(multirun).get("hydra")).get("overrides")).get("task"))
        return [Command(command_line(["run.py", "-m", *map(str, task)]), mtime(multirun))]
    if (sweep / ".hydra" / "config.yaml").is_file():
        overrides = sweep / ".hydra" / "overrides.yaml"
        return [Command(command_line(["run.py", *_load_list(overrides)]), mtime(overrides))]
    return []


def _expected_jobs(sweep: Path) -> tuple[list[list[str]], list[str]]:
    """The union of the jobs ``multirun.yaml`` predicts and of every recorded launch, in launch
    order, with the folder-name exclusions that apply when matching them to folders."""
    hydra_cfg = _as_dict(_load_yaml(sweep / "multirun.yaml").get("hydra"))
    launches = read_launches(sweep)
    excludes = sorted({k for launch in launches for k in launch.exclude_keys} | set(dirname_excludes(hydra_cfg)))
    lists = [launch.expected or [] for launch in launches] + [expected_from_hydra(hydra_cfg) or []]
    jobs: list[list[str]] = []
    seen: set[frozenset[str]] = set()
    for overrides in itertools.chain.from_iterable(lists):
        ident = identity(overrides, excludes)
        if ident not in seen:
            seen.add(ident)
            jobs.append(overrides)
    return jobs, excludes


def collect_sweep(sweep: Path) -> list[Job]:
    """Every job of one sweep: those on disk, plus those its launches should have started.

    Parameters
    ----------
    sweep : Path
        A sweep directory or a single run's directory.

    Returns
    -------
    list[Job]
        Jobs found on disk, in directory order, then ``not started`` jobs in launch order.
    """
    sweep = Path(sweep)
    jobs = [load_job(d, sweep) for d in find_job_dirs(sweep)]
    expected, excludes = _expected_jobs(sweep)
    seen = {identity(j.overrides, excludes) for j in jobs}
    template = jobs[0].config_dirs if jobs else []
    for overrides in expected:
        if identity(overrides, excludes) not in seen:
            jobs.append(Job(sweep=sweep, path=None, status=NOT_STARTED, overrides=overrides,
                            error="expected by a launch of the sweep, no job folder", config_dirs=template))
    return jobs


def collect(sweeps: Sequence[Path]) -> list[Job]:
    """Concatenate :func:`collect_sweep` over several sweep directories.

    Parameters
    ----------
    sweeps : Sequence[Path]
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
