"""Shared fixtures: the repo root, the shared data folder, composed configs, and the expensive
things many tests need once per session (a factor cache).

Under pytest-xdist (``make test``: two workers) each worker gets an equal share of the CPU threads,
and so do the subprocesses tests start: two workers each spinning two OpenMP threads on two cores
run several times slower than one thread each.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("QAF_SHARED_DATA", ROOT.parent / "shared" / "data"))

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(_threads)
    os.environ["OMP_NUM_THREADS"] = str(_threads)


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``cuda`` skip, with one reason, where no CUDA device is present."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): its
    problems are small, and two threads on two shared, busy cores spin at every barrier."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def shared_data() -> Path:
    """The real models and images beside the repo (skips when absent)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set QAF_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def factor_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One factor / float-accuracy cache folder for the whole session: a factorization or a float
    evaluation that several tests need is computed once (tests of the cache itself use their own)."""
    return tmp_path_factory.mktemp("factor_cache")


def run_cli(args: list[str], cwd: Path, timeout: float = 600):
    """Run ``python run.py ARGS`` from the repo root with outputs under ``cwd``."""
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(ROOT), HYDRA_FULL_ERROR="0")
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_main(args: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch,
             capsys: pytest.CaptureFixture | None = None) -> tuple[int, str, str]:
    """``python run.py ARGS`` in this process (the same ``main``, Hydra and basic launcher, without
    the interpreter's start-up): ``(exit status, stdout, stderr)``. Without ``capsys`` (a module
    fixture) the output is captured by redirecting ``sys.stdout`` and ``sys.stderr``."""
    import contextlib
    import io
    import runpy
    import sys

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["run.py", *args])
    if capsys is not None:
        capsys.readouterr()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as redirects:
        if capsys is None:
            redirects.enter_context(contextlib.redirect_stdout(out))
            redirects.enter_context(contextlib.redirect_stderr(err))
        try:
            runpy.run_path(str(ROOT / "run.py"), run_name="__main__")
            status = 0
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else 1
    if capsys is not None:
        captured = capsys.readouterr()
        return status, captured.out, captured.err
    return status, out.getvalue(), err.getvalue()


def expected_overrides(sweep: Path) -> list[list[str]] | None:
    """The jobs the latest launch into ``sweep`` expects, predicted from its ``multirun.yaml``."""
    from omegaconf import OmegaConf

    from qaf.report.collect import expected_from_hydra

    return expected_from_hydra(OmegaConf.to_container(OmegaConf.load(sweep / "multirun.yaml").hydra, resolve=False))


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
