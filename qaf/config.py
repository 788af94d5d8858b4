"""Config checks: every bad value is reported once, by key, before any heavy work starts.

Importing this module also registers the OmegaConf resolvers the configs use
(``qaf_uid`` for collision-free sweep ids, ``qaf_jobdir`` for job directory names).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from typing import Any

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value, file or checkpoint that cannot be used.

    The message names the config key and what is accepted, e.g.
    ``bits=1 is invalid: accepted 2..16``.
    """


def _job_dirname(override_dirname: str) -> str:
    # Hydra's override_dirname is empty for a job with no swept overrides.
    return override_dirname.replace("/", "_") or "default"


# use_cache=True: one id per process, and Hydra copies the resolver cache into every job's config,
# so all jobs of a sweep (local or launched) agree on the sweep directory.
OmegaConf.register_new_resolver("qaf_uid", lambda: secrets.token_hex(3), use_cache=True, replace=True)
OmegaConf.register_new_resolver("qaf_jobdir", _job_dirname, replace=True)

BITS_RANGE = (2, 16)

# Keys that change where or how a run is reported, not what it computes.
_NON_RESULT_KEYS = ("sweep_id", "resume", "progress", "logger", "cache", "hydra")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(cfg: DictConfig, key: str, low: int, high: int | None = None, nullable: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None and nullable:
        return
    accepted = f"an integer in {low}..{high}" if high is not None else f"an integer >= {low}"
    if nullable:
        accepted += " or null"
    if not _is_int(value) or value < low or (high is not None and value > high):
        raise ConfigError(f"{key}={value!r} is invalid: accepted {accepted}")


def validate(cfg: DictConfig) -> None:
    """Check the top-level and data keys of a composed run config.

    Group-specific checks (model depth, checkpoint files, ranks) live with the code that knows them
    and also raise ``ConfigError``.

    Parameters
    ----------
    cfg : DictConfig
        The composed config of one run.

    Raises
    ------
    ConfigError
        On the first invalid key, naming it and what is accepted.
    """
    for key in ("bits", "act_bits"):
        _check_int(cfg, key, *BITS_RANGE)
    rate = cfg.get("rate")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 1:
        raise ConfigError(f"rate={rate!r} is invalid: accepted a number > 1 (parameter reduction rate)")
    _check_int(cfg, "seed", 0)
    _check_int(cfg, "data.calib_samples", 1)
    _check_int(cfg, "data.eval_samples", 1, nullable=True)
    _check_int(cfg, "data.batch_size", 1)
    _check_int(cfg, "data.num_workers", 0)
    device = cfg.get("device", "auto")
    if device not in ("auto", "cpu", "cuda") and not str(device).startswith("cuda:"):
        raise ConfigError(f"device={device!r} is invalid: accepted auto, cpu, cuda or cuda:N")
    for group in ("method", "model", "data"):
        node = cfg.get(group)
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ConfigError(f"{group} has no _target_: choose an option of the '{group}' config group")


def result_config(cfg: DictConfig) -> dict:
    """The resolved config without the keys that do not change results (output, logging, cache)."""
    kept = {k: v for k, v in cfg.items() if k not in _NON_RESULT_KEYS}
    resolved = OmegaConf.to_container(OmegaConf.merge(kept), resolve=True)
    assert isinstance(resolved, dict)
    resolved.get("data", {}).pop("num_workers", None)
    return resolved


def config_hash(cfg: DictConfig) -> str:
    """A stable hash of :func:`result_config`: equal hashes mean the same computation."""
    blob = json.dumps(result_config(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
