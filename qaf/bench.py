"""``python -m qaf.bench [--quick] [--only solvers|latency]``: solver speed and model latency (``make bench``).

Solvers, on the solvers' device:

- seconds per ALS sweep of :func:`qaf.decomp.cp_als` and of tensorly's ``parafac`` on a
  512 x 512 x 9 tensor at rank 1141 (ResNet-18's largest layer at rate 2), and their ratio;
- the FLOP bound of one ALS sweep (3 MTTKRPs, 3 Gram updates, 3 Cholesky factorizations and
  the triangular solves) at the float32 matmul rate measured in the same run;
- seconds per AO-ADMM outer iteration on the same tensor (default inner budget);
- with ``--resnet18-solver`` (default with CUDA): the whole ResNet-18 ``admm_epc`` (random-init
  torchvision weights, rate 2, 4 bits, the budgets of ``conf/cp_solver/default.yaml``, no cache),
  which takes far more than 10 minutes on a 2-core CPU.

Latency (docs/export.md): float, PTQ W8A8 / W4A8, CP rate 2 / 3 W4A8 and QSWD models of
ResNet-20 (32x32) and ResNet-18 (224x224, random weights, tiny solver budgets: only shapes matter)
exported to ONNX with Q/DQ nodes and run by onnxruntime on the CPU, batch 1 and 64, median
images/s next to %BOPs, as a Markdown table; and the PyTorch evaluation throughput of the rate-2
W4A8 CP ResNet-20 relative to the float model.

Writes everything to ``bench.json`` at the repo root. ``--quick``: fewer sweeps and repeats,
ResNet-20 only, onnxruntime's default optimization level only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qaf.decomp.admm import cp_admm
from qaf.decomp.cp import cp_als, init_factors

ROOT = Path(__file__).resolve().parents[1]
SHAPE, RANK = (512, 512, 9), 1141


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def per_iteration(run, few: int, many: int) -> float:
    """Seconds per iteration as ``(t(many) - t(few)) / (many - few)`` (set-up cost cancels)."""
    return max(_timed(lambda: run(many)) - _timed(lambda: run(few)), 0.0) / (many - few)


def matmul_rate(device: torch.device) -> float:
    """Measured float32 GEMM rate (FLOP/s) on the MTTKRP's shape, best of 3."""
    i, j, k = SHAPE
    a = torch.randn(i * k, j, device=device)
    b = torch.randn(j, RANK, device=device)
    a @ b
    best = min(_timed(lambda: (a @ b).sum().item()) for _ in range(3))
    return 2.0 * i * j * k * RANK / best


def als_flops() -> float:
    """FLOPs of one ALS sweep: MTTKRPs, Grams, Cholesky factorizations, triangular solves."""
    i, j, k = SHAPE
    r = RANK
    mttkrp = 3 * 2.0 * i * j * k * r
    grams = sum(2.0 * n * r * r for n in SHAPE)
    chol = 3 * r**3 / 3.0
    solves = sum(2.0 * n * r * r for n in SHAPE)  # forward + backward substitution, n RHS each
    return mttkrp + grams + chol + solves


def resnet18_admm_epc(device: torch.device) -> tuple[float, list[dict]]:
    """Seconds for ``admm_epc`` on a random-init ResNet-18 with the config's default budgets."""
    import torchvision
    from omegaconf import OmegaConf

    from qaf.export.rerun import compose
    from qaf.methods.base import CompressContext
    from qaf.methods.cp import ADMMEPC
    from qaf.quant.policy import LayerPolicy

    cfg = compose("method=admm_epc", "model=resnet18")
    opts = OmegaConf.to_container(cfg.method, resolve=True)
    opts.pop("_target_")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    method = ADMMEPC(bits=4, act_bits=8, rate=2.0, **opts)
    ctx = CompressContext(data=None, device=device, policy=LayerPolicy.from_config(cfg.policy), cache=None, seed=0,
                          progress=True)
    start = time.perf_counter()
    reports = method.compress(model, ctx)
    return time.perf_counter() - start, reports


