"""Benchmarks (``make bench``, ``python -m qaf.bench``): one module per subject.

- :mod:`qaf.bench.solvers`: ALS against tensorly and its FLOP bound, AO-ADMM per outer iteration,
  the whole ResNet-18 ``admm_epc`` (``--resnet18-solver``);
- :mod:`qaf.bench.lapq`: LAPQ's calibration-loss evaluations per second, incremental and whole;
- :mod:`qaf.bench.latency`: onnxruntime images/s of float / PTQ / CP / QSWD models and the PyTorch
  CP evaluation ratio (docs/export.md).

Every figure is printed and written to ``bench.json`` at the repo root (``--out``).
"""

from __future__ import annotations

import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def per_iteration(run, few: int, many: int) -> float:
    """Seconds per iteration as ``(t(many) - t(few)) / (many - few)`` (set-up cost cancels)."""
    return max(timed(lambda: run(many)) - timed(lambda: run(few)), 0.0) / (many - few)
