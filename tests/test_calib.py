"""Calibration steps (BN re-estimation, activation observation) and evaluation through Lightning."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qaf import lit
from qaf.calib import observing_activations, recalibrating_bn, run_passes
from qaf.data import Indexed
from qaf.quant.modules import ActQuantizer


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, indexed: bool = False) -> DataLoader:
    dataset = TensorDataset(x, y)
    return DataLoader(Indexed(dataset) if indexed else dataset, batch_size=batch_size)


def test_bn_recalibration_is_the_average_of_batch_statistics_with_everything_else_in_eval():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4), nn.Dropout(0.9), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3)).eval()
    x = torch.randn(40, 3, 4, 4) * 3 + 1
    weight_before = model[1].weight.detach().clone()
    dropout_modes = []
    model[2].register_forward_hook(lambda m, i, o: dropout_modes.append(m.training))
    with recalibrating_bn(model):
        lit.calibration_pass(lit.make_trainer(accelerator="cpu"), model,
                             loader(x, torch.zeros(40, dtype=torch.long), batch_size=8))
    features = model[0](x).detach()
    batch_means = features.reshape(5, 8, 4, 4, 4).mean(dim=(1, 3, 4))  # per batch, per channel
    batch_vars = torch.stack([features[i * 8:(i + 1) * 8].transpose(0, 1).reshape(4, -1).var(dim=1)
                              for i in range(5)])
    # as BN's momentum=None: the plain average of the 5 batch statistics, not an EMA
    torch.testing.assert_close(model[1].running_mean, batch_means.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model[1].running_var, batch_vars.mean(0), rtol=1e-4, atol=1e-5)
    assert int(model[1].num_batches_tracked) == 5 and model[1].momentum == 0.1  # restored
    assert dropout_modes and not any(dropout_modes)  # dropout stayed in eval mode
    assert not model.training and not model[1].training
    torch.testing.assert_close(model[1].weight, weight_before)  # affine parameters untouched


def test_observers_fit_on_exit_and_skip_quantizers_with_a_grid():
    torch.manual_seed(0)
    free, fixed = ActQuantizer(4), ActQuantizer(4)
    fixed.mode = "observe"
    fixed(torch.randn(100))
    fixed.mode = "quant"
    grid = fixed.grid
    model = nn.Sequential(free, nn.Linear(5, 5), fixed)
    with observing_activations(model) as pending:
        assert pending == [free] and free.mode == "observe"
        run_passes(model, [(torch.randn(8, 5),)])
    assert free.mode == "quant" and free.grid is not None and fixed.grid is grid


def test_evaluate_records_per_image_top1_and_top5():
    logits = torch.tensor([[5.0, 1, 0, 0, 0, 0], [0, 5.0, 4, 3, 2, 1], [0, 1, 2, 3, 4, 5.0], [9.0, 0, 0, 0, 0, 1]])
    labels = torch.tensor([0, 2, 0, 5])
    # top-1 hits: row 0 only; top-5 hits: rows 0, 1, 3 (row 2's label 0 ranks 6th)
    result = lit.evaluate(lit.make_trainer(accelerator="cpu"), nn.Identity(), loader(logits, labels, 3, indexed=True))
    assert result.correct1.tolist() == [True, False, False, False]
    assert result.correct5.tolist() == [True, True, False, True]
    assert (result.top1, result.top5) == (25.0, 75.0)


def test_float_resnet20_keeps_its_accuracy_after_bn_reestimation_with_the_training_transform():
    # The packaged weights' BN statistics come from augmented training batches: re-estimating them
    # the same way (default protocol) must not cost accuracy; on the evaluation transform it costs
    # 2.7 points on the full test set (docs/results.md). Paired, on 2,000 test images, statistics
    # from 512 training images.
    from qaf.data.cifar10 import embedded
    from qaf.models.cifar_resnet import build

    data = embedded(calib_samples=512, seed=42, eval_samples=2000)
    trainer = lit.make_trainer(accelerator="cpu")
    model = build(20)
    before = lit.evaluate(trainer, model, data.eval_loader()).top1
    with recalibrating_bn(model):
        lit.calibration_pass(trainer, model, data.bn_loader())
    after = lit.evaluate(trainer, model, data.eval_loader()).top1
    assert abs(after - before) <= 0.5, (before, after)
