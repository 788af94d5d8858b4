"""Data: embedded CIFAR-10 split and preprocessing, torchvision CIFAR10, ImageNet class folders."""

from __future__ import annotations

import inspect
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
import torchvision.datasets.cifar
from hydra.utils import get_method
from omegaconf import OmegaConf

from qaf.config import ConfigError
from qaf.data import DataBundle, eval_indices
from qaf.data import cifar10, imagenet

SHARED = Path(os.environ.get("QAF_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
IMAGENET_SUBSET = SHARED / "imagenet_val_1300"
needs_imagenet_subset = pytest.mark.skipif(
    not (IMAGENET_SUBSET / "val").is_dir(),
    reason=f"shared ImageNet subset not found at {IMAGENET_SUBSET} (set QAF_SHARED_DATA)",
)


CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.mark.parametrize("name", ["cifar10_embedded", "cifar10", "imagenet"])
def test_data_config_keys_are_builder_arguments(name: str) -> None:
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "data" / f"{name}.yaml"), resolve=False)
    builder = get_method(cfg.pop("_target_"))
    params = inspect.signature(builder).parameters
    assert set(cfg) <= set(params)
    assert {"calib_samples", "eval_samples", "batch_size", "num_workers", "seed"} <= set(cfg)
    assert cfg["seed"] == "${seed}" and cfg["calib_samples"] == 2048 and cfg["eval_samples"] is None


# --- embedded CIFAR-10 ---------------------------------------------------------------------------

def test_embedded_defaults_and_shapes() -> None:
    bundle = cifar10.embedded(seed=0)
    assert isinstance(bundle, DataBundle)
    assert (bundle.name, bundle.num_classes, bundle.input_size) == ("cifar10_embedded", 10, (3, 32, 32))
    assert len(bundle.eval) == 846 and len(bundle.calib) == 2048
    x, y = bundle.eval[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)


def test_embedded_calibration_and_evaluation_are_disjoint() -> None:
    bundle = cifar10.embedded(calib_samples=4096, seed=0)
    assert sorted(bundle.eval.test_index.tolist()) == list(range(846))
    assert bundle.calib.test_index.min() >= 846
    assert len(set(bundle.calib.test_index.tolist())) == 4096
    assert not set(bundle.calib.test_index.tolist()) & set(bundle.eval.test_index.tolist())


def test_embedded_calibration_pick_follows_seed() -> None:
    a = cifar10.embedded(calib_samples=256, seed=1).calib.test_index
    b = cifar10.embedded(calib_samples=256, seed=1).calib.test_index
    c = cifar10.embedded(calib_samples=256, seed=2).calib.test_index
    larger = cifar10.embedded(calib_samples=512, seed=1).calib.test_index
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(larger[:256], a)  # more samples extend, not reshuffle, the pick


def test_embedded_preprocessing_matches_totensor_normalize() -> None:
    bundle = cifar10.embedded(calib_samples=8, eval_samples=8, seed=0)
    with np.load(cifar10.EVAL_FILE) as raw:
        pil = Image.fromarray(raw["images"][0])
        label = int(raw["labels"][0])
    expected = cifar10.cifar_transform()(pil)
    x, y = bundle.eval[0]
    assert y == label
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)


def test_embedded_calibration_labels_fit_the_images() -> None:
    # The JPEG copies cost ResNet-20 about 10 points (README: ~82 %); misaligned labels give ~10 %.
    from qaf.models.cifar_resnet import build

    bundle = cifar10.embedded(calib_samples=512, seed=0)
    model = build(depth=20)
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in bundle.calib_loader())
    assert 0.75 < correct / 512 < 0.90


def test_loaders_are_deterministic_and_unshuffled() -> None:
    bundle = cifar10.embedded(calib_samples=300, eval_samples=100, batch_size=64, seed=0)
    loader = bundle.eval_loader()
    first = [y for _, y in loader]
    second = [y for _, y in bundle.eval_loader()]
    assert [len(y) for y in first] == [64, 36]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert torch.equal(torch.cat(first), torch.tensor([bundle.eval[i][1] for i in range(100)]))
    assert sum(len(y) for _, y in bundle.calib_loader()) == 300


def test_eval_subset_spans_the_set() -> None:
    picked = eval_indices(846, 100)
    assert len(set(picked.tolist())) == 100 and picked[0] == 0 and picked[-1] > 830
    assert np.array_equal(eval_indices(5, None), np.arange(5))


