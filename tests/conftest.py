"""Shared fixtures: the repo root, the shared data folder, composed configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("QAF_SHARED_DATA", ROOT.parent / "shared" / "data"))

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``cuda`` skip, with one reason, where no CUDA device is present."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture
def shared_data() -> Path:
    """The real models and images beside the repo (skips when absent)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set QAF_SHARED_DATA)")
    return SHARED_DATA


def run_cli(args: list[str], cwd: Path, timeout: float = 600):
    """Run ``python run.py ARGS`` from the repo root with outputs under ``cwd``."""
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(ROOT), HYDRA_FULL_ERROR="0")
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def compose(*overrides: str):
    """The composed config of ``python run.py OVERRIDES`` (Hydra's compose API on conf/)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import qaf.config  # noqa: F401  (registers the resolvers)

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def run_inprocess(*overrides: str) -> dict:
    """``qaf.pipeline.run`` on a composed config, in this process; outputs go to
    ``multirun_outputs/<sweep_id>`` under the current directory (tests chdir to tmp_path)."""
    from qaf.pipeline import run

    return run(compose("logger=none", "progress=false", "cache.dir=.cache", *overrides))
