"""torchvision classification models (``model=resnet18``) from its weights API or a checkpoint."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
import torchvision
from torch import nn

from qaf.config import ConfigError, check_bool
from qaf.models.checkpoint import first_line, load_into, read_state_dict


def build(arch: str = "resnet18", pretrained: bool = True,
          checkpoint: str | os.PathLike | None = None) -> nn.Module:
    """Build a torchvision classification model.

    Parameters
    ----------
    arch : str
        A name from ``torchvision.models.list_models(torchvision.models)``, e.g. ``"resnet18"``.
    pretrained : bool
        Load torchvision's default weights (downloaded once and cached under
        ``$TORCH_HOME/hub/checkpoints``); False gives a randomly initialised model.
    checkpoint : str, PathLike or None
        A state_dict file (or ``{"state_dict": ...}``); when set it overrides ``pretrained``.

    Returns
    -------
    nn.Module
        The model in eval mode on the CPU.

    Raises
    ------
    ConfigError
        For an unknown ``arch``, a bad checkpoint, or pretrained weights that cannot be had.
    """
    known = torchvision.models.list_models(module=torchvision.models)
    if arch not in known:
        raise ConfigError(f"model.arch={arch} is invalid: accepted torchvision classification "
                          f"models, e.g. {', '.join(a for a in known if a.startswith('resnet'))}")
    check_bool("model.pretrained", pretrained)
    if checkpoint is not None:
        state = read_state_dict(checkpoint, key="model.checkpoint")
        model = torchvision.models.get_model(arch, weights=None)
        load_into(model, state, checkpoint, key="model.checkpoint", what=f"torchvision {arch}")
    elif pretrained:
        model = _pretrained(arch)
    else:
        model = torchvision.models.get_model(arch, weights=None)
    return model.eval()


def _pretrained(arch: str) -> nn.Module:
    """torchvision's default weights for ``arch``, turning any failure into a ``ConfigError``."""
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    try:
        return torchvision.models.get_model(arch, weights=weights)
    # Offline download (URLError is an OSError), or a truncated/corrupt file in the cache.
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise ConfigError(
            f"model.pretrained=true: cannot get {weights} from {weights.url} "
            f"({type(err).__name__}: {first_line(err)}); "
            f"put that file at {cached} (TORCH_HOME sets the cache), "
            f"or pass model.checkpoint=PATH, or model.pretrained=false"
        ) from err


def _basic_forward(self, x: torch.Tensor) -> torch.Tensor:
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu1(self.bn1(self.conv1(x)))
    return self.relu2(self.bn2(self.conv2(out)) + identity)


def _bottleneck_forward(self, x: torch.Tensor) -> torch.Tensor:
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu1(self.bn1(self.conv1(x)))
    out = self.relu2(self.bn2(self.conv2(out)))
    return self.relu3(self.bn3(self.conv3(out)) + identity)


_SPLIT = {
    torchvision.models.resnet.BasicBlock: (("relu1", "relu2"), _basic_forward),
    torchvision.models.resnet.Bottleneck: (("relu1", "relu2", "relu3"), _bottleneck_forward),
}


def split_shared_relus(model: nn.Module) -> int:
    """Give every torchvision ResNet block one ReLU module per call site, in place.

    torchvision's blocks call one ``relu`` module two or three times; a quantizer attached to a
    ReLU module must see one tensor. Each block gets ``relu1``, ``relu2`` (``relu3``) and the
    matching forward, exactly as the custom ResNet of LAPQ's reference code. Numerics and state
    dict are unchanged (ReLUs have no parameters).

    Parameters
    ----------
    model : nn.Module
        Any model; only torchvision ``BasicBlock``/``Bottleneck`` modules are changed.

    Returns
    -------
    int
        Number of blocks split.
    """
    count = 0
    for module in model.modules():
        split = _SPLIT.get(type(module))
        if split is None or "relu" not in module._modules:  # not a torchvision block, or split already
            continue
        names, forward = split
        for name in names:
            setattr(module, name, nn.ReLU(inplace=True))
        del module.relu
        module.forward = forward.__get__(module)
        count += 1
    return count


def relus_split(model: nn.Module) -> bool:
    """Whether :func:`split_shared_relus` changed some block of ``model``."""
    return any(type(m) in _SPLIT and "relu" not in m._modules for m in model.modules())
