"""Data sets for calibration and evaluation, returned by the builders named in ``conf/data/*.yaml``.

Builders (``qaf.data.cifar10.embedded``, ``qaf.data.cifar10.torchvision_cifar10``,
``qaf.data.imagenet.folders``) return a :class:`DataBundle`: a *pool* of training images (never
evaluated on) with two transforms, and an evaluation set.

- ``train``: the augmentation the model was trained with (CIFAR: 4-pixel zero-padded random crop
  and flip; ImageNet: RandomResizedCrop 224 and flip). Batch-norm statistics were estimated on
  such batches, so re-estimating them on anything else shifts them (``data.bn_transform``).
- ``eval``: what the model sees at inference; activation observers, clip searches and
  loss-aware searches use it (``data.calib_transform``).

Random transforms are seeded per image (from the seed, the epoch and the image's pool index), so
a calibration pass gives the same tensors whatever the batch size, worker count or rank.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from qaf.config import ConfigError, check_choice, check_int

# The packaged CIFAR ResNets were trained with ImageNet statistics, so both data sets use them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRANSFORMS = ("train", "eval")


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one image of one epoch (hash, so neighbouring seeds do not correlate)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class SeededTransform(Dataset):
    """Apply ``transform`` to ``base[i]`` under a torch RNG seeded by (seed, epoch, i).

    Parameters
    ----------
    base : Dataset
        Items ``(image, label)`` before any transform (uint8 tensor or PIL image).
    transform : callable
        torchvision-style transform; its randomness draws from torch's global RNG, which is
        forked and seeded for each item, so the caller's RNG state is untouched.
    seed : int
        Run seed.
    epoch : int
        Pass number (fine-tuning sees fresh augmentations every epoch).
    """

    def __init__(self, base: Dataset, transform: Callable, seed: int, epoch: int = 0):
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, epoch

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[i]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed(self.seed, self.epoch, i))
            return self.transform(image), int(label)


class Indexed(Dataset):
    """``(x, y, i)``: each item with its index, so per-image results can be gathered across ranks."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        x, y = self.base[i]
        return x, y, i


class ShardedBatchSampler(Sampler[list[int]]):
    """Consecutive batches of ``range(n)``, batch ``b`` going to rank ``b % world``.

    Every rank sees whole batches of the single-process run (no image dropped, none repeated,
    same batch composition), so batch statistics and per-batch observations are identical to a
    single process. The rank is read when iteration starts (after DDP has been set up).

    Parameters
    ----------
    n : int
        Dataset length.
    batch_size : int
        Images per batch.
    """

    def __init__(self, n: int, batch_size: int):
        self.n, self.batch_size = n, batch_size

    @staticmethod
    def rank_world() -> tuple[int, int]:
        """This process's rank and the world size (0, 1 without torch.distributed)."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def batches(self) -> list[int]:
        """Global indices of the batches this rank runs."""
        rank, world = self.rank_world()
        return list(range(rank, math.ceil(self.n / self.batch_size), world))

    def __iter__(self) -> Iterator[list[int]]:
        for b in self.batches():
            yield list(range(b * self.batch_size, min((b + 1) * self.batch_size, self.n)))

    def __len__(self) -> int:
        return len(self.batches())


def global_batch_index(local_index: int) -> int:
    """The single-process batch number of this rank's ``local_index``-th batch."""
    rank, world = ShardedBatchSampler.rank_world()
    return local_index * world + rank


