"""ImageNet (ILSVRC2012) from class folders, labelled by the canonical 1000-WNID list."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from torch.utils.data import Subset
from torchvision import datasets, transforms

from qaf.config import ConfigError
from qaf.data import IMAGENET_MEAN, IMAGENET_STD, DataBundle, check_loader_options, eval_indices
from qaf.models.checkpoint import resolve_path

# One line per class, "<wnid> <words>", in the canonical (torchvision / Caffe) order: line i is class i.
WNID_FILE = Path(__file__).resolve().parent / "assets" / "imagenet_wnids.txt"
INPUT_SIZE = (3, 224, 224)
SPLITS = ("train", "val")


@lru_cache(maxsize=1)
def class_names() -> tuple[tuple[str, str], ...]:
    """The 1000 ImageNet classes in canonical order.

    Returns
    -------
    tuple[tuple[str, str], ...]
        ``(wnid, words)`` per class; class index i is entry i.
    """
    lines = WNID_FILE.read_text().splitlines()
    return tuple((wnid, words) for wnid, _, words in (line.partition(" ") for line in lines))


def wnid_to_index() -> dict[str, int]:
    """Map each WNID (e.g. ``n01440764``) to its canonical class index 0..999."""
    return {wnid: i for i, (wnid, _) in enumerate(class_names())}


def imagenet_transforms() -> dict[str, transforms.Compose]:
    """The standard ImageNet transforms.

    Returns
    -------
    dict
        ``eval``: Resize 256, CenterCrop 224, normalize. ``train``: RandomResizedCrop 224 and a
        horizontal flip, normalize (what torchvision's models were trained with).
    """
    tail = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return {
        "eval": transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), *tail]),
        "train": transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), *tail]),
    }


class WnidFolder(datasets.ImageFolder):
    """``ImageFolder`` whose labels are canonical ImageNet indices, not folder positions.

    ``ImageFolder`` numbers only the folders present, so a subset of the classes would be
    mislabelled; here folder ``<wnid>`` always gets its index in the 1000-class list.

    Parameters
    ----------
    root : str
        A split folder with one sub-folder per WNID.
    transform : callable or None
        Applied to each PIL image (None: PIL images are returned).
    """

    def __init__(self, root: str, transform: transforms.Compose | None):
        super().__init__(root, transform=transform, allow_empty=True)

    def find_classes(self, directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        canonical = wnid_to_index()
        folders = sorted(e.name for e in os.scandir(directory) if e.is_dir())
        unknown = [f for f in folders if f not in canonical]
        if unknown:
            raise ConfigError(
                f"data.root: {directory} has folders that are not ImageNet WNIDs "
                f"({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}); "
                "accepted: one folder per class named by its WNID, e.g. n01440764/"
            )
        return folders, {f: canonical[f] for f in folders}


def folders(root: str | os.PathLike | None = None, calib_samples: int = 2048,
            eval_samples: int | None = None, batch_size: int = 64, num_workers: int = 4,
            seed: int = 0, calib_split: str = "train", bn_transform: str = "train",
            calib_transform: str = "eval") -> DataBundle:
    """ImageNet from ``root/train/<wnid>/*`` and ``root/val/<wnid>/*`` (``data=imagenet``).

    Parameters
    ----------
    root : str, PathLike or None
        Folder holding ``val/`` (evaluation) and ``train/`` (calibration); any subset of the
        1000 class folders may be present.
    calib_samples : int
        Calibration images drawn at random (by ``seed``) from ``calib_split``.
    eval_samples : int or None
        Evaluation images from ``val/``, spread over all of it (None: all).
    batch_size, num_workers : int
        DataLoader settings.
    seed : int
        Seed of the calibration pick and of the training augmentation.
    calib_split : str
        ``"train"``, or ``"val"`` to calibrate on validation images (they then overlap the
        evaluation images: only for a knowingly optimistic setup or a val-only copy).
    bn_transform, calib_transform : {"train", "eval"}
        Transform of batch-norm re-estimation and of the other calibration passes.

    Returns
    -------
    DataBundle
        ``name="imagenet"``, 1000 classes, input ``(3, 224, 224)``.

    Raises
    ------
    ConfigError
        If ``root`` is unset or lacks a needed split, a folder is not a WNID, or counts are bad.
    """
    check_loader_options(calib_samples, eval_samples, batch_size, num_workers)
    if calib_split not in SPLITS:
        raise ConfigError(f"data.calib_split={calib_split} is invalid: accepted {', '.join(SPLITS)}")
    layout = ("accepted: a folder with val/<wnid>/*.JPEG for evaluation and "
              f"{calib_split}/<wnid>/*.JPEG for calibration")
    if root is None:
        raise ConfigError(f"data.root is not set: pass data.root=PATH; {layout}")
    path = resolve_path(root)
    for split in dict.fromkeys(("val", calib_split)):
        if not (path / split).is_dir():
            hint = " (or set data.calib_split=val to calibrate on val/)" if split == "train" else ""
            raise ConfigError(f"data.root={root}: {path / split} is missing; {layout}{hint}")
    tfs = imagenet_transforms()
    evaluation = WnidFolder(str(path / "val"), tfs["eval"])
    pool = WnidFolder(str(path / calib_split), None)  # PIL images: the bundle applies its transforms
    for split, dataset in (("val", evaluation), (calib_split, pool)):
        if not len(dataset):
            raise ConfigError(f"data.root={root}: no images under {path / split}; {layout}")
    eval_set = Subset(evaluation, eval_indices(len(evaluation), eval_samples).tolist())
    return DataBundle("imagenet", pool, eval_set, tfs, len(class_names()), INPUT_SIZE, calib_samples, seed,
                      batch_size, num_workers, bn_transform, calib_transform, calib_split)
