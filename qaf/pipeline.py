"""One run, as a straight line (the same for every method):

    validate -> output folder (resume / refuse to overwrite) -> build model, data, method
      -> method.check -> float baseline (cached) -> method.compress
      -> protocol: BN re-estimation -> activation observation -> [fine-tuning -> BN re-estimation]
      -> evaluate (per image) -> deployable form (deploy_top1)
      -> BOPs, size -> metrics.json (last, atomically) + predictions, W&B

Nothing here depends on which method runs: a method only changes the model, the protocol does the
rest. Only rank 0 writes files when several processes run the passes (DDP).
"""

from __future__ import annotations

import copy
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.utilities import rank_zero_only
from torch import nn

from qaf import lit, outputs, provenance
from qaf.cache import FactorCache, key_digest, tensor_digest
from qaf.calib import observing_activations, recalibrating_bn
from qaf.config import ConfigError, config_hash, result_config, validate
from qaf.data import DataBundle
from qaf.export import export_options, export_run
from qaf.export.deploy import deployable
from qaf.methods.base import CompressContext, Method
from qaf.metrics import bops as cost
from qaf.metrics.size import size_bytes
from qaf.metrics.stats import paired_comparison, wilson_interval
from qaf.quant.policy import LayerPolicy
from qaf.results import MethodInfo, Metrics

log = logging.getLogger("qaf")


class Stages(dict):
    """Seconds per pipeline stage, and the stage running now (named by ``failed.json``)."""

    current = "setup"

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.current = name
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


def check_weights(model: nn.Module) -> None:
    """Reject a model with non-finite weights before any method touches it."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ConfigError(f"model.checkpoint: tensor {name} holds NaN or inf values; "
                              "accepted: a checkpoint with finite weights")


def run_labels(method: str, policy: str) -> dict[str, str | None]:
    """What a dashboard splits runs by: the method's and the policy's short names, and the
    experiment (``experiment=NAME``; None without one)."""
    from hydra.core.hydra_config import HydraConfig

    experiment = HydraConfig.get().runtime.choices.get("experiment") if HydraConfig.initialized() else None
    return {"method": method, "policy": policy, "experiment": experiment}


def build_logger(cfg: DictConfig, output_dir: Path, job_name: str, labels: dict[str, str | None]) -> Any:
    """The experiment logger chosen by ``logger=``, or False for ``logger=none``.

    W&B: a new run per job (``reinit="create_new"``), grouped by sweep id, ``job_type`` = method.
    Its config is :func:`qaf.config.result_config` with the ``labels`` (:func:`run_labels`) as
    top-level strings (the method and policy nodes move to ``method_config`` and
    ``policy_config``); its tags are ``logger.tags``, the method, ``policy:<name>`` and the
    experiment. The pipeline finishes the run when the job ends, so the jobs of a sweep run in
    one process never share a run.
    """
    node = cfg.get("logger")
    if not node or "_target_" not in node or not rank_zero_only.rank == 0:
        return False
    if str(node["_target_"]).endswith("WandbLogger"):
        import wandb

        config = result_config(cfg)
        config.update(method_config=config.pop("method", None), policy_config=config.pop("policy", None), **labels)
        tags = [*(node.get("tags") or []), labels["method"], f"policy:{labels['policy']}"]
        tags += [labels["experiment"]] if labels["experiment"] else []
        run = wandb.init(project=node.get("project"), entity=node.get("entity"), mode=node.get("mode", "offline"),
                         tags=list(dict.fromkeys(map(str, tags))), dir=str(output_dir), name=job_name,
                         group=str(cfg.sweep_id), job_type=labels["method"], config=config,
                         reinit="create_new", settings=wandb.Settings(silent=True, show_info=False))
        return instantiate(node, experiment=run, save_dir=str(output_dir), _convert_="all",
                           **{k: None for k in ("project", "entity", "mode", "tags") if k in node})
    return instantiate(node, save_dir=str(output_dir))


def log_results(logger: Any, metrics: dict, info: MethodInfo) -> None:
    """Send the config, the scalar metrics and the per-layer table to the experiment logger.

    The settings the method declares its result does not depend on (``info.unused_settings``:
    ``rate`` for a method that keeps every weight) are left out of the scalars.
    """
    if not logger:
        return
    scalars = {k: v for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in info.unused_settings}
    if isinstance(logger, pl.loggers.WandbLogger):
        run = logger.experiment
        # Each run is one (bops_pct, top1) point; a scatter over the sweep group plots the Pareto front.
        run.define_metric("top1", step_metric="bops_pct")
        run.log({"bops_pct": metrics["bops_pct"], "top1": metrics["top1"]})
        run.summary.update({**scalars, "top1_ci95": metrics["top1_ci95"]})
        if metrics["layers"]:
            import wandb

            columns = sorted({key for layer in metrics["layers"] for key in layer})
            rows = [[_loggable(layer.get(c)) for c in columns] for layer in metrics["layers"]]
            run.log({"layers": wandb.Table(columns=columns, data=rows)})
    else:
        logger.log_hyperparams(metrics["config"])
        logger.log_metrics(scalars)
    logger.save()
    logger.finalize("success")


def finish_logger(logger: Any, failed: bool) -> None:
    """End the job's W&B run (exit code 1 when the job failed)."""
    if isinstance(logger, pl.loggers.WandbLogger):
        logger.experiment.finish(exit_code=1 if failed else 0)


