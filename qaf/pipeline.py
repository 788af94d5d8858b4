"""One run, as a straight line.

    validate -> build model, data, method -> method.check -> float baseline (cached)
      -> method.compress -> BN calibration -> activation observation -> evaluate
      -> MACs / BOPs -> loggers -> metrics.json (written last, atomically)
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from qaf import lit
from qaf.cache import FactorCache, key_digest, tensor_digest
from qaf.config import ConfigError, config_hash, result_config, validate
from qaf.data import DataBundle
from qaf.methods.base import CompressContext, Method
from qaf.metrics import bops as cost
from qaf.quant.modules import act_quantizers, set_act_mode

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON so that readers see either nothing or the whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, default=float)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def finished_metrics(output_dir: Path, chash: str) -> dict | None:
    """The metrics of an earlier run of the same config in ``output_dir``, if any."""
    path = output_dir / METRICS_FILE
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return metrics if metrics.get("config_hash") == chash else None


class Timings(dict):
    """Seconds per pipeline stage."""

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self[name] = round(self.get(name, 0.0) + time.perf_counter() - start, 3)


def build(node: DictConfig, **kwargs: Any) -> Any:
    """``instantiate`` that lets a builder's ``ConfigError`` through unwrapped (Hydra wraps it)."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        raise


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} is invalid here: no CUDA device is present; accepted auto or cpu")
    return torch.device(name)


def build_logger(cfg: DictConfig, output_dir: Path, job_name: str, job_type: str) -> Any:
    """The experiment logger chosen by ``logger=``, or False for ``logger=none``."""
    node = cfg.get("logger")
    if not node or "_target_" not in node:
        return False
    target = str(node["_target_"])
    if target.endswith("WandbLogger"):
        # Group runs per sweep, one job type per method, so sweep dashboards come for free.
        return instantiate(node, save_dir=str(output_dir), name=job_name, group=str(cfg.sweep_id),
                           job_type=job_type)
    return instantiate(node, save_dir=str(output_dir))


def log_results(logger: Any, metrics: dict) -> None:
    """Send the config, the scalar metrics and the per-layer table to the experiment logger."""
    if not logger:
        return
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    logger.log_hyperparams(metrics["config"])
    logger.log_metrics(scalars)
    if isinstance(logger, pl.loggers.WandbLogger):
        run = logger.experiment
        # Each run is one (bops_pct, top1) point; a scatter over the sweep group plots the Pareto front.
        run.define_metric("top1", step_metric="bops_pct")
        run.log({"bops_pct": metrics["bops_pct"], "top1": metrics["top1"]})
        run.summary.update(scalars)
        if metrics["layers"]:
            columns = sorted({key for layer in metrics["layers"] for key in layer})
            rows = [[_loggable(layer.get(c)) for c in columns] for layer in metrics["layers"]]
            import wandb

            run.log({"layers": wandb.Table(columns=columns, data=rows)})
    logger.save()
    logger.finalize("success")


def _loggable(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, type(None))) else str(value)


def float_accuracy(cfg: DictConfig, model: nn.Module, data: DataBundle, trainer: pl.Trainer) -> dict:
    """Top-1/top-5 of the float model, cached on disk per (weights, data config)."""
    # Keyed by the weights themselves, not the checkpoint path, so a replaced file is re-evaluated.
    weights = [tensor_digest(t) for t in model.state_dict().values()]
    key = {"weights": weights, "data": result_config(cfg)["data"]}
    path = Path(cfg.cache.dir) / "fp32_eval" / f"{key_digest(key)[:16]}.json"
    if cfg.cache.enabled and path.exists():
        try:
            return json.loads(path.read_text())
        except ValueError:
            pass  # a corrupt entry is recomputed
    result = lit.evaluate(trainer, lit.Classifier(model, data.num_classes), data.eval_loader())
    if cfg.cache.enabled:
        write_json_atomic(path, result)
    return result


def _output_dir(cfg: DictConfig) -> Path:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path("multirun_outputs") / str(cfg.sweep_id)


