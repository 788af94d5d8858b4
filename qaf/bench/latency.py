"""Latency: onnxruntime images/s of compressed models, and the PyTorch CP evaluation ratio.

Float, PTQ W8A8 / W4A8, CP rate 2 / 3 W4A8 and QSWD models of ResNet-20 (32x32) and ResNet-18
(224x224, random weights, tiny solver budgets: only shapes matter) exported to ONNX with Q/DQ nodes
and run by onnxruntime on the CPU, batch 1 and 64, median images/s next to %BOPs, as a Markdown table
(docs/export.md); beside each compressed model its deployable form (:mod:`qaf.export.deploy`), and
for both how many convs onnxruntime's optimized graph runs on integer kernels and how many in
float; and the PyTorch evaluation throughput of the rate-2 W4A8 CP ResNet-20 relative to the float
model.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qaf.bench import ROOT, timed

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
#: The form timed and counted beside each compressed model's Q/DQ graph.
DEPLOY = "deploy"


def build_variant(arch: str, variant: str, cache_dir: str) -> tuple[torch.nn.Module, Any]:
    """The compressed (calibrated) model of one table row, through the pipeline's own stages, and its data."""
    from qaf.export.rerun import compose, compressed_model

    overrides = list(VARIANTS[variant])
    method = overrides[0].split("=", 1)[1]
    overrides += ARCHS[arch]["overrides"] + ARCHS[arch]["budgets"].get(method, [])
    cfg = compose(*overrides, "data.calib_samples=64", "data.eval_samples=64", f"cache.dir={cache_dir}",
                  "logger=none", "device=cpu", "progress=false")
    return compressed_model(cfg)


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
        inner[key] = max(1, int(0.05 / max(timed(run), 1e-6)))
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


