"""Models: packaged CIFAR ResNets score their published figures; checkpoints and weights API."""

from __future__ import annotations

import inspect
import os
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from hydra.utils import get_method
from omegaconf import OmegaConf
from torch import nn

from qaf.config import ConfigError
from qaf.data.cifar10 import embedded
from qaf.models import cifar_resnet, torchvision_models
from qaf.models.cifar_resnet import BasicBlock, ShortcutA

# Top-1 (%) of the packaged weights on the full CIFAR-10 test set: the upstream published figures.
PUBLISHED_TOP1 = {20: 91.73, 32: 92.63, 44: 93.10, 56: 93.39}


def top1(model: nn.Module, loader: torch.utils.data.DataLoader) -> float:
    """Top-1 accuracy in percent, rounded to 2 decimals as reported."""
    correct = total = 0
    with torch.no_grad():
        for x, y, _ in loader:
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    return round(100 * correct / total, 2)


@pytest.fixture(scope="module")
def eval_loader() -> torch.utils.data.DataLoader:
    return embedded(calib_samples=1, seed=0).eval_loader()


@pytest.mark.slow
@pytest.mark.parametrize("depth", [20, 32, 44, 56])  # a few seconds each on 10,000 images
def test_packaged_weights_score_published_top1(depth: int, eval_loader) -> None:
    model = cifar_resnet.build(depth=depth)
    assert not model.training
    assert len(eval_loader.dataset) == 10_000
    assert top1(model, eval_loader) == PUBLISHED_TOP1[depth]


@pytest.mark.parametrize("depth", sorted(cifar_resnet.PACKAGED))
def test_every_packaged_depth_loads_strictly(depth: int) -> None:
    model = cifar_resnet.build(depth=depth)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) + 1 == depth  # depth counts the convolutions and the classifier
    assert torch.isfinite(model(torch.randn(1, 3, 32, 32))).all()


def test_architecture_option_a_and_separate_relus() -> None:
    model = cifar_resnet.build(depth=20)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 9
    for block in blocks:
        assert isinstance(block.relu1, nn.ReLU) and isinstance(block.relu2, nn.ReLU)
        assert block.relu1 is not block.relu2
    # Option A: the two downsampling shortcuts have no parameters and zero-pad the new channels.
    shortcuts = [m for m in model.modules() if isinstance(m, ShortcutA)]
    assert len(shortcuts) == 2 and all(not list(s.parameters()) for s in shortcuts)
    x = torch.randn(2, 16, 8, 8)
    y = ShortcutA(32)(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert not y[:, :8].any() and not y[:, 24:].any()
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)


@pytest.mark.parametrize("depth", [18, 110, True])
def test_unsupported_depth_is_config_error(depth) -> None:
    with pytest.raises(ConfigError, match="model.depth"):
        cifar_resnet.build(depth=depth)


def test_checkpoint_path_with_or_without_wrapper_and_prefix(tmp_path: Path) -> None:
    reference = cifar_resnet.build(depth=20)
    # Perturb the weights so that loading the packaged file instead would be noticed.
    state = {k: v + 1 if v.is_floating_point() else v for k, v in reference.state_dict().items()}
    plain = tmp_path / "plain.pt"
    torch.save(state, plain)
    wrapped = tmp_path / "wrapped.th"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, wrapped)
    for path in (plain, wrapped):
        loaded = cifar_resnet.build(depth=20, checkpoint=str(path)).state_dict()
        assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_relative_checkpoint_path_resolves_from_cwd(tmp_path: Path, monkeypatch) -> None:
    state = cifar_resnet.build(depth=20).state_dict()
    state["conv1.weight"] = torch.full_like(state["conv1.weight"], 0.25)  # not the packaged weights
    torch.save(state, tmp_path / "w.pt")
    monkeypatch.chdir(tmp_path)
    model = cifar_resnet.build(depth=20, checkpoint="w.pt")
    assert torch.equal(model.conv1.weight, state["conv1.weight"])
    assert torch.equal(model.layer3[2].conv2.weight, state["layer3.2.conv2.weight"])


def test_missing_checkpoint_is_config_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.th"
    with pytest.raises(ConfigError, match="model.checkpoint") as err:
        cifar_resnet.build(depth=20, checkpoint=str(path))
    assert str(path) in str(err.value) and "accepted" in str(err.value)


@pytest.mark.parametrize("content", [b"", b"not a torch file \x00\x01" * 50])
def test_corrupt_checkpoint_is_config_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "corrupt.th"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="model.checkpoint") as err:
        cifar_resnet.build(depth=20, checkpoint=str(path))
    assert str(path) in str(err.value) and "accepted" in str(err.value)