def _overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def run(cfg: DictConfig) -> dict:
    """Run one compression experiment and return its metrics (also written to metrics.json).

    Parameters
    ----------
    cfg : DictConfig
        The composed config (``conf/config.yaml`` plus groups and overrides).

    Returns
    -------
    dict
        The metrics written to ``<output dir>/metrics.json``.
    """
    validate(cfg)
    output_dir = _output_dir(cfg)
    chash = config_hash(cfg)
    if cfg.resume and (done := finished_metrics(output_dir, chash)) is not None:
        log.info("skipped: %s already holds metrics for this config (resume=true)", output_dir / METRICS_FILE)
        return done

    timings = Timings()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    device = resolve_device(str(cfg.device))
    with timings.stage("setup"):
        model: nn.Module = build(cfg.model)
        data: DataBundle = build(cfg.data)
        method: Method = build(cfg.method, bits=cfg.bits, act_bits=cfg.act_bits, rate=float(cfg.rate))
        method.check(model, data)
        cache = FactorCache(cfg.cache.dir) if cfg.cache.enabled else None
    log.info("run %s: method=%s model=%s data=%s bits=%s act_bits=%s rate=%s -> %s", chash, method.name,
             cfg.model._target_, data.name, cfg.bits, cfg.act_bits, cfg.rate, output_dir)

    logger = build_logger(cfg, output_dir, job_name=output_dir.name, job_type=method.name)
    trainer_kw = dict(accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices,
                      precision=cfg.trainer.precision, progress=cfg.progress, root_dir=str(output_dir))
    trainer = lit.make_trainer(logger=False, **trainer_kw)

    fp32_costs = cost.layer_costs(model, data.input_size)
    if method.name == "fp32":
        fp32 = None
    else:
        with timings.stage("fp32_eval"):
            fp32 = float_accuracy(cfg, model, data, trainer)

    with timings.stage("compress"):
        ctx = CompressContext(data=data, device=device, cache=cache, seed=cfg.seed, progress=cfg.progress)
        layers = method.compress(model.to(device), ctx)
    if method.bn_calibration:
        with timings.stage("bn_calibration"):
            _set_act_mode(model, "off")
            lit.calibrate_bn(trainer, lit.Classifier(model, data.num_classes), data.calib_loader())
    if method.observe_activations and _set_act_mode(model, "observe"):
        with timings.stage("act_calibration"):
            lit.run_calibration_pass(trainer, lit.Classifier(model, data.num_classes), data.calib_loader())
            _set_act_mode(model, "quant")

    with timings.stage("eval"):
        eval_trainer = lit.make_trainer(logger=logger, **trainer_kw)
        scores = lit.evaluate(eval_trainer, lit.Classifier(model, data.num_classes), data.eval_loader())

    costs = cost.layer_costs(model, data.input_size)
    fp32_macs = cost.total_macs(fp32_costs)
    bops = cost.total_bops(costs)
    metrics = {
        "method": method.name,
        "model": _model_name(cfg),
        "data": data.name,
        "bits": int(cfg.bits),
        "act_bits": int(cfg.act_bits),
        "rate": float(cfg.rate),
        "seed": int(cfg.seed),
        "top1": round(scores["top1"], 4),
        "top5": round(scores["top5"], 4),
        "fp32_top1": round((fp32 or scores)["top1"], 4),
        "macs": cost.total_macs(costs),
        "fp32_macs": fp32_macs,
        "bops": bops,
        "bops_pct": cost.bops_pct(bops, fp32_macs),
        "params": sum(p.numel() for p in model.parameters()),
        "compressed_bits": cost.storage_bits(model),
        "layers": layers,
        "method_summary": getattr(method, "summary", {}),
        "timings": dict(timings),
        "sweep_id": str(cfg.sweep_id),
        "overrides": _overrides(),
        "config_hash": chash,
        "config": result_config(cfg),
    }
    log_results(logger, metrics)
    write_json_atomic(output_dir / METRICS_FILE, metrics)
    log.info("top1 %.2f%% (float %.2f%%), BOPs %.3f%% of float -> %s", metrics["top1"], metrics["fp32_top1"],
             metrics["bops_pct"], output_dir / METRICS_FILE)
    return metrics


def _model_name(cfg: DictConfig) -> str:
    node = cfg.model
    if "depth" in node:
        return f"resnet{node.depth}_cifar"
    return str(node.get("arch", node._target_))


def _set_act_mode(model: nn.Module, mode: str) -> bool:
    """Set every activation quantizer's mode; False when the model has none."""
    if not act_quantizers(model):
        return False
    set_act_mode(model, mode)
    return True
