"""Data sets for calibration and evaluation, returned by the builders named in ``conf/data/*.yaml``.

Builders (``qaf.data.cifar10.embedded``, ``qaf.data.cifar10.torchvision_cifar10``,
``qaf.data.imagenet.folders``) take ``calib_samples, eval_samples, batch_size, num_workers, seed``
(and ``root`` where it applies) and return a :class:`DataBundle`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from qaf.config import ConfigError

# The packaged CIFAR ResNets were trained with ImageNet statistics, so both data sets use them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DataBundle:
    """Calibration and evaluation data of one data set, with how to batch them.

    Attributes
    ----------
    name : str
        Data set name as in configs (``cifar10_embedded``, ``cifar10``, ``imagenet``).
    calib : Dataset
        Calibration samples ``(normalized CHW float tensor, int label)``.
    eval : Dataset
        Evaluation samples, same format.
    num_classes : int
        Number of classes of the labels.
    input_size : tuple[int, int, int]
        ``(C, H, W)`` of one image.
    batch_size : int
        Batch size of both loaders.
    num_workers : int
        DataLoader worker processes.
    """

    name: str
    calib: Dataset
    eval: Dataset
    num_classes: int
    input_size: tuple[int, int, int]
    batch_size: int
    num_workers: int

    def calib_loader(self) -> DataLoader:
        """Calibration batches in a fixed order (no shuffling)."""
        return self._loader(self.calib)

    def eval_loader(self) -> DataLoader:
        """Evaluation batches in a fixed order (no shuffling)."""
        return self._loader(self.eval)

    def _loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False,
                          num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                          drop_last=False)


def check_loader_options(calib_samples: int, eval_samples: int | None, batch_size: int,
                         num_workers: int) -> None:
    """Reject non-positive sample counts, batch sizes and negative worker counts.

    Parameters
    ----------
    calib_samples, eval_samples, batch_size, num_workers
        The ``data.*`` config values (``eval_samples`` may be None: all).

    Raises
    ------
    ConfigError
        Naming the first bad key and what it accepts.
    """
    for key, value, low in (("calib_samples", calib_samples, 1), ("batch_size", batch_size, 1),
                            ("num_workers", num_workers, 0)):
        if not _is_int(value) or value < low:
            raise ConfigError(f"data.{key}={value} is invalid: accepted an integer >= {low}")
    if eval_samples is not None and (not _is_int(eval_samples) or eval_samples < 1):
        raise ConfigError(f"data.eval_samples={eval_samples} is invalid: "
                          "accepted null (all) or an integer >= 1")


def calib_indices(available: int, samples: int, seed: int) -> np.ndarray:
    """Pick ``samples`` of ``available`` calibration items at random, reproducibly from ``seed``.

    Parameters
    ----------
    available : int
        Size of the calibration pool.
    samples : int
        How many to take (``data.calib_samples``).
    seed : int
        Random seed; a smaller ``samples`` with the same seed gives a prefix of the larger pick.

    Returns
    -------
    np.ndarray
        Distinct indices into the pool.

    Raises
    ------
    ConfigError
        If ``samples`` exceeds ``available``.
    """
    if samples > available:
        raise ConfigError(f"data.calib_samples={samples} is too large: accepted 1..{available}")
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randperm(available, generator=generator)[:samples].numpy()


def eval_indices(available: int, samples: int | None) -> np.ndarray:
    """Pick ``samples`` evaluation items spread evenly over the set (all when None).

    The pick does not depend on the seed, so runs with different seeds are scored on the same
    images, and it spans the whole set, so class-sorted sets (image folders) keep all classes.

    Parameters
    ----------
    available : int
        Size of the evaluation set.
    samples : int or None
        How many to take (``data.eval_samples``); None takes all.

    Returns
    -------
    np.ndarray
        Sorted distinct indices.

    Raises
    ------
    ConfigError
        If ``samples`` exceeds ``available``.
    """
    if samples is None:
        return np.arange(available)
    if samples > available:
        raise ConfigError(f"data.eval_samples={samples} is too large: accepted 1..{available} "
                          "or null (all)")
    return np.floor(np.arange(samples) * (available / samples)).astype(np.int64)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
