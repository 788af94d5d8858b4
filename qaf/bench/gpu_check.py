"""``python -m qaf.bench.gpu_check`` (``make gpu-check``): qaf on one GPU, against the CPU, in minutes.

1. **Solvers agree.** On real CIFAR layers (the packaged ResNet-20's ``layer1.0.conv1`` and
   ``layer3.2.conv2``, rate 2, 4 bits, the budgets of ``conf/cp_solver/default.yaml`` and
   ``conf/method/qswd.yaml``), ALS, EPC and AO-ADMM run on the CPU and on CUDA, each stage from
   the same start (the CPU's previous stage; ALS from the CPU's SVD start), and QSWD from its
   seeded start. Relative errors (and, for the float solvers, reconstructions) must agree within
   :data:`TOLERANCES`. Beside them, the CPU solved again with every weight moved by one float32
   step shows how far rounding alone moves each solver: the quantized solvers may then settle a
   few values on another grid level, which moves the solution but hardly its error.
2. **The ``cuda`` tests** (``pytest -m cuda tests/test_gpu.py``): observers, pinned loaders, and a
   whole ResNet-20 run with CUDA solvers and a GPU trainer against the same run on the CPU.
3. **The paper's workload.** One end-to-end ``python run.py method=admm_epc model=resnet18
   model.pretrained=false data=imagenet`` on the shipped ImageNet validation images, on the GPU,
   with an empty factor cache: its ``compress`` time is the ResNet-18 rate-2 ``admm_epc`` solve
   time; evaluation images/s and top-1 (random weights: chance level) come with it.

Without CUDA the CPU half of 1. runs, the rest is skipped with one line. Every figure is printed
and written as JSON (``--out``, e.g. ``$OUT/gpu_check.json``); the exit status is 1 when a
comparison is out of tolerance or a run or test fails, else 0.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor

from qaf.bench import ROOT, SHARED_DATA
from qaf.cache import FactorCache
from qaf.decomp.cp import cp_als, cp_rank, cp_to_tensor, init_factors, weight_to_tensor
from qaf.decomp.qswd import sparse_product, weight_to_matrix
from qaf.methods.base import CompressContext, Method
from qaf.methods.cp import CP
from qaf.models.cifar_resnet import build as cifar_resnet

LAYERS = ("layer1.0.conv1", "layer3.2.conv2")
BITS, RATE, SEED = 4, 2.0, 0
TESTS = ROOT / "tests" / "test_gpu.py"
#: The end-to-end job (its data.root, data.calib_samples and device come from the command line).
END_TO_END = ["method=admm_epc", f"bits={BITS}", f"rate={RATE:g}", "model=resnet18", "model.pretrained=false",
              "data=imagenet", "data.calib_split=val", "sweep_id=gpu_check", "logger=csv", "progress=true",
              "overwrite=true"]
CP_STAGES = ("als", "epc", "admm")
#: Largest accepted difference per solver, as (difference of the relative errors, relative to the
#: CPU's error; distance of the reconstructions, relative to the layer's norm). Both devices compute
#: in float32 (R x R algebra in float64) from the same start, so only rounding differs. EPC holds
#: the error fixed while it shrinks the factors, so its solution may drift further than ALS's. The
#: quantized solvers' distance is not bounded: a rounding difference can settle a value on the
#: neighbouring grid level and the iterates then part ways at about the same error (the CPU's
#: one-step nudge shows it).
TOLERANCES: dict[str, tuple[float, float | None]] = {"als": (1e-4, 1e-3), "epc": (1e-4, 1e-2),
                                                      "admm": (1e-2, None), "qswd": (3e-2, None)}


def configured(method: str) -> Method:
    """``method`` (``admm_epc`` or ``qswd``) with the run config's defaults at :data:`BITS`, :data:`RATE`."""
    from qaf.export.rerun import compose
    from qaf.pipeline import build

    cfg = compose(f"method={method}", f"bits={BITS}", f"rate={RATE}", "finetune=none")
    return build(cfg.method, bits=cfg.bits, act_bits=cfg.act_bits, rate=float(cfg.rate))


def cp_stage(method: CP, stage: str, tensor: Tensor, start: list[Tensor]) -> list[Tensor]:
    """One CP stage of ``method``'s solver chain (its budgets) from ``start``, on ``tensor``'s device."""
    start = [f.to(tensor.device) for f in start]
    rank = start[0].shape[1]
    if stage == "als":
        return cp_als(tensor, rank, n_iter=method.als["iters"], tol=method.als["tol"], init=start).factors
    if stage == "epc":
        return method.solve_epc(tensor, start).factors
    return method.solve_admm(tensor, start).factors


