"""Benchmarks (``make bench``, ``python -m qaf.bench``): one module per subject.

- :mod:`qaf.bench.solvers`: ALS against tensorly and its FLOP bound, AO-ADMM per outer iteration,
  the whole ResNet-18 ``admm_epc`` (``--resnet18-solver``);
- :mod:`qaf.bench.paper_grid`: every factorization of the paper's ResNet-18 table (``--paper-grid``);
- :mod:`qaf.bench.lapq`: LAPQ's calibration-loss evaluations per second, incremental and whole;
- :mod:`qaf.bench.latency`: onnxruntime images/s of float / PTQ / CP / QSWD models and the PyTorch
  CP evaluation ratio (docs/export.md);
- :mod:`qaf.bench.loaders`: images/s of ``data=imagenet``'s loaders by worker count and decoder
  (docs/sweeps.md, "Input pipeline").

Every figure is printed and written to ``bench.json`` at the repo root (``--out``).
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
#: Real models and images kept beside the checkout (README of ../shared/data); QAF_SHARED_DATA overrides.
SHARED_DATA = Path(os.environ.get("QAF_SHARED_DATA", ROOT.parent / "shared" / "data"))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def per_iteration(run, few: int, many: int) -> float:
    """Seconds per iteration as ``(t(many) - t(few)) / (many - few)`` (set-up cost cancels)."""
    return max(timed(lambda: run(many)) - timed(lambda: run(few)), 0.0) / (many - few)


def peak_mem_gb(device: torch.device) -> float:
    """Peak resident memory of this process (GB), or the peak CUDA allocation when larger."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB -> GiB
    if device.type == "cuda":
        peak = max(peak, torch.cuda.max_memory_allocated(device) / 1024**3)
    return peak
