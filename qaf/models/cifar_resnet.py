"""He et al. (2016) CIFAR-10 ResNets (depth 6n+2) with the parameter-free "option A" shortcut.

The layout and parameter names match the packaged weights (akamaster/pytorch_resnet_cifar10,
BSD-2-Clause, see ``assets/LICENSE.upstream``), so those load without renaming.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qaf.config import ConfigError, check_choice
from qaf.models.checkpoint import load_into, read_state_dict

ASSETS = Path(__file__).resolve().parent / "assets"
PACKAGED = {
    20: "resnet20-12fca82f.th",
    32: "resnet32-d509ac18.th",
    44: "resnet44-014dd654.th",
    56: "resnet56-4bfd9763.th",
}
WIDTHS = (16, 32, 64)
NUM_CLASSES = 10


class ShortcutA(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the channels, no parameters.

    Parameters
    ----------
    planes : int
        Output channels; ``planes // 4`` zero channels are added on each side.
    """

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """conv-bn-relu1-conv-bn, plus shortcut, then relu2.

    The two ReLUs are separate modules so that activation quantizers can be attached to each.

    Parameters
    ----------
    in_planes : int
        Input channels.
    planes : int
        Output channels.
    stride : int
        Stride of the first convolution (2 at the start of stages 2 and 3).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        downsample = stride != 1 or in_planes != planes
        self.shortcut: nn.Module = ShortcutA(planes) if downsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: stem, three stages of n blocks, global pool, linear.

    Parameters
    ----------
    depth : int
        Network depth; ``(depth - 2) / 6`` blocks per stage.
    num_classes : int
        Outputs of the classifier.
    """

    def __init__(self, depth: int = 20, num_classes: int = NUM_CLASSES):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ConfigError(f"model.depth={depth} is invalid: accepted 6n+2 with n >= 1")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, WIDTHS[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(WIDTHS[0])
        self.relu = nn.ReLU()
        in_planes = WIDTHS[0]
        stages = []
        for i, planes in enumerate(WIDTHS):
            stride = 1 if i == 0 else 2
            layers = []
            for b in range(blocks):
                layers.append(BasicBlock(in_planes, planes, stride if b == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(WIDTHS[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(torch.flatten(self.pool(out), 1))


def build(depth: int = 20, checkpoint: str | os.PathLike | None = None) -> CifarResNet:
    """Build a pretrained CIFAR-10 ResNet (the ``model=resnet20_cifar`` config).

    Parameters
    ----------
    depth : int
        20, 32, 44 or 56: the depths with packaged weights.
    checkpoint : str, PathLike or None
        Weights file to load; None loads the packaged weights for ``depth``.

    Returns
    -------
    CifarResNet
        The model in eval mode on the CPU.

    Raises
    ------
    ConfigError
        For an unsupported depth or a checkpoint that is missing, unreadable or does not fit.
    """
    check_choice("model.depth", depth, tuple(PACKAGED))
    path = ASSETS / PACKAGED[depth] if checkpoint is None else checkpoint
    state = read_state_dict(path, key="model.checkpoint")
    model = CifarResNet(depth)
    load_into(model, state, path, key="model.checkpoint", what=f"resnet{depth} (CIFAR)")
    return model.eval()
