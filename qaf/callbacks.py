"""Hydra callbacks (registered in ``conf/hydra/default.yaml``).

:class:`SweepSummary` ends every multirun with its report: when the launch starts it records which
jobs it launches (``<sweep>/.qaf/launches/<time>-<pid>.json``, so later reports account for every
launch into a folder); when it ends it writes the sweep report into the sweep folder, prints the
table, and makes the sweep's exit status non-zero when a job of this launch has no results (the
pipeline lets a sweep go on past a failed job, see ``run.py``). A reporting problem never stops a
sweep: it is printed as one line.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

PREFIX = "qaf sweep summary"


class SweepSummary(Callback):
    """Record a multirun's launch, then report the sweep and fail it when this launch's jobs did.

    Parameters
    ----------
    report : bool
        Write and print the sweep report at the end (the launch check runs regardless).
    """

    def __init__(self, report: bool = True) -> None:
        self.report = report
        self.launch: Any = None  # qaf.report.collect.Launch of this process's multirun
        self.sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Write this launch's expected jobs into ``<sweep dir>/.qaf/launches/``."""
        try:
            from qaf.report.collect import launch_from_hydra, record_launch

            self.sweep_dir = Path(str(config.hydra.sweep.dir))
            self.launch = launch_from_hydra(_hydra_node(config), argv=sys.argv)
            record_launch(self.sweep_dir, self.launch)
        except Exception as err:  # noqa: BLE001 - never stop a sweep for its bookkeeping
            if self.sweep_dir is not None and not self.sweep_dir.is_dir():
                return  # no sweep folder: the sweeper stops on it next, with one line (qaf.cli)
            _say(f"cannot record the launch ({type(err).__name__}: {err})")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Write and print the report; ``sys.exit(1)`` when a job of this launch has no results."""
        sweep_dir = self.sweep_dir or Path(str(config.hydra.sweep.dir))
        if self.report:
            self._write_report(sweep_dir)
        problems = self._problems(sweep_dir)
        if problems:
            print(f"{PREFIX}: {len(problems)} job(s) of this launch have no results:", file=sys.stderr)
            for line in problems:
                print(f"  {line}", file=sys.stderr)
            sys.exit(1)

    def _write_report(self, sweep_dir: Path) -> None:
        try:
            from qaf.report import build_report
            from qaf.report.__main__ import print_report

            print_report(build_report([sweep_dir], sweep_dir), warnings=False)  # listed in the table
        except Exception as err:  # noqa: BLE001 - a reporting problem must not fail the sweep
            _say(f"cannot write the report of {sweep_dir} ({type(err).__name__}: {err})")

    def _problems(self, sweep_dir: Path) -> list[str]:
        """``problem_line`` of every job of this launch that has no results."""
        if self.launch is None:
            return []
        try:
            from qaf.report.collect import OK, collect_sweep
            from qaf.report.tables import problem_line

            return [problem_line(job) for job in collect_sweep(sweep_dir)
                    if job.status != OK and self.launch.owns(job)]
        except Exception as err:  # noqa: BLE001
            _say(f"cannot check the jobs of {sweep_dir} ({type(err).__name__}: {err})")
            return []


def _hydra_node(config: DictConfig) -> dict[str, Any]:
    """The parts of ``config.hydra`` the job prediction reads, as plain unresolved data (as
    ``multirun.yaml`` holds them)."""
    node: dict[str, Any] = {}
    for key in ("sweeper", "overrides", "runtime", "job"):
        value = OmegaConf.select(config, f"hydra.{key}")
        if value is not None:
            node[key] = OmegaConf.to_container(value, resolve=False)
    return node


def _say(message: str) -> None:
    print(f"{PREFIX}: {message}", file=sys.stderr)
