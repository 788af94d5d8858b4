"""CIFAR-10: the embedded default (ships in the package) and torchvision's CIFAR10 on disk."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset
from torchvision import datasets, transforms

from qaf.config import ConfigError
from qaf.data import (IMAGENET_MEAN, IMAGENET_STD, DataBundle, calib_indices, check_loader_options,
                      eval_indices)
from qaf.models.checkpoint import resolve_path

ASSETS = Path(__file__).resolve().parent / "assets"
# Official test images 0..845, lossless: the evaluation set.
EVAL_FILE = ASSETS / "test_lossless.npz"
# JPEG (q75) decodes of official test images 846..4941: calibration only, never evaluated on.
CALIB_FILE = ASSETS / "calib_jpeg_q75.npz"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
INPUT_SIZE = (3, 32, 32)


def cifar_transform() -> transforms.Compose:
    """ToTensor then Normalize with the statistics the packaged CIFAR ResNets were trained with."""
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class ArrayImages(Dataset):
    """Images held in memory, normalized once at construction.

    Parameters
    ----------
    images : np.ndarray
        uint8 ``(N, H, W, 3)`` RGB.
    labels : np.ndarray
        Integer labels ``(N,)``.
    test_index : np.ndarray
        Position of each image in the official CIFAR-10 test set (kept to prove disjointness).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, test_index: np.ndarray):
        # Same arithmetic as ToTensor + Normalize, done for the whole array at once.
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


def embedded(calib_samples: int = 2048, eval_samples: int | None = None, batch_size: int = 256,
             num_workers: int = 0, seed: int = 0) -> DataBundle:
    """The default data set: CIFAR-10 test images packaged with qaf (``data=cifar10_embedded``).

    Evaluation uses the 846 lossless test images; calibration uses JPEG copies of other test images
    (official test index >= 846), so the two never overlap.

    Parameters
    ----------
    calib_samples : int
        Calibration images, drawn at random (by ``seed``) from the packaged pool.
    eval_samples : int or None
        Evaluation images (None: all 846).
    batch_size, num_workers : int
        DataLoader settings.
    seed : int
        Seed of the calibration pick.

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
    with np.load(EVAL_FILE) as ev, np.load(CALIB_FILE) as ca:
        e_idx = eval_indices(len(ev["labels"]), eval_samples)
        c_idx = calib_indices(len(ca["labels"]), calib_samples, seed)
        eval_set = ArrayImages(ev["images"][e_idx], ev["labels"][e_idx], ev["test_index"][e_idx])
        calib_set = ArrayImages(ca["images"][c_idx], ca["labels"][c_idx], ca["test_index"][c_idx])
    overlap = np.intersect1d(eval_set.test_index, calib_set.test_index)
    if overlap.size:  # a packaging error, not a user error: refuse rather than report inflated accuracy
        raise RuntimeError(f"calibration and evaluation share test images {overlap[:5].tolist()}")
    return DataBundle("cifar10_embedded", calib_set, eval_set, len(CLASSES), INPUT_SIZE,
                      batch_size, num_workers)


def torchvision_cifar10(root: str | os.PathLike | None = None, calib_samples: int = 2048,
                        eval_samples: int | None = None, batch_size: int = 256,
                        num_workers: int = 4, seed: int = 0) -> DataBundle:
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
        Seed of the calibration pick.

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
    try:
        train = datasets.CIFAR10(str(path), train=True, download=False, transform=cifar_transform())
        test = datasets.CIFAR10(str(path), train=False, download=False, transform=cifar_transform())
    except RuntimeError as err:  # torchvision's "Dataset not found or corrupted"
        raise ConfigError(f"data.root={root}: no complete CIFAR-10 there ({err}); {layout}") from err
    calib_set = Subset(train, calib_indices(len(train), calib_samples, seed).tolist())
    eval_set = Subset(test, eval_indices(len(test), eval_samples).tolist())
    return DataBundle("cifar10", calib_set, eval_set, len(CLASSES), INPUT_SIZE, batch_size, num_workers)