def _loggable(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, type(None))) else str(value)


def float_baseline(cfg: DictConfig, model: nn.Module, data: DataBundle, trainer: pl.Trainer,
                   cache: FactorCache) -> lit.EvalResult:
    """Per-image results of the float model, cached per (weights, evaluation config, code version)."""
    # Everything that changes the number: the weights themselves (not a path), the data config
    # (set, subset, transforms), the numeric precision, and the evaluation code's version.
    key = {"stage": "fp32_eval", "version": lit.EVAL_VERSION, "weights": key_digest(
        {"tensors": [tensor_digest(t) for t in model.state_dict().values()]}),
        "data": result_config(cfg)["data"], "precision": str(cfg.trainer.precision),
        "accelerator": trainer.accelerator.__class__.__name__}

    def compute() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        result = lit.evaluate(trainer, model, data.eval_loader())
        return ({"correct1": torch.from_numpy(result.correct1), "correct5": torch.from_numpy(result.correct5)},
                {"top1": result.top1})

    stored, _, _ = cache.get_or_compute(key, compute, schema={"tensors": ["correct1", "correct5"], "meta": ["top1"]})
    correct1, correct5 = stored["correct1"].numpy().astype(bool), stored["correct5"].numpy().astype(bool)
    if correct1.shape != (len(data.eval),):  # type: ignore[arg-type]
        raise RuntimeError("cached float evaluation does not match the evaluation set")
    return lit.EvalResult(correct1, correct5)


