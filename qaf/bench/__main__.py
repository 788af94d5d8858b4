"""``python -m qaf.bench [--quick] [--only solvers|lapq|latency|loaders] [--paper-grid]``: the benchmarks of :mod:`qaf.bench`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch

from qaf.bench import ROOT, SHARED_DATA, peak_mem_gb
from qaf.bench.lapq import lapq_figures
from qaf.bench.latency import BATCHES, latency_table
from qaf.bench.loaders import loader_figures
from qaf.bench.paper_grid import paper_grid
from qaf.bench.solvers import solver_figures


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the figures and write ``bench.json``."""
    parser = argparse.ArgumentParser(
        description="qaf benchmarks: solver speed, LAPQ loss evaluations, model latency, ImageNet loaders (bench.json)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer sweeps and repeats; latency of ResNet-20 only, onnxruntime default level only")
    parser.add_argument("--only", choices=("solvers", "lapq", "latency", "loaders"), default=None, help="run one part only")
    parser.add_argument("--latency", action="store_true", help="same as --only latency")
    parser.add_argument("--resnet18-solver", action="store_true",
                        help="time the whole ResNet-18 admm_epc at rate 2, 4 bits even with --quick (always "
                             "without --quick)")
    parser.add_argument("--paper-grid", action="store_true",
                        help="only the paper's ResNet-18 table: every factorization of "
                             "experiment=paper_resnet18_imagenet (42 jobs), seconds per stage and rate, e_quant")
    parser.add_argument("--rates", default=None,
                        help="with --paper-grid: only the jobs of these rates, comma-separated (e.g. 2,4)")
    parser.add_argument("--ort-levels", default=None,
                        help="onnxruntime optimization levels to time, comma-separated (default: all,basic; "
                             "--quick: all)")
    parser.add_argument("--imagenet-root", default=str(SHARED_DATA / "imagenet_val_1300"),
                        help="ImageNet folder with val/<wnid>/*.JPEG for the loader figures (default: the shipped "
                             "1,300 validation images)")
    parser.add_argument("--out", default=str(ROOT / "bench.json"))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is far faster on a busy machine)")
    args = parser.parse_args(argv)
    if args.latency:
        args.only = "latency"
    if args.rates and not args.paper_grid:
        parser.error("--rates is an option of --paper-grid")
    if args.ort_levels is None:
        args.ort_levels = "all" if args.quick else "all,basic"
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    result: dict = {"device": str(device), "threads": torch.get_num_threads(), "quick": args.quick}
    if args.paper_grid:
        result["paper_grid"] = paper_grid(device, args.rates.split(",") if args.rates else None)
    else:
        if args.only in (None, "solvers"):
            result.update(solver_figures(args, device))
        if args.only in (None, "lapq"):
            result.update(lapq_figures(device))
        if args.only in (None, "loaders"):
            result["loaders"] = loader_figures(args)
        if args.only in (None, "latency"):
            print(f"latency: onnxruntime CPU ({', '.join(args.ort_levels.split(','))}), batches {BATCHES}, "
                  f"{torch.get_num_threads()} threads")
            result["latency"] = latency_table(args)
    peak = peak_mem_gb(device)
    print(f"peak memory         {peak:8.2f} GB; {time.perf_counter() - start:.0f} s in all")
    result["peak_mem_gb"] = peak
    result["seconds"] = round(time.perf_counter() - start, 1)
    tmp = f"{args.out}.tmp{os.getpid()}"
    Path(tmp).write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    return result


if __name__ == "__main__":
    main()
