"""LAPQ's calibration loss: evaluations per second on the embedded default.

``method=lapq bits=4 act_bits=4`` on ResNet-20 (reference policy, 34 clips, 512 calibration images),
on the solvers' device, from the max-abs clips. The points imitate Powell's first iteration, which
dominates LAPQ's cost: each evaluation moves one clip, each clip in turn. Timed twice on the same
points: incremental (``method.reuse_blocks=true``, :mod:`qaf.quant.incremental`) and with the model run
whole at every evaluation (``method.reuse_blocks=false``, the slow path); the losses must agree bit for bit.
"""

from __future__ import annotations

import time

import numpy as np
import torch

#: Whole-model evaluations timed (they cost the same whichever clip changed).
WHOLE = 6


def one_clip_at_a_time(alphas: np.ndarray) -> list[np.ndarray]:
    """Points moving each clip in turn by 2 %, keeping the clips moved before."""
    out, current = [], alphas.copy()
    for i in range(alphas.size):
        current = current.copy()
        current[i] *= 0.98
        out.append(current)
    return out


def lapq_figures(device: torch.device) -> dict:
    """Loss evaluations per second, incremental and whole, and the memory the incremental pass keeps."""
    from qaf.export.rerun import compose
    from qaf.pipeline import setup

    job = setup(compose("method=lapq", "bits=4", "act_bits=4", "logger=none", "progress=false",
                        f"device={device.type}"))
    method, model = job.method, job.model
    layers, slots, batches, samples = method.prepare(model, job.ctx)
    alphas = method.clips(layers, slots, samples, None)
    points = one_clip_at_a_time(alphas)
    step = max(1, len(points) // WHOLE)
    images = sum(len(y) for _, y in batches)
    figures, losses = {}, {}
    for reuse, sequence in ((True, points), (False, points[::step])):
        method.reuse_blocks = reuse
        loss = method.objective(model, layers, slots, batches)
        loss(alphas)  # the first evaluation runs the whole model either way
        start = time.perf_counter()
        losses[reuse] = [loss(a) for a in sequence]
        if device.type == "cuda":
            torch.cuda.synchronize()
        figures["evals_per_s" if reuse else "whole_evals_per_s"] = len(sequence) / (time.perf_counter() - start)
        if reuse:
            figures["kept_mb"] = loss.forward.kept_bytes() / 1e6
    figures["identical"] = losses[False] == losses[True][::step]
    figures["speedup"] = figures["evals_per_s"] / figures["whole_evals_per_s"]
    print(f"lapq loss           {figures['evals_per_s']:8.2f} evals/s incremental, "
          f"{figures['whole_evals_per_s']:.2f} whole ({figures['speedup']:.2f}x; ResNet-20 W4A4, "
          f"{alphas.size} clips, {images} images; kept "
          f"{figures['kept_mb']:.0f} MB; same losses: {figures['identical']})")
    return {"lapq": figures}
