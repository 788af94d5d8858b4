"""Batch-norm calibration and evaluation through the Lightning module."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qaf import lit


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def test_bn_calibration_is_a_cumulative_average_with_everything_else_in_eval():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4), nn.Dropout(0.9), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3)).eval()
    x = torch.randn(40, 3, 4, 4) * 3 + 1
    weight_before = model[1].weight.detach().clone()
    trainer = lit.make_trainer(accelerator="cpu", progress=False)
    module = lit.Classifier(model, num_classes=3)
    dropout_modes = []
    model[2].register_forward_hook(lambda m, i, o: dropout_modes.append(m.training))

    lit.calibrate_bn(trainer, module, loader(x, torch.zeros(40, dtype=torch.long), batch_size=8))

    features = model[0](x).detach()
    batch_means = features.reshape(5, 8, 4, 4, 4).mean(dim=(1, 3, 4))  # per batch, per channel
    batch_vars = torch.stack([features[i * 8:(i + 1) * 8].transpose(0, 1).reshape(4, -1).var(dim=1)
                              for i in range(5)])
    # momentum=None: the plain average of the 5 batch statistics, not an EMA
    torch.testing.assert_close(model[1].running_mean, batch_means.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model[1].running_var, batch_vars.mean(0), rtol=1e-4, atol=1e-5)
    assert model[1].momentum == 0.1  # restored
    assert not any(dropout_modes)  # dropout stayed in eval mode during calibration
    assert not model.training and not model[1].training
    torch.testing.assert_close(model[1].weight, weight_before)  # affine parameters untouched
    assert all(p.grad is None for p in model.parameters())


def test_evaluate_reports_top1_and_top5_in_percent():
    logits = torch.tensor([[5.0, 1, 0, 0, 0, 0], [0, 5.0, 4, 3, 2, 1], [0, 1, 2, 3, 4, 5.0], [9.0, 0, 0, 0, 0, 1]])
    labels = torch.tensor([0, 2, 0, 5])
    # top-1 hits: rows 0 only -> 25%; top-5 hits: rows 0, 1, 3 (row 2's label 0 ranks 6th) -> 75%
    model = nn.Identity()
    trainer = lit.make_trainer(accelerator="cpu", progress=False)
    scores = lit.evaluate(trainer, lit.Classifier(model, num_classes=6), loader(logits, labels, batch_size=3))
    assert scores == {"top1": 25.0, "top5": 75.0}
