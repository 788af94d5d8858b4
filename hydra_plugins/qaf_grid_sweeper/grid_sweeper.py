"""A Hydra sweeper that runs a union of cartesian grids in one multirun (``hydra/sweeper=grid``).

Configured like the basic sweeper, plus ``grid``, a list of items::

    hydra:
      sweeper:
        params:                  # optional: axes common to every item
          act_bits: 8
        grid:
          - {method: ptq, bits: "2,3,4,8", method.per_channel: "false,true"}
          - {method: admm_epc, bits: "3,4,6", rate: "1.5,2,3"}

Each item is expanded as a cartesian product (``params``, then the item, then the command line,
a later key replacing an earlier axis), and the jobs are the union of those products, exact
duplicates removed (see :func:`hydra_plugins.qaf_grid_sweeper.expand.expand_grid`). Without
``grid`` it is the basic sweeper. Batching (``max_batch_size``), job numbering, ``multirun.yaml``
and ``override_dirname`` are the basic sweeper's.
"""

# No ``from __future__ import annotations``: Hydra's plugin scanner runs this module before it
# is in sys.modules, where dataclasses cannot resolve string annotations.
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra._internal.core_plugins import basic_sweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn
from omegaconf import DictConfig, ListConfig, OmegaConf

from hydra_plugins.qaf_grid_sweeper.expand import expand_grid

log = logging.getLogger(__name__)


@dataclass
class GridSweeperConf:
    """``hydra/sweeper=grid``: the basic sweeper's fields plus ``grid``."""

    _target_: str = "hydra_plugins.qaf_grid_sweeper.grid_sweeper.GridSweeper"
    max_batch_size: Optional[int] = None
    # Any, not str: a YAML ``false`` stays a bool and is written back as ``false``.
    params: Optional[Dict[str, Any]] = None
    grid: Optional[List[Any]] = None


ConfigStore.instance().store(group="hydra/sweeper", name="grid", node=GridSweeperConf,
                             provider="qaf")


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


class GridSweeper(basic_sweeper.BasicSweeper):
    """The basic sweeper, launching the union of ``grid``'s cartesian products."""

    def __init__(self, max_batch_size: Optional[int] = None,
                 params: Optional[Dict[str, Any]] = None,
                 grid: Optional[List[Dict[str, Any]]] = None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=_plain(params) or {})
        self.grid: List[Dict[str, Any]] = _plain(grid) or []

    def sweep(self, arguments: List[str]) -> Any:
        assert self.config is not None
        assert self.launcher is not None
        assert self.hydra_context is not None

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        jobs = expand_grid(self.grid, self.params, arguments, parser=parser)
        log.info("Grid sweeper: %d grid item(s), %d job(s)", max(len(self.grid), 1), len(jobs))
        assert self.max_batch_size is None or self.max_batch_size > 0
        self.overrides = list(self.split_overrides_to_chunks(jobs, self.max_batch_size))
        returns: List[Sequence[JobReturn]] = []

        # As the basic sweeper: the sweep's config beside its jobs, then batches in order.
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

        initial_job_idx = 0
        while not self.is_done():
            batch = self.get_job_batch()
            tic = time.perf_counter()
            self.validate_batch_is_legal(batch)
            log.debug("Validated configs of %d jobs in %.2f seconds", len(batch),
                      time.perf_counter() - tic)
            results = self.launcher.launch(batch, initial_job_idx=initial_job_idx)
            for r in results:
                _ = r.return_value  # raises if the job failed, as the basic sweeper does
            initial_job_idx += len(batch)
            returns.append(results)
        return returns
