"""Reading weight files into models, with one clear ``ConfigError`` for every way that can fail."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from qaf.config import ConfigError

ACCEPTED = (
    "accepted: a file written by torch.save holding a state_dict "
    "(or a dict with a 'state_dict' entry; a 'module.' key prefix is stripped)"
)
_SHOWN = 3  # keys listed per kind of mismatch; the rest are counted


def resolve_path(path: str | os.PathLike) -> Path:
    """Make a user-given path absolute against the directory the user launched from.

    Parameters
    ----------
    path : str or PathLike
        Path as written in the config; ``~`` is expanded.

    Returns
    -------
    Path
        Absolute path. Under Hydra, relative paths are taken from the original working directory,
        not the run's output directory.
    """
    expanded = os.path.expanduser(str(path))
    try:
        from hydra.utils import to_absolute_path

        return Path(to_absolute_path(expanded))
    except ImportError:  # hydra is a dependency, but keep model loading usable without it
        return Path(expanded).absolute()


def read_state_dict(path: str | os.PathLike, key: str = "model.checkpoint") -> dict[str, torch.Tensor]:
    """Load a state dict from ``path`` safely (``weights_only=True``) onto the CPU.

    Parameters
    ----------
    path : str or PathLike
        A ``torch.save`` file holding a state dict, or a dict with a ``"state_dict"`` entry
        (as the packaged CIFAR ResNet files are).
    key : str
        Config key named in error messages.

    Returns
    -------
    dict[str, Tensor]
        The tensors, with any ``module.`` prefix (from ``DataParallel``) removed.

    Raises
    ------
    ConfigError
        If the file is missing, unreadable, or does not hold a mapping of names to tensors.
    """
    resolved = resolve_path(path)
    if not resolved.is_file():
        raise ConfigError(f"{key}={path}: no such file ({resolved}); {ACCEPTED}")
    try:
        obj = torch.load(resolved, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types (pickle, zip, EOF, Runtime) on bad files
        raise ConfigError(
            f"{key}={path}: cannot be read as a PyTorch weights file "
            f"({type(err).__name__}: {first_line(err)}); {ACCEPTED}"
        ) from err
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise ConfigError(f"{key}={path}: holds a {type(obj).__name__}, not a state_dict; {ACCEPTED}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], path: str | os.PathLike,
              key: str = "model.checkpoint", what: str = "this model") -> None:
    """Copy ``state`` into ``model``, requiring every key and shape to match.

    Parameters
    ----------
    model : nn.Module
        Model to fill in place.
    state : Mapping[str, Tensor]
        Weights, e.g. from :func:`read_state_dict`.
    path : str or PathLike
        Where ``state`` came from (for the error message).
    key : str
        Config key named in error messages.
    what : str
        Description of the model (for the error message), e.g. ``"resnet20"``.

    Raises
    ------
    ConfigError
        If keys are missing or unexpected, or a tensor has the wrong shape.
    """
    expected = model.state_dict()
    # Checkpoints written before PyTorch 0.4.1 (like the packaged CIFAR ResNets) lack BN's
    # num_batches_tracked; load_state_dict fills it in, so it is not a mismatch.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items() if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{label} {len(items)}: {', '.join(items[:_SHOWN])}{', ...' if len(items) > _SHOWN else ''}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
        if items
    ]
    if problems:
        raise ConfigError(
            f"{key}={path}: does not fit {what} ({'; '.join(problems)}); "
            f"accepted: a state_dict for {what}"
        )
    model.load_state_dict(dict(state), strict=False)


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (torch errors can run to pages)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else "no message"