def solver_figures(args: argparse.Namespace, device: torch.device) -> dict:
    """ALS / tensorly / FLOP bound / ADMM figures (and the ResNet-18 ``admm_epc`` run when asked)."""
    print(f"device {device}, {torch.get_num_threads()} threads, tensor {SHAPE} rank {RANK}")
    gen = torch.Generator().manual_seed(0)
    tensor = torch.randn(*SHAPE, generator=gen).to(device)
    start = init_factors(tensor, RANK, "random", torch.Generator().manual_seed(1))

    few, many = (1, 2) if args.quick else (1, 4)
    als = per_iteration(lambda n: cp_als(tensor, RANK, n_iter=n, tol=0.0, init=list(start)), few, many)
    print(f"ALS (ours)          {als:8.3f} s/iter")

    import tensorly as tl
    from tensorly.decomposition import parafac

    tl.set_backend("numpy")
    arr = tensor.cpu().numpy()
    tly = per_iteration(
        lambda n: parafac(arr, RANK, n_iter_max=n, init="random", tol=0.0, random_state=0), 1, 2
    )
    print(f"ALS (tensorly)      {tly:8.3f} s/iter   speed-up {tly / max(als, 1e-12):6.1f}x")

    rate = matmul_rate(device)
    bound = als_flops() / rate
    print(f"FLOP bound          {bound:8.3f} s/iter   ({als_flops() / 1e9:.1f} GFLOP at "
          f"{rate / 1e9:.1f} GFLOP/s; ours / bound {als / bound:5.2f})")

    from qaf.quant.uniform import make_grid

    admm = per_iteration(
        lambda n: cp_admm(tensor, list(start), lambda x: make_grid(x, 4), max_outer=n, max_inner=10,
                          patience=10**6),
        1, 2 if args.quick else 3,
    )
    print(f"ADMM outer iter     {admm:8.3f} s/iter")

    resnet_s = None
    if args.resnet18_solver and not args.quick:
        resnet_s, reports = resnet18_admm_epc(device)
        print(f"ResNet-18 admm_epc  {resnet_s:8.1f} s ({len(reports)} layers)")
    return {"als_s_per_iter": als, "tensorly_s_per_iter": tly, "gemm_bound_s_per_iter": bound,
            "admm_s_per_outer_iter": admm, "resnet18_admm_epc_s": resnet_s}


# ------------------------------------------------------------------------------ latency table
#: The compressed variants timed, as run.py overrides (bits / act_bits / rate as in their names).
VARIANTS = {
    "float": ["method=fp32"],
    "PTQ W8A8": ["method=ptq", "bits=8", "act_bits=8"],
    "PTQ W4A8": ["method=ptq", "bits=4", "act_bits=8"],
    "CP rate 2 W4A8": ["method=cpd", "bits=4", "act_bits=8", "rate=2"],
    "CP rate 3 W4A8": ["method=cpd", "bits=4", "act_bits=8", "rate=3"],
    "QSWD W8A8": ["method=qswd", "finetune=none", "bits=4", "act_bits=8"],
}
#: Per architecture: model overrides, input size, and solver budgets (timing depends on shapes only;
#: the ResNet-18 runs factorize random weights with tiny budgets and calibrate on CIFAR images).
ARCHS = {
    "ResNet-20": {"overrides": ["model=resnet20_cifar"], "input": (3, 32, 32),
                  "budgets": {"cpd": [], "qswd": ["method.max_iter=30"]}},
    "ResNet-18": {"overrides": ["model=resnet18", "model.pretrained=false"], "input": (3, 224, 224),
                  "budgets": {"cpd": ["method.als_iters=1"], "qswd": ["method.max_iter=2", "method.init=random"]}},
}
BATCHES = (1, 64)


def build_variant(arch: str, variant: str, cache_dir: str) -> torch.nn.Module:
    """The compressed (calibrated) model of one table row, through the pipeline's own stages."""
    from qaf.export.rerun import compose, compressed_model

    overrides = list(VARIANTS[variant])
    method = overrides[0].split("=", 1)[1]
    overrides += ARCHS[arch]["overrides"] + ARCHS[arch]["budgets"].get(method, [])
    cfg = compose(*overrides, "data.calib_samples=64", "data.eval_samples=64", f"cache.dir={cache_dir}",
                  "logger=none", "device=cpu", "progress=false")
    model, _ = compressed_model(cfg)
    return model


