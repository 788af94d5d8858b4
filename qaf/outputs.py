"""A run's output folder: results that cannot be lost, states that cannot be confused.

One job folder holds, besides Hydra's ``.hydra/`` and the logs:

- ``running.json`` while the job runs (pid, host, start, config hash): left behind by a killed job;
- ``metrics.json`` when it finished, written last and atomically, strict JSON, checked against
  :class:`qaf.results.Metrics` on every read; ``predictions.npz`` beside it (per-image correctness);
- ``failed.json`` when it raised (error type, message, stage, config hash), written atomically;
- the experiment logger's run (``wandb/``, ``csv/``) of the attempt that wrote the results: a job
  that runs again moves those of earlier attempts into ``.replaced/<time>/``.

A folder that holds the results of a *different* config is never overwritten silently: the run
stops with a config error naming ``sweep_id``, or with ``overwrite=true`` moves the old results
into ``.replaced/<time>/`` first.
"""

from __future__ import annotations

import json
import math
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from qaf.cache import clean_stale_temps
from qaf.config import ConfigError
from qaf.results import Metrics, from_json

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.npz"
FAILED_FILE = "failed.json"
RUNNING_FILE = "running.json"
#: The job's log (Hydra's file handler, ``conf/hydra/default.yaml``).
LOG_FILE = "run.log"
RESULT_FILES = (METRICS_FILE, PREDICTIONS_FILE, FAILED_FILE)
#: Experiment loggers' folders (``logger=wandb``, ``logger=csv``): one run per attempt of the job.
LOGGER_DIRS = ("wandb", "csv")


def strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (NaN/Infinity are not JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write strict JSON so that readers see either nothing or the whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(strict_json(payload), indent=2, allow_nan=False, default=str)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> tuple[Any, str | None]:
    """``(payload, problem)``: the parsed file, or None and why it could not be read."""
    try:
        return json.loads(path.read_text()), None
    except FileNotFoundError:
        return None, "missing"
    except (OSError, ValueError) as err:
        return None, f"unreadable ({err})"


def read_metrics(folder: Path) -> tuple[Metrics | None, str | None]:
    """``(metrics, problem)`` of a job folder: valid metrics and None, or None and why not
    (:func:`qaf.results.from_json` checks every field)."""
    payload, problem = read_json(folder / METRICS_FILE)
    return (None, problem) if problem is not None else from_json(payload)


def prepare(folder: Path, config_hash: str, resume: bool, overwrite: bool, sweep_id: str) -> Metrics | None:
    """Make ``folder`` ready for a run of ``config_hash``; return finished metrics to reuse.

    Parameters
    ----------
    folder : Path
        The job's output folder.
    config_hash : str
        Hash of the job's result-determining config.
    resume : bool
        Return the metrics of a finished run of the same config instead of running again.
    overwrite : bool
        Move the results of another config aside instead of refusing.
    sweep_id : str
        Named in the error.

    Returns
    -------
    Metrics or None
        The finished metrics when the run can be skipped.

    Raises
    ------
    ConfigError
        When the folder holds results of another config and ``overwrite`` is false.
    """
    clean_stale_temps(folder, ".*.tmp")
    metrics, problem = read_metrics(folder)
    if metrics is not None and metrics.config_hash == config_hash:
        if resume:
            return metrics
    elif metrics is not None and not overwrite:
        raise ConfigError(
            f"sweep_id={sweep_id}: {folder} already holds the results of another config "
            f"(config_hash {metrics.config_hash}, this run {config_hash}); accepted: another sweep_id, "
            "or overwrite=true to move the old results into .replaced/")
    # The run replaces the old results (of this config with resume=false, of another with
    # overwrite=true, or a damaged metrics.json, kept for inspection) and the logger runs of every
    # earlier attempt, also a killed one (a requeued cluster job): the folder keeps one run.
    move_aside(folder, (RESULT_FILES if problem != "missing" else ()) + LOGGER_DIRS)
    return None


def move_aside(folder: Path, names: tuple[str, ...]) -> Path | None:
    """Move the files or folders ``names`` of ``folder`` into ``folder/.replaced/<time>/``; return
    that folder (None when none was there)."""
    present = [folder / name for name in names if (folder / name).exists()]
    if not present:
        return None
    target = folder / ".replaced" / time.strftime("%Y%m%d-%H%M%S")
    target = Path(f"{target}-{os.getpid()}")
    target.mkdir(parents=True, exist_ok=True)
    for path in present:
        os.replace(path, target / path.name)
    return target


class RunMarker:
    """``running.json`` for the lifetime of a run (a killed run leaves it behind).

    Parameters
    ----------
    folder : Path
        The job's output folder.
    config_hash : str
        Recorded in the marker.
    """

    def __init__(self, folder: Path, config_hash: str):
        self.path = folder / RUNNING_FILE
        write_json_atomic(self.path, {"pid": os.getpid(), "host": socket.gethostname(),
                                      "started": time.time(), "config_hash": config_hash})

    def close(self) -> None:
        """Remove the marker (the run finished or failed and said so)."""
        self.path.unlink(missing_ok=True)


def is_alive(marker: dict) -> bool:
    """Whether the process that wrote a ``running.json`` still runs (only knowable on its host)."""
    if marker.get("host") != socket.gethostname():
        return True  # another machine: assume running (a cluster job)
    try:
        os.kill(int(marker["pid"]), 0)
    except (OSError, KeyError, TypeError, ValueError):
        return False
    return True


def record_failure(folder: Path, error: BaseException, stage: str, config_hash: str) -> None:
    """Write ``failed.json`` (atomically) for an exception raised during ``stage``."""
    write_json_atomic(folder / FAILED_FILE, {
        "error_type": type(error).__name__, "message": str(error).strip().splitlines()[0] if str(error).strip() else "",
        "stage": stage, "config_hash": config_hash, "time": time.time()})
