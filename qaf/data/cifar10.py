"""CIFAR-10: the embedded default (ships in the package) and torchvision's CIFAR10 on disk."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset
from torchvision import datasets, transforms

from qaf.config import ConfigError
from qaf.data import IMAGENET_MEAN, IMAGENET_STD, DataBundle, check_loader_options, eval_indices
from qaf.models.checkpoint import resolve_path

ASSETS = Path(__file__).resolve().parent / "assets"
# All 10,000 official test images, lossless, in the official test_batch order: evaluation only.
TEST_FILE = ASSETS / "cifar10_test.npz"
# 10,000 lossless training images (1,000 per class): the calibration / fine-tuning pool.
TRAIN_FILE = ASSETS / "cifar10_train_10k.npz"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
INPUT_SIZE = (3, 32, 32)
PAD = 4  # the training augmentation of the packaged ResNets: 4-pixel zero padding, random 32x32 crop


def cifar_transforms(tensor_input: bool) -> dict[str, transforms.Compose]:
    """The ``train`` and ``eval`` transforms of the packaged CIFAR ResNets.

    Parameters
    ----------
    tensor_input : bool
        Images arrive as uint8 CHW tensors (embedded arrays) rather than PIL images.

    Returns
    -------
    dict
        ``eval``: to float in [0, 1], normalize. ``train``: random crop of the image zero-padded
        by 4 pixels (padding in pixel space, before normalization) and a horizontal flip, then
        the same.
    """
    to_float = transforms.ConvertImageDtype(torch.float32) if tensor_input else transforms.ToTensor()
    tail = [to_float, transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    augment = [transforms.RandomCrop(32, padding=PAD, fill=0), transforms.RandomHorizontalFlip()]
    return {"eval": transforms.Compose(tail), "train": transforms.Compose(augment + tail)}


class ArrayImages(Dataset):
    """Images held in memory as uint8 CHW tensors: ``(image, label)`` before any transform.

    Parameters
    ----------
    images : np.ndarray
        uint8 ``(N, H, W, 3)`` RGB.
    labels : np.ndarray
        Integer labels ``(N,)``.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images = torch.tensor(images).permute(0, 3, 1, 2).contiguous()
        self.labels = [int(v) for v in labels]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], self.labels[i]


class NormalizedImages(Dataset):
    """Evaluation images normalized once at construction (``eval`` transform, vectorised).

    Parameters
    ----------
    images : np.ndarray
        uint8 ``(N, H, W, 3)`` RGB.
    labels : np.ndarray
        Integer labels ``(N,)``.
    test_index : np.ndarray
        Position of each image in the official CIFAR-10 test set.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, test_index: np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.images = x.sub(mean).div(std).contiguous()
        self.labels = [int(v) for v in labels]
        self.test_index = np.asarray(test_index)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], self.labels[i]


def packaged_arrays() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The packaged test and training arrays, read-only.

    Decompressed once per process and file version (a one-process sweep builds every job's data):
    a file that changes on disk (its size or modification time) is read again.

    Returns
    -------
    tuple of dict
        The arrays of ``TEST_FILE`` and of ``TRAIN_FILE``, by name.
    """
    return _read_arrays(tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in (TEST_FILE, TRAIN_FILE)))


@functools.lru_cache(maxsize=1)
def _read_arrays(files: tuple[tuple[str, int, int], ...]) -> tuple[dict[str, np.ndarray], ...]:
    out = []
    for path, _, _ in files:
        with np.load(path) as npz:
            arrays = {name: npz[name] for name in npz.files}
        for array in arrays.values():
            array.setflags(write=False)  # shared by every bundle of the process
        out.append(arrays)
    return tuple(out)