def test_truncated_checkpoint_is_config_error(tmp_path: Path) -> None:
    whole = (cifar_resnet.ASSETS / cifar_resnet.PACKAGED[20]).read_bytes()
    path = tmp_path / "truncated.th"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ConfigError, match="model.checkpoint"):
        cifar_resnet.build(depth=20, checkpoint=str(path))


def test_checkpoint_of_other_depth_is_config_error() -> None:
    other = cifar_resnet.ASSETS / cifar_resnet.PACKAGED[32]
    with pytest.raises(ConfigError, match=r"model.checkpoint.*unexpected") as err:
        cifar_resnet.build(depth=20, checkpoint=str(other))
    assert str(other) in str(err.value)


def test_checkpoint_with_wrong_shapes_or_content_is_config_error(tmp_path: Path) -> None:
    state = cifar_resnet.build(depth=20).state_dict()
    state["linear.weight"] = torch.zeros(100, 64)
    bad_shape = tmp_path / "shape.pt"
    torch.save(state, bad_shape)
    with pytest.raises(ConfigError, match=r"model.checkpoint.*wrong shape.*linear.weight"):
        cifar_resnet.build(depth=20, checkpoint=str(bad_shape))
    not_a_state_dict = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), not_a_state_dict)
    with pytest.raises(ConfigError, match=r"model.checkpoint.*not a state_dict"):
        cifar_resnet.build(depth=20, checkpoint=str(not_a_state_dict))


@pytest.mark.parametrize("name", ["resnet20_cifar", "resnet18"])
def test_model_config_keys_are_builder_arguments(name: str) -> None:
    conf = Path(__file__).resolve().parents[1] / "conf" / "model" / f"{name}.yaml"
    cfg = OmegaConf.to_container(OmegaConf.load(conf))
    params = inspect.signature(get_method(cfg.pop("_target_"))).parameters
    assert set(cfg) <= set(params) and cfg["checkpoint"] is None


# --- torchvision models ------------------------------------------------------------------------

@pytest.fixture
def offline_torch_home(tmp_path: Path, monkeypatch) -> Path:
    """An empty TORCH_HOME where any download attempt fails as it would offline."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError(f"offline test: refusing to download {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return home


def _random_resnet18_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return torchvision.models.resnet18().state_dict()


def test_resnet18_pretrained_loads_from_torch_home_cache(offline_torch_home: Path) -> None:
    url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    cache = offline_torch_home / "hub" / "checkpoints" / os.path.basename(url)
    cache.parent.mkdir(parents=True)
    state = _random_resnet18_state(seed=1)
    torch.save(state, cache)
    torch.manual_seed(2)  # a random init would now differ from the cached weights
    model = torchvision_models.build(arch="resnet18", pretrained=True)
    assert not model.training and next(model.parameters()).device.type == "cpu"
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_resnet18_failed_download_is_config_error(offline_torch_home: Path) -> None:
    with pytest.raises(ConfigError, match="model.pretrained") as err:
        torchvision_models.build(arch="resnet18", pretrained=True)
    message = str(err.value)
    assert "model.checkpoint=PATH" in message and str(offline_torch_home) in message


def test_resnet18_corrupt_cached_weights_is_config_error(offline_torch_home: Path) -> None:
    url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    cache = offline_torch_home / "hub" / "checkpoints" / os.path.basename(url)
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"interrupted download")
    with pytest.raises(ConfigError, match="model.pretrained"):
        torchvision_models.build(arch="resnet18", pretrained=True)


def test_resnet18_checkpoint_overrides_pretrained(offline_torch_home: Path, tmp_path: Path) -> None:
    state = _random_resnet18_state(seed=3)
    path = tmp_path / "r18.pt"
    torch.save({"state_dict": state}, path)
    loaded = torchvision_models.build(arch="resnet18", pretrained=True, checkpoint=str(path)).state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_resnet18_random_init_needs_no_weights(offline_torch_home: Path) -> None:
    model = torchvision_models.build(arch="resnet18", pretrained=False)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_resnet18_bad_inputs_are_config_errors(offline_torch_home: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model.arch"):
        torchvision_models.build(arch="resnet19")
    with pytest.raises(ConfigError, match="model.pretrained"):
        torchvision_models.build(arch="resnet18", pretrained="yes")
    cifar_weights = cifar_resnet.ASSETS / cifar_resnet.PACKAGED[20]
    with pytest.raises(ConfigError, match=r"model.checkpoint.*resnet18"):
        torchvision_models.build(arch="resnet18", checkpoint=str(cifar_weights))
