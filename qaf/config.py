"""Config checks: every bad value is reported once, by key, before any heavy work starts.

A group declares its keys once, as a dataclass whose fields are :func:`option` s (the accepted
values beside the default), and :func:`check_options` checks them all where the group is built;
:func:`validate` checks the top-level keys of a run config (:class:`RunKeys`) the same way.

Importing this module also registers the OmegaConf resolvers the configs use
(``qaf_uid`` for collision-free sweep ids, ``qaf_jobdir`` for job directory names).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import secrets
import typing
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value, file or checkpoint that cannot be used.

    The message names the config key and what is accepted, e.g.
    ``bits=1 is invalid: accepted 2..16``.
    """


#: The longest file name (bytes) common file systems take (ext4, XFS, APFS, NTFS in UTF-16 units).
NAME_MAX = 255


def job_dirname(override_dirname: str) -> str:
    """A job's folder name: its overrides (Hydra's ``override_dirname``, ``/`` made ``_``).

    A name longer than :data:`NAME_MAX` bytes (a long ``model.checkpoint`` path, many method keys)
    keeps its head and ends with ``~`` and a hash of the whole name: unique, the same on every
    launch (a sweep resumes), and the full overrides stay in the folder's ``.hydra/overrides.yaml``.

    Parameters
    ----------
    override_dirname : str
        ``hydra.job.override_dirname`` (empty for a job with no swept overrides).

    Returns
    -------
    str
        At most :data:`NAME_MAX` bytes of UTF-8.
    """
    name = override_dirname.replace("/", "_") or "default"
    raw = name.encode()
    if len(raw) <= NAME_MAX:
        return name
    tail = "~" + hashlib.sha256(raw).hexdigest()[:16]
    return raw[:NAME_MAX - len(tail)].decode("utf-8", "ignore") + tail


# use_cache=True: one id per process, and Hydra copies the resolver cache into every job's config,
# so all jobs of a sweep (local or launched) agree on the sweep directory.
OmegaConf.register_new_resolver("qaf_uid", lambda: secrets.token_hex(3), use_cache=True, replace=True)
OmegaConf.register_new_resolver("qaf_jobdir", job_dirname, replace=True)

BITS_RANGE = (2, 16)
SEED_MAX = 2**32 - 1  # numpy's (and Lightning's seed_everything's) limit

# Keys that change where, how fast or how verbosely a run happens, never its numbers: a sweep
# resumed with other values for them (another machine, more GPUs, quiet console) skips finished
# jobs. Dotted keys name nested entries.
EXECUTION_KEYS = ("sweep_id", "resume", "overwrite", "progress", "logger", "cache", "hydra", "device",
                  "export", "trainer.devices", "trainer.accelerator", "data.num_workers")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(key: str, value: Any, low: int, high: int | None = None, nullable: bool = False) -> None:
    """Raise ``ConfigError`` unless ``value`` is an integer in ``low..high`` (or None if nullable)."""
    if value is None and nullable:
        return
    accepted = f"an integer in {low}..{high}" if high is not None else f"an integer >= {low}"
    if nullable:
        accepted += " or null"
    if not _is_int(value) or value < low or (high is not None and value > high):
        raise ConfigError(f"{key}={value!r} is invalid: accepted {accepted}")


def check_number(key: str, value: Any, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, nullable: bool = False) -> None:
    """Raise ``ConfigError`` unless ``value`` is a finite number within the bounds."""
    if value is None and nullable:
        return
    if not _in_bounds(value, low, high, low_open):
        raise ConfigError(f"{key}={value!r} is invalid: accepted a finite number{_bounds_text(low, high, low_open)}"
                          + (" or null" if nullable else ""))


def _in_bounds(value: Any, low: float | None, high: float | None, low_open: bool) -> bool:
    ok = _is_number(value) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    return ok and (high is None or value <= high)


def _bounds_text(low: float | None, high: float | None, low_open: bool) -> str:
    """`` > 1 and <= 100`` (empty without bounds)."""
    bounds = [f"{'>' if low_open else '>='} {low:g}"] if low is not None else []
    bounds += [f"<= {high:g}"] if high is not None else []
    return f" {' and '.join(bounds)}" if bounds else ""


def check_bool(key: str, value: Any) -> None:
    """Raise ``ConfigError`` unless ``value`` is true or false."""
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} is invalid: accepted true, false")