def timed_on(device: torch.device, fn):
    """``(fn(), seconds)``, waiting for the device's queued work."""
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def layer_solutions(conv: torch.nn.Conv2d, methods: dict, device: torch.device,
                    reference: dict[str, Tensor] | None = None) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Every solver's reconstruction of one conv, solved on ``device``, and the seconds each took.

    Parameters
    ----------
    conv : nn.Conv2d
        The layer (its weight is read on the CPU).
    methods : dict
        ``{"cp": the configured admm_epc, "qswd": the configured qswd}`` (:func:`configured`).
    device : torch.device
        Where the solvers run.
    reference : dict, optional
        The CPU run's result: each CP stage then starts from the CPU's previous stage. None: this
        is the CPU run, whose factors (``"<stage>_factors"``) are returned too.

    Returns
    -------
    tuple
        ``{solver: reconstruction (float64, CPU)}`` and ``{solver: seconds}``.
    """
    tensor = weight_to_tensor(conv.weight.detach()).to(device, torch.float32)
    start = init_factors(tensor.cpu(), cp_rank(tensor.shape, RATE), "svd", torch.Generator().manual_seed(SEED))
    out: dict[str, Tensor] = {}
    seconds: dict[str, float] = {}
    for stage in CP_STAGES:
        factors, seconds[stage] = timed_on(device, lambda: cp_stage(methods["cp"], stage, tensor, start))
        factors = [f.detach().cpu() for f in factors]
        out[stage] = cp_to_tensor([f.double() for f in factors])
        if reference is None:
            out[f"{stage}_factors"] = factors
        start = factors if reference is None else reference[f"{stage}_factors"]
    ctx = CompressContext(data=None, device=device, seed=SEED, progress=False)  # type: ignore[arg-type]
    (module, _, _), seconds["qswd"] = timed_on(
        device, lambda: methods["qswd"].decompose("layer", conv, ctx, FactorCache("", enabled=False)))
    layer = module.module  # the QSWD layer behind its input quantizer
    out["qswd"] = sparse_product(layer.index, layer.values, layer.dictionary).detach().cpu().double()
    return out, seconds


def agreement(targets: dict[str, Tensor], cpu: dict[str, Tensor], other: dict[str, Tensor]) -> dict[str, dict]:
    """Per solver: both relative errors, their relative difference, the reconstructions' distance, ``ok``.

    ``targets`` holds what each solver approximates (``{solver: tensor}``, see :func:`targets_of`).
    """
    figures = {}
    for solver, target in targets.items():
        norm = torch.linalg.vector_norm(target)
        e_cpu = float(torch.linalg.vector_norm(cpu[solver] - target) / norm)
        e_other = float(torch.linalg.vector_norm(other[solver] - target) / norm)
        distance = float(torch.linalg.vector_norm(cpu[solver] - other[solver]) / norm)
        error_tol, distance_tol = TOLERANCES[solver]
        figures[solver] = {"error_cpu": e_cpu, "error_other": e_other, "error_diff": abs(e_other - e_cpu) / e_cpu,
                           "distance": distance, "ok": abs(e_other - e_cpu) <= error_tol * e_cpu
                           and (distance_tol is None or distance <= distance_tol)}
    return figures


def targets_of(conv: torch.nn.Conv2d, methods: dict) -> dict[str, Tensor]:
    """What each solver approximates: the CP tensor of the weight, or QSWD's matrix of sub-vectors."""
    weight = conv.weight.detach().double()
    return {**{stage: weight_to_tensor(weight) for stage in CP_STAGES},
            "qswd": weight_to_matrix(weight, methods["qswd"].block)}


def nudged(conv: torch.nn.Conv2d) -> torch.nn.Conv2d:
    """A copy of ``conv`` with every weight one float32 step up or down (seeded): one rounding's worth."""
    other = copy.deepcopy(conv)
    up = torch.rand(conv.weight.shape, generator=torch.Generator().manual_seed(SEED)) < 0.5
    with torch.no_grad():
        other.weight.copy_(torch.nextafter(conv.weight, torch.where(up, torch.inf, -torch.inf)))
    return other