def output_dir_of(cfg: DictConfig) -> Path:
    """The job's output folder (Hydra's, or multirun_outputs/<sweep_id> outside Hydra)."""
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

    Raises
    ------
    ConfigError
        For bad input, before heavy work (``failed.json`` records it, as any other error).
    """
    output_dir = output_dir_of(cfg)
    chash = config_hash(cfg)
    writer = rank_zero_only.rank == 0
    if not writer:  # DDP ranks > 0 run the same steps; rank 0 speaks and writes
        log.setLevel(logging.WARNING)
    try:
        validate(cfg)
    except ConfigError as err:
        if writer:
            outputs.record_failure(output_dir, err, "validate", chash)
        raise
    if writer:
        try:
            done = outputs.prepare(output_dir, chash, bool(cfg.resume), bool(cfg.get("overwrite", False)),
                                   str(cfg.sweep_id))
        except ConfigError as err:  # the folder keeps its results; the refusal is this job's state
            outputs.record_failure(output_dir, err, "output_folder", chash)
            raise
        if done is not None:
            (output_dir / outputs.FAILED_FILE).unlink(missing_ok=True)
            log.info("skipped: %s already holds the results of this config (resume=true)",
                     output_dir / outputs.METRICS_FILE)
            return done.to_json()
    stages = Stages()
    marker = outputs.RunMarker(output_dir, chash) if writer else None
    loggers: list[Any] = []
    failed = False
    try:
        with lit.distributed_scope():
            return _run(cfg, output_dir, chash, stages, writer, loggers)
    except BaseException as err:
        failed = True
        if writer:
            outputs.record_failure(output_dir, err, stages.current, chash)
        raise
    finally:
        for logger in loggers:
            finish_logger(logger, failed)
        if marker is not None:
            marker.close()


def _run(cfg: DictConfig, output_dir: Path, chash: str, stages: Stages, writer: bool, loggers: list[Any]) -> dict:
    with stages.stage("setup"):
        job = setup(cfg)
    model, data, method, policy, finetune = job.model, job.data, job.method, job.policy, job.finetune
    # The job's W&B run starts now, so a job that fails later is a failed run on the dashboard too.
    labels = run_labels(method.name, policy.name)
    logger = build_logger(cfg, output_dir, output_dir.name, labels) if writer else False
    if logger:
        loggers.append(logger)
    log.info("run %s: method=%s policy=%s bits=%s act_bits=%s rate=%s on %s (%d eval / %d calib images) -> %s",
             chash, method.name, policy.name, cfg.bits, cfg.act_bits, cfg.rate, data.name, len(data.eval),
             data.calib_samples, output_dir)

    trainer_kw, trainer_for = trainers(cfg, output_dir)
    fp32_costs = cost.layer_costs(model, data.input_size)
    fp32_size = size_bytes(model)
    with stages.stage("fp32_eval"):
        fp32 = float_baseline(cfg, model, data, trainer_for(data.eval_loader()), job.ctx.cache)
    log.info("float model: top-1 %.2f%% (%.1f s)", fp32.top1, stages["fp32_eval"])

    protocol = {"bn_recalibration": bool(cfg.protocol.bn_recalibration), **data.protocol(),
                "policy": policy.as_dict(), "finetune": finetune.as_dict() if finetune is not None else None}
    layers, finetune_summary = compress_and_calibrate(cfg, job, stages, trainer_kw, trainer_for)

    with stages.stage("eval"):
        loader = data.eval_loader()
        result = lit.evaluate(trainer_for(loader, logger), model, loader)
    log.info("eval: top-1 %.2f%% on %d images (%.1f s)", result.top1, result.correct1.size, stages["eval"])
    deploy = evaluate_deployable(model, data, stages, trainer_for, result)

    costs = cost.layer_costs(model, data.input_size)
    fp32_macs = cost.total_macs(fp32_costs)
    bops = cost.total_bops(costs)
    n = int(result.correct1.size)
    size = size_bytes(model)
    metrics = Metrics(
        method=method.name, method_info=method.info, model=_model_name(cfg), data=data.name, bits=int(cfg.bits),
        act_bits=int(cfg.act_bits), rate=float(cfg.rate), seed=int(cfg.seed), policy=policy.name,
        top1=round(result.top1, 4), top5=round(result.top5, 4), eval_samples=n,
        top1_ci95=[round(v, 4) for v in wilson_interval(int(result.correct1.sum()), n)],
        fp32_top1=round(fp32.top1, 4), vs_fp32=paired_comparison(result.correct1, fp32.correct1).as_dict(),
        macs=cost.total_macs(costs), fp32_macs=fp32_macs, bops=bops, bops_pct=cost.bops_pct(bops, fp32_macs),
        bops_pct_paper=cost.paper_bops_pct(model, costs, fp32_macs, int(cfg.bits), int(cfg.act_bits)),
        params=sum(p.numel() for p in model.parameters()), size_bytes=size, fp32_size_bytes=fp32_size,
        protocol=protocol, layers=layers, method_summary=method.summary, finetune_summary=finetune_summary,
        timings=dict(stages), sweep_id=str(cfg.sweep_id), overrides=_overrides(), config_hash=chash,
        config=result_config(cfg), **provenance.versions(), compression_ratio=fp32_size / size, **deploy)
    if writer and any(export_options(cfg)):
        with stages.stage("export"):
            try:
                metrics.export = export_run(model, cfg, output_dir, data.input_size, metrics.to_json())
            except Exception as err:  # the evaluation stands: keep it, and say why nothing was exported
                log.error("export failed (%s: %s); metrics.json is written without it", type(err).__name__, err)
                metrics.export = {"error": f"{type(err).__name__}: {err}"}
        metrics.timings = dict(stages)
    payload = metrics.to_json()
    if writer:
        np.savez_compressed(output_dir / outputs.PREDICTIONS_FILE, correct1=np.packbits(result.correct1),
                            correct5=np.packbits(result.correct5), n=n)
        log_results(logger, payload, method.info)
        outputs.write_json_atomic(output_dir / outputs.METRICS_FILE, payload)
        (output_dir / outputs.FAILED_FILE).unlink(missing_ok=True)
    lo, hi = metrics.top1_ci95
    log.info("result: top-1 %.2f%% [%.2f, %.2f] (float %.2f%%), %.3f %%BOPs, %.1f kB (%.1fx smaller) -> %s",
             metrics.top1, lo, hi, metrics.fp32_top1, metrics.bops_pct, size / 1e3, metrics.compression_ratio,
             output_dir / outputs.METRICS_FILE)
    return payload


@dataclass
class Job:
    """What a run builds from its config before any pass over data."""

    model: nn.Module
    data: DataBundle
    method: Method
    policy: LayerPolicy
    finetune: Any  # a fine-tuning step (qaf.finetune.Distillation) or None
    teacher: nn.Module | None  # the float model, kept for distillation
    ctx: CompressContext


def setup(cfg: DictConfig) -> Job:
    """Seed, then build method, policy, fine-tuning (their options checked), model and data from
    ``cfg``; ``method.check``.

    Raises ``ConfigError`` (options a group rejects, bad weights) before any heavy work.
    """
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    device = resolve_device(str(cfg.device))
    method: Method = build(cfg.method, bits=cfg.bits, act_bits=cfg.act_bits, rate=float(cfg.rate))
    policy = LayerPolicy.from_config(cfg.policy)
    finetune = build(cfg.finetune) if cfg.get("finetune") else None
    model: nn.Module = build(cfg.model)
    check_weights(model)
    data: DataBundle = build(cfg.data)
    cache = FactorCache(cfg.cache.dir, enabled=bool(cfg.cache.enabled))
    ctx = CompressContext(data=data, device=device, policy=policy, cache=cache, seed=int(cfg.seed),
                          progress=bool(cfg.get("progress", False)))
    method.check(model, ctx)
    teacher = copy.deepcopy(model) if finetune is not None else None
    return Job(model, data, method, policy, finetune, teacher, ctx)


def trainers(cfg: DictConfig, root_dir: Path | str) -> tuple[dict, Any]:
    """The Lightning settings of a run and a factory of trainers for one loader (progress bar or not)."""
    progress = bool(cfg.get("progress", False))
    trainer_kw = dict(accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices,
                      precision=cfg.trainer.precision, root_dir=str(root_dir))

    def trainer_for(loader: Any, logger: Any = False) -> pl.Trainer:
        return lit.make_trainer(logger=logger, progress=lit.show_progress(loader, progress), **trainer_kw)

    return trainer_kw, trainer_for


def compress_and_calibrate(cfg: DictConfig, job: Job, stages: Stages, trainer_kw: dict,
                           trainer_for: Any) -> tuple[list[dict], dict | None]:
    """Compress ``job.model`` in place, then the protocol: BN re-estimation, activation observation,
    [fine-tuning, BN re-estimation]. Returns the method's per-layer report and the fine-tuning summary."""
    model, data, method, finetune = job.model, job.data, job.method, job.finetune
    with stages.stage("compress"):
        layers = method.compress(model.to(job.ctx.device), job.ctx)
    log.info("compress (%s): %d layers (%.1f s)", method.name, len(layers), stages["compress"])
    recalibrate(cfg, model, data, stages, trainer_for)
    observe(model, data, stages, trainer_for)
    if finetune is None:
        return layers, None
    with stages.stage("finetune"):
        summary = finetune.run(model, job.teacher, data, finetune_trainer(finetune, job.ctx.progress, trainer_kw))
    log.info("finetune: %d steps, KD loss %.4f -> %.4f (%.1f s)", finetune.steps, summary["first_loss"],
             summary["last_loss"], stages["finetune"])
    recalibrate(cfg, model, data, stages, trainer_for, after="finetune")
    return layers, summary


