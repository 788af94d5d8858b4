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
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
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

#: Version of the evaluation's numerics (this module and qaf.data): part of the float-accuracy
#: cache key; bump it with any change that can change an evaluation (tests/test_cache.py checks).
EVAL_VERSION = 2

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
        self._rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.result: EvalResult | None = None

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

    def on_predict_epoch_end(self) -> None:
        sync_across_ranks(self.model)

    # ------------------------------------------------------------------ evaluation
    def on_validation_epoch_start(self) -> None:
        self._rows = []

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, labels, index = batch
        logits = self(images)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == labels[:, None]
        self._rows.append((index.cpu().numpy(), hit[:, 0].cpu().numpy(), hit.any(1).cpu().numpy()))

    def on_validation_epoch_end(self) -> None:
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
        self.result = EvalResult(np.concatenate([r[1] for r in rows])[order],
                                 np.concatenate([r[2] for r in rows])[order])
        self.log("top1", self.result.top1, rank_zero_only=True)
        self.log("top5", self.result.top5, rank_zero_only=True)


def make_trainer(accelerator: str = "auto", devices: int | str = 1, precision: str = "32-true",
                 logger: Any = False, progress: bool = False, root_dir: str | None = None) -> pl.Trainer:
    """A Trainer for no-gradient passes (calibration and evaluation)."""
    return pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy="ddp" if devices not in (1, "1", "auto") else "auto",
        precision=precision,
        logger=logger,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        use_distributed_sampler=False,  # qaf's loaders shard whole batches by rank themselves
        inference_mode=False,  # calibration writes BN buffers and observer state
        default_root_dir=root_dir,
    )


def show_progress(loader: DataLoader, progress: bool) -> bool:
    """Whether a pass over ``loader`` is long enough for a progress bar."""
    return progress and len(loader) >= PROGRESS_MIN_BATCHES


def calibration_pass(trainer: pl.Trainer, model: nn.Module, loader: DataLoader) -> None:
    """One forward pass over ``loader`` (inside a :mod:`qaf.calib` context manager)."""
    trainer.predict(Classifier(model), loader, return_predictions=False)


def evaluate(trainer: pl.Trainer, model: nn.Module, loader: DataLoader) -> EvalResult:
    """Per-image top-1 / top-5 correctness of ``model`` over ``loader`` (every rank gets all)."""
    module = Classifier(model)
    trainer.validate(module, loader, verbose=False)
    assert module.result is not None
    return module.result
