"""The Lightning side of a run: batch-norm calibration, activation observation, evaluation.

All three are passes over a DataLoader with no gradients; running them through a Lightning
``Trainer`` gives devices (``accelerator=auto``, DDP with ``trainer.devices>1``), progress bars and
loggers for free. Calibration passes use the predict loop: ``on_predict_model_eval`` puts the
batch-norm layers back in train mode when statistics are being re-estimated.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

# Each run builds a few Trainers; their device banners and tips would repeat in every log.
logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=".*LeafSpec.*")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*predict returned None.*")  # calibration passes return nothing


class Classifier(pl.LightningModule):
    """Wraps an image classifier for calibration and top-1/top-5 evaluation.

    Parameters
    ----------
    model : nn.Module
        The (possibly compressed) classifier.
    num_classes : int
        Number of classes, for the accuracy metrics.
    """

    def __init__(self, model: nn.Module, num_classes: int):
        super().__init__()
        self.model = model
        self.top1 = MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro")
        self.top5 = MulticlassAccuracy(num_classes=num_classes, top_k=min(5, num_classes), average="micro")
        self.recalibrate_bn = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.top1.update(logits, labels)
        self.top5.update(logits, labels)
        self.log("top1", self.top1, on_epoch=True, sync_dist=True)
        self.log("top5", self.top5, on_epoch=True, sync_dist=True)

    def on_predict_model_eval(self) -> None:
        super().on_predict_model_eval()
        if self.recalibrate_bn:
            for module in self.model.modules():
                if isinstance(module, _BN_TYPES):
                    module.train()

    def predict_step(self, batch: Any, batch_idx: int) -> None:
        self(batch[0])


def make_trainer(accelerator: str = "auto", devices: int | str = 1, precision: str = "32-true",
                 logger: Any = False, progress: bool = True, root_dir: str | None = None) -> pl.Trainer:
    """A Trainer for no-gradient passes (calibration and evaluation only)."""
    return pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        precision=precision,
        logger=logger,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        inference_mode=False,  # calibration writes BN buffers and observer state
        default_root_dir=root_dir,
    )


def calibrate_bn(trainer: pl.Trainer, module: Classifier, loader: DataLoader) -> None:
    """Re-estimate batch-norm statistics as a cumulative average over ``loader``.

    BN layers run in train mode with ``momentum=None`` (a plain average over all calibration
    batches, not an EMA), everything else in eval mode, no gradients. Affine parameters are kept.
    """
    bns = [m for m in module.model.modules() if isinstance(m, _BN_TYPES)]
    saved = [m.momentum for m in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    module.recalibrate_bn = True
    try:
        trainer.predict(module, loader, return_predictions=False)
    finally:
        module.recalibrate_bn = False
        for bn, momentum in zip(bns, saved):
            bn.momentum = momentum
        module.model.eval()


def run_calibration_pass(trainer: pl.Trainer, module: Classifier, loader: DataLoader) -> None:
    """One forward pass over ``loader`` in eval mode (e.g. for activation observers)."""
    trainer.predict(module, loader, return_predictions=False)


def evaluate(trainer: pl.Trainer, module: Classifier, loader: DataLoader) -> dict[str, float]:
    """Top-1 and top-5 accuracy in percent."""
    (result,) = trainer.validate(module, loader, verbose=False)
    return {"top1": 100.0 * float(result["top1"]), "top5": 100.0 * float(result["top5"])}