def interleaved_images_per_second(runs: dict[str, Any], batch: int, min_time: float, max_rounds: int,
                                  min_rounds: int = 3) -> dict[str, float]:
    """``batch`` / median seconds per call of each ``runs[k]()``, measured in interleaved rounds.

    Each round calls every run in turn (a few consecutive calls when one is shorter than 50 ms,
    averaged), so a burst of load from other processes hits all of them alike; rounds continue
    until each run has had ``min_time`` seconds (at least ``min_rounds``, at most ``max_rounds``).
    """
    inner = {}
    for key, run in runs.items():
        run()  # warm-up (allocations, kernel selection)
        inner[key] = max(1, int(0.05 / max(_timed(run), 1e-6)))
    times: dict[str, list[float]] = {key: [] for key in runs}
    start = time.perf_counter()
    while len(times[next(iter(runs))]) < max_rounds:
        for key, run in runs.items():
            t0 = time.perf_counter()
            for _ in range(inner[key]):
                run()
            times[key].append((time.perf_counter() - t0) / inner[key])
        rounds = len(times[key])
        if rounds >= min_rounds and time.perf_counter() - start >= min_time * len(runs):
            break
    return {key: batch / float(np.median(t)) for key, t in times.items()}


def pytorch_ratio(float_model: torch.nn.Module, model: torch.nn.Module, repeats: int) -> dict:
    """PyTorch evaluation throughput (images/s, batches of 256 test images) of both, and the ratio."""
    from qaf.data.cifar10 import embedded
    from qaf.decomp import layers

    images = embedded(eval_samples=1024).eval.images
    batches = [images[i:i + 256] for i in range(0, len(images), 256)]

    @torch.no_grad()
    def evaluate(m: torch.nn.Module) -> None:
        for x in batches:
            m(x)

    out: dict = {"images": len(images), "batch": 256, "repeats": repeats, "threads": torch.get_num_threads()}
    for label, channels_last in (("", True), ("_plain_path", False)):
        layers.CHANNELS_LAST_ON_CPU = channels_last
        try:
            evaluate(float_model), evaluate(model)
            t_float, t_model = [], []
            for _ in range(repeats):  # interleaved, so that load changes hit both alike
                t_float.append(_timed(lambda: evaluate(float_model)))
                t_model.append(_timed(lambda: evaluate(model)))
        finally:
            layers.CHANNELS_LAST_ON_CPU = True
        out[f"float_images_per_s{label}"] = len(images) / float(np.median(t_float))
        out[f"cp_images_per_s{label}"] = len(images) / float(np.median(t_model))
        out[f"ratio{label}"] = float(np.median(t_float) / np.median(t_model))
        # Best of the repeats: the least disturbed by other processes on a shared machine.
        out[f"ratio_best{label}"] = float(min(t_float) / min(t_model))
    return out