def check_choice(key: str, value: Any, choices: tuple[str, ...] | list[str]) -> None:
    """Raise ``ConfigError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is invalid: accepted {', '.join(map(str, choices))}")


def option(default: Any = dataclasses.MISSING, *, choices: Sequence[Any] = (), low: float | str | None = None,
           high: float | str | None = None, low_open: bool = False) -> Any:
    """A dataclass field that declares what it accepts, checked by :func:`check_options`.

    The field's annotation gives the kind: ``bool``, ``int``, ``float``, ``str``, ``list[str]``,
    ``list[float]`` (non-empty, each number within the bounds), optionally ``| None`` (null accepted).

    Parameters
    ----------
    default : Any
        The default (a list is copied per instance); none: the key is required.
    choices : sequence
        The accepted values (any kind).
    low, high : float, str or None
        Bounds of a number, inclusive (``low_open``: ``low`` excluded); a string names another
        field whose value is the bound.
    low_open : bool
        ``low`` itself is rejected.

    Returns
    -------
    dataclasses.Field
    """
    spec = {"choices": tuple(choices), "low": low, "high": high, "low_open": low_open}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"accepts": spec})
    return dataclasses.field(default=default, metadata={"accepts": spec})


def check_options(options: Any, prefix: str = "") -> None:
    """Raise ``ConfigError`` for the first :func:`option` field of ``options`` holding a value it rejects.

    Parameters
    ----------
    options : dataclass instance
        Values to check.
    prefix : str
        The config node they come from (``method``): keys are named ``<prefix>.<field>``.

    Raises
    ------
    ConfigError
        ``<key>=<value> is invalid: accepted ...``.
    """
    hints = typing.get_type_hints(type(options))
    for f in dataclasses.fields(options):
        spec = f.metadata.get("accepts")
        if spec is None:
            continue
        key, value = f"{prefix}.{f.name}" if prefix else f.name, getattr(options, f.name)
        kind, nullable = _kind(hints[f.name])
        low, high = (getattr(options, b) if isinstance(b, str) else b for b in (spec["low"], spec["high"]))
        if spec["choices"]:
            if not (nullable and value is None):
                check_choice(key, value, spec["choices"])
        elif kind is bool:
            check_bool(key, value)
        elif kind is int:
            check_int(key, value, low, high, nullable)
        elif kind is float:
            check_number(key, value, low, high, low_open=spec["low_open"], nullable=nullable)
        elif kind is list:
            _check_list(key, value, typing.get_args(hints[f.name])[0], low, high, spec["low_open"])


def _check_list(key: str, value: Any, item: type, low: float | None, high: float | None, low_open: bool) -> None:
    """A ``list[str]`` (any length) or a non-empty ``list[float]`` of numbers within the bounds."""
    listed = isinstance(value, Sequence) and not isinstance(value, str)
    if item is str and not (listed and all(isinstance(v, str) for v in value)):
        raise ConfigError(f"{key}={value!r} is invalid: accepted a list of strings")
    if item is float and not (listed and value and all(_in_bounds(v, low, high, low_open) for v in value)):
        raise ConfigError(f"{key}={value!r} is invalid: accepted a non-empty list of numbers"
                          f"{_bounds_text(low, high, low_open)}")


def _kind(hint: Any) -> tuple[type, bool]:
    """``(kind, nullable)`` of an annotation: ``int | None`` -> (int, True), ``list[str]`` -> (list, False)."""
    if typing.get_origin(hint) is list:
        return list, False
    args = typing.get_args(hint)
    return next((a for a in args if a is not type(None)), hint), type(None) in args


@dataclasses.dataclass
class RunKeys:
    """The top-level keys of a run config (``conf/config.yaml``) that :func:`validate` checks."""

    bits: int = option(None, low=BITS_RANGE[0], high=BITS_RANGE[1])
    act_bits: int = option(None, low=BITS_RANGE[0], high=BITS_RANGE[1])
    rate: float = option(None, low=1, low_open=True)
    seed: int = option(None, low=0, high=SEED_MAX)
    resume: bool = option(False)
    overwrite: bool = option(False)
    progress: bool = option(False)


def validate(cfg: DictConfig) -> None:
    """Check the top-level keys of a composed run config (:class:`RunKeys`, ``export``,
    ``trainer.devices``, ``device``).

    Each group checks its own keys where it is built (``Method`` and ``Distillation`` with
    :func:`check_options`, the data builders, ``LayerPolicy.from_config``).

    Parameters
    ----------
    cfg : DictConfig
        The composed config of one run.

    Raises
    ------
    ConfigError
        On the first invalid key, naming it and what is accepted.
    """
    check_options(RunKeys(**{f.name: cfg.get(f.name, f.default) for f in dataclasses.fields(RunKeys)}))
    export = cfg.get("export", False)
    if not isinstance(export, (bool, DictConfig)):
        raise ConfigError(f"export={export!r} is invalid: accepted true, false, "
                          "or export.artifact / export.onnx set to true or false")
    for key in ("export.artifact", "export.onnx"):
        check_bool(key, OmegaConf.select(cfg, key, default=False))
    check_devices(cfg.trainer.get("accelerator", "auto"), cfg.trainer.get("devices", 1))
    device = cfg.get("device", "auto")
    if device not in ("auto", "cpu", "cuda") and not str(device).startswith("cuda:"):
        raise ConfigError(f"device={device!r} is invalid: accepted auto, cpu, cuda or cuda:N")
    for group in ("method", "model", "data"):
        node = cfg.get(group)
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ConfigError(f"{group} has no _target_: choose an option of the '{group}' config group")


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_devices(accelerator: Any, devices: Any) -> None:
    """Raise ``ConfigError`` when ``trainer.devices`` asks for more CPU processes than cores.

    On the CPU (``trainer.accelerator=cpu``, or ``auto`` without a GPU) each device is one DDP
    process: more of them than cores only slows every pass down. GPU counts are Lightning's to check.
    """
    import torch

    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    cores = cpu_cores()
    if on_cpu and _is_int(devices) and devices > cores:
        raise ConfigError(f"trainer.devices={devices} is invalid: accepted an integer in 1..{cores} "
                          f"on the CPU, one DDP process per core ({cores} cores here)")


def result_config(cfg: DictConfig) -> dict:
    """The resolved config without :data:`EXECUTION_KEYS` (what determines the result only)."""
    # Drop first, resolve after: execution keys may hold interpolations (``${hydra:...}``) that
    # only resolve inside a Hydra run.
    raw = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(raw, dict)
    for key in EXECUTION_KEYS:
        *parents, leaf = key.split(".")
        node: Any = raw
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    resolved = OmegaConf.to_container(OmegaConf.create(raw), resolve=True)
    assert isinstance(resolved, dict)
    return resolved


def config_hash(cfg: DictConfig) -> str:
    """A stable hash of :func:`result_config`: equal hashes mean the same computation."""
    blob = json.dumps(result_config(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
