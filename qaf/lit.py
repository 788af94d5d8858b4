"""The Lightning side of a run: calibration passes and evaluation.

Both are passes over a DataLoader with no gradients; running them through a Lightning ``Trainer``
gives devices (``accelerator=auto``), DDP with ``trainer.devices>1``, progress bars and loggers.
Calibration passes use the predict loop inside the context managers of :mod:`qaf.calib`; the
module keeps the modules those mark (BN layers being re-estimated) in train mode, and merges
calibration state across ranks at the end of the pass. Evaluation records per-image correctness
and gathers it across ranks, so top-1, its interval and paired tests use every image exactly once.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.strategies.launchers import subprocess_script as _pl_subprocess_script
from torch import nn
from torch.utils.data import DataLoader

from qaf.calib import batch_index, sync_across_ranks, train_mode_modules
from qaf.data import global_batch_index

# Each run builds a few Trainers; their device banners and tips would repeat in every log.
for _name in ("pytorch_lightning.utilities.rank_zero", "pytorch_lightning.accelerators.cuda",
              "lightning.pytorch.utilities.rank_zero", "lightning_fabric.utilities.distributed",
              "pytorch_lightning.utilities.distributed"):
    logging.getLogger(_name).setLevel(logging.WARNING)
for _message in (".*LeafSpec.*", ".*does not have many workers.*", ".*predict returned None.*",
                 ".*sync_dist=True.*", ".*custom batch sampler.*",
                 ".*module\\(s\\) in eval mode at the start of training.*", ".*The number of training batches.*", ".*is smaller than the logging interval.*"):
    warnings.filterwarnings("ignore", message=_message)

def _job_subprocess_cmd(local_rank: int) -> tuple[list[str], str]:
    """The command Lightning runs for DDP rank ``local_rank`` under Hydra: this job, as a single run.

    Lightning's own version replays ``sys.argv``, which in a multirun (``-m``, an experiment with
    ``hydra.mode: MULTIRUN``) starts the whole sweep again in every rank (Lightning issues
    #2727, #15689; PR #18175 open). Here each rank runs exactly this job's overrides, in RUN mode,
    in the job's output folder (rank 0 writes the results; the others only compute).
    """
    import __main__
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd, to_absolute_path

    hydra_cfg = HydraConfig.get()
    if __main__.__spec__ is None:
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    command += list(hydra_cfg.overrides.task) + [
        "hydra.mode=RUN", f"hydra.run.dir={_quoted(hydra_cfg.runtime.output_dir)}", "hydra.output_subdir=null",
        f"hydra.job.name=ddp_rank{local_rank}"]
    return command, get_original_cwd()


def _quoted(value: str) -> str:
    """A Hydra override value that may hold ``=`` and ``,`` (job folders are named by overrides)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


_pl_subprocess_script._hydra_subprocess_cmd = _job_subprocess_cmd

#: Version of the evaluation's numerics (this module and qaf.data): part of the float-accuracy
#: cache key; bump it with any change that can change an evaluation (tests/test_cache.py checks).
EVAL_VERSION = 5  # 4: ImageNet decoded by torchvision.io, uint8 tensor transforms; 5: CIFAR arrays read once per process

#: Passes with at least this many batches show a progress bar (shorter ones print one line).
PROGRESS_MIN_BATCHES = 50


@dataclass
class EvalResult:
    """Per-image results of one evaluation.

    Attributes
    ----------
    correct1, correct5 : np.ndarray
        Boolean per evaluation image (dataset order): top-1 / top-5 correct.
    """

    correct1: np.ndarray
    correct5: np.ndarray

    @property
    def top1(self) -> float:
        """Top-1 accuracy in percent."""
        return 100.0 * float(self.correct1.mean())

    @property
    def top5(self) -> float:
        """Top-5 accuracy in percent."""
        return 100.0 * float(self.correct5.mean())


class Classifier(pl.LightningModule):
    """Wraps an image classifier for calibration passes and per-image evaluation.

    Parameters
    ----------
    model : nn.Module
        The (possibly compressed) classifier.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        # With more ranks than batches some ranks run none; they still join every collective.
        self.allow_zero_length_dataloader_with_multiple_devices = True
        self._rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    # ------------------------------------------------------------------ calibration passes
    def on_predict_model_eval(self) -> None:
        super().on_predict_model_eval()
        for module in train_mode_modules(self.model):  # Lightning just set everything to eval
            module.train()

    def predict_step(self, batch: Any, batch_idx: int) -> None:
        with batch_index(global_batch_index(batch_idx)):
            self(batch[0])

    # ------------------------------------------------------------------ evaluation
    def on_validation_epoch_start(self) -> None:
        self._rows = []

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, labels, index = batch
        logits = self(images)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == labels[:, None]
        self._rows.append((index.cpu().numpy(), hit[:, 0].cpu().numpy(), hit.any(1).cpu().numpy()))

    def gathered_result(self) -> EvalResult:
        """Per-image results of all ranks, in dataset order (call on every rank after validate)."""
        rows = self._rows
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, rows)
            rows = [row for rank_rows in gathered for row in rank_rows]
        index = np.concatenate([r[0] for r in rows])
        order = np.argsort(index, kind="stable")
        if not np.array_equal(index[order], np.arange(index.size)):
            raise RuntimeError("evaluation saw some images twice or not at all")
        return EvalResult(np.concatenate([r[1] for r in rows])[order], np.concatenate([r[2] for r in rows])[order])


def make_trainer(accelerator: str = "auto", devices: int | str = 1, precision: str = "32-true",
                 logger: Any = False, progress: bool = False, root_dir: str | None = None) -> pl.Trainer:
    """A Trainer for no-gradient passes (calibration and evaluation)."""
    # Passes never train: DDP must not overwrite rank k's calibration buffers with rank 0's.
    strategy: Any = DDPStrategy(broadcast_buffers=False) if devices not in (1, "1", "auto") else "auto"
    return pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        precision=precision,
        logger=logger,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        use_distributed_sampler=False,  # qaf's loaders shard whole batches by rank themselves
        inference_mode=False,  # calibration writes BN buffers and observer state
        default_root_dir=root_dir,
    )


@contextmanager
def distributed_scope() -> Iterator[None]:
    """Leave no DDP state behind a job, so the next job of a multirun process launches its own ranks.

    Lightning's launcher sets the rendezvous environment variables in the launching process and
    keeps the process group; both are undone on exit (a no-op in a single-process job).
    """
    keys = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
    saved = {k: os.environ.get(k) for k in keys}
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def show_progress(loader: DataLoader, progress: bool) -> bool:
    """Whether a pass over ``loader`` is long enough for a progress bar."""
    return progress and len(loader) >= PROGRESS_MIN_BATCHES


def calibration_pass(trainer: pl.Trainer, model: nn.Module, loader: DataLoader) -> None:
    """One forward pass over ``loader`` (inside a :mod:`qaf.calib` context manager).

    With several ranks, their calibration state is merged afterwards (a rank may have run no
    batch, and Lightning then skips its epoch hooks, so the merge cannot live in one).
    """
    trainer.predict(Classifier(model), loader, return_predictions=False)
    sync_across_ranks(model)


def evaluate(trainer: pl.Trainer, model: nn.Module, loader: DataLoader) -> EvalResult:
    """Per-image top-1 / top-5 correctness of ``model`` over ``loader`` (every rank gets all)."""
    module = Classifier(model)
    trainer.validate(module, loader, verbose=False)
    return module.gathered_result()
