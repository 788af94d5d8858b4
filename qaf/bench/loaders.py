"""The ImageNet input path: images/s of ``data=imagenet``'s evaluation and calibration loaders.

On the real ILSVRC2012 validation JPEGs of ``../shared/data/imagenet_val_1300`` (``--imagenet-root``;
their ``val/`` also stands in for ``train/``, which the calibration pool needs), batch 64: images/s
of the evaluation loader (Resize 256, CenterCrop 224) and of the calibration loader under the
training transform (RandomResizedCrop 224 and flip, what BN re-estimation sees) for 0, 1 and 2
loader workers, with both decoders (``data.decoder``: ``torchvision.io`` and uint8 tensor
transforms, or PIL); whether the two decoders give the same tensors; what persistent workers would
save per pass; with CUDA, pinned against pageable memory for the copy to the GPU. Each pass builds
its loader as a run does (worker start-up included) and stops after 20 s.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from qaf.data import IMAGENET_STD, DataBundle, ShardedBatchSampler, usable_cores
from qaf.data.imagenet import DECODERS, folders

WORKERS = (0, 1, 2)
#: The loaders timed: the evaluation set, and the calibration pool under the training transform.
LOADERS = ("eval", "calib_train")
BATCH = 64
#: A pass stops after this many seconds (a slow setting on a busy machine would take minutes).
MAX_PASS_S = 20.0


def passes(bundle: DataBundle, loader: str) -> DataLoader:
    """The loader a run builds for ``loader`` (``eval`` or ``calib_train``)."""
    return bundle.eval_loader() if loader == "eval" else bundle.calib_loader("train")


def images_per_second(loader: DataLoader, device: torch.device | None = None) -> float:
    """Images/s of a pass over ``loader``, stopped after :data:`MAX_PASS_S` (at least one batch).

    With ``device``, each batch is also copied there (``non_blocking``, as Lightning does).
    """
    images, start = 0, time.perf_counter()
    for batch in loader:
        if device is not None:
            batch[0].to(device, non_blocking=True)
        images += len(batch[0])
        if time.perf_counter() - start > MAX_PASS_S:
            break
    if device is not None:
        torch.cuda.synchronize(device)
    return images / (time.perf_counter() - start)


def decoder_agreement(bundles: dict[str, DataBundle]) -> dict[str, dict[str, float]]:
    """How far the ``torchvision`` decoder's tensors are from the ``pil`` ones, per transform.

    Returns
    -------
    dict
        Per loader: ``max_steps`` (largest difference in 1/255 steps of a pixel) and
        ``pixels_differing`` (fraction of pixel values that differ).
    """
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    result = {}
    for loader in LOADERS:
        worst, differing, total = 0.0, 0, 0
        tv, pil = (passes(dataclasses.replace(bundles[d], num_workers=max(WORKERS)), loader)
                   for d in ("torchvision", "pil"))
        for (a, *_), (b, *_) in zip(tv, pil):
            steps = ((a - b).abs() * std * 255).round()  # back to pixel values before normalization
            worst = max(worst, steps.max().item())
            differing, total = differing + int((steps > 0).sum()), total + a.numel()
        result[loader] = {"max_steps": worst, "pixels_differing": differing / total}
    return result


def variant(dataset: Dataset, workers: int, **options) -> DataLoader:
    """A run's loader of ``dataset`` (fixed batches of :data:`BATCH`) with other DataLoader ``options``."""
    return DataLoader(dataset, batch_sampler=ShardedBatchSampler(len(dataset), BATCH),  # type: ignore[arg-type]
                      num_workers=workers, **options)


def persistent_saving(dataset: Dataset, workers: int) -> dict[str, float]:
    """Seconds of a second pass over one loader with persistent workers, against a fresh loader's pass."""
    kept = variant(dataset, workers, persistent_workers=True)
    for _ in kept:
        pass
    start = time.perf_counter()
    for _ in kept:
        pass
    second = time.perf_counter() - start
    start = time.perf_counter()
    for _ in variant(dataset, workers):
        pass
    return {"workers": workers, "fresh_pass_s": time.perf_counter() - start, "persistent_second_pass_s": second}


def loader_figures(args: argparse.Namespace) -> dict:
    """Print the loader table and return its figures (``{"skipped": reason}`` without the images)."""
    root = Path(args.imagenet_root)
    if not (root / "val").is_dir():
        print(f"loaders: skipped, no ImageNet images at {root}/val (--imagenet-root, QAF_SHARED_DATA)")
        return {"skipped": f"no images at {root}/val"}
    load_before = os.getloadavg()
    cores = usable_cores()
    with tempfile.TemporaryDirectory() as tmp:
        for split in ("train", "val"):  # the shipped copy has val/ only: it doubles as the pool
            (Path(tmp) / split).symlink_to((root / "val").resolve())
        available = len(folders(root=tmp, calib_samples=1, num_workers=0).eval)
        n = min(available, 320) if args.quick else available
        bundles = {decoder: folders(root=tmp, calib_samples=n, eval_samples=n, batch_size=BATCH, num_workers=0,
                                    seed=0, decoder=decoder) for decoder in DECODERS}
        print(f"loaders: data=imagenet, {n} JPEGs of {root}/val (also the calibration pool), batch {BATCH}, "
              f"{cores} CPU cores, load average {load_before[0]:.1f} before")
        rates: dict[str, dict[str, dict[int, float]]] = {d: {loader: {} for loader in LOADERS} for d in DECODERS}
        for workers in WORKERS:  # the decoders side by side, so that load from other processes hits both
            for decoder, bundle in bundles.items():
                sized = dataclasses.replace(bundle, num_workers=workers)
                for loader in LOADERS:
                    rates[decoder][loader][workers] = images_per_second(passes(sized, loader))
        print(f"{'images/s':28s}" + "".join(f"{f'{w} workers':>12s}" for w in WORKERS))
        for decoder in DECODERS:
            for loader in LOADERS:
                print(f"{decoder:12s} {loader:15s}" + "".join(f"{rates[decoder][loader][w]:12.0f}" for w in WORKERS))
        agreement = decoder_agreement(bundles)
        for loader, figures in agreement.items():
            print(f"torchvision vs pil, {loader:12s} max {figures['max_steps']:.0f}/255, "
                  f"{100 * figures['pixels_differing']:.3f} % of pixel values differ")
        persistent = persistent_saving(bundles["torchvision"].eval_loader().dataset, max(WORKERS))
        print(f"persistent workers ({persistent['workers']}, eval): a fresh loader's pass "
              f"{persistent['fresh_pass_s']:.2f} s, a persistent loader's second pass "
              f"{persistent['persistent_second_pass_s']:.2f} s")
        pinned = None
        if torch.cuda.is_available():
            device = torch.device("cuda")
            dataset = bundles["torchvision"].eval_loader().dataset
            pinned = {str(pin): images_per_second(variant(dataset, max(WORKERS), pin_memory=pin), device)
                      for pin in (False, True)}
            print(f"copy to {device}: pageable {pinned['False']:.0f} images/s, pinned {pinned['True']:.0f} images/s")
    load_after = os.getloadavg()
    print(f"load average {load_after[0]:.1f} after")
    return {"images": n, "batch": BATCH, "cores": cores, "load_avg_before": load_before, "load_avg_after": load_after,
            "images_per_s": {d: {loader: {str(w): r for w, r in by_w.items()} for loader, by_w in by_loader.items()}
                             for d, by_loader in rates.items()},
            "decoder_agreement": agreement, "persistent_workers": persistent, "pin_memory_images_per_s": pinned}