def embedded(calib_samples: int = 2048, eval_samples: int | None = None, batch_size: int = 256,
             num_workers: int = 0, seed: int = 0, bn_transform: str = "train",
             calib_transform: str = "eval") -> DataBundle:
    """The default data set, packaged with qaf (``data=cifar10_embedded``).

    Evaluation on the full official CIFAR-10 test set (10,000 lossless images, official order);
    calibration and fine-tuning on 10,000 lossless training images (1,000 per class).

    Parameters
    ----------
    calib_samples : int
        Calibration images, the first of a seeded permutation of the training pool.
    eval_samples : int or None
        Evaluation images (None: all 10,000; N: N images spread over the set).
    batch_size, num_workers : int
        DataLoader settings.
    seed : int
        Seed of the calibration pick and of the training augmentation.
    bn_transform, calib_transform : {"train", "eval"}
        Transform of batch-norm re-estimation and of the other calibration passes.

    Returns
    -------
    DataBundle
        ``name="cifar10_embedded"``, 10 classes, input ``(3, 32, 32)``.

    Raises
    ------
    ConfigError
        For bad counts, e.g. more calibration images than packaged.
    """
    check_loader_options(calib_samples, eval_samples, batch_size, num_workers)
    test, train = packaged_arrays()
    idx = eval_indices(len(test["labels"]), eval_samples)
    eval_set = NormalizedImages(test["images"][idx], test["labels"][idx], test["test_index"][idx])
    pool = ArrayImages(train["images"], train["labels"])
    return DataBundle("cifar10_embedded", pool, eval_set, cifar_transforms(tensor_input=True), len(CLASSES),
                      INPUT_SIZE, calib_samples, seed, batch_size, num_workers, bn_transform, calib_transform)


def torchvision_cifar10(root: str | os.PathLike | None = None, calib_samples: int = 2048,
                        eval_samples: int | None = None, batch_size: int = 256,
                        num_workers: int = 4, seed: int = 0, bn_transform: str = "train",
                        calib_transform: str = "eval") -> DataBundle:
    """torchvision's CIFAR10 on disk (``data=cifar10``): train split calibrates, test split evaluates.

    Parameters
    ----------
    root : str, PathLike or None
        Folder holding ``cifar-10-batches-py/`` (the official python archive, extracted).
        Nothing is downloaded.
    calib_samples : int
        Calibration images drawn at random (by ``seed``) from the 50,000 training images.
    eval_samples : int or None
        Evaluation images from the 10,000 test images (None: all).
    batch_size, num_workers : int
        DataLoader settings.
    seed : int
        Seed of the calibration pick and of the training augmentation.
    bn_transform, calib_transform : {"train", "eval"}
        Transform of batch-norm re-estimation and of the other calibration passes.

    Returns
    -------
    DataBundle
        ``name="cifar10"``, 10 classes, input ``(3, 32, 32)``.

    Raises
    ------
    ConfigError
        If ``root`` is unset, missing or lacks the data set, or for bad counts.
    """
    check_loader_options(calib_samples, eval_samples, batch_size, num_workers)
    layout = "accepted: a folder containing cifar-10-batches-py/ (the extracted python version)"
    if root is None:
        raise ConfigError(f"data.root is not set: pass data.root=PATH; {layout}")
    path = resolve_path(root)
    if not path.is_dir():
        raise ConfigError(f"data.root={root}: no such folder ({path}); {layout}")
    tfs = cifar_transforms(tensor_input=False)
    try:
        train = datasets.CIFAR10(str(path), train=True, download=False)  # PIL images: the bundle transforms
        test = datasets.CIFAR10(str(path), train=False, download=False, transform=tfs["eval"])
    except RuntimeError as err:  # torchvision's "Dataset not found or corrupted"
        raise ConfigError(f"data.root={root}: no complete CIFAR-10 there ({err}); {layout}") from err
    eval_set = Subset(test, eval_indices(len(test), eval_samples).tolist())
    return DataBundle("cifar10", train, eval_set, tfs, len(CLASSES), INPUT_SIZE, calib_samples,
                      seed, batch_size, num_workers, bn_transform, calib_transform)