def latency_table(args: argparse.Namespace) -> dict:
    """onnxruntime images/s of float / PTQ / CP / QSWD ResNet-20 and ResNet-18, and the PyTorch ratio."""
    import tempfile

    import onnxruntime

    from qaf.export.onnx import export_onnx, session
    from qaf.metrics import bops as cost
    from qaf.metrics.size import size_bytes

    archs = ["ResNet-20"] if args.quick else list(ARCHS)
    levels = args.ort_levels.split(",")
    min_time, max_rounds = (0.3, 20) if args.quick else (1.5, 200)
    cache_dir = str(ROOT / "multirun_outputs" / ".cache")
    threads = torch.get_num_threads()
    rows, models = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            shape = ARCHS[arch]["input"]
            fp32_macs = None
            paths, arch_rows = {}, {}
            for variant in VARIANTS:
                start = time.perf_counter()
                model = build_variant(arch, variant, cache_dir)
                costs = cost.layer_costs(model, shape)
                if fp32_macs is None:
                    fp32_macs = cost.total_macs(costs)
                paths[variant] = Path(tmp) / f"{arch}_{variant.replace(' ', '_')}.onnx"
                export_onnx(model, paths[variant], input_size=shape)
                arch_rows[variant] = {
                    "model": arch, "variant": variant, "input": list(shape),
                    "bops_pct": cost.bops_pct(cost.total_bops(costs), fp32_macs), "macs": cost.total_macs(costs),
                    "size_bytes": size_bytes(model), "onnx_bytes": paths[variant].stat().st_size,
                    "build_s": round(time.perf_counter() - start, 1)}
                if arch == "ResNet-20" and variant in ("float", "CP rate 2 W4A8"):
                    models[variant] = model
            for level in levels:  # all variants timed together, interleaved (see interleaved_images_per_second)
                sessions = {v: session(path, threads=threads, level=level) for v, path in paths.items()}
                for batch in BATCHES:
                    x = np.random.default_rng(0).standard_normal((batch, *shape), dtype=np.float32)
                    runs = {v: (lambda s=s: s.run(None, {"input": x})) for v, s in sessions.items()}
                    for v, ips in interleaved_images_per_second(runs, batch, min_time, max_rounds).items():
                        arch_rows[v][f"ort_{level}_b{batch}"] = ips
                del sessions
            for row in arch_rows.values():
                rows.append(row)
                print(f"  {arch:9s} {row['variant']:15s} %BOPs {row['bops_pct']:7.3f}  " + "  ".join(
                    f"{k} {v:8.1f}" for k, v in row.items() if k.startswith("ort_")) +
                    f"  ({row['build_s']:.0f} s build)", flush=True)
    ratio = pytorch_ratio(models["float"], models["CP rate 2 W4A8"], repeats=3 if args.quick else 5)
    table = markdown_table(rows, levels)
    print()
    print(table)
    print()
    print(f"PyTorch evaluation, ResNet-20 CP rate 2 W4A8 vs float ({ratio['images']} images, batches of 256, "
          f"{threads} threads): {ratio['cp_images_per_s']:.0f} vs {ratio['float_images_per_s']:.0f} images/s, "
          f"ratio {ratio['ratio']:.3f}, best of {ratio['repeats']} {ratio['ratio_best']:.3f} (plain NCHW path: "
          f"{ratio['ratio_plain_path']:.3f}, best {ratio['ratio_best_plain_path']:.3f})")
    return {"rows": rows, "markdown": table, "pytorch": ratio, "ort_levels": levels, "batches": list(BATCHES),
            "threads": threads, "onnxruntime": onnxruntime.__version__, "torch": torch.__version__}


def markdown_table(rows: list[dict], levels: list[str]) -> str:
    """The latency rows as a Markdown table (images/s; %BOPs of the float model of the same network)."""
    head = ["model", "variant", "%BOPs", "size kB"] + [f"ORT {level} b{b} img/s" for level in levels for b in BATCHES]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for row in rows:
        cells = [row["model"], row["variant"], f"{row['bops_pct']:.2f}", f"{row['size_bytes'] / 1e3:.0f}"]
        cells += [f"{row[f'ort_{level}_b{b}']:.0f}" for level in levels for b in BATCHES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the figures and write ``bench.json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer sweeps and repeats; latency of ResNet-20 only, onnxruntime default level only")
    parser.add_argument("--only", choices=("solvers", "latency"), default=None, help="run one part only")
    parser.add_argument("--latency", action="store_true", help="same as --only latency")
    parser.add_argument("--resnet18-solver", action="store_true",
                        help="also time the whole ResNet-18 admm_epc (default budgets: far over 10 minutes on a "
                             "2-core CPU; on by default with CUDA)")
    parser.add_argument("--ort-levels", default=None,
                        help="onnxruntime optimization levels to time, comma-separated (default: all,basic; "
                             "--quick: all)")
    parser.add_argument("--out", default=str(ROOT / "bench.json"))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is far faster on a busy machine)")
    args = parser.parse_args(argv)
    if args.latency:
        args.only = "latency"
    if args.ort_levels is None:
        args.ort_levels = "all" if args.quick else "all,basic"
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.resnet18_solver = args.resnet18_solver or device.type == "cuda"
    start = time.perf_counter()
    result: dict = {"device": str(device), "threads": torch.get_num_threads(), "quick": args.quick}
    if args.only != "latency":
        result.update(solver_figures(args, device))
    if args.only != "solvers":
        print(f"latency: onnxruntime CPU ({', '.join(args.ort_levels.split(','))}), batches {BATCHES}, "
              f"{torch.get_num_threads()} threads")
        result["latency"] = latency_table(args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB -> GiB
    if device.type == "cuda":
        peak = max(peak, torch.cuda.max_memory_allocated() / 1024**3)
    print(f"peak memory         {peak:8.2f} GB; {time.perf_counter() - start:.0f} s in all")
    result["peak_mem_gb"] = peak
    result["seconds"] = round(time.perf_counter() - start, 1)
    tmp = f"{args.out}.tmp{os.getpid()}"
    Path(tmp).write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    return result


if __name__ == "__main__":
    main()
