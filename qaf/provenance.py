"""Which code produced a result: git commit (and whether the tree was dirty) and package versions."""

from __future__ import annotations

import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import qaf

PACKAGES = ("torch", "torchvision", "pytorch-lightning", "hydra-core", "omegaconf", "numpy", "scipy",
            "tensorly", "wandb")
_REPO = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(_REPO), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@lru_cache(maxsize=1)
def versions() -> dict[str, Any]:
    """``{"code": {...}, "packages": {...}}`` for metrics.json (computed once per process).

    ``code.git_commit`` is None when qaf does not run from a git checkout; ``code.git_dirty``
    says whether tracked files differed from that commit.
    """
    commit = _git("rev-parse", "HEAD")
    dirty = None if commit is None else bool(_git("status", "--porcelain", "--untracked-files=no"))
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    return {"code": {"qaf_version": qaf.__version__, "git_commit": commit, "git_dirty": dirty}, "packages": packages}


def code_label(code: Any) -> str:
    """A result's code version as one short label: the commit's first 12 hex digits, ``+dirty`` when
    tracked files differed from it, ``unknown`` when it did not run from a git checkout."""
    if not isinstance(code, dict) or not code.get("git_commit"):
        return "unknown"
    return str(code["git_commit"])[:12] + ("+dirty" if code.get("git_dirty") else "")
