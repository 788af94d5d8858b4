"""End-to-end fine-tuning by knowledge distillation, a pipeline step any method may use (``finetune=kd``).

The compressed model (student) learns to match the float model (teacher) on the calibration split
(training images, training transform, fresh augmentations every epoch): KL divergence between
temperature-scaled softmaxes (times T^2), plus an optional cross-entropy on the labels. Rounding
passes gradients straight through (weights, activations, QSWD codes); quantization grids, CP
ranks and sparsity patterns stay fixed. Batch-norm statistics are frozen during training (the
pipeline re-estimates them afterwards); their affine parameters, biases and float layers train.
AdamW with a cosine schedule to zero; deterministic for a given seed.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from qaf.calib import BN_TYPES
from qaf.config import check_options, option
from qaf.data import DataBundle
from qaf.quant.modules import QuantLayer


@dataclass
class Distillation:
    """Knowledge-distillation fine-tuning options (``conf/finetune/kd.yaml``).

    Parameters
    ----------
    steps : int
        Optimizer steps.
    lr : float
        AdamW peak learning rate (cosine decay to 0 over ``steps``).
    weight_decay : float
        AdamW weight decay.
    batch_size : int
        Images per step.
    samples : int
        Training images used (the first of the pool's seeded order, so the calibration images are
        among them).
    temperature : float
        Softmax temperature of the distillation term.
    label_weight : float
        Weight of the cross-entropy on labels (0: distillation only).
    """

    steps: int = option(1000, low=1)
    lr: float = option(1e-4, low=0, low_open=True)
    weight_decay: float = option(0.0, low=0)
    batch_size: int = option(128, low=1)
    samples: int = option(10000, low=1)
    temperature: float = option(4.0, low=0, low_open=True)
    label_weight: float = option(0.0, low=0)

    def __post_init__(self) -> None:
        check_options(self, "finetune")

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (for metrics.json)."""
        return asdict(self)

    def run(self, student: nn.Module, teacher: nn.Module, data: DataBundle, trainer: pl.Trainer) -> dict[str, Any]:
        """Fine-tune ``student`` in place; returns a summary (steps, losses, seconds).

        Parameters
        ----------
        student : nn.Module
            The compressed model, calibrated (activation grids fitted).
        teacher : nn.Module
            The float model (not modified).
        data : DataBundle
            Source of the training images (never the evaluation images).
        trainer : pl.Trainer
            A trainer with ``max_steps`` set (see :func:`make_trainer`).
        """
        start = time.perf_counter()
        dataset = data.calib("train", samples=self.samples)
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, shuffle=True,
                                             drop_last=len(dataset) > self.batch_size,
                                             generator=torch.Generator().manual_seed(data.seed),
                                             num_workers=data.num_workers)
        module = _Distiller(student, teacher, self)
        layers = [m for m in student.modules() if isinstance(m, QuantLayer)]
        for layer in layers:
            layer.train_weight(True)
        try:
            trainer.fit(module, loader)
        finally:
            for layer in layers:
                layer.train_weight(False)
            student.eval()
        return {**self.as_dict(), "first_loss": module.first_loss, "last_loss": module.last_loss,
                "seconds": round(time.perf_counter() - start, 3)}


def make_trainer(steps: int, **trainer_kw: Any) -> pl.Trainer:
    """A Trainer for fine-tuning: ``steps`` optimizer steps, no checkpoints, no validation."""
    return pl.Trainer(max_steps=steps, max_epochs=-1, enable_checkpointing=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_val_batches=0, deterministic=True, **trainer_kw)


class _Distiller(pl.LightningModule):
    def __init__(self, student: nn.Module, teacher: nn.Module, options: Distillation):
        super().__init__()
        self.student = student
        self.teacher = copy.deepcopy(teacher).eval().requires_grad_(False)
        self.options = options
        self.first_loss: float | None = None
        self.last_loss: float | None = None

    def on_train_epoch_start(self) -> None:
        self.teacher.eval()
        for module in self.student.modules():
            if isinstance(module, BN_TYPES):
                module.eval()  # statistics frozen; re-estimated after fine-tuning
        dataset = self.trainer.train_dataloader.dataset
        dataset.dataset.epoch = self.current_epoch  # fresh augmentations every epoch

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        t = self.options.temperature
        with torch.no_grad():
            target = F.log_softmax(self.teacher(images) / t, dim=1)
        logits = self.student(images)
        loss = F.kl_div(F.log_softmax(logits / t, dim=1), target, log_target=True, reduction="batchmean") * t * t
        if self.options.label_weight:
            loss = loss + self.options.label_weight * F.cross_entropy(logits, labels)
        value = float(loss.detach())
        self.first_loss = value if self.first_loss is None else self.first_loss
        self.last_loss = value
        self.log("finetune_loss", loss, prog_bar=True, on_step=True)
        return loss

    def configure_optimizers(self) -> Any:
        params = [p for p in self.student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.options.lr, weight_decay=self.options.weight_decay)
        steps = self.options.steps
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
