"""Re-run a job's compression from its config (for ``python -m qaf.export RUN_DIR``, tests, bench).

:func:`compressed_model` performs the stages of :func:`qaf.pipeline.run` that change the model,
in the same order (seed, build, ``method.check``, ``compress``, BN re-estimation, activation
observation, optional fine-tuning and BN re-estimation), and returns the model as the pipeline
evaluates it. Factorizations come from the factor cache when the job filled it. Nothing is
written to the job's folder; evaluation, BOPs and ``metrics.json`` are the pipeline's business.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"


def compose(*overrides: str) -> DictConfig:
    """The run config of ``python run.py OVERRIDES`` (Hydra's compose API, outside a Hydra run)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import qaf.config  # noqa: F401  (registers the resolvers)

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return hydra_compose("config", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


#: Execution keys a result config (``metrics.json["config"]``) lacks, with their defaults.
EXECUTION_DEFAULTS: dict[str, Any] = {
    "sweep_id": "export", "resume": False, "overwrite": True, "progress": False, "logger": None,
    "cache": {"dir": "multirun_outputs/.cache", "enabled": True}, "device": "auto", "export": False,
}


def config_of_run(run_dir: str | Path, cache_dir: str | None = None, device: str | None = None) -> DictConfig:
    """The config that reproduces a finished job: its result config plus its execution keys.

    Parameters
    ----------
    run_dir : path
        The job folder (``metrics.json``; ``.hydra/config.yaml`` when the job ran under Hydra).
    cache_dir, device : str, optional
        Override the factor cache folder and the solvers' device (default: the job's own).

    Returns
    -------
    DictConfig
    """
    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    base: dict[str, Any] = copy.deepcopy(EXECUTION_DEFAULTS)
    hydra_file = run_dir / ".hydra" / "config.yaml"
    if hydra_file.is_file():
        saved = OmegaConf.to_container(OmegaConf.load(hydra_file), resolve=False)
        assert isinstance(saved, dict)
        for key in ("cache", "device", "trainer"):
            value = saved.get(key)
            if value is not None and "${" not in json.dumps(value):
                base[key] = value
    cfg = OmegaConf.merge(OmegaConf.create(base), OmegaConf.create(metrics["config"]))
    cfg.trainer.setdefault("devices", 1)
    cfg.trainer.setdefault("accelerator", "auto")
    cfg.data.setdefault("num_workers", 0)
    if cache_dir is not None:
        cfg.cache.dir = cache_dir
    if device is not None:
        cfg.device = device
    assert isinstance(cfg, DictConfig)
    return cfg


def compressed_model(cfg: DictConfig, root_dir: str | Path | None = None) -> tuple[nn.Module, Any]:
    """The compressed, calibrated model of ``cfg`` (as :func:`qaf.pipeline.run` evaluates it).

    Parameters
    ----------
    cfg : DictConfig
        A composed run config.
    root_dir : path, optional
        Lightning's root folder (default: a temporary folder).

    Returns
    -------
    tuple
        ``(model, data)``: the model in eval mode and the run's :class:`qaf.data.DataBundle`.
    """
    from qaf.config import validate
    from qaf.pipeline import Stages, compress_and_calibrate, setup, trainers

    validate(cfg)
    job = setup(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        trainer_kw, trainer_for = trainers(cfg, root_dir or tmp)
        compress_and_calibrate(cfg, job, Stages(), trainer_kw, trainer_for)
    return job.model.eval(), job.data


@torch.no_grad()
def predictions(model: Any, loader: Any) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 predictions and labels over an evaluation loader (``(x, y, index)`` batches, dataset order).

    ``model`` is a module (on any device: batches are moved to it) or any callable from a CPU
    float tensor batch to logits (e.g. an onnxruntime session wrapped by
    :func:`qaf.export.onnx.onnx_logits`).
    """
    params = next(model.parameters(), None) if isinstance(model, nn.Module) else None
    device = params.device if params is not None else torch.device("cpu")
    preds, labels, order = [], [], []
    for x, y, index in loader:
        preds.append(model(x.to(device)).argmax(1).cpu().numpy())
        labels.append(np.asarray(y))
        order.append(np.asarray(index))
    idx = np.argsort(np.concatenate(order), kind="stable")
    return np.concatenate(preds)[idx], np.concatenate(labels)[idx]


def top1(model: Any, loader: Any) -> float:
    """Top-1 accuracy (percent) of ``model`` over an evaluation loader."""
    pred, label = predictions(model, loader)
    return 100.0 * float((pred == label).mean())