@pytest.mark.parametrize("kwargs, key", [
    ({"calib_samples": 4097}, "data.calib_samples"),
    ({"calib_samples": 0}, "data.calib_samples"),
    ({"eval_samples": 847}, "data.eval_samples"),
    ({"eval_samples": 0}, "data.eval_samples"),
    ({"batch_size": 0}, "data.batch_size"),
    ({"num_workers": -1}, "data.num_workers"),
])
def test_embedded_bad_counts_are_config_errors(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        cifar10.embedded(**{"seed": 0, **kwargs})


def test_embedded_too_many_calibration_samples_names_the_maximum() -> None:
    with pytest.raises(ConfigError, match=r"data.calib_samples=5000 .*1\.\.4096"):
        cifar10.embedded(calib_samples=5000, seed=0)


# --- torchvision CIFAR10 on disk -----------------------------------------------------------------

def _fake_cifar_root(root: Path) -> None:
    """Write the python-version batch files with tiny contents; train labels 0..4, test 5..9."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [5 + i % 5 for i in range(20)] if name == "test_batch" else [i % 5 for i in range(20)]
        data = rng.integers(0, 256, (20, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(cifar10.CLASSES)}, f)


def test_torchvision_cifar10_uses_train_for_calibration_and_test_for_evaluation(
        tmp_path: Path, monkeypatch) -> None:
    _fake_cifar_root(tmp_path)
    # The real check compares md5 sums of the official files; these stand-ins cannot pass it.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity",
                        lambda path, md5=None: os.path.isfile(path))
    bundle = cifar10.torchvision_cifar10(root=str(tmp_path), calib_samples=30, eval_samples=None,
                                         batch_size=8, num_workers=0, seed=0)
    assert (bundle.name, len(bundle.calib), len(bundle.eval)) == ("cifar10", 30, 20)
    assert {y for _, y in bundle.calib} <= set(range(5))
    assert {y for _, y in bundle.eval} == set(range(5, 10))
    x, _ = next(iter(bundle.eval_loader()))
    assert x.shape == (8, 3, 32, 32)


def test_torchvision_cifar10_root_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.root is not set"):
        cifar10.torchvision_cifar10(root=None)
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match=r"data.root=.*nowhere.*cifar-10-batches-py"):
        cifar10.torchvision_cifar10(root=str(missing))
    with pytest.raises(ConfigError, match=r"data.root=.*cifar-10-batches-py"):
        cifar10.torchvision_cifar10(root=str(tmp_path))  # exists, but holds no data set


# --- ImageNet class folders ----------------------------------------------------------------------

def test_wnid_list_is_canonical() -> None:
    names = imagenet.class_names()
    assert len(names) == 1000 and len({w for w, _ in names}) == 1000
    assert names[0] == ("n01440764", "tench, Tinca tinca")
    assert [w for w, _ in names] == sorted(w for w, _ in names)  # torchvision order = sorted WNIDs
    assert imagenet.wnid_to_index()["n15075141"] == 999


@needs_imagenet_subset
def test_imagenet_subset_labels_match_ground_truth() -> None:
    bundle = imagenet.folders(root=str(IMAGENET_SUBSET), calib_split="val", calib_samples=8,
                              num_workers=0, seed=0)
    folder = bundle.eval.dataset
    assert (bundle.num_classes, bundle.input_size, len(bundle.eval)) == (1000, (3, 224, 224), 1300)
    assert len(folder.classes) == 725  # a subset: numbering the folders present would be wrong
    # Ground truth of all 50,000 val images, "ILSVRC2012_val_XXXXXXXX.JPEG <class index>".
    truth_file = IMAGENET_SUBSET / "val_full50k_caffe_labels.txt"
    truth = dict(line.split() for line in truth_file.read_text().splitlines())
    labels = [(Path(p).name, y) for p, y in folder.samples]
    assert all(int(truth[name]) == y for name, y in labels)
    positional = {c: i for i, c in enumerate(folder.classes)}
    assert sum(positional[Path(p).parent.name] != y for p, y in folder.samples) > 1000
    x, y = bundle.eval[0]
    assert x.shape == (3, 224, 224) and y == int(truth[labels[0][0]])


@needs_imagenet_subset
def test_imagenet_calibrates_on_train_split(tmp_path: Path) -> None:
    (tmp_path / "train").symlink_to(IMAGENET_SUBSET / "val")
    (tmp_path / "val").symlink_to(IMAGENET_SUBSET / "val")
    bundle = imagenet.folders(root=str(tmp_path), calib_samples=32, eval_samples=50,
                              batch_size=16, num_workers=0, seed=0)
    assert len(bundle.calib) == 32 and len(bundle.eval) == 50
    assert Path(bundle.calib.dataset.root).name == "train"
    # Evenly spread eval subset reaches the last classes, not only the first folders.
    assert bundle.eval.dataset.targets[bundle.eval.indices[-1]] > 900
    x, y = next(iter(bundle.calib_loader()))
    assert x.shape == (16, 3, 224, 224) and y.dtype == torch.int64


@needs_imagenet_subset
def test_imagenet_missing_train_split_is_config_error() -> None:
    with pytest.raises(ConfigError, match=r"data.root=.*train.*data.calib_split=val"):
        imagenet.folders(root=str(IMAGENET_SUBSET))


def test_imagenet_root_and_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.root is not set"):
        imagenet.folders(root=None)
    with pytest.raises(ConfigError, match=r"data.root=.*val"):
        imagenet.folders(root=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="data.calib_split"):
        imagenet.folders(root=str(tmp_path), calib_split="test")
    (tmp_path / "val" / "cats").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"data.root.*not ImageNet WNIDs.*cats"):
        imagenet.folders(root=str(tmp_path), calib_split="val")


def test_imagenet_empty_split_is_config_error(tmp_path: Path) -> None:
    (tmp_path / "val" / "n01440764").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no images under"):
        imagenet.folders(root=str(tmp_path), calib_split="val")