def profile_shares(path: str | Path, shape: tuple[int, ...], batch: int, threads: int, runs: int = 10) -> dict:
    """Where onnxruntime spends a graph's time: its profiler over ``runs`` runs (after warm-up),
    the share of node time per op type, and that of the integer convs per layer kind (the last part
    of the module path a node is named after: ``depthwise``, ``pointwise_in``, ``conv1``, ...)."""
    import json

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.enable_profiling, options.log_severity_level = True, 3
    options.profile_file_prefix = str(Path(path).with_suffix(""))
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((batch, *shape), dtype=np.float32)
    for _ in range(3 + runs):  # the first runs' events are in the profile too: few against ``runs``
        sess.run(None, {"input": x})
    events = [e for e in json.loads(Path(sess.end_profiling()).read_text())
              if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    by_op: dict[str, float] = {}
    by_kind: dict[str, float] = {}
    for event in events:
        op = event["args"]["op_name"]
        by_op[op] = by_op.get(op, 0.0) + event["dur"]
        if op == "QLinearConv":
            path = event["name"].split("/")[0].removesuffix(".module")  # a QuantLayer behind its input quantizer
            kind = path.rsplit(".", 1)[-1]
            by_kind[kind] = by_kind.get(kind, 0.0) + event["dur"]
    total = sum(by_op.values())
    return {"batch": batch, "runs": runs,
            "op_share": {k: round(v / total, 4) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])},
            "qlinearconv_share": {k: round(v / total, 4) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])}}


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
                t_float.append(timed(lambda: evaluate(float_model)))
                t_model.append(timed(lambda: evaluate(model)))
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

    from qaf.export.deploy import calibrating_on, deployable
    from qaf.export.onnx import export_onnx, kernel_counts, session
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
                model, data = build_variant(arch, variant, cache_dir)
                costs = cost.layer_costs(model, shape)
                if fp32_macs is None:
                    fp32_macs = cost.total_macs(costs)
                paths[variant] = Path(tmp) / f"{arch}_{variant.replace(' ', '_')}.onnx"
                export_onnx(model, paths[variant], input_size=shape)
                if variant != "float":  # onnxruntime folds a float model's batch norms itself
                    form = deployable(model, calibrating_on(data.calib_loader()))
                    paths[(variant, DEPLOY)] = paths[variant].with_suffix(f".{DEPLOY}.onnx")
                    export_onnx(form, paths[(variant, DEPLOY)], input_size=shape)
                arch_rows[variant] = {
                    "model": arch, "variant": variant, "input": list(shape),
                    "bops_pct": cost.bops_pct(cost.total_bops(costs), fp32_macs), "macs": cost.total_macs(costs),
                    "size_bytes": size_bytes(model), "onnx_bytes": paths[variant].stat().st_size,
                    "build_s": round(time.perf_counter() - start, 1)}
                if arch == "ResNet-20" and variant in ("float", "CP rate 2 W4A8"):
                    models[variant] = model
            for level in levels:  # all variants timed together, interleaved (see interleaved_images_per_second)
                sessions = {}
                for key, path in paths.items():
                    optimized = path.with_suffix(f".{level}.onnx")
                    sessions[key] = session(path, threads=threads, level=level, optimized_path=optimized)
                    variant, prefix = key if isinstance(key, tuple) else (key, "ort")
                    arch_rows[variant][f"{prefix}_{level}_convs"] = kernel_counts(optimized)
                for batch in BATCHES:
                    x = np.random.default_rng(0).standard_normal((batch, *shape), dtype=np.float32)
                    runs = {k: (lambda s=s: s.run(None, {"input": x})) for k, s in sessions.items()}
                    for key, ips in interleaved_images_per_second(runs, batch, min_time, max_rounds).items():
                        variant, prefix = key if isinstance(key, tuple) else (key, "ort")
                        arch_rows[variant][f"{prefix}_{level}_b{batch}"] = ips
                del sessions
            if arch == "ResNet-20" and levels[0] == "all":  # the slowest deployable form: where its time goes
                key = ("CP rate 2 W4A8", DEPLOY)
                profile = profile_shares(paths[key], shape, 64, threads)
                arch_rows[key[0]]["deploy_all_b64_profile"] = profile
                print("  profile, CP rate 2 W4A8 deployable form, batch 64: " + ", ".join(
                    f"{op} {100 * v:.1f} %" for op, v in list(profile["op_share"].items())[:4]) + "; QLinearConv: "
                    + ", ".join(f"{k} {100 * v:.1f} %" for k, v in profile["qlinearconv_share"].items()), flush=True)
            for row in arch_rows.values():
                rows.append(row)
                print(f"  {arch:9s} {row['variant']:15s} %BOPs {row['bops_pct']:7.3f}  " + "  ".join(
                    f"{k} {v:8.1f}" for k, v in row.items() if k.endswith(tuple(f"_b{b}" for b in BATCHES))) +
                    "  " + "  ".join(f"{k} {v['integer']}/{v['float']}" for k, v in row.items()
                                     if k.endswith("_convs")) + f"  ({row['build_s']:.0f} s build)", flush=True)
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
    """The latency rows as a Markdown table: images/s of the Q/DQ graph and of the deployable form
    (``–`` for the float model, which has none), convs + linears on integer / float kernels after
    onnxruntime's optimizer; %BOPs of the float model of the same network."""
    forms = (("ort", "ORT"), (DEPLOY, "deploy"))
    head = (["model", "variant", "%BOPs", "size kB"]
            + [f"{name} {level} b{b} img/s" for level in levels for b in BATCHES for _, name in forms]
            + [f"{name} {level} int/float convs" for level in levels for _, name in forms])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for row in rows:
        cells = [row["model"], row["variant"], f"{row['bops_pct']:.2f}", f"{row['size_bytes'] / 1e3:.0f}"]
        cells += [_cell(row.get(f"{prefix}_{level}_b{b}"), "{:.0f}") for level in levels for b in BATCHES
                  for prefix, _ in forms]
        cells += [_cell(row.get(f"{prefix}_{level}_convs"), "{integer}/{float}") for level in levels
                  for prefix, _ in forms]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: Any, form: str) -> str:
    if value is None:
        return "–"
    return form.format(**value) if isinstance(value, dict) else form.format(value)