def recalibrate(cfg: DictConfig, model: nn.Module, data: DataBundle, stages: Stages, trainer_for: Any,
                after: str = "compress") -> None:
    """Batch-norm re-estimation on the calibration images (``data.bn_transform``), if the protocol says so."""
    if not cfg.protocol.bn_recalibration:
        return
    name = "bn_recalibration" if after == "compress" else f"bn_recalibration_after_{after}"
    with stages.stage(name):
        loader = data.bn_loader()
        with recalibrating_bn(model) as bns:
            if bns:
                lit.calibration_pass(trainer_for(loader), model, loader)
    log.info("%s: %d BN layers on %d images (%s transform, %.1f s)", name, len(bns), data.calib_samples,
             data.bn_transform, stages[name])


def observe(model: nn.Module, data: DataBundle, stages: Stages, trainer_for: Any) -> None:
    """Fit every activation quantizer without a grid on the calibration images (``data.calib_transform``)."""
    with stages.stage("observe"):
        pending = observe_pass(model, data, trainer_for)
    if pending:
        log.info("observe: %d activation quantizers on %d images (%s transform, %.1f s)", len(pending),
                 data.calib_samples, data.calib_transform, stages["observe"])


def observe_pass(model: nn.Module, data: DataBundle, trainer_for: Any) -> list:
    """One pass over the calibration images fitting the activation quantizers without a grid;
    returns them."""
    loader = data.calib_loader()
    with observing_activations(model) as pending:
        if pending:
            lit.calibration_pass(trainer_for(loader), model, loader)
    return pending


