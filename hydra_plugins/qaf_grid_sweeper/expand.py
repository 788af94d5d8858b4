"""The job list of a grid sweep: a union of cartesian products, as a pure function.

Used by the sweeper (:mod:`hydra_plugins.qaf_grid_sweeper.grid_sweeper`) to launch jobs and by
``qaf.report.collect`` to predict them from a sweep's ``multirun.yaml``. Needs Hydra's override
parser only, no running Hydra application.

Rules, for ``grid`` = ``[item_1, ..., item_n]``, common axes ``params`` and command-line task
overrides ``overrides``:

* each item is a mapping ``key: "v1,v2,..."`` in Hydra override syntax (the same as the basic
  sweeper's ``params``: group choices such as ``method: ptq``, keys such as
  ``method.per_channel: false,true``, ``range(...)``, ``+key``, ``key@pkg``);
* item ``i`` expands like the basic sweeper does ``params`` then the command line, with the
  item's axes between them: ``params``, then the item, then ``overrides``. A later occurrence
  of a key replaces the earlier axis in place, so an item axis replaces the same ``params`` axis
  and a command-line axis replaces that axis in every item (a command-line key absent from an
  item is added to it, as the basic sweeper adds it to every job);
* the jobs are the items' products concatenated in item order, with exact duplicates (the same
  set of overrides) removed: the first occurrence wins, order is kept;
* an empty or missing ``grid`` is one empty item: the basic sweeper's job list.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["expand_grid", "format_value", "item_arguments"]


def format_value(value: Any) -> str:
    """One axis value of a grid item or ``params`` as Hydra override text.

    Strings are used as written (``"4,8"`` is a sweep over 4 and 8); YAML scalars are written
    the way the override grammar reads them back (``False`` as ``false``, ``None`` as ``null``).

    Raises
    ------
    TypeError
        For a list or mapping: a sweep is written as a comma separated string, ``"4,8"``.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    raise TypeError(
        f"grid value {value!r} is a {type(value).__name__}: write a sweep as a comma separated "
        f"string in Hydra override syntax, e.g. \"4,8\" (a list value as \"'[1,2]'\")")


def item_arguments(item: Mapping[str, Any] | None) -> list[str]:
    """A grid item (or ``params``) as override strings ``key=value``, in its key order."""
    if not item:
        return []
    if not isinstance(item, Mapping):
        raise TypeError(f"grid item {item!r} is not a mapping of key: values")
    args = []
    for key, value in item.items():
        key = str(key)
        if key.startswith("~") and value is None:
            args.append(key)  # a plain deletion: ``~key``
        else:
            args.append(f"{key}={format_value(value)}")
    return args


def _product(arguments: Sequence[str], parser: Any) -> list[list[str]]:
    """The basic sweeper's cartesian product of ``arguments`` (later keys replace earlier ones
    in place), without batching."""
    from hydra.errors import HydraException

    axes: OrderedDict[str, list[str]] = OrderedDict()
    for override in parser.parse_overrides(list(arguments)):
        key = override.get_key_element()
        if override.is_sweep_override():
            if not override.is_discrete_sweep():
                raise HydraException(
                    f"grid sweeper does not support sweep type : {override.value_type.name} "
                    f"({override.input_line})")
            axes[key] = [f"{key}={v}" for v in override.sweep_string_iterator()]
        else:
            axes[key] = [f"{key}={override.get_value_element_as_str()}"]
    return [list(combo) for combo in itertools.product(*axes.values())]


def expand_grid(
    grid: Iterable[Mapping[str, Any]] | None,
    params: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    parser: Any = None,
) -> list[list[str]]:
    """Every job of a grid sweep, as override lists, in launch order.

    Parameters
    ----------
    grid : iterable of mappings, or None
        The grid items (``hydra.sweeper.grid``), each ``key: "comma,separated,values"``.
    params : mapping, optional
        Axes common to every item (``hydra.sweeper.params``).
    overrides : sequence of str
        The command-line task overrides (``hydra.overrides.task``); each replaces its axis in
        every item.
    parser : OverridesParser, optional
        Hydra's override parser; the sweeper passes one bound to its config loader (needed for
        ``glob(...)`` over a config group). Default: a parser without a config loader.

    Returns
    -------
    list[list[str]]
        One override list per job; jobs with the same set of overrides appear once (first
        occurrence).

    Raises
    ------
    hydra.errors.HydraException
        For a sweep that is not discrete (``interval(...)``), or bad override syntax.
    TypeError
        For an item that is not a mapping, or a value that is a list or mapping.

    Examples
    --------
    >>> expand_grid([{"method": "fp32"}, {"method": "ptq", "bits": "4,8"}], overrides=["seed=1"])
    [['method=fp32', 'seed=1'], ['method=ptq', 'bits=4', 'seed=1'], ['method=ptq', 'bits=8', 'seed=1']]
    """
    if parser is None:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parser = OverridesParser.create()
    items = list(grid) if grid else []
    if not items:
        items = [{}]
    common = item_arguments(params)
    cli = [str(o) for o in overrides]
    jobs: list[list[str]] = []
    seen: set[frozenset[str]] = set()
    for item in items:
        for job in _product([*common, *item_arguments(item), *cli], parser):
            ident = frozenset(job)
            if ident not in seen:
                seen.add(ident)
                jobs.append(job)
    return jobs
