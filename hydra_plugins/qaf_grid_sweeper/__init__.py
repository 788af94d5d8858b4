"""qaf's Hydra sweeper for a union of cartesian grids (``hydra/sweeper=grid``).

See :mod:`hydra_plugins.qaf_grid_sweeper.expand` for the job-list rules and
:mod:`hydra_plugins.qaf_grid_sweeper.grid_sweeper` for the plugin.
"""

from hydra_plugins.qaf_grid_sweeper.expand import expand_grid

__all__ = ["expand_grid"]