def finetune_trainer(finetune: Any, progress: bool, trainer_kw: dict) -> pl.Trainer:
    """The fine-tuning trainer (progress bar when progress is on)."""
    from qaf.finetune import make_trainer

    kw = {k: v for k, v in trainer_kw.items() if k != "root_dir"}
    devices = kw.pop("devices")
    return make_trainer(finetune.steps, devices=devices, logger=False, enable_progress_bar=progress,
                        default_root_dir=trainer_kw["root_dir"], **kw)


def evaluate_deployable(model: nn.Module, data: DataBundle, stages: Stages, trainer_for: Any,
                        result: lit.EvalResult) -> dict[str, Any]:
    """The deployable form of ``model`` (:func:`qaf.export.deploy.deployable`: batch norms folded,
    additions and biases on grids; its new quantizers fitted on the calibration images, stage
    ``deploy``) scored on the evaluation images (stage ``deploy_eval``), against ``result`` (the
    model's own scores).

    Returns
    -------
    dict
        The ``deploy_*`` fields of :class:`qaf.results.Metrics`: ``deploy_top1``, ``deploy_top1_ci95``,
        ``deploy_vs_top1`` (paired comparison, the form as A) and ``deploy`` (what the form changed),
        or only ``deploy`` = ``{"error": ...}`` when the model has no deployable form (the run's
        own figures stand).
    """
    try:
        with stages.stage("deploy"):
            form = deployable(model, lambda form: observe_pass(form, data, trainer_for))
    except Exception as err:  # e.g. a forward torch.fx cannot trace: say why, keep the run
        log.error("deployable form failed (%s: %s); metrics.json is written without deploy_top1",
                  type(err).__name__, err)
        return {"deploy": {"error": f"{type(err).__name__}: {err}"}}
    with stages.stage("deploy_eval"):
        loader = data.eval_loader()
        scored = lit.evaluate(trainer_for(loader), form, loader)
    n = int(scored.correct1.size)
    vs = paired_comparison(scored.correct1, result.correct1)
    log.info("deployable form: top-1 %.2f%% (%+.2f points, p=%.3g against the run's), %s", scored.top1,
             vs.diff, vs.p_value, form.deploy_summary)
    return {"deploy_top1": round(scored.top1, 4), "deploy_vs_top1": vs.as_dict(), "deploy": form.deploy_summary,
            "deploy_top1_ci95": [round(v, 4) for v in wilson_interval(int(scored.correct1.sum()), n)]}


def _model_name(cfg: DictConfig) -> str:
    node = cfg.model
    if "depth" in node:
        return f"resnet{node.depth}_cifar"
    return str(node.get("arch", node._target_))