@dataclass
class DataBundle:
    """Calibration pool and evaluation set of one data set, with how to batch them.

    Attributes
    ----------
    name : str
        Data set name as in configs (``cifar10_embedded``, ``cifar10``, ``imagenet``).
    pool : Dataset
        Training images ``(untransformed image, label)``: calibration and fine-tuning draw from
        it, never from the evaluation set.
    eval : Dataset
        Evaluation samples ``(normalized CHW float tensor, label)``.
    transforms : dict
        ``{"train": ..., "eval": ...}`` applied to pool images.
    num_classes : int
        Number of classes.
    input_size : tuple[int, int, int]
        ``(C, H, W)`` of one image.
    calib_samples : int
        Calibration images (``data.calib_samples``), the first of the seeded pool order.
    seed : int
        Seed of the pool order and of the random transforms.
    batch_size, num_workers : int
        DataLoader settings.
    bn_transform, calib_transform : str
        Transform of batch-norm re-estimation and of every other calibration pass.
    calib_split : str
        The split the pool comes from (``train``; ImageNet may knowingly use ``val``).
    """

    name: str
    pool: Dataset
    eval: Dataset
    transforms: dict[str, Callable]
    num_classes: int
    input_size: tuple[int, int, int]
    calib_samples: int
    seed: int
    batch_size: int
    num_workers: int
    bn_transform: str = "train"
    calib_transform: str = "eval"
    calib_split: str = "train"
    order: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_choice("data.bn_transform", self.bn_transform, TRANSFORMS)
        check_choice("data.calib_transform", self.calib_transform, TRANSFORMS)
        self.order = pool_order(len(self.pool), self.calib_samples, self.seed)  # type: ignore[arg-type]

    def calib(self, transform: str | None = None, samples: int | None = None, epoch: int = 0) -> Dataset:
        """The first ``samples`` pool images (default ``calib_samples``) under ``transform``.

        A smaller count is a prefix of a larger one, and an image gets the same augmentation
        whichever subset it is in (seeded by its pool index).
        """
        transform = transform or self.calib_transform
        check_choice("transform", transform, TRANSFORMS)
        samples = self.calib_samples if samples is None else samples
        if samples > len(self.order):
            raise ConfigError(f"{samples} calibration images asked for: the pool has {len(self.order)}")
        view = SeededTransform(self.pool, self.transforms[transform], self.seed, epoch)
        return Subset(view, self.order[:samples].tolist())

    def calib_loader(self, transform: str | None = None) -> DataLoader:
        """Calibration batches (``calib_transform`` by default), fixed order, sharded by rank."""
        return self.loader(self.calib(transform))

    def bn_loader(self) -> DataLoader:
        """Batches for batch-norm re-estimation (``bn_transform``)."""
        return self.calib_loader(self.bn_transform)

    def eval_loader(self) -> DataLoader:
        """Evaluation batches ``(x, y, index)``, fixed order, sharded by rank."""
        return self.loader(Indexed(self.eval))

    def loader(self, dataset: Dataset) -> DataLoader:
        """Fixed batches of ``dataset`` in order, whole batches sharded by rank."""
        return DataLoader(dataset, batch_sampler=ShardedBatchSampler(len(dataset), self.batch_size),  # type: ignore[arg-type]
                          num_workers=self.num_workers, pin_memory=torch.cuda.is_available())

    def protocol(self) -> dict[str, Any]:
        """What the data side of the calibration protocol was (recorded in metrics.json)."""
        return {"calib_samples": self.calib_samples, "calib_split": self.calib_split,
                "bn_transform": self.bn_transform, "calib_transform": self.calib_transform,
                "eval_samples": len(self.eval)}  # type: ignore[arg-type]


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
    check_int("data.calib_samples", calib_samples, 1)
    check_int("data.batch_size", batch_size, 1)
    check_int("data.num_workers", num_workers, 0)
    check_int("data.eval_samples", eval_samples, 1, nullable=True)


def pool_order(available: int, samples: int, seed: int) -> np.ndarray:
    """A seeded permutation of the pool; calibration takes its first ``samples`` entries.

    Parameters
    ----------
    available : int
        Size of the calibration pool.
    samples : int
        How many will be taken (``data.calib_samples``).
    seed : int
        Random seed; a smaller ``samples`` with the same seed gives a prefix of the larger pick.

    Returns
    -------
    np.ndarray
        The permutation of ``range(available)``.

    Raises
    ------
    ConfigError
        If ``samples`` exceeds ``available``.
    """
    if samples > available:
        raise ConfigError(f"data.calib_samples={samples} is too large: accepted 1..{available}")
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randperm(available, generator=generator).numpy()


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