def solver_check(cuda: bool) -> dict:
    """Section 1: CPU solutions, the CPU's one-step nudge, and with ``cuda`` the CUDA solutions."""
    model = cifar_resnet(20)
    methods = {"cp": configured("admm_epc"), "qswd": configured("qswd")}
    result: dict = {"tolerances": {k: {"error_diff": e, "distance": d} for k, (e, d) in TOLERANCES.items()}}
    cpu_device = torch.device("cpu")
    for name in LAYERS:
        conv = model.get_submodule(name)
        targets = targets_of(conv, methods)
        cpu, cpu_s = layer_solutions(conv, methods, cpu_device)
        runs = {"nudged_cpu": layer_solutions(nudged(conv), methods, cpu_device, reference=cpu)}
        if cuda:
            runs["cuda"] = layer_solutions(conv, methods, torch.device("cuda"), reference=cpu)
        entry: dict = {"shape": list(conv.weight.shape), "rank": cp_rank(weight_to_tensor(conv.weight).shape, RATE),
                       "cpu_s": cpu_s}
        print(f"{name} {tuple(conv.weight.shape)}, rank {entry['rank']}: relative error on the CPU | "
              "CPU with weights nudged one step" + (" | CUDA" if cuda else ""))
        for run, (solutions, seconds) in runs.items():
            entry[run] = {"seconds": seconds, "agreement": agreement(targets, cpu, solutions)}
        for solver in targets:
            line = f"  {solver:5s} {entry['nudged_cpu']['agreement'][solver]['error_cpu']:.6f} {cpu_s[solver]:6.1f} s"
            for run in runs:
                fig = entry[run]["agreement"][solver]
                line += (f" | error diff {fig['error_diff']:.1e}, distance {fig['distance']:.1e}"
                         f"{'' if fig['ok'] else ' OUT OF TOLERANCE'}")
                line += f", {entry[run]['seconds'][solver]:.1f} s" if run == "cuda" else ""
            print(line, flush=True)
        result[name] = entry
    return result


def end_to_end(workdir: Path, overrides: list[str]) -> dict:
    """Section 2: one ``run.py`` job in ``workdir`` (:data:`END_TO_END` + ``overrides``), its timings and top-1."""
    overrides = [*END_TO_END, f"cache.dir={workdir / 'cache'}", *overrides]
    print("end to end: python run.py " + " ".join(overrides), flush=True)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), *overrides], cwd=workdir,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - start
    metrics_file = workdir / "multirun_outputs" / "gpu_check" / "metrics.json"
    if proc.returncode or not metrics_file.is_file():
        return {"ok": False, "returncode": proc.returncode, "wall_s": wall}
    metrics = json.loads(metrics_file.read_text())
    timings, layers = metrics["timings"], metrics["layers"]
    return {"ok": True, "wall_s": wall, "timings": timings, "resnet18_admm_epc_s": timings["compress"],
            "eval_images_per_s": metrics["eval_samples"] / timings["eval"], "top1": metrics["top1"],
            "mean_e_quant": sum(layer["e_quant"] for layer in layers) / len(layers), "layers": len(layers)}


def main(argv: list[str] | None = None) -> int:
    """Run the check; print and write its figures; 0 when all is within tolerance (or skipped)."""
    parser = argparse.ArgumentParser(prog="python -m qaf.bench.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "gpu_check.json"), help="JSON of the figures")
    parser.add_argument("--imagenet-root", default=str(SHARED_DATA / "imagenet_val_1300"),
                        help="ImageNet folder with val/<wnid>/*.JPEG (default: the shipped 1,300 images)")
    parser.add_argument("--calib-samples", type=int, default=512, help="calibration images of the end-to-end run")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads of the CPU solves (default: torch's choice; 1 is far faster on a busy "
                             "machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    start = time.perf_counter()
    result: dict = {"cuda": cuda, "device": torch.cuda.get_device_name() if cuda else None,
                    "torch": torch.__version__, "cpu_threads": torch.get_num_threads()}
    print(f"gpu-check: {result['device'] or 'no CUDA device'}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")
    result["solvers"] = solver_check(cuda)
    ok = all(fig["ok"] for name in LAYERS for run in ("nudged_cpu", "cuda") if run in result["solvers"][name]
             for fig in result["solvers"][name][run]["agreement"].values())
    if not cuda:
        print("gpu-check: no CUDA device: CPU references only; skipped the CUDA solvers, the cuda tests and the "
              "ResNet-18 ImageNet run")
    else:
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", str(TESTS)], cwd=ROOT)
        result["cuda_tests_returncode"] = tests.returncode
        ok = ok and tests.returncode == 0
        if (Path(args.imagenet_root) / "val").is_dir():
            with tempfile.TemporaryDirectory() as tmp:
                e2e = end_to_end(Path(tmp), [f"data.root={Path(args.imagenet_root).resolve()}",
                                             f"data.calib_samples={args.calib_samples}", "device=cuda"])
            result["end_to_end"], ok = e2e, ok and e2e["ok"]
            print(f"ResNet-18 admm_epc rate {RATE:g}: {e2e['resnet18_admm_epc_s']:.1f} s on the GPU ({e2e['layers']} "
                  f"layers, mean e_quant {e2e['mean_e_quant']:.4f}); evaluation {e2e['eval_images_per_s']:.0f} "
                  f"images/s; top-1 {e2e['top1']:.2f} % (random weights)" if e2e["ok"]
                  else f"end-to-end run FAILED (exit status {e2e['returncode']})")
        else:
            print(f"gpu-check: no ImageNet images at {args.imagenet_root}/val: skipped the ResNet-18 ImageNet run")
    result["ok"], result["seconds"] = ok, round(time.perf_counter() - start, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"gpu-check: {'all within tolerance' if ok else 'FAILED'} ({result['seconds']:.0f} s) -> {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
